#!/usr/bin/env bash
# Recall example (issue 16), helper recall9: graph vs eager training steps, then the default run.
# Usage (repo root, GPU machine, after the CUDA extension is built, e.g. in the same call after
# `STEPS=build bash bench/gpu_steps.sh`):   OUT=$OUT bash bench/gpu_recall9.sh
#   1. A/B, same data and init: --step eager (torch AdamW + OneCycleLR from Python, the old loop)
#      vs --step graph (the whole step in one CUDA graph), 4 mixers, d=64, 300 steps (~1-2 min);
#   2. the default run, timed (goal < 5 min, target <= 4; predicted ~1.5-2.5 min);
#   3. a table: steady ms per step, final loss and accuracy, eager vs graph.
# Files back: $OUT/ab_eager/recall.csv, $OUT/ab_graph/recall.csv, $OUT/recall.csv, $OUT/recall.png.
set -u -o pipefail
OUT=${OUT:-/tmp/recall9}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$(pwd)"
quiet() { tr '\r' '\n' | grep -v ' step ' ; }   # drop the progress bar's lines
AB=${AB_MIXERS:-attention mamba2 gla gated_deltanet}
for mode in eager graph; do
  echo "== A/B --step $mode"
  python3 -m ssm_kernels.examples.recall --mixers $AB --dims 64 --steps ${AB_STEPS:-300} \
    --step $mode --out "$OUT/ab_$mode" 2>&1 | quiet
done
echo "== default run"
t0=$(date +%s)
python3 -m ssm_kernels.examples.recall --out "$OUT" 2>&1 | quiet
echo "== default run: $(( $(date +%s) - t0 )) s wall (goal < 300, target <= 240)"
python3 - "$OUT" <<'PY'
import csv, os, sys
out = sys.argv[1]
def rows(p):
    p = os.path.join(out, p, "recall.csv") if p else os.path.join(out, "recall.csv")
    return {(r["mixer"], r["d_model"]): r for r in csv.DictReader(open(p))} if os.path.exists(p) else {}
e, g, full = rows("ab_eager"), rows("ab_graph"), rows("")
print(f"{'A/B (d=64)':<16}{'eager ms/step':>14}{'graph ms/step':>14}{'speedup':>8}"
      f"{'loss e/g':>16}{'acc e/g':>14}  mode")
for k in e:
    a, b = e[k], g.get(k)
    if b is None:
        continue
    sp = float(a["step_ms"]) / float(b["step_ms"])
    print(f"{k[0]:<16}{float(a['step_ms']):>14.2f}{float(b['step_ms']):>14.2f}{sp:>7.1f}x"
          f"{a['loss'] + '/' + b['loss']:>16}{a['accuracy'] + '/' + b['accuracy']:>14}  {b['mode']}")
print(f"\n{'default run':<16}{'d':>5}{'acc':>8}{'loss':>8}{'s':>7}{'ms/step':>9}  mode")
for (m, d), r in full.items():
    print(f"{m:<16}{d:>5}{float(r['accuracy']):>8.3f}{float(r['loss']):>8.3f}"
          f"{float(r['seconds']):>7.1f}{float(r['step_ms']):>9.2f}  {r['mode']}")
PY
