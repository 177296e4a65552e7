"""Time to first token and peak GPU memory of an 8B-shape model's long prefill, per path.

Usage (one H100; the default set, 32K-128K, takes about 5 minutes)::

    python benchmarks/memory_ttft.py --out benchmarks/results

Longest inputs with the KV cache partly in host memory (sparse attention only; 1M tokens needs
~128 GiB of KV cache: on an 80 GB GPU about 12 layers stay on the device and ~80 GiB go to
pinned host memory; an H200 keeps most layers on the device)::

    python benchmarks/memory_ttft.py --out benchmarks/results --lengths "" --host-lengths 262144,524288,1048576

Model: the Llama-3-8B shape (hidden 4096, 32 layers, 32 query / 8 KV heads, head_dim 128, MLP
14336, vocab 128256), bf16, random weights (normal, std 0.02; norms 1), built on the GPU without
the default initialization. Prompt: random token ids. Attention:

- ``dense``: the model's default (transformers SDPA).
- ``sparse``: ``longinfer.patch`` with a fixed structured plan: vertical-slash for every head,
  1000 columns (the first 30 keys + 970 estimated from the last 64 queries) and the 6096 nearest
  diagonals (``local = num_slash``, so random weights cannot scatter the diagonals and turn the
  kernel dense), dense below 0 keys (every prefill call runs sparse).
- ``none`` (``--attentions ...,none``): every attention output zero, everything else the same: the
  floor no attention method can go below (dense / floor bounds any method's speedup).

Paths (what produces the first token):

- ``naive``: ``model(ids)``: logits for every position (``--naive-lengths`` only: 31 GiB of bf16
  logits at 128K).
- ``plain``: one forward with ``logits_to_keep=1`` and a ``DynamicCache``: what ``generate``
  does for its first token, the baseline.
- ``memory``: :func:`longinfer.memory.chunked_mlp` (``--mlp-chunk``) around
  :func:`longinfer.memory.prefill_in_chunks` (``--prefill-chunk``), last-position logits.
- ``host``: the memory path with :func:`longinfer.memory.host_cache`, as many leading layers on
  the device as fit next to ``--host-reserve-gib`` of workspace, chunks of ``--host-chunk``.

Measured per case: TTFT = wall time from the prompt on the GPU to the first token id on the host
(``torch.cuda.synchronize`` around it; minimum over ``--repeats`` runs, a single run when the
first one takes longer than ``--single-run-above`` seconds), peak memory =
``torch.cuda.max_memory_allocated`` during the run (weights included), the first token, the
largest |logit difference| against the ``plain`` path of the same attention and length (the
memory path must not change results beyond bf16 summation order), and for ``sparse`` the
attention density (``longinfer.attention_stats``). Out-of-memory is recorded as such.

Writes ``memory_ttft-<device>.json`` and ``.md`` into ``--out`` after every case; a rerun skips
the cases already recorded there (``--fresh`` starts over). ``--shape tiny --device cpu`` runs
the same code on a small model for a smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import gc
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from longinfer import memory
from longinfer.eval.methods import NoAttentionMethod
from longinfer.plans import Plan, uniform_plan

logger = logging.getLogger("memory_ttft")

SHAPES = {
    "llama3-8b": {
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
    },
    "tiny": {  # CPU smoke tests
        "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 64, "vocab_size": 256,
    },
}
# The fixed structured plan: every head, every layer (see the module docstring).
SPARSE_PARAMS = {
    "num_vertical": 1000, "num_slash": 6096, "sink": 30, "local": 6096, "last_q": 64, "budget": "fixed",
}
WARMUP_TOKENS = 4096
GIB = 2**30


# --------------------------------------------------------------------------------------------
# Model, plan, attention switch


def load_integration() -> Any:
    """longinfer's transformers integration, or exit with a clear message."""
    try:
        from longinfer.integrations import transformers as integration
    except ImportError as error:
        raise SystemExit(
            f"longinfer.integrations.transformers is not importable ({error}); the sparse cases need it. "
            "Run from a checkout where the integration has landed."
        ) from error
    for name in ("patch", "unpatch", "attention_stats", "reset_stats"):
        if not hasattr(integration, name):
            raise SystemExit(f"longinfer.integrations.transformers has no {name}(); update the checkout")
    return integration


