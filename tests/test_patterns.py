"""Estimators and the registry: exact index formats, planted patterns found, budgets honoured."""

import math
import os

import pytest
import torch

from longinfer.ops import reference
from longinfer.patterns import (
    AShapeConfig,
    BlockSparseConfig,
    DenseConfig,
    TileKeysConfig,
    VerticalSlashConfig,
    config_from_params,
    config_to_params,
    estimate_block_sparse,
    estimate_vertical_slash,
    get_pattern,
    pattern_names,
    registry,
)
from longinfer.patterns import block_sparse as block_sparse_module
from longinfer.patterns import vertical_slash as vertical_slash_module
from longinfer.patterns._common import union_packed_over_groups
from longinfer.patterns.vertical_slash import choose, estimate_masses

SMALL_CONFIGS = {
    "vertical_slash": [
        VerticalSlashConfig(num_vertical=10, num_slash=12, last_q=16, sink=3, local=4, block_size=16),
        VerticalSlashConfig(num_vertical=40, num_slash=50, last_q=8, sink=2, local=2, budget="coverage", tau=0.7,
                            min_vertical=4, min_slash=3, block_size=32),
    ],
    "block_sparse": [
        BlockSparseConfig(num_blocks=3, block_size=16),
        BlockSparseConfig(num_blocks=5, block_size=16, budget="coverage", tau=0.6, min_blocks=3),
    ],
    "a_shape": [AShapeConfig(sink=4, window=20)],
    "tile_keys": [
        TileKeysConfig(threshold=1.5, pool=16, local=16, sink=2, max_keys=60, block_size=16),
        TileKeysConfig(threshold=0.8, pool=32, local=24, sink=1, max_keys=3, block_size=16),
        TileKeysConfig(threshold=1.0, pool=16, local=16, sink=1, max_keys=40, block_size=16, queries=2),
    ],
    "dense": [DenseConfig()],
}


def _configs(name):
    """Small test configs of a pattern; a newly registered pattern is tested with its defaults."""
    return SMALL_CONFIGS.get(name) or [get_pattern(name).config_cls()]


def test_registry_configs_round_trip():
    assert set(SMALL_CONFIGS) <= set(pattern_names())
    for name, spec in registry().items():
        assert spec.name == name
        assert spec.config_cls() == config_from_params(name, {})
        for cfg in _configs(name):
            assert config_from_params(name, config_to_params(cfg)) == cfg


def _qk(b=2, hq=4, hkv=2, nq=100, nk=100, d=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g) * 1.5
    k = torch.randn(b, hkv, nk, d, generator=g) * 1.5
    return q.to(dtype), k.to(dtype)


def _index_tensors(selection):
    return {n: t for n, t in vars(selection).items() if isinstance(t, torch.Tensor)}


@pytest.mark.parametrize("name", pattern_names())
@pytest.mark.parametrize("per_kv_group", [False, True])
@pytest.mark.parametrize("nq,nk", [(100, 100), (37, 133)])
def test_registry_estimates_have_kernel_format(name, per_kv_group, nq, nk):
    spec = get_pattern(name)
    q, k = _qk(nq=nq, nk=nk)
    for cfg in _configs(name):
        sel = spec.estimate(q, k, cfg, per_kv_group=per_kv_group)
        assert sel.k_len == nk
        heads = 2 if per_kv_group else 4
        for tensor_name, t in _index_tensors(sel).items():
            assert t.dtype == torch.int64, tensor_name
            assert t.shape[:2] == (2, heads), tensor_name
            assert ((t == -1) | ((t >= 0) & (t < nk))).all(), tensor_name
        rows = torch.arange(nk - nq, nk)
        mask = spec.reference_mask(sel, rows)
        assert mask.dtype == torch.bool and mask.shape[-2:] == (nq, nk)
        assert mask.shape[1] in (1, heads)
        # Every query keeps at least itself (diagonal / window / local band) and key 0 (sinks, first block).
        assert mask[..., torch.arange(nq), rows].all() and mask[..., 0].all()
        if name == "vertical_slash":
            mult = 2 if per_kv_group else 1
            assert sel.vertical.shape[-1] == cfg.num_vertical * mult and sel.slash.shape[-1] == cfg.num_slash * mult
        if name == "block_sparse":
            assert sel.block_index.shape[2:] == (math.ceil(nk / 16), cfg.num_blocks * (2 if per_kv_group else 1))
            first_query_block = (nk - nq) // 16
            assert (sel.block_index[:, :, :first_query_block] == -1).all()


