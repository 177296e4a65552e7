"""Can every-row scoring be cheap? Recall of a per-row tile-keys index from approximate scores (CPU is enough).

The heads that keep ``tile_keys``'s mean recall down (``docs/results/gpu-session30/``: layer 3 head 5, layer 9
heads 8 / 9, layer 11 heads 9 / 12 of Qwen2.5-Coder-0.5B at 32K) need each row scored on its own
(``queries=64``), which costs two passes of the head's full ``QK^T``. This script asks whether approximate scores
find the same keys, per (layer, head), at rows sampled evenly from position 1,024 on. Each sampled row's 64-row
tile keeps its 128-key band, the first 4 keys, and each key before the band whose probability under one of the
tile's rows (a softmax over the keys up to the tile's last row) reaches ``threshold / Nk``: the rule of
``tile_keys`` with ``queries=64``, the probabilities computed from

- ``exact``: ``q . k`` (the reference: what ``queries=64`` keeps);
- ``pooled``: one query per tile, the mean of its rows (``queries=1``; what the cheap estimate sees);
- ``dimsR``: the ``R`` of ``D`` dimensions with the largest ``E[q_d^2] E[k_d^2]`` over the sequence (a static,
  per-head choice: ``R / D`` of the multiply-adds, the same tensor-core shapes);
- ``pcaR``: ``q`` and ``k`` projected on the top ``R`` eigenvectors of the keys' second moment ``K^T K``;
- ``fp8``: ``q`` and ``k`` rounded to float8 e4m3 (one scale per head), full ``D`` (twice the tensor-core rate
  of bf16 on Hopper).

Recall at a row = the true attention mass (softmax of the exact scores over the keys up to the row) the tile's
keys hold; density = those keys / (row + 1). Results append to ``OUT/records.jsonl`` one (layer, head, variant,
threshold) per line, so a killed run resumes; ``OUT/report.md`` is rendered at the end.

Usage::

    python benchmarks/cheap_row_scores.py --length 32768 --heads 3:5,9:8,9:9,11:9,11:12,16:1,13:2,9:0 \\
        --out docs/results/cheap-row-scores-cpu-qwen0.5b-32k

Memory: the captured layers' q and k in float32 (``[Hq + Hkv, N, D]`` each) and one tile's ``[64, N]`` scores
at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longinfer.data import corpora  # noqa: E402
from longinfer.eval.capture import capture_qk  # noqa: E402
from longinfer.models import zoo  # noqa: E402

BLOCK, LOCAL, SINK = 64, 128, 4
FP8_MAX = 448.0  # largest float8 e4m3fn value

# (q [N, D], k [N, D]) -> the pair whose dot products stand for the scores
Scorer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def top_dims(q: torch.Tensor, k: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` dimensions with the largest ``E[q_d^2] * E[k_d^2]``."""
    return (q.pow(2).mean(0) * k.pow(2).mean(0)).topk(rank).indices


def key_eigenvectors(k: torch.Tensor, rank: int) -> torch.Tensor:
    """``[D, rank]``: the top eigenvectors of ``k^T k``."""
    _, vectors = torch.linalg.eigh(k.T @ k)
    return vectors[:, -rank:]


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to float8 e4m3 with one scale (its absolute max to 448), back in float32."""
    scale = FP8_MAX / x.abs().max().clamp_min(1e-12)
    return (x * scale).to(torch.float8_e4m3fn).float() / scale


def on_dims(q: torch.Tensor, k: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` and ``k`` on their :func:`top_dims`."""
    dims = top_dims(q, k, rank)
    return q[:, dims], k[:, dims]


