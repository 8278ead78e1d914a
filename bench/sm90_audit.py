"""Offline sm_90 (H100/H200) audit of the Triton kernels: compile, never launch, no GPU needed.

    PYTHONPATH=. python bench/sm90_audit.py [--ops chunk,linear_attn_check|all] [--only TEXT]
                                            [--sass DIR] [--ptxas PATH]

Runs the public ops (forward + backward) on CPU tensors with a stub Triton driver whose target is
GPUTarget("cuda", 90, 32), so every `kernel[grid](...)` compiles exactly what that call would launch
on the GPU (same constexprs, num_warps, num_stages, argument specialisation) and returns without
launching. Outputs are garbage (nothing runs); what matters is the compiled artefacts. One line per
distinct compiled kernel: shared memory (metadata.shared, what Triton checks against the device
limit before a launch), registers/thread and spill bytes (`ptxas -v` re-run on the kernel's PTX),
and FLAG when shared > 232448 bytes (the H200's opt-in limit per block: the launch raises
OutOfResources) or when ptxas spills. `--sass DIR` also writes each kernel's SASS (cuobjdump).

CPU tensors take the Triton path because `_backend.triton_reason` is replaced (in this process
only) by one that answers as for a CUDA tensor; TRITON_INTERPRET must stay unset, since the tile
choices (chunk.common.blocks) differ under the interpreter. Grids sized from the SM count see 132.

Caveats: the GPU machine runs Triton 3.6, this tool the installed Triton (3.9 when written).
Shared memory comes from Triton's own allocation, so it can differ slightly between versions.
Registers and spills also depend on the ptxas version: Triton 3.6 assembles sm_90 with its
bundled ptxas 12.8, Triton 3.9 with ptxas 13.4 (and still bundles a 12.9 one). Both are measured;
the 12.x column is the one to trust for the GPU. A flag here is a strong hint, not a proof.

Adding a family: a function yielding (case label, thunk) per case, registered in FAMILIES.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # 3.6's default; silences 3.9's warning
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: the interpreter changes the tile choices being audited")

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from ssm_kernels.testing import OfflineDriver  # noqa: E402

SMEM_LIMIT = OfflineDriver.SMEM_LIMIT
TARGET = GPUTarget("cuda", 90, 32)


# ---- compile-only Triton ------------------------------------------------------------------------

compiled: dict = {}   # kernel hash -> record
_case = ["?"]         # label of the case running now


def _run(self, *args, grid, warmup, **kwargs):
    # warmup=True: JITFunction.run compiles (or takes its cache) and returns before launching
    kernel = _orig_run(self, *args, grid=grid, warmup=True, **kwargs)
    rec = compiled.setdefault(kernel.hash, {
        "name": self.fn.__name__, "kernel": kernel, "cases": [],
        "const": {p.name: kwargs[p.name] for p in self.params             # signature order
                  if p.name in kwargs and (p.is_constexpr or not torch.is_tensor(kwargs[p.name]))}})
    if _case[0] not in rec["cases"]:
        rec["cases"].append(_case[0])
    return kernel


def install():
    global _orig_run
    driver.set_active(OfflineDriver())
    _orig_run = JITFunction.run
    JITFunction.run = _run
    from ssm_kernels import _backend
    orig_reason = _backend.triton_reason
    # any device is a CUDA device here (the tensors are never touched by a kernel)
    _backend.triton_reason = lambda device: orig_reason(torch.device("cuda"))
    from ssm_kernels import _device
    _device._sm_count = lambda index: 132   # H200 SMs (grids sized from the SM count)
    torch.cuda.current_device = lambda: 0


# ---- families: (label, thunk) per case -----------------------------------------------------------

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
B, T, H, K = 2, 1031, 4, 128      # T odd like the check: a partial last chunk


def _grad(outs, leaves):
    loss = sum(o.float().sum() for o in outs if o is not None)
    torch.autograd.grad(loss, [x for x in leaves if x is not None and x.requires_grad])


def _dt(dtype):
    return str(dtype).replace("torch.", "")


def _leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype).requires_grad_()


def _la_inputs(dtype, V):
    return (_leaf(B, T, H, K, dtype=dtype), _leaf(B, T, H, K, dtype=dtype),
            _leaf(B, T, H, V, dtype=dtype), _leaf(B, H, K, V))


def _decay(*shape):
    return (-torch.rand(*shape) * 0.5).requires_grad_()


def run_linear_attn(dtype, V):
    import ssm_kernels as sk
    q, k, v, h0 = _la_inputs(dtype, V)
    o, S = sk.chunk_linear_attn(q, k, v, initial_state=h0, output_final_state=True,
                                normalize=False, backend="triton")
    _grad((o, S), (q, k, v, h0))


def run_simple_gla(dtype, V):
    import ssm_kernels as sk
    q, k, v, h0 = _la_inputs(dtype, V)
    g = _decay(B, T, H)
    o, S = sk.chunk_simple_gla(q, k, v, g, initial_state=h0, output_final_state=True,
                               backend="triton")
    _grad((o, S), (q, k, v, g, h0))


def run_gla(dtype, V):
    import ssm_kernels as sk
    q, k, v, h0 = _la_inputs(dtype, V)
    g = _decay(B, T, H, K)
    o, S = sk.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True, backend="triton")
    _grad((o, S), (q, k, v, g, h0))


def run_ssd(dtype, V):
    import ssm_kernels as sk
    # engine K = dstate (K), engine V = headdim (V); one B/C group
    x = _leaf(B, T, H, V, dtype=dtype)
    Bm, Cm = _leaf(B, T, 1, K, dtype=dtype), _leaf(B, T, 1, K, dtype=dtype)
    dt = (torch.rand(B, T, H) * 0.1 + 0.01).requires_grad_()
    A = (-torch.rand(H) - 0.5).requires_grad_()
    h0 = _leaf(B, H, V, K)
    y, S = sk.mamba_chunk_scan_combined(x, dt, A, Bm, Cm, 64, initial_states=h0,
                                        return_final_states=True, backend="triton")
    _grad((y, S), (x, dt, A, Bm, Cm, h0))


def run_ssd_dz(dtype, V):
    """SSD with D (nheads, headdim) and z: with gradients (D inside the op: the forward's epilogue
    HAS_D, the backward's dD; z a torch op) and eager inference (D and silu(z) in the epilogue)."""
    import ssm_kernels as sk
    x = _leaf(B, T, H, V, dtype=dtype)
    Bm, Cm = _leaf(B, T, 1, K, dtype=dtype), _leaf(B, T, 1, K, dtype=dtype)
    dt = (torch.rand(B, T, H) * 0.1 + 0.01).requires_grad_()
    A = (-torch.rand(H) - 0.5).requires_grad_()
    D, z = _leaf(H, V), _leaf(B, T, H, V, dtype=dtype)
    y = sk.mamba_chunk_scan_combined(x, dt, A, Bm, Cm, 64, D=D, z=z, backend="triton")
    _grad((y,), (x, dt, A, Bm, Cm, D, z))
    with torch.no_grad():
        sk.mamba_chunk_scan_combined(x, dt, A, Bm, Cm, 64, D=D, z=z, backend="triton")


def chunk_cases():
    """Chunked engine: the four public ops, forward + backward, K=128, V in (128, 100); SSD also
    with D and z (`ssd+Dz`: the epilogue flags)."""
    ops = {"chunk_linear_attn": run_linear_attn, "chunk_simple_gla": run_simple_gla,
           "chunk_gla": run_gla, "ssd": run_ssd, "ssd+Dz": run_ssd_dz}
    for V in (128, 100):
        for dtype in DTYPES:
            for name, fn in ops.items():
                yield f"{name} {_dt(dtype)} K{K} V{V}", lambda fn=fn, dtype=dtype, V=V: fn(dtype, V)


# forward knob sets of the engine (chunk/common.py, session 7; off by default): inference calls,
# bf16, V 128 (GLA_PREP only for chunk_gla, OUT_* only for GATE 0/1)
ENGINE_KNOB_SETS = {
    "default": {},
    "old": dict(H_EVERY=1, STATE_COARSE=False, OUT_BLOCK_V=64, OUT_DECAY_O=False),
    "every2+coarse+bv128+w8": dict(H_EVERY=2, STATE_COARSE=True, OUT_BLOCK_V=128, OUT_WARPS=8),
    "early": dict(OUT_SCORES_EARLY=True),
    "every4+early": dict(H_EVERY=4, OUT_SCORES_EARLY=True),
    "sbk128+sbv32+sw8": dict(STATE_BLOCK_K=128, STATE_BLOCK_V=32, STATE_WARPS=8),
    "sbk128+sbv64+sw8": dict(STATE_BLOCK_K=128, STATE_BLOCK_V=64, STATE_WARPS=8),
    "sbk128+sbv32+sw4": dict(STATE_BLOCK_K=128, STATE_BLOCK_V=32, STATE_WARPS=4),
    "chunk128": dict(CHUNK=128, BWD_CHUNK=64, H_EVERY=1),
    "chunk128+bv64+w8": dict(CHUNK=128, BWD_CHUNK=64, H_EVERY=1, OUT_BLOCK_V=64, OUT_WARPS=8),
    "chunk128+bv64+w4": dict(CHUNK=128, BWD_CHUNK=64, H_EVERY=1, OUT_BLOCK_V=64, OUT_WARPS=4),
    "every4": dict(H_EVERY=4),
    "decay_o": dict(OUT_DECAY_O=True),
    "decay_o+bv128+w8": dict(OUT_DECAY_O=True, OUT_BLOCK_V=128, OUT_WARPS=8),
    "every4+decay_o+bv128+w8": dict(H_EVERY=4, OUT_DECAY_O=True, OUT_BLOCK_V=128, OUT_WARPS=8),
    "every4+decay_o+bv128+w4": dict(H_EVERY=4, OUT_DECAY_O=True, OUT_BLOCK_V=128, OUT_WARPS=4),
    "every4+decay_o": dict(H_EVERY=4, OUT_DECAY_O=True),
    "every4+sbv32": dict(H_EVERY=4, STATE_BLOCK_V=32),
    "every2+coarse": dict(H_EVERY=2, STATE_COARSE=True),
    "every4+coarse": dict(H_EVERY=4, STATE_COARSE=True),
    "prep": dict(GLA_PREP=True),
    "prep+every2": dict(GLA_PREP=True, H_EVERY=2),
    "prep+every4": dict(GLA_PREP=True, H_EVERY=4),
    # the two-level forward (FUSED_FWD, session 9): its stage 1 / 2 / 3 kernels (T odd here: the
    # pointer loads; TMA needs T % 64 == 0, see bench/NOTES.md for its numbers)
    "two-level": dict(FUSED_FWD=1),
    "two-level scan": dict(FUSED_FWD=1, LOOKBACK_SEGS=0),
    "two-level s6": dict(FUSED_FWD=1, FUSED_V_FIRST=False, FUSED_STAGES=2, FUSED_S1_STEP=0,
                         FUSED_SEG_ROWS=0),
}


def chunk_knob_cases():
    """The engine's forward knobs (ENGINE_KNOB_SETS) compiled as the GPU would launch them."""
    import ssm_kernels as sk
    from ssm_kernels.chunk import common

    def infer(op, knobs, V=128, dtype=torch.bfloat16):
        saved = {kk: getattr(common, kk) for kk in knobs}
        try:
            for kk, vv in knobs.items():
                setattr(common, kk, vv)
            with torch.no_grad():
                q, k, v, h0 = (x.detach() for x in _la_inputs(dtype, V))
                if op == "chunk_simple_gla":
                    sk.chunk_simple_gla(q, k, v, _decay(B, T, H).detach(), initial_state=h0,
                                        output_final_state=True, backend="triton")
                elif op == "chunk_gla":
                    sk.chunk_gla(q, k, v, _decay(B, T, H, K).detach(), initial_state=h0,
                                 output_final_state=True, backend="triton")
                else:
                    x = _leaf(B, T, H, 64, dtype=dtype).detach()
                    Bm, Cm = (_leaf(B, T, 1, K, dtype=dtype).detach() for _ in range(2))
                    sk.mamba_chunk_scan_combined(x, torch.rand(B, T, H) * 0.1 + 0.01,
                                                 -torch.rand(H) - 0.5, Bm, Cm, 64,
                                                 D=torch.randn(H, 64), backend="triton")
        finally:
            for kk, vv in saved.items():
                setattr(common, kk, vv)

    for name, knobs in ENGINE_KNOB_SETS.items():
        for op in ("chunk_simple_gla", "chunk_gla", "ssd"):
            if ("GLA_PREP" in knobs and op != "chunk_gla") or (
                    ("OUT_DECAY_O" in knobs or "FUSED_FWD" in knobs) and op == "chunk_gla"):
                continue
            yield f"{op} bf16 K{K} V128 fwd [{name}]", lambda op=op, knobs=knobs: infer(op, knobs)


def linear_attn_check_cases():
    """`python -m ssm_kernels check` for linear_attn on a GPU (B2 T1031 H4 K128 V100), full plan."""
    from ssm_kernels.linear_attn import check as c
    Bc, Tc, Hc, Kc, Vc = 2, 1031, 4, 128, 100
    for variant, dtype in c._plan("triton", True):
        def thunk(variant=variant, dtype=dtype):
            q, k = (torch.randn(2, Bc, Tc, Hc, Kc) * 0.5).to(dtype).unbind(0)
            v = torch.randn(Bc, Tc, Hc, Vc).to(dtype)
            gated = variant.endswith("_gla") and variant != "chunk_simple_gla"
            g = -torch.rand(Bc, Tc, Hc, Kc) if gated else -torch.rand(Bc, Tc, Hc) * 0.5
            gam, h0 = -torch.rand(Hc) * 0.2, torch.randn(Bc, Hc, Kc, Vc)
            cot = (torch.randn(Bc, Tc, Hc, Vc, dtype=torch.float64),
                   torch.randn(Bc, Hc, Kc, Vc, dtype=torch.float64))
            c._fwd_bwd(c._run_public, variant, (q, k, v, g, gam, h0), cot, backend="triton")
        yield f"check {variant} {_dt(dtype)}", thunk


def normalize_cases():
    """chunk_linear_attn normalize=True's one-launch kernels (linear_attn.triton.normalize_fwd /
    _bwd, host8), fwd+bwd with an initial key sum and the final one: K = V = 64 (the overhead
    bench), 128 and 256 (BT 32), float32 and bf16."""
    from ssm_kernels import chunk_linear_attn
    for K in (64, 128, 256):
        for dtype in (torch.float32, torch.bfloat16):
            def thunk(K=K, dtype=dtype):
                q, k, v = (torch.rand(1, 200, 2, K).to(dtype).requires_grad_() for _ in range(3))
                kv0, z0 = torch.randn(1, 2, K, K), torch.rand(1, 1, 2, K).requires_grad_()
                o, (S, z) = chunk_linear_attn(q, k, v, initial_state=(kv0, z0),
                                              output_final_state=True, backend="triton")
                (o.float().sum() + z.sum()).backward()
            yield f"normalize {_dt(dtype)} K=V={K}", thunk


# The other families reuse their check modules' GPU-size inputs and fwd+bwd helpers (cot: the
# cotangents those helpers take; their values do not matter here).

def selective_scan_cases():
    from ssm_kernels import selective_scan_fn
    from ssm_kernels.selective_scan import check as c
    for dtype, cplx in c._plan("triton", True):
        def thunk(dtype=dtype, cplx=cplx):
            inp = c._inputs("cpu", dtype, cplx, False)
            cot = (torch.randn(inp["u"].shape), torch.randn(inp["initial_state"].shape,
                                                            dtype=inp["initial_state"].dtype))
            c._fwd_bwd(selective_scan_fn, inp, cot, backend="triton")
        yield f"selective_scan_fn {_dt(dtype)}{' A complex' if cplx else ''}", thunk


def linear_scan_cases():
    from ssm_kernels import linear_scan
    from ssm_kernels.linear_scan import check as c
    shape = (4, 1031, 256)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.complex64):
        def thunk(dtype=dtype):
            a = (torch.rand(shape) * 0.5 + 0.5).to(dtype)
            b = torch.randn(shape).to(dtype)
            h0 = torch.randn(shape[0], shape[2], dtype=torch.complex64 if dtype.is_complex
                             else torch.float32)
            c._fwd_bwd(linear_scan, a, b, h0, (torch.randn(shape), torch.randn(h0.shape)),
                       backend="triton")
        yield f"linear_scan {_dt(dtype)} {shape}", thunk
    # accelerated-scan's layout [B, D, T] (time innermost: the long-time-tile configs)
    for dtype in (torch.float32, torch.bfloat16):
        def thunk_bdt(dtype=dtype):
            a = (torch.rand(8, 64, 4096) * 0.5 + 0.5).to(dtype)
            b = torch.randn(8, 64, 4096).to(dtype)
            a.requires_grad_()
            b.requires_grad_()
            h = linear_scan(a, b, dim=-1, backend="triton")
            torch.autograd.grad(h, (a, b), torch.randn(a.shape).to(dtype))
        yield f"linear_scan BDT {_dt(dtype)} [8, 64, 4096]", thunk_bdt
    # reverse=True builds (dh0's int64 (T - 1) * s_t), incl. T=1 (Triton specialises T to 1)
    for shape in ((4, 1031, 256), (4, 1, 256)):
        def thunk_rev(shape=shape):
            a, b = _leaf(*shape), _leaf(*shape)
            h = linear_scan(a, b, dim=1, reverse=True, backend="triton")
            torch.autograd.grad(h, (a, b), torch.randn(shape))
        yield f"linear_scan reverse fp32 {list(shape)}", thunk_rev


