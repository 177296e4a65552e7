"""The peer (PyPI ``minference`` 0.1.6) as an attention method: loader, online estimate, attention function.

Loading. The peer's package ``__init__`` imports vllm and an extension it does not ship
(``kivi_gemv``), which fails beside transformers 5; its kernels need neither.
:func:`import_peer_module` installs a stub ``minference`` package whose ``__path__`` points into
the peer's install folder (a ``pip install --target`` folder named by env ``PEER_SITE``;
``benchmarks/gpu_session.sh`` builds one at ``/tmp/peer``), so ``minference.ops.*`` import
without running that ``__init__``. :func:`load_peer_kernels` returns its vertical-slash kernel.

Attention (:func:`peer_attention`, registered with transformers as ``"longinfer_peer"`` together
with transformers' own SDPA mask function, so the attention mask is ``None`` exactly when SDPA
would run plain causal attention). A prefill call the peer can run (``Nq == Nk > 1``, batch 1,
no mask: no padding, no window, no cached prefix) does what MInference does per layer:

1. its online estimate (:func:`peer_vertical_slash_index`): the last 64 queries against every
   key, column mass with the first 30 keys forced, diagonal mass with the 100 diagonals nearest
   the main one forced, the top ``num_vertical`` columns and ``num_slash`` diagonals per query head;
2. the peer's ``vertical_slash_sparse_attention(q, k, v, v_idx, s_idx)`` on ``[B, H, N, D]``
   bfloat16 / float16 tensors, K/V repeated to the query heads (the peer has no GQA).

Every other call runs transformers' SDPA attention (what the ``dense`` method runs): decoding, as
in the peer, and the cases the peer cannot do (padding, batch > 1, a cached prefix, a sliding
window), where it falls back to dense too. :class:`PeerStats` counts both.
"""

from __future__ import annotations

import collections
import importlib
import importlib.metadata
import logging
import math
import os
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from longinfer.patterns.vertical_slash import VerticalSlashConfig, estimate_masses, select_items

logger = logging.getLogger(__name__)

__all__ = [
    "IMPLEMENTATION",
    "PEER_SITE_ENV",
    "PeerKernels",
    "PeerRuntime",
    "PeerStats",
    "PeerUnavailableError",
    "attach",
    "detach",
    "import_peer_module",
    "load_peer_kernels",
    "peer_attention",
    "peer_site",
    "peer_version",
    "peer_vertical_slash_index",
    "register",
]

PEER_SITE_ENV = "PEER_SITE"
PEER_PACKAGE = "minference"
VERTICAL_SLASH_MODULE = "ops.pit_sparse_flash_attention_v2"
VERTICAL_SLASH_FUNCTION = "vertical_slash_sparse_attention"
IMPLEMENTATION = "longinfer_peer"  # the name registered with transformers
BUILD_HINT = (
    "build the peer on the GPU machine with `bash benchmarks/gpu_session.sh build` (it installs the "
    "minference 0.1.6 sdist from .device/ into /tmp/peer; see benchmarks/README.md) and set PEER_SITE=/tmp/peer"
)
# MInference's online vertical-slash estimate (its defaults; not configurable there either).
LAST_Q = 64  # estimation queries: the last 64
SINK = 30  # key columns always kept
LOCAL = 100  # diagonals next to the main one always kept
DEFAULT_NUM_VERTICAL = 1000
DEFAULT_NUM_SLASH = 6096
KERNEL_DTYPES = (torch.bfloat16, torch.float16)  # the peer's Triton kernel computes in these only

_STUB_ATTR = "_longinfer_peer_stub"  # on the stub package: the folder its __path__ points to
_RUNTIME_ATTR = "_longinfer_peer_runtime"  # on each attention module: its PeerRuntime


class PeerUnavailableError(RuntimeError):
    """The peer cannot be loaded or run here (not built, not found, no CUDA); the message names the fix."""


# --------------------------------------------------------------------------------------------
# Loading


