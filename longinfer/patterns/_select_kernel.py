"""Triton kernels of the vertical-slash budget: estimated masses -> packed index.

:func:`select_packed_triton` returns what :func:`longinfer.patterns.vertical_slash.select_items`
followed by ``_pack_taken`` returns (the torch path, the reference), for ``rank="mass"`` with a
``"fixed"`` or ``"coverage"`` budget and no ``min_vertical`` / ``min_slash`` (``select_packed`` adds those
minimums to this kernel's index afterwards: ``vertical_slash._add_floors``):

- *candidates*: the top ``num_vertical`` columns and top ``num_slash`` diagonals, forced items
  (the first ``sink`` columns, the first ``local`` diagonals) ranked ``+inf``, ties to the lower
  position;
- *coverage*: candidates in the order (rank descending, columns before diagonals, position
  ascending), taken while the mass taken before them is below ``tau``; forced items always;
- *packing*: taken positions ascending, then ``-1``.

The thresholds are found by radix select on the float bits (non-negative floats order as their
int32 bits), 4 bits per pass, 8 passes: a pass counts the items (and sums their mass, in
float64) per 16 digit values of the bits below the prefix the earlier passes resolved.

Coverage without the caps decides the row whenever the prefix it takes holds at most
``num_vertical`` columns and ``num_slash`` diagonals: the caps cannot change it then (an item the
caps remove ranks below every taken item of its kind, so after the last taken item).

Two paths:

- *parallel* (coverage budget, rows of at least ``2 * MIN_SLICE`` keys): each row is cut into
  slices, one program per (row, slice); one launch per radix pass (each program replays the
  earlier passes from the float64 digit sums in ``HIST``, sums its slice and adds 32 values
  atomically), then one launch counting per slice the items above the threshold and equal to it,
  and one packing them at the offsets those counts give (of a run of equal masses at the boundary,
  the first ``ceil(left / mass)`` by tie rank). That is round 0, coverage without the caps. Rows
  whose caps bind (known only after round 0, on device) go through round 1 in the same launches'
  shape: 8 passes of a top-``cap`` radix search per kind (the candidates), one launch copying the
  candidates' masses into a buffer (at most ``num_vertical + num_slash``), 8 coverage passes over
  that buffer, count and pack; the other rows' programs return at once. With
  ``ParallelOptions(compact_after=k)`` (the default, k = 2), after ``k`` passes of round 0 one launch
  copies the items still in play (higher bits equal to the prefix; after two passes a factor-4
  band of masses) into a buffer, and the remaining passes read that instead of the rows;
- *sequential* (the fixed budget, short rows, and capped rows whose cap falls inside a run of
  equal masses: position ranks among the candidates), on device without a host round trip: one
  program per row does it all; rows the parallel path finished exit at once.

Measured (H200, session 10, ``docs/results/gpu-session10/``): ``benchmarks/select_bench.py`` (12
rows, default-plan budget, structured masses) 0.23 ms vs the torch path's 0.61 ms at 69,632 keys,
0.32 vs 0.65 ms at 131,072 (round 1's launches, idle there, included); with every row capped
0.47 vs 0.46 ms. On a real turn's masses (``benchmarks/turn_kernels.py``, Qwen2.5-1.5B, 4K over
64K) 0.23 ms per layer where no cap binds and 0.49-0.54 ms in the 10 of 28 layers where one head's
cap binds (14 ms when those rows took the sequential path, before round 1 existed). A variant
that skipped the one-hot sums of chunks without a matching item (a branch in the chunk loop) was
slower and was reverted.

Compiling: the radix pass, round and histogram section are runtime arguments and the integers
that follow the prompt length are not specialized (``do_not_specialize``), so a process compiles
each of the 10 kernels once whatever the passes and lengths; the sequential kernel's four radix
searches are loops, not unrolled. Before (session 12, H200, ``benchmarks/cold_start.py``) they
were 33 constexpr variants, 38-49 s of a fresh machine's first call, more whenever a new length
changed an argument's divisibility by 16; on a 2-core CPU (``benchmarks/kernel_resources.py``, sm_90)
63.5 s then, 17.5 s now.

Same sets as the torch path, with differences at rounding level only: the mass before an item is
summed in a different order (both in float64; the parallel path's atomic sums also vary by run at
~1e-16), and among items of exactly equal mass at the coverage boundary the count taken is
``ceil(left / mass)``, not sequential sums.

Memory: the outputs plus ``R * 768`` float64 digit sums, ``R * 4 * slices`` int32 counts per round
and ``R * 4`` row states, a ``[R, num_vertical + num_slash]`` float32 candidate buffer, and with
compaction a ``[R, 2 * Nk]`` float32 buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from longinfer.ops._checks import interpreter_enabled

INF_BITS = tl.constexpr(0x7F800000)  # int32 bits of +inf: the rank of forced items
NONE_BITS = tl.constexpr(0x7FFFFFFF)  # above every non-NaN float's bits: a threshold that takes nothing
PARALLEL_PROGRAMS = 512  # the parallel path cuts rows into slices until a launch has about this many programs
MAX_SLICES = 128  # slices per row at most (a program sums the counts of its row's slices)
MIN_SLICE = 1024  # items per slice at least


@triton.jit
def _load_row(ptr, offs, n, forced):
    """Masses at ``offs`` of one row: ``(mass float32, mass bits, rank bits, valid)``.

    Bits are the int32 view of the non-negative float (``+ 0.0`` turns ``-0.0`` into ``+0.0``);
    the rank is ``+inf`` for forced positions (``offs < forced``)."""
    valid = offs < n
    mass = tl.load(ptr + offs, mask=valid, other=0.0) + 0.0
    mass_bits = mass.to(tl.int32, bitcast=True)
    rank_bits = tl.where(offs < forced, INF_BITS, mass_bits)
    return mass, mass_bits, rank_bits, valid


@triton.jit
def _in_candidates(rank_bits, valid, thresh, ties, seen):
    """Which items of a chunk are candidates: rank above ``thresh``, or equal to it and among the
    first ``ties`` such items of the row in position order (``seen`` of them came in earlier
    chunks). Returns ``(candidate, seen after this chunk)``."""
    equal = (valid & (rank_bits == thresh)).to(tl.int32)
    rank = seen + tl.cumsum(equal, 0) - equal
    candidate = valid & ((rank_bits > thresh) | ((equal > 0) & (rank < ties)))
    return candidate, seen + tl.sum(equal, 0)


@triton.jit
def _digit_hits(bits, live, prefix, shift):
    """``[CHUNK, 16]`` one-hot of the 4-bit digit at ``shift`` of the live items whose higher bits
    equal ``prefix``'s (every live item in the first pass, ``shift`` 28: nothing above it is resolved).
    ``shift`` may be a runtime value: one compiled kernel then serves all 8 passes."""
    higher = _below_32(shift + 4)
    match = live & (((bits >> higher) == (prefix >> higher)) | (shift >= 28))
    digits = tl.arange(0, 16)
    return (((bits >> shift) & 15)[:, None] == digits[None, :]) & match[:, None]


@triton.jit
def _below_32(shift):
    """``shift`` with 32 replaced by 31: an int32 shift by 32 is undefined, and the callers ignore its
    result then."""
    return shift - shift // 32


@triton.jit
def _lowest_digit_below(before, count, limit):
    """The lowest digit (the last one in descending order) holding items with less than ``limit``
    before them; ``before[d]`` is the amount in digits above ``d``. Returns ``(digit, before[digit])``."""
    digits = tl.arange(0, 16)
    best = tl.min(tl.where((count > 0) & (before < limit), digits, 16), 0)
    return best, tl.sum(tl.where(digits == best, before, 0), 0)


@triton.jit
def _above(values):
    """``[16]`` -> per digit the sum of the values of the higher digits."""
    digits = tl.arange(0, 16)
    return tl.sum(tl.where(digits[None, :] > digits[:, None], values[None, :], 0), 1)


@triton.jit
def _kth_largest(ptr, n, forced, needed, CHUNK: tl.constexpr):
    """Threshold of the ``needed`` largest ranks of a row: ``(bits, ties)`` such that the items
    ranked above ``bits`` and the first ``ties`` items equal to it (position order) are exactly
    ``needed`` items. ``needed == 0`` gives ``(NONE_BITS, 0)``."""
    want = tl.maximum(needed, 1)
    prefix = tl.full([], 0, tl.int32)
    for p in range(8):  # a loop, not unrolled: the sequential kernel's compile time grows with each copy
        counts = tl.zeros([16], tl.int32)
        for start in range(0, n, CHUNK):
            offs = start + tl.arange(0, CHUNK)
            _, _, rank_bits, valid = _load_row(ptr, offs, n, forced)
            counts += tl.sum(_digit_hits(rank_bits, valid, prefix, 28 - 4 * p).to(tl.int32), 0)
        best, before = _lowest_digit_below(_above(counts), counts, want)
        want -= before
        prefix = prefix | (best << (28 - 4 * p))
    return tl.where(needed > 0, prefix, NONE_BITS), tl.where(needed > 0, want, 0)


@triton.jit
def _mass_pass(ptr, n, forced, cand_bits, cand_ties, prefix, counts, masses, shift, CHUNK: tl.constexpr):
    """One radix pass of the coverage threshold over one kind: adds the count and float64 mass
    of its live (non-forced candidate) items per digit at ``shift`` under ``prefix``."""
    seen = tl.full([], 0, tl.int32)
    for start in range(0, n, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        mass, mass_bits, rank_bits, valid = _load_row(ptr, offs, n, forced)
        candidate, seen = _in_candidates(rank_bits, valid, cand_bits, cand_ties, seen)
        hits = _digit_hits(mass_bits, candidate & (offs >= forced), prefix, shift)
        counts += tl.sum(hits.to(tl.int32), 0)
        masses += tl.sum(tl.where(hits, mass.to(tl.float64)[:, None], 0.0), 0)
    return counts, masses


@triton.jit
def _forced_mass(ptr, n, forced, CHUNK: tl.constexpr):
    """Float64 sum of the masses at positions ``< min(forced, n)``."""
    total = tl.zeros([CHUNK], tl.float64)
    for start in range(0, tl.minimum(forced, n), CHUNK):
        offs = start + tl.arange(0, CHUNK)
        total += tl.load(ptr + offs, mask=(offs < forced) & (offs < n), other=0.0).to(tl.float64)
    return tl.sum(total, 0)


@triton.jit
def _coverage_threshold(col_ptr, diag_ptr, n, sink, local, col_bits, col_ties, diag_bits, diag_ties, left,
                        CHUNK: tl.constexpr):
    """Threshold ``(bits, ties)`` of the non-forced candidates taken while the mass before them is
    below ``left`` (``tau`` minus the forced mass): those with mass bits above ``bits`` and the
    first ``ties`` equal to it (columns first, then diagonals, in position order)."""
    prefix = tl.full([], 0, tl.int32)
    tie_count = tl.full([], 0, tl.int32)
    for p in range(8):  # not unrolled (see _kth_largest)
        counts = tl.zeros([16], tl.int32)
        masses = tl.zeros([16], tl.float64)
        counts, masses = _mass_pass(col_ptr, n, sink, col_bits, col_ties, prefix, counts, masses,
                                    28 - 4 * p, CHUNK)
        counts, masses = _mass_pass(diag_ptr, n, local, diag_bits, diag_ties, prefix, counts, masses,
                                    28 - 4 * p, CHUNK)
        best, before = _lowest_digit_below(_above(masses), counts, left)
        left -= before
        prefix = prefix | (best << (28 - 4 * p))
        tie_count = tl.sum(tl.where(tl.arange(0, 16) == best, counts, 0), 0)
    tie_mass = prefix.to(tl.float32, bitcast=True).to(tl.float64)
    safe_mass = tl.where(tie_mass > 0, tie_mass, 1.0)
    ties = tl.where(tie_mass > 0, tl.minimum(tl.ceil(left / safe_mass), tie_count.to(tl.float64)).to(tl.int32),
                    tie_count)
    return tl.where(tie_count > 0, prefix, NONE_BITS), tl.where(tie_count > 0, ties, 0)


@triton.jit
def _pack(ptr, out_ptr, n, forced, width, cand_bits, cand_ties, take_bits, take_ties, take_seen,
          CHUNK: tl.constexpr):
    """Store the taken positions of one kind ascending at ``out_ptr[0 .. width)``, ``-1`` after.

    Taken: forced, or a candidate whose mass is above ``take_bits`` or equal to it and among the
    first ``take_ties`` such items (``take_seen`` of them in the kinds before). Returns
    ``(taken count, take_seen after this kind)``; positions past ``width`` are not stored."""
    cand_seen = tl.full([], 0, tl.int32)
    slot0 = tl.full([], 0, tl.int32)
    for start in range(0, n, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        _, mass_bits, rank_bits, valid = _load_row(ptr, offs, n, forced)
        candidate, cand_seen = _in_candidates(rank_bits, valid, cand_bits, cand_ties, cand_seen)
        is_forced = valid & (offs < forced)
        live = candidate & ~is_forced
        equal = (live & (mass_bits == take_bits)).to(tl.int32)
        tie_rank = take_seen + tl.cumsum(equal, 0) - equal
        taken = (is_forced | (live & ((mass_bits > take_bits) | ((equal > 0) & (tie_rank < take_ties))))).to(tl.int32)
        take_seen += tl.sum(equal, 0)
        slot = slot0 + tl.cumsum(taken, 0) - taken
        tl.store(out_ptr + slot, offs.to(tl.int64), mask=(taken > 0) & (slot < width))
        slot0 += tl.sum(taken, 0)
    for start in range(tl.minimum(slot0, width), width, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        tl.store(out_ptr + offs, tl.full([CHUNK], -1, tl.int64), mask=offs < width)
    return slot0, take_seen


@triton.jit
def _left_after_forced(col_ptr, diag_ptr, n, sink, local, tau_high, tau_low, CHUNK: tl.constexpr):
    """``tau`` (float64, from its two float32 parts) minus the mass of the forced items."""
    return (tl.zeros([], tl.float64) + tau_high + tau_low
            - _forced_mass(col_ptr, n, sink, CHUNK) - _forced_mass(diag_ptr, n, local, CHUNK))


@triton.jit
def _select_row(col_ptr, diag_ptr, vert_ptr, slash_ptr, n, sink, local, num_vertical, num_slash, tau_high, tau_low,
                COVERAGE: tl.constexpr, CHUNK: tl.constexpr):
    """The whole budget of one row in one program (the sequential path, see the module docstring)."""
    left = _left_after_forced(col_ptr, diag_ptr, n, sink, local, tau_high, tau_low, CHUNK)
    reached = left <= 0  # the forced items reach tau: nothing else is taken
    left = tl.maximum(left, 1e-300)  # keeps the search defined; its result is discarded when reached
    none = tl.full([], 0, tl.int32)
    capped = not COVERAGE
    if COVERAGE:
        # every valid item is a candidate (rank bits >= 0 > -1): coverage without the caps first
        take_bits, take_ties = _coverage_threshold(col_ptr, diag_ptr, n, sink, local, none - 1, none, none - 1,
                                                   none, left, CHUNK)
        take_bits = tl.where(reached, NONE_BITS, take_bits)
        cols, seen = _pack(col_ptr, vert_ptr, n, sink, num_vertical, none - 1, none, take_bits, take_ties, none,
                           CHUNK)
        diags, _ = _pack(diag_ptr, slash_ptr, n, local, num_slash, none - 1, none, take_bits, take_ties, seen,
                         CHUNK)
        capped = (cols > num_vertical) | (diags > num_slash)
    if capped:
        col_bits, col_ties = _kth_largest(col_ptr, n, sink, tl.minimum(num_vertical, n), CHUNK)
        diag_bits, diag_ties = _kth_largest(diag_ptr, n, local, tl.minimum(num_slash, n), CHUNK)
        capped_bits = none - 1  # the fixed budget takes every candidate
        capped_ties = none
        if COVERAGE:
            capped_bits, capped_ties = _coverage_threshold(col_ptr, diag_ptr, n, sink, local, col_bits, col_ties,
                                                           diag_bits, diag_ties, left, CHUNK)
            capped_bits = tl.where(reached, NONE_BITS, capped_bits)
        _, capped_seen = _pack(col_ptr, vert_ptr, n, sink, num_vertical, col_bits, col_ties, capped_bits,
                               capped_ties, none, CHUNK)
        _pack(diag_ptr, slash_ptr, n, local, num_slash, diag_bits, diag_ties, capped_bits, capped_ties,
              capped_seen, CHUNK)


# ---- the parallel path: (row, slice) programs, one launch per radix pass ------------------------------------------
#
# HIST [R, 3, 8, 2, 16] float64, one section per search (each [8 passes, 2, 16 digits]):
#   COVERAGE_HIST: the coverage threshold over every item (counts, masses per digit);
#   KTH_HIST: rows whose caps bind, the top-``cap`` threshold of each kind (column counts, diagonal counts);
#   CAPPED_HIST: those rows' coverage threshold over their candidates (counts, masses).
# COUNTS [R, 4, slices] int32, one tensor per round (round 1's launches may use other slices): per
# slice the items above the threshold and equal to it, of each kind (columns above, columns equal,
# diagonals above, diagonals equal).
# STATE [R, 4] int32, written once per row between launches so that round 1's programs load it
# instead of replaying it: (caps bind, column candidate bits, diagonal candidate bits, exact).
HIST_ROW = tl.constexpr(768)
COVERAGE_HIST = tl.constexpr(0)
KTH_HIST = tl.constexpr(256)
CAPPED_HIST = tl.constexpr(512)


@triton.jit
def _replay(counts_ptr, amounts_ptr, left, upto):
    """Search state after the first ``upto`` radix passes, from their per-digit sums (pass ``p``'s 16
    counts at ``counts_ptr + 32 p``, its 16 amounts at ``amounts_ptr + 32 p``): ``(prefix bits, left,
    count of the last pass's chosen digit)``. Coverage sums masses as amounts (``left``: the mass
    still to take); the top-k search reads its counts as amounts (``left``: the items still to take)."""
    digits = tl.arange(0, 16)
    prefix = tl.full([], 0, tl.int32)
    tie_count = tl.zeros([], tl.float64)
    for p in tl.static_range(8):
        if p < upto:
            counts = tl.load(counts_ptr + p * 32 + digits)
            amounts = tl.load(amounts_ptr + p * 32 + digits)
            best, before = _lowest_digit_below(_above(amounts), counts, left)
            left -= before
            prefix = prefix | (best << (28 - 4 * p))
            tie_count = tl.sum(tl.where(digits == best, counts, 0.0), 0)
    return prefix, left, tie_count


@triton.jit
def _replay_coverage(hist, left, upto):
    """Coverage search state after ``upto`` passes (pass ``p``: 16 counts, 16 masses at ``hist + 32 p``)."""
    return _replay(hist, hist + 16, left, upto)


@triton.jit
def _replay_top(hist_kind, needed, upto):
    """Top-``needed`` search of one kind after ``upto`` passes (its counts at ``hist_kind + 32 p``):
    ``(prefix bits, items still to take, count of the last digit)``."""
    return _replay(hist_kind, hist_kind, tl.maximum(needed, 1).to(tl.float64), upto)


@triton.jit
def _candidate_bits(hist_row, n, num_vertical, num_slash):
    """A capped row's candidates after the 8 top-k passes: ``(column bits, diagonal bits, exact)``;
    items ranked at or above their kind's bits are the candidates, unless ``exact`` is false (a run
    of equal ranks straddles a cap: position ranks needed, left to the sequential path)."""
    cols = tl.minimum(num_vertical, n)
    diags = tl.minimum(num_slash, n)
    col_bits, col_left, col_run = _replay_top(hist_row + KTH_HIST, cols, 8)
    diag_bits, diag_left, diag_run = _replay_top(hist_row + KTH_HIST + 16, diags, 8)
    exact = ((cols == 0) | (col_left == col_run)) & ((diags == 0) | (diag_left == diag_run))
    return tl.where(cols > 0, col_bits, NONE_BITS), tl.where(diags > 0, diag_bits, NONE_BITS), exact


@triton.jit
def _slice_digits(ptr, lo, hi, forced, prefix, counts, masses, shift, CHUNK: tl.constexpr, DEFER: tl.constexpr):
    """Adds the count and float64 mass per digit at ``shift`` of the non-forced items ``lo .. hi - 1``
    whose higher bits equal ``prefix``'s. With ``DEFER`` the ``[CHUNK, 16]`` one-hot sums accumulate
    element-wise and are reduced over the chunk axis once at the end (see :class:`ParallelOptions`)."""
    count_lanes = tl.zeros([CHUNK, 16], tl.int32)
    mass_lanes = tl.zeros([CHUNK, 16], tl.float64)
    for start in range(lo, hi, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        valid = offs < hi
        mass = tl.load(ptr + offs, mask=valid, other=0.0) + 0.0
        hits = _digit_hits(mass.to(tl.int32, bitcast=True), valid & (offs >= forced), prefix, shift)
        if DEFER:
            count_lanes += hits.to(tl.int32)
            mass_lanes += tl.where(hits, mass.to(tl.float64)[:, None], 0.0)
        else:
            counts += tl.sum(hits.to(tl.float64), 0)
            masses += tl.sum(tl.where(hits, mass.to(tl.float64)[:, None], 0.0), 0)
    if DEFER:
        counts += tl.sum(count_lanes, 0).to(tl.float64)
        masses += tl.sum(mass_lanes, 0)
    return counts, masses


@triton.jit
def _threshold(col_ptr, diag_ptr, hist, n, sink, local, tau_high, tau_low, CHUNK: tl.constexpr):
    """After all 8 coverage passes (``hist``: their sums): ``(take_bits, ties)``: the non-forced
    (candidate) items with mass bits above ``take_bits`` are taken, and of those equal to it the
    first ``ties`` in the order columns, diagonals, position (``ceil(left / mass)`` of the run)."""
    left = _left_after_forced(col_ptr, diag_ptr, n, sink, local, tau_high, tau_low, CHUNK)
    reached = left <= 0
    prefix, left, tie_count = _replay_coverage(hist, tl.maximum(left, 1e-300), 8)
    tie_mass = prefix.to(tl.float32, bitcast=True).to(tl.float64)
    ties = tl.where(tie_mass > 0, tl.minimum(tl.ceil(left / tl.where(tie_mass > 0, tie_mass, 1.0)), tie_count),
                    tie_count)
    none = reached | (tie_count == 0)
    return tl.where(none, NONE_BITS, prefix), tl.where(none, 0, ties.to(tl.int32))


@triton.jit
def _add_digit_sums(hist, counts, amounts):
    """Adds a program's 32 digit sums of one pass to ``hist`` (if it saw any item)."""
    if (tl.sum(counts, 0) > 0) | (tl.sum(amounts, 0) > 0):
        digits = tl.arange(0, 16)
        tl.atomic_add(hist + digits, counts)
        tl.atomic_add(hist + 16 + digits, amounts)


