"""How to run the dense last rows of a sparse call: inside the vertical-slash kernel (one program per
tile, or split over the keys), or as a second dense launch (one program per tile, or split-K).

The shape is a 4K-token turn over a 64K cache on Qwen2.5-Coder-1.5B (12 query / 2 KV heads,
head_dim 128, bfloat16), the call where the tail's cost showed (docs/results/gpu-session5). The
vertical-slash index is fixed and structured like the default plan's on text at this shape (the
first 30 keys and 100 diagonals, 1,500 spread columns, 600 spread diagonals per head; ~12% of the
pairs), so every variant does the same sparse work on meaningful indices; q/k/v are random (the
timing does not depend on their values). The sparse call also runs with each form of the slash
chunks' score masks (``slash_masks``; 4 warps, the launch of 64-row tiles). Timing: CUDA events
around each variant, median of ``--repeats`` after 3 warm-ups, all in one process. Writes
``tail_bench.json`` and ``.md``.

    python3 benchmarks/tail_bench.py --out $OUT/tail
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch

from longinfer import ops
from longinfer.ops._checks import AttentionShape
from longinfer.ops._kernel import MODE_VERTICAL_SLASH
from longinfer.ops._launch import launch
from longinfer.ops.dense import default_splits
from longinfer.ops.sparse import default_tail_splits
from longinfer.timing import median_cuda_ms


def structured_index(heads: int, k_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``vertical [1, H, 1530]``, ``slash [1, H, 700]``: sinks and local band plus spread lines."""
    g = torch.Generator().manual_seed(seed)
    sinks, local = torch.arange(30), torch.arange(100)
    vertical = [torch.cat([sinks, torch.randperm(k_len - 30, generator=g)[:1500] + 30]).sort().values
                for _ in range(heads)]
    slash = [torch.cat([local, torch.randperm(k_len - 100, generator=g)[:600] + 100]).sort().values
             for _ in range(heads)]
    return torch.stack(vertical)[None].cuda(), torch.stack(slash)[None].cuda()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--q-len", type=int, default=4096)
    parser.add_argument("--k-len", type=int, default=69632)
    parser.add_argument("--tail", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    hq, hkv, d, nq, nk, tail = 12, 2, 128, args.q_len, args.k_len, args.tail
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, hq, nq, d, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(1, hkv, nk, d, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(1, hkv, nk, d, device="cuda", generator=g, dtype=torch.bfloat16)
    rows: list[dict[str, object]] = []
    splits = default_splits(AttentionShape(1, hq, hkv, tail, nk, d))
    in_kernel_splits = default_tail_splits(nk)
    for layout, heads in (("one index per query head", hq), ("one index per KV group", hkv)):
        vertical, slash = structured_index(heads, nk, seed=heads)
        index = ops.build_vertical_slash_index(vertical, slash, nk)

        def sparse(dense_from: int | None = None, tail_splits: int = 1) -> torch.Tensor:
            return ops.vertical_slash_attention(q, k, v, index=index, dense_from=dense_from, tail_splits=tail_splits)

        def second_pass(split_count: int) -> torch.Tensor:
            out = sparse()
            out[:, :, nq - tail:] = ops.dense_attention(q[:, :, nq - tail:], k, v, splits=split_count)
            return out

        def masked(slash_masks: str) -> torch.Tensor:  # one mask form; 64-row tiles' launch (stacked heads default to 8 warps)
            return launch(q, k, v, AttentionShape(1, hq, hkv, nq, nk, d), d**-0.5, MODE_VERTICAL_SLASH, 64, vs=index,
                          options={"num_warps": 4, "num_stages": 3, "slash_masks": slash_masks})

        variants = {
            "sparse, no dense rows": lambda: sparse(),
            "sparse, no dense rows, 4 warps, slash scores: per-key bias, diagonal after (default)": lambda: masked(
                "bias"),
            "sparse, no dense rows, 4 warps, slash scores masked in every chunk (before session 20)": lambda: masked(
                "every"),
            "sparse, no dense rows, 4 warps, slash scores unmasked (bound, wrong output)": lambda: masked("none"),
            "dense tiles inside the kernel, one program per tile": lambda: sparse(nk - tail),
            f"dense tiles inside the kernel, split over keys ({in_kernel_splits})": lambda: sparse(nk - tail,
                                                                                                in_kernel_splits),
            "second pass, one program per tile": lambda: second_pass(1),
            f"second pass, split-K ({splits} splits)": lambda: second_pass(splits),
            "the dense rows alone, one program per tile": lambda: ops.dense_attention(q[:, :, nq - tail:], k, v, splits=1),
            f"the dense rows alone, split-K ({splits})": lambda: ops.dense_attention(q[:, :, nq - tail:], k, v,
                                                                                    splits=splits),
        }
        mask_diff = (masked("every").float() - masked("bias").float()).abs().max().item()
        in_kernel, split = sparse(nk - tail, in_kernel_splits), second_pass(splits)
        diff = (in_kernel[:, :, nq - tail:].float() - split[:, :, nq - tail:].float()).abs().max().item()
        for name, fn in variants.items():
            rows.append({"layout": layout, "variant": name, "ms": median_cuda_ms(fn, args.repeats, warmup=3),
                         "tail_rows_max_abs_diff_kernel_vs_split": diff,
                         "max_abs_diff_slash_masks_every_vs_default": mask_diff})
    header = {
        "device": torch.cuda.get_device_name(), "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "command": "python3 benchmarks/tail_bench.py " + " ".join(argv or sys.argv[1:]),
        "shape": {"q_heads": hq, "kv_heads": hkv, "head_dim": d, "q_len": nq, "k_len": nk, "tail": tail},
        "timing": f"CUDA events, median of {args.repeats} after 3 warm-ups",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tail_bench.json").write_text(json.dumps({**header, "rows": rows}, indent=1))
    lines = [f"# Dense last rows of a sparse call: {nq} queries over {nk} keys, last {tail} dense", "",
             f"- {header['device']}, {header['date']}, torch {header['torch']}; {header['timing']}",
             f"- command: `{header['command']}`", "", "| index | variant | ms |", "|---|---|---|"]
    lines += [f"| {r['layout']} | {r['variant']} | {r['ms']:.3f} |" for r in rows]
    lines += ["", f"Tail rows, in-kernel split vs second-pass split-K: max abs difference {rows[-1]['tail_rows_max_abs_diff_kernel_vs_split']:.2e} "
              "(both dense, bfloat16 outputs).",
              f"Sparse output, slash scores masked in every chunk vs the default (a per-key bias, the diagonal's keys "
              f"after): max abs difference {rows[-1]['max_abs_diff_slash_masks_every_vs_default']:.2e}."]
    (out / "tail_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
