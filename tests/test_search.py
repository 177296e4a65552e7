"""Offline search: q/k capture, cost model vs the kernel's loops, choice rule, planted patterns,
calibration prompt, a whole search on a tiny Llama with kill-and-resume, crossover arithmetic."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import re

import pytest
import torch

from longinfer.ops import reference
from longinfer.patterns import get_pattern
from longinfer.patterns.recall import sample_rows
from longinfer.plans import DEFAULT_DENSE_LAST, HeadPlan, LayerPlan, Plan, search
from longinfer.plans.calibration import kv_retrieval_prompt
from tests.test_eval_fixtures import corpus_text, make_tokenizer

# --------------------------------------------------------------------------- helpers


def tiny_llama(vocab_size: int, layers: int = 3, seed: int = 0):
    """A random Llama: 4 query / 2 KV heads of dim 32, float32, SDPA attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation("sdpa")
    return model


def _manual_qk(model, ids, layer):
    """Post-RoPE q/k of ``layer`` computed by hand from the layer's input hidden states."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    seen = {}

    def keep_input(module, args, kwargs):
        seen["h"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    handle = model.model.layers[layer].register_forward_pre_hook(keep_input, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
        handle.remove()
        attn = model.model.layers[layer].self_attn
        x = model.model.layers[layer].input_layernorm(seen["h"])
        n = ids.shape[1]
        q = attn.q_proj(x).view(1, n, -1, 32).transpose(1, 2)
        k = attn.k_proj(x).view(1, n, -1, 32).transpose(1, 2)
        cos, sin = model.model.rotary_emb(x, torch.arange(n)[None])
        return apply_rotary_pos_emb(q, k, cos, sin)


# --------------------------------------------------------------------------- capture


def test_capture_records_post_rope_qk_and_restores_the_model():
    model = tiny_llama(300)
    ids = torch.randint(0, 300, (1, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    captured = search.capture_qk(model, ids, [0, 2])
    assert set(captured) == {0, 2}
    for layer in (0, 2):
        q, k = _manual_qk(model, ids, layer)
        torch.testing.assert_close(captured[layer].q, q, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(captured[layer].k, k, atol=1e-5, rtol=1e-5)
        assert captured[layer].k.shape == (1, 2, 150, 32)  # KV heads, GQA not repeated
        assert captured[layer].sm_scale == pytest.approx(32 ** -0.5)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)


def test_capture_stops_after_the_last_wanted_layer():
    model = tiny_llama(300)
    calls = []
    model.model.layers[2].register_forward_pre_hook(lambda *a: calls.append(2))
    model.lm_head.register_forward_pre_hook(lambda *a: calls.append("lm_head"))
    captured = search.capture_qk(model, torch.randint(0, 300, (1, 40)), [1])
    assert set(captured) == {1} and calls == []
    with pytest.raises(ValueError, match="do not exist"):
        search.capture_qk(model, torch.randint(0, 300, (1, 40)), [3])


# --------------------------------------------------------------------------- cost model


def _simulated_pairs(mode, q_len, k_len, block_m, *, sink=0, window=0, vs_index=None, bs_index=None, head=0):
    """The kernel's loops (longinfer/ops/_kernel.py) walked in Python, counting rows x keys visited."""
    bn = search.COST_BLOCK_N
    total = 0
    for tile in range(math.ceil(k_len / block_m)):
        start, end = tile * block_m, min(tile * block_m + block_m, k_len)
        rows = max(0, end - max(start, k_len - q_len))
        if rows == 0:
            continue
        ranges = []
        if mode == "dense":
            ranges = [(0, end)]
        elif mode == "a_shape":
            sink_end = min(sink, end)
            ranges = [(0, sink_end), (max(start - window + 1, sink_end), end)]
        elif mode == "vs":
            for g in range(int(vs_index.group_count[0, head])):
                lo, hi = int(vs_index.group_lo[0, head, g]), int(vs_index.group_hi[0, head, g])
                ranges.append((max(start - hi, 0), min(start + block_m - lo, end)))
        keys = sum(len(range(a, b, bn)) * bn for a, b in ranges)
        if mode == "vs":
            keys += len(range(0, int(vs_index.column_count[0, head, tile]), bn)) * bn
        if mode == "bs":
            count = int(bs_index.block_count[0, head, tile])
            ids = bs_index.block_ids[0, head, tile, :count].tolist()
            keys = sum(block_m if b != tile else len(range(start, end, bn)) * bn for b in ids)
        total += rows * keys
    return total


