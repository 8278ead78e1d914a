#!/bin/bash
# Helper deltastate8's GPU run (bench/NOTES.md, "helper deltastate8"): the delta rule's state scan
# variants (DSTATE, delta_rule/state.py), B4 T4096 H16 K=V=128 bf16 gated: each variant's check,
# DSTATE against the engine scan on the same inputs, fwd / fwd+bwd and the forward's stages.
# First the 8-warp group (@deltastate, base = the defaults on the same machine) in one process,
# then each 4-warp variant (@deltastate4) in its own process: an illegal address there (Triton
# 3.6, the pattern helper dfwd8 suspects) poisons only its own CUDA context.
# Usage (repo root; PYTHONPATH as for gpu_delta.py): bash bench/gpu_dstate8.sh   (~170-220 s)
cd "$(dirname "$0")/.." || exit 1
# QUICK: fla not imported (unused here); FIRST_CALL=0: no compile timing of the public ops
export STEPS=variants GVA=0 VARIANT_EXTRA=stages QUICK=1 FIRST_CALL=0
TOTAL_S=${TOTAL_S:-225}   # no new 4-warp process past this many seconds
OUT0=${OUT:-}
[ -n "$OUT0" ] && mkdir -p "$OUT0/w8" && export OUT="$OUT0/w8"
# full logs under $OUT (when set); printed: each variant's check, DSTATE-vs-engine, states and fwd
# rows, and the tables' fwd / fwd+bwd rows, cut to 170 characters
LOG=${OUT0:-/tmp}
pick() { grep -E "variant .*check|DSTATE vs|(states|fwd total) +[0-9]|ssm_kernels \[|Error|illegal" \
         | cut -c1-170; }
BUDGET_S=${BUDGET1_S:-95} VARIANTS=@deltastate python bench/gpu_delta.py > "$LOG/dstate_w8.log" 2>&1
pick < "$LOG/dstate_w8.log"
python bench/gpu_delta.py --list @deltastate4 > /tmp/dstate4.txt
while IFS= read -r v; do
    [ -z "$v" ] && continue
    if [ "$SECONDS" -gt $((TOTAL_S - 35)) ]; then echo "=== ${v%%:*}: skipped (time)"; continue; fi
    echo "=== ${v%%:*}"
    [ -n "$OUT0" ] && mkdir -p "$OUT0/${v%%:*}" && export OUT="$OUT0/${v%%:*}"
    BUDGET_S=${BUDGET_EACH_S:-30} VARIANTS="$v" timeout 45 python bench/gpu_delta.py \
        > "$LOG/dstate_${v%%:*}.log" 2>&1
    pick < "$LOG/dstate_${v%%:*}.log"
done < /tmp/dstate4.txt
