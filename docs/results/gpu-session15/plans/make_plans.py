"""Session 15's plan files for the next GPU session, written from session 14's `perhead` plan
(28 layers of Qwen2.5-Coder-1.5B; coverage tau 0.9 from 64 strided queries, last 128 rows dense).

At 128K the default (each head its KV group's columns) loses 9.3 RULER-style points and the peer 1.2,
while a floor of 1,000 columns / 3,000 diagonals per head matched dense on the 15 prompts it finished
(TTFT 1.43x; the peer 1.27x, the default 1.86x). Cheaper floors, with and without shared columns:

- `q15-floor-v500-s1500-tail.json`: each head its own columns, at least 500 columns / 1,500 diagonals;
- `q15-gcols-floor-v500-s1500-tail.json`: the same floors, each head with its KV group's columns.

    python docs/results/gpu-session15/plans/make_plans.py
"""
import json
import sys

SOURCE = "docs/results/gpu-session14/plans/q15-perhead-tail.json"
OUT = "docs/results/gpu-session15/plans"
# name: (group_columns, min_vertical, min_slash)
VARIANTS = {"floor-v500-s1500": (False, 500, 1500), "gcols-floor-v500-s1500": (True, 500, 1500)}
for name, (group_columns, min_vertical, min_slash) in VARIANTS.items():
    plan = json.load(open(SOURCE))
    for layer in plan["layers"]:
        for head in layer["heads"]:
            head["params"].update(group_columns=group_columns, min_vertical=min_vertical, min_slash=min_slash)
    columns = "its KV group's columns" if group_columns else "its own columns"
    plan["search"]["note"] = (
        f"coverage tau 0.9 from 64 strided queries, last 128 rows dense, each head {columns}, at least "
        f"{min_vertical} columns / {min_slash} diagonals per head; written by `{' '.join(sys.argv)}` from {SOURCE}")
    json.dump(plan, open(f"{OUT}/q15-{name}-tail.json", "w"), indent=1)
    print(name)
