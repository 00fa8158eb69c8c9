"""The resolved job config: the one document the trainer reads (``--config PATH``).

The operator resolves a FineTuneJob into this (every source turned into a path or URL the
trainer pod can read, every default applied) and mounts it from a ConfigMap; ``kubetune run
--local`` writes the same document to a file. LoRA and hyperparameter shapes are the
FineTuneJob's own models, not copies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, model_validator

from kubetune.api.finetunejob import Hyperparameters, LoraSpec, Method
from kubetune.api.types import ApiModel

CONFIG_KIND = "TrainerConfig"


class JobIdentity(ApiModel):
    namespace: str = Field(default="default", description="FineTuneJob namespace.")
    name: str = Field(description="FineTuneJob name; also the adapter's served name.")
    uid: str = Field(default="local", description="FineTuneJob UID (or `local`).")


class BaseModelSource(ApiModel):
    id_or_path: str = Field(description="Hugging Face id or a local folder.")
    revision: str | None = Field(default=None, description="Revision of a hub id.")
    display: str = Field(description="How the base model is named in results and status.")


class DataFile(ApiModel):
    path: str | None = Field(default=None, description="A JSONL file the trainer can read.")
    url: str | None = Field(default=None, description="An http(s) URL the trainer downloads.")

    @model_validator(mode="after")
    def _one(self) -> DataFile:
        if (self.path is None) == (self.url is None):
            raise ValueError("set exactly one of `path` or `url`")
        return self


class ConfigMapSink(ApiModel):
    namespace: str = Field(description="Namespace of the progress ConfigMap.")
    name: str = Field(description="Name of the progress ConfigMap (the trainer may only patch it).")


class ProgressSink(ApiModel):
    """Where progress records go, besides ``metrics.jsonl`` in the output folder."""

    config_map: ConfigMapSink | None = Field(
        default=None, description="Patched with the latest record (in-cluster)."
    )
    stdout: bool = Field(default=True, description="Also print one JSON line per record.")


class TrainerConfig(ApiModel):
    api_version: Literal["kubetune.io/v1alpha1"] = "kubetune.io/v1alpha1"
    kind: Literal["TrainerConfig"] = "TrainerConfig"
    job: JobIdentity
    model: BaseModelSource
    dataset: DataFile
    validation: DataFile | None = None
    method: Method = Method.LORA
    lora: LoraSpec = Field(default_factory=LoraSpec)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    output_dir: str = Field(description="The job's own folder; nothing outside it is written.")
    progress: ProgressSink = Field(default_factory=ProgressSink)
    gpus: int = Field(default=0, ge=0, description="GPUs in the pod; >1 launches torchrun.")
    max_steps: int | None = Field(
        default=None, ge=1, description="Stop after this many steps (tests, smoke runs)."
    )

    @classmethod
    def load(cls, path: str | Path) -> TrainerConfig:
        with Path(path).open(encoding="utf-8") as f:
            return cls.model_validate(yaml.safe_load(f))

    def dump_yaml(self) -> str:
        return yaml.safe_dump(self.to_wire(), sort_keys=False, allow_unicode=True)
