"""A fake of the Hugging Face Hub's download API for tests, driven by the real ``huggingface_hub``.

Shapes, headers and status codes follow what huggingface_hub 2.4 reads
(``file_download.get_hf_file_metadata``/``http_get``, ``hf_api.model_info``/``list_repo_tree``,
``utils/_http.hf_raise_for_status``) and how the Hub answers. Repos are local folders, read once
when the fake is made; each has one branch, ``main``, whose commit is a sha1 of its file names and
contents; that commit is a revision too. Repo ids are ``namespace/name``.

Routes (point ``HF_ENDPOINT`` at :attr:`FakeHub.endpoint`):

- ``HEAD|GET /{repo_id}/resolve/{revision}/{path}``: the file with ``X-Repo-Commit``, a quoted
  ``ETag`` (the git blob sha1; the sha256 for LFS-style files, which also carry ``X-Linked-Etag``
  and ``X-Linked-Size``), ``Content-Length``, and ``Range`` (206). As on the Hub, an LFS-style
  file is not served there but redirected (302, those headers on the redirect) to a signed URL
  of the fake's CDN, another origin (:attr:`FakeHub.cdn`), so the client does not send the token
  there; ``cdn=False`` serves LFS files in place too.
- CDN: ``HEAD|GET /blobs/{sha256}?expires=..&signature=..``: the blob, for a signature the Hub
  made that has not expired; any other URL is refused with 403, a token or not (a CDN knows
  none). Logged with ``route="cdn"``.
- ``GET /api/models/{repo_id}[/revision/{revision}]``: model info (``sha``, ``siblings``,
  ``gated``: ``False`` or ``"manual"``); ``?blobs=true`` adds sizes and LFS data, ``?expand=``
  keeps only the named properties.
- ``GET /api/models/{repo_id}/tree/{revision}[/{path}]`` (``?recursive=true``): one page.
- ``GET /api/agent-harnesses``: an empty registry. huggingface_hub fetches it, without a token,
  from the first request of a process that has no fresh copy in ``HF_HOME`` (unless
  ``HF_HUB_DISABLE_TELEMETRY`` is set), to name a coding agent in its user agent.

Refusals, as the Hub sends them (``X-Error-Code``/``X-Error-Message`` headers, ``{"error"}`` body),
and what huggingface_hub raises for them:

- a token no account owns, on any route: 401 ``Invalid credentials in Authorization header``, no
  code (a plain ``HfHubHTTPError``);
- an unknown repo: ``RepoNotFound``, 401 without a token and 404 with one
  (``RepositoryNotFoundError``);
- a gated repo's files without a token: 401 ``GatedRepo``; with the token of an account that was
  not granted access: 403 ``GatedRepo`` (``GatedRepoError``). As on the Hub, a gated repo's info
  and listing are public: only file contents are gated;
- another revision: 404 ``RevisionNotFound``; a missing file or folder: 404 ``EntryNotFound``
  (``RemoteEntryNotFoundError``), with ``X-Repo-Commit`` so the client caches the absence;
- any other route: 404, logged with ``route=None`` (:attr:`FakeHub.unexpected`).

Every request is logged (:attr:`FakeHub.requests`) with the account its token belongs to, never
the token. huggingface_hub reads ``HF_ENDPOINT`` once, at import: a process that imported it
already is re-pointed with :func:`use_endpoint`.

Run: ``with FakeHub(repos, tokens=..., gated=...).serve() as hub: hub.endpoint`` (in-thread), or
``python tests/fakes/hf_hub.py --repo org/name=/path [--gated org/name[=user,...]]
--token [user=]hf_xxx`` (prints the endpoint; gated repos without accounts grant every token).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import re
import secrets
import sys
import threading
import time
from collections.abc import Collection, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

if not __package__:  # run as a script: make the `fakes` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fakes.threaded import serve_app

__all__ = ["FakeHub", "HubRequest", "fresh_client", "use_endpoint"]

LFS_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack",
                          ".onnx", ".gguf", ".model", ".npz", ".zip"})  # fmt: skip
"""The Hub's default ``.gitattributes`` stores these in LFS; it refuses plain files over 10 MB."""
LFS_MIN_SIZE = 10 * 1024 * 1024
CDN_URL_SECONDS = 3600
"""How long a signed CDN URL the Hub hands out stays valid."""
DATE = "2024-01-01T00:00:00.000Z"
"""``lastModified``/``createdAt``: fixed, so that answers are deterministic."""
REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass(frozen=True)
class HubFile:
    """One file of a repo, with the hashes the Hub would report for it."""

    disk: Path
    size: int
    blob_id: str
    """Git blob sha1 of what git stores: the content, or the LFS pointer for LFS files."""
    sha256: str | None = None
    """The content's sha256, for LFS files only (their ETag)."""
    pointer_size: int | None = None

    @property
    def etag(self) -> str:
        return self.sha256 or self.blob_id


