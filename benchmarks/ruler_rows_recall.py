"""Attention recall and output error at the rows a RULER-style task depends on, next to spread rows.

Mean recall over rows spread across a prompt ranked estimators in the opposite order to their
RULER-style scores (``docs/results/recall-cpu-qwen0.5b-8k-groupmix/``): one index per KV group
scored far better on RULER than a per-head index of similar or higher spread-row recall. This asks
where they differ: for each generated RULER-style prompt (``longinfer.eval.ruler``), it captures
every layer's q/k in one forward and scores each estimator's index (the ``recall`` evaluation's
method specs) at

- ``pieces``: every row inside an inserted needle / assignment sentence (the facts the answer
  needs; the question rows at the end run dense in the default plan and are not scored);
- ``spread``: ``--rows`` rows sampled across the prompt (what ``recall_frontier.py`` scores).

Per method and row set: recall mean / p10 / min over every (layer, query head), each head's value
the mean over the set's rows; the same for the attention output's relative error
(:func:`longinfer.patterns.recall.attention_output_error`: what the dropped keys' values would
have added, which recall does not weigh), as mean / p90 / max; density on the spread rows.
Appends one JSON line per (prompt, method) to ``<out>/ruler_rows_recall.jsonl`` as each prompt
finishes (rerun the same command to resume) and writes ``ruler_rows_recall.md``.

    python benchmarks/ruler_rows_recall.py --model qwen2.5-coder-0.5b --length 8192 \\
        --tasks niah_multivalue,vt --samples 1 --device cpu --out /tmp/rows \\
        --method default=vertical_slash:budget=coverage,num_vertical=4096,num_slash=8192,query_sampling=strided \\
        --method kv=vertical_slash:budget=coverage,num_vertical=4096,num_slash=8192,query_sampling=strided,per_kv_group=true

Memory: one layer's q/k/v at a time plus the recall tool's streaming buffers (``O(R * KEY_CHUNK)``
per head); no N x N matrix.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch

from longinfer.eval import recall as recall_eval
from longinfer.eval import ruler
from longinfer.eval.capture import capture_qk
from longinfer.eval.cli import load_haystack
from longinfer.eval.report import markdown_table
from longinfer.models import zoo
from longinfer.patterns.recall import attention_output_error, attention_recall, causal_logsumexp, sample_rows

logger = logging.getLogger("ruler_rows_recall")
RESULTS = "ruler_rows_recall.jsonl"
ROW_SETS = ("pieces", "spread")
ERROR_KEYS = {"pieces": "error_pieces", "spread": "error_spread"}  # record keys of the output errors


def piece_rows(prompt: ruler.RulerPrompt) -> torch.Tensor:
    """Every position inside the prompt's inserted sentences, ascending."""
    if not prompt.pieces:
        raise ValueError("this task inserts no sentences (cwe / fwe); choose a needle or vt task")
    return torch.tensor([p for start, stop in prompt.pieces for p in range(start, stop)], dtype=torch.long)


def per_head_recall(q: torch.Tensor, k: torch.Tensor, index: Any, rows: torch.Tensor,
                    sm_scale: float, lse: torch.Tensor | None = None) -> tuple[list[float], float]:
    """Each query head's mean recall over ``rows`` (``[Hq]`` values) and the density (kept keys /
    causal keys summed over the rows, averaged over heads: the recall tool's definition). ``lse``:
    the rows' :func:`causal_logsumexp`, computed here if not given (pass it to score several indices
    on the same rows without recomputing it)."""
    rows = rows.to(q.device)
    if lse is None:
        lse = causal_logsumexp(q, k, rows, sm_scale=sm_scale)
    stats = attention_recall(q, k, index, rows, sm_scale=sm_scale, lse=lse)
    return stats.head_recall[0].tolist(), stats.mean_density()


