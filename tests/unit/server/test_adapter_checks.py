"""Adapter checks: every refusal has its own message, and partial files are waited for."""

from __future__ import annotations

import json
import re
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.serveconfig import AdapterSource, ServeConfig
from kubetune.server import adapter_checks as ac

BASE = "/models/tiny-llama"  # what the make_adapter fixture records by default
MakeAdapter = Callable[..., Path]


def config(folder: Path, **over: Any) -> ServeConfig:
    doc: dict[str, Any] = {
        "model": BASE,
        "servedModelName": "tiny",
        "adapters": [{"name": "daoyan", "path": str(folder)}],
        "adapterWaitSeconds": 0,
    }
    return ServeConfig.model_validate({**doc, **over})


def test_a_good_adapter_passes_and_reports_its_rank(make_adapter: MakeAdapter) -> None:
    folder = make_adapter(rank=12, rank_pattern={"q_proj": 24})
    [info] = ac.check_adapters(config(folder))
    assert (info.name, info.rank, info.base_model) == ("daoyan", 24, BASE)


def test_rank_too_high_for_vllm(make_adapter: MakeAdapter) -> None:
    with pytest.raises(
        ac.AdapterRankTooHigh, match=r"rank 1024 is too high: vLLM supports at most 512"
    ):
        ac.check_adapters(config(make_adapter(rank=1024)))


def test_rank_too_high_for_the_configured_cap(make_adapter: MakeAdapter) -> None:
    with pytest.raises(
        ac.AdapterRankTooHigh, match=r"`maxLoraRank` is 8, so the server accepts at most 8"
    ):
        ac.check_adapters(config(make_adapter(rank=16), maxLoraRank=8))


def test_missing_weights(make_adapter: MakeAdapter) -> None:
    with pytest.raises(ac.AdapterWeightsMissing, match=r"adapter_model\.safetensors is missing"):
        ac.check_adapters(config(make_adapter(weights=False)))


@pytest.mark.parametrize("legacy", ["adapter_model.bin", "adapter_model.pt"])
def test_legacy_pickled_weights_are_served_as_vllm_does(
    make_adapter: MakeAdapter, legacy: str
) -> None:
    folder = make_adapter(weights=False)
    (folder / legacy).write_bytes(b"PK\x03\x04 a torch.save zip")
    [info] = ac.check_adapters(config(folder))
    assert info.rank == 8


def test_another_base_model(make_adapter: MakeAdapter) -> None:
    folder = make_adapter(base="Qwen/Qwen2.5-0.5B-Instruct")
    with pytest.raises(
        ac.AdapterBaseModelMismatch,
        match=r"trained on base model `Qwen/Qwen2.5-0.5B-Instruct`, but this server serves "
        r"`/models/tiny-llama`",
    ):
        ac.check_adapters(config(folder))


def invalid_weights(folder: Path, header: bytes) -> Path:
    """Replaces the adapter's weights by a file whose header is all there but not valid."""
    blob = struct.pack("<Q", len(header)) + header
    (folder / "adapter_model.safetensors").write_bytes(blob)
    return folder


def edit_config(folder: Path, **fields: Any) -> Path:
    """Sets (or, with None, removes) keys of the adapter's adapter_config.json."""
    path = folder / "adapter_config.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc.update(fields)
    doc = {k: v for k, v in doc.items() if v is not None}
    path.write_text(json.dumps(doc), encoding="utf-8")
    return folder


def test_each_refusal_is_a_distinct_class_with_a_distinct_message(
    make_adapter: MakeAdapter,
) -> None:
    cases = {
        ac.AdapterRankTooHigh: make_adapter("a", rank=600),
        ac.AdapterWeightsMissing: make_adapter("b", weights=False),
        ac.AdapterBaseModelMismatch: make_adapter("c", base="other/model"),
        ac.AdapterConfigMissing: make_adapter("d", config=False),
        ac.AdapterWeightsIncomplete: make_adapter("e", truncate=100),
        ac.AdapterWeightsInvalid: invalid_weights(make_adapter("h"), b"[]"),
        ac.AdapterNotLora: make_adapter("f", peft_type="PREFIX_TUNING"),
        ac.AdapterUnsupported: make_adapter("g", use_dora=True),
    }
    reasons = set()
    for cls, folder in cases.items():
        with pytest.raises(ac.AdapterRefused) as err:
            ac.check_adapters(config(folder))
        assert type(err.value) is cls
        assert f"({folder})" in str(err.value)
        reasons.add(err.value.reason.split(":")[0])
    assert len(reasons) == len(cases)


