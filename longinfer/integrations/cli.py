"""``longinfer run``: answer one prompt with a model and a plan; print the text, prefill time and density.

    longinfer run --model smollm2-135m --prompt-file prompt.txt [--plan plan.json | --share-kv-groups | --per-head-columns]
                  [--tau T] [--floor COLUMNS,DIAGONALS] [--floor-from TOKENS] [--group-columns-below TOKENS]
                  [--question-from TOKENS]
                  [--max-new-tokens 64] [--dense] [--chunk-size 8192] [--chat] [--backend auto]
                  [--device cuda] [--dtype bfloat16]

The generated text goes to stdout, followed by a summary (prompt tokens, prefill time, decode time,
attention density); logs go to stderr. Errors name the problem and the option that fixes it.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")


def _floor(text: str) -> tuple[int, int]:
    """``--floor COLUMNS,DIAGONALS`` -> two non-negative ints."""
    parts = text.split(",")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"--floor takes COLUMNS,DIAGONALS (two non-negative integers, e.g. "
                                         f"1000,3000), got {text!r}")
    return int(parts[0]), int(parts[1])


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``run`` command to the top-level CLI."""
    parser = subparsers.add_parser(
        "run", help="generate from a prompt file with sparse prefill; print prefill time and attention density"
    )
    parser.add_argument("--model", default="smollm2-135m",
                        help="zoo name (`longinfer models list`), local .gguf / folder, or Hugging Face id")
    parser.add_argument("--prompt-file", required=True, type=Path, help="UTF-8 text file with the prompt")
    parser.add_argument("--plan", type=Path, default=None, help="plan JSON (default: the model's default plan)")
    parser.add_argument("--share-kv-groups", action="store_true",
                        help="the default plan with one index per KV group: closer to dense answers, less speedup")
    parser.add_argument("--tau", type=float, default=None,
                        help="the default plan with this coverage target (default 0.9; higher: more keys, closer "
                             "to dense); with --share-kv-groups, 0.8 kept RULER-style scores at 32K within noise of dense")
    parser.add_argument("--per-head-columns", action="store_true",
                        help="the default plan with each head attending only its own columns, not its KV group's: "
                             "faster, further from dense answers")
    parser.add_argument("--floor", type=_floor, default=None, metavar="COLUMNS,DIAGONALS",
                        help="the default plan with at least this many columns and diagonals per head on long "
                             "prompts, instead of its floor that grows with the prompt (0 columns, 3,000 diagonals "
                             "per 65,536 tokens: at 128K closer to dense answers, slower; 0,0: none)")
    parser.add_argument("--floor-from", type=int, default=None, metavar="TOKENS",
                        help="the default plan with its floor on prefill calls of at least this many new tokens "
                             "(default 65536; 0: every call)")
    parser.add_argument("--group-columns-below", type=int, default=None, metavar="TOKENS",
                        help="the default plan sharing KV-group columns only on prefill calls of fewer new tokens "
                             "(default 65536; 0: every call); longer calls give each head its own columns")
    parser.add_argument("--question-from", type=int, default=None, metavar="TOKENS",
                        help="the default plan adding the prompt's last 64 queries (its question) to the index "
                             "estimate on prefill calls of at least this many new tokens (default 16384; 0: never)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="decoding budget (default 64)")
    parser.add_argument("--dense", action="store_true", help="run the stock dense attention (sdpa) instead")
    parser.add_argument("--chunk-size", type=int, default=0,
                        help="prefill in chunks of this many tokens, with progress (default 0: one pass)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto",
                        help="sparse attention backend (default auto: Triton kernels where they run)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="weights dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.set_defaults(func=run)


class RunError(Exception):
    """A user-facing error of ``longinfer run``: printed as ``error: ...``, exit code 2."""


def _read_prompt(path: Path) -> str:
    if not path.is_file():
        raise RunError(f"prompt file {path} does not exist; pass an existing UTF-8 text file to --prompt-file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise RunError(f"prompt file {path} is not UTF-8 text ({error})") from error
    if not text.strip():
        raise RunError(f"prompt file {path} is empty")
    return text


def load_model(name: str, device: str | None = None, dtype: str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` through the zoo; every loading failure becomes a :class:`RunError`."""
    import torch

    from longinfer.models import zoo
    from longinfer.models.download import FetchError

    if dtype is not None and dtype not in DTYPES:
        raise RunError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    try:
        return zoo.load(name, dtype=getattr(torch, dtype) if dtype else None, device=device)
    except zoo.UnknownModelError as error:
        raise RunError(f"{error}; see `longinfer models list`") from error
    except (FileNotFoundError, FetchError) as error:
        raise RunError(str(error)) from error
    except OSError as error:  # transformers: a Hugging Face id that cannot be resolved offline
        raise RunError(f"cannot load model {name!r}: {error}") from error


def _prompt_ids(tokenizer: Any, text: str, chat: bool) -> list[int]:
    if not chat:
        return list(tokenizer(text)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise RunError("--chat: this tokenizer has no chat template; leave --chat out")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def _oom_message(tokens: int, args: argparse.Namespace) -> str:
    hints = []
    if not args.chunk_size:
        hints.append("--chunk-size 8192 (prefill in chunks: one chunk's activations at a time)")
    elif args.chunk_size > 1024:
        hints.append(f"a smaller --chunk-size than {args.chunk_size}")
    if args.dtype in (None, "float32"):
        hints.append("--dtype bfloat16")
    hints.append("a shorter prompt")
    return f"out of GPU memory while running {tokens} prompt tokens; retry with " + ", or ".join(hints)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``longinfer run``; returns the exit code."""
    import torch

    import longinfer
    from longinfer.integrations.transformers import SPARSE_MIN_QUERIES
    from longinfer.plans.schema import DEFAULT_PATTERN_CONFIG

    try:
        if args.max_new_tokens < 1:
            raise RunError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if args.chunk_size < 0:
            raise RunError(f"--chunk-size must be >= 0, got {args.chunk_size}")
        default_options = (args.share_kv_groups or args.per_head_columns or args.tau is not None
                           or args.floor is not None or args.floor_from is not None
                           or args.group_columns_below is not None or args.question_from is not None)
        if args.dense and (args.plan is not None or default_options):
            raise RunError("--dense runs without a plan; drop --plan / --share-kv-groups / --per-head-columns / "
                           "--tau / --floor / --floor-from / --group-columns-below / --question-from or --dense")
        if default_options and args.plan is not None:
            raise RunError("--share-kv-groups, --per-head-columns, --tau, --floor, --floor-from, "
                           "--group-columns-below and --question-from set up the default plan; drop them or --plan")
        if args.tau is not None and not 0.0 < args.tau <= 1.0:
            raise RunError(f"--tau must lie in (0, 1], got {args.tau}")
        for flag, value in (("--floor-from", args.floor_from), ("--group-columns-below", args.group_columns_below),
                            ("--question-from", args.question_from)):
            if value is not None and value < 0:
                raise RunError(f"{flag} must be >= 0, got {value}")
        if args.per_head_columns and args.group_columns_below:
            raise RunError("--group-columns-below limits the shared KV-group columns that --per-head-columns turns "
                           "off; drop one of them")
        text = _read_prompt(args.prompt_file)
        plan = None
        if args.plan is not None:
            if not args.plan.is_file():
                raise RunError(f"plan file {args.plan} does not exist")
            try:
                plan = longinfer.load_plan(args.plan)
            except (ValueError, TypeError) as error:
                raise RunError(f"invalid plan: {error}") from error
        model, tokenizer = load_model(args.model, args.device, args.dtype)
        ids = _prompt_ids(tokenizer, text, args.chat)
        if default_options:
            pattern = DEFAULT_PATTERN_CONFIG
            floor = (pattern.min_vertical, pattern.min_slash) if args.floor is None else args.floor
            try:
                plan = longinfer.default_plan_for(
                    model.config, share_kv_groups=args.share_kv_groups, tau=args.tau,
                    group_columns=not args.per_head_columns, group_columns_below=args.group_columns_below,
                    min_vertical=floor[0], min_slash=floor[1],
                    min_slash_share=pattern.min_slash_share if args.floor is None else 0.0,
                    floor_from=pattern.floor_from if args.floor_from is None else args.floor_from,
                    question_from=pattern.question_from if args.question_from is None else args.question_from)
            except ValueError as error:
                raise RunError(f"{error} (--floor)") from error
        if not args.dense:
            try:
                plan = longinfer.patch(model, plan, backend=args.backend)
            except ValueError as error:
                raise RunError(f"{error} (--plan / --backend)") from error
        logger.info("prefilling %d tokens%s", len(ids), "" if args.chunk_size else " in one pass")
        try:
            answer = longinfer.generate(model, tokenizer, ids, max_new_tokens=args.max_new_tokens,
                                        chunk_size=args.chunk_size or None)
        except torch.OutOfMemoryError as error:
            raise RunError(_oom_message(len(ids), args)) from error
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(answer.text)
    print("---")
    print(f"prompt tokens:     {answer.prompt_tokens}")
    print(f"prefill time:      {answer.prefill_seconds:.3f} s ({answer.timer})")
    print(f"decode time:       {answer.decode_seconds:.3f} s for {len(answer.new_ids)} tokens")
    if args.dense:
        print("attention:         dense (sdpa), density 1.000")
    else:
        stats = longinfer.attention_stats(model)
        if math.isnan(stats.density):
            density = f"n/a (prompts under {SPARSE_MIN_QUERIES} tokens run dense)"
        else:
            density = (f"{stats.density:.3f} of the model's (query, key) pairs in prefill "
                       f"({stats.sparse_calls} sparse, {stats.dense_calls} dense, "
                       f"{stats.window_calls} windowed layer calls"
                       + (f"; {stats.graph_calls} sparse ones replayed from CUDA graphs)" if stats.graph_calls else ")"))
        print(f"attention density: {density}")
        print(f"plan:              {plan.model_id or '(unnamed)'} [{plan.search.get('method', '?')}]")
    return 0
