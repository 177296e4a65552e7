"""The JSONL result store: durable appends, done keys, and resuming after a kill mid-write."""

from __future__ import annotations

import json
import logging

import pytest

from longinfer.eval.results import ResultStore, environment_info, record_key


def _record(i: int, **extra):
    return {"model": "m", "method": "dense", "task": "needle", "case_id": f"c{i}", "score": i / 10, **extra}


def test_append_and_read_back(tmp_path):
    store = ResultStore(tmp_path / "sub" / "r.jsonl")
    for i in range(3):
        store.append(_record(i))
    assert [r["case_id"] for r in store.records()] == ["c0", "c1", "c2"]
    assert store.done_keys() == {("m", "dense", "needle", f"c{i}") for i in range(3)}
    lines = (tmp_path / "sub" / "r.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[1])["score"] == 0.1


def test_missing_file_is_empty(tmp_path):
    assert ResultStore(tmp_path / "none.jsonl").records() == []


def test_truncated_last_line_is_skipped_then_repaired(tmp_path, caplog):
    path = tmp_path / "r.jsonl"
    store = ResultStore(path)
    store.append(_record(0))
    store.append(_record(1))
    full = path.read_bytes()
    path.write_bytes(full[:-15])  # a kill in the middle of writing record c1
    with caplog.at_level(logging.WARNING, logger="longinfer.eval.results"):
        assert [r["case_id"] for r in store.records()] == ["c0"]
    assert "incomplete last line" in caplog.text
    assert store.done_keys() == {("m", "dense", "needle", "c0")}
    # the resumed run re-runs c1: the partial line is dropped, nothing is glued to it
    store.append(_record(1))
    store.append(_record(2))
    assert path.read_text().count("\n") == 3
    assert [r["case_id"] for r in store.records()] == ["c0", "c1", "c2"]


def test_complete_but_unterminated_last_line_is_kept(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(_record(0)) + "\n" + json.dumps(_record(1)))
    store = ResultStore(path)
    assert len(store.records()) == 2
    store.append(_record(2))
    assert [r["case_id"] for r in store.records()] == ["c0", "c1", "c2"]


def test_corrupt_middle_line_raises(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(_record(0)) + "\n{broken\n" + json.dumps(_record(1)) + "\n")
    with pytest.raises(ValueError, match=r"r.jsonl:2"):
        ResultStore(path).records()


def test_record_needs_key_fields(tmp_path):
    with pytest.raises(ValueError, match="case_id"):
        ResultStore(tmp_path / "r.jsonl").append({"model": "m", "method": "x", "task": "t"})
    assert record_key(_record(5)) == ("m", "dense", "needle", "c5")


def test_unserializable_field_is_an_error(tmp_path):
    with pytest.raises(TypeError, match="not JSON serializable"):
        ResultStore(tmp_path / "r.jsonl").append(_record(0, bad=object()))


def test_environment_info_names_versions_and_device():
    info = environment_info("cpu")
    assert info["versions"]["torch"] and info["versions"]["longinfer"]
    assert info["device"].startswith("cpu")
