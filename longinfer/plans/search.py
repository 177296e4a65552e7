"""Offline kernel-aware pattern search: each head's pattern and budget, chosen on a calibration prompt.

For one model and a calibration prompt of ``N`` tokens (default: a key-value retrieval prompt,
:mod:`longinfer.plans.calibration`):

1. **Capture.** One forward pass records every attention layer's post-RoPE ``q [1, Hq, N, D]`` and
   ``k [1, Hkv, N, D]``. A temporary attention function registered through transformers'
   ``AttentionInterface`` records them and then computes dense SDPA, so the model's own code runs
   unchanged; the pass stops right after the last layer still to search (no LM head).
2. **Score.** For every candidate (pattern, parameters), the layer's index is estimated exactly as
   online (``spec.estimate``) and scored per head by

   - *recall*: the share of the true causal attention mass the kernel's mask keeps, averaged over
     sampled query rows (:func:`longinfer.patterns.recall.attention_recall`, streaming over key
     chunks: memory ``O(N * D)`` per head, never ``N x N``);
   - *cost*: the (query, key) pairs the kernel computes, in its own tiles (key tiles of
     :data:`COST_BLOCK_N`, slash ranges per query tile, whole key blocks, the A-shape window
     rounded to tiles), plus the estimator's pairs, relative to the dense kernel's pairs on the
     same length. See :func:`relative_cost`.
3. **Choose.** Per head (or per KV group, ``share_kv_groups=True``): among candidates with
   ``cost <= cost_budget`` the highest recall; candidates within ``recall_tolerance`` of it count as
   tied and the cheapest of those wins. If no candidate fits the budget, the cheapest one is taken
   (logged as a warning). With ``allocation="global"`` the budget is the *average* over every head of
   every layer instead: once all layers are scored, one price per unit of cost decides every head
   (each takes the candidate maximizing ``recall - price * cost``; the lowest price whose average
   cost fits), so heads whose recall is cheap spend less and hard heads more (:func:`choose_globally`).
   On Qwen2.5-Coder-0.5B at 32K a key-level oracle that spends so meets mean / p10 recall 0.95 / 0.90
   at 3.25% average density, where an equal share for every row and head needs over 10%
   (``docs/results/budget-oracle-cpu-qwen0.5b-32k/``).
4. **Dense crossover.** Per layer, the length below which dense attention is faster than the
   layer's sparse plan (estimation included), timed on the current CUDA device with the captured
   q/k cut to a few lengths (:func:`measure_dense_below`). Without CUDA nothing is timed: the plan
   records ``"measured": false`` and uses :data:`longinfer.plans.schema.DEFAULT_DENSE_BELOW`.

Resumable: with an output path, each finished layer is appended to ``<out>.partial.jsonl`` (a
header line with the search settings, then one line per layer). A rerun with the same settings
skips the finished layers (the forward pass captures only the rest); other settings are an error
until the file is removed (``restart=True``). The plan is written when every layer is done.

Memory: the captured q/k of the layers searched in one forward pass
(``layers * N * (Hq + Hkv) * D`` elements in the model's dtype; ``layers_per_forward`` bounds it),
plus per scoring step ``O(Hq * row_chunk * key_chunk)`` floats, one candidate's index and its mask
for ``row_chunk`` rows (``[B, H, row_chunk, N]`` booleans).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longinfer.patterns.a_shape import AShapeSelection
from longinfer.patterns.block_sparse import BlockSparseSelection
from longinfer.patterns.dense import DenseSelection
from longinfer.patterns.recall import attention_recall, causal_logsumexp, sample_rows
from longinfer.patterns.registry import config_to_params, get_pattern
from longinfer.patterns.tile_keys import TileKeysSelection
from longinfer.patterns.triangle import TriangleSelection  # importing it registers the "triangle" pattern
from longinfer.patterns.vertical_slash import VerticalSlashSelection
from longinfer.plans.calibration import CalibrationPrompt, kv_retrieval_prompt
from longinfer.plans.schema import DEFAULT_DENSE_BELOW, DEFAULT_DENSE_LAST, HeadPlan, LayerPlan, Plan, model_shape
from longinfer.timing import median_cuda_ms

logger = logging.getLogger(__name__)

DEFAULT_COST_BUDGET = 0.1  # relative kernel cost per head (the target: <= 10% density)
DEFAULT_RECALL_TOLERANCE = 0.005
DEFAULT_NUM_ROWS = 128
DEFAULT_LENGTH = 32768
ALLOCATIONS = ("per_head", "global")
# With allocation="global", the default candidates come at these multiples of the cost budget, so
# that a head may spend less or more than the average.
GLOBAL_BUDGET_LADDER = (0.25, 0.5, 1.0, 2.0, 4.0)
_PRICE_BISECTIONS = 60
CROSSOVER_LENGTHS = (2048, 4096, 8192, 16384, 32768, 65536, 131072)
CROSSOVER_EXTRAPOLATION = 4  # a crossover is extrapolated at most this many times past the longest length
CAPTURE_ATTENTION = "longinfer_capture"
MIN_USEFUL_WINDOW = 64  # a default A-shape candidate with a narrower window is left out

# Kernel tiles of the cost model (see longinfer.ops._kernel): key tiles of COST_BLOCK_N (the
# smallest the GPU autotuner tries); query tiles of 128 for dense and A-shape, block_size otherwise.
COST_BLOCK_N = 64
DENSE_BLOCK_M = 128
A_SHAPE_BLOCK_M = 128


# --------------------------------------------------------------------------------------------
# Cost model: (query, key) pairs each kernel computes, tile supersets included.
# --------------------------------------------------------------------------------------------


def _round_up(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Non-negative ``x`` rounded up to a multiple (the key tiles a range occupies, in keys)."""
    return (x.clamp(min=0) + multiple - 1) // multiple * multiple


def _query_tiles(q_len: int, k_len: int, block_m: int, device: torch.device | str = "cpu"):
    """Per query tile ``t`` (aligned to ``block_m`` in key positions): ``(start, end, rows)`` int64 ``[T]``.

    ``rows`` counts the tile's query positions (queries are the last ``q_len`` of ``k_len``).
    """
    start = torch.arange(0, k_len, block_m, device=device, dtype=torch.long)
    end = (start + block_m).clamp(max=k_len)
    rows = (end - start.clamp(min=k_len - q_len)).clamp(min=0)
    return start, end, rows


def dense_pairs(q_len: int, k_len: int) -> int:
    """Pairs the dense kernel computes: every query tile over keys ``[0, tile_end)`` in key tiles."""
    _, end, rows = _query_tiles(q_len, k_len, DENSE_BLOCK_M)
    return int((rows * _round_up(end, COST_BLOCK_N)).sum())


