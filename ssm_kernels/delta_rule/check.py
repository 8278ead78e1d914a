"""`python -m ssm_kernels check` for the delta rule: fresh random inputs, odd length, grouped value
heads, gate, in-kernel L2 norm, initial/final state, forward and every gradient, the decoding form,
each dtype the backend serves, against the float64 recurrence. On the Triton backend the chunk_*
forms run the chunked WY kernels (gated and ungated both checked), the decoding form the
step-by-step kernel. The gradient of g is judged relative to max(|dg|, |q * dq|) (dg_t sums such
products and can be far smaller than them), 1e-4 in float32, as the chunk engine's tests do."""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from ..testing import CheckRow, Verdict, bound_for, check_from_cases, compare, varlen_offsets
from .interface import chunk_delta_rule, chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
from .reference import delta_rule_recurrent_ref

NAMES = ["o", "final_state", "grad q", "grad k", "grad v", "grad g", "grad beta",
         "grad initial_state"]


def _fwd_bwd(fn, q, k, v, g, beta, h0, cot, cu_seqlens=None, **kw):
    xs = [x.detach().requires_grad_() for x in (q, k, v, g, beta, h0)]
    o, hT = fn(*xs[:5], None, xs[5], True, True, cu_seqlens, **kw)
    loss = (o * cot[0].to(o.dtype)).sum() + (hT * cot[1].to(hT.dtype)).sum()
    return [o, hT, *torch.autograd.grad(loss, xs)]


def _ref(q, k, v, g, beta, scale, h0, out_final, l2, cu_seqlens):
    return delta_rule_recurrent_ref(q, k, v, g, beta, scale, h0, cu_seqlens, l2)


def _fwd_bwd_nogate(fn, q, k, v, beta, h0, cot, cu_seqlens=None, **kw):
    xs = [x.detach().requires_grad_() for x in (q, k, v, beta, h0)]
    o, hT = fn(*xs[:4], None, xs[4], True, True, cu_seqlens, **kw)
    loss = (o * cot[0].to(o.dtype)).sum() + (hT * cot[1].to(hT.dtype)).sum()
    return [o, hT, *torch.autograd.grad(loss, xs)]


def _ref_nogate(q, k, v, beta, scale, h0, out_final, l2, cu_seqlens):
    return delta_rule_recurrent_ref(q, k, v, None, beta, scale, h0, cu_seqlens, l2)


def _judge_dg(name, dg, ref, lowp, q, dq_ref, dtype) -> Verdict:
    """dg against the float64 reference, relative to max(|dg_ref|, |q * dq_ref|) (L2 norms; dg's
    rounding error scales with the products it sums), 1e-4 in float32 (as the chunk engine's)."""
    qn = F.normalize(q.double(), dim=-1, eps=0)           # the check runs with the in-kernel norm
    den = max(torch.linalg.vector_norm(ref.double()).item(),
              torch.linalg.vector_norm(qn.cpu() * dq_ref.double().cpu()).item()) or 1.0
    err = lambda x: (torch.linalg.vector_norm(x.detach().double().cpu() - ref.double().cpu()).item()
                     / den if torch.isfinite(x).all() else float("inf"))
    bound = 1e-4 if dtype == torch.float32 else bound_for(dtype, None if lowp is None else err(lowp))
    return Verdict(name, err(dg), bound)


def _plan(backend: str, shapes: list, full: bool):
    dtypes = {"reference": [torch.float32],
              "triton": [torch.float32, torch.float16, torch.bfloat16]}.get(backend, [])
    if full or len(dtypes) <= 1:
        return [(s, d) for s in shapes for d in dtypes]
    return list(zip(shapes, [torch.float32, torch.bfloat16, torch.float16]))


def cases(backend: str, device: str, full: bool = False) -> list:
    """Per (shape, dtype) of `_plan`, two cases: the gated form (chunk_gated_delta_rule, plus the
    decoding form when not varlen) and the ungated one (chunk_delta_rule). They compile disjoint
    kernels on the GPU, so `check` can run them in two workers."""
    small = device == "cpu"
    # (B, T, H, HV, K, V, varlen)
    shapes = ([(1, 23, 1, 2, 16, 20, False), (1, 19, 2, 2, 12, 8, True)] if small else
              [(2, 517, 2, 4, 128, 128, False), (1, 600, 2, 4, 64, 96, True)])
    return [(shape, dtype, gated) for shape, dtype in _plan(backend, shapes, full)
            for gated in (True, False)]


