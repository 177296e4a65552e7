"""Bad inputs to the kernels raise ValueError/TypeError naming the problem."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from longinfer.ops import (
    a_shape_attention,
    block_sparse_attention,
    build_tile_keys_index,
    dense_attention,
    tile_keys_attention,
    vertical_slash_attention,
)
from longinfer.ops import _checks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _qkv(hq=2, hkv=1, n=16, d=64, dtype=torch.float32):
    return (
        torch.randn(1, hq, n, d, device=DEVICE, dtype=dtype),
        torch.randn(1, hkv, n, d, device=DEVICE, dtype=dtype),
        torch.randn(1, hkv, n, d, device=DEVICE, dtype=dtype),
    )


def test_wrong_rank():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"q must be 4-D"):
        dense_attention(q[0], k, v)


def test_mismatched_heads():
    q, k, v = _qkv(hq=3, hkv=2)
    with pytest.raises(ValueError, match=r"multiple of key/value heads"):
        dense_attention(q, k, v)


def test_unsupported_head_dim():
    q, k, v = _qkv(d=48)
    with pytest.raises(ValueError, match=r"head_dim 48 is not supported"):
        dense_attention(q, k, v)


def test_dtype_problems():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"share a dtype"):
        dense_attention(q.half(), k, v)
    with pytest.raises(TypeError, match=r"float64"):
        dense_attention(q.double(), k.double(), v.double())


def test_k_shorter_than_q():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"at least as long as q"):
        dense_attention(q, k[:, :, :8], v[:, :, :8])


def test_non_integer_and_misshaped_indices():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"vertical must be an integer tensor"):
        vertical_slash_attention(q, k, v, torch.zeros(1, 2, 3, device=DEVICE), torch.zeros(1, 2, 3, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match=r"slash has 3 heads; expected 2 .* or 1"):
        vertical_slash_attention(q, k, v, torch.zeros(1, 2, 3, dtype=torch.long, device=DEVICE), torch.zeros(1, 3, 3, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match=r"block_index has 2 query blocks; expected"):
        block_sparse_attention(q, k, v, torch.zeros(1, 2, 2, 1, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match=r"block_size 48 is not supported"):
        block_sparse_attention(q, k, v, torch.zeros(1, 2, 1, 1, dtype=torch.long, device=DEVICE), block_size=48)


def test_a_shape_arguments():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"window must be >= 0"):
        a_shape_attention(q, k, v, 4, -1)
    with pytest.raises(TypeError, match=r"sink must be an int"):
        a_shape_attention(q, k, v, 4.0, 8)


def test_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = (t.cpu() for t in _qkv())
    assert not _checks.interpreter_enabled()
    with pytest.raises(ValueError, match=r"CPU tensors but Triton kernels need a GPU"):
        dense_attention(q, k, v)


def test_bad_cu_seqlens():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"cu_seqlens_q must be an int32"):
        dense_attention(q, k, v, cu_seqlens_q=torch.tensor([0, 16], device=DEVICE))
    with pytest.raises(ValueError, match=r"past the end"):
        dense_attention(q, k, v, cu_seqlens_q=torch.tensor([0, 20], dtype=torch.int32, device=DEVICE))


def test_tile_keys_errors():
    q, k, v = _qkv(n=100)
    columns = torch.zeros(1, 2, 2, 3, dtype=torch.long, device=DEVICE)  # ceil(100 / 64) = 2 tiles
    with pytest.raises(ValueError, match=r"local must be an int >= block_size"):
        tile_keys_attention(q, k, v, columns, local=32)
    with pytest.raises(ValueError, match=r"expected ceil\(100 / 64\) = 2"):
        tile_keys_attention(q, k, v, columns[:, :, :1], local=64)
    with pytest.raises(ValueError, match=r"exactly one of columns and index"):
        tile_keys_attention(q, k, v, local=64)
    with pytest.raises(ValueError, match=r"block_size 16, 32 or 64"):
        tile_keys_attention(q, k, v, columns, local=128, block_size=128)
    index = build_tile_keys_index(columns, 100, 64, 64)
    with pytest.raises(ValueError, match=r"rebuild it"):
        tile_keys_attention(q, k, v, index=index, local=96)
    with pytest.raises(TypeError):
        tile_keys_attention(q, k, v, columns.float(), local=64)
    for ids in (index.columns.long(), index.columns.transpose(2, 3).contiguous().transpose(2, 3)):
        with pytest.raises(ValueError, match=r"int32 with a contiguous last dim"):
            tile_keys_attention(q, k, v, index=dataclasses.replace(index, columns=ids), local=64)
