"""The peer as an evaluation method: loader errors, MInference's online estimate, prefill on the
peer's kernel, dense decoding and fallbacks, restoring the model.

On the CPU the peer is a stand-in package laid out like minference 0.1.6 (its ``__init__`` raises,
as the real one does beside transformers 5) whose ``vertical_slash_sparse_attention`` computes
attention with longinfer's reference mask for the index it gets. Expected outputs come from a
brute-force MInference estimate written in this file (dense scores of the last 64 queries).
The real peer is tested on the GPU when ``PEER_SITE`` is set.
"""

from __future__ import annotations

import copy
import math
import os
import textwrap
from pathlib import Path

import pytest
import torch

from longinfer.eval import peer
from longinfer.eval.methods import DenseMethod, PeerMethod, method_from_spec, parse_methods
from longinfer.ops.reference import masked_attention, vertical_slash_mask
from tests.test_eval_fixtures import make_tiny_llama

VOCAB = 64
FAKE_KERNEL = textwrap.dedent('''
    """Stand-in for minference 0.1.6's vertical-slash kernel (tests only)."""
    import torch

    from longinfer.ops.reference import masked_attention, vertical_slash_mask

    CALLS = []


    def vertical_slash_sparse_attention(query, key, value, v_idx, s_idx, block_size_M=64, block_size_N=64):
        if query.shape[1] != key.shape[1] or key.shape != value.shape:
            raise ValueError("the peer has no GQA: q, k and v need the same heads")
        if not (query.is_contiguous() and key.is_contiguous() and value.is_contiguous()):
            raise ValueError("the peer needs contiguous tensors")
        CALLS.append((v_idx.clone(), s_idx.clone()))
        mask = vertical_slash_mask(v_idx, s_idx, query.shape[2], block_size_M)
        return masked_attention(query, key, value, mask, sm_scale=query.shape[-1] ** -0.5).to(query.dtype)
''')


def make_fake_peer(root: Path, *, kernel: str = FAKE_KERNEL, version: str | None = "0.1.6.0") -> Path:
    """A folder laid out like ``pip install --target`` of the peer, with a stand-in kernel."""
    package = root / "minference"
    (package / "ops").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('the package __init__ must not run (it needs vllm)')\n")
    (package / "ops" / "__init__.py").write_text("")
    (package / "ops" / "pit_sparse_flash_attention_v2.py").write_text(kernel)
    if version is not None:
        info = root / f"minference-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: minference\nVersion: {version}\n")
    return root


@pytest.fixture
def fake_site(tmp_path: Path) -> Path:
    return make_fake_peer(tmp_path / "peer")


