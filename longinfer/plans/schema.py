"""Per-head sparse-attention plans: a typed, versioned JSON schema.

A plan says, for one model, which pattern (and parameters) every query head of every layer
uses, and per layer the key length below which the layer runs dense. Plans are data, never
code: loading validates every field, every pattern name and every parameter against the pattern
registry, and :meth:`Plan.check_matches` validates the plan against the model it is used with.

JSON layout (``schema_version`` 1)::

    {
      "schema_version": 1,
      "model": {"id": "Qwen/Qwen2.5-Coder-0.5B-Instruct", "revision": null,
                "num_layers": 24, "num_q_heads": 14, "num_kv_heads": 2, "head_dim": 64},
      "created": "2026-11-25T10:00:00+00:00",
      "library_version": "0.1.0",
      "search": {"method": "uniform", ...},            # how the plan was made (free-form JSON)
      "layers": [
        {"dense_below": 16384,
         "heads": [{"pattern": "vertical_slash", "params": {"num_vertical": 1000, ...}}, ...]},
        {"dense_below": 16384, "share_kv_groups": true, "heads": [...]},
        ...
      ]
    }

``share_kv_groups`` (optional, default ``false``; written only when true, so plans without it stay
readable by older versions of schema 1): the query heads of a KV group that share one head plan
use one index for the group, the union of their estimates, so the kernels stack them in one tile
and share every K/V load.

``dense_last`` (optional, default ``0``; written only when positive): the last ``dense_last``
query positions of every sparse call attend densely (to every causal key), rounded out to whole
64-position query tiles (:meth:`LayerPlan.dense_from`), so the kernel runs those tiles dense in
the same launch. They are the prompt's end (the question, the chat template's answer prefix)
whose attention decides the first generated tokens; at 128K, 128 dense rows add 0.2% of the
causal pairs.

Every head lists all parameters of its pattern (defaults filled in on save), so a plan reads the
same whatever the library's defaults become. Unknown keys anywhere are an error.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import json
import os
import tempfile
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longinfer import __version__
from longinfer.patterns.registry import config_from_params, config_to_params, get_pattern, pattern_of_config
from longinfer.patterns.vertical_slash import VerticalSlashConfig

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)

# Key length below which the default plan runs every layer dense: the measured TTFT crossover of
# the default rule (H200, Qwen2.5-Coder-1.5B, docs/results/gpu-session25/): sparse from 16,384 keys
# it is 1.01x dense at 16K and 1.06x at 18K, where dense below 20,480 keys gave 0.99x at both, and
# RULER-style at 16K stays within noise of dense (-0.7 [-2.1, +0.7] points, +0.16 nats) now that
# prefills estimate from the question's queries too (without them: -4.2 points, session 24).
# `longinfer search` measures a plan's own.
DEFAULT_DENSE_BELOW = 16384

# Query rows at the end of every sparse call that the default plan runs dense. The default index
# is estimated from queries spread over the prompt, which serves the prompt's end worst: on
# Qwen2.5-Coder-0.5B at 8K (CPU, docs/results/recall-cpu-qwen0.5b-8k-end) its recall over the last
# 128 rows is 0.832 mean / 0.641 p10 against 0.928 / 0.875 over rows spread across the prompt.
# Those rows decide the answer; dense, they cost 0.2% more pairs at 128K.
DEFAULT_DENSE_LAST = 128
# dense_last is rounded out to whole query tiles of this many positions (the default plan's tile;
# 16- and 32-row tiles divide it; with 128-row tiles the tail is a second dense pass unless it
# starts on a multiple of 128).
DENSE_LAST_TILE = 64

# The estimate used when a user gives no plan: vertical-slash with a coverage budget on every
# head (columns and diagonals ranked together), estimated from 64 queries spread evenly over the
# prompt. Chosen on the GPU recall frontier (docs/results/gpu-qwen0.5b-32k/, Qwen2.5-Coder-0.5B at
# 32K): mean / p10 head recall 0.911 / 0.856 at 12% density, where the previous default (the last
# 256 queries, tau 0.95) kept 0.848 / 0.672 at 9%, at about the same estimation cost. Caps bound
# the index width. Each head attends the columns chosen for any head of its KV group
# (group_columns), its diagonals stay its own: on Qwen2.5-Coder-1.5B at 32K (H200, RULER-style, 84
# prompts; docs/results/gpu-session14/) that scores 74.9 against dense 76.0 and changes 16 prompts'
# answers, where per-head columns score 65.1 and change 32, for a 4K turn over a 64K cache at 2.21x
# dense attention speed instead of 2.71x.
#
# Calls of at least DEFAULT_LONG_FROM query rows switch to the long-context rule: each head its own
# columns and at least 3,000 diagonals per head. At 128K (H200, same model, 42 prompts;
# docs/results/gpu-session16/, gpu-session17/) the shared columns alone scored 61.6 against dense 71.0
# at 1.85x TTFT; the long-context rule 68.6 (-2.3 [-7.6, +3.3]) at 1.45x, where the peer (MInference
# 0.1.6) scored 69.7 at 1.27x. The diagonals carry it: a floor of 1,000 columns alone scored 57.5, the
# 3,000 diagonals with the 1,000 columns 68.7 at 1.42x (the session-16 rule). At 32K the floors cost
# more than they buy (45-62% dense for -1.2 to +1.8 points). At 64K (session 17) neither rule holds
# dense's accuracy: the long rule (then with the 1,000 columns) 67.1 against dense 71.9 (-4.8 [-10.1,
# -0.6]) at 44% density and 1.02x TTFT, the shared columns 60.3 (-11.5). The threshold counts query
# rows, not keys (thresholds_on="queries"): the 64 estimation queries stand for 2,048 rows each in a
# 128K prefill, 512 at 32K, but for 64 in a 4K turn over a long cache, so a turn keeps the shared
# columns without floor (2.54x dense attention speed over a 64K cache; with the long rule: 1.46x).
DEFAULT_LONG_FROM = 65536
# Calls of at least DEFAULT_QUESTION_FROM query rows (a long prefill, not a turn) add the prompt's last
# 64 queries to the 64 strided ones (question_from): a question attends to the facts it asks about, so
# their columns are kept for every row. Same model, RULER-style, H200 (docs/results/gpu-session24/):
# against dense, the answers' log-probability -1.04 / -0.41 / -0.62 nats at 32K / 64K / 128K without
# them, +0.20 / +0.03 / -0.31 with them (prompts whose answer lost half its probability: 31 -> 20 of
# 84, 11 -> 4 and 14 -> 8 of 42; without the common-words task, whose answers swing by nats either
# way: -1.46 / -0.58 / -0.93 -> -0.28 / -0.03 / -0.46); scores -1.9 / -3.6 / -3.4 -> +0.2 / -0.2 /
# -4.6 points (42-84 prompts: +-4 points is noise), at lower density and TTFT 1.17x -> 1.25x (32K),
# 1.10x -> 1.14x (64K), 1.53x -> 1.57x (128K). A 4K turn keeps 64 strided queries: in its 64-row stride the last
# rows already sample the question, and twice the estimation queries would cost it ~27% (session 23).
DEFAULT_QUESTION_FROM = 16384
# The long rule's diagonal floor grows with the prompt: 3,000 diagonals per 65,536 query rows (3,000 at
# 64K, 6,000 at 128K; at most num_slash, 8,192, from ~175K). Same model, RULER-style at 128K, 84 prompts
# (docs/results/gpu-session26/): 3,000 diagonals scored -4.1 [-7.3, -1.4] points against dense, -0.30
# nats, 17 answers at less than half dense's probability, TTFT 1.57x; 6,000 -1.4 [-4.9, +2.1], -0.23
# nats, 14 halved, TTFT 1.28x (the peer 1.27x in session 13; paired against 3,000: +2.7 [-0.2, +6.0]).
# At 64K the 3,000 held (-0.2 points, +0.03 nats, session 24) where 6,000 was no better (-2.4, +0.06,
# 57% dense instead of 42%; session 25). 3000 / 65536 is exact in binary: 131,072 rows get 6,000.
DEFAULT_SLASH_SHARE = 3000 / 65536
DEFAULT_PATTERN_CONFIG = VerticalSlashConfig(
    num_vertical=4096, num_slash=8192, last_q=64, sink=30, local=100, budget="coverage", tau=0.9,
    query_sampling="strided", group_columns=True, group_columns_below=DEFAULT_LONG_FROM,
    min_vertical=0, min_slash=3000, min_slash_share=DEFAULT_SLASH_SHARE, floor_from=DEFAULT_LONG_FROM,
    thresholds_on="queries", question_from=DEFAULT_QUESTION_FROM,
)


def _where(location: str, error: Exception) -> Exception:
    """The same kind of error with ``location`` prefixed to the message."""
    return type(error)(f"{location}: {error}")


def _require_int(location: str, value: Any, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{location} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{location} must be >= {minimum}, got {value}")
    return value


def _require_keys(location: str, data: Any, required: set[str], optional: frozenset[str] = frozenset()) -> None:
    """``data`` must be a dict with all ``required`` keys and nothing beyond ``required | optional``."""
    if not isinstance(data, Mapping):
        raise TypeError(f"{location} must be a JSON object, got {type(data).__name__}")
    missing = sorted(required - set(data))
    if missing:
        raise ValueError(f"{location} is missing {missing}")
    unknown = sorted(set(data) - required - optional)
    if unknown:
        raise ValueError(f"{location} has unknown key(s) {unknown}; allowed: {sorted(required | optional)}")


@dataclass(frozen=True)
class ModelShape:
    """The attention shape a plan is made for."""

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _require_int(f"ModelShape.{f.name}", getattr(self, f.name), 1)
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )


def model_shape(config: Any) -> ModelShape:
    """Attention shape of a model config.

    Args:
        config: a transformers ``PretrainedConfig`` (its text config for multimodal models), a
            dict with ``num_layers``, ``num_q_heads``, ``num_kv_heads``, ``head_dim``, a
            :class:`ModelShape`, or a :class:`Plan`.

    Raises:
        ValueError / TypeError: a dict with missing or unknown fields, or an unsupported object.
    """
    if isinstance(config, ModelShape):
        return config
    if isinstance(config, Plan):
        return config.shape
    if isinstance(config, Mapping):
        names = {f.name for f in dataclasses.fields(ModelShape)}
        _require_keys("model config dict", config, names)
        return ModelShape(**{n: config[n] for n in names})
    if hasattr(config, "num_attention_heads") and hasattr(config, "num_hidden_layers"):
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        q_heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or q_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // q_heads
        return ModelShape(text.num_hidden_layers, q_heads, kv_heads, head_dim)
    raise TypeError(
        "config must be a transformers PretrainedConfig, a dict with num_layers/num_q_heads/num_kv_heads/"
        f"head_dim, a ModelShape or a Plan; got {type(config).__name__}"
    )


@dataclass(frozen=True)
class HeadPlan:
    """One query head's pattern: a registered pattern name and its validated config dataclass."""

    pattern: str
    config: Any

    def __post_init__(self) -> None:
        spec = get_pattern(self.pattern)
        if type(self.config) is not spec.config_cls:
            raise TypeError(
                f"pattern {self.pattern!r} takes a {spec.config_cls.__name__}, got {type(self.config).__name__}"
            )

    @classmethod
    def from_params(cls, pattern: str, params: Mapping[str, Any] | None = None) -> HeadPlan:
        """Validate ``params`` against ``pattern``'s config dataclass (missing fields: defaults)."""
        return cls(pattern, config_from_params(pattern, params or {}))

    @classmethod
    def from_config(cls, config: Any) -> HeadPlan:
        """A head plan for a registered config dataclass instance."""
        return cls(pattern_of_config(config).name, config)

    @property
    def params(self) -> dict[str, Any]:
        """All parameters as a JSON-ready dict."""
        return config_to_params(self.config)

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "params": self.params}

    @classmethod
    def from_dict(cls, data: Any, location: str = "head") -> HeadPlan:
        _require_keys(location, data, {"pattern", "params"})
        try:
            return cls.from_params(data["pattern"], data["params"])
        except (ValueError, TypeError) as error:
            raise _where(location, error) from error


