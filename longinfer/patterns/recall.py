"""Attention recall of a sparse index: the share of the true attention mass it keeps.

For sampled query rows, the true attention is the causal softmax over *all* keys ``j <= i``.
The recall of an index for a row is the total probability of the keys the index keeps (the mask
its kernel computes, from :mod:`longinfer.ops.reference`); its density is the number of kept
keys over the number of causal keys. Both are computed streaming over key chunks, vectorized over
batch and heads, without materializing GQA repeats or an N x N matrix.

Used by the offline search, the ``recall`` evaluation and the estimator frontier (issue 6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from longinfer.patterns._common import check_qk, require, softmax_scale

KEY_CHUNK = 4096
ROW_CHUNK = 32



@dataclass(frozen=True)
class RecallStats:
    """Recall and density of one index over sampled query rows.

    Attributes:
        rows: ``[R]`` absolute query positions.
        recall: ``[B, Hq, R]`` float32, kept share of each row's true attention mass.
        kept: ``[B, Hq, R]`` int64, keys the index keeps for the row (causal ones only).
        causal: ``[R]`` int64, causal keys of each row (``row + 1``).
    """

    rows: torch.Tensor
    recall: torch.Tensor
    kept: torch.Tensor
    causal: torch.Tensor

    @property
    def head_recall(self) -> torch.Tensor:
        """``[B, Hq]`` mean recall over the sampled rows."""
        return self.recall.mean(-1)

    @property
    def head_density(self) -> torch.Tensor:
        """``[B, Hq]`` kept keys / causal keys summed over the rows (proportional to kernel work)."""
        return self.kept.sum(-1).double() / self.causal.sum().double()

    def mean_recall(self) -> float:
        """Recall averaged over rows, heads and batch."""
        return float(self.recall.mean())

    def mean_density(self) -> float:
        """Density averaged over heads and batch."""
        return float(self.head_density.mean())


def sample_rows(q_len: int, k_len: int, num_rows: int, *, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Deterministic query rows spread over the queries: one uniform draw per equal stratum.

    Args:
        q_len: number of queries (the last ``q_len`` of ``k_len`` positions).
        k_len: number of key positions.
        num_rows: rows wanted (at most ``q_len``).
        seed: the draws depend only on this seed and the sizes.

    Returns:
        ``[num_rows]`` int64 sorted absolute positions in ``[k_len - q_len, k_len)``, distinct.
    """
    require(0 < q_len <= k_len, f"need 0 < q_len <= k_len, got q_len={q_len}, k_len={k_len}")
    require(0 < num_rows <= q_len, f"num_rows must lie in [1, q_len={q_len}], got {num_rows}")
    generator = torch.Generator().manual_seed(seed)
    edges = torch.linspace(0, q_len, num_rows + 1, dtype=torch.float64).floor().long()  # strata [e_i, e_i+1)
    widths = (edges[1:] - edges[:-1]).clamp(min=1)
    draws = (torch.rand(num_rows, generator=generator, dtype=torch.float64) * widths).long()
    return (k_len - q_len + edges[:-1] + draws).to(device)


