"""Backward stages of the chunked engine (layout and conventions: see common.py).

    chunk_states        (fwd.py) recomputes the incoming state h of every chunk
    _state_grad_kernel  reverse scan per (K-tile, V-tile, sequence x head): dh_c, the gradient of
                        the state at the end of chunk c; dS <- exp(G_last) dS + scale (q exp(G))^T do;
                        and dh0
    _dv_kernel          parallel over (V-tiles, chunks, heads):
                        dv_j = (k_j exp(G_last - G_j)) dh + sum_{i >= j} A_ij do_i
                        (SSD, v = x * vs: dx = dv vs and dvs = sum_v dv x)
    _dqk_kernel         (GATE 0/1; GATE 2: gla._dqkg_kernel) parallel over (chunks, query/key
                        heads), whole K per program, looping over
                        the value heads of its group and V-tiles (no partial buffers):
                        dq_i = scale [exp(G_i) (do_i h^T) + sum_{j<=i} D_ij k_j exp(G_i - G_j)]
                        dk_j = exp(G_last - G_j) (v_j dh^T) + scale sum_{i>=j} D_ij q_i exp(G_i - G_j)
                        with D = do v^T, and the log-decay gradient
                        dg_t = sum_{s >= t in the chunk} (q_s . dq_s - k_s . dk_s) + r_c,
                        r_c = sum dh (.) S_end = exp(G_last) sum(h (.) dh) + sum_j k_j . dk_state_j
                        (the gradient of everything after the chunk, exact: rounding errors of
                        dq, dk never travel past a chunk).
Deterministic: no atomics, every output element written by one program.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import common, gla
from .common import (causal_decay, causal_decay_t, chunk_span, decay_rows, decay_state,
                     decay_to_end, decay_to_end_t, l2norm_rows, last_row, load_h_dh, load_rows,
                     load_v, log_decay_cumsum, mm, mm_wy, row_span_base)
from .fwd import Plan, _dummy, _seg, chunk_states, seg_chunk_states, seg_scan
from .._launch import cdiv, next_power_of_2, fast_kernel


@triton.jit
def _state_grad_kernel(
    # q [TOK, HQ, K]; do [TOK, H, V]; g; vs; A [H]; dht [N, H, K, V] f32;
    # outputs dh [NCH, H, K, V], dh0 [N, H, K, V] f32
    q_ptr, do_ptr, g_ptr, vs_ptr, A_ptr, dht_ptr, dh_ptr, dh0_ptr, cu_ptr, co_ptr,
    T, H, HQ, K, V, scale,
    GATE: tl.constexpr, G_FROM_VS: tl.constexpr, HAS_DHT: tl.constexpr, IS_VARLEN: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr,
    STORE_DH: tl.constexpr = True,   # False: dh0 only (context parallelism's adjoint summary)
    # delta rule (delta_rule/chunk.py; BK >= K): k [TOK, HQ, K], w [TOK, H, K], dvl [TOK, H, V]
    # the output part of dv_new (_dv_kernel without dh); per chunk dv_new = dvl + (k e^(G_last-G)) dS
    # is stored to dvn [TOK, H, V] and dS gains - w^T dv_new; L2NORM: q, k normalised in-kernel
    k_ptr=None, w_ptr=None, dvl_ptr=None, dvn_ptr=None, DELTA: tl.constexpr = False,
    L2NORM: tl.constexpr = False, WF32: tl.constexpr = False,
    # SEG > 0 (`seg_state_grads`, B rows): "sequences" are segments of SEG tokens; dht [NSEG, H,
    # K, V] is the adjoint entering each segment from its end, dh0 [NSEG, H, K, V] gets each
    # segment's start adjoint; STORE_DH0=False skips that store
    SEG: tl.constexpr = 0, STORE_DH0: tl.constexpr = True,
):
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    i_hq = i_h // (H // HQ)
    bos, eos, base = row_span_base(i_n, cu_ptr, co_ptr, T, IS_VARLEN, BT, SEG)
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_s = m_k[:, None] & m_v[None, :]
    p_s = o_k[:, None] * V + o_v[None, :]
    if HAS_DHT:
        dS = tl.load(dht_ptr + i_nh.to(tl.int64) * K * V + p_s, mask=m_s, other=0.).to(tl.float32)
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)
    n_c = tl.cdiv(eos - bos, BT)
    for j in range(n_c):
        i = n_c - 1 - j
        if STORE_DH:
            tl.store(dh_ptr + ((base + i) * H + i_h) * K * V + p_s,
                     dS.to(dh_ptr.dtype.element_ty), mask=m_s)
        t = bos + i * BT + o_t
        m_t = t < eos
        b_q = load_rows(q_ptr, t * HQ + i_hq, m_t, o_k, m_k, K)
        b_do = load_rows(do_ptr, t * H + i_h, m_t, o_v, m_v, V)
        G = log_decay_cumsum(g_ptr, vs_ptr, A_ptr, t * H + i_h, i_h, m_t, o_k, m_k, K, GATE,
                             G_FROM_VS, BT)
        G_last = last_row(G, o_t, GATE, BT)
        if L2NORM:
            b_q = l2norm_rows(b_q)
        if DELTA:
            b_k = load_rows(k_ptr, t * HQ + i_hq, m_t, o_k, m_k, K)
            if L2NORM:
                b_k = l2norm_rows(b_k)
            b_dvn = (load_rows(dvl_ptr, t * H + i_h, m_t, o_v, m_v, V)
                     + mm_wy(decay_to_end(b_k, G, G_last, GATE), dS, WF32, DT, IEEE))
            tl.store(dvn_ptr + (t * H + i_h)[:, None] * V + o_v[None, :],
                     b_dvn.to(dvn_ptr.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])
            b_w = load_rows(w_ptr, t * H + i_h, m_t, o_k, m_k, K)
            dSw = mm_wy(tl.trans(b_w), b_dvn, WF32, DT, IEEE)
        dS = (decay_state(dS, G_last, GATE)
              + mm(tl.trans(decay_rows(b_q, G, GATE)), b_do, DT, IEEE) * scale)
        if DELTA:
            dS -= dSw
    if STORE_DH0:
        tl.store(dh0_ptr + i_nh.to(tl.int64) * K * V + p_s, dS, mask=m_s)


@triton.jit
def _dv_kernel(
    # q, k [TOK, HQ, K]; v (SSD: x) [TOK, H, V]; do; g (GATE 2: Gc); vs; A; dh [NCH, H, K, V];
    # a [TOK, H, BT] (GATE 2 scores); outputs dv (SSD: dx) [TOK, H, V], dvs [TOK, H] f32 (HAS_VS)
    q_ptr, k_ptr, v_ptr, do_ptr, g_ptr, vs_ptr, A_ptr, dh_ptr, a_ptr, dv_ptr, dvs_ptr, ct_ptr,
    cu_ptr, T, NT, H, HQ, K, V, scale,
    GATE: tl.constexpr, G_FROM_VS: tl.constexpr, HAS_VS: tl.constexpr, IS_VARLEN: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr,
    HAS_DH: tl.constexpr = True,    # False: only the intra-chunk part (the delta rule's dv_local)
    L2NORM: tl.constexpr = False,   # q, k rows L2-normalised (row scales after the K loop)
    # SSD's skip y += D x (HAS_VS): D [H, V] f32; dx gains do D; dD_ptr [NCH, H, V] f32 gets the
    # chunk's partial sum of do x (summed over chunks by the caller: deterministic)
    D_ptr=None, dD_ptr=None, HAS_D: tl.constexpr = False,
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
    if L2NORM:
        nq = tl.zeros([BT], dtype=tl.float32)
        nk = tl.zeros([BT], dtype=tl.float32)
    row_q = t * HQ + i_hq
    row = t * H + i_h
    p_dh = dh_ptr + (i_c.to(tl.int64) * H + i_h) * K * V
    G = log_decay_cumsum(g_ptr, vs_ptr, A_ptr, row, i_h, m_t, o_t, m_t, K, GATE if GATE < 2 else 0,
                         G_FROM_VS, BT)
    G_last = last_row(G, o_t, GATE if GATE < 2 else 0, BT)
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_k = load_rows(k_ptr, row_q, m_t, o_k, m_k, K)
        if HAS_DH:
            b_dh = tl.load(p_dh + o_k[:, None] * V + o_v[None, :],
                           mask=(o_k < Kc)[:, None] & m_v[None, :], other=0.)
        if GATE == 2:
            Gk = log_decay_cumsum(g_ptr, g_ptr, g_ptr, row, i_h, m_t, o_k, m_k, K, 2, False, BT)
            b_dv += mm(decay_to_end(b_k, Gk, last_row(Gk, o_t, 2, BT), 2), b_dh, DT, IEEE)
        else:
            if HAS_DH:
                b_dv += mm(decay_to_end(b_k, G, G_last, GATE), b_dh, DT, IEEE)
            b_qq = load_rows(q_ptr, row_q, m_t, o_k, m_k, K)
            A += mm(b_k, tl.trans(b_qq), DT, IEEE)  # A^T
            if L2NORM:
                nq += tl.sum(b_qq * b_qq, axis=1)
                nk += tl.sum(b_k * b_k, axis=1)
    if L2NORM:
        r_k = 1. / tl.sqrt(nk + 1e-6)
        b_dv = b_dv * r_k[:, None]
        A = A * (r_k[:, None] * (1. / tl.sqrt(nq + 1e-6))[None, :])
    b_do = load_rows(do_ptr, row, m_t, o_v, m_v, V)
    if GATE == 2:
        A = tl.load(a_ptr + row[:, None] * BT + o_t[None, :], mask=m_t[:, None], other=0.)
        b_dv += mm(tl.trans(A), b_do, DT, IEEE)  # a loaded tile: transposing it is safe
    else:  # scores built transposed: no dot result is transposed into a dot (causal_decay_t)
        b_dv += mm(causal_decay_t(A, G, o_t, GATE) * scale, b_do, DT, IEEE)
    m_o = m_t[:, None] & m_v[None, :]
    if HAS_VS:
        # v = x * vs: dx = dv * vs, dvs = sum_v dv * x (one V tile covers all of V)
        b_x = load_rows(v_ptr, row, m_t, o_v, m_v, V)
        b_vs = tl.load(vs_ptr + row, mask=m_t, other=0.)
        b_dx = b_dv * b_vs[:, None]
        if HAS_D:
            b_dx += b_do * tl.load(D_ptr + i_h * V + o_v, mask=m_v, other=0.)[None, :]
            tl.store(dD_ptr + (i_c.to(tl.int64) * H + i_h) * V + o_v, tl.sum(b_do * b_x, axis=0),
                     mask=m_v)
        tl.store(dv_ptr + row[:, None] * V + o_v[None, :], b_dx.to(dv_ptr.dtype.element_ty),
                 mask=m_o)
        tl.store(dvs_ptr + row, tl.sum(b_dv * b_x, axis=1), mask=m_t)
    else:
        tl.store(dv_ptr + row[:, None] * V + o_v[None, :], b_dv.to(dv_ptr.dtype.element_ty),
                 mask=m_o)


@triton.jit
def _score_dg(q_ptr, k_ptr, row_q, m_t, o_k, m_k, K, Ms, r_q, r_k, L2NORM: tl.constexpr,
              DT: tl.constexpr, IEEE: tl.constexpr):
    """The scores' part of the log-decay gradient per row, rowsum(M) - colsum(M) with
    M = Ms . (q k^T) (Ms [BT, BT] float32, e.g. scale * causal(dO v^T) e^(G_i - G_j)): q and k^T
    loaded in the input dtype (exact dot operands, float32 accumulation), the L2 norms (r_q,
    r_k, unused without L2NORM) as row/column scales. k^T is loaded transposed: no dot consumes
    a transposed dot result."""
    b_q = tl.load(q_ptr + row_q[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                  other=0.)
    b_kT = tl.load(k_ptr + row_q[None, :] * K + o_k[:, None], mask=m_k[:, None] & m_t[None, :],
                   other=0.)
    return score_dg_tiles(b_q, b_kT, Ms, r_q, r_k, L2NORM, DT, IEEE)


@triton.jit
def score_dg_tiles(b_q, b_kT, Ms, r_q, r_k, L2NORM: tl.constexpr, DT: tl.constexpr,
                   IEEE: tl.constexpr):
    """`_score_dg` from q [BT, BK] and k^T [BK, BT] already loaded (input dtype)."""
    M = Ms * mm(b_q, b_kT, DT, IEEE)
    if L2NORM:
        M = M * (r_q[:, None] * r_k[None, :])
    return tl.sum(M, axis=1) - tl.sum(M, axis=0)


@triton.jit
def _dqk_kernel(
    # GATE 0/1 only. q, k [TOK, HQ, K]; v [TOK, H, V]; do; g; vs; A; h, dh [NCH, H, K, V];
    # outputs dq, dk [TOK, HQ, K], dg [TOK, H] f32
    q_ptr, k_ptr, v_ptr, do_ptr, g_ptr, vs_ptr, A_ptr, h_ptr, dh_ptr, dq_ptr, dk_ptr, dg_ptr,
    ct_ptr, cu_ptr, T, NT, H, HQ, K, V, scale,
    GATE: tl.constexpr, G_FROM_VS: tl.constexpr, HAS_VS: tl.constexpr, IS_VARLEN: tl.constexpr,
    BT: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr,
    IEEE: tl.constexpr,
    # q, k rows L2-normalised in-kernel; dq gets the norm's backward, dk is stored as the gradient
    # of the normalised k (the delta rule's WY stage adds its part and applies the norm's backward)
    L2NORM: tl.constexpr = False,
    # dg's score terms in float32 (fla's form, below); the delta rule's dg needs it, GATE 1 of
    # linear attention and SSD do not (their checks pass the 16-bit form with margin, and the
    # float32 form cost them 0.1-0.25 ms per backward on the H100 at B4 T4096: session 7)
    DG_F32: tl.constexpr = False,
):
    i_c, i_hq = tl.program_id(0), tl.program_id(1)
    t0, eos = chunk_span(i_c, ct_ptr, cu_ptr, T, NT, IS_VARLEN, BT)
    o_t = tl.arange(0, BT)
    t = t0 + o_t
    m_t = t < eos
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    Kc = tl.where(t0 < eos, K, 0)          # surplus chunk programs read no state
    row_q = t * HQ + i_hq
    b_q = load_rows(q_ptr, row_q, m_t, o_k, m_k, K)
    b_k = load_rows(k_ptr, row_q, m_t, o_k, m_k, K)
    if L2NORM:
        r_q = 1. / tl.sqrt(tl.sum(b_q * b_q, axis=1) + 1e-6)
        r_k = 1. / tl.sqrt(tl.sum(b_k * b_k, axis=1) + 1e-6)
        b_q = b_q * r_q[:, None]
        b_k = b_k * r_k[:, None]
    else:
        r_q = tl.full([BT], 1., tl.float32)   # (unused)
        r_k = r_q
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dkT = tl.zeros([BK, BT], dtype=tl.float32)
    b_kT = tl.trans(b_k)
    b_qT = tl.trans(b_q)
    GR = H // HQ
    for j in range(GR):
        i_h = i_hq * GR + j
        row = t * H + i_h
        p_h = (i_c.to(tl.int64) * H + i_h) * K * V
        G = log_decay_cumsum(g_ptr, vs_ptr, A_ptr, row, i_h, m_t, o_k, m_k, K, GATE, G_FROM_VS, BT)
        G_last = last_row(G, o_t, GATE, BT)
        D = tl.zeros([BT, BT], dtype=tl.float32)
        dqi = tl.zeros([BT, BK], dtype=tl.float32)
        dkiT = tl.zeros([BK, BT], dtype=tl.float32)
        hdh = tl.zeros([BK], dtype=tl.float32)
        for i_v in range(tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < V
            m_s = (o_k < Kc)[:, None] & m_v[None, :]
            b_v = load_v(v_ptr, vs_ptr, row, m_t, o_v, m_v, V, HAS_VS)
            b_do = load_rows(do_ptr, row, m_t, o_v, m_v, V)
            b_h, b_dh = load_h_dh(h_ptr, dh_ptr, p_h, o_k, o_v, m_s, V)
            D += mm(b_do, tl.trans(b_v), DT, IEEE)
            dqi += mm(b_do, tl.trans(b_h), DT, IEEE)
            dkiT += mm(b_dh, tl.trans(b_v), DT, IEEE)
            if GATE > 0:
                hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), axis=1)
        # dk is built transposed, dk^T = decay(dh v^T) + scale q^T Dm, from the same masked
        # scores Dm as dq: no second score matmul, and no dot on a transposed dot result
        # (with dk = v dh^T + Dm^T q, dk came out 26-33% off at BT=64 on the H200 under
        # Triton 3.6 while right in the interpreter and at BT=32)
        Dm = causal_decay(D, G, o_t, GATE)
        if GATE == 1 and DG_F32:
            # dg from the state terms and, as fla does, the scores' terms as the row minus the
            # column sums of M = scale Dm . (q^ k^T) in float32: q^ . dq^ - k^ . dk^ would take
            # them through Dm, q^, k^ rounded to 16 bits as dot operands, once in dq^ and once in
            # dk^, whose rounding errors do not cancel in the sum over the chunk (bf16 K=V=128
            # T=1024 on the H100: dg 1.2x its bound, bench/NOTES.md "dg of the chunked delta
            # rule"). q k^T from the stored (exact) 16-bit rows, the norms as scales; formed
            # first (sm_90: fewest spills of the orders tried)
            xs = _score_dg(q_ptr, k_ptr, row_q, m_t, o_k, m_k, K, Dm * scale, r_q, r_k, L2NORM,
                           DT, IEEE)
        dksT = decay_to_end_t(dkiT, G, G_last, GATE)
        dqs = decay_rows(dqi, G, GATE) * scale
        if GATE == 1 and DG_F32:
            kds = tl.sum(b_kT * dksT, axis=0)
            x = tl.sum(b_q * dqs, axis=1) - kds + xs
            r = tl.exp2(G_last) * tl.sum(hdh, axis=0) + tl.sum(kds, axis=0)
            tl.store(dg_ptr + row, tl.sum(x, axis=0) - tl.cumsum(x, axis=0) + x + r, mask=m_t)
        dq_h = dqs + mm(Dm, b_k, DT, IEEE) * scale
        dk_hT = dksT + mm(b_qT, Dm, DT, IEEE) * scale
        if GATE == 1 and not DG_F32:
            # the scores' terms through dq^, dk^ (the session-6 form: no second q k^T)
            x = tl.sum(b_q * dq_h, axis=1) - tl.sum(b_kT * dk_hT, axis=0)
            r = tl.exp2(G_last) * tl.sum(hdh, axis=0) + tl.sum(tl.sum(b_kT * dksT, axis=0), axis=0)
            tl.store(dg_ptr + row, tl.sum(x, axis=0) - tl.cumsum(x, axis=0) + x + r, mask=m_t)
        b_dkT += dk_hT
        b_dq += dq_h
    m_o = m_t[:, None] & m_k[None, :]
    if L2NORM:
        b_dq = r_q[:, None] * (b_dq - b_q * tl.sum(b_q * b_dq, axis=1)[:, None])
    tl.store(dq_ptr + row_q[:, None] * K + o_k[None, :], b_dq.to(dq_ptr.dtype.element_ty), mask=m_o)
    tl.store(dk_ptr + row_q[None, :] * K + o_k[:, None], b_dkT.to(dk_ptr.dtype.element_ty),
             mask=m_k[:, None] & m_t[None, :])


def seg_state_grads(p: Plan, q, do, g, vs, A, dht, gs, scale):
    """The reverse state-gradient scan in segments (SEG_BWD=2; B rows, GATE 0/1): (1) every
    segment's start adjoint from a zero end adjoint, in parallel (`_state_grad_kernel` SEG,
    dh not stored); (2) `_seg_scan_kernel` REVERSE: the adjoint entering each segment from its
    end (seeded with dht) and dh0; (3) `_state_grad_kernel` SEG from those adjoints, storing dh.
    gs: the segments' log2-decays from `seg_chunk_states`. Returns (dh, dh0)."""
    m = p.meta
    SEG, NSEG = _seg(p)
    d = _dummy(do)
    dh = q.new_empty((p.NCH, p.H, p.K, p.V), dtype=p.hdtype)
    ds = common.poison(q.new_empty((NSEG, p.H, p.K, p.V), dtype=torch.float32))
    grid = (cdiv(p.K, m["BK"]), cdiv(p.V, m["BV"]), NSEG * p.H)
    kw = dict(GATE=p.gate, G_FROM_VS=A is not None, IS_VARLEN=False, BT=p.BT, DT=m["DT"],
              IEEE=m["IEEE"], BK=m["BK"], BV=m["BV"], SEG=SEG, num_warps=4)
    args = (q, do, d if g is None else g, d if vs is None else vs, d if A is None else A)
    _state_grad_kernel[grid](*args, d, d, ds, d, d, p.T, p.H, p.HQ, p.K, p.V, float(scale),
                             HAS_DHT=False, STORE_DH=False, **kw)
    dsin, dh0 = seg_scan(p, ds, gs, dht, reverse=True)
    _state_grad_kernel[grid](*args, dsin, dh, d, d, d, p.T, p.H, p.HQ, p.K, p.V, float(scale),
                             HAS_DHT=True, STORE_DH0=False, **kw)
    return dh, dh0


