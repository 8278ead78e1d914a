"""Forward stages of the chunked engine (layout and conventions: see common.py).

    _state_kernel   inter-chunk state passing: one program per (K-tile, V-tile, sequence x head)
                    walks its sequence's chunks, S <- exp(G_last) S + (k exp(G_last - G))^T v,
                    storing the state before every chunk (h) and the final state. Short serial
                    chain of small matmuls; the only stage that is not parallel over chunks.
    (GATE 2, per-key decays: gla.py turns g into chunk-local cumsums Gc first and computes the
    chunk's scaled causal scores A [BT, BT] once per (chunk, head) for the output stage)
    _output_kernel  parallel over (V-tiles, chunks, heads): o = scale (q exp(G)) h + A v, bf16/fp16
                    operands on tensor cores with fp32 accumulation.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import common, gla
from .common import (blocks, causal_decay, chunk_base, chunk_span, chunk_table, decay_rows,
                     decay_state, decay_to_end, l2norm_rows, last_row, load_rows, load_v,
                     log_decay_cumsum, mm, mm_wy, num_chunks, seq_span, state_store_dtype)


@triton.jit
def _state_kernel(
    # pointers: k [TOK, HQ, K]; v [TOK, H, V]; g; vs [TOK, H]; A [H]; h0 [N, H, K, V] f32;
    # outputs h [NCH, H, K, V] (states before each chunk), ht [N, H, K, V] f32; cu [N + 1]; co [N]
    k_ptr, v_ptr, g_ptr, vs_ptr, A_ptr, h0_ptr, h_ptr, ht_ptr, cu_ptr, co_ptr,
    # sizes
    T, H, HQ, K, V,
    # meta-parameters
    GATE: tl.constexpr, G_FROM_VS: tl.constexpr, HAS_VS: tl.constexpr, HAS_H0: tl.constexpr,
    STORE_H: tl.constexpr, IS_VARLEN: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr,
    # delta rule (ssm_kernels/delta_rule/chunk.py): v is u [TOK, H, V] and w_ptr w [TOK, H, K]
    # of the WY stage; per chunk v_new = u - w S (needs BK >= K: one K tile) is stored to vn_ptr
    # [TOK, H, V] and used as v; L2NORM: k rows L2-normalised in-kernel
    w_ptr=None, vn_ptr=None, DELTA: tl.constexpr = False, L2NORM: tl.constexpr = False,
    WF32: tl.constexpr = False,
):
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    i_hq = i_h // (H // HQ)
    bos, eos = seq_span(i_n, cu_ptr, T, IS_VARLEN)
    base = chunk_base(co_ptr, i_n, T, IS_VARLEN, BT)
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_s = m_k[:, None] & m_v[None, :]
    p_s = o_k[:, None] * V + o_v[None, :]
    if HAS_H0:
        S = tl.load(h0_ptr + i_nh.to(tl.int64) * K * V + p_s, mask=m_s, other=0.).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    for i in range(tl.cdiv(eos - bos, BT)):
        if STORE_H:
            tl.store(h_ptr + ((base + i) * H + i_h) * K * V + p_s, S.to(h_ptr.dtype.element_ty),
                     mask=m_s)
        t = bos + i * BT + o_t
        m_t = t < eos
        b_k = load_rows(k_ptr, t * HQ + i_hq, m_t, o_k, m_k, K)
        b_v = load_v(v_ptr, vs_ptr, t * H + i_h, m_t, o_v, m_v, V, HAS_VS)
        if L2NORM:
            b_k = l2norm_rows(b_k)
        if DELTA:
            b_w = load_rows(w_ptr, t * H + i_h, m_t, o_k, m_k, K)
            b_v = b_v - mm_wy(b_w, S, WF32, DT, IEEE)
            tl.store(vn_ptr + (t * H + i_h)[:, None] * V + o_v[None, :],
                     b_v.to(vn_ptr.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])
        G = log_decay_cumsum(g_ptr, vs_ptr, A_ptr, t * H + i_h, i_h, m_t, o_k, m_k, K, GATE,
                             G_FROM_VS, BT)
        G_last = last_row(G, o_t, GATE, BT)
        S = decay_state(S, G_last, GATE) + mm(tl.trans(decay_to_end(b_k, G, G_last, GATE)), b_v,
                                              DT, IEEE)
    tl.store(ht_ptr + i_nh.to(tl.int64) * K * V + p_s, S, mask=m_s)


@triton.jit
def _output_kernel(
    # q, k [TOK, HQ, K]; v [TOK, H, V]; g (GATE 2: Gc); vs; A_ssd [H]; h [NCH, H, K, V];
    # a [TOK, H, BT] (GATE 2: the scaled scores, input dtype); output o [TOK, H, V]; ct [NCH, 2] chunk table (varlen)
    q_ptr, k_ptr, v_ptr, g_ptr, vs_ptr, A_ptr, h_ptr, a_ptr, o_ptr, ct_ptr, cu_ptr,
    T, NT, H, HQ, K, V, scale,
    GATE: tl.constexpr, G_FROM_VS: tl.constexpr, HAS_VS: tl.constexpr, IS_VARLEN: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr,
    L2NORM: tl.constexpr = False,   # q, k rows L2-normalised (row scales applied after the K loop)
):
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_hq = i_h // (H // HQ)
    t0, eos = chunk_span(i_c, ct_ptr, cu_ptr, T, NT, IS_VARLEN, BT)
    o_t = tl.arange(0, BT)
    t = t0 + o_t
    m_t = t < eos
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    Kc = tl.where(t0 < eos, K, 0)          # surplus chunk programs read no state
    row_q = t * HQ + i_hq
    row = t * H + i_h
    p_h = h_ptr + (i_c.to(tl.int64) * H + i_h) * K * V
    G = log_decay_cumsum(g_ptr, vs_ptr, A_ptr, row, i_h, m_t, o_t, m_t, K, GATE if GATE < 2 else 0,
                         G_FROM_VS, BT)
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    A = tl.zeros([BT, BT], dtype=tl.float32)
    if L2NORM:
        nq = tl.zeros([BT], dtype=tl.float32)
        nk = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_q = load_rows(q_ptr, row_q, m_t, o_k, m_k, K)
        b_h = tl.load(p_h + o_k[:, None] * V + o_v[None, :],
                      mask=(o_k < Kc)[:, None] & m_v[None, :], other=0.)
        if GATE == 2:
            Gk = log_decay_cumsum(g_ptr, g_ptr, g_ptr, row, i_h, m_t, o_k, m_k, K, 2, False, BT)
            b_o += mm(b_q * tl.exp2(Gk), b_h, DT, IEEE)
        else:
            b_o += mm(decay_rows(b_q, G, GATE), b_h, DT, IEEE)
            b_kk = load_rows(k_ptr, row_q, m_t, o_k, m_k, K)
            A += mm(b_q, tl.trans(b_kk), DT, IEEE)
            if L2NORM:
                nq += tl.sum(b_q * b_q, axis=1)
                nk += tl.sum(b_kk * b_kk, axis=1)
    if GATE == 2:
        A = tl.load(a_ptr + row[:, None] * BT + o_t[None, :], mask=m_t[:, None], other=0.)
    else:
        A = causal_decay(A, G, o_t, GATE) * scale
    if L2NORM:
        r_q = 1. / tl.sqrt(nq + 1e-6)
        A = A * (r_q[:, None] * (1. / tl.sqrt(nk + 1e-6))[None, :])
        b_o = b_o * r_q[:, None]
    b_v = load_v(v_ptr, vs_ptr, row, m_t, o_v, m_v, V, HAS_VS)
    b_o = b_o * scale + mm(A, b_v, DT, IEEE)
    tl.store(o_ptr + row[:, None] * V + o_v[None, :], b_o.to(o_ptr.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])


# ---- launchers ---------------------------------------------------------------------------------

def _dummy(x):
    return x.new_empty(1)


class Plan:
    """Sizes, tiles and the chunk index of one call (shared by the forward and backward)."""

    def __init__(self, q, v, g, cu_seqlens, g_from_vs: bool, chunk: Optional[int] = None):
        B, T, HQ, K = q.shape
        self.B, self.T, self.HQ, self.K = B, T, HQ, K
        self.H, self.V = v.shape[2], v.shape[3]
        self.N = B if cu_seqlens is None else cu_seqlens.numel() - 1
        self.gate = 1 if g_from_vs else (0 if g is None else (1 if g.dim() == 3 else 2))
        self.meta = blocks(K, self.V, self.gate, q.dtype, chunk)
        BT = self.meta["BT"]
        self.BT = BT
        self.NT = triton.cdiv(T, BT)
        self.varlen = cu_seqlens is not None
        self.NCH = num_chunks(B, T, self.N, BT, self.varlen)
        self.cu = cu_seqlens
        if self.varlen:
            self.ct, self.co = chunk_table(cu_seqlens, BT, self.NCH, B * T)
        else:
            self.ct = self.co = None
        self.hdtype = state_store_dtype(q.dtype)

    def idx_args(self, x):
        d = _dummy(x)
        return (d if self.cu is None else self.cu, d if self.co is None else self.co,
                d if self.ct is None else self.ct)


def chunk_states(p: Plan, k, v, g, vs, A, h0, store_h=True):
    """Every chunk's incoming state h [NCH, H, K, V] (storage dtype) and the final states."""
    m = p.meta
    h = (k.new_empty((p.NCH, p.H, p.K, p.V), dtype=p.hdtype) if store_h else _dummy(k))
    ht = common.poison(k.new_empty((p.N, p.H, p.K, p.V), dtype=torch.float32))
    cu, co, _ = p.idx_args(ht)
    grid = (triton.cdiv(p.K, m["BK"]), triton.cdiv(p.V, m["BV"]), p.N * p.H)
    d = _dummy(ht)
    _state_kernel[grid](k, v, d if g is None else g, d if vs is None else vs,
                        d if A is None else A, d if h0 is None else h0, h, ht, cu, co,
                        p.T, p.H, p.HQ, p.K, p.V,
                        GATE=p.gate, G_FROM_VS=A is not None, HAS_VS=vs is not None,
                        HAS_H0=h0 is not None, STORE_H=store_h, IS_VARLEN=p.varlen,
                        BT=p.BT, BK=m["BK"], BV=m["BV"], DT=m["DT"], IEEE=m["IEEE"],
                        num_warps=4, num_stages=1 if m["IEEE"] == 1 else 2)
    return h, ht


