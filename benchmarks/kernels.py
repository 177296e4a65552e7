"""GPU check and benchmark of the longinfer kernels against dense SDPA-flash and the peer.

Usage (on a CUDA machine; the peer is optional)::

    PEER_SITE=/tmp/peer python benchmarks/kernels.py --lengths 8192,32768,131072,262144 \
        --check-lengths 32768,131072 --out benchmarks/results

Phases, all in one process so ratios are honest:

1. check: bf16 outputs of every kernel against the float32 reference
   (:func:`longinfer.ops.reference.masked_attention`) on sampled query rows, at each check length.
   Pass: max |err| <= 2 x the error of plain bf16 PyTorch attention on the same rows + 2e-3.
2. sweep (optional, ``--sweep N``): tile/warp/stage options of each kernel at length N.
3. time: median of ``triton.testing.do_bench`` (CUDA events, warm-up 25 ms, 200 ms of repeats)
   for Hq=32, Hkv=8, D=128, bf16, B=1, at each length:
   dense (torch SDPA flash backend vs ours), vertical-slash VS(1000 incl. the first 30 keys, 6096
   nearest diagonals), block-sparse top-100 of 64-blocks (diagonal + first + 98 random earlier
   blocks), A-shape(128, 4096). The peer gets the same index and the same budget; it needs K/V
   repeated to 32 heads (done once, outside its timing), ours reads the 8 KV heads directly.
   Random q/k would make estimated indices meaningless, so indices are structured (as above) and
   identical for both; random q/k/v only feed the arithmetic.

Writes ``kernels-<device>.json`` and ``kernels-<device>.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import types
from pathlib import Path

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longinfer.eval.peer import PEER_SITE_ENV, import_peer_module, load_peer_kernels  # noqa: E402
from longinfer.ops import (  # noqa: E402
    a_shape_attention,
    block_sparse_attention,
    build_block_sparse_index,
    build_vertical_slash_index,
    dense_attention,
    vertical_slash_attention,
)
from longinfer.ops import _checks, _launch  # noqa: E402
from longinfer.ops import _kernel  # noqa: E402
from longinfer.ops._kernel import MODE_A_SHAPE, MODE_BLOCKS, MODE_DENSE, MODE_VERTICAL_SLASH  # noqa: E402
from longinfer.ops.reference import (  # noqa: E402
    a_shape_mask,
    block_sparse_mask,
    dense_causal_mask,
    masked_attention,
    vertical_slash_mask,
)

HQ, HKV, D = 32, 8, 128
V_SIZE, SINKS, S_SIZE = 1000, 30, 6096
TOP_BLOCKS, BS = 100, 64
A_SINK, A_WINDOW = 128, 4096


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def load_peer():
    """The peer's kernels, imported without its package ``__init__`` (needs vllm) by
    :mod:`longinfer.eval.peer`; None when ``PEER_SITE`` is unset."""
    if not os.environ.get(PEER_SITE_ENV):
        return None
    vs = load_peer_kernels().vertical_slash
    bsa = import_peer_module("ops.block_sparse_flash_attention")
    streaming = import_peer_module("ops.streaming_kernel")
    return types.SimpleNamespace(vs=vs, bs_kernel=bsa._triton_block_sparse_attention,
                                 bs_full=bsa.block_sparse_attention, a_shape=streaming.streaming_forward)


def make_inputs(n: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, HQ, n, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    return q, k, v


def make_vs_index(n: int, seed: int = 0):
    """The first 30 keys + 970 random others as verticals, the 6096 nearest diagonals as slashes."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    others = SINKS + torch.rand(HQ, n - SINKS, device="cuda", generator=gen).argsort(-1)[:, : V_SIZE - SINKS]
    vertical = torch.cat([torch.arange(SINKS, device="cuda").expand(HQ, SINKS), others], -1)[None]
    slash = torch.arange(min(S_SIZE, n), device="cuda").expand(1, HQ, -1)
    return vertical.int().contiguous(), slash.int().contiguous()


def make_block_index(n: int, seed: int = 0) -> torch.Tensor:
    """Per query block: the diagonal block, block 0 and random earlier blocks, 100 in all."""
    nb = math.ceil(n / BS)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    m = torch.arange(nb, device="cuda")[:, None]
    scores = torch.rand(HQ, nb, nb, device="cuda", generator=gen)
    kb = torch.arange(nb, device="cuda")[None, :]
    scores = torch.where(kb > m, -1.0, scores)  # never above the diagonal
    scores = torch.where((kb == m) | (kb == 0), 2.0, scores)
    top = scores.topk(min(TOP_BLOCKS, nb), -1)
    ids = torch.where(top.values >= 0, top.indices, -1)
    return ids.sort(-1).values.int()[None].contiguous()


