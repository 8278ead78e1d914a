# Sourced by bench/gpu_session*.sh (GPU machine, repo root): $OUT/logs, the environment, the peers'
# wheels under /tmp/site, PYTHONPATH (peers, repo, mamba-ssm's build and source) and
# `t NAME LIMIT CMD...` (run CMD under a time limit, log to $OUT/logs/NAME.log, print the tail).
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
if [ ! -d /tmp/site ] && ls .whl/fla_core*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    .whl/fla_core*.whl .whl/accelerated*.whl
fi
MAMBA_SRC=$(ls -d .peers/mamba_ssm-*/ 2>/dev/null | head -1)
export PYTHONPATH="/tmp/site:$(pwd):/tmp/mamba_build:$(pwd)/${MAMBA_SRC:-.}"
t() { local n=$1 lim=$2; shift 2; local t0=$(date +%s)
  timeout "$lim" "$@" > "$OUT/logs/$n.log" 2>&1; local rc=$?
  echo "== $n rc=$rc $(( $(date +%s) - t0 )) s"; tail -n "${TAIL:-12}" "$OUT/logs/$n.log"; }
