"""benchmarks/budget_oracle.py: the allocations over measured oracle curves, against brute force."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from longinfer.patterns.oracle import oracle_recall
from longinfer.patterns.recall import causal_logsumexp, sample_rows
from tests.benchmark_scripts import load_benchmark

budget = load_benchmark("budget_oracle")


def _curves(seed: int, heads: int = 2, rows: int = 2, points: int = 3):
    """Random increasing recall curves over increasing kept counts: ``recall, kept [H, R, G]``, ``causal [R]``."""
    generator = torch.Generator().manual_seed(seed)
    recall = torch.rand(heads, rows, points, generator=generator, dtype=torch.float64).sort(-1).values
    causal = torch.tensor([100 + 50 * r for r in range(rows)])
    shares = torch.rand(heads, rows, points, generator=generator, dtype=torch.float64).sort(-1).values
    kept = (shares * causal[None, :, None]).ceil().long().clamp(min=1)
    return recall, kept, causal


def _brute_force_best_mean(recall, kept, causal, density: float) -> float:
    """The highest mean head recall of any per-row choice of grid points with average density <= ``density``."""
    heads, rows, points = recall.shape
    best = -1.0
    for choice in itertools.product(range(points), repeat=heads * rows):
        pick = torch.tensor(choice).reshape(heads, rows, 1)
        spent = float(kept.gather(-1, pick)[..., 0].double().sum(-1).div(float(causal.sum())).mean())
        if spent <= density + 1e-12:
            best = max(best, float(recall.gather(-1, pick)[..., 0].mean()))
    return best


def _fewest_and_most(kept, causal) -> tuple[float, float]:
    """Average density with every row at its fewest / most keys."""
    per_head = kept.double().sum(1).div(float(causal.sum()))  # [H, G]
    return float(per_head.min(-1).values.mean()), float(per_head.max(-1).values.mean())


@pytest.mark.parametrize("seed", range(6))
def test_one_price_for_all_rows_is_the_best_allocation_at_its_density(seed):
    """The Lagrangian argument the report rests on: no per-row choice with at most the global
    allocation's density keeps more mean recall (checked over all 3^4 choices)."""
    recall, kept, causal = _curves(seed)
    fewest, most = _fewest_and_most(kept, causal)
    for share in (0.2, 0.5, 0.8):
        wanted = fewest + share * (most - fewest)
        found = budget.global_allocation(recall, kept, causal, wanted)
        assert found["density"] <= wanted + 1e-9
        assert found["mean"] == pytest.approx(_brute_force_best_mean(recall, kept, causal, found["density"]), abs=1e-9)
    with pytest.raises(ValueError, match="under the fewest keys"):
        budget.global_allocation(recall, kept, causal, 0.5 * fewest)


@pytest.mark.parametrize("seed", range(4))
def test_target_allocation_meets_both_and_bounds_every_allocation(seed):
    """Over all 3^6 choices (3 heads, 2 rows, 3 grid points; with 3 heads every head must reach the p10
    value), the cheapest meeting both targets lies between the lower bound and what the allocation found."""
    recall, kept, causal = _curves(seed, heads=3)
    recall, kept = budget.with_all_keys(recall, kept, causal)
    mean, p10 = 0.75, 0.6
    result = budget.target_allocation(recall, kept, causal, mean=mean, p10=p10)
    assert result["met"] and result["mean"] >= mean - 1e-6 and result["p10"] >= p10 - 1e-6
    cheapest = math.inf
    for choice in itertools.product(range(recall.shape[-1]), repeat=6):
        pick = torch.tensor(choice).reshape(3, 2, 1)
        head_recall = recall.gather(-1, pick)[..., 0].mean(-1)
        if float(head_recall.mean()) >= mean and float(torch.quantile(head_recall, 0.1)) >= p10:
            cheapest = min(cheapest, float(kept.gather(-1, pick)[..., 0].double().sum(-1).div(float(causal.sum())).mean()))
    assert result["lower_bound"] - 1e-12 <= cheapest <= result["density"] + 1e-12


