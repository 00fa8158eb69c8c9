"""One training run from a resolved config: data → plan → model → train → outputs.

Order matters and is the point of this module: everything that can be wrong with the job
(the data, the plan, QLoRA on a CPU, an output folder that belongs to another job) is found
before the model's weights are read, and is reported as a permanent error (exit code 2) with
the problem on the last line of ``/dev/termination-log``. A preempted run (SIGTERM) checkpoints
and exits with 143; started again on the same output folder (and the same data: the files'
digests are recorded with the folder's owner), it resumes from the newest complete checkpoint.
Outputs are written so that none of them is ever seen half-written, with ``result.json`` last.

Exit codes: 0 finished (or already finished), 1 failed, 2 invalid job, 143 preempted.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubetune import hub
from kubetune.api.jobconfig import TrainerConfig
from kubetune.api.result import RESULT_FILE, DataCounts, TrainingResult
from kubetune.progress import ProgressRecord
from kubetune.trainer import (
    chat,
    checkpoints,
    dataset,
    launch,
    modelload,
    ownership,
    plan,
    reporting,
)
from kubetune.trainer.launch import EXIT_FAILED, EXIT_INVALID, EXIT_OK, EXIT_PREEMPTED
from kubetune.trainer.preemption import Preemption

log = logging.getLogger(__name__)

ADAPTER_FILES_LAST = "adapter_config.json"
"""Moved into place last: the server treats a folder without it as not ready yet."""

PERMANENT = (
    dataset.DataError,
    plan.PlanError,
    modelload.QLoraUnavailable,
    hub.ModelAccessError,
    chat.TemplateError,
    ownership.OutputConflict,
)


@dataclass
class Prepared:
    """Everything decided before the model is loaded."""

    train_examples: list[chat.TokenizedExample]
    valid_examples: list[chat.TokenizedExample]
    summary: chat.TokenizeSummary
    examples_in_file: int
    plan: plan.TrainingPlan
    tokenizer: Any
    fallback_template: bool
    dataset_sha256: str
    validation_sha256: str | None


@dataclass
class DataFiles:
    """The validated files and their examples (standard library and kubetune.data only)."""

    train_path: Path
    train: list[chat.Conversation]
    valid_path: Path | None
    valid: list[chat.Conversation]
    digests: ownership.DataDigests


def read_data(config: TrainerConfig, output_dir: Path) -> DataFiles:
    """Validate and read the training (and validation) file; raises :class:`DataError`."""
    train_path = dataset.localize(config.dataset, output_dir / "data", "train.jsonl")
    train = dataset.read_conversations(train_path)
    valid_path, valid = None, []
    if config.validation is not None:
        valid_path = dataset.localize(config.validation, output_dir / "data", "validation.jsonl")
        valid = dataset.read_conversations(valid_path)
    digests = ownership.DataDigests(
        dataset_sha256=dataset.sha256_file(train_path),
        validation_sha256=None if valid_path is None else dataset.sha256_file(valid_path),
    )
    return DataFiles(train_path, train, valid_path, valid, digests)


def prepare(config: TrainerConfig, files: DataFiles) -> Prepared:
    """Tokenise the data and make the plan; no model weights are read."""
    conversations, valid_conversations = files.train, files.valid
    tokenizer = modelload.load_tokenizer(config)
    template, fallback = chat.template_for(tokenizer)
    if fallback:
        log.warning("the model has no chat template; using kubetune's ChatML fallback")
    hp = config.hyperparameters
    examples, summary = chat.tokenize_all(
        tokenizer,
        conversations,
        max_seq_length=hp.max_seq_length,
        truncation=hp.truncation,
        template=template,
    )
    valid_examples, valid_summary = chat.tokenize_all(
        tokenizer,
        valid_conversations,
        max_seq_length=hp.max_seq_length,
        truncation=hp.truncation,
        template=template,
    )
    log_summary("training", len(conversations), summary)
    log.info("%d tokens/epoch, %d of them trained", summary.tokens, summary.target_tokens)
    if files.valid_path is not None:
        check_validation(files.valid_path, len(valid_conversations), valid_summary)
    the_plan = plan.make_plan(config, summary.kept)
    log.info("plan: %s", the_plan)
    return Prepared(
        train_examples=examples,
        valid_examples=valid_examples,
        summary=summary,
        examples_in_file=len(conversations),
        plan=the_plan,
        tokenizer=tokenizer,
        fallback_template=fallback,
        dataset_sha256=files.digests.dataset_sha256,
        validation_sha256=files.digests.validation_sha256,
    )


def log_summary(kind: str, examples: int, summary: chat.TokenizeSummary) -> None:
    """What tokenising kept of a data file, and the lines it dropped."""
    log.info(
        "%s data: %d examples, %d kept (%d truncated), %d dropped as too long, %d dropped with "
        "nothing to train on",
        kind,
        examples,
        summary.kept,
        summary.truncated,
        summary.dropped_too_long,
        summary.dropped_no_target,
    )
    if summary.dropped:
        log.warning("dropped %s examples (line numbers): %s", kind, summary.dropped_lines[:50])


def check_validation(path: Path, examples: int, summary: chat.TokenizeSummary) -> None:
    """Log what tokenising left out of the validation file; none left is a :class:`DataError`
    (a validation file that is silently not used would look like one that is)."""
    log_summary("validation", examples, summary)
    if summary.kept == 0:
        raise dataset.DataError(
            path,
            [
                f"file: none of its {examples} examples is left to validate on "
                f"({summary.dropped_too_long} longer than `maxSeqLength`, "
                f"{summary.dropped_no_target} with no assistant token to train on)"
            ],
        )


def use_packing(config: TrainerConfig, model_config: Any) -> bool:
    """``packing``, unless the model's layers would let packed examples see each other."""
    if not config.hyperparameters.packing:
        return False
    reason = modelload.packing_refusal(model_config)
    if reason is not None:
        log.warning("packing off: %s; training with padded batches", reason)
        return False
    return True


