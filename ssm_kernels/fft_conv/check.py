"""`python -m ssm_kernels check` for fft_conv and s4d_kernel: fresh random inputs, odd lengths,
forward and every gradient, every dtype the backend serves, against float64 references."""
from __future__ import annotations

from typing import List

import torch

from ..testing import CheckRow, check_from_cases, compare
from .interface import fft_conv, s4d_kernel
from .reference import fft_conv_direct, fft_conv_ref, s4d_kernel_ref

_NAMES = ["y", "grad u", "grad k", "grad D", "grad pre_gate", "grad post_gate"]


def _fwd_bwd(fn, u, k, D, pg, qg, cot, **kw):
    ins = [x.detach().requires_grad_() for x in (u, k, D, pg, qg)]
    y = fn(ins[0], ins[1], ins[2], pre_gate=ins[3], post_gate=ins[4], **kw)
    return [y, *torch.autograd.grad((y * cot.to(y.dtype)).sum(), ins)]


def _conv_rows(backend, device, dtype, B, H, L, Lk) -> List[CheckRow]:
    oracle = fft_conv_direct if L * Lk <= 1 << 16 else fft_conv_ref  # rfft float64 past small L
    u = torch.randn(B, H, L, device=device).to(dtype)
    pg, qg = (torch.randn(B, H, L, device=device).to(dtype) for _ in range(2))
    k = torch.randn(H, Lk, device=device) / Lk ** 0.5
    D = torch.randn(H, device=device)
    cot = torch.randn(B, H, L, device=device, dtype=torch.float64)
    out = _fwd_bwd(fft_conv, u, k, D, pg, qg, cot, backend=backend)
    ref = _fwd_bwd(oracle, *(x.double() for x in (u, k, D, pg, qg)), cot)
    lowp = _fwd_bwd(fft_conv_ref, u, k, D, pg, qg, cot) if dtype != torch.float32 else None
    rows = []
    for i, name in enumerate(_NAMES):
        op = f"fft_conv L={L} Lk={Lk} {name}"
        v = compare(op, out[i], ref[i], dtype, None if lowp is None else lowp[i])
        rows.append(CheckRow(op, backend, str(dtype).replace("torch.", ""), v))
    return rows


def _s4d_rows(backend, device, H, N, L) -> List[CheckRow]:
    log_dt = torch.rand(H, device=device) * 4.6 - 6.9  # dt in [1e-3, 1e-1]
    A = torch.complex(-0.5 - 0.1 * torch.rand(H, N, device=device),
                      3.14159 * torch.arange(N, device=device).float().expand(H, N))
    C = torch.randn(H, N, device=device, dtype=torch.complex64)
    cot = torch.randn(H, L, device=device, dtype=torch.float64)

    def fb(fn, *xs, **kw):
        xs = [x.detach().requires_grad_() for x in xs]
        K = fn(*xs, L, **kw)
        return [K, *torch.autograd.grad((K * cot.to(K.dtype)).sum(), xs)]

    out = fb(s4d_kernel, log_dt, A, C, backend=backend)
    ref = fb(s4d_kernel_ref, log_dt.double(), A.to(torch.complex128), C.to(torch.complex128))
    rows = []
    for i, name in enumerate(["K", "grad log_dt", "grad A", "grad C"]):
        op = f"s4d_kernel L={L} {name}"
        rows.append(CheckRow(op, backend, "float32", compare(op, out[i], ref[i], torch.float32)))
    return rows


def cases(backend: str, device: str, full: bool = False) -> list:
    """("conv", dtype, (B, H, L, Lk)) per planned conv, then ("s4d", (H, N, L)). full: every
    dtype x shape; otherwise float32 on the first shape and bfloat16 on both (on the GPU: float32
    on the cuFFT path; bfloat16 on the default on-chip monarch16 kernels at L = 1031 and on the
    cuFFT path at L = 5000, past monarch16's 8192-point limit)."""
    dtypes = {"reference": [torch.float32], "triton": [torch.float32, torch.float16, torch.bfloat16]}
    if backend not in dtypes:
        return []
    small = device == "cpu"
    # odd lengths, Lk < L; on the GPU one on-chip size and one multi-pass size
    shapes = [(2, 3, 37, 29)] if small else [(4, 64, 1031, 1031), (2, 16, 5000, 4001)]
    if full:
        plan = [(d, s) for d in dtypes[backend] for s in shapes]
    elif backend == "reference":
        plan = [(torch.float32, s) for s in shapes]
    else:
        plan = [(torch.float32, shapes[0])] + [(torch.bfloat16, s) for s in shapes]
    return [("conv", dtype, shape) for dtype, shape in plan] + [
        ("s4d", (3, 9, 101) if small else (64, 64, 4099))]


def check_case(backend: str, device: str, case) -> List[CheckRow]:
    if case[0] == "s4d":
        return _s4d_rows(backend, device, *case[1])
    _, dtype, shape = case
    return _conv_rows(backend, device, dtype, *shape)


check = check_from_cases(cases, check_case)
