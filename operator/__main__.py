"""``python -m kubetune.operator``: runs the kopf operator for FineTuneJobs.

Thin: parses flags, imports the handlers (which registers them) and hands over to kopf.
"""

from __future__ import annotations

import argparse
import logging
import sys


def _host_port(text: str) -> tuple[str, int] | None:
    if not text:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. 0.0.0.0:8081), got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune.operator", description=__doc__)
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="namespace (or glob) to watch; repeatable",
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    parser.add_argument(
        "--liveness",
        default="http://0.0.0.0:8080/healthz",
        help="liveness endpoint URL ('' to disable)",
    )
    parser.add_argument(
        "--metrics",
        default="0.0.0.0:8081",
        type=_host_port,
        metavar="HOST:PORT",
        help="where to serve Prometheus metrics at /metrics ('' to disable)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)

    import kopf

    from kubetune.operator import (
        handlers,  # registers the handlers
        log_filters,
        metrics,
        openai_client,
    )

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    openai_client.quiet_http_logs()  # their DEBUG records carry the API key's header
    if not args.verbose:
        log_filters.quiet_successes(
            handlers.count_jobs,
            handlers.count_servers,
            handlers.reconcile,
            handlers.reconcile_model_server,
        )
    if args.metrics is not None:
        metrics.serve(*args.metrics)
    kopf.run(
        standalone=True,
        clusterwide=args.all_namespaces or not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
