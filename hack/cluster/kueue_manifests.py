"""Rewrites Kueue's CRDs and webhook configurations for a test cluster without a Service network.

    kubectl create --dry-run=client -o json -f <manifests> | python3 kueue_manifests.py MODE URL CA
    kubectl kustomize <webhook component> | kubectl create --dry-run=client -o json -f - |
      python3 kueue_manifests.py webhooks URL CA

MODE ``crds``: the multi-version Kueue CRDs get their conversion webhook at ``URL/convert``.
MODE ``webhooks``: only the webhook configurations, and in them only the webhooks of the
integrations kueue-up.sh turns on (Jobs, Pods, Deployments) and of Kueue's own kinds, each
called at ``URL`` + its path and trusted through the base64 ``CA``; names get a ``kueue-``
prefix. A webhook for an integration that is off would refuse every object it is asked about.
Reads a stream of JSON objects or Lists on stdin and writes one List; standard library only (run
by kueue-up.sh with the system python3).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

KEPT_RESOURCES = {("batch", "jobs"), ("", "pods"), ("apps", "deployments")}
"""(API group, resource) of the integrations kueue-up.sh enables."""
KUEUE_GROUP = "kueue.x-k8s.io"
WEBHOOK_KINDS = {"MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"}


def read_objects(text: str) -> Iterator[dict[str, Any]]:
    decoder = json.JSONDecoder()
    pos = 0
    while pos < len(text):
        if text[pos].isspace():
            pos += 1
            continue
        doc, pos = decoder.raw_decode(text, pos)
        yield from doc["items"] if doc.get("kind") == "List" else [doc]


def with_conversion(crd: dict[str, Any], base: str, ca: str) -> dict[str, Any]:
    spec = crd["spec"]
    if spec["group"] == "kueue.x-k8s.io" and len(spec["versions"]) > 1:
        spec["conversion"] = {
            "strategy": "Webhook",
            "webhook": {
                "clientConfig": {"url": base + "/convert", "caBundle": ca},
                "conversionReviewVersions": ["v1"],
            },
        }
    return crd


def kept(hook: dict[str, Any]) -> bool:
    return all(
        group == KUEUE_GROUP or (group, resource) in KEPT_RESOURCES
        for rule in hook["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    )


def by_url(config: dict[str, Any], base: str, ca: str) -> dict[str, Any] | None:
    if config.get("kind") not in WEBHOOK_KINDS:
        return None  # the webhook Service of the kustomization: called by URL here
    config["metadata"]["name"] = "kueue-" + config["metadata"]["name"]
    kept_hooks = []
    for hook in config["webhooks"]:
        if kept(hook):
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": base + path, "caBundle": ca}
            kept_hooks.append(hook)
    config["webhooks"] = kept_hooks
    return config


def main(argv: list[str]) -> None:
    mode, base, ca = argv
    rewrite = {"crds": with_conversion, "webhooks": by_url}[mode]
    rewritten = (rewrite(obj, base, ca) for obj in read_objects(sys.stdin.read()))
    items = [obj for obj in rewritten if obj is not None]
    json.dump({"apiVersion": "v1", "kind": "List", "items": items}, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
