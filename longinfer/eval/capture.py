"""Capture the post-RoPE queries and keys (values on request) of every attention layer of a transformers model.

One forward pass runs with a temporary attention implementation registered through transformers'
``AttentionInterface`` (and the SDPA mask builder under the same name in
``AttentionMaskInterface``): each layer's function receives ``query [B, Hq, N, D]`` and
``key [B, Hkv, N, D]`` after RoPE, hands them to a handler (store them, or analyse them right
away with ``on_layer``), then computes the layer's output with transformers' own SDPA attention,
so the forward produces exactly what ``attn_implementation="sdpa"`` produces. No model class is
modified; the model's previous attention implementation is restored afterwards, also on error.

Typical use::

    captured = capture_qk(model, input_ids, layers=[0, 5], store_device="cpu")
    q, k = captured[5].q, captured[5].k

or, to look at one layer at a time without keeping all of them (what the recall frontier does)::

    capture_qk(model, input_ids, on_layer=lambda layer: analyse(layer.q, layer.k))

Memory: the forward itself (with ``logits_to_keep=1``: no ``N x vocab`` logits), plus what is
stored: per stored layer ``B * (Hq * R + Hkv * N) * D`` elements (``R = N`` unless
``query_rows`` is given). With ``on_layer`` nothing is stored beyond the layer being handled.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["CAPTURE_IMPLEMENTATION", "LayerQK", "capture_qk", "capturing"]

CAPTURE_IMPLEMENTATION = "longinfer_capture"

_ACTIVE: contextvars.ContextVar[_CaptureSession | None] = contextvars.ContextVar("longinfer_capture", default=None)


@dataclass(frozen=True)
class LayerQK:
    """Queries and keys one attention layer saw (post-RoPE).

    Attributes:
        layer: the layer index (``module.layer_idx``).
        q: ``[B, Hq, R, D]``: all queries (``R = N``) or only the rows ``q_rows``.
        k: ``[B, Hkv, N, D]``: every key.
        sm_scale: the softmax scale the layer uses (``module.scaling``).
        q_rows: ``[R]`` int64 absolute positions of the stored query rows; ``None`` = all ``N``.
        masked: True when the layer got an explicit attention mask (padding, sliding window,
            packed sequences); False means plain causal attention over all keys.
        v: ``[B, Hkv, N, D]`` every value, when the capture asked for values; else ``None``.
    """

    layer: int
    q: torch.Tensor
    k: torch.Tensor
    sm_scale: float
    q_rows: torch.Tensor | None = None
    masked: bool = False
    v: torch.Tensor | None = None


@dataclass
class _CaptureSession:
    """What the registered attention function does with each layer during one forward."""

    layers: frozenset[int] | None
    on_layer: Callable[[LayerQK], None] | None
    store_device: torch.device | None
    store_dtype: torch.dtype | None
    query_rows: torch.Tensor | None
    stored: dict[int, LayerQK]
    values: bool = False

    def wants(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        device = self.store_device if self.store_device is not None else x.device
        dtype = self.store_dtype if self.store_dtype is not None else x.dtype
        return x.to(device=device, dtype=dtype).contiguous()

    def handle(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, sm_scale: float,
               masked: bool) -> None:
        rows = None
        if self.query_rows is not None:
            if int(self.query_rows.max()) >= query.shape[2]:
                raise ValueError(f"query_rows reach position {int(self.query_rows.max())} but the input has "
                                 f"{query.shape[2]} positions")
            rows = self.query_rows.to(query.device)
            query = query[:, :, rows]
        captured = LayerQK(layer=layer, q=self._keep(query), k=self._keep(key), sm_scale=sm_scale,
                           q_rows=None if rows is None else rows.cpu(), masked=masked,
                           v=self._keep(value) if self.values else None)
        if self.on_layer is not None:
            self.on_layer(captured)
        else:
            self.stored[layer] = captured


def _capture_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The registered attention function: hand q/k to the active session, then dense SDPA.

    Contract of transformers' ``AttentionInterface``: ``query [B, Hq, N, D]``, ``key`` /
    ``value`` ``[B, Hkv, N, D]``; returns ``(output [B, N, Hq, D], None)``.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    session = _ACTIVE.get()
    if session is None:
        raise RuntimeError(
            f"attention implementation {CAPTURE_IMPLEMENTATION!r} is only usable inside "
            "longinfer.eval.capture.capturing() or capture_qk(); set the model back to 'sdpa'"
        )
    layer = getattr(module, "layer_idx", None)
    if not isinstance(layer, int):
        raise TypeError(f"{type(module).__name__} has no integer layer_idx; cannot tell which layer is captured")
    if query.shape[2] != key.shape[2]:
        raise ValueError(
            f"layer {layer}: {query.shape[2]} queries against {key.shape[2]} keys; capture needs a single "
            "prefill forward without a KV cache (use_cache=False)"
        )
    if session.wants(layer):
        scaling = kwargs.get("scaling")
        sm_scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        session.handle(layer, query, key, value, sm_scale, masked=attention_mask is not None)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    """Register the capture function and the SDPA mask builder under :data:`CAPTURE_IMPLEMENTATION`.

    Idempotent. The function is inert outside :func:`capture_qk` (it raises), so leaving it
    registered changes nothing for other models.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capture_attention)
    AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _check_layers(layers: Iterable[int] | None, num_layers: int | None) -> frozenset[int] | None:
    if layers is None:
        return None
    chosen = frozenset(layers)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in chosen):
        raise TypeError(f"layers must be ints, got {sorted(chosen, key=str)}")
    if num_layers is not None and any(not 0 <= i < num_layers for i in chosen):
        raise ValueError(f"layers {sorted(chosen)} out of range: the model has {num_layers} layers")
    return chosen


