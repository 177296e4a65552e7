"""Cold start: how long the first sparse prefill call of a fresh process takes, part by part.

A fresh machine compiles every Triton kernel a sparse call launches (the estimate's two passes and
its autotuned launch options, each radix pass of the selection, the index build, the attention
kernel) before the call returns. This times each part of one vertical-slash layer on its first call
(compile + autotune + run) and on its second (run only), with Triton's cache directory pointed at an
empty folder, so the first call pays what it pays on a fresh machine; then the whole layer as the
integration runs it (``attend_layer``, default plan). It also counts the compiled kernels the cache
holds afterwards. ``--cache-dir D`` uses (and fills) ``D`` instead: a second process given the same
folder measures a restart on a warm machine (kernels loaded from disk, autotuning redone).

    python benchmarks/cold_start.py --heads 14 --kv-heads 2 --head-dim 64 --length 16384 --out /tmp/cold

Inputs are structured, not random (:func:`longinfer.warmup.structured_qkv`: a local band every
row attends to, as real heads do), so the selection takes real paths.
Timing: ``time.perf_counter`` around each call, CUDA-synchronized (host wall time: compile time is
host time). On the CPU (Triton interpreter) the parts run but nothing compiles; the timings then
mean nothing and the script is only checked for running end to end.

Memory: q, k, v of one layer (``(Hq + 2 Hkv) * N * D`` elements) plus what each part needs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def timed_twice(fn: Callable[[], Any], synchronize: Callable[[], None]) -> dict[str, float]:
    """Seconds of the first and of the second call of ``fn`` (each synchronized)."""
    times = {}
    for name in ("first_s", "second_s"):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times[name] = time.perf_counter() - start
    return times


def count_compiled(cache_dir: Path) -> int:
    """Kernels Triton compiled into ``cache_dir`` (one ``.json`` metadata file each)."""
    return sum(1 for path in cache_dir.rglob("*.json") if not path.name.startswith("__grp__")
               and not path.name.endswith(".autotune.json"))


def measure(heads: int, kv_heads: int, head_dim: int, length: int, device: str, dtype_name: str) -> dict[str, Any]:
    """First and second call of each part of one default-plan vertical-slash layer."""
    import torch

    from longinfer import ops
    from longinfer.integrations.transformers import attend_layer
    from longinfer.ops.index import build_vertical_slash_index
    from longinfer.patterns import vertical_slash as vs
    from longinfer.plans import default_plan_for
    from longinfer.warmup import structured_qkv

    dtype = getattr(torch, dtype_name)
    q, k, v = structured_qkv(heads, kv_heads, head_dim, length, dtype, device)
    shape = {"num_layers": 1, "num_q_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim}
    plan = default_plan_for(shape, dense_below=0)
    layer = plan.layers[0]
    config = layer.heads[0].config.for_call(length, length)  # the rule of this prefill, as the estimate resolves it
    scale = head_dim ** -0.5
    on_cuda = q.device.type == "cuda"
    synchronize = torch.cuda.synchronize if on_cuda else (lambda: None)
    backend = "triton" if on_cuda else "torch"

    parts: dict[str, dict[str, float]] = {}
    state: dict[str, Any] = {}
    parts["estimate (masses)"] = timed_twice(
        lambda: state.update(masses=vs.estimate_masses(q, k, config, sm_scale=scale, backend=backend)), synchronize)
    parts["selection"] = timed_twice(
        lambda: state.update(selection=vs.select_packed_over_groups(*state["masses"], config, kv_heads,
                                                                    backend=backend)), synchronize)
    parts["index"] = timed_twice(
        lambda: state.update(index=build_vertical_slash_index(*state["selection"], length, config.block_size,
                                                              presorted=True)), synchronize)
    dense_from = layer.dense_from(length)
    parts["kernel"] = timed_twice(
        lambda: state.update(out=ops.vertical_slash_attention(q, k, v, index=state["index"],
                                                              block_size=config.block_size, sm_scale=scale,
                                                              dense_from=dense_from)), synchronize)
    parts["layer (attend_layer)"] = timed_twice(
        lambda: state.update(layer_out=attend_layer(plan, 0, q, k, v, scale=scale)), synchronize)
    mismatch = float((state["layer_out"].float() - state["out"].float()).abs().max())
    for shorter in (1, 37):  # new lengths whose divisibility by 16 differs: recompiles, if any, show here
        n = length - shorter
        q_n, k_n, v_n = (x[:, :, :n].contiguous() for x in (q, k, v))
        parts[f"layer at {n} tokens"] = timed_twice(lambda: attend_layer(plan, 0, q_n, k_n, v_n, scale=scale),
                                                    synchronize)
    return {"parts": parts, "layer_vs_parts_max_abs_diff": mismatch, "dense_from": dense_from, "tau": config.tau,
            "group_columns": config.group_columns}


def render_markdown(data: dict[str, Any]) -> str:
    rows = "\n".join(f"| {name} | {t['first_s']:.2f} | {t['second_s'] * 1e3:.2f} |"
                     for name, t in data["parts"].items())
    compiled = data.get("compiled_kernels")
    return "\n".join([
        "# Cold start of one sparse layer",
        "",
        f"- Date: {data['date']}. Device: {data['device']}. torch {data['torch']}, triton {data['triton']}.",
        f"- Shape: {data['heads']} query / {data['kv_heads']} KV heads, head_dim {data['head_dim']}, "
        f"{data['length']} tokens, {data['dtype']}; default plan (vertical-slash, coverage tau {data['tau']}"
        f"{', columns shared within each KV group' if data.get('group_columns') else ''}).",
        f"- Command: `{data['command']}`",
        f"- Triton cache: `{data['cache_dir']}`, {data['cached_at_start']} compiled kernels at start, "
        f"{compiled} afterwards.",
        "- Timing: host wall time of each call, CUDA-synchronized; the first call includes compiling and "
        "autotuning, the second does not. The layer runs after its parts, so its first call compiles only "
        "what the parts did not; the layer at two shorter lengths then shows what a new prompt length "
        "compiles.",
        "",
        "| part | first call (s) | second call (ms) |",
        "|---|---|---|",
        rows,
        "",
        f"The layer's output matches the parts' within {data['layer_vs_parts_max_abs_diff']:.2e} (max abs).",
        "",
    ])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=14)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="Triton cache folder to use and fill (default: a new empty one)")
    parser.add_argument("--out", type=Path, required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = "python3 benchmarks/cold_start.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    if "triton" in sys.modules:  # the cache folder must be set before triton is imported
        raise RuntimeError("triton is already imported: run cold_start.py in a fresh process")
    cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix="longinfer-cold-"))
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = str(cache_dir)
    cached_at_start = count_compiled(cache_dir)
    import torch
    import triton

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    data = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "command": command,
        "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "length": args.length,
        "dtype": args.dtype, "cache_dir": str(cache_dir), "cached_at_start": cached_at_start,
    }
    data.update(measure(args.heads, args.kv_heads, args.head_dim, args.length, device, args.dtype))
    data["compiled_kernels"] = count_compiled(cache_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cold_start.json").write_text(json.dumps(data, indent=1) + "\n")
    text = render_markdown(data)
    (args.out / "cold_start.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
