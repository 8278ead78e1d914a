"""Forward stages of the chunked engine (layout and conventions: see common.py).

    _state_kernel   inter-chunk state passing: one program per (K-tile, V-tile, sequence x head)
                    walks its sequence's chunks, S <- exp(G_last) S + (k exp(G_last - G))^T v,
                    storing the state before every chunk (h) and the final state. Short serial
                    chain of small matmuls; the only stage that is not parallel over chunks.
    (GATE 2, per-key decays: gla.py turns g into chunk-local cumsums Gc first and computes the
    chunk's scaled causal scores A [BT, BT] once per (chunk, head) for the output stage)
    _output_kernel  parallel over (V-tiles, chunks, heads): o = scale (q exp(G)) h + A v, bf16/fp16
                    operands on tensor cores with fp32 accumulation; SSD: (o + D x) * silu(z) in
                    its epilogue (common.skip_gate, the same code as the fused path's).
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Optional

import torch
import triton
import triton.language as tl

from . import common, gla
from .common import (blocks, causal_decay, chunk_coords, chunk_span, chunk_table, decay_rows,
                     decay_state, decay_to_end, l2norm_rows, last_row, load_rows, load_skip,
                     load_state_block, load_v, log_decay_cumsum, mm, mm_wy, num_chunks,
                     row_span_base, scale_v, seg_coords, seq_span, skip_gate, state_slot,
                     state_slots, state_store_dtype)
from .._launch import cdiv, next_power_of_2, fast_kernel


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
    # SEG > 0 (fused_fwd stage 1, STORE_H False; packed batches: co_ptr is the segment table,
    # common.seg_coords): "sequences" are segments of SEG tokens; ht [NSEG, H, K, V] gets each
    # segment's end state and gs_ptr [NSEG, H] f32 its total log2-decay (GATE 1). With STORE_H
    # (the backward's segment-parallel recompute, `seg_chunk_states`; B rows): h0 [NSEG, H, K, V]
    # is each segment's incoming state, h is stored per chunk at its global index, and
    # STORE_HT=False skips the end-state and gs stores
    SEG: tl.constexpr = 0, gs_ptr=None, STORE_HT: tl.constexpr = True,
    # EVERY > 1 (common.H_EVERY; SEG = 0, not DELTA): h stores only every EVERY-th chunk's state,
    # at common.state_slot (cor_ptr: the packed batches' first slots). PRE (GATE 2,
    # common.GLA_PREP): k_ptr holds the pre-decayed rows k exp2(G_last - Gc) [TOK, H, K] (pass
    # HQ = H) and g_ptr each chunk's total log2-decay G_last [NCH, H, K] f32
    EVERY: tl.constexpr = 1, cor_ptr=None, PRE: tl.constexpr = False,
):
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    i_hq = i_h // (H // HQ)
    bos, eos, base = row_span_base(i_n, cu_ptr, co_ptr, T, IS_VARLEN, BT, SEG)
    if EVERY > 1:
        hbase = state_slot(cor_ptr, i_n, 0, T, IS_VARLEN, BT, EVERY)
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
    gsum = tl.zeros([], dtype=tl.float32)
    for i in range(tl.cdiv(eos - bos, BT)):
        if STORE_H:
            if EVERY > 1:
                if i % EVERY == 0:
                    tl.store(h_ptr + ((hbase + i // EVERY) * H + i_h) * K * V + p_s,
                             S.to(h_ptr.dtype.element_ty), mask=m_s)
            else:
                tl.store(h_ptr + ((base + i) * H + i_h) * K * V + p_s,
                         S.to(h_ptr.dtype.element_ty), mask=m_s)
        t = bos + i * BT + o_t
        m_t = t < eos
        if PRE:
            # k^T loaded transposed, already decayed to the chunk end: S <- 2^G_last S + k~^T v
            b_v = load_v(v_ptr, vs_ptr, t * H + i_h, m_t, o_v, m_v, V, HAS_VS)
            b_kT = tl.load(k_ptr + (t * H + i_h)[None, :] * K + o_k[:, None],
                           mask=m_k[:, None] & m_t[None, :], other=0.)
            gl = tl.load(g_ptr + ((base + i) * H + i_h) * K + o_k, mask=m_k, other=0.)
            S = S * tl.exp2(gl)[:, None] + mm(b_kT, b_v, DT, IEEE)
        else:
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
            if SEG > 0 and GATE == 1:
                gsum += G_last
            S = decay_state(S, G_last, GATE) + mm(
                tl.trans(decay_to_end(b_k, G, G_last, GATE)), b_v, DT, IEEE)
    if STORE_HT:
        tl.store(ht_ptr + i_nh.to(tl.int64) * K * V + p_s, S, mask=m_s)
        if SEG > 0 and GATE == 1:
            if (i_k == 0) & (i_v == 0):
                tl.store(gs_ptr + i_nh, gsum)


@triton.jit
def gl_sum(gl_ptr, i_c, n, i_h, H, o_k, m_k, K):
    """GATE 2 with GLA_PREP: sum of the total log2-decays G_last [NCH, H, K] of the n chunks
    before global chunk i_c (columns o_k), <= 0."""
    s = tl.zeros(o_k.shape, dtype=tl.float32)
    for m in range(n):
        s += tl.load(gl_ptr + ((i_c - 1 - m).to(tl.int64) * H + i_h) * K + o_k, mask=m_k, other=0.)
    return s


@triton.jit
def replay_chunks(b_o, q_ptr, k_ptr, v_ptr, g_ptr, vs_ptr, A_ptr, t0, i_c, r, i_h, i_hq, H, HQ,
                  o_t, m_t, o_v, m_v, K, V, GATE: tl.constexpr, G_FROM_VS: tl.constexpr,
                  HAS_VS: tl.constexpr, PRE: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  DT: tl.constexpr, IEEE: tl.constexpr):
    """H_EVERY: the inter-chunk output of the chunk at token t0 (global chunk i_c) when its state
    is not stored, from the state stored r chunks before (S_{c-r}) and those r full chunks of the
    same sequence, in attention form (nothing but [BT, BT] scores and the o accumulator held):
        q S_c = 2^W q S_{c-r} + sum_j 2^D_j (q k_j^T . 2^(T_j - G_j)) v_j,
    T_j chunk j's total log2-decay, G_j its chunk-local cumsum (row vector over j's keys),
    D_j = sum of T_m over the chunks between j and c, W = sum over all r (every exponent <= 0).
    b_o [BT, BV] holds q S_{c-r} (GATE 0/1: q raw, the caller scales rows by 2^G_i after);
    GATE 1 scales it by 2^W here. PRE (GATE 2): q_ptr, k_ptr hold q 2^Gc, k 2^(G_last - Gc)
    ([TOK, H, K]; HQ = H) and g_ptr G_last [NCH, H, K]: the caller scaled q's columns by 2^W
    (gl_sum) for b_o, and here D_j scales q's columns before q k~_j^T."""
    row_q = (t0 + o_t) * HQ + i_hq
    if GATE == 1:
        W = tl.zeros([], dtype=tl.float32)
        for jj in range(r):
            row_j = (t0 - (jj + 1) * BT + o_t) * H + i_h
            W += last_row(log_decay_cumsum(g_ptr, vs_ptr, A_ptr, row_j, i_h, o_t < BT, o_t,
                                           o_t < BT, K, GATE, G_FROM_VS, BT), o_t, GATE, BT)
        b_o = b_o * tl.exp2(W)
    D = tl.zeros([], dtype=tl.float32)
    for jj in range(r):
        t_j = t0 - (jj + 1) * BT + o_t                 # chunk j = c - 1 - jj (full)
        row_j = t_j * H + i_h
        Aj = tl.zeros([BT, BT], dtype=tl.float32)
        for i_k in range(tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            b_q = tl.load(q_ptr + row_q[:, None] * K + o_k[None, :],
                          mask=m_t[:, None] & m_k[None, :], other=0.)
            b_kT = tl.load(k_ptr + (t_j * HQ + i_hq)[None, :] * K + o_k[:, None],
                           mask=m_k[:, None], other=0.)
            if PRE:
                b_q = (b_q.to(tl.float32)
                       * tl.exp2(gl_sum(g_ptr, i_c, jj, i_h, H, o_k, m_k, K))[None, :])
            Aj += mm(b_q, b_kT, DT, IEEE)
        if GATE == 1:
            G_j = log_decay_cumsum(g_ptr, vs_ptr, A_ptr, row_j, i_h, o_t < BT, o_t, o_t < BT, K,
                                   GATE, G_FROM_VS, BT)
            T_j = last_row(G_j, o_t, GATE, BT)
            Aj = Aj * tl.exp2(D + T_j - G_j)[None, :]
            D += T_j
        if HAS_VS:
            b_v = load_v(v_ptr, vs_ptr, row_j, o_t < BT, o_v, m_v, V, HAS_VS)
        else:
            b_v = tl.load(v_ptr + row_j[:, None] * V + o_v[None, :], mask=m_v[None, :], other=0.)
        b_o += mm(Aj, b_v, DT, IEEE)
    return b_o


@triton.jit
def _output_kernel(
    # q, k [TOK, HQ, K]; v [TOK, H, V]; g (GATE 2: Gc); vs; A_ssd [H]; h [NCH, H, K, V];
    # a [TOK, H, BT] (GATE 2: the scaled scores, input dtype); output o [TOK, H, V]; ct [NCH, 2] chunk table (varlen)
    q_ptr, k_ptr, v_ptr, g_ptr, vs_ptr, A_ptr, h_ptr, a_ptr, o_ptr, ct_ptr, cu_ptr,
    T, NT, H, HQ, K, V, scale,
    GATE: tl.constexpr, G_FROM_VS: tl.constexpr, HAS_VS: tl.constexpr, IS_VARLEN: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr,
    L2NORM: tl.constexpr = False,   # q, k rows L2-normalised (row scales applied after the K loop)
    # SSD's epilogue (skip_gate, as _fused_fwd_kernel): o = (o + D x) * silu(z), x the unscaled v;
    # D [H, V] f32, z [TOK, H, V]
    D_ptr=None, z_ptr=None, HAS_D: tl.constexpr = False, HAS_Z: tl.constexpr = False,
    # EVERY > 1 (common.H_EVERY; GATE 0/1, or GATE 2 with PRE): h holds every EVERY-th chunk's
    # state (common.state_slot, cor_ptr for packed batches); chunk c reads chunk c - c mod EVERY's
    # and adds the chunks in between in attention form (replay_chunks; GATE 0/1 in the DECAY_O
    # form). DECAY_O (GATE 0/1, common.OUT_DECAY_O): exp(G) scales the rows of q h after the dot,
    # q and k^T stay raw operands. PRE (GATE 2, common.GLA_PREP): q_ptr holds q exp2(Gc)
    # [TOK, H, K], k_ptr k exp2(G_last - Gc), g_ptr G_last [NCH, H, K] (pass HQ = H)
    EVERY: tl.constexpr = 1, cor_ptr=None, DECAY_O: tl.constexpr = False,
    PRE: tl.constexpr = False,
    # SCORES_EARLY (EVERY > 1, GATE 0/1; common.OUT_SCORES_EARLY): the chunk's own scores q k^T
    # in the first K loop from the q, k^T tiles it loads anyway (as EVERY = 1), held through the
    # replay, instead of re-reading q and k after it (same sums in the same order: bitwise equal)
    SCORES_EARLY: tl.constexpr = False,
):
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_hq = i_h // (H // HQ)
    if EVERY > 1:
        i_n, c = chunk_coords(i_c, ct_ptr, NT, IS_VARLEN)
        bos, eos = seq_span(i_n, cu_ptr, T, IS_VARLEN)
        t0 = bos + c * BT
        r = tl.where(t0 < eos, c % EVERY, 0)          # chunks to replay (none for surplus programs)
        p_h = h_ptr + (state_slot(cor_ptr, i_n, c, T, IS_VARLEN, BT, EVERY) * H + i_h) * K * V
    else:
        t0, eos = chunk_span(i_c, ct_ptr, cu_ptr, T, NT, IS_VARLEN, BT)
        p_h = h_ptr + (i_c.to(tl.int64) * H + i_h) * K * V
    o_t = tl.arange(0, BT)
    t = t0 + o_t
    m_t = t < eos
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    Kc = tl.where(t0 < eos, K, 0)          # surplus chunk programs read no state
    row_q = t * HQ + i_hq
    row = t * H + i_h
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
        m_h = (o_k < Kc)[:, None] & m_v[None, :]
        if PRE:
            b_q = tl.load(q_ptr + row[:, None] * K + o_k[None, :],
                          mask=m_t[:, None] & m_k[None, :], other=0.)
            b_h = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=m_h, other=0.)
            if EVERY > 1:      # the stored state is r chunks old: q's columns times 2^W
                b_q = (b_q.to(tl.float32)
                       * tl.exp2(gl_sum(g_ptr, i_c, r, i_h, H, o_k, m_k, K))[None, :])
            b_o += mm(b_q, b_h, DT, IEEE)
        elif GATE == 2:
            b_q = load_rows(q_ptr, row_q, m_t, o_k, m_k, K)
            b_h = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=m_h, other=0.)
            Gk = log_decay_cumsum(g_ptr, g_ptr, g_ptr, row, i_h, m_t, o_k, m_k, K, 2, False, BT)
            b_o += mm(b_q * tl.exp2(Gk), b_h, DT, IEEE)
        elif DECAY_O or EVERY > 1:
            # q and k^T as loaded (16-bit operands, no register copies); the decays go on the
            # [BT, BV] rows of q h and the scores after the loop
            b_q = tl.load(q_ptr + row_q[:, None] * K + o_k[None, :],
                          mask=m_t[:, None] & m_k[None, :], other=0.)
            b_kT = tl.load(k_ptr + row_q[None, :] * K + o_k[:, None],
                           mask=m_k[:, None] & m_t[None, :], other=0.)
            b_h = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=m_h, other=0.)
            b_o += mm(b_q, b_h, DT, IEEE)
            if EVERY == 1 or SCORES_EARLY:
                A += mm(b_q, b_kT, DT, IEEE)
            if L2NORM:      # (the delta rule's OUT_DECAY_O; the engine never passes L2NORM)
                b_qf = b_q.to(tl.float32)
                b_kf = b_kT.to(tl.float32)
                nq += tl.sum(b_qf * b_qf, axis=1)
                nk += tl.sum(b_kf * b_kf, axis=0)
        else:
            b_q = load_rows(q_ptr, row_q, m_t, o_k, m_k, K)
            b_h = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=m_h, other=0.)
            b_o += mm(decay_rows(b_q, G, GATE), b_h, DT, IEEE)
            b_kk = load_rows(k_ptr, row_q, m_t, o_k, m_k, K)
            A += mm(b_q, tl.trans(b_kk), DT, IEEE)
            if L2NORM:
                nq += tl.sum(b_q * b_q, axis=1)
                nk += tl.sum(b_kk * b_kk, axis=1)
    if EVERY > 1:
        b_o = replay_chunks(b_o, q_ptr, k_ptr, v_ptr, g_ptr, vs_ptr, A_ptr, t0, i_c, r, i_h, i_hq,
                            H, HQ, o_t, m_t, o_v, m_v, K, V, GATE, G_FROM_VS, HAS_VS, PRE, BT, BK,
                            DT, IEEE)
        if GATE < 2 and not SCORES_EARLY:
            # the chunk's own scores after the replay (q, k re-read from L1/L2), so the replay's
            # scores and these are never live together
            for i_k in range(tl.cdiv(K, BK)):
                o_k = i_k * BK + tl.arange(0, BK)
                m_k = o_k < K
                A += mm(tl.load(q_ptr + row_q[:, None] * K + o_k[None, :],
                                mask=m_t[:, None] & m_k[None, :], other=0.),
                        tl.load(k_ptr + row_q[None, :] * K + o_k[:, None],
                                mask=m_k[:, None] & m_t[None, :], other=0.), DT, IEEE)
    if GATE == 2:
        A = tl.load(a_ptr + row[:, None] * BT + o_t[None, :], mask=m_t[:, None], other=0.)
    else:
        A = causal_decay(A, G, o_t, GATE) * scale
        if DECAY_O or EVERY > 1:
            b_o = decay_rows(b_o, G, GATE)
    if L2NORM:
        r_q = 1. / tl.sqrt(nq + 1e-6)
        A = A * (r_q[:, None] * (1. / tl.sqrt(nk + 1e-6))[None, :])
        b_o = b_o * r_q[:, None]
    b_x = load_rows(v_ptr, row, m_t, o_v, m_v, V)
    b_o = b_o * scale + mm(A, scale_v(b_x, vs_ptr, row, m_t, HAS_VS), DT, IEEE)
    b_o = skip_gate(b_o, b_x, load_skip(D_ptr, i_h, o_v, m_v, V, HAS_D), z_ptr, row, m_t, o_v, m_v,
                    V, HAS_D, HAS_Z)
    tl.store(o_ptr + row[:, None] * V + o_v[None, :], b_o.to(o_ptr.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])


