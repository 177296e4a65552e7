"""benchmarks/ruler_rows_recall.py on a tiny random Llama: piece rows, recall values, resume, report."""

from __future__ import annotations

import json

import pytest
import torch

from longinfer.eval import ruler
from longinfer.eval.prompts import Haystack
from longinfer.eval.recall import parse_method_spec
from tests.benchmark_scripts import load_benchmark
from tests.test_eval_fixtures import corpus_text, make_tiny_llama, make_tokenizer

SMALL = "vertical_slash:budget=coverage,num_vertical=16,num_slash=8,last_q=16,sink=4,local=4,block_size=16"


@pytest.fixture(scope="module")
def setup():
    tokenizer = make_tokenizer()
    haystack = Haystack.from_text(corpus_text())
    return tokenizer, haystack, make_tiny_llama(len(tokenizer), seed=3)


def test_piece_rows_recall_and_resume(setup, tmp_path, monkeypatch):
    script = load_benchmark("ruler_rows_recall")
    tokenizer, haystack, model = setup
    prompt = ruler.generate("niah_multivalue", tokenizer, haystack, 600, seed=0, sample=0)
    rows = script.piece_rows(prompt)
    assert rows.numel() == sum(b - a for a, b in prompt.pieces) and bool((rows[1:] > rows[:-1]).all())
    everything = parse_method_spec("all=dense")
    small = parse_method_spec(f"small={SMALL}")
    results = script.measure_prompt(model, prompt, [everything, small], num_rows=32, seed=0)
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    for name in ("all", "small"):
        assert len(results[name]["pieces"]) == len(results[name]["spread"]) == layers * heads
    assert results["all"]["pieces"] == pytest.approx([1.0] * layers * heads, abs=1e-5)  # every key kept
    assert min(results["small"]["pieces"]) < 0.999 and max(results["small"]["density"]) < 1.0
    for key in ("error_pieces", "error_spread"):
        assert results["all"][key] == pytest.approx([0.0] * layers * heads, abs=1e-5)  # nothing dropped
        assert len(results["small"][key]) == layers * heads and max(results["small"][key]) > 1e-3
    with pytest.raises(ValueError, match="inserts no sentences"):
        script.piece_rows(ruler.generate("cwe", tokenizer, haystack, 600, seed=0, sample=0))

    loads = []
    monkeypatch.setattr(script.zoo, "load", lambda *a, **k: loads.append(a) or (model, tokenizer))
    monkeypatch.setattr(script, "load_haystack", lambda spec: haystack)
    argv = ["--model", "tiny", "--length", "600", "--tasks", "niah_multivalue", "--rows", "32", "--device", "cpu",
            "--out", str(tmp_path), "--method", f"small={SMALL}"]
    assert script.main(argv) == 0
    records = [json.loads(line) for line in (tmp_path / "ruler_rows_recall.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["method"]) for r in records] == [("niah_multivalue/L600/i0/s0", "small")]
    torch.testing.assert_close(torch.tensor(records[0]["pieces"]), torch.tensor(results["small"]["pieces"]))
    assert script.main(argv) == 0  # resumed: nothing new
    assert len((tmp_path / "ruler_rows_recall.jsonl").read_text().splitlines()) == 1
    report = (tmp_path / "ruler_rows_recall.md").read_text()
    assert "| small |" in report and "output error at pieces" in report
    # a plan method (here the model's default plan) is resolved: at 600 tokens it runs every layer
    # dense (below its crossover), so it keeps every key of the pieces' rows
    assert script.main([*argv, "--method", "default=plan"]) == 0
    records = [json.loads(line) for line in (tmp_path / "ruler_rows_recall.jsonl").read_text().splitlines()]
    assert [r["method"] for r in records] == ["small", "default"]
    assert records[1]["pieces"] == pytest.approx([1.0] * layers * heads, abs=1e-5)
