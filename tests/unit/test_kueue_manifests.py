"""Kueue's webhooks for the test cluster (hack/cluster/kueue_manifests.py): only those of the
integrations kueue-up.sh turns on, each called by URL."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "hack" / "cluster" / "kueue_manifests.py"
URL = "https://127.0.0.1:9443"
NOT_SYSTEM = {
    "matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system"]}
    ]
}


def hook(name: str, group: str, resource: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "clientConfig": {"service": {"name": "webhook-service", "path": f"/mutate-{resource}"}},
        "rules": [{"apiGroups": [group], "resources": [resource], "apiVersions": ["v1"]}],
        **extra,
    }


def rewrite(mode: str, *objects: dict[str, Any]) -> list[dict[str, Any]]:
    stream = json.dumps({"kind": "List", "items": list(objects)})
    out = subprocess.run(
        [sys.executable, str(SCRIPT), mode, URL, "Q0E="],
        input=stream,
        capture_output=True,
        text=True,
        check=True,
    )
    items: list[dict[str, Any]] = json.loads(out.stdout)["items"]
    return items


def test_only_the_enabled_integrations_webhooks_are_kept_and_called_by_url() -> None:
    config = {
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "mutating-webhook-configuration"},
        "webhooks": [
            hook("mjob.kb.io", "batch", "jobs"),
            hook("mpod.kb.io", "", "pods", namespaceSelector=NOT_SYSTEM),
            hook("mdeployment.kb.io", "apps", "deployments"),
            hook("mstatefulset.kb.io", "apps", "statefulsets"),  # integration off
            hook("mpytorchjob.kb.io", "kubeflow.org", "pytorchjobs"),  # integration off
            hook("mworkload.kb.io", "kueue.x-k8s.io", "workloads"),
        ],
    }
    service = {"kind": "Service", "metadata": {"name": "webhook-service"}}
    [out] = rewrite("webhooks", service, config)
    assert out["metadata"]["name"] == "kueue-mutating-webhook-configuration"
    kept = {h["name"]: h for h in out["webhooks"]}
    assert sorted(kept) == ["mdeployment.kb.io", "mjob.kb.io", "mpod.kb.io", "mworkload.kb.io"]
    assert kept["mpod.kb.io"]["clientConfig"] == {"url": f"{URL}/mutate-pods", "caBundle": "Q0E="}
    assert kept["mpod.kb.io"]["namespaceSelector"] == NOT_SYSTEM


def test_multi_version_crds_convert_through_the_webhook_url() -> None:
    crd = {
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "workloads.kueue.x-k8s.io"},
        "spec": {"group": "kueue.x-k8s.io", "versions": [{"name": "v1beta1"}, {"name": "v1beta2"}]},
    }
    [out] = rewrite("crds", crd)
    client = out["spec"]["conversion"]["webhook"]["clientConfig"]
    assert client == {"url": f"{URL}/convert", "caBundle": "Q0E="}
