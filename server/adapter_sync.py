"""``python -m kubetune.server.adapter_sync --config PATH``: keep a running vLLM's adapters
equal to the serve config, and report how far that got.

Why a sidecar: a ModelServer's adapter set changes far more often than its base model, and a
vLLM restart costs minutes (model load, compilation, warm-up) during which the replica serves
nothing. vLLM started with runtime LoRA updating (``runtimeLoraUpdating``) can load and unload
adapters while it serves, so this process runs beside it in the same pod (same image, same
volumes, so it sees the adapter folders at the paths vLLM sees) and applies the difference.

ConfigMap propagation: the operator writes the desired adapters into the serve config in a
ConfigMap mounted as a directory; when the ConfigMap changes the kubelet swaps the file in
place (a symlink flip, so a reader sees the old or the new file, never half of one) when it
next syncs the pod: on its resync, about a minute, or at once when the operator annotates a pod
that reports an older set (:mod:`kubetune.operator.kubelet_nudge`). Every round
(:data:`SYNC_INTERVAL`) re-reads the file, so nothing here watches inotify events that a
symlink swap may or may not produce. A file that cannot be read or
parsed keeps the last good config in force: a serving replica must not drop its adapters
because of a bad edit.

The report contract: each round ends in a :class:`Report`, served as JSON on
``GET http://<podIP>:SYNC_PORT/``. The operator compares its ``digest`` with the digest of the
config it applied (:meth:`ServeConfig.adapter_digest`) and counts a replica as serving the new
set when the digests match and ``synced`` is true. Every desired adapter is in exactly one of
three places: ``served`` from its path, ``pending`` (retried every round) or ``refused``
(retried only when its folder changes); ``synced`` does not wait for refused adapters, which
wait for a fix, not for time. The operator parses pod output with :meth:`Report.from_dict`,
which trusts nothing.

Why refusals are remembered: an adapter vLLM refuses (rank above ``--max-lora-rank``, a LoRA
variant it cannot serve, a missing folder) would be refused again every round, each attempt
costing vLLM a disk read and a log stack trace. A refusal is remembered with the state of the
adapter's files (:func:`folder_fingerprint`), and the load is tried again only when the path
or those files change: a fixed or re-uploaded adapter loads without anyone touching the pod.
A refused replacement of an adapter already served under that name leaves the previous
version serving (vLLM loads the new weights before it evicts the old ones).

This module must not import vLLM or torch: it starts in a fraction of a second and talks to
vLLM through its HTTP API only (:mod:`kubetune.server.adapters`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol, TypeAlias

import yaml
from pydantic import ValidationError

from kubetune.api.serveconfig import ServeConfig
from kubetune.server import adapter_checks, adapters, launcher
from kubetune.sync_report import SYNC_PORT, Report

log = logging.getLogger("kubetune.server.adapter_sync")

SYNC_INTERVAL = 5.0
"""Seconds between rounds: an idle round costs one ``GET /v1/models``, and the operator, which
learns of a change from the reports, looks every 10 s."""

FIRST_ROUND = "first round not done"
"""The error a report carries before the first round has ended."""

FINGERPRINTED_FILES = (adapter_checks.ADAPTER_CONFIG, adapter_checks.ADAPTER_WEIGHTS)


# ------------------------------------------------------------------------------ one round


ServedModel: TypeAlias = adapters.ServedModel


class AdapterApi(Protocol):
    """What a round needs of :class:`kubetune.server.adapters.AdapterClient`, whose
    semantics it keeps: loading what is served from the same path and unloading what is not
    served succeed without a change; ``replace`` swaps an adapter served from another path."""

    def adapters(self) -> Mapping[str, ServedModel]: ...

    def load(self, name: str, path: str, *, replace: bool = False) -> ServedModel: ...

    def unload(self, name: str) -> None: ...


Fingerprint = tuple[tuple[int, int] | None, ...]


def folder_fingerprint(path: str) -> Fingerprint:
    """(mtime_ns, size) of each file vLLM reads from an adapter folder, None where absent.

    Rewriting, completing or creating either file changes it; so does the folder appearing.
    """
    out: list[tuple[int, int] | None] = []
    for name in FINGERPRINTED_FILES:
        try:
            st = (Path(path) / name).stat()
        except OSError:
            out.append(None)
        else:
            out.append((st.st_mtime_ns, st.st_size))
    return tuple(out)


class Refusals:
    """Adapters refused, with the path and the files they were refused with."""

    def __init__(self) -> None:
        self._by_name: dict[str, tuple[str, Fingerprint, str]] = {}

    def reason(self, name: str, path: str, fingerprint: Fingerprint) -> str | None:
        """Why ``name`` was refused, if it was refused with this very path and files."""
        known = self._by_name.get(name)
        if known is None:
            return None
        if known[:2] != (path, fingerprint):
            del self._by_name[name]
            return None
        return known[2]

    def remember(self, name: str, path: str, fingerprint: Fingerprint, reason: str) -> None:
        self._by_name[name] = (path, fingerprint, reason)

    def keep_only(self, names: set[str]) -> None:
        """Forgets adapters the config no longer lists."""
        for name in set(self._by_name) - names:
            del self._by_name[name]


class _RoundStopped(Exception):
    """The server, not an adapter, said no: the rest of the round would fail the same way."""


def sync_once(client: AdapterApi, config: ServeConfig, refusals: Refusals) -> Report:
    """Unloads the adapters ``config`` does not list and loads the ones it lists that are not
    served from their path; returns what the server serves afterwards."""
    desired = {a.name: a.path for a in config.adapters}
    digest = config.adapter_digest()
    refusals.keep_only(set(desired))
    try:
        served = dict(client.adapters())
    except adapters.ServerUnavailable as e:
        return _report(digest, desired, {}, {}, {}, f"vLLM is not answering yet: {e}")
    except adapters.AdapterError as e:
        return _report(digest, desired, {}, {}, {}, str(e))

    pending: dict[str, str] = {}
    refused: dict[str, str] = {}
    error: str | None = None
    changed = False
    try:
        for name in sorted(set(served) - set(desired)):
            changed = True
            try:
                client.unload(name)
            except (adapters.RuntimeUpdatesDisabled, adapters.Unauthorized) as e:
                raise _RoundStopped(str(e)) from e
            except adapters.AdapterError as e:
                pending[name] = f"not unloaded yet: {e}"
        for name, path in sorted(desired.items()):
            current = served.get(name)
            if current is not None and current.root == path:
                continue
            fingerprint = folder_fingerprint(path)  # before the load: a later change retries
            known = refusals.reason(name, path, fingerprint)
            if known is not None:
                refused[name] = known
                continue
            changed = True
            try:
                client.load(name, path, replace=True)
            except (adapters.RuntimeUpdatesDisabled, adapters.Unauthorized) as e:
                raise _RoundStopped(str(e)) from e
            except adapters.AdapterRequestRefused as e:
                log.warning("adapter %s refused: %s", name, e)
                refusals.remember(name, path, fingerprint, str(e))
                refused[name] = str(e)
            except adapters.AdapterError as e:  # not ready, unavailable, not confirmed
                pending[name] = str(e)
    except _RoundStopped as e:
        error = str(e)
    if changed:
        try:
            served = dict(client.adapters())
        except adapters.ServerUnavailable as e:
            return _report(digest, desired, {}, pending, refused, f"vLLM stopped answering: {e}")
        except adapters.AdapterError as e:
            return _report(digest, desired, {}, pending, refused, str(e))
    return _report(digest, desired, served, pending, refused, error)


def _report(
    digest: str,
    desired: dict[str, str],
    served: Mapping[str, ServedModel],
    pending: dict[str, str],
    refused: dict[str, str],
    error: str | None,
) -> Report:
    """The round's report; a desired adapter neither served nor refused is pending."""
    pending = dict(pending)
    for name, path in desired.items():
        current = served.get(name)
        if name in refused or name in pending or (current is not None and current.root == path):
            continue
        if error is not None:
            pending[name] = f"not loaded: {error}"
        elif current is not None:
            pending[name] = f"served from {current.root}, not {path}"
        else:
            pending[name] = "not served"
    for name in set(served) - set(desired):
        pending.setdefault(name, "served but not in the config")
    return Report(
        digest=digest,
        synced=error is None and not pending,
        served=sorted(served),
        pending=dict(sorted(pending.items())),
        refused=dict(sorted(refused.items())),
        error=error,
    )


