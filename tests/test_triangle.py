"""Triangle pattern (kernel vs its exact mask, through the registry tests) and TriangleMix plans."""

from __future__ import annotations

import pytest
import torch

from longinfer.ops import reference
from longinfer.patterns import get_pattern, pattern_names
from longinfer.patterns.triangle import TriangleConfig, estimate_triangle, run_triangle, triangle_mask
from longinfer.plans import HeadPlan, LayerPlan, Plan, uniform_plan
from longinfer.plans.triangle import triangle_mix_plan
from tests import test_patterns

SHAPE = {"num_layers": 6, "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 32}
# The registry tests expect key 0 (a sink) and the query itself in every row.
REGISTRY_CONFIGS = [TriangleConfig(sink=4, window=20, last_q=10), TriangleConfig(sink=1, window=1, last_q=50)]
SMALL = REGISTRY_CONFIGS + [TriangleConfig(sink=0, window=1, last_q=50), TriangleConfig(sink=3, window=7, last_q=0)]


def test_triangle_is_registered_as_static():
    assert "triangle" in pattern_names()
    spec = get_pattern("triangle")
    assert spec.static and spec.config_cls is TriangleConfig
    assert HeadPlan.from_params("triangle", {"last_q": 64}).config == TriangleConfig(last_q=64)


def test_registry_tests_pass_for_triangle(monkeypatch):
    """The registry loop of test_patterns, run for the triangle with small configs (it is only
    parametrized over patterns registered when test_patterns is collected)."""
    monkeypatch.setitem(test_patterns.SMALL_CONFIGS, "triangle", REGISTRY_CONFIGS)
    test_patterns.test_registry_configs_round_trip()
    for per_kv_group in (False, True):
        for nq, nk in ((100, 100), (37, 133)):
            test_patterns.test_registry_estimates_have_kernel_format("triangle", per_kv_group, nq, nk)
    test_patterns.test_registry_kernels_match_reference("triangle")


def test_mask_matches_its_definition():
    n = 50
    cfg = TriangleConfig(sink=3, window=6, last_q=7)
    mask = triangle_mask(cfg.sink, cfg.window, cfg.last_q, n)[0, 0]
    for i in range(n):
        for j in range(n):
            expected = j <= i and (j < 3 or i - j < 6 or i >= n - 7)
            assert bool(mask[i, j]) == expected, (i, j)
    rows = torch.tensor([5, 44, 49])
    assert torch.equal(triangle_mask(3, 6, 7, n, rows=rows)[0, 0], mask[rows])


@pytest.mark.parametrize("nq,nk", [(96, 96), (40, 96), (5, 96)])
@pytest.mark.parametrize("cfg", SMALL, ids=str)
def test_kernel_matches_reference(nq, nk, cfg):
    """Rows before the tail take the A-shape kernel on a key prefix, the tail the dense kernel."""
    g = torch.Generator().manual_seed(nq)
    q = torch.randn(2, 4, nq, 32, generator=g)
    k, v = torch.randn(2, 2, nk, 32, generator=g), torch.randn(2, 2, nk, 32, generator=g)
    sel = estimate_triangle(q, k, cfg)
    out = run_triangle(q, k, v, sel, cfg, sm_scale=0.3)
    rows = torch.arange(nk - nq, nk)
    expected = reference.masked_attention(q, k, v, sel.mask(rows), sm_scale=0.3, rows=rows)
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)
    # The last rows really are dense and the earlier ones really are not.
    dense = reference.masked_attention(q, k, v, reference.dense_causal_mask(nk, rows=rows), sm_scale=0.3, rows=rows)
    tail = min(cfg.last_q, nq)
    if tail:
        torch.testing.assert_close(out[:, :, nq - tail:], dense[:, :, nq - tail:], atol=2e-3, rtol=2e-3)
    if tail < nq and nk > cfg.sink + cfg.window:
        assert (out[:, :, : nq - tail] - dense[:, :, : nq - tail]).abs().max() > 1e-2


def test_errors():
    with pytest.raises(ValueError, match="last_q"):
        TriangleConfig(last_q=-1)
    with pytest.raises(TypeError, match="window"):
        TriangleConfig(window=2.5)
    q, k = torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32)
    with pytest.raises(TypeError, match="TriangleConfig"):
        estimate_triangle(q, k, object())
    sel = estimate_triangle(q, k, TriangleConfig())
    with pytest.raises(ValueError, match="estimate it again"):
        run_triangle(q, torch.randn(1, 2, 9, 32), torch.randn(1, 2, 9, 32), sel, TriangleConfig())


