"""A dataset URL is fetched from the address that was checked, not from a later DNS answer."""

from __future__ import annotations

import http.server
import io
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kubetune.operator import dataset_url

BODY = b'{"messages": []}\n'
PUBLIC, LATER = "93.184.216.34", "127.0.0.1"


class Resolver:
    """Answers ``answers[i]`` (comma-separated addresses) to the i-th lookup, the last one from
    then on: like a rebinding DNS server that gives a harmless address first, an internal one
    after."""

    def __init__(self, *answers: str) -> None:
        self.answers, self.asked = list(answers), 0

    def __call__(self, host: str, port: int) -> list[str]:
        answer = self.answers[min(self.asked, len(self.answers) - 1)]
        self.asked += 1
        return answer.split(",")


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Resolver]:
    for var in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                "ALL_PROXY", "NO_PROXY"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)

    def install(*answers: str) -> Resolver:
        r = Resolver(*answers)
        monkeypatch.setattr(dataset_url, "resolve", r)
        return r

    return install


def fetch(url: str, max_bytes: int, transport: httpx.BaseTransport) -> bytes:
    body = io.BytesIO()
    dataset_url.download(url, body, max_bytes, transport)
    return body.getvalue()


def recording(
    answer: Callable[[httpx.Request], httpx.Response] | None = None,
) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer(request) if answer else httpx.Response(200, content=BODY)

    return httpx.MockTransport(handle), seen


def test_the_request_goes_to_the_checked_address_with_the_name_in_host_and_sni(
    resolver: Callable[..., Resolver],
) -> None:
    r = resolver(PUBLIC, LATER)
    transport, seen = recording()
    assert fetch("https://data.example:8443/train.jsonl", 1024, transport) == BODY
    assert r.asked == 1
    (request,) = seen
    assert request.url.host == PUBLIC and request.url.port == 8443
    assert request.headers["Host"] == "data.example:8443"
    assert request.extensions["sni_hostname"] == "data.example"


