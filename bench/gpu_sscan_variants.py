"""Selective-scan CUDA forward variants side by side (issue 9), one process, one build:

    TORCH_CUDA_ARCH_LIST=9.0 SSM_KERNELS_BUILD_CUDA=1 MAX_JOBS=16 \\
        pip install --no-build-isolation --no-deps -e . && python bench/gpu_sscan_variants.py
    # OUT=/dir also writes gpu_sscan_variants.csv there; VARIANTS=0,2 runs a subset

Variants (ssm_kernels._C.selective_scan_fwd_variant(v); SSM_KERNELS_SSCAN_VARIANT at import;
N <= 16 only, other N always run 0): 0 default; 1 = variant 0's kernel with 8 states x 2 lanes per
channel (64-thread blocks); 2 = lean kernel at variant 0's layout (4 x 4); 3 = lean 8 x 2 (64
threads); 4 = lean 2 x 8 (twice the warps); 5, 6 = lean 4 x 4 / 8 x 2 pipelined (one barrier per
chunk, the next chunk converted inside the compute loop); 7 = 6 with 16-step chunks. See bench/NOTES.md "selective_scan CUDA
forward variants (issue 9)".

(a) correctness of every variant: out, final state and checkpoints against the float64 reference
    (computed on the GPU in float64) at both benchmark shapes, an odd length, fp32/fp16, fixed B,
    no z/D/bias/softplus, a misaligned view and packed varlen sequences of odd lengths; outputs
    NaN-poisoned first; each variant is also compared bitwise with variant 0 (lean variant 2 is
    meant to be bitwise equal to it). The CUDA backward is run from each variant's checkpoints at
    one shape and its gradients compared with variant 0's (same tolerance as the reference check).
    Backward variants (ssm_kernels._C.selective_scan_bwd_variant(v), SSM_KERNELS_SSCAN_BWD_VARIANT;
    0 default, 1 = lean I/O, N <= 16 with B and C time-varying; BWD_VARIANTS=0,1): every gradient
    against the float64 reference at small shapes (odd length, groups, varlen) and bitwise against
    backward variant 0 at both benchmark shapes.
(b) timing (triton.testing.do_bench, median) of the forward kernel call per variant, with and
    without checkpoints, fwd+bwd kernel calls per (forward variant, backward variant), and the
    backward alone per backward variant, at B=8 D=1536 L=2048 N=16 and B=4 D=4096 L=4096 N=16
    (bf16, variable B/C, z, D, delta_bias, softplus), next to mamba-ssm's selective_scan_fn when
    importable. Exit status 1 on any failed check. The tables are printed last.
"""
from __future__ import annotations

import csv
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import gpu_sscan as gs  # noqa: E402  (helpers: make, to, poison, verdict, has_cuda_bwd)
from ssm_kernels._backend import cuda_extension  # noqa: E402
from ssm_kernels.selective_scan import cuda as sc  # noqa: E402
from ssm_kernels.selective_scan.reference import (selective_scan_bwd_ref,  # noqa: E402
                                                  selective_scan_fwd_ref)
from ssm_kernels.testing import Verdict, bound_for  # noqa: E402

DEV = "cuda"
T0 = time.time()
BWD_VARIANTS = [0, 1]
ROWS: list = []  # (section, case, variant, what, value)


def set_variant(v: int) -> None:
    cuda_extension().selective_scan_fwd_variant(v)


def set_bwd_variant(v: int) -> None:
    ext = cuda_extension()
    if hasattr(ext, "selective_scan_bwd_variant"):
        ext.selective_scan_bwd_variant(v)
    elif v != 0:
        raise RuntimeError("this build has no backward variants")


def rel_err(out, ref) -> float:
    """ssm_kernels.testing.rel_err computed on the GPU (the big shapes' references stay there)."""
    o, r = out.detach().double(), ref.detach().to(out.device, torch.float64)
    if not torch.isfinite(o).all():
        return float("inf")
    num, den = torch.linalg.vector_norm(o - r).item(), torch.linalg.vector_norm(r).item()
    return num / den if den > 0 else num