def causal_conv1d_cases():
    from ssm_kernels import causal_conv1d_fn
    from ssm_kernels.causal_conv1d import check as c
    Bc, D, Tc = 4, 768, 1031
    for dtype in DTYPES:
        for W in (2, 4):
            def thunk(dtype=dtype, W=W):
                x = torch.randn(Bc, D, Tc).to(dtype)
                h0 = torch.randn(Bc, D, W - 1).to(dtype)
                c._fwd_bwd(causal_conv1d_fn, x, torch.randn(D, W), torch.randn(D), h0,
                           (torch.randn(Bc, D, Tc), torch.randn(Bc, D, W - 1)), backend="triton")
            yield f"causal_conv1d_fn {_dt(dtype)} W{W}", thunk


def delta_rule_cases():
    import torch.nn.functional as F
    from ssm_kernels import chunk_delta_rule, chunk_gated_delta_rule
    from ssm_kernels.delta_rule import check as c
    for Bc, Tc, Hc, HV, Kc, Vc in ((2, 517, 2, 4, 128, 128), (2, 600, 2, 4, 64, 96),
                                   (1, 300, 1, 2, 256, 128)):
        for dtype in (DTYPES if Kc <= 128 else [torch.bfloat16, torch.float32]):
            def thunk(dtype=dtype, Bc=Bc, Tc=Tc, Hc=Hc, HV=HV, Kc=Kc, Vc=Vc):
                q, k = (torch.randn(Bc, Tc, Hc, Kc).to(dtype) for _ in range(2))
                v = torch.randn(Bc, Tc, HV, Vc).to(dtype)
                g, beta = F.logsigmoid(torch.randn(Bc, Tc, HV)), torch.rand(Bc, Tc, HV)
                h0 = torch.randn(Bc, HV, Kc, Vc)
                c._fwd_bwd(chunk_gated_delta_rule, q, k, v, g, beta, h0,
                           (torch.randn(Bc, Tc, HV, Vc), torch.randn(h0.shape)), backend="triton")
            yield f"chunk_gated_delta_rule {_dt(dtype)} K{Kc} V{Vc}", thunk

            def thunk0(dtype=dtype, Bc=Bc, Tc=Tc, Hc=Hc, HV=HV, Kc=Kc, Vc=Vc):
                q, k = (torch.randn(Bc, Tc, Hc, Kc).to(dtype) for _ in range(2))
                v = torch.randn(Bc, Tc, HV, Vc).to(dtype)
                h0 = torch.randn(Bc, HV, Kc, Vc)
                c._fwd_bwd_nogate(chunk_delta_rule, q, k, v, torch.rand(Bc, Tc, HV), h0,
                                  (torch.randn(Bc, Tc, HV, Vc), torch.randn(h0.shape)),
                                  backend="triton")
            if Kc == 128:
                yield f"chunk_delta_rule {_dt(dtype)} K{Kc} V{Vc}", thunk0


