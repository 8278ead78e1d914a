"""Delta-rule-only backward kernels (knobs in chunk.py; the engine's kernels stay the default).

`_dqk_delta_kernel` (DQK_DELTA): the engine's `_dqk_kernel` at v := V' specialised to the delta
rule (no vs / SSD branch, the group's value heads unrolled: GR constexpr) with fewer live
registers: q and k are loaded in the input dtype only *after* the V loop (the engine keeps float32
normalised [BT, K] copies of both, and their transposes, live through it: 4 x 32 registers per
thread at 8 warps), and the in-kernel L2 norm enters as row/column scales of the [BT, BT] score
tile instead of scaled [BT, K] tiles. Per chunk x q/k head, for each value head of the group:

    D = dO V'^T,  dqi = dO h^T,  dkiT = dh V'^T            (the V loop: 3 accumulators)
    Dm = causal(D) e^(G_i - G_j)
    dq^ += scale (e^G dqi + (Dm . r_k[None, :]) k)          (dq of the normalised q)
    dk^T += e^(G_last - G) dkiT + scale q^T (Dm . r_q[:, None])   (dk of the normalised k)
    dg (GATE 1): reverse in-chunk cumsum of (q^ . dq^_h - k^ . dk^_h) + e^(G_last) sum(h dh)
                 + sum(k^ . e^(G_last - G) dkiT)

then dq's L2-norm backward; dk stays the gradient of the normalised k (the WY backward adds its
part and applies the norm's backward). k^T and q^T are loaded transposed: no dot consumes a
transposed dot result (the Triton 3.6 wgmma hazard).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..chunk.common import (causal_decay, chunk_span, decay_rows, decay_to_end_t, last_row,
                            load_h_dh, load_rows, log_decay_cumsum, mm)


@triton.jit
def _rnorm(x, axis: tl.constexpr, L2NORM: tl.constexpr):
    """Reciprocal L2 norms of the rows (axis 1) or columns (axis 0) of a tile; 1 without L2NORM."""
    if L2NORM:
        xf = x.to(tl.float32)
        return 1. / tl.sqrt(tl.sum(xf * xf, axis=axis) + 1e-6)
    elif axis == 1:
        return tl.full([x.shape[0]], 1., tl.float32)
    else:
        return tl.full([x.shape[1]], 1., tl.float32)


@triton.jit
def _dqk_delta_head(
    q_ptr, k_ptr, vn_ptr, do_ptr, g_ptr, h_ptr, dh_ptr, dg_ptr, i_c, i_h, row_q, t, m_t, o_t,
    o_k, m_k, Kc, H, K, V, scale,
    GATE: tl.constexpr, L2NORM: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr,
):
    """One value head's dq^ [BT, BK] and dk^T [BK, BT] (stores its dg)."""
    row = t * H + i_h
    p_h = (i_c.to(tl.int64) * H + i_h) * K * V
    G = log_decay_cumsum(g_ptr, g_ptr, g_ptr, row, i_h, m_t, o_k, m_k, K, GATE, False, BT)
    G_last = last_row(G, o_t, GATE, BT)
    D = tl.zeros([BT, BT], dtype=tl.float32)
    dqi = tl.zeros([BT, BK], dtype=tl.float32)
    dkiT = tl.zeros([BK, BT], dtype=tl.float32)
    hdh = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_s = (o_k < Kc)[:, None] & m_v[None, :]
        b_v = tl.load(vn_ptr + row[:, None] * V + o_v[None, :],
                      mask=m_t[:, None] & m_v[None, :], other=0.)
        b_do = tl.load(do_ptr + row[:, None] * V + o_v[None, :],
                       mask=m_t[:, None] & m_v[None, :], other=0.)
        b_h, b_dh = load_h_dh(h_ptr, dh_ptr, p_h, o_k, o_v, m_s, V)
        D += mm(b_do, tl.trans(b_v), DT, IEEE)
        dqi += mm(b_do, tl.trans(b_h), DT, IEEE)
        dkiT += mm(b_dh, tl.trans(b_v), DT, IEEE)
        if GATE > 0:
            hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), axis=1)
    Dm = causal_decay(D, G, o_t, GATE)
    # k rows (input dtype) and their reciprocal norms as the columns of Dm
    m_tk = m_t[:, None] & m_k[None, :]
    b_k = tl.load(k_ptr + row_q[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
    r_k = _rnorm(b_k, 1, L2NORM)
    dq_h = (decay_rows(dqi, G, GATE) + mm(Dm * r_k[None, :], b_k, DT, IEEE)) * scale
    # q^T (loaded transposed) against Dm with the rows scaled by q's reciprocal norms
    m_kt = m_k[:, None] & m_t[None, :]
    b_qT = tl.load(q_ptr + row_q[None, :] * K + o_k[:, None], mask=m_kt, other=0.)
    r_qc = _rnorm(b_qT, 0, L2NORM)
    dksT = decay_to_end_t(dkiT, G, G_last, GATE)
    dk_hT = dksT + mm(b_qT, Dm * r_qc[:, None], DT, IEEE) * scale
    if GATE == 1:
        b_q = load_rows(q_ptr, row_q, m_t, o_k, m_k, K)
        r_q = _rnorm(b_q, 1, L2NORM)
        b_kT = tl.load(k_ptr + row_q[None, :] * K + o_k[:, None], mask=m_kt,
                       other=0.).to(tl.float32)
        r_kc = _rnorm(b_kT, 0, L2NORM)
        x = r_q * tl.sum(b_q * dq_h, axis=1) - r_kc * tl.sum(b_kT * dk_hT, axis=0)
        r = (tl.exp2(G_last) * tl.sum(hdh, axis=0)
             + tl.sum(r_kc * tl.sum(b_kT * dksT, axis=0), axis=0))
        tl.store(dg_ptr + row, tl.sum(x, axis=0) - tl.cumsum(x, axis=0) + x + r, mask=m_t)
    return dq_h, dk_hT


@triton.jit
def _dqk_delta_kernel(
    # q, k [TOK, HQ, K]; vn [TOK, H, V] (V'); do [TOK, H, V]; g [TOK, H] f32; h, dh
    # [NCH, H, K, V]; outputs dq [TOK, HQ, K] (final), dk [TOK, HQ, K] f32 (of the normalised k),
    # dg [TOK, H] f32 (the output and state terms of the log-decay gradient)
    q_ptr, k_ptr, vn_ptr, do_ptr, g_ptr, h_ptr, dh_ptr, dq_ptr, dk_ptr, dg_ptr, ct_ptr, cu_ptr,
    T, NT, H, HQ, K, V, scale,
    GATE: tl.constexpr, L2NORM: tl.constexpr, IS_VARLEN: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr, GR: tl.constexpr,
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
    for j in tl.static_range(GR):
        dq_h, dk_hT = _dqk_delta_head(
            q_ptr, k_ptr, vn_ptr, do_ptr, g_ptr, h_ptr, dh_ptr, dg_ptr, i_c, i_hq * GR + j, row_q,
            t, m_t, o_t, o_k, m_k, Kc, H, K, V, scale, GATE, L2NORM, BT, BK, BV, DT, IEEE)
        if j == 0:
            b_dq, b_dkT = dq_h, dk_hT
        else:
            b_dq += dq_h
            b_dkT += dk_hT
    if L2NORM:
        b_q = load_rows(q_ptr, row_q, m_t, o_k, m_k, K)
        r_q = 1. / tl.sqrt(tl.sum(b_q * b_q, axis=1) + 1e-6)
        b_q = b_q * r_q[:, None]
        b_dq = r_q[:, None] * (b_dq - b_q * tl.sum(b_q * b_dq, axis=1)[:, None])
    tl.store(dq_ptr + row_q[:, None] * K + o_k[None, :], b_dq.to(dq_ptr.dtype.element_ty),
             mask=m_t[:, None] & m_k[None, :])
    tl.store(dk_ptr + row_q[None, :] * K + o_k[:, None], b_dkT.to(dk_ptr.dtype.element_ty),
             mask=m_k[:, None] & m_t[None, :])
