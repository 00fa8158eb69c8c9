"""The training engine: a small subclass of the Hugging Face ``Trainer`` and its callbacks.

The Trainer brings the parts that are easy to get subtly wrong and that resume depends on:
the optimizer and LR schedule, gradient accumulation with token-count normalisation across
micro-batches and processes, DDP under torchrun, checkpoints that hold optimizer, scheduler,
RNG and data position, and a seedable sampler that replays the same data order on resume.
The subclass changes four things:

- :meth:`KubetuneTrainer.compute_loss` computes logits only where a label is trained on
  (``logits_to_keep``), so system and user tokens cost no LM-head or softmax work, and sums
  the token losses over the whole optimizer step's target-token count, like
  ``ForCausalLMLoss`` does;
- tokens seen (and so tokens/s) count the examples' tokens, shared prompt prefixes included
  (:func:`kubetune.trainer.packing.real_tokens`);
- checkpoints are written into a staging folder and published atomically
  (:mod:`kubetune.trainer.checkpoints`);
- :class:`PreemptionCallback` turns SIGTERM into "finish this step, checkpoint, stop", and
  stops a validation pass that is under way (:class:`EvaluationStopped`): a pass can take
  longer than the grace period that follows SIGTERM.

TRL's ``SFTTrainer`` was measured against this (``bench/trainer_throughput.py``); it has no
per-message ``weight`` and needs ``{% generation %}`` markers or a template it knows for
assistant-only loss, so data preparation is ours (:mod:`kubetune.trainer.chat`) and the loop
is the plain Trainer's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from kubetune.progress import ProgressRecord
from kubetune.trainer import checkpoints, packing
from kubetune.trainer.chat import IGNORE_INDEX, TokenizedExample
from kubetune.trainer.preemption import Preemption

log = logging.getLogger(__name__)


class ExampleDataset(torch.utils.data.Dataset[dict[str, list[int]]]):
    """Tokenised examples as the Trainer's sampler and collator expect them."""

    def __init__(self, examples: Sequence[TokenizedExample]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        example = self.examples[index]
        return {"input_ids": example.input_ids, "labels": example.labels}


def target_only_loss(model: Any, inputs: dict[str, Any], labels: Any) -> tuple[Any, Any, Any]:
    """Summed next-token cross-entropy over trained labels, its token count, and the outputs.

    Logits are computed only at positions whose next token is trained (in any row of the
    batch), which skips the LM head and softmax for every prompt token.
    """
    targets = labels[:, 1:]
    trained = targets != IGNORE_INDEX
    keep = trained.any(dim=0).nonzero().squeeze(-1)
    if keep.numel() == 0:
        keep = torch.zeros(1, dtype=torch.long, device=labels.device)
    outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
    logits = outputs.logits.float()
    picked = targets[:, keep]
    loss_sum = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        picked.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss_sum, trained.sum(), outputs


class EvaluationStopped(Exception):
    """A SIGTERM during a validation pass: the pass stops at its next batch."""


def preemption_agreed(preemption: Preemption) -> bool:
    """Whether any process was asked to stop; every process must call it at the same point
    and stop at the same step, or the checkpoint's collectives hang.

    The answer is the vote's, never the live flag: a SIGTERM handled on one process while its
    vote is under way sets its flag after the others have counted it, so answering from the
    flag would stop that process alone (and leave the others waiting for it in the next
    collective, until the grace period ran out). The next vote counts it.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return preemption.requested
    device = "cuda" if torch.cuda.is_available() else "cpu"
    flag = torch.tensor([1 if preemption.requested else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    agreed = bool(flag.item())
    if agreed:
        preemption.requested = True
    return agreed


class KubetuneTrainer(Trainer):
    """HF Trainer with target-only logits and atomic checkpoints."""

    # compute_loss divides by the step's target-token count, which already spans every
    # micro-batch of the accumulation window.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, checkpoint_info: Callable[[], dict[str, Any]], **kwargs: Any):
        super().__init__(*args, **kwargs)
        # Progress goes out as JSON records (ProgressCallback), not as printed dicts.
        self.remove_callback(PrinterCallback)
        self._checkpoint_info = checkpoint_info
        self._staging = False

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        """Count the examples' tokens (``state.num_input_tokens_seen``, the tokens/s figure):
        the stock count would miss the prompt prefixes that packed examples share."""
        if self.args.include_num_input_tokens_seen == "no":
            return
        tokens = torch.tensor(packing.real_tokens(inputs), device=self.args.device)
        self.state.num_input_tokens_seen += int(self.accelerator.gather(tokens).sum().item())

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        labels = inputs.pop("labels")
        loss_sum, count, outputs = target_only_loss(model, inputs, labels)
        if num_items_in_batch is None:
            loss = loss_sum / count.clamp(min=1)
            if model.training:
                loss = loss / self.current_gradient_accumulation_steps
        else:
            loss = loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                # DDP averages gradients over processes; the count is already global.
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """A pass stopped by SIGTERM logs no loss and returns none; during training, the
        step's checkpoint is written next and training stops there."""
        try:
            metrics: dict[str, float] = super().evaluate(*args, **kwargs)
        except EvaluationStopped:
            log.warning(
                "SIGTERM: validation pass at step %d stopped; checkpointing", self.state.global_step
            )
            self.control.should_evaluate = False  # as on_evaluate would have reset it
            self.control.should_save = True
            self.control.should_training_stop = True
            return {}
        return metrics

    # --- atomic checkpoints -------------------------------------------------------------

    def _get_output_dir(self, trial: Any) -> str:
        if self._staging:
            return str(Path(str(self.args.output_dir)) / checkpoints.STAGING)
        return str(super()._get_output_dir(trial))

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        root = Path(str(self.args.output_dir))
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()
        if self.is_world_process_zero():
            staged = root / checkpoints.STAGING / f"checkpoint-{self.state.global_step}"
            info = {"step": self.state.global_step, **self._checkpoint_info()}
            published = checkpoints.publish(staged, root, info)
            checkpoints.rotate(root)
            log.info("checkpoint %s complete", published)
        self.accelerator.wait_for_everyone()


class PreemptionCallback(TrainerCallback):
    """SIGTERM → save a checkpoint at the end of the current step and stop training,
    without the validation pass that step may have been due for, or the rest of the one
    under way."""

    def __init__(self, preemption: Preemption) -> None:
        self.preemption = preemption

    @property
    def requested(self) -> bool:
        return self.preemption.requested

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if preemption_agreed(self.preemption):
            control.should_save = True
            control.should_training_stop = True
            control.should_log = True  # the step it stopped at is in metrics.jsonl
            # A full validation pass now could outlast the grace period; the run that
            # resumes evaluates again at its next evaluation step.
            control.should_evaluate = False
        return control

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        # Every process runs the same number of evaluation batches, so all of them agree here.
        if preemption_agreed(self.preemption):
            raise EvaluationStopped
        return control


class ProgressCallback(TrainerCallback):
    """Turns the Trainer's logs into progress records (main process only)."""

    def __init__(
        self,
        emit: Callable[[ProgressRecord], None],
        *,
        prior_seconds: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.emit = emit
        self.prior_seconds = prior_seconds
        self.clock = clock
        self.started = clock()
        self.last_time = self.started
        self.last_tokens: int | None = None
        self.train_loss: float | None = None
        self.valid_loss: float | None = None
        self.valid_step: int | None = None
        """The step of this process's latest evaluation (every process: they evaluate together)."""
        self.learning_rate: float | None = None
        self.last_record: ProgressRecord | None = None

    def elapsed(self) -> float:
        return self.prior_seconds + self.clock() - self.started

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.last_tokens = int(state.num_input_tokens_seen)
        self.last_time = self.clock()
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        # The Trainer logs every `logging_steps` only: without this, a run whose last step is
        # off that grid would end its metrics (and its final loss) a few steps early.
        if state.global_step >= state.max_steps:
            control.should_log = True
        return control

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> Any:
        logs = logs or {}
        if "eval_loss" in logs:
            self.valid_step = int(state.global_step)
        if not state.is_world_process_zero or ("loss" not in logs and "eval_loss" not in logs):
            return control
        tokens_per_second = None
        if "loss" in logs:
            self.train_loss = float(logs["loss"])
            if "learning_rate" in logs:
                self.learning_rate = float(logs["learning_rate"])
            now, seen = self.clock(), int(state.num_input_tokens_seen)
            if self.last_tokens is not None and now > self.last_time:
                tokens_per_second = (seen - self.last_tokens) / (now - self.last_time)
            self.last_time, self.last_tokens = now, seen
        if "eval_loss" in logs:
            self.valid_loss = float(logs["eval_loss"])
        record = ProgressRecord(
            step=int(state.global_step),
            total_steps=int(state.max_steps),
            epoch=float(state.epoch or 0.0),
            train_loss=self.train_loss,
            valid_loss=self.valid_loss,
            learning_rate=self.learning_rate,
            tokens_per_second=tokens_per_second,
            elapsed_seconds=round(self.elapsed(), 3),
        )
        self.last_record = record
        self.emit(record)
        return control


def training_arguments(
    *,
    checkpoint_root: Path,
    total_steps: int,
    epochs: int,
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    learning_rate: float,
    warmup_steps: int,
    seed: int,
    checkpoint_every: int,
    gradient_checkpointing: bool,
    bf16: bool,
    fp16: bool,
    evaluate: bool,
    logging_steps: int,
    pin_memory: bool,
    use_cpu: bool = False,
) -> TrainingArguments:
    """The Trainer's arguments for a plan; nothing here is left to the Trainer's defaults
    that could change what a resumed run does."""
    return TrainingArguments(
        output_dir=str(checkpoint_root),
        max_steps=total_steps,
        num_train_epochs=epochs,
        per_device_train_batch_size=micro_batch_size,
        per_device_eval_batch_size=micro_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        learning_rate=learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=warmup_steps,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        seed=seed,
        data_seed=seed,
        save_strategy="steps",
        save_steps=checkpoint_every,
        save_total_limit=None,  # rotation happens after publishing; see checkpoints.rotate
        eval_strategy="steps" if evaluate else "no",
        eval_steps=checkpoint_every if evaluate else None,
        prediction_loss_only=True,
        logging_strategy="steps",
        logging_steps=logging_steps,
        logging_first_step=True,
        include_num_input_tokens_seen="non_padding",
        gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
        bf16=bf16,
        fp16=fp16,
        remove_unused_columns=False,
        dataloader_drop_last=False,
        dataloader_pin_memory=pin_memory,
        # On CPU, only this makes the Trainer join torchrun's process group (gloo) as one of
        # several data-parallel workers; without it every worker trains alone on all the data.
        use_cpu=use_cpu,
        report_to=[],
        disable_tqdm=True,
        save_only_model=False,
        ddp_find_unused_parameters=False,
    )
