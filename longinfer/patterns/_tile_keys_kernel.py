"""Triton kernels of the tile-keys estimate: each query tile's keys above a threshold, compacted in place.

:func:`select_tile_keys` computes what the torch path of
:func:`longinfer.patterns.tile_keys.estimate_tile_keys` computes, in two passes over the keys:

1. the base-2 log-sum-exp of each of a tile's pooled queries (one or a few) over the keys up to the
   tile's last row (:func:`longinfer.patterns._estimate_kernel.row_logsumexp2`, the vertical-slash estimate's
   pass 1);
2. :func:`_select_kernel`: one program per (query head, block of tiles) streams the keys before the
   tiles' bands, keeps those whose score under one of the tile's pooled queries reaches that query's
   ``lse + log2(threshold / Nk)`` (and the sinks), and writes their ids at each tile's running count (a
   prefix sum over the kept keys of the key tile): the ids come out ascending with no sort and no N x N
   buffer. With :data:`KEYS_PER_SPLIT` the keys are split over programs instead: a counting pass first, then
   each split writes its ids after the earlier splits'.

The cap: a (head, tile) keeping more than ``max_keys`` raises its threshold by factors of 2 (the first of
``threshold * 2**j``, ``j = 1..levels``, that keeps at most ``max_keys``; :func:`cap_levels`). Only the tiles
where some head is over the cap are scanned again: once counting every level at once (the same kernel with
``LEVELS > 0``), once selecting at each head's level. The ids are written straight into the kernel's index
format (:class:`longinfer.ops.index.TileKeysIndex`): no copy, no sort, no fill.

Work per query head: two passes of each tile's pooled queries over its causal keys (``T = Nk / block_size``
tiles: about ``2 * queries / block_size`` of causal attention's ``QK^T`` multiply-adds), plus one store per
kept key; capped tiles twice more.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from longinfer.ops.index import tile_last_rows
from longinfer.patterns._estimate_kernel import LOG2_E, _tile_scores, row_logsumexp2


# Keys per program of pass 2 (rounded up to its key tile): 0 = one program walks all of its tiles' keys (two
# passes in all: the log-sum-exp, then select); more = the keys split over programs, which costs a third pass
# (count per split, then select at each split's offset). On an H200 (``benchmarks/tile_keys_cost.py``, Hq=32,
# D=128, docs/results/gpu-session30/) 4,096-key splits cut the 128K estimate from 54.9 to 32.5 ms at threshold 1.5
# and halved it at 32K for threshold 0.75 (8.0 -> 3.9 ms); 16,384-key splits were within 1% of 4,096.
KEYS_PER_SPLIT = 4096
# Order of pass 2's tile blocks: "ascending", or "longest_first" (the last tiles, which walk the most keys, start
# first). Within 3% of each other at 32K and 128K on the H200 (same benchmark).
TILE_ORDER = "ascending"
# With split keys: the counting pass counts every cap level at once for every tile (``cap_levels() + 1``
# comparisons per score instead of 1), so capped tiles need no second counting pass. Faster when many tiles hit the cap
# (at 128K they do: ``tile_keys_cost.py``'s keys max is 16,384), slower when none do; not yet timed, off.
COUNT_CAP_LEVELS_FIRST = False


def keys_per_split(k_len: int, block_n: int) -> int:
    """Keys per pass-2 program (:data:`KEYS_PER_SPLIT`; all of them when 0), a multiple of ``block_n``."""
    wanted = KEYS_PER_SPLIT or k_len
    return max(1, math.ceil(wanted / block_n)) * block_n


MAX_CAP_LEVELS = 24  # the counting pass unrolls one comparison per level


def cap_levels(k_len: int, threshold: float, max_keys: int, sink: int, queries: int = 1) -> int:
    """Doublings of the threshold that bound any tile's kept keys by ``max_keys``.

    Probabilities sum to 1, so at most ``Nk / (threshold * 2**j)`` keys reach ``threshold * 2**j / Nk`` under
    each of a tile's ``queries`` pooled queries; with the (at most ``sink``) forced sinks their union is within
    ``max_keys`` from ``j = ceil(log2(queries * Nk / (threshold * (max_keys - sink))))`` on. At least 1, at most
    :data:`MAX_CAP_LEVELS` (reached only for thresholds below ~1e-3 with ``max_keys`` 16,384 at 1M keys; a tile
    still over keeps its first ``max_keys`` ids by position).
    """
    room = max(1, max_keys - sink)
    return min(MAX_CAP_LEVELS, max(1, math.ceil(math.log2(queries * k_len / (threshold * room)))))


@triton.jit
def _any_of_tile(passing, BLOCK_T: tl.constexpr, QUERIES: tl.constexpr, BLOCK_N: tl.constexpr):
    """``[BLOCK_T * QUERIES, BLOCK_N]`` bool per pooled query -> ``[BLOCK_T, BLOCK_N]`` int32: any of the tile's."""
    return tl.max(tl.reshape(passing.to(tl.int32), (BLOCK_T, QUERIES, BLOCK_N)), axis=1)


