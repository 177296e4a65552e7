"""Perplexity over long text: the loss of the last ``eval_tokens`` tokens given everything before.

The model is run without its LM head (``model.base_model``), then the head is applied to the
hidden states of the scored positions ``chunk_size`` at a time, so memory holds at most
``chunk_size x vocab`` logits instead of ``N x vocab`` (at 128K tokens and a 150K vocabulary the
latter alone would be 77 GB in float32).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .cases import Case, model_device, stopwatch
from .prompts import Haystack, TokenizerLike

__all__ = ["last_tokens_nll", "PerplexityTask"]


def _head_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 logits ``[1, C, V]`` of hidden states ``[1, C, H]``, with the config's final scaling."""
    logits = model.get_output_embeddings()(hidden).float()
    config = model.config
    scale = getattr(config, "logit_scale", None)
    if scale is not None:
        logits = logits * scale
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def last_tokens_nll(
    model: Any, input_ids: torch.Tensor, eval_tokens: int, *, chunk_size: int = 1024
) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of the last ``eval_tokens`` tokens of ``input_ids``.

    Args:
        model: a transformers causal LM (``base_model`` + ``get_output_embeddings()``).
        input_ids: ``[1, N]`` token ids on the model's device.
        eval_tokens: how many final tokens are scored, ``1 <= eval_tokens < N``; each is
            predicted from all tokens before it.
        chunk_size: scored positions per LM-head call.

    Returns:
        ``(nll_sum, eval_tokens)``; perplexity is ``exp(nll_sum / eval_tokens)``.

    Memory: the base model's forward at length ``N`` (attention method dependent) plus hidden
    states ``[N, H]`` and ``chunk_size x vocab`` float32 logits.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, N], got shape {tuple(input_ids.shape)}")
    n = input_ids.shape[1]
    if not 1 <= eval_tokens < n:
        raise ValueError(
            f"eval_tokens must be in [1, {n - 1}] for a sequence of {n} tokens, got {eval_tokens}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    with torch.inference_mode():
        hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        hidden = hidden[:, n - eval_tokens - 1 : n - 1]  # position t predicts token t + 1
        targets = input_ids[:, n - eval_tokens :]
        total = torch.zeros((), dtype=torch.float64, device=input_ids.device)
        for start in range(0, eval_tokens, chunk_size):
            logits = _head_logits(model, hidden[:, start : start + chunk_size])
            chunk_targets = targets[:, start : start + chunk_size]
            total += F.cross_entropy(logits.flatten(0, 1), chunk_targets.flatten(), reduction="sum").double()
    return total.item(), eval_tokens


class PerplexityTask:
    """Perplexity at each length over ``samples`` disjoint windows of a haystack.

    Window ``i`` is haystack tokens ``[i * length, (i + 1) * length)`` (after a BOS token when
    the tokenizer has one); the text is never repeated, so the corpus must hold
    ``samples * length`` tokens.
    """

    name = "ppl"

    def __init__(
        self, haystack: Haystack, *, eval_tokens: int = 1024, samples: int = 1, chunk_size: int = 1024
    ) -> None:
        if eval_tokens < 1 or samples < 1 or chunk_size < 1:
            raise ValueError(
                f"eval_tokens, samples and chunk_size must be >= 1, "
                f"got {eval_tokens}, {samples}, {chunk_size}"
            )
        self.haystack = haystack
        self.eval_tokens = eval_tokens
        self.samples = samples
        self.chunk_size = chunk_size

    def cases(self, tokenizer: TokenizerLike, length: int) -> list[Case]:
        if length <= self.eval_tokens:
            raise ValueError(f"length {length} must exceed eval_tokens {self.eval_tokens}")
        bos: Sequence[int] = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        cases = []
        for sample in range(self.samples):
            text_len = length - len(bos)
            ids = self.haystack.token_ids(tokenizer, text_len, offset=sample * text_len, allow_repeat=False)
            cases.append(
                Case(
                    case_id=f"L{length}/w{sample}/e{self.eval_tokens}",
                    length=length,
                    input_ids=[*bos, *ids],
                    params={
                        "window": sample,
                        "eval_tokens": self.eval_tokens,
                        "haystack": self.haystack.name,
                    },
                )
            )
        return cases

    def run_case(self, model: Any, tokenizer: TokenizerLike, case: Case) -> dict[str, Any]:
        device = model_device(model)
        ids = torch.tensor([case.input_ids], dtype=torch.long, device=device)
        with stopwatch(device) as watch:
            nll, count = last_tokens_nll(model, ids, self.eval_tokens, chunk_size=self.chunk_size)
        return {
            "nll_sum": nll,
            "n_scored": count,
            "loss": nll / count,
            "ppl": math.exp(nll / count),
            "forward_s": watch.seconds,
            "timer": watch.timer,
        }
