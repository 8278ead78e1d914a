"""The specification of causal_conv1d: plain PyTorch, any device, any float dtype (float64 too).

Channel d, output step t of a sequence that starts at `start` (0 without packing)::

    xpad = [initial_states[d, 0 : width-1], x[d, start:]]        (zeros without initial_states)
    out[d, t] = act(bias[d] + sum_k weight[d, k] * xpad[t - start + k])
    final_states[d, j] = xpad[len + j],  j < width - 1              (the last width-1 inputs)

With `seq_idx` (batch, seqlen) a step only sees inputs of its own index (no states; steps with a
negative index are padding and output 0); with `cu_seqlens` (N+1,) the batch is one packed row,
each sequence has its own initial and final state ((N, dim, width-1)).

Arithmetic is float32 for fp16/bf16/fp32 inputs (float64 for float64) and the output is rounded
to x's dtype, which is what the kernels promise.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shifted(x: Tensor, weight: Tensor, initial_states: Optional[Tensor],
             seq_idx: Optional[Tensor], cu_seqlens: Optional[Tensor]):
    """xpad seen by output t at tap k, for every k: a list of (batch, dim, seqlen) tensors."""
    B, D, T = x.shape
    W = weight.shape[1]
    t = torch.arange(T, device=x.device)
    if cu_seqlens is not None:
        cu = cu_seqlens.long()
        seq = (torch.searchsorted(cu, t, right=True) - 1).clamp(0, cu.numel() - 2)
        start = cu[seq]
    else:
        seq = start = None
    if W == 1:
        initial_states = None  # no tap reaches before the start
    outs = []
    for k in range(W):
        m = k - (W - 1)  # input position relative to t (<= 0)
        p = t + m
        v = x[..., p.clamp(min=0)]
        if seq_idx is not None:
            sp = seq_idx[:, p.clamp(min=0)]
            inside = (p >= 0)[None, :] & (sp == seq_idx)  # (B, T)
            v = torch.where(inside[:, None, :], v, torch.zeros((), dtype=v.dtype, device=v.device))
        elif cu_seqlens is not None:
            inside = p >= start
            if initial_states is not None:
                j = (p - start + W - 1).clamp(0, max(W - 2, 0))
                vi = initial_states.to(x.dtype).permute(1, 0, 2)[:, seq, j][None]  # (1, D, T)
            else:
                vi = torch.zeros((), dtype=v.dtype, device=v.device)
            v = torch.where(inside[None, None, :], v, vi)
        else:
            inside = p >= 0
            if initial_states is not None:
                vi = initial_states.to(x.dtype)[..., (p + W - 1).clamp(0, max(W - 2, 0))]
            else:
                vi = torch.zeros((), dtype=v.dtype, device=v.device)
            v = torch.where(inside, v, vi)
        outs.append(v)
    return outs


def final_states_ref(x: Tensor, width: int, initial_states: Optional[Tensor] = None,
                     cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """The last width-1 entries of each sequence's xpad: (batch or N, dim, width-1) in x's dtype."""
    B, D, T = x.shape
    W1 = width - 1
    if W1 == 0:
        return x.new_empty((B if cu_seqlens is None else cu_seqlens.numel() - 1, D, 0))
    if cu_seqlens is None:
        start = torch.zeros(B, dtype=torch.long, device=x.device)
        end = torch.full((B,), T, dtype=torch.long, device=x.device)
    else:
        cu = cu_seqlens.long()
        start, end = cu[:-1], cu[1:]
    j = torch.arange(W1, device=x.device)
    p = end[:, None] - W1 + j  # (N, W-1) positions in x
    inside = p >= start[:, None]
    rows = torch.arange(B, device=x.device)[:, None].expand_as(p) if cu_seqlens is None \
        else torch.zeros_like(p)
    v = x.permute(0, 2, 1)[rows, p.clamp(min=0)]  # (N, W-1, D)
    if initial_states is not None:
        vi = initial_states.to(x.dtype).permute(0, 2, 1).gather(
            1, (p - start[:, None] + W1).clamp(0, max(W1 - 1, 0))[..., None].expand(-1, -1, D))
    else:
        vi = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(inside[..., None], v, vi).permute(0, 2, 1).contiguous()


def causal_conv1d_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                      seq_idx: Optional[Tensor] = None, initial_states: Optional[Tensor] = None,
                      return_final_states: bool = False, final_states_out: Optional[Tensor] = None,
                      activation: Optional[str] = None, *, cu_seqlens: Optional[Tensor] = None):
    """Reference for `ssm_kernels.causal_conv1d_fn` (same signature, no validation, differentiable
    by autograd). Returns out, or (out, final_states)."""
    cd = compute_dtype(x.dtype)
    xs = _shifted(x.to(cd), weight, initial_states, seq_idx, cu_seqlens)
    w = weight.to(cd)
    out = sum(w[:, k, None] * xs[k] for k in range(w.shape[1]))
    if bias is not None:
        out = out + bias.to(cd)[:, None]
    if activation in ("silu", "swish"):
        out = F.silu(out)
    if seq_idx is not None:
        out = torch.where((seq_idx >= 0)[:, None, :], out, torch.zeros((), dtype=cd, device=x.device))
    out = out.to(x.dtype)
    if not return_final_states:
        return out
    final = final_states_ref(x, weight.shape[1], initial_states, cu_seqlens)
    if final_states_out is not None:
        final_states_out.copy_(final)
        final = final_states_out
    return out, final


def causal_conv1d_update_ref(x: Tensor, conv_state: Tensor, weight: Tensor,
                             bias: Optional[Tensor] = None, activation: Optional[str] = None,
                             cache_seqlens: Optional[Tensor] = None,
                             conv_state_indices: Optional[Tensor] = None) -> Tensor:
    """Reference for `ssm_kernels.causal_conv1d_update`; updates conv_state in place.

    Without cache_seqlens the state holds the last state_len inputs (oldest first) and is shifted
    left by seqlen. With cache_seqlens (batch,) it is a circular buffer: the width-1 inputs before
    the new ones are read at (cache_seqlens - width + 1 + i) % state_len and the new inputs are
    written at (cache_seqlens + i) % state_len."""
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(-1)
    B, D, L = x.shape
    W = weight.shape[1]
    rows = (torch.arange(B, device=x.device) if conv_state_indices is None
            else conv_state_indices.long())
    state = conv_state[rows]
    S = state.shape[-1]
    cd = compute_dtype(x.dtype)
    if cache_seqlens is None:
        full = torch.cat([state.to(x.dtype), x], -1)
        new_state = full[..., -S:] if S > 0 else state
        window = full[..., S - (W - 1):] if W > 1 else x
    else:
        cs = cache_seqlens.long()[:, None]
        idx = torch.remainder(torch.arange(-(W - 1), 0, device=x.device)[None] + cs, max(S, 1))
        past = state.gather(2, idx[:, None, :].expand(-1, D, -1)).to(x.dtype)
        window = torch.cat([past, x], -1)
        new_state = state.clone()
        first = max(0, L - S)  # with more new inputs than slots, the last S win
        wi = torch.remainder(torch.arange(first, L, device=x.device)[None] + cs, max(S, 1))
        new_state.scatter_(2, wi[:, None, :].expand(-1, D, -1), x[..., first:].to(state.dtype))
    conv_state[rows] = new_state.to(conv_state.dtype)
    w = weight.to(cd)
    wnd = window.to(cd)
    out = sum(w[:, k, None] * wnd[..., k:k + L] for k in range(W))
    if bias is not None:
        out = out + bias.to(cd)[:, None]
    if activation in ("silu", "swish"):
        out = F.silu(out)
    out = out.to(x.dtype)
    return out.squeeze(-1) if squeeze else out


def causal_conv1d_fwd_ref(x, weight, bias, seq_idx, cu_seqlens, initial_states, silu: bool,
                          return_final: bool):
    """Forward on the op's arguments: (out like x, final_states or an empty tensor)."""
    with torch.no_grad():
        r = causal_conv1d_ref(x, weight, bias, seq_idx, initial_states, return_final, None,
                              "silu" if silu else None, cu_seqlens=cu_seqlens)
    out, final = r if return_final else (r, x.new_empty(0))
    return out, final