@pytest.mark.parametrize("q_len,k_len", [(1000, 1000), (300, 1000), (130, 130)])
def test_cost_model_counts_the_kernel_loops(q_len, k_len):
    from longinfer.ops import build_block_sparse_index, build_vertical_slash_index

    assert search.dense_pairs(q_len, k_len) == _simulated_pairs("dense", q_len, k_len, 128)
    for sink, window in ((0, 1), (30, 200), (100, 5000)):
        assert search.a_shape_pairs(q_len, k_len, sink, window) == _simulated_pairs(
            "a_shape", q_len, k_len, 128, sink=sink, window=min(window, k_len + 1))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, q_len, 32, generator=g)
    k = torch.randn(1, 2, k_len, 32, generator=g)
    vs_head = HeadPlan.from_params("vertical_slash", {"num_vertical": 40, "num_slash": 30, "sink": 4, "local": 8,
                                                      "block_size": 32})
    vs = get_pattern("vertical_slash").estimate(q, k, vs_head.config)
    vs_index = build_vertical_slash_index(vs.vertical, vs.slash, k_len, 32)
    bs = get_pattern("block_sparse").estimate(q, k, HeadPlan.from_params("block_sparse", {"num_blocks": 5}).config)
    bs_index = build_block_sparse_index(bs.block_index, k_len, 64)
    vs_pairs = search.vertical_slash_pairs(vs, q_len, tile_chunk=7)
    bs_pairs = search.block_sparse_pairs(bs, q_len)
    for head in range(2):
        assert vs_pairs[0, head] == _simulated_pairs("vs", q_len, k_len, 32, vs_index=vs_index, head=head)
        assert bs_pairs[0, head] == _simulated_pairs("bs", q_len, k_len, 64, bs_index=bs_index, head=head)
    # Tile keys: per tile, the band walked in key tiles from its (unaligned) start, then the columns in
    # groups of BLOCK_N, as the kernel's loops run.
    tk_config = HeadPlan.from_params("tile_keys", {"threshold": 1.0, "local": 100, "block_size": 32}).config
    tk = get_pattern("tile_keys").estimate(q, k, tk_config)
    tk_pairs = search.tile_keys_pairs(tk, q_len)
    bn = search.COST_BLOCK_N
    for head in range(2):
        total = 0
        for tile in range(math.ceil(k_len / 32)):
            start, end = tile * 32, min(tile * 32 + 32, k_len)
            rows = end - max(start, k_len - q_len)
            if rows <= 0:
                continue
            band_start = max(0, end - 100)
            count = int((tk.columns[0, head, tile] >= 0).sum())
            total += rows * (len(range(band_start, end, bn)) * bn + len(range(0, count, bn)) * bn)
        assert tk_pairs[0, head] == total


