"""A ModelServer: which jobs' adapters it serves (``plan``), the objects it runs, its status,
and what a job that names it reports."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from kubetune.api import jobstatus
from kubetune.api import modelserver as ms
from kubetune.api.serveconfig import MAX_ADAPTERS, ServeConfig
from kubetune.operator import (
    kube,
    kubelet_nudge,
    kueue,
    local_provider,
    manifests,
    model_server,
)
from kubetune.operator import model_server_manifests as msm
from kubetune.operator import serving_manifests as sm
from kubetune.operator import status as st
from kubetune.operator.settings import OperatorSettings
from kubetune.server import vllm_args
from kubetune.sync_report import SYNC_PORT, Report

NS = "team-a"
OWNER = manifests.Owner(name="qwen", namespace=NS, uid="feedface00000000", kind=ms.KIND)
SETTINGS = OperatorSettings(model_cache_claim="hf-cache")
QWEN = {"id": "Qwen/Qwen2.5-0.5B-Instruct"}


def server_spec(**spec: Any) -> ms.ModelServerSpec:
    body: dict[str, Any] = {"model": QWEN, "engine": "vllm-cpu", "resources": {"gpus": 0}}
    return ms.ModelServerSpec.model_validate({**body, **spec})


def job_body(
    name: str,
    phase: str = "Succeeded",
    rank: int | None = None,
    **spec: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": QWEN,
        "dataset": {"configMap": {"name": "data", "key": "train.jsonl"}},
        "serve": {"server": "qwen"},
    }
    body.update(spec)
    status: dict[str, Any] = {"phase": phase}
    if rank is not None:
        status["adapter"] = {"path": "pvc://x/y", "rank": rank, "baseModel": "m"}
    return {"metadata": {"name": name, "uid": f"{name}-uid-0000"}, "spec": body, "status": status}


def member(name: str, **kw: Any) -> model_server.Member:
    return model_server.member(job_body(name, **kw))


# ---------------------------------------------------------------------------------- plan


def test_succeeded_jobs_on_the_same_base_are_served_each_from_its_own_folder() -> None:
    plan = model_server.plan(server_spec(), NS, [member("beta"), member("alpha")], SETTINGS)
    assert list(plan.adapters) == ["alpha", "beta"] and plan.refused == []
    alpha = plan.adapters["alpha"]
    assert alpha.claim == SETTINGS.output_claim
    assert alpha.subpath == "team-a/alpha-alpha-ui"  # the job's own folder: name + uid prefix
    assert alpha.path == "/kubetune/adapters/alpha"


def test_a_job_still_training_waits_and_one_with_serving_off_is_left_out() -> None:
    members = [
        member("running", phase="Running"),
        member("off", serve={"server": "qwen", "enabled": False}),
        model_server.Member(name="broken", uid="u", spec=None, phase="Failed", rank=None),
    ]
    plan = model_server.plan(server_spec(), NS, members, SETTINGS)
    assert plan.adapters == {} and plan.refused == []


@pytest.mark.parametrize(
    ("job", "expected"),
    [
        (
            {"model": {"id": "meta-llama/Llama-3.2-1B"}},
            "trained on meta-llama/Llama-3.2-1B; this server serves Qwen/Qwen2.5-0.5B-Instruct",
        ),
        (
            {"model": {**QWEN, "revision": "main"}},
            "trained on Qwen/Qwen2.5-0.5B-Instruct@main",
        ),
        (
            {"lora": {"r": 64}},
            "adapter rank 64 is above the server's `maxLoraRank` 16 (vLLM rounds it to 16)",
        ),
    ],
)
def test_jobs_it_can_never_serve_are_refused_with_the_reason_even_before_they_finish(
    job: dict[str, Any], expected: str
) -> None:
    body = job_body("x", phase="Running", **job)
    plan = model_server.plan(server_spec(), NS, [model_server.member(body)], SETTINGS)
    assert plan.adapters == {}
    assert [r.name for r in plan.refused] == ["x"]
    assert expected in plan.refused[0].message


def test_the_rank_the_trainer_reported_counts_and_is_rounded_as_vllm_rounds() -> None:
    spec = server_spec(maxLoraRank=10)  # vLLM serves up to 16
    ok = model_server.plan(spec, NS, [member("a", rank=16, lora={"r": 64})], SETTINGS)
    assert list(ok.adapters) == ["a"]
    too_big = model_server.plan(spec, NS, [member("b", rank=32)], SETTINGS)
    assert "adapter rank 32" in too_big.refused[0].message


def test_a_model_folder_with_a_trailing_slash_is_the_same_model() -> None:
    spec = server_spec(model={"pvc": {"claimName": "models", "path": "demo-tiny/"}})
    job = member("a", model={"pvc": {"claimName": "models", "path": "demo-tiny"}})
    other_claim = member("b", model={"pvc": {"claimName": "other", "path": "demo-tiny"}})
    plan = model_server.plan(spec, NS, [job, other_claim], SETTINGS)
    assert list(plan.adapters) == ["a"] and [r.name for r in plan.refused] == ["b"]


def test_a_gated_base_is_the_same_model_whatever_token_a_job_names() -> None:
    token = {"name": "hf-token", "key": "token"}
    spec = server_spec(model={**QWEN, "tokenSecretRef": token})
    jobs = [
        member("a", model=QWEN),
        member("b", model={**QWEN, "tokenSecretRef": {"name": "x", "key": "y"}}),
    ]
    assert list(model_server.plan(spec, NS, jobs, SETTINGS).adapters) == ["a", "b"]
    env = {
        e["name"]: e
        for e in objects(MOUNTS, model={**QWEN, "tokenSecretRef": token})["Deployment"]["spec"][
            "template"
        ]["spec"]["containers"][0]["env"]
    }
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": token}  # the server's own Secret


def test_a_full_server_keeps_the_oldest_jobs_and_refuses_the_newest() -> None:
    def aged(name: str, minute: int) -> model_server.Member:
        body = job_body(name)
        body["metadata"]["creationTimestamp"] = f"2026-11-29T10:{minute:02d}:00Z"
        return model_server.member(body)

    # "zz-first" sorts last by name but came first: it keeps its place.
    members = [aged("zz-first", 0)] + [aged(f"job-{i:02d}", 1 + i % 50) for i in range(64)]
    plan = model_server.plan(server_spec(), NS, members, SETTINGS)
    assert len(plan.adapters) == MAX_ADAPTERS and "zz-first" in plan.adapters
    assert list(plan.adapters) == sorted(plan.adapters)
    (refused,) = plan.refused
    assert refused.name == "job-49"  # the newest (minute 50)
    assert f"serves {MAX_ADAPTERS} adapters already" in refused.message
    _, config = msm.model_server_layout(server_spec(), plan.adapters)  # valid: it parsed
    assert len(config.adapters) == MAX_ADAPTERS


# ---------------------------------------------------------------------------------- objects


def objects(adapters: dict[str, sm.AdapterMount], **spec: Any) -> dict[str, dict[str, Any]]:
    parsed = server_spec(**spec)
    mounts, config = msm.model_server_layout(parsed, adapters)
    out = msm.model_server_objects(
        owner=OWNER, spec=parsed, mounts=mounts, config=config, settings=SETTINGS
    )
    return {o["kind"]: o for o in out}


MOUNTS = {
    "beta": sm.AdapterMount("kubetune-output", "team-a/beta-1", "/kubetune/adapters/beta"),
    "alpha": sm.AdapterMount("kubetune-output", "team-a/alpha-2", "/kubetune/adapters/alpha"),
    "gamma": sm.AdapterMount("team-claim", "runs/team-a/gamma-3", "/kubetune/adapters/gamma"),
}


def test_one_server_mounts_every_adapter_read_only_and_each_claim_once() -> None:
    objs = objects(MOUNTS)
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v and v["name"].startswith("adapter")
    }
    assert claims == {"adapter": "kubetune-output", "adapter-1": "team-claim"}
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/kubetune/adapters/gamma"] == {
        "name": "adapter-1",
        "mountPath": "/kubetune/adapters/gamma",
        "subPath": "runs/team-a/gamma-3",
        "readOnly": True,
    }
    assert mounts["/kubetune/adapters/alpha"]["subPath"] == "team-a/alpha-2"


def test_the_config_serves_the_base_and_every_adapter_by_job_name() -> None:
    objs = objects(MOUNTS, maxLoras=8, maxLoraRank=32)
    config = ServeConfig.model_validate(yaml.safe_load(objs["ConfigMap"]["data"]["serve.yaml"]))
    assert [(a.name, a.path) for a in config.adapters] == [
        ("alpha", "/kubetune/adapters/alpha"),
        ("beta", "/kubetune/adapters/beta"),
        ("gamma", "/kubetune/adapters/gamma"),
    ]
    assert config.model == "Qwen/Qwen2.5-0.5B-Instruct" and config.engine == "vllm-cpu"
    argv = vllm_args.vllm_argv(config, adapter_ranks=[8, 8, 8])
    assert argv[argv.index("--max-loras") + 1] == "8"
    assert argv[argv.index("--max-lora-rank") + 1] == "32"
    assert '"name":"alpha","path":"/kubetune/adapters/alpha"' in " ".join(argv)


def test_its_objects_are_its_own_not_a_jobs() -> None:
    objs = objects({})
    for obj in objs.values():
        assert obj["metadata"]["name"].startswith("qwen-server")
        (ref,) = obj["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["controller"]) == ("ModelServer", "qwen", True)
        labels = obj["metadata"]["labels"]
        assert labels[manifests.LABEL_MODELSERVER] == "qwen"
        assert labels[manifests.LABEL_COMPONENT] == "modelserver"
        assert manifests.LABEL_JOB not in labels
    selector = objs["Deployment"]["spec"]["selector"]["matchLabels"]
    assert selector == objs["Service"]["spec"]["selector"]
    assert selector == {
        manifests.LABEL_MODELSERVER: "qwen",
        manifests.LABEL_COMPONENT: "modelserver",
    }


def test_a_base_folder_named_like_a_job_is_served_under_another_name() -> None:
    model = {"pvc": {"claimName": "models", "path": "alpha"}}
    mount = {"alpha": MOUNTS["alpha"], "alpha-base": MOUNTS["beta"]}
    config = yaml.safe_load(objects(mount, model=model)["ConfigMap"]["data"]["serve.yaml"])
    assert config["servedModelName"] == "alpha-base-base"


# ---------------------------------------------------------------------------------- reconcile


class FakeKube:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.applied: list[dict[str, Any]] = []
        monkeypatch.setattr(kube, "apply", self.apply)
        monkeypatch.setattr(kube, "get", lambda *a: {"exists": True})
        monkeypatch.setattr(local_provider, "_checked", {})

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.applied.append(obj)
        return obj


def rolled(deploy: dict[str, Any], replicas: int = 1, updated: int = 1) -> dict[str, Any]:
    deploy = {**deploy, "metadata": {**deploy["metadata"], "generation": 2, "uid": "d"}}
    deploy["status"] = {
        "observedGeneration": 2,
        "replicas": replicas,
        "updatedReplicas": updated,
        "readyReplicas": replicas,
    }
    return deploy


def reconcile(
    members: list[model_server.Member], deployment: dict[str, Any] | None
) -> ms.ModelServerStatus:
    return model_server.reconcile(
        server_spec(), OWNER, members, deployment, [], ms.ModelServerStatus(), SETTINGS, 1
    )


def ready(status: ms.ModelServerStatus) -> tuple[str, str]:
    (cond,) = [c for c in status.conditions if c.type == "Ready"]
    return cond.status, cond.reason


def test_a_new_adapter_set_is_applied_and_not_ready_until_every_replica_runs_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeKube(monkeypatch)
    first = reconcile([member("alpha")], None)
    assert [o["kind"] for o in fake.applied] == ["ConfigMap", "Service", "Deployment"]
    assert first.adapters == ["alpha"] and ready(first) == ("False", "RollingOut")
    assert first.base_url == f"http://qwen-server.{NS}.svc:8000/v1"
    assert first.model == "Qwen/Qwen2.5-0.5B-Instruct"

    deploy = fake.applied[-1]
    fake.applied.clear()
    assert ready(reconcile([member("alpha")], rolled(deploy))) == ("True", "DeploymentReady")
    assert fake.applied == []  # nothing changed: no request

    # Replicas still running the old template are not the new adapter set.
    half = reconcile([member("alpha")], rolled(deploy, replicas=2, updated=1))
    assert ready(half) == ("False", "RollingOut")

    second = reconcile([member("alpha"), member("beta")], rolled(deploy))
    assert second.adapters == ["alpha", "beta"] and ready(second) == ("False", "RollingOut")
    assert [o["kind"] for o in fake.applied] == ["ConfigMap", "Service", "Deployment"]


def test_replicas_kueue_holds_are_named_with_the_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeKube(monkeypatch)
    reconcile([member("alpha")], None)
    deploy = rolled(fake.applied[-1])
    deploy["status"]["readyReplicas"] = 0
    held = {
        "metadata": {
            "name": "qwen-server-abc",
            "uid": "pod-uid",
            "labels": {manifests.KUEUE_QUEUE_LABEL: "gpus"},
        },
        "spec": {"schedulingGates": [{"name": kueue.ADMISSION_GATE}]},
    }
    monkeypatch.setattr(kueue, "find", lambda ns, uid: None)
    status = model_server.reconcile(
        server_spec(), OWNER, [member("alpha")], deploy, [held], ms.ModelServerStatus(),
        SETTINGS, 1,
    )  # fmt: skip
    (cond,) = status.conditions
    assert (cond.status, cond.reason) == ("False", "ServingQueued")
    assert cond.message == "0/1 replicas ready; 1 replica waiting in the Kueue queue gpus"


def test_a_server_the_api_refuses_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(obj: dict[str, Any]) -> dict[str, Any]:
        raise kube.NameTaken("Deployment qwen-server belongs to FineTuneJob qwen")

    monkeypatch.setattr(kube, "apply", refuse)
    monkeypatch.setattr(local_provider, "_checked", {})
    status = reconcile([member("alpha")], None)
    assert ready(status) == ("False", "ServingRefused")
    assert status.adapters == []


# ---------------------------------------------------------------------------------- the job


JOB = manifests.Owner(name="alpha", namespace=NS, uid="alpha-uid-0000")


def server_body(**status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "qwen"}, "status": status}


READY = {"type": "Ready", "status": "True", "reason": "DeploymentReady", "message": "1/1"}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (None, (False, "ModelServerNotFound", "no ModelServer qwen in team-a")),
        (
            server_body(refused=[{"name": "alpha", "message": "trained on x"}]),
            (False, "AdapterRefused", "ModelServer qwen refuses it: trained on x"),
        ),
        (
            server_body(adapters=["beta"], conditions=[READY]),
            (False, "ModelServerPending", "ModelServer qwen has not added the adapter yet"),
        ),
        (
            server_body(
                adapters=["alpha"],
                conditions=[{**READY, "status": "False", "reason": "RollingOut", "message": "0/1"}],
            ),
            (False, "ModelServerNotReady", "ModelServer qwen is not ready (RollingOut: 0/1)"),
        ),
        (
            server_body(adapters=["alpha"], conditions=[READY]),
            (True, "ModelServerReady", "served by ModelServer qwen: 1/1"),
        ),
    ],
)
def test_a_job_reports_what_its_model_server_says_of_it(
    body: dict[str, Any] | None, expected: tuple[bool, str, str]
) -> None:
    assert local_provider.shared_serving_state("qwen", JOB, body) == expected


def test_a_served_job_publishes_the_model_servers_endpoint_and_drops_its_own_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeKube(monkeypatch)
    deleted: list[tuple[str, str]] = []
    monkeypatch.setattr(
        kube, "delete", lambda api, kind, ns, name, **kw: deleted.append((kind, name))
    )
    children = local_provider.Children(
        deployment={"metadata": {"name": "alpha-server"}},
        model_server=server_body(adapters=["alpha"], conditions=[READY]),
    )
    new = jobstatus.FineTuneJobStatus(phase=jobstatus.Phase.SUCCEEDED)
    local_provider.serve_shared("qwen", JOB, new, children, 3)
    assert ("Deployment", "alpha-server") in deleted and (
        "ConfigMap",
        "alpha-endpoint",
    ) not in deleted
    (endpoint,) = fake.applied
    assert endpoint["data"] == {
        "OPENAI_BASE_URL": f"http://qwen-server.{NS}.svc:8000/v1",
        "OPENAI_MODEL": "alpha",
    }
    assert new.endpoint is not None and new.endpoint.base_url == endpoint["data"]["OPENAI_BASE_URL"]
    assert new.message == "serving"

    fake.applied.clear()
    local_provider.serve_shared("qwen", JOB, new, local_provider.Children(), 3)
    assert fake.applied == []  # the endpoint is published already


def test_more_refused_jobs_than_the_status_lists_are_counted_not_frozen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    FakeKube(monkeypatch)
    many = MAX_ADAPTERS + ms.MAX_LISTED + 10
    members = [member(f"job-{i:03d}") for i in range(many)]
    new = reconcile(members, None)
    # Valid for the CRD (maxItems), so the status patch is not refused and the status moves on.
    ms.ModelServerStatus.model_validate(new.model_dump(by_alias=True))
    assert len(new.refused) == ms.MAX_LISTED
    assert [r.name for r in new.refused] == sorted(r.name for r in new.refused)
    (cond,) = [c for c in new.conditions if c.type == "Ready"]
    assert f"{ms.MAX_LISTED + 10} jobs refused, the first {ms.MAX_LISTED}" in cond.message
    last = manifests.Owner(name=f"job-{many - 1:03d}", namespace=NS, uid="u")
    body = {"metadata": {"name": "qwen"}, "status": new.model_dump(by_alias=True)}
    _, reason, why = local_provider.shared_serving_state("qwen", last, body)
    assert reason == "ModelServerPending" and "or refuses it" in why


def test_events_say_what_changed_and_each_refusal_once() -> None:
    old = ms.ModelServerStatus(
        adapters=["alpha", "beta"], refused=[ms.RefusedAdapter(name="x", message="rank")]
    )
    new = ms.ModelServerStatus(
        adapters=["beta", "gamma"],
        refused=[
            ms.RefusedAdapter(name="x", message="rank"),
            ms.RefusedAdapter(name="y", message="trained on z"),
        ],
    )
    assert [(e.type, e.reason, e.message) for e in model_server.events(old, new)] == [
        (
            "Normal",
            "AdaptersChanged",
            "added gamma; removed alpha; the replicas restart with the new adapter set",
        ),
        ("Warning", "AdapterRefused", "y: trained on z"),
    ]
    assert model_server.events(new, new) == []


def test_a_job_the_model_server_refuses_says_so_while_it_still_trains() -> None:
    new = jobstatus.FineTuneJobStatus(phase=jobstatus.Phase.RUNNING)
    refusing = local_provider.Children(
        model_server=server_body(refused=[{"name": "alpha", "message": "trained on x"}])
    )
    local_provider.early_refusal("qwen", JOB, new, refusing, 2)
    (cond,) = new.conditions
    assert (cond.type, cond.status, cond.reason) == ("ServingReady", "False", "AdapterRefused")
    assert cond.message == "ModelServer qwen refuses it: trained on x"

    # The ModelServer was changed (a higher maxLoraRank): the warning goes.
    accepting = local_provider.Children(model_server=server_body(adapters=[]))
    local_provider.early_refusal("qwen", JOB, new, accepting, 2)
    assert new.conditions == []


# ---------------------------------------------------------------------------------- Live


LIVE = {"adapterUpdates": "Live"}


def test_a_live_server_mounts_each_claims_namespace_folder_and_runs_the_sync_sidecar() -> None:
    objs = objects(MOUNTS, **LIVE)
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    vllm, sync = pod["containers"]
    assert (vllm["name"], sync["name"]) == ("vllm", "adapter-sync")
    folders = {m["subPath"]: m["mountPath"] for m in vllm["volumeMounts"] if "subPath" in m}
    # One mount per claim and namespace folder, not per job: a later job's folder is in it.
    assert sorted(folders) == ["runs/team-a", "team-a"]
    config = ServeConfig.model_validate(yaml.safe_load(objs["ConfigMap"]["data"]["serve.yaml"]))
    paths = {a.name: a.path for a in config.adapters}
    assert paths == {
        "alpha": f"{folders['team-a']}/alpha-2",
        "beta": f"{folders['team-a']}/beta-1",
        "gamma": f"{folders['runs/team-a']}/gamma-3",
    }
    assert config.runtime_lora_updating and config.adapter_sync  # the launcher skips bad ones
    # The sidecar: same image and config, the adapters read-only, no GPU, no probe that could
    # take the server out of its Service.
    assert sync["image"] == vllm["image"]
    assert sync["command"][-3:] == ["kubetune.server.adapter_sync", "--config", sm.CONFIG_PATH]
    assert sync["ports"] == [{"name": "sync", "containerPort": SYNC_PORT, "protocol": "TCP"}]
    mounted = {m["mountPath"]: m.get("readOnly", False) for m in sync["volumeMounts"]}
    assert mounted == {
        "/kubetune/config": True,
        **{f: True for f in folders.values()},
        "/tmp": False,
    }
    assert not any(k.endswith("gpu") for k in sync["resources"]["limits"])
    assert not {"readinessProbe", "livenessProbe", "startupProbe"} & set(sync)
    assert sync["securityContext"]["readOnlyRootFilesystem"] is True


def test_a_live_servers_sidecar_gets_the_api_key_by_reference_as_vllm_does() -> None:
    key = {"apiKeySecretRef": {"name": "qwen-key", "key": "token"}}
    pod = objects(MOUNTS, **LIVE, **key)["Deployment"]["spec"]["template"]["spec"]
    vllm, sync = pod["containers"]
    ref = {"secretKeyRef": {"name": "qwen-key", "key": "token"}}
    for container in (vllm, sync):
        assert {"name": sm.API_KEY_ENV, "valueFrom": ref} in container["env"]


def test_a_live_servers_pods_roll_for_a_new_claim_not_for_a_new_adapter() -> None:
    def template(adapters: dict[str, sm.AdapterMount], **spec: Any) -> dict[str, Any]:
        return dict(objects(adapters, **spec)["Deployment"]["spec"]["template"])

    two = {k: MOUNTS[k] for k in ("alpha", "gamma")}
    assert template(MOUNTS, **LIVE) == template(two, **LIVE)
    assert template(MOUNTS) != template(two)  # Restart: every change rolls
    assert template({"alpha": MOUNTS["alpha"]}, **LIVE) != template(two, **LIVE)  # a new mount


def report(digest: str | None, served: list[str], **kw: Any) -> Report:
    fields: dict[str, Any] = {"synced": True, "pending": {}, "refused": {}, "error": None}
    return Report(digest=digest, served=served, **{**fields, **kw})


UP = st.ServingState(True, "DeploymentReady", "2/2 replicas ready")


def test_live_adapters_are_those_every_ready_replica_serves() -> None:
    reports: dict[str, Report | str] = {
        "qwen-server-a": report("new", ["alpha", "beta"]),
        "qwen-server-b": report("old", ["alpha"], synced=False),
    }
    served, state, refused = model_server.live_serving(["alpha", "beta"], "new", UP, reports, [])
    assert served == ["alpha"] and refused == []
    assert (state.ready, state.reason) == (False, "LoadingAdapters")
    assert state.message.startswith("1/2 replicas serve the current adapters; qwen-server-b: ")
    assert "has not read the new adapter set yet" in state.message

    reports["qwen-server-b"] = report("new", ["alpha", "beta"])
    served, state, _ = model_server.live_serving(["alpha", "beta"], "new", UP, reports, [])
    assert served == ["alpha", "beta"] and state == UP


def test_live_loading_and_refusals_are_named_and_a_replica_that_cannot_be_asked_counts_not() -> (
    None
):
    reports: dict[str, Report | str] = {
        "a": report(
            "d",
            ["alpha"],
            synced=False,
            pending={"beta": "files incomplete"},
            refused={"gamma": "rank 64 is above 16", "gone": "x"},
        ),
        "b": "no adapter report from http://10.0.0.2:8001/: ConnectTimeout: timed out",
    }
    served, state, refused = model_server.live_serving(
        ["alpha", "beta", "gamma"], "d", UP, reports, []
    )
    assert served == ["alpha"]  # b says nothing either way
    assert "a: loading beta (files incomplete)" in state.message
    assert "b: no adapter report from http://10.0.0.2:8001/" in state.message
    assert refused == [
        ms.RefusedAdapter(name="gamma", message="the server cannot load it: rank 64 is above 16")
    ]

    # No replica answers: the last confirmed set stands, less what is no longer wanted.
    served, state, _ = model_server.live_serving(
        ["alpha"], "d", UP, {"b": reports["b"]}, ["alpha", "beta"]
    )
    assert served == ["alpha"] and state.reason == "LoadingAdapters"
    # No ready replica: nothing is served, and the Deployment's own reason stands.
    down = st.ServingState(False, "DeploymentNotReady", "0/1 replicas ready")
    assert model_server.live_serving(["alpha"], "d", down, {}, ["alpha"]) == ([], down, [])


def test_a_live_server_is_ready_once_its_replicas_report_the_applied_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeKube(monkeypatch)
    spec = server_spec(**LIVE)
    members = [member("alpha"), member("beta")]

    def run(
        deploy: dict[str, Any] | None, reports: dict[str, Report | str]
    ) -> ms.ModelServerStatus:
        return model_server.reconcile(
            spec, OWNER, members, deploy, [], ms.ModelServerStatus(), SETTINGS, 1, reports
        )

    run(None, {})
    deploy = rolled(fake.applied[-1])
    chosen = model_server.plan(spec, NS, members, SETTINGS).adapters
    digest = msm.model_server_layout(spec, chosen)[1].adapter_digest()
    synced = run(deploy, {"p": report(digest, ["alpha", "beta"])})
    assert synced.adapters == ["alpha", "beta"] and ready(synced) == ("True", "DeploymentReady")
    loading = run(deploy, {"p": report("older", ["alpha"], synced=False)})
    assert loading.adapters == ["alpha"] and ready(loading) == ("False", "LoadingAdapters")
    refusing = run(deploy, {"p": report(digest, ["alpha"], refused={"beta": "bad weights"})})
    assert refusing.refused == [
        ms.RefusedAdapter(name="beta", message="the server cannot load it: bad weights")
    ]


def test_a_live_replica_behind_the_applied_set_gets_its_pod_annotated_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeKube(monkeypatch)
    patched: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(
        kube, "patch_merge", lambda api, kind, ns, name, body: patched.append((name, body))
    )
    spec = server_spec(**LIVE)
    members = [member("alpha")]
    pod = {
        "metadata": {"name": "p", "annotations": {}},
        "status": {"podIP": "10.0.0.9", "conditions": [{"type": "Ready", "status": "True"}]},
    }
    model_server.reconcile(spec, OWNER, members, None, [], ms.ModelServerStatus(), SETTINGS, 1)
    deploy = rolled(fake.applied[-1])
    chosen = model_server.plan(spec, NS, members, SETTINGS).adapters
    digest = msm.model_server_layout(spec, chosen)[1].adapter_digest()

    def run(reports: dict[str, Report | str]) -> None:
        model_server.reconcile(
            spec, OWNER, members, deploy, [pod], ms.ModelServerStatus(), SETTINGS, 1, reports
        )

    run({"p": report(digest, ["alpha"])})
    assert patched == []  # in step: the kubelet is not bothered
    run({"p": report("older", [])})
    ((name, body),) = patched
    notes = body["metadata"]["annotations"]
    assert name == "p" and notes[kubelet_nudge.ADAPTER_SET] == digest
    pod["metadata"]["annotations"] = notes
    run({"p": report("older", [])})
    assert len(patched) == 1  # asked already, moments ago


def test_a_job_on_a_live_server_that_loads_another_adapter_is_served() -> None:
    loading = {**READY, "status": "False", "reason": "LoadingAdapters", "message": "1/2 ..."}
    body = server_body(adapters=["alpha"], conditions=[loading])
    assert local_provider.shared_serving_state("qwen", JOB, body) == (
        True,
        "ModelServerReady",
        "served by ModelServer qwen (1/2 ...)",
    )
    pending = server_body(adapters=["beta"], conditions=[loading])
    assert local_provider.shared_serving_state("qwen", JOB, pending)[1] == "ModelServerPending"


def test_a_live_servers_event_says_what_the_replicas_report() -> None:
    (ev,) = model_server.events(
        ms.ModelServerStatus(adapters=["a"]), ms.ModelServerStatus(adapters=["a", "b"]), live=True
    )
    assert ev.message == "added b; as every ready replica reports"
