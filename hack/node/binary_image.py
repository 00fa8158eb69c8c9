"""Writes an OCI image archive of one static binary, importable with `ctr images import`.

    python3 binary_image.py <binary> <image name> <archive>

The image holds the binary at /<its file name>, its entrypoint, run as user 65535: the node's
pod sandbox (pause) and its cluster DNS (coredns), for which no registry can be reached.

Standard library only: node-up.sh runs it with the machine's python3, before any venv exists.
"""

import gzip
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path


def blob(archive: tarfile.TarFile, data: bytes, media_type: str) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo(f"blobs/sha256/{digest}")
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def main(binary: str, name: str, path: str) -> None:
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tar.gettarinfo(binary, arcname=Path(binary).name)
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        with Path(binary).open("rb") as f:
            tar.addfile(info, f)
    diff_id = "sha256:" + hashlib.sha256(layer.getvalue()).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": [f"/{Path(binary).name}"], "User": "65535:65535"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    with tarfile.open(path, "w") as archive:
        layer_desc = blob(
            archive,
            gzip.compress(layer.getvalue(), mtime=0),
            "application/vnd.oci.image.layer.v1.tar+gzip",
        )
        config_desc = blob(
            archive, json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"
        )
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config_desc,
            "layers": [layer_desc],
        }
        manifest_desc = blob(
            archive, json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json"
        )
        manifest_desc["annotations"] = {
            "io.containerd.image.name": name,
            "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1],
        }
        for member, data in (
            ("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode()),
            ("index.json", json.dumps({"schemaVersion": 2, "manifests": [manifest_desc]}).encode()),
        ):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


if __name__ == "__main__":
    main(*sys.argv[1:4])
