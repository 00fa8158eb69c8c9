"""Checks an adapter folder before vLLM is started with it, and waits for it to be complete.

vLLM finds a bad adapter late (after minutes of model loading) and says so in a stack trace.
The launcher reads each adapter's ``adapter_config.json`` and the header of its
``adapter_model.safetensors`` first and refuses, with one clear message per cause, an adapter
that vLLM cannot serve or that belongs to another base model. Only the standard library is
used: the safetensors header is JSON behind an 8-byte length, so no torch is needed to read it.
The runtime adapter client (:mod:`kubetune.server.adapters`) runs the same checks before it
asks a running server to load an adapter.

Exception tree (all carry the adapter's name and path in their message)::

    AdapterRefused                  the server must not start with this adapter
    ├── AdapterNotReady             files missing or still being written (waited for first)
    │   ├── AdapterConfigMissing    no readable adapter_config.json
    │   ├── AdapterWeightsMissing   no adapter_model.safetensors (nor legacy .bin / .pt)
    │   └── AdapterWeightsIncomplete  the safetensors file is shorter than its header says
    ├── AdapterWeightsInvalid       the safetensors header is all there but not valid
    ├── AdapterNotLora              a PEFT type other than LoRA, or a field vLLM needs is missing
    ├── AdapterUnsupported          a LoRA variant vLLM refuses (DoRA, bias, modules_to_save, ...)
    ├── AdapterRankTooHigh          rank above the server's limit (or vLLM's maximum)
    ├── AdapterBaseModelMismatch    trained on another base model
    └── AdapterChatTemplateConflict its chat template differs from another adapter's

Chat template: vLLM renders every prompt with one template, taken from ``--chat-template`` or
the base model's tokenizer; it never looks in an adapter's folder. When the base model has no
template, the trainer trains with its fallback and writes it next to the adapter
(``chat_template.jinja``); :func:`chat_template` picks that file for ``--chat-template``.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api.result import RESULT_FILE
from kubetune.api.serveconfig import AdapterSource, ServeConfig
from kubetune.server import vllm_args

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LEGACY_WEIGHTS = ("adapter_model.bin", "adapter_model.pt")
"""Pickled weights, which vLLM 0.32 loads (``LoRAModel.from_local_checkpoint``) when there is
no safetensors file."""

REQUIRED_FIELDS = ("r", "lora_alpha", "target_modules")
"""Keys vLLM 0.32 requires in ``adapter_config.json`` (``PEFTHelper.from_dict``)."""

CHAT_TEMPLATE_FILE = "chat_template.jinja"
"""Where transformers' ``save_pretrained`` writes a tokenizer's chat template: the trainer
writes its fallback template there, next to the adapter, when the base model has none."""

BASE_TEMPLATE_FILES = (CHAT_TEMPLATE_FILE, "chat_template.json")
"""Files that give a model folder a chat template (tokenizer's, processor's) besides
``tokenizer_config.json``'s ``chat_template`` key."""

MAX_SAFETENSORS_HEADER = 100_000_000
"""The largest header the safetensors library reads; a longer one is not safetensors."""


class AdapterRefused(Exception):
    """The launcher must not start vLLM with this adapter."""

    def __init__(self, adapter: AdapterSource, reason: str) -> None:
        super().__init__(f"adapter `{adapter.name}` ({adapter.path}): {reason}")
        self.adapter = adapter
        self.reason = reason


class AdapterNotReady(AdapterRefused):
    """Files are missing or partial: possibly still being written, so worth waiting for."""


class AdapterConfigMissing(AdapterNotReady):
    pass


class AdapterWeightsMissing(AdapterNotReady):
    pass


class AdapterWeightsIncomplete(AdapterNotReady):
    pass


class AdapterWeightsInvalid(AdapterRefused):
    pass


class AdapterNotLora(AdapterRefused):
    pass


class AdapterUnsupported(AdapterRefused):
    pass


class AdapterRankTooHigh(AdapterRefused):
    pass


class AdapterBaseModelMismatch(AdapterRefused):
    pass


class AdapterChatTemplateConflict(AdapterRefused):
    pass