def brute_force_index(q: torch.Tensor, k: torch.Tensor, num_vertical: int, num_slash: int,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MInference's estimate with dense float32 scores: per query head, sorted ``(v_idx, s_idx)``."""
    n = k.shape[2]
    kf = k.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    last = min(64, q.shape[2])
    rows = torch.arange(n - last, n)
    scores = q[:, :, -last:].float() @ kf.transpose(-1, -2) * scale  # [B, H, 64, N]
    cols = torch.arange(n)
    scores = scores.masked_fill(cols[None, :] > rows[:, None], -math.inf)
    probs = scores.softmax(-1)
    vertical = probs.sum(-2)
    offsets = (rows[:, None] - cols[None, :]).clamp(min=0)  # masked cells have probability 0
    slash = torch.zeros_like(vertical).scatter_add_(
        -1, offsets.flatten().expand(*probs.shape[:2], -1), probs.flatten(-2))
    vertical[..., :30] = math.inf
    slash[..., :100] = math.inf
    v_idx = vertical.topk(min(num_vertical, n), -1).indices.sort(-1).values
    s_idx = slash.topk(min(num_slash, n), -1).indices.sort(-1).values
    return v_idx, s_idx


def reference_attention(num_vertical: int, num_slash: int):
    """An attention function: brute-force estimate + longinfer's reference mask on prefill, exact dense otherwise."""

    def attend(module, query, key, value, attention_mask, scaling=None, **kwargs):
        n = key.shape[2]
        if query.shape[2] == 1:
            out = masked_attention(query, key, value, torch.ones(1, 1, 1, n, dtype=torch.bool), sm_scale=scaling)
        else:
            v_idx, s_idx = brute_force_index(query, key, num_vertical, num_slash, scaling)
            mask = vertical_slash_mask(v_idx, s_idx, n, 64)
            out = masked_attention(query, key, value, mask, sm_scale=scaling)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    return attend


def logits_under(model, name: str, attention, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        model.set_attn_implementation(previous)


def prompt(n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# Loader


def test_loads_the_kernel_without_the_package_init(fake_site):
    kernels = peer.load_peer_kernels(fake_site, require_cuda=False)
    assert kernels.version == "0.1.6.0"
    assert kernels.site == str(fake_site)
    assert kernels.vertical_slash.__module__ == "minference.ops.pit_sparse_flash_attention_v2"


def test_reads_peer_site_from_the_environment(fake_site, monkeypatch):
    monkeypatch.setenv("PEER_SITE", str(fake_site))
    assert peer.load_peer_kernels(require_cuda=False).site == str(fake_site)
    assert peer.peer_version() == "0.1.6.0"


def test_a_second_site_replaces_the_first(fake_site, tmp_path):
    other = make_fake_peer(tmp_path / "other", kernel=FAKE_KERNEL.replace("CALLS = []", "CALLS = ['other']"),
                           version=None)
    peer.load_peer_kernels(fake_site, require_cuda=False)
    kernels = peer.load_peer_kernels(other, require_cuda=False)
    assert kernels.version == "unknown"
    assert peer.import_peer_module("ops.pit_sparse_flash_attention_v2", other).CALLS == ["other"]


def test_no_peer_site_names_the_fix(monkeypatch):
    monkeypatch.delenv("PEER_SITE", raising=False)
    with pytest.raises(peer.PeerUnavailableError, match=r"PEER_SITE.*gpu_session\.sh"):
        peer.load_peer_kernels(require_cuda=False)


def test_missing_package_or_module_names_the_fix(tmp_path):
    with pytest.raises(peer.PeerUnavailableError, match=r"holds no minference/.*gpu_session\.sh"):
        peer.load_peer_kernels(tmp_path, require_cuda=False)
    (tmp_path / "minference" / "ops").mkdir(parents=True)
    with pytest.raises(peer.PeerUnavailableError, match=r"pit_sparse_flash_attention_v2\.py is missing"):
        peer.load_peer_kernels(tmp_path, require_cuda=False)


def test_peer_without_its_cuda_extension_names_the_fix(tmp_path):
    site = make_fake_peer(tmp_path, kernel="from ..cuda import convert_vertical_slash_indexes\n")
    with pytest.raises(peer.PeerUnavailableError, match=r"CUDA extension.*gpu_session\.sh"):
        peer.load_peer_kernels(site, require_cuda=False)


def test_the_real_peer_needs_cuda(fake_site, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(peer.PeerUnavailableError, match="CUDA GPU"):
        peer.load_peer_kernels(fake_site)
    with pytest.raises(peer.PeerUnavailableError, match="CUDA GPU"):
        PeerMethod(site=fake_site).prepare()


def test_kernel_inputs_on_cpu_or_float32_are_refused(fake_site):
    kernels = peer.load_peer_kernels(fake_site, require_cuda=False)
    real = peer.PeerKernels(kernels.vertical_slash, kernels.version, kernels.site, require_cuda=True)
    with pytest.raises(peer.PeerUnavailableError, match="--device cuda"):
        peer._check_kernel_inputs(real, torch.zeros(1, 2, 4, 8))


# --------------------------------------------------------------------------------------------
# The estimate


@pytest.mark.parametrize("n, num_vertical, num_slash", [(200, 40, 120), (150, 1000, 6096), (90, 30, 100)])
def test_estimate_matches_brute_force(n, num_vertical, num_slash):
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(1, 4, n, 16, generator=gen)
    k = torch.randn(1, 2, n, 16, generator=gen)
    v_idx, s_idx = peer.peer_vertical_slash_index(q, k, num_vertical, num_slash, sm_scale=0.25)
    want_v, want_s = brute_force_index(q, k, num_vertical, num_slash, 0.25)
    assert v_idx.shape == (1, 4, min(num_vertical, n)) and s_idx.shape == (1, 4, min(num_slash, n))
    assert torch.equal(v_idx, want_v)
    assert torch.equal(s_idx, want_s)
    forced_v, forced_s = min(30, n), min(100, n)
    assert bool((v_idx[..., :forced_v] == torch.arange(forced_v)).all())
    assert bool((s_idx[..., :forced_s] == torch.arange(forced_s)).all())


# --------------------------------------------------------------------------------------------
# The method on a tiny Llama


def test_prefill_matches_the_reference_and_restores(fake_site):
    model = make_tiny_llama(VOCAB)
    ids = prompt(200)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    expected = logits_under(model, "test_peer_reference", reference_attention(40, 120), ids)
    method = PeerMethod(40, 120, site=fake_site, require_cuda=False)
    calls = peer.import_peer_module("ops.pit_sparse_flash_attention_v2", fake_site).CALLS
    calls.clear()
    with method.activate(model):
        assert model.config._attn_implementation == peer.IMPLEMENTATION
        with torch.no_grad():
            got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, dense, atol=1e-3)  # the index is sparse: it changed the result
    assert len(calls) == 2 and calls[0][0].shape == (1, 4, 40) and calls[0][1].shape == (1, 4, 120)
    assert (method.stats.peer_calls, method.stats.decode_calls, sum(method.stats.fallbacks.values())) == (2, 0, 0)
    # restored: sdpa again, no runtime left on the modules, the dense logits back
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "_longinfer_peer_runtime") for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense)


def test_decode_and_cached_prefix_run_dense(fake_site):
    model = make_tiny_llama(VOCAB)
    ids = prompt(150, seed=1)
    method = PeerMethod(40, 120, site=fake_site, require_cuda=False)
    with method.activate(model), torch.no_grad():
        past = model(input_ids=ids, use_cache=True).past_key_values
        cache = copy.deepcopy(past)
        step = model(input_ids=prompt(1, seed=2), past_key_values=past).logits
        chunk = model(input_ids=prompt(5, seed=3), past_key_values=past).logits
    assert method.stats.peer_calls == 2 and method.stats.decode_calls == 2
    assert method.stats.fallbacks == {"cached prefix": 2}
    with DenseMethod().activate(model), torch.no_grad():  # the same cache, dense SDPA
        step_dense = model(input_ids=prompt(1, seed=2), past_key_values=cache).logits
        chunk_dense = model(input_ids=prompt(5, seed=3), past_key_values=cache).logits
    torch.testing.assert_close(step, step_dense)
    torch.testing.assert_close(chunk, chunk_dense)


def test_batches_and_padding_run_dense(fake_site):
    model = make_tiny_llama(VOCAB)
    ids = prompt(100, seed=4, batch=2)
    padding = torch.ones_like(ids)
    padding[1, :10] = 0
    with torch.no_grad():
        dense_batch = model(input_ids=ids).logits
        dense_padded = model(input_ids=ids[1:], attention_mask=padding[1:]).logits
    method = PeerMethod(40, 120, site=fake_site, require_cuda=False)
    with method.activate(model), torch.no_grad():
        batch = model(input_ids=ids).logits
        padded = model(input_ids=ids[1:], attention_mask=padding[1:]).logits
    torch.testing.assert_close(batch, dense_batch)
    torch.testing.assert_close(padded, dense_padded)
    assert method.stats.peer_calls == 0
    assert method.stats.fallbacks == {"batch > 1": 2, "padding or window mask": 2}


def test_other_softmax_scales_are_folded_into_q(fake_site):
    kernels = peer.load_peer_kernels(fake_site, require_cuda=False)
    runtime = peer.PeerRuntime(kernels, 30, 100)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, h, 130, 16, generator=gen) for h in (4, 2, 2))
    out = peer._run_peer(runtime, q, k, v, scale=0.1)
    v_idx, s_idx = brute_force_index(q, k, 30, 100, 0.1)
    want = masked_attention(q, k, v, vertical_slash_mask(v_idx, s_idx, 130, 64), sm_scale=0.1)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


