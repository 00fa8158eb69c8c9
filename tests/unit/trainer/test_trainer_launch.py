"""Data-parallel launch: the torchrun command and when it is used."""

from __future__ import annotations

import pytest

from kubetune.trainer import launch


def test_torchrun_args_run_one_worker_per_gpu() -> None:
    argv = launch.torchrun_args("/etc/kubetune/config.yaml", 4)
    assert argv == [
        "--standalone",
        "--nnodes=1",
        "--nproc-per-node=4",
        "--max-restarts=0",
        "--module",
        "kubetune.trainer",
        "--config",
        "/etc/kubetune/config.yaml",
    ]
    from torch.distributed.run import config_from_args, parse_args

    config, _, cmd_args = config_from_args(parse_args(argv))  # torchrun accepts them as is
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (1, 1, 4)
    assert config.max_restarts == 0
    assert cmd_args[-4:] == ["-m", "kubetune.trainer", "--config", "/etc/kubetune/config.yaml"]


def test_torchrun_is_not_for_one_gpu() -> None:
    with pytest.raises(ValueError, match="2 or more"):
        launch.torchrun_args("c.yaml", 1)


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


@pytest.mark.parametrize(
    ("codes", "signalled", "expected"),
    [
        ([2, 143], False, launch.EXIT_INVALID),  # one worker refused the job: fail it at once
        ([143, 143], False, launch.EXIT_PREEMPTED),
        ([143, -15], False, launch.EXIT_PREEMPTED),
        ([], True, launch.EXIT_PREEMPTED),  # the agent itself got SIGTERM
        ([1, 143], False, launch.EXIT_FAILED),
        ([-9], False, launch.EXIT_FAILED),  # e.g. OOM-killed
    ],
)
def test_pod_exit_code_follows_the_trainers_contract(
    codes: list[int], signalled: bool, expected: int
) -> None:
    assert launch.pod_exit_code(codes, signalled=signalled) == expected