# ------------------------------------------------------------------------------ the rounds


def read_config(path: str) -> ServeConfig:
    """The serve config; raises ValueError with one line that shows no value from the file
    (an ``extraArgs`` entry may hold a secret, and the line is served to anyone)."""
    try:
        return ServeConfig.load(path)
    except yaml.YAMLError as e:
        raise ValueError(f"cannot read serve config {path}: {launcher.yaml_problem(e)}") from e
    except ValidationError as e:
        raise ValueError(f"invalid serve config {path}: {launcher.validation_problem(e)}") from e
    except json.JSONDecodeError as e:  # a .json file: the message gives line and column only
        raise ValueError(f"cannot read serve config {path}: invalid JSON: {e}") from e
    except OSError as e:
        raise ValueError(
            f"cannot read serve config {path}: {e.strerror or type(e).__name__}"
        ) from e
    except ValueError as e:  # undecodable bytes: the message would quote them
        raise ValueError(f"cannot read serve config {path}: {type(e).__name__}") from e


ClientFactory = Callable[[ServeConfig, str | None], AdapterApi]


def _adapter_client(config: ServeConfig, api_key: str | None) -> adapters.AdapterClient:
    return adapters.AdapterClient(f"http://127.0.0.1:{config.port}", api_key=api_key, config=config)