def test_restores_after_an_error(fake_site):
    model = make_tiny_llama(VOCAB, attn_implementation="eager")
    with pytest.raises(RuntimeError, match="boom"):
        with PeerMethod(site=fake_site, require_cuda=False).activate(model):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "eager"
    assert not any(hasattr(m, "_longinfer_peer_runtime") for m in model.modules())


def test_outside_activate_is_a_clear_error(fake_site):
    model = make_tiny_llama(VOCAB)
    peer.register()
    model.set_attn_implementation(peer.IMPLEMENTATION)
    with pytest.raises(RuntimeError, match="PeerMethod.activate"), torch.no_grad():
        model(input_ids=prompt(8))


# --------------------------------------------------------------------------------------------
# Specs


def test_specs_and_describe(fake_site, monkeypatch):
    monkeypatch.setenv("PEER_SITE", str(fake_site))
    methods = parse_methods("dense,peer,peer:500,1500, longinfer")
    assert [m.name for m in methods] == ["dense", "peer", "peer:500,1500", "longinfer"]
    assert (methods[2].num_vertical, methods[2].num_slash) == (500, 1500)
    assert methods[1].describe() == {"num_vertical": 1000, "num_slash": 6096, "last_q": 64, "peer_version": "0.1.6.0"}
    with pytest.raises(ValueError, match="peer:<V>,<S>"):
        method_from_spec("peer:500")
    with pytest.raises(ValueError, match="num_slash must be an integer >= 100"):
        method_from_spec("peer:500,50")
    with pytest.raises(ValueError, match="unique"):
        parse_methods("peer,peer:1000,6096")


# --------------------------------------------------------------------------------------------
# The real peer


@pytest.mark.gpu
@pytest.mark.skipif(not os.environ.get("PEER_SITE"), reason="PEER_SITE is not set (benchmarks/gpu_session.sh builds the peer)")
def test_real_peer_on_a_tiny_llama():
    """With a budget covering every key the peer must give dense logits; a sparse budget runs too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval().to("cuda", torch.bfloat16)
    ids = prompt(1000, seed=6).cuda()
    with torch.no_grad():
        dense = model(input_ids=ids).logits.float()
    full = PeerMethod(1000, 1000)
    with full.activate(model), torch.no_grad():
        got = model(input_ids=ids).logits.float()
    assert full.stats.peer_calls == 2
    assert (got - dense).abs().max().item() < 0.05 * dense.abs().max().item()
    sparse = PeerMethod(30, 100)
    with sparse.activate(model), torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    assert sparse.stats.peer_calls == 2 and sparse.describe()["peer_version"].startswith("0.1.6")
