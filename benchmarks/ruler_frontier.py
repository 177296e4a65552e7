"""Every measured RULER-style run of one model and length in one table and one plot: score vs density.

Reads the committed ``ruler.jsonl`` files (append-only eval records), keeps each method's latest run
(the default plan and dense recur in many files as seeded rows), and reports per method: the
average score, its paired difference to dense with the 95% bootstrap interval
(:func:`longinfer.eval.ruler.difference_interval`), how many prompts scored better / worse than
under dense (a sharper signal than the average at 12 prompts per sub-task), the mean
prefill attention density where the records carry it (sessions 12 on), the mean paired difference of
the reference answer's log-probability where both runs carry it (session 18 on), and the time to
first token against dense at the same length where a ``latency.jsonl`` holds both (the method's latest
measurement, dense from the same process). Below the table: the prompts that most runs score lower
than dense (a gap concentrated in a few prompts shows there).

    python benchmarks/ruler_frontier.py --model qwen2.5-coder-1.5b --length 32768 \\
        --out docs/results/ruler-frontier-q15-32k
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from longinfer.eval.report import markdown_table
from longinfer.eval.ruler import difference_interval, mean_difference, paired_differences, summarize

log = logging.getLogger("ruler_frontier")
Record = dict[str, Any]


def method_label(method: str) -> str:
    """``longinfer:docs/.../q15-kv-tau0.8-tail.json`` -> ``q15-kv-tau0.8-tail``; others unchanged."""
    if not method.startswith("longinfer:"):
        return method
    name = method.split(":", 1)[1].rsplit("/", 1)[-1]  # not Path.stem: "tau0.8-tail" has no suffix
    return name.removesuffix(".json")


def record_label(record: Record) -> str:
    """:func:`method_label` of a record's method; the built-in default also names its rule, since the
    default changed: records from before plan digests (session 14) ran the per-head-column default
    of sessions 10–13, later ones carry the digest of theirs."""
    label = method_label(record["method"])
    if label != "longinfer":
        return label
    digest = record.get("plan_digest")
    return f"longinfer (default {digest})" if digest else "longinfer (default until session 13)"


def _records(path: Path, task: str, model: str, length: int) -> list[Record]:
    """The error-free eval records of ``task`` for ``model`` at ``length`` tokens in one JSONL file."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("task") == task and r.get("model") == model
            and int(r.get("length", -1)) == length and not r.get("error")]


def read_runs(files: Iterable[Path], model: str, length: int) -> dict[str, tuple[Path, list[Record]]]:
    """Per method label, the file of its latest run and that file's records of it and of dense.

    Runs are dated by their newest record (seeded copies of earlier rows keep their dates, so a
    file that repeats the default plan's rows does not count as a new run of it); on equal dates
    the first file in path order wins.
    """
    runs: dict[str, tuple[str, Path, list[Record]]] = {}
    for path in sorted(files):
        records = _records(path, "ruler", model, length)
        by_label: dict[str, list[Record]] = {}
        for r in records:
            label = record_label(r)
            by_label.setdefault(label, []).append(dict(r, method=label))
        dense = by_label.pop("dense", [])
        if not dense:
            continue
        for label, ours in by_label.items():
            date = max(str(r.get("date", "")) for r in ours)
            if label not in runs or date > runs[label][0]:
                runs[label] = (date, path, dense + ours)
    return {label: (path, records) for label, (_, path, records) in runs.items()}


def read_ttft(files: Iterable[Path], model: str, length: int) -> dict[str, float]:
    """Per method label (:func:`record_label`), the TTFT speedup over dense (dense's TTFT / the method's)
    from the latest ``latency`` record of that label whose file also timed dense at this length."""
    latest: dict[str, tuple[str, float]] = {}
    for path in sorted(files):
        records = [r for r in _records(path, "latency", model, length) if "ttft_s" in r]
        dense = [r["ttft_s"] for r in records if r["method"] == "dense"]
        if not dense:
            continue
        for r in records:
            label = record_label(r)
            date = str(r.get("date", ""))
            if label != "dense" and (label not in latest or date > latest[label][0]):
                latest[label] = (date, dense[-1] / r["ttft_s"])
    return {label: speedup for label, (_, speedup) in latest.items()}