def test_uniform_and_all_keys_points():
    recall, kept, causal = _curves(3, heads=3, rows=2, points=2)
    recall, kept = budget.with_all_keys(recall, kept, causal)
    assert torch.equal(recall[..., -1], torch.ones(3, 2, dtype=recall.dtype))
    assert torch.equal(kept[..., -1], causal.expand(3, 2))
    everything = budget.uniform_allocation(recall, kept, causal, -1)
    assert (everything["mean"], everything["p10"], everything["density"]) == (1.0, 1.0, 1.0)
    cheap = budget.allocate(recall, kept, causal, 1e9)  # a price so high every row takes its fewest keys
    assert torch.equal(cheap[0], recall[..., 0].mean(-1))


def test_measured_rows_are_the_key_oracle_at_each_grid_density():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 300, 16, generator=generator)
    k = torch.randn(1, 2, 300, 16, generator=generator)
    rows = sample_rows(300, 300, 8)
    measured = budget.measure_layer(q, k, rows, 0.25)
    lse = causal_logsumexp(q, k, rows, sm_scale=0.25)
    for point, density in enumerate(budget.GRID):
        expected = oracle_recall(q, k, rows, (density,), sm_scale=0.25, lse=lse)[density]
        got = torch.tensor([[row[point] for row in head] for head in measured["recall"]], dtype=torch.float64)
        torch.testing.assert_close(got, expected.recall[0].double(), atol=1e-6, rtol=0)
        assert [[row[point] for row in head] for head in measured["kept"]] == expected.kept[0].tolist()


def test_each_head_at_one_density_spends_it_over_its_rows_as_well_as_any_choice():
    """Per head, no choice of grid points of at most the density found keeps more recall (brute force
    over the 4^2 choices of each head). (The density found may fall under the budget: the allocation is
    a point of the head's recall-density hull.)"""
    recall, kept, causal = _curves(5, heads=4)
    recall, kept = budget.with_all_keys(recall, kept, causal)
    wanted = float((kept[..., 1].double().sum(-1) / float(causal.sum())).max())
    summary, head_recall = budget.rows_allocation(recall, kept, causal, wanted)
    assert summary["density"] <= wanted + 1e-12
    for head in range(4):
        one = (recall[head: head + 1], kept[head: head + 1])
        found = budget.allocate(*one, causal, 1e9)  # the fewest keys: a floor for the head's density
        assert float(head_recall[head]) >= float(found[0][0]) - 1e-12
        used = budget.rows_allocation(*one, causal, wanted)[0]["density"]
        best = _brute_force_best_mean(*one, causal, used)
        assert float(head_recall[head]) == pytest.approx(best, abs=1e-12)


def _tile_key_masses(q, k, start: int, end: int, scale: float) -> torch.Tensor:
    """Each key's attention mass averaged over the rows ``start..end`` (each row's causal softmax, float64,
    row by row): ``[Hq, end + 1]``. A key set's tile recall is the sum of its keys' values."""
    group = q.shape[1] // k.shape[1]
    masses = torch.zeros(q.shape[1], end + 1, dtype=torch.float64)
    for row in range(start, end + 1):
        scores = torch.einsum("hd,hkd->hk", q[0, :, row].double(),
                              k[0, :, : row + 1].double().repeat_interleave(group, 0)) * scale
        masses[:, : row + 1] += scores.softmax(-1)
    return masses / (end + 1 - start)


def test_tile_oracle_keeps_the_best_key_set_of_its_size_for_the_tile_rows():
    """The tile oracle's recall equals the tile rows' mean mass on the best key set of its size, recomputed
    row by row: the recall of a set is a sum of per-key values (each key's mean mass over the tile), so the
    best set of a size is the top keys by that value. Tiles of one row are the key oracle. Tolerance 1e-5:
    float32 scores against a float64 recomputation over <= 300 keys."""
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 300, 16, generator=generator)
    k = torch.randn(1, 2, 300, 16, generator=generator)
    rows = torch.tensor([5, 70, 150, 299])
    ends = budget.tile_ends(rows, 16, 300)
    assert ends.tolist() == [15, 79, 159, 299]
    measured = budget.measure_tiles(q, k, ends, 16, 0.25)
    point = budget.GRID.index(0.1)
    for number, end in enumerate(ends.tolist()):
        count = measured["kept"][0][number][point]
        assert count == math.ceil(0.1 * (end + 1) - 1e-9)
        expected = _tile_key_masses(q, k, end - 15, end, 0.25).topk(count, -1).values.sum(-1)
        got = torch.tensor([measured["recall"][h][number][point] for h in range(4)], dtype=torch.float64)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    single = budget.measure_tiles(q, k, rows, 1, 0.25)
    key = budget.measure_layer(q, k, rows, 0.25)
    torch.testing.assert_close(torch.tensor(single["recall"]), torch.tensor(key["recall"]), atol=1e-5, rtol=0)
    assert single["kept"] == key["kept"]


