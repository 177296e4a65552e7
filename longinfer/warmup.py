"""Compile and autotune the sparse prefill's kernels before the first real request.

On a fresh machine the first sparse call compiles every Triton kernel it launches and autotunes
the attention and estimate kernels (session 12 on an H200: about a minute for one default-plan
layer before this library cut the selection's variants, ``docs/results/gpu-session12/cold-start/``).
:func:`warmup` runs each distinct layer of a plan once per prompt length (and per follow-up turn
shape) on structured inputs, so Triton's cache folder holds the compiled kernels and, where Triton
has ``cache_results`` (3.4+), the autotuner's timings: later processes on the same machine (same
``TRITON_CACHE_DIR``) start warm. CUDA graphs are per process and are not covered.

    longinfer warmup --model qwen2.5-coder-1.5b --lengths 32768,131072 --turn 65536+4096

The attention kernel autotunes once per power-of-two bucket of the key length, so give one length
per bucket the service will see. It also compiles one variant per divisibility by 16 of the query
and the key length (:data:`longinfer.ops._kernel._LENGTH_ARGUMENTS`), so each shape also runs at
lengths a few tokens shorter that cover the other classes (:func:`length_classes`). Memory: one
layer's ``q, k, v`` at the longest length (built in float32 on the host, then moved), plus what one
sparse layer call needs.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass

import torch

from longinfer.eval.cli import parse_lengths
from longinfer.integrations.transformers import attend_layer
from longinfer.plans import Plan

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WarmupCall:
    """One warm-up call: ``queries`` new tokens over ``keys`` positions in layer ``layer``, and its
    CUDA-synchronized wall time (compiling and autotuning included)."""

    keys: int
    queries: int
    layer: int
    seconds: float


def structured_qkv(heads: int, kv_heads: int, head_dim: int, length: int, dtype: torch.dtype,
                   device: torch.device | str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q [1, Hq, N, D]``, ``k, v [1, Hkv, N, D]`` shaped like real attention, not noise.

    Locality (a shared vector rotated by position, so that ``q_i . k_j`` peaks near ``i = j``: the
    33 nearest keys hold 35-51% of a row's mass at 300-1000 keys), a weak sink direction shared by
    the first 4 keys and every query, plus noise: the estimate and the selection then take the paths
    real heads take rather than those of uniform noise.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    half = head_dim // 2
    positions = torch.arange(length, dtype=torch.float32)[:, None]
    angles = positions * (10000.0 ** (-torch.arange(half, dtype=torch.float32) / half))[None, :] * 0.02
    local = torch.cat([angles.cos(), angles.sin()], dim=-1)  # [N, D]: rows i, j close -> high dot product
    sink = torch.randn(head_dim, generator=gen)
    sink = sink / sink.norm()

    def heads_of(count: int, sink_weight: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(count, length, head_dim, generator=gen)
        return 2.0 * local[None] + sink_weight[None, :, None] * sink + 0.7 * noise

    q = heads_of(heads, torch.full((length,), 3.0))
    k_sink = torch.zeros(length)
    k_sink[:4] = 3.0
    k = heads_of(kv_heads, k_sink)
    v = torch.randn(kv_heads, length, head_dim, generator=gen)
    return tuple(x[None].to(device=device, dtype=dtype) for x in (q, k, v))


def distinct_layers(plan: Plan) -> list[int]:
    """Index of the first layer of each distinct layer plan (layers with equal plans launch the
    same kernels)."""
    seen: set = set()
    firsts = []
    for index, layer in enumerate(plan.layers):
        if layer not in seen:
            seen.add(layer)
            firsts.append(index)
    return firsts


def _other_class(length: int) -> int:
    """The nearest length below ``length`` whose divisibility by 16 differs (0 if none)."""
    return length - 1 if length % 16 == 0 else length - length % 16


def length_classes(keys: int, queries: int) -> list[tuple[int, int]]:
    """``(keys, queries)`` and the nearest shorter shapes that cover the other divisibility classes.

    A prompt (``queries == keys``) has two classes, a follow-up turn four (query and key lengths
    each divisible by 16 or not); shapes with no query left are skipped.
    """
    if queries == keys:
        candidates = [(keys, keys), (_other_class(keys),) * 2]
    else:
        candidates = [(k, q) for k in (keys, _other_class(keys)) for q in (queries, _other_class(queries))]
    return [(k, q) for k, q in candidates if 1 <= q <= k]


def warmup(plan: Plan, lengths: list[int], *, turns: list[tuple[int, int]] = (), device: str = "cuda",
           dtype: torch.dtype = torch.bfloat16) -> list[WarmupCall]:
    """Run every distinct layer of ``plan`` once per prompt length and per turn shape, each in every
    length class (:func:`length_classes`).

    Args:
        plan: the plan the service will use (its model shape gives the heads and head_dim).
        lengths: prompt lengths (queries = keys).
        turns: ``(prefix, new)`` follow-up turns: ``new`` queries over ``prefix + new`` keys.
        device, dtype: where and in what precision the model runs.

    Returns:
        One :class:`WarmupCall` per (shape, distinct layer), in the order run.

    Raises:
        ValueError: no shapes, or a non-positive length.
    """
    shapes = [(n, n) for n in lengths] + [(prefix + new, new) for prefix, new in turns]
    if not shapes:
        raise ValueError("nothing to warm up: give at least one prompt length or turn")
    if any(queries <= 0 or keys < queries for keys, queries in shapes):
        raise ValueError(f"lengths and turn sizes must be positive, got lengths {lengths} and turns {turns}")
    on_cuda = torch.device(device).type == "cuda"
    if not on_cuda:
        logger.warning("warming up on %s: Triton compiles and autotunes only for CUDA tensors", device)
    shapes = list(dict.fromkeys(variant for keys, queries in shapes for variant in length_classes(keys, queries)))
    shape = plan.shape
    synchronize = torch.cuda.synchronize if on_cuda else (lambda: None)
    calls = []
    for keys, queries in shapes:
        q, k, v = structured_qkv(shape.num_q_heads, shape.num_kv_heads, shape.head_dim, keys, dtype, device)
        q = q[:, :, keys - queries:].contiguous()
        for layer in distinct_layers(plan):
            synchronize()
            start = time.perf_counter()
            attend_layer(plan, layer, q, k, v)
            synchronize()
            calls.append(WarmupCall(keys, queries, layer, time.perf_counter() - start))
            logger.info("warm-up: %d queries over %d keys, layer %d: %.2f s", queries, keys, layer, calls[-1].seconds)
        del q, k, v
    return calls


def _turn(text: str) -> tuple[int, int]:
    """``"65536+4096"`` -> ``(65536, 4096)``."""
    prefix, plus, new = text.partition("+")
    if not plus or not prefix.isdigit() or not new.isdigit():
        raise argparse.ArgumentTypeError(f"a turn is PREFIX+NEW in tokens, e.g. 65536+4096; got {text!r}")
    return int(prefix), int(new)


def _plan_for(args: argparse.Namespace) -> Plan:
    """The plan of ``--plan``, or the default plan of ``--model``'s shape (zoo name, ``.gguf`` file,
    folder or Hugging Face id; only the config is read, no weights)."""
    from longinfer.plans import default_plan_for

    if args.plan:
        return Plan.load(args.plan)
    from longinfer.models import zoo

    if args.model in zoo.MODELS:  # the zoo knows the shape: nothing to fetch
        entry = zoo.get_model(args.model)
        shape = {"num_layers": entry.num_layers, "num_q_heads": entry.num_q_heads,
                 "num_kv_heads": entry.num_kv_heads, "head_dim": entry.head_dim}
        return default_plan_for(shape, model_id=entry.name)
    return default_plan_for(zoo.model_config(args.model), model_id=str(args.model))


def run(args: argparse.Namespace) -> int:
    plan = _plan_for(args)
    calls = warmup(plan, args.lengths, turns=args.turn, device=args.device, dtype=getattr(torch, args.dtype))
    print("| keys | queries | layer | seconds |\n|---|---|---|---|")
    for call in calls:
        print(f"| {call.keys} | {call.queries} | {call.layer} | {call.seconds:.2f} |")
    print(f"\n{len(calls)} calls, {sum(c.seconds for c in calls):.1f} s in all")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("warmup", help="compile and autotune the sparse kernels before the first request",
                                   description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="zoo name, .gguf file, folder or Hugging Face id (its default plan)")
    source.add_argument("--plan", help="a plan JSON file")
    parser.add_argument("--lengths", type=parse_lengths, default=[], help="prompt lengths, e.g. 32768,131072 or 32K,128K")
    parser.add_argument("--turn", type=_turn, action="append", default=[],
                        help="a follow-up turn PREFIX+NEW, e.g. 65536+4096 (repeatable)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.set_defaults(func=run)
