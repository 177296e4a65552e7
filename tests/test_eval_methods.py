"""Attention methods switch a loaded model and restore it; the longinfer method fails clearly."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from longinfer.eval.methods import DenseMethod, LonginferMethod, NoAttentionMethod, method_from_spec, parse_methods
from tests.test_eval_fixtures import make_tiny_llama


def test_dense_switches_and_restores():
    model = make_tiny_llama(vocab_size=64, attn_implementation="eager")
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager_logits = model(input_ids=ids).logits
    method = DenseMethod()
    with method.activate(model):
        assert model.config._attn_implementation == "sdpa"
        with torch.no_grad():
            sdpa_logits = model(input_ids=ids).logits
    assert model.config._attn_implementation == "eager"
    torch.testing.assert_close(sdpa_logits, eager_logits, rtol=1e-4, atol=1e-5)


def test_restores_after_an_error():
    model = make_tiny_llama(vocab_size=64, attn_implementation="eager")
    with pytest.raises(RuntimeError, match="boom"):
        with DenseMethod().activate(model):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "eager"


def test_specs():
    methods = parse_methods("dense, dense:eager,longinfer,longinfer:plans/qwen.json,none")
    assert [m.name for m in methods] == ["dense", "dense:eager", "longinfer", "longinfer:qwen", "no-attention"]
    assert [m.timing_only for m in methods] == [False, False, False, False, True]
    assert methods[1].describe() == {"attn_implementation": "eager"}
    assert methods[3].plan == "plans/qwen.json"  # describe(): test_plan_digest_follows_the_plan_rules_not_the_file
    with pytest.raises(FileNotFoundError, match="plans/qwen.json"):
        methods[3].prepare()  # the digest reads the plan: a missing file is an error before the model loads
    with pytest.raises(ValueError, match="unknown attention method"):
        method_from_spec("flash")
    with pytest.raises(ValueError, match="unique"):
        parse_methods("dense,dense:sdpa")
    with pytest.raises(ValueError, match="no attention methods"):
        parse_methods(" , ")


def test_no_attention_equals_a_model_whose_attention_adds_nothing():
    """With every attention output zero, the logits equal those of the model with o_proj zeroed."""
    model = make_tiny_llama(vocab_size=64, attn_implementation="eager")
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with NoAttentionMethod().activate(model):
            floor_logits = model(input_ids=ids).logits
        assert model.config._attn_implementation == "eager"
        real_logits = model(input_ids=ids).logits
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
        zeroed_logits = model(input_ids=ids).logits
    assert not torch.allclose(floor_logits, real_logits, atol=1e-3)
    torch.testing.assert_close(floor_logits, zeroed_logits, rtol=1e-5, atol=1e-6)


def test_longinfer_without_integration_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "longinfer.integrations.transformers", None)
    model = make_tiny_llama(vocab_size=64)
    with pytest.raises(RuntimeError, match="longinfer.integrations.transformers"):
        with LonginferMethod().activate(model):
            pass


def test_longinfer_calls_patch_and_unpatch(monkeypatch):
    calls = []
    fake = types.ModuleType("longinfer.integrations.transformers")
    fake.patch = lambda model, plan, cuda_graphs: calls.append(("patch", plan, cuda_graphs))
    fake.unpatch = lambda model: calls.append(("unpatch",))
    monkeypatch.setitem(sys.modules, "longinfer.integrations.transformers", fake)
    import longinfer.integrations

    monkeypatch.setattr(longinfer.integrations, "transformers", fake, raising=False)
    model = make_tiny_llama(vocab_size=64)
    with LonginferMethod("my_plan.json").activate(model):
        calls.append(("inside",))
    with LonginferMethod(cuda_graphs=False).activate(model):
        pass
    assert calls == [("patch", "my_plan.json", True), ("inside",), ("unpatch",), ("patch", None, False), ("unpatch",)]


def test_plan_digest_follows_the_plan_rules_not_the_file(monkeypatch, tmp_path):
    import dataclasses

    from longinfer.plans import default_plan_for, schema

    default = LonginferMethod()
    assert default.describe() == {"plan": "default", "plan_digest": schema.default_rule_digest()}
    # a new default (session 14: shared KV-group columns) is a different method for resumed runs
    monkeypatch.setattr(schema, "DEFAULT_PATTERN_CONFIG",
                        dataclasses.replace(schema.DEFAULT_PATTERN_CONFIG, group_columns=False, group_columns_below=0))
    assert LonginferMethod().plan_digest() != default.plan_digest()
    shape = {"num_layers": 2, "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 64}
    plan = default_plan_for(shape, model_id="one")
    plan.save(tmp_path / "a.json")
    dataclasses.replace(plan, model_id="other").save(tmp_path / "b.json")  # provenance only
    default_plan_for(shape, tau=0.8).save(tmp_path / "c.json")
    digests = [LonginferMethod(tmp_path / name).describe()["plan_digest"] for name in ("a.json", "b.json", "c.json")]
    assert digests[0] == digests[1] == schema.layers_digest(plan) != digests[2]
