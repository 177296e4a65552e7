"""Where the GPU time of one sparse prefill goes: torch.profiler over a patched model's forward.

Prints the ops and kernels with the most CUDA time (the sparse attention kernel, the linear
layers, the model's elementwise work). Random token ids: the index then differs from real text,
so use it for the split of the time, not for density or accuracy. The table in
``docs/results/gpu-qwen1.5b-128k/README.md`` came from (device run, real-model setup of
``benchmarks/README.md``)::

    python3 benchmarks/profile_prefill.py --model qwen2.5-coder-1.5b --yarn 4 --length 131072
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch
from torch.profiler import ProfilerActivity, profile

from longinfer.integrations import transformers as integration
from longinfer.models import zoo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--yarn", type=float, default=None)
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--plan", default=None, help="plan JSON (default: the default plan)")
    parser.add_argument("--rows", type=int, default=14, help="table rows")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    model, _ = zoo.load(args.model, yarn_factor=args.yarn)
    ids = torch.randint(1000, 20000, (1, args.length), device="cuda")
    integration.patch(model, args.plan)
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)  # warm-up: compilation, autotuning
        torch.cuda.synchronize()
        started = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        print(f"sparse forward: {time.perf_counter() - started:.3f} s")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=50))
    return 0


if __name__ == "__main__":
    sys.exit(main())
