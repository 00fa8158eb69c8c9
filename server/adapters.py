"""Loads and unloads LoRA adapters on a running vLLM server, and confirms each change.

vLLM accepts ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` only when it was
started with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` (``runtimeLoraUpdating`` in the serve
config). A 200 from those endpoints is not taken as proof: after every change the client reads
``/v1/models`` and reports an adapter as served only if it is listed there, with the base model
as its parent. The operator imports this module, so it needs nothing but httpx and the
launcher's adapter checks (standard library and the serve config): never vLLM.

Both operations are idempotent, as a level-triggered caller needs: loading an adapter already
served from the same path, or unloading one that is not served, succeeds without a request.

Before asking for a load, the client runs the launcher's checks
(:mod:`kubetune.server.adapter_checks`) when the adapter's folder is readable here too: vLLM
answers a LoRA variant it cannot serve, a rank above ``--max-lora-rank`` or unexpected target
modules with a 500, which only its message tells apart from a server failure.

Exception tree (every HTTP or transport failure is mapped here, in :meth:`AdapterClient._call`)::

    AdapterError                    base: the change did not happen
    ├── ServerUnavailable           connection failed, timed out, a 5xx (other than a
    │                               failed adapter load), or /v1/models answered with
    │                               something other than a model list: retry later
    ├── AdapterNotReady             the adapter's files are still being written: retry later
    └── AdapterRequestRefused       the server (4xx) or our checks said no: do not retry as is
        ├── AdapterInvalid          the adapter can never load (our checks, or vLLM's 500 saying
        │                           it failed to load it)
        ├── RuntimeUpdatesDisabled  the endpoints do not exist (runtime updating is off)
        └── Unauthorized            401: missing or wrong API key
    AdapterNotConfirmed             (an AdapterError) the server said yes, /v1/models disagrees
                                    (not listed, listed from another path, or under
                                    another parent than the served base model)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from kubetune.api.serveconfig import AdapterSource, ServeConfig
from kubetune.server import adapter_checks

log = logging.getLogger(__name__)

LOAD_FAILED_PREFIX = "Call to add_lora method failed:"
"""How vLLM 0.32's engine process reports an exception from loading an adapter (PEFT checks,
weight loading); its API server passes it on as a 500 ``InternalServerError``. Other 500s (the
engine died or is shutting down) say otherwise and stay temporary. An in-process engine
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) sends the bare message, which is not recognised."""


class AdapterError(Exception):
    """A load or unload did not take effect."""


class ServerUnavailable(AdapterError):
    """The server could not be reached or failed (5xx); the same call may work later."""


class AdapterNotReady(AdapterError):
    """The adapter's files are incomplete (still being written?); the same call may work later."""


class AdapterRequestRefused(AdapterError):
    """The request was refused (4xx, or a check here); repeating it unchanged will not help."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


class AdapterInvalid(AdapterRequestRefused):
    """The adapter itself cannot be served: fix or replace it, then load it again."""


class RuntimeUpdatesDisabled(AdapterRequestRefused):
    """The server was started without VLLM_ALLOW_RUNTIME_LORA_UPDATING=True."""


class Unauthorized(AdapterRequestRefused):
    """The server wants an API key (``Authorization: Bearer``) and did not get the right one."""


class AdapterNotConfirmed(AdapterError):
    """The server answered success, but ``/v1/models`` does not show the change."""


@dataclass(frozen=True)
class ServedModel:
    """One entry of ``/v1/models``."""

    id: str
    root: str | None
    """For an adapter: the path it was loaded from. For the base: the model id or folder."""
    parent: str | None
    """For an adapter: the served base model's name. None for a base model."""

    @property
    def is_adapter(self) -> bool:
        return self.parent is not None


def _served_model(entry: Any) -> ServedModel:
    """One ``/v1/models`` entry; raises KeyError or TypeError when it is not one."""
    if not isinstance(entry, dict):
        raise TypeError(f"an entry is a {type(entry).__name__}, not an object")
    root, parent = entry.get("root"), entry.get("parent")
    return ServedModel(
        id=str(entry["id"]),
        root=None if root is None else str(root),
        parent=None if parent is None else str(parent),
    )


def _failed_load(response: httpx.Response) -> bool:
    """Whether a 500 is vLLM's answer that it could not load the adapter."""
    try:
        body: Any = response.json()
    except ValueError:
        return False
    error = body.get("error") if isinstance(body, dict) else None
    return (
        isinstance(error, dict)
        and error.get("type") == "InternalServerError"
        and str(error.get("message", "")).startswith(LOAD_FAILED_PREFIX)
    )


def _error_text(response: httpx.Response) -> str:
    try:
        body: Any = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err)
        return str(body.get("message") or err)
    return str(body)[:500]


