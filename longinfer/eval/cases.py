"""What every evaluation task shares: the case type, the task protocol, timing and greedy generation.

A task turns a prompt length into a list of :class:`Case` (deterministic for its seed) and runs
one case on a model, returning the result fields of its record. :class:`GenerationTask` covers
the tasks that answer by greedy generation and score the text (needle, RULER-style).
"""

from __future__ import annotations

import abc
import hashlib
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .prompts import TokenizerLike

__all__ = [
    "Case",
    "Task",
    "GenerationTask",
    "Generation",
    "greedy_generate",
    "Stopwatch",
    "stopwatch",
    "prompt_digest",
    "model_device",
]


@dataclass(frozen=True, eq=False)
class Case:
    """One prompt of a task.

    Attributes:
        case_id: unique within the task and stable across runs (it encodes length, seed and
            the task's grid coordinates), e.g. ``"L4096/d0.50/n1"``.
        length: the requested prompt length in tokens.
        input_ids: the prompt, ``length`` token ids (generation tasks) or the text to score.
        expected: strings the answer must contain (generation tasks).
        max_new_tokens: generation budget (generation tasks).
        params: grid coordinates and facts written into the record (depth, seed, subtask, ...).
    """

    case_id: str
    length: int
    input_ids: list[int]
    expected: tuple[str, ...] = ()
    max_new_tokens: int = 0
    params: Mapping[str, Any] = field(default_factory=dict)


class Task(Protocol):
    """An evaluation task: cases per length, and how to run one case."""

    name: str

    def cases(self, tokenizer: TokenizerLike, length: int) -> list[Case]:
        """The cases of one prompt length, deterministic for the task's seed."""
        ...

    def run_case(self, model: Any, tokenizer: TokenizerLike, case: Case) -> dict[str, Any]:
        """Run one case; the returned fields (scores, timings) go into its record."""
        ...


def prompt_digest(input_ids: Sequence[int]) -> str:
    """A short hash of a prompt's token ids: a resumed run checks it has the same prompts."""
    return hashlib.sha1(torch.tensor(list(input_ids), dtype=torch.int64).numpy().tobytes()).hexdigest()[:16]


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


@dataclass
class Stopwatch:
    """Elapsed seconds of a :func:`stopwatch` block and which clock measured them."""

    seconds: float = float("nan")
    timer: str = ""


@contextmanager
def stopwatch(device: torch.device) -> Iterator[Stopwatch]:
    """Time a block; on CUDA the device is synchronized before and after, so queued kernels count.

    ``timer`` is ``"cuda-synchronized"`` or ``"cpu-wall"`` (a CPU run, no device queue).
    """
    watch = Stopwatch(timer="cuda-synchronized" if device.type == "cuda" else "cpu-wall")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        yield watch
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        watch.seconds = time.perf_counter() - start


@dataclass(frozen=True)
class Generation:
    """A greedy answer: its text, new token ids and generation time."""

    text: str
    new_ids: list[int]
    seconds: float
    timer: str


def greedy_generate(
    model: Any, tokenizer: TokenizerLike, input_ids: Sequence[int], max_new_tokens: int
) -> Generation:
    """Greedy decoding of at most ``max_new_tokens`` after the prompt ``input_ids`` (batch 1).

    Memory: what ``model.generate`` needs for the prompt (the KV cache of ``len(input_ids)``
    tokens plus the attention method's prefill workspace).
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    from transformers import GenerationConfig

    device = model_device(model)
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    eos = model.generation_config.eos_token_id
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    config = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad
    )
    with torch.inference_mode(), stopwatch(device) as watch:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    new_ids = out[0, ids.shape[1] :].tolist()
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    return Generation(text=text, new_ids=new_ids, seconds=watch.seconds, timer=watch.timer)


class GenerationTask(abc.ABC):
    """A task answered by greedy generation and scored on the generated text."""

    name: str

    @abc.abstractmethod
    def cases(self, tokenizer: TokenizerLike, length: int) -> list[Case]: ...

    @abc.abstractmethod
    def score(self, case: Case, text: str) -> dict[str, Any]:
        """Score fields for the answer ``text``; must include ``score`` in [0, 1]."""

    def run_case(self, model: Any, tokenizer: TokenizerLike, case: Case) -> dict[str, Any]:
        answer = greedy_generate(model, tokenizer, case.input_ids, case.max_new_tokens)
        return {
            **self.score(case, answer.text),
            "generated": answer.text,
            "expected": list(case.expected),
            "n_generated": len(answer.new_ids),
            "generate_s": answer.seconds,
            "timer": answer.timer,
        }
