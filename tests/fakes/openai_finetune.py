"""A fake of OpenAI's fine-tuning REST API for tests, driven through the real ``openai`` client.

Shapes follow openai-python 2.54's types (``openai/types/file_object.py``,
``openai/types/fine_tuning/fine_tuning_job.py``, ``fine_tuning_job_event.py``) and OpenAI's
documented behaviour: lists are ``{"object": "list", "data", "has_more"}`` pages, newest first,
cursor ``after``; jobs filter by ``metadata[k]=v``; events come newest first; errors are
``{"error": {"message", "type", "param", "code"}}`` with OpenAI's status codes.

Routes (under ``/v1``, bearer auth): ``POST/GET /files``, ``GET/DELETE /files/{id}``,
``GET /files/{id}/content``; ``POST/GET /fine_tuning/jobs``, ``GET /fine_tuning/jobs/{id}``,
``GET .../events``, ``POST .../cancel|pause|resume``.

How jobs move over time and fail: ``openai_state``. The clock is frozen for unit tests
(``advance``) and real time in a subprocess.

Test controls, in Python (``FakeOpenAI``) and over HTTP (``/_admin``, no auth): inject
failures (status, OpenAI's error ``code`` such as ``insufficient_quota``,
``Retry-After``/``retry-after-ms``, on a method/path, optionally *after* handling the request,
as when an answer is lost), make the next upload fail processing, or the next job fail with an
error object,
force a job's status (``paused``), advance time, inspect jobs/files/cancels, hold a request
until released (:meth:`FineTuneState.hold`, in Python only), and read the request log (every
request but its ``Authorization`` header, with the ``OpenAI-Organization`` and
``OpenAI-Project`` headers also as ``organization`` and ``project``; see
:meth:`FakeOpenAI.leaks`). A job's ``organization_id`` is the organization header it was created
with, if any.

Run: ``with FakeOpenAI().serve() as fake: fake.base_url`` (in-thread), ``with
run_subprocess(api_keys=...) as admin: admin.base_url`` (a process, driven through
:class:`AdminClient`), or ``python tests/fakes/openai_finetune.py --port N --api-key sk-...``
(prints the base URL).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

if not __package__:  # run as a script: make the `fakes` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fakes.openai_state import (
    ApiError,
    Failure,
    FineTuneState,
    JobPlan,
    Timing,
    mask_key,
)
from fakes.threaded import serve_app

__all__ = [
    "AdminClient",
    "ApiError",
    "Failure",
    "FakeOpenAI",
    "JobPlan",
    "Timing",
    "run_subprocess",
]


class FakeOpenAI(FineTuneState):
    """The fake served over HTTP: :meth:`app` (ASGI) or :meth:`serve` (a thread)."""

    def app(self) -> Starlette:
        return build_app(self)

    @contextmanager
    def serve(self, host: str = "127.0.0.1", port: int = 0) -> Iterator[FakeOpenAI]:
        """Serves the fake from a thread; ``self.base_url`` ends in ``/v1``."""
        with serve_app(self.app(), host, port, "the fake OpenAI server") as root:
            self.base_url = root + "/v1"
            yield self


def _page(items: list[dict[str, Any]], after: str | None, limit: int,
          *, ids: bool = False) -> dict[str, Any]:  # fmt: skip
    start = 0
    if after:
        idx = next((i for i, it in enumerate(items) if it["id"] == after), None)
        start = len(items) if idx is None else idx + 1
    data = items[start : start + limit]
    page: dict[str, Any] = {"object": "list", "data": data,
                            "has_more": start + limit < len(items)}  # fmt: skip
    if ids:
        page["first_id"] = data[0]["id"] if data else None
        page["last_id"] = data[-1]["id"] if data else None
    return page


def _limit(request: Request, default: int, maximum: int) -> int:
    raw = request.query_params.get("limit")
    try:
        value = default if raw is None else int(raw)
    except ValueError:
        raise ApiError(400, f"Invalid 'limit': {raw}", param="limit") from None
    if not 1 <= value <= maximum:
        raise ApiError(400, f"'limit' must be between 1 and {maximum}", param="limit")
    return value


def build_app(fake: FakeOpenAI) -> Starlette:
    def log(request: Request, body: bytes) -> dict[str, Any]:
        headers = {k: v for k, v in request.headers.items() if k.lower() != "authorization"}
        entry = {
            "time": fake.clock.now(), "method": request.method, "path": request.url.path,
            "query": str(request.url.query), "headers": headers,
            "body": body[:65536].decode("utf-8", errors="replace"), "status": None,
            "organization": request.headers.get("openai-organization"),
            "project": request.headers.get("openai-project"),
        }  # fmt: skip
        with fake.lock:
            fake.requests.append(entry)
        return entry

    def authenticate(request: Request) -> None:
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer ") or not auth[7:].strip():
            raise ApiError(401, "You didn't provide an API key. You need to provide your API key "
                           "in an Authorization header using Bearer auth (i.e. Authorization: "
                           "Bearer YOUR_KEY).")  # fmt: skip
        key = auth[7:].strip()
        if fake.api_keys and key not in fake.api_keys:
            raise ApiError(401, f"Incorrect API key provided: {mask_key(key)}. You can find your "
                           "API key at https://platform.openai.com/account/api-keys.",
                           code="invalid_api_key")  # fmt: skip

    def injected(request: Request) -> Failure | None:
        with fake.lock:
            for f in fake.failures:
                if (f.method is None or f.method.upper() == request.method) and (
                    f.path is None or request.url.path.startswith(f.path)
                ):
                    f.count -= 1
                    if f.count <= 0:
                        fake.failures.remove(f)
                    return f
        return None

    async def held(request: Request) -> None:
        with fake.lock:
            h = next((h for h in fake.holds if (h.method is None or h.method.upper() ==
                      request.method) and (h.path is None or request.url.path.startswith(
                      h.path))), None)  # fmt: skip
            if h is not None:
                fake.holds.remove(h)
        if h is None:
            return
        h.arrived.set()
        deadline = time.monotonic() + h.timeout
        while not h.released.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def api(handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            rid = "req_" + secrets.token_hex(12)
            body = await request.body()
            entry = log(request, body)
            try:
                authenticate(request)
                await held(request)
                f = injected(request)
                if f is not None and not f.after_handling:
                    await asyncio.sleep(f.delay)
                    raise f.error()
                result = await handler(request, body)
                if f is not None:  # done, but the answer is lost (late, then an error)
                    await asyncio.sleep(f.delay)
                    raise f.error()
                response = (
                    result
                    if isinstance(result, Response)
                    else JSONResponse(result, headers={"x-request-id": rid})
                )
            except ApiError as exc:
                response = JSONResponse(exc.body, exc.status, {**exc.headers, "x-request-id": rid})
            entry["status"] = response.status_code
            return response

        return endpoint

    async def files_create(request: Request, _: bytes) -> Any:
        form = await request.form()
        upload, purpose = form.get("file"), form.get("purpose")
        if upload is None or isinstance(upload, str) or not purpose:
            raise ApiError(400, "Missing required parameter: 'file' and 'purpose'.")
        data = await upload.read()
        with fake.lock:
            return fake.upload(upload.filename or "upload", data, str(purpose))

    async def files_list(request: Request, _: bytes) -> Any:
        q = request.query_params
        with fake.lock:
            items = [dict(f) for f in fake.list_files(q.get("purpose"))]
            items.sort(key=lambda f: (f["created_at"], f["id"]), reverse=q.get("order") != "asc")
            return _page(items, q.get("after"), _limit(request, 10000, 10000), ids=True)

    async def files_get(request: Request, _: bytes) -> Any:
        with fake.lock:
            return dict(fake.file(request.path_params["fid"]))

    async def files_content(request: Request, _: bytes) -> Any:
        with fake.lock:
            fake.file(request.path_params["fid"])
            return Response(fake.contents[request.path_params["fid"]])

    async def files_delete(request: Request, _: bytes) -> Any:
        with fake.lock:
            return fake.delete_file(request.path_params["fid"])

    async def jobs_create(request: Request, body: bytes) -> Any:
        try:
            payload = json.loads(body or b"{}")
        except json.JSONDecodeError:
            raise ApiError(400, "We could not parse the JSON body of your request.") from None
        with fake.lock:
            return fake.create_job(payload, request.headers.get("openai-organization"))

    async def jobs_list(request: Request, _: bytes) -> Any:
        q = request.query_params
        wanted = {k[len("metadata[") : -1]: v for k, v in q.items()
                  if k.startswith("metadata[") and k.endswith("]")}  # fmt: skip
        no_metadata = q.get("metadata") == "null"
        with fake.lock:
            items = []
            for job in sorted(fake.jobs.values(), key=lambda j: j["id"], reverse=True):
                fake._advance(job)
                meta = job["metadata"] or {}
                if no_metadata and meta:
                    continue
                if all(meta.get(k) == v for k, v in wanted.items()):
                    items.append(fake._public(job))
            return _page(items, q.get("after"), _limit(request, 20, 100))

    async def jobs_get(request: Request, _: bytes) -> Any:
        with fake.lock:
            return fake._public(fake.job(request.path_params["jid"]))

    async def jobs_events(request: Request, _: bytes) -> Any:
        with fake.lock:
            events = fake.events(request.path_params["jid"])
            return _page(events, request.query_params.get("after"), _limit(request, 20, 100))

    async def jobs_cancel(request: Request, _: bytes) -> Any:
        with fake.lock:
            return fake._public(fake.cancel(request.path_params["jid"]))

    async def jobs_pause(request: Request, _: bytes) -> Any:
        with fake.lock:
            return fake._public(fake.pause(request.path_params["jid"], resume=False))

    async def jobs_resume(request: Request, _: bytes) -> Any:
        with fake.lock:
            return fake._public(fake.pause(request.path_params["jid"], resume=True))

    # ------------------------------------------------------------------ admin (no auth)

    async def admin(request: Request) -> Response:
        action = request.path_params["action"]
        body = json.loads(await request.body() or b"{}") if request.method == "POST" else {}
        if action == "state":
            return JSONResponse(fake.snapshot())
        if action == "requests":
            with fake.lock:
                return JSONResponse(list(fake.requests))
        if action == "leaks":
            return JSONResponse(fake.leaks(request.query_params["needle"]))
        if action == "fail":
            fake.fail(**body)
        elif action == "fail_next_job":
            fake.fail_next_job(**body)
        elif action == "fail_next_file":
            fake.fail_next_file(**body)
        elif action == "advance":
            fake.advance(float(body.get("seconds", 0)))
        elif action == "finish_all":
            fake.finish_all()
        elif action == "force_status":
            fake.force_status(body["job_id"], body["status"])
        elif action == "timing":
            with fake.lock:
                fake.timing = Timing(**{**asdict(fake.timing), **body})
        else:
            return JSONResponse({"error": f"unknown admin action {action}"}, 404)
        return JSONResponse({"ok": True})

    v1 = "/v1"
    return Starlette(routes=[
        Route(f"{v1}/files", api(files_create), methods=["POST"]),
        Route(f"{v1}/files", api(files_list), methods=["GET"]),
        Route(f"{v1}/files/{{fid}}", api(files_get), methods=["GET"]),
        Route(f"{v1}/files/{{fid}}", api(files_delete), methods=["DELETE"]),
        Route(f"{v1}/files/{{fid}}/content", api(files_content), methods=["GET"]),
        Route(f"{v1}/fine_tuning/jobs", api(jobs_create), methods=["POST"]),
        Route(f"{v1}/fine_tuning/jobs", api(jobs_list), methods=["GET"]),
        Route(f"{v1}/fine_tuning/jobs/{{jid}}", api(jobs_get), methods=["GET"]),
        Route(f"{v1}/fine_tuning/jobs/{{jid}}/events", api(jobs_events), methods=["GET"]),
        Route(f"{v1}/fine_tuning/jobs/{{jid}}/cancel", api(jobs_cancel), methods=["POST"]),
        Route(f"{v1}/fine_tuning/jobs/{{jid}}/pause", api(jobs_pause), methods=["POST"]),
        Route(f"{v1}/fine_tuning/jobs/{{jid}}/resume", api(jobs_resume), methods=["POST"]),
        Route("/_admin/{action}", admin, methods=["GET", "POST"]),
    ])  # fmt: skip


class AdminClient:
    """The fake's ``/_admin`` endpoints, for a fake running in another process."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        """The API base URL (ends in ``/v1``): what ``spec.openai.baseURL`` points at."""
        self._admin = base_url.removesuffix("/v1") + "/_admin"

    def _call(self, action: str, body: dict[str, Any] | None = None, **params: str) -> Any:
        url = f"{self._admin}/{action}"
        if body is None:
            resp = httpx.get(url, params=params, timeout=10)
        else:
            resp = httpx.post(url, json=body, timeout=10)
        resp.raise_for_status()
        return resp.json()

    def fail(self, status: int, **kw: Any) -> None:
        """Like :meth:`FineTuneState.fail` (``count``, ``method``, ``path``, ``retry_after``...)."""
        self._call("fail", {"status": status, **kw})

    def fail_next_job(self, code: str, message: str, param: str | None = None,
                      at_step: int = 0) -> None:  # fmt: skip
        self._call("fail_next_job", {"code": code, "message": message, "param": param,
                                     "at_step": at_step})  # fmt: skip

    def fail_next_file(self, details: str) -> None:
        """The next ``fine-tune`` upload ends ``error`` with these ``status_details``."""
        self._call("fail_next_file", {"details": details})

    def timing(self, **seconds: float) -> None:
        """Changes ``validating_s`` / ``queued_s`` / ``running_s`` / ``processing_s`` for jobs
        and uploads from now."""
        self._call("timing", dict(seconds))

    def advance(self, seconds: float) -> None:
        self._call("advance", {"seconds": seconds})

    def force_status(self, job_id: str, status: str) -> None:
        self._call("force_status", {"job_id": job_id, "status": status})

    def state(self) -> dict[str, Any]:
        return dict(self._call("state"))

    def jobs_for(self, uid: str) -> list[dict[str, Any]]:
        """Jobs whose metadata carries ``kubetune.io/uid: uid``."""
        return [
            j
            for j in self.state()["jobs"]
            if (j.get("metadata") or {}).get("kubetune.io/uid") == uid
        ]

    def files_for(self, uid: str) -> list[dict[str, Any]]:
        """Files uploaded under kubetune's name for that FineTuneJob UID."""
        return [f for f in self.state()["files"] if f["filename"].startswith(f"kubetune-{uid}-")]

    def requests(self) -> list[dict[str, Any]]:
        return list(self._call("requests"))

    def leaks(self, needle: str) -> list[dict[str, Any]]:
        """Logged requests carrying ``needle`` anywhere but their Authorization header."""
        return list(self._call("leaks", needle=needle))


