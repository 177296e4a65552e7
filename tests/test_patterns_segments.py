"""Segmented vertical-slash estimation: per-segment indices, exact reference masks, kernel runs."""

import dataclasses

import pytest
import torch

from longinfer.ops import reference
from longinfer.patterns import VerticalSlashConfig, estimate_vertical_slash, get_pattern
from longinfer.patterns.recall import attention_recall
from longinfer.patterns.vertical_slash import (
    SegmentedVerticalSlashSelection,
    VerticalSlashSelection,
    segment_bounds,
)

FIXED = VerticalSlashConfig(num_vertical=12, num_slash=10, last_q=16, sink=2, local=3, block_size=32)
COVERAGE = VerticalSlashConfig(num_vertical=40, num_slash=40, last_q=16, sink=2, local=3, budget="coverage",
                               tau=0.8, min_vertical=3, min_slash=3, block_size=32)


def _qkv(n_q: int, n_k: int, hq: int = 4, hkv: int = 2, d: int = 32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, n_q, d, generator=gen)
    k = torch.randn(1, hkv, n_k, d, generator=gen)
    v = torch.randn(1, hkv, n_k, d, generator=gen)
    return q, k, v


def _same_selection(a: VerticalSlashSelection, b: VerticalSlashSelection) -> None:
    assert a.k_len == b.k_len and a.block_size == b.block_size
    assert torch.equal(a.vertical, b.vertical)
    assert torch.equal(a.slash, b.slash)


def test_segment_bounds_block_aligned_and_short_inputs_get_fewer():
    assert segment_bounds(256, 256, 4, 32) == ((0, 64), (64, 128), (128, 192), (192, 256))
    # queries after a 100-token prefix: the first start is the prefix end, inner cuts on tiles
    bounds = segment_bounds(156, 256, 2, 32)
    assert bounds == ((100, 192), (192, 256))
    assert segment_bounds(40, 40, 8, 32) == ((0, 32), (32, 40))
    assert segment_bounds(20, 20, 8, 32) == ((0, 20),)
    with pytest.raises(ValueError, match="segments"):
        VerticalSlashConfig(segments=0)


@pytest.mark.parametrize("config", [FIXED, COVERAGE])
def test_one_segment_is_the_unsegmented_estimate(config):
    q, k, _ = _qkv(192, 256)
    plain = estimate_vertical_slash(q, k, config)
    assert type(plain) is VerticalSlashSelection
    # the last segment uses the same last queries and all keys: the unsegmented index
    segmented = estimate_vertical_slash(q, k, dataclasses.replace(config, segments=3))
    assert isinstance(segmented, SegmentedVerticalSlashSelection) and len(segmented.parts) == 3
    _same_selection(segmented.parts[-1], plain)
    # too short to cut: one segment, still the unsegmented index
    short_q, short_k, _ = _qkv(24, 24)
    one = estimate_vertical_slash(short_q, short_k, dataclasses.replace(config, segments=4))
    assert one.bounds == ((0, 24),)
    _same_selection(one.parts[0], estimate_vertical_slash(short_q, short_k, config))


@pytest.mark.parametrize("config", [FIXED, COVERAGE])
@pytest.mark.parametrize("per_kv_group", [False, True])
def test_each_segment_is_the_estimate_on_that_segment_alone(config, per_kv_group):
    q, k, _ = _qkv(224, 256, seed=1)
    selection = estimate_vertical_slash(q, k, dataclasses.replace(config, segments=3), per_kv_group=per_kv_group)
    offset = 256 - 224
    assert selection.bounds[0][0] == offset and selection.bounds[-1][1] == 256
    for (start, end), part in zip(selection.bounds, selection.parts):
        alone = estimate_vertical_slash(q[:, :, start - offset: end - offset], k[:, :, :end], config,
                                        per_kv_group=per_kv_group)
        _same_selection(part, alone)
    # the reference mask of a row is its segment's mask
    rows = torch.tensor([0, 31, 32, 100, 127, 128, 200, 255])
    mask = selection.mask(rows)
    assert mask.shape == (1, 2 if per_kv_group else 4, len(rows), 256)
    for index, row in enumerate(rows.tolist()):
        number = max(i for i, (start, _) in enumerate(selection.bounds) if start <= row or i == 0)
        part = selection.parts[number]
        expected = reference.vertical_slash_mask(part.vertical, part.slash, 256, 32, rows=rows[index: index + 1])
        assert torch.equal(mask[:, :, index: index + 1], expected)