def fft_conv_cases():
    from ssm_kernels import fft_conv
    from ssm_kernels.fft_conv import check as c, triton as ft
    ft._sm_count = lambda device: 132   # it answers 2 for CPU tensors (batch split per program)
    for Bc, Hc, L, Lk in ((4, 64, 1031, 1031), (2, 16, 5000, 4001)):
        for dtype in DTYPES:
            def thunk(dtype=dtype, Bc=Bc, Hc=Hc, L=L, Lk=Lk):
                u, pg, qg = (torch.randn(Bc, Hc, L).to(dtype) for _ in range(3))
                c._fwd_bwd(fft_conv, u, torch.randn(Hc, Lk), torch.randn(Hc), pg, qg,
                           torch.randn(Bc, Hc, L), backend="triton")
            yield f"fft_conv {_dt(dtype)} L{L} Lk{Lk}", thunk
    # the on-chip 16-bit Monarch forward (monarch16.py) at N = 2048, 4096, 8192, gates + D
    from ssm_kernels.fft_conv import interface as fi, monarch16 as m16
    m16._sm_count = lambda device: 132
    for L in (1024, 2048, 4096):
        for dtype in (torch.bfloat16, torch.float16):
            def thunk(dtype=dtype, L=L):
                u, pg, qg = (torch.randn(8, 16, L).to(dtype) for _ in range(3))
                old, fi.FORCE_PATH = fi.FORCE_PATH, "monarch16"
                try:
                    fft_conv(u, torch.randn(16, L), torch.randn(16), pre_gate=pg, post_gate=qg,
                             backend="triton")
                finally:
                    fi.FORCE_PATH = old
            yield f"fft_conv monarch16 fwd {_dt(dtype)} L{L} Lk{L}", thunk

            # the monarch16 backward (forced: by default a post-gated backward at N = 8192 takes
            # the cuFFT path), with and without the post gate (the post gate
            # adds the third transform pair for dpost); FINAL=1 (one program per channel: the dk
            # inverse in the kernel, the usual case at H >= 2 x SMs) and FINAL=0 (slices)
            for post, sms in ((True, 4), (False, 4), (True, 132)):
                def thunk_b(dtype=dtype, L=L, post=post, sms=sms):
                    u, pg, qg = (torch.randn(8, 16, L).to(dtype) for _ in range(3))
                    old, fi.FORCE_PATH = fi.FORCE_PATH, "monarch16"
                    m16._sm_count = lambda device: sms   # 4: S = 1 at H = 16
                    try:
                        fi.fft_conv_bwd_op(u, u, torch.randn(16, L), torch.randn(16), pg,
                                           qg if post else None, "triton")
                    finally:
                        fi.FORCE_PATH = old
                        m16._sm_count = lambda device: 132
                yield (f"fft_conv monarch16 bwd {_dt(dtype)} L{L} Lk{L}"
                       f"{' post' if post else ' nopost'}{' final' if sms == 4 else ' slices'}"), thunk_b


