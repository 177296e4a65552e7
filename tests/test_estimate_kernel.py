"""The Triton vertical-slash estimate kernel against the torch path and a float64 brute force.

On the CPU the kernel runs in the Triton interpreter (float16 / float32 only there: ``tl.dot`` in
bfloat16 is wrong in the interpreter). Tolerance: both paths multiply the same (float16 or
float32) values in float32 and differ only in summation order and exp vs exp2, so masses (means
of probabilities, <= 1) agree to ``atol=2e-6`` plus ``rtol=1e-5``; the float64 brute force
agrees to ``atol=1e-5`` for float32 inputs.
"""

import math
import os

import pytest
import torch

from longinfer.patterns import VerticalSlashConfig, estimate_vertical_slash
from longinfer.patterns import vertical_slash as vs
from longinfer.patterns._common import coverage_selection, mask_to_index
from longinfer.patterns import _estimate_kernel as kernel
from longinfer.patterns._estimate_kernel import estimate_masses_triton

ATOL, RTOL = 2e-6, 1e-5

# The tests below run the kernel on CPU tensors, which only the Triton interpreter can do; on a
# GPU machine (no TRITON_INTERPRET) the @gpu tests at the end cover the kernel instead.
needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="runs the Triton kernel on CPU tensors: needs TRITON_INTERPRET=1 (the @gpu tests cover CUDA)",
)


def _qk(b, hq, hkv, n_q, n_k, d, dtype=torch.float32, seed=0, sharp=2.0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, hq, n_q, d, generator=gen) * sharp).to(dtype)
    k = torch.randn(b, hkv, n_k, d, generator=gen).to(dtype)
    return q, k


