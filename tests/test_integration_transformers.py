"""longinfer attention inside transformers models: tiny random models of every supported family.

Every test compares against the same model run with a stock transformers implementation (``sdpa``,
``eager`` for Gemma 2) or against the same model run sequence by sequence. Kernels run in the
Triton interpreter on CPU, so sequences are short (a few hundred tokens) and models have 1-2 layers.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from longinfer.integrations import transformers as lt  # noqa: E402
from longinfer.plans import HeadPlan, LayerPlan, Plan, uniform_plan  # noqa: E402

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
    pad_token_id=0,
)
WINDOW = 64  # sliding windows shorter than the test sequences, so they matter
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(query_pre_attn_scalar=64, sliding_window=WINDOW)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(query_pre_attn_scalar=64, sliding_window=WINDOW,
                    layer_types=["sliding_attention", "full_attention"])),
}
# Every diagonal of any test sequence kept: the mask is the full causal mask, so outputs equal dense.
NEAR_DENSE_VS = dict(num_vertical=4, num_slash=512, sink=4, local=16, last_q=64)
NEAR_DENSE_A = dict(sink=0, window=4096)
SPARSE_VS = dict(num_vertical=8, num_slash=8, sink=4, local=8, last_q=64)


def make_model(family: str, **overrides):
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    model.set_attn_implementation(stock_implementation(family))
    return model


def stock_implementation(family: str) -> str:
    return "eager" if family == "gemma2" else "sdpa"  # transformers refuses sdpa with Gemma 2's softcap


def token_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def mixed_plan(config, first: tuple[str, dict], second: tuple[str, dict], *, per_kv_group: bool,
               dense_below: int = 0) -> Plan:
    """Heads alternate between two head plans: by KV group (heads 0,1 | 2,3) or within each group."""
    a, b = HeadPlan.from_params(*first), HeadPlan.from_params(*second)
    heads = (a, a, b, b) if per_kv_group else (a, b, a, b)
    layer = LayerPlan(heads=heads, dense_below=dense_below)
    return Plan(model_id="tiny", num_layers=config.num_hidden_layers, num_q_heads=4, num_kv_heads=2, head_dim=64,
                layers=(layer,) * config.num_hidden_layers)


@contextlib.contextmanager
def patched(model, plan, **kwargs):
    lt.patch(model, plan, **kwargs)
    try:
        yield
    finally:
        lt.unpatch(model)


def logits(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_near_dense_plan_matches_dense_logits(family):
    model = make_model(family)
    ids = token_ids(1, 128)
    reference = logits(model, ids)
    plan = mixed_plan(model.config, ("vertical_slash", NEAR_DENSE_VS), ("a_shape", NEAR_DENSE_A), per_kv_group=True)
    with patched(model, plan):
        out = logits(model, ids)
        stats = lt.attention_stats(model)
    torch.testing.assert_close(out, reference, atol=2e-5, rtol=1e-4)
    assert stats.calls == 2 and stats.density == pytest.approx(1.0)
    windowed = {"qwen2": 1, "mistral": 2, "gemma2": 2, "gemma3": 1}.get(family, 0)
    assert stats.window_calls == windowed  # Gemma 2: softcap -> exact dense in both layers
    assert stats.sparse_calls == 2 - windowed
    assert model.config._attn_implementation == stock_implementation(family)


def test_heads_of_partial_kv_groups_match_dense():
    model = make_model("qwen3", num_hidden_layers=1)
    ids = token_ids(1, 128)
    reference = logits(model, ids)
    plan = mixed_plan(model.config, ("vertical_slash", NEAR_DENSE_VS), ("a_shape", NEAR_DENSE_A), per_kv_group=False)
    with patched(model, plan):
        out = logits(model, ids)
    torch.testing.assert_close(out, reference, atol=2e-5, rtol=1e-4)


def test_head_buckets_keep_gqa_layout():
    vs, a = HeadPlan.from_params("vertical_slash", {}), HeadPlan.from_params("a_shape", {})
    # 6 query heads, 2 KV heads (groups 0-2, 3-5); vs takes 2 heads of group 0 and 3 of group 1
    layer = LayerPlan(heads=(vs, a, vs, vs, vs, vs))
    buckets = lt.head_buckets(layer, num_kv_heads=2)
    summary = [(b.head.pattern, b.q_heads, b.kv_heads, b.group_size) for b in buckets]
    assert summary == [
        ("vertical_slash", (0, 2), (0,), 2),
        ("vertical_slash", (3, 4, 5), (1,), 3),
        ("a_shape", (1,), (0,), 1),
    ]
    uniform = lt.head_buckets(LayerPlan(heads=(vs,) * 6), num_kv_heads=2)
    assert [(b.q_heads, b.kv_heads) for b in uniform] == [((0, 1, 2, 3, 4, 5), (0, 1))]


def test_sparse_plan_runs_differs_and_stays_finite():
    model = make_model("llama")
    ids = token_ids(1, 192)
    reference = logits(model, ids)
    plan = mixed_plan(model.config, ("vertical_slash", SPARSE_VS), ("block_sparse", dict(num_blocks=2)),
                      per_kv_group=True)
    with patched(model, plan):
        out = logits(model, ids)
        stats = lt.attention_stats(model)
    assert torch.isfinite(out).all()
    assert (out - reference).abs().max() > 1e-2
    assert stats.sparse_calls == 2 and 0.05 < stats.density < 0.9
    # the first 64 rows lie inside the always-kept sinks/local band/diagonal block: still exact
    torch.testing.assert_close(out[:, :8], reference[:, :8], atol=2e-5, rtol=1e-4)


def test_triton_and_torch_backends_agree():
    model = make_model("llama", num_hidden_layers=1)
    ids = token_ids(1, 128)
    plan = uniform_plan(model.config, "vertical_slash", SPARSE_VS)
    with patched(model, plan, backend="triton"):
        triton_out = logits(model, ids)
    with patched(model, plan, backend="torch"):
        torch_out = logits(model, ids)
    torch.testing.assert_close(triton_out, torch_out, atol=2e-5, rtol=1e-4)


def test_tile_keys_plan_through_the_patched_model():
    """A tile-keys plan runs through the integration: with a threshold no probability falls under it equals
    dense; with a real threshold (and 4 pooled queries per tile in one KV group) it is sparse, finite, and the
    Triton and torch paths agree."""
    model = make_model("llama")
    ids = token_ids(1, 256)
    reference = logits(model, ids)
    small = dict(local=32, sink=2, block_size=32, pool=32)
    with patched(model, uniform_plan(model.config, "tile_keys", {**small, "threshold": 1e-12})):
        torch.testing.assert_close(logits(model, ids), reference, atol=2e-5, rtol=1e-4)
        assert lt.attention_stats(model).density == pytest.approx(1.0)
    plan = mixed_plan(model.config, ("tile_keys", {**small, "threshold": 2.0}),
                      ("tile_keys", {**small, "threshold": 1.0, "queries": 4}), per_kv_group=True)
    outputs = {}
    for backend in ("triton", "torch"):
        with patched(model, plan, backend=backend):
            outputs[backend] = logits(model, ids)
            stats = lt.attention_stats(model)
        assert stats.sparse_calls == 2 and 0.05 < stats.density < 0.9
    assert torch.isfinite(outputs["torch"]).all() and (outputs["torch"] - reference).abs().max() > 1e-2
    torch.testing.assert_close(outputs["triton"], outputs["torch"], atol=2e-5, rtol=1e-4)


# the per-sequence split does not depend on the backend: one case runs on the (faster) torch path. With
# question rows (the last queries estimate too), a right-padded sequence's are its own last tokens, not padding.
QUESTION_VS = {**SPARSE_VS, "last_q": 16, "query_sampling": "strided", "question_from": 64}


@pytest.mark.parametrize("family, side, backend, params", [
    ("llama", "left", "triton", SPARSE_VS), ("llama", "right", "torch", SPARSE_VS),
    ("mistral", "left", "triton", SPARSE_VS), ("llama", "right", "triton", QUESTION_VS)])
def test_padded_batch_equals_each_sequence_alone(family, side, backend, params):
    model = make_model(family)
    lengths = (128, 80)
    plan = uniform_plan(model.config, "vertical_slash", params)
    sequences = [token_ids(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    batch = torch.zeros(2, max(lengths), dtype=torch.long)
    mask = torch.zeros_like(batch)
    for b, seq in enumerate(sequences):
        where = slice(batch.shape[1] - seq.numel(), None) if side == "left" else slice(0, seq.numel())
        batch[b, where], mask[b, where] = seq, 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with patched(model, plan, backend=backend):
        padded = logits(model, batch, attention_mask=mask, position_ids=positions)
        alone = [logits(model, seq[None]) for seq in sequences]
    for b in range(len(sequences)):
        valid = mask[b].bool()
        torch.testing.assert_close(padded[b, valid], alone[b][0], atol=5e-5, rtol=1e-4)


def greedy(model, ids, new_tokens, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                             eos_token_id=None, **kwargs)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_generate_after_sparse_prefill_decodes_dense(family):
    """generate(): sparse prefill, then dense decode steps. Reference: the same sparse prefill, then
    decoding with the stock implementation over the same cache."""
    model = make_model(family)
    ids = token_ids(1, 128)
    plan = uniform_plan(model.config, "vertical_slash", SPARSE_VS)
    with patched(model, plan):
        generated = greedy(model, ids, 4)
        stats = lt.attention_stats(model)
        cache = transformers.DynamicCache(config=model.config)
        with torch.no_grad():
            next_logits = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
    assert stats.sparse_calls + stats.window_calls == 2 and stats.decode_calls == 2 * 3
    expected = [next_logits.argmax(-1)]
    with torch.no_grad():
        for _ in range(3):
            step = model(expected[-1][:, None], past_key_values=cache, use_cache=True).logits[:, -1]
            expected.append(step.argmax(-1))
    assert generated.tolist() == torch.stack(expected, 1).tolist()


def test_padded_generate_matches_stock_generate():
    model = make_model("qwen2")
    ids = token_ids(2, 128)
    mask = torch.ones_like(ids)
    mask[1, :32] = 0  # left padding
    ids[1, :32] = 0
    reference = greedy(model, ids, 4, attention_mask=mask)
    plan = mixed_plan(model.config, ("vertical_slash", NEAR_DENSE_VS), ("a_shape", NEAR_DENSE_A), per_kv_group=True)
    with patched(model, plan):
        out = greedy(model, ids, 4, attention_mask=mask)
    assert out.tolist() == reference.tolist()


def run_chunks(model, ids, cut: int) -> torch.Tensor:
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        first = model(ids[:, :cut], past_key_values=cache, use_cache=True).logits
        second = model(ids[:, cut:], past_key_values=cache, use_cache=True).logits
    return torch.cat([first, second], 1)


def test_chunk_after_cached_prefix_runs_sparse_like_one_shot():
    """One layer: the chunk's queries, keys and estimation queries equal the one-shot prefill's, so
    a sparse chunk over cached + new keys must give the one-shot logits for its rows."""
    model = make_model("llama", num_hidden_layers=1)
    ids = token_ids(1, 192)
    plan = uniform_plan(model.config, "vertical_slash", SPARSE_VS)
    with patched(model, plan):
        one_shot = logits(model, ids)
        lt.reset_stats(model)
        chunked = run_chunks(model, ids, 128)
        stats = lt.attention_stats(model)
    assert stats.sparse_calls == 2  # the prefix and the chunk (64 queries over 192 keys)
    torch.testing.assert_close(chunked[:, 128:], one_shot[:, 128:], atol=2e-5, rtol=1e-4)
    assert (one_shot - logits(model, ids)).abs().max() > 1e-2  # and the plan is really sparse


def test_chunked_prefill_with_near_dense_plan_matches_dense():
    model = make_model("mistral")  # a sliding-window layer reads the cache's window tail too
    ids = token_ids(1, 160)
    reference = logits(model, ids)
    plan = uniform_plan(model.config, "vertical_slash", NEAR_DENSE_VS)
    with patched(model, plan):
        one_shot = logits(model, ids)
        chunked = run_chunks(model, ids, 96)
    torch.testing.assert_close(one_shot, reference, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(chunked, reference, atol=2e-5, rtol=1e-4)


def test_dense_below_threshold_runs_dense():
    model = make_model("llama")
    ids = token_ids(1, 128)
    plan = uniform_plan(model.config, "vertical_slash", SPARSE_VS, dense_below=129)
    with patched(model, plan):
        out = logits(model, ids)
        stats = lt.attention_stats(model)
    assert stats.dense_calls == 2 and stats.sparse_calls == 0
    torch.testing.assert_close(out, logits(model, ids), atol=2e-5, rtol=1e-4)


def test_gemma2_without_softcap_runs_sparse():
    model = make_model("gemma2", attn_logit_softcapping=None)
    ids = token_ids(1, 128)
    reference = logits(model, ids)
    with patched(model, uniform_plan(model.config, "vertical_slash", NEAR_DENSE_VS)):
        out = logits(model, ids)
        stats = lt.attention_stats(model)
    assert stats.sparse_calls == 1 and stats.window_calls == 1  # full layer sparse, sliding layer windowed
    torch.testing.assert_close(out, reference, atol=2e-5, rtol=1e-4)


def test_unpatch_restores_previous_implementation_and_outputs():
    model = make_model("llama")
    model.set_attn_implementation("eager")
    ids = token_ids(1, 96)
    before = logits(model, ids)
    plan = lt.patch(model, uniform_plan(model.config, "vertical_slash", SPARSE_VS))
    assert lt.plan_of(model) is plan and model.config._attn_implementation == "longinfer"
    assert "_longinfer" not in json.dumps(model.config.to_dict())  # nothing stored in the config
    lt.unpatch(model)
    assert model.config._attn_implementation == "eager" and lt.plan_of(model) is None
    assert not any(hasattr(m, "_longinfer_runtime") for m in model.modules())
    torch.testing.assert_close(logits(model, ids), before)
    with pytest.raises(ValueError, match="not patched"):
        lt.unpatch(model)


def test_from_pretrained_with_longinfer_implementation(tmp_path, caplog):
    model = make_model("llama")
    model.save_pretrained(tmp_path)
    ids = token_ids(1, 96)
    reference = logits(model, ids)
    lt.register()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="longinfer").eval()
    with caplog.at_level("INFO", logger="longinfer.integrations.transformers"):
        out = logits(loaded, ids)  # no plan attached: default plan (dense below 16K keys)
    assert "default plan" in caplog.text
    torch.testing.assert_close(out, reference, atol=2e-5, rtol=1e-4)
    lt.patch(loaded, uniform_plan(loaded.config, "vertical_slash", SPARSE_VS))
    assert lt.attention_stats(loaded).calls == 0
    lt.unpatch(loaded)
    assert loaded.config._attn_implementation == "sdpa"


def test_plan_from_file_and_errors(tmp_path):
    model = make_model("llama")
    path = tmp_path / "plan.json"
    uniform_plan(model.config, "a_shape", NEAR_DENSE_A).save(path)
    with patched(model, path):
        assert lt.plan_of(model).layers[0].heads[0].pattern == "a_shape"
    other = uniform_plan({"num_layers": 2, "num_q_heads": 8, "num_kv_heads": 2, "head_dim": 64}, "a_shape")
    with pytest.raises(ValueError, match="num_q_heads: plan has 8, model has 4"):
        lt.patch(model, other)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        lt.patch(model, tmp_path / "missing.json")
    with pytest.raises(TypeError, match="plan must be"):
        lt.patch(model, {"layers": []})
    with pytest.raises(ValueError, match="backend must be one of"):
        lt.patch(model, None, backend="cuda")
    assert model.config._attn_implementation == "sdpa"  # failed patches change nothing


def test_default_plan_is_logged(caplog):
    model = make_model("llama")
    with caplog.at_level("INFO", logger="longinfer.integrations.transformers"):
        plan = lt.patch(model)
    lt.unpatch(model)
    assert plan.search["method"] == "default" and "default plan" in caplog.text
    # the long rule as it is: a floor of diagonals only, no "0 columns"
    assert ("at least 3000 diagonals (diagonals for 4.58% of the query rows, if more) per head from 65536 query rows"
            in caplog.text)
    assert "0 columns" not in caplog.text


def test_packed_position_ids_are_refused():
    model = make_model("llama")
    ids = token_ids(1, 96)
    positions = torch.cat([torch.arange(48), torch.arange(48)])[None]
    plan = uniform_plan(model.config, "a_shape", NEAR_DENSE_A)
    with patched(model, plan), pytest.raises(NotImplementedError, match="packed sequences"):
        logits(model, ids, position_ids=positions)


def test_padding_inside_a_sequence_is_refused():
    model = make_model("llama")
    ids = token_ids(2, 96)
    mask = torch.ones_like(ids)
    mask[0, 40:50] = 0
    plan = uniform_plan(model.config, "a_shape", NEAR_DENSE_A)
    with patched(model, plan), pytest.raises(ValueError, match="padding between its tokens"):
        logits(model, ids, attention_mask=mask)


def sparse_selections(nq: int, nk: int):
    from longinfer.patterns import BlockSparseConfig, VerticalSlashConfig, get_pattern

    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 4, nq, 64, generator=gen), torch.randn(1, 2, nk, 64, generator=gen)
    for name, config in (("vertical_slash", VerticalSlashConfig(num_vertical=16, num_slash=16, sink=4, local=16)),
                         ("block_sparse", BlockSparseConfig(num_blocks=3))):
        spec = get_pattern(name)
        yield spec, spec.estimate(q, k, config)


@pytest.mark.parametrize("nq, nk", [(300, 300), (200, 520)])
def test_torch_path_tile_masks_equal_reference_masks(nq, nk):
    for spec, selection in sparse_selections(nq, nk):
        build = lt._selection_rows(spec, selection)
        for first, stop in ((nk - nq, nk - nq + 70), (nk - 130, nk)):
            rows = torch.arange(first, stop)
            assert torch.equal(build(rows, first, stop - 1), spec.reference_mask(selection, rows)), spec.name


def test_sampled_density_is_close_to_the_exact_density():
    for nq, nk in ((1024, 1024), (256, 1024)):
        for spec, selection in sparse_selections(nq, nk):
            estimate = float(lt._sampled_density(lt._counts_of_mask(lt._selection_rows(spec, selection), nk), nq, nk,
                                                  torch.device("cpu")))
            mask = spec.reference_mask(selection, torch.arange(nk - nq, nk))
            exact = mask.sum().item() / (mask.shape[0] * mask.shape[1]) / sum(range(nk - nq + 1, nk + 1))
            assert estimate == pytest.approx(exact, rel=0.15), spec.name


@pytest.mark.parametrize("nq, nk, window", [(5, 5, None), (3, 10, None), (10, 10, 4), (4, 12, 6), (6, 12, 20)])
def test_causal_pair_count(nq, nk, window):
    rows = torch.arange(nk - nq, nk)[:, None]
    keys = torch.arange(nk)[None, :]
    mask = keys <= rows
    if window is not None:
        mask &= rows - keys < window
    assert lt._causal_pairs(nq, nk, window) == int(mask.sum())


def test_static_cache_is_refused_with_the_fix():
    model = make_model("llama", num_hidden_layers=1)
    with patched(model, uniform_plan(model.config, "a_shape", NEAR_DENSE_A)), \
            pytest.raises(NotImplementedError, match="cache_implementation='static'"):
        greedy(model, token_ids(1, 80), 2, cache_implementation="static")


# --------------------------------------------------------------------------- one index per KV group


def test_head_buckets_share_whole_kv_groups_only():
    vs, a = HeadPlan.from_params("vertical_slash", {}), HeadPlan.from_params("a_shape", {})
    heads = (vs, vs, vs, vs, a, vs)  # 6 query heads, 2 KV groups: group 0 all vs, group 1 mixed
    shared = lt.head_buckets(LayerPlan(heads=heads, share_kv_groups=True), num_kv_heads=2)
    assert [(b.q_heads, b.kv_heads, b.per_kv_group) for b in shared] == [
        ((3, 5), (1,), False), ((0, 1, 2), (0,), True), ((4,), (1,), False),
    ]
    assert not any(b.per_kv_group for b in lt.head_buckets(LayerPlan(heads=heads), num_kv_heads=2))


def _union_reference(q, k, v, layer: LayerPlan, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``layer`` from per-query-head estimates (with ``share_kv_groups``: OR-ed over each KV
    group whose heads share a plan, what the flag promises), by the reference masked attention; and that mask."""
    from longinfer.ops.reference import masked_attention
    from longinfer.patterns import get_pattern

    hq, hkv, n = q.shape[1], k.shape[1], k.shape[2]
    group = hq // hkv
    masks = []
    for h, head in enumerate(layer.heads):
        spec = get_pattern(head.pattern)
        selection = spec.estimate(q[:, h:h + 1], k[:, h // group:h // group + 1], head.config, sm_scale=scale)
        masks.append(spec.reference_mask(selection, torch.arange(n)).expand(1, 1, n, n))
    mask = torch.cat(masks, 1)
    for kv in range(hkv):
        members = slice(kv * group, (kv + 1) * group)
        if layer.share_kv_groups and len(set(layer.heads[members])) == 1:
            mask[:, members] = mask[:, members].any(1, keepdim=True)
    return masked_attention(q, k, v, mask, sm_scale=scale), mask


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_shared_kv_group_index_is_the_union_of_its_heads(backend):
    """8 query heads, 2 KV heads: group 0 shares one vertical-slash plan (one union index), group 1
    mixes vertical-slash and block-sparse (per-head indices). The layer equals the reference attention
    under per-head masks OR-ed over group 0, and its density is at least the unshared layer's."""
    gen = torch.Generator().manual_seed(3)
    n, scale = 256, 64**-0.5
    q = torch.randn(1, 8, n, 64, generator=gen)
    k, v = torch.randn(1, 2, n, 64, generator=gen), torch.randn(1, 2, n, 64, generator=gen)
    vs = HeadPlan.from_params("vertical_slash", SPARSE_VS)
    bs = HeadPlan.from_params("block_sparse", {"num_blocks": 2})
    heads = (vs,) * 4 + (vs, bs, vs, vs)
    densities = {}
    for share in (True, False):
        layer = LayerPlan(heads=heads, share_kv_groups=share)
        plan = Plan(model_id="tiny", num_layers=1, num_q_heads=8, num_kv_heads=2, head_dim=64, layers=(layer,))
        runtime = lt.LayerRuntime.build(plan, 0, backend)
        out = lt._sparse_attention(lt._CallContext(runtime, backend, scale, None, None), q, k, v)
        expected, mask = _union_reference(q, k, v, layer, scale)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
        exact = mask.sum().item() / (8 * lt._causal_pairs(n, n))
        densities[share] = float(runtime.stats.kept_sparse) / runtime.stats.total_pairs
        assert densities[share] == pytest.approx(exact, rel=0.15)
    assert densities[True] > densities[False]


def gqa_plan(config, params: dict, *, share: bool) -> Plan:
    return uniform_plan(config, "vertical_slash", params, model_id="tiny", share_kv_groups=share)


@pytest.mark.parametrize("kv_heads", [2, 1])  # GQA ratios 2 and 4
def test_near_dense_plan_with_shared_kv_groups_matches_dense(kv_heads):
    model = make_model("llama", num_hidden_layers=1, num_key_value_heads=kv_heads)
    ids = token_ids(1, 128)
    reference = logits(model, ids)
    with patched(model, gqa_plan(model.config, NEAR_DENSE_VS, share=True), backend="triton"):
        out = logits(model, ids)
        stats = lt.attention_stats(model)
    torch.testing.assert_close(out, reference, atol=2e-5, rtol=1e-4)
    assert stats.sparse_calls == 1 and stats.density == pytest.approx(1.0)


def test_sparse_plan_with_shared_kv_groups_keeps_more_keys_and_backends_agree():
    model = make_model("llama", num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1)
    ids = token_ids(1, 192)
    reference = logits(model, ids)
    runs = {}
    for share, backend in ((True, "triton"), (True, "torch"), (False, "torch")):
        with patched(model, gqa_plan(model.config, SPARSE_VS, share=share), backend=backend):
            runs[share, backend] = (logits(model, ids), lt.attention_stats(model).density)
    (shared, shared_density), (torch_shared, torch_density), (per_head, per_head_density) = runs.values()
    torch.testing.assert_close(shared, torch_shared, atol=2e-5, rtol=1e-4)
    assert shared_density == pytest.approx(torch_density)
    assert per_head_density < shared_density < 1.0  # the union adds keys, still sparse
    error_shared = (shared - reference).abs().max()
    error_per_head = (per_head - reference).abs().max()
    assert 0 < error_shared <= error_per_head  # more of the true attention kept: closer to dense


# --------------------------------------------------------------------------- dense rows at the prompt's end


@pytest.mark.parametrize("backend, share", [("triton", False), ("torch", False), ("triton", True)])
@pytest.mark.parametrize("prefix", [0, 96])  # one-shot prefill, and a chunk after a cached prefix
def test_dense_last_rows_are_dense_and_the_rest_stays_sparse(backend, share, prefix):
    """With ``dense_last=40`` the last 40 query rows, rounded out to whole 64-row tiles, equal dense
    causal attention and every other row equals the sparse layer without the option; density counts
    the tail's rows as fully kept."""
    gen = torch.Generator().manual_seed(5)
    nq, dense_last, scale = 200, 40, 64**-0.5  # 200 rows: not a multiple of the 64-row tile
    # one-shot: rows from position 128 (the tile holding position 160); after 96 cached: from 256 exactly
    tail = {0: 72, 96: 40}[prefix]
    q = torch.randn(2, 4, nq, 64, generator=gen)
    k, v = torch.randn(2, 2, prefix + nq, 64, generator=gen), torch.randn(2, 2, prefix + nq, 64, generator=gen)
    heads = (HeadPlan.from_params("vertical_slash", SPARSE_VS),) * 4
    outs, densities = {}, {}
    for option in (0, dense_last):
        plan = Plan(model_id="tiny", num_layers=1, num_q_heads=4, num_kv_heads=2, head_dim=64,
                    layers=(LayerPlan(heads=heads, dense_last=option, share_kv_groups=share),))
        runtime = lt.LayerRuntime.build(plan, 0, backend)
        assert plan.layers[0].dense_rows(nq, prefix + nq) == (tail if option else 0)
        outs[option] = lt._sparse_attention(lt._CallContext(runtime, backend, scale, None, None), q, k, v)
        densities[option] = float(runtime.stats.kept_sparse) / runtime.stats.total_pairs
    dense = lt._masked_attention(q, k, v, scale, lt._causal_rows(None), None)
    torch.testing.assert_close(outs[dense_last][:, :, nq - tail:], dense[:, :, nq - tail:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outs[dense_last][:, :, :nq - tail], outs[0][:, :, :nq - tail], atol=0, rtol=0)
    assert (outs[0][:, :, nq - tail:] - dense[:, :, nq - tail:]).abs().max() > 1e-2  # the option changed them
    share = lt._causal_pairs(tail, prefix + nq) / lt._causal_pairs(nq, prefix + nq)
    assert densities[dense_last] == pytest.approx(densities[0] * (1 - share) + share)


def test_dense_last_covering_the_whole_call_runs_dense():
    model = make_model("llama", num_hidden_layers=1)
    ids = token_ids(1, 100)
    reference = logits(model, ids)
    plan = uniform_plan(model.config, "vertical_slash", SPARSE_VS, model_id="tiny", dense_last=100)
    with patched(model, plan, backend="torch"):
        out = logits(model, ids)
        stats = lt.attention_stats(model)
    torch.testing.assert_close(out, reference, atol=2e-5, rtol=1e-4)
    assert stats.sparse_calls == 0 and stats.dense_calls == 1


# --------------------------------------------------------------------------- repeated calls from graphs


@pytest.mark.parametrize("dense_last", [0, 16])
def test_layers_sharing_a_plan_replay_one_recorded_call_with_the_same_results(dense_last):
    """Three layers with one plan: layer 0 eager, layer 1 recorded, layer 2 replayed (a stand-in for the
    CUDA graph, see tests/test_graphs.py); logits and density equal the eager run exactly."""
    from tests.test_graphs import StandInCapture

    model = make_model("llama", num_hidden_layers=3)
    ids = token_ids(2, 160)
    plan = uniform_plan(model.config, "vertical_slash", SPARSE_VS, model_id="tiny", dense_last=dense_last)
    results = {}
    for name, graphs in (("eager", False), ("graphs", lt.CallGraphs(capture=StandInCapture(), device_types=("cpu",)))):
        with patched(model, plan, backend="triton", cuda_graphs=graphs):
            results[name] = logits(model, ids), lt.attention_stats(model).density
            assert lt.attention_stats(model).graph_calls == (2 if graphs else 0)
        if graphs:
            assert (graphs.captures, graphs.replays) == (1, 2)
    torch.testing.assert_close(results["graphs"][0], results["eager"][0], atol=0, rtol=0)
    assert results["graphs"][1] == results["eager"][1]


def test_layers_with_different_plans_never_record():
    from tests.test_graphs import StandInCapture

    model = make_model("llama", num_hidden_layers=2)
    first = LayerPlan(heads=(HeadPlan.from_params("vertical_slash", SPARSE_VS),) * 4)
    second = LayerPlan(heads=(HeadPlan.from_params("vertical_slash", {**SPARSE_VS, "num_slash": 16}),) * 4)
    plan = Plan(model_id="tiny", num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=64, layers=(first, second))
    graphs = lt.CallGraphs(capture=StandInCapture(), device_types=("cpu",))
    with patched(model, plan, backend="triton", cuda_graphs=graphs):
        logits(model, token_ids(1, 128))
    assert graphs.captures == 0


def test_calls_above_the_graph_pair_limit_run_eagerly(monkeypatch):
    from tests.test_graphs import StandInCapture

    model = make_model("llama", num_hidden_layers=3)
    plan = uniform_plan(model.config, "vertical_slash", SPARSE_VS, model_id="tiny")
    ids = token_ids(1, 128)
    monkeypatch.setattr(lt, "GRAPH_MAX_PAIRS", lt._causal_pairs(128, 128) * 4 - 1)  # 4 heads: just above
    graphs = lt.CallGraphs(capture=StandInCapture(), device_types=("cpu",))
    with patched(model, plan, backend="triton", cuda_graphs=graphs):
        logits(model, ids)
    assert graphs.captures == 0
    monkeypatch.setattr(lt, "GRAPH_MAX_PAIRS", lt._causal_pairs(128, 128) * 4)
    with patched(model, plan, backend="triton", cuda_graphs=graphs):
        logits(model, ids)
    assert graphs.captures == 1


def test_layers_whose_estimate_syncs_with_the_host_never_record():
    """tile_keys reads counts on the host (its index width, the capped tiles): a CUDA graph capture would fail on
    the first read, so its layers run eagerly even when they share a plan; one such bucket makes the layer eager."""
    from tests.test_graphs import StandInCapture

    model = make_model("llama", num_hidden_layers=3)
    small = dict(local=32, sink=2, block_size=32, pool=32, threshold=2.0)
    for plan in (uniform_plan(model.config, "tile_keys", small, model_id="tiny"),
                 mixed_plan(model.config, ("vertical_slash", SPARSE_VS), ("tile_keys", small), per_kv_group=True)):
        graphs = lt.CallGraphs(capture=StandInCapture(), device_types=("cpu",))
        with patched(model, plan, backend="triton", cuda_graphs=graphs):
            logits(model, token_ids(1, 128))
            assert lt.attention_stats(model).sparse_calls == 3
        assert graphs.captures == 0
    with patched(model, uniform_plan(model.config, "vertical_slash", SPARSE_VS, model_id="tiny"),
                 backend="triton", cuda_graphs=graphs):
        logits(model, token_ids(1, 128))
    assert graphs.captures == 1


@pytest.mark.parametrize("dense_last, nq, nk", [(0, 130, 250), (16, 130, 250), (0, 128, 256)])
def test_vertical_slash_buckets_use_the_kernel_path_at_any_length(monkeypatch, dense_last, nq, nk):
    """The kernel (with its closed-form density) runs whether or not a tail applies and whatever Nk."""
    calls = []
    real = lt._run_vertical_slash_kernel
    monkeypatch.setattr(lt, "_run_vertical_slash_kernel", lambda *a, **kw: calls.append(a[-1]) or real(*a, **kw))
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, nq, 64, generator=gen)
    k, v = torch.randn(1, 2, nk, 64, generator=gen), torch.randn(1, 2, nk, 64, generator=gen)
    plan = Plan(model_id="tiny", num_layers=1, num_q_heads=4, num_kv_heads=2, head_dim=64,
                layers=(LayerPlan(heads=(HeadPlan.from_params("vertical_slash", SPARSE_VS),) * 4,
                                  dense_last=dense_last),))
    runtime = lt.LayerRuntime.build(plan, 0, "triton")
    lt._sparse_attention(lt._CallContext(runtime, "triton", 0.125, None, None), q, k, v)
    assert calls == [plan.layers[0].dense_from(nk)]


def test_attend_layer_runs_a_plan_layer_as_the_patched_model_does():
    """attend_layer on captured q/k/v equals the patched model's own call; its errors name the fix."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 150, 64, generator=gen)
    k, v = torch.randn(1, 2, 250, 64, generator=gen), torch.randn(1, 2, 250, 64, generator=gen)
    layer = LayerPlan(heads=(HeadPlan.from_params("vertical_slash", SPARSE_VS),) * 4, dense_last=40)
    plan = Plan(model_id="tiny", num_layers=1, num_q_heads=4, num_kv_heads=2, head_dim=64, layers=(layer,))
    runtime = lt.LayerRuntime.build(plan, 0, "triton")
    expected = lt._attend_contiguous(lt._CallContext(runtime, "triton", 0.125, None, None), q, k, v)
    torch.testing.assert_close(lt.attend_layer(plan, 0, q, k, v, backend="triton"), expected, atol=0, rtol=0)
    torch.testing.assert_close(lt.attend_layer(plan, 0, q, k, v, backend="torch"), expected, atol=2e-5, rtol=1e-4)
    dense = lt._masked_attention(q, k, v, 0.125, lt._causal_rows(None), None)
    assert (expected - dense).abs().max() > 1e-2  # sparse
    with pytest.raises(ValueError, match="the plan has"):
        lt.attend_layer(plan, 0, q[:, :2], k, v)
    with pytest.raises(ValueError, match="backend"):
        lt.attend_layer(plan, 0, q, k, v, backend="cuda")
