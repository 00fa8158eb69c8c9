"""bench/report.py renders every results file in bench/results/ as a table for the README."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def load_report() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_report", REPO / "bench" / "report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_results_file_renders_with_its_headline_figures() -> None:
    report = load_report()
    text = report.render()
    for path in sorted((REPO / "bench" / "results").glob("*.json")):
        assert path.stem in report.RENDERERS, f"{path.name} has no table in bench/report.py"
        assert f"bench/{path.stem}.py" in text
    doc = json.loads((REPO / "bench" / "results" / "trainer_throughput.json").read_text())
    for result in doc["results"]:
        assert f"`{result['name']}`" in text
        assert f"**{result['speedup_cpu']}×**" in text


def test_an_unknown_results_file_is_listed_figure_by_figure(tmp_path: Path) -> None:
    report = load_report()
    (tmp_path / "new_bench.json").write_text(json.dumps({"a": {"b": 1.5}, "note": "x"}))
    text = report.render(tmp_path)
    assert "| `a.b` | 1.5 |" in text and "note" not in text


def test_the_readme_shows_the_latest_results() -> None:
    report = load_report()
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    shown = readme.split(report.START, 1)[1].split(report.END, 1)[0]
    assert shown.strip() == report.render().strip(), "run `python bench/report.py`"
