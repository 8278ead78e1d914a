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
A first line probes how many cores the process can use. Also per op: the compiles' overlap
(summed walls / the length of their union; 1.0 = one after another), the longest one and when the
last ended, and a sleeper thread's GIL lag during the block; each compile's name, start, end, CPU
and thread ("main", "pool", "other" = e.g. autograd's CUDA device thread) is in the DETAIL line.
Each op runs under --timeout (row TIMEOUT), --budget stops starting new ones (rows SKIPPED); rows
print as `ROW ...` when they finish and --out rewrites the table file after each, so a run cut
short still leaves its table.
`SSM_KERNELS_AHEAD_LOAD=0` keeps launcher builds and loads out of the pool (the old behaviour);
`SSM_KERNELS_AHEAD_LEGACY=1` the session-6 block (backward compiled on autograd's device thread).
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
_timeline = []   # (what, kernel, start s, end s, thread CPU s, where) relative to _T0
_T0 = [0.0]


def _instrument():
    """Count and time, per phase, Triton compiles and `CompiledKernel._init_handles` (launcher
    build -- gcc per argument-type list on Triton <= 3.6 -- plus the cubin load), and whether
    they ran in the caller's thread ("main") or in compile_ahead's pool."""
    import threading
    import triton.compiler as tc
    from triton.compiler.compiler import CompiledKernel
    lock = threading.Lock()

    def add(what, dt, cpu=0.0, name="?", t0=0.0):
        t = threading.current_thread()   # "other": e.g. autograd's CUDA device thread
        where = "main" if t is threading.main_thread() else \
            "pool" if t.name.startswith("ssm_kernels_compile") else "other"
        with lock:
            d = _stats.setdefault(f"{what}_{where}", [0, 0.0, 0.0])
            d[0] += 1
            d[1] += dt
            d[2] += cpu
            _timeline.append((what, name, round(t0 - _T0[0], 3), round(t0 + dt - _T0[0], 3),
                              round(cpu, 3), where))

    orig_compile = tc.compile

    def compile_(src, *a, **k):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return orig_compile(src, *a, **k)
        finally:
            add("compile", time.perf_counter() - t0, time.thread_time() - c0,
                getattr(getattr(src, "fn", None), "__name__", "?"), t0)
    tc.compile = compile_
    orig_init = CompiledKernel._init_handles

    def init(self):
        if self.module is not None:
            return orig_init(self)
        t0 = time.perf_counter()
        try:
            return orig_init(self)
        finally:
            add("load", time.perf_counter() - t0, 0.0, getattr(self, "name", "?"), t0)
    CompiledKernel._init_handles = init


class _Heartbeat:
    """A thread that asks for the GIL every 2 ms (sleep 1 ms, then run Python): its total and
    worst lateness over a block tell whether the compile pool starves Python threads -- the
    dry run's main thread among them -- of the GIL (a compile that holds the GIL in C++ for
    seconds shows as a lag of that size)."""

    def __init__(self):
        import threading
        self.lags, self.stop = [], threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            t = time.perf_counter()
            time.sleep(0.001)
            self.lags.append(time.perf_counter() - t - 0.001)

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.t.join()

    def summary(self):
        ls = self.lags or [0.0]
        return {"n": len(ls), "sum_s": round(sum(ls), 3), "max_ms": round(max(ls) * 1e3, 1),
                "over_20ms": sum(x > 0.02 for x in ls)}


def _overlap(tl, what="compile"):
    """Summed walls of `what` over the length of the union of their intervals (1.0: one after
    another, however many threads; n: n at once), the first start, the last end, the longest."""
    iv = sorted((a, b) for w, _, a, b, _, _ in tl if w == what)
    if not iv:
        return None
    union, cur_a, cur_b = 0.0, iv[0][0], iv[0][1]
    for a, b in iv[1:]:
        if a > cur_b:
            union += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    union += cur_b - cur_a
    return {"sum_s": round(sum(b - a for a, b in iv), 3), "union_s": round(union, 3),
            "overlap": round(sum(b - a for a, b in iv) / max(union, 1e-9), 2),
            "first_start_s": iv[0][0], "last_end_s": round(max(b for _, b in iv), 3),
            "longest_s": round(max(b - a for a, b in iv), 3)}


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
    _T0[0] = t0
    info, ahead_s, phases = {}, 0.0, {}
    if ahead:   # ssm_kernels.compile_ahead's dry run (its kernels compiled in `ahead` threads)
        from ssm_kernels._warmup import compiling_ahead
        with _Heartbeat() as hb:
            with compiling_ahead(ahead) as info:
                thunk()
                phases["dry_run_s"] = round(time.perf_counter() - t0, 3)
        ahead_s = time.perf_counter() - t0
        phases["ahead"] = _take()
        phases["gil_lag"] = hb.summary()
    thunk()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    phases["call"] = _take()
    t0 = time.perf_counter()
    thunk()
    torch.cuda.synchronize()
    second = time.perf_counter() - t0
    phases["compile_overlap"] = _overlap(_timeline)
    phases["load_overlap"] = _overlap(_timeline, "load")
    print("RESULT " + json.dumps({"op": op, "first_s": first, "second_ms": second * 1e3,
                                  "ahead_s": ahead_s, "kernels": info.get("kernels"),
                                  "errors": info.get("errors"), "phases": phases,
                                  "timeline": _timeline, "triton": triton.__version__}))


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


HEADER = ("| op | first call s | second call ms | ahead block s | ahead: compile | ahead: load "
          "| call: compile | call: load | compiles: overlap (sum / union s), longest s, last end s "
          "| GIL lag sum s / max ms | triton |")


def _row(op: str, r: dict, ahead: int) -> str:
    ph = r["phases"]

    def cell(phase, what):
        d = ph.get(phase, {})
        m, p = d.get(f"{what}_main", (0, 0.0)), d.get(f"{what}_pool", (0, 0.0))
        o = d.get(f"{what}_other")
        return (f"{m[0]}: {m[1]:.2f} / {p[0]}: {p[1]:.2f}"
                + (f" / other {o[0]}: {o[1]:.2f}" if o else ""))
    # thread CPU of the compiles (ptxas not included) over the block's wall: > 1 only if
    # compiles really ran at once (summed walls would also grow from mere time-slicing)
    csum = sum(v[2] for k, v in ph.get("ahead", {}).items() if k.startswith("compile"))
    ov, lag = ph.get("compile_overlap") or {}, ph.get("gil_lag") or {}
    return "| " + " | ".join((
        op, f"{r['first_s']:.2f}", f"{r['second_ms']:.1f}",
        f"{r['ahead_s']:.2f} ({r['kernels']} k, {r['errors']} err, dry run "
        f"{ph.get('dry_run_s', 0):.2f}, compile CPU / wall {csum / max(r['ahead_s'], 1e-9):.1f})"
        if ahead else "-",
        cell("ahead", "compile"), cell("ahead", "load"), cell("call", "compile"),
        cell("call", "load"),
        f"{ov.get('overlap', 0):.2f} ({ov.get('sum_s', 0):.2f} / {ov.get('union_s', 0):.2f}), "
        f"{ov.get('longest_s', 0):.2f}, {ov.get('last_end_s', 0):.2f}" if ov else "-",
        f"{lag.get('sum_s', 0):.2f} / {lag.get('max_ms', 0):.0f}" if lag else "-",
        r["triton"])) + " |"


def main():
    if len(sys.argv) > 3 and sys.argv[1] == "_child":
        child(sys.argv[2], int(sys.argv[3]))
        return 0
    sys.path.insert(0, HERE)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ops", default=None)
    ap.add_argument("--ahead", type=int, default=0, metavar="N",
                    help="compile ahead in N threads first (ssm_kernels.compile_ahead's dry run)")
    ap.add_argument("--timeout", type=float, default=40.0,
                    help="seconds per op (its process is killed after it; row TIMEOUT)")
    ap.add_argument("--budget", type=float, default=0.0,
                    help="stop starting new ops after this many seconds in all (0: no limit); "
                    "the skipped ones get a SKIPPED row")
    ap.add_argument("--no-probe", action="store_true", help="skip the host CPU probe (~1 s)")
    ap.add_argument("--out", default=None,
                    help="also write the table here, rewritten after every op")
    args = ap.parse_args()
    from compile_audit import FIRST_OPS
    ops = args.ops.split(",") if args.ops else FIRST_OPS
    start = time.perf_counter()
    if not args.no_probe:
        print("host: " + cpu_probe(), flush=True)
    legacy = os.environ.get("SSM_KERNELS_AHEAD_LEGACY", "0") not in ("0", "", "false", "False")
    threads = f", compile_ahead {args.ahead} threads" if args.ahead else ""
    title = (f"first call s: cold cache{threads}"
             f"{' (SSM_KERNELS_AHEAD_LEGACY: the session-6 block)' if legacy else ''}; "
             "compile / load cells: `n: seconds` summed over kernels, main thread / compile_ahead "
             "pool (/ other threads, e.g. autograd's device thread); load = "
             "CompiledKernel._init_handles (launcher build + cubin load); overlap = "
             "summed compile walls / length of their union (1.0: one after another); GIL lag = "
             "a 1 ms sleeper thread's lateness during the ahead block")
    rows = []

    def emit(row):   # each row printed as it comes (a killed run keeps its rows) and the file
        rows.append(row)   # rewritten, so the table survives whatever stops the run
        print("ROW " + row, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write(title + "\n" + HEADER + "\n|---|" + "---:|" * 10 + "\n"
                        + "\n".join(rows) + "\n")
    for op in ops:
        if args.budget and time.perf_counter() - start > args.budget:
            emit(f"| {op} | SKIPPED (budget {args.budget:.0f} s spent) |")
            continue
        try:
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "_child", op,
                                str(args.ahead)], capture_output=True, text=True,
                               timeout=args.timeout)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            emit(f"| {op} | TIMEOUT (> {args.timeout:.0f} s) | {out.strip()[-100:]!r} |")
            continue
        res = [json.loads(ln[7:]) for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not res:
            emit(f"| {op} | FAILED | {(p.stderr.strip().splitlines() or ['?'])[-1][:120]} |")
            continue
        r = res[0]
        print("DETAIL " + json.dumps(r), flush=True)
        emit(_row(op, r, args.ahead))
    print(title)
    print(HEADER)
    print("|---|" + "---:|" * 10)
    for row in rows:
        print(row)
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