def _brute_force(q, k, positions, sink, local, scale):
    """Per-query float64 causal softmax -> (columns, diagonals) ``[B, Hq, Nk]``: the definition."""
    bsz, hq, n_q, _ = q.shape
    hkv, n_k = k.shape[1], k.shape[2]
    columns = torch.zeros(bsz, hq, n_k, dtype=torch.float64)
    diagonals = torch.zeros_like(columns)
    for h in range(hq):
        keys = k[:, h // (hq // hkv)].double()
        for p in positions.tolist():
            probs = ((keys[:, : p + 1] @ q[:, h, p - (n_k - n_q)].double()[:, :, None]).squeeze(-1) * scale).softmax(-1)
            offsets = p - torch.arange(p + 1)
            columns[:, h, : p + 1] += torch.where(offsets >= local, probs, 0.0)
            diagonals[:, h].index_add_(1, offsets[sink:], probs[:, sink:])
    return columns / positions.numel(), diagonals / positions.numel()


CASES = [  # (B, Hq, Hkv, Nq, Nk, D, last_q, sampling): Nk off the 32-key interpreter tile, GQA 1/2/7
    (2, 4, 2, 50, 77, 64, 7, "strided"),
    (1, 7, 1, 40, 40, 128, 64, "last"),  # last_q > Nq: all 40 queries
    (2, 2, 2, 100, 130, 64, 1, "strided"),
    (1, 4, 4, 60, 90, 64, 9, "mixed"),
    (1, 14, 2, 70, 70, 64, 64, "strided"),
    (1, 4, 1, 33, 129, 128, 7, "last"),  # cached prefix: 96 keys before the queries
]


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,hq,hkv,n_q,n_k,d,last_q,sampling", CASES)
def test_kernel_matches_the_torch_path(dtype, b, hq, hkv, n_q, n_k, d, last_q, sampling):
    q, k = _qk(b, hq, hkv, n_q, n_k, d, dtype)
    config = VerticalSlashConfig(num_vertical=10, num_slash=12, last_q=last_q, sink=3, local=4, query_sampling=sampling)
    columns, diagonals = vs.estimate_masses(q, k, config, backend="triton")
    ref_columns, ref_diagonals = vs.estimate_masses(q.float(), k.float(), config, backend="torch")
    assert columns.shape == diagonals.shape == (b, hq, n_k) and columns.dtype == torch.float32
    torch.testing.assert_close(columns, ref_columns, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(diagonals, ref_diagonals, atol=ATOL, rtol=RTOL)


@needs_interpreter
@pytest.mark.parametrize("b,hq,hkv,n_q,n_k,d,last_q,sampling", CASES[:2] + CASES[-1:])
def test_kernel_matches_brute_force(b, hq, hkv, n_q, n_k, d, last_q, sampling):
    q, k = _qk(b, hq, hkv, n_q, n_k, d)
    positions = vs.estimation_positions(n_q, n_k, last_q, sampling)
    scale = 0.3
    columns, diagonals = estimate_masses_triton(q, k, positions - (n_k - n_q), positions, sink=5, local=2, scale=scale)
    ref_columns, ref_diagonals = _brute_force(q, k, positions, sink=5, local=2, scale=scale)
    torch.testing.assert_close(columns.double(), ref_columns, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(diagonals.double(), ref_diagonals, atol=1e-5, rtol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("b,hq,hkv,n_q,n_k,d,last_q,column_q,sampling", [
    (2, 4, 2, 50, 77, 64, 3, 20, "strided"),   # more column queries than diagonal ones, GQA 2, batch 2
    (1, 7, 1, 40, 40, 128, 5, 64, "mixed"),    # column_q > Nq: every query estimates the columns
    (1, 4, 4, 33, 129, 80, 9, 4, "last"),      # fewer column queries; cached prefix; head_dim 80
])
def test_column_q_takes_the_columns_from_their_own_queries(backend, b, hq, hkv, n_q, n_k, d, last_q, column_q,
                                                           sampling):
    """Columns are the brute-force means over the ``column_q`` queries, diagonals over the ``last_q``
    ones, on both backends (the Triton column-only pass skips the diagonal scatter)."""
    q, k = _qk(b, hq, hkv, n_q, n_k, d, seed=6)
    config = VerticalSlashConfig(num_vertical=10, num_slash=12, last_q=last_q, column_q=column_q, sink=3, local=4,
                                 query_sampling=sampling)
    columns, diagonals = vs.estimate_masses(q, k, config, backend=backend)
    scale = 1 / math.sqrt(d)
    ref_columns, _ = _brute_force(q, k, vs.estimation_positions(n_q, n_k, column_q, sampling), 3, 4, scale)
    _, ref_diagonals = _brute_force(q, k, vs.estimation_positions(n_q, n_k, last_q, sampling), 3, 4, scale)
    torch.testing.assert_close(columns.double(), ref_columns, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(diagonals.double(), ref_diagonals, atol=1e-5, rtol=1e-5)


@needs_interpreter
def test_column_only_pass_leaves_out_the_diagonals():
    q, k = _qk(1, 4, 2, 45, 99, 64, seed=7)
    positions = vs.estimation_positions(45, 99, 12, "strided")
    columns, diagonals = estimate_masses_triton(q, k, positions - 54, positions, sink=3, local=2, scale=0.3,
                                                diagonals=False)
    assert diagonals is None
    ref_columns, _ = _brute_force(q, k, positions, sink=3, local=2, scale=0.3)
    torch.testing.assert_close(columns.double(), ref_columns, atol=1e-5, rtol=1e-5)


def test_column_q_errors_name_the_conflict():
    with pytest.raises(ValueError, match="column_q must be >= 0"):
        VerticalSlashConfig(column_q=-1)
    with pytest.raises(ValueError, match="split_halves"):
        VerticalSlashConfig(budget="coverage", rank="cost", split_halves=True, column_q=256)
    q, k = _qk(1, 2, 1, 20, 20, 64)
    with pytest.raises(ValueError, match="column_q"):
        vs.estimate_masses(q, k, VerticalSlashConfig(column_q=8), positions=torch.tensor([5, 19]), backend="torch")


@needs_interpreter
@pytest.mark.parametrize("scratch_groups", [0, 1, 2])  # 0: atomics; 1: one KV group per launch; 2: all at once
def test_diagonal_scratch_chunks_and_atomics_agree_with_brute_force(monkeypatch, scratch_groups):
    b, hq, hkv, n_q, n_k, d = 2, 4, 2, 45, 99, 64  # two KV groups of two query heads
    q, k = _qk(b, hq, hkv, n_q, n_k, d, seed=4)
    positions = vs.estimation_positions(n_q, n_k, 9, "strided")
    per_group = b * (hq // hkv) * positions.numel() * n_k * 4
    monkeypatch.setattr(kernel, "DIAGONAL_SUMS", "scratch")
    monkeypatch.setattr(kernel, "DIAGONAL_SCRATCH_BYTES", per_group * scratch_groups)
    assert kernel.scratch_heads(b, hq, hkv, positions.numel(), n_k) == (hq // hkv) * scratch_groups
    columns, diagonals = estimate_masses_triton(q, k, positions - (n_k - n_q), positions, sink=3, local=2, scale=0.3)
    ref_columns, ref_diagonals = _brute_force(q, k, positions, sink=3, local=2, scale=0.3)
    torch.testing.assert_close(columns.double(), ref_columns, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(diagonals.double(), ref_diagonals, atol=1e-5, rtol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("setting,deterministic,path", [
    ("auto", False, "atomics"), ("auto", True, "scratch"), ("scratch", False, "scratch"), ("atomics", True, "atomics")])
def test_diagonal_sums_follow_the_setting_and_torch_deterministic_mode(monkeypatch, setting, deterministic, path):
    """The diagonal mass goes through the scratch (deterministic) or atomics as DIAGONAL_SUMS says; "auto"
    follows torch.use_deterministic_algorithms. Either way the same masses (the brute force's)."""
    q, k = _qk(1, 4, 2, 40, 90, 64, seed=6)
    positions = vs.estimation_positions(40, 90, 8, "strided")
    taken = []
    for name in ("_masses_with_scratch", "_masses_with_atomics"):
        real = getattr(kernel, name)
        monkeypatch.setattr(kernel, name, lambda *a, _real=real, _name=name, **kw: taken.append(_name) or _real(*a, **kw))
    monkeypatch.setattr(kernel, "DIAGONAL_SUMS", setting)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: deterministic)
    columns, diagonals = estimate_masses_triton(q, k, positions - 50, positions, sink=3, local=2, scale=0.3)
    assert taken == [f"_masses_with_{path}"]
    ref_columns, ref_diagonals = _brute_force(q, k, positions, sink=3, local=2, scale=0.3)
    torch.testing.assert_close(diagonals.double(), ref_diagonals, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(columns.double(), ref_columns, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(kernel, "DIAGONAL_SUMS", "sometimes")
    with pytest.raises(ValueError, match="DIAGONAL_SUMS must be one of"):
        estimate_masses_triton(q, k, positions - 50, positions, sink=3, local=2, scale=0.3)


@needs_interpreter
def test_float16_diagonal_scratch_stays_within_its_rounding(monkeypatch):
    """A float16 scratch (an option ``turn_kernels.py`` times) halves the scratch's bytes, so twice the
    heads fit a launch, and keeps the diagonal masses within float16 rounding of the brute force
    (2e-3 relative: each stored probability carries ~5e-4); the column masses never pass through it."""
    b, hq, hkv, n_q, n_k, d = 2, 4, 2, 45, 99, 64
    q, k = _qk(b, hq, hkv, n_q, n_k, d, seed=6)
    positions = vs.estimation_positions(n_q, n_k, 9, "strided")
    per_group_float32 = b * (hq // hkv) * positions.numel() * n_k * 4
    monkeypatch.setattr(kernel, "DIAGONAL_SUMS", "scratch")
    monkeypatch.setattr(kernel, "DIAGONAL_SCRATCH_BYTES", per_group_float32)
    monkeypatch.setattr(kernel, "DIAGONAL_SCRATCH_DTYPE", torch.float16)
    assert kernel.scratch_heads(b, hq, hkv, positions.numel(), n_k) == 2 * (hq // hkv)
    columns, diagonals = estimate_masses_triton(q, k, positions - (n_k - n_q), positions, sink=3, local=2, scale=0.3)
    ref_columns, ref_diagonals = _brute_force(q, k, positions, sink=3, local=2, scale=0.3)
    torch.testing.assert_close(columns.double(), ref_columns, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(diagonals.double(), ref_diagonals, atol=1e-6, rtol=2e-3)
    assert not torch.allclose(diagonals.double(), ref_diagonals, atol=1e-9, rtol=1e-6)  # float16 did round


@needs_interpreter
@pytest.mark.parametrize("keys_per_split", [32, 64])  # 4 and 2 pass-1 splits of 99 keys (the default: 1)
def test_pass_one_key_splits_merge_to_the_brute_force(monkeypatch, keys_per_split):
    """Pass 1's split-K statistics (several key ranges per query, merged by log-sum-exp) give the
    same masses as one range; the launch options `turn_kernels.py` tries pass through."""
    b, hq, hkv, n_q, n_k, d = 1, 4, 2, 60, 99, 64
    q, k = _qk(b, hq, hkv, n_q, n_k, d, seed=5)
    positions = vs.estimation_positions(n_q, n_k, 9, "strided")
    monkeypatch.setattr(kernel, "KEYS_PER_SPLIT", keys_per_split)
    monkeypatch.setattr(kernel, "PASS_ONE_OPTIONS", {"BLOCK_N": 16, "num_warps": 8, "num_stages": 2})
    columns, diagonals = estimate_masses_triton(q, k, positions - (n_k - n_q), positions, sink=3, local=2, scale=0.3)
    ref_columns, ref_diagonals = _brute_force(q, k, positions, sink=3, local=2, scale=0.3)
    torch.testing.assert_close(columns.double(), ref_columns, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(diagonals.double(), ref_diagonals, atol=1e-5, rtol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("count,splits", [(5, 1), (70, 3), (17, 130)])  # 130 splits: two steps of 64 per loop
def test_split_merge_kernel_matches_the_torch_merge(count, splits):
    """The one-launch merge of pass 1's split-K pairs gives the torch merge's log-sum-exps, with splits a
    query does not reach (m = -inf, l = 0) and query counts that are not a multiple of the block.
    Tolerance 1e-5 (base-2 log units): float32 exp2 and sums in another order."""
    gen = torch.Generator().manual_seed(count + splits)
    m_parts = torch.randn(2, 3, count, splits, generator=gen) * 8
    l_parts = torch.rand(2, 3, count, splits, generator=gen) * 50 + 1
    unreached = torch.rand(2, 3, count, splits, generator=gen) < 0.3
    unreached[..., 0] = False  # every query sees key 0, in split 0
    m_parts[unreached] = float("-inf")
    l_parts[unreached] = 0.0
    got = kernel.merge_splits(m_parts, l_parts)
    torch.testing.assert_close(got, kernel.merge_splits_reference(m_parts, l_parts), atol=1e-5, rtol=1e-6)
    assert torch.isfinite(got).all()


@needs_interpreter
def test_masses_sum_to_one_without_forced_parts_and_respect_causality():
    q, k = _qk(1, 4, 2, 64, 100, 64)
    config = VerticalSlashConfig(num_vertical=10, num_slash=10, last_q=8, sink=0, local=0, query_sampling="strided")
    columns, diagonals = vs.estimate_masses(q, k, config, backend="triton")
    torch.testing.assert_close(columns.sum(-1), torch.ones(1, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(diagonals.sum(-1), torch.ones(1, 4), atol=1e-5, rtol=0)
    positions = torch.tensor([40, 41, 57])  # queries see keys up to their own position only
    columns, diagonals = vs.estimate_masses(q, k, config, positions=positions, backend="triton")
    assert torch.all(columns[..., 58:] == 0) and torch.all(diagonals[..., 58:] == 0)
    torch.testing.assert_close(columns.sum(-1), torch.ones(1, 4), atol=1e-5, rtol=0)
    ref = vs.estimate_masses(q, k, config, positions=positions, backend="torch")
    torch.testing.assert_close((columns, diagonals), ref, atol=ATOL, rtol=RTOL)


@needs_interpreter
def test_strided_views_and_a_planted_diagonal_are_found():
    """Non-contiguous q/k (a transposed [B, N, H, D] layout) and a diagonal at offset 17 planted in every head."""
    b, hq, hkv, n, d = 1, 4, 2, 160, 64
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(b, n, hkv, d, generator=gen)
    q = torch.randn(b, n, hq, d, generator=gen) * 0.1
    q[:, 17:] += 4.0 * k[:, :-17].repeat_interleave(hq // hkv, dim=2)  # query i looks at key i - 17
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    assert not q.is_contiguous()
    config = VerticalSlashConfig(num_vertical=8, num_slash=8, last_q=16, sink=2, local=2, query_sampling="strided")
    columns, diagonals = vs.estimate_masses(q, k, config, backend="triton")
    ref = vs.estimate_masses(q.contiguous(), k.contiguous(), config, backend="torch")
    torch.testing.assert_close((columns, diagonals), ref, atol=ATOL, rtol=RTOL)
    assert bool((diagonals.argmax(-1) == 17).all())
    selection = estimate_vertical_slash(q, k, config)
    assert bool((selection.slash == 17).any(-1).all())


def test_errors_name_the_problem():
    q, k = _qk(1, 2, 1, 8, 8, 16)
    positions = torch.arange(8)
    with pytest.raises(TypeError, match="same dtype"):
        estimate_masses_triton(q, k.half(), positions, positions, sink=0, local=0, scale=1.0)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        estimate_masses_triton(q.double(), k.double(), positions, positions, sink=0, local=0, scale=1.0)
    config = VerticalSlashConfig(num_vertical=4, num_slash=4, last_q=4, sink=1, local=1)
    with pytest.raises(ValueError, match="backend must be"):
        vs.estimate_masses(q, k, config, backend="cuda")
    assert vs.estimate_backend(q.double(), k.double()) == "torch"
    assert vs.estimate_backend(q.bfloat16(), k.bfloat16()) == "torch"  # the interpreter's bf16 dot is wrong


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("sums", ["scratch", "atomics"])
def test_gpu_kernel_matches_the_torch_path(monkeypatch, dtype, sums):
    monkeypatch.setattr(kernel, "DIAGONAL_SUMS", sums)
    q, k = _qk(1, 8, 2, 3000, 5000, 128, dtype)
    q, k = q.cuda(), k.cuda()
    for sampling, last_q, column_q in (("strided", 64, 0), ("last", 64, 0), ("mixed", 256, 0), ("strided", 64, 1024)):
        config = VerticalSlashConfig(num_vertical=100, num_slash=100, last_q=last_q, query_sampling=sampling,
                                     column_q=column_q)
        got = vs.estimate_masses(q, k, config, backend="triton")
        ref = vs.estimate_masses(q.float(), k.float(), config, backend="torch")
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    assert math.isfinite(float(got[0].sum()))


@pytest.mark.gpu
def test_gpu_row_logsumexp_past_65535_query_blocks_times_splits():
    """Pass 1 over 131,072 rows and keys (2,048 query blocks x 64 key splits: more programs than a CUDA grid's
    dimension 1 or 2 holds) gives each row's causal log-sum-exp (base 2): session 31's every-row tile-keys
    estimate at 128K stopped on a launch error here. Checked on rows spread over the sequence against float64."""
    n, scale = 131072, 0.125
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, n, 64, generator=generator).cuda().half()
    k = torch.randn(1, 1, n, 64, generator=generator).cuda().half()
    rows = torch.arange(n, device="cuda", dtype=torch.int32)
    lse, _ = kernel.row_logsumexp2(q, k, rows, rows, scale)
    for row in (0, 4095, 65536, n - 1):
        scores = (k[0, 0, : row + 1].double() @ q[0, :, row].double().T) * scale  # [row + 1, 2]
        expected = torch.logsumexp(scores, dim=0) / math.log(2.0)
        torch.testing.assert_close(lse[0, :, row].double(), expected, atol=1e-3, rtol=1e-4)


def _reference_choice(columns, diagonals, config):
    """The selection as one stable sort of all 2 Nk items (the shared coverage_selection) or a full topk."""
    nk = columns.shape[-1]
    pos = torch.arange(nk)
    forced_cols, forced_diags = pos < config.sink, pos < config.local
    if config.budget == "fixed":
        def top(score, forced, count):
            ranked = torch.where(forced, math.inf, score)
            return torch.zeros_like(score, dtype=torch.bool).scatter(-1, ranked.topk(min(count, nk), -1).indices, True)
        return top(columns, forced_cols, config.num_vertical), top(diagonals, forced_diags, config.num_slash)
    is_col = torch.cat([torch.ones(nk, dtype=torch.bool), torch.zeros(nk, dtype=torch.bool)])
    chosen = coverage_selection(torch.cat([columns, diagonals], -1), torch.cat([forced_cols, forced_diags]), config.tau,
                                limits=[(is_col, config.min_vertical, config.num_vertical),
                                        (~is_col, config.min_slash, config.num_slash)])
    return chosen[..., :nk], chosen[..., nk:]


SELECTION_CONFIGS = [
    dict(budget="coverage", tau=0.9, num_vertical=40, num_slash=60, sink=3, local=5),
    dict(budget="coverage", tau=1.0, num_vertical=300, num_slash=300, sink=3, local=5),  # caps above Nk
    dict(budget="coverage", tau=0.5, num_vertical=40, num_slash=60, sink=0, local=0, min_vertical=7, min_slash=30),
    dict(budget="coverage", tau=0.95, num_vertical=10, num_slash=80, sink=10, local=2),  # caps bind, ties at the cap
    dict(budget="fixed", num_vertical=40, num_slash=60, sink=3, local=5),
    dict(budget="fixed", num_vertical=0, num_slash=5, sink=0, local=5),
]


@pytest.mark.parametrize("overrides,ties", [(overrides, ties) for overrides in SELECTION_CONFIGS for ties in (False, True)
                                            if not (ties and overrides["budget"] == "fixed")])  # topk ties: arbitrary
def test_selection_matches_one_sort_of_all_items(overrides, ties):
    """The top-k + small-merge selection takes exactly the items a stable sort of all 2 Nk items takes."""
    gen = torch.Generator().manual_seed(7)
    columns = torch.rand(2, 3, 200, generator=gen) ** 4
    diagonals = torch.rand(2, 3, 200, generator=gen) ** 4
    if ties:  # a few distinct values, many zeros: every boundary is a tie
        columns, diagonals = (torch.floor(x * 4) / 40 for x in (columns, diagonals))
    columns, diagonals = columns / columns.sum(-1, keepdim=True) * 0.6, diagonals / diagonals.sum(-1, keepdim=True) * 0.6
    config = VerticalSlashConfig(last_q=8, **overrides)
    got = vs.choose(columns, diagonals, config)
    expected = _reference_choice(columns, diagonals, config)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    items = vs.select_items(columns, diagonals, config)
    packed = vs._pack_taken(items.vertical, items.vertical_taken, config.num_vertical)
    assert torch.equal(packed, mask_to_index(expected[0], config.num_vertical))
    assert torch.equal(vs._pack_taken(items.slash, items.slash_taken, config.num_slash),
                       mask_to_index(expected[1], config.num_slash))


def test_estimate_packs_the_same_index_as_the_masks():
    q, k = _qk(1, 4, 2, 96, 96, 32)
    config = VerticalSlashConfig(num_vertical=20, num_slash=30, last_q=16, sink=2, local=3, budget="coverage", tau=0.8,
                                 query_sampling="strided")
    selection = estimate_vertical_slash(q, k, config)
    chosen = vs.choose(*vs.estimate_masses(q, k, config), config)
    assert torch.equal(selection.vertical, mask_to_index(chosen[0], 20))
    assert torch.equal(selection.slash, mask_to_index(chosen[1], 30))
