"""``longinfer warmup``: every distinct layer of a plan runs once per shape, on attention-like inputs.

On the CPU the kernels run in the Triton interpreter (nothing compiles); these tests check what is
run and reported. Whether it fills the GPU caches is measured by ``benchmarks/cold_start.py``.
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from longinfer import cli, warmup
from longinfer.plans import Plan, default_plan_for

SHAPE = {"num_layers": 3, "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 64}


def _plan() -> Plan:
    """Three layers, the last two equal; the first runs dense below 100 keys instead of 0."""
    plan = default_plan_for(SHAPE, dense_below=0)
    first = dataclasses.replace(plan.layers[0], dense_below=100)
    return dataclasses.replace(plan, layers=(first, *plan.layers[1:]))


def test_distinct_layers_are_the_first_of_each_plan():
    assert warmup.distinct_layers(_plan()) == [0, 1]
    assert warmup.distinct_layers(default_plan_for(SHAPE)) == [0]


def test_structured_inputs_attend_to_their_neighbours():
    q, k, v = warmup.structured_qkv(4, 2, 64, 1024, torch.float32, "cpu")
    assert q.shape == (1, 4, 1024, 64) and k.shape == v.shape == (1, 2, 1024, 64)
    for row in (300, 600, 1000):
        for head in (0, 3):  # both KV groups
            probs = (q[0, head, row] @ k[0, head // 2, : row + 1].T / 8.0).softmax(-1)
            # the 33 nearest keys hold 35-51% of the mass (measured), 3-13% of the keys: a local band
            # for the estimate to find, as in real heads; random q/k would give the keys' share
            assert probs[row - 32:].sum() > 0.3 > 2 * 33 / (row + 1)


def test_warmup_runs_each_distinct_layer_per_shape(monkeypatch):
    seen = []
    real = warmup.attend_layer

    def spy(plan, layer, q, k, v, **kwargs):
        seen.append((layer, tuple(q.shape), tuple(k.shape)))
        return real(plan, layer, q, k, v, **kwargs)

    monkeypatch.setattr(warmup, "attend_layer", spy)
    calls = warmup.warmup(_plan(), [300], turns=[(200, 77)], device="cpu", dtype=torch.float32)
    shapes = [(300, 300), (288, 288), (277, 77), (277, 64), (272, 77), (272, 64)]  # each length class
    assert [(c.keys, c.queries, c.layer) for c in calls] == [(*shape, layer) for shape in shapes for layer in (0, 1)]
    assert all(c.seconds > 0 for c in calls)
    assert seen[4] == (0, (1, 4, 77, 64), (1, 2, 277, 64))  # the turn: the last 77 queries over 277 keys


@pytest.mark.parametrize(
    "keys, queries, expected",
    [
        (4096, 4096, [(4096, 4096), (4095, 4095)]),
        (4100, 4100, [(4100, 4100), (4096, 4096)]),
        (69632, 4096, [(69632, 4096), (69632, 4095), (69631, 4096), (69631, 4095)]),
        (20, 3, [(20, 3), (16, 3)]),  # 3 has no shorter length of the other class: no query left
        (16, 16, [(16, 16), (15, 15)]),
    ],
)
def test_length_classes_cover_each_divisibility_by_16(keys, queries, expected):
    shapes = warmup.length_classes(keys, queries)
    assert shapes == expected
    if queries == keys:
        assert {k % 16 == 0 for k, _ in shapes} == {True, False}


def test_warmup_errors_name_the_problem():
    with pytest.raises(ValueError, match="nothing to warm up"):
        warmup.warmup(_plan(), [], device="cpu")
    with pytest.raises(ValueError, match="must be positive"):
        warmup.warmup(_plan(), [0], device="cpu")
    with pytest.raises(argparse.ArgumentTypeError, match="PREFIX\\+NEW"):
        warmup._turn("65536x4096")


def test_cli_warms_a_plan_file_and_prints_each_call(tmp_path, capsys):
    path = tmp_path / "plan.json"
    _plan().save(path)
    assert cli.main(["warmup", "--plan", str(path), "--lengths", "150", "--device", "cpu", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "| 150 | 150 | 0 |" in out and "| 150 | 150 | 1 |" in out and "| 144 | 144 | 1 |" in out and "4 calls" in out


def test_a_zoo_name_gives_the_default_plan_of_its_shape_without_weights():
    plan = warmup._plan_for(argparse.Namespace(plan=None, model="qwen2.5-coder-1.5b"))
    assert (plan.shape.num_layers, plan.shape.num_q_heads, plan.shape.num_kv_heads, plan.shape.head_dim) == (
        28, 12, 2, 128)


def test_a_model_folder_gives_the_default_plan_of_its_config(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, hidden_size=256).save_pretrained(
        tmp_path)
    plan = warmup._plan_for(argparse.Namespace(plan=None, model=str(tmp_path)))
    assert (plan.shape.num_layers, plan.shape.num_q_heads, plan.shape.num_kv_heads, plan.shape.head_dim) == (3, 8, 2, 32)