def test_each_redirect_is_resolved_checked_and_pinned_on_its_own(
    resolver: Callable[..., Resolver],
) -> None:
    # The name answers a public address, then (rebound) loopback for the redirect's lookup.
    resolver(PUBLIC, LATER)

    def moved(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/moved":
            return httpx.Response(302, headers={"Location": "/train.jsonl"})
        return httpx.Response(200, content=BODY)

    transport, seen = recording(moved)
    with pytest.raises(dataset_url.Refused, match=r"data\.example resolves to 127\.0\.0\.1"):
        fetch("http://data.example/moved", 1024, transport)
    assert [r.url.path for r in seen] == ["/moved"]


def test_a_relative_redirect_keeps_the_name_not_the_pinned_address(
    resolver: Callable[..., Resolver],
) -> None:
    resolver(PUBLIC)

    def moved(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/moved":
            return httpx.Response(301, headers={"Location": "/train.jsonl"})
        return httpx.Response(200, content=BODY)

    transport, seen = recording(moved)
    assert fetch("http://data.example/moved", 1024, transport) == BODY
    assert [(r.headers["Host"], r.url.path) for r in seen] == [
        ("data.example", "/moved"),
        ("data.example", "/train.jsonl"),
    ]


def test_a_redirect_loop_stops(resolver: Callable[..., Resolver]) -> None:
    resolver(PUBLIC)
    transport, seen = recording(lambda _: httpx.Response(302, headers={"Location": "/again"}))
    with pytest.raises(httpx.TooManyRedirects):
        fetch("http://data.example/again", 1024, transport)
    assert len(seen) == dataset_url.MAX_REDIRECTS + 1


def test_a_name_with_any_internal_address_is_refused(resolver: Callable[..., Resolver]) -> None:
    resolver(f"{PUBLIC},169.254.169.254")
    with pytest.raises(dataset_url.Refused, match=r"169\.254\.169\.254"):
        fetch("http://data.example/train.jsonl", 1024, recording()[0])


@pytest.mark.parametrize("url", ["ftp://data.example/train.jsonl", "file:///etc/passwd"])
def test_only_http_and_https_are_fetched(url: str, resolver: Callable[..., Resolver]) -> None:
    resolver(PUBLIC)
    with pytest.raises(dataset_url.Refused, match="http or https only"):
        fetch(url, 1024, recording()[0])


def unresolvable(host: str, port: int) -> list[str]:
    raise httpx.ConnectError(f"cannot resolve {host}")


def test_through_a_proxy_the_name_is_still_checked_but_the_proxy_connects(
    resolver: Callable[..., Resolver], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    resolver(PUBLIC)
    transport, seen = recording()
    assert fetch("https://data.example/train.jsonl", 1024, transport) == BODY
    assert seen[0].url.host == "data.example"
    resolver(LATER)
    with pytest.raises(dataset_url.Refused):
        fetch("https://data.example/train.jsonl", 1024, transport)
    # A name that only the proxy can resolve is left to it.
    monkeypatch.setattr(dataset_url, "resolve", unresolvable)
    assert fetch("https://data.example/train.jsonl", 1024, transport) == BODY
    # A name the proxy is bypassed for is pinned again.
    monkeypatch.setenv("NO_PROXY", "data.example")
    resolver(PUBLIC)
    assert fetch("https://data.example/train.jsonl", 1024, transport) == BODY
    assert seen[-1].url.host == PUBLIC


def test_without_a_proxy_a_name_that_does_not_resolve_is_a_connection_error(
    resolver: Callable[..., Resolver], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dataset_url, "resolve", unresolvable)
    with pytest.raises(httpx.ConnectError, match=r"cannot resolve data\.example"):
        fetch("https://data.example/train.jsonl", 1024, recording()[0])


def test_a_body_over_the_limit_is_refused(resolver: Callable[..., Resolver]) -> None:
    resolver(PUBLIC)
    with pytest.raises(dataset_url.TooLarge):
        fetch("http://data.example/big", len(BODY) - 1, recording()[0])


def test_download_writes_the_body_as_it_arrives(
    resolver: Callable[..., Resolver], tmp_path: Path
) -> None:
    resolver(PUBLIC)
    chunks = [BODY] * 1000

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=iter(chunks))

    with (tmp_path / "d.jsonl").open("wb") as f:
        size = dataset_url.download("http://data.example/d", f, 1 << 20, recording(answer)[0])
    assert size == len(BODY) * 1000
    assert (tmp_path / "d.jsonl").read_bytes() == BODY * 1000


# --- a real TLS server: SNI and the certificate are checked against the name --------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path, list[str]]]:
    """An https server on 127.0.0.1 with a throwaway certificate for ``dataset.test``.

    Yields its port, the certificate (to trust) and the Host headers it was sent.
    """
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=dataset.test", "-addext", "subjectAltName=DNS:dataset.test"],
        check=True, capture_output=True,
    )  # fmt: skip
    hosts: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hosts.append(self.headers["Host"])
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], cert, hosts
    server.shutdown()


def trusting(cert: Path) -> httpx.HTTPTransport:
    return httpx.HTTPTransport(verify=ssl.create_default_context(cafile=str(cert)))


def test_over_real_tls_the_pinned_connection_verifies_the_certificate_for_the_name(
    tls_server: tuple[int, Path, list[str]],
    resolver: Callable[..., Resolver],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port, cert, hosts = tls_server
    # Loopback stands in for a cluster address here: the server has to run on this host.
    monkeypatch.setattr(dataset_url, "refused", lambda address: False)
    # A second lookup would answer an address where nothing listens (TEST-NET-3).
    r = resolver("127.0.0.1", "203.0.113.7")
    url = f"https://dataset.test:{port}/train.jsonl"
    assert fetch(url, 1024, trusting(cert)) == BODY
    assert r.asked == 1
    assert hosts[-1] == f"dataset.test:{port}"


def test_over_real_tls_a_certificate_for_another_name_is_rejected(
    tls_server: tuple[int, Path, list[str]],
    resolver: Callable[..., Resolver],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port, cert, _ = tls_server
    monkeypatch.setattr(dataset_url, "refused", lambda address: False)
    resolver("127.0.0.1")
    with pytest.raises(httpx.ConnectError, match="certificate verify failed"):
        fetch(f"https://other.test:{port}/train.jsonl", 1024, trusting(cert))
