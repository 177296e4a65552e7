"""Reports rendered from JSONL alone: table values, regressions, crossover, PNG files."""

from __future__ import annotations

import math

import pytest

from longinfer.eval.report import markdown_table, render_report
from longinfer.eval.results import ResultStore

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(path, records):
    store = ResultStore(path)
    for i, record in enumerate(records):
        store.append(
            {
                "model": "tiny",
                "case_id": f"c{i}",
                "date": f"2026-01-0{1 + i % 9}T00:00:00+00:00",
                "device": "cpu (test)",
                "versions": {"torch": "2.x"},
                **record,
            }
        )
    return path


def _png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC, path


def test_markdown_table():
    assert markdown_table(["a", "b"], [[1, 2.5]]) == "| a | b |\n|---|---|\n| 1 | 2.5 |"


def test_needle_report(tmp_path):
    records = []
    for method, passes in [
        ("dense", {(1024, 0.0): [1, 1], (1024, 1.0): [1, 0]}),
        ("longinfer", {(1024, 0.0): [1, 0], (1024, 1.0): [1, 1]}),
    ]:
        for (length, depth), results in passes.items():
            for ok in results:
                records.append(
                    {
                        "method": method,
                        "task": "needle",
                        "length": length,
                        "depth": depth,
                        "passed": bool(ok),
                        "score": float(ok),
                        **({"attention_density": 0.1 + 0.1 * ok} if method == "longinfer" else {}),
                    }
                )
    records.append({"method": "longinfer", "task": "needle", "length": 2048, "depth": 0.0, "error": "oom"})
    path = render_report(_write(tmp_path / "needle.jsonl", records), tmp_path / "out")
    text = path.read_text()
    assert path == tmp_path / "out" / "needle.md"
    assert "| length | depth | dense | longinfer |" in text
    assert "| 1024 | 0.00 | 2/2 | 1/2 |" in text
    assert "| 1024 | 1.00 | 1/2 | 2/2 |" in text
    assert "| 2048 | 0.00 | - | - (1 oom) |" in text
    # the density table: (0.2 + 0.1 + 0.2 + 0.2) / 4 at 1024; the oom case records none
    assert "| length | longinfer |" in text and "| 1024 | 17.5% |" in text
    assert "| all |  | 75.0% | 75.0% |" in text
    assert "longinfer: fails 1 cell(s) that dense passes fully: 1024@0.00" in text
    assert "- devices: cpu (test)" in text and "(1 with errors)" in text
    for method in ("dense", "longinfer"):
        _png(tmp_path / "out" / f"needle_{method}.png")
        assert f"![needle_{method}](needle_{method}.png)" in text


def test_ruler_report(tmp_path):
    records = []
    scores = {
        ("dense", "niah_single"): 1.0,
        ("dense", "cwe"): 0.5,
        ("sparse", "niah_single"): 1.0,
        ("sparse", "cwe"): 0.3,
    }
    for (method, subtask), score in scores.items():
        for sample_score in (score, score):
            records.append(
                {"method": method, "task": "ruler", "length": 4096, "subtask": subtask, "score": sample_score}
            )
    text = render_report(_write(tmp_path / "ruler.jsonl", records)).read_text()
    assert "| 4096 | 75.0 | 65.0 | -10.0 |" in text  # no prompt in common: no interval
    assert "| 4096 | cwe | 50.0 | 30.0 |" in text
    _png(tmp_path / "ruler_sparse.png")
    for i, record in enumerate(records):  # the same prompts under both methods: paired
        record["case_id"] = f"{record['subtask']}/{i % 2}"
    text = render_report(_write(tmp_path / "paired.jsonl", records)).read_text()
    assert "| 4096 | 75.0 | 65.0 | -10.0 [-10.0, -10.0] |" in text  # every pair differs by the same


def test_ruler_report_pairs_the_difference_when_a_method_ran_fewer_prompts(tmp_path):
    # dense ran prompts 0 and 1 of each sub-task, sparse only prompt 0, where it matches dense
    dense = {("niah_single", 0): 1.0, ("niah_single", 1): 0.0, ("cwe", 0): 0.5, ("cwe", 1): 0.5}
    records = [{"method": "dense", "task": "ruler", "length": 4096, "subtask": t, "score": v, "case_id": f"{t}/{i}"}
               for (t, i), v in dense.items()]
    records += [{"method": "sparse", "task": "ruler", "length": 4096, "subtask": t, "score": v, "case_id": f"{t}/{i}"}
                for (t, i), v in dense.items() if i == 0]
    text = render_report(_write(tmp_path / "ruler.jsonl", records)).read_text()
    # averages over different prompts (dense 50.0, sparse 75.0) would claim +25.0; on the shared prompts it is 0
    assert "| 4096 | 50.0 (4 prompts) | 75.0 (2 prompts) | +0.0 [+0.0, +0.0] |" in text



