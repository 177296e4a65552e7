"""Oracle indices: the best index of a given granularity and density for each query row.

An oracle knows each row's true attention (the causal softmax over all keys ``j <= i``) and
keeps the largest part of it that a budget allows. It is the ceiling an online estimator of the
same granularity and density can reach, and the reference point of the recall-density frontier.

Granularities, for a row ``i`` with ``i + 1`` causal keys and a density ``p`` in ``(0, 1]``:

- ``"key"``: the ``ceil(p * (i + 1))`` keys with the highest probability.
- ``"block"``: the ``ceil(p * (i // bs + 1))`` key blocks (absolute blocks of ``bs`` positions,
  the partial diagonal block included) with the highest total probability. The density reported
  is the kept causal keys over the causal keys (the diagonal block counts its causal part).

:func:`oracle_recall` computes the recall and kept-key counts of both oracles for several
densities in one pass streamed over key chunks (never an ``N x N`` or ``R x N`` score matrix);
:func:`oracle_mask` builds the oracle's boolean mask for a few rows (for tests and inspection).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from longinfer.patterns._common import check_qk, require, softmax_scale
from longinfer.patterns.recall import (
    KEY_CHUNK,
    ROW_CHUNK,
    RecallStats,
    _check_rows,
    _grouped_rows,
    _row_scores,
    causal_logsumexp,
)

__all__ = ["GRANULARITIES", "oracle_counts", "oracle_mask", "oracle_recall"]

GRANULARITIES = ("key", "block")
_ROUNDING_SLACK = 1e-9  # keeps ceil(0.1 * 30) at 3 despite 0.1 * 30 = 3.0000000000000004


def _check_densities(densities: Sequence[float]) -> tuple[float, ...]:
    if isinstance(densities, (int, float)):
        raise TypeError("densities must be a sequence of floats, e.g. (0.05, 0.1)")
    values = tuple(float(d) for d in densities)
    require(len(values) > 0, "densities is empty; give e.g. (0.05, 0.1)")
    require(all(0.0 < d <= 1.0 for d in values), f"every density must lie in (0, 1], got {values}")
    return values


def _check_granularity(granularity: str, block_size: int) -> None:
    require(granularity in GRANULARITIES, f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    require(isinstance(block_size, int) and block_size >= 1, f"block_size must be a positive int, got {block_size!r}")


def oracle_counts(units: torch.Tensor, density: float) -> torch.Tensor:
    """Items an oracle keeps out of ``units [R]`` candidates (keys or blocks): ``ceil(density * units)``, at least 1."""
    wanted = torch.ceil(units.double() * density - _ROUNDING_SLACK).long()
    return wanted.clamp(min=1, max=None).minimum(units.long())


def _block_units(rows: torch.Tensor, block_size: int) -> torch.Tensor:
    """Causal key blocks of each row: ``row // block_size + 1``."""
    return rows // block_size + 1


