"""``longinfer search --model M [--length N] [--out plan.json] [--candidates ...]``: the offline search.

Loads the model (:func:`longinfer.models.zoo.load`), builds the calibration prompt, runs
:func:`longinfer.plans.search.search_plan` and writes the plan. Killed and rerun with the same
arguments, it continues from the last finished layer (``<out>.partial.jsonl``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from longinfer.plans import search
from longinfer.plans.schema import DEFAULT_DENSE_LAST

logger = logging.getLogger(__name__)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``search`` command to the top-level CLI."""
    parser = subparsers.add_parser(
        "search", help="search each head's sparse pattern on a calibration prompt and write a plan",
        description=search.__doc__.splitlines()[0],
    )
    parser.add_argument("--model", required=True, help="zoo name, local .gguf, HF folder or HF id")
    parser.add_argument("--length", type=_positive_int, default=None,
                        help=f"calibration length in tokens (default: min({search.DEFAULT_LENGTH}, the model's context))")
    parser.add_argument("--out", type=Path, default=None,
                        help="plan file to write (default: <model>-<length>.plan.json)")
    parser.add_argument("--candidates", nargs="+", default=None, metavar="PATTERN[:K=V,...]",
                        help="candidates, e.g. a_shape:sink=128,window=2048 vertical_slash:num_vertical=500,num_slash=800 "
                             "(default: a set sized for the length and cost budget)")
    parser.add_argument("--candidates-file", type=Path, default=None,
                        help='JSON list of {"pattern": ..., "params": {...}} candidates')
    parser.add_argument("--cost-budget", type=float, default=search.DEFAULT_COST_BUDGET,
                        help="most kernel cost a head may have, relative to dense (default %(default)s)")
    parser.add_argument("--allocation", choices=search.ALLOCATIONS, default="per_head",
                        help="per_head: --cost-budget bounds every head; global: it bounds the average over all "
                             "heads, one price per unit of cost decides each head (default %(default)s)")
    parser.add_argument("--recall-tolerance", type=float, default=search.DEFAULT_RECALL_TOLERANCE,
                        help="recalls this close to the best tie; the cheaper wins (default %(default)s)")
    parser.add_argument("--rows", type=_positive_int, default=search.DEFAULT_NUM_ROWS,
                        help="sampled query rows per layer (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the prompt and the sampled rows")
    parser.add_argument("--share-kv-groups", action="store_true",
                        help="one pattern per KV group (estimated once per group)")
    parser.add_argument("--dense-below", type=int, default=None,
                        help="use this dense threshold for every layer instead of measuring it")
    parser.add_argument("--dense-last", type=int, default=DEFAULT_DENSE_LAST,
                        help="query rows at the end of each sparse call that run dense (default %(default)s)")
    parser.add_argument("--no-measure", action="store_true",
                        help="do not time the dense crossover; use the default threshold")
    parser.add_argument("--crossover-lengths", type=_int_list, default=list(search.CROSSOVER_LENGTHS),
                        help="lengths the crossover is timed at (default %(default)s)")
    parser.add_argument("--layers-per-forward", type=_positive_int, default=None,
                        help="capture at most this many layers per forward pass (bounds memory)")
    parser.add_argument("--corpus", default="pg", help="corpus of the calibration text (default %(default)s)")
    parser.add_argument("--calibration-text", type=Path, default=None,
                        help="a text file to use as calibration filler instead of the corpus")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--yarn-factor", type=float, default=None, help="extend the context with YaRN by this factor")
    parser.add_argument("--cache-dir", default=None, help="cache root for models and corpora")
    parser.add_argument("--restart", action="store_true", help="discard an unfinished search of the same --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _candidates(args: argparse.Namespace) -> tuple | None:
    found: list = []
    if args.candidates_file is not None:
        found.extend(search.load_candidates(args.candidates_file))
    if args.candidates:
        found.extend(search.parse_candidate(text) for text in args.candidates)
    return tuple(found) or None


def _model_revision(name: str) -> str | None:
    from longinfer.models import zoo

    return f"sha256:{zoo.MODELS[name].file.sha256}" if name in zoo.MODELS else None


def run(args: argparse.Namespace) -> int:
    """Run the search; bad settings (candidates, a resume with other settings) print an error and return 1."""
    try:
        return _search(args)
    except (ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def _search(args: argparse.Namespace) -> int:
    """Load the model, search, write the plan, print its path."""
    import torch

    from longinfer.models import zoo
    from longinfer.plans.calibration import kv_retrieval_prompt

    candidates = _candidates(args)  # parse before the (slow) model load, so typos fail fast
    started = time.perf_counter()
    haystack_text = args.calibration_text.read_text(encoding="utf-8") if args.calibration_text else None
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, tokenizer = zoo.load(args.model, dtype=dtype, device=args.device, yarn_factor=args.yarn_factor,
                                cache_dir=args.cache_dir)
    context = int(getattr(model.config, "max_position_embeddings", 0) or search.DEFAULT_LENGTH)
    length = args.length or min(search.DEFAULT_LENGTH, context)
    if length > context:
        logger.warning("calibration length %d exceeds the model's context %d", length, context)
    out = args.out or Path(f"{Path(str(args.model)).name.removesuffix('.gguf')}-{length}.plan.json")
    calibration = kv_retrieval_prompt(tokenizer, length, corpus=args.corpus, seed=args.seed,
                                      haystack_text=haystack_text, cache_dir=args.cache_dir)
    search.search_plan(
        model, tokenizer, out=out, calibration=calibration, candidates=candidates,
        cost_budget=args.cost_budget, recall_tolerance=args.recall_tolerance, num_rows=args.rows, seed=args.seed,
        share_kv_groups=args.share_kv_groups, dense_below=args.dense_below, dense_last=args.dense_last,
        measure_crossover=not args.no_measure,
        crossover_lengths=args.crossover_lengths, layers_per_forward=args.layers_per_forward,
        model_id=str(args.model), model_revision=_model_revision(str(args.model)), restart=args.restart,
        progress=not args.no_progress, allocation=args.allocation,
    )
    logger.info("search finished in %.1f s (model load and calibration prompt included)%s",
                time.perf_counter() - started, _peak_gpu_memory(args.device))
    print(out)
    return 0


def _peak_gpu_memory(device: str | None) -> str:
    """``", peak GPU memory X GiB"`` on CUDA (``torch.cuda.max_memory_allocated``), else ``""``."""
    import torch

    if not torch.cuda.is_available() or (device is not None and not str(device).startswith("cuda")):
        return ""
    return f", peak GPU memory {torch.cuda.max_memory_allocated() / 1024**3:.2f} GiB"
