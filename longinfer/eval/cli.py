"""``longinfer eval TASK``: run an evaluation task for several attention methods, then report.

Examples::

    longinfer eval needle --model qwen2.5-coder-0.5b --methods dense,longinfer \\
        --lengths 8K,16K,32K --out results/q05
    longinfer eval latency --model qwen2.5-coder-1.5b --yarn 4 --lengths 8K,16K,32K,64K,128K --out results/q15
    longinfer eval report results/q05/needle.jsonl

Results go to ``<out>/<task>.jsonl`` (a rerun resumes it); the report is written next to it as
``<task>.md`` plus PNGs. The CLI only parses arguments and calls :mod:`longinfer.eval`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
from pathlib import Path
from typing import Any

from .cases import Task
from .methods import parse_methods
from .prompts import Haystack

logger = logging.getLogger(__name__)

__all__ = ["register", "parse_lengths", "parse_floats"]


def parse_lengths(text: str) -> list[int]:
    """``"2048,8K,1M"`` -> ``[2048, 8192, 1048576]`` (K = 1024, M = 1024**2)."""
    lengths = []
    for item in text.split(","):
        item = item.strip().upper()
        if not item:
            continue
        scale = {"K": 1024, "M": 1024**2}.get(item[-1], 1)
        digits = item[:-1] if scale > 1 else item
        if not digits.isdigit() or int(digits) == 0:
            raise argparse.ArgumentTypeError(
                f"bad length '{item}': use positive integers like 4096, 8K or 1M"
            )
        lengths.append(int(digits) * scale)
    if not lengths:
        raise argparse.ArgumentTypeError("no lengths given; use e.g. --lengths 4K,8K")
    return lengths


def parse_floats(text: str) -> list[float]:
    """``"0,0.5,1"`` -> ``[0.0, 0.5, 1.0]``."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad number list '{text}': {exc}") from exc


def load_haystack(spec: str) -> Haystack:
    """A haystack from a ``.txt`` file or a folder of them, or a :mod:`longinfer.data.corpora` name."""
    if Path(spec).exists():
        return Haystack.from_files([spec])
    corpora = importlib.import_module("longinfer.data.corpora")
    documents = corpora.load_corpus(spec)
    return Haystack.from_text(corpora.DOCUMENT_SEPARATOR.join(documents), name=spec)


def build_task(args: argparse.Namespace, haystack: Haystack) -> Task:
    """The task object for the parsed command line."""
    from .latency import LatencyTask
    from .needle import NeedleTask
    from .ppl import PerplexityTask
    from .ruler import RulerTask

    chat = {"auto": None, "on": True, "off": False}[args.chat_template]
    if args.task == "needle":
        return NeedleTask(
            haystack,
            depths=args.depths,
            needles_per_cell=args.needles_per_cell,
            seed=args.seed,
            use_chat_template=chat,
        )
    if args.task == "ruler":
        tasks = [t.strip() for t in args.ruler_tasks.split(",")] if args.ruler_tasks else None
        kwargs: dict[str, Any] = {"tasks": tasks} if tasks else {}
        return RulerTask(haystack, samples=args.samples, seed=args.seed, use_chat_template=chat,
                         reference_logprob=not args.no_reference_logprob, **kwargs)
    if args.task == "ppl":
        return PerplexityTask(
            haystack, eval_tokens=args.eval_tokens, samples=args.samples, chunk_size=args.chunk_size
        )
    if args.task == "latency":
        return LatencyTask(haystack, repeats=args.repeats, warmup=args.warmup)
    raise ValueError(f"unknown task {args.task}")


_NOT_IN_COMMAND = {"func", "command", "task", "verbose", "record_command", "no_report"}


def canonical_command(args: argparse.Namespace) -> str:
    """The full command line of a run, every option spelled out, to store with its results."""
    parts = ["longinfer", "eval", args.task]
    for key, value in sorted(vars(args).items()):
        if key in _NOT_IN_COMMAND or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts += [flag, ",".join(str(v) for v in value)]
        else:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def _load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch

    zoo = importlib.import_module("longinfer.models.zoo")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    return zoo.load(args.model, dtype=dtype, device=args.device, yarn_factor=args.yarn)


