"""Where `check` and first calls spend their Triton compile time, measured offline for sm_90.

    PYTHONPATH=. python bench/compile_audit.py check [--families a,b] [--full] [--ahead N]
    PYTHONPATH=. python bench/compile_audit.py first [--ops a,b] [--ahead N]
    PYTHONPATH=. python bench/compile_audit.py threads [--n 4] [--ops chunk_gla]

`check`: runs each family's `check("triton", <GPU sizes>)` (the default plan, or `--full`) with
bench/sm90_audit.py's stub driver (target sm_90, compile, never launch) and a fresh, empty Triton
cache, and records every compile: kernel name, constexprs, signature, front-end seconds (Python
AST -> TTIR -> TTGIR -> LLIR -> PTX) and ptxas seconds (PTX -> cubin, a subprocess). A table per
family (kernel, specialisations, seconds), then totals per family. The check's verdicts are
garbage (nothing runs) and are ignored; the float64 references do run on the CPU (not timed).
Each family runs in its own process (as `check --jobs` workers do), so kernels shared between
families are counted in each.

`first`: the first forward + backward of each public op at a typical bf16 shape, each op in its
own process with its own empty cache (what a user's first call costs).

`threads`: do compiles in Python threads overlap? Compiles the distinct kernels of an op's first
fwd+bwd serially, then in N threads (fresh caches both times), and prints both wall times.

Autotuned kernels (based) compile every config, as the first call on a GPU does; the GPU adds the
benchmark launches, which this does not measure. Seconds are this host's (see NOTES for the
assumed ratio to the H200's host).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="compile_audit_")   # cold cache
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import sm90_audit as audit  # noqa: E402  (sets the fp-fusion default, refuses TRITON_INTERPRET)

# ---- timing hooks --------------------------------------------------------------------------------

records: list = []    # one per real compile
_tls = threading.local()


def _stack() -> list:
    """The compiles in progress in this thread (the threads probe compiles concurrently)."""
    if not hasattr(_tls, "stack"):
        _tls.stack = []
    return _tls.stack


def _install_timers():
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime import autotuner

    for stage in ("make_ttir", "make_ttgir", "make_llir", "make_ptx", "make_cubin"):
        orig = CUDABackend.__dict__[stage]
        is_static = isinstance(orig, staticmethod)
        f = orig.__func__ if is_static else orig

        def timed(*a, _f=f, _stage=stage, **k):
            t0, c0 = time.perf_counter(), time.thread_time()
            ch0 = _children_cpu()
            try:
                return _f(*a, **k)
            finally:
                cur = _stack()
                if cur:
                    cur[-1]["stages"][_stage] = (cur[-1]["stages"].get(_stage, 0.0)
                                                 + time.perf_counter() - t0)
                    cur[-1]["stage_cpu"] = cur[-1].get("stage_cpu", 0.0) + time.thread_time() - c0
                    if _stage == "make_cubin":   # ptxas's CPU (exact when compiles run serially)
                        cur[-1]["ptxas_cpu"] = _children_cpu() - ch0
        setattr(CUDABackend, stage, staticmethod(timed) if is_static else timed)

    import triton.compiler as tc
    tc.compile = _timed_compile(tc.compile)   # JITFunction.create_binder imports it from there

    # autotuned kernels: compile every (pruned) config, as a cold GPU call does, then launch none
    def at_run(self, *args, **kwargs):
        kwargs.pop("warmup", None)
        self.warmup(*args, **kwargs)
    autotuner.Autotuner.run = at_run


def _children_cpu() -> float:
    import resource
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _timed_compile(compile_fn):
    def wrapped(src, *a, **k):
        rec = {"name": src.fn.__name__, "stages": {},
               "const": {_argname(src, n): _fmt(v) for n, v in src.constants.items()},
               "sig": ",".join(str(v) for v in src.signature.values())}
        _stack().append(rec)
        t0, c0 = time.perf_counter(), time.thread_time()
        rec["start"] = t0
        try:
            return compile_fn(src, *a, **k)
        finally:
            _stack().pop()
            rec["total"] = time.perf_counter() - t0
            rec["thread"] = threading.current_thread().name
            # this thread's CPU outside the backend stages: Python front end (AST -> TTIR code
            # generation), cache and metadata work -- the part that holds the GIL, so threads
            # cannot overlap it (ptxas, a subprocess, counts in neither)
            rec["cpu"] = time.thread_time() - c0
            rec["gil_cpu"] = rec["cpu"] - rec.get("stage_cpu", 0.0)
            rec["ptxas"] = rec["stages"].get("make_cubin", 0.0)
            rec["case"] = audit._case[0]
            rec["launcher"] = _launcher_key(src)
            records.append(rec)
    return wrapped


def _launcher_key(src):
    """Triton <= 3.6 builds a C launcher per distinct launcher source (gcc, at the kernel's first
    launch, in the launching thread) and caches it on disk; the source depends on the signature's
    argument types only. A hash of that source, or None where Triton has a generic launcher (3.9)."""
    try:
        from triton.backends.nvidia.driver import make_launcher
    except ImportError:
        return None
    import hashlib
    arg_idx = lambda x: (src.fn.arg_names.index(x), ) if isinstance(x, str) else x  # noqa: E731
    constants = {arg_idx(i): v for i, v in src.constants.items()}
    try:
        text = make_launcher(constants, dict(src.signature), None)
    except Exception:
        return None
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _argname(src, n):
    idx = n[0] if isinstance(n, tuple) and len(n) == 1 else n
    try:
        return src.fn.arg_names[idx]
    except (TypeError, IndexError):
        return str(n)


def _fmt(v):
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float, str)) or v is None:
        return v
    return str(v).replace("triton.language.", "").replace("tl.", "")


class _GpuSized(str):
    """Passed as `device` to a family's check: torch reads "cpu", but `device == "cpu"` is False,
    so the check takes its GPU-size plan."""
    def __eq__(self, other):
        return other == "cuda"

    def __ne__(self, other):
        return not self.__eq__(other)

    __hash__ = str.__hash__


_installed = []


def setup():
    if _installed:
        return
    _installed.append(True)
    # the JITFunctions must be wrapped: install the timers before ssm_kernels is imported
    _install_timers()
    audit.install()
    from ssm_kernels.fft_conv import triton as ft
    ft._sm_count = lambda device: 132
    try:
        from ssm_kernels.fft_conv import monarch16 as m16
        m16._sm_count = lambda device: 132
    except ImportError:
        pass


# ---- what to compile -------------------------------------------------------------------------

FAMILIES = ["linear_scan", "selective_scan", "linear_attn", "based", "delta_rule", "fft_conv",
            "causal_conv1d"]


def run_check_family(family: str, full: bool):
    import importlib
    from ssm_kernels._checks import FAMILIES as REG
    mod = importlib.import_module(REG[family])
    audit._case[0] = f"check {family}"
    mod.check("triton", _GpuSized("cpu"), full=full)


def _first_ops():
    """op -> thunk: the first fwd+bwd of each public op at a typical bf16 shape (T not a tile
    multiple, one initial state, final state on)."""
    import torch.nn.functional as F
    import ssm_kernels as sk
    bf = torch.bfloat16
    B, T, H, K, V = 2, 2047, 8, 128, 128

    def leaf(*s, dtype=bf):
        return torch.randn(*s).to(dtype).requires_grad_()

    def grad(outs, leaves):
        audit._grad(outs, leaves)

    def la(op, gshape=None):
        def thunk():
            q, k, v, h0 = leaf(B, T, H, K), leaf(B, T, H, K), leaf(B, T, H, V), leaf(B, H, K, V,
                                                                                     dtype=torch.float32)
            extra = () if gshape is None else ((-torch.rand(*gshape) * 0.5).requires_grad_(),)
            kw = {"normalize": False} if op == "chunk_linear_attn" else {}
            o, S = getattr(sk, op)(q, k, v, *extra, initial_state=h0, output_final_state=True,
                                   backend="triton", **kw)
            grad((o, S), (q, k, v, *extra, h0))
        return thunk

    def ssd():
        x = leaf(B, T, H, 64)
        Bm, Cm = leaf(B, T, 1, K), leaf(B, T, 1, K)
        dt = (torch.rand(B, T, H) * 0.1 + 0.01).requires_grad_()
        A = (-torch.rand(H) - 0.5).requires_grad_()
        y, S = sk.mamba_chunk_scan_combined(x, dt, A, Bm, Cm, 64, return_final_states=True,
                                            backend="triton")
        grad((y, S), (x, dt, A, Bm, Cm))

    def gdn(gated):
        def thunk():
            q, k, v = leaf(B, T, H, K), leaf(B, T, H, K), leaf(B, T, H, V)
            beta = torch.rand(B, T, H).to(bf).requires_grad_()
            if gated:
                g = F.logsigmoid(torch.randn(B, T, H)).requires_grad_()
                o, S = sk.chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True,
                                                 backend="triton")
                grad((o, S), (q, k, v, g, beta))
            else:
                o, S = sk.chunk_delta_rule(q, k, v, beta, output_final_state=True,
                                           backend="triton")
                grad((o, S), (q, k, v, beta))
        return thunk

    def based():
        q, k, v = leaf(B, T, H, 16), leaf(B, T, H, 16), leaf(B, T, H, V)
        o = sk.chunk_based(q, k, v, backend="triton")
        grad((o if torch.is_tensor(o) else o[0],), (q, k, v))

    def linear_scan():
        a = (torch.rand(B, T, 1024) * 0.5 + 0.5).to(bf).requires_grad_()
        b = leaf(B, T, 1024)
        h, hT = sk.linear_scan(a, b, dim=1, output_final_state=True, backend="triton")
        grad((h, hT), (a, b))

    def selective_scan():
        D, N = 1536, 16
        u, delta = leaf(B, D, T), leaf(B, D, T)
        A = (-torch.rand(D, N)).requires_grad_()
        Bm, Cm = leaf(B, N, T), leaf(B, N, T)
        Dp = torch.randn(D).requires_grad_()
        z = leaf(B, D, T)
        bias = torch.randn(D).requires_grad_()
        y = sk.selective_scan_fn(u, delta, A, Bm, Cm, Dp, z, bias, delta_softplus=True,
                                 backend="triton")
        grad((y if torch.is_tensor(y) else y[0],), (u, delta, A, Bm, Cm, Dp, z, bias))

    def causal_conv1d():
        x = leaf(B, 1536, T)
        w, b = torch.randn(1536, 4).requires_grad_(), torch.randn(1536).requires_grad_()
        y = sk.causal_conv1d_fn(x, w, b, activation="silu", backend="triton")
        grad((y,), (x, w, b))

    def fft_conv():
        u = leaf(B, 768, T)
        kk, D = torch.randn(768, T).requires_grad_(), torch.randn(768).requires_grad_()
        y = sk.fft_conv(u, kk, D, backend="triton")
        grad((y,), (u, kk, D))

    return {"chunk_linear_attn": la("chunk_linear_attn"),
            "chunk_simple_gla": la("chunk_simple_gla", (B, T, H)),
            "chunk_gla": la("chunk_gla", (B, T, H, K)),
            "mamba_chunk_scan_combined": ssd,
            "chunk_gated_delta_rule": gdn(True), "chunk_delta_rule": gdn(False),
            "chunk_based": based, "linear_scan": linear_scan,
            "selective_scan_fn": selective_scan, "causal_conv1d_fn": causal_conv1d,
            "fft_conv": fft_conv}


FIRST_OPS = ["chunk_linear_attn", "chunk_simple_gla", "chunk_gla", "mamba_chunk_scan_combined",
             "chunk_gated_delta_rule", "chunk_delta_rule", "chunk_based", "linear_scan",
             "selective_scan_fn", "causal_conv1d_fn", "fft_conv"]


# ---- one unit in this process (child mode) ------------------------------------------------------

AHEAD = int(os.environ.get("COMPILE_AUDIT_AHEAD", "0"))


def child(kind: str, name: str, full: bool, out: str):
    setup()
    err = None
    extra = {}
    t0 = time.perf_counter()
    try:
        if kind == "check" and AHEAD:
            # check's own dry run (ssm_kernels._checks._compile_ahead) in AHEAD threads, then the
            # real check: the dry run's wall and what the real run still compiles (should be 0)
            from ssm_kernels import _checks
            audit._case[0] = f"check {name}"
            torch.manual_seed(0)
            info = _checks._compile_ahead(name, "triton", _GpuSized("cpu"), full, AHEAD)
            ahead_s = time.perf_counter() - t0
            n0 = len(records)
            torch.manual_seed(0)
            run_check_family(name, full)
            extra = {"ahead_s": ahead_s, "submitted": info["kernels"],
                     "compiled_after": len(records) - n0}
        elif kind == "check":
            run_check_family(name, full)
        elif AHEAD:
            # ssm_kernels.compile_ahead's dry run in AHEAD threads, then the real call: how long
            # the dry run takes and what the real call still compiles (should be nothing)
            from ssm_kernels._warmup import compiling_ahead
            audit._case[0] = name
            thunk = _first_ops()[name]
            with compiling_ahead(AHEAD) as info:
                thunk()
            ahead_s = time.perf_counter() - t0
            n0 = len(records)
            thunk()
            extra = {"ahead_s": ahead_s, "submitted": info["kernels"],
                     "compiled_after": len(records) - n0}
        else:
            audit._case[0] = name
            _first_ops()[name]()
    except Exception as e:  # a compile error is a finding; report what compiled
        err = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    wall = time.perf_counter() - t0
    with open(out, "w") as f:
        json.dump({"unit": name, "records": records, "wall": wall, "error": err, **extra}, f)


def spawn(kind: str, name: str, full: bool) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    env = dict(os.environ)
    env.pop("TRITON_CACHE_DIR", None)   # the child makes its own empty one
    subprocess.run([sys.executable, os.path.abspath(__file__), "_child", kind, name,
                    "1" if full else "0", out], env=env, check=True)
    with open(out) as f:
        res = json.load(f)
    os.unlink(out)
    return res


# ---- tables ------------------------------------------------------------------------------------

def table(unit: str, res: dict, detail: bool) -> tuple:
    recs = res["records"]
    by = {}
    for r in recs:
        d = by.setdefault(r["name"], {"n": 0, "total": 0.0, "ptxas": 0.0, "worst": None})
        d["n"] += 1
        d["total"] += r["total"]
        d["ptxas"] += r["ptxas"]
        if d["worst"] is None or r["ptxas"] > d["worst"]["ptxas"]:
            d["worst"] = r
    tot = sum(r["total"] for r in recs)
    px = sum(r["ptxas"] for r in recs)
    launchers = {r.get("launcher") for r in recs} - {None}
    print(f"\n### {unit}: {len(recs)} compiles, {tot:.1f} s ({px:.1f} s ptxas), "
          f"wall {res['wall']:.1f} s{'  ERROR ' + res['error'] if res['error'] else ''}"
          + (f"; {len(launchers)} distinct C launchers (Triton <= 3.6: a gcc each)" if launchers else ""))
    if "ahead_s" in res:
        print(f"compile_ahead: {res['submitted']} kernels in {res['ahead_s']:.2f} s wall "
              f"({os.environ.get('COMPILE_AUDIT_AHEAD')} threads); the real call then compiled {res['compiled_after']}")
    print("| kernel | specialisations | compile s | ptxas s | worst ptxas s |")
    print("|---|---:|---:|---:|---:|")
    for name, d in sorted(by.items(), key=lambda kv: -kv[1]["total"]):
        print(f"| {name} | {d['n']} | {d['total']:.1f} | {d['ptxas']:.1f} "
              f"| {d['worst']['ptxas']:.1f} |")
    if detail:
        print("\nspecialisations (constexprs | signature):")
        for r in sorted(recs, key=lambda r: (r["name"], -r["total"])):
            c = " ".join(f"{k}={v}" for k, v in r["const"].items() if v is not None)
            print(f"  {r['name']:<32} {r['total']:6.2f} s (ptxas {r['ptxas']:5.2f})  {c} | {r['sig']}")
    return (len(recs), tot, px, max((r["total"] for r in recs), default=0.0), len(launchers),
            sum(r.get("cpu", 0.0) for r in recs), sum(r.get("gil_cpu", 0.0) for r in recs),
            max((r.get("cpu", 0.0) + r.get("ptxas_cpu", r["ptxas"]) for r in recs), default=0.0),
            sum(r.get("ptxas_cpu", 0.0) for r in recs))


def threads_probe(n: int, op: str):
    """Serial vs threaded compile of the distinct kernels one op's first fwd+bwd launches (fresh
    caches each time): does a warm-up in threads overlap compiles at all?"""
    setup()
    from concurrent.futures import ThreadPoolExecutor
    from triton import knobs
    from triton.runtime.jit import JITFunction
    launches = {}
    orig = JITFunction.run

    def grab(self, *args, grid, warmup, **kw):
        kernel = orig(self, *args, grid=grid, warmup=True, **kw)
        launches.setdefault(kernel.hash, (self, args, kw))
        return kernel
    JITFunction.run = grab
    audit._case[0] = op
    _first_ops()[op]()
    JITFunction.run = orig
    jobs = list(launches.values())

    def one(job):
        fn, args, kw = job
        JITFunction.warmup(fn, *args, grid=(1,), **kw)

    def fresh():
        for fn, _, _ in jobs:
            fn.device_caches.clear()
        knobs.cache.dir = tempfile.mkdtemp(prefix="compile_audit_")
        records.clear()

    fresh()
    t0, c0 = time.perf_counter(), time.process_time()
    for job in jobs:
        one(job)
    serial = time.perf_counter() - t0
    s_cpu = time.process_time() - c0
    s_sum, s_px = sum(r["total"] for r in records), sum(r["ptxas"] for r in records)
    fresh()
    t0, c0 = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(n) as ex:
        list(ex.map(one, jobs))
    threaded = time.perf_counter() - t0
    t_cpu = time.process_time() - c0
    t_sum, t_px = sum(r["total"] for r in records), sum(r["ptxas"] for r in records)
    print(f"{op}: {len(jobs)} distinct kernels; serial {serial:.2f} s (sum of compiles "
          f"{s_sum:.2f}, ptxas {s_px:.2f}); {n} threads {threaded:.2f} s (sum of compiles "
          f"{t_sum:.2f}, ptxas {t_px:.2f}); overlap = serial / threaded = {serial / threaded:.2f}x "
          f"on {os.cpu_count()} cores; this process's CPU s / wall s: serial {s_cpu / serial:.2f}, "
          f"threaded {t_cpu / threaded:.2f} (about 1.0 threaded = the compiles hold the GIL)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        kind, name, full, out = argv[1:5]
        child(kind, name, full == "1", out)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["check", "first", "threads"])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--ops", default=",".join(FIRST_OPS))
    ap.add_argument("--full", action="store_true", help="check's --full plan")
    ap.add_argument("--detail", action="store_true", help="list every specialisation")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--json", help="also write the raw records here")
    ap.add_argument("--ahead", type=int, default=0, metavar="N",
                    help="dry-run first with the kernels compiling in N threads (first: "
                    "ssm_kernels.compile_ahead's; check: check's own)")
    args = ap.parse_args(argv)
    if args.ahead:
        os.environ["COMPILE_AUDIT_AHEAD"] = str(args.ahead)
    if args.what == "threads":
        for op in args.ops.split(","):
            threads_probe(args.n, op)
        return 0
    units = (args.families if args.what == "check" else args.ops).split(",")
    totals, raw = [], {}
    for u in units:
        res = spawn(args.what, u, args.full)
        raw[u] = res
        totals.append((u, *table(u, res, args.detail), res["wall"]))
    print(f"\n## totals ({args.what}{' --full' if args.full else ''}, this host, cold cache)")
    print("CPU columns are thread CPU seconds (insensitive to other load on the host): all of a "
          "compile's thread, and the part outside the backend stages (Python front end, holds the "
          "GIL); ptxas CPU (exact without --ahead); longest = one kernel's CPU incl. its ptxas")
    print("| unit | compiles | compile s | ptxas s | longest compile s | C launchers | CPU s "
          "| ptxas CPU s | GIL CPU s | longest CPU s | wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for u, n, tot, px, mx, nl, cpu, gil, mxc, pxc, wall in totals:
        print(f"| {u} | {n} | {tot:.1f} | {px:.1f} | {mx:.1f} | {nl or '-'} | {cpu:.2f} "
              f"| {pxc:.2f} | {gil:.2f} | {mxc:.2f} | {wall:.1f} |")
    print(f"| all | {sum(t[1] for t in totals)} | {sum(t[2] for t in totals):.1f} "
          f"| {sum(t[3] for t in totals):.1f} | | {sum(t[5] for t in totals) or '-'} "
          f"| {sum(t[6] for t in totals):.2f} | {sum(t[9] for t in totals):.2f} "
          f"| {sum(t[7] for t in totals):.2f} | | {sum(t[10] for t in totals):.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
