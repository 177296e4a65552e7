"""Where the attention time of a follow-up turn goes, layer by layer, on the model's own activations.

Issue 4's second turn (4,096 new tokens over a cached 65,536-token prefix) spends its attention
time in three places per layer: the index estimate, the index build and the sparse kernel. This
captures every layer's post-RoPE queries (the turn's rows) and keys (all positions) from one SDPA
forward over PG essays, then times, per layer and in one process:

- ``dense SDPA``: ``torch.nn.functional.scaled_dot_product_attention`` with the bottom-right causal
  mask (``causal_lower_right``) and the KV heads repeated, what a dense turn runs;
- ``layer (eager)`` / ``layer (graph)``: the plan's layer exactly as a patched model runs it
  (:func:`longinfer.integrations.transformers.attend_layer`), launched eagerly and replayed from
  a CUDA graph (the patched model's default; the graph time is the GPU time alone);
- its parts: ``estimate`` (masses and selection) with the diagonal-mass scratch and with
  float32 atomics (``DIAGONAL_SUMS``), ``masses`` alone both ways and through a
  float16 scratch (``DIAGONAL_SCRATCH_DTYPE``; whether its masses select the same index), the ``index``
  build (eager, so host time shows where it exceeds the GPU's; each also replayed from a CUDA
  graph, ``(graph)``: GPU time alone), the ``selection`` (the budget applied to the layer's
  masses) by the torch path and by the Triton kernels at their default launch choices and at the
  first ones (chunk 512, no compaction), graph-replayed (``selection backends agree``: 1.0 when all give the
  same index), the KV-group union of the columns by the Triton kernels and by the torch bitmap,
  the estimate's pass 1 at other key splits and launch options (``masses, pass 1 .. keys warps=..
  stages=..``) and its pass 2 at each fixed launch configuration
  (``pass 2 BLOCK_N=.. warps=.. stages=..``: the masses with the default diagonal sums, graph-replayed), the
  kernel on the index's columns alone, its diagonals alone and in its dense mode (where the kernel's
  time per computed pair goes, against SDPA's), with the K/V of covered columns loaded
  or skipped (``covered_in_loads``, the same launch otherwise), with the key ranges (dense mode,
  dense tail) as separate pipelined loops or one branching loop (``split_ranges``), with the slash
  chunks' scores masked in every chunk (``slash_masks="every"``, before session 20) or in none
  (``"none"``: wrong output, a timing bound only), and
  the ``kernel`` with the dense tail split over keys (the default; also in 16 ranges and
  graph-replayed, and over the index rebuilt with 32-key chunks: less padding at range ends),
  unsplit (one program per tail tile), without the tail, with the tail as a separate split-K launch
  (``tail separate``, :data:`longinfer.ops.sparse.TAIL_LAUNCH`), at other launch options (warps,
  stages; the default rows use the launch's fixed choice), and with 128-row and 32-row query tiles (the
  estimate rerun with ``block_size=128`` / ``32``, its own index; the slashes then cover whole tiles of
  that height, so 128-row tiles compute more pairs and 32-row tiles fewer).

``--variants core`` (the default) times the layer, its parts (estimate, masses, both selections, the
unions, index, kernel, the kernel's columns and diagonals alone) and the three slash-mask forms: every
layer in a few minutes. ``--variants all`` adds everything else above (about two minutes per layer:
the 28 layers of the 1.5B no longer fit one device call).

V is random normal (a kernel's time does not depend on V's values); q/k and so every index are the
model's. Timing: CUDA events, median of ``--repeats`` after 2 warm-ups
(:func:`longinfer.timing.median_cuda_ms`). Writes ``turn_kernels.json`` and ``turn_kernels.md``
into ``--out``: per-part totals over all layers, and the per-layer table.

    python3 benchmarks/turn_kernels.py --model qwen2.5-coder-1.5b --yarn 4 --out $OUT/turn-kernels
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch

from longinfer import ops
from longinfer.data import corpora
from longinfer.eval.capture import capture_qk
from longinfer.integrations.transformers import attend_layer
from longinfer.models import zoo
from longinfer.ops._checks import AttentionShape
from longinfer.ops._kernel import MODE_DENSE, MODE_VERTICAL_SLASH
from longinfer.ops._launch import launch
from longinfer.ops.index import build_vertical_slash_index
from longinfer.ops.sparse import default_tail_splits
from longinfer.patterns import _estimate_kernel, get_pattern
from longinfer.patterns._common import union_packed_over_groups
from longinfer.patterns._select_kernel import ParallelOptions, select_packed_triton
from longinfer.patterns._union_kernel import union_packed_over_groups_triton
from longinfer.patterns import vertical_slash as vs
from longinfer.plans.schema import Plan, default_plan_for
from longinfer.timing import median_cuda_ms

# Launch options to compare with the default choice: (num_warps, num_stages); the key tile
# of a vertical-slash launch is the index's chunk (64 keys for these tiles).
KERNEL_OPTIONS = ((4, 3), (4, 4), (8, 3))
TALL_KERNEL_OPTIONS = ((4, 3), (8, 3), (8, 2))
AGREE = "selection backends agree"  # 1.0 / 0.0 per layer among the timings; not a time
SAME_FP16 = "float16 scratch, same index"  # likewise: the float16 scratch's masses select the float32 index
FLAGS = {AGREE: "The Triton and torch selections give the same index on {} of {} layers.",
         SAME_FP16: "The masses through a float16 diagonal scratch select the same index as float32 on {} of {} layers."}
# The estimate's pass-2 configurations its autotuner chooses from: (BLOCK_N, num_warps, num_stages).
PASS_TWO_OPTIONS = tuple((c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                         for c in _estimate_kernel._masses_kernel_tuned.configs)
# Pass 1 (row statistics) alternatives: (keys per program, BLOCK_N, num_warps, num_stages); the first is
# session 15's default launch (2,048 keys, 128-key tiles, 4 warps, triton's default 3 stages: spills 128
# bytes per thread compiled for sm_90), the second the default since session 16 (64-key tiles, no
# spill, faster on the H200 at every length timed). Each row times the whole masses.
PASS_ONE_OPTIONS = ((2048, 128, 4, 3), (2048, 64, 4, 3), (1024, 64, 4, 3), (512, 64, 4, 3), (1024, 64, 8, 3),
                    (1024, 128, 8, 3))


def sdpa_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Dense attention of the last ``Nq`` positions as transformers' SDPA path runs it."""
    from torch.nn.attention.bias import causal_lower_right

    group = q.shape[1] // k.shape[1]
    k_rep, v_rep = (x.repeat_interleave(group, dim=1) for x in (k, v))
    mask = causal_lower_right(q.shape[2], k.shape[2])
    return lambda: torch.nn.functional.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=mask)


