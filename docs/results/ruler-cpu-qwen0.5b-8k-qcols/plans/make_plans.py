"""Plans of the CPU check of ``question_vertical`` (Qwen2.5-Coder-0.5B: 24 layers, 14 query / 2 KV heads,
head_dim 64): the default with every layer sparse at 8K (``dense_below=0``) and the question's queries
from 4,096 rows (as `../../ruler-cpu-qwen0.5b-8k-question/plans/q05-question4k-dense0.json`, whose rows
this run reuses), plus each head's top 256 / 1,000 columns by the question's queries alone.

    python docs/results/ruler-cpu-qwen0.5b-8k-qcols/plans/make_plans.py
"""
from longinfer.plans import default_plan_for

SHAPE = {"num_layers": 24, "num_q_heads": 14, "num_kv_heads": 2, "head_dim": 64}
OUT = "docs/results/ruler-cpu-qwen0.5b-8k-qcols/plans"

if __name__ == "__main__":
    for columns in (256, 1000):
        plan = default_plan_for(SHAPE, model_id="qwen2.5-coder-0.5b", dense_below=0, question_from=4096,
                                question_vertical=columns)
        path = f"{OUT}/q05-question4k-qcols{columns}-dense0.json"
        plan.save(path)
        print(path)
