"""Replaying a repeated sparse attention call as a CUDA graph.

A sparse call issues ~120 small kernels (estimate, selection, index build, the kernel, density
counting). For a chunk of a few thousand queries over a cached prefix many of them finish faster
than the CPU launches the next, so the host sets the pace (an H200 profile of a 4K turn over 64K
before the op cuts: 187 ms of CPU time for 147 ms of GPU work). Every layer of a model whose layers
share one plan (the default plan) makes the same call on the same shapes, so one forward can
capture the call once and replay it for the other layers: one launch per layer instead of ~120.
Measured on that turn after the op cuts: 116.7 -> 111.2 ms of attention (docs/results/gpu-session5).

:class:`CallGraphs` does that for any function of fixed-shape tensors with no host
synchronization:

- the first call with a key runs eagerly (it also warms up Triton's autotuner and the shape
  caches; :func:`longinfer._device_cache.device_cached` never caches what a capture allocates);
- the second call captures the function into a graph reading static input buffers, and replays
  it; later calls copy their inputs into those buffers and replay;
- calls whose inputs and outputs would pin more than ``max_bytes`` of static buffers run eagerly
  (long prefills: their GPU work hides the launches, and the buffers would double their memory);
- at most ``max_graphs`` graphs are kept (least recently used first out), each holding its static
  buffers and a private memory pool of the call's intermediates.

Outputs are copied out of the graph's static buffers before being returned, so they stay valid
after the next replay. Capturing never synchronizes with the host (the graph is recorded on a
side stream that waits for the current one; nothing runs until the replay).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

from longinfer._device_cache import capturing

logger = logging.getLogger(__name__)

# The default cap on a graph's static buffers (its inputs and outputs): a 4K-token chunk over a
# 64K cache on a 1.5B model pins ~100 MiB; a 128K-token prefill, which gains nothing, ~1 GiB.
DEFAULT_MAX_BYTES = 512 * 2**20
DEFAULT_MAX_GRAPHS = 2
# How many distinct keys are remembered to decide which ones repeat.
_SEEN_KEYS = 256

Tensors = tuple[torch.Tensor, ...]
# capture(fn, static_inputs) -> (replay, static_outputs): records fn on the static inputs.
Capture = Callable[[Callable[..., Tensors], Tensors], tuple[Callable[[], None], Tensors]]


def capture_cuda_graph(fn: Callable[..., Tensors], inputs: Tensors) -> tuple[Callable[[], None], Tensors]:
    """Record ``fn(*inputs)`` into a CUDA graph; returns ``(replay, outputs)`` (nothing has run yet).

    The capture runs on a side stream ordered after the current one, with a private memory pool;
    unlike ``torch.cuda.graph`` it neither synchronizes nor empties the allocator's cache.
    """
    device = inputs[0].device
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(device):  # a model spread over several GPUs: record on the inputs' one
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                outputs = fn(*inputs)
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)

    def replay() -> None:
        with torch.cuda.device(device):
            graph.replay()

    return replay, tuple(outputs)


@dataclass
class _Graph:
    replay: Callable[[], None]
    inputs: Tensors
    outputs: Tensors


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class CallGraphs:
    """Graphs of repeated calls, keyed by the caller (see the module docstring).

    Args:
        max_graphs: graphs kept at once (each pins its static buffers and intermediates).
        max_bytes: calls whose inputs plus outputs exceed this run eagerly.
        capture: how to record a call (the CUDA graph capture; tests pass a stand-in).
        device_types: devices whose calls are recorded; calls on others always run eagerly.
    """

    def __init__(self, max_graphs: int = DEFAULT_MAX_GRAPHS, max_bytes: int = DEFAULT_MAX_BYTES,
                 capture: Capture = capture_cuda_graph, device_types: tuple[str, ...] = ("cuda",)) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.max_graphs = max_graphs
        self.max_bytes = max_bytes
        self.device_types = device_types
        self._capture = capture
        self._graphs: collections.OrderedDict[Hashable, _Graph] = collections.OrderedDict()
        self._seen: collections.OrderedDict[Hashable, None] = collections.OrderedDict()
        self._failed: set[Hashable] = set()
        self.captures = 0
        self.replays = 0

    def clear(self) -> None:
        """Drop every graph and its buffers."""
        self._graphs.clear()
        self._seen.clear()

    def __call__(self, key: Hashable, fn: Callable[..., Tensors], inputs: Tensors,
                 output_bytes: int) -> Tensors:
        """``fn(*inputs)``, eagerly or through the graph of ``key``.

        ``key`` must fix everything the recorded kernels depend on besides the inputs' values:
        shapes, dtypes, device and the function's configuration. ``fn`` must not synchronize with
        the host, and must return tensors. ``output_bytes``: the size of its outputs.
        """
        graph = self._graphs.get(key)
        if graph is None:
            if not self._worth_capturing(key, inputs, output_bytes):
                return fn(*inputs)
            graph = self._record(key, fn, inputs)
            if graph is None:
                return fn(*inputs)
        else:
            self._graphs.move_to_end(key)
            for static, value in zip(graph.inputs, inputs):
                static.copy_(value)
        graph.replay()
        self.replays += 1
        return tuple(out.clone() for out in graph.outputs)

    def _worth_capturing(self, key: Hashable, inputs: Tensors, output_bytes: int) -> bool:
        """A second call of ``key`` that fits the byte cap and is not itself being captured."""
        if inputs[0].device.type not in self.device_types:
            return False
        if key in self._failed or _nbytes(inputs) + output_bytes > self.max_bytes:
            return False
        if capturing():
            return False  # the caller records a graph of its own: we are part of it
        if key not in self._seen:
            self._seen[key] = None
            if len(self._seen) > _SEEN_KEYS:
                self._seen.popitem(last=False)
            return False
        return True

    def _record(self, key: Hashable, fn: Callable[..., Tensors], inputs: Tensors) -> _Graph | None:
        static = tuple(torch.empty_like(t) for t in inputs)
        for buffer, value in zip(static, inputs):
            buffer.copy_(value)
        try:
            replay, outputs = self._capture(fn, static)
        except Exception as error:  # noqa: BLE001 - an optimization only: any failure leaves the call eager
            self._failed.add(key)
            logger.warning("could not capture the attention call as a CUDA graph (%s); it runs eagerly", error)
            return None
        self._graphs[key] = graph = _Graph(replay, static, outputs)
        self.captures += 1
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return graph
