"""Pattern registry: name -> (config dataclass, estimator, kernel runner, reference mask).

Every sparse pattern registers one :class:`PatternSpec`. Plans name patterns and validate their
parameters through :func:`config_from_params`; the integration estimates with ``spec.estimate``
and runs ``spec.run``; tests iterate :func:`pattern_names` so a registered pattern is tested by
being registered.

Uniform signatures:

- ``estimate(q, k, config, *, sm_scale=None, per_kv_group=False) -> selection``, with
  ``q [B, Hq, Nq, D]``, ``k [B, Hkv, Nk, D]``; the selection is a frozen dataclass with
  ``k_len``, ``num_heads`` and ``mask(rows=None) -> bool [B|1, H|1, R, Nk]``.
- ``run(q, k, v, selection, config, *, sm_scale=None) -> [B, Hq, Nq, D]``: the kernel of
  :mod:`longinfer.ops`, imported when first called.
- ``reference_mask(selection, rows=None) -> bool [B|1, H|1, R, Nk]``: the mask the kernel
  computes (from :mod:`longinfer.ops.reference`), for absolute query positions ``rows``.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from longinfer.patterns.a_shape import AShapeConfig, AShapeSelection, estimate_a_shape
from longinfer.patterns.block_sparse import BlockSparseConfig, BlockSparseSelection, estimate_block_sparse
from longinfer.patterns.dense import DenseConfig, DenseSelection, estimate_dense
from longinfer.patterns.tile_keys import TileKeysConfig, TileKeysSelection, estimate_tile_keys
from longinfer.patterns.vertical_slash import (
    SegmentedVerticalSlashSelection,
    VerticalSlashConfig,
    VerticalSlashSelection,
    estimate_vertical_slash,
    run_segmented,
)

Selection = (VerticalSlashSelection | SegmentedVerticalSlashSelection | BlockSparseSelection | AShapeSelection
             | DenseSelection | TileKeysSelection)


@dataclass(frozen=True)
class PatternSpec:
    """One registered pattern.

    Attributes:
        name: registry key, as written in plans (``"vertical_slash"``).
        config_cls: frozen dataclass of the pattern's parameters (validates in ``__post_init__``).
        estimate: the online estimator (signature in the module docstring).
        run: runs the kernel on a selection (signature in the module docstring).
        static: True when the index does not depend on q/k (estimation is free).
        host_sync: True when the estimate reads device values on the host (a data-dependent index width,
            tiles picked by count): its calls cannot be recorded into a CUDA graph and always run eagerly.
    """

    name: str
    config_cls: type
    estimate: Callable[..., Any]
    run: Callable[..., torch.Tensor]
    static: bool = False
    host_sync: bool = False

    def reference_mask(self, selection: Any, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean mask ``[B|1, H|1, R, Nk]`` the kernel computes for ``selection`` at query positions ``rows``."""
        return selection.mask(rows)


def _run_vertical_slash(q, k, v, selection: VerticalSlashSelection | SegmentedVerticalSlashSelection,
                        config: VerticalSlashConfig, *, sm_scale=None):
    from longinfer import ops

    if isinstance(selection, SegmentedVerticalSlashSelection):
        return run_segmented(q, k, v, selection, block_size=config.block_size, sm_scale=sm_scale)

    return ops.vertical_slash_attention(q, k, v, selection.vertical, selection.slash,
                                        block_size=config.block_size, sm_scale=sm_scale)


def _run_block_sparse(q, k, v, selection: BlockSparseSelection, config: BlockSparseConfig, *, sm_scale=None):
    from longinfer import ops

    return ops.block_sparse_attention(q, k, v, selection.block_index, block_size=config.block_size, sm_scale=sm_scale)


def _run_tile_keys(q, k, v, selection: TileKeysSelection, config: TileKeysConfig, *, sm_scale=None):
    from longinfer import ops

    return ops.tile_keys_attention(q, k, v, index=selection.index, local=selection.local,
                                   block_size=config.block_size, sm_scale=sm_scale)


def _run_a_shape(q, k, v, selection: AShapeSelection, config: AShapeConfig, *, sm_scale=None):
    from longinfer import ops

    return ops.a_shape_attention(q, k, v, selection.sink, selection.window, sm_scale=sm_scale)


def _run_dense(q, k, v, selection: DenseSelection, config: DenseConfig, *, sm_scale=None):
    from longinfer import ops

    return ops.dense_attention(q, k, v, sm_scale=sm_scale)


