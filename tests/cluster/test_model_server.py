"""A ModelServer serves the adapters of several FineTuneJobs from one vLLM, on the real control
plane: the real API server validates it, the real Deployment controller rolls its pods (kwok
runs them), the real garbage collector takes its objects away."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from support import ftj
from support.cluster import Cluster, wait_until
from support.operator import OperatorProcess

pytestmark = pytest.mark.cluster

MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


def model_server(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": {"id": MODEL},
        "engine": "vllm-cpu",
        "resources": {"gpus": 0},
        "maxLoraRank": 16,
    }
    body.update(spec)
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelServer",
        "metadata": {"name": name},
        "spec": body,
    }


def shared_job(
    name: str, server: str = "shared", run_seconds: float = 1, **spec: Any
) -> dict[str, Any]:
    job = ftj.local_job(name, run_seconds=run_seconds, **spec)
    job["spec"]["serve"] = {"server": server}
    return job


def server_status(cluster: Cluster, ns: str, name: str = "shared") -> dict[str, Any]:
    obj = cluster.get("modelserver", name, "-n", ns)
    assert obj is not None, f"ModelServer {ns}/{name} is gone"
    return dict(obj.get("status") or {})


def wait_server(
    cluster: Cluster, ns: str, adapters: list[str], name: str = "shared", timeout: float = 90
) -> dict[str, Any]:
    """The ModelServer's status once it is Ready with exactly ``adapters``."""

    def ready() -> dict[str, Any] | None:
        status = server_status(cluster, ns, name)
        conds = {c["type"]: c for c in status.get("conditions") or []}
        done = conds.get("Ready", {}).get("status") == "True"
        return status if done and status.get("adapters", []) == adapters else None

    try:
        return wait_until(ready, timeout=timeout, description=f"{name} Ready with {adapters}")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; status: {server_status(cluster, ns, name)}") from None


def served_config(cluster: Cluster, ns: str) -> dict[str, Any]:
    cm = cluster.get("configmap", "shared-server-config", "-n", ns)
    return dict(yaml.safe_load(cm["data"]["serve.yaml"]))


def finish(cluster: Cluster, ns: str, name: str) -> None:
    ftj.wait_phase(cluster, ns, name, "Running", "Succeeded", timeout=60)
    ftj.SimulatedTrainer(cluster, ns, name).finish(trained_tokens=100, rank=8)
    ftj.wait_phase(cluster, ns, name, "Succeeded", timeout=60)


