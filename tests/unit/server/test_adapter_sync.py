"""The adapter sync sidecar: rounds against an in-memory server, the report, the process.

``FakeServer`` keeps :class:`~kubetune.server.adapters.AdapterClient`'s documented semantics
(idempotent load and unload, ``replace`` swaps in place, a name served from another path is
refused without ``replace``), so a round that passes here makes the same calls against vLLM;
the e2e tier runs the sidecar against the real server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from kubetune.api.serveconfig import ServeConfig
from kubetune.server import adapter_sync, adapters
from kubetune.server.adapter_sync import Refusals, sync_once
from kubetune.server.adapters import ServedModel
from kubetune.sync_report import Report
from support.net import free_port

BASE = "tiny"


class FakeServer:
    """The adapters a vLLM serves, behind AdapterClient's interface."""

    def __init__(self, served: dict[str, str] | None = None) -> None:
        self.served = dict(served or {})
        self.load_errors: dict[str, adapters.AdapterError] = {}  # by path
        self.unload_errors: dict[str, adapters.AdapterError] = {}  # by name
        self.list_error: adapters.AdapterError | None = None
        self.calls: list[tuple[str, ...]] = []

    def _model(self, name: str) -> ServedModel:
        return ServedModel(id=name, root=self.served[name], parent=BASE)

    def adapters(self) -> dict[str, ServedModel]:
        if self.list_error is not None:
            raise self.list_error
        return {name: self._model(name) for name in self.served}

    def load(self, name: str, path: str, *, replace: bool = False) -> ServedModel:
        self.calls.append(("load", name, path))
        current = self.adapters().get(name)
        if current is not None and current.root == path and not replace:
            return current
        if current is not None and not replace:
            raise adapters.AdapterRequestRefused(f"`{name}` is served from elsewhere", 409)
        if path in self.load_errors:
            raise self.load_errors[path]
        self.served[name] = path
        return self._model(name)

    def unload(self, name: str) -> None:
        self.calls.append(("unload", name))
        if name in self.unload_errors:
            raise self.unload_errors[name]
        self.served.pop(name, None)


def serve_config(adapters_: dict[str, str], **extra: Any) -> ServeConfig:
    return ServeConfig.model_validate(
        {
            "model": "/models/tiny",
            "servedModelName": BASE,
            "adapters": [{"name": n, "path": p} for n, p in adapters_.items()],
            "runtimeLoraUpdating": True,
            **extra,
        }
    )


