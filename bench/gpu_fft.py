"""GPU check + benchmark of fft_conv (issue 11). Self-contained, < 4 minutes on an H200:

    python bench/gpu_fft.py            # OUT=/some/dir also writes gpu_fft.csv there

(a) correctness: the cuFFT path (fp32, bf16) and the Monarch path (bf16, on-chip sizes), forward
    and every gradient (u, k, D, pre_gate, post_gate) against float64 torch.fft on the GPU at
    L in {1000, 1024, 4096, 8191, 16384, 65536, 2^20}; the backward twice, compared bitwise; a
    CUDA-graph capture with a cached filter spectrum replayed after an in-place filter update.
(b) path crossover for 16-bit storage: Monarch vs cuFFT path, fwd and fwd+bwd, L = 512..4096
    (prints the MONARCH_MAX_N table that the measurements imply).
(c) the issue's table, gates off, D on: ours (auto), ours forced onto the cuFFT path, torch rfft
    conv (fft_conv_ref: rfft / multiply / irfft / D in eager torch) and torch.compile of it, same
    process, triton.testing.do_bench medians, fwd and fwd+bwd; the filter cache on and off at
    B = 1; first-call time of a fresh shape.
Exit status 1 if any check fails. The table is printed last.
FFT_BENCH_SMOKE=1 runs the same code on the CPU (Triton interpreter) at toy sizes: a dry run only.
"""
from __future__ import annotations

import csv
import os
import sys
import time

SMOKE = os.environ.get("FFT_BENCH_SMOKE", "0") == "1"
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ssm_kernels as sk  # noqa: E402
from ssm_kernels.fft_conv import cufft as fc  # noqa: E402
from ssm_kernels.fft_conv import interface as fi  # noqa: E402
from ssm_kernels.fft_conv.reference import fft_conv_ref  # noqa: E402
from ssm_kernels.testing import compare  # noqa: E402

DEV = "cpu" if SMOKE else "cuda"
FAILS: list = []
ROWS: list = []  # dicts for the CSV
T0 = time.time()
NAMES = ["y", "du", "dk", "dD", "dpre", "dpost"]


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


class force:
    def __init__(self, path):
        self.path = path

    def __enter__(self):
        self.saved = fi.FORCE_PATH
        fi.FORCE_PATH = self.path

    def __exit__(self, *exc):
        fi.FORCE_PATH = self.saved


def make(B, H, L, dtype, gates=True, D=True, grad=False, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=DEV, generator=g)  # noqa: E731
    u = r(B, H, L).to(dtype)
    k = r(H, L) / L ** 0.5
    d = r(H) if D else None
    pg = r(B, H, L).to(dtype) if gates else None
    qg = r(B, H, L).to(dtype) if gates else None
    ins = [u, k, d, pg, qg]
    if grad:
        ins = [None if x is None else x.requires_grad_() for x in ins]
    return ins


def fwd_bwd(fn, ins, cot, **kw):
    ins = [None if x is None else x.detach().requires_grad_() for x in ins]
    y = fn(ins[0], ins[1], ins[2], pre_gate=ins[3], post_gate=ins[4], **kw)
    live = [x for x in ins if x is not None]
    gs = iter(torch.autograd.grad(y, live, cot.to(y.dtype)))
    return [y.detach()] + [None if x is None else next(gs) for x in ins]


# ---- (a) correctness ---------------------------------------------------------------------------

