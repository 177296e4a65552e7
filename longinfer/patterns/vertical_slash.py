"""Vertical-slash pattern: online estimation of key columns ("verticals") and diagonals ("slashes").

The estimate looks at the attention of the last ``last_q`` queries against every key (causal
among those queries), streamed over key chunks:

- column mass ``c[j]``: mean over the estimation queries of their attention probability on key
  ``j``, leaving out the always-kept local band (diagonal offsets ``< local``);
- diagonal mass ``d[s]``: mean over the estimation queries of their probability on key
  ``i - s``, leaving out the always-kept sink columns (keys ``< sink``).

Leaving the forced parts out of the other kind's score keeps a column near the end from being
chosen only because the last queries attend locally (the local diagonals already cover it).

Budgets:

- ``budget="fixed"`` (MInference): the top ``num_vertical`` columns and top ``num_slash``
  diagonals, the first ``sink`` columns and the ``local`` diagonals next to the main one included.
- ``budget="coverage"``: columns and diagonals are ranked *together* by estimated mass (forced
  ones first) and taken until the taken mass reaches ``tau``, with at least ``min_vertical`` /
  ``min_slash`` and at most ``num_vertical`` / ``num_slash`` of each kind. A set's mass is the sum
  of its items' masses, which overestimates the union by the overlap of the chosen (non-forced)
  columns and diagonals (each column meets each diagonal in at most one estimation query).

Output format (what :func:`longinfer.ops.vertical_slash_attention` takes): ``vertical [B, H, V]``
and ``slash [B, H, S]`` int64 with ``V = num_vertical`` and ``S = num_slash`` in both modes
(times ``Hq // Hkv`` for a per-KV-group union); chosen entries come first, ascending, and unused
slots hold ``-1``, which the kernels ignore.

Segments (``segments > 1``): the query positions are cut into contiguous segments (boundaries on
multiples of ``block_size``) and each segment gets its own index, estimated as above from the last
``last_q`` queries *of that segment* against the keys up to the segment's end, with the same
budget (fixed counts clip to the segment's key count; coverage keeps the same ``tau``). At long
context the last queries of the whole sequence miss what early query blocks attend; queries near
each block see it. The result is a :class:`SegmentedVerticalSlashSelection`, run as one kernel call
per segment with k/v cut at the segment's end (:func:`run_segmented`).
"""

from __future__ import annotations

import dataclasses
import itertools
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

KEY_CHUNK = 8192  # keys per streaming step of the estimate: memory O(last_q * KEY_CHUNK) per head


@dataclass(frozen=True)
class VerticalSlashConfig:
    """Parameters of the vertical-slash estimate and kernel.

    Attributes:
        num_vertical: columns kept (``budget="fixed"``) or at most (``"coverage"``); output width V.
        num_slash: diagonals kept or at most; output width S.
        last_q: estimation queries: the last ``last_q`` query positions.
        sink: the first ``sink`` key columns are always kept (attention sinks).
        local: diagonal offsets ``0 .. local-1`` are always kept (the local window).
        budget: ``"fixed"`` or ``"coverage"`` (see the module docstring).
        tau: coverage target: estimated attention mass to keep (``budget="coverage"`` only).
        min_vertical, min_slash: minimum columns / diagonals in coverage mode (forced ones count).
        block_size: the kernel's query tile; slashes are covered for whole tiles (see
            :func:`longinfer.ops.reference.vertical_slash_mask`).
        segments: number of query segments with their own index (1 = one index for all queries);
            short inputs get fewer (segments are at least one ``block_size`` tile long).
    """

    num_vertical: int = 1000
    num_slash: int = 6096
    last_q: int = 64
    sink: int = 30
    local: int = 100
    budget: str = "fixed"
    tau: float = 0.9
    min_vertical: int = 0
    min_slash: int = 0
    block_size: int = 64
    segments: int = 1

    def __post_init__(self) -> None:
        check_config_fields(self)
        name = type(self).__name__
        check_budget(name, self.budget, self.tau)
        require(self.num_vertical >= 0 and self.num_slash >= 0, f"{name}: num_vertical and num_slash must be >= 0")
        require(self.last_q >= 1, f"{name}.last_q must be >= 1, got {self.last_q}")
        require(self.sink >= 0 and self.local >= 0, f"{name}: sink and local must be >= 0")
        require(self.sink <= self.num_vertical,
                f"{name}: sink ({self.sink}) forced columns exceed num_vertical ({self.num_vertical}); raise num_vertical")
        require(self.local <= self.num_slash,
                f"{name}: local ({self.local}) forced diagonals exceed num_slash ({self.num_slash}); raise num_slash")
        require(0 <= self.min_vertical <= self.num_vertical,
                f"{name}.min_vertical must lie in [0, num_vertical={self.num_vertical}], got {self.min_vertical}")
        require(0 <= self.min_slash <= self.num_slash,
                f"{name}.min_slash must lie in [0, num_slash={self.num_slash}], got {self.min_slash}")
        require(self.block_size in KERNEL_BLOCK_SIZES,
                f"{name}.block_size must be one of {KERNEL_BLOCK_SIZES}, got {self.block_size}")
        require(self.segments >= 1, f"{name}.segments must be >= 1, got {self.segments}")


