"""The committed CRD is exactly what the model generates, and it is structural."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kubetune.api import crd, reference

ROOT = Path(__file__).resolve().parents[3]


def test_committed_crds_match_the_model() -> None:
    expected = crd.render()
    for target in crd.TARGETS:
        actual = (ROOT / target).read_text(encoding="utf-8")
        assert actual == expected, f"{target} drifted from kubetune/api; run `make crds`"


def _walk(node: Any, path: str = "") -> list[str]:
    """Paths that break the structural-schema rules Kubernetes enforces."""
    bad: list[str] = []
    if isinstance(node, dict):
        for key in ("anyOf", "oneOf", "allOf", "$ref", "const", "title"):
            if key in node and not path.endswith(".properties"):
                bad.append(f"{path}.{key}")
        if node.get("additionalProperties") is False:
            bad.append(f"{path}.additionalProperties")
        if (
            "type" not in node
            and "x-kubernetes-int-or-string" not in node
            and not path.endswith(".properties")
        ):
            bad.append(f"{path} has no type")
        for key, value in node.items():
            if key in ("x-kubernetes-validations", "enum", "required", "default"):
                continue
            bad += _walk(value, f"{path}.{key}")
    return bad


def test_schema_is_structural() -> None:
    schema = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert _walk(schema["properties"]["spec"], "spec") == []
    assert _walk(schema["properties"]["status"], "status") == []


def test_field_descriptions_reach_kubectl_explain() -> None:
    text = yaml.safe_load(crd.render())
    lora = text["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]["lora"]["properties"]
    assert lora["r"]["description"] == "LoRA rank."
    assert lora["targetModules"]["maxItems"] == 32


def test_printer_columns() -> None:
    cols = [c["name"] for c in crd.crd()["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert cols == ["Phase", "Provider", "Model", "Progress", "Loss", "Endpoint", "Age", "Serving"]


def test_committed_api_reference_matches_the_model() -> None:
    actual = (ROOT / reference.TARGET).read_text(encoding="utf-8")
    assert actual == reference.render(), "docs/api-reference.md drifted; run `make crds`"
    assert "| `spec.lora.r` | integer | LoRA rank. Default: `16`. |" in actual
