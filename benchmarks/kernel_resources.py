"""Registers, spills, shared memory and compile time of longinfer's Triton kernels, compiled for a GPU without one.

Each kernel configuration is compiled ahead of time for ``--arch`` (default ``90``, H100/H200) with
the installed Triton (``triton.compile`` on an ``ASTSource``: Triton IR -> PTX -> cubin with the
wheel's ``ptxas``), and ``cuobjdump -res-usage`` reads the cubin's registers per thread, stack
(register spills: bytes per thread in local memory) and static shared memory. No GPU and no
driver are needed, so a CPU machine can check that a kernel compiles for the GPU and whether a
launch option spills before a GPU session spends time on it. Triton versions differ (the GPU
machine runs triton 3.6), so take the numbers as indicative.

Compile time (wall time of ``triton.compile``, into an empty cache unless ``TRITON_CACHE_DIR`` is
set) and the size of the Triton GPU IR show what a fresh machine's first call pays per compiled
variant (``benchmarks/cold_start.py`` measures that on the GPU); host time depends on the CPU, so
compare kernels, not machines.

    python benchmarks/kernel_resources.py --out docs/results/kernel-resources
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
# before Triton is imported: with a filled cache triton.compile loads kernels instead of compiling them
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="kernel-resources-"))

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from longinfer.ops._index_kernel import _groups_kernel, _kept_kernel, _tables_kernel
from longinfer.ops._kernel import (
    MODE_DENSE,
    MODE_VERTICAL_SLASH,
    SLASH_MASKS_BIAS,
    SLASH_MASKS_EVERY,
    SLASH_MASKS_NONE,
    _dense_split_fwd,
    _merge_splits_fwd,
    _sparse_attention_fwd,
)
from longinfer.patterns._estimate_kernel import (
    PASS_TWO_MULTI_BLOCK_M,
    _masses_kernel,
    _merge_splits_kernel,
    _row_stats_kernel,
)
from longinfer.patterns._select_kernel import (
    MAX_SLICES,
    ParallelOptions,
    _buffer_pass_kernel,
    _candidates_kernel,
    _capped_kernel,
    _compact_candidates_kernel,
    _compact_kernel,
    _count_kernel,
    _pack_kernel,
    _pass_kernel,
    _sequential_kernel,
    _top_pass_kernel,
)
from longinfer.patterns._union_kernel import (
    MARK_BLOCK,
    MAX_PARTS,
    PACK_BLOCK,
    _count_bits_kernel,
    _mark_bits_kernel,
    _pack_bits_kernel,
)

I32 = "i32"


def _types(fn: Any, pointers: dict[str, str], floats: tuple[str, ...] = ()) -> dict[str, str]:
    """Signature types: the named pointers, float scalars, and every other argument an int32."""
    return {name: pointers.get(name, "fp32" if name in floats else I32) for name in fn.arg_names}


def launch_divisibility(fn: Any, signature: dict[str, str]) -> dict[tuple[int], list]:
    """The divisibility-by-16 hints a launch on contiguous ``[B, H, N, 128]`` tensors gives: every
    pointer (16-byte aligned) and every stride and ``*_len`` argument Triton specializes (not in the
    kernel's ``do_not_specialize``). Without them the compiler cannot prove K/V rows 16-byte aligned:
    loads are not vectorized nor pipelined, and registers and IR differ from a GPU launch's (the
    reports before session 16 compiled that way)."""
    def hinted(param: Any) -> bool:
        kind = signature[param.name]
        if kind == "constexpr" or param.do_not_specialize:
            return False
        return kind.startswith("*") or param.name.startswith("stride") or param.name.endswith("_len")
    return {(i,): [["tt.divisibility", 16]] for i, param in enumerate(fn.params) if hinted(param)}


def resources(fn: Any, types: dict[str, str], constexprs: dict[str, Any], arch: int, num_warps: int,
              num_stages: int) -> dict[str, Any]:
    """Compile one configuration for ``sm_{arch}``: ``{"registers", "stack", "shared"}`` per the cubin,
    ``compile_s`` (wall time), ``ttgir_lines`` (size of the Triton GPU IR) and ``async_copies`` (its
    asynchronous global-to-shared copies: 0 means no loop of the kernel is software-pipelined)."""
    signature = {name: "constexpr" if name in constexprs else types[name] for name in fn.arg_names}
    start = time.perf_counter()
    kernel = triton.compile(ASTSource(fn, signature, constexprs, launch_divisibility(fn, signature)),
                            target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    compile_s = time.perf_counter() - start
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        report = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    fields = dict(item.split(":") for line in report.splitlines() if "REG:" in line for item in line.split())
    return {"registers": int(fields["REG"]), "stack": int(fields["STACK"]), "shared": int(kernel.metadata.shared),
            "compile_s": round(compile_s, 2), "ttgir_lines": kernel.asm["ttgir"].count("\n"),
            "async_copies": kernel.asm["ttgir"].count("async_copy_global_to_local")}


def configurations() -> list[tuple[str, Any, dict[str, str], dict[str, Any], int, int]]:
    """(name, kernel, types, constexprs, warps, stages): bf16, head_dim 128, the shapes the plans use."""
    masses_types = _types(_masses_kernel, {"Q": "*bf16", "K": "*bf16", "ROWS": "*i32", "POS": "*i32",
                                           "LSE": "*fp32", "COLUMNS": "*fp32", "DIAGONALS": "*fp32"},
                          floats=("qk_scale_log2", "inv_count"))
    stats_types = _types(_row_stats_kernel, {"Q": "*bf16", "K": "*bf16", "ROWS": "*i32", "POS": "*i32",
                                             "M_OUT": "*fp32", "L_OUT": "*fp32"}, floats=("qk_scale_log2",))
    sparse_types = _types(_sparse_attention_fwd, {
        "Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "CuSeqQ": "*i32", "CuSeqK": "*i32",
        "TailAcc": "*fp32", "TailMax": "*fp32", "TailSum": "*fp32", "BlockIdx": "*i32", "ChunkStart": "*i32",
        "ChunkEnd": "*i32", "ChunkCount": "*i32", "Covered": "*u8", "Cols": "*i32", "ColCount": "*i32",
        "BlockCount": "*i32"}, floats=("qk_scale",))
    tables_types = _types(_tables_kernel, {name: "*i32" for name in (
        "LO", "HI", "COUNT", "ENDS", "COLS", "CHUNK_START", "CHUNK_END", "CHUNK_COUNT", "COLUMN_COUNT")} | {
        "COVERED": "*u8"})
    head = dict(HEAD_DIM=128, BLOCK_D=128, PRECISION="tf32")
    rows: list[tuple[str, Any, dict[str, str], dict[str, Any], int, int]] = []
    for block_n, warps in ((128, 4), (64, 4), (128, 8), (64, 8)):  # the default first (turn_kernels.py times them)
        rows.append(("estimate pass 1 (row stats)", _row_stats_kernel, stats_types,
                     {**head, "BLOCK_M": 64, "BLOCK_N": block_n}, warps, 3))
    split_merge_types = _types(_merge_splits_kernel, {"M_PARTS": "*fp32", "L_PARTS": "*fp32", "LSE": "*fp32"})
    rows.append(("estimate split merge", _merge_splits_kernel, split_merge_types, {"BLOCK_Q": 64, "BLOCK_S": 64}, 4, 1))
    for one_block in (True, False):
        for block_n, warps, stages in ((128, 4, 3), (64, 4, 3), (128, 8, 3), (64, 4, 2), (64, 8, 3), (32, 4, 3)):
            name = f"estimate pass 2, {'queries loaded once' if one_block else 'query blocks per tile'}"
            block_m = 64 if one_block else PASS_TWO_MULTI_BLOCK_M
            rows.append((name, _masses_kernel, masses_types,
                         {**head, "BLOCK_M": block_m, "BLOCK_N": block_n, "SCRATCH": True, "ONE_BLOCK": one_block,
                          "WITH_DIAGONALS": True}, warps, stages))
    rows.append(("estimate pass 2, queries loaded once, float16 scratch", _masses_kernel,
                 {**masses_types, "DIAGONALS": "*fp16"},
                 {**head, "BLOCK_M": 64, "BLOCK_N": 64, "SCRATCH": True, "ONE_BLOCK": True, "WITH_DIAGONALS": True},
                 8, 3))
    for warps in (4, 8):
        rows.append(("estimate pass 2, columns only (column_q)", _masses_kernel, masses_types,
                     {**head, "BLOCK_M": PASS_TWO_MULTI_BLOCK_M, "BLOCK_N": 128, "SCRATCH": False, "ONE_BLOCK": False,
                      "WITH_DIAGONALS": False}, warps, 3))
    for block_m, block_n, warps, stages in ((64, 64, 4, 3), (64, 64, 4, 2), (64, 64, 8, 3), (64, 32, 4, 3),
                                            (64, 32, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3)):
        rows.append((f"vertical-slash kernel, {block_m}-row tiles", _sparse_attention_fwd, sparse_types,
                     {**head, "HEADS_PER_TILE": 1, "GROUP": 6, "BLOCK_M": block_m, "BLOCK_N": block_n,
                      "MODE": MODE_VERTICAL_SLASH, "VARLEN": False, "COVERED_IN_LOADS": True,
                      "SPLIT_RANGES": True, "SLASH_MASKS": SLASH_MASKS_BIAS.value}, warps, stages))
    one_tile = {**head, "HEADS_PER_TILE": 1, "GROUP": 6, "BLOCK_M": 64, "BLOCK_N": 64, "VARLEN": False,
                "SLASH_MASKS": SLASH_MASKS_BIAS.value}
    rows.append(("vertical-slash kernel, 64-row tiles, covered columns loaded", _sparse_attention_fwd, sparse_types,
                 {**one_tile, "MODE": MODE_VERTICAL_SLASH, "COVERED_IN_LOADS": False, "SPLIT_RANGES": True}, 4, 3))
    # The key ranges as one branching loop (split_ranges=False; the split loops are the rows above),
    # and the dense mode both ways.
    rows.append(("vertical-slash kernel, 64-row tiles, one-loop key ranges", _sparse_attention_fwd, sparse_types,
                 {**one_tile, "MODE": MODE_VERTICAL_SLASH, "COVERED_IN_LOADS": True, "SPLIT_RANGES": False}, 4, 3))
    # The slash chunks' scores masked in every chunk (before session 20) or in none (a timing bound,
    # wrong output); the rows above mask only the chunks that need it (the default).
    for name, flag in (("masked in every chunk", SLASH_MASKS_EVERY), ("unmasked", SLASH_MASKS_NONE)):
        rows.append((f"vertical-slash kernel, 64-row tiles, slash scores {name}", _sparse_attention_fwd, sparse_types,
                     {**one_tile, "MODE": MODE_VERTICAL_SLASH, "COVERED_IN_LOADS": True, "SPLIT_RANGES": True,
                      "SLASH_MASKS": flag.value}, 4, 3))
    for split in (True, False):
        rows.append((f"dense-mode kernel, 64-row tiles, {'split' if split else 'one-loop'} key ranges",
                     _sparse_attention_fwd, sparse_types,
                     {**one_tile, "MODE": MODE_DENSE, "COVERED_IN_LOADS": True, "SPLIT_RANGES": split}, 4, 3))
    split_types = _types(_dense_split_fwd, {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Acc": "*fp32", "Max": "*fp32",
                                            "Sum": "*fp32"}, floats=("qk_scale",))
    for heads, warps in ((1, 4), (2, 8)):  # the dense tail as a separate split-K launch, heads stacked
        rows.append((f"dense split-K pass, {heads} head(s) per program", _dense_split_fwd, split_types,
                     {**head, "GROUP": 6, "HEADS": heads, "BLOCK_M": 64, "BLOCK_N": 64}, warps, 2))
    merge_types = _types(_merge_splits_fwd, {"Acc": "*fp32", "Max": "*fp32", "Sum": "*fp32", "Out": "*bf16"})
    rows.append(("split-K merge", _merge_splits_fwd, merge_types, {"HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_R": 64},
                 4, 1))
    kept_types = _types(_kept_kernel, {"LO": "*i32", "HI": "*i32", "COUNT": "*i32", "COLS": "*i32", "ROWS": "*i64",
                                       "KEPT": "*i64"})
    groups_types = _types(_groups_kernel, {"SLASH": "*i64", "LO": "*i32", "HI": "*i32", "COUNT": "*i32"})
    rows.append(("slash groups", _groups_kernel, groups_types, {"BLOCK_SIZE": 64, "BLOCK": 1024}, 4, 1))
    rows.append(("density kept counts", _kept_kernel, kept_types, {"BLOCK_SIZE": 64, "STEPS": 14, "BLOCK": 1024}, 4, 1))
    masses = {"COLUMNS": "*fp32", "DIAGONALS": "*fp32", "HIST": "*fp64", "COUNTS": "*i32", "VERTICAL": "*i64",
              "SLASH": "*i64", "BUF": "*fp32", "BUF_COUNT": "*i32", "STATE": "*i32"}
    tau = ("tau_high", "tau_low")
    chunk = {"CHUNK": ParallelOptions().chunk}  # the launches' default chunk
    rounds = {**chunk, "MAX_SLICES": MAX_SLICES}
    # one compiled variant each for every radix pass, round and histogram section (runtime arguments);
    # the radix passes with their digit sums reduced once per program (the default) and per chunk
    for defer, label in ((True, ""), (False, ", per-chunk sums")):
        passes = {**chunk, "DEFER": defer}
        rows.append((f"selection radix pass{label}", _pass_kernel, _types(_pass_kernel, masses, tau), passes, 4, 3))
        rows.append((f"selection buffer pass{label}", _buffer_pass_kernel, _types(_buffer_pass_kernel, masses, tau),
                     passes, 4, 3))
        rows.append((f"selection top-k pass{label}", _top_pass_kernel, _types(_top_pass_kernel, masses, tau),
                     passes, 4, 3))
    rows.append(("selection counts", _count_kernel, _types(_count_kernel, masses, tau), chunk, 4, 3))
    rows.append(("selection pack", _pack_kernel, _types(_pack_kernel, masses, tau), rounds, 4, 3))
    rows.append(("selection capped rows", _capped_kernel, _types(_capped_kernel, masses, tau), rounds, 4, 3))
    rows.append(("selection candidates", _candidates_kernel, _types(_candidates_kernel, masses, tau), {}, 4, 3))
    rows.append(("selection compaction", _compact_kernel, _types(_compact_kernel, masses, tau), chunk, 4, 3))
    rows.append(("selection candidate compaction", _compact_candidates_kernel,
                 _types(_compact_candidates_kernel, masses, tau), chunk, 4, 3))
    for always in (False, True):
        rows.append((f"selection, sequential{' (every row)' if always else ''}", _sequential_kernel,
                     _types(_sequential_kernel, masses, tau), {**chunk, "COVERAGE": True, "ALWAYS": always}, 8, 3))
    rows.append(("index tables", _tables_kernel, tables_types, {"BLOCK_SIZE": 64, "CHUNK": 64, "STEPS": 15,
                                                                "BLOCK": 1024}, 4, 1))
    union_types = {"INDEX": "*i64", "BITMAP": "*i8", "OUT": "*i64"}
    rows.append(("KV-group union, marks", _mark_bits_kernel, _types(_mark_bits_kernel, union_types),
                 {"BLOCK": MARK_BLOCK}, 4, 1))
    union_types = {**union_types, "COUNTS": "*i32"}
    rows.append(("KV-group union, counts", _count_bits_kernel, _types(_count_bits_kernel, union_types),
                 {"BLOCK": PACK_BLOCK}, 8, 1))
    rows.append(("KV-group union, pack", _pack_bits_kernel, _types(_pack_bits_kernel, union_types),
                 {"BLOCK": PACK_BLOCK, "MAX_PARTS": MAX_PARTS}, 8, 1))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--only", default=None,
                        help="compile only the configurations whose name contains one of these (;-separated)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    wanted = None if args.only is None else args.only.split(";")
    results = []
    for name, fn, types, constexprs, warps, stages in configurations():
        if wanted is not None and not any(part in name for part in wanted):
            continue
        launch = {key: value for key, value in constexprs.items() if key in ("BLOCK_M", "BLOCK_N", "ONE_BLOCK")}
        usage = resources(fn, types, constexprs, args.arch, warps, stages)
        results.append({"kernel": name, **launch, "warps": warps, "stages": stages, **usage})
        print(results[-1], flush=True)
    header = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "arch": f"sm_{args.arch}",
              "triton": triton.__version__, "command": "python benchmarks/kernel_resources.py " + " ".join(
                  argv if argv is not None else sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel_resources.json").write_text(json.dumps({**header, "kernels": results}, indent=1) + "\n")
    lines = [f"# Registers and spills of the Triton kernels, compiled for {header['arch']} without a GPU", "",
             f"- {header['date']}, triton {header['triton']} (the GPU machine runs 3.6: indicative); bf16, head_dim 128.",
             f"- Command: `{header['command']}`",
             "- registers per thread (255 = the cap), stack = bytes per thread spilled to local memory, "
             "shared = static shared memory per program (bytes); compile = wall time of `triton.compile` on "
             "this host (compare kernels, not machines), TTGIR = lines of Triton GPU IR, async copies = "
             "asynchronous global-to-shared copies in it (0: no loop is software-pipelined).", "",
             "| kernel | BLOCK_M | BLOCK_N | warps | stages | registers | stack (spills) | shared | compile (s) "
             "| TTGIR lines | async copies |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r.get('BLOCK_M', '')} | {r.get('BLOCK_N', '')} | {r['warps']} | {r['stages']} | "
              f"{r['registers']} | {r['stack']} | {r['shared']} | {r['compile_s']:.1f} | {r['ttgir_lines']} | "
              f"{r['async_copies']} |" for r in results]
    (out / "kernel_resources.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