def peer_site(site: str | os.PathLike[str] | None = None) -> Path:
    """The peer's install folder: ``site``, else env ``PEER_SITE``; it must hold ``minference/``."""
    value = site if site is not None else os.environ.get(PEER_SITE_ENV)
    if not value:
        raise PeerUnavailableError(f"the peer's install folder is not set: {PEER_SITE_ENV} is empty; {BUILD_HINT}")
    path = Path(value)
    if not (path / PEER_PACKAGE).is_dir():
        raise PeerUnavailableError(
            f"{PEER_SITE_ENV}={path} holds no {PEER_PACKAGE}/ package (not built, or built elsewhere); {BUILD_HINT}"
        )
    return path


def _install_stub(package_dir: Path) -> None:
    """Make ``import minference.X`` read ``package_dir/X`` without running ``package_dir/__init__.py``.

    A stub for another folder (an earlier call) is replaced together with its submodules; a real
    ``minference`` package already imported is left alone and reported.
    """
    current = sys.modules.get(PEER_PACKAGE)
    if current is not None:
        stub_of = getattr(current, _STUB_ATTR, None)
        if stub_of == str(package_dir):
            return
        if stub_of is None:
            raise PeerUnavailableError(
                f"a '{PEER_PACKAGE}' package is already imported in this process (from "
                f"{getattr(current, '__file__', None)}); load the peer through longinfer.eval.peer in a fresh process"
            )
        for name in [n for n in sys.modules if n == PEER_PACKAGE or n.startswith(PEER_PACKAGE + ".")]:
            del sys.modules[name]
    stub = types.ModuleType(PEER_PACKAGE, f"stub of the peer's package at {package_dir} (its __init__ is not run)")
    stub.__path__ = [str(package_dir)]
    setattr(stub, _STUB_ATTR, str(package_dir))
    sys.modules[PEER_PACKAGE] = stub


def import_peer_module(submodule: str, site: str | os.PathLike[str] | None = None) -> types.ModuleType:
    """Import ``minference.<submodule>`` (e.g. ``"ops.streaming_kernel"``) from the peer's install folder.

    Raises:
        PeerUnavailableError: no folder (``PEER_SITE`` unset), no such module file, or its import
            failed (e.g. the peer was installed without its CUDA extension); each names the fix.
    """
    root = peer_site(site)
    package_dir = root / PEER_PACKAGE
    module_file = package_dir.joinpath(*submodule.split(".")).with_suffix(".py")
    if not module_file.is_file():
        raise PeerUnavailableError(
            f"{module_file} is missing: {root} does not hold minference 0.1.6's kernels; {BUILD_HINT}"
        )
    _install_stub(package_dir)
    try:
        return importlib.import_module(f"{PEER_PACKAGE}.{submodule}")
    except ImportError as exc:
        raise PeerUnavailableError(
            f"importing the peer's {PEER_PACKAGE}.{submodule} from {root} failed ({exc}); the peer must be built "
            f"with its CUDA extension (MINFERENCE_FORCE_BUILD=TRUE): {BUILD_HINT}"
        ) from exc


def peer_version(site: str | os.PathLike[str] | None = None) -> str:
    """The installed peer's version from its ``*.dist-info`` in the install folder (``"unknown"`` without one)."""
    root = peer_site(site)
    for dist in importlib.metadata.distributions(name=PEER_PACKAGE, path=[str(root)]):
        return dist.version
    return "unknown"


@dataclass(frozen=True)
class PeerKernels:
    """The peer's kernel the attention method runs, and where it came from.

    Attributes:
        vertical_slash: ``vertical_slash_sparse_attention(q, k, v, v_idx, s_idx) -> out``: q, k, v
            ``[B, H, N, D]`` bfloat16 / float16 with the same ``H`` (no GQA), ``v_idx [B, H, V]``
            key columns, ``s_idx [B, H, S]`` diagonal offsets back from the main diagonal; scale
            ``D ** -0.5``; returns ``[B, H, N, D]``.
        version: the peer's version (:func:`peer_version`).
        site: its install folder.
        require_cuda: the kernel runs on CUDA tensors only (the real peer; a test stand-in may not).
    """

    vertical_slash: Callable[..., torch.Tensor]
    version: str
    site: str
    require_cuda: bool = True


