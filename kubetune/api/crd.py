"""Generates the FineTuneJob and ModelServer CustomResourceDefinitions from the pydantic models.

pydantic emits JSON Schema; Kubernetes wants a *structural* OpenAPI v3 schema. This module
converts one into the other: ``$ref`` inlined, ``Optional`` unwrapped, ``title`` dropped,
int-or-"auto" kept as ``x-kubernetes-int-or-string``, every string and list bounded (the API
server refuses CEL rules whose estimated cost is unbounded), and the CEL rules of
``finetunejob.CEL_RULES`` (and ``modelserver.CEL_RULES``) attached. Run
``python -m kubetune.api.crd`` (``make crds``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kubetune.api import finetunejob as ftj
from kubetune.api import jobstatus
from kubetune.api import modelserver as ms

DEFAULT_MAX_LENGTH = 4096
DEFAULT_MAX_ITEMS = 64
DEFAULT_MAX_PROPERTIES = 64
_DROP = {"title", "discriminator"}
Rules = dict[str, list[dict[str, str]]]


def _structural(
    node: dict[str, Any], defs: dict[str, Any], name: str | None, rules: Rules
) -> dict[str, Any]:
    if "$ref" in node:
        ref = node["$ref"].rsplit("/", 1)[-1]
        inner = _structural(defs[ref], defs, ref, rules)
        return {**inner, **{k: v for k, v in node.items() if k not in ("$ref", *_DROP)}}
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express a union in a structural schema: {node}")
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        return {
            **_structural(options[0], defs, name, rules),
            **_structural(rest, defs, None, rules),
        }
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or key == "$defs" or (key == "additionalProperties" and value is False):
            continue  # `extra="forbid"` is pydantic's job; the API server prunes unknown fields
        if key == "properties":
            out[key] = {p: _structural(v, defs, None, rules) for p, v in value.items()}
        elif key == "items" or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = _structural(value, defs, None, rules)
        elif key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            # JSON Schema 2020 gives the bound; OpenAPI v3.0 wants the bound plus a flag.
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        else:
            out[key] = value
    if "default" in out and (out["default"] is None or isinstance(out["default"], dict | list)):
        del out["default"]  # None/nested defaults: pydantic applies them
    kind = out.get("type")
    if kind == "string" and "enum" not in out:
        out.setdefault("maxLength", DEFAULT_MAX_LENGTH)
    if kind == "array":
        out.setdefault("maxItems", DEFAULT_MAX_ITEMS)
    if kind == "object" and "additionalProperties" in out:
        out.setdefault("maxProperties", DEFAULT_MAX_PROPERTIES)
    if name in rules:
        out.setdefault("x-kubernetes-validations", []).extend(rules[name])
    return out


def openapi_schema(model: type[Any], rules: Rules | None = None) -> dict[str, Any]:
    """The structural schema of one pydantic model, in camelCase wire form."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(
        raw, raw.get("$defs", {}), model.__name__, ftj.CEL_RULES if rules is None else rules
    )


@dataclass(frozen=True)
class Resource:
    """One custom resource kind and the models it is generated from."""

    kind: str
    plural: str
    short_name: str
    description: str
    spec: type[Any]
    status: type[Any]
    rules: Rules
    root_rules: list[dict[str, str]]
    columns: list[dict[str, Any]]
    source: str

    @property
    def file(self) -> str:
        return f"{self.kind.lower()}.yaml"

    @property
    def targets(self) -> tuple[str, str]:
        return (f"crds/{self.file}", f"charts/kubetune/crds/{self.file}")


_SHARED_RULES = {k: ftj.CEL_RULES[k] for k in ("ModelRef", "PVCPath")}
"""Rules of the models both kinds use."""

FINETUNEJOB = Resource(
    kind=ftj.KIND,
    plural=ftj.PLURAL,
    short_name="ftj",
    description="A fine-tuning job: LoRA on the GPU pool, or OpenAI's fine-tuning API.",
    spec=ftj.FineTuneJobSpec,
    status=jobstatus.FineTuneJobStatus,
    rules=ftj.CEL_RULES,
    root_rules=[*ftj.NAME_RULES, ftj.immutability_rule()],
    columns=ftj.PRINTER_COLUMNS,
    source="kubetune/api/finetunejob.py, openai_spec.py and jobstatus.py",
)
MODELSERVER = Resource(
    kind=ms.KIND,
    plural=ms.PLURAL,
    short_name="ms",
    description="One vLLM server for a base model, serving the adapters of the FineTuneJobs "
    "that name it in `spec.serve.server`.",
    spec=ms.ModelServerSpec,
    status=ms.ModelServerStatus,
    rules={**_SHARED_RULES, **ms.CEL_RULES},
    root_rules=ms.NAME_RULES,
    columns=ms.PRINTER_COLUMNS,
    source="kubetune/api/modelserver.py",
)
RESOURCES = (FINETUNEJOB, MODELSERVER)


def crd(resource: Resource = FINETUNEJOB) -> dict[str, Any]:
    spec = openapi_schema(resource.spec, resource.rules)
    spec.setdefault("x-kubernetes-validations", []).extend(resource.rules.get("spec", []))
    if not spec["x-kubernetes-validations"]:
        del spec["x-kubernetes-validations"]
    status = openapi_schema(resource.status, resource.rules)
    status.pop("required", None)  # the operator fills status in over time
    root = {
        "type": "object",
        "description": resource.description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": resource.root_rules,
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{resource.plural}.{ftj.GROUP}"},
        "spec": {
            "group": ftj.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": resource.kind,
                "listKind": f"{resource.kind}List",
                "plural": resource.plural,
                "singular": resource.kind.lower(),
                "shortNames": [resource.short_name],
                "categories": ["kubetune"],
            },
            "versions": [
                {
                    "name": ftj.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": resource.columns,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def render(resource: Resource = FINETUNEJOB) -> str:
    header = f"# Generated by `make crds` from {resource.source}. Do not edit.\n"
    return header + yaml.safe_dump(crd(resource), sort_keys=False, allow_unicode=True, width=100)


def main(argv: list[str] | None = None) -> int:
    root = Path(argv[0]) if argv else Path.cwd()
    for resource in RESOURCES:
        text = render(resource)
        for target in resource.targets:
            path = root / target
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
