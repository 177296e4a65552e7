"""One Triton launch for the per-tile tables of a vertical-slash index (see :mod:`longinfer.ops.index`).

Given each head's slash groups (``lo``, ``hi``, ``count``), the prefix counts of their key chunks
(``ends``) and the sorted columns, :func:`_tables_kernel` fills, by binary searches that every
entry runs on its own:

- ``covered[p]``: some group has ``lo <= p <= hi + block_size - 1`` (the groups' intervals are
  sorted and disjoint, so: more of them start at or before ``p`` than end before it);
- ``chunk_start[c], chunk_end[c]``: the group holding chunk ``c`` is the number of groups whose
  chunks end at or before ``c``; its range ``[t - hi, t + block_size - lo)`` cut into chunks;
- ``chunk_count[t]``: the chunks of the groups with ``lo < min(t + block_size, k_len)``;
- ``column_count[t]``: the columns before ``min(t + block_size, k_len)``.

The torch path (:func:`longinfer.ops.index._slash_chunks`, ``_covered_offsets``) computes the same
tables in about 45 small ops; this is one launch (a patched model builds an index per layer and
call, so small ops add up: ~2-3 us of GPU time each under a CUDA graph, ~10 us of host time each
without). Grid ``(B * H, ceil(max(k_len + block_size, W, T) / BLOCK))``; every index tensor is
contiguous ``[B, H, ...]``.

:func:`_groups_kernel` merges each head's presorted slash offsets into groups (the torch path,
:func:`longinfer.ops.index._slash_groups`, takes ~25 ops). :func:`_kept_kernel` counts, for a few
query rows, the keys the vertical-slash kernel computes (:func:`longinfer.ops.index.vertical_slash_kept`,
the patched model's density statistic): one launch instead of ~28 torch ops over ``[B, H, R, S]``
temporaries.

Arguments that follow the prompt length are not specialized (``do_not_specialize``): one compiled
variant serves every length, instead of a new compile whenever a length's divisibility by 16 changes.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _count_before(SEQ, n, values, STEPS: tl.constexpr, INCLUSIVE: tl.constexpr, BLOCK: tl.constexpr):
    """How many of the ascending ``SEQ[0:n]`` are ``<= values [BLOCK]`` (``INCLUSIVE``) or ``< values``."""
    lo = tl.zeros([BLOCK], dtype=tl.int32)
    hi = lo + n
    # a loop, not unrolled: each step depends on the last one's load, so unrolling gains nothing, and
    # unrolled (5 searches x 15 steps) it made the tables kernel the slowest of the index to compile
    for _ in range(STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        x = tl.load(SEQ + mid, mask=active, other=0)
        if INCLUSIVE:
            go_right = active & (x <= values)
        else:
            go_right = active & (x < values)
        lo = tl.where(go_right, mid + 1, lo)
        hi = tl.where(active & ~go_right, mid, hi)
    return lo


@triton.jit(do_not_specialize=["k_len", "width", "num_tiles"])
def _tables_kernel(
    LO, HI, COUNT, ENDS, COLS, COVERED, CHUNK_START, CHUNK_END, CHUNK_COUNT, COLUMN_COUNT,
    k_len, num_groups, num_cols, width, num_tiles,
    BLOCK_SIZE: tl.constexpr, CHUNK: tl.constexpr, STEPS: tl.constexpr, BLOCK: tl.constexpr,
):
    head = tl.program_id(0).to(tl.int64)
    entries = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    lo_base, hi_base, ends_base = LO + head * num_groups, HI + head * num_groups, ENDS + head * num_groups
    count = tl.load(COUNT + head)

    size = k_len + BLOCK_SIZE
    started = _count_before(lo_base, count, entries, STEPS, True, BLOCK)
    ended = _count_before(hi_base, count, entries - (BLOCK_SIZE - 1), STEPS, False, BLOCK)
    tl.store(COVERED + head * size + entries, (started > ended).to(tl.uint8), mask=entries < size)

    in_table = entries < width
    group = tl.minimum(_count_before(ends_base, count, entries, STEPS, True, BLOCK), tl.maximum(count - 1, 0))
    g_lo = tl.load(lo_base + group, mask=in_table, other=0)
    g_hi = tl.load(hi_base + group, mask=in_table, other=0)
    first = tl.load(ends_base + group, mask=in_table, other=0) - (g_hi - g_lo + BLOCK_SIZE + CHUNK - 1) // CHUNK
    start = (entries - first) * CHUNK - g_hi
    tl.store(CHUNK_START + head * width + entries, start, mask=in_table)
    tl.store(CHUNK_END + head * width + entries, tl.minimum(start + CHUNK, BLOCK_SIZE - g_lo), mask=in_table)

    is_tile = entries < num_tiles
    tile_end = tl.minimum((entries + 1) * BLOCK_SIZE, k_len)
    reached = _count_before(lo_base, count, tile_end, STEPS, False, BLOCK)
    walked = tl.load(ends_base + reached - 1, mask=is_tile & (reached > 0), other=0)
    tl.store(CHUNK_COUNT + head * num_tiles + entries, walked, mask=is_tile)
    columns = _count_before(COLS + head * num_cols, num_cols, tile_end, STEPS, False, BLOCK)
    tl.store(COLUMN_COUNT + head * num_tiles + entries, columns, mask=is_tile)


@triton.jit
def _kept_kernel(
    LO, HI, COUNT, COLS, ROWS, KEPT, num_groups, num_cols, num_rows,
    BLOCK_SIZE: tl.constexpr, STEPS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Keys computed for query row ``ROWS[r]`` of head ``h``: grid ``(B * H, R)``, ``KEPT [B, H, R]`` int64.

    Row ``i`` (tile start ``t``) gets the columns ``<= i`` and, per slash group ``[lo, hi]``, the
    keys ``[max(t - hi, 0), min(t + BLOCK_SIZE - 1 - lo, i)]``; a column inside such a range is
    counted once (the ranges are disjoint).
    """
    head = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1)
    row = tl.load(ROWS + r).to(tl.int32)
    tile_start = row - row % BLOCK_SIZE
    count = tl.load(COUNT + head)
    lo_base, hi_base, cols = LO + head * num_groups, HI + head * num_groups, COLS + head * num_cols
    offs = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=tl.int32)
    for g0 in range(0, count, BLOCK):
        valid = g0 + offs < count
        group_lo = tl.load(lo_base + g0 + offs, mask=valid, other=0)
        group_hi = tl.load(hi_base + g0 + offs, mask=valid, other=0)
        first = tl.maximum(tile_start - group_hi, 0)
        last = tl.where(valid, tl.minimum(tile_start + BLOCK_SIZE - 1 - group_lo, row), -1)
        width = tl.maximum(last - first + 1, 0)
        doubled = (_count_before(cols, num_cols, last + 1, STEPS, False, BLOCK)
                   - _count_before(cols, num_cols, first, STEPS, False, BLOCK))
        total += tl.where(width > 0, width - tl.maximum(doubled, 0), 0)
    own = tl.max(_count_before(cols, num_cols, tl.zeros([BLOCK], dtype=tl.int32) + row + 1, STEPS, False, BLOCK), 0)
    tl.store(KEPT + head * num_rows + r, (tl.sum(total, 0) + own).to(tl.int64))


