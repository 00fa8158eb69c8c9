"""Shared fixtures of the trainer's unit tests: the tiny demo model and its tokenizer.

Built once per session (a few seconds); tests that only need the tokenizer share it too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]
DATASET = REPO / "examples" / "data" / "daoyan.jsonl"


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kubetune.demo_model import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("models") / "demo-tiny", DATASET)


@pytest.fixture(scope="session")
def tokenizer(demo_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_dir)


@pytest.fixture(scope="session")
def daoyan_lines() -> list[dict[str, Any]]:
    return [json.loads(line) for line in DATASET.read_text(encoding="utf-8").splitlines()]
