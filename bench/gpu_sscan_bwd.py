"""Selective-scan CUDA backward variants side by side (issue 9), one process, one build:

    TORCH_CUDA_ARCH_LIST=9.0 SSM_KERNELS_BUILD_CUDA=1 MAX_JOBS=16 \\
        pip install --no-build-isolation --no-deps -e . && python bench/gpu_sscan_bwd.py
    # OUT=/dir also writes gpu_sscan_bwd.csv there; BWD_VARIANTS=0,3 runs a subset (0 first),
    # FWD_VARIANTS=0,3 the forward variants (0 first; FWD_VARIANTS=0 skips them), REF_BWD=4 the
    # backward variants checked against float64 here (2 and 3 were, on the H100 in session 6)

Backward variants (ssm_kernels._C.selective_scan_bwd_variant(v) or SSM_KERNELS_SSCAN_BWD_VARIANT;
N <= 16 with B and C time-varying, other cases always run 0; bench/NOTES.md "backward variants 2
and 3"): 0 = default; 2 = fused I/O (owner-row staging, 8-step convert tasks, du/ddelta/dz and the
dB/dC partials written from pass 2; 2 blocks per SM); 3 = 2 without the raw staging buffer and the
softplus'/dz tile (convert reads global memory, next chunk prefetched to L2): 68 KB, 3 blocks per SM.
Both are meant to be bitwise equal to variant 0. 4 (session 7) = 2 with coalesced staging of aligned
chunks (PieceStager: consecutive lanes copy one row's 128-byte window). 5 (helper sscanbwd7) = 4 with
the dB/dC cross-channel reduce through a per-warp shared tile (no FSEL/SHFL; same tree order, so
bitwise equal to 0/2). 6 (helper sscan8) = 3 (no raw staging, 3 blocks per SM) with 5's shared-tile reductions;
7 = 6 when ceil(blocks / 3 SMs) x 1.62 < ceil(blocks / 2 SMs) (one wave instead of two: B8 D1536),
else 5. 8 (helper sscanbwd8) = 5 (staged convert, shared-tile reductions) in 32-step chunks with the
forward's 64-step checkpoints (an upper half first rebuilds its start state over the lower half, read
from L2): 71 KB, 168 registers, 3 blocks per SM; 9 = 8 when ceil(blocks / 3 SMs) x 1.5 <
ceil(blocks / 2 SMs), else 5. Both bitwise equal to 2 / 5 by construction.

Forward variants (ssm_kernels._C.selective_scan_fwd_variant(v) or SSM_KERNELS_SSCAN_FWD_VARIANT; the
N <= 16 lean kernel, B and C time-varying; session 7): 1 = coalesced staging (PieceStager) of aligned
chunks; 2 / 3 = 1 plus y reduce-scattered over 8 / 32 steps and stored as 4- / 16-byte vectors
(bf16); 4 = 32-step groups with the owner-row staging; 5 = two channels per thread (64-thread
blocks, one B/C shared-memory read per step for both channels' states) + 1 + 16-step groups.
Session 8 (helper sscan8; bench/NOTES.md "forward variants 6-8"): 6 = 3 with (dt, dt u) and (u, gate)
read two steps per 16-byte LDS (even row pitch); 7 = 6 with B and C of a step kept as packed 16-bit
pairs in shared memory (a lane's 4 states of both in one LDS.128, widened exactly by shift / mask;
16-bit storage only, fp32 runs 6); 8 = 6 with only C packed; 9 / 10 = 6 / 7 with the lanes remapped
(lane = ch0 | slice << 1 | (ch >> 1) << 3) so B/C and (dt, dt u) loads are "uniform pair" loads (half
the shared-memory return cycles) and y is reduce-scattered over lanes at stride 2. All meant bitwise equal to forward 0 (out,
last state, checkpoints): checked at 12 cases (aligned and unaligned L, partial last chunks, varlen,
groups, N = 13, partial channel tiles, fp32/fp16/bf16, no z / softplus / D, L = 1) and one float64
case per variant (with the backward on top).

(a) correctness per backward variant other than 0 (bench/gpu_sscan.py checks 0; set
    BWD_VARIANTS=0 to check it here): the forward and every gradient against the float64
    reference (bench/gpu_sscan.py's check_case: NaN-poisoned outputs, backward run twice and
    compared bitwise) at the N <= 16 cases (odd lengths -> unaligned rows, groups, varlen, several
    channel tiles, fp32/fp16/bf16, no z/D/bias/softplus, an unaligned view); then all gradients
    compared bitwise with variant 0 at both benchmark shapes and a varlen case (a FAIL if not).
(b) timing (triton.testing.do_bench, median): forward (+ checkpoints), backward alone per variant,
    fwd+bwd per variant, next to mamba-ssm's selective_scan_fn (fwd, fwd+bwd) when importable, at
    B=8 D=1536 L=2048 N=16 and B=4 D=4096 L=4096 N=16 (bf16, all features). Tables printed last;
    exit status 1 on any failed check.
"""
from __future__ import annotations