@pytest.mark.parametrize("name", pattern_names())
def test_registry_kernels_match_reference(name):
    """spec.run on an estimated index equals masked attention with the spec's reference mask."""
    spec = get_pattern(name)
    q, k = _qk(b=1, nq=40, nk=72)
    v = torch.randn_like(k)
    rows = torch.arange(32, 72)
    for cfg in _configs(name):
        sel = spec.estimate(q, k, cfg)
        out = spec.run(q, k, v, sel, cfg)
        expected = reference.masked_attention(q, k, v, spec.reference_mask(sel, rows), rows=rows)
        torch.testing.assert_close(out.float(), expected, atol=2e-3, rtol=2e-3)


def _brute_masses(q, k, cfg, scale):
    """Column / diagonal masses from the full softmax of the last queries, cell by cell."""
    last = min(cfg.last_q, q.shape[2])
    nk = k.shape[2]
    group = q.shape[1] // k.shape[1]
    probs = torch.softmax(
        (q[:, :, -last:].double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2) * scale).masked_fill(
            torch.arange(nk)[None, :] > torch.arange(nk - last, nk)[:, None], float("-inf")), -1)
    cols = torch.zeros(q.shape[0], q.shape[1], nk, dtype=torch.float64)
    diags = torch.zeros_like(cols)
    for i in range(last):
        pos = nk - last + i
        for j in range(pos + 1):
            if pos - j >= cfg.local:
                cols[..., j] += probs[..., i, j]
            if j >= cfg.sink:
                diags[..., pos - j] += probs[..., i, j]
    return cols / last, diags / last


@pytest.mark.parametrize("nq,nk,chunk", [(50, 50, 7), (20, 61, 16), (3, 40, 1000)])
def test_vertical_slash_masses_match_brute_force(monkeypatch, nq, nk, chunk):
    monkeypatch.setattr(vertical_slash_module, "KEY_CHUNK", chunk)
    q, k = _qk(b=1, hq=4, hkv=2, nq=nq, nk=nk, d=8)
    cfg = VerticalSlashConfig(num_vertical=10, num_slash=12, last_q=9, sink=3, local=4)
    cols, diags = estimate_masses(q, k, cfg, sm_scale=0.4)
    exp_cols, exp_diags = _brute_masses(q, k, cfg, 0.4)
    assert torch.allclose(cols.double(), exp_cols, atol=1e-6)
    assert torch.allclose(diags.double(), exp_diags, atol=1e-6)


def test_estimates_are_per_head_independent():
    """Vectorized over batch and heads: each (batch, head) equals the estimate of that head alone."""
    q, k = _qk(b=2, hq=4, hkv=2, nq=90, nk=90)
    for cfg in SMALL_CONFIGS["vertical_slash"] + SMALL_CONFIGS["block_sparse"]:
        spec = get_pattern("vertical_slash" if isinstance(cfg, VerticalSlashConfig) else "block_sparse")
        full = _index_tensors(spec.estimate(q, k, cfg))
        alone = _index_tensors(spec.estimate(q[1:2, 2:3], k[1:2, 1:2], cfg))
        for name in full:
            assert torch.equal(full[name][1:2, 2:3], alone[name]), name


def _planted_column_qk(n=256, d=32, column=150, seed=0):
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(d, generator=g)
    direction /= direction.norm()
    q = torch.randn(1, 2, n, d, generator=g) * 0.3 + direction * 3
    k = torch.randn(1, 1, n, d, generator=g) * 0.3
    k[0, 0, column] = direction * 4
    return q, k


