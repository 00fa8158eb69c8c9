"""Where the trainer tells the world how it is doing: metrics file, progress ConfigMap, exit note.

- ``metrics.jsonl`` in the output folder: one :class:`~kubetune.progress.ProgressRecord` per
  logged step, appended (a resumed run continues the same file, first cut back to the step of
  the checkpoint it resumes from: :func:`keep_metrics_through`).
- The progress ConfigMap (in a cluster): the latest record under ``progress.json`` and, at the
  end, ``result.json``, written with a JSON merge patch through the API server's REST endpoint
  with the pod's service-account token. Plain httpx: the trainer image carries neither kopf nor
  the kubernetes client. Patches are rate-limited (one per :data:`MIN_PATCH_INTERVAL` seconds,
  the final ones always go out), and a failed patch is a logged warning, never a failed
  training run.
- ``/dev/termination-log``: the last error line, which Kubernetes shows in the pod status and
  the operator copies into the FineTuneJob's message.
- ``loss.png``: the loss curve, drawn from ``metrics.jsonl`` with matplotlib's Agg backend.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from kubetune.api.jobconfig import ProgressSink
from kubetune.progress import CONFIGMAP_KEY, RESULT_KEY, ProgressRecord

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
TERMINATION_LOG = Path("/dev/termination-log")
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MIN_PATCH_INTERVAL = 5.0
"""Seconds between two progress patches; the API server needs no more than that."""


def write_termination_message(message: str, path: Path = TERMINATION_LOG) -> None:
    """Leave ``message`` (its last line) where Kubernetes looks for it, if that file exists."""
    lines = [line for line in message.strip().splitlines() if line.strip()]
    if not lines or not path.exists():
        return
    try:
        # Kubernetes keeps at most 4096 bytes of it.
        path.write_text(lines[-1][:4000] + "\n", encoding="utf-8")
    except OSError as exc:  # pragma: no cover - nothing better to do while failing
        log.warning("could not write %s: %s", path, exc)


class ConfigMapWriter:
    """Patches keys of one ConfigMap from inside the cluster; never raises."""

    def __init__(
        self,
        namespace: str,
        name: str,
        *,
        env: Mapping[str, str] | None = None,
        service_account: Path = SERVICE_ACCOUNT,
        transport: Any = None,
        clock: Callable[[], float] = time.monotonic,
        min_interval: float = MIN_PATCH_INTERVAL,
    ) -> None:
        env = os.environ if env is None else env
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
        if host and ":" in host:  # an IPv6 address
            host = f"[{host}]"
        self.url = (
            f"https://{host}:{port}/api/v1/namespaces/{namespace}/configmaps/{name}"
            if host and port
            else None
        )
        self.service_account = service_account
        self.transport = transport
        self.clock = clock
        self.min_interval = min_interval
        self._last_patch: float | None = None
        self._warned: set[str] = set()

    def _warn_once(self, kind: str, message: str, *args: Any) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning(message + " (further such warnings suppressed)", *args)

    def patch(self, data: Mapping[str, str], *, force: bool = False) -> bool:
        """Merge ``data`` into the ConfigMap; False when skipped (rate limit) or failed."""
        now = self.clock()
        if (
            not force
            and self._last_patch is not None
            and now - self._last_patch < self.min_interval
        ):
            return False
        self._last_patch = now
        if self.url is None:
            self._warn_once("env", "progress ConfigMap set but not in a cluster; not patched")
            return False
        import httpx

        try:
            token = (self.service_account / "token").read_text(encoding="utf-8").strip()
            ca = self.service_account / "ca.crt"
            verify: Any = str(ca) if ca.exists() else True
            with httpx.Client(verify=verify, timeout=10.0, transport=self.transport) as client:
                response = client.patch(
                    self.url,
                    content=json.dumps({"data": dict(data)}),
                    headers={
                        "Authorization": f"Bearer {token}",
                        "Content-Type": "application/merge-patch+json",
                    },
                )
            if response.status_code >= 300:
                self._warn_once(
                    f"http{response.status_code}",
                    "progress ConfigMap patch got HTTP %d: %s",
                    response.status_code,
                    response.text[:200],
                )
                return False
        except (OSError, httpx.HTTPError) as exc:
            self._warn_once(type(exc).__name__, "progress ConfigMap patch failed: %s", exc)
            return False
        return True


class ProgressReporter:
    """Fans one record out to ``metrics.jsonl``, stdout and the progress ConfigMap."""

    def __init__(
        self,
        output_dir: Path,
        sink: ProgressSink,
        *,
        configmap: ConfigMapWriter | None = None,
    ) -> None:
        self.metrics_path = output_dir / METRICS_FILE
        self.stdout = sink.stdout
        if configmap is None and sink.config_map is not None:
            configmap = ConfigMapWriter(sink.config_map.namespace, sink.config_map.name)
        self.configmap = configmap

    def emit(self, record: ProgressRecord) -> None:
        """Append ``record`` to the metrics file, print it, patch the ConfigMap."""
        line = record.to_json()
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
        if self.stdout:
            self._print(line)
        if self.configmap is not None:
            self.configmap.patch({CONFIGMAP_KEY: line})

    def _print(self, line: str) -> None:
        """One record on stdout; a reader that went away (``kubetune run`` killed, its
        terminal closed) ends the printing, never the training or its checkpoints."""
        try:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        except (OSError, ValueError) as exc:
            self.stdout = False
            log.warning("stdout is gone (%s); progress goes on in %s only", exc, self.metrics_path)
            # What is still buffered would fail again when the interpreter flushes stdout at
            # exit (exit code 120); from now on it goes nowhere.
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)

    def flush(self, record: ProgressRecord) -> None:
        """Make sure the ConfigMap holds ``record`` (already emitted), despite rate limits."""
        if self.configmap is not None:
            self.configmap.patch({CONFIGMAP_KEY: record.to_json()}, force=True)

    def emit_result(self, result_json: str) -> None:
        if self.configmap is not None:
            self.configmap.patch({RESULT_KEY: result_json}, force=True)


def read_metrics(path: Path) -> list[ProgressRecord]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                records.append(ProgressRecord.from_json(line))
            except (ValueError, TypeError):
                log.warning("skipping unreadable line in %s", path)
    return records


def keep_metrics_through(path: Path, step: int) -> int:
    """Keep only the records of steps up to ``step``; returns how many lines were dropped.

    A run killed after its last checkpoint logged steps that the resumed run logs again; its
    last line may be cut off too. The file is replaced atomically.
    """
    if not path.exists():
        return 0
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = []
    for line in lines:
        try:
            if ProgressRecord.from_json(line).step <= step:
                kept.append(line)
        except (ValueError, TypeError):
            pass  # a line cut off by the kill
    if len(kept) < len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(path)
        log.info("%s: dropped %d lines logged after step %d", path, len(lines) - len(kept), step)
    return len(lines) - len(kept)


def plot_loss(records: Iterable[ProgressRecord], path: Path, title: str = "") -> None:
    """Draw train (and validation) loss over steps into ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = list(records)
    train = [(r.step, r.train_loss) for r in records if r.train_loss is not None]
    # Records carry the latest validation loss forward; plot each evaluation once.
    valid: list[tuple[int, float]] = []
    for r in records:
        if r.valid_loss is not None and (not valid or valid[-1][1] != r.valid_loss):
            valid.append((r.step, r.valid_loss))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        if train:
            ax.plot(*zip(*train, strict=True), label="train loss")
        if valid:
            ax.plot(*zip(*valid, strict=True), marker="o", label="validation loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if title:
            ax.set_title(title)
        ax.grid(alpha=0.3)
        if train or valid:
            ax.legend()
        fig.tight_layout()
        tmp = path.with_suffix(".tmp.png")
        fig.savefig(tmp)
        tmp.replace(path)
    finally:
        plt.close(fig)