def test_tile_estimate_of_single_rows_is_exact_and_local_keys_come_first():
    """A pooled estimate over one-row tiles is the row's own softmax: it ranks the keys as the key oracle does
    and its estimated mass equals the recall (tolerance 1e-5: float32 over <= 300 keys). With ``local``
    forced keys, every count keeps at least the ``local`` most recent keys, and those come first: the recall
    at the fewest kept keys is the true mass of exactly those keys."""
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 300, 16, generator=generator)
    k = torch.randn(1, 2, 300, 16, generator=generator)
    rows = torch.tensor([5, 70, 150, 299])
    exact = budget.TileEstimate(pool=1)
    measured = budget.measure_tiles(q, k, rows, 1, 0.25, [exact])
    curves = measured["estimates"][exact.name]
    torch.testing.assert_close(torch.tensor(curves["recall"]), torch.tensor(measured["recall"]), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(curves["mass"]), torch.tensor(measured["recall"]), atol=1e-5, rtol=0)

    local = budget.TileEstimate(pool=32, local=40)
    ends = budget.tile_ends(rows, 16, 300)
    measured = budget.measure_tiles(q, k, ends, 16, 0.25, [local])
    curves = measured["estimates"][local.name]
    for number, end in enumerate(ends.tolist()):
        kept = curves["kept"][0][number]
        assert kept[0] == min(40, end + 1) and all(a <= b for a, b in zip(kept, kept[1:]))
        recent = _tile_key_masses(q, k, end - 15, end, 0.25)[:, max(0, end + 1 - 40):].sum(-1)
        got = torch.tensor([curves["recall"][h][number][0] for h in range(4)], dtype=torch.float64)
        torch.testing.assert_close(got, recent, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="multiple of the tile"):
        budget.measure_tiles(q, k, ends, 16, 0.25, [budget.TileEstimate(pool=24)])
    assert budget.parse_estimates("64, 128+local128") == [budget.TileEstimate(64), budget.TileEstimate(128, 128)]
    with pytest.raises(ValueError, match="POOL or POOL"):
        budget.parse_estimates("64+window3")


def test_online_allocations_choose_from_the_estimate_and_score_the_truth():
    """Online budgets see only the estimated masses: with a price, each row takes the grid point the estimated
    curve favours (recall reported from the true curve); with coverage, its first point whose estimated mass
    reaches tau. Brute force over tau on small curves confirms the cheapest tau meeting the target."""
    recall, kept, causal = _curves(3, heads=3, rows=2, points=3)
    recall, kept = budget.with_all_keys(recall, kept, causal)
    mass = (recall.flip(-1) * 0 + torch.linspace(0.2, 1.0, recall.shape[-1], dtype=torch.float64))  # one estimate
    head_recall, head_density = budget.allocate(recall, kept, causal, 1e-9, score=mass)
    torch.testing.assert_close(head_recall, torch.ones(3, dtype=torch.float64))  # a free key: the estimate says all
    head_recall, _ = budget.coverage_choice(recall, kept, causal, mass, 0.6)
    torch.testing.assert_close(head_recall, recall[..., 2].mean(-1))  # 0.2, 0.4667, 0.7333, 1.0: third point
    mean = float(recall[..., 2].mean(-1).mean())
    out = budget.online_allocations(recall, kept, causal, mass, mean, 0.0, 0.9)
    assert out["coverage"]["meeting"]["tau"] == pytest.approx(0.4667, abs=1e-3)
    assert out["coverage"]["meeting"]["mean"] >= mean - 1e-6
