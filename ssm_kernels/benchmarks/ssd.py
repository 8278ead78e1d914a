"""SSD (Mamba-2) cases: ours (`mamba_chunk_scan_combined` on the chunked engine) against
mamba-ssm's Triton `mamba_chunk_scan_combined` when importable (same process).

Setting: bfloat16 x/B/C, float32 dt/A/D/dt_bias, ngroups 1, dt_softplus on, D per head, no z.
Bytes: x and y once (2 bytes each), B and C once per group, dt once (float32). FLOPs per token
and head (chunk C = 64): intra-chunk 2*C*(N + P), state 4*N*P; the backward about twice that.
"""
from __future__ import annotations

from typing import Iterator

import torch

from .. import mamba_chunk_scan_combined
from .harness import Case, rotating


def _mamba():
    try:
        from .peers import mamba_ssm_module
        mod = mamba_ssm_module("ops.triton.ssd_combined")
        f = getattr(mod, "mamba_chunk_scan_combined", None) if mod is not None else None
        if f is not None:
            return f
    except Exception:
        pass
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as f
        return f
    except Exception:
        return None


def cases(device: str, quick: bool) -> Iterator[Case]:
    if device == "cpu":
        grid, dtype = [(1, 64, 2, 16, 1, 16)], torch.float32
    else:
        grid = [(4, 4096, 32, 64, 1, 128), (2, 16384, 32, 64, 1, 128), (8, 2048, 24, 64, 1, 64)]
        if quick:
            grid = grid[:1]
        dtype = torch.bfloat16
    peer = _mamba() if device != "cpu" else None
    es = torch.tensor([], dtype=dtype).element_size()
    for (B, L, H, P, G, N) in grid:
        label = f"B={B} L={L} H={H} P={P} G={G} N={N}"
        n = B * L * H

        def make(B=B, L=L, H=H, P=P, G=G, N=N):
            x = torch.randn(B, L, H, P, device=device).to(dtype)
            dt = torch.randn(B, L, H, device=device) - 2.0
            A = -torch.rand(H, device=device) * 4 - 0.5
            Bm, Cm = torch.randn(2, B, L, G, N, device=device).to(dtype).unbind(0)
            return x, dt, A, Bm, Cm, torch.randn(H, device=device), torch.randn(H, device=device)

        nbytes = 2 * n * P * es + 2 * B * L * G * N * es + 4 * n
        flops = n * (2 * 64 * (N + P) + 4 * N * P)
        impls = [("ssm_kernels.triton", lambda x, dt, A, Bm, Cm, D, bias: mamba_chunk_scan_combined(
            x, dt, A, Bm, Cm, 256, D=D, dt_bias=bias, dt_softplus=True, backend="triton"))]
        if peer is not None:
            impls.append(("mamba_ssm", lambda x, dt, A, Bm, Cm, D, bias: peer(
                x, dt, A, Bm, Cm, 256, D=D, dt_bias=bias, dt_softplus=True)))
        for impl, f in impls:
            nxt = rotating(make, nbytes)
            yield Case("mamba_chunk_scan_combined", impl, "fwd", label, str(dtype)[6:],
                       lambda f=f, nxt=nxt: f(*nxt()), bytes=nbytes, flops=flops)

            def make_g(make=make):
                return tuple(t.requires_grad_() for t in make())

            nxt_g = rotating(make_g, nbytes)
            grad = torch.randn(B, L, H, P, device=device).to(dtype)

            def fwd_bwd(f=f, nxt=nxt_g, grad=grad):
                xs = nxt()
                torch.autograd.grad(f(*xs), xs, grad)

            yield Case("mamba_chunk_scan_combined", impl, "fwd+bwd", label, str(dtype)[6:], fwd_bwd,
                       bytes=3 * nbytes, flops=3 * flops)
