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
- with ``question_columns = C``: the ``C`` keys the call's last ``question_q`` queries attend most (their mean
  causal probability, as vertical-slash estimates its columns), in every tile where they lie before the band;
- every other key whose estimated probability is at least ``threshold / Nk`` (``threshold`` times the
  probability of a uniform spread over the whole sequence). A tile where that keeps more than ``max_keys``
  doubles its threshold until it keeps at most ``max_keys`` (at most
  :func:`~longinfer.patterns._tile_keys_kernel.cap_levels` doublings: probabilities sum to 1).

One threshold for every tile and head is one price per kept key: a tile whose attention is spread keeps
many keys, a focused one few, without any per-tile sort (``budget_oracle.py``'s "online price"). In units
of ``1 / Nk`` one value gives about the same density at every length: on PG essays 1.3 kept ~5.6% at 32K
(Qwen2.5-Coder-0.5B) and ~6% at 128K (1.5B, YaRN x4) in the estimate's grid measurements.

Output: a :class:`TileKeysSelection` holding the kernel's index (what :func:`longinfer.ops.tile_keys_attention`
takes as ``index``): per query tile (absolute positions) the kept key ids outside the band, ascending, and
their count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longinfer.ops import reference
from longinfer.ops.index import TileKeysIndex, build_tile_keys_index, tile_band_starts, tile_last_rows
from longinfer.patterns._common import (
    check_config_fields,
    check_estimate_backend,
    check_qk,
    mask_to_index,
    require,
    softmax_scale,
    triton_estimate_supported,
    union_packed_over_groups,
)
from longinfer.patterns._tile_keys_kernel import cap_levels, select_tile_keys
from longinfer.patterns.block_sparse import _pool_blocks
from longinfer.patterns.vertical_slash import VerticalSlashConfig, estimate_masses

SCORES_PER_STEP = 1 << 26  # (head, tile, key) scores per step: 256 MiB of float32


@dataclass(frozen=True)
class TileKeysConfig:
    """Parameters of the tile-keys estimate and kernel.

    Attributes:
        threshold: a key outside the band is kept when its estimated probability is at least
            ``threshold / Nk`` (``Nk``: all key positions).
        pool: query rows averaged into one pooled query (a multiple of ``block_size``; the tiles of one
            pool share it). Each tile's pooled query is scored on its own (its causal keys and band differ),
            so the estimate costs about ``2 / block_size`` of causal ``QK^T`` whatever the pool.
        local: the most recent keys of each tile's last row always kept (>= ``block_size``, so every
            row keeps its own tile's causal keys).
        sink: the first keys always kept.
        max_keys: at most this many keys per tile besides the band (a tile over it doubles its threshold
            until it is within). The Triton estimate holds ``B * Hq * T * max_keys`` int32 ids (1.6 GB at
            128K with Hq=12).
        block_size: query tile size (also the kernel's).
        queries: pooled queries per tile (a power of 2 up to ``block_size``; more than 1 needs ``pool ==
            block_size``): the tile's rows split into ``queries`` aligned groups, each pooled and scored on its
            own; a key is kept when one of them reaches the threshold. Heads whose rows attend different keys
            (retrieval-like heads: each row its own few far keys) blur in one mean; each query
            more costs one more ``1 / block_size`` of ``QK^T`` (``queries = block_size``: every row scored, two
            passes of the full causal ``QK^T``, for the few heads nothing cheaper reads).
        question_columns: keep, in every tile, the keys that the call's last ``question_q`` queries give the most
            mean probability (this many per query head; 0 = none). A prompt's last rows are its question: the keys
            they read (the needles, the assignments a variable chain runs through) are what the rest of the prompt
            must carry to them, and a pooled query per tile does not read them: on the 1.5B at 128K every-head
            ``tile_keys`` plans lost 38-44 RULER-style points to dense with needle and recall intact, 19 with 1,000
            question columns (``docs/results/gpu-session31/``). Vertical-slash's columns come from the same rows.
        question_q: the last query rows of the call that choose ``question_columns`` (two passes of them over the
            keys, as vertical-slash's ``last_q``).
        score_dims: score on this many of the ``D`` dimensions only (0 = all): per query head, those with the
            largest ``sum q_d^2 * sum k_d^2`` over the call's pooled queries and its KV head's keys, chosen at
            each call. The estimate's multiply-adds scale by ``score_dims / D`` (plus a copy of k per query head
            on its dimensions). On Qwen2.5-Coder-0.5B at 32K, half of the 64 dimensions kept every-row scoring's
            recall within 0.011 on its retrieval-like heads, a quarter lost up to 0.29
            (``docs/results/cheap-row-scores-cpu-qwen0.5b-32k/``); with pooled queries half of them cost 0.003-0.005
            mean recall (a mean query blurs the dimensions one row retrieves on): meant for ``queries=block_size``.
    """

    threshold: float = 1.5
    pool: int = 64
    local: int = 128
    sink: int = 4
    max_keys: int = 16384
    block_size: int = 64
    queries: int = 1
    score_dims: int = 0
    question_columns: int = 0
    question_q: int = 64

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
        require(self.queries in (1, 2, 4, 8, 16, 32, 64) and self.queries <= self.block_size,
                f"{name}.queries must be a power of 2 up to block_size={self.block_size}, got {self.queries}")
        require(self.queries == 1 or self.pool == self.block_size,
                f"{name}.queries > 1 splits each tile: pool must equal block_size={self.block_size}, got {self.pool}")
        require(self.score_dims >= 0, f"{name}.score_dims must be >= 0 (0 = every dimension), got {self.score_dims}")
        require(self.question_columns >= 0, f"{name}.question_columns must be >= 0 (0 = none), got {self.question_columns}")
        require(self.question_q >= 1, f"{name}.question_q must be >= 1, got {self.question_q}")
        require(self.max_keys >= self.sink + self.question_columns,
                f"{name}.max_keys must be >= sink + question_columns = {self.sink + self.question_columns}, got {self.max_keys}")


