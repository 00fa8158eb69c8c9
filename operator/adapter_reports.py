"""Reads what each replica of a ``Live`` ModelServer serves, from its adapter-sync sidecar.

The sidecar (:mod:`kubetune.server.adapter_sync`) answers ``GET /`` on port
:data:`~kubetune.sync_report.SYNC_PORT` of the pod's IP with a
:class:`~kubetune.sync_report.Report`: the adapter set it synced to (a digest), whether
vLLM serves exactly that set, and what it could not load. The pods have no API access and the
operator does not hold the servers' API key, so this read is how the operator learns that a
change reached every replica. It needs no RBAC, only the network path from the operator's pod
to the server pods (a NetworkPolicy that isolates them must let it through).

Only ready pods that are not being deleted are asked: the others serve no traffic. A pod that
does not answer, or answers something that is not a report, is given as the reason, a string.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from kubetune.operator import status as st
from kubetune.sync_report import SYNC_PORT, Report

log = logging.getLogger(__name__)

TIMEOUT = 2.0
"""Per pod: the sidecar answers from memory; a pod that takes longer is reported as such."""
MAX_PARALLEL = 16


def serving_pods(pods: list[dict[str, Any]]) -> dict[str, str]:
    """Ready pods not being deleted, by name: their IPs."""
    out: dict[str, str] = {}
    for pod in pods:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        ready = st.conditions_by_type(pod).get("Ready", {}).get("status") == "True"
        if ready and not meta.get("deletionTimestamp") and status.get("podIP"):
            out[str(meta.get("name"))] = str(status["podIP"])
    return out


def read(
    pods: list[dict[str, Any]], transport: httpx.BaseTransport | None = None
) -> dict[str, Report | str]:
    """Each serving pod's report, or why there is none; the pods are asked at once, so a
    tick waits :data:`TIMEOUT` at most however many replicas do not answer."""
    targets = sorted(serving_pods(pods).items())
    if not targets:
        return {}
    # Pod IPs are inside the cluster: never through an HTTP(S)_PROXY of the operator's.
    with (
        httpx.Client(timeout=TIMEOUT, transport=transport, trust_env=False) as client,
        ThreadPoolExecutor(min(len(targets), MAX_PARALLEL)) as pool,
    ):
        urls = [f"http://{f'[{ip}]' if ':' in ip else ip}:{SYNC_PORT}/" for _, ip in targets]
        answers = list(pool.map(lambda url: _ask(client, url), urls))
    out = {name: answer for (name, _), answer in zip(targets, answers, strict=True)}
    for name, answer in out.items():
        if isinstance(answer, str):  # the status says it too: no line every tick
            log.debug("pod %s: %s", name, answer)
    return out


def _ask(client: httpx.Client, url: str) -> Report | str:
    try:
        response = client.get(url)
    except httpx.HTTPError as e:
        return f"no adapter report from {url}: {type(e).__name__}: {e}"
    if response.status_code != 200:
        return f"no adapter report from {url}: {response.status_code} {response.reason_phrase}"
    try:
        return Report.from_dict(response.json())
    except ValueError as e:  # not JSON, or not a report
        return f"{url} did not answer with an adapter report: {e}"
