"""Small builders shared by the dataset doctor's tests (imported by name: pytest puts this
folder on ``sys.path``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def chat(*turns: tuple[str, str], **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": r, "content": c} for r, c in turns], **extra}


def clean_example(i: int) -> dict[str, Any]:
    return chat(
        ("system", "You answer briefly."),
        ("user", f"question {i}"),
        ("assistant", f"answer {i}"),
    )


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    with path.open("wb") as f:
        for line in lines:
            if isinstance(line, bytes):
                f.write(line + b"\n")
            else:
                f.write(json.dumps(line, ensure_ascii=False).encode() + b"\n")
    return path
