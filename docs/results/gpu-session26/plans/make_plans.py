"""Session 26's plan file for Qwen2.5-Coder-1.5B (28 layers, 12 query / 2 KV heads, head_dim 128).

- `q15-default-tail.json`: the default plan as of session 26: the long rule's diagonal floor grows with
  the prompt, 3,000 per 65,536 query rows (``DEFAULT_SLASH_SHARE``): on calls of fewer than 131,072
  rows it runs the index of `../../gpu-session24/plans/q15-from16k-question-tail.json` (measured at 16K
  in session 25; 3,000 diagonals at 64K as measured in session 24), on a 131,072-row prefill the index of
  `../../gpu-session24/plans/q15-question-s6000-tail.json` (measured at 128K in sessions 25 / 26).
  `tests/test_plans.py` checks both equalities and pins the default to this file.

    python docs/results/gpu-session26/plans/make_plans.py
"""
from longinfer.plans import default_plan_for

SHAPE = {"num_layers": 28, "num_q_heads": 12, "num_kv_heads": 2, "head_dim": 128}
OUT = "docs/results/gpu-session26/plans"
MODEL = "qwen2.5-coder-1.5b"


if __name__ == "__main__":
    path = f"{OUT}/q15-default-tail.json"
    default_plan_for(SHAPE, model_id=MODEL).save(path)
    print(path)
