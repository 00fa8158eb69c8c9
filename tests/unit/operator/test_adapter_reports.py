"""The operator's read of each Live ModelServer replica's adapter-sync report."""

from __future__ import annotations

import threading
from typing import Any

import httpx

from kubetune.operator import adapter_reports
from kubetune.sync_report import Report


def pod(name: str, ip: str | None, ready: bool = True, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if deleting:
        meta["deletionTimestamp"] = "2026-11-29T00:00:00Z"
    status: dict[str, Any] = {
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]
    }
    if ip is not None:
        status["podIP"] = ip
    return {"metadata": meta, "status": status}


GOOD = Report(
    digest="abc", synced=True, served=["alpha"], pending={}, refused={}, error=None
).to_dict()


def test_only_ready_pods_not_being_deleted_are_asked() -> None:
    pods = [
        pod("a", "10.0.0.1"),
        pod("starting", "10.0.0.2", ready=False),
        pod("leaving", "10.0.0.3", deleting=True),
        pod("no-ip", None),
    ]
    assert adapter_reports.serving_pods(pods) == {"a": "10.0.0.1"}


def test_each_pods_report_or_why_there_is_none() -> None:
    asked: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(str(request.url))
        host = request.url.host
        if host == "10.0.0.1":
            return httpx.Response(200, json=GOOD)
        if host == "10.0.0.2":
            return httpx.Response(200, json={"digest": 3})
        if host == "10.0.0.3":
            return httpx.Response(200, text="<html>a proxy</html>")
        raise httpx.ConnectTimeout("timed out", request=request)

    pods = [pod(n, f"10.0.0.{i}") for i, n in enumerate(["a", "b", "c", "d"], start=1)]
    reports = adapter_reports.read(pods, transport=httpx.MockTransport(answer))
    assert sorted(asked) == [f"http://10.0.0.{i}:8001/" for i in range(1, 5)]
    assert reports["a"] == Report.from_dict(GOOD)
    assert isinstance(reports["b"], str) and "did not answer with an adapter report" in reports["b"]
    assert isinstance(reports["c"], str) and "did not answer with an adapter report" in reports["c"]
    assert reports["d"] == (
        "no adapter report from http://10.0.0.4:8001/: ConnectTimeout: timed out"
    )


def test_an_ipv6_pod_is_asked_at_a_bracketed_address() -> None:
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, json=GOOD)

    adapter_reports.read([pod("a", "fd00::5")], transport=httpx.MockTransport(answer))
    assert seen == ["http://[fd00::5]:8001/"]


def test_the_pods_are_asked_at_once() -> None:
    """A tick must not wait for each replica that does not answer in turn: every request is in
    flight before any is answered (the barrier breaks if they come one after another)."""
    barrier = threading.Barrier(4, timeout=10)

    def answer(request: httpx.Request) -> httpx.Response:
        barrier.wait()
        return httpx.Response(200, json=GOOD)

    pods = [pod(f"p{i}", f"10.0.1.{i}") for i in range(4)]
    reports = adapter_reports.read(pods, transport=httpx.MockTransport(answer))
    assert all(isinstance(r, Report) for r in reports.values()) and len(reports) == 4
