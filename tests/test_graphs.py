"""Replaying repeated calls from graphs (:mod:`longinfer.integrations.graphs`).

There is no GPU here, so a stand-in capture gives the CUDA graph's semantics on the CPU: recording
runs nothing, and each replay recomputes the recorded function from the static input buffers into
the static output buffers. What is tested is what the class does around the graph: which calls
are recorded, that later calls' inputs reach the graph, and that returned outputs survive the next
replay. The real capture is checked against eager calls on the GPU (tests/test_gpu_graphs.py).
"""

from __future__ import annotations

import logging

import pytest
import torch

from longinfer.integrations.graphs import CallGraphs


class StandInCapture:
    """Graph semantics without CUDA: outputs are static buffers refreshed by ``replay``."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.recorded = 0

    def __call__(self, fn, inputs):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.recorded += 1
        outputs = tuple(torch.empty_like(t) for t in fn(*inputs))  # shapes only: nothing has run

        def replay() -> None:
            for static, value in zip(outputs, fn(*inputs)):
                static.copy_(value)

        return replay, outputs


def attention_like(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.softmax(q @ k.transpose(-1, -2), -1) @ k
    return out, out.sum()


def inputs(seed: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, n, 8, generator=g), torch.randn(2, n, 8, generator=g)


def cpu_graphs(**kwargs) -> tuple[CallGraphs, StandInCapture]:
    capture = StandInCapture(kwargs.pop("fail", False))
    return CallGraphs(capture=capture, device_types=("cpu",), **kwargs), capture


def test_first_call_is_eager_then_recorded_and_replayed_with_each_calls_inputs():
    graphs, capture = cpu_graphs()
    results = []
    for seed in range(4):
        x = inputs(seed)
        out = graphs("layer", attention_like, x, output_bytes=0)
        expected = attention_like(*x)
        torch.testing.assert_close(out[0], expected[0], rtol=0, atol=0)
        torch.testing.assert_close(out[1], expected[1], rtol=0, atol=0)
        results.append((out[0], expected[0]))
    assert (capture.recorded, graphs.captures, graphs.replays) == (1, 1, 3)
    for out, expected in results:  # outputs were copied out: later replays did not overwrite them
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_calls_above_the_byte_cap_or_on_other_devices_stay_eager():
    x = inputs(0)
    small_cap, capture = cpu_graphs(max_bytes=sum(t.numel() * 4 for t in x) - 1)
    gpu_only = CallGraphs(capture=capture)  # device_types=("cuda",): these CPU tensors never record
    for graphs in (small_cap, gpu_only):
        for _ in range(3):
            graphs("layer", attention_like, x, output_bytes=0)
        assert graphs.captures == 0
    assert capture.recorded == 0


def test_least_recently_used_graph_is_dropped():
    graphs, capture = cpu_graphs(max_graphs=1)
    for key in ("a", "a", "b", "b", "a", "a"):  # a recorded, b evicts it, a recorded again
        x = inputs(len(key))
        out = graphs(key, attention_like, x, output_bytes=0)
        torch.testing.assert_close(out[0], attention_like(*x)[0], rtol=0, atol=0)
    assert capture.recorded == 3


def test_a_call_that_cannot_be_recorded_stays_eager_with_a_warning(caplog):
    graphs, _ = cpu_graphs(fail=True)
    with caplog.at_level(logging.WARNING, logger="longinfer.integrations.graphs"):
        for seed in range(3):
            x = inputs(seed)
            torch.testing.assert_close(graphs("k", attention_like, x, output_bytes=0)[0], attention_like(*x)[0])
    assert graphs.captures == 0
    assert sum("could not capture" in r.message for r in caplog.records) == 1


def test_max_graphs_must_be_positive():
    with pytest.raises(ValueError, match="max_graphs"):
        CallGraphs(max_graphs=0)


def test_device_cache_is_bypassed_while_a_graph_is_recorded(monkeypatch):
    """A tensor built during a capture lives in the graph's pool: it must not be cached."""
    from longinfer import _device_cache

    built = []

    @_device_cache.device_cached(maxsize=4)
    def positions(n: int) -> torch.Tensor:
        built.append(n)
        return torch.arange(n)

    positions(3)
    positions(3)
    assert built == [3]  # cached outside a capture
    monkeypatch.setattr(_device_cache, "capturing", lambda: True)
    first, second = positions(5), positions(5)
    assert built == [3, 5, 5] and first is not second
    monkeypatch.setattr(_device_cache, "capturing", lambda: False)
    positions(5)
    assert built == [3, 5, 5, 5]  # nothing made during the capture was kept
