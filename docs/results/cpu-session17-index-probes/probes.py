"""Two CPU probes on Qwen2.5-Coder-1.5B's real q/k at 32K (PG essays, YaRN x4, layers 0, 5, 9, 14, 18,
23, 27), each head with its own columns and tau 0.9 coverage (the default's long rule without floor):

- ``merge``: how many slash chunks the kernel would save if slash groups whose key gap fits in the
  left group's last-chunk padding were merged (free keys, never more chunks), with a floor of
  ``--min-slash`` diagonals (750 = 2.3% of the offsets, as 3,000 at 128K);
- ``recall``: attention recall (mean over heads, 10th-percentile head) and density of the estimate
  from 64 / 256 / 1,024 strided queries, with and without a diagonal floor (96 sampled rows per layer).

    python docs/results/cpu-session17-index-probes/probes.py capture --qk /tmp/qk32768.pt
    python docs/results/cpu-session17-index-probes/probes.py merge --qk /tmp/qk32768.pt --min-slash 750
    python docs/results/cpu-session17-index-probes/probes.py recall --qk /tmp/qk32768.pt
"""
import argparse
import dataclasses

import torch

from longinfer.ops.index import _slash_groups
from longinfer.patterns import vertical_slash as vs
from longinfer.patterns.recall import attention_recall, causal_logsumexp, sample_rows
from longinfer.plans.schema import DEFAULT_PATTERN_CONFIG

LENGTH = 32768
LAYERS = [0, 5, 9, 14, 18, 23, 27]
BLOCK = CHUNK = 64
LONG_RULE = dataclasses.replace(DEFAULT_PATTERN_CONFIG, group_columns=False, group_columns_below=0, min_vertical=0,
                                min_slash=0, floor_from=0, thresholds_on="keys")


def capture(path: str) -> None:
    from longinfer.data import corpora
    from longinfer.eval.capture import capture_qk
    from longinfer.models import zoo
    model, tokenizer = zoo.load("qwen2.5-coder-1.5b", device="cpu", yarn_factor=4.0, dtype=torch.bfloat16)
    ids = torch.tensor([corpora.haystack_ids(tokenizer, LENGTH, "pg")])
    captured = capture_qk(model, ids, layers=LAYERS)
    torch.save({layer: (c.q, c.k) for layer, c in captured.items()}, path)


def merged_chunks(lo: torch.Tensor, hi: torch.Tensor) -> tuple[int, int, int, int]:
    """(chunks, keys) of one head's slash groups as built, then with free merges."""
    lengths = hi - lo + BLOCK  # key range of a group for one query tile
    chunks = (lengths + CHUNK - 1) // CHUNK
    slack = chunks * CHUNK - lengths
    gap = lo[1:] - hi[:-1] - BLOCK  # keys between neighbouring groups' ranges
    starts = torch.cat([torch.tensor([True]), gap > slack[:-1]])
    group = starts.cumsum(0) - 1
    count = int(group[-1]) + 1
    new_lo = torch.full((count,), 2**62).scatter_reduce(0, group, lo, "amin")
    new_hi = torch.zeros(count, dtype=torch.long).scatter_reduce(0, group, hi, "amax")
    new_lengths = new_hi - new_lo + BLOCK
    return int(chunks.sum()), int(lengths.sum()), int(((new_lengths + CHUNK - 1) // CHUNK).sum()), int(new_lengths.sum())


def merge(path: str, min_slash: int) -> None:
    totals = torch.zeros(4, dtype=torch.long)
    for layer, (q, k) in sorted(torch.load(path).items()):
        selection = vs.estimate_vertical_slash(q.float(), k.float(), dataclasses.replace(LONG_RULE, min_slash=min_slash))
        lo, hi, count = _slash_groups(selection.slash, LENGTH, BLOCK, LENGTH, presorted=True)
        row = sum(torch.tensor(merged_chunks(lo[0, h, :n].long(), hi[0, h, :n].long()))
                  for h, n in enumerate(count[0].tolist()))
        totals += row
        print(f"layer {layer}: chunks {row[0]} -> {row[2]} ({row[2] / row[0]:.3f}), keys x{row[3] / row[1]:.3f}")
    print(f"all: chunks {totals[0]} -> {totals[2]} ({totals[2] / totals[0]:.3f}), keys x{totals[3] / totals[1]:.3f}, "
          f"chunk fill {totals[1] / (totals[0] * CHUNK):.3f} -> {totals[3] / (totals[2] * CHUNK):.3f}")


def recall(path: str) -> None:
    methods = {"64 queries": {}, "64 queries + 750 diagonals": {"min_slash": 750}, "256 queries": {"last_q": 256},
               "1,024 queries": {"last_q": 1024}, "1,024 queries + 375 diagonals": {"last_q": 1024, "min_slash": 375}}
    heads = {name: [] for name in methods}
    density = {name: [] for name in methods}
    for layer, (q, k) in sorted(torch.load(path).items()):
        q, k = q.float(), k.float()
        rows = sample_rows(LENGTH, LENGTH, 96, seed=layer)
        lse = causal_logsumexp(q, k, rows)
        for name, change in methods.items():
            stats = attention_recall(q, k, vs.estimate_vertical_slash(q, k, dataclasses.replace(LONG_RULE, **change)),
                                     rows, lse=lse)
            heads[name].append(stats.recall.mean(-1)[0])
            density[name].append((stats.kept.float() / stats.causal.float()).mean().item())
    print("| estimate | recall mean | p10 head | density |\n|---|---|---|---|")
    for name in methods:
        per_head = torch.cat(heads[name])
        print(f"| {name} | {per_head.mean():.3f} | {per_head.quantile(0.1):.3f} | "
              f"{100 * sum(density[name]) / len(density[name]):.1f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", choices=["capture", "merge", "recall"])
    parser.add_argument("--qk", required=True, help="captured q/k file (written by `capture`)")
    parser.add_argument("--min-slash", type=int, default=750)
    args = parser.parse_args()
    if args.probe == "capture":
        capture(args.qk)
    elif args.probe == "merge":
        merge(args.qk, args.min_slash)
    else:
        recall(args.qk)


if __name__ == "__main__":
    main()