class Rounds:
    """The state kept from one round to the next: the last good config, its client, refusals."""

    def __init__(
        self,
        config_path: str,
        environ: Mapping[str, str],
        client_factory: ClientFactory = _adapter_client,
    ) -> None:
        self._path = config_path
        self._environ = environ
        self._factory = client_factory
        self._config: ServeConfig | None = None
        self._client: AdapterApi | None = None
        self._refusals = Refusals()

    def run(self) -> Report:
        """Reads the config and syncs to it (or to the last good one)."""
        try:
            config, problem = read_config(self._path), None
        except ValueError as e:
            if self._config is None:
                return Report(digest=None, synced=False, served=[], error=str(e))
            config, problem = self._config, str(e)
        client = self._use(config)
        key_env = config.api_key_env
        if key_env and not self._environ.get(key_env):
            missing = f"`apiKeyEnv` names {key_env}, which is not set in this container"
            desired = {a.name: a.path for a in config.adapters}
            report = _report(config.adapter_digest(), desired, {}, {}, {}, missing)
        else:
            report = sync_once(client, config, self._refusals)
        if problem is None:
            return report
        error = problem if report.error is None else f"{problem}; {report.error}"
        return dataclasses.replace(report, synced=False, error=error)

    def _use(self, config: ServeConfig) -> AdapterApi:
        """The client for ``config``: a new one (and no memory of refusals) when anything but
        the adapters changed, as another port, key, rank limit or base model changes what
        vLLM and our checks say."""
        old, self._config = self._config, config
        if self._client is None or old is None or _settings(old) != _settings(config):
            self.close()
            key = self._environ.get(config.api_key_env) if config.api_key_env else None
            self._client = self._factory(config, key or None)
            self._refusals = Refusals()
        return self._client

    def close(self) -> None:
        if isinstance(self._client, adapters.AdapterClient):
            self._client.close()


def _settings(config: ServeConfig) -> ServeConfig:
    return config.model_copy(update={"adapters": []})


def run_rounds(rounds: Rounds, interval: float, latest: Latest, stop: threading.Event) -> None:
    """Runs a round every ``interval`` seconds until ``stop``; logs each change of state once."""
    previous = latest.get()
    while not stop.is_set():
        try:
            report = rounds.run()
        except Exception as e:  # a bug must not end the sync or spam: logged once per message
            report = Report(latest.get().digest, False, [], error=f"internal error: {e!r}")
            if report.error != previous.error:
                log.exception("round failed")
        _log_change(previous, report)  # before publishing: a report's log line is already there
        latest.set(report)
        previous = report
        stop.wait(interval)
    rounds.close()


