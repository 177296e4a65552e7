"""Plan schema: round trips, validation against the registry and the model, version errors."""

import dataclasses
import json
import os
from pathlib import Path

import pytest
import transformers

from longinfer.patterns import BlockSparseConfig, VerticalSlashConfig
from longinfer.plans import (
    DEFAULT_DENSE_LAST,
    DEFAULT_LONG_FROM,
    DEFAULT_PATTERN_CONFIG,
    DEFAULT_QUESTION_FROM,
    SCHEMA_VERSION,
    HeadPlan,
    LayerPlan,
    ModelShape,
    Plan,
    default_plan_for,
    model_shape,
    uniform_plan,
)
from longinfer.plans.schema import layers_digest

SHAPE = {"num_layers": 3, "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 16}


def _mixed_plan() -> Plan:
    heads = (
        HeadPlan.from_params("vertical_slash", {"num_vertical": 64, "num_slash": 128, "budget": "coverage", "tau": 0.8}),
        HeadPlan.from_params("block_sparse", {"num_blocks": 8}),
        HeadPlan.from_params("a_shape", {"sink": 4, "window": 64}),
        HeadPlan.from_params("dense"),
    )
    layers = (LayerPlan(heads, dense_below=0), LayerPlan(heads[::-1], dense_below=1024), LayerPlan(heads, 7))
    return Plan(model_id="tiny/model", model_revision="abc123", **SHAPE, layers=layers,
                search={"method": "search", "length": 4096, "candidates": [["vertical_slash", 0.9]]})


def test_round_trip_through_file(tmp_path):
    plan = _mixed_plan()
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = Plan.load(path)
    assert loaded == plan
    assert loaded.layers[0].heads[0].config == VerticalSlashConfig(num_vertical=64, num_slash=128, budget="coverage", tau=0.8)
    assert loaded.layers[1].heads[2].config == BlockSparseConfig(num_blocks=8)
    data = json.loads(path.read_text())
    assert data["schema_version"] == SCHEMA_VERSION
    # Every parameter is written out, defaults included (but those added after plan digests, when unset).
    assert set(data["layers"][0]["heads"][0]["params"]) == set(VerticalSlashConfig.__dataclass_fields__) - {
        "floor_from", "group_columns_below", "thresholds_on", "repeat_rows", "repeat_ngram", "repeat_distance",
        "question_from", "question_vertical", "min_slash_share"}
    assert data["model"] == {"id": "tiny/model", "revision": "abc123", **SHAPE}


def test_share_kv_groups_round_trips_and_old_files_read_as_false(tmp_path):
    plan = _mixed_plan()
    shared = dataclasses.replace(plan, layers=(plan.layers[0], dataclasses.replace(plan.layers[1], share_kv_groups=True),
                                               plan.layers[2]))
    path = tmp_path / "shared.json"
    shared.save(path)
    loaded = Plan.load(path)
    assert loaded == shared and loaded != plan
    assert [layer.share_kv_groups for layer in loaded.layers] == [False, True, False]
    data = json.loads(path.read_text())
    assert data["layers"][1]["share_kv_groups"] is True
    # A layer without the flag writes no key, so files stay what schema 1 always was ...
    assert "share_kv_groups" not in data["layers"][0]
    plan.save(tmp_path / "plain.json")
    assert "share_kv_groups" not in (tmp_path / "plain.json").read_text()
    # ... and a file written before the flag existed (no key anywhere) loads with it off.
    old = plan.to_dict()
    for layer in old["layers"]:
        layer.pop("share_kv_groups", None)
    assert all(not layer.share_kv_groups for layer in Plan.from_dict(old).layers)
    with pytest.raises(TypeError, match="share_kv_groups must be true or false"):
        LayerPlan(plan.layers[0].heads, share_kv_groups="yes")


def test_added_fields_are_written_only_when_set_and_old_digests_hold(tmp_path):
    """`floor_from` and `group_columns_below` (added after eval records began to carry plan digests)
    round-trip when set and are left out of the JSON and the digest when not: the plan file of a
    committed GPU run still has the digest its records carry (a resumed run finds them)."""
    for name, extra, value in (("floor_from", {"min_slash": 8}, 4096),
                               ("group_columns_below", {"group_columns": True}, 4096),
                               ("thresholds_on", {}, "queries")):
        set_here = HeadPlan.from_params("vertical_slash", {"budget": "coverage", **extra, name: value})
        assert set_here.params[name] == value and name not in HeadPlan.from_params("vertical_slash").params
        assert HeadPlan.from_dict(set_here.to_dict()) == set_here
    plan_file = "docs/results/gpu-session13/plans/q15-floor-v1000-s3000-tail.json"
    records = "docs/results/gpu-session15/q15-floors-128k/ruler.jsonl"
    with open(records) as lines:
        recorded = {json.loads(line).get("plan_digest") for line in lines if "floor-v1000" in line}
    assert recorded == {layers_digest(Plan.load(plan_file))}


def test_dense_last_round_trips_and_is_validated(tmp_path):
    plan = _mixed_plan()
    tailed = dataclasses.replace(plan, layers=(dataclasses.replace(plan.layers[0], dense_last=128),) + plan.layers[1:])
    path = tmp_path / "tail.json"
    tailed.save(path)
    assert Plan.load(path) == tailed
    data = json.loads(path.read_text())
    assert data["layers"][0]["dense_last"] == 128 and "dense_last" not in data["layers"][1]
    assert Plan.from_dict(plan.to_dict()).layers[0].dense_last == 0  # absent reads as 0
    with pytest.raises(ValueError, match="dense_last"):
        LayerPlan(plan.layers[0].heads, dense_last=-1)


@pytest.mark.parametrize("dense_last, k_len, expected", [
    (0, 5000, None),  # no tail
    (128, 131072, 131072 - 128),  # aligned: exactly the last 128 rows
    (128, 1000, 832),  # position 872 lies in the tile starting at 832: 168 rows
    (40, 30, 0),  # more rows than positions: every row
])
def test_dense_last_rounds_out_to_whole_tiles(dense_last, k_len, expected):
    layer = LayerPlan(_mixed_plan().layers[0].heads, dense_last=dense_last)
    assert layer.dense_from(k_len) == expected


def test_saved_plan_is_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        _mixed_plan().save(tmp_path / "plan.json")
    finally:
        os.umask(old)
    assert (tmp_path / "plan.json").stat().st_mode & 0o777 == 0o644


def test_plan_is_immutable():
    plan = _mixed_plan()
    with pytest.raises(TypeError):
        plan.search["method"] = "x"
    with pytest.raises(AttributeError):
        plan.num_layers = 4


def test_head_groups_and_dense_threshold():
    layer = _mixed_plan().layers[0]
    groups = layer.head_groups()
    assert [ids for _, ids in groups] == [(0,), (1,), (2,), (3,)]
    uniform = uniform_plan(SHAPE, "a_shape", {"sink": 1, "window": 2}, dense_below=100).layers[1]
    assert uniform.head_groups() == ((uniform.heads[0], (0, 1, 2, 3)),)
    assert uniform.runs_dense(99) and not uniform.runs_dense(100)


def test_check_matches_names_the_field():
    plan = uniform_plan(SHAPE, "dense")
    plan.check_matches(dict(SHAPE))
    plan.check_matches(ModelShape(**SHAPE))
    with pytest.raises(ValueError, match=r"num_kv_heads: plan has 2, model has 4"):
        plan.check_matches({**SHAPE, "num_kv_heads": 4})
    with pytest.raises(ValueError, match=r"num_layers: plan has 3, model has 5.*head_dim: plan has 16, model has 32"):
        plan.check_matches({**SHAPE, "num_layers": 5, "head_dim": 32})
    with pytest.raises(ValueError, match="missing"):
        plan.check_matches({"num_layers": 3})


def test_check_matches_transformers_config():
    cfg = transformers.Qwen2Config(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    assert model_shape(cfg) == ModelShape(**SHAPE)
    uniform_plan(SHAPE, "dense").check_matches(cfg)
    mha = transformers.LlamaConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=None,
                                   hidden_size=64)
    with pytest.raises(ValueError, match="num_kv_heads: plan has 2, model has 4"):
        uniform_plan(SHAPE, "dense").check_matches(mha)


def _saved(tmp_path, mutate) -> str:
    data = _mixed_plan().to_dict()
    mutate(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("version", [2, 0, "1", 1.0, True, None])
def test_unknown_schema_version(tmp_path, version):
    path = _saved(tmp_path, lambda d: d.update(schema_version=version))
    with pytest.raises(ValueError, match="unsupported plan schema_version"):
        Plan.load(path)


def test_newer_version_says_upgrade(tmp_path):
    with pytest.raises(ValueError, match="upgrade longinfer"):
        Plan.load(_saved(tmp_path, lambda d: d.update(schema_version=SCHEMA_VERSION + 1)))


def test_missing_version_is_not_a_plan(tmp_path):
    with pytest.raises(ValueError, match="not a longinfer plan"):
        Plan.load(_saved(tmp_path, lambda d: d.pop("schema_version")))


@pytest.mark.parametrize(
    "mutate,error,message",
    [
        (lambda d: d["layers"][1]["heads"][2].update(pattern="nope"), ValueError, r"layers\[1\].heads\[2\].*unknown pattern 'nope'"),
        (lambda d: d["layers"][0]["heads"][0]["params"].update(colour=1), ValueError, r"layers\[0\].heads\[0\].*unknown parameter.*colour"),
        (lambda d: d["layers"][0]["heads"][0]["params"].update(tau=1.5), ValueError, r"tau must lie in"),
        (lambda d: d["layers"][0]["heads"][0]["params"].update(last_q="64"), TypeError, r"last_q must be int"),
        (lambda d: d["layers"][0]["heads"][0]["params"].update(sink=200, num_vertical=64), ValueError, "raise num_vertical"),
        (lambda d: d["layers"][2]["heads"].pop(), ValueError, r"layers\[2\] has 3 heads but num_q_heads is 4"),
        (lambda d: d["layers"].pop(), ValueError, "plan has 2 layers but num_layers is 3"),
        (lambda d: d["layers"][0].update(dense_below=-1), ValueError, "dense_below must be >= 0"),
        (lambda d: d["layers"][1].update(share_kv_groups=1), TypeError, r"layers\[1\].*share_kv_groups must be true or false"),
        (lambda d: d["layers"][1].update(share_kv_group=True), ValueError, r"layers\[1\] has unknown key.*share_kv_group"),
        (lambda d: d["model"].pop("head_dim"), ValueError, r"plan.model is missing \['head_dim'\]"),
        (lambda d: d.update(extra=1), ValueError, r"unknown key\(s\) \['extra'\]"),
        (lambda d: d["model"].update(num_kv_heads=3), ValueError, "multiple of num_kv_heads"),
        (lambda d: d.update(created="yesterday"), ValueError, "ISO-8601"),
    ],
)
def test_invalid_plans_are_rejected_with_location(tmp_path, mutate, error, message):
    path = _saved(tmp_path, mutate)
    with pytest.raises(error, match=message) as info:
        Plan.load(path)
    assert str(path) in str(info.value)


def test_invalid_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Plan.load(path)


def test_uniform_and_default_plan():
    cfg = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, hidden_size=96,
                                   name_or_path="tiny/llama")
    plan = default_plan_for(cfg)
    assert plan.model_id == "tiny/llama"
    assert plan.search["method"] == "default"
    assert all(h.config == DEFAULT_PATTERN_CONFIG for layer in plan.layers for h in layer.heads)
    assert DEFAULT_PATTERN_CONFIG.budget == "coverage"
    assert len(plan.layers) == 2 and len(plan.layers[0].heads) == 6
    assert not any(layer.share_kv_groups for layer in plan.layers)
    assert all(layer.dense_last == DEFAULT_DENSE_LAST for layer in plan.layers)
    assert all(layer.dense_last == 0 for layer in default_plan_for(cfg, dense_last=0).layers)
    assert all(layer.share_kv_groups for layer in default_plan_for(cfg, share_kv_groups=True).layers)
    accurate = default_plan_for(cfg, share_kv_groups=True, tau=0.8)
    assert all(h.config == dataclasses.replace(DEFAULT_PATTERN_CONFIG, tau=0.8) for layer in accurate.layers
               for h in layer.heads)
    assert DEFAULT_PATTERN_CONFIG.group_columns
    per_head = default_plan_for(cfg, group_columns=False, tau=0.95)  # group_columns_below follows: 0
    assert all(h.config == dataclasses.replace(DEFAULT_PATTERN_CONFIG, group_columns=False, group_columns_below=0,
                                               tau=0.95)
               for layer in per_head.layers for h in layer.heads)
    # the long-context rule: prefill calls of DEFAULT_LONG_FROM query rows or more get per-head columns
    # and the floor of 3,000 diagonals (no column floor); a turn of 4K rows over a longer cache keeps the shared columns
    rule = DEFAULT_PATTERN_CONFIG
    short = rule.for_call(DEFAULT_LONG_FROM - 1, DEFAULT_LONG_FROM - 1)
    long = rule.for_call(DEFAULT_LONG_FROM, DEFAULT_LONG_FROM)
    assert short.floors(10**6) == (0, 0) and short.shares_group_columns(10**6)
    assert long.floors(0) == (0, 3000) and not long.shares_group_columns(0)
    # (a turn also keeps its 64 strided estimation queries: see the question rows' test)
    assert rule.for_call(4096, 4 * DEFAULT_LONG_FROM) == dataclasses.replace(short, last_q=64, query_sampling="strided")
    with pytest.raises(ValueError, match=r"resolve it for the call first with config.for_call\(q_len, k_len\)"):
        rule.floors(DEFAULT_LONG_FROM)
    session_15 = default_plan_for(cfg, min_vertical=0, min_slash=0, min_slash_share=0.0, group_columns_below=0)
    assert all(h.config.for_call(10**6, 10**6).shares_group_columns(10**6)
               and h.config.for_call(10**6, 10**6).floors(10**6) == (0, 0)
               for layer in session_15.layers for h in layer.heads)
    with pytest.raises(ValueError, match="group_columns_below limits group_columns"):
        default_plan_for(cfg, group_columns=False, group_columns_below=4096)
    with pytest.raises(ValueError, match=r"tau must lie in \(0, 1\]"):
        default_plan_for(cfg, tau=1.5)
    assert all(layer.share_kv_groups for layer in uniform_plan(cfg, "block_sparse", share_kv_groups=True).layers)
    plan.check_matches(cfg)
    with pytest.raises(ValueError, match="unknown pattern"):
        uniform_plan(cfg, "triangle_mix")
    with pytest.raises(ValueError, match="unknown parameter"):
        uniform_plan(cfg, "a_shape", {"sinks": 3})


def test_head_plan_checks_config_type():
    with pytest.raises(TypeError, match="takes a VerticalSlashConfig"):
        HeadPlan("vertical_slash", BlockSparseConfig())
    assert HeadPlan.from_config(BlockSparseConfig()).pattern == "block_sparse"


MEASURED_MIXED_PLAN = Path(__file__).parents[1] / "docs/results/gpu-session23/plans/q15-long-mixed128-tail.json"


def test_default_adds_the_question_rows_to_long_prefills_as_measured():
    """Calls of at least DEFAULT_QUESTION_FROM query rows run the default exactly as the plan measured
    in session 24 (64 strided + the last 64 queries, on every call), shorter ones (a 4K turn) with the
    64 strided queries of before; the option is written to the plan and read back."""
    measured = Plan.load(MEASURED_MIXED_PLAN).layers[0].heads[0].config
    assert dataclasses.replace(DEFAULT_PATTERN_CONFIG, last_q=128, query_sampling="mixed", question_from=0,
                               min_slash_share=0.0) == measured
    for rows in (DEFAULT_QUESTION_FROM, 32768, 65536):  # (longer prefills: a longer diagonal floor since session 26)
        assert DEFAULT_PATTERN_CONFIG.for_call(rows, rows) == measured.for_call(rows, rows), rows
    turn = DEFAULT_PATTERN_CONFIG.for_call(4096, 4096 + 65536)
    assert (turn.last_q, turn.query_sampling) == (64, "strided")
    assert DEFAULT_PATTERN_CONFIG.for_call(DEFAULT_QUESTION_FROM - 1, 10**6).last_q == 64
    cfg = transformers.LlamaConfig(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    params = default_plan_for(cfg).to_dict()["layers"][0]["heads"][0]["params"]
    assert params["question_from"] == DEFAULT_QUESTION_FROM
    without = default_plan_for(cfg, question_from=0)
    assert "question_from" not in without.to_dict()["layers"][0]["heads"][0]["params"]
    assert all(h.config.for_call(10**5, 10**5).last_q == 64 for h in without.layers[0].heads)


MEASURED_FROM_16K_PLAN = Path(__file__).parents[1] / "docs/results/gpu-session24/plans/q15-from16k-question-tail.json"
MEASURED_S6000_PLAN = Path(__file__).parents[1] / "docs/results/gpu-session24/plans/q15-question-s6000-tail.json"
SESSION_26_DEFAULT = Path(__file__).parents[1] / "docs/results/gpu-session26/plans/q15-default-tail.json"


def test_default_runs_the_measured_indexes_at_every_measured_length():
    """The default is the session-26 plan file; each call it makes is the call of a plan measured on the
    GPU: below 131,072 query rows the plan measured sparse from 16,384 keys (session 25; its 3,000
    diagonals from 65,536 rows, as measured at 64K in session 24), at 131,072 rows the plan with 6,000
    diagonals (RULER-style at 128K, sessions 25 / 26); a layer runs dense one key below 16,384."""
    shape = {"num_layers": 28, "num_q_heads": 12, "num_kv_heads": 2, "head_dim": 128}
    default = default_plan_for(shape, model_id="qwen2.5-coder-1.5b")
    assert layers_digest(default) == layers_digest(Plan.load(SESSION_26_DEFAULT))
    assert default.layers[0].runs_dense(16383) and not default.layers[0].runs_dense(16384)
    ours = default.layers[0].heads[0].config
    from_16k = Plan.load(MEASURED_FROM_16K_PLAN)
    assert from_16k.layers[0].dense_below == default.layers[0].dense_below
    for rows in (16384, 32768, 65536):
        assert ours.for_call(rows, rows) == from_16k.layers[0].heads[0].config.for_call(rows, rows), rows
    s6000 = Plan.load(MEASURED_S6000_PLAN).layers[0].heads[0].config
    assert ours.for_call(131072, 131072) == s6000.for_call(131072, 131072)
    assert ours.for_call(4096, 4096 + 131072).min_slash == 0  # a turn over a long cache: no floor


def test_diagonal_floor_grows_with_the_call():
    """``min_slash_share``: at least ``ceil(share * n)`` diagonals where ``n`` is the counted length,
    ``min_slash`` the lower bound, ``num_slash`` the upper; nothing below ``floor_from``."""
    config = VerticalSlashConfig(budget="coverage", num_slash=8192, min_slash=3000, min_slash_share=3000 / 65536,
                                 floor_from=65536)
    assert [config.floors(n)[1] for n in (65535, 65536, 100000, 131072, 174762, 174763, 10**6)] == [
        0, 3000, 4578, 6000, 8000, 8001, 8192]  # 4577.6 -> 4578; 174,762.67 rows -> 8,000
    low = dataclasses.replace(config, min_slash=5000)
    assert low.floors(65536)[1] == 5000 and low.floors(131072)[1] == 6000
    by_rows = dataclasses.replace(config, thresholds_on="queries")
    resolved = by_rows.for_call(131072, 131072)
    assert (resolved.min_slash, resolved.min_slash_share, resolved.floor_from) == (6000, 0.0, 0)
    for share in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"min_slash_share must lie in \[0, 1\]"):
            dataclasses.replace(config, min_slash_share=share)


def test_default_plan_takes_question_columns_only_with_question_rows():
    shape = {"num_layers": 2, "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 64}
    params = default_plan_for(shape, question_vertical=1000).to_dict()["layers"][0]["heads"][0]["params"]
    assert params["question_vertical"] == 1000 and params["question_from"] == DEFAULT_QUESTION_FROM
    assert "question_vertical" not in default_plan_for(shape).to_dict()["layers"][0]["heads"][0]["params"]
    with pytest.raises(ValueError, match="question_vertical keeps the columns of the question's queries"):
        default_plan_for(shape, question_from=0, question_vertical=1000)