def measure_prompt(model: Any, prompt: ruler.RulerPrompt, methods: list[Any], num_rows: int,
                   seed: int) -> dict[str, dict[str, Any]]:
    """Per method: per row set the per-(layer, head) recalls and output errors, and the spread rows' density."""
    ids = torch.tensor([prompt.input_ids], device=model.device)
    n = ids.shape[1]
    rows = {"pieces": piece_rows(prompt), "spread": sample_rows(n, n, num_rows, seed=seed)}
    results: dict[str, dict[str, Any]] = {
        m.name: {"pieces": [], "spread": [], "density": [], **{key: [] for key in ERROR_KEYS.values()}}
        for m in methods}

    def on_layer(captured: Any) -> None:
        q, k, v, scale = captured.q, captured.k, captured.v, captured.sm_scale
        lse = {name: causal_logsumexp(q, k, chosen.to(q.device), sm_scale=scale) for name, chosen in rows.items()}
        for method in methods:
            index = method.index(q, k, layer=captured.layer, sm_scale=scale)
            for name, chosen in rows.items():
                values, density = per_head_recall(q, k, index, chosen, scale, lse[name])
                results[method.name][name].extend(values)
                error = attention_output_error(q, k, v, index, chosen.to(q.device), sm_scale=scale)
                results[method.name][ERROR_KEYS[name]].extend(error[0].mean(-1).tolist())
                if name == "spread":
                    results[method.name]["density"].append(density)
        logger.info("layer %d done", captured.layer)

    capture_qk(model, ids, on_layer=on_layer, values=True)
    return results


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"mean": sum(values) / len(values), "p10": ordered[int(0.1 * (len(ordered) - 1))], "min": ordered[0],
            "p90": ordered[int(0.9 * (len(ordered) - 1))], "max": ordered[-1]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", help="zoo name, .gguf file or HF folder")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--tasks", default="niah_multivalue,vt", help="RULER-style tasks with inserted sentences")
    parser.add_argument("--samples", type=int, default=1, help="prompts per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=128, help="spread rows per prompt")
    parser.add_argument("--haystack", default="pg")
    parser.add_argument("--method", action="append", required=True, metavar="NAME=PATTERN:key=value,...",
                        help="an estimator (as `longinfer eval recall --method`); repeatable")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    parser.add_argument("--yarn", type=float, default=None)
    parser.add_argument("--out", required=True, type=Path)
    return parser


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def write_report(out: Path, records: list[dict[str, Any]], command: str) -> Path:
    """Markdown: per method, recall (mean / p10 / min) and output error (mean / p90 / max) at piece
    rows and at spread rows, over all prompts (records without errors, from before they were
    measured, show a dash)."""
    keys = ("pieces", "spread", "density", *ERROR_KEYS.values())
    by_method: dict[str, dict[str, list[float]]] = {}
    for record in records:
        entry = by_method.setdefault(record["method"], {key: [] for key in keys})
        for key in keys:
            entry[key].extend(record.get(key, []))
    rows = []
    for name, entry in by_method.items():
        cells = [name]
        for row_set in ROW_SETS:
            s = summary(entry[row_set])
            cells.append(f"{s['mean']:.3f} / {s['p10']:.3f} / {s['min']:.2f}")
        for row_set in ROW_SETS:
            errors = entry[ERROR_KEYS[row_set]]
            s = summary(errors) if errors else None
            cells.append(f"{s['mean']:.3f} / {s['p90']:.3f} / {s['max']:.2f}" if s else "—")
        cells.append(f"{100 * sum(entry['density']) / len(entry['density']):.1f}%")
        rows.append(cells)
    prompts = sorted({record["prompt"] for record in records})
    header = records[0] if records else {}
    lines = [
        "# Recall and output error at the rows a RULER-style task depends on vs at spread rows",
        "",
        f"- model: {header.get('model')}, length {header.get('length')}, device {header.get('device')}, "
        f"torch {header.get('torch')}; prompts: {', '.join(prompts)}",
        f"- command: `{command}`",
        "- pieces = rows inside the inserted needle / assignment sentences; spread = rows sampled across "
        "the prompt. Recall mean / p10 / min over every (layer, query head), each head's value the mean over "
        "the set's rows; output error = ||o_index - o|| / ||o|| of the attention output, mean / p90 / max the "
        "same way; density on the spread rows.",
        "",
        markdown_table(["method", "recall at pieces", "recall at spread rows", "output error at pieces",
                        "output error at spread rows", "density"], rows),
    ]
    path = out / "ruler_rows_recall.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    methods = [recall_eval.parse_method_spec(spec) for spec in args.method]
    command = "python3 benchmarks/ruler_rows_recall.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / RESULTS
    done = {(r["prompt"], r["method"]) for r in _records(store)}
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model, tokenizer = zoo.load(args.model, dtype=dtype, device=args.device, yarn_factor=args.yarn)
    methods = recall_eval.resolve_methods(methods, model.config, model_id=args.model)  # plan methods load their plan
    haystack = load_haystack(args.haystack)
    device = str(next(model.parameters()).device)
    for task in args.tasks.split(","):
        for sample in range(args.samples):
            name = f"{task}/L{args.length}/i{sample}/s{args.seed}"
            pending = [m for m in methods if (name, m.name) not in done]
            if not pending:
                continue
            prompt = ruler.generate(task, tokenizer, haystack, args.length, seed=args.seed, sample=sample)
            logger.info("%s: %d piece rows, %d methods", name, sum(b - a for a, b in prompt.pieces), len(pending))
            results = measure_prompt(model, prompt, pending, args.rows, args.seed)
            with store.open("a") as handle:
                for method in pending:
                    handle.write(json.dumps({
                        "prompt": name, "method": method.name, "definition": method.describe(), "model": args.model,
                        "length": args.length, "device": device, "torch": torch.__version__,
                        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                        "command": command, **results[method.name]}) + "\n")
    report = write_report(args.out, _records(store), command)
    print(report.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
