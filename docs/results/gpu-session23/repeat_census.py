"""How many rows qualify as distant repeats (the ``repeat_rows`` rule) in RULER-style 64K prompts, and how
many of them lie inside the inserted needle sentences. Tokenizer only (the 0.5B and 1.5B share it); CPU.

    python docs/results/gpu-session23/repeat_census.py
"""
import torch
from longinfer.models import zoo
from longinfer.eval import ruler
from longinfer.eval.cli import load_haystack
from longinfer.patterns.repeat_rows import repeat_distances, SKIP_LAST
_, tok = zoo.load("qwen2.5-coder-0.5b", dtype=torch.float32, device="cpu")
hay = load_haystack("pg")
for length in (65536,):
    for task in ("niah_multikey", "niah_multivalue", "niah_single", "vt"):
        for sample in range(2):
            p = ruler.generate(task, tok, hay, length, seed=0, sample=sample)
            ids = torch.tensor(p.input_ids)[None]
            n = ids.shape[1]
            inside = torch.zeros(n, dtype=torch.bool)
            for a, b in p.pieces:
                inside[a:b] = True
            row = [f"{task} i{sample} n={n} pieces={int(inside.sum())}"]
            for ng in (4, 6, 8, 12, 16):
                q = repeat_distances(ids, ng)[0] >= 1024
                q[n - SKIP_LAST:] = False
                row.append(f"ng{ng}: {int(q.sum())} rows, {int((q & inside).sum())} in pieces")
            print(" | ".join(row), flush=True)
