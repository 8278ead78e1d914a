"""GPU check + benchmark of the on-chip 16-bit Monarch forward (fft_conv/monarch16.py, issue 11).

    python bench/gpu_monarch.py          # ~4-6 minutes on an H200; OUT=/dir writes gpu_monarch.csv

(a) correctness against float64 torch.fft on the GPU, B=8 H=768, bf16 and fp16, D and both
    gates on, L in {1024, 2048, 4096} (Lk = L: N = 2048 / 4096 / 8192) plus L=4095 Lk=1000
    (odd, short filter) and L=3000 Lk=5 (L > N/2: full first / last product); the repo's rule
    (err <= 2x the error of torch.fft fed the same 16-bit inputs + floor); the forward twice
    (bitwise); forward (monarch16) + backward (cuFFT path) of one call through autograd (the
    mixed path of MONARCH16 = True); a CUDA-graph capture with a cached filter replayed after
    an in-place filter update.
(b) launch sweep (num_warps, num_stages) per N: prints the best; registers / spills / shared
    memory of the compiled kernel at each N.
(c) the table, gates off, D on (the issue's setting) and gates on: monarch16, our cuFFT path,
    the old Monarch kernels, torch rfft conv (fft_conv_ref) and torch.compile of it, fwd
    (do_bench median) and fwd+bwd with MONARCH16 on (backward on cuFFT); GB/s of the forward
    against the minimal bytes (u, gates, y once); first call of a fresh shape.
Exit status 1 if any check fails. The table is printed last.
FFT_BENCH_SMOKE=1: the same code on the CPU (Triton interpreter) at toy sizes (a dry run).
"""
from __future__ import annotations

import csv
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_fft as G  # noqa: E402  (sets TRITON_INTERPRET for smoke runs before triton loads)
from gpu_fft import SMOKE, bench, force, fwd_bwd, log, make, ours, ref  # noqa: E402

import torch  # noqa: E402

import ssm_kernels as sk  # noqa: E402
from ssm_kernels.fft_conv import interface as fi  # noqa: E402
from ssm_kernels.fft_conv import monarch16 as m16  # noqa: E402
from ssm_kernels.fft_conv.reference import fft_conv_ref  # noqa: E402
from ssm_kernels.testing import compare, rel_err  # noqa: E402

DEV = G.DEV
FAILS = G.FAILS
ROWS: list = []
S = (lambda *a: a[-1]) if not SMOKE else (lambda *a: a[0])  # full size / smoke size
sync = torch.cuda.synchronize if not SMOKE else (lambda: None)


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


def check_mixed(B, H, L, dtype):
    """MONARCH16 = True through autograd: forward on monarch16, backward on the cuFFT path."""
    ins = make(B, H, L, dtype, seed=7)
    cot = torch.randn(B, H, L, device=DEV, dtype=torch.float64)
    old, fi.MONARCH16 = fi.MONARCH16, True
    try:
        assert fi.triton_path("fwd", ins[0], L) == "monarch16"
        out = fwd_bwd(sk.fft_conv, ins, cot, backend="triton")
    finally:
        fi.MONARCH16 = old
    hi = fwd_bwd(fft_conv_ref, [x.double() for x in ins], cot)
    lowp = fwd_bwd(fft_conv_ref, ins, cot.to(dtype))
    for i, name in enumerate(G.NAMES):
        v = compare(f"MONARCH16 on: {str(dtype)[6:]} B={B} H={H} L={L} {name}", out[i], hi[i], dtype, lowp[i])
        log(v)
        if not v.ok:
            fail(str(v))


# ---- (b) launch sweep --------------------------------------------------------------------------

