"""GPU timing shared by the search (crossover lengths) and the recall frontier (kernel times)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch


def median_cuda_ms(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median CUDA-event time of ``fn`` in milliseconds, after ``warmup`` untimed calls.

    The warm-up calls absorb Triton compilation and autotuning; each repeat is bracketed by two
    events on the current stream and synchronized, so the time is GPU time of the work ``fn``
    enqueues (plus any host gap between its launches). Needs a CUDA device.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("median_cuda_ms needs a CUDA device; time CPU code with time.perf_counter")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)
