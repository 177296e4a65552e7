"""Extra estimation rows where the text repeats itself at a distance (``VerticalSlashConfig.repeat_rows``).

Strided estimation queries see what a typical row attends. They miss induction-like attention:
a row that ends a phrase seen long before attends the earlier copy and what followed it, and no
strided row lies there. Templated facts (the needles of a retrieval prompt, repeated records,
code) repeat at a distance; prose rarely repeats a 4-gram far away. On Qwen2.5-Coder-0.5B at 8K
(``docs/results/needle-row-repeat-cpu-qwen0.5b-8k/``), up to 64 rows that end a token 4-gram first
seen at least 1,024 tokens earlier, added to the 64 strided rows, raised the index's recall at the
needle sentences from 0.893 to 0.929 (an oracle that knows the needles: 0.929). It does not carry
over to long prompts: at 64K about 2,500 rows qualify (prose repeats common phrases), 14-29 of them
in the needles, and RULER-style at 64K / 128K on the 1.5B did not improve
(``docs/results/gpu-session23/``). Off by default.

:func:`estimation_rows` returns the estimation positions of a call: the config's sampled rows plus
``repeat_rows`` extra ones, always the same number for a call's shape so that a CUDA graph of the
call stays valid. Rows that end a distant repeat come first (evenly thinned when more qualify);
when fewer qualify, or the token ids are unknown, the remaining extra rows are spread over the
call's queries (a low-discrepancy order: the golden-ratio sequence). Everything runs on the ids'
device with fixed shapes: no host synchronization.

N-grams are compared by a 64-bit polynomial hash: a collision can only make a row an estimation
row (a row like any other), never drop one.
"""

from __future__ import annotations

import math

import torch

# The last rows of a call are never extra rows: the dense tail attends exactly there and the
# strided sampling already ends at the last row.
SKIP_LAST = 128
_HASH_BASE = 1_000_003  # odd, above any vocabulary: distinct ids give distinct digits
_GOLDEN = (math.sqrt(5) - 1) / 2


def extra_row_count(repeat_rows: int, q_len: int, base_rows: int) -> int:
    """How many extra rows a call of ``q_len`` queries gets: ``repeat_rows``, fewer when the call
    has fewer than ``repeat_rows`` rows outside its last :data:`SKIP_LAST` and its ``base_rows``."""
    return max(0, min(repeat_rows, q_len - SKIP_LAST - base_rows))


def repeat_distances(ids: torch.Tensor, ngram: int) -> torch.Tensor:
    """For each position ``e`` of ``ids [B, N]``, how far back the n-gram ending at ``e`` first ended.

    Returns ``[B, N]`` int64: ``e - f`` where ``f`` is the first position at which the same
    ``ngram`` token ids ended (0 for a first occurrence, for ``e < ngram - 1`` and for n-grams
    holding a negative id, which marks an unknown token). Memory: a few ``[B, N]`` int64 tensors
    (one stable sort); no host synchronization.
    """
    bsz, n = ids.shape
    ids = ids.long()
    positions = torch.arange(n, device=ids.device).expand(bsz, n)
    if n < ngram:
        return torch.zeros_like(ids)
    hashed = torch.zeros(bsz, n - ngram + 1, dtype=torch.long, device=ids.device)
    for offset in range(ngram):  # int64 arithmetic wraps: a 64-bit polynomial hash of the window
        hashed = hashed * _HASH_BASE + ids[:, offset: n - ngram + 1 + offset]
    unknown = (ids < 0).long().cumsum(1)
    window_unknown = unknown[:, ngram - 1:] - torch.nn.functional.pad(unknown, (1, 0))[:, : n - ngram + 1]
    ends = positions[:, ngram - 1:]
    # Unknown-token n-grams get unique keys (their own negative end): they match no other window
    # (short of a hash collision).
    keys = torch.where(window_unknown > 0, -1 - ends, hashed)
    sorted_keys, order = keys.sort(dim=1, stable=True)  # equal keys keep position order
    starts = torch.ones_like(sorted_keys, dtype=torch.bool)
    starts[:, 1:] = sorted_keys[:, 1:] != sorted_keys[:, :-1]
    slots = torch.arange(sorted_keys.shape[1], device=ids.device).expand_as(sorted_keys)
    group_start = torch.where(starts, slots, 0).cummax(1).values
    # order holds window starts: each window's first occurrence is its key group's first start.
    first_start = torch.empty_like(order).scatter_(1, order, order.gather(1, group_start))
    distances = torch.zeros_like(ids)
    distances[:, ngram - 1:] = (ends - ngram + 1) - first_start
    return distances


