"""``longinfer eval``: argument parsing, a full offline run with a stubbed model loader, report."""

from __future__ import annotations

import argparse
import json

import pytest

import longinfer.models.zoo as zoo
from longinfer.cli import main
from longinfer.eval.cli import parse_floats, parse_lengths
from tests.test_eval_fixtures import corpus_text, make_tiny_llama, make_tokenizer


def test_parse_lengths():
    assert parse_lengths("2048, 8K,1m") == [2048, 8192, 1024**2]
    for bad in ("", "8X", "-1", "0", "1.5K"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_lengths(bad)
    assert parse_floats("0,0.5,1") == [0.0, 0.5, 1.0]
    with pytest.raises(argparse.ArgumentTypeError):
        parse_floats("0,half")


@pytest.fixture()
def stub_zoo(monkeypatch):
    tokenizer = make_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer))
    calls = []

    def fake_load(name, *, dtype=None, device=None, yarn_factor=None):
        calls.append((name, dtype, device, yarn_factor))
        return model, tokenizer

    monkeypatch.setattr(zoo, "load", fake_load)
    return calls


def test_needle_run_resume_and_report(tmp_path, stub_zoo):
    hay = tmp_path / "hay.txt"
    hay.write_text(corpus_text())
    out = tmp_path / "res"
    argv = [
        "eval",
        "needle",
        "--model",
        "tiny-test",
        "--methods",
        "dense,dense:eager",
        "--lengths",
        "256,384",
        "--out",
        str(out),
        "--haystack",
        str(hay),
        "--depths",
        "0,1",
        "--needles-per-cell",
        "1",
        "--dtype",
        "float32",
    ]
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "needle.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 2 * 2
    assert {r["model"] for r in records} == {"tiny-test"}
    assert {r["method"] for r in records} == {"dense", "dense:eager"}
    command = records[0]["command"]
    assert (
        command.startswith("longinfer eval needle ")
        and "--lengths 256,384" in command
        and "--depths 0.0,1.0" in command
    )
    import torch

    assert stub_zoo == [("tiny-test", torch.float32, None, None)]
    report = (out / "needle.md").read_text()
    assert "| length | depth | dense | dense:eager |" in report
    assert (out / "needle_dense_eager.png").exists()
    # a second run resumes: nothing new is appended
    assert main(argv) == 0
    assert len((out / "needle.jsonl").read_text().splitlines()) == 8


def test_report_command(tmp_path, stub_zoo):
    hay = tmp_path / "hay.txt"
    hay.write_text(corpus_text())
    main(
        [
            "eval",
            "ppl",
            "--model",
            "t",
            "--methods",
            "dense",
            "--lengths",
            "300",
            "--out",
            str(tmp_path),
            "--haystack",
            str(hay),
            "--eval-tokens",
            "32",
            "--no-report",
            "--no-record-command",
        ]
    )
    assert not (tmp_path / "ppl.md").exists()
    assert "command" not in json.loads((tmp_path / "ppl.jsonl").read_text())
    assert main(["eval", "report", str(tmp_path / "ppl.jsonl"), "--out", str(tmp_path / "rep")]) == 0
    assert "| 300 |" in (tmp_path / "rep" / "ppl.md").read_text()


def test_bad_method_fails_before_loading(tmp_path, stub_zoo):
    with pytest.raises(ValueError, match="unknown attention method"):
        main(["eval", "needle", "--methods", "magic", "--out", str(tmp_path), "--haystack", str(tmp_path)])
    assert stub_zoo == []


def test_no_attention_method_only_for_latency(tmp_path, stub_zoo):
    with pytest.raises(ValueError, match="only fits the latency task"):
        main(["eval", "needle", "--methods", "dense,none", "--out", str(tmp_path), "--haystack", str(tmp_path)])
    assert stub_zoo == []


def test_longinfer_records_carry_the_prefill_density(tmp_path, stub_zoo):
    from longinfer.plans import default_plan_for

    model, _ = zoo.load("tiny-test")
    plan = tmp_path / "sparse.json"
    default_plan_for(model.config, model_id="tiny-test", dense_below=0, dense_last=64).save(plan)
    hay = tmp_path / "hay.txt"
    hay.write_text(corpus_text())
    out = tmp_path / "res"
    argv = ["eval", "ruler", "--model", "tiny-test", "--methods", f"dense,longinfer:{plan}", "--lengths", "600",
            "--ruler-tasks", "niah_single,vt", "--samples", "1", "--out", str(out), "--haystack", str(hay),
            "--dtype", "float32"]
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "ruler.jsonl").read_text().splitlines()]
    sparse = [r for r in records if r["method"] == "longinfer:sparse"]
    assert len(sparse) == 2 and all("attention_density" not in r for r in records if r["method"] == "dense")
    assert all(0.0 < r["attention_density"] < 1.0 for r in sparse)  # sparse rows before the 64 dense last ones
    report = (out / "ruler.md").read_text()
    mean = sum(r["attention_density"] for r in sparse) / 2
    assert "Attention density of the prefill" in report and f"| 600 | {100 * mean:.1f}% |" in report
    # every record scores the expected strings as one answer; the report pairs them per prompt
    assert all(r["reference"] == " " + ", ".join(r["expected"]) and r["reference_logprob"] < 0 for r in records)
    assert "Log-probability of the reference answer" in report and "| 600 | " in report
