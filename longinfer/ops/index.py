"""Plan step of the sparse kernels: raw indices -> the compact structures the kernel walks.

The conversion runs on the index's device with a handful of batched torch ops (sort, cumsum,
scatter, searchsorted): no Python loop over heads or blocks and no host synchronization, so it
can be built once and reused by every layer or call that shares the index.

Vertical-slash. Slashes (diagonal offsets) are sorted and de-duplicated; offsets less than
``block_size`` apart are merged into groups ``[s_lo, s_hi]``. For the query tile starting at
``t`` a group covers the contiguous key range ``[t - s_hi, t + block_size - 1 - s_lo]``: the same
groups serve every tile, so the plan is ``O(S)`` per head whatever ``N`` is. Verticals are sorted
and de-duplicated; per tile, the kernel reads the prefix of verticals before the tile's end.

For the kernel the groups' key ranges are cut into chunks of ``chunk`` keys, listed once per head
as offsets from a tile's start (``[t + rel_start, t + rel_end)``, tile-independent), so the
kernel walks all of a tile's slash keys in one flat loop whose loads pipeline; a tile uses the
prefix of chunks of the groups that reach it (``chunk_count``). Whether a vertical lies inside a
group's range depends only on ``d = t - column``: ``covered`` holds that answer for every ``d``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton

from longinfer.ops._checks import interpreter_enabled
from longinfer.ops._index_kernel import _groups_kernel, _kept_kernel, _tables_kernel


@dataclass(frozen=True)
class VerticalSlashIndex:
    """Kernel-ready vertical-slash index for keys ``0..k_len-1`` and tiles of ``block_size``.

    Attributes:
        columns: ``[B, H, V]`` int32 sorted unique verticals, padded with ``k_len``.
        column_count: ``[B, H, T]`` int32, number of verticals before tile ``t``'s end (``T`` tiles).
        group_lo, group_hi: ``[B, H, S]`` int32 first/last slash offset of each slash group, sorted;
            only the first ``group_count`` entries are meaningful.
        group_count: ``[B, H]`` int32 number of slash groups.
        chunk_start, chunk_end: ``[B, H, W]`` int32, chunk ``i`` of the groups' ranges covers keys
            ``[t + chunk_start[i], t + chunk_end[i])`` of the tile starting at ``t`` (clipped to
            ``[0, tile end)``); at most ``chunk`` keys. Entries past the last chunk are unspecified.
        chunk_count: ``[B, H, T]`` int32, how many leading chunks tile ``t`` walks (those of the
            groups with ``s_lo < t + block_size``).
        covered: ``[B, H, k_len + block_size]`` uint8, entry ``d + block_size - 1`` is 1 iff a
            group's range holds key ``t - d`` for every tile start ``t`` (``s_lo - block_size < d <= s_hi``).
        k_len: key length the index was built for (max over sequences when packed).
        block_size: query tile size the groups were merged for.
        chunk: keys per chunk: the kernel's key tile for this index.
    """

    columns: torch.Tensor
    column_count: torch.Tensor
    group_lo: torch.Tensor
    group_hi: torch.Tensor
    group_count: torch.Tensor
    chunk_start: torch.Tensor
    chunk_end: torch.Tensor
    chunk_count: torch.Tensor
    covered: torch.Tensor
    k_len: int
    block_size: int
    chunk: int

    @property
    def num_heads(self) -> int:
        return self.columns.shape[1]


def chunk_size(block_size: int) -> int:
    """Keys per slash chunk (the kernel's key tile) for query tiles of ``block_size``: 64, or 32
    for tiles of 16 and 32 rows, whose single-slash ranges are that short."""
    return 64 if block_size >= 64 else 32


@dataclass(frozen=True)
class BlockSparseIndex:
    """Kernel-ready block-sparse index.

    Attributes:
        block_ids: ``[B, H, T, K]`` int32, per query block the valid ids sorted ascending, then
            ``-1`` for repeats and out-of-range ids.
        block_count: ``[B, H, T]`` int32, how many leading ids of tile ``t`` are ``<= t`` (causal).
        block_size: query and key block size.
    """

    block_ids: torch.Tensor
    block_count: torch.Tensor
    block_size: int

    @property
    def num_heads(self) -> int:
        return self.block_ids.shape[1]


def _sorted_unique(values: torch.Tensor, valid: torch.Tensor, fill: int, presorted: bool = False) -> torch.Tensor:
    """Sort the last dim with invalid entries and repeats replaced by ``fill`` (moved to the end).

    ``fill`` must be larger than every valid value. Returns int64 of the same shape. With
    ``presorted`` (valid entries already ascending, distinct and before every invalid one) only
    the invalid entries are replaced: no sort.
    """
    x = values.long().masked_fill(~valid, fill)
    if presorted:
        return x
    x = x.sort(-1).values
    repeat = torch.nn.functional.pad(x[..., 1:] == x[..., :-1], (1, 0), value=False)
    return x.masked_fill_(repeat, fill).sort(-1).values


def _slash_groups(
    slash: torch.Tensor, k_len: int, block_size: int, limit: torch.Tensor | int, presorted: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge sorted slash offsets closer than ``block_size + 1`` into groups.

    Two slashes ``a < b`` give key ranges that touch or overlap iff ``b - a <= block_size``.
    Offsets ``>= limit`` (``k_len``, or ``[B, 1, 1]`` per-sequence lengths) are dropped.
    Returns ``(lo, hi, count)``: ``[B, H, S]`` int32 each padded with ``k_len``, and ``[B, H]``.
    ``presorted``: see :func:`build_vertical_slash_index`; presorted CUDA offsets of one sequence
    (``limit == k_len``) are merged in one Triton launch (:func:`_slash_groups_triton`).
    """
    if presorted and slash.is_cuda and isinstance(limit, int) and limit == k_len:
        return _slash_groups_triton(slash, k_len, block_size)
    s = _sorted_unique(slash, (slash >= 0) & (slash < limit), k_len, presorted)  # [B, H, S]
    num = s.shape[-1]
    valid = s < k_len  # valid entries come first (the fill k_len sorts last)
    apart = s[..., 1:] - s[..., :-1] > block_size  # [B, H, S - 1]: a group ends between i and i + 1
    pad = torch.nn.functional.pad
    is_first = valid & pad(apart, (1, 0), value=True)
    is_last = valid & pad(apart | ~valid[..., 1:], (0, 1), value=True)
    group_id = is_first.cumsum(-1) - 1  # id of the group each slash belongs to
    lo = torch.full(s.shape[:-1] + (num + 1,), k_len, dtype=torch.long, device=s.device)
    hi = lo.clone()
    lo.scatter_(-1, group_id.masked_fill(~is_first, num), s)  # non-boundary slashes go to the dump slot
    hi.scatter_(-1, group_id.masked_fill(~is_last, num), s)
    return lo[..., :num].int(), hi[..., :num].int(), is_first.sum(-1, dtype=torch.int32)


def _slash_groups_triton(slash: torch.Tensor, k_len: int, block_size: int) -> tuple[torch.Tensor, ...]:
    """:func:`_slash_groups` of presorted offsets in one launch of :func:`_groups_kernel`; same values."""
    bsz, heads, num = slash.shape
    slash = slash.long().contiguous()
    lo = torch.empty(bsz, heads, num, device=slash.device, dtype=torch.int32)
    hi = torch.empty_like(lo)
    count = torch.empty(bsz, heads, device=slash.device, dtype=torch.int32)
    if num:
        block = 64 if interpreter_enabled() else 1024
        _groups_kernel[(bsz * heads,)](slash, lo, hi, count, k_len, num, BLOCK_SIZE=block_size, BLOCK=block,
                                       num_warps=4)
    else:
        count.zero_()
    return lo, hi, count


def build_vertical_slash_index(
    vertical: torch.Tensor,
    slash: torch.Tensor,
    k_len: int,
    block_size: int = 64,
    seqlens_k: torch.Tensor | None = None,
    *,
    presorted: bool = False,
    chunk: int | None = None,
) -> VerticalSlashIndex:
    """Convert raw ``vertical [B, H, V]`` / ``slash [B, H, S]`` into a :class:`VerticalSlashIndex`.

    Args:
        vertical: integer key positions; out-of-range and repeated entries are dropped.
        slash: integer diagonal offsets (0 = main diagonal); likewise cleaned.
        k_len: number of key positions (the longest sequence when packed).
        block_size: query tile size of the kernel that will consume the index.
        seqlens_k: optional ``[B]`` per-sequence key lengths (packed sequences); default ``k_len``.
        presorted: the caller guarantees that in each row of ``vertical`` and ``slash`` the valid
            entries (in ``[0, k_len)``) are ascending and distinct and come before every invalid
            one, as the estimators' ``-1``-padded selections are; skips the sorts. Wrong input
            then gives a wrong index.
        chunk: keys per slash chunk, the kernel's key tile (32 or 64); default :func:`chunk_size`.
            32 with 64-row tiles spills fewer registers on sm_90 (``benchmarks/kernel_resources.py``),
            at twice the iterations; ``benchmarks/turn_kernels.py`` times both.

    Memory: ``O(B * H * (V + S + k_len / block_size))`` integers, plus the ``covered`` table
    (``B * H * (k_len + block_size)`` bytes); on CUDA the tables are one Triton launch
    (:mod:`longinfer.ops._index_kernel`), elsewhere torch ops with a few ``[B, H, k_len + block_size]``
    int32 temporaries.
    """
    columns = _sorted_unique(vertical, (vertical >= 0) & (vertical < k_len), k_len, presorted)  # per-sequence ends below
    limit = k_len if seqlens_k is None else seqlens_k.to(slash.device).long()[:, None, None]
    lo, hi, count = _slash_groups(slash, k_len, block_size, limit, presorted)
    if lo.shape[-1] == 0:  # no slash at all: one padding group (never counted) keeps the gathers valid
        lo = hi = torch.full((*lo.shape[:-1], 1), k_len, dtype=torch.int32, device=lo.device)
    if chunk is None:
        chunk = chunk_size(block_size)
    elif chunk not in (32, 64):
        raise ValueError(f"chunk must be 32 or 64 keys, got {chunk!r}")
    columns = columns.int().contiguous()
    lo, hi, count = lo.contiguous(), hi.contiguous(), count.contiguous()
    if seqlens_k is None and columns.is_cuda:  # (the CPU interpreter would take seconds per index)
        tables = _tables_triton(lo, hi, count, columns, k_len, block_size, chunk)
    else:
        tables = (*_slash_chunks(lo, hi, count, k_len, block_size, chunk), _column_counts(columns, k_len, block_size,
                                                                                          seqlens_k),
                  _covered_offsets(lo, hi, count, k_len, block_size))
    chunk_start, chunk_end, chunk_count, column_count, covered = tables
    return VerticalSlashIndex(
        columns=columns,
        column_count=column_count,
        group_lo=lo,
        group_hi=hi,
        group_count=count,
        chunk_start=chunk_start,
        chunk_end=chunk_end,
        chunk_count=chunk_count,
        covered=covered,
        k_len=k_len,
        block_size=block_size,
        chunk=chunk,
    )


def _column_counts(columns: torch.Tensor, k_len: int, block_size: int, seqlens_k: torch.Tensor | None) -> torch.Tensor:
    """``[B, H, T]`` int32: the sorted ``columns`` before each tile's end (its sequence's end when packed)."""
    num_tiles = math.ceil(k_len / block_size)
    tile_end = torch.arange(1, num_tiles + 1, device=columns.device) * block_size  # [T]
    if seqlens_k is None:
        tile_end = tile_end.clamp(max=k_len).expand(*columns.shape[:2], num_tiles)
    else:
        tile_end = torch.minimum(tile_end[None, :], seqlens_k.to(columns.device).long()[:, None])
        tile_end = tile_end[:, None, :].expand(*columns.shape[:2], num_tiles)
    # Each sequence only lists columns before its own end, so a padded column never counts.
    return torch.searchsorted(columns, tile_end.int().contiguous(), right=False, out_int32=True)


def _chunk_width(k_len: int, num_groups: int, block_size: int, chunk: int) -> int:
    """Entries of the chunk table, enough for any groups: group ``g`` has
    ``ceil((w_g + block_size) / chunk) <= w_g / chunk + ceil(block_size / chunk) + 1`` chunks
    (``w_g = hi_g - lo_g``), and the disjoint groups have ``sum(w_g) < k_len``."""
    return math.ceil(k_len / chunk) + num_groups * (math.ceil(block_size / chunk) + 1)


def _chunks_per_group(lo: torch.Tensor, hi: torch.Tensor, count: torch.Tensor, block_size: int,
                      chunk: int) -> torch.Tensor:
    """``[B, H, S]``: group ``g`` covers ``hi_g - lo_g + block_size`` keys per tile, so
    ``ceil((hi_g - lo_g + block_size) / chunk)`` chunks; 0 for padding groups (``g >= count``)."""
    valid = torch.arange(lo.shape[-1], device=lo.device) < count[..., None]
    return torch.where(valid, (hi - lo + (block_size + chunk - 1)) // chunk, 0)


def _tables_triton(lo: torch.Tensor, hi: torch.Tensor, count: torch.Tensor, columns: torch.Tensor, k_len: int,
                   block_size: int, chunk: int) -> tuple[torch.Tensor, ...]:
    """The tables of :func:`_slash_chunks`, :func:`_column_counts` and :func:`_covered_offsets` in one
    launch (:mod:`longinfer.ops._index_kernel`); same layout and values."""
    bsz, heads, num_groups = lo.shape
    num_tiles = math.ceil(k_len / block_size)
    width = _chunk_width(k_len, num_groups, block_size, chunk)
    size = k_len + block_size
    ends = _chunks_per_group(lo, hi, count, block_size, chunk).cumsum(-1, dtype=torch.int32)
    new = functools.partial(torch.empty, device=lo.device, dtype=torch.int32)
    chunk_start, chunk_end = new(bsz, heads, width), new(bsz, heads, width)
    chunk_count, column_count = new(bsz, heads, num_tiles), new(bsz, heads, num_tiles)
    covered = torch.empty(bsz, heads, size, device=lo.device, dtype=torch.uint8)
    block = 256 if interpreter_enabled() else 1024
    steps = max(num_groups, columns.shape[-1], 1).bit_length() + 1
    _tables_kernel[(bsz * heads, triton.cdiv(max(size, width, num_tiles), block))](
        lo, hi, count, ends, columns, covered, chunk_start, chunk_end, chunk_count, column_count,
        k_len, num_groups, columns.shape[-1], width, num_tiles,
        BLOCK_SIZE=block_size, CHUNK=chunk, STEPS=steps, BLOCK=block, num_warps=4)
    return chunk_start, chunk_end, chunk_count, column_count, covered


def _slash_chunks(lo: torch.Tensor, hi: torch.Tensor, count: torch.Tensor, k_len: int, block_size: int,
                  chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The groups' key ranges cut into chunks: ``(chunk_start, chunk_end [B, H, W], chunk_count [B, H, T])``.

    Group ``g`` covers ``[t - hi_g, t + block_size - lo_g)``: ``ceil((hi_g - lo_g + block_size) / chunk)``
    chunks; ``W`` (:func:`_chunk_width`) bounds the total without a host sync.
    """
    lo, hi = lo.long(), hi.long()
    num = lo.shape[-1]
    per_group = _chunks_per_group(lo, hi, count, block_size, chunk)
    ends = per_group.cumsum(-1)  # [B, H, S]: chunks of groups 0..g
    width = _chunk_width(k_len, num, block_size, chunk)
    chunk_ids = torch.arange(width, device=lo.device).expand(*lo.shape[:-1], width).contiguous()
    group = torch.searchsorted(ends, chunk_ids, right=True).clamp_(max=num - 1)
    first = (ends - per_group).gather(-1, group)
    start = (chunk_ids - first) * chunk - hi.gather(-1, group)
    end = torch.minimum(start + chunk, block_size - lo.gather(-1, group))
    # Tile t walks the chunks of the groups with lo < t + block_size (lo ascending, padding k_len).
    reach = (torch.arange(1, math.ceil(k_len / block_size) + 1, device=lo.device) * block_size).clamp(max=k_len)
    reached = torch.searchsorted(lo.contiguous(), reach.expand(*lo.shape[:-1], reach.numel()).contiguous())
    chunk_count = torch.nn.functional.pad(ends, (1, 0)).gather(-1, reached)
    return start.int().contiguous(), end.int().contiguous(), chunk_count.int().contiguous()


def _covered_offsets(lo: torch.Tensor, hi: torch.Tensor, count: torch.Tensor, k_len: int, block_size: int) -> torch.Tensor:
    """``[B, H, k_len + block_size]`` uint8: entry ``p = d + block_size - 1`` is 1 iff some group has
    ``lo - block_size < d <= hi``, i.e. ``lo <= p <= hi + block_size - 1``.

    The groups' intervals ``[lo, hi + block_size - 1]`` are sorted and disjoint, so ``p`` lies in
    one iff more of them start at or before ``p`` than end before it: two binary searches per
    entry, int32 throughout (no scan over the row; transients ``3 * B * H * (k_len + block_size)``
    int32).
    """
    size = k_len + block_size
    valid = torch.arange(lo.shape[-1], device=lo.device) < count[..., None]
    starts = torch.where(valid, lo, size).int().contiguous()  # padding sorts last and contains nothing
    ends = torch.where(valid, hi + (block_size - 1), size).int().contiguous()
    entries = torch.arange(size, device=lo.device, dtype=torch.int32).expand(*lo.shape[:-1], size).contiguous()
    started = torch.searchsorted(starts, entries, right=True, out_int32=True)
    ended = torch.searchsorted(ends, entries, right=False, out_int32=True)
    return (started > ended).to(torch.uint8)


def build_block_sparse_index(block_index: torch.Tensor, k_len: int, block_size: int = 64) -> BlockSparseIndex:
    """Sort and de-duplicate ``block_index [B, H, T, K]``; ids outside ``[0, ceil(k_len/bs))`` -> -1.

    Memory: a copy of ``block_index`` as int32.
    """
    num_blocks = math.ceil(k_len / block_size)
    ids = _sorted_unique(block_index, (block_index >= 0) & (block_index < num_blocks), num_blocks)
    tile = torch.arange(ids.shape[-2], device=ids.device)[:, None]
    count = (ids <= tile).sum(-1)  # the fill value num_blocks is above every tile
    ids = torch.where(ids >= num_blocks, -1, ids)
    return BlockSparseIndex(block_ids=ids.int().contiguous(), block_count=count.int().contiguous(), block_size=block_size)


@dataclass(frozen=True)
class TileKeysIndex:
    """Kernel-ready tile-keys index.

    Attributes:
        columns: ``[B, H, T, K]`` int32 (the last dim contiguous), per query tile the key ids before its
            band, sorted ascending; slots past the tile's count are never read (``-1`` when built here,
            unspecified from the Triton estimate).
        column_count: ``[B, H, T]`` int32, how many leading ids of tile ``t`` are valid.
        local: the band: the ``local`` most recent keys of each tile's last row.
        block_size: query tile size.
    """

    columns: torch.Tensor
    column_count: torch.Tensor
    local: int
    block_size: int

    @property
    def num_heads(self) -> int:
        return self.columns.shape[1]


def tile_last_rows(tiles: torch.Tensor, block_size: int, k_len: int) -> torch.Tensor:
    """The last position of each query tile ``tiles [T]`` (aligned to ``block_size``, the last cut at ``k_len``)."""
    return torch.clamp((tiles + 1) * block_size, max=k_len) - 1


def tile_band_starts(num_tiles: int, block_size: int, k_len: int, local: int, device: torch.device | str
                     ) -> torch.Tensor:
    """First key ``[T]`` of each query tile's band: ``local`` keys back from the tile's last row."""
    last = tile_last_rows(torch.arange(num_tiles, device=device), block_size, k_len)
    return torch.clamp(last + 1 - local, min=0)


def build_tile_keys_index(columns: torch.Tensor, k_len: int, local: int, block_size: int = 64, *,
                          presorted: bool = False) -> TileKeysIndex:
    """Sort and de-duplicate ``columns [B, H, ceil(k_len / bs), K]``; ids that are negative, past the
    sequence, or inside their tile's band (which the kernel attends as a range) are dropped. With
    ``presorted`` (each tile's ids ascending, distinct and outside its band, then ``-1``: the
    estimator's format) no sort.

    Memory: a copy of ``columns`` as int32.
    """
    band_start = tile_band_starts(columns.shape[2], block_size, k_len, local, columns.device)[:, None]  # [T, 1]
    ids = _sorted_unique(columns, (columns >= 0) & (columns < band_start), k_len, presorted=presorted)
    count = (ids < k_len).sum(-1)
    ids = torch.where(ids >= k_len, -1, ids)
    return TileKeysIndex(columns=ids.int().contiguous(), column_count=count.int().contiguous(), local=local,
                         block_size=block_size)


def vertical_slash_kept(index: VerticalSlashIndex, rows: torch.Tensor) -> torch.Tensor:
    """Keys the vertical-slash kernel computes for query rows ``rows [R]`` (absolute positions, ascending).

    Row ``i`` of the tile starting at ``t = i - i % block_size`` gets the verticals ``<= i`` and, per
    slash group ``[lo, hi]``, the keys ``[t - hi, t + block_size - 1 - lo]`` up to ``i``; groups are
    more than ``block_size`` apart, so their key ranges are disjoint and only verticals inside them
    are counted twice. Equals ``reference.vertical_slash_mask(...)[..., rows, :].sum(-1)`` for the
    raw index this one was built from (causal, one sequence).

    Returns ``[B, H, R]`` int64. Memory: ``O(B * H * R * S)`` integers (``S`` slash groups) with
    torch ops (CPU tensors); on CUDA one Triton launch (:func:`_kept_triton`), no temporaries.
    """
    if index.columns.is_cuda:
        return _kept_triton(index, rows)
    return _kept_torch(index, rows)


def _kept_triton(index: VerticalSlashIndex, rows: torch.Tensor) -> torch.Tensor:
    """:func:`vertical_slash_kept` in one launch of :func:`longinfer.ops._index_kernel._kept_kernel`."""
    bsz, heads, num_cols = index.columns.shape
    num_groups = index.group_lo.shape[-1]
    rows = rows.to(index.columns.device).contiguous()
    kept = torch.empty(bsz, heads, rows.numel(), device=rows.device, dtype=torch.long)
    block = 64 if interpreter_enabled() else 1024
    steps = max(num_cols, 1).bit_length() + 1
    _kept_kernel[(bsz * heads, rows.numel())](
        index.group_lo, index.group_hi, index.group_count, index.columns, rows, kept, num_groups, num_cols,
        rows.numel(), BLOCK_SIZE=index.block_size, STEPS=steps, BLOCK=block, num_warps=4)
    return kept


def _kept_torch(index: VerticalSlashIndex, rows: torch.Tensor) -> torch.Tensor:
    """:func:`vertical_slash_kept` with torch ops over ``[B, H, R, S]`` temporaries."""
    bs = index.block_size
    i = rows.to(index.columns.device).long()[:, None]  # [R, 1]
    tile_start = i - i % bs
    columns = index.columns.long()  # [B, H, V], sorted, padded with k_len
    b, h = columns.shape[:2]

    def columns_below(bound: torch.Tensor) -> torch.Tensor:  # verticals < bound, bound [B, H, R, S']
        return torch.searchsorted(columns, bound.flatten(2).contiguous(), right=False).view(bound.shape)

    lo = index.group_lo.long()[:, :, None, :]  # [B, H, 1, S]
    first = (tile_start - index.group_hi.long()[:, :, None, :]).clamp(min=0)  # [B, H, R, S]
    last = torch.minimum(tile_start + bs - 1 - lo, i)
    padding = torch.arange(lo.shape[-1], device=lo.device) >= index.group_count[:, :, None, None]
    last = last.masked_fill_(padding, -1)  # padded groups: empty ranges
    width = (last - first + 1).clamp(min=0)
    doubled = (columns_below(last + 1) - columns_below(first)).clamp(min=0)
    own = columns_below((i + 1).expand(b, h, -1, 1)).squeeze(-1)  # [B, H, R]
    return own + (width - doubled).sum(-1)
