"""The specification of linear_scan: plain PyTorch loops, any device, any dtype (float64 too).

    h_t = a_t * h_{t-1} + b_t        (reverse=True: h_t = a_t * h_{t+1} + b_t)

The state is kept in `state_dtype(a.dtype)` (float32 for fp16/bf16/fp32 storage) whatever the
storage dtype, and `h` is rounded to b's dtype on output, exactly what the kernels promise.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 state for real storage up to 32 bits, complex64 for complex64, float64 kept."""
    if dtype in (torch.float64, torch.complex128, torch.complex64):
        return dtype
    return torch.float32


def linear_scan_ref(a: torch.Tensor, b: torch.Tensor, initial_state: Optional[torch.Tensor] = None,
                    *, dim: int = 1, reverse: bool = False, output_final_state: bool = False):
    """Reference for `ssm_kernels.linear_scan` (same signature, no validation, differentiable by
    autograd through the loop). Slow: O(T) Python steps."""
    sd = state_dtype(b.dtype)
    a_t = a.movedim(dim, 0)
    b_t = b.movedim(dim, 0)
    h = (torch.zeros(a_t.shape[1:], dtype=sd, device=a.device) if initial_state is None
         else initial_state.to(sd))
    steps = range(a_t.shape[0] - 1, -1, -1) if reverse else range(a_t.shape[0])
    outs = [None] * a_t.shape[0]
    for t in steps:
        h = a_t[t].to(sd) * h + b_t[t].to(sd)
        outs[t] = h
    out = torch.stack(outs, 0).to(b.dtype).movedim(0, dim)
    return (out, h) if output_final_state else out


def linear_scan_fwd_ref(a: torch.Tensor, b: torch.Tensor, h0: Optional[torch.Tensor],
                        reverse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward on the canonical layout [P, T, Q] (time at dim 1): returns (h, final_state [P, Q])."""
    with torch.no_grad():
        return linear_scan_ref(a, b, h0, dim=1, reverse=reverse, output_final_state=True)


def linear_scan_bwd_ref(a: torch.Tensor, h: torch.Tensor, h0: Optional[torch.Tensor],
                        dh: torch.Tensor, dhT: torch.Tensor, reverse: bool):
    """Backward on the canonical layout, the same algebra the kernels use (a reverse scan):

        g_t = dh_t + conj(a_{t+1}) g_{t+1},  g_{T-1} = dh_{T-1} + dhT
        db_t = g_t,  da_t = g_t conj(h_{t-1}),  dh0 = conj(a_0) g_0       (h_{-1} = h0)

    (indices mirrored for reverse=True). Returns (da, db, dh0 [P, Q] in the state dtype).
    """
    sd = state_dtype(a.dtype)
    T = a.shape[1]
    order = list(range(T)) if reverse else list(range(T - 1, -1, -1))
    prev = (lambda t: t + 1) if reverse else (lambda t: t - 1)  # the step that feeds h_t
    h0s = torch.zeros_like(dhT, dtype=sd) if h0 is None else h0.to(sd)
    da = torch.empty_like(a)
    db = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    g = dhT.to(sd)
    coef = torch.ones_like(g)
    for t in order:
        g = coef * g + dh[:, t].to(sd)
        p = prev(t)
        hp = h0s if (p < 0 or p >= T) else h[:, p].to(sd)
        db[:, t] = g.to(db.dtype)
        da[:, t] = (g * hp.conj_physical()).to(da.dtype)
        coef = a[:, t].to(sd).conj_physical()
    dh0 = coef * g
    return da, db, dh0
