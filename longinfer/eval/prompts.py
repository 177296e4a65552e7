"""Token-exact long prompts: haystack text, chat-template framing and needle insertion.

Every evaluation prompt here is assembled in token-id space, so its length is exactly the
length asked for::

    prompt = prefix_ids + context_ids + suffix_ids
             └ chat template start + instruction
                            └ haystack tokens with pieces (needles) inserted at depths
                                          └ question + generation prompt + answer prefix

The haystack is any text (a string) or a callable ``haystack_fn(n_tokens) -> str`` returning
text with at least ``n_tokens`` tokens; no corpus module is needed.

The tokenizer is anything with the Hugging Face tokenizer surface used here: ``encode(text,
add_special_tokens=False)``, ``batch_decode``/``decode``, ``bos_token_id`` and, optionally,
``chat_template`` + ``apply_chat_template``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

__all__ = [
    "TokenizerLike",
    "Haystack",
    "PromptFrame",
    "make_prompt_frame",
    "insert_pieces",
    "encode",
    "single_token_filler",
]

# Marks where the long context goes when rendering the chat template; it must survive the
# template untouched, so it uses characters no template rewrites.
_CONTEXT_SENTINEL = "<<<LONGINFER_CONTEXT_SLOT>>>"
# Tokens searched on each side of a requested insertion point for a sentence end.
_SNAP_WINDOW = 96
_SENTENCE_ENDS = (".", "!", "?", "\n")


class TokenizerLike(Protocol):
    """The part of a Hugging Face tokenizer this module uses."""

    bos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


def encode(tokenizer: TokenizerLike, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def single_token_filler(tokenizer: TokenizerLike) -> int:
    """A token id that encodes a whitespace-like filler on its own, used to pad to exact length.

    Raises ``ValueError`` when none of newline, space or full stop is a single token.
    """
    for candidate in ("\n", " ", "."):
        ids = encode(tokenizer, candidate)
        if len(ids) == 1:
            return ids[0]
    raise ValueError(
        "the tokenizer encodes none of '\\n', ' ', '.' as a single token; exact-length padding "
        "needs one (use a tokenizer with byte or character fallback)"
    )


class Haystack:
    """Filler text for long prompts, tokenized lazily and cached per tokenizer.

    Build with :meth:`from_text`, :meth:`from_files` or :meth:`from_fn`. A text source is
    tokenized only as far as needed (a 12 MB corpus is not tokenized to make a 4K prompt).
    Memory: the cached token ids of the longest request, per tokenizer.
    """

    def __init__(
        self,
        *,
        text: str | None = None,
        fn: Callable[[int], str] | None = None,
        name: str = "haystack",
        separator: str = "\n\n",
    ) -> None:
        if (text is None) == (fn is None):
            raise ValueError("give exactly one of text= or fn= to Haystack")
        if text is not None and not isinstance(text, str):
            raise TypeError(f"Haystack text must be str, got {type(text).__name__}")
        if text is not None and not text.strip():
            raise ValueError("Haystack text is empty; pass a corpus with some words in it")
        if fn is not None and not callable(fn):
            raise TypeError(f"Haystack fn must be callable (n_tokens -> str), got {type(fn).__name__}")
        self.name = name
        self._text = text
        self._fn = fn
        self._separator = separator
        # id(tokenizer) -> (tokenizer, ids, whole_text_tokenized)
        self._cache: dict[int, tuple[Any, list[int], bool]] = {}

    @classmethod
    def from_text(cls, text: str, *, name: str = "text") -> Haystack:
        """A haystack over a plain string; repeated (with a blank line between) when too short."""
        return cls(text=text, name=name)

    @classmethod
    def from_fn(cls, fn: Callable[[int], str], *, name: str = "fn") -> Haystack:
        """A haystack from ``fn(n_tokens) -> str``, which must return at least ``n_tokens`` tokens."""
        return cls(fn=fn, name=name)

    @classmethod
    def from_files(cls, paths: Sequence[str | Path], *, name: str | None = None) -> Haystack:
        """A haystack over text files (directories contribute their ``*.txt``, sorted by name)."""
        files: list[Path] = []
        for raw in paths:
            path = Path(raw)
            if path.is_dir():
                files.extend(sorted(path.glob("*.txt")))
            elif path.is_file():
                files.append(path)
            else:
                raise ValueError(f"haystack path {path} does not exist")
        if not files:
            raise ValueError(f"no .txt files found in {list(map(str, paths))}")
        text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
        return cls(text=text, name=name or ",".join(Path(p).name for p in paths))

    def token_ids(
        self, tokenizer: TokenizerLike, n_tokens: int, *, offset: int = 0, allow_repeat: bool = True
    ) -> list[int]:
        """Exactly ``n_tokens`` haystack token ids starting at token ``offset``.

        ``allow_repeat=False`` raises ``ValueError`` instead of tiling a text that is too short
        (perplexity must not be measured on repeated text, which a model can copy).
        """
        if n_tokens < 0 or offset < 0:
            raise ValueError(f"n_tokens and offset must be >= 0, got {n_tokens}, {offset}")
        needed = offset + n_tokens
        if self._fn is not None:
            ids = encode(tokenizer, self._fn(needed))
            if len(ids) < needed:
                raise ValueError(
                    f"haystack_fn({needed}) returned text of only {len(ids)} tokens; it must "
                    f"return at least the number of tokens asked for"
                )
            return ids[offset:needed]
        ids, complete = self._text_ids(tokenizer, needed)
        if len(ids) >= needed:
            return ids[offset:needed]
        assert complete
        if not allow_repeat:
            raise ValueError(
                f"haystack '{self.name}' has {len(ids)} tokens, fewer than the {needed} asked for "
                f"(offset {offset} + {n_tokens}); use a longer corpus or fewer/shorter samples"
            )
        tiled = list(ids)
        separator = encode(tokenizer, self._separator)
        while len(tiled) < needed:
            tiled.extend(separator)
            tiled.extend(ids)
        return tiled[offset:needed]

    def sample_text(self, tokenizer: TokenizerLike, n_tokens: int) -> str:
        """The first ``n_tokens`` of the haystack as text (for word pools and the like)."""
        return tokenizer.decode(self.token_ids(tokenizer, n_tokens), skip_special_tokens=True)

    def _text_ids(self, tokenizer: TokenizerLike, needed: int) -> tuple[list[int], bool]:
        """Token ids of a prefix of the text with at least ``needed`` ids, or of all of it."""
        assert self._text is not None
        cached = self._cache.get(id(tokenizer))
        if cached is not None and cached[0] is tokenizer and (cached[2] or len(cached[1]) >= needed):
            return cached[1], cached[2]
        n_chars = max(4096, 6 * needed)
        while True:
            complete = n_chars >= len(self._text)
            ids = encode(tokenizer, self._text[:n_chars])
            if not complete:
                ids = ids[:-8]  # the last few tokens may straddle the cut
            if complete or len(ids) >= needed:
                break
            n_chars *= 2
        self._cache[id(tokenizer)] = (tokenizer, ids, complete)
        return ids, complete


@dataclass(frozen=True)
class PromptFrame:
    """Token ids around the long context: ``prefix_ids + context + suffix_ids``."""

    prefix_ids: list[int]
    suffix_ids: list[int]
    chat_template: bool

    @property
    def overhead(self) -> int:
        """Tokens the frame itself takes."""
        return len(self.prefix_ids) + len(self.suffix_ids)

    def context_budget(self, length: int) -> int:
        """Context tokens that make the whole prompt exactly ``length`` tokens."""
        budget = length - self.overhead
        if budget <= 0:
            raise ValueError(
                f"prompt length {length} is too short: the instruction and question alone take "
                f"{self.overhead} tokens; ask for a longer length"
            )
        return budget

    def assemble(self, context_ids: Sequence[int]) -> list[int]:
        """The full prompt ids."""
        return [*self.prefix_ids, *context_ids, *self.suffix_ids]


def make_prompt_frame(
    tokenizer: TokenizerLike,
    *,
    instruction: str,
    question: str,
    answer_prefix: str = "",
    use_chat_template: bool | None = None,
) -> PromptFrame:
    """Frame a context as ``instruction \\n\\n <context> \\n\\n question``, then ``answer_prefix``.

    With a chat template (used when the tokenizer has one, unless ``use_chat_template=False``) the
    text goes in one user turn and ``answer_prefix`` starts the assistant turn. Without one, the
    prompt starts with the BOS token when the tokenizer has one.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template is None:
        use_chat_template = has_template
    if use_chat_template and not has_template:
        raise ValueError("use_chat_template=True but the tokenizer has no chat_template")
    if use_chat_template:
        content = f"{instruction}\n\n{_CONTEXT_SENTINEL}\n\n{question}"
        rendered = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        if not isinstance(rendered, str) or rendered.count(_CONTEXT_SENTINEL) != 1:
            raise ValueError(
                "the chat template did not render the user message verbatim; pass use_chat_template=False"
            )
        before, after = rendered.split(_CONTEXT_SENTINEL)
        return PromptFrame(encode(tokenizer, before), encode(tokenizer, after + answer_prefix), True)
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    prefix = bos + encode(tokenizer, f"{instruction}\n\n")
    suffix = encode(tokenizer, f"\n\n{question}\n{answer_prefix}" if answer_prefix else f"\n\n{question}\n")
    return PromptFrame(prefix, suffix, False)