def test_cost_covers_the_mask_and_dense_costs_one():
    """Every kernel computes at least its mask's pairs; dense is 1 by definition."""
    n = 700
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, n, 32, generator=g), torch.randn(1, 2, n, 32, generator=g)
    heads = [HeadPlan.from_params("dense"), HeadPlan.from_params("a_shape", {"sink": 10, "window": 50}),
             HeadPlan.from_params("triangle", {"sink": 10, "window": 50, "last_q": 40}),
             HeadPlan.from_params("vertical_slash", {"num_vertical": 20, "num_slash": 12, "sink": 4, "local": 4}),
             HeadPlan.from_params("block_sparse", {"num_blocks": 3}),
             HeadPlan.from_params("tile_keys", {"threshold": 1.0, "local": 96})]
    for head in heads:
        selection = get_pattern(head.pattern).estimate(q, k, head.config)
        pairs = search.kernel_pairs(selection, n)
        mask_pairs = selection.mask(torch.arange(n)).sum((-1, -2)).double()  # [B|1, H|1]
        assert (pairs >= mask_pairs).all(), head.pattern
        cost = search.relative_cost(head, selection, n, 4)
        assert cost.shape == (4,)
        if head.pattern == "dense":
            assert torch.allclose(cost, torch.ones(4))
    assert search.estimation_pairs("tile_keys", heads[5].config, n, n) == math.ceil(n / 64) * n
    assert search.estimation_pairs("tile_keys", heads[5].config, 100, n) == (math.ceil(n / 64) - 600 // 64) * n
    half = dataclasses.replace(heads[5].config, score_dims=16)  # half of head_dim 32: half the multiply-adds
    assert search.estimation_pairs("tile_keys", half, n, n, head_dim=32) == math.ceil(n / 64) * n / 2
    assert search.estimation_pairs("tile_keys", half, n, n) == math.ceil(n / 64) * n  # head_dim unknown: all
    asking = dataclasses.replace(heads[5].config, question_columns=10, question_q=16)  # + its 16 rows, twice
    assert search.estimation_pairs("tile_keys", asking, n, n) == math.ceil(n / 64) * n + 2 * 16 * n
    assert search.estimation_pairs("tile_keys", dataclasses.replace(asking, question_q=n + 5), 100, n) \
        == (math.ceil(n / 64) - 600 // 64) * n + 2 * 100 * n  # at most the call's rows
    selection = get_pattern("tile_keys").estimate(q, k, half)
    saved = search.relative_cost(HeadPlan("tile_keys", heads[5].config), selection, n, 4, 32) \
        - search.relative_cost(HeadPlan("tile_keys", half), selection, n, 4, 32)
    assert torch.allclose(saved, torch.full((4,), math.ceil(n / 64) * n / 2 / search.dense_pairs(n, n)))
    vs = heads[3]
    est = search.estimation_pairs("vertical_slash", vs.config, n, n)
    assert est == 2 * 64 * n
    with_columns = dataclasses.replace(vs.config, column_q=n + 5)  # more column queries than rows: all n rows
    assert search.estimation_pairs("vertical_slash", with_columns, n, n) == 2 * (64 + n) * n


def test_kernel_pairs_rejects_unknown_selections():
    with pytest.raises(TypeError, match="no cost model"):
        search.kernel_pairs(object(), 10)


# --------------------------------------------------------------------------- choice rule


def test_choice_prefers_recall_within_budget_then_cheaper_on_ties():
    recall = torch.tensor([[0.90, 0.50, 0.99], [0.903, 0.80, 0.70], [0.99, 0.99, 0.99]])
    cost = torch.tensor([[0.05, 0.05, 0.05], [0.08, 0.08, 0.08], [0.50, 0.50, 0.50]])
    scores = search.LayerScores(recall, cost)
    # head 0: 0.903 ties 0.90 -> cheaper candidate 0; head 1: candidate 1 clearly better; head 2: candidate 0.
    assert search.choose_candidates(scores, 0.1, recall_tolerance=0.005) == [0, 1, 0]
    assert search.choose_candidates(scores, 0.1, recall_tolerance=0.0) == [1, 1, 0]
    assert search.choose_candidates(scores, 1.0, recall_tolerance=0.0) == [2, 2, 0]
    # Per group of 3 heads: mean recall 0.797 / 0.801 / 0.99 -> the over-budget one is not eligible.
    assert search.choose_candidates(scores, 0.1, recall_tolerance=0.0, group_size=3) == [1, 1, 1]
    with pytest.raises(ValueError, match="group_size"):
        search.choose_candidates(scores, 0.1, group_size=2)


def test_choice_falls_back_to_the_cheapest_over_budget(caplog):
    scores = search.LayerScores(torch.tensor([[0.9], [0.95]]), torch.tensor([[0.4], [0.3]]))
    assert search.choose_candidates(scores, 0.1) == [1]
    assert "no candidate fits" in caplog.text


@pytest.mark.parametrize("seed", range(5))
def test_global_choice_is_the_best_mean_recall_at_its_mean_cost(seed):
    """One price over all heads of all layers: no choice of candidates (brute force over 3^4) with at most
    its mean cost has a higher mean recall; the mean cost stays within the budget."""
    generator = torch.Generator().manual_seed(seed)
    layers = [search.LayerScores(torch.rand(3, 2, generator=generator), torch.rand(3, 2, generator=generator))
              for _ in range(2)]
    recall = torch.cat([layer.recall for layer in layers], 1).double()  # [C, 4 heads]
    cost = torch.cat([layer.cost for layer in layers], 1).double()
    cheapest, dearest = float(cost.min(0).values.mean()), float(cost.max(0).values.mean())
    for share in (0.3, 0.6, 1.0):
        budget = cheapest + share * (dearest - cheapest)
        choice = torch.tensor(sum(search.choose_globally(layers, budget), []))
        heads = torch.arange(4)
        spent, kept = float(cost[choice, heads].mean()), float(recall[choice, heads].mean())
        assert spent <= budget + 1e-9
        best = max(float(recall[list(pick), heads].mean()) for pick in itertools.product(range(3), repeat=4)
                   if float(cost[list(pick), heads].mean()) <= spent + 1e-12)
        assert kept == pytest.approx(best, abs=1e-9)


def test_global_choice_spends_where_recall_is_cheap(caplog):
    """Head 0 keeps everything with its cheap candidate; head 1 needs the dear one: an average budget of
    0.3 gives head 0 the cheap one and head 1 the dear one (per head, 0.3 would give both the cheap one)."""
    scores = search.LayerScores(torch.tensor([[0.99, 0.5], [1.0, 0.95]]), torch.tensor([[0.05, 0.05], [0.5, 0.5]]))
    assert search.choose_globally([scores], 0.3) == [[0, 1]]
    assert search.choose_candidates(scores, 0.3) == [0, 0]
    assert search.choose_globally([scores], 0.3, group_size=2) == [[0, 0]]  # the pair's mean cost 0.5 > 0.3
    assert search.choose_globally([scores], 0.01) == [[0, 0]] and "even the cheapest" in caplog.text
    with pytest.raises(ValueError, match="cost_budget must be > 0"):
        search.choose_globally([scores], 0.0)


def test_ladder_candidates_span_cheaper_and_dearer_budgets():
    ladder = search.ladder_candidates(8192, 0.1)
    labels = {json.dumps(h.to_dict(), sort_keys=True) for h in ladder}
    assert len(labels) == len(ladder)  # no repeats
    for multiple in search.GLOBAL_BUDGET_LADDER:
        assert all(json.dumps(h.to_dict(), sort_keys=True) in labels for h in search.default_candidates(8192, 0.1 * multiple))


def _planted_qk(n=4096, d=64):
    """Head 0: sinks (keys 0-3) + itself: an A-shape head. Head 1: the diagonal at offset 700 and
    key columns 1000 and 2500: a vertical-slash head no window covers."""
    g = torch.Generator().manual_seed(0)
    unit = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    shared = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=-1)
    pos = torch.arange(n)
    k0 = unit.clone()
    k0[:4] += 2.0 * shared
    q0 = 16.0 * unit + 8.0 * shared
    k1 = unit.clone()
    k1[[1000, 2500]] += 2.0 * shared
    diagonal = torch.where((pos >= 700)[:, None], unit[(pos - 700).clamp(min=0)], torch.zeros(n, d))
    q1 = 16.0 * diagonal + 8.0 * shared
    return torch.stack([q0, q1])[None], torch.stack([k0, k1])[None]


def test_search_finds_the_planted_patterns():
    q, k = _planted_qk()
    candidates = [HeadPlan.from_params("a_shape", {"sink": 64, "window": 256}),
                  HeadPlan.from_params("vertical_slash", {"num_vertical": 16, "num_slash": 72, "sink": 4, "local": 64}),
                  HeadPlan.from_params("block_sparse", {"num_blocks": 8})]
    rows = sample_rows(q.shape[2], k.shape[2], 48)
    scores = search.score_layer(q, k, candidates, rows, sm_scale=1.0)
    assert scores.recall.shape == scores.cost.shape == (3, 2)
    assert (scores.cost < 0.3).all()  # comparable kernel cost
    assert scores.recall[:, 0].min() > 0.99  # every candidate keeps the A-shape head ...
    assert scores.recall[0, 1] < 0.3 and scores.recall[1, 1] > 0.8  # ... only vertical-slash the other
    assert search.choose_candidates(scores, 0.3) == [0, 1]  # a_shape (cheapest of the tie), vertical_slash


def test_recall_of_a_shape_matches_brute_force_softmax():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 2, 512, 32, generator=g) * 2, torch.randn(1, 2, 512, 32, generator=g)
    head = HeadPlan.from_params("a_shape", {"sink": 8, "window": 40})
    rows = torch.tensor([100, 300, 511])
    scores = search.score_layer(q, k, [head], rows, sm_scale=0.3)
    mask = reference.a_shape_mask(8, 40, 512, rows=rows)[0, 0]  # [R, N]
    logits = torch.einsum("hrd,hnd->hrn", q[0, :, rows].double(), k[0].double()) * 0.3
    logits = logits.masked_fill(torch.arange(512)[None, None] > rows[None, :, None], -math.inf)
    expected = (torch.softmax(logits, -1) * mask).sum(-1).mean(-1)
    torch.testing.assert_close(scores.recall[0].double(), expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- candidates


def test_default_candidates_are_valid_at_any_length():
    for length in (64, 1000, 32768, 131072):
        candidates = search.default_candidates(length, 0.1)
        assert len(set(candidates)) == len(candidates) >= 5
        assert {c.pattern for c in candidates} >= {"a_shape", "vertical_slash", "block_sparse", "triangle"}
    for length in (8192, 32768):
        widest = next(c.config for c in search.default_candidates(length, 0.1) if c.pattern == "a_shape")
        dense = search.dense_pairs(length, length)
        # the widest window the cost model allows within the budget (tile rounding included)
        assert search.a_shape_pairs(length, length, widest.sink, widest.window) <= 0.1 * dense
        assert search.a_shape_pairs(length, length, widest.sink, widest.window + 1) > 0.1 * dense
    with pytest.raises(ValueError, match="cost_budget"):
        search.default_candidates(1000, 0.0)


def _strided(candidates):
    return [c for c in candidates if c.pattern == "vertical_slash" and c.config.query_sampling == "strided"]


def test_default_candidates_include_strided_vertical_slash():
    for length, budget in ((1024, 0.3), (4096, 0.1), (32768, 0.1), (131072, 0.1)):
        candidates = search.default_candidates(length, budget)
        strided = _strided(candidates)
        assert strided == search.strided_vertical_slash_candidates(length, budget)
        configs = [c.config for c in strided]
        assert sorted(c.tau for c in configs if c.budget == "coverage" and c.rank == "mass") == list(search.STRIDED_TAUS)
        assert any(c.budget == "fixed" for c in configs) and any(c.rank == "cost" for c in configs)
        for config in configs:
            assert 16 <= config.last_q <= 64
            # the local band fills whole key tiles: 1, 65 or 129 diagonals
            assert config.local in (1, 65, 129)
        estimate = search.estimation_pairs("vertical_slash", configs[0], length, length)
        assert estimate <= budget / 4 * search.dense_pairs(length, length) or configs[0].last_q == 16
    assert search.strided_estimation_queries(32768, 0.1) == 64  # the default plan's estimate
    assert search.strided_estimation_queries(4096, 0.1) == 16
    with pytest.raises(ValueError, match="cost_budget"):
        search.strided_vertical_slash_candidates(1000, 1.5)


def test_each_slash_costs_a_key_tile_band_per_query_tile():
    """Slashes on multiples of 64 (two of them merged) and 64 sink columns: per full query tile the
    kernel computes exactly what the reference mask keeps for the tile's last row, slash bands and
    columns counted apart (covered columns are computed twice, as the kernel does)."""
    from longinfer.patterns.vertical_slash import VerticalSlashSelection

    n, bs = 1024, 64
    vertical = torch.arange(64).expand(1, 2, 64)
    slash = torch.tensor([[[0, 128, 512, -1], [0, 256, 320, 768]]])
    selection = VerticalSlashSelection(vertical, slash, n, bs)
    last_rows = torch.arange(bs - 1, n, bs)
    none_v, none_s = torch.full((1, 2, 1), -1), torch.full((1, 2, 1), -1)
    slash_keys = reference.vertical_slash_mask(none_v, slash, n, bs, rows=last_rows).sum(-1)  # [1, 2, T]
    column_keys = reference.vertical_slash_mask(vertical, none_s, n, bs, rows=last_rows).sum(-1)
    expected = (bs * (slash_keys + column_keys)).sum(-1)
    assert search.vertical_slash_pairs(selection, n).tolist() == expected.tolist()
    # head 0: the slash 512 costs 64 keys for each of the 8 tiles from 512 on
    assert int(slash_keys[0, 0, -1]) == 3 * bs


def _planted_moving_columns_qk(n=1024, d=64, segments=3, per_segment=6):
    """One head whose queries after ``n/4`` attend a few early key columns, a different set in each
    third of them (before ``n/4``: themselves). The last queries see only the last set."""
    g = torch.Generator().manual_seed(0)
    unit = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    directions = torch.linalg.qr(torch.randn(d, segments, generator=g))[0].T  # orthonormal [segments, d]
    k, q = unit.clone(), 16.0 * unit
    start = n // 4
    bounds = torch.linspace(start, n, segments + 1).long().tolist()
    columns = (torch.randperm(start - 64, generator=g)[: segments * per_segment] + 32).view(segments, per_segment)
    for s in range(segments):
        k[columns[s]] += 3.0 * directions[s]
        q[bounds[s]: bounds[s + 1]] = 12.0 * directions[s] + 4.0 * unit[bounds[s]: bounds[s + 1]]
    return q[None, None], k[None, None]


def test_strided_candidate_costs_follow_their_masks():
    """For the estimated strided candidates: per query tile the kernel computes the reference mask's
    keys of the tile's last row (slash bands and columns apart), plus at most one partial key tile
    per slash group and one for the columns."""
    n, budget, bs = 1024, 0.3, 64
    q, k = _planted_moving_columns_qk(n)
    last_rows = torch.arange(bs - 1, n, bs)
    for head in _strided(search.default_candidates(n, budget)):
        selection = get_pattern("vertical_slash").estimate(q, k, head.config, sm_scale=1.0)
        assert selection.block_size == bs
        pairs = float(search.kernel_pairs(selection, n))
        none = torch.full((1, 1, 1), -1)
        slash_keys = reference.vertical_slash_mask(none, selection.slash, n, bs, rows=last_rows).sum()
        column_keys = reference.vertical_slash_mask(selection.vertical, none, n, bs, rows=last_rows).sum()
        slashes = int((selection.slash >= 0).sum())
        exact = float(bs * (slash_keys + column_keys))
        label = search.candidate_label(head)
        assert exact <= pairs <= exact + bs * (bs - 1) * (slashes + 1) * (n // bs), label
        assert pairs >= float(selection.mask(torch.arange(n)).sum()), label  # a superset of the mask
        cost = search.relative_cost(head, selection, n, 1)
        estimate = 2 * head.config.last_q * n
        assert float(cost) == pytest.approx((pairs + estimate) / search.dense_pairs(n, n), rel=1e-6)


def test_search_picks_strided_estimation_when_attention_moves_over_the_prompt():
    n, budget = 1024, 0.3
    q, k = _planted_moving_columns_qk(n)
    candidates = search.default_candidates(n, budget)
    scores = search.score_layer(q, k, candidates, sample_rows(n, n, 64), sm_scale=1.0)
    chosen = candidates[search.choose_candidates(scores, budget)[0]]
    assert chosen in _strided(candidates)
    best_strided = max(float(scores.recall[i, 0]) for i, c in enumerate(candidates) if c in _strided(candidates))
    last_query = [float(scores.recall[i, 0]) for i, c in enumerate(candidates)
                  if c.pattern == "vertical_slash" and c.config.query_sampling == "last"]
    assert best_strided > 0.95 and max(last_query) < 0.6  # the last queries miss the earlier columns


def test_parse_candidate():
    head = search.parse_candidate("vertical_slash:num_vertical=500,num_slash=800,budget=coverage,tau=0.95")
    assert head.pattern == "vertical_slash"
    assert (head.config.num_vertical, head.config.num_slash, head.config.budget, head.config.tau) == (500, 800, "coverage", 0.95)
    assert search.parse_candidate("dense") == HeadPlan.from_params("dense")
    with pytest.raises(ValueError, match="unknown pattern"):
        search.parse_candidate("nope:x=1")
    with pytest.raises(ValueError, match="unknown parameter"):
        search.parse_candidate("a_shape:sinks=4")
    with pytest.raises(ValueError, match="key=value"):
        search.parse_candidate("a_shape:sink")
    with pytest.raises(TypeError, match="sink"):
        search.parse_candidate("a_shape:sink=big")


def test_load_candidates(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"pattern": "a_shape", "params": {"sink": 4, "window": 8}}]))
    assert search.load_candidates(path) == (HeadPlan.from_params("a_shape", {"sink": 4, "window": 8}),)
    path.write_text("[]")
    with pytest.raises(ValueError, match="non-empty"):
        search.load_candidates(path)


