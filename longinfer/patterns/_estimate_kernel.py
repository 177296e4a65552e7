"""Triton kernels of the vertical-slash estimate: column and diagonal attention mass of a few queries.

:func:`estimate_masses_triton` computes exactly what the torch path
(:func:`longinfer.patterns.vertical_slash.estimate_masses`) computes, for estimation queries at
any absolute positions ``p`` (each sees the keys ``<= p``):

- ``columns[b, h, j] = mean_l P[l, j]`` over the cells with offset ``p_l - j >= local``;
- ``diagonals[b, h, s] = mean_l P[l, p_l - s]`` over the cells with key ``p_l - s >= sink``;

where ``P[l, :]`` is the causal softmax of estimation query ``l`` of query head ``h`` against
the keys of KV head ``h // (Hq // Hkv)`` (GQA is never materialized).

Two passes over the keys:

1. :func:`_row_stats_kernel`: one program per (query head, query block, key split) streams its
   split of the keys and writes the running max and sum of ``exp2`` (split-K);
   :func:`_merge_splits_kernel` merges the splits into each query's log-sum-exp (base 2).
2. :func:`_masses_kernel`: one program per (query head, key split) streams its keys tile by tile
   (with at most ``BLOCK_M`` estimation queries, the usual case, the queries stay loaded): the
   column mass of each tile is summed over the queries in registers and stored without atomics
   (no other program touches those keys). The diagonal mass goes to offset ``p - key``, which differs per query
   (a strided sample spreads a tile's cells over ``L`` disjoint offset ranges), so no program can
   sum it alone. Two ways, the same sums up to float32 summation order:

   - *scratch* (when ``B * Hq * L * Nk`` floats fit in :data:`DIAGONAL_SCRATCH_BYTES`, else per
     chunk of whole KV groups; see :data:`DIAGONAL_SUMS` for when): each probability is stored, without atomics, at
     ``(l, Nk - 1 - (p_l - key))`` of a ``[B, Hq, L, Nk]`` float32 scratch (offsets reversed so
     that a tile row is one contiguous, coalesced store); :func:`_diagonal_sum_kernel` then sums
     each offset over the queries that reach it. Every cell is written at most once, so nothing
     needs zeroing.
   - *atomics* (the default outside torch's deterministic mode, and wherever even one KV group's
     scratch does not fit): float32 atomic adds into the ``[B, Hq, Nk]`` output, in whatever order
     the programs run.

   The scratch's sums do not depend on scheduling (the same input gives the same index, bit for
   bit); the atomics' may differ between identical calls at float32 rounding, which can move an
   item at the budget's boundary. The atomics skip the scratch's round trip through memory (214 MB
   written and read per layer of a 4K turn over 64K on Qwen2.5-1.5B): on an H200 that turn's
   attention took 58.3 / 58.1 ms with them against 59.5 / 59.2 ms with the scratch (two runs each,
   docs/results/gpu-session22/turn-variants/). :data:`DIAGONAL_SUMS` chooses; by default the
   scratch when ``torch.are_deterministic_algorithms_enabled()``, else the atomics. With offsets
   stored unreversed (decreasing along a tile row, so one 4-byte transaction per cell), pass 2 took
   ~0.87 ms per layer of that turn (sessions 6 and 7) either way, 14x pass 1 over the same q k^T.

Arguments that follow the prompt length (``k_len``, the query count, the key splits) are not
specialized (``do_not_specialize``): one compiled variant per launch configuration serves every length.

Programs of the query heads of one KV group are adjacent in the grid (axis 0 = query head), so
a key tile is read from DRAM about once per KV head and pass.

Memory: the two ``[B, Hq, Nk]`` float32 outputs, ``2 * B * Hq * L * ceil(Nk / KEYS_PER_SPLIT)``
floats of split-K statistics, ``B * Hq * L`` log-sum-exps and at most
:data:`DIAGONAL_SCRATCH_BYTES` of scratch.
Work: ``4 * B * Hq * L * Nk * D`` FLOP (two passes, causal cells only for strided samples) plus
one store and one load (scratch) or one atomic add per visible (query, key) cell; without the
diagonal mass (``diagonals=False``, the column-only estimate of ``column_q`` queries) no scratch
and no atomics, only the FLOP.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from longinfer.ops._checks import autotune_disk_cache, interpreter_enabled

LOG2_E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): the kernels work in base 2
KEYS_PER_SPLIT = 2048  # keys per pass-1 program: enough programs at 8K, few partials at 128K
# Launch options of pass 1 beyond the defaults (``BLOCK_N``, ``num_warps``, ``num_stages``): empty here;
# ``benchmarks/turn_kernels.py`` sets them to time alternatives. (Session 14's profile of a 4K turn over
# 64K on an H200: pass 1 ~86 us per layer for 12 heads x 64 queries x 68K keys, far above its
# memory and FLOP floors: 408 programs of 16 serial key tiles each. Compiled for sm_90, 128-key
# tiles spill 128 bytes per thread, 64-key tiles none (benchmarks/kernel_resources.py), and on an
# H200 64-key tiles were faster at every length timed: 8.26 vs 8.80 ms over 28 layers of that turn,
# 1.95 vs 2.08 ms over 4 layers of a 128K prefill, 0.46 vs 0.48 at 16K; 512-2,048 keys per program
# changed less; docs/results/gpu-session16/.)
PASS_ONE_OPTIONS: dict[str, int] = {}
PASS_TWO_PROGRAMS = 512  # pass 2 splits its keys until a call has about this many programs (132 SMs)
# Query block of pass 2 when the queries do not fit one block (each key tile loops over the blocks).
# Compiled for sm_90, 64-query blocks spill 0.4-2.9 KB per thread and 32-query blocks 0.3-1.6 KB
# (docs/results/compile-time-cpu/README.md), but on an H200 the 32-query blocks made a 4K turn over
# 64K with 1,024 estimation queries slower (attention 0.96x -> 0.70x of dense, sessions 12 and 13):
# every block reloads the key tile, so halving the block doubles those loads. 64 it stays.
PASS_TWO_MULTI_BLOCK_M = 64
# How pass 2 sums the diagonal mass across programs (see the module docstring): "scratch"
# (deterministic), "atomics" (faster, the order varies by run), or "auto": the scratch when torch's
# deterministic algorithms are enabled (``torch.use_deterministic_algorithms(True)``), else atomics.
# Calls where one KV group's scratch would exceed DIAGONAL_SCRATCH_BYTES use atomics whatever this says.
DIAGONAL_SUMS = "auto"
DIAGONAL_SUMS_CHOICES = ("auto", "scratch", "atomics")
# Largest diagonal scratch (bytes) per pass-2 launch: 12 heads x 64 queries x 64K keys fit whole (a
# 4K turn over 64K on Qwen2.5-1.5B: 210 MB); larger calls run in chunks of KV groups, and calls
# where one KV group does not fit use atomics.
DIAGONAL_SCRATCH_BYTES = 256 * 2**20
# Element type of the diagonal scratch. float16 would halve its traffic (written once and read once:
# 214 MB per layer of a 4K turn over 64K on Qwen2.5-1.5B, most of pass 2's memory traffic) at ~5e-4
# relative error per stored probability (stored divided by the query count; those below ~4e-6 flush
# to zero); float32 keeps the masses within summation order of the torch path.
# ``benchmarks/turn_kernels.py`` times both.
DIAGONAL_SCRATCH_DTYPE = torch.float32


@triton.jit
def _load_queries(Q_HEAD, ROWS, query_idx, q_valid, stride_qn, stride_qd, d_offs, d_mask):
    """The estimation queries ``query_idx`` of one head (``Q_HEAD`` points at its batch and head):
    ``[BLOCK_M, BLOCK_D]``, zeros for rows past ``L`` and dims past ``HEAD_DIM``."""
    rows = tl.load(ROWS + query_idx, mask=q_valid, other=0).to(tl.int64)
    return tl.load(Q_HEAD + rows[:, None] * stride_qn + d_offs[None, :] * stride_qd,
                   mask=q_valid[:, None] & d_mask[None, :], other=0.0)


@triton.jit
def _tile_scores(q, k_base, keys, k_len, d_offs, d_mask, stride_kn, stride_kd, qk_scale_log2, PRECISION: tl.constexpr):
    """Scaled scores ``[BLOCK_M, BLOCK_N]`` (base 2) of loaded queries against the key tile ``keys``."""
    k = tl.load(k_base + keys.to(tl.int64)[:, None] * stride_kn + d_offs[None, :] * stride_kd,
                mask=(keys < k_len)[:, None] & d_mask[None, :], other=0.0)
    return tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale_log2


@triton.jit(do_not_specialize=["num_queries", "k_len", "num_splits", "keys_per_split"])
def _row_stats_kernel(
    Q, K, ROWS, POS, M_OUT, L_OUT,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    num_queries, k_len, group, num_splits, keys_per_split, qk_scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Pass 1: per (query head, query block, key split) the running max ``m`` and ``sum exp2(s - m)``.

    Grid ``(query_blocks * num_splits, Hq, B)``; outputs ``M_OUT, L_OUT [B, Hq, L, num_splits]``
    float32 (``m = -inf, l = 0`` where a query sees no key of the split). The (block, split) pairs take grid
    dimension 0, the only one past 65,535 programs: every row of a 128K tile-keys estimate with every row
    scored is 2,048 blocks x 64 splits.
    """
    head = tl.program_id(1).to(tl.int64)
    block = tl.program_id(0) // num_splits
    split = tl.program_id(0) % num_splits
    batch = tl.program_id(2).to(tl.int64)
    query_idx = block * BLOCK_M + tl.arange(0, BLOCK_M)
    q_valid = query_idx < num_queries
    pos = tl.load(POS + query_idx, mask=q_valid, other=-1)
    d_offs = tl.arange(0, BLOCK_D)
    d_mask = d_offs < HEAD_DIM
    q = _load_queries(Q + batch * stride_qb + head * stride_qh, ROWS, query_idx, q_valid, stride_qn, stride_qd,
                      d_offs, d_mask)
    k_base = K + batch * stride_kb + (head // group) * stride_kh
    last_pos = tl.max(pos, axis=0)  # queries are ascending; rows past the end hold -1
    start = split * keys_per_split
    stop = tl.minimum(tl.minimum(start + keys_per_split, k_len), last_pos + 1)
    m_run = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_run = tl.zeros([BLOCK_M], tl.float32)
    for tile in range(start, stop, BLOCK_N):
        keys = tile + tl.arange(0, BLOCK_N)
        s = _tile_scores(q, k_base, keys, k_len, d_offs, d_mask, stride_kn, stride_kd, qk_scale_log2, PRECISION)
        s = tl.where((keys[None, :] <= pos[:, None]) & (keys[None, :] < k_len), s, float("-inf"))
        m_new = tl.maximum(m_run, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        l_run = l_run * tl.exp2(m_run - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
        m_run = m_new
    out = ((batch * tl.num_programs(1) + head) * num_queries + query_idx) * num_splits + split
    tl.store(M_OUT + out, m_run, mask=q_valid)
    tl.store(L_OUT + out, l_run, mask=q_valid)


@triton.jit
def _tile_masses(q, k_base, keys, pos, lse, query_idx, q_valid, head_row, num_queries, k_len, sink, local,
                 qk_scale_log2, inv_count, DIAGONALS, out_base, d_offs, d_mask, stride_kn, stride_kd,
                 PRECISION: tl.constexpr, SCRATCH: tl.constexpr, WITH_DIAGONALS: tl.constexpr):
    """One key tile against one block of estimation queries (``q [BLOCK_M, BLOCK_D]`` loaded):
    stores (or adds) the diagonal mass unless not ``WITH_DIAGONALS``, and returns the tile's column
    mass ``[BLOCK_N]``."""
    key_valid = keys < k_len
    s = _tile_scores(q, k_base, keys, k_len, d_offs, d_mask, stride_kn, stride_kd, qk_scale_log2, PRECISION)
    offsets = pos[:, None] - keys[None, :]  # [BLOCK_M, BLOCK_N] diagonal offset of each cell
    visible = (offsets >= 0) & key_valid[None, :]
    probs = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0) * inv_count
    on_diagonal = visible & (keys[None, :] >= sink)
    # Diagonal outputs are indexed by the reversed offset Nk - 1 - (p - key): it increases with the
    # key, so a row of the tile is one contiguous run and the stores (or atomics) coalesce. (With
    # the offset itself, decreasing along the keys, every cell was its own 4-byte transaction.)
    reversed_offsets = (k_len - 1 - pos)[:, None] + keys[None, :]
    if WITH_DIAGONALS and SCRATCH:
        cell = (head_row * num_queries + query_idx).to(tl.int64)[:, None] * k_len + reversed_offsets
        tl.store(DIAGONALS + cell, tl.where(on_diagonal, probs, 0.0).to(DIAGONALS.dtype.element_ty),
                 mask=visible & q_valid[:, None])
    elif WITH_DIAGONALS:
        tl.atomic_add(DIAGONALS + out_base + reversed_offsets, probs, mask=on_diagonal, sem="relaxed")
    return tl.sum(tl.where(offsets >= local, probs, 0.0), axis=0)


@triton.jit(do_not_specialize=["num_queries", "k_len", "keys_per_split"])
def _masses_kernel(
    Q, K, ROWS, POS, LSE, COLUMNS, DIAGONALS,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    num_queries, k_len, group, sink, local, qk_scale_log2, inv_count, keys_per_split,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, SCRATCH: tl.constexpr, ONE_BLOCK: tl.constexpr, WITH_DIAGONALS: tl.constexpr,
):
    """Pass 2: probabilities of every estimation query on a split of the keys -> column and diagonal mass.

    Grid ``(Hq, ceil(Nk / keys_per_split), B)`` (``keys_per_split`` a multiple of ``BLOCK_N``); each
    program streams its split in ``BLOCK_N`` tiles, up to the last key an estimation query sees.
    With ``ONE_BLOCK`` (``L <= BLOCK_M``) the queries, positions and log-sum-exps are loaded once
    and only the key tiles stream, as in pass 1; otherwise every tile loops over the query blocks.
    ``LSE [B, Hq, L]`` base-2 log-sum-exp of each query; ``COLUMNS [B, Hq, Nk]`` must be zero on
    entry (tiles no query sees are not written). Diagonal offsets ``s`` are stored reversed, at
    ``Nk - 1 - s``. With ``SCRATCH``, ``DIAGONALS`` is the ``[B, Hq, L, Nk]`` scratch: cell
    ``(l, Nk - 1 - s)`` gets query ``l``'s probability at key ``p_l - s`` (0 for a sink key) for
    every ``s <= p_l``, and the other cells are left unwritten. Without it, ``DIAGONALS`` is
    ``[B, Hq, Nk]`` (reversed offsets), zero on entry, and accumulates with atomics. Without
    ``WITH_DIAGONALS`` only the column mass is computed (``DIAGONALS`` is not touched).
    """
    head = tl.program_id(0).to(tl.int64)
    split_start = tl.program_id(1) * keys_per_split
    batch = tl.program_id(2).to(tl.int64)
    d_offs = tl.arange(0, BLOCK_D)
    d_mask = d_offs < HEAD_DIM
    k_base = K + batch * stride_kb + (head // group) * stride_kh
    head_row = (batch * tl.num_programs(0) + head)
    out_base = head_row * k_len
    last_pos = tl.load(POS + num_queries - 1)  # positions ascend: the last query sees the most keys
    split_stop = tl.minimum(tl.minimum(split_start + keys_per_split, k_len), last_pos + 1)
    block_offs = tl.arange(0, BLOCK_M)
    q_head = Q + batch * stride_qb + head * stride_qh
    if ONE_BLOCK:
        q_valid = block_offs < num_queries
        pos = tl.load(POS + block_offs, mask=q_valid, other=-1)
        lse = tl.load(LSE + head_row * num_queries + block_offs, mask=q_valid, other=0.0)
        q = _load_queries(q_head, ROWS, block_offs, q_valid, stride_qn, stride_qd, d_offs, d_mask)
        for tile_start in range(split_start, split_stop, BLOCK_N):
            keys = tile_start + tl.arange(0, BLOCK_N)
            column_mass = _tile_masses(q, k_base, keys, pos, lse, block_offs, q_valid, head_row, num_queries, k_len,
                                       sink, local, qk_scale_log2, inv_count, DIAGONALS, out_base, d_offs, d_mask,
                                       stride_kn, stride_kd, PRECISION, SCRATCH, WITH_DIAGONALS)
            tl.store(COLUMNS + out_base + keys, column_mass, mask=keys < k_len)
    else:
        for tile_start in range(split_start, split_stop, BLOCK_N):
            keys = tile_start + tl.arange(0, BLOCK_N)
            column_mass = tl.zeros([BLOCK_N], tl.float32)
            for block in range(0, tl.cdiv(num_queries, BLOCK_M)):
                query_idx = block * BLOCK_M + block_offs
                q_valid = query_idx < num_queries
                pos = tl.load(POS + query_idx, mask=q_valid, other=-1)
                if tl.max(pos, axis=0) >= tile_start:  # some query of the block sees this tile
                    lse = tl.load(LSE + head_row * num_queries + query_idx, mask=q_valid, other=0.0)
                    q = _load_queries(q_head, ROWS, query_idx, q_valid, stride_qn, stride_qd, d_offs, d_mask)
                    column_mass += _tile_masses(q, k_base, keys, pos, lse, query_idx, q_valid, head_row, num_queries,
                                                k_len, sink, local, qk_scale_log2, inv_count, DIAGONALS, out_base,
                                                d_offs, d_mask, stride_kn, stride_kd, PRECISION, SCRATCH,
                                                WITH_DIAGONALS)
            tl.store(COLUMNS + out_base + keys, column_mass, mask=keys < k_len)


@triton.jit(do_not_specialize=["num_queries", "k_len"])
def _diagonal_sum_kernel(SCRATCH, POS, DIAGONALS, num_queries, k_len, BLOCK_S: tl.constexpr):
    """``DIAGONALS[r, s] = sum_l SCRATCH[r, l, Nk - 1 - s]`` over the queries with ``s <= p_l``.

    Grid ``(B * Hq, ceil(Nk / BLOCK_S))``; ``SCRATCH [B * Hq, L, Nk]`` (offsets reversed, see
    :func:`_masses_kernel`), ``DIAGONALS [B * Hq, Nk]``.
    """
    row = tl.program_id(0).to(tl.int64)
    reversed_offsets = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    in_range = reversed_offsets < k_len
    total = tl.zeros([BLOCK_S], tl.float32)
    for query in range(0, num_queries):
        reach = tl.load(POS + query)
        cells = SCRATCH + (row * num_queries + query) * k_len + reversed_offsets
        total += tl.load(cells, mask=in_range & (reversed_offsets >= k_len - 1 - reach), other=0.0).to(tl.float32)
    tl.store(DIAGONALS + row * k_len + (k_len - 1 - reversed_offsets), total, mask=in_range)


# Pass 2 on the GPU in float16 / bfloat16: key tile, warps and stages chosen by timing, once per
# head dim, query block and mode. (Session 6 profiled the earlier one-program-per-key-tile form
# at 0.85 ms per layer of a 4K turn over 64K, while pass 1, which streams 2,048 keys per program
# over the same q k^T, took 0.06 ms; pass 2 now streams too.) Columns and atomics accumulate,
# so each timing trial starts from zeroed outputs. Compiled for sm_90 with a launch's divisibility
# hints (docs/results/kernel-resources-cpu-triton3.6/), the first four spill 144-1,704 bytes per
# thread; 64-key tiles with 8 warps spill 0-32 (added in session 16, not yet timed on the GPU).
_masses_kernel_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=st)
             for bn, w, st in ((128, 4, 3), (64, 4, 3), (128, 8, 3), (64, 4, 2), (64, 8, 3))],
    key=["HEAD_DIM", "BLOCK_M", "SCRATCH", "ONE_BLOCK", "WITH_DIAGONALS"],
    reset_to_zero=["COLUMNS", "DIAGONALS"],
    **autotune_disk_cache(),
)(_masses_kernel)


