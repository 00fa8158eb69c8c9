"""Fake adapter folders for the server's unit tests: real file formats, no torch.

``make_adapter(name, rank=8, base=BASE, weights=True, truncate=0, config=True, **extra)``
writes ``adapter_config.json`` as PEFT does and an ``adapter_model.safetensors`` with a valid
header and zero-filled data (``truncate`` bytes short of complete, to look half-written).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

BASE = "/models/tiny-llama"

MakeAdapter = Callable[..., Path]


def write_safetensors(path: Path, shapes: Mapping[str, tuple[int, ...]], truncate: int = 0) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = 4
        for d in shape:
            size *= d
        header[name] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header).encode()
    data = struct.pack("<Q", len(blob)) + blob + bytes(offset)
    path.write_bytes(data[: len(data) - truncate] if truncate else data)


@pytest.fixture
def make_adapter(tmp_path: Path) -> MakeAdapter:
    def make(
        name: str = "daoyan",
        *,
        rank: int = 8,
        base: str | None = BASE,
        weights: bool = True,
        truncate: int = 0,
        config: bool = True,
        **extra: Any,
    ) -> Path:
        folder = tmp_path / name
        folder.mkdir(parents=True, exist_ok=True)
        if config:
            doc: dict[str, Any] = {
                "peft_type": "LORA",
                "r": rank,
                "lora_alpha": 2 * rank,
                "target_modules": ["q_proj", "v_proj"],
                "base_model_name_or_path": base,
                **extra,
            }
            (folder / "adapter_config.json").write_text(json.dumps(doc), encoding="utf-8")
        if weights:
            shapes = {
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (rank, 128),
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": (128, rank),
            }
            write_safetensors(folder / "adapter_model.safetensors", shapes, truncate)
        return folder

    return make
