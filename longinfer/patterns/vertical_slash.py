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

Estimation queries (``query_sampling``): ``"last"`` (the last ``last_q``, MInference), ``"strided"``
(``last_q`` evenly spread over all queries, each causal up to its own position) or ``"mixed"``.
Recall is averaged over every query, and the last queries miss what early queries attend: spread
queries estimate it at the same cost (CPU, 0.5B, 8K: +0.025 mean recall at equal density).
But a long prompt's question, at its end, attends to the facts it asks about: ``question_from``
adds the last ``last_q`` queries to the strided ones on long calls, which keeps those facts' columns
for every row (on a 1.5B model at 32K-128K the answers' log-probability moved from 0.4-1.0 nats under
dense's to within 0.3 of it; see :class:`VerticalSlashConfig`).

Cost ranking (``budget="coverage", rank="cost"``): items are ranked by estimated mass per unit of
kernel work instead of by mass. A column costs one key per query after it; a slash costs a whole
tile of ``block_size`` keys per query (the kernel covers slashes per query tile), so slashes are
scored by the mass their tile coverage keeps (:func:`tile_smoothed_mass`) at one candidate offset
per tile of offsets (:func:`slash_candidates`), which tiles wide diagonal bands without overlap.
``min_gain`` stops at a recall-per-density threshold shared by all heads (a density dial that puts
the work where it buys the most), ``max_density`` caps the work, ``split_halves`` scores items by
the smaller mass of two halves of the estimation queries.

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
from typing import NamedTuple

import torch

from longinfer._device_cache import device_cached
from longinfer.ops import reference
from longinfer.ops._checks import interpreter_enabled
from longinfer.patterns._common import (
    KERNEL_BLOCK_SIZES,
    QKShape,
    check_budget,
    check_config_fields,
    check_estimate_backend,
    check_qk,
    mask_to_index,
    require,
    softmax_scale,
    triton_estimate_supported,
    union_of_packed,
    union_over_groups,
    union_packed_over_groups,
)
from longinfer.patterns._estimate_kernel import estimate_masses_triton
from longinfer.patterns._select_kernel import MIN_SLICE, select_packed_triton
from longinfer.patterns._union_kernel import union_packed_over_groups_triton
from longinfer.patterns.repeat_rows import estimation_rows, extra_row_count

KEY_CHUNK = 8192  # keys per streaming step of the estimate: memory O(last_q * KEY_CHUNK) per head
QUERY_SAMPLINGS = ("last", "strided", "mixed")
THRESHOLD_COUNTS = ("keys", "queries")
RANKINGS = ("mass", "cost")


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
        min_slash_share: with the minimums in force, at least ``ceil(min_slash_share * n)`` diagonals
            (and at most ``num_slash``) where ``n`` is the call's counted length (keys or query rows,
            see ``thresholds_on``): a diagonal floor that grows with the prompt (0 = ``min_slash``
            alone). ``min_slash`` stays the lower bound.
        floor_from: the minimums apply only to calls over at least this many keys (or query rows,
            see ``thresholds_on``; 0 = always): at 32K a floor of 1,000 / 3,000 made the index 62%
            dense for little RULER-style gain over shared columns, while at 128K it scored 68.7
            (dense 71.0) where no floor scored 61.6 (session 16), 3,000 diagonals alone 68.6 and
            1,000 columns alone 57.5 (session 17).
        block_size: the kernel's query tile; slashes are covered for whole tiles (see
            :func:`longinfer.ops.reference.vertical_slash_mask`).
        segments: number of query segments with their own index (1 = one index for all queries);
            short inputs get fewer (segments are at least one ``block_size`` tile long).
        query_sampling: which ``last_q`` queries estimate: ``"last"`` (the last ones, MInference),
            ``"strided"`` (evenly spread over all queries) or ``"mixed"`` (half each); see
            :func:`estimation_positions`. Spread queries represent early queries too, at the same cost.
        rank: coverage ranking: ``"mass"`` (estimated mass, the default) or ``"cost"`` (estimated
            mass per unit of kernel work, slashes scored with the tile coverage; see
            :func:`_cost_ranked_choice`). ``"cost"`` needs ``budget="coverage"``.
        max_density: with ``rank="cost"``, stop adding items once the estimated kernel work
            reaches this share of all causal pairs (1.0 = no cap).
        min_gain: with ``rank="cost"``, take only items whose estimated mass per unit of work
            (recall gained per density spent) is at least this; one value for all heads spends the
            work where it buys the most recall (0 = no threshold).
        split_halves: with ``rank="cost"``, score every item by the smaller of its masses in the
            two interleaved halves of the estimation queries, so an item only a query or two attend
            (which does not carry over to other queries) ranks low. Same estimation work.
        group_mix: blend each head's estimated masses with the mean of its KV group's heads:
            ``(1 - group_mix) * own + group_mix * group mean`` (0 = each head alone). The query
            heads of a group read the same keys; what one head's estimation queries miss, another's
            may see (see :func:`mix_over_groups`). Same estimation work, one index per head.
        column_q: estimation queries of the column mass alone (0 = the same ``last_q`` queries
            as the diagonal mass); sampled by ``query_sampling`` like them. Column mass is where
            retrieval happens (a fact is a key column) and estimating it from more queries costs
            no diagonal scatter, only ``4 * column_q * Nk * D`` FLOP per head more (two passes).
        group_columns: every query head attends the columns chosen for any head of its KV group
            (the union; width ``G * num_vertical``), its diagonals stay its own. One index per KV
            group (``per_kv_group``, the union of columns *and* diagonals) stayed within noise of
            dense on RULER-style tasks where per-head indices lost 6-11 points at any tau, at
            33-40% density; a fact is a key column, and what one head's 64 estimation queries miss
            another's may have found. Same estimation work, more columns per head.
        group_columns_below: with ``group_columns``, share the group's columns only on calls over
            fewer than this many keys (or query rows, see ``thresholds_on``; 0 = on every call);
            longer calls give each head its own columns. On Qwen2.5-Coder-1.5B at 128K shared
            columns recovered little (RULER-style 61.6 against per-head 58.3, dense 71.0), while
            per-head columns with a floor scored 68.7 at a lower density than shared ones with the
            same floor (29.6% against 33.8%, session 16).
        thresholds_on: what ``floor_from`` and ``group_columns_below`` count: the call's ``"keys"``
            or its ``"queries"`` (rows). A long prefill (queries = keys) estimates each of its
            64 strided queries for thousands of rows, a 4K turn over a long cache for 64: the
            estimate's sampling, and so the need for floors, follows the query count. With
            ``"queries"``, :meth:`for_call` resolves the config for a call (the estimator does).
        repeat_rows: extra estimation queries at rows that end a token ``repeat_ngram``-gram first
            seen at least ``repeat_distance`` positions earlier (induction-like attention to an
            earlier copy, which strided rows miss; see :mod:`longinfer.patterns.repeat_rows`),
            evenly thinned to this many, spread rows filling in where fewer qualify or the token
            ids are unknown (0 = none). The estimate costs ``(last_q + repeat_rows) / last_q``
            times as much. A patched model passes its token ids down; a direct call of the
            estimator without ``positions`` gets spread rows only. 64 such rows did not help
            RULER-style at 64K / 128K on Qwen2.5-Coder-1.5B (prose repeats 4-grams too: ~2,500
            rows of a 64K prompt qualify, ~1 of the 64 kept lies in a needle; session 23).
        repeat_ngram, repeat_distance: the repeat rule of ``repeat_rows``.
        question_from: calls of at least this many query rows (or keys, see ``thresholds_on``; 0 =
            never) estimate from ``2 * last_q`` queries: the last ``last_q`` positions, where a long
            prompt's question sits, plus ``last_q`` spread over the rows before them
            (``query_sampling="mixed"``); needs ``query_sampling="strided"``. The question attends to
            the facts it asks about, so their key columns are kept for every row. On
            Qwen2.5-Coder-1.5B (session 24) it cut the answers' log-probability loss against dense
            from -1.04 / -0.41 / -0.62 nats to +0.20 / +0.03 / -0.31 at 32K / 64K / 128K (without
            the common-words task, which swings either way: -1.46 / -0.58 / -0.93 to -0.28 / -0.03 /
            -0.46), at lower density and equal or faster TTFT; the estimate costs twice as much.
        question_vertical: on calls that estimate from the question's queries (``question_from``
            reached; a resolved config: ``query_sampling="mixed"``), each head also keeps the
            ``question_vertical`` columns those last queries alone attend to most (the peer's rule
            keeps 1,000 columns from its last 64 queries). The coverage budget ranks the columns by
            the mass of all estimation queries, where the question's facts share the ranking with
            every strided query's columns; on Qwen2.5-Coder-1.5B the default's remaining losses
            against dense lie in multi-value retrieval (-1.27 / -2.05 nats at 32K / 16K) where the
            peer's rule loses none (session 25). On Qwen2.5-Coder-0.5B at 8K (CPU, every layer
            sparse) 256 or 1,000 such columns changed the answers by +0.03 nats (the question's
            columns were already chosen; ``docs/results/ruler-cpu-qwen0.5b-8k-qcols/``). Costs one
            column-mass pass of the last queries (no diagonals) and widens the column list by
            ``question_vertical``. Needs ``rank="mass"``.
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
    min_slash_share: float = 0.0
    floor_from: int = 0
    block_size: int = 64
    segments: int = 1
    query_sampling: str = "last"
    rank: str = "mass"
    max_density: float = 1.0
    min_gain: float = 0.0
    split_halves: bool = False
    group_mix: float = 0.0
    column_q: int = 0
    group_columns: bool = False
    group_columns_below: int = 0
    thresholds_on: str = "keys"
    repeat_rows: int = 0
    repeat_ngram: int = 4
    repeat_distance: int = 1024
    question_from: int = 0
    question_vertical: int = 0

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
        require(0.0 <= self.min_slash_share <= 1.0,
                f"{name}.min_slash_share must lie in [0, 1] (a share of the call's length), got {self.min_slash_share}")
        require(self.floor_from >= 0, f"{name}.floor_from must be >= 0, got {self.floor_from}")
        require(self.group_columns_below >= 0,
                f"{name}.group_columns_below must be >= 0 (0 = every call), got {self.group_columns_below}")
        require(self.group_columns or not self.group_columns_below,
                f"{name}.group_columns_below limits group_columns; set group_columns=True or leave it at 0")
        require(self.thresholds_on in THRESHOLD_COUNTS,
                f"{name}.thresholds_on must be one of {THRESHOLD_COUNTS}, got {self.thresholds_on!r}")
        require(self.block_size in KERNEL_BLOCK_SIZES,
                f"{name}.block_size must be one of {KERNEL_BLOCK_SIZES}, got {self.block_size}")
        require(self.segments >= 1, f"{name}.segments must be >= 1, got {self.segments}")
        require(self.query_sampling in QUERY_SAMPLINGS,
                f"{name}.query_sampling must be one of {QUERY_SAMPLINGS}, got {self.query_sampling!r}")
        require(self.rank in RANKINGS, f"{name}.rank must be one of {RANKINGS}, got {self.rank!r}")
        require(self.rank == "mass" or self.budget == "coverage",
                f"{name}.rank={self.rank!r} orders a coverage budget; set budget='coverage' or rank='mass'")
        require(0.0 < self.max_density <= 1.0, f"{name}.max_density must lie in (0, 1], got {self.max_density}")
        require(self.max_density == 1.0 or self.rank == "cost",
                f"{name}.max_density needs rank='cost' (the mass ranking has no cost model)")
        require(self.min_gain >= 0.0 and math.isfinite(self.min_gain), f"{name}.min_gain must be finite and >= 0, got {self.min_gain}")
        require(self.min_gain == 0.0 or self.rank == "cost",
                f"{name}.min_gain needs rank='cost' (the mass ranking has no cost model)")
        require(not self.split_halves or self.rank == "cost", f"{name}.split_halves needs rank='cost'")
        require(0.0 <= self.group_mix <= 1.0, f"{name}.group_mix must lie in [0, 1], got {self.group_mix}")
        require(self.column_q >= 0, f"{name}.column_q must be >= 0 (0 = last_q), got {self.column_q}")
        require(self.column_q == 0 or not self.split_halves,
                f"{name}: split_halves splits the last_q queries of both masses; leave column_q at 0 with it")
        require(self.repeat_rows >= 0, f"{name}.repeat_rows must be >= 0 (0 = none), got {self.repeat_rows}")
        require(self.repeat_ngram >= 1 and self.repeat_distance >= 1,
                f"{name}: repeat_ngram and repeat_distance must be >= 1, got {self.repeat_ngram}, {self.repeat_distance}")
        require(not self.repeat_rows or (self.segments == 1 and not self.split_halves and self.column_q == 0),
                f"{name}.repeat_rows adds rows to the one estimate of both masses; it needs segments=1, "
                "split_halves=False and column_q=0")
        require(self.question_from >= 0, f"{name}.question_from must be >= 0 (0 = never), got {self.question_from}")
        require(not self.question_from or (self.query_sampling == "strided" and self.segments == 1
                                           and self.column_q == 0),
                f"{name}.question_from adds the last queries to strided ones in the one estimate of both masses; "
                "it needs query_sampling='strided', segments=1 and column_q=0")
        require(self.question_vertical >= 0, f"{name}.question_vertical must be >= 0, got {self.question_vertical}")
        require(not self.question_vertical or self.question_from or self.query_sampling == "mixed",
                f"{name}.question_vertical keeps the columns of the question's queries; it needs question_from > 0 "
                "(or query_sampling='mixed', whose last half are those queries)")
        require(not self.question_vertical or (self.rank == "mass" and not self.split_halves),
                f"{name}.question_vertical adds columns to the mass-ranked index; it needs rank='mass' "
                "and split_halves=False")

    def floors(self, k_len: int) -> tuple[int, int]:
        """``(min_vertical, min_slash)`` of a call over ``k_len`` keys: ``(0, 0)`` below ``floor_from``."""
        self._require_key_thresholds()
        return self._floors_at(k_len)

    def shares_group_columns(self, k_len: int) -> bool:
        """Whether a call over ``k_len`` keys gives each head its KV group's columns (``group_columns``
        below ``group_columns_below`` keys, or on every call when that is 0)."""
        self._require_key_thresholds()
        return self._shares_at(k_len)

    def for_call(self, q_len: int, k_len: int) -> VerticalSlashConfig:
        """The config one call of ``q_len`` queries over ``k_len`` keys runs.

        With ``thresholds_on="keys"`` the floors and column sharing stay as they are (they resolve
        from the key count later); with ``"queries"`` those that apply to ``q_len`` are fixed
        (``floor_from`` and ``group_columns_below`` 0, counting keys again). ``question_from`` is
        resolved either way: a call that reaches it estimates from ``2 * last_q`` queries sampled
        ``"mixed"`` (and keeps ``question_vertical``), any other from its own (``question_vertical``
        0). Resolving a resolved config returns it unchanged.
        """
        resolved = self._with_question_rows(q_len if self.thresholds_on == "queries" else k_len)
        if resolved.thresholds_on == "keys":
            return resolved
        min_vertical, min_slash = resolved._floors_at(q_len)
        return dataclasses.replace(resolved, min_vertical=min_vertical, min_slash=min_slash, min_slash_share=0.0,
                                   floor_from=0,
                                   group_columns=resolved._shares_at(q_len), group_columns_below=0,
                                   thresholds_on="keys")

    def ending_prompt(self, k_len: int) -> VerticalSlashConfig:
        """The config of a call that ends a prompt of ``k_len`` tokens (the last chunk of a chunked
        prefill): the question's queries join from ``question_from`` *tokens of the prompt*, whatever
        the call's own row count (a chunk of 8,192 rows never reaches a ``question_from`` of 16,384
        rows, though its last rows are the prompt's question). ``question_from`` resolved as
        :meth:`for_call` would on a call that reaches it; below it, or without it, unchanged."""
        if not self.question_from or k_len < self.question_from:
            return self
        return self._with_question_rows(self.question_from)

    def _with_question_rows(self, size: int) -> VerticalSlashConfig:
        """This config with ``question_from`` resolved for a call whose counted length is ``size``."""
        if not self.question_from:
            return self
        if size < self.question_from:
            return dataclasses.replace(self, question_from=0, question_vertical=0)
        return dataclasses.replace(self, last_q=2 * self.last_q, query_sampling="mixed", question_from=0)

    def _floors_at(self, size: int) -> tuple[int, int]:
        """The minimums of a call whose counted length (``thresholds_on``) is ``size``."""
        if size < self.floor_from:
            return 0, 0
        grown = min(self.num_slash, math.ceil(self.min_slash_share * size - 1e-9))  # 1e-9: exact products stay
        return self.min_vertical, max(self.min_slash, grown)

    def _shares_at(self, size: int) -> bool:
        """The column sharing of a call whose counted length (``thresholds_on``) is ``size``."""
        return self.group_columns and (self.group_columns_below == 0 or size < self.group_columns_below)

    def _require_key_thresholds(self) -> None:
        require(self.thresholds_on == "keys",
                "this config's thresholds count query rows (thresholds_on='queries'): resolve it for the call "
                "first with config.for_call(q_len, k_len)")


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


