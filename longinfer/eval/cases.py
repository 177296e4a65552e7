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

from .prompts import TokenizerLike, encode

__all__ = [
    "Case",
    "Task",
    "GenerationTask",
    "Generation",
    "greedy_generate",
    "reference_logprob",
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
    """A greedy answer: its text, new token ids and generation time; with a reference answer, the
    log-probability (nats, summed over its tokens) the model gives it after the prompt."""

    text: str
    new_ids: list[int]
    seconds: float
    timer: str
    reference_logprob: float | None = None


def greedy_generate(
    model: Any,
    tokenizer: TokenizerLike,
    input_ids: Sequence[int],
    max_new_tokens: int,
    *,
    reference_ids: Sequence[int] = (),
) -> Generation:
    """Greedy decoding of at most ``max_new_tokens`` after the prompt ``input_ids`` (batch 1).

    With ``reference_ids`` (a reference answer's tokens), also their log-probability after the
    prompt (:func:`reference_logprob`), teacher-forced on the KV cache of the same prefill: a
    continuous measure of how much a method changes the answer, where the generated text only
    says right or wrong.

    Memory: what ``model.generate`` needs for the prompt (the KV cache of ``len(input_ids)``
    tokens plus the attention method's prefill workspace); with a reference, the first step's
    logits and one forward of ``len(reference_ids) - 1`` tokens over the cache.
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
    scored = len(reference_ids) > 0
    with torch.inference_mode(), stopwatch(device) as watch:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                             return_dict_in_generate=True, output_logits=scored)
    new_ids = out.sequences[0, ids.shape[1] :].tolist()
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    logprob = None
    if scored:
        with torch.inference_mode():
            logprob = reference_logprob(model, out.past_key_values, out.logits[0], ids.shape[1], reference_ids)
    return Generation(text=text, new_ids=new_ids, seconds=watch.seconds, timer=watch.timer,
                      reference_logprob=logprob)


def reference_logprob(
    model: Any, cache: Any, first_logits: torch.Tensor, prompt_len: int, reference_ids: Sequence[int]
) -> float:
    """``log p(reference_ids | prompt)`` in nats, teacher-forced on a generation's KV cache.

    Args:
        model: the causal LM that generated (its attention method still active).
        cache: the generation's KV cache (``past_key_values``); cropped here to the prompt.
        first_logits: ``[1, V]`` logits at the prompt's last position (the first generation step).
        prompt_len: prompt tokens in ``cache`` before the generated ones.
        reference_ids: the reference answer's token ids (at least one).

    The reference tokens after the first run as one chunk of ``len(reference_ids) - 1`` queries over
    the cached prompt, with the attention method active (a chunk that short runs dense).
    """
    if not hasattr(cache, "crop"):
        raise TypeError(f"{type(cache).__name__} cannot be cropped back to the prompt, so the reference "
                        "answer cannot be scored on it; run without the reference log-probability")
    device = first_logits.device
    target = torch.tensor(list(reference_ids), dtype=torch.long, device=device)
    total = torch.log_softmax(first_logits.float(), dim=-1)[0, target[0]]
    if len(target) > 1:
        generated = cache.get_seq_length() - prompt_len
        if generated:
            cache.crop(-generated)  # a count to remove: what every transformers version since 4.36 accepts
        chunk = target[None, :-1]
        mask = torch.ones((1, prompt_len + chunk.shape[1]), dtype=torch.long, device=device)
        logits = model(chunk, past_key_values=cache, attention_mask=mask, use_cache=True).logits
        steps = torch.log_softmax(logits[0].float(), dim=-1)
        total = total + steps.gather(1, target[1:, None]).sum()
    return float(total)


class GenerationTask(abc.ABC):
    """A task answered by greedy generation and scored on the generated text."""

    name: str

    @abc.abstractmethod
    def cases(self, tokenizer: TokenizerLike, length: int) -> list[Case]: ...

    @abc.abstractmethod
    def score(self, case: Case, text: str) -> dict[str, Any]:
        """Score fields for the answer ``text``; must include ``score`` in [0, 1]."""

    def reference_answer(self, case: Case) -> str | None:
        """A reference answer whose log-probability each record carries (``None``: none)."""
        return None

    def run_case(self, model: Any, tokenizer: TokenizerLike, case: Case) -> dict[str, Any]:
        reference = self.reference_answer(case)
        reference_ids = encode(tokenizer, reference) if reference else []
        answer = greedy_generate(model, tokenizer, case.input_ids, case.max_new_tokens, reference_ids=reference_ids)
        fields = {} if reference is None else {"reference": reference, "reference_logprob": answer.reference_logprob}
        return {
            **self.score(case, answer.text),
            "generated": answer.text,
            "expected": list(case.expected),
            "n_generated": len(answer.new_ids),
            "generate_s": answer.seconds,
            "timer": answer.timer,
            **fields,
        }
