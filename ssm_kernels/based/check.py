"""`python -m ssm_kernels check` for Based: fresh random inputs, odd length, initial/final state,
forward and every gradient, each dtype the backend serves, against the float64 reference."""
from __future__ import annotations

from typing import List

import torch

from ..testing import CheckRow, check_from_cases, compare, varlen_offsets
from .interface import chunk_based, fused_recurrent_based
from .reference import based_parallel_ref, feature_dim

NAMES = ["o", "final_state", "grad q", "grad k", "grad v", "grad initial_state"]


def _fwd_bwd(fn, q, k, v, h0, cot, cu_seqlens=None, **kw):
    xs = [x.detach().requires_grad_() for x in (q, k, v, h0)]
    o, hT = fn(*xs[:3], None, True, xs[3], True, cu_seqlens, **kw)
    loss = (o * cot[0].to(o.dtype)).sum() + (hT * cot[1].to(hT.dtype)).sum()
    return [o, hT, *torch.autograd.grad(loss, xs)]


def _plan(backend: str, shapes: list, full: bool):
    """(shape, dtype) pairs: full = every shape x dtype; otherwise every shape once with the dtypes
    spread over them (each kernel is compiled once per dtype and K on the GPU)."""
    dtypes = {"reference": [torch.float32],
              "triton": [torch.float32, torch.float16, torch.bfloat16]}.get(backend, [])
    if full or len(dtypes) <= 1:
        return [(s, d) for s in shapes for d in dtypes]
    return list(zip(shapes, [torch.float32, torch.bfloat16, torch.float16]))


def cases(backend: str, device: str, full: bool = False) -> list:
    """One case per (shape, dtype) of `_plan`."""
    small = device == "cpu"
    # (B, T, H, K, V, varlen): K = 16 is Based's feature dim; K = 32 uses several row blocks
    shapes = ([(1, 37, 2, 16, 20, False), (1, 23, 1, 32, 16, False), (1, 30, 2, 16, 12, True)]
              if small else
              [(2, 1031, 4, 16, 128, False), (1, 517, 2, 32, 100, False),
               (1, 2048, 4, 16, 64, True)])
    return _plan(backend, shapes, full)


def check_case(backend: str, device: str, case) -> List[CheckRow]:
    (B, T, H, K, V, varlen), dtype = case
    rows = []
    cu = varlen_offsets(T, device) if varlen else None
    N = B if cu is None else cu.numel() - 1
    q, k = (torch.randn(B, T, H, K, device=device).to(dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, device=device).to(dtype)
    h0 = torch.randn(N, H, feature_dim(K), V + 1, device=device) * 0.3
    h0[..., V] = h0[..., V].abs() + 1.0
    cot = (torch.randn(B, T, H, V, device=device, dtype=torch.float64),
           torch.randn(h0.shape, device=device, dtype=torch.float64))
    out = _fwd_bwd(chunk_based, q, k, v, h0, cot, cu, backend=backend)
    ref = _fwd_bwd(based_parallel_ref, q.double(), k.double(), v.double(), h0.double(),
                   cot, cu)
    lowp = (_fwd_bwd(based_parallel_ref, q, k, v, h0, cot, cu)
            if dtype in (torch.float16, torch.bfloat16) else None)
    tag = f"based K={K}{' varlen' if varlen else ''}"
    # the decode step form on the last few tokens, from the reference's state before them
    Ts = 3
    cut = [0, T - Ts] if cu is None else None
    if cut is not None:
        _, h_pre = based_parallel_ref(q[:, :T - Ts].double(), k[:, :T - Ts].double(),
                                      v[:, :T - Ts].double(), None, True, h0.double(), True)
        o_s, h_s = fused_recurrent_based(q[:, -Ts:], k[:, -Ts:], v[:, -Ts:], None, True,
                                         h_pre.float(), True, backend=backend)
        step_rows = [("fused_recurrent o", o_s, ref[0][:, -Ts:], None if lowp is None else lowp[0][:, -Ts:]),
                     ("fused_recurrent final_state", h_s, ref[1], None if lowp is None else lowp[1])]
    else:
        step_rows = []
    named = [(name, out[i], ref[i], None if lowp is None else lowp[i])
             for i, name in enumerate(NAMES)] + step_rows
    for name, o_, r_, l_ in named:
        vd = compare(f"{tag} {name}", o_, r_, dtype, l_)
        rows.append(CheckRow(f"{tag} {name}", backend, str(dtype).replace("torch.", ""), vd))
    return rows


check = check_from_cases(cases, check_case)
