"""The glue of OpenAI jobs (``openai_handlers``): whose key is sent where, and how often.

The Kubernetes side is replaced by dicts (``kube.get`` returns the Secret a test sets up,
``checks.open_dataset`` the dataset); the OpenAI side is the fake API, driven with the real
``openai`` client, so "nothing was sent" is checked on the fake's request log.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest

from fakes.openai_finetune import FakeOpenAI, Timing
from kubetune.api import finetunejob as ftj
from kubetune.api import jobstatus, openai_spec
from kubetune.operator import checks, kube, manifests
from kubetune.operator import openai_errors as errors
from kubetune.operator import openai_handlers as handlers
from kubetune.operator.settings import OperatorSettings

KEY = "sk-kubetune-handlers-Q2w3E4r5T6y7U8i9O0pA"
NAMESPACE = "team-a"
OWNER = manifests.Owner(
    name="daoyan", namespace=NAMESPACE, uid="0a1b2c3d-0000-4000-8000-0000000000ef"
)
MODEL = "gpt-4o-mini-2024-07-18"
LABEL = {"kubetune.io/credentials": "openai"}
TRAINING = "\n".join(
    json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                             {"role": "assistant", "content": f"a{i}"}]})
    for i in range(12)
).encode()  # fmt: skip


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def secret(labels: dict[str, str] | None = None, **data: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "openai", "namespace": NAMESPACE, "labels": labels},
        "data": {k.replace("_", "-"): b64(v) for k, v in (data or {"api_key": KEY}).items()},
    }


def make_spec(base_url: str | None, **fields: Any) -> ftj.FineTuneJobSpec:
    openai_spec: dict[str, Any] = {"model": MODEL, "apiKeySecretRef": {"name": "openai"}, **fields}
    if base_url is not None:
        openai_spec["baseURL"] = base_url
    return ftj.FineTuneJobSpec.model_validate(
        {
            "provider": "openai",
            "dataset": {"configMap": {"name": "data", "key": "train.jsonl"}},
            "openai": openai_spec,
        }
    )


class Kube:
    """What the handlers read from and write to the API server, in memory."""

    def __init__(self) -> None:
        self.secrets: dict[str, dict[str, Any]] = {}
        self.reads: list[tuple[str, str]] = []
        self.created: list[dict[str, Any]] = []

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Any:
        self.reads.append((kind, name))
        return self.secrets.get(name) if kind == "Secret" else None


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Kube:
    k = Kube()
    k.secrets["openai"] = secret(LABEL)
    monkeypatch.setattr(kube, "get", k.get)
    monkeypatch.setattr(kube, "create_or_adopt", lambda obj: k.created.append(obj) or obj)
    monkeypatch.setattr(
        checks, "open_dataset", lambda *_, **__: contextlib.nullcontext(io.BytesIO(TRAINING))
    )
    return k


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_keys=(KEY,), timing=Timing(2, 2, 10)).serve() as f:
        yield f


def settings_for(fake: FakeOpenAI, **kw: Any) -> OperatorSettings:
    return OperatorSettings(openai_allowed_base_urls=(fake.base_url,), **kw)


# ----------------------------------------------------------------------------- base URL


def openai_of(spec: ftj.FineTuneJobSpec) -> openai_spec.OpenAISpec:
    assert spec.openai is not None
    return spec.openai


def test_the_default_allowlist_is_openai_only() -> None:
    allowed = OperatorSettings().openai_allowed_base_urls
    assert allowed == ("https://api.openai.com/v1",)
    default = handlers.allowed_base_url(openai_of(make_spec(None)), allowed)
    assert default == "https://api.openai.com/v1"
    same = openai_of(make_spec("https://API.OpenAI.com/v1/"))
    assert handlers.allowed_base_url(same, allowed) == "https://API.OpenAI.com/v1/"
    for other in ("https://api.openai.com/v2", "https://api.openai.com.evil.io/v1",
                  "http://api.openai.com/v1"):  # fmt: skip
        with pytest.raises(errors.RefusedProviderError):
            handlers.allowed_base_url(openai_of(make_spec(other)), allowed)


def test_a_base_url_outside_the_allowlist_is_refused_before_the_secret_is_read(
    cluster: Kube, fake: FakeOpenAI
) -> None:
    spec = make_spec("https://collector.example.com/v1")
    with pytest.raises(errors.RefusedProviderError) as caught:
        handlers.reconcile(spec, OWNER, jobstatus.FineTuneJobStatus(), settings_for(fake), 1)

    text = str(caught.value)
    assert "spec.openai.baseURL 'https://collector.example.com/v1'" in text
    assert fake.base_url in text and "openai.allowedBaseURLs" in text
    assert isinstance(caught.value, errors.PermanentProviderError)
    assert cluster.reads == [] and fake.requests == []


def test_the_default_base_url_is_refused_when_the_allowlist_lacks_it(cluster: Kube) -> None:
    settings = OperatorSettings(openai_allowed_base_urls=("https://llm.internal/v1",))
    with pytest.raises(errors.RefusedProviderError) as caught:
        handlers.reconcile(make_spec(None), OWNER, jobstatus.FineTuneJobStatus(), settings, 1)
    assert "the default base URL 'https://api.openai.com/v1'" in str(caught.value)
    assert "https://llm.internal/v1" in str(caught.value) and cluster.reads == []


# ----------------------------------------------------------------------------- the Secret


def test_a_secret_without_the_label_is_refused_and_nothing_is_sent(
    cluster: Kube, fake: FakeOpenAI
) -> None:
    cluster.secrets["openai"] = secret({"app": "billing"})
    with pytest.raises(errors.RefusedProviderError) as caught:
        handlers.reconcile(
            make_spec(fake.base_url), OWNER, jobstatus.FineTuneJobStatus(), settings_for(fake), 1
        )

    text = str(caught.value)
    assert "Secret team-a/openai" in text and "kubetune.io/credentials=openai" in text
    assert "kubectl -n team-a label secret openai kubetune.io/credentials=openai" in text
    assert caught.value.reason == "SecretNotAllowed"
    assert fake.requests == [] and KEY not in text


def test_a_labelled_secret_gives_key_organization_and_project(
    cluster: Kube, fake: FakeOpenAI
) -> None:
    cluster.secrets["openai"] = secret(LABEL, api_key=KEY + "\n", org="org-1", proj="proj-2")
    spec = make_spec(
        fake.base_url,
        apiKeySecretRef={"name": "openai", "organizationKey": "org", "projectKey": "proj"},
    )
    assert spec.openai is not None
    with handlers.client_for(spec.openai, NAMESPACE, settings_for(fake)) as client:
        assert (client.api_key, client.organization, client.project) == (KEY, "org-1", "proj-2")
        assert str(client.base_url).rstrip("/") == fake.base_url


def test_organization_and_project_are_sent_with_every_request(
    cluster: Kube, fake: FakeOpenAI
) -> None:
    cluster.secrets["openai"] = secret(LABEL, api_key=KEY, org="org-team-a\n", proj="proj_daoyan")
    spec = make_spec(
        fake.base_url,
        apiKeySecretRef={"name": "openai", "organizationKey": "org", "projectKey": "proj"},
    )
    status, _ = handlers.reconcile(
        spec,
        OWNER,
        jobstatus.FineTuneJobStatus(),
        settings_for(fake),
        1,
        polls=handlers.PollSchedule(),
    )

    assert status.remote is not None and status.remote.id
    kinds = {(r["method"], r["path"].split("/")[2]) for r in fake.requests}
    assert ("POST", "files") in kinds and ("POST", "fine_tuning") in kinds
    assert {(r["organization"], r["project"]) for r in fake.requests} == {
        ("org-team-a", "proj_daoyan")
    }
    assert fake.jobs[status.remote.id]["organization_id"] == "org-team-a"


def test_a_secret_value_that_cannot_be_a_header_is_refused_by_name(
    cluster: Kube, fake: FakeOpenAI
) -> None:
    cluster.secrets["openai"] = secret(LABEL, api_key=KEY, proj="proj_da oyan")
    spec = make_spec(fake.base_url, apiKeySecretRef={"name": "openai", "projectKey": "proj"})
    with pytest.raises(errors.AuthProviderError) as caught:
        handlers.reconcile(spec, OWNER, jobstatus.FineTuneJobStatus(), settings_for(fake), 1)
    text = str(caught.value)
    assert "key 'proj' in Secret team-a/openai" in text and "whitespace" in text
    assert "da oyan" not in text and caught.value.reason == "InvalidKey"
    assert fake.requests == []


def test_a_missing_secret_or_key_names_it() -> None:
    ref = openai_spec.OpenAIKeyRef(name="openai", key="api-key", projectKey="proj")
    with pytest.raises(kube.PermanentKubeError, match="Secret team-a/openai not found"):
        handlers.credentials(None, ref, NAMESPACE)
    with pytest.raises(kube.PermanentKubeError, match="has no key 'proj'"):
        handlers.credentials(secret(LABEL), ref, NAMESPACE)


def test_refused_credentials_after_the_remote_job_exists_wait_instead_of_failing(
    cluster: Kube, fake: FakeOpenAI
) -> None:
    settings = settings_for(fake)
    status, _ = handlers.reconcile(
        make_spec(fake.base_url),
        OWNER,
        jobstatus.FineTuneJobStatus(),
        settings,
        1,
        polls=handlers.PollSchedule(),
    )
    assert status.remote is not None and status.remote.id
    cluster.secrets["openai"] = secret(None)  # the label was removed meanwhile

    with pytest.raises(errors.TemporaryProviderError) as caught:
        handlers.reconcile(
            make_spec(fake.base_url), OWNER, status, settings, 1, polls=handlers.PollSchedule()
        )
    assert caught.value.delay == 300
    assert status.remote.id in str(caught.value) and "kubetune.io/credentials" in str(caught.value)


def test_cleanup_with_an_unlabelled_secret_sends_nothing_and_says_so(
    cluster: Kube, fake: FakeOpenAI
) -> None:
    cluster.secrets["openai"] = secret(None)
    status = jobstatus.FineTuneJobStatus(remote=jobstatus.RemoteJob(id="ftjob-abc"))
    events = handlers.cleanup(make_spec(fake.base_url), OWNER, status, settings_for(fake))

    assert [e.reason for e in events] == ["CleanupSkipped"]
    assert "kubetune.io/credentials=openai" in events[0].message
    assert "ftjob-abc may still be running" in events[0].message
    assert fake.requests == []


def test_cleanup_refuses_a_base_url_outside_the_allowlist(cluster: Kube) -> None:
    events = handlers.cleanup(
        make_spec("https://collector.example.com/v1"),
        OWNER,
        jobstatus.FineTuneJobStatus(),
        OperatorSettings(),
    )
    assert [e.reason for e in events] == ["CleanupSkipped"] and cluster.reads == []


# ----------------------------------------------------------------------------- settings


def test_the_allowlist_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBETUNE_OPENAI_ALLOWED_BASE_URLS", raising=False)
    assert OperatorSettings.from_env().openai_allowed_base_urls == ("https://api.openai.com/v1",)
    monkeypatch.setenv("KUBETUNE_OPENAI_ALLOWED_BASE_URLS", '["https://a/v1", "http://b:8000/v1"]')
    assert OperatorSettings.from_env().openai_allowed_base_urls == (
        "https://a/v1",
        "http://b:8000/v1",
    )
    monkeypatch.setenv("KUBETUNE_OPENAI_ALLOWED_BASE_URLS", '"https://a/v1"')
    with pytest.raises(ValueError, match="JSON list"):
        OperatorSettings.from_env()


# ----------------------------------------------------------------------------- polls


def polls_of_job(fake: FakeOpenAI) -> int:
    return len(
        [
            r
            for r in fake.requests
            if r["method"] == "GET"
            and r["path"].startswith("/v1/fine_tuning/jobs/ftjob-")
            and not r["path"].endswith("/events")
        ]
    )


def test_a_followed_job_is_polled_every_poll_interval_not_every_tick(
    cluster: Kube, fake: FakeOpenAI
) -> None:
    fake.timing = Timing(600, 600, 600)
    settings = settings_for(fake, reconcile_interval=10.0, openai_poll_interval=30.0)
    polls = handlers.PollSchedule()
    spec = make_spec(fake.base_url)

    def at(
        now: float, status: jobstatus.FineTuneJobStatus, generation: int = 1
    ) -> jobstatus.FineTuneJobStatus:
        new, _ = handlers.reconcile(spec, OWNER, status, settings, generation, polls=polls, now=now)
        return new

    status = at(0.0, jobstatus.FineTuneJobStatus())  # creates the job
    assert status.remote is not None and status.remote.id and fake.jobs_created() == 1
    seen: list[int] = []
    for now in (10.0, 20.1, 29.9, 40.0, 50.0, 60.2):  # ticks with a little jitter
        before = len(fake.requests)
        status = at(now, status)
        seen.append(len(fake.requests) - before)
    assert [n > 0 for n in seen] == [False, False, True, False, False, True]
    assert polls_of_job(fake) == 2
    secret_reads = [r for r in cluster.reads if r[0] == "Secret"]
    assert len(secret_reads) == 3, "a skipped tick reads no Secret either"

    # A spec change (suspend) is acted on at the next tick, whenever the last poll was.
    suspended = make_spec(fake.base_url)
    suspended.suspend = True
    new, _ = handlers.reconcile(suspended, OWNER, status, settings, 2, polls=polls, now=61.0)
    assert new.phase == jobstatus.Phase.CANCELLED and fake.cancelled == [status.remote.id]


def test_polls_are_not_held_back_before_the_job_exists_or_when_ticks_are_slower(
    cluster: Kube, fake: FakeOpenAI
) -> None:
    fake.timing = Timing(600, 600, 600, processing_s=15)
    polls = handlers.PollSchedule()
    settings = settings_for(fake, reconcile_interval=10.0, openai_poll_interval=30.0)
    spec = make_spec(fake.base_url)
    status = jobstatus.FineTuneJobStatus()
    for now in (0.0, 10.0, 20.0):  # waiting for OpenAI to process the upload: every tick looks
        before = len(fake.requests)
        status, _ = handlers.reconcile(spec, OWNER, status, settings, 1, polls=polls, now=now)
        assert len(fake.requests) > before
        fake.advance(10)
    assert status.remote is not None and status.remote.id

    slow = settings_for(fake, reconcile_interval=60.0, openai_poll_interval=30.0)
    before = polls_of_job(fake)
    for now in (80.0, 140.0):
        status, _ = handlers.reconcile(spec, OWNER, status, slow, 1, polls=polls, now=now)
    assert polls_of_job(fake) == before + 2