_REGISTRY: dict[str, PatternSpec] = {}


def register_pattern(spec: PatternSpec) -> None:
    """Add a pattern. Raises ``ValueError`` if the name or config class is already registered."""
    if not isinstance(spec, PatternSpec):
        raise TypeError(f"register_pattern takes a PatternSpec, got {type(spec).__name__}")
    if spec.name in _REGISTRY:
        raise ValueError(f"pattern {spec.name!r} is already registered")
    if any(s.config_cls is spec.config_cls for s in _REGISTRY.values()):
        raise ValueError(f"config class {spec.config_cls.__name__} is already registered under another name")
    if not (dataclasses.is_dataclass(spec.config_cls) and spec.config_cls.__dataclass_params__.frozen):
        raise TypeError(f"{spec.config_cls.__name__} must be a frozen dataclass")
    _REGISTRY[spec.name] = spec


def pattern_names() -> tuple[str, ...]:
    """Names of all registered patterns, in registration order."""
    return tuple(_REGISTRY)


def registry() -> Mapping[str, PatternSpec]:
    """Read-only view of the registry."""
    return types.MappingProxyType(_REGISTRY)


def get_pattern(name: str) -> PatternSpec:
    """The spec registered as ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown pattern {name!r}; registered patterns: {', '.join(_REGISTRY)}") from None


def pattern_of_config(config: object) -> PatternSpec:
    """The spec whose config class is ``type(config)``."""
    for spec in _REGISTRY.values():
        if type(config) is spec.config_cls:
            return spec
    raise TypeError(f"{type(config).__name__} is not the config class of any registered pattern")


def config_from_params(name: str, params: Mapping[str, Any]) -> Any:
    """Build and validate pattern ``name``'s config from a parameter mapping (e.g. plan JSON).

    Missing fields take their defaults; unknown fields are an error (nothing is silently ignored).

    Raises:
        ValueError: unknown pattern, unknown field, or an out-of-range value.
        TypeError: a value of the wrong type.
    """
    spec = get_pattern(name)
    if not isinstance(params, Mapping):
        raise TypeError(f"params for pattern {name!r} must be a mapping, got {type(params).__name__}")
    known = {f.name for f in dataclasses.fields(spec.config_cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown} for pattern {name!r}; valid: {sorted(known) or 'none'}"
        )
    return spec.config_cls(**params)


# Fields added after eval records began to carry plan digests (session 14): written only when they
# differ from their default, so the JSON and the digests of plans that leave them unset stay as they
# were (a resumed evaluation of such a plan still finds its earlier records).
WRITTEN_ONLY_WHEN_SET = frozenset({"floor_from", "group_columns_below", "thresholds_on", "repeat_rows", "repeat_ngram",
                                   "repeat_distance", "question_from", "question_vertical",
                                   "min_slash_share", "score_dims",
                                   "question_columns", "question_q"})


def without_unset_added_fields(config_cls: type, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` without the fields of :data:`WRITTEN_ONLY_WHEN_SET` that hold ``config_cls``'s default:
    the form :func:`config_to_params` writes (other keys, unknown ones included, stay)."""
    defaults = {field.name: field.default for field in dataclasses.fields(config_cls)}
    return {key: value for key, value in params.items()
            if not (key in WRITTEN_ONLY_WHEN_SET and value == defaults.get(key))}


def config_to_params(config: object) -> dict[str, Any]:
    """The fields of a registered config as a JSON-ready dict (inverse of :func:`config_from_params`):
    all of them, except those of :data:`WRITTEN_ONLY_WHEN_SET` left at their default."""
    pattern_of_config(config)
    return without_unset_added_fields(type(config), dataclasses.asdict(config))


for _spec in (
    PatternSpec("vertical_slash", VerticalSlashConfig, estimate_vertical_slash, _run_vertical_slash),
    PatternSpec("block_sparse", BlockSparseConfig, estimate_block_sparse, _run_block_sparse),
    PatternSpec("a_shape", AShapeConfig, estimate_a_shape, _run_a_shape, static=True),
    PatternSpec("tile_keys", TileKeysConfig, estimate_tile_keys, _run_tile_keys, host_sync=True),
    PatternSpec("dense", DenseConfig, estimate_dense, _run_dense, static=True),
):
    register_pattern(_spec)
