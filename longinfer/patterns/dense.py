"""Dense pattern: every causal key. The "no sparsity" choice a plan can make for a head or layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longinfer.ops import reference
from longinfer.patterns._common import check_qk


@dataclass(frozen=True)
class DenseConfig:
    """No parameters: dense causal attention."""


@dataclass(frozen=True)
class DenseSelection:
    """Dense causal attention over keys ``0 .. k_len-1`` on ``device``."""

    k_len: int
    device: torch.device

    @property
    def num_heads(self) -> int:
        """1: one index broadcast over every head."""
        return 1

    def mask(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Causal mask ``[1, 1, R, Nk]`` for absolute query positions ``rows``."""
        return reference.dense_causal_mask(self.k_len, rows=rows, device=self.device)


def estimate_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    config: DenseConfig,
    *,
    sm_scale: float | None = None,
    per_kv_group: bool = False,
) -> DenseSelection:
    """The dense "index"; ``q``/``k`` are only checked. Extra arguments keep the estimator signature uniform."""
    if not isinstance(config, DenseConfig):
        raise TypeError(f"config must be a DenseConfig, got {type(config).__name__}")
    shape = check_qk(q, k)
    return DenseSelection(k_len=shape.k_len, device=q.device)
