"""Session 23's plan files: the default plan of Qwen2.5-Coder-1.5B (28 layers, 12 query / 2 KV heads,
head_dim 128) with extra estimation rows at distant repeated token 4-grams (``repeat_rows``: up to
64 rows ending a 4-gram first seen at least 1,024 tokens earlier, spread rows filling in; a patched
model passes its token ids down). On the 0.5B at 8K these rows brought the index's recall at the
needle sentences to the oracle's (0.929 vs 0.893, docs/results/needle-row-repeat-cpu-qwen0.5b-8k/);
the default loses 3.6 / 3.4 RULER-style points at 64K / 128K, mostly on multi-key and multi-value
needles.

    python docs/results/gpu-session23/plans/make_plans.py
"""
from longinfer.plans import default_plan_for

SHAPE = {"num_layers": 28, "num_q_heads": 12, "num_kv_heads": 2, "head_dim": 128}
OUT = "docs/results/gpu-session23/plans"

for rows in (64,):
    plan = default_plan_for(SHAPE, model_id="qwen2.5-coder-1.5b", repeat_rows=rows)
    path = f"{OUT}/q15-repeat{rows}-tail.json"
    plan.save(path)
    print(path)