@triton.jit
def _program_slice(size, length):
    """This (row, slice) program's ``(row, slice, slices, lo, hi)``: slice ``s`` of ``size`` items
    covers ``s * size .. min((s + 1) * size, length) - 1`` of its row."""
    part = tl.program_id(1)
    lo = part * size
    return tl.program_id(0).to(tl.int64), part, tl.num_programs(1), lo, tl.minimum(lo + size, length)


@triton.jit
def _row_prefix(COLUMNS, DIAGONALS, HIST, row, n, sink, local, tau_high, tau_low, section, done,
                CHUNK: tl.constexpr):
    """``(columns pointer, diagonals pointer, prefix)`` of a row: the bits its first ``done`` coverage
    passes resolved (replayed from its ``section`` of ``HIST``)."""
    col_ptr = COLUMNS + row * n
    diag_ptr = DIAGONALS + row * n
    left = _left_after_forced(col_ptr, diag_ptr, n, sink, local, tau_high, tau_low, CHUNK)
    prefix, _, _ = _replay_coverage(HIST + row * HIST_ROW + section, tl.maximum(left, 1e-300), done)
    return col_ptr, diag_ptr, prefix


@triton.jit
def _slice_offsets(counts_row, part, slices, ties, MAX_SLICES: tl.constexpr):
    """From one round's ``[4, slices]`` counts of a row and the threshold's ``ties``: ``(columns
    taken before slice part, all columns taken, diagonals before, all diagonals, the tie rank of
    the slice's first equal column, of its first equal diagonal)``."""
    index = tl.arange(0, MAX_SLICES)
    mask = index < slices
    col_above = tl.load(counts_row + index, mask=mask, other=0)
    col_equal = tl.load(counts_row + slices + index, mask=mask, other=0)
    diag_above = tl.load(counts_row + 2 * slices + index, mask=mask, other=0)
    diag_equal = tl.load(counts_row + 3 * slices + index, mask=mask, other=0)
    col_rank0 = tl.cumsum(col_equal, 0) - col_equal
    diag_rank0 = tl.sum(col_equal, 0) + tl.cumsum(diag_equal, 0) - diag_equal
    cols = col_above + tl.minimum(tl.maximum(ties - col_rank0, 0), col_equal)
    diags = diag_above + tl.minimum(tl.maximum(ties - diag_rank0, 0), diag_equal)
    before = index < part
    here = index == part
    return (tl.sum(tl.where(before, cols, 0), 0), tl.sum(cols, 0), tl.sum(tl.where(before, diags, 0), 0),
            tl.sum(diags, 0), tl.sum(tl.where(here, col_rank0, 0), 0), tl.sum(tl.where(here, diag_rank0, 0), 0))


