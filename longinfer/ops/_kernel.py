"""One Triton flash-attention kernel for every pattern: key ranges, then gathered key columns.

Each program computes one query tile (``BLOCK_M`` consecutive query positions, aligned to
multiples of ``BLOCK_M`` in key coordinates) of ``HEADS_PER_TILE`` query heads of one KV group that
share an index (their rows are stacked, so each K/V tile is loaded once for all of them). Its key
set is

1. a list of contiguous key *ranges*, processed in ``BLOCK_N`` tiles with an online softmax; the
   range list depends on ``MODE``:

   - ``DENSE``: ``[0, tile_end)``;
   - ``A_SHAPE``: ``[0, sink)`` and ``[tile_start - window + 1, tile_end)``, masked per element;
   - ``BLOCKS``: one range per listed key block (block-sparse);
   - ``VERTICAL_SLASH``: the groups of nearby slashes (see :mod:`longinfer.ops.index`), walked as
     one flat list of ``BLOCK_N``-key chunks (``BLOCK_N`` = the index's ``chunk``); tiles starting
     at or after ``dense_from`` take ``[0, tile_end)`` instead (dense rows at the end);

   - ``TILE_KEYS``: the tile's band ``[tile_end - window, tile_end)`` (causal per row);

2. for ``VERTICAL_SLASH``, a list of key *columns* (sorted verticals) gathered ``BLOCK_N`` at a
   time; a column already inside one of the tile's ranges is masked out (one lookup in the index's
   ``covered``) so nothing counts twice. For ``TILE_KEYS``, the tile's own list of columns (all before
   its band, by construction of :func:`longinfer.ops.index.build_tile_keys_index`), gathered the same way.

Element masks are applied only on tiles that need them (the diagonal, range ends, the window edge).
Slash chunks take a per-key bias instead (their keys up to the tile's first row; ``slash_masks``),
and the keys past that row, which only the group of the smallest offsets holds, get one masked
step after the chunk loop.
GQA: query head ``h`` reads K/V head ``h // GROUP``; the grid order (see the kernel) keeps the
query heads and neighbouring tiles of one KV head together, so K/V tiles are reused through L2.

Positions: queries are the last ``q_len`` of ``k_len`` positions (bottom-right causal alignment).
Packed sequences (``VARLEN``) take their offsets from ``cu_seqlens_q/k``.

Dense tail (``VERTICAL_SLASH``): the query tiles from ``dense_from`` on attend every causal key.
Run as whole tiles, each is one program over all ``Nk`` keys, several times longer than a sparse
tile's program, and the launch waits for it; split (``tail_splits > 1``), each tail tile is
``tail_splits`` programs over consecutive key ranges that write float32 partials (unnormalized
output, running max and sum), merged by :func:`_merge_splits_fwd` into the output rows.

:func:`_dense_split_fwd` (``dense_attention(splits=...)``) is the dense case for a few query
tiles over many keys (a chunk after a long cached prefix): one program per (query tile, head, key
split), merged by the caller, so the GPU gets enough programs when ``B * Hq * tiles`` alone would
leave most of it idle; :func:`_merge_splits_fwd` merges its partials too.
"""

from __future__ import annotations

import triton
import triton.language as tl

from longinfer.ops._checks import autotune_disk_cache

MODE_DENSE = 0
MODE_A_SHAPE = 1
MODE_BLOCKS = 2
MODE_VERTICAL_SLASH = 3
MODE_TILE_KEYS = 4

# Which vertical-slash chunks mask their scores (the launch option ``slash_masks``); constexpr
# globals so that the kernel can read them (`.value` is the int).
SLASH_MASKS_EVERY = tl.constexpr(0)  # every chunk, element by element
SLASH_MASKS_BIAS = tl.constexpr(1)  # a per-key bias, the diagonal's keys in a masked step after: same output up to rounding
SLASH_MASKS_NONE = tl.constexpr(2)  # none: wrong output wherever a chunk needs a mask, a timing bound only


