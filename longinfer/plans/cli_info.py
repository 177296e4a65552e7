"""``longinfer info PLAN``: what a plan does, layer by layer, and how it was made.

:func:`plan_summary` renders the text (model and shape, provenance, pattern counts, recall and
cost of the chosen heads when the plan came from a search, and per layer the dense threshold and
each group of heads with its pattern and the parameters that differ from the defaults).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from longinfer.patterns import triangle as _triangle  # noqa: F401  (plans may name the "triangle" pattern)
from longinfer.plans.schema import Plan
from longinfer.plans.search import candidate_label


def _head_ids(ids: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    parts: list[str] = []
    start = prev = ids[0]
    for i in list(ids[1:]) + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts)


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _provenance(search: Mapping[str, Any]) -> list[str]:
    lines = [f"search:   method={search.get('method', '?')}"]
    calibration = search.get("calibration")
    if isinstance(calibration, Mapping):
        details = ", ".join(f"{key}={calibration[key]}" for key in ("kind", "length", "corpus", "seed", "num_records")
                            if key in calibration)
        lines.append(f"          calibration: {details}")
    settings = [f"{key}={search[key]}" for key in ("cost_budget", "recall_tolerance", "num_rows", "share_kv_groups",
                                                   "dense_layers", "sink", "window", "last_q") if key in search]
    if "candidates" in search:
        settings.append(f"candidates={len(search['candidates'])}")
    if settings:
        lines.append("          " + ", ".join(settings))
    captured = search.get("captured_on")
    if isinstance(captured, list) and captured:
        where = ", ".join(f"{c.get('device')}/{c.get('dtype')}" for c in captured if isinstance(c, Mapping))
        versions = search.get("versions") if isinstance(search.get("versions"), Mapping) else {}
        lines.append(f"          q/k captured on {where}" + "".join(f", {k} {v}" for k, v in versions.items()))
    return lines


def _layer_scores(search: Mapping[str, Any], num_layers: int) -> list[Mapping[str, Any]] | None:
    layers = search.get("layers")
    if isinstance(layers, list) and len(layers) == num_layers and all(isinstance(x, Mapping) for x in layers):
        return layers
    return None


def _crossover_line(scores: list[Mapping[str, Any]] | None) -> str | None:
    if scores is None:
        return None
    crossovers = [s.get("crossover") for s in scores if isinstance(s.get("crossover"), Mapping)]
    if not crossovers:
        return None
    measured = [c for c in crossovers if c.get("measured")]
    if measured:
        devices = sorted({str(c.get("device")) for c in measured})
        return f"dense_below: measured on {', '.join(devices)} for {len(measured)} of {len(scores)} layers"
    reasons = sorted({str(c.get("reason", "?")) for c in crossovers})
    return f"dense_below: not measured ({'; '.join(reasons)})"


def plan_summary(plan: Plan, path: str | None = None) -> str:
    """A readable multi-line summary of ``plan`` (see the module docstring)."""
    lines = []
    if path is not None:
        lines.append(f"plan:     {path}")
    revision = f" (revision {plan.model_revision})" if plan.model_revision else ""
    lines.append(f"model:    {plan.model_id or '(not recorded)'}{revision}")
    lines.append(f"shape:    {plan.num_layers} layers, {plan.num_q_heads} query / {plan.num_kv_heads} kv heads, "
                 f"head_dim {plan.head_dim}")
    lines.append(f"created:  {plan.created} by longinfer {plan.library_version}")
    lines.extend(_provenance(plan.search))
    counts = Counter(head.pattern for layer in plan.layers for head in layer.heads)
    lines.append("patterns: " + ", ".join(f"{n} {name}" for name, n in counts.most_common())
                 + f" (of {plan.num_layers * plan.num_q_heads} heads)")
    scores = _layer_scores(plan.search, plan.num_layers)
    if scores is not None and all("recall" in s and "cost" in s for s in scores):
        recall = [float(r) for s in scores for r in s["recall"]]
        cost = [float(c) for s in scores for c in s["cost"]]
        lines.append(f"recall:   mean {statistics.fmean(recall):.4f}, p10 {_quantile(recall, 0.1):.4f}, "
                     f"min {min(recall):.4f} (calibration prompt, chosen heads)")
        lines.append(f"cost:     mean {statistics.fmean(cost):.4f}, max {max(cost):.4f} (kernel pairs / dense)")
    crossover = _crossover_line(scores)
    if crossover:
        lines.append(crossover)
    lines.append("")
    has_scores = scores is not None and all("recall" in s and "cost" in s for s in scores)
    header = "layer  dense_below" + ("  recall    cost" if has_scores else "") + "  heads"
    lines.append(header)
    for index, layer in enumerate(plan.layers):
        groups = "; ".join(f"{len(ids)}x {candidate_label(head)} [{_head_ids(ids)}]" for head, ids in layer.head_groups())
        options = ["shared per KV group"] if layer.share_kv_groups else []
        options += [f"last {layer.dense_last} rows dense"] if layer.dense_last else []
        groups += f" ({', '.join(options)})" if options else ""
        row = f"{index:5d}  {layer.dense_below:11d}"
        if has_scores:
            row += f"  {statistics.fmean(scores[index]['recall']):.4f}  {statistics.fmean(scores[index]['cost']):.4f}"
        lines.append(f"{row}  {groups}")
    return "\n".join(lines) + "\n"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``info`` command to the top-level CLI."""
    parser = subparsers.add_parser("info", help="summarize a plan file: patterns per layer, budgets, provenance")
    parser.add_argument("plan", type=Path, help="plan JSON file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the summary; a missing or invalid plan is reported on stderr with exit code 1."""
    try:
        plan = Plan.load(args.plan)
    except FileNotFoundError:
        print(f"error: no plan file {args.plan}", file=sys.stderr)
        return 1
    except (ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    sys.stdout.write(plan_summary(plan, str(args.plan)))
    return 0