@triton.jit
def _is_capped(col_ptr, diag_ptr, HIST, COUNTS, row, n, sink, local, num_vertical, num_slash, tau_high, tau_low,
               slices, CHUNK: tl.constexpr, MAX_SLICES: tl.constexpr):
    """Whether coverage without the caps takes more than a cap allows in ``row`` (round 0's result)."""
    _, ties = _threshold(col_ptr, diag_ptr, HIST + row * HIST_ROW + COVERAGE_HIST, n, sink, local, tau_high,
                         tau_low, CHUNK)
    _, cols, _, diags, _, _ = _slice_offsets(COUNTS + row * 4 * slices, 0, slices, ties, MAX_SLICES)
    return (cols > num_vertical) | (diags > num_slash)


@triton.jit(do_not_specialize=["n", "slices"])
def _capped_kernel(COLUMNS, DIAGONALS, HIST, COUNTS, STATE, n, sink, local, num_vertical, num_slash, tau_high, tau_low,
                   slices, CHUNK: tl.constexpr, MAX_SLICES: tl.constexpr):
    """After round 0, grid ``(R,)``: whether each row's caps bind, into ``STATE[row, 0]``."""
    row = tl.program_id(0).to(tl.int64)
    capped = _is_capped(COLUMNS + row * n, DIAGONALS + row * n, HIST, COUNTS, row, n, sink, local, num_vertical,
                        num_slash, tau_high, tau_low, slices, CHUNK, MAX_SLICES)
    tl.store(STATE + row * 4, capped.to(tl.int32))


