"""Attention methods compared by the evaluation: a name and a way to switch a loaded model to it.

A method's :meth:`AttentionMethod.activate` is a context manager: inside it the model runs with
that method's attention, on exit the model's previous attention is restored, so one loaded
model serves every method of a run.

Spec strings (CLI ``--methods``): ``dense`` (transformers ``sdpa``), ``dense:<impl>`` (any
transformers implementation, e.g. ``dense:eager``), ``longinfer`` (the built-in plan for the
model), ``longinfer:<plan.json>``, ``peer`` (the peer, PyPI ``minference`` 0.1.6, with its
default budget of 1000 columns and 6096 diagonals; GPU only, see :mod:`longinfer.eval.peer`) and
``peer:<V>,<S>`` (that budget), and ``none`` (no attention at all: every attention output is
zero; for ``latency`` only, where its time is the floor no attention method can go below). In a
spec list a comma followed by a digit continues the spec, so ``dense,peer:500,1500`` is two methods.
"""

from __future__ import annotations

import abc
import contextlib
import importlib
import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "AttentionMethod",
    "DenseMethod",
    "LonginferMethod",
    "NoAttentionMethod",
    "PeerMethod",
    "method_from_spec",
    "parse_methods",
    "set_attention",
]

_INTEGRATION_MODULE = "longinfer.integrations.transformers"
_PEER_MODULE = "longinfer.eval.peer"
_SPEC_SEPARATOR = re.compile(r",(?!\s*\d)")  # a comma not followed by a digit (peer:V,S keeps its own)


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
    #: True for methods whose outputs are meaningless and whose only use is timing.
    timing_only: bool = False

    @abc.abstractmethod
    def activate(self, model: Any) -> contextlib.AbstractContextManager[None]:
        """Context manager running ``model`` with this method's attention, restoring it on exit."""

    def describe(self) -> dict[str, Any]:
        """Fields stored in every result record of this method (besides ``method``)."""
        return {}

    def prepare(self) -> None:
        """Load what the method needs before a model is loaded, so a missing dependency fails fast."""

    def begin_case(self, model: Any) -> None:
        """Called (inside :meth:`activate`) before each case runs: zero per-case counters."""

    def case_measures(self, model: Any) -> dict[str, Any]:
        """Fields measured over the case just run, added to its result record."""
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


NULL_ATTENTION = "longinfer_null_attention"


def _null_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                    **kwargs: Any) -> tuple[Any, None]:
    """An attention function that computes nothing: zeros shaped like the real output ``[B, N, H, D]``."""
    batch, heads, length, dim = query.shape
    return query.new_zeros(batch, length, heads, dim), None


class NoAttentionMethod(DenseMethod):
    """No attention at all: each attention layer returns zeros; everything else of the forward runs.

    Its time is the floor under every attention method on the same model and input (so dense time /
    its time bounds any attention method's speedup). Its outputs are meaningless: timing only.
    """

    name = "no-attention"
    timing_only = True

    def __init__(self) -> None:
        super().__init__(NULL_ATTENTION, name=NoAttentionMethod.name)

    @contextlib.contextmanager
    def activate(self, model: Any) -> Iterator[None]:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask

        AttentionInterface.register(NULL_ATTENTION, _null_attention)
        AttentionMaskInterface.register(NULL_ATTENTION, sdpa_mask)
        with super().activate(model):
            yield


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
    ``patch(model, plan, cuda_graphs=cuda_graphs)`` as given and ``unpatch(model)`` restores the
    model on exit. ``cuda_graphs=False`` runs every call eagerly (to measure what the graphs win).
    """

    def __init__(self, plan: str | Path | None = None, *, name: str | None = None, cuda_graphs: bool = True) -> None:
        self.plan = None if plan in (None, "", "default") else str(plan)
        self.name = name or ("longinfer" if self.plan is None else f"longinfer:{Path(self.plan).stem}")
        self.cuda_graphs = cuda_graphs
        self._digest: str | None = None

    def plan_digest(self) -> str:
        """What the records call ``plan_digest``: the plan file's rules
        (:func:`~longinfer.plans.schema.layers_digest`) or, for the built-in default, the default's
        rule (:func:`~longinfer.plans.schema.default_rule_digest`), so records of an earlier default
        or an edited plan file are told apart from this one's."""
        if self._digest is None:
            from longinfer.plans.schema import Plan, default_rule_digest, layers_digest

            self._digest = default_rule_digest() if self.plan is None else layers_digest(Plan.load(self.plan))
        return self._digest

    def prepare(self) -> None:
        """Read the plan file now (its digest), so a missing or invalid plan fails before the model loads."""
        self.plan_digest()

    @contextlib.contextmanager
    def activate(self, model: Any) -> Iterator[None]:
        integration = _integration()
        for function in ("patch", "unpatch"):
            if not callable(getattr(integration, function, None)):
                raise RuntimeError(f"{_INTEGRATION_MODULE} has no {function}(); it is not finished yet")
        integration.patch(model, self.plan, cuda_graphs=self.cuda_graphs)
        try:
            yield
        finally:
            integration.unpatch(model)

    def begin_case(self, model: Any) -> None:
        _integration().reset_stats(model)

    def case_measures(self, model: Any) -> dict[str, Any]:
        """``attention_density``: the share of attention pairs the case's prefill calls computed
        (decode steps not counted; absent when no prefill call ran)."""
        density = _integration().attention_stats(model).density
        return {} if math.isnan(density) else {"attention_density": density}

    def describe(self) -> dict[str, Any]:
        described = {"plan": self.plan or "default", "plan_digest": self.plan_digest()}
        return described if self.cuda_graphs else {**described, "cuda_graphs": False}  # old records: no key


