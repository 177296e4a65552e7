"""The Triton vertical-slash budget kernel against the torch path (``select_items`` + packing).

The two paths must give the same packed index, bit for bit: they rank the same float32 masses by
the same order (rank descending, columns first, position ascending) and both sum the mass before
an item in float64, so a difference needs a running sum within ~1e-15 of ``tau``, which these
inputs do not have. The tie cases put every boundary (the caps, the coverage threshold) on a run
of equal values. On the CPU the kernel runs in the Triton interpreter.
"""

import os

import pytest
import torch

from longinfer.patterns import VerticalSlashConfig
from longinfer.patterns import _select_kernel as kernel
from longinfer.patterns import vertical_slash as vs
from longinfer.patterns._select_kernel import select_packed_triton

needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="runs the Triton kernel on CPU tensors: needs TRITON_INTERPRET=1 (the @gpu test covers CUDA)",
)

CONFIGS = [
    dict(budget="coverage", tau=0.9, num_vertical=40, num_slash=60, sink=3, local=5),
    dict(budget="coverage", tau=1.0, num_vertical=300, num_slash=300, sink=3, local=5),  # caps above Nk, take all
    dict(budget="coverage", tau=0.95, num_vertical=10, num_slash=80, sink=10, local=2),  # caps bind, ties at the cap
    dict(budget="coverage", tau=0.05, num_vertical=40, num_slash=60, sink=30, local=40),  # forced mass above tau
    dict(budget="coverage", tau=0.7, num_vertical=40, num_slash=60, sink=0, local=0),
    dict(budget="coverage", tau=0.5, num_vertical=40, num_slash=60, sink=3, local=5, min_vertical=30, min_slash=25),
    dict(budget="coverage", tau=0.95, num_vertical=10, num_slash=80, sink=10, local=2, min_vertical=10,
         min_slash=30),  # floors at the cap, caps bind
    dict(budget="coverage", tau=0.5, num_vertical=40, num_slash=60, sink=3, local=5, min_vertical=30, min_slash=25,
         floor_from=201),  # 200 keys: below floor_from, no floors
    dict(budget="fixed", num_vertical=40, num_slash=60, sink=3, local=5),
    dict(budget="fixed", num_vertical=0, num_slash=5, sink=0, local=5),
]


def _masses(bsz, heads, n, seed, ties):
    """Non-negative masses like an estimate's: a few heavy items, each kind summing to 0.6."""
    gen = torch.Generator().manual_seed(seed)
    columns = torch.rand(bsz, heads, n, generator=gen) ** 4
    diagonals = torch.rand(bsz, heads, n, generator=gen) ** 4
    if ties:  # a few distinct values, many zeros: every boundary is a tie
        columns, diagonals = (torch.floor(x * 4) / 40 for x in (columns, diagonals))
    return (columns / columns.sum(-1, keepdim=True) * 0.6, diagonals / diagonals.sum(-1, keepdim=True) * 0.6)


def _assert_same_index(columns, diagonals, config, options=None):
    if options is None:
        got = vs.select_packed(columns, diagonals, config, backend="triton")
    else:  # the Triton path at given launch choices
        got = select_packed_triton(columns, diagonals, num_vertical=config.num_vertical, num_slash=config.num_slash,
                                   sink=config.sink, local=config.local, coverage=config.budget == "coverage",
                                   tau=config.tau, options=options)
    expected = vs.select_packed(columns, diagonals, config, backend="torch")
    assert got[0].dtype == torch.long and got[0].shape == expected[0].shape
    assert torch.equal(got[0], expected[0]), "vertical indices differ"
    assert torch.equal(got[1], expected[1]), "slash indices differ"
    return expected


PATHS = {"parallel": 64, "sequential": 10**9}  # MIN_SLICE: 200 items make 3 slices, or one program per row


