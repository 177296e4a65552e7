"""The tile-keys estimator against a brute-force recomputation, tile by tile."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

from longinfer.patterns import TileKeysConfig, estimate_tile_keys
from longinfer.patterns import tile_keys as tile_keys_module
from longinfer.patterns import _tile_keys_kernel as tile_keys_kernel
from longinfer.patterns._tile_keys_kernel import cap_levels
from longinfer.patterns.tile_keys import TileKeysSelection

# The Triton path runs on the CPU only in the interpreter (CI sets TRITON_INTERPRET=1), and on the GPU.
BACKENDS = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available() else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _question_sets(q, k, cfg: TileKeysConfig, scale: float) -> dict[tuple[int, int], set[int]]:
    """Per (batch, query head): the ``question_columns`` keys with the most mean probability under the last
    ``question_q`` queries, recomputed in float64 (each query's causal softmax, its ``local`` most recent keys
    left out of the mass); asserts a margin to the next key, so float32 rounding cannot swap them."""
    b, hq, nq, _ = q.shape
    nk, group = k.shape[2], hq // k.shape[1]
    rows = range(nq - min(cfg.question_q, nq), nq)
    out = {}
    for batch in range(b):
        for head in range(hq):
            mass = torch.zeros(nk, dtype=torch.float64)
            for row in rows:
                pos = nk - nq + row
                probs = torch.softmax(k[batch, head // group, : pos + 1].double() @ q[batch, head, row].double() * scale, -1)
                mass[: max(0, pos + 1 - cfg.local)] += probs[: max(0, pos + 1 - cfg.local)]
            ranked = mass.sort(descending=True)
            cut = cfg.question_columns
            assert ranked.values[cut - 1] - ranked.values[cut] > 1e-6 * len(rows)
            out[batch, head] = set(ranked.indices[:cut].tolist())
    return out


def _expected_sets(q, k, cfg: TileKeysConfig, scale: float) -> dict[tuple[int, int, int], set[int]]:
    """Per (batch, query head, tile): the keys the module docstring's rule keeps, recomputed in float64
    with the tile's pooled queries (the means of the queries in its aligned groups; groups without queries
    left out), plus the question columns (:func:`_question_sets`); a tile over ``max_keys`` doubles its
    threshold until it is within (at most ``cap_levels`` times)."""
    b, hq, nq, _ = q.shape
    nk, group = k.shape[2], hq // k.shape[1]
    offset, bs = nk - nq, cfg.block_size
    levels = cap_levels(nk, cfg.threshold, cfg.max_keys, cfg.sink + cfg.question_columns, cfg.queries)
    question = _question_sets(q, k, cfg, scale) if cfg.question_columns else {}
    out = {}
    rows_per_query = cfg.pool // cfg.queries
    for tile in range(offset // bs, math.ceil(nk / bs)):
        first = tile * bs if cfg.queries > 1 else (tile * bs // cfg.pool) * cfg.pool
        groups = [[r - offset for r in range(start, min(start + rows_per_query, nk)) if r >= offset]
                  for start in range(first, first + cfg.queries * rows_per_query, rows_per_query)]
        last = min((tile + 1) * bs, nk) - 1
        band = max(0, last + 1 - cfg.local)
        for batch in range(b):
            for head in range(hq):
                keys = k[batch, head // group, : last + 1].double()
                probs = torch.stack([torch.softmax(keys @ q[batch, head, rows].double().mean(0) * scale, -1)[:band]
                                     for rows in groups if rows])  # [groups with queries, band]
                forced = set(range(min(cfg.sink, band))) | {j for j in question.get((batch, head), ()) if j < band}
                for level in range(levels + 1):
                    threshold = cfg.threshold * 2**level / nk
                    # no probability so close to a threshold that float32 rounding could flip it
                    assert band == 0 or float((probs - threshold).abs().min()) > 1e-7
                    kept = forced | {j for j in range(band) if probs[:, j].max() >= threshold}
                    if len(kept) <= cfg.max_keys:
                        break
                out[batch, head, tile] = kept
    return out


def _selected(selection, batch: int, head: int, tile: int) -> set[int]:
    ids = selection.columns[batch, head, tile].cpu().tolist()
    kept = [j for j in ids if j >= 0]
    assert kept == sorted(set(kept)) and ids[len(kept):] == [-1] * (len(ids) - len(kept))  # ascending, then -1
    return set(kept)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nq,nk,head_dim", [(150, 150, 16), (70, 203, 80)])
@pytest.mark.parametrize("cfg", [
    TileKeysConfig(threshold=1.5, pool=16, local=16, sink=3, max_keys=1000, block_size=16),
    TileKeysConfig(threshold=1.1, pool=64, local=40, sink=1, max_keys=6, block_size=32),
    TileKeysConfig(threshold=1.3, pool=32, local=32, sink=2, max_keys=9, block_size=32, queries=4),
    TileKeysConfig(threshold=2.0, pool=16, local=16, sink=1, max_keys=1000, block_size=16, queries=16),
    TileKeysConfig(threshold=1.5, pool=16, local=16, sink=1, max_keys=1000, block_size=16, question_columns=3,
                   question_q=8),
    TileKeysConfig(threshold=1.1, pool=64, local=40, sink=1, max_keys=8, block_size=32, question_columns=2,
                   question_q=16),
], ids=["pool16", "pool64-capped", "queries4-capped", "every-row", "question", "question-capped"])
def test_tile_keys_keeps_the_keys_above_the_threshold_outside_the_band(monkeypatch, backend, nq, nk, head_dim, cfg):
    """Every tile keeps exactly the keys before its band whose pooled probability reaches threshold / Nk,
    plus the sinks, a tile over ``max_keys`` at the first doubled threshold that keeps at most that many;
    tiles before the first query keep nothing. Steps of 3 tiles (a small ``SCORES_PER_STEP``) give the same
    index as one step. The Triton path keeps the same keys (its capped tiles rescanned by the counting and
    selecting kernel). A probability near a threshold could flip on float32 rounding; the recomputation
    checks that every one lies more than 1e-7 away from it (float32 softmax errors here are ~1e-9)."""
    generator = torch.Generator().manual_seed(nq + nk)
    q = torch.randn(2, 4, nq, head_dim, generator=generator) * 1.5
    k = torch.randn(2, 2, nk, head_dim, generator=generator) * 1.5
    selection = estimate_tile_keys(q.to(DEVICE), k.to(DEVICE), cfg, backend=backend)
    selection = TileKeysSelection.from_columns(selection.columns.cpu(), selection.k_len, selection.local,
                                               selection.block_size)
    assert selection.columns.shape[:3] == (2, 4, math.ceil(nk / cfg.block_size))
    expected = _expected_sets(q, k, cfg, head_dim ** -0.5)
    for (batch, head, tile), keys in expected.items():
        assert _selected(selection, batch, head, tile) == keys, (batch, head, tile)
    first = (nk - nq) // cfg.block_size
    assert (selection.columns[:, :, :first] == -1).all()
    assert sum(len(s) for s in expected.values()) > len(expected)  # the threshold does select keys
    if cfg.question_columns:  # the question's keys are not all kept by the threshold anyway
        assert expected != _expected_sets(q, k, dataclasses.replace(cfg, question_columns=0), head_dim ** -0.5)
    if cfg.max_keys < 10:  # the cap binds somewhere
        uncapped = _expected_sets(q, k, dataclasses.replace(cfg, max_keys=nk), head_dim ** -0.5)
        assert max(len(s) for s in uncapped.values()) > cfg.max_keys

    monkeypatch.setattr(tile_keys_module, "SCORES_PER_STEP", 2 * 4 * nk * 3)
    stepped = estimate_tile_keys(q.to(DEVICE), k.to(DEVICE), cfg, backend=backend)
    width = selection.columns.shape[-1]
    assert stepped.columns.shape[-1] == width and torch.equal(stepped.columns.cpu(), selection.columns)


@pytest.mark.skipif("triton" not in BACKENDS, reason="the Triton path needs TRITON_INTERPRET=1 or a GPU")
@pytest.mark.parametrize("keys_per_split,order,levels_first", [
    (32, "ascending", False), (0, "longest_first", False), (64, "longest_first", False), (32, "ascending", True)])
def test_tile_keys_split_keys_and_tile_order_select_the_same(monkeypatch, keys_per_split, order, levels_first):
    """Pass 2 with its keys split over programs (a counting pass, then each split's ids written after the earlier
    splits'; the counting pass counting every cap level at once, or capped tiles counted again) or with its tile
    blocks longest first selects what the torch path selects, capped tiles included (the inputs and configs of
    the brute-force test above, whose probabilities lie away from the thresholds)."""
    generator = torch.Generator().manual_seed(70 + 203)
    q = (torch.randn(2, 4, 70, 80, generator=generator) * 1.5).to(DEVICE)
    k = (torch.randn(2, 2, 203, 80, generator=generator) * 1.5).to(DEVICE)
    for cfg in (TileKeysConfig(threshold=1.1, pool=64, local=40, sink=1, max_keys=6, block_size=32),
                TileKeysConfig(threshold=1.3, pool=32, local=32, sink=2, max_keys=9, block_size=32, queries=4)):
        expected = estimate_tile_keys(q, k, cfg, backend="torch").columns
        with monkeypatch.context() as patched:
            patched.setattr(tile_keys_kernel, "KEYS_PER_SPLIT", keys_per_split)
            patched.setattr(tile_keys_kernel, "TILE_ORDER", order)
            patched.setattr(tile_keys_kernel, "COUNT_CAP_LEVELS_FIRST", levels_first)
            got = estimate_tile_keys(q, k, cfg, backend="triton").columns
        assert torch.equal(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tile_keys_scores_on_the_dimensions_with_the_most_energy(backend):
    """``score_dims``: each query head's tiles keep what scoring on its ``score_dims`` dimensions with the largest
    ``sum q_d^2 * sum k_d^2`` (its queries, its KV head's keys) keeps, the brute-force rule applied to q and k cut
    to those dimensions; every dimension equals ``score_dims=0``. Every row is its own pooled query here
    (``queries == block_size`` and Nk a multiple of it), so the pooled queries are q itself. The heads of a KV
    group are made to prefer different dimensions, so one set per group would fail."""
    generator = torch.Generator().manual_seed(12)
    q = torch.randn(2, 4, 128, 32, generator=generator) * 1.5
    k = torch.randn(2, 2, 128, 32, generator=generator) * 1.5
    loud = torch.tensor([3, 7, 10, 12, 20, 29])
    q[..., loud] *= 2.0
    k[..., loud] *= 1.5
    q[:, 1::2, :, 25:27] *= 3.5  # the second head of each KV group: two dimensions of its own
    cfg = TileKeysConfig(threshold=2.0, pool=16, local=16, sink=1, max_keys=1000, block_size=16, queries=16)
    cut = dataclasses.replace(cfg, score_dims=8)
    got = estimate_tile_keys(q.to(DEVICE), k.to(DEVICE), cut, backend=backend)
    got = TileKeysSelection.from_columns(got.columns.cpu(), got.k_len, got.local, got.block_size)
    energy = q.square().sum(2) * k.square().sum(2).repeat_interleave(2, dim=1)  # [B, Hq, D]
    dims = energy.topk(8, dim=-1).indices  # [B, Hq, 8]
    assert all(set(loud.tolist()) <= set(d.tolist()) for d in dims.flatten(0, 1))  # the loud ones win
    assert all(set(dims[b, 0].tolist()) != set(dims[b, 1].tolist()) for b in range(2))  # heads of a group differ
    q_cut = torch.stack([torch.stack([q[b, h, :, dims[b, h]] for h in range(4)]) for b in range(2)])
    k_cut = torch.stack([torch.stack([k[b, h // 2, :, dims[b, h]] for h in range(4)]) for b in range(2)])
    expected = _expected_sets(q_cut, k_cut, cfg, 32 ** -0.5)  # k_cut has a KV head per query head
    for (batch, head, tile), keys in expected.items():
        assert _selected(got, batch, head, tile) == keys, (batch, head, tile)
    full = estimate_tile_keys(q.to(DEVICE), k.to(DEVICE), cfg, backend=backend).columns
    assert not torch.equal(got.columns, full.cpu())  # 8 of 32 dimensions: another index
    every = estimate_tile_keys(q.to(DEVICE), k.to(DEVICE), dataclasses.replace(cfg, score_dims=32), backend=backend)
    assert torch.equal(every.columns, full)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tile_keys_kv_group_union_and_config_errors(backend):
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(1, 6, 100, 16, generator=generator) * 1.5
    k = torch.randn(1, 2, 100, 16, generator=generator) * 1.5
    cfg = TileKeysConfig(threshold=1.5, pool=32, local=16, block_size=16)
    per_head = estimate_tile_keys(q.to(DEVICE), k.to(DEVICE), cfg, backend=backend)
    shared = estimate_tile_keys(q.to(DEVICE), k.to(DEVICE), cfg, per_kv_group=True, backend=backend)
    assert shared.num_heads == 2
    for kv in range(2):
        for tile in range(per_head.columns.shape[2]):
            union = set().union(*(_selected(per_head, 0, h, tile) for h in range(3 * kv, 3 * kv + 3)))
            assert _selected(shared, 0, kv, tile) == union
    for params, message in [({"pool": 48}, "multiple of block_size"), ({"local": 8, "block_size": 16}, "local"),
                            ({"threshold": 0.0}, "threshold"), ({"threshold": math.inf}, "threshold"),
                            ({"max_keys": 2, "sink": 3}, "max_keys"), ({"block_size": 128}, "block_size"),
                            ({"queries": 3}, "queries"), ({"queries": 2, "pool": 128}, "pool must equal"),
                            ({"score_dims": -1}, "score_dims"), ({"question_columns": -1}, "question_columns"),
                            ({"question_q": 0}, "question_q"),
                            ({"question_columns": 20, "max_keys": 22, "sink": 3}, "sink \\+ question_columns")]:
        with pytest.raises(ValueError, match=message):
            TileKeysConfig(**params)
    with pytest.raises(TypeError, match="TileKeysConfig"):
        estimate_tile_keys(q, k, object())
    with pytest.raises(ValueError, match="backend"):
        estimate_tile_keys(q, k, cfg, backend="cuda")
    with pytest.raises(ValueError, match="score_dims=17 is more than head_dim=16"):
        estimate_tile_keys(q.to(DEVICE), k.to(DEVICE), dataclasses.replace(cfg, score_dims=17), backend=backend)
