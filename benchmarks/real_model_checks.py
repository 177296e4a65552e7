"""Sparse vs dense on a real model: last-token logits, greedy answers, and a second turn over a cache.

Two checks of issue 4 on real weights (GPU run; also runs on CPU at small sizes):

1. **One-shot prefill** (``--lengths`` x ``--depths``): a needle prompt (PG essays) is prefilled
   once with dense attention (transformers SDPA) and once with longinfer (``--plan``, default: the
   library's default plan), both with ``logits_to_keep=1``. Recorded: the largest |logit
   difference| at the last prompt token, whether the top-1 token agrees, the KL divergence
   (dense || sparse) of the next-token distributions, the greedy answers (``--max-new-tokens``),
   whether each contains the needle value, and the attention density.
2. **Second turn over a cached prefix** (``--turn-prefix`` + ``--turn-length``): a needle prompt of
   ``prefix + turn`` tokens whose last ``turn`` tokens (more haystack and the question) arrive as a
   follow-up. The prefix is prefilled once per method and cached; the turn is then prefilled over
   the cache, timed, and decoded greedily. Timing: ``torch.cuda.synchronize`` around the turn's
   forward, median of ``--repeats`` runs, the cache cropped back to the prefix between runs.
   Attention time = turn time with the method minus turn time with a no-op attention function
   (returns zeros; everything else of the forward is the same), so the ratio dense/sparse of
   attention time is what the sparse kernels win, and the end-to-end turn time is reported too.
   Sparse runs twice: as patched by default (repeated calls replayed from CUDA graphs) and with
   ``cuda_graphs=False`` (every call launched eagerly), to show what the graphs win.

Writes ``real_model_checks.json`` and ``.md`` into ``--out`` after every case (a rerun with the
same ``--out`` skips finished cases).

Usage (device run, model carried as in benchmarks/README.md)::

    PYTHONPATH=/tmp/gg:. python3 benchmarks/real_model_checks.py --model /tmp/m/model.gguf \\
        --lengths 8192,16384,32768 --turn-prefix 28672 --turn-length 4096 --out $OUT/checks
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch

import longinfer
from longinfer.eval.cli import load_haystack
from longinfer.eval.methods import DenseMethod, LonginferMethod, NoAttentionMethod
from longinfer.eval.needle import Needle, build_needle_prompt, contains_exact_value, random_needle
from longinfer.eval.report import markdown_table
from longinfer.integrations import transformers as integration
from longinfer.models import zoo
from longinfer.ops import sparse as ops_sparse
from longinfer.patterns import vertical_slash

logger = logging.getLogger("real_model_checks")

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _next_token_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits ``[V]`` of the token after ``ids`` ``[1, N]`` (one prefill, last position only)."""
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return out.logits[0, -1].float()


def _greedy(model: Any, tokenizer: Any, ids: torch.Tensor, max_new_tokens: int) -> str:
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _compare_logits(dense: torch.Tensor, sparse: torch.Tensor) -> dict[str, float | bool]:
    log_p = torch.log_softmax(dense, dim=-1)
    log_q = torch.log_softmax(sparse, dim=-1)
    return {
        "max_abs_logit_diff": float((dense - sparse).abs().max()),
        "dense_logit_range": float(dense.max() - dense.min()),
        "top1_agree": bool(dense.argmax() == sparse.argmax()),
        "kl_dense_sparse": float((log_p.exp() * (log_p - log_q)).sum()),
    }


class Recorder:
    """Append-only case records in ``<out>/real_model_checks.json`` (+ ``.md``), resumable by key."""

    def __init__(self, out: Path, header: dict[str, Any]) -> None:
        self.path = out / "real_model_checks.json"
        out.mkdir(parents=True, exist_ok=True)
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"header": header, "cases": []}
        self.data["header"] = header

    def done(self, key: str) -> bool:
        return any(case["key"] == key for case in self.data["cases"])

    def add(self, record: dict[str, Any]) -> None:
        self.data["cases"].append(record)
        self.path.write_text(json.dumps(self.data, indent=1))
        self.path.with_suffix(".md").write_text(render_markdown(self.data))