# monarch16 knob variants (bf16, D + pre gate; KBLOCK / KBLOCK_BWD / SPLIT / warps): label
# "m16knob N=.. split=.. bj=.. w=.. fwd|bwd[ post]"; FINAL = 1 (one program per channel)
# (N, split, BJ, warps[, TWIDDLE_CONJ_COPY]); BJ 0 = the unblocked kernel
M16_KNOBS = ((4096, None, 32, 8), (4096, (128, 32), 0, 8), (4096, (128, 32), 64, 8),
             (4096, (128, 32), 32, 4), (8192, None, 64, 8), (8192, None, 32, 8),
             (8192, None, 64, 4), (8192, None, 32, 4), (8192, None, 16, 8), (8192, None, 32, 16),
             (8192, None, 16, 16), (4096, None, 16, 8), (4096, None, 32, 4), (4096, None, 16, 4),
             (2048, None, 32, 4), (2048, None, 16, 4), (8192, None, 64, 16),
             (8192, None, 0, 8, False), (8192, None, 16, 8, False), (4096, None, 0, 8, False),
             (4096, None, 32, 8, False))


def fft_conv_knob_cases():
    from ssm_kernels.fft_conv import interface as fi, monarch16 as m16
    m16._sm_count = lambda device: 4   # S = 1 at H = 16: the in-kernel dk inverse (FINAL)
    for n, sp, bj, warps, *twc in M16_KNOBS:
        twc = twc[0] if twc else True
        for mode in ("fwd", "bwd", "bwd post"):
            if mode == "bwd post" and (n != 8192 or warps == 4):
                continue
            def thunk(n=n, sp=sp, bj=bj, warps=warps, mode=mode, twc=twc):
                L = n // 2
                u, pg, qg = (torch.randn(8, 16, L).to(torch.bfloat16) for _ in range(3))
                saved = (dict(m16.SPLIT), dict(m16.KBLOCK), dict(m16.KBLOCK_BWD),
                         dict(m16.LAUNCH), dict(m16.LAUNCH_BWD), fi.FORCE_PATH)
                if sp:
                    m16.SPLIT[n] = sp
                m16.KBLOCK[n] = m16.KBLOCK_BWD[n] = bj
                m16.LAUNCH[n] = m16.LAUNCH_BWD[n] = (warps, 1)
                fi.FORCE_PATH = "monarch16"
                m16.TWIDDLE_CONJ_COPY = twc
                try:
                    if mode == "fwd":
                        fi.fft_conv_fwd_op(u, torch.randn(16, L), torch.randn(16), pg, None, "triton")
                    else:
                        fi.fft_conv_bwd_op(u, u, torch.randn(16, L), torch.randn(16), pg,
                                           qg if "post" in mode else None, "triton")
                finally:
                    for d, old in zip((m16.SPLIT, m16.KBLOCK, m16.KBLOCK_BWD, m16.LAUNCH,
                                       m16.LAUNCH_BWD), saved):
                        d.clear()
                        d.update(old)
                    fi.FORCE_PATH = saved[-1]
                    m16.TWIDDLE_CONJ_COPY = True
            yield f"m16knob N={n} split={sp} bj={bj} w={warps}{'' if twc else ' T'} {mode}", thunk