def save_adapter(model: Any, tokenizer: Any, output_dir: Path, *, fallback: bool) -> None:
    """Write the adapter (and, with the fallback template, the tokenizer) without ever
    exposing a half-written ``adapter_config.json``/weights pair."""
    staging = output_dir / ".adapter-staging"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    if fallback:
        tokenizer.chat_template = chat.FALLBACK_TEMPLATE
        tokenizer.save_pretrained(staging)
    (staging / "README.md").unlink(missing_ok=True)
    names = sorted(p.name for p in staging.iterdir() if p.name != ADAPTER_FILES_LAST)
    for name in [*names, ADAPTER_FILES_LAST]:
        source = staging / name
        if source.is_file():
            source.replace(output_dir / name)
    shutil.rmtree(staging, ignore_errors=True)


def train(config: TrainerConfig) -> int:
    """The run itself; raises the :data:`PERMANENT` errors for invalid jobs."""
    proc = launch.process_info()
    output_dir = Path(config.output_dir)
    sha = ownership.config_sha256(config)
    ownership.claim_output(config, output_dir, sha, write=proc.is_main)

    # Installed first: a SIGTERM while the data or model loads must not kill the process
    # before it can say it was preempted. Kept until result.json is written: a SIGTERM
    # while the adapter and result are written lets them be finished (seconds) instead of
    # leaving a final checkpoint without its result.
    preemption = Preemption()
    preemption.install()
    try:
        return _train(config, proc, output_dir, sha, preemption)
    finally:
        preemption.uninstall()


