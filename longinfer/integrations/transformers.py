"""Hugging Face transformers integration: sparse prefill through ``AttentionInterface``.

Nothing in transformers is reassigned: :func:`register` adds an attention function and a mask
function under the name ``"longinfer"`` (``AttentionInterface.register`` and
``AttentionMaskInterface.register``), and :func:`patch` switches a loaded model to that
implementation and attaches a :class:`~longinfer.plans.Plan` to its attention modules::

    import longinfer
    model = AutoModelForCausalLM.from_pretrained(name)
    longinfer.patch(model, "plan.json")        # a Plan, a plan path, or None: the default plan
    model.generate(...)                         # sparse prefill, dense decoding
    longinfer.unpatch(model)                    # back to the previous implementation

``from_pretrained(name, attn_implementation="longinfer")`` works too once :func:`register` has run;
call :func:`patch` afterwards to attach a plan, else each layer uses :func:`default_plan_for`
(logged). The plan lives in private attributes of the model and its attention modules, never in
``model.config``.

One attention call (one layer, one forward), ``q [B, Hq, Nq, D]``, ``k, v [B, Hkv, Nk, D]``,
queries = the last ``Nq`` key positions (a chunk after a cached prefix has ``Nk > Nq``):

1. Padding. The mask function hands over the 2-D key-padding mask (``None`` when nothing is
   padded). A padded batch runs one sequence at a time on its contiguous valid span (left or right
   padding); a short query (decoding) runs batched with the padding mask instead.
2. Model-defined attention is kept: a sliding-window layer whose window is shorter than the keys
   runs exact windowed attention (the A-shape kernel with no sinks, or masked dense attention);
   logit softcapping (Gemma 2) runs exact dense attention with the softcap (no sparse kernel
   supports it; :func:`patch` logs this).
3. Dense when ``Nq < SPARSE_MIN_QUERIES`` (decoding), ``Nk < layer.dense_below`` or every
   query row lies in the ``dense_last`` tail (below): torch SDPA (``enable_gqa``; no GQA copy) or
   the dense kernel for a chunk after a prefix.
4. Sparse otherwise: query heads sharing a head plan run together, one estimator call and one
   kernel launch per group. Heads are gathered per KV head so the kernel sees a plain GQA layout
   (``n`` query heads per KV head): whole KV groups sharing a pattern need no K/V copy at all,
   partial groups copy only the K/V heads they read. The index is estimated from the chunk's own
   last queries against all (cached + new) keys. When the layer plan has ``share_kv_groups``, a
   bucket of whole KV groups is estimated once per KV group (``per_kv_group=True``: the union of
   the group's query heads' selections) and the kernel gets that index with ``Hkv`` heads, so it
   stacks the group's query heads in one tile and shares every K/V load. With ``dense_last``
   the last ``dense_last`` query rows, rounded out to whole 64-row tiles
   (:meth:`~longinfer.plans.LayerPlan.dense_from`), attend densely (the prompt's end, whose
   attention decides the first generated tokens): the vertical-slash kernel runs those tiles
   dense in the same launch; other patterns recompute those rows densely afterwards. On CUDA,
   a sparse call that repeats within a forward (same plan and shapes in several layers) is
   replayed from a CUDA graph (:mod:`longinfer.integrations.graphs`): one launch instead of ~120
   for short chunks (calls above :data:`GRAPH_MAX_PAIRS` stay eager). A vertical-slash head with
   ``repeat_rows`` estimates from extra rows chosen on the token ids, which :func:`patch` records
   with a forward pre-hook (:mod:`longinfer.integrations.tokens`); the rows are an input of the call
   (and of its graph), built once per forward and shape.

Backends: ``"triton"`` runs the kernels of :mod:`longinfer.ops` (CUDA, or CPU under
``TRITON_INTERPRET=1``); ``"torch"`` computes the same masks (the kernels' reference semantics)
with dense masked matmuls over query chunks, exact but with no speedup, for CPUs without the
interpreter and head dims the kernels lack. ``"auto"`` picks per call from the tensors' device.

Density (:func:`attention_stats`): the share of the (query, key) pairs of the model's own
attention mask (causal, window included) that prefill attention computed, over every layer and
head. Dense and windowed calls count fully; a sparse call counts its index's mask measured at
``DENSITY_SAMPLE_ROWS`` evenly spaced query rows (the exact mask the kernel computes, block
rounding included), so recording costs ``O(H * rows * Nk)`` per call and no host sync. Calls
with fewer than ``SPARSE_MIN_QUERIES`` queries (decoding) are counted but not in the density.

Host synchronization: an unpadded prefill call never waits for the GPU (no value read back, no
shape that depends on values, no host-to-device copy), so the CPU keeps queueing kernels while
the GPU works; ``tests/test_no_host_sync.py`` checks it. The packed-position check starts at
layer 0 and raises at the last layer (:class:`PackedGuard`). What still syncs: the mask function
once per forward when a padding mask is passed, the padded path (its spans), and
:func:`attention_stats`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from longinfer._device_cache import device_cached
from longinfer.integrations import tokens as token_ids
from longinfer.integrations.graphs import CallGraphs
from longinfer.patterns.registry import PatternSpec, get_pattern
from longinfer.patterns.vertical_slash import VerticalSlashConfig
from longinfer.plans.schema import DEFAULT_PATTERN_CONFIG, HeadPlan, LayerPlan, Plan, default_plan_for

logger = logging.getLogger(__name__)

__all__ = [
    "IMPLEMENTATION",
    "SPARSE_MIN_QUERIES",
    "AttentionStats",
    "CallGraphs",
    "attend_layer",
    "HeadBucket",
    "attention_stats",
    "head_buckets",
    "longinfer_attention",
    "longinfer_mask",
    "patch",
    "plan_of",
    "prompt_end",
    "register",
    "reset_stats",
    "unpatch",
]

IMPLEMENTATION = "longinfer"  # the name registered with transformers
BACKENDS = ("auto", "triton", "torch")
# Set (by :func:`prompt_end`) while the forward that ends a prompt runs: its sparse calls estimate
# from the question's queries as a one-pass prefill of the prompt would (question_from on the prompt's
# length, not the chunk's rows).
_ENDS_PROMPT: contextvars.ContextVar[bool] = contextvars.ContextVar("longinfer_ends_prompt", default=False)


@contextlib.contextmanager
def prompt_end() -> Iterator[None]:
    """Mark the model calls inside as the ones that end a prompt (the last chunk of a chunked prefill).

    A vertical-slash head with ``question_from`` then estimates from the question's queries once the
    prompt (the call's keys) reaches ``question_from`` tokens, however few rows the call has
    (:meth:`~longinfer.patterns.VerticalSlashConfig.ending_prompt`): a chunked prefill gets the index a
    one-pass prefill gets for its question. :func:`longinfer.generate` and
    :func:`longinfer.memory.prefill_in_chunks` use it for their last prefill call; wrap your own last
    chunk in it when you chunk by hand. Decoding steps (dense) are unaffected.
    """
    token = _ENDS_PROMPT.set(True)
    try:
        yield
    finally:
        _ENDS_PROMPT.reset(token)


def _call_config(config: Any, k_len: int) -> Any:
    """A head's pattern config as this call runs it: :meth:`VerticalSlashConfig.ending_prompt` inside
    :func:`prompt_end`, else unchanged."""
    if _ENDS_PROMPT.get() and isinstance(config, VerticalSlashConfig):
        return config.ending_prompt(k_len)
    return config


# Calls with fewer queries than this run dense: decoding steps and tiny chunks, where estimating
# an index costs more than it saves (the kernels' query tile is 64).
SPARSE_MIN_QUERIES = 64
DENSITY_SAMPLE_ROWS = 8
# Sparse calls of more causal (query, key) pairs than this (over batch and query heads) run eagerly
# even with CUDA graphs: their GPU work hides the launches, and the graph's input copies only add
# time (H200, Qwen2.5-Coder-1.5B, docs/results/gpu-session5: a 64K prefill, 2.6e10 pairs per layer,
# took 2.7% longer with graphs; 16K/32K prefills and a 4K turn over 64K, 1.6e9-6.4e9, 0-5% shorter).
GRAPH_MAX_PAIRS = 16 * 10**9
# Float32 score elements per step of the masked (torch) path: bounds its workspace to ~256 MiB.
MASKED_SCORE_BUDGET = 64 * 2**20

_RUNTIME_ATTR = "_longinfer_runtime"  # on each attention module: its LayerRuntime
_PATCH_ATTR = "_longinfer_patch"  # on the model: PatchState


# --------------------------------------------------------------------------------------------
# Registration


def register() -> None:
    """Register ``"longinfer"`` with transformers' attention and mask interfaces (idempotent).

    Needed before ``from_pretrained(..., attn_implementation="longinfer")``; :func:`patch` calls it.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, longinfer_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, longinfer_mask)