@triton.jit
def _seg_scan_kernel(
    # hs [NSEG, H, K, V] f32 segment end states from zero (stage 1); g / vs, A as _state_kernel;
    # h0 [N, H, K, V] f32; outputs sin [NSEG, H, K, V] f32 (state entering each segment), ht
    hs_ptr, gs_ptr, h0_ptr, sin_ptr, ht_ptr,
    T, H, K, V,
    GATE: tl.constexpr, HAS_H0: tl.constexpr, SEG: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
    REVERSE: tl.constexpr = False,
    # packed batches (forward only): sequence i_n's segments are so[i_n] .. + cdiv(len, SEG)
    IS_VARLEN: tl.constexpr = False, cu_ptr=None, so_ptr=None,
):
    """fused_fwd stage 2: S_in(s+1) = exp2(gs(s)) S_in(s) + hs(s) (gs: segment s's total log2-decay
    from stage 1). REVERSE (the backward's segment-parallel state-gradient scan, bwd.py
    `seg_state_grads`): segments last to first, hs = each segment's start adjoint from a zero end
    adjoint, h0 = dht, sin = the adjoint entering each segment from its end, ht = dh0."""
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_s = (o_k < K)[:, None] & (o_v < V)[None, :]
    p_s = o_k[:, None] * V + o_v[None, :]
    S = load_state_block(h0_ptr + i_nh.to(tl.int64) * K * V, p_s, m_s, HAS_H0, BK, BV)
    if IS_VARLEN:
        b0, e0 = seq_span(i_n, cu_ptr, T, True)
        ns = tl.cdiv(e0 - b0, SEG).to(tl.int32)
        s0 = tl.load(so_ptr + i_n)
    else:
        ns = tl.cdiv(T, SEG)
        s0 = i_n * ns
    for j in range(ns):
        if REVERSE:
            i_s = s0 + ns - 1 - j
        else:
            i_s = s0 + j
        off = (i_s.to(tl.int64) * H + i_h) * K * V
        tl.store(sin_ptr + off + p_s, S, mask=m_s)
        if GATE == 1:
            S = S * tl.exp2(tl.load(gs_ptr + i_s * H + i_h))
        S += tl.load(hs_ptr + off + p_s, mask=m_s, other=0.)
    tl.store(ht_ptr + i_nh.to(tl.int64) * K * V + p_s, S, mask=m_s)


