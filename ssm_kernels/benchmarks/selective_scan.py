"""selective scan cases: ours (triton; cuda when it exists) against mamba-ssm's CUDA
`selective_scan_fn` and Triton `selective_state_update` when importable (same process).

The issue's setting: bfloat16 u/delta/z/B/C, float32 A/D/delta_bias, time-varying B/C with one
group, z, D, delta_bias and softplus on. Floors (per call, counted by `_bytes`): the bytes each op
must move; the compute floor is one exp2 (SFU) plus ~4 FMA-pipe ops per (b, d, n, t) update in the
forward (B=8, D=1536, L=2048, N=16: 4.03e8 updates, ~0.10 ms of SFU time on an H100 SXM at
16 ex2/clk/SM x 132 SMs x 1.98 GHz) and about twice that, plus two scans, in the backward. The
harness floor is the byte floor (it knows only copy bandwidth and matmul rate); read the SFU floor
from `note`.
"""
from __future__ import annotations

from typing import Iterator

import torch

from .. import available_backends, selective_scan_fn, selective_state_update
from .harness import Case, rotating


def _peers():
    scan = step = None
    try:
        from .peers import mamba_ssm_module
        mod = mamba_ssm_module("ops.selective_scan_interface")
        scan = getattr(mod, "selective_scan_fn", None) if mod is not None else None
        mod = mamba_ssm_module("ops.triton.selective_state_update")
        step = getattr(mod, "selective_state_update", None) if mod is not None else None
    except Exception:
        pass
    if scan is None:
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as scan
        except Exception:
            scan = None
    if step is None:
        try:
            from mamba_ssm.ops.triton.selective_state_update import selective_state_update as step
        except Exception:
            step = None
    return scan, step


def _chunked(f):
    """f run with the chunked Triton forward instead of the time-sequential default."""
    def g(*args):
        from ..selective_scan import triton as tk
        old, tk.FWD_VARIANT = tk.FWD_VARIANT, "chunked"
        try:
            return f(*args)
        finally:
            tk.FWD_VARIANT = old
    return g


def _bytes(B, D, L, N, es, mode):
    big = B * D * L * es  # one (batch, dim, seqlen) tensor
    bc = B * N * L * es   # one time-varying B or C
    fwd = 3 * big + 2 * bc + big  # u, delta, z, B, C in; out
    if mode == "fwd":
        return fwd
    # backward: u, delta, z, dout, B, C in; du, ddelta, dz, dB, dC out
    return fwd + 4 * big + 2 * bc + 3 * big + 2 * bc


def cases(device: str, quick: bool) -> Iterator[Case]:
    if device == "cpu":
        grid, dtype = [(1, 8, 24, 4)], torch.float32
    else:
        grid, dtype = [(8, 1536, 2048, 16), (4, 4096, 4096, 16)], torch.bfloat16
        if quick:
            grid = grid[:1]
    backends = [b for b in available_backends(device) if b != "reference"] or ["reference"]
    peer_scan, peer_step = _peers() if device != "cpu" else (None, None)
    es = torch.tensor([], dtype=dtype).element_size()
    for (B, D, L, N) in grid:
        def make(B=B, D=D, L=L, N=N):
            u = torch.randn(B, D, L, device=device).to(dtype)
            delta = (0.5 * torch.randn(B, D, L, device=device) - 1.0).to(dtype)
            z = torch.randn(B, D, L, device=device).to(dtype)
            Bm = torch.randn(B, N, L, device=device).to(dtype)
            Cm = torch.randn(B, N, L, device=device).to(dtype)
            return u, delta, z, Bm, Cm

        A = -torch.rand(D, N, device=device) - 0.5
        Dv = torch.randn(D, device=device)
        bias = 0.1 * torch.randn(D, device=device)
        label = f"B={B} D={D} L={L} N={N} varBC z D bias softplus"
        updates = B * D * L * N
        note = f"{updates:.3g} (b,d,n,t) updates: exp2 each (SFU floor {updates / (132 * 16 * 1.98e9) * 1e3:.3f} ms on H100)"
        impls = [(f"ssm_kernels.{be}",
                  lambda u, dl, z, Bm, Cm, be=be, A=A, Dv=Dv, bias=bias: selective_scan_fn(
                      u, dl, A, Bm, Cm, Dv, z, bias, True, backend=be))
                 for be in backends]
        if "triton" in backends:
            impls.append(("ssm_kernels.triton.chunked", _chunked(
                lambda u, dl, z, Bm, Cm, A=A, Dv=Dv, bias=bias: selective_scan_fn(
                    u, dl, A, Bm, Cm, Dv, z, bias, True, backend="triton"))))
        if peer_scan is not None:
            impls.append(("mamba_ssm.cuda",
                          lambda u, dl, z, Bm, Cm, A=A, Dv=Dv, bias=bias: peer_scan(
                              u, dl, A, Bm, Cm, Dv, z, bias, True)))
        nbytes = 5 * B * D * L * es
        for impl, f in impls:
            nxt = rotating(make, nbytes)
            yield (Case("selective_scan", impl, "fwd", label, str(dtype)[6:],
                            lambda f=f, nxt=nxt: f(*nxt()), bytes=_bytes(B, D, L, N, es, "fwd"),
                            note=note))
            nxt_g = rotating(lambda: tuple(x.requires_grad_() for x in make()), nbytes)
            grad = torch.randn(B, D, L, device=device).to(dtype)

            def fwd_bwd(f=f, nxt=nxt_g, grad=grad):
                xs = nxt()
                y = f(*xs)
                torch.autograd.grad(y, xs, grad)

            yield (Case("selective_scan", impl, "fwd+bwd", label, str(dtype)[6:], fwd_bwd,
                            bytes=_bytes(B, D, L, N, es, "fwd+bwd"), note=note))
    # the decode step: Mamba-1 shapes, float32 state, bfloat16 activations
    steps = [(2, 64, 4)] if device == "cpu" else ([(64, 4096, 16), (256, 4096, 16)] if quick
                                                  else [(64, 4096, 16), (128, 4096, 16), (256, 4096, 16)])
    for (Bt, D, N) in steps:
        state = torch.randn(Bt, D, N, device=device)
        x, dt, z = (torch.randn(Bt, D, device=device).to(dtype) for _ in range(3))
        Bm, Cm = (torch.randn(Bt, N, device=device).to(dtype) for _ in range(2))
        A = -torch.rand(D, N, device=device) - 0.5
        Dv, bias = torch.randn(D, device=device), torch.randn(D, device=device)
        args = (x, dt, A, Bm, Cm, Dv, z, bias, True)
        nb = 2 * Bt * D * N * 4 + 4 * Bt * D * es + 2 * Bt * N * es
        impls = [(f"ssm_kernels.{be}", lambda be=be, state=state, args=args: selective_state_update(
            state, *args, backend=be)) for be in backends if be != "cuda"]  # no CUDA decode kernel
        if peer_step is not None:
            impls.append(("mamba_ssm.triton", lambda state=state, args=args: peer_step(state, *args)))
        for impl, f in impls:
            yield (Case("selective_state_update", impl, "fwd", f"batch={Bt} dim={D} N={N}",
                            str(dtype)[6:], f, bytes=nb))
