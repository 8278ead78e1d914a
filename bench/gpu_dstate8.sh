#!/bin/bash
# Helper deltastate8's GPU run (bench/NOTES.md, "helper deltastate8"): the delta rule's state scan
# variants (DSTATE, delta_rule/state.py), B4 T4096 H16 K=V=128 bf16 gated: each variant's check,
# DSTATE against the engine scan on the same inputs, fwd / fwd+bwd and the forward's stages.
# First the 8-warp group (@deltastate, base = the defaults on the same machine) in one process,
# then each 4-warp variant (@deltastate4) in its own process: an illegal address there (Triton
# 3.6, the pattern helper dfwd8 suspects) poisons only its own CUDA context.
# Usage (repo root; PYTHONPATH as for gpu_delta.py): bash bench/gpu_dstate8.sh   (~170-220 s)
cd "$(dirname "$0")/.." || exit 1
export STEPS=variants GVA=0 VARIANT_EXTRA=stages
BUDGET_S=${BUDGET1_S:-100} VARIANTS=@deltastate python bench/gpu_delta.py 2>&1 | tail -n 50
python bench/gpu_delta.py --list @deltastate4 > /tmp/dstate4.txt
while IFS= read -r v; do
    [ -z "$v" ] && continue
    echo "=== ${v%%:*}"
    BUDGET_S=${BUDGET_EACH_S:-40} VARIANTS="$v" timeout 60 python bench/gpu_delta.py 2>&1 \
        | grep -E "variant|delta stage|Error|error|illegal|^\|" | tail -n 14
done < /tmp/dstate4.txt