# launch cache: bind each compiled kernel once per specialisation (ssm_kernels/_launch.py)
_state_grad_kernel = fast_kernel(_state_grad_kernel)
_dv_kernel = fast_kernel(_dv_kernel)
_dqk_kernel = fast_kernel(_dqk_kernel)


def chunk_bwd(q, k, v, g, h0, cu_seqlens, scale, do, dht, vs: Optional[torch.Tensor] = None,
              A: Optional[torch.Tensor] = None, D: Optional[torch.Tensor] = None,
              h: Optional[torch.Tensor] = None, gc: Optional[torch.Tensor] = None):
    """Backward of `chunk_fwd` (same arguments), do [B, T, H, V], dht None or [N, H, K, V] float32.
    Returns (dq, dk, dv in the inputs' dtype, dg float32 like g (SSD: [B, T, H], the gradient of
    the log-decay vs * A) or None, dh0 float32 [N, H, K, V], dvs float32 [B, T, H] or None); with
    vs, dv is the gradient of the unscaled v (x). D ([H, V] float32, with vs; the forward's
    o += D v): dv includes do D and a seventh result dD [H, V] float32 follows.
    h, gc: what `chunk_fwd_keep` kept (None or empty: recomputed here, the same kernels on the
    same inputs, so the results are bitwise those of the recompute). With gc (GATE 2) g is not
    read (only its shape): the callers pass gc in its place."""
    p = Plan(q, v, g, cu_seqlens, A is not None, common.BWD_CHUNK)
    m = p.meta
    d = _dummy(do)
    gg = d if g is None else g
    vsa = d if vs is None else vs
    Aa = d if A is None else A
    if p.gate == 2:                        # every later stage reads Gc
        gg = g = gc if (gc is not None and gc.numel()) else gla.chunk_cumsum(p, g)
    seg = common.SEG_BWD if (p.gate < 2 and not p.varlen) else 0
    if seg < 0:
        seg = 2 if p.NT >= common.SEG_BWD_MIN_CHUNKS else 0
    if h is not None and h.numel() and seg < 2:
        assert h.shape == (p.NCH, p.H, p.K, p.V) and h.dtype == p.hdtype, "saved states mismatch"
    elif seg:
        h, gs = seg_chunk_states(p, k, v, g, vs, A, h0)
    else:
        h, _ = chunk_states(p, k, v, g, vs, A, h0)
    cu, co, ct = p.idx_args(do)
    kw = dict(GATE=p.gate, G_FROM_VS=A is not None, IS_VARLEN=p.varlen, BT=p.BT,
                  DT=m["DT"], IEEE=m["IEEE"])
    if seg >= 2:
        dh, dh0 = seg_state_grads(p, q, do, g, vs, A, dht, gs, scale)
    else:
        dh = q.new_empty((p.NCH, p.H, p.K, p.V), dtype=p.hdtype)
        dh0 = common.poison(q.new_empty((p.N, p.H, p.K, p.V), dtype=torch.float32))
        _state_grad_kernel[(cdiv(p.K, m["BK"]), cdiv(p.V, m["BV"]), p.N * p.H)](
            q, do, gg, vsa, Aa, d if dht is None else dht, dh, dh0, cu, co,
            p.T, p.H, p.HQ, p.K, p.V, float(scale), HAS_DHT=dht is not None, BK=m["BK"],
            BV=m["BV"], num_warps=4, **kw)
    if p.gate == 2 and gla.use_fused_bwd(p):
        dq, dk, dv, dg = gla.bwd_fused(p, q, k, v, do, g, h, dh, scale)
        return dq, dk, dv, dg, dh0, None      # GATE 2 has no vs
    a = gla.intra_scores(p, q, k, g, scale) if p.gate == 2 else d
    dv = common.poison(torch.empty_like(v))
    dvs = None if vs is None else common.poison(torch.empty_like(vs))
    BVd = max(16, next_power_of_2(p.V)) if vs is not None else m["BV"]
    dDp = None if D is None else common.poison(q.new_empty((p.NCH, p.H, p.V), dtype=torch.float32))
    _dv_kernel[(cdiv(p.V, BVd), p.NCH, p.H)](
        q, k, v, do, gg, vsa, Aa, dh, a, dv, d if dvs is None else dvs, ct, cu,
        p.T, p.NT, p.H, p.HQ, p.K, p.V, float(scale), HAS_VS=vs is not None, BK=m["BK"], BV=BVd,
        num_warps=4, D_ptr=D, dD_ptr=dDp, HAS_D=D is not None, **kw)
    if p.gate == 2:
        dq, dk, dg = gla.dqkg(p, q, k, v, do, g, h, dh, scale)
        return dq, dk, dv, dg, dh0, dvs
    dq, dk = common.poison(torch.empty_like(q)), common.poison(torch.empty_like(k))
    dg = None
    if p.gate:
        dg = common.poison(q.new_empty(v.shape[:3], dtype=torch.float32))
    _dqk_kernel[(p.NCH, p.HQ)](
        q, k, v, do, gg, vsa, Aa, h, dh, dq, dk, d if dg is None else dg, ct, cu,
        p.T, p.NT, p.H, p.HQ, p.K, p.V, float(scale), HAS_VS=vs is not None, SUB=m["SUB"],
        BK=m["BKF"], BV=m["BV"], num_warps=8 if m["BKF"] >= 128 else 4, **kw)
    if D is not None:
        return dq, dk, dv, dg, dh0, dvs, dDp.sum(0)
    return dq, dk, dv, dg, dh0, dvs
