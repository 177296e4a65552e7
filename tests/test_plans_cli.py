"""``longinfer search`` and ``longinfer info`` from the command line, on a tiny local model."""

from __future__ import annotations

import dataclasses
import json

import pytest

from longinfer import cli
from longinfer.plans import HeadPlan, LayerPlan, Plan
from longinfer.plans.cli_info import plan_summary
from longinfer.plans.search import partial_path
from longinfer.plans.triangle import triangle_mix_plan
from tests.test_eval_fixtures import corpus_text, make_tokenizer
from tests.test_search import tiny_llama

SHAPE = {"num_layers": 3, "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 32}


def _mixed_plan() -> Plan:
    vs = HeadPlan.from_params("vertical_slash", {"num_vertical": 500, "num_slash": 800, "budget": "coverage"})
    a_shape = HeadPlan.from_params("a_shape", {"sink": 64, "window": 1024})
    layers = (LayerPlan((vs, vs, a_shape, vs), dense_below=8192), LayerPlan((a_shape,) * 4, dense_below=0),
              LayerPlan((HeadPlan.from_params("dense"),) * 4, dense_below=123))
    return Plan(model_id="org/tiny", model_revision="sha256:abc", **SHAPE, layers=layers, search={"method": "manual"})


def test_info_lists_patterns_per_layer(tmp_path, capsys):
    path = tmp_path / "plan.json"
    _mixed_plan().save(path)
    assert cli.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "org/tiny (revision sha256:abc)" in out
    assert "3 layers, 4 query / 2 kv heads, head_dim 32" in out
    assert "method=manual" in out
    assert "patterns: 5 a_shape, 4 dense, 3 vertical_slash (of 12 heads)" in out
    rows = [line.split() for line in out.splitlines() if line[:5].strip().isdigit()]
    assert [row[:2] for row in rows] == [["0", "8192"], ["1", "0"], ["2", "123"]]
    assert "3x vertical_slash(num_vertical=500, num_slash=800, budget=coverage) [0-1,3]" in out
    assert "1x a_shape(sink=64, window=1024) [2]" in out
    assert "4x dense [0-3]" in out
    assert "recall:" not in out  # not a searched plan: no scores to show


def test_info_shows_layer_options():
    plan = _mixed_plan()
    first = dataclasses.replace(plan.layers[0], share_kv_groups=True, dense_last=128)
    text = plan_summary(dataclasses.replace(plan, layers=(first,) + plan.layers[1:]))
    rows = [line for line in text.splitlines() if line[:5].strip().isdigit()]
    assert rows[0].endswith("(shared per KV group, last 128 rows dense)")
    assert not rows[1].endswith(")")


def test_info_shows_triangle_mix_provenance():
    text = plan_summary(triangle_mix_plan(SHAPE, dense_layers=1, sink=16, window=256, last_q=8))
    assert "method=triangle_mix" in text and "dense_layers=1, sink=16, window=256, last_q=8" in text
    assert "4x triangle(sink=16, window=256, last_q=8) [0-3]" in text


def test_info_errors(tmp_path, capsys):
    assert cli.main(["info", str(tmp_path / "missing.json")]) == 1
    assert "no plan file" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema_version": 99}))
    assert cli.main(["info", str(bad)]) == 1
    assert "unsupported plan schema_version 99" in capsys.readouterr().err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama and its tokenizer saved as a local Hugging Face folder (what zoo.load reads)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = make_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    text = folder / "calibration.txt"
    text.write_text(corpus_text())
    return folder


def test_search_command_writes_a_plan_and_resumes(model_dir, tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = ["search", "--model", str(model_dir), "--length", "1024", "--out", str(out),
            "--calibration-text", str(model_dir / "calibration.txt"), "--rows", "16", "--cost-budget", "0.6",
            "--candidates", "a_shape:sink=16,window=128", "vertical_slash:num_vertical=32,num_slash=20,sink=4,local=16",
            "--device", "cpu", "--no-progress", "--dense-last", "64"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out)
    plan = Plan.load(out)
    assert plan.model_id == str(model_dir) and plan.num_layers == 3
    assert all(layer.dense_last == 64 for layer in plan.layers)
    assert {head.pattern for layer in plan.layers for head in layer.heads} <= {"a_shape", "vertical_slash"}
    assert plan.search["calibration"]["length"] == 1024 and plan.search["calibration"]["corpus"] == "text"
    # A rerun finds every layer finished and rebuilds the same plan.
    assert cli.main(argv) == 0
    assert Plan.load(out).layers == plan.layers
    assert len(partial_path(out).read_text().splitlines()) == 1 + 3
    # Other settings on the same output: a clear error until --restart.
    assert cli.main(argv + ["--seed", "1"]) == 1
    assert "other settings (differing: ['calibration', 'seed'])" in capsys.readouterr().err
    assert cli.main(argv + ["--seed", "1", "--restart"]) == 0
    capsys.readouterr()
    assert cli.main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "recall:   mean" in info and "dense_below: not measured (no CUDA device" in info
    assert "calibration: kind=kv_retrieval, length=1024, corpus=text, seed=1" in info
    assert "q/k captured on cpu/float32, longinfer " in info


def test_search_command_rejects_bad_candidates_before_loading(tmp_path, capsys):
    assert cli.main(["search", "--model", str(tmp_path / "nowhere"), "--candidates", "bogus:x=1"]) == 1
    assert "unknown pattern 'bogus'" in capsys.readouterr().err
