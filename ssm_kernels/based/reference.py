"""Based (second-order Taylor linear attention): the specification in plain PyTorch.

Feature map (Based, Arora et al. 2024), with ``c = sqrt(scale)`` (``scale`` defaults to
``K ** -0.5``, so q and k are each scaled by ``K ** -0.25``)::

    phi(x) = [1, c x, (c x) ⊗ (c x) / sqrt(2)]          in R^{1 + K + K*K}
    phi(q) · phi(k) = 1 + a + a^2 / 2,   a = scale * q · k

Output, as flash-linear-attention's ``parallel_based`` (normalised by the running sum of the
attention weights, plus eps = 1e-6)::

    o_t = sum_{s<=t} (phi(q_t)·phi(k_s)) v_s  [+ phi(q_t) S_0]
    z_t = sum_{s<=t}  phi(q_t)·phi(k_s)       [+ phi(q_t)·z_0]
    y_t = o_t / (z_t + eps)  if use_norm else o_t

State (one per sequence and head): the linear-attention state in feature space, with the
normaliser carried as one extra value column (the state of a constant value 1)::

    S = S_0 + sum_t phi(k_t)^T [v_t, 1]        float32 [N, H, 1 + K + K*K, V + 1]

Row 0 is the zeroth order, rows 1..K the first order, rows 1+K+i*K+j the (i, j) second-order
feature; column V is the normaliser ``z`` (tracked whether or not ``use_norm``, so states are
interchangeable between the two modes).

References: `based_recurrent_ref` is the step-by-step recurrence (the spec, any dtype, float64
for tests), `based_parallel_ref` the quadratic attention form (differentiable, the ``reference``
backend of the ops, with the hand-written backward `based_bwd_ref`) and `based_chunk_ref` the
chunked form mirroring the kernel's algebra (linear in T, an oracle for long sequences). All take
``cu_seqlens`` (packed sequences, B == 1).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

EPS = 1e-6


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def feature_dim(K: int) -> int:
    """Rows of the state: 1 + K + K*K."""
    return 1 + K + K * K


def based_feature_map(x: Tensor, scale: float) -> Tensor:
    """phi(x) = [1, c x, (c x)⊗(c x)/sqrt(2)] with c = sqrt(scale); [..., K] -> [..., 1+K+K*K]."""
    xs = x * math.sqrt(scale)
    x2 = (xs[..., :, None] * xs[..., None, :]).flatten(-2) / math.sqrt(2.0)
    return torch.cat([torch.ones_like(x[..., :1]), xs, x2], dim=-1)


def _segments(T: int, cu_seqlens: Optional[Tensor]) -> List[Tuple[int, int]]:
    if cu_seqlens is None:
        return [(0, T)]
    c = [int(x) for x in cu_seqlens.tolist()]
    return list(zip(c[:-1], c[1:]))


def based_recurrent_ref(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None,
                        use_norm: bool = True, initial_state: Optional[Tensor] = None,
                        output_final_state: bool = False, cu_seqlens: Optional[Tensor] = None):
    """Step-by-step recurrence, the specification: ``S_t = S_{t-1} + phi(k_t)^T [v_t, 1]``,
    ``[o_t, z_t] = phi(q_t) S_t``. Computes in q's dtype (state in float32, float64 for float64).
    Arguments and returns as `ssm_kernels.chunk_based`; returns ``(o, final_state or None)``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    sd = state_dtype(q.dtype)
    segs = _segments(T, cu_seqlens)
    outs, finals = [], []
    for b in range(B):
        for n, (bos, eos) in enumerate(segs):
            idx = b if cu_seqlens is None else n
            if initial_state is not None:
                S = initial_state[idx].to(sd)
            else:
                S = q.new_zeros((H, feature_dim(K), V + 1), dtype=sd)
            ys = []
            for t in range(bos, eos):
                fk = based_feature_map(k[b, t].to(sd), scale)              # [H, D]
                va = torch.cat([v[b, t].to(sd), v.new_ones((H, 1), dtype=sd)], -1)
                S = S + fk[:, :, None] * va[:, None, :]
                oa = torch.einsum("hd,hdv->hv", based_feature_map(q[b, t].to(sd), scale), S)
                o, z = oa[:, :V], oa[:, V:]
                ys.append(o / (z + EPS) if use_norm else o)
            outs.append(torch.stack(ys, 0) if ys else v.new_zeros((0, H, V), dtype=sd))
            finals.append(S)
    if cu_seqlens is None:
        o = torch.stack(outs, 0)
    else:
        o = torch.cat(outs, 0)[None]
    return o.to(v.dtype), (torch.stack(finals, 0) if output_final_state else None)


