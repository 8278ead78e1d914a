#!/usr/bin/env bash
# One call on the GPU machine: install, build the CUDA extension for sm_90, build peers, run the
# GPU tests, `check`, and the benchmark; logs and CSV under $OUT. Run from the repo root:
#   bash bench/gpu_run.sh [pytest-args...]      (env: OPS="linear_scan ..." to limit the bench,
#                                                SKIP_TESTS=1, SKIP_BENCH=1, BUILD_MAMBA=1)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 SSM_KERNELS_BUILD_CUDA=1
export SSM_KERNELS_GIT_SHA=$(cat .git_sha 2>/dev/null || echo unknown)
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
# peers: pure-Python wheels carried in .whl, mamba-ssm source in .peers
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
MAMBA_SRC=$(ls -d .peers/mamba_ssm-*/ 2>/dev/null | head -1)
if [ "${BUILD_MAMBA:-0}" = 1 ] && [ -n "$MAMBA_SRC" ]; then
  (python3 bench/peers/build_mamba.py "$MAMBA_SRC" /tmp/mamba_build > "$OUT/mamba_build.log" 2>&1) &
  MAMBA_PID=$!
fi
t0=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
echo "extension build + install: $(( $(date +%s) - t0 )) s" | tee "$OUT/build_time.txt"
python3 -c "import ssm_kernels._C; print('ssm_kernels._C ok')" || exit 1
python3 -c "import time,torch; t=time.time(); import ssm_kernels; print(f'import ssm_kernels: {time.time()-t:.3f} s after torch')"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout ${TEST_TIMEOUT:-420} python3 -m pytest -q --timeout 300 -p no:cacheprovider "$@" 2>&1 | tee "$OUT/pytest.log" | tail -25
  python3 -m ssm_kernels check ${OPS:+--ops $OPS} 2>&1 | tee "$OUT/check.log" | tail -40
fi
if [ -n "${NCU:-}" ]; then  # e.g. NCU="linear_scan cuda bfloat16"
  ncu --kernel-name regex:${NCU%% *} --launch-skip 1 --launch-count 1 --section SpeedOfLight \
    --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
    python3 bench/profile_one.py $NCU > "$OUT/ncu.txt" 2>&1; grep -E "Throughput|Achieved|Registers|Duration|Occupancy|L1|L2|DRAM" "$OUT/ncu.txt" | head -40
fi
if [ -n "${MAMBA_PID:-}" ]; then wait "$MAMBA_PID"; tail -3 "$OUT/mamba_build.log"; fi
export PYTHONPATH="${PYTHONPATH:-}:/tmp/mamba_build:$(pwd)/${MAMBA_SRC:-.}"
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  python3 -m ssm_kernels bench ${OPS:+--ops $OPS} --out "$OUT/results.csv" 2>&1 | tee "$OUT/bench.log" | tail -60
fi