class PeerMethod(AttentionMethod):
    """The peer's vertical-slash prefill (PyPI ``minference`` 0.1.6) with its own online estimate.

    Every layer's prefill runs MInference's estimate (last 64 queries; the first 30 columns and the
    100 nearest diagonals forced; top ``num_vertical`` columns and ``num_slash`` diagonals per query
    head) and the peer's kernel; decoding and what the peer cannot do (padding, batch > 1, a cached
    prefix) run dense SDPA, counted in :attr:`stats` (see :mod:`longinfer.eval.peer`).

    Args:
        num_vertical, num_slash: the budget (default the peer's 1000, 6096); at least 30 and 100.
        site: the peer's install folder (default: env ``PEER_SITE``).
        require_cuda: ``False`` only for a stand-in peer that runs on the CPU (tests).
    """

    def __init__(
        self,
        num_vertical: int | None = None,
        num_slash: int | None = None,
        *,
        site: str | Path | None = None,
        require_cuda: bool = True,
        name: str | None = None,
    ) -> None:
        peer = _peer_module()
        self.num_vertical = peer.DEFAULT_NUM_VERTICAL if num_vertical is None else num_vertical
        self.num_slash = peer.DEFAULT_NUM_SLASH if num_slash is None else num_slash
        for label, value, least in (("num_vertical", self.num_vertical, peer.SINK),
                                    ("num_slash", self.num_slash, peer.LOCAL)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(
                    f"peer {label} must be an integer >= {least} (the peer always keeps {least} of them), got {value!r}"
                )
        self.site = None if site is None else str(site)
        self.require_cuda = require_cuda
        default = (self.num_vertical, self.num_slash) == (peer.DEFAULT_NUM_VERTICAL, peer.DEFAULT_NUM_SLASH)
        self.name = name or ("peer" if default else f"peer:{self.num_vertical},{self.num_slash}")
        self.stats: Any = None  # PeerStats of the latest activation
        self._kernels: Any = None

    def prepare(self) -> None:
        self._load()

    def _load(self) -> Any:
        """The peer's kernels (:func:`longinfer.eval.peer.load_peer_kernels`), loaded once."""
        if self._kernels is None:
            self._kernels = _peer_module().load_peer_kernels(self.site, require_cuda=self.require_cuda)
        return self._kernels

    @contextlib.contextmanager
    def activate(self, model: Any) -> Iterator[None]:
        peer = _peer_module()
        runtime = peer.PeerRuntime(self._load(), self.num_vertical, self.num_slash)
        self.stats = runtime.stats
        previous = current_attention(model)
        peer.register()
        peer.attach(model, runtime)
        try:
            set_attention(model, peer.IMPLEMENTATION)
            yield
        finally:
            if current_attention(model) != previous:
                set_attention(model, previous)
            peer.detach(model)
            level = logging.WARNING if runtime.stats.fallbacks else logging.INFO
            logger.log(level, "%s: %s", self.name, runtime.stats.summary())

    def describe(self) -> dict[str, Any]:
        version = self._kernels.version if self._kernels is not None else _peer_module().peer_version(self.site)
        return {"num_vertical": self.num_vertical, "num_slash": self.num_slash, "last_q": _peer_module().LAST_Q,
                "peer_version": version}


def _peer_module() -> ModuleType:
    """``longinfer.eval.peer``, imported on first use (it imports the pattern estimators)."""
    return importlib.import_module(_PEER_MODULE)


def _peer_budget(argument: str) -> tuple[int | None, int | None]:
    """``""`` -> the defaults; ``"V,S"`` -> ``(V, S)``."""
    if not argument:
        return None, None
    parts = [p.strip() for p in argument.split(",")]
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"bad peer budget '{argument}': use peer:<V>,<S> with two integers, e.g. peer:1000,6096")
    return int(parts[0]), int(parts[1])


def method_from_spec(spec: str) -> AttentionMethod:
    """A method from its spec string (see the module docstring)."""
    spec = spec.strip()
    kind, _, argument = spec.partition(":")
    if kind == "dense":
        return DenseMethod(argument or "sdpa")
    if kind == "longinfer":
        return LonginferMethod(argument or None)
    if kind == "peer":
        return PeerMethod(*_peer_budget(argument))
    if spec == "none":
        return NoAttentionMethod()
    raise ValueError(
        f"unknown attention method '{spec}'; use dense, dense:<impl>, longinfer, longinfer:<plan.json>, peer, "
        f"peer:<V>,<S> or none"
    )


def parse_methods(specs: str) -> list[AttentionMethod]:
    """Methods from a comma-separated spec list, e.g. ``"dense,longinfer,peer:500,1500"``; names must be unique."""
    methods = [method_from_spec(s) for s in _SPEC_SEPARATOR.split(specs) if s.strip()]
    if not methods:
        raise ValueError("no attention methods given; use e.g. --methods dense,longinfer")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"attention method names must be unique, got {names}")
    return methods
