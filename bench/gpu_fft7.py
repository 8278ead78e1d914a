"""GPU A/B of monarch16's row-blocked kernels (KBLOCK / KBLOCK_BWD), the SPLIT override and the
split backward (SPLIT_BWD: du + dk kernels) against the defaults and torch's rfft conv (issue 11;
session 7 helper fft7, session 8 helpers fft8, fftbwd8). One call, ~150-190 s on an H100 (the
default plan: the split-backward rows; FFT8=1: fft8's plan; PLAN_S7=1: session 7's knob sweep,
~270 s with BUDGET_S=270):

    python bench/gpu_fft7.py        # OUT=dir writes gpu_fft7.csv; BUDGET_S (default 160) skips
                                    # the rows that would start past it (the table still prints);
                                    # ONLY_L=4096,2048 runs only those lengths

Per row (L, gates, knob configuration), bf16, D on, the DEFAULT dispatch (MONARCH16 on; post-gated
rows under a blocked configuration raise MONARCH16_BWD_CUFFT_POST_N so that the backward stays on
monarch16):
  check  forward + every gradient through autograd at B=4 H=300 (one program per channel, as at
         H=768: the in-kernel dk inverse) vs float64 torch.fft, the repo's rule (2x torch on the
         same 16-bit inputs + floor); a failure is listed and makes the exit status 1;
  time   B=8 H=768: the forward (no grad), the backward implementation alone (what autograd's
         node runs), fwd+bwd through autograd (do_bench medians, ms); registers / spills of the
         compiled monarch16 kernels; torch rfft conv (fft_conv_ref) fwd and f+b once per (L, gates).
The table is printed last, then the best configuration per N for the forward and the backward.
Configurations: see CONFIGS (knob values and launch options; "default" = the code's tables).
FFT_BENCH_SMOKE=1: the same code on the CPU (Triton interpreter) at toy sizes (a dry run).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_fft as G  # noqa: E402  (sets TRITON_INTERPRET for smoke runs before triton loads)
from gpu_fft import (SMOKE, bench, fwd_bwd, kinfo, log, make, plan_rows,  # noqa: E402
                     time_fwd_fb)

import torch  # noqa: E402

import ssm_kernels as sk  # noqa: E402
from ssm_kernels import _launch  # noqa: E402
from ssm_kernels.fft_conv import interface as fi  # noqa: E402
from ssm_kernels.fft_conv import monarch16 as m16  # noqa: E402
from ssm_kernels.fft_conv.reference import fft_conv_ref  # noqa: E402
from ssm_kernels.testing import compare  # noqa: E402

S = (lambda *a: a[-1]) if not SMOKE else (lambda *a: a[0])  # full size / smoke size
BUDGET_S = float(os.environ.get("BUDGET_S", "160"))
ROWS: list = []

# name -> knob tables (N -> value); launch: (warps, stages) for both passes. Since session 8
# (helper fft8) the code's default at N = 4096 (L = 2048) is BJ 32 at 4 warps in both passes, so the
# w8 configurations name their launch; "s7 default" is the code before (unblocked, 8 warps) for the
# A/B; "bwd bj32" (L = 4096): session 8 measured bwd 0.833 for bj32 against the default's 0.876 in
# separate rows (bj32's forward lost: 0.529), so the mix is timed; "raw" = the default with ssm_kernels._launch.set_raw_pointers(True) (no cuPointerGetAttribute
# per pointer argument: the host-bound L = 1024 f+b).
W8 = {4096: (8, 1)}
CONFIGS = {
    "default": {},
    "s7 default": dict(kblock={4096: 0}, launch=W8),
    "raw": dict(raw=True),
    "bj64": dict(kblock={8192: 64}),
    "bj32": dict(kblock={4096: 32, 8192: 32}, launch=W8),
    "bj16": dict(kblock={4096: 16, 8192: 16}, launch=W8),
    "bj16 w16": dict(kblock={8192: 16}, launch={8192: (16, 1)}),
    "bj32 w4": dict(kblock={4096: 32}, launch={4096: (4, 1)}),
    # refused on CUDA since session 8 (monarch16.SPLIT_BLOCKS_ON_GPU): it faulted on the H100
    "split bj64": dict(split={4096: (128, 32)}, kblock={4096: 64}),
    "bj16 T": dict(kblock={4096: 32, 8192: 16}, twc=False, launch=W8),   # TWIDDLE_CONJ_COPY = False
    "bwd bj32": dict(kblock_bwd={8192: 32}),   # L = 4096: the default forward, bj32 backward
    "bwd bj16": dict(kblock={4096: 0}, kblock_bwd={4096: 32, 8192: 16}, launch=W8),  # fwd unblocked
    # split backward (monarch16.SPLIT_BWD, helper fftbwd8): du kernel (the forward's code, conj
    # filter table) + dk kernel (conj(P) Q summed over the batch in registers per block of DK_BLOCK
    # rows, one inverse per channel); "split2": the du kernel stores Q (fp16) and the dk kernel
    # reads it instead of recomputing it; dkbj / dkw: the dk kernel's rows per block / warps
    "split2": dict(split_bwd={4096: 2, 8192: 2}, dk_block={4096: 32, 8192: 128},
                   launch_dk={4096: (4, 1), 8192: (8, 1)}),
    "split2 dkbj32": dict(split_bwd={8192: 2}, dk_block={8192: 32}, launch_dk={8192: (8, 1)}),
    "split1": dict(split_bwd={4096: 1, 8192: 1}, dk_block={4096: 32, 8192: 32},
                   launch_dk={4096: (4, 1), 8192: (8, 1)}),
}
# (L, gates, configurations), most informative first (the budget cuts from the end). The
# offline sm_90 build (bench/sm90_audit.py --ops fft_conv_knobs) of each: see bench/NOTES.md.
# PLAN_S7=1: session 7's plan (the knob sweep that chose the defaults).
PLAN = [
    (4096, False, ("default", "split2", "split2 dkbj32", "split1")),
    (4096, True, ("default", "split2")),
    (2048, False, ("default", "split2")),
]
# FFT8=1: session 8's first plan (helper fft8)
if os.environ.get("FFT8"):
    PLAN = [
        (2048, False, ("default", "s7 default")),
        (1024, False, ("default", "raw")),
        (2048, True, ("default", "s7 default")),
        (4096, False, ("default", "bwd bj32")),
        (4096, True, ("default",)),
    ]
if os.environ.get("PLAN_S7"):
    PLAN = [
        (4096, False, ("default", "bj32", "bj16", "bj16 w16", "bj16 T")),
        (2048, False, ("s7 default", "bj32", "bj16", "bj32 w4", "bj16 T")),
        (4096, True, ("default", "bj32", "bj16")),
        (1024, False, ("default",)),
        (4096, False, ("bwd bj16",)),
        (2048, False, ("bwd bj16",)),
        (4096, False, ("bj64",)),
    ]


class knobs:
    """Applies one configuration to monarch16's tables (and the post-gate threshold)."""
    SPLIT_TABLES = (m16.SPLIT_BWD, m16.DK_BLOCK, m16.LAUNCH_DK)

    def __init__(self, name, gates):
        self.cfg, self.gates, self.name = CONFIGS[name], gates, name

    def __enter__(self):
        self.saved = [dict(d) for d in (m16.KBLOCK, m16.KBLOCK_BWD, m16.SPLIT, m16.LAUNCH,
                                        m16.LAUNCH_BWD) + self.SPLIT_TABLES] + [m16.TWIDDLE_CONJ_COPY,
                                                            fi.MONARCH16_BWD_CUFFT_POST_N,
                                                            _launch.raw_pointers()]
        c = self.cfg
        _launch.set_raw_pointers(c.get("raw", self.saved[-1]))
        m16.KBLOCK.update(c.get("kblock", {}))
        m16.KBLOCK_BWD.update(c.get("kblock_bwd", c.get("kblock", {})))
        m16.SPLIT.update(c.get("split", {}))
        m16.LAUNCH.update(c.get("launch", {}))
        m16.LAUNCH_BWD.update(c.get("launch_bwd", c.get("launch", {})))
        m16.TWIDDLE_CONJ_COPY = c.get("twc", True)
        m16.SPLIT_BWD.update(c.get("split_bwd", {}))
        m16.DK_BLOCK.update(c.get("dk_block", {}))
        m16.LAUNCH_DK.update(c.get("launch_dk", {}))
        if self.gates and self.name not in ("default", "s7 default", "raw"):
            fi.MONARCH16_BWD_CUFFT_POST_N = 1 << 30   # keep the post-gated backward on monarch16

    def __exit__(self, *exc):
        for d, old in zip((m16.KBLOCK, m16.KBLOCK_BWD, m16.SPLIT, m16.LAUNCH, m16.LAUNCH_BWD)
                          + self.SPLIT_TABLES, self.saved):
            d.clear()
            d.update(old)
        m16.TWIDDLE_CONJ_COPY, fi.MONARCH16_BWD_CUFFT_POST_N = self.saved[-3:-1]
        _launch.set_raw_pointers(self.saved[-1])


