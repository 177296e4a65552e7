"""Recall-density frontier of the estimators on a real model (GPU run; also runs on CPU at small sizes).

One command measures, for every layer and head, how much of the true attention mass each
estimator configuration keeps and at what density, next to the key- and block-level oracles
(:mod:`longinfer.eval.recall`), writes ``recall.jsonl`` (resumable: rerun the same command after a
kill), ``recall.md``, ``recall_summary.{csv,json}``, ``recall_heads.csv`` and two PNGs to ``--out``,
and prints a compact table.

GPU (the model file carried to the machine, the PG-essay wheel in ``<cache>/corpora/``)::

    PYTHONPATH=/tmp/gg:. python3 benchmarks/recall_frontier.py --model qwen2.5-coder-0.5b \\
        --gguf /tmp/m/model.gguf --cache-dir .device/recall/cache --length 32768 --rows 128 --out $OUT/q05-32k

CPU smoke run (SmolLM2 from the zoo cache)::

    python benchmarks/recall_frontier.py --model smollm2-135m --length 2048 --rows 32 --out /tmp/recall-smol

All options: ``--help`` (the same as ``longinfer eval recall``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch

from longinfer.eval import recall
from longinfer.eval.report import markdown_table

PROGRAM = "python3 benchmarks/recall_frontier.py"
GIB = 1024**3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    recall.add_frontier_arguments(parser)
    parser.set_defaults(model="qwen2.5-coder-0.5b", length=32768)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _memory_lines(model: torch.nn.Module, length: int, max_density: float) -> list[str]:
    dtype = next(model.parameters()).dtype
    parts = recall.estimate_memory(model.config, length, dtype_bytes=torch.finfo(dtype).bits // 8,
                                   max_oracle_density=max_density,
                                   num_params=sum(p.numel() for p in model.parameters()))
    return [f"memory estimate at {length} tokens: " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in parts.items())]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    started = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.device = device
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        print(f"device: {torch.cuda.get_device_name(torch.device(device))}", flush=True)
    else:
        print("device: cpu", flush=True)
    recall.methods_from_args(args)  # fail on a bad method spec before the slow model load
    model, tokenizer = recall.load_model(args)
    load_s = time.perf_counter() - started
    print(f"model loaded in {load_s:.1f} s", flush=True)
    max_density = 0.0 if args.no_oracles else max(args.oracle_densities)
    for line in _memory_lines(model, args.length, max_density):
        print(line, flush=True)
    report, summaries = recall.run_from_args(args, program=PROGRAM, loaded=(model, tokenizer))
    elapsed = time.perf_counter() - started
    print()
    print(f"{args.model}, {args.length} tokens, {args.rows} rows/head, text {args.text_file or args.text}, "
          f"seed {args.seed}" + (f", YaRN x{args.yarn:g}" if args.yarn else ""))
    print(markdown_table(list(recall.SUMMARY_HEADER),
                         ([*row[:-1], row[-1][:60]] for row in recall.summary_table(summaries))))
    peak = f", peak GPU memory {torch.cuda.max_memory_allocated() / GIB:.2f} GiB" if device.startswith("cuda") else ""
    print(f"\nreport: {report}\ntotal {elapsed:.1f} s (load {load_s:.1f} s){peak}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
