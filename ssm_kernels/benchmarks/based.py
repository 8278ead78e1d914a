"""Based cases: ours (chunk_based, Triton) against flash-linear-attention's `parallel_based`
(quadratic) and `fused_chunk_based` (K <= 16) when importable, and causal softmax attention
(torch SDPA, head dim V for q, k and v: the layer Based replaces).

fla's Based ops take [B, T, H, K] and return only o (no states); ours also keeps the state.
FLOPs counted per token and head: intra-chunk 2*C*(K+V) (q k^T and f v over a chunk of C = 64)
plus the state part 4*D*V (phi(q) S and phi(k)^T v, D = 1+K+K*K); the backward about twice that.
"""
from __future__ import annotations

from typing import Iterator

import torch

from .. import available_backends, chunk_based
from ..based.reference import feature_dim
from .harness import Case, rotating


def _peers():
    out = {}
    try:
        from fla.ops.based import fused_chunk_based, parallel_based
        out["fla.parallel_based"] = lambda q, k, v: parallel_based(q, k, v, use_norm=True)
        out["fla.fused_chunk_based"] = lambda q, k, v: fused_chunk_based(q, k, v, use_norm=True)
    except Exception:
        pass
    return out


def _sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def cases(device: str, quick: bool) -> Iterator[Case]:
    if device == "cpu":
        grid, dtypes = [(1, 64, 2, 16, 16)], [torch.float32]
    else:
        grid = [(4, 4096, 16, 16, 64), (4, 4096, 16, 16, 128), (2, 16384, 16, 16, 64),
                (8, 2048, 16, 32, 64)]
        if quick:
            grid = grid[:1]
        dtypes = [torch.bfloat16]
    backends = [b for b in available_backends(device) if b not in ("reference", "cuda")] or ["reference"]
    peers = _peers() if device != "cpu" else {}
    for (B, T, H, K, V) in grid:
        for dtype in dtypes:
            es = torch.tensor([], dtype=dtype).element_size()
            n = B * T * H
            label = f"B={B} T={T} H={H} K={K} V={V}"
            dt = str(dtype)[6:]
            flops = n * (2 * 64 * (K + V) + 4 * feature_dim(K) * V)

            def make(K=K, V=V, B=B, T=T, H=H):
                q = (torch.randn(B, T, H, K, device=device) * 0.5).to(dtype)
                k = (torch.randn(B, T, H, K, device=device) * 0.5).to(dtype)
                return q, k, torch.randn(B, T, H, V, device=device).to(dtype)

            impls = [(f"ssm_kernels.{be}", lambda q, k, v, be=be: chunk_based(q, k, v, backend=be)[0])
                     for be in backends]
            for name, f in peers.items():
                if name == "fla.fused_chunk_based" and K > 16:
                    continue
                impls.append((name, f))
            for impl, f in impls:
                yield from _add("chunk_based", impl, label, dt, f, make, n, K, V, es, flops)
            if device != "cpu":  # softmax attention with head dim V for q, k, v
                def make_sdpa(V=V, B=B, T=T, H=H):
                    return tuple(torch.randn(B, H, T, V, device=device).to(dtype) for _ in range(3))
                yield from _add("chunk_based", "torch.sdpa(causal, head dim V)", label, dt, _sdpa,
                     make_sdpa, n, V, V, es, 4 * n * T * V / 2, note="softmax attention peer")


def _add(op, impl, label, dt, f, make, n, K, V, es, flops, note=""):
    nbytes = n * (2 * K + V) * es
    nxt = rotating(make, nbytes)
    yield (Case(op, impl, "fwd", label, dt, lambda f=f, nxt=nxt: f(*nxt()),
                    bytes=n * (2 * K + 2 * V) * es, flops=flops, note=note))
    nxt_g = rotating(lambda: tuple(x.requires_grad_() for x in make()), nbytes)

    def fwd_bwd(f=f, nxt=nxt_g):
        q, k, v = nxt()
        o = f(q, k, v)
        torch.autograd.grad(o, (q, k, v), torch.ones_like(o))

    # fwd+bwd floor: fwd reads q,k,v writes o; bwd reads q,k,v,o,do writes dq,dk,dv
    yield (Case(op, impl, "fwd+bwd", label, dt, fwd_bwd, bytes=n * (6 * K + 6 * V) * es,
                    flops=3 * flops, note=note))
