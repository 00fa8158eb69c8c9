"""Data-parallel launch: with more than one GPU, the trainer runs its workers under torchrun.

The pod starts ``python -m kubetune.trainer --config PATH`` as usual. When the config asks for
``gpus > 1`` and the process is not already a torchrun worker, :func:`run_torchrun` runs
torchrun's elastic agent in this process with the arguments of :func:`torchrun_args`: one
worker per GPU, each ``python -m kubetune.trainer`` again. The agent forwards SIGTERM to every
worker (they agree on a step, checkpoint and exit 143). The pod's exit code then follows the
trainer's contract, not torchrun's blanket 1 (:func:`pod_exit_code`): 2 when a worker refused
the job, so the Job's pod-failure policy fails it at once; 143 when preempted.
Everything here is pure except :func:`run_torchrun`.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

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


def torchrun_args(config_path: str, gpus: int) -> list[str]:
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
        "--module",
        "kubetune.trainer",
        "--config",
        config_path,
    ]


def pod_exit_code(worker_exit_codes: Iterable[int], *, signalled: bool = False) -> int:
    """The trainer's exit code for a data-parallel run whose workers failed or were stopped."""
    codes = set(worker_exit_codes)
    if EXIT_INVALID in codes:
        return EXIT_INVALID
    if signalled or (codes and codes <= {EXIT_PREEMPTED, -signal.SIGTERM}):
        return EXIT_PREEMPTED
    return EXIT_FAILED


def run_torchrun(config_path: str, gpus: int) -> int:  # pragma: no cover - tests/e2e runs it
    """Runs ``gpus`` workers under torchrun's agent in this process; returns the exit code."""
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    torchrun: Any = torch.distributed.run  # parse_args and run are not annotated
    try:
        torchrun.run(torchrun.parse_args(torchrun_args(config_path, gpus)))
    except SignalException:
        return pod_exit_code((), signalled=True)
    except ChildFailedError as exc:
        return pod_exit_code(failure.exitcode for failure in exc.failures.values())
    return EXIT_OK