# --------------------------------------------------------------------------- calibration prompt


def test_kv_retrieval_prompt_is_exact_and_deterministic():
    tok = make_tokenizer()
    text = corpus_text()
    prompt = kv_retrieval_prompt(tok, 1500, haystack_text=text, seed=3)
    assert prompt.length == 1500 and prompt.tensor().shape == (1, 1500)
    assert prompt == kv_retrieval_prompt(tok, 1500, haystack_text=text, seed=3)
    assert prompt.input_ids != kv_retrieval_prompt(tok, 1500, haystack_text=text, seed=4).input_ids
    decoded = tok.decode(list(prompt.input_ids))
    records = re.findall(r"The value of key [0-9a-f]{6}-[0-9a-f]{4} is [0-9]{8}\.", decoded)
    assert len(records) == prompt.description["num_records"] == 1500 // 256
    question = decoded[decoded.index("What are the values of the keys"):]
    asked = question.split("keys ")[1].split("?")[0].split(", ")
    assert len(asked) == prompt.description["num_queries"] == 4
    for key in asked:  # every asked key was inserted with a value
        assert f"The value of key {key} is " in decoded
    assert prompt.description["ids_sha256"] and prompt.description["kind"] == "kv_retrieval"


def test_kv_retrieval_prompt_defaults_to_the_corpus(monkeypatch):
    """Without haystack_text the filler comes from longinfer.data.corpora, seeded like the records."""
    from longinfer.plans import calibration

    tok = make_tokenizer()
    calls = []

    def fake_haystack_ids(tokenizer, n_tokens, corpus, seed, cache_dir):
        calls.append((n_tokens, corpus, seed))
        return tok.encode(corpus_text(), add_special_tokens=False)[:n_tokens]

    monkeypatch.setattr(calibration.corpora, "haystack_ids", fake_haystack_ids)
    prompt = kv_retrieval_prompt(tok, 1200, corpus="sotu", seed=7)
    assert prompt.length == 1200 and prompt.description["corpus"] == "sotu"
    assert len(calls) == 1 and calls[0][1:] == ("sotu", 7) and 0 < calls[0][0] < 1200


