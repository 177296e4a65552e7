"""Oracle indices vs a brute-force reference built from the full N x N attention (small N)."""

from __future__ import annotations

import math

import pytest
import torch

from longinfer.patterns.oracle import oracle_counts, oracle_mask, oracle_recall
from longinfer.patterns.recall import attention_recall, sample_rows


def _qk(bsz=1, hq=4, hkv=2, n=200, d=16, seed=0, sharp=3.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, hq, n, d, generator=gen) * sharp
    k = torch.randn(bsz, hkv, n, d, generator=gen)
    return q, k


def _full_probs(q, k):
    """Causal softmax ``[B, Hq, N, N]`` in float64, GQA repeated (the brute-force reference)."""
    group = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(group, dim=1)
    scores = q.double() @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    n = q.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~causal, -math.inf), -1)


def _brute_key(probs, rows, density):
    """Per (b, h, row): sum of the top ceil(p * (i + 1)) probabilities, by sorting in Python."""
    out = torch.zeros(probs.shape[0], probs.shape[1], len(rows), dtype=torch.float64)
    kept = torch.zeros(len(rows), dtype=torch.long)
    for r, i in enumerate(rows.tolist()):
        m = max(1, math.ceil(round(density * (i + 1), 9)))
        kept[r] = m
        top = probs[:, :, i, : i + 1].sort(-1, descending=True).values[..., :m]
        out[:, :, r] = top.sum(-1)
    return out, kept


def _brute_block(probs, rows, density, bs):
    out = torch.zeros(probs.shape[0], probs.shape[1], len(rows), dtype=torch.float64)
    kept = torch.zeros(probs.shape[0], probs.shape[1], len(rows), dtype=torch.long)
    for r, i in enumerate(rows.tolist()):
        nb = i // bs + 1
        m = max(1, math.ceil(round(density * nb, 9)))
        for b in range(probs.shape[0]):
            for h in range(probs.shape[1]):
                masses = [(float(probs[b, h, i, j * bs: min((j + 1) * bs, i + 1)].sum()), j) for j in range(nb)]
                best = sorted(masses, reverse=True)[:m]
                out[b, h, r] = sum(mass for mass, _ in best)
                kept[b, h, r] = sum(min(bs, i + 1 - j * bs) for _, j in best)
    return out, kept


def test_oracle_counts_rounding():
    units = torch.tensor([1, 10, 30, 100, 101])
    assert oracle_counts(units, 0.1).tolist() == [1, 1, 3, 10, 11]
    assert oracle_counts(units, 1.0).tolist() == units.tolist()


@pytest.mark.parametrize("key_chunk,row_chunk", [(4096, 32), (37, 5)])
def test_key_oracle_matches_brute_force(key_chunk, row_chunk):
    q, k = _qk(bsz=2, n=203)
    rows = sample_rows(203, 203, 24, seed=3)
    probs = _full_probs(q, k)
    stats = oracle_recall(q, k, rows, (0.05, 0.1, 0.5), granularity="key", key_chunk=key_chunk, row_chunk=row_chunk)
    assert list(stats) == [0.05, 0.1, 0.5]
    for density, got in stats.items():
        want, kept = _brute_key(probs, rows, density)
        torch.testing.assert_close(got.recall.double(), want, atol=2e-5, rtol=0)
        assert torch.equal(got.kept, kept.expand_as(got.kept))
    # More budget never loses mass, and the full budget keeps all of it.
    assert bool((stats[0.1].recall >= stats[0.05].recall - 1e-6).all())
    full = oracle_recall(q, k, rows, (1.0,))[1.0]
    torch.testing.assert_close(full.recall, torch.ones_like(full.recall), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n,bs,key_chunk", [(203, 16, 4096), (150, 32, 50)])
def test_block_oracle_matches_brute_force(n, bs, key_chunk):
    q, k = _qk(n=n, seed=1)
    rows = sample_rows(n, n, 12, seed=4)
    probs = _full_probs(q, k)
    stats = oracle_recall(q, k, rows, (0.1, 0.3), granularity="block", block_size=bs, key_chunk=key_chunk, row_chunk=7)
    for density, got in stats.items():
        want, kept = _brute_block(probs, rows, density, bs)
        torch.testing.assert_close(got.recall.double(), want, atol=2e-5, rtol=0)
        assert torch.equal(got.kept, kept)


@pytest.mark.parametrize("granularity", ["key", "block"])
def test_oracle_mask_agrees_with_streamed_recall(granularity):
    q, k = _qk(n=180, seed=2)
    rows = sample_rows(180, 180, 10, seed=0)
    streamed = oracle_recall(q, k, rows, (0.2,), granularity=granularity, block_size=16)[0.2]
    via_mask = attention_recall(q, k, lambda r: oracle_mask(q, k, r, 0.2, granularity=granularity, block_size=16), rows)
    torch.testing.assert_close(via_mask.recall, streamed.recall, atol=1e-5, rtol=0)
    assert torch.equal(via_mask.kept, streamed.kept)


def test_oracle_with_cached_prefix_and_given_lse():
    """Queries are the last Nq of Nk positions; a shared lse gives the same answer."""
    q, k = _qk(n=160, seed=5)
    rows = sample_rows(64, 160, 8, seed=1)
    probs = _full_probs(q, k)
    q_tail = q[:, :, -64:]
    want, _ = _brute_key(probs, rows, 0.1)
    from longinfer.patterns.recall import causal_logsumexp

    lse = causal_logsumexp(q_tail, k, rows)
    got = oracle_recall(q_tail, k, rows, [0.1], lse=lse)[0.1]
    torch.testing.assert_close(got.recall.double(), want, atol=2e-5, rtol=0)


def test_oracle_bad_inputs():
    q, k = _qk(n=64)
    rows = torch.tensor([10, 20])
    with pytest.raises(ValueError, match="density"):
        oracle_recall(q, k, rows, (0.0,))
    with pytest.raises(ValueError, match="empty"):
        oracle_recall(q, k, rows, ())
    with pytest.raises(TypeError, match="sequence"):
        oracle_recall(q, k, rows, 0.1)
    with pytest.raises(ValueError, match="granularity"):
        oracle_recall(q, k, rows, (0.1,), granularity="column")
    with pytest.raises(ValueError, match="rows"):
        oracle_recall(q, k, torch.tensor([64]), (0.1,))
