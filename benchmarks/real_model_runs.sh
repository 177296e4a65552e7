#!/usr/bin/env bash
# Real-model GPU runs, one step per device call (the model already assembled on the warm machine,
# see benchmarks/README.md). Every step writes under $RES/<step> and packs it into $OUT/<step>.tgz;
# steps built on resumable JSONL (frontier, eval) continue where a killed call stopped when rerun.
#
#   source benchmarks/device_env.sh && bash benchmarks/real_model_runs.sh q15-frontier
#
# Step budget: each runs under `timeout` so that `pack` still returns what was measured.
set -uo pipefail
source benchmarks/device_env.sh
step=${1:?usage: real_model_runs.sh STEP (see the case list)}
limit=${LIMIT:-540}
Q15="--model qwen2.5-coder-1.5b --yarn 4"
Q05="--model qwen2.5-coder-0.5b"
PLANS4=docs/results/gpu-session4/plans
PLANS5=docs/results/gpu-session5/plans
PLANS8=docs/results/gpu-session8/plans
PLANS9=docs/results/gpu-session9/plans
PLANS10=docs/results/gpu-session10/plans
PLANS11=docs/results/gpu-session11/plans
PLANS12=docs/results/gpu-session12/plans
PLANS13=docs/results/gpu-session13/plans
PLANS14=docs/results/gpu-session14/plans
PLANS15=docs/results/gpu-session15/plans
PLANS16=docs/results/gpu-session16/plans
PLANS17=docs/results/gpu-session17/plans
PLANS18=docs/results/gpu-session18/plans
PLANS23=docs/results/gpu-session23/plans
PLANS24=docs/results/gpu-session24/plans
PLANS25=docs/results/gpu-session25/plans
PLANS29=docs/results/gpu-session29/plans
VS="vertical_slash:budget=coverage,num_vertical=4096,num_slash=8192,last_q=64,query_sampling=strided"
COST="vertical_slash:budget=coverage,num_vertical=8192,num_slash=8192,last_q=64,query_sampling=strided,rank=cost,tau=1.0"
# The default estimator at 64-, 32- and 16-row query tiles, coverage and cost-ranked budgets.
TILE_METHODS=(
  --method "def-bs64=$VS,tau=0.9" --method "def-bs32=$VS,tau=0.9,block_size=32"
  --method "def-bs16=$VS,tau=0.9,block_size=16" --method "cov0.8-bs16=$VS,tau=0.8,block_size=16"
  --method "cov0.95-bs16=$VS,tau=0.95,block_size=16" --method "cost-g1-bs16=$COST,min_gain=1,block_size=16"
  --method "cost-g2-bs16=$COST,min_gain=2,block_size=16" --method "cost-g2-bs64=$COST,min_gain=2"
  --method "def-kv-bs64=$VS,tau=0.9,per_kv_group=true"
)
# The lines-only view (exact_lines: the entries on the chosen columns and diagonals, as anchors.md counts).
LINES_METHODS=(
  --method "peer-lines=vertical_slash:num_vertical=1000,num_slash=6096,last_q=64,exact_lines=true"
  --method "str0.9-lines=$VS,tau=0.9,exact_lines=true" --method "str0.95-lines=$VS,tau=0.95,exact_lines=true"
  --method "str0.98-lines=$VS,tau=0.98,exact_lines=true" --method "mix0.95-lines=$VS,tau=0.95,query_sampling=mixed,exact_lines=true"
  --method "str0.95-kv-lines=$VS,tau=0.95,per_kv_group=true,exact_lines=true" --method "str0.9=$VS,tau=0.9"
)
# LIMIT is the whole step's budget in seconds: each command gets what is left of it, so that the step still
# packs what it measured before the device call's own limit. `timeout` runs programs, not shell functions
# (so no `li` here).
run() {
  local left=$((limit - SECONDS))
  if [ "$left" -lt 20 ]; then echo "skipped (${left}s of LIMIT left): $*" | cut -c1-300; return 0; fi
  timeout "$left" "$@"; echo "exit $? after ${SECONDS}s: $*" | cut -c1-300
}
run_cli() { run python3 -m longinfer.cli "$@"; }
peer() {  # the peer for --methods peer (built once per warm machine)
  [ -d /tmp/peer/minference ] || bash benchmarks/gpu_session.sh build > /dev/null
  export PEER_SITE=/tmp/peer
}
# seed_rows FILE METHODS: start this step's ruler.jsonl with FILE's records of METHODS (an extended regex,
# e.g. "dense|longinfer": the same code and prompts), unless the step already has one (a rerun resumes)
seed_rows() {
  [ -f "$RES/$step/ruler.jsonl" ] || grep -E "\"method\": \"($2)\"" "$1" > "$RES/$step/ruler.jsonl"
}
# dense RULER at 128K is the same code and prompts as in session 4: its 42 records seed the file
seed_dense_ruler() {
  [ -f "$RES/$step/ruler.jsonl" ] || grep '"method": "dense"' docs/results/gpu-session4/q15-ruler/ruler.jsonl \
    | grep '"sample": [0-5],' > "$RES/$step/ruler.jsonl"
}
# RULER 32K, 12 samples: session 8's dense rows are the same code and prompts (its "longinfer" rows are
# the default of that time, per-head columns: now longinfer:$PLANS14/q15-perhead-tail.json)
seed_ruler_32k() {
  seed_rows docs/results/gpu-session8/blockA/q15-ruler-32k/ruler.jsonl "dense"
}
# plan_turns PLAN_DIR NAME...: the second turn (4K over a cached 64K) with each plan $PLAN_DIR/q15-NAME-tail.json
plan_turns() {
  local dir=$1 plan; shift
  for plan in "$@"; do
    [ -d "$RES/$step/turn-$plan" ] || run python3 benchmarks/real_model_checks.py $Q15 --lengths "" \
      --turn-prefix 65536 --turn-length 4096 --plan "$dir/q15-$plan-tail.json" --out "$RES/$step/turn-$plan"
  done
}
# plan_methods PLAN_DIR NAME...: the --methods entries of the plans $PLAN_DIR/q15-NAME-tail.json, comma-separated
plan_methods() {
  local dir=$1; shift
  printf "longinfer:$dir/q15-%s-tail.json," "$@" | sed 's/,$//'
}
# plan_ruler_32k PLAN_DIR NAME...: RULER 32K, 12 prompts per sub-task, of those plans beside dense
# (session 8's rows seeded; rerun to finish)
plan_ruler_32k() {
  seed_ruler_32k
  run_cli eval ruler $Q15 --lengths 32768 --samples 12 --out "$RES/$step" --methods "dense,$(plan_methods "$@")"
}
mkdir -p "$RES/$step"
case "$step" in
  cold-start)  # no model: the first sparse call of a fresh process, by part, on an empty Triton cache (then the same
    # shape again in a new process with the filled cache: a restart on a warm machine). Run it first on a fresh machine.
    for shape in "14 2 64 16384" "12 2 128 32768"; do
      set -- $shape
      for pass in cold warm; do
        run python3 benchmarks/cold_start.py --heads $1 --kv-heads $2 --head-dim $3 --length $4 \
          --cache-dir "/tmp/cold-cache-$3" --out "$RES/$step/h$1-d$3-n$4-$pass"
      done
    done ;;
  warmup-q15)  # no weights: `longinfer warmup` of the 1.5B's default plan (lengths 32K / 128K, the 4K-over-64K turn); on a
    # fresh machine the first call per shape shows the cold start a service pays once; run after cold-start
    run_cli warmup --model qwen2.5-coder-1.5b --lengths 32768,131072 --turn 65536+4096 > "$RES/$step/warmup.md" 2>&1
    tail -12 "$RES/$step/warmup.md" ;;
  gpu-tests)  # the GPU-only tests: those marked `gpu` (CUDA graphs, estimate, selection) and the kernels' bf16 shapes.
    # (The whole files, CPU cases included, ran past 400 s in sessions 5 and 13: every case compiles its own variants.)
    LONGINFER_AUTOTUNE=0 run python3 -m pytest -q -p no:cacheprovider --durations=5 \
      tests/test_gpu_graphs.py tests/test_estimate_kernel.py tests/test_select_kernel.py tests/test_ops_kernels.py \
      tests/test_patterns_sampling.py tests/test_patterns.py tests/test_repeat_rows.py \
      -k "gpu or bfloat16" > "$RES/$step/pytest.txt" 2>&1
    tail -5 "$RES/$step/pytest.txt" ;;
  s22-check)  # no model: the GPU tests of the graphs, the estimate (one-launch split merge; scratch and atomic
    # diagonal sums) and the selection; then the selection's digit sums reduced per chunk vs once per program
    # (ParallelOptions.defer_sums) and other chunk sizes, uncapped and with every row capped
    LONGINFER_AUTOTUNE=0 run python3 -m pytest -q -p no:cacheprovider --durations=5 tests/test_gpu_graphs.py \
      tests/test_estimate_kernel.py tests/test_select_kernel.py -k gpu > "$RES/$step/pytest.txt" 2>&1
    tail -3 "$RES/$step/pytest.txt"
    run python3 benchmarks/select_bench.py --lengths 69632,131072 --sweep --out "$RES/$step/uncapped"
    run python3 benchmarks/select_bench.py --caps 1024,2048 --lengths 69632 --sweep --out "$RES/$step/capped" ;;
  select-bench)  # no model: the vertical-slash budget alone, torch vs the Triton paths and their launch choices
    run python3 benchmarks/select_bench.py --sweep --out "$RES/$step" ;;
  select-check)  # no model: the selection's GPU tests (every path, no fallback on capped rows), then its timing
    run python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_select_kernel.py > "$RES/$step/pytest.txt" 2>&1
    tail -3 "$RES/$step/pytest.txt"
    run python3 benchmarks/select_bench.py --out "$RES/$step/default"
    run python3 benchmarks/select_bench.py --caps 1024,2048 --lengths 69632 --sweep --out "$RES/$step/capped" ;;
  ttft-8b)  # no model: issue 4's TTFT of a Llama-3-8B shape (random weights, fixed vertical-slash plan) at 128K
    run python3 benchmarks/memory_ttft.py --lengths 131072 --attentions dense,sparse,none --paths plain \
      --naive-lengths '' --repeats 2 --out "$RES/$step" ;;
  host-1m)  # no model: issue 4's longest input, 1M tokens of the 8B shape, KV cache partly in host memory
    run python3 benchmarks/memory_ttft.py --lengths '' --host-lengths 1048576 --repeats 1 --out "$RES/$step" ;;
  q15-frontier)  # issue 6: recall, density and attention time of every tile size at 128K
    run python3 benchmarks/recall_frontier.py $Q15 --length 131072 --rows 128 --no-oracles --time-kernels \
      --methods peer-vs-1000-6096-lq64,bs-cov0.9 "${TILE_METHODS[@]}" --out "$RES/$step" ;;
  q05-frontier)  # issue 3: the same at 32K on the 0.5B
    run python3 benchmarks/recall_frontier.py $Q05 --length 32768 --rows 128 --no-oracles --time-kernels \
      --methods peer-vs-1000-6096-lq64,bs-cov0.9 "${TILE_METHODS[@]}" --out "$RES/$step" ;;
  q15-frontier-lines)  # issue 6 in anchors.md's units: recall and density of the chosen lines' entries alone
    run python3 benchmarks/recall_frontier.py $Q15 --length 131072 --rows 128 --oracle-densities 0.05,0.1 \
      --methods none "${LINES_METHODS[@]}" --out "$RES/$step" ;;
  q05-frontier-lines)  # issue 3 in anchors.md's units, 0.5B at 32K
    run python3 benchmarks/recall_frontier.py $Q05 --length 32768 --rows 128 --oracle-densities 0.05,0.1 \
      --methods none "${LINES_METHODS[@]}" --out "$RES/$step" ;;
  q15-frontier-end)  # recall over the prompt's last 128 rows (the answer's attention), by estimation-query sampling
    run python3 benchmarks/recall_frontier.py $Q15 --length 131072 --rows 128 --rows-at end --no-oracles --time-kernels \
      --methods none --method "strided=$VS,tau=0.9" --method "last=$VS,tau=0.9,query_sampling=last" \
      --method "mixed=$VS,tau=0.9,query_sampling=mixed" --method "kv=$VS,tau=0.9,per_kv_group=true" \
      --method "strided-lq256=$VS,tau=0.9,last_q=256" --method "mixed-lq256=$VS,tau=0.9,last_q=256,query_sampling=mixed" \
      --method "kv-tail=plan:$PLANS4/q15-default-kv-tail.json" --out "$RES/$step" ;;
  q15-latency)  # issues 4/5: TTFT of the default, then where a follow-up turn's time goes
    run_cli eval latency $Q15 --lengths 16384,32768,65536,131072 --repeats 2 --warmup 1 --out "$RES/$step" \
      --methods dense,longinfer
    run python3 benchmarks/profile_prefill.py $Q15 --prefix 65536 --length 4096 --sort cpu --rows 30 \
      > "$RES/$step/profile-turn-cpu.txt" 2>&1
    run python3 benchmarks/profile_prefill.py $Q15 --prefix 65536 --length 4096 --sort cuda --rows 30 \
      > "$RES/$step/profile-turn-cuda.txt" 2>&1 ;;
  tail-bench)  # no model: the dense tail in the kernel (split or not) vs a second pass, plus the GPU tests of both
    LONGINFER_AUTOTUNE=0 timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_estimate_kernel.py \
      tests/test_gpu_graphs.py tests/test_ops_kernels.py -k "split or dense_from or graph or gpu" > "$RES/$step/pytest.txt" 2>&1
    run python3 benchmarks/tail_bench.py --out "$RES/$step"
    tail -3 "$RES/$step/pytest.txt" ;;
  slash-masks)  # no model: the vertical-slash kernel's GPU tests (bf16), then the slash chunks' mask forms timed
    # on tail_bench's structured index (a 4K turn over 64K keys, the 1.5B's heads)
    LONGINFER_AUTOTUNE=0 timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_ops_kernels.py \
      -k "bfloat16 or slash_masks or gpu" > "$RES/$step/pytest.txt" 2>&1
    tail -3 "$RES/$step/pytest.txt"
    run python3 benchmarks/tail_bench.py --repeats 10 --out "$RES/$step" ;;
  q15-core)  # one call for the usual speed check: turn by part, turn, TTFT with its floor, turn profile
    for sub in q15-turn-kernels q15-turn-default q15-ttft q15-turn-profile; do
      LIMIT=$((limit / 2)) bash "$0" "$sub"
    done
    exit 0 ;;
  q15-turn-kernels)  # issue 4: the turn's attention per layer and part (estimate, index, kernel, slash-mask forms),
    # real q/k, every layer (the core variants; VARIANTS=all adds every launch alternative: ~2 min per layer)
    run python3 benchmarks/turn_kernels.py $Q15 --variants "${VARIANTS:-core}" --out "$RES/$step" ;;
  q15-ttft-kernels)  # issues 4/5: the one-shot 128K prefill by part, 4 layers (where the sparse kernel's cost per
    # computed pair, ~2.2x dense SDPA's at 128K, goes: columns alone, diagonals alone, dense mode, covered loads),
    # then 16K (the crossover: estimate, selection and index are fixed costs per layer; pass 1 runs 96 programs there)
    # with the default's rule as a plan file whose layers go sparse from 16,384 keys (the default: from 20,480)
    run python3 benchmarks/turn_kernels.py $Q15 --prefix 0 --length 131072 --layers 0,9,18,27 --repeats 5 \
      --out "$RES/$step/128k"
    run python3 benchmarks/turn_kernels.py $Q15 --prefix 0 --length 16384 --layers 0,9,18,27 \
      --plan "$PLANS13/q15-gcols-tail.json" --out "$RES/$step/16k" ;;
  q15-turn-profile)  # issue 4: the turn's GPU time by op (PG text, default plan)
    run python3 benchmarks/profile_prefill.py $Q15 --prefix 65536 --length 4096 --sort cuda --rows 70 \
      > "$RES/$step/profile-turn-cuda.txt" 2>&1
    head -60 "$RES/$step/profile-turn-cuda.txt" | cut -c1-160 ;;
  q15-turn-default)  # issue 4: the second turn with the default plan only
    run python3 benchmarks/real_model_checks.py $Q15 --lengths "" --turn-prefix 65536 --turn-length 4096 \
      --out "$RES/$step/default" ;;
  q15-caps)  # issue 4: how many real rows of the 64K turn bind the selection caps? (all layers)
    run python3 benchmarks/selection_caps_check.py $Q15 --length 69632 --layers 28 --out "$RES/$step" ;;
  q15-select)  # issue 4, one call: caps at 64K, the turn by part (both selections), the turn with the Triton selection
    for sub in q15-caps q15-turn-kernels q15-turn-select; do
      LIMIT=$((limit / 3)) bash "$0" "$sub"
    done
    exit 0 ;;
  q15-turn-backends)  # issue 4: the second turn with the torch selection, then the default (auto: Triton on CUDA)
    run python3 benchmarks/real_model_checks.py $Q15 --lengths "" --turn-prefix 65536 --turn-length 4096 \
      --selection torch --out "$RES/$step/torch-selection"
    run python3 benchmarks/real_model_checks.py $Q15 --lengths "" --turn-prefix 65536 --turn-length 4096 \
      --out "$RES/$step/default" ;;
  q15-select2)  # issue 4, one call: the turn with both selection backends, then the turn by part
    LIMIT=$((limit / 3)) bash "$0" q15-turn-backends
    LIMIT=$((limit * 2 / 3)) bash "$0" q15-turn-kernels
    exit 0 ;;
  q15-turn-select)  # issue 4: the second turn with the default plan and the Triton selection forced (--selection triton)
    run python3 benchmarks/real_model_checks.py $Q15 --lengths "" --turn-prefix 65536 --turn-length 4096 \
      --selection triton --out "$RES/$step/triton-selection" ;;
  q15-ttft)  # issues 4/5: TTFT of the default (q15-latency without the profiles), and the no-attention floor
    run_cli eval latency $Q15 --lengths 16384,32768,65536,131072 --repeats 2 --warmup 1 --out "$RES/$step" \
      --methods dense,longinfer,none ;;
  q15-turn)  # issue 4: second turn of 4K over a cached 64K prefix, default and one index per KV group (both with the tail)
    run python3 benchmarks/real_model_checks.py $Q15 --lengths "" --turn-prefix 65536 --turn-length 4096 \
      --out "$RES/$step/default"
    run python3 benchmarks/real_model_checks.py $Q15 --lengths "" --turn-prefix 65536 --turn-length 4096 \
      --plan "$PLANS4/q15-default-kv-tail.json" --out "$RES/$step/kv-tail" ;;
  q15-ruler)  # issue 5: RULER-style at 128K, 6 samples per sub-task (resumable: rerun to finish)
    run_cli eval ruler $Q15 --lengths 131072 --samples 6 --out "$RES/$step" \
      --methods "dense,longinfer,longinfer:$PLANS4/q15-default-kv.json" ;;
  q15-ruler-tail)  # issue 5: does the dense tail (default since session 4) recover RULER at 128K? (rerun to finish)
    seed_dense_ruler
    run_cli eval ruler $Q15 --lengths 131072 --samples 6 --out "$RES/$step" --methods \
      "dense,longinfer,longinfer:$PLANS4/q15-default-kv-tail.json" ;;  # without the tail: session 4's default
  q15-ruler-kv95)  # issue 5: one index per KV group, tau 0.95, dense tail: closer to dense? (rerun to finish)
    seed_dense_ruler
    run_cli eval ruler $Q15 --lengths 131072 --samples 6 --out "$RES/$step" \
      --methods "dense,longinfer:$PLANS5/q15-kv-tau0.95-tail.json" ;;
  q15-frontier-hybrid)  # per-KV-group indices only in the worst layers (benchmarks/hybrid_plan.py), timed at 128K;
    run python3 benchmarks/recall_frontier.py $Q15 --length 131072 --rows 128 --no-oracles --time-kernels \
      --methods none --method "default=plan:$PLANS4/q15-default-notail.json" \
      --method "hybrid4=plan:$PLANS5/q15-hybrid-kv4-tail.json" --method "hybrid6=plan:$PLANS5/q15-hybrid-kv6-tail.json" \
      --method "hybrid10=plan:$PLANS5/q15-hybrid-kv10-tail.json" --method "kv=plan:$PLANS4/q15-default-kv-tail.json" \
      --method "def-bs128=$VS,tau=0.9,block_size=128" --out "$RES/$step" ;;  # and 128-row query tiles
  q15-ruler-hybrid)  # issue 5: RULER-style at 128K of the 6-layer hybrid (rerun to finish)
    seed_dense_ruler
    run_cli eval ruler $Q15 --lengths 131072 --samples 6 --out "$RES/$step" \
      --methods "dense,longinfer:$PLANS5/q15-hybrid-kv6-tail.json" ;;
  q15-ruler-32k)  # issue 5: rank plans where samples are cheap: 12 per task at 32K (rerun to finish)
    run_cli eval ruler $Q15 --lengths 32768 --samples 12 --out "$RES/$step" --methods \
      "dense,longinfer,longinfer:$PLANS5/q15-hybrid-kv6-tail.json,longinfer:$PLANS4/q15-default-kv-tail.json" ;;
  q15-kv-frontier)  # issues 4/5: one index per KV group + tail at tau 0.8 / 0.85: turn speed, RULER at 32K (rerun to finish)
    for tau in 0.8 0.85; do
      run python3 benchmarks/real_model_checks.py $Q15 --lengths "" --turn-prefix 65536 --turn-length 4096 \
        --plan "$PLANS8/q15-kv-tau$tau-tail.json" --out "$RES/$step/turn-kv-tau$tau"
    done
    seed_rows docs/results/gpu-session8/blockA/q15-ruler-32k/ruler.jsonl "dense"  # session 8's dense rows: same prompts
    run_cli eval ruler $Q15 --lengths 32768 --samples 12 --out "$RES/$step" --methods \
      "dense,longinfer:$PLANS8/q15-kv-tau0.8-tail.json,longinfer:$PLANS8/q15-kv-tau0.85-tail.json" ;;
  q15-plan-variants)  # issues 4/5: the default with 64 dense last rows, and with 256 estimation queries: turn, RULER 32K (rerun to finish)
    for plan in q15-default-tail64 q15-lq256-tail; do
      [ -d "$RES/$step/turn-$plan" ] || run python3 benchmarks/real_model_checks.py $Q15 --lengths "" --turn-prefix 65536 \
        --turn-length 4096 --plan "$PLANS9/$plan.json" --out "$RES/$step/turn-$plan"
    done
    seed_rows docs/results/gpu-session8/blockA/q15-ruler-32k/ruler.jsonl "dense"  # session 8's dense rows: same prompts
    run_cli eval ruler $Q15 --lengths 32768 --samples 12 --out "$RES/$step" --methods \
      "dense,longinfer:$PLANS9/q15-default-tail64.json,longinfer:$PLANS9/q15-lq256-tail.json" ;;
  q15-tau-frontier)  # issues 4/5: per-head tau 0.95 / 0.98 and per-KV-group tau 0.7 (all + tail): turn, RULER 32K (rerun to finish)
    for plan in q15-tau0.95-tail q15-tau0.98-tail q15-kv-tau0.7-tail; do
      [ -d "$RES/$step/turn-$plan" ] || run python3 benchmarks/real_model_checks.py $Q15 --lengths "" --turn-prefix 65536 \
        --turn-length 4096 --plan "$PLANS9/$plan.json" --out "$RES/$step/turn-$plan"
    done
    seed_rows docs/results/gpu-session8/blockA/q15-ruler-32k/ruler.jsonl "dense"  # session 8's dense rows: same prompts
    run_cli eval ruler $Q15 --lengths 32768 --samples 12 --out "$RES/$step" --methods "dense,longinfer:$PLANS9/q15-tau0.95-tail.json,\
longinfer:$PLANS9/q15-tau0.98-tail.json,longinfer:$PLANS9/q15-kv-tau0.7-tail.json" ;;
  q15-tail64)  # issues 4/5: 64 vs 128 dense last rows: the turn (both), RULER at 128K (dense and 128-row rows: session 8's)
    for plan in default q15-default-tail64; do
      opt=""; [ "$plan" = default ] || opt="--plan $PLANS9/$plan.json"
      [ -d "$RES/$step/turn-$plan" ] || run python3 benchmarks/real_model_checks.py $Q15 --lengths "" --turn-prefix 65536 \
        --turn-length 4096 $opt --out "$RES/$step/turn-$plan"
    done
    [ -f "$RES/$step/ruler.jsonl" ] || grep -v '"method": "longinfer:' docs/results/gpu-session8/blockA/q15-ruler-tail/ruler.jsonl \
      > "$RES/$step/ruler.jsonl"  # session 8's dense and default (128-row tail) rows: same prompts
    run_cli eval ruler $Q15 --lengths 131072 --samples 6 --out "$RES/$step" \
      --methods "dense,longinfer,longinfer:$PLANS9/q15-default-tail64.json" ;;
  q15-tail-launch)  # issue 4: the dense tail as a separate split-K launch vs fused: turn by part, then the turn both ways
    run python3 benchmarks/turn_kernels.py $Q15 --out "$RES/$step/turn-kernels"
    for launch in fused separate; do
      run python3 benchmarks/real_model_checks.py $Q15 --lengths "" --turn-prefix 65536 --turn-length 4096 \
        --tail-launch $launch --out "$RES/$step/turn-$launch"
    done ;;
  q15-cap-plans)  # issues 4/5: column caps above every 64K head's need (no round 1): turns (fused/separate tail), RULER 32K (+ group_mix 0.5)
    for variant in cap8448:fused cap8448:separate cap12288:separate; do
      plan=${variant%%:*}; launch=${variant##*:}
      [ -d "$RES/$step/turn-$plan-$launch" ] || run python3 benchmarks/real_model_checks.py $Q15 --lengths "" \
        --turn-prefix 65536 --turn-length 4096 --plan "$PLANS10/q15-$plan-tail.json" --tail-launch $launch \
        --out "$RES/$step/turn-$plan-$launch"
    done
    seed_rows docs/results/gpu-session8/blockA/q15-ruler-32k/ruler.jsonl "dense"  # session 8's dense rows: same prompts
    run_cli eval ruler $Q15 --lengths 32768 --samples 12 --out "$RES/$step" --methods \
      "dense,longinfer:$PLANS10/q15-cap8448-tail.json,longinfer:$PLANS10/q15-cap12288-tail.json,\
longinfer:$PLANS10/q15-mix0.5-tail.json" ;;
  q15-vcap-low)  # issues 4/5: column caps below the default (more diagonals at the same tau): turns, RULER 32K
    plan_turns "$PLANS11" cap2048 cap1024
    seed_ruler_32k
    run_cli eval ruler $Q15 --lengths 32768 --samples 12 --out "$RES/$step" --methods \
      "dense,longinfer,longinfer:$PLANS11/q15-cap2048-tail.json,longinfer:$PLANS11/q15-cap1024-tail.json" ;;
  q15-exact-masses)  # issue 5: the default pattern and budget on exact masses (every row estimates): is the estimator or the budget short? RULER 32K
    seed_ruler_32k
    run_cli eval ruler $Q15 --lengths 32768 --samples 12 --out "$RES/$step" --methods \
      "dense,longinfer,longinfer:$PLANS11/q15-exact-tail.json,longinfer:$PLANS11/q15-exact0.8-tail.json" ;;
  q15-peer)  # issue 5: the peer (minference 0.1.6: its estimate + kernel, VS(1000, 6096) every head) beside dense and
    # the default on the 1.5B: TTFT at 32K / 128K, then RULER 32K (dense rows: session 8's; rerun to finish).
    # Carry .device/minference-0.1.6.0.tar.gz (built here, ~80 s, once per warm machine).
    peer
    [ -d "$RES/$step/latency" ] || run_cli eval latency $Q15 --lengths 32768,131072 --repeats 2 --warmup 1 \
      --out "$RES/$step/latency" --methods dense,longinfer,peer
    seed_ruler_32k
    run_cli eval ruler $Q15 --lengths 32768 --samples 12 --out "$RES/$step" --methods dense,longinfer,peer ;;
  q15-column-q)  # issue 5: the column mass from 1,024-16,384 estimation queries (column_q: no diagonal scatter), the
    # diagonal mass from the default's 64, at tau 0.9 / 0.8; beside both masses from 4,096 at tau 0.8. RULER 32K (rerun to finish)
    plan_ruler_32k "$PLANS12" cq1024 cq4096 cq4096-tau0.8 lq4096-tau0.8 ;;
  q15-column-q-speed)  # issues 4/5: what column_q costs: the second turn (4K over 64K) and TTFT at 128K; the turn with
    # 1,024 estimation queries again (session 12: 182.7 ms with 64-query blocks in pass 2; session 13 with 32: slower)
    plan_turns "$PLANS12" cq1024 cq4096-tau0.8
    plan_turns docs/results/gpu-session12/q15-lastq lq1024
    run_cli eval latency $Q15 --lengths 131072 --repeats 2 --warmup 1 --out "$RES/$step/latency" \
      --methods "dense,longinfer,$(plan_methods "$PLANS12" cq4096-tau0.8 cq16384-tau0.8 lq4096-tau0.8)" ;;
  q15-tau-high)  # issue 5: per-head tau 0.995 / 0.999 (denser, per-head index): does RULER 32K follow density alone? turns, RULER
    plan_turns "$PLANS11" tau0.995 tau0.999
    seed_ruler_32k
    run_cli eval ruler $Q15 --lengths 32768 --samples 12 --out "$RES/$step" --methods \
      "dense,longinfer,longinfer:$PLANS11/q15-tau0.995-tail.json,longinfer:$PLANS11/q15-tau0.999-tail.json" ;;
  q15-group-columns)  # issue 5: every head with its KV group's columns (group_columns), its own diagonals, at tau 0.9 /
    # 0.8, on RULER 32K (rerun to finish), then both turns (4K over 64K) and the per-KV-group tau-0.8 plan's turn
    plan_ruler_32k "$PLANS13" gcols gcols-tau0.8
    plan_turns $PLANS13 gcols gcols-tau0.8
    plan_turns $PLANS8 kv-tau0.8 ;;  # one index per KV group: now on the Triton selection (session 9: 1.54x on torch's)
  q15-segments)  # issue 5: one index per query segment (4 / 8 / 16 segments, each from 64 strided queries of its own), and
    # 8 segments at tau 0.8, on RULER 32K (rerun to finish); then the second turn of the 8-segment plan.
    plan_ruler_32k "$PLANS13" seg4 seg8 seg16 seg8-tau0.8
    plan_turns $PLANS13 seg8 ;;
  q15-sampling)  # issue 5: the default's 64 estimation queries half from the prompt's end (mixed), all from it (last),
    # and 128 mixed, on RULER 32K (rerun to finish); same estimate cost as the default
    plan_ruler_32k "$PLANS13" mixed last mixed128 ;;
  q15-floors)  # issue 5: the default with a floor of columns / diagonals per head (256 / 1,024 and 1,000 / 3,000; the
    # selection then runs on torch) on RULER 32K (rerun to finish)
    plan_ruler_32k "$PLANS13" floor-v256-s1024 floor-v1000-s3000 ;;
  q15-peer-128k)  # issue 5: the peer on RULER 128K beside dense (session 4's rows) and the default (rerun to finish).
    # Carry .device/minference-0.1.6.0.tar.gz.
    peer
    seed_dense_ruler
    run_cli eval ruler $Q15 --lengths 131072 --samples 6 --out "$RES/$step" --methods dense,longinfer,peer ;;
  q15-new-default)  # issues 4/5, session 14's default (each head its KV group's columns): the turn by part (is the
    # kernel back at ~40 ms with q_len / k_len specialized?), the turn, TTFT with the per-head plan beside it
    LIMIT=$((limit / 3)) bash "$0" q15-turn-kernels
    LIMIT=$((limit / 6)) bash "$0" q15-turn-default
    run_cli eval latency $Q15 --lengths 16384,32768,65536,131072 --repeats 2 --warmup 1 --out "$RES/$step/latency" \
      --methods "dense,longinfer,$(plan_methods "$PLANS14" perhead),none" ;;
  q15-ruler-128k-default)  # issue 5: RULER-style at 128K of session 14's default beside dense (session 4's rows
    # seeded; the per-head default's: session 10, 58.3 vs 71.0); rerun to finish
    seed_dense_ruler
    run_cli eval ruler $Q15 --lengths 131072 --samples 6 --out "$RES/$step" --methods dense,longinfer ;;
  q15-needle-default)  # issue 6's end check: needle at 64K / 128K (5 depths x 2 needles) with session 14's default
    # beside dense (session 1's default passed 20 / 20 on an H100: docs/results/gpu-qwen1.5b-128k/eval/needle.md)
    run_cli eval needle $Q15 --lengths 65536,131072 --depths 0.0,0.25,0.5,0.75,1.0 --needles-per-cell 2 \
      --methods dense,longinfer --out "$RES/$step" ;;
  q15-floors-128k)  # issue 5: the default with at least 1,000 columns / 3,000 diagonals per head (RULER 32K +1.8 at
    # 61.9% density, session 14) at 128K, where the default lost 9.3 and the peer 1.2 (session 15). Resumes from
    # session 15's records (dense + 15 of 42 prompts); rerun to finish
    [ -f "$RES/$step/ruler.jsonl" ] || cp docs/results/gpu-session15/q15-floors-128k/ruler.jsonl "$RES/$step/"
    run_cli eval ruler $Q15 --lengths 131072 --samples 6 --out "$RES/$step" \
      --methods "dense,$(plan_methods "$PLANS13" floor-v1000-s3000)" ;;
  q15-floors-128k-ttft)  # its TTFT at 128K beside dense
    run_cli eval latency $Q15 --lengths 131072 --repeats 2 --warmup 1 --out "$RES/$step" \
      --methods "dense,$(plan_methods "$PLANS13" floor-v1000-s3000)" ;;
  q15-floors-cheaper)  # issues 4/5: floors of 500 columns / 1,500 diagonals per head, own or KV-group columns
    # ($PLANS15): RULER 128K (dense seeded; rerun to finish), then TTFT 32K / 128K with the 1,000 / 3,000 floor beside
    seed_dense_ruler
    run_cli eval ruler $Q15 --lengths 131072 --samples 6 --out "$RES/$step" \
      --methods "dense,$(plan_methods "$PLANS15" floor-v500-s1500 gcols-floor-v500-s1500)"
    run_cli eval latency $Q15 --lengths 32768,131072 --repeats 2 --warmup 1 --out "$RES/$step/latency" --methods \
      "dense,longinfer,$(plan_methods "$PLANS15" floor-v500-s1500 gcols-floor-v500-s1500),$(plan_methods "$PLANS13" floor-v1000-s3000)" ;;
  q15-floors-from64k)  # issues 4/5: the default's rule plus a 1,000 / 3,000 floor on calls over >= 65,536 keys only
    # (at 32K it is the default: 74.9 vs 76.0): RULER 128K (dense seeded; rerun to finish), the turn, TTFT at 128K
    seed_dense_ruler
    run_cli eval ruler $Q15 --lengths 131072 --samples 6 --out "$RES/$step" \
      --methods "dense,$(plan_methods "$PLANS15" gcols-floor-v1000-s3000-from64k)"
    plan_turns "$PLANS15" gcols-floor-v1000-s3000-from64k
    run_cli eval latency $Q15 --lengths 131072 --repeats 2 --warmup 1 --out "$RES/$step/latency" \
      --methods "dense,longinfer,$(plan_methods "$PLANS15" gcols-floor-v1000-s3000-from64k)" ;;
  q16-ruler-64k)  # issue 5: where should the default's long rule (per-head columns + a 1,000 / 3,000 floor from
    # 65,536 query rows; session 16) start? RULER-style at 64K, 6 prompts per sub-task: dense, the default (the long
    # rule applies: the prompts are 65,536 tokens) and the shared columns alone (session 15's default rule); rerun to finish
    run_cli eval ruler $Q15 --lengths 65536 --samples 6 --out "$RES/$step" --methods "dense,longinfer,$(plan_methods "$PLANS13" gcols)" ;;
  q16-floor-parts-128k)  # issues 4/5: which half of the default's long rule (1,000 columns / 3,000 diagonals per
    # head) buys its 7 RULER-style points at 128K? Each half alone ($PLANS16), dense seeded; rerun to finish; then TTFT
    seed_dense_ruler
    run_cli eval ruler $Q15 --lengths 131072 --samples 6 --out "$RES/$step" \
      --methods "dense,$(plan_methods "$PLANS16" floor-v1000-s0 floor-v0-s3000)"
    run_cli eval latency $Q15 --lengths 131072 --repeats 2 --warmup 1 --out "$RES/$step/latency" \
      --methods "dense,longinfer,$(plan_methods "$PLANS16" floor-v1000-s0 floor-v0-s3000)" ;;
  q17-crossover)  # issue 5: TTFT where the sparse path starts to pay: 16K-24K, dense, the default (dense below
    # 20,480 keys) and session 13's shared-columns rule as a plan sparse from 16,384 keys, and the no-attention floor
    run_cli eval latency $Q15 --lengths 16384,20480,24576 --repeats 3 --warmup 1 --out "$RES/$step" \
      --methods "dense,longinfer,$(plan_methods "$PLANS13" gcols),none" ;;
  q18-queries-128k)  # issues 5/6: is the long rule's 3,000-diagonal floor (68.6 at 1.45x TTFT, diagonals 201 of 215
    # kernel ms) a stand-in for a better estimate? 1,024 and 256 estimation queries, no floor ($PLANS17): RULER-style
    # 128K (dense seeded; rerun to finish), TTFT beside the default, then what the 1,024-query estimate costs there
    seed_dense_ruler
    run_cli eval ruler $Q15 --lengths 131072 --samples 6 --out "$RES/$step" \
      --methods "dense,$(plan_methods "$PLANS17" lq1024 lq256)"
    run_cli eval latency $Q15 --lengths 131072 --repeats 2 --warmup 1 --out "$RES/$step/latency" \
      --methods "dense,longinfer,$(plan_methods "$PLANS17" lq1024 lq256)"
    run python3 benchmarks/turn_kernels.py $Q15 --prefix 0 --length 131072 --layers 0,27 --repeats 3 \
      --plan "$PLANS17/q15-lq1024-tail.json" --out "$RES/$step/kernels-lq1024" ;;
  q18-more-128k)  # issues 5/6: 1,024 estimation queries with a 1,500-diagonal floor, and block-sparse everywhere
    # (coverage 0.9 of pooled blocks: content-based long-range pairs) ($PLANS17): RULER-style 128K (dense seeded;
    # rerun to finish), then TTFT, with one index per KV group (68.5 at 128K in session 8, within noise like the long
    # rule; its kernel stacks the group's heads on each K/V load; TTFT at 128K never measured)
    seed_dense_ruler
    run_cli eval ruler $Q15 --lengths 131072 --samples 6 --out "$RES/$step" \
      --methods "dense,$(plan_methods "$PLANS17" lq1024-s1500 bs-cov0.9)"
    run_cli eval latency $Q15 --lengths 131072 --repeats 2 --warmup 1 --out "$RES/$step/latency" \
      --methods "dense,longinfer,$(plan_methods "$PLANS17" lq1024-s1500 bs-cov0.9),$(plan_methods "$PLANS4" default-kv)" ;;
  q18-ruler-64k)  # issue 5: at 64K the long rule scored -4.8 at 1.02x TTFT (44% dense), the shared columns -11.5:
    # a floor scaled to the length (1,500 diagonals: 2.3% of the offsets, as 3,000 at 128K), 1,024 estimation
    # queries ($PLANS17) and one index per KV group ($PLANS4); RULER-style 64K (session 17's dense rows seeded;
    # rerun to finish), then TTFT
    seed_rows docs/results/gpu-session17/q16-ruler-64k/ruler.jsonl "dense"
    run_cli eval ruler $Q15 --lengths 65536 --samples 6 --out "$RES/$step" \
      --methods "dense,$(plan_methods "$PLANS17" s1500 lq1024),$(plan_methods "$PLANS4" default-kv)"
    run_cli eval latency $Q15 --lengths 65536 --repeats 2 --warmup 1 --out "$RES/$step/latency" \
      --methods "dense,longinfer,$(plan_methods "$PLANS17" s1500 lq1024),$(plan_methods "$PLANS4" default-kv)" ;;
  q18-turn-plans)  # issue 4: the turn (4K over a cached 64K, 2.54x with the default: 3x is the target) with
    # block-sparse everywhere ($PLANS17: a pooled estimate, no per-layer radix selection, whole 64-key blocks)
    # and one index per KV group ($PLANS4), then the default in the same call
    plan_turns "$PLANS17" bs-cov0.9
    plan_turns "$PLANS4" default-kv
    [ -d "$RES/$step/turn-default" ] || run python3 benchmarks/real_model_checks.py $Q15 --lengths "" \
      --turn-prefix 65536 --turn-length 4096 --out "$RES/$step/turn-default" ;;
  q19-control-64k)  # issue 5: at 64K five sparse indexes (17.5-45% dense) lose the same prompts (niah_multikey i3:
    # 7106080 for 7106049): is it the index, or our kernel's bf16 numerics? Exact attention through our A-shape
    # kernel ($PLANS18 exact-kernel) beside dense and the default, dense rerun (no seeding) so that every record
    # carries the reference answer's log-probability (paired per prompt, continuous); rerun to finish, and
    # SAMPLES=12 adds 6 more prompts per sub-task to the same records (84 in all)
    run_cli eval ruler $Q15 --lengths 65536 --samples "${SAMPLES:-6}" --out "$RES/$step" \
      --methods "dense,longinfer,$(plan_methods "$PLANS18" exact-kernel)" ;;
  q19-control-128k)  # issue 5: the same control at 128K (the default 68.6 vs dense 71.0 there, session 17). Session
    # 21 recorded dense and the default (docs/results/gpu-session21/q19-control-128k/): a fresh machine resumes
    # from those records, so only the exact-kernel method runs (~10 min for 42 prompts; rerun to finish)
    [ -f "$RES/$step/ruler.jsonl" ] || cp docs/results/gpu-session21/q19-control-128k/ruler.jsonl "$RES/$step/"
    run_cli eval ruler $Q15 --lengths 131072 --samples "${SAMPLES:-6}" --out "$RES/$step" \
      --methods "dense,longinfer,$(plan_methods "$PLANS18" exact-kernel)" ;;
  q19-tiles32)  # issues 4/5: 32-row query tiles ($PLANS18; a lone diagonal costs 32 keys per row, not 64): the
    # turn with the default's short rule on them, then the long rule on them at 128K, RULER-style (dense seeded;
    # rerun to finish) and TTFT beside dense and the default
    plan_turns "$PLANS18" gcols-bs32
    seed_dense_ruler
    run_cli eval ruler $Q15 --lengths 131072 --samples 6 --out "$RES/$step" \
      --methods "dense,$(plan_methods "$PLANS18" s3000-bs32)"
    run_cli eval latency $Q15 --lengths 131072 --repeats 2 --warmup 1 --out "$RES/$step/latency" \
      --methods "dense,longinfer,$(plan_methods "$PLANS18" s3000-bs32)" ;;
  q15-floors-32k)  # issue 5: the cheaper floors at 32K (12 prompts per sub-task, session 8's dense rows; rerun to
    # finish) and the turns (4K over 64K) of every floor plan (floors now on the Triton selection)
    plan_turns "$PLANS15" floor-v500-s1500 gcols-floor-v500-s1500
    plan_turns "$PLANS13" floor-v1000-s3000
    plan_ruler_32k "$PLANS15" floor-v500-s1500 gcols-floor-v500-s1500 ;;
  q15-gcols-cheaper)  # issues 4/5: shared KV-group columns at tau 0.85 (0.9: 74.9 / 2.21x, 0.8: 71.9 / 2.56x): RULER
    # 32K (rerun to finish); the turns of it and of 1,024 columns per head before the union (4,096 in the default; at
    # 32K that cap almost never binds, CPU probe: docs/results/ruler-rows-error-cpu-qwen0.5b-32k-options/)
    plan_turns "$PLANS14" gcols-tau0.85 gcols-cap1024
    plan_ruler_32k "$PLANS14" gcols-tau0.85 ;;
  q15-rows-error)  # issue 5: recall and output error at the facts' rows of RULER 32K prompts on the 1.5B, for plans whose
    # RULER scores are known (default 65.1, cap 8,448 61.7, tau 0.98 67.4, union tau 0.7 / 0.8 70.9 / 74.5, 1,024 queries
    # 72.5; column_q 1,024 after q15-column-q): does either
    # proxy rank them as RULER does in this regime? (CPU 0.5B 8K: docs/results/ruler-rows-error-cpu-qwen0.5b-8k/)
    run python3 benchmarks/ruler_rows_recall.py $Q15 --length 32768 --tasks niah_multivalue,vt,niah_multikey \
      --samples 2 --out "$RES/$step" --method "default=$VS,tau=0.9" --method "cap8448=$VS,tau=0.9,num_vertical=8448" \
      --method "tau0.98=$VS,tau=0.98" --method "kv0.7=$VS,tau=0.7,per_kv_group=true" \
      --method "kv0.8=$VS,tau=0.8,per_kv_group=true" --method "lq1024=$VS,tau=0.9,last_q=1024" \
      --method "cq1024=$VS,tau=0.9,column_q=1024" ;;
  q21-rows-64k)  # issue 5: the 64K gap is the index's (session 20's control): recall and output error at the facts'
    # rows of the 64K multi-key / multi-value prompts (i3 of niah_multikey is lost by every sparse run, i5 of
    # niah_multivalue by most), the default plan beside more mass and more estimation queries; one record per
    # prompt, so the lost prompts compare with the kept ones (rerun to finish)
    run python3 benchmarks/ruler_rows_recall.py $Q15 --length 65536 --tasks niah_multikey,niah_multivalue \
      --samples 6 --out "$RES/$step" --method "default=plan" --method "tau0.98=$VS,tau=0.98" \
      --method "lq1024=$VS,tau=0.9,last_q=1024" ;;
  q15-ppl)  # issue 5: perplexity, 4 windows at 32K and the one 128K window the corpus holds
    run_cli eval ppl $Q15 --lengths 32768 --samples 4 --methods "dense,longinfer" --out "$RES/$step"
    run_cli eval ppl $Q15 --lengths 131072 --samples 1 --methods "dense,longinfer" --out "$RES/$step" ;;
  q05-ruler)  # issue 5: RULER-style at 16K and 32K with the peer, 6 samples per sub-task
    peer
    run_cli eval ruler $Q05 --lengths 16384,32768 --samples 6 --methods "dense,longinfer,peer" --out "$RES/$step" ;;
  q05-peer-16k)  # issue 5: the 0.5B at 16K with the peer beside dense and longinfer, 6 samples per sub-task (carry the peer sdist)
    peer
    run_cli eval ruler $Q05 --lengths 16384 --samples 6 --methods "dense,longinfer,peer" --out "$RES/$step" ;;
  q05-needle)  # issue 5: needle with the peer beside dense and longinfer
    peer
    run_cli eval needle $Q05 --lengths 8192,16384,32768 --methods "dense,longinfer,peer" --out "$RES/$step" ;;
  q23-repeat-64k)  # issue 5: extra estimation rows at distant repeated 4-grams ($PLANS23 repeat64: the default +
    # up to 64 such rows; CPU 0.5B 8K: needle-row recall at the oracle's). RULER-style 64K, session 20's dense and
    # default rows seeded (the same code, prompts and default digest); rerun to finish
    seed_rows docs/results/gpu-session20/q19-control-64k/ruler.jsonl "dense|longinfer"
    run_cli eval ruler $Q15 --lengths 65536 --samples 6 --out "$RES/$step" \
      --methods "dense,longinfer,$(plan_methods "$PLANS23" repeat64)" ;;
  q23-repeat-128k)  # issue 5: the same at 128K, session 21's dense and default rows seeded; rerun to finish
    [ -f "$RES/$step/ruler.jsonl" ] || cp docs/results/gpu-session21/q19-control-128k/ruler.jsonl "$RES/$step/"
    run_cli eval ruler $Q15 --lengths 131072 --samples 6 --out "$RES/$step" \
      --methods "dense,longinfer,$(plan_methods "$PLANS23" repeat64)" ;;
  q23-repeat-speed)  # issues 4/5: what the repeat rows cost: the turn (4K over a cached 64K) with them and with the
    # default, then TTFT at 64K / 128K beside dense and the default
    plan_turns "$PLANS23" repeat64
    [ -d "$RES/$step/turn-default" ] || run python3 benchmarks/real_model_checks.py $Q15 --lengths "" \
      --turn-prefix 65536 --turn-length 4096 --out "$RES/$step/turn-default"
    run_cli eval latency $Q15 --lengths 65536,131072 --repeats 2 --warmup 1 --out "$RES/$step/latency" \
      --methods "dense,longinfer,$(plan_methods "$PLANS23" repeat64)" ;;
  q24-question-rows-128k)  # issue 5: the peer (-1.2 at 128K) estimates from the prompt's last 64 queries, where the
    # question attends to the facts; the default (-3.4) from 64 strided ones. The peer's rule on our kernels and the
    # default with the last 64 queries added ($PLANS23 peer-rule, long-mixed128): RULER-style 128K (session 21's dense
    # and default rows seeded; rerun to finish), then TTFT at 128K
    [ -f "$RES/$step/ruler.jsonl" ] || cp docs/results/gpu-session21/q19-control-128k/ruler.jsonl "$RES/$step/"
    run_cli eval ruler $Q15 --lengths 131072 --samples 6 --out "$RES/$step" \
      --methods "dense,longinfer,$(plan_methods "$PLANS23" peer-rule long-mixed128)"
    run_cli eval latency $Q15 --lengths 131072 --repeats 2 --warmup 1 --out "$RES/$step/latency" \
      --methods "dense,longinfer,$(plan_methods "$PLANS23" peer-rule long-mixed128)" ;;
  q24-question-rows-64k)  # issue 5: the same two plans at 64K (default -3.6 there), session 20's dense and default
    # rows seeded (as q23-repeat-64k); rerun to finish
    seed_rows docs/results/gpu-session20/q19-control-64k/ruler.jsonl "dense|longinfer"
    run_cli eval ruler $Q15 --lengths 65536 --samples 6 --out "$RES/$step" \
      --methods "dense,longinfer,$(plan_methods "$PLANS23" peer-rule long-mixed128)" ;;
  q24-crossover)  # issue 5 (crossover <= 16K): TTFT at 16K and 20K of dense, the default (dense below 20,480 keys),
    # the default sparse from 16,384 keys ($PLANS24 from16k) and the no-attention floor
    run_cli eval latency $Q15 --lengths 16384,20480 --repeats 3 --warmup 1 --out "$RES/$step" \
      --methods "dense,longinfer,$(plan_methods "$PLANS24" from16k),none" ;;
  q25-variants-128k)  # issue 5: the default (now with the question's queries) still loses 0.31 nats at 128K where the
    # peer's rule (last 64 queries, 1,000 columns, 6,096 diagonals) loses 0.16. Three ways toward it: a 6,000-diagonal
    # floor ($PLANS24 question-s6000), 128 + 128 estimation queries ($PLANS25 question-lq128), the KV group's columns
    # on every call ($PLANS25 question-groupcols). RULER-style 128K with session 24's dense, peer-rule and mixed128
    # (= today's default) rows seeded, then TTFT beside dense and the default; rerun to finish
    seed_rows docs/results/gpu-session24/q24-question-rows-128k/ruler.jsonl \
      "dense|longinfer:q15-peer-rule-tail|longinfer:q15-long-mixed128-tail"
    run_cli eval ruler $Q15 --lengths 131072 --samples 6 --out "$RES/$step" \
      --methods "dense,$(plan_methods "$PLANS23" peer-rule long-mixed128),$(plan_methods "$PLANS24" question-s6000),$(plan_methods "$PLANS25" question-lq128 question-groupcols)"
    run_cli eval latency $Q15 --lengths 131072 --repeats 2 --warmup 1 --out "$RES/$step/latency" \
      --methods "dense,longinfer,$(plan_methods "$PLANS24" question-s6000),$(plan_methods "$PLANS25" question-lq128 question-groupcols)" ;;
  q25-floor-64k)  # issue 5: the same at 64K (session 20's dense rows seeded); rerun to finish
    seed_rows docs/results/gpu-session20/q19-control-64k/ruler.jsonl "dense"
    run_cli eval ruler $Q15 --lengths 65536 --samples 6 --out "$RES/$step" \
      --methods "dense,$(plan_methods "$PLANS24" question-s6000)" ;;
  q25-16k)  # issue 5 (crossover <= 16K): the default sparse from 16,384 keys lost 4.2 points at 16K (variable
    # tracking); with the question's queries ($PLANS24 from16k-question): RULER-style 16K, 12 per sub-task, then TTFT
    # (the default runs dense below 20,480 keys, so only its TTFT is shown)
    run_cli eval ruler $Q15 --lengths 16384 --samples 12 --out "$RES/$step" \
      --methods "dense,$(plan_methods "$PLANS24" from16k-question)"
    run_cli eval latency $Q15 --lengths 16384,18432 --repeats 10 --warmup 2 --out "$RES/$step/latency" \
      --methods "dense,longinfer,$(plan_methods "$PLANS24" from16k-question)" ;;
  q25-turn-question)  # issue 4: the turn (4K over a cached 64K; 3.05x) with the question's queries on 4K+ rows
    # ($PLANS24 turn-question), then the default in the same call
    plan_turns "$PLANS24" turn-question
    [ -d "$RES/$step/turn-default" ] || run python3 benchmarks/real_model_checks.py $Q15 --lengths "" \
      --turn-prefix 65536 --turn-length 4096 --out "$RES/$step/turn-default" ;;
  q25-q05-question-32k)  # issue 5, a second model: Qwen2.5-Coder-0.5B at 32K, the default (question rows from 16K
    # rows) beside the same without them ($PLANS24 q05-strided); session 24's 42 dense rows seeded; rerun to finish
    [ -f "$RES/$step/ruler.jsonl" ] || cp docs/results/gpu-session24/q24-q05-32k/ruler.jsonl "$RES/$step/"
    run_cli eval ruler $Q05 --lengths 32768 --samples 6 --out "$RES/$step" \
      --methods "dense,longinfer,longinfer:$PLANS24/q05-strided-tail.json" ;;
  q25-estimate-cost)  # issue 6 (every option's estimation cost at 128K): per layer (0 and 27) on the model's own
    # q/k of a 128K prefill, the default's estimate, index and kernel (question rows: 128 estimation queries) and
    # the same without the question rows ($PLANS24 strided)
    [ -d "$RES/$step/kernels-default" ] || run python3 benchmarks/turn_kernels.py $Q15 --prefix 0 --length 131072 \
      --layers 0,27 --repeats 3 --out "$RES/$step/kernels-default"
    [ -d "$RES/$step/kernels-strided" ] || run python3 benchmarks/turn_kernels.py $Q15 --prefix 0 --length 131072 \
      --layers 0,27 --repeats 3 --plan "$PLANS24/q15-strided-tail.json" --out "$RES/$step/kernels-strided"
    # issue 3's shape (Hq=32, Hkv=8, D=128; no model): the estimate against the sparse kernel, with and without
    # the question rows (their doubled estimate was 9.9% of the 128K kernel time with 64 queries)
    run python3 benchmarks/estimator_cost.py --lengths 32768,131072 --no-torch-path --out "$RES/$step/estcost" ;;
  q26-qcols-short)  # (low priority: on the CPU, 0.5B at 8K, the question's columns were already in the index,
    # +0.03 nats; docs/results/ruler-cpu-qwen0.5b-8k-qcols/)
    # issue 5: the default's remaining losses at 16K / 32K are multi-value answers (-2.05 / -1.27 nats;
    # the peer's rule, 1,000 columns from its last 64 queries, loses none at 32K): the default + the 1,000 columns
    # its question's queries attend to most ($PLANS25 question-qcols1000). RULER-style 32K and 16K, 12 per
    # sub-task, beside dense and the default (sessions 24 / 25's rows seeded: same code and prompts), then TTFT
    if [ ! -f "$RES/$step/ruler.jsonl" ]; then
      seed_rows docs/results/gpu-session24/q24-ruler-32k/ruler.jsonl \
        "dense|longinfer:q15-peer-rule-tail|longinfer:q15-long-mixed128-tail"
      cat docs/results/gpu-session25/q25-16k/ruler.jsonl >> "$RES/$step/ruler.jsonl"
    fi
    run_cli eval ruler $Q15 --lengths 32768 --samples 12 --out "$RES/$step" \
      --methods "dense,$(plan_methods "$PLANS23" peer-rule long-mixed128),$(plan_methods "$PLANS25" question-qcols1000)"
    run_cli eval ruler $Q15 --lengths 16384 --samples 12 --out "$RES/$step" \
      --methods "dense,$(plan_methods "$PLANS24" from16k-question),$(plan_methods "$PLANS25" question-qcols1000)"
    run_cli eval latency $Q15 --lengths 16384,32768,131072 --repeats 3 --warmup 1 --out "$RES/$step/latency" \
      --methods "dense,longinfer,$(plan_methods "$PLANS25" question-qcols1000)" ;;
  q26-qcols-128k)  # issue 5: the same at 128K, and this session's two 128K variants together (KV-group columns +
    # a 6,000-diagonal floor: $PLANS25 question-groupcols-s6000); session 25's rows seeded; rerun to finish
    [ -f "$RES/$step/ruler.jsonl" ] || cp docs/results/gpu-session25/q25-variants-128k/ruler.jsonl "$RES/$step/"
    run_cli eval ruler $Q15 --lengths 131072 --samples 6 --out "$RES/$step" \
      --methods "dense,$(plan_methods "$PLANS23" peer-rule long-mixed128),$(plan_methods "$PLANS24" question-s6000),$(plan_methods "$PLANS25" question-groupcols question-qcols1000 question-groupcols-s6000)"
    run_cli eval latency $Q15 --lengths 131072 --repeats 2 --warmup 1 --out "$RES/$step/latency" \
      --methods "dense,longinfer,$(plan_methods "$PLANS25" question-qcols1000 question-groupcols-s6000)" ;;
  q26-128k-12)  # issue 5: at 128K no variant won both measures with 6 prompts per sub-task (session 25: ±4 points
    # are noise). KV-group columns + a 6,000-diagonal floor ($PLANS25 question-groupcols-s6000) on session 25's 42
    # prompts first, then 12 prompts per sub-task (84) for dense, it, the default (session 24's mixed128 plan, the
    # same index at 128K) and the floor alone ($PLANS24 question-s6000); session 25's rows seeded; rerun to finish.
    # Then TTFT at 128K.
    [ -f "$RES/$step/ruler.jsonl" ] || cp docs/results/gpu-session25/q25-variants-128k/ruler.jsonl "$RES/$step/"
    run_cli eval ruler $Q15 --lengths 131072 --samples 6 --out "$RES/$step" \
      --methods "dense,$(plan_methods "$PLANS25" question-groupcols-s6000)"
    run_cli eval ruler $Q15 --lengths 131072 --samples 12 --out "$RES/$step" \
      --methods "dense,$(plan_methods "$PLANS25" question-groupcols-s6000),$(plan_methods "$PLANS23" long-mixed128),$(plan_methods "$PLANS24" question-s6000)"
    run_cli eval latency $Q15 --lengths 131072 --repeats 2 --warmup 1 --out "$RES/$step/latency" \
      --methods "dense,longinfer,$(plan_methods "$PLANS25" question-groupcols-s6000),$(plan_methods "$PLANS24" question-s6000)" ;;
  q27-default-checks)  # issues 5/6: the session-26 default (diagonal floor 3,000 per 65,536 query rows: 6,000 at
    # 128K) on the checks it has not had: needle at 64K / 128K beside dense (issue 6's end check), perplexity at 128K
    # (session 25's dense windows seeded: the same code and text), TTFT at 64K / 96K / 128K (between 64K and 128K
    # the floor interpolates, unmeasured); rerun to finish
    [ -f "$RES/$step/ppl.jsonl" ] || grep '"method": "dense"' docs/results/gpu-session25/q15-ppl/ppl.jsonl \
      | grep '"length": 131072' > "$RES/$step/ppl.jsonl"
    run_cli eval needle $Q15 --lengths 65536,131072 --depths 0.0,0.25,0.5,0.75,1.0 --needles-per-cell 2 \
      --methods dense,longinfer --out "$RES/$step"
    run_cli eval ppl $Q15 --lengths 131072 --samples 1 --methods "dense,longinfer" --out "$RES/$step"
    run_cli eval latency $Q15 --lengths 65536,98304,131072 --repeats 2 --warmup 1 --out "$RES/$step/latency" \
      --methods dense,longinfer ;;
  q27-oracles-128k)  # issue 6 at its own setting (1.5B, YaRN x4, 128K): how dense must a key index be for 0.92 / 0.80
    # when rows and heads spend unevenly (the key oracle), and when the rows of a 64-row kernel tile share one key
    # set (the finest budget a tiled kernel can follow); benchmarks/budget_oracle.py, resumable per layer
    # (session 28: with the pooled online estimates of each tile's keys beside the tile oracle)
    run python3 benchmarks/budget_oracle.py $Q15 --length 131072 --rows 128 --tile 64 \
      --estimate 64,128,256,64+local128,128+local128 --out "$RES/$step/tile64"
    run python3 benchmarks/budget_oracle.py $Q15 --length 131072 --rows 128 --out "$RES/$step/key" ;;
  q27-search-global)  # issues 3/6: per-head budgets from the offline search. A key oracle that spends unevenly
    # meets issue 3's target at 3.25% average density on this prompt (docs/results/budget-oracle-cpu-qwen0.5b-32k/);
    # on SmolLM2 at 4K the global allocation kept +0.05 p10 recall at equal density (CPU,
    # docs/results/search-global-cpu-smollm2-4k/). Qwen2.5-Coder-0.5B at 32K (assemble qwen2.5-coder-0.5b q05): the
    # per-head search at 0.1 and the global one (ladder of candidate budgets) at average 0.1 and 0.05, every layer
    # sparse (--dense-below 0, so that the recall compares indexes, not dense layers), then their recall on PG essays
    for spec in per_head:0.1 global:0.1 global:0.05; do
      name=q05-${spec/:/-}
      [ -f "$RES/$step/$name.plan.json" ] || run_cli search --model qwen2.5-coder-0.5b --length 32768 \
        --allocation "${spec%%:*}" --cost-budget "${spec##*:}" --dense-below 0 --no-progress \
        --out "$RES/$step/$name.plan.json"
    done
    run python3 benchmarks/recall_frontier.py --model qwen2.5-coder-0.5b --length 32768 --rows 128 --methods none \
      --oracle-densities 0.05,0.1 --method "perhead0.1=plan:$RES/$step/q05-per_head-0.1.plan.json" \
      --method "global0.1=plan:$RES/$step/q05-global-0.1.plan.json" \
      --method "global0.05=plan:$RES/$step/q05-global-0.05.plan.json" --time-kernels --out "$RES/$step/frontier" ;;
  q28-tile-keys)  # issue 6 / 3: the tile-keys pattern (each 64-row query tile its own keys above a threshold on its
    # pooled query's probabilities, plus a 128-key band) on real activations, beside the default plan, with kernel
    # and estimate times: Qwen2.5-Coder-1.5B, YaRN x4, 128K, PG essays, 10 of the 28 layers. Then its kernels in
    # bf16 (the CPU interpreter cannot check bf16) with what is left of LIMIT, after the measurement.
    run python3 benchmarks/recall_frontier.py $Q15 --length 131072 --rows 128 --methods none \
      --layers 0,3,6,9,12,15,18,21,24,27 --oracle-densities 0.05,0.1 --method default=plan \
      --method tk3=tile_keys:threshold=3 --method tk1.5=tile_keys:threshold=1.5 \
      --method tk0.75=tile_keys:threshold=0.75 --method tk0.4=tile_keys:threshold=0.4 \
      --method tkg1.5=tile_keys:threshold=1.5,per_kv_group=true --time-kernels --out "$RES/$step/frontier-128k"
    run python3 -m pytest -q -p no:cacheprovider tests/test_ops_kernels.py tests/test_tile_keys.py -k tile_keys ;;
  q28-tile-keys-search)  # issue 3: per-head tile_keys thresholds from the offline search (one price per unit of
    # kernel + estimate cost over all heads; cost 0.13 ~ 10% kernel density + the 3% estimate), then recall on PG
    # essays beside uniform thresholds, with kernel and estimate times: Qwen2.5-Coder-0.5B at 32K
    # (assemble qwen2.5-coder-0.5b q05). The CPU run of the same search: docs/results/search-tile-keys-cpu-qwen0.5b-32k/.
    plan="$RES/$step/q05-tk-global-0.13.plan.json"
    [ -f "$plan" ] || run_cli search --model qwen2.5-coder-0.5b --length 32768 --allocation global --cost-budget 0.13 \
      --dense-below 0 --no-measure --no-progress --candidates tile_keys:threshold=8 tile_keys:threshold=4 \
      tile_keys:threshold=2 tile_keys:threshold=1 tile_keys:threshold=0.5 tile_keys:threshold=0.25 \
      tile_keys:threshold=0.12 --out "$plan"
    run python3 benchmarks/recall_frontier.py --model qwen2.5-coder-0.5b --length 32768 --rows 128 --methods none \
      --oracle-densities 0.05,0.1 --method "searched=plan:$plan" --method default=plan \
      --method tk0.75=tile_keys:threshold=0.75 --method tk0.4=tile_keys:threshold=0.4 --time-kernels \
      --out "$RES/$step/frontier" ;;
  q29-tile-keys)  # issues 6 / 3: the tile-keys estimate writing the kernel's index itself and capping tiles by
    # doubling their threshold (session 28's estimate re-selected capped tiles in torch: 173-258 ms per layer at
    # thresholds 0.75 / 0.4), and 2 or 4 pooled queries per tile (heads whose rows attend different keys), beside
    # the default plan, with kernel and estimate times: Qwen2.5-Coder-1.5B, YaRN x4, 128K, PG essays, 10 layers.
    # Then the estimator's tests in bf16 with what is left of LIMIT.
    run python3 benchmarks/recall_frontier.py $Q15 --length 131072 --rows 128 --methods none \
      --layers 0,3,6,9,12,15,18,21,24,27 --oracle-densities 0.05 --method default=plan \
      --method tk3=tile_keys:threshold=3 --method tk1.5=tile_keys:threshold=1.5 \
      --method tk0.75=tile_keys:threshold=0.75 --method tk0.4=tile_keys:threshold=0.4 \
      --method tk3q2=tile_keys:threshold=3,queries=2 --method tk1.5q2=tile_keys:threshold=1.5,queries=2 \
      --method tk0.75q2=tile_keys:threshold=0.75,queries=2 --method tk3q4=tile_keys:threshold=3,queries=4 \
      --method tk1.5q4=tile_keys:threshold=1.5,queries=4 --time-kernels --out "$RES/$step/frontier-128k"
    run python3 -m pytest -q -p no:cacheprovider tests/test_tile_keys.py ;;
  q30-tile-keys-cost)  # issues 3 / 6: the tile-keys estimate's stages (pooled queries, pass 1) and pass-2 layouts
    # (keys split over programs, longest tiles first) against its kernel and dense, Hq=32 / Hkv=8 / D=128, structured
    # q/k (no model): which layout to make the default, and where the estimate's time goes.
    run python3 benchmarks/tile_keys_cost.py --lengths 32768,131072 --configs tk1.5,tk0.75,tk1.5q2 \
      --out "$RES/$step" ;;
  q30-tile-keys-mixed)  # issue 3: per-head tile_keys from the offline search with one pooled query, four, or every
    # row scored (queries=64: two passes of the full QK^T, for retrieval-like heads whose rows each attend their own
    # few far keys, which no pooled query reads; CPU, docs/results/recall-cpu-qwen0.5b-32k-tile-keys-queries/), one price per unit of kernel + estimate cost over all heads: Qwen2.5-Coder-0.5B at 32K
    # (assemble qwen2.5-coder-0.5b q05), then recall with times beside one threshold for all heads.
    plan="$RES/$step/q05-tk-mixed-0.13.plan.json"
    [ -f "$plan" ] || run_cli search --model qwen2.5-coder-0.5b --length 32768 --allocation global --cost-budget 0.13 \
      --dense-below 0 --no-measure --no-progress --candidates tile_keys:threshold=4 tile_keys:threshold=2 \
      tile_keys:threshold=1 tile_keys:threshold=0.5 tile_keys:threshold=2,queries=4 tile_keys:threshold=1,queries=4 \
      tile_keys:threshold=0.5,queries=4 tile_keys:threshold=64,queries=64 tile_keys:threshold=16,queries=64 --out "$plan"
    run python3 benchmarks/recall_frontier.py --model qwen2.5-coder-0.5b --length 32768 --rows 128 --methods none \
      --oracle-densities 0.05,0.1 --method "mixed=plan:$plan" --method tk0.75=tile_keys:threshold=0.75 \
      --method tk1q4=tile_keys:threshold=1,queries=4 --method tk16q64=tile_keys:threshold=16,queries=64 \
      --time-kernels --out "$RES/$step/frontier" ;;
  q30-tile-keys-checks)  # issues 6 / 5: tile_keys for every head end to end on the 1.5B at 128K (YaRN x4): needle
    # (5 depths x 2 needles; session 27's dense and default records seeded: the same code path and prompts), then
    # TTFT beside dense and the default plan. Plans: docs/results/gpu-session29/plans/ (threshold 1.5, one pooled
    # query: 0.908 / 0.852 recall at 5.5%, 3.64x attention; threshold 3 with 4 pooled queries: 0.914 / 0.851 at 5.3%).
    [ -f "$RES/$step/needle.jsonl" ] || grep '"length": 131072' docs/results/gpu-session27/q27-default-checks/needle.jsonl \
      > "$RES/$step/needle.jsonl"
    tk_plans="longinfer:$PLANS29/q15-tk1.5.plan.json,longinfer:$PLANS29/q15-tk3q4.plan.json"
    run_cli eval needle $Q15 --lengths 131072 --depths 0.0,0.25,0.5,0.75,1.0 --needles-per-cell 2 \
      --methods "dense,longinfer,$tk_plans" --out "$RES/$step"
    run_cli eval latency $Q15 --lengths 131072 --repeats 2 --warmup 1 --out "$RES/$step/latency" \
      --methods "dense,longinfer,$tk_plans" ;;
  q30-tile-keys-suite)  # issues 5 / 6: tile_keys plans (every head) on the rest of issue 5's checks (1.5B, YaRN x4):
    # perplexity at 128K (session 25's dense window seeded), RULER-style at 128K (session 26's dense records seeded:
    # 3 samples of each task, prompts checked by digest), then TTFT from 8K to 128K beside dense, the default plan and
    # `none` (no attention: the floor the rest of the model sets; session 30's records seeded: what is left is 128K
    # for the tile_keys plan and `none`). Plans: docs/results/gpu-session30/plans/ (thresholds 1.5 and 0.75; the 1.5
    # one sparse from 4K to find its crossover).
    tk15="longinfer:docs/results/gpu-session30/plans/q15-tk1.5-dense4k.plan.json"
    tk075="longinfer:docs/results/gpu-session30/plans/q15-tk0.75.plan.json"
    [ -f "$RES/$step/ppl.jsonl" ] || grep '"method": "dense"' docs/results/gpu-session25/q15-ppl/ppl.jsonl \
      | grep '"length": 131072' > "$RES/$step/ppl.jsonl"
    run_cli eval ppl $Q15 --lengths 131072 --samples 1 --methods "dense,$tk15,$tk075" --out "$RES/$step"
    [ -f "$RES/$step/ruler.jsonl" ] || grep '"method": "dense"' docs/results/gpu-session26/q26-128k-12/ruler.jsonl \
      | grep -E '"case_id": "[a-z_]+/L131072/i[0-5]/' > "$RES/$step/ruler.jsonl"  # the 42 cases of --samples 3
    run_cli eval ruler $Q15 --lengths 131072 --samples 3 --methods "dense,$tk15,$tk075" --out "$RES/$step"
    mkdir -p "$RES/$step/latency"
    [ -f "$RES/$step/latency/latency.jsonl" ] || cp docs/results/gpu-session30/q30-tile-keys-suite/latency/latency.jsonl \
      "$RES/$step/latency/"
    run_cli eval latency $Q15 --lengths 8192,16384,32768,65536,131072 --repeats 2 --warmup 1 \
      --out "$RES/$step/latency" --methods "dense,longinfer,$tk15,none" ;;
  q31-score-dims)  # issue 3: every-row scoring (queries=64) on half of each query head's dimensions (score_dims=32
    # of 64: on the CPU 0.944 / 0.909 against 0.948 / 0.917 on all of them, docs/results/recall-cpu-qwen0.5b-32k-score-dims/)
    # for the few heads that need it, the rest on four pooled queries: Qwen2.5-Coder-0.5B at 32K (assemble
    # qwen2.5-coder-0.5b q05). The global search over three candidates (its cost model counts the half-dim scoring at
    # half price; four pooled queries alone cost ~0.22 of dense in its units, the budget leaves room for a few heads
    # at ~1.2), then the frontier with times beside one config for all heads.
    plan="$RES/$step/q05-tk-rows-0.24.plan.json"
    [ -f "$plan" ] || run_cli search --model qwen2.5-coder-0.5b --length 32768 --allocation global --cost-budget 0.24 \
      --dense-below 0 --no-measure --no-progress --candidates tile_keys:threshold=1,queries=4 \
      tile_keys:threshold=1.5,queries=4 tile_keys:threshold=16,queries=64,score_dims=32 --out "$plan"
    run python3 benchmarks/recall_frontier.py --model qwen2.5-coder-0.5b --length 32768 --rows 128 --methods none \
      --oracle-densities 0.1 --method "rows=plan:$plan" --method tk1q4=tile_keys:threshold=1,queries=4 \
      --method tk16q64d32=tile_keys:threshold=16,queries=64,score_dims=32 \
      --method tk16q64=tile_keys:threshold=16,queries=64 --time-kernels --out "$RES/$step/frontier" ;;
  q31-rows-128k)  # issue 6: at 128K on the 1.5B the three worst heads of layer 6 keep 0.35-0.48 under tk1.5
    # (docs/results/gpu-session30/q30-split-frontier/frontier-128k/recall_heads.csv): raised to ~0.95 they alone would
    # lift the mean ~0.014. The global search over one pooled query at thresholds 2 / 1.5 and every-row scoring on
    # half of the dimensions (score_dims=64 of 128) for the heads that need it, on the calibration prompt (cost
    # budget 0.09: tk2 everywhere costs ~0.076 in its units, an every-row head ~1.15), then the frontier of the
    # 10 layers measured before, with times, beside one threshold for every head.
    plan="$RES/$step/q15-tk-rows-0.09.plan.json"
    [ -f "$plan" ] || run_cli search $Q15 --length 131072 --allocation global --cost-budget 0.09 --dense-below 0 \
      --no-measure --no-progress --candidates tile_keys:threshold=2 tile_keys:threshold=1.5 \
      tile_keys:threshold=16,queries=64,score_dims=64 --out "$plan"
    run python3 benchmarks/recall_frontier.py $Q15 --length 131072 --rows 128 --methods none \
      --layers 0,3,6,9,12,15,18,21,24,27 --oracle-densities 0.05 --method "rows=plan:$plan" \
      --method tk2=tile_keys:threshold=2 --method tk1.5=tile_keys:threshold=1.5 \
      --method tk16q64d64=tile_keys:threshold=16,queries=64,score_dims=64 --time-kernels --out "$RES/$step/frontier-128k" ;;
  q31-question-ruler)  # issues 5 / 6: every-head tile_keys plans lost 38-44 RULER-style points at 128K (needle and
    # recall intact; docs/results/gpu-session31/q30-tile-keys-suite/): the keys the question's rows read are not kept
    # for the haystack's rows. The same plan plus the 1,000 / 4,000 keys the last 64 queries attend most in every
    # tile (question_columns), RULER-style at 128K (this session's dense and tk1.5 records seeded), then their
    # recall, density and times on the 10 layers of the frontier.
    P31=docs/results/gpu-session31/plans
    seed_rows docs/results/gpu-session31/q30-tile-keys-suite/ruler.jsonl "dense|longinfer:q15-tk1.5-dense4k.plan"
    run_cli eval ruler $Q15 --lengths 131072 --samples 3 --out "$RES/$step" \
      --methods "dense,longinfer:$P31/q15-tk1.5-qc1000.plan.json,longinfer:$P31/q15-tk1.5-qc4000.plan.json"
    run python3 benchmarks/recall_frontier.py $Q15 --length 131072 --rows 128 --methods none \
      --layers 0,3,6,9,12,15,18,21,24,27 --no-oracles --method tk1.5=tile_keys:threshold=1.5 \
      --method tk1.5qc1000=tile_keys:threshold=1.5,question_columns=1000 \
      --method tk1.5qc4000=tile_keys:threshold=1.5,question_columns=4000 --time-kernels --out "$RES/$step/frontier-128k" ;;
  q32-dense-tile-keys-ruler)  # issues 5 / 6: at 128K on this model RULER-style needs density: vertical-slash plans
    # lose 9-13 points at 14-17% and ~1.5-2 at 30-34% (docs/results/ruler-frontier-q15-128k/); tile_keys with 1,000
    # question columns lost 19 at 4.4% (docs/results/gpu-session31/). Denser tile_keys plans (thresholds 0.4 and
    # 0.15 with the question columns) on the same 21 prompts (dense seeded), then their TTFT at 128K beside dense
    # and the default (seeded from session 31): is tile_keys better than vertical-slash at equal density or speed?
    P31=docs/results/gpu-session31/plans
    seed_rows docs/results/gpu-session31/q31-question-ruler/ruler.jsonl "dense|longinfer:q15-tk1.5-qc1000.plan"
    run_cli eval ruler $Q15 --lengths 131072 --samples 3 --out "$RES/$step" \
      --methods "dense,longinfer:$P31/q15-tk0.4-qc1000.plan.json,longinfer:$P31/q15-tk0.15-qc1000.plan.json"
    mkdir -p "$RES/$step/latency"
    [ -f "$RES/$step/latency/latency.jsonl" ] || grep '"length": 131072' \
      docs/results/gpu-session31/q30-tile-keys-suite/latency/latency.jsonl > "$RES/$step/latency/latency.jsonl"
    run_cli eval latency $Q15 --lengths 131072 --repeats 2 --warmup 1 --out "$RES/$step/latency" \
      --methods "dense,longinfer,longinfer:$P31/q15-tk0.4-qc1000.plan.json,longinfer:$P31/q15-tk0.15-qc1000.plan.json" ;;
  q31-tile-keys-cost)  # issues 3 / 6 (no model): the split pass 2 counting every cap level in its first pass
    # (COUNT_CAP_LEVELS_FIRST) against counting capped tiles again, at 32K / 128K; then every-row scoring on all 128
    # dimensions against half of them (score_dims=64) at 32K, Hq=32 / Hkv=8 / D=128, structured q/k.
    run python3 benchmarks/tile_keys_cost.py --lengths 32768,131072 --configs tk1.5,tk0.75 --out "$RES/$step/split"
    run python3 benchmarks/tile_keys_cost.py --lengths 32768 --configs tk16q64,tk16q64d64 --out "$RES/$step/rows" ;;
  *) echo "unknown step '$step'" >&2; exit 2 ;;
esac
nvidia-smi --query-gpu=name --format=csv,noheader > "$RES/$step/device.txt" 2>/dev/null
tar czf "$OUT/$step.tgz" -C "$RES" "$step" && echo "packed $(du -sh "$OUT/$step.tgz" | cut -f1)"