@pytest.mark.parametrize("budget", ["fixed", "coverage"])
def test_vertical_slash_finds_planted_column(budget):
    q, k = _planted_column_qk()
    cfg = VerticalSlashConfig(num_vertical=4, num_slash=8, last_q=16, sink=2, local=4, budget=budget, tau=0.5)
    sel = estimate_vertical_slash(q, k, cfg, sm_scale=1.0)
    for h in range(2):
        verticals = set(sel.vertical[0, h].tolist())
        assert 150 in verticals and {0, 1} <= verticals
        assert set(range(4)) <= set(sel.slash[0, h].tolist())
    if budget == "coverage":  # one strong column covers the mass: nothing else beyond the forced entries
        assert (sel.vertical >= 0).sum(-1).tolist() == [[3, 3]]
        assert (sel.slash >= 0).sum(-1).tolist() == [[4, 4]]


@pytest.mark.parametrize("budget", ["fixed", "coverage"])
def test_vertical_slash_finds_planted_diagonal(budget):
    n, offset = 200, 37
    g = torch.Generator().manual_seed(1)
    codes = torch.nn.functional.normalize(torch.randn(n, 64, generator=g), dim=-1)
    q = (codes * 10)[None, None]  # query i carries code i
    k = torch.roll(codes, -offset, 0)[None, None]  # key j carries code j + offset: matches query j + offset
    cfg = VerticalSlashConfig(num_vertical=3, num_slash=4, last_q=32, sink=1, local=2, budget=budget, tau=0.8)
    sel = estimate_vertical_slash(q, k, cfg, sm_scale=1.0)
    assert offset in sel.slash[0, 0].tolist()
    assert {0, 1} <= set(sel.slash[0, 0].tolist())
    rows = torch.arange(100, 200)
    mask = sel.mask(rows)[0, 0]
    assert mask[torch.arange(100), rows - offset].all()  # the kernel keeps every planted pair


def _chosen_mass(cols, diags, cfg):
    chosen_cols, chosen_diags = choose(cols, diags, cfg)
    return (cols * chosen_cols).sum(-1) + (diags * chosen_diags).sum(-1), chosen_cols, chosen_diags


@pytest.mark.parametrize("tau", [0.3, 0.6, 0.9, 0.99])
def test_vertical_slash_coverage_reaches_tau_minimally(tau):
    q, k = _qk(b=2, hq=4, hkv=2, nq=120, nk=120)
    cfg = VerticalSlashConfig(num_vertical=120, num_slash=120, last_q=16, sink=2, local=3, budget="coverage", tau=tau)
    cols, diags = estimate_masses(q, k, cfg)
    mass, chosen_cols, chosen_diags = _chosen_mass(cols, diags, cfg)
    assert (mass >= tau - 1e-6).all()
    # Minimal along the ranking: dropping the smallest non-forced item falls below tau.
    pos = torch.arange(120)
    free_cols = torch.where(chosen_cols & (pos >= cfg.sink), cols, math.inf).min(-1).values
    free_diags = torch.where(chosen_diags & (pos >= cfg.local), diags, math.inf).min(-1).values
    smallest = torch.minimum(free_cols, free_diags)
    has_free = smallest < math.inf
    assert (mass - smallest < tau)[has_free].all()
    # Ranked together: every unchosen item has no more mass than the smallest chosen free item.
    largest_unchosen = torch.maximum(torch.where(chosen_cols, -1.0, cols).max(-1).values,
                                     torch.where(chosen_diags, -1.0, diags).max(-1).values)
    assert (largest_unchosen <= smallest + 1e-7)[has_free].all()


def test_vertical_slash_coverage_limits():
    q, k = _qk(nq=120, nk=120)
    capped = VerticalSlashConfig(num_vertical=5, num_slash=6, last_q=16, sink=2, local=3, budget="coverage", tau=1.0)
    sel = estimate_vertical_slash(q, k, capped)
    assert ((sel.vertical >= 0).sum(-1) == 5).all() and ((sel.slash >= 0).sum(-1) == 6).all()
    floor = VerticalSlashConfig(num_vertical=50, num_slash=50, last_q=16, sink=2, local=3, budget="coverage",
                                tau=0.01, min_vertical=7, min_slash=9)
    sel = estimate_vertical_slash(q, k, floor)
    assert ((sel.vertical >= 0).sum(-1) == 7).all() and ((sel.slash >= 0).sum(-1) == 9).all()