def ours(u, k, D, pre_gate=None, post_gate=None):
    return sk.fft_conv(u, k, D, pre_gate=pre_gate, post_gate=post_gate, backend="triton")


def check(L, gates, name):
    """Forward + every gradient through autograd vs float64: worst err / bound."""
    B, H = S(3, 4), S(5, 300)
    ins = make(B, H, L, torch.bfloat16, gates=gates, seed=L + gates)
    cot = torch.randn(B, H, L, device=G.DEV, dtype=torch.float64)
    out = fwd_bwd(ours, ins, cot)
    hi = fwd_bwd(fft_conv_ref, [None if x is None else x.double() for x in ins], cot)
    lowp = fwd_bwd(fft_conv_ref, ins, cot.to(torch.bfloat16))
    worst = 0.0
    for i, nm in enumerate(G.NAMES):
        if hi[i] is None:
            continue
        v = compare(f"{name} L={L} gates={int(gates)} {nm}", out[i], hi[i], torch.bfloat16, lowp[i])
        worst = max(worst, v.err / v.bound)
        if not v.ok:
            G.FAILS.append(str(v))
            log("FAIL", v)
    return worst


def time_row(L, gates, name):
    B, H = S(2, 8), S(3, 768)
    ins = make(B, H, L, torch.bfloat16, gates=gates, seed=1)
    dy = torch.randn(B, H, L, device=G.DEV).to(torch.bfloat16)
    insg = [None if x is None else x.detach().requires_grad_() for x in ins]
    live = [x for x in insg if x is not None]
    r = {"path": f"{fi.triton_path('fwd', ins[0], L)}/{fi.triton_path('bwd', ins[0], L, gates)}"}
    m16.last_kernel = m16.last_bwd_kernel = None
    with torch.no_grad():
        r["fwd"] = bench(lambda: ours(*ins))
    r["fwd k"] = kinfo(m16.last_kernel)
    m16.last_du_kernel = None
    r["bwd"] = bench(lambda: fi._conv_bwd(dy, *ins, "triton"))
    r["bwd k"] = kinfo(m16.last_bwd_kernel)
    if m16.last_du_kernel is not None:   # split backward: du kernel's, then the dk kernel's
        r["bwd k"] = kinfo(m16.last_du_kernel) + "+" + r["bwd k"]
    r["f+b"] = bench(lambda: torch.autograd.grad(ours(*insg), live, dy))
    return r


