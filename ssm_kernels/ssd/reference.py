"""The specification of SSD (Mamba-2's state space duality layer): plain PyTorch, any device/dtype.

Per head h (headdim P, state size N), with dt > 0 and A < 0 a scalar per head:

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T        h: [P, N]
    y_t = h_t C_t + D x_t,  then  y_t *= silu(z_t)   (when z is given)

`ssd_chunked` is the chunked algorithm of the paper in einsums: inside a chunk the output is a
masked (decayed) attention-like product; each chunk leaves a state; a short recurrence over chunk
states passes them on; each chunk reads its incoming state. `ssd_recurrent` is the step-by-step
loop. Both take the heads' own B, C ([..., H, N]); `ssd_ref` is the full mamba-ssm-style function.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def segsum(a: Tensor) -> Tensor:
    """[..., T] -> [..., T, T]: out[i, j] = a[j+1] + ... + a[i] for i >= j, -inf above."""
    T = a.shape[-1]
    x = a[..., None, :].expand(*a.shape, T).transpose(-1, -2)        # x[..., i, j] = a[i]
    x = x.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1), 0)
    s = x.cumsum(-2)                                                   # s[i, j] = sum_{j<k<=i} a_k
    return s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=a.device).tril(), float("-inf"))


def ssd_chunked(X: Tensor, a: Tensor, B: Tensor, C: Tensor, chunk: int,
                h0: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """X = x * dt: [b, l, h, p]; a = dt * A: [b, l, h]; B, C: [b, l, h, n]; h0: [b, h, p, n].
    Returns (Y [b, l, h, p], final state [b, h, p, n])."""
    b, L, H, P = X.shape
    if L == 0:
        return X.new_zeros(b, 0, H, P), (X.new_zeros(b, H, P, B.shape[-1]) if h0 is None else h0.to(X.dtype))
    pad = (-L) % chunk
    if pad:  # zero steps (x = 0, decay 1) change neither the state nor the kept outputs
        X, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (X, B, C))
        a = F.pad(a, (0, 0, 0, pad))
    c = X.shape[1] // chunk
    X, B, C = (t.reshape(b, c, chunk, *t.shape[2:]) for t in (X, B, C))    # [b, c, l, h, *]
    a = a.reshape(b, c, chunk, H).permute(0, 3, 1, 2)                       # [b, h, c, l]
    a_cs = a.cumsum(-1)
    # 1. inside each chunk: y_i = sum_{j <= i} (C_i . B_j) exp(a_{j+1} + ... + a_i) X_j
    Lmask = torch.exp(segsum(a))                                            # [b, h, c, l, l]
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, Lmask, X)
    # 2. each chunk's own state (from zero): sum_j exp(a_cs[last] - a_cs[j]) X_j B_j^T
    decay_to_end = torch.exp(a_cs[..., -1:] - a_cs)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_to_end, X)
    # 3. pass states between chunks (a recurrence over c + 1 chunk boundaries)
    init = torch.zeros_like(states[:, :1]) if h0 is None else h0[:, None].to(states.dtype)
    states = torch.cat([init, states], 1)
    decay_chunk = torch.exp(segsum(F.pad(a_cs[..., -1], (1, 0))))           # [b, h, c+1, c+1]
    states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final = states[:, :-1], states[:, -1]
    # 4. each chunk reads its incoming state: y_i += exp(a_cs[i]) C_i . h_in
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(a_cs))
    Y = (Y_diag + Y_off).reshape(b, c * chunk, H, P)[:, :L]
    return Y, final


def ssd_recurrent(X: Tensor, a: Tensor, B: Tensor, C: Tensor,
                  h0: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The step-by-step recurrence, same arguments and results as `ssd_chunked`."""
    b, L, H, P = X.shape
    h = X.new_zeros(b, H, P, B.shape[-1]) if h0 is None else h0.to(X.dtype)
    ys = []
    for t in range(L):
        h = torch.exp(a[:, t])[..., None, None] * h + X[:, t, :, :, None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    return (torch.stack(ys, 1) if ys else X.new_zeros(b, 0, H, P)), h


def process_dt(dt: Tensor, dt_bias: Optional[Tensor], dt_softplus: bool, dt_limit) -> Tensor:
    """dt (+ dt_bias), softplus if asked, clamped to dt_limit; float32 (float64 kept)."""
    dt = dt.to(torch.float64 if dt.dtype == torch.float64 else torch.float32)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def heads(t: Tensor, H: int) -> Tensor:
    """[b, l, g, n] grouped B/C -> [b, l, H, n]: head h reads group h // (H // g)."""
    return t.repeat_interleave(H // t.shape[2], dim=2)


def ssd_ref(x, dt, A, B, C, chunk_size=64, D=None, z=None, dt_bias=None, initial_states=None,
            cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
            recurrent=False) -> Tuple[Tensor, Tensor]:
    """mamba_chunk_scan_combined in plain PyTorch, computed in x's dtype promoted to at least
    float32. Returns (out [b, l, h, p] in x's dtype, final states [N, h, p, n] (N = b, or one per
    sequence of cu_seqlens))."""
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    H = x.shape[2]
    dtp = process_dt(dt, dt_bias, dt_softplus, dt_limit).to(cd)
    X = x.to(cd) * dtp[..., None]
    a = dtp * A.to(cd)
    Bh, Ch = heads(B.to(cd), H), heads(C.to(cd), H)
    run = ((lambda X, a, B, C, h0: ssd_recurrent(X, a, B, C, h0)) if recurrent else
           (lambda X, a, B, C, h0: ssd_chunked(X, a, B, C, chunk_size, h0)))
    h0 = None if initial_states is None else initial_states.to(cd)
    if cu_seqlens is None:
        Y, final = run(X, a, Bh, Ch, h0)
    else:
        cu = [int(v) for v in cu_seqlens.tolist()]
        ys, finals = [], []
        for n in range(len(cu) - 1):
            s = slice(cu[n], cu[n + 1])
            y, f = run(X[:, s], a[:, s], Bh[:, s], Ch[:, s], None if h0 is None else h0[n:n + 1])
            ys.append(y)
            finals.append(f)
        Y, final = torch.cat(ys, 1), torch.cat(finals, 0)
    if D is not None:
        Dd = D.to(cd)
        Y = Y + x.to(cd) * (Dd[:, None] if Dd.dim() == 1 else Dd)
    if z is not None:
        Y = Y * F.silu(z.to(cd))
    return Y.to(x.dtype), final
