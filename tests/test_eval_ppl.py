"""Chunked last-token perplexity against the full-logits loss of a tiny random Llama."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from longinfer.eval.ppl import PerplexityTask, last_tokens_nll
from longinfer.eval.prompts import Haystack
from tests.test_eval_fixtures import corpus_text, make_tiny_llama, make_tokenizer


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(vocab_size=512, seed=1)


def _reference_nll(model, ids: torch.Tensor, eval_tokens: int) -> float:
    """Sum of token losses from the model's own full [N, vocab] logits."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    n = ids.shape[1]
    return F.cross_entropy(
        logits[0, n - eval_tokens - 1 : n - 1], ids[0, n - eval_tokens :], reduction="sum"
    ).item()


@pytest.mark.parametrize(
    ("n", "eval_tokens", "chunk"), [(300, 128, 1024), (300, 128, 50), (257, 256, 7), (64, 1, 1)]
)
def test_chunked_equals_full_logits(model, n, eval_tokens, chunk):
    torch.manual_seed(n)
    ids = torch.randint(0, 512, (1, n))
    nll, count = last_tokens_nll(model, ids, eval_tokens, chunk_size=chunk)
    assert count == eval_tokens
    assert nll == pytest.approx(_reference_nll(model, ids, eval_tokens), rel=1e-5)


def test_softcapping_and_scale_follow_the_config(model):
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(0))
    plain, _ = last_tokens_nll(model, ids, 20)
    model.config.logit_scale = 50.0
    model.config.final_logit_softcapping = 2.0
    try:
        scaled, _ = last_tokens_nll(model, ids, 20)
    finally:
        del model.config.logit_scale, model.config.final_logit_softcapping
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    logits = torch.tanh(logits * 50.0 / 2.0) * 2.0
    expected = F.cross_entropy(logits[0, 19:39], ids[0, 20:], reduction="sum").item()
    assert scaled == pytest.approx(expected, rel=1e-5)
    assert abs(scaled - plain) > 1.0  # the scaling changed the loss


def test_bad_arguments(model):
    ids = torch.zeros(1, 10, dtype=torch.long)
    with pytest.raises(ValueError, match="eval_tokens"):
        last_tokens_nll(model, ids, 10)
    with pytest.raises(ValueError, match=r"\[1, N\]"):
        last_tokens_nll(model, torch.zeros(2, 10, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="chunk_size"):
        last_tokens_nll(model, ids, 5, chunk_size=0)


def test_task_windows_and_record_fields(model):
    tokenizer = make_tokenizer()
    haystack = Haystack.from_text(corpus_text())
    task = PerplexityTask(haystack, eval_tokens=64, samples=2, chunk_size=16)
    cases = task.cases(tokenizer, 256)
    assert [len(c.input_ids) for c in cases] == [256, 256]
    assert cases[0].input_ids[0] == tokenizer.bos_token_id
    assert cases[1].input_ids[1:] == haystack.token_ids(tokenizer, 255, offset=255)
    model_small_vocab = make_tiny_llama(vocab_size=len(tokenizer))
    result = task.run_case(model_small_vocab, tokenizer, cases[0])
    assert result["n_scored"] == 64 and result["timer"] == "cpu-wall"
    assert result["ppl"] == pytest.approx(math.exp(result["nll_sum"] / 64))
    with pytest.raises(ValueError, match="fewer than"):
        PerplexityTask(haystack, eval_tokens=64, samples=1000).cases(tokenizer, 256)
    with pytest.raises(ValueError, match="must exceed"):
        task.cases(tokenizer, 64)
