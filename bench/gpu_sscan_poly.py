"""Selective-scan CUDA forward with part of the exp2s on the FMA pipe (issue 9; bench/NOTES.md
"poly exp2"), next to the lean default and mamba-ssm, one process, one build:

    TORCH_CUDA_ARCH_LIST=9.0 SSM_KERNELS_BUILD_CUDA=1 MAX_JOBS=16 \\
        pip install --no-build-isolation --no-deps -e . && python bench/gpu_sscan_poly.py
    # POLY=4,8 runs a subset (0 = the default kernel is always added); OUT=/dir writes a csv

Knob: ssm_kernels._C.selective_scan_fwd_poly(R) / SSM_KERNELS_SSCAN_FWD_POLY=R, R in {1, 2, 4, 8, 16}:
the N <= 16 forward (B and C time-varying) computes the decay of state k at step t with
sscan::ex2_poly (Cody-Waite + degree-5 polynomial) iff (t + k) % R == 0, the rest with ex2.approx.

(a) correctness, forward only (the backward is unchanged; it consumes the checkpoints checked
    here): out, last state and checkpoints of R = 0 and every R against one float64 reference per
    case (NaN-poisoned outputs, every run repeated and compared bitwise): odd lengths, groups,
    fp32/fp16/bf16, varlen with a 1-step sequence, extreme decays (exp2 argument down to ~ -430,
    decays of exactly 0), slow decays (~0.995: errors in the decay accumulate over ~200 steps), no D/z/bias/softplus, N = 13, an unaligned view, 3 channel tiles; plus a
    real-size case (B=2 D=1536 L=2048 bf16) with the float64 reference on the GPU. The error of
    each R is printed next to R = 0's: they should be of the same size.
(b) timing (triton.testing.do_bench, median): forward and forward + checkpoints per R, mamba-ssm's
    selective_scan_fn forward, at B=8 D=1536 L=2048 and B=4 D=4096 L=4096 N=16 (bf16, all
    features). Table last; exit status 1 on any failed check.
"""
from __future__ import annotations

import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import gpu_sscan as gs  # noqa: E402  (make, to, poison, compare via verdict, bench_inputs)
from ssm_kernels._backend import cuda_extension  # noqa: E402
from ssm_kernels.selective_scan import cuda as sc  # noqa: E402
from ssm_kernels.selective_scan.reference import chunk_len, selective_scan_fwd_ref  # noqa: E402
from ssm_kernels.testing import compare  # noqa: E402

DEV = "cuda"
T0 = time.time()
ROWS: list = []  # (section, case, R, what, value)
FAILS: list = []


def set_poly(r: int) -> None:
    ext = cuda_extension()
    ext.selective_scan_fwd_poly(r)
    if ext.selective_scan_fwd_poly(r) != r:
        raise RuntimeError(f"poly ratio {r} not accepted by this build")


def args_of(d, cu):
    return (d["u"], d["delta"], d["A"], d["B"], d["C"], d["D"], d["z"], d["delta_bias"], d["h0"], cu)