def on_key_eigenvectors(q: torch.Tensor, k: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` and ``k`` projected on :func:`key_eigenvectors`."""
    vectors = key_eigenvectors(k, rank)
    return q @ vectors, k @ vectors


def scorers(ranks: list[int]) -> dict[str, Scorer]:
    """The approximations of the module docstring, by name (``pooled`` is handled by the caller)."""
    out: dict[str, Scorer] = {"exact": lambda q, k: (q, k), "fp8": lambda q, k: (to_fp8(q), to_fp8(k))}
    for rank in ranks:
        out[f"dims{rank}"] = lambda q, k, r=rank: on_dims(q, k, r)
        out[f"pca{rank}"] = lambda q, k, r=rank: on_key_eigenvectors(q, k, r)
    return out


def tile_index(q_approx: torch.Tensor, k_approx: torch.Tensor, tile: int, n: int, scale: float,
               threshold: float, pooled: bool) -> torch.Tensor:
    """Bool ``[n]``: the keys tile ``tile`` keeps under the approximate scores (see the module docstring)."""
    start, end = tile * BLOCK, min(tile * BLOCK + BLOCK, n)
    band = max(0, end - LOCAL)
    rows = q_approx[start:end]
    if pooled:
        rows = rows.mean(0, keepdim=True)
    probs = torch.softmax(rows @ k_approx[:end].T * scale, -1)  # [rows, end]: keys up to the tile's last row
    kept = torch.zeros(n, dtype=torch.bool)
    kept[:band] = (probs[:, :band] >= threshold / n).any(0)
    kept[: min(SINK, band)] = True
    kept[band:end] = True
    return kept


def measure_head(q: torch.Tensor, k: torch.Tensor, rows: list[int], scale: float, variant: str,
                 scorer: Scorer | None, threshold: float) -> dict[str, float]:
    """Mean recall and density at ``rows`` of one head's index under one variant."""
    n = k.shape[0]
    q_approx, k_approx = (q, k) if scorer is None else scorer(q, k)
    recall = density = 0.0
    for row in rows:
        kept = tile_index(q_approx, k_approx, row // BLOCK, n, scale, threshold, pooled=variant == "pooled")
        true = torch.softmax(k[: row + 1] @ q[row] * scale, -1)
        recall += float(true[kept[: row + 1]].sum())
        density += float(kept[: row + 1].sum()) / (row + 1)
    return {"recall": recall / len(rows), "density": density / len(rows)}


def load_done(path: Path) -> dict[tuple, dict]:
    """Records already in ``path`` by (layer, head, variant, threshold)."""
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["layer"], r["head"], r["variant"], r["threshold"]): r for r in records}


def render(records: list[dict], variants: list[str], thresholds: list[float], header: str) -> str:
    """Markdown: per head, recall / density of each variant at each threshold."""
    lines = [header, "", "| layer, head | threshold | " + " | ".join(variants) + " |",
             "|---|---|" + "---|" * len(variants)]
    by_key = {(r["layer"], r["head"], r["variant"], r["threshold"]): r for r in records}
    for layer, head in sorted({(r["layer"], r["head"]) for r in records}):
        for threshold in thresholds:
            cells = []
            for variant in variants:
                r = by_key.get((layer, head, variant, threshold))
                cells.append(f"{r['recall']:.3f} / {100 * r['density']:.1f}%" if r else "-")
            lines.append(f"| {layer}, {head} | {threshold:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--heads", default="3:5,9:8,9:9,11:9,11:12,16:1,13:2,9:0", help="layer:head,...")
    parser.add_argument("--ranks", default="8,16,32", help="R of the dimsR / pcaR variants")
    parser.add_argument("--thresholds", default="16,8")
    parser.add_argument("--rows", type=int, default=64, help="rows sampled evenly from position 1024 on")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    heads = [tuple(int(x) for x in item.split(":")) for item in args.heads.split(",")]
    ranks = [int(x) for x in args.ranks.split(",")]
    thresholds = [float(x) for x in args.thresholds.split(",")]
    approximations = scorers(ranks)
    variants = ["pooled", *approximations]
    args.out.mkdir(parents=True, exist_ok=True)
    records_path = args.out / "records.jsonl"
    done = load_done(records_path)
    todo = [(layer, head) for layer, head in heads
            if any((layer, head, v, t) not in done for v in variants for t in thresholds)]
    if todo:
        model, tokenizer = zoo.load(args.model, dtype=torch.float32, device="cpu")
        ids = torch.as_tensor(corpora.haystack_ids(tokenizer, args.length, corpus="pg", seed=0)).reshape(1, -1)
        captured = capture_qk(model, ids, layers=sorted({layer for layer, _ in todo}), store_device="cpu")
        group = model.config.num_attention_heads // model.config.num_key_value_heads
        n = ids.shape[1]
        rows = torch.linspace(1024, n - 1, args.rows).long().tolist()
        for layer, head in todo:
            q, k = captured[layer].q[0, head].float(), captured[layer].k[0, head // group].float()
            scale = captured[layer].sm_scale
            for variant in variants:
                for threshold in thresholds:
                    if (layer, head, variant, threshold) in done:
                        continue
                    result = measure_head(q, k, rows, scale, variant, approximations.get(variant), threshold)
                    record = {"layer": layer, "head": head, "variant": variant, "threshold": threshold,
                              "length": n, "rows": len(rows), **result}
                    with records_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                    done[(layer, head, variant, threshold)] = record
                    print(f"layer {layer} head {head} {variant} t={threshold:g}: recall {result['recall']:.3f} "
                          f"at {100 * result['density']:.1f}%", flush=True)
    header = (f"# Approximate every-row scores: {args.model}, {args.length} tokens of PG essays (seed 0)\n\n"
              f"Recall / density at {args.rows} rows from position 1,024 on; tile {BLOCK}, band {LOCAL}, sinks {SINK}. "
              f"Command: `python benchmarks/cheap_row_scores.py {' '.join(sys.argv[1:])}`")
    (args.out / "report.md").write_text(render(list(done.values()), variants, thresholds, header))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