def graph_time(fn: Callable[[], Any], repeats: int) -> float:
    """GPU time of ``fn`` replayed from a CUDA graph (``fn`` must not synchronize)."""
    fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_cuda_ms(graph.replay, repeats=repeats, warmup=2)


def with_estimate_settings(fn: Callable[[], Any], **settings: Any) -> Callable[[], Any]:
    """``fn`` run with attributes of :mod:`longinfer.patterns._estimate_kernel` set to ``settings``
    (restored afterwards)."""
    def run() -> Any:
        saved = {name: getattr(_estimate_kernel, name) for name in settings}
        for name, value in settings.items():
            setattr(_estimate_kernel, name, value)
        try:
            return fn()
        finally:
            for name, value in saved.items():
                setattr(_estimate_kernel, name, value)
    return run


def with_diagonal_sums(sums: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run with the estimate's diagonal mass summed through ``sums`` (``"scratch"`` or ``"atomics"``)."""
    return with_estimate_settings(fn, DIAGONAL_SUMS=sums)


def with_pass_one_options(keys_per_split: int, block_n: int, warps: int, stages: int,
                          fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run with the estimate's pass 1 at ``keys_per_split`` keys per program in ``block_n``-key
    tiles, ``warps`` and ``stages``."""
    return with_estimate_settings(fn, KEYS_PER_SPLIT=keys_per_split,
                                  PASS_ONE_OPTIONS={"BLOCK_N": block_n, "num_warps": warps, "num_stages": stages})


def with_pass_two_options(block_n: int, warps: int, stages: int, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run with the estimate's pass 2 at one fixed launch configuration (no autotuner)."""
    class Fixed:
        def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., Any]:
            def launch_fixed(*args: Any, **kwargs: Any) -> Any:
                return _estimate_kernel._masses_kernel[grid](*args, **kwargs, BLOCK_N=block_n, num_warps=warps,
                                                             num_stages=stages)
            return launch_fixed

    return with_estimate_settings(fn, _masses_kernel_tuned=Fixed())


def layer_timings(plan: Plan, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  repeats: int, all_variants: bool = False) -> dict[str, float]:
    """The timed variants of one layer, in milliseconds (see the module docstring): the core set, or
    with ``all_variants`` every launch alternative and layout too."""
    def timed(fn: Callable[[], Any]) -> float:
        return median_cuda_ms(fn, repeats=repeats, warmup=2)

    times = {"dense SDPA": timed(sdpa_dense(q, k, v)),
             "layer (eager)": timed(lambda: attend_layer(plan, layer, q, k, v, scale=scale)),
             "layer (graph)": graph_time(lambda: attend_layer(plan, layer, q, k, v, scale=scale), repeats)}
    layer_plan = plan.layers[layer]
    groups = layer_plan.head_groups()
    head = groups[0][0]
    if len(groups) != 1 or head.pattern != "vertical_slash" or layer_plan.runs_dense(k.shape[2]):
        return times  # the parts below assume one vertical-slash bucket of every head
    spec = get_pattern(head.pattern)
    config = head.config.for_call(q.shape[2], k.shape[2])  # the rule of this call, as the estimate resolves it
    per_kv = layer_plan.share_kv_groups

    def estimate() -> Any:
        return spec.estimate(q, k, config, sm_scale=scale, per_kv_group=per_kv)

    def masses() -> Any:
        return vs.estimate_masses(q, k, config, sm_scale=scale, backend="triton")

    times["estimate (graph)"] = graph_time(estimate, repeats)
    times["masses (graph)"] = graph_time(masses, repeats)
    estimated = masses()
    if all_variants:
        times.update(estimate_variant_timings(masses, estimate, estimated, config, repeats))
    times["selection torch (graph)"] = graph_time(lambda: vs.select_packed(*estimated, config, backend="torch"),
                                                 repeats)
    times.update(triton_selection_timings(estimated, config, repeats, layer, all_variants))
    if config.shares_group_columns(k.shape[2]) or per_kv:  # the selection as the estimate runs it, unions included
        times["selection + KV-group unions (graph)"] = graph_time(
            lambda: vs.select_packed_over_groups(*estimated, config, k.shape[1], per_kv_group=per_kv), repeats)
        # The columns' union alone, by the Triton kernels (the path above) and by the torch bitmap (before
        # session 18), repeated for every query head as the shared columns need it.
        columns, _ = vs.select_packed(*estimated, config)
        for name, union in (("Triton", union_packed_over_groups_triton), ("torch", union_packed_over_groups)):
            times[f"KV-group union of the columns, {name} (graph)"] = graph_time(
                lambda union=union: union(columns, k.shape[1], k.shape[2], repeat=True), repeats)
    selection = estimate()
    nk = k.shape[2]

    def index() -> Any:
        return build_vertical_slash_index(selection.vertical, selection.slash, nk, selection.block_size, presorted=True)

    times["index (graph)"] = graph_time(index, repeats)
    built = index()
    dense_from = layer_plan.dense_from(nk)
    shape = AttentionShape(q.shape[0], q.shape[1], k.shape[1], q.shape[2], nk, q.shape[3])

    def kernel(tail_splits: int | None = None, from_row: int | None = dense_from,
               tail_launch: str = "fused") -> Callable[[], Any]:
        return lambda: ops.vertical_slash_attention(q, k, v, index=built, block_size=selection.block_size,
                                                    sm_scale=scale, dense_from=from_row, tail_splits=tail_splits,
                                                    tail_launch=tail_launch)

    times["kernel (tail split) (graph)"] = graph_time(kernel(), repeats)
    times.update(kernel_part_timings(q, k, v, selection, config, scale, repeats, all_variants))
    # The default launch with the slash chunks' scores masked element by element in every chunk (before
    # session 20), and unmasked: wrong output, a bound on what masking nothing at all would save.
    for name, changed in (("slash scores masked in every chunk", {"slash_masks": "every"}),
                          ("slash scores unmasked (bound, wrong output)", {"slash_masks": "none"})):
        times[f"kernel, {name} (graph)"] = launch_variant_time(q, k, v, shape, scale, selection.block_size, built,
                                                               dense_from, changed, repeats)
    if not all_variants:
        return times
    times["index"] = timed(index)
    times["kernel (tail split)"] = timed(kernel())
    # The same index walked in 32-key chunks (a range of 70 keys: 96 keys computed instead of 128).
    narrow = build_vertical_slash_index(selection.vertical, selection.slash, nk, selection.block_size,
                                        presorted=True, chunk=32)
    times["kernel, 32-key chunks (graph)"] = graph_time(
        lambda: ops.vertical_slash_attention(q, k, v, index=narrow, block_size=selection.block_size, sm_scale=scale,
                                             dense_from=dense_from), repeats)
    times["kernel (tail split in 16)"] = timed(kernel(16))
    times["kernel (tail unsplit)"] = timed(kernel(1))
    times["kernel (no tail)"] = timed(kernel(from_row=None))
    # The dense rows as a second, split-K launch (two query heads per program) after the sparse one.
    times["kernel (tail separate)"] = timed(kernel(tail_launch="separate"))
    times["kernel (tail separate) (graph)"] = graph_time(kernel(tail_launch="separate"), repeats)
    times["kernel (tail separate in 16)"] = timed(kernel(16, tail_launch="separate"))
    # 128-row query tiles: their own estimate (slashes widen to whole tiles) and index.
    tall = spec.estimate(q, k, dataclasses.replace(config, block_size=128), sm_scale=scale, per_kv_group=per_kv)
    tall_index = build_vertical_slash_index(tall.vertical, tall.slash, nk, 128, presorted=True)
    tall_from = None if dense_from is None else dense_from // 128 * 128
    variants = [(f"kernel {selection.block_size}-row tiles", selection.block_size, built, dense_from, KERNEL_OPTIONS),
                ("kernel 128-row tiles", 128, tall_index, tall_from, TALL_KERNEL_OPTIONS)]
    times["kernel 128-row tiles (default options)"] = timed(
        lambda: ops.vertical_slash_attention(q, k, v, index=tall_index, block_size=128, sm_scale=scale,
                                             dense_from=tall_from))
    # 32-row query tiles (32-key chunks): their own estimate and index. A lone slash costs a 32-key range
    # per row instead of 64, so scattered diagonals compute half the pairs, in smaller tiles.
    short = spec.estimate(q, k, dataclasses.replace(config, block_size=32), sm_scale=scale, per_kv_group=per_kv)
    short_index = build_vertical_slash_index(short.vertical, short.slash, nk, 32, presorted=True)
    times["kernel 32-row tiles, own estimate (graph)"] = graph_time(
        lambda: ops.vertical_slash_attention(q, k, v, index=short_index, block_size=32, sm_scale=scale,
                                             dense_from=dense_from), repeats)
    for name, block_m, index_built, from_row, sweep in variants:
        for warps, stages in sweep:
            options = {"num_warps": warps, "num_stages": stages}
            times[f"{name} warps={warps} stages={stages}"] = timed(
                lambda: launch(q, k, v, shape, scale, MODE_VERTICAL_SLASH, block_m, vs=index_built,
                               dense_from=from_row, options=dict(options), tail_splits=default_tail_splits(nk)))
    # The default launch with and without the K/V of covered columns loaded (loaded, those loads wait
    # only for the column ids, not for the coverage lookup too), and with the key ranges (the dense
    # tail's) in one branching loop, the unpipelined form before session 16.
    for name, changed in (("covered columns skipped", {}), ("covered columns loaded", {"covered_in_loads": False}),
                          ("one-loop key ranges", {"split_ranges": False})):
        times[f"kernel, {name} (graph)"] = launch_variant_time(q, k, v, shape, scale, selection.block_size, built,
                                                               dense_from, changed, repeats)
    return times


def estimate_variant_timings(masses: Callable[[], Any], estimate: Callable[[], Any],
                             estimated: tuple[torch.Tensor, torch.Tensor], config: vs.VerticalSlashConfig,
                             repeats: int) -> dict[str, float]:
    """The estimate's alternatives (``--variants all``): eager with the diagonal scratch and with atomics,
    the float16 scratch (and whether it selects the same index), pass 1 and pass 2 launch choices."""
    def timed(fn: Callable[[], Any]) -> float:
        return median_cuda_ms(fn, repeats=repeats, warmup=2)

    times = {f"{part} ({sums})": timed(with_diagonal_sums(sums, fn))
             for part, fn in (("estimate", estimate), ("masses", masses)) for sums in ("scratch", "atomics")}
    half_scratch = with_estimate_settings(masses, DIAGONAL_SUMS="scratch", DIAGONAL_SCRATCH_DTYPE=torch.float16)
    times["masses, float16 scratch (graph)"] = graph_time(half_scratch, repeats)
    for keys_per_split, block_n, warps, stages in PASS_ONE_OPTIONS:
        times[f"masses, pass 1 {keys_per_split} keys BLOCK_N={block_n} warps={warps} stages={stages}"] = graph_time(
            with_pass_one_options(keys_per_split, block_n, warps, stages, masses), repeats)
    for block_n, warps, stages in PASS_TWO_OPTIONS:
        times[f"pass 2 BLOCK_N={block_n} warps={warps} stages={stages}"] = graph_time(
            with_pass_two_options(block_n, warps, stages, masses), repeats)
    times[SAME_FP16] = float(all(torch.equal(a, b) for a, b in zip(vs.select_packed(*half_scratch(), config),
                                                                     vs.select_packed(*estimated, config))))
    return times


def launch_variant_time(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape, scale: float,
                        block_size: int, built: Any, dense_from: int | None, changed: dict[str, Any],
                        repeats: int) -> float:
    """Graph-replayed ms of the vertical-slash launch at the default's fixed choice (4 warps, 3 stages)
    with the launch options ``changed``."""
    options = {"num_warps": 4, "num_stages": 3, **changed}
    return graph_time(lambda: launch(q, k, v, shape, scale, MODE_VERTICAL_SLASH, block_size, vs=built,
                                     dense_from=dense_from, options=dict(options),
                                     tail_splits=default_tail_splits(k.shape[2])), repeats)


def kernel_part_timings(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: Any,
                        config: vs.VerticalSlashConfig, scale: float, repeats: int,
                        all_variants: bool = False) -> dict[str, float]:
    """Where the sparse kernel's time goes (graph-replayed, no dense tail): the index's columns alone
    (diagonals cut to the forced local band), its diagonals alone (columns cut to the forced sinks),
    where each KV group's heads share their columns those columns as one index per KV group (heads
    stacked in a tile), and our kernel's dense mode over every causal key (its per-pair cost, to
    compare with SDPA's)."""
    nk = k.shape[2]
    local_only = torch.where(selection.slash < config.local, selection.slash, -1)  # ascending, so still packed
    sinks_only = torch.where(selection.vertical < config.sink, selection.vertical, -1)
    times = {}
    for name, vertical, slash in (("columns only", selection.vertical, local_only),
                                  ("diagonals only", sinks_only, selection.slash)):
        part = build_vertical_slash_index(vertical, slash, nk, selection.block_size, presorted=True)
        times[f"kernel, {name} (graph)"] = graph_time(
            lambda part=part: ops.vertical_slash_attention(q, k, v, index=part, block_size=selection.block_size,
                                                           sm_scale=scale), repeats)
    group = q.shape[1] // k.shape[1]
    group_columns, group_local = selection.vertical[:, ::group], local_only[:, ::group]
    if group > 1 and all(torch.equal(x, x[:, ::group].repeat_interleave(group, dim=1))
                         for x in (selection.vertical, local_only)):
        # Every head of a KV group attends the same columns (the default's shared columns): the same
        # columns as one index per KV group, whose launch stacks the group's heads in one tile and loads
        # each gathered K/V row once for all of them: what a column pass per KV group would cost.
        part = build_vertical_slash_index(group_columns, group_local, nk, selection.block_size, presorted=True)
        times["kernel, columns only, one index per KV group (heads stacked) (graph)"] = graph_time(
            lambda: ops.vertical_slash_attention(q, k, v, index=part, block_size=selection.block_size,
                                                 sm_scale=scale), repeats)
    if not all_variants:
        return times
    times["kernel, dense mode (graph)"] = graph_time(lambda: ops.dense_attention(q, k, v, sm_scale=scale), repeats)
    # The dense mode at one fixed launch with its key range as separate loops (pipelined, the default
    # since session 16) and as one branching loop (not pipelined): what the split buys.
    shape = AttentionShape(q.shape[0], q.shape[1], k.shape[1], q.shape[2], nk, q.shape[3])
    for split in (True, False):
        options = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "split_ranges": split}
        times[f"kernel, dense mode, {'split' if split else 'one-loop'} key ranges, 64x64 tiles (graph)"] = graph_time(
            lambda options=options: launch(q, k, v, shape, scale, MODE_DENSE, 64, options=dict(options)), repeats)
    return times