def write_adapter(folder: Path, weights: bytes = b"w" * 16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text('{"r": 8}', encoding="utf-8")
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


# ------------------------------------------------------------------------------ one round


def test_loads_missing_adapters_and_reports_synced_with_the_config_digest() -> None:
    server = FakeServer({"a": "/out/a"})
    config = serve_config({"a": "/out/a", "b": "/out/b"})
    report = sync_once(server, config, Refusals())
    assert server.calls == [("load", "b", "/out/b")]
    assert report == Report(
        digest=config.adapter_digest(), synced=True, served=["a", "b"], pending={}, refused={}
    )


def test_an_idle_round_changes_nothing() -> None:
    server = FakeServer({"a": "/out/a"})
    report = sync_once(server, serve_config({"a": "/out/a"}), Refusals())
    assert server.calls == []
    assert report.synced and report.served == ["a"]


def test_unloads_adapters_the_config_does_not_list() -> None:
    server = FakeServer({"a": "/out/a", "by-hand": "/tmp/x", "dropped": "/out/d"})
    report = sync_once(server, serve_config({"a": "/out/a"}), Refusals())
    assert sorted(server.calls) == [("unload", "by-hand"), ("unload", "dropped")]
    assert report.synced and report.served == ["a"]


def test_an_empty_adapter_list_unloads_everything() -> None:
    server = FakeServer({"a": "/out/a"})
    report = sync_once(server, serve_config({}), Refusals())
    assert server.served == {} and report.synced and report.served == []


def test_an_adapter_whose_path_changed_is_replaced_in_place() -> None:
    server = FakeServer({"a": "/out/a-v1"})
    report = sync_once(server, serve_config({"a": "/out/a-v2"}), Refusals())
    assert server.calls == [("load", "a", "/out/a-v2")]  # no unload: never a gap in serving
    assert server.served == {"a": "/out/a-v2"}
    assert report.synced


def test_an_extra_adapter_that_will_not_unload_is_pending() -> None:
    server = FakeServer({"a": "/out/a", "x": "/out/x"})
    server.unload_errors["x"] = adapters.AdapterNotConfirmed("/v1/models still lists it")
    report = sync_once(server, serve_config({"a": "/out/a"}), Refusals())
    assert not report.synced and report.error is None
    assert report.served == ["a", "x"]
    assert "still lists it" in report.pending["x"]


def test_files_still_being_written_are_pending_and_retried_every_round() -> None:
    server = FakeServer()
    server.load_errors["/out/b"] = adapters.AdapterNotReady("adapter_model.safetensors is short")
    config, refusals = serve_config({"b": "/out/b"}), Refusals()
    first = sync_once(server, config, refusals)
    assert not first.synced and first.error is None and first.refused == {}
    assert "is short" in first.pending["b"]
    del server.load_errors["/out/b"]  # the copy finished
    second = sync_once(server, config, refusals)
    assert server.calls == [("load", "b", "/out/b")] * 2
    assert second.synced and second.served == ["b"]


@pytest.mark.parametrize(
    "error",
    [adapters.ServerUnavailable("engine restarting"), adapters.AdapterNotConfirmed("not listed")],
)
def test_temporary_load_failures_are_pending(error: adapters.AdapterError) -> None:
    server = FakeServer()
    server.load_errors["/out/b"] = error
    report = sync_once(server, serve_config({"b": "/out/b"}), Refusals())
    assert report.pending == {"b": str(error)} and report.refused == {} and not report.synced


def test_a_refusal_is_remembered_until_the_adapter_folder_changes(tmp_path: Path) -> None:
    good, bad = write_adapter(tmp_path / "good"), write_adapter(tmp_path / "bad")
    server = FakeServer()
    refusal = adapters.AdapterInvalid("vLLM failed to load it: LoRA rank 64 is too high", 500)
    server.load_errors[str(bad)] = refusal
    config, refusals = serve_config({"good": str(good), "bad": str(bad)}), Refusals()

    first = sync_once(server, config, refusals)
    assert first.refused == {"bad": str(refusal)}
    assert first.served == ["good"] and first.pending == {}
    # Refused adapters wait for a fix, not for time: the rest is in sync.
    assert first.synced
    loads_of_bad = [c for c in server.calls if c[1] == "bad"]
    assert len(loads_of_bad) == 1

    for _ in range(3):
        again = sync_once(server, config, refusals)
        assert again.refused == first.refused and again.synced
    assert [c for c in server.calls if c[1] == "bad"] == loads_of_bad  # not asked again

    del server.load_errors[str(bad)]
    write_adapter(bad, weights=b"fixed weights, another size")  # re-uploaded
    fixed = sync_once(server, config, refusals)
    assert [c for c in server.calls if c[1] == "bad"] == loads_of_bad * 2
    assert fixed.refused == {} and fixed.served == ["bad", "good"] and fixed.synced


def test_a_refused_missing_folder_is_retried_once_it_appears(tmp_path: Path) -> None:
    folder = tmp_path / "later"
    server = FakeServer()
    server.load_errors[str(folder)] = adapters.AdapterRequestRefused("No adapter found", 404)
    config, refusals = serve_config({"later": str(folder)}), Refusals()
    assert "No adapter found" in sync_once(server, config, refusals).refused["later"]
    assert "later" in sync_once(server, config, refusals).refused
    assert len(server.calls) == 1
    write_adapter(folder)
    del server.load_errors[str(folder)]
    assert sync_once(server, config, refusals).served == ["later"]


def test_a_refusal_is_forgotten_when_the_path_changes(tmp_path: Path) -> None:
    v1, v2 = write_adapter(tmp_path / "v1"), write_adapter(tmp_path / "v2")
    server = FakeServer()
    server.load_errors[str(v1)] = adapters.AdapterInvalid("bad", 422)
    refusals = Refusals()
    assert sync_once(server, serve_config({"a": str(v1)}), refusals).refused
    report = sync_once(server, serve_config({"a": str(v2)}), refusals)
    assert report.refused == {} and server.served == {"a": str(v2)}


@pytest.mark.parametrize(
    "error",
    [
        adapters.Unauthorized("cannot load adapter `b`: unauthorized", 401),
        adapters.RuntimeUpdatesDisabled("the server does not offer /v1/load_lora_adapter", 404),
    ],
)
def test_server_wide_refusals_are_the_round_error_not_the_adapter(
    tmp_path: Path, error: adapters.AdapterError
) -> None:
    folder = write_adapter(tmp_path / "b")
    server = FakeServer({"extra": "/out/x"})
    server.load_errors[str(folder)] = error
    server.unload_errors["extra"] = error
    config, refusals = serve_config({"b": str(folder), "c": "/out/c"}), Refusals()
    report = sync_once(server, config, refusals)
    assert report.error == str(error) and not report.synced
    assert report.refused == {}
    assert set(report.pending) == {"b", "c", "extra"}
    assert server.calls == [("unload", "extra")]  # the round stopped at the first no
    del server.unload_errors["extra"]
    sync_once(server, config, refusals)
    assert ("load", "b", str(folder)) in server.calls  # not remembered as a refusal


def test_unauthorized_listing_is_the_round_error() -> None:
    server = FakeServer()
    server.list_error = adapters.Unauthorized("cannot list served models: unauthorized", 401)
    report = sync_once(server, serve_config({"a": "/out/a"}), Refusals())
    assert report.error == "cannot list served models: unauthorized"
    assert not report.synced and server.calls == []


def test_a_server_still_starting_is_reported_as_not_answering_yet() -> None:
    server = FakeServer()
    server.list_error = adapters.ServerUnavailable("connection refused")
    config = serve_config({"a": "/out/a"})
    report = sync_once(server, config, Refusals())
    assert report.error == "vLLM is not answering yet: connection refused"
    assert report.digest == config.adapter_digest()
    assert report.served == [] and not report.synced and set(report.pending) == {"a"}


# ------------------------------------------------------------------------------ rounds


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return tmp_path / "serve.yaml"


def write_config(path: Path, config: ServeConfig | str) -> None:
    text = config if isinstance(config, str) else config.dump_yaml()
    path.write_text(text, encoding="utf-8")


def test_an_unreadable_config_keeps_the_last_good_one_and_shows_no_value(
    config_file: Path,
) -> None:
    server = FakeServer()
    rounds = adapter_sync.Rounds(str(config_file), {}, lambda config, key: server)
    good = serve_config({"a": "/out/a"})
    write_config(config_file, good)
    assert rounds.run().synced

    # A value that must never be echoed: an extraArgs entry may hold a secret.
    bad = good.to_wire() | {"adapters": [], "extraArgs": ["--api-key=sk-secret"]}
    write_config(config_file, yaml.safe_dump(bad))
    report = rounds.run()
    assert report.error is not None and "`extraArgs`" in report.error
    assert "sk-secret" not in json.dumps(report.to_dict())
    assert report.digest == good.adapter_digest() and not report.synced
    assert server.served == {"a": "/out/a"}  # not unloaded by the bad edit

    write_config(config_file, "adapters: [\n")
    report = rounds.run()
    assert report.error is not None and "invalid YAML at line" in report.error
    assert report.served == ["a"] and report.digest == good.adapter_digest()


def test_before_any_good_config_the_digest_is_none(config_file: Path) -> None:
    rounds = adapter_sync.Rounds(str(config_file), {}, lambda config, key: FakeServer())
    report = rounds.run()
    assert report.digest is None and not report.synced
    assert report.error == f"cannot read serve config {config_file}: No such file or directory"


def test_the_api_key_comes_from_the_named_variable_and_is_never_reported(
    config_file: Path,
) -> None:
    keys: list[str | None] = []

    def factory(config: ServeConfig, key: str | None) -> FakeServer:
        keys.append(key)
        return FakeServer()

    write_config(config_file, serve_config({"a": "/out/a"}, apiKeyEnv="VLLM_KEY"))
    missing = adapter_sync.Rounds(str(config_file), {}, factory).run()
    assert missing.error == "`apiKeyEnv` names VLLM_KEY, which is not set in this container"
    assert set(missing.pending) == {"a"}

    report = adapter_sync.Rounds(str(config_file), {"VLLM_KEY": "sk-e2e"}, factory).run()
    assert keys[-1] == "sk-e2e" and report.synced
    assert "sk-e2e" not in json.dumps(report.to_dict())


def test_a_new_port_gets_a_new_client_an_adapter_change_does_not(config_file: Path) -> None:
    ports: list[int] = []

    def factory(config: ServeConfig, key: str | None) -> FakeServer:
        ports.append(config.port)
        return FakeServer()

    rounds = adapter_sync.Rounds(str(config_file), {}, factory)
    for adapters_, port in (({"a": "/a"}, 8000), ({"a": "/a", "b": "/b"}, 8000), ({}, 9000)):
        write_config(config_file, serve_config(adapters_, port=port))
        rounds.run()
    assert ports == [8000, 9000]


# ------------------------------------------------------------------------------ the report


REPORT = Report(
    digest="0123456789abcdef",
    synced=False,
    served=["a", "b"],
    pending={"c": "adapter_model.safetensors is short"},
    refused={"d": "LoRA rank 1024 is too high"},
    error=None,
)


def test_the_report_round_trips_through_json_with_camel_case_keys() -> None:
    wire = json.loads(json.dumps(REPORT.to_dict()))
    assert set(wire) == {"digest", "synced", "served", "pending", "refused", "error"}
    assert Report.from_dict(wire) == REPORT
    empty = Report(digest=None, synced=False, served=[], error="first round not done")
    assert Report.from_dict(json.loads(json.dumps(empty.to_dict()))) == empty


def test_unknown_keys_are_ignored() -> None:
    assert Report.from_dict(REPORT.to_dict() | {"loadedAt": "later"}) == REPORT


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("digest", 5),
        ("synced", "true"),
        ("synced", 1),
        ("served", "a"),
        ("served", ["a", 1]),
        ("pending", ["c"]),
        ("pending", {"c": 1}),
        ("refused", {"d": None}),
        ("error", ["boom"]),
    ],
)
def test_from_dict_names_the_malformed_key(key: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"`{key}` must be"):
        Report.from_dict(REPORT.to_dict() | {key: value})


