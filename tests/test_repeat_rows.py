"""Estimation rows at distant repeats (``repeat_rows``): the vectorized rule against a plain-Python
reference, and a patched model passing its token ids down (one shot, chunked, replayed graphs)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from longinfer.patterns import VerticalSlashConfig, estimate_vertical_slash, get_pattern
from longinfer.patterns import vertical_slash as vs
from longinfer.patterns.repeat_rows import SKIP_LAST, estimation_rows, extra_row_count, repeat_distances, repeat_rows

transformers = pytest.importorskip("transformers")

from longinfer.integrations import transformers as lt  # noqa: E402
from longinfer.plans import uniform_plan  # noqa: E402
from tests.test_integration_transformers import SPARSE_VS, make_model, patched, token_ids  # noqa: E402


def reference_distances(row: list[int], ngram: int) -> list[int]:
    first_end: dict[tuple[int, ...], int] = {}
    out = [0] * len(row)
    for end in range(ngram - 1, len(row)):
        gram = tuple(row[end - ngram + 1: end + 1])
        if min(gram) >= 0:
            out[end] = end - first_end.setdefault(gram, end)
    return out


def reference_rows(ids: list[list[int]] | None, q_len: int, k_len: int, base: list[int], count: int, ngram: int,
                   distance: int) -> set[int]:
    """The rule as written: qualified rows thinned by floor(r * count / c), then the eligible rows with
    the largest fractional part of position * golden ratio."""
    eligible = [p for p in range(k_len - q_len, k_len - SKIP_LAST) if p not in set(base)]
    qualified = []
    if ids is not None:
        distances = [reference_distances(row, ngram) for row in ids]
        qualified = [p for p in eligible if any(d[p] >= distance for d in distances)]
    c = max(len(qualified), 1)
    picked = [p for r, p in enumerate(qualified) if r * count // c != (r - 1) * count // c]
    rest = sorted(set(eligible) - set(picked), key=lambda p: -math.fmod(p * (math.sqrt(5) - 1) / 2, 1.0))
    return set(picked) | set(rest[: count - len(picked)])


@pytest.mark.parametrize("ngram", [1, 3, 4, 6])
def test_repeat_distances_match_the_dictionary_scan(ngram):
    ids = torch.randint(0, 6 if ngram < 4 else 3, (3, 700), generator=torch.Generator().manual_seed(ngram))
    ids[1, 50] = -1  # an unknown token: no n-gram through it matches
    ids[2, :5] = -1
    distances = repeat_distances(ids, ngram)
    assert distances.dtype == torch.long and distances.shape == ids.shape
    for b in range(3):
        assert distances[b].tolist() == reference_distances(ids[b].tolist(), ngram)


def test_repeat_distances_of_a_sequence_shorter_than_the_ngram_are_zero():
    assert repeat_distances(torch.tensor([[5, 6]]), 4).tolist() == [[0, 0]]


@pytest.mark.parametrize("q_len, k_len, count, plants", [
    (900, 900, 16, 3),    # more qualified rows than count: thinned
    (700, 1000, 24, 1),   # a chunk over a prefix: few qualify, spread rows fill in
    (500, 500, 8, 0),     # nothing repeats
])
def test_repeat_rows_follow_the_reference_rule(q_len, k_len, count, plants):
    generator = torch.Generator().manual_seed(q_len)
    ids = torch.randint(0, 5000, (2, k_len), generator=generator)
    for plant in range(plants):  # copy a 20-token span 300+ positions later, in one sequence
        start = 30 + 40 * plant
        ids[plant % 2, start + 400: start + 420] = ids[plant % 2, start: start + 20]
    base = vs.estimation_positions(q_len, k_len, 32, "strided")
    got = repeat_rows(ids, q_len, k_len, base, count, ngram=4, distance=300)
    assert got.numel() == count == len(set(got.tolist()))
    assert set(got.tolist()) == reference_rows(ids.tolist(), q_len, k_len, base.tolist(), count, 4, 300)
    without_ids = repeat_rows(None, q_len, k_len, base, count, ngram=4, distance=300)
    assert set(without_ids.tolist()) == reference_rows(None, q_len, k_len, base.tolist(), count, 4, 300)


def test_estimation_rows_are_the_base_plus_the_extra_rows_ascending():
    ids = torch.randint(0, 5000, (1, 1200), generator=torch.Generator().manual_seed(1))
    ids[0, 700:724] = ids[0, 100:124]
    base = vs.estimation_positions(1200, 1200, 64, "strided")
    rows = estimation_rows(base, ids, 1200, 1200, 32, ngram=4, distance=500)
    assert rows.numel() == 96 and bool((rows[1:] > rows[:-1]).all())
    assert set(base.tolist()) <= set(rows.tolist())
    extra = set(rows.tolist()) - set(base.tolist())
    assert set(range(703, 724)) - set(base.tolist()) <= extra  # the 21 repeat ends (4-grams inside the copy)
    assert max(extra) < 1200 - SKIP_LAST
    short = vs.estimation_positions(150, 1200, 64, "strided")
    assert estimation_rows(short, ids, 150, 1200, 32, ngram=4, distance=500) is short  # no room: 150 < 128 + 64
    assert extra_row_count(32, 200, 64) == 8 and extra_row_count(32, 150, 64) == 0


def test_config_checks_name_the_conflicting_fields():
    with pytest.raises(ValueError, match="repeat_rows must be >= 0"):
        VerticalSlashConfig(repeat_rows=-1)
    with pytest.raises(ValueError, match="segments=1"):
        VerticalSlashConfig(repeat_rows=8, segments=2)
    with pytest.raises(ValueError, match="column_q=0"):
        VerticalSlashConfig(repeat_rows=8, column_q=128)
    with pytest.raises(ValueError, match="repeat_ngram and repeat_distance"):
        VerticalSlashConfig(repeat_rows=8, repeat_ngram=0)


def test_positions_are_refused_where_the_estimate_has_several_row_sets():
    q, k = torch.randn(1, 2, 256, 64), torch.randn(1, 2, 256, 64)
    rows = torch.arange(192, 256)
    with pytest.raises(ValueError, match="split_halves"):
        estimate_vertical_slash(q, k, VerticalSlashConfig(budget="coverage", rank="cost", split_halves=True),
                                positions=rows)
    with pytest.raises(ValueError, match="segments"):
        estimate_vertical_slash(q, k, VerticalSlashConfig(segments=2), positions=rows)


def test_repeat_fields_are_written_only_when_set():
    from longinfer.patterns import config_from_params, config_to_params

    assert "repeat_rows" not in config_to_params(VerticalSlashConfig())
    params = config_to_params(VerticalSlashConfig(repeat_rows=64))
    assert params["repeat_rows"] == 64 and config_from_params("vertical_slash", params).repeat_rows == 64


def test_estimate_without_positions_uses_spread_extra_rows():
    """A direct estimator call has no token ids: its extra rows are the spread ones, as given explicitly."""
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 400, 64, generator=generator)
    k = torch.randn(1, 2, 400, 64, generator=generator)
    config = VerticalSlashConfig(budget="coverage", num_vertical=64, num_slash=128, last_q=32,
                                 query_sampling="strided", repeat_rows=16)
    rows = vs.call_estimation_positions(config, 400, 400, "cpu")
    assert rows.numel() == 48
    implicit = estimate_vertical_slash(q, k, config)
    explicit = estimate_vertical_slash(q, k, config, positions=rows)
    torch.testing.assert_close(implicit.vertical, explicit.vertical, rtol=0, atol=0)
    torch.testing.assert_close(implicit.slash, explicit.slash, rtol=0, atol=0)
    plain = estimate_vertical_slash(q, k, VerticalSlashConfig(budget="coverage", num_vertical=64, num_slash=128,
                                                              last_q=32, query_sampling="strided"))
    assert not torch.equal(plain.slash, implicit.slash)  # the extra rows change the estimate


# --------------------------------------------------------------------------- a patched model passes its ids

REPEAT_VS = dict(SPARSE_VS, repeat_rows=8, repeat_distance=64)


def planted(length: int, copy_to: int, seed: int = 0) -> torch.Tensor:
    """Token ids with positions 20..35 copied to ``copy_to``: the copy's rows end distant repeats."""
    ids = token_ids(1, length, seed)
    ids[0, copy_to: copy_to + 16] = ids[0, 20:36]
    return ids