def _snap_to_sentence_end(tokenizer: TokenizerLike, ids: Sequence[int], position: int) -> int:
    """The insertion point nearest ``position`` that follows a sentence end (or ``position``)."""
    lo = max(1, position - _SNAP_WINDOW)
    hi = min(len(ids), position + _SNAP_WINDOW)
    if lo > hi:
        return position
    pieces = tokenizer.batch_decode([[t] for t in ids[lo - 1 : hi]])  # type: ignore[attr-defined]
    best: int | None = None
    for p, piece in zip(range(lo, hi + 1), pieces):
        if piece.rstrip(" ").endswith(_SENTENCE_ENDS) and (
            best is None or abs(p - position) < abs(best - position)
        ):
            best = p
    return position if best is None else best


def insert_pieces(
    tokenizer: TokenizerLike,
    haystack_ids: Sequence[int],
    pieces: Sequence[tuple[float, Sequence[int]]],
    *,
    snap: bool = True,
) -> tuple[list[int], list[int]]:
    """Insert token pieces into haystack ids at relative depths.

    Args:
        haystack_ids: the filler ``[M]``.
        pieces: ``(depth, ids)`` pairs with nondecreasing depths in ``[0, 1]``; depth = share of
            the haystack placed before the piece. Equal depths keep the given order.
        snap: move each insertion point to the nearest sentence end within ``_SNAP_WINDOW``
            tokens, so a needle never splits a word.

    Returns:
        ``(ids, starts)``: ``M + sum(len(piece))`` ids and each piece's start position in them.
    """
    depths = [d for d, _ in pieces]
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must lie in [0, 1], got {depths}")
    if any(b < a for a, b in zip(depths, depths[1:])):
        raise ValueError(f"pieces must be sorted by depth, got {depths}")
    m = len(haystack_ids)
    cuts = []
    for depth in depths:
        cut = round(depth * m)
        if snap and 0 < cut < m:
            cut = _snap_to_sentence_end(tokenizer, haystack_ids, cut)
        cuts.append(cut)
    for i in range(1, len(cuts)):  # snapping may reorder neighbours; keep the pieces' order
        cuts[i] = max(cuts[i], cuts[i - 1])
    out: list[int] = []
    starts: list[int] = []
    previous = 0
    for cut, (_, piece) in zip(cuts, pieces):
        out.extend(haystack_ids[previous:cut])
        starts.append(len(out))
        out.extend(piece)
        previous = cut
    out.extend(haystack_ids[previous:])
    return out, starts