def _check_query_rows(query_rows: torch.Tensor | None) -> torch.Tensor | None:
    if query_rows is None:
        return None
    if (not isinstance(query_rows, torch.Tensor) or query_rows.dim() != 1 or query_rows.dtype.is_floating_point
            or query_rows.dtype == torch.bool):
        raise TypeError("query_rows must be a 1-D integer tensor of positions")
    if query_rows.numel() == 0 or int(query_rows.min()) < 0:
        raise ValueError("query_rows must be non-empty, non-negative positions")
    return query_rows.long()


@contextlib.contextmanager
def capturing(
    model: torch.nn.Module,
    *,
    layers: Iterable[int] | None = None,
    on_layer: Callable[[LayerQK], None] | None = None,
    store_device: torch.device | str | None = None,
    store_dtype: torch.dtype | None = None,
    query_rows: torch.Tensor | None = None,
    values: bool = False,
) -> Iterator[dict[int, LayerQK]]:
    """Within the block, every forward of ``model`` captures each layer's post-RoPE q and k.

    The model runs dense SDPA attention, exactly as with ``attn_implementation="sdpa"``; its
    previous implementation is restored on exit (also on error). Use one prefill forward per
    block without a KV cache (``use_cache=False``); a second forward overwrites stored layers.

    Args:
        model: a transformers causal LM whose attention goes through ``AttentionInterface``
            (Llama, Qwen2, ... in transformers 5).
        layers: layer indices to capture; default all. Other layers run without being copied.
        on_layer: if given, called with each captured :class:`LayerQK` during the forward (in
            layer order) and nothing is stored; the tensors are valid only during the call.
        store_device: where stored tensors go (e.g. ``"cpu"`` to keep GPU memory for the
            forward); default: where the layer computed them.
        store_dtype: dtype of the stored tensors; default: the model's compute dtype.
        query_rows: ``[R]`` absolute positions: keep only these query rows (every key is kept).
        values: also capture each layer's values (:attr:`LayerQK.v`): ``B * Hkv * N * D`` more
            elements per stored layer.

    Yields:
        ``{layer: LayerQK}``, filled by the forward (stays empty when ``on_layer`` is given).
    """
    if on_layer is not None and not callable(on_layer):
        raise TypeError(f"on_layer must be callable, got {type(on_layer).__name__}")
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"{type(model).__name__} is not a transformers PreTrainedModel (no set_attn_implementation)")
    if _ACTIVE.get() is not None:
        raise RuntimeError("capturing() blocks cannot be nested")
    session = _CaptureSession(
        layers=_check_layers(layers, getattr(model.config, "num_hidden_layers", None)),
        on_layer=on_layer,
        store_device=None if store_device is None else torch.device(store_device),
        store_dtype=store_dtype,
        query_rows=_check_query_rows(query_rows),
        stored={},
        values=values,
    )
    _register()
    previous = model.config._attn_implementation
    token = _ACTIVE.set(session)
    try:
        model.set_attn_implementation(CAPTURE_IMPLEMENTATION)
        if model.config._attn_implementation != CAPTURE_IMPLEMENTATION:
            raise TypeError(
                f"{type(model).__name__} does not accept a custom attention implementation "
                "(it does not use transformers' AttentionInterface)"
            )
        yield session.stored
    finally:
        _ACTIVE.reset(token)
        model.set_attn_implementation(previous)


def capture_qk(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    layers: Iterable[int] | None = None,
    on_layer: Callable[[LayerQK], None] | None = None,
    store_device: torch.device | str | None = None,
    store_dtype: torch.dtype | None = None,
    query_rows: torch.Tensor | None = None,
    values: bool = False,
) -> dict[int, LayerQK]:
    """Run one prefill forward of ``input_ids`` and capture each layer's post-RoPE q and k.

    Args:
        model: see :func:`capturing`.
        input_ids: ``[B, N]`` token ids on the model's device; no padding (every position is a
            real token, attention is plain causal).
        layers, on_layer, store_device, store_dtype, query_rows, values: see :func:`capturing`.

    Returns:
        ``{layer: LayerQK}`` for the captured layers, by layer (empty when ``on_layer`` is given).

    Memory: see the module docstring; only the last position's logits are computed. Runs under
    ``torch.inference_mode``.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError("input_ids must be an int32/int64 torch.Tensor of token ids [B, N]")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [B, N] with N > 0, got shape {tuple(input_ids.shape)}")
    if query_rows is not None and query_rows.numel() and int(query_rows.max()) >= input_ids.shape[1]:
        raise ValueError(f"query_rows must be positions in [0, {input_ids.shape[1]})")
    with capturing(model, layers=layers, on_layer=on_layer, store_device=store_device, store_dtype=store_dtype,
                   query_rows=query_rows, values=values) as stored, torch.inference_mode():
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    return dict(sorted(stored.items()))
