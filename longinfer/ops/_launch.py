"""Launching the shared kernel: tile sizes, warps, grid, and the arguments each mode ignores."""

from __future__ import annotations

import math

import torch
import triton

from longinfer.ops._checks import AttentionShape, interpreter_enabled
from longinfer.ops._kernel import _sparse_attention_fwd
from longinfer.ops.index import BlockSparseIndex, VerticalSlashIndex

LOG2_E = 1.4426950408889634  # the kernel works with exp2: exp(x) = exp2(x * log2(e))


def _launch_options(head_dim: int, block_m: int, dtype: torch.dtype) -> dict[str, int]:
    """Key-tile size, warps and pipeline stages, chosen per head dim and query-tile size.

    In the interpreter only correctness matters, so small tiles keep it quick.
    """
    if interpreter_enabled():
        return {"BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:
        return {"BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    if block_m >= 128:
        return {"BLOCK_N": 64 if head_dim > 64 else 128, "num_warps": 8, "num_stages": 3}
    return {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}


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
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    options: dict[str, int] | None = None,
) -> torch.Tensor:
    """Run :func:`_sparse_attention_fwd` over all (head, query tile) pairs; returns ``[B, Hq, Nq, D]``.

    ``options`` overrides the tile/warp/stage choice (``BLOCK_N``, ``num_warps``, ``num_stages``);
    the benchmarks use it to sweep configurations.
    """
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q)
    num_tiles = math.ceil(shape.k_len / block_m)
    dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
    index_heads = shape.q_heads
    bi, bi_strides, num_slots = dummy, (0, 0, 0), 0
    g_lo = g_hi = g_count = cols = col_count = dummy
    g_strides, gc_strides, c_strides, cc_strides, steps = (0, 0), (0, 0), (0, 0), (0, 0), 0
    if blocks is not None:
        bi = blocks.block_ids
        bi_strides = bi.stride()[:3]
        num_slots = bi.shape[-1]
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
    opts = options or _launch_options(shape.head_dim, block_m, q.dtype)
    grid = (shape.batch * shape.q_heads, num_tiles)
    _sparse_attention_fwd[grid](
        q, k, v, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        shape.q_len, shape.k_len, cu_q, cu_k,
        shape.q_heads, num_tiles, sm_scale * LOG2_E,
        sink, window,
        bi, *bi_strides, num_slots,
        g_lo, g_hi, g_count, *g_strides, *gc_strides, steps,
        cols, col_count, *c_strides, *cc_strides,
        shape.q_heads // index_heads,
        GROUP=shape.group_size, HEAD_DIM=shape.head_dim, BLOCK_D=triton.next_power_of_2(shape.head_dim),
        BLOCK_M=block_m, MODE=mode, VARLEN=cu_seqlens_q is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **opts,
    )
    return out
