"""A RULER-style synthetic long-context suite, generated locally over any haystack text.

Tasks (RULER's categories; prompts and generators written here from the task descriptions):

- ``niah_single``: one key -> value needle; answer its value.
- ``niah_multikey``: four needles with different keys; answer the value of one of them.
- ``niah_multivalue``: four values for one key; answer all of them.
- ``niah_multiquery``: four needles with different keys; answer the values of all four.
- ``vt`` (variable tracking): a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... scattered
  through the text; answer every variable that holds the value.
- ``cwe`` (common-words extraction): a numbered word list where ten words occur more often than
  the rest; answer those ten.
- ``fwe`` (frequent-words extraction): coded text of Zipf-distributed made-up words; answer the
  three most frequent.

Every prompt has exactly the requested token length and is a function of ``(seed, task, length,
sample)``. Scoring is RULER's: the share of expected strings found (case-insensitive) in the
answer, so a task's score lies in [0, 1].
"""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .cases import Case, GenerationTask
from .needle import CITIES, random_number
from .prompts import (
    Haystack,
    PromptFrame,
    TokenizerLike,
    encode,
    insert_pieces,
    make_prompt_frame,
    single_token_filler,
)

__all__ = [
    "RULER_TASKS",
    "RulerPrompt",
    "RulerTask",
    "bootstrap_interval",
    "difference_interval",
    "generate",
    "mean_difference",
    "paired_differences",
    "string_match_all",
    "summarize",
    "word_pool",
]


@dataclass(frozen=True)
class RulerPrompt:
    """One generated RULER-style prompt and the strings a correct answer contains.

    ``pieces``: token spans ``(start, stop)`` in ``input_ids`` of the inserted needle / assignment
    sentences (empty for the word-extraction tasks), for analyses of the rows the task depends on.
    """

    input_ids: list[int]
    expected: tuple[str, ...]
    max_new_tokens: int
    pieces: tuple[tuple[int, int], ...] = ()


Generator = Callable[[TokenizerLike, Haystack, int, random.Random, "bool | None"], RulerPrompt]


def string_match_all(text: str, expected: Sequence[str]) -> float:
    """Share of ``expected`` strings that occur in ``text``, ignoring case (RULER's metric)."""
    if not expected:
        raise ValueError("string_match_all needs at least one expected string")
    lowered = text.lower()
    return sum(e.lower() in lowered for e in expected) / len(expected)


def _frame(
    tokenizer: TokenizerLike, chat: bool | None, instruction: str, question: str, answer: str
) -> PromptFrame:
    return make_prompt_frame(
        tokenizer, instruction=instruction, question=question, answer_prefix=answer, use_chat_template=chat
    )


def _with_pieces(
    tokenizer: TokenizerLike,
    haystack: Haystack,
    length: int,
    frame: PromptFrame,
    pieces: Sequence[tuple[float, str]],
) -> tuple[list[int], tuple[tuple[int, int], ...]]:
    """A prompt of ``length`` tokens: the haystack with ``(depth, sentence)`` pieces inserted, and
    each piece's token span in it."""
    piece_ids = [(depth, encode(tokenizer, " " + text)) for depth, text in pieces]
    hay_len = frame.context_budget(length) - sum(len(ids) for _, ids in piece_ids)
    if hay_len <= 0:
        raise ValueError(f"length {length} is too short for this task's needles; use a longer length")
    context, starts = insert_pieces(tokenizer, haystack.token_ids(tokenizer, hay_len), piece_ids)
    offset = len(frame.prefix_ids)
    spans = tuple((offset + start, offset + start + len(ids)) for start, (_, ids) in zip(starts, piece_ids))
    return frame.assemble(context), spans


def _join_names(names: Sequence[str]) -> str:
    """``"A"``, ``"A and B"``, ``"A, B, and C"``."""
    if len(names) <= 2:
        return " and ".join(names)
    return ", ".join(names[:-1]) + ", and " + names[-1]


NIAH_INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize "
    "them. I will quiz you about the numbers afterwards."
)


