"""Where does the attention the index drops at the needle rows go?

Session 21 found the rows inside the inserted needle sentences ("pieces") to be where the default
vertical-slash index keeps the least of each row's attention, and the estimate would serve them
better if it saw them (``needle_row_estimation.py``). This splits what the default index (64 strided
estimation queries, per-head coverage 0.9) leaves out at those rows by where the dropped keys lie:

- ``own piece``: inside the same inserted sentence as the row;
- ``other pieces``: inside another inserted sentence (the other needles, keys or values);
- ``sink``: the first :data:`SINK_KEYS` keys;
- ``recent``: within :data:`RECENT_KEYS` keys before the row, outside every piece;
- ``far``: the rest of the haystack.

Per prompt and layer: the attention mass the rows put in each place (mean over the rows and query
heads) and the part of it the index drops, exact softmax over every causal key as the reference.
One JSON line per prompt in ``<out>/needle_rows_missing.jsonl`` (rerun to resume) and
``needle_rows_missing.md``.

    python benchmarks/needle_rows_missing.py --model qwen2.5-coder-0.5b --length 8192 --device cpu \\
        --out docs/results/needle-rows-missing-cpu-qwen0.5b-8k

``--index default`` measures the default plan's index instead (KV-group columns, and the question's
queries from ``--question-from`` rows: 4,096 by default, so that an 8K prompt has them as a 16K+ one
does under the default plan).

Memory: per layer the rows' ``[Hq, R, N]`` float32 probabilities and the index's ``[Hq, R, N]`` mask
(R = the pieces' rows, ~100-300 for these tasks); no N x N matrix.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from needle_row_estimation import add_prompt_arguments, index_from_rows, measure_prompts
from ruler_rows_recall import piece_rows

from longinfer.eval import ruler
from longinfer.eval.capture import capture_qk
from longinfer.eval.report import markdown_table
from longinfer.patterns.vertical_slash import VerticalSlashConfig, estimate_vertical_slash, estimation_positions
from longinfer.plans.schema import DEFAULT_PATTERN_CONFIG

logger = logging.getLogger("needle_rows_missing")
RESULTS = "needle_rows_missing.jsonl"
CATEGORIES = ("own piece", "other pieces", "sink", "recent", "far")
SINK_KEYS = 64
RECENT_KEYS = 1024


def key_categories(rows: torch.Tensor, n: int, pieces: list[tuple[int, int]]) -> torch.Tensor:
    """``[R, N]`` int64 category (an index into :data:`CATEGORIES`) of every key for every row: own
    piece, other pieces, sink, recent, far, in that order of precedence."""
    keys = torch.arange(n)
    piece_of = torch.full((n,), -1, dtype=torch.long)
    for number, (start, stop) in enumerate(pieces):
        piece_of[start:stop] = number
    row_piece = piece_of[rows][:, None]
    key_piece = piece_of[None, :]
    category = torch.full((rows.numel(), n), CATEGORIES.index("far"), dtype=torch.long)
    category[(rows[:, None] - keys[None, :] < RECENT_KEYS)] = CATEGORIES.index("recent")
    category[:, keys < SINK_KEYS] = CATEGORIES.index("sink")
    category[(key_piece >= 0) & (key_piece != row_piece)] = CATEGORIES.index("other pieces")
    category[(key_piece >= 0) & (key_piece == row_piece)] = CATEGORIES.index("own piece")
    return category


def mass_by_category(probs: torch.Tensor, kept: torch.Tensor, category: torch.Tensor) -> tuple[list[float], list[float]]:
    """``(attention, dropped)``: per category the mass ``probs [H, R, N]`` (rows' causal softmax) puts
    there and the part of it outside ``kept [H, R, N]``, each a mean over heads and rows."""
    one_hot = torch.nn.functional.one_hot(category, len(CATEGORIES)).to(probs.dtype)  # [R, N, C]
    attention = torch.einsum("hrn,rnc->c", probs, one_hot) / (probs.shape[0] * probs.shape[1])
    dropped = torch.einsum("hrn,rnc->c", probs * ~kept, one_hot) / (probs.shape[0] * probs.shape[1])
    return attention.tolist(), dropped.tolist()


def row_probabilities(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax ``[Hq, R, N]`` float32 of query rows ``rows`` of ``q [1, Hq, N, D]`` against ``k [1, Hkv, N, D]``."""
    group = q.shape[1] // k.shape[1]
    scores = (q[0, :, rows].float() @ k[0].float().repeat_interleave(group, 0).transpose(-1, -2)) * scale
    causal = torch.arange(k.shape[2], device=q.device)[None, :] <= rows.to(q.device)[:, None]
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


def measure_prompt(model: Any, prompt: ruler.RulerPrompt, default_config: VerticalSlashConfig | None = None
                   ) -> dict[str, Any]:
    """Per layer the attention and the dropped mass per category at the prompt's piece rows, under the
    index of session 22's estimate (64 strided queries, per-head coverage 0.9) or, with
    ``default_config``, under that config's index (:func:`estimate_vertical_slash`)."""
    ids = torch.tensor([prompt.input_ids], device=model.device)
    n = ids.shape[1]
    rows = piece_rows(prompt)
    category = key_categories(rows, n, prompt.pieces)
    strided = estimation_positions(n, n, 64, "strided")
    result: dict[str, Any] = {"attention": [], "dropped": [], "rows": rows.numel()}

    def on_layer(captured: Any) -> None:
        q, k, scale = captured.q, captured.k, captured.sm_scale
        if default_config is None:
            index = index_from_rows(q, k, strided.to(q.device), scale)
        else:
            index = estimate_vertical_slash(q, k, default_config, sm_scale=scale)
        probs = row_probabilities(q, k, rows, scale).cpu()
        kept = index.mask(rows.to(q.device))[0].cpu()
        attention, dropped = mass_by_category(probs, kept, category)
        result["attention"].append(attention)
        result["dropped"].append(dropped)
        logger.info("layer %d: dropped %.3f of the rows' attention", captured.layer, sum(dropped))

    capture_qk(model, ids, on_layer=on_layer)
    return result


def write_report(out: Path, records: list[dict[str, Any]], command: str) -> Path:
    """``needle_rows_missing.md``: per category the attention and the dropped mass, means over layers and prompts."""
    def mean_of(key: str, position: int) -> float:
        return statistics.fmean(statistics.fmean(layer[position] for layer in r[key]) for r in records)

    dropped_total = sum(mean_of("dropped", i) for i in range(len(CATEGORIES)))
    table = [[name, f"{mean_of('attention', i):.4f}", f"{mean_of('dropped', i):.4f}",
              f"{100 * mean_of('dropped', i) / max(mean_of('attention', i), 1e-12):.1f}%",
              f"{100 * mean_of('dropped', i) / dropped_total:.1f}%"] for i, name in enumerate(CATEGORIES)]
    first = records[0]
    text = "\n".join([
        "# Where the default index drops the needle rows' attention", "",
        f"- model: {first['model']}, length {first['length']}, device {first['device']}, torch {first['torch']}; "
        f"prompts: {', '.join(r['prompt'] for r in records)}",
        f"- command: `{command}`",
        "- index: 64 strided estimation queries, per-head coverage 0.9 (at most 4,096 columns / 8,192 diagonals); "
        f"rows: every row inside the inserted sentences; categories: sink = the first {SINK_KEYS} keys, recent = "
        f"within {RECENT_KEYS} keys before the row; means over rows, query heads, layers, then prompts.", "",
        markdown_table(["keys", "attention there", "dropped there", "dropped / attention", "share of all dropped"],
                       table), "",
        f"All dropped: {dropped_total:.4f} of the rows' attention.", ""])
    path = out / "needle_rows_missing.md"
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_prompt_arguments(parser)
    parser.add_argument("--index", choices=("strided", "default"), default="strided",
                        help="session 22's estimate (64 strided queries, per-head columns) or the default plan's")
    parser.add_argument("--question-from", type=int, default=4096,
                        help="with --index default: the question's queries join from this many rows (default 4096)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    command = "python3 benchmarks/needle_rows_missing.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    default_config = (dataclasses.replace(DEFAULT_PATTERN_CONFIG, question_from=args.question_from)
                      if args.index == "default" else None)
    records = measure_prompts(args, command, RESULTS, functools.partial(measure_prompt, default_config=default_config))
    print(write_report(args.out, records, command).read_text())
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