@triton.jit(do_not_specialize=["n"])
def _candidates_kernel(HIST, STATE, n, num_vertical, num_slash):
    """After the top-k passes, grid ``(R,)``: a capped row's candidate bits and exactness into
    ``STATE[row, 1:4]``."""
    row = tl.program_id(0).to(tl.int64)
    if tl.load(STATE + row * 4) != 0:
        col_bits, diag_bits, exact = _candidate_bits(HIST + row * HIST_ROW, n, num_vertical, num_slash)
        tl.store(STATE + row * 4 + 1, col_bits)
        tl.store(STATE + row * 4 + 2, diag_bits)
        tl.store(STATE + row * 4 + 3, exact.to(tl.int32))


@triton.jit
def _round_state(STATE, row, round_index):
    """``(active, exact, column candidate bits, diagonal candidate bits)`` of a row in round
    ``round_index``: round 0 works on every row without caps (candidate bits -1: everything); round
    1 on the rows whose caps bind, with their top-k candidates (``exact`` false: sequential path).
    Round 0 reads ``STATE`` too (zeros then) so that one compiled kernel serves both rounds."""
    first = round_index == 0
    state = STATE + row * 4
    active = (tl.load(state) != 0) | first
    exact = (tl.load(state + 3) != 0) | first
    col_bits = tl.where(first, -1, tl.load(state + 1))
    diag_bits = tl.where(first, -1, tl.load(state + 2))
    return active, exact, col_bits, diag_bits