@pytest.mark.parametrize(
    ("recorded", "over"),
    [
        (BASE + "/", {}),
        ("tiny", {}),  # the served name
        ("TinyOrg/Tiny-Llama", {"baseModelAliases": ["tinyorg/tiny-llama"]}),
    ],
)
def test_same_base_under_another_spelling_is_accepted(
    make_adapter: MakeAdapter, recorded: str, over: dict[str, Any]
) -> None:
    ac.check_adapters(config(make_adapter(base=recorded), **over))


def test_a_symlinked_model_folder_is_the_same_base(
    make_adapter: MakeAdapter, tmp_path: Path
) -> None:
    real = tmp_path / "real-model"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    folder = make_adapter(base=str(tmp_path / "link"))
    ac.check_adapters(config(folder, model=str(real)))


def test_unrecorded_base_is_accepted_with_a_warning(
    make_adapter: MakeAdapter, caplog: pytest.LogCaptureFixture
) -> None:
    ac.check_adapters(config(make_adapter(base=None)))
    assert "records no base_model_name_or_path" in caplog.text


def test_safetensors_completeness_is_read_from_the_header(make_adapter: MakeAdapter) -> None:
    weights = make_adapter(truncate=1) / "adapter_model.safetensors"
    assert not ac.safetensors_complete(weights)
    weights.write_bytes(weights.read_bytes() + b"\0")
    assert ac.safetensors_complete(weights)
    weights.write_bytes(weights.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="longer than its header says"):
        ac.safetensors_complete(weights)
    weights.write_bytes(b"\x00" * 4)
    assert not ac.safetensors_complete(weights)


def test_waits_for_files_being_written_then_accepts_them(make_adapter: MakeAdapter) -> None:
    folder = make_adapter(weights=False)
    now = [0.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds
        if len(sleeps) == 3:  # the trainer finishes writing while we wait
            make_adapter()

    info = ac.wait_for_adapter(
        AdapterSource(name="daoyan", path=str(folder)), 60, clock=lambda: now[0], sleep=sleep
    )
    assert info.rank == 8 and len(sleeps) == 3


def test_gives_up_after_the_timeout_with_the_last_reason(make_adapter: MakeAdapter) -> None:
    folder = make_adapter(truncate=10)
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with pytest.raises(ac.AdapterWeightsIncomplete, match="shorter than its header"):
        ac.wait_for_adapter(
            AdapterSource(name="daoyan", path=str(folder)), 30, clock=lambda: now[0], sleep=sleep
        )
    assert now[0] == pytest.approx(30)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fields", [{"rank": 1024}, {"base": "other/model"}])
def test_a_wrong_rank_or_base_is_refused_at_once_not_waited_for(
    make_adapter: MakeAdapter, fields: dict[str, Any]
) -> None:
    start = time.monotonic()
    with pytest.raises((ac.AdapterRankTooHigh, ac.AdapterBaseModelMismatch)):
        ac.check_adapters(config(make_adapter(**fields), adapterWaitSeconds=3600))
    assert time.monotonic() - start < 5


def test_invalid_json_config_is_not_ready(make_adapter: MakeAdapter) -> None:
    folder = make_adapter()
    (folder / "adapter_config.json").write_text('{"r": 8, "peft_', encoding="utf-8")
    with pytest.raises(ac.AdapterConfigMissing, match="not readable JSON"):
        ac.read_adapter(AdapterSource(name="x", path=str(folder)))
    (folder / "adapter_config.json").write_text(json.dumps([1]), encoding="utf-8")
    with pytest.raises(ac.AdapterConfigMissing, match="not a JSON object"):
        ac.read_adapter(AdapterSource(name="x", path=str(folder)))


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"modules_to_save": ["lm_head", "embed_tokens"]}, "modules_to_save"),
        ({"use_dora": True}, "DoRA"),
        ({"lora_bias": True}, "lora_bias"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights: pissa"),
        ({"use_qalora": True}, "QALoRA"),
    ],
)
def test_lora_variants_vllm_cannot_serve_are_refused_up_front(
    make_adapter: MakeAdapter, fields: dict[str, Any], named: str
) -> None:
    with pytest.raises(ac.AdapterUnsupported, match=named):
        ac.check_adapters(config(make_adapter(**fields), adapterWaitSeconds=3600))


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "header",
    [
        b"{not json}",
        b"[1, 2]",
        b'{"w": {"dtype": "F32", "shape": [2]}}',  # a tensor without data_offsets
    ],
)
def test_an_invalid_safetensors_header_is_refused_at_once_not_waited_for(
    make_adapter: MakeAdapter, header: bytes
) -> None:
    folder = invalid_weights(make_adapter(), header)
    start = time.monotonic()
    with pytest.raises(ac.AdapterWeightsInvalid, match="no valid safetensors header"):
        ac.check_adapters(config(folder, adapterWaitSeconds=3600))
    assert time.monotonic() - start < 5


