"""Launching the shared kernel: tile sizes, warps, grid, and the arguments each mode ignores."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton

from longinfer.ops._checks import AttentionShape, interpreter_enabled
from longinfer.ops._kernel import (
    SLASH_MASKS_BIAS,
    SLASH_MASKS_EVERY,
    SLASH_MASKS_NONE,
    _dense_split_fwd,
    _merge_splits_fwd,
    _sparse_attention_fwd,
    sparse_attention_fwd_tuned,
)
from longinfer.ops.index import BlockSparseIndex, TileKeysIndex, VerticalSlashIndex

LOG2_E = 1.4426950408889634  # the kernel works with exp2: exp(x) = exp2(x * log2(e))
SPLIT_BLOCK_M = 64  # query tile of the split-K dense pass (stacked heads make it taller)
TAIL_LAUNCHES = ("fused", "separate")
# The launch option `slash_masks`: which vertical-slash chunks mask their scores.
SLASH_MASKS = {"every": SLASH_MASKS_EVERY.value, "bias": SLASH_MASKS_BIAS.value, "none": SLASH_MASKS_NONE.value}
DEFAULT_SLASH_MASKS = "bias"


def _slash_masks_flag(name: str) -> int:
    """The kernel's ``SLASH_MASKS`` for the launch option ``slash_masks`` (a key of :data:`SLASH_MASKS`)."""
    if name not in SLASH_MASKS:
        raise ValueError(f"slash_masks must be one of {sorted(SLASH_MASKS)}, got {name!r}")
    return SLASH_MASKS[name]


