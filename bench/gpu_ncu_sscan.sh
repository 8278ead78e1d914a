#!/usr/bin/env bash
# Where the selective scan's forward (default variant) and backward kernels stall, on the GPU
# (issue 9: the forward sits at ~2x its SFU floor and the poly-exp2 and staging variants moved it
# by 2%, so the limiter is not the one modelled): ncu's speed-of-light, pipe utilisation, warp
# stall reasons and occupancy, one launch each, issue 9's first shape (B8 D1536 L2048 N16, every
# feature, bf16). Needs the CUDA extension built. ~60-90 s. Usage (repo root):
#   OUT=$OUT bash bench/gpu_ncu_sscan.sh        # full reports in $OUT/ncu_{fwd,bwd}.txt
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SECTIONS="--section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \
--section SchedulerStats --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis"
# stall reasons (warps per issue-active cycle) and pipe utilisation, named explicitly: the text
# report of the sections above does not break them down
STALLS="barrier short_scoreboard long_scoreboard mio_throttle math_pipe_throttle wait not_selected \
lg_throttle dispatch_stall no_instruction membar drain selected tex_throttle branch_resolving misc"
METRICS=$(for s in $STALLS; do printf "smsp__average_warps_issue_stalled_%s_per_issue_active.ratio," "$s"; done)
METRICS+="sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,\
sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active,\
sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active,\
sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active,\
sm__pipe_shared_cycles_active.avg.pct_of_peak_sustained_active,\
l1tex__data_pipe_lsu_wavefronts_mem_shared.avg.pct_of_peak_sustained_elapsed,\
smsp__inst_executed.sum"
run() {  # name, kernel regex, profile_one args
  local name=$1 kernel=$2; shift 2
  local args=(--clock-control none --kernel-name "regex:$kernel" --launch-skip 1 --launch-count 1 $SECTIONS)
  timeout 150 ncu "${args[@]}" --metrics "$METRICS" python3 bench/profile_one.py "$@" > "$OUT/ncu_$name.txt" 2>&1
  local rc=$?
  if [ $rc != 0 ]; then   # a metric this ncu does not know fails the run: the sections alone
    tail -3 "$OUT/ncu_$name.txt"
    timeout 120 ncu "${args[@]}" python3 bench/profile_one.py "$@" > "$OUT/ncu_$name.txt" 2>&1
    rc=$?
  fi
  echo "== $name ($kernel): rc=$rc"
  grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|Issue Slots Busy|\
Executed Ipc Active|Achieved Occupancy|Registers Per Thread|Shared Memory Configuration Size|\
No Eligible|Warp Cycles Per Issued|Block Limit|stalled|pipe_|shared|inst_executed.sum" \
    "$OUT/ncu_$name.txt" | head -50
}
run fwd sscan_fwd_lean_kernel selective_scan cuda bfloat16
run bwd selective_scan_bwd_kernel selective_scan cuda bfloat16 --bwd
