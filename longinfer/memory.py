"""Long-context memory path: bounded activation memory for the prefill of very long prompts.

A transformers causal LM prefilling ``N`` tokens in one forward holds, besides its weights and
the KV cache, activations proportional to ``N`` times the widest layer: the logits (``N x vocab``,
31 GiB in bf16 for Llama-3-8B at 128K), the MLP's intermediates (``~3 x N x intermediate``) and
float32 copies inside the RMS norms. This module bounds each of them without reassigning any
model class's ``forward``; the pieces compose, and they compose with :func:`longinfer.patch`
(sparse attention) because they never touch attention::

    from longinfer.memory import chunked_mlp, prefill_in_chunks, host_cache

    with chunked_mlp(model, 8192):                       # norms and MLPs over 8K-token slices
        cache, logits = prefill_in_chunks(model, ids, 32768,
                                          cache=host_cache(model, device_layers=12))
    next_token = logits.argmax(-1)                       # then decode with the returned cache

- Logits only where needed: :func:`last_position_logits` (``logits_to_keep=1`` where the model
  takes it, else the base model plus the output head on the last position), and
  :func:`next_token_logprobs`, which applies the output head over sequence chunks for scoring
  every position (perplexity) without the ``N x vocab`` tensor.
- :func:`chunked_mlp`: a context manager that wraps each decoder layer's ``mlp`` (and the norms
  around it) in a :class:`SequenceChunked` module running it over slices of the sequence, so the
  intermediates exist for one slice at a time. The original modules come back on exit.
- :func:`prefill_in_chunks`: the prompt goes through the model in chunks of ``chunk_size`` tokens
  over one KV cache; each chunk's queries attend to the cached keys plus their own (sparsely when
  the model is patched by longinfer), so every per-token activation exists for one chunk only.
- :func:`host_cache`: a ``DynamicCache`` whose full-attention layers (from ``device_layers`` on)
  keep their keys and values in pinned host memory (:class:`HostKVLayer`).

Peak device memory of a prefill, roughly::

    weights + KV cache on the device + one chunk's activations

with ``KV cache = kv_cache_bytes(config, N)`` (Llama-3-8B, bf16: 128 KiB per token, 16 GiB at
128K, 128 GiB at 1M) and, for a chunk of ``C`` tokens (hidden ``H``, MLP width ``I``, ``Hq``
query heads of size ``D``), about ``C * (6 H + Hq D) * 2`` bytes of hidden states, queries and
attention output, plus ``min(C, mlp_chunk) * 3 I * 2`` bytes inside the MLP, plus the attention
kernel's workspace; with :func:`host_cache` the device holds one host layer's full keys and
values (``kv_cache_bytes / num_layers``) while that layer runs, instead of the offloaded layers'
share of the cache.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer

from longinfer.integrations.transformers import prompt_end as _prompt_end

logger = logging.getLogger(__name__)

__all__ = [
    "HostKVLayer",
    "PrefillResult",
    "SequenceChunked",
    "cache_keyword",
    "chunked_mlp",
    "host_cache",
    "kv_cache_bytes",
    "last_position_logits",
    "lm_head_logits",
    "next_token_logprobs",
    "prefill_in_chunks",
]

# Config fields that change how hidden states become logits, besides the output head itself.
_UNSUPPORTED_LOGIT_FIELDS = ("logit_scale", "logits_scaling", "output_multiplier_scale")
# Tokens per host-to-device copy of an offloaded prefix: bounds the staging buffer (Llama-3-8B:
# 64K tokens x 8 KV heads x 128 x 2 bytes = 128 MiB per copy).
HOST_UPLOAD_TOKENS = 65536


# --------------------------------------------------------------------------------------------
# Small shared checks


def _require_positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _require_token_ids(input_ids: Any) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor [batch, tokens], got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape [batch, tokens] with tokens >= 1, got {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    return input_ids


def _forward_parameters(model: Any) -> frozenset[str]:
    return frozenset(inspect.signature(model.forward).parameters)


def cache_keyword(model: Any) -> str:
    """The forward's keyword for the KV cache: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def _text_config(config: Any) -> Any:
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


