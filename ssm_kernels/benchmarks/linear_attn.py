"""Chunked linear attention cases: ours (Triton, the chunked engine in ssm_kernels/chunk) against flash-linear-attention's chunk ops
(`chunk_linear_attn`, `chunk_simple_gla`, `chunk_gla`) when importable, and causal softmax
attention (torch SDPA, the bar every variant must beat at T >= 4096).

Both sides run chunk_linear_attn with normalize=False (the attention kernel itself; fla's
normalization is a separate torch pass). Gated variants take g = logsigmoid(randn) / 16.
Bytes: q, k, v, o (and g) once. FLOPs per token and head: intra-chunk 2*C*(K+V) with C = 64 plus
the state part 4*K*V; the backward about twice that. A packed (varlen) case runs the same total
tokens as 8 sequences of uneven lengths (`cu_seqlens`), ours only (fla's varlen layout differs).
"""
from __future__ import annotations

from typing import Iterator

import torch

from .. import available_backends, chunk_gla, chunk_linear_attn, chunk_simple_gla
from .harness import Case, rotating


def _fla():
    try:
        from fla.ops.gla import chunk_gla as f_gla
        from fla.ops.linear_attn import chunk_linear_attn as f_la
        from fla.ops.simple_gla import chunk_simple_gla as f_sg
        return {"chunk_linear_attn": lambda q, k, v, g: f_la(q, k, v, normalize=False)[0],
                "chunk_simple_gla": lambda q, k, v, g: f_sg(q, k, v, g)[0],
                "chunk_gla": lambda q, k, v, g: f_gla(q, k, v, g)[0]}
    except Exception:
        return {}


_OURS = {
    "chunk_linear_attn": lambda q, k, v, g, be, cu=None: chunk_linear_attn(
        q, k, v, normalize=False, cu_seqlens=cu, backend=be)[0],
    "chunk_simple_gla": lambda q, k, v, g, be, cu=None: chunk_simple_gla(q, k, v, g, cu_seqlens=cu,
                                                                         backend=be)[0],
    "chunk_gla": lambda q, k, v, g, be, cu=None: chunk_gla(q, k, v, g, cu_seqlens=cu, backend=be)[0],
}


def _uneven_cu(T: int, device) -> torch.Tensor:
    """8 packed sequences of uneven lengths summing to T."""
    w = torch.tensor([1, 9, 3, 17, 5, 2, 11, 16], dtype=torch.float64)
    ends = (w.cumsum(0) / w.sum() * T).round().long()
    return torch.cat([ends.new_zeros(1), ends]).to(torch.int32).to(device)


def _sdpa(q, k, v, g):
    # [B, T, H, D] -> [B, H, T, D] views, as a model would pass them
    o = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                         v.transpose(1, 2), is_causal=True)
    return o.transpose(1, 2)


def cases(device: str, quick: bool) -> Iterator[Case]:
    if device == "cpu":
        grid, dtype = [(1, 64, 2, 16, 16)], torch.float32
    else:
        grid = [(4, 4096, 16, 128, 128), (2, 16384, 16, 128, 128), (8, 2048, 16, 64, 64),
                (1, 16384, 16, 128, 128)]
        if quick:
            grid = grid[:1]
        dtype = torch.bfloat16
    backends = [b for b in available_backends(device) if b not in ("reference", "cuda")] or ["reference"]
    peers = _fla() if device != "cpu" else {}
    es = torch.tensor([], dtype=dtype).element_size()
    for (B, T, H, K, V) in grid:
        varlen = B == 1 and device != "cpu"
        cu = _uneven_cu(T, device) if varlen else None
        label = f"B={B} T={T} H={H} K={K} V={V}" + (" varlen N=8" if varlen else "")
        n = B * T * H
        for op in ("chunk_linear_attn", "chunk_simple_gla", "chunk_gla", "sdpa_causal"):
            if varlen and op == "sdpa_causal":
                continue
            gshape = {"chunk_simple_gla": (B, T, H), "chunk_gla": (B, T, H, K)}.get(op)

            def make(gshape=gshape):
                q, k = (torch.randn(2, B, T, H, K, device=device) * K ** -0.25).to(dtype).unbind(0)
                v = torch.randn(B, T, H, V, device=device).to(dtype)
                g = (None if gshape is None else
                     (torch.nn.functional.logsigmoid(torch.randn(gshape, device=device)) / 16))
                return q, k, v, g

            gbytes = 0 if gshape is None else 4 * torch.Size(gshape).numel()
            nbytes = n * (2 * K + 2 * V) * es + gbytes
            if op == "sdpa_causal":
                impls = [("torch.sdpa", _sdpa)]
                flops = 2 * n * T * (K + V)  # causal: half of the full 4*T*(K+V) per token
            else:
                impls = [(f"ssm_kernels.{be}",
                          lambda q, k, v, g, be=be, op=op: _OURS[op](q, k, v, g, be, cu))
                         for be in backends]
                if op in peers and not varlen:
                    impls.append((f"fla.{op}", peers[op]))
                flops = n * (2 * 64 * (K + V) + 4 * K * V)
            for impl, f in impls:
                nxt = rotating(make, nbytes)
                yield (Case(op, impl, "fwd", label, str(dtype)[6:],
                                lambda f=f, nxt=nxt: f(*nxt()), bytes=nbytes, flops=flops))

                def make_g(make=make):
                    return tuple(None if x is None else x.requires_grad_() for x in make())

                nxt_g = rotating(make_g, nbytes)
                grad = torch.randn(B, T, H, V, device=device).to(dtype)

                def fwd_bwd(f=f, nxt=nxt_g, grad=grad):
                    q, k, v, g = nxt()
                    o = f(q, k, v, g)
                    torch.autograd.grad(o, [x for x in (q, k, v, g) if x is not None], grad)

                yield (Case(op, impl, "fwd+bwd", label, str(dtype)[6:], fwd_bwd,
                                bytes=2 * nbytes + n * (2 * K + 2 * V) * es, flops=3 * flops))
