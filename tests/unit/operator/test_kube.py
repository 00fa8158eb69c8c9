"""How the API server's refusals are classified: wait and retry, or fail for good."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic.exceptions import ResourceNotFoundError

from kubetune.operator import kube


def refusal(status: int, body: str = "") -> ApiException:
    exc = ApiException(status=status, reason="Refused")
    exc.body = body
    return exc


def test_a_full_resource_quota_is_waited_for_not_a_failure() -> None:
    body = '{"message": "jobs.batch \\"x\\" is forbidden: exceeded quota: gpus, requested: ..."}'
    err = kube._classify(refusal(403, body), "create Job team-a/x")
    assert isinstance(err, kube.TemporaryKubeError) and err.delay == 60.0
    assert "ResourceQuota" in str(err)
    assert isinstance(
        kube._classify(refusal(403, "forbidden by policy"), "x"), kube.PermanentKubeError
    )


def test_patching_an_object_deleted_meanwhile_is_a_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    class Gone:
        def patch(self, **_: Any) -> Any:
            raise refusal(404)

    monkeypatch.setattr(kube, "_resource", lambda api_version, kind: Gone())
    with pytest.raises(kube.TemporaryKubeError, match="not found"):
        kube.patch_merge("batch/v1", "Job", "team-a", "x-trainer", {"spec": {"suspend": True}})


def test_a_delete_by_uid_leaves_an_object_made_again_under_the_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bodies: list[dict[str, Any]] = []

    class Replaced:
        def delete(self, **kw: Any) -> Any:
            bodies.append(kw["body"])
            raise refusal(
                409, "Precondition failed: UID in precondition: old, UID in object meta: new"
            )

    monkeypatch.setattr(kube, "_resource", lambda api_version, kind: Replaced())
    kube.delete("apps/v1", "Deployment", "team-a", "daoyan-server", uid="old")  # gone: done
    assert bodies == [{"propagationPolicy": "Background", "preconditions": {"uid": "old"}}]
    # Without a uid, a conflict is not "gone": it is reported.
    with pytest.raises(kube.Conflict):
        kube.delete("apps/v1", "Deployment", "team-a", "daoyan-server")


def test_an_object_of_an_earlier_owner_being_deleted_is_waited_for() -> None:
    ours = {
        "kind": "Job",
        "metadata": {"namespace": "a", "name": "x", "ownerReferences": [{"uid": "new"}]},
    }
    theirs: dict[str, Any] = {"metadata": {"ownerReferences": [{"uid": "old"}]}}
    with pytest.raises(kube.NameTaken, match="rename the owner or remove that object"):
        kube._check_ours(ours, theirs)
    ours["metadata"]["ownerReferences"][0]["kind"] = "ModelServer"
    with pytest.raises(kube.NameTaken, match="rename the ModelServer or remove that object"):
        kube._check_ours(ours, theirs)
    theirs["metadata"]["deletionTimestamp"] = "2026-11-28T00:00:00Z"
    with pytest.raises(kube.TemporaryKubeError, match="being deleted"):
        kube._check_ours(ours, theirs)


def test_a_kind_the_server_does_not_serve_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    def undiscoverable(api_version: str, kind: str) -> Any:
        raise ResourceNotFoundError(f"No matches found for {{'kind': '{kind}'}}")

    monkeypatch.setattr(kube, "_discover", undiscoverable)
    with pytest.raises(kube.NotServed, match=r"does not serve Workload kueue\.x-k8s\.io/v1beta2"):
        kube.list_objects("kueue.x-k8s.io/v1beta2", "Workload", "team-a", "a=b")


def test_discovery_that_cannot_reach_the_server_is_a_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unreachable(api_version: str, kind: str) -> Any:
        raise ConnectionRefusedError("connection refused")

    monkeypatch.setattr(kube, "_discover", unreachable)
    with pytest.raises(kube.TemporaryKubeError, match="discover Job batch/v1"):
        kube.get("batch/v1", "Job", "team-a", "x-trainer")
