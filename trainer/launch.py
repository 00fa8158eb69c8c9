"""Data-parallel launch: with more than one GPU, the trainer runs its workers under torchrun.

The pod starts ``python -m kubetune.trainer --config PATH`` as usual. When the config asks for
``gpus > 1`` and the process is not already a torchrun worker, :func:`run_torchrun` runs
torchrun's elastic agent in this process with the arguments of :func:`torchrun_args`: one
worker per GPU, each ``python -m kubetune.trainer`` again.

SIGTERM is kubetune's to handle, not torchrun's: torchrun's own handler would SIGKILL the
workers after its shutdown timeout and raise, losing their exit codes. Instead
:class:`SigtermForwarder` passes SIGTERM on to every worker (they agree on a step, checkpoint
and exit 143) and SIGKILLs the ones still running when the pod's grace period, less a margin,
is over (:func:`shutdown_timeout`); the agent then reports how each worker really ended.
The pod's exit code follows the trainer's contract, not torchrun's blanket 1
(:func:`pod_exit_code`): 2 when a worker refused the job, so the Job's pod-failure policy
fails it at once; 143 only when every worker stopped as preempted; 1 otherwise.
Everything here is pure except :func:`leave_process_group`, :func:`child_pids`,
:class:`SigtermForwarder` and :func:`run_agent`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2
"""The job cannot run as written (bad data or config): retrying will not help."""
EXIT_PREEMPTED = 143
"""Stopped by SIGTERM after writing a checkpoint (128 + 15, as a shell reports it)."""


@dataclass(frozen=True)
class ProcessInfo:
    """This process's place in a (possibly one-process) data-parallel run."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_info(env: Mapping[str, str] | None = None) -> ProcessInfo:
    """Read torchrun's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``)."""
    env = os.environ if env is None else env
    return ProcessInfo(
        rank=int(env.get("RANK", "0")),
        local_rank=int(env.get("LOCAL_RANK", "0")),
        world_size=int(env.get("WORLD_SIZE", "1")),
    )


def needs_torchrun(gpus: int, env: Mapping[str, str] | None = None) -> bool:
    """True in the pod's first process when the job wants several GPUs."""
    env = os.environ if env is None else env
    return gpus > 1 and "LOCAL_RANK" not in env


GRACE_ENV = "KUBETUNE_TERMINATION_GRACE_SECONDS"
"""The pod's ``terminationGracePeriodSeconds``, which the pod's spec puts in its environment."""
DEFAULT_GRACE_SECONDS = 120
"""The trainer pod's grace period when :data:`GRACE_ENV` is not set."""
SHUTDOWN_MARGIN_SECONDS = 10
"""Kept from the grace period: after SIGKILLing late workers, the agent still has to report."""
AGENT_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"
"""The signals torchrun's agent handles itself: all of its default ones but SIGTERM."""


def shutdown_timeout(env: Mapping[str, str] | None = None) -> int:
    """Seconds workers get after SIGTERM to checkpoint and exit: the grace period less a margin."""
    env = os.environ if env is None else env
    try:
        grace = int(float(env.get(GRACE_ENV, DEFAULT_GRACE_SECONDS)))
    except ValueError:
        grace = DEFAULT_GRACE_SECONDS
    return max(1, grace - SHUTDOWN_MARGIN_SECONDS)


def torchrun_args(config_path: str, gpus: int, *, shutdown_timeout: int) -> list[str]:
    """torchrun's command line (after ``torchrun``) for ``gpus`` trainer workers on this node."""
    if gpus < 2:
        raise ValueError(f"torchrun is for 2 or more GPUs, not {gpus}")
    return [
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={gpus}",
        # A failed worker fails the pod; the Job's backoffLimit restarts it and the new pod
        # resumes from the last checkpoint, so torchrun itself must not restart workers.
        "--max-restarts=0",
        # SIGTERM goes to SigtermForwarder, which keeps the workers' exit codes; torchrun's
        # own shutdown (other signals) waits as long too, not its default 30 s.
        f"--signals-to-handle={AGENT_SIGNALS}",
        f"--shutdown-timeout={shutdown_timeout}",
        "--module",
        "kubetune.trainer",
        "--config",
        config_path,
    ]


