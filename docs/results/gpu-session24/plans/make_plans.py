"""Session 24's plan files for Qwen2.5-Coder-1.5B (28 layers, 12 query / 2 KV heads, head_dim 128).

Run in session 24:

- `q15-from16k-tail.json`: the default plan of then (64 strided estimation queries on every call),
  sparse from 16,384 keys instead of 20,480 (issue 5's crossover target is <= 16K): 1.03-1.04x dense
  TTFT at 16K, but -4.2 RULER-style points there (variable tracking 68.3 vs 96.7). Written by this
  script's first version: ``default_plan_for(SHAPE, model_id=MODEL, dense_below=16384, question_from=0)``
  gives the same layers today.

For the next GPU session (the default now adds the prompt's last 64 queries on calls of 16,384+ rows,
``question_from``; at 128K it still loses 0.31 nats where the peer's rule with 6,096 diagonals loses 0.16):

- `q15-from16k-question-tail.json`: today's default sparse from 16,384 keys: do the question's
  queries recover 16K (variable tracking)?
- `q15-question-s6000-tail.json`: today's default with at least 6,000 diagonals per head on calls of
  65,536+ rows (the long rule's floor is 3,000; the peer's rule keeps 6,096): 128K / 64K accuracy and TTFT.
- `q15-turn-question-tail.json`: today's default with the question's queries on calls of 4,096+ rows,
  so a 4K turn over a cached 64K estimates from them too: what it costs the turn (3.05x without).

- `q15-strided-tail.json`: today's default without the question's queries (the default until session
  24): the estimate's cost at 128K beside today's (issue 6 asks every option's cost there).
- `q05-strided-tail.json`: Qwen2.5-Coder-0.5B (24 layers, 14 query / 2 KV heads, head_dim 64), the
  default without the question's queries (``question_from=0``), beside today's default on that model.

    python docs/results/gpu-session24/plans/make_plans.py
"""
from longinfer.plans import default_plan_for

SHAPE = {"num_layers": 28, "num_q_heads": 12, "num_kv_heads": 2, "head_dim": 128}
OUT = "docs/results/gpu-session24/plans"
MODEL = "qwen2.5-coder-1.5b"

plans = {
    "from16k-question": default_plan_for(SHAPE, model_id=MODEL, dense_below=16384),
    "question-s6000": default_plan_for(SHAPE, model_id=MODEL, min_slash=6000),
    "turn-question": default_plan_for(SHAPE, model_id=MODEL, question_from=4096),
    "strided": default_plan_for(SHAPE, model_id=MODEL, question_from=0),
}
for name, plan in plans.items():
    path = f"{OUT}/q15-{name}-tail.json"
    plan.save(path)
    print(path)
SHAPE_05 = {"num_layers": 24, "num_q_heads": 14, "num_kv_heads": 2, "head_dim": 64}
path = f"{OUT}/q05-strided-tail.json"
default_plan_for(SHAPE_05, model_id="qwen2.5-coder-0.5b", question_from=0).save(path)
print(path)