@needs_interpreter
@pytest.mark.parametrize("overrides", CONFIGS)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_kernel_packs_the_torch_index(monkeypatch, overrides, ties, path):
    """Both paths; the parallel one hands the rows with a binding cap or a partial tie run to the
    sequential one (the capped and tie configurations), and the fixed budget always goes there."""
    monkeypatch.setattr(kernel, "MIN_SLICE", PATHS[path])
    columns, diagonals = _masses(1, 3, 200, seed=7, ties=ties)
    expected = _assert_same_index(columns, diagonals, VerticalSlashConfig(last_q=8, **overrides))
    assert (expected[0] >= 0).any() or overrides["num_vertical"] == 0  # the comparison is not vacuous


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_floors_apply_from_floor_from_keys(backend):
    """Calls over fewer than `floor_from` keys get the index without minimums, longer ones with them."""
    columns, diagonals = _masses(1, 3, 200, seed=7, ties=False)
    base = dict(budget="coverage", tau=0.5, num_vertical=40, num_slash=60, sink=3, local=5, last_q=8)
    floored = dict(base, min_vertical=30, min_slash=25)

    def index(**overrides):
        return vs.select_packed(columns, diagonals, VerticalSlashConfig(**overrides), backend=backend)

    without, always = index(**base), index(**floored)
    assert not torch.equal(without[0], always[0])  # the floors bind on these masses
    for got, expected in ((index(**floored, floor_from=201), without), (index(**floored, floor_from=200), always)):
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def _triton_index(columns, diagonals, config, **kwargs):
    return select_packed_triton(columns, diagonals, num_vertical=config.num_vertical, num_slash=config.num_slash,
                                sink=config.sink, local=config.local, coverage=config.budget == "coverage",
                                tau=config.tau, **kwargs)


@needs_interpreter
@pytest.mark.parametrize("case", ["binding caps", "partial tie run"])
def test_parallel_path_finishes_capped_rows_and_tie_runs(monkeypatch, case):
    """Without the sequential fallback (rows it would take stay unset), the parallel path alone gives
    the torch index for rows whose caps bind (round 1: top-k candidates, then coverage among them)
    and for a coverage boundary inside a run of equal masses (tie ranks across slices)."""
    monkeypatch.setattr(kernel, "MIN_SLICE", 64)
    columns, diagonals = _masses(2, 3, 300, seed=11, ties=case == "partial tie run")
    if case == "binding caps":
        config = VerticalSlashConfig(last_q=8, budget="coverage", tau=0.95, num_vertical=12, num_slash=90, sink=4,
                                     local=3)
        uncapped = VerticalSlashConfig(last_q=8, budget="coverage", tau=0.95, num_vertical=300, num_slash=300,
                                       sink=4, local=3)
        wide = vs.select_packed(columns, diagonals, uncapped)
        assert ((wide[0] >= 0).sum(-1) > 12).all(), "every row's column cap binds"
    else:
        config = VerticalSlashConfig(last_q=8, budget="coverage", tau=0.5, num_vertical=300, num_slash=300, sink=2,
                                     local=2)
    # round 0 in 4 slices per row, round 1 in 1 (its own launch shape and counts)
    options = kernel.ParallelOptions(chunk=64, capped_programs=6)
    got = _triton_index(columns, diagonals, config, fallback=False, options=options)
    expected = vs.select_packed(columns, diagonals, config)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    if case == "partial tie run":
        assert _takes_part_of_a_run(columns[0, 0], diagonals[0, 0], expected[0][0, 0], expected[1][0, 0], config)


@needs_interpreter
@pytest.mark.parametrize("defer_sums", [True, False])
def test_round_one_with_capped_and_uncapped_rows_in_one_call(monkeypatch, defer_sums):
    """Rows whose caps bind and rows whose do not, in one call: round 1's launches work on the first and
    return at once for the second (nothing buffered), and the parallel path alone gives the torch index,
    with the radix passes' digit sums reduced per chunk or once per program."""
    monkeypatch.setattr(kernel, "MIN_SLICE", 64)
    columns, diagonals = _masses(2, 3, 300, seed=11, ties=False)
    columns[1, 1:] = 0.0
    columns[1, 1:, 7] = 0.6  # one column carries every second-batch head's column mass: no cap binds there
    config = VerticalSlashConfig(last_q=8, budget="coverage", tau=0.95, num_vertical=12, num_slash=90, sink=4,
                                 local=3)
    uncapped = VerticalSlashConfig(last_q=8, budget="coverage", tau=0.95, num_vertical=300, num_slash=300,
                                   sink=4, local=3)
    wide = vs.select_packed(columns, diagonals, uncapped)
    wants = ((wide[0] >= 0).sum(-1) > 12) | ((wide[1] >= 0).sum(-1) > 90)
    assert wants.any() and not wants.all(), wants  # both kinds of rows
    options = kernel.ParallelOptions(chunk=64, capped_programs=6, defer_sums=defer_sums)
    got = _triton_index(columns, diagonals, config, fallback=False, options=options)
    expected = vs.select_packed(columns, diagonals, config)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def _takes_part_of_a_run(columns, diagonals, vertical, slash, config) -> bool:
    """Whether the smallest taken non-forced mass of a row has equal items left out."""
    taken = torch.zeros(2, columns.numel(), dtype=torch.bool)
    taken[0, vertical[vertical >= 0]] = True
    taken[1, slash[slash >= 0]] = True
    mass = torch.stack([columns, diagonals])
    free = torch.ones_like(taken)
    free[0, :config.sink] = False
    free[1, :config.local] = False
    boundary = mass[taken & free].min()
    run = free & (mass == boundary)
    return bool((run & taken).any() and (run & ~taken).any())


