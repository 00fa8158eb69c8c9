"""kubetune.trainer: LoRA SFT on chat data, run as ``python -m kubetune.trainer --config PATH``.

Modules, in the order a run uses them: :mod:`.dataset` (validate and read the files),
:mod:`.chat` (template, assistant-only labels, truncation), :mod:`.plan` (``auto`` values and
step counts), :mod:`.modelload` (model, dtype, LoRA/QLoRA), :mod:`.packing` (padding-free
micro-batches), :mod:`.attention` (per-example SDPA for packed rows), :mod:`.engine` (the
Trainer subclass and callbacks), :mod:`.checkpoints` (atomic checkpoints, resume),
:mod:`.reporting` (metrics, progress ConfigMap, loss curve), :mod:`.launch` (torchrun for
several GPUs) and :mod:`.run` (the whole run, in order).

It never imports kopf or the kubernetes client; progress goes to the API server over httpx.
"""
