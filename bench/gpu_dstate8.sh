#!/bin/bash
# Helper deltastate8's GPU run (bench/NOTES.md, "helper deltastate8"): the delta rule's state scan
# variants (DSTATE, delta_rule/state.py), B4 T4096 H16 K=V=128 bf16 gated: each variant's check,
# DSTATE against the engine scan on the same inputs, fwd / fwd+bwd and the forward's stages.
# First the 8-warp group (@deltastate, base = the defaults on the same machine) in one process,
# then each 4-warp variant (@deltastate4) in its own process: an illegal address there (Triton
# 3.6, the pattern helper dfwd8 suspects) poisons only its own CUDA context.
# Usage (repo root; PYTHONPATH as for gpu_delta.py): bash bench/gpu_dstate8.sh   (~170-220 s)
# Logs $OUT/dstate_*.log (bench/gpu_delta_groups.sh runs it; fla not imported).
MAIN_GROUP=@deltastate SOLO_GROUP=@deltastate4 TAG=dstate PICK="DSTATE vs" \
    exec bash "$(dirname "$0")/gpu_delta_groups.sh"