# --------------------------------------------------------------------------- TriangleMix plans


def test_triangle_mix_plan_layers(tmp_path):
    plan = triangle_mix_plan(SHAPE, dense_layers=2, sink=64, window=512, last_q=32, model_id="m")
    triangle = HeadPlan("triangle", TriangleConfig(sink=64, window=512, last_q=32))
    assert [layer.heads for layer in plan.layers] == [(HeadPlan.from_params("dense"),) * 4] * 2 + [(triangle,) * 4] * 4
    assert plan.search["method"] == "triangle_mix" and plan.search["dense_layers"] == 2
    path = tmp_path / "tm.json"
    plan.save(path)
    assert Plan.load(path) == plan
    default = triangle_mix_plan(SHAPE)
    assert sum(layer.heads[0].pattern == "dense" for layer in default.layers) == 3  # half the layers


def test_triangle_mix_keeps_searched_dynamic_heads():
    """Heads the search gave a dynamic pattern (or dense) keep it; static sparse ones become the triangle."""
    vs = HeadPlan.from_params("vertical_slash", {"num_vertical": 100, "num_slash": 200})
    a_shape = HeadPlan.from_params("a_shape", {"sink": 8, "window": 64})
    dense = HeadPlan.from_params("dense")
    searched = Plan(model_id="m", **SHAPE, search={"method": "search"},
                    layers=tuple(LayerPlan((vs, a_shape, dense, a_shape), dense_below=1000 + i) for i in range(6)))
    plan = triangle_mix_plan(SHAPE, dense_layers=2, dynamic=searched)
    triangle = plan.layers[5].heads[1]
    assert triangle.pattern == "triangle"
    assert plan.layers[0].heads == (dense,) * 4  # shallow layers stay dense
    for index in range(2, 6):
        assert plan.layers[index].heads == (vs, triangle, dense, triangle)
        assert plan.layers[index].dense_below == 1000 + index  # the searched layer's measured threshold
    assert plan.search["dynamic"]["layers"] == [2, 3, 4, 5]
    only_last = triangle_mix_plan(SHAPE, dense_layers=2, dynamic=searched, dynamic_layers=[5])
    assert only_last.layers[4].heads == (triangle,) * 4 and only_last.layers[5].heads[0] == vs


def test_triangle_mix_with_a_dynamic_head_plan_in_shallow_layers():
    vs = HeadPlan.from_params("vertical_slash")
    plan = triangle_mix_plan(SHAPE, dense_layers=2, dynamic=vs, dynamic_layers=[0, 1], dense_below=4096)
    assert [layer.heads[0].pattern for layer in plan.layers] == ["vertical_slash"] * 2 + ["triangle"] * 4
    assert all(layer.dense_below == 4096 for layer in plan.layers)


def test_triangle_mix_errors():
    with pytest.raises(ValueError, match="dense_layers"):
        triangle_mix_plan(SHAPE, dense_layers=7)
    with pytest.raises(ValueError, match="out of range"):
        triangle_mix_plan(SHAPE, dynamic=HeadPlan.from_params("dense"), dynamic_layers=[6])
    with pytest.raises(ValueError, match="needs dynamic_layers"):
        triangle_mix_plan(SHAPE, dynamic=HeadPlan.from_params("dense"))
    with pytest.raises(ValueError, match="without dynamic"):
        triangle_mix_plan(SHAPE, dynamic_layers=[1])
    other = uniform_plan({**SHAPE, "num_layers": 5}, "a_shape")
    with pytest.raises(ValueError, match="does not match"):
        triangle_mix_plan(SHAPE, dynamic=other)
    with pytest.raises(ValueError, match="window"):
        triangle_mix_plan(SHAPE, window=-1)


def test_triangle_mix_plan_runs_through_the_integration():
    """A patched model runs the plan: with the last queries covering the whole prompt the triangle
    layers are exact (logits equal dense); with a short tail they are not."""
    from longinfer.integrations.transformers import patch, unpatch
    from tests.test_search import tiny_llama

    model = tiny_llama(300)
    ids = torch.randint(0, 300, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    outputs = []
    for last_q in (200, 16):
        patch(model, triangle_mix_plan(model.config, dense_layers=1, sink=4, window=32, last_q=last_q, dense_below=0))
        try:
            with torch.no_grad():
                outputs.append(model(input_ids=ids).logits)
        finally:
            unpatch(model)
    torch.testing.assert_close(outputs[0], dense, atol=1e-4, rtol=1e-4)
    assert (outputs[1] - dense).abs().max() > 1e-2