def _train(
    config: TrainerConfig,
    proc: launch.ProcessInfo,
    output_dir: Path,
    sha: str,
    preemption: Preemption,
) -> int:
    files = read_data(config, output_dir)  # bad data stops here, before torch is imported
    ownership.claim_data(output_dir, files.digests, write=proc.is_main)
    if ownership.already_finished(output_dir, sha, files.digests):
        log.info("%s already holds the finished result of this job; nothing to do", output_dir)
        return EXIT_OK

    from kubetune.trainer import engine, packing

    prepared = prepare(config, files)
    the_plan = prepared.plan
    placement = modelload.choose_placement()
    modelload.check_qlora(config.method, placement)
    if preemption.requested:
        return EXIT_PREEMPTED

    from transformers import set_seed

    set_seed(config.hyperparameters.seed)
    model = modelload.load_model(config, placement, local_rank=proc.local_rank)

    root = checkpoints.root_of(output_dir)
    if proc.is_main:
        checkpoints.remove_incomplete(root)
    resume = checkpoints.newest(root)
    marker = checkpoints.read_marker(resume) if resume is not None else None
    prior_seconds = float((marker or {}).get("elapsed_seconds", 0.0))
    attempts = int((marker or {}).get("attempts", 0)) + 1
    if resume is not None:
        log.info("resuming from %s (attempt %d)", resume, attempts)
    if proc.is_main:
        # Steps logged after the checkpoint by a killed attempt are logged again from it.
        resumed_step = 0 if resume is None else checkpoints.step_of(resume) or 0
        reporting.keep_metrics_through(output_dir / reporting.METRICS_FILE, resumed_step)

    reporter = reporting.ProgressReporter(output_dir, config.progress)
    progress = engine.ProgressCallback(
        reporter.emit if proc.is_main else (lambda record: None), prior_seconds=prior_seconds
    )
    total = the_plan.total_steps
    packed = use_packing(config, model.config)
    args = engine.training_arguments(
        checkpoint_root=root,
        total_steps=total,
        epochs=the_plan.epochs,
        micro_batch_size=the_plan.micro_batch_size,
        gradient_accumulation_steps=the_plan.gradient_accumulation_steps,
        learning_rate=config.hyperparameters.learning_rate,
        warmup_steps=the_plan.warmup_steps,
        seed=config.hyperparameters.seed,
        checkpoint_every=config.hyperparameters.checkpoint_every_steps,
        gradient_checkpointing=config.hyperparameters.gradient_checkpointing,
        bf16=placement.bf16,
        fp16=placement.fp16,
        evaluate=bool(prepared.valid_examples),
        logging_steps=logging_interval(total),
        pin_memory=placement.device == "cuda",
        use_cpu=placement.device == "cpu",
    )
    trainer = engine.KubetuneTrainer(
        model=model,
        args=args,
        train_dataset=engine.ExampleDataset(prepared.train_examples),
        eval_dataset=engine.ExampleDataset(prepared.valid_examples)
        if prepared.valid_examples
        else None,
        data_collator=packing.Collator(
            packing=packed,
            pad_token_id=int(prepared.tokenizer.pad_token_id),
            # flash-attention's varlen path reads restarting positions only
            share_prefix=placement.attn_implementation == modelload.PACKED_SDPA,
        ),
        processing_class=prepared.tokenizer,
        callbacks=[engine.PreemptionCallback(preemption), progress],
        checkpoint_info=lambda: {
            "config_sha256": sha,
            "elapsed_seconds": round(progress.elapsed(), 3),
            "attempts": attempts,
        },
    )
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    step = trainer.state.global_step
    stopped = engine.preemption_agreed(preemption)  # every process takes the same way out
    # The Trainer evaluates at its last step itself, unless that step was not run here (a
    # resume from the final checkpoint) or a SIGTERM on it skipped or stopped the evaluation.
    if prepared.valid_examples and progress.valid_step != step and not stopped:
        trainer.evaluate()  # returns early, with no loss, if a SIGTERM arrives meanwhile
    unfinished = step < trainer.state.max_steps
    owes_validation = bool(prepared.valid_examples) and progress.valid_step != step
    if preemption.requested and (unfinished or owes_validation):
        what = f"at step {step}/{total}" if unfinished else "before the final validation pass"
        message = f"preempted {what}; checkpoint saved"
        log.warning("%s; start again with the same output folder to resume", message)
        if proc.is_main:
            reporting.write_termination_message(message)
        return EXIT_PREEMPTED
    if not proc.is_main:
        return EXIT_OK

    save_adapter(trainer.model, prepared.tokenizer, output_dir, fallback=prepared.fallback_template)
    final = progress.last_record
    if final is not None:
        reporter.flush(final)
    records = reporting.read_metrics(output_dir / reporting.METRICS_FILE)
    reporting.plot_loss(
        records,
        output_dir / reporting.LOSS_PLOT,
        title=f"{config.job.name} on {config.model.display}",
    )
    summary = prepared.summary
    result = TrainingResult(
        job=f"{config.job.namespace}/{config.job.name}",
        job_uid=config.job.uid,
        base_model=config.model.id_or_path,
        base_model_revision=config.model.revision,
        method=str(config.method),
        adapter_rank=config.lora.r,
        adapter_alpha=config.lora.alpha,
        target_modules=list(config.lora.target_modules),
        chat_template="fallback" if prepared.fallback_template else "model",
        dataset_sha256=prepared.dataset_sha256,
        validation_sha256=prepared.validation_sha256,
        config_sha256=sha,
        data=DataCounts(
            examples=prepared.examples_in_file,
            trained_examples=summary.kept,
            truncated=summary.truncated,
            dropped_too_long=summary.dropped_too_long,
            dropped_no_target=summary.dropped_no_target,
            tokens_per_epoch=summary.tokens,
            target_tokens_per_epoch=summary.target_tokens,
        ),
        epochs=the_plan.epochs,
        batch_size=the_plan.batch_size,
        steps=int(trainer.state.global_step),
        total_steps=int(trainer.state.max_steps),
        trained_tokens=int(trainer.state.num_input_tokens_seen),
        final_train_loss=final_train_loss(progress.train_loss, records),
        final_valid_loss=progress.valid_loss,
        wall_seconds=round(progress.elapsed(), 3),
        attempts=attempts,
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    result_json = result.model_dump_json(by_alias=True, exclude_none=True, indent=2)
    tmp = output_dir / (RESULT_FILE + ".tmp")
    tmp.write_text(result_json + "\n", encoding="utf-8")
    tmp.replace(output_dir / RESULT_FILE)
    reporter.emit_result(result_json)
    log.info(
        "done: %d steps, final loss %s, adapter in %s",
        result.steps,
        result.final_train_loss,
        output_dir,
    )
    return EXIT_OK


def final_train_loss(logged_here: float | None, records: list[ProgressRecord]) -> float | None:
    """The last train loss this process logged, else the last one in ``metrics.jsonl``: a run
    resumed from its final checkpoint has no step left to log one."""
    if logged_here is not None:
        return logged_here
    return next((r.train_loss for r in reversed(records) if r.train_loss is not None), None)


def termination_line(exc: BaseException) -> str:
    """One line for the pod status: the first problem, and how many more there are."""
    if isinstance(exc, dataset.DataError):
        more = len(exc.errors) - 1
        extra = f" (and {more} more)" if more > 0 else ""
        return f"invalid data in {exc.path.name}: {exc.errors[0]}{extra}"
    return " ".join(str(exc).split())


def logging_interval(total_steps: int) -> int:
    """Steps between progress records: every step up to 200, then about 200 records a run
    (the last step and a preempted one are always recorded: :mod:`kubetune.trainer.engine`)."""
    return 1 if total_steps <= 200 else total_steps // 200


def main(config_path: str) -> int:
    """Run the job in ``config_path``; returns the process exit code."""
    try:
        config = TrainerConfig.load(config_path)
    except (OSError, ValueError) as exc:
        log.error("cannot read trainer config %s: %s", config_path, exc)
        reporting.write_termination_message(f"invalid trainer config: {exc}")
        return EXIT_INVALID
    if launch.needs_torchrun(config.gpus):
        # Check the data once, in one process, before starting one per GPU.
        try:
            read_data(config, Path(config.output_dir))
        except dataset.DataError as exc:
            log.error("%s", exc)
            reporting.write_termination_message(termination_line(exc))
            return EXIT_INVALID
        return launch.run_torchrun(config_path, config.gpus)
    try:
        exit_code = train(config)
    except PERMANENT as exc:
        log.error("%s", exc)
        reporting.write_termination_message(termination_line(exc))
        return EXIT_INVALID
    except Exception as exc:
        log.exception("training failed")
        reporting.write_termination_message(f"training failed: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    launch.leave_process_group()
    return exit_code