def load_peer_kernels(site: str | os.PathLike[str] | None = None, *, require_cuda: bool = True) -> PeerKernels:
    """Import the peer's vertical-slash kernel without running its package ``__init__``.

    Args:
        site: the peer's install folder (default: env ``PEER_SITE``).
        require_cuda: fail unless a CUDA device is visible (the peer's kernels are Triton plus a
            CUDA extension); ``False`` only for stand-ins that run elsewhere.

    Raises:
        PeerUnavailableError: see :func:`import_peer_module`, or no CUDA device with ``require_cuda``.
    """
    root = peer_site(site)
    if require_cuda and not torch.cuda.is_available():
        raise PeerUnavailableError(
            "the peer's kernels (Triton + a CUDA extension) need a CUDA GPU and none is visible; run the peer "
            "method on the GPU machine, with the model on cuda"
        )
    module = import_peer_module(VERTICAL_SLASH_MODULE, root)
    kernel = getattr(module, VERTICAL_SLASH_FUNCTION, None)
    if not callable(kernel):
        raise PeerUnavailableError(
            f"{PEER_PACKAGE}.{VERTICAL_SLASH_MODULE} in {root} has no {VERTICAL_SLASH_FUNCTION}(); it is not "
            f"minference 0.1.6: {BUILD_HINT}"
        )
    return PeerKernels(kernel, peer_version(root), str(root), require_cuda)


# --------------------------------------------------------------------------------------------
# The online estimate


def peer_vertical_slash_index(
    q: torch.Tensor,
    k: torch.Tensor,
    num_vertical: int,
    num_slash: int,
    *,
    sm_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MInference's online vertical-slash estimate for every query head at once.

    The last ``LAST_Q`` queries attend causally to every key (softmax in float32); per query head,
    the column sums rank the key columns with the first ``SINK`` forced, the diagonal sums rank
    the offsets with the ``LOCAL`` nearest diagonals forced, and the top ``num_vertical`` /
    ``num_slash`` of each are kept (counts clipped to ``Nk``). Mass comes from
    :func:`longinfer.patterns.vertical_slash.estimate_masses` with nothing left out (``sink=0,
    local=0``: MInference sums every cell, unlike longinfer's own estimate) and the choice from
    :func:`~longinfer.patterns.vertical_slash.select_items` with the forced items.

    Args:
        q: ``[B, Hq, Nq, D]``; k: ``[B, Hkv, Nk, D]`` (queries are the last ``Nq`` positions).
        num_vertical: columns per head, at least ``SINK``; num_slash: diagonals, at least ``LOCAL``.
        sm_scale: softmax scale of the estimate (default ``1/sqrt(D)``).

    Returns:
        ``(v_idx [B, Hq, min(num_vertical, Nk)], s_idx [B, Hq, min(num_slash, Nk)])`` int64,
        ascending: key positions and diagonal offsets (key = query position - offset). No unused
        slots (the peer has no marker for them).

    Memory: as :func:`estimate_masses` (never ``N x N``) plus a few ``[B, Hq, Nk]`` tensors.
    """
    masses = estimate_masses(q, k, VerticalSlashConfig(num_vertical, num_slash, LAST_Q, sink=0, local=0),
                             sm_scale=sm_scale)
    budget = VerticalSlashConfig(num_vertical, num_slash, LAST_Q, sink=SINK, local=LOCAL)
    items = select_items(*masses, budget)
    return items.vertical, items.slash


# --------------------------------------------------------------------------------------------
# Runtime state and the attention function


@dataclass
class PeerStats:
    """Attention calls of a model running the peer method.

    Attributes:
        peer_calls: prefill calls the peer ran (one per layer per prefill).
        decode_calls: single-query calls, dense SDPA (as in the peer).
        fallbacks: prefill calls the peer cannot run, dense SDPA, by reason.
    """

    peer_calls: int = 0
    decode_calls: int = 0
    fallbacks: collections.Counter[str] = field(default_factory=collections.Counter)

    def summary(self) -> str:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.fallbacks.items()))
        return (f"{self.peer_calls} layer calls on the peer, {self.decode_calls} decode calls and "
                f"{sum(self.fallbacks.values())} dense fallbacks{f' ({reasons})' if reasons else ''} on SDPA")


@dataclass
class PeerRuntime:
    """What :func:`peer_attention` needs, attached to every attention module by :func:`attach`."""

    kernels: PeerKernels
    num_vertical: int
    num_slash: int
    stats: PeerStats = field(default_factory=PeerStats)


def register() -> None:
    """Register ``"longinfer_peer"`` with transformers' attention and mask interfaces (idempotent).

    The mask function is transformers' SDPA one, so fallbacks run exactly what ``sdpa`` runs.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, peer_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def _attention_modules(model: Any) -> list[torch.nn.Module]:
    """The model's attention modules (those with an integer ``layer_idx`` and ``is_causal``)."""
    return [m for m in model.modules()
            if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "is_causal")]


def attach(model: Any, runtime: PeerRuntime) -> int:
    """Attach ``runtime`` to every attention module of ``model``; returns how many got it."""
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention modules with a layer_idx; the peer method "
                         "supports transformers decoder-only language models")
    for module in modules:
        setattr(module, _RUNTIME_ATTR, runtime)
    return len(modules)


