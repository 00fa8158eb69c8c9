"""The only module of the operator that talks to the Kubernetes API server.

Everything is plain dicts in and out, through the dynamic client, so the builders stay pure.
Errors from the API are classified here, once:

    ApiException 404            -> NotFound (reads return None, deletes succeed, a patch waits)
    ApiException 409 on delete  -> a uid precondition failed: that object is gone already
    kind not served (discovery) -> NotServed (its CRD is not installed, e.g. no Kueue)
    ApiException 409 on create  -> adopt the existing object if we own it, else NameTaken
    ApiException 400/403/422    -> PermanentKubeError (retrying cannot help)
    ApiException 403 quota      -> TemporaryKubeError (a full ResourceQuota frees up)
    ApiException 429/5xx, I/O   -> TemporaryKubeError (kopf retries after a delay)

Secrets are read with ``get`` (their values stay with the caller: never logged or put into an
exception message).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes import dynamic
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic.exceptions import ResourceNotFoundError

log = logging.getLogger(__name__)


class KubeError(Exception):
    """Base of the API-server errors this module raises."""


class PermanentKubeError(KubeError):
    """The API server refused the request; retrying the same request cannot succeed."""


class TemporaryKubeError(KubeError):
    """The API server was busy or unreachable; try again later."""

    def __init__(self, message: str, delay: float = 5.0) -> None:
        super().__init__(message)
        self.delay = delay


class NotFound(PermanentKubeError):
    """The object does not exist (any more)."""


class NotServed(PermanentKubeError):
    """The API server serves no such kind at that version (its CRD is not installed)."""


class Conflict(PermanentKubeError):
    """409: the object changed or was replaced meanwhile (a failed precondition)."""


class NameTaken(PermanentKubeError):
    """A child's deterministic name is used by an object this FineTuneJob does not own."""


def _classify(exc: ApiException, what: str) -> KubeError:
    status = exc.status or 0
    reason = exc.reason or ""
    if status == 429 or status >= 500 or status == 0:
        retry_after = (exc.headers or {}).get("Retry-After") if exc.headers else None
        delay = float(retry_after) if retry_after and str(retry_after).isdigit() else 5.0
        return TemporaryKubeError(f"{what}: API server answered {status} {reason}", delay)
    body = str(exc.body or "")[:500]
    if status == 403 and "exceeded quota" in body:
        # A ResourceQuota is full: other jobs finishing frees it, so this is a wait.
        return TemporaryKubeError(f"{what}: {QUOTA_HINT}: {body}", delay=60.0)
    kind = {404: NotFound, 409: Conflict}.get(status, PermanentKubeError)
    return kind(f"{what}: API server answered {status} {reason}: {body}")


QUOTA_HINT = "the namespace's ResourceQuota is used up; retrying every minute"


@functools.cache
def _client() -> dynamic.DynamicClient:
    try:
        k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()  # type: ignore[no-untyped-call]
    return dynamic.DynamicClient(k8s_client.ApiClient())  # type: ignore[no-untyped-call]


@functools.cache
def _discover(api_version: str, kind: str) -> Any:
    return _client().resources.get(api_version=api_version, kind=kind)


def _resource(api_version: str, kind: str) -> Any:
    """The dynamic client's resource; discovery errors are classified like any other call."""
    try:
        return _call(f"discover {kind} {api_version}", _discover, api_version, kind)
    except ResourceNotFoundError:
        raise NotServed(f"the API server does not serve {kind} {api_version}") from None