def check(path, B, H, L, dtype):
    ins = make(B, H, L, dtype, seed=L)
    cot = torch.randn(B, H, L, device=DEV, dtype=torch.float64)
    with force(path):
        out = fwd_bwd(sk.fft_conv, ins, cot, backend="triton")
        again = fwd_bwd(sk.fft_conv, ins, cot, backend="triton")
    ref = fwd_bwd(fft_conv_ref, [None if x is None else x.double() for x in ins], cot)
    lowp = fwd_bwd(fft_conv_ref, ins, cot.to(dtype)) if dtype != torch.float32 else [None] * 6
    worst = []
    for i, name in enumerate(NAMES):
        v = compare(f"{path} {str(dtype)[6:]} B={B} H={H} L={L} {name}", out[i], ref[i], dtype, lowp[i])
        worst.append(v.err / v.bound)
        if not v.ok:
            FAILS.append(str(v))
            log("FAIL", v)
        if not torch.equal(out[i], again[i]):
            FAILS.append(f"{v.name}: not bitwise deterministic")
            log("FAIL nondeterministic", v.name)
    log(f"check {path:7s} {str(dtype)[6:]:8s} B={B} H={H} L={L}: worst err/bound {max(worst):.2f}")
    ROWS.append(dict(section="check", case=f"B={B} H={H} L={L}", impl=path, mode="fwd+bwd",
                     dtype=str(dtype)[6:], value=max(worst), unit="err/bound"))


def check_graph(path="cufft", dtype=torch.float32):
    """A cached spectrum exists at capture; the capture recomputes it inside the graph, so a
    replay after an in-place filter update uses the new filter."""
    fc.clear_filter_cache()
    u, k, D, _, _ = make(2, 16, 1000, dtype, gates=False)
    with force(path):
        sk.fft_conv(u, k, D)
        torch.cuda.synchronize()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            sk.fft_conv(u, k, D)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = sk.fft_conv(u, k, D)
        with torch.no_grad():
            k.mul_(-3.0)
        g.replay()
        torch.cuda.synchronize()
    v = compare(f"{path} graph replay after in-place filter update", y,
                fft_conv_ref(u.double(), k.double(), D.double()), dtype,
                None if dtype == torch.float32 else fft_conv_ref(u, k, D))
    log(v)
    if not v.ok:
        FAILS.append(str(v))


# ---- timing ------------------------------------------------------------------------------------

def bench(fn, rep=50):
    if SMOKE:
        t = time.time()
        fn()
        return (time.time() - t) * 1e3
    import triton
    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


def kinfo(kern):
    """'regs/spill bytes' of a compiled Triton kernel ('-' for none or in smoke runs)."""
    if kern is None or SMOKE:
        return "-"
    return f"{getattr(kern, 'n_regs', '?')}/{getattr(kern, 'n_spills', '?')}"


def time_fwd_fb(f, ins, dy):
    """(forward ms without grad, forward + backward ms through autograd.grad) of f(u, k, D, pre,
    post) on ins (None for absent operands) with the cotangent dy."""
    insg = [None if x is None else x.detach().requires_grad_() for x in ins]
    live = [x for x in insg if x is not None]
    with torch.no_grad():
        fwd = bench(lambda: f(*ins))
    return fwd, bench(lambda: torch.autograd.grad(f(*insg), live, dy))


def plan_rows(plan, size, time_torch, torch_ms, t0, budget_s, only=()):
    """(L0, gates, L, name) per row of plan [(L0, gates, names)] (L = size(L0): the smoke size in
    smoke runs); torch's (fwd, f+b) timed once per (L0, gates) into torch_ms (time_torch(L,
    gates)); rows that would start past budget_s after t0 are skipped (logged); `only`: those L0."""
    for L0, gates, names in plan:
        if only and L0 not in only:
            continue
        L = size(L0)
        if (L0, gates) not in torch_ms:
            torch_ms[(L0, gates)] = time_torch(L, gates)
            log(f"torch L={L0} gates={int(gates)}: fwd {torch_ms[(L0, gates)][0]:.4f} "
                f"f+b {torch_ms[(L0, gates)][1]:.4f}")
        for name in names:
            if time.time() - t0 > budget_s:
                log(f"budget: skipping L={L0} gates={int(gates)} {name}")
                continue
            yield L0, gates, L, name


