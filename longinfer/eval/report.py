"""Markdown tables and PNG figures rendered from result JSONL files alone.

One report per JSONL: a header with the models, devices, dates, package versions and commands
found in the records, then one section per task (needle, ruler, ppl, latency) with the methods
side by side and, where it means something, each method against the baseline (``dense`` by
default). Figures use matplotlib's object API with the Agg canvas, so no display and no
global pyplot state are involved.
"""

from __future__ import annotations

import logging
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .latency import crossover_length
from .methods import NoAttentionMethod
from .results import ResultStore
from .ruler import bootstrap_interval, difference_interval, mean_difference, paired_differences
from .ruler import summarize as ruler_summary

logger = logging.getLogger(__name__)

__all__ = ["render_report", "render_markdown", "markdown_table"]

Record = Mapping[str, Any]


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are converted with ``str``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _ordered(values: Iterable[Any]) -> list[Any]:
    """Distinct values in order of first appearance."""
    return list(dict.fromkeys(values))


def _ok(records: Iterable[Record]) -> list[Record]:
    """Records without an ``error`` (e.g. out of memory)."""
    return [r for r in records if not r.get("error")]


def _group(records: Iterable[Record], *fields: str) -> dict[tuple[Any, ...], list[Record]]:
    groups: dict[tuple[Any, ...], list[Record]] = defaultdict(list)
    for record in records:
        groups[tuple(record.get(f) for f in fields)].append(record)
    return groups


def _mean(records: Sequence[Record], field: str) -> float:
    return statistics.fmean(float(r[field]) for r in records) if records else math.nan


def _baseline(methods: Sequence[str], requested: str) -> str:
    return requested if requested in methods else methods[0]


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _header(records: Sequence[Record]) -> str:
    dates = sorted(r["date"] for r in records if "date" in r)
    versions = _ordered(
        ", ".join(f"{k} {v}" for k, v in sorted(r.get("versions", {}).items()) if v) for r in records
    )
    lines = [
        f"- models: {', '.join(map(str, _ordered(r['model'] for r in records)))}",
        f"- devices: {', '.join(map(str, _ordered(r.get('device', '?') for r in records)))}",
        f"- dates: {dates[0]} to {dates[-1]}" if dates else "- dates: unknown",
        f"- versions: {'; '.join(versions)}",
        f"- records: {len(records)} ({sum(1 for r in records if r.get('error'))} with errors)",
    ]
    commands = _ordered(r["command"] for r in records if r.get("command"))
    lines += [f"- command: `{c}`" for c in commands]
    return "\n".join(lines)


def _density_table(records: Sequence[Record]) -> str:
    """Mean prefill attention density per method and length, over the cases that recorded one
    (longinfer methods); empty when none did."""
    measured = [r for r in _ok(records) if r.get("attention_density") is not None]
    if not measured:
        return ""
    methods = _ordered(r["method"] for r in measured)
    by_cell = _group(measured, "method", "length")
    rows = [[length, *[f"{100 * _mean(by_cell[(m, length)], 'attention_density'):.1f}%" if (m, length) in by_cell
                       else "-" for m in methods]]
            for length in sorted({r["length"] for r in measured})]
    return ("Attention density of the prefill (share of the causal (query, key) pairs computed, all layers; "
            "mean over the cases).\n\n" + markdown_table(["length", *methods], rows))


def _needle_section(
    records: Sequence[Record], out_dir: Path, prefix: str, baseline: str
) -> tuple[str, list[Path]]:
    methods = _ordered(r["method"] for r in records)
    base = _baseline(methods, baseline)
    cells = _group(_ok(records), "method", "length", "depth")
    errors = _group([r for r in records if r.get("error")], "method", "length", "depth")
    lengths = sorted({r["length"] for r in records})
    depths = sorted({r["depth"] for r in records})
    rows = []
    for length in lengths:
        for depth in depths:
            row: list[Any] = [length, f"{depth:.2f}"]
            for method in methods:
                group = cells.get((method, length, depth), [])
                failed = errors.get((method, length, depth), [])
                text = f"{sum(bool(r['passed']) for r in group)}/{len(group)}" if group else "-"
                row.append(text + (f" ({len(failed)} oom)" if failed else ""))
            rows.append(row)
    totals = ["all", ""] + [
        f"{100 * _mean(_ok(r for r in records if r['method'] == m), 'score'):.1f}%" for m in methods
    ]
    text = markdown_table(["length", "depth", *methods], [*rows, totals])
    regressions = []
    for method in methods:
        if method == base:
            continue
        lost = [
            f"{length}@{depth:.2f}"
            for length in lengths
            for depth in depths
            if _mean(cells.get((base, length, depth), []), "score") == 1.0
            and _mean(cells.get((method, length, depth), []), "score") < 1.0
        ]
        regressions.append(
            f"- {method}: fails {len(lost)} cell(s) that {base} passes fully"
            + (f": {', '.join(lost)}" if lost else "")
        )
    figures = [
        _heatmap(
            {(d, n): _mean(cells.get((method, n, d), []), "score") for n in lengths for d in depths},
            rows_=depths,
            cols=lengths,
            row_label="depth",
            col_label="length (tokens)",
            title=f"needle pass rate: {method}",
            path=out_dir / f"{prefix}_{_file_safe(method)}.png",
            row_fmt=lambda d: f"{d:.2f}",
        )
        for method in methods
    ]
    parts = ["Pass count per cell (needles passed / needles).", text, "\n".join(regressions), _density_table(records)]
    return "\n\n".join(p for p in parts if p), figures


