"""Cost of the online vertical-slash estimate against the sparse attention it plans (issue 3).

Usage (GPU; writes ``estimator-cost-<device>.json`` and ``.md`` into ``--out`` after every case and
resumes from them)::

    python benchmarks/estimator_cost.py --lengths 8192,32768,131072 --out benchmarks/results

    python benchmarks/estimator_cost.py --device cpu --lengths 1024 --out /tmp/est   # smoke test

One layer: Hq=32, Hkv=8, D=128, B=1, bf16 (float32 on the CPU). Times are medians of
``triton.testing.do_bench`` on CUDA (median of a few wall-clock runs on the CPU) of:

- ``estimate``: :func:`~longinfer.patterns.vertical_slash.estimate_vertical_slash`, all of it;
- ``masses``: :func:`~longinfer.patterns.vertical_slash.estimate_masses` (the Triton kernel on CUDA)
  and ``kernel``: the kernel alone on precomputed positions; ``masses_torch``: the torch path
  (the reference, what ran before the kernel);
- ``select``: the budget alone (:func:`~longinfer.patterns.vertical_slash.select_items` + packing);
- ``sparse``: :func:`longinfer.ops.vertical_slash_attention` at the estimated index (index build
  included), and ``dense``: :func:`longinfer.ops.dense_attention`, once per length.

Target: ``estimate / sparse <= 0.1`` at 128K. Configs: the default plan's pattern
(:data:`longinfer.plans.schema.DEFAULT_PATTERN_CONFIG`, coverage tau 0.9 from 64 strided queries plus,
on these prefills of 16K+ tokens, the last 64: ``question_from``) and the same without the last 64 (the
default until session 24), MInference's fixed VS(1000, 6096) from the last 64 queries, and the default and
the fixed rule with ``last_q=256``.

Inputs are structured, not random (random q/k spread the top slashes over all offsets and make
the coverage budget take everything): keys of sinks and of ~N/64 random columns per KV head lean
on a direction every query shares, and every query adds the keys at offsets 0..3 and at four far
offsets per KV head, so the attention has columns, a local band and a few far diagonals over a
diffuse tail. The kept counts and the kernel density are recorded with each case.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longinfer.patterns import vertical_slash as vs  # noqa: E402
from longinfer.patterns._estimate_kernel import estimate_masses_triton  # noqa: E402
from longinfer.patterns.vertical_slash import VerticalSlashConfig  # noqa: E402
from longinfer.plans.schema import DEFAULT_PATTERN_CONFIG  # noqa: E402

HQ, HKV, D = 32, 8, 128
FIXED = VerticalSlashConfig(num_vertical=1000, num_slash=6096, last_q=64)
CONFIGS: dict[str, VerticalSlashConfig] = {
    "default coverage(4096, 8192, tau 0.9) strided lq64 + last 64": DEFAULT_PATTERN_CONFIG,
    "default without the last 64 (strided lq64)": dataclasses.replace(DEFAULT_PATTERN_CONFIG, question_from=0),
    "fixed(1000, 6096) last lq64": FIXED,
    "default coverage lq256": dataclasses.replace(DEFAULT_PATTERN_CONFIG, last_q=256, question_from=0),
    "fixed(1000, 6096) last lq256": dataclasses.replace(FIXED, last_q=256),
}


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of ``fn``: ``do_bench`` on CUDA, wall clock (1 warm-up, 3 runs) on the CPU."""
    if device.type == "cuda":
        import triton

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        runs.append(1e3 * (time.perf_counter() - start))
    return statistics.median(runs)


