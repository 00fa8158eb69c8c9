"""kopf indices of what the operator watches, and how one FineTuneJob's children are found in
them.

Handlers read children from these indices, never with a GET per tick, so hundreds of jobs cost
little. Each index is keyed by (namespace, job name) or (namespace, ModelServer name). The
children's watches carry a label selector (``handlers.configure`` sets it from
:data:`CHILD_RESOURCES`), so the API server sends only kubetune's own objects.
"""

from __future__ import annotations

import copy
from typing import Any

import kopf

from kubetune.api import finetunejob as ftj
from kubetune.api import modelserver as ms
from kubetune.operator import local_provider, manifests, model_server

MANAGED = {manifests.LABEL_MANAGED_BY: "kubetune"}
CHILD_RESOURCES = (
    ("batch", "v1", "jobs"),
    ("v1", "pods"),
    ("v1", "configmaps"),
    ("apps", "v1", "deployments"),
)
"""The kinds of the job's children the operator watches (the indices below), as kopf selectors."""
Key = tuple[str, str]
Indices = dict[str, kopf.Index[Key, Any]]
"""Every index, by its name, as kopf passes them to a handler."""


def _owner_key(namespace: str | None, labels: Any) -> Key:
    return (namespace or "", str(labels.get(manifests.LABEL_JOB, "")))


def _component(value: str) -> dict[str, str]:
    return {**MANAGED, manifests.LABEL_COMPONENT: value}


@kopf.index("batch", "v1", "jobs", labels=_component("trainer"))
def trainer_jobs(namespace: str | None, labels: Any, body: Any, **_: Any) -> dict[Key, Any]:
    return {_owner_key(namespace, labels): copy.deepcopy(dict(body))}


@kopf.index("v1", "pods", labels=_component("trainer"))
def trainer_pods(namespace: str | None, labels: Any, body: Any, **_: Any) -> dict[Key, Any]:
    return {_owner_key(namespace, labels): copy.deepcopy(dict(body))}


@kopf.index("v1", "configmaps", labels=_component("progress"))
def progress_maps(namespace: str | None, labels: Any, body: Any, **_: Any) -> dict[Key, Any]:
    return {_owner_key(namespace, labels): copy.deepcopy(dict(body))}


@kopf.index("apps", "v1", "deployments", labels=_component("server"))
def servers(namespace: str | None, labels: Any, body: Any, **_: Any) -> dict[Key, Any]:
    return {_owner_key(namespace, labels): copy.deepcopy(dict(body))}


@kopf.index("v1", "pods", labels=_component("server"))
def server_pods(namespace: str | None, labels: Any, body: Any, **_: Any) -> dict[Key, Any]:
    return {_owner_key(namespace, labels): copy.deepcopy(dict(body))}


def _server_key(namespace: str | None, labels: Any) -> Key:
    return (namespace or "", str(labels.get(manifests.LABEL_MODELSERVER, "")))


@kopf.index("apps", "v1", "deployments", labels=_component("modelserver"))
def model_server_deployments(
    namespace: str | None, labels: Any, body: Any, **_: Any
) -> dict[Key, Any]:
    return {_server_key(namespace, labels): copy.deepcopy(dict(body))}


@kopf.index("v1", "pods", labels=_component("modelserver"))
def model_server_pods(namespace: str | None, labels: Any, body: Any, **_: Any) -> dict[Key, Any]:
    return {_server_key(namespace, labels): copy.deepcopy(dict(body))}


@kopf.index(ftj.GROUP, ftj.VERSION, ms.PLURAL)
def model_servers(namespace: str | None, name: str, body: Any, **_: Any) -> dict[Key, Any]:
    return {(namespace or "", name): copy.deepcopy(dict(body))}


def _names_a_server(spec: kopf.Spec, **_: Any) -> bool:
    return bool((spec.get("serve") or {}).get("server"))


@kopf.index(ftj.GROUP, ftj.VERSION, ftj.PLURAL, when=_names_a_server)
def served_jobs(
    namespace: str | None, spec: kopf.Spec, body: Any, **_: Any
) -> dict[Key, model_server.Member]:
    """FineTuneJobs by the ModelServer they name (a filter, so a job that stops naming one
    leaves the index)."""
    server = str(spec["serve"]["server"])
    return {(namespace or "", server): model_server.member(dict(body))}


def owned(items: Any, uid: str | None) -> list[dict[str, Any]]:
    """The objects whose owner references name ``uid``.

    Indices are keyed by namespace and job name; a job deleted and created again under the same
    name can leave the old one's children there until the garbage collector removes them.
    """
    return [
        obj
        for obj in items
        if any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])
    ]


def one(index: kopf.Index[Key, Any], key: Key, uid: str | None) -> dict[str, Any] | None:
    items = owned(index.get(key, []), uid)
    return items[-1] if items else None


def children(
    indices: Indices, key: Key, uid: str, server: str | None = None
) -> local_provider.Children:
    job = one(indices["trainer_jobs"], key, uid)
    servers = list(indices["model_servers"].get((key[0], server), [])) if server else []
    return local_provider.Children(
        job=job,
        pods=owned(
            indices["trainer_pods"].get(key, []), (job or {}).get("metadata", {}).get("uid")
        ),
        progress=one(indices["progress_maps"], key, uid),
        deployment=one(indices["servers"], key, uid),
        # Owned by a ReplicaSet, not the job: a job deleted and made again under the same name
        # may show the old one's pods here until they are gone (they only explain a wait).
        server_pods=list(indices["server_pods"].get(key, [])),
        model_server=servers[-1] if servers else None,
    )
