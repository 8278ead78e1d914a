"""First-call cost of each public op on the GPU: fwd + bwd at a typical bf16 shape, each op in
a fresh process with an empty Triton cache (what a user's first call pays), then the second call.

    python bench/gpu_first_call.py [--ops chunk_gla,chunk_gated_delta_rule] [--ahead 16]

The shapes and calls are bench/compile_audit.py's `first` ones (that script measures the same
calls' compile time offline), so the two tables line up row by row. The CUDA context is made
before the clock starts; the first call's time is compile + module load + the run itself.
Prints one table last: op | first call s | second call ms | the compile_ahead block's wall (kernels
submitted, errors, dry-run part) | compiles and kernel loads (launcher build + cubin load) per
phase, counted and summed in the main thread / the compile_ahead pool (where the time went);
compile CPU / wall = the compiles' thread CPU seconds (ptxas excluded) over the block's wall: well
above 1 only if they really ran at once (at or below 1: they did not, e.g. too few usable cores).
A first line probes how many cores the process can use.
`SSM_KERNELS_AHEAD_LOAD=0` keeps launcher builds and loads out of the pool (the old behaviour).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


_stats = {}


def _instrument():
    """Count and time, per phase, Triton compiles and `CompiledKernel._init_handles` (launcher
    build -- gcc per argument-type list on Triton <= 3.6 -- plus the cubin load), and whether
    they ran in the caller's thread ("main") or in compile_ahead's pool."""
    import threading
    import triton.compiler as tc
    from triton.compiler.compiler import CompiledKernel
    lock = threading.Lock()

    def add(what, dt, cpu=0.0):
        where = "main" if threading.current_thread() is threading.main_thread() else "pool"
        with lock:
            d = _stats.setdefault(f"{what}_{where}", [0, 0.0, 0.0])
            d[0] += 1
            d[1] += dt
            d[2] += cpu

    orig_compile = tc.compile

    def compile_(*a, **k):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return orig_compile(*a, **k)
        finally:
            add("compile", time.perf_counter() - t0, time.thread_time() - c0)
    tc.compile = compile_
    orig_init = CompiledKernel._init_handles

    def init(self):
        if self.module is not None:
            return orig_init(self)
        t0 = time.perf_counter()
        try:
            return orig_init(self)
        finally:
            add("load", time.perf_counter() - t0)
    CompiledKernel._init_handles = init


def _take():
    out = {k: (v[0], round(v[1], 3), round(v[2], 3)) for k, v in _stats.items()}
    _stats.clear()
    return out


def child(op: str, ahead: int):
    import torch
    sys.path.insert(0, HERE)
    import compile_audit as ca   # sets a fresh, empty TRITON_CACHE_DIR at import
    import triton
    torch.set_default_device("cuda")
    torch.zeros(1).sum().item()   # CUDA context and allocator outside the timing
    import ssm_kernels  # noqa: F401  (import time outside the timing too)
    _instrument()
    thunk = ca._first_ops()[op]
    t0 = time.perf_counter()
    info, ahead_s, phases = {}, 0.0, {}
    if ahead:   # ssm_kernels.compile_ahead's dry run (its kernels compiled in `ahead` threads)
        from ssm_kernels._warmup import compiling_ahead
        with compiling_ahead(ahead) as info:
            thunk()
            phases["dry_run_s"] = round(time.perf_counter() - t0, 3)
        ahead_s = time.perf_counter() - t0
        phases["ahead"] = _take()
    thunk()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    phases["call"] = _take()
    t0 = time.perf_counter()
    thunk()
    torch.cuda.synchronize()
    second = time.perf_counter() - t0
    print("RESULT " + json.dumps({"op": op, "first_s": first, "second_ms": second * 1e3,
                                  "ahead_s": ahead_s, "kernels": info.get("kernels"),
                                  "errors": info.get("errors"), "phases": phases,
                                  "triton": triton.__version__}))


def cpu_probe(n: int = 8) -> str:
    """How many cores this process can really use at once: cpu_count, the affinity mask, the
    cgroup CPU quota, and the wall of n busy subprocesses (0.4 s of CPU each) vs one. Threads of
    compile_ahead can only overlap as far as this allows."""
    import multiprocessing
    aff = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    quota = "?"
    for path in ("/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"):
        try:
            with open(path) as f:
                quota = f.read().strip()
            break
        except OSError:
            pass
    code = "import time\nt=time.process_time()\nwhile time.process_time()-t<0.4: pass"

    def wall(k):
        t0 = time.perf_counter()
        ps = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(k)]
        for p in ps:
            p.wait()
        return time.perf_counter() - t0
    one, many = wall(1), wall(n)
    return (f"cpu_count {multiprocessing.cpu_count()}, affinity {aff}, cgroup quota {quota!r}; "
            f"{n} busy processes x 0.4 s CPU: {many:.2f} s wall vs 1: {one:.2f} s "
            f"(usable cores ~{n * one / many:.1f})")


def main():
    if len(sys.argv) > 3 and sys.argv[1] == "_child":
        child(sys.argv[2], int(sys.argv[3]))
        return 0
    sys.path.insert(0, HERE)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ops", default=None)
    ap.add_argument("--ahead", type=int, default=0, metavar="N",
                    help="compile ahead in N threads first (ssm_kernels.compile_ahead's dry run)")
    args = ap.parse_args()
    from compile_audit import FIRST_OPS
    ops = args.ops.split(",") if args.ops else FIRST_OPS
    print("host: " + cpu_probe(), flush=True)
    rows = []
    for op in ops:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "_child", op, str(args.ahead)],
                           capture_output=True, text=True)
        res = [json.loads(ln[7:]) for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not res:
            rows.append((op, "FAILED", (p.stderr.strip().splitlines() or ["?"])[-1][:120]))
        else:
            r = res[0]
            print("DETAIL " + json.dumps(r), flush=True)
            ph = r["phases"]

            def cell(phase, what):
                d = ph.get(phase, {})
                m, p = d.get(f"{what}_main", (0, 0.0)), d.get(f"{what}_pool", (0, 0.0))
                return f"{m[0]}: {m[1]:.2f} / {p[0]}: {p[1]:.2f}"
            # thread CPU of the compiles (ptxas not included) over the block's wall: > 1 only if
            # compiles really ran at once (summed walls would also grow from mere time-slicing)
            csum = sum(v[2] for k, v in ph.get("ahead", {}).items() if k.startswith("compile"))
            rows.append((op, f"{r['first_s']:.2f}", f"{r['second_ms']:.1f}",
                         f"{r['ahead_s']:.2f} ({r['kernels']} k, {r['errors']} err, dry run "
                         f"{ph.get('dry_run_s', 0):.2f}, compile CPU / wall {csum / max(r['ahead_s'], 1e-9):.1f})"
                         if args.ahead else "-",
                         cell("ahead", "compile"), cell("ahead", "load"),
                         cell("call", "compile"), cell("call", "load"), r["triton"]))
    print("compile / load cells: `n: seconds` summed over kernels, main thread / compile_ahead pool; "
          "load = CompiledKernel._init_handles (launcher build + cubin load)")
    print(f"| op | first call s (cold cache{', compile_ahead %d threads' % args.ahead if args.ahead else ''}) "
          "| second call ms | ahead block s | ahead: compile | ahead: load | call: compile "
          "| call: load | triton |")
    print("|---|---:|---:|---|---|---|---|---|---|")
    for row in rows:
        if row[1] == "FAILED":
            print(f"| {row[0]} | FAILED | {row[2]} |")
        else:
            print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