# --------------------------------------------------------------------------------------------
# Logits only where needed


def _decoder_of(model: Any) -> nn.Module:
    """The base model under a causal-LM head (``model.model`` for Llama and most families)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "base_model", None)
    if not isinstance(base, nn.Module) or base is model:
        raise TypeError(
            f"{type(model).__name__} exposes no base model under its LM head (get_decoder()); pass a transformers "
            "causal LM such as LlamaForCausalLM"
        )
    return base


def lm_head_logits(model: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """The model's output head on final hidden states, with its final logit softcap if it has one.

    Args:
        model: a transformers causal LM.
        hidden_states: ``[B, T, H]`` outputs of the base model (after its final norm).

    Returns:
        ``[B, T, vocab]`` logits in the head's dtype.

    Raises:
        NotImplementedError: the model scales its logits in a way this function does not
            reproduce (``logit_scale`` and similar config fields).
    """
    config = _text_config(model.config)
    scaled = [name for name in _UNSUPPORTED_LOGIT_FIELDS if getattr(config, name, None) not in (None, 1, 1.0)]
    if scaled:
        raise NotImplementedError(
            f"{type(model).__name__} scales its logits ({', '.join(scaled)}); compute logits with the model's own "
            "forward (logits_to_keep) instead"
        )
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output embeddings (LM head)")
    logits = head(hidden_states)
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def last_position_logits(model: Any, input_ids: torch.Tensor, **forward_kwargs: Any) -> torch.Tensor:
    """One forward that computes logits for the last position only.

    Uses ``logits_to_keep=1`` (``num_logits_to_keep`` in older models) where the model's forward
    takes it; otherwise runs the base model and applies :func:`lm_head_logits` to the last hidden
    state. Either way the ``[B, N, vocab]`` logits never exist.

    Args:
        model: a transformers causal LM.
        input_ids: ``[B, N]`` token ids (left-padded when batched with padding, so the last
            position is every sequence's last token).
        **forward_kwargs: passed to the forward (cache, ``use_cache``, ``attention_mask``, ...).

    Returns:
        ``[B, vocab]`` logits.
    """
    parameters = _forward_parameters(model)
    for keep in ("logits_to_keep", "num_logits_to_keep"):
        if keep in parameters:
            return model(input_ids, **{keep: 1}, **forward_kwargs).logits[:, -1]
    hidden = _decoder_of(model)(input_ids, **forward_kwargs).last_hidden_state
    return lm_head_logits(model, hidden[:, -1:])[:, -1]


def next_token_logprobs(
    model: Any,
    input_ids: torch.Tensor,
    *,
    chunk_size: int = 4096,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-probability of every next token, with the output head applied over sequence chunks.

    Args:
        model: a transformers causal LM.
        input_ids: ``[B, N]`` token ids, ``N >= 2``.
        chunk_size: positions per output-head step.
        attention_mask: optional ``[B, N]`` padding mask (scores at padded positions are
            meaningless; mask them out yourself).

    Returns:
        ``[B, N - 1]`` float32: entry ``i`` is ``log p(input_ids[:, i + 1] | input_ids[:, :i + 1])``.

    Memory: the base model's prefill (no cache kept) plus ``B x chunk_size x vocab`` float32
    logits and log-probabilities, instead of ``B x N x vocab``.
    """
    _require_token_ids(input_ids)
    _require_positive_int("chunk_size", chunk_size)
    if input_ids.shape[1] < 2:
        raise ValueError("next_token_logprobs needs at least 2 tokens (one to condition on, one to score)")
    with torch.no_grad():
        hidden = _decoder_of(model)(input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        targets = input_ids[:, 1:]
        scores = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
        for start in range(0, targets.shape[1], chunk_size):
            stop = min(start + chunk_size, targets.shape[1])
            logprobs = torch.log_softmax(lm_head_logits(model, hidden[:, start:stop]).float(), dim=-1)
            scores[:, start:stop] = logprobs.gather(-1, targets[:, start:stop, None].to(hidden.device))[..., 0]
    return scores


# --------------------------------------------------------------------------------------------
# Norms and MLPs over sequence chunks


class SequenceChunked(nn.Module):
    """Runs a token-wise module over slices of the sequence and concatenates the results.

    ``hidden_states [..., N, H]`` goes through the wrapped module ``chunk_size`` positions at a
    time (dimension -2); the output ``[..., N, H']`` is written slice by slice into one tensor.
    Exact for any module that treats positions independently (MLPs, RMS/layer norms).

    Memory: input + output + the wrapped module's intermediates for ``chunk_size`` positions.
    """

    def __init__(self, module: nn.Module, chunk_size: int) -> None:
        super().__init__()
        self.module = module
        self.chunk_size = _require_positive_int("chunk_size", chunk_size)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs:
            raise TypeError(
                f"SequenceChunked({type(self.module).__name__}) only chunks modules called with the hidden states "
                "alone; this model passes more arguments, so it cannot be chunked this way"
            )
        length = hidden_states.shape[-2]
        if length <= self.chunk_size:
            return self._checked(self.module(hidden_states))
        out: torch.Tensor | None = None
        for start in range(0, length, self.chunk_size):
            stop = min(start + self.chunk_size, length)
            piece = self._checked(self.module(hidden_states[..., start:stop, :]))
            if out is None:
                out = piece.new_empty((*piece.shape[:-2], length, piece.shape[-1]))
            out[..., start:stop, :] = piece
        return out

    def _checked(self, output: Any) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"{type(self.module).__name__} returns {type(output).__name__}, not a tensor (a mixture-of-experts "
                "block with router outputs?); chunked_mlp supports token-wise modules returning one tensor"
            )
        return output

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}"


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """Modules holding both a ``self_attn`` and an ``mlp`` child: the decoder layers."""
    return [
        m for m in model.modules()
        if isinstance(getattr(m, "mlp", None), nn.Module) and isinstance(getattr(m, "self_attn", None), nn.Module)
    ]


