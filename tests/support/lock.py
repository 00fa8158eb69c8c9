"""The Python lock, ``hack/requirements/constraints.txt``: every package the test venv and the
images hold, at the version CI last passed with (``hack/requirements/lock.sh`` renews it)."""

from __future__ import annotations

import re
from pathlib import Path

from packaging.utils import canonicalize_name

REQUIREMENTS = Path(__file__).resolve().parents[2] / "hack" / "requirements"
LOCK_FILE = REQUIREMENTS / "constraints.txt"


def pins(text: str) -> dict[str, str]:
    """``name==version`` lines (``pip freeze`` output, a requirements file) by canonical name."""
    found = {}
    for line in text.splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if match:
            found[canonicalize_name(match[1])] = match[2]
    return found


def locked() -> dict[str, str]:
    return pins(LOCK_FILE.read_text())