def _fixed_options(dtype: torch.dtype) -> dict[str, int] | None:
    """Launch options where autotuning makes no sense; None = let the autotuner choose.

    In the interpreter only correctness matters, so small tiles keep it quick; float32 on the GPU
    is a correctness path, run with tiles that fit its larger registers.
    """
    if interpreter_enabled():
        return {"BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:
        return {"BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    if os.environ.get("LONGINFER_AUTOTUNE", "1") == "0":  # e.g. GPU tests over many small shapes
        return {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    return None


def _vertical_slash_warps(tile_rows: int) -> int:
    """Warps of a vertical-slash launch (3 stages): 4 for 64-row tiles, 8 for taller ones.

    Fixed, not autotuned: on an H200 (sessions 6 and 7, a 4K turn over 64K, 28 layers of
    Qwen2.5-1.5B) 64-row tiles ran fastest with 4 warps and 3 stages in every sweep (44.8 and
    46.4 ms), while the autotuner, timing layer 0's index only, picked configurations 5-7% slower
    over all layers; 128-row tiles ran 59 ms with 8 warps and 86 ms with 4.
    """
    return 4 if tile_rows <= 64 else 8


def _heads_per_tile(shape: AttentionShape, block_m: int, index_head_div: int) -> int:
    """Stack two query heads of a KV group into one tile when they share an index and the tile
    is 64 positions, so each K/V load serves 128 query rows (the GPU's preferred tile height)."""
    if block_m <= 64 and index_head_div % 2 == 0 and shape.group_size % 2 == 0:
        return 2
    return 1


def launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shape: AttentionShape,
    sm_scale: float,
    mode: int,
    block_m: int,
    *,
    sink: int = 0,
    window: int = 0,
    blocks: BlockSparseIndex | None = None,
    vs: VerticalSlashIndex | None = None,
    tile_keys: TileKeysIndex | None = None,
    dense_from: int | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    options: dict[str, int] | None = None,
    tail_splits: int = 1,
    tail_launch: str = "fused",
) -> torch.Tensor:
    """Run :func:`_sparse_attention_fwd` over all (head, query tile) pairs; returns ``[B, Hq, Nq, D]``.

    ``options`` fixes the tile/warp/stage choice (``BLOCK_N``, ``num_warps``, ``num_stages``, and
    optionally ``heads_per_tile``, ``covered_in_loads`` (False loads the K/V of vertical columns a
    slash chunk already covered, masking them only in the scores, so those loads do not wait for the
    coverage lookup) and ``split_ranges`` (False walks each key range in one loop that branches per
    tile between the masked and unmasked step, the unpipelined form before session 16); the output is
    the same) and ``slash_masks`` (how the slash chunks mask their scores: ``"bias"``, the default, a
    per-key ``-inf`` bias on each chunk's keys past the tile's first row, those keys then attended in
    one masked step after the chunks; ``"every"``, element by element in every chunk, the form before
    session 20, the same output up to rounding; ``"none"``: **wrong output** wherever a chunk needs a
    mask, a timing bound only); the benchmarks use it to sweep configurations. Otherwise
    vertical-slash launches take fixed options (:func:`_vertical_slash_warps`) and the other
    modes autotune once per (head dim, mode, tile, key-length scale) on the GPU. ``dense_from``
    (vertical-slash, a multiple of ``block_m``): query tiles starting at or after this key
    position run dense, each as ``tail_splits`` programs over key ranges when ``tail_splits > 1``
    (float32 partials ``tail_splits * B * Hq * (Nk - dense_from) * D``, then merged). With
    ``tail_launch="separate"`` those rows are instead a second, split-K dense launch after the sparse
    tiles (:func:`dense_splits_into`, ``tail_splits`` key ranges, two query heads per program).

    Without packed sequences the grid holds only the tiles that contain queries (a 4K chunk over
    a 64K cache launches 64 tiles per head, not 1,088).
    """
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q)
    all_tiles = math.ceil(shape.k_len / block_m)
    first_tile = 0 if cu_seqlens_q is not None else (shape.k_len - shape.q_len) // block_m
    dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
    index_heads = shape.kv_heads  # without an index, every head of a KV group can share a tile
    bi, bi_strides, bc, bc_strides = dummy, (0, 0, 0), dummy, (0, 0)
    ch_start = ch_end = ch_count = covered = cols = col_count = dummy
    ch_strides, cn_strides, cv_strides, c_strides, cc_strides = (0, 0), (0, 0), (0, 0), (0, 0), (0, 0)
    if blocks is not None:
        bi = blocks.block_ids
        bi_strides = bi.stride()[:3]
        bc, bc_strides = blocks.block_count, blocks.block_count.stride()[:2]
        index_heads = blocks.num_heads
    if tile_keys is not None:  # the kernel reads a tile's columns where block-sparse reads its block ids
        bi, bi_strides = tile_keys.columns, tile_keys.columns.stride()[:3]
        bc, bc_strides = tile_keys.column_count, tile_keys.column_count.stride()[:2]
        index_heads = tile_keys.num_heads
    if vs is not None:
        ch_start, ch_end, ch_count, covered = vs.chunk_start, vs.chunk_end, vs.chunk_count, vs.covered
        cols, col_count = vs.columns, vs.column_count
        ch_strides, cn_strides, cv_strides = ch_start.stride()[:2], ch_count.stride()[:2], covered.stride()[:2]
        c_strides, cc_strides = cols.stride()[:2], col_count.stride()[:2]
        index_heads = vs.num_heads
    if cu_seqlens_q is None:
        cu_q = cu_k = dummy
    else:
        cu_q, cu_k = cu_seqlens_q, cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    opts = dict(options or _fixed_options(q.dtype) or {})
    if vs is not None:  # the kernel walks the index's slash chunks one key tile each
        if options is not None and options.get("BLOCK_N", vs.chunk) != vs.chunk:
            raise ValueError(f"a vertical-slash launch takes BLOCK_N = the index's chunk ({vs.chunk}), "
                             f"got BLOCK_N={options['BLOCK_N']}")
        opts["BLOCK_N"] = vs.chunk
        if options is None and q.dtype == torch.float32:  # float32 K/V tiles of 64 keys: one stage fits any head_dim
            opts["num_stages"] = 1
    index_head_div = shape.q_heads // index_heads
    heads_per_tile = opts.pop("heads_per_tile", None) or _heads_per_tile(shape, block_m, index_head_div)
    covered_in_loads = opts.pop("covered_in_loads", True)
    split_ranges = opts.pop("split_ranges", True)
    slash_masks = _slash_masks_flag(opts.pop("slash_masks", DEFAULT_SLASH_MASKS))
    if index_head_div % heads_per_tile or shape.group_size % heads_per_tile:
        raise ValueError(f"heads_per_tile={heads_per_tile} must divide the heads sharing an index ({index_head_div})")
    splits = 1 if cu_seqlens_q is not None else tail_splits
    separate_from = _separate_tail_row(shape, dense_from, tail_launch, cu_seqlens_q is not None)
    if separate_from is not None:  # the main programs stop before the tail's tiles; a second launch does them
        all_tiles, dense_from, splits = dense_from // block_m, None, 1
    tail = _TailSplit.plan(shape, block_m, all_tiles, dense_from, splits, q.device)
    if tail is not None:
        dense_from = None  # the main programs stop before the tail's tiles
    num_tiles = max(0, (all_tiles if tail is None else tail.first_tile) - first_tile)
    if vs is not None and "num_warps" not in opts:
        opts.update(num_warps=_vertical_slash_warps(block_m * heads_per_tile), num_stages=3)
    heads_tiles = shape.batch * shape.q_heads // heads_per_tile
    tail_programs = 0 if tail is None else heads_tiles * tail.num_tiles * tail.splits
    grid = (tail_programs + heads_tiles * num_tiles,)
    if grid[0] == 0:  # every query row is in a separate tail
        return _separate_tail(out, q, k, v, shape, sm_scale, separate_from, tail_splits)
    kernel = _sparse_attention_fwd if "BLOCK_N" in opts else sparse_attention_fwd_tuned
    tail_args = (dummy, dummy, dummy, 0, 1, 0, 0, 0) if tail is None else (
        tail.acc, tail.row_max, tail.row_sum, tail_programs, tail.splits, tail.first_tile, tail.num_tiles,
        tail.keys_per_split)
    kernel[grid](
        q, k, v, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        shape.q_len, shape.k_len, cu_q, cu_k,
        shape.q_heads, num_tiles, first_tile, sm_scale * LOG2_E,
        sink, window, 2**31 - 1 if dense_from is None else dense_from,
        *tail_args,
        bi, *bi_strides,
        ch_start, ch_end, ch_count, *ch_strides, *cn_strides, covered, *cv_strides,
        cols, col_count, *c_strides, *cc_strides,
        index_head_div, bc, *bc_strides, max(shape.k_len, 1).bit_length(),
        HEADS_PER_TILE=heads_per_tile, GROUP=shape.group_size, HEAD_DIM=shape.head_dim, BLOCK_D=triton.next_power_of_2(shape.head_dim),
        BLOCK_M=block_m, MODE=mode, VARLEN=cu_seqlens_q is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", COVERED_IN_LOADS=covered_in_loads,
        SPLIT_RANGES=split_ranges, SLASH_MASKS=slash_masks,
        **opts,
    )
    if tail is not None:
        tail.write_into(out, shape, block_m)
    return out if separate_from is None else _separate_tail(out, q, k, v, shape, sm_scale, separate_from, tail_splits)


def _separate_tail(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape,
                   sm_scale: float, first_row: int, splits: int) -> torch.Tensor:
    """Query rows ``[first_row, Nq)`` of ``out`` by the split-K dense pass; returns ``out``."""
    tail_shape = AttentionShape(shape.batch, shape.q_heads, shape.kv_heads, shape.q_len - first_row, shape.k_len,
                                shape.head_dim)
    dense_splits_into(out[:, :, first_row:], q[:, :, first_row:], k, v, tail_shape, sm_scale, splits)
    return out


def _separate_tail_row(shape: AttentionShape, dense_from: int | None, tail_launch: str, packed: bool) -> int | None:
    """First query row (of ``Nq``) of a dense tail run as its own launch, or None (fused, or none)."""
    if tail_launch not in TAIL_LAUNCHES:
        raise ValueError(f"tail_launch must be one of {TAIL_LAUNCHES}, got {tail_launch!r}")
    if tail_launch == "fused" or dense_from is None or packed or dense_from >= shape.k_len:
        return None
    return max(0, dense_from - (shape.k_len - shape.q_len))


def merge_key_splits(acc: torch.Tensor, row_max: torch.Tensor, row_sum: torch.Tensor, dim: int) -> torch.Tensor:
    """Attention output from split-K partials: ``acc [..., D]`` unnormalized (float32), ``row_max``
    (log2 domain) and ``row_sum`` ``[...]``, the splits along ``dim``. A split with no visible key
    holds ``(0, -inf, 0)``; every row needs one split with a key (its max is then finite).

    The reference of :func:`merge_splits_into` (which the launches use: one kernel instead of
    about ten elementwise and reduction ops per call)."""
    weight = torch.exp2(row_max - row_max.amax(dim, keepdim=True))
    return (acc * weight[..., None]).sum(dim) / (row_sum * weight).sum(dim)[..., None]


def _stacked_heads(shape: AttentionShape) -> int:
    """Query heads per program of the split-K dense pass: two of one KV group when the group
    has an even size (each K/V tile then serves 128 rows, as :func:`_heads_per_tile`), else one."""
    return 2 if shape.group_size % 2 == 0 else 1


def dense_splits_into(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape,
                      sm_scale: float, splits: int) -> None:
    """Split-K dense causal attention of ``q`` (the last ``Nq`` of ``Nk`` positions) into ``out``.

    ``out``, ``q``: ``[B, Hq, Nq, D]`` (views with unit last stride are fine, e.g. the last rows of
    a larger call); ``splits`` key ranges per query tile, each its own program
    (:func:`longinfer.ops._kernel._dense_split_fwd`, ``_stacked_heads`` query heads each), then one
    merge launch. Extra memory: float32 partials ``splits * B * Hq * ceil(Nq / 64) * 64 * D``.
    """
    interpreted = interpreter_enabled()
    block_n = 32 if interpreted or q.dtype == torch.float32 else 64
    block_d = triton.next_power_of_2(shape.head_dim)
    keys_per_split = math.ceil(math.ceil(shape.k_len / splits) / block_n) * block_n  # whole key tiles
    splits = math.ceil(shape.k_len / keys_per_split)
    num_tiles = math.ceil(shape.q_len / SPLIT_BLOCK_M)
    heads = _stacked_heads(shape)
    stats_shape = (splits, shape.batch, shape.q_heads, num_tiles * SPLIT_BLOCK_M)
    acc = torch.empty(*stats_shape, block_d, device=q.device, dtype=torch.float32)
    row_max = torch.empty(stats_shape, device=q.device, dtype=torch.float32)
    row_sum = torch.empty_like(row_max)
    grid = (splits, shape.batch * shape.q_heads // heads * num_tiles)
    _dense_split_fwd[grid](
        q, k, v, acc, row_max, row_sum,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        shape.q_len, shape.k_len, shape.q_heads, num_tiles, keys_per_split, sm_scale * LOG2_E,
        GROUP=shape.group_size, HEADS=heads, HEAD_DIM=shape.head_dim, BLOCK_D=block_d, BLOCK_M=SPLIT_BLOCK_M,
        BLOCK_N=block_n, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=_vertical_slash_warps(SPLIT_BLOCK_M * heads), num_stages=1 if interpreted else 2,
    )
    merge_splits_into(out, acc, row_max, row_sum, split_dim=0, out_row0=0, rows=shape.q_len)  # every row sees key 0


MERGE_BLOCK_R = 64  # output rows per program of the merge


def merge_splits_into(out: torch.Tensor, acc: torch.Tensor, row_max: torch.Tensor, row_sum: torch.Tensor, *,
                      split_dim: int, out_row0: int, rows: int) -> None:
    """Write the merged split-K partials of rows ``[0, rows)`` into ``out[:, :, out_row0:out_row0 + rows]``.

    Args:
        out: ``[B, Hq, Nq, D]`` (any strides with unit last stride), written in place.
        acc: contiguous float32 ``stats + [BLOCK_D]``, unnormalized outputs (``BLOCK_D >= D``).
        row_max, row_sum: contiguous float32 ``stats``: ``[B, Hq, S, T]`` (``split_dim=2``) or
            ``[S, B, Hq, T]`` (``split_dim=0``); the log2-domain running max and the sum.
        split_dim: where the splits are, 0 or 2.
        out_row0, rows: where the merged rows go, and how many (``rows <= T``).

    Same result as :func:`merge_key_splits` up to float32 rounding; no memory beyond ``out``.
    """
    if split_dim not in (0, 2):
        raise ValueError(f"split_dim must be 0 or 2, got {split_dim}")
    for name, t in (("acc", acc), ("row_max", row_max), ("row_sum", row_sum)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous float32, got {t.dtype}, strides {t.stride()}")
    if acc.shape[:-1] != row_max.shape or row_sum.shape != row_max.shape or row_max.dim() != 4:
        raise ValueError(f"partials disagree: acc {tuple(acc.shape)}, row_max {tuple(row_max.shape)}, "
                         f"row_sum {tuple(row_sum.shape)}")
    bsz, q_heads, _, head_dim = out.shape
    splits = row_max.shape[split_dim]
    heads_dim = 2 if split_dim == 0 else 1  # the query-head dim; batch * Hq rows of heads are evenly spaced
    grid = (bsz * q_heads, triton.cdiv(rows, MERGE_BLOCK_R))
    _merge_splits_fwd[grid](
        acc, row_max, row_sum, out, splits, row_max.stride(split_dim), row_max.stride(heads_dim), q_heads,
        rows, out_row0, out.stride(0), out.stride(1), out.stride(2),
        HEAD_DIM=head_dim, BLOCK_D=acc.shape[-1], BLOCK_R=MERGE_BLOCK_R, num_warps=4,
    )


@dataclass(frozen=True)
class _TailSplit:
    """The split dense tail of a vertical-slash launch: tiles ``[first_tile, first_tile +
    num_tiles)``, each over ``splits`` key ranges of ``keys_per_split``, and their partials."""

    first_tile: int
    num_tiles: int
    splits: int
    keys_per_split: int
    acc: torch.Tensor  # [B, Hq, splits, num_tiles * block_m, BLOCK_D] float32
    row_max: torch.Tensor  # [B, Hq, splits, num_tiles * block_m]
    row_sum: torch.Tensor

    @classmethod
    def plan(cls, shape: AttentionShape, block_m: int, all_tiles: int, dense_from: int | None, splits: int,
             device: torch.device) -> _TailSplit | None:
        """None when the tail runs unsplit (no tail, ``splits <= 1``, a tail before the queries)."""
        if dense_from is None or splits <= 1:
            return None
        tail_first = dense_from // block_m
        if tail_first >= all_tiles or tail_first * block_m < shape.k_len - shape.q_len:
            return None  # no tail, or a tail tile with rows before the first query: run unsplit
        keys_per_split = math.ceil(shape.k_len / splits / 128) * 128  # whole key tiles of every BLOCK_N
        splits = math.ceil(shape.k_len / keys_per_split)
        num_tiles = all_tiles - tail_first
        stats = (shape.batch, shape.q_heads, splits, num_tiles * block_m)
        row_max = torch.empty(stats, device=device, dtype=torch.float32)
        acc = torch.empty(*stats, triton.next_power_of_2(shape.head_dim), device=device, dtype=torch.float32)
        return cls(tail_first, num_tiles, splits, keys_per_split, acc, row_max, torch.empty_like(row_max))

    def write_into(self, out: torch.Tensor, shape: AttentionShape, block_m: int) -> None:
        """Merge the partials into the tail rows of ``out [B, Hq, Nq, D]``."""
        start = self.first_tile * block_m
        merge_splits_into(out, self.acc, self.row_max, self.row_sum, split_dim=2,
                          out_row0=start - (shape.k_len - shape.q_len), rows=shape.k_len - start)