# monarch16 split backward (SPLIT_BWD, helper fftbwd8): (N, mode, DK_BLOCK, dk warps, gates);
# bf16, D on, FINAL = 1; the du kernel (and the dpost forward) take the forward's LAUNCH / KBLOCK
M16_SPLIT = ((8192, 2, 64, 8, False), (8192, 2, 32, 8, False), (8192, 2, 128, 8, False),
             (8192, 2, 64, 4, False), (8192, 1, 64, 8, False), (8192, 1, 32, 8, False),
             (8192, 2, 64, 8, True), (8192, 2, 128, 8, True), (8192, 2, 32, 4, False), (8192, 1, 32, 4, False),
             (4096, 2, 32, 4, False), (4096, 2, 64, 4, False), (4096, 1, 32, 4, False))


def fft_conv_split_cases():
    from ssm_kernels.fft_conv import interface as fi, monarch16 as m16
    m16._sm_count = lambda device: 4   # S = 1 at H = 16: the in-kernel dk inverse (FINAL)
    for n, mode, bj, warps, gates in M16_SPLIT:
        def thunk(n=n, mode=mode, bj=bj, warps=warps, gates=gates):
            L = n // 2
            u, pg, qg = (torch.randn(8, 16, L).to(torch.bfloat16) for _ in range(3))
            saved = (dict(m16.SPLIT_BWD), dict(m16.DK_BLOCK), dict(m16.LAUNCH_DK), fi.FORCE_PATH,
                     fi.MONARCH16_BWD_CUFFT_POST_N)
            m16.SPLIT_BWD[n], m16.DK_BLOCK[n], m16.LAUNCH_DK[n] = mode, bj, (warps, 1)
            fi.FORCE_PATH, fi.MONARCH16_BWD_CUFFT_POST_N = "monarch16", 1 << 30
            try:
                fi.fft_conv_bwd_op(u, u, torch.randn(16, L), torch.randn(16),
                                   pg if gates else None, qg if gates else None, "triton")
            finally:
                for d, old in zip((m16.SPLIT_BWD, m16.DK_BLOCK, m16.LAUNCH_DK), saved):
                    d.clear()
                    d.update(old)
                fi.FORCE_PATH, fi.MONARCH16_BWD_CUFFT_POST_N = saved[3:]
        yield f"m16split N={n} mode={mode} dkbj={bj} dkw={warps}{' gates' if gates else ''}", thunk