def check_case(backend: str, device: str, case) -> List[CheckRow]:
    (B, T, H, HV, K, V, varlen), dtype, gated = case
    cu = varlen_offsets(T, device) if varlen else None
    N = B if cu is None else cu.numel() - 1
    q, k = (torch.randn(B, T, H, K, device=device).to(dtype) for _ in range(2))
    v = torch.randn(B, T, HV, V, device=device).to(dtype)
    g = F.logsigmoid(torch.randn(B, T, HV, device=device))
    beta = torch.rand(B, T, HV, device=device)
    h0 = torch.randn(N, HV, K, V, device=device)
    cot = (torch.randn(B, T, HV, V, device=device, dtype=torch.float64),
           torch.randn(N, HV, K, V, device=device, dtype=torch.float64))
    d = lambda x: x.double()
    lowp_dtype = dtype in (torch.float16, torch.bfloat16)
    shape_tag = f"K={K} V={V} HV/H={HV // H}{' varlen' if varlen else ''}"
    if not gated:  # the ungated form (DeltaNet)
        out0 = _fwd_bwd_nogate(chunk_delta_rule, q, k, v, beta, h0, cot, cu, backend=backend)
        ref0 = _fwd_bwd_nogate(_ref_nogate, d(q), d(k), d(v), d(beta), d(h0), cot, cu)
        low0 = _fwd_bwd_nogate(_ref_nogate, q, k, v, beta, h0, cot, cu) if lowp_dtype else None
        names0 = [n for n in NAMES if n != "grad g"]
        named = [(f"delta_rule {shape_tag} {name}", out0[i], ref0[i], None if low0 is None else low0[i])
                 for i, name in enumerate(names0)]
        return [CheckRow(name, backend, str(dtype).replace("torch.", ""),
                         compare(name, o_, r_, dtype, l_)) for name, o_, r_, l_ in named]
    out = _fwd_bwd(chunk_gated_delta_rule, q, k, v, g, beta, h0, cot, cu, backend=backend)
    ref = _fwd_bwd(_ref, d(q), d(k), d(v), d(g), d(beta), d(h0), cot, cu)
    lowp = _fwd_bwd(_ref, q, k, v, g, beta, h0, cot, cu) if lowp_dtype else None
    named = [(name, out[i], ref[i], None if lowp is None else lowp[i])
             for i, name in enumerate(NAMES)]
    if cu is None:  # the decoding form on the last 3 tokens from the state before them
        Ts = 3
        _, h_pre = delta_rule_recurrent_ref(d(q[:, :-Ts]), d(k[:, :-Ts]), d(v[:, :-Ts]),
                                            d(g[:, :-Ts]), d(beta[:, :-Ts]), None, d(h0),
                                            None, True)
        state = h_pre.float().contiguous()
        o_s, _ = fused_recurrent_gated_delta_rule(
            q[:, -Ts:], k[:, -Ts:], v[:, -Ts:], g[:, -Ts:], beta[:, -Ts:],
            initial_state=state, use_qk_l2norm_in_kernel=True, inplace_final_state=True,
            backend=backend)
        named += [("fused_recurrent o", o_s, ref[0][:, -Ts:],
                   None if lowp is None else lowp[0][:, -Ts:]),
                  ("fused_recurrent final_state", state, ref[1],
                   None if lowp is None else lowp[1])]
    rows = []
    for name, o_, r_, l_ in named:
        name = f"gated_delta_rule {shape_tag} {name}"
        if name.endswith(" grad g"):
            vd = _judge_dg(name, o_, r_, l_, q, ref[2], dtype)
        else:
            vd = compare(name, o_, r_, dtype, l_)
        rows.append(CheckRow(name, backend, str(dtype).replace("torch.", ""), vd))
    return rows


check = check_from_cases(cases, check_case)
