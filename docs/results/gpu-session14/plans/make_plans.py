"""Session 14's plan files: the default plan until session 13 (each head its own columns), so runs
after the default changed to shared KV-group columns can still compare against it by name. Written
from session 13's `gcols` plan (the new default's rule, 28 layers of Qwen2.5-Coder-1.5B) with
`group_columns` off.

    python docs/results/gpu-session14/plans/make_plans.py
"""
import json
import sys

SOURCE = "docs/results/gpu-session13/plans/q15-gcols-tail.json"
OUT = "docs/results/gpu-session14/plans"

plan = json.load(open(SOURCE))
for layer in plan["layers"]:
    for head in layer["heads"]:
        head["params"]["group_columns"] = False
plan["search"]["note"] = (
    "the default plan of sessions 10-13 (coverage tau 0.9 from 64 strided queries, each head its own "
    f"columns, last 128 rows dense); written by `{' '.join(sys.argv)}` from {SOURCE}")
json.dump(plan, open(f"{OUT}/q15-perhead-tail.json", "w"), indent=1)
print("q15-perhead-tail")
