"""Session 23's plan files for Qwen2.5-Coder-1.5B (28 layers, 12 query / 2 KV heads, head_dim 128).

- `q15-repeat64-tail.json` (run in session 23): the default plan with extra estimation rows at
  distant repeated token 4-grams (``repeat_rows``: up to 64 rows ending a 4-gram first seen at least
  1,024 tokens earlier, spread rows filling in; a patched model passes its token ids down). On the
  0.5B at 8K these rows brought the index's recall at the needle sentences to the oracle's (0.929 vs
  0.893, docs/results/needle-row-repeat-cpu-qwen0.5b-8k/); the default loses 3.6 / 3.4 RULER-style
  points at 64K / 128K, mostly on multi-key and multi-value needles.
- For the next GPU session (issue 5, the 128K gap; the exact-kernel control says it is the index's):
  the peer loses only 1.2 points at 128K (session 15) against the default's 3.4. Its index takes the
  top 1,000 columns and 6,096 diagonals from the prompt's *last* 64 queries, where the question
  attends to the facts, so the facts' columns are kept for every row (the needle rows' attention to the
  other needles is what the default drops most, docs/results/needle-rows-missing-cpu-qwen0.5b-8k/).
  `q15-peer-rule-tail.json`: that rule on our kernels with the default's dense rows (below 20,480 keys,
  the last 128 rows): does our stack reproduce the peer's accuracy, at what TTFT?
  `q15-long-mixed128-tail.json`: the default with 128 estimation queries, 64 strided plus the last 64
  (``query_sampling="mixed"``): the question's view added to the strided estimate.

    python docs/results/gpu-session23/plans/make_plans.py
"""
import dataclasses

from longinfer.plans import default_plan_for, uniform_plan
from longinfer.plans.schema import DEFAULT_DENSE_BELOW, DEFAULT_DENSE_LAST, DEFAULT_PATTERN_CONFIG
from longinfer.patterns import config_to_params

SHAPE = {"num_layers": 28, "num_q_heads": 12, "num_kv_heads": 2, "head_dim": 128}
OUT = "docs/results/gpu-session23/plans"
MODEL = "qwen2.5-coder-1.5b"
PEER_RULE = {"num_vertical": 1000, "num_slash": 6096, "last_q": 64, "sink": 30, "local": 100, "budget": "fixed",
             "query_sampling": "last"}

plans = {
    "repeat64": default_plan_for(SHAPE, model_id=MODEL, repeat_rows=64),
    "peer-rule": uniform_plan(SHAPE, "vertical_slash", PEER_RULE, DEFAULT_DENSE_BELOW, model_id=MODEL,
                              dense_last=DEFAULT_DENSE_LAST, search={"method": "peer rule, our kernels"}),
    "long-mixed128": uniform_plan(
        SHAPE, "vertical_slash",
        config_to_params(dataclasses.replace(DEFAULT_PATTERN_CONFIG, last_q=128, query_sampling="mixed")),
        DEFAULT_DENSE_BELOW, model_id=MODEL, dense_last=DEFAULT_DENSE_LAST,
        search={"method": "default, 64 strided + the last 64 estimation queries"}),
}
for name, plan in plans.items():
    path = f"{OUT}/q15-{name}-tail.json"
    plan.save(path)
    print(path)
