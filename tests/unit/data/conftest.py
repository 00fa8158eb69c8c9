"""Fixtures of the dataset doctor's tests: tiny tokenizers built here, no model hub.

``tiny_tokenizer``: a byte-level BPE trained on a few lines with ``tokenizers``, wrapped as a
transformers fast tokenizer with a ChatML-style template whose ``{% generation %}`` blocks mark
the trained assistant turns (so transformers itself can say which tokens carry loss).
``byte_encoding``: a tiktoken ``Encoding`` of 256 single bytes and a few merges, so OpenAI-style
counts can be checked by hand.
"""

from __future__ import annotations

from typing import Any

import pytest

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% if m.get('weight', 1) != 0 %}{% generation %}{{ m['content'] }}<|im_end|>\n"
    "{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% elif m['role'] == 'tool' %}{{ raise_exception('this template has no tool role') }}"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TRAINING_TEXT = [
    "hello world, how are you today?",
    "道可道，非常道；名可名，非常名。",
    "the system says: answer briefly and quote the source.",
    "What is the Tao? The Tao that can be told is not the eternal Tao.",
]


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TRAINING_TEXT * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=64,
        name_or_path="tiny-test",
    )


@pytest.fixture(scope="session")
def byte_encoding() -> Any:
    import tiktoken

    ranks = {bytes([i]): i for i in range(256)}
    for word in (b"he", b"ll", b"hell", b"hello", b" w", b"or"):
        ranks[word] = len(ranks)
    return tiktoken.Encoding(
        name="bytes-test",
        pat_str=r"""\S+|\s+""",
        mergeable_ranks=ranks,
        special_tokens={},
    )
