"""The fake Hugging Face Hub behaves like the real one where kubetune's model loading depends on it.

Checked through the real ``huggingface_hub`` client (and transformers' ``from_pretrained``): the
cache layout under the served commit, snapshots, gated access and its three refusals, LFS files
from a CDN on signed URLs that the token never reaches, the error classes for unknown revisions,
files and repos, the listing APIs, a request log that names accounts but never holds a token, and
the script mode configured only by ``HF_ENDPOINT``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

from fakes.hf_hub import FakeHub, fresh_client, use_endpoint  # noqa: E402

ALICE = "hf_alice_0123456789abcdefABCDEF"
BOB = "hf_bob_0123456789abcdefABCDEFGH"
PUBLIC, GATED = "acme/tiny", "meta-llama/tiny-gated"
WEIGHTS = bytes(range(256)) * 400  # 100 kB: stored in LFS for its suffix


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "extra").mkdir(parents=True)
    (repo / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (repo / "model.safetensors").write_bytes(WEIGHTS)
    (repo / "extra" / "notes.txt").write_text("a file in a folder\n")
    return repo


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fresh_client(monkeypatch, tmp_path / "home")


@pytest.fixture
def hub(folder: Path) -> Iterator[FakeHub]:
    fake = FakeHub(
        {PUBLIC: folder, GATED: folder},
        tokens={"alice": ALICE, "bob": BOB},
        gated={GATED: {"alice"}},
    )
    with fake.serve() as served, use_endpoint(served.endpoint):
        yield served


def download(cache: Path, filename: str, repo: str = PUBLIC, **kw: Any) -> Path:
    kw.setdefault("token", False)
    return Path(hf_hub_download(repo, filename, cache_dir=cache, **kw))


def git_blob(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_download_lands_under_the_served_commit(hub: FakeHub, folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    commit = hub.commit(PUBLIC)
    config = download(cache, "config.json")
    weights = download(cache, "model.safetensors")
    assert config.read_bytes() == (folder / "config.json").read_bytes()
    assert weights.read_bytes() == WEIGHTS
    storage = cache / "models--acme--tiny"
    assert config.parent == storage / "snapshots" / commit
    assert (storage / "refs" / "main").read_text() == commit
    # Blobs are named by ETag: the git blob sha1, or the sha256 for LFS files.
    assert config.resolve().name == git_blob((folder / "config.json").read_bytes())
    assert weights.resolve().name == hashlib.sha256(WEIGHTS).hexdigest()
    by_commit = download(tmp_path / "other", "extra/notes.txt", revision=commit)
    assert by_commit.read_text() == "a file in a folder\n"


def test_commit_is_a_function_of_names_and_contents(folder: Path) -> None:
    first = FakeHub({PUBLIC: folder}).commit(PUBLIC)
    assert FakeHub({PUBLIC: folder}).commit(PUBLIC) == first and len(first) == 40
    (folder / "config.json").write_text("{}")
    assert FakeHub({PUBLIC: folder}).commit(PUBLIC) != first


def test_range_requests_resume_a_download(hub: FakeHub) -> None:
    url = f"{hub.endpoint}/{PUBLIC}/resolve/main/config.json"
    size = (hub.repos[PUBLIC].files["config.json"]).size
    response = httpx.get(url, headers={"Range": "bytes=3-"})
    assert response.status_code == 206 and response.headers["Content-Range"] == (
        f"bytes 3-{size - 1}/{size}"
    )
    head = httpx.head(url)
    assert head.headers["Content-Length"] == str(size)
    assert head.headers["X-Repo-Commit"] == hub.commit(PUBLIC)
    lfs = httpx.head(f"{hub.endpoint}/{PUBLIC}/resolve/main/model.safetensors")
    resumed = httpx.get(lfs.headers["Location"], headers={"Range": "bytes=1000-"})
    assert resumed.status_code == 206 and resumed.content == WEIGHTS[1000:]


def test_lfs_files_come_from_the_cdn_on_signed_urls_without_the_token(
    hub: FakeHub, folder: Path, tmp_path: Path
) -> None:
    resolve = f"{hub.endpoint}/{GATED}/resolve/main/model.safetensors"
    assert httpx.head(resolve).status_code == 401  # the Hub checks access before it signs
    redirect = httpx.head(resolve, headers={"Authorization": f"Bearer {ALICE}"})
    assert redirect.status_code == 302
    assert redirect.headers["X-Linked-Size"] == str(len(WEIGHTS))
    assert redirect.headers["X-Linked-Etag"] == f'"{hashlib.sha256(WEIGHTS).hexdigest()}"'
    location = urlparse(redirect.headers["Location"])
    assert location.port != urlparse(hub.endpoint).port  # another origin: the token stays home
    signed = redirect.headers["Location"]
    assert httpx.get(signed).content == WEIGHTS
    tampered = signed.replace("signature=", "signature=0")
    expired = signed.replace("expires=", "expires=1")  # 1x…: seconds after 1970, long gone
    unknown = signed.replace(location.path, "/blobs/" + "0" * 64)
    assert [httpx.get(url).status_code for url in (tampered, expired, unknown)] == [403] * 3

    start = len(hub.requests)
    weights = download(tmp_path / "cache", "model.safetensors", GATED, token=ALICE)
    assert weights.read_bytes() == WEIGHTS
    log = [(r.route, r.method, r.status, r.authorization, r.user) for r in hub.requests[start:]
           if r.route != "agent_harnesses"]  # fmt: skip
    assert log == [("resolve", "HEAD", 302, True, "alice"), ("cdn", "GET", 200, False, None)]

    in_place = FakeHub({PUBLIC: folder}, cdn=False)
    with in_place.serve() as served:
        got = httpx.get(f"{served.endpoint}/{PUBLIC}/resolve/main/model.safetensors")
    assert (got.status_code, got.content, served.cdn) == (200, WEIGHTS, "")


def test_snapshot_download_copies_every_file(hub: FakeHub, folder: Path, tmp_path: Path) -> None:
    snapshot = Path(snapshot_download(PUBLIC, cache_dir=tmp_path / "c", token=False))
    assert snapshot.name == hub.commit(PUBLIC)
    got = {p.relative_to(snapshot).as_posix(): p.read_bytes() for p in snapshot.rglob("*")
           if p.is_file()}  # fmt: skip
    want = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file()}  # fmt: skip
    assert got == want
    # huggingface_hub 2.4 first fetches its agent registry (unauthenticated, once per HF_HOME).
    routes = [r.route for r in hub.requests]
    assert routes[:3] == ["agent_harnesses", "model_info", "tree"]
    # then HEAD+GET per file, the GET of an LFS file on the CDN
    assert Counter(routes[3:]) == {"resolve": 5, "cdn": 1} and not hub.unexpected


def test_gated_repo_refusals_and_access(hub: FakeHub, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(GatedRepoError) as no_token:
        download(cache, "config.json", GATED)
    assert no_token.value.response.status_code == 401
    assert "You must have access to it and be authenticated" in str(no_token.value)
    with pytest.raises(HfHubHTTPError) as wrong:
        download(cache, "config.json", GATED, token="hf_nobody_owns_this_token")
    assert not isinstance(wrong.value, RepositoryNotFoundError)
    assert wrong.value.response.status_code == 401
    assert "Invalid credentials in Authorization header" in str(wrong.value)
    with pytest.raises(HfHubHTTPError, match="Invalid credentials"):  # public repos too
        download(cache, "config.json", PUBLIC, token="hf_nobody_owns_this_token")
    with pytest.raises(GatedRepoError) as not_granted:
        download(cache, "config.json", GATED, token=BOB)
    assert not_granted.value.response.status_code == 403
    assert "you are not in the authorized list" in str(not_granted.value)
    assert download(cache, "config.json", GATED, token=ALICE).is_file()

    # As on the Hub, a gated repo's metadata is public; only its files are gated.
    info = HfApi(token=False).model_info(GATED)
    assert info.gated == "manual" and info.sha == hub.commit(GATED)

    log = hub.requests
    assert [(r.status, r.authorization, r.user) for r in log if r.route == "resolve"] == [
        (401, False, None), (401, True, None), (401, True, None), (403, True, "bob"),
        (200, True, "alice"), (200, True, "alice"),
    ]  # fmt: skip
    assert [r.method for r in log if r.user == "alice"] == ["HEAD", "GET"]
    assert ALICE not in repr(log) and BOB not in repr(log)


def test_unknown_revision_file_and_repo(hub: FakeHub, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(RevisionNotFoundError):
        download(cache, "config.json", revision="v9")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(PUBLIC, revision="v9", cache_dir=cache, token=False)
    with pytest.raises(RemoteEntryNotFoundError) as missing:
        download(cache, "tokenizer.json")
    assert isinstance(missing.value, EntryNotFoundError)
    # The absence is cached under the commit the 404 named.
    no_exist = cache / "models--acme--tiny" / ".no_exist" / hub.commit(PUBLIC)
    assert (no_exist / "tokenizer.json").exists()
    with pytest.raises(RepositoryNotFoundError) as anonymous:
        download(cache, "config.json", "acme/absent")
    with pytest.raises(RepositoryNotFoundError) as signed_in:
        download(cache, "config.json", "acme/absent", token=ALICE)
    assert anonymous.value.response.status_code == 401
    assert signed_in.value.response.status_code == 404


def test_info_and_listing_apis(hub: FakeHub) -> None:
    api = HfApi(token=False)
    commit = hub.commit(PUBLIC)
    info = api.model_info(PUBLIC, files_metadata=True)
    assert (info.id, info.sha, info.gated, info.private) == (PUBLIC, commit, False, False)
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert set(siblings) == {"config.json", "extra/notes.txt", "model.safetensors"}
    lfs = siblings["model.safetensors"].lfs
    assert lfs is not None and lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    assert siblings["config.json"].lfs is None
    assert api.model_info(PUBLIC, revision=commit, expand=["sha"]).sha == commit
    assert sorted(api.list_repo_files(PUBLIC)) == sorted(siblings)
    top = [(e.path, type(e).__name__) for e in api.list_repo_tree(PUBLIC)]
    assert top == [
        ("extra", "RepoFolder"), ("config.json", "RepoFile"), ("model.safetensors", "RepoFile")
    ]  # fmt: skip
    assert [e.path for e in api.list_repo_tree(PUBLIC, "extra")] == ["extra/notes.txt"]
    with pytest.raises(RemoteEntryNotFoundError):
        list(api.list_repo_tree(PUBLIC, "additional_chat_templates"))
    assert not hub.unexpected
    with pytest.raises(HfHubHTTPError):
        api.list_repo_refs(PUBLIC)  # a route the fake does not serve: 404, and logged
    assert [r.path for r in hub.unexpected] == [f"/api/models/{PUBLIC}/refs"]


def test_transformers_loads_a_gated_model_through_the_fake(
    demo_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fake = FakeHub({"acme/demo": demo_model}, tokens={"alice": ALICE},
                   gated={"acme/demo": {"alice"}})  # fmt: skip
    cache = tmp_path / "cache"
    with fake.serve() as hub, use_endpoint(hub.endpoint):
        with pytest.raises(OSError, match="gated repo") as refused:
            AutoTokenizer.from_pretrained("acme/demo", cache_dir=cache)
        assert isinstance(refused.value.__cause__, GatedRepoError)
        refused_count = len(hub.requests)
        monkeypatch.setenv("HF_TOKEN", ALICE)  # as the trainer gets it from the job's Secret
        tokenizer = AutoTokenizer.from_pretrained("acme/demo", cache_dir=cache)
        model = AutoModelForCausalLM.from_pretrained("acme/demo", cache_dir=cache)
        local = AutoTokenizer.from_pretrained(demo_model)  # a folder: no request at all
    assert tokenizer.get_vocab() == local.get_vocab()
    assert tokenizer.chat_template == local.chat_template
    weights = load_file(demo_model / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert not hub.unexpected
    loads = hub.requests[refused_count:]
    on_hub = [r for r in loads if r.route != "cdn"]
    assert {r.user for r in on_hub} == {"alice"}  # every call to the Hub carried the job's token
    gets = [r.path for r in on_hub if r.method == "GET" and r.route == "resolve"]
    assert {"config.json", "tokenizer.json"} <= {path.rsplit("/", 1)[-1] for path in gets}
    from_cdn = [r for r in loads if r.route == "cdn"]  # the weights, on a signed URL
    assert [(r.method, r.status, r.authorization) for r in from_cdn] == [("GET", 200, False)]


def test_script_serves_a_process_configured_by_env_only(folder: Path, tmp_path: Path) -> None:
    script = ROOT / "tests" / "fakes" / "hf_hub.py"
    server = subprocess.Popen(
        [sys.executable, str(script), "--repo", f"{GATED}={folder}", "--gated", GATED,
         "--token", ALICE],
        stdout=subprocess.PIPE, text=True, cwd="/",
    )  # fmt: skip
    try:
        assert server.stdout is not None
        line = server.stdout.readline().strip()
        assert line.startswith("fake Hugging Face Hub listening on http://127.0.0.1:"), line
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
        env |= {"HF_ENDPOINT": line.rsplit(" ", 1)[-1], "HF_TOKEN": ALICE,
                "HF_HOME": str(tmp_path / "home")}  # fmt: skip
        get = f"h.hf_hub_download({GATED!r}, 'config.json')"
        client = f"import huggingface_hub as h; print(open({get}).read())"
        out = subprocess.run([sys.executable, "-c", client], env=env, cwd="/",
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"model_type": "llama"}
    finally:
        server.terminate()
        server.wait(10)