def estimation_positions(q_len: int, k_len: int, last_q: int, sampling: str,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """Absolute positions ``[L]`` (ascending, distinct) of the estimation queries, ``L = min(last_q, q_len)``.

    Built on ``device`` (default CPU) from sizes alone: no host-device copy, no synchronization.

    - ``"last"``: the last ``L`` positions (MInference).
    - ``"strided"``: ``L`` positions evenly spaced over the queries ``k_len - q_len .. k_len - 1``,
      the last position included (query ``i`` of ``L`` ends stride ``i``).
    - ``"mixed"``: the last ``ceil(L / 2)`` positions plus ``floor(L / 2)`` evenly spaced over the
      queries before them.
    """
    require(sampling in QUERY_SAMPLINGS, f"query sampling must be one of {QUERY_SAMPLINGS}, got {sampling!r}")
    require(1 <= q_len <= k_len and last_q >= 1, f"need 1 <= q_len ({q_len}) <= k_len ({k_len}), last_q >= 1")
    count = min(last_q, q_len)
    first = k_len - q_len
    tail = count if sampling == "last" else (0 if sampling == "strided" else count - count // 2)
    spread = count - tail
    span = q_len - tail  # the queries before the tail; span >= spread because count <= q_len
    steps = torch.arange(1, spread + 1, dtype=torch.float64, device=device)
    spaced = first + (steps * span / max(spread, 1)).floor().long() - 1
    return torch.cat([spaced, torch.arange(k_len - tail, k_len, device=device)])


@device_cached(maxsize=32)
def _kernel_positions(q_len: int, k_len: int, last_q: int, sampling: str,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, positions)`` int32 ``[L]`` of :func:`estimation_positions` on ``device``, as the
    estimate kernel takes them: built once per shape and shared (read-only) by every layer and call
    of that shape, which saves a dozen small launches per sparse call."""
    positions = estimation_positions(q_len, k_len, last_q, sampling, device=device)
    return (positions - (k_len - q_len)).int(), positions.int()


def call_estimation_positions(config: VerticalSlashConfig, q_len: int, k_len: int, device: torch.device | str,
                              ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """The estimation positions ``[L]`` of a call with ``config.repeat_rows``, or ``None`` when the call
    has no extra rows (the estimate samples the config's own rows then).

    ``ids``: ``[B, k_len]`` token ids of the sequence up to the call's last key (negative =
    unknown) or ``None`` (extra rows spread, no repeats). See
    :func:`longinfer.patterns.repeat_rows.estimation_rows`; no host synchronization.
    """
    config = config.for_call(q_len, k_len)
    base_rows = min(config.last_q, q_len)
    if extra_row_count(config.repeat_rows, q_len, base_rows) == 0:
        return None
    base = estimation_positions(q_len, k_len, config.last_q, config.query_sampling, device=device)
    return estimation_rows(base, ids, q_len, k_len, config.repeat_rows, ngram=config.repeat_ngram,
                           distance=config.repeat_distance)


def _grouped_queries(q: torch.Tensor, kv_heads: int, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (indices into ``q``'s positions) in float32, grouped per KV head: ``[B, Hkv, G * L, D]``."""
    bsz, hq, _, d = q.shape
    picked = q[:, :, rows].float()
    return picked.reshape(bsz, kv_heads, (hq // kv_heads) * rows.numel(), d)


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


def _scatter_diagonal_sums(probs: torch.Tensor, positions: torch.Tensor, start: int, k_len: int) -> torch.Tensor:
    """Diagonal sums of ``probs [M, L, C]`` for queries at any ``positions [L]`` against keys ``start ..``.

    Returns ``[M, k_len]``: entry ``s`` sums the cells whose key is ``position - s``; cells with a
    key after their query (negative offset) are dropped. Memory: one ``[L, C]`` int64 index.
    """
    m, rows, cols = probs.shape
    offsets = positions[:, None] - torch.arange(start, start + cols, device=probs.device)[None, :]  # [L, C]
    slots = torch.where(offsets >= 0, offsets, k_len).reshape(1, rows * cols).expand(m, -1)
    sums = torch.zeros(m, k_len + 1, dtype=probs.dtype, device=probs.device)
    return sums.scatter_add_(-1, slots, probs.reshape(m, rows * cols))[:, :k_len]


def estimate_backend(q: torch.Tensor, k: torch.Tensor) -> str:
    """The backend :func:`estimate_masses` uses for ``q``, ``k``: ``"triton"`` or ``"torch"``.

    The Triton kernel (:mod:`longinfer.patterns._estimate_kernel`) runs on CUDA tensors in
    float16 / bfloat16 / float32; everything else (CPU tensors, float64, mixed dtypes) takes the
    torch path. On the CPU the interpreter (``TRITON_INTERPRET=1``) can run the kernel too, but
    only when asked for (``backend="triton"``, as its tests do): it is far slower than the torch
    path there, and every other CPU test that estimates an index would pay for it.
    """
    return "triton" if triton_estimate_supported(q, k) else "torch"


def _checked_positions(positions: torch.Tensor, q_offset: int, k_len: int) -> torch.Tensor:
    """Validate caller-given estimation positions on the host: ``[L]`` int64, ascending, in ``[q_offset, k_len)``."""
    host = positions.detach().to("cpu", torch.long).flatten()
    require(host.numel() >= 1 and int(host[0]) >= q_offset and int(host[-1]) < k_len
            and bool((host[1:] > host[:-1]).all()),
            f"positions must be ascending query positions in [{q_offset}, {k_len})")
    return host


def estimate_masses(
    q: torch.Tensor,
    k: torch.Tensor,
    config: VerticalSlashConfig,
    *,
    sm_scale: float | None = None,
    positions: torch.Tensor | None = None,
    check_positions: bool = True,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimated attention mass per key column and per diagonal offset.

    Args:
        q: ``[B, Hq, Nq, D]``; ``min(last_q, Nq)`` rows are used, chosen by ``config.query_sampling``
            (:func:`estimation_positions`; ``question_from`` resolved for the call, see
            :meth:`VerticalSlashConfig.for_call`); each attends causally to the keys up to its position.
            With ``config.column_q`` the column mass comes from ``min(column_q, Nq)`` rows instead.
        k: ``[B, Hkv, Nk, D]``, ``Nk >= Nq`` (queries are the last ``Nq`` positions).
        config: supplies ``last_q``, ``column_q``, ``query_sampling``, ``sink`` and ``local``.
        positions: optional ``[L]`` ascending absolute query positions to use instead of the
            config's sampling (validated on the host: one synchronization if on the GPU); not with
            ``column_q``.
        check_positions: ``False`` skips that validation, for positions built by
            :func:`call_estimation_positions` (valid by construction; no synchronization on the
            Triton path).
        backend: ``"triton"``, ``"torch"`` or None (:func:`estimate_backend` chooses). Both compute
            the same masses; the torch path is the reference and the CPU path.

    Returns:
        ``(columns [B, Hq, Nk], diagonals [B, Hq, Nk])`` float32: mean over the estimation
        queries of their causal softmax probability per column (local band left out) and per
        diagonal offset (sink columns left out).

    Memory (``L``: the larger of the two query counts): torch path ``O(B * Hq * L * KEY_CHUNK)``
    floats plus the ``[B, Hq, Nk]`` outputs; never N x N. Two passes over the keys (log-sum-exp, then probabilities). Spread samplings add one
    ``[L, KEY_CHUNK]`` int64 index for the diagonal scatter. Triton path: the outputs plus
    ``O(B * Hq * L * Nk / 2048)`` floats (see :mod:`longinfer.patterns._estimate_kernel`).
    """
    shape = check_qk(q, k)
    config = config.for_call(shape.q_len, shape.k_len)
    scale = softmax_scale(sm_scale, shape.head_dim)
    backend = estimate_backend(q, k) if backend is None else backend
    check_estimate_backend(backend, q)
    require(positions is None or config.column_q == 0,
            "positions replace the config's estimation queries of both masses; leave column_q at 0 with them")
    columns, diagonals = _masses_by_backend(q, k, config, shape, scale, positions, backend, check_positions)
    if config.column_q:
        column_config = dataclasses.replace(config, last_q=config.column_q, column_q=0)
        columns, _ = _masses_by_backend(q, k, column_config, shape, scale, None, backend, diagonals=False)
    return mix_over_groups(columns, diagonals, shape.kv_heads, config.group_mix)


def _masses_by_backend(q: torch.Tensor, k: torch.Tensor, config: VerticalSlashConfig, shape: QKShape, scale: float,
                       positions: torch.Tensor | None, backend: str, check_positions: bool = True,
                       diagonals: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`estimate_masses` of ``config.last_q`` queries before ``group_mix``, on the chosen backend.
    Without ``diagonals`` the Triton path skips the diagonal mass (``None``); the torch path computes
    it anyway (it is the reference, not the fast path)."""
    nk = shape.k_len
    if positions is None and backend == "triton":
        rows, query_pos = _kernel_positions(shape.q_len, nk, config.last_q, config.query_sampling, q.device)
        return estimate_masses_triton(q, k, rows, query_pos, sink=config.sink, local=config.local, scale=scale,
                                      diagonals=diagonals)
    if positions is None:
        query_pos = estimation_positions(shape.q_len, nk, config.last_q, config.query_sampling, device=q.device)
    else:
        host_pos = _checked_positions(positions, shape.q_offset, nk) if check_positions else None
        query_pos = positions.to(device=q.device, dtype=torch.long).flatten()
    if backend == "triton":
        return estimate_masses_triton(q, k, query_pos - shape.q_offset, query_pos, sink=config.sink,
                                      local=config.local, scale=scale)
    if positions is None:  # the torch path also needs them on the host: rebuilt from the sizes, no copy back
        host_pos = query_pos if query_pos.device.type == "cpu" else estimation_positions(
            shape.q_len, nk, config.last_q, config.query_sampling)
    elif host_pos is None:
        host_pos = query_pos.cpu()
    return _estimate_masses_torch(q, k, config, scale, host_pos, query_pos)


def mix_over_groups(columns: torch.Tensor, diagonals: torch.Tensor, kv_heads: int,
                    weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend each query head's masses ``[B, Hq, Nk]`` with its KV group's mean: ``(1 - weight) *
    own + weight * mean over the group`` (heads ``g * G .. g * G + G - 1`` form group ``g``).

    ``weight = 0`` returns the inputs unchanged. The masses stay on the same scale (a convex
    combination of the group's estimates; the group's total is kept), so a coverage target keeps
    its meaning; an item that one head of the group estimates high gets ``weight / G`` of that
    mass in the others. Memory: two ``[B, Hq, Nk]`` outputs.
    """
    if weight == 0.0:
        return columns, diagonals

    def mixed(masses: torch.Tensor) -> torch.Tensor:
        bsz, q_heads, n = masses.shape
        grouped = masses.reshape(bsz, kv_heads, q_heads // kv_heads, n)
        return torch.lerp(grouped, grouped.mean(dim=2, keepdim=True), weight).reshape(bsz, q_heads, n)

    return mixed(columns), mixed(diagonals)


def _estimate_masses_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    config: VerticalSlashConfig,
    scale: float,
    host_pos: torch.Tensor,
    query_pos: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch path of :func:`estimate_masses` (the reference): ``host_pos`` / ``query_pos`` are the
    ``[L]`` estimation positions on the host and on ``q``'s device."""
    shape = check_qk(q, k)
    group = shape.group_size
    nk = shape.k_len
    last = query_pos.numel()
    q_est = _grouped_queries(q, shape.kv_heads, query_pos - shape.q_offset)  # [B, Hkv, G*L, D]
    positions = query_pos.repeat(group)  # [G*L]
    contiguous = int(host_pos[-1]) == nk - 1 and int(host_pos[0]) == nk - last
    chunks = [(start, min(start + KEY_CHUNK, nk)) for start in range(0, nk, KEY_CHUNK)]
    lse = torch.full(q_est.shape[:-1], -math.inf, device=q.device)
    for start, stop in chunks:
        lse = torch.logaddexp(lse, torch.logsumexp(_chunk_scores(q_est, k, start, stop, positions, scale), -1))
    columns = torch.zeros(shape.batch, shape.kv_heads, group, nk, device=q.device)
    diagonals = torch.zeros_like(columns)
    first_pos = int(host_pos[0])
    for start, stop in chunks:
        probs = torch.exp(_chunk_scores(q_est, k, start, stop, positions, scale) - lse[..., None])
        probs = probs.reshape(shape.batch, shape.kv_heads, group, last, stop - start)
        if stop > first_pos - config.local + 1:  # the chunk reaches the local band of some query
            offsets = query_pos[:, None] - torch.arange(start, stop, device=q.device)[None, :]  # [L, C]
            in_band = (offsets >= 0) & (offsets < config.local)
            columns[..., start:stop] = probs.masked_fill(in_band, 0.0).sum(-2)
        else:
            columns[..., start:stop] = probs.sum(-2)
        if start < config.sink:
            probs[..., : config.sink - start] = 0.0
        if not contiguous:
            sums = _scatter_diagonal_sums(probs.reshape(-1, last, stop - start), query_pos, start, nk)
            diagonals += sums.reshape(columns.shape)
            continue
        # Cell (i, c) has offset s = (nk - last + i) - (start + c); x = L - 1 + c - i indexes the sums.
        sums = _diagonal_sums(probs.reshape(-1, last, stop - start)).flip(-1)  # now s ascending
        s_low = nk - last - stop + 1  # offset of the flipped first entry
        lo = max(s_low, 0)
        diagonals[..., lo: nk - start] += sums.reshape(*columns.shape[:3], -1)[..., lo - s_low:]
    flat = (shape.batch, shape.q_heads, nk)
    return columns.reshape(flat) / last, diagonals.reshape(flat) / last


class ChosenItems(NamedTuple):
    """A selection as short candidate lists per head (what the budget needs, not ``[.., Nk]`` masks).

    Attributes:
        vertical: ``[B, H, Cv]`` int64 candidate key positions, ascending.
        vertical_taken: ``[B, H, Cv]`` bool, which candidates the budget takes.
        slash: ``[B, H, Cs]`` int64 candidate diagonal offsets, ascending.
        slash_taken: ``[B, H, Cs]`` bool.

    ``Cv = min(num_vertical, Nk)`` and ``Cs = min(num_slash, Nk)``: every item a budget can take
    is among the top ``num_vertical`` columns / ``num_slash`` diagonals of its kind.
    """

    vertical: torch.Tensor
    vertical_taken: torch.Tensor
    slash: torch.Tensor
    slash_taken: torch.Tensor


def _top_positions(score: torch.Tensor, count: int) -> torch.Tensor:
    """Positions ``[..., count]`` (ascending) of the ``count`` largest ``score [..., N]``, ``count <= N``.

    ``score`` must be non-negative (``+inf`` allowed): masses and forced items. Ties at the
    boundary go to the lower positions, as in a stable descending sort: one ``topk`` over unique
    int64 keys (the float's bits, whose order is the value order for non-negative floats, above
    the reversed position), then a sort of the ``count`` winners. No scan over ``N`` (a cumulative
    sum over a long row runs on one GPU block per row: ~0.1 ms at 64K keys).
    """
    n = score.shape[-1]
    if count >= n:
        return torch.arange(n, device=score.device).expand(*score.shape[:-1], n)
    if count == 0:
        return torch.empty(*score.shape[:-1], 0, dtype=torch.long, device=score.device)
    bits = (score.float() + 0.0).contiguous().view(torch.int32).long()  # + 0.0 turns -0.0 into +0.0
    key = (bits << 32) | (n - 1 - torch.arange(n, device=score.device))
    return key.topk(count, dim=-1, sorted=False).indices.sort(-1).values


def _pack_taken(items: torch.Tensor, taken: torch.Tensor, width: int) -> torch.Tensor:
    """Taken ``items [..., C]`` (ascending) -> ``[..., width]`` int64, taken first in order, ``-1`` after."""
    slot = taken.long().cumsum(-1) - 1
    out = torch.full((*items.shape[:-1], width + 1), -1, dtype=torch.long, device=items.device)
    return out.scatter_(-1, torch.where(taken, slot, width), items)[..., :width]


def _items_to_masks(items: ChosenItems, k_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``(columns, diagonals)`` ``[B, H, k_len]`` of the taken items."""
    def scatter(positions: torch.Tensor, taken: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(*positions.shape[:-1], k_len, dtype=torch.bool, device=positions.device)
        return mask.scatter_(-1, positions, taken)
    return scatter(items.vertical, items.vertical_taken), scatter(items.slash, items.slash_taken)


def _rank_scores(columns: torch.Tensor, diagonals: torch.Tensor,
                 config: VerticalSlashConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The masses ``[B, H, Nk]`` as the mass ranking orders them: the forced items (the first
    ``sink`` columns, the ``local`` nearest diagonals) at ``+inf``, so they come first."""
    pos = torch.arange(columns.shape[-1], device=columns.device)
    return (torch.where(pos < config.sink, math.inf, columns), torch.where(pos < config.local, math.inf, diagonals))


def select_items(columns: torch.Tensor, diagonals: torch.Tensor, config: VerticalSlashConfig) -> ChosenItems:
    """Apply a fixed or mass-ranked coverage budget to estimated masses ``[B, H, Nk]``.

    Fixed: the top ``num_vertical`` columns / ``num_slash`` diagonals, forced ones (the first
    ``sink`` columns, the ``local`` diagonals) ranked first. Coverage (``rank="mass"``): the same
    top lists are the only candidates (a kind's cap never lets more in), merged by mass in the
    order a stable sort of all ``2 Nk`` items gives, and taken while the mass before reaches
    ``tau`` (forced items and each kind's first ``min_vertical`` / ``min_slash`` regardless).

    Work: two ``topk`` over ``Nk`` and one sort of ``Cv + Cs`` candidates per head; no host
    synchronization. Memory: a few ``[B, H, Nk]`` and ``[B, H, Cv + Cs]`` tensors.
    """
    require(config.rank == "mass", "select_items applies the mass ranking; rank='cost' goes through choose()")
    nk = columns.shape[-1]
    rank_cols, rank_diags = _rank_scores(columns, diagonals, config)
    vertical = _top_positions(rank_cols, min(config.num_vertical, nk))
    slash = _top_positions(rank_diags, min(config.num_slash, nk))
    if config.budget == "fixed":
        all_taken = torch.ones_like(vertical, dtype=torch.bool), torch.ones_like(slash, dtype=torch.bool)
        return ChosenItems(vertical, all_taken[0], slash, all_taken[1])
    count_v = vertical.shape[-1]
    rank = torch.cat([rank_cols.gather(-1, vertical), rank_diags.gather(-1, slash)], -1)
    mass = torch.cat([columns.gather(-1, vertical), diagonals.gather(-1, slash)], -1)
    # Candidates in concatenation order on ties (stable); forced items rank +inf, so they come first.
    sorted_rank, order = rank.sort(dim=-1, descending=True, stable=True)
    sorted_mass = mass.gather(-1, order).double()  # float64 sums: the Triton path sums in another order
    take = (sorted_mass.cumsum(-1) - sorted_mass < config.tau) | (sorted_rank == math.inf)
    floors = config.floors(nk)
    lows = (min(floors[0], config.num_vertical), min(floors[1], config.num_slash))
    if any(lows):  # each kind's first min_vertical / min_slash regardless of mass
        sorted_is_col = (torch.arange(rank.shape[-1], device=rank.device) < count_v)[order]
        for kind, low in ((sorted_is_col, lows[0]), (~sorted_is_col, lows[1])):
            take |= kind & (kind.long().cumsum(-1) <= low)
    taken = torch.zeros_like(take).scatter_(-1, order, take)
    return ChosenItems(vertical, taken[..., :count_v], slash, taken[..., count_v:])


def _triton_selection_supported(config: VerticalSlashConfig) -> bool:
    """The budgets the Triton selection implements: ``rank="mass"`` (per-kind minimums added after it)."""
    return config.rank == "mass"


def _add_floors(columns: torch.Tensor, diagonals: torch.Tensor, vertical: torch.Tensor, slash: torch.Tensor,
                config: VerticalSlashConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The coverage index without minimums -> with each kind's first ``min_vertical`` / ``min_slash``.

    In :func:`select_items` an item is taken when the mass before it is below ``tau`` or it is among
    its kind's first ``min_*`` in the ranking (rank descending, position ascending on ties: forced
    ones first); neither rule changes the other's items (the mass before counts every candidate,
    taken or not), and both lie within the kind's top ``num_*`` candidates. So the index with
    minimums is the union of the index without them and each kind's top ``min_*`` positions
    (:func:`_top_positions`, the same ties), which stays within the caps. Two ``topk`` and two
    key bitmaps; no host synchronization.
    """
    nk = columns.shape[-1]
    rank_cols, rank_diags = _rank_scores(columns, diagonals, config)

    def with_floor(index: torch.Tensor, rank: torch.Tensor, floor: int, width: int) -> torch.Tensor:
        if floor == 0:
            return index
        return union_of_packed([index, _top_positions(rank, min(floor, nk))], nk, width)

    min_vertical, min_slash = config.floors(nk)
    return (with_floor(vertical, rank_cols, min_vertical, config.num_vertical),
            with_floor(slash, rank_diags, min_slash, config.num_slash))


def auto_selection_backend(columns: torch.Tensor, config: VerticalSlashConfig) -> str:
    """The backend ``select_packed(..., backend="auto")`` uses: ``"triton"`` for CUDA masses under a
    coverage budget the Triton path implements, on rows long enough for its parallel path (at least
    ``2 * MIN_SLICE`` keys); ``"torch"`` otherwise (the fixed budget and short rows would run one
    Triton program per row, slower than torch)."""
    parallel = config.budget == "coverage" and columns.shape[-1] >= 2 * MIN_SLICE
    return "triton" if columns.is_cuda and parallel and _triton_selection_supported(config) else "torch"


def select_packed(columns: torch.Tensor, diagonals: torch.Tensor, config: VerticalSlashConfig, *,
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`select_items` packed as the kernels take it: ``(vertical [B, H, V], slash [B, H, S])``
    int64, taken positions ascending, ``-1`` after (``V = num_vertical``, ``S = num_slash``).

    ``backend``: ``"torch"``, ``"triton"`` (:mod:`longinfer.patterns._select_kernel`; on the CPU only
    in the interpreter) or ``"auto"`` (the default: :func:`auto_selection_backend`). Same index; see
    the kernel module for the rounding-level differences. On the Triton path per-kind minimums
    (``min_vertical`` / ``min_slash``) are added to the kernel's index afterwards (:func:`_add_floors`).
    On an H200 at a 4K-query turn over 64K keys the Triton path takes 0.19 ms per 12-head layer
    against torch's 0.61 ms where no cap binds, 0.41-0.45 ms where one does (``benchmarks/turn_kernels.py``,
    session 22). Memory: the outputs plus, on the torch path, a few ``[B, H, Nk]`` tensors. No host
    synchronization.
    """
    require(backend in ("auto", "triton", "torch"), f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        backend = auto_selection_backend(columns, config)
    if backend == "torch":
        items = select_items(columns, diagonals, config)
        return (_pack_taken(items.vertical, items.vertical_taken, config.num_vertical),
                _pack_taken(items.slash, items.slash_taken, config.num_slash))
    require(_triton_selection_supported(config),
            "the Triton budget implements rank='mass' (not rank='cost'); use backend='torch'")
    require(columns.is_cuda or interpreter_enabled(),
            "backend='triton' needs CUDA tensors or TRITON_INTERPRET=1; use backend='torch' on the CPU")
    coverage = config.budget == "coverage"
    vertical, slash = select_packed_triton(columns.float(), diagonals.float(), num_vertical=config.num_vertical,
                                           num_slash=config.num_slash, sink=config.sink, local=config.local,
                                           coverage=coverage, tau=config.tau)
    if coverage and any(config.floors(columns.shape[-1])):
        vertical, slash = _add_floors(columns.float(), diagonals.float(), vertical, slash, config)
    return vertical, slash


def select_packed_over_groups(columns: torch.Tensor, diagonals: torch.Tensor, config: VerticalSlashConfig,
                              kv_heads: int, *, per_kv_group: bool = False,
                              backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`select_packed` per query head, then the KV-group unions the config asks for.

    ``columns`` / ``diagonals`` ``[B, Hq, Nk]``. With ``per_kv_group`` both lists become their
    group's union (``[B, Hkv, G * V]``, ``[B, Hkv, G * S]``); where ``config.shares_group_columns``
    each head gets its group's union of columns (``[B, Hq, G * V]``) and keeps its own diagonals. Memory and
    synchronization as :func:`select_packed` plus the unions' ``[B, Hkv, Nk]`` bitmaps
    (:func:`longinfer.patterns._common.union_packed_over_groups`; on CUDA its Triton form,
    :func:`longinfer.patterns._union_kernel.union_packed_over_groups_triton`, with int8 bitmaps).
    """
    vertical, slash = select_packed(columns, diagonals, config, backend=backend)
    group, length = columns.shape[1] // kv_heads, columns.shape[-1]
    # The Triton union on CUDA (three launches instead of about ten) and wherever the Triton selection was asked for.
    union = union_packed_over_groups_triton if columns.is_cuda or backend == "triton" else union_packed_over_groups
    if per_kv_group:
        return union(vertical, kv_heads, length), union(slash, kv_heads, length)
    if config.shares_group_columns(length) and group > 1:
        vertical = union(vertical, kv_heads, length, repeat=True)
    return vertical, slash


def tile_smoothed_mass(diagonals: torch.Tensor, block_size: int, local: int) -> torch.Tensor:
    """Expected mass one slash keeps under the kernel's tile coverage: ``[..., Nk] -> [..., Nk]`` float32.

    The kernel covers slash ``s`` for the whole query tile, so row ``i`` (``r = i mod block_size``)
    gets offsets ``s + r - block_size + 1 .. s + r``: offset ``o`` is kept for a share
    ``(block_size - |o - s|) / block_size`` of the rows (a triangle). Mass the forced local band
    (offsets ``< local``, reaching ``local - 1 + r``) already keeps is left out first. Two prefix
    sums in float64: O(Nk) per head.
    """
    bs = block_size
    n = diagonals.shape[-1]
    offsets = torch.arange(n, device=diagonals.device, dtype=torch.float64)
    residual = ((offsets - local + 1) / bs).clamp(0.0, 1.0) if local > 0 else torch.ones_like(offsets)
    padded = torch.nn.functional.pad(diagonals.double() * residual, (bs - 1, bs - 1))  # [..., N + 2bs - 2]
    zero = torch.zeros(*padded.shape[:-1], 1, dtype=torch.float64, device=padded.device)
    prefix = torch.cat([zero, padded.cumsum(-1)], -1)
    forward_box = prefix[..., bs:] - prefix[..., :-bs]  # [..., N + bs - 1]: sums of bs entries
    prefix = torch.cat([zero, forward_box.cumsum(-1)], -1)
    return ((prefix[..., bs: bs + n] - prefix[..., :n]) / bs).float()


def slash_candidates(smoothed: torch.Tensor, block_size: int, local: int) -> torch.Tensor:
    """Offsets worth a slash under the cost ranking: bool ``[..., Nk]``, at most one per tile of offsets.

    Each bin of ``block_size`` offsets proposes its best offset (largest ``smoothed``, the first on
    ties, offsets ``< local`` left to the forced band): a narrow strong diagonal proposes its own
    offset, a wide band decreasing with the offset proposes the bin starts, whose slashes tile it.
    Where the proposals of two neighbouring bins lie closer than ``block_size`` (their coverages
    would overlap), the weaker is dropped, so the kept candidates cover disjoint keys in every row
    and their smoothed masses add up. Bins proposing no mass propose nothing. O(Nk) per head.
    """
    n = smoothed.shape[-1]
    bins = -(-n // block_size)
    offsets = torch.arange(n, device=smoothed.device)
    key = smoothed.masked_fill(offsets < local, -1.0)
    key = torch.nn.functional.pad(key, (0, bins * block_size - n), value=-1.0).unflatten(-1, (bins, block_size))
    best = key.argmax(-1, keepdim=True)  # first maximum of each bin
    value = key.gather(-1, best).squeeze(-1)  # [..., bins]
    position = best.squeeze(-1) + torch.arange(bins, device=smoothed.device) * block_size
    close = (position[..., 1:] - position[..., :-1]) < block_size  # neighbour bins i, i + 1
    weaker_right = close & (value[..., 1:] <= value[..., :-1])
    weaker_left = close & (value[..., :-1] < value[..., 1:])
    keep = value > 0
    keep[..., 1:] &= ~weaker_right
    keep[..., :-1] &= ~weaker_left
    chosen = torch.zeros(*smoothed.shape[:-1], bins * block_size + 1, dtype=torch.bool, device=smoothed.device)
    chosen.scatter_(-1, torch.where(keep, position, bins * block_size), True)
    return chosen[..., :n]


def pair_costs(k_len: int, q_len: int, config: VerticalSlashConfig,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Kernel work of each item as a share of all causal (query, key) pairs.

    Returns ``(column_cost [Nk], slash_cost [Nk], forced_cost)`` float64: column ``j`` is read by
    every query at or after ``j``; slash ``s`` reads one tile of ``block_size`` keys for every query
    at or after ``s``; the forced sink columns and local band (whose tile coverage reaches
    ``(block_size - 1) / 2`` offsets further on average) are always paid. Overlaps are ignored.
    """
    first = k_len - q_len
    positions = torch.arange(k_len, device=device, dtype=torch.float64)
    rows_from = k_len - positions.clamp(min=first)  # queries at or after each position
    total = q_len * (first + 1) + q_len * (q_len - 1) / 2  # sum of (p + 1) over the queries
    forced = float(rows_from[: config.sink].sum() + rows_from[: config.local].sum())
    if 0 < config.local < k_len:
        forced += (config.block_size - 1) / 2 * float(rows_from[config.local])
    return rows_from / total, rows_from * config.block_size / total, forced / total


def _cost_ranked_choice(
    columns: torch.Tensor,
    diagonals: torch.Tensor,
    config: VerticalSlashConfig,
    q_len: int,
    second: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coverage budget ranked by estimated mass per unit of kernel work (``rank="cost"``).

    Columns score their mass, slashes their tile-smoothed mass (:func:`tile_smoothed_mass`) over
    :func:`slash_candidates`; each score is divided by the item's :func:`pair_costs` work. Walking
    that ranking after the forced items, an item is taken while the mass taken before it is below
    ``tau``, the work taken including it stays within ``max_density``, and its kind's cap allows;
    the first ``min_vertical`` / ``min_slash`` of each kind (forced ones count) are taken regardless.

    Args: ``columns``, ``diagonals`` ``[B, H, Nk]`` from :func:`estimate_masses`; ``q_len`` the
    number of query positions; ``second``: the masses of a second, disjoint query sample of the
    same size (``split_halves``): items then score the smaller of their two masses, the forced
    items the mean. Returns chosen ``(columns, diagonals)`` bool ``[B, H, Nk]``.
    Memory: a few ``[B, H, 2 * Nk]`` tensors (one sort).
    """
    nk = columns.shape[-1]
    device = columns.device
    pos = torch.arange(nk, device=device)
    forced_cols, forced_diags = pos < config.sink, pos < config.local
    smoothed = tile_smoothed_mass(diagonals, config.block_size, config.local)
    item_columns = columns
    if second is not None:
        smoothed_second = tile_smoothed_mass(second[1], config.block_size, config.local)
        candidate = slash_candidates(smoothed + smoothed_second, config.block_size, config.local)
        smoothed = torch.minimum(smoothed, smoothed_second)
        item_columns = torch.minimum(columns, second[0])
        columns, diagonals = (columns + second[0]) / 2, (diagonals + second[1]) / 2
    else:
        candidate = slash_candidates(smoothed, config.block_size, config.local)
    column_cost, slash_cost, forced_cost = pair_costs(nk, q_len, config, device)
    mass = torch.cat([item_columns, smoothed], -1).double()
    cost = torch.cat([column_cost, slash_cost])
    valid = torch.cat([(~forced_cols & (column_cost > 0)).expand_as(columns), candidate & (slash_cost > 0)], -1)
    ratio = torch.where(valid, mass / cost.clamp(min=1e-30), torch.full_like(mass, -math.inf))
    order = ratio.argsort(dim=-1, descending=True, stable=True)
    sorted_valid = valid.gather(-1, order)
    is_col = pos.new_ones(2 * nk, dtype=torch.bool)
    is_col[nk:] = False
    allowed = torch.zeros_like(sorted_valid)
    at_least = torch.zeros_like(sorted_valid)
    floors = config.floors(nk)
    kinds = ((is_col, config.sink, floors[0], config.num_vertical),
             (~is_col, config.local, floors[1], config.num_slash))
    for kind, forced_count, low, high in kinds:  # two item kinds, not heads
        forced_count = min(forced_count, nk)
        kind_sorted = kind.expand_as(mass).gather(-1, order) & sorted_valid
        rank_in_kind = kind_sorted.long().cumsum(-1)  # 1-based among the kind's candidates
        allowed |= kind_sorted & (rank_in_kind <= high - forced_count)
        at_least |= kind_sorted & (rank_in_kind <= min(low, high) - forced_count)
    sorted_mass = mass.gather(-1, order) * allowed
    sorted_cost = cost.expand_as(mass).gather(-1, order) * allowed
    forced_mass = ((columns * forced_cols).sum(-1, keepdim=True) + (diagonals * forced_diags).sum(-1, keepdim=True)).double()
    mass_before = forced_mass + sorted_mass.cumsum(-1) - sorted_mass
    work_with = forced_cost + sorted_cost.cumsum(-1)
    worth = ratio.gather(-1, order) >= config.min_gain
    take = allowed & (((mass_before < config.tau) & (work_with <= config.max_density) & worth) | at_least)
    chosen = torch.zeros_like(take).scatter(-1, order, take)
    return chosen[..., :nk] | forced_cols, chosen[..., nk:] | forced_diags


def choose(
    columns: torch.Tensor,
    diagonals: torch.Tensor,
    config: VerticalSlashConfig,
    *,
    q_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the budget to estimated masses ``[B, H, Nk]`` -> chosen ``(columns, diagonals)`` bool ``[B, H, Nk]``.

    ``q_len`` (default ``Nk``): the number of query positions; it sets the work per item that
    ``rank="cost"`` divides by.
    """
    nk = columns.shape[-1]
    if config.rank == "cost":
        return _cost_ranked_choice(columns, diagonals, config, nk if q_len is None else q_len)
    return _items_to_masks(select_items(columns, diagonals, config), nk)


def _chosen_items(
    q: torch.Tensor,
    k: torch.Tensor,
    config: VerticalSlashConfig,
    sm_scale: float | None,
    positions: torch.Tensor | None = None,
    check_positions: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimate and apply the budget: chosen ``(columns, diagonals)`` bool ``[B, Hq, Nk]``.

    With ``split_halves`` the estimation queries are split into their even and odd halves,
    each estimated on its own (the same work as one estimate of all of them); ``positions`` (see
    :func:`estimate_vertical_slash`) only without it.
    """
    if not config.split_halves:
        columns, diagonals = estimate_masses(q, k, config, sm_scale=sm_scale, positions=positions,
                                             check_positions=check_positions)
        return choose(columns, diagonals, config, q_len=q.shape[2])
    positions = estimation_positions(q.shape[2], k.shape[2], config.last_q, config.query_sampling)
    first = estimate_masses(q, k, config, sm_scale=sm_scale, positions=positions[0::2])
    second = first if positions.numel() == 1 else estimate_masses(q, k, config, sm_scale=sm_scale,
                                                                  positions=positions[1::2])
    return _cost_ranked_choice(*first, config, q.shape[2], second)


def question_columns(q: torch.Tensor, k: torch.Tensor, config: VerticalSlashConfig, *,
                     sm_scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """The ``config.question_vertical`` key columns each head's question queries attend to most.

    The question's queries are the last ``ceil(L / 2)`` of the call's ``L = min(last_q, Nq)``
    estimation queries of the config resolved for the call (:meth:`VerticalSlashConfig.for_call`; its
    ``"mixed"`` sampling puts them last). ``q`` ``[B, Hq, Nq, D]``, ``k`` ``[B, Hkv, Nk, D]``.

    Returns:
        ``[B, Hq, min(question_vertical, Nk)]`` int64 positions, ascending: the largest column masses
        of those queries alone (local band left out, as in :func:`estimate_masses`; ties to the lower
        position). ``question_vertical`` is the resolved one: 0 on a call below ``question_from``.

    Memory: one column-mass pass of those queries (:func:`estimate_masses`, no diagonal mass on the
    Triton path) and its ``[B, Hq, Nk]`` output.
    """
    shape = check_qk(q, k)
    config = config.for_call(shape.q_len, shape.k_len)
    count = min(config.last_q, shape.q_len)
    last = dataclasses.replace(config, last_q=count - count // 2, query_sampling="last", question_from=0,
                               question_vertical=0, column_q=0)
    backend = estimate_backend(q, k) if backend is None else backend
    columns, _ = _masses_by_backend(q, k, last, shape, softmax_scale(sm_scale, shape.head_dim), None, backend,
                                    diagonals=False)
    return _top_positions(columns, min(config.question_vertical, shape.k_len))


def _with_question_columns(vertical: torch.Tensor, question: torch.Tensor, k_len: int) -> torch.Tensor:
    """Packed columns ``[B, H, V]`` and each query head's question columns ``[B, Hq, Qv]`` -> their union
    ``[B, H, V + G * Qv]`` (``G = Hq // H``: with one index per KV group, the group's heads' together)."""
    grouped = question.reshape(*vertical.shape[:2], -1)
    return union_of_packed([vertical, grouped], k_len, min(vertical.shape[-1] + grouped.shape[-1], k_len))


def estimate_vertical_slash(
    q: torch.Tensor,
    k: torch.Tensor,
    config: VerticalSlashConfig,
    *,
    sm_scale: float | None = None,
    per_kv_group: bool = False,
    positions: torch.Tensor | None = None,
    check_positions: bool = True,
) -> VerticalSlashSelection:
    """Estimate the vertical-slash index of every head at once.

    Args:
        q: ``[B, Hq, Nq, D]`` queries (the last ``Nq`` of ``Nk`` positions).
        k: ``[B, Hkv, Nk, D]`` keys, ``Nk >= Nq``.
        config: a :class:`VerticalSlashConfig`.
        sm_scale: softmax scale, default ``1/sqrt(D)``.
        per_kv_group: return one index per KV group (``H = Hkv``), the union of its query heads'
            selections; widths become ``G * num_vertical`` and ``G * num_slash`` (``G = Hq // Hkv``).
        positions: ``[L]`` ascending absolute estimation positions instead of the config's own
            (:func:`call_estimation_positions`, which a patched model calls with the token ids so
            that ``repeat_rows`` finds the repeats); validated on the host unless
            ``check_positions=False``. Not with ``segments > 1`` or ``split_halves``.

    Returns:
        A :class:`VerticalSlashSelection` with ``vertical [B, H, V]`` / ``slash [B, H, S]`` int64,
        ``-1``-padded (see the module docstring); with ``config.segments > 1`` a
        :class:`SegmentedVerticalSlashSelection` (see :func:`estimate_segmented`).

    Memory: as :func:`estimate_masses` plus a few ``[B, Hq, Nk]`` tensors (:func:`select_items`).
    No host synchronization on the GPU (``rank="mass"``).
    """
    if not isinstance(config, VerticalSlashConfig):
        raise TypeError(f"config must be a VerticalSlashConfig, got {type(config).__name__}")
    if config.segments > 1:
        require(positions is None, "positions give one estimate's rows; segments > 1 estimate each segment on its own")
        return estimate_segmented(q, k, config, sm_scale=sm_scale, per_kv_group=per_kv_group)
    config = config.for_call(q.shape[2], k.shape[2])
    group = q.shape[1] // k.shape[1]
    require(positions is None or not config.split_halves,
            "positions give one estimate's rows; split_halves splits the config's own rows in two")
    if positions is None:
        positions = call_estimation_positions(config, q.shape[2], k.shape[2], q.device)
        check_positions = False
    if config.rank == "mass":  # straight from the candidate lists: no [B, H, Nk] masks
        masses = estimate_masses(q, k, config, sm_scale=sm_scale, positions=positions, check_positions=check_positions)
        vertical, slash = select_packed_over_groups(*masses, config, k.shape[1], per_kv_group=per_kv_group)
        if config.question_vertical:
            vertical = _with_question_columns(vertical, question_columns(q, k, config, sm_scale=sm_scale), k.shape[2])
        return VerticalSlashSelection(vertical=vertical, slash=slash, k_len=k.shape[2], block_size=config.block_size)
    chosen_cols, chosen_diags = _chosen_items(q, k, config, sm_scale, positions, check_positions)
    widths = (config.num_vertical, config.num_slash)
    if per_kv_group:
        chosen_cols = union_over_groups(chosen_cols, k.shape[1])
        chosen_diags = union_over_groups(chosen_diags, k.shape[1])
        widths = (group * config.num_vertical, group * config.num_slash)
    elif config.shares_group_columns(k.shape[2]) and group > 1:
        chosen_cols = union_over_groups(chosen_cols, k.shape[1]).repeat_interleave(group, dim=1)
        widths = (group * config.num_vertical, config.num_slash)
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