@dataclass(frozen=True)
class HubRepo:
    repo_id: str
    commit: str
    files: dict[str, HubFile]
    """By path in the repo, ``/``-separated, sorted."""


@dataclass(frozen=True)
class HubRequest:
    """One request as the fake saw it; the token itself is never kept."""

    method: str
    path: str
    """Decoded URL path (``%2F`` in a tree path shows as ``/``)."""
    query: str
    route: str | None
    """``resolve``, ``model_info``, ``tree``, ``agent_harnesses``, or ``cdn`` (a request to the
    CDN); None for a route the fake does not serve."""
    status: int
    authorization: bool
    """Whether an ``Authorization`` header came with it."""
    user: str | None
    """The account whose token it carried; None without a token or for an unknown one."""


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, **headers: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers

    def response(self) -> Response:
        headers = {"X-Error-Message": self.message, **self.headers}
        if self.code:
            headers["X-Error-Code"] = self.code
        return JSONResponse({"error": self.message}, self.status, headers)


def _sha(path: Path, algorithm: str, prefix: bytes = b"") -> str:
    digest = hashlib.new(algorithm, prefix)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _git_blob(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hub_file(disk: Path) -> HubFile:
    size = disk.stat().st_size
    if disk.suffix not in LFS_SUFFIXES and size < LFS_MIN_SIZE:
        return HubFile(disk, size, _sha(disk, "sha1", b"blob %d\0" % size))
    sha256 = _sha(disk, "sha256")
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n"
    return HubFile(disk, size, _git_blob(pointer.encode()), sha256, len(pointer))


def load_repo(repo_id: str, folder: Path) -> HubRepo:
    """The repo a folder makes (``.git`` left out); the same files give the same commit."""
    if not REPO_ID.fullmatch(repo_id):
        raise ValueError(f"`repos`: {repo_id!r} is not a `namespace/name` repo id")
    if not folder.is_dir():
        raise ValueError(f"`repos[{repo_id!r}]`: {folder} is not a folder")
    files = {p.relative_to(folder).as_posix(): hub_file(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and ".git" not in p.relative_to(folder).parts}  # fmt: skip
    listing = "".join(f"{name}\0{f.blob_id}\n" for name, f in sorted(files.items()))
    return HubRepo(repo_id, hashlib.sha1(listing.encode()).hexdigest(), dict(sorted(files.items())))


@dataclass(frozen=True)
class _Call:
    route: str
    repo_id: str
    revision: str
    path: str


def _parse(method: str, parts: list[str]) -> _Call | None:
    """The Hub route ``parts`` (the raw path's segments, each unquoted) names, if any."""
    if method == "GET" and parts == ["api", "agent-harnesses"]:
        return _Call("agent_harnesses", "", "", "")
    if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve" and parts[4]:
        return _Call("resolve", f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
    if method != "GET" or parts[:2] != ["api", "models"] or len(parts) < 4:
        return None
    repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
    if not rest:
        return _Call("model_info", repo_id, "main", "")
    if len(rest) == 2 and rest[0] == "revision":
        return _Call("model_info", repo_id, rest[1], "")
    if len(rest) >= 2 and rest[0] == "tree":
        return _Call("tree", repo_id, rest[1], "/".join(rest[2:]).strip("/"))
    return None


class FakeHub:
    """The Hub fake: :meth:`app` (ASGI) or :meth:`serve` (a thread)."""

    def __init__(
        self,
        repos: Mapping[str, Path],
        *,
        tokens: Mapping[str, str] | None = None,
        gated: Mapping[str, Collection[str]] | None = None,
        cdn: bool = True,
    ) -> None:
        """``tokens`` maps account names to their tokens; ``gated`` maps each gated repo to the
        accounts granted access to it. Accounts, not tokens, are what the log names. ``cdn``:
        LFS files are redirected to the CDN, as the Hub does."""
        self.repos = {repo_id: load_repo(repo_id, Path(p)) for repo_id, p in repos.items()}
        self._accounts = {token: user for user, token in (tokens or {}).items()}
        self.gated = {repo_id: frozenset(users) for repo_id, users in (gated or {}).items()}
        for repo_id, users in self.gated.items():
            if repo_id not in self.repos:
                raise ValueError(f"`gated`: {repo_id!r} is not in `repos`")
            if unknown := users - set(self._accounts.values()):
                raise ValueError(f"`gated[{repo_id!r}]`: no account {sorted(unknown)} in `tokens`")
        self.endpoint = ""
        """``http://127.0.0.1:PORT`` while :meth:`serve` runs: the ``HF_ENDPOINT`` value."""
        self.cdn = ""
        """The CDN's root URL while :meth:`serve` runs with ``cdn`` (same host, another port)."""
        self._use_cdn = cdn
        self._blobs = {f.sha256: f for r in self.repos.values() for f in r.files.values()
                       if f.sha256}  # fmt: skip
        self._signing_key = secrets.token_bytes(32)
        self._log: list[HubRequest] = []
        self._lock = threading.Lock()

    def commit(self, repo_id: str) -> str:
        return self.repos[repo_id].commit

    @property
    def requests(self) -> list[HubRequest]:
        with self._lock:
            return list(self._log)

    @property
    def unexpected(self) -> list[HubRequest]:
        """Requests for routes the fake does not serve (the real Hub might have)."""
        return [r for r in self.requests if r.route is None]

    def app(self) -> Starlette:
        methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
        return Starlette(routes=[Route("/{rest:path}", self._endpoint, methods=methods)])

    def cdn_app(self) -> Starlette:
        return Starlette(routes=[Route("/{rest:path}", self._cdn, methods=["GET", "HEAD"])])

    @contextmanager
    def serve(self, host: str = "127.0.0.1", port: int = 0) -> Iterator[FakeHub]:
        """Serves the fake (and its CDN) from threads until the block ends; sets
        :attr:`endpoint` and :attr:`cdn`."""
        cdn: AbstractContextManager[str] = nullcontext("")
        if self._use_cdn:
            cdn = serve_app(self.cdn_app(), host, 0, "the fake Hub's CDN")
        with (
            cdn as cdn_root,
            serve_app(self.app(), host, port, "the fake Hugging Face Hub") as root,
        ):
            self.endpoint, self.cdn = root, cdn_root
            yield self

    def _log_request(
        self, request: Request, route: str | None, status: int, user: str | None
    ) -> None:
        entry = HubRequest(request.method, request.url.path, request.url.query, route, status,
                           "authorization" in request.headers, user)  # fmt: skip
        with self._lock:
            self._log.append(entry)

    def _signature(self, sha256: str, expires: str) -> str:
        return hmac.new(self._signing_key, f"{sha256}:{expires}".encode(), "sha256").hexdigest()

    def _cdn_url(self, sha256: str) -> str:
        expires = str(int(time.time()) + CDN_URL_SECONDS)
        query = urlencode({"expires": expires, "signature": self._signature(sha256, expires)})
        return f"{self.cdn}/blobs/{sha256}?{query}"

    def _signed(self, sha256: str, query: Mapping[str, str]) -> bool:
        expires, signature = query.get("expires", ""), query.get("signature", "")
        return (
            expires.isdigit()
            and int(expires) > time.time()
            and hmac.compare_digest(self._signature(sha256, expires), signature)
        )

    async def _cdn(self, request: Request) -> Response:
        parts = request.url.path.split("/")[1:]
        blob = self._blobs.get(parts[1]) if len(parts) == 2 and parts[0] == "blobs" else None
        response: Response
        if blob is not None and self._signed(parts[1], request.query_params):
            response = FileResponse(blob.disk, headers={"ETag": f'"{parts[1]}"'})
        else:
            response = Response("<Error><Code>AccessDenied</Code></Error>", 403,
                                media_type="application/xml")  # fmt: skip
        self._log_request(request, "cdn", response.status_code, None)
        return response

    async def _endpoint(self, request: Request) -> Response:
        raw = request.scope.get("raw_path") or request.url.path.encode()
        # Split before unquoting: the client quotes a revision or tree path's "/" as %2F.
        call = _parse(request.method, [unquote(p) for p in raw.decode("latin-1").split("/")[1:]])
        header = request.headers.get("authorization")
        scheme, _, token = (header or "").partition(" ")
        user = self._accounts.get(token.strip()) if scheme.lower() == "bearer" else None
        try:
            if call is None:
                raise HubError(404, None, f"the fake Hub has no route {request.url.path}")
            if header is not None and user is None:
                raise HubError(401, None, "Invalid credentials in Authorization header")
            response = self._answer(call, user, request)
        except HubError as exc:
            response = exc.response()
        self._log_request(request, call.route if call else None, response.status_code, user)
        return response

    def _answer(self, call: _Call, user: str | None, request: Request) -> Response:
        if call.route == "agent_harnesses":
            return JSONResponse({"standardEnvVars": ["AI_AGENT", "AGENT"], "harnesses": {}})
        repo = self.repos.get(call.repo_id)
        if repo is None:
            raise HubError(404 if user else 401, "RepoNotFound", "Repository not found")
        granted = self.gated.get(repo.repo_id)
        if call.route == "resolve" and granted is not None and user not in granted:
            restricted = f"Access to model {repo.repo_id} is restricted"
            if user is None:
                raise HubError(401, "GatedRepo", f"{restricted}. You must have access to it and "
                               "be authenticated to access it. Please log in.")  # fmt: skip
            page = f"https://huggingface.co/{repo.repo_id}"
            raise HubError(403, "GatedRepo", f"{restricted} and you are not in the authorized "
                           f"list. Visit {page} to ask for access.")  # fmt: skip
        if call.revision not in ("main", repo.commit):
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {call.revision}")
        if call.route == "model_info":
            return JSONResponse(self._model_info(repo, request))
        if call.route == "tree":
            recursive = request.query_params.get("recursive", "").lower() == "true"
            return JSONResponse(_tree(repo, call.path, recursive))
        file = repo.files.get(call.path)
        if file is None:
            commit = {"X-Repo-Commit": repo.commit}  # the client caches the absence under it
            raise HubError(404, "EntryNotFound", "Entry not found", **commit)
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{file.etag}"'}
        if file.sha256:
            headers |= {"X-Linked-Etag": f'"{file.sha256}"', "X-Linked-Size": str(file.size)}
            if self.cdn:
                headers["Location"] = self._cdn_url(file.sha256)
                return Response(status_code=302, headers=headers)
        return FileResponse(file.disk, headers=headers)

    def _model_info(self, repo: HubRepo, request: Request) -> dict[str, Any]:
        blobs = request.query_params.get("blobs", "").lower() == "true"
        siblings: list[dict[str, Any]] = []
        for name, f in repo.files.items():
            sibling: dict[str, Any] = {"rfilename": name}
            if blobs:
                sibling |= {"size": f.size, "blobId": f.blob_id}
                if f.sha256:
                    sibling["lfs"] = {"sha256": f.sha256, "size": f.size,
                                      "pointerSize": f.pointer_size}  # fmt: skip
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": repo.commit[:24], "id": repo.repo_id, "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0], "sha": repo.commit, "lastModified": DATE,
            "createdAt": DATE, "private": False, "disabled": False,
            "gated": "manual" if repo.repo_id in self.gated else False,
            "downloads": 0, "likes": 0, "tags": [], "siblings": siblings, "spaces": [],
            "usedStorage": sum(f.size for f in repo.files.values()),
        }  # fmt: skip
        if expand := request.query_params.getlist("expand"):
            info = {k: v for k, v in info.items() if k in {"_id", "id", *expand}}
        return info


def _tree(repo: HubRepo, path: str, recursive: bool) -> list[dict[str, Any]]:
    """The ``/tree`` listing: folders first, then files, each by path."""
    prefix = f"{path}/" if path else ""
    names = [n for n in repo.files if n.startswith(prefix)]
    if path and not names:
        raise HubError(404, "EntryNotFound", f"{path} does not exist on the repo tree")
    folders: set[str] = set()
    files: list[str] = []
    for name in names:
        parts = name[len(prefix) :].split("/")
        if recursive or len(parts) == 1:
            files.append(name)
        depth = len(parts) - 1 if recursive else min(1, len(parts) - 1)
        folders.update(prefix + "/".join(parts[: i + 1]) for i in range(depth))
    listing: list[dict[str, Any]] = []
    for folder in sorted(folders):
        inside = "".join(f"{n}\0{f.blob_id}\n" for n, f in repo.files.items()
                         if n.startswith(f"{folder}/"))  # fmt: skip
        tree_id = hashlib.sha1(inside.encode()).hexdigest()
        listing.append({"type": "directory", "oid": tree_id, "size": 0, "path": folder})
    for name in files:
        f = repo.files[name]
        entry: dict[str, Any] = {"type": "file", "oid": f.blob_id, "size": f.size, "path": name}
        if f.sha256:
            entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
        listing.append(entry)
    return listing


def fresh_client(monkeypatch: Any, home: Path) -> None:
    """huggingface_hub in this process as in a new one with an empty ``HF_HOME`` at ``home``:
    an empty model cache (files cached by an earlier test would be served even when the Hub
    refuses), no token of the developer's (env or file), online, and no agent registry yet (its
    first request fetches one). ``monkeypatch`` is pytest's, which undoes all of it."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _detect_agent

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))  # for child processes
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", False)
    # huggingface_hub 2.4's agent registry (the version hack/requirements/constraints.txt locks).
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / "agents.json"))
    monkeypatch.setattr(_detect_agent, "_registry", None)


@contextmanager
def use_endpoint(endpoint: str) -> Iterator[None]:
    """Points this process's huggingface_hub and transformers at ``endpoint`` inside the block.

    ``HF_ENDPOINT`` is read once: by huggingface_hub at import, into ``constants.ENDPOINT`` and the
    ``/resolve`` URL template (``hf_hub_download`` builds URLs from it), and by each ``HfApi()``
    when made (huggingface_hub's module-level one, transformers' shared ``hf_api()``). A process
    started with ``HF_ENDPOINT`` set (the trainer, vLLM) needs none of this.
    """
    from huggingface_hub import constants, hf_api

    saved = constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, hf_api.api.endpoint
    transformers_hub: Any = sys.modules.get("transformers.utils.hub")
    shared = getattr(transformers_hub, "_hf_api", None)
    endpoint = endpoint.rstrip("/")
    constants.ENDPOINT = hf_api.api.endpoint = endpoint
    constants.HUGGINGFACE_CO_URL_TEMPLATE = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    if transformers_hub is not None:
        transformers_hub._hf_api = None  # made again on first use, from ENDPOINT
    try:
        yield
    finally:
        constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, hf_api.api.endpoint = saved
        transformers_hub = sys.modules.get("transformers.utils.hub")
        if transformers_hub is not None:
            transformers_hub._hf_api = shared


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake Hugging Face Hub (downloads) for tests.")
    add = parser.add_argument
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=0, help="0 picks a free port")
    add("--repo", action="append", required=True, metavar="ID=FOLDER", help="a repo (repeat)")
    add("--token", action="append", default=[], metavar="[USER=]TOKEN",
        help="an account's token (repeat); accounts are user1, user2... unless named")  # fmt: skip
    add("--gated", action="append", default=[], metavar="ID[=USER,...]",
        help="a gated repo and the accounts granted access (default: all)")  # fmt: skip
    add("--no-cdn", action="store_true", help="serve LFS files in place, not from the CDN")
    args = parser.parse_args(argv)
    repos = {i: Path(p) for i, _, p in (r.partition("=") for r in args.repo)}
    tokens: dict[str, str] = {}
    for n, arg in enumerate(args.token, 1):
        user, named, token = arg.partition("=")
        tokens.update({user: token} if named else {f"user{n}": arg})
    gated = {i: u.split(",") if u else list(tokens)
             for i, _, u in (g.partition("=") for g in args.gated)}  # fmt: skip
    fake = FakeHub(repos, tokens=tokens, gated=gated, cdn=not args.no_cdn)
    with fake.serve(args.host, args.port):
        print(f"fake Hugging Face Hub listening on {fake.endpoint}", flush=True)
        with suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