@dataclass(frozen=True)
class LayerPlan:
    """One layer: a head plan per query head, and the key length below which the layer runs dense.

    Attributes:
        heads: ``num_q_heads`` head plans, in query-head order.
        dense_below: the layer runs dense attention when the number of key positions (prefix
            included) is below this; 0 = never dense.
        share_kv_groups: a KV group whose query heads all share one head plan is estimated once
            for the group (one index with ``Hkv`` heads, the union of its heads' selections);
            groups with mixed plans still get one index per query head.
        dense_last: the last ``dense_last`` query positions of a sparse call attend to every
            causal key (dense rows at the prompt's end), rounded out to whole query tiles of
            :data:`DENSE_LAST_TILE` positions (see :meth:`dense_from`); 0 = none.
    """

    heads: tuple[HeadPlan, ...]
    dense_below: int = 0
    share_kv_groups: bool = False
    dense_last: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", tuple(self.heads))
        if not self.heads:
            raise ValueError("a LayerPlan needs at least one head")
        for i, head in enumerate(self.heads):
            if not isinstance(head, HeadPlan):
                raise TypeError(f"heads[{i}] must be a HeadPlan, got {type(head).__name__}")
        _require_int("dense_below", self.dense_below, 0)
        _require_int("dense_last", self.dense_last, 0)
        if not isinstance(self.share_kv_groups, bool):
            raise TypeError(
                f"share_kv_groups must be true or false, got {type(self.share_kv_groups).__name__} "
                f"{self.share_kv_groups!r}"
            )

    def runs_dense(self, k_len: int) -> bool:
        """True when a call with ``k_len`` key positions should use dense attention."""
        return k_len < self.dense_below

    def dense_from(self, k_len: int) -> int | None:
        """First key position whose query row attends densely under ``dense_last``, or ``None``.

        The last ``dense_last`` of ``k_len`` positions, extended back to the start of the
        :data:`DENSE_LAST_TILE`-aligned tile holding the first of them: a multiple of the tile,
        so the sparse kernel (query tiles of 16, 32 or 64, aligned the same way) runs whole tiles
        dense. At most ``dense_last + DENSE_LAST_TILE - 1`` positions.
        """
        if not self.dense_last:
            return None
        return max(0, k_len - self.dense_last) // DENSE_LAST_TILE * DENSE_LAST_TILE

    def dense_rows(self, q_len: int, k_len: int) -> int:
        """How many of a call's ``q_len`` last query rows (of ``k_len`` positions) attend densely
        under ``dense_last`` (:meth:`dense_from`); ``q_len`` means the whole call is dense."""
        dense_from = self.dense_from(k_len)
        return 0 if dense_from is None else min(q_len, k_len - dense_from)

    def head_groups(self) -> tuple[tuple[HeadPlan, tuple[int, ...]], ...]:
        """Heads grouped by identical plan, in order of first appearance: ``((plan, head_ids), ...)``.

        One estimator call and one kernel launch per group keeps the work batched over heads.
        """
        groups: dict[HeadPlan, list[int]] = {}
        for i, head in enumerate(self.heads):
            groups.setdefault(head, []).append(i)
        return tuple((head, tuple(ids)) for head, ids in groups.items())

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; ``share_kv_groups`` only when true and ``dense_last`` only when positive
        (absent, they read as false and 0)."""
        data: dict[str, Any] = {"dense_below": self.dense_below}
        if self.share_kv_groups:
            data["share_kv_groups"] = True
        if self.dense_last:
            data["dense_last"] = self.dense_last
        data["heads"] = [h.to_dict() for h in self.heads]
        return data

    @classmethod
    def from_dict(cls, data: Any, location: str = "layer") -> LayerPlan:
        _require_keys(location, data, {"heads", "dense_below"}, frozenset({"share_kv_groups", "dense_last"}))
        if not isinstance(data["heads"], list):
            raise TypeError(f"{location}.heads must be a JSON list, got {type(data['heads']).__name__}")
        heads = tuple(HeadPlan.from_dict(h, f"{location}.heads[{i}]") for i, h in enumerate(data["heads"]))
        try:
            return cls(heads=heads, dense_below=data["dense_below"],
                       share_kv_groups=data.get("share_kv_groups", False), dense_last=data.get("dense_last", 0))
        except (ValueError, TypeError) as error:
            raise _where(location, error) from error


def _format_plan_json(data: dict[str, Any]) -> str:
    """JSON text of a plan dict with one line per head, so a plan file is read layer by layer."""
    header = json.dumps({key: value for key, value in data.items() if key != "layers"}, indent=1)
    layers = []
    for layer in data["layers"]:
        heads = ",\n   ".join(json.dumps(head) for head in layer["heads"])
        options = "".join(f'"{key}": {json.dumps(layer[key])}, ' for key in ("share_kv_groups", "dense_last")
                          if key in layer)
        layers.append(f'  {{"dense_below": {json.dumps(layer["dense_below"])}, {options}"heads": [\n   {heads}\n  ]}}')
    return header[:-2] + ',\n "layers": [\n' + ",\n".join(layers) + "\n ]\n}\n"


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Plan:
    """A whole model's plan (see the module docstring for the JSON form).

    Attributes:
        model_id: the model the plan was made for (hub id or a zoo name; ``""`` = not recorded).
        num_layers, num_q_heads, num_kv_heads, head_dim: the attention shape it fits.
        layers: ``num_layers`` :class:`LayerPlan` s.
        model_revision: the model revision (commit, file sha256), if known.
        search: JSON-serializable settings of how the plan was made, e.g. ``{"method": "search",
            "calibration": ..., "length": 32768, "seed": 0}``; read-only.
        created: ISO-8601 creation time (UTC), set on construction.
        library_version: the longinfer version that made it.
    """

    model_id: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    layers: tuple[LayerPlan, ...]
    model_revision: str | None = None
    search: Mapping[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=_utc_now)
    library_version: str = __version__

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str):
            raise TypeError(f"model_id must be a string, got {type(self.model_id).__name__}")
        if self.model_revision is not None and not isinstance(self.model_revision, str):
            raise TypeError(f"model_revision must be a string or None, got {type(self.model_revision).__name__}")
        shape = ModelShape(self.num_layers, self.num_q_heads, self.num_kv_heads, self.head_dim)
        object.__setattr__(self, "layers", tuple(self.layers))
        if len(self.layers) != shape.num_layers:
            raise ValueError(f"plan has {len(self.layers)} layers but num_layers is {shape.num_layers}")
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, LayerPlan):
                raise TypeError(f"layers[{i}] must be a LayerPlan, got {type(layer).__name__}")
            if len(layer.heads) != shape.num_q_heads:
                raise ValueError(f"layers[{i}] has {len(layer.heads)} heads but num_q_heads is {shape.num_q_heads}")
        if not isinstance(self.search, Mapping):
            raise TypeError(f"search must be a mapping, got {type(self.search).__name__}")
        try:
            json.dumps(dict(self.search))
        except (TypeError, ValueError) as error:
            raise TypeError(f"search settings must be JSON-serializable: {error}") from error
        object.__setattr__(self, "search", types.MappingProxyType(copy.deepcopy(dict(self.search))))
        try:
            datetime.datetime.fromisoformat(self.created)
        except (TypeError, ValueError):
            raise ValueError(f"created must be an ISO-8601 date-time string, got {self.created!r}") from None

    @property
    def shape(self) -> ModelShape:
        return ModelShape(self.num_layers, self.num_q_heads, self.num_kv_heads, self.head_dim)

    def check_matches(self, config: Any) -> None:
        """Raise ``ValueError`` unless the model's attention shape equals the plan's.

        Args:
            config: anything :func:`model_shape` accepts (a transformers ``PretrainedConfig``, a dict).

        The error names every differing field with the plan's and the model's value.
        """
        model = model_shape(config)
        diffs = [
            f"{f.name}: plan has {getattr(self.shape, f.name)}, model has {getattr(model, f.name)}"
            for f in dataclasses.fields(ModelShape)
            if getattr(self.shape, f.name) != getattr(model, f.name)
        ]
        if diffs:
            raise ValueError(
                f"plan for model {self.model_id or '(unrecorded)'} does not match this model ({'; '.join(diffs)}); "
                "use a plan made for this model (`longinfer search`) or none (the default plan)"
            )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (see the module docstring)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "model": {
                "id": self.model_id,
                "revision": self.model_revision,
                **dataclasses.asdict(self.shape),
            },
            "created": self.created,
            "library_version": self.library_version,
            "search": copy.deepcopy(dict(self.search)),
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        """Validate and build a plan from its JSON form.

        Raises:
            ValueError: unknown schema version, missing/unknown keys, bad values (the message
                names the location, e.g. ``layers[3].heads[2].params``).
            TypeError: values of the wrong JSON type.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"a plan must be a JSON object, got {type(data).__name__}")
        if "schema_version" not in data:
            raise ValueError("not a longinfer plan: no 'schema_version' key")
        version = data["schema_version"]
        if type(version) is not int or version not in SUPPORTED_SCHEMA_VERSIONS:
            newer = isinstance(version, int) and version > max(SUPPORTED_SCHEMA_VERSIONS)
            hint = "; upgrade longinfer to read it" if newer else ""
            raise ValueError(
                f"unsupported plan schema_version {version!r}: this longinfer ({__version__}) reads "
                f"{list(SUPPORTED_SCHEMA_VERSIONS)}{hint}"
            )
        _require_keys("plan", data, {"schema_version", "model", "created", "library_version", "search", "layers"})
        model = data["model"]
        _require_keys("plan.model", model, {"id", "revision", *(f.name for f in dataclasses.fields(ModelShape))})
        if not isinstance(data["layers"], list):
            raise TypeError(f"plan.layers must be a JSON list, got {type(data['layers']).__name__}")
        layers = tuple(LayerPlan.from_dict(layer, f"layers[{i}]") for i, layer in enumerate(data["layers"]))
        for key in ("created", "library_version"):
            if not isinstance(data[key], str):
                raise TypeError(f"plan.{key} must be a string, got {type(data[key]).__name__}")
        return cls(
            model_id=model["id"],
            model_revision=model["revision"],
            num_layers=model["num_layers"],
            num_q_heads=model["num_q_heads"],
            num_kv_heads=model["num_kv_heads"],
            head_dim=model["head_dim"],
            layers=layers,
            search=data["search"],
            created=data["created"],
            library_version=data["library_version"],
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan as JSON, atomically (a temporary file renamed over ``path``)."""
        path = Path(path)
        text = _format_plan_json(self.to_dict())
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; plans are meant to be shared
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        """Read and validate a plan file; errors name the file and the location inside it."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as error:
            raise _where(str(path), error) from error


def uniform_plan(
    model_config_fields: Any,
    pattern: str,
    params: Mapping[str, Any] | None = None,
    dense_below: int = 0,
    *,
    model_id: str | None = None,
    model_revision: str | None = None,
    search: Mapping[str, Any] | None = None,
    share_kv_groups: bool = False,
    dense_last: int = 0,
) -> Plan:
    """A plan with the same pattern and parameters for every head of every layer.

    Args:
        model_config_fields: anything :func:`model_shape` accepts.
        pattern: a registered pattern name.
        params: the pattern's parameters (missing ones take the config defaults).
        dense_below: per-layer dense threshold (key positions), the same for every layer.
        model_id: defaults to the config's ``name_or_path`` when it has one, else ``""``.
        search: provenance; default ``{"method": "uniform"}``.
        share_kv_groups: one index per KV group (see :class:`LayerPlan`) in every layer.
        dense_last: dense query rows at the end of every sparse call (see :class:`LayerPlan`).
    """
    shape = model_shape(model_config_fields)
    head = HeadPlan.from_params(pattern, params)
    layer = LayerPlan(heads=(head,) * shape.num_q_heads, dense_below=dense_below, share_kv_groups=share_kv_groups,
                      dense_last=dense_last)
    if model_id is None:
        model_id = str(getattr(model_config_fields, "name_or_path", "") or "")
    return Plan(
        model_id=model_id,
        model_revision=model_revision,
        **dataclasses.asdict(shape),
        layers=(layer,) * shape.num_layers,
        search=dict(search) if search is not None else {"method": "uniform"},
    )


def default_plan_for(config: Any, *, model_id: str | None = None, dense_below: int = DEFAULT_DENSE_BELOW,
                     share_kv_groups: bool = False, dense_last: int = DEFAULT_DENSE_LAST,
                     tau: float | None = None, group_columns: bool = True, group_columns_below: int | None = None,
                     min_vertical: int = DEFAULT_PATTERN_CONFIG.min_vertical,
                     min_slash: int = DEFAULT_PATTERN_CONFIG.min_slash,
                     min_slash_share: float = DEFAULT_PATTERN_CONFIG.min_slash_share,
                     floor_from: int = DEFAULT_PATTERN_CONFIG.floor_from,
                     repeat_rows: int = DEFAULT_PATTERN_CONFIG.repeat_rows,
                     question_from: int = DEFAULT_PATTERN_CONFIG.question_from,
                     question_vertical: int = DEFAULT_PATTERN_CONFIG.question_vertical) -> Plan:
    """The plan used when the user gives none.

    Every head of every layer uses :data:`DEFAULT_PATTERN_CONFIG`: vertical-slash from 64 queries
    spread evenly over the prompt (calls of at least :data:`DEFAULT_QUESTION_FROM` query rows add the
    prompt's last 64, where its question sits), with a coverage budget (keep the fewest columns and diagonals,
    ranked together, whose estimated attention mass reaches 0.9; at most 4096 columns and 8192 diagonals; the first
    30 keys and 100 nearest diagonals always kept), every head attending the columns chosen for any
    head of its KV group; calls of at least :data:`DEFAULT_LONG_FROM` query rows (a long prefill, not
    a turn over a long cache) give each head its own columns and at least 3,000 diagonals per 65,536
    query rows (:data:`DEFAULT_SLASH_SHARE`; 3,000 at 64K, 6,000 at 128K). Layers
    run dense below ``dense_below`` key positions (default :data:`DEFAULT_DENSE_BELOW`), and the
    last ``dense_last`` query rows of every sparse call attend densely (default
    :data:`DEFAULT_DENSE_LAST`). Recorded as ``search={"method": "default"}``.

    Args:
        config: anything :func:`model_shape` accepts.
        share_kv_groups: estimate one index per KV group (the union of its heads' selections), so
            the kernels share K/V loads between the group's query heads (see :class:`LayerPlan`).
        dense_last: dense query rows at the end of every sparse call (0: none).
        tau: the coverage target instead of the default's 0.9, in (0, 1]. Measured on
            Qwen2.5-Coder-1.5B (RULER-style at 32K, dense 76.0; README's speed-or-accuracy table):
            per head, 0.98 scores 67.4 against the default's 65.1; with ``share_kv_groups``,
            0.8 scores 74.5 at 1.54x dense attention speed on a 4K turn, 0.9 74.4 at 1.35x.
        group_columns: each head attends its KV group's columns (the default, 74.9 at 2.21x on that
            turn); ``False`` gives each head only its own columns: faster (2.71x), less accurate
            (65.1; ``docs/results/ruler-frontier-q15-32k/``).
        group_columns_below: share the group's columns only on calls of fewer query rows than this
            (0 = on every call; ``None``: the default's :data:`DEFAULT_LONG_FROM` with
            ``group_columns``, 0 without).
        min_vertical, min_slash, floor_from: a floor of columns / diagonals per head, on calls of at
            least ``floor_from`` query rows (see :class:`~longinfer.patterns.VerticalSlashConfig`,
            ``thresholds_on``); ``0, 0`` for none. The default's 0 / 3,000 from 65,536 query rows: at
            128K, 68.6 RULER-style against 61.6 without (dense 71.0) at 1.45x TTFT instead of 1.85x;
            1,000 / 3,000 68.7 at 1.42x, 1,000 / 0 57.5 (``docs/results/gpu-session17/``).
        min_slash_share: the diagonal floor grows with the call: at least this share of its query rows
            (``min_slash`` the lower bound; 0 = ``min_slash`` alone, the floor of before session 26: at
            128K faster, 1.57x instead of 1.28x TTFT, and 2.7 RULER-style points further from dense).
        repeat_rows: extra estimation queries at distant repeated token 4-grams (see
            :class:`~longinfer.patterns.VerticalSlashConfig`; a patched model passes its token ids).
            64 of them: no RULER-style gain at 64K / 128K, a 4K turn 27% slower (session 23).
        question_from: calls of at least this many query rows add the last 64 queries to the 64
            strided ones (0 = never; the default's :data:`DEFAULT_QUESTION_FROM`: see there).
        question_vertical: on those calls each head also keeps this many columns ranked by the
            question's queries alone (0 = none, the default; see
            :class:`~longinfer.patterns.VerticalSlashConfig`). Not yet measured on the GPU.
    """
    if group_columns_below is None:
        group_columns_below = DEFAULT_PATTERN_CONFIG.group_columns_below if group_columns else 0
    pattern = dataclasses.replace(DEFAULT_PATTERN_CONFIG, group_columns=group_columns,
                                  group_columns_below=group_columns_below, min_vertical=min_vertical,
                                  min_slash=min_slash, min_slash_share=min_slash_share, floor_from=floor_from,
                                  repeat_rows=repeat_rows,
                                  question_from=question_from,
                                  question_vertical=question_vertical)
    if tau is not None:
        pattern = dataclasses.replace(pattern, tau=tau)
    return uniform_plan(
        config,
        "vertical_slash",
        config_to_params(pattern),
        dense_below,
        model_id=model_id,
        search={"method": "default"},
        share_kv_groups=share_kv_groups,
        dense_last=dense_last,
    )


def rule_digest(rule: Any) -> str:
    """16 hex digits identifying a JSON-ready description of attention rules (sorted keys)."""
    return hashlib.sha256(json.dumps(rule, sort_keys=True).encode()).hexdigest()[:16]


def layers_digest(plan: Plan) -> str:
    """:func:`rule_digest` of a plan's per-layer rules: its provenance (model id, date) aside, two
    plans with the same digest attend alike."""
    return rule_digest([layer.to_dict() for layer in plan.layers])


def default_rule_digest() -> str:
    """:func:`rule_digest` of the default plan's rule (pattern parameters, ``dense_below``,
    ``dense_last``): it changes when the default does, whatever the model."""
    return rule_digest({"pattern": "vertical_slash", "params": config_to_params(DEFAULT_PATTERN_CONFIG),
                        "dense_below": DEFAULT_DENSE_BELOW, "dense_last": DEFAULT_DENSE_LAST})


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
