"""``benchmarks/tile_keys_cost.py`` on the CPU: it writes its report, and a rerun resumes instead of measuring."""

from __future__ import annotations

import json
import sys

from tests.benchmark_scripts import load_benchmark


def test_tile_keys_cost_writes_and_resumes(tmp_path, monkeypatch):
    script = load_benchmark("tile_keys_cost")
    argv = ["tile_keys_cost.py", "--device", "cpu", "--lengths", "512", "--configs", "tk1.5,tk1.5q2", "--out",
            str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    assert script.main() == 0
    (report,) = tmp_path.glob("tile-keys-cost-*.json")
    rows = json.loads(report.read_text())["rows"]
    assert [row["config"] for row in rows] == ["tk1.5", "tk1.5q2"]
    for row in rows:
        # density counts the kernel's pairs, rounded up to its key blocks: at 512 tokens it can pass 1
        assert 0 < row["keys_mean"] <= row["keys_max"] <= 512 and 0 < row["density"] <= 1.5
    assert "| 512 | tk1.5 |" in report.with_suffix(".md").read_text()

    measured = []
    monkeypatch.setattr(script, "measure", lambda *args: measured.append(args) or {})
    assert script.main() == 0
    assert measured == []  # both cases were already in the report