def pod_exit_code(worker_exit_codes: Iterable[int]) -> int:
    """The trainer's exit code for a data-parallel run whose workers failed or were stopped."""
    codes = set(worker_exit_codes)
    if EXIT_INVALID in codes:
        return EXIT_INVALID
    if codes and codes <= {EXIT_PREEMPTED, -signal.SIGTERM}:
        return EXIT_PREEMPTED
    return EXIT_FAILED


def leave_process_group() -> None:
    """Destroy a worker's process group before it exits. Left to interpreter shutdown, gloo's
    threads sometimes abort the process (SIGABRT) after it has checkpointed, which would turn
    a clean preemption (143) into a failed pod."""
    if "torch" not in sys.modules:  # never got as far as training
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def child_pids(parent: int | None = None, proc: Path = Path("/proc")) -> list[int]:
    """The processes whose parent is ``parent`` (this one): torchrun's workers (Linux)."""
    parent = os.getpid() if parent is None else parent
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text(encoding="utf-8", errors="replace")
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(parent):
            found.append(int(entry.name))
    return sorted(found)


def _signal_group(pid: int, signum: int) -> None:
    """Signal a worker and its own children (torchrun starts each worker in a new session)."""
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


class SigtermForwarder:
    """SIGTERM handler of the agent's process: pass it on, and SIGKILL what outlives the grace.

    Before any worker exists it raises torchrun's own ``SignalException``, which stops the
    agent the way its handler would.
    """

    def __init__(self, timeout: float, children: Callable[[], list[int]] = child_pids) -> None:
        self.timeout = timeout
        self.children = children
        self.requested = False
        self._deadline: threading.Timer | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            return
        workers = self.children()
        if not workers:
            from torch.distributed.elastic.multiprocessing.api import SignalException

            raise SignalException("SIGTERM before the workers started", signal.SIGTERM)
        self.requested = True
        log.warning(
            "SIGTERM: passed on to %d workers; they have %s s to checkpoint and exit",
            len(workers),
            self.timeout,
        )
        for pid in workers:
            _signal_group(pid, signal.SIGTERM)
        self._deadline = threading.Timer(self.timeout, self._kill)
        self._deadline.daemon = True
        self._deadline.start()

    def _kill(self) -> None:
        workers = self.children()
        if workers:
            log.error("workers %s still running after %s s: killing them", workers, self.timeout)
        for pid in workers:
            _signal_group(pid, signal.SIGKILL)

    def cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()


def run_agent(argv: list[str], timeout: float) -> int:
    """Runs torchrun's agent in this process with ``argv``; returns the pod's exit code."""
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    torchrun: Any = torch.distributed.run  # parse_args and run are not annotated
    forwarder = SigtermForwarder(timeout)
    previous = signal.signal(signal.SIGTERM, forwarder)
    try:
        torchrun.run(torchrun.parse_args(argv))
    except SignalException as exc:
        # SIGTERM before any worker ran: nothing was lost, start again. Other signals are
        # not a preemption, and the workers' exit codes are torchrun's to discard.
        return EXIT_PREEMPTED if exc.sigval == signal.SIGTERM else EXIT_FAILED
    except ChildFailedError as exc:
        codes = {rank: failure.exitcode for rank, failure in exc.failures.items()}
        exit_code = pod_exit_code(codes.values())
        if forwarder.requested:
            log.warning("workers stopped with exit codes %s: exit %d", codes, exit_code)
        return exit_code
    finally:
        forwarder.cancel()
        signal.signal(signal.SIGTERM, previous)
    return EXIT_OK


def run_torchrun(config_path: str, gpus: int) -> int:  # pragma: no cover - tests/e2e runs it
    """Runs ``gpus`` trainer workers under torchrun's agent; returns the pod's exit code."""
    timeout = shutdown_timeout()
    return run_agent(torchrun_args(config_path, gpus, shutdown_timeout=timeout), timeout)
