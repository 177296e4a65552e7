"""Do token ids find what retrieval-like heads attend? Recall of a token-id index on captured q/k (CPU is enough).

The heads that keep ``tile_keys``'s mean recall down (``docs/results/recall-cpu-qwen0.5b-32k-tile-keys-queries/``)
put most of a row's mass on its own few far keys, sometimes the token right after an earlier copy of the row's own
token (induction). This script measures,
per (layer, head), the attention recall at sampled rows of an index built from token ids alone: each 64-row
query tile keeps its 128-key band, the first 4 keys, and for every row ``i`` of the tile the key after each of
the last ``R`` earlier occurrences of token ``ids[i]`` (the kernel's tile format: the union over the tile's rows).
It also prints the 5 most attended keys of two rows per head, with the keys after earlier copies of the row's
token, to show the pattern.

Usage::

    python benchmarks/induction_keys_check.py --length 8192 --heads 3:5,9:8,9:9,16:3,16:1,9:0,9:5
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longinfer.data import corpora  # noqa: E402
from longinfer.eval.capture import capture_qk  # noqa: E402
from longinfer.models import zoo  # noqa: E402

BLOCK, LOCAL, SINK = 64, 128, 4


def earlier_copies(tokens: list[int]) -> list[list[int]]:
    """For each position ``i`` the earlier positions ``j < i`` holding the same token, ascending."""
    seen: dict[int, list[int]] = defaultdict(list)
    out = []
    for i, token in enumerate(tokens):
        out.append(list(seen[token]))
        seen[token].append(i)
    return out


def tile_keys_from_tokens(row: int, copies: list[list[int]], repeats: int, n: int) -> list[int]:
    """Keys ``<= row`` the token-id index gives row ``row``'s tile (see the module docstring)."""
    start = row // BLOCK * BLOCK
    end = min(start + BLOCK, n) - 1
    band = max(0, end + 1 - LOCAL)
    keys = set(range(min(SINK, band))) | set(range(band, row + 1))
    for i in range(start, end + 1):
        keys |= {j + 1 for j in copies[i][-repeats:] if j + 1 < band}
    return sorted(j for j in keys if j <= row)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--heads", default="3:5,9:8,9:9,16:3,16:1,9:0,9:5", help="layer:head,...")
    parser.add_argument("--repeats", default="1,4,16", help="earlier copies per row (R)")
    parser.add_argument("--rows", type=int, default=128, help="rows sampled evenly from position 1024 on")
    args = parser.parse_args()
    heads = [tuple(int(x) for x in item.split(":")) for item in args.heads.split(",")]
    model, tokenizer = zoo.load(args.model, dtype=torch.float32, device="cpu")
    ids = torch.as_tensor(corpora.haystack_ids(tokenizer, args.length, corpus="pg", seed=0)).reshape(1, -1)
    captured = capture_qk(model, ids, layers=sorted({layer for layer, _ in heads}), store_device="cpu")
    tokens = ids[0].tolist()
    copies = earlier_copies(tokens)
    n = len(tokens)
    rows = torch.linspace(1024, n - 1, args.rows).long().tolist()
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    print(f"# {args.model}, {n} tokens of PG essays (seed 0), {len(rows)} rows from 1024 on; "
          f"tile {BLOCK}, band {LOCAL}, sinks {SINK}")
    for layer, head in heads:
        q, k = captured[layer].q[0, head], captured[layer].k[0, head // group]
        probs = {r: torch.softmax(k[: r + 1] @ q[r] / math.sqrt(q.shape[-1]), -1) for r in rows}
        for r in (rows[len(rows) // 2], rows[-1]):
            top = probs[r].topk(5)
            shown = ", ".join(f"{int(j)} ({float(p):.2f})" for p, j in zip(top.values, top.indices))
            print(f"layer {layer} head {head} row {r}: top keys {shown}; after earlier copies: "
                  f"{[j + 1 for j in copies[r][-4:]]}")
        for repeats in (int(x) for x in args.repeats.split(",")):
            kept = {r: tile_keys_from_tokens(r, copies, repeats, n) for r in rows}
            recall = sum(float(probs[r][kept[r]].sum()) for r in rows) / len(rows)
            density = sum(len(kept[r]) / (r + 1) for r in rows) / len(rows)
            print(f"layer {layer} head {head} R={repeats}: recall {recall:.3f} at density {100 * density:.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