def test_kv_retrieval_prompt_errors():
    tok = make_tokenizer()
    short = kv_retrieval_prompt(tok, 300, haystack_text=corpus_text())  # default count shrinks to fit
    assert short.length == 300 and short.description["num_records"] >= 1
    with pytest.raises(ValueError, match="cannot hold"):
        kv_retrieval_prompt(tok, 150, haystack_text=corpus_text())  # the frame alone is longer
    with pytest.raises(ValueError, match="cannot hold"):
        kv_retrieval_prompt(tok, 300, haystack_text=corpus_text(), num_records=50)
    with pytest.raises(ValueError, match="length"):
        kv_retrieval_prompt(tok, 0, haystack_text=corpus_text())


# --------------------------------------------------------------------------- whole search, resume


@pytest.fixture(scope="module")
def tiny_setup():
    tok = make_tokenizer()
    model = tiny_llama(len(tok))
    calibration = kv_retrieval_prompt(tok, 1024, haystack_text=corpus_text())
    candidates = (HeadPlan.from_params("a_shape", {"sink": 16, "window": 128}),
                  HeadPlan.from_params("triangle", {"sink": 16, "window": 128, "last_q": 32}),
                  HeadPlan.from_params("vertical_slash", {"num_vertical": 32, "num_slash": 20, "sink": 4, "local": 16,
                                                          "last_q": 32}),
                  HeadPlan.from_params("block_sparse", {"num_blocks": 4}))
    return tok, model, calibration, candidates


