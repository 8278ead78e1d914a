"""causal_conv1d cases: ours (triton) against F.conv1d + slicing (what users write without a
kernel) and the causal-conv1d package when importable; both layouts, forward and forward+backward.

Floor: memory — the forward reads x and writes out (weights are negligible); forward+backward adds
reading x and dout and writing dx (4 more passes over a (B, D, T) tensor)."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from .. import available_backends, causal_conv1d_fn
from .harness import Case, rotating


def _peer():
    try:
        from causal_conv1d import causal_conv1d_fn as peer
        return peer
    except Exception:
        return None


def _torch_conv(x, w, b):
    W = w.shape[1]
    return F.silu(F.conv1d(x, w[:, None], b, padding=W - 1, groups=x.shape[1])[..., :x.shape[-1]])


def cases(device: str, quick: bool) -> Iterator[Case]:
    if device == "cpu":
        grid, dtypes, widths = [(2, 16, 64)], [torch.float32], [4]
    else:
        grid = [(8, 3072, 2048)] if quick else [(8, 3072, 2048), (4, 5120, 8192)]
        dtypes, widths = [torch.bfloat16, torch.float32], [4] if quick else [2, 4]
    backends = [b for b in available_backends(device) if b == "triton"] or ["reference"]
    peer = _peer() if device != "cpu" else None
    for (B, D, T) in grid:
        for dtype in dtypes:
            es = torch.tensor([], dtype=dtype).element_size()
            n = B * D * T
            for W in widths:
                for layout in ("BDT", "BTD"):
                    def make(layout=layout, W=W):
                        x = (torch.randn(B, D, T, device=device) if layout == "BDT"
                             else torch.randn(B, T, D, device=device).transpose(1, 2)).to(dtype)
                        return x, torch.randn(D, W, device=device, dtype=dtype), torch.randn(D, device=device, dtype=dtype)

                    label = f"B={B} D={D} T={T} W={W} [{layout[0]},{layout[1]},{layout[2]}]"
                    impls = [(f"ssm_kernels.{be}",
                              lambda x, w, b, be=be: causal_conv1d_fn(x, w, b, activation="silu", backend=be))
                             for be in backends]
                    impls.append(("torch.conv1d+slice", _torch_conv))
                    if peer is not None:
                        impls.append(("causal_conv1d", lambda x, w, b: peer(x, w, b, activation="silu")))
                    for impl, f in impls:
                        nxt = rotating(make, n * es)
                        yield Case("causal_conv1d", impl, "fwd", label, str(dtype)[6:],
                                   lambda f=f, nxt=nxt: f(*nxt()), bytes=2 * n * es)
                        nxt_g = rotating(lambda: tuple(t.requires_grad_() for t in make()), n * es)

                        def fwd_bwd(f=f, nxt=nxt_g):
                            x, w, b = nxt()
                            y = f(x, w, b)
                            torch.autograd.grad(y, (x, w, b), y)

                        yield Case("causal_conv1d", impl, "fwd+bwd", label, str(dtype)[6:], fwd_bwd,
                                   bytes=5 * n * es)