def useful_flops(n: int, vertical: torch.Tensor, block_index: torch.Tensor) -> dict[str, float]:
    """Multiply-adds of the kept (query, key) pairs x 4 x D x heads (QK^T and PV).

    vertical-slash counts the exact pattern (verticals and exact diagonals, no tile superset).
    """
    i = torch.arange(n, device="cuda", dtype=torch.float64)
    per_head = 4 * D
    dense = (i + 1).sum().item()
    diag = torch.clamp(i + 1, max=S_SIZE)
    vs = 0.0
    for h in range(HQ):
        cols = vertical[0, h].sort().values.double()
        extra = torch.searchsorted(cols, (i - S_SIZE).contiguous(), right=True)  # verticals left of the diagonals
        vs += (diag + extra).sum().item()
    nb = block_index.shape[2]
    m = torch.arange(nb, device="cuda")[None, :, None]
    ids = block_index[0].long()
    full = ((ids >= 0) & (ids < m)).sum().item() * BS * BS
    diag_blocks = ((ids == m).sum().item()) * BS * (BS + 1) / 2
    a_shape = (torch.clamp(i + 1, max=A_WINDOW) + torch.clamp(i + 1 - A_WINDOW, min=0, max=A_SINK)).sum().item()
    return {
        "dense": dense * HQ * per_head,
        "vertical_slash": vs * per_head,
        "block_sparse": (full + diag_blocks) * per_head,
        "a_shape": a_shape * HQ * per_head,
    }


