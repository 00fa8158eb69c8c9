"""Model setup decisions: LoRA config mapping, QLoRA refusal on CPU, CPU limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.api.finetunejob import LoraSpec
from kubetune.trainer import modelload

CPU = modelload.Placement("cpu", "float32", "sdpa")
GPU = modelload.Placement("cuda", "bfloat16", "sdpa")


def test_lora_config_maps_the_api_fields() -> None:
    config = modelload.lora_config(LoraSpec(r=8, alpha=16, dropout=0.1))
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 16, 0.1)
    assert config.target_modules == "all-linear"
    assert config.task_type == "CAUSAL_LM"
    named = modelload.lora_config(LoraSpec(target_modules=["q_proj", "v_proj"]))
    assert set(named.target_modules) == {"q_proj", "v_proj"}


def test_qlora_on_cpu_fails_with_a_clear_message() -> None:
    with pytest.raises(modelload.QLoraUnavailable, match="`method: qlora` needs a CUDA GPU"):
        modelload.check_qlora("qlora", CPU)
    modelload.check_qlora("lora", CPU)  # plain LoRA is fine anywhere


def test_qlora_on_gpu_needs_bitsandbytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(modelload.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(modelload.QLoraUnavailable, match="bitsandbytes"):
        modelload.check_qlora("qlora", GPU)


@pytest.mark.parametrize(
    ("text", "cpus"), [("max 100000", None), ("200000 100000", 2), ("150000 100000", 2)]
)
def test_cgroup_cpu_limit(tmp_path: Path, text: str, cpus: int | None) -> None:
    (tmp_path / "cpu.max").write_text(text + "\n")
    assert modelload.cgroup_cpus(tmp_path / "cpu.max") == cpus
    assert modelload.cgroup_cpus(tmp_path / "absent") is None


def test_placement_flags() -> None:
    assert GPU.bf16 and not GPU.fp16
    assert not CPU.bf16 and not CPU.fp16