@triton.jit
def _fused_fwd_kernel(
    # q, k [TOK, HQ, K]; v [TOK, H, V]; g [TOK, H] f32; vs [TOK, H]; A_ssd [H]; sin [NSEG, H, K, V]
    # f32 (stage 2); D [H, V] f32; z [TOK, H, V]; output o [TOK, H, V]
    q_ptr, k_ptr, v_ptr, g_ptr, vs_ptr, A_ptr, sin_ptr, D_ptr, z_ptr, o_ptr,
    T, H, HQ, K, V, scale,
    GATE: tl.constexpr, G_FROM_VS: tl.constexpr, HAS_VS: tl.constexpr, HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr, SEG: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr,
    I32_OFFS: tl.constexpr = False,   # q, k addressed by an int64 chunk base + int32 tile offsets
    # LOOKBACK: no stage 2; sin_ptr is hs (stage 1's segment end states), the program sums the
    # decayed end states of its row's earlier segments (and h0) itself, and the program of a row's
    # last segment stores its final S to ht_ptr
    LOOKBACK: tl.constexpr = False, gs_ptr=None, h0_ptr=None, ht_ptr=None,
    HAS_H0: tl.constexpr = False,
    V_FIRST: tl.constexpr = False,    # grid (V tiles, heads, segments) (common.FUSED_V_FIRST)
    # packed batches (not with LOOKBACK): st [NSEG, 2] the segments' chunk_table, cu cu_seqlens
    IS_VARLEN: tl.constexpr = False, st_ptr=None, cu_ptr=None,
    # TMA (common.FUSED_TMA; B rows with T % BT == 0, K a power of two, V % BV == 0): q, k, v
    # loaded and o stored through 2-d tensor descriptors over [TOK, heads x K] / [TOK, H x V]
    # (the head picks the column block), so no address or mask tensors live in registers
    TMA: tl.constexpr = False, qd=None, kd=None, vd=None, od=None,
):
    """fused_fwd stage 3, one program per (head, segment, V-tile) (V_FIRST: V tiles fastest, then
    heads, so the V tiles of one (head, segment) share q and k through L2 and the heads of one
    q/k group run side by side; else heads fastest, V tiles slowest). From the segment's incoming
    state S (whole K x BV, float32 in registers) it walks the segment's chunks:
        o = scale (e^G (q S) + causal(q k^T e^(G_i - G_j)) v) [+ D x] [* silu(z)]
        S <- e^(G_last) S + k^T (e^(G_last - G) v)
    (v = x * vs for SSD). No per-chunk state goes through memory."""
    if V_FIRST:
        i_v, i_h, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    else:
        i_h, i_s, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_hq = i_h // (H // HQ)
    _, _, bos, eos = seg_coords(i_s, st_ptr, cu_ptr, T, IS_VARLEN, SEG)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    p_s = o_k[:, None] * V + o_v[None, :]
    m_s = m_k[:, None] & m_v[None, :]
    if LOOKBACK:
        ns = tl.cdiv(T, SEG)
        i_n = i_s // ns
        S = load_state_block(h0_ptr + (i_n.to(tl.int64) * H + i_h) * K * V, p_s, m_s, HAS_H0,
                             BK, BV)
        for jj in tl.range(0, i_s % ns, num_stages=1):
            j = i_n * ns + jj
            if GATE == 1:
                S = S * tl.exp2(tl.load(gs_ptr + j * H + i_h))
            S += tl.load(sin_ptr + (j.to(tl.int64) * H + i_h) * K * V + p_s, mask=m_s, other=0.)
    else:
        S = tl.load(sin_ptr + (i_s.to(tl.int64) * H + i_h) * K * V + p_s, mask=m_s, other=0.)
    b_D = load_skip(D_ptr, i_h, o_v, m_v, V, HAS_D)
    off_qk = o_t[:, None] * (HQ * K) + o_k[None, :]
    n_it = tl.cdiv(eos - bos, BT)
    for i in range(n_it):
        t = bos + i * BT + o_t
        m_t = t < eos
        row_q = t * HQ + i_hq
        row = t * H + i_h
        m_qk = m_t[:, None] & m_k[None, :]
        if TMA:
            r0 = (bos + i * BT).to(tl.int32)
            b_q = qd.load([r0, i_hq * K])
            b_k = kd.load([r0, i_hq * K])
        elif I32_OFFS:
            # one int64 base per chunk + loop-invariant int32 offsets (no int64 address tensors)
            c_qk = ((bos + i * BT) * HQ + i_hq) * K
            b_q = tl.load(q_ptr + c_qk + off_qk, mask=m_qk, other=0.)
            b_k = tl.load(k_ptr + c_qk + off_qk, mask=m_qk, other=0.)
        else:
            b_q = tl.load(q_ptr + row_q[:, None] * K + o_k[None, :], mask=m_qk, other=0.)
            b_k = tl.load(k_ptr + row_q[:, None] * K + o_k[None, :], mask=m_qk, other=0.)
        if TMA:
            b_x = vd.load([r0, i_h * V + i_v * BV]).to(tl.float32)
        else:
            b_x = load_rows(v_ptr, row, m_t, o_v, m_v, V)
        b_v = scale_v(b_x, vs_ptr, row, m_t, HAS_VS)
        G = log_decay_cumsum(g_ptr, vs_ptr, A_ptr, row, i_h, m_t, o_t, m_t, K, GATE, G_FROM_VS, BT)
        G_last = last_row(G, o_t, GATE, BT)
        A = causal_decay(mm(b_q, tl.trans(b_k), DT, IEEE), G, o_t, GATE) * scale
        # the decays scale the [BT, BV] rows of q S and of v, never q or k: those stay raw dot
        # operands (shared memory, no register copies)
        if GATE == 1:
            b_o = mm(b_q, S, DT, IEEE) * (tl.exp2(G) * scale)[:, None]
        else:
            b_o = mm(b_q, S, DT, IEEE) * scale
        b_o += mm(A, b_v, DT, IEEE)
        b_o = skip_gate(b_o, b_x, b_D, z_ptr, row, m_t, o_v, m_v, V, HAS_D, HAS_Z)
        if TMA:
            od.store([r0, i_h * V + i_v * BV], b_o.to(o_ptr.dtype.element_ty))
        else:
            tl.store(o_ptr + row[:, None] * V + o_v[None, :], b_o.to(o_ptr.dtype.element_ty),
                     mask=m_t[:, None] & m_v[None, :])
        S = decay_state(S, G_last, GATE) + mm(tl.trans(b_k), decay_to_end(b_v, G, G_last, GATE),
                                              DT, IEEE)
    if LOOKBACK:
        if i_s % ns == ns - 1:
            # the state's [BK, BV] offsets and mask rebuilt here from a row stride the compiler
            # cannot prove equal to V (n_it >= 1 on this path: the same value), so they are not
            # the prologue's p_s / m_s kept live through the whole chunk loop (sm_90 Triton 3.6:
            # those held ~20 registers and made GATE 1 spill)
            Vr = V + (n_it < 1).to(tl.int32)
            o_k2 = tl.arange(0, BK)
            m_s2 = (o_k2 < K)[:, None] & (o_v < Vr)[None, :]
            tl.store(ht_ptr + (i_n.to(tl.int64) * H + i_h) * K * Vr + o_k2[:, None] * Vr
                     + o_v[None, :], S, mask=m_s2)


