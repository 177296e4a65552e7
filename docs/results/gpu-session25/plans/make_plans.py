"""Session 25's plan files for Qwen2.5-Coder-1.5B (28 layers, 12 query / 2 KV heads, head_dim 128).

At 128K the default (session 24: the prompt's last 64 queries join 64 strided ones on calls of
16,384+ rows) still loses 0.31 nats of the answers' log-probability where the peer's rule (last 64
queries, 1,000 columns, 6,096 diagonals) loses 0.16. Beside session 24's `question-s6000` (a floor
of 6,000 diagonals), two other ways the default differs from it at 128K:

- `q15-question-lq128-tail.json`: 128 question queries and 128 strided ones (``last_q=128``; the
  default's 64 + 64): each strided query stands for 1,024 rows of a 128K prompt.
- `q15-question-groupcols-tail.json`: every head attends its KV group's columns on every call
  (the default stops sharing them at 65,536 query rows; at 32K and 64K, where it shares them, the
  default is within 0.2 points of dense), with the long rule's 3,000-diagonal floor kept.

The two files of this session were written by this script's first version (before
``DEFAULT_DENSE_BELOW`` moved to 16,384; they run dense below 20,480 keys, which no 128K call reaches):
`question-lq128` as the default plan's JSON with ``last_q`` 128 in every head, `question-groupcols` as
``default_plan_for(SHAPE, model_id=MODEL, group_columns_below=1 << 30)``.

Run in session 25 (`../README.md`): at 128K neither wins both measures (`question-groupcols` -0.03 nats but
67.2 points; the diagonal floor 71.5 points but -0.27 nats); `question-lq128` is worse than the default.

For the next GPU session (the default now runs layers sparse from 16,384 keys; its remaining losses
against dense lie in multi-value retrieval at 16K / 32K and variable tracking at 128K):

- `q15-question-qcols1000-tail.json`: the default with ``question_vertical=1000``: each head also keeps the
  1,000 columns the question's 64 queries alone attend to most (the peer's rule keeps 1,000 columns from
  its last 64 queries and loses no multi-value answers at 32K). Low priority since: on the CPU (0.5B at
  8K) such columns were already in the index (+0.03 nats; `../../ruler-cpu-qwen0.5b-8k-qcols/`).
- `q15-question-groupcols-s6000-tail.json`: KV-group columns on every call and at least 6,000 diagonals
  on 64K+ prefills (the two 128K variants of this session together).

    python docs/results/gpu-session25/plans/make_plans.py
"""
from longinfer.plans import default_plan_for

SHAPE = {"num_layers": 28, "num_q_heads": 12, "num_kv_heads": 2, "head_dim": 128}
OUT = "docs/results/gpu-session25/plans"
MODEL = "qwen2.5-coder-1.5b"
EVERY_CALL = 1 << 30  # group_columns_below: share the group's columns on calls of any length


if __name__ == "__main__":
    plans = {
        "question-qcols1000": default_plan_for(SHAPE, model_id=MODEL, question_vertical=1000),
        "question-groupcols-s6000": default_plan_for(SHAPE, model_id=MODEL, group_columns_below=EVERY_CALL,
                                                     min_slash=6000),
    }
    for name, plan in plans.items():
        path = f"{OUT}/q15-{name}-tail.json"
        plan.save(path)
        print(path)