import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import gpu_sscan as gs  # noqa: E402  (check_case, make, to, poison, FAILS, bench_inputs)
from ssm_kernels._backend import cuda_extension  # noqa: E402
from ssm_kernels.selective_scan import cuda as sc  # noqa: E402

DEV = "cuda"
T0 = time.time()
BWD_VARIANTS = [0, 5, 6, 7, 8, 9]
FWD_VARIANTS = [0, 3, 6, 7, 8, 9, 10]
REF_BWD = [8]
ROWS: list = []  # (section, case, variant, what, value)
GRADS = ["du", "ddelta", "dA", "dB", "dC", "dD", "dz", "dbias", "dh0"]


def set_bwd_variant(v: int) -> None:
    prev = cuda_extension().selective_scan_bwd_variant(v)
    if cuda_extension().selective_scan_bwd_variant(v) != v:
        raise RuntimeError(f"backward variant {v} not accepted by this build (was {prev})")


def set_fwd_variant(v: int) -> None:
    ext = cuda_extension()
    if not hasattr(ext, "selective_scan_fwd_variant"):
        if v == 0:  # an older build: its only forward
            return
        raise RuntimeError("this build has no selective_scan_fwd_variant")
    ext.selective_scan_fwd_variant(v)
    if ext.selective_scan_fwd_variant(v) != v:
        raise RuntimeError(f"forward variant {v} not accepted by this build")


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    den = torch.linalg.vector_norm(b).item()
    num = torch.linalg.vector_norm(a - b).item()
    return num / den if den > 0 else num


def fwd_args(d, cu):
    return (d["u"], d["delta"], d["A"], d["B"], d["C"], d["D"], d["z"], d["delta_bias"], d["h0"], cu)


def reference_checks(v):
    """float64 checks (gpu_sscan.check_case) of the cases variant v applies to (N <= 16, B/C var)."""
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    set_bwd_variant(v)
    n0 = len(gs.FAILS)
    m = gs.make
    gs.check_case(f"bwd{v} fp32 L=4097 N=16", m(2, 24, 4097, 16, f32))
    gs.check_case(f"bwd{v} bf16 L=4097 N=16 groups=2", m(2, 24, 4097, 16, bf16, groups=2, seed=1))
    gs.check_case(f"bwd{v} fp16 L=333 N=16", m(2, 40, 333, 16, f16, seed=2))
    gs.check_case(f"bwd{v} fp32 L=300 N=16 no D/z/bias/softplus",
                  m(2, 16, 300, 16, f32, D=False, z=False, bias=False, seed=3), softplus=False)
    gs.check_case(f"bwd{v} bf16 L=1000 N=13 groups=3 no h0",
                  m(2, 48, 1000, 13, bf16, groups=3, h0=False, seed=5))
    gs.check_case(f"bwd{v} fp32 L=1 N=16", m(3, 8, 1, 16, f32, seed=7))
    gs.check_case(f"bwd{v} bf16 varlen 4 seqs N=16", m(1, 40, 3000, 16, bf16, groups=2, nseq=4, seed=9),
                  cu=torch.tensor([0, 1, 700, 2049, 3000], dtype=torch.int32))
    gs.check_case(f"bwd{v} fp32 misaligned u view", m(1, 8, 101, 16, f32, seed=11), misalign=True)
    gs.check_case(f"bwd{v} bf16 L=600 N=16 dim=80 (3 channel tiles)", m(2, 80, 600, 16, bf16, seed=13))
    ROWS.append(("check", "float64 reference (9 cases)", v, "ok",
                 "pass" if len(gs.FAILS) == n0 else f"FAIL ({len(gs.FAILS) - n0})"))
    set_bwd_variant(0)