def test_vertical_slash_fixed_sizes_and_padding():
    q, k = _qk(nq=30, nk=30)
    cfg = VerticalSlashConfig(num_vertical=40, num_slash=12, last_q=8, sink=3, local=4)
    sel = estimate_vertical_slash(q, k, cfg)
    # Fewer keys than num_vertical: all 30 columns, then -1 padding; ascending.
    assert torch.equal(sel.vertical[0, 0], torch.cat([torch.arange(30), torch.full((10,), -1)]))
    assert ((sel.slash >= 0).sum(-1) == 12).all()
    valid = sel.slash[0, 0][sel.slash[0, 0] >= 0]
    assert torch.equal(valid, valid.sort().values) and set(range(4)) <= set(valid.tolist())


def test_vertical_slash_kv_group_union():
    q, k = _qk(b=1, hq=6, hkv=2, nq=120, nk=120)
    for cfg in SMALL_CONFIGS["vertical_slash"]:
        per_head = estimate_vertical_slash(q, k, cfg)
        shared = estimate_vertical_slash(q, k, cfg, per_kv_group=True)
        for kv in range(2):
            for field in ("vertical", "slash"):
                heads = getattr(per_head, field)[0, 3 * kv: 3 * kv + 3]
                union = set(heads.flatten().tolist()) - {-1}
                assert set(getattr(shared, field)[0, kv].tolist()) - {-1} == union


UNION_BACKENDS = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


@pytest.mark.parametrize("backend", UNION_BACKENDS)
@pytest.mark.parametrize("bsz,hq,hkv,width,length", [(1, 6, 2, 7, 50), (2, 12, 2, 33, 257), (3, 4, 4, 5, 9),
                                                     (1, 12, 2, 700, 9000)])
def test_union_packed_over_groups_is_the_sorted_set_union(backend, bsz, hq, hkv, width, length):
    """Each KV group's row holds its heads' positions as an ascending set, then -1, at width G * W;
    rows with no position (all -1) and heads sharing positions included. The Triton kernels (in the
    interpreter) give the same rows, also repeated for each query head; the last shape packs more than
    one 4,096-key block per row and marks more than one 1,024-position block per head."""
    from longinfer.patterns._union_kernel import union_packed_over_groups_triton

    union_of = union_packed_over_groups if backend == "torch" else union_packed_over_groups_triton
    g = torch.Generator().manual_seed(width)
    index = torch.full((bsz, hq, width), -1, dtype=torch.long)
    for b in range(bsz):
        for h in range(hq):
            count = int(torch.randint(0, width + 1, (1,), generator=g))
            if (b, h) != (0, 0):  # head (0, 0) keeps no position at all
                index[b, h, :count] = torch.randperm(length, generator=g)[:count].sort().values
    union = union_of(index, hkv, length)
    group = hq // hkv
    assert union.shape == (bsz, hkv, group * width) and union.dtype == torch.long
    for b in range(bsz):
        for kv in range(hkv):
            expected = sorted(set(index[b, kv * group:(kv + 1) * group].flatten().tolist()) - {-1})
            assert union[b, kv].tolist() == expected + [-1] * (group * width - len(expected))
    assert torch.equal(union_of(index, hkv, length, repeat=True), union.repeat_interleave(group, dim=1))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton union on CPU tensors")
