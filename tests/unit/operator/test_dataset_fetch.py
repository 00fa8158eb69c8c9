"""Dataset URLs the operator fetches itself: never its own loopback or the metadata service,
and errors that name the field (a missing file fails the job; a server error is retried)."""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from kubetune.api import finetunejob as ftj
from kubetune.operator import checks, kube

LINES = (
    b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
)


def serve(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/moved":
        return httpx.Response(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})
    return httpx.Response(200, content=LINES)


def fetch(url: str, answer: Callable[[httpx.Request], httpx.Response] = serve) -> bytes | None:
    src = ftj.DatasetSource(url=url)
    with checks.open_dataset(src, "team-a", "spec.dataset", httpx.MockTransport(answer)) as f:
        return None if f is None else f.read()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/train.jsonl",
        "http://localhost/train.jsonl",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:127.0.0.1]/train.jsonl",
        "http://[::1]/train.jsonl",
    ],
)
def test_loopback_and_link_local_addresses_are_refused_naming_the_field(url: str) -> None:
    with pytest.raises(checks.InvalidJob, match=r"spec\.dataset\.url: .* loopback or link-local"):
        fetch(url)


def test_a_redirect_to_the_metadata_service_is_refused() -> None:
    with pytest.raises(checks.InvalidJob, match=r"169\.254\.169\.254"):
        fetch("http://93.184.216.34/moved")


@pytest.mark.parametrize("url", ["http://93.184.216.34/train.jsonl", "http://10.0.0.5/train.jsonl"])
def test_public_and_cluster_internal_addresses_are_fetched(url: str) -> None:
    assert fetch(url) == LINES


@pytest.mark.parametrize("code", [401, 403, 404])
def test_a_url_that_is_not_there_or_not_ours_fails_the_job(code: int) -> None:
    with pytest.raises(checks.InvalidJob, match=rf"spec\.dataset\.url: HTTP {code} from http://93"):
        fetch("http://93.184.216.34/train.jsonl", lambda _: httpx.Response(code))


def test_a_server_error_or_a_name_that_does_not_resolve_is_retried() -> None:
    with pytest.raises(kube.TemporaryKubeError, match=r"spec\.dataset\.url: HTTP 503"):
        fetch("http://93.184.216.34/train.jsonl", lambda _: httpx.Response(503))
    with pytest.raises(kube.TemporaryKubeError, match=r"spec\.dataset\.url: ConnectError"):
        fetch("http://no-such-host.invalid/train.jsonl")


def test_a_fetched_body_is_a_temporary_file_that_is_gone_after_the_block() -> None:
    src = ftj.DatasetSource(url="http://93.184.216.34/train.jsonl")
    with checks.open_dataset(src, "team-a", "spec.dataset", httpx.MockTransport(serve)) as f:
        assert f is not None and not isinstance(f, io.BytesIO)
        path = Path(f"/proc/self/fd/{f.fileno()}").readlink()
        assert str(path).startswith(tempfile.gettempdir()) and f.read() == LINES
    assert f.closed and not path.exists()


def test_a_pvc_source_is_not_read_here() -> None:
    src = ftj.DatasetSource(pvc=ftj.PVCPath(claim_name="data", path="train.jsonl"))
    with checks.open_dataset(src, "team-a", "spec.dataset") as f:
        assert f is None