def repeat_rows(ids: torch.Tensor | None, q_len: int, k_len: int, base: torch.Tensor, count: int, *, ngram: int,
                distance: int) -> torch.Tensor:
    """``count`` extra estimation positions ``[count]`` (distinct, unsorted, none in ``base``) for a
    call of ``q_len`` queries, the last of ``k_len`` positions.

    Args:
        ids: ``[B, k_len]`` token ids of the sequence up to the call's last key (negative =
            unknown), or ``None`` (no repeats known: every extra row is a spread row).
        q_len, k_len: the call's query and key counts; candidates are its query rows outside the
            last :data:`SKIP_LAST`.
        base: ``[L]`` the config's sampled positions (never chosen again), on the output device.
        count: how many rows; at most the candidates left (:func:`extra_row_count` ensures it).
        ngram, distance: a row qualifies when the ``ngram`` ids ending there first ended at least
            ``distance`` positions earlier (in any sequence of the batch).

    Qualifying rows are thinned evenly to ``count``; if fewer qualify, spread rows fill the rest.
    Memory: :func:`repeat_distances` plus a few ``[k_len]`` vectors. No host synchronization.
    """
    device = base.device
    positions = torch.arange(k_len, device=device)
    eligible = (positions >= k_len - q_len) & (positions < k_len - SKIP_LAST)
    eligible.index_fill_(0, base, False)
    if ids is None:
        picked = torch.zeros_like(eligible)
    else:
        if ids.shape[-1] != k_len:
            raise ValueError(f"token ids cover {ids.shape[-1]} positions but the call has {k_len} keys")
        qualified = (repeat_distances(ids.to(device), ngram) >= distance).any(0) & eligible
        # Even thinning: of c qualified rows, keep rank r (0-based) where floor(r * count / c) steps
        # up: exactly min(count, c) rows, spread over the qualified ones.
        rank = qualified.long().cumsum(0) - 1
        total = qualified.sum().clamp(min=1)
        step = torch.div(rank * count, total, rounding_mode="floor")
        previous = torch.div((rank - 1) * count, total, rounding_mode="floor")
        picked = qualified & (step != previous)
    spread = torch.remainder(positions.double() * _GOLDEN, 1.0)  # in [0, 1), a low-discrepancy order
    priority = torch.where(picked, 2.0, torch.where(eligible, spread, -1.0))
    return priority.topk(count).indices


def estimation_rows(base: torch.Tensor, ids: torch.Tensor | None, q_len: int, k_len: int, repeat_count: int, *,
                    ngram: int, distance: int) -> torch.Tensor:
    """The estimation positions ``[L + R]`` (ascending, distinct) of a call: the sampled ``base [L]``
    plus ``R = extra_row_count(repeat_count, q_len, L)`` rows of :func:`repeat_rows` (``ids`` and the
    rest: as there). ``R = 0`` returns ``base`` itself."""
    count = extra_row_count(repeat_count, q_len, base.numel())
    if count == 0:
        return base
    extra = repeat_rows(ids, q_len, k_len, base, count, ngram=ngram, distance=distance)
    return torch.cat([base, extra]).sort().values