def chunk_fwd(q, k, v, g, h0, cu_seqlens, scale, vs: Optional[torch.Tensor] = None,
              A: Optional[torch.Tensor] = None):
    """Forward of the engine. q, k [B, T, HQ, K]; v [B, T, H, V] (H a multiple of HQ); g None,
    [B, T, H] or [B, T, H, K] float32 log-decays; vs None or [B, T, H] float32 (v is used as
    v * vs); A None or [H] float32 (then the log-decay is vs * A, SSD); h0 None or [N, H, K, V]
    float32; cu_seqlens None or int [N + 1] (B == 1). Returns (o [B, T, H, V] in v's dtype,
    final states [N, H, K, V] float32). All contiguous."""
    p = Plan(q, v, g, cu_seqlens, A is not None)
    m = p.meta
    if p.gate == 2:
        g = gla.chunk_cumsum(p, g)         # every later stage reads Gc
    h, ht = chunk_states(p, k, v, g, vs, A, h0)
    if p.gate == 2 and gla.use_fused_fwd(p):
        return gla.fwd_output(p, q, k, v, g, h, scale), ht
    a = gla.intra_scores(p, q, k, g, scale) if p.gate == 2 else _dummy(ht)
    o = common.poison(torch.empty_like(v))
    cu, _, ct = p.idx_args(ht)
    d = _dummy(ht)
    _output_kernel[(triton.cdiv(p.V, m["BVO"]), p.NCH, p.H)](
        q, k, v, d if g is None else g, d if vs is None else vs, d if A is None else A, h, a, o,
        ct, cu, p.T, p.NT, p.H, p.HQ, p.K, p.V, float(scale),
        GATE=p.gate, G_FROM_VS=A is not None, HAS_VS=vs is not None, IS_VARLEN=p.varlen,
        BT=p.BT, BK=m["BK"], BV=m["BVO"], DT=m["DT"], IEEE=m["IEEE"],
        num_warps=4, num_stages=1 if m["IEEE"] == 1 else 2)
    return o, ht