def _log_change(previous: Report, report: Report) -> None:
    """One line per change: a round that ends as the one before logs nothing."""
    if report.error:
        if report.error != previous.error:
            log.warning("not synced: %s", report.error)
        return  # the pending reasons repeat the error
    if report.synced:
        if not previous.synced or report.digest != previous.digest:
            served = ", ".join(report.served) or "no adapter"
            refused = f" (refused: {', '.join(report.refused)})" if report.refused else ""
            log.info("synced to adapter set %s: serving %s%s", report.digest, served, refused)
        return
    for name, why in report.pending.items():
        if previous.pending.get(name) != why or previous.error:
            log.info("adapter %s pending: %s", name, why)


# ------------------------------------------------------------------------------ the report server


class Latest:
    """The latest report, shared between the round thread and the HTTP server's threads."""

    def __init__(self, report: Report) -> None:
        self._lock = threading.Lock()
        self._report = report

    def get(self) -> Report:
        with self._lock:
            return self._report

    def set(self, report: Report) -> None:
        with self._lock:
            self._report = report


def report_server(port: int, latest: Latest) -> ThreadingHTTPServer:
    """An HTTP server (not started) answering ``GET /`` and ``GET /status`` with the report."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] in ("/", "/status"):
                self._send(200, latest.get().to_dict())
            else:
                self._send(404, {"error": "not found; GET / for the sync report"})

        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # polled every few seconds: an access log would drown the sync's own lines

    try:  # the operator may reach the pod over IPv4 or IPv6: listen on both where there are both
        server: ThreadingHTTPServer = _DualStackServer(("::", port), Handler)
    except OSError:  # no IPv6 in this pod's network (or the port is taken: raised again below)
        server = ThreadingHTTPServer(("", port), Handler)
    server.daemon_threads = True
    return server


class _DualStackServer(ThreadingHTTPServer):
    """IPv6 and IPv4-mapped addresses on one socket, as ``python -m http.server`` does."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        with contextlib.suppress(OSError):
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


# ------------------------------------------------------------------------------ entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m kubetune.server.adapter_sync",
        description="Keep a running vLLM's LoRA adapters equal to the serve config's.",
    )
    p.add_argument("--config", required=True, help="serve config (YAML or JSON)")
    p.add_argument("--port", type=int, default=SYNC_PORT, help="port of the report (HTTP GET /)")
    p.add_argument("--interval", type=float, default=SYNC_INTERVAL, help="seconds between rounds")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None, *, stop: threading.Event | None = None) -> int:
    """Serves the report and syncs until SIGTERM/SIGINT (or ``stop``, for tests); exits 0."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # else a line per request, every round
    stop = stop or threading.Event()
    latest = Latest(Report(digest=None, synced=False, served=[], error=FIRST_ROUND))
    try:
        server = report_server(args.port, latest)
    except OSError as e:
        log.error("cannot serve the report on port %d: %s", args.port, e)
        return 1

    signalled: list[int] = []
    if threading.current_thread() is threading.main_thread():  # tests run main() in a thread
        # The handler only appends: taking the Event's lock in a handler that interrupted the
        # main thread inside that same lock would deadlock.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda sig, _frame: signalled.append(sig))

    rounds = Rounds(args.config, os.environ)
    threads = [
        threading.Thread(target=server.serve_forever, args=(0.2,), name="report", daemon=True),
        threading.Thread(
            target=run_rounds, args=(rounds, args.interval, latest, stop), name="sync", daemon=True
        ),
    ]
    for t in threads:
        t.start()
    log.info("syncing adapters to %s; report on port %d", args.config, args.port)
    while not stop.is_set() and not signalled:
        time.sleep(0.1)
    stop.set()
    server.shutdown()
    server.server_close()
    # A round blocked on a slow load is not waited for: the daemon thread ends with the process.
    threads[1].join(timeout=1.0)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