def time_torch(L, gates):
    B, H = S(2, 8), S(3, 768)
    ins = make(B, H, L, torch.bfloat16, gates=gates, seed=1)
    dy = torch.randn(B, H, L, device=G.DEV).to(torch.bfloat16)
    return time_fwd_fb(lambda u, k, D, p, q: fft_conv_ref(u, k, D, pre_gate=p, post_gate=q), ins, dy)


def main():
    log(torch.cuda.get_device_name() if not SMOKE else "cpu (smoke)", "torch", torch.__version__)
    t0 = time.time()
    first = float("nan")
    results, torch_ms = [], {}
    only = {int(x) for x in os.environ.get("ONLY_L", "").split(",") if x}
    # smoke: N = 512 / 256 (BJ 16 where N1 = 32)
    for L0, gates, L, name in plan_rows(PLAN, lambda L0: S(L0 // 16, L0), time_torch, torch_ms, t0,
                                        BUDGET_S, only):
        with knobs(name, gates):
            if SMOKE:   # toy sizes: the knobs at the smoke N (BJ = 16 at N1 = 32)
                m16.KBLOCK.update({512: 16} if m16.KBLOCK else {})
                m16.KBLOCK_BWD.update({512: 16} if m16.KBLOCK_BWD else {})
                if m16.SPLIT_BWD:   # the split backward at the smoke N, dk blocks of 16
                    m16.SPLIT_BWD[512] = max(m16.SPLIT_BWD.values())
                    m16.DK_BLOCK[512] = 16
            try:
                t = time.time()
                worst = check(L, gates, name)
                if first != first:
                    first = time.time() - t
                r = time_row(L, gates, name)
            except Exception as e:  # noqa: BLE001
                G.FAILS.append(f"{name} L={L0} gates={int(gates)}: {type(e).__name__}: {str(e)[:200]}")
                log("FAIL", G.FAILS[-1])
                continue
        r["err/bound"] = worst
        results.append((L0, gates, name, r))
        log(f"  L={L0} gates={int(gates)} {name}: " + ", ".join(
            f"{a} {b:.4f}" if isinstance(b, float) else f"{a} {b}" for a, b in r.items()))
        for key in ("fwd", "bwd", "f+b", "err/bound"):
            ROWS.append(dict(section="fft7", case=f"L={L0} gates={int(gates)} {name}",
                             impl="monarch16", mode=key, dtype="bf16", value=r[key],
                             unit="err/bound" if key == "err/bound" else "ms"))
        if not SMOKE:
            torch.cuda.empty_cache()
    for (L0, gates), (fw, fb) in torch_ms.items():
        ROWS.append(dict(section="fft7", case=f"L={L0} gates={int(gates)} torch", impl="torch rfft",
                         mode="fwd", dtype="bf16", value=fw, unit="ms"))
        ROWS.append(dict(section="fft7", case=f"L={L0} gates={int(gates)} torch", impl="torch rfft",
                         mode="f+b", dtype="bf16", value=fb, unit="ms"))

    print(f"\n==== monarch16 knobs (issue 11, fft7), B=8 H=768 bf16 D on; ms (x = torch / ours); "
          f"regs/spill bytes of the compiled kernels; err/bound = worst of y and every gradient "
          f"at B4 H300 vs float64 ====")
    print(f"{'L':>5s} {'gates':>5s} {'config':20s} {'path f/b':20s} {'fwd':>6s} {'x':>5s} {'bwd':>6s} "
          f"{'f+b':>6s} {'x':>5s} {'err/b':>5s} {'fwd r/s':>8s} {'bwd r/s':>8s}")
    for L0, gates, name, r in results:
        fw, fb = torch_ms[(L0, gates)]
        print(f"{L0:5d} {'on' if gates else 'off':>5s} {name:20s} {r['path']:20s} {r['fwd']:6.3f} "
              f"{fw / r['fwd']:5.2f} {r['bwd']:6.3f} {r['f+b']:6.3f} {fb / r['f+b']:5.2f} "
              f"{r['err/bound']:5.2f} {r['fwd k']:>8s} {r['bwd k']:>8s}")
    for L0, gates in torch_ms:
        rs = [(r, name) for L, g, name, r in results if (L, g) == (L0, gates)]
        if not rs:
            continue
        bf = min(rs, key=lambda x: x[0]["fwd"])
        bb = min(rs, key=lambda x: x[0]["bwd"])
        bfb = min(rs, key=lambda x: x[0]["f+b"])
        print(f"best at L={L0} gates={int(gates)}: fwd '{bf[1]}' {bf[0]['fwd']:.3f}, bwd '{bb[1]}' "
              f"{bb[0]['bwd']:.3f}, f+b '{bfb[1]}' {bfb[0]['f+b']:.3f} (torch {torch_ms[(L0, gates)][1]:.3f}: "
              f"{torch_ms[(L0, gates)][1] / bfb[0]['f+b']:.2f}x)")
    return G.finish(first, ROWS, "gpu_fft7.csv")


if __name__ == "__main__":
    sys.exit(main())