def triton_selection_timings(estimated: tuple[torch.Tensor, torch.Tensor], config: vs.VerticalSlashConfig,
                             repeats: int, layer: int, all_variants: bool = False) -> dict[str, float]:
    """The Triton selection of a layer's masses at its default launch choices and the first ones (chunk 512, no compaction)
    (graph-replayed ms) and whether all of them give the torch path's index (:data:`AGREE`).
    A choice that fails to compile or run is reported and left out, not fatal to the other rows. The kernel
    alone takes no per-kind minimums (``select_packed`` adds them after it), so it is compared without them."""
    expected = vs.select_packed(*estimated, dataclasses.replace(config, min_vertical=0, min_slash=0), backend="torch")
    times: dict[str, float] = {}
    agree = True
    choices = [("selection triton (graph)", None)]
    if all_variants:
        choices.append(("selection triton, chunk 512, no compaction (graph)", ParallelOptions(chunk=512, compact_after=0)))
    for name, options in choices:
        def run(options: ParallelOptions | None = options) -> tuple[torch.Tensor, torch.Tensor]:
            return select_packed_triton(*estimated, num_vertical=config.num_vertical, num_slash=config.num_slash,
                                        sink=config.sink, local=config.local, coverage=config.budget == "coverage",
                                        tau=config.tau, options=options)
        try:
            agree &= all(torch.equal(a, b) for a, b in zip(expected, run()))
            times[name] = graph_time(run, repeats)
        except Exception as error:  # noqa: BLE001 - any compile or launch error of the opt-in kernels
            print(f"layer {layer}: {name} failed: {type(error).__name__}: {error}", flush=True)
    if times:
        times[AGREE] = float(agree)
    return times


