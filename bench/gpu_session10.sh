#!/usr/bin/env bash
# Session 10's device calls, one function per call (repo root, GPU machine):
#   PART=a OUT=$OUT bash bench/gpu_session10.sh
# a: CUDA build + mamba build (background), the graphs / fwd-defaults tests, a cold `check`, ncu of
#    the selective scan; b: recall A/B + default run; c: two-level chunk forward A/B; d: SCAN_T
#    delta rule; e: fp32 monarch16 fft; f: host path rows.  Short tables print last; full logs in $OUT/logs/.
set -u
source "$(dirname "$0")/gpu_session_env.sh"
case ${PART:-a} in
  a) STEPS="mamba build" LOGS=/tmp/sl OUT=/tmp/sl bash bench/gpu_steps.sh > "$OUT/logs/build.log" 2>&1
     tail -3 "$OUT/logs/build.log"
     t tests 200 python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py tests/test_chunk_fwd_defaults.py --tb=short
     TRITON_CACHE_DIR=$(mktemp -d) t check 150 python3 -m ssm_kernels check
     grep -E "FAIL|ERROR" "$OUT/logs/check.log" | head -20
     OUT=$OUT/logs t ncu 200 bash bench/gpu_ncu_sscan.sh ;;
  b) t recall 560 env OUT=$OUT/recall bash bench/gpu_recall9.sh ;;
  c) TAIL=40 t chunk 560 env TWO_LEVEL=1 AB_S=380 python3 bench/gpu_chunk.py ;;
  d) TAIL=40 t scant 240 bash bench/gpu_scant9.sh ;;
  e) TAIL=40 t fft9 240 python3 bench/gpu_fft9.py ;;
  # f: issue 8's open rows: selective_scan_fn (mamba-ssm beside), chunk_linear_attn with the fused
  #    normalize on/off, fft_conv
  f) TAIL=30 t host_sscan 150 python3 bench/gpu_host.py selective_scan_fn fft_conv
     for n in 0 1; do TAIL=20 t host_la$n 120 env SSM_KERNELS_FUSED_NORMALIZE=$n python3 bench/gpu_host.py \
       --no-peers chunk_linear_attn; done
     TAIL=20 t host_fla 200 python3 bench/gpu_host.py chunk_linear_attn ;;
esac
