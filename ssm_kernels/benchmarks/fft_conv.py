"""fft_conv cases: ours (triton) against the torch.fft implementation users write (fft_conv_ref:
rfft / multiply / irfft, float32 math, gates and D in eager torch) and torch.compile of it, in the
same process. Gates and D on, forward and forward+backward, float32 and bfloat16.

Floor: bytes only (inputs once, outputs once): fwd reads u, pre_gate, post_gate, writes y (4 row
tensors); fwd+bwd adds reading dy, u, pre_gate, post_gate and writing du, dpre, dpost (11 total).
The filter (H x L float32) is counted once per pass.
"""
from __future__ import annotations

from typing import Iterator

import torch

from .. import available_backends, fft_conv, fft_conv_ref
from .harness import Case, rotating


def _multipass(f):
    """Run f with the Triton backend forced onto the multi-pass path (outer factor 16): shows
    where the on-chip path stops paying (ssm_kernels.fft_conv.triton.MAX_ONCHIP_N)."""
    def g(*args):
        from ..fft_conv import triton as ft
        saved = ft.MAX_ONCHIP_N
        ft.MAX_ONCHIP_N = max(256, ft.transform_size(args[0].shape[-1], args[1].shape[-1]) // 16)
        try:
            return f(*args)
        finally:
            ft.MAX_ONCHIP_N = saved
    return g


def _compiled_ref():
    try:
        return torch.compile(fft_conv_ref, dynamic=False)
    except Exception:
        return None


def _onchip_limit(dtype) -> int:
    from ..fft_conv import triton as ft
    return ft.max_onchip_n(ft._prec(dtype), "fwd")


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
    impls = [(f"ssm_kernels.{be}", lambda u, k, D, p, q, be=be: fft_conv(u, k, D, pre_gate=p, post_gate=q,
                                                                          backend=be))
             for be in backends]
    if "triton" in backends and device != "cpu":
        impls.append(("ssm_kernels.triton[multi-pass]", _multipass(
            lambda u, k, D, p, q: fft_conv(u, k, D, pre_gate=p, post_gate=q, backend="triton"))))
    impls.append(("torch.fft", lambda u, k, D, p, q: fft_conv_ref(u, k, D, pre_gate=p, post_gate=q)))
    comp = _compiled_ref() if device != "cpu" else None
    if comp is not None:
        impls.append(("torch.compile(torch.fft)", lambda u, k, D, p, q: comp(u, k, D, pre_gate=p, post_gate=q)))
    for (B, H, L) in grid:
        for dtype in dtypes:
            es = torch.tensor([], dtype=dtype).element_size()
            n = B * H * L
            label = f"B={B} H={H} L={L} Lk=L gates+D"

            def make(grad=False, B=B, H=H, L=L, dtype=dtype):
                xs = [torch.randn(B, H, L, device=device).to(dtype) for _ in range(3)]
                k = torch.randn(H, L, device=device) / L ** 0.5
                D = torch.randn(H, device=device)
                ins = [xs[0], k, D, xs[1], xs[2]]
                return tuple(x.requires_grad_() for x in ins) if grad else tuple(ins)

            for impl, f in impls:
                if impl.endswith("[multi-pass]") and 2 * L > _onchip_limit(dtype):
                    continue  # the default is already multi-pass there
                nxt = rotating(make, 3 * n * es + H * L * 4)
                yield (Case("fft_conv", impl, "fwd", label, str(dtype)[6:],
                                lambda f=f, nxt=nxt: f(*nxt()), bytes=4 * n * es + H * L * 4))
                nxt_g = rotating(lambda: make(True), 3 * n * es + H * L * 4)
                dy = torch.randn(B, H, L, device=device).to(dtype)

                def fwd_bwd(f=f, nxt=nxt_g, dy=dy):
                    ins = nxt()
                    torch.autograd.grad(f(*ins), ins, dy)

                yield (Case("fft_conv", impl, "fwd+bwd", label, str(dtype)[6:], fwd_bwd,
                                bytes=11 * n * es + 3 * H * L * 4))