# ---- launchers ---------------------------------------------------------------------------------

# launch cache: bind each compiled kernel once per specialisation (ssm_kernels/_launch.py)
_state_kernel = fast_kernel(_state_kernel)
_output_kernel = fast_kernel(_output_kernel)
_seg_scan_kernel = fast_kernel(_seg_scan_kernel)
_fused_fwd_kernel = fast_kernel(_fused_fwd_kernel)


_dummy = common.dummy   # one persistent 1-element tensor per (device, dtype): never written
_NO_OVERRIDES = MappingProxyType({})


def _fk(p, name: str):
    """A knob of the two-level forward for this call: the plan's override (common.FUSED_LONG
    when the length rule picked the path) or common's own."""
    return p.fk[name] if name in p.fk else getattr(common, name)


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
        self.NT = cdiv(T, BT)
        self.varlen = cu_seqlens is not None
        self.NCH = num_chunks(B, T, self.N, BT, self.varlen)
        self.cu = cu_seqlens
        if self.varlen:
            self.ct, self.co = chunk_table(cu_seqlens, BT, self.NCH, B * T)
        else:
            self.ct = self.co = None
        self.hdtype = state_store_dtype(q.dtype)
        # FWD_AUTO's measured knobs apply (16-bit inputs; chunk_fwd_keep turns them off for
        # SSD's training forward)
        self.lowp = q.dtype != torch.float32
        self.fwd_auto = self.lowp
        self._slots = {}
        # the two-level forward's knob overrides for this call (`fused_fwd_knobs`; `_fk`)
        self.fk = _NO_OVERRIDES

    def state_index(self, every: int):
        """(number of stored states, first slot of each packed sequence or None) when every
        `every`-th chunk's state is stored (common.state_slots; computed once per plan)."""
        if every == 1:
            return self.NCH, None
        if every not in self._slots:
            self._slots[every] = state_slots(self.cu, self.B, self.T, self.N, self.BT, every)
        return self._slots[every]

    def idx_args(self, x):
        d = _dummy(x)
        return (d if self.cu is None else self.cu, d if self.co is None else self.co,
                d if self.ct is None else self.ct)