@pytest.fixture
def recorded_positions(monkeypatch):
    """The ``positions`` each vertical-slash estimate of the patched model received (None: its own)."""
    seen: list[torch.Tensor | None] = []
    real = vs.estimate_masses

    def spy(q, k, config, **kwargs):
        seen.append(kwargs.get("positions"))
        return real(q, k, config, **kwargs)

    monkeypatch.setattr(vs, "estimate_masses", spy)
    return seen


def expected_rows(ids: torch.Tensor, q_len: int, config: VerticalSlashConfig) -> torch.Tensor:
    k_len = ids.shape[1]
    base = vs.estimation_positions(q_len, k_len, config.last_q, config.query_sampling)
    return estimation_rows(base, ids, q_len, k_len, config.repeat_rows, ngram=config.repeat_ngram,
                           distance=config.repeat_distance)


def test_patched_model_estimates_at_the_repeats_of_its_input(recorded_positions):
    model = make_model("llama", num_hidden_layers=2)
    ids = planted(320, 150)
    plan = uniform_plan(model.config, "vertical_slash", REPEAT_VS)
    config = plan.layers[0].heads[0].config
    with patched(model, plan):
        with torch.no_grad():
            model(ids)
        assert len(model._forward_pre_hooks) == 1
    assert len(model._forward_pre_hooks) == 0  # unpatch removes the hook
    want = expected_rows(ids, 320, config)
    assert len(recorded_positions) == 2
    for got in recorded_positions:
        assert got.tolist() == want.tolist()
    repeats = set(want.tolist()) - set(vs.estimation_positions(320, 320, 64, "query_sampling" and "last").tolist())
    assert len(set(range(153, 166)) & repeats) == 8  # all 8 extra rows end repeats of the copied span


