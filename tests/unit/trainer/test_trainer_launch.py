"""Data-parallel launch: the torchrun command and when it is used."""

from __future__ import annotations

import pytest

from kubetune.trainer import launch


def test_torchrun_argv_runs_one_worker_per_gpu() -> None:
    argv = launch.torchrun_argv("/etc/kubetune/config.yaml", 4, python="/venv/bin/python")
    assert argv == [
        "/venv/bin/python",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        "--nproc-per-node=4",
        "--max-restarts=0",
        "--module",
        "kubetune.trainer",
        "--config",
        "/etc/kubetune/config.yaml",
    ]


def test_torchrun_is_not_for_one_gpu() -> None:
    with pytest.raises(ValueError, match="2 or more"):
        launch.torchrun_argv("c.yaml", 1)


@pytest.mark.parametrize(
    ("gpus", "env", "expected"),
    [
        (0, {}, False),
        (1, {}, False),
        (2, {}, True),
        (8, {"LOCAL_RANK": "3", "RANK": "3", "WORLD_SIZE": "8"}, False),  # already a worker
    ],
)
def test_needs_torchrun(gpus: int, env: dict[str, str], expected: bool) -> None:
    assert launch.needs_torchrun(gpus, env) is expected


def test_process_info_reads_torchrun_env() -> None:
    info = launch.process_info({"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"})
    assert (info.rank, info.local_rank, info.world_size, info.is_main) == (5, 1, 8, False)
    assert launch.process_info({}).is_main
