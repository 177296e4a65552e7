"""TriangleMix plans (arXiv 2507.21526): dense shallow layers, static triangle attention deeper.

The triangle (:mod:`longinfer.patterns.triangle`) keeps the attention sinks, a local window and
the last queries dense; it needs no estimation. TriangleMix runs the first ``dense_layers`` layers
dense and the others with the triangle, and can be combined with dynamic patterns where they are
needed:

- ``dynamic=<searched Plan>``: in each triangle layer, heads for which the search
  (:func:`longinfer.plans.search.search_plan`, whose default candidates include the triangle and
  A-shape) chose a dynamic pattern (or dense) keep that choice; the heads it found a static sparse
  pattern enough for get the triangle. ``dynamic_layers`` limits this to some layers.
- ``dynamic=<HeadPlan>`` with ``dynamic_layers``: every head of those layers uses it (e.g.
  vertical-slash in the shallow layers instead of dense, as the paper combines it with MInference).

The default sizes (sink 128, window 2048, last 128 queries, the first half of the layers dense)
are a starting point of ours, not values from the paper; measure on your model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from longinfer.patterns import triangle as triangle_pattern
from longinfer.patterns.registry import get_pattern
from longinfer.plans.schema import DEFAULT_DENSE_BELOW, HeadPlan, LayerPlan, Plan, model_shape

DEFAULT_SINK = 128
DEFAULT_WINDOW = 2048
DEFAULT_LAST_Q = 128


def _layer_set(layers: Iterable[int] | None, num_layers: int, name: str) -> frozenset[int]:
    if layers is None:
        return frozenset()
    chosen = frozenset(int(layer) for layer in layers)
    bad = sorted(layer for layer in chosen if not 0 <= layer < num_layers)
    if bad:
        raise ValueError(f"{name} {bad} out of range: the model has {num_layers} layers (0..{num_layers - 1})")
    return chosen


def _is_static_sparse(head: HeadPlan) -> bool:
    """A static pattern that drops keys (A-shape, triangle); dense is static but keeps them all."""
    return get_pattern(head.pattern).static and head.pattern != "dense"


def _dynamic_heads(dynamic: Plan | HeadPlan | None, layer: int, triangle: HeadPlan, num_heads: int) -> tuple[HeadPlan, ...]:
    """The heads of a triangle layer that takes dynamic patterns."""
    if isinstance(dynamic, HeadPlan):
        return (dynamic,) * num_heads
    assert isinstance(dynamic, Plan)
    return tuple(triangle if _is_static_sparse(head) else head for head in dynamic.layers[layer].heads)


def triangle_mix_plan(
    config: Any,
    dense_layers: int | None = None,
    sink: int = DEFAULT_SINK,
    window: int = DEFAULT_WINDOW,
    last_q: int = DEFAULT_LAST_Q,
    *,
    dynamic: Plan | HeadPlan | None = None,
    dynamic_layers: Iterable[int] | None = None,
    dense_below: int = DEFAULT_DENSE_BELOW,
    model_id: str | None = None,
    model_revision: str | None = None,
) -> Plan:
    """A TriangleMix plan: the first ``dense_layers`` layers dense, the rest triangle attention.

    Args:
        config: anything :func:`~longinfer.plans.schema.model_shape` accepts (a transformers config).
        dense_layers: how many of the first layers stay dense; default half of the layers.
        sink, window, last_q: the triangle (:class:`~longinfer.patterns.triangle.TriangleConfig`).
        dynamic: a searched :class:`Plan` for the same model (its dynamic per-head choices are kept
            in triangle layers) or a :class:`HeadPlan` for every head of ``dynamic_layers``.
        dynamic_layers: layers where ``dynamic`` applies; required with a ``HeadPlan`` (any
            layers, dense ones included); with a ``Plan`` default every triangle layer.
        dense_below: every layer's dense threshold (not measured here; a searched ``dynamic``
            plan's measured thresholds are kept for the layers taken from it).

    Raises:
        ValueError: out-of-range layers or sizes, a ``dynamic`` plan for another model, a
            ``HeadPlan`` without ``dynamic_layers``.
    """
    shape = model_shape(config)
    if dense_layers is None:
        dense_layers = shape.num_layers // 2
    if not isinstance(dense_layers, int) or not 0 <= dense_layers <= shape.num_layers:
        raise ValueError(f"dense_layers must be an int in [0, {shape.num_layers}], got {dense_layers!r}")
    triangle = HeadPlan("triangle", triangle_pattern.TriangleConfig(sink=sink, window=window, last_q=last_q))
    dense = HeadPlan.from_params("dense")
    chosen_dynamic = _layer_set(dynamic_layers, shape.num_layers, "dynamic_layers")
    if isinstance(dynamic, Plan):
        dynamic.check_matches(shape)
        if dynamic_layers is None:
            chosen_dynamic = frozenset(range(dense_layers, shape.num_layers))
    elif isinstance(dynamic, HeadPlan):
        if dynamic_layers is None:
            raise ValueError("dynamic=HeadPlan needs dynamic_layers: the layers that use it")
    elif dynamic is not None:
        raise TypeError(f"dynamic must be a Plan, a HeadPlan or None, got {type(dynamic).__name__}")
    elif dynamic_layers is not None:
        raise ValueError("dynamic_layers given without dynamic (a searched Plan or a HeadPlan)")
    layers = []
    for index in range(shape.num_layers):
        base = dense if index < dense_layers else triangle
        if index in chosen_dynamic:
            heads = _dynamic_heads(dynamic, index, base, shape.num_q_heads)
            threshold = dynamic.layers[index].dense_below if isinstance(dynamic, Plan) else dense_below
        else:
            heads, threshold = (base,) * shape.num_q_heads, dense_below
        layers.append(LayerPlan(heads, dense_below=threshold))
    if model_id is None:
        model_id = dynamic.model_id if isinstance(dynamic, Plan) else str(getattr(config, "name_or_path", "") or "")
    search: dict[str, Any] = {"method": "triangle_mix", "paper": "arXiv 2507.21526", "dense_layers": dense_layers,
                              "sink": sink, "window": window, "last_q": last_q,
                              "dense_below": {"measured": False, "value": dense_below}}
    if dynamic is not None:
        source = ({"plan": dynamic.model_id, "created": dynamic.created, "method": dynamic.search.get("method")}
                  if isinstance(dynamic, Plan) else dynamic.to_dict())
        search["dynamic"] = {"from": source, "layers": sorted(chosen_dynamic)}
    return Plan(model_id=model_id, model_revision=model_revision, **dataclasses.asdict(shape), layers=tuple(layers),
                search=search)