def _key_oracle_chunk(
    q_rows: torch.Tensor, k: torch.Tensor, part: torch.Tensor, group: int, scale: float,
    lse: torch.Tensor, densities: tuple[float, ...], key_chunk: int,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Key oracle for one row chunk: ``[(recall [B, Hkv, G, r], kept [r]) per density]``.

    Keeps a running top-``m`` of each row's scores (``m`` = the largest count asked for), merged
    with each key chunk; memory ``O(B * Hq * r * (m + key_chunk))`` floats.
    """
    counts = [oracle_counts(part + 1, d) for d in densities]
    m_max = int(max(int(c.max()) for c in counts))
    best = torch.empty(*q_rows.shape[:2], group, part.numel(), 0, device=q_rows.device)
    for start in range(0, int(part.max()) + 1, key_chunk):
        stop = min(start + key_chunk, int(part.max()) + 1)
        pool = torch.cat([best, _row_scores(q_rows, k, part, group, start, stop, scale)], -1)
        best = pool.topk(min(m_max, pool.shape[-1]), dim=-1).values  # descending
    cumulative = torch.exp(best - lse[..., None]).cumsum(-1)
    results = []
    for count in counts:
        index = (count - 1).expand(cumulative.shape[:-1])[..., None]
        results.append((cumulative.gather(-1, index)[..., 0], count))
    return results


def _block_masses(
    q_rows: torch.Tensor, k: torch.Tensor, part: torch.Tensor, group: int, scale: float,
    lse: torch.Tensor, block_size: int, key_chunk: int,
) -> torch.Tensor:
    """True attention mass per absolute key block: ``[B, Hkv, G, r, ceil((max(part) + 1) / bs)]``.

    Blocks after a row's diagonal block hold ``-1`` so they rank below every causal block.
    """
    stop_all = int(part.max()) + 1
    num_blocks = math.ceil(stop_all / block_size)
    chunk = max(block_size, key_chunk // block_size * block_size)
    masses = torch.empty(*q_rows.shape[:2], group, part.numel(), num_blocks, device=q_rows.device)
    for start in range(0, stop_all, chunk):
        stop = min(start + chunk, stop_all)
        probs = torch.exp(_row_scores(q_rows, k, part, group, start, stop, scale) - lse[..., None])
        sums = _block_sums(probs, block_size)
        masses[..., start // block_size: start // block_size + sums.shape[-1]] = sums
    blocks = torch.arange(num_blocks, device=q_rows.device)
    causal = blocks[None, :] <= (part // block_size)[:, None]  # [r, T]
    return masses.masked_fill(~causal, -1.0)


def _block_sizes(part: torch.Tensor, num_blocks: int, block_size: int) -> torch.Tensor:
    """Causal keys of each block for each row: ``[r, T]`` (``bs``, the diagonal's part, or 0)."""
    starts = torch.arange(num_blocks, device=part.device) * block_size
    return (part[:, None] - starts[None, :] + 1).clamp(0, block_size)


def _block_oracle_chunk(
    q_rows: torch.Tensor, k: torch.Tensor, part: torch.Tensor, group: int, scale: float,
    lse: torch.Tensor, densities: tuple[float, ...], block_size: int, key_chunk: int,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Block oracle for one row chunk: ``[(recall [B, Hkv, G, r], kept [B, Hkv, G, r]) per density]``."""
    masses = _block_masses(q_rows, k, part, group, scale, lse, block_size, key_chunk)
    counts = [oracle_counts(_block_units(part, block_size), d) for d in densities]
    m_max = int(max(int(c.max()) for c in counts))
    top = masses.topk(m_max, dim=-1)
    cumulative = top.values.clamp(min=0.0).cumsum(-1)
    sizes = _block_sizes(part, masses.shape[-1], block_size)  # [r, T]
    kept_sizes = sizes.expand(*masses.shape).gather(-1, top.indices).cumsum(-1)
    results = []
    for count in counts:
        index = (count - 1).expand(cumulative.shape[:-1])[..., None]
        results.append((cumulative.gather(-1, index)[..., 0], kept_sizes.gather(-1, index)[..., 0]))
    return results


def oracle_recall(
    q: torch.Tensor,
    k: torch.Tensor,
    rows: torch.Tensor,
    densities: Sequence[float],
    *,
    granularity: str = "key",
    block_size: int = 64,
    sm_scale: float | None = None,
    lse: torch.Tensor | None = None,
    key_chunk: int = KEY_CHUNK,
    row_chunk: int = ROW_CHUNK,
) -> dict[float, RecallStats]:
    """Recall and density of the ``granularity`` oracle at each density, over sampled rows.

    Args:
        q: ``[B, Hq, Nq, D]`` (the last ``Nq`` of ``Nk`` positions); k: ``[B, Hkv, Nk, D]``.
        rows: ``[R]`` absolute query positions (e.g. :func:`longinfer.patterns.recall.sample_rows`).
        densities: each in ``(0, 1]``: the share of causal keys (``"key"``) or causal key blocks
            (``"block"``) the oracle keeps per row.
        granularity: ``"key"`` or ``"block"`` (see the module docstring).
        block_size: key block size of the block oracle.
        sm_scale: softmax scale, default ``1/sqrt(D)``.
        lse: optional precomputed :func:`causal_logsumexp` ``[B, Hq, R]`` (shared with other indices).
        key_chunk, row_chunk: streaming step sizes.

    Returns:
        ``{density: RecallStats}`` in the order given; ``RecallStats.kept`` is the oracle's kept
        causal keys per row, so ``head_density`` is comparable with any estimator's.

    Memory: per step ``O(B * Hq * row_chunk * (key_chunk + m))`` floats, ``m`` the largest kept
    count (``max(densities) * Nk`` keys, or that many blocks / ``block_size``). Compute: one pass
    over the keys per row chunk (plus the log-sum-exp pass when ``lse`` is not given).
    """
    shape = check_qk(q, k)
    rows = _check_rows(rows, shape.q_len, shape.k_len, q.device)
    wanted = _check_densities(densities)
    _check_granularity(granularity, block_size)
    require(key_chunk >= 1 and row_chunk >= 1, "key_chunk and row_chunk must be >= 1")
    scale = softmax_scale(sm_scale, shape.head_dim)
    if lse is None:
        lse = causal_logsumexp(q, k, rows, sm_scale=scale, key_chunk=key_chunk)
    require(tuple(lse.shape) == (shape.batch, shape.q_heads, rows.numel()),
            f"lse must be [B, Hq, R] = {(shape.batch, shape.q_heads, rows.numel())}, got {tuple(lse.shape)}")
    grouped = (shape.batch, shape.kv_heads, shape.group_size, rows.numel())
    grouped_lse = lse.reshape(grouped)
    recall = {d: torch.zeros(grouped, device=q.device) for d in wanted}
    kept = {d: torch.zeros(grouped, dtype=torch.long, device=q.device) for d in wanted}
    for r0 in range(0, rows.numel(), row_chunk):
        part = rows[r0: r0 + row_chunk]
        q_rows = _grouped_rows(q, part, shape.kv_heads, shape.q_offset)
        part_lse = grouped_lse[..., r0: r0 + part.numel()]
        if granularity == "key":
            chunk = _key_oracle_chunk(q_rows, k, part, shape.group_size, scale, part_lse, wanted, key_chunk)
        else:
            chunk = _block_oracle_chunk(q_rows, k, part, shape.group_size, scale, part_lse, wanted, block_size,
                                        key_chunk)
        for d, (part_recall, part_kept) in zip(wanted, chunk):
            recall[d][..., r0: r0 + part.numel()] = part_recall
            kept[d][..., r0: r0 + part.numel()] = part_kept.expand(grouped[:-1] + (part.numel(),))
    flat = (shape.batch, shape.q_heads, rows.numel())
    return {
        d: RecallStats(rows=rows, recall=recall[d].reshape(flat), kept=kept[d].reshape(flat), causal=rows + 1)
        for d in wanted
    }


def oracle_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    rows: torch.Tensor,
    density: float,
    *,
    granularity: str = "key",
    block_size: int = 64,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """The oracle's index for rows ``rows`` as a mask ``[B, Hq, R, Nk]`` bool (causal keys only).

    Ties are broken arbitrarily (the recall does not depend on how). Usable as an index for
    :func:`longinfer.patterns.recall.attention_recall` (``lambda r: oracle_mask(q, k, r, p)``).

    Memory: ``O(B * Hq * R * Nk)`` (full score rows): for tests and a few rows, not for long
    inputs with many rows; :func:`oracle_recall` is the streamed form.
    """
    shape = check_qk(q, k)
    rows = _check_rows(rows, shape.q_len, shape.k_len, q.device)
    (density,) = _check_densities((density,))
    _check_granularity(granularity, block_size)
    scale = softmax_scale(sm_scale, shape.head_dim)
    q_rows = _grouped_rows(q, rows, shape.kv_heads, shape.q_offset)
    scores = _row_scores(q_rows, k, rows, shape.group_size, 0, shape.k_len, scale)  # [B, Hkv, G, R, Nk]
    causal = torch.arange(shape.k_len, device=q.device)[None, :] <= rows[:, None]  # [R, Nk]
    if granularity == "key":
        order = scores.argsort(-1, descending=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(shape.k_len, device=q.device).expand_as(order))
        chosen = rank < oracle_counts(rows + 1, density)[:, None]
    else:
        lse = torch.logsumexp(scores, -1, keepdim=True)
        masses = _block_sums(torch.exp(scores - lse), block_size)  # [B, Hkv, G, R, T]
        blocks = torch.arange(masses.shape[-1], device=q.device)
        masses = masses.masked_fill(blocks[None, :] > (rows // block_size)[:, None], -1.0)
        order = masses.argsort(-1, descending=True)
        rank = torch.empty_like(order).scatter_(-1, order, blocks.expand_as(order))
        chosen_blocks = rank < oracle_counts(_block_units(rows, block_size), density)[:, None]
        chosen = chosen_blocks.repeat_interleave(block_size, dim=-1)[..., : shape.k_len]
    return (chosen & causal).reshape(shape.batch, shape.q_heads, rows.numel(), shape.k_len)


def _block_sums(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Sums of ``x [..., N]`` over consecutive blocks of ``block_size`` -> ``[..., ceil(N / bs)]``."""
    padded = torch.nn.functional.pad(x, (0, (-x.shape[-1]) % block_size))
    return padded.reshape(*x.shape[:-1], -1, block_size).sum(-1)
