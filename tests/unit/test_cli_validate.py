"""``kubetune validate``: what a user sees, exit codes, JSON, the kubectl plugin name.

tiktoken's files cannot be downloaded here; every test points tiktoken's cache at an empty
folder and turns the download off, so the OpenAI counts are the labelled approximation.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune import cli
from kubetune.data import tokens, validate

ROOT = Path(__file__).resolve().parents[2]
BROKEN = ROOT / "examples" / "data" / "broken.jsonl"
DAOYAN = ROOT / "examples" / "data" / "daoyan.jsonl"


@pytest.fixture(autouse=True)
def offline_tiktoken(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
    monkeypatch.setenv("KUBETUNE_TIKTOKEN_DOWNLOAD", "0")
    monkeypatch.setattr(tokens, "_bundled_encoding", lambda name: None)


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    args = cli.build_parser().parse_args(list(argv))
    return args.handler(args, out, err), out.getvalue(), err.getvalue()


def write(tmp_path: Path, n: int, extra: list[str] | None = None) -> Path:
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"question {i}"},
                    {"role": "assistant", "content": f"answer {i}"},
                ]
            }
        )
        for i in range(n)
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([*lines, *(extra or [])]) + "\n", encoding="utf-8")
    return path


def test_clean_file_exits_0_with_stats_and_estimate(tmp_path: Path) -> None:
    code, out, _ = run("validate", str(write(tmp_path, 20)), "--model", "gpt-4o-mini")
    assert code == 0
    assert "(provider openai)" in out and "OK: no errors" in out
    assert "APPROXIMATION" in out and "NOT EXACT" in out
    assert "Estimate: OpenAI gpt-4o-mini" in out and "epochs 5 (auto for 20 examples)" in out
    assert "$3.00 per 1M tokens" in out


def test_broken_file_exits_1_with_a_problem_table() -> None:
    code, out, _ = run("validate", str(BROKEN), "--provider", "openai", "--no-tokens")
    assert code == 1
    assert "FAILED:" in out
    for code_name in ("not-json", "not-utf8", "system-not-first", "weight-invalid", "bom"):
        assert code_name in out
    assert "\n        3    -  error    not-json" in out


def test_json_output_carries_report_and_estimate(tmp_path: Path) -> None:
    path = write(tmp_path, 12, ["[]"])
    code, out, _ = run("validate", str(path), "--model", "gpt-4o", "--json", "--epochs", "2")
    assert code == 1
    doc = json.loads(out)
    assert doc["ok"] is False and doc["counts"] == {"not-object": 1}
    assert doc["errors"][0]["line"] == 13
    assert doc["stats"]["n_examples"] == 12 and doc["stats"]["exact"] is False
    est = doc["estimate"]
    assert est["n_epochs"] == 2 and est["price_per_million"] == 25.0
    assert est["billed_tokens"] == doc["stats"]["billed_tokens_per_epoch"] * 2


def test_price_override_and_unknown_model(tmp_path: Path) -> None:
    path = write(tmp_path, 12)
    _, out, _ = run("validate", str(path), "--model", "gpt-4.1-2025-04-14", "--json")
    assert json.loads(out)["estimate"]["cost_usd"] is None
    _, out, _ = run(
        "validate", str(path), "--model", "gpt-4.1-2025-04-14", "--price-per-1m", "25", "--json"
    )
    est = json.loads(out)["estimate"]
    assert est["cost_usd"] == pytest.approx(est["billed_tokens"] * 25 / 1e6)


def test_local_without_model_checks_format_only(tmp_path: Path) -> None:
    code, out, _ = run("validate", str(write(tmp_path, 3)))
    assert code == 0 and "(provider local)" in out
    assert "token counting off" in out and "Estimate" not in out


def test_local_with_a_tokenizer_folder_estimates_steps(tiny_folder: Path, tmp_path: Path) -> None:
    path = write(tmp_path, 40)
    code, out, _ = run(
        "validate", str(path), "--model", str(tiny_folder), "--tokens-per-second", "100"
    )
    assert code == 0, out
    assert "(chat template)" in out and "Estimate: local LoRA job" in out
    assert "100 tokens/s per GPU" in out and "assumed" not in out


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["question answer"] * 10, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
    )
    fast.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    code, _, err = run("validate", str(tmp_path / "missing.jsonl"))
    assert code == 2 and "missing.jsonl" in err
    code, _, err = run("validate", str(write(tmp_path, 3)), "--epochs", "many")
    assert code == 2 and "--epochs" in err
    code, _, err = run("validate", str(write(tmp_path, 3)), "--model", str(tmp_path / "nope"))
    assert code == 2 and "cannot load a tokenizer" in err
    code, _, err = run(
        "validate", str(write(tmp_path, 3)), "--method", "dpo", "--provider", "local"
    )
    assert code == 2 and "--method dpo is for provider openai" in err


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-seq-length", "0", "must be at least 1, got 0"),
        ("--max-tokens", "-5", "must be at least 1, got -5"),
        ("--max-tokens", "many", "must be a whole number, got 'many'"),
        ("--tokens-per-second", "0", "must be more than 0, got 0"),
        ("--tokens-per-second", "inf", "must be a finite number, got 'inf'"),
        ("--price-per-1m", "-3", "must be 0 or more, got -3"),
        ("--price-per-1m", "nan", "must be a finite number, got 'nan'"),
    ],
)
def test_numbers_out_of_range_are_usage_errors(
    flag: str, value: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["validate", str(write(tmp_path, 3)), flag, value])
    assert exited.value.code == 2  # not 1, which means: the data has errors
    err = capsys.readouterr().err
    assert f"argument {flag}: {message}" in err and "Traceback" not in err


def test_a_zero_price_is_a_free_estimate(tmp_path: Path) -> None:
    code, out, _ = run("validate", str(write(tmp_path, 12)), "--model", "gpt-4o-mini",
                       "--price-per-1m", "0", "--json")  # fmt: skip
    assert code == 0 and json.loads(out)["estimate"]["cost_usd"] == 0


def dpo_file(tmp_path: Path, n: int) -> Path:
    lines = [
        json.dumps(
            {
                "input": {"messages": [{"role": "user", "content": f"question {i}"}]},
                "preferred_output": [{"role": "assistant", "content": f"brief {i}"}],
                "non_preferred_output": [{"role": "assistant", "content": f"rambling {i}"}],
            }
        )
        for i in range(n)
    ]
    path = tmp_path / "dpo.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_method_dpo_validates_preference_pairs(tmp_path: Path) -> None:
    code, out, _ = run("validate", str(dpo_file(tmp_path, 12)), "--method", "dpo", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["format"] == "dpo" and doc["provider"] == "openai"
    assert doc["n_valid"] == 12 and doc["estimate"]["billed_tokens"] > 0
    code, out, _ = run("validate", str(write(tmp_path, 12)), "--method", "dpo")
    assert code == 1 and "format-not-dpo" in out
    code, out, _ = run("validate", str(dpo_file(tmp_path, 12)), "--model", "gpt-4o-mini")
    assert code == 1 and "validate with method dpo" in out


def test_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write(tmp_path, 3).read_bytes()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    code, out, _ = run("validate", "-")
    assert code == 0 and "<stdin>" in out


def test_progress_line_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(cli, "PROGRESS_MIN_BYTES", 0)
    monkeypatch.setattr(validate, "PROGRESS_EVERY", 10)
    err = Tty()
    args = cli.build_parser().parse_args(["validate", str(write(tmp_path, 50)), "--no-tokens"])
    assert args.handler(args, io.StringIO(), err) == 0
    assert "\rvalidating:" in err.getvalue() and "lines" in err.getvalue()


def test_main_uses_the_kubectl_plugin_name(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/kubectl-kubetune", "--help"])
    with pytest.raises(SystemExit):
        cli.main()
    assert capsys.readouterr().out.startswith("usage: kubectl kubetune")


def test_main_returns_the_exit_code(tmp_path: Path) -> None:
    assert cli.main(["validate", str(write(tmp_path, 3)), "--no-tokens"]) == 0
    assert cli.main(["validate", str(write(tmp_path, 3, ["{"])), "--no-tokens"]) == 1


def test_help_is_instant_and_imports_nothing_heavy() -> None:
    code = (
        "import sys; from kubetune import cli; cli.build_parser(); "
        "print(sorted(m for m in ('transformers', 'tiktoken', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_example_dataset_validates_clean() -> None:
    code, out, _ = run("validate", str(DAOYAN), "--model", "gpt-4o-mini")
    assert code == 0 and "0 errors, 0 warnings" in out


def test_kubectl_runs_the_plugin(tmp_path: Path) -> None:
    import os
    import shutil

    bindir = Path(sys.executable).parent
    kubectl = shutil.which("kubectl")
    if kubectl is None or not (bindir / "kubectl-kubetune").exists():
        pytest.skip("needs kubectl and the installed kubectl-kubetune script")
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(
        [kubectl, "kubetune", "validate", str(write(tmp_path, 3)), "--no-tokens"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "OK: no errors" in done.stdout
