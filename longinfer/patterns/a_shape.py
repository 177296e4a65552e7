"""A-shape pattern (StreamingLLM): the first ``sink`` keys plus a local ``window``; static.

Output format (what :func:`longinfer.ops.a_shape_attention` takes): two ints, ``sink`` and
``window``, shared by every head the selection is used for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longinfer.ops import reference
from longinfer.patterns._common import check_config_fields, check_qk, require


@dataclass(frozen=True)
class AShapeConfig:
    """Attributes:
        sink: the first ``sink`` keys are kept for every query.
        window: query ``i`` keeps keys ``i - window + 1 .. i`` (itself included when ``window >= 1``).
    """

    sink: int = 128
    window: int = 4096

    def __post_init__(self) -> None:
        check_config_fields(self)
        require(self.sink >= 0 and self.window >= 0,
                f"AShapeConfig: sink and window must be >= 0, got sink={self.sink}, window={self.window}")


@dataclass(frozen=True)
class AShapeSelection:
    """A static A-shape index: ``sink`` and ``window`` for keys ``0 .. k_len-1`` on ``device``."""

    sink: int
    window: int
    k_len: int
    device: torch.device

    @property
    def num_heads(self) -> int:
        """1: one index broadcast over every head."""
        return 1

    def mask(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Reference mask ``[1, 1, R, Nk]`` of the kernel for absolute query positions ``rows``."""
        return reference.a_shape_mask(self.sink, self.window, self.k_len, rows=rows, device=self.device)


def estimate_a_shape(
    q: torch.Tensor,
    k: torch.Tensor,
    config: AShapeConfig,
    *,
    sm_scale: float | None = None,
    per_kv_group: bool = False,
) -> AShapeSelection:
    """The static A-shape index; ``q``/``k`` are only checked (their contents are not read).

    ``sm_scale`` and ``per_kv_group`` are accepted for a uniform estimator signature; the index
    is the same for every head either way.
    """
    if not isinstance(config, AShapeConfig):
        raise TypeError(f"config must be an AShapeConfig, got {type(config).__name__}")
    shape = check_qk(q, k)
    return AShapeSelection(sink=config.sink, window=config.window, k_len=shape.k_len, device=q.device)
