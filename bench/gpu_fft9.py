"""GPU check + A/B of the float32 forward on the monarch16 kernels (interface.MONARCH16_F32: every
product split into three fp16 tensor-core dots; issue 11, session 9 helper fft9) against the
default float32 path (the cuFFT path) and torch's rfft convolution. One call, ~120-180 s on an H100:

    python bench/gpu_fft9.py        # OUT=dir writes gpu_fft9.csv; BUDGET_S (default 200) skips
                                    # the timing rows that would start past it (the table still
                                    # prints); FFT_BENCH_SMOKE=1: a CPU dry run at toy sizes

(a) check, knob ON: forward (the new kernel) + every gradient (the cuFFT backward) through
    autograd vs float64 torch.fft, the float32 bound (1e-5 relative), B=4 H=300 / B=2 H=19 (one
    program per channel as at H=768; H not a multiple of 16), L in {1, 255, 1000, 1024, 2048, 4096}
    + (4095, Lk 1000) + (3000, Lk 5), D on, gates off / on, a random and a decaying (Hyena-like)
    filter; the forward twice, bitwise; the error printed next to the cuFFT path's on the same
    inputs. Every row also asserts that the f32 kernel ran (path column).
(b) time, B=8 H=768 fp32, D on, gates off (the issue's table) and L4096 gates on: fwd and
    fwd+bwd (do_bench medians, ms) of the default (cuFFT), the knob with its tables, the knob's
    launch / row-block variants (the offline sm_90 audit's zero-spill choices), and torch rfft
    conv (fft_conv_ref); registers / spills of the compiled f32 kernel. L = 16384 is past MAX_N:
    the knob row runs the cuFFT path (printed as such; it must equal default).
The table is printed last, then per L the best forward variant and the x over torch.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_fft as G  # noqa: E402  (sets TRITON_INTERPRET for smoke runs before triton loads)
from gpu_fft import SMOKE, fwd_bwd, kinfo, log, plan_rows, time_fwd_fb  # noqa: E402

import torch  # noqa: E402

import ssm_kernels as sk  # noqa: E402
from ssm_kernels.fft_conv import interface as fi  # noqa: E402
from ssm_kernels.fft_conv import monarch16 as m16  # noqa: E402
from ssm_kernels.fft_conv.reference import fft_conv_ref  # noqa: E402
from ssm_kernels.testing import compare  # noqa: E402

S = (lambda *a: a[-1]) if not SMOKE else (lambda *a: a[0])  # full size / smoke size
BUDGET_S = float(os.environ.get("BUDGET_S", "200"))
ROWS: list = []
F32 = torch.float32

# name -> (MONARCH16_F32, KBLOCK_F32 updates, LAUNCH_F32 updates); "default" = the code as merged
# (MONARCH16_F32 off: the cuFFT path), "f32" = the knob with the code's tables. Offline sm_90 (ptxas
# 12.9, D on, no gates), warp instructions per pair of rows (all warps) / regs / spill bytes: the
# code's tables N = 2048 unblocked w4 7.2k / 255 / 0, 4096 BJ 16 w4 17.3k / 255 / 8, 8192 BJ 16 w4
# 37.9k / 255 / 60; "f32 w8": 4096 BJ 32 18.5k / 172 / 0, 8192 BJ 16 50.4k / 234 / 0; "f32 nb":
# 8192 unblocked w8 35.2k / 255 / 1232; "f32 bj32": 2048 BJ 32 w4 11.8k / 255 / 28 (16-bit kernels
# for scale: 4.4k at N = 2048, 9.5k at 4096, 17.1k at 8192; bench/NOTES.md "fft9")
CONFIGS = {
    "default": (False, {}, {}),
    "f32": (True, {}, {}),
    "f32 w8": (True, {4096: 32, 8192: 16}, {4096: (8, 1), 8192: (8, 1)}),
    "f32 nb": (True, {8192: 0}, {8192: (8, 1)}),
    "f32 bj32": (True, {2048: 32}, {2048: (4, 1)}),
}
# (L, gates, configurations), most informative first (the budget cuts from the end)
PLAN = [
    (1024, False, ("default", "f32", "f32 bj32")),
    (4096, False, ("default", "f32", "f32 w8", "f32 nb")),
    (16384, False, ("default", "f32")),
    (2048, False, ("default", "f32", "f32 w8")),
    (4096, True, ("default", "f32")),
]


class knobs:
    def __init__(self, name):
        self.cfg = CONFIGS[name]

    def __enter__(self):
        self.saved = (fi.MONARCH16_F32, dict(m16.KBLOCK_F32), dict(m16.LAUNCH_F32))
        on, kb, la = self.cfg
        fi.MONARCH16_F32 = on
        m16.KBLOCK_F32.update(kb)
        m16.LAUNCH_F32.update(la)
        if SMOKE and on and kb:   # the variant's blocks at the smoke sizes (N1 = 32)
            m16.KBLOCK_F32.update({256: 0, 512: 16 if any(kb.values()) else 0})

    def __exit__(self, *exc):
        fi.MONARCH16_F32 = self.saved[0]
        for d, old in zip((m16.KBLOCK_F32, m16.LAUNCH_F32), self.saved[1:]):
            d.clear()
            d.update(old)


def ours(u, k, D, pre_gate=None, post_gate=None):
    return sk.fft_conv(u, k, D, pre_gate=pre_gate, post_gate=post_gate, backend="triton")


def make(B, H, L, Lk, gates, decay, seed):
    g = torch.Generator(device=G.DEV).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=G.DEV, generator=g)  # noqa: E731
    k = r(H, Lk) / Lk ** 0.5
    if decay:   # Hyena / S4-like: exponentially decaying taps, a smooth spectrum
        t = torch.arange(Lk, device=G.DEV, dtype=F32)
        k = r(H, Lk) * torch.exp(-t / max(1.0, Lk / 16))[None, :] / 4
    return [r(B, H, L), k, r(H), r(B, H, L) if gates else None, r(B, H, L) if gates else None]


def check_case(B, H, L, Lk, gates, decay):
    """worst err/bound over y and every gradient with the knob on; (it, the cuFFT path's forward
    error, the knob's forward error)."""
    ins = make(B, H, L, Lk, gates, decay, seed=L + 7 * Lk + gates + 3 * decay)
    cot = torch.randn(B, H, L, device=G.DEV, dtype=torch.float64)
    calls = []
    real = m16._fft_conv_fwd_f32
    m16._fft_conv_fwd_f32 = lambda *a: calls.append(1) or real(*a)
    try:
        with knobs("f32"):
            out = fwd_bwd(ours, ins, cot)
            with torch.no_grad():
                again = ours(*ins)
    finally:
        m16._fft_conv_fwd_f32 = real
    ran = len(calls) == 2
    with torch.no_grad():
        y_cufft = ours(*ins)
    hi = fwd_bwd(fft_conv_ref, [None if x is None else x.double() for x in ins], cot)
    name = f"f32 B={B} H={H} L={L} Lk={Lk} gates={int(gates)} {'decay' if decay else 'rand'}"
    worst = 0.0
    for i, nm in enumerate(G.NAMES):
        if hi[i] is None:
            continue
        v = compare(f"{name} {nm}", out[i], hi[i], F32)
        worst = max(worst, v.err / v.bound)
        if not v.ok:
            G.FAILS.append(str(v))
            log("FAIL", v)
    if not torch.equal(out[0], again):
        G.FAILS.append(f"{name}: forward not bitwise repeatable")
    if not ran and m16.supports(L, Lk):
        G.FAILS.append(f"{name}: the f32 kernel did not run")
    e_m = compare("y", out[0], hi[0], F32).err
    e_c = compare("y", y_cufft, hi[0], F32).err
    log(f"check {name}: worst err/bound {worst:.3f}; y rel err f32 {e_m:.2e} vs cuFFT {e_c:.2e}")
    ROWS.append(dict(section="check", case=name, impl="f32", mode="fwd+bwd", dtype="float32",
                     value=worst, unit="err/bound"))
    ROWS.append(dict(section="check", case=name, impl="f32", mode="y err", dtype="float32",
                     value=e_m, unit="rel"))
    ROWS.append(dict(section="check", case=name, impl="cufft", mode="y err", dtype="float32",
                     value=e_c, unit="rel"))


def _timing_inputs(L, gates):
    B, H = S(2, 8), S(3, 768)
    return make(B, H, L, L, gates, False, seed=1), torch.randn(B, H, L, device=G.DEV)


def time_row(L, gates, name):
    ins, dy = _timing_inputs(L, gates)
    r = {}
    with knobs(name):
        r["path"] = fi.triton_path("fwd", ins[0], L) + "/" + fi.triton_path("bwd", ins[0], L, gates)
        m16.last_f32_kernel = None
        r["fwd"], r["f+b"] = time_fwd_fb(ours, ins, dy)
        r["k"] = kinfo(m16.last_f32_kernel)
    return r


def time_torch(L, gates):
    ins, dy = _timing_inputs(L, gates)
    return time_fwd_fb(lambda u, k, D, p, q: fft_conv_ref(u, k, D, pre_gate=p, post_gate=q), ins, dy)


CHECKS = [  # (B, H, L, Lk, gates, decay)
    (4, 300, 1024, 1024, False, False), (4, 300, 1024, 1024, True, True),
    (4, 300, 4096, 4096, False, False), (4, 300, 4096, 4096, True, True),
    (4, 300, 2048, 2048, True, False), (2, 19, 1000, 1000, True, False),
    (2, 19, 4095, 1000, False, True), (2, 19, 3000, 5, True, False), (2, 19, 255, 255, False, False),
    (2, 19, 1, 1, True, False),
]


def main():
    log(torch.cuda.get_device_name() if not SMOKE else "cpu (smoke)", "torch", torch.__version__)
    t0 = time.time()
    t = time.time()
    for B, H, L, Lk, gates, decay in (CHECKS if not SMOKE else [(2, 3, 255, 200, True, True),
                                                                 (2, 3, 300, 211, False, False)]):
        check_case(B, H, L, Lk, gates, decay)
    first = time.time() - t
    results, torch_ms = [], {}
    size = lambda L0: S(L0 // 4 if L0 <= 4096 else 1024, L0)  # noqa: E731  (smoke: N <= 2048)
    for L0, gates, L, name in plan_rows(PLAN, size, time_torch, torch_ms, t0, BUDGET_S):
        try:
            r = time_row(L, gates, name)
        except Exception as e:  # noqa: BLE001
            G.FAILS.append(f"{name} L={L0} gates={int(gates)}: {type(e).__name__}: {str(e)[:200]}")
            log("FAIL", G.FAILS[-1])
            continue
        results.append((L0, gates, name, r))
        log(f"  L={L0} gates={int(gates)} {name}: " + ", ".join(f"{a} {b}" for a, b in r.items()))
        for key in ("fwd", "f+b"):
            ROWS.append(dict(section="fft9", case=f"L={L0} gates={int(gates)} {name}",
                             impl=r["path"], mode=key, dtype="float32", value=r[key], unit="ms"))
        if not SMOKE:
            torch.cuda.empty_cache()
    for (L0, gates), (fw, fb) in torch_ms.items():
        for mode, v in (("fwd", fw), ("f+b", fb)):
            ROWS.append(dict(section="fft9", case=f"L={L0} gates={int(gates)} torch",
                             impl="torch rfft", mode=mode, dtype="float32", value=v, unit="ms"))

    print("\n==== fp32 forward on monarch16 split-fp16 products (MONARCH16_F32; issue 11, fft9), "
          "B=8 H=768 fp32 D on; ms (x = torch rfft conv / ours); f32 kernel regs/spill bytes ====")
    print(f"{'L':>6s} {'gates':>5s} {'config':14s} {'path f/b':18s} {'fwd':>7s} {'x':>5s} "
          f"{'f+b':>7s} {'x':>5s} {'r/s':>8s}")
    for L0, gates in torch_ms:
        fw, fb = torch_ms[(L0, gates)]
        print(f"{L0:6d} {'on' if gates else 'off':>5s} {'torch rfft':14s} {'':18s} {fw:7.3f} "
              f"{'':5s} {fb:7.3f}")
        for L, g, name, r in results:
            if (L, g) == (L0, gates):
                print(f"{L0:6d} {'on' if gates else 'off':>5s} {name:14s} {r['path']:18s} "
                      f"{r['fwd']:7.3f} {fw / r['fwd']:5.2f} {r['f+b']:7.3f} {fb / r['f+b']:5.2f} "
                      f"{r['k']:>8s}")
    for L0, gates in torch_ms:
        rs = [(r, name) for L, g, name, r in results if (L, g) == (L0, gates)]
        if rs:
            bf = min(rs, key=lambda x: x[0]["fwd"])
            dflt = [r for r, name in rs if name == "default"]
            vs = f", default {dflt[0]['fwd']:.3f}" if dflt else ""
            print(f"best fwd at L={L0} gates={int(gates)}: '{bf[1]}' {bf[0]['fwd']:.3f} ms "
                  f"({torch_ms[(L0, gates)][0] / bf[0]['fwd']:.2f}x torch{vs})")
    return G.finish(first, ROWS, "gpu_fft9.csv")


if __name__ == "__main__":
    sys.exit(main())