def sample_rows(n: int, count: int = 48) -> torch.Tensor:
    gen = torch.Generator().manual_seed(n)
    fixed = torch.tensor([0, 1, 63, 64, 65, n // 2, n - 65, n - 64, n - 2, n - 1])
    rand = torch.randint(0, n, (count - fixed.numel(),), generator=gen)
    return torch.cat([fixed, rand]).clamp(0, n - 1).unique().cuda()


def _bf16_torch_rows(q_rows, k, v, mask):
    """Plain bf16 PyTorch attention on the given rows (bf16 scores and P)."""
    group = q_rows.shape[1] // k.shape[1]
    full = mask.repeat_interleave(q_rows.shape[1] // mask.shape[1], 1)
    out = torch.empty(q_rows.shape, dtype=torch.float32, device=q_rows.device)
    for h in range(q_rows.shape[1]):
        kh, vh = k[:, h // group], v[:, h // group]
        scores = (q_rows[:, h] @ kh.transpose(-1, -2)).float() / math.sqrt(D)
        p = torch.softmax(scores.masked_fill(~full[:, h], float("-inf")), -1).nan_to_num().to(torch.bfloat16)
        out[:, h] = (p @ vh).float()
    return out


def check(n: int) -> list[dict]:
    q, k, v = make_inputs(n, seed=1)
    vertical, slash = make_vs_index(n, seed=1)
    block_index = make_block_index(n, seed=1)
    rows = sample_rows(n)
    cases = {
        "dense": (lambda: dense_attention(q, k, v), dense_causal_mask(n, rows=rows, device="cuda")),
        "vertical_slash": (lambda: vertical_slash_attention(q, k, v, vertical, slash),
                           vertical_slash_mask(vertical, slash, n, rows=rows)),
        "block_sparse": (lambda: block_sparse_attention(q, k, v, block_index),
                         block_sparse_mask(block_index, n, rows=rows)),
        "a_shape": (lambda: a_shape_attention(q, k, v, A_SINK, A_WINDOW),
                    a_shape_mask(A_SINK, A_WINDOW, n, rows=rows, device="cuda")),
        # One index per KV group: two query heads share every tile (heads_per_tile = 2).
        "vertical_slash_group_index": (lambda: vertical_slash_attention(q, k, v, vertical[:, ::4], slash[:, ::4]),
                                       vertical_slash_mask(vertical[:, ::4], slash[:, ::4], n, rows=rows)),
        "block_sparse_group_index": (lambda: block_sparse_attention(q, k, v, block_index[:, ::4]),
                                     block_sparse_mask(block_index[:, ::4], n, rows=rows)),
    }
    results = []
    for name, (run, mask) in cases.items():
        out = run()[:, :, rows].float()
        q_rows = q[:, :, rows]
        ref = masked_attention(q_rows, k, v, mask, rows=rows, query_chunk=16)
        err = (out - ref).abs().max().item()
        rel = ((out - ref).norm() / ref.norm()).item()
        torch_err = (_bf16_torch_rows(q_rows, k, v, mask) - ref).abs().max().item()
        ok = bool(err <= 2 * torch_err + 2e-3) and math.isfinite(err)
        results.append({"n": n, "kernel": name, "max_abs_err": err, "rel_err": rel,
                        "torch_bf16_max_abs_err": torch_err, "rows": rows.numel(), "pass": ok})
        print(f"check n={n:>7} {name:>15}: max|err| {err:.2e} (torch bf16 {torch_err:.2e}) rel {rel:.2e} "
              f"{'PASS' if ok else 'FAIL'}", flush=True)
        del mask
    return results


def sweep(n: int) -> list[dict]:
    """Time each kernel variant under each fixed launch option (what the autotuner chooses among)."""
    q, k, v = make_inputs(n)
    vertical, slash = make_vs_index(n)
    block_index = make_block_index(n)
    shape = _checks.check_qkv(q, k, v)
    variants = {
        "dense BM128": (MODE_DENSE, 128, 1, {}),
        "dense BM64x2heads": (MODE_DENSE, 64, 2, {}),
        "a_shape BM128": (MODE_A_SHAPE, 128, 1, {"sink": A_SINK, "window": A_WINDOW}),
        "a_shape BM64x2heads": (MODE_A_SHAPE, 64, 2, {"sink": A_SINK, "window": A_WINDOW}),
        "vs per-head index": (MODE_VERTICAL_SLASH, 64, 1, {"vs": build_vertical_slash_index(vertical, slash, n, 64)}),
        "vs group index x2heads": (MODE_VERTICAL_SLASH, 64, 2,
                                   {"vs": build_vertical_slash_index(vertical[:, ::4], slash[:, ::4], n, 64)}),
        "bs per-head index": (MODE_BLOCKS, 64, 1, {"blocks": build_block_sparse_index(block_index, n, 64)}),
        "bs group index x2heads": (MODE_BLOCKS, 64, 2, {"blocks": build_block_sparse_index(block_index[:, ::4], n, 64)}),
    }
    results = []
    for name, (mode, block_m, hpt, kw) in variants.items():
        for cfg in _kernel._tuning_configs():
            opts = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "heads_per_tile": hpt}
            try:
                ms = bench_ms(lambda: _launch.launch(q, k, v, shape, D**-0.5, mode, block_m, options=opts, **kw))
            except Exception as exc:  # out of shared memory etc.
                print(f"sweep {name} {opts}: {type(exc).__name__}", flush=True)
                continue
            results.append({"n": n, "kernel": name, "BLOCK_M": block_m, **opts, "ms": ms})
            print(f"sweep n={n} {name:>24} BN={opts['BLOCK_N']:>3} w={opts['num_warps']} s={opts['num_stages']}: {ms:8.3f} ms", flush=True)
    return results


def time_all(n: int, peer) -> dict:
    q, k, v = make_inputs(n)
    group = HQ // HKV
    k_rep = k.repeat_interleave(group, 1)
    v_rep = v.repeat_interleave(group, 1)
    vertical, slash = make_vs_index(n)
    block_index = make_block_index(n)
    flops = useful_flops(n, vertical, block_index)
    row: dict = {"n": n}
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        row["sdpa_flash_ms"] = bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True))
    row["dense_ms"] = bench_ms(lambda: dense_attention(q, k, v))
    row["vs_index_ms"] = bench_ms(lambda: build_vertical_slash_index(vertical, slash, n, 64))
    vs_index = build_vertical_slash_index(vertical, slash, n, 64)
    row["vs_kernel_ms"] = bench_ms(lambda: vertical_slash_attention(q, k, v, index=vs_index))
    row["vs_total_ms"] = bench_ms(lambda: vertical_slash_attention(q, k, v, vertical, slash))
    row["bs_total_ms"] = bench_ms(lambda: block_sparse_attention(q, k, v, block_index))
    bs_index = build_block_sparse_index(block_index, n, BS)
    row["bs_kernel_ms"] = bench_ms(lambda: block_sparse_attention(q, k, v, index=bs_index))
    row["a_shape_ms"] = bench_ms(lambda: a_shape_attention(q, k, v, A_SINK, A_WINDOW))
    # Variants the peer cannot have: one index per KV group, two query heads stacked per tile.
    row["vs_group_index_total_ms"] = bench_ms(lambda: vertical_slash_attention(q, k, v, vertical[:, ::4], slash[:, ::4]))
    row["bs_group_index_total_ms"] = bench_ms(lambda: block_sparse_attention(q, k, v, block_index[:, ::4]))

    if peer is not None:
        seqlens = torch.tensor([n], dtype=torch.int32, device="cuda")
        row["peer_vs_ms"] = bench_ms(lambda: peer.vs(q, k_rep, v_rep, vertical, slash))
        # The peer reads the first min(m + 1, K) slots of row m and has no "unused" marker: give it
        # the same ids, valid ones first (a row m < K has exactly m + 1 valid ids).
        peer_index = torch.where(block_index < 0, block_index.shape[2], block_index).sort(-1).values.contiguous()
        row["peer_bs_kernel_ms"] = bench_ms(lambda: peer.bs_kernel(q, k_rep, v_rep, seqlens, peer_index, D**-0.5))
        row["peer_bs_with_estimate_ms"] = bench_ms(lambda: peer.bs_full(q, k_rep, v_rep, TOP_BLOCKS))
        row["peer_a_shape_ms"] = bench_ms(lambda: peer.a_shape(q, k_rep, v_rep, A_SINK, A_WINDOW))
    row["tflops"] = {
        "sdpa_flash": flops["dense"] / row["sdpa_flash_ms"] / 1e9,
        "dense": flops["dense"] / row["dense_ms"] / 1e9,
        "vertical_slash": flops["vertical_slash"] / row["vs_total_ms"] / 1e9,
        "block_sparse": flops["block_sparse"] / row["bs_total_ms"] / 1e9,
        "a_shape": flops["a_shape"] / row["a_shape_ms"] / 1e9,
        "vertical_slash_group_index": flops["vertical_slash"] / row["vs_group_index_total_ms"] / 1e9,
        "block_sparse_group_index": flops["block_sparse"] / row["bs_group_index_total_ms"] / 1e9,
    }
    if peer is not None:
        row["tflops"].update({
            "peer_vertical_slash": flops["vertical_slash"] / row["peer_vs_ms"] / 1e9,
            "peer_block_sparse": flops["block_sparse"] / row["peer_bs_kernel_ms"] / 1e9,
            "peer_a_shape": flops["a_shape"] / row["peer_a_shape_ms"] / 1e9,
        })
    row["density"] = {name: f / flops["dense"] for name, f in flops.items()}
    print(json.dumps(row), flush=True)
    return row  # the inputs go with this frame; time_all's caller empties the cache


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.2f}"


