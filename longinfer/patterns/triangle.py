"""Triangle pattern (TriangleMix, arXiv 2507.21526): sinks + a local window + the last queries dense.

Query ``i`` of ``Nk`` key positions attends key ``j <= i`` when

- ``j < sink`` (attention sinks), or
- ``i - j < window`` (the local window, the query itself included when ``window >= 1``), or
- ``i >= Nk - last_q`` (the last ``last_q`` query positions attend every causal key).

The first two parts are the A-shape of :func:`longinfer.ops.a_shape_attention`; the third makes
the queries that produce the answer (the end of the prompt) exact. The pattern is static: no
estimation, the index is three ints shared by every head.

Kernel: composed from existing ops, with no kernel of its own. The rows before the last
``last_q`` run the A-shape kernel on the key prefix they can see; the last rows run the dense
kernel against all keys (the ops take ``Nk > Nq`` with bottom-right alignment). Both are exact per
element, so the reference mask is exact too.

Importing this module registers the pattern as ``"triangle"`` in :mod:`longinfer.patterns.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longinfer.ops import reference
from longinfer.patterns._common import check_config_fields, check_qk, require
from longinfer.patterns.registry import PatternSpec, pattern_names, register_pattern

PATTERN_NAME = "triangle"


@dataclass(frozen=True)
class TriangleConfig:
    """Attributes:
        sink: the first ``sink`` keys are kept for every query.
        window: query ``i`` keeps keys ``i - window + 1 .. i``.
        last_q: the last ``last_q`` query positions attend every causal key (0 = plain A-shape).
    """

    sink: int = 128
    window: int = 2048
    last_q: int = 128

    def __post_init__(self) -> None:
        check_config_fields(self)
        require(self.sink >= 0 and self.window >= 0 and self.last_q >= 0,
                f"TriangleConfig: sink, window and last_q must be >= 0, got sink={self.sink}, "
                f"window={self.window}, last_q={self.last_q}")


def triangle_mask(
    sink: int,
    window: int,
    last_q: int,
    k_len: int,
    rows: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Mask ``[1, 1, R, Nk]`` of the triangle kernel for absolute query positions ``rows``
    (default ``0 .. k_len-1``); broadcasts over batch and heads."""
    shape_mask = reference.a_shape_mask(sink, window, k_len, rows=rows, device=device)  # [1, 1, R, Nk]
    positions = torch.arange(k_len, device=shape_mask.device) if rows is None else rows.to(shape_mask.device).long()
    dense_rows = positions >= k_len - last_q  # [R]
    causal = reference.dense_causal_mask(k_len, rows=positions, device=shape_mask.device)
    return shape_mask | (causal & dense_rows[None, None, :, None])


@dataclass(frozen=True)
class TriangleSelection:
    """A static triangle index for keys ``0 .. k_len-1`` on ``device``."""

    sink: int
    window: int
    last_q: int
    k_len: int
    device: torch.device

    @property
    def num_heads(self) -> int:
        """1: one index broadcast over every head."""
        return 1

    def mask(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Reference mask ``[1, 1, R, Nk]`` of the kernel for absolute query positions ``rows``."""
        return triangle_mask(self.sink, self.window, self.last_q, self.k_len, rows=rows, device=self.device)


def estimate_triangle(
    q: torch.Tensor,
    k: torch.Tensor,
    config: TriangleConfig,
    *,
    sm_scale: float | None = None,
    per_kv_group: bool = False,
) -> TriangleSelection:
    """The static triangle index; ``q``/``k`` are only checked (their contents are not read).

    ``sm_scale`` and ``per_kv_group`` keep the estimator signature uniform; the index is the same
    for every head either way.
    """
    if not isinstance(config, TriangleConfig):
        raise TypeError(f"config must be a TriangleConfig, got {type(config).__name__}")
    shape = check_qk(q, k)
    return TriangleSelection(config.sink, config.window, config.last_q, shape.k_len, q.device)


def run_triangle(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: TriangleSelection,
    config: TriangleConfig,
    *,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Triangle attention: A-shape for the earlier rows, dense for the last ``last_q`` rows.

    Args:
        q: ``[B, Hq, Nq, D]`` (the last ``Nq`` of ``Nk`` positions); k, v: ``[B, Hkv, Nk, D]``.
        selection: from :func:`estimate_triangle`.

    Returns:
        ``[B, Hq, Nq, D]`` in ``q.dtype``. Memory: the output plus one copy of it (concatenation).
    """
    from longinfer import ops

    if not isinstance(selection, TriangleSelection):
        raise TypeError(f"selection must be a TriangleSelection, got {type(selection).__name__}")
    q_len, k_len = q.shape[2], k.shape[2]
    require(selection.k_len == k_len,
            f"the selection was made for {selection.k_len} keys but k has {k_len}; estimate it again")
    tail = min(selection.last_q, q_len)
    if tail == q_len:
        return ops.dense_attention(q, k, v, sm_scale=sm_scale)
    # Rows before the tail see at most keys 0 .. k_len - tail - 1: run them on that key prefix.
    head_rows = ops.a_shape_attention(q[:, :, : q_len - tail], k[:, :, : k_len - tail], v[:, :, : k_len - tail],
                                      selection.sink, selection.window, sm_scale=sm_scale)
    if tail == 0:
        return head_rows
    tail_rows = ops.dense_attention(q[:, :, q_len - tail:], k, v, sm_scale=sm_scale)
    return torch.cat([head_rows, tail_rows], dim=2)


if PATTERN_NAME not in pattern_names():  # a module re-executed (importlib.reload) must not register twice
    register_pattern(PatternSpec(PATTERN_NAME, TriangleConfig, estimate_triangle, run_triangle, static=True))