# the float32 forward on the monarch16 kernels (MONARCH16_F32, session 9 helper fft9): split-fp16
# products; (N, warps, rows per block BJ (0: unblocked), gates); D on, H = 16
M16_F32 = ((2048, 4, 0, False), (2048, 4, 0, True), (2048, 4, 32, False), (2048, 4, 16, False),
           (4096, 4, 0, False), (4096, 4, 32, False), (4096, 4, 16, False), (4096, 8, 32, False),
           (4096, 4, 32, True), (8192, 8, 0, False), (8192, 8, 32, False), (8192, 8, 16, False),
           (8192, 4, 16, False), (8192, 8, 32, True), (4096, 8, 32, True), (8192, 8, 16, True),
           (2048, 4, 32, True), (2048, 8, 32, False), (2048, 8, 16, False), (4096, 4, 16, True),
           (8192, 4, 16, True))


def fft_conv_f32_cases():
    from ssm_kernels.fft_conv import interface as fi, monarch16 as m16
    m16._sm_count = lambda device: 132
    for n, warps, bj, gates in M16_F32:
        def thunk(n=n, warps=warps, bj=bj, gates=gates):
            L = n // 2
            u, pg, qg = (torch.randn(8, 16, L) for _ in range(3))
            saved = (dict(m16.LAUNCH_F32), dict(m16.KBLOCK_F32), fi.MONARCH16_F32)
            m16.LAUNCH_F32[n] = (warps, 1)
            m16.KBLOCK_F32[n] = bj
            fi.MONARCH16_F32 = True
            try:
                fi.fft_conv_fwd_op(u, torch.randn(16, L), torch.randn(16), pg if gates else None,
                                   qg if gates else None, "triton")
            finally:
                for d, old in zip((m16.LAUNCH_F32, m16.KBLOCK_F32), saved):
                    d.clear()
                    d.update(old)
                fi.MONARCH16_F32 = saved[2]
        yield f"m16f32 N={n} w={warps} bj={bj}{' gates' if gates else ''}", thunk


