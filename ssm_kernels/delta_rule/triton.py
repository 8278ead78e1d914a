"""Triton kernels of the delta rule: the step-by-step (fused_recurrent) forward, used for decoding
and, until the chunked WY kernels land (bench/NOTES.md, issue 12), for the chunk_* forms too.

One program per (V-tile, sequence x value head) keeps its [K, BV] block of the float32 state in
registers and walks the sequence token by token (the delta u_t needs the full K column of the state
for its V-tile only, so V-tiles are independent). Tensors are contiguous: q, k [B, T, H, K];
v, o [B, T, HV, V]; g, beta [B, T, HV]; states float32 [N, HV, K, V]; cu_seqlens int [N + 1].
No host sync: capture-safe.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..chunk.common import load_state_block, seq_span

L2NORM_EPS = 1e-6


@triton.jit
def _recurrent_fwd_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, h0_ptr, o_ptr, ht_ptr, cu_ptr,
    # sizes
    T, H, HV, K, V, scale, eps,
    # meta-parameters
    HAS_G: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, L2NORM: tl.constexpr,
    IS_VARLEN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    # S' = exp(g_t) S;  u = beta_t (v_t - S'^T k_t);  S = S' + k_t u^T;  o_t = scale S^T q_t
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    bos, eos = seq_span(i_n, cu_ptr, T, IS_VARLEN)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    p_s = (i_nh.to(tl.int64) * K + o_k[:, None]) * V + o_v[None, :]
    m_s = m_k[:, None] & m_v[None, :]
    S = load_state_block(h0_ptr, p_s, m_s, HAS_H0, BK, BV)
    for t in range(bos, eos):
        r_qk = t * H + i_h
        r_v = t * HV + i_hv
        b_q = tl.load(q_ptr + r_qk * K + o_k, mask=m_k, other=0.).to(tl.float32)
        b_k = tl.load(k_ptr + r_qk * K + o_k, mask=m_k, other=0.).to(tl.float32)
        b_v = tl.load(v_ptr + r_v * V + o_v, mask=m_v, other=0.).to(tl.float32)
        b_beta = tl.load(beta_ptr + r_v).to(tl.float32)
        if L2NORM:
            b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + eps)
            b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + eps)
        if HAS_G:
            S = S * tl.exp(tl.load(g_ptr + r_v).to(tl.float32))
        b_u = b_beta * (b_v - tl.sum(S * b_k[:, None], axis=0))
        S += b_k[:, None] * b_u[None, :]
        b_o = tl.sum(S * (b_q * scale)[:, None], axis=0)
        tl.store(o_ptr + r_v * V + o_v, b_o.to(o_ptr.dtype.element_ty), mask=m_v)
    if STORE_HT:
        tl.store(ht_ptr + p_s, S, mask=m_s)


def recurrent_fwd(q, k, v, g, beta, h0, cu_seqlens, scale: float, use_l2norm: bool,
                  ht: Optional[torch.Tensor] = None, store_ht: bool = True
                  ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Launch the step-by-step forward. g None or float32 [B, T, HV]; beta [B, T, HV]; h0 None or
    float32 [N, HV, K, V]. `ht` given: the final state is written there (it may be h0 itself, the
    in-place decoding update: every program reads its state block before writing the same block).
    Returns (o [B, T, HV, V] in v's dtype, final state float32 [N, HV, K, V] or None)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    BK = triton.next_power_of_2(K)
    BV = min(triton.next_power_of_2(V), max(8, min(64, 4096 // BK)))
    o = torch.empty_like(v)
    if store_ht and ht is None:
        ht = q.new_empty((N, HV, K, V), dtype=torch.float32)
    # absent inputs: any tensor stands in for the pointer (its flag keeps it unread)
    _recurrent_fwd_kernel[(triton.cdiv(V, BV), N * HV)](
        q, k, v, beta if g is None else g, beta, o if h0 is None else h0, o,
        o if ht is None else ht, beta if cu_seqlens is None else cu_seqlens,
        T, H, HV, K, V, float(scale), L2NORM_EPS,
        HAS_G=g is not None, HAS_H0=h0 is not None, STORE_HT=store_ht, L2NORM=bool(use_l2norm),
        IS_VARLEN=cu_seqlens is not None, BK=BK, BV=BV, num_warps=1 if BK * BV <= 2048 else 4)
    return o, ht
