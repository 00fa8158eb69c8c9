"""The real node's one-binary images (hack/node/binary_image.py: pause, coredns) are valid OCI
archives."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "hack" / "node" / "binary_image.py"


@pytest.mark.parametrize(
    ("program", "image"),
    [("pause", "kubetune.local/pause:1"), ("coredns", "kubetune.local/coredns:0123456789ab")],
)
def test_the_archive_names_the_image_and_every_digest_matches_its_blob(
    tmp_path: Path, program: str, image: str
) -> None:
    binary = tmp_path / program
    binary.write_bytes(b"\x7fELF not really")
    binary.chmod(0o755)
    archive = tmp_path / "image.tar"
    subprocess.run([sys.executable, str(SCRIPT), str(binary), image, str(archive)], check=True)
    with tarfile.open(archive) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]

    def blob(descriptor: dict[str, object]) -> bytes:
        algorithm, digest = str(descriptor["digest"]).split(":")
        data = files[f"blobs/{algorithm}/{digest}"]
        assert hashlib.sha256(data).hexdigest() == digest
        assert len(data) == descriptor["size"]
        return data

    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    (entry,) = json.loads(files["index.json"])["manifests"]
    assert entry["annotations"]["io.containerd.image.name"] == image
    manifest = json.loads(blob(entry))
    config = json.loads(blob(manifest["config"]))
    assert config["config"]["Entrypoint"] == [f"/{program}"]
    assert config["config"]["User"] == "65535:65535"
    (layer_descriptor,) = manifest["layers"]
    layer = gzip.decompress(blob(layer_descriptor))
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(layer).hexdigest()]
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        (member,) = tar.getmembers()
        assert member.name == program and member.mode & 0o111
        assert tar.extractfile(member).read() == binary.read_bytes()  # type: ignore[union-attr]
