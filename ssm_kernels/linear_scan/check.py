"""`python -m ssm_kernels check` for linear_scan: fresh random inputs, odd length, forward and
backward, every dtype the backend serves, against the float64 reference."""
from __future__ import annotations

from typing import List

import torch

from ..testing import CheckRow, check_from_cases, compare
from .interface import linear_scan
from .reference import linear_scan_ref


def _fwd_bwd(fn, a, b, h0, cot, **kw):
    a, b, h0 = [x.detach().requires_grad_() for x in (a, b, h0)]
    h, hT = fn(a, b, h0, dim=1, output_final_state=True, **kw)
    loss = (h * cot[0].to(h.dtype).conj()).real.sum() + (hT * cot[1].to(hT.dtype).conj()).real.sum()
    return [h, hT, *torch.autograd.grad(loss, (a, b, h0))]


def cases(backend: str, device: str, full: bool = False) -> list:
    """One case per dtype. full: every dtype the backend serves; otherwise one of each kind (fp32,
    bf16, complex)."""
    dtypes = {"reference": [torch.float32, torch.complex64],
              "triton": [torch.float32, torch.float16, torch.bfloat16, torch.complex64],
              "cuda": [torch.float32, torch.float16, torch.bfloat16]}.get(backend, [])
    if not full:
        dtypes = [d for d in dtypes if d != torch.float16]
    shape = (2, 37, 6) if device == "cpu" else (4, 1031, 256)  # odd length: not a multiple of any tile
    return [(shape, dtype) for dtype in dtypes]


def check_case(backend: str, device: str, case) -> List[CheckRow]:
    shape, dtype = case
    rows = []
    cplx = dtype.is_complex
    hi = torch.complex128 if cplx else torch.float64
    mag = torch.rand(shape, device=device) * 0.5 + 0.5
    a = (torch.polar(mag, torch.rand(shape, device=device) * 6.28) if cplx else mag).to(dtype)
    b = torch.randn(shape, device=device, dtype=torch.complex64 if cplx else torch.float32).to(dtype)
    h0 = torch.randn(shape[0], shape[2], device=device, dtype=torch.complex64 if cplx else torch.float32)
    cot = (torch.randn(shape, dtype=hi, device=device), torch.randn(h0.shape, dtype=hi, device=device))
    out = _fwd_bwd(linear_scan, a, b, h0, cot, backend=backend)
    ref = _fwd_bwd(linear_scan_ref, a.to(hi), b.to(hi), h0.to(hi), cot)
    lowp = _fwd_bwd(linear_scan_ref, a, b, h0, cot) if dtype in (torch.float16, torch.bfloat16) else None
    for i, name in enumerate(["h", "final_state", "grad a", "grad b", "grad initial_state"]):
        v = compare(f"linear_scan {name}", out[i], ref[i], dtype, None if lowp is None else lowp[i])
        rows.append(CheckRow(f"linear_scan {name}", backend, str(dtype).replace("torch.", ""), v))
    return rows


check = check_from_cases(cases, check_case)