def _run(tiny_setup, out, **kwargs):
    tok, model, calibration, candidates = tiny_setup
    options = {"calibration": calibration, "candidates": candidates, "cost_budget": 0.6, "num_rows": 24,
               "progress": False, **kwargs}
    return search.search_plan(model, tok, out=out, **options)


def test_search_writes_a_valid_plan(tiny_setup, tmp_path):
    _, model, calibration, candidates = tiny_setup
    out = tmp_path / "plan.json"
    plan = _run(tiny_setup, out, model_id="tiny-llama")
    loaded = Plan.load(out)
    assert loaded == plan
    plan.check_matches(model.config)
    assert plan.model_id == "tiny-llama" and plan.num_layers == 3
    assert all(head in candidates for layer in plan.layers for head in layer.heads)
    assert plan.search["method"] == "search"
    assert plan.search["calibration"]["ids_sha256"] == calibration.description["ids_sha256"]
    assert len(plan.search["layers"]) == 3
    assert plan.search["captured_on"] == [{"device": "cpu", "dtype": "float32"}]
    assert not any(layer.share_kv_groups for layer in plan.layers)
    assert all(layer.dense_last == DEFAULT_DENSE_LAST for layer in plan.layers)  # the default plan's tail
    assert set(plan.search["versions"]) == {"longinfer", "torch", "transformers"}
    for layer, summary in zip(plan.layers, plan.search["layers"]):
        assert layer.dense_below == search.DEFAULT_DENSE_BELOW  # no CUDA: the documented default ...
        assert summary["crossover"]["measured"] is False  # ... recorded as not measured
        assert len(summary["recall"]) == len(summary["cost"]) == 4
        assert all(c <= 0.6 for c in summary["cost"]) and all(0 < r <= 1 for r in summary["recall"])
    lines = search.partial_path(out).read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["header", "layer", "layer", "layer"]


