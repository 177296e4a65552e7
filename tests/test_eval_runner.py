"""The runner end to end on a tiny random Llama: records, resume after a kill, method switching."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from longinfer.eval.cases import greedy_generate
from longinfer.eval.methods import AttentionMethod, DenseMethod
from longinfer.eval.needle import NeedleTask, contains_exact_value
from longinfer.eval.prompts import Haystack
from longinfer.eval.report import render_report
from longinfer.eval.results import ResultStore
from longinfer.eval.runner import run_task
from tests.test_eval_fixtures import corpus_text, make_tiny_llama, make_tokenizer

LENGTHS = [256, 384]


class CountingMethod(AttentionMethod):
    """SDPA through a registered custom attention function that counts its calls."""

    name = "counting"

    def __init__(self) -> None:
        self.calls = 0

    @contextlib.contextmanager
    def activate(self, model):
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        def counting_attention(*args, **kwargs):
            self.calls += 1
            return sdpa_attention_forward(*args, **kwargs)

        AttentionInterface.register("eval_test_counting", counting_attention)
        # Without its mask function a chunk after a cached prefix would get no mask, and SDPA's
        # is_causal aligns top-left: wrong for the reference answer scored over the prompt's cache.
        AttentionMaskInterface.register("eval_test_counting", sdpa_mask)
        previous = model.config._attn_implementation
        model.set_attn_implementation("eval_test_counting")
        try:
            yield
        finally:
            model.set_attn_implementation(previous)


class Interrupted(Exception):
    pass


class StopAfter:
    """Wraps a task; raises after ``n`` cases, like a run killed in the middle."""

    def __init__(self, task, n: int) -> None:
        self.task, self.n, self.name = task, n, task.name

    def cases(self, tokenizer, length):
        return self.task.cases(tokenizer, length)

    def run_case(self, model, tokenizer, case):
        if self.n == 0:
            raise Interrupted
        self.n -= 1
        return self.task.run_case(model, tokenizer, case)


class Counting:
    """Wraps a task and counts the cases it runs."""

    def __init__(self, task) -> None:
        self.task, self.ran, self.name = task, [], task.name

    def cases(self, tokenizer, length):
        return self.task.cases(tokenizer, length)

    def run_case(self, model, tokenizer, case):
        self.ran.append(case.case_id)
        return self.task.run_case(model, tokenizer, case)


@pytest.fixture(scope="module")
def setup():
    tokenizer = make_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer))
    task = NeedleTask(
        Haystack.from_text(corpus_text()), depths=[0.0, 1.0], needles_per_cell=2, max_new_tokens=4
    )
    return tokenizer, model, task


def test_run_resume_and_report(setup, tmp_path):
    tokenizer, model, task = setup
    out = tmp_path / "needle.jsonl"
    counting = CountingMethod()
    methods = [DenseMethod(), counting]
    total = len(LENGTHS) * 4 * len(methods)

    with pytest.raises(Interrupted):
        run_task(StopAfter(task, 5), model, tokenizer, methods, LENGTHS, out_jsonl=out, model_name="tiny")
    assert len(ResultStore(out).records()) == 5
    # the kill also cut the last record in half
    out.write_bytes(out.read_bytes()[:-40])
    assert len(ResultStore(out).records()) == 4

    resumed = Counting(task)
    summary = run_task(
        resumed,
        model,
        tokenizer,
        methods,
        LENGTHS,
        out_jsonl=out,
        model_name="tiny",
        extra={"command": "test"},
    )
    assert summary.ran == total - 4 and summary.skipped == 4 and summary.oom == 0
    assert len(resumed.ran) == total - 4
    records = ResultStore(out).records()
    assert len(records) == total
    assert len({(r["method"], r["case_id"]) for r in records}) == total
    assert counting.calls > 0
    assert model.config._attn_implementation == "sdpa"

    cases = {c.case_id: c for n in LENGTHS for c in task.cases(tokenizer, n)}
    for record in records:
        case = cases[record["case_id"]]
        assert record["n_input_tokens"] == record["length"] == len(case.input_ids)
        assert record["passed"] == contains_exact_value(record["generated"], case.expected[0])
        assert record["versions"]["torch"] == torch.__version__
        assert record["depth"] in (0.0, 1.0) and "date" in record and record["timer"] == "cpu-wall"
        assert record["reference"] == " " + case.expected[0] and record["reference_logprob"] < 0
    # both methods are SDPA underneath: the same prompt's reference log-probability agrees (float32;
    # bit for bit here, so a wrong mask on the cached chunk, which moved it by ~0.3 nats, shows)
    by_case: dict[str, list[float]] = {}
    for record in records:
        by_case.setdefault(record["case_id"], []).append(record["reference_logprob"])
    assert all(len(pair) == 2 and pair[0] == pytest.approx(pair[1], abs=1e-5) for pair in by_case.values())
    # both methods are SDPA underneath: the recorded greedy answers equal a direct generation
    first = cases[records[0]["case_id"]]
    direct = greedy_generate(model, tokenizer, first.input_ids, 4).text
    assert {r["generated"] for r in records if r["case_id"] == first.case_id} == {direct}

    again = Counting(task)
    summary = run_task(again, model, tokenizer, methods, LENGTHS, out_jsonl=out, model_name="tiny")
    assert summary.ran == 0 and summary.skipped == total and again.ran == []

    report = render_report(out)
    text = report.read_text()
    assert "| length | depth | dense | counting |" in text
    assert "- command: `test`" in text
    assert (tmp_path / "needle_dense.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "needle_counting.png").exists()


def test_changed_prompts_are_not_mixed(setup, tmp_path):
    tokenizer, model, task = setup
    out = tmp_path / "needle.jsonl"
    small = NeedleTask(Haystack.from_text(corpus_text()), depths=[0.5], needles_per_cell=1, max_new_tokens=2)
    run_task(small, model, tokenizer, [DenseMethod()], [256], out_jsonl=out, model_name="tiny")
    other_text = NeedleTask(
        Haystack.from_text(corpus_text(seed=1)), depths=[0.5], needles_per_cell=1, max_new_tokens=2
    )
    with pytest.raises(ValueError, match="different prompt"):
        run_task(other_text, model, tokenizer, [DenseMethod()], [256], out_jsonl=out, model_name="tiny")


class PlanDigestMethod(CountingMethod):
    """SDPA recorded under one plan digest (``None``: a record from before digests existed)."""

    def __init__(self, digest: str | None) -> None:
        super().__init__()
        self.digest = digest

    def describe(self):
        return {} if self.digest is None else {"plan_digest": self.digest}


def test_cases_of_another_plan_are_not_mixed(setup, tmp_path):
    tokenizer, model, task = setup
    out = tmp_path / "needle.jsonl"
    small = NeedleTask(Haystack.from_text(corpus_text()), depths=[0.5], needles_per_cell=1, max_new_tokens=2)
    run_task(small, model, tokenizer, [PlanDigestMethod("aaaa")], [256], out_jsonl=out, model_name="tiny")
    assert ResultStore(out).records()[0]["plan_digest"] == "aaaa"
    same = run_task(small, model, tokenizer, [PlanDigestMethod("aaaa")], [256], out_jsonl=out, model_name="tiny")
    assert same.skipped == 1 and same.ran == 0
    with pytest.raises(ValueError, match="of method counting run with another plan .digest aaaa vs bbbb."):
        run_task(small, model, tokenizer, [PlanDigestMethod("bbbb")], [256], out_jsonl=out, model_name="tiny")
    old = tmp_path / "old.jsonl"  # records without a digest cannot be checked: taken as they are
    run_task(small, model, tokenizer, [PlanDigestMethod(None)], [256], out_jsonl=old, model_name="tiny")
    resumed = run_task(small, model, tokenizer, [PlanDigestMethod("bbbb")], [256], out_jsonl=old, model_name="tiny")
    assert resumed.skipped == 1


def test_oom_is_recorded_and_the_run_goes_on(setup, tmp_path):
    tokenizer, model, task = setup

    class OomAtLongest:
        name = "needle"

        def cases(self, tokenizer, length):
            return task.cases(tokenizer, length)[:1]

        def run_case(self, model, tokenizer, case):
            if case.length == 384:
                raise torch.OutOfMemoryError("fake")
            return task.run_case(model, tokenizer, case)

    out = tmp_path / "r.jsonl"
    summary = run_task(
        OomAtLongest(), model, tokenizer, [DenseMethod()], LENGTHS, out_jsonl=out, model_name="tiny"
    )
    assert summary.ran == 2 and summary.oom == 1
    errors = [json.loads(line).get("error") for line in out.read_text().splitlines()]
    assert errors == [None, "oom"]


def test_reserved_fields_are_protected(setup, tmp_path):
    tokenizer, model, task = setup
    with pytest.raises(ValueError, match="reserved"):
        run_task(
            task,
            model,
            tokenizer,
            [DenseMethod()],
            [256],
            out_jsonl=tmp_path / "r.jsonl",
            model_name="tiny",
            extra={"model": "x"},
        )
    with pytest.raises(ValueError, match="at least one"):
        run_task(task, model, tokenizer, [], [256], out_jsonl=tmp_path / "r.jsonl", model_name="tiny")


def test_reference_logprob_matches_a_full_forward(setup):
    """The reference answer scored on the generation's cache equals log-softmax of one forward over
    prompt + reference (float32 on the CPU: the same sums in another order, well below 1e-4 nats)."""
    tokenizer, model, task = setup
    case = task.cases(tokenizer, 256)[0]
    reference = tokenizer.encode(" 12345 and more", add_special_tokens=False)
    assert len(reference) > 2
    answer = greedy_generate(model, tokenizer, case.input_ids, 4, reference_ids=reference)
    plain = greedy_generate(model, tokenizer, case.input_ids, 4)
    assert answer.text == plain.text and plain.reference_logprob is None
    ids = torch.tensor([case.input_ids + reference])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    prompt = len(case.input_ids)
    expected = sum(logprobs[prompt - 1 + i, token].item() for i, token in enumerate(reference))
    assert answer.reference_logprob == pytest.approx(expected, abs=1e-4)
    single = greedy_generate(model, tokenizer, case.input_ids, 4, reference_ids=reference[:1])
    assert single.reference_logprob == pytest.approx(logprobs[prompt - 1, reference[0]].item(), abs=1e-4)


def test_reference_logprob_through_the_integration_matches_dense(setup, tmp_path):
    """Under longinfer with a plan that runs every layer dense, the reference answer's chunk over the
    cached prompt gets the integration's own mask (bottom-right causal): the same value as SDPA."""
    from longinfer.eval.methods import method_from_spec
    from longinfer.plans import default_plan_for

    tokenizer, model, task = setup
    case = task.cases(tokenizer, 384)[1]
    reference = tokenizer.encode(task.reference_answer(case), add_special_tokens=False)
    plan = tmp_path / "dense.json"
    default_plan_for(model.config, model_id="tiny", dense_below=10**6, dense_last=64).save(plan)
    values = []
    for method in (DenseMethod(), method_from_spec(f"longinfer:{plan}")):
        with method.activate(model):
            values.append(greedy_generate(model, tokenizer, case.input_ids, 4, reference_ids=reference).reference_logprob)
    assert values[0] == pytest.approx(values[1], abs=1e-5)
