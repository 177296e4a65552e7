"""Launching the shared kernel: tile sizes, warps, grid, and the arguments each mode ignores."""

from __future__ import annotations

import math
import os

import torch
import triton

from longinfer.ops._checks import AttentionShape, interpreter_enabled
from longinfer.ops._kernel import _sparse_attention_fwd, sparse_attention_fwd_tuned
from longinfer.ops.index import BlockSparseIndex, VerticalSlashIndex

LOG2_E = 1.4426950408889634  # the kernel works with exp2: exp(x) = exp2(x * log2(e))


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
    dense_from: int | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    options: dict[str, int] | None = None,
) -> torch.Tensor:
    """Run :func:`_sparse_attention_fwd` over all (head, query tile) pairs; returns ``[B, Hq, Nq, D]``.

    ``options`` fixes the tile/warp/stage choice (``BLOCK_N``, ``num_warps``, ``num_stages``, and
    optionally ``heads_per_tile``); the benchmarks use it to sweep configurations. Otherwise the
    GPU path autotunes once per (head dim, mode, tile, key-length scale). ``dense_from``
    (vertical-slash): query tiles starting at or after this key position run dense.
    """
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q)
    num_tiles = math.ceil(shape.k_len / block_m)
    dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
    index_heads = shape.kv_heads  # without an index, every head of a KV group can share a tile
    bi, bi_strides, bc, bc_strides = dummy, (0, 0, 0), dummy, (0, 0)
    g_lo = g_hi = g_count = cols = col_count = dummy
    g_strides, gc_strides, c_strides, cc_strides, steps = (0, 0), (0, 0), (0, 0), (0, 0), 0
    if blocks is not None:
        bi = blocks.block_ids
        bi_strides = bi.stride()[:3]
        bc, bc_strides = blocks.block_count, blocks.block_count.stride()[:2]
        index_heads = blocks.num_heads
    if vs is not None:
        g_lo, g_hi, g_count, cols, col_count = vs.group_lo, vs.group_hi, vs.group_count, vs.columns, vs.column_count
        g_strides, gc_strides = g_lo.stride()[:2], g_count.stride()[:2]
        c_strides, cc_strides = cols.stride()[:2], col_count.stride()[:2]
        steps = vs.search_steps
        index_heads = vs.num_heads
    if cu_seqlens_q is None:
        cu_q = cu_k = dummy
    else:
        cu_q, cu_k = cu_seqlens_q, cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    opts = dict(options or _fixed_options(q.dtype) or {})
    index_head_div = shape.q_heads // index_heads
    heads_per_tile = opts.pop("heads_per_tile", None) or _heads_per_tile(shape, block_m, index_head_div)
    if index_head_div % heads_per_tile or shape.group_size % heads_per_tile:
        raise ValueError(f"heads_per_tile={heads_per_tile} must divide the heads sharing an index ({index_head_div})")
    grid = (shape.batch * shape.q_heads // heads_per_tile * num_tiles,)
    kernel = _sparse_attention_fwd if "BLOCK_N" in opts else sparse_attention_fwd_tuned
    kernel[grid](
        q, k, v, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        shape.q_len, shape.k_len, cu_q, cu_k,
        shape.q_heads, num_tiles, sm_scale * LOG2_E,
        sink, window, 2**31 - 1 if dense_from is None else dense_from,
        bi, *bi_strides,
        g_lo, g_hi, g_count, *g_strides, *gc_strides, steps,
        cols, col_count, *c_strides, *cc_strides,
        index_head_div, bc, *bc_strides, max(shape.k_len, 1).bit_length(),
        HEADS_PER_TILE=heads_per_tile, GROUP=shape.group_size, HEAD_DIM=shape.head_dim, BLOCK_D=triton.next_power_of_2(shape.head_dim),
        BLOCK_M=block_m, MODE=mode, VARLEN=cu_seqlens_q is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **opts,
    )
    return out
