"""How dense must *any* key index be to meet a recall target, when rows and heads may spend unevenly?

Issue 3's recall target (mean head recall >= 0.95 and 10th-percentile head >= 0.90 at <= 10% average
density; Qwen2.5-Coder-0.5B, 32K tokens of PG essays) and issue 6's (0.92 / 0.80 at <= 5%) compare with
an oracle that keeps the same share of keys for every row of every head: there the p10 is 0.885 at
10% (`docs/results/recall-cpu-qwen0.5b-32k-lines/`), below issue 3's target. An index need not spend
evenly: a row whose attention sits on few keys needs fewer of them, and a diffuse head more. This
measures, for sampled query rows of every head, the key-level oracle's recall at a grid of densities
(:func:`longinfer.patterns.oracle.oracle_recall`: each row's best ``ceil(d * (row + 1))`` keys), then
allocates a budget over the (row, grid point) choices:

- **uniform**: every row of every head at one grid density (the frontier reports' oracle);
- **rows**: every head at one density, its rows spending it unevenly (a price per head);
- **global**: one price ``lam`` per kept key for every row of every head; each row takes the grid point
  that maximizes ``recall / R - lam * kept / C`` (``C``: the rows' causal keys). On the grid this is
  the highest mean head recall any allocation reaches at its average density (the exchange argument:
  every row spends until its marginal recall per key falls to the common price);
- **target**: the cheapest allocation found that meets a (mean, p10) pair: the heads that are cheapest
  to bring to the p10 value get at least that (each its own price), all but the
  ``floor(0.1 * (H - 1))`` dearest (the p10 as numpy interpolates it stays >= the value), then one
  global price on top, lowered until the mean is met. Its density bounds the minimum from above; the
  larger of the global allocation's density at the mean and the lifted heads' cost alone bounds it
  from below.

``--tile T`` (T > 1) measures the same for an index one step closer to a kernel: the rows of a query tile
(``T`` rows aligned to multiples of ``T``, as a tiled kernel walks them) share one key set, the tile's best
keys by attention summed over its rows (:func:`measure_tiles`); each sampled row stands for its tile. Per-row
selection is what no tiled kernel computes; per-tile key sets are what an index whose budget varies per
query block could reach at most.

Rows and densities as in the frontier tool (``sample_rows``, seed 0), so the uniform rows reproduce its
oracle. Results: ``budget_oracle.jsonl`` (one record per layer with every row's recall and kept keys at
each grid density; rerun to resume), ``budget_oracle.md``, ``budget_oracle.json`` (the allocations) and ``budget_oracle_heads.csv`` (per head).

    python benchmarks/budget_oracle.py --model qwen2.5-coder-0.5b --length 32768 --rows 128 --device cpu \\
        --out docs/results/budget-oracle-cpu-qwen0.5b-32k

Memory: one layer's q/k at a time, the oracle's running top ``max(grid) * N`` scores per row chunk;
no N x N matrix.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch

from longinfer.eval import recall as frontier
from longinfer.eval.capture import capture_qk
from longinfer.eval.report import markdown_table
from longinfer.eval.results import ResultStore, environment_info
from longinfer.patterns.oracle import oracle_counts, oracle_recall
from longinfer.patterns.recall import causal_logsumexp, sample_rows

logger = logging.getLogger("budget_oracle")
RESULTS = "budget_oracle.jsonl"
GRID = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5)
TARGETS = ((0.95, 0.90, 0.10), (0.92, 0.80, 0.05))  # (mean, p10, density): issue 3's and issue 6's
_BISECTIONS = 60


# ---------------------------------------------------------------------------------------------
# Allocation (pure functions over the measured curves)


def with_all_keys(recall: torch.Tensor, kept: torch.Tensor, causal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The curves ``recall, kept [H, R, G]`` with one more grid point: every causal key (recall 1)."""
    full_kept = causal.to(kept.dtype).expand(*kept.shape[:-1])[..., None]
    return torch.cat([recall, torch.ones_like(recall[..., :1])], -1), torch.cat([kept, full_kept], -1)


