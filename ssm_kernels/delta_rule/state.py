"""The delta rule's state scan with the next chunk's loads in flight (knob `chunk.DSTATE`, default
off; the engine's `_state_kernel` DELTA branch stays the default). bench/NOTES.md, "helper
deltastate8".

`_delta_state_kernel`, one program per (V tile of BV columns, sequence x value head), the whole K
(BK >= K) of a float32 [BK, BV] state S in registers, per chunk:

    h <- S (input dtype);  V' = U - W S (stored, input dtype);  S <- e^(G_last) S + (K e^(G_last - G))^T V'

The arithmetic is the engine's DELTA branch op for op (same loads, same float32 conversions, the
same L2 norm, cumsum, decays and dots in the same order), so h, V' and the final state are
bitwise the default's. What differs is when the loads are issued: PREFETCH 2 loads chunk i + 1's
k (kept in its 16-bit storage dtype), w, u and g rows before chunk i's two dependent dots, so their
DRAM latency overlaps the chain instead of opening every step (the engine issues them at the top
of the step; Triton's pipeliner stages only w, the one load that feeds a dot unchanged, while k,
u and g go through registers). PREFETCH 1 prefetches k, u, g only and loads w in its own step
(run it with num_stages 2 so the pipeliner stages w in shared memory as the engine's does): the
float32 [BT, K] w tile is the one that cost registers (sm_90, Triton 3.6, 8 warps: PREFETCH 2
spills 540 B, bench/NOTES.md). PREFETCH 3 prefetches u and g only (k and w in their step: with KT
the raw k^T tile feeds its dot as loaded, so the pipeliner can stage both). PREFETCH 0 is the
engine's loop (a control).

KT (knob DSTATE_KT; not bitwise: one rounding fewer): k loaded transposed [BK, BT] and kept in its
16-bit storage dtype as the A operand of K^T V', its L2 norm (column sums) and decay folded into
the rows of V' before the dot (fla's form; the engine keeps a float32 [BT, K] copy of k in
registers, normalises, decays and transposes it through shared memory, then rounds it). V' is
stored before the scaling (the output stage's V'), so v_new stays bitwise the default's.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..chunk.common import (chunk_base, decay_state, decay_to_end, l2norm_rows, last_row,
                            load_state_block, mm, mm_wy, seq_span)
from .._launch import fast_kernel


@triton.jit
def mm_lohi(a, b, NSPLIT: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr):
    """a @ b for a 16-bit `a` (an exact operand) and a float32 `b` as NSPLIT 16-bit dots on the
    pieces of b = b_0 + b_1 + ... (`mm_hilo` with the roles swapped; float16: each column of `b`
    scaled by a power of two to at most 1 first, the product's columns scaled back)."""
    if DT == tl.float16:
        bmax = tl.max(tl.abs(b), axis=0)
        s_col = tl.exp2(tl.ceil(tl.log2(tl.maximum(bmax, 1e-30))))
        rest = b * (1. / s_col)[None, :]
    else:
        rest = b
    piece = rest.to(DT)
    acc = mm(a, piece, DT, IEEE)
    for _ in tl.static_range(1, NSPLIT):
        rest = rest - piece.to(tl.float32)
        piece = rest.to(DT)
        if IEEE == 0:
            acc = tl.dot(a, piece, acc)
        else:
            acc += mm(a, piece, DT, IEEE)
    if DT == tl.float16:
        acc = acc * s_col[None, :]
    return acc


@triton.jit
def _load_w(w_ptr, t, m_t, i_h, H, K, o_k, m_k):
    return tl.load(w_ptr + (t * H + i_h)[:, None] * K + o_k[None, :],
                   mask=m_t[:, None] & m_k[None, :], other=0.)


@triton.jit
def _load_k(k_ptr, t, m_t, i_hq, HQ, K, o_k, m_k, KT: tl.constexpr):
    if KT:
        b_k = tl.load(k_ptr + (t * HQ + i_hq)[None, :] * K + o_k[:, None],
                      mask=m_k[:, None] & m_t[None, :], other=0.)
    else:
        b_k = tl.load(k_ptr + (t * HQ + i_hq)[:, None] * K + o_k[None, :],
                      mask=m_t[:, None] & m_k[None, :], other=0.)
    return b_k


@triton.jit
def _load_wt(w_ptr, t, m_t, i_h, H, K, o_k, m_k, o_t, BT: tl.constexpr, SCAN_T: tl.constexpr):
    """The chunk's w [BT, BK] rows, or (SCAN_T) its WY inverse T [BT, BT] (float32, w_ptr = T)."""
    if SCAN_T:
        b_w = _load_w(w_ptr, t, m_t, i_h, H, BT, o_t, o_t < BT)
    else:
        b_w = _load_w(w_ptr, t, m_t, i_h, H, K, o_k, m_k)
    return b_w


@triton.jit
def _chunk_loads(k_ptr, w_ptr, u_ptr, g_ptr, beta_ptr, t, m_t, i_h, i_hq, H, HQ, K, V, o_k, m_k,
                 o_v, m_v, o_t, GATE: tl.constexpr, KT: tl.constexpr, LOAD_W: tl.constexpr,
                 LOAD_K: tl.constexpr, SCAN_T: tl.constexpr, BT: tl.constexpr):
    """The raw tiles of one chunk (storage dtypes): k [BT, BK] (KT: k^T [BK, BT]; LOAD_K),
    w [BT, BK] (LOAD_W; SCAN_T: T [BT, BT]), u [BT, BV] (SCAN_T: v), g [BT], beta [BT] (SCAN_T);
    a 1-element placeholder for a tile not loaded (it is loaded in its own step)."""
    if LOAD_K:
        b_k = _load_k(k_ptr, t, m_t, i_hq, HQ, K, o_k, m_k, KT)
    else:
        b_k = tl.zeros([1], dtype=tl.float32)
    if LOAD_W:
        b_w = _load_wt(w_ptr, t, m_t, i_h, H, K, o_k, m_k, o_t, BT, SCAN_T)
    else:
        b_w = tl.zeros([1], dtype=tl.float32)
    b_u = tl.load(u_ptr + (t * H + i_h)[:, None] * V + o_v[None, :],
                  mask=m_t[:, None] & m_v[None, :], other=0.)
    if GATE == 1:
        b_g = tl.load(g_ptr + t * H + i_h, mask=m_t, other=0.)
    else:
        b_g = tl.zeros_like(t).to(tl.float32)
    if SCAN_T:
        b_b = tl.load(beta_ptr + t * H + i_h, mask=m_t, other=0.)
    else:
        b_b = tl.zeros([1], dtype=tl.float32)
    return b_k, b_w, b_u, b_g, b_b


@triton.jit
def _chunk_G(b_g, GATE: tl.constexpr, BT: tl.constexpr):
    """The chunk's cumulative log2-decay from its start (zeros ungated)."""
    if GATE == 1:
        G = tl.cumsum(b_g.to(tl.float32) * 1.4426950408889634, axis=0)
    else:
        G = tl.zeros([BT], dtype=tl.float32)
    return G


@triton.jit
def _chunk_step(S, b_k, b_w, b_u, b_g, b_b, vn_ptr, t, m_t, i_h, H, V, o_t, o_v, m_v,
                GATE: tl.constexpr, L2NORM: tl.constexpr, WF32: tl.constexpr, BT: tl.constexpr,
                DT: tl.constexpr, IEEE: tl.constexpr, KT: tl.constexpr,
                SCAN_T: tl.constexpr = False, KS_X2: tl.constexpr = False):
    """One chunk of the engine's DELTA branch on loaded tiles: V' stored, S updated. KT: b_k is
    the raw k^T tile, the dot's operand as loaded; its L2 norm and decay scale the rows of V'
    instead (k^T (diag(r e) V') = (diag(r e) k)^T V'). SCAN_T: b_w is the WY inverse T, b_u the
    chunk's v, b_b its beta: V' = T (diag(beta) v - diag(beta e^G) k^ S) (= U - W S). KS_X2
    (SCAN_T): k S as two 16-bit dots of the raw k (exact) against S = hi + lo (`mm_lohi`: ~16 bits
    of S, tf32 keeps 11; no float32 k tile as a dot operand), the L2 norm a row scale after."""
    if SCAN_T:
        G = _chunk_G(b_g, GATE, BT)
        if KT:
            # k^ S from the raw 16-bit k^T (the loaded tile, transposed: not a dot result), the
            # norm as a row scale of the product
            if L2NORM:
                b_kf = b_k.to(tl.float32)
                r_s = 1. / tl.sqrt(tl.sum(b_kf * b_kf, axis=0) + 1e-6)
            else:
                r_s = tl.full([BT], 1., tl.float32)
            if KS_X2:
                kS = mm_lohi(tl.trans(b_k), S, 2, DT, IEEE) * r_s[:, None]
            else:
                kS = mm_wy(tl.trans(b_k), S, WF32, DT, IEEE) * r_s[:, None]
        elif KS_X2:
            kS = mm_lohi(b_k, S, 2, DT, IEEE)
            b_k = b_k.to(tl.float32)
            if L2NORM:
                r_s = 1. / tl.sqrt(tl.sum(b_k * b_k, axis=1) + 1e-6)
                kS = kS * r_s[:, None]
                b_k = b_k * r_s[:, None]
        else:
            b_k = b_k.to(tl.float32)
            if L2NORM:
                b_k = l2norm_rows(b_k)
            kS = mm_wy(b_k, S, WF32, DT, IEEE)
        b_bf = b_b.to(tl.float32)
        if GATE == 1:
            b_be = b_bf * tl.exp2(G)
        else:
            b_be = b_bf
        # the cancellation of U - W S happens here, in float32, before T multiplies it
        Y = b_u.to(tl.float32) * b_bf[:, None] - kS * b_be[:, None]
        b_v = mm_wy(b_w, Y, WF32, DT, IEEE)
        tl.store(vn_ptr + (t * H + i_h)[:, None] * V + o_v[None, :],
                 b_v.to(vn_ptr.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])
    else:
        b_v = b_u.to(tl.float32)
        if not KT:
            b_k = b_k.to(tl.float32)
            if L2NORM:
                b_k = l2norm_rows(b_k)
        b_v = b_v - mm_wy(b_w.to(tl.float32), S, WF32, DT, IEEE)
        tl.store(vn_ptr + (t * H + i_h)[:, None] * V + o_v[None, :],
                 b_v.to(vn_ptr.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])
        G = _chunk_G(b_g, GATE, BT)
    G_last = last_row(G, o_t, GATE, BT)
    if KT:
        r = tl.exp2(G_last - G)
        if L2NORM:
            b_kf = b_k.to(tl.float32)
            r = r / tl.sqrt(tl.sum(b_kf * b_kf, axis=0) + 1e-6)
        KV = mm(b_k, b_v * r[:, None], DT, IEEE)
    else:
        KV = mm(tl.trans(decay_to_end(b_k, G, G_last, GATE)), b_v, DT, IEEE)
    return decay_state(S, G_last, GATE) + KV


@triton.jit
def scan_program(h0_ptr, cu_ptr, co_ptr, T, H, HQ, K, V, HAS_H0: tl.constexpr,
                 IS_VARLEN: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Coordinates of a delta scan program (grid: V tile, sequence x value head) and its initial
    float32 [BK, BV] state: (i_nh, i_h, i_hq, bos, eos, base, o_t, o_k, o_v, m_k, m_v, m_s, p_s,
    S). Shared with fwd.py's `_delta_fwd_kernel`."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    i_hq = i_h // (H // HQ)
    bos, eos = seq_span(i_n, cu_ptr, T, IS_VARLEN)
    base = chunk_base(co_ptr, i_n, T, IS_VARLEN, BT)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_s = m_k[:, None] & m_v[None, :]
    p_s = o_k[:, None] * V + o_v[None, :]
    S = load_state_block(h0_ptr + i_nh.to(tl.int64) * K * V, p_s, m_s, HAS_H0, BK, BV)
    return i_nh, i_h, i_hq, bos, eos, base, o_t, o_k, o_v, m_k, m_v, m_s, p_s, S


@triton.jit
def _delta_state_kernel(
    # k [TOK, HQ, K]; w [TOK, H, K]; u [TOK, H, V]; g [TOK, H] f32; h0 [N, H, K, V] f32;
    # outputs h [NCH, H, K, V] (state before each chunk), vn [TOK, H, V], ht [N, H, K, V] f32;
    # cu [N + 1]; co [N]
    # SCAN_T: w_ptr is the WY inverse T [TOK, H, BT] f32, u_ptr is v [TOK, H, V], beta [TOK, H]
    k_ptr, w_ptr, u_ptr, g_ptr, beta_ptr, h0_ptr, h_ptr, vn_ptr, ht_ptr, cu_ptr, co_ptr,
    T, H, HQ, K, V,
    GATE: tl.constexpr, HAS_H0: tl.constexpr, IS_VARLEN: tl.constexpr, L2NORM: tl.constexpr,
    WF32: tl.constexpr, PREFETCH: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr, KT: tl.constexpr = False,
    SCAN_T: tl.constexpr = False, KS_X2: tl.constexpr = False,
):
    (i_nh, i_h, i_hq, bos, eos, base, o_t, o_k, o_v, m_k, m_v, m_s, p_s,
     S) = scan_program(h0_ptr, cu_ptr, co_ptr, T, H, HQ, K, V, HAS_H0, IS_VARLEN, BT, BK, BV)
    NC = tl.cdiv(eos - bos, BT)
    if PREFETCH:
        t = bos + o_t
        b_k, b_w, b_u, b_g, b_b = _chunk_loads(k_ptr, w_ptr, u_ptr, g_ptr, beta_ptr, t, t < eos,
                                               i_h, i_hq, H, HQ, K, V, o_k, m_k, o_v, m_v, o_t,
                                               GATE, KT, PREFETCH == 2, PREFETCH != 3, SCAN_T,
                                               BT)
        for i in range(NC):
            t = bos + i * BT + o_t
            m_t = t < eos
            # the next chunk's tiles (all masked off past the end) before this chunk's chain
            n_k, n_w, n_u, n_g, n_b = _chunk_loads(k_ptr, w_ptr, u_ptr, g_ptr, beta_ptr, t + BT,
                                                   t + BT < eos, i_h, i_hq, H, HQ, K, V, o_k, m_k,
                                                   o_v, m_v, o_t, GATE, KT, PREFETCH == 2,
                                                   PREFETCH != 3, SCAN_T, BT)
            tl.store(h_ptr + ((base + i) * H + i_h) * K * V + p_s, S.to(h_ptr.dtype.element_ty),
                     mask=m_s)
            if PREFETCH == 2:
                b_wc = b_w
            else:   # this chunk's w here (a load feeding a dot: the pipeliner may stage it)
                b_wc = _load_wt(w_ptr, t, m_t, i_h, H, K, o_k, m_k, o_t, BT, SCAN_T)
            if PREFETCH == 3:   # k in its step too (KT: a load feeding a dot, as w's)
                b_kc = _load_k(k_ptr, t, m_t, i_hq, HQ, K, o_k, m_k, KT)
            else:
                b_kc = b_k
            S = _chunk_step(S, b_kc, b_wc, b_u, b_g, b_b, vn_ptr, t, m_t, i_h, H, V, o_t, o_v,
                            m_v, GATE, L2NORM, WF32, BT, DT, IEEE, KT, SCAN_T, KS_X2)
            b_k, b_w, b_u, b_g, b_b = n_k, n_w, n_u, n_g, n_b
    else:
        for i in range(NC):
            t = bos + i * BT + o_t
            m_t = t < eos
            tl.store(h_ptr + ((base + i) * H + i_h) * K * V + p_s, S.to(h_ptr.dtype.element_ty),
                     mask=m_s)
            b_k, b_w, b_u, b_g, b_b = _chunk_loads(k_ptr, w_ptr, u_ptr, g_ptr, beta_ptr, t, m_t,
                                                   i_h, i_hq, H, HQ, K, V, o_k, m_k, o_v, m_v,
                                                   o_t, GATE, KT, True, True, SCAN_T, BT)
            S = _chunk_step(S, b_k, b_w, b_u, b_g, b_b, vn_ptr, t, m_t, i_h, H, V, o_t, o_v, m_v,
                            GATE, L2NORM, WF32, BT, DT, IEEE, KT, SCAN_T, KS_X2)
    tl.store(ht_ptr + i_nh.to(tl.int64) * K * V + p_s, S, mask=m_s)


_delta_state_kernel = fast_kernel(_delta_state_kernel)
