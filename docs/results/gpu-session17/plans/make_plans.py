"""Session 17's plan files for the next GPU session, written from session 14's `perhead` plan
(28 layers of Qwen2.5-Coder-1.5B; coverage tau 0.9 from strided estimation queries, each head its
own columns, last 128 rows dense, layers dense below 16,384 keys).

Session 17 measured that the 3,000-diagonal floor carries the long rule's accuracy at 128K (68.6,
-2.3; 1,000 columns alone: 57.5) but costs most of its kernel time (diagonals alone 201 of 215 ms
over 4 layers), and that at 64K neither rule holds dense's accuracy (long rule -4.8 at 1.02x TTFT).
Two questions:

- Is the floor a stand-in for a better estimate? In a long prefill the estimate is cheap (1.96 ms of
  223 over 4 layers at 128K), and at 32K 4,096 estimation queries instead of 64 recovered 8 of 11
  points (session 12). `q15-lq1024-tail.json`: 1,024 estimation queries, no floor;
  `q15-lq1024-s1500-tail.json`: the same with a floor of 1,500 diagonals.
  `q15-lq256-tail.json`: 256 queries, no floor (cheaper: a 128K estimate from many queries runs its
  diagonal sums through float32 atomics, since one KV group's scratch exceeds 256 MiB).
- Does the floor scale with length? 3,000 diagonals are 2.3% of a 128K prompt's offsets, 4.6% of a
  64K one's (44% dense there). `q15-s1500-tail.json`: a floor of 1,500 diagonals (2.3% at 64K).
- Does a content-based pattern hold the long-range pairs the diagonals catch by number?
  `q15-bs-cov0.9-tail.json`: block-sparse everywhere (mean-pooled 64-token blocks, per query block the
  fewest key blocks whose estimated mass reaches 0.9, at most 1,024), same dense layers and last rows.
  At 128K its attention recall was 0.879 / 0.801 (mean / p10) at 15.9% against vertical-slash tau
  0.9's 0.888 / 0.829 at 16.4% (`../gpu-qwen1.5b-128k/frontier/`); its RULER-style score is not known.

    python docs/results/gpu-session17/plans/make_plans.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "benchmarks"))  # run from the repository root
from plan_variants import write_variant, with_params  # noqa: E402

SOURCE = "docs/results/gpu-session14/plans/q15-perhead-tail.json"
OUT = "docs/results/gpu-session17/plans"
VARIANTS = {  # name: (estimation queries, min_slash)
    "lq1024": (1024, 0),
    "lq1024-s1500": (1024, 1500),
    "lq256": (256, 0),
    "s1500": (64, 1500),
}
BLOCK_SPARSE = {"pattern": "block_sparse", "params": {"num_blocks": 1024, "block_size": 64, "budget": "coverage",
                                                      "tau": 0.9}}

for name, (last_q, min_slash) in VARIANTS.items():
    write_variant(SOURCE, OUT, name,
                  with_params(group_columns=False, last_q=last_q, min_vertical=0, min_slash=min_slash),
                  f"coverage tau 0.9 from {last_q} strided queries, last 128 rows dense, each head its own columns, "
                  f"at least {min_slash} diagonals per head")
write_variant(SOURCE, OUT, "bs-cov0.9", lambda head: BLOCK_SPARSE,
              "block-sparse, coverage tau 0.9 of mean-pooled 64-token blocks, at most 1,024 key blocks, last 128 "
              "rows dense")