@triton.jit
def _round_hist(HIST, row, round_index):
    """A row's digit sums of the coverage search of round ``round_index`` (0: every item, 1: the candidates)."""
    return HIST + row * HIST_ROW + tl.where(round_index == 0, COVERAGE_HIST, CAPPED_HIST)


@triton.jit(do_not_specialize=["n", "slice_len", "radix_pass"])
def _pass_kernel(COLUMNS, DIAGONALS, HIST, n, sink, local, slice_len, tau_high, tau_low, radix_pass,
                 CHUNK: tl.constexpr, DEFER: tl.constexpr):
    """Round 0's coverage radix pass ``radix_pass`` over the rows: grid ``(R, slices)``; each program replays
    the earlier passes, sums its slice of both kinds per digit and adds the 32 sums to ``HIST``."""
    row, _, _, lo, hi = _program_slice(slice_len, n)
    col_ptr, diag_ptr, prefix = _row_prefix(COLUMNS, DIAGONALS, HIST, row, n, sink, local, tau_high, tau_low,
                                            COVERAGE_HIST, radix_pass, CHUNK)
    counts = tl.zeros([16], tl.float64)
    masses = tl.zeros([16], tl.float64)
    shift = 28 - 4 * radix_pass
    counts, masses = _slice_digits(col_ptr, lo, hi, sink, prefix, counts, masses, shift, CHUNK, DEFER)
    counts, masses = _slice_digits(diag_ptr, lo, hi, local, prefix, counts, masses, shift, CHUNK, DEFER)
    _add_digit_sums(HIST + row * HIST_ROW + COVERAGE_HIST + radix_pass * 32, counts, masses)


