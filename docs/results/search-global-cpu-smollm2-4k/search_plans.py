"""The three searches of this folder: SmolLM2-135M, a 4,096-token key-value retrieval calibration prompt,
the ladder of candidates (default candidates at 0.25-4x the budget), per-head vs global allocation.

    python docs/results/search-global-cpu-smollm2-4k/search_plans.py
"""
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the checkout
from longinfer.models import zoo
from longinfer.plans import search
from longinfer.plans.calibration import kv_retrieval_prompt
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
model, tok = zoo.load("smollm2-135m", device="cpu")
length = 4096
cal = kv_retrieval_prompt(tok, length, seed=0)
ladder = search.ladder_candidates(length, 0.1)
OUT = "docs/results/search-global-cpu-smollm2-4k/plans"
# per head at 0.1, global at 0.1, and global at 0.0884 (what the per-head choice spent on average)
for allocation, budget, name in (("per_head", 0.1, "per_head"), ("global", 0.1, "global"),
                                 ("global", 0.0884, "global-0.0884")):
    t0 = time.perf_counter()
    search.search_plan(model, tok, out=f"{OUT}/{name}.plan.json", calibration=cal, candidates=ladder,
                       cost_budget=budget, dense_below=0, progress=False, allocation=allocation, model_id="smollm2-135m")
    print(name, "searched in", round(time.perf_counter() - t0, 1), "s", flush=True)
