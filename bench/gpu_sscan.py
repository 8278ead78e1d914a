"""GPU check + benchmark of the selective scan's CUDA kernels (issue 9). Self-contained:

    TORCH_CUDA_ARCH_LIST=9.0 SSM_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation --no-deps -e .
    python bench/gpu_sscan.py            # OUT=/some/dir also writes gpu_sscan.csv there

(a) correctness: the CUDA forward (out, last state, checkpoints) and, when built, the CUDA backward
    (every gradient) against the float64 reference on the CPU, at odd lengths, N in {1, 4, 16, 64,
    200}, groups, fixed B/C, varlen, h0, no D/z/bias, fp32/fp16/bf16, an unaligned input view; the
    outputs are NaN-poisoned first (the caching allocator hands the poisoned blocks back), and the
    backward is run twice and compared bitwise. The public path (selective_scan_fn, backend="cuda",
    autograd) is checked too.
(b) timing (triton.testing.do_bench, median) at B=8 D=1536 L=2048 N=16 and B=4 D=4096 L=4096 N=16,
    bf16, every feature on, against mamba-ssm when importable.
Exit status 1 if any check fails. The table is printed at the end.
"""
from __future__ import annotations

import csv
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ssm_kernels as sk  # noqa: E402
from ssm_kernels.selective_scan import cuda as sc  # noqa: E402
from ssm_kernels.selective_scan.reference import (selective_scan_bwd_ref,  # noqa: E402
                                                  selective_scan_fwd_ref)
from ssm_kernels.testing import compare  # noqa: E402

DEV = "cuda"
FAILS: list = []
ROWS: list = []  # (section, case, impl, mode, value)
T0 = time.time()


def has_cuda_bwd() -> bool:
    from ssm_kernels import _backend
    ext = _backend.cuda_extension()
    return hasattr(sc, "selective_scan_bwd") and ext is not None and hasattr(ext, "selective_scan_bwd")


def poison():
    """Fill freed cached blocks with NaN so a kernel's unwritten outputs show up as NaN."""
    blocks = []
    for kb in (1, 4, 16, 64, 256, 512, 1024, 4096, 16384, 65536, 262144):  # small and large pools
        try:
            blocks += [torch.full((kb * 256,), float("nan"), device=DEV) for _ in range(4)]
        except RuntimeError:
            break
    del blocks


def make(batch, dim, L, N, dtype, bc="var", groups=1, D=True, z=True, bias=True, h0=True,
         nseq=None, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    u = r(batch, dim, L).to(dtype)
    delta = (r(batch, dim, L) * 0.5).to(dtype)
    A = -(torch.rand(dim, N, generator=g) * 1.0 + 0.2)
    def bcm():
        if bc == "const":
            return r(dim, N)
        return r(batch, groups, N, L).to(dtype)
    B, C = bcm(), bcm()
    if bc == "mixed":
        B = r(dim, N)
    if bc == "mixedBC":
        C = r(dim, N)
    ns = batch if nseq is None else nseq
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=r(dim) if D else None,
                z=r(batch, dim, L).to(dtype) if z else None,
                delta_bias=r(dim) * 0.3 if bias else None,
                h0=r(ns, dim, N) if h0 else None)


def to(inp, device, dtype=None):
    out = {}
    for k, v in inp.items():
        if v is None:
            out[k] = None
        elif dtype is not None and v.is_floating_point():
            out[k] = v.to(device=device, dtype=dtype)
        else:
            out[k] = v.to(device)
    return out


def verdict(name, out, ref, dtype, lowp):
    v = compare(name, out.float().cpu() if out.dtype != torch.float64 else out.cpu(), ref, dtype,
                lowp)
    if not v.ok:
        FAILS.append(str(v))
    print(("  ok   " if v.ok else "  FAIL ") + str(v), flush=True)
    ROWS.append(("check", name, "cuda", "relerr", f"{v.err:.3e}"))
    return v.ok


