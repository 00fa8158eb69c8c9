"""Loading the base model and tokenizer, and wrapping the model in a LoRA adapter.

Decides the device-dependent things in one place: dtype (bf16 on GPUs that support it, fp16
on older GPUs, fp32 on CPU), the attention kernel (flash-attention 2's varlen kernel when it is
installed on CUDA, else PyTorch SDPA run per packed example, :mod:`.attention`), whether the
model's layers allow packed rows at all (:func:`packing_refusal`), and whether 4-bit QLoRA is
possible (CUDA and bitsandbytes only; :class:`QLoraUnavailable` says why not before any
weights are read). The flat LoRA fields of the API become a peft ``LoraConfig`` here and
nowhere else.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune import hub
from kubetune.api.finetunejob import LoraSpec, Method
from kubetune.api.jobconfig import TrainerConfig

log = logging.getLogger(__name__)


class QLoraUnavailable(RuntimeError):
    """``method: qlora`` was asked for where 4-bit base weights cannot run."""


@dataclass(frozen=True)
class Placement:
    """Where and how the model runs."""

    device: str
    """``cuda`` or ``cpu``."""
    dtype_name: str
    """``bfloat16``, ``float16`` or ``float32``."""
    attn_implementation: str

    @property
    def bf16(self) -> bool:
        return self.dtype_name == "bfloat16"

    @property
    def fp16(self) -> bool:
        return self.dtype_name == "float16"


def cgroup_cpus(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """The container's CPU limit (cgroup v2 ``cpu.max``), rounded up; None if unlimited."""
    try:
        quota, period = cpu_max.read_text(encoding="utf-8").split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, -(-int(quota) // int(period)))


PACKED_SDPA = "kubetune_packed_sdpa"
"""Per-example SDPA for packed rows (:mod:`kubetune.trainer.attention`)."""


def choose_placement() -> Placement:
    import os

    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        # torch sizes its thread pool by the node's cores, not the pod's CPU limit; the
        # oversubscribed pool is many times slower than one sized to the limit.
        limit = cgroup_cpus()
        if limit is not None and limit < torch.get_num_threads():
            torch.set_num_threads(limit)

    if torch.cuda.is_available():
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        flash = importlib.util.find_spec("flash_attn") is not None
        return Placement("cuda", dtype, "flash_attention_2" if flash else PACKED_SDPA)
    return Placement("cpu", "float32", PACKED_SDPA)


RECURRENT_MODEL_TYPES = frozenset(
    {
        "bamba", "falcon_h1", "falcon_mamba", "granitemoehybrid", "jamba", "lfm2", "lfm2_moe",
        "lfm2_vl", "mamba", "mamba2", "minimax", "nemotron_h", "qwen3_5", "qwen3_5_text",
        "qwen3_next", "recurrent_gemma", "rwkv", "xlstm", "zamba", "zamba2",
    }
)  # fmt: skip
"""Models with convolution, state-space or linear-attention layers beside (or instead of)
attention, whether or not their config lists them in ``layer_types``."""


def packing_refusal(model_config: Any) -> str | None:
    """Why packed rows would not train this model as it runs, or None if they would.

    Packed examples are kept apart only by position ids that restart, which the per-example
    attention (and flash-attention's varlen kernel) honour as plain causal attention. So only
    a model whose every token-mixing layer is full causal attention packs: convolution and
    state-space layers carry state from one example into the next, and a sliding window, an
    attention chunk or logit soft-capping would be lost.
    """
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else None
    config = text if text is not None else model_config
    model_type = str(getattr(config, "model_type", "") or "")
    layer_types = list(getattr(config, "layer_types", None) or [])
    others = sorted(set(layer_types) - {"full_attention", "sliding_attention", "chunked_attention"})
    if model_type in RECURRENT_MODEL_TYPES or others:
        kinds = f" ({', '.join(others)} layers)" if others else ""
        return (
            f"{model_type or 'the model'} mixes tokens with more than attention{kinds}, which "
            "would carry state from one packed example into the next"
        )
    window = getattr(config, "sliding_window", None)
    if layer_types:
        window = window if "sliding_attention" in layer_types else None
    elif getattr(config, "use_sliding_window", True) is False:
        window = None
    if window:
        return f"{model_type} attends through a sliding window of {window} tokens"
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk or "chunked_attention" in layer_types:
        return f"{model_type} attends within chunks" + (f" of {chunk} tokens" if chunk else "")
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap:
        return f"{model_type} soft-caps its attention logits at {softcap}"
    return None


def check_qlora(method: Method | str, placement: Placement) -> None:
    """Refuse QLoRA early, with the reason, where it cannot work."""
    if Method(method) != Method.QLORA:
        return
    if placement.device != "cuda":
        raise QLoraUnavailable(
            "`method: qlora` needs a CUDA GPU: 4-bit base weights (bitsandbytes NF4) have no "
            "CPU kernels for training. Use `method: lora` on CPU, or request GPUs "
            "(`resources.gpus` >= 1)."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QLoraUnavailable(
            "`method: qlora` needs the `bitsandbytes` package, which this trainer image lacks; "
            "use `method: lora` or an image with bitsandbytes installed."
        )


def model_source(config: TrainerConfig) -> tuple[str, dict[str, Any]]:
    """``from_pretrained`` argument and keyword arguments for the base model (or a folder)."""
    source = config.model.id_or_path
    kwargs: dict[str, Any] = {}
    if config.model.revision and not Path(source).is_dir():
        kwargs["revision"] = config.model.revision
    return source, kwargs


def load_tokenizer(config: TrainerConfig) -> Any:
    from transformers import AutoTokenizer

    source, kwargs = model_source(config)
    # The job's own access, before the cache is used (a namespace's cache is shared).
    hub.check(config.model.id_or_path, config.model.revision)
    with hub.access(config.model.id_or_path, config.model.revision):
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{source}: a fast tokenizer is needed (offsets locate assistant tokens)")
    if tokenizer.pad_token_id is None:
        # Only the padded path (packing off) uses it, and its positions carry no loss.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def lora_config(spec: LoraSpec) -> Any:
    """The peft ``LoraConfig`` for the API's flat LoRA fields."""
    from peft import LoraConfig, TaskType

    targets: str | list[str] = (
        "all-linear" if spec.target_modules == ["all-linear"] else list(spec.target_modules)
    )
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )


def quantization_config(compute_dtype: Any) -> Any:
    """QLoRA's base weights: 4-bit NF4 with double quantisation, computing in ``compute_dtype``
    (also what loads a base "as trained" to check a QLoRA adapter)."""
    import transformers

    hf: Any = transformers  # BitsAndBytesConfig is not annotated
    return hf.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_model(config: TrainerConfig, placement: Placement, *, local_rank: int = 0) -> Any:
    """The base model with a fresh LoRA adapter (trainable) on top."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    check_qlora(config.method, placement)
    if placement.attn_implementation == PACKED_SDPA:
        from kubetune.trainer import attention

        attention.register()
    source, kwargs = model_source(config)
    dtype = getattr(torch, placement.dtype_name)
    kwargs.update(dtype=dtype, attn_implementation=placement.attn_implementation)
    qlora = Method(config.method) == Method.QLORA
    if qlora:
        kwargs["quantization_config"] = quantization_config(dtype)
        kwargs["device_map"] = {"": local_rank}
    with hub.access(config.model.id_or_path, config.model.revision):
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    model.config.use_cache = False
    if qlora:
        import peft

        peft_any: Any = peft  # prepare_model_for_kbit_training is not annotated
        model = peft_any.prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.hyperparameters.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    model = get_peft_model(model, lora_config(config.lora))
    trainable, total = model.get_nb_trainable_parameters()
    log.info(
        "LoRA r=%d alpha=%d on %s: %d trainable of %d parameters (%s, %s, %s)",
        config.lora.r,
        config.lora.alpha,
        source,
        trainable,
        total,
        placement.device,
        placement.dtype_name,
        placement.attn_implementation,
    )
    return model