class AdapterClient:
    """A client for one vLLM server.

    ``base_url`` is the server's root (``http://host:8000``) or its OpenAI base URL
    (``http://host:8000/v1``); ``api_key`` is sent as a bearer token when the server has one.
    ``config``, the server's serve config when known, adds the launcher's rank-limit and
    base-model checks to those run on an adapter folder readable here.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        transport: httpx.BaseTransport | None = None,
        config: ServeConfig | None = None,
    ) -> None:
        self._config = config
        root = base_url.rstrip("/").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # Loading reads the adapter from disk and may have to evict another: allow for it.
        self._http = httpx.Client(
            base_url=root, headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> AdapterClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -------------------------------------------------------------------------- reading

    def models(self) -> list[ServedModel]:
        """Everything the server serves now: the base model(s) and the adapters.

        Raises ServerUnavailable when the answer is not an OpenAI model list (a proxy's error
        page, another server on that address).
        """
        response = self._call("GET", "/v1/models", what="list served models")
        try:
            body: Any = response.json()
            entries = body["data"]
            if not isinstance(entries, list):
                raise TypeError(f"`data` is a {type(entries).__name__}")
            return [_served_model(m) for m in entries]
        except (ValueError, KeyError, TypeError) as e:
            shown = response.text.strip()[:200]
            raise ServerUnavailable(
                f"cannot list served models: {self._http.base_url}/v1/models did not answer "
                f"with an OpenAI model list ({type(e).__name__}: {e}): {shown!r}"
            ) from e

    def adapters(self) -> dict[str, ServedModel]:
        """The adapters served now, by name."""
        return {m.id: m for m in self.models() if m.is_adapter}

    # -------------------------------------------------------------------------- changing

    def load(self, name: str, path: str, *, replace: bool = False) -> ServedModel:
        """Loads the adapter at ``path`` (a folder the *server* can read) under ``name``.

        An adapter already served under ``name`` from ``path`` is left as it is. One served
        under ``name`` from another path is an error unless ``replace`` is set, which swaps it
        in place. Returns the adapter's ``/v1/models`` entry.
        """
        current = self.adapters().get(name)
        if current is not None and current.root == path and not replace:
            return current
        if current is not None and not replace:
            raise AdapterRequestRefused(
                f"cannot load adapter `{name}` from {path}: that name is already served from "
                f"{current.root} (pass replace=True to swap it)",
                409,
            )
        self._check_files(name, path)
        payload: dict[str, Any] = {"lora_name": name, "lora_path": path}
        if current is not None:
            payload["load_inplace"] = True
        self._call(
            "POST", "/v1/load_lora_adapter", json=payload, what=f"load adapter `{name}` from {path}"
        )
        models = self.models()
        served = next((m for m in models if m.id == name and m.is_adapter), None)
        if served is None:
            raise AdapterNotConfirmed(
                f"the server accepted adapter `{name}` from {path}, but /v1/models does not "
                "list it; it is not served"
            )
        if served.root != path:
            raise AdapterNotConfirmed(
                f"the server accepted adapter `{name}` from {path}, but /v1/models lists it "
                f"from {served.root}; the new adapter is not served"
            )
        bases = {m.id for m in models if not m.is_adapter}
        if self._config is not None:
            bases &= {self._config.base_name}
        if served.parent not in bases:
            want = " or ".join(f"`{b}`" for b in sorted(bases)) or "no base model it lists"
            raise AdapterNotConfirmed(
                f"the server lists adapter `{name}` with the parent `{served.parent}`, not the "
                f"served base model ({want})"
            )
        log.info("adapter %s loaded from %s", name, path)
        return served

    def unload(self, name: str) -> None:
        """Stops serving the adapter ``name``; nothing to do if it is not served."""
        if name not in self.adapters():
            return
        try:
            self._call(
                "POST",
                "/v1/unload_lora_adapter",
                json={"lora_name": name},
                what=f"unload adapter `{name}`",
            )
        except AdapterRequestRefused as e:
            if e.status_code != 404 or isinstance(e, RuntimeUpdatesDisabled):
                raise
            # Someone else unloaded it between our two requests: the goal is reached.
        if name in self.adapters():
            raise AdapterNotConfirmed(
                f"the server accepted unloading adapter `{name}`, but /v1/models still lists it"
            )
        log.info("adapter %s unloaded", name)

    def _check_files(self, name: str, path: str) -> None:
        """Refuses an adapter that vLLM would fail to load, if its folder is readable here.

        The path is the server's; when this process does not see an adapter config there,
        only the server can judge it.
        """
        if not (Path(path) / adapter_checks.ADAPTER_CONFIG).is_file():
            return
        # vLLM accepts any name at run time: skip the serve config's stricter name rules.
        source = AdapterSource.model_construct(name=name, path=path)
        try:
            info = adapter_checks.read_adapter(source)
            if self._config is not None:
                adapter_checks.check_adapter(info, self._config)
        except adapter_checks.AdapterNotReady as e:
            raise AdapterNotReady(f"cannot load adapter `{name}` from {path}: {e.reason}") from e
        except adapter_checks.AdapterRefused as e:
            raise AdapterInvalid(
                f"cannot load adapter `{name}` from {path}: {e.reason}", 422
            ) from e

    # -------------------------------------------------------------------------- transport

    def _call(self, method: str, path: str, *, what: str, **kwargs: Any) -> httpx.Response:
        """One request; every failure leaves as an :class:`AdapterError` with ``what`` in it."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise ServerUnavailable(
                f"cannot {what}: server {self._http.base_url} unreachable: {e}"
            ) from e
        if response.is_success:
            return response
        code = response.status_code
        detail = _error_text(response)
        if code == 401:
            raise Unauthorized(f"cannot {what}: unauthorized (API key missing or wrong)", code)
        if code in (404, 405) and path.endswith("_lora_adapter") and "lora" not in detail.lower():
            raise RuntimeUpdatesDisabled(
                f"cannot {what}: the server does not offer {path}; start it with runtime "
                "adapter updates allowed (VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, "
                "`runtimeLoraUpdating: true`)",
                code,
            )
        if code == 500 and path == "/v1/load_lora_adapter" and _failed_load(response):
            reason = detail.removeprefix(LOAD_FAILED_PREFIX).strip()
            raise AdapterInvalid(f"cannot {what}: vLLM failed to load it: {reason}", code)
        if code >= 500:
            raise ServerUnavailable(f"cannot {what}: server error {code}: {detail}")
        raise AdapterRequestRefused(f"cannot {what}: {code} {detail}", code)
