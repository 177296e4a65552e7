"""Dense causal flash attention: the path for dense heads and the baseline for sparse ones."""

from __future__ import annotations

import math

import torch

from longinfer.ops._checks import AttentionShape, check_qkv, check_scale
from longinfer.ops._kernel import MODE_DENSE
from longinfer.ops._launch import SPLIT_BLOCK_M, dense_splits_into, launch

DENSE_BLOCK_M = 128
# Split-K: a call with fewer (query tile, head) programs than SPLIT_BELOW_PROGRAMS (about two per SM
# of an H100/H200, 132 SMs) splits its keys until it has about SPLIT_TARGET_PROGRAMS, keeping at
# least SPLIT_MIN_KEYS keys per split so the merge stays cheap.
SPLIT_BELOW_PROGRAMS = 256
SPLIT_TARGET_PROGRAMS = 1024
SPLIT_MIN_KEYS = 1024


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sm_scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Causal attention ``softmax(q k^T * sm_scale) v`` over all keys ``j <= i``.

    Args:
        q: ``[B, Hq, Nq, D]`` float16/bfloat16 (float32 accepted; exact fp32 products).
        k, v: ``[B, Hkv, Nk, D]``, ``Hq % Hkv == 0``, ``Nk >= Nq``. Queries are the *last* ``Nq``
            positions (bottom-right aligned), so a chunk after a cached prefix passes the full k/v::

                keys     0 1 2 3 4 5
                query 0          x x .     (Nq = 2, Nk = 6: query 0 sits at position 4)
                query 1          x x x

        sm_scale: softmax scale, default ``1/sqrt(D)``.
        cu_seqlens_q, cu_seqlens_k: packed sequences: int32 ``[S + 1]`` offsets into
            ``q [1, Hq, total_q, D]`` and ``k, v [1, Hkv, total_k, D]`` (``cu_seqlens_k`` defaults to
            ``cu_seqlens_q``). Each sequence attends only to itself.
        splits: split the keys into this many parts, each its own program per query tile, merged
            afterwards (split-K), for short queries over many keys (a chunk of a few hundred rows
            after a long prefix otherwise runs on a few dozen programs). Default 1: the split is
            tested on the CPU interpreter but not yet timed on a GPU; :func:`default_splits` is the
            proposed choice (``benchmarks/tail_bench.py`` measures it). Not with packed sequences.

    Returns:
        ``[B, Hq, Nq, D]`` in ``q.dtype``. Extra memory: the output; with splits, float32 partial
        outputs ``splits * B * Hq * Nq * D`` (~70 MB at most with :func:`default_splits`).
    """
    shape = check_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k)
    scale = check_scale(sm_scale, shape.head_dim)
    if splits is not None and (isinstance(splits, bool) or not isinstance(splits, int) or splits < 1):
        raise ValueError(f"splits must be a positive int, got {splits!r}")
    if splits not in (None, 1):
        if cu_seqlens_q is not None:
            raise ValueError("splits is not supported with packed sequences (cu_seqlens_q)")
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # the kernels index D densely
        out = torch.empty_like(q)
        dense_splits_into(out, q, k, v, shape, scale, splits)
        return out
    return launch(q, k, v, shape, scale, MODE_DENSE, DENSE_BLOCK_M,
                  cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)


def default_splits(shape: AttentionShape) -> int:
    """Key splits for a dense call: 1 unless ``B * Hq * ceil(Nq / 64)`` programs are fewer than
    :data:`SPLIT_BELOW_PROGRAMS`; then enough to reach :data:`SPLIT_TARGET_PROGRAMS`, with at least
    :data:`SPLIT_MIN_KEYS` keys each."""
    programs = shape.batch * shape.q_heads * math.ceil(shape.q_len / SPLIT_BLOCK_M)
    if programs >= SPLIT_BELOW_PROGRAMS:
        return 1
    return max(1, min(math.ceil(SPLIT_TARGET_PROGRAMS / programs), shape.k_len // SPLIT_MIN_KEYS))
