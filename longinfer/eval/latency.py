"""Time to first token and peak memory against prompt length, and where sparse overtakes dense.

TTFT here is one prefill forward that builds the KV cache and yields the first token's logits
(``logits_to_keep=1``: the LM head runs on the last position only), timed with the device
synchronized before and after (``"cuda-synchronized"``); on a CPU the plain wall clock is used
(``"cpu-wall"``) and peak memory is not measured (``None``). The median of ``repeats`` timed
runs, after ``warmup`` untimed ones (Triton compilation, autotuning, allocator), is reported.
"""

from __future__ import annotations

import inspect
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .cases import Case, model_device, stopwatch
from .prompts import Haystack, TokenizerLike

__all__ = ["TtftMeasurement", "time_to_first_token", "crossover_length", "LatencyTask"]


@dataclass(frozen=True)
class TtftMeasurement:
    """Median and all timed TTFTs (seconds), peak device memory (bytes) and the clock used."""

    median_s: float
    times_s: list[float]
    peak_memory_bytes: int | None
    timer: str


def _prefill(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """One prefill forward with a KV cache; returns the first generated token ``[1]``."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].argmax(dim=-1)


def time_to_first_token(
    model: Any, input_ids: torch.Tensor, *, repeats: int = 3, warmup: int = 1
) -> TtftMeasurement:
    """Median TTFT of ``input_ids`` ``[1, N]`` over ``repeats`` runs after ``warmup`` runs.

    Memory: one prefill at length ``N`` (KV cache of ``N`` tokens plus the attention method's
    workspace); the cache is freed between runs.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        raise TypeError(
            f"{type(model).__name__}.forward has no logits_to_keep argument; TTFT would include "
            f"N x vocab logits. Use a transformers version/model class that supports it"
        )
    device = model_device(model)
    with torch.inference_mode():
        for _ in range(warmup):
            _prefill(model, input_ids)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(repeats):
            with stopwatch(device) as watch:
                _prefill(model, input_ids)
            times.append(watch.seconds)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return TtftMeasurement(statistics.median(times), times, peak, watch.timer)


def crossover_length(baseline_s: Mapping[int, float], candidate_s: Mapping[int, float]) -> int | None:
    """The shortest measured length from which the candidate is faster at every longer length.

    Only lengths present in both mappings count. ``None`` when the candidate is not faster at
    the longest common length (or there is none).
    """
    lengths = sorted(set(baseline_s) & set(candidate_s))
    crossover = None
    for length in reversed(lengths):
        if candidate_s[length] < baseline_s[length]:
            crossover = length
        else:
            break
    return crossover


class LatencyTask:
    """TTFT and peak memory, one case per length, over haystack text."""

    name = "latency"

    def __init__(self, haystack: Haystack, *, repeats: int = 3, warmup: int = 1) -> None:
        if repeats < 1 or warmup < 0:
            raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
        self.haystack = haystack
        self.repeats = repeats
        self.warmup = warmup

    def cases(self, tokenizer: TokenizerLike, length: int) -> list[Case]:
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        ids = [*bos, *self.haystack.token_ids(tokenizer, length - len(bos))]
        params = {"repeats": self.repeats, "warmup": self.warmup, "haystack": self.haystack.name}
        return [Case(case_id=f"L{length}/r{self.repeats}", length=length, input_ids=ids, params=params)]

    def run_case(self, model: Any, tokenizer: TokenizerLike, case: Case) -> dict[str, Any]:
        ids = torch.tensor([case.input_ids], dtype=torch.long, device=model_device(model))
        measured = time_to_first_token(model, ids, repeats=self.repeats, warmup=self.warmup)
        return {
            "ttft_s": measured.median_s,
            "ttft_all_s": measured.times_s,
            "peak_memory_bytes": measured.peak_memory_bytes,
            "timer": measured.timer,
        }
