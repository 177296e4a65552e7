"""``longinfer run`` end to end on a tiny local model folder (random Llama + a BPE tokenizer trained here)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import longinfer  # noqa: E402
from longinfer import cli  # noqa: E402
from longinfer.integrations import cli as run_cli  # noqa: E402
from longinfer.plans import uniform_plan  # noqa: E402
from tests.test_eval_fixtures import corpus_text, make_saved_kernel_llama  # noqa: E402

SPARSE_VS = {"num_vertical": 8, "num_slash": 8, "sink": 4, "local": 8, "last_q": 64}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved 2-layer Llama (head_dim 64, GQA 4/2) with its tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_saved_kernel_llama(path)
    return path


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompt") / "prompt.txt"
    path.write_text(corpus_text()[:700], encoding="utf-8")  # about 150 tokens
    return path


@pytest.fixture(scope="module")
def plan_file(model_dir, tmp_path_factory):
    config = transformers.AutoConfig.from_pretrained(model_dir)
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    uniform_plan(config, "vertical_slash", SPARSE_VS, model_id="tiny").save(path)
    return path


def expected_answer(model_dir, prompt_file, plan=None, chunk_size=None, backend="auto") -> longinfer.Generation:
    """The same generation in-process, through the public API."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    if plan is not None:
        longinfer.patch(model, plan, backend=backend)
    return longinfer.generate(model, tokenizer, prompt_file.read_text(encoding="utf-8"), max_new_tokens=5,
                              chunk_size=chunk_size)


def run(capsys, *args) -> tuple[int, str, str]:
    """Exit code, stdout, stderr of ``longinfer run ARGS`` (argparse's own errors exit with 2 too)."""
    try:
        code = cli.main(["run", *map(str, args)])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_run_with_plan_prints_answer_prefill_time_and_density(capsys, model_dir, prompt_file, plan_file):
    code, out, _ = run(capsys, "--model", model_dir, "--prompt-file", prompt_file, "--plan", plan_file,
                       "--max-new-tokens", 5, "--device", "cpu")
    assert code == 0
    expected = expected_answer(model_dir, prompt_file, plan=longinfer.load_plan(plan_file))
    text, summary = out.split("\n---\n")
    assert text == expected.text
    assert f"prompt tokens:     {expected.prompt_tokens}" in summary
    assert "prefill time:" in summary
    density = float(summary.split("attention density: ")[1].split()[0])
    assert 0.05 < density < 0.95  # the plan is sparse at this length
    assert "(2 sparse, 0 dense, 0 windowed layer calls)" in summary


def test_run_dense_and_chunked(capsys, caplog, model_dir, prompt_file, plan_file):
    code, out, _ = run(capsys, "--model", model_dir, "--prompt-file", prompt_file, "--dense",
                       "--max-new-tokens", 5, "--device", "cpu")
    assert code == 0
    assert out.split("\n---\n")[0] == expected_answer(model_dir, prompt_file).text
    assert "dense (sdpa)" in out
    with caplog.at_level("INFO", logger="longinfer.api"):
        code, out, _ = run(capsys, "--model", model_dir, "--prompt-file", prompt_file, "--plan", plan_file,
                           "--chunk-size", 64, "--max-new-tokens", 5, "--device", "cpu", "--backend", "torch")
    assert code == 0
    chunked = expected_answer(model_dir, prompt_file, plan=longinfer.load_plan(plan_file), chunk_size=64,
                              backend="torch")
    assert out.split("\n---\n")[0] == chunked.text
    assert "prefill: 64 / " in caplog.text  # progress per chunk


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt-file", "missing.txt"], "prompt file missing.txt does not exist"),
        (["--model", "no-such-model"], "unknown model"),
        (["--plan", "missing-plan.json"], "plan file missing-plan.json does not exist"),
        (["--dense", "--plan", "PLAN"], "--dense runs without a plan"),
        (["--dense", "--share-kv-groups"], "--dense runs without a plan"),
        (["--share-kv-groups", "--plan", "PLAN"], "--question-from set up the default plan"),
        (["--tau", "0.8", "--plan", "PLAN"], "--question-from set up the default plan"),
        (["--per-head-columns", "--plan", "PLAN"], "--question-from set up the default plan"),
        (["--per-head-columns", "--dense"], "--dense runs without a plan"),
        (["--tau", "0.8", "--dense"], "--dense runs without a plan"),
        (["--tau", "0"], "--tau must lie in (0, 1], got 0.0"),
        (["--floor", "1000", "--plan", "PLAN"], "--floor takes COLUMNS,DIAGONALS"),
        (["--floor", "10,20", "--plan", "PLAN"], "--question-from set up the default plan"),
        (["--floor", "10,20", "--dense"], "--dense runs without a plan"),
        (["--floor-from", "4096", "--plan", "PLAN"], "--question-from set up the default plan"),
        (["--group-columns-below", "0", "--dense"], "--dense runs without a plan"),
        (["--floor-from", "-1"], "--floor-from must be >= 0, got -1"),
        (["--group-columns-below", "-5"], "--group-columns-below must be >= 0, got -5"),
        (["--question-from", "-1"], "--question-from must be >= 0, got -1"),
        (["--question-from", "0", "--plan", "PLAN"], "--question-from set up the default plan"),
        (["--question-from", "4096", "--dense"], "--dense runs without a plan"),
        (["--per-head-columns", "--group-columns-below", "4096"], "--per-head-columns turns off; drop one of them"),
        (["--floor", "5000,20"], "min_vertical must lie in [0, num_vertical=4096], got 5000 (--floor)"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--chat"], "this tokenizer has no chat template"),
    ],
)
def test_run_errors_name_the_problem(capsys, model_dir, prompt_file, plan_file, extra, message):
    base = {"--model": str(model_dir), "--prompt-file": str(prompt_file)}
    args = [str(plan_file) if a == "PLAN" else a for a in extra]
    for flag, value in base.items():
        if flag not in args:
            args += [flag, value]
    code, _, err = run(capsys, *args)
    assert code == 2
    assert message.lower() in err.lower()


