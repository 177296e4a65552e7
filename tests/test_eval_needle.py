"""Needle prompts: exact lengths, needle at the requested depth, determinism, exact-value scoring."""

from __future__ import annotations

import pytest

from longinfer.eval.needle import Needle, NeedleTask, build_needle_prompt, contains_exact_value
from longinfer.eval.prompts import Haystack, insert_pieces, make_prompt_frame
from tests.test_eval_fixtures import corpus_text, make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def haystack():
    return Haystack.from_text(corpus_text())


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("length", [300, 777, 2048])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_prompt_has_exact_length_and_needle_at_depth(chat, length, depth, haystack):
    tokenizer = make_tokenizer(chat_template=chat)
    needle = Needle("Lisbon", "4821093")
    prompt = build_needle_prompt(tokenizer, haystack, length, depth, needle)
    assert len(prompt.input_ids) == length
    needle_ids = tokenizer.encode(" " + needle.sentence, add_special_tokens=False)
    assert prompt.input_ids[prompt.needle_start : prompt.needle_start + len(needle_ids)] == needle_ids
    # the needle moves at most to the nearest sentence end: a few tokens on these short sentences
    assert abs(prompt.depth_actual - depth) <= 20 / length
    text = tokenizer.decode(prompt.input_ids)
    assert text.count(needle.sentence) == 1
    assert text.rstrip().endswith(needle.answer_prefix)
    if chat:
        assert text.startswith("<|user|>") and "<|assistant|>" in text
    else:
        assert prompt.input_ids[0] == tokenizer.bos_token_id


def test_needle_follows_a_sentence_end(tokenizer, haystack):
    prompt = build_needle_prompt(tokenizer, haystack, 1500, 0.37, Needle("Oslo", "1000001"))
    before = tokenizer.decode(prompt.input_ids[: prompt.needle_start])
    assert before.rstrip(" ").endswith((".", "\n"))


def test_depth_order_in_the_text(tokenizer, haystack):
    starts = [
        build_needle_prompt(tokenizer, haystack, 1024, d, Needle("Oslo", "1000001")).needle_start
        for d in (0.1, 0.5, 0.9)
    ]
    assert starts[0] < starts[1] < starts[2]


def test_task_cases_are_deterministic_and_seeded(tokenizer, haystack):
    task = NeedleTask(haystack, depths=[0.0, 0.5], needles_per_cell=3, seed=7)
    first = task.cases(tokenizer, 600)
    second = NeedleTask(haystack, depths=[0.0, 0.5], needles_per_cell=3, seed=7).cases(tokenizer, 600)
    other_seed = NeedleTask(haystack, depths=[0.0, 0.5], needles_per_cell=3, seed=8).cases(tokenizer, 600)
    assert len(first) == 6
    assert len({c.case_id for c in first}) == 6
    assert [(c.case_id, c.input_ids, c.expected) for c in first] == [
        (c.case_id, c.input_ids, c.expected) for c in second
    ]
    assert [c.expected for c in first] != [c.expected for c in other_seed]
    assert len({c.expected for c in first}) > 1  # several random needles per cell
    for case in first:
        assert len(case.input_ids) == 600
        value = case.expected[0]
        assert len(value) == 7 and value.isdigit()
        assert value in tokenizer.decode(case.input_ids)


def test_haystack_fn_source_and_too_short_fn(tokenizer):
    text = corpus_text()
    calls = []

    def haystack_fn(n_tokens: int) -> str:
        calls.append(n_tokens)
        return text

    prompt = build_needle_prompt(
        tokenizer, Haystack.from_fn(haystack_fn), 512, 0.5, Needle("Rome", "7654321")
    )
    assert len(prompt.input_ids) == 512 and calls
    short = Haystack.from_fn(lambda n: "Too short.")
    with pytest.raises(ValueError, match="haystack_fn"):
        build_needle_prompt(tokenizer, short, 512, 0.5, Needle("Rome", "7654321"))


def test_short_text_is_tiled_but_not_for_no_repeat(tokenizer):
    hay = Haystack.from_text("One small sentence here.")
    ids = hay.token_ids(tokenizer, 100)
    assert len(ids) == 100
    with pytest.raises(ValueError, match="fewer than"):
        hay.token_ids(tokenizer, 100, allow_repeat=False)


def test_offset_windows_are_consecutive(tokenizer, haystack):
    whole = haystack.token_ids(tokenizer, 300)
    assert haystack.token_ids(tokenizer, 100, offset=200) == whole[200:300]


def test_too_short_length_is_rejected(tokenizer, haystack):
    with pytest.raises(ValueError, match="too short"):
        build_needle_prompt(tokenizer, haystack, 20, 0.5, Needle("Rome", "7654321"))


def test_insert_pieces_validates_and_keeps_order(tokenizer):
    hay = list(range(100, 200))
    out, starts = insert_pieces(tokenizer, hay, [(0.2, [1, 2]), (0.2, [3]), (1.0, [4])], snap=False)
    assert len(out) == 104
    assert starts == [20, 22, 103]
    assert out[20:23] == [1, 2, 3] and out[-1] == 4
    with pytest.raises(ValueError, match="sorted"):
        insert_pieces(tokenizer, hay, [(0.5, [1]), (0.2, [2])])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        insert_pieces(tokenizer, hay, [(1.5, [1])])


def test_chat_template_required_when_forced(tokenizer):
    with pytest.raises(ValueError, match="no chat_template"):
        make_prompt_frame(tokenizer, instruction="a", question="b", use_chat_template=True)


@pytest.mark.parametrize(
    ("text", "passed"),
    [
        ("The special magic number is 4821093.", True),
        ("4821093", True),
        ("It is: 4821093", True),
        ("48210934", False),
        ("14821093", False),
        ("4821 093", False),
        ("I don't know.", False),
    ],
)
def test_exact_value_scoring(text, passed, haystack):
    assert contains_exact_value(text, "4821093") is passed
    task = NeedleTask(haystack)
    case = type("C", (), {"expected": ("4821093",)})()
    assert task.score(case, text) == {"score": float(passed), "passed": passed}


def test_bad_task_arguments(haystack):
    with pytest.raises(ValueError, match="depths"):
        NeedleTask(haystack, depths=[0.5, 1.2])
    with pytest.raises(ValueError, match="needles_per_cell"):
        NeedleTask(haystack, needles_per_cell=0)
    with pytest.raises(TypeError, match="Haystack"):
        NeedleTask("plain text")  # type: ignore[arg-type]
