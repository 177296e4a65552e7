"""Input validation shared by the kernel entry points: clear errors before any launch."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import triton

SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_disk_cache() -> dict[str, bool]:
    """Keyword for ``triton.autotune`` that keeps its timings in Triton's cache folder.

    Without it every new process times every configuration again on its first call of each
    tuning key (session 12, H200: ~1.3 s in the estimate alone with every kernel already compiled).
    ``{"cache_results": True}`` where Triton has the option (3.4 and later); ``{}`` on older
    Triton or with ``LONGINFER_AUTOTUNE_CACHE=0`` (re-time in every process).
    """
    if os.environ.get("LONGINFER_AUTOTUNE_CACHE", "1") == "0":
        return {}
    return {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


@dataclass(frozen=True)
class AttentionShape:
    """Sizes of one attention call (packed sequences: ``batch`` = number of sequences)."""

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int  # padded length per sequence (max over sequences when packed)
    k_len: int
    head_dim: int

    @property
    def group_size(self) -> int:
        return self.q_heads // self.kv_heads


def check_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
) -> AttentionShape:
    """Validate q/k/v (and packed-sequence offsets) and return their sizes.

    Raises:
        TypeError: a non-tensor or an unsupported dtype.
        ValueError: wrong rank, mismatched sizes/devices/dtypes, unsupported head_dim, k shorter
            than q, CPU tensors without the Triton interpreter.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, N, D], got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type == "cpu" and not interpreter_enabled():
        raise ValueError(
            "q, k, v are CPU tensors but Triton kernels need a GPU: move them to CUDA, or set "
            "TRITON_INTERPRET=1 before importing longinfer to run the kernels in the (slow) interpreter"
        )
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {q.device}; use a CUDA GPU")
    bsz, hq, nq, d = q.shape
    bk, hkv, nk, dk = k.shape
    if dk != d:
        raise ValueError(f"q has head_dim {d} but k has {dk}")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {d} is not supported; supported head dims: {SUPPORTED_HEAD_DIMS}")
    if bk != bsz:
        raise ValueError(f"q has batch {bsz} but k has {bk}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if cu_seqlens_q is None and cu_seqlens_k is not None:
        raise ValueError("cu_seqlens_k given without cu_seqlens_q")
    if cu_seqlens_q is None:
        if nk < nq:
            raise ValueError(f"k ({nk} positions) must be at least as long as q ({nq}); queries are the last positions")
        if nq == 0:
            raise ValueError("q has no positions (N = 0)")
        return AttentionShape(bsz, hq, hkv, nq, nk, d)
    if bsz != 1:
        raise ValueError(f"packed sequences (cu_seqlens) need q/k/v with batch 1 [1, H, total, D], got batch {bsz}")
    cu_seqlens_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, nq), ("cu_seqlens_k", cu_seqlens_k, nk)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
            raise TypeError(f"{name} must be an int32 tensor [num_seqs + 1]")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError("cu_seqlens_q and cu_seqlens_k must describe the same number of sequences")
    if max_seqlen_q is None or max_seqlen_k is None:
        lens_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).cpu()
        lens_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).cpu()
        if (lens_k < lens_q).any() or (lens_q < 1).any():
            raise ValueError("every packed sequence needs >= 1 query and at least as many keys as queries")
        if int(cu_seqlens_q[-1]) > nq or int(cu_seqlens_k[-1]) > nk:
            raise ValueError("cu_seqlens point past the end of the packed q/k")
        max_seqlen_q = int(lens_q.max())
        max_seqlen_k = int(lens_k.max())
    return AttentionShape(cu_seqlens_q.numel() - 1, hq, hkv, max_seqlen_q, max_seqlen_k, d)


def check_index(name: str, index: torch.Tensor, shape: AttentionShape, ndim: int, device: torch.device) -> int:
    """Validate a sparse index tensor ``[B, H, ...]`` and return its head count ``H``.

    ``H`` must be ``Hq`` (one index per query head) or ``Hkv`` (shared by a KV group).
    """
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(index).__name__}")
    if index.dtype.is_floating_point or index.dtype == torch.bool or index.is_complex():
        raise TypeError(f"{name} must be an integer tensor (int32/int64), got {index.dtype}")
    if index.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(index.shape)}")
    if index.shape[0] != shape.batch:
        raise ValueError(f"{name} has batch {index.shape[0]}, expected {shape.batch}")
    if index.shape[1] not in (shape.q_heads, shape.kv_heads):
        raise ValueError(
            f"{name} has {index.shape[1]} heads; expected {shape.q_heads} (per query head) "
            f"or {shape.kv_heads} (per KV group)"
        )
    if index.device != device:
        raise ValueError(f"{name} is on {index.device} but q is on {device}")
    return index.shape[1]


def check_scale(sm_scale: float | None, head_dim: int) -> float:
    """Softmax scale: ``sm_scale`` or ``1/sqrt(head_dim)``; must be a positive finite number."""
    if sm_scale is None:
        return head_dim**-0.5
    scale = float(sm_scale)
    if not (scale > 0 and scale != float("inf")):
        raise ValueError(f"sm_scale must be a positive finite number, got {sm_scale}")
    return scale