@triton.jit
def _softmax_update(acc, m_i, l_i, q, k, v, keep, qk_scale, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step. q ``[BM, BD]``, k/v ``[BN, BD]``, keep ``[BM, BN]`` (if MASKED)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # log2 domain
    if MASKED:
        s = tl.where(keep, s, float("-inf"))
    return _fold_scores(acc, m_i, l_i, s, v, PRECISION)


@triton.jit
def _fold_scores(acc, m_i, l_i, s, v, PRECISION: tl.constexpr):
    """Fold scores ``s [BM, BN]`` (log2 domain, ``-inf`` for masked keys) and ``v [BN, BD]`` into
    the running output ``acc``, row max ``m_i`` and row sum ``l_i``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with every key masked so far keeps m = -inf; shift by 0 instead to avoid inf - inf.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _tile_step(
    acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn,
    start, r_end, rows, offs_n, offs_d, d_ok, qk_scale, sink, window,
    MASKED: tl.constexpr, A_SHAPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Attend the key tile ``[start, start + BLOCK_N)`` (keys ``< r_end``), with element masks
    (``MASKED``) or without (every key of the tile visible to every row)."""
    cols = start + offs_n
    col_ok = cols < r_end
    load_ok = (col_ok[:, None] & d_ok[None, :]) if MASKED else d_ok[None, :]  # unmasked tiles: all in range
    k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=load_ok, other=0.0)
    v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=load_ok, other=0.0)
    keep = (cols[None, :] <= rows[:, None]) & col_ok[None, :]
    if A_SHAPE:
        keep = keep & ((cols[None, :] < sink) | (rows[:, None] - cols[None, :] < window))
    return _softmax_update(acc, m_i, l_i, q, k, v, keep, qk_scale, MASKED, PRECISION)


