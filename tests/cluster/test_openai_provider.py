"""The operator, as a real process, runs ``provider: openai`` FineTuneJobs against the fake API.

The fake OpenAI fine-tuning API runs as its own process (tests/fakes/openai_finetune.py) and
each FineTuneJob points ``spec.openai.baseURL`` at it; the operator talks to it with the real
``openai`` client. The tests look at what a user sees (status, Events, the endpoint ConfigMap)
and at what the fake saw (how many paid jobs exist for a UID, what was cancelled and deleted,
and whether the API key travelled anywhere but the Authorization header).

The operator runs with the fake as its only allowed base URL (what the chart's
``openai.allowedBaseURLs`` sets), and the Secrets carry the label that lets kubetune use them.
The fake processes uploads for a second, as OpenAI does, before a job may use them.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from fakes.openai_finetune import AdminClient, Timing, run_subprocess
from support import ftj
from support.cluster import Cluster, ensure_binaries, wait_until
from support.operator import OperatorProcess, running_operator

pytestmark = pytest.mark.cluster

KEY = "sk-kubetune-cluster-3Fh8Jk2Lm9Np4Qr7St1V"
WRONG_KEY = "sk-kubetune-cluster-wrong-9Zy8Xw7Vu6Ts5R"
MODEL = "gpt-4o-mini-2024-07-18"
PRICES = {"gpt-4o-mini": 3.0, "gpt-4o": 25.0, "gpt-4.1-mini": 5.0}  # the chart's defaults
FAKE_TIMING = Timing(validating_s=1, queued_s=1, running_s=6, processing_s=1)
LABEL = {"kubetune.io/credentials": "openai"}


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminClient]:
    log = tmp_path_factory.mktemp("fake-openai") / "fake.log"
    with run_subprocess(api_keys=(KEY,), timing=FAKE_TIMING, log_path=log) as admin:
        yield admin


@pytest.fixture(scope="module")
def operator(
    cluster: Cluster, fake: AdminClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    ftj.install_crd(cluster)
    log = tmp_path_factory.mktemp("operator-openai") / "operator.log"
    env = {  # what the chart sets from its values
        "KUBETUNE_OPENAI_PRICES": json.dumps(PRICES),
        "KUBETUNE_OPENAI_ALLOWED_BASE_URLS": json.dumps([fake.base_url]),
    }
    with running_operator(cluster.kubeconfig, log, env=env) as op:
        yield op


@pytest.fixture
def team(cluster: Cluster, namespace: str, fake: AdminClient) -> Iterator[str]:
    ftj.dataset_configmap(cluster, namespace, ftj.dataset_text())
    cluster.apply(
        secret("openai", KEY),
        secret("openai-wrong", WRONG_KEY),
        secret("openai-unmarked", KEY, labels={}),
        namespace=namespace,
    )
    yield namespace
    fake.timing(**vars(FAKE_TIMING))


def secret(name: str, key: str, labels: dict[str, str] = LABEL) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "labels": labels},
        "stringData": {"api-key": key},
    }


def openai_job(
    name: str, fake: AdminClient, *, secret_name: str = "openai", data: str = "data", **fields: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "provider": "openai",
            "dataset": {"configMap": {"name": data, "key": "train.jsonl"}},
            "openai": {
                "model": MODEL,
                "apiKeySecretRef": {"name": secret_name, "key": "api-key"},
                "baseURL": fake.base_url,
                "suffix": "daoyan",
                **fields,
            },
        },
    }


def uid_of(cluster: Cluster, ns: str, name: str) -> str:
    return str(ftj.get_ftj(cluster, ns, name)["metadata"]["uid"])


def remote_jobs(cluster: Cluster, fake: AdminClient, ns: str, name: str) -> list[dict[str, Any]]:
    return fake.jobs_for(uid_of(cluster, ns, name))


def test_full_success_with_fine_tuned_model_cost_and_endpoint(
    cluster: Cluster, operator: OperatorProcess, fake: AdminClient, team: str
) -> None:
    cluster.apply(openai_job("daoyan", fake), namespace=team)
    done = ftj.wait_phase(cluster, team, "daoyan", "Succeeded", timeout=90)
    status = done["status"]

    jobs = remote_jobs(cluster, fake, team, "daoyan")
    assert len(jobs) == 1
    job = jobs[0]
    assert job["metadata"] == {
        "kubetune.io/uid": done["metadata"]["uid"],
        "kubetune.io/namespace": team,
        "kubetune.io/name": "daoyan",
    }
    assert status["fineTunedModel"] == job["fine_tuned_model"]
    assert (
        status["fineTunedModel"].startswith(f"ft:{MODEL}:")
        and ":daoyan:" in job["fine_tuned_model"]
    )
    assert status["trainedTokens"] == job["trained_tokens"]
    assert status["costUsd"] == round(job["trained_tokens"] * PRICES["gpt-4o-mini"] / 1e6, 4)
    assert status["estimate"]["examples"] == 12 and status["estimate"]["billedTokens"] > 0
    assert status["remote"]["id"] == job["id"] and status["remote"]["status"] == "succeeded"
    assert status["progress"]["summary"].endswith("(100%)")
    assert status["endpoint"]["baseURL"] == fake.base_url

    endpoint = wait_until(
        lambda: cluster.get("configmap", "daoyan-endpoint", "-n", team),
        timeout=30,
        description="the endpoint ConfigMap",
    )
    assert endpoint["data"] == {
        "OPENAI_BASE_URL": fake.base_url,
        "OPENAI_MODEL": job["fine_tuned_model"],
    }
    ftj.event_reasons(cluster, team, "daoyan", "Running", "Succeeded")
    # The upload was processed (a second) before the job was created: OpenAI refused nothing.
    assert [r for r in fake.requests() if r["status"] == 400] == []
    columns = cluster.kubectl("get", "ftj", "daoyan", "-n", team).stdout
    assert "Succeeded" in columns and "(100%)" in columns and fake.base_url in columns


def test_bad_data_fails_before_anything_is_uploaded(
    cluster: Cluster, operator: OperatorProcess, fake: AdminClient, team: str
) -> None:
    lines = ftj.dataset_text().splitlines()
    lines[2] = '{"messages": [{"role": "user", "content": "no answer"}]}'
    lines[6] = "{not json"
    ftj.dataset_configmap(cluster, team, "\n".join(lines) + "\n", name="broken")
    cluster.apply(openai_job("broken", fake, data="broken"), namespace=team)

    failed = ftj.wait_phase(cluster, team, "broken", "Failed", timeout=60)
    assert "line 3" in failed["status"]["message"] and "line 7" in failed["status"]["message"]
    uid = failed["metadata"]["uid"]
    assert fake.jobs_for(uid) == [] and fake.files_for(uid) == []


def test_rate_limits_and_server_errors_are_retried_to_success(
    cluster: Cluster, operator: OperatorProcess, fake: AdminClient, team: str
) -> None:
    fake.fail(429, count=3, retry_after="1", path="/v1/files", method="POST")
    fake.fail(500, count=2, path="/v1/fine_tuning/jobs", method="GET")
    fake.fail(503, count=2, path="/v1/fine_tuning/jobs/", method="GET")
    cluster.apply(openai_job("flaky", fake), namespace=team)

    ftj.wait_phase(cluster, team, "flaky", "Succeeded", timeout=120)
    assert len(remote_jobs(cluster, fake, team, "flaky")) == 1
    answered = [(r["method"], r["path"], r["status"]) for r in fake.requests()]
    assert ("POST", "/v1/files", 429) in answered and ("POST", "/v1/files", 200) in answered
    assert any(status in (500, 503) for _, _, status in answered)


def test_wrong_key_fails_fast_without_retries(
    cluster: Cluster, operator: OperatorProcess, fake: AdminClient, team: str
) -> None:
    before = len(fake.requests())
    cluster.apply(openai_job("denied", fake, secret_name="openai-wrong"), namespace=team)

    failed = ftj.wait_phase(cluster, team, "denied", "Failed", timeout=30)
    message = failed["status"]["message"]
    assert "401" in message and "invalid_api_key" in message
    assert WRONG_KEY not in message and WRONG_KEY[-4:] not in message
    assert fake.files_for(failed["metadata"]["uid"]) == []
    denied = [r for r in fake.requests()[before:] if r["status"] == 401]
    assert len(denied) == 1, "a 401 must be neither retried by the client nor by the operator"


def test_a_secret_without_the_kubetune_label_is_never_used(
    cluster: Cluster, operator: OperatorProcess, fake: AdminClient, team: str
) -> None:
    cluster.apply(openai_job("unmarked", fake, secret_name="openai-unmarked"), namespace=team)

    failed = ftj.wait_phase(cluster, team, "unmarked", "Failed", timeout=30)
    message = failed["status"]["message"]
    assert f"Secret {team}/openai-unmarked" in message
    assert "kubetune.io/credentials=openai" in message
    uid = failed["metadata"]["uid"]
    assert fake.files_for(uid) == [] and fake.jobs_for(uid) == []


def test_a_base_url_outside_the_allowlist_gets_no_key(
    cluster: Cluster, operator: OperatorProcess, fake: AdminClient, team: str
) -> None:
    # Nothing listens there: were the key sent, the job would retry connection errors forever.
    job = openai_job("elsewhere", fake)
    job["spec"]["openai"]["baseURL"] = "http://127.0.0.1:9/v1"
    cluster.apply(job, namespace=team)

    failed = ftj.wait_phase(cluster, team, "elsewhere", "Failed", timeout=30)
    message = failed["status"]["message"]
    assert "spec.openai.baseURL 'http://127.0.0.1:9/v1'" in message
    assert fake.base_url in message and "openai.allowedBaseURLs" in message


def test_lost_upload_answer_makes_no_second_file(
    cluster: Cluster, operator: OperatorProcess, fake: AdminClient, team: str
) -> None:
    fake.fail(500, method="POST", path="/v1/files", after_handling=True)
    cluster.apply(openai_job("upload", fake), namespace=team)

    done = ftj.wait_phase(cluster, team, "upload", "Succeeded", timeout=90)
    files = fake.files_for(done["metadata"]["uid"])
    assert len(files) == 1 and done["status"]["remote"]["trainingFile"] == files[0]["id"]


def test_a_revoked_key_while_following_keeps_the_job_and_says_what_to_fix(
    cluster: Cluster, operator: OperatorProcess, fake: AdminClient, team: str
) -> None:
    fake.timing(running_s=600)
    cluster.apply(openai_job("rotated", fake), namespace=team)
    running = ftj.wait_phase(cluster, team, "rotated", "Running", timeout=60)
    job_id = running["status"]["remote"]["id"]
    fake.fail(401, method="GET", path=f"/v1/fine_tuning/jobs/{job_id}")

    wait_until(
        lambda: f"OpenAI job {job_id} exists and may still be running" in operator.logs(),
        timeout=30,
        description="the operator to report the 401 as a wait",
    )
    assert "tries again every 5 minutes" in operator.logs()
    assert ftj.get_ftj(cluster, team, "rotated")["status"]["phase"] == "Running"
    assert [j["status"] for j in fake.jobs_for(running["metadata"]["uid"])] == ["running"]


def test_the_chart_passes_the_allowlist_to_the_operator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kubetune.operator.settings import OperatorSettings

    def env_of(*args: str) -> dict[str, str]:
        rendered = subprocess.run(
            [str(ensure_binaries() / "helm"), "template", "kt", str(ftj.REPO / "charts/kubetune"),
             "--show-only", "templates/deployment.yaml", *args],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout  # fmt: skip
        container = yaml.safe_load(rendered)["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e["value"] for e in container["env"]}

    for args, expected in [
        ((), ("https://api.openai.com/v1",)),
        (("--set", "openai.allowedBaseURLs={https://gw.example.com/v1}"),
         ("https://gw.example.com/v1",)),
        (("--set", "openai.allowedBaseURLs=null"), ()),
    ]:  # fmt: skip
        value = env_of(*args)["KUBETUNE_OPENAI_ALLOWED_BASE_URLS"]
        monkeypatch.setenv("KUBETUNE_OPENAI_ALLOWED_BASE_URLS", value)
        assert OperatorSettings.from_env().openai_allowed_base_urls == expected


def test_delete_mid_run_cancels_the_remote_job_and_deletes_its_files(
    cluster: Cluster, operator: OperatorProcess, fake: AdminClient, team: str
) -> None:
    fake.timing(running_s=600)
    cluster.apply(openai_job("gone", fake), namespace=team)
    ftj.wait_phase(cluster, team, "gone", "Running", timeout=60)
    uid = uid_of(cluster, team, "gone")
    assert len(fake.files_for(uid)) == 1

    cluster.kubectl("delete", "ftj", "gone", "-n", team, "--wait=false")
    wait_until(
        lambda: cluster.get("ftj", "gone", "-n", team) is None,
        timeout=60,
        description="the finalizer to cancel the remote job and let the FineTuneJob go",
    )

    jobs = fake.jobs_for(uid)
    assert [j["status"] for j in jobs] == ["cancelled"]
    assert jobs[0]["id"] in fake.state()["cancelled"]
    assert fake.files_for(uid) == []


def test_suspend_cancels_a_running_job(
    cluster: Cluster, operator: OperatorProcess, fake: AdminClient, team: str
) -> None:
    fake.timing(running_s=600)
    cluster.apply(openai_job("paused", fake), namespace=team)
    ftj.wait_phase(cluster, team, "paused", "Running", timeout=60)
    patch = json.dumps({"spec": {"suspend": True}})
    cluster.kubectl("patch", "ftj", "paused", "-n", team, "--type=merge", "-p", patch)

    ftj.wait_phase(cluster, team, "paused", "Cancelled", timeout=30)
    assert [j["status"] for j in remote_jobs(cluster, fake, team, "paused")] == ["cancelled"]


def test_operator_killed_right_after_creating_the_job_makes_no_second_job(
    cluster: Cluster, operator: OperatorProcess, fake: AdminClient, team: str
) -> None:
    # The fake makes the job, then holds the answer: the operator dies before it hears of it.
    fake.fail(500, method="POST", path="/v1/fine_tuning/jobs", after_handling=True, delay=20)
    cluster.apply(openai_job("crash", fake), namespace=team)
    uid = uid_of(cluster, team, "crash")
    wait_until(lambda: fake.jobs_for(uid), timeout=60, description="the remote job")
    operator.restart(kill=True)

    done = ftj.wait_phase(cluster, team, "crash", "Succeeded", timeout=90)
    jobs = fake.jobs_for(uid)
    assert len(jobs) == 1 and done["status"]["remote"]["id"] == jobs[0]["id"]
    assert len(fake.files_for(uid)) == 1
    operator.assert_alive()


def test_the_key_never_leaks(
    cluster: Cluster, operator: OperatorProcess, fake: AdminClient, team: str
) -> None:
    """Runs last: by now the operator has done everything above with these keys."""
    cluster.apply(openai_job("quiet", fake), namespace=team)
    cluster.apply(openai_job("quiet-denied", fake, secret_name="openai-wrong"), namespace=team)
    ftj.wait_phase(cluster, team, "quiet", "Succeeded", timeout=90)
    ftj.wait_phase(cluster, team, "quiet-denied", "Failed", timeout=30)

    seen = {
        "FineTuneJobs": cluster.kubectl("get", "ftj", "-A", "-o", "json").stdout,
        "Events": cluster.kubectl("get", "events", "-A", "-o", "json").stdout,
        "ConfigMaps": cluster.kubectl("get", "configmaps", "-n", team, "-o", "json").stdout,
        "operator log": operator.logs(),
    }
    assert len(seen["operator log"]) > 0
    for where, text in seen.items():
        for key in (KEY, WRONG_KEY):
            assert key not in text, f"the API key is in the {where}"
            assert key[-4:] not in text, f"the end of the API key (masked echo) is in the {where}"
    assert fake.leaks(KEY) == [], "the key travelled outside the Authorization header"
    assert fake.leaks(WRONG_KEY) == []