@pytest.mark.parametrize("n_q,n_k", [(256, 256), (176, 256)])
def test_segmented_kernel_run_matches_masked_attention(n_q, n_k):
    q, k, v = _qkv(n_q, n_k, seed=2)
    config = dataclasses.replace(FIXED, segments=4)
    spec = get_pattern("vertical_slash")
    selection = spec.estimate(q, k, config)
    assert len(selection.parts) > 1
    out = spec.run(q, k, v, selection, config)
    rows = torch.arange(n_k - n_q, n_k)
    expected = reference.masked_attention(q, k, v, spec.reference_mask(selection, rows), rows=rows)
    assert out.shape == q.shape
    torch.testing.assert_close(out.float(), expected, atol=2e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="estimate it on these tensors"):
        spec.run(q[:, :, 1:], k, v, selection, config)


def test_planted_pattern_changing_halfway_is_found_per_segment():
    """Queries of the first half attend key 40, those of the second half key 300."""
    n, d = 512, 32
    gen = torch.Generator().manual_seed(3)
    k = 0.1 * torch.randn(1, 1, n, d, generator=gen)
    q = 0.1 * torch.randn(1, 1, n, d, generator=gen)
    first, second = torch.zeros(d), torch.zeros(d)
    first[0], second[1] = 1.0, 1.0
    k[0, 0, 40] += 8 * first
    k[0, 0, 300] += 8 * second
    q[0, 0, :256] += 8 * first
    q[0, 0, 256:] += 8 * second
    config = VerticalSlashConfig(num_vertical=1, num_slash=1, last_q=32, sink=0, local=1, block_size=32)
    plain = estimate_vertical_slash(q, k, config)
    assert plain.vertical.flatten().tolist() == [300]
    segmented = estimate_vertical_slash(q, k, dataclasses.replace(config, segments=2))
    assert segmented.bounds == ((0, 256), (256, 512))
    assert [part.vertical.flatten().tolist() for part in segmented.parts] == [[40], [300]]
    rows = torch.arange(64, 256, 7)  # first-half rows (after key 40)
    plain_recall = attention_recall(q, k, plain, rows).mean_recall()
    segmented_recall = attention_recall(q, k, segmented, rows).mean_recall()
    assert plain_recall < 0.5
    assert segmented_recall > 0.9


def test_segmented_plan_runs_in_transformers_on_both_backends(tiny_llama_logits):
    """A tiny Llama with a segmented vertical-slash plan: Triton and torch paths agree, and the
    segmented index changes the outputs of the first segment's rows only."""
    params = {"num_vertical": 8, "num_slash": 8, "sink": 4, "local": 8, "last_q": 32}
    outputs = {name: tiny_llama_logits({**params, "segments": segments}, backend)
               for name, segments, backend in (("plain", 1, "triton"), ("seg", 2, "triton"), ("seg-torch", 2, "torch"))}
    torch.testing.assert_close(outputs["seg"], outputs["seg-torch"], atol=2e-5, rtol=1e-4)
    # the last segment (rows 128..255) uses the unsegmented index; the first one its own
    torch.testing.assert_close(outputs["seg"][:, 128:], outputs["plain"][:, 128:], atol=2e-5, rtol=1e-4)
    assert (outputs["seg"][:, 64:128] - outputs["plain"][:, 64:128]).abs().max() > 1e-3
