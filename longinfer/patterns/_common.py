"""Helpers shared by the pattern estimators: config validation, input checks, index packing."""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass

import torch

BUDGET_MODES = ("fixed", "coverage")
KERNEL_BLOCK_SIZES = (16, 32, 64, 128)  # block sizes the kernels in longinfer.ops accept


def check_config_fields(config: object) -> None:
    """Type-check every field of a frozen config dataclass against its annotation.

    ``int`` fields take ints (not bools), ``float`` fields take ints or floats (stored as float),
    ``bool`` and ``str`` fields take exactly those types. Call from ``__post_init__``.

    Raises:
        TypeError: naming the config class, the field, the expected and the given type.
    """
    hints = typing.get_type_hints(type(config))
    name = type(config).__name__
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        expected = hints[field.name]
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(config, field.name, float(value))
            continue
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if not ok:
            raise TypeError(
                f"{name}.{field.name} must be {expected.__name__}, got {type(value).__name__} {value!r}"
            )


def require(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition``."""
    if not condition:
        raise ValueError(message)


def check_budget(name: str, budget: str, tau: float) -> None:
    """Validate the budget mode and coverage target shared by the dynamic patterns."""
    require(budget in BUDGET_MODES, f"{name}.budget must be one of {BUDGET_MODES}, got {budget!r}")
    require(0.0 < tau <= 1.0, f"{name}.tau must lie in (0, 1], got {tau}")


@dataclass(frozen=True)
class QKShape:
    """Sizes of one estimation call; queries are the last ``q_len`` of ``k_len`` positions."""

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    k_len: int
    head_dim: int

    @property
    def group_size(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def q_offset(self) -> int:
        """Absolute position of query 0 (``k_len - q_len``)."""
        return self.k_len - self.q_len


def check_qk(q: torch.Tensor, k: torch.Tensor) -> QKShape:
    """Validate ``q [B, Hq, Nq, D]`` and ``k [B, Hkv, Nk, D]`` for estimation and return their sizes.

    Raises:
        TypeError: non-tensors or non-floating tensors.
        ValueError: wrong rank, mismatched batch/head_dim/device, ``Hq % Hkv != 0``, ``Nk < Nq``,
            or no queries.
    """
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, N, D], got shape {tuple(t.shape)}")
    bsz, hq, nq, d = q.shape
    bk, hkv, nk, dk = k.shape
    require(bk == bsz, f"q has batch {bsz} but k has {bk}")
    require(dk == d, f"q has head_dim {d} but k has {dk}")
    require(q.device == k.device, f"q is on {q.device} but k is on {k.device}")
    require(hkv > 0 and hq % hkv == 0, f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    require(nq > 0, "q has no positions (N = 0)")
    require(nk >= nq, f"k ({nk} positions) must be at least as long as q ({nq}); queries are the last positions")
    return QKShape(bsz, hq, hkv, nq, nk, d)


def triton_estimate_supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the estimators' Triton kernels take ``q``, ``k`` by default: CUDA tensors of one float16 /
    bfloat16 / float32 dtype (the CPU interpreter runs them only when asked: it is far slower than torch)."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and k.dtype == q.dtype


def check_estimate_backend(backend: str, q: torch.Tensor) -> None:
    """``backend`` is ``"triton"`` or ``"torch"``, and ``"triton"`` has CUDA tensors or the interpreter."""
    from longinfer.ops._checks import interpreter_enabled

    require(backend in ("triton", "torch"), f"backend must be 'triton', 'torch' or None, got {backend!r}")
    require(backend == "torch" or q.is_cuda or interpreter_enabled(),
            "backend='triton' needs CUDA tensors or TRITON_INTERPRET=1; use backend='torch' on the CPU")


def softmax_scale(sm_scale: float | None, head_dim: int) -> float:
    """``sm_scale`` or ``1/sqrt(head_dim)``; must be positive and finite."""
    if sm_scale is None:
        return 1.0 / math.sqrt(head_dim)
    require(0.0 < float(sm_scale) < math.inf, f"sm_scale must be a positive finite number, got {sm_scale}")
    return float(sm_scale)


def mask_to_index(chosen: torch.Tensor, width: int) -> torch.Tensor:
    """Pack a boolean selection ``[..., N]`` into positions ``[..., width]`` (int64).

    Chosen positions come first in ascending order; unused slots hold ``-1``. Every row must
    choose at most ``width`` positions (the estimators guarantee it). O(N) per row, no sort.
    """
    n = chosen.shape[-1]
    slot = chosen.cumsum(-1) - 1  # [..., N] int64 slot of each chosen position
    out = torch.full((*chosen.shape[:-1], width + 1), -1, dtype=torch.long, device=chosen.device)
    positions = torch.arange(n, device=chosen.device).expand_as(slot)
    out.scatter_(-1, torch.where(chosen, slot.clamp(max=width), width), positions)
    return out[..., :width]


def union_of_packed(parts: Sequence[torch.Tensor], length: int, width: int) -> torch.Tensor:
    """Positions in any of ``parts`` as one packed index ``[..., width]`` int64.

    Each part is ``[..., W_i]`` int64 (same leading shape) of positions in ``[0, length)`` and
    ``-1`` fillers, in any order; the result holds the distinct positions ascending, then ``-1``
    (the estimators' packed format). ``width`` must be at least the union's size in every row. The
    positions are marked in a ``[..., length]`` bitmap and packed back (:func:`mask_to_index`):
    O(``length`` + ``sum W_i``) per row, no sort, no host synchronization. Memory: the bitmap and
    one int64 ``[..., length]`` prefix sum.
    """
    chosen = torch.zeros(*parts[0].shape[:-1], length + 1, dtype=torch.bool, device=parts[0].device)
    for part in parts:
        chosen.scatter_(-1, part.remainder(length + 1), True)  # -1 marks the extra slot `length`
    return mask_to_index(chosen[..., :length], width)


def union_packed_over_groups(index: torch.Tensor, kv_heads: int, length: int, *, repeat: bool = False) -> torch.Tensor:
    """Union of each KV group's packed positions: ``[B, Hq, W]`` -> ``[B, Hkv, G * W]``
    (``[B, Hq, G * W]`` with ``repeat``: each query head gets its group's row).

    ``index`` int64 holds ascending positions in ``[0, length)``, then ``-1`` (the estimators'
    packed format); so does the result, for the ``G = Hq // Hkv`` query heads of each group
    together (:func:`union_of_packed`: a key bitmap; two sorts of the ``G * W`` positions took
    ~0.19 ms per layer of a 4K turn over 64K on an H200, session 15, the bitmap 0.14 ms with the
    repeat, session 17). :func:`longinfer.patterns._union_kernel.union_packed_over_groups_triton`
    is the same in three launches.
    """
    bsz, hq, width = index.shape
    merged = index.reshape(bsz, kv_heads, hq // kv_heads * width)
    union = union_of_packed([merged], length, merged.shape[-1])
    return union.repeat_interleave(hq // kv_heads, dim=1) if repeat else union


def union_over_groups(chosen: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Union of a per-query-head selection ``[B, Hq, ...]`` over each KV group -> ``[B, Hkv, ...]``.

    Query head ``h`` belongs to group ``h // (Hq // Hkv)``.
    """
    bsz, hq = chosen.shape[:2]
    return chosen.reshape(bsz, kv_heads, hq // kv_heads, *chosen.shape[2:]).any(dim=2)


def coverage_selection(
    mass: torch.Tensor,
    forced: torch.Tensor,
    tau: float,
    limits: list[tuple[torch.Tensor, int, int]] | None = None,
    *,
    min_count: int = 0,
    max_count: int | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Smallest high-mass set reaching ``tau``: the coverage budget shared by the estimators.

    Items are ranked by estimated ``mass`` (forced items first); walking that ranking, an item is
    taken while the mass of the items taken before it is below ``tau`` and the size limits allow
    it; the first ``min_count`` allowed items are taken regardless of mass.

    Args:
        mass: ``[..., M]`` float estimated attention mass per item (non-negative).
        forced: ``[..., M]`` or broadcastable bool: always taken (they count toward limits and mass).
        tau: coverage target in ``(0, 1]``.
        limits: optional per-kind limits ``(is_kind [M] bool, min, max)`` for items of several kinds
            ranked together (vertical-slash ranks columns and diagonals jointly); an item of a kind
            is allowed only while fewer than ``max`` of that kind are taken; the first ``min`` of the
            kind in ranking order are taken regardless of mass. Without ``limits``, ``min_count`` /
            ``max_count`` apply to all items.
        valid: optional ``[..., M]`` bool; invalid items are never taken (e.g. non-causal blocks).

    Returns:
        ``[..., M]`` bool selection. Memory: a few ``[..., M]`` tensors (one sort).
    """
    rank_score = torch.where(forced, torch.full_like(mass, math.inf), mass)
    if valid is not None:
        rank_score = torch.where(valid, rank_score, torch.full_like(mass, -math.inf))
    order = rank_score.argsort(dim=-1, descending=True, stable=True)
    sorted_mass = mass.gather(-1, order).double()  # float64 running sums (as the vertical-slash kernel's)
    sorted_valid = torch.ones_like(sorted_mass, dtype=torch.bool) if valid is None else valid.gather(-1, order)
    if limits is None:
        kinds = [(torch.ones(mass.shape[-1], dtype=torch.bool, device=mass.device), min_count,
                  mass.shape[-1] if max_count is None else max_count)]
    else:
        kinds = limits
    allowed = torch.zeros_like(sorted_valid)
    at_least = torch.zeros_like(sorted_valid)
    for is_kind, lo, hi in kinds:  # a loop over item kinds (at most two), not over heads
        kind_sorted = is_kind.expand_as(mass).gather(-1, order) & sorted_valid
        rank_in_kind = kind_sorted.long().cumsum(-1)  # 1-based rank among valid items of the kind
        allowed |= kind_sorted & (rank_in_kind <= hi)
        at_least |= kind_sorted & (rank_in_kind <= min(lo, hi))
    taken_mass = (sorted_mass * allowed).cumsum(-1)
    mass_before = taken_mass - sorted_mass * allowed
    sorted_forced = forced.expand_as(mass).gather(-1, order)
    take = allowed & ((mass_before < tau) | at_least | sorted_forced)
    chosen = torch.zeros_like(take)
    return chosen.scatter(-1, order, take)