def test_search_resumes_after_a_kill(tiny_setup, tmp_path, monkeypatch):
    reference_plan = _run(tiny_setup, tmp_path / "straight.json")
    out = tmp_path / "plan.json"
    real_layer, real_capture = search._search_layer, search.capture_qk
    searched, captured = [], []

    def killed_at_layer_2(captured_layer, layer, *args, **kwargs):
        if layer == 2:
            raise KeyboardInterrupt  # the kill
        searched.append(layer)
        return real_layer(captured_layer, layer, *args, **kwargs)

    monkeypatch.setattr(search, "_search_layer", killed_at_layer_2)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_setup, out)
    assert searched == [0, 1] and not out.exists()

    def spy_layer(captured_layer, layer, *args, **kwargs):
        searched.append(layer)
        return real_layer(captured_layer, layer, *args, **kwargs)

    def spy_capture(model, ids, layers, **kwargs):
        captured.append(sorted(layers))
        return real_capture(model, ids, layers, **kwargs)

    monkeypatch.setattr(search, "_search_layer", spy_layer)
    monkeypatch.setattr(search, "capture_qk", spy_capture)
    searched.clear()
    resumed = _run(tiny_setup, out)
    assert searched == [2] and captured == [[2]]  # finished layers are neither captured nor searched
    assert resumed.layers == reference_plan.layers
    assert resumed.search["layers"] == reference_plan.search["layers"]
    searched.clear(), captured.clear()
    again = _run(tiny_setup, out)  # everything done: no forward pass at all
    assert searched == [] and captured == [] and again.layers == reference_plan.layers


def test_resume_refuses_other_settings_and_drops_a_torn_line(tiny_setup, tmp_path, caplog):
    out = tmp_path / "plan.json"
    _run(tiny_setup, out, layers_per_forward=2)
    partial = search.partial_path(out)
    with pytest.raises(ValueError, match="cost_budget"):
        _run(tiny_setup, out, cost_budget=0.5)
    lines = partial.read_text().splitlines()
    partial.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # killed while writing layer 2
    plan = _run(tiny_setup, out)
    assert "torn" in caplog.text and len(plan.layers) == 3
    assert [json.loads(line)["layer"] for line in partial.read_text().splitlines()[1:]] == [0, 1, 2]
    restarted = _run(tiny_setup, out, cost_budget=0.5, restart=True)
    assert restarted.search["cost_budget"] == 0.5


def test_search_with_shared_kv_groups_gives_groups_one_pattern(tiny_setup, tmp_path):
    plan = _run(tiny_setup, None, share_kv_groups=True, dense_below=777, dense_last=0)
    for layer in plan.layers:
        assert layer.heads[0] == layer.heads[1] and layer.heads[2] == layer.heads[3]
        assert layer.dense_below == 777 and layer.dense_last == 0
        assert layer.share_kv_groups  # the integration runs what was scored: one index per KV group
    assert plan.search["share_kv_groups"] is True


def test_global_search_averages_the_budget_over_all_heads_and_resumes(tiny_setup, tmp_path, caplog):
    """allocation="global": the plan's mean cost over every head of every layer stays within the budget
    (single heads may exceed it), the choice is choose_globally's on the recorded scores (and the log
    reports that choice's mean, not the per-layer provisional one), the layers keep the default dense_below
    (not timed: chosen after all layers), and a resumed search writes the same plan."""
    out = tmp_path / "global.json"
    caplog.set_level(logging.INFO, logger="longinfer")
    plan = _run(tiny_setup, out, cost_budget=0.45, allocation="global")
    costs = [c for summary in plan.search["layers"] for c in summary["cost"]]
    assert sum(costs) / len(costs) <= 0.45 + 1e-9 and plan.search["allocation"] == "global"
    assert f"at mean cost {sum(costs) / len(costs):.4f} (budget 0.4500)" in caplog.text
    assert "the global allocation chooses after the last layer" in caplog.text
    records = [json.loads(line) for line in search.partial_path(out).read_text().splitlines()[1:]]
    scores = [search.LayerScores(torch.tensor(r["all_recall"]), torch.tensor(r["all_cost"])) for r in records]
    _, _, _, candidates = tiny_setup
    assert [[candidates.index(h) for h in layer.heads] for layer in plan.layers] == search.choose_globally(scores, 0.45)
    assert all(layer.dense_below == search.DEFAULT_DENSE_BELOW for layer in plan.layers)
    assert all("global allocation" in s["crossover"]["reason"] for s in plan.search["layers"])
    per_head = _run(tiny_setup, None, cost_budget=0.45)
    mean_recall = lambda p: sum(sum(s["recall"]) for s in p.search["layers"]) / 12  # noqa: E731
    assert mean_recall(plan) >= mean_recall(per_head) - 1e-9  # the per-head choice is one the global one could make
    assert _run(tiny_setup, out, cost_budget=0.45, allocation="global").layers == plan.layers
    with pytest.raises(ValueError, match="allocation must be one of"):
        _run(tiny_setup, None, allocation="uniform")


