"""The runtime adapter client, against an in-process stand-in of vLLM's HTTP API.

The stand-in answers the way vLLM 0.32 does (routes, bodies, status codes); the e2e tests
run the same client against the real server.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from kubetune.server import adapters


class FakeVllm:
    """vLLM's /v1/models and LoRA routes, with switches to misbehave."""

    def __init__(self, *, runtime_updates: bool = True, api_key: str | None = None) -> None:
        self.loras: dict[str, str] = {"daoyan": "/out/adapter"}
        self.runtime_updates = runtime_updates
        self.api_key = api_key
        self.lie_on_load = False  # answer 200 but do not load
        self.fail_with: int | None = None
        self.requests: list[tuple[str, str]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.requests.append((request.method, path))
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return httpx.Response(401, json={"error": "Unauthorized"})
        if self.fail_with:
            return httpx.Response(self.fail_with, text="engine dead")
        if path == "/v1/models":
            data = [{"id": "tiny", "root": "/models/tiny", "parent": None}]
            data += [{"id": n, "root": p, "parent": "tiny"} for n, p in self.loras.items()]
            return httpx.Response(200, json={"object": "list", "data": data})
        if not self.runtime_updates or path not in (
            "/v1/load_lora_adapter",
            "/v1/unload_lora_adapter",
        ):
            return httpx.Response(404, json={"detail": "Not Found"})
        body: dict[str, Any] = json.loads(request.content)
        name = body["lora_name"]
        if path == "/v1/load_lora_adapter":
            if body["lora_path"].startswith("/missing"):
                return self.error(404, f"Loading lora {name} failed: No adapter found for x")
            if name in self.loras and not body.get("load_inplace"):
                return self.error(400, f"The lora adapter '{name}' has already been loaded.")
            if not self.lie_on_load:
                self.loras[name] = body["lora_path"]
            return httpx.Response(200, text=f"Success: LoRA adapter '{name}' added successfully.")
        if name not in self.loras:
            return self.error(404, f"The lora adapter '{name}' cannot be found.")
        del self.loras[name]
        return httpx.Response(200, text="Success")

    @staticmethod
    def error(code: int, message: str) -> httpx.Response:
        return httpx.Response(code, json={"error": {"message": message, "code": code}})


def client(fake: FakeVllm, **kw: Any) -> adapters.AdapterClient:
    return adapters.AdapterClient("http://vllm:8000/v1", transport=httpx.MockTransport(fake), **kw)


def test_load_is_confirmed_through_v1_models() -> None:
    fake = FakeVllm()
    with client(fake) as c:
        served = c.load("second", "/out/second")
        assert served == adapters.ServedModel("second", "/out/second", "tiny")
        assert set(c.adapters()) == {"daoyan", "second"}
    assert ("POST", "/v1/load_lora_adapter") in fake.requests
    assert fake.requests[-1] == ("GET", "/v1/models")


def test_an_adapter_the_server_did_not_really_load_is_never_reported_as_served() -> None:
    fake = FakeVllm()
    fake.lie_on_load = True
    with client(fake) as c, pytest.raises(adapters.AdapterNotConfirmed, match="not served"):
        c.load("second", "/out/second")


def test_load_failure_carries_vllms_reason() -> None:
    with client(FakeVllm()) as c:
        with pytest.raises(adapters.AdapterRequestRefused, match="No adapter found") as err:
            c.load("second", "/missing/adapter")
        assert err.value.status_code == 404
        assert not isinstance(err.value, adapters.RuntimeUpdatesDisabled)
        assert "second" not in c.adapters()


def test_load_and_unload_are_idempotent() -> None:
    fake = FakeVllm()
    with client(fake) as c:
        c.load("daoyan", "/out/adapter")  # already served from there: no POST
        c.unload("gone")  # not served: no POST
        assert [r for r in fake.requests if r[0] == "POST"] == []


def test_same_name_other_path_needs_replace() -> None:
    fake = FakeVllm()
    with client(fake) as c:
        with pytest.raises(adapters.AdapterRequestRefused, match="already served from"):
            c.load("daoyan", "/out/v2")
        assert c.load("daoyan", "/out/v2", replace=True).root == "/out/v2"


def test_unload_is_confirmed() -> None:
    fake = FakeVllm()
    with client(fake) as c:
        c.unload("daoyan")
        assert c.adapters() == {}


def test_server_without_runtime_updates_is_named_as_such() -> None:
    with (
        client(FakeVllm(runtime_updates=False)) as c,
        pytest.raises(adapters.RuntimeUpdatesDisabled, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING"),
    ):
        c.load("second", "/out/second")


def test_api_key_is_sent_and_its_absence_is_reported() -> None:
    fake = FakeVllm(api_key="sk-1")
    with client(fake, api_key="sk-1") as c:
        assert "daoyan" in c.adapters()
    with client(fake) as c, pytest.raises(adapters.Unauthorized, match="API key"):
        c.adapters()


def test_server_errors_and_unreachable_servers_are_temporary() -> None:
    fake = FakeVllm()
    fake.fail_with = 503
    with client(fake) as c, pytest.raises(adapters.ServerUnavailable, match="503"):
        c.load("second", "/out/second")

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with (
        adapters.AdapterClient("http://vllm:8000", transport=httpx.MockTransport(refuse)) as c,
        pytest.raises(adapters.ServerUnavailable, match="unreachable"),
    ):
        c.unload("daoyan")


@pytest.mark.parametrize(
    "base_url", ["http://vllm:8000", "http://vllm:8000/", "http://vllm:8000/v1"]
)
def test_base_url_with_or_without_v1(base_url: str) -> None:
    fake = FakeVllm()
    with adapters.AdapterClient(base_url, transport=httpx.MockTransport(fake)) as c:
        c.models()
    assert fake.requests == [("GET", "/v1/models")]
