"""Pure builders for a local FineTuneJob's children."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.api import finetunejob as ftj
from kubetune.api.jobconfig import TrainerConfig
from kubetune.operator import manifests
from kubetune.operator.settings import OperatorSettings

OWNER = manifests.Owner(name="daoyan", namespace="team-a", uid="0123456789abcdef")
SETTINGS = OperatorSettings()


def spec(**over: Any) -> ftj.FineTuneJobSpec:
    base: dict[str, Any] = {
        "model": {"id": "Qwen/Qwen2.5-0.5B-Instruct"},
        "dataset": {"configMap": {"name": "daoyan-data", "key": "train.jsonl"}},
        "resources": {
            "gpus": 2,
            "cpu": "8",
            "memory": "32Gi",
            "nodeSelector": {"kubetune.io/gpu-pool": "a100"},
            "priorityClassName": "team-a-batch",
        },
        "queue": "team-a",
    }
    base.update(over)
    return ftj.FineTuneJobSpec.model_validate(base)


def job(s: ftj.FineTuneJobSpec | None = None) -> dict[str, Any]:
    s = s or spec()
    return manifests.trainer_job(s, OWNER, SETTINGS, manifests.trainer_config(s, OWNER))


def container(j: dict[str, Any]) -> dict[str, Any]:
    c: dict[str, Any] = j["spec"]["template"]["spec"]["containers"][0]
    return c


def test_job_is_owned_named_and_labelled() -> None:
    j = job()
    meta = j["metadata"]
    assert meta["name"] == "daoyan-trainer" and meta["namespace"] == "team-a"
    assert meta["ownerReferences"][0]["uid"] == OWNER.uid
    assert meta["ownerReferences"][0]["controller"] is True
    assert meta["labels"][manifests.KUEUE_QUEUE_LABEL] == "team-a"
    assert j["spec"]["template"]["metadata"]["labels"][manifests.LABEL_JOB] == "daoyan"


def test_gpu_requests_placement_and_toleration() -> None:
    j = job()
    pod = j["spec"]["template"]["spec"]
    res = container(j)["resources"]
    assert res["limits"]["nvidia.com/gpu"] == "2" and res["requests"]["nvidia.com/gpu"] == "2"
    assert res["limits"]["memory"] == "32Gi"
    assert pod["nodeSelector"] == {"kubetune.io/gpu-pool": "a100"}
    assert pod["priorityClassName"] == "team-a-batch"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]


def test_cpu_only_job_asks_for_no_gpu_and_no_toleration() -> None:
    j = job(spec(resources={"gpus": 0}))
    assert "nvidia.com/gpu" not in container(j).get("resources", {}).get("limits", {})
    assert j["spec"]["template"]["spec"]["tolerations"] == []


def test_output_is_the_jobs_own_subpath() -> None:
    s = spec(output={"pvc": {"claimName": "adapters", "path": "tuned"}})
    mounts = {m["name"]: m for m in container(job(s))["volumeMounts"]}
    assert mounts["output"]["subPath"] == "tuned/team-a/daoyan-01234567"
    assert mounts["output"]["mountPath"] == manifests.OUTPUT_DIR
    other = manifests.Owner(name="daoyan", namespace="team-b", uid="fedcba9876543210")
    assert manifests.output_subpath(s, other) != manifests.output_subpath(s, OWNER)


def test_security_context_is_non_root_with_shm() -> None:
    j = job()
    pod = j["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container(j)["securityContext"]["allowPrivilegeEscalation"] is False
    assert container(j)["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"


def test_with_a_read_only_root_home_is_a_writable_volume() -> None:
    j = job()
    pod = j["spec"]["template"]["spec"]
    assert container(j)["securityContext"]["readOnlyRootFilesystem"] is True
    env = {e["name"]: e.get("value") for e in container(j)["env"]}
    mounts = {m["mountPath"]: m["name"] for m in container(j)["volumeMounts"]}
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[env["HOME"]])
    assert "emptyDir" in volume


def test_deadline_backoff_and_bad_input_fails_fast() -> None:
    j = job(spec(activeDeadlineSeconds=3600, backoffLimit=1))
    assert j["spec"]["activeDeadlineSeconds"] == 3600 and j["spec"]["backoffLimit"] == 1
    rules = j["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"]["values"] == [2]


def test_suspend_carries_to_the_job() -> None:
    assert job(spec(suspend=True))["spec"]["suspend"] is True


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [
        ({"configMap": {"name": "d", "key": "k.jsonl"}}, {"path": "/kubetune/data/train.jsonl"}),
        (
            {"pvc": {"claimName": "d", "path": "sets/t.jsonl"}},
            {"path": "/kubetune/dataset/sets/t.jsonl"},
        ),
        ({"url": "https://example.com/t.jsonl"}, {"url": "https://example.com/t.jsonl"}),
    ],
)
def test_config_resolves_dataset_to_pod_paths(
    dataset: dict[str, Any], expected: dict[str, str]
) -> None:
    s = spec(dataset=dataset)
    config = manifests.trainer_config(s, OWNER)
    assert config.dataset.to_wire() == expected
    mounts = [m["mountPath"] for m in container(job(s))["volumeMounts"]]
    if "path" in expected:
        assert any(expected["path"].startswith(m) for m in mounts)


def test_config_is_a_valid_trainer_config_with_progress_sink() -> None:
    s = spec()
    config = manifests.trainer_config(s, OWNER)
    again = TrainerConfig.model_validate(config.to_wire())
    assert again == config
    assert config.progress.config_map is not None
    assert config.progress.config_map.name == "daoyan-progress"
    cm = manifests.trainer_configmap(config, OWNER)
    assert manifests.CONFIG_FILE in cm["data"]


def test_trainer_may_only_patch_its_progress_configmap() -> None:
    sa, role, binding = manifests.trainer_rbac(OWNER)
    assert sa["kind"] == "ServiceAccount"
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["daoyan-progress"],
            "verbs": ["get", "patch"],
        }
    ]
    assert binding["subjects"][0]["name"] == sa["metadata"]["name"]
    assert job()["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


def test_endpoint_configmap_has_no_secret() -> None:
    cm = manifests.endpoint_configmap(OWNER, "http://daoyan-server.team-a.svc:8000/v1", "daoyan")
    assert cm["data"] == {
        "OPENAI_BASE_URL": "http://daoyan-server.team-a.svc:8000/v1",
        "OPENAI_MODEL": "daoyan",
    }


def test_cleanup_job_mounts_only_the_jobs_folder_and_outlives_its_owner() -> None:
    s = spec(output={"pvc": {"claimName": "adapters", "path": "tuned"}, "keepOnDelete": False})
    j = manifests.cleanup_job(s, OWNER, SETTINGS)
    assert "ownerReferences" not in j["metadata"]
    mount = j["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]
    assert mount["subPath"] == "tuned/team-a/daoyan-01234567"
    assert j["spec"]["ttlSecondsAfterFinished"] > 0


def test_every_child_of_a_longest_named_job_has_a_valid_name() -> None:
    from kubetune.operator import serving_manifests

    owner = manifests.Owner(name="x" * ftj.MAX_NAME_LENGTH, namespace="team-a", uid=OWNER.uid)
    names = [
        manifests.trainer_name(owner),
        manifests.config_name(owner),
        manifests.progress_name(owner),
        manifests.endpoint_name(owner),
        manifests.cleanup_name(owner),  # a Job: its name is also its pods' job-name label
        serving_manifests.server_name(owner),
        serving_manifests.config_name(owner),
    ]
    assert max(len(n) for n in names) <= 63, names


def test_a_queued_job_is_created_suspended_for_kueue_to_admit() -> None:
    assert job(spec(queue="team-a"))["spec"]["suspend"] is True
    assert job(spec(queue=None))["spec"]["suspend"] is False


def test_cluster_defaults_fill_what_the_spec_leaves_out() -> None:
    settings = OperatorSettings(
        gpu_resource_name="amd.com/gpu",
        default_resources={"trainer": {"cpu": "8", "memory": "64Gi"}},
    )
    s = spec(resources={"gpus": 1})
    j = manifests.trainer_job(s, OWNER, settings, manifests.trainer_config(s, OWNER))
    limits = container(j)["resources"]["limits"]
    assert limits == {"cpu": "8", "memory": "64Gi", "amd.com/gpu": "1"}
    assert j["spec"]["template"]["spec"]["tolerations"][0]["key"] == "amd.com/gpu"
    s = spec(resources={"gpus": 1, "cpu": "2", "gpuResourceName": "nvidia.com/mig-3g.40gb"})
    j = manifests.trainer_job(s, OWNER, settings, manifests.trainer_config(s, OWNER))
    assert container(j)["resources"]["limits"] == {
        "cpu": "2",
        "memory": "64Gi",
        "nvidia.com/mig-3g.40gb": "1",
    }


def test_the_trainer_is_told_its_grace_period() -> None:
    from kubetune.trainer import launch

    pod = job()["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert manifests.GRACE_ENV == launch.GRACE_ENV
    assert env[launch.GRACE_ENV] == str(pod["terminationGracePeriodSeconds"])


def env_of(j: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(j)["env"]}


def test_a_gated_models_token_reaches_the_trainer_as_a_secret_reference_only() -> None:
    ref = {"name": "hf-token", "key": "token"}
    s = spec(model={"id": "meta-llama/Llama-3.1-8B-Instruct", "tokenSecretRef": ref})
    env = env_of(job(s))
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": ref}}
    assert "HF_ENDPOINT" not in env  # huggingface.co unless the chart names a mirror
    # The resolved config (a ConfigMap any reader of the namespace sees) names no Secret.
    config = manifests.trainer_configmap(manifests.trainer_config(s, OWNER), OWNER)
    assert "hf-token" not in str(config)


def test_the_charts_hub_mirror_is_the_trainers_hf_endpoint_for_hub_models_only() -> None:
    mirror = OperatorSettings(hf_endpoint="https://hf-mirror.internal")
    s = spec()
    env = env_of(manifests.trainer_job(s, OWNER, mirror, manifests.trainer_config(s, OWNER)))
    assert env["HF_ENDPOINT"]["value"] == "https://hf-mirror.internal"
    assert env["HF_HUB_DISABLE_TELEMETRY"]["value"] == "1"
    assert "HF_TOKEN" not in env
    on_pvc = spec(model={"pvc": {"claimName": "weights", "path": "llama"}})
    env = env_of(
        manifests.trainer_job(on_pvc, OWNER, mirror, manifests.trainer_config(on_pvc, OWNER))
    )
    assert not env.keys() & {"HF_ENDPOINT", "HF_TOKEN", "HF_HUB_DISABLE_TELEMETRY"}


def test_settings_read_the_hub_mirror_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_HF_ENDPOINT", "https://hf-mirror.internal")
    assert OperatorSettings.from_env().hf_endpoint == "https://hf-mirror.internal"
    monkeypatch.setenv("KUBETUNE_HF_ENDPOINT", "")
    assert OperatorSettings.from_env().hf_endpoint is None