def based_parallel_ref(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None,
                       use_norm: bool = True, initial_state: Optional[Tensor] = None,
                       output_final_state: bool = False, cu_seqlens: Optional[Tensor] = None,
                       return_z: bool = False):
    """Quadratic attention form (fla's naive_parallel_based plus states), differentiable.

    Returns ``(o, final_state or None)``; with ``return_z`` also ``z`` [B, T, H] (the
    normaliser, state dtype). Computes in q's dtype; the state parts in float32 (float64)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    sd = state_dtype(q.dtype)
    segs = _segments(T, cu_seqlens)
    os_, zs, finals = [], [], []
    for n, (bos, eos) in enumerate(segs):
        qs, ks, vs = (x[:, bos:eos].transpose(1, 2) for x in (q, k, v))   # [B, H, L, *]
        L = eos - bos
        a = (qs * scale) @ ks.transpose(-1, -2)
        att = (1 + a + 0.5 * a * a).masked_fill(
            ~torch.ones(L, L, dtype=torch.bool, device=q.device).tril(), 0)
        o = (att @ vs).to(sd)
        z = att.sum(-1).to(sd)
        if initial_state is not None:
            h0 = initial_state[n:n + 1] if cu_seqlens is not None else initial_state
            fq = based_feature_map(qs.to(sd), scale)                          # [B, H, L, D]
            oa = fq @ h0.to(sd)
            o, z = o + oa[..., :V], z + oa[..., V]
        os_.append(o)
        zs.append(z)
        if output_final_state:
            fk = based_feature_map(ks.to(sd), scale)
            va = torch.cat([vs.to(sd), vs.new_ones(vs.shape[:-1] + (1,), dtype=sd)], -1)
            S = fk.transpose(-1, -2) @ va                                     # [B, H, D, V+1]
            if initial_state is not None:
                S = S + (initial_state[n:n + 1] if cu_seqlens is not None else initial_state).to(sd)
            finals.append(S)
    o = torch.cat(os_, 2).transpose(1, 2)
    z = torch.cat(zs, 2).transpose(1, 2)
    y = o / (z[..., None] + EPS) if use_norm else o
    final = torch.cat(finals, 0) if output_final_state else None
    if return_z:
        return y.to(v.dtype), final, z
    return y.to(v.dtype), final


def based_chunk_ref(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None,
                    use_norm: bool = True, initial_state: Optional[Tensor] = None,
                    output_final_state: bool = False, cu_seqlens: Optional[Tensor] = None,
                    chunk_size: int = 64):
    """Chunked form mirroring the kernel's algebra (forward): within a chunk ``f(q' k'^T) [v, 1]``
    with ``f(a) = 1 + a + a^2/2`` and a causal mask; across chunks the state ``S`` [D, V+1]
    (orders 0, 1, 2 and the normaliser column), read as ``phi(q) S`` before the chunk's own
    update ``S += phi(k)^T [v, 1]``. Linear in T: an oracle for long sequences.
    Returns ``(o, final_state or None)``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    sd = state_dtype(q.dtype)
    ys, finals = [], []
    for n, (bos, eos) in enumerate(_segments(T, cu_seqlens)):
        idx = slice(n, n + 1) if cu_seqlens is not None else slice(None)
        Bn = 1 if cu_seqlens is not None else B
        S = (initial_state[idx].to(sd) if initial_state is not None
             else q.new_zeros((Bn, H, feature_dim(K), V + 1), dtype=sd))
        for t0 in range(bos, eos, chunk_size):
            t1 = min(t0 + chunk_size, eos)
            qc, kc, vc = (x[:, t0:t1].transpose(1, 2).to(sd) for x in (q, k, v))  # [B, H, C, *]
            va = torch.cat([vc, torch.ones_like(vc[..., :1])], -1)
            a = (qc * scale) @ kc.transpose(-1, -2)
            f = (1 + a + 0.5 * a * a).tril()
            oa = f @ va + based_feature_map(qc, scale) @ S
            S = S + based_feature_map(kc, scale).transpose(-1, -2) @ va
            o, z = oa[..., :V], oa[..., V:]
            ys.append((o / (z + EPS) if use_norm else o).transpose(1, 2))
        finals.append(S)
    o = torch.cat(ys, 1) if ys else v.new_zeros(v.shape, dtype=sd)
    return o.to(v.dtype), (torch.cat(finals, 0) if output_final_state else None)