def check_case(name, inp, softplus=True, cu=None, misalign=False):
    dtype = inp["u"].dtype
    lowp = dtype in (torch.float16, torch.bfloat16)
    args = lambda d, cuq: (d["u"], d["delta"], d["A"], d["B"], d["C"], d["D"], d["z"],  # noqa: E731
                           d["delta_bias"], d["h0"], cuq)
    g = to(inp, DEV)
    if misalign:  # u as a view 4 bytes past a 16-byte boundary
        u = g["u"]
        buf = torch.empty(u.numel() + 8, device=DEV, dtype=u.dtype)
        view = buf[2:2 + u.numel()].view(u.shape)
        view.copy_(u)
        assert view.data_ptr() % 16 != 0
        g["u"] = view
    cu_d = None if cu is None else cu.to(DEV)
    poison()
    out, last, ck = sc.selective_scan_fwd(*args(g, cu_d), softplus, True)
    torch.cuda.synchronize()
    hi = to(inp, "cpu", torch.float64)
    r_out, r_last, r_ck = selective_scan_fwd_ref(*args(hi, cu), softplus, True)
    lp = selective_scan_fwd_ref(*args(inp, cu), softplus, True) if lowp else (None,) * 3
    print(f"[{name}] fwd", flush=True)
    verdict(f"{name} out", out, r_out, dtype, lp[0])
    verdict(f"{name} last", last, r_last, torch.float32 if not lowp else dtype, lp[1])
    if r_ck.numel():
        used = r_ck.shape[0]  # packed sequences leave spare rows at the end, never written
        if cu is not None:
            from ssm_kernels.selective_scan.reference import chunk_len
            c = chunk_len(inp["A"].shape[1])
            used = int(sum(-(-int(n) // c) for n in (cu[1:] - cu[:-1]).tolist()))
        verdict(f"{name} ckpt", ck[:used], r_ck[:used], torch.float32 if not lowp else dtype,
                None if lp[2] is None else lp[2][:used])
    if not has_cuda_bwd():
        return
    nseq = r_last.shape[0]
    gen = torch.Generator().manual_seed(1)
    dout = torch.randn(inp["u"].shape, generator=gen).to(dtype)
    dlast = torch.randn(nseq, inp["u"].shape[1], inp["A"].shape[1], generator=gen)
    bargs = lambda d, cuq, ckq, do, dl: (*args(d, cuq), ckq, do, dl, softplus)  # noqa: E731
    poison()
    g1 = sc.selective_scan_bwd(*bargs(g, cu_d, ck, dout.to(DEV), dlast.to(DEV)))
    poison()
    g2 = sc.selective_scan_bwd(*bargs(g, cu_d, ck, dout.to(DEV), dlast.to(DEV)))
    torch.cuda.synchronize()
    names = ["du", "ddelta", "dA", "dB", "dC", "dD", "dz", "dbias", "dh0"]
    same = all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g1, g2))
    print(f"[{name}] bwd (deterministic: {same})", flush=True)
    if not same:
        FAILS.append(f"{name}: backward not bitwise deterministic")
    r = selective_scan_bwd_ref(*args(hi, cu), softplus, dout.double(), dlast.double())
    lr = (selective_scan_bwd_ref(*args(inp, cu), softplus, dout, dlast) if lowp
          else [None] * 9)
    for nm, a, b, c in zip(names, g1, r, lr):
        if b is None:
            if a is not None:
                FAILS.append(f"{name} {nm}: returned for an absent input")
            continue
        if a is None:
            FAILS.append(f"{name} {nm}: missing")
            continue
        if tuple(a.shape) != tuple(b.shape):
            FAILS.append(f"{name} {nm}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
            continue
        verdict(f"{name} {nm}", a, b, dtype if lowp else torch.float32, c)


def check_public(name, inp):
    """selective_scan_fn(backend="cuda") with autograd (the interface's backward dispatch)."""
    dtype = inp["u"].dtype
    lowp = dtype in (torch.float16, torch.bfloat16)
    gen = torch.Generator().manual_seed(2)
    dout = torch.randn(inp["u"].shape, generator=gen)
    dlast = torch.randn(inp["u"].shape[0], inp["u"].shape[1], inp["A"].shape[1], generator=gen)

    def run(d, dev, backend):
        leaves = {k: None if v is None else v.to(dev).detach().clone().requires_grad_()
                  for k, v in d.items()}
        out, last = sk.selective_scan_fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"],
                                         leaves["C"], leaves["D"], leaves["z"],
                                         leaves["delta_bias"], True, True,
                                         initial_state=leaves["h0"], backend=backend)
        loss = (out.double() * dout.to(dev, torch.float64)).sum() + \
            (last.double() * dlast.to(dev, torch.float64)).sum()
        ks = [k for k in leaves if leaves[k] is not None]
        gr = torch.autograd.grad(loss, [leaves[k] for k in ks])
        return dict(out=out, last=last, **{"d" + k: v for k, v in zip(ks, gr)})
    got = run(inp, DEV, "cuda")
    ref = run(to(inp, "cpu", torch.float64), "cpu", "reference")
    lp = run(inp, "cpu", "reference") if lowp else {}
    print(f"[{name}] public selective_scan_fn(backend='cuda') + autograd", flush=True)
    for k in ref:
        verdict(f"{name} public {k}", got[k], ref[k], dtype if lowp else torch.float32, lp.get(k))


def checks():
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    check_case("fp32 L=4097 N=16 var", make(2, 24, 4097, 16, f32))
    check_case("bf16 L=4097 N=16 groups=2", make(2, 24, 4097, 16, bf16, groups=2, seed=1))
    check_case("fp16 L=333 N=16", make(2, 40, 333, 16, f16, seed=2))
    check_case("fp32 L=300 N=1 const B/C, no D/z/bias/softplus",
               make(2, 16, 300, 1, f32, bc="const", D=False, z=False, bias=False, seed=3),
               softplus=False)
    check_case("fp32 L=129 N=4 B const C var", make(2, 12, 129, 4, f32, bc="mixed", seed=4))
    check_case("bf16 L=1000 N=64 groups=3", make(2, 48, 1000, 64, bf16, groups=3, seed=5))
    check_case("fp32 L=77 N=200 groups=2 no h0", make(1, 16, 77, 200, f32, groups=2, h0=False,
                                                     seed=6))
    check_case("fp32 L=1 N=16", make(3, 8, 1, 16, f32, seed=7))
    check_case("fp32 L=7 N=32", make(2, 8, 7, 32, f32, seed=8))
    cu = torch.tensor([0, 1, 700, 2049, 3000], dtype=torch.int32)
    check_case("bf16 varlen 4 seqs N=16", make(1, 40, 3000, 16, bf16, groups=2, nseq=4, seed=9),
               cu=cu)
    check_case("fp32 varlen N=64", make(1, 16, 500, 64, f32, nseq=3, seed=10),
               cu=torch.tensor([0, 13, 250, 500], dtype=torch.int32))
    check_case("fp32 misaligned u view", make(1, 8, 101, 16, f32, seed=11), misalign=True)
    # backward-specific: several channel tiles per group (the dB/dC partial sum over tiles, last
    # tile partial), the N<=128 bucket, B time-varying with C fixed, fixed B/C with varlen
    check_case("bf16 L=600 N=16 dim=80 (3 channel tiles)", make(2, 80, 600, 16, bf16, seed=13))
    check_case("fp32 L=257 N=64 dim=40 groups=1 (3 tiles)", make(1, 40, 257, 64, f32, seed=14))
    check_case("fp32 L=100 N=100 groups=2", make(2, 32, 100, 100, f32, groups=2, seed=15))
    check_case("bf16 L=300 N=16 B var C const groups=2",
               make(2, 64, 300, 16, bf16, bc="mixedBC", groups=2, seed=16))
    check_case("fp32 varlen N=16 const B/C", make(1, 72, 400, 16, f32, bc="const", nseq=3, seed=17),
               cu=torch.tensor([0, 64, 65, 400], dtype=torch.int32))
    check_public("bf16 public L=1000", make(2, 32, 1000, 16, bf16, seed=12))


# ---- timing ---------------------------------------------------------------------------------------

BENCH_SHAPES = [(8, 1536, 2048, 16), (4, 4096, 4096, 16)]


def bench_inputs(Bt, D, L, N):
    """The timed case: bf16 u/delta/z/B/C (one group, time-varying), fp32 A/D/delta_bias, and a
    dout like u: (u, delta, A, B, C, D, z, delta_bias, dout)."""
    torch.manual_seed(0)
    bf = torch.bfloat16
    u = torch.randn(Bt, D, L, device=DEV, dtype=bf)
    delta = (torch.randn(Bt, D, L, device=DEV) * 0.5 - 1.0).to(bf)
    A = -torch.arange(1, N + 1, device=DEV, dtype=torch.float32).repeat(D, 1)
    Bm = torch.randn(Bt, 1, N, L, device=DEV, dtype=bf)
    Cm = torch.randn(Bt, 1, N, L, device=DEV, dtype=bf)
    Dv = torch.randn(D, device=DEV)
    z = torch.randn(Bt, D, L, device=DEV, dtype=bf)
    bias = torch.randn(D, device=DEV) * 0.3
    return u, delta, A, Bm, Cm, Dv, z, bias, torch.randn_like(u)


def mamba_peer():
    """mamba-ssm's selective_scan_fn if it is importable (built), else None (said once)."""
    try:
        from ssm_kernels.benchmarks.selective_scan import _peers
        mamba_scan, _ = _peers()
    except Exception:
        mamba_scan = None
    if mamba_scan is None:
        print("mamba-ssm unavailable", flush=True)
    return mamba_scan


def bench():
    import triton
    mamba_scan = mamba_peer()
    do = lambda f: triton.testing.do_bench(f, warmup=20, rep=60, return_mode="median")  # noqa: E731
    cuda_bwd = has_cuda_bwd()
    for (Bt, D, L, N) in BENCH_SHAPES:
        shape = f"B={Bt} D={D} L={L} N={N}"
        u, delta, A, Bm, Cm, Dv, z, bias, dout = bench_inputs(Bt, D, L, N)
        res = {}
        with torch.no_grad():
            res[("ours cuda (public fn)", "fwd")] = do(lambda: sk.selective_scan_fn(
                u, delta, A, Bm, Cm, Dv, z, bias, True, backend="cuda"))
            res[("ours cuda (kernel call)", "fwd")] = do(lambda: sc.selective_scan_fwd(
                u, delta, A, Bm, Cm, Dv, z, bias, None, None, True, False))
            res[("ours cuda (kernel call, +ckpt)", "fwd")] = do(lambda: sc.selective_scan_fwd(
                u, delta, A, Bm, Cm, Dv, z, bias, None, None, True, True))
            res[("ours triton", "fwd")] = do(lambda: sk.selective_scan_fn(
                u, delta, A, Bm, Cm, Dv, z, bias, True, backend="triton"))
            if mamba_scan is not None:
                res[("mamba-ssm cuda", "fwd")] = do(lambda: mamba_scan(
                    u, delta, A, Bm, Cm, Dv, z, bias, delta_softplus=True))
        leaves = [t.detach().clone().requires_grad_() for t in (u, delta, A, Bm, Cm, Dv, z, bias)]

        def fb(fn, **kw):
            def f():
                out = fn(*leaves[:7], leaves[7], delta_softplus=True, **kw)
                out.backward(dout)
            return f
        res[("ours public fn, backend=cuda (interface bwd)", "fwd+bwd")] = do_grad(
            do, fb(sk.selective_scan_fn, backend="cuda"), leaves)
        if cuda_bwd:
            nseq_last = torch.zeros(Bt, D, N, device=DEV)

            def direct():
                out, last, ck = sc.selective_scan_fwd(u, delta, A, Bm, Cm, Dv, z, bias, None,
                                                      None, True, True)
                sc.selective_scan_bwd(u, delta, A, Bm, Cm, Dv, z, bias, None, None, ck, dout,
                                      nseq_last, True)
            res[("ours cuda fwd + cuda bwd (kernel calls)", "fwd+bwd")] = do(direct)
            _, _, ck0 = sc.selective_scan_fwd(u, delta, A, Bm, Cm, Dv, z, bias, None, None, True,
                                             True)
            res[("ours cuda bwd (kernel call)", "bwd")] = do(lambda: sc.selective_scan_bwd(
                u, delta, A, Bm, Cm, Dv, z, bias, None, None, ck0, dout, nseq_last, True))
            from ssm_kernels.selective_scan import triton as st
            res[("ours triton bwd (kernel call)", "bwd")] = do(lambda: st.selective_scan_bwd(
                u, delta, A, Bm, Cm, Dv, z, bias, None, None, ck0, dout, nseq_last, True))
        if mamba_scan is not None:
            res[("mamba-ssm cuda", "fwd+bwd")] = do_grad(do, fb(mamba_scan), leaves)
        for (impl, mode), ms in res.items():
            ROWS.append(("bench", shape, impl, mode, f"{ms:.4f}"))
        print(f"[bench] {shape} done ({time.time() - T0:.0f} s)", flush=True)


def do_grad(do, f, leaves):
    def g():
        for t in leaves:
            t.grad = None
        f()
    try:
        return do(g)
    except Exception as e:  # a peer failing must not hide our numbers
        print(f"  timing failed: {type(e).__name__}: {e}", flush=True)
        return float("nan")


def run_parts(parts, fails, *args):
    """Each part(*args) in turn; one raising is a failure, not the end of the run."""
    for part in parts:
        try:
            part(*args)
        except Exception as e:
            import traceback
            traceback.print_exc()
            fails.append(f"{part.__name__} raised {type(e).__name__}: {e}")


def write_csv(name, header, rows):
    """rows to $OUT/name (when OUT is set)."""
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, name), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)


def main():
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"CUDA backward built: {has_cuda_bwd()}", flush=True)
    run_parts((checks, bench), FAILS)
    n_checks = sum(1 for r in ROWS if r[0] == 'check')
    print(f"\nchecks: {n_checks} compared, {len(FAILS)} failures")
    for f in FAILS:
        print("  FAIL", f)
    write_csv("gpu_sscan.csv", ["section", "case", "impl", "mode", "value"], ROWS)
    print(f"total {time.time() - T0:.0f} s")
    print("\n==== selective scan, bf16, all features on (median ms) ====")
    mamba = {(r[1], r[3]): float(r[4]) for r in ROWS if r[0] == "bench" and r[2] == "mamba-ssm cuda"}
    for r in ROWS:
        if r[0] != "bench":
            continue
        m = mamba.get((r[1], r[3]))
        rel = f"  {m / float(r[4]):.2f}x mamba" if m and not math.isnan(float(r[4])) else ""
        print(f"{r[1]:24s} {r[3]:8s} {r[2]:46s} {float(r[4]):8.3f} ms{rel}")
    print(f"checks: {n_checks} compared, {len(FAILS)} failures; CUDA backward built: "
          f"{has_cuda_bwd()}")
    sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
    main()