@pytest.mark.parametrize("block,max_parts,length", [(64, 4, 9000), (64, 64, 9000), (64, 4, 130)])
def test_triton_union_parts_of_several_blocks(monkeypatch, block, max_parts, length):
    """The packing is cut into parts of whole blocks, each placed after the set bits of the parts before it:
    parts of many blocks (few parts over a long row), of one block, and one part shorter than a block give
    the torch union. Rows filled unevenly, so that some parts hold no position at all."""
    from longinfer.patterns import _union_kernel

    monkeypatch.setattr(_union_kernel, "PACK_BLOCK", block)
    monkeypatch.setattr(_union_kernel, "MAX_PARTS", max_parts)
    parts, part_len = _union_kernel.pack_parts(length)
    assert parts <= max_parts and part_len % block == 0 and (parts - 1) * part_len < length <= parts * part_len
    g = torch.Generator().manual_seed(length)
    index = torch.full((2, 6, 300), -1, dtype=torch.long)
    for b in range(2):
        for h in range(6):
            span = length // (h + 1)  # later heads only in the row's first part
            count = min(300, span)
            index[b, h, :count] = torch.randperm(span, generator=g)[:count].sort().values
    expected = union_packed_over_groups(index, 2, length)
    assert torch.equal(_union_kernel.union_packed_over_groups_triton(index, 2, length), expected)
    repeated = _union_kernel.union_packed_over_groups_triton(index, 2, length, repeat=True)
    assert torch.equal(repeated, expected.repeat_interleave(3, dim=1))


