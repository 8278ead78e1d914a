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
                 + sum(k^ . e^(G_last - G) dkiT), the scores' part of q^ . dq^_h - k^ . dk^_h
                 formed as rowsum - colsum of scale Dm . (q^ k^T) (float32 Dm, exact q k^T)

then dq's L2-norm backward; dk stays the gradient of the normalised k (the WY backward adds its
part and applies the norm's backward). k^T and q^T are loaded transposed: no dot consumes a
transposed dot result (the Triton 3.6 wgmma hazard).

`_state_grad_delta_kernel` (SG_DELTA): the reverse state-gradient scan of the delta rule, per
(V tile, sequence x value head), one K tile (BK >= K):

    store dh_c = dS
    dV'_c = dV'_local + (e^(G_last - G) r_k) . (k dS)       (row scales after the product)
    dS <- e^(G_last) dS + q^T ((scale e^G r_q) . dO) - w^T dV'

q and k stay in the input dtype (decays and L2 norms become row scales of the [BT, BV] tiles, not
float32 [BT, K] copies). FUSE_DV (SG_FUSE_DV): dV'_local = causal(k q^T r_k r_q e^(G_i - G_j))^T
scale dO is formed here from the q, k the scan loads anyway (it does not depend on dS, so it is off
the serial chain), instead of by `_dv_kernel` (its launch, q and k re-read, and the float32 dvl
written and read back: ~0.6 GB at B4 T4096 H16). KDS_X2 (SG_KDS_X2, bf16 inputs): k dS as two
bf16 dots against dS's hi and lo parts (k stays in shared memory; tf32 made it a [BT, K] float32
register operand: 64 registers per thread).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..chunk.common import (causal_decay, causal_decay_t, chunk_base, chunk_span, decay_rows,
                            decay_state, decay_to_end_t, last_row, load_h_dh, load_rows,
                            load_state_block,
                            log_decay_cumsum, mm, mm_wy, seq_span)