def render_markdown(meta: dict, checks: list[dict], timings: list[dict], sweeps: list[dict]) -> str:
    lines = [
        f"# Kernel benchmark — {meta['device']}",
        "",
        f"- date: {meta['date']}; torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}",
        f"- command: `{meta['command']}`",
        f"- shapes: B=1, Hq={HQ}, Hkv={HKV}, D={D}, bf16, causal. Timing: median of "
        "`triton.testing.do_bench` (CUDA events, 25 ms warm-up, 200 ms of repeats), all in one process.",
        f"- indices (identical for longinfer and the peer): VS = {V_SIZE} verticals (the first {SINKS} keys + random) "
        f"and the {S_SIZE} nearest diagonals; block-sparse = top-{TOP_BLOCKS} 64-blocks (diagonal, first, random earlier); "
        f"A-shape = sink {A_SINK} + window {A_WINDOW}. The peer gets K/V repeated to {HQ} heads (not timed); "
        f"longinfer reads the {HKV} KV heads (GQA).",
        "- TFLOP/s count useful FLOPs only (4·D per kept query–key pair; VS counts the exact pattern, not the "
        "tile superset the kernel computes). longinfer VS and block-sparse times include the index conversion.",
        "",
        "## Time (ms) and speed-ups",
        "",
        "| N | SDPA flash | longinfer dense | VS: longinfer (conv + kernel) | VS: peer | block-sparse: longinfer | "
        "block-sparse: peer kernel | A-shape: longinfer | A-shape: peer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in timings:
        lines.append(
            f"| {r['n']} | {_fmt(r['sdpa_flash_ms'])} | {_fmt(r['dense_ms'])} ({r['sdpa_flash_ms'] / r['dense_ms']:.2f}x SDPA) | "
            f"{_fmt(r['vs_index_ms'])} + {_fmt(r['vs_kernel_ms'])} = {_fmt(r['vs_total_ms'])} "
            f"({r['sdpa_flash_ms'] / r['vs_total_ms']:.1f}x SDPA) | {_fmt(r.get('peer_vs_ms'))} | "
            f"{_fmt(r['bs_total_ms'])} ({r['sdpa_flash_ms'] / r['bs_total_ms']:.1f}x SDPA) | {_fmt(r.get('peer_bs_kernel_ms'))} | "
            f"{_fmt(r['a_shape_ms'])} ({r['sdpa_flash_ms'] / r['a_shape_ms']:.1f}x SDPA) | {_fmt(r.get('peer_a_shape_ms'))} |"
        )
    if timings and "peer_vs_ms" in timings[0]:
        lines += ["", "## longinfer vs the peer (peer time / longinfer time; > 1 = longinfer faster)", "",
                  "| N | vertical-slash | block-sparse (same index, kernels) | A-shape | peer block-sparse incl. its own estimate (ms) |",
                  "|---|---|---|---|---|"]
        for r in timings:
            lines.append(f"| {r['n']} | {r['peer_vs_ms'] / r['vs_total_ms']:.2f}x | {r['peer_bs_kernel_ms'] / r['bs_total_ms']:.2f}x | "
                         f"{r['peer_a_shape_ms'] / r['a_shape_ms']:.2f}x | {_fmt(r['peer_bs_with_estimate_ms'])} |")
    if timings:
        lines += ["", "## GQA variants only longinfer has (ms; one index per KV group, 2 query heads stacked per tile)", "",
                  "| N | VS per-head index | VS group index | block-sparse per-head | block-sparse group index |",
                  "|---|---|---|---|---|"]
        for r in timings:
            lines.append(f"| {r['n']} | {_fmt(r['vs_total_ms'])} | {_fmt(r['vs_group_index_total_ms'])} | {_fmt(r['bs_total_ms'])} | "
                         f"{_fmt(r['bs_group_index_total_ms'])} |")
    lines += ["", "## Useful TFLOP/s", "", "| N | " + " | ".join(timings[0]["tflops"]) + " |",
              "|---|" + "---|" * len(timings[0]["tflops"])] if timings else []
    for r in timings:
        lines.append(f"| {r['n']} | " + " | ".join(f"{x:.0f}" for x in r["tflops"].values()) + " |")
    if checks:
        lines += ["", "## bf16 correctness on sampled query rows (vs float32 reference)", "",
                  "| N | kernel | rows | max abs err | plain-bf16 torch max abs err | rel err | pass |", "|---|---|---|---|---|---|---|"]
        for c in checks:
            lines.append(f"| {c['n']} | {c['kernel']} | {c['rows']} | {c['max_abs_err']:.2e} | {c['torch_bf16_max_abs_err']:.2e} | "
                         f"{c['rel_err']:.2e} | {'yes' if c['pass'] else 'NO'} |")
    if sweeps:
        lines += ["", "## Launch-option sweep", "", "| N | kernel | BLOCK_M | BLOCK_N | warps | stages | ms |", "|---|---|---|---|---|---|---|"]
        for s in sorted(sweeps, key=lambda s: (s["kernel"], s["ms"])):
            lines.append(f"| {s['n']} | {s['kernel']} | {s['BLOCK_M']} | {s['BLOCK_N']} | {s['num_warps']} | {s['num_stages']} | {s['ms']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192,32768,131072,262144")
    parser.add_argument("--check-lengths", default="32768,131072")
    parser.add_argument("--sweep", type=int, default=0, help="sweep launch options at this length (0 = skip)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    device = torch.cuda.get_device_name()
    meta = {
        "device": device, "date": dt.date.today().isoformat(), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "command": "PEER_SITE=... python " + " ".join(sys.argv) if os.environ.get("PEER_SITE") else "python " + " ".join(sys.argv),
    }
    peer = load_peer()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = device.replace(" ", "-").replace("/", "-")
    checks: list[dict] = []
    sweeps: list[dict] = []
    timings: list[dict] = []

    def write(suffix: str) -> None:  # after every step, so a killed run keeps what it measured
        (out / f"kernels-{slug}{suffix}.json").write_text(
            json.dumps({"meta": meta, "checks": checks, "sweeps": sweeps, "timings": timings}, indent=1))
        (out / f"kernels-{slug}{suffix}.md").write_text(render_markdown(meta, checks, timings, sweeps))

    lengths = [int(x) for x in args.lengths.split(",") if x]
    suffix = "" if lengths else "-check"
    for n in (int(x) for x in args.check_lengths.split(",") if x):
        checks += check(n)
        write(suffix)
    if args.sweep:
        sweeps += sweep(args.sweep)
        write(suffix)
    for n in lengths:
        timings.append(time_all(n, peer))
        torch.cuda.empty_cache()
        write(suffix)
    print(render_markdown(meta, checks, timings, sweeps))
    return 0 if all(c["pass"] for c in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