def longinfer_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    use_vmap: bool = False,
    **kwargs: Any,
) -> torch.Tensor | None:
    """Mask interface: the key-padding mask ``bool [B, kv_length]`` the attention call needs, or ``None``.

    The causal and sliding-window structure is not materialized: the attention function applies
    it from the layer's ``sliding_window``, as a flash-attention backend would.

    Raises:
        NotImplementedError: extra mask overlays (``or_mask_function`` / ``and_mask_function``,
            e.g. bidirectional image tokens) or a pre-allocated (static) cache, which this
            integration does not reproduce; use ``sdpa`` for those.
    """
    if use_vmap:
        raise NotImplementedError(
            "longinfer attention supports causal and sliding-window masks only; this model adds a custom mask "
            "overlay (e.g. bidirectional image tokens). Use attn_implementation='sdpa' for it"
        )
    seen = int(q_offset) + q_length - kv_offset
    if kv_length > seen:
        raise NotImplementedError(
            f"the cache has {kv_length} key slots for {seen} tokens (a static, pre-allocated cache); longinfer "
            "needs the default DynamicCache: do not pass cache_implementation='static'"
        )
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"expected a 2-D padding mask [batch, keys], got shape {tuple(attention_mask.shape)}")
    mask = attention_mask[:, -kv_length:].to(torch.bool)
    if mask.shape[1] != kv_length:
        raise ValueError(f"the padding mask covers {mask.shape[1]} keys but the layer has {kv_length}")
    return None if bool(mask.all()) else mask


# --------------------------------------------------------------------------------------------
# Plans on modules


@dataclass(frozen=True)
class HeadBucket:
    """Query heads of one layer that share a head plan and run in one estimator call + kernel launch.

    Attributes:
        head: the shared head plan.
        q_heads: query head ids, grouped by KV head (``group_size`` consecutive ids per KV head).
        kv_heads: the KV heads they read, one per group.
        per_kv_group: estimate one index per KV head (the union of its query heads), set when the
            layer plan shares KV groups and the bucket holds whole KV groups.
    """

    head: HeadPlan
    q_heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    per_kv_group: bool = False

    @property
    def group_size(self) -> int:
        """Query heads per KV head inside the bucket (its GQA ratio)."""
        return len(self.q_heads) // len(self.kv_heads)