def test_a_chunk_over_a_cached_prefix_sees_the_prefix_ids(recorded_positions):
    model = make_model("llama", num_hidden_layers=1)
    ids = planted(512, 300)
    plan = uniform_plan(model.config, "vertical_slash", REPEAT_VS)
    config = plan.layers[0].heads[0].config
    cache = transformers.DynamicCache(config=model.config)
    with patched(model, plan), torch.no_grad():
        model(ids[:, :160], past_key_values=cache, use_cache=True)
        model(ids[:, 160:], past_key_values=cache, use_cache=True)
    assert recorded_positions[0] is None  # 160 queries: no room for extra rows (160 - 128 - 64 < 0)
    want = expected_rows(ids, 352, config)
    assert recorded_positions[1].tolist() == want.tolist()
    assert set(range(303, 316)) & set(want.tolist())  # the copy's repeat ends are among them


def test_a_padded_batch_estimates_each_sequence_on_its_own_ids(recorded_positions):
    """Left padding: each sequence runs on its valid span, with the rows its own ids give (the same
    as that sequence alone), so the logits equal the unpadded runs."""
    model = make_model("llama", num_hidden_layers=1)
    plan = uniform_plan(model.config, "vertical_slash", REPEAT_VS)
    config = plan.layers[0].heads[0].config
    sequences = [planted(360, 150)[0], planted(320, 200, seed=1)[0]]
    batch = torch.zeros(2, 360, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for b, seq in enumerate(sequences):
        batch[b, 360 - seq.numel():], mask[b, 360 - seq.numel():] = seq, 1
    with patched(model, plan), torch.no_grad():
        padded = model(batch, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        alone = [model(seq[None]).logits for seq in sequences]
    for b, seq in enumerate(sequences):
        assert recorded_positions[b].tolist() == expected_rows(seq[None], seq.numel(), config).tolist()
        torch.testing.assert_close(padded[b, mask[b].bool()], alone[b][0], atol=5e-5, rtol=1e-4)


def test_generate_keeps_the_history_of_prompt_and_decoded_tokens():
    """generate(): the prefill records the prompt, each decoding step appends its token (the last
    generated token is never fed back)."""
    from tests.test_integration_transformers import greedy

    model = make_model("llama", num_hidden_layers=1)
    ids = planted(320, 150)
    plan = uniform_plan(model.config, "vertical_slash", REPEAT_VS)
    with patched(model, plan):
        new = greedy(model, ids, 4)
        history = model.model.layers[0].self_attn._longinfer_runtime.tokens
        assert history.ids.tolist() == torch.cat([ids, new[:, :-1]], 1).tolist()


def test_embeddings_instead_of_ids_get_spread_rows_with_a_warning(recorded_positions, caplog, monkeypatch):
    from longinfer.integrations import tokens

    monkeypatch.setattr(tokens, "_unknown_ids_logged", [])
    model = make_model("llama", num_hidden_layers=1)
    ids = planted(320, 150)
    plan = uniform_plan(model.config, "vertical_slash", REPEAT_VS)
    config = plan.layers[0].heads[0].config
    with patched(model, plan), torch.no_grad(), caplog.at_level(logging.WARNING):
        model(inputs_embeds=model.get_input_embeddings()(ids))
    assert "token ids of this call are unknown" in caplog.text
    assert recorded_positions[0].tolist() == vs.call_estimation_positions(config, 320, 320, "cpu").tolist()


def test_replayed_calls_take_each_forwards_rows():
    """Stand-in graphs (tests/test_graphs.py): the rows are a graph input, so a replay in a second
    forward with other repeats gives that forward's eager logits."""
    from tests.test_graphs import StandInCapture

    model = make_model("llama", num_hidden_layers=3)
    plan = uniform_plan(model.config, "vertical_slash", REPEAT_VS)
    first, second = planted(320, 150), planted(320, 100, seed=1)
    graphs = lt.CallGraphs(capture=StandInCapture(), device_types=("cpu",))
    with patched(model, plan, backend="triton", cuda_graphs=graphs), torch.no_grad():
        model(first)
        replayed = model(second).logits
    assert (graphs.captures, graphs.replays) == (1, 5)  # forward 1: layers 1-2, forward 2: all three
    with patched(model, plan, backend="triton", cuda_graphs=False), torch.no_grad():
        eager = model(second).logits
    torch.testing.assert_close(replayed, eager, atol=0, rtol=0)


def test_registry_estimate_takes_positions():
    assert get_pattern("vertical_slash").estimate is estimate_vertical_slash


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_built_on_cuda_match_the_cpu_rows_and_both_estimate_backends_agree(dtype):
    """The row choice on the GPU equals the CPU one; the Triton estimate of those rows (as a patched
    model runs it: no host check) matches the torch reference. Tolerance as in
    tests/test_estimate_kernel.py (2e-6 absolute + 1e-5 relative): the masses are means of softmax
    probabilities (<= 1) summed in float32 in another order; both paths take the same bfloat16
    values (the products of two bfloat16 numbers are exact in float32)."""
    ids = planted(5000, 3000)
    config = VerticalSlashConfig(budget="coverage", num_vertical=512, num_slash=1024, last_q=64,
                                 query_sampling="strided", repeat_rows=64, repeat_distance=1024)
    on_cpu = vs.call_estimation_positions(config, 5000, 5000, "cpu", ids)
    on_gpu = vs.call_estimation_positions(config, 5000, 5000, "cuda", ids.cuda())
    assert on_gpu.tolist() == on_cpu.tolist() and on_cpu.numel() == 128
    generator = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 12, 5000, 128, device="cuda", generator=generator).to(dtype)
    k = torch.randn(1, 2, 5000, 128, device="cuda", generator=generator).to(dtype)
    fast = vs.estimate_masses(q, k, config, positions=on_gpu, check_positions=False, backend="triton")
    slow = vs.estimate_masses(q, k, config, positions=on_gpu, backend="torch")
    for got, want in zip(fast, slow):
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
