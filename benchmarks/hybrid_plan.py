"""A plan that shares indices per KV group only in the layers where per-head indices miss most.

Reads a recall frontier's per-head table (``recall_heads.csv`` of ``benchmarks/recall_frontier.py``)
holding a per-head-index method and its per-KV-group counterpart, ranks the layers by the worst
head recall of the per-head method, and writes ``--base`` with ``share_kv_groups`` set in the
``--layers`` worst layers (or every layer whose worst head is below ``--below``). Prints what the
table predicts for the mix (mean / p10 head recall and mean density, each layer taken from the
method it uses), so the plan can be checked against the table before a GPU run measures it; with
``--timings`` (the frontier's ``recall.jsonl`` of a ``--time-kernels`` run) also the attention time
(estimate + kernel per layer) against dense SDPA.

    python3 benchmarks/hybrid_plan.py --heads docs/results/gpu-session4/q15-frontier/recall_heads.csv \\
        --per-head def-bs64 --per-group def-kv-bs64 --layers 6 \\
        --base docs/results/gpu-session4/plans/q15-default-notail.json --dense-last 128 \\
        --out docs/results/gpu-session5/plans/q15-hybrid-kv6-tail.json \
        --timings docs/results/gpu-session4/q15-frontier/recall.jsonl
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from longinfer.plans import Plan

Heads = dict[int, list[tuple[float, float]]]  # layer -> [(recall, density)] per head


def read_heads(path: Path, method: str) -> Heads:
    """Per layer, ``(recall, density)`` of every head of ``method`` in a frontier's head table."""
    layers: Heads = defaultdict(list)
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["method"] == method:
                layers[int(row["layer"])].append((float(row["recall"]), float(row["density"])))
    if not layers:
        raise SystemExit(f"{path} has no rows of method {method!r}")
    return dict(layers)


def worst_layers(per_head: Heads, count: int | None, below: float | None) -> list[int]:
    """Layers by ascending worst-head recall: the first ``count``, or all whose worst head < ``below``."""
    ranked = sorted(per_head, key=lambda layer: min(r for r, _ in per_head[layer]))
    if below is not None:
        return sorted(layer for layer in ranked if min(r for r, _ in per_head[layer]) < below)
    return sorted(ranked[:count])


def predicted(per_head: Heads, per_group: Heads, shared: list[int]) -> dict[str, float]:
    """Mean and 10th-percentile head recall and mean density of the mix, from the table."""
    heads = [h for layer in per_head for h in (per_group if layer in shared else per_head)[layer]]
    recalls = sorted(r for r, _ in heads)
    return {"mean_recall": statistics.fmean(recalls), "p10_recall": recalls[int(0.1 * len(recalls))],
            "mean_density": statistics.fmean(d for _, d in heads)}


def layer_times(path: Path, methods: tuple[str, str]) -> dict[str, dict[int, tuple[float, float]]]:
    """Per method and layer, ``(estimate + kernel ms, dense SDPA ms)`` from a timed frontier's JSONL."""
    times: dict[str, dict[int, tuple[float, float]]] = {m: {} for m in methods}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("method") in times and record.get("kernel_ms") is not None:
            times[record["method"]][record["layer"]] = (record["estimate_ms"] + record["kernel_ms"],
                                                        record["dense_sdpa_ms"])
    return times


def speedup(times: dict[str, dict[int, tuple[float, float]]], per_head: str, per_group: str,
            shared: list[int]) -> float:
    """Dense SDPA time over the mix's attention time, summed over the layers."""
    layers = sorted(times[per_head])
    sparse = sum(times[per_group if layer in shared else per_head][layer][0] for layer in layers)
    return sum(times[per_head][layer][1] for layer in layers) / sparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=Path, required=True, help="recall_heads.csv of a recall frontier")
    parser.add_argument("--per-head", required=True, help="the table's method with one index per query head")
    parser.add_argument("--per-group", required=True, help="the same estimator with one index per KV group")
    choice = parser.add_mutually_exclusive_group(required=True)
    choice.add_argument("--layers", type=int, help="share indices in this many worst layers")
    choice.add_argument("--below", type=float, help="share indices where the worst head's recall is below this")
    parser.add_argument("--base", type=Path, required=True, help="plan JSON to start from (same estimator)")
    parser.add_argument("--dense-last", type=int, default=None, help="set dense_last in every layer")
    parser.add_argument("--timings", type=Path, default=None,
                        help="recall.jsonl of the same frontier run with --time-kernels: predict the speed too")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    per_head, per_group = read_heads(args.heads, args.per_head), read_heads(args.heads, args.per_group)
    base = Plan.load(args.base)
    if sorted(per_head) != list(range(base.num_layers)) or sorted(per_group) != sorted(per_head):
        raise SystemExit(f"the table's layers do not match the plan's {base.num_layers} layers")
    shared = worst_layers(per_head, args.layers, args.below)
    layers = tuple(
        dataclasses.replace(layer, share_kv_groups=i in shared,
                            dense_last=layer.dense_last if args.dense_last is None else args.dense_last)
        for i, layer in enumerate(base.layers)
    )
    expected = predicted(per_head, per_group, shared)
    note = (f"{args.base.name} with one index per KV group in layers {shared} (the worst by {args.per_head}'s "
            f"worst head in {args.heads}); table prediction: recall {expected['mean_recall']:.3f} mean / "
            f"{expected['p10_recall']:.3f} p10 at {expected['mean_density']:.1%} density")
    plan = dataclasses.replace(base, layers=layers, search={"method": "hybrid_kv_layers", "note": note},
                               created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plan.save(args.out)
    times = None if args.timings is None else layer_times(args.timings, (args.per_head, args.per_group))
    if times is not None and any(sorted(t) != sorted(per_head) for t in times.values()):
        raise SystemExit(f"{args.timings} lacks timed layers of {args.per_head} or {args.per_group}")
    for name, layer_set in (("per head", []), ("per KV group", sorted(per_head)), ("hybrid", shared)):
        numbers = predicted(per_head, per_group, layer_set)
        speed = "" if times is None else f", {speedup(times, args.per_head, args.per_group, layer_set):.2f}x SDPA"
        print(f"{name:13s} recall {numbers['mean_recall']:.3f} / p10 {numbers['p10_recall']:.3f}, "
              f"density {numbers['mean_density']:.1%}{speed}")
    print(f"wrote {args.out}: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