def _chunk_targets(model: nn.Module, norms: bool) -> list[tuple[nn.Module, str]]:
    """``(parent, attribute)`` of every module :func:`chunked_mlp` wraps."""
    layers = _decoder_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no decoder layers with 'self_attn' and 'mlp' submodules; chunked_mlp "
            "supports transformers decoder-only LMs (Llama, Qwen2/3, Mistral, Phi-3, Gemma 2/3, ...)"
        )
    targets: list[tuple[nn.Module, str]] = []
    for layer in layers:
        targets.append((layer, "mlp"))
        if norms:
            targets += [(layer, name) for name, child in layer.named_children() if name.endswith("norm")]
    if norms:
        base = model.get_decoder() if hasattr(model, "get_decoder") else model  # a base model returns itself
        if isinstance(getattr(base, "norm", None), nn.Module):
            targets.append((base, "norm"))
    if any(isinstance(getattr(parent, name), SequenceChunked) for parent, name in targets):
        raise ValueError(f"{type(model).__name__} is already inside chunked_mlp; do not nest it")
    return targets


@contextlib.contextmanager
def chunked_mlp(model: nn.Module, chunk_size: int, *, norms: bool = True) -> Iterator[nn.Module]:
    """Run every decoder layer's MLP (and norms) over ``chunk_size``-token slices inside the block.

    Replaces, on the module instances only, each decoder layer's ``mlp`` attribute by a
    :class:`SequenceChunked` wrapper around it; with ``norms``, also the layer's norms (children
    named ``*norm``: ``input_layernorm``, ``post_attention_layernorm``, Gemma's pre/post
    feed-forward norms) and the base model's final ``norm``. Everything is put back on exit, also
    after an exception. Outputs are unchanged (the modules are token-wise); while the block runs,
    ``state_dict()`` keys of the wrapped modules gain a ``.module`` infix.

    Args:
        model: a transformers decoder-only LM (or its base model).
        chunk_size: positions per slice. Slices shorter than the input only save memory when the
            input (the prompt, or a :func:`prefill_in_chunks` chunk) is longer than this.
        norms: wrap the norms too (their float32 upcasts are 2-3x the hidden states).

    Yields:
        ``model``.

    Memory: Llama-3-8B (intermediate 14336) at 128K tokens keeps ``3 x 128K x 14336 x 2`` bytes
    = 10.5 GiB of MLP intermediates without chunking, 0.66 GiB with ``chunk_size=8192``.

    Raises:
        ValueError: no decoder layers found, or the model is already inside ``chunked_mlp``.
        TypeError: (while running) a wrapped module is called with extra arguments or returns
            something other than a tensor.
    """
    _require_positive_int("chunk_size", chunk_size)
    targets = _chunk_targets(model, norms)
    originals = [(parent, name, getattr(parent, name)) for parent, name in targets]
    try:
        for parent, name, original in originals:
            setattr(parent, name, SequenceChunked(original, chunk_size))
        yield model
    finally:
        for parent, name, original in originals:
            setattr(parent, name, original)