def _check_rows(rows: torch.Tensor, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    if not isinstance(rows, torch.Tensor) or rows.dim() != 1 or rows.dtype.is_floating_point or rows.dtype == torch.bool:
        raise TypeError("rows must be a 1-D integer tensor of absolute query positions")
    rows = rows.to(device=device, dtype=torch.long)
    require(rows.numel() > 0, "rows is empty")
    first = k_len - q_len
    require(bool(((rows >= first) & (rows < k_len)).all()),
            f"rows must be query positions in [{first}, {k_len}) (queries are the last {q_len} of {k_len} positions)")
    return rows


def _grouped_rows(q: torch.Tensor, rows: torch.Tensor, kv_heads: int, offset: int) -> torch.Tensor:
    """Query rows ``rows`` of ``q [B, Hq, Nq, D]`` in float32, grouped: ``[B, Hkv, G * R, D]``."""
    bsz, hq, _, d = q.shape
    picked = q[:, :, rows - offset].float()
    return picked.reshape(bsz, kv_heads, (hq // kv_heads) * rows.numel(), d)


def _row_scores(q_rows: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, group: int, start: int, stop: int,
                scale: float) -> torch.Tensor:
    """Scores ``[B, Hkv, G, R, C]`` of grouped rows against keys ``start:stop``, ``-inf`` above the diagonal."""
    bsz, hkv = q_rows.shape[:2]
    scores = torch.matmul(q_rows, k[:, :, start:stop].float().transpose(-1, -2)) * scale
    scores = scores.reshape(bsz, hkv, group, rows.numel(), stop - start)
    keys = torch.arange(start, stop, device=k.device)
    return scores.masked_fill(keys[None, :] > rows[:, None], -math.inf)


def causal_logsumexp(
    q: torch.Tensor,
    k: torch.Tensor,
    rows: torch.Tensor,
    *,
    sm_scale: float | None = None,
    key_chunk: int = KEY_CHUNK,
) -> torch.Tensor:
    """Log-sum-exp of each sampled row's scaled scores over its causal keys: ``[B, Hq, R]`` float32.

    Args:
        q: ``[B, Hq, Nq, D]``; k: ``[B, Hkv, Nk, D]``; rows: ``[R]`` absolute query positions.

    Memory: ``O(B * Hq * R * key_chunk)`` floats.
    """
    shape = check_qk(q, k)
    rows = _check_rows(rows, shape.q_len, shape.k_len, q.device)
    scale = softmax_scale(sm_scale, shape.head_dim)
    q_rows = _grouped_rows(q, rows, shape.kv_heads, shape.q_offset)
    stop_all = int(rows.max()) + 1  # keys after the last row are never causal
    lse = torch.full((shape.batch, shape.kv_heads, shape.group_size, rows.numel()), -math.inf, device=q.device)
    for start in range(0, stop_all, key_chunk):
        scores = _row_scores(q_rows, k, rows, shape.group_size, start, min(start + key_chunk, stop_all), scale)
        lse = torch.logaddexp(lse, torch.logsumexp(scores, -1))
    return lse.reshape(shape.batch, shape.q_heads, rows.numel())


def _grouped_mask(mask: torch.Tensor, batch: int, q_heads: int, kv_heads: int, num_rows: int, k_len: int) -> torch.Tensor:
    """Check a mask ``[B|1, Hq|Hkv|1, R, Nk]`` and view it as ``[B|1, Hkv|1, G|1, R, Nk]``."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 4:
        raise TypeError(f"the index's mask must be a 4-D bool tensor [B, H, R, Nk], got {getattr(mask, 'shape', mask)!r}")
    mb, mh, mr, mn = mask.shape
    require(mb in (1, batch) and mr == num_rows and mn == k_len,
            f"mask shape {tuple(mask.shape)} does not fit [B={batch} or 1, H, R={num_rows}, Nk={k_len}]")
    if mh == q_heads:
        return mask.reshape(mb, kv_heads, q_heads // kv_heads, mr, mn)
    if mh == kv_heads:
        return mask.reshape(mb, kv_heads, 1, mr, mn)
    require(mh == 1, f"mask has {mh} heads; expected Hq={q_heads}, Hkv={kv_heads} or 1")
    return mask.reshape(mb, 1, 1, mr, mn)


def _mask_of(index: Any, rows: torch.Tensor) -> torch.Tensor:
    if hasattr(index, "mask"):
        return index.mask(rows)
    if callable(index):
        return index(rows)
    raise TypeError(f"index must be a selection with .mask(rows) or a callable rows -> mask, got {type(index).__name__}")


def attention_recall(
    q: torch.Tensor,
    k: torch.Tensor,
    index: Any,
    rows: torch.Tensor,
    *,
    sm_scale: float | None = None,
    lse: torch.Tensor | None = None,
    key_chunk: int = KEY_CHUNK,
    row_chunk: int = ROW_CHUNK,
) -> RecallStats:
    """Share of the true causal attention mass that ``index`` keeps, over sampled query rows.

    Args:
        q: ``[B, Hq, Nq, D]`` (the last ``Nq`` of ``Nk`` positions).
        k: ``[B, Hkv, Nk, D]``.
        index: any pattern's selection (an estimator's output: ``mask(rows)`` gives the kernel's
            reference mask), or a callable ``rows -> bool [B|1, Hq|Hkv|1, len(rows), Nk]``.
        rows: ``[R]`` absolute query positions in ``[Nk - Nq, Nk)`` (e.g. :func:`sample_rows`).
        sm_scale: softmax scale, default ``1/sqrt(D)``.
        lse: optional precomputed :func:`causal_logsumexp` ``[B, Hq, R]``, to score several
            indices against the same rows without recomputing the normalizer.
        key_chunk, row_chunk: streaming step sizes.

    Returns:
        :class:`RecallStats` (per-row recall and kept counts; per-head means as properties).

    Memory: per step ``O(B * Hq * row_chunk * key_chunk)`` floats plus the index's mask for
    ``row_chunk`` rows (``[B, H, row_chunk, Nk]`` booleans).
    """
    shape = check_qk(q, k)
    rows = _check_rows(rows, shape.q_len, shape.k_len, q.device)
    scale = softmax_scale(sm_scale, shape.head_dim)
    require(key_chunk >= 1 and row_chunk >= 1, "key_chunk and row_chunk must be >= 1")
    if lse is None:
        lse = causal_logsumexp(q, k, rows, sm_scale=scale, key_chunk=key_chunk)
    require(tuple(lse.shape) == (shape.batch, shape.q_heads, rows.numel()),
            f"lse must be [B, Hq, R] = {(shape.batch, shape.q_heads, rows.numel())}, got {tuple(lse.shape)}")
    grouped_lse = lse.reshape(shape.batch, shape.kv_heads, shape.group_size, rows.numel())
    recall = torch.zeros_like(grouped_lse)
    kept = torch.zeros(grouped_lse.shape, dtype=torch.long, device=q.device)
    keys = torch.arange(shape.k_len, device=q.device)
    for r0 in range(0, rows.numel(), row_chunk):
        part = rows[r0: r0 + row_chunk]
        causal = keys[None, :] <= part[:, None]  # [r, Nk]
        mask = _grouped_mask(_mask_of(index, part).to(q.device), shape.batch, shape.q_heads, shape.kv_heads,
                             part.numel(), shape.k_len) & causal
        kept[..., r0: r0 + part.numel()] = mask.sum(-1).expand(shape.batch, shape.kv_heads, shape.group_size, -1)
        q_rows = _grouped_rows(q, part, shape.kv_heads, shape.q_offset)
        part_lse = grouped_lse[..., r0: r0 + part.numel(), None]
        stop_all = int(part.max()) + 1
        for start in range(0, stop_all, key_chunk):
            stop = min(start + key_chunk, stop_all)
            probs = torch.exp(_row_scores(q_rows, k, part, shape.group_size, start, stop, scale) - part_lse)
            recall[..., r0: r0 + part.numel()] += (probs * mask[..., start:stop]).sum(-1)
    flat = (shape.batch, shape.q_heads, rows.numel())
    return RecallStats(rows=rows, recall=recall.reshape(flat), kept=kept.reshape(flat), causal=rows + 1)


def _online_softmax_step(state: tuple[torch.Tensor, torch.Tensor, torch.Tensor], scores: torch.Tensor,
                         values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One key chunk of a streaming softmax-weighted sum: ``state = (max, sum, acc)`` over
    ``scores [..., R, C]`` (``-inf`` = not attended) and ``values [..., C, D]``."""
    row_max, row_sum, acc = state
    new_max = torch.maximum(row_max, scores.amax(-1))
    safe = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)  # rows with nothing yet
    rescale = torch.exp(row_max - safe)
    probs = torch.exp(scores - safe[..., None])
    return new_max, row_sum * rescale + probs.sum(-1), acc * rescale[..., None] + probs @ values


def attention_output_error(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: Any,
    rows: torch.Tensor,
    *,
    sm_scale: float | None = None,
    key_chunk: int = KEY_CHUNK,
) -> torch.Tensor:
    """Relative error of the attention output an index gives at sampled rows: ``[B, Hq, R]`` float32.

    ``error = ||o_index - o|| / ||o||`` per row, where ``o`` is the causal softmax over all keys
    ``j <= i`` times ``V`` and ``o_index`` the softmax over the keys the index keeps (what its
    kernel computes). A row whose index keeps no key gets ``o_index = 0`` (error 1). Recall counts
    the attention mass an index drops; this also weighs what the dropped keys' values would have
    added, i.e. what the layer's output actually loses.

    Args:
        q: ``[B, Hq, Nq, D]`` (the last ``Nq`` of ``Nk`` positions); k, v: ``[B, Hkv, Nk, D]``.
        index: as :func:`attention_recall` takes it.
        rows: ``[R]`` absolute query positions in ``[Nk - Nq, Nk)``.

    Memory: the index's mask for all rows (``[B, H, R, Nk]`` booleans) plus
    ``O(B * Hq * R * (key_chunk + D))`` floats per step.
    """
    shape = check_qk(q, k)
    require(tuple(v.shape) == tuple(k.shape), f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    rows = _check_rows(rows, shape.q_len, shape.k_len, q.device)
    scale = softmax_scale(sm_scale, shape.head_dim)
    require(key_chunk >= 1, "key_chunk must be >= 1")
    mask = _grouped_mask(_mask_of(index, rows).to(q.device), shape.batch, shape.q_heads, shape.kv_heads,
                         rows.numel(), shape.k_len)
    q_rows = _grouped_rows(q, rows, shape.kv_heads, shape.q_offset)
    grouped = (shape.batch, shape.kv_heads, shape.group_size, rows.numel())

    def empty() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (torch.full(grouped, -math.inf, device=q.device), torch.zeros(grouped, device=q.device),
                torch.zeros(*grouped, shape.head_dim, device=q.device))

    dense, sparse = empty(), empty()
    stop_all = int(rows.max()) + 1  # keys after the last row are never causal (one host sync)
    for start in range(0, stop_all, key_chunk):
        stop = min(start + key_chunk, stop_all)
        scores = _row_scores(q_rows, k, rows, shape.group_size, start, stop, scale)
        values = v[:, :, None, start:stop].float()  # [B, Hkv, 1, C, D]: shared by the group's heads
        dense = _online_softmax_step(dense, scores, values)
        sparse = _online_softmax_step(sparse, scores.masked_fill(~mask[..., start:stop], -math.inf), values)
    exact = dense[2] / dense[1][..., None]
    kept = sparse[1][..., None]
    approx = torch.where(kept > 0, sparse[2] / kept.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    error = (approx - exact).norm(dim=-1) / exact.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    return error.reshape(shape.batch, shape.q_heads, rows.numel())