def _call(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except ApiException as exc:
        raise _classify(exc, what) from None
    except (OSError, ConnectionError) as exc:
        raise TemporaryKubeError(f"{what}: {type(exc).__name__}") from None


def get(api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        obj = _call(
            f"get {kind} {namespace}/{name}",
            _resource(api_version, kind).get,
            name=name,
            namespace=namespace,
        )
    except NotFound:
        return None
    return dict(obj.to_dict())


def list_objects(
    api_version: str,
    kind: str,
    namespace: str,
    label_selector: str = "",
    field_selector: str = "",
) -> list[dict[str, Any]]:
    res = _call(
        f"list {kind} in {namespace}",
        _resource(api_version, kind).get,
        namespace=namespace,
        label_selector=label_selector or None,
        field_selector=field_selector or None,
    )
    return [dict(item) for item in res.to_dict().get("items", [])]


def create_or_adopt(obj: dict[str, Any]) -> dict[str, Any]:
    """Creates ``obj``; if it exists already and we own it, returns the existing one.

    This is what makes restarts safe: names are deterministic, so a second attempt finds the
    first one's object instead of making a duplicate.
    """
    meta = obj["metadata"]
    what = f"create {obj['kind']} {meta['namespace']}/{meta['name']}"
    resource = _resource(obj["apiVersion"], obj["kind"])
    try:
        return dict(resource.create(body=obj, namespace=meta["namespace"]).to_dict())
    except ApiException as exc:
        if exc.status != 409:
            raise _classify(exc, what) from None
    existing = get(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
    if existing is None:  # deleted between the two calls; the next reconcile creates it
        raise TemporaryKubeError(f"{what}: conflict, then gone", delay=1.0)
    _check_ours(obj, existing)
    return existing


def _check_ours(obj: dict[str, Any], existing: dict[str, Any]) -> None:
    """Raises unless ``existing`` (same kind and name as ``obj``) has ``obj``'s owner.

    An object that is being deleted (a FineTuneJob deleted and created again under the same
    name, before the garbage collector removed the old one's children) is waited for.
    """
    meta = obj["metadata"]
    name = f"{obj['kind']} {meta['namespace']}/{meta['name']}"
    want = {r["uid"] for r in meta.get("ownerReferences", [])}
    have = {r["uid"] for r in existing["metadata"].get("ownerReferences") or []}
    if not want or want & have:
        return
    if existing["metadata"].get("deletionTimestamp"):
        raise TemporaryKubeError(f"{name} of an earlier object is being deleted", delay=5.0)
    owner = next((r.get("kind") for r in meta.get("ownerReferences", [])), None) or "owner"
    raise NameTaken(
        f"{name} already exists and belongs to something else; "
        f"rename the {owner} or remove that object"
    )


FIELD_MANAGER = "kubetune"


def apply(obj: dict[str, Any]) -> dict[str, Any]:
    """Server-side apply of one of our objects: creates it, or makes its fields ``obj``'s.

    Fields the operator set before and no longer sets are removed; fields other managers set
    (an HPA's replicas, say, where ``obj`` has none) stay. An object of that name that is not
    ours is refused (NameTaken), never taken over.
    """
    meta = obj["metadata"]
    existing = get(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
    if existing is not None:
        _check_ours(obj, existing)
    res = _call(
        f"apply {obj['kind']} {meta['namespace']}/{meta['name']}",
        _resource(obj["apiVersion"], obj["kind"]).server_side_apply,
        body=obj,
        namespace=meta["namespace"],
        field_manager=FIELD_MANAGER,
        force_conflicts=True,
    )
    return dict(res.to_dict())


def patch_merge(
    api_version: str, kind: str, namespace: str, name: str, body: dict[str, Any]
) -> dict[str, Any]:
    """A JSON merge patch. An object gone since it was seen is a wait: the next reconcile
    sees it missing and creates it again."""
    what = f"patch {kind} {namespace}/{name}"
    try:
        res = _call(
            what,
            _resource(api_version, kind).patch,
            name=name,
            namespace=namespace,
            body=body,
            content_type="application/merge-patch+json",
        )
    except NotFound:
        raise TemporaryKubeError(f"{what}: not found (deleted meanwhile?)", delay=1.0) from None
    return dict(res.to_dict())


def delete(
    api_version: str,
    kind: str,
    namespace: str,
    name: str,
    *,
    foreground: bool = False,
    uid: str | None = None,
) -> None:
    """Deletes an object; with ``foreground`` it stays (being deleted) until its dependents
    (a Job's pods, after their grace period) are gone. With ``uid`` only that very object is
    deleted, not one made again under its name since (the API answers that with 409)."""
    body: dict[str, Any] = {"propagationPolicy": "Foreground" if foreground else "Background"}
    if uid is not None:
        body["preconditions"] = {"uid": uid}
    gone = (NotFound, Conflict) if uid is not None else (NotFound,)
    with contextlib.suppress(*gone):  # gone already: what a delete wants
        _call(
            f"delete {kind} {namespace}/{name}",
            _resource(api_version, kind).delete,
            name=name,
            namespace=namespace,
            body=body,
        )


def read_configmap_key(namespace: str, name: str, key: str) -> str | None:
    """The value of one key, or None if the ConfigMap or the key is missing."""
    cm = get("v1", "ConfigMap", namespace, name)
    if cm is None:
        return None
    value = (cm.get("data") or {}).get(key)
    return None if value is None else str(value)