def chunk_states(p: Plan, k, v, g, vs, A, h0, store_h=True, every=1, pre=False, out=None):
    """Every chunk's incoming state h [NCH, H, K, V] (storage dtype) and the final states.
    every > 1 (common.H_EVERY): only every `every`-th chunk's state, h [slots, H, K, V] at
    common.state_slot (p.state_index(every) gives the packed batches' first slots). pre (GATE 2,
    common.GLA_PREP): k is gla.intra_prep's k exp2(G_last - Gc) [B, T, H, K], g its G_last.
    out: (h, ht) buffers of those shapes given by the caller (views of its workspace; None:
    allocated here)."""
    m = p.meta
    h, ht = (None, None) if out is None else out
    if h is None:
        if store_h:
            h = k.new_empty((p.state_index(every)[0], p.H, p.K, p.V), dtype=p.hdtype)
        else:
            h = _dummy(k)
    ht = common.poison(k.new_empty((p.N, p.H, p.K, p.V), dtype=torch.float32) if ht is None else ht)
    cu, co, _ = p.idx_args(ht)
    BT, EVERY = p.BT, (every if store_h else 1)
    if (EVERY > 1 and EVERY & (EVERY - 1) == 0 and p.gate < 2 and not pre
            and common.fwd_knob("STATE_COARSE", p.gate, p.fwd_auto)):
        # chunks of every x BT tokens: the stored states are the same ones, at slots
        # n * cdiv(T, every BT) + i (rows) or cor[n] + i (packed: cor is their first-slot table)
        BT, EVERY = BT * every, 1
        if p.varlen:
            co = p.state_index(every)[1]
    BK = m["BK"] if common.STATE_BLOCK_K is None else max(
        16, min(common.STATE_BLOCK_K, next_power_of_2(p.K)))
    BV = m["BV"] if common.STATE_BLOCK_V is None else max(
        16, min(common.STATE_BLOCK_V, next_power_of_2(p.V)))
    grid = (cdiv(p.K, BK), cdiv(p.V, BV), p.N * p.H)
    d = _dummy(ht)
    cor = p.state_index(every)[1]
    _state_kernel[grid](k, v, d if g is None else g, d if vs is None else vs,
                        d if A is None else A, d if h0 is None else h0, h, ht, cu, co,
                        p.T, p.H, p.H if pre else p.HQ, p.K, p.V,
                        GATE=p.gate, G_FROM_VS=A is not None, HAS_VS=vs is not None,
                        HAS_H0=h0 is not None, STORE_H=store_h, IS_VARLEN=p.varlen,
                        BT=BT, BK=BK, BV=BV, DT=m["DT"], IEEE=m["IEEE"],
                        EVERY=EVERY, cor_ptr=d if cor is None else cor,
                        PRE=pre, num_warps=common.STATE_WARPS or (8 if BT >= 256 else 4),
                        num_stages=1 if m["IEEE"] == 1 else (common.STATE_STAGES or 2))
    return h, ht


def _seg(p: Plan):
    """(segment length in tokens, number of segments) of the fused forward (packed batches: the
    upper bound TOK // SEG + N, as `num_chunks`). SEG_CHUNKS x BT, or the plan's own choice
    (`fused_fwd`: common.FUSED_SEG_ROWS)."""
    SEG = p._slots.get("seglen") or _fk(p, "SEG_CHUNKS") * p.BT
    return SEG, num_chunks(p.B, p.T, p.N, SEG, p.varlen)


def _seg_index(p: Plan):
    """(st, so) of a packed batch's segments: `chunk_table` at chunk length SEG (st [NSEG, 2]
    (sequence, local segment), so [N] each sequence's first segment), computed on the device
    once per plan; (None, None) for B rows."""
    if not p.varlen:
        return None, None
    if "seg" not in p._slots:
        SEG, NSEG = _seg(p)
        p._slots["seg"] = chunk_table(p.cu, SEG, NSEG, p.B * p.T)
    return p._slots["seg"]