@dataclass(frozen=True)
class AdapterInfo:
    """What the launcher learned from an adapter folder."""

    name: str
    path: str
    rank: int
    """The largest LoRA rank in the adapter (``r`` and any ``rank_pattern`` entry)."""
    base_model: str | None
    """``base_model_name_or_path`` from ``adapter_config.json``, if recorded."""
    chat_template: str | None = None
    """The chat template file the adapter was trained with, when the trainer wrote one next to
    it (its fallback, for a base model without a template); None otherwise."""


# ------------------------------------------------------------------------------ reading


def safetensors_complete(path: Path) -> bool:
    """True when the file is as long as its header says: every tensor's bytes are there.

    Raises ValueError when the header is all there but is not a safetensors header (no writer
    produces that, so waiting cannot help).
    """
    size = path.stat().st_size
    if size < 8:
        return False
    with path.open("rb") as f:
        header_len = int(struct.unpack("<Q", f.read(8))[0])
        if header_len > MAX_SAFETENSORS_HEADER:
            raise ValueError(f"{path.name} is not safetensors: its header length is {header_len}")
        if size < 8 + header_len:
            return False
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:
            raise ValueError(f"{path.name} has no valid safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path.name} has no valid safetensors header")
    ends = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and isinstance(offsets[1], int)):
            raise ValueError(f"{path.name} has no valid safetensors header: tensor `{key}`")
        ends.append(offsets[1])
    end = 8 + header_len + max(ends, default=0)
    if size > end:  # the safetensors library refuses such a file ("not fully covered")
        raise ValueError(f"{path.name} is longer than its header says ({size} > {end} bytes)")
    return size == end


def adapter_rank(adapter_config: dict[str, Any]) -> int:
    """The largest rank any layer of the adapter uses.

    Raises ValueError, naming the field, for a rank vLLM 0.32 refuses (``PEFTHelper``): ``r``
    must be a positive number, each ``rank_pattern`` entry a positive integer.
    """
    r = adapter_config.get("r")
    if not isinstance(r, int | float) or r <= 0:
        raise ValueError(f"`r` must be a positive LoRA rank, not {r!r}")
    ranks = [int(r)]
    pattern = adapter_config.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        raise ValueError(f"`rank_pattern` must map module names to ranks, not {pattern!r}")
    for key, rank in pattern.items():
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(
                f"`rank_pattern` gives `{key}` the rank {rank!r}, not a positive integer"
            )
        ranks.append(rank)
    return max(ranks)


PLAIN_LORA_INITS = {"gaussian", "eva", "orthogonal", "mica", "lora_ga"}
"""String ``init_lora_weights`` values that leave a plain LoRA adapter (vLLM 0.32 accepts them);
PiSSA, OLoRA, CorDA, LoftQ and the like change the base weights, which vLLM cannot follow."""


def unsupported_features(adapter_config: dict[str, Any]) -> list[str]:
    """The LoRA variants in ``adapter_config`` that vLLM 0.32 refuses to load.

    Mirrors vLLM's own check (``PEFTHelper._validate_features``), which runs only after the
    model has loaded; finding them here saves minutes and names the field to change.
    """
    found = []
    extra = [
        m for m in adapter_config.get("modules_to_save") or [] if m not in ("classifier", "score")
    ]
    if extra:
        found.append(f"`modules_to_save: {extra}` (vLLM serves only the LoRA matrices)")
    for key, what in (
        ("use_dora", "DoRA"),
        ("lora_bias", "LoRA bias"),
        ("alora_invocation_tokens", "Activated LoRA"),
        ("layer_replication", "layer replication"),
        ("use_bdlora", "block-diagonal LoRA"),
        ("use_qalora", "QALoRA"),
    ):
        if adapter_config.get(key):
            found.append(f"`{key}` ({what})")
    init = adapter_config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in PLAIN_LORA_INITS:
        found.append(f"`init_lora_weights: {init}` (it changes the base weights)")
    # vLLM compares with "none" (PEFTHelper.validate_legal): an explicit null is refused too.
    bias = adapter_config.get("bias", "none")
    if bias != "none":
        found.append(f"`bias: {bias}` (trained biases; vLLM needs `bias: none`)")
    return found


