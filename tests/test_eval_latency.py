"""TTFT measurement on CPU (wall clock) and the crossover rule."""

from __future__ import annotations

import pytest
import torch

from longinfer.eval.latency import LatencyTask, crossover_length, time_to_first_token
from longinfer.eval.prompts import Haystack
from tests.test_eval_fixtures import corpus_text, make_tiny_llama, make_tokenizer


@pytest.mark.parametrize(
    ("dense", "sparse", "expected"),
    [
        ({1: 1.0, 2: 2.0, 4: 4.0, 8: 8.0}, {1: 1.5, 2: 2.5, 4: 3.0, 8: 4.0}, 4),
        (
            {1: 1.0, 2: 2.0, 4: 4.0},
            {1: 0.5, 2: 2.5, 4: 3.0},
            4,
        ),  # a faster short length before a slower one does not count
        ({1: 1.0, 2: 2.0}, {1: 0.5, 2: 1.0}, 1),
        ({1: 1.0, 2: 2.0}, {1: 2.0, 2: 3.0}, None),
        ({1: 1.0, 2: 2.0, 4: 4.0}, {2: 1.0}, 2),  # only common lengths count
        ({}, {}, None),
    ],
)
def test_crossover_length(dense, sparse, expected):
    assert crossover_length(dense, sparse) == expected


def test_ttft_on_cpu_returns_wall_clock_median():
    model = make_tiny_llama(vocab_size=512)
    ids = torch.randint(0, 512, (1, 128), generator=torch.Generator().manual_seed(0))
    measured = time_to_first_token(model, ids, repeats=3, warmup=1)
    assert measured.timer == "cpu-wall"
    assert measured.peak_memory_bytes is None
    assert len(measured.times_s) == 3 and all(t > 0 for t in measured.times_s)
    assert measured.median_s == sorted(measured.times_s)[1]
    with pytest.raises(ValueError, match="repeats"):
        time_to_first_token(model, ids, repeats=0)


def test_latency_task_case_and_record():
    tokenizer = make_tokenizer()
    task = LatencyTask(Haystack.from_text(corpus_text()), repeats=2, warmup=0)
    (case,) = task.cases(tokenizer, 200)
    assert len(case.input_ids) == 200 and case.case_id == "L200/r2"
    result = task.run_case(make_tiny_llama(vocab_size=len(tokenizer)), tokenizer, case)
    assert set(result) == {"ttft_s", "ttft_all_s", "peak_memory_bytes", "timer"}
    assert len(result["ttft_all_s"]) == 2
