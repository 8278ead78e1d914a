"""Triton kernels of the delta rule: the step-by-step (fused_recurrent) forward and backward, used
by the fused_recurrent_* forms and decoding (the chunk_* forms run the chunked WY kernels of
chunk.py).

Backward: one program per (sequence x value head) with the whole [K, V] state (K, V <= 128): a
forward pass stores the state before every chunk of 16 steps, then the chunks are walked in
reverse, each replayed into a per-program scratch of its BT (16-64) states and differentiated step by step
(dS carried in registers). dq/dk are written per value head and summed over each group of value
heads by one torch reduction (fixed order: deterministic); no atomics.

One program per (V-tile, sequence x value head) keeps its [K, BV] block of the float32 state in
registers and walks the sequence token by token (the delta u_t needs the full K column of the state
for its V-tile only, so V-tiles are independent). Tensors are contiguous: q, k [B, T, H, K];
v, o [B, T, HV, V]; g, beta [B, T, HV]; states float32 [N, HV, K, V]; cu_seqlens int [N + 1].
No host sync: capture-safe.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..chunk.common import chunk_base, load_state_block, seq_span
from .._launch import cdiv, next_power_of_2, fast_kernel

L2NORM_EPS = 1e-6


@triton.jit
def _recurrent_fwd_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, h0_ptr, o_ptr, ht_ptr, cu_ptr,
    # sizes; element strides (batch, token, head) of q, k, v (their last dimension has stride 1)
    T, H, HV, K, V, scale, eps, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
    # meta-parameters
    HAS_G: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, L2NORM: tl.constexpr,
    IS_VARLEN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, EVEN: tl.constexpr,
):
    # EVEN: K == BK and V % BV == 0, the state block needs no mask (fewer predicates and registers)
    # S' = exp(g_t) S;  u = beta_t (v_t - S'^T k_t);  S = S' + k_t u^T;  o_t = scale S^T q_t
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    bos, eos = seq_span(i_n, cu_ptr, T, IS_VARLEN)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    # int64 head offset on the scalar base pointers, int32 offsets inside the [K, V] block (64-bit
    # per-element offsets cost registers: 92 -> see bench/NOTES.md's decode section)
    h_off = i_nh.to(tl.int64) * K * V
    p_s = o_k[:, None] * V + o_v[None, :]
    m_s = m_k[:, None] & m_v[None, :]
    if EVEN and HAS_H0:
        S = tl.load(h0_ptr + h_off + p_s)
    else:
        S = load_state_block(h0_ptr + h_off, p_s, m_s, HAS_H0, BK, BV)
    # strided q/k/v (e.g. views of a fused qkv projection): no copies before the launch
    if IS_VARLEN:   # B = 1: the token index is global
        i_b = (i_n * 0).to(tl.int64)
        t0 = 0
    else:
        i_b = i_n.to(tl.int64)
        t0 = bos
    p_q = q_ptr + i_b * sq_b + i_h * sq_h + o_k
    p_k = k_ptr + i_b * sk_b + i_h * sk_h + o_k
    p_v = v_ptr + i_b * sv_b + i_hv * sv_h + o_v
    for t in range(bos, eos):
        tt = (t - t0).to(tl.int64)
        r_v = t * HV + i_hv
        b_q = tl.load(p_q + tt * sq_t, mask=m_k, other=0.).to(tl.float32)
        b_k = tl.load(p_k + tt * sk_t, mask=m_k, other=0.).to(tl.float32)
        b_v = tl.load(p_v + tt * sv_t, mask=m_v, other=0.).to(tl.float32)
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
        if EVEN:
            tl.store(ht_ptr + h_off + p_s, S)
        else:
            tl.store(ht_ptr + h_off + p_s, S, mask=m_s)


def recurrent_fwd(q, k, v, g, beta, h0, cu_seqlens, scale: float, use_l2norm: bool,
                  ht: Optional[torch.Tensor] = None, store_ht: bool = True
                  ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Launch the step-by-step forward. q, k [B, T, H, K] and v [B, T, HV, V] any strides (a last
    dimension of stride 1 is read in place, else copied); g None or float32 [B, T, HV] and beta
    [B, T, HV] contiguous; h0 None or
    float32 [N, HV, K, V]. `ht` given: the final state is written there (it may be h0 itself, the
    in-place decoding update: every program reads its state block before writing the same block).
    Returns (o [B, T, HV, V] in v's dtype, final state float32 [N, HV, K, V] or None)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    BK = next_power_of_2(K)
    BV, warps = fwd_tile(K, V)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    o = v.new_empty(v.shape)   # contiguous whatever v's strides
    if store_ht and ht is None:
        ht = q.new_empty((N, HV, K, V), dtype=torch.float32)
    # absent inputs: any tensor stands in for the pointer (its flag keeps it unread)
    _recurrent_fwd_kernel[(cdiv(V, BV), N * HV)](
        q, k, v, beta if g is None else g, beta, o if h0 is None else h0, o,
        o if ht is None else ht, beta if cu_seqlens is None else cu_seqlens,
        T, H, HV, K, V, float(scale), L2NORM_EPS, *q.stride()[:3], *k.stride()[:3],
        *v.stride()[:3], HAS_G=g is not None, HAS_H0=h0 is not None, STORE_HT=store_ht,
        L2NORM=bool(use_l2norm), IS_VARLEN=cu_seqlens is not None, BK=BK, BV=BV,
        EVEN=K == BK and V % BV == 0, num_warps=warps)
    return o, ht


def _parse_tile(text: Optional[str]) -> Optional[Tuple[int, int]]:
    if not text:
        return None
    bv, w = (int(x) for x in text.split(","))
    if bv < 1 or bv & (bv - 1) or w not in (1, 2, 4, 8):
        raise ValueError(f"SSM_KERNELS_DELTA_DECODE_TILE must be 'BV,num_warps' with BV a power of "
                         f"two and num_warps in 1, 2, 4, 8, got {text!r}")
    return bv, w


# The step-by-step forward's (BV, num_warps): None = the default below; a pair overrides it (the
# GPU sweep of bench/gpu_delta_decode.py flips it; env SSM_KERNELS_DELTA_DECODE_TILE="BV,W").
# Each program holds a [next_pow2(K), BV] float32 state tile; BV is capped at next_pow2(V).
FWD_TILE: Optional[Tuple[int, int]] = _parse_tile(os.environ.get("SSM_KERNELS_DELTA_DECODE_TILE"))


def fwd_tile(K: int, V: int) -> Tuple[int, int]:
    """(BV, num_warps) of the step-by-step forward (a function of K, V and the knob only). Default:
    BV = 4096 // BK clamped to [8, 64] (a 16 KB float32 tile at K = 128: BV = 32), one warp up to
    2048 state elements (64 per thread), else four (32 per thread at K = 128, BV = 32)."""
    BK, VP = next_power_of_2(K), next_power_of_2(V)
    if FWD_TILE is not None:
        return min(FWD_TILE[0], VP), FWD_TILE[1]
    BV = min(VP, max(8, min(64, 4096 // BK)))
    return BV, 1 if BK * BV <= 2048 else 4


@triton.jit
def _recurrent_bwd_kernel(
    # pointers: inputs as the forward; do [TOK, HV, V]; dht, dh0 [N, HV, K, V] f32; outputs
    # dq, dk [TOK, HV, K] f32 (per value head, summed over each group by the launcher), dv
    # [TOK, HV, V] (v's dtype), dg, dbeta [TOK, HV] f32; ck [NCH, HV, K, V] f32 the state before
    # every chunk; sc [N * HV, BT, K, V] f32 this program's per-step states of one chunk
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, h0_ptr, do_ptr, dht_ptr, dq_ptr, dk_ptr, dv_ptr,
    dg_ptr, dbeta_ptr, dh0_ptr, ck_ptr, sc_ptr, cu_ptr, co_ptr,
    # sizes
    T, H, HV, K, V, scale, eps,
    # meta-parameters
    HAS_G: tl.constexpr, HAS_H0: tl.constexpr, HAS_DHT: tl.constexpr, L2NORM: tl.constexpr,
    IS_VARLEN: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    # one program per (sequence x value head) holds the whole [K, V] state (dk and dbeta reduce
    # over V): a forward pass stores the state before each chunk, then chunks are walked in
    # reverse, each recomputed step by step into the scratch and differentiated step by step
    i_nh = tl.program_id(0)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    bos, eos = seq_span(i_n, cu_ptr, T, IS_VARLEN)
    base = chunk_base(co_ptr, i_n, T, IS_VARLEN, BT)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    p_kv = o_k[:, None] * V + o_v[None, :]
    m_s = m_k[:, None] & m_v[None, :]
    S = load_state_block(h0_ptr + i_nh.to(tl.int64) * K * V, p_kv, m_s, HAS_H0, BK, BV)
    NC = tl.cdiv(eos - bos, BT)
    for c in range(NC):
        tl.store(ck_ptr + ((base + c) * HV + i_hv) * K * V + p_kv, S, mask=m_s)
        for t in range(bos + c * BT, tl.minimum(bos + (c + 1) * BT, eos)):
            S = _step(S, q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, t, H, HV, K, V, i_h, i_hv, o_k,
                      o_v, m_k, m_v, eps, HAS_G, L2NORM)
    tl.debug_barrier()
    dS = load_state_block(dht_ptr + i_nh.to(tl.int64) * K * V, p_kv, m_s, HAS_DHT, BK, BV)
    p_sc = sc_ptr + i_nh.to(tl.int64) * BT * K * V
    for ci in range(NC):
        c = NC - 1 - ci
        t0 = bos + c * BT
        n = tl.minimum(eos - t0, BT)
        S = tl.load(ck_ptr + ((base + c) * HV + i_hv) * K * V + p_kv, mask=m_s, other=0.)
        tl.debug_barrier()
        for j in range(n):
            tl.store(p_sc + j * K * V + p_kv, S, mask=m_s)
            S = _step(S, q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, t0 + j, H, HV, K, V, i_h, i_hv,
                      o_k, o_v, m_k, m_v, eps, HAS_G, L2NORM)
        tl.debug_barrier()
        for jj in range(n):
            j = n - 1 - jj
            t = t0 + j
            r_qk = t * H + i_h
            r_v = t * HV + i_hv
            Sd = tl.load(p_sc + j * K * V + p_kv, mask=m_s, other=0.)
            b_q = tl.load(q_ptr + r_qk * K + o_k, mask=m_k, other=0.).to(tl.float32)
            b_k = tl.load(k_ptr + r_qk * K + o_k, mask=m_k, other=0.).to(tl.float32)
            b_v = tl.load(v_ptr + r_v * V + o_v, mask=m_v, other=0.).to(tl.float32)
            b_do = tl.load(do_ptr + r_v * V + o_v, mask=m_v, other=0.).to(tl.float32)
            b_beta = tl.load(beta_ptr + r_v).to(tl.float32)
            if L2NORM:
                r_q = 1. / tl.sqrt(tl.sum(b_q * b_q) + eps)
                r_k = 1. / tl.sqrt(tl.sum(b_k * b_k) + eps)
                b_q = b_q * r_q
                b_k = b_k * r_k
            if HAS_G:
                b_eg = tl.exp(tl.load(g_ptr + r_v).to(tl.float32))
                Sd = Sd * b_eg
            b_p = tl.sum(Sd * b_k[:, None], axis=0)
            b_u = b_beta * (b_v - b_p)
            S = Sd + b_k[:, None] * b_u[None, :]
            dS += (scale * b_q)[:, None] * b_do[None, :]
            b_dq = scale * tl.sum(S * b_do[None, :], axis=1)
            b_du = tl.sum(dS * b_k[:, None], axis=0)
            b_dk = tl.sum(dS * b_u[None, :], axis=1)
            b_dp = -b_beta * b_du
            dS += b_k[:, None] * b_dp[None, :]
            b_dk += tl.sum(Sd * b_dp[None, :], axis=1)
            if L2NORM:
                b_dq = r_q * (b_dq - b_q * tl.sum(b_q * b_dq))
                b_dk = r_k * (b_dk - b_k * tl.sum(b_k * b_dk))
            tl.store(dq_ptr + r_v * K + o_k, b_dq, mask=m_k)
            tl.store(dk_ptr + r_v * K + o_k, b_dk, mask=m_k)
            tl.store(dv_ptr + r_v * V + o_v, (b_beta * b_du).to(dv_ptr.dtype.element_ty), mask=m_v)
            tl.store(dbeta_ptr + r_v, tl.sum(b_du * (b_v - b_p)))
            if HAS_G:
                tl.store(dg_ptr + r_v, tl.sum(tl.sum(dS * Sd, axis=1)))
                dS = dS * b_eg
        tl.debug_barrier()
    tl.store(dh0_ptr + i_nh.to(tl.int64) * K * V + p_kv, dS, mask=m_s)


# launch cache: bind each compiled kernel once per specialisation (ssm_kernels/_launch.py)
_recurrent_fwd_kernel = fast_kernel(_recurrent_fwd_kernel)
_recurrent_bwd_kernel = fast_kernel(_recurrent_bwd_kernel)


@triton.jit
def _step(S, q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, t, H, HV, K, V, i_h, i_hv, o_k, o_v, m_k, m_v,
          eps, HAS_G: tl.constexpr, L2NORM: tl.constexpr):
    """One step of the recurrence on a whole [K, V] state (no output)."""
    r_qk = t * H + i_h
    r_v = t * HV + i_hv
    b_k = tl.load(k_ptr + r_qk * K + o_k, mask=m_k, other=0.).to(tl.float32)
    b_v = tl.load(v_ptr + r_v * V + o_v, mask=m_v, other=0.).to(tl.float32)
    b_beta = tl.load(beta_ptr + r_v).to(tl.float32)
    if L2NORM:
        b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + eps)
    if HAS_G:
        S = S * tl.exp(tl.load(g_ptr + r_v).to(tl.float32))
    b_u = b_beta * (b_v - tl.sum(S * b_k[:, None], axis=0))
    return S + b_k[:, None] * b_u[None, :]


def bwd_chunk(tokens: int, n_seqs: int) -> int:
    """Steps between stored states in the backward: the checkpoints take ~tokens / BT states and
    the replay scratch n_seqs * BT, so BT ~ sqrt(tokens / n_seqs), a power of two in [16, 64]
    (a function of shapes only)."""
    return min(64, max(16, next_power_of_2(int(math.sqrt(max(tokens, 1) / max(n_seqs, 1))))))


def recurrent_bwd(q, k, v, g, beta, h0, cu_seqlens, scale: float, use_l2norm: bool, do, dht):
    """Backward of `recurrent_fwd` (same inputs; do [B, T, HV, V]; dht None or float32
    [N, HV, K, V]). Returns (dq, dk in q's dtype, dv in v's dtype, dg float32 [B, T, HV] or None,
    dbeta float32 [B, T, HV], dh0 float32 [N, HV, K, V]). Deterministic (no atomics)."""
    from ..chunk.common import num_chunks
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    BT = bwd_chunk(B * T, N)
    BK, BV = next_power_of_2(K), next_power_of_2(V)
    NCH = num_chunks(B, T, N, BT, cu_seqlens is not None)
    co = None
    if cu_seqlens is not None:
        n = (cu_seqlens[1:] - cu_seqlens[:-1] + BT - 1) // BT
        co = (torch.cumsum(n, 0) - n).to(torch.int32)
    f32 = dict(dtype=torch.float32, device=q.device)
    dq = torch.empty(B, T, HV, K, **f32)
    dk = torch.empty(B, T, HV, K, **f32)
    dv = torch.empty_like(v)
    dg = None if g is None else torch.empty(B, T, HV, **f32)
    dbeta = torch.empty(B, T, HV, **f32)
    dh0 = torch.empty(N, HV, K, V, **f32)
    ck = torch.empty(NCH, HV, K, V, **f32)
    sc = torch.empty(N * HV, BT, K, V, **f32)
    _recurrent_bwd_kernel[(N * HV,)](
        q, k, v, beta if g is None else g, beta, dh0 if h0 is None else h0, do,
        dh0 if dht is None else dht, dq, dk, dv, dbeta if dg is None else dg, dbeta, dh0, ck, sc,
        beta if cu_seqlens is None else cu_seqlens, beta if co is None else co,
        T, H, HV, K, V, float(scale), L2NORM_EPS,
        HAS_G=g is not None, HAS_H0=h0 is not None, HAS_DHT=dht is not None,
        L2NORM=bool(use_l2norm), IS_VARLEN=cu_seqlens is not None, BT=BT, BK=BK, BV=BV,
        num_warps=4 if BK * BV <= 4096 else 8)
    G = HV // H
    if G > 1:  # grouped value heads: the q/k gradient sums over the group (fixed order)
        dq, dk = dq.unflatten(2, (H, G)).sum(3), dk.unflatten(2, (H, G)).sum(3)
    return dq.to(q.dtype), dk.to(k.dtype), dv, dg, dbeta, dh0