def check(name, inp, polys, softplus=True, cu=None, misalign=False, ref_on_gpu=False):
    dtype = inp["u"].dtype
    lowp = dtype in (torch.float16, torch.bfloat16)
    g = gs.to(inp, DEV)
    if misalign:
        u = g["u"]
        buf = torch.empty(u.numel() + 8, device=DEV, dtype=u.dtype)
        view = buf[2:2 + u.numel()].view(u.shape)
        view.copy_(u)
        g["u"] = view
    cu_d = None if cu is None else cu.to(DEV)
    rdev = DEV if ref_on_gpu else "cpu"
    hi = gs.to(inp, rdev, torch.float64)
    cu_r = None if cu is None else cu.to(rdev)
    ref = selective_scan_fwd_ref(*args_of(hi, cu_r), softplus, True)
    lp = (selective_scan_fwd_ref(*args_of(gs.to(inp, rdev), cu_r), softplus, True) if lowp
          else (None,) * 3)
    used = ref[2].shape[0]
    if cu is not None:
        c = chunk_len(inp["A"].shape[1])
        used = int(sum(-(-int(n) // c) for n in (cu[1:] - cu[:-1]).tolist()))
    outs = {}
    for r in polys:
        set_poly(r)
        res = []
        for _ in range(2):
            gs.poison()
            res.append(sc.selective_scan_fwd(*args_of(g, cu_d), softplus, True))
        torch.cuda.synchronize()
        # packed sequences leave spare checkpoint rows at the end, never written (NaN-poisoned)
        same = all(torch.equal(a[:used] if i == 2 else a, b[:used] if i == 2 else b)
                   for i, (a, b) in enumerate(zip(*res)))
        if not same:
            FAILS.append(f"{name} R={r}: not bitwise deterministic")
        out, last, ck = res[0]
        outs[r] = res[0]
        errs = []
        for what, got, want, low, sdt in (("out", out, ref[0], lp[0], dtype),
                                          ("last", last, ref[1], lp[1], dtype if lowp else torch.float32),
                                          ("ckpt", ck[:used], ref[2][:used],
                                           None if lp[2] is None else lp[2][:used],
                                           dtype if lowp else torch.float32)):
            if want.numel() == 0:
                continue
            v = compare(f"{name} R={r} {what}", got.float().to(rdev) if got.dtype != torch.float64
                        else got.to(rdev), want, sdt, None if low is None else low.to(rdev))
            if not v.ok:
                FAILS.append(str(v))
            errs.append(f"{what} {v.err:.2e}{'' if v.ok else ' FAIL'}")
            ROWS.append(("check", name, r, what, f"{v.err:.3e}"))
        diff = "" if r == 0 or 0 not in outs else \
            f" | vs R=0: out {'bitwise' if torch.equal(out, outs[0][0]) else 'differs'}"
        print(f"[{name}] R={r:2d} {'det' if same else 'NONDET'}: {', '.join(errs)}{diff}", flush=True)
    set_poly(0)


def checks(polys):
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    m = gs.make
    check("fp32 L=4097 N=16", m(2, 24, 4097, 16, f32), polys)
    check("bf16 L=4097 N=16 groups=2", m(2, 24, 4097, 16, bf16, groups=2, seed=1), polys)
    check("fp16 L=333 N=16", m(2, 40, 333, 16, f16, seed=2), polys)
    check("fp32 L=300 N=16 no D/z/bias/softplus",
          m(2, 16, 300, 16, f32, D=False, z=False, bias=False, seed=3), polys, softplus=False)
    check("bf16 L=1000 N=13 groups=3 no h0", m(2, 48, 1000, 13, bf16, groups=3, h0=False, seed=5),
          polys)
    ext = m(2, 24, 333, 16, f32, seed=6)  # |dt A| up to ~300: decays of exactly 0 on both paths
    ext["A"] = ext["A"] * 30.0
    ext["delta"] = ext["delta"] * 4.0
    check("fp32 extreme decays (A x30, delta x4)", ext, polys)
    slow = m(2, 24, 4097, 16, f32, seed=8)  # decays ~0.995: long memory amplifies decay errors
    slow["A"] = slow["A"] * 0.01
    check("fp32 L=4097 slow decays (A x0.01)", slow, polys)
    check("fp32 L=1 N=16", m(3, 8, 1, 16, f32, seed=7), polys)
    check("bf16 varlen 4 seqs N=16", m(1, 40, 3000, 16, bf16, groups=2, nseq=4, seed=9), polys,
          cu=torch.tensor([0, 1, 700, 2049, 3000], dtype=torch.int32))
    check("fp32 misaligned u view", m(1, 8, 101, 16, f32, seed=11), polys, misalign=True)
    check("bf16 L=600 N=16 dim=80 (3 channel tiles)", m(2, 80, 600, 16, bf16, seed=13), polys)
    check("bf16 B=2 D=1536 L=2048 N=16 (ref on GPU)", m(2, 1536, 2048, 16, bf16, seed=35), polys,
          ref_on_gpu=True)


def bench(polys):
    import triton
    mamba_scan = gs.mamba_peer()
    do = lambda f: triton.testing.do_bench(f, warmup=20, rep=80, return_mode="median")  # noqa: E731
    for (Bt, D, L, N) in gs.BENCH_SHAPES:
        shape = f"B={Bt} D={D} L={L} N={N}"
        u, delta, A, Bm, Cm, Dv, z, bias, _ = gs.bench_inputs(Bt, D, L, N)
        a = (u, delta, A, Bm, Cm, Dv, z, bias, None, None)
        with torch.no_grad():
            for rep in range(2):  # R = 0 timed first and again last (clock drift check)
                for r in (polys if rep == 0 else [0]):
                    set_poly(r)
                    tag = f"R={r}" if rep == 0 else "R=0 again"
                    ROWS.append(("bench", shape, tag, "fwd",
                                 do(lambda: sc.selective_scan_fwd(*a, True, False))))
                    ROWS.append(("bench", shape, tag, "fwd+ckpt",
                                 do(lambda: sc.selective_scan_fwd(*a, True, True))))
            set_poly(0)
            if mamba_scan is not None:
                ROWS.append(("bench", shape, "mamba", "fwd", do(lambda: mamba_scan(
                    u, delta, A, Bm, Cm, Dv, z, bias, delta_softplus=True))))
        print(f"[bench] {shape} done ({time.time() - T0:.0f} s)", flush=True)


def report():
    print(f"\ntotal {time.time() - T0:.0f} s, device {torch.cuda.get_device_name()}")
    print("\n==== selective scan forward, bf16, all features (median ms) ====")
    print(f"{'shape':24s} {'impl':10s} {'fwd':>8s} {'fwd+ckpt':>9s}  {'vs R=0':>7s} {'vs mamba':>8s}")
    for shape in dict.fromkeys(r[1] for r in ROWS if r[0] == "bench"):
        t = {(r[2], r[3]): r[4] for r in ROWS if r[0] == "bench" and r[1] == shape}
        m, base = t.get(("mamba", "fwd")), t.get(("R=0", "fwd"))
        for impl in dict.fromkeys(k[0] for k in t):
            f, fc = t.get((impl, "fwd")), t.get((impl, "fwd+ckpt"))
            cell = lambda x: f"{x:8.3f}" if x is not None else f"{'-':>8s}"  # noqa: E731
            rb = f"{base / f:6.2f}x" if base and f else ""
            rm = f"{m / f:7.2f}x" if m and f else ""
            print(f"{shape:24s} {impl:10s} {cell(f)} {cell(fc):>9s}  {rb:>7s} {rm:>8s}")
    print(f"checks: {len(FAILS)} failures")
    for f in FAILS:
        print("  FAIL", f)


def main():
    ext = cuda_extension()
    if ext is None or not hasattr(ext, "selective_scan_fwd_poly"):
        sys.exit("ssm_kernels._C without selective_scan_fwd_poly: rebuild from this branch")
    polys = [0] + [int(x) for x in os.environ.get("POLY", "1,2,4,8,16").split(",") if int(x) != 0]
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, R {polys}", flush=True)
    gs.run_parts((checks, bench), FAILS, polys)
    gs.write_csv("gpu_sscan_poly.csv", ["section", "case", "R", "what", "value"], ROWS)
    report()
    sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
    main()