def read_adapter(adapter: AdapterSource) -> AdapterInfo:
    """Reads one adapter folder; raises an :class:`AdapterRefused` (:class:`AdapterNotReady`
    while its files may still be being written)."""
    folder = Path(adapter.path)
    config_path = folder / ADAPTER_CONFIG
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterConfigMissing(adapter, f"{ADAPTER_CONFIG} not found") from None
    except (OSError, ValueError) as e:
        raise AdapterConfigMissing(adapter, f"{ADAPTER_CONFIG} is not readable JSON: {e}") from e
    if not isinstance(raw, dict):
        raise AdapterConfigMissing(adapter, f"{ADAPTER_CONFIG} is not a JSON object")

    peft_type = str(raw.get("peft_type") or "LORA").upper()
    if peft_type != "LORA":
        raise AdapterNotLora(
            adapter, f"PEFT type is {peft_type}; vLLM serves only LoRA adapters (`peft_type: LORA`)"
        )
    missing = [f"`{key}`" for key in REQUIRED_FIELDS if key not in raw]
    if missing:
        raise AdapterNotLora(
            adapter, f"{ADAPTER_CONFIG} lacks {', '.join(missing)}, which vLLM requires"
        )
    alpha = raw["lora_alpha"]
    if not isinstance(alpha, int | float):
        raise AdapterNotLora(
            adapter, f"{ADAPTER_CONFIG}: `lora_alpha` must be a number, not {alpha!r}"
        )
    unsupported = unsupported_features(raw)
    if unsupported:
        raise AdapterUnsupported(adapter, "uses what vLLM cannot serve: " + "; ".join(unsupported))
    try:
        rank = adapter_rank(raw)
    except ValueError as e:
        raise AdapterNotLora(adapter, f"{ADAPTER_CONFIG}: {e}") from e

    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        legacy = [name for name in LEGACY_WEIGHTS if (folder / name).is_file()]
        if not legacy:
            raise AdapterWeightsMissing(adapter, f"{ADAPTER_WEIGHTS} is missing")
        # vLLM loads pickled weights when there is no safetensors file. A pickle has no header
        # that gives its length, so whether it is completely written cannot be checked here.
        log.info(
            "adapter %s has only %s: vLLM loads it, but its completeness cannot be checked",
            adapter.name,
            legacy[0],
        )
    else:
        try:
            complete = safetensors_complete(weights)
        except ValueError as e:
            raise AdapterWeightsInvalid(adapter, str(e)) from e
        except OSError as e:
            raise AdapterWeightsMissing(adapter, f"{ADAPTER_WEIGHTS} is not readable: {e}") from e
        if not complete:
            raise AdapterWeightsIncomplete(
                adapter, f"{ADAPTER_WEIGHTS} is shorter than its header says (still being written?)"
            )
    base = raw.get("base_model_name_or_path")
    return AdapterInfo(
        name=adapter.name,
        path=adapter.path,
        rank=rank,
        base_model=str(base) if base else None,
        chat_template=trained_template(folder),
    )


def trained_template(folder: Path) -> str | None:
    """The adapter's ``chat_template.jinja``, unless its ``result.json`` says training used the
    base model's own template (then the file, if any, is a copy of what vLLM has already)."""
    path = folder / CHAT_TEMPLATE_FILE
    if not path.is_file():
        return None
    try:
        result = json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        result = None
    if isinstance(result, dict) and result.get("chatTemplate") == "model":
        return None
    return str(path)


# ------------------------------------------------------------------------------ checking


def _normalized(name: str) -> str:
    name = name.strip()
    if name.startswith(("/", "./", "../")):
        return os.path.realpath(name)
    return name.rstrip("/").casefold()


def same_base(adapter_base: str, config: ServeConfig) -> bool:
    """Whether an adapter trained on ``adapter_base`` fits the served base model.

    Folders are compared after resolving links; hub ids without regard to case (the hub
    treats them so) or a trailing slash.
    """
    known = {config.model, config.base_name, *config.base_model_aliases}
    return _normalized(adapter_base) in {_normalized(k) for k in known}