def cp_cases():
    """The states-only passes of context parallelism's later ranks (ssm_kernels.distributed)."""
    from ssm_kernels.distributed.engine import la_final_state, la_state_adjoint
    from ssm_kernels.linear_scan.triton import linear_scan_adjoint, linear_scan_summary
    for dtype in DTYPES:
        for gate in (0, 1, 2):
            def thunk(dtype=dtype, gate=gate):
                q, k, v = (torch.randn(B, T, H, K).to(dtype) for _ in range(3))
                g = None if gate == 0 else -torch.rand((B, T, H) if gate == 1 else (B, T, H, K))
                la_final_state(q, k, v, g)
                la_state_adjoint(q, v, g, K ** -0.5)
            yield f"cp chunk engine GATE={gate} {_dt(dtype)}", thunk
    for dtype in (torch.float32, torch.bfloat16, torch.complex64):
        for shape in ((8, 4096, 2048), (4, 2048, 1)):
            def thunk(dtype=dtype, shape=shape):
                a, b = (torch.randn(shape).to(dtype) for _ in range(2))
                linear_scan_summary(a, b, False)
                linear_scan_adjoint(a, b, False)
            yield f"cp linear_scan {_dt(dtype)} {shape}", thunk


FAMILIES = {"chunk": chunk_cases, "chunk_knobs": chunk_knob_cases,
            "linear_attn_check": linear_attn_check_cases, "normalize": normalize_cases,
            "selective_scan": selective_scan_cases, "linear_scan": linear_scan_cases,
            "causal_conv1d": causal_conv1d_cases, "delta_rule": delta_rule_cases,
            "fft_conv": fft_conv_cases, "fft_conv_knobs": fft_conv_knob_cases,
            "fft_conv_split": fft_conv_split_cases, "fft_conv_f32": fft_conv_f32_cases,
            "cp": cp_cases}
DEFAULT_OPS = "chunk,linear_attn_check"   # the others: --ops all or by name


# ---- resource usage ------------------------------------------------------------------------------

