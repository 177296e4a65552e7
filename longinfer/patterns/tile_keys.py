"""Tile-keys pattern: each query tile its own key columns, from the tile's pooled query.

Vertical-slash gives every row of a head the same columns and diagonals; an index of the keys each
*query tile* needs is finer, and it is still what a tiled kernel walks. Measured on real weights
(``docs/results/gpu-session28/``: Qwen2.5-Coder-1.5B at 128K), key sets per 64-row tile with budgets
uneven over tiles and heads reach issue 6's recall line (0.92 / 0.80) at 4.8% density, and the estimate
below keeps 0.882 / 0.784 at 5% where vertical-slash's best option keeps 0.790 / 0.549.

The estimate: queries are mean-pooled over aligned blocks of ``pool`` positions; the pooled query of
the block holding a tile, against every causal key of the tile's last row (``softmax(q_pool . k * scale)``),
estimates how the tile's attention spreads over keys. A tile keeps

- its **local band**: the ``local`` most recent keys of its last row (causal per row);
- the first ``sink`` keys;
- every other key whose estimated probability is at least ``threshold / Nk`` (``threshold`` times the
  probability of a uniform spread over the whole sequence), at most ``max_keys`` of them (the most probable).

One threshold for every tile and head is one price per kept key: a tile whose attention is spread keeps
many keys, a focused one few, without any per-tile sort (``budget_oracle.py``'s "online price"). In units
of ``1 / Nk`` one value gives about the same density at every length: on PG essays 1.3 kept ~5.6% at 32K
(Qwen2.5-Coder-0.5B) and ~6% at 128K (1.5B, YaRN x4) in the estimate's grid measurements.

Output format (what :func:`longinfer.ops.tile_keys_attention` takes): ``columns [B, H, ceil(Nk / bs), K]``
int64, per query tile (absolute positions) the kept key ids outside the band, ascending, then ``-1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longinfer.ops import reference
from longinfer.patterns._common import (
    check_config_fields,
    check_qk,
    mask_to_index,
    require,
    softmax_scale,
    union_over_groups,
)
from longinfer.patterns.block_sparse import _pool_blocks

SCORES_PER_STEP = 1 << 26  # (head, tile, key) scores per step: 256 MiB of float32


@dataclass(frozen=True)
class TileKeysConfig:
    """Parameters of the tile-keys estimate and kernel.

    Attributes:
        threshold: a key outside the band is kept when its estimated probability is at least
            ``threshold / Nk`` (``Nk``: all key positions).
        pool: query rows averaged into one pooled query (a multiple of ``block_size``; the tiles of one
            pool share its estimate). The estimate costs ``1 / pool`` of dense attention's ``QK^T``.
        local: the most recent keys of each tile's last row always kept (>= ``block_size``, so every
            row keeps its own tile's causal keys).
        sink: the first keys always kept.
        max_keys: at most this many keys per tile besides the band (the most probable); the index width.
        block_size: query tile size (also the kernel's).
    """

    threshold: float = 1.5
    pool: int = 64
    local: int = 128
    sink: int = 4
    max_keys: int = 8192
    block_size: int = 64

    def __post_init__(self) -> None:
        check_config_fields(self)
        name = type(self).__name__
        require(0.0 < self.threshold < math.inf, f"{name}.threshold must be positive and finite, got {self.threshold}")
        require(self.block_size in (16, 32, 64), f"{name}.block_size must be 16, 32 or 64, got {self.block_size}")
        require(self.pool >= self.block_size and self.pool % self.block_size == 0,
                f"{name}.pool must be a multiple of block_size={self.block_size}, got {self.pool}")
        require(self.local >= self.block_size,
                f"{name}.local must be >= block_size={self.block_size} (each row keeps its own tile), got {self.local}")
        require(self.sink >= 0, f"{name}.sink must be >= 0, got {self.sink}")
        require(self.max_keys >= self.sink, f"{name}.max_keys must be >= sink={self.sink}, got {self.max_keys}")


@dataclass(frozen=True)
class TileKeysSelection:
    """A tile-keys index as :func:`longinfer.ops.tile_keys_attention` takes it.

    Attributes:
        columns: ``[B, H, ceil(Nk / block_size), K]`` int64 key ids per query tile (outside its band),
            ascending, ``-1`` = unused.
        k_len: number of key positions ``Nk``.
        local: the band: the ``local`` most recent keys of each tile's last row.
        block_size: query tile size.
    """

    columns: torch.Tensor
    k_len: int
    local: int
    block_size: int = 64

    @property
    def num_heads(self) -> int:
        return self.columns.shape[1]

    def mask(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Reference mask ``[B, H, R, Nk]`` of the kernel for absolute query positions ``rows``."""
        return reference.tile_keys_mask(self.columns, self.k_len, self.local, self.block_size, rows=rows)


def band_starts(num_tiles: int, k_len: int, local: int, block_size: int, device: torch.device) -> torch.Tensor:
    """First key of each query tile's band ``[T]``: ``local`` keys back from the tile's last row."""
    last = torch.clamp((torch.arange(num_tiles, device=device) + 1) * block_size, max=k_len) - 1
    return torch.clamp(last + 1 - local, min=0)


def _tile_chunk(batch: int, q_heads: int, k_len: int) -> int:
    return max(1, SCORES_PER_STEP // max(1, batch * q_heads * k_len))


def estimate_tile_keys(
    q: torch.Tensor,
    k: torch.Tensor,
    config: TileKeysConfig,
    *,
    sm_scale: float | None = None,
    per_kv_group: bool = False,
) -> TileKeysSelection:
    """Estimate the tile-keys index of every head at once.

    Args:
        q: ``[B, Hq, Nq, D]`` (the last ``Nq`` of ``Nk`` positions).
        k: ``[B, Hkv, Nk, D]``, ``Nk >= Nq``.
        config: a :class:`TileKeysConfig`.
        sm_scale: softmax scale, default ``1/sqrt(D)``.
        per_kv_group: one index per KV group (``H = Hkv``): the union of its query heads' keys.

    Returns:
        A :class:`TileKeysSelection` (``columns [B, H, ceil(Nk / bs), K]`` int64, ``-1`` padded; ``K`` the
        most keys any tile keeps, at most ``max_keys`` times the group size for a KV-group union).

    Memory: pooled queries (``1 / pool`` of q, float32) and ``SCORES_PER_STEP`` float32 scores (plus a
    bool and an int64 prefix sum of the same count) per step over query tiles; never N x N.
    """
    if not isinstance(config, TileKeysConfig):
        raise TypeError(f"config must be a TileKeysConfig, got {type(config).__name__}")
    shape = check_qk(q, k)
    scale = softmax_scale(sm_scale, shape.head_dim)
    bs, n = config.block_size, shape.k_len
    num_tiles = math.ceil(n / bs)
    pooled = _pool_blocks(q, shape.q_offset, math.ceil(n / config.pool), config.pool)  # [B, Hq, P, D]
    first_tile = shape.q_offset // bs
    tiles_per_pool = config.pool // bs
    keys = torch.arange(n, device=q.device)
    starts = band_starts(num_tiles, n, config.local, bs, q.device)
    heads = shape.kv_heads if per_kv_group else shape.q_heads
    parts: list[torch.Tensor] = []
    step = _tile_chunk(shape.batch, shape.q_heads, n)
    keys_t = k.float().transpose(-1, -2)  # [B, Hkv, D, N]
    for t0 in range(first_tile, num_tiles, step):
        tiles = torch.arange(t0, min(t0 + step, num_tiles), device=q.device)
        chunk = pooled[:, :, tiles // tiles_per_pool]  # [B, Hq, c, D]
        c = tiles.numel()
        scores = torch.matmul(chunk.reshape(shape.batch, shape.kv_heads, shape.group_size * c, shape.head_dim),
                              keys_t).reshape(shape.batch, shape.q_heads, c, n) * scale
        last = torch.clamp((tiles + 1) * bs, max=n) - 1
        causal = keys[None, :] <= last[:, None]  # [c, N]
        probs = torch.softmax(scores.masked_fill(~causal, -math.inf), dim=-1)
        outside_band = keys[None, :] < starts[tiles][:, None]
        forced = (keys[None, :] < config.sink) & outside_band
        chosen = (probs >= config.threshold / n) & outside_band | forced
        if int(chosen.sum(-1).max()) > config.max_keys:
            ranked = torch.where(chosen, probs + forced.float() * 2.0, -1.0)
            top = ranked.topk(config.max_keys, dim=-1).indices
            chosen = torch.zeros_like(chosen).scatter(-1, top, True) & chosen
        if per_kv_group:
            chosen = union_over_groups(chosen, shape.kv_heads)
        parts.append(mask_to_index(chosen, max(1, int(chosen.sum(-1).max()))))
    width = max([p.shape[-1] for p in parts], default=1)
    columns = torch.full((shape.batch, heads, num_tiles, width), -1, dtype=torch.long, device=q.device)
    t0 = first_tile
    for part in parts:
        columns[:, :, t0: t0 + part.shape[2], : part.shape[-1]] = part
        t0 += part.shape[2]
    return TileKeysSelection(columns=columns, k_len=n, local=config.local, block_size=bs)