def structured_qkv(n: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """``q [1, HQ, n, D]``, ``k, v [1, HKV, n, D]`` with planted columns, a local band and far diagonals."""
    gen = torch.Generator().manual_seed(seed)
    group = HQ // HKV
    k = torch.randn(1, HKV, n, D, generator=gen)
    q = torch.randn(1, HQ, n, D, generator=gen) * 0.5
    v = torch.randn(1, HKV, n, D, generator=gen)
    shared = torch.nn.functional.normalize(torch.randn(HKV, D, generator=gen), dim=-1)  # [HKV, D]
    lean = torch.zeros(HKV, n)
    lean[:, :4] = 6.0  # sinks
    for head in range(HKV):  # a few KV heads: setup only
        columns = torch.randint(4, n, (max(n // 64, 1),), generator=gen)
        lean[head, columns] = 3.0 + 2.0 * torch.rand(columns.numel(), generator=gen)
    k += lean[None, :, :, None] * shared[None, :, None, :]
    q += 3.0 * shared.repeat_interleave(group, 0)[None, :, None, :]
    for head in range(HKV):
        far = torch.randint(64, max(n // 4, 65), (4,), generator=gen).tolist()
        for number, offset in enumerate([0, 1, 2, 3] + far):
            weight = 0.35 if number < 4 else 0.25
            q[0, head * group: (head + 1) * group, offset:] += weight * k[0, head, : n - offset]
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


def kept_counts(selection: vs.VerticalSlashSelection) -> dict[str, float]:
    """Mean / max kept columns and diagonals per head, and the kernel's share of causal pairs (estimate)."""
    verticals = (selection.vertical >= 0).sum(-1).double()
    slashes = (selection.slash >= 0).sum(-1).double()
    n, bs = selection.k_len, selection.block_size
    # a column costs ~n/2 pairs on average, a slash ~bs pairs per query; the causal total is n^2/2
    density = ((verticals * n / 2 + slashes * bs * n) / (n * n / 2)).clamp(max=1.0)
    return {"verticals_mean": float(verticals.mean()), "verticals_max": float(verticals.max()),
            "slashes_mean": float(slashes.mean()), "slashes_max": float(slashes.max()),
            "density_estimate": float(density.mean())}


def measure(n: int, name: str, config: VerticalSlashConfig, tensors, device: torch.device,
            with_torch_path: bool) -> dict:
    """Every timing of one (length, config) case."""
    q, k, v = tensors
    config = config.for_call(n, n)  # a prefill of n tokens: the floors and column sharing it runs
    row: dict = {"n": n, "config": name, "params": dataclasses.asdict(config)}
    positions = vs.estimation_positions(n, n, config.last_q, config.query_sampling, device=device)
    row["estimate_ms"] = time_ms(lambda: vs.estimate_vertical_slash(q, k, config), device)
    row["masses_ms"] = time_ms(lambda: vs.estimate_masses(q, k, config), device)
    row["backend"] = vs.estimate_backend(q, k)
    if row["backend"] == "triton":
        row["kernel_ms"] = time_ms(lambda: estimate_masses_triton(q, k, positions, positions, sink=config.sink,
                                                                  local=config.local, scale=D ** -0.5), device)
    if with_torch_path:
        row["masses_torch_ms"] = time_ms(lambda: vs.estimate_masses(q, k, config, backend="torch"), device)
    columns, diagonals = vs.estimate_masses(q, k, config)

    def select() -> tuple[torch.Tensor, torch.Tensor]:
        items = vs.select_items(columns, diagonals, config)
        return (vs._pack_taken(items.vertical, items.vertical_taken, config.num_vertical),
                vs._pack_taken(items.slash, items.slash_taken, config.num_slash))

    row["select_ms"] = time_ms(select, device)
    selection = vs.estimate_vertical_slash(q, k, config)
    row.update(kept_counts(selection))
    if device.type == "cuda":
        from longinfer.ops import build_vertical_slash_index, vertical_slash_attention

        row["index_ms"] = time_ms(lambda: build_vertical_slash_index(selection.vertical, selection.slash, n,
                                                                     config.block_size), device)
        row["sparse_ms"] = time_ms(lambda: vertical_slash_attention(q, k, v, selection.vertical, selection.slash,
                                                                    block_size=config.block_size), device)
        row["estimate_over_sparse"] = row["estimate_ms"] / row["sparse_ms"]
    print(json.dumps(row), flush=True)
    return row


def fmt_cell(value) -> str:
    return "—" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def report_header(title: str, meta: dict, inputs: str = "") -> list[str]:
    """A report's first lines: its title, then the device, date, versions, layer shape, ``inputs`` and command."""
    return [f"# {title}", "", f"{meta['device']}, {meta['date']}, torch {meta['torch']}, triton {meta['triton']}; "
            f"Hq={HQ}, Hkv={HKV}, D={D}, B=1, {meta['dtype']}{inputs}. Command: `{meta['command']}`", ""]


def add_case_arguments(parser: argparse.ArgumentParser, lengths: str) -> None:
    """The options every script on :func:`run_cases` takes: ``--lengths``, ``--device``, ``--fresh``."""
    parser.add_argument("--lengths", default=lengths)
    parser.add_argument("--device", default="cuda", help="cuda (timings) or cpu (smoke test, torch path)")
    parser.add_argument("--fresh", action="store_true", help="ignore results already in --out")


def render_markdown(meta: dict, rows: list[dict], dense: dict[str, float]) -> str:
    """A readable report of the rows so far."""
    lines = [
        *report_header("Vertical-slash estimator cost", meta),
        "Milliseconds (median). estimate = estimate_vertical_slash end to end; masses = estimate_masses "
        "(kernel on CUDA); kernel = the Triton kernel alone; masses_torch = the torch path; select = the budget "
        "alone; sparse = vertical_slash_attention at the estimated index; ratio = estimate / sparse (target <= 0.1).",
        "",
        "| N | config | estimate | masses | kernel | masses_torch | select | sparse | ratio | dense | verticals | slashes | density~ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [row["n"], row["config"], row["estimate_ms"], row["masses_ms"], row.get("kernel_ms"),
                 row.get("masses_torch_ms"), row["select_ms"], row.get("sparse_ms"), row.get("estimate_over_sparse"),
                 dense.get(str(row["n"])), row["verticals_mean"], row["slashes_mean"], row["density_estimate"]]
        lines.append("| " + " | ".join(fmt_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def run_cases(report: str, lengths: str, configs: dict, measure_case: Callable[..., dict],
              render: Callable[[dict, list[dict], dict[str, float]], str], device_name: str, out: str,
              fresh: bool) -> int:
    """Time every (length, config) case on the structured inputs and write the report after each.

    ``measure_case(n, key, config, tensors, device) -> row``; ``render(meta, rows, dense_ms) -> markdown``.
    Writes ``<report>-<device>.json`` and ``.md`` into ``out``, resumes from them unless ``fresh``, times dense
    attention once per length on CUDA, and prints progress to stderr (the first calls at a length compile and
    autotune the kernels: minutes at 128K). Shared by this script and ``tile_keys_cost.py``.
    """
    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU; use --device cpu for the smoke test")
    import triton

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    meta = {"device": name, "date": dt.date.today().isoformat(), "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(), "dtype": str(dtype).removeprefix("torch."),
            "command": "python " + " ".join(sys.argv)}
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"{report}-{name.replace(' ', '-').replace('/', '-')}"
    rows: list[dict] = []
    dense: dict[str, float] = {}
    if stem.with_suffix(".json").exists() and not fresh:  # resume
        saved = json.loads(stem.with_suffix(".json").read_text())
        rows, dense = saved["rows"], saved["dense_ms"]
    done = {(row["n"], row["config"]) for row in rows}
    started = time.perf_counter()

    def write() -> None:
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "dense_ms": dense}, indent=1))
        stem.with_suffix(".md").write_text(render(meta, rows, dense))

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr, flush=True)

    for n in (int(x) for x in lengths.split(",") if x):
        tensors = tuple(structured_qkv(n, device, dtype))
        progress(f"N={n}: inputs ready")
        if device.type == "cuda" and str(n) not in dense:
            from longinfer.ops import dense_attention

            dense[str(n)] = time_ms(lambda t=tensors: dense_attention(*t), device)
            write()
            progress(f"N={n}: dense timed (the kernel autotuned for this length)")
        for key, config in configs.items():
            if (n, key) not in done:
                rows.append(measure_case(n, key, config, tensors, device))
                write()
                progress(f"N={n}: {key} measured")
        del tensors
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(render(meta, rows, dense))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_arguments(parser, "8192,32768,131072")
    parser.add_argument("--configs", default="", help="comma-separated substrings of config names (default all)")
    parser.add_argument("--no-torch-path", action="store_true", help="skip timing the torch reference path")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    wanted = [c for c in args.configs.split(",") if c]
    configs = {key: cfg for key, cfg in CONFIGS.items() if not wanted or any(w in key for w in wanted)}

    def measure_case(n, key, config, tensors, device):
        return measure(n, key, config, tensors, device, not args.no_torch_path)

    return run_cases("estimator-cost", args.lengths, configs, measure_case, render_markdown, args.device, args.out,
                     args.fresh)


if __name__ == "__main__":
    raise SystemExit(main())