# --------------------------------------------------------------------------------------------
# Chunked prefill


class PrefillResult(NamedTuple):
    """What :func:`prefill_in_chunks` returns.

    Attributes:
        cache: the KV cache holding the prompt (pass it to the next forward or to ``generate``).
        logits: ``[B, vocab]`` logits of the prompt's last position.
    """

    cache: Cache
    logits: torch.Tensor


def _reserve_host_layers(cache: Cache, total_tokens: int) -> None:
    for layer in getattr(cache, "layers", ()):
        if isinstance(layer, HostKVLayer):
            layer.reserve(total_tokens)


def prefill_in_chunks(
    model: Any,
    input_ids: torch.Tensor,
    chunk_size: int,
    cache: Cache | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    ends_prompt: bool = True,
) -> PrefillResult:
    """Feed a prompt through the model ``chunk_size`` tokens at a time over one KV cache.

    Each chunk's queries attend to every cached key plus the chunk's own keys (causally). With
    the model patched by :func:`longinfer.patch`, a chunk of at least ``SPARSE_MIN_QUERIES``
    tokens runs sparse attention over cached + new keys, its index estimated from the chunk's
    last queries; unpatched, it runs the model's attention (exact, so the result equals a
    one-shot prefill up to floating-point summation order). Only the last position's logits
    are computed (:func:`last_position_logits`). Progress is logged per chunk (``INFO``).

    Args:
        model: a transformers causal LM.
        input_ids: ``[B, N]`` token ids: the prompt, or the new tokens after what ``cache`` holds.
        chunk_size: tokens per forward.
        cache: a transformers ``Cache`` to extend (e.g. :func:`host_cache`, or the cache of an
            earlier turn); ``None`` creates ``DynamicCache(config=model.config)``.
        attention_mask: ``[B, cached + N]`` padding mask (1 = token) for a left-padded batch;
            position ids then count real tokens only, as ``generate`` does.
        ends_prompt: the last chunk ends the prompt (its question; the default), so it runs under
            :func:`longinfer.integrations.transformers.prompt_end` and, with the default plan,
            estimates from the question's queries as a one-pass prefill would. ``False`` when more
            of the prompt follows in a later call.

    Returns:
        :class:`PrefillResult` ``(cache, logits [B, vocab])``. To continue with ``generate``,
        prefill all but the last prompt token and pass the full prompt plus the cache.

    Memory (device): weights + the KV cache of ``cached + N`` tokens (its device share with
    :func:`host_cache`) + the activations of one ``chunk_size``-token forward (see the module
    docstring); combine with :func:`chunked_mlp` to bound the MLP inside each chunk as well.
    """
    _require_token_ids(input_ids)
    _require_positive_int("chunk_size", chunk_size)
    if cache is None:
        cache = DynamicCache(config=model.config)
    elif not isinstance(cache, Cache):
        raise TypeError(f"cache must be a transformers Cache (e.g. DynamicCache), got {type(cache).__name__}")
    batch, length = input_ids.shape
    cached = cache.get_seq_length()
    positions: torch.Tensor | None = None  # with a padding mask: real-token positions [B, cached + N]
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (batch, cached + length):
            raise ValueError(
                f"attention_mask must cover the cached and the new tokens: shape ({batch}, {cached + length}), "
                f"got {tuple(attention_mask.shape)}"
            )
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    _reserve_host_layers(cache, cached + length)
    keyword = cache_keyword(model)
    logits: torch.Tensor | None = None
    with torch.no_grad():
        for start in range(0, length, chunk_size):
            stop = min(start + chunk_size, length)
            kwargs: dict[str, Any] = {keyword: cache, "use_cache": True}
            if attention_mask is not None and positions is not None:
                kwargs["attention_mask"] = attention_mask[:, : cached + stop]
                kwargs["position_ids"] = positions[:, cached + start : cached + stop]
            with _prompt_end() if ends_prompt and stop == length else contextlib.nullcontext():
                logits = last_position_logits(model, input_ids[:, start:stop], **kwargs)
            logger.info("prefill: %d / %d tokens", stop, length)
    assert logits is not None  # length >= 1 was checked
    return PrefillResult(cache, logits)


