"""GPU check + benchmark of the chunked engine (issue #10): `python bench/gpu_chunk.py`.

1. Correctness at a real size: every variant (chunk_linear_attn, chunk_simple_gla with g and
   g_gamma, chunk_gla, mamba_chunk_scan_combined) forward + backward against the float64 chunked
   reference on the GPU, bf16 inputs, B2 T2048 H4 K=V=128, plus one varlen batch; judged with the
   repo's rule (error <= 2x the error of the same reference fed the bf16-rounded inputs + floor).
2. Timing (triton.testing.do_bench median), fwd and fwd+bwd, side by side with
   flash-linear-attention (fla.ops.*; importable via PYTHONPATH) and mamba-ssm's
   mamba_chunk_scan_combined (mamba_ssm source on PYTHONPATH), each peer in try/except.
   The first call of each of our ops (compile) is timed too.
Prints the table last; writes CSV rows to $OUT/gpu_chunk.csv when $OUT is set.

SAVE_AB=1 python bench/gpu_chunk.py: SAVE_STATES 0 / 1 / 2 (kept forward tensors) side by side
per op at the issue's shapes, bitwise-equal gradients and the step's peak memory (~1 min).

ENGINE_AB=1 python bench/gpu_chunk.py: the forward knobs of session 7 (chunk.common H_EVERY,
OUT_DECAY_O, OUT_BLOCK_V, OUT_WARPS, GLA_PREP) checked against float64 and timed against the
default and fla / mamba-ssm in one process (engine_ab; AB_SETS=, AB_S=, AB_CHECK=0, PEERS=0).

FWD_DEFAULTS=1 python bench/gpu_chunk.py: session 8's forward defaults (chunk.common FWD_AUTO)
checked against float64 and timed against the old path, OUT_SCORES_EARLY, a forward chunk of 128
and fla / mamba-ssm in one process (fwd_defaults; ~200-240 s, AB_S=200 caps the timing part).

TWO_LEVEL=1 python bench/gpu_chunk.py: session 9's two-level forward (chunk.common FUSED_FWD=1,
SSM_KERNELS_FUSED_FWD=1: segment states, a scan, the output walked with the state in registers;
no per-chunk h in HBM) checked against float64 (o, ht, every gradient, dense and varlen, SSD) and
timed against the default forward and fla at B4 T4096 and B2 T16384 H16 K=V=128, with its
stages one by one and its knobs (two_level; ~300-400 s, AB_S=420 caps the timing part).

GLA_VARIANTS=1 python bench/gpu_chunk.py: chunk_gla only, every variant of GLA_VARIANT_LIST
(ssm_kernels.chunk.gla knobs) checked (two gate strengths) and timed next to fla, plus the stages
of the tree and the session-4 kernels (~200 s).
"""
from __future__ import annotations

import csv
import math
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import ssm_kernels as sk  # noqa: E402
from ssm_kernels.linear_attn.reference import linear_attn_chunk_ref  # noqa: E402
from ssm_kernels.ssd.reference import ssd_ref  # noqa: E402
from ssm_kernels.testing import bound_for, rel_err  # noqa: E402

DEV = "cuda"
BF = torch.bfloat16
COPY_GBS = 4270.0          # H200 copy bandwidth (DESIGN.md), for the byte floor
ROWS = []                  # (section, case, impl, mode, ms, note)
# ONLY=chunk_gla (comma-separated ops, "ssd" included) limits every section to those ops;
# SWEEP_S: seconds since start after which the tile sweep stops (default 170)
ONLY = [x for x in os.environ.get("ONLY", "").split(",") if x]
SWEEP_S = float(os.environ.get("SWEEP_S", "170"))
# QUICK=1: correctness, then our timings at the first shape only (no peers, no sweep)
QUICK = os.environ.get("QUICK", "0") == "1"
# PEERS=0: no fla / mamba-ssm rows (their autotuning took minutes in earlier runs)
PEERS = os.environ.get("PEERS", "1") == "1"
# KNOBS="FUSED_FWD=0,SEG_CHUNKS=4": engine knobs (ssm_kernels.chunk.common) set for the whole run
KNOBS = dict(kv.split("=") for kv in os.environ.get("KNOBS", "").split(",") if kv)


def want(op):
    return not ONLY or op in ONLY
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


# ---- inputs ----------------------------------------------------------------------------------

def la_inputs(B, T, H, K, V, gate, dtype=BF, req=False, gdiv=16):
    q, k = (torch.randn(2, B, T, H, K, device=DEV) * K ** -0.25).to(dtype).unbind(0)
    v = torch.randn(B, T, H, V, device=DEV).to(dtype)
    g = None
    if gate == "scalar":
        g = F.logsigmoid(torch.randn(B, T, H, device=DEV)) / gdiv
    elif gate == "gla":
        g = F.logsigmoid(torch.randn(B, T, H, K, device=DEV)) / gdiv
    xs = [q, k, v, g]
    if req:
        xs = [None if x is None else x.requires_grad_() for x in xs]
    return xs


def ssd_inputs(B, L, H, P, G, N, dtype=BF, req=False):
    x = torch.randn(B, L, H, P, device=DEV).to(dtype)
    dt = torch.randn(B, L, H, device=DEV) - 2.0
    A = -torch.rand(H, device=DEV) * 4 - 0.5
    Bm, Cm = torch.randn(2, B, L, G, N, device=DEV).to(dtype).unbind(0)
    D = torch.randn(H, device=DEV)
    bias = torch.randn(H, device=DEV) * 0.1
    xs = [x, dt, A, Bm, Cm, D, bias]
    if req:
        xs = [t.requires_grad_() for t in xs]
    return xs


OURS = {
    "chunk_linear_attn": lambda q, k, v, g: sk.chunk_linear_attn(q, k, v, normalize=False)[0],
    "chunk_simple_gla": lambda q, k, v, g: sk.chunk_simple_gla(q, k, v, g)[0],
    "chunk_gla": lambda q, k, v, g: sk.chunk_gla(q, k, v, g)[0],
}
GATE = {"chunk_linear_attn": None, "chunk_simple_gla": "scalar", "chunk_gla": "gla"}


def fla_ops():
    """fla's functions (each lambda binds its own f: a late-bound f made every row call chunk_gla
    in session 2 run 6)."""
    ops = {}
    try:
        from fla.ops.linear_attn import chunk_linear_attn as f
        ops["chunk_linear_attn"] = lambda q, k, v, g, f=f: f(q, k, v, normalize=False)[0]
    except Exception as e:  # noqa: BLE001
        log("fla chunk_linear_attn unavailable:", repr(e)[:120])
    try:
        from fla.ops.simple_gla import chunk_simple_gla as f
        ops["chunk_simple_gla"] = lambda q, k, v, g, f=f: f(q, k, v, g)[0]
    except Exception as e:  # noqa: BLE001
        log("fla chunk_simple_gla unavailable:", repr(e)[:120])
    try:
        from fla.ops.gla import chunk_gla as f
        ops["chunk_gla"] = lambda q, k, v, g, f=f: f(q, k, v, g)[0]
    except Exception as e:  # noqa: BLE001
        log("fla chunk_gla unavailable:", repr(e)[:120])
    return ops


def mamba_op():
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as f
        return f
    except Exception as e:  # noqa: BLE001
        log("mamba_ssm unavailable:", repr(e)[:160])
        return None


# ---- 1. correctness ----------------------------------------------------------------------------

def grads_of(fn, inputs, cots):
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o.double() * c).sum() for o, c in zip(outs, cots))
    live = [x for x in leaves if x is not None]
    return list(outs) + list(torch.autograd.grad(loss, live))


def judge(label, names, got, ref, lowp):
    ok = True
    for n, a, r, l in zip(names, got, ref, lowp):
        if not torch.isfinite(a).all():
            log(f"  FAIL {label} {n}: non-finite")
            ok = False
            continue
        e, b = rel_err(a, r), bound_for(BF, rel_err(l, r))
        if n in ("dg", "dA", "ddt", "ddt_bias"):   # decay grads: judged against |q * dq|-sized terms
            b = max(b, 2e-2)
        flag = "ok" if e <= b else "FAIL"
        ok &= e <= b
        log(f"  {flag:4s} {label:34s} {n:6s} err {e:.2e} bound {b:.2e}")
    return ok


def check_la(op, B=2, T=2048, H=4, K=128, V=128, cu=None, gdiv=16, tag=""):
    gate = GATE[op]
    q, k, v, g = la_inputs(B, T, H, K, V, gate, gdiv=gdiv)
    N = B if cu is None else cu.numel() - 1
    h0 = torch.randn(N, H, K, V, device=DEV)
    gam = -torch.rand(H, device=DEV) * 0.1 if op == "chunk_simple_gla" else None

    def ours(q, k, v, g, h0):
        if op == "chunk_linear_attn":
            return sk.chunk_linear_attn(q, k, v, initial_state=h0, output_final_state=True,
                                        normalize=False, cu_seqlens=cu)
        if op == "chunk_simple_gla":
            return sk.chunk_simple_gla(q, k, v, g, gam, initial_state=h0, output_final_state=True,
                                       cu_seqlens=cu)
        return sk.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)

    def ref(q, k, v, g, h0):
        geff = g if gam is None else g + gam.to(g.dtype)
        return linear_attn_chunk_ref(q, k, v, geff, None, h0, cu, chunk_size=64)

    cots = (torch.randn(B, T, H, V, device=DEV, dtype=torch.float64),
            torch.randn(N, H, K, V, device=DEV, dtype=torch.float64))
    ins = [q, k, v, g, h0]
    got = grads_of(ours, ins, cots)
    r = grads_of(ref, [None if x is None else x.double() for x in ins], cots)
    lp = grads_of(ref, ins, cots)         # the same reference fed the bf16 inputs
    names = ["o", "ht", "dq", "dk", "dv"] + (["dg"] if g is not None else []) + ["dh0"]
    return judge(f"{op}{' varlen' if cu is not None else ''}{tag}", names, got, r, lp)


