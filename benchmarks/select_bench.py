"""The vertical-slash budget alone: torch path vs Triton kernels, on structured masses (no model).

Masses shaped like an estimate's at a 4K turn over 64K (Qwen2.5-1.5B layer: 12 query heads):
column mass falls as a power of a random rank (a few heavy key columns, a long light tail), the
first keys heavier (sinks), diagonal mass falls as a power of the offset (local attention) plus a
few planted distant diagonals; each kind sums to 1. The exponents make the default budget take
about 2,000 columns and 2,000 diagonals per head at 64K (the default plan's turn density is 15%).
Both backends must give the same index (checked); the time is what one layer's selection costs
(`turn_kernels.py` times it on a real model's masses). Timing: each backend replayed from a CUDA
graph, median of CUDA-event times (:func:`turn_kernels.graph_time`). ``--sweep`` adds the
parallel path at other launch choices (:data:`SWEEP`), each checked against the torch index too.
``--caps 1024,2048`` makes the caps bind on every row, so the capped rows' path (round 1) is timed.

    python3 benchmarks/select_bench.py --sweep --out $OUT/select-bench
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from turn_kernels import graph_time

from longinfer.patterns import vertical_slash as vs
from longinfer.patterns._select_kernel import ParallelOptions, select_packed_triton
from longinfer.plans.schema import DEFAULT_PATTERN_CONFIG

# --sweep: the parallel path's launch choices (chunk, warps, programs) timed besides the default
SWEEP = (*(ParallelOptions(chunk, warps, programs) for chunk in (256, 512) for warps in (4, 8)
           for programs in (256, 512, 1024)),
         *(ParallelOptions(compact_after=done) for done in (1, 2, 3)),
         *(ParallelOptions(chunk=256, compact_after=done) for done in (1, 2)),
         *(ParallelOptions(capped_programs=programs) for programs in (128, 1024, 1536)),
         # the radix passes' digit sums reduced per chunk (256: the default before session 22), and
         # other chunks with them reduced once (the per-lane sums' registers grow with the chunk)
         ParallelOptions(chunk=256, defer_sums=False), ParallelOptions(chunk=128, defer_sums=False),
         ParallelOptions(chunk=64), ParallelOptions(chunk=128, warps=2))


def structured_masses(heads: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(columns, diagonals)`` ``[1, heads, n]`` float32 on CUDA, as the module docstring says."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rank = torch.argsort(torch.rand(heads, n, device="cuda", generator=gen), dim=-1).float() + 1.0
    columns = rank ** -0.85
    columns[:, :4] += 0.02  # sinks
    offsets = torch.arange(n, device="cuda", dtype=torch.float32)
    diagonals = (offsets + 1.0) ** -0.75 + 1e-7 * torch.rand(heads, n, device="cuda", generator=gen)
    planted = torch.randint(200, n, (heads, 16), device="cuda", generator=gen)
    diagonals.scatter_add_(-1, planted, torch.full(planted.shape, 0.002, device="cuda"))
    return ((columns / columns.sum(-1, keepdim=True))[None].contiguous(),
            (diagonals / diagonals.sum(-1, keepdim=True))[None].contiguous())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="69632,131072", help="keys per row")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="also time the parallel path's other launch choices")
    parser.add_argument("--caps", default=None, metavar="V,S",
                        help="column and diagonal caps instead of the default plan's (1024,2048 binds on every row: "
                             "times round 1, the capped rows' path)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    config = DEFAULT_PATTERN_CONFIG.for_call(4096, 4096)  # the selection of a turn (no floor; the masses are synthetic)
    if args.caps:
        num_vertical, num_slash = (int(x) for x in args.caps.split(","))
        config = dataclasses.replace(config, num_vertical=num_vertical, num_slash=num_slash)
    rows: list[dict[str, Any]] = []
    for n in (int(x) for x in args.lengths.split(",")):
        columns, diagonals = structured_masses(args.heads, n, seed=n)
        expected = vs.select_packed(columns, diagonals, config, backend="torch")
        got = vs.select_packed(columns, diagonals, config, backend="triton")
        row = {"keys": n, "heads": args.heads,
               "same index": all(torch.equal(a, b) for a, b in zip(expected, got)),
               "columns taken (mean)": float((expected[0] >= 0).sum(-1).float().mean()),
               "diagonals taken (mean)": float((expected[1] >= 0).sum(-1).float().mean())}
        for backend in ("torch", "triton"):
            row[f"{backend} ms"] = graph_time(
                lambda backend=backend: vs.select_packed(columns, diagonals, config, backend=backend), args.repeats)
        for options in SWEEP if args.sweep else ():
            def run(options: ParallelOptions = options) -> tuple[torch.Tensor, torch.Tensor]:
                return select_packed_triton(columns, diagonals, num_vertical=config.num_vertical,
                                            num_slash=config.num_slash, sink=config.sink, local=config.local,
                                            coverage=True, tau=config.tau, options=options)
            name = (f"chunk={options.chunk} warps={options.warps} programs={options.programs} "
                    f"compact_after={options.compact_after} capped_programs={options.capped_programs}"
                    f"{'' if options.defer_sums else ' per-chunk sums'}")
            try:  # one launch choice failing to compile or run must not lose the others
                row[f"{name} same index"] = all(torch.equal(a, b) for a, b in zip(expected, run()))
                row[f"{name} ms"] = graph_time(run, args.repeats)
            except Exception as error:  # noqa: BLE001 - reported in the row, the sweep goes on
                row[f"{name} error"] = f"{type(error).__name__}: {error}"[:300]
                print(f"{name}: {row[f'{name} error']}", flush=True)
        rows.append(row)
        print(row, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__,
            "command": "python3 benchmarks/select_bench.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "caps": f"{config.num_vertical} / {config.num_slash}", "rows": rows}
    (out / "select_bench.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "select_bench.md").write_text(render_markdown(data))
    return 0


def _sweep_cell(row: dict[str, Any], name: str) -> str:
    """One sweep cell: the time (``*`` when the index differs from the torch path's) or the error."""
    if f"{name} ms" not in row:
        return "error" if f"{name} error" in row else "—"
    return f"{row[name + ' ms']:.3f}{'' if row[name + ' same index'] else ' *'}"


def render_markdown(data: dict[str, Any]) -> str:
    """The report: torch vs the default parallel path per length, then the sweep if run."""
    rows = data["rows"]
    lines = ["# Vertical-slash budget alone: torch path vs Triton kernels", "",
             f"- Date: {data['date']}. Device: {data['device']}. torch {data['torch']}, triton {data['triton']}.",
             f"- Command: `{data['command']}`",
             "- Masses: structured (power-law columns with sinks, power-law diagonals with planted ones), "
             f"coverage budget 0.9 with at most {data['caps']} columns / diagonals.",
             "- Timing: one call replayed from a CUDA graph, median of CUDA-event times.", "",
             "| keys | heads | torch ms | triton ms | speedup | same index | columns taken | diagonals taken |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['keys']} | {r['heads']} | {r['torch ms']:.3f} | {r['triton ms']:.3f} | "
              f"{r['torch ms'] / r['triton ms']:.1f}x | {r['same index']} | {r['columns taken (mean)']:.0f} | "
              f"{r['diagonals taken (mean)']:.0f} |" for r in rows]
    sweep = list(dict.fromkeys(key.rsplit(" ", 1)[0] for r in rows for key in r if key.startswith("chunk=")
                               and key.endswith((" ms", " error"))))
    if sweep:
        lines += ["", "## Parallel path by launch choice (ms; `*` = index differs from the torch path's)", "",
                  "| launch choice | " + " | ".join(str(r["keys"]) for r in rows) + " |",
                  "|---" * (len(rows) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(_sweep_cell(r, name) for r in rows) + " |" for name in sweep]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