def bitwise_checks(name, inp, variants, cu=None, softplus=True):
    """Every gradient of each variant vs the first one's, from one forward's checkpoints."""
    g = gs.to(inp, DEV)
    cu_d = None if cu is None else cu.to(DEV)
    _, last, ck = sc.selective_scan_fwd(*fwd_args(g, cu_d), softplus, True)
    gen = torch.Generator().manual_seed(1)
    dout = torch.randn(inp["u"].shape, generator=gen).to(inp["u"].dtype).to(DEV)
    dlast = torch.randn(tuple(last.shape), generator=gen).to(DEV)
    base = None
    for v in variants:
        set_bwd_variant(v)
        gs.poison()
        grads = sc.selective_scan_bwd(*fwd_args(g, cu_d), ck, dout, dlast, softplus)
        torch.cuda.synchronize()
        if base is None:
            base = [None if x is None else x.clone() for x in grads]
            continue
        bad = [f"{nm} " + ("missing" if a is None or b is None else f"{rel_err(a, b):.1e}")
               for nm, a, b in zip(GRADS, grads, base)
               if (a is None) != (b is None) or (a is not None and not torch.equal(a, b))]
        same = "bitwise" if not bad else "differs: " + ", ".join(bad)
        print(f"[{name}] bwd v{v} vs v{variants[0]}: {same}", flush=True)
        if bad:
            gs.FAILS.append(f"{name} bwd v{v}: not bitwise equal to v{variants[0]} ({same})")
        ROWS.append(("check", name, v, f"vs v{variants[0]}", same))
    set_bwd_variant(0)


def out_close(a, b) -> bool:
    """a within one storage ulp of b (plus a float32 cancellation floor): y summed in another order."""
    ulp = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}.get(a.dtype, 2.0 ** -20)
    ref = b.float().abs()
    return bool(((a.float() - b.float()).abs() <= ref * ulp + 1e-5 * ref.max() + 1e-6).all())