def sweep(L, dtype=torch.bfloat16):
    n = m16.transform_size(L, L)
    u, k, D, _, _ = make(S(2, 8), S(3, 768), L, dtype, gates=False)
    saved = m16.LAUNCH.get(n)
    best = None
    # (warps, stages[, maxnreg]); the maxnreg caps trade a few spills for more programs per SM
    # (offline sm_90 builds: N=2048 (4,1,128) 28 B spill -> 4 per SM; N=4096 (4,1,168) 44 B ->
    # 3 per SM, (8,1,128) 348 B -> 2; N=8192 (8,1,128) 752 B -> 2)
    cfgs = {2048: ((4, 1), (8, 1), (4, 1, 128), (4, 1, 168), (4, 2)),
            4096: ((8, 1), (4, 1), (4, 1, 168), (8, 1, 128), (16, 1)),
            8192: ((8, 1), (16, 1), (8, 1, 128), (8, 2), (4, 1))}
    for cfg in S(((1, 1),), cfgs.get(n, ((4, 1), (8, 1)))):
        m16.LAUNCH[n] = cfg
        try:
            with force("monarch16"), torch.no_grad():
                ms = bench(lambda: sk.fft_conv(u, k, D, backend="triton"))
            kern = m16.last_kernel
            info = (f"regs {getattr(kern, 'n_regs', '?')} spills {getattr(kern, 'n_spills', '?')} "
                    f"shared {kern.metadata.shared}") if kern is not None and not SMOKE else ""
        except Exception as e:  # noqa: BLE001
            ms, info = float("nan"), f"{type(e).__name__}: {str(e)[:120]}"
        log(f"  sweep N={n} warps/stages {cfg}: {ms:.4f} ms  {info}")
        ROWS.append(dict(section="sweep", case=f"N={n} {cfg}", impl="monarch16", mode="fwd",
                         dtype=str(dtype)[6:], value=ms, unit="ms"))
        if ms == ms and (best is None or ms < best[0]):
            best = (ms, cfg)
    m16.LAUNCH[n] = best[1] if best else saved
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


def time_fwd_bwd(f, ins, dy, monarch16_on):
    ins = [None if x is None else x.detach().requires_grad_() for x in ins]
    live = [x for x in ins if x is not None]
    old, fi.MONARCH16 = fi.MONARCH16, monarch16_on
    try:
        return bench(lambda: torch.autograd.grad(f(*ins), live, dy))
    finally:
        fi.MONARCH16 = old


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
    errs = {}
    for dtype in (torch.bfloat16, torch.float16):
        for L, Lk in S(((200, 57), (130, 3)), ((1024, 1024), (2048, 2048), (4096, 4096), (4095, 1000), (3000, 5))):
            errs[(L, Lk, dtype)] = check_fwd(B, H, L, Lk, dtype)
    check_mixed(S(2, 4), S(3, 64), S(200, 4096), torch.bfloat16)
    if not SMOKE:
        G.check_graph("monarch16", torch.bfloat16)

    # (b)
    best = {}
    for L in S((100,), (1024, 2048, 4096)):
        n, b = sweep(L)
        best[n] = b
    log(f"best launch per N: {best}  (code: {m16.LAUNCH})")

    # (c)
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    comp = torch.compile(ref, dynamic=False)
    table = []
    for L in S((100, 200), (1024, 2048, 4096)):
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
                 "m16 f+b": time_fwd_bwd(ours, ins, dy, True),
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

    # ---- summary (last) ----
    print("\n==== monarch16 accuracy vs float64 (rel err; torch.fft on the same 16-bit inputs) ====")
    for (L, Lk, dtype), (e, lo) in errs.items():
        print(f"  L={L:5d} Lk={Lk:5d} {str(dtype)[6:]:8s} monarch16 {e:.3e}   torch.fft(16-bit) {lo:.3e}")
    print(f"\n==== fft_conv 16-bit, B={S(2, 8)} H={S(3, 768)}, D on (ms, do_bench median; "
          f"{torch.cuda.get_device_name() if not SMOKE else 'cpu'}) ====")
    print(f"{'case':26s} {'m16 fwd':>8s} {'cufft':>7s} {'old mon':>7s} {'torch':>7s} {'compile':>7s} "
          f"{'x torch':>7s} {'x comp':>6s} {'GB/s':>6s} | {'m16+cufft f+b':>13s} {'cufft f+b':>9s} "
          f"{'torch f+b':>9s} {'x torch':>7s}")
    for B, H, L, dtype, gates, r in table:
        print(f"L={L} {str(dtype)[6:]} gates={'on' if gates else 'off'}".ljust(26),
              f"{r['monarch16']:8.4f} {r['cufft']:7.4f} {r['old monarch']:7.4f} {r['torch']:7.4f} "
              f"{r['compile']:7.4f} {r['torch'] / r['monarch16']:7.2f} {r['compile'] / r['monarch16']:6.2f} "
              f"{r['GB/s']:6.0f} | {r['m16 f+b']:13.4f} {r['cufft f+b']:9.4f} {r['torch f+b']:9.4f} "
              f"{r['torch f+b'] / r['m16 f+b']:7.2f}")
    print(f"best launch per N (warps, stages): {best}")
    print(f"first call: {first:.2f} s; total {time.time() - G.T0:.0f} s; checks: "
          f"{'ALL OK' if not FAILS else f'{len(FAILS)} FAILED'}")
    for f in FAILS:
        print("  FAIL", f)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "gpu_monarch.csv"), "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["section", "case", "impl", "mode", "dtype", "value", "unit"])
            w.writeheader()
            w.writerows(ROWS)
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
