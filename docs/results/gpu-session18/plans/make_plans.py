"""Session 18's plan files for the next GPU session, written from session 14's `perhead` plan
(28 layers of Qwen2.5-Coder-1.5B; last 128 rows dense, layers dense below 16,384 keys).

At 64K every sparse plan of sessions 17-18 loses the same prompts: `niah_multikey` i3 answers
`7106080` instead of dense's `7106049` under five different indexes from 17.5% to 45% density, and
at 128K a few prompts flip under all six plans compared. Is it the index, or our kernel's bfloat16
numerics on prompts that any perturbation flips? `q15-exact-kernel-tail.json` is the control: every
head A-shape with no sinks and a 1,048,576-key window, i.e. exact causal attention computed by
longinfer's own Triton kernel (the same tiles, online softmax and bfloat16 products as the sparse
kernel), through the same integration (last 128 rows dense).

32-row query tiles: a lone diagonal costs a 32-key range per row instead of 64, so the scattered
diagonals of an index compute half the pairs (in smaller tiles). `q15-s3000-bs32-tail.json` is the
default's long rule (each head its own columns, at least 3,000 diagonals) on 32-row tiles, for
RULER-style and TTFT at 128K against the default's 68.6 at 1.44x; `q15-gcols-bs32-tail.json` the
default's short rule (each head its KV group's columns, no floor) on 32-row tiles, for the 4K turn
over a cached 64K (the default 2.52x).

    python docs/results/gpu-session18/plans/make_plans.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "benchmarks"))  # run from the repository root
from plan_variants import with_params, write_variant  # noqa: E402

SOURCE = "docs/results/gpu-session14/plans/q15-perhead-tail.json"
OUT = "docs/results/gpu-session18/plans"
EXACT_KERNEL = {"pattern": "a_shape", "params": {"sink": 0, "window": 1048576}}


write_variant(SOURCE, OUT, "exact-kernel", lambda head: EXACT_KERNEL,
              "every head A-shape with no sinks and a 1,048,576-key window: exact causal attention computed by "
              "longinfer's Triton kernel (a control for numerics against dense SDPA), last 128 rows dense")
write_variant(SOURCE, OUT, "s3000-bs32", with_params(min_slash=3000, block_size=32),
              "coverage tau 0.9 from 64 strided queries on 32-row query tiles, last 128 rows dense, each head its own "
              "columns, at least 3000 diagonals per head")
write_variant(SOURCE, OUT, "gcols-bs32", with_params(block_size=32, group_columns=True),
              "coverage tau 0.9 from 64 strided queries on 32-row query tiles, last 128 rows dense, each head its KV "
              "group's columns, no floor")