def _seg_state_pass(p: Plan, k, v, g, vs, A, sin=None, step=None):
    """`_state_kernel` over segments (SEG). sin None: stage 1 of the fused forward, each segment's
    end state from zero -> (hs [NSEG, H, K, V] f32, gs [NSEG, H] f32 (GATE 1) or a dummy); sin
    given (the incoming state of each segment): every chunk's state h from it -> (h, None).
    step (stage 1 only): tokens per step of the walk (a power-of-two multiple of the chunk
    dividing SEG; None: the chunk)."""
    m = p.meta
    SEG, NSEG = _seg(p)
    BT = p.BT if step is None else step
    d = _dummy(v)
    if sin is None:
        if p.gate == 1:   # one allocation for both (they die with the call)
            hs, gs = map(common.poison, common.workspace(
                k, (((NSEG, p.H, p.K, p.V), torch.float32), ((NSEG, p.H), torch.float32))))
        else:
            hs = common.poison(k.new_empty((NSEG, p.H, p.K, p.V), dtype=torch.float32))
            gs = _dummy(hs)
        h = d
    else:
        hs = gs = None
        h = k.new_empty((p.NCH, p.H, p.K, p.V), dtype=p.hdtype)
    st, _ = _seg_index(p)
    assert st is None or sin is None, "the per-chunk pass over segments is for B rows"
    _state_kernel[(cdiv(p.K, m["BK"]), cdiv(p.V, m["BV"]), NSEG * p.H)](
        k, v, d if g is None else g, d if vs is None else vs, d if A is None else A,
        d if sin is None else sin, h, d if hs is None else hs,
        d if st is None else p.cu, d if st is None else st, p.T, p.H, p.HQ, p.K, p.V,
        GATE=p.gate, G_FROM_VS=A is not None, HAS_VS=vs is not None, HAS_H0=sin is not None,
        STORE_H=sin is not None, IS_VARLEN=st is not None, BT=BT, BK=m["BK"], BV=m["BV"],
        DT=m["DT"],
        IEEE=m["IEEE"], SEG=SEG, gs_ptr=d if gs is None else gs, STORE_HT=sin is None,
        num_warps=8 if BT >= 256 else 4,
        num_stages=1 if m["IEEE"] == 1 else (_fk(p, "FUSED_S1_STAGES") if step else 2))
    return (hs, gs) if sin is None else (h, None)


def seg_states(p: Plan, k, v, g, vs, A, step=None):
    """Fused forward stage 1: every segment's end state from a zero state, hs [NSEG, H, K, V] f32,
    and (GATE 1) its total log2-decay gs [NSEG, H] f32 (else a dummy). step: see _seg_state_pass
    (the backward's SEG_BWD recompute keeps the chunk)."""
    return _seg_state_pass(p, k, v, g, vs, A, step=step)


def _s1_step(p: Plan):
    """Stage 1's step for the fused forward (common.FUSED_S1_STEP): a power-of-two multiple of the
    chunk dividing the segment, 16-bit inputs only (float32's FMA dots keep the chunk)."""
    SEG, _ = _seg(p)
    s = _fk(p, "FUSED_S1_STEP")
    if not s or not p.lowp or s & (s - 1) or s <= p.BT:
        return None
    s = min(s, SEG)
    return s if SEG % s == 0 else None


def seg_scan(p: Plan, hs, gs, h0, reverse=False):
    """Fused forward stage 2: (sin [NSEG, H, K, V] the state entering each segment, ht).
    reverse: the state-gradient combine (segments last to first; h0 = dht, ht = dh0)."""
    m = p.meta
    SEG, _ = _seg(p)
    d = _dummy(hs)
    sin = common.poison(torch.empty_like(hs))
    ht = common.poison(hs.new_empty((p.N, p.H, p.K, p.V)))
    _, so = _seg_index(p)
    assert so is None or not reverse, "the reverse segment scan is for B rows"
    _seg_scan_kernel[(cdiv(p.K, m["BK"]), cdiv(p.V, m["BV"]), p.N * p.H)](
        hs, gs, d if h0 is None else h0, sin, ht, p.T, p.H, p.K, p.V,
        GATE=p.gate, HAS_H0=h0 is not None, SEG=SEG, BK=m["BK"], BV=m["BV"], REVERSE=reverse,
        IS_VARLEN=so is not None, cu_ptr=d if so is None else p.cu, so_ptr=d if so is None else so,
        num_warps=4)
    return sin, ht


def seg_chunk_states(p: Plan, k, v, g, vs, A, h0):
    """`chunk_states` (h only) in segments (the backward's recompute with SEG_BWD; B rows, GATE
    0/1): stage 1 (`seg_states`) every segment's end state from zero, stage 2 (`seg_scan`) the
    state entering each segment, stage 3 `_state_kernel` with SEG and STORE_H: each segment's
    chunks from its incoming state, storing h. Serial chain SEG_CHUNKS + segments per row +
    SEG_CHUNKS (was T / BT); k, v read twice. Returns (h [NCH, H, K, V] storage dtype, gs the
    segments' log2-decays (GATE 1, else a dummy) for the reverse scan)."""
    hs, gs = seg_states(p, k, v, g, vs, A)
    sin, _ = seg_scan(p, hs, gs, h0)
    return _seg_state_pass(p, k, v, g, vs, A, sin)[0], gs


def fused_output(p: Plan, q, k, v, g, vs, A, sin, scale, D=None, z=None, h0=None, ht=None,
                 gs=None):
    """Fused forward stage 3: o from the segments' incoming states sin (state kept in registers).
    ht given: sin holds stage 1's segment end states, the kernel combines them itself (LOOKBACK,
    no stage 2) and writes the final states to ht."""
    m = p.meta
    SEG, NSEG = _seg(p)
    d = _dummy(sin)
    o = common.poison(torch.empty_like(v))
    lb = {} if ht is None else dict(LOOKBACK=True, gs_ptr=d if gs is None else gs,
                                     h0_ptr=d if h0 is None else h0, ht_ptr=ht,
                                     HAS_H0=h0 is not None)
    BV = max(16, min(_fk(p, "FUSED_BLOCK_V"), next_power_of_2(p.V)))
    vf = bool(_fk(p, "FUSED_V_FIRST"))
    st, _ = _seg_index(p)
    assert st is None or ht is None, "LOOKBACK is for B rows (packed batches take stage 2)"
    if st is not None:
        lb.update(IS_VARLEN=True, st_ptr=st, cu_ptr=p.cu)
    elif _takes_tma(p, (q, k, v, o), BV):
        from triton.tools.tensor_descriptor import TensorDescriptor
        TOK, BK = p.B * p.T, m["BKF"]
        lb.update(TMA=True, qd=TensorDescriptor(q, [TOK, p.HQ * p.K], [p.HQ * p.K, 1], [p.BT, BK]),
                  kd=TensorDescriptor(k, [TOK, p.HQ * p.K], [p.HQ * p.K, 1], [p.BT, BK]),
                  vd=TensorDescriptor(v, [TOK, p.H * p.V], [p.H * p.V, 1], [p.BT, BV]),
                  od=TensorDescriptor(o, [TOK, p.H * p.V], [p.H * p.V, 1], [p.BT, BV]))
    # descriptor arguments are not launch-cache keys (TensorDescriptor is unhashable): Triton's
    # own launch path for the TMA form
    kern = _fused_fwd_kernel.fn if lb.get("TMA") else _fused_fwd_kernel
    kern[(cdiv(p.V, BV), p.H, NSEG) if vf else (p.H, NSEG, cdiv(p.V, BV))](
        q, k, v, d if g is None else g, d if vs is None else vs, d if A is None else A, sin,
        d if D is None else D, d if z is None else z, o,
        p.T, p.H, p.HQ, p.K, p.V, float(scale),
        GATE=p.gate, G_FROM_VS=A is not None, HAS_VS=vs is not None, HAS_D=D is not None,
        HAS_Z=z is not None, SEG=SEG, BT=p.BT, BK=m["BKF"], BV=BV, DT=m["DT"], IEEE=m["IEEE"],
        I32_OFFS=bool(_fk(p, "FUSED_I32_OFFSETS")), V_FIRST=vf, **lb,
        num_warps=_fk(p, "FUSED_WARPS"), num_stages=_fk(p, "FUSED_STAGES"))
    return o