def check_ssd(B=2, L=2048, H=8, P=64, G=2, N=128, cu=None):
    x, dt, A, Bm, Cm, D, bias = ssd_inputs(B, L, H, P, G, N)
    n = B if cu is None else cu.numel() - 1
    h0 = torch.randn(n, H, P, N, device=DEV)

    def ours(x, dt, A, Bm, Cm, D, bias, h0):
        r = sk.mamba_chunk_scan_combined(x, dt, A, Bm, Cm, 64, D=D, dt_bias=bias,
                                         initial_states=h0, dt_softplus=True, cu_seqlens=cu,
                                         return_final_states=cu is None,
                                         return_varlen_states=cu is not None)
        return r

    def ref(x, dt, A, Bm, Cm, D, bias, h0):
        return ssd_ref(x, dt, A, Bm, Cm, 64, D=D, dt_bias=bias, initial_states=h0,
                       cu_seqlens=cu, dt_softplus=True)

    cots = (torch.randn(B, L, H, P, device=DEV, dtype=torch.float64),
            torch.randn(n, H, P, N, device=DEV, dtype=torch.float64))
    ins = [x, dt, A, Bm, Cm, D, bias, h0]
    got = grads_of(ours, ins, cots)
    r = grads_of(ref, [t.double() for t in ins], cots)
    lp = grads_of(ref, ins, cots)
    names = ["y", "ht", "dx", "ddt", "dA", "dB", "dC", "dD", "ddt_bias", "dh0"]
    return judge(f"ssd{' varlen' if cu is not None else ''}", names, got, r, lp)


def check_ssd_infer(B=2, L=2047, H=8, P=64, G=2, N=128):
    """Eager inference with D (nheads, headdim) and z: D and silu(z) in the output kernel's
    epilogue, on the per-chunk-state path (FUSED_FWD=0) and the fused one (1), bf16, against the
    float64 reference (L odd: a partial last chunk)."""
    from ssm_kernels.chunk import common as knobs
    x, dt, A, Bm, Cm, _, bias = ssd_inputs(B, L, H, P, G, N)
    D = torch.randn(H, P, device=DEV)
    z = torch.randn_like(x)
    h0 = torch.randn(B, H, P, N, device=DEV)
    kw = dict(D=D, z=z, dt_bias=bias, initial_states=h0, dt_softplus=True)
    r = ssd_ref(*(t.double() for t in (x, dt, A, Bm, Cm)), 64,
                **{k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()})
    lp = ssd_ref(x, dt, A, Bm, Cm, 64, **kw)
    ok, saved = True, knobs.FUSED_FWD
    try:
        for on in (0, 1):
            knobs.FUSED_FWD = on
            with torch.no_grad():
                got = sk.mamba_chunk_scan_combined(x, dt, A, Bm, Cm, 64, return_final_states=True,
                                                   **kw)
            ok &= judge(f"ssd infer D,z FUSED_FWD={on}", ["y", "ht"], got, r, lp)
    finally:
        knobs.FUSED_FWD = saved
    return ok


def stage_rows(section, case, t):
    """Rows (and log lines) of one stage timing: t maps stage name -> median ms."""
    for name, ms in t.items():
        ROWS.append((section, case, name, "fwd", ms, "one stage"))
        log(f"{section} {case} {name:42s} {ms:8.3f} ms")


def _gla_stage_setup(B, T, H, K, V):
    """Inputs of one chunk_gla stage timing: (modules bwd, fwd, gla, q, k, v, g, do, scale, plan,
    Gc, states h, a random dh, a median-ms timer)."""
    from ssm_kernels.chunk import bwd as cb, fwd as cf, gla as cg
    q, k, v, g = la_inputs(B, T, H, K, V, "gla")
    do = torch.randn_like(v)
    scale = K ** -0.5
    p = cf.Plan(q, v, g, None, False)
    gc = cg.chunk_cumsum(p, g)
    h, _ = cf.chunk_states(p, k, v, gc, None, None, None)
    bm = lambda f: do_bench(f, warmup=10, rep=40, return_mode="median")  # noqa: E731
    return cb, cf, cg, q, k, v, g, do, scale, p, gc, h, torch.randn_like(h), bm


def gla_stage_times(B=4, T=4096, H=16, K=128, V=128):
    """chunk_gla's stages timed one by one (the per-stage predictions in bench/NOTES.md): cumsum,
    chunk states, intra-chunk scores, the dq/dk/dg stage, and by difference the output stage
    (forward minus the three before it) and state gradients + dv (backward minus the rest)."""
    cb, cf, cg, q, k, v, g, do, scale, p, gc, h, dh, bench_ms = _gla_stage_setup(B, T, H, K, V)
    t = {"cumsum": bench_ms(lambda: cg.chunk_cumsum(p, g)),
         "states": bench_ms(lambda: cf.chunk_states(p, k, v, gc, None, None, None)),
         "intra": bench_ms(lambda: cg.intra_scores(p, q, k, gc, scale)),
         "fwd total": bench_ms(lambda: cf.chunk_fwd(q, k, v, g, None, None, scale)),
         "dqkg": bench_ms(lambda: cg.dqkg(p, q, k, v, do, gc, h, dh, scale)),
         "bwd total": bench_ms(lambda: cb.chunk_bwd(q, k, v, g, None, None, scale, do, None))}
    t["output (fwd - cumsum - states - intra)"] = t["fwd total"] - t["cumsum"] - t["states"] - t["intra"]
    t["state_grad + dv (bwd - the others)"] = (t["bwd total"] - t["cumsum"] - t["states"] - t["intra"]
                                              - t["dqkg"])
    case = f"B{B} T{T} H{H} K=V={K} BT={p.BT} SUB={p.meta['SUB']}"
    stage_rows("chunk_gla stage", case, t)


def stage_times(op, B=4, T=4096, H=16, K=128, V=128):
    """The forward of chunk_simple_gla / chunk_linear_attn / ssd (K = dstate, V = headdim, H value
    heads, one B/C group) timed stage by stage (rows "<op> stage"): the fused forward's three
    stages (segment states, segment scan, fused output after it or with the lookback instead), the
    engine forward with FUSED_FWD on and off, the per-chunk-state path's state stage and by
    difference its output stage; ssd also the public call with D, and with D and z (no grad: D
    and silu(z) in the output kernel's epilogue on either path; FUSE_EPILOGUE=0: in torch)."""
    from ssm_kernels.chunk import common as knobs, fwd as cf
    bench_ms = lambda f: do_bench(f, warmup=10, rep=40, return_mode="median")  # noqa: E731
    t = {}
    A = vs = g = None
    if op == "ssd":
        import ssm_kernels.ssd.interface as si
        x, dt, A, Bm, Cm, D, bias = ssd_inputs(B, T, H, V, 1, K)
        q, k, v, scale = Cm, Bm, x, 1.0
        vs = F.softplus(dt + bias)
        z = torch.randn_like(x)
        pub = lambda z=None: sk.mamba_chunk_scan_combined(  # noqa: E731
            x, dt, A, Bm, Cm, 256, D=D, z=z, dt_bias=bias, dt_softplus=True)
    else:
        q, k, v, g = la_inputs(B, T, H, K, V, GATE[op])
        scale = K ** -0.5
    p = cf.Plan(q, v, g, None, A is not None)
    with torch.no_grad():
        hs, gs = cf.seg_states(p, k, v, g, vs, A)
        sin, _ = cf.seg_scan(p, hs, gs, None)
        t["fused 1: segment states"] = bench_ms(lambda: cf.seg_states(p, k, v, g, vs, A))
        t["fused 2: segment scan"] = bench_ms(lambda: cf.seg_scan(p, hs, gs, None))
        t["fused 3: output after stage 2"] = bench_ms(
            lambda: cf.fused_output(p, q, k, v, g, vs, A, sin, scale))
        ht = torch.empty(p.N, p.H, p.K, p.V, device=DEV)
        t["fused 3: output, lookback (no stage 2)"] = bench_ms(
            lambda: cf.fused_output(p, q, k, v, g, vs, A, hs, scale, ht=ht, gs=gs))
        saved = knobs.FUSED_FWD
        try:
            for on in (1, 0):
                knobs.FUSED_FWD = on
                t[f"engine fwd FUSED_FWD={on}"] = bench_ms(
                    lambda: cf.chunk_fwd(q, k, v, g, None, None, scale, vs=vs, A=A))
                if op == "ssd":
                    for fe in (1, 0):
                        si.FUSE_EPILOGUE = bool(fe)
                        t[f"public fwd FUSED_FWD={on} FUSE_EPILOGUE={fe}"] = bench_ms(pub)
                        t[f"public fwd +z FUSED_FWD={on} FUSE_EPILOGUE={fe}"] = bench_ms(
                            lambda: pub(z))
                    si.FUSE_EPILOGUE = True
        finally:
            knobs.FUSED_FWD = saved
        t["per-chunk path: states (h stored)"] = bench_ms(
            lambda: cf.chunk_states(p, k, v, g, vs, A, None))
    t["per-chunk path: output (fwd - states)"] = (t["engine fwd FUSED_FWD=0"]
                                                  - t["per-chunk path: states (h stored)"])
    case = (f"B{B} L{T} H{H} P{V} N{K}" if op == "ssd" else f"B{B} T{T} H{H} K=V={K}") + \
        f" BT={p.BT} SEG={knobs.SEG_CHUNKS * p.BT}"
    stage_rows(f"{op} stage", case, t)