def _ruler_section(
    records: Sequence[Record], out_dir: Path, prefix: str, baseline: str
) -> tuple[str, list[Path]]:
    methods = _ordered(r["method"] for r in records)
    base = _baseline(methods, baseline)
    subtasks = _ordered(r["subtask"] for r in records)
    lengths = sorted({r["length"] for r in records})
    summary = ruler_summary(records)

    def score(method: str, length: int, column: str) -> float:
        return summary.get(method, {}).get(length, {}).get(column, math.nan)

    def difference(method: str, length: int) -> str:
        # Paired when the two methods share prompts: the point value then belongs to its interval even
        # where one method ran more prompts than the other (its average then covers prompts the other lacks).
        paired = paired_differences(records, method, base, length)
        if paired is None:
            return f"{score(method, length, 'average') - score(base, length, 'average'):+.1f}"
        interval = difference_interval(records, method, base, length)
        return f"{100 * mean_difference(paired):+.1f} [{interval[0]:+.1f}, {interval[1]:+.1f}]"

    prompts = _prompt_counts(records)

    def average(method: str, length: int) -> str:
        text = f"{score(method, length, 'average'):.1f}"
        counts = {n for (_, n_length), n in prompts.items() if n_length == length}
        return text if len(counts) <= 1 else f"{text} ({prompts.get((method, length), 0)} prompts)"

    rows = [
        [length, *[average(m, length) for m in methods], *[difference(m, length) for m in methods if m != base]]
        for length in lengths
    ]
    header = ["length", *[f"{m} avg" for m in methods], *[f"{m} - {base}" for m in methods if m != base]]
    detail = [
        [length, task, *[f"{score(m, length, task):.1f}" for m in methods]]
        for length in lengths
        for task in subtasks
    ]
    text = (
        "Average score (0-100) over the sub-tasks, per length (with the number of prompts where methods ran "
        "different numbers). Differences to the baseline are paired: the mean over the prompts both methods ran "
        "(sub-tasks weigh equally) with a 95% paired bootstrap interval (resampled within each sub-task).\n\n"
        + markdown_table(header, rows)
        + "\n\nPer sub-task score (share of expected strings found, 0-100).\n\n"
        + markdown_table(["length", "task", *methods], detail)
    )
    density = _density_table(records)
    text += f"\n\n{density}" if density else ""
    reference = _reference_logprob_table(records, methods, base, lengths)
    text += f"\n\n{reference}" if reference else ""
    by_subtask = _reference_logprob_by_subtask(records, methods, base, lengths, subtasks)
    text += f"\n\n{by_subtask}" if by_subtask else ""
    figures = [
        _heatmap(
            {(t, n): score(m, n, t) / 100 for n in lengths for t in subtasks},
            rows_=subtasks,
            cols=lengths,
            row_label="task",
            col_label="length (tokens)",
            title=f"RULER-style score: {m}",
            path=out_dir / f"{prefix}_{_file_safe(m)}.png",
            row_fmt=str,
        )
        for m in methods
    ]
    return text, figures


def _prompt_counts(records: Sequence[Record]) -> dict[tuple[str, int], int]:
    """Scored RULER prompts per ``(method, length)``."""
    counts: dict[tuple[str, int], int] = defaultdict(int)
    for record in _ok(records):
        if record.get("score") is not None:
            counts[(record["method"], record["length"])] += 1
    return dict(counts)


