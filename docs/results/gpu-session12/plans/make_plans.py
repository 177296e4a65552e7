"""Session 12's plans for the next GPU session: the default plan (q15-exact-tail.json with last_q back
at 64) with the column mass estimated from more queries (column_q), and lower coverage targets."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "benchmarks"))  # run from the repository root
from plan_variants import with_params, write_variant  # noqa: E402

SOURCE = "docs/results/gpu-session11/plans/q15-exact-tail.json"
OUT = "docs/results/gpu-session12/plans"
VARIANTS = {  # name: (last_q, column_q, tau)
    "cq1024": (64, 1024, 0.9), "cq4096": (64, 4096, 0.9), "cq4096-tau0.8": (64, 4096, 0.8),
    "cq16384-tau0.8": (64, 16384, 0.8), "lq4096-tau0.8": (4096, 0, 0.8),
}
for name, (last_q, column_q, tau) in VARIANTS.items():
    write_variant(SOURCE, OUT, name, with_params(last_q=last_q, column_q=column_q, tau=tau),
                  f"the default plan (coverage tau={tau}, last 128 rows dense, {last_q} strided estimation queries) "
                  f"with the column mass from {column_q or last_q} strided queries (column_q={column_q})")