@dataclass(frozen=True)
class TileKeysSelection:
    """A tile-keys index: the kernel's :class:`~longinfer.ops.index.TileKeysIndex` and the sequence length.

    Attributes:
        index: per query tile the kept key ids outside its band, ascending (``columns [B, H, T, K]`` int32,
            slots past ``column_count [B, H, T]`` unspecified), ``local`` and ``block_size``.
        k_len: number of key positions ``Nk``.
    """

    index: TileKeysIndex
    k_len: int

    @classmethod
    def from_columns(cls, columns: torch.Tensor, k_len: int, local: int, block_size: int) -> TileKeysSelection:
        """From packed ids ``[B, H, T, K]`` (per tile ascending, distinct, outside its band, then ``-1``)."""
        return cls(build_tile_keys_index(columns, k_len, local, block_size, presorted=True), k_len)

    @property
    def num_heads(self) -> int:
        return self.index.num_heads

    @property
    def local(self) -> int:
        return self.index.local

    @property
    def block_size(self) -> int:
        return self.index.block_size

    @property
    def columns(self) -> torch.Tensor:
        """The ids as ``[B, H, T, K]`` int64, ``-1`` past each tile's count: a copy (8 bytes per slot), for
        reference masks and unions."""
        ids = self.index.columns.long()
        slots = torch.arange(ids.shape[-1], device=ids.device)
        return ids.masked_fill(slots >= self.index.column_count[..., None].long(), -1)

    def mask(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Reference mask ``[B, H, R, Nk]`` of the kernel for absolute query positions ``rows``."""
        return reference.tile_keys_mask(self.columns, self.k_len, self.local, self.block_size, rows=rows)


def _tile_chunk(batch: int, heads: int, k_len: int) -> int:
    return max(1, SCORES_PER_STEP // max(1, batch * heads * k_len))


def _pooled_queries(q: torch.Tensor, q_offset: int, k_len: int, config: TileKeysConfig) -> torch.Tensor:
    """Each tile's pooled queries ``[B, Hq, T * queries, D]`` float32 (tile ``t``'s at rows ``t * queries ..``):
    means over aligned groups of ``pool / queries`` positions. A group without query rows (before the first
    query or past the end) takes its tile's nearest group that has some: a copy adds nothing to the union."""
    rows_per_query = config.pool // config.queries
    pooled = _pool_blocks(q, q_offset, math.ceil(k_len / rows_per_query), rows_per_query)
    bs = config.block_size
    starts = torch.arange(math.ceil(k_len / bs), device=q.device)[:, None] * bs  # [T, 1]
    group = ((starts + torch.arange(config.queries, device=q.device) * rows_per_query) // rows_per_query).flatten()
    return pooled[:, :, group.clamp(q_offset // rows_per_query, (k_len - 1) // rows_per_query)]


def _question_columns(q: torch.Tensor, k: torch.Tensor, config: TileKeysConfig, scale: float,
                      backend: str) -> torch.Tensor:
    """``[B, Hq, Nk]`` bool: per query head the ``question_columns`` keys with the most mean causal probability
    under the call's last ``question_q`` queries (vertical-slash's column mass, its local band of ``local``
    diagonals left out). Memory: the ``[B, Hq, Nk]`` float32 mass and that estimate's."""
    masses_config = VerticalSlashConfig(last_q=config.question_q, sink=config.sink, local=config.local)
    mass, _ = estimate_masses(q, k, masses_config, sm_scale=scale, backend=backend)
    top = mass.topk(min(config.question_columns, mass.shape[-1]), dim=-1).indices
    return torch.zeros(mass.shape, dtype=torch.bool, device=mass.device).scatter_(-1, top, True)


def _scoring_dims(pooled: torch.Tensor, k: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``pooled [B, Hq, R, D]`` and ``k [B, Hkv, Nk, D]`` restricted to ``dims`` dimensions per query head: those
    with the largest ``sum q_d^2 * sum k_d^2`` (its pooled queries, its KV head's keys), in ascending order.
    Returns ``([B, Hq, R, dims], [B, Hq, Nk, dims])``: each query head gets its own copy of its keys on its
    dimensions (a KV group's heads retrieve on different dimensions: on Qwen2.5-Coder-0.5B one set per group
    cost a retrieval-like head 0.22 recall).

    Memory: the restricted copies (``dims / D`` of the pooled queries, ``Hq / Hkv * dims / D`` of k) and
    ``[B, Hq, D]`` float32 norms."""
    bsz, q_heads, rows, _ = pooled.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    q_energy = torch.linalg.vector_norm(pooled, dim=2, dtype=torch.float32).square()  # [B, Hq, D]
    k_energy = torch.linalg.vector_norm(k, dim=2, dtype=torch.float32).square().repeat_interleave(group, dim=1)
    chosen = (q_energy * k_energy).topk(dims, dim=-1).indices.sort(dim=-1).values  # [B, Hq, dims]
    keys_per_head = k[:, :, None].expand(bsz, kv_heads, group, k_len, k.shape[3])  # a view: no copy
    k_part = keys_per_head.gather(-1, chosen.view(bsz, kv_heads, group, 1, dims).expand(-1, -1, -1, k_len, -1))
    q_part = pooled.gather(-1, chosen[:, :, None, :].expand(bsz, q_heads, rows, dims))
    return q_part, k_part.view(bsz, q_heads, k_len, dims)


def _select_torch(pooled: torch.Tensor, k: torch.Tensor, tiles: torch.Tensor, starts: torch.Tensor,
                  config: TileKeysConfig, scale: float, question: torch.Tensor | None = None) -> torch.Tensor:
    """Packed kept keys ``[B, Hq, c, W]`` int64 of the query tiles ``tiles [c]`` (``pooled [B, Hq, T * queries, D]``
    pooled queries in k's dtype, tile ``t``'s at rows ``t * queries ..``; ``starts [T]`` band starts), ``W`` the
    most any of them keeps. ``question [B, Hq, Nk]`` bool: keys every tile keeps before its band, as the sinks."""
    bsz, q_heads, _, head_dim = pooled.shape
    kv_heads, n = k.shape[1], k.shape[2]
    keys = torch.arange(n, device=k.device)
    c, queries = tiles.numel(), config.queries
    # Scores in the inputs' precision (bf16 on the GPU: the threshold needs no more), reduced in float32.
    chunk = pooled.unflatten(2, (-1, queries))[:, :, tiles].reshape(bsz, kv_heads, -1, head_dim)
    scores = torch.matmul(chunk, k.transpose(-1, -2)).reshape(bsz, q_heads, c, queries, n).float() * scale
    last = tile_last_rows(tiles, config.block_size, n)
    scores.masked_fill_(keys[None, None, :] > last[:, None, None], -math.inf)  # causal for the tile's last row
    # probability >= threshold / n  <=>  score >= logsumexp + log(threshold / n): no probabilities stored
    cut = torch.logsumexp(scores, dim=-1, keepdim=True) + math.log(config.threshold / n)  # [B, Hq, c, queries, 1]
    outside_band = keys[None, :] < starts[tiles][:, None]
    forced = (keys[None, :] < config.sink) & outside_band  # [c, Nk], or [B, Hq, c, Nk] with question columns
    if question is not None:
        forced = forced | question[:, :, None, :] & outside_band

    def kept(level: torch.Tensor | int) -> torch.Tensor:  # the threshold times 2**level ([B, Hq, c, 1] or 0)
        raised = cut + (level[..., None] if isinstance(level, torch.Tensor) else level) * math.log(2.0)
        return (scores >= raised).any(-2) & outside_band | forced

    chosen = kept(0)
    count = chosen.sum(-1, keepdim=True)
    if int(count.max()) > config.max_keys:
        level = torch.zeros_like(count)
        for _ in range(cap_levels(n, config.threshold, config.max_keys, config.sink + config.question_columns, queries)):
            level += count > config.max_keys
            count = kept(level).sum(-1, keepdim=True)
        chosen = kept(level)
        chosen &= chosen.cumsum(-1) <= config.max_keys  # rounding leftovers: the first max_keys by position
    return mask_to_index(chosen, max(1, int(chosen.sum(-1).max())))


def _select_triton(pooled: torch.Tensor, k: torch.Tensor, first_tile: int, starts: torch.Tensor,
                   config: TileKeysConfig, scale: float, question: torch.Tensor | None = None) -> TileKeysIndex:
    """The same as :func:`_select_torch` for every tile from ``first_tile`` on, by the Triton kernels, as the
    kernel's index."""
    num_tiles = pooled.shape[2] // config.queries
    band = torch.where(torch.arange(num_tiles, device=k.device) >= first_tile, starts, 0)
    columns, count = select_tile_keys(pooled, k, band, block_size=config.block_size, threshold=config.threshold,
                                      sink=config.sink, max_keys=config.max_keys, scale=scale, queries=config.queries,
                                      forced=question, forced_count=config.question_columns)
    return TileKeysIndex(columns=columns, column_count=count, local=config.local, block_size=config.block_size)


def _union_over_groups(columns: torch.Tensor, kv_heads: int, k_len: int) -> torch.Tensor:
    """Each KV group's union of its query heads' packed keys, tile by tile: ``[B, Hq, T, W]`` ->
    ``[B, Hkv, T, W']`` (``W'`` the largest union). Memory: a key bitmap per (tile, KV head) of a step."""
    bsz, q_heads, num_tiles, width = columns.shape
    step = _tile_chunk(bsz, kv_heads, k_len)
    parts = []
    for t0 in range(0, num_tiles, step):
        chunk = columns[:, :, t0: t0 + step].transpose(1, 2).flatten(0, 1)  # [B * c, Hq, W]
        union = union_packed_over_groups(chunk, kv_heads, k_len)  # [B * c, Hkv, G * W]
        parts.append(union.unflatten(0, (bsz, -1)).transpose(1, 2))
    widest = max(1, max(int((p >= 0).sum(-1).max()) for p in parts))
    return torch.cat([torch.nn.functional.pad(p, (0, max(0, widest - p.shape[-1])), value=-1)[..., :widest]
                      for p in parts], dim=2)


def estimate_tile_keys(
    q: torch.Tensor,
    k: torch.Tensor,
    config: TileKeysConfig,
    *,
    sm_scale: float | None = None,
    per_kv_group: bool = False,
    backend: str | None = None,
) -> TileKeysSelection:
    """Estimate the tile-keys index of every head at once.

    Args:
        q: ``[B, Hq, Nq, D]`` (the last ``Nq`` of ``Nk`` positions).
        k: ``[B, Hkv, Nk, D]``, ``Nk >= Nq``.
        config: a :class:`TileKeysConfig`.
        sm_scale: softmax scale, default ``1/sqrt(D)``.
        per_kv_group: one index per KV group (``H = Hkv``): the union of its query heads' keys.
        backend: ``"triton"`` (:mod:`longinfer.patterns._tile_keys_kernel`), ``"torch"`` or ``None`` (the
            Triton kernel where :func:`~longinfer.patterns._common.triton_estimate_supported`); the same index
            up to float rounding at the threshold.

    Returns:
        A :class:`TileKeysSelection` (its index ``[B, H, ceil(Nk / bs), K]``, ``K`` the most keys any tile
        keeps, at most ``max_keys`` times the group size for a KV-group union).

    Memory: ``queries`` pooled queries per tile (``queries / block_size`` of q). Torch path: ``SCORES_PER_STEP`` float32
    scores (plus bools and an int64 prefix sum of the same count) per step over query tiles, and int64
    packed ids. Triton path: ``[B, Hq, T, max_keys]`` int32 ids, the index itself (a KV-group union goes
    through int64 copies). With ``score_dims``: copies of the pooled queries and of k (one per query head) on
    those dimensions. With ``question_columns``: ``[B, Hq, Nk]`` float32 masses and a bool (uint8 on the Triton
    path) mask of the chosen keys.
    Never N x N.
    """
    if not isinstance(config, TileKeysConfig):
        raise TypeError(f"config must be a TileKeysConfig, got {type(config).__name__}")
    shape = check_qk(q, k)
    scale = softmax_scale(sm_scale, shape.head_dim)
    if backend is None:
        backend = "triton" if triton_estimate_supported(q, k) else "torch"
    check_estimate_backend(backend, q)
    bs, n = config.block_size, shape.k_len
    num_tiles = math.ceil(n / bs)
    tile_ids = torch.arange(num_tiles, device=q.device)
    require(config.score_dims <= shape.head_dim,
            f"score_dims={config.score_dims} is more than head_dim={shape.head_dim}: use at most {shape.head_dim} "
            "(or 0 for every dimension)")
    pooled = _pooled_queries(q, shape.q_offset, n, config).to(k.dtype).contiguous()  # [B, Hq, T * queries, D]
    question = _question_columns(q, k, config, scale, backend) if config.question_columns else None
    if 0 < config.score_dims < shape.head_dim:
        pooled, k = _scoring_dims(pooled, k, config.score_dims)
    first_tile = shape.q_offset // bs
    starts = tile_band_starts(num_tiles, bs, n, config.local, q.device)
    if backend == "triton" and not per_kv_group:
        return TileKeysSelection(_select_triton(pooled, k, first_tile, starts, config, scale, question), n)
    if backend == "triton":
        columns = TileKeysSelection(_select_triton(pooled, k, first_tile, starts, config, scale, question), n).columns
    else:
        step = _tile_chunk(shape.batch, shape.q_heads * config.queries, n)
        parts = [_select_torch(pooled, k, tile_ids[t0: t0 + step], starts, config, scale, question)
                 for t0 in range(first_tile, num_tiles, step)]
        width = max([p.shape[-1] for p in parts], default=1)
        columns = torch.full((shape.batch, shape.q_heads, num_tiles, width), -1, dtype=torch.long, device=q.device)
        for t0, part in zip(range(first_tile, num_tiles, step), parts):
            columns[:, :, t0: t0 + part.shape[2], : part.shape[-1]] = part
    if per_kv_group:
        columns = _union_over_groups(columns, shape.kv_heads, n)
    return TileKeysSelection.from_columns(columns, n, config.local, bs)
