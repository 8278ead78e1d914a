#!/usr/bin/env bash
# One device call, several checks: each step has its own time limit and log under $OUT, and the
# summary of every step is printed last. Usage (repo root, on the GPU machine):
#   STEPS="build graphs overhead chunk fft layers cp" bash bench/gpu_steps.sh
# Steps: build (CUDA extension), mamba (build mamba-ssm's selective_scan_cuda in the background),
# graphs (tests/test_graphs.py), overhead (bench --overhead), host (bench/gpu_host.py), sscan, sscanbwd, sscanpoly, decode,
# lscan, chunk, fft,
# layers, cp (the bench/gpu_*.py scripts), probe (bench/gpu_dk_probe.py), check (`python -m
# ssm_kernels check $CHECK_ARGS` with a cold Triton cache), verify (short correctness of the paths
# not yet checked on a GPU), fftdef (fft_conv's defaults: `PARTS=d bench/gpu_monarch.py`),
# firstcall, launches, fft7, recall (session 7 helpers' scripts), checkwall (bench/gpu_check_wall.py).
# Peers: .whl wheels and .peers/mamba_ssm-* if carried.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if ls .whl/fla_core*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    .whl/fla_core*.whl .whl/accelerated*.whl && export PYTHONPATH=/tmp/site
fi
MAMBA_SRC=$(ls -d .peers/mamba_ssm-*/ 2>/dev/null | head -1)
export PYTHONPATH="${PYTHONPATH:-}:$(pwd):/tmp/mamba_build:$(pwd)/${MAMBA_SRC:-.}"
LOGS=${LOGS:-/tmp/steplogs}; mkdir -p "$LOGS"   # LOGS=$OUT: logs come back even if the call is cut (<= 8 files)
SUMMARY="$OUT/summary.txt"; : > "$SUMMARY"
step() {  # name, limit in s, command...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 )) s" >> "$SUMMARY"
  tail -n "${TAIL:-14}" "$LOGS/$name.log" >> "$SUMMARY"
}
for s in ${STEPS:-build graphs overhead}; do
  case $s in
    mamba) [ -n "$MAMBA_SRC" ] && (python3 bench/peers/build_mamba.py "$MAMBA_SRC" /tmp/mamba_build \
             > "$LOGS/mamba_build.log" 2>&1 &) ;;
    build) SSM_KERNELS_BUILD_CUDA=1 step build 200 python3 -m pip install --no-build-isolation --no-deps -e . ;;
    graphs) step graphs ${T_GRAPHS:-150} python3 -m pytest -q -x -p no:cacheprovider tests/test_graphs.py ;;
    overhead) step overhead ${T_OVERHEAD:-200} python3 -m ssm_kernels.benchmarks.overhead --out "$OUT/overhead.csv" ${OVERHEAD_OPS:+--ops $OVERHEAD_OPS} ;;
    host) step host ${T_HOST:-240} python3 bench/gpu_host.py ;;
    sscan) step sscan ${T_SSCAN:-200} python3 bench/gpu_sscan.py ;;
    sscanbwd) step sscanbwd ${T_SSCANBWD:-300} python3 bench/gpu_sscan_bwd.py ;;
    sscanpoly) step sscanpoly ${T_SSCANPOLY:-240} python3 bench/gpu_sscan_poly.py ;;
    decode) step decode ${T_DECODE:-120} python3 bench/gpu_decode.py ;;
    lscan) step lscan ${T_LSCAN:-150} python3 bench/gpu_linear_scan.py ;;
    chunk|fft|layers|cp|delta|monarch) step "$s" ${LIMIT:-200} python3 "bench/gpu_$s.py" ;;
    # verify: correctness of every path not yet checked on a GPU (session 4), short: chunk engine
    # + GLA, chunked delta rule, monarch16 checks, CP; our timings only (no peers)
    verify) step chunk_quick 150 env QUICK=1 SWEEP_S=0 python3 bench/gpu_chunk.py
            step delta_quick 120 env QUICK=1 python3 bench/gpu_delta.py
            step monarch_checks 150 env PARTS=a python3 bench/gpu_monarch.py
            step cp ${T_CP:-150} python3 bench/gpu_cp.py ;;
    fftdef) step fft_defaults ${T_FFTDEF:-300} env PARTS=d python3 bench/gpu_monarch.py ;;
    probe) step probe ${T_PROBE:-150} python3 bench/gpu_dk_probe.py ;;
    # session 7's helpers: first call after the autograd-thread fix (firstcall7), launch-cache and
    # CUDA-API counts per eager call (hostchunk7), row-blocked monarch16 (fft7), the recall example
    firstcall) step first_call ${T_FIRSTCALL:-150} python3 bench/gpu_first_call.py --ahead 16 \
                 --timeout 25 --budget $(( ${T_FIRSTCALL:-150} - 25 )) --out "$OUT/first_call.md" ;;
    launches) step launches ${T_LAUNCHES:-150} python3 bench/gpu_host.py --launches linear_scan chunk_linear_attn \
                chunk_simple_gla chunk_gla chunk_gated_delta_rule chunk_based mamba_chunk_scan_combined ;;
    fft7) step fft7 ${T_FFT7:-290} python3 bench/gpu_fft7.py ;;
    # session 9 helper fft9: the float32 forward on monarch16 split-fp16 products (MONARCH16_F32)
    fft9) step fft9 ${T_FFT9:-240} python3 bench/gpu_fft9.py ;;
    recall) step recall ${T_RECALL:-420} python3 -m ssm_kernels.examples.recall --out "$OUT" ;;
    check) TRITON_CACHE_DIR=$(mktemp -d) step check ${T_CHECK:-150} python3 -m ssm_kernels check ${CHECK_ARGS:-} ;;
    # check8: cold `check` walls, pairs whole (before) vs cut into units, default jobs, 12, 16
    checkwall) step checkwall ${T_CHECKWALL:-420} python3 bench/gpu_check_wall.py ${CHECKWALL_ARGS:-} ;;
  esac
done
[ "$LOGS" != "$OUT" ] && for f in "$LOGS"/*.log; do echo "######## $f"; cat "$f"; done > "$OUT/all_logs.txt"
cat "$SUMMARY"
