"""Would the vertical-slash index serve a needle's rows better if its estimate saw them?

At 64K (session 21, ``docs/results/gpu-session21/q21-rows-64k/``) the rows inside the inserted
needle sentences ("pieces") are where every index keeps the least attention, and the estimate sees
the prompt only through strided queries, none of which needs to fall inside a needle. This scores,
per RULER-style prompt and layer, the index that one coverage budget selects from the masses of
different estimation rows (:func:`longinfer.patterns.vertical_slash.estimate_masses` with
``positions``):

- ``strided64``: the 64 strided queries of the default estimate (also at coverage 0.95 and 0.97: the
  baseline's recall at the densities the other variants reach);
- ``strided128``: 128 strided queries (as many rows as the next two);
- ``strided64+pieces64``: the 64 strided queries plus 64 rows drawn from the pieces themselves, an
  oracle no online estimate has (it knows where the needles are);
- ``strided64+novel64``: plus the 64 rows whose queries depart most from their head's mean query
  direction (cosine distance, z-scored per head, summed over heads; the first 256 and last 128 rows
  left out), a cheap online guess at where unusual text sits;
- ``strided64+underserved64``: two stages: the ``strided64`` index is scored on candidate rows (every
  ``--candidate-stride``-th row, the same ends left out), and the 64 candidates it serves worst (lowest
  recall, mean over heads) join the strided queries; an online method (the candidates' attention rows
  cost ``N / stride`` extra estimation queries' work);
- ``strided64+repeat64``: plus up to 64 rows that end a token 4-gram seen at least 1,024 tokens
  earlier (evenly thinned when more qualify; the same ends left out): templated text such as the
  needles repeats itself at a distance, prose rarely does; an online guess from the token ids alone
  (the attention call does not see them today: this asks whether the signal is worth plumbing);
- ``pooled64``: 64 block-mean queries instead of rows: the prompt cut into 64 equal blocks, each
  block's mean query placed at its last row (it sees that row's keys), so every row, a needle's too,
  weighs in the estimate (mean pooling, as block-sparse estimates pool);
- ``strided64+pooled64`` / ``strided64+pooled512``: the mean of the strided queries' masses and the
  masses of 64 / 512 block-mean queries (equal weight), one coverage budget on the result.
- ``strided64+last64``: plus the prompt's last 64 rows, where the question attends to the facts (the
  peer estimates from those rows alone, with a fixed budget, and loses less than our default at 128K).

``--variants`` runs a subset (the records then hold only those; a resumed run must ask for the same).

Per variant: recall at the pieces and at ``--rows`` spread rows (mean over every layer and query
head), the density on the spread rows, and how many of the novel rows fall inside the pieces.
One JSON line per prompt in ``<out>/needle_row_estimation.jsonl`` (rerun to resume), and
``needle_row_estimation.md``.

    python benchmarks/needle_row_estimation.py --model qwen2.5-coder-0.5b --length 8192 \\
        --tasks niah_multikey,niah_multivalue --samples 2 --device cpu --out /tmp/needle-rows

Memory: one layer's q/k at a time, the recall tool's streaming buffers and ``[B, H, N]`` masses;
no N x N matrix.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import shlex
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from longinfer.eval import ruler
from longinfer.eval.capture import capture_qk
from longinfer.eval.cli import load_haystack
from longinfer.eval.report import markdown_table
from longinfer.models import zoo
from longinfer.patterns.recall import attention_recall, causal_logsumexp, sample_rows
from longinfer.patterns.vertical_slash import (VerticalSlashConfig, VerticalSlashSelection, estimate_masses,
                                               estimation_positions, select_packed_over_groups)
from ruler_rows_recall import _records, per_head_recall, piece_rows

logger = logging.getLogger("needle_row_estimation")
RESULTS = "needle_row_estimation.jsonl"
VARIANTS = ("strided64", "strided64, tau 0.95", "strided64, tau 0.97", "strided128", "strided64+pieces64",
            "strided64+novel64", "strided64+underserved64", "strided64+repeat64", "pooled64", "strided64+pooled64",
            "strided64+pooled512", "strided64+last64")
POOLED = {"pooled64": (64, False), "strided64+pooled64": (64, True), "strided64+pooled512": (512, True)}
DENSER_TAUS = {"strided64, tau 0.95": 0.95, "strided64, tau 0.97": 0.97}  # the baseline's curve, for equal density
EXTRA_ROWS = 64
CONFIG = VerticalSlashConfig(budget="coverage", num_vertical=4096, num_slash=8192, last_q=64,
                             query_sampling="strided", tau=0.9)


def novel_rows(q: torch.Tensor, count: int, skip_first: int = 256, skip_last: int = 128) -> torch.Tensor:
    """The ``count`` rows (ascending) whose queries ``q [1, Hq, N, D]`` depart most from their head's mean
    direction: cosine distance z-scored per head, summed over heads; the first ``skip_first`` and last
    ``skip_last`` rows are never chosen (sinks; the dense tail)."""
    unit = torch.nn.functional.normalize(q[0].float(), dim=-1)
    mean = torch.nn.functional.normalize(unit.mean(1, keepdim=True), dim=-1)
    distance = 1 - (unit * mean).sum(-1)  # [Hq, N]
    score = ((distance - distance.mean(1, keepdim=True)) / distance.std(1, keepdim=True)).sum(0)
    score[:skip_first] = float("-inf")
    score[-skip_last:] = float("-inf")
    return torch.topk(score, count).indices.sort().values


def repeat_rows(ids: list[int], count: int, n: int = 4, min_distance: int = 1024, skip_first: int = 256,
                skip_last: int = 128) -> torch.Tensor:
    """Up to ``count`` rows (ascending) whose last ``n`` token ids repeat an ``n``-gram that ended at least
    ``min_distance`` tokens earlier; evenly thinned when more qualify; the first ``skip_first`` and last
    ``skip_last`` rows are never chosen."""
    first_end: dict[tuple[int, ...], int] = {}
    found = []
    for end in range(n - 1, len(ids)):
        gram = tuple(ids[end - n + 1:end + 1])
        seen = first_end.setdefault(gram, end)
        if end - seen >= min_distance and skip_first <= end < len(ids) - skip_last:
            found.append(end)
    chosen = torch.tensor(found, dtype=torch.long)
    if chosen.numel() > count:
        chosen = chosen[torch.linspace(0, chosen.numel() - 1, count).round().long()]
    return chosen


def underserved_rows(q: torch.Tensor, k: torch.Tensor, index: Any, scale: float, count: int,
                     stride: int, skip_first: int = 256, skip_last: int = 128) -> torch.Tensor:
    """The ``count`` rows (ascending) among every ``stride``-th row (the first ``skip_first`` and last
    ``skip_last`` left out) that ``index`` (any index :func:`attention_recall` takes) serves worst:
    lowest recall, mean over batch and heads. Memory: the recall tool's streaming buffers."""
    n = k.shape[2]
    candidates = torch.arange(skip_first, n - skip_last, stride, device=q.device)
    stats = attention_recall(q, k, index, candidates, sm_scale=scale)
    worst = torch.topk(-stats.recall.mean(dim=(0, 1)), min(count, candidates.numel())).indices
    return candidates[worst].sort().values