def _feature_map_vjp(x: Tensor, g: Tensor, scale: float) -> Tensor:
    """Gradient w.r.t. x of sum(g * phi(x)); x [..., K], g [..., 1+K+K*K]."""
    K = x.shape[-1]
    c = math.sqrt(scale)
    xs = x * c
    g2 = g[..., 1 + K:].unflatten(-1, (K, K)) / math.sqrt(2.0)
    dxs = g[..., 1:1 + K] + ((g2 + g2.transpose(-1, -2)) @ xs[..., None])[..., 0]
    return dxs * c


def based_bwd_ref(q: Tensor, k: Tensor, v: Tensor, scale: float, use_norm: bool,
                  initial_state: Optional[Tensor], do: Tensor, dfinal: Optional[Tensor],
                  cu_seqlens: Optional[Tensor] = None):
    """Hand-written backward of `based_parallel_ref` (the ``reference`` backend's backward).

    Returns (dq, dk, dv, d initial_state or None). Computes in q's dtype, states in float32
    (float64)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    sd = state_dtype(q.dtype)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dh0 = None if initial_state is None else torch.zeros_like(initial_state, dtype=sd)
    y, _, z = based_parallel_ref(q, k, v, scale, use_norm, initial_state, False, cu_seqlens,
                                 return_z=True)
    for n, (bos, eos) in enumerate(_segments(T, cu_seqlens)):
        sl = slice(bos, eos)
        qs, ks, vs, dys, ys = (x[:, sl].transpose(1, 2) for x in (q, k, v, do, y))  # [B, H, L, *]
        zs = z[:, sl].transpose(1, 2)
        L = eos - bos
        if use_norm:
            rz = 1.0 / (zs.to(sd) + EPS)
            dz = -(dys.to(sd) * ys.to(sd)).sum(-1) * rz
            dos = dys.to(sd) * rz[..., None]
        else:
            dz = torch.zeros_like(zs, dtype=sd)
            dos = dys.to(sd)
        mask = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        a = (qs * scale) @ ks.transpose(-1, -2)
        f = (1 + a + 0.5 * a * a).masked_fill(~mask, 0)
        df = (dos.to(q.dtype) @ vs.transpose(-1, -2) + dz[..., None].to(q.dtype)).masked_fill(~mask, 0)
        da = df * (1 + a)
        gq = scale * (da @ ks)
        gk = scale * (da.transpose(-1, -2) @ qs)
        gv = f.transpose(-1, -2) @ dos.to(q.dtype)
        dO = torch.cat([dos, dz[..., None]], -1)                                  # [B, H, L, V+1]
        idx = slice(n, n + 1) if cu_seqlens is not None else slice(None)
        if initial_state is not None:
            h0 = initial_state[idx].to(sd)
            gq = gq + _feature_map_vjp(qs.to(sd), dO @ h0.transpose(-1, -2), scale).to(q.dtype)
            dh0[idx] += based_feature_map(qs.to(sd), scale).transpose(-1, -2) @ dO
        if dfinal is not None:
            dS = dfinal[idx].to(sd)
            va = torch.cat([vs.to(sd), vs.new_ones(vs.shape[:-1] + (1,), dtype=sd)], -1)
            gk = gk + _feature_map_vjp(ks.to(sd), va @ dS.transpose(-1, -2), scale).to(q.dtype)
            gv = gv + (based_feature_map(ks.to(sd), scale) @ dS[..., :V]).to(q.dtype)
            if initial_state is not None:
                dh0[idx] += dS
        dq[:, sl], dk[:, sl], dv[:, sl] = (x.transpose(1, 2) for x in (gq, gk, gv))
    return dq, dk, dv, dh0
