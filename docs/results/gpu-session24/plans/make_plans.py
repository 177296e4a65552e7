"""Session 24's plan files for Qwen2.5-Coder-1.5B (28 layers, 12 query / 2 KV heads, head_dim 128).

- `q15-from16k-tail.json`: the default plan, sparse from 16,384 keys instead of 20,480 (issue 5's
  crossover target is <= 16K). Session 17 measured the sparse path at 16K at 0.99x dense; sessions
  21-23 sped up every sparse call (the estimate, the KV-group union's pack, CUDA graphs), so the
  crossover step times it again beside dense and the default.

    python docs/results/gpu-session24/plans/make_plans.py
"""
from longinfer.plans import default_plan_for

SHAPE = {"num_layers": 28, "num_q_heads": 12, "num_kv_heads": 2, "head_dim": 128}
OUT = "docs/results/gpu-session24/plans"
MODEL = "qwen2.5-coder-1.5b"

plans = {
    "from16k": default_plan_for(SHAPE, model_id=MODEL, dense_below=16384),
}
for name, plan in plans.items():
    path = f"{OUT}/q15-{name}-tail.json"
    plan.save(path)
    print(path)
