"""The shared tiny model: deterministic, idempotent, and shaped for vLLM's CPU attention."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from kubetune import demo_model

DATASET = demo_model.DEFAULT_DATASET


def digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.name != demo_model.MARKER
    }


def test_shape_and_files(demo_model_dir: Path) -> None:
    config = json.loads((demo_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["head_dim"] == 64 == config["hidden_size"] // config["num_attention_heads"]
    assert config["max_position_embeddings"] >= 1024
    assert 500 <= config["vocab_size"] <= 4096
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (demo_model_dir / name).is_file()
    template = (demo_model_dir / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template and "add_generation_prompt" in template


def test_same_seed_same_bytes_and_rebuild_is_skipped(demo_model_dir: Path, tmp_path: Path) -> None:
    again = demo_model.build_demo_model(tmp_path / "again", DATASET)
    assert digest(again) == digest(demo_model_dir)
    written = {p.name: p.stat().st_mtime_ns for p in again.iterdir()}
    demo_model.build_demo_model(tmp_path / "again", DATASET)  # complete: nothing is rewritten
    assert {p.name: p.stat().st_mtime_ns for p in again.iterdir()} == written


def test_another_seed_gives_other_weights(demo_model_dir: Path, tmp_path: Path) -> None:
    other = demo_model.build_demo_model(tmp_path / "other", DATASET, seed=1)
    assert digest(other)["model.safetensors"] != digest(demo_model_dir)["model.safetensors"]
    assert digest(other)["tokenizer.json"] == digest(demo_model_dir)["tokenizer.json"]


def test_a_folder_that_is_not_a_demo_model_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        demo_model.build_demo_model(tmp_path / "mine", DATASET)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