# --------------------------------------------------------------------------- crossover


def test_crossover_from_timings():
    lengths = [1000, 2000, 4000, 8000]
    # sparse faster everywhere: the shortest length
    assert search.crossover_from_timings(lengths, [4, 8, 16, 32], [1, 2, 4, 8]) == (1000, "below_shortest")
    # ratio 2 at 2000, 0.5 at 4000: log-ratio crosses 0 halfway in log length -> sqrt(2000 * 4000)
    dense_below, how = search.crossover_from_timings(lengths, [1, 1, 1, 1], [4, 2, 0.5, 0.1])
    assert how == "interpolated" and dense_below == math.ceil(math.sqrt(2000 * 4000))
    # slower everywhere but the ratio halves per doubling: extrapolated to 16000
    dense_below, how = search.crossover_from_timings(lengths, [1, 1, 1, 1], [16, 8, 4, 2])
    assert how == "extrapolated" and abs(dense_below - 16000) <= 1
    # no improvement with length: not reached within the extrapolation limit
    assert search.crossover_from_timings(lengths, [1, 1, 1, 1], [2, 2, 2, 2]) == (
        search.CROSSOVER_EXTRAPOLATION * 8000, "not_reached")
    with pytest.raises(ValueError):
        search.crossover_from_timings([], [], [])


def test_dense_below_is_not_measured_without_cuda():
    q = torch.randn(1, 2, 64, 32)
    layer = LayerPlan((HeadPlan.from_params("a_shape"),) * 2)
    dense_below, record = search.measure_dense_below(search.CapturedLayer(q, q, 0.2), layer)
    assert dense_below == search.DEFAULT_DENSE_BELOW
    assert record["measured"] is False and "no CUDA" in record["reason"]


def test_sparse_layer_attention_matches_the_reference():
    """The timed layer path: head groups with different patterns, GQA subsets, vs the masks."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, h, 96, 32, generator=g) for h in (4, 2, 2))
    heads = (HeadPlan.from_params("a_shape", {"sink": 4, "window": 16}),
             HeadPlan.from_params("dense"),
             HeadPlan.from_params("a_shape", {"sink": 4, "window": 16}),
             HeadPlan.from_params("triangle", {"sink": 2, "window": 8, "last_q": 10}))
    out = search.sparse_layer_attention(q, k, v, LayerPlan(heads))
    rows = torch.arange(96)
    for h, head in enumerate(heads):
        spec = get_pattern(head.pattern)
        mask = spec.reference_mask(spec.estimate(q, k, head.config), rows)
        expected = reference.masked_attention(q[:, h:h + 1], k[:, h // 2:h // 2 + 1], v[:, h // 2:h // 2 + 1], mask)
        torch.testing.assert_close(out[:, h:h + 1], expected, atol=2e-3, rtol=2e-3)
    # A whole KV group sharing vertical-slash with share_kv_groups: one union index for heads 2, 3.
    vs = HeadPlan.from_params("vertical_slash", {"num_vertical": 6, "num_slash": 6, "sink": 2, "local": 2,
                                                 "block_size": 16})
    out = search.sparse_layer_attention(q, k, v, LayerPlan(heads[:2] + (vs, vs)), share_kv_groups=True)
    union = get_pattern("vertical_slash").estimate(q[:, 2:], k[:, 1:], vs.config, per_kv_group=True)
    assert union.vertical.shape[1] == 1
    expected = reference.masked_attention(q[:, 2:], k[:, 1:], v[:, 1:], union.mask(rows))
    torch.testing.assert_close(out[:, 2:], expected, atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
def test_dense_below_is_measured_on_cuda():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 8192, 64, generator=g).cuda().half()
    k = torch.randn(1, 2, 8192, 64, generator=g).cuda().half()
    layer = LayerPlan((HeadPlan.from_params("a_shape", {"sink": 64, "window": 512}),) * 4)
    dense_below, record = search.measure_dense_below(search.CapturedLayer(q, k, 0.125), layer,
                                                     lengths=(2048, 4096, 8192), repeats=3, warmup=1)
    assert record["measured"] is True and record["lengths"] == [2048, 4096, 8192]
    assert len(record["dense_ms"]) == len(record["sparse_ms"]) == 3 and dense_below > 0


def test_builtin_plans_load_and_match_their_zoo_models():
    from pathlib import Path

    from longinfer.models import zoo

    paths = sorted((Path(search.__file__).parent / "builtin").glob("*.json"))
    assert paths
    for path in paths:
        plan = Plan.load(path)
        model = zoo.get_model(plan.model_id)
        plan.check_matches({"num_layers": model.num_layers, "num_q_heads": model.num_q_heads,
                            "num_kv_heads": model.num_kv_heads, "head_dim": model.head_dim})
        assert plan.model_revision == f"sha256:{model.file.sha256}"
        assert plan.search["method"] == "search" and len(plan.search["layers"]) == plan.num_layers
