"""`python -m ssm_kernels check` for the selective scan: fresh random inputs, odd length, every
feature on (D, z, delta_bias, softplus, grouped B/C, initial state, last state), forward and every
gradient, real and complex A, every dtype the backend serves, against the float64 reference; plus
the decode step against the scan."""
from __future__ import annotations

from typing import List

import torch

from ..testing import CheckRow, Verdict, check_from_cases, compare, rel_err
from .interface import selective_scan_fn, selective_state_update
from .reference import selective_scan_ref

_NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


def _inputs(device, dtype, cplx, small):
    batch, dim, L, N, G = (2, 6, 13, 5, 2) if small else (2, 256, 1031, 16, 2)
    A = -(torch.rand(dim, N, device=device) + 0.2)
    if cplx:
        A = torch.complex(A, torch.randn(dim, N, device=device))
    Lw = 2 * L if cplx else L
    return dict(u=torch.randn(batch, dim, L, device=device).to(dtype),
                delta=(0.5 * torch.randn(batch, dim, L, device=device)).to(dtype), A=A,
                B=torch.randn(batch, G, N, Lw, device=device).to(dtype),
                C=torch.randn(batch, G, N, Lw, device=device).to(dtype),
                D=torch.randn(dim, device=device), z=torch.randn(batch, dim, L, device=device).to(dtype),
                delta_bias=0.3 * torch.randn(dim, device=device),
                initial_state=torch.randn(batch, dim, N, device=device,
                                          dtype=torch.complex64 if cplx else torch.float32))


def _fwd_bwd(fn, inp, cot, **kw):
    leaves = [inp[k].detach().clone().requires_grad_() for k in _NAMES]
    out, last = fn(*leaves[:8], True, True, initial_state=leaves[8], **kw)
    loss = (out * cot[0].to(out.dtype)).sum() + (last * cot[1].to(last.dtype).conj()).real.sum()
    return [out, last, *torch.autograd.grad(loss, leaves)]


def _hi(x):
    return x.to(torch.complex128 if x.is_complex() else torch.float64)


def _plan(backend: str, full: bool):
    """(dtype, complex A) pairs: full = every dtype x real/complex; otherwise each dtype kind and
    complex A once (fp32 real, bf16 complex; the CUDA forward takes real A only)."""
    dtypes = [torch.float32] if backend == "reference" else [torch.float32, torch.float16, torch.bfloat16]
    cplxs = (False,) if backend == "cuda" else (False, True)
    if full:
        return [(d, c) for d in dtypes for c in cplxs]
    if backend == "reference":
        return [(torch.float32, False), (torch.float32, True)]
    return [(torch.float32, False), (torch.bfloat16, cplxs[-1])]


def cases(backend: str, device: str, full: bool = False) -> list:
    """("scan", dtype, complex A) per `_plan` entry, then ("decode",) (no CUDA decode kernel)."""
    if backend not in ("reference", "triton", "cuda"):
        return []
    small = device == "cpu"
    scans = [("scan", dtype, cplx, small) for dtype, cplx in _plan(backend, full)]
    return scans if backend == "cuda" else scans + [("decode", small)]


def check_case(backend: str, device: str, case) -> List[CheckRow]:
    if case[0] == "decode":
        return _decode_rows(backend, device, case[1])
    _, dtype, cplx, small = case
    rows = []
    inp = _inputs(device, dtype, cplx, small)
    cot = (torch.randn(inp["u"].shape, dtype=torch.float64, device=device),
           torch.randn(inp["initial_state"].shape, device=device,
                       dtype=torch.complex128 if cplx else torch.float64))
    out = _fwd_bwd(selective_scan_fn, inp, cot, backend=backend)
    ref = _fwd_bwd(selective_scan_ref, {k: _hi(v) for k, v in inp.items()}, cot)
    lowp = _fwd_bwd(selective_scan_ref, inp, cot) if dtype in (torch.float16, torch.bfloat16) else None
    tag = str(dtype).replace("torch.", "") + (" (A complex64)" if cplx else "")
    for i, name in enumerate(["out", "last_state"] + [f"grad {n}" for n in _NAMES]):
        op = f"selective_scan {name}"
        rows.append(CheckRow(op, backend, tag, compare(op, out[i], ref[i], dtype,
                                                       None if lowp is None else lowp[i])))
    return rows


def _decode_rows(backend: str, device: str, small: bool) -> List[CheckRow]:
    """The decode step, run over the sequence, reproduces the scan."""
    rows = []
    inp = _inputs(device, torch.float32, False, small)
    ks = [inp[k] for k in _NAMES]
    out, last = selective_scan_ref(*[_hi(x) for x in ks[:8]], True, True, initial_state=_hi(ks[8]))
    state = ks[8].clone()
    G = ks[3].shape[1]
    rep = ks[0].shape[1] // G
    ys = []
    for t in range(ks[0].shape[-1]):
        # one group per channel block: run the step per group (Mamba-1 form takes one B per batch)
        y = torch.cat([selective_state_update(
            state[:, g * rep:(g + 1) * rep], ks[0][:, g * rep:(g + 1) * rep, t],
            ks[1][:, g * rep:(g + 1) * rep, t], ks[2][g * rep:(g + 1) * rep], ks[3][:, g, :, t],
            ks[4][:, g, :, t], ks[5][g * rep:(g + 1) * rep], ks[6][:, g * rep:(g + 1) * rep, t],
            ks[7][g * rep:(g + 1) * rep], True, backend=backend) for g in range(G)], 1)
        ys.append(y)
    for name, a, b in (("out", torch.stack(ys, -1), out), ("state", state, last)):
        op = f"selective_state_update x T {name}"
        rows.append(CheckRow(op, backend, "float32", Verdict(op, rel_err(a, b), 1e-5)))
    return rows


check = check_from_cases(cases, check_case)