def render_markdown(data: dict[str, Any]) -> str:
    header = data["header"]
    lines = [f"# Sparse vs dense on {header['model']}", "",
             f"- date {header['date']}, device {header['device']}, torch {header['torch']}, "
             f"transformers {header['transformers']}",
             f"- plan: {header['plan']}", f"- command: `{header['command']}`", ""]
    one_shot = [c for c in data["cases"] if c["check"] == "one_shot"]
    if one_shot:
        lines += ["## One-shot prefill: last prompt token and greedy answer", "",
                  markdown_table(
                      ["length", "depth", "max abs logit diff (range)", "top-1", "KL", "density",
                       "dense answer ok", "sparse answer ok", "same text"],
                      [[c["length"], c["depth"], f"{c['max_abs_logit_diff']:.3f} ({c['dense_logit_range']:.1f})",
                        "same" if c["top1_agree"] else "DIFF", f"{c['kl_dense_sparse']:.2e}",
                        f"{c['density']:.3f}", c["dense_pass"], c["sparse_pass"], c["same_answer"]]
                       for c in one_shot]), ""]
    turns = [c for c in data["cases"] if c["check"] == "second_turn"]
    if turns:
        lines += ["## Second turn over a cached prefix", "",
                  "Turn time: median of the repeats, CUDA-synchronized. Attention time: turn time minus the "
                  "same forward with a no-op attention.", "",
                  markdown_table(
                      ["prefix + turn", "depth", "dense turn ms", "sparse turn ms", "dense attn ms",
                       "sparse attn ms", "attn speedup", "without graphs: attn ms", "speedup", "density",
                       "dense ok", "sparse ok", "same text"],
                      [[f"{c['prefix']} + {c['turn']}", c["depth"], f"{c['dense_turn_ms']:.1f}",
                        f"{c['sparse_turn_ms']:.1f}", f"{c['dense_attention_ms']:.1f}",
                        f"{c['sparse_attention_ms']:.1f}", f"{c['attention_speedup']:.2f}x",
                        f"{c.get('sparse_eager_attention_ms', math.nan):.1f}",
                        f"{c.get('sparse_eager_attention_speedup', math.nan):.2f}x",
                        f"{c['density']:.3f}", c["dense_pass"], c["sparse_pass"], c["same_answer"]]
                       for c in turns]), ""]
    return "\n".join(lines)


def _needle_ids(tokenizer: Any, haystack: Any, length: int, depth: float, seed: int,
                device: torch.device) -> tuple[torch.Tensor, Needle]:
    import random

    prompt = build_needle_prompt(tokenizer, haystack, length, depth,
                                 random_needle(random.Random(f"checks/{seed}/{length}/{depth}")))
    return torch.tensor([prompt.input_ids], device=device), prompt.needle


def one_shot_case(model: Any, tokenizer: Any, ids: torch.Tensor, needle: Needle, plan: Any,
                  max_new_tokens: int) -> dict[str, Any]:
    """Dense vs sparse prefill of one prompt (see the module docstring, check 1)."""
    with DenseMethod().activate(model):
        dense_logits = _next_token_logits(model, ids)
        dense_text = _greedy(model, tokenizer, ids, max_new_tokens)
    with LonginferMethod(plan).activate(model):
        sparse_logits = _next_token_logits(model, ids)
        density = integration.attention_stats(model).density
        sparse_text = _greedy(model, tokenizer, ids, max_new_tokens)
    return {**_compare_logits(dense_logits, sparse_logits), "density": density,
            "dense_answer": dense_text, "sparse_answer": sparse_text,
            "dense_pass": contains_exact_value(dense_text, needle.value),
            "sparse_pass": contains_exact_value(sparse_text, needle.value),
            "same_answer": dense_text == sparse_text, "needle_value": needle.value}


def _crop(cache: Any, prefix: int) -> None:
    """Drop everything after the first ``prefix`` positions (negative ``crop``: the form every
    transformers 5 release accepts)."""
    extra = cache.get_seq_length() - prefix
    if extra > 0:
        cache.crop(-extra)


def _time_turn(model: Any, turn_ids: torch.Tensor, cache: Any, prefix: int, repeats: int) -> float:
    """Median ms of the turn's forward over the cache; the cache is cropped back after each run."""
    device = turn_ids.device
    times = []
    for _ in range(repeats + 1):  # the first run warms up (kernel compilation, allocator)
        _sync(device)
        started = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=turn_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        _sync(device)
        times.append((time.perf_counter() - started) * 1e3)
        _crop(cache, prefix)
    return statistics.median(times[1:])


def _turn_answer(model: Any, tokenizer: Any, ids: torch.Tensor, cache: Any, prefix: int,
                 max_new_tokens: int) -> str:
    """Greedy answer of the whole prompt with the prefix taken from ``cache`` (cropped back after)."""
    with torch.inference_mode():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    _crop(cache, prefix)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _prefill_cache(model: Any, prefix_ids: torch.Tensor) -> Any:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=prefix_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache


