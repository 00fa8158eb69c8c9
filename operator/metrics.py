"""Prometheus metrics of the operator: FineTuneJobs by phase, how long jobs waited for the pool
and how long they ran, and the tokens each namespace trained; each ModelServer's adapters.

Read from the FineTuneJobs themselves as the watch delivers them (one ``kopf.on.event`` handler
calls :meth:`JobMetrics.observe`), so the figures are those of ``kubectl get ftj``. The gauge is
the jobs that exist now. The counters and histograms count what this process saw happen: a
job's first sighting (the listing after the operator starts) records its phase and counts
nothing, so a restarted operator counts nothing twice (``rate()`` and ``increase()`` take the
counter reset); a change made while no operator ran is not counted.

Labels are the namespace, the provider and the phase only: never a job's name (unbounded), a
message, or anything read from a Secret. ModelServers (a few per team, each made by hand) are
labelled by name. Nothing here calls the API server or blocks a handler.
"""

from __future__ import annotations

import datetime
import threading
from collections import Counter as Tally
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from kubetune.api import finetunejob as ftj
from kubetune.api import jobstatus
from kubetune.api import modelserver as ms
from kubetune.operator import status as st

PREFIX = "kubetune_finetunejob"

WAIT_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400, 259200)
"""Seconds from creation to `Running`: from a free pool (seconds) to a busy one (days)."""
RUN_BUCKETS = (60, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400, 259200)
"""Seconds from `startTime` to `completionTime`: minutes for small jobs, days for large ones."""

FINISHED = frozenset(p.value for p in jobstatus.Phase if p.finished)
DEFAULT_PROVIDER = str(ftj.FineTuneJobSpec.model_fields["provider"].default)


@dataclass(frozen=True)
class Sighting:
    """What the metrics need of one FineTuneJob."""

    namespace: str
    provider: str
    phase: str


def sighting(body: Mapping[str, Any]) -> tuple[str, Sighting] | None:
    """The job's uid and labels, from its body as the watch sent it (None without a uid)."""
    meta = body.get("metadata") or {}
    uid = meta.get("uid")
    if not uid:
        return None
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    return uid, Sighting(
        namespace=str(meta.get("namespace") or ""),
        provider=str(spec.get("provider") or DEFAULT_PROVIDER),
        phase=str(status.get("phase") or jobstatus.Phase.PENDING),
    )


@dataclass
class _Job:
    sighting: Sighting
    ran: bool
    """Seen Running (or met Running): the wait before its first run is counted once."""
    tokens_counted: bool
    """Its trained tokens are counted, by this process or (met with them) before it started."""


def _seconds_between(
    start: datetime.datetime | None, end: datetime.datetime | None
) -> float | None:
    if start is None or end is None or end < start:
        return None
    return (end - start).total_seconds()


class JobMetrics:
    """The FineTuneJob metrics, registered in ``registry``; :meth:`observe` feeds them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._lock = threading.Lock()  # observe() runs in kopf's loop, collect() in the scrape's
        self._jobs: dict[str, _Job] = {}
        self.transitions = Counter(
            f"{PREFIX}_transitions",
            "FineTuneJobs this operator saw enter each phase.",
            ["namespace", "provider", "phase"],
            registry=registry,
        )
        self.wait = Histogram(
            f"{PREFIX}_wait_seconds",
            "Seconds from a FineTuneJob's creation until the operator first saw it Running "
            "(validation and the wait for the GPU pool or OpenAI's queue).",
            ["namespace", "provider"],
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.run = Histogram(
            f"{PREFIX}_run_seconds",
            "Seconds from a FineTuneJob's startTime to its completionTime, by how it ended.",
            ["namespace", "provider", "phase"],
            buckets=RUN_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "kubetune_trained_tokens",
            "Tokens trained by the FineTuneJobs that succeeded (status.trainedTokens).",
            ["namespace", "provider"],
            registry=registry,
        )
        registry.register(self)

    def observe(
        self, event_type: str | None, body: Mapping[str, Any], now: datetime.datetime
    ) -> None:
        """One watch event of a FineTuneJob (``event_type`` None: the initial listing)."""
        seen = sighting(body)
        if seen is None:
            return
        uid, new = seen
        status = body.get("status") or {}
        tokens = status.get("trainedTokens") if new.phase == jobstatus.Phase.SUCCEEDED else None
        tokens = tokens if isinstance(tokens, int) and tokens > 0 else 0
        with self._lock:
            old = self._jobs.pop(uid, None)
            if event_type == "DELETED":
                return
            self._jobs[uid] = _Job(
                new,
                ran=new.phase == jobstatus.Phase.RUNNING or (old is not None and old.ran),
                tokens_counted=bool(tokens) or (old is not None and old.tokens_counted),
            )
        if old is None:
            return  # a first sighting counts nothing: it may be a restart's listing
        if tokens and not old.tokens_counted:  # the result may reach status after the phase
            self.tokens.labels(new.namespace, new.provider).inc(tokens)
        if old.sighting.phase == new.phase:
            return
        self.transitions.labels(new.namespace, new.provider, new.phase).inc()
        if new.phase == jobstatus.Phase.RUNNING and not old.ran:
            meta = body.get("metadata") or {}
            waited = _seconds_between(st.read_time(meta.get("creationTimestamp")), now)
            if waited is not None:
                self.wait.labels(new.namespace, new.provider).observe(waited)
        if new.phase in FINISHED:
            ran = _seconds_between(
                st.read_time(status.get("startTime")), st.read_time(status.get("completionTime"))
            )
            if ran is not None:
                self.run.labels(new.namespace, new.provider, new.phase).observe(ran)

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(PREFIX + "s", "", labels=["namespace", "provider", "phase"])

    def collect(self) -> Iterator[Metric]:
        """The gauge: the FineTuneJobs that exist now, by namespace, provider and phase."""
        with self._lock:
            counts = Tally(job.sighting for job in self._jobs.values())
        gauge = GaugeMetricFamily(
            PREFIX + "s",
            "FineTuneJobs that exist now, by phase.",
            labels=["namespace", "provider", "phase"],
        )
        for seen, count in sorted(counts.items(), key=lambda item: str(item[0])):
            gauge.add_metric([seen.namespace, seen.provider, seen.phase], count)
        yield gauge


@dataclass(frozen=True)
class ServerSighting:
    """What the metrics need of one ModelServer's status."""

    namespace: str
    name: str
    adapters: int
    refused: int
    ready: bool


