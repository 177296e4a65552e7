"""Sparse causal attention kernels: vertical-slash, block-sparse and A-shape.

All three share one Triton kernel (:mod:`longinfer.ops._kernel`) and the conventions of
:func:`longinfer.ops.dense_attention` (shapes, GQA, ``Nk >= Nq`` bottom-right alignment, packed
sequences through ``cu_seqlens_q/k``). Their exact semantics are the masks in
:mod:`longinfer.ops.reference`. Index tensors are ``[B, H, ...]`` with ``H = Hq`` (one index per
query head) or ``H = Hkv`` (one shared by each KV group); positions are absolute key positions.
"""

from __future__ import annotations

import math

import torch

from longinfer.ops._checks import AttentionShape, check_index, check_qkv, check_scale
from longinfer.ops._kernel import MODE_A_SHAPE, MODE_BLOCKS, MODE_TILE_KEYS, MODE_VERTICAL_SLASH
from longinfer.ops._launch import launch
from longinfer.ops.dense import default_splits
from longinfer.ops.index import (
    BlockSparseIndex,
    TileKeysIndex,
    VerticalSlashIndex,
    build_block_sparse_index,
    build_tile_keys_index,
    build_vertical_slash_index,
)

TAIL_SPLIT_KEYS = 8192  # keys per program of a split dense tail tile (default_tail_splits)
TAIL_MAX_SPLITS = 32  # float32 partials of 32 splits: 32 * Hq * 128 rows * D * 4 bytes (25 MB at Hq=12)
A_SHAPE_BLOCK_M = 64  # with 2 query heads stacked per tile when Hq/Hkv is even (faster on H100)
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)
# How the dense last rows of a vertical-slash call run (vertical_slash_attention's tail_launch):
# "fused" was the faster of the in-kernel choices on real indices (H200, session 6); "separate"
# (a split-K pass after the sparse launch) measured the same on the real 64K turn (H200, session 11:
# 4.88 vs 4.86 ms over 4 layers, 60.9 vs 60.0 ms per turn; docs/results/gpu-session11/).
TAIL_LAUNCH = "fused"


def _check_block_size(block_size: int) -> None:
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size {block_size} is not supported; use one of {SUPPORTED_BLOCK_SIZES}")


def _seqlens(cu: torch.Tensor | None) -> torch.Tensor | None:
    return None if cu is None else (cu[1:] - cu[:-1])


