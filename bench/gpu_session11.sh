#!/usr/bin/env bash
# Session 11's device calls (plan: bench/NOTES.md "Session 10: ... device plan for session 11"),
# one PART per call, repo root, GPU machine:   PART=a OUT=$OUT bash bench/gpu_session11.sh
# a: CUDA build + mamba build, selective scan variants (sscan10); b: recall Mamba-1 (mamba10),
#    fft_conv host path (ffthost10); c: delta rule SAVE_STATES (deltabwd10) + SCAN_T (delta9);
# d: two-level forward by length (TL_SWEEP, engine10's switch) + issue 8's fla host rows;
# e: leftovers. Short tables print last; full logs in $OUT/logs/ (<= 8 files come back).
set -u
source "$(dirname "$0")/gpu_session_env.sh"
case ${PART:-a} in
  a) STEPS="mamba build" LOGS=/tmp/sl OUT=/tmp/sl bash bench/gpu_steps.sh > "$OUT/logs/build.log" 2>&1
     tail -3 "$OUT/logs/build.log"
     for i in $(seq 30); do [ -e /tmp/mamba_build/selective_scan_cuda*.so ] && break; sleep 5; done
     TAIL=45 t sscan10 240 python3 bench/gpu_sscan10.py ;;
  b) TAIL=20 t recall_mamba 150 python3 -m ssm_kernels.examples.recall --mixers mamba gla --dims 64 128 \
       --out "$OUT/recall"
     TAIL=40 t fft_host10 150 python3 bench/gpu_fft_host10.py
     TAIL=25 t fft_launches 100 python3 bench/gpu_host.py --launches fft_conv ;;
  c) TAIL=40 t savestates 195 env STEPS=variants GVA=0 QUICK=1 FIRST_CALL=0 VARIANTS=@savestates \
       VARIANT_EXTRA=ungated,profile BUDGET_S=170 python3 bench/gpu_delta.py
     TAIL=30 t scant 240 env MAIN_STEPS=variants bash bench/gpu_scant9.sh ;;
  d) TAIL=40 t tl_sweep 220 env TL_SWEEP=1 python3 bench/gpu_chunk.py
     TAIL=20 t host_fla 300 env HOST_BUDGET_S=240 python3 bench/gpu_host.py chunk_linear_attn \
       chunk_simple_gla fused_recurrent_simple_gla ;;
  e) TAIL=30 t fft7 290 python3 bench/gpu_fft7.py
     t fwd_defaults 250 python3 -m pytest -q -p no:cacheprovider tests/test_chunk_fwd_defaults.py --tb=short ;;
esac
