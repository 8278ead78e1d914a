#!/bin/bash
# Helper delta9's GPU run (bench/NOTES.md, "helper delta9"): SCAN_T (the delta rule's forward state
# scan from the WY inverse T, k, v, beta; the WY stage writes T only) against the defaults, DSTATE,
# both, bf16 w/u, and fla, B4 T4096 H16 K=V=128 bf16 gated. One process: the "time" step (ours
# and fla, gated and ungated, fwd / fwd+bwd) then @scant (each variant: check vs float64 at B1
# T1024 H2 HV4 with all gradients, SCAN_T vs default on the same inputs, gated fwd / fwd+bwd, the
# forward's wy / states / output / fwd total rows). Then each 4-warp variant (@scant4) in its own
# process (helper dfwd8's Triton 3.6 suspicion: a crash poisons only its own context).
# Usage (repo root; PYTHONPATH as for gpu_delta.py, fla importable): bash bench/gpu_scant9.sh
# (~200-235 s; timeout 240)
cd "$(dirname "$0")/.." || exit 1
export GVA=0 VARIANT_EXTRA=stages FIRST_CALL=0
TOTAL_S=${TOTAL_S:-230}   # no new 4-warp process past this many seconds
OUT0=${OUT:-}
[ -n "$OUT0" ] && mkdir -p "$OUT0/main" && export OUT="$OUT0/main"
LOG=${OUT0:-/tmp}
pick() { grep -E "variant .*check|SCAN_T vs|(wy|states|output|fwd total) +[0-9]|ssm_kernels|fla |FAIL|Error|illegal" \
         | cut -c1-170; }
STEPS=time,variants BUDGET_S=${BUDGET1_S:-165} VARIANTS=@scant python bench/gpu_delta.py \
    > "$LOG/scant_main.log" 2>&1
pick < "$LOG/scant_main.log"
python bench/gpu_delta.py --list @scant4 > /tmp/scant4.txt
while IFS= read -r v; do
    [ -z "$v" ] && continue
    if [ "$SECONDS" -gt $((TOTAL_S - 35)) ]; then echo "=== ${v%%:*}: skipped (time)"; continue; fi
    echo "=== ${v%%:*}"
    [ -n "$OUT0" ] && mkdir -p "$OUT0/${v%%:*}" && export OUT="$OUT0/${v%%:*}"
    STEPS=variants QUICK=1 BUDGET_S=${BUDGET_EACH_S:-30} VARIANTS="$v" timeout 45 \
        python bench/gpu_delta.py > "$LOG/scant_${v%%:*}.log" 2>&1
    pick < "$LOG/scant_${v%%:*}.log"
done < /tmp/scant4.txt
