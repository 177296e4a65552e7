"""benchmarks/needle_row_estimation.py: the novel-row guess and the index built from chosen estimation rows."""

from __future__ import annotations

import torch

from longinfer.patterns import vertical_slash as vs
from longinfer.patterns.vertical_slash import estimate_vertical_slash, estimation_positions
from tests.benchmark_scripts import load_benchmark


def test_novel_rows_finds_planted_rows_and_skips_the_ends():
    """Rows whose queries point away from every head's common direction are found, and the first 256
    and last 128 rows are never chosen even when they are the most unusual."""
    script = load_benchmark("needle_row_estimation")
    gen = torch.Generator().manual_seed(0)
    common = torch.randn(16, generator=gen)
    q = common + 0.1 * torch.randn(1, 4, 1000, 16, generator=gen)
    planted = torch.arange(500, 511)
    q[0, :, planted] = -common + 0.1 * torch.randn(4, len(planted), 16, generator=gen)
    q[0, :, :5] = -common  # as unusual, but among the sinks
    q[0, :, -5:] = -common  # and in the dense tail
    assert torch.equal(script.novel_rows(q, len(planted)), planted)


def test_index_from_the_default_rows_is_the_estimate():
    """With the default's 64 strided rows the index equals ``estimate_vertical_slash`` under the same config."""
    script = load_benchmark("needle_row_estimation")
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 4, 700, 32, generator=gen), torch.randn(1, 2, 700, 32, generator=gen)
    config = script.CONFIG.for_call(700, 700)
    positions = estimation_positions(700, 700, 64, "strided")
    built = script.index_from_rows(q, k, positions, 32 ** -0.5)
    expected = estimate_vertical_slash(q, k, config, sm_scale=32 ** -0.5)
    assert torch.equal(built.vertical, expected.vertical)
    assert torch.equal(built.slash, expected.slash)
    other = script.index_from_rows(q, k, torch.arange(600, 700), 32 ** -0.5)  # other rows, another index
    assert not (torch.equal(other.vertical, expected.vertical) and torch.equal(other.slash, expected.slash))


def test_underserved_rows_are_the_candidates_the_index_serves_worst():
    """An index that keeps every causal key except on a few rows (only their own key there): those rows,
    and only candidate rows (every ``stride``-th after the skipped start), are chosen."""
    script = load_benchmark("needle_row_estimation")
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 4, 600, 32, generator=gen), torch.randn(1, 2, 600, 32, generator=gen)
    starved = torch.tensor([300, 310, 320, 330])
    starved_odd = torch.tensor([301, 311])  # starved too, but not candidates at stride 2

    def index(rows: torch.Tensor) -> torch.Tensor:
        keys = torch.arange(600)
        mask = keys[None, :] <= rows[:, None]
        poor = torch.isin(rows, torch.cat([starved, starved_odd]))
        mask[poor] = keys[None, :] == rows[poor][:, None]
        return mask[None, None]

    chosen = script.underserved_rows(q, k, index, 32 ** -0.5, count=4, stride=2, skip_first=256, skip_last=128)
    assert torch.equal(chosen, starved)


def test_pooled_masses_place_each_block_mean_at_its_last_row():
    """With every row of a block equal, a block's mean query is its last row's: the pooled masses equal the
    strided rows' (whose positions are the block ends); with rows that vary inside the blocks they differ."""
    script = load_benchmark("needle_row_estimation")
    gen = torch.Generator().manual_seed(3)
    n, blocks = 640, 8
    ends = estimation_positions(n, n, blocks, "strided")
    block_of_row = torch.searchsorted(ends, torch.arange(n))  # rows ends[b-1]+1 .. ends[b] form block b
    q = torch.randn(1, 4, blocks, 32, generator=gen)[:, :, block_of_row]
    k = torch.randn(1, 2, n, 32, generator=gen)
    columns, diagonals = script.pooled_masses(q, k, blocks, 32 ** -0.5)
    ref = vs.estimate_masses(q, k, script.CONFIG, sm_scale=32 ** -0.5, positions=ends)
    torch.testing.assert_close(columns, ref[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(diagonals, ref[1], atol=1e-6, rtol=1e-5)
    varied = q + torch.randn(q.shape, generator=gen)
    assert not torch.allclose(script.pooled_masses(varied, k, blocks, 32 ** -0.5)[0],
                              vs.estimate_masses(varied, k, script.CONFIG, sm_scale=32 ** -0.5, positions=ends)[0])


def test_repeat_rows_find_distant_repeated_ngrams_only():
    """Rows ending a 4-gram first seen >= 1,024 tokens earlier; near repeats, the ends, and rows without
    a repeat are not chosen; more candidates than asked are thinned evenly."""
    script = load_benchmark("needle_row_estimation")
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(1000, 50000, (4000,), generator=gen).tolist()
    template = [7, 8, 9, 10, 11]
    for start in (300, 1500, 2800):  # far apart: the 2nd and 3rd copies repeat the first
        ids[start:start + 5] = template
    ids[1600:1605] = template  # 100 tokens after a copy: repeats the first (1,300 back), so it counts too
    ids[3950:3955] = template  # in the skipped end
    rows = script.repeat_rows(ids, count=64)
    assert rows.tolist() == [1503, 1504, 1603, 1604, 2803, 2804]  # the 4-grams 7-10 and 8-11 of each copy
    assert script.repeat_rows(ids, count=3).tolist() == [1503, 1603, 2804]  # the first, middle and last