def server_sighting(body: Mapping[str, Any]) -> tuple[str, ServerSighting] | None:
    meta = body.get("metadata") or {}
    uid = meta.get("uid")
    if not uid:
        return None
    status = body.get("status") or {}
    ready = st.conditions_by_type(dict(body)).get("Ready", {}).get("status") == "True"
    return uid, ServerSighting(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        adapters=len(status.get("adapters") or []),
        refused=len(status.get("refused") or []),
        ready=ready,
    )


class ServerMetrics:
    """Gauges of the ModelServers that exist now; :meth:`observe` feeds them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._lock = threading.Lock()
        self._servers: dict[str, ServerSighting] = {}
        registry.register(self)

    def observe(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """One watch event of a ModelServer (``event_type`` None: the initial listing)."""
        seen = server_sighting(body)
        if seen is None:
            return
        uid, server = seen
        with self._lock:
            if event_type == "DELETED":
                self._servers.pop(uid, None)
            else:
                self._servers[uid] = server

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            servers = sorted(self._servers.values(), key=lambda s: (s.namespace, s.name))
        adapters, refused, ready = self._families()
        for s in servers:
            labels = [s.namespace, s.name]
            adapters.add_metric(labels, s.adapters)
            refused.add_metric(labels, s.refused)
            ready.add_metric(labels, 1 if s.ready else 0)
        yield from (adapters, refused, ready)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        labels = ["namespace", "modelserver"]
        return (
            GaugeMetricFamily(
                "kubetune_modelserver_adapters",
                "Adapters the ModelServer serves (status.adapters).",
                labels=labels,
            ),
            GaugeMetricFamily(
                "kubetune_modelserver_refused",
                "FineTuneJobs naming the ModelServer whose adapters it refuses (status.refused; "
                f"at most {ms.MAX_LISTED} are listed).",
                labels=labels,
            ),
            GaugeMetricFamily(
                "kubetune_modelserver_ready",
                "1 while the ModelServer's Ready condition is True (every replica serves the "
                "current adapter set), else 0.",
                labels=labels,
            ),
        )


JOBS = JobMetrics(prometheus_client.REGISTRY)
"""The operator's one instance (the process-wide registry also carries Python's process
metrics: CPU, memory, open files)."""
SERVERS = ServerMetrics(prometheus_client.REGISTRY)
RETRIES = Counter(
    "kubetune_reconcile_retries",
    "Reconcile steps retried after a passing failure (an API answering 429 or 5xx, a full "
    "ResourceQuota, OpenAI unavailable), by kind and by whose API failed.",
    ["kind", "api"],
    registry=prometheus_client.REGISTRY,
)
"""A rate that stays above zero means a job or server is stuck retrying: its ``Reconciled``
condition says why."""


_served = False


def served() -> bool:
    """Whether :func:`serve` runs: only then does the watch feed :data:`JOBS` and
    :data:`SERVERS` (an operator that serves no metrics spends nothing on them)."""
    return _served


def serve(host: str, port: int) -> None:
    """Serve ``/metrics`` on ``host:port`` from a daemon thread, and start feeding them."""
    global _served
    prometheus_client.start_http_server(port, addr=host)
    _served = True
