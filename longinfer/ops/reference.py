"""Reference semantics of every sparse-attention kernel, in plain PyTorch.

Each ``*_mask`` function expands a sparse index into the exact boolean mask the matching kernel
in :mod:`longinfer.ops` computes (block-granularity supersets included), and
:func:`masked_attention` computes causal-or-not attention from any such mask in float32. Every
kernel test compares ``kernel(q, k, v, index)`` against ``masked_attention(q, k, v, mask(index))``.

Conventions (shared with the kernels):

- ``q``: ``[B, Hq, N, D]``; ``k``, ``v``: ``[B, Hkv, N, D]`` with ``Hq % Hkv == 0``; query head
  ``h`` reads K/V head ``h // (Hq // Hkv)``.
- An index tensor has a head dimension of either ``Hq`` (one index per query head) or ``Hkv``
  (one index per KV group, shared by its ``Hq // Hkv`` query heads). Masks keep the index's head
  count; :func:`masked_attention` broadcasts a mask with fewer heads over consecutive query heads.
- Queries and keys share positions ``0..N-1`` (prefill); query ``i`` never attends key ``j > i``.
- A query row whose mask is empty produces zeros.

Memory: masks are ``[B, H, R, N]`` booleans (``R`` = number of query rows asked for, ``N`` by
default), so these functions are for tests and for sampled rows at long ``N``, never for
whole long sequences. :func:`masked_attention` processes ``query_chunk`` rows at a time.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "vertical_slash_mask",
    "block_sparse_mask",
    "a_shape_mask",
    "dense_causal_mask",
    "masked_attention",
]


def _rows(n: int, rows: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Query positions ``[R]`` (int64): ``rows`` if given, else ``0..n-1``."""
    if rows is None:
        return torch.arange(n, device=device)
    return rows.to(device=device, dtype=torch.long)


def _require_int(name: str, index: torch.Tensor, ndim: int) -> None:
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(index).__name__}")
    if index.dtype.is_floating_point or index.dtype == torch.bool or index.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got dtype {index.dtype}")
    if index.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(index.shape)}")


