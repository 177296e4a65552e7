"""Attention methods compared by the evaluation: a name and a way to switch a loaded model to it.

A method's :meth:`AttentionMethod.activate` is a context manager: inside it the model runs with
that method's attention, on exit the model's previous attention is restored, so one loaded
model serves every method of a run.

Spec strings (CLI ``--methods``): ``dense`` (transformers ``sdpa``), ``dense:<impl>`` (any
transformers implementation, e.g. ``dense:eager``), ``longinfer`` (the built-in plan for the
model), ``longinfer:<plan.json>``.
"""

from __future__ import annotations

import abc
import contextlib
import importlib
import logging
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "AttentionMethod",
    "DenseMethod",
    "LonginferMethod",
    "method_from_spec",
    "parse_methods",
    "set_attention",
]

_INTEGRATION_MODULE = "longinfer.integrations.transformers"


def current_attention(model: Any) -> str:
    """The attention implementation name the model's config holds now."""
    return str(model.config._attn_implementation)


def set_attention(model: Any, implementation: str) -> None:
    """Switch a transformers model's attention implementation in place.

    Uses ``model.set_attn_implementation`` (transformers >= 4.54); older models fall back to the
    config attribute, which attention layers read at each forward.
    """
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:
        model.config._attn_implementation = implementation
    if current_attention(model) != implementation:
        raise ValueError(
            f"{type(model).__name__} did not switch to attention '{implementation}' (it reports "
            f"'{current_attention(model)}'); this model class does not support that implementation"
        )


class AttentionMethod(abc.ABC):
    """One attention method of a comparison."""

    #: Short name used in result records and report columns.
    name: str

    @abc.abstractmethod
    def activate(self, model: Any) -> contextlib.AbstractContextManager[None]:
        """Context manager running ``model`` with this method's attention, restoring it on exit."""

    def describe(self) -> dict[str, Any]:
        """Fields stored in every result record of this method (besides ``method``)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class DenseMethod(AttentionMethod):
    """A stock transformers attention implementation (``sdpa`` by default)."""

    def __init__(self, implementation: str = "sdpa", *, name: str | None = None) -> None:
        if not implementation:
            raise ValueError("dense attention implementation name is empty; use e.g. 'sdpa' or 'eager'")
        self.implementation = implementation
        self.name = name or ("dense" if implementation == "sdpa" else f"dense:{implementation}")

    @contextlib.contextmanager
    def activate(self, model: Any) -> Iterator[None]:
        previous = current_attention(model)
        set_attention(model, self.implementation)
        try:
            yield
        finally:
            set_attention(model, previous)

    def describe(self) -> dict[str, Any]:
        return {"attn_implementation": self.implementation}


def _integration() -> ModuleType:
    """``longinfer.integrations.transformers``, imported on first use."""
    try:
        return importlib.import_module(_INTEGRATION_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name and _INTEGRATION_MODULE.startswith(exc.name):
            raise RuntimeError(
                f"the longinfer attention method needs {_INTEGRATION_MODULE}, which is not available in "
                f"this installation; evaluate with --methods dense until it is"
            ) from exc
        raise


class LonginferMethod(AttentionMethod):
    """longinfer sparse attention through ``longinfer.integrations.transformers.patch``.

    ``plan`` is a plan JSON path, or ``None`` for the model's built-in plan; it is passed to
    ``patch(model, plan)`` as given and ``unpatch(model)`` restores the model on exit.
    """

    def __init__(self, plan: str | Path | None = None, *, name: str | None = None) -> None:
        self.plan = None if plan in (None, "", "default") else str(plan)
        self.name = name or ("longinfer" if self.plan is None else f"longinfer:{Path(self.plan).stem}")

    @contextlib.contextmanager
    def activate(self, model: Any) -> Iterator[None]:
        integration = _integration()
        for function in ("patch", "unpatch"):
            if not callable(getattr(integration, function, None)):
                raise RuntimeError(f"{_INTEGRATION_MODULE} has no {function}(); it is not finished yet")
        integration.patch(model, self.plan)
        try:
            yield
        finally:
            integration.unpatch(model)

    def describe(self) -> dict[str, Any]:
        return {"plan": self.plan or "default"}


def method_from_spec(spec: str) -> AttentionMethod:
    """A method from its spec string (see the module docstring)."""
    spec = spec.strip()
    kind, _, argument = spec.partition(":")
    if kind == "dense":
        return DenseMethod(argument or "sdpa")
    if kind == "longinfer":
        return LonginferMethod(argument or None)
    raise ValueError(
        f"unknown attention method '{spec}'; use dense, dense:<impl>, longinfer or longinfer:<plan.json>"
    )


def parse_methods(specs: str) -> list[AttentionMethod]:
    """Methods from a comma-separated spec list, e.g. ``"dense,longinfer"``; names must be unique."""
    methods = [method_from_spec(s) for s in specs.split(",") if s.strip()]
    if not methods:
        raise ValueError("no attention methods given; use e.g. --methods dense,longinfer")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"attention method names must be unique, got {names}")
    return methods
