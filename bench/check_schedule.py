"""Predict the wall of a cold `python -m ssm_kernels check` on a GPU from per-pair seconds, for the
units `_checks.plan_units` makes, scheduled as `_checks.run` hands them to its workers.

    PYTHONPATH=. python bench/check_schedule.py [--jobs 8 12 16] [--cuda] [--unit-overhead 0.5]

Model: a unit of k of a pair's n cases takes k/n of the pair's measured seconds (one pair per
worker, `check --jobs 8`, H100, Triton 3.6, session 8; `_checks._PAIR_SECONDS`, 3 s for the pairs
measured under 6 s) plus `--unit-overhead` (module import, Triton's per-process set-up, launchers
built again in another process); units go, in plan order, to whichever worker is free first
(ProcessPoolExecutor). Wall = start-up (worker spawn + imports before the first unit: 4.5 s, the
measured check total minus its longest pair) + the schedule's makespan + the CLI outside `check`
(3.6 s measured). Also prints the same model for one unit per pair (before), which should give back
the measured 71 s. The unit seconds were measured with 8 busy workers on 16 cores: more workers
are only predicted right if the host has the cores to spare.
"""
from __future__ import annotations

import argparse
import heapq
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssm_kernels import _checks  # noqa: E402

START_S, OUTSIDE_S = 4.5, 3.6


def makespan(units, jobs: int, overhead: float) -> float:
    free = [0.0] * jobs
    for u in units:
        t = heapq.heappop(free)
        heapq.heappush(free, t + u.cost + (overhead if u.cost else 0.0))
    return max(free)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, nargs="+", default=[8, 12, 16])
    ap.add_argument("--cuda", action="store_true", help="the cuda backend's pairs too")
    ap.add_argument("--unit-overhead", type=float, default=0.5, metavar="S")
    args = ap.parse_args(argv)
    backends = (["cuda"] if args.cuda else []) + ["triton", "reference"]
    pairs = [(f, b) for f in _checks.FAMILIES for b in backends]
    n = {p: len(_checks.list_cases(*p, "cuda")) for p in pairs}
    before = _checks.plan_units(pairs, n, 8, split=False)   # one unit per pair, longest first
    print(f"{len(pairs)} pairs, {sum(n.values())} cases, {sum(u.cost for u in before):.0f} s of work")
    print("| jobs | units | longest unit s | makespan before s | wall before s | makespan s | wall s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for jobs in args.jobs:
        units = _checks.plan_units(pairs, n, jobs)
        mb = makespan(before, jobs, 0.0)
        ma = makespan(units, jobs, args.unit_overhead)
        print(f"| {jobs} | {len(units)} | {units[0].cost:.1f} | {mb:.1f} | {START_S + mb + OUTSIDE_S:.1f} "
              f"| {ma:.1f} | {START_S + ma + OUTSIDE_S:.1f} |")
    units = _checks.plan_units(pairs, n, args.jobs[0])
    print(f"\nunits for --jobs {args.jobs[0]}, in the order workers take them:")
    for u in units:
        print(f"  {u.family:<15} {u.backend:<9} cases {u.cases}  {u.cost:.1f} s")


if __name__ == "__main__":
    main()
