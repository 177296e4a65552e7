"""``benchmarks/cheap_row_scores.py``: its index rule and approximations on random q/k (no model)."""

from __future__ import annotations

import json

import torch

from tests.benchmark_scripts import load_benchmark

script = load_benchmark("cheap_row_scores")


def _qk(n: int = 300, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=generator, dtype=torch.float64),
            torch.randn(n, d, generator=generator, dtype=torch.float64))


def test_a_planted_far_key_is_found_by_its_row_not_by_the_tile_mean():
    """Row 260 alone points at key 7 (far before its band): every-row scores keep it, the tile's mean query (whose
    other 63 rows dilute that direction) does not, and the row's recall shows the difference."""
    q, k = _qk()
    q[256:320] *= 0.1
    k[7] = 0.0
    k[7, 0] = 8.0
    q[260, 0] = 8.0
    kept = script.tile_index(q, k, 260 // 64, 300, 1.0, threshold=16.0, pooled=False)
    pooled = script.tile_index(q, k, 260 // 64, 300, 1.0, threshold=16.0, pooled=True)
    band = 300 - script.LOCAL
    assert kept[7] and not pooled[7]
    assert kept[band:].all() and pooled[band:].all() and kept[: script.SINK].all()
    exact = script.measure_head(q, k, [260], 1.0, "exact", script.scorers([])["exact"], 16.0)
    mean = script.measure_head(q, k, [260], 1.0, "pooled", None, 16.0)
    assert exact["recall"] > 0.99 > 0.5 > mean["recall"]


def test_every_dimension_kept_equals_exact_and_a_tiny_threshold_keeps_everything():
    q, k = _qk(d=8)
    approximations = script.scorers([8])
    rows = [70, 150, 299]
    exact = script.measure_head(q, k, rows, 0.3, "exact", approximations["exact"], 2.0)
    for name in ("dims8", "pca8"):  # all 8 dims, or a rotation of them: the same dot products up to rounding
        assert script.measure_head(q, k, rows, 0.3, name, approximations[name], 2.0) == exact
    for name, scorer in [("pooled", None), *approximations.items()]:
        everything = script.measure_head(q, k, rows, 0.3, name, scorer, 1e-9)
        assert abs(everything["recall"] - 1.0) < 1e-9 and everything["density"] == 1.0


def test_fp8_rounding_keeps_three_mantissa_bits():
    x = torch.linspace(-3.0, 3.0, 1001, dtype=torch.float64)
    rounded = script.to_fp8(x)
    large = x.abs() > 3.0 / 64  # within e4m3's normal range after scaling 3 -> 448
    assert ((rounded[large] - x[large]).abs() <= x[large].abs() / 16 + 1e-12).all()
    assert not torch.equal(rounded, x)


def test_records_resume_and_render(tmp_path):
    path = tmp_path / "records.jsonl"
    records = [{"layer": 9, "head": 8, "variant": v, "threshold": 16.0, "recall": r, "density": 0.1}
               for v, r in (("pooled", 0.4), ("exact", 0.95))]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    done = script.load_done(path)
    assert set(done) == {(9, 8, "pooled", 16.0), (9, 8, "exact", 16.0)}
    table = script.render(list(done.values()), ["pooled", "exact", "fp8"], [16.0], "# t")
    assert "| 9, 8 | 16 | 0.400 / 10.0% | 0.950 / 10.0% | - |" in table
