"""How often do real rows bind the selection's caps? Real masses, no timing.

The parallel Triton selection (:mod:`longinfer.patterns._select_kernel`) finishes a row in its
first round when the coverage budget without caps takes at most ``num_vertical`` columns and
``num_slash`` diagonals; rows over a cap take a second round (top-k candidates, then coverage
among them: ~0.5 ms more per layer on an H200, session 9). Before session 9 those rows, and rows
whose boundary falls inside a run of equal masses, took the per-row kernel (~6-14 ms per layer).
This captures a model's post-RoPE q/k for a follow-up turn (``--turn`` queries
over a ``--length - --turn`` prefix, PG essays; only the first ``--layers`` layers are run, which
is what makes it affordable on a CPU), estimates the masses with the default plan's estimate (torch
path) and reports per layer the largest uncapped column / diagonal counts against the caps, the
heads over a cap, and the heads with a partial run of equal masses at the boundary.

    python3 benchmarks/selection_caps_check.py --length 20480 --layers 4 --out docs/results/...
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch

from longinfer.data import corpora
from longinfer.eval.capture import capture_qk
from longinfer.models import zoo
from longinfer.patterns import vertical_slash as vs
from longinfer.plans.schema import DEFAULT_PATTERN_CONFIG


def partial_tie_heads(columns: torch.Tensor, diagonals: torch.Tensor, items: vs.ChosenItems) -> int:
    """Heads whose smallest taken positive mass is shared by an item that is not taken."""
    count = 0
    for head in range(columns.shape[1]):
        taken = torch.cat([columns[0, head][items.vertical[0, head][items.vertical_taken[0, head]]],
                           diagonals[0, head][items.slash[0, head][items.slash_taken[0, head]]]])
        positive = taken[taken > 0]
        if positive.numel():
            boundary = positive.min()
            equal = int((columns[0, head] == boundary).sum() + (diagonals[0, head] == boundary).sum())
            count += equal > int((taken == boundary).sum())
    return count


def layer_row(layer: int, q: torch.Tensor, k: torch.Tensor, scale: float) -> dict[str, Any]:
    """The uncapped budget's counts of one layer against the default caps."""
    config = DEFAULT_PATTERN_CONFIG.for_call(q.shape[2], k.shape[2])  # the rule this call runs
    columns, diagonals = vs.estimate_masses(q, k, config, sm_scale=scale, backend="torch")
    uncapped = dataclasses.replace(config, num_vertical=k.shape[2], num_slash=k.shape[2])
    items = vs.select_items(columns, diagonals, uncapped)
    cols = items.vertical_taken.sum(-1).flatten().tolist()
    diags = items.slash_taken.sum(-1).flatten().tolist()
    return {"layer": layer, "columns max": max(cols), "diagonals max": max(diags),
            "heads over a cap": sum(c > config.num_vertical or d > config.num_slash for c, d in zip(cols, diags)),
            "heads with a partial tie run": partial_tie_heads(columns, diagonals, items), "heads": len(cols)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--yarn", type=float, default=4.0)
    parser.add_argument("--length", type=int, default=20480, help="prefix + turn tokens")
    parser.add_argument("--turn", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4, help="run and check the first this many layers")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    device = torch.device(args.device or zoo.default_device())
    model, tokenizer = zoo.load(args.model, device=device, yarn_factor=args.yarn)
    model.model.layers = model.model.layers[: args.layers]  # only the checked layers run
    model.config.num_hidden_layers = args.layers
    ids = torch.tensor([corpora.haystack_ids(tokenizer, args.length, "pg")], device=device)
    captured = capture_qk(model, ids, layers=range(args.layers),
                          query_rows=torch.arange(args.length - args.turn, args.length, device=device))
    rows = [layer_row(layer, qk.q.float(), qk.k.float(), qk.sm_scale) for layer, qk in sorted(captured.items())]
    config = DEFAULT_PATTERN_CONFIG
    data = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "model": args.model, "yarn": args.yarn, "length": args.length, "turn": args.turn,
            "caps": [config.num_vertical, config.num_slash],
            "command": "python3 benchmarks/selection_caps_check.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "selection_caps_check.json").write_text(json.dumps(data, indent=1) + "\n")
    lines = [f"# Uncapped selection counts vs the caps: {args.model}, {args.turn} queries over "
             f"{args.length - args.turn} cached keys", "",
             f"- Date: {data['date']}. Device: {data['device']}. Command: `{data['command']}`",
             f"- Default plan estimate (torch path); caps {config.num_vertical} columns / {config.num_slash} "
             "diagonals. A head over a cap takes the selection's second round.", "",
             "| layer | columns (max over heads) | diagonals (max) | heads over a cap | heads with a partial tie run |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['columns max']} | {r['diagonals max']} | {r['heads over a cap']}/{r['heads']} | "
              f"{r['heads with a partial tie run']}/{r['heads']} |" for r in rows]
    (out / "selection_caps_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