def a_shape_pairs(q_len: int, k_len: int, sink: int, window: int) -> int:
    """Pairs the A-shape kernel computes: the sink range and the tile's window range, in key tiles."""
    start, end, rows = _query_tiles(q_len, k_len, A_SHAPE_BLOCK_M)
    sink = min(sink, k_len)
    window = min(window, k_len + 1)
    sink_end = end.clamp(max=sink)
    window_start = torch.maximum(start - window + 1, sink_end)
    keys = _round_up(sink_end, COST_BLOCK_N) + _round_up(end - window_start, COST_BLOCK_N)
    return int((rows * keys).sum())


def vertical_slash_pairs(selection: VerticalSlashSelection, q_len: int, *, tile_chunk: int = 64) -> torch.Tensor:
    """Pairs ``[B, H]`` the vertical-slash kernel computes for ``selection``.

    Per query tile: each merged slash group's key range in key tiles, plus the verticals before the
    tile's end gathered :data:`COST_BLOCK_N` at a time (covered ones are masked, not skipped).
    Memory: ``O(B * H * tile_chunk * S)`` integers.
    """
    from longinfer.ops import build_vertical_slash_index

    k_len, bs = selection.k_len, selection.block_size
    index = build_vertical_slash_index(selection.vertical, selection.slash, k_len, bs)
    start, end, rows = _query_tiles(q_len, k_len, bs, index.group_lo.device)
    lo, hi = index.group_lo.long(), index.group_hi.long()  # [B, H, S]
    valid = torch.arange(lo.shape[-1], device=lo.device) < index.group_count.long()[..., None]  # [B, H, S]
    range_keys = torch.zeros(lo.shape[:2] + start.shape, dtype=torch.long, device=lo.device)  # [B, H, T]
    for t0 in range(0, start.numel(), tile_chunk):
        s, e = start[t0: t0 + tile_chunk, None], end[t0: t0 + tile_chunk, None]  # [t, 1]
        r_start = (s - hi[..., None, :]).clamp(min=0)  # [B, H, t, S]
        r_end = torch.minimum(s + bs - lo[..., None, :], e)
        keys = _round_up(r_end - r_start, COST_BLOCK_N) * valid[..., None, :]
        range_keys[..., t0: t0 + tile_chunk] = keys.sum(-1)
    column_keys = _round_up(index.column_count.long(), COST_BLOCK_N)  # [B, H, T]
    return ((range_keys + column_keys) * rows).sum(-1)


def block_sparse_pairs(selection: BlockSparseSelection, q_len: int) -> torch.Tensor:
    """Pairs ``[B, H]`` the block-sparse kernel computes: whole off-diagonal key blocks, and the
    diagonal block in key tiles."""
    from longinfer.ops import build_block_sparse_index

    k_len, bs = selection.k_len, selection.block_size
    index = build_block_sparse_index(selection.block_index, k_len, bs)
    start, end, rows = _query_tiles(q_len, k_len, bs, index.block_ids.device)
    count = index.block_count.long()  # [B, H, T]
    last_id = index.block_ids.long().gather(-1, (count - 1).clamp(min=0)[..., None])[..., 0]
    has_diagonal = (count > 0) & (last_id == torch.arange(count.shape[-1], device=count.device))
    keys = (count - has_diagonal.long()) * bs + has_diagonal.long() * _round_up(end - start, COST_BLOCK_N)
    return (keys * rows).sum(-1)


def tile_keys_pairs(selection: TileKeysSelection, q_len: int) -> torch.Tensor:
    """Pairs ``[B, H]`` the tile-keys kernel computes: per query tile, its band in key tiles and its
    columns gathered :data:`COST_BLOCK_N` at a time."""
    from longinfer.ops.index import tile_band_starts

    k_len, bs, index = selection.k_len, selection.block_size, selection.index
    _, end, rows = _query_tiles(q_len, k_len, bs, index.columns.device)
    band = end - tile_band_starts(end.numel(), bs, k_len, selection.local, end.device)
    keys = _round_up(band, COST_BLOCK_N) + _round_up(index.column_count.long(), COST_BLOCK_N)  # [B, H, T]
    return (keys * rows).sum(-1)


def estimation_pairs(pattern: str, config: Any, q_len: int, k_len: int, head_dim: int | None = None) -> float:
    """(query, key) pairs one query head's online estimate scores, in pairs of ``head_dim`` dimensions.

    Vertical-slash: the last ``last_q`` queries against every key, twice (log-sum-exp, then the
    probabilities), and as many for the ``column_q`` queries of the column mass, if any.
    Block-sparse: pooled query blocks against the causal pooled key blocks. Tile keys: each query
    tile's pooled queries (``queries`` of them) against its causal keys, twice (log-sum-exp, then the
    selection): about one pass over every key per tile and pooled query; scored on ``score_dims`` of
    ``head_dim`` dimensions, that fraction of it (``head_dim`` given); with ``question_columns``, its last
    ``question_q`` queries against every key, twice. Static patterns: none.
    """
    if pattern == "vertical_slash":
        return 2 * (min(config.last_q, q_len) + min(config.column_q, q_len)) * k_len
    if pattern == "block_sparse":
        blocks_q = math.ceil(q_len / config.block_size)
        blocks_k = math.ceil(k_len / config.block_size)
        return blocks_q * blocks_k // 2 + blocks_q
    if pattern == "tile_keys":
        tiles = math.ceil(k_len / config.block_size) - (k_len - q_len) // config.block_size
        pairs = tiles * config.queries * k_len
        if head_dim and 0 < config.score_dims < head_dim:
            pairs = pairs * config.score_dims / head_dim
        question = 2 * min(config.question_q, q_len) * k_len if config.question_columns else 0
        return pairs + question
    return 0


def kernel_pairs(selection: Any, q_len: int) -> torch.Tensor:
    """Pairs ``[B|1, H|1]`` the kernel of ``selection`` computes (float64).

    Raises:
        TypeError: a selection type without a cost model (a newly registered pattern needs one here).
    """
    if isinstance(selection, VerticalSlashSelection):
        return vertical_slash_pairs(selection, q_len).double()
    if isinstance(selection, BlockSparseSelection):
        return block_sparse_pairs(selection, q_len).double()
    if isinstance(selection, TileKeysSelection):
        return tile_keys_pairs(selection, q_len).double()
    k_len = getattr(selection, "k_len", 0)
    if isinstance(selection, AShapeSelection):
        pairs = a_shape_pairs(q_len, k_len, selection.sink, selection.window)
    elif isinstance(selection, DenseSelection):
        pairs = dense_pairs(q_len, k_len)
    elif isinstance(selection, TriangleSelection):
        tail = min(selection.last_q, q_len)
        head_rows = a_shape_pairs(q_len - tail, k_len - tail, selection.sink, selection.window) if tail < q_len else 0
        pairs = head_rows + (dense_pairs(tail, k_len) if tail else 0)
    else:
        raise TypeError(f"no cost model for {type(selection).__name__}; add one to longinfer.plans.search.kernel_pairs")
    return torch.tensor([[float(pairs)]], dtype=torch.float64)