def ptxas_tools(override=None):
    """[(label, path, PTX .version it accepts)]: first the ptxas closest to the GPU machine's
    (Triton 3.6 assembles sm_90 with its bundled ptxas 12.8; Triton 3.9 still bundles a 12.x
    `ptxas` next to the 13.x one it uses), then the one that built the cubin here. Their register
    allocations can differ, so both are shown; FLAG SPILL reads the first."""
    from triton import knobs
    from triton.backends.nvidia.compiler import ptx_get_version
    tools = []
    paths = [override] if override else [knobs.nvidia.ptxas.path, get_ptxas(TARGET.arch).path]
    for path in dict.fromkeys(paths):   # unique, in order
        out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
        ver = re.search(r"release (\d+\.\d+)", out).group(1)
        v = ptx_get_version(ver)
        tools.append((f"ptxas {ver}", path, f"{v // 10}.{v % 10}"))
    return tools


def ptxas_usage(kernel, ptxas: str, ptx_version: str) -> dict:
    """Registers and spill bytes from `ptxas -v` on the kernel's PTX with the flags Triton's
    make_cubin passes (the cubin's resource table does not record spills); the PTX's .version is
    lowered to what that ptxas accepts."""
    ptx = re.sub(r"^\.version \S+", f".version {ptx_version}", kernel.asm["ptx"], count=1,
                 flags=re.M)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        fmad = [] if kernel.metadata.enable_fp_fusion else ["--fmad=false"]
        cmd = [ptxas, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
               f"--gpu-name=sm_{TARGET.arch}a", src, "-o", os.path.join(d, "k.o")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr

    def num(pat):
        m = re.search(pat, log)
        return int(m.group(1)) if m else 0
    return {"regs": num(r"Used (\d+) registers"), "spill_st": num(r"(\d+) bytes spill stores"),
            "spill_ld": num(r"(\d+) bytes spill loads")}


def write_sass(kernel, name, out_dir):
    cuobjdump = os.path.join(os.path.dirname(get_ptxas(TARGET.arch).path), "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    path = os.path.join(out_dir, f"{name}_{kernel.hash[:10]}.sass")
    with open(path, "w") as f:
        f.write(sass)
    return path


def _const_str(const: dict) -> str:
    def fmt(v):
        if isinstance(v, bool):
            return str(int(v))
        return str(v).replace("triton.language.", "").replace("tl.", "")
    return " ".join(f"{k}={fmt(v)}" for k, v in const.items() if v is not None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ops", default=DEFAULT_OPS,
                    help=f"comma-separated families or 'all': {', '.join(FAMILIES)}")
    ap.add_argument("--sass", metavar="DIR", help="write each kernel's SASS there")
    ap.add_argument("--only", default="", help="run only cases whose label contains this")
    ap.add_argument("--ptxas", help="measure registers/spills with this ptxas only")
    args = ap.parse_args(argv)
    install()
    failures = []
    for fam in (FAMILIES if args.ops == "all" else args.ops.split(",")):
        for label, thunk in FAMILIES[fam.strip()]():
            if args.only and args.only not in label:
                continue
            _case[0] = label
            print(f"# compiling {label}", file=sys.stderr, flush=True)
            try:
                thunk()
            except Exception as e:  # a compile error is a finding too; keep auditing the rest
                failures.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    if args.sass:
        os.makedirs(args.sass, exist_ok=True)
    tools = ptxas_tools(args.ptxas)
    usage_cols = " | ".join(f"regs, spill st/ld B ({t[0]})" for t in tools)
    print(f"| kernel | constexprs | warps | stages | shared B | {usage_cols} | flag | cases |")
    print("|---" * (7 + len(tools)) + "|")
    n_flag = 0
    for rec in compiled.values():
        k, md = rec["kernel"], rec["kernel"].metadata
        usage = [ptxas_usage(k, path, ver) for _, path, ver in tools]
        flags = []
        if md.shared > SMEM_LIMIT:
            flags.append(f"SMEM>{SMEM_LIMIT}")
        if usage[0]["spill_st"] or usage[0]["spill_ld"]:
            flags.append("SPILL")
        n_flag += bool(flags)
        cols = " | ".join(f"{u['regs']}, {u['spill_st']}/{u['spill_ld']}" for u in usage)
        print(f"| {rec['name']} | {_const_str(rec['const'])} | {md.num_warps} | {md.num_stages} "
              f"| {md.shared} | {cols} | {'FLAG ' + ','.join(flags) if flags else ''} "
              f"| {'; '.join(rec['cases'])} |", flush=True)
        if args.sass:
            write_sass(k, f"{rec['name']}_{re.sub(r'[^A-Za-z0-9=]+', '_', rec['cases'][0])[:80]}", args.sass)
    print(f"\n{len(compiled)} kernels, {n_flag} flagged (Triton {__import__('triton').__version__} "
          f"here, 3.6 on the GPU machine)")
    for f in failures:
        print(f"FAILED {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
