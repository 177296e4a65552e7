"""Sparse-attention patterns: online index estimators and the pattern registry.

Each pattern is a frozen config dataclass, an estimator ``(q, k, config, *, sm_scale=None,
per_kv_group=False) -> selection`` vectorized over batch and heads, a kernel runner and a
reference mask; see :mod:`longinfer.patterns.registry`. :mod:`longinfer.patterns.recall` measures
how much of the true attention mass a selection keeps.
"""

from longinfer.patterns.a_shape import AShapeConfig, AShapeSelection, estimate_a_shape
from longinfer.patterns.block_sparse import BlockSparseConfig, BlockSparseSelection, estimate_block_sparse
from longinfer.patterns.dense import DenseConfig, DenseSelection, estimate_dense
from longinfer.patterns.recall import RecallStats, attention_recall, causal_logsumexp, sample_rows
from longinfer.patterns.registry import (
    PatternSpec,
    config_from_params,
    config_to_params,
    get_pattern,
    pattern_names,
    pattern_of_config,
    register_pattern,
    registry,
)
from longinfer.patterns.tile_keys import TileKeysConfig, TileKeysSelection, estimate_tile_keys
from longinfer.patterns.vertical_slash import VerticalSlashConfig, VerticalSlashSelection, estimate_vertical_slash

# Registered last: TriangleMix's pattern builds on the registry and the others.
from longinfer.patterns import triangle  # noqa: E402,F401  (registers "triangle")

__all__ = [
    "AShapeConfig",
    "AShapeSelection",
    "BlockSparseConfig",
    "BlockSparseSelection",
    "DenseConfig",
    "DenseSelection",
    "PatternSpec",
    "RecallStats",
    "TileKeysConfig",
    "TileKeysSelection",
    "VerticalSlashConfig",
    "VerticalSlashSelection",
    "attention_recall",
    "causal_logsumexp",
    "config_from_params",
    "config_to_params",
    "estimate_a_shape",
    "estimate_block_sparse",
    "estimate_dense",
    "estimate_tile_keys",
    "estimate_vertical_slash",
    "get_pattern",
    "pattern_names",
    "pattern_of_config",
    "register_pattern",
    "registry",
    "sample_rows",
]
