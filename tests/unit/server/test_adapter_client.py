"""The runtime adapter client, against an in-process stand-in of vLLM's HTTP API.

The stand-in answers the way vLLM 0.32 does (routes, bodies, status codes); the e2e tests
run the same client against the real server.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from kubetune.api.serveconfig import ServeConfig
from kubetune.server import adapters

MakeAdapter = Callable[..., Path]

ENGINE_DEAD = "EngineCore encountered an issue. See stack trace (above) for the root cause."


class FakeVllm:
    """vLLM's /v1/models and LoRA routes, with switches to misbehave."""

    def __init__(self, *, runtime_updates: bool = True, api_key: str | None = None) -> None:
        self.loras: dict[str, str] = {"daoyan": "/out/adapter"}
        self.runtime_updates = runtime_updates
        self.api_key = api_key
        self.lie_on_load = False  # answer 200 but do not load
        self.parent = "tiny"  # the parent /v1/models gives the adapters
        self.models_body: httpx.Response | None = None  # /v1/models answers this instead
        self.fail_with: int | None = None
        self.load_error: str | None = None  # why the engine cannot load an adapter
        self.requests: list[tuple[str, str]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.requests.append((request.method, path))
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return httpx.Response(401, json={"error": "Unauthorized"})
        if self.fail_with:
            return httpx.Response(self.fail_with, text="engine dead")
        if path == "/v1/models":
            if self.models_body is not None:
                return self.models_body
            data = [{"id": "tiny", "root": "/models/tiny", "parent": None}]
            data += [{"id": n, "root": p, "parent": self.parent} for n, p in self.loras.items()]
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
            if self.load_error:  # the engine process raised: vLLM relays it as a 500
                return self.error(500, self.load_error)
            if not self.lie_on_load:
                self.loras[name] = body["lora_path"]
            return httpx.Response(200, text=f"Success: LoRA adapter '{name}' added successfully.")
        if name not in self.loras:
            return self.error(404, f"The lora adapter '{name}' cannot be found.")
        del self.loras[name]
        return httpx.Response(200, text="Success")

    @staticmethod
    def error(code: int, message: str) -> httpx.Response:
        kind = {400: "InvalidUserInput", 404: "NotFoundError", 500: "InternalServerError"}[code]
        error = {"message": message, "type": kind, "param": None, "code": code}
        return httpx.Response(code, json={"error": error})


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


@pytest.mark.parametrize("code", [500, 502, 503, 504])
def test_server_errors_and_unreachable_servers_are_temporary(code: int) -> None:
    fake = FakeVllm()
    fake.fail_with = code
    with client(fake) as c, pytest.raises(adapters.ServerUnavailable, match=str(code)):
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


@pytest.mark.parametrize(
    "reason",
    [
        "vLLM does not yet support DoRA.",
        "LoRA rank 64 is greater than max_lora_rank 16.",
        "Adapter bias is not supported.",
        "While loading /out/second, expected target modules in {'q_proj'} but received ['x'].",
    ],
)
def test_an_adapter_vllm_fails_to_load_is_refused_not_retried(reason: str) -> None:
    fake = FakeVllm()
    fake.load_error = f"Call to add_lora method failed: {reason}"  # vLLM 0.32's wording
    with client(fake) as c:
        with pytest.raises(adapters.AdapterRequestRefused) as err:
            c.load("second", "/out/second")
        assert isinstance(err.value, adapters.AdapterInvalid) and err.value.status_code == 500
        assert str(err.value).endswith(f"vLLM failed to load it: {reason}")
        assert "second" not in c.adapters()


def test_a_dead_engine_is_temporary_even_on_the_load_route() -> None:
    fake = FakeVllm()
    fake.load_error = ENGINE_DEAD
    with client(fake) as c, pytest.raises(adapters.ServerUnavailable, match="EngineCore"):
        c.load("second", "/out/second")


@pytest.mark.parametrize(
    ("fields", "over", "reason"),
    [
        ({"use_dora": True}, {}, "DoRA"),
        ({"bias": "all"}, {}, "`bias: all`"),
        ({"rank": 64}, {"maxLoraRank": 16}, "LoRA rank 64 is too high"),
        ({"base": "other/model"}, {}, "trained on base model `other/model`"),
    ],
)
def test_an_adapter_readable_here_is_checked_before_it_is_sent(
    make_adapter: MakeAdapter, fields: dict[str, Any], over: dict[str, Any], reason: str
) -> None:
    folder = make_adapter(**fields)
    served = ServeConfig.model_validate({"model": "/models/tiny-llama", **over})
    fake = FakeVllm()
    with client(fake, config=served) as c, pytest.raises(adapters.AdapterInvalid, match=reason):
        c.load("second", str(folder))
    assert ("POST", "/v1/load_lora_adapter") not in fake.requests


def test_without_a_serve_config_only_the_folder_is_checked(make_adapter: MakeAdapter) -> None:
    fake = FakeVllm()
    with client(fake) as c:
        with pytest.raises(adapters.AdapterInvalid, match="DoRA"):
            c.load("dora", str(make_adapter("dora", use_dora=True)))
        assert c.load("other-base", str(make_adapter("x", base="other/model"))).parent == "tiny"


def test_an_adapter_still_being_written_is_not_ready_yet(make_adapter: MakeAdapter) -> None:
    folder = make_adapter(truncate=10)
    fake = FakeVllm()
    with client(fake) as c:
        with pytest.raises(adapters.AdapterNotReady, match="still being written"):
            c.load("second", str(folder))
        assert ("POST", "/v1/load_lora_adapter") not in fake.requests
        make_adapter()  # the trainer finishes
        assert c.load("second", str(folder)).root == str(folder)


def test_a_replacement_the_server_did_not_take_is_not_confirmed() -> None:
    fake = FakeVllm()
    fake.lie_on_load = True  # 200, but the old adapter stays
    with client(fake) as c, pytest.raises(adapters.AdapterNotConfirmed) as err:
        c.load("daoyan", "/out/adapter-v2", replace=True)
    assert "from /out/adapter-v2, but /v1/models lists it from /out/adapter;" in str(err.value)
    fake.lie_on_load = False
    with client(fake) as c:
        assert c.load("daoyan", "/out/adapter-v2", replace=True).root == "/out/adapter-v2"


@pytest.mark.parametrize(
    ("parent", "config", "message"),
    [
        ("other", None, "with the parent `other`, not the served base model (`tiny`)"),
        ("tiny", {"model": "/models/tiny", "servedModelName": "tiny2"}, "no base model it lists"),
    ],
)
def test_an_adapter_under_another_parent_is_not_confirmed(
    parent: str, config: dict[str, Any] | None, message: str
) -> None:
    fake = FakeVllm()
    fake.parent = parent
    kw = {"config": ServeConfig.model_validate(config)} if config else {}
    refused = pytest.raises(adapters.AdapterNotConfirmed, match=re.escape(message))
    with client(fake, **kw) as c, refused:
        c.load("second", "/out/second")


@pytest.mark.parametrize(
    "body",
    [
        httpx.Response(200, text="<html>502 Bad Gateway</html>"),
        httpx.Response(200, json={"object": "list"}),
        httpx.Response(200, json={"data": {"id": "tiny"}}),
        httpx.Response(200, json={"data": [{"root": "/models/tiny"}]}),
        httpx.Response(200, json=["tiny"]),
    ],
)
def test_a_models_answer_that_is_not_a_model_list_is_a_server_error(body: httpx.Response) -> None:
    fake = FakeVllm()
    fake.models_body = body
    with client(fake) as c:
        with pytest.raises(adapters.ServerUnavailable, match="did not answer with an OpenAI"):
            c.models()
        with pytest.raises(adapters.ServerUnavailable):
            c.load("second", "/out/second")
