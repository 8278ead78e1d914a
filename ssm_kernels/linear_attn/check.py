"""`python -m ssm_kernels check` for linear_attn: fresh random inputs, odd length and head sizes,
every gate variant, forward + backward (q, k, v, g, g_gamma, initial_state) and the final state,
every dtype the backend serves, against the float64 chunked reference."""
from __future__ import annotations

from typing import List

import torch

from ..testing import CheckRow, Verdict, bound_for, check_from_cases, compare, rel_err
from .interface import chunk_gla, chunk_linear_attn, chunk_simple_gla, fused_recurrent_gla
from .reference import linear_attn_chunk_ref


def _run_public(variant, q, k, v, g, gam, h0, backend):
    if variant == "chunk_linear_attn":
        return chunk_linear_attn(q, k, v, initial_state=h0, output_final_state=True, normalize=False,
                                 backend=backend)
    if variant == "chunk_simple_gla":
        return chunk_simple_gla(q, k, v, g, gam, initial_state=h0, output_final_state=True,
                                backend=backend)
    fn = fused_recurrent_gla if variant == "fused_recurrent_gla" else chunk_gla
    return fn(q, k, v, g, initial_state=h0, output_final_state=True, backend=backend)


def _run_ref(variant, q, k, v, g, gam, h0, backend=None):
    if variant == "chunk_simple_gla":
        g = g + gam
    return linear_attn_chunk_ref(q, k, v, None if variant == "chunk_linear_attn" else g, None, h0,
                                 chunk_size=64)


def _fwd_bwd(fn, variant, inputs, cot, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    o, S = fn(variant, *leaves, **kw)
    loss = (o.double() * cot[0]).sum() + (S.double() * cot[1]).sum()
    used = [x for x, n in zip(leaves, _NAMES) if _uses(variant, n)]
    return [o, S, *torch.autograd.grad(loss, used)]


_NAMES = ["q", "k", "v", "g", "g_gamma", "initial_state"]


def _uses(variant, name):
    return not ((variant == "chunk_linear_attn" and name in ("g", "g_gamma"))
                or (variant.endswith("_gla") and variant != "chunk_simple_gla" and name == "g_gamma"))


VARIANTS = ("chunk_linear_attn", "chunk_simple_gla", "chunk_gla", "fused_recurrent_gla")


def _plan(backend: str, full: bool):
    """(variant, dtype) pairs: full = every variant x dtype; otherwise every variant once, the
    dtypes spread over them (each kernel is compiled once per dtype on the GPU)."""
    dtypes = {"reference": [torch.float32],
              "triton": [torch.float32, torch.float16, torch.bfloat16]}.get(backend, [])
    if full or len(dtypes) <= 1:
        return [(v, d) for v in VARIANTS for d in dtypes]
    spread = [torch.float32, torch.bfloat16, torch.float16, torch.float32]
    return list(zip(VARIANTS, spread))


def cases(backend: str, device: str, full: bool = False) -> list:
    """One case per (variant, dtype) of `_plan`, with the shape (B, T, H, K, V)."""
    shape = (1, 37, 2, 20, 12) if device == "cpu" else (2, 1031, 4, 128, 100)
    return [(variant, dtype, shape) for variant, dtype in _plan(backend, full)]


def check_case(backend: str, device: str, case) -> List[CheckRow]:
    variant, dtype, (B, T, H, K, V) = case
    rows = []
    q, k = (torch.randn(2, B, T, H, K, device=device) * 0.5).to(dtype).unbind(0)
    v = torch.randn(B, T, H, V, device=device).to(dtype)
    g = (-torch.rand(B, T, H, K, device=device) if variant.endswith("_gla") and variant != "chunk_simple_gla"
         else -torch.rand(B, T, H, device=device) * 0.5)
    gam = -torch.rand(H, device=device) * 0.2
    h0 = torch.randn(B, H, K, V, device=device)
    cot = (torch.randn(B, T, H, V, device=device, dtype=torch.float64),
           torch.randn(B, H, K, V, device=device, dtype=torch.float64))
    inputs = (q, k, v, g, gam, h0)
    out = _fwd_bwd(_run_public, variant, inputs, cot, backend=backend)
    ref = _fwd_bwd(_run_ref, variant, [x.double() for x in inputs], cot)
    lowp = (_fwd_bwd(_run_ref, variant, inputs, cot)
            if dtype in (torch.float16, torch.bfloat16) else None)
    names = ["o", "final_state"] + ["grad " + n for n in _NAMES if _uses(variant, n)]
    for i, name in enumerate(names):
        label = f"{variant} {name}"
        if name in ("grad g", "grad g_gamma"):
            # judged relative to |q * dq|, the scale of its rounding error (see the tests)
            mag = torch.linalg.vector_norm(ref[2].double() * q.double()).item()
            mag *= T if name == "grad g_gamma" else 1
            den = max(torch.linalg.vector_norm(ref[i]).item(), mag)
            err = rel_err(out[i], ref[i]) * torch.linalg.vector_norm(ref[i]).item() / den
            if lowp is None:
                bound = 1e-4
            else:
                lerr = rel_err(lowp[i], ref[i]) * torch.linalg.vector_norm(ref[i]).item() / den
                bound = bound_for(dtype, lerr)
            v_ = Verdict(label, err, bound)
        else:
            v_ = compare(label, out[i], ref[i], dtype, None if lowp is None else lowp[i])
        rows.append(CheckRow(label, backend, str(dtype).replace("torch.", ""), v_))
    return rows


check = check_from_cases(cases, check_case)
