"""fft_conv cases (issue #11's table): ours (the Triton backend's automatic path, and each path
forced: "cufft" = Triton glue fused around torch.fft, "monarch" = tensor-core DFT kernels, 16-bit
on-chip sizes only) against the torch.fft implementation users write (fft_conv_ref: rfft /
multiply / irfft, float32 math, D in eager torch) and torch.compile of it, in the same process.
Gates off, D on; forward and forward+backward; float32 and bfloat16.

Floor: bytes only (inputs once, outputs once): fwd reads u and writes y (2 row tensors); fwd+bwd
adds reading dy and u and writing du (5 in all). The filter (H x L float32) counts once per pass.
The cuFFT path cannot reach it (its fp32 complex intermediates move ~8x more); bench/NOTES.md
has the traffic model. Rotated inputs reuse each copy's filter, so the filter-spectrum cache hits
(the inference / gradient-accumulation case).
"""
from __future__ import annotations

from typing import Iterator

import torch

from .. import available_backends, fft_conv, fft_conv_ref
from .harness import Case, rotating


class _path:
    """Force the Triton backend's path ("cufft" / "monarch"; None: automatic) for the forward and
    the backward run inside the block."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        from ..fft_conv import interface as fi
        self.saved, fi.FORCE_PATH = fi.FORCE_PATH, self.path

    def __exit__(self, *exc):
        from ..fft_conv import interface as fi
        fi.FORCE_PATH = self.saved


def _compiled_ref():
    try:
        return torch.compile(fft_conv_ref, dynamic=False)
    except Exception:
        return None


def _monarch_ok(dtype, L: int) -> bool:
    from ..fft_conv import triton as ft
    if dtype == torch.float32:
        return False  # tf32x3: slower than torch.fft everywhere (issue #11)
    return ft.plan(L, L, ft._prec(dtype), "fwd")[0] == "onchip"


def cases(device: str, quick: bool) -> Iterator[Case]:
    if device == "cpu":
        grid = [(1, 4, 300)]
        dtypes = [torch.float32]
    else:
        grid = [(8, 768, 4096), (8, 768, 1024), (4, 768, 16384), (1, 768, 262144)]
        if quick:
            grid = grid[:1]
        dtypes = [torch.float32, torch.bfloat16]
    backends = [b for b in available_backends(device) if b not in ("reference", "cuda")] or ["reference"]
    impls = [(f"ssm_kernels.{be}", lambda u, k, D, be=be: fft_conv(u, k, D, backend=be), None)
             for be in backends]
    if "triton" in backends and device != "cpu":
        tri = lambda u, k, D: fft_conv(u, k, D, backend="triton")  # noqa: E731
        impls += [("ssm_kernels.triton[cufft]", tri, "cufft"),
                  ("ssm_kernels.triton[monarch]", tri, "monarch")]
    impls.append(("torch.fft", lambda u, k, D: fft_conv_ref(u, k, D), None))
    comp = _compiled_ref() if device != "cpu" else None
    if comp is not None:
        impls.append(("torch.compile(torch.fft)", lambda u, k, D: comp(u, k, D), None))
    for (B, H, L) in grid:
        for dtype in dtypes:
            es = torch.tensor([], dtype=dtype).element_size()
            n = B * H * L
            label = f"B={B} H={H} L={L} Lk=L D"

            def make(grad=False, B=B, H=H, L=L, dtype=dtype):
                u = torch.randn(B, H, L, device=device).to(dtype)
                k = torch.randn(H, L, device=device) / L ** 0.5
                D = torch.randn(H, device=device)
                ins = (u, k, D)
                return tuple(x.requires_grad_() for x in ins) if grad else ins

            for impl, f, path in impls:
                if impl.endswith("[monarch]") and not _monarch_ok(dtype, L):
                    continue
                long_fwd_only = B * L > 1 << 17  # B=1 L=262144: the issue times the forward only
                nxt = rotating(make, n * es + H * L * 4)
                def fwd(f=f, nxt=nxt, path=path):
                    with _path(path):
                        return f(*nxt())

                yield Case("fft_conv", impl, "fwd", label, str(dtype)[6:], fwd,
                           bytes=2 * n * es + H * L * 4)
                if long_fwd_only:
                    continue
                nxt_g = rotating(lambda: make(True), n * es + H * L * 4)
                dy = torch.randn(B, H, L, device=device).to(dtype)

                def fwd_bwd(f=f, nxt=nxt_g, dy=dy, path=path):
                    ins = nxt()
                    with _path(path):
                        torch.autograd.grad(f(*ins), ins, dy)

                yield Case("fft_conv", impl, "fwd+bwd", label, str(dtype)[6:], fwd_bwd,
                           bytes=5 * n * es + 3 * H * L * 4)