def second_turn_case(model: Any, tokenizer: Any, ids: torch.Tensor, needle: Needle, plan: Any, turn: int,
                     repeats: int, max_new_tokens: int) -> dict[str, Any]:
    """Dense vs sparse second turn of ``turn`` tokens over a cached prefix (module docstring, check 2)."""
    prefix = ids.shape[1] - turn
    prefix_ids, turn_ids = ids[:, :prefix], ids[:, prefix:]
    results: dict[str, Any] = {}
    no_attention = NoAttentionMethod()
    methods = (("dense", DenseMethod()), ("sparse", LonginferMethod(plan)),
               ("sparse_eager", LonginferMethod(plan, cuda_graphs=False)))
    for method, activation in methods:
        with activation.activate(model):
            cache = _prefill_cache(model, prefix_ids)
            results[f"{method}_turn_ms"] = _time_turn(model, turn_ids, cache, prefix, repeats)
            if method != "dense":
                integration.reset_stats(model)
            text = _turn_answer(model, tokenizer, ids, cache, prefix, max_new_tokens)
            if method != "dense":
                results[f"{method}_density"] = integration.attention_stats(model).density
            with no_attention.activate(model):
                null_ms = _time_turn(model, turn_ids, cache, prefix, repeats)
        results[f"{method}_null_ms"] = null_ms
        results[f"{method}_attention_ms"] = results[f"{method}_turn_ms"] - null_ms
        results[f"{method}_answer"] = text
        results[f"{method}_pass"] = contains_exact_value(text, needle.value)
        del cache
    results["density"] = results.pop("sparse_density")
    for method in ("sparse", "sparse_eager"):
        results[f"{method}_attention_speedup"] = (results["dense_attention_ms"]
                                                  / max(results[f"{method}_attention_ms"], 1e-6))
    results["attention_speedup"] = results.pop("sparse_attention_speedup")
    results["same_answer"] = results["dense_answer"] == results["sparse_answer"]
    results["needle_value"] = needle.value
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", help="zoo name, .gguf file or HF folder")
    parser.add_argument("--plan", default=None, help="plan JSON (default: the library's default plan)")
    parser.add_argument("--lengths", default="8192,16384,32768", help="one-shot prompt lengths ('' = none)")
    parser.add_argument("--depths", default="0.1,0.5,0.9")
    parser.add_argument("--turn-prefix", type=int, default=28672, help="cached prefix tokens (0 = no turn check)")
    parser.add_argument("--turn-length", type=int, default=4096)
    parser.add_argument("--turn-depths", default="0.5")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--yarn", type=float, default=None, help="YaRN factor (e.g. 4 for 128K on Qwen2.5)")
    parser.add_argument("--haystack", default="pg")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--cache-dir", default=None, help="longinfer cache root (zoo models, corpora)")
    parser.add_argument("--selection", choices=("auto", "torch", "triton"), default="auto",
                        help="backend of the vertical-slash budget (select_packed's default, auto: Triton on CUDA "
                             "for coverage budgets over long rows, else torch)")
    parser.add_argument("--tail-launch", choices=("fused", "separate"), default=None,
                        help="how the dense last rows run (longinfer.ops.sparse.TAIL_LAUNCH; default: the library's)")
    parser.add_argument("--out", required=True)
    return parser


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.cache_dir:
        import os

        os.environ["LONGINFER_CACHE"] = args.cache_dir
    if args.selection != "auto":  # benchmark switch: the library's default backend, for this process only
        vertical_slash.select_packed.__kwdefaults__["backend"] = args.selection
    if args.tail_launch is not None:  # the same, for the dense tail's launch
        ops_sparse.TAIL_LAUNCH = args.tail_launch
    device = torch.device(args.device or zoo.default_device())
    model, tokenizer = zoo.load(args.model, device=device, yarn_factor=args.yarn, cache_dir=args.cache_dir)
    integration.register()
    plan = args.plan
    header = {
        "model": str(args.model), "yarn": args.yarn, "plan": plan or "default",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "longinfer": longinfer.__version__, "selection": args.selection,
        "tail_launch": ops_sparse.TAIL_LAUNCH, "dtype": str(next(model.parameters()).dtype),
        "command": "python3 benchmarks/real_model_checks.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
    }
    recorder = Recorder(Path(args.out), header)
    haystack = load_haystack(args.haystack)
    for length in _ints(args.lengths):
        for depth in _floats(args.depths):
            key = f"one_shot/{length}/{depth}"
            if recorder.done(key):
                continue
            ids, needle = _needle_ids(tokenizer, haystack, length, depth, args.seed, device)
            record = one_shot_case(model, tokenizer, ids, needle, plan, args.max_new_tokens)
            recorder.add({"key": key, "check": "one_shot", "length": length, "depth": depth, **record})
            logger.info("%s: logit diff %.3f, top-1 %s, dense %s sparse %s", key, record["max_abs_logit_diff"],
                        record["top1_agree"], record["dense_pass"], record["sparse_pass"])
    if args.turn_prefix > 0:
        for depth in _floats(args.turn_depths):
            key = f"second_turn/{args.turn_prefix}+{args.turn_length}/{depth}"
            if recorder.done(key):
                continue
            total = args.turn_prefix + args.turn_length
            # the needle sits in the prefix: scale its depth into the prefix's share of the prompt
            ids, needle = _needle_ids(tokenizer, haystack, total, depth * args.turn_prefix / total, args.seed,
                                      device)
            record = second_turn_case(model, tokenizer, ids, needle, plan, args.turn_length, args.repeats,
                                      args.max_new_tokens)
            recorder.add({"key": key, "check": "second_turn", "prefix": args.turn_prefix, "turn": args.turn_length,
                          "depth": depth, **record})
            logger.info("%s: attention %.1f -> %.1f ms (%.2fx), dense %s sparse %s", key,
                        record["dense_attention_ms"], record["sparse_attention_ms"], record["attention_speedup"],
                        record["dense_pass"], record["sparse_pass"])
    print(recorder.path.with_suffix(".md").read_text())
    return 0 if all(not math.isnan(c.get("density", 0.0)) for c in recorder.data["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
