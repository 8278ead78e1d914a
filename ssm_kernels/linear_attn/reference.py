"""The specification of the chunked linear attention family: plain PyTorch, any device and dtype.

One recurrence covers every gate variant (per head h; q, k: [K], v: [V], state S: [K, V]):

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t          o_t = scale * q_t S_t

    no gate        g_t = 0                              (chunk_linear_attn)
    scalar decay   g_t = g[b, t, h] + g_gamma[h]        (chunk_simple_gla; either may be absent)
    per-key decay  g_t = g[b, t, h, :]                  (chunk_gla)

`S_{-1}` is the initial state (zeros if absent) and the final state is `S_{T-1}`; with
`cu_seqlens` the batch is one packed row and every sequence runs its own recurrence from its own
initial state. The state is float32 (float64 for float64 inputs) whatever the storage dtype.

`linear_attn_recurrent_ref` is that loop (the spec). `linear_attn_chunk_ref` is the chunked form the
kernels compute, in the same stable algebra: log-decays are summed inside a chunk only
(`G_i = sum_{s<=i} g_s` from the chunk start) and only differences with a non-positive result are
exponentiated:

    intra    o_i += sum_{j<=i} (q_i . (k_j * exp(G_i - G_j))) v_j
    inter    o_i += (q_i * exp(G_i)) S_prev
    state    S    = exp(G_last) * S_prev + sum_j (k_j * exp(G_last - G_j))^T v_j

For per-key decays the intra term is a per-channel product (not a single matmul); the kernel and
this reference build it column by column over the chunk, each with exponent G_i - G_j <= 0 for
i >= j, so a log-decay of -20 per step (and 0) stays finite.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def seq_bounds(B: int, T: int, cu_seqlens: Optional[Tensor]) -> List[Tuple[int, int, int]]:
    """(batch row, begin, end) for every sequence: B rows of length T, or the packed spans."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    cu = [int(x) for x in cu_seqlens.tolist()]
    return [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


def _decay_factor(g_t: Tensor, per_key: bool) -> Tensor:
    # g_t: [H] or [H, K]; multiplies S [H, K, V]
    return torch.exp(g_t)[:, None, None] if not per_key else torch.exp(g_t)[:, :, None]


def linear_attn_recurrent_ref(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor] = None,
                              scale: Optional[float] = None, initial_state: Optional[Tensor] = None,
                              cu_seqlens: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The step-by-step recurrence (the spec). q, k: [B, T, H, K]; v: [B, T, H, V]; g: None,
    [B, T, H] (scalar log-decay per head) or [B, T, H, K] (per key channel); initial_state
    [N, H, K, V]. Returns (o [B, T, H, V] in v's dtype, final_state [N, H, K, V] in the state
    dtype). Differentiable by autograd through the loop. Slow: O(T) Python steps."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    sd = state_dtype(q.dtype)
    scale = K ** -0.5 if scale is None else scale
    spans = seq_bounds(B, T, cu_seqlens)
    o = torch.zeros(B, T, H, V, dtype=sd, device=q.device)
    finals = []
    for n, (b, bos, eos) in enumerate(spans):
        S = (torch.zeros(H, K, V, dtype=sd, device=q.device) if initial_state is None
             else initial_state[n].to(sd))
        rows = []
        for t in range(bos, eos):
            if g is not None:
                S = _decay_factor(g[b, t].to(sd), g.dim() == 4) * S
            S = S + k[b, t].to(sd)[:, :, None] * v[b, t].to(sd)[:, None, :]
            rows.append(scale * torch.einsum("hk,hkv->hv", q[b, t].to(sd), S))
        if rows:
            o = o.index_put((torch.tensor([b]), torch.arange(bos, eos)), torch.stack(rows, 0))
        finals.append(S)
    return o.to(v.dtype), torch.stack(finals, 0)


def _chunk_seq(q, k, v, G_src, per_key, scale, S, chunk_size):
    """One sequence, chunked: q, k [L, H, K], v [L, H, V], G_src: per-step log-decay [L, H] or
    [L, H, K] (None: no gate), S [H, K, V]. Returns (o [L, H, V], S_last)."""
    L = q.shape[0]
    outs = []
    for c0 in range(0, L, chunk_size):
        c1 = min(c0 + chunk_size, L)
        qc, kc, vc = q[c0:c1], k[c0:c1], v[c0:c1]
        n = c1 - c0
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        if G_src is None:
            A = torch.einsum("ihk,jhk->hij", qc, kc) * scale
            A = A.masked_fill(~causal, 0)
            o = torch.einsum("hij,jhv->ihv", A, vc) + scale * torch.einsum("ihk,hkv->ihv", qc, S)
            S = S + torch.einsum("jhk,jhv->hkv", kc, vc)
        elif not per_key:
            G = G_src[c0:c1].cumsum(0)  # [n, H], from the chunk start
            diff = (G[:, None, :] - G[None, :, :]).masked_fill(~causal[:, :, None], float("-inf"))
            A = torch.einsum("ihk,jhk->hij", qc, kc) * torch.exp(diff).permute(2, 0, 1) * scale
            o = (torch.einsum("hij,jhv->ihv", A, vc)
                 + scale * torch.einsum("ihk,hkv->ihv", qc * torch.exp(G)[:, :, None], S))
            Gl = G[-1]
            S = (torch.exp(Gl)[:, None, None] * S
                 + torch.einsum("jhk,jhv->hkv", kc * torch.exp(Gl[None] - G)[:, :, None], vc))
        else:
            G = G_src[c0:c1].cumsum(0)  # [n, H, K]
            # column j of the intra scores: exponent G_i - G_j <= 0 for every i >= j
            diff = (G[:, None] - G[None, :]).masked_fill(~causal[:, :, None, None], float("-inf"))
            A = torch.einsum("ihk,jhk,ijhk->hij", qc, kc, torch.exp(diff)) * scale
            o = (torch.einsum("hij,jhv->ihv", A, vc)
                 + scale * torch.einsum("ihk,hkv->ihv", qc * torch.exp(G), S))
            Gl = G[-1]
            S = (torch.exp(Gl)[:, :, None] * S
                 + torch.einsum("jhk,jhv->hkv", kc * torch.exp(Gl[None] - G), vc))
        outs.append(o)
    o = torch.cat(outs, 0) if outs else q.new_zeros(0, q.shape[1], v.shape[-1])
    return o, S


def linear_attn_chunk_ref(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor] = None,
                          scale: Optional[float] = None, initial_state: Optional[Tensor] = None,
                          cu_seqlens: Optional[Tensor] = None,
                          chunk_size: int = 16) -> Tuple[Tensor, Tensor]:
    """The chunked form (same arguments and results as `linear_attn_recurrent_ref`), computed in
    the state dtype with the kernels' algebra; differentiable by autograd."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    sd = state_dtype(q.dtype)
    scale = K ** -0.5 if scale is None else scale
    per_key = g is not None and g.dim() == 4
    rows = [[] for _ in range(B)]
    finals = []
    for n, (b, bos, eos) in enumerate(seq_bounds(B, T, cu_seqlens)):
        S = (torch.zeros(H, K, V, dtype=sd, device=q.device) if initial_state is None
             else initial_state[n].to(sd))
        o, S = _chunk_seq(q[b, bos:eos].to(sd), k[b, bos:eos].to(sd), v[b, bos:eos].to(sd),
                          None if g is None else g[b, bos:eos].to(sd), per_key, scale, S, chunk_size)
        rows[b].append(o)
        finals.append(S)
    o = torch.stack([torch.cat(r, 0) for r in rows], 0)
    return o.to(v.dtype), torch.stack(finals, 0)


# ---- the op-level reference (what backend="reference" runs) -----------------------------------

def linear_attn_fwd_ref(q, k, v, g, h0, cu_seqlens, scale):
    """Forward of the registered op on the reference backend: (o, final_state)."""
    with torch.no_grad():
        o, ht = linear_attn_chunk_ref(q, k, v, g, scale, h0, cu_seqlens)
    return o.contiguous(), ht.to(torch.float32 if q.dtype != torch.float64 else torch.float64)


def _bwd_seq(q, k, v, G_src, per_key, scale, S0, do, dST, chunk_size):
    """Explicit backward of one sequence in the kernels' algebra (every gate as per-key decays):
    a forward pass for dq (it needs the running state), a reverse pass for dk, dv and the state
    gradient. Returns (dq, dk, dv, dS0, S_last)."""
    L, H, K = q.shape
    n_all = L
    G_all = (torch.zeros_like(q) if G_src is None else
             (G_src if per_key else G_src[:, :, None].expand(-1, -1, K)))
    chunks = [(c0, min(c0 + chunk_size, n_all)) for c0 in range(0, n_all, chunk_size)]
    pieces = {}
    S = S0
    dq = torch.zeros_like(q)
    for c0, c1 in chunks:
        n = c1 - c0
        G = G_all[c0:c1].cumsum(0)                                   # [n, H, K]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        E = torch.exp((G[:, None] - G[None, :]).masked_fill(~causal[:, :, None, None], float("-inf")))
        pieces[c0] = (G, E, S)
        D = torch.einsum("ihv,jhv->ijh", do[c0:c1], v[c0:c1])
        dq[c0:c1] = scale * (torch.exp(G) * torch.einsum("ihv,hkv->ihk", do[c0:c1], S)
                             + torch.einsum("ijh,jhk,ijhk->ihk", D, k[c0:c1], E))
        Gl = G[-1]
        S = torch.exp(Gl)[:, :, None] * S + torch.einsum("jhk,jhv->hkv", k[c0:c1] * torch.exp(Gl[None] - G), v[c0:c1])
    S_last = S
    dS = dST
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for c0, c1 in reversed(chunks):
        G, E, _ = pieces[c0]
        qs = q[c0:c1] * scale
        Gl = G[-1]
        kd = torch.exp(Gl[None] - G)                                 # [n, H, K]
        A = torch.einsum("ihk,jhk,ijhk->ijh", qs, k[c0:c1], E)
        dv[c0:c1] = torch.einsum("jhk,hkv->jhv", k[c0:c1] * kd, dS) + torch.einsum("ijh,ihv->jhv", A, do[c0:c1])
        D = torch.einsum("ihv,jhv->ijh", do[c0:c1], v[c0:c1])
        dk[c0:c1] = (kd * torch.einsum("jhv,hkv->jhk", v[c0:c1], dS)
                     + torch.einsum("ijh,ihk,ijhk->jhk", D, qs, E))
        dS = torch.exp(Gl)[:, :, None] * dS + torch.einsum("ihk,ihv->hkv", qs * torch.exp(G), do[c0:c1])
    return dq, dk, dv, dS, S_last


def linear_attn_bwd_ref(q, k, v, g, h0, cu_seqlens, scale, do, dht, chunk_size: int = 16):
    """Backward of the registered op on the reference backend, explicit (no autograd): the
    kernels' algebra, with dg from the identity dG_t = q_t dq_t - k_t dk_t (+ dS_T . S_T at each
    sequence's last step) reverse-cumsummed over the sequence (the kernels cut that cumsum at chunk
    ends and add the exact boundary term sum_v dS * S instead). Returns (dq, dk, dv, dg or None,
    dh0 or None) in the state dtype."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    sd = state_dtype(q.dtype)
    per_key = g is not None and g.dim() == 4
    dq = torch.zeros(B, T, H, K, dtype=sd, device=q.device)
    dk, dv = torch.zeros_like(dq), torch.zeros(B, T, H, V, dtype=sd, device=q.device)
    dg = None if g is None else torch.zeros(g.shape, dtype=sd, device=q.device)
    dh0 = []
    for n, (b, bos, eos) in enumerate(seq_bounds(B, T, cu_seqlens)):
        S0 = (torch.zeros(H, K, V, dtype=sd, device=q.device) if h0 is None else h0[n].to(sd))
        sl = slice(bos, eos)
        cast = lambda x: x[b, sl].to(sd)
        dqs, dks, dvs, dS0, S_last = _bwd_seq(cast(q), cast(k), cast(v), None if g is None else cast(g),
                                              per_key, scale, S0, cast(do), dht[n].to(sd), chunk_size)
        dq[b, sl], dk[b, sl], dv[b, sl] = dqs, dks, dvs
        dh0.append(dS0)
        if g is not None and eos > bos:
            dG = cast(q) * dqs - cast(k) * dks                        # [L, H, K]
            dG[-1] += (dht[n].to(sd) * S_last).sum(-1)
            if not per_key:
                dG = dG.sum(-1)
            dg[b, sl] = dG.flip(0).cumsum(0).flip(0)
    return dq, dk, dv, dg, (None if h0 is None else torch.stack(dh0, 0))
