"""Compile time of the selection's Triton kernels for a GPU, on any machine (no GPU needed).

A fresh process on a fresh machine compiles every Triton kernel variant a sparse call launches
before the call returns (``benchmarks/cold_start.py`` measures that on the GPU). This compiles
each kernel of ``longinfer.patterns._select_kernel`` (the vertical-slash budget) ahead of time
for a target architecture, with the constexprs the library launches it with, and reports the
compile time and the size of the Triton GPU IR per kernel. Triton's wheel carries LLVM and ptxas,
so this runs on a CPU machine and catches what the interpreter does not (code that only the
compiler rejects, and kernels whose unrolled loops make compiling slow).

    python benchmarks/compile_time.py --out /tmp/compile-time

Timing: wall time of ``triton.compile`` per kernel, one process, kernels in launch order (the
first pays Triton's imports). Host time depends on the CPU: compare kernels, not machines.

Memory: the compiler's (a few hundred MiB).
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

# Argument types of the selection kernels, by the naming convention of _select_kernel.py: upper-case
# names are pointers, ``tau_*`` float32 scalars, other lower-case names int32 scalars.
SELECT_POINTERS = {"COLUMNS": "*fp32", "DIAGONALS": "*fp32", "BUF": "*fp32", "HIST": "*fp64", "COUNTS": "*i32",
                   "STATE": "*i32", "BUF_COUNT": "*i32", "VERTICAL": "*i64", "SLASH": "*i64"}
# The kernels in launch order (parallel path, round 0 then round 1, then the sequential fallback).
SELECT_KERNELS = ("_pass_kernel", "_compact_kernel", "_buffer_pass_kernel", "_count_kernel", "_pack_kernel",
                  "_capped_kernel", "_top_pass_kernel", "_candidates_kernel", "_compact_candidates_kernel",
                  "_sequential_kernel")


@dataclass(frozen=True)
class CompiledKernel:
    """One kernel compiled ahead of time: its name, compile seconds and Triton GPU IR lines."""

    name: str
    seconds: float
    ttgir_lines: int


def selection_constexprs() -> dict[str, Any]:
    """The constexpr values :func:`select_packed_triton` launches the kernels with on a GPU."""
    from longinfer.patterns import _select_kernel

    return {"CHUNK": _select_kernel.ParallelOptions().chunk, "MAX_SLICES": _select_kernel.MAX_SLICES,
            "COVERAGE": True, "ALWAYS": False}


def kernel_signature(fn: Any, pointers: dict[str, str], constexprs: dict[str, Any]) -> tuple[dict, dict]:
    """``(signature, constexprs)`` of a ``@triton.jit`` function for ``triton.compile``: the types of
    its arguments by name (``pointers``, ``tau_*`` float32, else int32) and the constexpr values it uses."""
    signature: dict[str, str] = {}
    values: dict[str, Any] = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in constexprs:
            signature[name] = "constexpr"
            values[name] = constexprs[name]
        elif name in pointers:
            signature[name] = pointers[name]
        else:
            signature[name] = "fp32" if name.startswith("tau") else "i32"
    return signature, values


def compile_kernel(fn: Any, pointers: dict[str, str], constexprs: dict[str, Any], arch: int) -> CompiledKernel:
    """Compiles ``fn`` for CUDA compute capability ``arch`` (e.g. 90) and times it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, values = kernel_signature(fn, pointers, constexprs)
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=values),
                              target=GPUTarget("cuda", arch, 32))
    seconds = time.perf_counter() - start
    return CompiledKernel(fn.fn.__name__, seconds, compiled.asm["ttgir"].count("\n"))


def compile_selection(arch: int = 90, names: tuple[str, ...] = SELECT_KERNELS) -> list[CompiledKernel]:
    """Compiles the selection kernels ``names`` for ``arch``, in order."""
    from longinfer.patterns import _select_kernel

    constexprs = selection_constexprs()
    return [compile_kernel(getattr(_select_kernel, name), SELECT_POINTERS, constexprs, arch) for name in names]


def write_report(results: list[CompiledKernel], arch: int, out: Path) -> None:
    """``compile_time.json`` and ``compile_time.md`` under ``out``."""
    import triton

    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "host": platform.processor()
            or platform.machine(), "triton": triton.__version__, "arch": arch,
            "command": shlex.join([Path(sys.executable).name, *sys.argv])}
    (out / "compile_time.json").write_text(json.dumps({**meta, "kernels": [asdict(r) for r in results]}, indent=1))
    lines = [f"# Compile time of the selection kernels (sm_{arch})", "",
             f"- Date: {meta['date']}. Host: {meta['host']}, triton {meta['triton']}.",
             f"- Command: `{meta['command']}`",
             "- Timing: wall time of `triton.compile` per kernel in one process (host CPU time: compare kernels,"
             " not machines).", "", "| kernel | compile (s) | TTGIR lines |", "|---|---|---|"]
    lines += [f"| {r.name} | {r.seconds:.1f} | {r.ttgir_lines} |" for r in results]
    lines += [f"| **all** | **{sum(r.seconds for r in results):.1f}** | |", ""]
    (out / "compile_time.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90: H100/H200)")
    parser.add_argument("--kernels", default=",".join(SELECT_KERNELS), help="comma-separated kernel names")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="Triton cache folder (default: a new empty one, so that every kernel compiles)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    # before Triton is imported: a filled cache would load the kernels instead of compiling them
    os.environ["TRITON_CACHE_DIR"] = str(args.cache_dir or tempfile.mkdtemp(prefix="triton-cache-"))
    results = compile_selection(args.arch, tuple(args.kernels.split(",")))
    write_report(results, args.arch, args.out)
    print((args.out / "compile_time.md").read_text())


if __name__ == "__main__":
    main()
