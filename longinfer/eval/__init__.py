"""Evaluation harness: needle, RULER-style, perplexity and latency, for any set of attention methods.

Flow: a task (:class:`NeedleTask`, :class:`RulerTask`, :class:`PerplexityTask`,
:class:`LatencyTask`) generates cases per prompt length over a :class:`Haystack`;
:func:`run_task` runs them for each :class:`AttentionMethod` on one loaded model and appends one
record per case to a JSONL file (:class:`ResultStore`, resumable); :func:`render_report` turns
that file into markdown tables and PNG figures. Submodules import transformers and matplotlib
only when used.
"""

from .cases import Case, GenerationTask, Task, greedy_generate
from .latency import LatencyTask, crossover_length, time_to_first_token
from .methods import AttentionMethod, DenseMethod, LonginferMethod, method_from_spec, parse_methods
from .needle import NeedleTask, build_needle_prompt, contains_exact_value
from .ppl import PerplexityTask, last_tokens_nll
from .prompts import Haystack, insert_pieces, make_prompt_frame
from .report import render_report
from .results import ResultStore
from .ruler import RULER_TASKS, RulerTask, string_match_all
from .runner import RunSummary, run_task

__all__ = [
    "AttentionMethod",
    "Case",
    "DenseMethod",
    "GenerationTask",
    "Haystack",
    "LatencyTask",
    "LonginferMethod",
    "NeedleTask",
    "PerplexityTask",
    "RULER_TASKS",
    "ResultStore",
    "RulerTask",
    "RunSummary",
    "Task",
    "build_needle_prompt",
    "contains_exact_value",
    "crossover_length",
    "greedy_generate",
    "insert_pieces",
    "last_tokens_nll",
    "make_prompt_frame",
    "method_from_spec",
    "parse_methods",
    "render_report",
    "run_task",
    "string_match_all",
    "time_to_first_token",
]