def detach(model: Any) -> None:
    """Remove what :func:`attach` added."""
    for module in model.modules():
        if hasattr(module, _RUNTIME_ATTR):
            delattr(module, _RUNTIME_ATTR)


def _fallback_reason(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                     is_causal: bool) -> str | None:
    """Why the peer cannot run this prefill call (it then runs dense), or ``None`` when it can."""
    if key.shape[2] != query.shape[2]:
        return "cached prefix"
    if query.shape[0] != 1:
        return "batch > 1"
    if attention_mask is not None:
        return "padding or window mask"
    if not is_causal:
        return "not causal"
    return None


def _check_kernel_inputs(kernels: PeerKernels, query: torch.Tensor) -> None:
    if kernels.require_cuda and query.device.type != "cuda":
        raise PeerUnavailableError(
            f"the peer's kernels run on CUDA tensors only, the model is on {query.device}: load it with --device cuda"
        )
    if kernels.require_cuda and query.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"the peer's kernel computes in bfloat16 or float16, the model runs in {query.dtype}: load it with "
            "--dtype bfloat16"
        )


def _run_peer(runtime: PeerRuntime, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              scale: float) -> torch.Tensor:
    """One prefill call on the peer: ``query [1, Hq, N, D]``, ``key, value [1, Hkv, N, D]`` -> ``[1, Hq, N, D]``."""
    _check_kernel_inputs(runtime.kernels, query)
    v_idx, s_idx = peer_vertical_slash_index(query, key, runtime.num_vertical, runtime.num_slash, sm_scale=scale)
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1) if group > 1 else key
    value = value.repeat_interleave(group, dim=1) if group > 1 else value
    peer_scale = query.shape[-1] ** -0.5  # the peer's fixed softmax scale: fold any other into q
    if not math.isclose(scale, peer_scale, rel_tol=1e-6):
        query = query * (scale / peer_scale)
    return runtime.kernels.vertical_slash(query.contiguous(), key.contiguous(), value.contiguous(), v_idx, s_idx)


def peer_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` function of the peer method (see the module docstring).

    Args:
        module: an attention module with a :class:`PeerRuntime` from :func:`attach`.
        query: ``[B, Hq, Nq, D]``; key, value: ``[B, Hkv, Nk, D]`` (cached prefix included).
        attention_mask: transformers' SDPA mask (``None`` = plain causal or a single query).
        scaling: softmax scale (default ``1/sqrt(D)``).

    Returns:
        ``(out [B, Nq, Hq, D], None)``.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    runtime: PeerRuntime | None = getattr(module, _RUNTIME_ATTR, None)
    if runtime is None:
        raise RuntimeError(
            f"attention '{IMPLEMENTATION}' runs only inside PeerMethod.activate(model) "
            "(longinfer.eval.methods); switch this model back with model.set_attn_implementation('sdpa')"
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if query.shape[2] == 1:
        runtime.stats.decode_calls += 1
    else:
        reason = _fallback_reason(query, key, attention_mask, causal)
        if reason is None:
            runtime.stats.peer_calls += 1
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            out = _run_peer(runtime, query, key, value, scale)
            return out.transpose(1, 2).contiguous(), None
        runtime.stats.fallbacks[reason] += 1
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)
