"""Vertical-slash estimation options: spread estimation queries and the cost-aware coverage ranking.

Every estimator piece is checked against a brute-force pure-torch (or pure-Python) reference on
small random inputs: dense causal softmax rows for the masses, explicit loops for the ranking.
"""

import dataclasses
import math

import pytest
import torch

from longinfer.ops import reference, vertical_slash_attention
from longinfer.patterns import VerticalSlashConfig, estimate_vertical_slash
from longinfer.patterns import vertical_slash as vs

COST = VerticalSlashConfig(num_vertical=48, num_slash=24, last_q=16, sink=2, local=3, block_size=16,
                           budget="coverage", tau=0.8, rank="cost", query_sampling="strided")


def _qk(n_q: int, n_k: int, hq: int = 4, hkv: int = 2, d: int = 16, seed: int = 0, sharp: float = 2.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, n_q, d, generator=gen) * sharp
    k = torch.randn(1, hkv, n_k, d, generator=gen)
    return q, k


def _reference_masses(q, k, positions, sink, local):
    """Dense per-query causal softmax -> (columns, diagonals) ``[B, Hq, Nk]`` (the estimator's definition)."""
    bsz, hq, n_q, d = q.shape
    hkv, n_k = k.shape[1], k.shape[2]
    offset = n_k - n_q
    columns = torch.zeros(bsz, hq, n_k, dtype=torch.float64)
    diagonals = torch.zeros(bsz, hq, n_k, dtype=torch.float64)
    for h in range(hq):
        keys = k[:, h // (hq // hkv)].double()  # [B, Nk, D]
        for p in positions.tolist():
            scores = (q[:, h, p - offset].double()[:, None, :] * keys).sum(-1) / math.sqrt(d)  # [B, Nk]
            scores[:, p + 1:] = -math.inf
            probs = scores.softmax(-1)
            for j in range(p + 1):
                if p - j >= local:
                    columns[:, h, j] += probs[:, j]
                if j >= sink:
                    diagonals[:, h, p - j] += probs[:, j]
    count = positions.numel()
    return columns / count, diagonals / count


def test_estimation_positions_spread_distinct_and_end_at_the_last_query():
    assert vs.estimation_positions(100, 120, 8, "last").tolist() == list(range(112, 120))
    strided = vs.estimation_positions(100, 120, 8, "strided")
    assert strided.tolist() == [31, 44, 56, 69, 81, 94, 106, 119]
    mixed = vs.estimation_positions(100, 120, 8, "mixed")
    assert mixed.tolist() == [43, 67, 91, 115, 116, 117, 118, 119]
    for sampling in vs.QUERY_SAMPLINGS:
        for q_len, last_q in ((1, 4), (5, 5), (37, 9), (64, 64), (300, 7)):
            pos = vs.estimation_positions(q_len, q_len + 11, last_q, sampling)
            assert pos.numel() == min(last_q, q_len) and pos[-1] == q_len + 10
            assert bool((pos[1:] > pos[:-1]).all()) and int(pos[0]) >= 11
    with pytest.raises(ValueError, match="query sampling"):
        vs.estimation_positions(10, 10, 4, "random")


@pytest.mark.parametrize("sampling", vs.QUERY_SAMPLINGS)
def test_masses_match_dense_causal_reference(sampling, monkeypatch):
    monkeypatch.setattr(vs, "KEY_CHUNK", 24)  # several key chunks, one straddling the query range
    q, k = _qk(70, 90, seed=1)
    config = VerticalSlashConfig(num_vertical=20, num_slash=20, last_q=11, sink=3, local=5,
                                 query_sampling=sampling)
    columns, diagonals = vs.estimate_masses(q, k, config)
    positions = vs.estimation_positions(70, 90, 11, sampling)
    ref_columns, ref_diagonals = _reference_masses(q, k, positions, sink=3, local=5)
    torch.testing.assert_close(columns.double(), ref_columns, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(diagonals.double(), ref_diagonals, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_group_mix_blends_each_head_with_its_kv_group_mean(backend):
    """Masses with ``group_mix=w`` = the unmixed masses of the same estimate blended per KV group,
    checked against an explicit per-head loop; both estimate backends."""
    q, k = _qk(70, 90, hq=6, hkv=2, seed=3)
    config = VerticalSlashConfig(num_vertical=20, num_slash=20, last_q=11, sink=3, local=5, query_sampling="strided")
    own = vs.estimate_masses(q, k, config, backend=backend)
    mixed = vs.estimate_masses(q, k, dataclasses.replace(config, group_mix=0.25), backend=backend)
    for plain, blended in zip(own, mixed):
        for h in range(6):
            group = plain[:, (h // 3) * 3:(h // 3) * 3 + 3].mean(dim=1)
            torch.testing.assert_close(blended[:, h], 0.75 * plain[:, h] + 0.25 * group, atol=1e-7, rtol=1e-6)
        group_totals = [t.sum(-1).view(1, 2, 3).sum(-1) for t in (blended, plain)]
        torch.testing.assert_close(*group_totals, atol=1e-6, rtol=1e-5)  # each group's total kept
    full = vs.estimate_masses(q, k, dataclasses.replace(config, group_mix=1.0), backend=backend)[0]
    assert torch.equal(full[:, 0], full[:, 2]) and not torch.equal(full[:, 0], full[:, 3])  # one group each
    assert vs.mix_over_groups(*own, 2, 0.0)[0] is own[0]  # 0: unchanged


@pytest.mark.parametrize("rank", ["mass", "cost"])  # the packed fast path and the mask path
def test_group_columns_gives_each_head_its_groups_columns_and_keeps_its_diagonals(rank):
    """``group_columns``: vertical = the sorted union of the KV group's per-head columns (checked by
    a Python set per head), slash = the head's own; per KV group the same as ``per_kv_group``'s columns."""
    q, k = _qk(120, 150, hq=6, hkv=2, seed=4)
    config = dataclasses.replace(COST, rank=rank, num_vertical=12, num_slash=10)
    own = estimate_vertical_slash(q, k, config)
    grouped = estimate_vertical_slash(q, k, dataclasses.replace(config, group_columns=True))
    assert grouped.vertical.shape == (1, 6, 3 * 12) and torch.equal(grouped.slash, own.slash)
    for h in range(6):
        members = range((h // 3) * 3, (h // 3) * 3 + 3)
        expected = sorted({int(c) for m in members for c in own.vertical[0, m] if c >= 0})
        row = grouped.vertical[0, h].tolist()
        assert row == expected + [-1] * (36 - len(expected))
    assert len(expected) > int((own.vertical[0, 5] >= 0).sum())  # the union did add columns here
    union = estimate_vertical_slash(q, k, config, per_kv_group=True)  # columns and diagonals of each group
    assert torch.equal(grouped.vertical[:, ::3], union.vertical)
    for g in range(2):
        slashes = sorted({int(s) for m in range(3 * g, 3 * g + 3) for s in own.slash[0, m] if s >= 0})
        assert union.slash[0, g].tolist() == slashes + [-1] * (30 - len(slashes))
    both = estimate_vertical_slash(q, k, dataclasses.replace(config, group_columns=True), per_kv_group=True)
    assert torch.equal(both.vertical, union.vertical) and torch.equal(both.slash, union.slash)


@pytest.mark.parametrize("rank", ["mass", "cost"])
def test_group_columns_below_shares_columns_only_on_shorter_calls(rank):
    """``group_columns_below``: calls over fewer keys get the group's columns, calls over at least that
    many each head's own (the same index as ``group_columns=False``)."""
    q, k = _qk(120, 150, hq=6, hkv=2, seed=4)
    config = dataclasses.replace(COST, rank=rank, num_vertical=12, num_slash=10)
    own = estimate_vertical_slash(q, k, config)
    grouped = estimate_vertical_slash(q, k, dataclasses.replace(config, group_columns=True))
    for below, expected in ((151, grouped), (150, own), (0, grouped)):
        got = estimate_vertical_slash(q, k, dataclasses.replace(config, group_columns=True, group_columns_below=below))
        assert torch.equal(got.vertical, expected.vertical) and torch.equal(got.slash, expected.slash), below
    with pytest.raises(ValueError, match="group_columns_below limits group_columns"):
        dataclasses.replace(config, group_columns_below=64)
    with pytest.raises(ValueError, match="thresholds_on must be one of"):
        dataclasses.replace(config, thresholds_on="rows")
    with pytest.raises(ValueError, match="group_columns_below must be >= 0"):
        dataclasses.replace(config, group_columns=True, group_columns_below=-1)


@pytest.mark.parametrize("rank", ["mass", "cost"])
def test_query_thresholds_give_long_prefills_the_long_rule_and_turns_the_short_one(rank):
    """``thresholds_on="queries"``: ``floor_from`` / ``group_columns_below`` count the call's query rows.
    A 120-row prefill at thresholds of 100 gets per-head columns and the floors; 60 rows over the same
    150 keys (a turn) the shared columns and no floor: each the index of the config it resolves to."""
    q, k = _qk(120, 150, hq=6, hkv=2, seed=4)
    base = dataclasses.replace(COST, rank=rank, num_vertical=12, num_slash=10, budget="coverage", tau=0.5)
    rule = dataclasses.replace(base, group_columns=True, group_columns_below=100, min_vertical=6, min_slash=5,
                               floor_from=100, thresholds_on="queries")
    long = dataclasses.replace(base, min_vertical=6, min_slash=5)
    short = dataclasses.replace(base, group_columns=True)
    for rows, expected in ((120, long), (60, short)):
        got = estimate_vertical_slash(q[:, :, -rows:], k, rule)
        want = estimate_vertical_slash(q[:, :, -rows:], k, expected)
        assert rule.for_call(rows, 150) == expected
        assert torch.equal(got.vertical, want.vertical) and torch.equal(got.slash, want.slash), rows
        assert got.vertical.shape[-1] == (12 if rows == 120 else 3 * 12)  # own columns / the group's union
    floored, plain = estimate_vertical_slash(q, k, long), estimate_vertical_slash(q, k, base)
    floors_bind = not (torch.equal(floored.vertical, plain.vertical) and torch.equal(floored.slash, plain.slash))
    assert floors_bind


def test_group_columns_runs_in_the_kernel_as_its_mask():
    """The wider per-head column lists go through the kernel (interpreter, float32) as the selection's mask."""
    q, k = _qk(200, 200, hq=4, hkv=2, d=32, seed=5)
    v = torch.randn_like(k)
    config = VerticalSlashConfig(num_vertical=16, num_slash=8, last_q=16, sink=2, local=3, block_size=16,
                                 budget="coverage", tau=0.8, query_sampling="strided", group_columns=True)
    selection = estimate_vertical_slash(q, k, config)
    out = vertical_slash_attention(q, k, v, selection.vertical, selection.slash, block_size=16)
    expected = reference.masked_attention(q, k, v, selection.mask())
    torch.testing.assert_close(out, expected.to(out.dtype), atol=2e-5, rtol=0)


def test_strided_queries_never_see_later_keys():
    # Both sampled queries (31 and 63) look for one direction, which keys 32.. carry strongly: query
    # 63 puts nearly all its probability there, query 31 must still spend all of its on keys 0..31.
    q, k = _qk(64, 64, hq=2, hkv=1, seed=2)
    direction = torch.randn(16, generator=torch.Generator().manual_seed(7))
    q[:, :, [31, 63]] = direction
    k[:, :, 32:] = 3.0 * direction
    config = VerticalSlashConfig(num_vertical=8, num_slash=8, last_q=2, sink=0, local=0, query_sampling="strided")
    assert vs.estimation_positions(64, 64, 2, "strided").tolist() == [31, 63]
    columns, diagonals = vs.estimate_masses(q, k, config)
    early = columns[..., :32].sum(-1)  # query 31's half, plus a negligible share of query 63
    assert torch.allclose(early, torch.full_like(early, 0.5), atol=1e-3)
    assert torch.allclose(columns.sum(-1), torch.ones(1, 2)) and torch.allclose(diagonals.sum(-1), torch.ones(1, 2))


def test_tile_smoothed_mass_is_the_kernel_coverage_of_one_slash():
    bs, n, slash = 16, 160, 70
    rows = torch.arange(7 * bs, n)  # whole tiles, far enough from the start that no coverage is clipped
    mask = reference.vertical_slash_mask(torch.full((1, 1, 1), -1), torch.tensor([[[slash]]]), n, bs, rows=rows)
    kept_share = torch.zeros(n, dtype=torch.float64)  # per offset: share of the rows keeping it
    for r, row in enumerate(rows.tolist()):
        kept_share[row - mask[0, 0, r].nonzero().flatten()] += 1 / rows.numel()
    for offset in (55, 62, 69, 70, 71, 80, 85, 86, 100):
        one_hot = torch.zeros(1, 1, n)
        one_hot[..., offset] = 1.0
        smoothed = vs.tile_smoothed_mass(one_hot, bs, local=0)
        assert smoothed[0, 0, slash].item() == pytest.approx(kept_share[offset].item(), abs=1e-6)
        assert smoothed[0, 0, slash].item() == pytest.approx(max(0.0, 1 - abs(offset - slash) / bs), abs=1e-6)


def test_tile_smoothed_mass_leaves_out_what_the_local_band_keeps():
    bs, local = 8, 5
    diagonals = torch.rand(2, 3, 64, generator=torch.Generator().manual_seed(3))
    smoothed = vs.tile_smoothed_mass(diagonals, bs, local).double()
    weights = [max(0.0, min(1.0, (o - local + 1) / bs)) for o in range(64)]
    for s in (0, 4, 5, 9, 30, 63):
        expected = sum(diagonals[..., o].double() * weights[o] * (bs - abs(o - s)) / bs
                       for o in range(64) if abs(o - s) < bs)
        torch.testing.assert_close(smoothed[..., s], expected, atol=1e-6, rtol=1e-6)


def test_pair_costs_count_the_kernel_work_of_columns_and_slashes():
    config = dataclasses.replace(COST, sink=2, local=3, block_size=16)
    n_k, n_q = 200, 150
    column_cost, slash_cost, forced = vs.pair_costs(n_k, n_q, config, torch.device("cpu"))
    rows = torch.arange(n_k - n_q, n_k)
    total = float((rows + 1).sum())
    for j in (0, 10, 49, 50, 120, 199):  # a column's kept keys summed over the query rows
        mask = reference.vertical_slash_mask(torch.tensor([[[j]]]), torch.full((1, 1, 1), -1), n_k, 16, rows=rows)
        assert column_cost[j].item() * total == pytest.approx(float(mask.sum()))
    for s in (20, 64, 131):  # a slash keeps one tile of keys per query row, less the clipped edge rows
        mask = reference.vertical_slash_mask(torch.full((1, 1, 1), -1), torch.tensor([[[s]]]), n_k, 16, rows=rows)
        assert abs(slash_cost[s].item() * total - float(mask.sum())) <= 16 * 16
    assert forced > 0


def _reference_cost_choice(columns, diagonals, config, q_len, second=None):
    """Pure-Python loops: candidates, smoothed slash mass, work, and the greedy walk of one head.

    ``second``: the masses of the other half of the estimation queries (``split_halves``).
    """
    n = columns.numel()
    bs, local, sink = config.block_size, config.local, config.sink
    first = n - q_len
    total = sum(p + 1 for p in range(first, n))
    rows_from = [n - max(x, first) for x in range(n)]
    weight = [min(1.0, max(0.0, (o - local + 1) / bs)) if local else 1.0 for o in range(n)]
    def smoothed(diag):
        return [sum(float(diag[o]) * weight[o] * (bs - abs(o - s)) / bs for o in range(max(0, s - bs + 1), min(n, s + bs)))
                for s in range(n)]

    smooth = smoothed(diagonals)
    item_columns = [float(x) for x in columns]
    if second is not None:
        other = smoothed(second[1])
        smooth, ranked_by = [min(a, b) for a, b in zip(smooth, other)], [a + b for a, b in zip(smooth, other)]
        item_columns = [min(float(a), float(b)) for a, b in zip(columns, second[0])]
        columns, diagonals = (columns + second[0]) / 2, (diagonals + second[1]) / 2
    else:
        ranked_by = smooth
    proposals = []  # per bin: (offset, smoothed) of its first best offset >= local
    for start in range(0, n, bs):
        scores = [(ranked_by[s] if s >= local else -1.0, s) for s in range(start, min(start + bs, n))]
        best = max(scores, key=lambda pair: (pair[0], -pair[1]))
        proposals.append((best[1], best[0]))
    candidate = [False] * n
    for b, (offset, value) in enumerate(proposals):
        left = b > 0 and offset - proposals[b - 1][0] < bs and value <= proposals[b - 1][1]
        right = b + 1 < len(proposals) and proposals[b + 1][0] - offset < bs and value < proposals[b + 1][1]
        candidate[offset] = value > 0 and not left and not right
    items = [(item_columns[j] / (rows_from[j] / total), 0, j, item_columns[j], rows_from[j] / total)
             for j in range(sink, n) if rows_from[j] > 0]
    items += [(smooth[s] / (bs * rows_from[s] / total), 1, s, smooth[s], bs * rows_from[s] / total)
              for s in range(local, n) if candidate[s] and rows_from[s] > 0]
    items.sort(key=lambda item: -item[0])  # Python's sort is stable: ties keep columns first, by index
    mass = sum(float(columns[j]) for j in range(min(sink, n))) + sum(float(diagonals[o]) for o in range(min(local, n)))
    work = (sum(rows_from[:sink]) + sum(rows_from[:local]) + ((bs - 1) / 2 * rows_from[local] if 0 < local < n else 0)) / total
    counts = [min(sink, n), min(local, n)]
    caps = [config.num_vertical, config.num_slash]
    mins = [config.min_vertical, config.min_slash]
    chosen = [set(range(min(sink, n))), set(range(min(local, n)))]
    for ratio, kind, position, item_mass, item_work in items:
        if counts[kind] >= caps[kind]:
            continue
        counts[kind] += 1
        worth = ratio >= config.min_gain
        if (mass < config.tau and work + item_work <= config.max_density + 1e-12 and worth) or counts[kind] <= mins[kind]:
            chosen[kind].add(position)
        mass += item_mass
        work += item_work
    return chosen


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("overrides", [
    {},
    {"tau": 0.95, "max_density": 0.3},
    {"tau": 1.0, "max_density": 0.2, "min_vertical": 6, "min_slash": 5},
    {"num_vertical": 10, "num_slash": 6, "local": 0, "sink": 0, "block_size": 32},
    {"tau": 1.0, "min_gain": 0.3},
])
def test_cost_ranking_matches_the_loop_reference(seed, overrides):
    config = dataclasses.replace(COST, **overrides)
    gen = torch.Generator().manual_seed(seed)
    n, q_len = 96, 80
    # peaky masses like real heads: a few strong columns and diagonals over a weak floor
    columns = torch.rand(1, 2, n, generator=gen) ** 6
    diagonals = torch.rand(1, 2, n, generator=gen) ** 6
    columns, diagonals = columns / (2 * columns.sum(-1, keepdim=True)), diagonals / (2 * diagonals.sum(-1, keepdim=True))
    chosen_cols, chosen_diags = vs.choose(columns, diagonals, config, q_len=q_len)
    for h in range(2):
        want_cols, want_diags = _reference_cost_choice(columns[0, h], diagonals[0, h], config, q_len)
        assert set(chosen_cols[0, h].nonzero().flatten().tolist()) == want_cols
        assert set(chosen_diags[0, h].nonzero().flatten().tolist()) == want_diags
        assert len(want_cols) <= config.num_vertical and len(want_diags) <= config.num_slash


def test_cost_ranking_puts_a_narrow_diagonal_on_its_offset_and_tiles_a_wide_band():
    n, bs = 512, 16
    diagonals = torch.zeros(1, 1, n)
    diagonals[..., 301] = 0.3  # one sharp diagonal
    diagonals[..., 96:160] = 0.3 / 64  # a wide band of 4 tiles
    columns = torch.zeros(1, 1, n)
    columns[..., 400] = 0.2
    config = VerticalSlashConfig(num_vertical=64, num_slash=64, last_q=16, sink=0, local=0, block_size=bs,
                                 budget="coverage", tau=0.75, rank="cost")
    chosen_cols, chosen_diags = vs.choose(columns, diagonals, config)
    assert chosen_cols[0, 0].nonzero().flatten().tolist() == [400]
    slashes = chosen_diags[0, 0].nonzero().flatten().tolist()
    assert 301 in slashes
    band = [s for s in slashes if s < 200]  # the band, tiled by slashes one tile apart
    assert {128, 144}.issubset(band) and 111 in band and len(band) <= 5
    assert all(b - a >= bs for a, b in zip(slashes, slashes[1:]))


def test_cost_ranked_estimate_finds_a_planted_diagonal_and_its_density_cap_holds():
    from longinfer.patterns.recall import attention_recall, sample_rows

    gen = torch.Generator().manual_seed(5)
    n, d = 1024, 16
    k = torch.randn(1, 1, n, d, generator=gen)
    q = 0.3 * torch.randn(1, 2, n, d, generator=gen)
    q[:, 0, 40:] += 6.0 * k[:, 0, :-40]  # head 0 reads the key 40 back (a slash); head 1 is diffuse
    config = VerticalSlashConfig(num_vertical=512, num_slash=512, last_q=32, sink=4, local=8, block_size=16,
                                 budget="coverage", tau=0.9, rank="cost", query_sampling="strided")
    rows = sample_rows(n, n, 64)
    selection = estimate_vertical_slash(q, k, config)
    assert 40 in selection.slash[0, 0].tolist()
    stats = attention_recall(q, k, selection, rows)
    assert stats.head_recall[0, 0] >= 0.8 and stats.head_density[0, 0] < 0.1
    for cap in (0.1, 0.25):  # the diffuse head stops at the work cap (overlaps make it an upper bound)
        capped = estimate_vertical_slash(q, k, dataclasses.replace(config, tau=1.0, max_density=cap))
        density = attention_recall(q, k, capped, rows).head_density[0, 1].item()
        assert 0.5 * cap <= density <= cap * 1.05


@pytest.mark.parametrize("min_gain", [0.0, 0.5])
def test_split_halves_score_items_by_the_smaller_half(min_gain):
    q, k = _qk(96, 96, hq=2, hkv=1, seed=6, sharp=3.0)
    config = dataclasses.replace(COST, last_q=12, tau=0.9, min_gain=min_gain, split_halves=True)
    selection = estimate_vertical_slash(q, k, config)
    positions = vs.estimation_positions(96, 96, 12, "strided")
    first = vs.estimate_masses(q, k, config, positions=positions[0::2])
    second = vs.estimate_masses(q, k, config, positions=positions[1::2])
    for h in range(2):
        want_cols, want_diags = _reference_cost_choice(first[0][0, h], first[1][0, h], config, 96,
                                                       second=(second[0][0, h], second[1][0, h]))
        assert set(selection.vertical[0, h][selection.vertical[0, h] >= 0].tolist()) == want_cols
        assert set(selection.slash[0, h][selection.slash[0, h] >= 0].tolist()) == want_diags
    with pytest.raises(ValueError, match="ascending"):
        vs.estimate_masses(q, k, config, positions=torch.tensor([50, 40]))


@pytest.mark.parametrize("sampling", ["strided", "mixed"])
def test_segments_run_the_new_options_per_segment(sampling):
    q, k = _qk(160, 192, seed=4)
    config = dataclasses.replace(COST, query_sampling=sampling, segments=2)
    segmented = estimate_vertical_slash(q, k, config)
    assert len(segmented.parts) == 2
    single = dataclasses.replace(config, segments=1)
    for (start, end), part in zip(segmented.bounds, segmented.parts):
        alone = estimate_vertical_slash(q[:, :, start - 32: end - 32], k[:, :, :end], single)
        assert torch.equal(part.vertical, alone.vertical) and torch.equal(part.slash, alone.slash)


def test_new_options_are_validated():
    with pytest.raises(ValueError, match="query_sampling"):
        VerticalSlashConfig(query_sampling="random")
    with pytest.raises(ValueError, match="rank"):
        VerticalSlashConfig(rank="ratio")
    with pytest.raises(ValueError, match="budget='coverage'"):
        VerticalSlashConfig(rank="cost")
    with pytest.raises(ValueError, match="max_density"):
        VerticalSlashConfig(budget="coverage", max_density=0.5)
    with pytest.raises(ValueError, match="max_density"):
        VerticalSlashConfig(budget="coverage", rank="cost", max_density=0.0)
    with pytest.raises(ValueError, match="min_gain"):
        VerticalSlashConfig(budget="coverage", min_gain=1.0)
    with pytest.raises(ValueError, match="min_gain"):
        VerticalSlashConfig(budget="coverage", rank="cost", min_gain=-1.0)
    with pytest.raises(ValueError, match="split_halves"):
        VerticalSlashConfig(budget="coverage", split_halves=True)
    with pytest.raises(ValueError, match=r"group_mix must lie in \[0, 1\]"):
        VerticalSlashConfig(group_mix=1.5)
    defaults = VerticalSlashConfig()
    assert (defaults.query_sampling, defaults.rank, defaults.max_density, defaults.min_gain,
            defaults.split_halves) == ("last", "mass", 1.0, 0.0, False)


def test_group_columns_plan_runs_in_transformers_on_both_backends(tiny_llama_logits):
    """A tiny Llama with a ``group_columns`` plan (coverage budget, dense tail): the Triton and torch
    paths agree, and the wider column lists change the output against the per-head plan."""
    params = {"num_vertical": 16, "num_slash": 16, "sink": 4, "local": 8, "last_q": 16, "budget": "coverage",
              "tau": 0.5, "query_sampling": "strided"}
    outputs = {name: tiny_llama_logits({**params, "group_columns": grouped}, backend, dense_last=64)
               for name, grouped, backend in (("own", False, "triton"), ("grouped", True, "triton"),
                                              ("grouped-torch", True, "torch"))}
    torch.testing.assert_close(outputs["grouped"], outputs["grouped-torch"], atol=2e-5, rtol=1e-4)
    assert (outputs["grouped"][:, :192] - outputs["own"][:, :192]).abs().max() > 1e-3
    torch.testing.assert_close(outputs["grouped"][:, 192:], outputs["own"][:, 192:], atol=2e-5, rtol=1e-4)  # dense tail


@pytest.mark.gpu
def test_gpu_group_unions_are_the_set_unions_of_the_per_head_index():
    """On CUDA (Triton estimate and selection, bf16): one index per KV group and ``group_columns``
    hold exactly the set unions of the per-head index's columns / diagonals (one host copy at the end)."""
    gen = torch.Generator().manual_seed(11)
    q = (torch.randn(1, 12, 4096, 128, generator=gen) * 2).to("cuda", torch.bfloat16)
    k = torch.randn(1, 2, 20000, 128, generator=gen).to("cuda", torch.bfloat16)
    config = VerticalSlashConfig(num_vertical=512, num_slash=1024, budget="coverage", tau=0.9,
                                 query_sampling="strided")
    own = estimate_vertical_slash(q, k, config)
    union = estimate_vertical_slash(q, k, config, per_kv_group=True)
    grouped = estimate_vertical_slash(q, k, dataclasses.replace(config, group_columns=True))
    own_v, own_s = own.vertical.cpu(), own.slash.cpu()
    for g in range(2):
        heads = range(6 * g, 6 * g + 6)
        columns = sorted({int(c) for h in heads for c in own_v[0, h] if c >= 0})
        diagonals = sorted({int(s) for h in heads for s in own_s[0, h] if s >= 0})
        assert union.vertical[0, g].cpu().tolist() == columns + [-1] * (6 * 512 - len(columns))
        assert union.slash[0, g].cpu().tolist() == diagonals + [-1] * (6 * 1024 - len(diagonals))
        for h in heads:
            assert grouped.vertical[0, h].cpu().tolist() == union.vertical[0, g].cpu().tolist()
    assert torch.equal(grouped.slash, own.slash)


@pytest.mark.parametrize("thresholds_on", ["queries", "keys"])
@pytest.mark.parametrize("rank", ["mass", "cost"])
def test_question_rows_join_the_estimate_on_calls_from_the_threshold(rank, thresholds_on):
    """``question_from``: a call that reaches it estimates from ``2 * last_q`` queries sampled
    ``"mixed"`` (the last ``last_q`` plus ``last_q`` spread before them), any other from its own
    ``last_q`` strided ones: each the index and the masses of the config it resolves to."""
    q, k = _qk(120, 150, hq=6, hkv=2, seed=7)
    base = dataclasses.replace(COST, rank=rank, num_vertical=12, num_slash=10, last_q=8)
    rule = dataclasses.replace(base, question_from=100, thresholds_on=thresholds_on)
    keyed = thresholds_on == "keys"
    cases = ((120, 150, dataclasses.replace(base, last_q=16, query_sampling="mixed")),  # reaches it either way
             (60, 150, dataclasses.replace(base, last_q=16, query_sampling="mixed") if keyed else base),
             (60, 90, base))
    for rows, keys, expected in cases:
        qc, kc = q[:, :, -rows:], k[:, :, :keys]
        resolved = rule.for_call(rows, keys)
        assert dataclasses.replace(resolved, thresholds_on="keys") == expected, (rows, keys)
        assert resolved.for_call(rows, keys) == resolved  # resolving twice changes nothing
        got, want = estimate_vertical_slash(qc, kc, rule), estimate_vertical_slash(qc, kc, expected)
        assert torch.equal(got.vertical, want.vertical) and torch.equal(got.slash, want.slash), (rows, keys)
        for ours, theirs in zip(vs.estimate_masses(qc, kc, rule), vs.estimate_masses(qc, kc, expected)):
            torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    positions = vs.estimation_positions(120, 150, 16, "mixed")
    assert positions[-8:].tolist() == list(range(142, 150)) and positions.numel() == 16
    without = estimate_vertical_slash(q, k, base)
    with_question = estimate_vertical_slash(q, k, rule)
    assert not (torch.equal(without.vertical, with_question.vertical) and torch.equal(without.slash, with_question.slash))


def test_question_rows_are_validated():
    with pytest.raises(ValueError, match="question_from must be >= 0"):
        VerticalSlashConfig(query_sampling="strided", question_from=-1)
    for bad in ({"query_sampling": "last"}, {"query_sampling": "mixed"},
                {"query_sampling": "strided", "segments": 2}, {"query_sampling": "strided", "column_q": 32}):
        with pytest.raises(ValueError, match="question_from adds the last queries"):
            VerticalSlashConfig(question_from=1024, **bad)


def test_question_rows_and_repeat_rows_share_one_estimate():
    """With both options the extra rows come on top of the question-resolved rows: a long call's
    positions start from the 2 * last_q mixed ones, a short call's from the strided ones."""
    config = VerticalSlashConfig(last_q=8, query_sampling="strided", question_from=300, thresholds_on="queries",
                                 repeat_rows=4)
    long_rows = vs.call_estimation_positions(config, 400, 500, "cpu")
    short_rows = vs.call_estimation_positions(config, 200, 500, "cpu")
    assert long_rows.numel() == 16 + 4 and short_rows.numel() == 8 + 4
    assert set(vs.estimation_positions(400, 500, 16, "mixed").tolist()) <= set(long_rows.tolist())
    assert set(vs.estimation_positions(200, 500, 8, "strided").tolist()) <= set(short_rows.tolist())


def test_question_rows_run_in_transformers_as_the_mixed_plan(tiny_llama_logits):
    """A tiny Llama (256-token prompt): ``question_from`` reached gives the logits of the plan with
    ``2 * last_q`` mixed queries, on both backends; not reached, those of the strided plan."""
    params = {"num_vertical": 16, "num_slash": 16, "sink": 4, "local": 8, "last_q": 8, "budget": "coverage",
              "tau": 0.5, "query_sampling": "strided"}
    mixed = tiny_llama_logits({**params, "last_q": 16, "query_sampling": "mixed"}, "triton")
    strided = tiny_llama_logits(params, "triton")
    assert (mixed - strided).abs().max() > 1e-3
    for backend in ("triton", "torch"):
        torch.testing.assert_close(tiny_llama_logits({**params, "question_from": 256}, backend), mixed,
                                   atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(tiny_llama_logits({**params, "question_from": 257}, "triton"), strided,
                               atol=0, rtol=0)


def _question_column_reference(q, k, config, count):
    """Brute force: each head's ``count`` largest column masses of the last ``ceil(L / 2)`` estimation
    queries alone (ties to the lower position), as sorted Python lists per (batch, head)."""
    n_q, n_k = q.shape[2], k.shape[2]
    rows = min(config.last_q, n_q)
    tail = torch.arange(n_k - (rows - rows // 2), n_k)
    columns, _ = _reference_masses(q, k, tail, config.sink, config.local)
    return [[sorted(sorted(range(n_k), key=lambda j, b=b, h=h: (-columns[b, h, j].item(), j))[:count])
             for h in range(q.shape[1])] for b in range(q.shape[0])]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("sharing", ["own", "group_columns", "per_kv_group"])
def test_question_columns_join_the_index_as_the_union_of_both(backend, sharing, monkeypatch):
    """``question_vertical``: the index is the one without it plus, per head, the columns the last
    ``ceil(L / 2)`` estimation queries attend to most (their own column masses, brute force here); with
    one index per KV group, the group's heads' question columns together. Awkward sizes: 131 queries
    over 171 keys, 6 query heads on 2 KV heads, head_dim 24, batch 2."""
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        if not vs.interpreter_enabled():
            pytest.skip("the Triton estimate on the CPU needs TRITON_INTERPRET=1 at import")
    monkeypatch.setattr(vs, "estimate_backend", lambda q, k: backend)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 131, 24, generator=gen) * 2.0
    k = torch.randn(2, 2, 171, 24, generator=gen)
    base = VerticalSlashConfig(num_vertical=12, num_slash=10, last_q=8, sink=2, local=3, block_size=16,
                               budget="coverage", tau=0.6, query_sampling="strided", question_from=100,
                               group_columns=sharing == "group_columns")
    rule = dataclasses.replace(base, question_vertical=5)
    per_kv_group = sharing == "per_kv_group"
    without = estimate_vertical_slash(q, k, base, per_kv_group=per_kv_group)
    got = estimate_vertical_slash(q, k, rule, per_kv_group=per_kv_group)
    assert torch.equal(got.slash, without.slash)
    question = _question_column_reference(q, k, rule.for_call(131, 171), 5)
    group = 3 if per_kv_group else 1
    for b in range(2):
        for h in range(got.vertical.shape[1]):
            heads = range(h * group, h * group + group)
            expected = sorted({int(c) for c in without.vertical[b, h] if c >= 0}
                              | {c for head in heads for c in question[b][head]})
            row = got.vertical[b, h].tolist()
            assert row[:len(expected)] == expected and set(row[len(expected):]) <= {-1}, (b, h)
    assert got.vertical.shape[-1] == without.vertical.shape[-1] + group * 5


def test_question_columns_keep_facts_that_the_spread_queries_crowd_out():
    """Eight fact keys that only the question's queries attend to (1/9 of each one's attention, the
    sink the rest) lose the column cap to six keys that every spread query attends to (1/6 each):
    without ``question_vertical`` the index has none of the facts, with it all of them."""
    n, d = 400, 8
    axes = torch.eye(d)
    k = torch.zeros(1, 1, n, d)
    q = torch.zeros(1, 2, n, d)
    facts, hubs = list(range(200, 208)), list(range(10, 16))
    k[0, 0, 0] = axes[0]
    k[0, 0, facts] = axes[1]
    k[0, 0, hubs] = axes[2]
    q[0, :, :] = 40.0 * axes[2]  # every row looks for the hubs ...
    q[0, :, -16:] = 40.0 * (axes[0] + axes[1])  # ... but the question's rows for the sink and the facts
    base = VerticalSlashConfig(num_vertical=8, num_slash=40, last_q=32, sink=2, local=3, block_size=16,
                               budget="coverage", tau=0.99, query_sampling="mixed")
    rule = dataclasses.replace(base, question_vertical=9)
    assert vs.question_columns(q, k, rule)[0, 0].tolist() == [0, *facts]
    without = estimate_vertical_slash(q, k, base).vertical[0, 0].tolist()
    assert set(hubs) <= set(without) and not set(facts) & set(without)
    assert set(facts) <= set(estimate_vertical_slash(q, k, rule).vertical[0, 0].tolist())


def test_question_columns_resolve_with_the_question_rows_and_are_validated():
    rule = VerticalSlashConfig(last_q=8, query_sampling="strided", question_from=300, question_vertical=16,
                               thresholds_on="queries")
    assert rule.for_call(300, 400).question_vertical == 16 and rule.for_call(300, 400).query_sampling == "mixed"
    assert rule.for_call(299, 400).question_vertical == 0
    assert rule.for_call(300, 400).for_call(300, 400) == rule.for_call(300, 400)
    with pytest.raises(ValueError, match="question_vertical must be >= 0"):
        VerticalSlashConfig(question_vertical=-1)
    with pytest.raises(ValueError, match="it needs question_from > 0"):
        VerticalSlashConfig(query_sampling="strided", question_vertical=16)
    with pytest.raises(ValueError, match="it needs rank='mass'"):
        VerticalSlashConfig(query_sampling="strided", question_from=300, question_vertical=16, rank="cost",
                            budget="coverage")


def test_question_columns_run_in_transformers_on_both_backends(tiny_llama_logits):
    """A tiny Llama (256-token prompt) with ``question_vertical``: the torch and Triton paths give
    the same logits, which differ from those without the question columns."""
    params = {"num_vertical": 16, "num_slash": 16, "sink": 4, "local": 8, "last_q": 8, "budget": "coverage",
              "tau": 0.5, "query_sampling": "strided", "question_from": 256}
    without = tiny_llama_logits(params, "triton")
    with_columns = tiny_llama_logits({**params, "question_vertical": 12}, "triton")
    assert (with_columns - without).abs().max() > 1e-3
    torch.testing.assert_close(tiny_llama_logits({**params, "question_vertical": 12}, "torch"), with_columns,
                               atol=2e-5, rtol=1e-4)


def test_question_columns_follow_the_call_threshold():
    """Below ``question_from`` a call has no question columns; from it, those of the resolved config."""
    q, k = _qk(120, 150, hq=4, hkv=2, seed=2)
    rule = VerticalSlashConfig(num_vertical=12, num_slash=10, last_q=8, sink=2, local=3, budget="coverage",
                               query_sampling="strided", question_from=100, question_vertical=5,
                               thresholds_on="queries")
    assert vs.question_columns(q[:, :, -60:], k, rule).shape == (1, 4, 0)
    torch.testing.assert_close(vs.question_columns(q, k, rule), vs.question_columns(q, k, rule.for_call(120, 150)),
                               atol=0, rtol=0)
    assert vs.question_columns(q, k, rule).shape == (1, 4, 5)


def test_growing_diagonal_floor_estimates_as_the_fixed_floor_it_resolves_to():
    """``min_slash_share`` 0.2 over 200 keys is a floor of 40 diagonals: the same index."""
    q, k = _qk(200, 200, hq=4, hkv=2, seed=11)
    base = VerticalSlashConfig(num_vertical=16, num_slash=64, last_q=16, sink=2, local=3, block_size=16,
                               budget="coverage", tau=0.3, query_sampling="strided")
    grown = estimate_vertical_slash(q, k, dataclasses.replace(base, min_slash_share=0.2))
    fixed = estimate_vertical_slash(q, k, dataclasses.replace(base, min_slash=40))
    plain = estimate_vertical_slash(q, k, base)
    assert torch.equal(grown.vertical, fixed.vertical) and torch.equal(grown.slash, fixed.slash)
    assert not torch.equal(grown.slash, plain.slash)  # the floor binds at tau 0.3
