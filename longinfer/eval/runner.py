"""Run a task over lengths x methods on one loaded model, one durable record per case.

Order: for each length (as given), the cases are generated once, then each method runs all of
them; so a run stopped early holds complete method comparisons for its first lengths. Cases
already in the JSONL are skipped (after checking the stored prompt digest matches, so a
changed task setup is never mixed silently with old results). A case that runs out of device
memory is recorded with ``error="oom"`` and the run goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .cases import Case, Task, model_device, prompt_digest
from .methods import AttentionMethod
from .prompts import TokenizerLike
from .results import KEY_FIELDS, ResultStore, environment_info, now, record_key

logger = logging.getLogger(__name__)

__all__ = ["RunSummary", "run_task"]

_RESERVED = {
    *KEY_FIELDS,
    "length",
    "n_input_tokens",
    "prompt_sha1",
    "date",
    "versions",
    "device",
    "python",
    "error",
    "attention_density",
}


@dataclass
class RunSummary:
    """How many cases a run executed, skipped as already recorded, and lost to OOM."""

    ran: int = 0
    skipped: int = 0
    oom: int = 0


def _case_record(
    task: Task,
    case: Case,
    method: AttentionMethod,
    model_name: str,
    environment: Mapping[str, Any],
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """The identity, case facts and environment of a record (results are added by the caller)."""
    clashes = (set(case.params) | set(extra) | set(method.describe())) & _RESERVED
    if clashes:
        raise ValueError(f"case params / extra fields {sorted(clashes)} clash with reserved record fields")
    return {
        "model": model_name,
        "method": method.name,
        "task": task.name,
        "case_id": case.case_id,
        "length": case.length,
        "n_input_tokens": len(case.input_ids),
        "prompt_sha1": prompt_digest(case.input_ids),
        **case.params,
        **method.describe(),
        **extra,
        **environment,
    }


def _check_same_prompt(stored: Mapping[str, Any], case: Case, path: Path) -> None:
    digest = prompt_digest(case.input_ids)
    if stored.get("prompt_sha1") != digest:
        raise ValueError(
            f"{path} already holds case {case.case_id} of method {stored.get('method')} built from a "
            f"different prompt (digest {stored.get('prompt_sha1')} vs {digest}): the task settings, "
            f"haystack or tokenizer changed. Write to a new output file, or delete the old one to start over"
        )


def _check_same_plan(stored: Mapping[str, Any], case: Case, method: AttentionMethod, path: Path) -> None:
    """A recorded case counts as done only if it ran the same plan: records with another
    ``plan_digest`` (an edited plan file, an earlier default) are an error; records from before the
    digest existed cannot be checked and are taken as they are."""
    recorded, current = stored.get("plan_digest"), method.describe().get("plan_digest")
    if recorded is not None and current is not None and recorded != current:
        raise ValueError(
            f"{path} already holds case {case.case_id} of method {method.name} run with another plan "
            f"(digest {recorded} vs {current}): the plan file or the default plan changed. Write to a new "
            f"output file, or delete that method's records to rerun it"
        )


def _run_one(task: Task, model: Any, tokenizer: TokenizerLike, case: Case) -> dict[str, Any]:
    """The result fields of one case, or ``{"error": "oom"}`` when the device ran out of memory."""
    try:
        return task.run_case(model, tokenizer, case)
    except torch.OutOfMemoryError:
        logger.warning(
            "out of memory on case %s (%d tokens); recorded as oom", case.case_id, len(case.input_ids)
        )
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"error": "oom"}


def run_task(
    task: Task,
    model: Any,
    tokenizer: TokenizerLike,
    methods: Sequence[AttentionMethod],
    lengths: Sequence[int],
    *,
    out_jsonl: str | Path,
    model_name: str,
    extra: Mapping[str, Any] | None = None,
) -> RunSummary:
    """Evaluate ``task`` for every method and length, appending one record per case to ``out_jsonl``.

    Args:
        task: a :class:`~longinfer.eval.cases.Task` (needle, RULER, ppl, latency, ...).
        model, tokenizer: a loaded transformers causal LM and its tokenizer.
        methods: attention methods to compare; each is activated around its cases.
        lengths: prompt lengths in tokens.
        out_jsonl: the result file; existing records are kept and their cases skipped.
        model_name: the model's name in the records (e.g. the zoo name or path).
        extra: more fields for every record (e.g. the command line).

    Returns:
        Counts of cases run, skipped and out of memory.
    """
    if not methods:
        raise ValueError("run_task needs at least one attention method")
    if not lengths or any(int(n) <= 0 for n in lengths):
        raise ValueError(f"lengths must be positive token counts, got {list(lengths)}")
    store = ResultStore(out_jsonl)
    done = store.index()
    environment = environment_info(model_device(model))
    extra = dict(extra or {})
    summary = RunSummary()
    for length in lengths:
        cases = task.cases(tokenizer, int(length))
        for method in methods:
            todo = []
            for case in cases:
                key = (model_name, method.name, task.name, case.case_id)
                if key in done:
                    _check_same_prompt(done[key], case, store.path)
                    _check_same_plan(done[key], case, method, store.path)
                    summary.skipped += 1
                else:
                    todo.append(case)
            if not todo:
                logger.info(
                    "%s / %s / %d tokens: all %d cases already recorded",
                    task.name,
                    method.name,
                    length,
                    len(cases),
                )
                continue
            logger.info(
                "%s / %s / %d tokens: running %d of %d cases",
                task.name,
                method.name,
                length,
                len(todo),
                len(cases),
            )
            with method.activate(model):
                for case in todo:
                    record = _case_record(task, case, method, model_name, environment, extra)
                    method.begin_case(model)
                    result = _run_one(task, model, tokenizer, case)
                    clashes = set(result) & (_RESERVED - {"error"})
                    if clashes:
                        raise ValueError(
                            f"task {task.name} returned reserved record fields {sorted(clashes)}"
                        )
                    record.update(result)
                    if "error" not in record:
                        record.update(method.case_measures(model))
                    record["date"] = now()
                    store.append(record)
                    done[record_key(record)] = record
                    summary.ran += 1
                    summary.oom += record.get("error") == "oom"
    return summary
