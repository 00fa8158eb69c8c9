"""Component boundaries (ARCHITECTURE.md): checked on the source, not by convention.

- the operator imports no torch/transformers/vllm/peft/trl;
- the trainer and the server import no kopf and no kubernetes client;
- kubetune.api imports only pydantic (and yaml), plus itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = {"torch", "transformers", "vllm", "peft", "trl", "accelerate", "bitsandbytes"}
CLUSTER = {"kopf", "kubernetes", "kubernetes_asyncio"}


def imported_roots(folder: Path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in folder.rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        out[str(path.relative_to(ROOT))] = names
    return out


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [("operator", HEAVY), ("trainer", CLUSTER), ("server", CLUSTER)],
)
def test_component_does_not_import(folder: str, forbidden: set[str]) -> None:
    bad = {
        f: sorted(n for n in names if n.split(".")[0] in forbidden)
        for f, names in imported_roots(ROOT / folder).items()
    }
    assert {f: n for f, n in bad.items() if n} == {}


def test_api_imports_only_pydantic_and_yaml() -> None:
    allowed = {"pydantic", "yaml", "kubetune", "__future__"}
    stdlib = {"typing", "enum", "pathlib", "sys", "hashlib", "json", "dataclasses", "datetime"}
    for f, names in imported_roots(ROOT / "kubetune" / "api").items():
        roots = {n.split(".")[0] for n in names}
        extra = roots - allowed - stdlib
        assert not extra, f"{f} imports {extra}"
        assert not {
            n for n in names if n.startswith("kubetune.") and not n.startswith("kubetune.api")
        }, f


def test_every_package_folder_is_listed_in_pyproject() -> None:
    import tomllib

    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(conf["packages"])
    dirs = {v: k for k, v in conf["package-dir"].items()}
    found = set()
    for top, name in dirs.items():
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *rel)))
    assert found == listed