def dense_causal_mask(n: int, rows: torch.Tensor | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Causal mask ``[1, 1, R, N]``: query ``i`` attends every key ``j <= i``."""
    i = _rows(n, rows, torch.device(device))
    j = torch.arange(n, device=i.device)
    return (j[None, :] <= i[:, None])[None, None]


def vertical_slash_mask(
    vertical: torch.Tensor,
    slash: torch.Tensor,
    n: int,
    block_size: int = 64,
    rows: torch.Tensor | None = None,
    dense_from: int | None = None,
) -> torch.Tensor:
    """Mask ``[B, H, R, N]`` of :func:`longinfer.ops.vertical_slash_attention`.

    Args:
        vertical: ``[B, H, V]`` integer key positions every query may attend (causally).
        slash: ``[B, H, S]`` integer diagonal offsets: offset ``s`` means key ``i - s`` for query ``i``.
        n: sequence length ``N``.
        block_size: query-block size the kernel covers slashes at.
        rows: optional query positions ``[R]`` to build only those rows.
        dense_from: rows at or after this position attend every key ``j <= i`` (a multiple of
            ``block_size``: whole query blocks at the end run dense).

    Semantics: entries outside ``[0, N)`` are ignored; duplicates change nothing. Query ``i`` in
    query block ``m = i // block_size`` (rows ``m*bs .. m*bs+bs-1``) attends key ``j <= i`` when

    - ``j`` is a vertical, or
    - for some slash ``s``: ``m*bs - s <= j <= m*bs + bs - 1 - s``, i.e. the kernel covers each
      slash with the key interval its whole query block needs. This is a superset of the exact
      diagonal ``j == i - s``: row ``i`` also gets keys up to ``bs - 1`` positions either side.
    """
    _require_int("vertical", vertical, 3)
    _require_int("slash", slash, 3)
    if vertical.shape[:2] != slash.shape[:2]:
        raise ValueError(f"vertical {tuple(vertical.shape)} and slash {tuple(slash.shape)} differ in [B, H]")
    device = vertical.device
    i = _rows(n, rows, device)  # [R]
    j = torch.arange(n, device=device)  # [N]
    b, h = vertical.shape[:2]
    mask = torch.zeros(b, h, i.numel(), n, dtype=torch.bool, device=device)
    # Verticals: a column set per (b, h), broadcast over rows.
    v = vertical.long()
    v_ok = (v >= 0) & (v < n)
    cols = torch.zeros(b, h, n + 1, dtype=torch.bool, device=device)
    cols.scatter_(-1, torch.where(v_ok, v, n), True)
    mask |= cols[:, :, None, :n]
    # Slashes: row i of block m gets key j when d = m*bs - j lies in [s - bs + 1, s] for some
    # slash s, i.e. some slash lies in [d, d + bs - 1]. Count slashes per offset with a prefix sum
    # over d in [-(bs - 1), n) (smaller d means j > i, masked anyway).
    s = slash.long()
    s_ok = (s >= 0) & (s < n)
    marks = torch.zeros(b, h, n + 1, dtype=torch.int32, device=device)
    marks.scatter_(-1, torch.where(s_ok, s, n), 1)
    marks[..., n] = 0
    prefix = torch.cat([torch.zeros(b, h, 1, dtype=torch.int32, device=device), marks[..., :n].cumsum(-1, dtype=torch.int32)], -1)
    d = torch.arange(-(block_size - 1), n, device=device)  # offsets; prefix[x] = #slashes < x
    upper = (d + block_size).clamp(0, n)
    lower = d.clamp(0, n)
    covered = (prefix[..., upper] - prefix[..., lower]) > 0  # [B, H, n + bs - 1]
    offset = (i // block_size * block_size)[:, None] - j[None, :]  # [R, N]
    offset_idx = (offset + block_size - 1).clamp(0, n + block_size - 2)
    mask |= covered[:, :, offset_idx] & (offset >= -(block_size - 1))[None, None]
    if dense_from is not None:
        mask |= (i >= dense_from)[None, None, :, None]
    return mask & (j[None, :] <= i[:, None])[None, None]


def block_sparse_mask(
    block_index: torch.Tensor,
    n: int,
    block_size: int = 64,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mask ``[B, H, R, N]`` of :func:`longinfer.ops.block_sparse_attention`.

    Args:
        block_index: ``[B, H, ceil(N / block_size), K]`` key-block ids per query block; ``-1`` (or
            any id outside ``[0, ceil(N/bs))``) marks an unused slot; duplicates change nothing.
        n: sequence length ``N``.
        block_size: size of query and key blocks.
        rows: optional query positions ``[R]``.

    Query ``i`` in block ``m`` attends key ``j <= i`` when ``j // block_size`` is listed for ``m``.
    Blocks above the diagonal are therefore ignored and the diagonal block is causal.
    """
    _require_int("block_index", block_index, 4)
    num_blocks = math.ceil(n / block_size)
    if block_index.shape[2] != num_blocks:
        raise ValueError(
            f"block_index has {block_index.shape[2]} query blocks, expected ceil({n}/{block_size}) = {num_blocks}"
        )
    device = block_index.device
    b, h = block_index.shape[:2]
    ids = block_index.long()
    ok = (ids >= 0) & (ids < num_blocks)
    picked = torch.zeros(b, h, num_blocks, num_blocks + 1, dtype=torch.bool, device=device)
    picked.scatter_(-1, torch.where(ok, ids, num_blocks), True)
    picked = picked[..., :num_blocks]  # [B, H, QB, KB]
    i = _rows(n, rows, device)
    j = torch.arange(n, device=device)
    mask = picked[:, :, i // block_size][..., j // block_size]  # [B, H, R, N]
    return mask & (j[None, :] <= i[:, None])[None, None]


def tile_keys_mask(
    columns: torch.Tensor,
    n: int,
    local: int,
    block_size: int = 64,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mask ``[B, H, R, N]`` of :func:`longinfer.ops.tile_keys_attention`.

    Args:
        columns: ``[B, H, ceil(N / block_size), K]`` key ids per query tile; ``-1`` (or any id outside
            ``[0, N)``) marks an unused slot; duplicates change nothing.
        n: sequence length ``N``.
        local: the band: the ``local`` most recent keys of each tile's last row.
        block_size: query tile size.
        rows: optional query positions ``[R]``.

    Query ``i`` in tile ``m`` attends key ``j <= i`` when ``j >= min(N, (m + 1) * block_size) - local``
    (the band) or ``j`` is listed for tile ``m``. Memory: ``[B, H, R, N]`` bools (and as many for the rows' tiles).
    """
    _require_int("columns", columns, 4)
    num_tiles = math.ceil(n / block_size)
    if columns.shape[2] != num_tiles:
        raise ValueError(f"columns has {columns.shape[2]} query tiles, expected ceil({n}/{block_size}) = {num_tiles}")
    device = columns.device
    i = _rows(n, rows, device)
    j = torch.arange(n, device=device)
    tile = i // block_size
    tiles, of_row = torch.unique(tile, return_inverse=True)  # only the tiles holding the rows
    ids = columns[:, :, tiles].long()
    ok = (ids >= 0) & (ids < n)
    listed = torch.zeros(*ids.shape[:3], n + 1, dtype=torch.bool, device=device)
    listed.scatter_(-1, torch.where(ok, ids, n), True)
    band_start = torch.clamp((tile + 1) * block_size, max=n) - local  # [R]
    in_band = j[None, :] >= band_start[:, None]
    mask = listed[:, :, of_row, :n] | in_band[None, None]
    return mask & (j[None, :] <= i[:, None])[None, None]


def a_shape_mask(
    sink: int,
    window: int,
    n: int,
    rows: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Mask ``[1, 1, R, N]`` of :func:`longinfer.ops.a_shape_attention` (broadcasts over B and H).

    Query ``i`` attends key ``j <= i`` when ``j < sink`` (attention sinks) or ``i - j < window``
    (the local window, the query itself included when ``window >= 1``).
    """
    if sink < 0 or window < 0:
        raise ValueError(f"sink and window must be >= 0, got sink={sink}, window={window}")
    i = _rows(n, rows, torch.device(device))
    j = torch.arange(n, device=i.device)
    keep = (j[None, :] < sink) | (i[:, None] - j[None, :] < window)
    return (keep & (j[None, :] <= i[:, None]))[None, None]


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    sm_scale: float | None = None,
    rows: torch.Tensor | None = None,
    query_chunk: int = 1024,
) -> torch.Tensor:
    """Attention in float32 restricted to ``mask``; the ground truth for every kernel.

    Args:
        q: ``[B, Hq, N, D]`` (or ``[B, Hq, R, D]`` when ``rows`` is given: the query rows only).
        k, v: ``[B, Hkv, N, D]``.
        mask: boolean ``[B or 1, Hm, R, N]`` with ``Hq % Hm == 0``; mask head ``h // (Hq // Hm)``
            applies to query head ``h``. ``R`` = ``N`` or ``len(rows)``.
        sm_scale: softmax scale, default ``1 / sqrt(D)``.
        rows: positions of the given query rows (only used to check shapes; the mask encodes them).
        query_chunk: rows per step; memory is ``O(B * Hq * query_chunk * N)`` floats.

    Returns:
        ``[B, Hq, R, D]`` float32. Rows with an empty mask are zero.
    """
    bsz, hq, r, d = q.shape
    hkv = k.shape[1]
    if rows is not None and rows.numel() != r:
        raise ValueError(f"q has {r} rows but rows has {rows.numel()} entries")
    if hq % hkv or hq % mask.shape[1]:
        raise ValueError(f"heads must divide: Hq={hq}, Hkv={hkv}, mask heads={mask.shape[1]}")
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    kf = k.float().repeat_interleave(hq // hkv, dim=1)
    vf = v.float().repeat_interleave(hq // hkv, dim=1)
    full_mask = mask.repeat_interleave(hq // mask.shape[1], dim=1)
    out = torch.zeros(bsz, hq, r, d, dtype=torch.float32, device=q.device)
    for start in range(0, r, query_chunk):
        stop = min(start + query_chunk, r)
        scores = torch.matmul(q[:, :, start:stop].float(), kf.transpose(-1, -2)) * scale
        m = full_mask[:, :, start:stop]
        scores = scores.masked_fill(~m, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        probs = torch.nan_to_num(probs, nan=0.0)  # all-masked rows
        out[:, :, start:stop] = torch.matmul(probs, vf)
    return out