# --------------------------------------------------------------------------------------------
# KV cache in host memory


class HostKVLayer(DynamicLayer):
    """A full-attention KV cache layer that keeps its keys and values in host memory.

    Storage: token-major ``[capacity, B, Hkv, D]`` CPU tensors, pinned when the model runs on CUDA,
    so each upload of a prefix slice is one contiguous asynchronous copy. ``keys`` / ``values`` are
    ``[B, Hkv, cached, D]`` views of them (after a CUDA forward, read them only after
    ``torch.cuda.synchronize()``: the device-to-host copies are asynchronous).

    Each forward through the layer (:meth:`update`):

    1. uploads the cached prefix to a fresh device tensor (``HOST_UPLOAD_TOKENS`` at a time) and
       appends the new keys/values: the layer's attention sees all keys on the device;
    2. copies the new keys/values to host memory (asynchronously, on the compute stream).

    Trade-off: device memory holds one layer's full keys/values while it runs instead of every
    layer's; the price is PCIe traffic of ``cached`` tokens per layer per forward. A one-shot
    prefill uploads nothing (only the device-to-host copy of the new states, overlapping nothing
    but cheap); a chunked prefill of ``N`` tokens in chunks of ``C`` uploads about ``N^2 / (2C)``
    tokens per layer; every decoding step uploads the whole cache (Llama-3-8B at 1M tokens: 4 GiB per
    layer, ~2-3 s per token at ~50 GB/s). Use it for prefill beyond what the device holds and for a
    first token; keep short contexts on the device.

    Host memory: capacity is reserved by :meth:`reserve` (:func:`prefill_in_chunks` reserves the
    prompt length) or grows by doubling (a host copy; logged). PyTorch's pinned-memory allocator
    rounds each allocation up to a power of two bytes: a capacity that is a power of two wastes
    nothing (Llama-3-8B, batch 1: 2 KiB per token for keys, as much for values).
    """

    is_sliding = False
    is_croppable = True

    def __init__(self, reserve_tokens: int | None = None) -> None:
        super().__init__()
        if reserve_tokens is not None:
            _require_positive_int("reserve_tokens", reserve_tokens)
        self.reserve_tokens = reserve_tokens
        self.length = 0
        self._host_keys: torch.Tensor | None = None  # [capacity, B, Hkv, D], CPU (pinned for CUDA)
        self._host_values: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` tokens in total: one host allocation instead of repeated growth."""
        _require_positive_int("tokens", tokens)
        self.reserve_tokens = max(self.reserve_tokens or 0, tokens)
        if self._host_keys is not None and self._host_keys.shape[0] < tokens:
            self._grow(tokens)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``[B, Hkv, n, D]`` keys/values to host memory; return all of them on the device.

        The returned ``[B, Hkv, cached + n, D]`` tensors are fresh device copies (the cached
        prefix uploaded, the new states appended), freed once the layer's attention is done.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.dtype != self.dtype or key_states.device != self.device:
            raise ValueError(
                f"this host cache layer holds {self.dtype} states computed on {self.device}; got {key_states.dtype} "
                f"on {key_states.device}. Use one cache per model and device"
            )
        start, new = self.length, key_states.shape[-2]
        if self._host_keys is None:
            bsz, heads, _, dim = key_states.shape
            self._allocate((bsz, heads, dim), max(start + new, self.reserve_tokens or 0))
        elif self._host_keys.shape[1:] != (key_states.shape[0], key_states.shape[1], key_states.shape[3]):
            raise ValueError(
                f"keys of shape {tuple(key_states.shape)} do not match the cached [B, Hkv, *, D] = "
                f"{tuple(self._host_keys.shape[1:])}; batch size and heads must stay the same"
            )
        elif self._host_keys.shape[0] < start + new:
            self._grow(start + new)
        keys = self._with_prefix(self._host_keys, key_states, start)
        values = self._with_prefix(self._host_values, value_states, start)
        self._host_keys[start : start + new].copy_(key_states.permute(2, 0, 1, 3), non_blocking=True)
        self._host_values[start : start + new].copy_(value_states.permute(2, 0, 1, 3), non_blocking=True)
        self._set_length(start + new)
        return keys, values

    def _allocate(self, token_shape: tuple[int, int, int], tokens: int) -> None:
        """Host buffers ``[tokens, B, Hkv, D]`` for keys and values (pinned when computing on CUDA)."""
        pin = self.device.type == "cuda"
        self._host_keys = torch.empty((tokens, *token_shape), dtype=self.dtype, pin_memory=pin)
        self._host_values = torch.empty((tokens, *token_shape), dtype=self.dtype, pin_memory=pin)
        logger.debug("host KV layer: %d tokens, %.2f GiB, pinned=%s", tokens,
                     2 * self._host_keys.nbytes / 2**30, pin)

    def _grow(self, tokens: int) -> None:
        """Reallocate for at least ``tokens`` (doubling); pending copies into the old buffers finish first."""
        old_keys, old_values = self._host_keys, self._host_values
        assert old_keys is not None and old_values is not None
        capacity = max(tokens, 2 * old_keys.shape[0])
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        logger.info(
            "host KV layer grows from %d to %d tokens (a host copy); reserve the prompt length up front "
            "(prefill_in_chunks does) to avoid it", old_keys.shape[0], capacity,
        )
        self._allocate(tuple(old_keys.shape[1:]), capacity)
        self._host_keys[: self.length].copy_(old_keys[: self.length])
        self._host_values[: self.length].copy_(old_values[: self.length])
        self._set_length(self.length)

    def _with_prefix(self, host: torch.Tensor, new: torch.Tensor, cached: int) -> torch.Tensor:
        """``[B, Hkv, cached + n, D]`` on the device: the host prefix (uploaded in slices) + ``new``."""
        if cached == 0:
            return new
        bsz, heads, n, dim = new.shape
        full = torch.empty((bsz, heads, cached + n, dim), dtype=new.dtype, device=new.device)
        for start in range(0, cached, HOST_UPLOAD_TOKENS):
            stop = min(start + HOST_UPLOAD_TOKENS, cached)
            staged = host[start:stop].to(new.device, non_blocking=True)  # contiguous token-major slice
            full[:, :, start:stop].copy_(staged.permute(1, 2, 0, 3))
        full[:, :, cached:].copy_(new)
        return full

    def _set_length(self, length: int) -> None:
        self.length = length
        assert self._host_keys is not None and self._host_values is not None
        self.keys = self._host_keys[:length].permute(1, 2, 0, 3)
        self.values = self._host_values[:length].permute(1, 2, 0, 3)

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        """Forget the cached tokens (the host buffers are kept for reuse)."""
        if self._host_keys is not None:
            self._set_length(0)
        self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (a negative count, as transformers passes it)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative token count to remove, got {tokens_to_remove}")
        if tokens_to_remove and self._host_keys is not None:
            self._set_length(max(0, self.length + tokens_to_remove))

    def offload(self) -> None:
        """Nothing to do: the states already live in host memory."""

    def prefetch(self) -> None:
        """Nothing to do: :meth:`update` uploads the prefix when the layer runs."""

    def _no_batch_edits(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "the host KV cache does not support beam search or batch reordering; use greedy or sampling "
            "decoding, or a DynamicCache"
        )

    batch_repeat_interleave = _no_batch_edits
    batch_select_indices = _no_batch_edits
    reorder_cache = _no_batch_edits


def host_cache(model_or_config: Any, *, device_layers: int = 0, reserve_tokens: int | None = None) -> DynamicCache:
    """A ``DynamicCache`` for the model whose full-attention layers keep keys/values in host memory.

    Layers ``0 .. device_layers-1`` and the model's sliding-window layers (small: at most one
    window) stay on the device as transformers makes them; every other layer is a
    :class:`HostKVLayer`. Works for any forward or ``generate`` call taking a cache, with or
    without :func:`longinfer.patch`, batch sizes above 1 included (no beam search).

    Args:
        model_or_config: a transformers model or its config.
        device_layers: how many leading full-attention layers keep their cache on the device
            (choose it from free device memory: each takes ``kv_cache_bytes(config, N) /
            num_layers``; e.g. on an 80 GB GPU with Llama-3-8B at 1M tokens, ~12 layers).
        reserve_tokens: host capacity to allocate at the first update (default: grown as needed;
            :func:`prefill_in_chunks` reserves the prompt length).

    Returns:
        A ``transformers.DynamicCache``.

    Raises:
        ValueError: ``device_layers`` outside ``[0, num_layers)`` or a model whose cache has no
            full-attention layer to move.

    Memory: see :class:`HostKVLayer` for the trade-off. Host RAM needed: the offloaded layers'
    share of ``kv_cache_bytes`` (rounded up per layer to a power of two bytes when pinned).
    """
    config = getattr(model_or_config, "config", model_or_config)
    if not isinstance(device_layers, int) or isinstance(device_layers, bool):
        raise TypeError(f"device_layers must be an int, got {type(device_layers).__name__}")
    cache = DynamicCache(config=config)
    num_layers = len(cache.layers)
    if num_layers == 0:
        raise ValueError(f"could not read the layer structure of {type(config).__name__}; pass a transformers config")
    if not 0 <= device_layers < num_layers:
        raise ValueError(
            f"device_layers must lie in [0, {num_layers}) for a model with {num_layers} layers, got {device_layers}; "
            "use a plain DynamicCache to keep every layer on the device"
        )
    moved = 0
    for index, layer in enumerate(cache.layers):
        if index >= device_layers and type(layer) is DynamicLayer:
            cache.layers[index] = HostKVLayer(reserve_tokens)
            moved += 1
    if moved == 0:
        raise ValueError(
            f"no full-attention layer from layer {device_layers} on: nothing to keep in host memory "
            f"(layer types: {[type(layer).__name__ for layer in cache.layers]})"
        )
    logger.info("host KV cache: %d of %d layers in host memory", moved, num_layers)
    return cache


def kv_cache_bytes(config: Any, num_tokens: int, *, batch_size: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of a ``DynamicCache`` holding ``num_tokens`` tokens, as transformers lays it out.

    Full-attention layers keep every token; sliding-window layers keep ``window - 1`` (what
    ``DynamicSlidingWindowLayer`` stores). Keys and values: ``2 x batch x Hkv x head_dim`` elements
    per token and layer (Llama-3-8B, bf16: 128 KiB per token over its 32 layers).

    Args:
        config: a transformers config.
        num_tokens: sequence length.
        batch_size: sequences.
        dtype: the cache dtype (the model's).
    """
    _require_positive_int("num_tokens", num_tokens)
    _require_positive_int("batch_size", batch_size)
    text = _text_config(config)
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_token = 2 * batch_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
    total = 0
    for layer in DynamicCache(config=config).layers:
        window = getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None
        total += per_token * (num_tokens if window is None else min(num_tokens, window - 1))
    return total