def seg_bwd_times(op, B=4, T=4096, H=16, K=128, V=128):
    """The engine backward of chunk_simple_gla / chunk_linear_attn / ssd (K = dstate, V = headdim,
    one B/C group) with its serial per-row passes (SEG_BWD=0) and in segments (1: the recompute of
    h, 2: also the reverse state-gradient scan dh), rows "<op> bwd stage": the whole chunk_bwd per
    knob (its results checked against SEG_BWD=0: max rel err in the note), and its h / dh pieces
    serial vs in segments (the serial dh scan by difference)."""
    from ssm_kernels.chunk import bwd as cb, common as knobs, fwd as cf
    bench_ms = lambda f: do_bench(f, warmup=10, rep=40, return_mode="median")  # noqa: E731
    A = vs = g = None
    if op == "ssd":
        x, dt, A, Bm, Cm, D, bias = ssd_inputs(B, T, H, V, 1, K)
        q, k, v, scale = Cm, Bm, x, 1.0
        vs = F.softplus(dt + bias)
    else:
        q, k, v, g = la_inputs(B, T, H, K, V, GATE[op])
        scale = K ** -0.5
    do = torch.randn_like(v)
    p = cf.Plan(q, v, g, None, A is not None)
    bwd = lambda: cb.chunk_bwd(q, k, v, g, None, None, scale, do, None, vs=vs, A=A)  # noqa: E731
    t, err = {}, {}
    saved = knobs.SEG_BWD
    try:
        knobs.SEG_BWD = 0
        ref = bwd()
        t["h: serial (chunk_states)"] = bench_ms(lambda: cf.chunk_states(p, k, v, g, vs, A, None))
        t["h: segments (seg_chunk_states)"] = bench_ms(
            lambda: cf.seg_chunk_states(p, k, v, g, vs, A, None))
        _, gs = cf.seg_chunk_states(p, k, v, g, vs, A, None)
        t["dh: segments (seg_state_grads)"] = bench_ms(
            lambda: cb.seg_state_grads(p, q, do, g, vs, A, None, gs, scale))
        for s in (0, 1, 2):
            knobs.SEG_BWD = s
            out = bwd()
            err[s] = max((float(((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))))
                         for a, b in zip(out, ref) if b is not None)
            t[f"engine bwd SEG_BWD={s}"] = bench_ms(bwd)
    finally:
        knobs.SEG_BWD = saved
    t["dh: serial (bwd 1 - bwd 2 + dh segments)"] = (t["engine bwd SEG_BWD=1"]
                                                     - t["engine bwd SEG_BWD=2"]
                                                     + t["dh: segments (seg_state_grads)"])
    case = (f"B{B} L{T} H{H} P{V} N{K}" if op == "ssd" else f"B{B} T{T} H{H} K=V={K}") + \
        f" BT={p.BT} SEG={knobs.SEG_CHUNKS * p.BT}"
    for name, ms in t.items():
        note = (f"max rel err vs SEG_BWD=0 {err[int(name[-1])]:.1e}" if name.startswith("engine")
                else "one stage")
        ROWS.append((f"{op} bwd stage", case, name, "bwd", ms, note))
        log(f"{op} bwd stage {case} {name:42s} {ms:8.3f} ms {note}")


# ---- 2. timing ----------------------------------------------------------------------------------

def time_fwd(f, make):
    xs = make(False)
    with torch.no_grad():
        return do_bench(lambda: f(*xs), warmup=10, rep=40, return_mode="median")


def time_fwd_bwd(f, make):
    xs = make(True)
    out = f(*xs)
    do = torch.randn_like(out)
    live = [x for x in xs if x is not None and x.requires_grad]

    def step():
        o = f(*xs)
        torch.autograd.grad(o, live, do)
    return do_bench(step, warmup=10, rep=40, return_mode="median")


def first_call(f, make):
    xs = make(True)
    torch.cuda.synchronize()
    t = time.time()
    o = f(*xs)
    torch.autograd.grad(o, [x for x in xs if x is not None and x.requires_grad], torch.randn_like(o))
    torch.cuda.synchronize()
    return time.time() - t


def bench(section, case, impl, f, make, floor_ms=None, modes=("fwd", "fwd+bwd")):
    for mode, tf in (("fwd", time_fwd), ("fwd+bwd", time_fwd_bwd)):
        if mode not in modes:
            continue
        try:
            ms = tf(f, make)
            note = "" if floor_ms is None or mode != "fwd" else f"floor {floor_ms:.3f}"
        except Exception as e:  # noqa: BLE001
            ms, note = float("nan"), "error: " + repr(e)[:80]
        ROWS.append((section, case, impl, mode, ms, note))
        log(f"{section:18s} {case:24s} {impl:28s} {mode:8s} {ms:8.3f} ms {note}")


def la_floor(B, T, H, K, V, gate):
    n = B * T * H
    byts = n * (2 * K + 2 * V) * 2 + (0 if gate is None else 4 * (n if gate == "scalar" else n * K))
    return byts / (COPY_GBS * 1e9) * 1e3


