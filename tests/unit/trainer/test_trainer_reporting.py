"""Progress reporting: metrics file, ConfigMap patches (rate-limited, never fatal), exit note."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from kubetune.api.jobconfig import ConfigMapSink, ProgressSink
from kubetune.progress import CONFIGMAP_KEY, RESULT_KEY, ProgressRecord
from kubetune.trainer import reporting

IN_CLUSTER = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "6443"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def service_account(tmp_path: Path) -> Path:
    folder = tmp_path / "sa"
    folder.mkdir()
    (folder / "token").write_text("tok-123\n")
    return folder


def writer(
    service_account: Path, handler: httpx.MockTransport, clock: FakeClock
) -> reporting.ConfigMapWriter:
    return reporting.ConfigMapWriter(
        "team-a", "ftj-progress", env=IN_CLUSTER, service_account=service_account,
        transport=handler, clock=clock,
    )  # fmt: skip


def test_patch_is_a_merge_patch_with_the_service_account_token(service_account: Path) -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={})

    cm = writer(service_account, httpx.MockTransport(handle), FakeClock())
    record = ProgressRecord(step=3, total_steps=10, epoch=0.3, train_loss=1.5)
    assert cm.patch({CONFIGMAP_KEY: record.to_json()})
    (request,) = seen
    assert request.method == "PATCH"
    assert str(request.url) == (
        "https://10.0.0.1:6443/api/v1/namespaces/team-a/configmaps/ftj-progress"
    )
    assert request.headers["Authorization"] == "Bearer tok-123"
    assert request.headers["Content-Type"] == "application/merge-patch+json"
    body = json.loads(request.content)
    assert ProgressRecord.from_json(body["data"][CONFIGMAP_KEY]).step == 3


def test_patches_are_rate_limited_but_forced_ones_go_out(service_account: Path) -> None:
    count = 0

    def handle(request: httpx.Request) -> httpx.Response:
        nonlocal count
        count += 1
        return httpx.Response(200, json={})

    clock = FakeClock()
    cm = writer(service_account, httpx.MockTransport(handle), clock)
    assert cm.patch({"k": "1"})
    clock.now += 1.0
    assert not cm.patch({"k": "2"})  # within 5 s
    assert cm.patch({"k": "3"}, force=True)
    clock.now += reporting.MIN_PATCH_INTERVAL
    assert cm.patch({"k": "4"})
    assert count == 3


@pytest.mark.parametrize("failure", ["http500", "connect"])
def test_a_failing_api_server_never_raises(
    service_account: Path, failure: str, caplog: pytest.LogCaptureFixture
) -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        if failure == "connect":
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(500, text="boom")

    clock = FakeClock()
    cm = writer(service_account, httpx.MockTransport(handle), clock)
    for _ in range(3):
        clock.now += 10
        assert cm.patch({"k": "v"}) is False
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1  # said once, not once per step


def test_ipv6_service_host_is_bracketed(service_account: Path) -> None:
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    cm = reporting.ConfigMapWriter("ns", "cm", env=env, service_account=service_account)
    assert cm.url == "https://[fd00::1]:443/api/v1/namespaces/ns/configmaps/cm"


def test_outside_a_cluster_nothing_is_sent(service_account: Path) -> None:
    cm = reporting.ConfigMapWriter("ns", "cm", env={}, service_account=service_account)
    assert cm.patch({"k": "v"}) is False


def test_reporter_appends_metrics_and_patches_progress_and_result(
    tmp_path: Path, service_account: Path
) -> None:
    sent: list[dict[str, str]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content)["data"])
        return httpx.Response(200, json={})

    clock = FakeClock()
    sink = ProgressSink(config_map=ConfigMapSink(namespace="ns", name="cm"), stdout=False)
    reporter = reporting.ProgressReporter(
        tmp_path, sink, configmap=writer(service_account, httpx.MockTransport(handle), clock)
    )
    first = ProgressRecord(step=1, total_steps=2, epoch=0.5, train_loss=2.0)
    last = ProgressRecord(step=2, total_steps=2, epoch=1.0, train_loss=1.0)
    reporter.emit(first)
    reporter.emit(last)  # rate-limited
    reporter.flush(last)  # ... so the final record is forced out
    reporter.emit_result('{"steps": 2}')
    assert [r.step for r in reporting.read_metrics(tmp_path / reporting.METRICS_FILE)] == [1, 2]
    assert [json.loads(d[CONFIGMAP_KEY])["step"] for d in sent if CONFIGMAP_KEY in d] == [1, 2]
    assert sent[-1] == {RESULT_KEY: '{"steps": 2}'}


def test_resuming_keeps_the_metrics_up_to_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / reporting.METRICS_FILE
    records = [ProgressRecord(step=s, total_steps=30, epoch=s / 30, train_loss=1.0) for s in (1, 2)]
    records.append(ProgressRecord(step=2, total_steps=30, epoch=2 / 30, valid_loss=0.5))
    records += [
        ProgressRecord(step=s, total_steps=30, epoch=s / 30, train_loss=1.0) for s in (3, 4)
    ]
    # a killed run: steps after the checkpoint (2), and a line cut off mid-write
    path.write_text("".join(r.to_json() + "\n" for r in records) + '{"step": 5, "to')
    assert reporting.keep_metrics_through(path, 2) == 3
    assert reporting.read_metrics(path) == records[:3]
    assert not list(tmp_path.glob("*.tmp"))
    assert reporting.keep_metrics_through(path, 2) == 0  # nothing more to drop
    assert reporting.keep_metrics_through(path, 0) == 3  # no checkpoint: the run starts over
    assert path.read_text() == ""
    assert reporting.keep_metrics_through(tmp_path / "absent.jsonl", 0) == 0


def test_termination_message_is_the_last_line(tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    log.write_text("")
    reporting.write_termination_message("Traceback ...\n  File x\nValueError: bad\n\n", log)
    assert log.read_text() == "ValueError: bad\n"


def test_termination_message_needs_the_file(tmp_path: Path) -> None:
    reporting.write_termination_message("boom", tmp_path / "absent")
    assert not (tmp_path / "absent").exists()


def test_loss_plot_is_a_png(tmp_path: Path) -> None:
    records = [
        ProgressRecord(step=s, total_steps=4, epoch=s / 4, train_loss=4.0 / s, valid_loss=v)
        for s, v in [(1, None), (2, 3.0), (3, 3.0), (4, 1.5)]
    ]
    path = tmp_path / "loss.png"
    reporting.plot_loss(records, path, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_reader_that_goes_away_ends_the_printing_not_the_training(tmp_path: Path) -> None:
    """``kubetune run`` killed with its terminal: the trainer's stdout pipe has no reader."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from kubetune.api.jobconfig import ProgressSink\n"
        "from kubetune.progress import ProgressRecord\n"
        "from kubetune.trainer import reporting\n"
        "reporter = reporting.ProgressReporter(Path(sys.argv[1]), ProgressSink(stdout=True))\n"
        "for step in range(1, 201):\n"
        "    reporter.emit(ProgressRecord(step=step, total_steps=200, epoch=0.0, train_loss=1.0))\n"
        "    if step == 1:\n"
        "        sys.stdin.readline()  # the reader is gone once this returns\n"
        "print('after the last record')\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONSAFEPATH": "1"},
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None and proc.stderr is not None
    assert json.loads(proc.stdout.readline())["step"] == 1
    proc.stdout.close()
    proc.stdin.write(b"go\n")
    proc.stdin.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, stderr  # not 1 (BrokenPipeError), not 120 (at exit)
    steps = [r.step for r in reporting.read_metrics(tmp_path / reporting.METRICS_FILE)]
    assert steps == list(range(1, 201))
    assert stderr.count("stdout is gone") == 1