def index_from_rows(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, scale: float,
                    tau: float = CONFIG.tau) -> VerticalSlashSelection:
    """The per-head vertical-slash index that :data:`CONFIG`'s budget (coverage ``tau``) selects from the
    masses of ``positions``."""
    return index_from_masses(*estimate_masses(q, k, CONFIG, sm_scale=scale, positions=positions), k, tau)


def index_from_masses(columns: torch.Tensor, diagonals: torch.Tensor, k: torch.Tensor,
                      tau: float = CONFIG.tau) -> VerticalSlashSelection:
    """The per-head index :data:`CONFIG`'s budget (coverage ``tau``) selects from masses ``[1, Hq, N]``."""
    config = dataclasses.replace(CONFIG, tau=tau)
    vertical, slash = select_packed_over_groups(columns, diagonals, config, k.shape[1], per_kv_group=False)
    return VerticalSlashSelection(vertical=vertical, slash=slash, k_len=k.shape[2], block_size=config.block_size)


def pooled_masses(q: torch.Tensor, k: torch.Tensor, blocks: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and diagonal masses ``[1, Hq, N]`` of ``blocks`` block-mean queries: the rows cut into
    ``blocks`` spans ending at the strided positions, each span's mean query placed at its last row.
    Memory: a float32 prefix sum of ``q`` (``Hq * N * D``) and a copy of ``q``."""
    n = q.shape[2]
    ends = estimation_positions(n, n, blocks, "strided").to(q.device)
    starts = torch.cat([ends.new_zeros(1), ends[:-1] + 1])
    prefix = q.float().cumsum(2)
    before = torch.where((starts > 0)[None, None, :, None], prefix[:, :, (starts - 1).clamp(min=0)], 0.0)
    pooled = q.clone()
    pooled[:, :, ends] = ((prefix[:, :, ends] - before) / (ends - starts + 1)[:, None].float()).to(q.dtype)
    return estimate_masses(pooled, k, CONFIG, sm_scale=scale, positions=ends)


def measure_prompt(model: Any, prompt: ruler.RulerPrompt, num_rows: int, seed: int,
                   candidate_stride: int, variants: tuple[str, ...] = VARIANTS) -> dict[str, Any]:
    """Per variant (of ``variants``) the per-(layer, head) recalls at the pieces and the spread rows and
    the per-layer densities, and per layer how many novel / underserved rows lie inside the pieces."""
    ids = torch.tensor([prompt.input_ids], device=model.device)
    n = ids.shape[1]
    pieces = piece_rows(prompt)
    rows = {"pieces": pieces, "spread": sample_rows(n, n, num_rows, seed=seed)}
    strided = estimation_positions(n, n, 64, "strided")
    results: dict[str, Any] = {v: {"pieces": [], "spread": [], "density": []} for v in variants}
    guesses = {"novel_in_pieces": "strided64+novel64", "underserved_in_pieces": "strided64+underserved64",
               "repeat_in_pieces": "strided64+repeat64"}
    repeats = repeat_rows(prompt.input_ids, EXTRA_ROWS)
    results.update({name: [] for name, variant in guesses.items() if variant in variants})

    def on_layer(captured: Any) -> None:
        q, k, scale = captured.q, captured.k, captured.sm_scale
        generator = torch.Generator().manual_seed(seed + captured.layer)
        drawn = pieces[torch.randperm(len(pieces), generator=generator)[:EXTRA_ROWS]]
        strided_masses = estimate_masses(q, k, CONFIG, sm_scale=scale, positions=strided.to(q.device))
        first_stage = index_from_masses(*strided_masses, k)
        positions = {"strided64+pieces64": torch.unique(torch.cat([strided, drawn])),
                     **{variant: strided for variant in DENSER_TAUS}}
        if "strided128" in variants:
            positions["strided128"] = estimation_positions(n, n, 128, "strided")
        if "strided64+last64" in variants:  # the question's rows (the peer estimates from them alone)
            positions["strided64+last64"] = torch.unique(torch.cat([strided, torch.arange(n - EXTRA_ROWS, n)]))
        extra = {}
        if "strided64+novel64" in variants:
            extra["strided64+novel64"] = novel_rows(q, EXTRA_ROWS).cpu()
        if "strided64+repeat64" in variants:
            extra["strided64+repeat64"] = repeats
        if "strided64+underserved64" in variants:
            extra["strided64+underserved64"] = underserved_rows(q, k, first_stage, scale, EXTRA_ROWS,
                                                                candidate_stride).cpu()
        for name, variant in guesses.items():
            if variant in extra:
                results[name].append(len(set(extra[variant].tolist()) & set(pieces.tolist())))
        positions.update({variant: torch.unique(torch.cat([strided, rows_])) for variant, rows_ in extra.items()})
        indexes = {"strided64": first_stage}
        for variant, (blocks, with_strided) in POOLED.items():
            if variant in variants:
                pooled = pooled_masses(q, k, blocks, scale)
                if with_strided:
                    pooled = tuple((a + b) / 2 for a, b in zip(strided_masses, pooled))
                indexes[variant] = index_from_masses(*pooled, k)
        lse = {name: causal_logsumexp(q, k, scored.to(q.device), sm_scale=scale) for name, scored in rows.items()}
        for variant in variants:
            index = indexes[variant] if variant in indexes else index_from_rows(
                q, k, positions[variant].to(q.device), scale, DENSER_TAUS.get(variant, CONFIG.tau))
            for name, scored in rows.items():
                values, density = per_head_recall(q, k, index, scored, scale, lse[name])
                results[variant][name].extend(values)
                if name == "spread":
                    results[variant]["density"].append(density)
        logger.info("layer %d done", captured.layer)

    capture_qk(model, ids, on_layer=on_layer)
    return results


def write_report(out: Path, records: list[dict[str, Any]], command: str) -> Path:
    """``needle_row_estimation.md``: per variant the mean over prompts of each prompt's mean recall."""
    def mean_of(variant: str, key: str) -> float:
        return statistics.fmean(statistics.fmean(r[variant][key]) for r in records)

    rows = [[variant, f"{mean_of(variant, 'pieces'):.4f}", f"{mean_of(variant, 'spread'):.4f}",
             f"{100 * mean_of(variant, 'density'):.1f}%"] for variant in VARIANTS if all(variant in r for r in records)]

    def inside(key: str) -> str:
        counts = [statistics.fmean(r[key]) for r in records if key in r]
        return f"{statistics.fmean(counts):.1f}" if counts else "not run"

    first = records[0]
    text = "\n".join([
        "# Recall at the needle rows by the rows the estimate sees", "",
        f"- model: {first['model']}, length {first['length']}, device {first['device']}, torch {first['torch']}; "
        f"prompts: {', '.join(r['prompt'] for r in records)}",
        f"- command: `{command}`",
        "- budget: coverage tau 0.9, at most 4,096 columns and 8,192 diagonals, per head; recall: mean over every "
        "(layer, query head) of the mean over the row set, then over prompts; density on the spread rows.", "",
        markdown_table(["estimation rows", "recall at pieces", "recall at spread rows", "density"], rows), "",
        f"Rows inside the pieces, of {EXTRA_ROWS} per layer on average: novel {inside('novel_in_pieces')}, "
        f"underserved {inside('underserved_in_pieces')}, repeated 4-grams {inside('repeat_in_pieces')}.", ""])
    path = out / "needle_row_estimation.md"
    path.write_text(text)
    return path


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a per-prompt measurement over RULER-style needle prompts (model, prompts, output)."""
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--yarn", type=float, default=None)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--tasks", default="niah_multikey,niah_multivalue")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--haystack", default="pg")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, required=True)


def measure_prompts(args: argparse.Namespace, command: str, results: str,
                    measure: Callable[[Any, ruler.RulerPrompt], dict[str, Any]]) -> list[dict[str, Any]]:
    """``measure(model, prompt)`` for every prompt of ``args`` (:func:`add_prompt_arguments`), one JSON line
    each in ``args.out / results`` with the model, length, device, versions, date and ``command``; prompts
    already recorded there are skipped (a rerun resumes). Returns every record, old and new."""
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / results
    records = _records(store)
    done = {r["prompt"] for r in records}
    model, tokenizer = zoo.load(args.model, dtype=torch.float32 if args.device == "cpu" else None, device=args.device,
                                yarn_factor=args.yarn)
    haystack = load_haystack(args.haystack)
    for task in args.tasks.split(","):
        for sample in range(args.samples):
            name = f"{task}/L{args.length}/i{sample}/s{args.seed}"
            if name in done:
                continue
            prompt = ruler.generate(task, tokenizer, haystack, args.length, seed=args.seed, sample=sample)
            record = {"prompt": name, "model": args.model, "length": args.length,
                      "device": str(next(model.parameters()).device), "torch": torch.__version__,
                      "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": command,
                      **measure(model, prompt)}
            with store.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            records.append(record)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_prompt_arguments(parser)
    parser.add_argument("--rows", type=int, default=256, help="spread rows per prompt")
    parser.add_argument("--candidate-stride", type=int, default=16,
                        help="every this-many rows a candidate of the underserved variant")
    parser.add_argument("--variants", default=";".join(VARIANTS),
                        help=f"semicolon-separated subset of: {'; '.join(VARIANTS)} (strided64 is always measured)")
    args = parser.parse_args(argv)
    variants = tuple(dict.fromkeys(["strided64", *(name.strip() for name in args.variants.split(";"))]))
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {'; '.join(VARIANTS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    command = "python3 benchmarks/needle_row_estimation.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    records = measure_prompts(args, command, RESULTS, lambda model, prompt: measure_prompt(
        model, prompt, args.rows, args.seed, args.candidate_stride, variants))
    print(write_report(args.out, records, command).read_text())
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