def _run(args: argparse.Namespace) -> int:
    from .report import render_report
    from .runner import run_task

    methods = parse_methods(args.methods)
    timing_only = [m.name for m in methods if m.timing_only]
    if timing_only and args.task != "latency":
        raise ValueError(
            f"{', '.join(timing_only)} computes no attention (a timing floor) and only fits the latency task, "
            f"not '{args.task}'; drop it from --methods"
        )
    for method in methods:
        method.prepare()  # fail before the model load (the peer: PEER_SITE, CUDA)
    haystack = load_haystack(args.haystack)
    task = build_task(args, haystack)
    model, tokenizer = _load_model(args)
    out_jsonl = Path(args.out) / f"{args.task}.jsonl"
    extra: dict[str, Any] = {"command": canonical_command(args)} if args.record_command else {}
    if args.yarn:
        extra["yarn_factor"] = args.yarn
    summary = run_task(
        task, model, tokenizer, methods, args.lengths, out_jsonl=out_jsonl, model_name=args.model, extra=extra
    )
    logger.info(
        "%s: %d cases run, %d already recorded, %d out of memory -> %s",
        args.task,
        summary.ran,
        summary.skipped,
        summary.oom,
        out_jsonl,
    )
    if not args.no_report:
        logger.info("report: %s", render_report(out_jsonl, baseline=args.baseline))
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import render_report

    for path in args.results:
        logger.info("report: %s", render_report(path, args.out, baseline=args.baseline))
    return 0


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help="zoo name, .gguf file, HF folder or id (default: smollm2-135m)",
    )
    parser.add_argument(
        "--methods",
        default="dense,longinfer",
        help="comma list: dense, dense:<impl>, longinfer, longinfer:<plan.json>, peer, peer:<V>,<S>, none "
        "(none: no attention, the latency floor; the peer: minference 0.1.6 built by "
        "benchmarks/gpu_session.sh into $PEER_SITE; GPU only)",
    )
    parser.add_argument(
        "--lengths", type=parse_lengths, default=parse_lengths("4K"), help="prompt lengths, e.g. 8K,16K,32K"
    )
    parser.add_argument("--out", required=True, help="output folder; results go to <out>/<task>.jsonl")
    parser.add_argument(
        "--haystack", default="pg", help="corpus name (pg, sotu) or a .txt file / folder (default: pg)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument(
        "--yarn", type=float, default=None, help="extend the context with YaRN by this factor"
    )
    parser.add_argument(
        "--chat-template",
        default="auto",
        choices=["auto", "on", "off"],
        help="frame prompts with the chat template",
    )
    parser.add_argument(
        "--baseline", default="dense", help="method the report compares against (default: dense)"
    )
    parser.add_argument("--no-report", action="store_true", help="only write the JSONL")
    parser.add_argument(
        "--no-record-command",
        dest="record_command",
        action="store_false",
        help="do not store the command line in records",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval`` with one sub-command per task plus ``report``."""
    parser = subparsers.add_parser(
        "eval", help="evaluate attention methods: needle, ruler, ppl, latency, report"
    )
    tasks = parser.add_subparsers(dest="task", required=True, metavar="TASK")

    needle = tasks.add_parser("needle", help="needle in a haystack over lengths x depths")
    needle.add_argument("--depths", type=parse_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    needle.add_argument("--needles-per-cell", type=int, default=3)

    ruler = tasks.add_parser("ruler", help="RULER-style synthetic suite")
    ruler.add_argument("--ruler-tasks", default=None, help="comma list (default: all seven)")
    ruler.add_argument("--samples", type=int, default=5, help="cases per sub-task and length")
    ruler.add_argument("--no-reference-logprob", action="store_true",
                       help="do not score the expected answer's log-probability after each prompt (one short "
                            "forward over the prefill's KV cache; needs a croppable cache)")

    ppl = tasks.add_parser("ppl", help="perplexity of the last tokens of long text")
    ppl.add_argument("--eval-tokens", type=int, default=1024)
    ppl.add_argument("--samples", type=int, default=1, help="disjoint text windows per length")
    ppl.add_argument("--chunk-size", type=int, default=1024, help="positions per LM-head call")

    latency = tasks.add_parser("latency", help="time to first token and peak memory vs length")
    latency.add_argument("--repeats", type=int, default=3)
    latency.add_argument("--warmup", type=int, default=1)

    for task_parser in (needle, ruler, ppl, latency):
        _add_common(task_parser)
        task_parser.set_defaults(func=_run)

    report = tasks.add_parser("report", help="render markdown + PNG reports from result JSONL files")
    report.add_argument("results", nargs="+", help="result .jsonl files")
    report.add_argument("--out", default=None, help="output folder (default: next to each file)")
    report.add_argument("--baseline", default="dense")
    report.set_defaults(func=_report)

    from .recall import register_recall  # the recall-density frontier, with its own options

    register_recall(tasks)