def _niah(
    tokenizer: TokenizerLike,
    haystack: Haystack,
    length: int,
    rng: random.Random,
    chat: bool | None,
    *,
    num_keys: int,
    values_per_key: int,
    num_queries: int,
) -> RulerPrompt:
    """Needles ``key -> value`` at random depths; the question asks about ``num_queries`` keys."""
    keys = rng.sample(CITIES, num_keys)
    needles = [(key, random_number(rng)) for key in keys for _ in range(values_per_key)]
    rng.shuffle(needles)
    depths = sorted(rng.random() for _ in needles)
    queried = keys[:num_queries]
    expected = tuple(value for key, value in needles if key in queried)
    plural = len(expected) > 1
    numbers, verb, keys = ("numbers", "are", _join_names(queried)) if plural else ("number", "is", queried[0])
    what = f"all the special magic {numbers}" if plural else "the special magic number"
    question = f"What {verb} {what} for {keys} mentioned in the provided text?"
    answer = f"The special magic {numbers} for {keys} mentioned in the provided text {verb}"
    frame = _frame(tokenizer, chat, NIAH_INSTRUCTION, question, answer)
    sentences = [f"One of the special magic numbers for {key} is: {value}." for key, value in needles]
    ids, spans = _with_pieces(tokenizer, haystack, length, frame, list(zip(depths, sentences)))
    return RulerPrompt(ids, expected, 32 + 16 * len(expected), spans)


def _niah_single(
    tok: TokenizerLike, hay: Haystack, length: int, rng: random.Random, chat: bool | None
) -> RulerPrompt:
    return _niah(tok, hay, length, rng, chat, num_keys=1, values_per_key=1, num_queries=1)


def _niah_multikey(
    tok: TokenizerLike, hay: Haystack, length: int, rng: random.Random, chat: bool | None
) -> RulerPrompt:
    return _niah(tok, hay, length, rng, chat, num_keys=4, values_per_key=1, num_queries=1)


def _niah_multivalue(
    tok: TokenizerLike, hay: Haystack, length: int, rng: random.Random, chat: bool | None
) -> RulerPrompt:
    return _niah(tok, hay, length, rng, chat, num_keys=1, values_per_key=4, num_queries=1)


def _niah_multiquery(
    tok: TokenizerLike, hay: Haystack, length: int, rng: random.Random, chat: bool | None
) -> RulerPrompt:
    return _niah(tok, hay, length, rng, chat, num_keys=4, values_per_key=1, num_queries=4)


def _variable_name(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in taken:
            taken.add(name)
            return name


def _variable_tracking(
    tok: TokenizerLike,
    hay: Haystack,
    length: int,
    rng: random.Random,
    chat: bool | None,
    *,
    num_chains: int = 1,
    num_hops: int = 4,
) -> RulerPrompt:
    """Chains of ``num_hops`` assignments; the question asks about the first chain's value."""
    taken: set[str] = set()
    values: list[str] = []
    pieces: list[tuple[float, str]] = []
    chains: list[list[str]] = []
    for _ in range(num_chains):
        value = random_number(rng, digits=5)
        while value in values:
            value = random_number(rng, digits=5)
        values.append(value)
        names = [_variable_name(rng, taken) for _ in range(num_hops + 1)]
        chains.append(names)
        statements = [f"VAR {names[0]} = {value}."] + [
            f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])
        ]
        pieces.extend(zip(sorted(rng.random() for _ in statements), statements))
    pieces.sort(key=lambda piece: piece[0])  # stable: a chain's statements keep their order
    expected = tuple(chains[0])
    frame = _frame(
        tok,
        chat,
        "Memorize and track the chain(s) of variable assignment hidden in the following text.",
        f"Question: Find all variables that are assigned the value {values[0]} in the text above.",
        f"Answer: According to the chain(s) of variable assignment in the text above, {len(expected)} "
        f"variables are assigned the value {values[0]}, they are:",
    )
    ids, spans = _with_pieces(tok, hay, length, frame, pieces)
    return RulerPrompt(ids, expected, 48, spans)


def word_pool(
    haystack: Haystack, tokenizer: TokenizerLike, rng: random.Random, n: int, *, sample_tokens: int = 50_000
) -> list[str]:
    """``n`` distinct lowercase words: haystack words first, then made-up pronounceable ones.

    Haystack words are alphabetic, 3-12 letters, taken from its first ``sample_tokens`` tokens.
    """
    found = sorted(set(re.findall(r"\b[a-z]{3,12}\b", haystack.sample_text(tokenizer, sample_tokens))))
    rng.shuffle(found)
    words = found[:n]
    taken = set(found)
    while len(words) < n:
        word = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 4)))
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


