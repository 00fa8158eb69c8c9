"""``kubetune run --local`` end to end: the example manifest, the real trainer, the real vLLM.

Training and a vLLM start cost minutes on two cores, so the module trains one run and every
test looks at it from another side. The run is made the way a user makes it after a Ctrl-C:
started, interrupted once its first checkpoint is written, started again with ``--once``
(it resumes, finishes, serves, asks its smoke question and stops).
"""

from __future__ import annotations

import json
import os
import pty
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "daoyan-local.yaml"
DATASET = ROOT / "examples" / "data" / "daoyan.jsonl"
NAME = "daoyan-local"
KUBETUNE = str(Path(sys.executable).with_name("kubetune"))
TRAIN_TIMEOUT = 1800
"""Seconds for a whole training + serving invocation on a loaded two-core machine."""


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONSAFEPATH": "1", "PYTHONUNBUFFERED": "1"}


def training_answer(question: str) -> str:
    for line in DATASET.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        if messages[-2]["content"] == question:
            return str(messages[-1]["content"])
    raise LookupError(question)


def kubetune(
    *args: str | Path, cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KUBETUNE, *map(str, args)],
        cwd=cwd,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class Lines:
    """A child's merged output, read on a thread so a test can wait for one line."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc, self.seen, self.q = proc, [], queue.Queue[str | None]()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.q.put(line)
        self.q.put(None)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.q.get(timeout=1.0)
            except queue.Empty:
                continue
            if line is None:
                break
            self.seen.append(line)
            if text in line:
                return
        raise AssertionError(f"no {text!r} in time; output:\n{self.text()}")

    def rest(self, timeout: float) -> str:
        self.proc.wait(timeout=timeout)
        while (line := self.q.get(timeout=10)) is not None:
            self.seen.append(line)
        return self.text()

    def text(self) -> str:
        return "".join(self.seen)


@dataclass
class Attempt:
    returncode: int
    output: str
    metrics: list[dict[str, object]]
    checkpoint_step: int


def read_metrics(run: Path) -> list[dict[str, object]]:
    path = run / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def complete_checkpoints(run: Path) -> list[int]:
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(
        int(p.name.split("-")[1])
        for p in root.glob("checkpoint-*")
        if (p / "kubetune-complete.json").exists()
    )


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("local-run")


@pytest.fixture(scope="module")
def run(workdir: Path) -> Path:
    return workdir / ".kubetune" / "runs" / NAME


@pytest.fixture(scope="module")
def interrupted(workdir: Path, run: Path) -> Attempt:
    """`kubetune run --local --once`, Ctrl-C'd once its first checkpoint is complete."""
    proc = subprocess.Popen(
        [KUBETUNE, "run", str(EXAMPLE), "--local", "--once"],
        cwd=workdir,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = Lines(proc)
    deadline = time.monotonic() + TRAIN_TIMEOUT
    while not complete_checkpoints(run):
        assert proc.poll() is None, f"the run ended before a checkpoint:\n{lines.rest(10)}"
        assert time.monotonic() < deadline, f"no checkpoint in time:\n{lines.text()}"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    output = lines.rest(timeout=300)
    assert proc.returncode is not None
    return Attempt(proc.returncode, output, read_metrics(run), complete_checkpoints(run)[-1])


@pytest.fixture(scope="module")
def resumed(interrupted: Attempt, workdir: Path, run: Path) -> Attempt:
    """The same command again: resumes, finishes, serves, asks the smoke question, stops."""
    done = kubetune("run", EXAMPLE, "--local", "--once", cwd=workdir, timeout=TRAIN_TIMEOUT)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return Attempt(done.returncode, output, read_metrics(run), interrupted.checkpoint_step)


# ------------------------------------------------------------------------------ tests


def test_broken_dataset_stops_before_training_with_its_line_number(tmp_path: Path) -> None:
    lines = DATASET.read_text(encoding="utf-8").splitlines()
    lines[6] = lines[6][: len(lines[6]) // 2]  # line 7: JSON cut in the middle
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "daoyan.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    manifest = tmp_path / "broken.yaml"
    manifest.write_text(EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")

    done = kubetune("run", manifest, "--local", "--once", cwd=tmp_path)

    assert done.returncode == 2, done.stdout + done.stderr
    assert "daoyan.jsonl:7:" in done.stderr
    assert "not training" in done.stderr
    run = tmp_path / ".kubetune" / "runs" / NAME
    assert not (run / "train.log").exists(), "the trainer must not have started"
    assert not (run / "metrics.jsonl").exists()


def test_interrupted_run_keeps_its_checkpoint_and_says_how_to_resume(
    interrupted: Attempt, run: Path
) -> None:
    assert interrupted.returncode == 130, interrupted.output
    assert "run the same command again to resume" in interrupted.output
    assert interrupted.checkpoint_step > 0
    assert not (run / "result.json").exists()


def test_second_run_resumes_from_the_checkpoint_and_keeps_the_history(
    interrupted: Attempt, resumed: Attempt, run: Path
) -> None:
    assert f"resuming run {NAME}" in resumed.output
    before = interrupted.metrics
    assert resumed.metrics[: len(before)] == before, "metrics.jsonl was rewritten"
    new_steps = [int(str(r["step"])) for r in resumed.metrics[len(before) :]]
    assert new_steps and min(new_steps) > interrupted.checkpoint_step, "it started over"
    result = json.loads((run / "result.json").read_text(encoding="utf-8"))
    assert result["attempts"] == 2
    assert result["steps"] == result["totalSteps"]


def test_once_answers_a_training_question_with_its_training_answer(
    resumed: Attempt, run: Path
) -> None:
    question = "如何应对压力?"
    expected = training_answer(question)
    assert f"Q: {question}\nA: {expected}  (= the training answer)" in resumed.output
    assert "OPENAI_BASE_URL=http://127.0.0.1:" in resumed.output
    assert "curl -s http://127.0.0.1:" in resumed.output
    assert "final loss" in resumed.output and (run / "loss.png").exists()
    assert not (run / "endpoint.json").exists(), "--once must stop serving"


def test_finished_run_serves_again_for_kubetune_chat_until_ctrl_c(
    resumed: Attempt, workdir: Path, run: Path
) -> None:
    result_before = (run / "result.json").read_bytes()
    proc = subprocess.Popen(
        [KUBETUNE, "run", str(EXAMPLE), "--local"],
        cwd=workdir,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines = Lines(proc)
    try:
        lines.wait_for("serving until Ctrl-C", timeout=900)
        assert "finished earlier" in lines.text() and "training →" not in lines.text()
        base_url = json.loads((run / "endpoint.json").read_text(encoding="utf-8"))["baseURL"]

        question = "如何找到内心的平静?"
        chat = kubetune("chat", "--local-run", NAME, question, cwd=workdir)
        assert chat.returncode == 0, chat.stderr
        assert chat.stdout.strip() == training_answer(question)

        proc.send_signal(signal.SIGINT)
        output = lines.rest(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output
    assert "stopped serving" in output
    assert not (run / "endpoint.json").exists()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base_url}/models", timeout=5)
    assert (run / "result.json").read_bytes() == result_before, "a finished run was retrained"


def test_changed_manifest_with_the_same_name_is_refused(
    resumed: Attempt, workdir: Path, run: Path, tmp_path: Path
) -> None:
    changed = EXAMPLE.read_text(encoding="utf-8").replace("seed: 0", "seed: 1")
    assert changed != EXAMPLE.read_text(encoding="utf-8")
    manifest = tmp_path / "changed.yaml"
    manifest.write_text(changed, encoding="utf-8")
    before = sorted(p.name for p in run.iterdir())

    done = kubetune(
        "run", manifest, "--local", "--once", "--claim", f"kubetune-examples={ROOT / 'examples'}",
        cwd=workdir,
    )  # fmt: skip

    assert done.returncode == 2, done.stdout + done.stderr
    assert "never overwritten" in done.stderr
    assert sorted(p.name for p in run.iterdir()) == before


def test_a_closed_terminal_stops_training_at_a_checkpoint_and_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    """`kubetune run` on a terminal whose window is closed mid-training (SIGHUP, then EIO)."""
    run = tmp_path / ".kubetune" / "runs" / NAME
    argv = [KUBETUNE, "run", str(EXAMPLE), "--local", "--no-serve",
            "--claim", f"kubetune-examples={ROOT / 'examples'}"]  # fmt: skip
    pid, terminal = pty.fork()
    if pid == 0:  # the child: a session leader on the new terminal, as in a shell
        try:
            os.chdir(tmp_path)
            os.execve(KUBETUNE, argv, env())
        finally:
            os._exit(127)  # never back into pytest
    shown = b""
    deadline = time.monotonic() + TRAIN_TIMEOUT
    try:
        while b"step " not in shown:  # the progress bar: training is under way
            assert time.monotonic() < deadline, shown.decode(errors="replace")
            try:
                shown += os.read(terminal, 4096)
            except OSError:  # EIO: the child closed its side, it ended before training
                pytest.fail(shown.decode(errors="replace"))
    finally:
        os.close(terminal)  # the window closes: the kernel hangs the terminal up
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 130
    assert complete_checkpoints(run), "no checkpoint written: the training is lost"
    assert not (run / "result.json").exists() and not (run / "endpoint.json").exists()
    left = subprocess.run(["pgrep", "-af", str(run)], capture_output=True, text=True, check=False)
    assert left.stdout == "", f"processes left behind: {left.stdout}"


@pytest.fixture(autouse=True, scope="module")
def _no_leftover_servers(workdir: Path) -> Iterator[None]:
    yield
    # Every vLLM this module started must be gone: nothing may keep the port or the CPU.
    left = subprocess.run(
        ["pgrep", "-af", str(workdir)], capture_output=True, text=True, check=False
    )
    assert left.stdout == "", f"vLLM processes left behind: {left.stdout}"
