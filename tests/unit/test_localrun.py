"""The decisions of ``kubetune run --local`` and ``kubetune chat`` that need no process.

Manifest → plan (paths, the demo model, the resolved trainer config), resume-or-refuse of a
run folder, the conversation sent for a question, and what the user sees (progress, columns).
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kubetune import chat, localplan, localproc, localrun
from kubetune.api.serveconfig import ServeConfig

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "daoyan-local.yaml"
SYSTEM = {"role": "system", "content": "你是一位道家智者"}


def write_manifest(folder: Path, spec: str, name: str = "demo") -> Path:
    path = folder / "job.yaml"
    path.write_text(
        f"apiVersion: kubetune.io/v1alpha1\nkind: FineTuneJob\nmetadata:\n  name: {name}\n"
        f"spec:\n{spec}",
        encoding="utf-8",
    )
    return path


PVC_SPEC = """\
  model: {id: kubetune/demo-tiny}
  dataset: {pvc: {claimName: data, path: train.jsonl}}
"""


# ------------------------------------------------------------------------------ manifests


def test_example_manifest_resolves_to_the_example_dataset_and_the_demo_model(
    tmp_path: Path,
) -> None:
    job = localplan.load_job(EXAMPLE)
    assert job.spec.model is not None and job.spec.model.id == localplan.DEMO_MODEL_ID
    assert job.spec.dataset.pvc is not None
    data = localplan.read_source(job, job.spec.dataset, "train.jsonl", {})
    assert data.path == ROOT / "examples" / "data" / "daoyan.jsonl"
    config = localplan.trainer_config(
        job,
        output_dir=tmp_path / "run",
        model_path=str(localplan.demo_model_dir(tmp_path, data.content, b"recipe")),
        dataset=data.path,
        validation=None,
    )
    assert config.output_dir == str(tmp_path / "run")
    assert config.dataset.path == str(data.path)
    assert config.progress.stdout and config.progress.config_map is None
    assert config.gpus == 0 and config.job.uid == "local"
    assert config.model.display == localplan.DEMO_MODEL_ID


def test_demo_model_folder_is_keyed_by_dataset_and_recipe(tmp_path: Path) -> None:
    one = localplan.demo_model_dir(tmp_path, b"data", b"recipe")
    assert one == localplan.demo_model_dir(tmp_path, b"data", b"recipe")
    assert one.parent == (tmp_path / "models").resolve() and one.name.startswith("demo-tiny-")
    assert one != localplan.demo_model_dir(tmp_path, b"other data", b"recipe")
    assert one != localplan.demo_model_dir(tmp_path, b"data", b"new recipe")


def test_claims_map_to_folders(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "train.jsonl").write_text("{}\n", encoding="utf-8")
    job = localplan.load_job(write_manifest(tmp_path, PVC_SPEC))
    claims = localplan.parse_claims([f"data={tmp_path / 'elsewhere'}"])
    data = localplan.read_source(job, job.spec.dataset, "train.jsonl", claims)
    assert data.path == tmp_path / "elsewhere" / "train.jsonl" and data.content == b"{}\n"


def test_config_map_dataset_is_read_from_the_same_file(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path,
        "  model: {id: kubetune/demo-tiny}\n"
        "  dataset: {configMap: {name: daoyan, key: train.jsonl}}\n",
    )
    path.write_text(
        path.read_text(encoding="utf-8")
        + "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: daoyan}\n"
        + 'data:\n  train.jsonl: |\n    {"messages": []}\n',
        encoding="utf-8",
    )
    job = localplan.load_job(path)
    data = localplan.read_source(job, job.spec.dataset, "train.jsonl", {})
    assert data.path is None and data.content == b'{"messages": []}\n'
    assert data.label == "configMap daoyan/train.jsonl"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("  dataset: {pvc: {claimName: data, path: t.jsonl}}\n", "spec: Value error, `model`"),
        (PVC_SPEC + "  hyperparameters: {learningRat: 1}\n", "spec.hyperparameters.learningRat"),
        (
            "  provider: openai\n  dataset: {url: 'https://x/t.jsonl'}\n"
            "  openai: {model: gpt-4o-mini, apiKeySecretRef: {name: k}}\n",
            "runs provider `local` jobs only",
        ),
    ],
)
def test_bad_manifests_are_refused_with_the_field(tmp_path: Path, spec: str, message: str) -> None:
    with pytest.raises(localplan.PlanError, match=message.replace("`", ".").replace("[", ".")):
        localplan.load_job(write_manifest(tmp_path, spec))


def test_missing_config_map_names_the_file(tmp_path: Path) -> None:
    job = localplan.load_job(
        write_manifest(
            tmp_path,
            "  model: {id: x/y}\n  dataset: {configMap: {name: nope, key: train.jsonl}}\n",
        )
    )
    with pytest.raises(localplan.PlanError, match="no ConfigMap `nope`"):
        localplan.read_source(job, job.spec.dataset, "train.jsonl", {})


# ------------------------------------------------------------------------------ run folders


def test_run_folder_is_new_then_resumed_then_finished(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "demo"
    assert localplan.run_state(run, "abc") == localplan.RunState.NEW
    job = localplan.load_job(write_manifest(tmp_path, PVC_SPEC))
    localplan.write_record(run, job, "abc")
    assert localplan.run_state(run, "abc") == localplan.RunState.NEW  # nothing trained yet
    (run / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    assert localplan.run_state(run, "abc") == localplan.RunState.RESUME
    (run / "result.json").write_text("{}", encoding="utf-8")
    assert localplan.run_state(run, "abc") == localplan.RunState.FINISHED


@pytest.mark.parametrize("finished", [False, True])
def test_a_different_job_under_the_same_name_is_refused(tmp_path: Path, finished: bool) -> None:
    run = tmp_path / "demo"
    job = localplan.load_job(write_manifest(tmp_path, PVC_SPEC))
    localplan.write_record(run, job, "abc")
    (run / "metrics.jsonl").write_text("{}\n", encoding="utf-8")
    if finished:
        (run / "result.json").write_text("{}", encoding="utf-8")
    with pytest.raises(localplan.PlanError, match="never overwritten"):
        localplan.run_state(run, "other")


def test_a_folder_kubetune_did_not_make_is_refused(tmp_path: Path) -> None:
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(localplan.PlanError, match="not made by `kubetune run`"):
        localplan.run_state(tmp_path / "demo", "abc")


def test_a_failed_start_is_cleared_but_the_lock_is_kept(tmp_path: Path) -> None:
    run = tmp_path / "demo"
    job = localplan.load_job(write_manifest(tmp_path, PVC_SPEC))
    localplan.write_record(run, job, "abc")
    (run / "train.log").write_text("boom", encoding="utf-8")
    (run / "data").mkdir()
    lock = localplan.lock_run(run)
    try:
        localplan.clear_unstarted(run)
        assert [p.name for p in run.iterdir()] == [localplan.LOCK_FILE]
    finally:
        lock.close()


def test_a_run_in_use_is_refused(tmp_path: Path) -> None:
    lock = localplan.lock_run(tmp_path / "demo")
    try:
        with pytest.raises(localplan.PlanError, match="in use"):
            localplan.lock_run(tmp_path / "demo")
    finally:
        lock.close()


def test_fingerprint_changes_with_the_data(tmp_path: Path) -> None:
    job = localplan.load_job(EXAMPLE)
    config = localplan.trainer_config(
        job, output_dir=tmp_path, model_path="m", dataset=tmp_path / "t", validation=None
    )
    a = localplan.DataInput("t", b"one", None, "t")
    b = localplan.DataInput("t", b"two", None, "t")
    assert localplan.fingerprint(config, [a]) != localplan.fingerprint(config, [b])
    assert localplan.fingerprint(config, [a]) == localplan.fingerprint(config, [a])


def test_final_loss_prefers_the_result(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train_loss": 2.5}\n', encoding="utf-8")
    assert localplan.final_loss(tmp_path) == 2.5
    (tmp_path / "result.json").write_text('{"finalTrainLoss": 0.01}', encoding="utf-8")
    assert localplan.final_loss(tmp_path) == 0.01


# ------------------------------------------------------------------------------ serving


def test_serve_config_serves_the_adapter_under_the_job_name(tmp_path: Path) -> None:
    job = localplan.load_job(EXAMPLE)
    config = localplan.serve_config(job, "/m/demo", tmp_path, "127.0.0.1", 8123, demo=True)
    again = ServeConfig.model_validate(config.to_wire())
    assert again.adapters[0].name == "daoyan-local" and again.adapters[0].path == str(tmp_path)
    assert again.base_name == "kubetune/demo-tiny" and again.model == "/m/demo"
    assert again.dtype == "float32" and again.port == 8123 and again.max_lora_rank == 16


def test_usage_text_shows_endpoint_curl_and_openai_snippet() -> None:
    messages = [SYSTEM, {"role": "user", "content": "如何应对压力?"}]
    text = localrun.usage_text("http://127.0.0.1:8000/v1", "daoyan-local", messages, "daoyan-local")
    assert "OPENAI_BASE_URL=http://127.0.0.1:8000/v1  OPENAI_MODEL=daoyan-local" in text
    assert "curl -s http://127.0.0.1:8000/v1/chat/completions" in text
    body = text.split("-d '", 1)[1].split("'\n", 1)[0]
    assert json.loads(body)["messages"] == messages  # the curl body is valid JSON, as trained
    assert 'OpenAI(base_url="http://127.0.0.1:8000/v1"' in text
    assert "kubetune chat --local-run daoyan-local '如何应对压力?'" in text


# ------------------------------------------------------------------------------ chat


def test_a_training_question_is_framed_as_in_training() -> None:
    examples = [
        [SYSTEM, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}],
        [SYSTEM, {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}],
    ]
    conv = chat.conversation_for("Q2", examples)
    assert conv.messages == [SYSTEM, {"role": "user", "content": "Q2"}] and conv.expected == "A2"
    other = chat.conversation_for("new", examples)
    assert other.messages == [SYSTEM, {"role": "user", "content": "new"}]
    assert other.expected is None
    assert chat.first_prompt(examples) == "Q1"


def test_load_examples_reads_the_dataset() -> None:
    examples = chat.load_examples(ROOT / "examples" / "data" / "daoyan.jsonl")
    questions = {m[-2]["content"] for m in examples}
    assert {"如何应对压力?", "如何找到内心的平静?"} <= questions


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000/v1"),
        ("http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1"),
        ("http://h/v1/", "http://h/v1"),
        ("https://api.example.com/openai/v1", "https://api.example.com/openai/v1"),
    ],
)
def test_normalize_base_url(url: str, expected: str) -> None:
    assert chat.normalize_base_url(url) == expected


def test_side_by_side_aligns_wide_characters() -> None:
    text = chat.side_by_side([("问", "道可道，非常道" * 3, "short")], ("base", "tuned"), 40)
    rows = [ln for ln in text.splitlines() if "│" in ln]
    columns = {chat.display_width(ln.split("│")[0]) for ln in rows}
    assert len(columns) == 1, text  # the separator is in the same column on every line
    assert "道可道" in text and "short" in text


def test_side_by_side_cuts_babble_and_control_characters() -> None:
    babble = "\t\x00a\u0301" + "乱" * 500
    text = chat.side_by_side([("问", babble, "答")], ("base", "tuned"), 40, max_lines=3)
    rows = [ln for ln in text.splitlines() if "│" in ln][1:]
    assert len(rows) == 3 and rows[-1].split("│")[0].rstrip().endswith("…")
    assert "\t" not in text and "\x00" not in text and "\u0301" not in text
    assert {chat.display_width(ln.split("│")[0]) for ln in rows} == {19}


def test_chat_reports_a_run_that_is_not_served(tmp_path: Path) -> None:
    args = type(
        "Args",
        (),
        {"local_run": "nope", "state_dir": tmp_path, "model": None, "system": None},
    )()
    err = io.StringIO()
    assert chat.chat_command(args, io.StringIO(), err) == 1  # type: ignore[arg-type]
    assert "not being served" in err.getvalue()


# ------------------------------------------------------------------------------ progress


def test_progress_plain_lines_are_throttled_and_end_with_the_last_step() -> None:
    out = io.StringIO()
    view = localproc.ProgressView(out, tty=False, every_seconds=3600)
    for step in range(1, 11):
        view.update(step, 10, 1.0 / step, None)
    view.update(10, 10, 0.1, None)  # the trainer repeats its final record
    lines = out.getvalue().splitlines()
    assert lines == ["  step 1/10  loss 1.0000", "  step 10/10  loss 0.1000"]


def test_progress_on_a_terminal_redraws_one_line() -> None:
    out = io.StringIO()
    view = localproc.ProgressView(out, tty=True)
    view.update(5, 10, 0.5, 30.0)
    view.update(6, 10, 0.4, None)
    view.close()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.count("\r") == 2
    assert "step 6/10  loss 0.4000  ETA" in text and "#" * 14 in text


def test_progress_records_are_told_from_log_lines() -> None:
    from kubetune.progress import ProgressRecord

    record = ProgressRecord(step=3, total_steps=9, epoch=0.5, train_loss=1.5)
    parsed = localproc._progress(record.to_json() + "\n", ProgressRecord)
    assert parsed is not None and parsed.step == 3 and parsed.train_loss == 1.5
    assert localproc._progress("{'loss': '6.5'}\n", ProgressRecord) is None
    assert localproc._progress(json.dumps({"other": 1}) + "\n", ProgressRecord) is None


@pytest.mark.parametrize("signum", localproc.STOP_SIGNALS)
def test_ctrl_c_kill_and_a_closed_terminal_each_stop_the_run(signum: int) -> None:
    before = signal.getsignal(signum)
    with pytest.raises(localproc.Interrupted) as info, localproc.signals_raise():
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises at once; this only bounds a failure
    assert info.value.signum == signum
    assert signal.getsignal(signum) == before


class GoneTerminal(io.StringIO):
    """A terminal after SIGHUP: every write fails with EIO."""

    def write(self, text: str) -> int:
        raise OSError(errno.EIO, "Input/output error")


def test_messages_to_a_closed_terminal_do_not_stop_the_cleanup() -> None:
    view = localproc.ProgressView(GoneTerminal(), tty=True)
    view.drawn = True
    view.close()  # would raise before the trainer is stopped
    localproc.say(GoneTerminal(), "kubetune run: interrupted\n")
    assert not view.drawn


# ------------------------------------------------------------------------------ reruns


def test_demo_model_with_another_seed_leaves_the_shared_one_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubetune import demo_model

    built: list[tuple[Path, int]] = []
    monkeypatch.setattr(
        localrun, "build_demo_model", lambda folder, dataset, seed=0: built.append((folder, seed))
    )
    for seed in (0, 3):
        args = argparse.Namespace(dataset=None, out=None, state_dir=tmp_path, seed=seed)
        assert localrun.demo_model_command(args, io.StringIO(), io.StringIO()) == 0
    (default, _), (seeded, seed) = built
    content = demo_model.DEFAULT_DATASET.read_bytes()
    # the folder `kubetune run` uses (seed 0) is the one it always was
    assert default == localplan.demo_model_dir(tmp_path, content, localrun.demo_builder())
    assert seeded != default and seed == 3


def parts_of(tmp_path: Path, data: bytes = b"one", model: str = "m", **options: Any) -> Any:
    job = localplan.load_job(EXAMPLE)
    config = localplan.trainer_config(
        job, output_dir=tmp_path, model_path=model, dataset=tmp_path / "t", validation=None,
        **options,
    )  # fmt: skip
    inputs = [localplan.DataInput("t", data, None, "t")]
    return localplan.fingerprint(config, inputs), localplan.fingerprint_parts(config, inputs)


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"max_steps": 20}, "--max-steps (none → 20)"),
        ({"gpus": 1}, "the GPU count (0 → 1; --gpus or spec.resources.gpus)"),
        ({"data": b"two"}, "the dataset"),
        ({"model": "/s/models/demo-tiny-bbbb"}, "the demo model (kubetune's demo-model recipe"),
    ],
)
def test_a_refused_rerun_says_what_changed(
    tmp_path: Path, change: dict[str, Any], said: str
) -> None:
    run = tmp_path / "demo"
    before, before_parts = parts_of(tmp_path, model="/s/models/demo-tiny-aaaa")
    localplan.write_record(run, localplan.load_job(EXAMPLE), before, before_parts)
    (run / "metrics.jsonl").write_text("{}\n", encoding="utf-8")
    now, now_parts = parts_of(tmp_path, **{"model": "/s/models/demo-tiny-aaaa", **change})
    with pytest.raises(localplan.PlanError) as info:
        localplan.run_state(run, now, now_parts)
    changed = localplan.changed_parts(before_parts, now_parts)
    assert len(changed) == 1 and changed[0].startswith(said)  # that one, and only that one
    assert f"differs from this one in {changed[0]}; a run is never overwritten" in str(info.value)


def test_a_run_in_use_is_refused_before_its_folder_is_read(tmp_path: Path) -> None:
    job = localplan.load_job(EXAMPLE)
    run = localplan.run_dir(tmp_path, job.name)
    # Another `kubetune run` of another version of the job holds the folder and is training.
    localplan.write_record(run, job, "another")
    (run / "metrics.jsonl").write_text("{}\n", encoding="utf-8")
    lock = localplan.lock_run(run)
    try:
        args = localrun_args(EXAMPLE, state_dir=tmp_path)
        err = io.StringIO()
        assert localrun.run_command(args, io.StringIO(), err) == localrun.EXIT_BAD_INPUT
    finally:
        lock.close()
    assert "is in use by another `kubetune run`" in err.getvalue(), err.getvalue()


def localrun_args(manifest: Path, **overrides: Any) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    localrun.register(parser.add_subparsers())
    args = parser.parse_args(["run", str(manifest), "--local"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


CHECKPOINTING_CHILD = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: None)  # like the trainer: finish, then exit\n"
    "print('ready', flush=True)\n"
    "time.sleep(2)\n"
)


@pytest.mark.parametrize(("second", "killed"), [(signal.SIGHUP, False), (signal.SIGINT, True)])
def test_only_a_second_ctrl_c_cuts_the_trainers_checkpoint_short(second: int, killed: bool) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHECKPOINTING_CHILD], stdout=subprocess.PIPE, start_new_session=True
    )
    assert child.stdout is not None and child.stdout.readline() == b"ready\n"
    child.stdout.close()
    timer = threading.Timer(0.5, os.kill, (os.getpid(), second))
    with localproc.signals_raise():
        timer.start()
        localproc._stop_group(child, grace=30)
    timer.join()
    assert child.returncode == (-signal.SIGKILL if killed else 0)


def test_a_hub_token_secret_is_named_as_not_read_locally(tmp_path: Path) -> None:
    spec = (
        "  model: {id: meta-llama/Llama-3.2-1B, tokenSecretRef: {name: hf-token, key: token}}\n"
        "  dataset: {pvc: {claimName: data, path: train.jsonl}}\n"
    )
    manifest = write_manifest(tmp_path, spec, name="gated")
    shutil.copy(ROOT / "examples" / "data" / "daoyan.jsonl", tmp_path / "train.jsonl")
    state = tmp_path / "state"
    lock = localplan.lock_run(localplan.run_dir(state, "gated"))  # stops it before any download
    try:
        out, err = io.StringIO(), io.StringIO()
        args = localrun_args(manifest, state_dir=state)
        assert localrun.run_command(args, out, err) == localrun.EXIT_BAD_INPUT
    finally:
        lock.close()
    assert "is in use by another `kubetune run`" in err.getvalue(), err.getvalue()
    assert (
        "model.tokenSecretRef names Secret hf-token of a cluster; a local run downloads with your "
        "own Hugging Face login (HF_TOKEN or `hf auth login`)\n"
    ) in out.getvalue()
