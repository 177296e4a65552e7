"""benchmarks/needle_rows_missing.py: key categories and the dropped mass per category."""

from __future__ import annotations

import torch

from tests.benchmark_scripts import load_benchmark


def test_key_categories_follow_the_pieces_and_the_row():
    script = load_benchmark("needle_rows_missing")
    n = 3000
    pieces = [(100, 110), (2500, 2510)]
    rows = torch.tensor([105, 2505])
    category = script.key_categories(rows, n, pieces)
    name = {i: c for i, c in enumerate(script.CATEGORIES)}
    assert name[int(category[0, 103])] == "own piece" and name[int(category[1, 103])] == "other pieces"
    assert name[int(category[1, 2502])] == "own piece" and name[int(category[0, 2502])] == "other pieces"
    assert name[int(category[1, 10])] == "sink" and name[int(category[0, 10])] == "sink"
    assert name[int(category[1, 2000])] == "recent" and name[int(category[1, 1000])] == "far"
    assert name[int(category[0, 90])] == "recent"  # before the row, within 1,024 keys, outside the pieces


def test_dropped_mass_is_the_attention_outside_the_kept_keys():
    """Per category: the attention there, and the part the mask leaves out; all dropped = 1 - recall."""
    script = load_benchmark("needle_rows_missing")
    gen = torch.Generator().manual_seed(0)
    n = 1500
    rows = torch.tensor([1200, 1300])
    category = script.key_categories(rows, n, [(1190, 1210), (1290, 1310)])
    probs = torch.softmax(torch.randn(3, 2, n, generator=gen), -1)
    kept = torch.rand(3, 2, n, generator=gen) < 0.5
    attention, dropped = script.mass_by_category(probs, kept, category)
    assert abs(sum(attention) - 1.0) < 1e-5
    assert abs(sum(dropped) - float((probs * ~kept).sum() / 6)) < 1e-5
    assert all(0 <= d <= a + 1e-7 for a, d in zip(attention, dropped))
    own = category == script.CATEGORIES.index("own piece")
    assert abs(dropped[0] - float((probs * ~kept * own).sum() / 6)) < 1e-6


def test_row_probabilities_are_the_causal_softmax_with_grouped_keys():
    script = load_benchmark("needle_rows_missing")
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 4, 50, 8, generator=gen), torch.randn(1, 2, 50, 8, generator=gen)
    rows = torch.tensor([3, 49])
    probs = script.row_probabilities(q, k, rows, 0.5)
    assert probs.shape == (4, 2, 50)
    expected = torch.softmax(q[0, 3, 3] @ k[0, 1, :4].T * 0.5, -1)  # head 3 reads KV head 1, row 3 sees keys 0..3
    torch.testing.assert_close(probs[3, 0, :4], expected)
    assert float(probs[3, 0, 4:].sum()) == 0.0