def relative_cost(head: HeadPlan, selection: Any, q_len: int, q_heads: int,
                  head_dim: int | None = None) -> torch.Tensor:
    """``[Hq]`` cost per query head relative to dense: (kernel pairs + estimation pairs) / dense pairs.

    A selection with ``Hkv`` heads (shared by each KV group) charges its pairs to each query head of
    the group, as the kernel runs every query head over the shared index. Averaged over the batch.
    ``head_dim`` scales an estimate scored on fewer dimensions (:func:`estimation_pairs`).
    """
    pairs = kernel_pairs(selection, q_len).mean(0)  # [H]
    if pairs.numel() != q_heads:
        pairs = pairs.repeat_interleave(q_heads // pairs.numel())
    pairs = pairs + estimation_pairs(head.pattern, head.config, q_len, selection.k_len, head_dim)
    return (pairs / dense_pairs(q_len, selection.k_len)).float().cpu()


# --------------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------------


def _widest_window(length: int, sink: int, cost_budget: float, last_q: int = 0) -> int:
    """The largest A-shape (``last_q = 0``) or triangle window whose kernel cost at ``length`` stays
    within ``cost_budget`` (at least 1): a binary search over the exact cost model."""
    dense = dense_pairs(length, length)

    def cost(window: int) -> float:
        tail = min(last_q, length)
        pairs = a_shape_pairs(length - tail, length - tail, sink, window) if tail < length else 0
        return (pairs + (dense_pairs(tail, length) if tail else 0)) / dense

    lo, hi = 1, length
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= cost_budget else (lo, mid - 1)
    return lo


def default_candidates(length: int, cost_budget: float = DEFAULT_COST_BUDGET, *, block_size: int = 64) -> tuple[HeadPlan, ...]:
    """Candidates of comparable kernel cost, sized for ``length`` tokens and ``cost_budget``.

    With ``K = cost_budget * length / 2`` keys per query (the budget's share of an average causal
    row):

    - A-shape (sink ``min(128, K/8)``): the widest window within the budget (by the cost model,
      tile rounding included) and the widest within half of it (if at least
      :data:`MIN_USEFUL_WINDOW`); the triangle (last 128 queries dense) with the widest window
      within the budget;
    - fixed vertical-slash: ``K/4``, ``K/2`` or ``K`` columns and ``K/32`` or ``K/8`` diagonals
      beyond the local band (their cost depends on where the diagonals fall: measured);
    - coverage vertical-slash, tau 0.9 and 0.95, capped at ``K`` columns and ``K/8`` extra
      diagonals, from the last ``min(256, budget * length / 16)`` queries (at least 64), so that
      the estimate stays a small part of the budget;
    - block-sparse: ``K`` or ``K/2`` keys of ``block_size`` blocks, and coverage (tau 0.9) capped at ``K``;
    - strided vertical-slash (estimated from queries spread over the prompt, the default plan's
      estimate): see :func:`strided_vertical_slash_candidates`.

    Which of them fit the budget is decided by their measured cost on the calibration prompt.
    """
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if not 0.0 < cost_budget <= 1.0:
        raise ValueError(f"cost_budget must lie in (0, 1], got {cost_budget}")
    keys = max(8, int(cost_budget * length / 2))
    sink = min(128, max(1, keys // 8))
    local = min(100, max(1, keys // 8))
    vs_sink = min(30, keys // 8)
    out: list[HeadPlan] = []
    for share in (1.0, 0.5):
        window = _widest_window(length, sink, share * cost_budget)
        if share == 1.0 or window >= MIN_USEFUL_WINDOW:
            out.append(HeadPlan.from_params("a_shape", {"sink": sink, "window": window}))
    triangle_last = min(128, length)
    out.append(HeadPlan.from_params("triangle", {
        "sink": sink, "window": _widest_window(length, sink, cost_budget, triangle_last), "last_q": triangle_last}))
    vs_common = {"sink": vs_sink, "local": local, "block_size": block_size}
    for columns in (keys // 4, keys // 2, keys):
        for extra in (keys // 32, keys // 8):
            out.append(HeadPlan.from_params("vertical_slash", {
                "num_vertical": max(vs_sink, columns), "num_slash": local + max(1, extra), **vs_common}))
    coverage_last_q = max(64, min(256, int(cost_budget * length / 16)) // 64 * 64)
    for tau in (0.9, 0.95):
        out.append(HeadPlan.from_params("vertical_slash", {
            "num_vertical": max(vs_sink, keys), "num_slash": local + max(1, keys // 8), "last_q": coverage_last_q,
            "budget": "coverage", "tau": tau, **vs_common}))
    blocks = max(2, keys // block_size)
    for num_blocks in (blocks, max(2, blocks // 2)):
        out.append(HeadPlan.from_params("block_sparse", {"num_blocks": num_blocks, "block_size": block_size}))
    out.append(HeadPlan.from_params("block_sparse", {"num_blocks": blocks, "block_size": block_size,
                                                     "budget": "coverage", "tau": 0.9}))
    out.extend(strided_vertical_slash_candidates(length, cost_budget, block_size=block_size))
    return tuple(dict.fromkeys(out))  # drop duplicates (short lengths), keep order


STRIDED_TAUS = (0.7, 0.8, 0.9)  # coverage targets of the strided candidates (the default plan uses 0.9)
STRIDED_SLASH_SHARES = (0.125, 0.25, 0.5)  # share of the free row budget the fixed candidates spend on slashes
MAX_ESTIMATION_QUERIES = 64


def strided_estimation_queries(length: int, cost_budget: float) -> int:
    """Estimation queries of the strided candidates: 64 (the default plan's), fewer where 64 would
    cost more than a quarter of the budget (``2 * L * N`` estimate pairs against ``~N^2 / 2``
    dense pairs: ``L <= budget * N / 16``), in multiples of 16, at least 16."""
    fitting = int(cost_budget * length / 16) // 16 * 16
    return max(16, min(MAX_ESTIMATION_QUERIES, fitting, length))


def strided_vertical_slash_candidates(length: int, cost_budget: float = DEFAULT_COST_BUDGET, *,
                                      block_size: int = 64) -> list[HeadPlan]:
    """Vertical-slash candidates estimated from ``L`` queries spread over the prompt (``query_sampling="strided"``).

    Sized in the kernel's units: a row may compute ``K = cost_budget * length / 2`` keys on average;
    the estimate takes ``2 L`` of them (:func:`strided_estimation_queries`), the forced local band
    whole key tiles (``local`` is the widest band in ``m`` tiles, ``64 (m - 1) + 1`` diagonals, with
    ``m`` up to 3 and at most a third of ``K``), the sink columns one column tile. Of the rest
    ``R``, every extra slash costs a ``block_size``-key band per query tile (merged only with
    slashes less than ``block_size`` apart), a column about one key per later row (the first
    column tile is paid already):

    - fixed: ``share * R / block_size`` extra slashes (possibly none) and ``64 + (1 - share) * R``
      columns for each share in :data:`STRIDED_SLASH_SHARES`;
    - coverage (columns and diagonals ranked together by mass) for each tau in
      :data:`STRIDED_TAUS`, capped at ``64 + 2 R`` columns and ``max(1, R / 32)`` extra slashes;
    - coverage ranked by mass per unit of kernel work (``rank="cost"``, tau 0.95) with its work
      capped at 80% of what the budget leaves after the estimate.

    Sizes are estimates: the search scores each candidate's real cost on the calibration prompt.
    """
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if not 0.0 < cost_budget <= 1.0:
        raise ValueError(f"cost_budget must lie in (0, 1], got {cost_budget}")
    keys = max(8, int(cost_budget * length / 2))
    last_q = strided_estimation_queries(length, cost_budget)
    tiles = max(1, min(3, keys // (3 * COST_BLOCK_N)))
    local = min(COST_BLOCK_N * (tiles - 1) + 1, length)
    sink = min(30, max(1, keys // 8), length)
    free = max(0, keys - 2 * last_q - tiles * COST_BLOCK_N - COST_BLOCK_N)
    common = {"sink": sink, "local": local, "last_q": last_q, "block_size": block_size,
              "query_sampling": "strided"}
    out = []
    for share in STRIDED_SLASH_SHARES:
        out.append(HeadPlan.from_params("vertical_slash", {
            "num_vertical": min(length, max(sink, COST_BLOCK_N + int((1 - share) * free))),
            "num_slash": min(length, local + round(share * free / block_size)), **common}))
    caps = {"num_vertical": min(length, max(sink, COST_BLOCK_N + 2 * free)),
            "num_slash": min(length, local + max(1, free // 32))}
    for tau in STRIDED_TAUS:
        out.append(HeadPlan.from_params("vertical_slash", {**caps, "budget": "coverage", "tau": tau, **common}))
    estimate_share = 2 * last_q * length / dense_pairs(length, length)
    max_density = round(max(0.005, 0.8 * (cost_budget - estimate_share)), 4)
    out.append(HeadPlan.from_params("vertical_slash", {
        **caps, "budget": "coverage", "tau": 0.95, "rank": "cost", "max_density": min(1.0, max_density), **common}))
    return list(dict.fromkeys(out))


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_candidate(text: str) -> HeadPlan:
    """``"pattern"`` or ``"pattern:key=value,key=value"`` -> a validated :class:`HeadPlan`.

    Values are read as JSON when they parse (``1000``, ``0.9``, ``true``), else as strings
    (``budget=coverage``). Example: ``"vertical_slash:num_vertical=500,num_slash=800,last_q=128"``.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"a candidate must be a non-empty string like 'a_shape:sink=64,window=1024', got {text!r}")
    pattern, _, rest = text.strip().partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"candidate {text!r}: expected key=value, got {item!r}")
        params[key.strip()] = _parse_value(value.strip())
    try:
        return HeadPlan.from_params(pattern.strip(), params)
    except (TypeError, ValueError) as error:
        raise type(error)(f"candidate {text!r}: {error}") from error


def load_candidates(path: str | os.PathLike[str]) -> tuple[HeadPlan, ...]:
    """Candidates from a JSON file: a list of ``{"pattern": ..., "params": {...}}``."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of {{'pattern': ..., 'params': ...}}")
    return tuple(HeadPlan.from_dict(item, f"{path}[{i}]") for i, item in enumerate(data))


# --------------------------------------------------------------------------------------------
# Capturing q/k through a temporary attention function
# --------------------------------------------------------------------------------------------


@dataclass
class CapturedLayer:
    """One attention layer's inputs on the calibration prompt.

    Attributes:
        q: ``[B, Hq, N, D]`` post-RoPE queries; k: ``[B, Hkv, N, D]`` post-RoPE keys.
        sm_scale: the softmax scale the layer uses.
    """

    q: torch.Tensor
    k: torch.Tensor
    sm_scale: float


class _CaptureComplete(Exception):
    """Raised inside the forward pass once every wanted layer is recorded (skips the rest)."""


@dataclass
class _Recorder:
    wanted: frozenset[int]
    store_device: torch.device | None
    layers: dict[int, CapturedLayer] = dataclasses.field(default_factory=dict)


_ACTIVE_RECORDER: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar("longinfer_capture", default=None)


def _capture_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """AttentionInterface function: record ``query``/``key`` of wanted layers, then dense SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    recorder = _ACTIVE_RECORDER.get()
    if recorder is None:
        raise RuntimeError(f"attention implementation {CAPTURE_ATTENTION!r} is only usable inside capture_qk()")
    layer = getattr(module, "layer_idx", None)
    if not isinstance(layer, int):
        raise TypeError(f"{type(module).__name__} has no integer layer_idx; capture_qk cannot tell its layers apart")
    if layer in recorder.wanted:
        device = recorder.store_device or query.device
        scale = kwargs.get("scaling")
        if scale is None:
            scale = getattr(module, "scaling", None) or query.shape[-1] ** -0.5
        recorder.layers[layer] = CapturedLayer(query.detach().to(device), key.detach().to(device), float(scale))
        if len(recorder.layers) == len(recorder.wanted):
            raise _CaptureComplete
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_capture_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_ATTENTION, _capture_attention)
    AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def _attention_implementation(model: Any, name: str) -> Iterator[None]:
    original = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(original)


@torch.inference_mode()
def capture_qk(
    model: Any,
    input_ids: torch.Tensor,
    layers: Iterable[int],
    *,
    store_device: torch.device | str | None = None,
) -> dict[int, CapturedLayer]:
    """Post-RoPE q/k of ``layers`` on ``input_ids [1, N]``, from one forward pass.

    The model's attention implementation is switched to a recording one for the pass (restored
    afterwards); the pass stops after the last wanted layer.

    Args:
        model: a transformers causal LM whose attention goes through ``AttentionInterface``.
        input_ids: ``[1, N]`` token ids.
        layers: layer indices to record.
        store_device: where to keep the captured tensors (default: where they are computed).

    Memory: ``len(layers) * N * (Hq + Hkv) * D`` elements in the model's dtype.
    """
    wanted = frozenset(int(layer) for layer in layers)
    num_layers = model_shape(model.config).num_layers
    bad = sorted(layer for layer in wanted if not 0 <= layer < num_layers)
    if bad:
        raise ValueError(f"layers {bad} do not exist; the model has {num_layers} layers")
    if not wanted:
        return {}
    _register_capture_attention()
    device = next(model.parameters()).device
    recorder = _Recorder(wanted, torch.device(store_device) if store_device is not None else None)
    token = _ACTIVE_RECORDER.set(recorder)
    try:
        with _attention_implementation(model, CAPTURE_ATTENTION):
            try:
                model(input_ids=input_ids.to(device), use_cache=False)
            except _CaptureComplete:
                pass
    finally:
        _ACTIVE_RECORDER.reset(token)
    missing = sorted(wanted - set(recorder.layers))
    if missing:
        raise RuntimeError(f"the forward pass never reached layers {missing}; is the model's attention "
                           "dispatched through transformers' AttentionInterface?")
    return recorder.layers


# --------------------------------------------------------------------------------------------
# Scoring and choosing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerScores:
    """Per candidate and query head: ``recall [C, Hq]`` (mean over sampled rows) and relative
    ``cost [C, Hq]``, both float32 on the CPU."""

    recall: torch.Tensor
    cost: torch.Tensor


@torch.no_grad()
def score_layer(
    q: torch.Tensor,
    k: torch.Tensor,
    candidates: Sequence[HeadPlan],
    rows: torch.Tensor,
    *,
    sm_scale: float | None = None,
    share_kv_groups: bool = False,
) -> LayerScores:
    """Recall and kernel cost of every candidate for every head of one layer.

    Args:
        q: ``[B, Hq, Nq, D]``; k: ``[B, Hkv, Nk, D]``.
        candidates: head plans to score (each estimated as online, on all heads at once).
        rows: ``[R]`` absolute query positions to measure recall at.
        share_kv_groups: estimate one index per KV group (the union of its heads), as a plan that
            gives a whole group one pattern lets the kernel do.

    Memory: :func:`attention_recall`'s, plus one candidate's index at a time.
    """
    if not candidates:
        raise ValueError("no candidates to score")
    lse = causal_logsumexp(q, k, rows, sm_scale=sm_scale)
    recall, cost = [], []
    for head in candidates:
        spec = get_pattern(head.pattern)
        selection = spec.estimate(q, k, head.config, sm_scale=sm_scale, per_kv_group=share_kv_groups)
        stats = attention_recall(q, k, selection, rows, sm_scale=sm_scale, lse=lse)
        recall.append(stats.head_recall.mean(0).float().cpu())
        cost.append(relative_cost(head, selection, q.shape[2], q.shape[1], q.shape[3]))
    return LayerScores(torch.stack(recall), torch.stack(cost))


def choose_candidates(
    scores: LayerScores,
    cost_budget: float,
    *,
    recall_tolerance: float = DEFAULT_RECALL_TOLERANCE,
    group_size: int = 1,
) -> list[int]:
    """Index of the chosen candidate per query head.

    Among candidates with ``cost <= cost_budget``, the highest recall; those within
    ``recall_tolerance`` of it tie, and the cheapest of them wins (the first listed on equal cost).
    No candidate within budget: the cheapest overall. ``group_size > 1`` decides per group of that
    many consecutive heads (a KV group) on the group's mean recall and cost.
    """
    recall, cost = scores.recall.double(), scores.cost.double()
    num_candidates, num_heads = recall.shape
    if group_size < 1 or num_heads % group_size:
        raise ValueError(f"group_size {group_size} must divide the number of heads {num_heads}")
    recall = recall.reshape(num_candidates, -1, group_size).mean(-1)  # [C, groups]
    cost = cost.reshape(num_candidates, -1, group_size).mean(-1)
    eligible = cost <= cost_budget + 1e-12
    best = torch.where(eligible, recall, -math.inf).max(0).values  # [groups]
    tied = eligible & (recall >= best - recall_tolerance)
    choice = torch.where(tied, cost, math.inf).argmin(0)
    over = ~eligible.any(0)
    if over.any():
        logger.warning("no candidate fits cost budget %.3g for %d head group(s); taking the cheapest",
                       cost_budget, int(over.sum()))
        choice = torch.where(over, cost.argmin(0), choice)
    return choice.repeat_interleave(group_size).tolist()


def _grouped(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[C, Hq]`` -> ``[C, Hq / group_size]`` means over consecutive groups of heads."""
    return values.double().reshape(values.shape[0], -1, group_size).mean(-1)


def choose_globally(scores: Sequence[LayerScores], cost_budget: float, *, group_size: int = 1) -> list[list[int]]:
    """Chosen candidate per query head of every layer, with ``cost_budget`` the average over all of them.

    One price ``p`` per unit of relative cost for every head (or KV group of ``group_size`` heads)
    of every layer: each takes the candidate maximizing ``recall - p * cost`` (on equal value the
    cheaper, then the first listed), and ``p`` is the lowest price at which the mean cost over all
    heads stays within ``cost_budget``. By the Lagrangian argument no other choice of at most that
    mean cost has a higher mean recall. If even every head's cheapest candidate averages above the
    budget, those are taken (logged as a warning).
    """
    if not scores:
        raise ValueError("no layer scores to choose from")
    if not cost_budget > 0:
        raise ValueError(f"cost_budget must be > 0, got {cost_budget}")
    recall = torch.cat([_grouped(layer.recall, group_size) for layer in scores], 1)  # [C, all groups]
    cost = torch.cat([_grouped(layer.cost, group_size) for layer in scores], 1)

    def choose(price: float) -> torch.Tensor:
        value = recall - price * cost
        best = value.max(0).values
        near = value >= best - 1e-12  # ties: the cheaper candidate
        return torch.where(near, cost, math.inf).argmin(0)

    def mean_cost(price: float) -> float:
        chosen = choose(price)
        return float(cost.gather(0, chosen[None])[0].mean())

    low, high = 0.0, 1.0
    while mean_cost(high) > cost_budget + 1e-12 and high < 1e12:
        high *= 4.0
    if mean_cost(high) > cost_budget + 1e-12:
        logger.warning("even the cheapest candidates average a cost above the budget %.3g; taking them", cost_budget)
        choice = cost.argmin(0)
    else:
        if mean_cost(low) > cost_budget + 1e-12:
            for _ in range(_PRICE_BISECTIONS):
                middle = (low + high) / 2
                low, high = (low, middle) if mean_cost(middle) <= cost_budget + 1e-12 else (middle, high)
        else:
            high = low
        choice = choose(high)
    per_head = choice.repeat_interleave(group_size).tolist()
    heads = scores[0].recall.shape[1]
    return [per_head[i * heads: (i + 1) * heads] for i in range(len(scores))]


def ladder_candidates(length: int, cost_budget: float = DEFAULT_COST_BUDGET, *, block_size: int = 64
                      ) -> tuple[HeadPlan, ...]:
    """:func:`default_candidates` at every :data:`GLOBAL_BUDGET_LADDER` multiple of ``cost_budget``
    (those within ``(0, 1]``), without repeats: cheap and dear choices for a global allocation."""
    seen: dict[str, HeadPlan] = {}
    for multiple in GLOBAL_BUDGET_LADDER:
        budget = cost_budget * multiple
        if 0.0 < budget <= 1.0:
            for head in default_candidates(length, budget, block_size=block_size):
                seen.setdefault(json.dumps(head.to_dict(), sort_keys=True), head)
    return tuple(seen.values())


# --------------------------------------------------------------------------------------------
# Measured dense crossover
# --------------------------------------------------------------------------------------------


def sparse_layer_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: LayerPlan,
    *,
    sm_scale: float | None = None,
    share_kv_groups: bool = False,
) -> torch.Tensor:
    """One layer's attention under its plan, as the transformers integration runs it.

    Heads sharing a plan run together (the integration's
    :func:`~longinfer.integrations.transformers.head_buckets`: gathered per KV head, GQA never
    expanded), one estimate and one kernel launch per bucket. With ``share_kv_groups`` a bucket of
    whole KV groups is estimated once per group.

    Args:
        q: ``[B, Hq, N, D]``; k, v: ``[B, Hkv, N, D]``.

    Returns ``[B, Hq, N, D]``. This is what the dense crossover is timed on.
    """
    from longinfer.integrations.transformers import head_buckets

    out = torch.empty_like(q)
    full_group = q.shape[1] // k.shape[1]
    for bucket in head_buckets(layer, k.shape[1]):
        spec = get_pattern(bucket.head.pattern)
        q_idx = torch.tensor(bucket.q_heads, device=q.device)
        kv_idx = torch.tensor(bucket.kv_heads, device=k.device)
        q_sub, k_sub, v_sub = q.index_select(1, q_idx), k.index_select(1, kv_idx), v.index_select(1, kv_idx)
        per_group = share_kv_groups and bucket.group_size == full_group
        selection = spec.estimate(q_sub, k_sub, bucket.head.config, sm_scale=sm_scale, per_kv_group=per_group)
        out.index_copy_(1, q_idx, spec.run(q_sub, k_sub, v_sub, selection, bucket.head.config, sm_scale=sm_scale))
    return out


def crossover_from_timings(lengths: Sequence[int], dense_ms: Sequence[float], sparse_ms: Sequence[float]) -> tuple[int, str]:
    """The key length below which dense is faster, from timings at increasing ``lengths``.

    Returns ``(dense_below, how)``. With ``r = sparse / dense`` per length:

    - sparse faster at every length: the shortest length (``"below_shortest"``; nothing shorter
      was timed, so shorter inputs stay dense, the exact choice);
    - sparse faster from some length on: ``log r`` interpolated linearly in ``log length``
      between the last slower and the first faster length (``"interpolated"``);
    - sparse slower at the longest length: ``log r`` extrapolated from the last two lengths
      (``"extrapolated"``), at most :data:`CROSSOVER_EXTRAPOLATION` times the longest length
      (``"not_reached"`` when it would lie beyond).
    """
    if not (len(lengths) == len(dense_ms) == len(sparse_ms)) or not lengths:
        raise ValueError("lengths, dense_ms and sparse_ms must be non-empty and of equal size")
    log_n = [math.log(n) for n in lengths]
    log_r = [math.log(s / d) for s, d in zip(sparse_ms, dense_ms)]
    limit = CROSSOVER_EXTRAPOLATION * lengths[-1]
    first_fast = len(lengths)
    while first_fast > 0 and log_r[first_fast - 1] < 0:
        first_fast -= 1
    if first_fast == 0:
        return int(lengths[0]), "below_shortest"

    def cross(i: int, j: int) -> float:
        slope = (log_r[j] - log_r[i]) / (log_n[j] - log_n[i])
        return math.inf if slope >= 0 else math.exp(log_n[i] - log_r[i] / slope)

    if first_fast < len(lengths):
        at = cross(first_fast - 1, first_fast)
        return math.ceil(min(max(at, lengths[first_fast - 1]), lengths[first_fast])), "interpolated"
    if len(lengths) >= 2:
        at = cross(len(lengths) - 2, len(lengths) - 1)
        if at <= limit:
            return math.ceil(max(at, lengths[-1])), "extrapolated"
    return int(limit), "not_reached"


def measure_dense_below(
    captured: CapturedLayer,
    layer: LayerPlan,
    *,
    lengths: Sequence[int] = CROSSOVER_LENGTHS,
    share_kv_groups: bool = False,
    repeats: int = 5,
    warmup: int = 2,
) -> tuple[int, dict[str, Any]]:
    """Time the layer's sparse plan (estimation included) against dense attention; return
    ``(dense_below, record)``.

    Uses the captured q/k cut to each length in ``lengths`` not beyond the calibration length (a
    prefix of a causal prefill is itself a prefill); ``v`` is the keys (values do not change the
    time). Without a CUDA device nothing is timed: ``dense_below`` is
    :data:`~longinfer.plans.schema.DEFAULT_DENSE_BELOW` and the record says ``"measured": false``.
    """
    q, k = captured.q, captured.k
    if q.device.type != "cuda":
        return DEFAULT_DENSE_BELOW, {"measured": False, "reason": f"no CUDA device (tensors on {q.device.type})",
                                     "default": DEFAULT_DENSE_BELOW}
    from longinfer import ops

    usable = sorted(n for n in set(lengths) if n <= q.shape[2]) or [q.shape[2]]
    dense_ms, sparse_ms = [], []
    for n in usable:
        q_n, k_n = q[:, :, :n], k[:, :, :n]

        def dense(q_n: torch.Tensor = q_n, k_n: torch.Tensor = k_n) -> torch.Tensor:
            return ops.dense_attention(q_n, k_n, k_n, sm_scale=captured.sm_scale)

        def sparse(q_n: torch.Tensor = q_n, k_n: torch.Tensor = k_n) -> torch.Tensor:
            return sparse_layer_attention(q_n, k_n, k_n, layer, sm_scale=captured.sm_scale,
                                          share_kv_groups=share_kv_groups)

        dense_ms.append(median_cuda_ms(dense, repeats, warmup))
        sparse_ms.append(median_cuda_ms(sparse, repeats, warmup))
    dense_below, how = crossover_from_timings(usable, dense_ms, sparse_ms)
    return dense_below, {"measured": True, "device": torch.cuda.get_device_name(q.device), "how": how,
                         "lengths": usable, "dense_ms": [round(t, 4) for t in dense_ms],
                         "sparse_ms": [round(t, 4) for t in sparse_ms]}


# --------------------------------------------------------------------------------------------
# Incremental results (resume)
# --------------------------------------------------------------------------------------------


def partial_path(out: str | os.PathLike[str]) -> Path:
    """Where a search writing ``out`` keeps its finished layers: ``<out>.partial.jsonl``."""
    out = Path(out)
    return out.with_name(out.name + ".partial.jsonl")


class SearchProgress:
    """The JSONL file of a search: a header with the settings, then one record per finished layer.

    A torn last line (a kill during the write) is dropped with a warning and the file truncated.
    """

    def __init__(self, path: str | os.PathLike[str], settings: Mapping[str, Any], *, restart: bool = False) -> None:
        self.path = Path(path)
        self.settings = json.loads(json.dumps(dict(settings)))  # normalized JSON form
        self.layers: dict[int, dict[str, Any]] = {}
        if restart and self.path.exists():
            logger.info("restart: removing %s", self.path)
            self.path.unlink()
        if self.path.exists():
            self._load()
        else:
            self._append({"kind": "header", "settings": self.settings})

    def _load(self) -> None:
        lines = self.path.read_text(encoding="utf-8").split("\n")
        complete, torn = lines[:-1], lines[-1]
        if torn:
            logger.warning("%s: dropping a torn last line (%d characters)", self.path, len(torn))
            self.path.write_text("".join(line + "\n" for line in complete), encoding="utf-8")
        if not complete:
            self._append({"kind": "header", "settings": self.settings})
            return
        header = json.loads(complete[0])
        if header.get("kind") != "header":
            raise ValueError(f"{self.path} is not a search progress file (no header line); remove it")
        if header["settings"] != self.settings:
            differing = sorted(key for key in set(header["settings"]) | set(self.settings)
                               if header["settings"].get(key) != self.settings.get(key))
            raise ValueError(
                f"{self.path} holds a search with other settings (differing: {differing}); rerun with the "
                "same settings to resume, or remove the file (restart=True / --restart) to start over"
            )
        for line in complete[1:]:
            record = json.loads(line)
            self.layers[int(record["layer"])] = record

    def _append(self, record: Mapping[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def add_layer(self, record: Mapping[str, Any]) -> None:
        self._append({"kind": "layer", **record})
        self.layers[int(record["layer"])] = dict(record)


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------


def _rounded(values: torch.Tensor, digits: int = 5) -> list:
    """A 1-D or 2-D tensor as nested lists of rounded floats (compact JSON)."""
    if values.dim() == 2:
        return [_rounded(row, digits) for row in values]
    return [round(float(x), digits) for x in values.tolist()]


def _search_layer(
    captured: CapturedLayer,
    layer_index: int,
    candidates: Sequence[HeadPlan],
    settings: Mapping[str, Any],
    num_kv_heads: int,
) -> dict[str, Any]:
    """Score, choose and time one layer; returns its progress record."""
    q, k = captured.q, captured.k
    rows = sample_rows(q.shape[2], k.shape[2], min(settings["num_rows"], q.shape[2]), seed=settings["seed"] + layer_index,
                       device=q.device)
    scores = score_layer(q, k, candidates, rows, sm_scale=captured.sm_scale, share_kv_groups=settings["share_kv_groups"])
    group = q.shape[1] // num_kv_heads if settings["share_kv_groups"] else 1
    choice = choose_candidates(scores, settings["cost_budget"], recall_tolerance=settings["recall_tolerance"],
                               group_size=group)
    layer_plan = LayerPlan(tuple(candidates[c] for c in choice), dense_below=0,
                           share_kv_groups=settings["share_kv_groups"])
    if settings["dense_below"] is not None:
        dense_below, crossover = settings["dense_below"], {"measured": False, "reason": "given by the user"}
    elif settings.get("allocation") == "global":
        dense_below = DEFAULT_DENSE_BELOW
        crossover = {"measured": False, "default": DEFAULT_DENSE_BELOW,
                     "reason": "global allocation: the layer's heads are chosen after every layer is scored"}
    elif not settings["measure_crossover"]:
        dense_below = DEFAULT_DENSE_BELOW
        crossover = {"measured": False, "reason": "measurement turned off", "default": DEFAULT_DENSE_BELOW}
    else:
        dense_below, crossover = measure_dense_below(captured, layer_plan, lengths=settings["crossover_lengths"],
                                                     share_kv_groups=settings["share_kv_groups"])
    heads = torch.arange(len(choice))
    chosen = torch.tensor(choice)
    record = {
        "layer": layer_index,
        "choice": choice,
        "dense_below": int(dense_below),
        "crossover": crossover,
        "recall": _rounded(scores.recall[chosen, heads]),
        "cost": _rounded(scores.cost[chosen, heads]),
        "all_recall": _rounded(scores.recall),
        "all_cost": _rounded(scores.cost),
        "captured": {"device": q.device.type, "dtype": str(q.dtype).removeprefix("torch.")},
    }
    names = [candidates[c].pattern for c in choice]
    provisional = " (each head within the budget; the global allocation chooses after the last layer)" \
        if settings.get("allocation") == "global" else ""
    logger.info("layer %d: %s; mean recall %.4f at mean cost %.4f; dense below %d%s", layer_index,
                ", ".join(f"{names.count(n)} {n}" for n in dict.fromkeys(names)),
                statistics.fmean(record["recall"]), statistics.fmean(record["cost"]), dense_below, provisional)
    return record


def _progress_bar(total: int, enabled: bool, initial: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="search", unit="layer", disable=not enabled)


def search_plan(
    model: Any,
    tokenizer: Any,
    *,
    out: str | os.PathLike[str] | None = None,
    length: int = DEFAULT_LENGTH,
    calibration: CalibrationPrompt | None = None,
    candidates: Sequence[HeadPlan] | None = None,
    cost_budget: float = DEFAULT_COST_BUDGET,
    recall_tolerance: float = DEFAULT_RECALL_TOLERANCE,
    num_rows: int = DEFAULT_NUM_ROWS,
    seed: int = 0,
    share_kv_groups: bool = False,
    dense_below: int | None = None,
    dense_last: int = DEFAULT_DENSE_LAST,
    measure_crossover: bool = True,
    crossover_lengths: Sequence[int] = CROSSOVER_LENGTHS,
    layers_per_forward: int | None = None,
    model_id: str | None = None,
    model_revision: str | None = None,
    restart: bool = False,
    progress: bool = True,
    allocation: str = "per_head",
) -> Plan:
    """Search every head's pattern on a calibration prompt and return (and optionally write) the plan.

    Args:
        model, tokenizer: a transformers causal LM (e.g. from :func:`longinfer.models.zoo.load`).
        out: plan path; enables resuming through ``<out>.partial.jsonl`` (see the module docstring).
        length: calibration length in tokens (ignored when ``calibration`` is given).
        calibration: the prompt; default :func:`~longinfer.plans.calibration.kv_retrieval_prompt`
            of ``length`` tokens with ``seed``.
        candidates: head plans to choose from; default :func:`default_candidates` for the length.
        cost_budget: the most relative kernel cost a head's choice may have (see :func:`relative_cost`).
        recall_tolerance: recalls this close to the best count as a tie (the cheaper wins).
        num_rows: sampled query rows per layer for recall.
        seed: seeds the calibration prompt and the sampled rows.
        share_kv_groups: give each KV group one pattern (estimated once for the group); every
            layer of the plan records it (``LayerPlan.share_kv_groups``) so the integration runs it so.
        dense_below: use this threshold for every layer instead of measuring it.
        dense_last: every layer of the plan runs the last ``dense_last`` query rows of a sparse
            call dense (``LayerPlan.dense_last``; the search itself scores the heads' indices alone).
        measure_crossover: time the dense crossover (CUDA only; see :func:`measure_dense_below`).
        crossover_lengths: lengths to time at (those beyond the calibration length are skipped).
        layers_per_forward: capture at most this many layers per forward pass (bounds memory; each
            extra pass re-runs the model up to its last layer). Default: all in one pass.
        model_id, model_revision: recorded in the plan (default: the config's ``name_or_path``).
        restart: discard an existing ``<out>.partial.jsonl`` instead of resuming it.
        progress: show a progress bar over layers.
        allocation: ``"per_head"``: ``cost_budget`` bounds every head's choice; ``"global"``: it bounds
            the average over all heads of all layers (:func:`choose_globally`; the default candidates
            then come at :data:`GLOBAL_BUDGET_LADDER` multiples of the budget, and the dense crossover
            is not timed: every layer gets ``dense_below`` or the default's).

    Returns:
        The :class:`~longinfer.plans.schema.Plan`; ``plan.search`` holds the settings, the
        calibration description and per layer the chosen heads' recall and cost and the timing.
    """
    shape = model_shape(model.config)
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if calibration is None:
        calibration = kv_retrieval_prompt(tokenizer, length, seed=seed)
    if candidates is None:
        candidates = (default_candidates(calibration.length, cost_budget) if allocation == "per_head"
                      else ladder_candidates(calibration.length, cost_budget))
    candidates = tuple(candidates)
    if not candidates or not all(isinstance(c, HeadPlan) for c in candidates):
        raise TypeError("candidates must be a non-empty sequence of HeadPlan (see parse_candidate)")
    if num_rows < 1:
        raise ValueError(f"num_rows must be >= 1, got {num_rows}")
    if not cost_budget > 0 or not recall_tolerance >= 0:
        raise ValueError(f"cost_budget must be > 0 and recall_tolerance >= 0, got {cost_budget}, {recall_tolerance}")
    if dense_below is not None and (not isinstance(dense_below, int) or dense_below < 0):
        raise ValueError(f"dense_below must be a non-negative int or None, got {dense_below!r}")
    if not isinstance(dense_last, int) or dense_last < 0:
        raise ValueError(f"dense_last must be a non-negative int, got {dense_last!r}")
    if model_id is None:
        model_id = str(getattr(model.config, "name_or_path", "") or "")
    settings = {
        "method": "search",
        "model": model_id,
        "shape": dataclasses.asdict(shape),
        "calibration": dict(calibration.description),
        "candidates": [c.to_dict() for c in candidates],
        "cost_budget": cost_budget,
        "recall_tolerance": recall_tolerance,
        "num_rows": num_rows,
        "seed": seed,
        "share_kv_groups": share_kv_groups,
        "dense_below": dense_below,
        "dense_last": dense_last,
        "measure_crossover": measure_crossover,
        "crossover_lengths": sorted(set(crossover_lengths)),
        "cost_model": {"block_n": COST_BLOCK_N, "dense_block_m": DENSE_BLOCK_M, "estimation": "included"},
    }
    if allocation != "per_head":  # (absent for the per-head choice: earlier progress files still resume)
        settings["allocation"] = allocation
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    store = SearchProgress(partial_path(out), settings, restart=restart) if out is not None else None
    done = dict(store.layers) if store is not None else {}
    todo = [layer for layer in range(shape.num_layers) if layer not in done]
    if done:
        logger.info("resuming: %d of %d layers already searched", len(done), shape.num_layers)
    started = time.perf_counter()
    per_pass = layers_per_forward or max(1, len(todo))
    with _progress_bar(shape.num_layers, progress, len(done)) as bar:
        for first in range(0, len(todo), per_pass):
            batch = todo[first: first + per_pass]
            captured = capture_qk(model, calibration.tensor(), batch)
            for layer in batch:
                record = _search_layer(captured.pop(layer), layer, candidates, settings, shape.num_kv_heads)
                if store is not None:
                    store.add_layer(record)
                done[layer] = record
                bar.update(1)
    plan = _plan_from_records(shape, done, candidates, settings, model_id, model_revision)
    logger.info("searched %d layer(s) in %.1f s", len(todo), time.perf_counter() - started)
    if out is not None:
        plan.save(out)
        logger.info("wrote %s", out)
    return plan


def _versions() -> dict[str, str]:
    """Versions of the libraries that shape a search's numbers."""
    import transformers

    from longinfer import __version__

    return {"longinfer": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _plan_from_records(shape: Any, records: Mapping[int, Mapping[str, Any]], candidates: Sequence[HeadPlan],
                       settings: Mapping[str, Any], model_id: str, model_revision: str | None) -> Plan:
    layers = []
    summary = []
    choices = [records[index]["choice"] for index in range(shape.num_layers)]
    if settings.get("allocation") == "global":
        scores = [LayerScores(torch.tensor(records[i]["all_recall"]), torch.tensor(records[i]["all_cost"]))
                  for i in range(shape.num_layers)]
        group = shape.num_q_heads // shape.num_kv_heads if settings["share_kv_groups"] else 1
        choices = choose_globally(scores, settings["cost_budget"], group_size=group)
    for index, choice in enumerate(choices):
        record = records[index]
        layers.append(LayerPlan(tuple(candidates[c] for c in choice), dense_below=record["dense_below"],
                                share_kv_groups=settings["share_kv_groups"], dense_last=settings.get("dense_last", 0)))
        summary.append({"recall": [record["all_recall"][c][h] for h, c in enumerate(choice)],
                        "cost": [record["all_cost"][c][h] for h, c in enumerate(choice)],
                        "crossover": record["crossover"]})
    if settings.get("allocation") == "global":
        recalls = [r for layer in summary for r in layer["recall"]]
        costs = [c for layer in summary for c in layer["cost"]]
        logger.info("global allocation over %d heads: mean recall %.4f at mean cost %.4f (budget %.4f)",
                    len(costs), statistics.fmean(recalls), statistics.fmean(costs), settings["cost_budget"])
    search = {key: value for key, value in settings.items() if key not in ("model", "shape")}
    search["layers"] = summary
    captured = [records[i]["captured"] for i in range(shape.num_layers) if "captured" in records[i]]
    search["captured_on"] = [dict(c) for c in {json.dumps(c, sort_keys=True): c for c in captured}.values()]
    search["versions"] = _versions()
    return Plan(model_id=model_id, model_revision=model_revision, **dataclasses.asdict(shape), layers=tuple(layers),
                search=search)


def candidate_label(head: HeadPlan) -> str:
    """Short text for a head plan: the pattern and the parameters that differ from its defaults."""
    defaults = config_to_params(type(head.config)())
    changed = {k: v for k, v in head.params.items() if defaults.get(k) != v}
    return head.pattern + ("(" + ", ".join(f"{k}={v}" for k, v in changed.items()) + ")" if changed else "")
