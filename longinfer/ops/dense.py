"""Dense causal flash attention: the path for dense heads and the baseline for sparse ones."""

from __future__ import annotations

import torch

from longinfer.ops._checks import check_qkv, check_scale
from longinfer.ops._kernel import MODE_DENSE
from longinfer.ops._launch import launch

DENSE_BLOCK_M = 128


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sm_scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
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

    Returns:
        ``[B, Hq, Nq, D]`` in ``q.dtype``. Extra memory: none beyond the output.
    """
    shape = check_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k)
    scale = check_scale(sm_scale, shape.head_dim)
    return launch(q, k, v, shape, scale, MODE_DENSE, DENSE_BLOCK_M,
                  cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