@triton.jit(do_not_specialize=["k_len"])
def _groups_kernel(SLASH, LO, HI, COUNT, k_len, num, BLOCK_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    """Slash groups of one head from presorted offsets: grid ``(B * H,)``.

    ``SLASH [B, H, S]`` int64: the valid offsets (in ``[0, k_len)``) ascending and distinct, before
    every invalid one. Offsets at most ``BLOCK_SIZE`` apart share a group. Writes ``LO, HI [B, H, S]``
    int32 (each group's first and last offset, then ``k_len``) and ``COUNT [B, H]`` int32. The
    offsets are read in blocks of ``BLOCK`` with the group count carried between them.
    """
    head = tl.program_id(0).to(tl.int64)
    base = SLASH + head * num
    offs = tl.arange(0, BLOCK)
    groups = tl.zeros([], dtype=tl.int32)
    for start in range(0, num, BLOCK):
        idx = start + offs
        s = tl.load(base + idx, mask=idx < num, other=-1)
        valid = (s >= 0) & (s < k_len)
        prev = tl.load(base + idx - 1, mask=(idx > 0) & (idx < num), other=-1)  # valid whenever s is
        nxt = tl.load(base + idx + 1, mask=idx + 1 < num, other=-1)
        next_valid = (nxt >= 0) & (nxt < k_len)
        is_first = valid & ((idx == 0) | (s - prev > BLOCK_SIZE))
        is_last = valid & (~next_valid | (nxt - s > BLOCK_SIZE))
        group = groups + tl.cumsum(is_first.to(tl.int32), 0) - 1
        tl.store(LO + head * num + group, s.to(tl.int32), mask=is_first)
        tl.store(HI + head * num + group, s.to(tl.int32), mask=is_last)
        groups += tl.sum(is_first.to(tl.int32), 0)
    for start in range(0, num, BLOCK):  # padding after the groups (slots no group wrote)
        idx = start + offs
        pad = (idx >= groups) & (idx < num)
        tl.store(LO + head * num + idx, tl.zeros([BLOCK], dtype=tl.int32) + k_len, mask=pad)
        tl.store(HI + head * num + idx, tl.zeros([BLOCK], dtype=tl.int32) + k_len, mask=pad)
    tl.store(COUNT + head, groups)
