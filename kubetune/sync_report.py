"""The report contract between the adapter-sync sidecar (writer) and the operator (reader).

A ``Live`` ModelServer's pods run :mod:`kubetune.server.adapter_sync` beside vLLM; after each
round it serves a :class:`Report` as JSON on ``GET http://<podIP>:SYNC_PORT/``. The operator
(:mod:`kubetune.operator.adapter_reports`) reads it from every ready pod and compares
``digest`` with :meth:`~kubetune.api.serveconfig.ServeConfig.adapter_digest` of the config it
applied. Both ends use only this module, so the format changes in one place. It imports
nothing but the standard library.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SYNC_PORT = 8001
"""Where the report is served (all interfaces, IPv4 and IPv6): the operator reads it at the
pod's IP."""


@dataclass(frozen=True)
class Report:
    """What one round achieved; the JSON document the sidecar serves."""

    digest: str | None
    """``adapter_digest()`` of the config this round synced to; None before a config was read."""
    synced: bool
    """Every desired adapter not refused is served from its path, nothing else is served,
    nothing is pending and the round had no error."""
    served: list[str]
    """The adapter names vLLM lists now, sorted (empty when it could not be asked)."""
    pending: dict[str, str] = field(default_factory=dict)
    """Name -> why the change is not done yet: a desired adapter not served yet, or an extra
    adapter not unloaded yet. Retried every round."""
    refused: dict[str, str] = field(default_factory=dict)
    """Name -> why the adapter can never load as it is. Retried when its folder changes."""
    error: str | None = None
    """A problem with the whole round (config unreadable, vLLM unreachable, runtime updates
    off, unauthorized): it is not any one adapter's fault."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "synced": self.synced,
            "served": list(self.served),
            "pending": dict(self.pending),
            "refused": dict(self.refused),
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Report:
        """Parses a report from untrusted JSON; raises ValueError naming the bad key.

        Keys it does not know are ignored, so that a sidecar one version ahead of the
        operator (during an upgrade) can add fields without breaking it.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a report is a JSON object, not {type(data).__name__}")
        for key, (valid, expected) in _FIELD_CHECKS.items():
            if key not in data:
                raise ValueError(f"`{key}` is missing")
            if not valid(data[key]):
                raise ValueError(f"`{key}` must be {expected}, not {json.dumps(data[key])[:80]}")
        return cls(
            digest=data["digest"],
            synced=data["synced"],
            served=list(data["served"]),
            pending=dict(data["pending"]),
            refused=dict(data["refused"]),
            error=data["error"],
        )


def _optional_str(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _reasons(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


_FIELD_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "digest": (_optional_str, "a string or null"),
    "synced": (lambda v: isinstance(v, bool), "true or false"),
    "served": (_names, "a list of adapter names"),
    "pending": (_reasons, "an object of adapter names to reasons"),
    "refused": (_reasons, "an object of adapter names to reasons"),
    "error": (_optional_str, "a string or null"),
}
"""What :meth:`Report.from_dict` accepts for each key (JSON object keys are always strings)."""