@triton.jit
def _slice_rank_digits(ptr, lo, hi, forced, prefix, shift, CHUNK: tl.constexpr, DEFER: tl.constexpr):
    """Count per digit at ``shift`` of the ranks (``+inf`` when forced) of items ``lo .. hi - 1`` whose
    higher bits equal ``prefix``'s (``DEFER``: as in :func:`_slice_digits`)."""
    counts = tl.zeros([16], tl.float64)
    count_lanes = tl.zeros([CHUNK, 16], tl.int32)
    for start in range(lo, hi, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        _, _, rank_bits, valid = _load_row(ptr, offs, hi, forced)
        if DEFER:
            count_lanes += _digit_hits(rank_bits, valid, prefix, shift).to(tl.int32)
        else:
            counts += tl.sum(_digit_hits(rank_bits, valid, prefix, shift).to(tl.float64), 0)
    if DEFER:
        counts += tl.sum(count_lanes, 0).to(tl.float64)
    return counts


@triton.jit(do_not_specialize=["n", "slice_len", "radix_pass"])
def _top_pass_kernel(COLUMNS, DIAGONALS, HIST, STATE, n, sink, local, num_vertical, num_slash, slice_len,
                     radix_pass, CHUNK: tl.constexpr, DEFER: tl.constexpr):
    """Radix pass ``radix_pass`` of the top-``cap`` search of both kinds, for the rows whose caps bind."""
    row, part, slices, lo, hi = _program_slice(slice_len, n)
    col_ptr = COLUMNS + row * n
    diag_ptr = DIAGONALS + row * n
    if tl.load(STATE + row * 4) != 0:
        hist = HIST + row * HIST_ROW + KTH_HIST
        col_prefix, col_left, col_run = _replay_top(hist, tl.minimum(num_vertical, n), radix_pass)
        diag_prefix, diag_left, diag_run = _replay_top(hist + 16, tl.minimum(num_slash, n), radix_pass)
        shift = 28 - 4 * radix_pass
        col_counts = _slice_rank_digits(col_ptr, lo, hi, sink, col_prefix, shift, CHUNK, DEFER)
        diag_counts = _slice_rank_digits(diag_ptr, lo, hi, local, diag_prefix, shift, CHUNK, DEFER)
        _add_digit_sums(hist + radix_pass * 32, col_counts, diag_counts)


@triton.jit
def _compact_slice(ptr, buf_row, count_ptr, width, lo, hi, forced, prefix, lowest, shift, CHUNK: tl.constexpr):
    """Appends to the row's buffer (``width`` slots, taken with one atomic add per chunk, in any
    order) the masses of the non-forced items ``lo .. hi - 1`` whose bits are ``>= lowest`` and,
    with ``shift < 32``, from ``shift`` up equal ``prefix``'s."""
    same_from = _below_32(shift)
    for start in range(lo, hi, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        valid = (offs < hi) & (offs >= forced)
        mass = tl.load(ptr + offs, mask=valid, other=0.0) + 0.0
        bits = mass.to(tl.int32, bitcast=True)
        keep = valid & (bits >= lowest) & (((bits >> same_from) == (prefix >> same_from)) | (shift >= 32))
        keep = keep.to(tl.int32)
        slot = tl.atomic_add(count_ptr, tl.sum(keep, 0)) + tl.cumsum(keep, 0) - keep
        tl.store(buf_row + slot, mass, mask=(keep > 0) & (slot < width))


@triton.jit(do_not_specialize=["n", "slice_len", "done"])
def _compact_kernel(COLUMNS, DIAGONALS, HIST, BUF, BUF_COUNT, n, sink, local, slice_len, tau_high, tau_low, done,
                    CHUNK: tl.constexpr):
    """Round 0, after ``done`` passes: copies every item the later passes can still count (non-forced,
    bits above pass ``done``'s digit equal to the prefix) into ``BUF [R, 2 * n]``, their number into
    ``BUF_COUNT [R]``. Grid ``(R, slices)``."""
    row, _, _, lo, hi = _program_slice(slice_len, n)
    col_ptr, diag_ptr, prefix = _row_prefix(COLUMNS, DIAGONALS, HIST, row, n, sink, local, tau_high, tau_low,
                                            COVERAGE_HIST, done, CHUNK)
    buf_row = BUF + row * 2 * n
    _compact_slice(col_ptr, buf_row, BUF_COUNT + row, 2 * n, lo, hi, sink, prefix, -1, 32 - 4 * done, CHUNK)
    _compact_slice(diag_ptr, buf_row, BUF_COUNT + row, 2 * n, lo, hi, local, prefix, -1, 32 - 4 * done, CHUNK)


@triton.jit(do_not_specialize=["n", "slice_len"])
def _compact_candidates_kernel(COLUMNS, DIAGONALS, STATE, BUF, BUF_COUNT, n, sink, local, slice_len, width,
                               CHUNK: tl.constexpr):
    """Round 1, after the top-k search: copies the masses of a capped row's non-forced candidates
    (at most ``width = num_vertical + num_slash`` when its candidates are exact; other rows copy
    nothing) into ``BUF [R, width]``, their number into ``BUF_COUNT [R]``. Grid ``(R, slices)``."""
    row, _, _, lo, hi = _program_slice(slice_len, n)
    active, exact, col_bits, diag_bits = _round_state(STATE, row, 1)
    if active & exact:
        buf_row = BUF + row * width
        _compact_slice(COLUMNS + row * n, buf_row, BUF_COUNT + row, width, lo, hi, sink, 0, col_bits, 32, CHUNK)
        _compact_slice(DIAGONALS + row * n, buf_row, BUF_COUNT + row, width, lo, hi, local, 0, diag_bits, 32, CHUNK)


@triton.jit(do_not_specialize=["n", "buf_stride", "radix_pass", "section"])
def _buffer_pass_kernel(COLUMNS, DIAGONALS, HIST, BUF, BUF_COUNT, n, sink, local, tau_high, tau_low, buf_stride,
                        radix_pass, section, CHUNK: tl.constexpr, DEFER: tl.constexpr):
    """Coverage radix pass ``radix_pass`` over a row's compacted items (``BUF [R, buf_stride]``) instead
    of the row, into its ``section`` of ``HIST``: round 0 after :func:`_compact_kernel`, round 1 over
    the candidates of :func:`_compact_candidates_kernel`; program ``s`` of ``slices`` takes the
    ``s``-th share of its row's buffer."""
    count = tl.load(BUF_COUNT + tl.program_id(0))
    row, _, _, lo, hi = _program_slice(tl.cdiv(count, tl.num_programs(1)), count)
    # An empty share adds nothing: round 1's rows whose caps do not bind (no candidates buffered) skip
    # the replay of their search state, which every program of the launch would otherwise repeat.
    if lo < hi:
        _columns, _diagonals, prefix = _row_prefix(COLUMNS, DIAGONALS, HIST, row, n, sink, local, tau_high, tau_low,
                                                   section, radix_pass, CHUNK)
        counts = tl.zeros([16], tl.float64)
        masses = tl.zeros([16], tl.float64)
        counts, masses = _slice_digits(BUF + row * buf_stride, lo, hi, 0, prefix, counts, masses,
                                       28 - 4 * radix_pass, CHUNK, DEFER)
        _add_digit_sums(HIST + row * HIST_ROW + section + radix_pass * 32, counts, masses)


@triton.jit
def _classify(ptr, offs, valid, forced, cand_bits, take_bits):
    """Items of a chunk under a threshold: ``(above, equal)``: forced or candidates with mass bits
    above ``take_bits`` (taken), and non-forced candidates equal to it (taken by tie rank)."""
    mass_bits = (tl.load(ptr + offs, mask=valid, other=0.0) + 0.0).to(tl.int32, bitcast=True)
    is_forced = valid & (offs < forced)
    live = valid & ~is_forced & (mass_bits >= cand_bits)
    return is_forced | (live & (mass_bits > take_bits)), live & (mass_bits == take_bits)


@triton.jit
def _count_slice(ptr, counts_out, slices, lo, hi, forced, cand_bits, take_bits, CHUNK: tl.constexpr):
    """Stores a slice's items above and equal to the threshold at ``counts_out`` and ``+ slices``
    (per-lane counts, reduced once after the loop)."""
    above = tl.zeros([CHUNK], tl.int32)
    equal = tl.zeros([CHUNK], tl.int32)
    for start in range(lo, hi, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        is_above, is_equal = _classify(ptr, offs, offs < hi, forced, cand_bits, take_bits)
        above += is_above.to(tl.int32)
        equal += is_equal.to(tl.int32)
    tl.store(counts_out, tl.sum(above, 0))
    tl.store(counts_out + slices, tl.sum(equal, 0))


@triton.jit(do_not_specialize=["n", "slice_len", "round_index"])
def _count_kernel(COLUMNS, DIAGONALS, HIST, COUNTS, STATE, n, sink, local, slice_len, tau_high, tau_low, round_index,
                  CHUNK: tl.constexpr):
    """Round ``round_index``'s items above / equal to its threshold per (row, kind, slice) into its ``COUNTS``."""
    row, part, slices, lo, hi = _program_slice(slice_len, n)
    col_ptr = COLUMNS + row * n
    diag_ptr = DIAGONALS + row * n
    active, exact, col_bits, diag_bits = _round_state(STATE, row, round_index)
    if active:
        hist = _round_hist(HIST, row, round_index)
        take_bits, ties = _threshold(col_ptr, diag_ptr, hist, n, sink, local, tau_high, tau_low, CHUNK)
        counts_row = COUNTS + row * 4 * slices + part
        _count_slice(col_ptr, counts_row, slices, lo, hi, sink, col_bits, take_bits, CHUNK)
        _count_slice(diag_ptr, counts_row + 2 * slices, slices, lo, hi, local, diag_bits, take_bits, CHUNK)


@triton.jit
def _store_slice(ptr, out_ptr, lo, hi, forced, cand_bits, take_bits, ties, rank0, slot0, total, width, part, slices,
                 CHUNK: tl.constexpr):
    """Taken positions of one slice at slots ``slot0 ..`` (of the items equal to the threshold those
    whose tie rank, from ``rank0`` on, is below ``ties``), and this slice's share of the ``-1`` fill."""
    for start in range(lo, hi, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        is_above, is_equal = _classify(ptr, offs, offs < hi, forced, cand_bits, take_bits)
        equal = is_equal.to(tl.int32)
        rank = rank0 + tl.cumsum(equal, 0) - equal
        taken = (is_above | (is_equal & (rank < ties))).to(tl.int32)
        rank0 += tl.sum(equal, 0)
        slot = slot0 + tl.cumsum(taken, 0) - taken
        tl.store(out_ptr + slot, offs.to(tl.int64), mask=taken > 0)
        slot0 += tl.sum(taken, 0)
    share = tl.cdiv(width - total, slices)
    fill_lo = total + part * share
    for start in range(fill_lo, tl.minimum(fill_lo + share, width), CHUNK):
        offs = start + tl.arange(0, CHUNK)
        tl.store(out_ptr + offs, tl.full([CHUNK], -1, tl.int64), mask=(offs < width) & (offs < fill_lo + share))


@triton.jit(do_not_specialize=["n", "slice_len", "round_index"])
def _pack_kernel(COLUMNS, DIAGONALS, HIST, COUNTS, STATE, VERTICAL, SLASH, n, sink, local, num_vertical, num_slash,
                 slice_len, tau_high, tau_low, round_index, CHUNK: tl.constexpr, MAX_SLICES: tl.constexpr):
    """Writes each slice's taken positions at its offset (the counts of the slices before it), for
    the rows round ``round_index`` finishes: round 0 the rows within the caps, round 1 the capped rows
    whose candidates are exact."""
    row, part, slices, lo, hi = _program_slice(slice_len, n)
    col_ptr = COLUMNS + row * n
    diag_ptr = DIAGONALS + row * n
    active, exact, col_bits, diag_bits = _round_state(STATE, row, round_index)
    if active & exact:  # round 1: only the capped rows with exact candidates do the work below
        hist = _round_hist(HIST, row, round_index)
        take_bits, ties = _threshold(col_ptr, diag_ptr, hist, n, sink, local, tau_high, tau_low, CHUNK)
        cols_before, cols, diags_before, diags, col_rank0, diag_rank0 = _slice_offsets(
            COUNTS + row * 4 * slices, part, slices, ties, MAX_SLICES)
        # round 0: rows over a cap are left to round 1; round 1: always true (taken items are candidates)
        if (cols <= num_vertical) & (diags <= num_slash):
            _store_slice(col_ptr, VERTICAL + row * num_vertical, lo, hi, sink, col_bits, take_bits, ties, col_rank0,
                         cols_before, cols, num_vertical, part, slices, CHUNK)
            _store_slice(diag_ptr, SLASH + row * num_slash, lo, hi, local, diag_bits, take_bits, ties, diag_rank0,
                         diags_before, diags, num_slash, part, slices, CHUNK)


@triton.jit(do_not_specialize=["n"])
def _sequential_kernel(COLUMNS, DIAGONALS, STATE, VERTICAL, SLASH, n, sink, local, num_vertical, num_slash, tau_high,
                       tau_low, COVERAGE: tl.constexpr, ALWAYS: tl.constexpr, CHUNK: tl.constexpr):
    """One program per row: the whole budget for the rows the parallel path left (capped rows whose
    candidates end inside a run of equal ranks), or for every row with ``ALWAYS`` (and then
    ``STATE`` is not read)."""
    row = tl.program_id(0).to(tl.int64)
    col_ptr = COLUMNS + row * n
    diag_ptr = DIAGONALS + row * n
    needed = ALWAYS
    if not ALWAYS:
        capped, exact, _, _ = _round_state(STATE, row, 1)
        needed = capped & ~exact
    if needed:
        _select_row(col_ptr, diag_ptr, VERTICAL + row * num_vertical, SLASH + row * num_slash, n, sink, local,
                    num_vertical, num_slash, tau_high, tau_low, COVERAGE, CHUNK)


@dataclass(frozen=True)
class ParallelOptions:
    """Launch choices of the parallel path (``benchmarks/select_bench.py --sweep`` times others).

    Attributes:
        chunk: items per step of a program's loop (``[chunk, 16]`` float64 one-hot sums).
        warps: warps per program of the pass, count and pack launches.
        programs: about this many (row, slice) programs per launch.
        compact_after: after this many radix passes (1-7), copy the items still in play (their
            higher bits equal the prefix) into a buffer that the remaining passes read instead of
            the rows; 0 = every pass reads the rows.
        capped_programs: about this many programs per launch of round 1 (the rows whose caps
            bind; the other rows' programs return at once).
        defer_sums: the radix passes add each chunk's ``[chunk, 16]`` one-hot counts and masses
            into per-lane accumulators and reduce them over the chunk once per program, instead of
            reducing every chunk (a reduction across the program's warps, with a barrier, per chunk
            and sum). Same float64 sums up to their order.
    """

    # The fastest of select_bench's sweep on an H200 (docs/results/gpu-session9/select-bench/):
    # 0.17 ms vs torch's 0.62 ms at 64K keys, 0.26 vs 0.66 ms at 128K; chunk 512 without
    # compaction (the first default) took 0.43 / 0.61 ms. Session 22 (docs/results/gpu-session22/
    # s22-check/, 12 rows of structured masses): 128-item chunks with the digit sums reduced once per
    # program 0.185 / 0.266 ms at 64K / 128K keys and 0.405 ms with every row capped, against 0.204 /
    # 0.296 / 0.478 for 256-item chunks reduced per chunk (the default before) and 0.211 / 0.282 /
    # 0.438 for 256-item chunks reduced once (registers per thread on sm_90: 168 for 256 items reduced
    # once, 96 for 128, 80 for 256 reduced per chunk; benchmarks/kernel_resources.py).
    chunk: int = 128
    warps: int = 4
    programs: int = PARALLEL_PROGRAMS
    compact_after: int = 2
    capped_programs: int = PARALLEL_PROGRAMS
    defer_sums: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.compact_after <= 7:
            raise ValueError(f"compact_after must lie in [0, 7] (0 = no compaction), got {self.compact_after}")


def select_packed_triton(columns: torch.Tensor, diagonals: torch.Tensor, *, num_vertical: int, num_slash: int,
                         sink: int, local: int, coverage: bool, tau: float, sequential: bool = False,
                         options: ParallelOptions | None = None, fallback: bool = True,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed vertical-slash index of estimated masses (see the module docstring).

    Args:
        columns, diagonals: ``[B, H, Nk]`` float32 non-negative masses (from the estimate).
        num_vertical, num_slash: candidate caps and output widths ``V``, ``S``.
        sink, local: forced columns / diagonals (``sink <= num_vertical``, ``local <= num_slash``).
        coverage: the coverage budget (else fixed: every candidate is taken, sequential path).
        tau: coverage target.
        sequential: one program per row for every row (the parallel path's fallback; for tests).
        options: launch choices of the parallel path (default :class:`ParallelOptions`).
        fallback: run the sequential path for the rows the parallel one leaves (false only in
            tests that check which rows the parallel path finishes; those rows are then unset).

    Returns:
        ``(vertical [B, H, V], slash [B, H, S])`` int64, taken positions ascending then ``-1``.
    """
    if columns.shape != diagonals.shape or columns.dim() != 3:
        raise ValueError(f"columns and diagonals must both be [B, H, Nk], got {tuple(columns.shape)} "
                         f"and {tuple(diagonals.shape)}")
    if columns.dtype != torch.float32 or diagonals.dtype != torch.float32:
        raise TypeError(f"masses must be float32, got {columns.dtype} and {diagonals.dtype}")
    bsz, heads, n = columns.shape
    vertical = torch.empty(bsz, heads, num_vertical, dtype=torch.long, device=columns.device)
    slash = torch.empty(bsz, heads, num_slash, dtype=torch.long, device=columns.device)
    if bsz * heads == 0:
        return vertical, slash
    tau_high = float(torch.tensor(tau, dtype=torch.float32))  # float32 kernel arguments: tau as two parts
    rows = bsz * heads
    columns, diagonals = columns.contiguous(), diagonals.contiguous()
    options = ParallelOptions() if options is None else options
    chunk = 256 if interpreter_enabled() else options.chunk
    scalars = dict(n=n, sink=sink, local=local, tau_high=tau_high, tau_low=tau - tau_high)
    caps = dict(num_vertical=num_vertical, num_slash=num_slash)
    slices = slice_count(rows, n, options.programs) if coverage and not sequential else 1
    hist = torch.zeros(rows, 3, 8, 2, 16, dtype=torch.float64, device=columns.device)
    capped_slices = slice_count(rows, n, options.capped_programs) if slices > 1 else 0
    # Every int32 counter in one zero-filled buffer: one memset launch instead of five.
    counts, state, buffer_count, candidate_count, capped_counts = _zeroed_int32(
        columns.device, (rows, 4, slices), (rows, 4), (rows,), (rows,), (rows, 4, capped_slices))
    if slices > 1:
        grid = (rows, slices)
        launch = dict(slice_len=triton.cdiv(n, slices), CHUNK=chunk, num_warps=options.warps, **scalars)
        defer = dict(DEFER=options.defer_sums)
        per_row = dict(CHUNK=chunk, MAX_SLICES=MAX_SLICES, **scalars, **caps)
        full_passes = 8 if options.compact_after == 0 else options.compact_after
        for radix_pass in range(full_passes):
            _pass_kernel[grid](columns, diagonals, hist, radix_pass=radix_pass, **launch, **defer)
        if full_passes < 8:  # the later passes read only the items still in play
            buffer = torch.empty(rows, 2 * n, dtype=torch.float32, device=columns.device)
            _compact_kernel[grid](columns, diagonals, hist, buffer, buffer_count, done=full_passes, **launch)
            for radix_pass in range(full_passes, 8):
                _buffer_pass_kernel[grid](columns, diagonals, hist, buffer, buffer_count, buf_stride=2 * n,
                                          radix_pass=radix_pass, section=COVERAGE_HIST.value, CHUNK=chunk,
                                          num_warps=options.warps, **scalars, **defer)
        _count_kernel[grid](columns, diagonals, hist, counts, state, round_index=0, **launch)
        _pack_kernel[grid](columns, diagonals, hist, counts, state, vertical, slash, round_index=0,
                           MAX_SLICES=MAX_SLICES,
                           **launch, **caps)
        # round 1: the rows whose caps bind (their programs work, the others return at once)
        _capped_kernel[(rows,)](columns, diagonals, hist, counts, state, slices=slices, **per_row)
        capped_grid = (rows, capped_slices)
        capped_launch = dict(launch, slice_len=triton.cdiv(n, capped_slices))
        no_tau = {key: value for key, value in capped_launch.items() if key not in ("tau_high", "tau_low")}
        for radix_pass in range(8):
            _top_pass_kernel[capped_grid](columns, diagonals, hist, state, radix_pass=radix_pass, **no_tau, **caps,
                                          **defer)
        _candidates_kernel[(rows,)](hist, state, n=n, **caps)
        width = num_vertical + num_slash  # the candidates' coverage passes read only the candidates
        candidates = torch.empty(rows, width, dtype=torch.float32, device=columns.device)
        _compact_candidates_kernel[capped_grid](columns, diagonals, state, candidates, candidate_count, width=width,
                                                **no_tau)
        for radix_pass in range(8):
            _buffer_pass_kernel[capped_grid](columns, diagonals, hist, candidates, candidate_count, buf_stride=width,
                                             radix_pass=radix_pass, section=CAPPED_HIST.value, CHUNK=chunk,
                                             num_warps=options.warps, **scalars, **defer)
        _count_kernel[capped_grid](columns, diagonals, hist, capped_counts, state, round_index=1, **capped_launch)
        _pack_kernel[capped_grid](columns, diagonals, hist, capped_counts, state, vertical, slash, round_index=1,
                                  MAX_SLICES=MAX_SLICES, **capped_launch, **caps)
        if not fallback:
            return vertical, slash
    _sequential_kernel[(rows,)](columns, diagonals, state, vertical, slash, COVERAGE=coverage, ALWAYS=slices == 1,
                                CHUNK=chunk, num_warps=8, **scalars, **caps)
    return vertical, slash


def _zeroed_int32(device: torch.device, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    """Contiguous zero int32 tensors of ``shapes``, views of one buffer (one fill)."""
    sizes = [math.prod(shape) for shape in shapes]
    buffer = torch.zeros(sum(sizes), dtype=torch.int32, device=device)
    return [part.view(shape) for part, shape in zip(buffer.split(sizes), shapes)]


def slice_count(rows: int, n: int, programs: int = PARALLEL_PROGRAMS) -> int:
    """Slices per row of the parallel path: about ``programs`` programs in all, each slice at least
    :data:`MIN_SLICE` items, at most :data:`MAX_SLICES`; 1 = the sequential path."""
    return max(1, min(MAX_SLICES, triton.cdiv(programs, rows), n // MIN_SLICE))
