"""The committed CRD is exactly what the model generates, and it is structural."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api import crd, reference
from kubetune.api import modelserver as ms

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("resource", crd.RESOURCES, ids=lambda r: r.kind)
def test_committed_crds_match_the_model(resource: crd.Resource) -> None:
    expected = crd.render(resource)
    for target in resource.targets:
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


@pytest.mark.parametrize("resource", crd.RESOURCES, ids=lambda r: r.kind)
def test_schema_is_structural(resource: crd.Resource) -> None:
    schema = crd.crd(resource)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
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
    assert "# `kubetune.io/v1alpha1` `ModelServer` (short name `ms`)" in actual
    assert "| `spec.maxLoras` | integer |" in actual


def test_model_server_crd_names_and_columns() -> None:
    out = crd.crd(crd.MODELSERVER)
    assert out["metadata"]["name"] == "modelservers.kubetune.io"
    assert out["spec"]["names"]["shortNames"] == ["ms"]
    cols = [c["name"] for c in out["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert cols == ["Model", "Ready", "Adapters", "Endpoint", "Age", "Updates"]
    spec = out["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["required"] == ["model"]
    assert [r["message"] for r in spec["x-kubernetes-validations"]] == [ms.GPUS_MESSAGE]