def check_adapter(info: AdapterInfo, config: ServeConfig) -> None:
    """Refuses an adapter whose rank or base model does not fit ``config``."""
    adapter = AdapterSource(name=info.name, path=info.path)
    limit = vllm_args.rank_limit(config)
    if info.rank > limit:
        where = (
            f"`maxLoraRank` is {config.max_lora_rank}, so the server accepts at most {limit}"
            if config.max_lora_rank is not None
            else f"vLLM supports at most {vllm_args.MAX_LORA_RANK}"
        )
        raise AdapterRankTooHigh(adapter, f"LoRA rank {info.rank} is too high: {where}")
    if info.base_model is None:
        log.warning(
            "adapter %s records no base_model_name_or_path; cannot check it fits %s",
            info.name,
            config.model,
        )
    elif not same_base(info.base_model, config):
        raise AdapterBaseModelMismatch(
            adapter,
            f"trained on base model `{info.base_model}`, but this server serves "
            f"`{config.model}`; serve it with its own base model (or list the base under "
            "`baseModelAliases` if both names are the same model)",
        )


def wait_for_adapter(
    adapter: AdapterSource,
    timeout: float,
    *,
    interval: float = 2.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> AdapterInfo:
    """Reads the adapter, waiting up to ``timeout`` seconds while its files are not complete."""
    deadline = clock() + timeout
    last_reason = ""
    while True:
        try:
            return read_adapter(adapter)
        except AdapterNotReady as e:
            if clock() >= deadline:
                raise
            if e.reason != last_reason:
                log.info("waiting for adapter %s: %s", adapter.name, e.reason)
                last_reason = e.reason
            sleep(min(interval, max(0.0, deadline - clock())))


def check_adapters(
    config: ServeConfig,
    *,
    wait: Callable[[AdapterSource, float], AdapterInfo] = wait_for_adapter,
) -> list[AdapterInfo]:
    """Waits for and checks every adapter of ``config``; the first refusal is raised."""
    infos: list[AdapterInfo] = []
    for adapter in config.adapters:
        info = wait(adapter, config.adapter_wait_seconds)
        check_adapter(info, config)
        infos.append(info)
    return infos


def has_chat_template(model: str) -> bool:
    """Whether the base model is a folder here with a chat template of its own.

    A hub id is taken to have none: an adapter carries the trainer's template only when the
    trainer found none in that very model.
    """
    folder = Path(model)
    if not folder.is_dir():
        return False
    if any((folder / name).is_file() for name in BASE_TEMPLATE_FILES):
        return True
    try:
        tokenizer = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(tokenizer, dict) and bool(tokenizer.get("chat_template"))


def _template_text(info: AdapterInfo) -> str:
    assert info.chat_template is not None
    try:
        return Path(info.chat_template).read_text(encoding="utf-8")
    except (OSError, ValueError) as e:
        raise AdapterChatTemplateConflict(
            AdapterSource(name=info.name, path=info.path),
            f"its chat template {info.chat_template} is not readable: {e}",
        ) from e


def chat_template(config: ServeConfig, infos: Sequence[AdapterInfo]) -> str | None:
    """The file vLLM should render prompts with (``--chat-template``), or None for the base
    model's own template.

    ``chatTemplate`` in the config wins. Otherwise, when an adapter carries the template it was
    trained with and the base model has none, that file; adapters that carry different ones
    are refused, since one server renders every prompt with one template.
    """
    if config.chat_template is not None:
        return config.chat_template
    carried = [i for i in infos if i.chat_template is not None]
    if not carried:
        return None
    first, text = carried[0], _template_text(carried[0])
    for other in carried[1:]:
        if _template_text(other) != text:
            raise AdapterChatTemplateConflict(
                AdapterSource(name=other.name, path=other.path),
                f"it was trained with the chat template {other.chat_template}, adapter "
                f"`{first.name}` with a different one ({first.chat_template}); vLLM renders "
                "every prompt with one template: serve them from separate servers, or set "
                "`chatTemplate`",
            )
    if has_chat_template(config.model):
        log.warning(
            "adapter %s carries the chat template it was trained with (%s), but the base model "
            "%s has a template of its own now; serving with the base model's",
            first.name,
            first.chat_template,
            config.model,
        )
        return None
    return first.chat_template


def ranks(infos: Sequence[AdapterInfo]) -> list[int]:
    return [i.rank for i in infos]
