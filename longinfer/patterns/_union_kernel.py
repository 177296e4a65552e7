"""Triton kernels of the KV-group union of packed positions, in three launches.

:func:`union_packed_over_groups_triton` returns what
:func:`longinfer.patterns._common.union_packed_over_groups` returns (the torch path, the reference),
optionally with each KV group's row repeated for its query heads (what the shared columns need),
without the torch path's ten or so launches (bitmap, scatter, prefix sum, pack, repeat):

1. a zeroed ``[B * Hkv, Nk]`` int8 bitmap (one memset);
2. :func:`_mark_bits_kernel`: every query head's positions set their KV group's bits (plain stores of
   the same value: no atomics needed);
3. :func:`_pack_bits_kernel`: one program per output row walks its group's bitmap in blocks, writes
   the set positions ascending at the running count plus their prefix sum in the block, then
   ``-1`` up to the width. A row repeated for ``G`` query heads is packed by ``G`` programs in
   parallel from the same bitmap (no copy afterwards).

Memory: the bitmap, ``B * Hkv * Nk`` bytes, and the output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longinfer.ops._checks import interpreter_enabled

MARK_BLOCK = 1024  # positions per program of the marking pass
PACK_BLOCK = 4096  # bitmap entries per step of a packing program (17 steps for a 69,632-key row)


@triton.jit(do_not_specialize=["width", "length"])
def _mark_bits_kernel(INDEX, BITMAP, width, length, group, BLOCK: tl.constexpr):
    """Program ``(row, part)``: the positions ``part * BLOCK ..`` of index row ``row = b * Hq + h`` set
    their bits in bitmap row ``row // group = b * Hkv + h // group``; ``-1`` entries set nothing."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    positions = tl.load(INDEX + row.to(tl.int64) * width + offs, mask=offs < width, other=-1)
    valid = (positions >= 0) & (positions < length)
    bits = BITMAP + (row // group).to(tl.int64) * length
    tl.store(bits + positions, tl.full([BLOCK], 1, tl.int8), mask=valid)


@triton.jit(do_not_specialize=["length", "out_width"])
def _pack_bits_kernel(BITMAP, OUT, length, out_width, copies, BLOCK: tl.constexpr):
    """Program ``row``: output row ``row`` (``copies`` consecutive rows per bitmap row) gets the set
    positions of bitmap row ``row // copies`` ascending, then ``-1`` up to ``out_width``."""
    row = tl.program_id(0)
    bits_row = BITMAP + (row // copies).to(tl.int64) * length
    out_row = OUT + row.to(tl.int64) * out_width
    count = tl.full([], 0, tl.int32)
    for start in range(0, length, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        bits = tl.load(bits_row + offs, mask=offs < length, other=0).to(tl.int32)
        slots = count + tl.cumsum(bits, 0) - 1
        tl.store(out_row + slots, offs.to(tl.int64), mask=(bits != 0) & (slots < out_width))
        count += tl.sum(bits, 0)
    for start in range(count, out_width, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        tl.store(out_row + offs, tl.full([BLOCK], -1, tl.int64), mask=offs < out_width)


def union_packed_over_groups_triton(index: torch.Tensor, kv_heads: int, length: int, *,
                                    repeat: bool = False) -> torch.Tensor:
    """Union of each KV group's packed positions: ``[B, Hq, W]`` -> ``[B, Hkv, G * W]`` int64
    (``[B, Hq, G * W]`` with ``repeat``: each query head gets its group's row).

    ``index`` int64 holds positions in ``[0, length)`` and ``-1`` fillers, in any order; the result
    holds each group's distinct positions ascending, then ``-1``, as
    :func:`longinfer.patterns._common.union_packed_over_groups`. CUDA tensors, or CPU tensors with
    ``TRITON_INTERPRET=1``. No host synchronization (it may be recorded into a CUDA graph).
    """
    if index.dim() != 3 or index.dtype != torch.long:
        raise ValueError(f"index must be [B, Hq, W] int64, got {tuple(index.shape)} {index.dtype}")
    if not (index.is_cuda or interpreter_enabled()):
        raise ValueError("the Triton union needs CUDA tensors or TRITON_INTERPRET=1; use union_packed_over_groups")
    bsz, hq, width = index.shape
    if kv_heads < 1 or hq % kv_heads:
        raise ValueError(f"{hq} query heads do not split into {kv_heads} KV groups")
    group = hq // kv_heads
    out_width = group * width
    out = torch.empty(bsz, hq if repeat else kv_heads, out_width, dtype=torch.long, device=index.device)
    if out.numel() == 0:
        return out
    bitmap = torch.zeros(bsz * kv_heads, max(length, 1), dtype=torch.int8, device=index.device)
    index = index.contiguous()
    if width:
        _mark_bits_kernel[(bsz * hq, triton.cdiv(width, MARK_BLOCK))](index, bitmap, width, length, group,
                                                                       BLOCK=MARK_BLOCK, num_warps=4)
    _pack_bits_kernel[(out.shape[0] * out.shape[1],)](bitmap, out, length, out_width, group if repeat else 1,
                                                      BLOCK=PACK_BLOCK, num_warps=8)
    return out
