"""Test setup: run Triton kernels in the interpreter when there is no GPU.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, hence before
``longinfer.ops`` is imported.

On a machine with a GPU the interpreter stays off, so tests that hand CPU tensors to a Triton backend (most of
the suite is written for CI's CPU machine, e.g. ``test_patterns.py``'s registry round trip and the
integration tests on tiny CPU models) refuse to run there. Run the GPU checks as ``pytest -m gpu`` plus the files
written for either device (``test_tile_keys.py``, ``test_ops_kernels.py``: their tensors follow
``torch.cuda.is_available()``), and the rest with ``TRITON_INTERPRET=1`` as CI does.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def tiny_llama(num_hidden_layers: int = 1):
    """A random Llama (seed 0; 4 query / 2 KV heads, head_dim 64, vocabulary 128) on SDPA, in eval mode."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=num_hidden_layers, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.set_attn_implementation("sdpa")
    return model


@pytest.fixture
def tiny_llama_logits():
    """``logits(params, backend, **plan_options)``: the logits of a 1-layer random Llama (4 query /
    2 KV heads, head_dim 64) on 256 fixed token ids, patched with a uniform vertical-slash plan of
    ``params`` (``uniform_plan`` keywords in ``plan_options``) on ``backend``, then unpatched."""
    pytest.importorskip("transformers")
    from longinfer.integrations import transformers as lt
    from longinfer.plans import uniform_plan

    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 256), generator=torch.Generator().manual_seed(0))

    def logits(params: dict, backend: str, **plan_options) -> torch.Tensor:
        lt.patch(model, uniform_plan(model.config, "vertical_slash", params, **plan_options), backend=backend)
        try:
            with torch.no_grad():
                return model(ids).logits
        finally:
            lt.unpatch(model)

    return logits
