"""The GPU check's wheels (hack/device/requirements.txt) pin what the test venv pins."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if match:
            found[match[1].lower().replace("_", "-")] = match[2]
    return found


def test_device_wheels_match_the_test_pins() -> None:
    device = pins(ROOT / "hack" / "device" / "requirements.txt")
    tested = pins(ROOT / "hack" / "requirements" / "base.txt")
    shared = device.keys() & tested.keys()
    assert {"transformers", "peft", "pydantic", "tokenizers", "pytest"} <= shared
    assert {name: device[name] for name in shared} == {name: tested[name] for name in shared}
    assert "bitsandbytes" in device  # QLoRA, which only a GPU can run