def allocate(recall: torch.Tensor, kept: torch.Tensor, causal: torch.Tensor, price: torch.Tensor,
             score: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's best grid point at a price per key; returns ``(head_recall [H], head_density [H])``.

    Args:
        recall, kept: ``[H, R, G]``: each row's oracle recall and kept keys at each grid point.
        causal: ``[R]`` causal keys of each row.
        price: ``[H]`` or a scalar: recall given up per unit of density (kept keys over the rows'
            causal keys, ``C``); a row takes ``argmax_g score / R - price * kept / C``.
        score: ``[H, R, G]`` what the choice sees in place of ``recall`` (an online estimate of it, e.g.
            the estimated attention mass of the kept keys); ``None``: the true recall (an oracle choice).
    """
    rows, total = recall.shape[1], float(causal.sum())
    price = torch.as_tensor(price, dtype=recall.dtype).reshape(-1, 1, 1)
    seen = recall if score is None else score
    choice = (seen / rows - price * kept.to(recall.dtype) / total).argmax(-1, keepdim=True)
    head_recall = recall.gather(-1, choice)[..., 0].mean(-1)
    head_density = kept.gather(-1, choice)[..., 0].to(torch.float64).sum(-1) / total
    return head_recall, head_density.to(recall.dtype)


def _boundary_prices(holds: Any, *, holds_when_low: bool, low: float = 1e-9, high: float = 1e6
                     ) -> tuple[float, float | None]:
    """``(holding, failing)``: the two prices, adjacent after bisection on a log scale over ``[low, high]``,
    where ``holds`` flips. Raising the price only makes every allocation cheaper, so ``holds`` is monotone
    in it: with ``holds_when_low`` (e.g. "recall reaches a value") it holds below the boundary, otherwise
    (e.g. "density stays under a budget") above it. ``failing`` is ``None`` when ``holds`` holds on the
    whole range."""
    edge, other = (high, low) if holds_when_low else (low, high)
    if holds(edge):
        return edge, None
    if not holds(other):
        raise ValueError("no price in the searched range satisfies the condition (a budget under the fewest "
                         "keys every row keeps, or a recall above what every key gives)")
    lo, hi = low, high
    for _ in range(_BISECTIONS):
        mid = math.sqrt(lo * hi)
        if holds(mid) == holds_when_low:
            lo = mid
        else:
            hi = mid
    return (lo, hi) if holds_when_low else (hi, lo)


def percentile(values: torch.Tensor, q: float) -> float:
    """Linear-interpolated ``q``-quantile (numpy's default), as the frontier reports compute p10."""
    return float(torch.quantile(values.double(), q))


def summarize(head_recall: torch.Tensor, head_density: torch.Tensor) -> dict[str, float]:
    """Mean and p10 of the per-head recall ``[H]``, and the average density of ``head_density [H]``."""
    return {"mean": float(head_recall.mean()), "p10": percentile(head_recall, 0.1),
            "density": float(head_density.mean())}


def global_allocation(recall: torch.Tensor, kept: torch.Tensor, causal: torch.Tensor, density: float
                      ) -> dict[str, float]:
    """One price for every row of every head, the lowest whose average density stays <= ``density``
    (which must be at least the density of every row at its fewest keys)."""
    price, _ = _boundary_prices(lambda p: float(allocate(recall, kept, causal, p)[1].mean()) <= density,
                                holds_when_low=False)
    return summarize(*allocate(recall, kept, causal, price))


def uniform_allocation(recall: torch.Tensor, kept: torch.Tensor, causal: torch.Tensor, point: int) -> dict[str, float]:
    """Every row at grid point ``point``."""
    return summarize(recall[..., point].mean(-1), kept[..., point].to(torch.float64).sum(-1) / float(causal.sum()))


def rows_allocation(recall: torch.Tensor, kept: torch.Tensor, causal: torch.Tensor, density: float
                    ) -> tuple[dict[str, float], torch.Tensor]:
    """Every head at the same density, its rows spending unevenly (a price per head, the lowest whose
    density stays <= ``density``): the summary and the per-head recall ``[H]``. Each head's allocation
    is the best at its own density, a point of its recall-density hull, which can fall a little under
    ``density`` (a conservative reading: 9.97% for 10% on 128 rows and 16 grid points)."""
    recalls, densities = [], []
    for head in range(recall.shape[0]):
        r, k = recall[head: head + 1], kept[head: head + 1]
        price, _ = _boundary_prices(lambda p: float(allocate(r, k, causal, p)[1][0]) <= density, holds_when_low=False)
        head_recall, head_density = allocate(r, k, causal, price)
        recalls.append(float(head_recall[0]))
        densities.append(float(head_density[0]))
    head_recall = torch.tensor(recalls, dtype=recall.dtype)
    return summarize(head_recall, torch.tensor(densities, dtype=torch.float64)), head_recall


def head_costs(recall: torch.Tensor, kept: torch.Tensor, causal: torch.Tensor, value: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per head: the largest price at which its recall still reaches ``value``, the density that costs,
    and a lower bound on the density of any choice of grid points that reaches it (the density at the
    adjacent price where the recall falls short: by the Lagrangian argument, no allocation of at most
    that density keeps more). ``(price, density, lower_bound)``, each ``[H]``."""
    prices, below = [], []
    for head in range(recall.shape[0]):
        r, k = recall[head: head + 1], kept[head: head + 1]
        holding, failing = _boundary_prices(lambda p: float(allocate(r, k, causal, p)[0][0]) >= value,
                                            holds_when_low=True)
        prices.append(holding)
        below.append(0.0 if failing is None else float(allocate(r, k, causal, failing)[1][0]))
    price = torch.tensor(prices, dtype=recall.dtype)
    return price, allocate(recall, kept, causal, price)[1], torch.tensor(below, dtype=recall.dtype)


def target_allocation(recall: torch.Tensor, kept: torch.Tensor, causal: torch.Tensor, mean: float, p10: float
                      ) -> dict[str, float]:
    """The cheapest allocation this finds that meets ``mean`` and ``p10`` (see the module docstring),
    with a lower bound on the average density of any choice of grid points that meets both: the larger
    of what the mean alone needs and what the cheapest heads that must reach ``p10`` need (each bound
    from the price adjacent to the boundary, where the condition just fails)."""
    heads = recall.shape[0]
    own_price, own_density, own_lower = head_costs(recall, kept, causal, p10)
    left_below = math.floor(0.1 * (heads - 1))  # heads allowed under the p10 value
    lifted = torch.ones(heads, dtype=torch.bool)
    lifted[own_density.argsort(descending=True)[:left_below]] = False
    floor_price = torch.where(lifted, own_price, torch.full_like(own_price, float("inf")))

    def combined(price: float) -> tuple[torch.Tensor, torch.Tensor]:
        return allocate(recall, kept, causal, torch.minimum(floor_price, torch.full_like(floor_price, price)))

    price, _ = _boundary_prices(lambda p: float(combined(p)[0].mean()) >= mean, holds_when_low=True)
    head_recall, head_density = combined(price)
    _, mean_fails = _boundary_prices(lambda p: float(allocate(recall, kept, causal, p)[0].mean()) >= mean,
                                     holds_when_low=True)
    mean_lower = 0.0 if mean_fails is None else float(allocate(recall, kept, causal, mean_fails)[1].mean())
    p10_lower = float(own_lower.sort().values[: heads - left_below].sum()) / heads
    return {**summarize(head_recall, head_density), "lower_bound": max(mean_lower, p10_lower),
            "met": bool(float(head_recall.mean()) >= mean - 1e-6 and percentile(head_recall, 0.1) >= p10 - 1e-6)}


# ---------------------------------------------------------------------------------------------
# Measurement


def _nested(values: torch.Tensor) -> list[Any]:
    """``[H, R, G]`` values as nested lists rounded to 6 decimals (the JSONL records' form)."""
    return [[[round(float(x), 6) for x in row] for row in head] for head in values.tolist()]


def measure_layer(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, scale: float) -> dict[str, Any]:
    """Every sampled row's key-oracle recall and kept keys at each :data:`GRID` density (batch 1)."""
    lse = causal_logsumexp(q, k, rows, sm_scale=scale)
    results = oracle_recall(q, k, rows, GRID, sm_scale=scale, lse=lse)
    recall = torch.stack([results[d].recall[0] for d in GRID], -1)  # [H, R, G]
    kept = torch.stack([results[d].kept[0] for d in GRID], -1)
    return {"recall": _nested(recall), "kept": kept.tolist()}


def tile_ends(rows: torch.Tensor, tile: int, length: int) -> torch.Tensor:
    """The last row ``[R]`` of the query tile (``tile`` rows, aligned to multiples of ``tile``, the last one
    cut at ``length``) that holds each sampled row."""
    return torch.clamp((rows // tile + 1) * tile - 1, max=length - 1)


@dataclass(frozen=True)
class TileEstimate:
    """An online estimate of a query tile's key masses, one step from a kernel index: the softmax of the
    *mean query* of the aligned block of ``pool`` rows that holds the tile (``pool`` a multiple of the tile;
    every query is known at prefill, so the block may reach past the tile) against the tile's causal keys.
    The tile keeps its ``local`` most recent causal keys first (the diagonal band a kernel computes anyway),
    then the keys of largest estimated mass. Estimation work per head: ``N / pool`` query rows against all
    keys, ``1 / pool`` of dense attention's QK^T."""

    pool: int
    local: int = 0

    @property
    def name(self) -> str:
        return f"pooled{self.pool}" + (f"+local{self.local}" if self.local else "")


def parse_estimates(text: str) -> list[TileEstimate]:
    """``"64,128+local128"`` -> estimates (``POOL`` or ``POOL+localW``)."""
    estimates = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        pool, _, local = item.partition("+local")
        if not pool.isdigit() or (local and not local.isdigit()):
            raise ValueError(f"bad estimate {item!r}: expected POOL or POOL+localW, e.g. 64 or 128+local128")
        estimates.append(TileEstimate(int(pool), int(local or 0)))
    return estimates


def _estimate_curves(estimate: TileEstimate, q: torch.Tensor, keys: torch.Tensor, mass: torch.Tensor, start: int,
                     end: int, counts: list[int], scale: float) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """One tile's curves under ``estimate``: the true recall and the estimated mass of the kept keys at each
    of ``counts`` (``[Hq, G]`` each), and the keys kept (a count below the forced local keys keeps those).

    ``q [Hq, N, D]``, ``keys [Hq, end + 1, D]`` (float32), ``mass [Hq, end + 1]``: each key's attention mass
    averaged over the tile's rows."""
    pool_start = (start // estimate.pool) * estimate.pool
    pooled = q[:, pool_start: pool_start + estimate.pool].float().mean(1, keepdim=True)  # [Hq, 1, D]
    estimated = (pooled @ keys.transpose(-1, -2))[:, 0].mul(scale).softmax(-1)  # [Hq, end + 1]
    local = min(estimate.local, end + 1)
    rank = estimated.clone()
    rank[:, end + 1 - local:] = float("inf")
    order = rank.argsort(-1, descending=True)
    true_cumulative = mass.gather(-1, order).cumsum(-1)
    estimated_cumulative = estimated.gather(-1, order).cumsum(-1)
    kept = [max(count, local) for count in counts]
    at = torch.tensor([count - 1 for count in kept], device=mass.device)
    return true_cumulative[:, at], estimated_cumulative[:, at], kept


def measure_tiles(q: torch.Tensor, k: torch.Tensor, ends: torch.Tensor, tile: int, scale: float,
                  estimates: Sequence[TileEstimate] = ()) -> dict[str, Any]:
    """The tile oracle's recall and kept keys at each :data:`GRID` density, for the query tile ending at each
    of ``ends [R]`` (batch 1; ``q [1, Hq, N, D]``, ``k [1, Hkv, N, D]``), and the same curves for each of
    ``estimates`` (under ``"estimates"``, by name: ``recall``, ``mass`` (the estimate's own mass of the kept
    keys, what an online budget sees) and ``kept``).

    A tile shares one set of key columns (what a kernel whose index varies per query tile can compute):
    its best ``ceil(d * (end + 1))`` keys are those with the largest attention summed over the tile's rows,
    which maximizes the tile rows' mean recall for that count. Its recall is that mean (each row's causal
    softmax, the tile's future keys excluded). Memory: one tile's ``[Hq, tile, end + 1]`` probabilities.
    """
    q_heads, kv_heads = q.shape[1], k.shape[1]
    for estimate in estimates:
        if estimate.pool % tile:
            raise ValueError(f"estimate {estimate.name}: its pool of {estimate.pool} rows must be a multiple of "
                             f"the tile ({tile} rows)")
    recall, kept = [], []
    estimated: dict[str, dict[str, list[Any]]] = {e.name: {"recall": [], "mass": [], "kept": []} for e in estimates}
    for end in ends.tolist():  # one tile per sampled row, each one batched matmul over all heads
        start = max(0, end - tile + 1)
        keys = k[0, :, : end + 1].repeat_interleave(q_heads // kv_heads, 0).float()
        scores = q[0, :, start: end + 1].float() @ keys.transpose(-1, -2) * scale  # [Hq, rows, end + 1]
        positions = torch.arange(end + 1, device=q.device)
        future = positions[None, :] > torch.arange(start, end + 1, device=q.device)[:, None]
        mass = scores.masked_fill(future, float("-inf")).softmax(-1).mean(1)  # [Hq, end + 1]
        ranked = mass.sort(-1, descending=True).values.cumsum(-1)
        counts = [int(oracle_counts(torch.tensor([end + 1]), d)) for d in GRID]
        recall.append(ranked[:, [c - 1 for c in counts]])  # [Hq, G]
        kept.append(counts)
        for estimate in estimates:
            curves = estimated[estimate.name]
            true_recall, own_mass, own_kept = _estimate_curves(estimate, q[0], keys, mass, start, end, counts, scale)
            curves["recall"].append(true_recall)
            curves["mass"].append(own_mass)
            curves["kept"].append(own_kept)
    out: dict[str, Any] = {"recall": _nested(torch.stack(recall, 1).clamp(max=1.0)), "kept": [kept] * q_heads}
    if estimates:
        out["estimates"] = {name: {"recall": _nested(torch.stack(c["recall"], 1).clamp(max=1.0)),
                                   "mass": _nested(torch.stack(c["mass"], 1).clamp(max=1.0)),
                                   "kept": [c["kept"]] * q_heads} for name, c in estimated.items()}
    return out


def load_curves(records: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(recall, kept [L*H, R, G+1], causal [R])`` of every layer's heads, all keys as the last point."""
    records = sorted(records, key=lambda r: r["layer"])
    recall = torch.tensor([head for r in records for head in r["recall"]], dtype=torch.float64)
    kept = torch.tensor([head for r in records for head in r["kept"]], dtype=torch.int64)
    causal = torch.tensor(records[0]["rows"], dtype=torch.int64) + 1
    return (*with_all_keys(recall, kept, causal), causal)


def load_estimate_curves(records: list[dict[str, Any]], name: str
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(recall, mass, kept [L*H, R, G+1], causal [R])`` of estimate ``name`` (see :func:`measure_tiles`),
    all keys as the last point (recall and estimated mass 1)."""
    records = sorted(records, key=lambda r: r["layer"])
    curves = [r["estimates"][name] for r in records]
    recall = torch.tensor([head for c in curves for head in c["recall"]], dtype=torch.float64)
    mass = torch.tensor([head for c in curves for head in c["mass"]], dtype=torch.float64)
    kept = torch.tensor([head for c in curves for head in c["kept"]], dtype=torch.int64)
    causal = torch.tensor(records[0]["rows"], dtype=torch.int64) + 1
    recall, full_kept = with_all_keys(recall, kept, causal)
    return recall, with_all_keys(mass, kept, causal)[0], full_kept, causal


def coverage_choice(recall: torch.Tensor, kept: torch.Tensor, causal: torch.Tensor, mass: torch.Tensor, tau: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row (tile) at its first grid point whose estimated mass reaches ``tau`` (a coverage budget: the
    fewest keys the estimate says hold ``tau`` of the attention); ``(head_recall [H], head_density [H])``.
    ``mass [H, R, G]`` must end at 1 (every key)."""
    choice = (mass < tau).sum(-1, keepdim=True).clamp(max=mass.shape[-1] - 1)
    head_recall = recall.gather(-1, choice)[..., 0].mean(-1)
    head_density = kept.gather(-1, choice)[..., 0].to(torch.float64).sum(-1) / float(causal.sum())
    return head_recall, head_density.to(recall.dtype)


def _bisect_tau(holds: Any) -> float | None:
    """The smallest coverage ``tau`` in ``[0, 1]`` where the monotone ``holds`` (false below, true above)
    holds, to 1e-9; ``None`` when it fails even at ``tau = 1``."""
    if not holds(1.0):
        return None
    lo, hi = 0.0, 1.0
    for _ in range(_BISECTIONS):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if holds(mid) else (mid, hi)
    return hi


def online_allocations(recall: torch.Tensor, kept: torch.Tensor, causal: torch.Tensor, mass: torch.Tensor,
                       mean: float, p10: float, density: float) -> dict[str, dict[str, Any]]:
    """Budgets an online estimator can set from its own estimated masses ``mass`` (no true recall seen):

    - ``price``: one price per key over the estimated mass, every tile of every head;
    - ``coverage``: each tile the fewest keys whose estimated mass reaches one ``tau``;

    each at the largest spend within ``density`` (``at_density``; ``None`` when the fewest keys each tile keeps
    cost more) and at the cheapest spend meeting both ``mean`` and ``p10`` (``meeting``; ``None`` when even
    every key does not). Both knobs are monotone: a lower price or a higher ``tau`` keeps at least as many
    keys in every tile."""
    def meets(result: tuple[torch.Tensor, torch.Tensor]) -> bool:
        return float(result[0].mean()) >= mean - 1e-6 and percentile(result[0], 0.1) >= p10 - 1e-6

    def by_price(price: float) -> tuple[torch.Tensor, torch.Tensor]:
        return allocate(recall, kept, causal, price, score=mass)

    def by_tau(tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        return coverage_choice(recall, kept, causal, mass, tau)

    out: dict[str, dict[str, Any]] = {}
    fewest = float(by_price(1e6)[1].mean())
    within = None if fewest > density else _boundary_prices(lambda p: float(by_price(p)[1].mean()) <= density,
                                                            holds_when_low=False)[0]
    meeting_price = _boundary_prices(lambda p: meets(by_price(p)), holds_when_low=True)[0] if meets(by_price(1e-9)) else None
    out["price"] = {"at_density": None if within is None else summarize(*by_price(within)),
                    "meeting": None if meeting_price is None else summarize(*by_price(meeting_price))}
    # the largest tau within the density: the smallest tau over it, less a step
    over = _bisect_tau(lambda t: float(by_tau(t)[1].mean()) > density)
    tau_within = 1.0 if over is None else max(0.0, over - 1e-9)
    meeting_tau = _bisect_tau(lambda t: meets(by_tau(t)))
    at_density = None if float(by_tau(tau_within)[1].mean()) > density else {**summarize(*by_tau(tau_within)),
                                                                            "tau": tau_within}
    out["coverage"] = {"at_density": at_density,
                       "meeting": None if meeting_tau is None else {**summarize(*by_tau(meeting_tau)), "tau": meeting_tau}}
    return out


def analyse_estimates(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per estimate of the records (see :func:`measure_tiles`) and target of :data:`TARGETS`: its ranking
    under oracle budgets (``ranked``: the global price and the cheapest allocation meeting the target, over
    the true recall of the estimate's key sets) and the online budgets of :func:`online_allocations`."""
    names = sorted(records[0].get("estimates", {}))
    out: dict[str, Any] = {}
    for name in names:
        recall, mass, kept, causal = load_estimate_curves(records, name)
        out[name] = []
        fewest = float(kept[..., 0].to(torch.float64).sum(-1).mean()) / float(causal.sum())
        for mean, p10, density in TARGETS:
            out[name].append({"mean": mean, "p10": p10, "density": density,
                              "ranked_global": None if fewest > density else global_allocation(recall, kept, causal,
                                                                                               density),
                              "ranked_cheapest": target_allocation(recall, kept, causal, mean, p10),
                              **online_allocations(recall, kept, causal, mass, mean, p10, density)})
    return out


def analyse(records: list[dict[str, Any]]) -> tuple[dict[str, Any], list[list[Any]]]:
    """The allocations of the module docstring at each target of :data:`TARGETS`, and a per-head table
    (layer, head; at each target's density: the uniform and the rows-uneven recall; the density the
    head needs to reach the target's p10 value)."""
    recall, kept, causal = load_curves(records)
    out: dict[str, Any] = {"heads": recall.shape[0], "rows": recall.shape[1], "targets": []}
    heads_per_layer = recall.shape[0] // len(records)
    table: list[list[Any]] = [[layer, head] for layer in range(len(records)) for head in range(heads_per_layer)]
    for mean, p10, density in TARGETS:
        point = GRID.index(density)
        rows_summary, rows_recall = rows_allocation(recall, kept, causal, density)
        out["targets"].append({
            "mean": mean, "p10": p10, "density": density,
            "uniform": uniform_allocation(recall, kept, causal, point),
            "rows": rows_summary,
            "global": global_allocation(recall, kept, causal, density),
            "cheapest": target_allocation(recall, kept, causal, mean, p10),
        })
        needs = head_costs(recall, kept, causal, p10)[1]
        uniform_recall = recall[..., point].mean(-1)
        for row, values in zip(table, zip(uniform_recall.tolist(), rows_recall.tolist(), needs.tolist())):
            row.extend(round(v, 4) for v in values)
    return out, table


def table_header() -> list[str]:
    """The columns of :func:`analyse`'s per-head table."""
    header = ["layer", "head"]
    for _, p10, density in TARGETS:
        share = f"{100 * density:g}%"
        header += [f"uniform_recall_at_{share}", f"rows_uneven_recall_at_{share}", f"density_to_reach_{p10:g}"]
    return header


def _granularity(tile: int) -> str:
    if tile == 1:
        return "each sampled row its own best keys (the key oracle)"
    return (f"one key set per query tile of {tile} rows, shared by its rows (each sampled row stands for its "
            "tile; density over the tile's last row's causal keys)")


def _cell(result: dict[str, Any] | None) -> str:
    if result is None:
        return "not met"
    tau = f", tau {result['tau']:.4f}" if "tau" in result else ""
    return f"{result['mean']:.3f} / {result['p10']:.3f} / {100 * result['density']:.2f}%{tau}"


def estimate_section(estimates: dict[str, Any]) -> list[str]:
    """The report's table of the online estimates (empty without any)."""
    if not estimates:
        return []
    rows = []
    for name, targets in estimates.items():
        for target in targets:
            label = f"{target['mean']:.2f} / {target['p10']:.2f} at <= {100 * target['density']:g}%"
            rows.append([name, label, _cell(target["ranked_global"]),
                         _cell(target["ranked_cheapest"]) if target["ranked_cheapest"]["met"] else "not met",
                         _cell(target["price"]["at_density"]), _cell(target["price"]["meeting"]),
                         _cell(target["coverage"]["at_density"]), _cell(target["coverage"]["meeting"])])
    header = ["estimate", "target", "ranked by it, oracle price at the density", "ranked by it, cheapest meeting",
              "online price at the density", "online price, cheapest meeting", "online coverage at the density",
              "online coverage, cheapest meeting"]
    return ["## Online estimates of each tile's keys (mean recall / p10 head / average density)", "",
            "Ranked by the estimate: the estimate orders each tile's keys, budgets chosen from the true recall (its "
            "ranking's ceiling). Online: budgets from the estimate's own masses (one price per key, or one "
            "coverage tau), what a run-time index can do.", "",
            markdown_table(header, rows), ""]


def write_report(out: Path, records: list[dict[str, Any]], command: str) -> Path:
    analysis, table = analyse(records)
    estimates = analyse_estimates(records)
    (out / "budget_oracle.json").write_text(json.dumps({**analysis, "estimates": estimates}, indent=1) + "\n")
    with open(out / "budget_oracle_heads.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([table_header(), *table])
    first = records[0]
    rows = []
    labels = (("uniform", "every row the same share"), ("rows", "each head the same share, its rows uneven"),
              ("global", "one price per key, all rows of all heads"))
    for target in analysis["targets"]:
        name = f"mean {target['mean']:.2f} / p10 {target['p10']:.2f} at <= {100 * target['density']:g}%"
        for kind, label in labels:
            result = target[kind]
            rows.append([name, label, f"{result['mean']:.3f}", f"{result['p10']:.3f}", f"{100 * result['density']:.2f}%"])
        cheap = target["cheapest"]
        rows.append([name, "cheapest found meeting both" if cheap["met"] else "not met even with every key",
                     f"{cheap['mean']:.3f}", f"{cheap['p10']:.3f}",
                     f"{100 * cheap['density']:.2f}% (any: >= {100 * cheap['lower_bound']:.2f}%)"])
    text = "\n".join([
        "# Recall targets against oracles that spend unevenly", "",
        f"- model: {first['model']}, length {first['length']}, {analysis['heads']} heads "
        f"({first['num_layers']} layers), {analysis['rows']} sampled rows per head (seed {first['seed']}), "
        f"device {first['device']}, torch {first['versions']['torch']}",
        f"- command: `{command}`",
        f"- granularity: {_granularity(first.get('tile', 1))}",
        f"- grid of per-row densities: {', '.join(f'{d:g}' for d in GRID)}, and every key", "",
        markdown_table(["target", "allocation", "mean recall", "p10 head", "average density"], rows), "",
        *estimate_section(estimates),
        "Per head: `budget_oracle_heads.csv`.", ""])
    path = out / "budget_oracle.md"
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--length", type=frontier.parse_length, default=32768)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text", default="pg")
    parser.add_argument("--text-file", default=None)
    parser.add_argument("--layers", type=frontier.parse_layers, default=None, help="default: all")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--yarn", type=float, default=None)
    parser.add_argument("--gguf", default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--tile", type=int, default=1,
                        help="query rows that share one key set (1: every row its own, the key oracle)")
    parser.add_argument("--estimate", default="",
                        help="with --tile: online estimates of each tile's keys to measure beside the oracle, "
                             "comma-separated POOL or POOL+localW (see TileEstimate), e.g. 64,128+local128")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.tile < 1:
        parser.error(f"--tile must be >= 1, got {args.tile}")
    try:
        estimates = parse_estimates(args.estimate)
    except ValueError as error:
        parser.error(str(error))
    if estimates and args.tile == 1:
        parser.error("--estimate needs --tile > 1 (the estimates set one key set per query tile)")
    for estimate in estimates:
        if estimate.pool % args.tile:
            parser.error(f"--estimate {estimate.name}: the pool ({estimate.pool} rows) must be a multiple of --tile")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    command = "python3 benchmarks/budget_oracle.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    store = ResultStore(args.out / RESULTS)
    run = {"model": args.model, "length": args.length, "num_rows": args.rows, "seed": args.seed, "text": args.text,
           "tile": args.tile, "estimate_names": [e.name for e in estimates]}
    absent = {"tile": 1, "estimate_names": []}  # records from before --tile / --estimate

    def of_this_run(record: dict[str, Any]) -> bool:
        return all(record.get(key, absent.get(key)) == value for key, value in run.items())

    done = {r["layer"] for r in store.records() if of_this_run(r)}
    model, tokenizer = frontier.load_model(args)
    num_layers = int(model.config.num_hidden_layers)
    wanted = [layer for layer in (args.layers or range(num_layers)) if layer not in done]
    if wanted:
        ids = torch.tensor([frontier.prompt_ids(tokenizer, args)], device=model.device)
        rows = sample_rows(args.length, args.length, args.rows, seed=args.seed)
        if args.tile > 1:
            rows = tile_ends(rows, args.tile, args.length)
        common = {**run, "num_layers": num_layers, **environment_info(ids.device), "command": command}

        def on_layer(captured: Any) -> None:
            if args.tile > 1:
                measured = measure_tiles(captured.q, captured.k, rows, args.tile, captured.sm_scale, estimates)
            else:
                measured = measure_layer(captured.q, captured.k, rows.to(captured.q.device), captured.sm_scale)
            tile_id = (f"-t{args.tile}" if args.tile > 1 else "") + "".join(f"-{e.name}" for e in estimates)
            store.append({**common, "task": "budget_oracle", "method": f"tile{args.tile}-oracle-grid" if tile_id
                          else "key-oracle-grid",
                          "case_id": f"n{args.length}-r{args.rows}-s{args.seed}-{args.text}{tile_id}-L{captured.layer:03d}",
                          "layer": captured.layer, "rows": rows.tolist(), "grid": list(GRID), **measured})
            logger.info("layer %d measured", captured.layer)

        capture_qk(model, ids, layers=wanted, on_layer=on_layer)
    records = [r for r in store.records() if of_this_run(r)]
    print(write_report(args.out, records, command).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