def _reference_logprob_table(records: Sequence[Record], methods: Sequence[str], base: str,
                             lengths: Sequence[int]) -> str:
    """Each method's log-probability of the reference answers against the baseline's, paired per prompt
    (empty when no two methods scored the same prompts)."""
    others = [m for m in methods if m != base]
    rows = []
    for length in lengths:
        cells = []
        for method in others:
            paired = paired_differences(records, method, base, length, field="reference_logprob")
            if paired is None:
                cells.append("—")
                continue
            low, high = bootstrap_interval(paired)
            worse = sum(d < -math.log(2) for per_subtask in paired for d in per_subtask)
            cases = sum(len(per_subtask) for per_subtask in paired)
            cells.append(f"{mean_difference(paired):+.3f} [{low:+.3f}, {high:+.3f}]; {worse} of {cases} halved")
        if any(cell != "—" for cell in cells):
            rows.append([length, *cells])
    if not rows:
        return ""
    return (
        "Log-probability of the reference answer (the expected strings, `\" a, b\"`) after the prompt, teacher-forced "
        f"on the prefill's KV cache: each method minus {base} on the same prompt, in nats (mean over the sub-tasks "
        "of the mean per prompt, 95% paired bootstrap interval; \"halved\": prompts where the method gives the "
        "reference less than half the baseline's probability). Continuous where the score is right or wrong.\n\n"
        + markdown_table(["length", *[f"{m} - {base}" for m in others]], rows)
    )


def _reference_logprob_by_subtask(records: Sequence[Record], methods: Sequence[str], base: str,
                                  lengths: Sequence[int], subtasks: Sequence[str]) -> str:
    """Per length and sub-task, each method's mean paired difference to the baseline in the reference
    answer's log-probability (empty when no two methods scored the same prompts): which task moves."""
    others = [m for m in methods if m != base]
    rows = []
    for length in lengths:
        for task in subtasks:
            of_task = [r for r in records if r.get("subtask") == task]
            cells = []
            for method in others:
                paired = paired_differences(of_task, method, base, length, field="reference_logprob")
                cells.append("—" if paired is None else f"{mean_difference(paired):+.2f}")
            if any(cell != "—" for cell in cells):
                rows.append([length, task, *cells])
    if not rows:
        return ""
    return (
        f"Per sub-task: the mean per prompt of each method's reference log-probability minus {base}'s (nats).\n\n"
        + markdown_table(["length", "task", *[f"{m} - {base}" for m in others]], rows)
    )


def _ppl_section(
    records: Sequence[Record], out_dir: Path, prefix: str, baseline: str
) -> tuple[str, list[Path]]:
    methods = _ordered(r["method"] for r in records)
    base = _baseline(methods, baseline)
    lengths = sorted({r["length"] for r in records})
    groups = _group(_ok(records), "method", "length")

    def ppl(method: str, length: int) -> float:
        group = groups.get((method, length), [])
        if not group:
            return math.nan
        return math.exp(sum(r["nll_sum"] for r in group) / sum(r["n_scored"] for r in group))

    rows = [
        [
            length,
            *[f"{ppl(m, length):.3f}" for m in methods],
            *[f"{100 * (ppl(m, length) / ppl(base, length) - 1):+.2f}%" for m in methods if m != base],
        ]
        for length in lengths
    ]
    header = ["length", *methods, *[f"{m} vs {base}" for m in methods if m != base]]
    return "Perplexity of the last tokens of each window (all windows pooled).\n\n" + markdown_table(
        header, rows
    ), []


def _latency_section(
    records: Sequence[Record], out_dir: Path, prefix: str, baseline: str
) -> tuple[str, list[Path]]:
    methods = _ordered(r["method"] for r in records)
    base = _baseline(methods, baseline)
    lengths = sorted({r["length"] for r in records})
    groups = _group(records, "method", "length")
    ttft: dict[str, dict[int, float]] = defaultdict(dict)
    rows = []
    for length in lengths:
        row: list[Any] = [length]
        for method in methods:
            group = groups.get((method, length), [])
            ok = _ok(group)
            if ok:
                ttft[method][length] = statistics.median(r["ttft_s"] for r in ok)
                peak = ok[-1].get("peak_memory_bytes")
                memory = f"{peak / 2**30:.2f} GiB" if peak is not None else "n/a"
                row.append(f"{1000 * ttft[method][length]:.1f} ms / {memory}")
            else:
                row.append("oom" if group else "-")
        for method in methods:
            if method != base:
                both = length in ttft[method] and length in ttft[base]
                row.append(f"{ttft[base][length] / ttft[method][length]:.2f}x" if both else "-")
        rows.append(row)
    header = [
        "length",
        *[f"{m} TTFT / peak mem" for m in methods],
        *[f"{m} speedup vs {base}" for m in methods if m != base],
    ]
    timers = _ordered(r.get("timer") for r in _ok(records))
    notes = [f"Median TTFT per length; timer: {', '.join(map(str, timers))}."]
    for method in methods:
        if method == NoAttentionMethod.name:
            notes.append(
                f"- {method}: the same forward with every attention output zero, the floor under any "
                f"attention method; its speedup vs {base} is the most an attention method can reach"
            )
        elif method != base:
            cross = crossover_length(ttft[base], ttft[method])
            notes.append(
                f"- crossover {method} vs {base}: "
                + (f"{cross} tokens" if cross else "none in the measured range")
            )
    figure = _line_plot(ttft, out_dir / f"{prefix}.png")
    density = _density_table(records)
    text = notes[0] + "\n\n" + markdown_table(header, rows) + "\n\n" + "\n".join(notes[1:])
    return text + (f"\n\n{density}" if density else ""), [figure]