@pytest.mark.parametrize("key", ["digest", "synced", "served", "pending", "refused", "error"])
def test_from_dict_names_the_missing_key(key: str) -> None:
    data = REPORT.to_dict()
    del data[key]
    with pytest.raises(ValueError, match=f"`{key}` is missing"):
        Report.from_dict(data)


@pytest.mark.parametrize("data", [None, [], "synced", 1])
def test_from_dict_refuses_anything_but_an_object(data: Any) -> None:
    with pytest.raises(ValueError, match="a report is a JSON object"):
        Report.from_dict(data)


# ------------------------------------------------------------------------------ the process


def get_report(port: int, path: str = "/") -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)


def wait_for_report(port: int, until: str, timeout: float = 10.0) -> Report:
    """Polls the report until its error starts with ``until``."""
    deadline = time.monotonic() + timeout
    last: Report | None = None
    while time.monotonic() < deadline:
        try:
            last = Report.from_dict(get_report(port).json())
        except httpx.TransportError:
            pass
        else:
            if (last.error or "").startswith(until):
                return last
        time.sleep(0.05)
    raise AssertionError(f"no report with error {until!r} in {timeout} s; last: {last}")


@pytest.fixture
def unreachable_vllm(config_file: Path) -> Path:
    """A serve config whose vLLM port nobody listens on."""
    write_config(config_file, serve_config({"a": "/out/a"}, port=free_port()))
    return config_file


