"""benchmarks/cold_start.py end to end on the CPU (Triton interpreter): every part runs twice, the layer
as the integration runs it matches the parts, the report is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "cold_start.py"


def test_cold_start_runs_every_part_and_the_layer_matches_them(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    argv = [sys.executable, str(SCRIPT), "--heads", "4", "--kv-heads", "2", "--head-dim", "64", "--length", "700",
            "--device", "cpu", "--dtype", "float32", "--out", str(tmp_path)]
    subprocess.run(argv, check=True, env=env, capture_output=True, timeout=600)
    data = json.loads((tmp_path / "cold_start.json").read_text())
    assert list(data["parts"]) == ["estimate (masses)", "selection", "index", "kernel", "layer (attend_layer)",
                                   "layer at 699 tokens", "layer at 663 tokens"]
    assert all(t["first_s"] > 0 and t["second_s"] > 0 for t in data["parts"].values())
    assert data["dense_from"] == 512  # the last 128 rows (from 572) dense, back to their tile's start
    # the integration's layer computes what the parts compute (same plan, same index)
    assert data["layer_vs_parts_max_abs_diff"] < 1e-4
    # a new, empty cache folder, and the interpreter compiles nothing into it
    assert data["cached_at_start"] == 0 and data["compiled_kernels"] == 0
    report = (tmp_path / "cold_start.md").read_text()
    assert "| selection |" in report and "--length 700" in report


def test_autotuned_kernels_keep_their_timings_on_disk():
    """Both autotuned kernels cache their tuning results where Triton can (3.4+: the GPU machine's
    3.6 and this machine's 3.9), so a restart on a warm machine does not re-time them; the
    environment switch turns it off. Checked in processes without the interpreter (which never caches)."""
    probe = ("import inspect, json, triton\n"
             "from longinfer.ops._kernel import sparse_attention_fwd_tuned as a\n"
             "from longinfer.patterns._estimate_kernel import _masses_kernel_tuned as b\n"
             "print(json.dumps(['cache_results' in inspect.signature(triton.autotune).parameters,"
             " a.cache_results, b.cache_results]))")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    for switch, expect_cache in (("1", True), ("0", False)):
        out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, timeout=300,
                             env={**env, "LONGINFER_AUTOTUNE_CACHE": switch}).stdout
        supported, sparse, estimate = json.loads(out.splitlines()[-1])
        assert sparse == estimate == (supported and expect_cache)
