"""Block-sparse pattern: top key blocks per query block from mean-pooled queries and keys.

Queries and keys are mean-pooled over blocks of ``block_size`` absolute positions; the pooled
scores ``softmax(q_block . k_block * scale)`` over the causal key blocks (key block <= query block)
estimate how a query block's attention mass spreads over key blocks. The diagonal block and the
first block (attention sinks) are always kept.

Budgets:

- ``budget="fixed"`` (MInference): the top ``num_blocks`` key blocks per query block.
- ``budget="coverage"``: per query block, the fewest top blocks whose estimated mass reaches
  ``tau``, at least ``min_blocks`` and at most ``num_blocks``.

Output format (what :func:`longinfer.ops.block_sparse_attention` takes): ``block_index
[B, H, ceil(Nk / block_size), K]`` int64 with ``K = num_blocks`` (times ``Hq // Hkv`` for a
per-KV-group union); chosen ids first, ascending, unused slots ``-1``. Query blocks are counted in
absolute positions, so with ``Nk > Nq`` the blocks before the first query hold only ``-1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longinfer.ops import reference
from longinfer.patterns._common import (
    KERNEL_BLOCK_SIZES,
    check_budget,
    check_config_fields,
    check_qk,
    coverage_selection,
    mask_to_index,
    require,
    softmax_scale,
    union_over_groups,
)

QUERY_BLOCK_CHUNK = 512  # query blocks scored per step: memory O(QUERY_BLOCK_CHUNK * Nk / block_size) per head


@dataclass(frozen=True)
class BlockSparseConfig:
    """Parameters of the block-sparse estimate and kernel.

    Attributes:
        num_blocks: key blocks kept per query block (``budget="fixed"``) or at most
            (``"coverage"``); the output width ``K``.
        block_size: query and key block size (also the kernel's).
        budget: ``"fixed"`` or ``"coverage"``.
        tau: coverage target (``budget="coverage"`` only).
        min_blocks: minimum blocks per query block in coverage mode (the forced ones count).
    """

    num_blocks: int = 100
    block_size: int = 64
    budget: str = "fixed"
    tau: float = 0.9
    min_blocks: int = 0

    def __post_init__(self) -> None:
        check_config_fields(self)
        name = type(self).__name__
        check_budget(name, self.budget, self.tau)
        require(self.num_blocks >= 2,
                f"{name}.num_blocks must be >= 2 (the diagonal and the first block are always kept), got {self.num_blocks}")
        require(0 <= self.min_blocks <= self.num_blocks,
                f"{name}.min_blocks must lie in [0, num_blocks={self.num_blocks}], got {self.min_blocks}")
        require(self.block_size in KERNEL_BLOCK_SIZES,
                f"{name}.block_size must be one of {KERNEL_BLOCK_SIZES}, got {self.block_size}")


@dataclass(frozen=True)
class BlockSparseSelection:
    """A block-sparse index as :func:`longinfer.ops.block_sparse_attention` takes it.

    Attributes:
        block_index: ``[B, H, ceil(Nk / block_size), K]`` int64 key-block ids, ``-1`` = unused.
        k_len: number of key positions ``Nk``.
        block_size: query and key block size.
    """

    block_index: torch.Tensor
    k_len: int
    block_size: int = 64

    @property
    def num_heads(self) -> int:
        return self.block_index.shape[1]

    def mask(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Reference mask ``[B, H, R, Nk]`` of the kernel for absolute query positions ``rows``."""
        return reference.block_sparse_mask(self.block_index, self.k_len, self.block_size, rows=rows)


def _pool_blocks(x: torch.Tensor, first_position: int, num_blocks: int, block_size: int) -> torch.Tensor:
    """Mean of ``x [B, H, N, D]`` (rows at positions ``first_position ..``) over absolute position
    blocks -> ``[B, H, num_blocks, D]`` float32; blocks without rows are zero. Summed in float32 from ``x``'s
    dtype: no float32 copy of ``x`` (a padded copy in its dtype when the rows do not fill whole blocks)."""
    bsz, heads, n, d = x.shape
    lead = first_position % block_size
    first_block = first_position // block_size
    total = math.ceil((lead + n) / block_size) * block_size
    padded = torch.nn.functional.pad(x, (0, 0, lead, total - lead - n)) if total != n else x
    sums = padded.reshape(bsz, heads, total // block_size, block_size, d).sum(3, dtype=torch.float32)
    counts = torch.full((total,), 0.0, device=x.device)
    counts[lead: lead + n] = 1.0
    counts = counts.reshape(-1, block_size).sum(1).clamp(min=1.0)
    pooled = torch.zeros(bsz, heads, num_blocks, d, device=x.device)
    pooled[:, :, first_block:] = sums / counts[:, None]
    return pooled


def _block_masses(
    pooled_q: torch.Tensor, pooled_k: torch.Tensor, query_blocks: slice, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled attention mass of the query blocks ``query_blocks`` (``c`` of them) over all key blocks.

    Args:
        pooled_q: ``[B, Hkv, G, T, D]``; pooled_k: ``[B, Hkv, T, D]`` (from :func:`_pool_blocks`).

    Returns:
        ``(mass [B, Hkv, G, c, T], causal [c, T] bool)``; mass is a softmax over causal key blocks.
    """
    bsz, hkv, group, _, d = pooled_q.shape
    chunk = pooled_q[:, :, :, query_blocks]  # [B, Hkv, G, c, D]
    c = chunk.shape[3]
    scores = torch.matmul(chunk.reshape(bsz, hkv, group * c, d), pooled_k.transpose(-1, -2)) * scale
    scores = scores.reshape(bsz, hkv, group, c, -1)
    num_blocks = pooled_k.shape[2]
    query_ids = torch.arange(num_blocks, device=pooled_q.device)[query_blocks]
    causal = torch.arange(num_blocks, device=pooled_q.device)[None, :] <= query_ids[:, None]  # [c, T]
    mass = torch.softmax(scores.masked_fill(~causal, -math.inf), dim=-1)
    return mass, causal


def estimate_block_sparse(
    q: torch.Tensor,
    k: torch.Tensor,
    config: BlockSparseConfig,
    *,
    sm_scale: float | None = None,
    per_kv_group: bool = False,
) -> BlockSparseSelection:
    """Estimate the block-sparse index of every head at once.

    Args:
        q: ``[B, Hq, Nq, D]`` (the last ``Nq`` of ``Nk`` positions).
        k: ``[B, Hkv, Nk, D]``, ``Nk >= Nq``.
        config: a :class:`BlockSparseConfig`.
        sm_scale: softmax scale, default ``1/sqrt(D)``.
        per_kv_group: one index per KV group (``H = Hkv``): the union of its query heads' blocks,
            width ``G * num_blocks``.

    Returns:
        A :class:`BlockSparseSelection` (``block_index [B, H, ceil(Nk / bs), K]`` int64, ``-1`` padded).

    Memory: pooled q/k (``1/block_size`` of q and k, float32) plus
    ``O(B * Hq * QUERY_BLOCK_CHUNK * Nk / block_size)`` floats per step; never N x N.
    """
    if not isinstance(config, BlockSparseConfig):
        raise TypeError(f"config must be a BlockSparseConfig, got {type(config).__name__}")
    shape = check_qk(q, k)
    scale = softmax_scale(sm_scale, shape.head_dim)
    bs = config.block_size
    num_blocks = math.ceil(shape.k_len / bs)
    pooled_q = _pool_blocks(q, shape.q_offset, num_blocks, bs)
    pooled_q = pooled_q.reshape(shape.batch, shape.kv_heads, shape.group_size, num_blocks, shape.head_dim)
    pooled_k = _pool_blocks(k, 0, num_blocks, bs)
    heads = shape.kv_heads if per_kv_group else shape.q_heads
    width = config.num_blocks * (shape.group_size if per_kv_group else 1)
    block_index = torch.full((shape.batch, heads, num_blocks, width), -1, dtype=torch.long, device=q.device)
    first_query_block = shape.q_offset // bs
    for start in range(first_query_block, num_blocks, QUERY_BLOCK_CHUNK):
        blocks = slice(start, min(start + QUERY_BLOCK_CHUNK, num_blocks))
        mass, causal = _block_masses(pooled_q, pooled_k, blocks, scale)
        key_ids = torch.arange(num_blocks, device=q.device)
        query_ids = key_ids[blocks]
        forced = (key_ids[None, :] == query_ids[:, None]) | (key_ids[None, :] == 0)  # [c, T]
        if config.budget == "fixed":
            ranked = torch.where(forced, math.inf, mass.masked_fill(~causal, -1.0))
            top = ranked.topk(min(config.num_blocks, num_blocks), dim=-1).indices
            chosen = torch.zeros_like(mass, dtype=torch.bool).scatter(-1, top, True) & causal
        else:
            chosen = coverage_selection(mass, forced, config.tau, min_count=config.min_blocks,
                                        max_count=config.num_blocks, valid=causal.expand_as(mass))
        chosen = chosen.reshape(shape.batch, shape.q_heads, blocks.stop - blocks.start, num_blocks)
        if per_kv_group:
            chosen = union_over_groups(chosen, shape.kv_heads)
        block_index[:, :, blocks] = mask_to_index(chosen, width)
    return BlockSparseSelection(block_index=block_index, k_len=shape.k_len, block_size=bs)
