"""The specification of the delta-rule family (DeltaNet, Gated DeltaNet): plain PyTorch, any device
and dtype (float64 included).

Per value head j (q, k: [K] of q/k head j // (HV // H); v: [V]; state S: [K, V], fla's layout):

    S'  = exp(g_t) S_{t-1}                         decay (g_t = 0 without a gate)
    u_t = beta_t (v_t - S'^T k_t)                  the delta: new value minus the state's prediction
    S_t = S' + k_t u_t^T                           = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = scale * S_t^T q_t

With use_qk_l2norm_in_kernel, q and k are first replaced by x / sqrt(|x|^2 + 1e-6) (fla's eps).
`S_{-1}` is the initial state (zeros if absent), the final state is `S_{T-1}`; with `cu_seqlens`
the batch is one packed row of sequences, each with its own states. States are float32 (float64
for float64 inputs) whatever the storage dtype.

`delta_rule_recurrent_ref` is that loop (the spec, differentiable by autograd).
`delta_rule_bwd_ref` is its explicit reverse-time backward (what backend="reference" runs: the
registered op's backward cannot rely on autograd inside a custom op).
`delta_rule_chunk_ref` is the chunked WY form the chunked kernels will compute (per chunk of n
steps, G_i = sum_{s<=i} g_s from the chunk start, every exponent a difference G_i - G_j <= 0):

    A    = strictly lower [beta_i exp(G_i - G_j) k_i . k_j]_{ij}        [n, n]
    T    = (I + A)^{-1}                                                (unit lower triangular)
    W    = T diag(beta exp(G)) K,   U = T diag(beta) V                  (the WY pieces)
    V'   = U - W S0                                                     (the deltas u_i of the chunk)
    O    = scale (diag(exp(G)) Q S0 + (Q K^T * exp(G_i - G_j) * causal) V')
    S    = exp(G_n) S0 + (K * exp(G_n - G))^T V'
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

L2NORM_EPS = 1e-6


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def seq_bounds(B: int, T: int, cu_seqlens: Optional[Tensor]) -> List[Tuple[int, int, int]]:
    """(batch row, begin, end) for every sequence: B rows of length T, or the packed spans."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    cu = [int(x) for x in cu_seqlens.tolist()]
    return [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


def l2norm(x: Tensor, eps: float = L2NORM_EPS) -> Tensor:
    """x / sqrt(sum(x^2) + eps) over the last axis (fla's in-kernel L2 norm)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def l2norm_bwd(x: Tensor, dy: Tensor, eps: float = L2NORM_EPS) -> Tensor:
    """Gradient of `l2norm` at x: r (dy - y (y . dy)) with r = (|x|^2 + eps)^-1/2, y = x r."""
    r = torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)
    y = x * r
    return r * (dy - y * (y * dy).sum(-1, keepdim=True))


def _prep(q, k, HV, sd, use_l2norm):
    """q, k [B, T, H, K] -> per value head [B, T, HV, K] in the state dtype (normalised if asked)."""
    q, k = q.to(sd), k.to(sd)
    if use_l2norm:
        q, k = l2norm(q), l2norm(k)
    G = HV // q.shape[2]
    if G > 1:
        q, k = q.repeat_interleave(G, 2), k.repeat_interleave(G, 2)
    return q, k


def _recur(q, k, v, g, beta, S, scale, keep_states=False):
    """[B, L, HV, *] inputs in the state dtype, S [B, HV, K, V]. Returns (o [B, L, HV, V], S_last,
    states before each step [L, B, HV, K, V] or None)."""
    outs, prev = [], []
    for t in range(q.shape[1]):
        if keep_states:
            prev.append(S)
        if g is not None:
            S = torch.exp(g[:, t])[:, :, None, None] * S
        p = torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        u = beta[:, t, :, None] * (v[:, t] - p)
        S = S + k[:, t, :, :, None] * u[:, :, None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = torch.stack(outs, 1) if outs else v.new_zeros(v.shape)
    return o, S, (prev if keep_states else None)


def delta_rule_recurrent_ref(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], beta: Tensor,
                             scale: Optional[float] = None, initial_state: Optional[Tensor] = None,
                             cu_seqlens: Optional[Tensor] = None,
                             use_qk_l2norm_in_kernel: bool = False) -> Tuple[Tensor, Tensor]:
    """The step-by-step recurrence (the spec). q, k: [B, T, H, K]; v: [B, T, HV, V] (HV % H == 0);
    g: None or [B, T, HV] log-decays; beta: [B, T, HV]; initial_state: [N, HV, K, V]. Returns
    (o [B, T, HV, V] in v's dtype, final_state [N, HV, K, V] in the state dtype). Differentiable by
    autograd. Slow: O(T) Python steps."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    sd = state_dtype(q.dtype)
    scale = K ** -0.5 if scale is None else scale
    qe, ke = _prep(q, k, HV, sd, use_qk_l2norm_in_kernel)
    vf, bf = v.to(sd), beta.to(sd)
    gf = None if g is None else g.to(sd)
    if cu_seqlens is None:
        S0 = (torch.zeros(B, HV, K, V, dtype=sd, device=q.device) if initial_state is None
              else initial_state.to(sd))
        o, S, _ = _recur(qe, ke, vf, gf, bf, S0, scale)
        return o.to(v.dtype), S
    outs, finals = [], []
    for n, (_, bos, eos) in enumerate(seq_bounds(B, T, cu_seqlens)):
        S0 = (torch.zeros(1, HV, K, V, dtype=sd, device=q.device) if initial_state is None
              else initial_state[n:n + 1].to(sd))
        sl = slice(bos, eos)
        o, S, _ = _recur(qe[:, sl], ke[:, sl], vf[:, sl], None if gf is None else gf[:, sl],
                         bf[:, sl], S0, scale)
        outs.append(o)
        finals.append(S)
    return torch.cat(outs, 1).to(v.dtype), torch.cat(finals, 0)


def _recur_bwd(q, k, v, g, beta, S0, scale, do, dST):
    """Explicit reverse pass of `_recur` (same layouts). Returns (dq, dk, dv, dg or None, dbeta,
    dS0) for the per-value-head (expanded, normalised) q and k."""
    L = q.shape[1]
    _, S_last, prev = _recur(q, k, v, g, beta, S0, scale, keep_states=True)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dbeta = torch.zeros_like(beta)
    dg = None if g is None else torch.zeros_like(g)
    dS = dST
    for t in range(L - 1, -1, -1):
        Sp = prev[t]
        Sd = Sp if g is None else torch.exp(g[:, t])[:, :, None, None] * Sp       # S'
        kt, qt, vt, bt = k[:, t], q[:, t], v[:, t], beta[:, t, :, None]
        p = torch.einsum("bhk,bhkv->bhv", kt, Sd)
        u = bt * (vt - p)
        S = Sd + kt[:, :, :, None] * u[:, :, None, :]
        dS = dS + scale * qt[:, :, :, None] * do[:, t, :, None, :]
        dq[:, t] = scale * torch.einsum("bhkv,bhv->bhk", S, do[:, t])
        du = torch.einsum("bhkv,bhk->bhv", dS, kt)
        dkt = torch.einsum("bhkv,bhv->bhk", dS, u)
        dbeta[:, t] = (du * (vt - p)).sum(-1)
        dv[:, t] = bt * du
        dp = -bt * du
        dSd = dS + kt[:, :, :, None] * dp[:, :, None, :]
        dk[:, t] = dkt + torch.einsum("bhkv,bhv->bhk", Sd, dp)
        if g is not None:
            dg[:, t] = (dSd * Sd).sum((-2, -1))
            dS = torch.exp(g[:, t])[:, :, None, None] * dSd
        else:
            dS = dSd
    return dq, dk, dv, dg, dbeta, dS


def delta_rule_bwd_ref(q, k, v, g, beta, h0, cu_seqlens, scale, use_l2norm, do, dht):
    """Explicit backward of `delta_rule_recurrent_ref` (no autograd). dht: [N, HV, K, V] or None.
    Returns (dq, dk, dv, dg or None, dbeta, dh0 [N, HV, K, V]) in the state dtype."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    sd = state_dtype(q.dtype)
    qe, ke = _prep(q, k, HV, sd, use_l2norm)
    vf, bf, dof = v.to(sd), beta.to(sd), do.to(sd)
    gf = None if g is None else g.to(sd)
    spans = [(0, T)] if cu_seqlens is None else [(b, e) for _, b, e in seq_bounds(B, T, cu_seqlens)]
    Bs = B if cu_seqlens is None else 1
    dqe, dke, dvf = torch.zeros_like(qe), torch.zeros_like(ke), torch.zeros_like(vf)
    dbeta = torch.zeros_like(bf)
    dg = None if g is None else torch.zeros_like(gf)
    dh0 = []
    for n, (bos, eos) in enumerate(spans):
        ns = slice(0, B) if cu_seqlens is None else slice(n, n + 1)
        S0 = (torch.zeros(Bs, HV, K, V, dtype=sd, device=q.device) if h0 is None
              else h0[ns].to(sd))
        dST = (torch.zeros(Bs, HV, K, V, dtype=sd, device=q.device) if dht is None
               else dht[ns].to(sd))
        sl = slice(bos, eos)
        r = _recur_bwd(qe[:, sl], ke[:, sl], vf[:, sl], None if gf is None else gf[:, sl],
                       bf[:, sl], S0, scale, dof[:, sl], dST)
        dqe[:, sl], dke[:, sl], dvf[:, sl] = r[0], r[1], r[2]
        if dg is not None:
            dg[:, sl] = r[3]
        dbeta[:, sl] = r[4]
        dh0.append(r[5])
    Gr = HV // H
    if Gr > 1:  # grouped value heads: sum over each group of q/k heads
        dqe = dqe.unflatten(2, (H, Gr)).sum(3)
        dke = dke.unflatten(2, (H, Gr)).sum(3)
    if use_l2norm:
        dqe, dke = l2norm_bwd(q.to(sd), dqe), l2norm_bwd(k.to(sd), dke)
    return dqe, dke, dvf, dg, dbeta, torch.cat(dh0, 0)


# ---- the chunked WY form (float64 check of the chunked kernels' algebra) -----------------------

def _chunk_seq(q, k, v, g, beta, S, scale, chunk_size):
    """One sequence: q, k [L, HV, K], v [L, HV, V], g [L, HV] or None, beta [L, HV], S [HV, K, V]."""
    L = q.shape[0]
    outs = []
    for c0 in range(0, L, chunk_size):
        c1 = min(c0 + chunk_size, L)
        n = c1 - c0
        Q, Kc, Vc, b = (x[c0:c1].transpose(0, 1) for x in (q, k, v, beta))   # head-first
        G = (torch.zeros_like(b) if g is None else g[c0:c1].transpose(0, 1).cumsum(-1))  # [HV, n]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        D = torch.exp((G[:, :, None] - G[:, None, :]).masked_fill(~causal, float("-inf")))
        strict = causal.tril(-1)
        A = (b[:, :, None] * (Kc @ Kc.transpose(1, 2)) * D).masked_fill(~strict, 0)
        I = torch.eye(n, dtype=q.dtype, device=q.device).expand_as(A)
        W = torch.linalg.solve_triangular(I + A, (b * torch.exp(G))[:, :, None] * Kc, upper=False,
                                          unitriangular=True)
        U = torch.linalg.solve_triangular(I + A, b[:, :, None] * Vc, upper=False, unitriangular=True)
        Vn = U - W @ S                                                      # the deltas u_i
        O = scale * (torch.exp(G)[:, :, None] * (Q @ S) + ((Q @ Kc.transpose(1, 2)) * D) @ Vn)
        Gl = G[:, -1]
        S = (torch.exp(Gl)[:, None, None] * S
             + (Kc * torch.exp(Gl[:, None] - G)[:, :, None]).transpose(1, 2) @ Vn)
        outs.append(O.transpose(0, 1))
    o = torch.cat(outs, 0) if outs else v.new_zeros(v.shape)
    return o, S


def delta_rule_chunk_ref(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], beta: Tensor,
                         scale: Optional[float] = None, initial_state: Optional[Tensor] = None,
                         cu_seqlens: Optional[Tensor] = None, use_qk_l2norm_in_kernel: bool = False,
                         chunk_size: int = 16) -> Tuple[Tensor, Tensor]:
    """The chunked WY form (same arguments and results as `delta_rule_recurrent_ref`), in the state
    dtype; differentiable by autograd."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    sd = state_dtype(q.dtype)
    scale = K ** -0.5 if scale is None else scale
    qe, ke = _prep(q, k, HV, sd, use_qk_l2norm_in_kernel)
    rows = [[] for _ in range(B)]
    finals = []
    for n, (b, bos, eos) in enumerate(seq_bounds(B, T, cu_seqlens)):
        S = (torch.zeros(HV, K, V, dtype=sd, device=q.device) if initial_state is None
             else initial_state[n].to(sd))
        sl = slice(bos, eos)
        o, S = _chunk_seq(qe[b, sl], ke[b, sl], v[b, sl].to(sd),
                          None if g is None else g[b, sl].to(sd), beta[b, sl].to(sd), S, scale,
                          chunk_size)
        rows[b].append(o)
        finals.append(S)
    o = torch.stack([torch.cat(r, 0) for r in rows], 0)
    return o.to(v.dtype), torch.stack(finals, 0)
