"""Triton kernels of the tile-keys estimate: each query tile's keys above a threshold, compacted in place.

:func:`select_tile_keys` computes what the torch path of
:func:`longinfer.patterns.tile_keys.estimate_tile_keys` computes, in two passes over the keys:

1. the base-2 log-sum-exp of each tile's pooled query over the keys up to the tile's last row
   (:func:`longinfer.patterns._estimate_kernel.row_logsumexp2`, the vertical-slash estimate's pass 1);
2. :func:`_select_kernel`: one program per (query head, block of tiles) streams the keys before the
   tiles' bands, keeps those whose score reaches ``lse + log2(threshold / Nk)`` (and the sinks), and
   writes their ids at each tile's running count (a prefix sum over the kept keys of the key tile): the
   ids come out ascending with no sort and no N x N buffer.

A tile with more kept keys than the output's width writes only the first ``width`` (its count still
says how many passed): the caller re-selects those tiles by probability (the torch path's cap).
Work per query head: two passes of each tile's pooled query over its causal keys (``T = Nk / block_size``
pooled queries: about ``2 / block_size`` of causal attention's ``QK^T`` multiply-adds), plus one store per
kept key.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from longinfer.ops.index import tile_last_rows
from longinfer.patterns._estimate_kernel import LOG2_E, _load_queries, _tile_scores, row_logsumexp2


@triton.jit(do_not_specialize=["num_tiles", "k_len", "width", "sink"])
def _select_kernel(
    Q, K, ROWS, LSE, BAND, COLS, COUNT,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    num_tiles, k_len, group, width, sink, qk_scale_log2, log2_cut,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Pass 2. Grid ``(Hq, ceil(T / BLOCK_M), B)``. Tile ``t`` (pooled query row ``t`` of ``Q``) scans the
    keys ``< BAND[t]`` and keeps key ``j`` when its base-2 score reaches ``LSE[b, h, t] + log2_cut`` or
    ``j < sink``; kept ids go to ``COLS [B, Hq, T, width]`` (int32, filled with -1 beforehand) in
    ascending order, their number (uncapped) to ``COUNT [B, Hq, T]`` int32."""
    head = tl.program_id(0).to(tl.int64)
    batch = tl.program_id(2).to(tl.int64)
    tiles = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    t_valid = tiles < num_tiles
    band = tl.load(BAND + tiles, mask=t_valid, other=0)
    d_offs = tl.arange(0, BLOCK_D)
    d_mask = d_offs < HEAD_DIM
    q = _load_queries(Q + batch * stride_qb + head * stride_qh, ROWS, tiles, t_valid, stride_qn, stride_qd,
                      d_offs, d_mask)
    head_row = (batch * tl.num_programs(0) + head) * num_tiles
    cut = tl.load(LSE + head_row + tiles, mask=t_valid, other=float("inf")) + log2_cut
    k_base = K + batch * stride_kb + (head // group) * stride_kh
    out_base = (head_row + tiles.to(tl.int64)) * width
    count = tl.zeros([BLOCK_M], tl.int32)
    for start in range(0, tl.max(band, axis=0), BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        s = _tile_scores(q, k_base, keys, k_len, d_offs, d_mask, stride_kn, stride_kd, qk_scale_log2, PRECISION)
        before_band = keys[None, :] < band[:, None]
        keep = before_band & ((s >= cut[:, None]) | (keys[None, :] < sink))
        kept = keep.to(tl.int32)
        slot = count[:, None] + tl.cumsum(kept, axis=1) - 1
        tl.store(COLS + out_base[:, None] + slot, (keys[None, :] + 0 * slot).to(tl.int32), mask=keep & (slot < width))
        count += tl.sum(kept, axis=1)
    tl.store(COUNT + head_row + tiles, count, mask=t_valid)


def select_tile_keys(pooled: torch.Tensor, k: torch.Tensor, band: torch.Tensor, *, block_size: int, threshold: float,
                     sink: int, width: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each tile's kept keys (see the module docstring).

    Args:
        pooled: ``[B, Hq, T, D]`` one pooled query per query tile (``T = ceil(Nk / block_size)``), in ``k``'s dtype.
        k: ``[B, Hkv, Nk, D]``.
        band: ``[T]`` int32, the first key of each tile's band (0 for a tile that keeps nothing).
        block_size: query tile size: tile ``t``'s softmax runs over the keys up to its last row.
        threshold: kept when the probability is at least ``threshold / Nk``.
        sink, width: the first ``sink`` keys before the band are always kept; at most ``width`` ids per tile.
        scale: softmax scale.

    Returns:
        ``(columns [B, Hq, T, width] int32, -1 after the kept ids; count [B, Hq, T] int32, uncapped)``.

    Memory: the outputs plus pass 1's ``O(B * Hq * T * Nk / 2048)`` floats.
    """
    bsz, hq, num_tiles, _ = pooled.shape
    k_len = k.shape[2]
    rows = torch.arange(num_tiles, device=pooled.device, dtype=torch.int32)
    positions = tile_last_rows(rows, block_size, k_len).to(torch.int32)
    lse, common = row_logsumexp2(pooled, k, rows, positions, scale)
    columns = torch.full((bsz, hq, num_tiles, width), -1, dtype=torch.int32, device=pooled.device)
    count = torch.empty(bsz, hq, num_tiles, dtype=torch.int32, device=pooled.device)
    block_m = common["BLOCK_M"]
    _select_kernel[(hq, triton.cdiv(num_tiles, block_m), bsz)](
        pooled, k, rows, lse, band.to(torch.int32).contiguous(), columns, count, *pooled.stride(), *k.stride(),
        num_tiles, k_len, hq // k.shape[1], width, sink, scale * LOG2_E, math.log2(threshold / k_len), **common)
    return columns, count
