"""RULER-style generators: exact lengths, determinism, answers present in the prompt, scoring."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from longinfer.eval.prompts import Haystack
from longinfer.eval.ruler import RULER_TASKS, RulerTask, generate, string_match_all
from tests.test_eval_fixtures import corpus_text, make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def haystack():
    return Haystack.from_text(corpus_text())


@pytest.mark.parametrize("task", sorted(RULER_TASKS))
@pytest.mark.parametrize("length", [1024, 3000])
def test_exact_length_and_deterministic(task, length, tokenizer, haystack):
    first = generate(task, tokenizer, haystack, length, seed=3, sample=1)
    again = generate(task, tokenizer, haystack, length, seed=3, sample=1)
    other = generate(task, tokenizer, haystack, length, seed=4, sample=1)
    assert len(first.input_ids) == length
    assert first.input_ids == again.input_ids and first.expected == again.expected
    assert first.input_ids != other.input_ids
    assert first.expected and first.max_new_tokens > 0


@pytest.mark.parametrize("task", sorted(RULER_TASKS))
def test_chat_template_prompts_have_exact_length(task, haystack):
    tokenizer = make_tokenizer(chat_template=True)
    prompt = generate(task, tokenizer, haystack, 1500, seed=0, sample=0)
    assert len(prompt.input_ids) == 1500
    assert tokenizer.decode(prompt.input_ids).startswith("<|user|>")


def _context(tokenizer, ids) -> str:
    return tokenizer.decode(ids)


@pytest.mark.parametrize(
    ("task", "needles", "answers"),
    [("niah_single", 1, 1), ("niah_multikey", 4, 1), ("niah_multivalue", 4, 4), ("niah_multiquery", 4, 4)],
)
def test_niah_needles_and_answers(task, needles, answers, tokenizer, haystack):
    prompt = generate(task, tokenizer, haystack, 2000, seed=0, sample=0)
    text = _context(tokenizer, prompt.input_ids)
    facts = re.findall(r"One of the special magic numbers for ([A-Za-z ]+) is: (\d{7})\.", text)
    assert len(facts) == needles
    assert len(prompt.expected) == answers
    values = [v for _, v in facts]
    assert set(prompt.expected) <= set(values)
    asked = {k for k, v in facts if v in prompt.expected}
    question = text[text.rindex("What") :]
    assert all(key in question for key in asked)
    if task == "niah_multikey":  # distractors: the other keys are not asked about
        assert all(key not in question for key, v in facts if v not in prompt.expected)


@pytest.mark.parametrize("task, count, chat", [("niah_multivalue", 4, False), ("vt", 5, True), ("cwe", 0, False)])
def test_piece_spans_are_the_inserted_sentences(task, count, chat, haystack):
    tokenizer = make_tokenizer(chat_template=chat)
    prompt = generate(task, tokenizer, haystack, 2500, seed=0, sample=1, use_chat_template=chat)
    assert len(prompt.pieces) == count
    pattern = r"One of the special magic numbers for [A-Za-z ]+ is: \d{7}\." if task != "vt" else r"VAR [A-Z]{5} = (VAR [A-Z]{5}|\d{5})\."
    for start, stop in prompt.pieces:
        assert re.fullmatch(pattern, tokenizer.decode(prompt.input_ids[start:stop]).strip())
    assert all(a[1] <= b[0] for a, b in zip(prompt.pieces, prompt.pieces[1:]))  # in order, disjoint


def test_variable_tracking_chain_in_order(tokenizer, haystack):
    prompt = generate("vt", tokenizer, haystack, 2500, seed=0, sample=2)
    text = _context(tokenizer, prompt.input_ids)
    names = prompt.expected
    assert len(names) == 5
    first = re.search(rf"VAR {names[0]} = (\d{{5}})\.", text)
    assert first is not None
    positions = [first.start()] + [text.index(f"VAR {b} = VAR {a}.") for a, b in zip(names, names[1:])]
    assert positions == sorted(positions)
    assert f"assigned the value {first.group(1)}" in text[text.rindex("Question") :]


def test_common_words_are_the_most_common(tokenizer, haystack):
    prompt = generate("cwe", tokenizer, haystack, 3000, seed=0, sample=0)
    text = _context(tokenizer, prompt.input_ids)
    items = re.findall(r"^(\d+)\. (\w+)$", text, flags=re.MULTILINE)
    assert [int(n) for n, _ in items] == list(range(1, len(items) + 1))
    counts = Counter(word for _, word in items)
    assert len(prompt.expected) == 10
    lowest_common = min(counts[w] for w in prompt.expected)
    highest_other = max(c for w, c in counts.items() if w not in prompt.expected)
    assert lowest_common > highest_other


def test_frequent_words_are_the_top_three(tokenizer, haystack):
    prompt = generate("fwe", tokenizer, haystack, 3000, seed=0, sample=0)
    text = _context(tokenizer, prompt.input_ids)
    body = text[text.index("coded words.") + len("coded words.") : text.index("Question:")]
    counts = Counter(body.split())
    ranked = counts.most_common()
    assert {w for w, _ in ranked[:3]} == set(prompt.expected)
    assert ranked[2][1] > ranked[3][1]


def test_ruler_task_cases(tokenizer, haystack):
    task = RulerTask(haystack, tasks=["niah_single", "cwe"], samples=2, seed=1)
    cases = task.cases(tokenizer, 1200)
    assert [c.params["subtask"] for c in cases] == ["niah_single"] * 2 + ["cwe"] * 2
    assert len({c.case_id for c in cases}) == 4
    assert all(len(c.input_ids) == 1200 for c in cases)
    assert cases[0].expected != cases[1].expected


@pytest.mark.parametrize(
    ("text", "expected", "score"),
    [
        ("apple, banana and cherry", ("apple", "banana", "cherry"), 1.0),
        ("APPLE and Cherry", ("apple", "banana", "cherry", "durian"), 0.5),
        ("nothing", ("apple",), 0.0),
        ("1234567", ("1234567", "7654321", "1111111"), 1 / 3),
    ],
)
def test_string_match_all(text, expected, score):
    assert string_match_all(text, expected) == pytest.approx(score)


def test_scoring_on_task(haystack):
    task = RulerTask(haystack, tasks=["niah_multivalue"])
    case = type("C", (), {"expected": ("1111111", "2222222")})()
    assert task.score(case, "They are 2222222 and 3333333.") == {"score": 0.5}


def test_bad_arguments(tokenizer, haystack):
    with pytest.raises(ValueError, match="unknown RULER task"):
        RulerTask(haystack, tasks=["qa"])
    with pytest.raises(ValueError, match="unknown RULER task"):
        generate("qa", tokenizer, haystack, 1000, seed=0, sample=0)
    with pytest.raises(ValueError, match="too short"):
        generate("niah_multiquery", tokenizer, haystack, 100, seed=0, sample=0)
    with pytest.raises(ValueError, match="at least one"):
        string_match_all("x", ())


def test_summarize_per_task_and_average():
    from longinfer.eval.ruler import summarize

    records = [
        {"task": "ruler", "method": "dense", "length": 4096, "subtask": "vt", "score": 1.0},
        {"task": "ruler", "method": "dense", "length": 4096, "subtask": "vt", "score": 0.5},
        {"task": "ruler", "method": "dense", "length": 4096, "subtask": "cwe", "score": 0.25},
        {"task": "ruler", "method": "dense", "length": 8192, "subtask": "vt", "score": 1.0},
        {"task": "ruler", "method": "dense", "length": 8192, "subtask": "cwe", "error": "oom"},
        {"task": "needle", "method": "dense", "length": 4096, "score": 1.0},
    ]
    summary = summarize(records)
    assert summary["dense"][4096] == {"vt": 75.0, "cwe": 25.0, "average": 50.0}
    assert summary["dense"][8192]["vt"] == 100.0
    assert summary["dense"][8192]["average"] != summary["dense"][8192]["average"]  # nan: cwe missing


def test_difference_interval_is_a_paired_bootstrap_over_cases():
    from longinfer.eval.ruler import difference_interval

    def record(method, subtask, case, score, length=4096):
        return {"task": "ruler", "method": method, "length": length, "subtask": subtask,
                "case_id": f"{subtask}/{case}", "score": score}

    # vt: sparse loses 0.5 on every case; cwe: the same scores -> the average differs by exactly -25
    records = [record(m, "vt", i, 1.0 if m == "dense" else 0.5) for m in ("dense", "sparse") for i in range(6)]
    records += [record(m, "cwe", i, 0.2 * i) for m in ("dense", "sparse") for i in range(6)]
    assert difference_interval(records, "sparse", "dense", 4096) == (-25.0, -25.0)
    # one case of vt where sparse wins instead: the interval widens around the point estimate
    records[6] = record("sparse", "vt", 0, 1.0)
    low, high = difference_interval(records, "sparse", "dense", 4096)
    point = (sum(-50 for _ in range(5)) / 6) / 2
    assert low < point < high and low >= -25.0 and high <= 0.0
    assert difference_interval(records, "sparse", "dense", 4096) == (low, high)  # seeded
    # a sub-task without a paired case, or another length: no interval
    assert difference_interval(records + [record("dense", "fwe", 0, 1.0)], "sparse", "dense", 4096) is None
    assert difference_interval(records, "sparse", "dense", 8192) is None


def test_reference_logprob_differences_are_paired_and_skip_missing_values():
    from longinfer.eval.ruler import difference_interval, mean_difference, paired_differences

    def record(method, subtask, case, logprob):
        return {"task": "ruler", "method": method, "length": 4096, "subtask": subtask, "case_id": f"{subtask}/{case}",
                "score": 1.0, "reference_logprob": logprob}

    records = [record("dense", "vt", i, -1.0) for i in range(4)] + [record("sparse", "vt", i, -1.5) for i in range(4)]
    records += [record("dense", "cwe", i, -2.0) for i in range(4)] + [record("sparse", "cwe", i, -2.0) for i in range(4)]
    records.append(record("sparse", "cwe", 9, -9.0))  # no dense partner: left out
    records[0] = {**records[0], "reference_logprob": None}  # seeded rows of older runs carry none: left out
    paired = paired_differences(records, "sparse", "dense", 4096, field="reference_logprob")
    assert paired == [[-0.5, -0.5, -0.5], [0.0, 0.0, 0.0, 0.0]]
    assert mean_difference(paired) == -0.25
    assert difference_interval(records, "sparse", "dense", 4096, field="reference_logprob", scale=1.0) == (-0.25, -0.25)
    assert paired_differences(records, "sparse", "dense", 4096, field="missing") is None
