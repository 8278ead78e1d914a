"""Delta rule cases (Gated DeltaNet): ours (Triton; the chunked WY kernels for chunk_*, the
step-by-step kernels for decoding) against flash-linear-attention's `chunk_gated_delta_rule` and
`fused_recurrent_gated_delta_rule` when importable, forward, forward+backward, and the decoding
step (one token from a state, in place).

Floors: bytes q, k, v, o once (+ g, beta fp32); the backward reads q, k, v, g, beta, do and writes
the gradients. FLOPs per token and value head for the chunked form with C = 64: 5 * 2*C*K-sized
products (K K^T, W, U, Q K^T, A V') plus 3 * 2*K*V (W S, K^T V', Q S); the backward about twice
that. The decode step moves the fp32 state twice (read, write).
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from .. import available_backends, chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
from .harness import Case, rotating


def _peers():
    out = {}
    try:
        from fla.ops.gated_delta_rule import (chunk_gated_delta_rule as fla_chunk,
                                              fused_recurrent_gated_delta_rule as fla_rec)
        out["fla.chunk_gated_delta_rule"] = (lambda q, k, v, g, b: fla_chunk(
            q, k, v, g, b, use_qk_l2norm_in_kernel=True)[0], True)
        out["fla.fused_recurrent_gated_delta_rule"] = (lambda q, k, v, g, b: fla_rec(
            q, k, v, g, b, use_qk_l2norm_in_kernel=True)[0], False)   # fla: no backward
    except Exception:
        pass
    return out


def cases(device: str, quick: bool) -> Iterator[Case]:
    if device == "cpu":
        grid, dtypes = [(1, 32, 1, 2, 16, 16)], [torch.float32]
    else:
        grid = [(4, 4096, 16, 16, 128, 128), (2, 8192, 8, 16, 128, 128), (8, 2048, 16, 32, 64, 64)]
        if quick:
            grid = grid[:1]
        dtypes = [torch.bfloat16]
    backends = [b for b in available_backends(device) if b not in ("reference", "cuda")] or ["reference"]
    peers = _peers() if device != "cpu" else {}
    for (B, T, H, HV, K, V) in grid:
        for dtype in dtypes:
            es = torch.tensor([], dtype=dtype).element_size()
            n = B * T * HV
            label = f"B={B} T={T} H={H} HV={HV} K={K} V={V}"
            dt = str(dtype)[6:]
            flops = n * (5 * 2 * 64 * K + 3 * 2 * K * V)
            nbytes = B * T * (2 * H * K + 2 * HV * V) * es + n * 8

            def make(B=B, T=T, H=H, HV=HV, K=K, V=V):
                q, k = (torch.randn(B, T, H, K, device=device).to(dtype) for _ in range(2))
                v = torch.randn(B, T, HV, V, device=device).to(dtype)
                g = F.logsigmoid(torch.randn(B, T, HV, device=device))
                return q, k, v, g, torch.rand(B, T, HV, device=device)

            impls = [(f"ssm_kernels.{be}", lambda q, k, v, g, b, be=be: chunk_gated_delta_rule(
                q, k, v, g, b, use_qk_l2norm_in_kernel=True, backend=be)[0], True)
                for be in backends]
            impls += [(name, f, bwd) for name, (f, bwd) in peers.items()]
            for impl, f, bwd in impls:
                nxt = rotating(make, nbytes)
                yield Case("chunk_gated_delta_rule", impl, "fwd", label, dt,
                           lambda f=f, nxt=nxt: f(*nxt()), bytes=nbytes, flops=flops)
                if not bwd:
                    continue
                nxt_g = rotating(lambda: tuple(x.requires_grad_() for x in make()), nbytes)

                def fwd_bwd(f=f, nxt=nxt_g):
                    xs = nxt()
                    o = f(*xs)
                    torch.autograd.grad(o, xs, torch.ones_like(o))
                yield Case("chunk_gated_delta_rule", impl, "fwd+bwd", label, dt, fwd_bwd,
                           bytes=3 * nbytes, flops=3 * flops)
            # decoding: one token per sequence from an fp32 state, updated in place
            sbytes = B * HV * K * V * 4

            def make_step(B=B, H=H, HV=HV, K=K, V=V):
                q, k, v, g, b = make(B=B, T=1, H=H, HV=HV, K=K, V=V)
                return q, k, v, g, b, torch.randn(B, HV, K, V, device=device)

            for be in backends:
                nxt = rotating(make_step, 2 * sbytes)

                def step(nxt=nxt, be=be):
                    q, k, v, g, b, s = nxt()
                    return fused_recurrent_gated_delta_rule(
                        q, k, v, g, b, initial_state=s, use_qk_l2norm_in_kernel=True,
                        inplace_final_state=True, backend=be)[0]
                yield Case("fused_recurrent_gated_delta_rule decode", f"ssm_kernels.{be}", "fwd",
                           f"B={B} HV={HV} K={K} V={V}", dt, step, bytes=2 * sbytes)
