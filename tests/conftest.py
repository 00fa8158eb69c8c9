"""Fixtures shared by the tiers that train and serve the demo job (e2e, pods).

- ``demo_model`` (session): the tiny Llama of the demo job, built by
  :func:`kubetune.demo_model.build_demo_model` from the Daoist dataset (seconds).
"""

from __future__ import annotations

from pathlib import Path

import pytest

DATASET = Path(__file__).resolve().parents[1] / "examples" / "data" / "daoyan.jsonl"


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kubetune.demo_model import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("models") / "demo-tiny", DATASET)
