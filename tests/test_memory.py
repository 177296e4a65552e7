"""The long-context memory path (longinfer.memory) on tiny random transformers models, on CPU.

Every test compares against the same model run the plain way (one forward, full logits, a
``DynamicCache``), so chunking, logits selection and host caching must change memory only.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from longinfer import memory
from tests.benchmark_scripts import load_benchmark

VOCAB = 96
COMMON = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 1024,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    # layer 1 slides over 24 keys: its cache keeps a window, not the prompt
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              {"use_sliding_window": True, "sliding_window": 24, "max_window_layers": 1}),
    # four norms per layer, q/k norms inside attention, final logit softcap
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               {"query_pre_attn_scalar": 32, "sliding_window": 24, "final_logit_softcapping": 30.0,
                "layer_types": ["sliding_attention", "full_attention"]}),
}
TOL = {"atol": 2e-5, "rtol": 1e-4}


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Tiny matmuls: threads only contend (20 ms vs 0.1 ms per call on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(family: str = "llama", **overrides):
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    model.set_attn_implementation("sdpa")
    return model


def token_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def full_logits(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kwargs).logits


def one_shot_cache(model, ids):
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **{memory.cache_keyword(model): cache}, use_cache=True)
    return cache


def greedy(model, ids, new_tokens: int, **kwargs) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs)


# --------------------------------------------------------------------------------------------
# chunked_mlp


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chunked_mlp_gives_the_same_logits_and_restores_the_modules(family):
    model = make_model(family)
    ids = token_ids(2, 70)
    reference = full_logits(model, ids)
    layer = model.model.layers[0]
    originals = {name: child for name, child in layer.named_children()}
    keys = set(model.state_dict())
    with memory.chunked_mlp(model, 16) as chunked:
        assert chunked is model
        assert isinstance(layer.mlp, memory.SequenceChunked) and layer.mlp.module is originals["mlp"]
        wrapped_norms = {name for name, child in layer.named_children() if isinstance(child, memory.SequenceChunked)}
        assert wrapped_norms == {"mlp"} | {name for name in originals if name.endswith("norm")}
        assert not isinstance(layer.self_attn, memory.SequenceChunked)
        assert isinstance(model.model.norm, memory.SequenceChunked)
        out = full_logits(model, ids)
    torch.testing.assert_close(out, reference, **TOL)
    assert {name: child for name, child in layer.named_children()} == originals
    assert not any(isinstance(m, memory.SequenceChunked) for m in model.modules())
    assert set(model.state_dict()) == keys


def test_chunked_mlp_on_a_base_model():
    model = make_model()
    ids = token_ids(1, 40)
    with torch.no_grad():
        reference = model.model(ids).last_hidden_state
        with memory.chunked_mlp(model.model, 16):
            assert isinstance(model.model.norm, memory.SequenceChunked)
            out = model.model(ids).last_hidden_state
    torch.testing.assert_close(out, reference, **TOL)


def test_chunked_mlp_restores_after_an_exception_and_refuses_nesting():
    model = make_model()
    mlp = model.model.layers[1].mlp
    with pytest.raises(RuntimeError, match="boom"), memory.chunked_mlp(model, 8):
        with pytest.raises(ValueError, match="already inside chunked_mlp"), memory.chunked_mlp(model, 8):
            pass
        raise RuntimeError("boom")
    assert model.model.layers[1].mlp is mlp


def test_chunked_mlp_bounds_the_largest_intermediate():
    """The MLP's activation (width = intermediate size) and each norm's input exist per slice only."""
    model = make_model(num_hidden_layers=1)
    ids = token_ids(1, 100)
    largest = {"act": 0, "norm": 0}

    def record(kind):
        def hook(module, inputs, output):
            largest[kind] = max(largest[kind], output.numel() if kind == "act" else inputs[0].numel())
        return hook

    layer = model.model.layers[0]
    handles = [layer.mlp.act_fn.register_forward_hook(record("act")),
               layer.post_attention_layernorm.register_forward_hook(record("norm"))]
    full_logits(model, ids)
    unchunked = dict(largest)
    largest.update(act=0, norm=0)
    with memory.chunked_mlp(model, 16):
        full_logits(model, ids)
    for handle in handles:
        handle.remove()
    assert unchunked == {"act": 100 * 192, "norm": 100 * 64}
    assert largest == {"act": 16 * 192, "norm": 16 * 64}


def test_chunked_mlp_errors():
    model = make_model()
    with pytest.raises(ValueError, match="chunk_size must be >= 1"), memory.chunked_mlp(model, 0):
        pass
    with pytest.raises(TypeError, match="chunk_size must be an int"), memory.chunked_mlp(model, 4.0):
        pass
    with pytest.raises(ValueError, match="no decoder layers"), memory.chunked_mlp(torch.nn.Linear(2, 2), 4):
        pass

    class RouterBlock(torch.nn.Module):
        def forward(self, x):
            return x, x.sum(-1)

    with pytest.raises(TypeError, match="not a tensor"):
        memory.SequenceChunked(RouterBlock(), 4)(torch.zeros(1, 10, 3))
    with pytest.raises(TypeError, match="hidden states alone"):
        memory.SequenceChunked(torch.nn.Identity(), 4)(torch.zeros(1, 10, 3), torch.zeros(1))


# --------------------------------------------------------------------------------------------
# logits only where needed


class NoLogitsToKeep(transformers.LlamaForCausalLM):
    """A causal LM whose forward does not take ``logits_to_keep`` (as some older models)."""

    def forward(self, input_ids=None, **kwargs):
        return super().forward(input_ids, **kwargs)


def test_last_position_logits_with_and_without_logits_to_keep():
    model = make_model()
    ids = token_ids(2, 40)
    reference = full_logits(model, ids)[:, -1]
    with torch.no_grad():
        torch.testing.assert_close(memory.last_position_logits(model, ids), reference, **TOL)
        plain = NoLogitsToKeep(model.config).eval()
        plain.load_state_dict(model.state_dict())
        plain.set_attn_implementation("sdpa")
        torch.testing.assert_close(memory.last_position_logits(plain, ids), reference, **TOL)


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: the head's final softcap
def test_next_token_logprobs_match_the_full_logits(family):
    model = make_model(family)
    ids = token_ids(2, 50)
    expected = torch.log_softmax(full_logits(model, ids).float(), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    got = memory.next_token_logprobs(model, ids, chunk_size=13)
    assert got.shape == (2, 49) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, **TOL)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        memory.next_token_logprobs(model, ids[:, :1])


# --------------------------------------------------------------------------------------------
# prefill_in_chunks


def assert_same_cache(cache, reference) -> None:
    assert cache.get_seq_length() == reference.get_seq_length()
    assert len(cache.layers) == len(reference.layers)
    for layer, ref in zip(cache.layers, reference.layers):
        torch.testing.assert_close(layer.keys, ref.keys, **TOL)
        torch.testing.assert_close(layer.values, ref.values, **TOL)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("chunk", [16, 37])
def test_prefill_in_chunks_matches_one_shot(family, chunk):
    model = make_model(family)
    ids = token_ids(2, 90)
    cache, logits = memory.prefill_in_chunks(model, ids, chunk)
    assert logits.shape == (2, VOCAB)
    torch.testing.assert_close(logits, full_logits(model, ids)[:, -1], **TOL)
    assert_same_cache(cache, one_shot_cache(model, ids))


def test_prefill_in_chunks_then_generate_continues_like_generate():
    model = make_model("qwen2")
    ids = token_ids(1, 80)
    cache, _ = memory.prefill_in_chunks(model, ids[:, :-1], 24)
    continued = greedy(model, ids, 6, **{memory.cache_keyword(model): cache})
    assert continued.tolist() == greedy(model, ids, 6).tolist()
    assert cache.get_seq_length() == 80 + 5  # generate fed only the last prompt token and 5 new ones


def test_prefill_in_chunks_extends_a_cached_prefix():
    """A follow-up turn: the new tokens go through the cache of the first turn."""
    model = make_model()
    ids = token_ids(1, 100)
    cache, _ = memory.prefill_in_chunks(model, ids[:, :60], 25)
    cache, logits = memory.prefill_in_chunks(model, ids[:, 60:], 16, cache)
    torch.testing.assert_close(logits, full_logits(model, ids)[:, -1], **TOL)
    assert_same_cache(cache, one_shot_cache(model, ids))


def test_prefill_in_chunks_left_padded_batch():
    model = make_model()
    ids = token_ids(2, 64)
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    ids[1, :20] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    expected = full_logits(model, ids, attention_mask=mask, position_ids=positions)[:, -1]
    _, logits = memory.prefill_in_chunks(model, ids, 24, attention_mask=mask)
    torch.testing.assert_close(logits, expected, **TOL)
    with pytest.raises(ValueError, match="must cover the cached and the new tokens"):
        memory.prefill_in_chunks(model, ids, 24, attention_mask=mask[:, 1:])


def test_prefill_in_chunks_errors():
    model = make_model()
    ids = token_ids(1, 10)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        memory.prefill_in_chunks(model, ids, 0)
    with pytest.raises(ValueError, match=r"shape \[batch, tokens\]"):
        memory.prefill_in_chunks(model, ids[0], 4)
    with pytest.raises(TypeError, match="integer token ids"):
        memory.prefill_in_chunks(model, ids.float(), 4)
    with pytest.raises(TypeError, match="transformers Cache"):
        memory.prefill_in_chunks(model, ids, 4, cache={})


def test_memory_path_composes_with_sparse_attention():
    """chunked_mlp + prefill_in_chunks + host_cache on a longinfer-patched model: every chunk runs
    the sparse path over cached + new keys, and with a plan keeping every diagonal the result is dense."""
    lt = pytest.importorskip("longinfer.integrations.transformers")
    from longinfer.plans import uniform_plan

    model = make_model()
    ids = token_ids(1, 192)
    reference = full_logits(model, ids)[:, -1]
    near_dense = {"num_vertical": 4, "num_slash": 512, "sink": 4, "local": 16, "last_q": 64}
    lt.patch(model, uniform_plan(model.config, "vertical_slash", near_dense), backend="torch")
    try:
        with memory.chunked_mlp(model, 32):
            _, logits = memory.prefill_in_chunks(model, ids, 64, memory.host_cache(model))
        stats = lt.attention_stats(model)
    finally:
        lt.unpatch(model)
    assert stats.sparse_calls == 3 * 2  # 3 chunks x 2 layers, each over the cached prefix
    torch.testing.assert_close(logits, reference, **TOL)


# --------------------------------------------------------------------------------------------
# host cache


def test_host_cache_round_trip_and_generate():
    model = make_model("qwen2")  # layer 0 full attention, layer 1 sliding window
    ids = token_ids(2, 75)
    cache = memory.host_cache(model)
    assert [type(layer).__name__ for layer in cache.layers] == ["HostKVLayer", "DynamicSlidingWindowLayer"]
    cache, logits = memory.prefill_in_chunks(model, ids[:, :-1], 20, cache)
    reference, reference_logits = memory.prefill_in_chunks(model, ids[:, :-1], 20)  # same chunks, DynamicCache
    for layer, ref in zip(cache.layers, reference.layers):  # exact: host storage only copies
        assert torch.equal(layer.keys, ref.keys) and torch.equal(layer.values, ref.values)
    assert torch.equal(logits, reference_logits)
    assert cache.layers[0]._host_keys.shape[0] == 74  # reserved once by prefill_in_chunks
    continued = greedy(model, ids, 5, **{memory.cache_keyword(model): cache}, attention_mask=torch.ones_like(ids))
    assert continued.tolist() == greedy(model, ids, 5, attention_mask=torch.ones_like(ids)).tolist()


def test_host_cache_keeps_leading_layers_on_the_device():
    model = make_model(num_hidden_layers=3)
    cache = memory.host_cache(model, device_layers=2)
    assert [type(layer).__name__ for layer in cache.layers] == ["DynamicLayer", "DynamicLayer", "HostKVLayer"]
    ids = token_ids(1, 40)
    cache, _ = memory.prefill_in_chunks(model, ids, 16, cache)
    assert_same_cache(cache, one_shot_cache(model, ids))
    with pytest.raises(ValueError, match=r"device_layers must lie in \[0, 3\)"):
        memory.host_cache(model, device_layers=3)
    with pytest.raises(TypeError, match="device_layers must be an int"):
        memory.host_cache(model, device_layers=None)
    with pytest.raises(ValueError, match="nothing to keep in host memory"):
        memory.host_cache(make_model("qwen2", max_window_layers=0), device_layers=0)


def test_host_layer_grows_crops_and_refuses_batch_edits():
    layer = memory.HostKVLayer(reserve_tokens=2)
    keys = torch.randn(2, 3, 11, 8)
    values = torch.randn(2, 3, 11, 8)
    for start, stop in ((0, 1), (1, 4), (4, 11)):  # capacity 2 -> 4 -> 11
        full_keys, full_values = layer.update(keys[:, :, start:stop], values[:, :, start:stop])
        assert torch.equal(full_keys, keys[:, :, :stop]) and torch.equal(full_values, values[:, :, :stop])
    assert layer.get_seq_length() == 11 and layer.get_mask_sizes(5) == (16, 0)
    assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
    layer.crop(-3)
    assert layer.get_seq_length() == 8 and torch.equal(layer.keys, keys[:, :, :8])
    full_keys, _ = layer.update(keys[:, :, 8:], values[:, :, 8:])
    assert torch.equal(full_keys, keys)
    with pytest.raises(ValueError, match="batch size and heads must stay the same"):
        layer.update(keys[:1], values[:1])
    with pytest.raises(ValueError, match="holds torch.float32"):
        layer.update(keys.double(), values.double())
    with pytest.raises(NotImplementedError, match="beam search"):
        layer.reorder_cache(torch.tensor([1, 0]))
    layer.reset()
    assert layer.get_seq_length() == 0


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_kv_cache_bytes_matches_a_real_cache(family):
    model = make_model(family)
    ids = token_ids(2, 50)
    cache = one_shot_cache(model, ids)
    actual = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert memory.kv_cache_bytes(model.config, 50, batch_size=2, dtype=torch.float32) == actual
    llama3 = transformers.LlamaConfig(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                                      num_key_value_heads=8)
    assert memory.kv_cache_bytes(llama3, 131072) == 16 * 2**30


# --------------------------------------------------------------------------------------------
# the GPU benchmark script, on a tiny model on CPU


def test_memory_ttft_script_runs_writes_and_resumes(tmp_path):
    bench = load_benchmark("memory_ttft")
    argv = ["--shape", "tiny", "--device", "cpu", "--lengths", "96", "--naive-lengths", "96", "--prefill-chunk", "64",
            "--mlp-chunk", "32", "--repeats", "1", "--backend", "torch", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    (result,) = tmp_path.glob("memory_ttft-*-tiny.json")
    records = json.loads(result.read_text())["records"]
    assert [(r["attention"], r["path"]) for r in records] == [
        ("dense", "plain"), ("dense", "naive"), ("dense", "memory"),
        ("sparse", "plain"), ("sparse", "naive"), ("sparse", "memory"),
    ]
    assert all(r["status"] == "ok" and r["ttft_s"] > 0 for r in records)
    # the memory path changes memory, not results (float32 here)
    assert all(r["logits_max_diff_vs_plain"] < 1e-4 for r in records if r["path"] != "plain")
    assert all(0 < r["density"] <= 1 for r in records if r["attention"] == "sparse")
    assert "| 96 | sparse | memory | ok |" in result.with_suffix(".md").read_text()
    stamp = result.stat().st_mtime_ns
    assert bench.main(argv) == 0  # everything recorded: nothing runs, nothing is rewritten
    assert result.stat().st_mtime_ns == stamp
