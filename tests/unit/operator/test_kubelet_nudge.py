"""Which Live server pods the operator annotates so that the kubelet refreshes their config
file now, and how a refused request is taken."""

from __future__ import annotations

import datetime
import logging
from typing import Any

import pytest

from kubetune.operator import kube, kubelet_nudge
from kubetune.sync_report import Report

NOW = datetime.datetime(2026, 11, 29, 7, 0, 0, tzinfo=datetime.UTC)
APPLIED = "new-set"


def pod(name: str, ready: bool = True, **annotations: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "annotations": annotations},
        "status": {
            "podIP": "10.0.0.1",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def report(digest: str | None) -> Report:
    return Report(digest=digest, synced=True, served=[])


def asked(seconds_ago: int, digest: str = APPLIED) -> dict[str, str]:
    when = NOW - datetime.timedelta(seconds=seconds_ago)
    return {
        kubelet_nudge.ADAPTER_SET: digest,
        kubelet_nudge.ASKED_AT: when.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def due(pods: list[dict[str, Any]], reports: dict[str, Report | str]) -> list[str]:
    return sorted(kubelet_nudge.due(pods, reports, APPLIED, NOW))


def test_a_replica_that_reports_an_older_set_is_asked_for_the_applied_one() -> None:
    annotations = kubelet_nudge.due([pod("a")], {"a": report("old-set")}, APPLIED, NOW)
    assert annotations == {
        "a": {
            kubelet_nudge.ADAPTER_SET: APPLIED,
            kubelet_nudge.ASKED_AT: "2026-11-29T07:00:00Z",
        }
    }


def test_replicas_in_step_not_ready_or_silent_are_left_alone() -> None:
    pods = [pod("synced"), pod("starting", ready=False), pod("silent"), pod("no-config")]
    reports: dict[str, Report | str] = {
        "synced": report(APPLIED),
        "starting": report("old-set"),
        "silent": "no adapter report from http://10.0.0.1:8001/: ConnectError",
        "no-config": report(None),
    }
    # A sidecar that has read no config yet is behind too: its file may be the problem.
    assert due(pods, reports) == ["no-config"]


def test_a_replica_asked_recently_is_not_asked_again_until_the_retry_time() -> None:
    behind = {name: report("old-set") for name in ("just", "long-ago", "other-set", "garbled")}
    pods = [
        pod("just", **asked(5)),
        pod("long-ago", **asked(25)),
        pod("other-set", **asked(5, digest="old-set")),
        pod("garbled", **{**asked(5), kubelet_nudge.ASKED_AT: "yesterday"}),
    ]
    assert due(pods, dict(behind)) == ["garbled", "long-ago", "other-set"]


def test_each_pod_is_annotated_and_a_refusal_is_logged_not_raised(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    patched: list[tuple[str, str, str, str, dict[str, Any]]] = []

    def patch_merge(
        api: str, kind: str, ns: str, name: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        if name == "b":
            raise kube.PermanentKubeError('pods "b" is forbidden: cannot patch')
        patched.append((api, kind, ns, name, body))
        return body

    monkeypatch.setattr(kube, "patch_merge", patch_merge)
    notes = {kubelet_nudge.ADAPTER_SET: APPLIED}
    with caplog.at_level(logging.INFO, logger=kubelet_nudge.__name__):
        done = kubelet_nudge.nudge("team-a", {"a": notes, "b": notes})
    assert done == ["a"]
    assert patched == [("v1", "Pod", "team-a", "a", {"metadata": {"annotations": notes}})]
    assert "could not ask the kubelet to refresh pod team-a/b" in caplog.text
    assert "forbidden" in caplog.text
