"""The real CUDA graph capture of a sparse call gives the eager call's results (GPU only).

Each case runs one layer's sparse call eagerly and through :class:`CallGraphs` on the same three
inputs (call 1 eager, call 2 recorded, call 3 replayed with new values), and compares outputs and
kept-pair counts. The same kernels run in the same order, so outputs agree to the last bit except
where a kernel's reduction order depends on scheduling; the tolerance (1e-3 on unit-scale bf16
outputs, one bf16 ulp at 0.25) leaves room for that and nothing else.
"""

from __future__ import annotations

import pytest
import torch

from longinfer.integrations import transformers as lt
from longinfer.plans import HeadPlan, LayerPlan, Plan
from longinfer.plans.schema import DEFAULT_PATTERN_CONFIG, config_to_params

pytestmark = pytest.mark.gpu

SPARSE = HeadPlan.from_params("vertical_slash", config_to_params(DEFAULT_PATTERN_CONFIG))
# a second bucket: a smaller diagonal cap (and so no diagonal floor, which must fit under it)
SMALL = HeadPlan.from_params("vertical_slash", {**config_to_params(DEFAULT_PATTERN_CONFIG), "num_slash": 512,
                                                "min_slash": 0})


def _inputs(seed: int, bsz: int, hq: int, hkv: int, nq: int, nk: int, d: int) -> tuple[torch.Tensor, ...]:
    """Queries and keys sharing a few directions, so the estimate picks real columns and diagonals."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda")
    k = randn(bsz, hkv, nk, d) + 3 * randn(1, hkv, 1, d) * (torch.rand(1, 1, nk, 1, device="cuda") < 0.01)
    q = randn(bsz, hq, nq, d)
    v = randn(bsz, hkv, nk, d)
    return tuple(t.to(torch.bfloat16) for t in (q, k, v))


@pytest.mark.parametrize("bsz, hq, hkv, nq, nk, d, heads, share, dense_last", [
    (1, 12, 2, 4000, 69000, 128, (SPARSE,) * 12, False, 128),  # a turn over a cache, the default plan
    (2, 8, 2, 1000, 1000, 64, (SPARSE,) * 8, True, 0),  # one-shot, one index per KV group
    (1, 6, 3, 1500, 2600, 96, (SPARSE, SMALL) * 3, False, 64),  # two buckets: heads gathered
])
def test_graph_replay_equals_eager(bsz, hq, hkv, nq, nk, d, heads, share, dense_last):
    plan = Plan(model_id="tiny", num_layers=1, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                layers=(LayerPlan(heads=heads, share_kv_groups=share, dense_last=dense_last),))
    graphs = lt.CallGraphs()
    runs = {"eager": lt.LayerRuntime.build(plan, 0, "triton"),
            "graph": lt.LayerRuntime.build(plan, 0, "triton", graphs=graphs)}
    for seed in range(3):
        q, k, v = _inputs(seed, bsz, hq, hkv, nq, nk, d)
        outs = {}
        for name, runtime in runs.items():
            runtime.stats.kept_sparse = None
            outs[name] = lt._sparse_attention(lt._CallContext(runtime, "triton", d**-0.5, None, None), q, k, v)
        torch.testing.assert_close(outs["graph"], outs["eager"], atol=1e-3, rtol=0)
        assert float(runs["graph"].stats.kept_sparse) == pytest.approx(float(runs["eager"].stats.kept_sparse), rel=1e-6)
    assert (graphs.captures, graphs.replays) == (1, 2)
    assert runs["graph"].stats.graph_calls == 2 and runs["eager"].stats.graph_calls == 0