@contextmanager
def run_subprocess(
    *,
    api_keys: tuple[str, ...] = (),
    timing: Timing | None = None,
    min_examples: int = 10,
    log_path: Path | None = None,
) -> Iterator[AdminClient]:
    """Runs ``python tests/fakes/openai_finetune.py`` on a free port until the block ends."""
    t = timing or Timing()
    args = [sys.executable, str(Path(__file__).resolve()), "--port", "0",
            "--validating-s", str(t.validating_s), "--queued-s", str(t.queued_s),
            "--running-s", str(t.running_s), "--processing-s", str(t.processing_s),
            "--min-examples", str(min_examples)]  # fmt: skip
    for key in api_keys:
        args += ["--api-key", key]
    err = log_path.open("ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True, cwd="/")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.endswith("/v1"):
            raise RuntimeError(f"the fake OpenAI did not start: {line!r}")
        yield AdminClient(line.rsplit(" ", 1)[-1])
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if log_path and not isinstance(err, int):
            err.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake OpenAI fine-tuning API for tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--api-key", action="append", default=[], help="accepted key (repeat)")
    parser.add_argument("--validating-s", type=float, default=Timing.validating_s)
    parser.add_argument("--queued-s", type=float, default=Timing.queued_s)
    parser.add_argument("--running-s", type=float, default=Timing.running_s)
    parser.add_argument("--processing-s", type=float, default=Timing.processing_s)
    parser.add_argument("--min-examples", type=int, default=10)
    args = parser.parse_args(argv)
    fake = FakeOpenAI(
        api_keys=tuple(args.api_key), realtime=True, min_examples=args.min_examples,
        timing=Timing(args.validating_s, args.queued_s, args.running_s, args.processing_s),
    )  # fmt: skip
    with fake.serve(args.host, args.port):
        print(f"fake OpenAI listening on {fake.base_url}", flush=True)
        with suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
