"""Network helpers for tests that start servers on loopback."""

from __future__ import annotations

from kubetune import localproc


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel's pick)."""
    return localproc.free_port("127.0.0.1", 0)
