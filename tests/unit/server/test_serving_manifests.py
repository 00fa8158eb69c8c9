"""The serving ConfigMap, Deployment and Service the operator creates for a finished job."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from kubetune.api import finetunejob as ftj
from kubetune.api.serveconfig import ServeConfig
from kubetune.operator import manifests
from kubetune.operator import serving_manifests as sm
from kubetune.operator.settings import OperatorSettings
from kubetune.server import adapter_checks, vllm_args

OWNER = manifests.Owner(name="daoyan", namespace="team-a", uid="0123456789abcdef")
SETTINGS = OperatorSettings(model_cache_claim="hf-cache")
SUBPATH = "team-a/daoyan-01234567"


def objects(
    serve: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    settings: OperatorSettings = SETTINGS,
    **kw: Any,
) -> dict[str, dict[str, Any]]:
    out = sm.serving_objects(
        owner=OWNER,
        serve=ftj.ServeSpec.model_validate(serve or {"resources": {"gpus": 2}}),
        base_model=ftj.ModelRef.model_validate(model or {"id": "Qwen/Qwen2.5-0.5B-Instruct"}),
        adapter_claim="kubetune-output",
        adapter_subpath=SUBPATH,
        lora_rank=16,
        settings=settings,
        **kw,
    )
    return {o["kind"]: o for o in out}


def pod(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    p: dict[str, Any] = objs["Deployment"]["spec"]["template"]["spec"]
    return p


def container(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    c: dict[str, Any] = pod(objs)["containers"][0]
    return c


def served_config(objs: dict[str, dict[str, Any]]) -> ServeConfig:
    return ServeConfig.model_validate(yaml.safe_load(objs["ConfigMap"]["data"][sm.CONFIG_FILE]))


def test_three_objects_in_creation_order_all_owned_and_labelled() -> None:
    out = sm.serving_objects(
        owner=OWNER, serve=ftj.ServeSpec(), base_model=ftj.ModelRef(id="m/x"),
        adapter_claim="c", adapter_subpath="s", lora_rank=8, settings=SETTINGS,
    )  # fmt: skip
    assert [o["kind"] for o in out] == ["ConfigMap", "Deployment", "Service"]
    for o in out:
        meta = o["metadata"]
        assert meta["namespace"] == "team-a"
        assert meta["ownerReferences"] == [OWNER.reference()]
        assert meta["labels"][manifests.LABEL_JOB] == "daoyan"
        assert meta["labels"][manifests.LABEL_COMPONENT] == "server"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "kubetune"
        assert meta["labels"]["app.kubernetes.io/name"] == "vllm"
    assert out[1]["metadata"]["name"] == out[2]["metadata"]["name"] == "daoyan-server"


def test_service_selects_the_deployments_pods_on_port_8000() -> None:
    objs = objects()
    svc, dep = objs["Service"], objs["Deployment"]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}
    ]
    assert container(objs)["ports"][0]["containerPort"] == 8000


def test_serve_config_serves_the_jobs_adapter_under_the_jobs_name() -> None:
    c = served_config(objects())
    assert c.model == "Qwen/Qwen2.5-0.5B-Instruct" and c.base_name == c.model
    assert [(a.name, a.path) for a in c.adapters] == [("daoyan", "/kubetune/output")]
    assert c.port == 8000 and c.tensor_parallel_size == 2 and c.max_lora_rank == 16
    assert c.api_key_env is None and not c.runtime_lora_updating
    assert container(objects())["command"] == [
        "python", "-m", "kubetune.server", "--config", "/kubetune/config/serve.yaml",
    ]  # fmt: skip


def test_probes_health_with_a_startup_budget_for_model_loading() -> None:
    c = container(objects())
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800


def test_gpus_shm_and_placement() -> None:
    objs = objects(
        {"resources": {"gpus": 2, "memory": "64Gi", "nodeSelector": {"pool": "a100"},
                       "priorityClassName": "serving"}}
    )  # fmt: skip
    res = container(objs)["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "2"
    p = pod(objs)
    shm = next(v for v in p["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "shm", "mountPath": "/dev/shm"} in container(objs)["volumeMounts"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in p[
        "tolerations"
    ]
    assert p["nodeSelector"] == {"pool": "a100"} and p["priorityClassName"] == "serving"
    # No surge pod on a full GPU pool: replace in place.
    assert objs["Deployment"]["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


def test_a_queue_puts_the_deployment_and_its_pods_under_kueue() -> None:
    queued = objects(queue="serving-gpus")["Deployment"]
    label = manifests.KUEUE_QUEUE_LABEL
    assert queued["metadata"]["labels"][label] == "serving-gpus"
    assert queued["spec"]["template"]["metadata"]["labels"][label] == "serving-gpus"
    # The Deployment's selector is immutable: the queue is not part of it.
    assert label not in queued["spec"]["selector"]["matchLabels"]
    plain = objects()["Deployment"]
    assert label not in plain["metadata"]["labels"]
    assert label not in plain["spec"]["template"]["metadata"]["labels"]


def test_cpu_engine_asks_for_no_gpu() -> None:
    objs = objects({"engine": "vllm-cpu", "resources": {"gpus": 1, "cpu": "4"}})
    res = container(objs)["resources"]
    assert "nvidia.com/gpu" not in res["limits"] and res["limits"]["cpu"] == "4"
    assert pod(objs)["tolerations"] == []
    assert served_config(objs).tensor_parallel_size == 1
    assert served_config(objs).engine == "vllm-cpu"


@pytest.mark.parametrize(
    ("memory", "gib"), [(None, 4), ("32Gi", 8), ("64G", 14), ("2Gi", 1), ("1536Mi", 1)]
)
def test_cpu_engine_sizes_its_kv_cache_from_the_pods_memory(memory: str | None, gib: int) -> None:
    # vLLM-CPU would otherwise reserve 92% of the node's memory, whatever the pod's limit.
    resources = {"memory": memory} if memory else {}
    objs = objects({"engine": "vllm-cpu", "resources": resources})
    env = {e["name"]: e.get("value") for e in container(objs)["env"]}
    assert env["VLLM_CPU_KVCACHE_SPACE"] == str(gib)
    gpu = {e["name"] for e in container(objects({"engine": "vllm"}))["env"]}
    assert "VLLM_CPU_KVCACHE_SPACE" not in gpu


@pytest.mark.parametrize(("engine", "image"), [("vllm", "gpu:1"), ("vllm-cpu", "cpu:1")])
def test_each_engine_runs_from_its_own_image(engine: str, image: str) -> None:
    settings = OperatorSettings(server_image="gpu:1", server_cpu_image="cpu:1")
    objs = objects({"engine": engine}, settings=settings)
    assert container(objs)["image"] == image


def test_adapter_is_the_jobs_output_folder_mounted_read_only() -> None:
    objs = objects()
    vol = next(v for v in pod(objs)["volumes"] if v["name"] == "adapter")
    assert vol["persistentVolumeClaim"] == {"claimName": "kubetune-output", "readOnly": True}
    mount = next(m for m in container(objs)["volumeMounts"] if m["name"] == "adapter")
    assert mount == {
        "name": "adapter", "mountPath": "/kubetune/output", "subPath": SUBPATH, "readOnly": True,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("claim", "kind"), [("hf-cache", "persistentVolumeClaim"), (None, "emptyDir")]
)
def test_model_cache_volume_is_hf_home(claim: str | None, kind: str) -> None:
    objs = objects(settings=OperatorSettings(model_cache_claim=claim))
    vol = next(v for v in pod(objs)["volumes"] if v["name"] == "cache")
    assert kind in vol
    env = {e["name"]: e.get("value") for e in container(objs)["env"]}
    assert env["HF_HOME"].startswith(manifests.CACHE_DIR)
    assert env["VLLM_CACHE_ROOT"].startswith(manifests.CACHE_DIR)


def test_pvc_base_model_is_mounted_where_the_trainer_saw_it() -> None:
    objs = objects(model={"pvc": {"claimName": "models", "path": "llama/tiny"}})
    c = served_config(objs)
    assert c.model == "/kubetune/model/llama/tiny" and c.base_name == "tiny"
    # The trainer got the same path (so the adapter records it as its base model).
    spec = ftj.FineTuneJobSpec.model_validate(
        {"model": {"pvc": {"claimName": "models", "path": "llama/tiny"}},
         "dataset": {"url": "https://x/d.jsonl"}}
    )  # fmt: skip
    assert manifests.trainer_config(spec, OWNER).model.id_or_path == c.model
    mount = next(m for m in container(objs)["volumeMounts"] if m["name"] == "model")
    assert mount["readOnly"] and mount["mountPath"] == manifests.MODEL_DIR


def test_non_root_locked_down_security_context() -> None:
    objs = objects()
    psc, csc = pod(objs)["securityContext"], container(objs)["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"] == {"drop": ["ALL"]}
    assert pod(objs)["automountServiceAccountToken"] is False
    assert {"name": "tmp", "mountPath": "/tmp"} in container(objs)["volumeMounts"]


def test_api_key_comes_from_the_secret_and_never_appears_in_config() -> None:
    objs = objects({"apiKeySecretRef": {"name": "daoyan-key", "key": "token"}})
    env = {e["name"]: e for e in container(objs)["env"]}
    assert env[sm.API_KEY_ENV]["valueFrom"] == {
        "secretKeyRef": {"name": "daoyan-key", "key": "token"}
    }
    assert served_config(objs).api_key_env == sm.API_KEY_ENV
    assert "VLLM_API_KEY" not in env  # the launcher sets it from KUBETUNE_API_KEY
    assert sm.API_KEY_ENV not in {e["name"] for e in container(objects())["env"]}


def test_a_config_change_rolls_the_pods() -> None:
    def config_hash(objs: dict[str, dict[str, Any]]) -> str:
        ann = objs["Deployment"]["spec"]["template"]["metadata"]["annotations"]
        return str(ann[manifests.CONFIG_HASH_ANNOTATION])

    assert config_hash(objects()) == config_hash(objects())
    changed = objects({"resources": {"gpus": 2}, "maxModelLength": 2048})
    assert config_hash(changed) != config_hash(objects())
    assert served_config(changed).max_model_len == 2048


def test_replicas_and_runtime_updating() -> None:
    objs = objects({"replicas": 3}, runtime_lora_updating=True)
    assert objs["Deployment"]["spec"]["replicas"] == 3
    assert served_config(objs).runtime_lora_updating


@pytest.mark.parametrize(
    ("model", "served"),
    [
        ({"pvc": {"claimName": "models", "path": "llama/Llama 3 8B"}}, "Llama-3-8B"),
        ({"pvc": {"claimName": "models", "path": "_base/"}}, "base"),
        ({"pvc": {"claimName": "models", "path": "x=1,y=2"}}, "x-1-y-2"),
        ({"pvc": {"claimName": "models", "path": "weights/__"}}, "models"),
        ({"pvc": {"claimName": "models", "path": ""}}, "models"),
        ({"pvc": {"claimName": "models", "path": "runs/daoyan"}}, "daoyan-base"),
        ({"pvc": {"claimName": "daoyan", "path": ""}}, "daoyan-base"),
        ({"id": "daoyan"}, "daoyan-base"),
        ({"id": "Qwen/Qwen2.5-0.5B-Instruct"}, "Qwen/Qwen2.5-0.5B-Instruct"),
    ],
)
def test_the_base_model_is_served_under_a_valid_name_other_than_the_adapters(
    model: dict[str, Any], served: str
) -> None:
    # A folder name the serve config would refuse (spaces, `=`/`,`, a leading `_`) or the job's
    # own name would make the serve config invalid, and the server could never be created.
    config = served_config(objects(model=model))
    assert config.served_model_name == served
    assert [a.name for a in config.adapters] == ["daoyan"]


def test_a_long_folder_name_is_cut_to_a_served_name() -> None:
    model = {"pvc": {"claimName": "models", "path": "m" * 300}}
    config = served_config(objects(model=model))
    assert config.served_model_name == "m" * sm.MAX_FOLDER_NAME


def test_pod_annotations_reach_the_server_pods_and_the_config_hash_stays_ours() -> None:
    annotations = {
        "sidecar.istio.io/inject": "false",
        "cluster-autoscaler.kubernetes.io/safe-to-evict": "false",
        manifests.CONFIG_HASH_ANNOTATION: "from-the-spec",
    }
    objs = objects({"resources": {"gpus": 1, "podAnnotations": annotations}})
    got = objs["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert got["sidecar.istio.io/inject"] == "false"
    assert got["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    assert got[manifests.CONFIG_HASH_ANNOTATION] != "from-the-spec"
    plain = objects({"resources": {"gpus": 1}})["Deployment"]["spec"]["template"]["metadata"]
    assert (
        got[manifests.CONFIG_HASH_ANNOTATION]
        == plain["annotations"][manifests.CONFIG_HASH_ANNOTATION]
    )


def test_the_jobs_rank_caps_the_server_at_that_rank_rounded_up_to_one_vllm_supports() -> None:
    out = sm.serving_objects(
        owner=OWNER, serve=ftj.ServeSpec(engine="vllm-cpu"), base_model=ftj.ModelRef(id="m/x"),
        adapter_claim="c", adapter_subpath="s", lora_rank=10, settings=SETTINGS,
    )  # fmt: skip
    config = served_config({o["kind"]: o for o in out})
    assert config.max_lora_rank == 10 and vllm_args.rank_limit(config) == 16

    def info(rank: int) -> adapter_checks.AdapterInfo:
        return adapter_checks.AdapterInfo("daoyan", sm.ADAPTER_PATH, rank, "m/x")

    adapter_checks.check_adapter(info(16), config)
    with pytest.raises(adapter_checks.AdapterRankTooHigh, match="accepts at most 16"):
        adapter_checks.check_adapter(info(17), config)


def test_the_server_downloads_a_gated_base_model_with_the_models_token_and_mirror() -> None:
    ref = {"name": "hf-token", "key": "token"}
    mirror = OperatorSettings(hf_endpoint="https://hf-mirror.internal")
    objs = objects(model={"id": "meta-llama/Llama-3.1-8B", "tokenSecretRef": ref}, settings=mirror)
    env = {e["name"]: e for e in container(objs)["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": ref}
    assert env["HF_ENDPOINT"]["value"] == "https://hf-mirror.internal"
    assert "hf-token" not in str(objs["ConfigMap"])
    on_pvc = objects(model={"pvc": {"claimName": "weights", "path": "llama"}}, settings=mirror)
    names = {e["name"] for e in container(on_pvc)["env"]}
    assert not names & {"HF_TOKEN", "HF_ENDPOINT"}