def model_dtype(device: torch.device) -> torch.dtype:
    """bf16 on the GPU; float32 for CPU smoke tests (bf16 matmuls on CPU are very slow)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_model(shape: str, device: torch.device, max_tokens: int) -> LlamaForCausalLM:
    """The shape's Llama with random bf16 weights, made on ``device`` without default initialization."""
    from transformers.initialization import no_init_weights

    config = LlamaConfig(
        **SHAPES[shape],
        max_position_embeddings=max(max_tokens, 8192),
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    with torch.device(device), no_init_weights():
        model = LlamaForCausalLM._from_config(config, dtype=model_dtype(device), attn_implementation="sdpa")
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    return model.eval().requires_grad_(False)


def sparse_plan(config: LlamaConfig) -> Plan:
    return uniform_plan(config, "vertical_slash", SPARSE_PARAMS, dense_below=0, model_id="random-llama",
                        search={"method": "uniform", "purpose": "benchmarks/memory_ttft.py"})


@contextlib.contextmanager
def attention(model: LlamaForCausalLM, kind: str, integration: Any, plan: Plan | None, backend: str) -> Iterator[None]:
    """``dense``: the model as built (SDPA); ``sparse``: patched with ``plan`` for the block;
    ``none``: every attention output zero (the floor under any attention method)."""
    if kind == "dense":
        yield
        return
    if kind == "none":
        with NoAttentionMethod().activate(model):
            yield
        return
    integration.patch(model, plan, backend=backend)
    try:
        yield
    finally:
        integration.unpatch(model)


# --------------------------------------------------------------------------------------------
# Paths


@dataclass(frozen=True)
class Settings:
    prefill_chunk: int
    mlp_chunk: int
    host_chunk: int
    host_reserve_gib: float
    repeats: int
    single_run_above: float


@dataclass
class Outcome:
    """What one prefill left behind, besides its time."""

    logits: torch.Tensor  # [1, vocab] of the last position
    device_kv_layers: int | None = None
    host_kv_bytes: int = 0


def host_kv_bytes(cache: Any) -> int:
    return sum(
        layer._host_keys.nbytes + layer._host_values.nbytes
        for layer in cache.layers
        if isinstance(layer, memory.HostKVLayer) and layer._host_keys is not None
    )


def device_layers_that_fit(model: LlamaForCausalLM, tokens: int, reserve_gib: float) -> int:
    """Leading layers whose KV cache fits on the device next to the weights and ``reserve_gib``."""
    config = model.config
    per_layer = memory.kv_cache_bytes(config, tokens) / config.num_hidden_layers
    free = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory - torch.cuda.memory_allocated() - reserve_gib * GIB
    return int(max(0, min(config.num_hidden_layers - 1, free // per_layer)))


def run_path(model: LlamaForCausalLM, ids: torch.Tensor, path: str, settings: Settings) -> Outcome:
    keyword = memory.cache_keyword(model)
    if path == "naive":
        with torch.no_grad():
            logits = model(ids, **{keyword: DynamicCache(config=model.config)}, use_cache=True).logits
        return Outcome(logits[:, -1])
    if path == "plain":
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            return Outcome(memory.last_position_logits(model, ids, **{keyword: cache}, use_cache=True))
    if path == "memory":
        with memory.chunked_mlp(model, settings.mlp_chunk):
            _, logits = memory.prefill_in_chunks(model, ids, settings.prefill_chunk)
        return Outcome(logits)
    if path == "host":
        layers = device_layers_that_fit(model, ids.shape[1], settings.host_reserve_gib)
        cache = memory.host_cache(model, device_layers=layers)
        with memory.chunked_mlp(model, settings.mlp_chunk):
            _, logits = memory.prefill_in_chunks(model, ids, settings.host_chunk, cache)
        return Outcome(logits, layers, host_kv_bytes(cache))
    raise ValueError(f"unknown path {path!r}")


def host_ram_available() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def host_path_problem(model: LlamaForCausalLM, tokens: int, settings: Settings) -> str | None:
    """Why the host path cannot run at ``tokens`` here (not enough host RAM), or ``None``."""
    layers = device_layers_that_fit(model, tokens, settings.host_reserve_gib)
    per_layer = memory.kv_cache_bytes(model.config, tokens) // model.config.num_hidden_layers
    pinned = (model.config.num_hidden_layers - layers) * 2 ** math.ceil(math.log2(per_layer // 2)) * 2
    available = host_ram_available()
    if pinned > 0.85 * available:
        return (f"needs {pinned / GIB:.0f} GiB of pinned host memory ({model.config.num_hidden_layers - layers} "
                f"layers), {available / GIB:.0f} GiB available")
    return None


# --------------------------------------------------------------------------------------------
# Measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        empty_host = getattr(torch._C, "_host_emptyCache", None)  # pinned blocks of an earlier host cache
        if empty_host is not None:
            empty_host()


def timed(run: Callable[[], Outcome], device: torch.device) -> tuple[float, Outcome, int, float | None]:
    """One run: seconds to the first token id, the outcome, the first token, peak GiB (CUDA only)."""
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    outcome = run()
    token = int(outcome.logits[0].argmax())
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return seconds, outcome, token, peak


def measure(model: LlamaForCausalLM, ids: torch.Tensor, path: str, settings: Settings,
            integration: Any, sparse: bool, reference: torch.Tensor | None) -> tuple[dict, torch.Tensor | None]:
    """Run one case (``settings.repeats`` times at most); returns its record and its last logits."""
    device = ids.device
    record: dict[str, Any] = {"status": "ok", "ttft_runs_s": []}
    logits = None
    try:
        for repeat in range(settings.repeats):
            if sparse:
                integration.reset_stats(model)
            seconds, outcome, token, peak = timed(lambda: run_path(model, ids, path, settings), device)
            record["ttft_runs_s"].append(round(seconds, 4))
            if peak is not None:
                record["peak_gib"] = round(max(peak, record.get("peak_gib", 0.0)), 2)
            record["first_token"] = token
            record["device_kv_layers"] = outcome.device_kv_layers
            record["host_kv_gib"] = round(outcome.host_kv_bytes / GIB, 2)
            if sparse:
                record["density"] = round(integration.attention_stats(model).density, 4)
            logits = outcome.logits.float().cpu()
            del outcome
            if repeat == 0 and seconds > settings.single_run_above:
                break
    except torch.OutOfMemoryError as error:
        record.update(status="oom", error=str(error).splitlines()[0][:300])
        if device.type == "cuda":
            record["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 2)
    if record["ttft_runs_s"] and record["status"] == "ok":
        record["ttft_s"] = min(record["ttft_runs_s"])
    if logits is not None and reference is not None:
        record["logits_max_diff_vs_plain"] = float((logits - reference).abs().max())
    free_memory(device)
    return record, logits


# --------------------------------------------------------------------------------------------
# Results


def case_key(record: dict) -> tuple[int, str, str]:
    return record["length"], record["attention"], record["path"]


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


PATH_ORDER = {"plain": 0, "naive": 1, "memory": 2, "host": 3}


def table_rows(records: list[dict], only: list[dict] | None = None) -> list[str]:
    """Markdown rows, one per case (of ``only``, default all), with the speed-up over dense
    ``plain`` at the same length."""
    baseline = {r["length"]: r.get("ttft_s") for r in records if (r["attention"], r["path"]) == ("dense", "plain")}
    rows = []
    chosen = records if only is None else only
    for r in sorted(chosen, key=lambda r: (r["length"], r["attention"], PATH_ORDER.get(r["path"], 9))):
        base = baseline.get(r["length"])
        speedup = f"{base / r['ttft_s']:.2f}x" if base and r.get("ttft_s") else "-"
        over = r["peak_gib"] - r["weights_gib"] if r.get("peak_gib") is not None and r.get("weights_gib") else None
        note = r.get("error") or r.get("reason") or ""
        rows.append(
            f"| {r['length']} | {r['attention']} | {r['path']} | {r['status']} | {_fmt(r.get('ttft_s'))} | {speedup} "
            f"| {_fmt(r.get('peak_gib'), 1)} | {_fmt(over, 1)} | {_fmt(r.get('kv_cache_gib'), 1)} "
            f"| {_fmt(r.get('device_kv_layers'))} / {_fmt(r.get('host_kv_gib'), 1)} | {_fmt(r.get('density'), 3)} "
            f"| {_fmt(r.get('logits_max_diff_vs_plain'), 3)} | {note} |"
        )
    return rows


def render_markdown(meta: dict, records: list[dict]) -> str:
    lines = [
        f"# Prefill TTFT and peak memory — {meta['device']}",
        "",
        f"- date: {meta['date']}; torch {meta['torch']}, transformers {meta['transformers']}, python {meta['python']}",
        f"- command: `{meta['command']}`",
        f"- model: {meta['shape']} shape, random {meta['dtype']} weights; batch 1; random token ids",
        f"- sparse plan: vertical-slash on every head, {json.dumps(SPARSE_PARAMS)}, dense_below 0",
        (f"- memory path: chunked_mlp({meta['mlp_chunk']}) + prefill_in_chunks({meta['prefill_chunk']}), last-position "
        f"logits; host path: the same with chunks of {meta['host_chunk']} and host_cache (device layers chosen "
        f"to leave {meta['host_reserve_gib']} GiB of workspace)"),
        ("- TTFT: prompt on the GPU to the first token id on the host, minimum over the runs; peak: "
        "torch.cuda.max_memory_allocated during the run, weights included"),
        "",
        ("| tokens | attention | path | status | TTFT (s) | vs dense plain | peak (GiB) | peak − weights (GiB) "
        "| KV cache (GiB) | device KV layers / host KV (GiB) | density | max abs logit diff vs plain | note |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *table_rows(records),
        "",
    ]
    return "\n".join(lines)


def load_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return list(json.loads(path.read_text())["records"])


# --------------------------------------------------------------------------------------------
# Main


def parse_lengths(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="32768,65536,131072", help="prompt lengths of the dense/sparse grid")
    parser.add_argument("--attentions", default="dense,sparse",
                        help="subset of dense,sparse,none (none: no attention, the floor of the forward)")
    parser.add_argument("--paths", default="plain,memory", help="subset of plain,memory for --lengths")
    parser.add_argument("--naive-lengths", default="32768", help="lengths that also run the full-logits path")
    parser.add_argument("--host-lengths", default="", help="lengths for the host-cache path (sparse attention)")
    parser.add_argument("--prefill-chunk", type=int, default=16384)
    parser.add_argument("--mlp-chunk", type=int, default=8192)
    parser.add_argument("--host-chunk", type=int, default=131072)
    parser.add_argument("--host-reserve-gib", type=float, default=16.0,
                        help="device memory left for activations when placing KV layers on the device")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--single-run-above", type=float, default=10.0,
                        help="seconds: a first run longer than this is not repeated")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default="triton", help="longinfer backend: triton, torch or auto")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--fresh", action="store_true", help="ignore results already in --out")
    return parser.parse_args(argv)


def planned_cases(args: argparse.Namespace) -> list[tuple[int, str, str]]:
    """``(length, attention, path)`` in run order: by length, dense first, the baseline first."""
    attentions = [a for a in ("dense", "sparse", "none") if a in args.attentions.split(",")]
    paths = [p for p in ("plain", "memory") if p in args.paths.split(",")]
    naive = set(parse_lengths(args.naive_lengths))
    cases = []
    for length in parse_lengths(args.lengths):
        for kind in attentions:
            # plain first: it is the reference the other paths' logits are compared with
            cases += [(length, kind, path) for path in paths[:1] + (["naive"] if length in naive else []) + paths[1:]]
    cases += [(length, "sparse", "host") for length in parse_lengths(args.host_lengths)]
    return cases


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("longinfer").setLevel(logging.WARNING)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --shape tiny --device cpu for a smoke test)")
    cases = planned_cases(args)
    if not cases:
        raise SystemExit("nothing to run: give --lengths and/or --host-lengths")
    integration = load_integration() if any(kind == "sparse" for _, kind, _ in cases) else None
    settings = Settings(args.prefill_chunk, args.mlp_chunk, args.host_chunk, args.host_reserve_gib, args.repeats,
                        args.single_run_above)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    meta = {
        "device": device_name, "date": dt.date.today().isoformat(), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "shape": args.shape, "dtype": str(model_dtype(device)).removeprefix("torch."), "prefill_chunk": args.prefill_chunk, "mlp_chunk": args.mlp_chunk,
        "host_chunk": args.host_chunk, "host_reserve_gib": args.host_reserve_gib, "backend": args.backend,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in device_name)
    suffix = "" if args.shape == "llama3-8b" else f"-{args.shape}"
    json_path, md_path = out / f"memory_ttft-{slug}{suffix}.json", out / f"memory_ttft-{slug}{suffix}.md"
    records = [] if args.fresh else load_records(json_path)
    done = {case_key(r) for r in records}

    def write() -> None:  # after every case, so a killed run keeps what it measured
        json_path.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
        md_path.write_text(render_markdown(meta, records))

    todo = [case for case in cases if case not in done]
    logger.info("%d cases to run, %d already in %s", len(todo), len(cases) - len(todo), json_path)
    if not todo:
        print(render_markdown(meta, records))
        return 0
    started = time.perf_counter()
    model = build_model(args.shape, device, max(length for length, _, _ in todo))
    sync(device)
    weights_gib = round(torch.cuda.memory_allocated(device) / GIB, 2) if device.type == "cuda" else None
    logger.info("model built in %.1f s (%s GiB of weights)", time.perf_counter() - started, _fmt(weights_gib))
    plan = sparse_plan(model.config) if integration is not None else None
    generator = torch.Generator().manual_seed(0)
    warm_tokens = min(WARMUP_TOKENS, *(length for length, _, _ in todo))
    for kind in sorted({kind for _, kind, _ in todo}):  # kernels, cuBLAS and autotuning of short shapes
        warm = torch.randint(0, model.config.vocab_size, (1, warm_tokens), generator=generator).to(device)
        with attention(model, kind, integration, plan, args.backend):
            run_path(model, warm, "plain", settings)
            run_path(model, warm, "memory", dataclasses.replace(settings, prefill_chunk=max(1, warm_tokens // 2)))
    references: dict[tuple[int, str], torch.Tensor] = {}
    for length, kind, path in todo:
        ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
        ids = ids.to(device)
        base = {"length": length, "attention": kind, "path": path, "weights_gib": weights_gib,
                "kv_cache_gib": round(memory.kv_cache_bytes(model.config, length) / GIB, 2)}
        problem = host_path_problem(model, length, settings) if path == "host" and device.type == "cuda" else None
        if problem is not None:
            record: dict[str, Any] = {**base, "status": "skipped", "reason": problem}
        else:
            with attention(model, kind, integration, plan, args.backend):
                result, logits = measure(model, ids, path, settings, integration, kind == "sparse",
                                         references.get((length, kind)))
            record = {**base, **result}
            if path == "plain" and logits is not None:
                references[(length, kind)] = logits
        records = [r for r in records if case_key(r) != case_key(record)] + [record]
        write()
        print(table_rows(records, only=[record])[0], flush=True)
    print(render_markdown(meta, records))
    logger.info("done in %.0f s", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
