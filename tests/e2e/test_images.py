"""kubetune's trainer image runs the pod the operator builds for it.

The trainer Job of a local FineTuneJob, built by the operator's own builder, is run from
``kubetune/trainer:dev`` (``hack/images/build.sh trainer``) by docker the way a kubelet would run
it (``support.images``): its command and env, uid 1000, a read-only root, no capabilities, and
its volumes: the config ConfigMap, the model and dataset PVCs read-only, the job's own
subfolder of the output PVC, emptyDirs for /tmp, /dev/shm and the model cache. Host folders stand
in for the PVCs. It trains the demo job on the demo model and leaves the adapter and its records
in the job's folder, and nowhere else. (The operator's image is run in tests/cluster/test_chart.py,
against the API server.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api import finetunejob as ftj
from kubetune.api.result import TrainingResult
from kubetune.operator import manifests
from kubetune.operator.settings import OperatorSettings
from support import images

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
DEMO_JOB = REPO / "examples" / "daoyan-local.yaml"
DATASET = REPO / "examples" / "data" / "daoyan.jsonl"


@pytest.fixture(scope="module")
def trainer_image() -> str:
    return images.build("trainer")


def demo_spec() -> ftj.FineTuneJobSpec:
    """The demo job, with its model and dataset on PVCs as in a cluster, and fewer epochs."""
    spec: dict[str, Any] = yaml.safe_load(DEMO_JOB.read_text())["spec"]
    spec["model"] = {"pvc": {"claimName": "models", "path": "demo-tiny"}}
    spec["dataset"] = {"pvc": {"claimName": "datasets", "path": "daoyan.jsonl"}}
    spec["hyperparameters"]["epochs"] = 4
    return ftj.FineTuneJobSpec.model_validate(spec)


def test_the_operators_trainer_pod_trains_from_the_trainer_image(
    trainer_image: str, demo_model: Path, tmp_path: Path
) -> None:
    spec = demo_spec()
    owner = manifests.Owner(name="daoyan", namespace="team-a", uid="5f0c9a41-image-test")
    settings = OperatorSettings(trainer_image=trainer_image)
    config = manifests.trainer_config(spec, owner)
    job = manifests.trainer_job(spec, owner, settings, config)
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == trainer_image
    uid = pod["securityContext"]["runAsUser"]

    # What the ConfigMap and the PVCs hold. The output claim is shared: the pod sees only its
    # job's subfolder, which the test creates for the pod's user (as fsGroup would let it write).
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    for key, text in manifests.trainer_configmap(config, owner)["data"].items():
        (config_dir / key).write_text(text)
    models = tmp_path / "models"
    shutil.copytree(demo_model, models / "demo-tiny")
    for path in models.rglob("*"):  # safetensors writes 0600; a shared model PVC is readable
        path.chmod(0o755 if path.is_dir() else 0o644)
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    shutil.copy(DATASET, datasets / "daoyan.jsonl")
    output = tmp_path / "output"
    job_folder = output / manifests.output_subpath(spec, owner)
    job_folder.mkdir(parents=True)
    shutil.chown(job_folder, uid, uid)
    sources = {
        "config": config_dir,
        "model": models,
        "dataset": datasets,
        "output": output,
    }
    assert {n for n, v in volumes.items() if "emptyDir" not in v} == set(sources)

    container = images.run_like_kubelet(trainer_image, pod, workdir=tmp_path, sources=sources)
    try:
        code = container.wait(timeout=900)
        logs = container.logs()
        assert code == 0, logs[-4000:]
        assert "Read-only file system" not in logs, logs[-4000:]
    finally:
        container.remove()

    files = {p.name for p in job_folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "result.json"} <= files, files
    assert {"metrics.jsonl", "loss.png"} <= files, files
    # Nothing outside the job's folder; everything in it belongs to the pod's user.
    assert [p for p in output.rglob("*") if job_folder not in (p, *p.parents)] == [
        p for p in job_folder.parents if output in p.parents
    ]
    assert {p.stat().st_uid for p in job_folder.rglob("*")} == {uid}

    result = TrainingResult.model_validate_json((job_folder / "result.json").read_text())
    assert result.base_model == f"{manifests.MODEL_DIR}/demo-tiny"
    assert result.steps == result.total_steps > 0
    assert result.trained_tokens > 0
    adapter = json.loads((job_folder / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == f"{manifests.MODEL_DIR}/demo-tiny"
    assert adapter["r"] == spec.lora.r
    losses = [
        json.loads(line)["train_loss"]
        for line in (job_folder / "metrics.jsonl").read_text().splitlines()
        if json.loads(line).get("train_loss") is not None
    ]
    assert losses[-1] < losses[0], losses