def test_ruler_report_gives_each_sub_task_its_log_probability_difference(tmp_path):
    logprobs = {  # (method, subtask) -> the two prompts' reference log-probabilities
        ("dense", "niah_single"): (-1.0, -2.0), ("dense", "vt"): (-0.5, -0.5),
        ("sparse", "niah_single"): (-1.5, -2.5), ("sparse", "vt"): (-3.5, -0.5),
    }
    records = [
        {"method": method, "task": "ruler", "length": 4096, "subtask": subtask, "score": 1.0,
         "reference_logprob": value, "case_id": f"{subtask}/{i}"}
        for (method, subtask), values in logprobs.items()
        for i, value in enumerate(values)
    ]
    text = render_report(_write(tmp_path / "ruler.jsonl", records)).read_text()
    assert "| 4096 | niah_single | -0.50 |" in text
    assert "| 4096 | vt | -1.50 |" in text  # (-3.0 + 0.0) / 2
    assert "| 4096 | -1.000 [" in text  # the sub-tasks' mean, as before
    records = [r for r in records if r["method"] == "dense"]  # nothing paired: no table
    assert "Per sub-task: the mean" not in render_report(_write(tmp_path / "dense.jsonl", records)).read_text()

def test_ppl_report_pools_windows(tmp_path):
    records = [
        {"method": "dense", "task": "ppl", "length": 8192, "nll_sum": 100.0, "n_scored": 50},
        {"method": "dense", "task": "ppl", "length": 8192, "nll_sum": 110.0, "n_scored": 50},
        {"method": "longinfer", "task": "ppl", "length": 8192, "nll_sum": 212.0, "n_scored": 100},
    ]
    text = render_report(_write(tmp_path / "ppl.jsonl", records)).read_text()
    dense, sparse = math.exp(2.1), math.exp(2.12)
    assert f"| 8192 | {dense:.3f} | {sparse:.3f} | {100 * (sparse / dense - 1):+.2f}% |" in text


def test_latency_report_and_crossover(tmp_path):
    ttft = {
        "dense": {8192: 0.10, 16384: 0.40, 32768: 1.60},
        "longinfer": {8192: 0.20, 16384: 0.30, 32768: 0.40},
    }
    records = [
        {
            "method": m,
            "task": "latency",
            "length": n,
            "ttft_s": t,
            "peak_memory_bytes": 2**30,
            "timer": "cuda-synchronized",
        }
        for m, points in ttft.items()
        for n, t in points.items()
    ]
    for record in records:
        if record["method"] == "longinfer":
            record["attention_density"] = {8192: 0.5, 16384: 0.3, 32768: 0.2}[record["length"]]
    records.append({"method": "longinfer", "task": "latency", "length": 65536, "error": "oom"})
    text = render_report(_write(tmp_path / "latency.jsonl", records)).read_text()
    assert "timer: cuda-synchronized" in text
    assert "Attention density of the prefill" in text and "| 32768 | 20.0% |" in text  # longinfer's column only
    assert "| 32768 | 1600.0 ms / 1.00 GiB | 400.0 ms / 1.00 GiB | 4.00x |" in text
    assert "| 65536 | - | oom | - |" in text
    assert "crossover longinfer vs dense: 16384 tokens" in text
    _png(tmp_path / "latency.png")


def test_latency_report_names_the_no_attention_floor(tmp_path):
    """The no-attention method is reported as the ceiling on any method's speedup, not with a crossover."""
    records = [
        {"method": m, "task": "latency", "length": 32768, "ttft_s": t, "peak_memory_bytes": None, "timer": "cpu-wall"}
        for m, t in (("dense", 1.6), ("longinfer", 0.4), ("no-attention", 0.2))
    ]
    text = render_report(_write(tmp_path / "latency.jsonl", records)).read_text()
    assert "| 32768 | 1600.0 ms / n/a | 400.0 ms / n/a | 200.0 ms / n/a | 4.00x | 8.00x |" in text
    assert "no-attention: the same forward with every attention output zero" in text
    assert "crossover no-attention" not in text


def test_baseline_falls_back_to_first_method(tmp_path):
    records = [
        {"method": m, "task": "ppl", "length": 10, "nll_sum": s, "n_scored": 1}
        for m, s in (("a", 1.0), ("b", 2.0))
    ]
    text = render_report(_write(tmp_path / "p.jsonl", records), baseline="dense").read_text()
    assert "| length | a | b | b vs a |" in text


def test_unknown_task_is_listed_not_dropped(tmp_path):
    text = render_report(
        _write(tmp_path / "x.jsonl", [{"method": "a", "task": "recall", "length": 1}])
    ).read_text()
    assert "No renderer for this task; 1 records not shown." in text


def test_empty_or_missing_results(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no result records"):
        render_report(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="does not exist"):
        render_report(tmp_path / "missing.jsonl")
