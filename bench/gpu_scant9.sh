#!/bin/bash
# Helper delta9's GPU run (bench/NOTES.md, "helper delta9"): SCAN_T (the delta rule's forward state
# scan from the WY inverse T, k, v, beta; the WY stage writes T only) against the defaults, DSTATE,
# both, bf16 w/u, and fla, B4 T4096 H16 K=V=128 bf16 gated. One process: the "time" step (ours
# and fla, gated and ungated, fwd / fwd+bwd) then @scant (each variant: check vs float64 at B1
# T1024 H2 HV4 with all gradients, SCAN_T vs default on the same inputs, gated fwd / fwd+bwd, the
# forward's wy / states / output / fwd total rows). Then each 4-warp variant (@scant4) in its own
# process (helper dfwd8's Triton 3.6 suspicion: a crash poisons only its own context).
# Usage (repo root; PYTHONPATH as for gpu_delta.py, fla importable): bash bench/gpu_scant9.sh
# (~200-235 s; timeout 240; MAIN_STEPS=variants skips the time step, whose fla autotuning took
# 167 s of the 165 s budget in session 10). Logs $OUT/scant_*.log (bench/gpu_delta_groups.sh runs it).
MAIN_GROUP=@scant SOLO_GROUP=@scant4 TAG=scant MAIN_STEPS=${MAIN_STEPS:-time,variants} MAIN_QUICK=0 \
    BUDGET1_S=${BUDGET1_S:-165} TOTAL_S=${TOTAL_S:-230} PICK="SCAN_T vs|ssm_kernels|fla " \
    exec bash "$(dirname "$0")/gpu_delta_groups.sh"
