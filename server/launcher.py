"""``python -m kubetune.server --config PATH``: check the adapters, then become vLLM.

The launcher reads a :class:`~kubetune.api.serveconfig.ServeConfig`, waits until every
adapter's files are complete, refuses (exit code 2, one line on stderr naming the cause) an
adapter whose rank or base model does not fit (also into ``/dev/termination-log`` in a pod,
so ``kubectl describe pod`` shows why), and then ``exec``s vLLM's OpenAI-compatible
server with the argv and environment built by :mod:`kubetune.server.vllm_args`. After the
exec the process *is* vLLM (same pid), so Kubernetes' signals and probes reach it directly.

It never imports vLLM (only asks which distribution is installed), torch, kopf or the
Kubernetes client: ``--help`` and every refusal are instant. A base model named by Hub id is
asked for once (its ``config.json``), so that the Hub's refusal is one line too.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml
from pydantic import ValidationError

from kubetune import hub
from kubetune.api.serveconfig import ServeConfig
from kubetune.server import adapter_checks, vllm_args

log = logging.getLogger("kubetune.server")

EXIT_REFUSED = 2
"""The input can never work as given (bad config, bad adapter); restarting cannot help."""


REFUSAL_PREFIX = "kubetune.server: refusing to start: "
"""How a refusal's one line (stderr, termination message) begins; the operator strips it."""


class LaunchRefused(Exception):
    """Something in the config or the adapters rules out starting vLLM."""


def installed_engine_problem(engine: str) -> str | None:
    """Why the configured engine cannot run in this environment, or None if it can."""
    wanted = vllm_args.ENGINE_DISTRIBUTIONS[engine]
    try:
        importlib.metadata.distribution(wanted)
    except importlib.metadata.PackageNotFoundError:
        others = []
        for name in vllm_args.ENGINE_DISTRIBUTIONS.values():
            try:
                importlib.metadata.distribution(name)
                others.append(name)
            except importlib.metadata.PackageNotFoundError:
                pass
        found = f"; this image has {', '.join(others)}" if others else ""
        return f"`engine: {engine}` needs the `{wanted}` package, which is not installed{found}"
    return None


def startable(config: ServeConfig) -> tuple[ServeConfig, list[adapter_checks.AdapterInfo]]:
    """With ``adapterSync``: the config less the adapters that cannot load now (incomplete,
    refused, or carrying a chat template that conflicts with an earlier one's), each logged,
    and the checked ones' infos. The sidecar keeps trying the others and reports why not; one
    bad adapter must not keep a server of many from starting."""
    kept: list[adapter_checks.AdapterInfo] = []
    for adapter in config.adapters:
        try:
            info = adapter_checks.read_adapter(adapter)
            adapter_checks.check_adapter(info, config)
            adapter_checks.chat_template(config, [*kept, info])
        except adapter_checks.AdapterRefused as e:
            log.warning("starting without adapter %s (the sidecar reports it): %s", adapter.name, e)
            continue
        kept.append(info)
    names = {i.name for i in kept}
    loadable = [a for a in config.adapters if a.name in names]
    return config.model_copy(update={"adapters": loadable}), kept


def prepare(
    config: ServeConfig, environ: dict[str, str], python: str
) -> tuple[list[str], dict[str, str]]:
    """Checks the adapters and builds vLLM's argv and environment; raises LaunchRefused."""
    try:
        if config.adapter_sync:
            config, infos = startable(config)
        else:
            infos = adapter_checks.check_adapters(config)
        template = adapter_checks.chat_template(config, infos)
    except adapter_checks.AdapterRefused as e:
        raise LaunchRefused(str(e)) from e
    try:
        env = vllm_args.vllm_env(config, environ)
    except ValueError as e:
        raise LaunchRefused(str(e)) from e
    argv = vllm_args.vllm_argv(
        config, adapter_ranks=adapter_checks.ranks(infos), chat_template=template, python=python
    )
    return argv, env


def check_base_model(config: ServeConfig) -> None:
    """A base model named by Hub id: the Hub's refusal (gated, no access, unknown id or
    revision) refuses the launch, with the field to change, instead of vLLM failing with a
    stack trace in a crash loop (:func:`hub.check`: a local folder, or offline mode, is not
    asked about)."""
    try:
        hub.check(config.model, config.revision)
    except hub.ModelAccessError as e:
        raise LaunchRefused(str(e)) from e


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m kubetune.server",
        description="Check LoRA adapters, then start vLLM's OpenAI-compatible server.",
    )
    p.add_argument("--config", required=True, help="serve config (YAML or JSON)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything, print the vLLM command as JSON, and exit without starting it",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = ServeConfig.load(args.config)
    except yaml.YAMLError as e:
        return refuse(f"cannot read serve config {args.config}: {yaml_problem(e)}")
    except ValidationError as e:
        return refuse(f"invalid serve config {args.config}: {validation_problem(e)}")
    except (OSError, ValueError) as e:
        return refuse(f"cannot read serve config {args.config}: {e}")
    try:
        if not args.dry_run:
            problem = installed_engine_problem(config.engine)
            if problem:
                raise LaunchRefused(problem)
        command, env = prepare(config, dict(os.environ), sys.executable)
        if not args.dry_run:
            check_base_model(config)
    except LaunchRefused as e:
        return refuse(str(e))

    if args.dry_run:
        added = sorted(k for k in env if os.environ.get(k) != env[k])
        sys.stdout.write(json.dumps({"argv": command, "env": added}, indent=2) + "\n")
        return 0
    log.info("starting vLLM: %s", vllm_args.redacted(command, env))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(command[0], command, env)


def validation_problem(e: ValidationError, whole: str = "config") -> str:
    """pydantic's errors on one line, each with its field (``whole`` for the model itself),
    without the values given (an `extraArgs` entry may hold a secret, and the line goes into
    the pod's status)."""
    return "; ".join(
        f"`{'.'.join(str(part) for part in err['loc']) or whole}`: {err['msg']}"
        for err in e.errors(include_input=False, include_url=False)
    )


def yaml_problem(e: yaml.YAMLError) -> str:
    """yaml's error on one line, with the line and column it points at (counted from 1)."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark, problem = e.problem_mark, e.problem or "syntax error"
        return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return "invalid YAML: " + " ".join(str(e).split())


TERMINATION_LOG = Path("/dev/termination-log")
"""Kubernetes shows this file's text as the container's termination message."""


def refuse(message: str) -> int:
    line = REFUSAL_PREFIX + message
    sys.stderr.write(line + "\n")
    if TERMINATION_LOG.exists():  # only in a pod: never create it elsewhere
        with contextlib.suppress(OSError):
            TERMINATION_LOG.write_text(line + "\n", encoding="utf-8")
    return EXIT_REFUSED