@triton.jit(do_not_specialize=["num_tiles", "num_selected", "k_len", "width", "sink", "num_splits", "keys_per_split"])
def _select_kernel(
    Q, K, TILES, LSE, LEVEL, BAND, OFFSETS, COLS, COUNT, FORCED,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    num_tiles, num_selected, k_len, group, width, sink, num_splits, keys_per_split, qk_scale_log2, log2_cut,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, QUERIES: tl.constexpr, LEVELS: tl.constexpr, LEVELS_P2: tl.constexpr,
    HAS_FORCED: tl.constexpr,
):
    """Pass 2 over the tiles ``TILES [S]`` (int32) and the key splits ``[p * keys_per_split, (p + 1) *
    keys_per_split)``, ``p < P = num_splits``. Tile ``t`` has the pooled queries ``t * QUERIES + g`` (``g < QUERIES``)
    of ``Q``, each with its base-2 log-sum-exp in ``LSE [B, Hq, T * QUERIES]``. Grid
    ``(Hq, ceil(S * QUERIES / BLOCK_M), B * P)``. Tile ``t`` scans the keys ``< BAND[t]`` of the split; key ``j``
    passes when ``j < sink``, when ``FORCED [B, Hq, Nk]`` (uint8, read with ``HAS_FORCED``) marks it for the head, or
    when its score under some pooled query of the tile reaches that query's cut ``LSE + log2_cut + LEVEL[b, h, t]``.

    ``LEVELS == 0``: the passing ids go to ``COLS [B, Hq, T, width]`` (int32) in ascending order from slot
    ``OFFSETS[b, h, t, p]`` on (slots ``>= width`` dropped); their number to ``COUNT [B, Hq, T, P]`` int32.
    ``LEVELS > 0``: nothing is written to ``COLS``; ``COUNT [B, Hq, S, P, LEVELS_P2]`` gets, per level
    ``j < LEVELS``, how many keys pass the cut raised by ``j`` (slot ``j``)."""
    BLOCK_T: tl.constexpr = BLOCK_M // QUERIES
    head = tl.program_id(0).to(tl.int64)
    batch = tl.program_id(2).to(tl.int64) // num_splits
    split = tl.program_id(2) % num_splits
    head_index = batch * tl.num_programs(0) + head
    # one row per pooled query (tile slot, query): for the scores and cuts
    slot_of_row = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_M) // QUERIES
    row_valid = slot_of_row < num_selected
    tile_of_row = tl.load(TILES + slot_of_row, mask=row_valid, other=0)
    band_of_row = tl.load(BAND + tile_of_row, mask=row_valid, other=0)
    pooled_row = tile_of_row.to(tl.int64) * QUERIES + tl.arange(0, BLOCK_M) % QUERIES
    d_offs = tl.arange(0, BLOCK_D)
    d_mask = d_offs < HEAD_DIM
    q = tl.load(Q + batch * stride_qb + head * stride_qh + pooled_row[:, None] * stride_qn + d_offs[None, :] * stride_qd,
                mask=row_valid[:, None] & d_mask[None, :], other=0.0)
    cut = (tl.load(LSE + head_index * num_tiles * QUERIES + pooled_row, mask=row_valid, other=float("inf")) + log2_cut
           + tl.load(LEVEL + head_index * num_tiles + tile_of_row, mask=row_valid, other=0.0))
    # one row per tile: for the counts and stores
    slot = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_valid = slot < num_selected
    at = head_index * num_tiles + tl.load(TILES + slot, mask=t_valid, other=0)
    at_split = at.to(tl.int64) * num_splits + split
    out_base = at.to(tl.int64) * width
    k_base = K + batch * stride_kb + (head // group) * stride_kh
    if LEVELS == 0:
        first = tl.load(OFFSETS + at_split, mask=t_valid, other=0)
    else:
        first = tl.zeros([BLOCK_T], tl.int32)
    count = first
    level_ids = tl.arange(0, LEVELS_P2)
    level_counts = tl.zeros([BLOCK_T, LEVELS_P2], tl.int32)
    key_end = tl.minimum(tl.max(band_of_row, axis=0), (split + 1) * keys_per_split)
    for start in range(split * keys_per_split, key_end, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        s = _tile_scores(q, k_base, keys, k_len, d_offs, d_mask, stride_kn, stride_kd, qk_scale_log2, PRECISION)
        before_band = keys[None, :] < band_of_row[:, None]
        always = keys < sink
        if HAS_FORCED:
            always = always | (tl.load(FORCED + head_index * k_len + keys, mask=keys < k_len, other=0) != 0)
        sinks = before_band & always[None, :]
        if LEVELS == 0:
            kept = _any_of_tile(before_band & (s >= cut[:, None]) | sinks, BLOCK_T, QUERIES, BLOCK_N)
            place = count[:, None] + tl.cumsum(kept, axis=1) - 1
            tl.store(COLS + out_base[:, None] + place, (keys[None, :] + 0 * place).to(tl.int32),
                     mask=(kept > 0) & (place < width))
            count += tl.sum(kept, axis=1)
        else:
            for level in tl.static_range(LEVELS):
                kept = _any_of_tile(before_band & (s >= cut[:, None] + level) | sinks, BLOCK_T, QUERIES, BLOCK_N)
                level_counts += tl.where(level_ids[None, :] == level, tl.sum(kept, axis=1)[:, None], 0)
    if LEVELS == 0:
        tl.store(COUNT + at_split, count - first, mask=t_valid)
    else:
        rows = ((head_index * num_selected + slot).to(tl.int64) * num_splits + split) * LEVELS_P2
        tl.store(COUNT + rows[:, None] + level_ids[None, :], level_counts, mask=t_valid[:, None])


def select_tile_keys(pooled: torch.Tensor, k: torch.Tensor, band: torch.Tensor, *, block_size: int, threshold: float,
                     sink: int, max_keys: int, scale: float, queries: int = 1, forced: torch.Tensor | None = None,
                     forced_count: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each tile's kept keys, capped (see the module docstring).

    Args:
        pooled: ``[B, Hq, T * queries, D]`` pooled queries, ``queries`` per query tile (tile ``t``'s are the rows
            ``t * queries ..``; ``T = ceil(Nk / block_size)``), in ``k``'s dtype.
        k: ``[B, Hkv, Nk, D]``.
        band: ``[T]`` int32, the first key of each tile's band (0 for a tile that keeps nothing).
        block_size: query tile size: tile ``t``'s softmaxes run over the keys up to its last row.
        threshold: kept when the probability under one of the tile's pooled queries is at least ``threshold / Nk``.
        sink: the first ``sink`` keys before the band are always kept.
        max_keys: at most this many ids per tile (the cap above; rounding could leave a few more passing the
            top level: the first ``max_keys`` of them by position are kept).
        scale: softmax scale.
        queries: pooled queries per tile, a power of 2 up to ``block_size`` (then every row is its own).
        forced: ``[B, Hq, Nk]`` bool, keys each tile of the head keeps before its band (as the sinks); at most
            ``forced_count`` per head (the cap's bound counts them with the sinks).

    Returns:
        ``(columns [B, Hq, T, W] int32, count [B, Hq, T] int32)``: per tile its ``count`` kept ids ascending,
        ``W`` the largest count; slots past a tile's count are unspecified. ``columns`` is a view of a
        ``[B, Hq, T, max_keys]`` buffer (its last dim contiguous), the kernel's index as it stands.

    Memory: the ``[B, Hq, T, max_keys]`` int32 buffer plus pass 1's ``O(B * Hq * T * queries * Nk / 2048)`` floats;
    with split keys ``[B, Hq, T, P]`` int32 counts (``P`` splits), times the cap levels with
    :data:`COUNT_CAP_LEVELS_FIRST` or on the capped tiles.
    """
    bsz, hq, num_rows, _ = pooled.shape
    num_tiles = num_rows // queries
    k_len = k.shape[2]
    device = pooled.device
    rows = torch.arange(num_rows, device=device, dtype=torch.int32)
    positions = tile_last_rows(rows // queries, block_size, k_len).to(torch.int32)
    lse, common = row_logsumexp2(pooled, k, rows, positions, scale)
    common["BLOCK_M"] = max(common["BLOCK_M"], queries)
    per_split = keys_per_split(k_len, common["BLOCK_N"])
    num_splits = triton.cdiv(k_len, per_split)
    level = torch.zeros(bsz, hq, num_tiles, device=device, dtype=torch.float32)
    columns = torch.empty(bsz, hq, num_tiles, max_keys, dtype=torch.int32, device=device)
    band = band.to(torch.int32).contiguous()
    forced_bytes = (forced.to(torch.uint8).contiguous() if forced is not None
                    else torch.zeros(1, dtype=torch.uint8, device=device))
    tiles = torch.arange(num_tiles, device=device, dtype=torch.int32)
    if TILE_ORDER == "longest_first":
        tiles = tiles.flip(0).contiguous()

    def launch(selected: torch.Tensor, levels: int = 0, offsets: torch.Tensor | None = None) -> torch.Tensor:
        """Counts ``[B, Hq, T, P]`` (``levels == 0``: ids written from ``offsets [B, Hq, T, P]``, default 0) or
        ``[B, Hq, S, P, levels]`` (counted only)."""
        levels_p2 = triton.next_power_of_2(max(levels, 1))
        shape = (bsz, hq, num_tiles, num_splits) if levels == 0 else (bsz, hq, selected.numel(), num_splits, levels_p2)
        out = torch.empty(shape, dtype=torch.int32, device=device)
        if offsets is None:
            offsets = torch.zeros(1, dtype=torch.int32, device=device) if levels else torch.zeros_like(out)
        _select_kernel[(hq, triton.cdiv(selected.numel(), common["BLOCK_M"] // queries), bsz * num_splits)](
            pooled, k, selected, lse, level, band, offsets, columns, out, forced_bytes, *pooled.stride(), *k.stride(),
            num_tiles, selected.numel(), k_len, hq // k.shape[1], max_keys, sink, num_splits, per_split,
            scale * LOG2_E, math.log2(threshold / k_len), QUERIES=queries, LEVELS=levels, LEVELS_P2=levels_p2,
            HAS_FORCED=forced is not None, **common)
        return out if levels == 0 else out[..., :levels]

    doublings = cap_levels(k_len, threshold, max_keys, sink + forced_count, queries)

    def choose_levels(selected: torch.Tensor, per_level: torch.Tensor) -> torch.Tensor:
        """From ``per_level [B, Hq, S, P, doublings + 1]`` (the counts of the tiles ``selected`` at every level;
        level 0 = the threshold itself), each (head, tile) takes the first level within ``max_keys`` (``level``);
        returns the split counts there ``[B, Hq, S, P]``."""
        within = per_level.sum(3) <= max_keys  # [B, Hq, S, doublings + 1]
        chosen = torch.where(within.any(-1), within.int().argmax(-1), doublings)  # [B, Hq, S]; 0 where not over
        level[:, :, selected.long()] = chosen.float()
        return per_level.gather(-1, chosen[..., None, None].expand(*chosen.shape, num_splits, 1))[..., 0]

    def raise_capped(split_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each (head, tile) over ``max_keys`` gets its level (``level``); returns the split counts at the
        levels and the tiles where some head was over."""
        over = split_counts.sum(-1) > max_keys  # [B, Hq, T]
        capped = over.flatten(0, 1).any(0).nonzero()[:, 0].to(torch.int32)
        if not capped.numel():
            return split_counts, capped
        split_counts = split_counts.clone()
        split_counts[:, :, capped.long()] = choose_levels(capped, launch(capped, doublings + 1))
        return split_counts, capped

    if num_splits == 1:  # select at once; tiles where a head is over: counted per level, selected again
        count, capped = raise_capped(launch(tiles))
        if capped.numel():
            launch(capped)
    else:  # count per split, then select, each split's ids placed after the earlier splits'
        count = torch.empty(bsz, hq, num_tiles, num_splits, dtype=torch.int32, device=device)
        if COUNT_CAP_LEVELS_FIRST:  # counted per slot of `tiles`
            count[:, :, tiles.long()] = choose_levels(tiles, launch(tiles, doublings + 1))
        else:
            count[:, :, tiles.long()] = launch(tiles, 1)[..., 0]
            count, _ = raise_capped(count)
        launch(tiles, offsets=(count.cumsum(-1) - count).to(torch.int32).contiguous())
    count = count.sum(-1).clamp_(max=max_keys).to(torch.int32)
    width = max(1, int(count.max())) if count.numel() else 1
    return columns[..., :width], count
