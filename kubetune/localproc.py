"""The child processes of a local run: the trainer with its progress bar, and vLLM.

Children run in their own sessions, so a Ctrl-C at the terminal (or the terminal closing:
SIGHUP) reaches only ``kubetune``: it forwards SIGTERM to the trainer (which checkpoints, so
the next run resumes) and stops vLLM's whole process group (vLLM starts engine processes of
its own). Children's logs go to files in the run folder; what the user sees goes to an
injected text stream, which may be gone by then (a closed terminal): the children are
stopped all the same.
Heavy imports happen inside the functions.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

TRAINER_GRACE_SECONDS = 300.0
"""How long a stopped trainer may take to write its checkpoint before it is killed."""
SERVER_GRACE_SECONDS = 20.0
"""How long vLLM may take to shut down before its process group is killed."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Ctrl-C, ``kill``, and the terminal closing: each stops the run and its children."""


class Interrupted(Exception):
    """One of :data:`STOP_SIGNALS` reached this process."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Turns :data:`STOP_SIGNALS` into :class:`Interrupted` in the main thread."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The repo root holds `operator/`, which would shadow the standard library.
    env["PYTHONSAFEPATH"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def say(out: TextIO, text: str) -> None:
    """Write ``text`` if ``out`` still takes it: after SIGHUP the terminal is gone (EIO), a
    closed pipe raises BrokenPipeError; neither may stop the cleanup that follows."""
    try:
        out.write(text)
        out.flush()
    except (OSError, ValueError):
        # What is still buffered would fail again when the interpreter flushes it at exit
        # (exit code 120 instead of ours); from now on it goes nowhere.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, out.fileno())
            os.close(devnull)


def shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------ progress


class ProgressView:
    """One updating line on a terminal; a plain line every few seconds otherwise."""

    def __init__(self, out: TextIO, *, tty: bool, every_seconds: float = 10.0) -> None:
        self.out, self.tty, self.every = out, tty, every_seconds
        self.first: tuple[int, float] | None = None
        self.last_plain = -math.inf
        self.plain_step = -1
        self.drawn = False
        self.last_step = 0
        self.last_loss: float | None = None

    def update(self, step: int, total: int, loss: float | None, eta_s: float | None) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = (step, now)
        else:
            done, since = step - self.first[0], now - self.first[1]
            if done > 0 and since > 0:  # this session's own rate: right after a resume too
                eta_s = since / done * (total - step)
        self.last_step, self.last_loss = step, loss if loss is not None else self.last_loss
        text = f"step {step}/{total}"
        if self.last_loss is not None:
            text += f"  loss {self.last_loss:.4f}"
        if eta_s is not None and step < total:
            text += f"  ETA {duration(eta_s)}"
        if self.tty:
            width = 24
            filled = width * step // total if total else 0
            bar = "#" * filled + "." * (width - filled)
            self.out.write(f"\r  [{bar}] {text}\x1b[K")
            self.out.flush()
            self.drawn = True
        elif step != self.plain_step and (now - self.last_plain >= self.every or step >= total):
            self.out.write(f"  {text}\n")
            self.out.flush()
            self.last_plain, self.plain_step = now, step

    def close(self) -> None:
        if self.drawn:
            self.drawn = False
            say(self.out, "\n")


def duration(seconds: float) -> str:
    s = max(0, round(seconds))
    return (
        f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


# ------------------------------------------------------------------------------ training


@dataclass
class Trained:
    returncode: int
    step: int
    total: int
    loss: float | None


def train(config_path: Path, run: Path, out: TextIO, *, tty: bool) -> Trained:
    """Runs the trainer to the end, drawing its progress; forwards an interrupt to it."""
    from kubetune.progress import ProgressRecord

    view = ProgressView(out, tty=tty)
    cmd = [sys.executable, "-m", "kubetune.trainer", "--config", str(config_path)]
    with (run / "train.log").open("a", encoding="utf-8") as log:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=log, text=True, encoding="utf-8",
            env=child_env(), start_new_session=True,
        )  # fmt: skip
        assert proc.stdout is not None
        total = 0
        try:
            for line in proc.stdout:
                record = _progress(line, ProgressRecord)
                if record is None:
                    log.write(line)
                    log.flush()
                    continue
                total = record.total_steps
                eta = record.eta()
                view.update(
                    record.step,
                    record.total_steps,
                    record.train_loss,
                    None if eta is None else eta.timestamp() - time.time(),
                )
            rc = proc.wait()
        except BaseException as e:
            # Interrupted, or the terminal gone under the progress bar (OSError): either way
            # this process is leaving, and the trainer writes its progress into our pipe.
            view.close()
            if isinstance(e, Interrupted):
                say(out, f"  stopping the trainer (it writes a checkpoint; log: "
                    f"{shown(run)}/train.log)\n")  # fmt: skip
            _stop_group(proc, TRAINER_GRACE_SECONDS)
            raise
        finally:
            view.close()
    return Trained(rc, view.last_step, total, view.last_loss)


def _progress(line: str, record_type: Any) -> Any:
    if not line.startswith("{"):
        return None
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict) or "step" not in data or "total_steps" not in data:
        return None
    return record_type.from_json(line)


def _stop_group(proc: subprocess.Popen[Any], grace: float) -> None:
    """SIGTERM to the child's process group; SIGKILL to what is left after ``grace``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            leader_done = proc.poll() is not None
            if leader_done and not group_alive(proc.pid):
                return
            time.sleep(0.2)
        except Interrupted as e:
            if e.signum != signal.SIGHUP:
                break  # a second Ctrl-C: stop waiting
            # The terminal closed while we wait: nobody asked to hurry.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def group_alive(pgid: int) -> bool:
    """Whether any process of the process group ``pgid`` is still running."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------ serving


def free_port(host: str, preferred: int) -> int:
    """``preferred`` if nothing listens there, else a free port the kernel picks."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError(f"no free port on {host}")


@contextlib.contextmanager
def serving(
    config_path: Path, run: Path, env_defaults: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[Any]]:
    """Starts ``python -m kubetune.server`` and stops its process group on the way out.

    ``env_defaults`` apply where this process's environment does not set the variable.
    """
    cmd = [sys.executable, "-m", "kubetune.server", "--config", str(config_path)]
    env = {**(env_defaults or {}), **child_env()}
    with (run / "serve.log").open("a", encoding="utf-8") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )  # fmt: skip
        try:
            yield proc
        finally:
            _stop_group(proc, SERVER_GRACE_SECONDS)


def wait_ready(
    proc: subprocess.Popen[Any],
    base_url: str,
    model: str,
    log: Path,
    timeout: float,
    *,
    api_key: str | None = None,
) -> float:
    """Until ``GET /v1/models`` lists ``model``; returns the seconds waited. RuntimeError if
    vLLM exits or times out."""
    import httpx

    start = time.monotonic()
    deadline = start + timeout
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the server exited with code {proc.returncode} before it was ready:\n" + tail(log)
            )
        try:
            r = httpx.get(f"{base_url}/models", headers=headers, timeout=2.0)
            if r.status_code == 200 and model in {m.get("id") for m in r.json().get("data", [])}:
                return time.monotonic() - start
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not ready after {timeout:.0f} s:\n" + tail(log))


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(f"    {ln}" for ln in text[-lines:])
