"""The tiny local model every test, demo and benchmark uses instead of a model hub.

``build_demo_model(out_dir)`` trains a byte-level BPE tokenizer on a chat dataset (by default
``examples/data/daoyan.jsonl``), gives it ChatML special tokens and a chat template, and writes
a small ``LlamaForCausalLM`` with random weights next to it, in Hugging Face layout
(safetensors, ``config.json``, ``generation_config.json``, tokenizer files). The shape is chosen
for two consumers: the trainer must memorise the Daoist dataset in seconds on two CPU cores,
and vLLM's CPU attention must accept it (it rejects head sizes as small as 16, so head_dim is 64).

The build is deterministic for a seed and idempotent: a finished folder carries a marker and is
reused; the folder is written under a temporary name and renamed into place, so a half-built
model is never picked up. torch/transformers/tokenizers are imported inside the functions, so
importing this module (the CLI does) costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_DATASET = Path(__file__).resolve().parent.parent / "examples" / "data" / "daoyan.jsonl"
"""The Daoist-voice chat dataset the demo tokenizer is trained on."""

MARKER = "kubetune-demo-model.json"
"""Written last; its presence (with a matching key) means the folder is complete."""

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML, the same shape as Qwen's: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message."""


@dataclass(frozen=True)
class DemoShape:
    """The demo model's architecture (a Llama with random weights)."""

    vocab_size: int = 4096
    """Upper bound of the BPE vocabulary. Merges must occur at least twice, so the dataset
    decides the real size (about 1,000 tokens on daoyan.jsonl: common characters and phrases,
    rare characters as bytes), which keeps tokens close to characters, as in real models."""
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 2
    head_dim: int = 64
    """vLLM's CPU attention supports head sizes such as 64, 80, 96, 112, 128; not 16."""
    max_position_embeddings: int = 2048
    lm_head_std: float = 0.2
    """The output head is drawn 10x wider than the rest (initializer_range 0.02). LoRA leaves
    the head frozen, and behind the final RMSNorm a head of std 0.02 can only express nearly
    uniform next-token distributions; at 0.2 a LoRA can memorise the dataset in seconds."""


def build_demo_model(
    out_dir: Path,
    dataset: Path = DEFAULT_DATASET,
    *,
    seed: int = 0,
    shape: DemoShape | None = None,
) -> Path:
    """Build (or reuse) the tiny demo model in ``out_dir`` and return ``out_dir``.

    The same ``dataset`` content, ``seed`` and ``shape`` give byte-identical weights and the
    same tokenizer. An existing complete folder built from a different key is replaced; a
    folder that is not a demo model is never touched (``FileExistsError``).
    """
    shape = shape or DemoShape()
    out_dir = Path(out_dir)
    key = _build_key(dataset, seed, shape)
    existing = _read_marker(out_dir)
    if existing is not None and existing.get("key") == key:
        return out_dir
    if out_dir.exists() and existing is None and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not a kubetune demo model")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the serving pod may run as another user
    try:
        _write_model(staging, dataset, seed, shape, key)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        try:
            staging.rename(out_dir)
        except OSError:
            # Another process finished the same build first; its result is as good as ours.
            if (_read_marker(out_dir) or {}).get("key") != key:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("demo model written to %s", out_dir)
    return out_dir


def _build_key(dataset: Path, seed: int, shape: DemoShape) -> str:
    digest = hashlib.sha256(Path(dataset).read_bytes()).hexdigest()
    blob = json.dumps({"dataset": digest, "seed": seed, "shape": asdict(shape), "v": 1})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_marker(out_dir: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((out_dir / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data


def _chat_texts(dataset: Path) -> list[str]:
    """Every example rendered with the ChatML template: what the tokenizer will see."""
    texts = []
    for line in Path(dataset).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        messages = record.get("messages")
        if messages is None:  # prompt/completion records
            messages = [
                {"role": "user", "content": record.get("prompt", "")},
                {"role": "assistant", "content": record.get("completion", "")},
            ]
        texts.append(
            "".join(f"{IM_START}{m['role']}\n{m.get('content') or ''}{IM_END}\n" for m in messages)
        )
    return texts


def _train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _write_model(folder: Path, dataset: Path, seed: int, shape: DemoShape, key: str) -> None:
    import torch
    import transformers

    hf: Any = transformers  # its annotations are partial; used untyped here

    tokenizer = hf.PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(_chat_texts(dataset), shape.vocab_size),
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        bos_token=None,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=shape.max_position_embeddings,
    )
    tokenizer.save_pretrained(folder)
    ids = {tok: int(tokenizer.convert_tokens_to_ids(tok)) for tok in SPECIAL_TOKENS}

    config = hf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=ids[IM_START],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[PAD_TOKEN],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = hf.LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, shape.lm_head_std)
    model.generation_config = hf.GenerationConfig(
        bos_token_id=ids[IM_START],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[PAD_TOKEN],
        do_sample=False,
    )
    model.save_pretrained(folder, safe_serialization=True)

    marker = {"key": key, "seed": seed, "shape": asdict(shape), "dataset": str(dataset)}
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2), encoding="utf-8")
    tmp.replace(folder / MARKER)


def main(argv: list[str] | None = None) -> int:
    """``python -m kubetune.demo_model OUT_DIR [--dataset PATH] [--seed N]``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_demo_model(args.out_dir, args.dataset, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