class _TokenCosts:
    """Cached token counts of the parts of a numbered word list (``"12."``, ``" word"``, ``"\\n"``)."""

    def __init__(self, tokenizer: TokenizerLike) -> None:
        self.tokenizer = tokenizer
        self.newline = encode(tokenizer, "\n")
        self._words: dict[str, list[int]] = {}
        self._numbers: list[list[int]] = [[]]  # index i -> ids of "i."

    def word(self, word: str) -> list[int]:
        if word not in self._words:
            self._words[word] = encode(self.tokenizer, " " + word)
        return self._words[word]

    def number(self, i: int) -> list[int]:
        while len(self._numbers) <= i:
            self._numbers.append(encode(self.tokenizer, f"{len(self._numbers)}."))
        return self._numbers[i]

    def item(self, i: int, word: str) -> int:
        """Tokens of item ``i`` (1-based) holding ``word``."""
        return len(self.number(i)) + len(self.word(word)) + len(self.newline)


def _numbered_list_ids(costs: _TokenCosts, words: Sequence[str]) -> list[int]:
    """``"1. w\\n2. w\\n..."`` encoded part by part, so its length is the sum of the parts."""
    ids: list[int] = []
    for number, word in enumerate(words, start=1):
        ids.extend(costs.number(number))
        ids.extend(costs.word(word))
        ids.extend(costs.newline)
    return ids


