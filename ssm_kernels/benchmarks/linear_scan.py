"""linear_scan cases: ours (triton, cuda) against accelerated-scan's Triton `scan` when importable.

accelerated-scan takes [B, D, T] contiguous with (in its warp kernel) power-of-two T; its Triton
`scan` (accelerated_scan.scalar) is the peer the issue names.
"""
from __future__ import annotations

from typing import Iterator

import torch

from .. import available_backends, linear_scan
from .harness import Case, rotating
from .peers import accelerated_scan


def cases(device: str, quick: bool) -> Iterator[Case]:
    if device == "cpu":
        grid = [(2, 16, 64)]
        dtypes = [torch.float32]
    else:
        grid = [(8, 1536, 4096), (8, 1536, 16384), (1, 256, 1 << 20)]  # last: few channels, long T
        dtypes = [torch.float32, torch.bfloat16]
    backends = [b for b in available_backends(device) if b != "reference"] or ["reference"]
    peer = accelerated_scan() if device != "cpu" else None
    for (B, D, T) in grid:
        for dtype in dtypes:
            es = torch.tensor([], dtype=dtype).element_size()
            n = B * D * T
            for layout in ("BTD", "BDT"):
                shape = (B, T, D) if layout == "BTD" else (B, D, T)
                dim = 1 if layout == "BTD" else 2

                def make(shape=shape):
                    a = (torch.rand(shape, device=device) * 0.5 + 0.5).to(dtype)
                    b = torch.randn(shape, device=device).to(dtype)
                    return a, b

                label = f"B={B} D={D} T={T} [{layout[0]},{layout[1]},{layout[2]}]"
                impls = [(f"ssm_kernels.{be}", lambda a, b, be=be, dim=dim: linear_scan(a, b, dim=dim, backend=be))
                         for be in backends]
                if peer is not None and layout == "BDT":
                    impls.append(("accelerated_scan.scalar", lambda a, b: peer(a, b)))
                elif peer is not None:  # its only layout is [B, D, T]: what a [B, T, D] user pays
                    impls.append(("accelerated_scan.scalar+transpose",
                                  lambda a, b: peer(a.transpose(1, 2).contiguous(),
                                                    b.transpose(1, 2).contiguous()).transpose(1, 2)))
                for impl, f in impls:
                    nxt = rotating(make, 2 * n * es)
                    yield (Case("linear_scan", impl, "fwd", label, str(dtype)[6:],
                                    lambda f=f, nxt=nxt: f(*nxt()), bytes=3 * n * es))
                    nxt_g = rotating(lambda: tuple(x.requires_grad_() for x in make()), 2 * n * es)
                    def fwd_bwd(f=f, nxt=nxt_g):
                        a, b = nxt()
                        h = f(a, b)
                        torch.autograd.grad(h, (a, b), b)  # any cotangent of h's shape

                    # fwd+bwd floor: fwd reads a,b writes h; bwd reads a,h,dh writes da,db
                    yield (Case("linear_scan", impl, "fwd+bwd", label, str(dtype)[6:], fwd_bwd,
                                    bytes=8 * n * es))
