"""Cost of the online tile-keys estimate, stage by stage, against the sparse attention it plans (issues 3, 6).

Usage (GPU; writes ``tile-keys-cost-<device>.json`` and ``.md`` into ``--out`` after every case and resumes
from them)::

    python benchmarks/tile_keys_cost.py --lengths 32768,131072 --out docs/results/tile-keys-cost

(Short lengths first: the first call at each length compiles and autotunes the kernels, minutes at 128K; the
progress goes to stderr.)

    python benchmarks/tile_keys_cost.py --device cpu --lengths 1024 --out /tmp/tkc   # smoke test (torch path)

One layer: Hq=32, Hkv=8, D=128, B=1 (issue 3's cost setting), bf16 (float32 on the CPU), the structured q/k of
``estimator_cost.py`` (sinks, ~N/64 planted columns, a local band, far diagonals: random q/k would make the
index meaningless). Times are medians of ``triton.testing.do_bench`` (wall clock on the CPU) of:

- ``estimate``: :func:`~longinfer.patterns.tile_keys.estimate_tile_keys`, all of it;
- ``pool``: the pooled queries (:func:`~longinfer.patterns.tile_keys._pooled_queries` and the cast);
- ``lse``: pass 1, each pooled query's log-sum-exp over its causal keys
  (:func:`~longinfer.patterns._estimate_kernel.row_logsumexp2`);
- the whole estimate again with pass 2 laid out differently (:data:`VARIANTS`: its keys split over programs or
  not, every cap level counted in the first counting pass), to choose the default;
- ``sparse``: :func:`longinfer.ops.tile_keys_attention` at the estimated index, and ``dense``:
  :func:`longinfer.ops.dense_attention` once per length.

``ratio`` = estimate / sparse (issue 3's target: <= 0.1 at 128K). ``density`` = the kernel's pairs over causal
pairs (:func:`longinfer.plans.search.tile_keys_pairs`); ``keys`` = kept ids per (head, tile) besides the band.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from estimator_cost import D, add_case_arguments, fmt_cell, report_header, run_cases, time_ms  # noqa: E402

from longinfer.ops.index import tile_last_rows  # noqa: E402
from longinfer.patterns import _tile_keys_kernel as kernels  # noqa: E402
from longinfer.patterns.tile_keys import TileKeysConfig, _pooled_queries, estimate_tile_keys  # noqa: E402

CONFIGS: dict[str, TileKeysConfig] = {
    "tk3": TileKeysConfig(threshold=3.0),
    "tk1.5": TileKeysConfig(threshold=1.5),
    "tk0.75": TileKeysConfig(threshold=0.75),
    "tk0.4": TileKeysConfig(threshold=0.4),
    "tk1.5q2": TileKeysConfig(threshold=1.5, queries=2),
    "tk3q4": TileKeysConfig(threshold=3.0, queries=4),
    "tk16q64": TileKeysConfig(threshold=16.0, pool=64, queries=64),  # every row scored
    "tk16q64d64": TileKeysConfig(threshold=16.0, pool=64, queries=64, score_dims=64),  # on half of D=128
}


# Pass-2 layouts timed (``_tile_keys_kernel.KEYS_PER_SPLIT``, ``TILE_ORDER``, ``COUNT_CAP_LEVELS_FIRST``); the
# first is the library's default. Session 30 (H200) timed longest-first orders too: within 3% of ascending.
VARIANTS: dict[str, tuple[int, str, bool]] = {
    "split4k": (4096, "ascending", False),
    "serial": (0, "ascending", False),
    "split4k_levels": (4096, "ascending", True),
}


def _estimate_ms(q: torch.Tensor, k: torch.Tensor, config: TileKeysConfig, device: torch.device,
                 variant: tuple[int, str, bool]) -> float:
    """Median time of the whole estimate with pass 2 laid out as ``variant``."""
    saved = kernels.KEYS_PER_SPLIT, kernels.TILE_ORDER, kernels.COUNT_CAP_LEVELS_FIRST
    kernels.KEYS_PER_SPLIT, kernels.TILE_ORDER, kernels.COUNT_CAP_LEVELS_FIRST = variant
    try:
        return time_ms(lambda: estimate_tile_keys(q, k, config), device)
    finally:
        kernels.KEYS_PER_SPLIT, kernels.TILE_ORDER, kernels.COUNT_CAP_LEVELS_FIRST = saved


def _stage_timings(q: torch.Tensor, k: torch.Tensor, config: TileKeysConfig, device: torch.device) -> dict[str, float]:
    """The pooled queries and pass 1 alone."""
    n, scale = k.shape[2], D ** -0.5
    pooled = _pooled_queries(q, 0, n, config).to(k.dtype).contiguous()
    rows = torch.arange(pooled.shape[2], device=device, dtype=torch.int32)
    positions = tile_last_rows(rows // config.queries, config.block_size, n).to(torch.int32)
    return {"pool_ms": time_ms(lambda: _pooled_queries(q, 0, n, config).to(k.dtype), device),
            "lse_ms": time_ms(lambda: kernels.row_logsumexp2(pooled, k, rows, positions, scale), device)}


def measure(n: int, name: str, config: TileKeysConfig, tensors, device: torch.device) -> dict:
    """Every timing of one (length, config) case."""
    from longinfer.plans.search import tile_keys_pairs

    q, k, v = tensors
    row: dict = {"n": n, "config": name, "params": dataclasses.asdict(config)}
    row["estimate_ms"] = time_ms(lambda: estimate_tile_keys(q, k, config), device)
    selection = estimate_tile_keys(q, k, config)
    counts = selection.index.column_count
    row["keys_mean"] = float(counts.double().mean())
    row["keys_max"] = int(counts.max())
    row["density"] = float(tile_keys_pairs(selection, n).double().mean() / (n * (n + 1) / 2))
    if device.type == "cuda":
        from longinfer.ops import tile_keys_attention

        row.update(_stage_timings(q, k, config, device))
        row["variants_ms"] = {key: _estimate_ms(q, k, config, device, variant) for key, variant in VARIANTS.items()}
        row["sparse_ms"] = time_ms(lambda: tile_keys_attention(q, k, v, index=selection.index, local=config.local,
                                                               block_size=config.block_size), device)
        row["estimate_over_sparse"] = row["estimate_ms"] / row["sparse_ms"]
    print(json.dumps(row), flush=True)
    return row


def render_markdown(meta: dict, rows: list[dict], dense: dict[str, float]) -> str:
    """A readable report of the rows so far."""
    lines = [
        *report_header("Tile-keys estimator cost", meta, ", structured q/k"),
        "Milliseconds (median of `triton.testing.do_bench`). estimate = estimate_tile_keys end to end (the "
        "default layout); pool = the pooled queries; lse = pass 1; then the whole estimate with pass 2 laid out "
        "as: " + ", ".join(f"{key} = KEYS_PER_SPLIT {per} / {order}" + (" / cap levels counted first" if first else "")
                           for key, (per, order, first) in VARIANTS.items())
        + "; sparse = tile_keys_attention at the estimated index; ratio = estimate / sparse (target <= 0.1); "
        "density = kernel pairs (rounded up to its key blocks) / causal pairs.",
        "",
        "| N | config | estimate | pool | lse | " + " | ".join(VARIANTS) + " | sparse | ratio | dense | keys mean / max "
        "| density |",
        "|---" * (10 + len(VARIANTS)) + "|",
    ]
    for row in rows:
        variants = row.get("variants_ms", {})
        cells = [row["n"], row["config"], row["estimate_ms"], row.get("pool_ms"), row.get("lse_ms"),
                 *(variants.get(key) for key in VARIANTS), row.get("sparse_ms"), row.get("estimate_over_sparse"),
                 dense.get(str(row["n"])), f"{row['keys_mean']:.0f} / {row['keys_max']}", row["density"]]
        lines.append("| " + " | ".join(fmt_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_arguments(parser, "32768,131072")
    parser.add_argument("--configs", default="", help="comma-separated config names (default all)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    unknown = [c for c in args.configs.split(",") if c and c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    configs = {key: cfg for key, cfg in CONFIGS.items() if not args.configs or key in args.configs.split(",")}
    # a late lookup, so that a patched ``measure`` (the tests) is the one called
    return run_cases("tile-keys-cost", args.lengths, configs, lambda *case: measure(*case), render_markdown,
                     args.device, args.out, args.fresh)


if __name__ == "__main__":
    raise SystemExit(main())