@pytest.mark.timeout(30)
def test_a_pickle_named_safetensors_is_refused_at_once(make_adapter: MakeAdapter) -> None:
    folder = make_adapter()
    # torch.save's zip: its first 8 bytes read as a header length of petabytes.
    (folder / "adapter_model.safetensors").write_bytes(b"PK\x03\x04\x00\x00\x08\x00" * 4)
    with pytest.raises(ac.AdapterWeightsInvalid, match="is not safetensors"):
        ac.check_adapters(config(folder, adapterWaitSeconds=3600))


@pytest.mark.parametrize("bias", ["all", "lora_only", None])
def test_trained_biases_are_refused_as_vllm_does(
    make_adapter: MakeAdapter, bias: str | None
) -> None:
    with pytest.raises(ac.AdapterUnsupported, match=f"`bias: {bias}`") as err:
        ac.check_adapters(config(make_adapter(bias=bias), adapterWaitSeconds=3600))
    assert "adapter `daoyan`" in str(err.value)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"lora_alpha": None}, "lacks `lora_alpha`, which vLLM requires"),
        ({"target_modules": None}, "lacks `target_modules`, which vLLM requires"),
        ({"r": None, "lora_alpha": None}, "lacks `r`, `lora_alpha`, which vLLM requires"),
        ({"r": 0}, "`r` must be a positive LoRA rank, not 0"),
        ({"lora_alpha": "16"}, "`lora_alpha` must be a number, not '16'"),
        ({"rank_pattern": {"q_proj": 0}}, "`rank_pattern` gives `q_proj` the rank 0"),
        ({"rank_pattern": {"q_proj": "8"}}, "`rank_pattern` gives `q_proj` the rank '8'"),
    ],
)
def test_fields_vllm_requires_are_checked_up_front(
    make_adapter: MakeAdapter, fields: dict[str, Any], named: str
) -> None:
    folder = edit_config(make_adapter(), **fields)
    with pytest.raises(ac.AdapterNotLora, match=re.escape(named)) as err:
        ac.check_adapters(config(folder, adapterWaitSeconds=3600))
    assert "adapter `daoyan`" in str(err.value)


@pytest.mark.parametrize(
    "fields",
    [
        {"modules_to_save": None, "init_lora_weights": True, "use_dora": False},
        {"modules_to_save": ["score"], "init_lora_weights": "gaussian"},
        {"bias": "none", "target_modules": "all-linear", "lora_alpha": 8.5},
    ],
)
def test_plain_lora_settings_pass(make_adapter: MakeAdapter, fields: dict[str, Any]) -> None:
    ac.check_adapters(config(make_adapter(**fields)))