def _launch_options(head_dim: int, num_queries: int) -> dict[str, int]:
    """Tile sizes and warps: small tiles in the interpreter, 64-query and 64-key tiles on the GPU."""
    block_d = triton.next_power_of_2(head_dim)
    if interpreter_enabled():
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_D": max(block_d, 16), "num_warps": 4}
    block_m = 64 if num_queries > 32 else max(16, triton.next_power_of_2(num_queries))
    return {"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_D": max(block_d, 16), "num_warps": 4}


def merge_splits_reference(m_parts: torch.Tensor, l_parts: torch.Tensor) -> torch.Tensor:
    """Base-2 log-sum-exp ``[B, Hq, L]`` from split-K ``(max, sum)`` pairs ``[B, Hq, L, splits]``
    (what :func:`_merge_splits_kernel` computes; the test reference)."""
    m_max = m_parts.amax(-1, keepdim=True)  # finite: every query sees key 0 in split 0
    total = (l_parts * torch.exp2(m_parts - m_max)).sum(-1)
    return m_max.squeeze(-1) + torch.log2(total)


@triton.jit(do_not_specialize=["num_queries", "num_splits"])
def _merge_splits_kernel(M_PARTS, L_PARTS, LSE, num_queries, num_splits, BLOCK_Q: tl.constexpr,
                         BLOCK_S: tl.constexpr):
    """``LSE [R, L]`` (base 2) from pass 1's split-K pairs ``M_PARTS, L_PARTS [R, L, num_splits]``:
    the largest ``m``, then ``m_max + log2(sum l * exp2(m - m_max))``, as
    :func:`merge_splits_reference`. Grid ``(R, ceil(L / BLOCK_Q))``. One launch where the torch
    merge took seven small ones (every layer of a turn pays each launch)."""
    row = tl.program_id(0).to(tl.int64)
    queries = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_valid = queries < num_queries
    cells = (row * num_queries + queries)[:, None] * num_splits
    m_max = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    for first in range(0, num_splits, BLOCK_S):
        splits = first + tl.arange(0, BLOCK_S)
        mask = q_valid[:, None] & (splits < num_splits)[None, :]
        m_max = tl.maximum(m_max, tl.max(tl.load(M_PARTS + cells + splits[None, :], mask=mask,
                                                 other=float("-inf")), axis=1))
    m_safe = tl.where(q_valid, m_max, 0.0)  # finite for every query (it sees key 0 in split 0)
    total = tl.zeros([BLOCK_Q], tl.float32)
    for first in range(0, num_splits, BLOCK_S):
        splits = first + tl.arange(0, BLOCK_S)
        mask = q_valid[:, None] & (splits < num_splits)[None, :]
        m = tl.load(M_PARTS + cells + splits[None, :], mask=mask, other=float("-inf"))
        sums = tl.load(L_PARTS + cells + splits[None, :], mask=mask, other=0.0)
        total += tl.sum(sums * tl.exp2(m - m_safe[:, None]), axis=1)
    tl.store(LSE + row * num_queries + queries, m_safe + tl.log2(total), mask=q_valid)


