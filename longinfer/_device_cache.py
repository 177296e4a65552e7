"""A per-shape cache of device tensors that stays out of CUDA graph captures."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def capturing() -> bool:
    """True while the current CUDA stream is recording a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def device_cached(maxsize: int) -> Callable[[F], F]:
    """``functools.lru_cache`` for functions that build read-only device tensors from sizes.

    While a CUDA graph is being recorded the function runs uncached: a tensor made during a
    capture lives in the graph's private memory pool, which the graph's replays reuse, so caching
    it would hand later callers memory that changes under them.
    """

    def wrap(fn: F) -> F:
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(*args: Any) -> Any:
            return fn(*args) if capturing() else cached(*args)

        call.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
        call.cache_info = cached.cache_info  # type: ignore[attr-defined]
        return call  # type: ignore[return-value]

    return wrap