from ..chunk.bwd import score_dg_tiles
from .._launch import fast_kernel


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
    m_kt = m_k[:, None] & m_t[None, :]
    if GATE == 1:
        # dg from the state terms and the scores' own terms (rowsum - colsum of scale Dm .
        # (q^ k^T) in float32, as the engine's _dqk_kernel and fla do): not through dq^, dk^,
        # whose score parts round Dm to 16 bits twice with errors that do not cancel.
        # k^T in the input dtype (dksT dies into its column sums before dk^T is formed)
        dqs = decay_rows(dqi, G, GATE) * scale
        dksT = decay_to_end_t(dkiT, G, G_last, GATE)
        b_kT = tl.load(k_ptr + row_q[None, :] * K + o_k[:, None], mask=m_kt, other=0.)
        r_kc = _rnorm(b_kT, 0, L2NORM)
        kds = r_kc * tl.sum(b_kT.to(tl.float32) * dksT, axis=0)
        b_q = tl.load(q_ptr + row_q[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
        r_q = _rnorm(b_q, 1, L2NORM)
        x = (r_q * tl.sum(b_q.to(tl.float32) * dqs, axis=1) - kds
             + score_dg_tiles(b_q, b_kT, Dm * scale, r_q, r_kc, L2NORM, DT, IEEE))
        r = tl.exp2(G_last) * tl.sum(hdh, axis=0) + tl.sum(kds, axis=0)
        tl.store(dg_ptr + row, tl.sum(x, axis=0) - tl.cumsum(x, axis=0) + x + r, mask=m_t)
        dq_h = dqs + mm(Dm * r_k[None, :], b_k, DT, IEEE) * scale
        # q^T (loaded transposed) against Dm with the rows scaled by q's reciprocal norms
        b_qT = tl.load(q_ptr + row_q[None, :] * K + o_k[:, None], mask=m_kt, other=0.)
        r_qc = _rnorm(b_qT, 0, L2NORM)
    else:
        dq_h = (decay_rows(dqi, G, GATE) + mm(Dm * r_k[None, :], b_k, DT, IEEE)) * scale
        b_qT = tl.load(q_ptr + row_q[None, :] * K + o_k[:, None], mask=m_kt, other=0.)
        r_qc = _rnorm(b_qT, 0, L2NORM)
        dksT = decay_to_end_t(dkiT, G, G_last, GATE)
    dk_hT = dksT + mm(b_qT, Dm * r_qc[:, None], DT, IEEE) * scale
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


@triton.jit
def _state_grad_delta_kernel(
    # q, k [TOK, HQ, K]; w [TOK, H, K]; do [TOK, H, V]; g [TOK, H] f32; dvl [TOK, H, V] f32
    # (unless FUSE_DV); dht [N, H, K, V] f32; outputs dh [NCH, H, K, V], dh0 [N, H, K, V] f32,
    # dvn [TOK, H, V] (the gradient of V')
    q_ptr, k_ptr, w_ptr, do_ptr, g_ptr, dvl_ptr, dht_ptr, dh_ptr, dh0_ptr, dvn_ptr, cu_ptr,
    co_ptr, T, H, HQ, K, V, scale,
    GATE: tl.constexpr, HAS_DHT: tl.constexpr, IS_VARLEN: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr,
    L2NORM: tl.constexpr, WF32: tl.constexpr, FUSE_DV: tl.constexpr, KDS_X2: tl.constexpr = False,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    i_hq = i_h // (H // HQ)
    bos, eos = seq_span(i_n, cu_ptr, T, IS_VARLEN)
    base = chunk_base(co_ptr, i_n, T, IS_VARLEN, BT)
    o_t, o_k, o_v = tl.arange(0, BT), tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_s, p_s = m_k[:, None] & m_v[None, :], o_k[:, None] * V + o_v[None, :]
    dS = load_state_block(dht_ptr + i_nh.to(tl.int64) * K * V, p_s, m_s, HAS_DHT, BK, BV)
    n_c = tl.cdiv(eos - bos, BT)
    for j in range(n_c):
        i = n_c - 1 - j
        tl.store(dh_ptr + ((base + i) * H + i_h) * K * V + p_s, dS.to(dh_ptr.dtype.element_ty),
                 mask=m_s)
        t = bos + i * BT + o_t
        m_t = t < eos
        row = t * H + i_h
        row_q = t * HQ + i_hq
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        G = log_decay_cumsum(g_ptr, g_ptr, g_ptr, row, i_h, m_t, o_k, m_k, K, GATE, False, BT)
        G_last = last_row(G, o_t, GATE, BT)
        b_k = tl.load(k_ptr + row_q[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
        b_q = tl.load(q_ptr + row_q[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
        b_do = tl.load(do_ptr + row[:, None] * V + o_v[None, :], mask=m_tv, other=0.)
        r_k = _rnorm(b_k, 1, L2NORM)
        r_q = _rnorm(b_q, 1, L2NORM)
        if GATE == 1:
            sk = tl.exp2(G_last - G) * r_k
            sq = tl.exp2(G) * r_q * scale
        else:
            sk = r_k
            sq = r_q * scale
        if FUSE_DV:
            # A^T_ji = k^_j . q^_i e^(G_i - G_j) for i >= j (built transposed, as _dv_kernel)
            At = mm(b_k, tl.trans(b_q), DT, IEEE) * (r_k[:, None] * r_q[None, :])
            b_dvn = mm(causal_decay_t(At, G, o_t, GATE) * scale, b_do, DT, IEEE)
        else:
            b_dvn = load_rows(dvl_ptr, row, m_t, o_v, m_v, V)
        if KDS_X2:
            # k dS as two 16-bit dots against dS = hi + lo (both rounded to DT): k (exact in DT)
            # stays a shared-memory operand instead of a float32 register tile, and the split
            # keeps ~16 bits of dS (tf32: 11)
            dS_hi = dS.to(DT)
            kd = mm(b_k, dS_hi, DT, IEEE) + mm(b_k, (dS - dS_hi.to(tl.float32)).to(DT), DT, IEEE)
        else:
            kd = mm_wy(b_k, dS, WF32, DT, IEEE)
        b_dvn += kd * sk[:, None]
        tl.store(dvn_ptr + row[:, None] * V + o_v[None, :], b_dvn.to(dvn_ptr.dtype.element_ty),
                 mask=m_tv)
        b_w = tl.load(w_ptr + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.)
        dS = (decay_state(dS, G_last, GATE)
              + mm(tl.trans(b_q), b_do * sq[:, None], DT, IEEE)
              - mm_wy(tl.trans(b_w), b_dvn, WF32, DT, IEEE))
    tl.store(dh0_ptr + i_nh.to(tl.int64) * K * V + p_s, dS, mask=m_s)


# launch cache: bind each compiled kernel once per specialisation (ssm_kernels/_launch.py)
_dqk_delta_kernel = fast_kernel(_dqk_delta_kernel)
_state_grad_delta_kernel = fast_kernel(_state_grad_delta_kernel)
