"""Session 14's plan files, written from session 13's `gcols` plan (the new default's rule: each head
attends its KV group's columns; 28 layers of Qwen2.5-Coder-1.5B):

- `q15-perhead-tail.json`: the default of sessions 10-13 (each head its own columns), so runs after the
  default changed can still compare against it by name;
- `q15-gcols-tau0.85-tail.json`: shared columns at coverage tau 0.85, between tau 0.9 (RULER 32K 74.9,
  turn 2.21x) and 0.8 (71.9, 2.56x);
- `q15-gcols-cap1024-tail.json`: shared columns with at most 1,024 columns per head before the union
  (4,096 in the default), so a group's union stays within 6,144 at 6 heads per group: does the union's
  accuracy survive a smaller share per head, at a lower density?

    python docs/results/gpu-session14/plans/make_plans.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "benchmarks"))  # run from the repository root
from plan_variants import with_params, write_variant  # noqa: E402

SOURCE = "docs/results/gpu-session13/plans/q15-gcols-tail.json"
OUT = "docs/results/gpu-session14/plans"
DEFAULT = "session 14's default (each head its KV group's columns, its own diagonals)"
# name: (group_columns, tau, num_vertical, note)
VARIANTS = {
    "perhead": (False, 0.9, 4096, "the default plan of sessions 10-13 (coverage tau 0.9 from 64 strided queries, "
                                  "each head its own columns, last 128 rows dense)"),
    "gcols-tau0.85": (True, 0.85, 4096, f"{DEFAULT} at coverage tau 0.85"),
    "gcols-cap1024": (True, 0.9, 1024, f"{DEFAULT} with at most 1,024 columns per head before the union"),
}
for name, (group_columns, tau, num_vertical, note) in VARIANTS.items():
    write_variant(SOURCE, OUT, name, with_params(group_columns=group_columns, tau=tau, num_vertical=num_vertical), note)
