"""attention_recall against a brute-force full softmax on small sizes."""

import pytest
import torch

from longinfer.ops.reference import vertical_slash_mask
from longinfer.patterns import (
    AShapeConfig,
    DenseConfig,
    VerticalSlashConfig,
    estimate_a_shape,
    estimate_dense,
    estimate_vertical_slash,
)
from longinfer.patterns.recall import attention_output_error, attention_recall, causal_logsumexp, sample_rows


def _brute_probs(q, k, scale):
    """Full causal softmax [B, Hq, Nq, Nk] with bottom-right alignment (queries = last positions)."""
    group = q.shape[1] // k.shape[1]
    kf = k.double().repeat_interleave(group, dim=1)
    scores = q.double() @ kf.transpose(-1, -2) * scale
    nq, nk = q.shape[2], k.shape[2]
    pos = torch.arange(nk - nq, nk)
    scores = scores.masked_fill(torch.arange(nk)[None, :] > pos[:, None], float("-inf"))
    return torch.softmax(scores, -1)


def _brute_recall(q, k, mask_rows, rows, scale):
    """mask_rows: [B|1, H, R, Nk] bool (H divides Hq)."""
    probs = _brute_probs(q, k, scale)[:, :, rows - (k.shape[2] - q.shape[2])]
    mask = mask_rows.repeat_interleave(q.shape[1] // mask_rows.shape[1], dim=1)
    causal = torch.arange(k.shape[2])[None, :] <= rows[:, None]
    return (probs * mask).sum(-1), (mask & causal).sum(-1)


def _qk(b=2, hq=4, hkv=2, nq=150, nk=150, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, hq, nq, d, generator=g) * 2, torch.randn(b, hkv, nk, d, generator=g) * 2


@pytest.mark.parametrize("nq,nk", [(150, 150), (70, 190)])
@pytest.mark.parametrize("per_kv_group", [False, True])
def test_recall_matches_brute_force(nq, nk, per_kv_group):
    q, k = _qk(nq=nq, nk=nk)
    cfg = VerticalSlashConfig(num_vertical=12, num_slash=10, last_q=16, sink=2, local=3, block_size=16)
    sel = estimate_vertical_slash(q, k, cfg, per_kv_group=per_kv_group)
    rows = sample_rows(nq, nk, 23, seed=1)
    stats = attention_recall(q, k, sel, rows, key_chunk=37, row_chunk=5)
    expected_recall, expected_kept = _brute_recall(q, k, sel.mask(rows), rows, 16**-0.5)
    assert torch.allclose(stats.recall.double(), expected_recall, atol=1e-5)
    assert torch.equal(stats.kept, expected_kept)
    assert torch.equal(stats.causal, rows + 1)
    assert stats.recall.shape == (2, 4, 23)
    assert torch.allclose(stats.head_density, expected_kept.sum(-1).double() / (rows + 1).sum())
    assert 0.0 < stats.mean_recall() < 1.0 and 0.0 < stats.mean_density() < 1.0


def test_single_head_masks_and_callables():
    q, k = _qk(hq=6, hkv=3, nq=90, nk=90, d=8)
    rows = torch.tensor([0, 1, 30, 89])
    dense = attention_recall(q, k, estimate_dense(q, k, DenseConfig()), rows)
    assert torch.allclose(dense.recall, torch.ones_like(dense.recall), atol=1e-5)
    assert torch.equal(dense.head_density, torch.ones_like(dense.head_density))
    a_shape = estimate_a_shape(q, k, AShapeConfig(sink=3, window=5))
    stats = attention_recall(q, k, a_shape, rows, sm_scale=0.3)
    expected, kept = _brute_recall(q, k, a_shape.mask(rows), rows, 0.3)
    assert torch.allclose(stats.recall.double(), expected, atol=1e-5)
    assert kept[0, 0].tolist() == [1, 2, 8, 8]
    # A callable giving a per-query-head mask: keep only the diagonal for even heads.
    def diagonal_on_even_heads(r):
        eye = (torch.arange(90)[None, :] == r[:, None])
        return torch.stack([eye if h % 2 == 0 else torch.zeros_like(eye) for h in range(6)])[None].expand(2, -1, -1, -1)
    stats = attention_recall(q, k, diagonal_on_even_heads, rows)
    probs = _brute_probs(q, k, 8**-0.5)[:, :, rows]
    assert torch.allclose(stats.recall[:, 0].double(), probs[:, 0, torch.arange(4), rows], atol=1e-5)
    assert torch.equal(stats.recall[:, 1], torch.zeros_like(stats.recall[:, 1]))


def test_lse_matches_brute_force_and_can_be_reused():
    q, k = _qk(nq=40, nk=100)
    rows = torch.tensor([60, 61, 99])
    lse = causal_logsumexp(q, k, rows, key_chunk=7)
    group = 2
    scores = q[:, :, rows - 60].double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2) / 4
    scores = scores.masked_fill(torch.arange(100)[None, :] > rows[:, None], float("-inf"))
    assert torch.allclose(lse.double(), torch.logsumexp(scores, -1), atol=1e-5)
    sel = estimate_vertical_slash(q, k, VerticalSlashConfig(num_vertical=5, num_slash=5, sink=1, local=1, block_size=16))
    assert torch.allclose(attention_recall(q, k, sel, rows, lse=lse).recall, attention_recall(q, k, sel, rows).recall)


