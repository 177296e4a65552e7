"""Session 12's plans for the next GPU session: the default plan (q15-exact-tail.json with last_q back
at 64) with the column mass estimated from more queries (column_q), and lower coverage targets."""
import json
import sys

SOURCE = "docs/results/gpu-session11/plans/q15-exact-tail.json"
OUT = "docs/results/gpu-session12/plans"
VARIANTS = {  # name: (last_q, column_q, tau)
    "cq1024": (64, 1024, 0.9), "cq4096": (64, 4096, 0.9), "cq4096-tau0.8": (64, 4096, 0.8),
    "cq16384-tau0.8": (64, 16384, 0.8), "lq4096-tau0.8": (4096, 0, 0.8),
}
for name, (last_q, column_q, tau) in VARIANTS.items():
    plan = json.load(open(SOURCE))
    for layer in plan["layers"]:
        for head in layer["heads"]:
            head["params"].update(last_q=last_q, column_q=column_q, tau=tau)
    plan["search"]["note"] = (
        f"the default plan (coverage tau={tau}, last 128 rows dense, {last_q} strided estimation queries) with the "
        f"column mass from {column_q or last_q} strided queries (column_q={column_q}); written by "
        f"`{' '.join(sys.argv)}` from {SOURCE}")
    json.dump(plan, open(f"{OUT}/q15-{name}-tail.json", "w"), indent=1)
    print(name)