def time_case(B, H, L, dtype, impls, modes, label):
    ins = make(B, H, L, dtype, gates=False)
    ins_g = make(B, H, L, dtype, gates=False, grad=True)
    dy = torch.randn(B, H, L, device=DEV).to(dtype)
    res = {}
    for name, f, path in impls:
        for mode in modes:
            try:
                with force(path):  # the backward reads the forced path too
                    if mode == "fwd":
                        with torch.no_grad():
                            ms = bench(lambda: f(*ins))
                    else:
                        live = [x for x in ins_g if x is not None]
                        ms = bench(lambda: torch.autograd.grad(f(*ins_g), live, dy))
            except Exception as e:  # noqa: BLE001
                log(f"  {name} {mode}: {type(e).__name__}: {str(e)[:200]}")
                ms = float("nan")
            res[(name, mode)] = ms
            ROWS.append(dict(section=label, case=f"B={B} H={H} L={L}", impl=name, mode=mode,
                             dtype=str(dtype)[6:], value=ms, unit="ms"))
            log(f"  {label} B={B} H={H} L={L} {str(dtype)[6:]} {name} {mode}: {ms:.4f} ms")
    return res


def ours(u, k, D, p, q):
    return sk.fft_conv(u, k, D, pre_gate=p, post_gate=q, backend="triton")


def ref(u, k, D, p, q):
    return fft_conv_ref(u, k, D, pre_gate=p, post_gate=q)


