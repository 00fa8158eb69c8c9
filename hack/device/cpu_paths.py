"""The trainer's GPU code paths, run on CPU: the demo job trained with its placement forced to
bf16 (and, for QLoRA, 4-bit NF4 base weights through bitsandbytes' CPU kernels), then every
training question answered greedily on the base as trained. It tunes the GPU-only tests of
tests/e2e/test_trainer.py (how many epochs the demo job needs to answer word for word) without
device time; the GPU check (hack/device/check.sh) is still what shows them on CUDA. It trains
the config the GPU test writes and decodes as that test does (tests/e2e), so the two cannot drift.

    PYTHONPATH=/tmp/kubetune-site VENV/bin/python hack/device/cpu_paths.py qlora --epochs 100

(after hack/device/rehearse.sh, whose venv holds the device's versions; kubetune's own venv works
too where it has bitsandbytes). Slow on two cores: about 30 s per 350 steps, plus the answers.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # the GPU test's own config and decoding, not copies


def base_as_trained(model: Path, method: str) -> Any:
    import torch
    import transformers

    from kubetune.trainer import modelload

    kwargs: dict[str, Any] = {"dtype": torch.bfloat16}
    if method == "qlora":
        kwargs["device_map"] = {"": "cpu"}
        kwargs["quantization_config"] = modelload.quantization_config(torch.bfloat16)
    return transformers.AutoModelForCausalLM.from_pretrained(model, **kwargs).eval()


def force_gpu_paths() -> None:
    """bf16 placement on CPU; QLoRA allowed there, its device map on CPU."""
    import transformers

    from kubetune.trainer import modelload

    modelload.choose_placement = lambda: modelload.Placement(  # type: ignore[assignment]
        "cpu", "bfloat16", modelload.PACKED_SDPA
    )
    modelload.check_qlora = lambda method, placement: None  # type: ignore[assignment]
    load = transformers.AutoModelForCausalLM.from_pretrained

    def on_cpu(*args: Any, **kwargs: Any) -> Any:
        if "device_map" in kwargs:
            kwargs["device_map"] = {"": "cpu"}
        return load(*args, **kwargs)

    transformers.AutoModelForCausalLM.from_pretrained = on_cpu  # type: ignore[method-assign]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=["lora", "qlora"])
    parser.add_argument("--epochs", type=int, default=None, help="default: the demo job's")
    opts = parser.parse_args()
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from e2e.conftest import DATASET, write_demo_config
    from e2e.test_trainer import answers, greedy, metrics
    from peft import PeftModel
    from transformers import AutoTokenizer

    from kubetune.demo_model import build_demo_model
    from kubetune.trainer import run

    work = Path(tempfile.mkdtemp(prefix=f"cpu-paths-{opts.method}-"))
    model = build_demo_model(work / "model", DATASET)
    config = write_demo_config(work, model, gpus=1, method=opts.method, epochs=opts.epochs)
    force_gpu_paths()
    if run.main(str(config)) != 0:
        return 1
    records = metrics(work / "out")

    tokenizer = AutoTokenizer.from_pretrained(model)
    tuned = PeftModel.from_pretrained(base_as_trained(model, opts.method), work / "out").eval()
    lines = DATASET.read_text(encoding="utf-8").splitlines()
    by_question = answers([json.loads(line)["messages"] for line in lines if line.strip()])
    exact = sum(
        greedy(tuned, tokenizer, prompt).strip() == answer
        for prompt, answer in by_question.values()
    )
    print(
        f"{opts.method}: {records[-1].step} steps, loss {records[0].train_loss:.3f} -> "
        f"{records[-1].train_loss:.4f}, {exact} of {len(by_question)} answers word for word "
        f"(output in {work})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
