"""Capturing post-RoPE q/k: values recomputed by hand, dense output unchanged, state restored."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from longinfer.eval.capture import CAPTURE_IMPLEMENTATION, capture_qk, capturing
from tests.test_eval_fixtures import make_tiny_llama

VOCAB = 97


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(VOCAB, seed=3)


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, VOCAB, (2, 150), generator=torch.Generator().manual_seed(0))


def _qkv_by_hand(model, input_ids, layer):
    """q/k/v of ``layer`` from the layer's input hidden states: norm, projections, RoPE on q/k."""
    with torch.no_grad():
        hidden = model(input_ids=input_ids, output_hidden_states=True, use_cache=False).hidden_states[layer]
        block = model.model.layers[layer]
        attn = block.self_attn
        normed = block.input_layernorm(hidden)
        bsz, n, _ = normed.shape
        d = attn.head_dim
        q = attn.q_proj(normed).view(bsz, n, -1, d).transpose(1, 2)
        k = attn.k_proj(normed).view(bsz, n, -1, d).transpose(1, 2)
        v = attn.v_proj(normed).view(bsz, n, -1, d).transpose(1, 2)
        positions = torch.arange(n)[None].expand(bsz, -1)
        cos, sin = model.model.rotary_emb(normed, positions)
        return *apply_rotary_pos_emb(q, k, cos, sin), v


def test_captured_qk_match_hand_computation(model, input_ids):
    captured = capture_qk(model, input_ids)
    with_values = capture_qk(model, input_ids, layers=[1], values=True)
    assert sorted(captured) == [0, 1]
    for layer in (0, 1):
        q, k, v = _qkv_by_hand(model, input_ids, layer)
        assert captured[layer].q.shape == (2, 4, 150, 8) and captured[layer].k.shape == (2, 2, 150, 8)
        torch.testing.assert_close(captured[layer].q, q, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(captured[layer].k, k, atol=1e-5, rtol=1e-5)
        assert captured[layer].sm_scale == pytest.approx(8**-0.5)
        assert captured[layer].masked is False and captured[layer].q_rows is None
        assert captured[layer].v is None  # values only on request
    torch.testing.assert_close(with_values[1].v, v, atol=1e-5, rtol=1e-5)
    assert torch.equal(with_values[1].k, captured[1].k)


def test_dense_output_unchanged_and_implementation_restored(model, input_ids):
    with torch.no_grad():
        expected = model(input_ids=input_ids, use_cache=False).logits
        with capturing(model, layers=[1]) as stored:
            assert model.config._attn_implementation == CAPTURE_IMPLEMENTATION
            got = model(input_ids=input_ids, use_cache=False).logits
    assert sorted(stored) == [1]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert model.config._attn_implementation == "sdpa"


def test_rows_subset_dtype_and_callback(model, input_ids):
    full = capture_qk(model, input_ids, layers=[0])[0]
    rows = torch.tensor([0, 17, 149])
    part = capture_qk(model, input_ids, layers=[0], query_rows=rows, store_dtype=torch.float64, store_device="cpu")[0]
    assert part.q.dtype == torch.float64 and part.q.shape == (2, 4, 3, 8)
    torch.testing.assert_close(part.q, full.q[:, :, rows].double())
    torch.testing.assert_close(part.k, full.k.double())
    assert part.q_rows.tolist() == rows.tolist()
    seen = []
    stored = capture_qk(model, input_ids, on_layer=lambda layer: seen.append((layer.layer, layer.k.sum().item())))
    assert stored == {} and [s[0] for s in seen] == [0, 1]
    assert seen[0][1] == pytest.approx(full.k.sum().item(), rel=1e-5)


def test_errors_restore_the_model(model, input_ids):
    def boom(layer):
        raise RuntimeError("analysis failed")

    with pytest.raises(RuntimeError, match="analysis failed"):
        capture_qk(model, input_ids, on_layer=boom)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="out of range"):
        capture_qk(model, input_ids, layers=[2])
    with pytest.raises(ValueError, match="query_rows"):
        capture_qk(model, input_ids, query_rows=torch.tensor([150]))
    with pytest.raises(TypeError, match="input_ids"):
        capture_qk(model, input_ids.float())
    with pytest.raises(RuntimeError, match="nested"), capturing(model), capturing(model):
        pass
    assert model.config._attn_implementation == "sdpa"


def test_capture_function_is_inert_outside_a_session(model, input_ids):
    """Left registered, the implementation refuses to run rather than silently doing something."""
    capture_qk(model, input_ids, layers=[0])
    other = make_tiny_llama(VOCAB, seed=4)
    other.set_attn_implementation(CAPTURE_IMPLEMENTATION)
    with pytest.raises(RuntimeError, match="only usable inside"), torch.no_grad():
        other(input_ids=input_ids, use_cache=False)