def main():
    S = (lambda *a: a[-1]) if not SMOKE else (lambda *a: a[0])  # full size / smoke size
    sync = torch.cuda.synchronize if not SMOKE else (lambda: None)
    log(torch.cuda.get_device_name() if not SMOKE else "cpu (smoke)", "torch", torch.__version__)
    # first call (fresh process: Triton compile of the glue kernels + cuFFT plans)
    u, k, D, _, _ = make(S(2, 8), S(3, 768), S(300, 4096), torch.float32, gates=False)
    sync()
    t = time.time()
    sk.fft_conv(u, k, D)
    sync()
    first = time.time() - t
    log(f"first call fp32 B=8 H=768 L=4096 (compile + plans): {first:.2f} s")
    ROWS.append(dict(section="first call", case="B=8 H=768 L=4096", impl="ours", mode="fwd",
                     dtype="float32", value=first * 1e3, unit="ms"))
    del u, k, D

    # (a)
    for dtype in (torch.float32, torch.bfloat16):
        for L in S((100, 257), (1000, 1024, 4096, 8191, 16384, 65536)):
            check("cufft", 2, S(3, 64), L, dtype)
        check("cufft", 1, 4, S(1000, 1 << 20), dtype)
    for L in S((100,), (1000, 1024, 4096)):
        check("monarch", 2, S(3, 64), L, torch.bfloat16)
    if not SMOKE:
        check_graph()

    # (b) crossover for 16-bit storage (Monarch's forward on-chip up to n = 8192, backward 2048)
    best = {"fwd": 0, "bwd": 0}
    for L in S((64, 128), (512, 1024, 2048, 4096)):
        r = time_case(S(2, 8), S(3, 768), L, torch.bfloat16, [("monarch", ours, "monarch"), ("cufft", ours, "cufft")],
                      ("fwd", "fwd+bwd") if L <= 1024 else ("fwd",), "crossover")
        n = max(256, 1 << (2 * L - 2).bit_length())
        if r[("monarch", "fwd")] < r[("cufft", "fwd")]:
            best["fwd"] = n
        if L <= 1024 and r[("monarch", "fwd+bwd")] - r[("monarch", "fwd")] < r[("cufft", "fwd+bwd")] - r[("cufft", "fwd")]:
            best["bwd"] = n
    log(f"measured MONARCH_MAX_N for bf16: fwd {best['fwd']}, bwd {best['bwd']} "
        f"(in the code: fwd {fi.MONARCH_MAX_N[('fwd', torch.bfloat16)]}, bwd {fi.MONARCH_MAX_N[('bwd', torch.bfloat16)]})")

    # (c) the table
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    comp = torch.compile(ref, dynamic=False)
    table = []
    grid = [(8, 768, 1024, ("fwd", "fwd+bwd")), (8, 768, 4096, ("fwd", "fwd+bwd")),
            (4, 768, 16384, ("fwd", "fwd+bwd")), (1, 768, 262144, ("fwd",))]
    if SMOKE:
        grid = [(2, 3, 100, ("fwd", "fwd+bwd")), (1, 3, 1000, ("fwd",))]
    for B, H, L, modes in grid:
        for dtype in (torch.float32, torch.bfloat16):
            impls = [("ours", ours, None), ("ours[cufft]", ours, "cufft"), ("torch.fft", ref, None)]
            r = time_case(B, H, L, dtype, impls, modes, "table")
            if time.time() - T0 < 170 and not SMOKE:
                r.update(time_case(B, H, L, dtype, [("compile", comp, None)], ("fwd",), "table"))
            table.append((B, H, L, dtype, r))
            if not SMOKE:
                torch.cuda.empty_cache()
    # the filter cache at B = 1 (the filter transform is half the work)
    fc.set_filter_cache(False)
    r_off = time_case(1, S(3, 768), S(1000, 262144), torch.float32, [("ours[no cache]", ours, "cufft")], ("fwd",), "cache")
    fc.set_filter_cache(True)

    # ---- summary (last) ----
    print("\n==== fft_conv, H200, gates off, D on (ms, do_bench median) ====")
    print(f"{'case':28s} {'ours fwd':>9s} {'[cufft]':>8s} {'torch':>8s} {'compile':>8s} {'x torch':>7s} | "
          f"{'ours f+b':>9s} {'[cufft]':>8s} {'torch':>8s} {'x torch':>7s}")
    for B, H, L, dtype, r in table:
        g = lambda n, m: r.get((n, m), float("nan"))  # noqa: E731
        print(f"B={B} H={H} L={L} {str(dtype)[6:]:8s}"[:28].ljust(28),
              f"{g('ours', 'fwd'):9.3f} {g('ours[cufft]', 'fwd'):8.3f} {g('torch.fft', 'fwd'):8.3f} "
              f"{g('compile', 'fwd'):8.3f} {g('torch.fft', 'fwd') / g('ours', 'fwd'):7.2f} | "
              f"{g('ours', 'fwd+bwd'):9.3f} {g('ours[cufft]', 'fwd+bwd'):8.3f} {g('torch.fft', 'fwd+bwd'):8.3f} "
              f"{g('torch.fft', 'fwd+bwd') / g('ours', 'fwd+bwd'):7.2f}")
    print(f"B=1 L=262144 fp32 fwd without the filter cache: {r_off[('ours[no cache]', 'fwd')]:.3f} ms")
    print(f"bf16 crossover: Monarch faster up to n = fwd {best['fwd']} / bwd {best['bwd']} "
          f"(code: {fi.MONARCH_MAX_N[('fwd', torch.bfloat16)]} / {fi.MONARCH_MAX_N[('bwd', torch.bfloat16)]})")
    return finish(first, ROWS, "gpu_fft.csv")


def finish(first, rows, csv_name):
    """The closing lines (first call, total time, check verdicts) and the CSV under $OUT; exit status
    1 if any check failed. gpu_monarch.py ends through this too."""
    print(f"first call: {first:.2f} s;  total {time.time() - T0:.0f} s;  checks: "
          f"{'ALL OK' if not FAILS else f'{len(FAILS)} FAILED'}")
    for f in FAILS:
        print("  FAIL", f)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, csv_name), "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["section", "case", "impl", "mode", "dtype", "value", "unit"])
            w.writeheader()
            w.writerows(rows)
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
