"""Every kernel against ``masked_attention(q, k, v, <its reference mask>)``.

Runs the Triton kernels in the interpreter on the CPU (see conftest.py) or on the GPU.

Tolerances. float32: the kernel and the reference do the same float32 arithmetic in another
order, so they agree to ~1e-6; we allow 2e-5. float16: the kernel rounds P to float16 before the
P @ V product, like every flash-attention kernel; the bound is the flash-attention convention,
twice the error of a plain PyTorch float16 implementation (float16 scores and P) against the same
float32 reference, plus 1e-3 for rows where that error happens to be ~0.
"""

from __future__ import annotations

import math

import pytest
import torch

from longinfer.ops import (
    a_shape_attention,
    block_sparse_attention,
    build_vertical_slash_index,
    dense_attention,
    tile_keys_attention,
    vertical_slash_attention,
)
from longinfer.ops.sparse import default_tail_splits
from longinfer.ops.reference import (
    a_shape_mask,
    block_sparse_mask,
    dense_causal_mask,
    masked_attention,
    tile_keys_mask,
    vertical_slash_mask,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _qkv(b, hq, hkv, n, d, dtype, seed, nk=None):
    g = torch.Generator().manual_seed(seed)
    nk = n if nk is None else nk
    q = torch.randn(b, hq, n, d, generator=g)
    k = torch.randn(b, hkv, nk, d, generator=g)
    v = torch.randn(b, hkv, nk, d, generator=g)
    return (t.to(DEVICE, dtype) for t in (q, k, v))


def _low_precision_torch(q, k, v, mask):
    """Plain PyTorch attention at the inputs' precision (scores and P rounded to q.dtype)."""
    group = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(group, 1)
    vv = v.repeat_interleave(group, 1)
    full = mask.repeat_interleave(q.shape[1] // mask.shape[1], 1)
    scores = (q @ kk.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
    p = torch.nan_to_num(torch.softmax(scores.masked_fill(~full, float("-inf")), -1)).to(q.dtype)
    return (p @ vv).float()


def assert_matches_reference(out, q, k, v, mask):
    """Compare a kernel output with the float32 reference under the tolerance described above."""
    rows = None
    if q.shape[2] != k.shape[2]:  # queries are the last positions
        rows = torch.arange(k.shape[2] - q.shape[2], k.shape[2], device=q.device)
        mask = mask[:, :, rows]
    assert out.dtype == q.dtype and out.shape == q.shape
    ref = masked_attention(q, k, v, mask, rows=rows)
    err = (out.float() - ref).abs().max().item()
    if q.dtype == torch.float32:
        assert err <= 2e-5, err
    else:
        torch_err = (_low_precision_torch(q, k, v, mask) - ref).abs().max().item()
        assert err <= 2 * torch_err + 1e-3, (err, torch_err)


# (batch, q heads, kv heads, length, head_dim, dtype)
SHAPES = [
    (1, 1, 1, 1, 64, torch.float32),
    (2, 2, 1, 63, 80, torch.float32),
    (1, 7, 1, 64, 96, torch.float16),
    (3, 2, 2, 65, 128, torch.float32),
    (2, 4, 2, 200, 64, torch.float16),
    (1, 7, 7, 130, 32, torch.float32),
    (1, 2, 1, 1000, 64, torch.float16),
]
if torch.cuda.is_available():  # bf16 dot products are wrong in the CPU interpreter: GPU only
    SHAPES += [(2, 4, 1, 333, 128, torch.bfloat16), (1, 6, 2, 1000, 96, torch.bfloat16)]
SHAPE_IDS = [f"b{b}-hq{hq}-hkv{hkv}-n{n}-d{d}-{str(dt)[6:]}" for b, hq, hkv, n, d, dt in SHAPES]


@pytest.mark.parametrize("b,hq,hkv,n,d,dtype", SHAPES, ids=SHAPE_IDS)
def test_dense(b, hq, hkv, n, d, dtype):
    q, k, v = _qkv(b, hq, hkv, n, d, dtype, seed=n + d)
    out = dense_attention(q, k, v)
    assert_matches_reference(out, q, k, v, dense_causal_mask(n, device=DEVICE))


@pytest.mark.parametrize("b,hq,hkv,n,d,dtype", SHAPES, ids=SHAPE_IDS)
def test_vertical_slash_random_indices(b, hq, hkv, n, d, dtype):
    q, k, v = _qkv(b, hq, hkv, n, d, dtype, seed=n * 3 + d)
    g = torch.Generator().manual_seed(n)
    # Duplicates and out-of-range entries on purpose; heads = Hq.
    vertical = torch.randint(-4, n + 4, (b, hq, 9), generator=g).to(DEVICE)
    slash = torch.randint(-4, n + 4, (b, hq, 5), generator=g).to(DEVICE)
    slash[..., 0] = slash[..., 1]
    out = vertical_slash_attention(q, k, v, vertical, slash)
    assert_matches_reference(out, q, k, v, vertical_slash_mask(vertical, slash, n))


@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
def test_vertical_slash_block_sizes_and_structured_index(block_size):
    n, d = 300, 64
    q, k, v = _qkv(1, 4, 2, n, d, torch.float32, seed=block_size)
    vertical = torch.tensor([[[0, 1, 2, 3, 50, 51, 299, 120]] * 2], device=DEVICE)  # per KV group
    slash = torch.tensor([[[0, 1, 2, 3, 40, 41, 42, 200], [0, 5, 6, 90, 91, 250, 251, 252]]], device=DEVICE)
    out = vertical_slash_attention(q, k, v, vertical, slash, block_size=block_size)
    assert_matches_reference(out, q, k, v, vertical_slash_mask(vertical, slash, n, block_size))


COVERED_DTYPES = [torch.float32] + ([torch.bfloat16] if torch.cuda.is_available() else [])  # bf16: GPU only


@pytest.mark.parametrize("dtype", COVERED_DTYPES, ids=[str(d)[6:] for d in COVERED_DTYPES])
def test_loading_covered_columns_changes_nothing(dtype):
    """`covered_in_loads=False` (K/V of columns a slash chunk covers loaded, masked only in the scores)
    gives the same output, bit for bit, as masking them in the loads; both match the reference."""
    from longinfer.ops._checks import AttentionShape
    from longinfer.ops._kernel import MODE_VERTICAL_SLASH
    from longinfer.ops._launch import launch

    n, d = 300, 64
    q, k, v = _qkv(1, 4, 2, n, d, dtype, seed=7)
    # columns next to the diagonal (inside the local slashes' chunks) and far from it
    vertical = torch.tensor([[[0, 1, 2, 3, 50, 51, 60, 61, 62, 120, 190, 299]] * 4], device=DEVICE)
    slash = torch.tensor([[[0, 1, 2, 3, 40, 41, 42, 200]] * 4], device=DEVICE)
    index = build_vertical_slash_index(vertical, slash, n, 64)
    shape = AttentionShape(1, 4, 2, n, n, d)
    outs = [launch(q, k, v, shape, 1 / math.sqrt(d), MODE_VERTICAL_SLASH, 64, vs=index,
                   options={"BLOCK_N": index.chunk, "num_warps": 4, "num_stages": 1, "covered_in_loads": flag})
            for flag in (True, False)]
    assert torch.equal(outs[0], outs[1])
    assert_matches_reference(outs[1], q, k, v, vertical_slash_mask(vertical, slash, n, 64))


@pytest.mark.parametrize("dtype", COVERED_DTYPES, ids=[str(d)[6:] for d in COVERED_DTYPES])
@pytest.mark.parametrize("mode_name", ["dense", "a_shape", "vertical_slash_tail"])
def test_one_loop_key_ranges_change_nothing(dtype, mode_name):
    """`split_ranges=False` (each key range in one loop that branches per tile between the masked and
    unmasked step, the unpipelined form kept to time against) gives the same output, bit for bit, as
    the separate loops, for every mode that walks key ranges; both match the reference. 300 queries
    over 333 keys: ranges end mid-tile and the queries start mid-tile."""
    from longinfer.ops._checks import AttentionShape
    from longinfer.ops._kernel import MODE_A_SHAPE, MODE_DENSE, MODE_VERTICAL_SLASH
    from longinfer.ops._launch import launch

    nq, nk, d = 300, 333, 64
    q, k, v = _qkv(1, 4, 2, nq, d, dtype, seed=11, nk=nk)
    shape = AttentionShape(1, 4, 2, nq, nk, d)
    mode, extra, mask = {
        "dense": (MODE_DENSE, {}, dense_causal_mask(nk, device=DEVICE)),
        "a_shape": (MODE_A_SHAPE, {"sink": 5, "window": 90}, a_shape_mask(5, 90, nk, device=DEVICE)),
    }.get(mode_name, (None, None, None))
    if mode is None:  # vertical-slash with the query tiles from key 256 on dense
        vertical = torch.tensor([[[0, 1, 2, 3, 50, 120, 190]] * 4], device=DEVICE)
        slash = torch.tensor([[[0, 1, 2, 3, 40, 41, 200]] * 4], device=DEVICE)
        index = build_vertical_slash_index(vertical, slash, nk, 64)
        mode, extra = MODE_VERTICAL_SLASH, {"vs": index, "dense_from": 256}
        mask = vertical_slash_mask(vertical, slash, nk, 64, dense_from=256)
    outs = [launch(q, k, v, shape, 1 / math.sqrt(d), mode, 64, **extra,
                   options={"BLOCK_N": 64, "num_warps": 4, "num_stages": 1, "split_ranges": split})
            for split in (True, False)]
    assert torch.equal(outs[0], outs[1])
    assert_matches_reference(outs[1], q, k, v, mask)


def test_slash_masks_bias_matches_every_and_none_is_exact_only_where_no_chunk_needs_a_mask():
    """A per-key bias in the slash chunks and the diagonal's keys in a masked step after them
    (`slash_masks="bias"`) give the output of masking every chunk element by element, on an index
    whose chunks cross the diagonal, end early (groups of nearby slashes) and start before key 0
    (an offset past the first tiles), with columns too.
    `"none"` is a timing bound: 128 queries after a 512-key prefix with two lone slashes far from
    the diagonal (each one whole 64-key chunk, visible to every row of both tiles) give the masked
    output (up to rounding); with the main diagonal in the index the chunk that crosses it needs its
    mask, and the unmasked output is wrong there."""
    from longinfer.ops._checks import AttentionShape
    from longinfer.ops._kernel import MODE_VERTICAL_SLASH
    from longinfer.ops._launch import launch

    nq, nk, d = 128, 640, 64
    q, k, v = _qkv(1, 4, 2, nq, d, torch.float16, seed=13, nk=nk)
    shape = AttentionShape(1, 4, 2, nq, nk, d)
    no_columns = torch.zeros(1, 4, 0, dtype=torch.long, device=DEVICE)

    def run(columns: torch.Tensor, slash: torch.Tensor, masks: tuple[str, ...]) -> list[torch.Tensor]:
        index = build_vertical_slash_index(columns, slash, nk, 64)
        return [launch(q, k, v, shape, 1 / math.sqrt(d), MODE_VERTICAL_SLASH, 64, vs=index,
                       options={"BLOCK_N": 64, "num_warps": 4, "num_stages": 1, "slash_masks": m})
                for m in masks]

    columns = torch.tensor([[[0, 1, 7, 300, 515]] * 4], device=DEVICE)
    awkward = torch.tensor([[[0, 3, 40, 41, 100, 130, 300, 575, 600]] * 4], device=DEVICE)
    every, bias = run(columns, awkward, ("every", "bias"))
    for out in (every, bias):
        assert_matches_reference(out, q, k, v, vertical_slash_mask(columns, awkward, nk, 64))
    # the diagonal's keys fold in last, not in chunk order: float16 output rounding apart at most
    assert (every.float() - bias.float()).abs().max().item() <= 1e-3

    far = torch.tensor([[[100, 300]] * 4], device=DEVICE)
    masked, unmasked = run(no_columns, far, ("every", "none"))
    # bit for bit in the interpreter; compiled, the two forms may round apart (H200, session 20)
    assert (masked.float() - unmasked.float()).abs().max().item() <= 1e-3
    assert_matches_reference(masked, q, k, v, vertical_slash_mask(no_columns, far, nk, 64))
    masked, unmasked = run(no_columns, torch.tensor([[[0, 300]] * 4], device=DEVICE), ("every", "none"))
    assert not torch.allclose(masked.float(), unmasked.float(), atol=1e-2)
    with pytest.raises(ValueError, match="slash_masks must be one of"):
        run(no_columns, far, ("some",))


def test_vertical_slash_with_32_key_chunks_matches_reference():
    q, k, v = _qkv(2, 4, 2, 150, 64, torch.float32, seed=5, nk=300)
    gen = torch.Generator().manual_seed(5)
    vertical = torch.randint(0, 300, (2, 4, 12), generator=gen).to(DEVICE)
    slash = torch.cat([torch.arange(4).expand(2, 4, 4), torch.randint(0, 300, (2, 4, 10), generator=gen)], -1).to(DEVICE)
    index = build_vertical_slash_index(vertical, slash, 300, 64, chunk=32)
    out = vertical_slash_attention(q, k, v, index=index, block_size=64)
    assert_matches_reference(out, q, k, v, vertical_slash_mask(vertical, slash, 300, 64))
    with pytest.raises(ValueError, match="chunk must be 32 or 64"):
        build_vertical_slash_index(vertical, slash, 300, 64, chunk=48)


def test_vertical_slash_empty_and_prebuilt_index():
    n = 150
    q, k, v = _qkv(2, 2, 1, n, 64, torch.float32, seed=5)
    empty = torch.zeros(2, 2, 0, dtype=torch.long, device=DEVICE)
    slash = torch.tensor([[[0, 3]], [[7, 100]]], device=DEVICE).expand(2, 2, 2).contiguous()
    vertical = torch.tensor([[[5]], [[149]]], device=DEVICE).expand(2, 2, 1).contiguous()
    # No verticals: slashes only.
    out = vertical_slash_attention(q, k, v, empty, slash)
    assert_matches_reference(out, q, k, v, vertical_slash_mask(empty, slash, n))
    # No slashes: verticals only; rows before the first vertical attend nothing and are zero.
    out = vertical_slash_attention(q, k, v, vertical, empty)
    assert_matches_reference(out, q, k, v, vertical_slash_mask(vertical, empty, n))
    assert torch.all(out[0, :, :5] == 0)
    # Nothing at all: zeros.
    assert torch.all(vertical_slash_attention(q, k, v, empty, empty) == 0)
    # The plan step is reusable.
    index = build_vertical_slash_index(vertical, slash, n)
    torch.testing.assert_close(
        vertical_slash_attention(q, k, v, index=index), vertical_slash_attention(q, k, v, vertical, slash)
    )


@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("chunk", [None, 32])
def test_vertical_slash_index_tables_match_their_definition(block_size, chunk):
    """The kernel's slash chunks cover exactly each tile's group ranges, and ``covered`` says which keys they hold."""
    gen = torch.Generator().manual_seed(block_size)
    nk = 301
    slash = torch.cat([torch.arange(3), torch.randint(0, nk + 20, (25,), generator=gen)]).expand(2, 2, 28)
    index = build_vertical_slash_index(torch.zeros(2, 2, 1, dtype=torch.long), slash, nk, block_size, chunk=chunk)
    lo, hi, count = index.group_lo.long(), index.group_hi.long(), index.group_count.long()
    for b, h in ((0, 0), (1, 1)):
        groups = [(int(lo[b, h, g]), int(hi[b, h, g])) for g in range(int(count[b, h]))]
        for tile in range(math.ceil(nk / block_size)):
            start, end = tile * block_size, min(tile * block_size + block_size, nk)
            expected = set()
            for g_lo, g_hi in groups:
                expected |= set(range(max(start - g_hi, 0), min(start + block_size - g_lo, end)))
            assert int(index.chunk_count[b, h, tile]) <= index.chunk_start.shape[-1]  # the table holds them all
            walked = []
            for i in range(int(index.chunk_count[b, h, tile])):
                first, stop = start + int(index.chunk_start[b, h, i]), start + int(index.chunk_end[b, h, i])
                assert stop - first <= index.chunk
                walked += [key for key in range(first, stop) if 0 <= key < end]
            assert sorted(walked) == sorted(expected), (tile, groups)  # every key once
            for key in range(end):
                inside = any(start - g_hi <= key <= start + block_size - 1 - g_lo for g_lo, g_hi in groups)
                assert bool(index.covered[b, h, start - key + block_size - 1]) == inside


@pytest.mark.parametrize("block_size", [16, 64, 128])
def test_index_tables_kernel_equals_the_torch_tables(block_size):
    """The one-launch tables (Triton) and the torch ops give the same index, entry for entry."""
    from longinfer.ops import index as index_module

    gen = torch.Generator().manual_seed(7 + block_size)
    nk = 1000
    slash = torch.randint(-3, nk + 30, (2, 3, 40), generator=gen)
    vertical = torch.randint(-3, nk + 30, (2, 3, 50), generator=gen)
    slash[1, 2] = -1  # a head without slashes
    lo, hi, count = index_module._slash_groups(slash.to(DEVICE), nk, block_size, nk)
    columns = index_module._sorted_unique(vertical.to(DEVICE), (vertical >= 0).to(DEVICE) & (vertical < nk).to(DEVICE),
                                          nk).int().contiguous()
    chunk = index_module.chunk_size(block_size)
    got = index_module._tables_triton(lo, hi, count, columns, nk, block_size, chunk)
    want = (*index_module._slash_chunks(lo, hi, count, nk, block_size, chunk),
            index_module._column_counts(columns, nk, block_size, None),
            index_module._covered_offsets(lo, hi, count, nk, block_size))
    for name, a, b in zip(("chunk_start", "chunk_end"), got[:2], want[:2]):
        total = int(want[2][..., -1].max())  # entries past a head's last chunk are unspecified
        for b_i in range(2):
            for h in range(3):
                used = int(want[2][b_i, h, -1])
                assert torch.equal(a[b_i, h, :used].cpu(), b[b_i, h, :used].int().cpu()), (name, b_i, h, total)
    for name, a, b in zip(("chunk_count", "column_count", "covered"), got[2:], want[2:]):
        assert a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu()), name


@pytest.mark.parametrize("block_size", [16, 64])
def test_slash_groups_kernel_equals_the_torch_groups(block_size):
    """Presorted slash offsets (as the estimators give them) merge into the same groups in one launch
    (Triton) as with the torch ops: groups across the kernel's block boundaries, offsets past
    ``k_len`` and ``-1`` padding, a head without slashes."""
    from longinfer.ops import index as index_module

    gen = torch.Generator().manual_seed(11 + block_size)
    nk, width = 3000, 300
    rows = []
    for count in (250, 120, 0, 299):
        picked = torch.sort(torch.randperm(nk, generator=gen)[:count]).values
        if count == 120:
            picked = torch.sort(torch.randperm(200, generator=gen)[:count]).values  # dense: long groups
        pad = torch.full((width - count,), -1, dtype=torch.long)
        if count == 250:
            pad[:3] = torch.tensor([nk, nk + 5, nk + 70])  # invalid entries after the valid ones
        rows.append(torch.cat([picked, pad]))
    slash = torch.stack(rows).view(2, 2, width)
    want = index_module._slash_groups(slash, nk, block_size, nk, presorted=True)
    got = index_module._slash_groups_triton(slash.to(DEVICE), nk, block_size)
    for name, a, b in zip(("lo", "hi", "count"), got, want):
        assert a.dtype == b.dtype == torch.int32 and torch.equal(a.cpu(), b), name
    assert int(want[2].min()) == 0 and int(want[2].max()) > 1


@pytest.mark.parametrize("b,hq,hkv,n,d,dtype", SHAPES, ids=SHAPE_IDS)
def test_block_sparse_random_indices(b, hq, hkv, n, d, dtype):
    q, k, v = _qkv(b, hq, hkv, n, d, dtype, seed=n * 5 + d)
    bs = 64
    nb = math.ceil(n / bs)
    g = torch.Generator().manual_seed(n + 1)
    heads = hkv if n % 2 else hq  # both per-group and per-head indices
    block_index = torch.randint(-1, nb + 2, (b, heads, nb, 3), generator=g).to(DEVICE)
    out = block_sparse_attention(q, k, v, block_index, block_size=bs)
    assert_matches_reference(out, q, k, v, block_sparse_mask(block_index, n, bs))


@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_block_sparse_block_sizes(block_size):
    n = 270
    q, k, v = _qkv(1, 2, 1, n, 64, torch.float32, seed=block_size)
    nb = math.ceil(n / block_size)
    diag = torch.arange(nb, device=DEVICE)
    # One index per KV group: its two query heads share each tile (heads_per_tile = 2).
    block_index = torch.stack([diag, torch.zeros_like(diag), diag - 2], -1)[None, None].expand(1, 1, nb, 3)
    out = block_sparse_attention(q, k, v, block_index, block_size=block_size)
    assert_matches_reference(out, q, k, v, block_sparse_mask(block_index, n, block_size))


@pytest.mark.parametrize("b,hq,hkv,n,d,dtype", SHAPES, ids=SHAPE_IDS)
def test_tile_keys_random_columns(b, hq, hkv, n, d, dtype):
    """Random per-tile columns with repeats, -1, ids past the sequence and ids inside the band (all
    ignored by the kernel as by the reference), per query head or per KV group."""
    q, k, v = _qkv(b, hq, hkv, n, d, dtype, seed=n * 11 + d)
    bs, local = 64, 64 + n % 50
    tiles = math.ceil(n / bs)
    g = torch.Generator().manual_seed(n + 3)
    heads = hkv if n % 2 else hq
    columns = torch.randint(-1, n + 3, (b, heads, tiles, 40), generator=g).to(DEVICE)
    out = tile_keys_attention(q, k, v, columns, local=local, block_size=bs)
    assert_matches_reference(out, q, k, v, tile_keys_mask(columns, n, local, bs))


@pytest.mark.parametrize("block_size,local", [(16, 16), (32, 100), (64, 64)])
def test_tile_keys_block_sizes_and_queries_after_a_prefix(block_size, local):
    """Queries as the last 90 of 270 positions (a chunk after a cached prefix): tiles count in absolute
    positions; and the estimator's presorted format gives the same output as a sorted build."""
    nk, nq = 270, 90
    q, k, v = _qkv(1, 4, 2, nq, 64, torch.float32, seed=block_size, nk=nk)
    tiles = math.ceil(nk / block_size)
    g = torch.Generator().manual_seed(block_size)
    last = torch.clamp((torch.arange(tiles) + 1) * block_size, max=nk) - 1
    band = torch.clamp(last + 1 - local, min=0)
    picked = [torch.sort(torch.randperm(max(1, int(s)), generator=g)[: min(9, int(s))]).values if s > 0
              else torch.empty(0, dtype=torch.long) for s in band.tolist()]
    columns = torch.full((1, 2, tiles, 9), -1, dtype=torch.long)
    for t, ids in enumerate(picked):
        columns[:, :, t, : ids.numel()] = ids
    columns = columns.to(DEVICE)
    out = tile_keys_attention(q, k, v, columns, local=local, block_size=block_size, presorted=True)
    assert_matches_reference(out, q, k, v, tile_keys_mask(columns, nk, local, block_size))
    torch.testing.assert_close(out, tile_keys_attention(q, k, v, columns, local=local, block_size=block_size))


@pytest.mark.parametrize("b,hq,hkv,n,d,dtype", SHAPES, ids=SHAPE_IDS)
def test_a_shape(b, hq, hkv, n, d, dtype):
    q, k, v = _qkv(b, hq, hkv, n, d, dtype, seed=n * 7 + d)
    sink, window = 4, max(1, n // 3)
    out = a_shape_attention(q, k, v, sink, window)
    assert_matches_reference(out, q, k, v, a_shape_mask(sink, window, n, device=DEVICE))


@pytest.mark.parametrize("sink,window", [(0, 1), (0, 0), (300, 0), (0, 500), (0, 1 << 20), (17, 129), (128, 128), (1, 2)])
def test_a_shape_edges(sink, window):
    n = 260
    q, k, v = _qkv(1, 2, 1, n, 64, torch.float32, seed=sink + window)
    out = a_shape_attention(q, k, v, sink, window)
    assert_matches_reference(out, q, k, v, a_shape_mask(sink, window, n, device=DEVICE))


@pytest.mark.parametrize("b, hq, hkv, nq, nk, d, splits", [
    (1, 2, 1, 100, 700, 64, 3),  # a chunk after a prefix, splits not at tile multiples of the rows
    (2, 4, 2, 65, 65, 80, 2),  # one-shot: the split holding the diagonal is masked
    (1, 3, 3, 1, 300, 96, 5),  # one query row
    (1, 4, 1, 130, 1000, 128, 40),  # more splits than key tiles of some rows: empty splits
    (1, 6, 2, 70, 500, 64, 4),  # GQA 3: one head per program
    (2, 12, 2, 40, 333, 128, 3),  # GQA 6: two stacked heads per program, three stacks per KV head
])
def test_dense_split_k_matches_reference(b, hq, hkv, nq, nk, d, splits):
    q, k, v = _qkv(b, hq, hkv, nq, d, torch.float32, seed=nq + splits, nk=nk)
    out = dense_attention(q, k, v, splits=splits)
    assert_matches_reference(out, q, k, v, dense_causal_mask(nk, device=DEVICE))
    torch.testing.assert_close(out, dense_attention(q, k, v, splits=1), atol=2e-5, rtol=1e-4)


def test_dense_split_k_takes_strided_inputs():
    """q/k/v whose last dim is not contiguous (a transposed copy) give the same output."""
    q, k, v = _qkv(1, 4, 2, 70, 64, torch.float32, seed=5, nk=300)
    strided = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v)]
    assert strided[0].stride(-1) != 1
    torch.testing.assert_close(dense_attention(*strided, splits=3), dense_attention(q, k, v, splits=3), rtol=0, atol=0)


def test_dense_default_splits_only_for_few_programs():
    from longinfer.ops._checks import AttentionShape
    from longinfer.ops.dense import default_splits

    assert default_splits(AttentionShape(1, 12, 2, 128, 69632, 128)) == 43  # the dense tail of a 4K turn
    assert default_splits(AttentionShape(1, 12, 2, 4096, 69632, 128)) == 1  # a 4K chunk: 768 programs
    assert default_splits(AttentionShape(1, 32, 8, 131072, 131072, 128)) == 1  # a long prefill
    assert default_splits(AttentionShape(1, 12, 2, 128, 1500, 128)) == 1  # too few keys to split
    q, k, v = _qkv(1, 2, 1, 10, 64, torch.float32, seed=0)
    with pytest.raises(ValueError, match="splits must be a positive int"):
        dense_attention(q, k, v, splits=0)
    with pytest.raises(ValueError, match="packed sequences"):
        dense_attention(q, k, v, splits=2, cu_seqlens_q=torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("split_dim", [0, 2])
@pytest.mark.parametrize("head_dim, rows, row0", [(80, 70, 5), (64, 64, 0), (128, 130, 17)])
def test_merge_splits_into_matches_the_torch_merge(split_dim, head_dim, rows, row0):
    """The merge kernel against :func:`merge_key_splits` on partials with empty splits (max -inf),
    rows not a multiple of its block, head_dim below the partials' width, and a strided output.
    float32 both ways, in another order: 1e-6 relative; we allow 1e-5."""
    from longinfer.ops._launch import merge_key_splits, merge_splits_into

    g = torch.Generator().manual_seed(head_dim + rows)
    b, hq, splits, padded, width = 2, 3, 5, 192, 128
    stats = (splits, b, hq, padded) if split_dim == 0 else (b, hq, splits, padded)
    row_max = torch.randn(stats, generator=g) * 4
    row_sum = torch.rand(stats, generator=g) + 0.5
    acc = torch.randn(*stats, width, generator=g) * row_sum[..., None]
    empty = torch.rand(stats, generator=g) < 0.3  # splits that saw no key: (0, -inf, 0)
    empty.select(split_dim, 1).zero_()  # every row keeps one split with keys
    row_max[empty], row_sum[empty], acc[empty] = float("-inf"), 0.0, 0.0
    acc, row_max, row_sum = (t.to(DEVICE) for t in (acc, row_max, row_sum))
    base = torch.full((b, 200, hq, head_dim), 7.0, device=DEVICE)  # [B, N, H, D] viewed as [B, H, N, D]
    out = base.transpose(1, 2)
    merge_splits_into(out, acc, row_max, row_sum, split_dim=split_dim, out_row0=row0, rows=rows)
    want = merge_key_splits(acc, row_max, row_sum, dim=split_dim)[:, :, :rows, :head_dim]
    torch.testing.assert_close(out[:, :, row0:row0 + rows], want, atol=1e-5, rtol=1e-5)
    untouched = torch.ones(200, dtype=torch.bool)
    untouched[row0:row0 + rows] = False
    assert torch.all(out[:, :, untouched] == 7.0)  # rows outside the range are not written
    with pytest.raises(ValueError, match="split_dim must be 0 or 2"):
        merge_splits_into(out, acc, row_max, row_sum, split_dim=1, out_row0=0, rows=rows)
    with pytest.raises(ValueError, match="contiguous float32"):
        merge_splits_into(out, acc.double(), row_max, row_sum, split_dim=split_dim, out_row0=0, rows=rows)


@pytest.mark.parametrize("block_size, nq, nk, dense_from", [
    (64, 200, 200, 128),  # one-shot, the last partial tile and the one before dense
    (32, 70, 333, 320),  # after a cached prefix: only the last (partial) tile
    (16, 130, 130, 0),  # every tile dense: equals dense attention
    (64, 100, 300, 192),  # the boundary inside the queries' first tile's range (never split)
])
@pytest.mark.parametrize("tail_splits, index_heads", [(1, 4), (3, 4), (4, 2)])  # 2: heads stacked per tile
@pytest.mark.parametrize("tail_launch", ["fused", "separate"])
def test_vertical_slash_dense_from_runs_the_last_tiles_dense(block_size, nq, nk, dense_from, tail_splits, index_heads,
                                                             tail_launch):
    q, k, v = _qkv(2, 4, 2, nq, 64, torch.float32, seed=nq + dense_from, nk=nk)
    vertical = torch.tensor([0, 1, 2, 50, 121], device=DEVICE).expand(2, index_heads, 5)
    slash = torch.tensor([0, 1, 2, 3, 70], device=DEVICE).expand(2, index_heads, 5)
    out = vertical_slash_attention(q, k, v, vertical, slash, block_size=block_size, dense_from=dense_from,
                                   tail_splits=tail_splits, tail_launch=tail_launch)
    per_head = [x.repeat_interleave(4 // index_heads, dim=1) for x in (vertical, slash)]
    mask = vertical_slash_mask(*per_head, nk, block_size, dense_from=dense_from)
    assert_matches_reference(out, q, k, v, mask)
    rows = torch.arange(nk - nq, nk, device=DEVICE)
    dense_rows = rows[rows >= dense_from]
    assert torch.equal(mask[:, :, dense_rows], dense_causal_mask(nk, dense_rows, device=DEVICE).expand(2, 4, -1, -1))
    sparse_rows = rows < dense_from  # the rows before keep their sparse output exactly
    plain = vertical_slash_attention(q, k, v, vertical, slash, block_size=block_size)
    torch.testing.assert_close(out[:, :, sparse_rows], plain[:, :, sparse_rows], rtol=0, atol=0)


def test_vertical_slash_dense_from_errors():
    q, k, v = _qkv(1, 2, 1, 100, 64, torch.float32, seed=1)
    idx = torch.zeros(1, 2, 1, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of block_size=64"):
        vertical_slash_attention(q, k, v, idx, idx, dense_from=100)
    with pytest.raises(ValueError, match="tail_splits must be a positive int"):
        vertical_slash_attention(q, k, v, idx, idx, dense_from=64, tail_splits=0)
    with pytest.raises(ValueError, match="tail_launch must be one of"):
        vertical_slash_attention(q, k, v, idx, idx, dense_from=64, tail_launch="later")
    assert default_tail_splits(69632) == 8 and default_tail_splits(131072) == 16 and default_tail_splits(2000) == 1
    assert default_tail_splits(1 << 20) == 32  # capped


def test_queries_after_a_cached_prefix():
    """k/v longer than q: the queries are the last positions, for every pattern."""
    nq, nk = 70, 333
    q, k, v = _qkv(2, 4, 2, nq, 64, torch.float32, seed=11, nk=nk)
    assert_matches_reference(dense_attention(q, k, v), q, k, v, dense_causal_mask(nk, device=DEVICE))
    assert_matches_reference(a_shape_attention(q, k, v, 3, 40), q, k, v, a_shape_mask(3, 40, nk, device=DEVICE))
    vertical = torch.tensor([0, 1, 2, 100, 101, 320], device=DEVICE).expand(2, 4, 6)
    slash = torch.tensor([0, 1, 2, 64, 150], device=DEVICE).expand(2, 4, 5)
    out = vertical_slash_attention(q, k, v, vertical, slash)
    assert_matches_reference(out, q, k, v, vertical_slash_mask(vertical, slash, nk))
    nb = math.ceil(nk / 64)
    diag = torch.arange(nb, device=DEVICE)
    block_index = torch.stack([diag, torch.zeros_like(diag), diag // 2], -1)[None, None].expand(2, 2, nb, 3)
    out = block_sparse_attention(q, k, v, block_index)
    assert_matches_reference(out, q, k, v, block_sparse_mask(block_index, nk))


def test_packed_sequences_match_separate_calls():
    lens = [65, 1, 130]
    cu = torch.tensor([0, 65, 66, 196], dtype=torch.int32, device=DEVICE)
    q, k, v = _qkv(1, 4, 2, sum(lens), 64, torch.float32, seed=3)
    vertical = torch.tensor([0, 3, 60, 129], device=DEVICE).expand(3, 4, 4)
    slash = torch.tensor([0, 1, 70], device=DEVICE).expand(3, 4, 3)
    nb = math.ceil(max(lens) / 64)
    block_index = torch.arange(nb, device=DEVICE)[None, None, :, None].expand(3, 4, nb, 1).clone()
    block_index[..., 0] -= 1
    block_index = torch.cat([block_index, torch.arange(nb, device=DEVICE)[None, None, :, None].expand(3, 4, nb, 1)], -1)
    packed = {
        "dense": dense_attention(q, k, v, cu_seqlens_q=cu),
        "a_shape": a_shape_attention(q, k, v, 2, 50, cu_seqlens_q=cu),
        "vs": vertical_slash_attention(q, k, v, vertical, slash, cu_seqlens_q=cu),
        "bs": block_sparse_attention(q, k, v, block_index, cu_seqlens_q=cu),
    }
    for i, (start, stop) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        qi, ki, vi = (t[:, :, start:stop] for t in (q, k, v))
        n = stop - start
        nbi = math.ceil(n / 64)
        separate = {
            "dense": dense_attention(qi, ki, vi),
            "a_shape": a_shape_attention(qi, ki, vi, 2, 50),
            "vs": vertical_slash_attention(qi, ki, vi, vertical[i : i + 1], slash[i : i + 1]),
            "bs": block_sparse_attention(qi, ki, vi, block_index[i : i + 1, :, :nbi]),
        }
        for name, out in separate.items():
            torch.testing.assert_close(packed[name][:, :, start:stop], out, rtol=1e-5, atol=1e-5, msg=name)


def test_sm_scale_is_used():
    q, k, v = _qkv(1, 2, 2, 100, 64, torch.float32, seed=9)
    out = dense_attention(q, k, v, sm_scale=0.3)
    ref = masked_attention(q, k, v, dense_causal_mask(100, device=DEVICE), sm_scale=0.3)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.gpu
def test_gpu_one_compiled_variant_per_kernel_and_length_class():
    """Cold start: a new prompt length recompiles the attention kernels only in a new class of
    divisibility by 16 of its query and key lengths (session 13: every new length could recompile,
    1.5-2.3 s on a fresh H200; the sparse kernel keeps q_len / k_len specialized, which its code
    depends on). After one shape per class, one-shot and a chunk after a prefix, with a split
    dense tail and split-K dense, no length compiles anything new."""
    from longinfer.ops import _kernel

    names = ("_sparse_attention_fwd", "_dense_split_fwd", "_merge_splits_fwd")
    device = torch.cuda.current_device()

    def compiled() -> dict[str, int]:  # variants compiled so far in this process (other tests add theirs)
        return {name: len(getattr(_kernel, name).device_caches[device][0]) for name in names}

    def run(nq: int, nk: int) -> None:
        q, k, v = _qkv(1, 4, 2, nq, nk=nk, d=128, dtype=torch.bfloat16, seed=nk)
        vertical = torch.arange(0, nk, 97, device=DEVICE)[None, None].expand(1, 4, -1)
        slash = torch.tensor([0, 1, 64, 500, 1000], device=DEVICE)[None, None].expand(1, 4, -1)
        vertical_slash_attention(q, k, v, vertical, slash, dense_from=(nk - 128) // 64 * 64, tail_splits=4)
        dense_attention(q, k, v, splits=4)

    for nq, nk in ((2048, 4096), (2047, 4095), (512, 4111), (511, 4096)):  # each class once
        run(nq, nk)
    before = compiled()
    for nq, nk in ((2001, 5001), (1024, 6144), (4000, 4000), (496, 4111), (333, 7000)):
        run(nq, nk)
    added = {name: count - before[name] for name, count in compiled().items()}
    assert all(count == 0 for count in added.values()), added