def _takes_tma(p: Plan, ts, BV: int) -> bool:
    """Whether stage 3 loads q, k, v and stores o through tensor descriptors (common.FUSED_TMA):
    16-bit B rows whose chunks never straddle two rows (T % BT == 0: a 2-d descriptor's box only
    zero-fills past the last token), K a power of two (the box is K wide and must not reach the
    next head's columns), V a multiple of BV, 16-byte aligned bases and row strides."""
    return (bool(_fk(p, "FUSED_TMA")) and p.lowp and not p.varlen and p.T % p.BT == 0
            and p.K == p.meta["BKF"] and p.V % BV == 0 and (p.HQ * p.K) % 8 == 0
            and (p.H * p.V) % 8 == 0 and p.B * p.T < 2 ** 31
            and all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in ts))


def fused_segments(p: Plan) -> int:
    """The fused forward's segment length for this plan: SEG_CHUNKS x BT, for B rows doubled
    until a row has at most common.FUSED_SEG_ROWS segments (kept on the plan, so `_seg` sees it;
    the backward's SEG_BWD passes build their own plan)."""
    rows = _fk(p, "FUSED_SEG_ROWS")
    if rows and not p.varlen:
        SEG = _fk(p, "SEG_CHUNKS") * p.BT
        while cdiv(p.T, SEG) > rows:
            SEG *= 2
        p._slots["seglen"] = SEG
    return _seg(p)[0]


def fused_fwd(p: Plan, q, k, v, g, vs, A, h0, scale, D=None, z=None):
    """The forward of GATE 0/1 without per-chunk states in memory (B rows or packed batches):
    stage 1 `_state_kernel` per segment from zero, stage 2 `_seg_scan_kernel`, stage 3
    `_fused_fwd_kernel` (B rows of at most LOOKBACK_SEGS segments: stage 3 sums the earlier
    segments' states itself; packed batches always take stage 2, which also gives an empty
    sequence its final state h0). Bytes: k, v read twice, q and o once, segment states
    2-4 x NSEG x H x K x V x 4 B."""
    fused_segments(p)
    hs, gs = seg_states(p, k, v, g, vs, A, step=_s1_step(p))
    if not p.varlen and cdiv(p.T, _seg(p)[0]) <= _fk(p, "LOOKBACK_SEGS"):
        ht = common.poison(hs.new_empty((p.N, p.H, p.K, p.V)))
        return fused_output(p, q, k, v, g, vs, A, hs, scale, D, z, h0, ht, gs), ht
    sin, ht = seg_scan(p, hs, gs, h0)
    return fused_output(p, q, k, v, g, vs, A, sin, scale, D, z), ht


def fused_fwd_knobs(gate: int, varlen: bool, dtype: torch.dtype, T, ssd: bool = False):
    """Which forward `chunk_fwd_keep` takes, from metadata only (`saved_layout` asks the same):
    None the per-chunk-state path; else the two-level forward (no per-chunk states in memory) with
    these overrides of common's FUSED_* knobs. common.FUSED_FWD 1 (16-bit) / 2 (float32 too):
    every call, no overrides; else common.FUSED_FWD_MIN_T: 16-bit B rows of gate 0 / 1 (SSD:
    ssd, key "ssd") at least as long as that key's T, with common.FUSED_LONG."""
    if gate >= 2:
        return None
    if common.FUSED_FWD:
        return _NO_OVERRIDES if (dtype != torch.float32 or common.FUSED_FWD == 2) else None
    rule = common.FUSED_FWD_MIN_T
    if rule is None or varlen or dtype == torch.float32:
        return None
    least = rule.get("ssd" if ssd else gate)
    if least is None or T < least:
        return None
    kn = common.FUSED_LONG or {}
    bad = set(kn) - common.FUSED_LONG_KNOBS
    if bad:
        raise ValueError(f"common.FUSED_LONG sets {sorted(bad)}: not two-level forward knobs "
                         f"({sorted(common.FUSED_LONG_KNOBS)})")
    return MappingProxyType(dict(kn))


def saved_layout(q, v, g, cu_seqlens, g_from_vs: bool, save: bool):
    """What `chunk_fwd_keep` keeps for the backward (common.SAVE_STATES), from metadata only (the
    registered ops' fake implementations call it too): (shape of h [NCH, H, K, V] or None, whether
    Gc is kept). Nothing when save is False (no gradient needed), when the backward's chunk length
    differs (BWD_CHUNK), and no h on the fused forward path (it has none) or when the backward
    would recompute h in segments anyway (SEG_BWD 2: its reverse scan needs stage 1's gs)."""
    if not save or not common.SAVE_STATES:
        return None, False
    B, T, _, K = q.shape
    V = v.shape[3]
    gate = 1 if g_from_vs else (0 if g is None else (1 if g.dim() == 3 else 2))
    BT = blocks(K, V, gate, q.dtype)["BT"]
    if common.BWD_CHUNK is not None and blocks(K, V, gate, q.dtype, common.BWD_CHUNK)["BT"] != BT:
        return None, False
    gc = gate == 2
    varlen = cu_seqlens is not None
    seg = common.SEG_BWD if (gate < 2 and not varlen) else 0
    if seg < 0:
        seg = 2 if cdiv(T, BT) >= common.SEG_BWD_MIN_CHUNKS else 0
    if (common.SAVE_STATES < 2 or seg >= 2
            or fused_fwd_knobs(gate, varlen, q.dtype, T, g_from_vs) is not None):
        return None, gc
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return (num_chunks(B, T, N, BT, varlen), v.shape[2], K, V), gc


