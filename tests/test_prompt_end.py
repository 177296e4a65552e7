"""The call that ends a prompt (``prompt_end``): a chunked prefill's last chunk estimates from the
question's queries as a one-pass prefill of the whole prompt would (``question_from`` counted on the
prompt, not on the chunk's rows); earlier chunks, and calls outside the context, are unchanged."""

import contextlib
import copy
import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

import longinfer  # noqa: E402
from longinfer import memory  # noqa: E402
from longinfer.integrations import transformers as lt  # noqa: E402
from longinfer.patterns import VerticalSlashConfig  # noqa: E402
from longinfer.plans import uniform_plan  # noqa: E402
from tests.conftest import tiny_llama  # noqa: E402

PROMPT, CHUNK = 256, 128
PARAMS = {"num_vertical": 16, "num_slash": 16, "sink": 4, "local": 8, "last_q": 8, "budget": "coverage",
          "tau": 0.5, "query_sampling": "strided", "question_from": PROMPT, "thresholds_on": "queries"}


@pytest.fixture(scope="module")
def model_and_ids():
    model = tiny_llama(num_hidden_layers=2)
    ids = torch.randint(3, 128, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    return model, ids


def _chunk_logits(model, chunk, params, backend, cache, *, ends_prompt=False):
    """The logits of ``chunk`` ``[1, n]`` over ``cache`` (extended in place), the model patched with ``params``."""
    lt.patch(model, uniform_plan(model.config, "vertical_slash", params), backend=backend)
    try:
        with torch.no_grad(), lt.prompt_end() if ends_prompt else contextlib.nullcontext():
            return model(chunk, **{memory.cache_keyword(model): cache, "use_cache": True}).logits
    finally:
        lt.unpatch(model)


def _first_chunk_cache(model, ids, backend):
    """The KV cache after the prompt's first chunk, with :data:`PARAMS`."""
    cache = transformers.DynamicCache(config=model.config)
    _chunk_logits(model, ids[:, :CHUNK], PARAMS, backend, cache)
    return cache


def test_ending_prompt_resolves_question_from_on_the_prompt_length():
    rule = VerticalSlashConfig(last_q=8, query_sampling="strided", question_from=PROMPT, thresholds_on="queries")
    ended = rule.ending_prompt(PROMPT)
    assert ended == dataclasses.replace(rule, last_q=16, query_sampling="mixed", question_from=0)
    one_pass = rule.for_call(PROMPT, PROMPT)  # the estimate's rows as a one-pass prefill of the prompt has them
    assert (ended.for_call(CHUNK, PROMPT).last_q, ended.for_call(CHUNK, PROMPT).query_sampling) == (
        one_pass.last_q, one_pass.query_sampling)
    assert rule.for_call(CHUNK, PROMPT).last_q == 8  # the chunk alone would not reach question_from
    assert rule.ending_prompt(PROMPT - 1) is rule  # a shorter prompt: no question rows
    without = VerticalSlashConfig(last_q=8, query_sampling="strided")
    assert without.ending_prompt(10**6) is without


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_last_chunk_under_prompt_end_runs_the_question_rows(model_and_ids, backend):
    """Chunk 2 (128 rows over 256 keys) under ``prompt_end`` equals chunk 2 of a plan whose
    question_from the chunk's rows reach, over the same cache; outside the context it stays strided."""
    model, ids = model_and_ids
    cache, last = _first_chunk_cache(model, ids, backend), ids[:, CHUNK:]
    plain = _chunk_logits(model, last, PARAMS, backend, copy.deepcopy(cache))
    ended = _chunk_logits(model, last, PARAMS, backend, copy.deepcopy(cache), ends_prompt=True)
    reached = _chunk_logits(model, last, {**PARAMS, "question_from": CHUNK}, backend, copy.deepcopy(cache))
    torch.testing.assert_close(ended, reached, atol=0, rtol=0)
    assert (ended - plain).abs().max() > 1e-4


def test_chunked_prefill_and_generate_end_the_prompt_with_their_last_chunk(model_and_ids, monkeypatch):
    """``prefill_in_chunks`` and ``generate(chunk_size=...)`` run only their last prefill call under
    ``prompt_end`` (``ends_prompt=False`` none of them); ``prefill_in_chunks``' logits then equal the
    last chunk's under the context."""
    model, ids = model_and_ids
    seen: list[tuple[int, bool]] = []
    original = lt._call_config

    def spy(config, k_len):
        seen.append((k_len, lt._ENDS_PROMPT.get()))
        return original(config, k_len)

    monkeypatch.setattr(lt, "_call_config", spy)
    longinfer.patch(model, uniform_plan(model.config, "vertical_slash", PARAMS), backend="torch")
    try:
        result = memory.prefill_in_chunks(model, ids, CHUNK)
        assert sorted(set(seen)) == [(CHUNK, False), (PROMPT, True)]
        seen.clear()
        memory.prefill_in_chunks(model, ids, CHUNK, ends_prompt=False)
        assert sorted(set(seen)) == [(CHUNK, False), (PROMPT, False)]
        seen.clear()

        class Tokenizer:
            eos_token_id = None

            def decode(self, ids, skip_special_tokens=True):
                return " ".join(map(str, ids))

        answer = longinfer.generate(model, Tokenizer(), ids[0].tolist(), max_new_tokens=2, chunk_size=CHUNK)
        assert sorted(set(seen)) == [(CHUNK, False), (PROMPT, True)]  # decoding steps run dense
    finally:
        longinfer.unpatch(model)
    ended = _chunk_logits(model, ids[:, CHUNK:], PARAMS, "torch", _first_chunk_cache(model, ids, "torch"),
                          ends_prompt=True)
    torch.testing.assert_close(result.logits, ended[:, -1], atol=1e-5, rtol=1e-5)
    assert answer.new_ids[0] == int(ended[0, -1].argmax())