def test_sample_rows_deterministic_spread_and_distinct():
    rows = sample_rows(1000, 1500, 64, seed=3)
    assert torch.equal(rows, sample_rows(1000, 1500, 64, seed=3))
    assert not torch.equal(rows, sample_rows(1000, 1500, 64, seed=4))
    assert rows.min() >= 500 and rows.max() < 1500
    assert len(set(rows.tolist())) == 64 and torch.equal(rows, rows.sort().values)
    # One row per stratum of 1000/64 positions: the spread covers the whole range.
    assert rows[0] < 500 + 16 and rows[-1] >= 1500 - 16
    assert torch.equal(sample_rows(5, 5, 5), torch.arange(5))


def test_errors():
    q, k = _qk(nq=50, nk=80)
    sel = estimate_vertical_slash(q, k, VerticalSlashConfig(num_vertical=5, num_slash=5, sink=1, local=1))
    with pytest.raises(ValueError, match=r"query positions in \[30, 80\)"):
        attention_recall(q, k, sel, torch.tensor([10]))
    with pytest.raises(TypeError, match="1-D integer"):
        attention_recall(q, k, sel, torch.tensor([40.0]))
    with pytest.raises(ValueError, match="does not fit"):
        attention_recall(q, k, lambda r: torch.ones(1, 1, r.numel(), 79, dtype=torch.bool), torch.tensor([40]))
    with pytest.raises(ValueError, match="mask has 3 heads"):
        attention_recall(q, k, lambda r: torch.ones(1, 3, r.numel(), 80, dtype=torch.bool), torch.tensor([40]))
    with pytest.raises(TypeError, match="selection with .mask"):
        attention_recall(q, k, 5, torch.tensor([40]))
    with pytest.raises(ValueError, match="num_rows"):
        sample_rows(10, 10, 11)


def test_recall_uses_kernel_semantics_not_exact_diagonals():
    """A slash covers whole query blocks (the kernel's superset), and recall counts what the kernel keeps."""
    q, k = _qk(b=1, hq=1, hkv=1, nq=64, nk=64)
    rows = torch.tensor([40])
    mask_fn = lambda r: vertical_slash_mask(torch.full((1, 1, 1), -1), torch.tensor([[[0]]]), 64, 32, rows=r)
    stats = attention_recall(q, k, mask_fn, rows)
    assert stats.kept.item() == 40 - 32 + 1  # keys 32..40 of the query's 32-block


@pytest.mark.parametrize("nq, nk, key_chunk", [(150, 150, 4096), (70, 333, 64)])  # one chunk; many, after a prefix
def test_output_error_matches_brute_force(nq, nk, key_chunk):
    q, k = _qk(nq=nq, nk=nk, seed=nk)
    v = torch.randn(k.shape, generator=torch.Generator().manual_seed(1))
    rows = sample_rows(nq, nk, 25, seed=2)
    keep = torch.rand(2, 2, rows.numel(), nk, generator=torch.Generator().manual_seed(3)) < 0.3  # per KV group
    keep[..., 0] = True  # every row keeps key 0, so no row is empty
    scale = 16 ** -0.5
    got = attention_output_error(q, k, v, lambda r: keep, rows, sm_scale=scale, key_chunk=key_chunk)

    probs = _brute_probs(q, k, scale)[:, :, rows - (nk - nq)]  # [B, Hq, R, Nk] float64
    sparse = probs * keep.repeat_interleave(2, dim=1)
    sparse = sparse / sparse.sum(-1, keepdim=True)
    values = v.double().repeat_interleave(2, dim=1)
    exact, approx = probs @ values, sparse @ values
    expected = (approx - exact).norm(dim=-1) / exact.norm(dim=-1)
    assert got.shape == (2, 4, rows.numel())
    # float32 streaming against a float64 brute force; errors here are O(0.1-1)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
    assert float(expected.median()) > 0.05  # most rows lose something: the check is not vacuous


def test_output_error_is_zero_when_everything_is_kept_and_one_when_nothing_is():
    q, k = _qk(nq=100, nk=100)
    v = torch.randn(k.shape, generator=torch.Generator().manual_seed(1))
    rows = torch.tensor([0, 5, 50, 99])
    everything = attention_output_error(q, k, v, lambda r: torch.ones(1, 1, r.numel(), 100, dtype=torch.bool), rows,
                                        key_chunk=32)
    assert float(everything.abs().max()) < 1e-5
    nothing = attention_output_error(q, k, v, lambda r: torch.zeros(1, 1, r.numel(), 100, dtype=torch.bool), rows)
    assert torch.equal(nothing, torch.ones_like(nothing))
    with pytest.raises(ValueError, match="v must have k's shape"):
        attention_output_error(q, k, v[:, :, :50], lambda r: torch.ones(1, 1, r.numel(), 100, dtype=torch.bool), rows)