def verdict(name, out, ref, dtype, lowp_err=None) -> bool:
    """As gpu_sscan.verdict (the same bound: testing.bound_for), with lowp_err precomputed."""
    v = Verdict(name, rel_err(out, ref), bound_for(dtype, lowp_err))
    if not v.ok:
        gs.FAILS.append(str(v))
    print(("  ok   " if v.ok else "  FAIL ") + str(v), flush=True)
    return v.ok


def fwd_args(d, cu):
    return (d["u"], d["delta"], d["A"], d["B"], d["C"], d["D"], d["z"], d["delta_bias"], d["h0"], cu)


def check_case(name, inp, variants, softplus=True, cu=None, misalign=False, bwd=False):
    dtype = inp["u"].dtype
    lowp = dtype in (torch.float16, torch.bfloat16)
    g = gs.to(inp, DEV)
    if misalign:  # u as a view 4 bytes past a 16-byte boundary (bindings.cpp copies it)
        u = g["u"]
        buf = torch.empty(u.numel() + 8, device=DEV, dtype=u.dtype)
        g["u"] = buf[2:2 + u.numel()].view(u.shape)
        g["u"].copy_(u)
    cu_d = None if cu is None else cu.to(DEV)
    hi = gs.to(inp, DEV, torch.float64)
    r_out, r_last, r_ck = selective_scan_fwd_ref(*fwd_args(hi, cu_d), softplus, True)
    lp = (selective_scan_fwd_ref(*fwd_args(g, cu_d), softplus, True) if lowp else (None,) * 3)
    used = r_ck.shape[0]
    if cu is not None:
        from ssm_kernels.selective_scan.reference import chunk_len
        c = chunk_len(inp["A"].shape[1])
        used = int(sum(-(-int(n) // c) for n in (cu[1:] - cu[:-1]).tolist()))
    st = torch.float32 if not lowp else dtype
    lp = [None if x is None else rel_err(x[:used] if i == 2 else x, y[:used] if i == 2 else y)
          for i, (x, y) in enumerate(zip(lp, (r_out, r_last, r_ck)))]
    base = None
    grads0 = None
    for v in variants:
        set_variant(v)
        gs.poison()
        out, last, ck = sc.selective_scan_fwd(*fwd_args(g, cu_d), softplus, True)
        torch.cuda.synchronize()
        tag = f"{name} v{v}"
        print(f"[{tag}]", flush=True)
        ok = verdict(f"{tag} out", out, r_out, dtype, lp[0])
        ok &= verdict(f"{tag} last", last, r_last, st, lp[1])
        if used:
            ok &= verdict(f"{tag} ckpt", ck[:used], r_ck[:used], st, lp[2])
        if base is None:
            base = (out, last, ck[:used])
            same = "ref"
        else:
            eq = [torch.equal(a, b) for a, b in zip((out, last, ck[:used]), base)]
            same = ("bitwise" if all(eq) else
                    f"differs (rel diff out {rel_err(out, base[0]):.1e}, last {rel_err(last, base[1]):.1e})")
            print(f"  vs v0: {same}", flush=True)
        ROWS.append(("check", name, v, "ok", "pass" if ok else "FAIL"))
        ROWS.append(("check", name, v, "vs v0", same))
        if bwd and gs.has_cuda_bwd():
            gen = torch.Generator().manual_seed(1)
            dout = torch.randn(inp["u"].shape, generator=gen).to(dtype).to(DEV)
            dlast = torch.randn(last.shape, generator=gen).to(DEV)
            grads = sc.selective_scan_bwd(*fwd_args(g, cu_d), ck, dout, dlast, softplus)
            names = ["du", "ddelta", "dA", "dB", "dC", "dD", "dz", "dbias", "dh0"]
            if grads0 is None:
                grads0 = grads
            else:  # gradients from this variant's checkpoints vs from variant 0's
                for nm, a, b in zip(names, grads, grads0):
                    if a is None:
                        continue
                    lowg = lowp and a.dtype != torch.float32
                    verdict(f"{tag} bwd {nm} vs v0", a, b, dtype if lowg else torch.float32,
                            0.0 if lowg else None)
    set_variant(0)


GRADS = ["du", "ddelta", "dA", "dB", "dC", "dD", "dz", "dbias", "dh0"]


def check_bwd(name, inp, bwd_variants, cu=None, reference=True):
    """Backward variants from variant 0's forward: float64 reference (small shapes) and bitwise
    equality with backward variant 0."""
    dtype = inp["u"].dtype
    lowp = dtype in (torch.float16, torch.bfloat16)
    g = gs.to(inp, DEV)
    cu_d = None if cu is None else cu.to(DEV)
    set_variant(0)
    _, last, ck = sc.selective_scan_fwd(*fwd_args(g, cu_d), True, True)
    gen = torch.Generator().manual_seed(1)
    dout = torch.randn(inp["u"].shape, generator=gen).to(dtype)
    dlast = torch.randn(tuple(last.shape), generator=gen)
    ref = lpe = None
    if reference:
        hi = gs.to(inp, DEV, torch.float64)
        ref = selective_scan_bwd_ref(*fwd_args(hi, cu_d), True, dout.double().to(DEV),
                                     dlast.double().to(DEV))
        if lowp:
            lr = selective_scan_bwd_ref(*fwd_args(g, cu_d), True, dout.to(DEV), dlast.to(DEV))
            lpe = [None if (a is None or b is None) else rel_err(a, b) for a, b in zip(lr, ref)]
    base = None
    for v in bwd_variants:
        set_bwd_variant(v)
        gs.poison()
        grads = sc.selective_scan_bwd(*fwd_args(g, cu_d), ck, dout.to(DEV), dlast.to(DEV), True)
        torch.cuda.synchronize()
        tag = f"{name} bwd v{v}"
        print(f"[{tag}]", flush=True)
        ok = True
        if ref is not None:
            for i, (nm, a, b) in enumerate(zip(GRADS, grads, ref)):
                if b is None:
                    continue
                if a is None:
                    gs.FAILS.append(f"{tag} {nm}: missing")
                    ok = False
                    continue
                lowg = lowp and a.dtype != torch.float32
                ok &= verdict(f"{tag} {nm}", a, b, dtype if lowg else torch.float32,
                              lpe[i] if lowg else None)
        if base is None:
            base, same = grads, "ref"
        else:
            eq = all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads, base))
            same = "bitwise" if eq else "differs: " + ", ".join(
                f"{nm} {rel_err(a, b):.1e}" for nm, a, b in zip(GRADS, grads, base)
                if a is not None and not torch.equal(a, b))
            print(f"  vs bwd v0: {same}", flush=True)
            if not eq and ref is None:  # no reference here: the lean backward must match v0
                gs.FAILS.append(f"{tag}: not bitwise equal to backward variant 0 ({same})")
                ok = False
        ROWS.append(("check", name, f"bwd{v}", "ok", "pass" if ok else "FAIL"))
        ROWS.append(("check", name, f"bwd{v}", "vs v0", same))
    set_bwd_variant(0)


def checks(variants):
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    check_case("bf16 B=8 D=1536 L=2048 N=16", gs.make(8, 1536, 2048, 16, bf16, seed=21), variants,
               bwd=True)
    check_case("bf16 B=4 D=4096 L=4096 N=16", gs.make(4, 4096, 4096, 16, bf16, seed=22), variants)
    check_case("fp32 L=4097 N=16", gs.make(2, 24, 4097, 16, f32), variants)
    check_case("fp16 L=333 N=16 dim=40", gs.make(2, 40, 333, 16, f16, seed=2), variants)
    check_case("bf16 L=1001 N=13 groups=2 dim=72", gs.make(2, 72, 1001, 13, bf16, groups=2, seed=3),
               variants)
    check_case("fp32 L=300 N=1 const B/C, no D/z/bias/softplus",
               gs.make(2, 16, 300, 1, f32, bc="const", D=False, z=False, bias=False, seed=4),
               variants, softplus=False)
    check_case("fp32 L=129 N=4 B const C var no h0", gs.make(2, 12, 129, 4, f32, bc="mixed",
                                                             h0=False, seed=5), variants)
    check_case("fp32 misaligned u view L=101", gs.make(1, 8, 101, 16, f32, seed=11), variants,
               misalign=True)
    check_case("bf16 varlen 4 seqs (1, 699, 1349, 951) N=16",
               gs.make(1, 40, 3000, 16, bf16, groups=2, nseq=4, seed=9), variants,
               cu=torch.tensor([0, 1, 700, 2049, 3000], dtype=torch.int32))
    check_case("fp32 varlen const B/C (64, 1, 335)",
               gs.make(1, 72, 400, 16, f32, bc="const", nseq=3, seed=17), variants,
               cu=torch.tensor([0, 64, 65, 400], dtype=torch.int32))
    bv = BWD_VARIANTS
    if gs.has_cuda_bwd() and hasattr(cuda_extension(), "selective_scan_bwd_variant"):
        check_bwd("bf16 L=1000 N=16 dim=80", gs.make(2, 80, 1000, 16, bf16, seed=31), bv)
        check_bwd("fp32 L=4097 N=13 groups=2", gs.make(2, 48, 4097, 13, f32, groups=2, seed=32), bv)
        check_bwd("fp16 L=333 N=16", gs.make(2, 40, 333, 16, f16, seed=33), bv)
        check_bwd("bf16 varlen (1, 699, 1349, 951) N=16", gs.make(1, 40, 3000, 16, bf16, groups=2,
                                                                   nseq=4, seed=34), bv,
                  cu=torch.tensor([0, 1, 700, 2049, 3000], dtype=torch.int32))
        check_bwd("bf16 B=8 D=1536 L=2048 N=16", gs.make(8, 1536, 2048, 16, bf16, seed=35), bv,
                  reference=False)
        check_bwd("bf16 B=4 D=4096 L=4096 N=16", gs.make(4, 4096, 4096, 16, bf16, seed=36), bv,
                  reference=False)


def bench(variants):
    import triton
    try:
        from ssm_kernels.benchmarks.selective_scan import _peers
        mamba_scan, _ = _peers()
    except Exception:
        mamba_scan = None
    if mamba_scan is None:
        print("mamba-ssm unavailable", flush=True)
    do = lambda f: triton.testing.do_bench(f, warmup=10, rep=40, return_mode="median")  # noqa: E731
    cuda_bwd = gs.has_cuda_bwd()
    for (Bt, D, L, N) in gs.BENCH_SHAPES:
        shape = f"B={Bt} D={D} L={L} N={N}"
        u, delta, A, Bm, Cm, Dv, z, bias, dout = gs.bench_inputs(Bt, D, L, N)
        dlast = torch.zeros(Bt, D, N, device=DEV)
        a = (u, delta, A, Bm, Cm, Dv, z, bias, None, None)
        with torch.no_grad():
            for v in variants:
                set_variant(v)
                ROWS.append(("bench", shape, v, "fwd",
                             do(lambda: sc.selective_scan_fwd(*a, True, False))))
                ROWS.append(("bench", shape, v, "fwd +ckpt",
                             do(lambda: sc.selective_scan_fwd(*a, True, True))))
                if cuda_bwd:
                    def fb():
                        _, _, ck = sc.selective_scan_fwd(*a, True, True)
                        sc.selective_scan_bwd(*a, ck, dout, dlast, True)
                    for bv in BWD_VARIANTS:
                        set_bwd_variant(bv)
                        ROWS.append(("bench", shape, v, f"fwd+bwd{bv}", do(fb)))
                    set_bwd_variant(0)
            set_variant(0)
            if cuda_bwd:
                _, _, ck0 = sc.selective_scan_fwd(*a, True, True)
                for bv in BWD_VARIANTS:
                    set_bwd_variant(bv)
                    ROWS.append(("bench", shape, f"bwd v{bv}", "bwd", do(
                        lambda: sc.selective_scan_bwd(*a, ck0, dout, dlast, True))))
                set_bwd_variant(0)
            if mamba_scan is not None:
                ROWS.append(("bench", shape, "mamba", "fwd", do(lambda: mamba_scan(
                    u, delta, A, Bm, Cm, Dv, z, bias, delta_softplus=True))))
        if mamba_scan is not None:
            leaves = [t.detach().clone().requires_grad_() for t in (u, delta, A, Bm, Cm, Dv, z, bias)]

            def mfb():
                for t in leaves:
                    t.grad = None
                mamba_scan(*leaves, delta_softplus=True).backward(dout)
            try:
                ROWS.append(("bench", shape, "mamba", "fwd+bwd0", do(mfb)))
            except Exception as e:
                print(f"  mamba fwd+bwd failed: {type(e).__name__}: {e}", flush=True)
        print(f"[bench] {shape} done ({time.time() - T0:.0f} s)", flush=True)


def report():
    print(f"\ntotal {time.time() - T0:.0f} s")
    print("\n==== checks per variant (pass/FAIL vs float64; equality with v0) ====")
    for r in ROWS:
        if r[0] == "check" and r[3] == "ok":
            eq = next((x[4] for x in ROWS if x[:3] == r[:3] and x[3] == "vs v0"), "")
            lab = f"v{r[2]}" if isinstance(r[2], int) else str(r[2])
            print(f"{r[1]:48s} {lab:5s}  {r[4]:4s}  {eq}")
    print("\n==== selective scan forward variants, bf16, all features on (median ms) ====")
    modes = ["fwd", "fwd +ckpt"] + [f"fwd+bwd{b}" for b in BWD_VARIANTS] + ["bwd"]
    print(f"{'shape':24s} {'variant':8s} " + " ".join(f"{m:>10s}" for m in modes) +
          "   fwd vs mamba")
    for shape in dict.fromkeys(r[1] for r in ROWS if r[0] == "bench"):
        t = {(r[2], r[3]): r[4] for r in ROWS if r[0] == "bench" and r[1] == shape}
        m = t.get(("mamba", "fwd"))
        for v in list(dict.fromkeys(k[0] for k in t)):
            cells = " ".join(f"{t[(v, md)]:10.3f}" if (v, md) in t else f"{'-':>10s}" for md in modes)
            rel = f"   {m / t[(v, 'fwd')]:.2f}x" if m and (v, "fwd") in t and v != "mamba" else ""
            mb = t.get(("mamba", "fwd+bwd0"))
            best = min((t[(v, md)] for md in modes[2:-1] if (v, md) in t), default=None)
            if mb and best and v != "mamba":
                rel += f" (fwd+bwd best {mb / best:.2f}x)"
            print(f"{shape:24s} {str(v):8s} {cells}{rel}")
    print(f"checks: {sum(1 for r in ROWS if r[0] == 'check' and r[3] == 'ok')} cases x variants, "
          f"{len(gs.FAILS)} failures")
    for f in gs.FAILS:
        print("  FAIL", f)


def main():
    ext = cuda_extension()
    if ext is None or not hasattr(ext, "selective_scan_fwd_variant"):
        sys.exit("ssm_kernels._C without selective_scan_fwd_variant: rebuild (see the docstring)")
    global BWD_VARIANTS
    variants = [int(x) for x in os.environ.get("VARIANTS", "0,1,2,3,4,5,6,7").split(",")]
    BWD_VARIANTS = [int(x) for x in os.environ.get("BWD_VARIANTS", "0,1").split(",")]
    if not hasattr(ext, "selective_scan_bwd_variant"):
        BWD_VARIANTS = [0]
    assert variants[0] == 0, "variant 0 first (the others are compared with it)"
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, variants {variants}, "
          f"CUDA backward built: {gs.has_cuda_bwd()}", flush=True)
    for part in (checks, bench):
        try:
            part(variants)
        except Exception as e:
            import traceback
            traceback.print_exc()
            gs.FAILS.append(f"{part.__name__} raised {type(e).__name__}: {e}")
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "gpu_sscan_variants.csv"), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["section", "case", "variant", "what", "value"])
            w.writerows(ROWS)
    report()
    sys.exit(1 if gs.FAILS else 0)


if __name__ == "__main__":
    main()