@pytest.fixture
def running_main(unreachable_vllm: Path) -> Iterator[tuple[int, threading.Event, list[int]]]:
    port, stop, exit_codes = free_port(), threading.Event(), []
    argv = ["--config", str(unreachable_vllm), "--port", str(port), "--interval", "0.05"]
    thread = threading.Thread(target=lambda: exit_codes.append(adapter_sync.main(argv, stop=stop)))
    thread.start()
    try:
        yield port, stop, exit_codes
    finally:
        stop.set()
        thread.join(timeout=5)
        assert not thread.is_alive()


def test_main_serves_the_latest_report_as_json(
    running_main: tuple[int, threading.Event, list[int]], unreachable_vllm: Path
) -> None:
    port, stop, exit_codes = running_main
    report = wait_for_report(port, "vLLM is not answering yet")
    config = ServeConfig.load(unreachable_vllm)
    assert report.digest == config.adapter_digest() and not report.synced
    assert set(report.pending) == {"a"}
    status = get_report(port, "/status")
    assert status.status_code == 200 and status.headers["content-type"] == "application/json"
    assert Report.from_dict(status.json()).digest == report.digest
    assert get_report(port, "/metrics").status_code == 404

    started = time.monotonic()
    stop.set()
    deadline = time.monotonic() + 5
    while not exit_codes and time.monotonic() < deadline:
        time.sleep(0.02)
    assert exit_codes == [0] and time.monotonic() - started < 2


def test_a_taken_report_port_exits_1(unreachable_vllm: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert adapter_sync.main(["--config", str(unreachable_vllm), "--port", str(port)]) == 1


def test_the_report_before_the_first_round_says_so() -> None:
    latest = adapter_sync.Latest(
        Report(digest=None, synced=False, served=[], error=adapter_sync.FIRST_ROUND)
    )
    server = adapter_sync.report_server(0, latest)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        report = Report.from_dict(get_report(server.server_address[1]).json())
    finally:
        server.shutdown()
        server.server_close()
    assert report.error == "first round not done" and report.digest is None


def test_the_process_imports_no_vllm_nor_torch() -> None:
    code = (
        "import sys, kubetune.server.adapter_sync; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'vllm', 'torch', 'transformers'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_sigterm_stops_the_process_promptly_with_exit_0(unreachable_vllm: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetune.server.adapter_sync", "--config", str(unreachable_vllm),
         "--port", str(port), "--interval", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONSAFEPATH": "1"},
    )  # fmt: skip
    try:
        wait_for_report(port, "vLLM is not answering yet", timeout=30)
        time.sleep(0.5)  # a few more rounds: they must not log the same state again
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert time.monotonic() - started < 2
    finally:
        proc.kill()
        proc.wait()
    assert proc.stdout is not None
    log = proc.stdout.read()
    assert log.count("vLLM is not answering yet") == 1, log
    assert "Traceback" not in log
