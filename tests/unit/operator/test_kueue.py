"""Kueue's side of a queued job: the trainer Job's Workload, read and (de)activated for
spec.suspend, and the server replicas Kueue's admission gate holds."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.operator import kube, kueue

PENDING_MESSAGE = (
    "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu "
    "in flavor a100, 1 more needed"
)


def workload(active: bool | None = None, *conditions: dict[str, str]) -> dict[str, Any]:
    spec = {} if active is None else {"active": active}
    return {
        "metadata": {"name": "job-daoyan-trainer-3f2a1"},
        "spec": spec,
        "status": {"conditions": list(conditions)},
    }


def cond(type_: str, status: str, message: str = "") -> dict[str, str]:
    return {"type": type_, "status": status, "message": message}


def test_a_workload_waiting_for_quota_says_kueues_reason() -> None:
    w = kueue.parse(workload(None, cond("QuotaReserved", "False", PENDING_MESSAGE)), "v")
    assert w.active and not w.admitted
    assert w.waiting == PENDING_MESSAGE


def test_an_admitted_or_deactivated_workload() -> None:
    admitted = kueue.parse(
        workload(True, cond("QuotaReserved", "True"), cond("Admitted", "True")), "v"
    )
    assert admitted.admitted and admitted.waiting == ""
    assert not kueue.parse(workload(False), "v").active
    assert kueue.parse(workload(None), "v").waiting == "not admitted yet"


class FakeKube:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, served: set[str]) -> None:
        self.served = served
        self.listed: list[tuple[str, str]] = []
        self.patched: list[tuple[Any, ...]] = []
        monkeypatch.setattr(kube, "list_objects", self.list_objects)
        monkeypatch.setattr(kube, "patch_merge", lambda *a: self.patched.append(a))

    def list_objects(
        self, api_version: str, kind: str, namespace: str, label_selector: str
    ) -> list[dict[str, Any]]:
        self.listed.append((api_version, label_selector))
        if api_version not in self.served:
            raise kube.NotServed(f"the API server does not serve {kind} {api_version}")
        return [workload(True)]


def test_find_falls_back_to_v1beta1_on_older_kueue(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeKube(monkeypatch, served={"kueue.x-k8s.io/v1beta1"})
    found = kueue.find("team-a", "job-uid-1")
    assert found is not None and found.api_version == "kueue.x-k8s.io/v1beta1"
    assert fake.listed == [
        ("kueue.x-k8s.io/v1beta2", "kueue.x-k8s.io/job-uid=job-uid-1"),
        ("kueue.x-k8s.io/v1beta1", "kueue.x-k8s.io/job-uid=job-uid-1"),
    ]


def test_without_kueue_nothing_will_admit_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeKube(monkeypatch, served=set())
    with pytest.raises(kueue.NotInstalled, match=r"spec\.queue is set.*is Kueue installed"):
        kueue.find("team-a", "job-uid-1")


def test_set_active_patches_the_workload_at_its_version(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeKube(monkeypatch, served={"kueue.x-k8s.io/v1beta2"})
    found = kueue.find("team-a", "job-uid-1")
    assert found is not None
    stopped = kueue.set_active("team-a", found, False)
    assert not stopped.active and not stopped.admitted
    assert fake.patched == [
        (
            "kueue.x-k8s.io/v1beta2",
            "Workload",
            "team-a",
            "job-daoyan-trainer-3f2a1",
            {"spec": {"active": False}},
        )
    ]


def server_pod(name: str, created: str, gated: bool, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "uid": f"uid-{name}", "creationTimestamp": created}
    if deleting:
        meta["deletionTimestamp"] = "2026-11-28T10:05:00Z"
    gates = [{"name": kueue.ADMISSION_GATE}] if gated else []
    return {"metadata": meta, "spec": {"schedulingGates": gates}}


def test_held_pods_are_the_gated_ones_oldest_first() -> None:
    pods = [
        server_pod("newer", "2026-11-28T10:02:00Z", gated=True),
        server_pod("running", "2026-11-28T10:00:00Z", gated=False),
        server_pod("older", "2026-11-28T10:01:00Z", gated=True),
        server_pod("leaving", "2026-11-28T09:00:00Z", gated=True, deleting=True),
        {"metadata": {"name": "other-gate"}, "spec": {"schedulingGates": [{"name": "x/y"}]}},
    ]
    assert [p["metadata"]["name"] for p in kueue.held_pods(pods)] == ["older", "newer"]
    assert kueue.held_pods([]) == []