def _taps(x, W, seq_idx, cu_seqlens):
    """Per tap k: (p, inside, seq, start) — the x position read by step t, whether it lies in t's
    sequence, and t's sequence index / start (None without cu_seqlens)."""
    B, D, T = x.shape
    t = torch.arange(T, device=x.device)
    seq = start = None
    if cu_seqlens is not None:
        cu = cu_seqlens.long()
        seq = (torch.searchsorted(cu, t, right=True) - 1).clamp(0, cu.numel() - 2)
        start = cu[seq]
    for k in range(W):
        p = t + (k - (W - 1))
        if seq_idx is not None:
            inside = (p >= 0)[None, :] & (seq_idx[:, p.clamp(min=0)] == seq_idx)
            inside = inside[:, None, :]
        elif cu_seqlens is not None:
            inside = (p >= start)[None, None, :]
        else:
            inside = (p >= 0)[None, None, :]
        yield k, p, inside, seq, start


def causal_conv1d_bwd_ref(x, weight, bias, seq_idx, cu_seqlens, initial_states, dout, dfinal,
                          silu: bool):
    """Gradients (dx, dweight, dbias or None, dinitial_states or None) in the compute dtype, by
    the explicit formulas the kernels use (no autograd: this runs inside a registered op):

        g = dout * act'(pre);  dweight[d, k] = sum_t g[t] xpad(t, k);  dbias = sum_t g[t]
        dx (or d initial_states) at the position tap k of step t reads += weight[d, k] g[t]
        plus dfinal at the positions the final states were read from.
    """
    cd = compute_dtype(x.dtype)
    B, D, T = x.shape
    W = weight.shape[1]
    xs = x.to(cd)
    w = weight.to(cd)
    g = dout.to(cd)
    if silu:
        taps = _shifted(xs, weight, initial_states, seq_idx, cu_seqlens)
        pre = sum(w[:, k, None] * taps[k] for k in range(W))
        if bias is not None:
            pre = pre + bias.to(cd)[:, None]
        sig = torch.sigmoid(pre)
        g = g * sig * (1 + pre * (1 - sig))
    if seq_idx is not None:
        g = torch.where((seq_idx >= 0)[:, None, :], g, torch.zeros((), dtype=cd, device=x.device))
    taps = _shifted(xs, weight, initial_states, seq_idx, cu_seqlens)
    dw = torch.stack([(g * taps[k]).sum((0, 2)) for k in range(W)], 1)
    db = None if bias is None else g.sum((0, 2))
    dx = torch.zeros_like(xs)
    has_init = initial_states is not None
    dh0 = None if not has_init else torch.zeros(initial_states.shape, dtype=cd, device=x.device)
    zero = torch.zeros((), dtype=cd, device=x.device)
    for k, p, inside, seq, start in _taps(x, W, seq_idx, cu_seqlens):
        c = w[:, k, None] * g  # (B, D, T): what step t sends to the position its tap k reads
        m = k - (W - 1)
        if T + m > 0:  # step t reads x[t + m]
            dx[..., :T + m] += torch.where(inside, c, zero)[..., -m:]
        if has_init and W > 1:
            out_c = torch.where(inside, zero, c)  # reads of the initial state
            if cu_seqlens is None:
                j = p + W - 1
                ok = (j >= 0) & (j < W - 1)
                dh0.index_add_(2, j[ok], out_c[..., ok])
            else:
                j = p - start + W - 1
                ok = (j >= 0) & (j < W - 1)
                flat = dh0.permute(1, 0, 2).reshape(D, -1)  # (D, N * (W-1)) view-free copy
                flat.index_add_(1, (seq * (W - 1) + j)[ok], out_c[0][:, ok])
                dh0 = flat.reshape(D, -1, W - 1).permute(1, 0, 2).contiguous()
    if dfinal is not None and W > 1:
        df = dfinal.to(cd)
        N = df.shape[0]
        if cu_seqlens is None:
            st = torch.zeros(N, dtype=torch.long, device=x.device)
            en = torch.full((N,), T, dtype=torch.long, device=x.device)
        else:
            cu = cu_seqlens.long()
            st, en = cu[:-1], cu[1:]
        for j in range(W - 1):
            p = en - (W - 1) + j  # (N,)
            inside = p >= st
            rows = torch.arange(N, device=x.device) if cu_seqlens is None else torch.zeros_like(p)
            dx[rows[inside], :, p[inside]] += df[inside, :, j]
            if has_init:
                ji = (p - st + W - 1)[~inside]
                dh0[torch.arange(N, device=x.device)[~inside], :, ji] += df[~inside, :, j]
    return dx, dw, db, dh0
