"""Needle in a haystack: one random key -> value fact hidden at a depth of a long text.

The grid is lengths x depths with ``needles_per_cell`` random needles per cell, each drawn from
a seed derived from ``(seed, length, depth, index)``, so any cell can be regenerated alone. A
needle reads "The special magic number for <city> is <7-digit number>."; the prompt ends with
the question and the start of the answer. A case passes when the exact number appears in the
generated text (not as part of a longer number).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .cases import Case, GenerationTask
from .prompts import Haystack, TokenizerLike, encode, insert_pieces, make_prompt_frame

__all__ = [
    "CITIES",
    "Needle",
    "NeedlePrompt",
    "random_needle",
    "build_needle_prompt",
    "contains_exact_value",
    "NeedleTask",
    "DEFAULT_DEPTHS",
]

DEFAULT_DEPTHS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)

CITIES: tuple[str, ...] = (
    "Amsterdam",
    "Athens",
    "Auckland",
    "Bangkok",
    "Barcelona",
    "Beijing",
    "Berlin",
    "Bogota",
    "Boston",
    "Brussels",
    "Budapest",
    "Buenos Aires",
    "Cairo",
    "Cape Town",
    "Caracas",
    "Chicago",
    "Copenhagen",
    "Dakar",
    "Delhi",
    "Dhaka",
    "Dublin",
    "Edinburgh",
    "Florence",
    "Geneva",
    "Hanoi",
    "Havana",
    "Helsinki",
    "Istanbul",
    "Jakarta",
    "Johannesburg",
    "Kabul",
    "Karachi",
    "Kathmandu",
    "Kiev",
    "Kyoto",
    "Lagos",
    "Lima",
    "Lisbon",
    "London",
    "Madrid",
    "Manila",
    "Marrakesh",
    "Melbourne",
    "Mexico City",
    "Montreal",
    "Moscow",
    "Mumbai",
    "Munich",
    "Nairobi",
    "Naples",
    "Oslo",
    "Ottawa",
    "Paris",
    "Perth",
    "Prague",
    "Quito",
    "Reykjavik",
    "Riga",
    "Rome",
    "Santiago",
    "Seoul",
    "Shanghai",
    "Singapore",
    "Sofia",
    "Stockholm",
    "Sydney",
    "Taipei",
    "Tallinn",
    "Tehran",
    "Tokyo",
    "Toronto",
    "Tunis",
    "Valencia",
    "Vancouver",
    "Venice",
    "Vienna",
    "Vilnius",
    "Warsaw",
    "Wellington",
    "Zagreb",
    "Zurich",
)

INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize "
    "them. I will quiz you about the numbers afterwards."
)


@dataclass(frozen=True)
class Needle:
    """A key -> value fact and the question that retrieves it."""

    key: str
    value: str

    @property
    def sentence(self) -> str:
        return f"The special magic number for {self.key} is {self.value}."

    @property
    def question(self) -> str:
        return f"What is the special magic number for {self.key} mentioned in the provided text?"

    @property
    def answer_prefix(self) -> str:
        return f"The special magic number for {self.key} mentioned in the provided text is"


def random_number(rng: random.Random, digits: int = 7) -> str:
    """A random decimal number of exactly ``digits`` digits (no leading zero)."""
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def random_needle(rng: random.Random) -> Needle:
    """A needle with a random city key and a random 7-digit value."""
    return Needle(key=rng.choice(CITIES), value=random_number(rng))


def contains_exact_value(text: str, value: str) -> bool:
    """Whether ``value`` occurs in ``text`` not glued to further digits (``12345678`` != ``1234567``)."""
    return re.search(rf"(?<!\d){re.escape(value)}(?!\d)", text) is not None


@dataclass(frozen=True)
class NeedlePrompt:
    """A needle prompt: ids of exactly the requested length and where the needle went."""

    input_ids: list[int]
    needle: Needle
    needle_start: int  # index of the needle's first token in input_ids
    depth_actual: float  # share of haystack tokens before the needle after sentence snapping


def build_needle_prompt(
    tokenizer: TokenizerLike,
    haystack: Haystack,
    length: int,
    depth: float,
    needle: Needle,
    *,
    use_chat_template: bool | None = None,
) -> NeedlePrompt:
    """A prompt of exactly ``length`` tokens with ``needle`` at ``depth`` of the haystack.

    The needle is moved to the nearest sentence end (a few tokens at most) so no word is split.
    """
    frame = make_prompt_frame(
        tokenizer,
        instruction=INSTRUCTION,
        question=needle.question,
        answer_prefix=needle.answer_prefix,
        use_chat_template=use_chat_template,
    )
    needle_ids = encode(tokenizer, " " + needle.sentence)
    hay_len = frame.context_budget(length) - len(needle_ids)
    if hay_len <= 0:
        raise ValueError(
            f"length {length} leaves no room for a haystack around the needle; use a longer length"
        )
    context, starts = insert_pieces(tokenizer, haystack.token_ids(tokenizer, hay_len), [(depth, needle_ids)])
    return NeedlePrompt(
        input_ids=frame.assemble(context),
        needle=needle,
        needle_start=len(frame.prefix_ids) + starts[0],
        depth_actual=starts[0] / hay_len,
    )


class NeedleTask(GenerationTask):
    """Needle in a haystack over ``depths`` with ``needles_per_cell`` seeded needles per cell."""

    name = "needle"

    def __init__(
        self,
        haystack: Haystack,
        *,
        depths: Sequence[float] = DEFAULT_DEPTHS,
        needles_per_cell: int = 3,
        seed: int = 0,
        max_new_tokens: int = 24,
        use_chat_template: bool | None = None,
    ) -> None:
        if not isinstance(haystack, Haystack):
            raise TypeError(
                f"haystack must be a longinfer.eval.prompts.Haystack, got {type(haystack).__name__}"
            )
        if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
            raise ValueError(f"depths must be a non-empty list of values in [0, 1], got {list(depths)}")
        if needles_per_cell < 1:
            raise ValueError(f"needles_per_cell must be >= 1, got {needles_per_cell}")
        self.haystack = haystack
        self.depths = tuple(float(d) for d in depths)
        self.needles_per_cell = needles_per_cell
        self.seed = seed
        self.max_new_tokens = max_new_tokens
        self.use_chat_template = use_chat_template

    def cases(self, tokenizer: TokenizerLike, length: int) -> list[Case]:
        cases = []
        for depth in self.depths:
            for index in range(self.needles_per_cell):
                rng = random.Random(f"needle/{self.seed}/{length}/{depth:.4f}/{index}")
                prompt = build_needle_prompt(
                    tokenizer,
                    self.haystack,
                    length,
                    depth,
                    random_needle(rng),
                    use_chat_template=self.use_chat_template,
                )
                cases.append(
                    Case(
                        case_id=f"L{length}/d{depth:.3f}/n{index}/s{self.seed}",
                        length=length,
                        input_ids=prompt.input_ids,
                        expected=(prompt.needle.value,),
                        max_new_tokens=self.max_new_tokens,
                        params={
                            "depth": depth,
                            "depth_actual": round(prompt.depth_actual, 4),
                            "needle_index": index,
                            "seed": self.seed,
                            "needle_key": prompt.needle.key,
                            "haystack": self.haystack.name,
                        },
                    )
                )
        return cases

    def score(self, case: Case, text: str) -> dict[str, Any]:
        passed = contains_exact_value(text, case.expected[0])
        return {"score": float(passed), "passed": passed}

    def reference_answer(self, case: Case) -> str:
        """The needle's value after a space: its log-probability shows how far a passing answer is
        from failing (a value the model still prints, but at lower probability under a method)."""
        return " " + case.expected[0]
