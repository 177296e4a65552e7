"""Small helpers of the public API: load a plan, and greedy generation that reports its prefill time.

:func:`generate` prefills the prompt (in one pass, or in chunks of ``chunk_size`` tokens, each
chunk attending to the cached ones, sparsely when the plan says so) and decodes greedily, with a
timer around each phase. It works the same on a patched and an unpatched model, so dense and
sparse runs compare directly.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from longinfer.plans.schema import Plan

logger = logging.getLogger(__name__)

__all__ = ["Generation", "generate", "load_plan"]


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read and validate a plan JSON file (see :mod:`longinfer.plans.schema`)."""
    return Plan.load(path)


@dataclass(frozen=True)
class Generation:
    """A greedy answer and its timings.

    Attributes:
        text: the decoded new tokens (special tokens skipped).
        new_ids: the new token ids (the stop token included if one was generated).
        prompt_tokens: prompt length.
        prefill_seconds: time to first token: the prompt's forward passes and the first argmax.
        decode_seconds: the remaining decoding steps.
        timer: ``"cuda-synchronized"`` or ``"cpu-wall"``.
    """

    text: str
    new_ids: list[int]
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    timer: str


def _device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_keyword(model: Any) -> str:
    """``cache`` (transformers >= 5.24) or ``past_key_values``: the forward's name for the KV cache."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _stop_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def generate(
    model: Any,
    tokenizer: Any,
    prompt: str | Sequence[int],
    *,
    max_new_tokens: int = 32,
    chunk_size: int | None = None,
) -> Generation:
    """Greedy decoding with timings, for one prompt (batch 1).

    Args:
        model: a transformers causal LM, patched by :func:`longinfer.patch` or not.
        tokenizer: its tokenizer (encodes a string prompt without special tokens added twice:
            ``tokenizer(prompt)`` adds BOS where the model expects it).
        prompt: text, or token ids.
        max_new_tokens: decoding budget; stops earlier at the model's EOS token.
        chunk_size: prefill the prompt in chunks of this many tokens (``None``: one pass). Each
            chunk attends to the cached tokens plus itself; the activations of one chunk bound the
            prefill workspace. Progress is logged per chunk. The last chunk ends the prompt
            (:func:`longinfer.integrations.transformers.prompt_end`): with the default plan it
            estimates from the question's queries as a one-pass prefill of the prompt would.

    Returns:
        A :class:`Generation`.

    Memory: the KV cache of the prompt plus the new tokens, and one chunk's activations (logits
    only for the last position when the model supports ``logits_to_keep``).
    """
    from transformers import DynamicCache

    from longinfer.integrations.transformers import prompt_end

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (or None for one pass), got {chunk_size}")
    ids = list(tokenizer(prompt)["input_ids"]) if isinstance(prompt, str) else [int(i) for i in prompt]
    if not ids:
        raise ValueError("the prompt is empty")
    device = _device_of(model)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    cache = DynamicCache(config=model.config)
    extra: dict[str, Any] = {_cache_keyword(model): cache, "use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = 1
    step = chunk_size or len(ids)
    stops = _stop_ids(model, tokenizer)
    timer = "cuda-synchronized" if device.type == "cuda" else "cpu-wall"
    with torch.inference_mode():
        _sync(device)
        started = time.perf_counter()
        for start in range(0, len(ids), step):
            ends_prompt = prompt_end() if start + step >= len(ids) else contextlib.nullcontext()
            with ends_prompt:
                logits = model(input_ids[:, start : start + step], **extra).logits
            if chunk_size is not None:
                logger.info("prefill: %d / %d tokens", min(start + step, len(ids)), len(ids))
        token = logits[:, -1].argmax(-1)
        new_ids = [int(token)]
        _sync(device)
        prefill_seconds = time.perf_counter() - started
        while len(new_ids) < max_new_tokens and new_ids[-1] not in stops:
            logits = model(token[:, None], **extra).logits
            token = logits[:, -1].argmax(-1)
            new_ids.append(int(token))
        _sync(device)
        decode_seconds = time.perf_counter() - started - prefill_seconds
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    return Generation(text, new_ids, len(ids), prefill_seconds, decode_seconds, timer)