def _scores_early(p, BV: int) -> bool:
    """OUT_SCORES_EARLY if set, else FWD_AUTO's at a V tile of 128 only (see common)."""
    if common.OUT_SCORES_EARLY is not None:
        return bool(common.OUT_SCORES_EARLY)
    return BV >= 128 and bool(common.fwd_knob("OUT_SCORES_EARLY", p.gate, p.fwd_auto))


def chunk_fwd(q, k, v, g, h0, cu_seqlens, scale, vs: Optional[torch.Tensor] = None,
              A: Optional[torch.Tensor] = None, D: Optional[torch.Tensor] = None,
              z: Optional[torch.Tensor] = None):
    """Forward of the engine. q, k [B, T, HQ, K]; v [B, T, H, V] (H a multiple of HQ); g None,
    [B, T, H] or [B, T, H, K] float32 log-decays; vs None or [B, T, H] float32 (v is used as
    v * vs); A None or [H] float32 (then the log-decay is vs * A, SSD); h0 None or [N, H, K, V]
    float32; cu_seqlens None or int [N + 1] (B == 1); D None or [H, V] float32 and z None or
    like v (SSD's epilogue: o = (o + D v) * silu(z), v unscaled). Returns (o [B, T, H, V] in v's
    dtype, final states [N, H, K, V] float32). All contiguous."""
    return chunk_fwd_keep(q, k, v, g, h0, cu_seqlens, scale, vs, A, D, z)[:2]


def chunk_fwd_keep(q, k, v, g, h0, cu_seqlens, scale, vs: Optional[torch.Tensor] = None,
                   A: Optional[torch.Tensor] = None, D: Optional[torch.Tensor] = None,
                   z: Optional[torch.Tensor] = None, save: bool = False):
    """`chunk_fwd` that also returns what the backward can reuse instead of recomputing it:
    (o, ht, h, gc), h [NCH, H, K, V] in the storage dtype (every chunk's incoming state) and gc
    float32 like g (GATE 2: the chunk-local cumsums Gc) as `saved_layout` says (save: a gradient
    will be taken), else empty views (of this call's own buffers: no allocation; the registered
    ops' autograd keeps nothing for an empty one, so no buffer outlives the call)."""
    p = Plan(q, v, g, cu_seqlens, A is not None)
    if save and A is not None:   # SSD training: f+b 1.538 ms with FWD_AUTO vs 1.393 without (H100)
        p.fwd_auto = False
    m = p.meta
    assert p.gate < 2 or (D is None and z is None), "the D / z epilogue is SSD's (GATE 1)"
    keep_h, keep_gc = saved_layout(q, v, g, cu_seqlens, A is not None, save)
    fk = fused_fwd_knobs(p.gate, p.varlen, q.dtype, p.T, A is not None)
    if fk is not None:
        p.fk = fk
        o, ht = fused_fwd(p, q, k, v, g, vs, A, h0, scale, D, z)
        # nothing kept: empty views (h's of a fresh empty, gc's of the f32 dummy: distinct bases)
        return o, ht, ht.new_empty(0, dtype=p.hdtype), _dummy(ht)[:0]
    # every H_EVERY-th chunk's state only, unless the backward keeps them all (GATE 2: with
    # GLA_PREP only, whose pre-decayed rows make the replay's scores plain products)
    pre = p.gate == 2 and gla.use_prep(p)
    every = 1 if (keep_h or (p.gate == 2 and not pre)) else max(
        1, common.fwd_knob("H_EVERY", p.gate, p.fwd_auto))
    if pre:
        # one launch: Gc (every later stage of the backward reads it), q exp2(Gc), k exp2(G_last -
        # Gc), G_last and the scores; the state pass and the output read those
        g, qd, kd, gl, a = gla.intra_prep(p, q, k, g, scale)
        h, ht = chunk_states(p, kd, v, gl, None, None, h0, every=every, pre=True)
    else:
        ws = (None, None)
        if p.gate == 2:
            g = gla.chunk_cumsum(p, g)         # every later stage reads Gc
            if not keep_h and not gla.use_fused_fwd(p):   # h and the scores: one allocation
                ws = common.workspace(q, (((p.NCH, p.H, p.K, p.V), p.hdtype),
                                          ((p.B * p.T, p.H, p.BT), q.dtype)))
        h, ht = chunk_states(p, k, v, g, vs, A, h0, every=every, out=(ws[0], None))
    d = _dummy(ht)
    kept = (h if keep_h else h.view(-1)[:0],
            g if keep_gc else (g.view(-1)[:0] if p.gate == 2 else d[:0]))
    if p.gate == 2 and gla.use_fused_fwd(p) and not pre:
        return (gla.fwd_output(p, q, k, v, g, h, scale), ht) + kept
    if not pre:
        a = gla.intra_scores(p, q, k, g, scale, a=ws[1]) if p.gate == 2 else d
    o = common.poison(torch.empty_like(v))
    cu, _, ct = p.idx_args(ht)
    obv = None if p.gate == 2 else common.fwd_knob("OUT_BLOCK_V", p.gate, p.fwd_auto)
    BV = m["BVO"] if obv is None else max(16, min(obv, next_power_of_2(p.V)))
    # GATE 0/1: 8 warps for a V tile of 128 (sm_90: 111 registers at 8 warps with DECAY_O)
    warps = common.OUT_WARPS or (8 if p.gate < 2 and BV >= 128 else 4)
    cor = p.state_index(every)[1]
    qa, ka, ga = (qd, kd, gl) if pre else (q, k, g)
    _output_kernel[(cdiv(p.V, BV), p.NCH, p.H)](
        qa, ka, v, d if ga is None else ga, d if vs is None else vs, d if A is None else A, h, a, o,
        ct, cu, p.T, p.NT, p.H, p.H if pre else p.HQ, p.K, p.V, float(scale),
        GATE=p.gate, G_FROM_VS=A is not None, HAS_VS=vs is not None, IS_VARLEN=p.varlen,
        BT=p.BT, BK=m["BK"], BV=BV, DT=m["DT"], IEEE=m["IEEE"],
        D_ptr=d if D is None else D, z_ptr=d if z is None else z, HAS_D=D is not None,
        HAS_Z=z is not None, EVERY=every, cor_ptr=d if cor is None else cor,
        DECAY_O=p.gate < 2 and bool(common.fwd_knob("OUT_DECAY_O", p.gate, p.fwd_auto)), PRE=pre,
        SCORES_EARLY=every > 1 and p.gate < 2 and _scores_early(p, BV),
        num_warps=warps, num_stages=1 if m["IEEE"] == 1 else 2)
    return (o, ht) + kept