def vertical_slash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    vertical: torch.Tensor | None = None,
    slash: torch.Tensor | None = None,
    *,
    index: VerticalSlashIndex | None = None,
    block_size: int = 64,
    sm_scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    dense_from: int | None = None,
    tail_splits: int | None = None,
    tail_launch: str | None = None,
) -> torch.Tensor:
    """Attention over vertical lines (key columns) and slash lines (diagonals).

    Args:
        q, k, v: as :func:`longinfer.ops.dense_attention`.
        vertical: int ``[B, H, V]`` key positions every query attends (causally).
        slash: int ``[B, H, S]`` diagonal offsets: query ``i`` attends key ``i - s``.
        index: a prebuilt :func:`~longinfer.ops.index.build_vertical_slash_index` result, instead of
            ``vertical``/``slash`` (the plan step, reusable across calls).
        block_size: query tile size; each slash is covered for a whole tile, i.e. query ``i``
            gets keys ``[m*bs - s, m*bs + bs - 1 - s]`` (``m = i // bs``), a superset of the exact
            diagonal (see :func:`longinfer.ops.reference.vertical_slash_mask`).
        dense_from: query rows at or after this key position attend every causal key, in the
            same launch (their tiles are scheduled first, so they overlap the sparse tiles); a
            multiple of ``block_size``; not with packed sequences.
        tail_splits: run each dense tile as this many programs over consecutive key ranges,
            merged afterwards (a whole-row tile over 64K keys otherwise outlasts every sparse
            tile of the launch); default :func:`default_tail_splits`. 1 = one program per tile.
        tail_launch: ``"fused"`` (the dense rows' programs in the sparse launch, scheduled first)
            or ``"separate"`` (a split-K dense launch after it, two query heads of a KV group per
            program, ``tail_splits`` default :func:`longinfer.ops.dense.default_splits`); default
            :data:`TAIL_LAUNCH`.

    Entries outside ``[0, Nk)`` and repeats are ignored; order does not matter; empty ``V`` or
    ``S`` are fine. Memory: the index plan, ``O(B * H * (V + S + Nk / block_size))``.
    """
    shape = check_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k)
    scale = check_scale(sm_scale, shape.head_dim)
    _check_block_size(block_size)
    if dense_from is not None:
        if isinstance(dense_from, bool) or not isinstance(dense_from, int) or dense_from < 0 or dense_from % block_size:
            raise ValueError(f"dense_from must be a non-negative multiple of block_size={block_size}, got {dense_from!r}")
        if cu_seqlens_q is not None:
            raise ValueError("dense_from is not supported with packed sequences (cu_seqlens_q); run them one by one")
    if tail_splits is not None and (isinstance(tail_splits, bool) or not isinstance(tail_splits, int) or tail_splits < 1):
        raise ValueError(f"tail_splits must be a positive int, got {tail_splits!r}")
    if index is None:
        if vertical is None or slash is None:
            raise ValueError("pass either vertical and slash, or a prebuilt index")
        v_heads = check_index("vertical", vertical, shape, 3, q.device)
        s_heads = check_index("slash", slash, shape, 3, q.device)
        if v_heads != s_heads:
            raise ValueError(f"vertical has {v_heads} heads but slash has {s_heads}")
        index = build_vertical_slash_index(vertical, slash, shape.k_len, block_size, _seqlens(cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k))
    elif vertical is not None or slash is not None:
        raise ValueError("pass either vertical and slash, or index, not both")
    else:
        check_index("index.columns", index.columns, shape, 3, q.device)
        if index.block_size != block_size or index.k_len != shape.k_len:
            raise ValueError(
                f"index was built for k_len={index.k_len}, block_size={index.block_size}; this call has "
                f"k_len={shape.k_len}, block_size={block_size}: rebuild it"
            )
    tail_launch = TAIL_LAUNCH if tail_launch is None else tail_launch
    if tail_splits is None:
        tail_splits = _default_tail_splits(shape, dense_from, tail_launch)
    return launch(q, k, v, shape, scale, MODE_VERTICAL_SLASH, block_size, vs=index, dense_from=dense_from,
                  cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, tail_splits=tail_splits,
                  tail_launch=tail_launch)


def _default_tail_splits(shape: AttentionShape, dense_from: int | None, tail_launch: str) -> int:
    """Key ranges of the dense tail: :func:`default_tail_splits` fused, :func:`default_splits` of
    the tail's rows as a separate launch."""
    if tail_launch != "separate" or dense_from is None:
        return default_tail_splits(shape.k_len)
    rows = min(shape.q_len, max(0, shape.k_len - dense_from))
    return default_splits(AttentionShape(shape.batch, shape.q_heads, shape.kv_heads, max(rows, 1), shape.k_len,
                                         shape.head_dim))


