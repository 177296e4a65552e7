"""The Triton kernels compile for an H100/H200 (sm_90) on a machine without a GPU.

The CPU interpreter runs the kernels' semantics but never lowers them to PTX, so a kernel that only
the GPU compiler rejects would pass every CPU test. This compiles one configuration of each
kernel ahead of time (``benchmarks/kernel_resources.py``: Triton IR -> PTX -> cubin with the
wheel's ptxas, in a subprocess without ``TRITON_INTERPRET``) and checks that each fits the
hardware: at most 255 registers per thread and 228 KiB of shared memory; and that no kernel
unrolls so much that compiling it dominates a fresh machine's first call (session 12 on an H200:
38-49 s in the selection, ``docs/results/gpu-session12/cold-start/``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_resources.py"
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
KERNELS = ["vertical-slash kernel, 64-row tiles", "estimate pass 1", "estimate split merge",
           "estimate pass 2, queries loaded once",
           "estimate pass 2, columns only",
           "index tables", "density kept counts", "slash groups", "selection radix pass", "selection compaction",
           "selection buffer pass", "selection counts", "selection pack", "selection capped rows",
           "selection top-k pass", "selection candidates", "selection candidate compaction", "selection, sequential",
           "KV-group union, marks", "KV-group union, counts", "KV-group union, pack"]


@pytest.mark.skipif(not PTXAS.exists(), reason="needs the Triton wheel's ptxas")
def test_kernels_compile_for_sm90(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    subprocess.run([sys.executable, str(SCRIPT), "--only", ";".join(KERNELS), "--out", str(tmp_path)],
                   env=env, check=True, capture_output=True, timeout=900)
    rows = json.loads((tmp_path / "kernel_resources.json").read_text())["kernels"]
    assert {name for name in KERNELS if any(name in row["kernel"] for row in rows)} == set(KERNELS)
    for row in rows:
        assert 0 < row["registers"] <= 255, row
        assert 0 <= row["shared"] <= 228 * 1024, row
        assert row["compile_s"] > 0 and row["ttgir_lines"] > 0, row
    selection = {row["kernel"]: row["ttgir_lines"] for row in rows if row["kernel"].startswith("selection")}
    # With its 8 radix passes unrolled (tl.static_range) in four searches the sequential selection was
    # 5,445 TTGIR lines and 31 s to compile on a 2-core CPU; as loops 2,240 lines and 5 s. The other
    # selection kernels serve every pass and round with one variant (about 1,000 lines each).
    assert all(lines < 3000 for name, lines in selection.items() if "sequential" in name), selection
    assert all(lines < 1500 for name, lines in selection.items() if "sequential" not in name), selection
    # the index tables' five binary searches, unrolled 15 steps each, were 1,192 lines and 8.7 s; as loops 400
    assert next(row["ttgir_lines"] for row in rows if row["kernel"] == "index tables") < 800