def test_run_plan_mismatch(capsys, tmp_path, model_dir, prompt_file):
    other = tmp_path / "other.json"
    uniform_plan({"num_layers": 3, "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 64}, "a_shape").save(other)
    code, _, err = run(capsys, "--model", model_dir, "--prompt-file", prompt_file, "--plan", other)
    assert code == 2
    assert "num_layers: plan has 3, model has 2" in err


def test_run_out_of_memory_names_the_fix(capsys, monkeypatch, model_dir, prompt_file):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(longinfer, "generate", out_of_memory)
    code, _, err = run(capsys, "--model", model_dir, "--prompt-file", prompt_file, "--device", "cpu")
    assert code == 2
    assert "out of GPU memory" in err and "--chunk-size 8192" in err and "--dtype bfloat16" in err


def test_oom_message_with_chunks_suggests_smaller_chunks():
    args = run_cli.argparse.Namespace(chunk_size=16384, dtype="bfloat16")
    message = run_cli._oom_message(100_000, args)
    assert "a smaller --chunk-size than 16384" in message and "--dtype" not in message


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--tau", "0.8"], {"tau": 0.8}),
        (["--per-head-columns"], {"group_columns": False}),
        (["--floor", "100,300", "--floor-from", "64"], {"min_vertical": 100, "min_slash": 300, "floor_from": 64,
                                                          "min_slash_share": 0.0}),
        (["--floor", "0,0"], {"min_vertical": 0, "min_slash": 0, "min_slash_share": 0.0}),  # replaces the growing floor
        (["--floor-from", "1024", "--group-columns-below", "2048"], {"floor_from": 1024, "group_columns_below": 2048}),
        (["--question-from", "128"], {"question_from": 128}),
    ],
)
def test_run_default_plan_options_patch_the_default_plan_with_them(capsys, monkeypatch, model_dir, prompt_file,
                                                                   flags, expected):
    patched = []
    real_patch = longinfer.patch
    monkeypatch.setattr(longinfer, "patch", lambda model, plan, **kw: patched.append(plan) or real_patch(model, plan, **kw))
    code, _, _ = run(capsys, "--model", model_dir, "--prompt-file", prompt_file, *flags,
                     "--max-new-tokens", 2, "--device", "cpu")
    assert code == 0
    config = transformers.AutoConfig.from_pretrained(model_dir)
    assert patched[0].layers == longinfer.default_plan_for(config, **expected).layers
    for name, value in expected.items():
        assert {getattr(head.config, name) for layer in patched[0].layers for head in layer.heads} == {value}


def test_run_share_kv_groups_patches_the_default_plan_with_shared_indices(capsys, monkeypatch, model_dir, prompt_file):
    patched = []
    real_patch = longinfer.patch
    monkeypatch.setattr(longinfer, "patch", lambda model, plan, **kw: patched.append(plan) or real_patch(model, plan, **kw))
    code, out, _ = run(capsys, "--model", model_dir, "--prompt-file", prompt_file, "--share-kv-groups",
                       "--max-new-tokens", 5, "--device", "cpu")
    assert code == 0
    config = transformers.AutoConfig.from_pretrained(model_dir)
    assert len(patched) == 1  # the default plan with shared indices (its creation time aside)
    assert patched[0].layers == longinfer.default_plan_for(config, share_kv_groups=True).layers
    assert all(layer.share_kv_groups for layer in patched[0].layers)
    assert out.split("\n---\n")[0] == expected_answer(model_dir, prompt_file, plan=patched[0]).text
