"""Reading a dataset ``url`` from inside the operator's pod, never from its own host.

The operator fetches what any FineTuneJob author names. Without a guard, a job could read the
cloud's instance-metadata service (169.254.169.254, which hands out node credentials) or a
service on the operator's loopback. Cluster-internal (private) addresses stay allowed: object
stores such as MinIO live there.

Each hop (the URL, then every redirect) is resolved once, every address is checked, and the
connection goes to the checked address: the request keeps the name in its ``Host`` header and,
for https, in SNI and certificate verification (httpcore's ``sni_hostname``). So a DNS answer
that changes between the check and the connection (rebinding) reaches nothing new.

Through an HTTP(S) proxy (``HTTPS_PROXY`` and friends) the proxy resolves and connects: the name
is still checked where it resolves here, but a NetworkPolicy on the operator's egress (or the
proxy's own rules) is then the complete answer.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import urllib.request
from typing import IO

import httpx

MAX_REDIRECTS = 5
TIMEOUT_SECONDS = 30
DEFAULT_PORTS = {"http": 80, "https": 443}


class Refused(Exception):
    """The URL (or a redirect) leads to an address the operator does not fetch from."""


class TooLarge(Exception):
    """The body is larger than the limit."""


def refused(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return (
        address.is_loopback
        or address.is_link_local
        or address.is_unspecified
        or address.is_multicast
    )


def resolve(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to, in the resolver's order.

    A name that does not resolve raises httpx.ConnectError, as the connection attempt would.
    """
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise httpx.ConnectError(f"cannot resolve {host}: {exc}") from None
    return [str(info[4][0]) for info in infos]


def checked_address(host: str, port: int) -> str:
    """The address to connect to for ``host``: the first it resolves to, once none is refused."""
    raw = resolve(host, port)
    for text in raw:
        address = ipaddress.ip_address(text.split("%")[0])
        if refused(address):
            raise Refused(
                f"{host} resolves to {address}, a loopback or link-local address "
                "the operator does not fetch from"
            )
    return raw[0]


def proxied(url: httpx.URL) -> bool:
    """Whether the environment sends this URL through a proxy (as httpx, trusting it, does)."""
    proxies = urllib.request.getproxies_environment()
    if url.scheme not in proxies and "all" not in proxies:
        return False
    return not urllib.request.proxy_bypass(url.host)  # NO_PROXY, on Linux


def pinned_request(client: httpx.Client, url: httpx.URL) -> httpx.Request:
    """A GET of ``url`` that connects to the address checked now, not to a later DNS answer."""
    if url.scheme not in DEFAULT_PORTS:
        raise Refused(f"{url.scheme!r} URLs are not fetched (http or https only)")
    port = url.port or DEFAULT_PORTS[url.scheme]
    if proxied(url):
        # A name only the proxy can resolve is the proxy's to reach.
        with contextlib.suppress(httpx.ConnectError):
            checked_address(url.host, port)
        return client.build_request("GET", url)
    address = checked_address(url.host, port)
    extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
    return client.build_request(
        "GET",
        url.copy_with(host=address),
        headers={"Host": url.netloc.decode("ascii")},
        extensions=extensions,
    )


def download(
    url: str, dest: IO[bytes], max_bytes: int, transport: httpx.BaseTransport | None = None
) -> int:
    """Writes the body of ``url`` to ``dest`` as it arrives and returns its size in bytes.

    Redirects are followed, each checked and pinned like the first. Memory stays at one chunk
    whatever the size. Raises Refused, TooLarge (once more than ``max_bytes`` arrived; ``dest``
    then holds a partial body), httpx.HTTPStatusError for a non-2xx answer, and other
    httpx.HTTPError subclasses for network trouble.
    """
    target = httpx.URL(url)
    with httpx.Client(transport=transport, timeout=TIMEOUT_SECONDS) as client:
        for _ in range(MAX_REDIRECTS + 1):
            response = client.send(pinned_request(client, target), stream=True)
            try:
                if response.is_redirect:
                    target = target.join(response.headers["Location"])
                    continue
                response.raise_for_status()
                size = 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLarge(f"larger than {max_bytes} bytes")
                    dest.write(chunk)
                return size
            finally:
                response.close()
    raise httpx.TooManyRedirects(f"more than {MAX_REDIRECTS} redirects from {url}")
