"""benchmarks/turn_kernels.py's kernel-part rows on the CPU: what each timed launch computes.

The script times on CUDA only; here its timer is replaced by one call, and each launch's output is
compared with the float32 reference of the index it was given (the Triton kernels run in the
interpreter, as in ``tests/test_ops_kernels.py``; tolerance 2e-5 as there).
"""

from __future__ import annotations

import os

import pytest
import torch

from longinfer.ops.reference import dense_causal_mask, masked_attention, vertical_slash_mask
from longinfer.patterns import VerticalSlashConfig, estimate_vertical_slash
from tests.benchmark_scripts import load_benchmark

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs the Triton kernels on CPU tensors: needs TRITON_INTERPRET=1")


def _kernel_parts(monkeypatch, seed: int, all_variants: bool = True, **config_changes):
    """``kernel_part_timings`` on random q/k/v (4 query heads, 2 KV heads, 200 positions) with its
    timer replaced by one call: ``(times, outputs of the timed launches, q, k, v, selection, config)``."""
    script = load_benchmark("turn_kernels")
    outputs = []
    monkeypatch.setattr(script, "graph_time", lambda fn, repeats: outputs.append(fn()) or 0.0)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, 200, 64, generator=gen) for h in (4, 2, 2))
    config = VerticalSlashConfig(num_vertical=24, num_slash=24, sink=4, local=8, last_q=16, block_size=16,
                                 budget="coverage", tau=0.8, query_sampling="strided", **config_changes)
    selection = estimate_vertical_slash(q, k, config)
    times = script.kernel_part_timings(q, k, v, selection, config, 64 ** -0.5, repeats=1, all_variants=all_variants)
    return times, outputs, q, k, v, selection, config


def test_kernel_parts_compute_the_columns_alone_the_diagonals_alone_and_dense(monkeypatch):
    times, outputs, q, k, v, selection, config = _kernel_parts(monkeypatch, seed=0)
    n = q.shape[2]
    assert list(times) == ["kernel, columns only (graph)", "kernel, diagonals only (graph)",
                           "kernel, dense mode (graph)",
                           "kernel, dense mode, split key ranges, 64x64 tiles (graph)",
                           "kernel, dense mode, one-loop key ranges, 64x64 tiles (graph)"]
    local_only = torch.where(selection.slash < config.local, selection.slash, -1)
    sinks_only = torch.where(selection.vertical < config.sink, selection.vertical, -1)
    assert (local_only >= 0).sum() < (selection.slash >= 0).sum()  # the parts differ from the whole index
    assert (sinks_only >= 0).sum() < (selection.vertical >= 0).sum()
    masks = [vertical_slash_mask(selection.vertical, local_only, n, 16),
             vertical_slash_mask(sinks_only, selection.slash, n, 16)] + [dense_causal_mask(n)] * 3
    assert len(outputs) == len(masks)
    for out, mask in zip(outputs, masks):
        reference = masked_attention(q, k, v, mask)
        assert (out - reference).abs().max().item() <= 2e-5


def test_shared_columns_are_also_timed_as_one_index_per_kv_group(monkeypatch):
    """Where the heads of a KV group share their columns, the columns-only part is also launched with one
    index per KV group (the group's heads stacked in a tile): the same pairs, so the same output."""
    times, outputs, _, _, _, selection, _ = _kernel_parts(monkeypatch, seed=1, group_columns=True)
    assert torch.equal(selection.vertical[:, 0], selection.vertical[:, 1])  # shared within the group
    names = list(times)
    assert names[2] == "kernel, columns only, one index per KV group (heads stacked) (graph)"
    assert (outputs[2] - outputs[0]).abs().max().item() <= 2e-5  # float32, another summation order (stacked tile)


def test_core_variants_leave_out_the_dense_mode(monkeypatch):
    """``--variants core`` (the default) times the index's parts, not the dense mode's launch choices."""
    times, outputs, *_ = _kernel_parts(monkeypatch, seed=0, all_variants=False)
    assert list(times) == ["kernel, columns only (graph)", "kernel, diagonals only (graph)"]
    assert len(outputs) == 2