def merge_splits(m_parts: torch.Tensor, l_parts: torch.Tensor) -> torch.Tensor:
    """Base-2 log-sum-exp ``[B, Hq, L]`` float32 of contiguous split-K pairs ``[B, Hq, L, splits]``
    (:func:`_merge_splits_kernel`)."""
    bsz, hq, count, num_splits = m_parts.shape
    lse = torch.empty(bsz, hq, count, device=m_parts.device, dtype=torch.float32)
    block_q = 16 if interpreter_enabled() else 64
    _merge_splits_kernel[(bsz * hq, triton.cdiv(count, block_q))](
        m_parts, l_parts, lse, count, num_splits, BLOCK_Q=block_q, BLOCK_S=64, num_warps=4)
    return lse


def row_logsumexp2(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, scale: float
                   ) -> tuple[torch.Tensor, dict[str, object]]:
    """Pass 1 and its merge: the base-2 log-sum-exp ``[B, Hq, L]`` float32 of the queries ``rows [L]`` (int32,
    contiguous, on q's device) of ``q [B, Hq, N, D]``, each over the keys ``<= positions [L]`` (ascending)
    of ``k [B, Hkv, Nk, D]``; and the launch options pass 2 starts from."""
    bsz, hq, _, head_dim = q.shape
    hkv, k_len = k.shape[1], k.shape[2]
    count = rows.numel()
    opts = _launch_options(head_dim, count)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    block_m, block_n = opts["BLOCK_M"], opts["BLOCK_N"]
    query_blocks = triton.cdiv(count, block_m)
    num_splits = triton.cdiv(k_len, KEYS_PER_SPLIT)
    m_parts = torch.empty(bsz, hq, count, num_splits, device=q.device, dtype=torch.float32)
    l_parts = torch.empty_like(m_parts)
    common = dict(HEAD_DIM=head_dim, BLOCK_D=opts["BLOCK_D"], BLOCK_M=block_m, BLOCK_N=block_n,
                  PRECISION=precision, num_warps=opts["num_warps"])
    _row_stats_kernel[(query_blocks * num_splits, hq, bsz)](
        q, k, rows, positions, m_parts, l_parts, *q.stride(), *k.stride(),
        count, k_len, hq // hkv, num_splits, KEYS_PER_SPLIT, scale * LOG2_E, **dict(common, **PASS_ONE_OPTIONS))
    return merge_splits(m_parts, l_parts), common


def estimate_masses_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    rows: torch.Tensor,
    positions: torch.Tensor,
    *,
    sink: int,
    local: int,
    scale: float,
    diagonals: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Column and diagonal mass of the estimation queries (see the module docstring).

    Args:
        q: ``[B, Hq, Nq, D]`` float16 / bfloat16 / float32 (any strides).
        k: ``[B, Hkv, Nk, D]`` same dtype, ``Hq % Hkv == 0``.
        rows: ``[L]`` integer indices into ``q``'s positions of the estimation queries.
        positions: ``[L]`` their absolute positions (``rows + Nk - Nq``), ascending, same device.
        sink: keys ``< sink`` are left out of the diagonal mass.
        local: offsets ``< local`` are left out of the column mass.
        scale: softmax scale.
        diagonals: also the diagonal mass; without it pass 2 sums columns only (no scatter: the
            diagonal mass is what makes many estimation queries expensive) and returns ``None``.

    Returns:
        ``(columns [B, Hq, Nk], diagonals [B, Hq, Nk] or None)`` float32, means over the ``L`` queries.
        Shapes and dtypes are the caller's to validate (:func:`longinfer.patterns._common.check_qk`).
    """
    if q.dtype != k.dtype:
        raise TypeError(f"q ({q.dtype}) and k ({k.dtype}) must have the same dtype; cast one of them")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the estimate kernel takes float16, bfloat16 or float32, got {q.dtype}")
    bsz, hq, _, head_dim = q.shape
    hkv, k_len = k.shape[1], k.shape[2]
    count = rows.numel()
    rows = rows.to(device=q.device, dtype=torch.int32).contiguous()
    positions = positions.to(device=q.device, dtype=torch.int32).contiguous()
    lse, common = row_logsumexp2(q, k, rows, positions, scale)
    qk_scale_log2 = scale * LOG2_E
    block_m = common["BLOCK_M"]
    if count > block_m and not interpreter_enabled():
        common = dict(common, BLOCK_M=PASS_TWO_MULTI_BLOCK_M)
    pass_two = dict(sink=sink, local=local, qk_scale_log2=qk_scale_log2, common=common)
    if not diagonals:
        return _columns_only(q, k, rows, positions, lse, **pass_two), None
    chunk = scratch_heads(bsz, hq, hkv, count, k_len) if diagonal_sums() == "scratch" else 0
    if chunk == 0:
        return _masses_with_atomics(q, k, rows, positions, lse, **pass_two)
    parts = [_masses_with_scratch(q[:, h0:h0 + chunk], k[:, h0 // (hq // hkv):(h0 + chunk) // (hq // hkv)], rows,
                                  positions, lse[:, h0:h0 + chunk].contiguous(), **pass_two)
             for h0 in range(0, hq, chunk)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([c for c, _ in parts], 1), torch.cat([d for _, d in parts], 1)


def diagonal_sums() -> str:
    """``"scratch"`` or ``"atomics"``: :data:`DIAGONAL_SUMS` with ``"auto"`` resolved by
    ``torch.are_deterministic_algorithms_enabled()``."""
    if DIAGONAL_SUMS not in DIAGONAL_SUMS_CHOICES:
        raise ValueError(f"DIAGONAL_SUMS must be one of {DIAGONAL_SUMS_CHOICES}, got {DIAGONAL_SUMS!r}")
    if DIAGONAL_SUMS == "auto":
        return "scratch" if torch.are_deterministic_algorithms_enabled() else "atomics"
    return DIAGONAL_SUMS


def scratch_heads(bsz: int, hq: int, hkv: int, count: int, k_len: int) -> int:
    """Query heads per pass-2 launch whose diagonal scratch fits :data:`DIAGONAL_SCRATCH_BYTES`.

    A multiple of the GQA group (whole KV heads per launch), at most ``hq``; 0 when one KV group
    alone does not fit (the atomics path).
    """
    group = hq // hkv
    per_head = bsz * count * k_len * (torch.finfo(DIAGONAL_SCRATCH_DTYPE).bits // 8)
    fits = DIAGONAL_SCRATCH_BYTES // per_head // group * group
    return min(fits, hq)


def _masses_launch(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, lse: torch.Tensor,
                   columns: torch.Tensor, diagonals: torch.Tensor, *, sink: int, local: int, qk_scale_log2: float,
                   common: dict, scratch: bool, with_diagonals: bool = True) -> None:
    bsz, hq, _, _ = q.shape
    count, k_len = rows.numel(), k.shape[2]
    keys_per_split = pass_two_split(bsz, hq, k_len)
    grid = (hq, triton.cdiv(k_len, keys_per_split), bsz)
    args = (q, k, rows, positions, lse, columns, diagonals, *q.stride(), *k.stride(),
            count, k_len, hq // k.shape[1], sink, local, qk_scale_log2, 1.0 / count, keys_per_split)
    flags = dict(SCRATCH=scratch, ONE_BLOCK=count <= common["BLOCK_M"], WITH_DIAGONALS=with_diagonals)
    if interpreter_enabled() or q.dtype == torch.float32 or common["BLOCK_D"] > 128:
        _masses_kernel[grid](*args, **flags, **common)
        return
    fixed = {name: value for name, value in common.items() if name not in ("BLOCK_N", "num_warps")}
    _masses_kernel_tuned[grid](*args, **flags, **fixed)


def pass_two_split(bsz: int, hq: int, k_len: int) -> int:
    """Keys per pass-2 program: whole 128-key tiles, at most :data:`KEYS_PER_SPLIT`, and few
    enough that the call has about :data:`PASS_TWO_PROGRAMS` programs (a short call still fills
    the GPU)."""
    splits = math.ceil(PASS_TWO_PROGRAMS / (bsz * hq))
    return min(KEYS_PER_SPLIT, max(128, math.ceil(k_len / splits / 128) * 128))


def _columns_only(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, lse: torch.Tensor,
                  **pass_two) -> torch.Tensor:
    """Pass 2 without the diagonal mass: the column mass ``[B, Hq, Nk]`` alone."""
    columns = torch.zeros(q.shape[0], q.shape[1], k.shape[2], device=q.device, dtype=torch.float32)
    _masses_launch(q, k, rows, positions, lse, columns, columns, scratch=False, with_diagonals=False, **pass_two)
    return columns


def _masses_with_atomics(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                         lse: torch.Tensor, **pass_two) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 2 with the diagonal mass added by float32 atomics (no scratch)."""
    bsz, hq, k_len = q.shape[0], q.shape[1], k.shape[2]
    columns = torch.zeros(bsz, hq, k_len, device=q.device, dtype=torch.float32)
    reversed_diagonals = torch.zeros_like(columns)
    _masses_launch(q, k, rows, positions, lse, columns, reversed_diagonals, scratch=False, **pass_two)
    return columns, reversed_diagonals.flip(-1)


def _masses_with_scratch(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                         lse: torch.Tensor, **pass_two) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 2 through a ``[B, Hq, L, Nk]`` diagonal scratch (:data:`DIAGONAL_SCRATCH_DTYPE`), summed in
    float32 by :func:`_diagonal_sum_kernel`."""
    bsz, hq, k_len = q.shape[0], q.shape[1], k.shape[2]
    count = rows.numel()
    columns = torch.zeros(bsz, hq, k_len, device=q.device, dtype=torch.float32)
    scratch = torch.empty(bsz, hq, count, k_len, device=q.device, dtype=DIAGONAL_SCRATCH_DTYPE)
    _masses_launch(q, k, rows, positions, lse, columns, scratch, scratch=True, **pass_two)
    diagonals = torch.empty_like(columns)
    block_s = 64 if interpreter_enabled() else 1024
    _diagonal_sum_kernel[(bsz * hq, triton.cdiv(k_len, block_s))](
        scratch, positions, diagonals, count, k_len, BLOCK_S=block_s, num_warps=4)
    return columns, diagonals