@needs_interpreter
@pytest.mark.parametrize("n", [1, 77, 513])  # one key; off the interpreter's 256-item chunk; past two chunks
def test_awkward_lengths_and_a_negative_zero(monkeypatch, n):
    monkeypatch.setattr(kernel, "MIN_SLICE", max(30, n // 2))  # 77 and 513 keys: two uneven slices
    columns, diagonals = _masses(1, 2, n, seed=n, ties=False)
    columns[..., n // 2] = -0.0  # an estimate can round a mass to -0.0: it ranks as +0.0
    config = VerticalSlashConfig(num_vertical=64, num_slash=128, sink=4, local=8, budget="coverage", tau=0.8)
    _assert_same_index(columns, diagonals, config)


@needs_interpreter
def test_coverage_takes_the_fewest_items_reaching_tau():
    """A planted case checked by hand: forced mass 0.3, then 0.25 (slash 9), 0.2 (column 50), 0.1 ..."""
    columns = torch.zeros(1, 1, 64)
    diagonals = torch.zeros(1, 1, 64)
    columns[..., 0] = 0.1
    diagonals[..., 0:2] = 0.1  # forced: sink=1 column, local=2 diagonals
    diagonals[..., 9] = 0.25
    columns[..., 50] = 0.2
    columns[..., 20] = 0.1
    diagonals[..., 30] = 0.1  # ties with column 20: the column ranks first
    config = VerticalSlashConfig(num_vertical=8, num_slash=8, sink=1, local=2, budget="coverage", tau=0.8)
    vertical, slash = vs.select_packed(columns, diagonals, config, backend="triton")
    # before column 20: 0.3 + 0.25 + 0.2 = 0.75 < 0.8 -> taken; before diagonal 30: 0.85 -> not taken
    assert vertical[0, 0, :4].tolist() == [0, 20, 50, -1]
    assert slash[0, 0, :4].tolist() == [0, 1, 9, -1]


def test_slices_fill_the_gpu_within_bounds():
    assert kernel.slice_count(12, 69632) == 43  # a Qwen2.5-1.5B layer at 64K: 516 programs
    assert kernel.slice_count(1, 10**6) == kernel.MAX_SLICES
    assert kernel.slice_count(12, 1500) == 1  # shorter than two slices: the sequential path


@needs_interpreter
@pytest.mark.parametrize("compact_after,ties", [(1, False), (4, True), (7, False)])
def test_compaction_after_any_pass_gives_the_same_index(monkeypatch, compact_after, ties):
    """The later passes read a buffer of the items still in play: the same digit sums, so the same index."""
    monkeypatch.setattr(kernel, "MIN_SLICE", 100)
    columns, diagonals = _masses(1, 2, 333, seed=compact_after, ties=ties)
    config = VerticalSlashConfig(num_vertical=64, num_slash=128, sink=4, local=8, budget="coverage", tau=0.85)
    _assert_same_index(columns, diagonals, config, kernel.ParallelOptions(compact_after=compact_after))


def test_errors_name_the_problem():
    columns, diagonals = _masses(1, 2, 50, seed=0, ties=False)
    plain = VerticalSlashConfig(num_vertical=8, num_slash=8, sink=2, local=2, budget="coverage")
    cost_ranked = VerticalSlashConfig(num_vertical=8, num_slash=8, sink=2, local=2, budget="coverage", rank="cost",
                                      tau=1.0)
    with pytest.raises(ValueError, match="rank='cost'"):
        vs.select_packed(columns, diagonals, cost_ranked, backend="triton")
    with pytest.raises(ValueError, match="backend must be"):
        vs.select_packed(columns, diagonals, plain, backend="cuda")
    with pytest.raises(ValueError, match=r"\[B, H, Nk\]"):
        select_packed_triton(columns, diagonals[..., :10], num_vertical=8, num_slash=8, sink=2, local=2,
                             coverage=True, tau=0.9)
    with pytest.raises(ValueError, match="compact_after"):
        kernel.ParallelOptions(compact_after=8)
    with pytest.raises(TypeError, match="float32"):
        select_packed_triton(columns.double(), diagonals.double(), num_vertical=8, num_slash=8, sink=2, local=2,
                             coverage=True, tau=0.9)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [5000, 69632])  # a short call; a 4K turn over 64K
def test_gpu_kernel_packs_the_torch_index(n):
    """Default-plan budgets (and a capped one) on CUDA, the coverage ones also without compaction and
    without the sequential fallback; masses from an estimate of structured q/k."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 12, 1024, 128, generator=gen)
    k = torch.randn(1, 2, n, 128, generator=gen)
    k[:, :, ::97] += 2.0 * q[:, :1, :1].mean(2, keepdim=True)  # columns every 97 keys that every query likes
    q, k = q.cuda().bfloat16(), k.cuda().bfloat16()
    for overrides in (dict(num_vertical=4096, num_slash=8192, budget="coverage", tau=0.9),
                      dict(num_vertical=256, num_slash=512, budget="coverage", tau=0.95),
                      dict(num_vertical=4096, num_slash=8192, budget="coverage", tau=0.9, min_vertical=1000,
                           min_slash=3000),  # floors: added to the Triton index by select_packed
                      dict(num_vertical=1000, num_slash=6096, budget="fixed")):
        config = VerticalSlashConfig(last_q=64, query_sampling="strided", **overrides)
        columns, diagonals = vs.estimate_masses(q, k, config)
        expected = _assert_same_index(columns, diagonals, config)
        parallel = config.budget == "coverage" and n >= 2 * kernel.MIN_SLICE
        assert vs.auto_selection_backend(columns, config) == ("triton" if parallel else "torch")
        assert vs.auto_selection_backend(columns.cpu(), config) == "torch"
        if config.budget == "coverage" and not config.min_vertical:  # select_packed_triton alone: no floors
            _assert_same_index(columns, diagonals, config, kernel.ParallelOptions(compact_after=0))
            parallel_only = _triton_index(columns, diagonals, config, fallback=False)  # round 1 finishes capped rows
            assert torch.equal(parallel_only[0], expected[0]) and torch.equal(parallel_only[1], expected[1])


@pytest.mark.gpu
def test_gpu_one_compiled_variant_per_kernel_whatever_the_pass_round_or_length():
    """Cold start: each kernel compiles once for all radix passes, both rounds and prompt lengths of
    any divisibility (session 12: 33 variants, 38-49 s on a fresh machine, more per new length)."""
    names = ("_pass_kernel", "_compact_kernel", "_buffer_pass_kernel", "_count_kernel", "_pack_kernel",
             "_capped_kernel", "_top_pass_kernel", "_candidates_kernel", "_compact_candidates_kernel",
             "_sequential_kernel")
    device = torch.cuda.current_device()

    def compiled() -> dict[str, int]:  # variants compiled so far in this process (other tests add theirs)
        return {name: len(getattr(kernel, name).device_caches[device][0]) for name in names}

    gen = torch.Generator().manual_seed(5)
    before = compiled()
    for n in (16384, 16399, 20001):  # divisible by 16, odd, another odd length
        columns = torch.rand(1, 12, n, generator=gen).square().cuda()
        diagonals = torch.rand(1, 12, n, generator=gen).square().cuda()
        for caps in ((4096, 8192), (256, 512)):  # the second binds: round 1 runs
            select_packed_triton(columns, diagonals, num_vertical=caps[0], num_slash=caps[1], sink=30, local=100,
                                 coverage=True, tau=0.9)
    added = {name: count - before[name] for name, count in compiled().items()}
    assert all(count <= 1 for count in added.values()), added
