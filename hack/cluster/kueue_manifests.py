"""Rewrites Kueue's CRDs and webhook configurations for a test cluster without a Service network.

    kubectl create --dry-run=client -o json -f <manifests> | python3 kueue_manifests.py MODE URL CA

MODE ``crds``: the multi-version Kueue CRDs get their conversion webhook at ``URL/convert``.
MODE ``webhooks``: only the webhooks for Jobs and Kueue's own kinds are kept, each called at
``URL`` + its path and trusted through the base64 ``CA``; names get a ``kueue-`` prefix.
Reads a stream of JSON objects or Lists on stdin and writes one List; standard library only (run
by kueue-up.sh with the system python3).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

KEPT_GROUPS = {"batch", "kueue.x-k8s.io"}


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


def by_url(config: dict[str, Any], base: str, ca: str) -> dict[str, Any]:
    config["metadata"]["name"] = "kueue-" + config["metadata"]["name"]
    kept = []
    for hook in config["webhooks"]:
        groups = {g for rule in hook["rules"] for g in rule["apiGroups"]}
        if groups <= KEPT_GROUPS:
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": base + path, "caBundle": ca}
            kept.append(hook)
    config["webhooks"] = kept
    return config


def main(argv: list[str]) -> None:
    mode, base, ca = argv
    rewrite = {"crds": with_conversion, "webhooks": by_url}[mode]
    items = [rewrite(obj, base, ca) for obj in read_objects(sys.stdin.read())]
    json.dump({"apiVersion": "v1", "kind": "List", "items": items}, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