def render_markdown(data: dict[str, Any]) -> str:
    """Totals over layers first (with the ratio to dense SDPA), then every layer."""
    layers = data["layers"]
    names = list(dict.fromkeys(name for row in layers for name in row["ms"] if name not in FLAGS))
    total = {name: sum(row["ms"].get(name, 0.0) for row in layers) for name in names}
    dense = total["dense SDPA"]
    lines = [f"# Attention of a {data['length']}-token turn over a {data['prefix']}-token cache, by part", "",
             f"- Date: {data['date']}. Device: {data['device']}. torch {data['torch']}, triton {data['triton']}.",
             f"- Model: `{data['model']}` (YaRN {data['yarn']}), plan: {data['plan']}. Text: PG essays.",
             f"- Command: `{data['command']}` (variants: {data.get('variants', 'all')})",
             f"- Timing: CUDA events, median of {data['repeats']} after 2 warm-ups, per layer; totals are "
             "sums over the layers. V is random (time does not depend on it); q/k are the model's.", "",
             "| part | total ms | dense SDPA / this |", "|---|---|---|"]
    lines += [f"| {name} | {total[name]:.2f} | {dense / total[name]:.2f}x |" for name in names if total[name] > 0]
    for flag, sentence in FLAGS.items():
        values = [row["ms"][flag] for row in layers if flag in row["ms"]]
        if values:
            lines += ["", sentence.format(int(sum(values)), len(values))]
    short = [n for n in names if "warps=" not in n]
    lines += ["", "## Per layer (ms)", "", "| layer | " + " | ".join(short) + " |", "|---" * (len(short) + 1) + "|"]
    for row in layers:
        lines.append(f"| {row['layer']} | " + " | ".join(f"{row['ms'].get(n, float('nan')):.3f}" for n in short) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--yarn", type=float, default=None)
    parser.add_argument("--prefix", type=int, default=65536)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--plan", default=None, help="plan JSON (default: the library's default plan)")
    parser.add_argument("--layers", default=None, help="comma-separated layers (default: all)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--variants", choices=("core", "all"), default="core",
                        help="core: the layer, its parts and the slash-mask forms (all 28 layers fit a few minutes); "
                             "all: every launch alternative and tile layout too (~2 minutes per layer)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    model, tokenizer = zoo.load(args.model, yarn_factor=args.yarn)
    plan = Plan.load(args.plan) if args.plan else default_plan_for(model.config, model_id=args.model)
    total = args.prefix + args.length
    ids = torch.tensor([corpora.haystack_ids(tokenizer, total, "pg")], device="cuda")
    wanted = range(len(plan.layers)) if args.layers is None else [int(x) for x in args.layers.split(",")]
    captured = capture_qk(model, ids, layers=wanted, store_device="cuda",
                          query_rows=torch.arange(args.prefix, total, device="cuda"))
    del model
    torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": __import__("triton").__version__,
        "model": args.model, "yarn": args.yarn, "plan": args.plan or "default", "prefix": args.prefix,
        "length": args.length, "repeats": args.repeats, "variants": args.variants,
        "command": "python3 benchmarks/turn_kernels.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "layers": [],
    }
    generator = torch.Generator(device="cuda").manual_seed(0)
    for layer in wanted:
        layer_qk = captured.pop(layer)
        q, k = layer_qk.q.contiguous(), layer_qk.k.contiguous()
        v = torch.randn(k.shape, device=k.device, dtype=k.dtype, generator=generator)
        ms = layer_timings(plan, layer, q, k, v, layer_qk.sm_scale, args.repeats, args.variants == "all")
        data["layers"].append({"layer": layer, "ms": ms})
        print(f"layer {layer}: " + ", ".join(f"{name} {t:.3f}" for name, t in ms.items()), flush=True)
        (out / "turn_kernels.json").write_text(json.dumps(data, indent=1) + "\n")
        (out / "turn_kernels.md").write_text(render_markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
