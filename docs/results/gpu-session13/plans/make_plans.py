"""Session 13's plans for the next GPU session: the default plan (q15-exact-tail.json with last_q back
at 64) with one index per query segment (each estimated from 64 strided queries of its own segment
against the keys up to its end), and that at a lower coverage target; and the default with a floor of
columns and diagonals (coverage tau 0.9 but at least min_vertical / min_slash of each, the peer's
fixed budget being 1,000 / 6,096: the peer scored dense's RULER 32K at ~40% density); and the default
with its 64 queries taken half from the prompt's end ("mixed") or all from the end ("last")."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "benchmarks"))  # run from the repository root
from plan_variants import with_params, write_variant  # noqa: E402

SOURCE = "docs/results/gpu-session11/plans/q15-exact-tail.json"
OUT = "docs/results/gpu-session13/plans"
# name: (segments, tau, min_vertical, min_slash, query_sampling, last_q, group_columns)
VARIANTS = {
    "seg4": (4, 0.9, 0, 0, "strided", 64, False), "seg8": (8, 0.9, 0, 0, "strided", 64, False),
    "seg16": (16, 0.9, 0, 0, "strided", 64, False), "seg8-tau0.8": (8, 0.8, 0, 0, "strided", 64, False),
    "floor-v256-s1024": (1, 0.9, 256, 1024, "strided", 64, False),
    "floor-v1000-s3000": (1, 0.9, 1000, 3000, "strided", 64, False),
    # The last queries (the question of a retrieval prompt) see what its answer needs; the peer estimates from them.
    "mixed": (1, 0.9, 0, 0, "mixed", 64, False), "mixed128": (1, 0.9, 0, 0, "mixed", 128, False),
    "last": (1, 0.9, 0, 0, "last", 64, False),
    # Every head takes its KV group's columns (the per-KV-group union of columns, its own diagonals).
    "gcols": (1, 0.9, 0, 0, "strided", 64, True), "gcols-tau0.8": (1, 0.8, 0, 0, "strided", 64, True),
}
for name, (segments, tau, min_vertical, min_slash, sampling, last_q, group_columns) in VARIANTS.items():
    shared = ", each head with its KV group's columns" if group_columns else ""
    write_variant(SOURCE, OUT, name,
                  with_params(last_q=last_q, segments=segments, tau=tau, min_vertical=min_vertical, min_slash=min_slash,
                              query_sampling=sampling, group_columns=group_columns),
                  f"the default plan (coverage tau={tau}, last 128 rows dense) with {last_q} {sampling} estimation "
                  f"queries, {segments} query segment(s) (each estimated from its own queries), at least {min_vertical} "
                  f"columns / {min_slash} diagonals per head{shared}")
