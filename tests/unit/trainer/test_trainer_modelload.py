"""Model setup decisions: LoRA config mapping, QLoRA refusal on CPU, CPU limits, packing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import transformers

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


def tiny(name: str, **fields: Any) -> Any:
    """A transformers config (no hub, no weights) with a few fields set."""
    return getattr(transformers, name)(num_hidden_layers=2, **fields)


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        # a sliding window (Mistral v0.1, Phi-3 mini) or local layers (Gemma 2/3)
        (tiny("MistralConfig", sliding_window=4096), "sliding window of 4096 tokens"),
        (tiny("Phi3Config", sliding_window=2047), "sliding window of 2047 tokens"),
        (tiny("Gemma3TextConfig", sliding_window=512), "sliding window of 512 tokens"),
        (tiny("Gemma2Config", layer_types=["full_attention"] * 2), "soft-caps its attention"),
        (tiny("Qwen2Config", use_sliding_window=True, max_window_layers=0), "sliding window"),
        # convolution or state-space layers beside attention carry state across examples
        (tiny("Lfm2Config", layer_types=["conv", "full_attention"]), "lfm2 mixes tokens"),
        (tiny("Lfm2Config"), "lfm2 mixes tokens"),
        (tiny("Qwen3NextConfig"), "(linear_attention layers)"),
        (tiny("JambaConfig"), "jamba mixes tokens"),
        (tiny("GraniteMoeHybridConfig"), "granitemoehybrid mixes tokens"),
        (tiny("Llama4TextConfig"), "chunks of 8192 tokens"),
    ],
)
def test_packing_is_refused_where_packed_rows_would_not_train_the_model(
    config: Any, reason: str
) -> None:
    refusal = modelload.packing_refusal(config)
    assert refusal is not None and reason in refusal


@pytest.mark.parametrize(
    "config",
    [
        tiny("LlamaConfig"),
        tiny("Qwen2Config"),  # its sliding window is off
        tiny("Qwen3Config"),
        tiny("MistralConfig", sliding_window=None),  # Mistral v0.2 and later
        tiny("Phi3Config"),
        tiny("GemmaConfig"),
    ],
)
def test_attention_only_models_pack(config: Any) -> None:
    assert modelload.packing_refusal(config) is None


def test_qlora_base_weights_are_nf4_with_double_quantisation_in_the_compute_dtype() -> None:
    import torch

    config = modelload.quantization_config(torch.bfloat16)
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
