"""benchmarks/ruler_frontier.py on hand-made eval records: labels, latest-run choice, paired counts, density."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmark_scripts import BENCHMARKS, load_benchmark

SCRIPT = BENCHMARKS / "ruler_frontier.py"


def _records(method: str, scores: list[float], density: float | None = None, model: str = "m",
             date: str = "2026-11-01T00:00:00+00:00") -> list[dict]:
    """RULER records of two sub-tasks, ``len(scores) // 2`` prompts each, in the eval's format."""
    half = len(scores) // 2
    out = []
    for i, score in enumerate(scores):
        subtask = "niah_single" if i < half else "vt"
        record = {"task": "ruler", "model": model, "length": 1024, "method": method, "subtask": subtask,
                  "case_id": f"{subtask}/L1024/i{i % half}/s0", "score": score, "date": date}
        if density is not None:
            record["attention_density"] = density
        out.append(record)
    return out


def _write(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def results(tmp_path: Path) -> Path:
    dense = [1.0, 1.0, 0.0, 1.0]
    _write(tmp_path / "a" / "ruler.jsonl", _records("dense", dense)
           + _records("longinfer:docs/plans/q15-kv-tau0.8-tail.json", [1.0, 0.0, 1.0, 1.0], density=0.25)
           + _records("longinfer", [0.0, 0.0, 0.0, 1.0]) + _records("other-model", [1.0] * 4, model="x"))
    # A later file repeats the default's rows (seeded: same date) with other scores: the first file's are kept.
    _write(tmp_path / "b" / "ruler.jsonl", _records("dense", dense) + _records("longinfer", [1.0] * 4))
    # The default since plan digests: its own row, named by its digest.
    _write(tmp_path / "d" / "ruler.jsonl", _records("dense", dense) + [
        dict(r, plan_digest="abcd") for r in _records("longinfer", [1.0, 1.0, 0.0, 1.0])])
    # A run cut short (one of four prompts): listed apart, not scored.
    _write(tmp_path / "c" / "ruler.jsonl", _records("dense", dense) + _records("longinfer:seg16", [1.0, 1.0])[:1])
    # An older run of the kv plan in a file that sorts first: the newer run (file a) is kept.
    _write(tmp_path / "0" / "ruler.jsonl", _records("dense", dense) + _records(
        "longinfer:q15-kv-tau0.8-tail", [0.0] * 4, date="2026-10-01T00:00:00+00:00"))
    return tmp_path


def test_rows_count_paired_prompts_and_keep_each_methods_latest_run(results: Path):
    frontier = load_benchmark("ruler_frontier")
    runs = frontier.read_runs(results.rglob("ruler.jsonl"), "m", 1024)
    complete, partial = frontier.split_complete(runs, results)
    assert partial == [{"method": "seg16", "prompts": 1, "of": 4, "source": "c/ruler.jsonl"}]
    rows = {row["method"]: row for row in frontier.frontier_rows(complete, results)}
    # plan file names keep their "0.8"; dense is the baseline; the default is named by its rule
    assert set(rows) == {"q15-kv-tau0.8-tail", "longinfer (default until session 13)", "longinfer (default abcd)"}
    assert rows["longinfer (default abcd)"]["difference"] == 0.0
    kv = rows["q15-kv-tau0.8-tail"]
    # dense averages (100 + 50) / 2 = 75; kv (50 + 100) / 2 = 75: one prompt better, one worse
    assert (kv["score"], kv["difference"], kv["better"], kv["worse"], kv["prompts"]) == (75.0, 0.0, 1, 1, 4)
    assert kv["density"] == pytest.approx(0.25) and kv["source"] == "a/ruler.jsonl"
    default = rows["longinfer (default until session 13)"]
    assert (default["score"], default["difference"], default["worse"], default["source"]) == (25.0, -50.0, 2, "a/ruler.jsonl")
    assert default["density"] is None
    assert all(row["logprob_difference"] is None for row in rows.values())  # no record carries one
    # niah_single/i1 is lost by 2 of the 3 runs (kv and the old default), niah_single/i0 by the old default alone
    assert frontier.common_losses(complete) == [("niah_single/L1024/i1/s0", 2)]
    assert frontier.common_losses(complete, share=0.3) == [("niah_single/L1024/i1/s0", 2),
                                                           ("niah_single/L1024/i0/s0", 1)]


def test_reference_logprob_difference_is_paired_per_prompt(tmp_path: Path):
    frontier = load_benchmark("ruler_frontier")
    dense = [dict(r, reference_logprob=-1.0) for r in _records("dense", [1.0, 1.0, 1.0, 1.0])]
    ours = [dict(r, reference_logprob=lp) for r, lp in zip(_records("longinfer:p", [1.0, 1.0, 0.0, 1.0]),
                                                            [-1.5, -1.0, -4.0, -2.0])]
    _write(tmp_path / "r" / "ruler.jsonl", dense + ours)
    rows = frontier.frontier_rows(frontier.read_runs(tmp_path.rglob("ruler.jsonl"), "m", 1024), tmp_path)
    # niah_single: (-0.5 + 0) / 2 = -0.25; vt: (-3 - 1) / 2 = -2; the mean over sub-tasks -1.125
    assert rows[0]["logprob_difference"] == pytest.approx(-1.125)
    assert "| -1.125 |" in frontier.render_table(rows)


def _latency(method: str, ttft: float, date: str, **extra) -> dict:
    return {"task": "latency", "model": "m", "length": 1024, "method": method, "ttft_s": ttft, "date": date, **extra}


def test_ttft_speedups_are_the_latest_against_dense_of_the_same_file(results: Path):
    frontier = load_benchmark("ruler_frontier")
    early, late = "2026-11-01T00:00:00+00:00", "2026-11-02T00:00:00+00:00"
    _write(results / "t1" / "latency.jsonl", [
        _latency("dense", 2.0, early), _latency("longinfer:docs/plans/q15-kv-tau0.8-tail.json", 1.0, early),
        _latency("longinfer", 0.5, early, plan_digest="abcd"), _latency("peer", 1.0, early, length=2048)])
    _write(results / "t2" / "latency.jsonl", [  # later: replaces the kv plan's speedup
        _latency("dense", 3.0, late), _latency("longinfer:q15-kv-tau0.8-tail", 1.0, late)])
    _write(results / "t3" / "latency.jsonl", [_latency("longinfer:other", 1.0, late)])  # no dense here: unused
    speedups = frontier.read_ttft(results.rglob("latency.jsonl"), "m", 1024)
    assert speedups == {"q15-kv-tau0.8-tail": 3.0, "longinfer (default abcd)": 4.0}


def test_script_writes_table_plot_and_json(results: Path, tmp_path: Path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(SCRIPT), "--results", str(results), "--model", "m", "--length", "1024",
                           "--out", str(out)], capture_output=True, text=True, check=True)
    assert "| q15-kv-tau0.8-tail | 75.0 |" in done.stdout and "TTFT vs dense" in done.stdout
    assert "Runs cut short, not scored: seg16 (1 of 4 prompts, `c/ruler.jsonl`)." in done.stdout
    assert (out / "frontier.png").stat().st_size > 0
    assert [row["method"] for row in json.loads((out / "frontier.json").read_text())] == [
        "q15-kv-tau0.8-tail", "longinfer (default abcd)", "longinfer (default until session 13)"]
    missing = subprocess.run([sys.executable, str(SCRIPT), "--results", str(results), "--model", "none", "--out",
                              str(out)], capture_output=True, text=True)
    assert missing.returncode != 0 and "no RULER records of none" in missing.stderr
