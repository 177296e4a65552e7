"""The recall-density frontier end to end on a tiny random Llama: values, files, resume, CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from longinfer.cli import main as cli_main
from longinfer.eval import recall as frontier
from longinfer.eval.capture import capture_qk
from longinfer.eval.recall import (
    EstimatorMethod,
    FrontierRun,
    OracleMethod,
    PlanMethod,
    parse_method_spec,
    render_frontier_report,
    resolve_methods,
    run_frontier,
    summarize,
)
from longinfer.eval.results import ResultStore
from longinfer.models import zoo
from longinfer.patterns import AShapeConfig, BlockSparseConfig, VerticalSlashConfig, attention_recall, sample_rows
from longinfer.plans.schema import HeadPlan, LayerPlan, Plan
from tests.benchmark_scripts import load_benchmark
from tests.test_eval_fixtures import corpus_text, make_tiny_llama, make_tokenizer

VOCAB = 211
N = 384
ROWS = 24
VS_SMALL = VerticalSlashConfig(num_vertical=16, num_slash=8, last_q=32, sink=4, local=4, block_size=16)


def _peaked_llama(seed: int = 1):
    """A tiny random Llama whose attention is far from uniform (queries and keys scaled up)."""
    model = make_tiny_llama(VOCAB, seed=seed)
    with torch.no_grad():
        for block in model.model.layers:
            block.self_attn.q_proj.weight.mul_(10.0)
            block.self_attn.k_proj.weight.mul_(10.0)
    return model


@pytest.fixture(scope="module")
def model():
    return _peaked_llama()


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, VOCAB, (1, N), generator=torch.Generator().manual_seed(0))


def _methods():
    return [
        EstimatorMethod("vs-small", VS_SMALL),
        EstimatorMethod("vs-cov", VerticalSlashConfig(num_vertical=64, num_slash=32, last_q=64, sink=4, local=4,
                                                      block_size=16, budget="coverage", tau=0.8), per_kv_group=True),
        EstimatorMethod("bs-4", BlockSparseConfig(num_blocks=4, block_size=16)),
        EstimatorMethod("everything", AShapeConfig(sink=0, window=N)),
    ]


ORACLES = [OracleMethod("key", (0.05, 0.1)), OracleMethod("block", (0.1,), block_size=16)]


def _run(model, input_ids, out, methods=None, **kwargs):
    return run_frontier(model, input_ids, FrontierRun("tiny", N, ROWS, seed=3, text="random"),
                        _methods() if methods is None else methods, out, oracles=ORACLES, **kwargs)


def _by_method_layer(path: Path) -> dict[tuple[str, int], dict]:
    return {(r["method"], r["layer"]): r for r in ResultStore(path).records()}


def test_end_to_end_values_and_files(tmp_path, model, input_ids):
    jsonl = _run(model, input_ids, tmp_path)
    records = _by_method_layer(jsonl)
    names = ["vs-small", "vs-cov", "bs-4", "everything", "oracle-key@5%", "oracle-key@10%", "oracle-block16@10%"]
    assert sorted(records) == sorted((m, layer) for m in names for layer in (0, 1))
    for layer in (0, 1):
        full = records[("everything", layer)]
        assert full["head_recall"] == pytest.approx([1.0] * 4, abs=1e-5)
        assert full["head_density"] == pytest.approx([1.0] * 4)
        low, high = records[("oracle-key@5%", layer)], records[("oracle-key@10%", layer)]
        assert all(a <= b + 1e-6 for a, b in zip(low["head_recall"], high["head_recall"]))
        assert 0.04 < low["mean_density"] < 0.07  # ceil(5% of each row's keys)
        assert records[("vs-small", layer)]["params"]["num_vertical"] == 16
        assert records[("vs-cov", layer)]["per_kv_group"] is True
    # Attention is peaked: the 10% key oracle keeps far more than 10% of the mass.
    assert min(records[("oracle-key@10%", 1)]["head_recall"]) > 0.3

    # The recorded numbers are attention_recall on the captured q/k with the same rows.
    captured = capture_qk(model, input_ids, layers=[1])[1]
    rows = sample_rows(N, N, ROWS, seed=3)
    from longinfer.patterns import estimate_vertical_slash

    selection = estimate_vertical_slash(captured.q, captured.k, VS_SMALL, sm_scale=captured.sm_scale)
    direct = attention_recall(captured.q, captured.k, selection, rows, sm_scale=captured.sm_scale)
    assert records[("vs-small", 1)]["head_recall"] == pytest.approx(direct.head_recall[0].tolist(), abs=1e-5)
    assert records[("vs-small", 1)]["head_density"] == pytest.approx(direct.head_density[0].tolist(), abs=1e-5)

    report = render_frontier_report(jsonl)[0]
    for name in ("recall.md", "recall_summary.csv", "recall_summary.json", "recall_heads.csv",
                 "recall_frontier.png", "recall_heads.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "recall_frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(tmp_path.iterdir())) == 7  # a GPU run brings back at most 8 files: room for a log
    text = report.read_text()
    assert "| oracle-key@10% |" in text and "| vs-small |" in text and "oracle-key@5%" in text
    assert "- `vs-cov`: vertical_slash(block_size=16, budget=coverage, " in text and "union per KV group" in text
    summary = {m["name"]: m for m in json.loads((tmp_path / "recall_summary.json").read_text())["methods"]}
    with open(tmp_path / "recall_heads.csv") as handle:
        heads = list(csv.DictReader(handle))
    vs_heads = [float(h["recall"]) for h in heads if h["method"] == "vs-small"]
    assert len(vs_heads) == 8
    assert summary["vs-small"]["mean_recall"] == pytest.approx(sum(vs_heads) / 8)
    assert summary["vs-small"]["min_recall"] == pytest.approx(min(vs_heads))


def test_resume_after_kill_and_with_a_new_method(tmp_path, model, input_ids, monkeypatch):
    jsonl = _run(model, input_ids, tmp_path)
    complete = _by_method_layer(jsonl)
    lines = jsonl.read_bytes().split(b"\n")
    jsonl.write_bytes(b"\n".join(lines[:5]) + b"\n" + lines[5][:40])  # killed mid-write of record 6
    _run(model, input_ids, tmp_path)
    records = ResultStore(jsonl).records()
    keys = [(r["method"], r["case_id"]) for r in records]
    assert len(keys) == len(set(keys)) == len(complete)
    for key, record in _by_method_layer(jsonl).items():  # deterministic: re-measured == first measurement
        assert record["head_recall"] == pytest.approx(complete[key]["head_recall"], abs=1e-6)

    def no_forward(*args, **kwargs):
        raise AssertionError("nothing left to measure, yet a forward pass was started")

    monkeypatch.setattr("longinfer.eval.capture.capture_qk", no_forward)
    _run(model, input_ids, tmp_path)
    assert len(ResultStore(jsonl).records()) == len(complete)
    monkeypatch.undo()

    extra = EstimatorMethod("bs-2", BlockSparseConfig(num_blocks=2, block_size=16))
    _run(model, input_ids, tmp_path, methods=[*_methods(), extra])
    added = ResultStore(jsonl).records()[len(complete):]
    assert sorted((r["method"], r["layer"]) for r in added) == [("bs-2", 0), ("bs-2", 1)]

    changed = EstimatorMethod("vs-small", VerticalSlashConfig(num_vertical=20, num_slash=8, last_q=32, sink=4,
                                                              local=4, block_size=16))
    with pytest.raises(ValueError, match="different definition"):
        _run(model, input_ids, tmp_path, methods=[changed])


OLD_FIELDS = ("query_sampling", "rank", "max_density", "min_gain", "split_halves")


def test_resume_accepts_records_written_before_config_fields_existed(tmp_path, model, input_ids, monkeypatch):
    """An older recall.jsonl lacks config fields added since: they count as their defaults."""
    methods = _methods()[:2]
    jsonl = _run(model, input_ids, tmp_path, methods=methods)
    records = ResultStore(jsonl).records()
    for record in records:
        if record.get("pattern") == "vertical_slash":
            for name in OLD_FIELDS:
                del record["params"][name]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))

    def no_forward(*args, **kwargs):
        raise AssertionError("the old records should count as done, yet a forward pass was started")

    monkeypatch.setattr("longinfer.eval.capture.capture_qk", no_forward)
    _run(model, input_ids, tmp_path, methods=methods)  # resumes: nothing to measure
    assert len(ResultStore(jsonl).records()) == len(records)

    # A new field set away from its default is a different method than the old records.
    strided = EstimatorMethod("vs-small", dataclasses.replace(VS_SMALL, query_sampling="strided"))
    with pytest.raises(ValueError, match="different definition"):
        _run(model, input_ids, tmp_path, methods=[strided])
    # A stored field the config does not have is still a difference, not filled over.
    records[0]["params"]["colour"] = 1
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match="different definition"):
        _run(model, input_ids, tmp_path, methods=methods)


def test_plan_scores_each_head_with_its_own_pattern(tmp_path, model, input_ids):
    vs_head = HeadPlan.from_config(VS_SMALL)
    a_head = HeadPlan.from_config(AShapeConfig(sink=8, window=32))
    layers = (LayerPlan(heads=(vs_head, a_head, a_head, vs_head)), LayerPlan(heads=(vs_head,) * 4, dense_below=N + 1))
    plan = Plan(model_id="tiny", num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=8, layers=layers)
    plan.save(tmp_path / "plan.json")
    methods = resolve_methods([parse_method_spec(f"mixed=plan:{tmp_path / 'plan.json'}"), EstimatorMethod("vs", VS_SMALL),
                               EstimatorMethod("a", AShapeConfig(sink=8, window=32))], model.config)
    jsonl = run_frontier(model, input_ids, FrontierRun("tiny", N, ROWS), methods, tmp_path, layers=[0, 1])
    got = _by_method_layer(jsonl)
    mixed, vs, a = (got[(name, 0)]["head_recall"] for name in ("mixed", "vs", "a"))
    assert mixed == pytest.approx([vs[0], a[1], a[2], vs[3]], abs=1e-6)
    assert got[("mixed", 1)]["head_recall"] == pytest.approx([1.0] * 4, abs=1e-5)  # runs dense at this length
    assert got[("mixed", 1)]["head_density"] == pytest.approx([1.0] * 4)

    edited = Plan(model_id="tiny", num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=8, layers=layers[::-1])
    edited.save(tmp_path / "plan.json")  # same file name, different plan: not the same method any more
    with pytest.raises(ValueError, match="different definition"):
        run_frontier(model, input_ids, FrontierRun("tiny", N, ROWS),
                     resolve_methods([parse_method_spec(f"mixed=plan:{tmp_path / 'plan.json'}")], model.config), tmp_path)


def test_plan_sharing_kv_groups_scores_like_the_per_kv_group_estimator(tmp_path, model, input_ids):
    vs_cov = VerticalSlashConfig(num_vertical=64, num_slash=32, last_q=64, sink=4, local=4, block_size=16,
                                 budget="coverage", tau=0.8)
    head = HeadPlan.from_config(vs_cov)
    layers = (LayerPlan(heads=(head,) * 4, share_kv_groups=True),) * 2
    Plan(model_id="tiny", num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=8, layers=layers).save(tmp_path / "kv.json")
    methods = resolve_methods([parse_method_spec(f"kv-plan=plan:{tmp_path / 'kv.json'}"),
                               EstimatorMethod("kv", vs_cov, per_kv_group=True), EstimatorMethod("heads", vs_cov)],
                              model.config)
    got = _by_method_layer(run_frontier(model, input_ids, FrontierRun("tiny", N, ROWS), methods, tmp_path, layers=[0]))
    assert got[("kv-plan", 0)]["head_recall"] == pytest.approx(got[("kv", 0)]["head_recall"], abs=1e-6)
    assert got[("kv-plan", 0)]["head_density"] == pytest.approx(got[("kv", 0)]["head_density"], abs=1e-6)
    assert got[("kv", 0)]["mean_density"] > got[("heads", 0)]["mean_density"]  # the union keeps more


def test_exact_lines_scores_only_the_chosen_columns_and_diagonals(tmp_path, model, input_ids):
    """The lines-only view of an estimate keeps a subset of the kernel's set: lower density and
    recall, and its density is the count of (row, key) pairs on a chosen column or diagonal."""
    lines = parse_method_spec(f"vs-lines=vertical_slash:{_spec_params(VS_SMALL)},exact_lines=true")
    assert lines.exact_lines and lines.describe()["exact_lines"] is True
    methods = [EstimatorMethod("vs", VS_SMALL), lines]
    got = _by_method_layer(run_frontier(model, input_ids, FrontierRun("tiny", N, ROWS), methods, tmp_path, layers=[0]))
    wide, exact = got[("vs", 0)], got[("vs-lines", 0)]
    assert all(e <= w + 1e-6 for e, w in zip(exact["head_recall"], wide["head_recall"]))
    assert exact["mean_density"] < wide["mean_density"]

    captured = capture_qk(model, input_ids, layers=[0])[0]
    selection = lines.index(captured.q, captured.k, layer=0, sm_scale=captured.sm_scale)
    rows = FrontierRun("tiny", N, ROWS).rows(N, N, torch.device("cpu"))
    keys = torch.arange(N)
    on_lines = torch.zeros(1, 4, ROWS, N, dtype=torch.bool)
    for h in range(4):
        cols = {int(c) for c in selection.vertical[0, h] if c >= 0}
        diags = {int(s) for s in selection.slash[0, h] if s >= 0}
        for r, i in enumerate(rows.tolist()):
            on_lines[0, h, r] = torch.tensor([(j in cols or (i - j) in diags) and j <= i for j in keys.tolist()])
    per_head = on_lines.sum((-1, -2)).double() / (rows + 1).sum()  # kept pairs / causal pairs of the rows
    assert exact["head_density"] == pytest.approx(per_head[0].tolist(), abs=1e-6)
    segmented = dataclasses.replace(VS_SMALL, segments=2)
    seg_lines = EstimatorMethod("seg", segmented, exact_lines=True).index(captured.q, captured.k, layer=0,
                                                                         sm_scale=captured.sm_scale)
    seg_wide = EstimatorMethod("seg", segmented).index(captured.q, captured.k, layer=0, sm_scale=captured.sm_scale)
    lines_mask, wide_mask = seg_lines.mask(rows), seg_wide.mask(rows)
    assert not (lines_mask & ~wide_mask).any() and lines_mask.sum() < wide_mask.sum()  # per-segment lines only
    with pytest.raises(ValueError, match="exact_lines applies to vertical_slash"):
        EstimatorMethod("bs", BlockSparseConfig(num_blocks=4, block_size=16), exact_lines=True)


def _spec_params(config) -> str:
    return ",".join(f"{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(config)
                    if getattr(config, f.name) != f.default)


def test_rows_at_end_scores_the_last_rows_and_a_dense_tail_keeps_them_whole(tmp_path, model, input_ids):
    """``rows_at="end"`` scores the last positions, kept apart from the spread run in the same file;
    a plan with ``dense_last`` covering those rows recalls all of their attention."""
    vs_head = HeadPlan.from_config(VS_SMALL)
    layers = (LayerPlan(heads=(vs_head,) * 4), LayerPlan(heads=(vs_head,) * 4, dense_last=ROWS))
    plan = Plan(model_id="tiny", num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=8, layers=layers)
    plan.save(tmp_path / "tail.json")
    methods = resolve_methods([parse_method_spec(f"tail=plan:{tmp_path / 'tail.json'}"),
                               EstimatorMethod("vs", VS_SMALL)], model.config)
    end = FrontierRun("tiny", N, ROWS, rows_at="end")
    assert end.rows(N, N, torch.device("cpu")).tolist() == list(range(N - ROWS, N))
    run_frontier(model, input_ids, FrontierRun("tiny", N, ROWS), methods, tmp_path, layers=[0, 1])
    jsonl = run_frontier(model, input_ids, end, methods, tmp_path, layers=[0, 1])
    records = list(ResultStore(jsonl).records())
    assert len(records) == 8 and sum(end.owns(r) for r in records) == 4  # two runs, 2 methods x 2 layers each
    got = {(r["method"], r["layer"]): r for r in records if end.owns(r)}
    assert got[("tail", 1)]["head_recall"] == pytest.approx([1.0] * 4, abs=1e-5)
    assert got[("tail", 0)]["head_recall"] == pytest.approx(got[("vs", 0)]["head_recall"], abs=1e-6)
    assert min(got[("vs", 1)]["head_recall"]) < 0.99  # the sparse index alone misses some of it
    reports = render_frontier_report(jsonl, tmp_path / "reports")
    assert len(reports) == 2 and any("the last 24 query rows" in p.read_text() for p in reports)
    with pytest.raises(ValueError, match="rows_at"):
        FrontierRun("tiny", N, ROWS, rows_at="middle")


def test_parse_method_spec():
    assert parse_method_spec("peer-vs-1000-6096-lq64").config == VerticalSlashConfig(1000, 6096, 64)
    assert "not the peer's code" in parse_method_spec("peer-vs-1000-6096-lq64").note
    custom = parse_method_spec("mine=vertical_slash:budget=coverage,tau=0.9,last_q=256,per_kv_group=true")
    assert custom.config == VerticalSlashConfig(last_q=256, budget="coverage", tau=0.9) and custom.per_kv_group
    assert parse_method_spec("b=block_sparse").config == BlockSparseConfig()
    assert parse_method_spec("plan") == PlanMethod("plan-default", "default")
    assert parse_method_spec("p=plan:x.json") == PlanMethod("p", "x.json")
    for bad, match in [("nope", "unknown method"), ("x=vertical_slash:colour=1", "no parameter"),
                       ("x=vertical_slash:last_q=many", "must be int"), ("x=nothing", "unknown pattern"),
                       ("x=vertical_slash:last_q", "key=value"), ("oracle-x=a_shape", "bad method name"),
                       ("x=vertical_slash:last_q=0", "last_q")]:
        with pytest.raises(ValueError, match=match):
            parse_method_spec(bad)
    with pytest.raises(ValueError, match="unique"):
        resolve_methods([EstimatorMethod("a", VS_SMALL), EstimatorMethod("a", VS_SMALL)], None)


def test_summarize_across_heads_of_all_layers():
    records = [{"method": "m", "layer": 0, "kind": "estimator", "head_recall": [0.2, 0.4, 0.6, 0.8],
                "head_density": [0.1, 0.1, 0.2, 0.2], "estimate_ms": 3.0},
               {"method": "m", "layer": 1, "kind": "estimator", "head_recall": [1.0, 1.0, 1.0, 1.0],
                "head_density": [0.3, 0.3, 0.3, 0.3], "estimate_ms": 5.0}]
    (s,) = summarize(records)
    assert s.mean_recall == pytest.approx(0.75)
    assert s.p10_recall == pytest.approx(0.2 + 0.7 * 0.2)  # numpy-style linear interpolation
    assert s.min_recall == 0.2 and s.mean_density == pytest.approx(0.225)
    assert s.heads == 8 and s.layers == 2 and s.estimate_ms == 4.0
    assert s.layer_recall == {0: pytest.approx(0.5), 1: 1.0}
    assert math.isnan(s.kernel_ms) and math.isnan(s.speedup)  # not timed


def test_summarize_timed_records_gives_attention_speedup_over_all_layers():
    base = {"method": "m", "kind": "estimator", "head_recall": [1.0], "head_density": [0.1]}
    records = [{**base, "layer": 0, "estimate_ms": 1.0, "kernel_ms": 3.0, "dense_sdpa_ms": 20.0},
               {**base, "layer": 1, "estimate_ms": 2.0, "kernel_ms": 4.0, "dense_sdpa_ms": 30.0},
               {**base, "layer": 2, "estimate_ms": 9.0}]  # an untimed layer (e.g. an older record) is left out
    (s,) = summarize(records)
    assert s.speedup == pytest.approx(50.0 / 10.0)
    assert s.kernel_ms == pytest.approx(3.5)
    row = frontier.summary_table([s])[0]
    assert row[frontier.SUMMARY_HEADER.index("vs SDPA")] == "5.00x"
    assert row[frontier.SUMMARY_HEADER.index("kernel ms")] == "3.5"


def test_time_kernels_needs_cuda(tmp_path, model, input_ids):
    with pytest.raises(ValueError, match="CUDA"):
        _run(model, input_ids, tmp_path, time_kernels=True)
    assert not (tmp_path / frontier.RESULTS_FILE).exists()


@pytest.mark.gpu
def test_time_kernels_on_gpu_records_times(tmp_path, input_ids):
    gpu_model = _peaked_llama().to("cuda", torch.float16)
    from longinfer.plans import default_plan_for

    default_plan_for(gpu_model.config, dense_below=0, dense_last=64).save(tmp_path / "sparse.json")
    plan = PlanMethod(name="plan", source=str(tmp_path / "sparse.json"))
    methods = resolve_methods([*_methods()[:2], plan], gpu_model.config)
    path = _run(gpu_model, input_ids.cuda(), tmp_path / "run", methods=methods, time_kernels=True)
    kinds = set()
    for record in ResultStore(path).records():
        if record["kind"] in ("estimator", "plan"):
            kinds.add(record["kind"])
            assert record["kernel_ms"] > 0 and record["dense_sdpa_ms"] > 0 and record["estimate_ms"] > 0
    assert kinds == {"estimator", "plan"}


def test_memory_estimate_grows_with_length(model):
    small = frontier.estimate_memory(model.config, 4096)
    large = frontier.estimate_memory(model.config, 32768)
    assert set(small) == {"weights", "forward", "layer_qk", "estimators", "recall", "oracle", "total"}
    assert small["total"] == sum(v for k, v in small.items() if k != "total")
    assert large["forward"] == 8 * small["forward"] and large["total"] > small["total"]


@pytest.fixture()
def stub_zoo(monkeypatch):
    tokenizer = make_tokenizer()
    tiny = _peaked_llama(seed=2)
    tiny.resize_token_embeddings(len(tokenizer))
    loads = []

    def fake_load(name, *, dtype=None, device=None, yarn_factor=None):
        loads.append(name)
        return tiny, tokenizer

    monkeypatch.setattr(zoo, "load", fake_load)
    return loads


def test_cli_and_benchmark_script(tmp_path, stub_zoo, capsys):
    text = tmp_path / "text.txt"
    text.write_text(corpus_text())
    common = ["--length", "256", "--rows", "16", "--text-file", str(text), "--methods", "none",
              "--method", "vs=vertical_slash:num_vertical=16,num_slash=8,last_q=16,sink=4,local=4,block_size=16",
              "--oracle-densities", "0.1", "--device", "cpu"]
    assert cli_main(["eval", "recall", "--model", "tiny", "--out", str(tmp_path / "cli"), *common]) == 0
    records = ResultStore(tmp_path / "cli" / "recall.jsonl").records()
    assert sorted({r["method"] for r in records}) == ["oracle-block@10%", "oracle-key@10%", "vs"]
    assert "--text-file" in records[0]["command"] and records[0]["text"] == "text.txt"
    assert cli_main(["eval", "recall-report", str(tmp_path / "cli" / "recall.jsonl"),
                     "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "recall.md").read_text() == (tmp_path / "cli" / "recall.md").read_text()

    script = load_benchmark("recall_frontier")
    assert script.main(["--model", "tiny-gguf", "--gguf", "weights.gguf", "--out", str(tmp_path / "bench"), *common]) == 0
    assert stub_zoo == ["tiny", "weights.gguf"]  # --gguf is what is loaded, --model the label
    printed = capsys.readouterr().out
    assert "| vs |" in printed and "| oracle-key@10% |" in printed and "memory estimate" in printed
    assert (tmp_path / "bench" / "recall_frontier.png").exists()


def test_plan_layer_timing_is_the_integration_call_split_at_the_estimate(monkeypatch):
    """A plan's kernel_ms is the integration's whole layer call minus its estimates (CUDA timer stubbed)."""
    timed = []

    def fake_timer(fn, repeats):
        out = fn()  # runs the timed work once (estimates, or the whole attend_layer call)
        timed.append(out)
        return {1: 1.5, 2: 4.0}[len(timed)]

    monkeypatch.setattr(frontier, "median_cuda_ms", fake_timer)
    layer = LayerPlan(heads=(HeadPlan.from_params("vertical_slash", {"num_vertical": 8, "num_slash": 8, "sink": 2,
                                                                        "local": 4, "last_q": 16}),) * 4,
                      dense_last=16)
    plan = Plan(model_id="tiny", num_layers=1, num_q_heads=4, num_kv_heads=2, head_dim=64, layers=(layer,))
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 100, 64, generator=gen), torch.randn(1, 2, 100, 64, generator=gen)
    times = frontier._plan_timings(PlanMethod("p", "p.json", plan=plan), q, k, 0, 0.125)
    assert times == {"estimate_ms": 1.5, "kernel_ms": 2.5}
    assert callable(timed[0]) and timed[1].shape == q.shape  # a mask builder, then the layer's output