@triton.jit
def _attend_tiles(
    acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn,
    t_start, t_end, r_end, rows, offs_n, offs_d, d_ok, qk_scale, sink, window,
    MASKED: tl.constexpr, A_SHAPE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """Attend the ``BLOCK_N``-key tiles starting at ``t_start, t_start + BLOCK_N, ... < t_end`` (keys
    ``< r_end``), each by :func:`_tile_step`."""
    for start in range(t_start, t_end, BLOCK_N):
        acc, m_i, l_i = _tile_step(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, start, r_end, rows,
                                   offs_n, offs_d, d_ok, qk_scale, sink, window, MASKED, A_SHAPE, PRECISION)
    return acc, m_i, l_i


@triton.jit
def _attend_range(
    acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn,
    r_start, r_end, rows, offs_n, offs_d, d_ok, tile_start, qk_scale, sink, window,
    A_SHAPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Attend keys ``[r_start, r_end)`` (already clipped to ``<= last row``) in BLOCK_N tiles.

    Masks are needed on the tiles that cross the diagonal or the range end (a suffix of the tiles)
    and, for A-shape, on those before the window's full width (a prefix); with ``SPLIT`` each group
    runs in its own loop, in the tiles' order. Without, one loop branches per tile between the masked
    and the unmasked step (the same output): compiled with triton 3.6 for sm_90 its loads and dots
    are synchronous (no software pipelining), while separate loops are pipelined like the
    vertical-slash loops. The one-loop form is kept as a launch option to time against.
    """
    if not SPLIT:
        for start in range(r_start, r_end, BLOCK_N):
            needs_mask = (start + BLOCK_N > tile_start + 1) | (start + BLOCK_N > r_end)
            if A_SHAPE:
                needs_mask = needs_mask | (start < tile_start + BLOCK_M - window)
            if needs_mask:
                acc, m_i, l_i = _tile_step(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, start, r_end,
                                           rows, offs_n, offs_d, d_ok, qk_scale, sink, window, True, A_SHAPE, PRECISION)
            else:
                acc, m_i, l_i = _tile_step(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, start, r_end,
                                           rows, offs_n, offs_d, d_ok, qk_scale, sink, window, False, A_SHAPE, PRECISION)
    else:
        # Tile j (start r_start + j * BLOCK_N) needs no mask iff its last key is visible to the tile's
        # first row and lies in the range (j < full_tiles) and, for A-shape, it starts at or after
        # `edge` (j >= edge_tiles).
        full_tiles = tl.maximum(tl.minimum(tile_start + 1, r_end) - r_start, 0) // BLOCK_N
        prefix_end = r_start
        if A_SHAPE:
            edge = tile_start + BLOCK_M - window
            edge_tiles = (tl.maximum(edge - r_start, 0) + BLOCK_N - 1) // BLOCK_N
            prefix_end = tl.minimum(r_start + edge_tiles * BLOCK_N, r_end)
            acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, r_start, prefix_end,
                                          r_end, rows, offs_n, offs_d, d_ok, qk_scale, sink, window,
                                          True, True, BLOCK_N, PRECISION)
        masked_from = tl.maximum(prefix_end, r_start + full_tiles * BLOCK_N)
        acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, prefix_end, masked_from,
                                      r_end, rows, offs_n, offs_d, d_ok, qk_scale, sink, window,
                                      False, A_SHAPE, BLOCK_N, PRECISION)
        acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, masked_from, r_end,
                                      r_end, rows, offs_n, offs_d, d_ok, qk_scale, sink, window,
                                      True, A_SHAPE, BLOCK_N, PRECISION)
    return acc, m_i, l_i


# Arguments that follow the prompt length are not specialized (Triton would otherwise compile one
# variant per divisibility of each by 16: a new prompt length could cost a recompile, 1.5-2.3 s on a
# fresh H200 in session 13), except those whose divisibility changes the compiled code. Compiled
# for sm_90 with triton 3.6 (the GPU machine's), only q_len, k_len and keys_per_tail_split do (the
# masks at the key length); leaving all of them unspecialized made the kernel 4-11% slower per layer
# on the H200 (session 14, docs/results/gpu-session14/). keys_per_tail_split is a multiple of 128
# whatever the length, so only the divisibility of q_len and k_len by 16 selects a variant: at most
# four per configuration, which `longinfer warmup` compiles.
_LENGTH_ARGUMENTS = [
    "num_tiles", "first_tile", "sink", "window", "dense_from", "tail_programs", "tail_splits",
    "tail_first_tile", "num_tail_tiles", "tune_bucket",
    "stride_bi_b", "stride_bi_h", "stride_bi_m", "stride_ch_b", "stride_ch_h", "stride_cn_b", "stride_cn_h",
    "stride_cv_b", "stride_cv_h", "stride_c_b", "stride_c_h", "stride_cc_b", "stride_cc_h", "stride_bc_b", "stride_bc_h",
]


@triton.jit(do_not_specialize=_LENGTH_ARGUMENTS)
def _sparse_attention_fwd(
    Q, K, V, Out,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    q_len, k_len, CuSeqQ, CuSeqK,
    num_q_heads, num_tiles, first_tile, qk_scale,
    sink, window, dense_from,
    TailAcc, TailMax, TailSum, tail_programs, tail_splits, tail_first_tile, num_tail_tiles, keys_per_tail_split,
    BlockIdx, stride_bi_b, stride_bi_h, stride_bi_m,
    ChunkStart, ChunkEnd, ChunkCount, stride_ch_b, stride_ch_h, stride_cn_b, stride_cn_h,
    Covered, stride_cv_b, stride_cv_h,
    Cols, ColCount, stride_c_b, stride_c_h, stride_cc_b, stride_cc_h,
    INDEX_HEAD_DIV, BlockCount, stride_bc_b, stride_bc_h, tune_bucket,
    HEADS_PER_TILE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr, VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, COVERED_IN_LOADS: tl.constexpr, SPLIT_RANGES: tl.constexpr,
    SLASH_MASKS: tl.constexpr = SLASH_MASKS_BIAS,
):
    # One flat grid, ordered (batch, KV head, query tile from the last, query heads of the group).
    # Programs running at the same time then work on one KV head and neighbouring tiles, so its
    # K/V stays in L2 (the whole K/V of a long sequence does not fit there), and the query heads
    # of the group (stacked HEADS_PER_TILE to a tile when they share an index) reuse each K/V tile.
    # Long (late) tiles go first for causal load balance. Main programs cover the tiles
    # [first_tile, first_tile + num_tiles); with a split dense tail, the first `tail_programs`
    # programs (scheduled before every sparse tile) each take one key split of one tail tile.
    pid = tl.program_id(0)
    head_tiles_per_group = GROUP // HEADS_PER_TILE
    is_tail = pid < tail_programs
    if is_tail:
        split = pid % tail_splits
        unit = pid // tail_splits
        tiles_here = num_tail_tiles
        tile0 = tail_first_tile
    else:
        split = 0
        unit = pid - tail_programs
        tiles_here = num_tiles
        tile0 = first_tile
    head_tile = unit % head_tiles_per_group
    tile = tile0 + tiles_here - 1 - (unit // head_tiles_per_group) % tiles_here
    batch_kv = unit // (head_tiles_per_group * tiles_here)
    b = batch_kv // (num_q_heads // GROUP)
    h = (batch_kv % (num_q_heads // GROUP)) * GROUP + head_tile * HEADS_PER_TILE  # first query head of the tile
    kvh = h // GROUP
    idx_h = h // INDEX_HEAD_DIV
    # Base offsets in int64: head * N * D alone passes 2**31 from about 512K tokens with 32 heads.
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    kvh64 = kvh.to(tl.int64)

    if VARLEN:
        q_tok0 = tl.load(CuSeqQ + b)
        k_tok0 = tl.load(CuSeqK + b)
        n_q = tl.load(CuSeqQ + b + 1) - q_tok0
        n_k = tl.load(CuSeqK + b + 1) - k_tok0
        q_base = Q + q_tok0.to(tl.int64) * stride_qn + h64 * stride_qh
        o_base = Out + q_tok0.to(tl.int64) * stride_on + h64 * stride_oh
        k_base = K + k_tok0.to(tl.int64) * stride_kn + kvh64 * stride_kh
        v_base = V + k_tok0.to(tl.int64) * stride_vn + kvh64 * stride_vh
    else:
        n_q = q_len
        n_k = k_len
        q_base = Q + b64 * stride_qb + h64 * stride_qh
        o_base = Out + b64 * stride_ob + h64 * stride_oh
        k_base = K + b64 * stride_kb + kvh64 * stride_kh
        v_base = V + b64 * stride_vb + kvh64 * stride_vh

    shift = n_k - n_q  # absolute position of query row 0
    tile_start = tile * BLOCK_M
    if (tile_start + BLOCK_M <= shift) | (tile_start >= n_k):
        return
    tile_end = tl.minimum(tile_start + BLOCK_M, n_k)  # keys past the tile's last row are never needed

    tile_rows = tl.arange(0, BLOCK_M * HEADS_PER_TILE)  # row r: head h + r // BLOCK_M
    rows = tile_start + tile_rows % BLOCK_M  # absolute positions
    row_ptr_offset = (tile_rows // BLOCK_M) * stride_qh + (rows - shift) * stride_qn
    row_ok = (rows >= shift) & (rows < n_k)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_base + row_ptr_offset[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    acc = tl.zeros([BLOCK_M * HEADS_PER_TILE, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M * HEADS_PER_TILE], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M * HEADS_PER_TILE], dtype=tl.float32)

    if is_tail:  # one key split of a dense tail tile; the caller merges the splits
        k_lo = split * keys_per_tail_split
        k_hi = tl.minimum(k_lo + keys_per_tail_split, tile_end)
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, k_lo, k_hi,
                                      rows, offs_n, offs_d, d_ok, tile_start, qk_scale, 0, 0,
                                      False, BLOCK_M, BLOCK_N, PRECISION, SPLIT_RANGES)
    elif MODE == 0:  # dense
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, 0, tile_end,
                                      rows, offs_n, offs_d, d_ok, tile_start, qk_scale, 0, 0,
                                      False, BLOCK_M, BLOCK_N, PRECISION, SPLIT_RANGES)
    elif MODE == 1:  # A-shape: sinks, then the window (the two never overlap)
        sink_end = tl.minimum(sink, tile_end)
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, 0, sink_end,
                                      rows, offs_n, offs_d, d_ok, tile_start, qk_scale, sink, window,
                                      True, BLOCK_M, BLOCK_N, PRECISION, SPLIT_RANGES)
        win_start = tl.maximum(tile_start - window + 1, sink_end)
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, win_start, tile_end,
                                      rows, offs_n, offs_d, d_ok, tile_start, qk_scale, sink, window,
                                      True, BLOCK_M, BLOCK_N, PRECISION, SPLIT_RANGES)
    elif MODE == 2:  # block-sparse: ids sorted ascending; the first `count` are the blocks <= tile
        slot_base = BlockIdx + b * stride_bi_b + idx_h * stride_bi_h + tile * stride_bi_m
        count = tl.load(BlockCount + b * stride_bc_b + idx_h * stride_bc_h + tile)
        has_diagonal = tl.load(slot_base + count - 1, mask=count > 0, other=-1) == tile
        n_off_diagonal = count - has_diagonal.to(tl.int32)
        # A flat loop over whole key blocks (BLOCK_M keys each) needs no mask and pipelines well.
        block_offs = tl.arange(0, BLOCK_M)
        for slot in range(0, n_off_diagonal):
            cols = tl.load(slot_base + slot) * BLOCK_M + block_offs
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            acc, m_i, l_i = _softmax_update(acc, m_i, l_i, q, k, v, block_offs[None, :] >= 0, qk_scale, False, PRECISION)
        if has_diagonal:
            acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn,
                                          tile_start, tile_end, rows, offs_n, offs_d, d_ok, tile_start,
                                          qk_scale, 0, 0, False, BLOCK_M, BLOCK_N, PRECISION, SPLIT_RANGES)
    elif MODE == 4:  # tile keys: the band, then the tile's own columns (ids in BlockIdx, counts in BlockCount)
        band_start = tl.maximum(tile_end - window, 0)
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, band_start, tile_end,
                                      rows, offs_n, offs_d, d_ok, tile_start, qk_scale, 0, 0,
                                      False, BLOCK_M, BLOCK_N, PRECISION, SPLIT_RANGES)
        slot_base = BlockIdx + b * stride_bi_b + idx_h * stride_bi_h + tile * stride_bi_m
        n_cols = tl.load(BlockCount + b * stride_bc_b + idx_h * stride_bc_h + tile)
        for c0 in range(0, n_cols, BLOCK_N):
            c_ok = (c0 + offs_n) < n_cols
            cols = tl.load(slot_base + c0 + offs_n, mask=c_ok, other=0)
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=c_ok[:, None] & d_ok[None, :],
                        other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=c_ok[:, None] & d_ok[None, :],
                        other=0.0)
            keep = (cols[None, :] <= rows[:, None]) & c_ok[None, :]
            acc, m_i, l_i = _softmax_update(acc, m_i, l_i, q, k, v, keep, qk_scale, True, PRECISION)
    elif tile_start >= dense_from:  # vertical-slash, a dense tile at the end
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, 0, tile_end,
                                      rows, offs_n, offs_d, d_ok, tile_start, qk_scale, 0, 0,
                                      False, BLOCK_M, BLOCK_N, PRECISION, SPLIT_RANGES)
    else:  # vertical-slash
        # Slash keys: one flat loop over the index's chunks (offsets from the tile start, the same
        # for every tile), so the loads of the next chunks are in flight while one is computed.
        ch_base = b * stride_ch_b + idx_h * stride_ch_h
        n_chunks = tl.load(ChunkCount + b * stride_cn_b + idx_h * stride_cn_h + tile)
        diagonal_end = tl.full([], 0, tl.int32)  # keys [tile_start + 1, tile_start + this) wait for the last step
        for i in range(0, n_chunks):
            rel_start = tl.load(ChunkStart + ch_base + i)
            rel_end = tl.load(ChunkEnd + ch_base + i)
            cols = tile_start + rel_start + offs_n
            col_end = tl.minimum(tile_start + rel_end, tile_end)
            col_ok = (cols >= 0) & (cols < col_end)
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if SLASH_MASKS == SLASH_MASKS_BIAS:
                # Only the keys every row of the tile sees (up to its first row): a per-key bias, one
                # add instead of a compare-and-select per element, and no branch to stop the loads
                # pipelining. The keys past the first row wait for the masked step after the loop.
                visible = col_ok & (cols <= tile_start)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
                s = s + tl.where(visible, 0.0, float("-inf"))[None, :]
                acc, m_i, l_i = _fold_scores(acc, m_i, l_i, s, v, PRECISION)
                diagonal_end = tl.maximum(diagonal_end, rel_end)
            else:
                keep = (cols[None, :] <= rows[:, None]) & col_ok[None, :]
                acc, m_i, l_i = _softmax_update(acc, m_i, l_i, q, k, v, keep, qk_scale,
                                                SLASH_MASKS == SLASH_MASKS_EVERY, PRECISION)
        if SLASH_MASKS == SLASH_MASKS_BIAS:
            # Only the group of the smallest offsets reaches past the tile's first row (groups lie more
            # than BLOCK_M offsets apart), and its range is contiguous: its keys there are exactly
            # [tile_start + 1, tile_start + diagonal_end), attended here with the causal mask.
            diagonal_stop = tl.minimum(tile_start + diagonal_end, tile_end)
            acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, tile_start + 1,
                                          diagonal_stop, diagonal_stop, rows, offs_n, offs_d, d_ok, qk_scale, 0, 0,
                                          True, False, BLOCK_N, PRECISION)
        # Columns: the sorted verticals before the tile's end, minus those a slash chunk covered
        # (a lookup by d = tile_start - column, see VerticalSlashIndex.covered).
        c_base = Cols + b * stride_c_b + idx_h * stride_c_h
        cv_base = Covered + b * stride_cv_b + idx_h * stride_cv_h + (tile_start + BLOCK_M - 1)
        n_cols = tl.load(ColCount + b * stride_cc_b + idx_h * stride_cc_h + tile)
        for c0 in range(0, n_cols, BLOCK_N):
            c_ok = (c0 + offs_n) < n_cols
            cols = tl.load(c_base + c0 + offs_n, mask=c_ok, other=0)
            covered = tl.load(cv_base - cols, mask=c_ok, other=0) != 0
            # Without COVERED_IN_LOADS the K/V loads wait only for `cols`, not for the `covered`
            # lookup too (a shorter chain of dependent loads); covered columns are loaded and masked.
            load_ok = c_ok & ~covered if COVERED_IN_LOADS else c_ok
            c_ok = c_ok & ~covered
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=load_ok[:, None] & d_ok[None, :],
                        other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=load_ok[:, None] & d_ok[None, :],
                        other=0.0)
            keep = (cols[None, :] <= rows[:, None]) & c_ok[None, :]
            acc, m_i, l_i = _softmax_update(acc, m_i, l_i, q, k, v, keep, qk_scale, True, PRECISION)

    if is_tail:  # partials [B, Hq, tail_splits, num_tail_tiles * BLOCK_M] (+ [.., BLOCK_D] for TailAcc)
        tail_rows = num_tail_tiles * BLOCK_M
        head_rows = b64 * num_q_heads + h64 + (tile_rows // BLOCK_M)
        stat = (head_rows * tail_splits + split) * tail_rows + (tile - tail_first_tile) * BLOCK_M + tile_rows % BLOCK_M
        tl.store(TailMax + stat, m_i)
        tl.store(TailSum + stat, l_i)
        tl.store(TailAcc + stat[:, None] * BLOCK_D + offs_d[None, :], acc)
    else:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # rows with no key at all give zeros
        out = acc / l_safe[:, None]
        out_ptr_offset = (tile_rows // BLOCK_M) * stride_oh + (rows - shift) * stride_on
        tl.store(o_base + out_ptr_offset[:, None] + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])


def _tuning_configs() -> list[triton.Config]:
    """Key-tile sizes, warps and stages the autotuner tries on the GPU (once per shape bucket)."""
    return [
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=st)
        # The best three of a sweep of five on an H100 (benchmarks/results/kernels-*-check.md),
        # 32-key tiles for the narrow ranges of 16- and 32-row query tiles (BLOCK_M is in the key),
        # and 8 warps for tiles of 128 rows and more (128-row tiles, stacked heads).
        for bn, w, st in ((64, 4, 3), (128, 4, 3), (64, 4, 2), (32, 4, 3), (32, 2, 3), (64, 8, 3), (128, 8, 3))
    ]


# tune_bucket = log2 of the key length, so each length scale gets its own choice.
_TUNING_KEY = ["HEAD_DIM", "MODE", "BLOCK_M", "HEADS_PER_TILE", "VARLEN", "tune_bucket"]
sparse_attention_fwd_tuned = triton.autotune(configs=_tuning_configs(), key=_TUNING_KEY,
                                             **autotune_disk_cache())(_sparse_attention_fwd)


@triton.jit(do_not_specialize=["q_len", "k_len", "num_tiles"])  # keys_per_split: whole key tiles, always
def _dense_split_fwd(
    Q, K, V, Acc, Max, Sum,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    q_len, k_len, num_q_heads, num_tiles, keys_per_split, qk_scale,
    GROUP: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """Dense causal attention of one query tile over one split of the keys (split-K).

    Grid ``(splits, B * (Hq / HEADS) * tiles)``; each program stacks ``HEADS`` query heads of one
    KV group (``HEADS`` divides ``GROUP``): row ``r`` is head ``h0 + r // BLOCK_M``, query
    ``t * BLOCK_M + r % BLOCK_M`` of tile ``t``, at key position ``k_len - q_len`` + that query,
    so each K/V tile loaded serves every stacked head. Writes the unnormalized output
    ``Acc [S, B, Hq, Nq_pad, D]`` (float32) and the running max ``Max`` (log2 domain) and sum
    ``Sum`` ``[S, B, Hq, Nq_pad]`` of its keys ``[s * keys_per_split, ...)``; a split with no
    visible key writes ``0, -inf, 0``. The caller merges the splits (:func:`_merge_splits_fwd`).
    """
    split = tl.program_id(0)
    pid = tl.program_id(1)
    tile = pid % num_tiles
    unit = pid // num_tiles  # (batch, stack of HEADS query heads)
    stacks_per_batch = num_q_heads // HEADS
    b = unit // stacks_per_batch
    h0 = (unit % stacks_per_batch) * HEADS
    b64 = b.to(tl.int64)
    q_base = Q + b64 * stride_qb + h0.to(tl.int64) * stride_qh
    k_base = K + b64 * stride_kb + (h0 // GROUP).to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + (h0 // GROUP).to(tl.int64) * stride_vh

    shift = k_len - q_len
    stacked = tl.arange(0, BLOCK_M * HEADS)
    head_offset = stacked // BLOCK_M
    query = tile * BLOCK_M + stacked % BLOCK_M
    rows = shift + query  # absolute positions
    row_ok = query < q_len
    first_row = shift + tile * BLOCK_M
    keys_end = tl.minimum(first_row + BLOCK_M, k_len)  # the tile's last row sees keys < keys_end
    k_lo = split * keys_per_split
    k_hi = tl.minimum(k_lo + keys_per_split, keys_end)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_rows = head_offset.to(tl.int64) * stride_qh + query.to(tl.int64) * stride_qn
    q = tl.load(q_base + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    acc = tl.zeros([BLOCK_M * HEADS, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M * HEADS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M * HEADS], dtype=tl.float32)
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, k_lo, k_hi,
                                  rows, offs_n, offs_d, d_ok, first_row, qk_scale, 0, 0,
                                  False, BLOCK_M, BLOCK_N, PRECISION, True)
    q_pad = num_tiles * BLOCK_M
    batch_heads = tl.num_programs(1) // num_tiles * HEADS  # B * Hq
    head = (b * num_q_heads + h0 + head_offset).to(tl.int64)
    stat = (split * batch_heads + head) * q_pad + query
    tl.store(Max + stat, m_i)
    tl.store(Sum + stat, l_i)
    tl.store(Acc + stat[:, None] * BLOCK_D + offs_d[None, :], acc)


@triton.jit(do_not_specialize=["splits", "stride_split", "stride_head", "rows", "out_row0"])
def _merge_splits_fwd(
    Acc, Max, Sum, Out, splits, stride_split, stride_head, num_q_heads, rows, out_row0,
    stride_ob, stride_oh, stride_on,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Merge split-K partials into ``BLOCK_R`` output rows of one (batch, query head).

    Grid ``(B * Hq, cdiv(rows, BLOCK_R))``. Partials of row ``r`` of split ``s`` and head ``bh``
    sit at ``bh * stride_head + s * stride_split + r`` (in rows: ``Max``/``Sum`` float32, the
    log2-domain running max and sum; ``Acc`` the unnormalized output, ``BLOCK_D`` floats per row);
    a split with no visible key holds ``(0, -inf, 0)``. Row ``r`` goes to ``Out`` row
    ``out_row0 + r`` (``Out [B, Hq, Nq, D]``, strided), normalized, in ``Out``'s dtype.
    """
    bh = tl.program_id(0)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rows
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row0 = bh.to(tl.int64) * stride_head + r
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for split in range(0, splits):
        m = tl.maximum(m, tl.load(Max + row0 + split * stride_split, mask=r_ok, other=float("-inf")))
    m_shift = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    for split in range(0, splits):
        at = row0 + split * stride_split
        weight = tl.exp2(tl.load(Max + at, mask=r_ok, other=float("-inf")) - m_shift)
        l_i += weight * tl.load(Sum + at, mask=r_ok, other=0.0)
        part = tl.load(Acc + at[:, None] * BLOCK_D + offs_d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        acc += weight[:, None] * part
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    b = (bh // num_q_heads).to(tl.int64)
    h = (bh % num_q_heads).to(tl.int64)
    out_ptr = Out + b * stride_ob + h * stride_oh + (out_row0 + r).to(tl.int64)[:, None] * stride_on + offs_d[None, :]
    tl.store(out_ptr, out.to(Out.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])
