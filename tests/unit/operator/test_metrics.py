"""The operator's Prometheus metrics: jobs by phase now, the phases jobs entered, how long they
waited and ran, the tokens they trained; and what a restarted operator does not count twice."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kubetune.operator import metrics

CREATED = datetime.datetime(2026, 11, 29, 8, 0, 0, tzinfo=datetime.UTC)
NS = "team-a"


def job(
    phase: str | None, uid: str = "u1", provider: str | None = None, **status: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {
            "name": "daoyan",
            "namespace": NS,
            "uid": uid,
            "creationTimestamp": "2026-11-29T08:00:00Z",
        },
        "spec": {"provider": provider} if provider else {},
    }
    if phase is not None:
        body["status"] = {"phase": phase, **status}
    return body


def at(seconds: int) -> datetime.datetime:
    return CREATED + datetime.timedelta(seconds=seconds)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def jobs(registry: CollectorRegistry) -> metrics.JobMetrics:
    return metrics.JobMetrics(registry)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_a_job_seen_from_creation_to_success(
    jobs: metrics.JobMetrics, registry: CollectorRegistry
) -> None:
    jobs.observe("ADDED", job(None), at(0))
    for seconds, phase in ((1, "Validating"), (3, "Queued"), (125, "Running")):
        jobs.observe("MODIFIED", job(phase), at(seconds))
    done = job(
        "Succeeded",
        startTime="2026-11-29T08:00:05Z",
        completionTime="2026-11-29T08:10:05Z",
        trainedTokens=5000,
    )
    jobs.observe("MODIFIED", done, at(605))
    jobs.observe("MODIFIED", done, at(615))  # a later change (an annotation): no new phase

    ftj = {"namespace": NS, "provider": "local"}
    assert value(registry, "kubetune_finetunejobs", phase="Succeeded", **ftj) == 1
    assert value(registry, "kubetune_finetunejobs", phase="Running", **ftj) is None
    for phase in ("Validating", "Queued", "Running", "Succeeded"):
        assert value(registry, "kubetune_finetunejob_transitions_total", phase=phase, **ftj) == 1
    assert value(registry, "kubetune_finetunejob_wait_seconds_count", **ftj) == 1
    assert value(registry, "kubetune_finetunejob_wait_seconds_sum", **ftj) == 125
    run = {"phase": "Succeeded", **ftj}
    assert value(registry, "kubetune_finetunejob_run_seconds_count", **run) == 1
    assert value(registry, "kubetune_finetunejob_run_seconds_sum", **run) == 600
    assert value(registry, "kubetune_trained_tokens_total", **ftj) == 5000


def test_a_restarted_operator_counts_nothing_twice(
    jobs: metrics.JobMetrics, registry: CollectorRegistry
) -> None:
    """The listing after a start (event type None) records phases; only later changes count."""
    done = job("Succeeded", trainedTokens=5000, startTime="2026-11-29T08:00:05Z")
    jobs.observe(None, done, at(900))
    jobs.observe(None, job("Running", uid="u2", provider="openai"), at(900))

    local, remote = {"namespace": NS, "provider": "local"}, {"namespace": NS, "provider": "openai"}
    assert value(registry, "kubetune_finetunejobs", phase="Succeeded", **local) == 1
    assert value(registry, "kubetune_finetunejobs", phase="Running", **remote) == 1
    text = generate_latest(registry).decode()
    assert "kubetune_finetunejob_transitions_total{" not in text
    assert "kubetune_trained_tokens_total{" not in text
    assert "kubetune_finetunejob_wait_seconds_count{" not in text


def test_a_preempted_job_waits_once_and_a_job_met_queued_still_counts(
    jobs: metrics.JobMetrics, registry: CollectorRegistry
) -> None:
    jobs.observe(None, job("Queued"), at(0))  # met after a restart, still waiting: its wait is
    jobs.observe("MODIFIED", job("Running"), at(60))  # from its creation, so it is counted
    jobs.observe("MODIFIED", job("Queued"), at(120))  # preempted by a higher priority
    jobs.observe("MODIFIED", job("Running"), at(300))

    ftj = {"namespace": NS, "provider": "local"}
    assert value(registry, "kubetune_finetunejob_wait_seconds_count", **ftj) == 1
    assert value(registry, "kubetune_finetunejob_wait_seconds_sum", **ftj) == 60
    assert value(registry, "kubetune_finetunejob_transitions_total", phase="Running", **ftj) == 2


def test_a_deleted_job_leaves_the_gauge_and_keeps_its_counts(
    jobs: metrics.JobMetrics, registry: CollectorRegistry
) -> None:
    jobs.observe("ADDED", job(None), at(0))
    jobs.observe("MODIFIED", job("Failed"), at(5))
    jobs.observe("DELETED", job("Failed"), at(10))

    text = generate_latest(registry).decode()
    assert "kubetune_finetunejobs{" not in text
    ftj = {"namespace": NS, "provider": "local"}
    assert value(registry, "kubetune_finetunejob_transitions_total", phase="Failed", **ftj) == 1


def test_times_it_cannot_read_are_skipped_not_raised(
    jobs: metrics.JobMetrics, registry: CollectorRegistry
) -> None:
    body = job("Running")
    body["metadata"]["creationTimestamp"] = "yesterday"
    jobs.observe(None, job("Queued"), at(0))
    jobs.observe("MODIFIED", body, at(5))
    failed = job("Failed", startTime="2026-11-29T08:00:05Z", completionTime="not a time")
    jobs.observe("MODIFIED", failed, at(10))
    jobs.observe("MODIFIED", {"metadata": {}}, at(11))  # no uid: nothing to key it by

    ftj = {"namespace": NS, "provider": "local"}
    assert value(registry, "kubetune_finetunejob_wait_seconds_count", **ftj) is None
    assert value(registry, "kubetune_finetunejob_run_seconds_count", phase="Failed", **ftj) is None
    assert value(registry, "kubetune_finetunejob_transitions_total", phase="Failed", **ftj) == 1


def test_the_exposition_carries_no_job_names_only_bounded_labels(
    jobs: metrics.JobMetrics, registry: CollectorRegistry
) -> None:
    jobs.observe("ADDED", job(None), at(0))
    jobs.observe("MODIFIED", job("Succeeded", trainedTokens=10), at(5))

    families = list(text_string_to_metric_families(generate_latest(registry).decode()))
    names = {family.name for family in families}
    assert {"kubetune_finetunejobs", "kubetune_finetunejob_transitions"} <= names
    labels = {key for family in families for sample in family.samples for key in sample.labels}
    assert labels <= {"namespace", "provider", "phase", "le"}
    assert "daoyan" not in generate_latest(registry).decode()


def test_tokens_that_reach_status_after_the_phase_are_counted_once(
    jobs: metrics.JobMetrics, registry: CollectorRegistry
) -> None:
    """The trainer's result can land one tick after the Job's success."""
    jobs.observe(None, job("Running"), at(0))
    jobs.observe("MODIFIED", job("Succeeded"), at(10))
    jobs.observe("MODIFIED", job("Succeeded", trainedTokens=700), at(20))
    jobs.observe("MODIFIED", job("Succeeded", trainedTokens=700), at(30))
    jobs.observe(None, job("Succeeded", uid="u2", trainedTokens=900), at(30))  # met done

    ftj = {"namespace": NS, "provider": "local"}
    assert value(registry, "kubetune_trained_tokens_total", **ftj) == 700
    assert value(registry, "kubetune_finetunejob_transitions_total", phase="Succeeded", **ftj) == 1
    assert value(registry, "kubetune_finetunejob_wait_seconds_count", **ftj) is None  # met Running


@pytest.mark.parametrize(
    ("flag", "address"),
    [(":8081", ("0.0.0.0", 8081)), ("127.0.0.1:9100", ("127.0.0.1", 9100)),
     ("[::1]:9100", ("::1", 9100)), ("", None)],
)  # fmt: skip
def test_the_metrics_flag_takes_host_and_port(flag: str, address: object) -> None:
    from kubetune.operator import __main__ as operator_main

    assert operator_main._host_port(flag) == address


@pytest.mark.parametrize("flag", ["8081", "localhost", "host:http", "host:70000"])
def test_a_bad_metrics_flag_is_refused_naming_it(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from kubetune.operator import __main__ as operator_main

    with pytest.raises(SystemExit) as exit_:
        operator_main.main(["--metrics", flag])
    assert exit_.value.code == 2
    assert "--metrics" in capsys.readouterr().err


def server(uid: str = "s1", ready: str = "True", **status: Any) -> dict[str, Any]:
    conditions = [{"type": "Ready", "status": ready, "reason": "AllReplicasServe"}]
    return {
        "metadata": {"name": "qwen", "namespace": NS, "uid": uid},
        "status": {"conditions": conditions, **status},
    }


def test_model_server_gauges_follow_its_status(registry: CollectorRegistry) -> None:
    servers = metrics.ServerMetrics(registry)
    refused = [{"name": "other-base", "message": "trained on another model"}]
    servers.observe(None, server(adapters=["alpha", "beta"], refused=refused))
    labels = {"namespace": NS, "modelserver": "qwen"}
    assert value(registry, "kubetune_modelserver_adapters", **labels) == 2
    assert value(registry, "kubetune_modelserver_refused", **labels) == 1
    assert value(registry, "kubetune_modelserver_ready", **labels) == 1
    exposed = generate_latest(registry).decode()
    assert "alpha" not in exposed and "other-base" not in exposed  # counts, not job names

    servers.observe("MODIFIED", server(ready="False", adapters=["beta"]))
    assert value(registry, "kubetune_modelserver_adapters", **labels) == 1
    assert value(registry, "kubetune_modelserver_refused", **labels) == 0
    assert value(registry, "kubetune_modelserver_ready", **labels) == 0

    servers.observe("DELETED", server())
    assert value(registry, "kubetune_modelserver_adapters", **labels) is None