@pytest.mark.gpu
def test_triton_union_on_cuda_is_the_torch_union():
    """On CUDA (the path the estimate takes there) the Triton union of a 4K turn's shape (12 query heads
    in 2 KV groups, up to 4,096 columns each over 69,632 keys) equals the torch path's, repeated too."""
    from longinfer.patterns._union_kernel import union_packed_over_groups_triton

    g = torch.Generator().manual_seed(3)
    length, width = 69632, 4096
    index = torch.full((1, 12, width), -1, dtype=torch.long)
    for h in range(12):
        count = int(torch.randint(width // 2, width + 1, (1,), generator=g))
        index[0, h, :count] = torch.randperm(length, generator=g)[:count].sort().values
    expected = union_packed_over_groups(index, 2, length)
    union = union_packed_over_groups_triton(index.cuda(), 2, length)
    repeated = union_packed_over_groups_triton(index.cuda(), 2, length, repeat=True)
    assert torch.equal(union.cpu(), expected)
    assert torch.equal(repeated.cpu(), expected.repeat_interleave(6, dim=1))


def _planted_block_qk(n=256, d=32, block=5, bs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    q = torch.randn(1, 2, n, d, generator=g) * 0.3 + direction * 2
    k = torch.randn(1, 1, n, d, generator=g) * 0.3
    k[0, 0, block * bs: (block + 1) * bs] += direction * 3
    return q, k


@pytest.mark.parametrize("budget", ["fixed", "coverage"])
def test_block_sparse_finds_planted_block(budget):
    q, k = _planted_block_qk()
    cfg = BlockSparseConfig(num_blocks=3, block_size=16, budget=budget, tau=0.5)
    sel = estimate_block_sparse(q, k, cfg, sm_scale=1.0)
    index = sel.block_index[0, 0]
    for m in range(16):
        ids = set(index[m].tolist()) - {-1}
        assert {0, m} <= ids and max(ids) <= m  # forced blocks, causal only
        if m >= 5:
            assert 5 in ids
        if budget == "coverage" and m > 5:
            assert ids == {0, 5, m}


@pytest.mark.parametrize("tau", [0.2, 0.5, 0.95])
def test_block_sparse_coverage_reaches_tau(tau):
    q, k = _qk(b=1, hq=2, hkv=1, nq=256, nk=256, d=16)
    cfg = BlockSparseConfig(num_blocks=16, block_size=16, budget="coverage", tau=tau)
    sel = estimate_block_sparse(q, k, cfg)
    pq = q.reshape(1, 2, 16, 16, 16).mean(3)
    pk = k.reshape(1, 1, 16, 16, 16).mean(3)
    scores = (pq @ pk.transpose(-1, -2) * 0.25).masked_fill(torch.ones(16, 16).triu(1).bool(), float("-inf"))
    mass = torch.softmax(scores, -1)  # [1, 2, 16, 16]
    chosen = torch.zeros(1, 2, 16, 17, dtype=torch.bool).scatter(-1, sel.block_index.clamp(min=-1) % 17, True)[..., :16]
    kept = (mass * chosen).sum(-1)
    assert (kept >= tau - 1e-6).all()
    counts = chosen.sum(-1)
    assert (counts >= 1).all() and (counts[..., 1:] >= 2).all()


def test_block_sparse_fixed_count_and_kv_union():
    q, k = _qk(b=1, hq=4, hkv=2, nq=160, nk=160)
    cfg = BlockSparseConfig(num_blocks=3, block_size=16)
    sel = estimate_block_sparse(q, k, cfg)
    counts = (sel.block_index >= 0).sum(-1)
    assert counts[..., 0].eq(1).all() and counts[..., 1].eq(2).all() and counts[..., 2:].eq(3).all()
    shared = estimate_block_sparse(q, k, cfg, per_kv_group=True)
    for kv in range(2):
        for m in range(10):
            union = set(sel.block_index[0, 2 * kv: 2 * kv + 2, m].flatten().tolist()) - {-1}
            assert set(shared.block_index[0, kv, m].tolist()) - {-1} == union


def test_block_sparse_chunked_query_blocks(monkeypatch):
    q, k = _qk(b=1, nq=150, nk=200)
    cfg = SMALL_CONFIGS["block_sparse"][1]
    whole = estimate_block_sparse(q, k, cfg)
    monkeypatch.setattr(block_sparse_module, "QUERY_BLOCK_CHUNK", 3)
    assert torch.equal(estimate_block_sparse(q, k, cfg).block_index, whole.block_index)


def test_bfloat16_inputs():
    q, k = _qk(nq=64, nk=64, dtype=torch.bfloat16)
    sel = estimate_vertical_slash(q, k, SMALL_CONFIGS["vertical_slash"][0])
    assert sel.vertical.dtype == torch.int64
    assert estimate_block_sparse(q, k, SMALL_CONFIGS["block_sparse"][0]).block_index.dtype == torch.int64


@pytest.mark.parametrize(
    "make,error,message",
    [
        (lambda: VerticalSlashConfig(sink=50, num_vertical=10), ValueError, "raise num_vertical"),
        (lambda: VerticalSlashConfig(local=200, num_slash=100), ValueError, "raise num_slash"),
        (lambda: VerticalSlashConfig(budget="auto"), ValueError, "budget must be one of"),
        (lambda: VerticalSlashConfig(tau=0.0), ValueError, r"tau must lie in \(0, 1\]"),
        (lambda: VerticalSlashConfig(last_q=0), ValueError, "last_q must be >= 1"),
        (lambda: VerticalSlashConfig(block_size=48), ValueError, "block_size must be one of"),
        (lambda: VerticalSlashConfig(num_vertical=10.0), TypeError, "num_vertical must be int"),
        (lambda: VerticalSlashConfig(sink=True), TypeError, "sink must be int"),
        (lambda: VerticalSlashConfig(min_slash=7000), ValueError, "min_slash must lie in"),
        (lambda: BlockSparseConfig(num_blocks=1), ValueError, "num_blocks must be >= 2"),
        (lambda: BlockSparseConfig(min_blocks=101), ValueError, "min_blocks must lie in"),
        (lambda: AShapeConfig(sink=-1), ValueError, "must be >= 0"),
        (lambda: config_from_params("vertical_slash", {"slashes": 3}), ValueError, "unknown parameter"),
        (lambda: get_pattern("vs"), ValueError, "registered patterns: vertical_slash"),
    ],
)
def test_config_errors(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_input_errors():
    q, k = _qk(nq=50, nk=50)
    cfg = SMALL_CONFIGS["vertical_slash"][0]
    with pytest.raises(ValueError, match="at least as long as q"):
        estimate_vertical_slash(q, k[:, :, :40], cfg)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        estimate_vertical_slash(q[:, :3], k, cfg)
    with pytest.raises(ValueError, match="head_dim"):
        estimate_block_sparse(q, k[..., :16], SMALL_CONFIGS["block_sparse"][0])
    with pytest.raises(TypeError, match="must be a VerticalSlashConfig"):
        estimate_vertical_slash(q, k, SMALL_CONFIGS["block_sparse"][0])
    with pytest.raises(TypeError, match="floating-point"):
        estimate_vertical_slash(q.long(), k, cfg)
    assert VerticalSlashConfig(tau=1).tau == 1.0 and isinstance(VerticalSlashConfig(tau=1).tau, float)
