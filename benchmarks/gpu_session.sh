#!/usr/bin/env bash
# One device call: build the peer (once per warm machine), run the GPU tests, then the kernel
# benchmark. Usage: bash benchmarks/gpu_session.sh [tests|bench|all|build] [extra args for kernels.py]
# (`build` only builds the peer into /tmp/peer, e.g. before `PEER_SITE=/tmp/peer longinfer eval ... --methods peer`.)
# Expects the peer sdist in .device/ (see benchmarks/README.md); writes logs and results to $OUT.
set -uo pipefail
what=${1:-all}; shift || true
case "$what" in tests|bench|all|build) ;; *) echo "unknown step '$what': use tests, bench, all or build" >&2; exit 2;; esac
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'
if [ ! -d /tmp/peer/minference ] && ls .device/minference-*.tar.gz >/dev/null 2>&1; then
  (MINFERENCE_FORCE_BUILD=TRUE TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 -m pip install -q --no-index --no-deps \
     --no-build-isolation --target /tmp/peer .device/minference-*.tar.gz > "$OUT/peer_build.log" 2>&1 && echo "peer built") &
  peer_pid=$!
fi
if [ "$what" = tests ] || [ "$what" = all ]; then
  LONGINFER_AUTOTUNE=0 python3 -m pytest -q -x tests/test_ops_kernels.py tests/test_ops_errors.py -m "not slow" ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
fi
if [ -n "${peer_pid:-}" ] && ! wait "$peer_pid"; then
  echo "peer build failed: see $OUT/peer_build.log" >&2
  [ "$what" = build ] && exit 1
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  PEER_SITE=/tmp/peer python3 benchmarks/kernels.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^{"
fi
