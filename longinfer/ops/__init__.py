"""Sparse-attention kernels (Triton) and their reference semantics.

All functions are causal prefill attention over ``q [B, Hq, N, D]``, ``k, v [B, Hkv, N, D]``
(``Hq % Hkv == 0``; GQA is never materialized) and return ``[B, Hq, N, D]`` in ``q.dtype``.
See :mod:`longinfer.ops.reference` for the exact mask each one computes.
"""

from longinfer.ops.dense import dense_attention
from longinfer.ops.sparse import a_shape_attention, block_sparse_attention, tile_keys_attention, vertical_slash_attention
from longinfer.ops.index import (
    BlockSparseIndex,
    TileKeysIndex,
    VerticalSlashIndex,
    build_block_sparse_index,
    build_tile_keys_index,
    build_vertical_slash_index,
)

__all__ = [
    "dense_attention",
    "vertical_slash_attention",
    "block_sparse_attention",
    "a_shape_attention",
    "tile_keys_attention",
    "TileKeysIndex",
    "build_tile_keys_index",
    "VerticalSlashIndex",
    "BlockSparseIndex",
    "build_vertical_slash_index",
    "build_block_sparse_index",
]