def head_buckets(layer: LayerPlan, num_kv_heads: int) -> tuple[HeadBucket, ...]:
    """Split a layer's heads into :class:`HeadBucket` s: same plan and same count per KV head.

    Query head ``h`` reads KV head ``h // (Hq // Hkv)``. A plan shared by whole KV groups gives one
    bucket with the model's own GQA ratio; a plan shared by, say, 2 of 3 heads in each group gives
    a bucket of ratio 2. Buckets never contain a K/V head twice, so GQA is never expanded.
    With ``layer.share_kv_groups``, buckets of whole KV groups get ``per_kv_group=True``; a KV
    group whose heads have different plans keeps per-head indices.
    """
    num_q_heads = len(layer.heads)
    group = num_q_heads // num_kv_heads
    buckets = []
    for head, head_ids in layer.head_groups():
        per_kv: dict[int, list[int]] = {}
        for h in head_ids:
            per_kv.setdefault(h // group, []).append(h)
        by_count: dict[int, list[int]] = {}
        for kv, members in per_kv.items():
            by_count.setdefault(len(members), []).append(kv)
        for count in sorted(by_count):
            kv_heads = tuple(sorted(by_count[count]))
            q_heads = tuple(h for kv in kv_heads for h in sorted(per_kv[kv]))
            whole_groups = count == group
            buckets.append(HeadBucket(head, q_heads, kv_heads, per_kv_group=layer.share_kv_groups and whole_groups))
    return tuple(buckets)


@dataclass
class LayerStats:
    """Counters of one layer's attention calls (see the module docstring for density)."""

    calls: int = 0
    decode_calls: int = 0
    dense_calls: int = 0
    sparse_calls: int = 0
    window_calls: int = 0
    graph_calls: int = 0  # sparse calls replayed from a CUDA graph
    total_pairs: float = 0.0  # (query, key) pairs of the model's mask, prefill calls, all heads
    kept_pairs: float = 0.0  # pairs computed by dense and windowed calls
    kept_sparse: torch.Tensor | None = None  # pairs computed by sparse calls (estimate; stays on device)

    def add_full(self, pairs: float, *, window: bool) -> None:
        self.total_pairs += pairs
        self.kept_pairs += pairs
        if window:
            self.window_calls += 1
        else:
            self.dense_calls += 1

    def add_sparse(self, pairs: float, kept: torch.Tensor) -> None:
        self.total_pairs += pairs
        kept = kept.detach().double()
        self.kept_sparse = kept if self.kept_sparse is None else self.kept_sparse + kept


@dataclass
class PackedGuard:
    """The packed-sequence check of one forward, shared by a patched model's layers.

    Layer 0 computes ``position_ids`` restarting inside a row on the device and starts an
    asynchronous copy of that flag to the host; the last layer reads it (the copy finished long
    before, so reading does not stall the GPU queue) and raises. Without this, layer 0 would wait
    for the GPU on every forward.
    """

    last_layer: int
    pending: tuple[torch.Tensor, Any] | None = None  # (host flag, CUDA event or None)

    def start(self, position_ids: torch.Tensor) -> None:
        restarts = (position_ids[:, 1:] - position_ids[:, :-1] != 1).any()
        if restarts.is_cuda:
            flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            flag.copy_(restarts, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending = (flag, event)
        else:
            self.pending = (restarts, None)

    def finish(self) -> None:
        """Raise ``NotImplementedError`` when the flag of :meth:`start` is set (clears it)."""
        if self.pending is None:
            return
        flag, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()  # recorded at layer 0: long complete by the last layer
        if bool(flag):
            raise NotImplementedError(
                "position_ids restart inside a row (packed sequences); longinfer runs padded batches only: pad the "
                "sequences and pass an attention_mask instead"
            )


@dataclass
class LayerRuntime:
    """What one attention module needs at call time: its layer plan, buckets and counters."""

    layer_idx: int
    layer: LayerPlan
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    backend: str
    buckets: tuple[HeadBucket, ...]
    stats: LayerStats = field(default_factory=LayerStats)
    guard: PackedGuard | None = None  # shared by the model's layers (patch); None: check at layer 0
    graphs: CallGraphs | None = None  # shared by the model's layers (patch); None: every call eager
    tokens: token_ids.TokenHistory | None = None  # shared (patch, for repeat_rows); None: ids unknown
    _index_cache: dict[tuple[int, torch.device], tuple[torch.Tensor | None, torch.Tensor | None]] = field(
        default_factory=dict, repr=False
    )
    _fallback_logged: bool = False

    @classmethod
    def build(cls, plan: Plan, layer_idx: int, backend: str, guard: PackedGuard | None = None,
              graphs: CallGraphs | None = None, tokens: token_ids.TokenHistory | None = None) -> LayerRuntime:
        if not 0 <= layer_idx < plan.num_layers:
            raise ValueError(f"attention layer {layer_idx} is outside the plan's {plan.num_layers} layers")
        layer = plan.layers[layer_idx]
        return cls(layer_idx, layer, plan.num_q_heads, plan.num_kv_heads, plan.head_dim, backend,
                   head_buckets(layer, plan.num_kv_heads), guard=guard, graphs=graphs, tokens=tokens)

    @functools.cached_property
    def host_sync(self) -> bool:
        """Whether a bucket's estimate synchronizes with the host (``PatternSpec.host_sync``): then the
        layer's calls are never recorded into a CUDA graph (the capture would fail on the first read)."""
        return any(get_pattern(bucket.head.pattern).host_sync for bucket in self.buckets)

    def estimation_rows(self, q_len: int, k_len: int, device: torch.device,
                        span: token_ids.Span = None) -> tuple[torch.Tensor | None, ...]:
        """Per bucket, the estimation positions of a call with ``repeat_rows`` (from the token
        history; spread rows when it has none), else ``None``."""
        rows = []
        for bucket in self.buckets:
            config = _call_config(bucket.head.config, k_len)
            if not (isinstance(config, VerticalSlashConfig) and config.repeat_rows):
                rows.append(None)
                continue
            if self.tokens is None:
                self.tokens = token_ids.TokenHistory()  # an unpatched module: no ids (logged once)
            rows.append(self.tokens.estimation_rows(config, q_len, k_len, device, span))
        return tuple(rows)

    def indices(self, position: int, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Index tensors ``(q_heads, kv_heads)`` of bucket ``position`` on ``device``; ``None`` = all, in order."""
        key = (position, device)
        if key not in self._index_cache:
            bucket = self.buckets[position]
            q_all = bucket.q_heads == tuple(range(self.num_q_heads))
            kv_all = bucket.kv_heads == tuple(range(self.num_kv_heads))
            self._index_cache[key] = (
                None if q_all else torch.tensor(bucket.q_heads, device=device),
                None if kv_all else torch.tensor(bucket.kv_heads, device=device),
            )
        return self._index_cache[key]


@dataclass(frozen=True)
class PatchState:
    """Kept on a patched model: its plan, the implementation to restore, the backend asked for, and
    the forward hook that records token ids (plans with ``repeat_rows``; ``None`` otherwise)."""

    plan: Plan
    previous_implementation: str
    backend: str
    token_hook: Any = None


# --------------------------------------------------------------------------------------------
# patch / unpatch / stats


def _interpreter_enabled() -> bool:
    from longinfer.ops._checks import interpreter_enabled

    return interpreter_enabled()


def _kernel_support(device: torch.device, head_dim: int) -> str | None:
    """Why the Triton kernels cannot run here, or ``None`` when they can."""
    from longinfer.ops._checks import SUPPORTED_HEAD_DIMS

    if device.type == "cpu" and not _interpreter_enabled():
        return "the tensors are on the CPU and TRITON_INTERPRET=1 is not set"
    if device.type not in ("cpu", "cuda"):
        return f"the kernels do not run on {device.type}"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {head_dim} is not one of the kernels' {SUPPORTED_HEAD_DIMS}"
    return None


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _long_rule_words(config: VerticalSlashConfig) -> str:
    """How the default's columns and floors depend on a call's length (its keys or query rows), for the log."""
    counted = "query rows" if config.thresholds_on == "queries" else "keys"
    shared = "columns shared within each KV group" if config.group_columns else "each head its own columns"
    if config.group_columns and config.group_columns_below:
        shared += f" below {config.group_columns_below} {counted}, each head its own from there"
    diagonals = f"{config.min_slash} diagonals" if config.min_slash else ""
    if config.min_slash_share:
        grown = f"diagonals for {config.min_slash_share * 100:.2f}% of the {counted}"
        diagonals = f"{diagonals} ({grown}, if more)" if diagonals else grown
    floors = [text for text in (f"{config.min_vertical} columns" if config.min_vertical else "", diagonals) if text]
    if floors:
        shared += (f"; at least {' and '.join(floors)} per head"
                   + (f" from {config.floor_from} {counted}" if config.floor_from else ""))
    if config.question_from:
        shared += f"; the last {config.last_q} queries estimate too from {config.question_from} {counted}"
    return shared


def _resolve_plan(plan: Plan | str | os.PathLike[str] | None, model: Any) -> Plan:
    config = model.config
    if plan is None:
        model_id = str(getattr(config, "name_or_path", "") or "")
        resolved = default_plan_for(config, model_id=model_id)
        logger.info(
            "no plan given for %s: using the default plan (vertical-slash, coverage tau=%s from %d %s "
            "queries, every head; %s; layers dense below %d keys; the last %d query rows dense)",
            model_id or type(model).__name__, DEFAULT_PATTERN_CONFIG.tau, DEFAULT_PATTERN_CONFIG.last_q,
            DEFAULT_PATTERN_CONFIG.query_sampling, _long_rule_words(DEFAULT_PATTERN_CONFIG),
            resolved.layers[0].dense_below, resolved.layers[0].dense_last,
        )
        return resolved
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        path = Path(plan)
        if not path.is_file():
            raise FileNotFoundError(f"plan file {path} does not exist; pass an existing plan JSON or None")
        return Plan.load(path)
    raise TypeError(f"plan must be a Plan, a path to a plan JSON, or None; got {type(plan).__name__}")


def _attention_modules(model: Any) -> dict[int, torch.nn.Module]:
    """The model's attention modules by ``layer_idx`` (modules with ``layer_idx``, ``scaling``, ``is_causal``)."""
    found: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and hasattr(module, "scaling") and hasattr(module, "is_causal"):
            if idx in found:
                raise ValueError(
                    f"{type(model).__name__} has two attention modules for layer {idx}; multimodal and "
                    "encoder-decoder models are not supported, patch the language model only"
                )
            found[idx] = module
    return found


def _current_implementation(model: Any) -> str:
    return str(getattr(model.config, "_attn_implementation", None) or "eager")


def _set_implementation(model: Any, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name
    if _current_implementation(model) != name:
        raise ValueError(f"{type(model).__name__} did not switch to attention {name!r}")


def _stock_implementation(model: Any) -> str:
    """What to restore when the model was loaded with ``attn_implementation="longinfer"``."""
    return "sdpa" if getattr(model, "_supports_sdpa", False) else "eager"


def patch(model: Any, plan: Plan | str | os.PathLike[str] | None = None, *, backend: str = "auto",
          cuda_graphs: bool | CallGraphs = True) -> Plan:
    """Run ``model``'s attention with longinfer and ``plan``.

    Args:
        model: a loaded transformers causal LM (Llama, Qwen2/2.5/3, Mistral, Phi-3, Gemma 2/3, ...).
        plan: a :class:`Plan`, a plan JSON path, or ``None`` for :func:`default_plan_for` the model
            (logged). Patching a patched model replaces its plan.
        backend: ``"auto"`` (Triton kernels where they run, else the torch path, decided per
            call), ``"triton"`` or ``"torch"`` (see the module docstring).
        cuda_graphs: replay a sparse call that repeats (the same plan and shapes in several
            layers of one forward) from a CUDA graph (:mod:`longinfer.integrations.graphs`); costs
            the static buffers of at most two calls, and only for calls of at most 512 MiB of inputs
            and outputs and :data:`GRAPH_MAX_PAIRS` causal pairs (chunks over a cache, prefills up
            to ~32K tokens), which are bound by launching their ~120 kernels. Pass a
            :class:`~longinfer.integrations.graphs.CallGraphs` for other limits, ``False`` for none.

    Returns:
        The plan in use.

    Raises:
        ValueError: the plan does not match the model (the message names every differing field),
            an unknown backend, ``"triton"`` where the kernels cannot run, or a model whose
            attention modules do not match the plan's layers.
        FileNotFoundError: a plan path that does not exist.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    register()
    resolved = _resolve_plan(plan, model)
    resolved.check_matches(model.config)
    device = _model_device(model)
    if backend == "triton" and (reason := _kernel_support(device, resolved.head_dim)) is not None:
        raise ValueError(f"backend='triton' cannot run: {reason}; use backend='torch' or 'auto'")
    modules = _attention_modules(model)
    if sorted(modules) != list(range(resolved.num_layers)):
        raise ValueError(
            f"{type(model).__name__} has attention modules for layers {sorted(modules)} but the plan has "
            f"{resolved.num_layers} layers"
        )
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(text_config, "attn_logit_softcapping", None) is not None:
        logger.warning(
            "%s uses attention logit softcapping, which the sparse kernels do not support: every layer runs "
            "exact dense attention with the softcap (no speedup). Set config.attn_logit_softcapping=None to "
            "run sparse (Gemma 2 was trained with it)", type(model).__name__,
        )
    previous = getattr(model, _PATCH_ATTR, None)
    if previous is not None:
        _remove_token_hook(previous)
        restore = previous.previous_implementation
    else:
        current = _current_implementation(model)
        restore = current if current != IMPLEMENTATION else _stock_implementation(model)
    _set_implementation(model, IMPLEMENTATION)
    guard = PackedGuard(last_layer=resolved.num_layers - 1)
    graphs = cuda_graphs if isinstance(cuda_graphs, CallGraphs) else CallGraphs() if cuda_graphs else None
    history = token_ids.TokenHistory() if token_ids.plan_uses_token_ids(resolved) else None
    for idx, module in modules.items():
        setattr(module, _RUNTIME_ATTR, LayerRuntime.build(resolved, idx, backend, guard, graphs, history))
    hook = None if history is None else token_ids.install(model, history)
    setattr(model, _PATCH_ATTR, PatchState(resolved, restore, backend, hook))
    logger.debug("patched %s: %d layers, backend %s", type(model).__name__, len(modules), backend)
    return resolved


def unpatch(model: Any) -> None:
    """Restore the attention implementation ``model`` had before :func:`patch` and drop the plan.

    A model loaded with ``attn_implementation="longinfer"`` goes back to ``sdpa`` (``eager`` for
    models without SDPA support). Raises ``ValueError`` for a model that is not patched.
    """
    state: PatchState | None = getattr(model, _PATCH_ATTR, None)
    if state is None and _current_implementation(model) != IMPLEMENTATION:
        raise ValueError(f"{type(model).__name__} is not patched by longinfer; nothing to undo")
    restore = state.previous_implementation if state is not None else _stock_implementation(model)
    _set_implementation(model, restore)
    for module in model.modules():
        if hasattr(module, _RUNTIME_ATTR):
            delattr(module, _RUNTIME_ATTR)
    if state is not None:
        _remove_token_hook(state)
        delattr(model, _PATCH_ATTR)


def _remove_token_hook(state: PatchState) -> None:
    if state.token_hook is not None:
        state.token_hook.remove()


def plan_of(model: Any) -> Plan | None:
    """The plan :func:`patch` attached to ``model``, or ``None``."""
    state: PatchState | None = getattr(model, _PATCH_ATTR, None)
    return None if state is None else state.plan


@dataclass(frozen=True)
class AttentionStats:
    """Attention calls since the last :func:`reset_stats` (see the module docstring).

    Attributes:
        density: share of the model's attention pairs that prefill calls computed (1.0 = dense;
            ``nan`` when no prefill call ran).
        layer_density: the same per layer, in layer order.
        calls, decode_calls, dense_calls, sparse_calls, window_calls: call counts over all layers;
            decode calls have fewer than ``SPARSE_MIN_QUERIES`` queries, dense calls ran dense by
            the plan's threshold, window calls ran the model's sliding window (or softcap) exactly.
            ``calls`` counts attention calls; the others count a padded batch once per sequence.
        graph_calls: the sparse calls replayed from a CUDA graph (``patch(..., cuda_graphs=True)``).
    """

    density: float
    layer_density: tuple[float, ...]
    calls: int
    decode_calls: int
    dense_calls: int
    sparse_calls: int
    window_calls: int
    graph_calls: int = 0


def _runtimes(model: Any) -> list[LayerRuntime]:
    runtimes = [getattr(m, _RUNTIME_ATTR) for m in model.modules() if hasattr(m, _RUNTIME_ATTR)]
    return sorted(runtimes, key=lambda rt: rt.layer_idx)


def attention_stats(model: Any) -> AttentionStats:
    """Density and call counts of a patched model's attention since patching or :func:`reset_stats`.

    Reads the per-layer counters (one host sync for the sparse estimates).
    """
    runtimes = _runtimes(model)
    if not runtimes:
        raise ValueError(f"{type(model).__name__} is not patched by longinfer; call longinfer.patch(model) first")
    layer_density = []
    kept_all = total_all = 0.0
    for rt in runtimes:
        s = rt.stats
        kept = s.kept_pairs + (float(s.kept_sparse) if s.kept_sparse is not None else 0.0)
        layer_density.append(kept / s.total_pairs if s.total_pairs else math.nan)
        kept_all += kept
        total_all += s.total_pairs
    counts = {name: sum(getattr(rt.stats, name) for rt in runtimes)
              for name in ("calls", "decode_calls", "dense_calls", "sparse_calls", "window_calls", "graph_calls")}
    return AttentionStats(density=kept_all / total_all if total_all else math.nan,
                          layer_density=tuple(layer_density), **counts)


def reset_stats(model: Any) -> None:
    """Zero the attention counters of a patched model."""
    for rt in _runtimes(model):
        rt.stats = LayerStats()


# --------------------------------------------------------------------------------------------
# The attention function


def attend_layer(plan: Plan, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                 scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """One layer's prefill attention exactly as a patched model computes it, outside a model.

    ``q [B, Hq, Nq, D]``, ``k, v [B, Hkv, Nk, D]`` (queries = the last ``Nq`` positions, no
    padding, no sliding window). The layer's rules apply: dense below ``dense_below``, head buckets,
    per-KV-group indices, the dense tail; every call runs eagerly (no CUDA graph). For benchmarks
    and tools that time or compare a plan layer by layer on captured q/k/v. Returns
    ``[B, Hq, Nq, D]``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    runtime = LayerRuntime.build(plan, layer_idx, backend)
    shape = (q.shape[1], k.shape[1], q.shape[3])
    if shape != (runtime.num_q_heads, runtime.num_kv_heads, runtime.head_dim):
        raise ValueError(f"q/k have (query heads, KV heads, head_dim) {shape}; the plan has "
                         f"{(runtime.num_q_heads, runtime.num_kv_heads, runtime.head_dim)}")
    ctx = _CallContext(runtime, _call_backend(runtime, q.device), q.shape[3] ** -0.5 if scale is None else scale,
                       None, None)
    return _attend_contiguous(ctx, q, k, v)


def _runtime_for(module: torch.nn.Module) -> LayerRuntime:
    """The module's runtime; a module of a model loaded with ``attn_implementation="longinfer"``
    and never patched gets the default plan on first use."""
    runtime = getattr(module, _RUNTIME_ATTR, None)
    if runtime is None:
        config = module.config
        plan = default_plan_for(config, model_id=str(getattr(config, "name_or_path", "") or ""))
        if module.layer_idx == 0:
            logger.info("no plan attached (call longinfer.patch(model, plan)); every layer uses the default plan")
        runtime = LayerRuntime.build(plan, module.layer_idx, "auto")
        setattr(module, _RUNTIME_ATTR, runtime)
    return runtime


def _call_backend(runtime: LayerRuntime, device: torch.device) -> str:
    if runtime.backend != "auto":
        return runtime.backend
    reason = _kernel_support(device, runtime.head_dim)
    if reason is None:
        return "triton"
    if not runtime._fallback_logged and runtime.layer_idx == 0:
        level = logging.INFO if device.type == "cpu" else logging.WARNING
        logger.log(level, "%s: sparse patterns run on the torch backend (exact, no speedup)", reason)
    runtime._fallback_logged = True
    return "torch"


def _check_packed_positions(runtime: LayerRuntime, position_ids: torch.Tensor | None) -> None:
    """Refuse position ids that restart inside a row (packed sequences without a padding mask).

    With a shared :class:`PackedGuard` the check starts at layer 0 and raises at the last layer
    (no host synchronization); a runtime without one checks at layer 0 directly.
    """
    guard = runtime.guard or PackedGuard(last_layer=runtime.layer_idx)
    if runtime.layer_idx == 0:
        guard.pending = None
        if position_ids is not None and position_ids.dim() == 2 and position_ids.shape[1] >= 2:
            guard.start(position_ids)
    if runtime.layer_idx == guard.last_layer:
        guard.finish()


def longinfer_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` function (see the module docstring for what it does).

    Args:
        module: the model's attention module (``layer_idx`` selects the layer plan).
        query: ``[B, Hq, Nq, D]``; key, value: ``[B, Hkv, Nk, D]`` (cached prefix included).
        attention_mask: ``bool [B, Nk]`` key-padding mask from :func:`longinfer_mask`, or ``None``.
        scaling: softmax scale (default ``1/sqrt(D)``); sliding_window, softcap: the layer's own.

    Returns:
        ``(out [B, Nq, Hq, D], None)``; attention weights are never returned.
    """
    if dropout and module.training:
        raise ValueError("longinfer attention is inference-only (no dropout, no backward); call model.eval()")
    if kwargs.get("output_attentions"):
        raise ValueError("longinfer attention does not return attention weights; use attn_implementation='eager'")
    if kwargs.get("s_aux") is not None or kwargs.get("position_bias") is not None:
        raise NotImplementedError("attention sinks / position biases are not supported by longinfer attention")
    if not (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        raise NotImplementedError("longinfer attention is causal only; this layer is bidirectional")
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.dtype != torch.bool):
        raise ValueError(
            "longinfer attention got a prepared 4-D or float mask; pass a 2-D padding mask (attention_mask) "
            "and let the model build the rest"
        )
    runtime = _runtime_for(module)
    _, hq, nq, d = query.shape
    hkv = key.shape[1]
    if (hq, hkv, d) != (runtime.num_q_heads, runtime.num_kv_heads, runtime.head_dim):
        raise ValueError(
            f"layer {runtime.layer_idx} has {hq} query heads, {hkv} KV heads, head_dim {d}; the plan expects "
            f"{runtime.num_q_heads}, {runtime.num_kv_heads}, {runtime.head_dim}"
        )
    if attention_mask is None and nq > 1:
        _check_packed_positions(runtime, kwargs.get("position_ids"))
    scale = scaling if scaling is not None else d**-0.5
    window = sliding_window if sliding_window is not None and sliding_window > 0 else None
    backend = _call_backend(runtime, query.device)
    ctx = _CallContext(runtime, backend, scale, window, softcap)
    runtime.stats.calls += 1
    if attention_mask is None:
        out = _attend_contiguous(ctx, query, key, value)
    elif nq < SPARSE_MIN_QUERIES:
        runtime.stats.decode_calls += 1
        out = _masked_attention(query, key, value, scale, _causal_rows(window, attention_mask), softcap)
    else:
        out = _attend_padded(ctx, query, key, value, attention_mask)
    return out.transpose(1, 2).contiguous(), None


@dataclass(frozen=True)
class _CallContext:
    runtime: LayerRuntime
    backend: str
    scale: float
    window: int | None
    softcap: float | None
    span: token_ids.Span = None  # a padded batch's sequence (its token ids), None: the whole batch


def _sequence_spans(key_valid: torch.Tensor) -> list[tuple[int, int]]:
    """Per row of ``key_valid bool [B, Nk]``, the contiguous span ``(start, end)`` of valid keys.

    Raises ``ValueError`` when a row's valid keys are not contiguous (padding in the middle).
    """
    nk = key_valid.shape[1]
    as_int = key_valid.to(torch.int8)
    counts = as_int.sum(1)
    first = as_int.argmax(1)
    last = nk - 1 - as_int.flip(1).argmax(1)
    rows = torch.stack([counts, first, last], 1).tolist()
    spans = []
    for b, (count, start, stop) in enumerate(rows):
        if count == 0:
            spans.append((0, 0))
        elif count != stop - start + 1:
            raise ValueError(
                f"sequence {b} of the batch has padding between its tokens; longinfer prefill needs left or right "
                "padding (one contiguous run of tokens per sequence)"
            )
        else:
            spans.append((start, stop + 1))
    return spans


def _attend_padded(ctx: _CallContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   key_valid: torch.Tensor) -> torch.Tensor:
    """A padded batch, one sequence at a time on its valid span; padded query rows give zeros.

    Query row ``i`` sits at key position ``Nk - Nq + i``; sequence ``b``'s valid rows are those
    inside its span, and they are the last positions of the span (bottom-right aligned).
    """
    nq, nk = q.shape[2], k.shape[2]
    q_start = nk - nq
    out = torch.zeros_like(q)
    for b, (start, stop) in enumerate(_sequence_spans(key_valid)):
        first = max(start, q_start)
        if stop <= first:
            continue  # no real query of this sequence in the call
        rows = slice(first - q_start, stop - q_start)
        out[b : b + 1, :, rows] = _attend_contiguous(
            dataclasses.replace(ctx, span=(b, start, stop)), q[b : b + 1, :, rows], k[b : b + 1, :, start:stop],
            v[b : b + 1, :, start:stop]
        )
    return out


def _causal_pairs(nq: int, nk: int, window: int | None = None) -> int:
    """(query, key) pairs of a bottom-right causal mask, optionally windowed, for one head of one sequence.

    Query ``i`` at position ``p = nk - nq + i`` has ``min(p + 1, window)`` keys.
    """
    lo, hi = nk - nq + 1, nk  # p + 1 ranges over [lo, hi]
    if window is None or window >= hi:
        return (lo + hi) * nq // 2
    below = max(0, min(hi, window) - lo + 1)  # rows with p + 1 <= window
    small = (lo + lo + below - 1) * below // 2
    return small + (nq - below) * window


def _attend_contiguous(ctx: _CallContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unpadded ``q [B, Hq, Nq, D]`` against ``k, v [B, Hkv, Nk, D]`` (queries = last positions)."""
    runtime, stats = ctx.runtime, ctx.runtime.stats
    bsz, hq, nq, _ = q.shape
    nk = k.shape[2]
    window = ctx.window if ctx.window is not None and ctx.window < nk else None
    decode = nq < SPARSE_MIN_QUERIES
    if decode:
        stats.decode_calls += 1
    if ctx.softcap is not None or window is not None:
        if not decode:
            stats.add_full(_causal_pairs(nq, nk, window) * bsz * hq, window=True)
        if ctx.softcap is None and ctx.backend == "triton" and not decode:
            from longinfer import ops

            return ops.a_shape_attention(q, k, v, 0, window, sm_scale=ctx.scale)
        return _masked_attention(q, k, v, ctx.scale, _causal_rows(window), ctx.softcap)
    if decode or runtime.layer.runs_dense(nk) or runtime.layer.dense_rows(nq, nk) == nq:
        if not decode:
            stats.add_full(_causal_pairs(nq, nk) * bsz * hq, window=False)
        return _dense_attention(q, k, v, ctx.scale, ctx.backend)
    stats.sparse_calls += 1
    return _sparse_attention(ctx, q, k, v)


def _sparse_attention(ctx: _CallContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A sparse call (:func:`_sparse_call`), replayed from a CUDA graph where the model's
    :class:`~longinfer.integrations.graphs.CallGraphs` has one for its plan and shapes and the call
    is small enough to be bound by launching its kernels (:data:`GRAPH_MAX_PAIRS`)."""
    runtime = ctx.runtime
    head_indices = [runtime.indices(position, q.device) for position in range(len(runtime.buckets))]
    rows = runtime.estimation_rows(q.shape[2], k.shape[2], q.device, ctx.span)
    given_rows = tuple(r for r in rows if r is not None)
    call = functools.partial(_sparse_call, ctx, head_indices, tuple(r is not None for r in rows))
    pairs = _causal_pairs(q.shape[2], k.shape[2]) * q.shape[0] * q.shape[1]
    if runtime.graphs is None or ctx.backend != "triton" or pairs > GRAPH_MAX_PAIRS or runtime.host_sync:
        out, kept = call(q, k, v, *given_rows)
    else:
        key = (runtime.buckets, runtime.layer.dense_last, ctx.scale, q.shape, k.shape, v.shape, q.dtype, q.device,
               tuple(r.shape for r in given_rows), _ENDS_PROMPT.get())
        replays = runtime.graphs.replays
        out, kept = runtime.graphs(key, call, (q, k, v, *given_rows), output_bytes=q.numel() * q.element_size() + 4)
        runtime.stats.graph_calls += runtime.graphs.replays - replays
    runtime.stats.add_sparse(pairs, kept)
    return out


def _sparse_call(ctx: _CallContext, head_indices: list[tuple[torch.Tensor | None, torch.Tensor | None]],
                 has_rows: tuple[bool, ...], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 *given_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each bucket of heads: estimate its index from ``q``/``k`` and run its kernel, with the
    layer's dense tail rows (:meth:`LayerPlan.dense_rows`, fewer than ``Nq``) attending densely.

    ``head_indices``: each bucket's ``(q_heads, kv_heads)`` index tensors (:meth:`LayerRuntime.indices`).
    ``given_rows``: the estimation positions of the buckets marked in ``has_rows``, in bucket order
    (:meth:`LayerRuntime.estimation_rows`); the other buckets sample their config's own.
    Returns the output ``[B, Hq, Nq, D]`` and the kept pairs (0-d float tensor, all heads).
    No host synchronization (it may be recorded into a CUDA graph).
    """
    runtime = ctx.runtime
    bsz, _, nq, _ = q.shape
    nk = k.shape[2]
    pairs = _causal_pairs(nq, nk) * bsz
    tail = runtime.layer.dense_rows(nq, nk)
    out = None
    kept = None
    rows = iter(given_rows)
    for bucket, (q_idx, kv_idx), with_rows in zip(runtime.buckets, head_indices, has_rows):
        qb = q if q_idx is None else q.index_select(1, q_idx)
        kb = k if kv_idx is None else k.index_select(1, kv_idx)
        vb = v if kv_idx is None else v.index_select(1, kv_idx)
        ob, ratio = _run_bucket(bucket, qb, kb, vb, ctx, tail, next(rows) if with_rows else None)
        bucket_kept = ratio * (pairs * len(bucket.q_heads))
        kept = bucket_kept if kept is None else kept + bucket_kept
        if q_idx is None:
            out = ob
        else:
            if out is None:
                out = torch.empty_like(q)
            out.index_copy_(1, q_idx, ob)
    if tail:
        # The sampled kept share stands for the sparse rows too; the tail's rows are all kept.
        tail_pairs = _causal_pairs(tail, nk) * bsz * q.shape[1]
        kept = kept * (1 - tail_pairs / (pairs * q.shape[1])) + tail_pairs
    return out, kept


def _run_bucket(bucket: HeadBucket, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                ctx: _CallContext, tail: int, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one bucket and the share of its causal pairs it kept (a 0-d tensor).

    ``q [B, n * g, Nq, D]``, ``k, v [B, n, Nk, D]`` (the bucket's heads). The selection has
    ``n * g`` heads, or ``n`` with ``bucket.per_kv_group``; a KV head's mask then applies to each
    of its ``g`` query heads, so the mean kept share over the index heads is the per-query-head one.
    The last ``tail`` query rows (whole kernel tiles, see :meth:`LayerPlan.dense_rows`) attend densely;
    the kept share counts them as the selection would (the caller corrects it). ``positions``: the
    estimation rows of a vertical-slash bucket with ``repeat_rows`` (built valid: not re-checked).
    """
    head = bucket.head
    spec = get_pattern(head.pattern)
    if head.pattern == "dense":
        return _dense_attention(q, k, v, ctx.scale, ctx.backend), torch.ones((), device=q.device)
    given = {} if positions is None else {"positions": positions, "check_positions": False}
    config = _call_config(head.config, k.shape[2])
    selection = spec.estimate(q, k, config, sm_scale=ctx.scale, per_kv_group=bucket.per_kv_group, **given)
    nq, nk = q.shape[2], k.shape[2]
    if ctx.backend == "triton":
        from longinfer.patterns.vertical_slash import VerticalSlashSelection

        # The kernel runs the tail's tiles dense when they are whole tiles of its own size (dense_from
        # is a multiple of 64, so every block size but 128).
        if isinstance(selection, VerticalSlashSelection) and (not tail or (nk - tail) % selection.block_size == 0):
            return _run_vertical_slash_kernel(q, k, v, selection, ctx.scale, nk - tail if tail else None)
        ratio = _sampled_density(_counts_of_mask(_reference_rows(spec, selection), nk), nq, nk, q.device)
        out = spec.run(q, k, v, selection, config, sm_scale=ctx.scale)
    else:
        rows_mask = _selection_rows(spec, selection)
        ratio = _sampled_density(_counts_of_mask(rows_mask, nk), nq, nk, q.device)
        out = _masked_attention(q, k, v, ctx.scale, rows_mask)
    if tail:
        out[:, :, nq - tail:] = _dense_attention(q[:, :, nq - tail:], k, v, ctx.scale, ctx.backend)
    return out, ratio


def _run_vertical_slash_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: Any,
                               scale: float, dense_from: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel on a vertical-slash selection, and its kept share counted on the kernel's index.

    The index is built without sorting (the estimator lists each head's entries ascending and
    distinct, ``-1`` after them), and the sampled rows' kept keys come from it in closed form
    (:func:`longinfer.ops.index.vertical_slash_kept`): no ``[B, H, R, Nk]`` mask. Query tiles at
    or after ``dense_from`` run dense in the same launch.
    """
    from longinfer import ops
    from longinfer.ops.index import build_vertical_slash_index, vertical_slash_kept

    index = build_vertical_slash_index(selection.vertical, selection.slash, selection.k_len, selection.block_size,
                                       presorted=True)
    ratio = _sampled_density(lambda positions, first, last: vertical_slash_kept(index, positions),
                             q.shape[2], k.shape[2], q.device)
    out = ops.vertical_slash_attention(q, k, v, index=index, block_size=selection.block_size, sm_scale=scale,
                                       dense_from=dense_from)
    return out, ratio


def _reference_rows(spec: PatternSpec, selection: Any) -> RowsMask:
    """The selection's reference mask as a :data:`RowsMask`."""
    return lambda positions, first, last: spec.reference_mask(selection, positions)


def _selection_rows(spec: PatternSpec, selection: Any) -> RowsMask:
    """Mask builder of a selection for the torch path.

    Vertical-slash and block-sparse masks are the same for every row of a ``block_size`` query
    tile apart from causality (see :mod:`longinfer.ops.reference`), so they are built once per
    tile (at its last row) and repeated over its rows: ``block_size`` times less index work.
    """
    from longinfer.patterns.block_sparse import BlockSparseSelection
    from longinfer.patterns.vertical_slash import SegmentedVerticalSlashSelection, VerticalSlashSelection

    # Segment boundaries fall on tile boundaries, so segmented selections are tile-constant too.
    if not isinstance(selection, (VerticalSlashSelection, SegmentedVerticalSlashSelection, BlockSparseSelection)):
        return _reference_rows(spec, selection)
    tile, nk = selection.block_size, selection.k_len
    num_tiles = math.ceil(nk / tile)
    cached: list[torch.Tensor] = []  # every tile's mask, when that fits the budget

    def tile_masks(first: int, stop: int, device: torch.device) -> torch.Tensor:
        """Masks ``[B, H, stop - first, Nk]`` of tiles ``first .. stop - 1`` (at their last rows)."""
        if num_tiles * nk * selection.num_heads <= MASKED_SCORE_BUDGET:
            if not cached:
                cached.append(tile_masks_uncached(0, num_tiles, device))
            return cached[0][:, :, first:stop]
        return tile_masks_uncached(first, stop, device)

    def tile_masks_uncached(first: int, stop: int, device: torch.device) -> torch.Tensor:
        last_rows = (torch.arange(first, stop, device=device) * tile + tile - 1).clamp(max=nk - 1)
        return spec.reference_mask(selection, last_rows)

    def build(positions: torch.Tensor, first: int, last: int) -> torch.Tensor:
        first_tile = first // tile
        per_tile = tile_masks(first_tile, last // tile + 1, positions.device)  # [B, H, T, Nk]
        keys = torch.arange(nk, device=positions.device)
        return per_tile[:, :, positions // tile - first_tile] & (keys[None, :] <= positions[:, None])

    return build


def _density_offsets(nq: int) -> tuple[int, int, int]:
    """``(count, first, last)``: how many query rows :func:`_sampled_density` samples and the
    offsets (into the ``nq`` queries) of the first and last, from the sizes alone.

    Row ``i`` of ``count`` sits at offset ``min(nq - 1, ((2 * i * count + 2 * i + 1) * nq) // (2 * count**2))``:
    the queries are cut into ``count`` equal strata and stratum ``i`` is sampled at the fraction
    ``(2i + 1) / (2 count)`` of its length (integer arithmetic, so host and device agree exactly).
    """
    count = min(DENSITY_SAMPLE_ROWS, nq)
    return count, _density_offset(0, count, nq), _density_offset(count - 1, count, nq)


def _density_offset(i: int, count: int, nq: int) -> int:
    return min(nq - 1, ((2 * i * count + 2 * i + 1) * nq) // (2 * count * count))


# Kept keys of sampled rows: (positions, first, last) as for RowsMask -> counts [B|1, H, R].
RowsKept = Callable[[torch.Tensor, int, int], torch.Tensor]


def _counts_of_mask(rows_mask: RowsMask, nk: int) -> RowsKept:
    return lambda positions, first, last: rows_mask(positions, first, last)[..., :nk].sum(-1)


@device_cached(maxsize=32)
def _density_positions(nq: int, nk: int, device: torch.device) -> torch.Tensor:
    """Absolute positions ``[R]`` of :func:`_sampled_density`'s rows, built on ``device`` once per
    shape and shared by every layer (read-only)."""
    count = _density_offsets(nq)[0]
    step = 2 * count + 2  # (2 i count + 2 i + 1) = i * step + 1
    offsets = torch.arange(count, device=device).mul_(step).add_(1).mul_(nq).floor_divide_(2 * count * count)
    return offsets.clamp_(max=nq - 1).add_(nk - nq)


def _sampled_density(rows_kept: RowsKept, nq: int, nk: int, device: torch.device) -> torch.Tensor:
    """Kept share of the causal pairs of ``DENSITY_SAMPLE_ROWS`` evenly spaced query rows (0-d tensor).

    ``rows_kept`` counts the selection's kept keys per sampled row. The queries are cut into
    equal strata and stratum ``i`` is sampled at the fraction ``(2i + 1) / (2R)`` of its length, so
    the samples also spread over the positions inside a 64-row query tile (masks rounded to whole
    tiles differ between a tile's first and last rows). The row positions are computed on the
    device from the sizes (no host-to-device copy, hence no host synchronization).
    """
    count, first, last = _density_offsets(nq)
    kept = rows_kept(_density_positions(nq, nk, device), nk - nq + first, nk - nq + last)
    pairs = sum(nk - nq + _density_offset(i, count, nq) + 1 for i in range(count))
    return kept.sum(dtype=torch.float32).div_(kept.shape[0] * kept.shape[1] * pairs)


def _dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
    """Dense bottom-right causal attention without a GQA copy: SDPA (``enable_gqa``) or the dense kernel."""
    nq, nk = q.shape[2], k.shape[2]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if nq == nk:
        return sdpa(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    if nq == 1:
        return sdpa(q, k, v, scale=scale, enable_gqa=True)  # the last position sees every key
    if backend == "triton":
        from longinfer import ops

        return ops.dense_attention(q, k, v, sm_scale=scale)
    return _masked_attention(q, k, v, scale, _causal_rows(None))


# A mask builder: (positions, first, last) -> bool [B|1, H|1, R, >= last + 1] with H in {1, Hkv, Hq}:
# positions = ascending absolute query positions [R] (int64, on the device), first/last = the
# smallest and largest as Python ints, so building never reads a tensor back to the host.
RowsMask = Callable[[torch.Tensor, int, int], torch.Tensor]


def _causal_rows(window: int | None, key_valid: torch.Tensor | None = None) -> RowsMask:
    """Mask builder: causal, within ``window`` (``i - j < window``), on ``key_valid bool [B, Nk]`` keys."""

    def build(positions: torch.Tensor, first: int, last: int) -> torch.Tensor:
        keys = torch.arange(last + 1, device=positions.device)
        mask = keys[None, :] <= positions[:, None]
        if window is not None:
            mask &= positions[:, None] - keys[None, :] < window
        mask = mask[None, None]
        if key_valid is not None:
            mask = mask & key_valid[:, None, None, : keys.numel()]
        return mask

    return build


def _row_chunks(bsz: int, hq: int, nq: int, nk: int) -> Iterator[tuple[int, int]]:
    rows = max(1, min(nq, MASKED_SCORE_BUDGET // max(1, bsz * hq * nk)))
    for start in range(0, nq, rows):
        yield start, min(start + rows, nq)


def _masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    rows_mask: RowsMask,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention restricted to a mask, over query chunks (the torch path).

    Args:
        q: ``[B, Hq, Nq, D]``, the last ``Nq`` of ``Nk`` positions; k, v: ``[B, Hkv, Nk, D]``.
        rows_mask: the mask (:data:`RowsMask`): the kernels' reference masks, or :func:`_causal_rows`.
        softcap: ``tanh`` logit softcapping (Gemma 2): ``scores = softcap * tanh(scores / softcap)``,
            computed in float32 with query heads viewed as ``[B, Hkv, G, R, D]``; without it, torch
            SDPA with ``enable_gqa`` (no K/V copy here; a per-KV-group mask is repeated per query head).

    Rows with no key give zeros. Memory: about ``MASKED_SCORE_BUDGET`` scores (and mask bytes) per
    step; keys beyond a chunk's last row are skipped.
    """
    bsz, hq, nq, _ = q.shape
    nk = k.shape[2]
    out = torch.empty_like(q)
    for start, stop in _row_chunks(bsz, hq, nq, nk):
        first, width = nk - nq + start, nk - nq + stop
        positions = torch.arange(first, width, device=q.device)
        mask = rows_mask(positions, first, width - 1)[..., :width]
        if mask.shape[1] not in (1, hq):
            mask = mask.repeat_interleave(hq // mask.shape[1], dim=1)
        if softcap is None:
            chunk = torch.nn.functional.scaled_dot_product_attention(
                q[:, :, start:stop], k[:, :, :width], v[:, :, :width], attn_mask=mask, scale=scale, enable_gqa=True
            )
        else:
            chunk = _softcapped_chunk(q[:, :, start:stop], k[:, :, :width], v[:, :, :width], scale, mask, softcap)
        out[:, :, start:stop] = chunk.nan_to_num(0.0)  # rows whose mask is empty
    return out


def _softcapped_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor,
                      softcap: float) -> torch.Tensor:
    """Eager attention with logit softcapping in float32: q ``[B, Hq, R, D]``, k/v ``[B, Hkv, W, D]``,
    mask ``bool [B|1, Hq|1, R, W]``; query heads viewed per KV group (no GQA copy)."""
    bsz, hq, rows, d = q.shape
    hkv, width = k.shape[1], k.shape[2]
    group = hq // hkv
    scores = torch.matmul(q.float().reshape(bsz, hkv, group * rows, d), k.float().transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.reshape(bsz, hkv, group, rows, width)
    mask = mask.reshape(mask.shape[0], -1, 1, rows, width) if mask.shape[1] == 1 else \
        mask.reshape(mask.shape[0], hkv, group, rows, width)
    probs = torch.softmax(scores.masked_fill(~mask, -math.inf), dim=-1).nan_to_num(0.0)
    out = torch.matmul(probs.reshape(bsz, hkv, group * rows, width), v.float())
    return out.reshape(bsz, hq, rows, d).to(q.dtype)
