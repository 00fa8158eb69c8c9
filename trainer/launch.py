"""Data-parallel launch: with more than one GPU, the trainer re-executes itself under torchrun.

The pod starts ``python -m kubetune.trainer --config PATH`` as usual. When the config asks for
``gpus > 1`` and the process is not already a torchrun worker, :func:`torchrun_argv` builds the
command that replaces the process (``os.execv``): torchrun then owns the pod's main process,
forwards SIGTERM to every worker, and exits non-zero if any worker does, which is what the
Job controller needs. Everything here is pure except :func:`exec_torchrun`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass


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


def torchrun_argv(config_path: str, gpus: int, *, python: str | None = None) -> list[str]:
    """The command that runs ``gpus`` trainer workers on this node."""
    if gpus < 2:
        raise ValueError(f"torchrun is for 2 or more GPUs, not {gpus}")
    return [
        python or sys.executable,
        "-m",
        "torch.distributed.run",
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


def exec_torchrun(config_path: str, gpus: int) -> None:  # pragma: no cover - replaces process
    argv = torchrun_argv(config_path, gpus)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
