"""Session 15's plan files for the next GPU session, written from session 14's `perhead` plan
(28 layers of Qwen2.5-Coder-1.5B; coverage tau 0.9 from 64 strided queries, last 128 rows dense).

At 128K the default (each head its KV group's columns) loses 9.3 RULER-style points and the peer 1.2,
while a floor of 1,000 columns / 3,000 diagonals per head matched dense on the 15 prompts it finished
(TTFT 1.43x; the peer 1.27x, the default 1.86x). At 32K that floor made the index 62% dense, where
shared columns alone were within noise of dense at 25%. So:

- `q15-floor-v500-s1500-tail.json`: each head its own columns, at least 500 columns / 1,500 diagonals;
- `q15-gcols-floor-v500-s1500-tail.json`: the same floors, each head with its KV group's columns;
- `q15-gcols-floor-v1000-s3000-from64k-tail.json`: each head with its KV group's columns (the default's
  rule) and, on calls over at least 65,536 keys only (`floor_from`), at least 1,000 / 3,000: the
  default at 32K, a floor plan at 128K.

    python docs/results/gpu-session15/plans/make_plans.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "benchmarks"))  # run from the repository root
from plan_variants import with_params, write_variant  # noqa: E402

SOURCE = "docs/results/gpu-session14/plans/q15-perhead-tail.json"
OUT = "docs/results/gpu-session15/plans"
# name: (group_columns, min_vertical, min_slash, floor_from)
VARIANTS = {
    "floor-v500-s1500": (False, 500, 1500, 0),
    "gcols-floor-v500-s1500": (True, 500, 1500, 0),
    "gcols-floor-v1000-s3000-from64k": (True, 1000, 3000, 65536),
}
for name, (group_columns, min_vertical, min_slash, floor_from) in VARIANTS.items():
    changes = {"group_columns": group_columns, "min_vertical": min_vertical, "min_slash": min_slash}
    if floor_from:
        changes["floor_from"] = floor_from
    columns = "its KV group's columns" if group_columns else "its own columns"
    scope = f" on calls over at least {floor_from} keys" if floor_from else ""
    write_variant(SOURCE, OUT, name, with_params(**changes),
                  f"coverage tau 0.9 from 64 strided queries, last 128 rows dense, each head {columns}, at least "
                  f"{min_vertical} columns / {min_slash} diagonals per head{scope}")
