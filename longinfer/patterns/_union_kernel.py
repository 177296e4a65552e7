"""Triton kernels of the KV-group union of packed positions, in four launches.

:func:`union_packed_over_groups_triton` returns what
:func:`longinfer.patterns._common.union_packed_over_groups` returns (the torch path, the reference),
optionally with each KV group's row repeated for its query heads (what the shared columns need),
without the torch path's ten or so launches (bitmap, scatter, prefix sum, pack, repeat):

1. a zeroed ``[B * Hkv, Nk]`` int8 bitmap (one memset);
2. :func:`_mark_bits_kernel`: every query head's positions set their KV group's bits (plain stores of
   the same value: no atomics needed);
3. :func:`_count_bits_kernel`: each bitmap row is cut into at most :data:`MAX_PARTS` parts of whole
   :data:`PACK_BLOCK` blocks; one program per (row, part) counts its set bits;
4. :func:`_pack_bits_kernel`: one program per (output row, part) writes its part's set positions
   ascending from the count of the parts before it, and its share of the ``-1`` fill after the
   row's last position. A row repeated for ``G`` query heads is packed by ``G`` programs per part
   from the same bitmap (no copy afterwards).

One program per output row walking the whole bitmap (a prefix sum per 4,096-key block, 17 in a row
after a 64K cache) took 35 us per layer of a 4K turn over 64K on Qwen2.5-1.5B (H200, session 22's
profile): latency of 12 programs, each a chain of block scans.

Memory: the bitmap, ``B * Hkv * Nk`` bytes, ``B * Hkv * MAX_PARTS`` counts and the output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longinfer.ops._checks import interpreter_enabled

MARK_BLOCK = 1024  # positions per program of the marking pass
PACK_BLOCK = 4096  # bitmap entries per step of a counting or packing program
MAX_PARTS = 64  # parts per bitmap row at most (a row of up to 262,144 keys: one block per part)


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


@triton.jit(do_not_specialize=["length", "part_len"])
def _count_bits_kernel(BITMAP, COUNTS, length, part_len, BLOCK: tl.constexpr):
    """Program ``(row, part)``: the set bits of bitmap row ``row`` in ``part * part_len ..`` (a multiple
    of ``BLOCK``) into ``COUNTS[row, part]`` (``COUNTS`` is ``[rows, num_programs(1)]``)."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    start = part * part_len
    bits_row = BITMAP + row * length
    lanes = tl.zeros([BLOCK], tl.int32)
    for block in range(start, tl.minimum(start + part_len, length), BLOCK):
        offs = block + tl.arange(0, BLOCK)
        lanes += tl.load(bits_row + offs, mask=offs < length, other=0).to(tl.int32)
    tl.store(COUNTS + row * tl.num_programs(1) + part, tl.sum(lanes, 0))


@triton.jit(do_not_specialize=["length", "out_width", "part_len"])
def _pack_bits_kernel(BITMAP, COUNTS, OUT, length, out_width, copies, part_len, BLOCK: tl.constexpr,
                      MAX_PARTS: tl.constexpr):
    """Program ``(row, part)``: output row ``row`` (``copies`` consecutive rows per bitmap row) gets the
    set positions of part ``part`` of bitmap row ``row // copies`` at the slots after those of the
    parts before it (``COUNTS``), and its share of the ``-1`` fill from the row's total to ``out_width``."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    parts = tl.num_programs(1)
    bits_row = row // copies
    index = tl.arange(0, MAX_PARTS)
    counts = tl.load(COUNTS + bits_row * parts + index, mask=index < parts, other=0)
    count = tl.sum(tl.where(index < part, counts, 0), 0)
    total = tl.sum(counts, 0)
    out_row = OUT + row * out_width
    start = part * part_len
    for block in range(start, tl.minimum(start + part_len, length), BLOCK):
        offs = block + tl.arange(0, BLOCK)
        bits = tl.load(BITMAP + bits_row * length + offs, mask=offs < length, other=0).to(tl.int32)
        slots = count + tl.cumsum(bits, 0) - 1
        tl.store(out_row + slots, offs.to(tl.int64), mask=(bits != 0) & (slots < out_width))
        count += tl.sum(bits, 0)
    share = tl.cdiv(tl.maximum(out_width - total, 0), parts)
    fill_lo = total + part * share
    for block in range(fill_lo, tl.minimum(fill_lo + share, out_width), BLOCK):
        offs = block + tl.arange(0, BLOCK)
        tl.store(out_row + offs, tl.full([BLOCK], -1, tl.int64), mask=offs < tl.minimum(fill_lo + share, out_width))


def pack_parts(length: int) -> tuple[int, int]:
    """``(parts, keys per part)`` of a bitmap row of ``length`` keys: whole :data:`PACK_BLOCK` blocks per
    part, at most :data:`MAX_PARTS` parts."""
    part_len = max(PACK_BLOCK, triton.cdiv(triton.cdiv(length, MAX_PARTS), PACK_BLOCK) * PACK_BLOCK)
    return triton.cdiv(length, part_len), part_len


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
    parts, part_len = pack_parts(bitmap.shape[1])
    counts = torch.empty(bitmap.shape[0], parts, dtype=torch.int32, device=index.device)
    _count_bits_kernel[(bitmap.shape[0], parts)](bitmap, counts, bitmap.shape[1], part_len, BLOCK=PACK_BLOCK,
                                                 num_warps=8)
    _pack_bits_kernel[(out.shape[0] * out.shape[1], parts)](bitmap, counts, out, bitmap.shape[1], out_width,
                                                            group if repeat else 1, part_len, BLOCK=PACK_BLOCK,
                                                            MAX_PARTS=MAX_PARTS, num_warps=8)
    return out