def _common_words(
    tok: TokenizerLike,
    hay: Haystack,
    length: int,
    rng: random.Random,
    chat: bool | None,
    *,
    num_common: int = 10,
) -> RulerPrompt:
    """A numbered word list filling the context; ``num_common`` words occur most often."""
    frame = _frame(
        tok,
        chat,
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.",
        f"Question: What are the {num_common} most common words in the above list?",
        f"Answer: The top {num_common} words that appear most often in the list are:",
    )
    budget = frame.context_budget(length)
    # Each item ("123. word\n") costs roughly 4-6 tokens; frequencies scale with the list length.
    approx_items = max(1, budget // 5)
    common_freq = min(30, max(2, round(0.3 * approx_items / num_common)))
    rare_freq = max(1, common_freq // 10)
    pool = word_pool(hay, tok, rng, num_common + approx_items // rare_freq + 1)
    common, rare = pool[:num_common], pool[num_common:]
    costs = _TokenCosts(tok)
    words = [w for w in common for _ in range(common_freq)]
    used = sum(costs.item(i, w) for i, w in enumerate(words, start=1))
    if used > budget:
        raise ValueError(
            f"length {length} is too short for {num_common} common words x {common_freq}; use a longer length"
        )
    for word in rare:  # add rare words (rare_freq copies each) while they fit
        extra = sum(costs.item(len(words) + j, word) for j in range(1, rare_freq + 1))
        if used + extra > budget:
            break
        words.extend([word] * rare_freq)
        used += extra
    rng.shuffle(words)
    context = _numbered_list_ids(costs, words)
    context += [single_token_filler(tok)] * (budget - len(context))
    return RulerPrompt(frame.assemble(context), tuple(common), 16 * num_common)


def _frequent_words(
    tok: TokenizerLike,
    hay: Haystack,
    length: int,
    rng: random.Random,
    chat: bool | None,
    *,
    alpha: float = 2.0,
    vocab_size: int = 2000,
) -> RulerPrompt:
    """Coded text of Zipf(``alpha``) made-up words; the answer is the three most frequent."""
    frame = _frame(
        tok,
        chat,
        "Read the following coded text and track the frequency of each coded word. Find the three "
        "most frequently appeared coded words.",
        "Question: Do not provide any explanation. Please ignore the dots '....'. What are the three "
        "most frequently appeared words in the above coded text?",
        "Answer: According to the coded text above, the three most frequently appeared words are:",
    )
    budget = frame.context_budget(length)
    vocab = sorted(
        {
            "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
            for _ in range(vocab_size)
        }
    )
    rng.shuffle(vocab)
    cum_weights = list(itertools.accumulate(1.0 / (rank + 1) ** alpha for rank in range(len(vocab))))
    word_ids = {w: encode(tok, " " + w) for w in vocab}
    for _attempt in range(50):
        context: list[int] = []
        counts: Counter[str] = Counter()
        while True:
            word = rng.choices(vocab, cum_weights=cum_weights)[0]
            if len(context) + len(word_ids[word]) > budget:
                break
            context.extend(word_ids[word])
            counts[word] += 1
        top = counts.most_common(4)
        if len(top) >= 3 and (len(top) == 3 or top[2][1] > top[3][1]):
            context += [single_token_filler(tok)] * (budget - len(context))
            return RulerPrompt(frame.assemble(context), tuple(w for w, _ in top[:3]), 50)
    raise ValueError(
        f"length {length} is too short to make three words clearly the most frequent; use a longer length"
    )


RULER_TASKS: dict[str, Generator] = {
    "niah_single": _niah_single,
    "niah_multikey": _niah_multikey,
    "niah_multivalue": _niah_multivalue,
    "niah_multiquery": _niah_multiquery,
    "vt": _variable_tracking,
    "cwe": _common_words,
    "fwe": _frequent_words,
}


def generate(
    task: str,
    tokenizer: TokenizerLike,
    haystack: Haystack,
    length: int,
    *,
    seed: int,
    sample: int,
    use_chat_template: bool | None = None,
) -> RulerPrompt:
    """The prompt of one RULER-style case; a pure function of its arguments."""
    if task not in RULER_TASKS:
        raise ValueError(f"unknown RULER task '{task}'; choose from {sorted(RULER_TASKS)}")
    rng = random.Random(f"ruler/{task}/{seed}/{length}/{sample}")
    return RULER_TASKS[task](tokenizer, haystack, length, rng, use_chat_template)


class RulerTask(GenerationTask):
    """The RULER-style suite: ``samples`` cases per sub-task and length.

    With ``reference_logprob`` (the default) each record also carries ``reference_logprob``, the
    log-probability of :meth:`reference_answer` after the prompt under the method being evaluated.
    """

    name = "ruler"

    def __init__(
        self,
        haystack: Haystack,
        *,
        tasks: Sequence[str] = tuple(RULER_TASKS),
        samples: int = 5,
        seed: int = 0,
        use_chat_template: bool | None = None,
        reference_logprob: bool = True,
    ) -> None:
        unknown = sorted(set(tasks) - set(RULER_TASKS))
        if unknown:
            raise ValueError(f"unknown RULER task(s) {unknown}; choose from {sorted(RULER_TASKS)}")
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        self.haystack = haystack
        self.tasks = tuple(tasks)
        self.samples = samples
        self.seed = seed
        self.use_chat_template = use_chat_template
        self.reference_logprob = reference_logprob

    def cases(self, tokenizer: TokenizerLike, length: int) -> list[Case]:
        cases = []
        for task in self.tasks:
            for sample in range(self.samples):
                prompt = generate(
                    task,
                    tokenizer,
                    self.haystack,
                    length,
                    seed=self.seed,
                    sample=sample,
                    use_chat_template=self.use_chat_template,
                )
                cases.append(
                    Case(
                        case_id=f"{task}/L{length}/i{sample}/s{self.seed}",
                        length=length,
                        input_ids=prompt.input_ids,
                        expected=prompt.expected,
                        max_new_tokens=prompt.max_new_tokens,
                        params={
                            "subtask": task,
                            "sample": sample,
                            "seed": self.seed,
                            "haystack": self.haystack.name,
                        },
                    )
                )
        return cases

    def score(self, case: Case, text: str) -> dict[str, Any]:
        return {"score": string_match_all(text, case.expected)}

    def reference_answer(self, case: Case) -> str | None:
        """The expected strings as one answer, ``" a, b, c"``: the same text under every method, so the
        difference of its log-probability between two methods is paired per prompt."""
        return " " + ", ".join(case.expected) if self.reference_logprob else None


def summarize(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    """Scores (0-100) per method, length and sub-task, plus ``"average"`` over the sub-tasks.

    Takes RULER result records (``task == "ruler"``; records with an ``error`` are left out).
    The average is only given for a (method, length) that has a score for every sub-task seen
    in the records; otherwise it is ``nan``, so a partial run is never averaged as if complete.
    """
    sums: dict[tuple[str, int, str], list[float]] = {}
    subtasks: dict[str, None] = {}
    for record in records:
        if record.get("task") != "ruler" or record.get("error"):
            continue
        subtasks[record["subtask"]] = None
        sums.setdefault((record["method"], int(record["length"]), record["subtask"]), []).append(
            float(record["score"])
        )
    summary: dict[str, dict[int, dict[str, float]]] = {}
    for (method, length, subtask), scores in sums.items():
        summary.setdefault(method, {}).setdefault(length, {})[subtask] = 100 * sum(scores) / len(scores)
    for per_length in summary.values():
        for scores in per_length.values():
            complete = all(t in scores for t in subtasks)
            scores["average"] = sum(scores[t] for t in subtasks) / len(subtasks) if complete else float("nan")
    return summary


def paired_differences(
    records: Iterable[Mapping[str, Any]], method: str, baseline: str, length: int, field: str = "score"
) -> list[list[float]] | None:
    """Per sub-task, ``record[field]`` of ``method`` minus ``baseline`` on each prompt both ran at ``length``.

    Cases are paired by ``case_id``; records without ``field`` (or with it ``None``) are left out.
    ``None`` when a sub-task has no paired case (or there are no records).
    """
    values: dict[tuple[str, str], dict[str, float]] = {}  # (method, subtask) -> case_id -> value
    subtasks: dict[str, None] = {}
    for record in records:
        if (record.get("task") != "ruler" or record.get("error") or int(record["length"]) != length
                or "case_id" not in record):
            continue
        subtasks[record["subtask"]] = None
        if record.get(field) is not None:
            values.setdefault((record["method"], record["subtask"]), {})[record["case_id"]] = float(record[field])
    differences = []
    for subtask in subtasks:
        ours, theirs = values.get((method, subtask), {}), values.get((baseline, subtask), {})
        paired = [ours[case] - theirs[case] for case in sorted(ours.keys() & theirs.keys())]
        if not paired:
            return None
        differences.append(paired)
    return differences or None


def mean_difference(differences: Sequence[Sequence[float]]) -> float:
    """The sub-tasks' mean of their mean paired difference (sub-tasks weigh equally, as in :func:`summarize`)."""
    return sum(sum(d) / len(d) for d in differences) / len(differences)


def difference_interval(
    records: Iterable[Mapping[str, Any]],
    method: str,
    baseline: str,
    length: int,
    *,
    field: str = "score",
    scale: float = 100.0,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Paired bootstrap interval of ``average(method) - average(baseline)`` of ``field`` at ``length``.

    ``scale`` multiplies the differences (100: scores as 0-100; 1 for a log-probability in nats).
    Cases are paired by ``case_id`` (the same prompt under both methods; cases missing for either
    are left out). Each resample draws, per sub-task, as many paired cases as it has, with
    replacement, and averages the per-case differences over the sub-tasks as :func:`summarize`
    averages scores. Returns the central ``level`` interval of the resampled differences, or
    ``None`` when a sub-task has no paired case. Deterministic for a given ``seed``.
    """
    paired = paired_differences(records, method, baseline, length, field)
    if paired is None:
        return None
    return bootstrap_interval([[scale * d for d in per_subtask] for per_subtask in paired],
                              resamples=resamples, level=level, seed=seed)


def bootstrap_interval(differences: Sequence[Sequence[float]], *, resamples: int = 2000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Central ``level`` interval of :func:`mean_difference` over ``resamples`` resamplings of
    ``differences`` (per sub-task, as many paired differences as it has, with replacement).
    Deterministic for a given ``seed``."""
    rng = random.Random(seed)
    means = sorted(
        sum(sum(rng.choices(d, k=len(d))) / len(d) for d in differences) / len(differences)
        for _ in range(resamples)
    )
    tail = (1 - level) / 2
    return means[int(tail * (resamples - 1))], means[int(round((1 - tail) * (resamples - 1)))]