def _source(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def split_complete(runs: dict[str, tuple[Path, list[Record]]],
                   root: Path) -> tuple[dict[str, tuple[Path, list[Record]]], list[dict[str, Any]]]:
    """The runs that scored every prompt dense scored, and one row per run cut short (a device call
    that ran out of time): ``method``, ``prompts`` scored, ``of`` dense's, ``source``. A partial
    run has no comparable average (some sub-tasks are missing), so it is listed, not scored."""
    complete, partial = {}, []
    for label, (path, records) in runs.items():
        dense = {r["case_id"] for r in records if r["method"] == "dense"}
        ours = {r["case_id"] for r in records if r["method"] == label}
        if dense <= ours:
            complete[label] = (path, records)
        else:
            partial.append({"method": label, "prompts": len(ours & dense), "of": len(dense),
                            "source": _source(path, root)})
    return complete, partial


def frontier_rows(runs: dict[str, tuple[Path, list[Record]]], root: Path) -> list[dict[str, Any]]:
    """One row per method: score, difference to dense with interval, changed prompts, density, source.
    The runs must be complete (:func:`split_complete`)."""
    rows = []
    for label, (path, records) in runs.items():
        summary = summarize(records)
        length = records[0]["length"]
        score, dense = summary[label][length]["average"], summary["dense"][length]["average"]
        interval = difference_interval(records, label, "dense", length)
        by_case = {r["case_id"]: r["score"] for r in records if r["method"] == "dense"}
        ours = [(r["score"], by_case[r["case_id"]]) for r in records if r["method"] == label and r["case_id"] in by_case]
        densities = [r["attention_density"] for r in records if r["method"] == label and "attention_density" in r]
        logprob = paired_differences(records, label, "dense", length, field="reference_logprob")
        rows.append({
            "method": label, "score": score, "dense": dense, "difference": score - dense, "interval": interval,
            "prompts": len(ours), "better": sum(a > b for a, b in ours), "worse": sum(a < b for a, b in ours),
            "density": statistics.fmean(densities) if densities else None,
            "logprob_difference": None if logprob is None else mean_difference(logprob),
            "source": _source(path, root),
        })
    return sorted(rows, key=lambda row: -row["difference"])


def common_losses(runs: dict[str, tuple[Path, list[Record]]], share: float = 0.5) -> list[tuple[str, int]]:
    """The prompts (``case_id``) that at least ``share`` of the runs score lower than dense, with how many
    do, most first (then by case id). The runs must be complete (:func:`split_complete`)."""
    lost: dict[str, int] = {}
    for label, (_, records) in runs.items():
        dense = {r["case_id"]: r["score"] for r in records if r["method"] == "dense"}
        for r in records:
            if r["method"] == label and r["score"] < dense[r["case_id"]]:
                lost[r["case_id"]] = lost.get(r["case_id"], 0) + 1
    needed = max(1, share * len(runs))
    return sorted(((case, n) for case, n in lost.items() if n >= needed), key=lambda item: (-item[1], item[0]))


def render_common_losses(losses: list[tuple[str, int]], runs: int) -> str:
    """:func:`common_losses` as a sentence (empty when there are none)."""
    if not losses:
        return ""
    listed = ", ".join(f"`{case}` ({n})" for case, n in losses)
    return f"Prompts that at least half of the {runs} runs score lower than dense (how many runs): {listed}."


def render_table(rows: list[dict[str, Any]]) -> str:
    def interval(row: dict[str, Any]) -> str:
        low_high = row["interval"]
        return f"{row['difference']:+.1f}" + ("" if low_high is None else f" [{low_high[0]:+.1f}, {low_high[1]:+.1f}]")

    return markdown_table(
        ["method", "score", "− dense [95%]", "prompts better / worse / of", "density", "Δ log p(answer)",
         "TTFT vs dense", "run"],
        [[row["method"], f"{row['score']:.1f}", interval(row), f"{row['better']} / {row['worse']} / {row['prompts']}",
          "—" if row["density"] is None else f"{100 * row['density']:.1f}%",
          "—" if row.get("logprob_difference") is None else f"{row['logprob_difference']:+.3f}",
          "—" if row.get("ttft_speedup") is None else f"{row['ttft_speedup']:.2f}x", f"`{row['source']}`"]
         for row in rows])


def render_partial(partial: list[dict[str, Any]]) -> str:
    """The runs cut short, as a sentence (empty when there are none)."""
    if not partial:
        return ""
    runs = "; ".join(f"{row['method']} ({row['prompts']} of {row['of']} prompts, `{row['source']}`)" for row in partial)
    return f"Runs cut short, not scored: {runs}."


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Difference to dense (with its interval) against density; methods without density are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [row for row in rows if row["density"] is not None]
    fig, ax = plt.subplots(figsize=(8, 5))
    for row in shown:
        low, high = row["interval"] or (row["difference"], row["difference"])
        x = 100 * row["density"]
        ax.errorbar(x, row["difference"], yerr=[[row["difference"] - low], [high - row["difference"]]], fmt="o",
                    capsize=3)
        ax.annotate(row["method"], (x, row["difference"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    for row in rows:
        if row["density"] is None and row["method"] == "peer":
            ax.axhline(row["difference"], linestyle="--", color="gray")
            ax.text(0.01, row["difference"], " peer (density not recorded)", fontsize=7, color="gray",
                    va="bottom", transform=ax.get_yaxis_transform())
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("prefill attention density (%)")
    ax.set_ylabel("RULER-style average − dense (points)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=Path("docs/results"), help="folder searched for ruler.jsonl")
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    runs = read_runs(args.results.rglob("ruler.jsonl"), args.model, args.length)
    if not runs:
        parser.error(f"no RULER records of {args.model} at {args.length} tokens under {args.results}")
    complete, partial = split_complete(runs, args.results)
    speedups = read_ttft(args.results.rglob("latency.jsonl"), args.model, args.length)
    rows = [dict(row, ttft_speedup=speedups.get(row["method"])) for row in frontier_rows(complete, args.results)]
    args.out.mkdir(parents=True, exist_ok=True)
    if any(row["density"] is not None for row in rows):
        plot(rows, args.out / "frontier.png", f"{args.model}, RULER-style at {args.length} tokens")
    else:
        log.info("no run records its density: no plot")
    (args.out / "frontier.json").write_text(json.dumps(rows, indent=1) + "\n")
    losses = render_common_losses(common_losses(complete), len(complete))
    text = "\n\n".join(part for part in (render_table(rows), render_partial(partial), losses) if part)
    (args.out / "frontier_table.md").write_text(text + "\n")
    log.info("%d methods -> %s", len(rows), args.out)
    print(text)


if __name__ == "__main__":
    main()