def fwd_bitwise(name, inp, variants, cu=None, softplus=True, rounding=()):
    """out, last state and the written checkpoint rows of each forward variant vs the first one's
    (variants in `rounding`: out within rounding (out_close), states still bitwise)."""
    g = gs.to(inp, DEV)
    cu_d = None if cu is None else cu.to(DEV)
    base = None
    for v in variants:
        set_fwd_variant(v)
        gs.poison()
        res = sc.selective_scan_fwd(*fwd_args(g, cu_d), softplus, True)
        torch.cuda.synchronize()
        res = [x.clone() for x in res]
        if base is None:
            base = res
            if cu is not None:  # packed sequences leave spare checkpoint rows unwritten
                from ssm_kernels.selective_scan.reference import chunk_len
                c = chunk_len(inp["A"].shape[1])
                used = int(sum(-(-int(n) // c) for n in (cu[1:] - cu[:-1]).tolist()))
                base[2] = base[2][:used]
            continue
        res[2] = res[2][:base[2].shape[0]]
        bad = [f"{nm} " + ("shape" if a.shape != b.shape else f"{rel_err(a, b):.1e}")
               for nm, a, b in zip(("out", "last", "ckpt"), res, base)
               if a.shape != b.shape or not (torch.equal(a, b) or
                                             (nm == "out" and v in rounding and out_close(a, b)))]
        same = "bitwise" if torch.equal(res[0], base[0]) else f"out within rounding ({rel_err(res[0], base[0]):.1e})"
        same = same if not bad else "differs: " + ", ".join(bad)
        print(f"[{name}] fwd v{v} vs v{variants[0]}: {same}", flush=True)
        if bad:
            gs.FAILS.append(f"{name} fwd v{v}: not equal to fwd v{variants[0]} ({same})")
        ROWS.append(("check", name, f"fwd{v}", f"vs v{variants[0]}", same))
    set_fwd_variant(0)


def fwd_cases():
    """(name, inputs, cu_seqlens, softplus) of the forward-variant comparisons."""
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    m = gs.make
    return [
        ("bf16 B=8 D=1536 L=2048 N=16", m(8, 1536, 2048, 16, bf16, seed=35), None, True),
        ("bf16 B=4 D=4096 L=4096 N=16", m(4, 4096, 4096, 16, bf16, seed=36), None, True),
        ("bf16 L=2056 (aligned, last chunk 8)", m(2, 64, 2056, 16, bf16, seed=40), None, True),
        ("bf16 L=4097 groups=2 (unaligned)", m(2, 24, 4097, 16, bf16, groups=2, seed=1), None, True),
        ("fp32 L=4096 N=16", m(2, 40, 4096, 16, f32, seed=41), None, True),
        ("fp32 L=4097 N=16", m(2, 24, 4097, 16, f32, seed=0), None, True),
        ("fp16 L=4093 N=16 no z", m(2, 96, 4093, 16, f16, z=False, seed=37), None, True),
        ("fp16 L=1024 no D/z/bias/softplus", m(2, 32, 1024, 16, f16, D=False, z=False, bias=False,
                                              seed=42), None, False),
        ("bf16 L=1000 N=13 groups=3 no h0", m(2, 48, 1000, 13, bf16, groups=3, h0=False, seed=5),
         None, True),
        ("bf16 L=600 dim=80 (3 channel tiles)", m(2, 80, 600, 16, bf16, seed=13), None, True),
        ("fp32 L=1", m(3, 8, 1, 16, f32, seed=7), None, True),
        ("bf16 varlen (1, 699, 1349, 951)", m(1, 200, 3000, 16, bf16, groups=2, nseq=4, seed=34),
         torch.tensor([0, 1, 700, 2049, 3000], dtype=torch.int32), True),
        ("bf16 varlen aligned (8, 1016, 1024)", m(1, 64, 2048, 16, bf16, nseq=3, seed=43),
         torch.tensor([0, 8, 1024, 2048], dtype=torch.int32), True),
    ]


def fwd_checks(fvariants):
    if len(fvariants) < 2:
        return
    bf16 = torch.bfloat16
    for name, inp, cu, sp in fwd_cases():
        fwd_bitwise(name, inp, fvariants, cu=cu, softplus=sp)
    for v in fvariants[1:]:  # float64 (fwd, then the default backward on its checkpoints)
        set_fwd_variant(v)
        n0 = len(gs.FAILS)
        gs.check_case(f"fwd{v} bf16 L=2048 N=16 groups=2", gs.make(2, 48, 2048, 16, bf16, groups=2,
                                                                  seed=44))
        ROWS.append(("check", "float64 reference (1 case)", f"fwd{v}", "ok",
                     "pass" if len(gs.FAILS) == n0 else f"FAIL ({len(gs.FAILS) - n0})"))
    set_fwd_variant(0)


def checks(variants, fvariants):
    fwd_checks(fvariants)
    for v in variants[1:] if len(variants) > 1 else variants:  # v0: bench/gpu_sscan.py checks it
        if v in REF_BWD or len(variants) == 1:
            reference_checks(v)
    bf16 = torch.bfloat16
    bitwise_checks("bf16 B=8 D=1536 L=2048 N=16", gs.make(8, 1536, 2048, 16, bf16, seed=35), variants)
    bitwise_checks("bf16 B=4 D=4096 L=4096 N=16", gs.make(4, 4096, 4096, 16, bf16, seed=36), variants)
    bitwise_checks("bf16 varlen (1, 699, 1349, 951) N=16",
                   gs.make(1, 200, 3000, 16, bf16, groups=2, nseq=4, seed=34), variants,
                   cu=torch.tensor([0, 1, 700, 2049, 3000], dtype=torch.int32))
    bitwise_checks("fp16 L=4093 N=16 no z", gs.make(2, 96, 4093, 16, torch.float16, z=False, seed=37),
                   variants)


def do_bench(f) -> float:
    import triton
    return triton.testing.do_bench(f, warmup=10, rep=50, return_mode="median")


def shape_inputs():
    """Per benchmark shape: (label, selective_scan_fwd's first 10 args, dout, dlast)."""
    for (Bt, D, L, N) in gs.BENCH_SHAPES:
        u, delta, A, Bm, Cm, Dv, z, bias, dout = gs.bench_inputs(Bt, D, L, N)
        yield (f"B={Bt} D={D} L={L} N={N}", (u, delta, A, Bm, Cm, Dv, z, bias, None, None), dout,
               torch.zeros(Bt, D, N, device=DEV))


def bench(variants, fvariants):
    mamba_scan = gs.mamba_peer()
    do = do_bench
    for shape, a, dout, dlast in shape_inputs():
        with torch.no_grad():
            fbest = (float("inf"), 0)
            for fv in fvariants:
                set_fwd_variant(fv)
                ROWS.append(("bench", shape, f"fwd v{fv}", "fwd",
                             do(lambda: sc.selective_scan_fwd(*a, True, False))))
                tck = do(lambda: sc.selective_scan_fwd(*a, True, True))
                ROWS.append(("bench", shape, f"fwd v{fv}", "fwd+ckpt", tck))
                fbest = min(fbest, (tck, fv))
            set_fwd_variant(0)
            _, _, ck0 = sc.selective_scan_fwd(*a, True, True)

            def fb():
                _, _, ck = sc.selective_scan_fwd(*a, True, True)
                sc.selective_scan_bwd(*a, ck, dout, dlast, True)
            for v in variants:
                set_bwd_variant(v)
                ROWS.append(("bench", shape, f"bwd v{v}", "bwd",
                             do(lambda: sc.selective_scan_bwd(*a, ck0, dout, dlast, True))))
                ROWS.append(("bench", shape, f"bwd v{v}", "fwd+bwd", do(fb)))
            # the fastest forward (fwd+ckpt) with the fastest backward, as one fwd+bwd
            tb = {r[2]: r[4] for r in ROWS if r[0] == "bench" and r[1] == shape and r[3] == "bwd"}
            bbest = int(min(tb, key=tb.get)[len("bwd v"):])
            set_fwd_variant(fbest[1])
            set_bwd_variant(bbest)
            ROWS.append(("bench", shape, f"f{fbest[1]}+b{bbest}", "fwd+bwd", do(fb)))
            set_fwd_variant(0)
            set_bwd_variant(0)
        mamba_rows(mamba_scan, do, shape, a[:8], dout)
        print(f"[bench] {shape} done ({time.time() - T0:.0f} s)", flush=True)


def mamba_rows(mamba_scan, do, shape, inputs, dout):
    """mamba-ssm's fwd and fwd+bwd times at one shape (inputs: u, delta, A, B, C, D, z, bias) -> ROWS."""
    if mamba_scan is None:
        return
    with torch.no_grad():
        ROWS.append(("bench", shape, "mamba", "fwd", do(lambda: mamba_scan(*inputs, delta_softplus=True))))
    leaves = [t.detach().clone().requires_grad_() for t in inputs]

    def mfb():
        for t in leaves:
            t.grad = None
        mamba_scan(*leaves, delta_softplus=True).backward(dout)
    try:
        ROWS.append(("bench", shape, "mamba", "fwd+bwd", do(mfb)))
    except Exception as e:
        print(f"  mamba fwd+bwd failed: {type(e).__name__}: {e}", flush=True)


def report():
    print(f"\ntotal {time.time() - T0:.0f} s, device {torch.cuda.get_device_name()}")
    print("\n==== checks ====")
    for r in ROWS:
        if r[0] == "check":
            tag = r[2] if isinstance(r[2], str) else f"bwd{r[2]}"
            print(f"{r[1]:44s} {tag:5s} {r[4]}")
    print("\n==== selective scan, bf16, all features (median ms) ====")
    print(f"{'shape':24s} {'impl':8s} {'fwd':>8s} {'fwd+ckpt':>9s} {'bwd':>8s} {'fwd+bwd':>8s}  vs mamba")
    for shape in dict.fromkeys(r[1] for r in ROWS if r[0] == "bench"):
        t = {(r[2], r[3]): r[4] for r in ROWS if r[0] == "bench" and r[1] == shape}
        mf, mfb = t.get(("mamba", "fwd")), t.get(("mamba", "fwd+bwd"))
        for impl in dict.fromkeys(k[0] for k in t):
            cell = lambda k: f"{t[(impl, k)]:8.3f}" if (impl, k) in t else f"{'-':>8s}"  # noqa: E731
            rel = ""
            if impl.startswith("fwd") and mf:
                rel = f"fwd {mf / t[(impl, 'fwd')]:.2f}x"
            if (impl.startswith("bwd") or impl.startswith("f")) and (impl, "fwd+bwd") in t and mfb:
                rel = f"fwd+bwd {mfb / t[(impl, 'fwd+bwd')]:.2f}x"
            print(f"{shape:24s} {impl:8s} {cell('fwd')} {cell('fwd+ckpt'):>9s} {cell('bwd')} "
                  f"{cell('fwd+bwd')}  {rel}")
    print(f"checks: {len(gs.FAILS)} failures")
    for f in gs.FAILS:
        print("  FAIL", f)


def main():
    ext = cuda_extension()
    if ext is None or not hasattr(ext, "selective_scan_bwd_variant") or not gs.has_cuda_bwd():
        sys.exit("ssm_kernels._C without the CUDA backward / selective_scan_bwd_variant: rebuild")
    global BWD_VARIANTS, FWD_VARIANTS, REF_BWD
    BWD_VARIANTS = [int(x) for x in os.environ.get("BWD_VARIANTS", "0,5,6,7,8,9").split(",")]
    FWD_VARIANTS = [int(x) for x in os.environ.get("FWD_VARIANTS", "0,3,6,7,8,9,10").split(",")]
    REF_BWD = [int(x) for x in os.environ.get("REF_BWD", "8").split(",") if x]
    assert BWD_VARIANTS[0] == 0 and FWD_VARIANTS[0] == 0, "variant 0 first (others are compared with it)"
    if not hasattr(ext, "selective_scan_fwd_variant"):
        FWD_VARIANTS = [0]
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"backward variants {BWD_VARIANTS}, forward variants {FWD_VARIANTS}", flush=True)
    gs.run_parts((checks, bench), gs.FAILS, BWD_VARIANTS, FWD_VARIANTS)
    gs.write_csv("gpu_sscan_bwd.csv", ["section", "case", "variant", "what", "value"], ROWS)
    report()
    sys.exit(1 if gs.FAILS else 0)


if __name__ == "__main__":
    main()
