#!/bin/bash
# Two-part GPU run of gpu_delta.py variant groups (bench/gpu_dstate8.sh, bench/gpu_scant9.sh): the
# MAIN_GROUP in one process (STEPS=$MAIN_STEPS; "time" adds the defaults vs fla), then each
# variant of SOLO_GROUP in its own process (a crash, e.g. an illegal address, poisons only its own
# CUDA context). Env: MAIN_GROUP, SOLO_GROUP, TAG (log names), MAIN_STEPS (default variants),
# MAIN_QUICK (default 1: fla not imported), BUDGET1_S (main process budget), TOTAL_S (no new solo
# process past it), BUDGET_EACH_S, PICK (extra grep -E alternatives for the printed lines).
# Logs: $OUT/${TAG}_*.log (or /tmp), CSVs $OUT/<main|variant>/gpu_delta.csv.
cd "$(dirname "$0")/.." || exit 1
export GVA=0 VARIANT_EXTRA=${VARIANT_EXTRA:-stages} FIRST_CALL=0
TOTAL_S=${TOTAL_S:-225}
OUT0=${OUT:-}
[ -n "$OUT0" ] && mkdir -p "$OUT0/main" && export OUT="$OUT0/main"
LOG=${OUT0:-/tmp}
pick() { grep -E "variant .*check|(wy|states|output|fwd total) +[0-9]|ssm_kernels \[|FAIL|Error|illegal${PICK:+|$PICK}" \
         | cut -c1-170; }
STEPS=${MAIN_STEPS:-variants} QUICK=${MAIN_QUICK:-1} BUDGET_S=${BUDGET1_S:-95} VARIANTS=$MAIN_GROUP \
    python bench/gpu_delta.py > "$LOG/${TAG}_main.log" 2>&1
pick < "$LOG/${TAG}_main.log"
python bench/gpu_delta.py --list "$SOLO_GROUP" > "/tmp/${TAG}_solo.txt"
while IFS= read -r v; do
    [ -z "$v" ] && continue
    if [ "$SECONDS" -gt $((TOTAL_S - 35)) ]; then echo "=== ${v%%:*}: skipped (time)"; continue; fi
    echo "=== ${v%%:*}"
    [ -n "$OUT0" ] && mkdir -p "$OUT0/${v%%:*}" && export OUT="$OUT0/${v%%:*}"
    STEPS=variants QUICK=1 BUDGET_S=${BUDGET_EACH_S:-30} VARIANTS="$v" timeout 45 \
        python bench/gpu_delta.py > "$LOG/${TAG}_${v%%:*}.log" 2>&1
    pick < "$LOG/${TAG}_${v%%:*}.log"
done < "/tmp/${TAG}_solo.txt"
