"""benchmarks/hybrid_plan.py: per-KV-group indices in the layers a frontier table shows worst."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from longinfer.plans import Plan, uniform_plan
from tests.benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def script():
    return load_benchmark("hybrid_plan")


def write_table(path: Path) -> None:
    """3 layers x 2 heads; layer 1 has the worst head per-head, layer 2 the next."""
    per_head = {0: [(0.95, 0.1), (0.93, 0.1)], 1: [(0.40, 0.2), (0.90, 0.2)], 2: [(0.70, 0.1), (0.99, 0.1)]}
    per_group = {0: [(0.97, 0.3), (0.96, 0.3)], 1: [(0.85, 0.5), (0.95, 0.5)], 2: [(0.90, 0.4), (0.99, 0.4)]}
    lines = ["method,layer,head,recall,density"]
    for method, table in (("vs", per_head), ("vs-kv", per_group), ("other", per_head)):
        lines += [f"{method},{layer},{h},{r},{d}" for layer, heads in table.items() for h, (r, d) in enumerate(heads)]
    path.write_text("\n".join(lines) + "\n")


def test_worst_layers_share_indices_and_the_prediction_mixes_the_methods(script, tmp_path, capsys):
    write_table(tmp_path / "heads.csv")
    base = uniform_plan({"num_layers": 3, "num_q_heads": 2, "num_kv_heads": 1, "head_dim": 64}, "vertical_slash",
                        model_id="tiny")
    base.save(tmp_path / "base.json")
    common = ["--heads", str(tmp_path / "heads.csv"), "--per-head", "vs", "--per-group", "vs-kv",
              "--base", str(tmp_path / "base.json")]
    assert script.main([*common, "--layers", "2", "--dense-last", "64", "--out", str(tmp_path / "two.json")]) == 0
    plan = Plan.load(tmp_path / "two.json")
    assert [layer.share_kv_groups for layer in plan.layers] == [False, True, True]
    assert all(layer.dense_last == 64 for layer in plan.layers)
    assert plan.layers[0].heads == base.layers[0].heads
    # layer 0 per head, layers 1-2 per group: recalls .95 .93 .85 .95 .90 .99 -> mean .928, p10 = min .85;
    # densities .1 .1 .5 .5 .4 .4 -> 33.3%
    assert "recall 0.928 mean / 0.850 p10 at 33.3% density" in plan.search["note"]
    assert "hybrid        recall 0.928 / p10 0.850, density 33.3%" in capsys.readouterr().out
    # timings: per head 10 ms per layer, per group 30 ms; dense 100 ms -> hybrid (10 + 30 + 30) = 300 / 70
    timings = [{"method": m, "layer": layer, "estimate_ms": 1.0, "kernel_ms": ms - 1.0, "dense_sdpa_ms": 100.0}
               for m, ms in (("vs", 10.0), ("vs-kv", 30.0)) for layer in range(3)]
    (tmp_path / "recall.jsonl").write_text("".join(json.dumps(t) + "\n" for t in timings))
    assert script.main([*common, "--layers", "2", "--timings", str(tmp_path / "recall.jsonl"),
                        "--out", str(tmp_path / "timed.json")]) == 0
    printed = capsys.readouterr().out
    assert "per head      recall 0.812 / p10 0.400, density 13.3%, 10.00x SDPA" in printed
    assert "hybrid        recall 0.928 / p10 0.850, density 33.3%, 4.29x SDPA" in printed
    assert script.main([*common, "--below", "0.5", "--out", str(tmp_path / "below.json")]) == 0
    assert [layer.share_kv_groups for layer in Plan.load(tmp_path / "below.json").layers] == [False, True, False]
    with pytest.raises(SystemExit, match="no rows of method 'missing'"):
        script.main([*common[:2], "--per-head", "missing", *common[4:], "--layers", "1",
                     "--out", str(tmp_path / "x.json")])
