"""Wall of a cold `python -m ssm_kernels check` on this GPU host, before and after cutting pairs
into units of cases (issue 13: < 60 s on one GPU), each run with its own empty Triton cache.

    python bench/gpu_check_wall.py [--runs pairs8 default j12 j16 ahead]

Runs (each a fresh `python -m ssm_kernels check --json`, TRITON_CACHE_DIR a new empty folder):
  pairs8   SSM_KERNELS_CHECK_SPLIT=0 --jobs 8: one unit per (family, backend) pair, longest first
           (the schedule before units: the baseline, on this same machine)
  default  the README's command (default --jobs: half the usable cores, at most 8)
  j12/j16  --jobs 12 / 16 (do more workers than half the cores pay off on this host?)
  ahead    default jobs with SSM_KERNELS_CHECK_AHEAD=1: each unit first compiles its kernels in
           threads (a dry run that also repeats the unit's float64 references), then runs
Correctness is the check itself: every row against the float64 reference; a run with a failed
row or a non-zero exit is marked. Prints the host (cpu_count, affinity, the default jobs), per run
the three longest pairs (their units' seconds summed), and a table last; JSON and logs go to $OUT.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {"pairs8": ({"SSM_KERNELS_CHECK_SPLIT": "0"}, ["--jobs", "8"]),
        "default": ({}, []),
        "j12": ({}, ["--jobs", "12"]),
        "j16": ({}, ["--jobs", "16"]),
        "ahead": ({"SSM_KERNELS_CHECK_AHEAD": "1"}, [])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    args = ap.parse_args(argv)
    out = os.environ.get("OUT") or tempfile.mkdtemp(prefix="check_wall_")
    sys.path.insert(0, ROOT)
    from ssm_kernels import _checks
    aff = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    print(f"host: cpu_count {os.cpu_count()}, affinity {aff}; default --jobs on cuda: "
          f"{_checks.default_jobs('cuda', 1000)}", flush=True)
    table = []
    for name in args.runs:
        env_extra, extra = RUNS[name]
        env = dict(os.environ, TRITON_CACHE_DIR=tempfile.mkdtemp(prefix=f"triton_{name}_"),
                   **env_extra)
        env.pop("TRITON_INTERPRET", None)
        path = os.path.join(out, f"check_{name}.json")
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "ssm_kernels", "check", "--json", path, *extra],
                           cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        with open(os.path.join(out, f"check_{name}.log"), "w") as f:
            f.write(p.stdout + "\n--- stderr\n" + p.stderr)
        try:
            doc = json.load(open(path))
        except (OSError, ValueError):
            print(f"{name}: no JSON (exit {p.returncode}); tail:\n{(p.stdout + p.stderr)[-2000:]}")
            table.append((name, wall, None, None, None, p.returncode, "-"))
            continue
        pairs = sorted(doc["families"], key=lambda f: -f["seconds"])
        longest = ", ".join(f"{f['family']} {f['backend']} {f['seconds']:.1f}" for f in pairs[:3])
        print(f"{name}: wall {wall:.1f} s, in check {doc['seconds']:.1f} s, {doc['passed']} passed, "
              f"{doc['failed']} failed, exit {p.returncode}; longest pairs (s of work): {longest}",
              flush=True)
        table.append((name, wall, doc["seconds"], doc["passed"], doc["failed"], p.returncode,
                      f"{pairs[0]['family']} {pairs[0]['backend']} {pairs[0]['seconds']:.1f}"))
    print("\n| run | wall s | in check s | passed | failed | exit | longest pair (s of work) |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, wall, secs, ok, bad, rc, top in table:
        print(f"| {name} | {wall:.1f} | {'-' if secs is None else f'{secs:.1f}'} | {ok} | {bad} "
              f"| {rc} | {top} |")
    print(f"(JSON and logs in {out})")


if __name__ == "__main__":
    main()