@dataclass(frozen=True)
class VerticalSlashSelection:
    """A vertical-slash index as :func:`longinfer.ops.vertical_slash_attention` takes it.

    Attributes:
        vertical: ``[B, H, V]`` int64 absolute key positions, ``-1`` = unused slot.
        slash: ``[B, H, S]`` int64 diagonal offsets (key = query position - offset), ``-1`` = unused.
        k_len: number of key positions ``Nk`` the index is for.
        block_size: kernel query tile (slash coverage granularity).

    ``H`` is ``Hq`` (per query head) or ``Hkv`` (one per KV group).
    """

    vertical: torch.Tensor
    slash: torch.Tensor
    k_len: int
    block_size: int = 64

    @property
    def num_heads(self) -> int:
        return self.vertical.shape[1]

    def mask(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Reference mask ``[B, H, R, Nk]`` of the kernel for absolute query positions ``rows``."""
        return reference.vertical_slash_mask(self.vertical, self.slash, self.k_len, self.block_size, rows=rows)


@dataclass(frozen=True)
class SegmentedVerticalSlashSelection:
    """One vertical-slash index per contiguous query segment.

    Attributes:
        bounds: ``((start, end), ...)`` absolute query positions of each segment, contiguous and
            ascending; the last ``end`` is ``k_len``.
        parts: per segment a :class:`VerticalSlashSelection` for keys ``0 .. end - 1``
            (``part.k_len == end``); all parts have the same ``H``.
        k_len: number of key positions ``Nk`` of the whole call.
        block_size: kernel query tile.

    Query row ``i`` uses the index of the segment containing it; rows before the first segment
    (a cached prefix, not queries of the call) are given the first segment's index.
    """

    bounds: tuple[tuple[int, int], ...]
    parts: tuple[VerticalSlashSelection, ...]
    k_len: int
    block_size: int = 64

    def __post_init__(self) -> None:
        require(len(self.bounds) == len(self.parts) >= 1,
                f"SegmentedVerticalSlashSelection needs one part per segment, got {len(self.bounds)} bounds "
                f"and {len(self.parts)} parts")
        require(all(a[1] == b[0] for a, b in itertools.pairwise(self.bounds))
                and all(start < end for start, end in self.bounds) and self.bounds[-1][1] == self.k_len,
                f"segment bounds {self.bounds} must be contiguous, non-empty and end at k_len={self.k_len}")
        require(all(part.k_len == end for part, (_, end) in zip(self.parts, self.bounds)),
                "each part's k_len must equal its segment's end")

    @property
    def num_heads(self) -> int:
        return self.parts[0].num_heads

    @property
    def q_len(self) -> int:
        """Number of query positions covered (``k_len - bounds[0][0]``)."""
        return self.k_len - self.bounds[0][0]

    def mask(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Reference mask ``[B, H, R, Nk]`` for absolute query positions ``rows`` (default all ``Nk``).

        Memory: the ``[B, H, R, Nk]`` boolean output plus one segment's rows at a time.
        """
        device = self.parts[0].vertical.device
        rows = torch.arange(self.k_len, device=device) if rows is None else rows.to(device=device, dtype=torch.long)
        require(rows.dim() == 1, f"rows must be 1-D query positions, got shape {tuple(rows.shape)}")
        bsz, heads = self.parts[0].vertical.shape[:2]
        out = torch.zeros(bsz, heads, rows.numel(), self.k_len, dtype=torch.bool, device=device)
        for number, ((start, end), part) in enumerate(zip(self.bounds, self.parts)):  # a few segments
            low = 0 if number == 0 else start  # prefix rows take the first segment's index
            picked = ((rows >= low) & (rows < end)).nonzero().flatten()
            if picked.numel():
                out[:, :, picked] = reference.vertical_slash_mask(
                    part.vertical, part.slash, self.k_len, self.block_size, rows=rows[picked])
        return out


def segment_bounds(q_len: int, k_len: int, segments: int, block_size: int) -> tuple[tuple[int, int], ...]:
    """Cut the query positions ``k_len - q_len .. k_len - 1`` into at most ``segments`` contiguous parts.

    Inner boundaries are the multiples of ``block_size`` nearest to equal shares of the queries, so
    no kernel tile straddles two segments; boundaries that would leave a segment empty are dropped
    (short inputs get fewer segments). Returns ``((start, end), ...)`` absolute positions.
    """
    require(1 <= q_len <= k_len, f"need 1 <= q_len ({q_len}) <= k_len ({k_len})")
    require(segments >= 1, f"segments must be >= 1, got {segments}")
    first = k_len - q_len
    cuts = [first]
    for number in range(1, segments):
        cut = round((first + q_len * number / segments) / block_size) * block_size
        if cuts[-1] < cut < k_len:
            cuts.append(cut)
    cuts.append(k_len)
    return tuple(itertools.pairwise(cuts))


def _grouped_last_queries(q: torch.Tensor, kv_heads: int, last: int) -> torch.Tensor:
    """The last ``last`` queries in float32, grouped per KV head: ``[B, Hkv, G * last, D]``."""
    bsz, hq, _, d = q.shape
    tail = q[:, :, -last:].float()
    return tail.reshape(bsz, kv_heads, (hq // kv_heads) * last, d)


def _chunk_scores(q_est: torch.Tensor, k: torch.Tensor, start: int, stop: int, positions: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """Scaled scores ``[B, Hkv, G * L, C]`` of the estimation queries against keys ``start:stop``,
    ``-inf`` where the key lies after the query (``positions``: ``[G * L]`` query positions)."""
    scores = torch.matmul(q_est, k[:, :, start:stop].float().transpose(-1, -2)) * scale
    keys = torch.arange(start, stop, device=k.device)
    return scores.masked_fill(keys[None, :] > positions[:, None], -math.inf)


def _diagonal_sums(probs: torch.Tensor) -> torch.Tensor:
    """Sums along the diagonals of ``probs [M, L, C]`` (rows = consecutive query positions).

    Returns ``[M, C + L - 1]``: entry ``x`` sums the cells ``(i, c)`` with ``c - i = x - (L - 1)``,
    i.e. ``x = L - 1 + c - i``. Done by the skew trick: reverse the rows, pad each by ``L``, and
    re-read the buffer with a row width one shorter, which shifts row ``r`` right by ``r``.
    """
    m, rows, cols = probs.shape
    flipped = probs.flip(1)  # row r = original row L - 1 - r
    padded = torch.nn.functional.pad(flipped, (0, rows))  # [M, L, C + L]
    width = cols + rows - 1
    skewed = padded.reshape(m, rows * (cols + rows))[:, : rows * width].reshape(m, rows, width)
    return skewed.sum(1)


def estimate_masses(
    q: torch.Tensor,
    k: torch.Tensor,
    config: VerticalSlashConfig,
    *,
    sm_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimated attention mass per key column and per diagonal offset.

    Args:
        q: ``[B, Hq, Nq, D]``; the last ``min(last_q, Nq)`` rows are used.
        k: ``[B, Hkv, Nk, D]``, ``Nk >= Nq`` (queries are the last ``Nq`` positions).
        config: supplies ``last_q``, ``sink`` and ``local``.

    Returns:
        ``(columns [B, Hq, Nk], diagonals [B, Hq, Nk])`` float32: mean over the estimation
        queries of their causal softmax probability per column (local band left out) and per
        diagonal offset (sink columns left out).

    Memory: ``O(B * Hq * L * KEY_CHUNK)`` floats plus the ``[B, Hq, Nk]`` outputs; never N x N.
    Two passes over the keys (log-sum-exp, then probabilities).
    """
    shape = check_qk(q, k)
    scale = softmax_scale(sm_scale, shape.head_dim)
    last = min(config.last_q, shape.q_len)
    group = shape.group_size
    nk = shape.k_len
    q_est = _grouped_last_queries(q, shape.kv_heads, last)  # [B, Hkv, G*L, D]
    positions = torch.arange(nk - last, nk, device=q.device).repeat(group)  # [G*L]
    chunks = [(start, min(start + KEY_CHUNK, nk)) for start in range(0, nk, KEY_CHUNK)]
    lse = torch.full(q_est.shape[:-1], -math.inf, device=q.device)
    for start, stop in chunks:
        lse = torch.logaddexp(lse, torch.logsumexp(_chunk_scores(q_est, k, start, stop, positions, scale), -1))
    columns = torch.zeros(shape.batch, shape.kv_heads, group, nk, device=q.device)
    diagonals = torch.zeros_like(columns)
    for start, stop in chunks:
        probs = torch.exp(_chunk_scores(q_est, k, start, stop, positions, scale) - lse[..., None])
        probs = probs.reshape(shape.batch, shape.kv_heads, group, last, stop - start)
        if stop > nk - last - config.local + 1:  # the chunk reaches the local band of some query
            offsets = positions[:last, None] - torch.arange(start, stop, device=q.device)[None, :]  # [L, C]
            in_band = (offsets >= 0) & (offsets < config.local)
            columns[..., start:stop] = probs.masked_fill(in_band, 0.0).sum(-2)
        else:
            columns[..., start:stop] = probs.sum(-2)
        if start < config.sink:
            probs[..., : config.sink - start] = 0.0
        # Cell (i, c) has offset s = (nk - last + i) - (start + c); x = L - 1 + c - i indexes the sums.
        sums = _diagonal_sums(probs.reshape(-1, last, stop - start)).flip(-1)  # now s ascending
        s_low = nk - last - stop + 1  # offset of the flipped first entry
        lo = max(s_low, 0)
        diagonals[..., lo: nk - start] += sums.reshape(*columns.shape[:3], -1)[..., lo - s_low:]
    flat = (shape.batch, shape.q_heads, nk)
    return columns.reshape(flat) / last, diagonals.reshape(flat) / last


def _fixed_choice(score: torch.Tensor, forced: torch.Tensor, count: int) -> torch.Tensor:
    """Top ``count`` of ``score [..., N]`` with ``forced`` positions first -> bool ``[..., N]``."""
    chosen = torch.zeros_like(score, dtype=torch.bool)
    count = min(count, score.shape[-1])
    if count == 0:
        return chosen
    ranked = torch.where(forced, torch.full_like(score, math.inf), score)
    return chosen.scatter(-1, ranked.topk(count, dim=-1).indices, True)


def choose(
    columns: torch.Tensor,
    diagonals: torch.Tensor,
    config: VerticalSlashConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the budget to estimated masses ``[B, H, Nk]`` -> chosen ``(columns, diagonals)`` bool ``[B, H, Nk]``."""
    nk = columns.shape[-1]
    pos = torch.arange(nk, device=columns.device)
    forced_cols = pos < config.sink
    forced_diags = pos < config.local
    if config.budget == "fixed":
        return (_fixed_choice(columns, forced_cols, config.num_vertical),
                _fixed_choice(diagonals, forced_diags, config.num_slash))
    is_col = torch.cat([torch.ones_like(pos, dtype=torch.bool), torch.zeros_like(pos, dtype=torch.bool)])
    chosen = coverage_selection(
        torch.cat([columns, diagonals], -1),
        torch.cat([forced_cols, forced_diags]),
        config.tau,
        limits=[(is_col, config.min_vertical, config.num_vertical), (~is_col, config.min_slash, config.num_slash)],
    )
    return chosen[..., :nk], chosen[..., nk:]


def estimate_vertical_slash(
    q: torch.Tensor,
    k: torch.Tensor,
    config: VerticalSlashConfig,
    *,
    sm_scale: float | None = None,
    per_kv_group: bool = False,
) -> VerticalSlashSelection:
    """Estimate the vertical-slash index of every head at once.

    Args:
        q: ``[B, Hq, Nq, D]`` queries (the last ``Nq`` of ``Nk`` positions).
        k: ``[B, Hkv, Nk, D]`` keys, ``Nk >= Nq``.
        config: a :class:`VerticalSlashConfig`.
        sm_scale: softmax scale, default ``1/sqrt(D)``.
        per_kv_group: return one index per KV group (``H = Hkv``), the union of its query heads'
            selections; widths become ``G * num_vertical`` and ``G * num_slash`` (``G = Hq // Hkv``).

    Returns:
        A :class:`VerticalSlashSelection` with ``vertical [B, H, V]`` / ``slash [B, H, S]`` int64,
        ``-1``-padded (see the module docstring); with ``config.segments > 1`` a
        :class:`SegmentedVerticalSlashSelection` (see :func:`estimate_segmented`).

    Memory: as :func:`estimate_masses` plus a few ``[B, Hq, 2 * Nk]`` tensors.
    """
    if not isinstance(config, VerticalSlashConfig):
        raise TypeError(f"config must be a VerticalSlashConfig, got {type(config).__name__}")
    if config.segments > 1:
        return estimate_segmented(q, k, config, sm_scale=sm_scale, per_kv_group=per_kv_group)
    columns, diagonals = estimate_masses(q, k, config, sm_scale=sm_scale)
    chosen_cols, chosen_diags = choose(columns, diagonals, config)
    widths = (config.num_vertical, config.num_slash)
    if per_kv_group:
        group = q.shape[1] // k.shape[1]
        chosen_cols = union_over_groups(chosen_cols, k.shape[1])
        chosen_diags = union_over_groups(chosen_diags, k.shape[1])
        widths = (group * config.num_vertical, group * config.num_slash)
    return VerticalSlashSelection(
        vertical=mask_to_index(chosen_cols, widths[0]),
        slash=mask_to_index(chosen_diags, widths[1]),
        k_len=k.shape[2],
        block_size=config.block_size,
    )


def estimate_segmented(
    q: torch.Tensor,
    k: torch.Tensor,
    config: VerticalSlashConfig,
    *,
    sm_scale: float | None = None,
    per_kv_group: bool = False,
) -> SegmentedVerticalSlashSelection:
    """One vertical-slash index per query segment (:func:`segment_bounds` with ``config.segments``).

    Segment ``[start, end)`` is estimated exactly as :func:`estimate_vertical_slash` with one
    segment would on ``q`` rows ``start .. end - 1`` and keys ``0 .. end - 1``: the last ``last_q``
    queries of the segment, the same counts (clipped to ``end`` keys) or the same ``tau``.

    Args and memory: as :func:`estimate_vertical_slash` (one segment at a time); the estimation
    work grows with the number of segments (each reads the keys up to its end).
    """
    shape = check_qk(q, k)
    single = dataclasses.replace(config, segments=1)
    bounds = segment_bounds(shape.q_len, shape.k_len, config.segments, config.block_size)
    parts = tuple(
        estimate_vertical_slash(q[:, :, start - shape.q_offset: end - shape.q_offset], k[:, :, :end], single,
                                sm_scale=sm_scale, per_kv_group=per_kv_group)
        for start, end in bounds  # a few segments, each a batched estimate over all heads
    )
    return SegmentedVerticalSlashSelection(bounds=bounds, parts=parts, k_len=shape.k_len,
                                           block_size=config.block_size)


def run_segmented(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: SegmentedVerticalSlashSelection,
    *,
    block_size: int,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Vertical-slash attention of a segmented index: one kernel call per segment.

    Args:
        q: ``[B, Hq, Nq, D]``, the last ``Nq`` of ``Nk`` positions; must match ``selection.q_len``.
        k, v: ``[B, Hkv, Nk, D]`` with ``Nk == selection.k_len``.
        selection: from :func:`estimate_segmented` on these q/k.
        block_size: kernel query tile (the config's).

    Returns:
        ``[B, Hq, Nq, D]``: segment rows ``start .. end - 1`` attend keys ``0 .. end - 1`` with that
        segment's index. Memory: the kernel's, plus the concatenated output.
    """
    from longinfer import ops

    require(k.shape[2] == selection.k_len and q.shape[2] == selection.q_len,
            f"selection was estimated for {selection.q_len} queries over {selection.k_len} keys, got "
            f"q with {q.shape[2]} and k with {k.shape[2]}: estimate it on these tensors")
    offset = selection.k_len - selection.q_len
    outputs = [
        ops.vertical_slash_attention(q[:, :, start - offset: end - offset], k[:, :, :end], v[:, :, :end],
                                     part.vertical, part.slash, block_size=block_size, sm_scale=sm_scale)
        for (start, end), part in zip(selection.bounds, selection.parts)  # a few segments, not heads
    ]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