def test_jobs_share_one_server_and_leave_it_when_deleted(
    cluster: Cluster, operator: OperatorProcess, team: str
) -> None:
    cluster.apply(model_server("shared"), namespace=team)
    empty = wait_server(cluster, team, [])
    assert empty["baseURL"] == f"http://shared-server.{team}.svc:8000/v1"
    assert empty["model"] == MODEL

    cluster.apply(
        shared_job("alpha"),
        shared_job("beta"),
        # Trains for ten minutes: long enough to see that it is told at once.
        shared_job("other-base", run_seconds=600, model={"id": "meta-llama/Llama-3.2-1B"}),
        shared_job("too-wide", lora={"r": 64}),
        namespace=team,
    )
    for name in ("alpha", "beta"):
        finish(cluster, team, name)
    status = wait_server(cluster, team, ["alpha", "beta"])
    refused = {r["name"]: r["message"] for r in status["refused"]}
    assert set(refused) == {"other-base", "too-wide"}
    assert "trained on meta-llama/Llama-3.2-1B" in refused["other-base"]
    assert "adapter rank 64 is above the server's `maxLoraRank` 16" in refused["too-wide"]
    reasons = ftj.event_reasons(cluster, team, "shared", "AdaptersChanged", "AdapterRefused")
    assert reasons.count("AdapterRefused") == 2, reasons  # each refusal once, not every tick

    # One server, both adapters, each job's own output folder mounted read-only.
    config = served_config(cluster, team)
    assert config["model"] == MODEL and config["maxLoraRank"] == 16
    assert {a["name"]: a["path"] for a in config["adapters"]} == {
        "alpha": "/kubetune/adapters/alpha",
        "beta": "/kubetune/adapters/beta",
    }
    deploy = cluster.get("deployment", "shared-server", "-n", team)
    assert deploy["metadata"]["ownerReferences"][0]["kind"] == "ModelServer"
    mounts = {
        m["mountPath"]: m
        for m in deploy["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    }
    for name in ("alpha", "beta"):
        job = ftj.get_ftj(cluster, team, name)
        path = job["status"]["adapter"]["path"].removeprefix("pvc://kubetune-output/")
        mount = mounts[f"/kubetune/adapters/{name}"]
        assert mount["subPath"].strip("/") == path.strip("/") and mount["readOnly"] is True

    # The jobs: no server of their own, an endpoint at the shared one, ServingReady from it.
    for name in ("alpha", "beta"):
        st = ftj.wait_serving_ready(cluster, team, name)
        assert ftj.serving_condition(st)["reason"] == "ModelServerReady"
        assert cluster.get("deployment", f"{name}-server", "-n", team) is None
        endpoint = cluster.get("configmap", f"{name}-endpoint", "-n", team)
        assert endpoint["data"] == {
            "OPENAI_BASE_URL": f"http://shared-server.{team}.svc:8000/v1",
            "OPENAI_MODEL": name,
        }

    def refused_condition(name: str) -> dict[str, Any] | None:
        cond = ftj.serving_condition(ftj.get_ftj(cluster, team, name).get("status") or {})
        return cond if cond.get("reason") == "AdapterRefused" else None

    # Told while it trains, not when it is done.
    cond = wait_until(lambda: refused_condition("other-base"), timeout=30, description="refused")
    assert cond["status"] == "False" and "this server serves" in cond["message"]
    assert ftj.get_ftj(cluster, team, "other-base")["status"]["phase"] == "Running"

    # The operator's /metrics: two adapters served, two refused, Ready.
    labels = {"namespace": team, "modelserver": "shared"}

    def gauges() -> tuple[float | None, ...]:
        names = ("adapters", "refused", "ready")
        return tuple(operator.metric(f"kubetune_modelserver_{n}", **labels) for n in names)

    wait_until(lambda: gauges() == (2, 2, 1), timeout=30, description="2 served, 2 refused, Ready")

    # A deleted job's adapter leaves the server; the other stays served.
    cluster.kubectl("delete", "finetunejob", "alpha", "-n", team)
    wait_server(cluster, team, ["beta"])
    assert [a["name"] for a in served_config(cluster, team)["adapters"]] == ["beta"]

    # Without its ModelServer, a job says so; the garbage collector takes the server away.
    cluster.kubectl("delete", "modelserver", "shared", "-n", team)

    def not_found() -> dict[str, Any] | None:
        cond = ftj.serving_condition(ftj.get_ftj(cluster, team, "beta").get("status") or {})
        return cond if cond.get("reason") == "ModelServerNotFound" else None

    wait_until(not_found, timeout=30, description="beta: ModelServerNotFound")
    wait_until(
        lambda: cluster.get("deployment", "shared-server", "-n", team) is None,
        timeout=60,
        description="the shared server's Deployment collected",
    )
    assert gauges() == (None, None, None)  # a deleted server leaves the metrics


def test_a_job_moves_from_its_own_server_to_a_model_server(
    cluster: Cluster, operator: OperatorProcess, team: str
) -> None:
    cluster.apply(ftj.local_job("mover", run_seconds=1), namespace=team)
    finish(cluster, team, "mover")
    ftj.wait_serving_ready(cluster, team, "mover")
    assert cluster.get("deployment", "mover-server", "-n", team) is not None

    cluster.apply(model_server("shared"), namespace=team)
    cluster.kubectl(
        "patch", "finetunejob", "mover", "-n", team, "--type=merge",
        "-p", '{"spec": {"serve": {"server": "shared"}}}',
    )  # fmt: skip
    wait_server(cluster, team, ["mover"])
    wait_until(
        lambda: cluster.get("deployment", "mover-server", "-n", team) is None,
        timeout=30,
        description="the job's own server removed",
    )

    def endpoint_moved() -> dict[str, Any] | None:
        cm = cluster.get("configmap", "mover-endpoint", "-n", team) or {}
        url = (cm.get("data") or {}).get("OPENAI_BASE_URL", "")
        return cm if url.startswith("http://shared-server.") else None

    wait_until(endpoint_moved, timeout=30, description="the endpoint at the ModelServer")
    st = ftj.wait_serving_ready(cluster, team, "mover")
    assert ftj.serving_condition(st)["reason"] == "ModelServerReady"


def test_a_live_server_takes_a_new_adapter_without_new_pods(
    cluster: Cluster, operator: OperatorProcess, team: str
) -> None:
    """``adapterUpdates: Live``: once a claim's folder is mounted (the first adapter from it
    rolls the pods once), a job that succeeds changes the config file the pods read, not their
    template: the Deployment controller makes no new ReplicaSet, the kwok pod stays. kwok's
    pods run no sidecar (their IPs lead nowhere), so the ModelServer says it cannot confirm the
    change and lists no adapter as served: it never claims what no replica reported. The sidecar's
    answers are read from real pods in the pods tier."""
    cluster.apply(model_server("shared", adapterUpdates="Live"), namespace=team)
    cluster.apply(shared_job("alpha"), namespace=team)
    finish(cluster, team, "alpha")

    def with_adapters(names: list[str]) -> dict[str, Any] | None:
        config = served_config(cluster, team)
        return config if [a["name"] for a in config.get("adapters", [])] == names else None

    config = wait_until(lambda: with_adapters(["alpha"]), timeout=60, description="alpha")
    assert config["runtimeLoraUpdating"] is True

    def one_pod() -> dict[str, Any] | None:
        """The one pod, once the rollout is over: the first adapter from a claim's folder adds
        a mount, so the pods started without adapters were replaced."""
        deploy = cluster.get("deployment", "shared-server", "-n", team)
        mounts = deploy["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        status = deploy.get("status") or {}
        if not any(m["mountPath"].startswith("/kubetune/adapters/") for m in mounts) or (
            status.get("observedGeneration") != deploy["metadata"]["generation"]
            or status.get("updatedReplicas") != 1
            or status.get("replicas") != 1
        ):
            return None
        pods = cluster.get("pods", "-n", team, "-l", "kubetune.io/modelserver=shared")["items"]
        ready = [p for p in pods if p["status"].get("phase") == "Running"]
        return ready[0] if len(pods) == 1 and ready else None

    pod = wait_until(one_pod, timeout=60, description="the server's pod with alpha's folder")
    replicasets = cluster.get("replicasets", "-n", team, "-l", "kubetune.io/modelserver=shared")
    assert [c["name"] for c in pod["spec"]["containers"]] == ["vllm", "adapter-sync"]

    def loading() -> dict[str, Any] | None:
        status = server_status(cluster, team)
        cond = {c["type"]: c for c in status.get("conditions") or []}.get("Ready") or {}
        return status if cond.get("reason") == "LoadingAdapters" else None

    status = wait_until(loading, timeout=60, description="the server waiting for its sidecars")
    (cond,) = [c for c in status["conditions"] if c["type"] == "Ready"]
    assert f"{pod['metadata']['name']}: no adapter report from http://" in cond["message"]
    assert status["adapters"] == []

    cluster.apply(shared_job("beta"), namespace=team)
    finish(cluster, team, "beta")
    config = wait_until(lambda: with_adapters(["alpha", "beta"]), timeout=60, description="beta")
    folder = config["adapters"][0]["path"].rsplit("/", 1)[0]
    assert config["adapters"][1]["path"].startswith(folder + "/")  # one mount for both
    after_beta = cluster.get("replicasets", "-n", team, "-l", "kubetune.io/modelserver=shared")
    assert len(after_beta["items"]) == len(replicasets["items"])  # no new one
    after = one_pod()
    assert after is not None and after["metadata"]["uid"] == pod["metadata"]["uid"]

    # Each job waits for a replica to report its adapter.
    def pending() -> dict[str, Any] | None:
        cond = ftj.serving_condition(ftj.get_ftj(cluster, team, "beta").get("status") or {})
        return cond if cond.get("reason") == "ModelServerPending" else None

    wait_until(pending, timeout=30, description="beta's ServingReady ModelServerPending")


def test_api_server_rejects_an_invalid_model_server(cluster: Cluster, namespace: str) -> None:
    ftj.install_crd(cluster)
    bad = [
        (model_server("gpuless", engine="vllm"), "`engine: vllm` needs `resources.gpus` >= 1"),
        (model_server("Bad.Name"), "metadata.name must start with a letter"),
        (model_server("two-models", model={"id": MODEL, "pvc": {"claimName": "m"}}), "exactly one"),
        (model_server("rank", maxLoraRank=1024), "maxLoraRank"),
    ]
    for obj, expected in bad:
        obj["metadata"]["namespace"] = namespace
        proc = cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(obj), check=False)
        assert proc.returncode != 0, obj["metadata"]["name"]
        assert expected in proc.stderr, proc.stderr


def test_api_server_checks_what_a_job_may_say_of_a_model_server(
    cluster: Cluster, namespace: str
) -> None:
    ftj.install_crd(cluster)
    # Served elsewhere, a job's own serve fields do not matter: no GPUs needed for `vllm`.
    shared = shared_job("gpuless")
    shared["spec"]["serve"] |= {"engine": "vllm", "resources": {"gpus": 0}}
    openai = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "remote"},
        "spec": {
            "provider": "openai",
            "dataset": {"url": "https://example.com/train.jsonl"},
            "openai": {"model": "gpt-4o-mini-2024-07-18", "apiKeySecretRef": {"name": "k"}},
            "serve": {"server": "shared"},
        },
    }
    for obj, expected in [(shared, None), (openai, "`serve.server` applies only to provider")]:
        text = json.dumps({**obj, "metadata": {**obj["metadata"], "namespace": namespace}})
        proc = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=text, check=False)
        if expected is None:
            assert proc.returncode == 0, proc.stderr
        else:
            assert proc.returncode != 0 and expected in proc.stderr, proc.stderr