def main():
    torch.manual_seed(0)
    from ssm_kernels.chunk import common as knobs
    for k, v in KNOBS.items():
        setattr(knobs, k, type(getattr(knobs, k))(int(v)) if v.isdigit() else v)
        log(f"knob {k}={getattr(knobs, k)}")
    log(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    # first calls (compile) of our ops, small shape
    for op in filter(want, OURS):
        make = lambda req, op=op: la_inputs(2, 256, 4, 128, 128, GATE[op], req=req)  # noqa: E731
        try:
            dt = first_call(OURS[op], make)
        except Exception:  # noqa: BLE001
            if op != "chunk_gla":
                raise
            traceback.print_exc()
            from ssm_kernels.chunk import common as knobs
            log("chunk_gla first call failed: retrying with GLA_DIAG_4D=False (no 4-d reshapes)")
            knobs.GLA_DIAG_4D = False
            dt = first_call(OURS[op], make)
        log(f"first call {op}: {dt:.2f} s")
        ROWS.append(("first-call", "B2 T256 H4 K=V=128", f"ssm_kernels.{op}", "fwd+bwd", dt * 1e3, "compile"))
    if want("ssd"):
        dt = first_call(lambda *a: sk.mamba_chunk_scan_combined(*a[:5], 64, D=a[5], dt_bias=a[6],
                                                                dt_softplus=True),
                        lambda req: ssd_inputs(2, 256, 8, 64, 1, 128, req=req))
        log(f"first call ssd: {dt:.2f} s")
        ROWS.append(("first-call", "B2 L256 H8 P64 N128", "ssm_kernels.ssd", "fwd+bwd", dt * 1e3, "compile"))

    ok = True
    for op in filter(want, OURS):
        try:
            ok &= check_la(op)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            ok = False
    cu = torch.tensor([0, 1, 700, 700, 1500, 2047], device=DEV, dtype=torch.int32)
    for op in filter(want, OURS):
        try:
            ok &= check_la(op, B=1, T=2047, cu=cu)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            ok = False
    try:   # chunk_gla at K = V = 64, T not a multiple of the chunk
        if want("chunk_gla"):
            ok &= check_la("chunk_gla", B=2, T=1000, H=4, K=64, V=64)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        ok = False
    for kw in ({}, {"B": 1, "L": 2047, "cu": cu}) if want("ssd") else ():
        try:
            ok &= check_ssd(**kw)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            ok = False
    try:
        if want("ssd"):
            ok &= check_ssd_infer()
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        ok = False
    log("CORRECTNESS:", "all ok" if ok else "FAILURES above")

    fla = {} if (QUICK or not PEERS) else fla_ops()
    for (B, T) in ((4, 4096),) + (() if QUICK else ((2, 16384),)):
        H, K, V = 16, 128, 128
        for op in filter(want, ("chunk_linear_attn", "chunk_simple_gla", "chunk_gla")):
            if T == 16384 and op == "chunk_simple_gla":
                continue
            gate = GATE[op]
            make = (lambda req, B=B, T=T, gate=gate: la_inputs(B, T, H, K, V, gate, req=req))
            case = f"B{B} T{T} H{H} K=V={K}"
            bench(op, case, "ssm_kernels", OURS[op], make, la_floor(B, T, H, K, V, gate))
            if op in fla:
                bench(op, case, "fla", fla[op], make)
            torch.cuda.empty_cache()

    # B8 T2048 H16 K=V=64 (the issue's small-head row)
    B, T, H, K, V = 8, 2048, 16, 64, 64
    for op in filter(want, ("chunk_linear_attn", "chunk_gla")):
        gate = GATE[op]
        make = (lambda req, gate=gate: la_inputs(B, T, H, K, V, gate, req=req))
        case = f"B{B} T{T} H{H} K=V={K}"
        bench(op, case, "ssm_kernels", OURS[op], make, la_floor(B, T, H, K, V, gate))
        if op in fla:
            bench(op, case, "fla", fla[op], make)
        torch.cuda.empty_cache()
    try:
        if want("chunk_gla"):
            from ssm_kernels.chunk import gla as _gla
            gla_tree_stage_times() if _gla.TREE else gla_stage_times()
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    torch.cuda.empty_cache()
    # chunk_linear_attn's stage rows come with chunk_simple_gla's (same stages, GATE 0)
    for op, shape in (("chunk_simple_gla", {}), ("chunk_linear_attn", {}),
                      ("ssd", dict(B=4, T=4096, H=32, K=128, V=64))):
        try:
            if want(op) or (op == "chunk_linear_attn" and want("chunk_simple_gla")):
                stage_times(op, **shape)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
        torch.cuda.empty_cache()

    # the backward's serial passes vs segments (SEG_BWD), at the issue's shapes and at longer rows
    # (fewer (K-tile, V-tile, row x head) programs: where segments should pay)
    for op, shape in (("chunk_simple_gla", {}), ("chunk_simple_gla", dict(B=1, T=16384)),
                      ("chunk_linear_attn", {}), ("chunk_linear_attn", dict(B=2, T=16384)),
                      ("ssd", dict(B=4, T=4096, H=32, K=128, V=64)),
                      ("ssd", dict(B=1, T=16384, H=32, K=128, V=64))):
        try:
            if want(op) or (op == "chunk_linear_attn" and want("chunk_simple_gla")):
                seg_bwd_times(op, **shape)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
        torch.cuda.empty_cache()

    # SSD B4 L4096 H32 P64 N128 (ngroups 1)
    B, L, H, P, G, N = 4, 4096, 32, 64, 1, 128
    case = f"B{B} L{L} H{H} P{P} N{N}"
    make = lambda req: ssd_inputs(B, L, H, P, G, N, req=req)  # noqa: E731
    ours = lambda x, dt, A, Bm, Cm, D, bias: sk.mamba_chunk_scan_combined(  # noqa: E731
        x, dt, A, Bm, Cm, 256, D=D, dt_bias=bias, dt_softplus=True)
    if want("ssd"):
        ssd_section(fla, B, L, H, P, G, N, case, make, ours)
    sweep_section(case, make, ours)
    print_table(ok)


def ssd_section(fla, B, L, H, P, G, N, case, make, ours):
    n = B * L * H
    floor = (n * P * 2 * 2 + B * L * G * N * 2 * 2 + n * 4) / (COPY_GBS * 1e9) * 1e3
    bench("ssd", case, "ssm_kernels", ours, make, floor)
    mf = None if (QUICK or not PEERS) else mamba_op()
    if mf is not None:
        bench("ssd", case, "mamba_ssm", lambda x, dt, A, Bm, Cm, D, bias: mf(
            x, dt, A, Bm, Cm, 256, D=D, dt_bias=bias, dt_softplus=True), make)
    if "chunk_simple_gla" in fla:
        from fla.ops.simple_gla import chunk_simple_gla as fsg

        def fla_ssd(x, dt, A, Bm, Cm, D, bias):
            # SSD on fla's scalar-decay kernel: q = C, k = B (per head), v = x dt, g = dt A
            d = F.softplus(dt + bias)
            qh = Cm.expand(-1, -1, H, -1) if G == 1 else Cm.repeat_interleave(H // G, 2)
            kh = Bm.expand(-1, -1, H, -1) if G == 1 else Bm.repeat_interleave(H // G, 2)
            y = fsg(qh, kh, (x * d[..., None]).to(x.dtype), d * A, scale=1.0)[0]
            return y + x * D[:, None]
        bench("ssd", case, "fla.chunk_simple_gla(ssd map)", fla_ssd, make)


def sweep_section(case, make, ours):
    # ---- tile sweep (engine knobs in ssm_kernels.chunk.common), while time allows ----
    from ssm_kernels.chunk import common as knobs
    # fused-forward knobs (chunk/common.py; forward only: the backward does not use them)
    # (the fused path is off by default, FUSED_FWD=0: its knobs are timed with it switched on)
    fused = [dict(FUSED_FWD=1)] + [dict(FUSED_FWD=1, **kn) for kn in (
        dict(LOOKBACK_SEGS=0), dict(FUSED_WARPS=4), dict(FUSED_WARPS=4, FUSED_BLOCK_V=32),
        dict(FUSED_BLOCK_V=32), dict(SEG_CHUNKS=4), dict(SEG_CHUNKS=16), dict(FUSED_STAGES=3),
        dict(FUSED_I32_OFFSETS=0))]
    # the backward in segments (SEG_BWD; public fwd+bwd), before the forward-only rows
    sweep = [(op, dict(SEG_BWD=s)) for op in ("ssd", "chunk_simple_gla", "chunk_linear_attn")
             for s in (1, 2)] + [("chunk_simple_gla", dict(SEG_BWD=2, SEG_CHUNKS=16))]
    sweep += [(op, dict(kn, fwd_only=1)) for op in ("ssd", "chunk_simple_gla") for kn in fused]
    sweep += [("chunk_linear_attn", dict(CHUNK=128)), ("chunk_linear_attn", dict(BLOCK_K=128, BLOCK_V=128)),
             ("chunk_simple_gla", dict(CHUNK=128)), ("chunk_gla", dict(GLA_BLOCK_V=64)),
             ("chunk_gla", dict(GLA_DQK_BLOCK_K=64)), ("chunk_gla", dict(GLA_CHUNK=32)),
             ("chunk_gla", dict(SUB_CHUNK=16)), ("chunk_gla", dict(SUB_CHUNK=4)),
             ("ssd", dict(CHUNK=128)), ("ssd", dict(BLOCK_K=128))]
    for op, kn in sweep:
        if not want(op):
            continue
        if time.time() - T0 > SWEEP_S:
            log("sweep stopped: time budget")
            break
        kn = dict(kn)
        modes = ("fwd",) if kn.pop("fwd_only", 0) else ("fwd", "fwd+bwd")
        saved = {k: getattr(knobs, k) for k in kn}
        try:
            for k, v in kn.items():
                setattr(knobs, k, v)
            label = "ours " + " ".join(f"{k}={v}" for k, v in kn.items())
            if op == "ssd":
                bench("ssd", case, label, ours, make, modes=modes)
            else:
                B, T, H, K, V = 4, 4096, 16, 128, 128
                bench(op, f"B{B} T{T} H{H} K=V={K}", label, OURS[op],
                      lambda req, gate=GATE[op]: la_inputs(B, T, H, K, V, gate, req=req),
                      modes=modes)
        finally:
            for k, v in saved.items():
                setattr(knobs, k, v)
        torch.cuda.empty_cache()


# ---- chunk_gla variants (GLA_VARIANTS=1): one process, correctness + timing of every variant ----
# (label, {module: {knob: value}}); "gla" = ssm_kernels.chunk.gla, "common" = ssm_kernels.chunk.common
GLA_VARIANT_LIST = [
    ("tree+fused (default)", {}),
    ("tree, unfused fwd", {"gla": dict(FUSED_FWD=False)}),
    ("tree, no split launches", {"gla": dict(TREE_SPLIT=False)}),
    ("tree, dqk maxnreg off", {"gla": dict(TREE_DQK_MAXNREG=None)}),
    ("tree, fwd maxnreg 128", {"gla": dict(TREE_FWD_MAXNREG=128)}),
    ("tree, fwd BV=64", {"common": dict(GLA_BLOCK_V=64)}),
    ("tree, fwd BV=64 maxnreg 128", {"common": dict(GLA_BLOCK_V=64), "gla": dict(TREE_FWD_MAXNREG=128)}),
    ("tree only (FAST_SPAN=-1)", {"gla": dict(FAST_SPAN=-1.0)}),
    ("tree dqk BK=64", {"gla": dict(TREE_DQK_BLOCK_K=64)}),
    ("tree fwd BK=64", {"gla": dict(TREE_BLOCK_K=64)}),
    ("tree stages=2", {"gla": dict(TREE_STAGES=2)}),
    ("tree, fused bwd (spills)", {"gla": dict(FUSED_BWD=True)}),
    ("sub-chunk kernels (session 4)", {"gla": dict(TREE=False)}),
]


class knobs_set:
    """Context manager: set chunk.gla / chunk.common knobs, restore on exit."""
    def __init__(self, kn):
        from ssm_kernels.chunk import common, gla
        self.mods = {"gla": gla, "common": common}
        self.kn, self.saved = kn, []

    def __enter__(self):
        for mod, d in self.kn.items():
            for k, v in d.items():
                self.saved.append((self.mods[mod], k, getattr(self.mods[mod], k)))
                setattr(self.mods[mod], k, v)

    def __exit__(self, *a):
        for m, k, v in reversed(self.saved):
            setattr(m, k, v)


def gla_tree_stage_times(B=4, T=4096, H=16, K=128, V=128, label="tree"):
    """The tree variant's stages one by one (NOTES predictions): cumsum, states, fused scores+output,
    scores alone (the backward's), dq/dk/dg, and state_grad + dv by difference."""
    cb, cf, cg, q, k, v, g, do, scale, p, gc, h, dh, bm = _gla_stage_setup(B, T, H, K, V)
    t = {"cumsum": bm(lambda: cg.chunk_cumsum(p, g)),
         "states": bm(lambda: cf.chunk_states(p, k, v, gc, None, None, None)),
         "scores+output (fused)": bm(lambda: cg.fwd_output(p, q, k, v, gc, h, scale)),
         "scores (intra)": bm(lambda: cg.intra_scores(p, q, k, gc, scale)),
         "fwd total": bm(lambda: cf.chunk_fwd(q, k, v, g, None, None, scale)),
         "dqkg": bm(lambda: cg.dqkg(p, q, k, v, do, gc, h, dh, scale)),
         "bwd total": bm(lambda: cb.chunk_bwd(q, k, v, g, None, None, scale, do, None))}
    t["state_grad + dv (bwd - the others)"] = (t["bwd total"] - t["cumsum"] - t["states"]
                                              - t["scores (intra)"] - t["dqkg"])
    case = f"B{B} T{T} H{H} K=V={K}"
    stage_rows(f"gla stage {label}", case, t)


def main_gla_variants():
    """GLA_VARIANTS=1: correctness of every variant (B2 T2048 H4 K=V=128 bf16, gates
    logsigmoid/16 as in the timing, and logsigmoid/1: chunk spans ~70 log2, so the tree path),
    then fwd / fwd+bwd at B4 T4096 H16 K=V=128 for each variant and fla, the tree's stages and the
    session-4 stages, and B2 T16384 default vs fla. About 200 s on an H100."""
    torch.manual_seed(0)
    log(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    ok = True
    # GLA_CHECK=0: check the default variant only (saves ~1 min)
    checked = GLA_VARIANT_LIST if os.environ.get("GLA_CHECK", "1") == "1" else GLA_VARIANT_LIST[:1]
    for label, kn in checked:
        with knobs_set(kn):
            for gdiv in (16, 1):
                try:
                    ok &= check_la("chunk_gla", gdiv=gdiv, tag=f" [{label}] g/{gdiv}")
                except Exception:  # noqa: BLE001
                    traceback.print_exc()
                    ok = False
    try:
        cu = torch.tensor([0, 1, 700, 700, 1500, 2047], device=DEV, dtype=torch.int32)
        ok &= check_la("chunk_gla", B=1, T=2047, cu=cu, gdiv=4, tag=" [default] g/4")
        ok &= check_la("chunk_gla", B=2, T=1000, H=4, K=64, V=64, tag=" [default] K64")
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        ok = False
    log("CORRECTNESS:", "all ok" if ok else "FAILURES above")
    fla = fla_ops()
    B, T, H, K, V = 4, 4096, 16, 128, 128
    case = f"B{B} T{T} H{H} K=V={K}"
    make = lambda req: la_inputs(B, T, H, K, V, "gla", req=req)  # noqa: E731
    if "chunk_gla" in fla:
        bench("chunk_gla", case, "fla", fla["chunk_gla"], make)
    for label, kn in GLA_VARIANT_LIST:
        with knobs_set(kn):
            bench("chunk_gla", case, "ours " + label, OURS["chunk_gla"], make)
        torch.cuda.empty_cache()
    for label, kn in (("tree", {}), ("sub-chunk", {"gla": dict(TREE=False)})):
        with knobs_set(kn):
            try:
                if label == "tree":
                    gla_tree_stage_times()
                else:
                    gla_stage_times()
            except Exception:  # noqa: BLE001
                traceback.print_exc()
        torch.cuda.empty_cache()
    B, T = 2, 16384
    case = f"B{B} T{T} H{H} K=V={K}"
    make = lambda req: la_inputs(B, T, H, K, V, "gla", req=req)  # noqa: E731
    bench("chunk_gla", case, "ours default", OURS["chunk_gla"], make)
    if "chunk_gla" in fla:
        bench("chunk_gla", case, "fla", fla["chunk_gla"], make)
    print_table(ok, title="chunk_gla variants")


def print_table(ok, rows=None, title="chunked engine", csv_name="gpu_chunk.csv", extra=""):
    """The table, last (fwd and fwd+bwd side by side per (section, case, impl)), and the CSV under
    $OUT; gpu_delta.py prints its rows through this too."""
    rows = ROWS if rows is None else rows
    dev = torch.cuda.get_device_name()
    print(f"\n==== {title}, {dev}, bf16, median ms ====")
    print(f"{'op':24s} {'case':26s} {'impl':30s} {'fwd':>9s} {'fwd+bwd':>9s}  note")
    keyed = {}
    for sec, case, impl, mode, ms, note in rows:
        keyed.setdefault((sec, case, impl), {})[mode] = (ms, note)
    for (sec, case, impl), d in keyed.items():
        f = d.get("fwd", (math.nan, ""))[0]
        fb = d.get("fwd+bwd", (math.nan, ""))
        note = " ".join(x[1] for x in d.values() if x[1])
        print(f"{sec:24s} {case:26s} {impl:30s} {f:9.3f} {fb[0]:9.3f}  {note}")
    print("correctness:", "all ok" if ok else "FAILURES (see log above)", extra)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, csv_name), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["section", "case", "impl", "mode", "ms", "note", "device", "torch", "triton"])
            for r in rows:
                w.writerow(list(r) + [dev, torch.__version__, triton.__version__])

# ---- kept forward tensors (SAVE_AB=1): chunk.common.SAVE_STATES 0 / 1 / 2 side by side ----------

def save_states_ab(B=4, T=4096, H=16, K=128, V=128, ssd_shape=(4, 4096, 32, 64, 1, 128)):
    """Each op at the issue's shapes, fwd+bwd with SAVE_STATES=0 (recompute h and Gc), 1 (keep Gc:
    the default), 2 (keep h too), back to back in one process. Each mode's outputs and gradients
    are compared bitwise with mode 0's (same inputs and cotangent: the kept tensors come from the
    same kernels, so they must be equal), and the peak memory of one fwd+bwd step above the inputs
    is reported (what keeping h costs). fwd (no grad) rows check that inference is unchanged.
    Correctness against float64 at SAVE_STATES=2: `KNOBS=SAVE_STATES=2 QUICK=1 PEERS=0`."""
    from ssm_kernels.chunk import common as knobs
    cases = [(op, f"B{B} T{T} H{H} K=V={K}", OURS[op],
              (lambda req, gate=GATE[op]: la_inputs(B, T, H, K, V, gate, req=req)))
             for op in filter(want, ("chunk_linear_attn", "chunk_simple_gla", "chunk_gla"))]
    if want("ssd"):
        sb, sl, sh, sp, sg, sn = ssd_shape
        cases.append(("ssd", f"B{sb} L{sl} H{sh} P{sp} N{sn}",
                      lambda x, dt, A, Bm, Cm, D, bias: sk.mamba_chunk_scan_combined(
                          x, dt, A, Bm, Cm, 256, D=D, dt_bias=bias, dt_softplus=True),
                      lambda req: ssd_inputs(*ssd_shape, req=req)))
    ok = True
    saved = knobs.SAVE_STATES
    try:
        for op, case, f, make in cases:
            torch.manual_seed(1)
            xs = make(True)
            live = [x for x in xs if x is not None and x.requires_grad]
            do = torch.randn_like(f(*xs))
            base = None
            for mode in (0, 1, 2):
                knobs.SAVE_STATES = mode
                o = f(*xs)
                got = [o] + list(torch.autograd.grad(o, live, do))
                del o
                if base is None:
                    base, note = got, "reference"
                else:
                    same = all(torch.equal(a, b) for a, b in zip(got, base))
                    ok &= same
                    note = "bitwise = mode 0" if same else "DIFFERS from mode 0"
                del got
                # memory held from the forward to the backward (what every layer of a model
                # keeps: o and the saved tensors), and the peak of the step
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                m0 = torch.cuda.memory_allocated()
                o = f(*xs)
                torch.cuda.synchronize()
                held = (torch.cuda.memory_allocated() - m0) / 2 ** 20
                torch.autograd.grad(o, live, do)
                del o
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - m0) / 2 ** 20
                ms = bench_fb(f, xs, live, do)
                ROWS.append((op, case, f"ours SAVE_STATES={mode}", "fwd+bwd", ms,
                             f"{note}, held fwd->bwd +{held:.0f} MiB, peak +{peak:.0f} MiB"))
                log(f"{op:18s} {case:24s} SAVE_STATES={mode} fwd+bwd {ms:8.3f} ms {note} "
                    f"held +{held:.0f} MiB peak +{peak:.0f} MiB")
                with torch.no_grad():
                    fx = [None if x is None else x.detach() for x in xs]
                    ms = do_bench(lambda: f(*fx), warmup=10, rep=40, return_mode="median")
                ROWS.append((op, case, f"ours SAVE_STATES={mode}", "fwd", ms, ""))
            del base, xs, live, do
            torch.cuda.empty_cache()
    finally:
        knobs.SAVE_STATES = saved
    print_table(ok, title="kept forward tensors (SAVE_STATES)", csv_name="gpu_chunk_save.csv")


# ---- forward knobs of session 7 (ENGINE_AB=1): chunk.common H_EVERY / OUT_* / GLA_PREP ----------
# label -> chunk.common knobs (GATE 0/1 sets: chunk_simple_gla, chunk_linear_attn, SSD)
AB_SETS = {
    "default": {},
    "decay_o": dict(OUT_DECAY_O=True),
    "decay_o bv128": dict(OUT_DECAY_O=True, OUT_BLOCK_V=128, OUT_WARPS=4),   # 4: as measured
    "decay_o bv128 w8": dict(OUT_DECAY_O=True, OUT_BLOCK_V=128, OUT_WARPS=8),
    "every2": dict(H_EVERY=2),
    "every4": dict(H_EVERY=4),
    "every8": dict(H_EVERY=8),
    "every2 bv128 w8": dict(H_EVERY=2, OUT_BLOCK_V=128, OUT_WARPS=8),
    "every4 bv128 w8": dict(H_EVERY=4, OUT_BLOCK_V=128, OUT_WARPS=8),
    "every4 w8": dict(H_EVERY=4, OUT_WARPS=8),
    "every4 bv128 w8 sbv32": dict(H_EVERY=4, OUT_BLOCK_V=128, OUT_WARPS=8, STATE_BLOCK_V=32),
    "every4 sbv32 s3": dict(H_EVERY=4, STATE_BLOCK_V=32, STATE_STAGES=3),
    "sbv32": dict(STATE_BLOCK_V=32),
    "every2 coarse": dict(H_EVERY=2, STATE_COARSE=True),
    "every4 coarse": dict(H_EVERY=4, STATE_COARSE=True),
    "every2 bv128 w8 coarse": dict(H_EVERY=2, OUT_BLOCK_V=128, OUT_WARPS=8, STATE_COARSE=True),
    "every4 bv128 w8 coarse": dict(H_EVERY=4, OUT_BLOCK_V=128, OUT_WARPS=8, STATE_COARSE=True),
}
# session 8 made some of these the defaults (common.FWD_AUTO, knobs None): every set but
# "default" (today's defaults) is applied on top of the old path, so the labels keep their meaning
AB_OLD = dict(H_EVERY=1, STATE_COARSE=False, OUT_BLOCK_V=64, OUT_DECAY_O=False, OUT_WARPS=None)
AB_SETS = {k: (v if k == "default" else {**AB_OLD, **v}) for k, v in AB_SETS.items()}
AB_SETS["old default"] = dict(AB_OLD)
GLA_AB_SETS = {
    "default": {},
    "prep": dict(GLA_PREP=True),
    "prep every2": dict(GLA_PREP=True, H_EVERY=2),
    "prep every4": dict(GLA_PREP=True, H_EVERY=4),
}
# AB_SETS="every4,every4 bv128 w8": only these labels (and "default"); AB_S: seconds since start
# after which timing rows stop (the table still prints); AB_CHECK=0 skips the float64 checks
AB_ONLY = [x for x in os.environ.get("AB_SETS", "").split(",") if x]
AB_S = float(os.environ.get("AB_S", "265"))


def set_knobs(kn):
    """Context manager: chunk.common knobs set to kn's values inside, restored after."""
    from ssm_kernels.chunk import common as knobs

    class _S:
        def __enter__(self_):
            self_.saved = {k: getattr(knobs, k) for k in kn}
            for k, v in kn.items():
                setattr(knobs, k, v)

        def __exit__(self_, *a):
            for k, v in self_.saved.items():
                setattr(knobs, k, v)
    return _S()


def run_knob_checks(checks):
    """Each (label, knobs, check) of checks under its knobs; a failure or an exception is logged
    with its label and knobs. Returns whether all passed (and logs the CORRECTNESS line)."""
    ok = True
    for lab, kn, fn in checks:
        try:
            with set_knobs(kn):
                r = fn()
            if not r:
                log(f"  ^ failed with knobs [{lab}] {kn}")
            ok &= r
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            ok = False
    log("CORRECTNESS:", "all ok" if ok else "FAILURES above")
    return ok


def _ab_start():
    """Seed and device line of a knob A/B; returns the packed batch its checks use (cu_seqlens
    over 2047 tokens with a one-token and an empty sequence)."""
    torch.manual_seed(0)
    log(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"triton {triton.__version__}")
    return torch.tensor([0, 1, 700, 700, 1500, 2047], device=DEV, dtype=torch.int32)


def _ab_sets(sets):
    return {k: v for k, v in sets.items() if k == "default" or not AB_ONLY or k in AB_ONLY}


def _ab_time_left():
    if time.time() - T0 > AB_S:
        log("ENGINE_AB: time budget spent, rows skipped")
        return False
    return True


def engine_ab(B=4, T=4096, H=16, K=128, V=128):
    """ENGINE_AB=1: the forward knobs of session 7 against the default and the peers in one
    process. (1) float64 checks of every set (B2 T2048 H4 K=V=128 bf16, fwd + every gradient;
    packed batch for two sets; chunk_gla also with gates /1 so tree chunks mix in; SSD with D,
    dt_bias, varlen, and inference with D and z). (2) fwd at B4 T4096 H16 K=V=128 for every set
    (chunk_simple_gla; chunk_linear_attn default and three sets), chunk_gla fwd and fwd+bwd per
    GLA set, the state stage alone per H_EVERY (rows "stage"), SSD B4 L4096 H32 P64 N128 public
    fwd (D, dt_bias, softplus) per set. (3) fla (and mamba-ssm) last: fla's autotuning is slow.
    ~200-280 s on an H100 with peers (AB_S caps the timing part)."""
    from ssm_kernels.chunk import fwd as cf
    torch.manual_seed(0)
    log(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"triton {triton.__version__}")
    sets = _ab_sets(AB_SETS)
    gsets = _ab_sets(GLA_AB_SETS)
    setk = set_knobs

    cu = torch.tensor([0, 1, 700, 700, 1500, 2047], device=DEV, dtype=torch.int32)
    checks = []
    if os.environ.get("AB_CHECK", "1") == "1":
        for lab, kn in sets.items():
            if want("chunk_simple_gla"):
                checks.append((lab, kn, lambda lab=lab: check_la("chunk_simple_gla",
                                                                 tag=f" [{lab}]")))
        for lab in ("every4", "every2 bv128 w8"):
            if lab in sets and want("chunk_simple_gla"):
                checks.append((lab, sets[lab], lambda lab=lab: check_la(
                    "chunk_simple_gla", B=1, T=2047, cu=cu, tag=f" [{lab}]")))
            if lab in sets and want("chunk_linear_attn"):
                checks.append((lab, sets[lab], lambda lab=lab: check_la(
                    "chunk_linear_attn", tag=f" [{lab}]")))
        for lab, kn in gsets.items():
            if want("chunk_gla"):
                for gd in (16, 1):
                    checks.append((lab, kn, lambda lab=lab, gd=gd: check_la(
                        "chunk_gla", gdiv=gd, tag=f" [{lab}] g/{gd}")))
                checks.append((lab, kn, lambda lab=lab: check_la(
                    "chunk_gla", B=1, T=2047, cu=cu, gdiv=4, tag=f" [{lab}]")))
        for lab in ("every2", "every4", "every4 bv128 w8"):
            if lab in sets and want("ssd"):
                checks.append((lab, sets[lab], check_ssd))
                checks.append((lab, sets[lab], lambda: check_ssd(B=1, L=2047, cu=cu)))
                checks.append((lab, sets[lab], check_ssd_infer))
    ok = run_knob_checks(checks)

    case = f"B{B} T{T} H{H} K=V={K}"
    sg = lambda req: la_inputs(B, T, H, K, V, "scalar", req=req)  # noqa: E731
    for lab, kn in sets.items():
        if want("chunk_simple_gla") and _ab_time_left():
            with setk(kn):
                bench("chunk_simple_gla", case, "ours " + lab, OURS["chunk_simple_gla"], sg,
                      la_floor(B, T, H, K, V, "scalar"), modes=("fwd",))
    if want("chunk_simple_gla") and _ab_time_left():
        # the state stage alone per H_EVERY (h bytes / H_EVERY)
        q, k, v, g = la_inputs(B, T, H, K, V, "scalar")
        p = cf.Plan(q, v, g, None, False)
        with setk(dict(STATE_COARSE=False)):
            t = {f"states H_EVERY={e}": do_bench(
                lambda e=e: cf.chunk_states(p, k, v, g, None, None, None, every=e), warmup=10,
                rep=40, return_mode="median") for e in (1, 2, 4, 8)}
        for e in (2, 4):
            with setk(dict(STATE_COARSE=True)):
                t[f"states H_EVERY={e} STATE_COARSE"] = do_bench(
                    lambda e=e: cf.chunk_states(p, k, v, g, None, None, None, every=e),
                    warmup=10, rep=40, return_mode="median")
        stage_rows("chunk_simple_gla stage", case, t)
        del q, k, v, g
    la = lambda req: la_inputs(B, T, H, K, V, None, req=req)  # noqa: E731
    for lab in ("default", "decay_o bv128 w8", "every4", "every4 bv128 w8"):
        if lab in sets and want("chunk_linear_attn") and _ab_time_left():
            with setk(sets[lab]):
                bench("chunk_linear_attn", case, "ours " + lab, OURS["chunk_linear_attn"], la,
                      modes=("fwd",))
    gm = lambda req: la_inputs(B, T, H, K, V, "gla", req=req)  # noqa: E731
    for lab, kn in gsets.items():
        if want("chunk_gla") and _ab_time_left():
            with setk(kn):
                bench("chunk_gla", case, "ours " + lab, OURS["chunk_gla"], gm)
    sb, sl, shh, sp, sgg, sn = 4, 4096, 32, 64, 1, 128
    scase = f"B{sb} L{sl} H{shh} P{sp} N{sn}"
    smake = lambda req: ssd_inputs(sb, sl, shh, sp, sgg, sn, req=req)  # noqa: E731
    sours = lambda x, dt, A, Bm, Cm, D, bias: sk.mamba_chunk_scan_combined(  # noqa: E731
        x, dt, A, Bm, Cm, 256, D=D, dt_bias=bias, dt_softplus=True)
    for lab, kn in sets.items():
        if want("ssd") and "bv128" not in lab and _ab_time_left():
            with setk(kn):
                bench("ssd", scase, "ours " + lab, sours, smake, modes=("fwd",))
    torch.cuda.empty_cache()
    if PEERS:
        fla = fla_ops()
        for op, make, modes in (("chunk_simple_gla", sg, ("fwd",)),
                                ("chunk_linear_attn", la, ("fwd",)),
                                ("chunk_gla", gm, ("fwd", "fwd+bwd"))):
            if want(op) and op in fla and _ab_time_left():
                bench(op, case, "fla", fla[op], make, modes=modes)
        mf = mamba_op() if want("ssd") else None
        if mf is not None and _ab_time_left():
            bench("ssd", scase, "mamba_ssm", lambda x, dt, A, Bm, Cm, D, bias: mf(
                x, dt, A, Bm, Cm, 256, D=D, dt_bias=bias, dt_softplus=True), smake, modes=("fwd",))
    print_table(ok, title="engine forward knobs (ENGINE_AB)", csv_name="gpu_chunk_ab.csv")


# ---- session 8 forward defaults (FWD_DEFAULTS=1): common.FWD_AUTO vs the old path and the peers --
FD_OLD = dict(AB_OLD)
FD_SETS = {    # label -> knobs on top of today's defaults (GATE 0/1 ops)
    "old path": FD_OLD,
    "default": {},
    "scores early": dict(OUT_SCORES_EARLY=True),
    "default SAVE_STATES=2": dict(SAVE_STATES=2),          # training keeps h: every state stored
    "chunk128 bv64 w8": dict(CHUNK=128, BWD_CHUNK=64, H_EVERY=1, OUT_BLOCK_V=64, OUT_WARPS=8),
    # the state pass with the whole K per program (fla's tiling): 128 programs of 8 warps
    "early sbk128 sbv64 sw8": dict(OUT_SCORES_EARLY=True, STATE_BLOCK_K=128, STATE_BLOCK_V=64,
                                   STATE_WARPS=8),
    # linear attention (GATE 0) candidates for its FWD_AUTO (not a default yet: never timed)
    "every2 coarse bv128": dict(H_EVERY=2, STATE_COARSE=True, OUT_BLOCK_V=128),
    "every2 coarse bv128 early": dict(H_EVERY=2, STATE_COARSE=True, OUT_BLOCK_V=128,
                                      OUT_SCORES_EARLY=True),
}


def fwd_defaults(B=4, T=4096, H=16, K=128, V=128):
    """FWD_DEFAULTS=1: session 8's forward defaults (chunk.common FWD_AUTO: 16-bit simple_gla /
    SSD store every 2nd state from a coarse state pass, decay on the rows of q h, V tile 128 at 8
    warps) against the old path, OUT_SCORES_EARLY, a forward chunk of 128, and fla / mamba-ssm.
    (1) float64 checks (B2 T2048 H4 K=V=128 bf16, o, ht and every gradient; packed batches; SSD
    with D, dt_bias, varlen, and inference with D and z). (2) fwd (inference; training's forward
    is the same with SAVE_STATES 1) at B4 T4096 H16 K=V=128, and fwd+bwd for the old path and the
    default; SSD B4 L4096 H32 P64 N128 public (D, dt_bias, softplus). (3) peers last. ~200-240 s
    on an H100 with fla and mamba-ssm (AB_S caps the timing part; default 200 here)."""
    cu = _ab_start()
    checks = []
    if os.environ.get("AB_CHECK", "1") == "1":
        for lab in ("default", "scores early", "default SAVE_STATES=2", "chunk128 bv64 w8",
                    "early sbk128 sbv64 sw8"):
            checks.append((lab, lambda lab=lab: check_la("chunk_simple_gla", tag=f" [{lab}]")))
        for lab in ("default", "scores early"):
            checks.append((lab, lambda lab=lab: check_la("chunk_simple_gla", B=1, T=2047, cu=cu,
                                                         tag=f" [{lab}]")))
            checks.append((lab, check_ssd))
            checks.append((lab, lambda: check_ssd(B=1, L=2047, cu=cu)))
            checks.append((lab, check_ssd_infer))
        for lab in ("default", "every2 coarse bv128 early"):
            checks.append((lab, lambda lab=lab: check_la("chunk_linear_attn", tag=f" [{lab}]")))
        checks.append(("every2 coarse bv128 early", lambda: check_la(
            "chunk_linear_attn", B=1, T=2047, cu=cu, tag=" [every2 coarse bv128 early]")))
    ok = run_knob_checks([(lab, FD_SETS[lab], fn) for lab, fn in checks])

    case = f"B{B} T{T} H{H} K=V={K}"
    sg = lambda req: la_inputs(B, T, H, K, V, "scalar", req=req)  # noqa: E731
    la = lambda req: la_inputs(B, T, H, K, V, None, req=req)  # noqa: E731
    sb, sl, shh, sp, sgg, sn = 4, 4096, 32, 64, 1, 128
    scase = f"B{sb} L{sl} H{shh} P{sp} N{sn}"
    smake = lambda req: ssd_inputs(sb, sl, shh, sp, sgg, sn, req=req)  # noqa: E731
    sours = lambda x, dt, A, Bm, Cm, D, bias: sk.mamba_chunk_scan_combined(  # noqa: E731
        x, dt, A, Bm, Cm, 256, D=D, dt_bias=bias, dt_softplus=True)
    fb = ("fwd", "fwd+bwd")
    plan = [("chunk_simple_gla", case, sg, OURS["chunk_simple_gla"], lab, modes) for lab, modes in
            (("old path", fb), ("default", fb), ("scores early", ("fwd",)),
             ("chunk128 bv64 w8", ("fwd",)), ("early sbk128 sbv64 sw8", ("fwd",)))]
    plan += [("ssd", scase, smake, sours, lab, modes) for lab, modes in
             (("old path", fb), ("default", fb), ("scores early", ("fwd",)))]
    plan += [("chunk_linear_attn", case, la, OURS["chunk_linear_attn"], lab, ("fwd",)) for lab in
             ("default", "every2 coarse bv128", "every2 coarse bv128 early")]
    for op, cs, make, f, lab, modes in plan:
        if want(op) and _ab_time_left():
            with set_knobs(FD_SETS[lab]):
                bench(op, cs, "ours " + lab, f, make, modes=modes)
    torch.cuda.empty_cache()
    if PEERS:
        mf = mamba_op() if want("ssd") else None
        if mf is not None and _ab_time_left():
            bench("ssd", scase, "mamba_ssm", lambda x, dt, A, Bm, Cm, D, bias: mf(
                x, dt, A, Bm, Cm, 256, D=D, dt_bias=bias, dt_softplus=True), smake,
                modes=("fwd",))    # its fwd+bwd (3.08 ms today) autotunes for a minute
        fla = fla_ops()
        for op, make in (("chunk_simple_gla", sg), ("chunk_linear_attn", la)):
            if want(op) and op in fla and _ab_time_left():
                bench(op, case, "fla", fla[op], make, modes=("fwd",))
    print_table(ok, title="engine forward defaults (FWD_DEFAULTS)", csv_name="gpu_chunk_fd.csv")


# ---- session 9 two-level forward (TWO_LEVEL=1): chunk.common FUSED_FWD (SSM_KERNELS_FUSED_FWD) --
TL_SETS = {   # label -> chunk.common knobs; "two-level" = FUSED_FWD=1 with session 9's layout
    "default": {},
    # the default path's state pass with 3 pipeline stages (at 2 the TTGIR waits for the step's
    # own loads at the loop top: no overlap; sm_90 Triton 3.6: simple_gla 187 -> 255 registers,
    # no spill, still 2 CTAs/SM; linear_attn 115 -> 129)
    "default sstages3": dict(STATE_STAGES=3),
    "two-level": dict(FUSED_FWD=1),
    "two-level tma": dict(FUSED_FWD=1, FUSED_TMA=True),
    "two-level tma scan": dict(FUSED_FWD=1, FUSED_TMA=True, LOOKBACK_SEGS=0),
    # 2 CTAs/SM (sm_90 Triton 3.6: 202 / 134 registers, 82-86 KB shared; no spill)
    "two-level tma scan bv32 w4 st2": dict(FUSED_FWD=1, FUSED_TMA=True, LOOKBACK_SEGS=0,
                                           FUSED_BLOCK_V=32, FUSED_WARPS=4, FUSED_STAGES=2),
    "two-level s6 layout": dict(FUSED_FWD=1, FUSED_V_FIRST=False, FUSED_STAGES=2,
                                FUSED_S1_STEP=0, FUSED_SEG_ROWS=0),
    "two-level stages2": dict(FUSED_FWD=1, FUSED_STAGES=2),
    "two-level hsv grid": dict(FUSED_FWD=1, FUSED_V_FIRST=False),
    "two-level s1 step64": dict(FUSED_FWD=1, FUSED_S1_STEP=0),
    "two-level s1 step256": dict(FUSED_FWD=1, FUSED_S1_STEP=256),
    "two-level scan": dict(FUSED_FWD=1, LOOKBACK_SEGS=0),
    "two-level bv32 w4 st2": dict(FUSED_FWD=1, FUSED_BLOCK_V=32, FUSED_WARPS=4, FUSED_STAGES=2),
    "two-level bv128 w8": dict(FUSED_FWD=1, FUSED_BLOCK_V=128),
    "two-level seg16": dict(FUSED_FWD=1, SEG_CHUNKS=16),
    "two-level seg4": dict(FUSED_FWD=1, SEG_CHUNKS=4, FUSED_SEG_ROWS=0),
    # fixed 512-token segments (stage 2 for rows of more than 8: B2 T16384)
    "two-level seg512 fixed": dict(FUSED_FWD=1, FUSED_SEG_ROWS=0),
    # the length switch (session 10 helper engine10): FUSED_FWD stays 0, rows of gate 0/1 of at
    # least 8192 tokens take the two-level forward with common.FUSED_LONG (its default: TMA), the
    # shorter ones the default path: TL_SWEEP's rows should follow "default" up to T4096 and
    # "two-level tma" from T8192
    "auto-long": dict(FUSED_FWD_MIN_T={0: 8192, 1: 8192}),
}
TL_CHECKED = ("two-level", "two-level tma", "two-level s6 layout", "two-level bv32 w4 st2",
              "two-level seg4", "default sstages3")


def two_level_stage_rows(op, B, T, H, K, V, lab):
    """The two-level forward's stages one by one under today's knobs (rows "<op> 2-level stage"):
    stage 1 (segment end states from zero, in FUSED_S1_STEP steps), stage 2 (the scan), stage 3
    after stage 2 and with the lookback instead; each with its HBM bytes and the rate."""
    from ssm_kernels.chunk import common as knobs, fwd as cf
    bm = lambda f: do_bench(f, warmup=10, rep=40, return_mode="median")  # noqa: E731
    q, k, v, g = la_inputs(B, T, H, K, V, GATE[op])
    scale = K ** -0.5
    p = cf.Plan(q, v, g, None, False)
    cf.fused_segments(p)
    SEG, NSEG = cf._seg(p)
    step = cf._s1_step(p)
    n = B * T * H
    st = NSEG * H * K * V * 4
    io = 2 * n * (K + V) * 2                 # q, k, v read and o written by stage 3
    byts = {"stage 1": n * (K + V) * 2 + st, "stage 2": 2 * st, "stage 3 after 2": io + st,
            "stage 3 lookback": io + st}
    t = {}
    with torch.no_grad():
        hs, gs = cf.seg_states(p, k, v, g, None, None, step=step)
        sin, _ = cf.seg_scan(p, hs, gs, None)
        ht = torch.empty(p.N, p.H, p.K, p.V, device=DEV)
        t["stage 1"] = bm(lambda: cf.seg_states(p, k, v, g, None, None, step=step))
        t["stage 2"] = bm(lambda: cf.seg_scan(p, hs, gs, None))
        t["stage 3 after 2"] = bm(lambda: cf.fused_output(p, q, k, v, g, None, None, sin, scale))
        if cdiv_(T, SEG) <= knobs.LOOKBACK_SEGS:
            t["stage 3 lookback"] = bm(lambda: cf.fused_output(p, q, k, v, g, None, None, hs,
                                                               scale, ht=ht, gs=gs))
    case = f"B{B} T{T} H{H} K=V={K} SEG={SEG} step={step or p.BT}"
    for name, ms in t.items():
        note = f"{byts[name] / 1e6:.0f} MB, {byts[name] / ms / 1e9:.2f} TB/s"
        ROWS.append((f"{op} 2-level stage", case, f"{lab}: {name}", "fwd", ms, note))
        log(f"{op} 2-level stage {case} {lab}: {name:20s} {ms:8.3f} ms {note}")


def cdiv_(a, b):
    return -(-a // b)


def two_level():
    """TWO_LEVEL=1: the two-level forward (chunk.common FUSED_FWD=1; session 9's layout: stage-3
    grid V tiles first, 3 pipeline stages, stage 1 in 128-token steps, packed batches) against
    the default per-chunk-state forward and fla. (1) float64 checks (o, ht and every gradient:
    the training forward goes through it; bf16 B2 T2048 H4 K=V=128, B1 T8192 (8 segments of 1024
    tokens, or 16-32 and the stage-2 scan where FUSED_SEG_ROWS=0), packed batches with an empty and a one-token sequence; SSD with D, dt_bias,
    varlen, and inference with D and z) for the sets in TL_CHECKED. (2) fwd (no grad) at B4 T4096
    H16 K=V=128 for every TL_SETS row (chunk_simple_gla, chunk_linear_attn), fwd+bwd for default
    and two-level, stage rows with bytes and TB/s; B2 T16384 default / two-level / s6 layout;
    SSD B4 L4096 H32 P64 N128 public fwd. (3) fla (and mamba-ssm) last. Table last (CSV
    $OUT/gpu_chunk_tl.csv). ~300-400 s on an H100 with the peers (AB_S, default 420 s since the
    start, stops the timing rows; they run core sets and peers first)."""
    cu = _ab_start()
    checks = []
    if os.environ.get("AB_CHECK", "1") == "1":
        for lab in TL_CHECKED:
            for op in ("chunk_simple_gla", "chunk_linear_attn"):
                checks.append((lab, lambda op=op, lab=lab: check_la(op, tag=f" [{lab}]")))
                checks.append((lab, lambda op=op, lab=lab: check_la(op, B=1, T=2047, cu=cu,
                                                                    tag=f" [{lab}]")))
            checks.append((lab, lambda lab=lab: check_la("chunk_simple_gla", B=1, T=8192,
                                                         tag=f" T8192 [{lab}]")))
        for lab in TL_CHECKED[:2]:
            checks.append((lab, check_ssd))
            checks.append((lab, lambda: check_ssd(B=1, L=2047, cu=cu)))
            checks.append((lab, check_ssd_infer))
    ok = run_knob_checks([(lab, TL_SETS[lab], fn) for lab, fn in checks])

    # rows in order of importance (AB_S may cut the tail): the core sets and the peers at both
    # shapes first, then SSD, then the knob variants, then the stages one by one
    core = ("default", "two-level", "two-level tma")
    fla = fla_ops() if PEERS else {}
    plan = []
    for (B, T) in ((4, 4096), (2, 16384)):
        case = f"B{B} T{T} H16 K=V=128"
        for op in ("chunk_simple_gla", "chunk_linear_attn"):
            make = lambda req, B=B, T=T, op=op: la_inputs(  # noqa: E731
                B, T, 16, 128, 128, GATE[op], req=req)
            for lab in core:
                modes = ("fwd", "fwd+bwd") if T == 4096 else ("fwd",)
                plan.append((op, case, make, OURS[op], lab, modes))
            if op in fla:
                plan.append((op, case, make, fla[op], None, ("fwd",)))
    sb, sl, shh, sp, sgg, sn = 4, 4096, 32, 64, 1, 128
    scase = f"B{sb} L{sl} H{shh} P{sp} N{sn}"
    smake = lambda req: ssd_inputs(sb, sl, shh, sp, sgg, sn, req=req)  # noqa: E731
    sours = lambda x, dt, A, Bm, Cm, D, bias: sk.mamba_chunk_scan_combined(  # noqa: E731
        x, dt, A, Bm, Cm, 256, D=D, dt_bias=bias, dt_softplus=True)
    plan += [("ssd", scase, smake, sours, lab, ("fwd",)) for lab in
             core + ("default sstages3", "two-level s6 layout")]
    mf = mamba_op() if PEERS and want("ssd") else None
    if mf is not None:
        plan.append(("ssd", scase, smake, lambda x, dt, A, Bm, Cm, D, bias: mf(
            x, dt, A, Bm, Cm, 256, D=D, dt_bias=bias, dt_softplus=True), None, ("fwd",)))
    for (B, T) in ((4, 4096), (2, 16384)):
        case = f"B{B} T{T} H16 K=V=128"
        for op in ("chunk_simple_gla", "chunk_linear_attn"):
            make = lambda req, B=B, T=T, op=op: la_inputs(  # noqa: E731
                B, T, 16, 128, 128, GATE[op], req=req)
            labs = TL_SETS if T == 4096 else ("default sstages3", "two-level s6 layout",
                                               "two-level seg512 fixed",
                                               "two-level tma scan bv32 w4 st2")
            plan += [(op, case, make, OURS[op], lab, ("fwd",)) for lab in labs if lab not in core]
    for op, cs, make, f, lab, modes in plan:
        if want(op) and _ab_time_left():
            if lab is None:    # a peer: fla (mamba-ssm for ssd)
                bench(op, cs, "mamba_ssm" if op == "ssd" else "fla", f, make, modes=modes)
                continue
            with set_knobs(TL_SETS[lab]):
                bench(op, cs, "ours " + lab, f, make, modes=modes)
    for op in ("chunk_simple_gla", "chunk_linear_attn"):
        for lab in ("two-level", "two-level tma"):
            if want(op) and _ab_time_left():
                with set_knobs(TL_SETS[lab]):
                    two_level_stage_rows(op, 4, 4096, 16, 128, 128, lab)
    print_table(ok, title="two-level forward (TWO_LEVEL)", csv_name="gpu_chunk_tl.csv")


def two_level_sweep():
    """Where the two-level forward starts to win (session 10: level at B4 T4096, 12-20% faster for
    chunk_linear_attn at B2 T16384): the same tokens per call (B x T = 32768) at T = 4096 ..
    32768, plus B1 T65536; default vs "two-level tma" vs "two-level tma scan bv32 w4 st2" vs
    "auto-long" (common.FUSED_FWD_MIN_T {0: 8192, 1: 8192}: the default below 8192, FUSED_LONG's
    two-level forward from it; first a check that its o is bitwise the default's at T4096 and
    "two-level tma"'s at T8192, both gates; its rows forward only), the forward and (T <= 16384)
    forward+backward; no float64 checks (TWO_LEVEL=1 checks every set), no peers (fla's
    autotuning costs minutes; session 10's fla: linear_attn B2 T16384 0.501 ms). TL_SWEEP=1 python bench/gpu_chunk.py
    (~150-200 s; AB_S, default 200, stops the timing rows: the table still prints within
    gpu_session11.sh's 220 s). CSV gpu_chunk_tl_sweep.csv."""
    _ab_start()
    labs = ("default", "two-level tma", "two-level tma scan bv32 w4 st2", "auto-long")
    # the length rule picks its path from metadata (fwd.fused_fwd_knobs): logged per shape
    from ssm_kernels.chunk import fwd as cf
    with set_knobs(TL_SETS["auto-long"]):
        for T in (4096, 8192, 16384, 32768, 65536):
            kn = cf.fused_fwd_knobs(0, False, BF, T)
            log(f"auto-long T{T}: " + ("per-chunk path" if kn is None else f"two-level {dict(kn)}"))
    ok = True
    for op in ("chunk_linear_attn", "chunk_simple_gla"):
        for T, same in ((4096, "default"), (8192, "two-level tma")):
            xs = la_inputs(1, T, 4, 128, 128, GATE[op])
            with torch.no_grad():
                got = {}
                for lab in ("auto-long", same):
                    with set_knobs(TL_SETS[lab]):
                        got[lab] = OURS[op](*xs)
            eq = torch.equal(got["auto-long"], got[same])
            ok &= eq
            log(f"auto-long {op} B1 T{T} H4: o {'bitwise' if eq else 'NOT'} equal to [{same}]")
    log("AUTO-LONG CHECK:", "ok" if ok else "FAILED")
    for (B, T) in ((8, 4096), (4, 8192), (2, 16384), (1, 32768), (1, 65536)):
        case = f"B{B} T{T} H16 K=V=128"
        for op in ("chunk_linear_attn", "chunk_simple_gla"):
            make = lambda req, B=B, T=T, op=op: la_inputs(  # noqa: E731
                B, T, 16, 128, 128, GATE[op], req=req)
            for lab in labs:
                if want(op) and _ab_time_left():
                    modes = ("fwd", "fwd+bwd") if T <= 16384 else ("fwd",)
                    if lab == "auto-long":   # the backward is the same code on either path
                        modes = ("fwd",)
                    with set_knobs(TL_SETS[lab]):
                        bench(op, case, "ours " + lab, OURS[op], make, modes=modes)
    print_table(ok, title="two-level forward by length (TL_SWEEP)",
                csv_name="gpu_chunk_tl_sweep.csv")


def bench_fb(f, xs, live, do):
    return do_bench(lambda: torch.autograd.grad(f(*xs), live, do), warmup=10, rep=40,
                    return_mode="median")


if __name__ == "__main__":
    if os.environ.get("GLA_VARIANTS", "0") == "1":
        main_gla_variants()
    elif os.environ.get("TWO_LEVEL", "0") == "1":
        AB_S = float(os.environ.get("AB_S", "420"))
        two_level()
    elif os.environ.get("TL_SWEEP", "0") == "1":
        AB_S = float(os.environ.get("AB_S", "200"))
        two_level_sweep()
    elif os.environ.get("FWD_DEFAULTS", "0") == "1":
        AB_S = float(os.environ.get("AB_S", "200"))
        fwd_defaults()
    elif os.environ.get("ENGINE_AB", "0") == "1":
        engine_ab()
    elif os.environ.get("SAVE_AB", "0") == "1":
        torch.manual_seed(0)
        log(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
            f"triton {triton.__version__}")
        save_states_ab()
    else:
        main()
