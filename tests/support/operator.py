"""Runs the real operator (``python -m kubetune.operator``) as a subprocess for cluster tests.

The process gets its own KUBECONFIG and settings through the environment, logs to a file the
test can read (to assert, for example, that no secret was ever logged), and is stopped with
SIGTERM (or killed, to simulate a crash).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from support.net import free_port

FAST_SETTINGS = {
    "KUBETUNE_RECONCILE_INTERVAL": "1",
    "KUBETUNE_OPENAI_POLL_INTERVAL": "1",
    "KUBETUNE_TRAINER_IMAGE": "kubetune/trainer:test",
    "KUBETUNE_SERVER_IMAGE": "kubetune/server:test",
    "KUBETUNE_SERVER_CPU_IMAGE": "kubetune/server-cpu:test",
}


class OperatorProcess:
    def __init__(
        self,
        kubeconfig: Path,
        log_path: Path,
        *,
        namespaces: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        metrics: bool = True,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.namespaces = namespaces
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.metrics_port = free_port() if metrics else None

    def start(self) -> OperatorProcess:
        args = [sys.executable, "-m", "kubetune.operator", "--liveness", ""]
        args += ["--metrics", f"127.0.0.1:{self.metrics_port}" if self.metrics_port else ""]
        for ns in self.namespaces:
            args += ["--namespace", ns]
        if not self.namespaces:
            args.append("--all-namespaces")
        env = {
            **os.environ,
            **FAST_SETTINGS,
            **self.env,
            "KUBECONFIG": str(self.kubeconfig),
            "PYTHONSAFEPATH": "1",
            "PYTHONUNBUFFERED": "1",
        }
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd="/", start_new_session=True
        )
        log.close()
        return self

    def stop(self, *, kill: bool = False, timeout: float = 15) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout)

    def restart(self, *, kill: bool = True) -> None:
        self.stop(kill=kill)
        self.start()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample of the operator's /metrics (None when it has no such sample)."""
        assert self.metrics_port is not None, "this operator serves no metrics"
        return metric_sample(
            scrape(f"http://127.0.0.1:{self.metrics_port}/metrics"), name, **labels
        )

    def assert_alive(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, (
            "operator exited:\n" + self.logs()[-4000:]
        )


def scrape(url: str) -> str:
    """The text a Prometheus /metrics endpoint answers."""
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def metric_sample(exposition: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` with exactly ``labels`` in a Prometheus text exposition
    (None when it has no such sample)."""
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


@contextmanager
def running_operator(
    kubeconfig: Path,
    log_path: Path,
    *,
    namespaces: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    metrics: bool = True,
) -> Iterator[OperatorProcess]:
    op = OperatorProcess(kubeconfig, log_path, namespaces=namespaces, env=env, metrics=metrics)
    op.start()
    try:
        time.sleep(0.5)
        op.assert_alive()
        yield op
    finally:
        op.stop()
