"""Regenerates the README's benchmark table from bench/results/*.json.

Each benchmark script writes its own JSON; this reads the headline figures of each and puts them
between the ``<!-- BENCH -->`` markers of README.md, so the table always shows the latest run.

    python bench/report.py
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
START, END = "<!-- BENCH:START -->", "<!-- BENCH:END -->"


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, v in enumerate(value):
            label = v.get("n", v.get("name", i))
            _flatten(f"{prefix}[{label}]", v, out)
    elif isinstance(value, int | float | str | bool) or value is None:
        out[prefix] = value


HEADLINES = re.compile(
    r"(ratio|per_s|per_second|tokens_s|lines_s|p50|p99|median|cold_start|seconds|_s$|rss|mfu|"
    r"speedup|device|machine|card)",
    re.IGNORECASE,
)


def rows() -> list[str]:
    out = ["| benchmark | figure | value |", "|---|---|---|"]
    for path in sorted(RESULTS.glob("*.json")):
        flat: dict[str, Any] = {}
        _flatten("", json.loads(path.read_text()), flat)
        for key, value in flat.items():
            if HEADLINES.search(key) and value is not None:
                shown = f"{value:.3g}" if isinstance(value, float) else str(value)
                out.append(f"| `{path.stem}` | `{key}` | {shown} |")
    return out


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    if START not in text or END not in text:
        print(f"README.md has no {START} ... {END} markers", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    table = "\n".join(rows())
    readme.write_text(f"{head}{START}\n{table}\n{END}{tail}", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
