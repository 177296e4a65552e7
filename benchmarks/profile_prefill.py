"""Where the GPU time of one sparse prefill goes: torch.profiler over a patched model's forward.

Prints the ops and kernels with the most CUDA time (the sparse attention kernel, the linear
layers, the model's elementwise work). The tokens are PG essays (``--text pg``, as the evaluations
use), or random ids (``--text random``: the index then differs from what text gives). The table in
``docs/results/gpu-qwen1.5b-128k/README.md`` and the session-5 turn profiles came from random ids
(device run, real-model setup of ``benchmarks/README.md``)::

    python3 benchmarks/profile_prefill.py --model qwen2.5-coder-1.5b --yarn 4 --length 131072 --text random

A follow-up turn over a cached prefix (issue 4's second turn)::

    python3 benchmarks/profile_prefill.py --model qwen2.5-coder-1.5b --prefix 65536 --length 4096 --sort cpu
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch
from torch.profiler import ProfilerActivity, profile

from longinfer.data import corpora
from longinfer.integrations import transformers as integration
from longinfer.models import zoo


def _crop(cache: Any, prefix: int) -> None:
    """Drop every cached position after the first ``prefix`` (negative ``crop``: every transformers 5 accepts it)."""
    extra = cache.get_seq_length() - prefix
    if extra > 0:
        cache.crop(-extra)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--yarn", type=float, default=None)
    parser.add_argument("--length", type=int, default=131072, help="tokens of the profiled forward")
    parser.add_argument("--prefix", type=int, default=0,
                        help="first prefill this many tokens into a KV cache, then profile --length new tokens over it")
    parser.add_argument("--plan", default=None, help="plan JSON (default: the default plan)")
    parser.add_argument("--rows", type=int, default=14, help="table rows")
    parser.add_argument("--text", choices=("pg", "random"), default="pg",
                        help="PG essays (the haystack corpus) or random token ids")
    parser.add_argument("--sort", choices=("cuda", "cpu"), default="cuda",
                        help="rank ops by CUDA time, or by CPU time (host overhead of short forwards)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    model, tokenizer = zoo.load(args.model, yarn_factor=args.yarn)
    total = args.prefix + args.length
    if args.text == "random":
        ids = torch.randint(1000, 20000, (1, total), device="cuda")
    else:
        ids = torch.tensor([corpora.haystack_ids(tokenizer, total, "pg")], device="cuda")
    integration.patch(model, args.plan)
    cache = None
    with torch.inference_mode():
        if args.prefix:
            cache = model(input_ids=ids[:, : args.prefix], use_cache=True, logits_to_keep=1).past_key_values

        def forward() -> None:
            model(input_ids=ids[:, args.prefix:], past_key_values=cache, use_cache=cache is not None, logits_to_keep=1)
            if cache is not None:
                _crop(cache, args.prefix)

        forward()  # warm-up: compilation, autotuning
        torch.cuda.synchronize()
        started = time.perf_counter()
        forward()
        torch.cuda.synchronize()
        what = f"{args.length} tokens" + (f" over a cached {args.prefix}" if args.prefix else "")
        print(f"sparse forward of {what}: {(time.perf_counter() - started) * 1e3:.1f} ms")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            forward()
            torch.cuda.synchronize()
    sort = "cuda_time_total" if args.sort == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=50))
    return 0


if __name__ == "__main__":
    sys.exit(main())