def _heatmap(
    values: Mapping[tuple[Any, Any], float],
    *,
    rows_: Sequence[Any],
    cols: Sequence[Any],
    row_label: str,
    col_label: str,
    title: str,
    path: Path,
    row_fmt: Callable[[Any], str],
) -> Path:
    """A red-to-green heatmap of values in [0, 1] (``nan`` = not measured), annotated per cell."""
    from matplotlib.figure import Figure

    grid = [[values.get((r, c), math.nan) for c in cols] for r in rows_]
    fig = Figure(figsize=(max(5.0, 3.0 + 0.9 * len(cols)), 1.5 + 0.45 * len(rows_)))
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows_)), [row_fmt(r) for r in rows_])
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    ax.set_title(title, fontsize=10)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, "-" if math.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _line_plot(series: Mapping[str, Mapping[int, float]], path: Path) -> Path:
    """TTFT (log scale) against length, one line per method."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for method, points in series.items():
        lengths = sorted(points)
        ax.plot(lengths, [points[n] for n in lengths], marker="o", label=method)
    ax.set_xscale("log", base=2)
    measured = sorted({n for points in series.values() for n in points})
    ax.set_xticks(measured, [str(n) for n in measured])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("time to first token (s)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


_SECTIONS: dict[str, Callable[[Sequence[Record], Path, str, str], tuple[str, list[Path]]]] = {
    "needle": _needle_section,
    "ruler": _ruler_section,
    "ppl": _ppl_section,
    "latency": _latency_section,
}


def render_markdown(
    records: Sequence[Record], out_dir: Path, stem: str, *, baseline: str = "dense"
) -> tuple[str, list[Path]]:
    """The report's markdown and the figures it wrote to ``out_dir``.

    Figures are named ``<stem>_<method>.png`` (latency: ``<stem>.png``); the task name and, when
    the records hold several models, the model name are added when needed to keep names unique.
    """
    if not records:
        raise ValueError("no result records to report on")
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"# Evaluation report: {stem}", _header(records)]
    figures: list[Path] = []
    for (model, task), group in _group(records, "model", "task").items():
        section = _SECTIONS.get(task)
        if section is None:
            logger.warning("no report section for task '%s' (%d records); skipped", task, len(group))
            parts.append(f"## {task} ({model})\n\nNo renderer for this task; {len(group)} records not shown.")
            continue
        prefix = stem if stem == task else f"{stem}_{task}"
        if len({r["model"] for r in records}) > 1:
            prefix += f"_{_file_safe(str(model))}"
        text, written = section(group, out_dir, prefix, baseline)
        figures += written
        links = "\n".join(f"![{p.stem}]({p.name})" for p in written)
        parts.append(f"## {task} ({model})\n\n{text}" + (f"\n\n{links}" if links else ""))
    return "\n\n".join(parts) + "\n", figures


def render_report(
    jsonl_path: str | Path, out_dir: str | Path | None = None, *, baseline: str = "dense"
) -> Path:
    """Render ``<out_dir>/<name>.md`` and its PNGs from one result JSONL; returns the markdown path."""
    jsonl_path = Path(jsonl_path)
    if not jsonl_path.exists():
        raise ValueError(f"result file {jsonl_path} does not exist")
    out = Path(out_dir) if out_dir is not None else jsonl_path.parent
    text, _ = render_markdown(ResultStore(jsonl_path).records(), out, jsonl_path.stem, baseline=baseline)
    path = out / f"{jsonl_path.stem}.md"
    path.write_text(text, encoding="utf-8")
    return path
