"""The selection's Triton kernels compile for an H100/H200 (sm_90) without a GPU, one variant each.

The interpreter (how the CPU tests run the kernels) accepts code the compiler rejects, and it
cannot show compile time, which a user's first call pays on a fresh machine (session 12 on an H200:
38-49 s in the selection, ``docs/results/gpu-session12/cold-start/``). ``benchmarks/compile_time.py``
compiles them ahead of time with Triton's bundled LLVM and ptxas, in a process without
``TRITON_INTERPRET`` (this one has it: the kernels here are interpreted functions).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import compile_time  # noqa: E402

needs_cuda_backend = pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None,
                                        reason="needs Triton's CUDA backend (compiler only, no GPU)")


@needs_cuda_backend
def test_every_selection_kernel_compiles_for_sm90_and_none_unrolls_its_passes(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    argv = [sys.executable, str(BENCHMARKS / "compile_time.py"), "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path)]
    subprocess.run(argv, check=True, env=env, capture_output=True, timeout=600)
    results = {r["name"]: r for r in json.loads((tmp_path / "compile_time.json").read_text())["kernels"]}
    assert set(results) == set(compile_time.SELECT_KERNELS)
    assert any((tmp_path / "cache").iterdir())  # compiled into the empty cache, not loaded
    # With the 8 radix passes unrolled (tl.static_range) in its four searches the sequential kernel
    # was 5,445 TTGIR lines and 31 s to compile on a 2-core CPU; as loops, 2,240 lines and 5 s.
    # Every other kernel is one compiled variant for all passes and rounds (about 1,000 lines).
    assert results["_sequential_kernel"]["ttgir_lines"] < 3000
    assert all(r["ttgir_lines"] < 1500 for name, r in results.items() if name != "_sequential_kernel")
    assert "| _sequential_kernel |" in (tmp_path / "compile_time.md").read_text()


def test_signatures_give_every_argument_a_type_or_a_value():
    from longinfer.patterns import _select_kernel

    signature, values = compile_time.kernel_signature(
        _select_kernel._pack_kernel, compile_time.SELECT_POINTERS, compile_time.selection_constexprs())
    assert signature["COLUMNS"] == "*fp32" and signature["VERTICAL"] == "*i64" and signature["HIST"] == "*fp64"
    assert signature["tau_high"] == "fp32" and signature["round_index"] == "i32" and signature["n"] == "i32"
    assert signature["CHUNK"] == "constexpr" and values == {"CHUNK": 256, "MAX_SLICES": 128}
