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
PLANS=docs/results/gpu-session3/plans
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
# `timeout` runs programs, not shell functions (so no `li` here)
run() { timeout "$limit" "$@"; echo "exit $? after ${SECONDS}s: $*" | cut -c1-300; }
run_cli() { run python3 -m longinfer.cli "$@"; }
peer() {  # the peer for --methods peer (built once per warm machine)
  [ -d /tmp/peer/minference ] || bash benchmarks/gpu_session.sh build > /dev/null
  export PEER_SITE=/tmp/peer
}
mkdir -p "$RES/$step"
case "$step" in
  q15-frontier)  # issue 6: recall, density and attention time of every tile size at 128K
    run python3 benchmarks/recall_frontier.py $Q15 --length 131072 --rows 128 --no-oracles --time-kernels \
      --methods peer-vs-1000-6096-lq64,bs-cov0.9 "${TILE_METHODS[@]}" --out "$RES/$step" ;;
  q05-frontier)  # issue 3: the same at 32K on the 0.5B
    run python3 benchmarks/recall_frontier.py $Q05 --length 32768 --rows 128 --no-oracles --time-kernels \
      --methods peer-vs-1000-6096-lq64,bs-cov0.9 "${TILE_METHODS[@]}" --out "$RES/$step" ;;
  q15-latency)  # issues 4/5: TTFT with the default at each tile size, then where a follow-up turn's time goes
    run_cli eval latency $Q15 --lengths 16384,32768,65536,131072 --repeats 2 --warmup 1 --out "$RES/$step" \
      --methods "dense,longinfer,longinfer:$PLANS/q15-default-bs32.json,longinfer:$PLANS/q15-default-bs16.json"
    run python3 benchmarks/profile_prefill.py $Q15 --prefix 65536 --length 4096 --sort cpu --rows 25 \
      > "$RES/$step/profile-turn-cpu.txt" 2>&1
    run python3 benchmarks/profile_prefill.py $Q15 --prefix 65536 --length 4096 --rows 25 \
      > "$RES/$step/profile-turn-cuda.txt" 2>&1 ;;
  q15-turn)  # issue 4: second turn of 4K over a cached 64K prefix, default and 16-row tiles
    run python3 benchmarks/real_model_checks.py $Q15 --lengths "" --turn-prefix 65536 --turn-length 4096 \
      --out "$RES/$step/default"
    run python3 benchmarks/real_model_checks.py $Q15 --lengths "" --turn-prefix 65536 --turn-length 4096 \
      --plan "$PLANS/q15-default-bs16.json" --out "$RES/$step/bs16" ;;
  q15-ruler)  # issue 5: RULER-style at 32K and 128K, 4 samples per sub-task
    run_cli eval ruler $Q15 --lengths 32768,131072 --samples 4 --methods "dense,longinfer" --out "$RES/$step" ;;
  q15-ppl)  # issue 5: perplexity over 8 windows
    run_cli eval ppl $Q15 --lengths 32768,131072 --samples 8 --methods "dense,longinfer" --out "$RES/$step" ;;
  q05-ruler)  # issue 5: RULER-style at 16K and 32K with the peer, 6 samples per sub-task
    peer
    run_cli eval ruler $Q05 --lengths 16384,32768 --samples 6 --methods "dense,longinfer,peer" --out "$RES/$step" ;;
  q05-needle)  # issue 5: needle with the peer beside dense and longinfer
    peer
    run_cli eval needle $Q05 --lengths 8192,16384,32768 --methods "dense,longinfer,peer" --out "$RES/$step" ;;
  *) echo "unknown step '$step'" >&2; exit 2 ;;
esac
nvidia-smi --query-gpu=name --format=csv,noheader > "$RES/$step/device.txt" 2>/dev/null
tar czf "$OUT/$step.tgz" -C "$RES" "$step" && echo "packed $(du -sh "$OUT/$step.tgz" | cut -f1)"
