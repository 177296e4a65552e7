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

    python docs/results/gpu-session25/plans/make_plans.py
"""
from longinfer.plans import Plan, default_plan_for

SHAPE = {"num_layers": 28, "num_q_heads": 12, "num_kv_heads": 2, "head_dim": 128}
OUT = "docs/results/gpu-session25/plans"
MODEL = "qwen2.5-coder-1.5b"
EVERY_CALL = 1 << 30  # group_columns_below: share the group's columns on calls of any length


def with_last_q(plan_dict: dict, last_q: int) -> dict:
    """The plan's JSON with every head's ``last_q`` replaced."""
    for layer in plan_dict["layers"]:
        for head in layer["heads"]:
            head["params"]["last_q"] = last_q
    return plan_dict


if __name__ == "__main__":
    default = default_plan_for(SHAPE, model_id=MODEL)
    plans = {
        "question-lq128": Plan.from_dict(with_last_q(default.to_dict(), 128)),
        "question-groupcols": default_plan_for(SHAPE, model_id=MODEL, group_columns_below=EVERY_CALL),
    }
    for name, plan in plans.items():
        path = f"{OUT}/q15-{name}-tail.json"
        plan.save(path)
        print(path)
