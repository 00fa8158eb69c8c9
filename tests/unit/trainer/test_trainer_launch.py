"""Data-parallel launch: the torchrun command, when it is used, and how a SIGTERM ends it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubetune.trainer import launch


def test_torchrun_args_run_one_worker_per_gpu() -> None:
    argv = launch.torchrun_args("/etc/kubetune/config.yaml", 4, shutdown_timeout=290)
    assert argv == [
        "--standalone",
        "--nnodes=1",
        "--nproc-per-node=4",
        "--max-restarts=0",
        "--signals-to-handle=SIGINT,SIGHUP,SIGQUIT",
        "--shutdown-timeout=290",
        "--module",
        "kubetune.trainer",
        "--config",
        "/etc/kubetune/config.yaml",
    ]
    from torch.distributed.run import config_from_args, parse_args

    config, _, cmd_args = config_from_args(parse_args(argv))  # torchrun accepts them as is
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (1, 1, 4)
    assert config.max_restarts == 0
    # torchrun's agent leaves SIGTERM to kubetune and waits as long as the pod may
    assert "SIGTERM" not in config.signals_to_handle
    assert config.shutdown_timeout == 290
    assert cmd_args[-4:] == ["-m", "kubetune.trainer", "--config", "/etc/kubetune/config.yaml"]


@pytest.mark.parametrize(
    ("env", "seconds"),
    [
        ({}, 110),  # the trainer pod's 120 s grace period, less the margin
        ({launch.GRACE_ENV: "600"}, 590),
        ({launch.GRACE_ENV: "5"}, 1),
        ({launch.GRACE_ENV: "soon"}, 110),
    ],
)
def test_shutdown_timeout_follows_the_grace_period(env: dict[str, str], seconds: int) -> None:
    assert launch.shutdown_timeout(env) == seconds


def test_torchrun_is_not_for_one_gpu() -> None:
    with pytest.raises(ValueError, match="2 or more"):
        launch.torchrun_args("c.yaml", 1, shutdown_timeout=110)


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
    ("codes", "expected"),
    [
        ([2, 143], launch.EXIT_INVALID),  # one worker refused the job: fail it at once
        ([143, 143], launch.EXIT_PREEMPTED),
        ([143, -15], launch.EXIT_PREEMPTED),
        ([143, -9], launch.EXIT_FAILED),  # killed before it could checkpoint
        ([1, 143], launch.EXIT_FAILED),
        ([-9], launch.EXIT_FAILED),  # e.g. OOM-killed
        ([], launch.EXIT_FAILED),
    ],
)
def test_pod_exit_code_follows_the_trainers_contract(codes: list[int], expected: int) -> None:
    assert launch.pod_exit_code(codes) == expected


def test_child_pids_reads_parents_from_proc(tmp_path: Path) -> None:
    for pid, stat in {
        "11": "11 (python) S 7 11 11 0",
        "12": "12 (odd ) name)) S 7 12 12 0",  # the command name may hold ") "
        "13": "13 (python) S 8 13 13 0",
        "self": "13 (python) S 8 13 13 0",
    }.items():
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "stat").write_text(stat)
    (tmp_path / "14").mkdir()  # exited meanwhile: no stat
    assert launch.child_pids(7, tmp_path) == [11, 12]
    assert os.getpid() in launch.child_pids(os.getppid())  # the real /proc


WORKER = """
import os, signal, sys, time
from pathlib import Path

stop_seconds, ready = float(sys.argv[1]), Path(sys.argv[2])


def on_sigterm(signum, frame):
    time.sleep(stop_seconds)  # finishing the step and writing the checkpoint
    sys.exit(143)


signal.signal(signal.SIGTERM, on_sigterm)
(ready / os.environ["RANK"]).touch()
while True:
    time.sleep(0.1)
"""

AGENT = "import sys; from kubetune.trainer import launch; "
AGENT += "sys.exit(launch.run_agent(sys.argv[2:], float(sys.argv[1])))"


def start_agent(folder: Path, stop_seconds: float, timeout: int) -> subprocess.Popen[bytes]:
    """torchrun's agent as the pod runs it, with two workers that take ``stop_seconds`` to
    stop after SIGTERM."""
    folder.mkdir()
    (folder / "worker.py").write_text(WORKER)
    argv = launch.torchrun_args("unused.yaml", 2, shutdown_timeout=timeout)
    argv = [*argv[: argv.index("--module")], str(folder / "worker.py"), str(stop_seconds), "."]
    with (folder / "agent.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-c", AGENT, str(timeout), *argv],
            cwd=folder, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"},
        )  # fmt: skip


def test_sigterm_gives_workers_the_grace_period_and_exit_143_means_they_stopped(
    tmp_path: Path,
) -> None:
    # Two pods at once (the agent takes seconds to start): workers that stop in time, and
    # workers still busy when the grace period is over.
    agents = {
        "in time": start_agent(tmp_path / "in-time", stop_seconds=3, timeout=30),
        "too slow": start_agent(tmp_path / "too-slow", stop_seconds=60, timeout=1),
    }
    deadline = time.monotonic() + 120
    for folder in ("in-time", "too-slow"):
        while not ((tmp_path / folder / "0").exists() and (tmp_path / folder / "1").exists()):
            assert time.monotonic() < deadline, (tmp_path / folder / "agent.log").read_text()
            time.sleep(0.05)
    started = time.monotonic()
    for agent in agents.values():
        agent.send_signal(signal.SIGTERM)
    codes = {name: agent.wait(timeout=120) for name, agent in agents.items()}
    assert codes == {"in time": launch.EXIT_PREEMPTED, "too slow": launch.EXIT_FAILED}, {
        folder: (tmp_path / folder / "agent.log").read_text()[-2000:]
        for folder in ("in-time", "too-slow")
    }
    assert time.monotonic() - started < 30


def test_sigterm_before_the_workers_start_stops_the_agent_as_torchrun_would() -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException

    forwarder = launch.SigtermForwarder(5, children=list)  # no worker yet
    with pytest.raises(SignalException) as info:
        forwarder(signal.SIGTERM, None)
    assert info.value.sigval == signal.SIGTERM and not forwarder.requested


def test_a_worker_leaves_its_process_group_before_it_exits(tmp_path: Path) -> None:
    import torch.distributed as dist

    launch.leave_process_group()  # none: nothing to do
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    launch.leave_process_group()
    assert not dist.is_initialized()
