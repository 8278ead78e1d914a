"""GPU check + benchmark of the on-chip 16-bit Monarch forward and backward (fft_conv/monarch16.py,
issue 11).

    python bench/gpu_monarch.py          # ~4-6 minutes on an H200; OUT=/dir writes gpu_monarch.csv

(a) correctness against float64 torch.fft on the GPU, B=8 H=768, bf16 and fp16, D and both
    gates on, L in {1024, 2048, 4096} (Lk = L: N = 2048 / 4096 / 8192) plus L=4095 Lk=1000
    (odd, short filter) and L=3000 Lk=5 (L > N/2: full first / last product); the repo's rule
    (err <= 2x the error of torch.fft fed the same 16-bit inputs + floor); the forward twice
    (bitwise); the monarch16 BACKWARD at the same sizes (du, dk, dD, dpre, dpost vs float64,
    bitwise repeat) plus B=3 H=50 (odd B, H not a multiple of 16); through autograd with
    MONARCH16 = True (monarch16 backward) and with MONARCH16_BWD_CUFFT (cuFFT backward); a
    CUDA-graph capture with a cached filter replayed after an in-place filter update.
(b) launch sweep (num_warps, num_stages) per N, forward and backward: prints the best; registers
    / spills / shared memory of the compiled kernel at each N.
(c) the table, gates off, D on (the issue's setting) and gates on: monarch16, our cuFFT path,
    the old Monarch kernels, torch rfft conv (fft_conv_ref) and torch.compile of it, fwd
    (do_bench median); the backward op alone (monarch16 / cuFFT); fwd+bwd with MONARCH16 on
    (monarch16 backward), with MONARCH16_BWD_CUFFT (cuFFT backward), all-cuFFT and torch; GB/s
    of the forward against the minimal bytes (u, gates, y once); first call of a fresh shape.
(d) PARTS=d only (not in the default abc): the DEFAULT path (no flags) checked through autograd vs
    float64 (bf16 gates off / on, fp16, fp32 gates off / on; L = 1024 / 2048 / 4096) and timed
    against torch at B=8 H=768: fwd, f+b as do_bench, host time per call, GPU kernel time per call
    (torch.profiler) and kernels per call, CUDA-graph replay (~200 s with its compiles).
Exit status 1 if any check fails. The table is printed last. PARTS=ab / PARTS=c (default abc)
runs only those sections (to stay under a 10-minute limit: the backward added ~3 minutes).
FFT_BENCH_SMOKE=1: the same code on the CPU (Triton interpreter) at toy sizes (a dry run).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_fft as G  # noqa: E402  (sets TRITON_INTERPRET for smoke runs before triton loads)
from gpu_fft import SMOKE, bench, force, fwd_bwd, log, make, ours, ref  # noqa: E402

import torch  # noqa: E402

import ssm_kernels as sk  # noqa: E402
from ssm_kernels.benchmarks.harness import capture  # noqa: E402
from ssm_kernels.fft_conv import interface as fi  # noqa: E402
from ssm_kernels.fft_conv import monarch16 as m16  # noqa: E402
from ssm_kernels.fft_conv.reference import fft_conv_ref  # noqa: E402
from ssm_kernels.testing import compare, rel_err  # noqa: E402

DEV = G.DEV
FAILS = G.FAILS
ROWS: list = []
S = (lambda *a: a[-1]) if not SMOKE else (lambda *a: a[0])  # full size / smoke size
sync = torch.cuda.synchronize if not SMOKE else (lambda: None)
PARTS = os.environ.get("PARTS", "abc")


def fail(msg):
    FAILS.append(msg)
    log("FAIL", msg)


def make_lk(B, H, L, Lk, dtype, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=DEV, generator=g)  # noqa: E731
    return [r(B, H, L).to(dtype), r(H, Lk) / Lk ** 0.5, r(H), r(B, H, L).to(dtype), r(B, H, L).to(dtype)]


# ---- (a) correctness ---------------------------------------------------------------------------

def check_fwd(B, H, L, Lk, dtype):
    ins = make_lk(B, H, L, Lk, dtype, seed=L + Lk)
    u, k, D, pg, qg = ins
    with force("monarch16"):
        y = sk.fft_conv(u, k, D, pre_gate=pg, post_gate=qg, backend="triton")
        y2 = sk.fft_conv(u, k, D, pre_gate=pg, post_gate=qg, backend="triton")
    hi = fft_conv_ref(*(x.double() for x in (u, k, D)), pre_gate=pg.double(), post_gate=qg.double())
    lowp = fft_conv_ref(u, k, D, pre_gate=pg, post_gate=qg)
    v = compare(f"monarch16 fwd {str(dtype)[6:]} B={B} H={H} L={L} Lk={Lk}", y, hi, dtype, lowp)
    log(v, f"(torch.fft on the 16-bit inputs: {rel_err(lowp, hi):.3e})")
    if not v.ok:
        fail(str(v))
    if not torch.equal(y, y2):
        fail(f"{v.name}: not bitwise repeatable")
    ROWS.append(dict(section="check", case=f"B={B} H={H} L={L} Lk={Lk}", impl="monarch16",
                     mode="fwd", dtype=str(dtype)[6:], value=v.err, unit="rel err"))
    ROWS.append(dict(section="check", case=f"B={B} H={H} L={L} Lk={Lk}", impl="torch.fft 16-bit",
                     mode="fwd", dtype=str(dtype)[6:], value=rel_err(lowp, hi), unit="rel err"))
    return v.err, rel_err(lowp, hi)


def check_bwd(B, H, L, Lk, dtype, gates=True):
    """The monarch16 backward op (forced) vs float64: every gradient; bitwise repeat."""
    u, k, D, pg, qg = make_lk(B, H, L, Lk, dtype, seed=3 * L + Lk)
    if not gates:
        pg = qg = None
    ins = [u, k, D, pg, qg]
    dy = torch.randn(B, H, L, device=DEV).to(dtype)
    with force("monarch16"):
        got = fi.fft_conv_bwd_op(dy, u, k, D, pg, qg, "triton")
        got2 = fi.fft_conv_bwd_op(dy, u, k, D, pg, qg, "triton")
    hi = fwd_bwd(fft_conv_ref, [None if x is None else x.double() for x in ins], dy.double())
    lowp = fwd_bwd(fft_conv_ref, ins, dy)
    worst = 0.0
    case = f"{str(dtype)[6:]} B={B} H={H} L={L} Lk={Lk} gates={int(gates)}"
    # op order (du, dk, dD, dpre, dpost) vs NAMES (y, du, dk, dD, dpre, dpost)
    for j, name in enumerate(G.NAMES[1:]):
        if hi[j + 1] is None:
            continue
        v = compare(f"monarch16 bwd {case} {name}", got[j], hi[j + 1], dtype, lowp[j + 1])
        log(v, f"(torch.fft 16-bit: {rel_err(lowp[j + 1], hi[j + 1]):.3e})")
        if not v.ok:
            fail(str(v))
        worst = max(worst, v.err)
        ROWS.append(dict(section="check", case=f"{case} {name}", impl="monarch16 bwd", mode="bwd",
                         dtype=str(dtype)[6:], value=v.err, unit="rel err"))
    for a, b in zip(got, got2):
        if not torch.equal(a, b):
            fail(f"monarch16 bwd {case}: not bitwise repeatable")
            break
    return worst


def check_autograd(B, H, L, dtype, bwd_cufft):
    """MONARCH16 = True through autograd: forward on monarch16, backward on monarch16 (or on the
    cuFFT path with MONARCH16_BWD_CUFFT)."""
    ins = make(B, H, L, dtype, seed=7)
    cot = torch.randn(B, H, L, device=DEV, dtype=torch.float64)
    old = fi.MONARCH16, fi.MONARCH16_BWD_CUFFT
    fi.MONARCH16, fi.MONARCH16_BWD_CUFFT = True, bwd_cufft
    try:
        assert fi.triton_path("fwd", ins[0], L) == "monarch16"
        assert fi.triton_path("bwd", ins[0], L) == ("cufft" if bwd_cufft else "monarch16")
        out = fwd_bwd(sk.fft_conv, ins, cot, backend="triton")
    finally:
        fi.MONARCH16, fi.MONARCH16_BWD_CUFFT = old
    hi = fwd_bwd(fft_conv_ref, [x.double() for x in ins], cot)
    lowp = fwd_bwd(fft_conv_ref, ins, cot.to(dtype))
    tag = "cuFFT bwd" if bwd_cufft else "monarch16 bwd"
    for i, name in enumerate(G.NAMES):
        v = compare(f"MONARCH16 on ({tag}): {str(dtype)[6:]} B={B} H={H} L={L} {name}", out[i],
                    hi[i], dtype, lowp[i])
        log(v)
        if not v.ok:
            fail(str(v))


# ---- (b) launch sweep --------------------------------------------------------------------------

# (warps, stages[, maxnreg]) tried per N. Forward: the maxnreg caps trade a few spills for more
# programs per SM (offline sm_90 builds: N=2048 (4,1,128) 28 B spill -> 4 per SM; N=4096 (4,1,168)
# 44 B -> 3 per SM, (8,1,128) 348 B -> 2; N=8192 (8,1,128) 752 B -> 2). Backward: 255 registers
# at 8 warps already spill 0.3-1.3 KB (N=4096 / 8192), so no caps; 16 warps caps at 128 (more
# spill, more overlap).
SWEEP = {"fwd": {2048: ((4, 1), (8, 1), (4, 1, 128), (4, 1, 168), (4, 2)),
                 4096: ((8, 1), (4, 1), (4, 1, 168), (8, 1, 128), (16, 1)),
                 8192: ((8, 1), (16, 1), (8, 1, 128), (8, 2), (4, 1))},
         "bwd": {2048: ((4, 1), (8, 1)), 4096: ((8, 1), (4, 1), (16, 1)),
                 8192: ((8, 1), (16, 1), (4, 1))}}


def sweep(L, mode="fwd", dtype=torch.bfloat16):
    """Times monarch16's forward (mode "fwd") or backward op ("bwd") at N(L), gates off, D on,
    for each launch configuration of SWEEP; leaves the best in LAUNCH / LAUNCH_BWD."""
    n = m16.transform_size(L, L)
    u, k, D, _, _ = make(S(2, 8), S(3, 768), L, dtype, gates=False)
    dy = torch.randn_like(u)
    table = m16.LAUNCH if mode == "fwd" else m16.LAUNCH_BWD
    saved = table.get(n)
    best = None
    for cfg in S(((1, 1),), SWEEP[mode].get(n, ((4, 1), (8, 1)))):
        table[n] = cfg
        try:
            with force("monarch16"), torch.no_grad():
                if mode == "fwd":
                    ms = bench(lambda: sk.fft_conv(u, k, D, backend="triton"))
                else:
                    ms = bench(lambda: fi.fft_conv_bwd_op(dy, u, k, D, None, None, "triton"))
            kern = m16.last_kernel if mode == "fwd" else m16.last_bwd_kernel
            info = (f"regs {getattr(kern, 'n_regs', '?')} spills {getattr(kern, 'n_spills', '?')} "
                    f"shared {kern.metadata.shared}") if kern is not None and not SMOKE else ""
        except Exception as e:  # noqa: BLE001
            ms, info = float("nan"), f"{type(e).__name__}: {str(e)[:120]}"
        log(f"  {mode} sweep N={n} warps/stages {cfg}: {ms:.4f} ms  {info}")
        ROWS.append(dict(section="sweep", case=f"N={n} {cfg}", impl="monarch16", mode=mode,
                         dtype=str(dtype)[6:], value=ms, unit="ms"))
        if ms == ms and (best is None or ms < best[0]):
            best = (ms, cfg)
    table[n] = best[1] if best else saved
    return n, best


# ---- (c) table ---------------------------------------------------------------------------------

def time_fwd(name, f, path, ins):
    try:
        with force(path), torch.no_grad():
            ms = bench(lambda: f(*ins))
    except Exception as e:  # noqa: BLE001
        log(f"  {name}: {type(e).__name__}: {str(e)[:200]}")
        ms = float("nan")
    return ms


def time_fwd_bwd(f, ins, dy, monarch16_on, bwd_cufft=False):
    ins = [None if x is None else x.detach().requires_grad_() for x in ins]
    live = [x for x in ins if x is not None]
    old = fi.MONARCH16, fi.MONARCH16_BWD_CUFFT
    fi.MONARCH16, fi.MONARCH16_BWD_CUFFT = monarch16_on, bwd_cufft
    try:
        return bench(lambda: torch.autograd.grad(f(*ins), live, dy))
    except Exception as e:  # noqa: BLE001
        log(f"  f+b: {type(e).__name__}: {str(e)[:200]}")
        return float("nan")
    finally:
        fi.MONARCH16, fi.MONARCH16_BWD_CUFFT = old


def time_bwd(path, ins, dy):
    """The backward op alone on one path (its output is what autograd's backward returns)."""
    try:
        with force(path):
            return bench(lambda: fi.fft_conv_bwd_op(dy, *ins, "triton"))
    except Exception as e:  # noqa: BLE001
        log(f"  bwd {path}: {type(e).__name__}: {str(e)[:200]}")
        return float("nan")


# ---- (d) the defaults (no flags), where the f+b time goes, fp32 --------------------------------

def check_default(B, H, L, dtype, gates):
    """The default path (no FORCE_PATH, no flags) through autograd vs float64: every output."""
    ins = make(B, H, L, dtype, gates=gates, seed=11)
    cot = torch.randn(B, H, L, device=DEV, dtype=torch.float64)
    out = fwd_bwd(sk.fft_conv, ins, cot, backend="triton")
    hi = fwd_bwd(fft_conv_ref, [None if x is None else x.double() for x in ins], cot)
    lowp = fwd_bwd(fft_conv_ref, ins, cot.to(dtype)) if dtype != torch.float32 else [None] * 6
    worst = 0.0
    for i, name in enumerate(G.NAMES):
        if hi[i] is None:
            continue
        v = compare(f"default {str(dtype)[6:]} B={B} H={H} L={L} gates={int(gates)} {name}",
                    out[i], hi[i], dtype, lowp[i])
        worst = max(worst, v.err / v.bound)
        if not v.ok:
            fail(str(v))
    log(f"  default-path check {str(dtype)[6:]} L={L} gates={int(gates)}: worst err/bound {worst:.2f}")
    return worst


def host_ms(fn, calls=30):
    """Host time per call: the Python / dispatch / launch cost, timed without synchronising (the
    GPU lags behind; the queue of ~300 launches does not fill)."""
    if SMOKE:
        return bench(fn)
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    t = time.perf_counter() - t
    sync()
    return t / calls * 1e3


def gpu_ms(fn, calls=5):
    """(GPU busy time per call = the sum of its kernels' durations, kernels per call), from
    torch.profiler: what the call costs the GPU when the host keeps up."""
    if SMOKE:
        return float("nan"), float("nan")
    from torch.autograd import DeviceType
    try:
        fn()
        sync()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            sync()
        ev = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        return sum(e.time_range.elapsed_us() for e in ev) / calls / 1e3, len(ev) / calls
    except Exception as e:  # noqa: BLE001
        log(f"  profiler: {type(e).__name__}: {str(e)[:160]}")
        return float("nan"), float("nan")


def graph_ms(fn):
    """do_bench of a CUDA-graph replay of fn (no host cost: the GPU floor of the eager call). The
    filter-spectrum cache does not store under capture, so the graph recomputes the filter's
    spectrum on every replay (a small extra)."""
    if SMOKE:
        return float("nan")
    try:
        g = capture(fn)
        ms = bench(g.replay)
        del g
        return ms
    except Exception as e:  # noqa: BLE001
        log(f"  graph capture: {type(e).__name__}: {str(e)[:160]}")
        return float("nan")


def time_default(B, H, L, dtype, gates):
    """Default path vs torch rfft conv: fwd; f+b as do_bench, host time, GPU kernel time (and
    kernels per call), CUDA-graph replay."""
    ins = make(B, H, L, dtype, gates=gates)
    dy = torch.randn(B, H, L, device=DEV).to(dtype)
    insg = [None if x is None else x.detach().requires_grad_() for x in ins]
    live = [x for x in insg if x is not None]
    r = {"path": f"{fi.triton_path('fwd', ins[0], L)}/{fi.triton_path('bwd', ins[0], L, gates)}"}
    for name, f in (("ours", ours), ("torch", ref)):
        with torch.no_grad():
            r[f"{name} fwd"] = bench(lambda: f(*ins))
        fb = lambda: torch.autograd.grad(f(*insg), live, dy)  # noqa: E731
        r[f"{name} f+b"] = bench(fb)
        r[f"{name} host"] = host_ms(fb)
        r[f"{name} gpu"], r[f"{name} kernels"] = gpu_ms(fb)
        r[f"{name} graph"] = graph_ms(fb)
    # host-time split of ours: the forward alone (no autograd) and the backward's implementation
    # alone (what autograd's backward node runs); f+b host - both = autograd + fft_conv's wrapper
    with torch.no_grad():
        r["ours fwd host"] = host_ms(lambda: ours(*ins))
    from ssm_kernels import _launch
    _launch.set_enabled(False)   # the launch cache's share of the host time
    try:
        r["ours host nocache"] = host_ms(lambda: torch.autograd.grad(ours(*insg), live, dy))
    finally:
        _launch.set_enabled(True)
    k32, d32 = ins[1], ins[2]
    r["ours bwd host"] = host_ms(lambda: fi._conv_bwd(dy, ins[0], k32, d32, ins[3], ins[4], "triton"))
    # the backward op on each path (16-bit): the data behind MONARCH16_BWD_CUFFT_POST_N
    nan = float("nan")
    m16_ok = dtype != torch.float32 and m16.supports(L, L)
    r["bwd m16"] = time_bwd("monarch16", ins, dy) if m16_ok else nan
    r["bwd cufft"] = time_bwd("cufft", ins, dy) if m16_ok else nan
    return r


def part_d(B, H):
    """Checks of the default path, then the table rows (returned)."""
    rows = []
    cases = S([(200, torch.bfloat16, False), (200, torch.bfloat16, True), (100, torch.float32, False)],
              [(L, dt, g) for L in (1024, 2048, 4096)
               for dt, g in ((torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, False),
                             (torch.float32, False), (torch.float32, True))])
    for L, dtype, gates in cases:
        check_default(S(3, 4), S(5, 300), L, dtype, gates)  # H = 300: one slice per channel (as H = 768)
    for L, dtype, gates in cases:
        if dtype == torch.float16 and L == 2048:
            continue
        r = time_default(B, H, L, dtype, gates)
        rows.append((L, dtype, gates, r))
        log(f"  default L={L} {str(dtype)[6:]} gates={int(gates)}: " +
            ", ".join(f"{a} {b:.4f}" if isinstance(b, float) else f"{a} {b}" for a, b in r.items()))
        for key, val in r.items():
            if isinstance(val, float):
                ROWS.append(dict(section="default", case=f"B={B} H={H} L={L} gates={int(gates)}",
                                 impl=key, mode="f+b" if key.split()[-1] != "fwd" else "fwd",
                                 dtype=str(dtype)[6:], value=val,
                                 unit="kernels" if key.endswith("kernels") else "ms"))
        if not SMOKE:
            torch.cuda.empty_cache()
    return rows


def print_d(B, H, rows):
    print(f"\n==== defaults (no flags), B={B} H={H}, D on (ms; f+b = fwd + autograd.grad; host = "
          f"Python+launch time per call unsynchronised; gpu = sum of kernel times (kernels/call); "
          f"graph = CUDA-graph replay; host fwd / bwd: ours' forward alone / backward implementation "
          f"alone) ====")
    print(f"{'case':22s} {'path f/b':18s} {'fwd':>6s} {'torch':>6s} {'x':>5s} | {'f+b':>6s} {'host':>6s} "
          f"{'gpu':>6s} {'#k':>4s} {'graph':>6s} | {'torch':>6s} {'host':>6s} {'gpu':>6s} {'#k':>4s} "
          f"{'graph':>6s} | {'x f+b':>5s} {'x graph':>7s} | {'host fwd':>8s} {'host bwd':>8s} | "
          f"{'bwd m16':>7s} {'bwd cufft':>9s} | {'host, launch cache off':>22s}")
    for L, dtype, gates, r in rows:
        print(f"L={L} {str(dtype)[6:]} g={'on' if gates else 'off'}".ljust(22), r["path"].ljust(18),
              f"{r['ours fwd']:6.3f} {r['torch fwd']:6.3f} {r['torch fwd'] / r['ours fwd']:5.2f} | "
              f"{r['ours f+b']:6.3f} {r['ours host']:6.3f} {r['ours gpu']:6.3f} {r['ours kernels']:4.0f} "
              f"{r['ours graph']:6.3f} | {r['torch f+b']:6.3f} {r['torch host']:6.3f} {r['torch gpu']:6.3f} "
              f"{r['torch kernels']:4.0f} {r['torch graph']:6.3f} | {r['torch f+b'] / r['ours f+b']:5.2f} "
              f"{r['torch graph'] / r['ours graph']:7.2f} | {r['ours fwd host']:8.3f} {r['ours bwd host']:8.3f} | "
              f"{r['bwd m16']:7.3f} {r['bwd cufft']:9.3f} | {r['ours host nocache']:22.3f}")
    post = [(L, r) for L, dt, g, r in rows if g and r["bwd m16"] == r["bwd m16"]]
    slower = [m16.transform_size(L, L) for L, r in post if r["bwd m16"] > r["bwd cufft"]]
    print(f"post-gated backward: monarch16 slower than cuFFT at N = {slower} -> "
          f"MONARCH16_BWD_CUFFT_POST_N should be {min(slower) if slower else 'above 8192'} "
          f"(code: {fi.MONARCH16_BWD_CUFFT_POST_N})")


def main():
    log(torch.cuda.get_device_name() if not SMOKE else "cpu (smoke)", "torch", torch.__version__)
    # first call of monarch16 (fresh process: Triton compile + tables + filter spectrum)
    u, k, D, _, _ = make(S(2, 8), S(3, 768), S(300, 4096), torch.bfloat16, gates=False)
    sync()
    t = time.time()
    with force("monarch16"):
        sk.fft_conv(u, k, D)
    sync()
    first = time.time() - t
    log(f"first call monarch16 bf16 L={u.shape[-1]}: {first:.2f} s")
    del u, k, D

    # (a)
    B, H = S(3, 8), S(5, 768)
    errs, berrs, best, best_bwd, table = {}, {}, {}, {}, []
    for dtype in (() if "a" not in PARTS else (torch.bfloat16, torch.float16)):
        for L, Lk in S(((200, 57), (130, 3)), ((1024, 1024), (2048, 2048), (4096, 4096), (4095, 1000), (3000, 5))):
            errs[(L, Lk, dtype)] = check_fwd(B, H, L, Lk, dtype)
    for dtype in (() if "a" not in PARTS else (torch.bfloat16, torch.float16)):
        for L, Lk in S(((200, 57), (130, 3)), ((1024, 1024), (2048, 2048), (4096, 4096), (4095, 1000), (3000, 5))):
            berrs[(L, Lk, dtype)] = check_bwd(B, H, L, Lk, dtype)
    if "a" in PARTS:
        berrs[(S(201, 4096), S(201, 4096), "bf16 B3 H50 no gates")] = check_bwd(
            3, S(5, 50), S(201, 4096), S(201, 4096), torch.bfloat16, gates=False)
        for bwd_cufft in (False, True):
            check_autograd(S(3, 5), S(3, 64), S(200, 4096), torch.bfloat16, bwd_cufft)
        if not SMOKE:
            G.check_graph("monarch16", torch.bfloat16)

    # (b)
    for L in (S((100,), (1024, 2048, 4096)) if "b" in PARTS else ()):
        n, b = sweep(L)
        best[n] = b
        n, b = sweep(L, "bwd")
        best_bwd[n] = b
    log(f"best launch per N: fwd {best} (code: {m16.LAUNCH}); bwd {best_bwd} (code: {m16.LAUNCH_BWD})")

    # (c)
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    comp = torch.compile(ref, dynamic=False)
    for L in (S((100, 200), (1024, 2048, 4096)) if "c" in PARTS else ()):
        for dtype, gates in ((torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, False)):
            B, H = S(2, 8), S(3, 768)
            ins = make(B, H, L, dtype, gates=gates)
            dy = torch.randn(B, H, L, device=DEV).to(dtype)
            main_row = dtype == torch.bfloat16 and not gates  # the setting: every peer
            nan = float("nan")
            r = {"monarch16": time_fwd("monarch16", ours, "monarch16", ins),
                 "cufft": time_fwd("cufft", ours, "cufft", ins),
                 "old monarch": time_fwd("old monarch", ours, "monarch", ins) if main_row else nan,
                 "torch": time_fwd("torch", ref, None, ins),
                 # torch.compile: ~10-30 s per shape; only the rows, within the time budget
                 "compile": (time_fwd("compile", comp, None, ins)
                             if main_row and not SMOKE and time.time() - G.T0 < 420 else nan),
                 "m16 bwd": time_bwd("monarch16", ins, dy),
                 "cufft bwd": time_bwd("cufft", ins, dy),
                 "m16 f+b": time_fwd_bwd(ours, ins, dy, True),
                 "m16+cufft f+b": time_fwd_bwd(ours, ins, dy, True, bwd_cufft=True),
                 "torch f+b": time_fwd_bwd(ref, ins, dy, False)}
            with force("cufft"):
                r["cufft f+b"] = time_fwd_bwd(ours, ins, dy, False)
            nbytes = (B * H * L * 2) * (2 + (2 if gates else 0)) + H * L * 4
            r["GB/s"] = nbytes / (r["monarch16"] * 1e-3) / 1e9
            table.append((B, H, L, dtype, gates, r))
            for key, val in r.items():
                ROWS.append(dict(section="table", case=f"B={B} H={H} L={L} gates={int(gates)}",
                                 impl=key, mode="f+b" if "f+b" in key else "fwd",
                                 dtype=str(dtype)[6:], value=val, unit="GB/s" if key == "GB/s" else "ms"))
            log(f"  table L={L} {str(dtype)[6:]} gates={gates}: " + ", ".join(f"{a} {b:.4f}" for a, b in r.items()))
            if not SMOKE:
                torch.cuda.empty_cache()

    drows = part_d(S(2, 8), S(3, 768)) if "d" in PARTS else []

    # ---- summary (last) ----
    if drows:
        print_d(S(2, 8), S(3, 768), drows)
    print("\n==== monarch16 accuracy vs float64 (rel err; torch.fft on the same 16-bit inputs) ====")
    for (L, Lk, dtype), (e, lo) in errs.items():
        print(f"  L={L:5d} Lk={Lk:5d} {str(dtype)[6:]:8s} monarch16 {e:.3e}   torch.fft(16-bit) {lo:.3e}")
    print("==== monarch16 backward: worst rel err over du, dk, dD, dpre, dpost (vs float64) ====")
    for (L, Lk, dtype), e in berrs.items():
        print(f"  L={L:5d} Lk={Lk:5d} {str(dtype).replace('torch.', ''):20s} {e:.3e}")
    print(f"\n==== fft_conv 16-bit, B={S(2, 8)} H={S(3, 768)}, D on (ms, do_bench median; "
          f"{torch.cuda.get_device_name() if not SMOKE else 'cpu'}) ====")
    print(f"{'case':26s} {'m16 fwd':>8s} {'cufft':>7s} {'old mon':>7s} {'torch':>7s} {'compile':>7s} "
          f"{'x torch':>7s} {'x comp':>6s} {'GB/s':>6s} | {'m16 bwd':>7s} {'cufft bwd':>9s} | "
          f"{'m16 f+b':>7s} {'m16+cufft f+b':>13s} {'cufft f+b':>9s} {'torch f+b':>9s} {'x torch':>7s}")
    for B, H, L, dtype, gates, r in table:
        print(f"L={L} {str(dtype)[6:]} gates={'on' if gates else 'off'}".ljust(26),
              f"{r['monarch16']:8.4f} {r['cufft']:7.4f} {r['old monarch']:7.4f} {r['torch']:7.4f} "
              f"{r['compile']:7.4f} {r['torch'] / r['monarch16']:7.2f} {r['compile'] / r['monarch16']:6.2f} "
              f"{r['GB/s']:6.0f} | {r['m16 bwd']:7.4f} {r['cufft bwd']:9.4f} | {r['m16 f+b']:7.4f} "
              f"{r['m16+cufft f+b']:13.4f} {r['cufft f+b']:9.4f} {r['torch f+b']:9.4f} "
              f"{r['torch f+b'] / r['m16 f+b']:7.2f}")
    print(f"best launch per N (warps, stages): fwd {best}, bwd {best_bwd}")
    return G.finish(first, ROWS, "gpu_monarch.csv")


if __name__ == "__main__":
    sys.exit(main())