def default_tail_splits(k_len: int) -> int:
    """Key ranges per dense tail tile: about :data:`TAIL_SPLIT_KEYS` keys each, near what one
    sparse tile computes at the default plan's density (15% of a 64K-key row), at most
    :data:`TAIL_MAX_SPLITS`. Measured on a 4K turn over 64K (H200, session 6): the kernel's time
    summed over 28 layers 69.5 ms with one program per tail tile, 47.1 ms split in 8."""
    return min(TAIL_MAX_SPLITS, max(1, round(k_len / TAIL_SPLIT_KEYS)))


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index: torch.Tensor | None = None,
    *,
    index: BlockSparseIndex | None = None,
    block_size: int = 64,
    sm_scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over listed key blocks per query block.

    Args:
        q, k, v: as :func:`longinfer.ops.dense_attention`.
        block_index: int ``[B, H, ceil(Nk / block_size), K]``: key-block ids for each query block
            (blocks counted in absolute positions, so with ``Nk > Nq`` the first rows are unused);
            ``-1`` marks an unused slot. Blocks above the diagonal are ignored and the diagonal
            block is causal. Repeats and out-of-range ids are ignored.
        index: a prebuilt :func:`~longinfer.ops.index.build_block_sparse_index` result instead.
        block_size: query and key block size.

    Memory: a sorted int32 copy of ``block_index``.
    """
    shape = check_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k)
    scale = check_scale(sm_scale, shape.head_dim)
    _check_block_size(block_size)
    num_blocks = math.ceil(shape.k_len / block_size)
    if (block_index is None) == (index is None):
        raise ValueError("pass exactly one of block_index and index")
    if index is None:
        check_index("block_index", block_index, shape, 4, q.device)
        if block_index.shape[2] != num_blocks:
            raise ValueError(
                f"block_index has {block_index.shape[2]} query blocks; expected ceil({shape.k_len} / {block_size}) "
                f"= {num_blocks}"
            )
        index = build_block_sparse_index(block_index, shape.k_len, block_size)
    else:
        check_index("index.block_ids", index.block_ids, shape, 4, q.device)
        if index.block_size != block_size or index.block_ids.shape[2] != num_blocks:
            raise ValueError("index was built for another block_size or length: rebuild it")
    return launch(q, k, v, shape, scale, MODE_BLOCKS, block_size, blocks=index,
                  cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)


def tile_keys_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    columns: torch.Tensor | None = None,
    *,
    local: int = 128,
    index: TileKeysIndex | None = None,
    block_size: int = 64,
    sm_scale: float | None = None,
    presorted: bool = False,
) -> torch.Tensor:
    """Attention over each query tile's own key columns plus its local band.

    Args:
        q, k, v: as :func:`longinfer.ops.dense_attention` (no packed sequences).
        columns: int ``[B, H, ceil(Nk / block_size), K]``: key ids for each query tile (tiles counted in
            absolute positions); ``-1`` marks an unused slot; repeats, ids past the sequence and ids inside
            the tile's band are ignored. ``H`` is ``Hq`` or ``Hkv`` (one index per KV group).
        local: the band: query ``i`` of tile ``m`` attends the keys ``j <= i`` from ``min(Nk, (m + 1) *
            block_size) - local`` on; at least ``block_size``, so every row sees its own tile.
        index: a prebuilt :func:`~longinfer.ops.index.build_tile_keys_index` result instead of ``columns``.
        block_size: query tile size (16, 32 or 64).
        presorted: ``columns`` are in the estimator's format (per tile ascending, distinct, outside the
            band, then ``-1``): no sort.

    Query ``i`` attends key ``j <= i`` when ``j`` is in its tile's band or listed for its tile
    (:func:`longinfer.ops.reference.tile_keys_mask`). Memory: an int32 copy of ``columns``.
    """
    shape = check_qkv(q, k, v, None, None)
    scale = check_scale(sm_scale, shape.head_dim)
    if block_size not in (16, 32, 64):
        raise ValueError(f"tile_keys_attention takes block_size 16, 32 or 64, got {block_size}")
    if isinstance(local, bool) or not isinstance(local, int) or local < block_size:
        raise ValueError(f"local must be an int >= block_size={block_size} (every row keeps its own tile), got {local!r}")
    num_tiles = math.ceil(shape.k_len / block_size)
    if (columns is None) == (index is None):
        raise ValueError("pass exactly one of columns and index")
    if index is None:
        check_index("columns", columns, shape, 4, q.device)
        if columns.shape[2] != num_tiles:
            raise ValueError(f"columns has {columns.shape[2]} query tiles; expected ceil({shape.k_len} / {block_size}) "
                             f"= {num_tiles}")
        index = build_tile_keys_index(columns, shape.k_len, local, block_size, presorted=presorted)
    else:
        check_index("index.columns", index.columns, shape, 4, q.device)
        if index.block_size != block_size or index.columns.shape[2] != num_tiles or index.local != local:
            raise ValueError("index was built for another block_size, local or length: rebuild it")
        if index.columns.dtype != torch.int32 or index.columns.stride(-1) != 1:
            raise ValueError("index.columns must be int32 with a contiguous last dim: build it with "
                             "build_tile_keys_index")
    return launch(q, k, v, shape, scale, MODE_TILE_KEYS, block_size, tile_keys=index, window=min(local, shape.k_len))


def a_shape_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: int,
    window: int,
    *,
    sm_scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention sinks plus a local window (StreamingLLM's "A-shape").

    Query ``i`` attends key ``j <= i`` when ``j < sink`` or ``i - j < window`` (``window = 1``:
    the query itself). Exact per element (see :func:`longinfer.ops.reference.a_shape_mask`).
    Memory: none beyond the output.
    """
    shape = check_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k)
    scale = check_scale(sm_scale, shape.head_dim)
    for name, value in (("sink", sink), ("window", window)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    return launch(q, k, v, shape, scale, MODE_A_SHAPE, A_SHAPE_BLOCK_M, sink=min(sink, shape.k_len),
                  window=min(window, shape.k_len + 1), cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
