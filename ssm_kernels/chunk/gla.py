"""Per-key log-decays (GATE 2, GLA) stages of the chunked engine (layout: see common.py).

    _cumsum_kernel  chunk-local cumulative log2-decays Gc [TOK, H, K] float32, once per call
                    (forward, and again in the backward); every later GATE 2 stage, the shared ones
                    included (common.log_decay_cumsum), loads Gc instead of g
    _intra_kernel   (chunk, head): the scaled causal scores A [BT, BT] of the chunk
                    A_ij = scale sum_k q_ik k_jk exp2(G_ik - G_jk), j <= i, stored in the input
                    dtype (it is a tensor-core operand of the output and dv stages, rounded to that
                    dtype there anyway). The chunk is split as a binary tree down to sub-chunks of
                    SUB rows: at each level S = SUB, 2 SUB, ..., BT/2 the upper half of every 2S-row
                    block against its lower half is one tensor-core product with the decay
                    factored around G_r, G at the upper half's first row r:
                    (q_i exp2(G_i - G_r)) . (k_j exp2(G_r - G_j)), both exponents <= 0 (j < r <= i);
                    the diagonal SUB x SUB blocks are elementwise, column j of every block at once,
                    with exponents G_i - G_j masked to i >= j before exp2. SUB = 16 at BT = 64: two
                    levels (r = 32; r = 16, 48) and 16x16 diagonal blocks; SUB = 8 or 4 trade
                    elementwise exp2 work for one more masked product per level
    _dqkg_kernel    (K-tile, chunk, head): dq, dk and dg of the chunk's K columns:
                    dA = scale do v^T and dA^T = scale v do^T (both built directly: no dot on a
                    transposed dot result), the state terms
                    dq += scale exp2(G) (do h^T), dk += exp2(G_last - G) (v dh^T),
                    the intra terms through the same tree and diagonal blocks, and
                    dg_t = sum_{u >= t in the chunk} (q_u . dq_u - k_u . dk_u) + r with the exact
                    boundary term
                    r = exp2(G_last) sum_v(h . dh) + sum_j k_j . dk_state_j.
                    No partial buffers, no atomics: deterministic.

Rows past a sequence's end read Gc of its last token (`gc_rows`), so exponents G_i - G_j (i >= j)
stay <= 0 everywhere and G at the chunk's last row is the chunk's total decay.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common
from .common import chunk_span, load_h_dh, load_rows, mm
from .._launch import cdiv, next_power_of_2, fast_kernel


@triton.jit
def gc_rows(gc_ptr, t, eos, i_h, H, o_k, m_k, K):
    """Gc [len(t), BK] of tokens t (int64), head i_h, columns o_k; tokens past the sequence end
    read its last token's row."""
    te = tl.minimum(t, eos - 1)
    return tl.load(gc_ptr + (te * H + i_h)[:, None] * K + o_k[None, :],
                   mask=(te >= 0)[:, None] & m_k[None, :], other=0.)


@triton.jit
def gc_row(gc_ptr, t, eos, i_h, H, o_k, m_k, K):
    """Gc [BK] of the single token t (clamped to the sequence's last token)."""
    te = tl.minimum(t, eos - 1)
    return tl.load(gc_ptr + (te * H + i_h) * K + o_k, mask=m_k & (o_k * 0 + te >= 0), other=0.)


@triton.jit
def level_factors(gc_ptr, t0, eos, i_h, H, o_t, G, o_k, m_k, K, S: tl.constexpr):
    """Decay factors of one level of the block tree: inside every 2S-row block, rows of its upper
    half (i) against rows of its lower half (j), through G_r at the upper half's first row r:
    exp2(G_i - G_j) = exp2(G_i - G_r) exp2(G_r - G_j), both exponents <= 0 (j < r <= i).
    Returns (up [BT] upper-half rows, fq [BT, BK] = exp2(G - G_r) on upper rows else 0,
    fk [BT, BK] = exp2(G_r - G) on lower rows else 0)."""
    up = (o_t // S) % 2 == 1
    G_r = gc_rows(gc_ptr, t0 + (o_t // (2 * S)) * (2 * S) + S, eos, i_h, H, o_k, m_k, K)
    fq = tl.exp2(tl.where(up[:, None], G - G_r, float("-inf")))
    fk = tl.exp2(tl.where(up[:, None], float("-inf"), G_r - G))
    return up, fq, fk


@triton.jit
def level_pairs(rows, cols, o_t, S: tl.constexpr):
    """[BT, BT] mask of the (row in `rows`, column in `cols`) pairs inside every 2S-row block."""
    blk = o_t // (2 * S)
    return rows[:, None] & cols[None, :] & (blk[:, None] == blk[None, :])


@triton.jit
def diag_blocks(X, BT: tl.constexpr, SUB: tl.constexpr):
    """The SUB x SUB diagonal blocks of X [BT, BT], compact: D [BT, SUB], D[i, m] = X[i, bs(i) + m]
    (bs(i): the first row of i's sub-chunk)."""
    NS: tl.constexpr = BT // SUB
    X4 = tl.reshape(X, (NS, SUB, NS, SUB))
    same = tl.arange(0, NS)[:, None, None, None] == tl.arange(0, NS)[None, None, :, None]
    return tl.reshape(tl.sum(tl.where(same, X4, 0.), axis=2), (BT, SUB))


@triton.jit
def embed_diag_blocks(D, BT: tl.constexpr, SUB: tl.constexpr):
    """The inverse of diag_blocks: [BT, BT] with D's blocks on the diagonal, zeros elsewhere."""
    NS: tl.constexpr = BT // SUB
    D4 = tl.broadcast_to(tl.reshape(D, (NS, SUB, 1, SUB)), (NS, SUB, NS, SUB))
    same = tl.arange(0, NS)[:, None, None, None] == tl.arange(0, NS)[None, None, :, None]
    return tl.reshape(tl.where(same, D4, 0.), (BT, BT))


@triton.jit
def _cumsum_kernel(
    # g [TOK, H, K] natural-log decays (<= 0); output gc [TOK, H, K] f32 chunk-local log2 cumsums
    g_ptr, gc_ptr, ct_ptr, cu_ptr, T, NT, H, K,
    IS_VARLEN: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
):
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, eos = chunk_span(i_c, ct_ptr, cu_ptr, T, NT, IS_VARLEN, BT)
    t = t0 + tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m = (t < eos)[:, None] & (o_k < K)[None, :]
    p = (t * H + i_h)[:, None] * K + o_k[None, :]
    b_g = tl.load(g_ptr + p, mask=m, other=0.).to(tl.float32)
    tl.store(gc_ptr + p, tl.cumsum(b_g * 1.4426950408889634, axis=0), mask=m)


@triton.jit
def _intra_kernel(
    # q, k [TOK, HQ, K]; gc [TOK, H, K] f32; output a [TOK, H, BT] (input dtype): scaled scores,
    # 0 above the diagonal
    q_ptr, k_ptr, gc_ptr, a_ptr, ct_ptr, cu_ptr,
    T, NT, H, HQ, K, scale,
    IS_VARLEN: tl.constexpr, BT: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr,
    DT: tl.constexpr, IEEE: tl.constexpr, DIAG4: tl.constexpr,
):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_hq = i_h // (H // HQ)
    t0, eos = chunk_span(i_c, ct_ptr, cu_ptr, T, NT, IS_VARLEN, BT)
    o_t = tl.arange(0, BT)
    t = t0 + o_t
    m_t = t < eos
    o_in = o_t % SUB
    bs = o_t - o_in                      # first row of each row's sub-chunk
    A = tl.zeros([BT, BT], dtype=tl.float32)
    D = tl.zeros([BT, SUB], dtype=tl.float32)    # the diagonal blocks, compact (diag_blocks)
    o_m = tl.arange(0, SUB)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_q = load_rows(q_ptr, t * HQ + i_hq, m_t, o_k, m_k, K)
        G = gc_rows(gc_ptr, t, eos, i_h, H, o_k, m_k, K)
        # diagonal blocks: column j of every sub-chunk at once (rows bs + j read from memory)
        for j in range(SUB):
            t_j = t0 + bs + j
            k_j = load_rows(k_ptr, t_j * HQ + i_hq, t_j < eos, o_k, m_k, K)
            G_j = gc_rows(gc_ptr, t_j, eos, i_h, H, o_k, m_k, K)
            e = tl.exp2(tl.where((o_in >= j)[:, None], G - G_j, float("-inf")))
            col = tl.sum(b_q * k_j * e, axis=1)
            if DIAG4:
                D += tl.where(o_m[None, :] == j, col[:, None], 0.)
            else:
                A += tl.where(o_t[None, :] == (bs + j)[:, None], col[:, None], 0.)
        # off-diagonal blocks as a tree: at level S (SUB, 2 SUB, ... BT/2) the upper half of every
        # 2S-row block against its lower half, one tensor-core product through G at the half's
        # first row
        b_k = load_rows(k_ptr, t * HQ + i_hq, m_t, o_k, m_k, K)
        for lvl in tl.static_range(BT // SUB):
            if (SUB << lvl) < BT:
                up, fq, fk = level_factors(gc_ptr, t0, eos, i_h, H, o_t, G, o_k, m_k, K, SUB << lvl)
                A += tl.where(level_pairs(up, up == 0, o_t, SUB << lvl),
                              mm(b_q * fq, tl.trans(b_k * fk), DT, IEEE), 0.)
    if DIAG4:
        A += embed_diag_blocks(D, BT, SUB)
    tl.store(a_ptr + (t * H + i_h)[:, None] * BT + o_t[None, :],
             (A * scale).to(a_ptr.dtype.element_ty), mask=m_t[:, None])


@triton.jit
def dqkg_state_terms(q_ptr, k_ptr, v_ptr, do_ptr, gc_ptr, h_ptr, dh_ptr, i_c, i_h, t0, eos, t,
                     m_t, row, o_k, m_k, H, K, V, scale, BT: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr):
    """The part of the dq/dk/dg stage before the intra-chunk terms, for the K tile o_k: the V loop
    (dA = scale do v^T, dA^T = scale v do^T built directly, do h^T, v dh^T, sum_v h dh), the
    state terms dq = scale exp2(G) (do h^T), dk = exp2(G_last - G) (v dh^T) and the boundary
    term r of dg. Returns (dA, dAT, dq, dk, r, G, G_last, b_q, b_k)."""
    Kc = tl.where(t0 < eos, K, 0)          # surplus chunk programs read no state
    p_h = (i_c.to(tl.int64) * H + i_h) * K * V
    dA = tl.zeros([BT, BT], dtype=tl.float32)     # do v^T
    dAT = tl.zeros([BT, BT], dtype=tl.float32)    # v do^T, built directly
    dqs = tl.zeros([BT, BK], dtype=tl.float32)    # do h^T
    dks = tl.zeros([BT, BK], dtype=tl.float32)    # v dh^T
    hdh = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_s = (o_k < Kc)[:, None] & m_v[None, :]
        b_v = load_rows(v_ptr, row, m_t, o_v, m_v, V)
        b_do = load_rows(do_ptr, row, m_t, o_v, m_v, V)
        b_h, b_dh = load_h_dh(h_ptr, dh_ptr, p_h, o_k, o_v, m_s, V)
        dA += mm(b_do, tl.trans(b_v), DT, IEEE)
        dAT += mm(b_v, tl.trans(b_do), DT, IEEE)
        dqs += mm(b_do, tl.trans(b_h), DT, IEEE)
        dks += mm(b_v, tl.trans(b_dh), DT, IEEE)
        hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), axis=1)
    G = gc_rows(gc_ptr, t, eos, i_h, H, o_k, m_k, K)
    G_last = gc_row(gc_ptr, t0 + BT - 1, eos, i_h, H, o_k, m_k, K)
    # state terms; scale goes into the scores once
    dq = dqs * tl.exp2(G) * scale
    dk = dks * tl.exp2(G_last[None, :] - G)
    b_q = load_rows(q_ptr, row, m_t, o_k, m_k, K)
    b_k = load_rows(k_ptr, row, m_t, o_k, m_k, K)
    r = tl.exp2(G_last) * hdh + tl.sum(b_k * dk, axis=0)
    return dA * scale, dAT * scale, dq, dk, r, G, G_last, b_q, b_k


@triton.jit
def dqkg_store(dq_ptr, dk_ptr, dg_ptr, dq, dk, b_q, b_k, r, row, m_t, o_k, m_k, K):
    """Store dq, dk and dg_t = sum_{u >= t in the chunk} (q_u dq_u - k_u dk_u) + r."""
    x = b_q * dq - b_k * dk
    y = tl.sum(x, axis=0)[None, :] - tl.cumsum(x, axis=0) + x + r[None, :]
    m_o = m_t[:, None] & m_k[None, :]
    p_o = row[:, None] * K + o_k[None, :]
    tl.store(dq_ptr + p_o, dq.to(dq_ptr.dtype.element_ty), mask=m_o)
    tl.store(dk_ptr + p_o, dk.to(dk_ptr.dtype.element_ty), mask=m_o)
    tl.store(dg_ptr + p_o, y, mask=m_o)


@triton.jit
def _dqkg_kernel(
    # q, k [TOK, H, K]; v, do [TOK, H, V]; gc [TOK, H, K] f32; h, dh [NCH, H, K, V];
    # outputs dq, dk [TOK, H, K] (input dtype), dg [TOK, H, K] f32
    q_ptr, k_ptr, v_ptr, do_ptr, gc_ptr, h_ptr, dh_ptr, dq_ptr, dk_ptr, dg_ptr, ct_ptr, cu_ptr,
    T, NT, H, K, V, scale,
    IS_VARLEN: tl.constexpr, BT: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr, DIAG4: tl.constexpr,
):
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, eos = chunk_span(i_c, ct_ptr, cu_ptr, T, NT, IS_VARLEN, BT)
    o_t = tl.arange(0, BT)
    t = t0 + o_t
    m_t = t < eos
    o_in = o_t % SUB
    bs = o_t - o_in
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    row = t * H + i_h
    dA, dAT, dq, dk, r, G, G_last, b_q, b_k = dqkg_state_terms(
        q_ptr, k_ptr, v_ptr, do_ptr, gc_ptr, h_ptr, dh_ptr, i_c, i_h, t0, eos, t, m_t, row, o_k,
        m_k, H, K, V, scale, BT, BK, BV, DT, IEEE)
    if DIAG4:
        dAd = diag_blocks(dA, BT, SUB)
        dATd = diag_blocks(dAT, BT, SUB)
    o_m = tl.arange(0, SUB)
    # diagonal blocks: position j of every sub-chunk at once (rows bs + j read from memory)
    for j in range(SUB):
        t_j = t0 + bs + j
        m_j = t_j < eos
        if DIAG4:
            dA_j = tl.sum(tl.where(o_m[None, :] == j, dAd, 0.), axis=1)      # dA[i, bs + j]
            dAT_j = tl.sum(tl.where(o_m[None, :] == j, dATd, 0.), axis=1)    # dA[bs + j, i]
        else:
            sel = o_t[None, :] == (bs + j)[:, None]
            dA_j = tl.sum(tl.where(sel, dA, 0.), axis=1)
            dAT_j = tl.sum(tl.where(sel, dAT, 0.), axis=1)
        G_j = gc_rows(gc_ptr, t_j, eos, i_h, H, o_k, m_k, K)
        k_j = load_rows(k_ptr, t_j * H + i_h, m_j, o_k, m_k, K)
        q_j = load_rows(q_ptr, t_j * H + i_h, m_j, o_k, m_k, K)
        dq += dA_j[:, None] * k_j * tl.exp2(tl.where((o_in >= j)[:, None], G - G_j, float("-inf")))
        dk += dAT_j[:, None] * q_j * tl.exp2(tl.where((o_in <= j)[:, None], G_j - G, float("-inf")))
    # off-diagonal blocks as the same tree (level_factors): per level, dq of the upper half-block
    # rows from the lower ones and dk of the lower rows from the upper ones
    for lvl in tl.static_range(BT // SUB):
        if (SUB << lvl) < BT:
            up, fq, fk = level_factors(gc_ptr, t0, eos, i_h, H, o_t, G, o_k, m_k, K, SUB << lvl)
            dq += fq * mm(tl.where(level_pairs(up, up == 0, o_t, SUB << lvl), dA, 0.), b_k * fk,
                          DT, IEEE)
            dk += fk * mm(tl.where(level_pairs(up == 0, up, o_t, SUB << lvl), dAT, 0.), b_q * fq,
                          DT, IEEE)
    dqkg_store(dq_ptr, dk_ptr, dg_ptr, dq, dk, b_q, b_k, r, row, m_t, o_k, m_k, K)


# ---- tree variant (session 6, `TREE`): the binary tree all the way down to single rows ---------
# Every (i > j) pair of a chunk lies in exactly one level S = 1, 2, ..., BT/2 of the tree (i in the
# upper, j in the lower half of the same 2S-row block); the diagonal i == j has exponent 0
# (A_ii = q_i . k_i). So the whole causal score matrix is log2(BT) masked tensor-core products plus
# a row dot: no elementwise SUB x SUB blocks, no loop of gathered rows (the sm_90 SASS of
# `_intra_kernel` / `_dqkg_kernel` waits on two gathered [BT, BK] loads per diagonal step at one
# 8-warp CTA per SM), and one exp2 per element and level with no selects (`tree_level`;
# `level_factors` evaluates two exp2 and three selects per element).

@triton.jit
def tree_level(gc_ptr, t0, eos, i_h, H, o_t, G, o_k, m_k, K, lvl):
    """Level lvl of the tree (S = 2^lvl; a runtime value, so the level loop stays a loop and the
    gathered G_r tiles of all levels are not hoisted into registers at once). Returns
    (pairs [BT, BT]: (i upper, j lower half of the same 2S block), e [BT, BK]) with
    e = exp2(-|G - G_r|), G_r at the first upper row r of the row's 2S block: on upper rows
    G <= G_r, so e = exp2(G - G_r); on lower rows G >= G_r (a cumsum of steps <= 0 never
    increases, in floating point too), so e = exp2(G_r - G). One exp2 per element, no selects:
    the operands q e and k e need no zeroing, since a lower row of q e only reaches rows and an
    upper row of k e only columns that the pair mask drops."""
    blk = o_t >> (lvl + 1)
    G_r = gc_rows(gc_ptr, t0 + (blk << (lvl + 1)) + (1 << lvl), eos, i_h, H, o_k, m_k, K)
    e = tl.exp2(-tl.abs(G - G_r))
    return tree_pairs(o_t, lvl, False), e


@triton.jit
def tree_pairs(o_t, lvl, TRANSPOSED: tl.constexpr):
    """[BT, BT] mask of level lvl's (i upper, j lower half of the same 2^(lvl+1) block) pairs, or
    its transpose (built directly, not through tl.trans)."""
    blk = o_t >> (lvl + 1)
    up = ((o_t >> lvl) & 1) == 1
    if TRANSPOSED:
        return (blk[:, None] == blk[None, :]) & (up == 0)[:, None] & up[None, :]
    return (blk[:, None] == blk[None, :]) & up[:, None] & (up == 0)[None, :]


@triton.jit
def mid_factors(gc_ptr, t0, eos, i_h, H, G, o_k, m_k, K, BT: tl.constexpr):
    """The one-reference factors of the fast path: (exp2(G - G_m), exp2(G_m - G)), G_m at the
    chunk's middle row, so |exponent| <= the chunk's decay span (the caller checks it)."""
    d = G - gc_row(gc_ptr, t0 + BT // 2, eos, i_h, H, o_k, m_k, K)[None, :]
    return tl.exp2(d), tl.exp2(-d)


@triton.jit
def decay_span(gc_ptr, t0, eos, i_h, H, o_k, m_k, K, BT: tl.constexpr):
    """A bound on every |G_i - G_j| of the chunk's K tile: max over its columns of -G_last (the
    chunk's total decay; >= G_first - G_last since G_first <= 0). One row load and a [BK]
    reduction (the max/min over the [BT, BK] tile cost ~200 shuffles and min/max per thread)."""
    return tl.max(-gc_row(gc_ptr, t0 + BT - 1, eos, i_h, H, o_k, m_k, K), axis=0)


@triton.jit
def tree_scores(b_q, b_k, G, gc_ptr, t0, eos, i_h, H, o_t, o_k, m_k, K, NLEV: tl.constexpr,
                DT: tl.constexpr, IEEE: tl.constexpr):
    """The unscaled strictly-causal decayed scores of one K tile, sum_k q_ik k_jk exp2(G_ik - G_jk)
    for j < i (0 elsewhere; the diagonal, exponent 0, is the row dot q_i . k_i the callers add):
    NLEV = log2(BT) tree levels."""
    A = tl.zeros([o_t.shape[0], o_t.shape[0]], dtype=tl.float32)
    for lvl in range(NLEV):
        pairs, e = tree_level(gc_ptr, t0, eos, i_h, H, o_t, G, o_k, m_k, K, lvl)
        A += tl.where(pairs, mm(b_q * e, tl.trans(b_k * e), DT, IEEE), 0.)
    return A


@triton.jit
def chunk_scores(b_q, b_k, G, gc_ptr, t0, eos, i_h, H, o_t, o_k, m_k, K, BT: tl.constexpr,
                 NLEV: tl.constexpr, FAST_SPAN: tl.constexpr, DT: tl.constexpr,
                 IEEE: tl.constexpr, PATH: tl.constexpr = 0):
    """The unscaled causal decayed scores (diagonal included) of one K tile. Fast path, when the
    tile's decay span (decay_span) is <= FAST_SPAN (log2 units): one product (q exp2(G - G_m))
    (k exp2(G_m - G))^T, every factor within 2^(+-FAST_SPAN), so nothing overflows or underflows
    and the result is exact up to the operands' rounding, as the tree's; otherwise the tree (any
    decay). PATH 1: the fast path unchecked (the caller checked the whole chunk's span)."""
    if PATH == 1:
        fast = True
    else:
        fast = decay_span(gc_ptr, t0, eos, i_h, H, o_k, m_k, K, BT) <= FAST_SPAN
    if fast:
        eq, ek = mid_factors(gc_ptr, t0, eos, i_h, H, G, o_k, m_k, K, BT)
        A = tl.where(o_t[:, None] >= o_t[None, :], mm(b_q * eq, tl.trans(b_k * ek), DT, IEEE), 0.)
    else:
        A = tree_scores(b_q, b_k, G, gc_ptr, t0, eos, i_h, H, o_t, o_k, m_k, K, NLEV, DT, IEEE)
        A = tl.where(o_t[:, None] == o_t[None, :], tl.sum(b_q * b_k, axis=1)[:, None], A)
    return A


@triton.jit
def program_runs(gc_ptr, t0, eos, i_h, H, o_k, m_k, K, BT: tl.constexpr,
                 FAST_SPAN: tl.constexpr, MODE: tl.constexpr):
    """Whether this program works in launch MODE: 0 always (fast path or tree per K tile); split
    launches (gla.TREE_SPLIT): 1 only where the decay span of the columns o_k (all of K for the
    score kernels) is <= FAST_SPAN, 2 only where it is above. MODE 1 kernels carry no tree code,
    so they hold fewer registers (sm_90: dq/dk/dg 232 -> 136, scores 177 -> 122)."""
    if MODE == 0:
        run = True
    elif MODE == 1:
        run = decay_span(gc_ptr, t0, eos, i_h, H, o_k, m_k, K, BT) <= FAST_SPAN
    else:
        run = decay_span(gc_ptr, t0, eos, i_h, H, o_k, m_k, K, BT) > FAST_SPAN
    return run


@triton.jit
def _intra_tree_kernel(
    # as _intra_kernel: q, k [TOK, HQ, K]; gc [TOK, H, K] f32; output a [TOK, H, BT]
    q_ptr, k_ptr, gc_ptr, a_ptr, ct_ptr, cu_ptr,
    T, NT, H, HQ, K, scale,
    IS_VARLEN: tl.constexpr, BT: tl.constexpr, NLEV: tl.constexpr, BK: tl.constexpr,
    DT: tl.constexpr, IEEE: tl.constexpr, FAST_SPAN: tl.constexpr, MODE: tl.constexpr = 0,
    KP: tl.constexpr = 16,
):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_hq = i_h // (H // HQ)
    t0, eos = chunk_span(i_c, ct_ptr, cu_ptr, T, NT, IS_VARLEN, BT)
    o_kp = tl.arange(0, KP)
    if program_runs(gc_ptr, t0, eos, i_h, H, o_kp, o_kp < K, K, BT, FAST_SPAN, MODE):
        o_t = tl.arange(0, BT)
        t = t0 + o_t
        m_t = t < eos
        A = tl.zeros([BT, BT], dtype=tl.float32)
        for i_k in range(tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            b_q = load_rows(q_ptr, t * HQ + i_hq, m_t, o_k, m_k, K)
            b_k = load_rows(k_ptr, t * HQ + i_hq, m_t, o_k, m_k, K)
            G = gc_rows(gc_ptr, t, eos, i_h, H, o_k, m_k, K)
            A += chunk_scores(b_q, b_k, G, gc_ptr, t0, eos, i_h, H, o_t, o_k, m_k, K, BT, NLEV,
                              FAST_SPAN, DT, IEEE, MODE)
        tl.store(a_ptr + (t * H + i_h)[:, None] * BT + o_t[None, :],
                 (A * scale).to(a_ptr.dtype.element_ty), mask=m_t[:, None])


@triton.jit
def _intra_prep_kernel(
    # q, k [TOK, HQ, K]; g [TOK, H, K] natural-log decays (<= 0); outputs gc [TOK, H, K] f32
    # (chunk-local log2 cumsums, as _cumsum_kernel), qd = q exp2(Gc) and kd = k exp2(G_last - Gc)
    # [TOK, H, K] (input dtype), gl [NCH, H, K] f32 the chunk's total log2-decay G_last, and the
    # scaled causal scores a [TOK, H, BT] of every chunk whose decay span is <= FAST_SPAN (the
    # others are left to _intra_tree_kernel MODE 2, which reads gc)
    q_ptr, k_ptr, g_ptr, gc_ptr, qd_ptr, kd_ptr, gl_ptr, a_ptr, ct_ptr, cu_ptr,
    T, NT, H, HQ, K, scale,
    IS_VARLEN: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, DT: tl.constexpr,
    IEEE: tl.constexpr, FAST_SPAN: tl.constexpr,
):
    """common.GLA_PREP: the cumsum, the pre-decayed rows and the fast-path scores in one pass over
    q, k, g. Rows past the sequence end add 0 to the cumsum, so the last row holds G_last and the
    middle row the fast path's reference (what gc_row's clamping gives on the stored Gc). Every
    program writes its Gc, qd, kd, gl; the scores only where the chunk's span (max over K of
    -G_last, decay_span's bound) is <= FAST_SPAN: computed per K tile before the span is known,
    a tree chunk's fast product is discarded, never stored."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_hq = i_h // (H // HQ)
    t0, eos = chunk_span(i_c, ct_ptr, cu_ptr, T, NT, IS_VARLEN, BT)
    o_t = tl.arange(0, BT)
    t = t0 + o_t
    m_t = t < eos
    row = t * H + i_h
    A = tl.zeros([BT, BT], dtype=tl.float32)
    span = tl.zeros([], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m = m_t[:, None] & m_k[None, :]
        p = row[:, None] * K + o_k[None, :]
        G = tl.cumsum(tl.load(g_ptr + p, mask=m, other=0.).to(tl.float32) * 1.4426950408889634,
                      axis=0)
        tl.store(gc_ptr + p, G, mask=m)
        G_last = tl.sum(tl.where((o_t == BT - 1)[:, None], G, 0.), axis=0)
        tl.store(gl_ptr + (i_c.to(tl.int64) * H + i_h) * K + o_k, G_last,
                 mask=m_k & (o_k * 0 + t0 < eos))
        span = tl.maximum(span, tl.max(-G_last, axis=0))
        b_q = load_rows(q_ptr, t * HQ + i_hq, m_t, o_k, m_k, K)
        b_k = load_rows(k_ptr, t * HQ + i_hq, m_t, o_k, m_k, K)
        tl.store(qd_ptr + p, (b_q * tl.exp2(G)).to(qd_ptr.dtype.element_ty), mask=m)
        tl.store(kd_ptr + p, (b_k * tl.exp2(G_last[None, :] - G)).to(kd_ptr.dtype.element_ty),
                 mask=m)
        dm = G - tl.sum(tl.where((o_t == BT // 2)[:, None], G, 0.), axis=0)[None, :]
        A += mm(b_q * tl.exp2(dm), tl.trans(b_k * tl.exp2(-dm)), DT, IEEE)
    if span <= FAST_SPAN:
        A = tl.where(o_t[:, None] >= o_t[None, :], A, 0.)
        tl.store(a_ptr + row[:, None] * BT + o_t[None, :], (A * scale).to(a_ptr.dtype.element_ty),
                 mask=m_t[:, None])


@triton.jit
def _fwd_tree_kernel(
    # the forward's scores and output in one pass (fla's chunk_gla_fwd_o does the same): q, k
    # [TOK, HQ, K]; v [TOK, H, V]; gc [TOK, H, K] f32; h [NCH, H, K, V]; output o [TOK, H, V]
    # o = scale (q exp2(G)) h + A v, A (scaled, rounded to the input dtype) never stored
    q_ptr, k_ptr, v_ptr, gc_ptr, h_ptr, o_ptr, ct_ptr, cu_ptr,
    T, NT, H, HQ, K, V, scale,
    IS_VARLEN: tl.constexpr, BT: tl.constexpr, NLEV: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr, FAST_SPAN: tl.constexpr,
    MODE: tl.constexpr = 0, KP: tl.constexpr = 16,
):
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_hq = i_h // (H // HQ)
    t0, eos = chunk_span(i_c, ct_ptr, cu_ptr, T, NT, IS_VARLEN, BT)
    o_kp = tl.arange(0, KP)
    if program_runs(gc_ptr, t0, eos, i_h, H, o_kp, o_kp < K, K, BT, FAST_SPAN, MODE):
        o_t = tl.arange(0, BT)
        t = t0 + o_t
        m_t = t < eos
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        Kc = tl.where(t0 < eos, K, 0)          # surplus chunk programs read no state
        row_q = t * HQ + i_hq
        row = t * H + i_h
        p_h = h_ptr + (i_c.to(tl.int64) * H + i_h) * K * V
        A = tl.zeros([BT, BT], dtype=tl.float32)
        b_o = tl.zeros([BT, BV], dtype=tl.float32)
        for i_k in range(tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            b_q = load_rows(q_ptr, row_q, m_t, o_k, m_k, K)
            b_k = load_rows(k_ptr, row_q, m_t, o_k, m_k, K)
            G = gc_rows(gc_ptr, t, eos, i_h, H, o_k, m_k, K)
            b_h = tl.load(p_h + o_k[:, None] * V + o_v[None, :],
                          mask=(o_k < Kc)[:, None] & m_v[None, :], other=0.)
            b_o += mm(b_q * tl.exp2(G), b_h, DT, IEEE)
            A += chunk_scores(b_q, b_k, G, gc_ptr, t0, eos, i_h, H, o_t, o_k, m_k, K, BT, NLEV,
                              FAST_SPAN, DT, IEEE, MODE)
        b_v = load_rows(v_ptr, row, m_t, o_v, m_v, V)
        b_o = (b_o + mm(A, b_v, DT, IEEE)) * scale
        tl.store(o_ptr + row[:, None] * V + o_v[None, :], b_o.to(o_ptr.dtype.element_ty),
                 mask=m_t[:, None] & m_v[None, :])


@triton.jit
def _dqkg_tree_kernel(
    # as _dqkg_kernel (same arguments and outputs), the intra terms through chunk_scores' fast
    # path or the full tree
    q_ptr, k_ptr, v_ptr, do_ptr, gc_ptr, h_ptr, dh_ptr, dq_ptr, dk_ptr, dg_ptr, ct_ptr, cu_ptr,
    T, NT, H, K, V, scale,
    IS_VARLEN: tl.constexpr, BT: tl.constexpr, NLEV: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr, FAST_SPAN: tl.constexpr,
    MODE: tl.constexpr = 0,
):
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, eos = chunk_span(i_c, ct_ptr, cu_ptr, T, NT, IS_VARLEN, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    if program_runs(gc_ptr, t0, eos, i_h, H, o_k, m_k, K, BT, FAST_SPAN, MODE):
        o_t = tl.arange(0, BT)
        t = t0 + o_t
        m_t = t < eos
        row = t * H + i_h
        dA, dAT, dq, dk, r, G, G_last, b_q, b_k = dqkg_state_terms(
            q_ptr, k_ptr, v_ptr, do_ptr, gc_ptr, h_ptr, dh_ptr, i_c, i_h, t0, eos, t, m_t, row,
            o_k, m_k, H, K, V, scale, BT, BK, BV, DT, IEEE)
        if MODE == 1:
            fast = True
        elif MODE == 2:
            fast = False
        else:
            fast = tl.max(-G_last, axis=0) <= FAST_SPAN      # decay_span
        if fast:
            # fast path (chunk_scores): one reference row for the whole chunk, diagonal included
            eq, ek = mid_factors(gc_ptr, t0, eos, i_h, H, G, o_k, m_k, K, BT)
            dq += eq * mm(tl.where(o_t[:, None] >= o_t[None, :], dA, 0.), b_k * ek, DT, IEEE)
            dk += ek * mm(tl.where(o_t[:, None] <= o_t[None, :], dAT, 0.), b_q * eq, DT, IEEE)
        else:
            # diagonal (exponent 0): dq_i += dA_ii k_i, dk_i += dA_ii q_i
            eye = o_t[:, None] == o_t[None, :]
            dq += tl.sum(tl.where(eye, dA, 0.), axis=1)[:, None] * b_k
            dk += tl.sum(tl.where(eye, dAT, 0.), axis=1)[:, None] * b_q
            # per level: dq of the upper rows from the lower ones, dk of the lower rows from the
            # upper ones (rows outside the level's pairs get a zero product: e needs no zeroing)
            for lvl in range(NLEV):
                pairs, e = tree_level(gc_ptr, t0, eos, i_h, H, o_t, G, o_k, m_k, K, lvl)
                dq += e * mm(tl.where(pairs, dA, 0.), b_k * e, DT, IEEE)
                dk += e * mm(tl.where(tree_pairs(o_t, lvl, True), dAT, 0.), b_q * e, DT, IEEE)
        dqkg_store(dq_ptr, dk_ptr, dg_ptr, dq, dk, b_q, b_k, r, row, m_t, o_k, m_k, K)


@triton.jit
def _bwd_fused_kernel(
    # the backward's intra-chunk work in one program per (chunk, head): scores (recomputed, as
    # A^T, never stored), dv, dq, dk, dg. q, k [TOK, H, K]; v, do [TOK, H, V] (V <= BV: one V
    # tile); gc [TOK, H, K] f32; h, dh [NCH, H, K, V]; outputs dq, dk [TOK, H, K], dv [TOK, H, V]
    # (input dtype), dg [TOK, H, K] f32. Per K tile: the state terms, the scores' part through
    # chunk_scores' fast path or the tree, dv's state term; after the K loop dv += A^T do.
    q_ptr, k_ptr, v_ptr, do_ptr, gc_ptr, h_ptr, dh_ptr, dq_ptr, dk_ptr, dv_ptr, dg_ptr,
    ct_ptr, cu_ptr, T, NT, H, K, V, scale,
    IS_VARLEN: tl.constexpr, BT: tl.constexpr, NLEV: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr, FAST_SPAN: tl.constexpr,
    RELOAD: tl.constexpr,
):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0, eos = chunk_span(i_c, ct_ptr, cu_ptr, T, NT, IS_VARLEN, BT)
    o_t = tl.arange(0, BT)
    t = t0 + o_t
    m_t = t < eos
    o_v = tl.arange(0, BV)
    m_v = o_v < V
    Kc = tl.where(t0 < eos, K, 0)          # surplus chunk programs read no state
    row = t * H + i_h
    p_h = (i_c.to(tl.int64) * H + i_h) * K * V
    m_tv = m_t[:, None] & m_v[None, :]
    p_tv = row[:, None] * V + o_v[None, :]
    b_v = tl.load(v_ptr + p_tv, mask=m_tv, other=0.)       # storage dtype: operands only
    b_do = tl.load(do_ptr + p_tv, mask=m_tv, other=0.)
    lower = o_t[:, None] >= o_t[None, :]
    upper = o_t[:, None] <= o_t[None, :]
    dAm = tl.where(lower, mm(b_do, tl.trans(b_v), DT, IEEE), 0.) * scale     # dA, j <= i
    dATm = tl.where(upper, mm(b_v, tl.trans(b_do), DT, IEEE), 0.) * scale    # dA^T, built directly
    AT = tl.zeros([BT, BT], dtype=tl.float32)     # A^T (unscaled)
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_s = (o_k < Kc)[:, None] & m_v[None, :]
        b_h, b_dh = load_h_dh(h_ptr, dh_ptr, p_h, o_k, o_v, m_s, V)
        b_q = load_rows(q_ptr, row, m_t, o_k, m_k, K)
        b_k = load_rows(k_ptr, row, m_t, o_k, m_k, K)
        G = gc_rows(gc_ptr, t, eos, i_h, H, o_k, m_k, K)
        G_last = gc_row(gc_ptr, t0 + BT - 1, eos, i_h, H, o_k, m_k, K)
        kd = b_k * tl.exp2(G_last[None, :] - G)
        b_dv += mm(kd, b_dh, DT, IEEE)
        if RELOAD:   # v, do re-read per K tile (L1/L2) instead of held in registers
            b_v = tl.load(v_ptr + p_tv, mask=m_tv, other=0.)
            b_do = tl.load(do_ptr + p_tv, mask=m_tv, other=0.)
        dq = mm(b_do, tl.trans(b_h), DT, IEEE) * tl.exp2(G) * scale
        dks = mm(b_v, tl.trans(b_dh), DT, IEEE)
        dk = dks * tl.exp2(G_last[None, :] - G)
        r = (tl.exp2(G_last) * tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), axis=1)
             + tl.sum(b_k * dk, axis=0))
        if tl.max(-G_last, axis=0) <= FAST_SPAN:      # decay_span
            eq, ek = mid_factors(gc_ptr, t0, eos, i_h, H, G, o_k, m_k, K, BT)
            qe = b_q * eq
            ke = b_k * ek
            dq += eq * mm(dAm, ke, DT, IEEE)
            dk += ek * mm(dATm, qe, DT, IEEE)
            AT += tl.where(upper, mm(ke, tl.trans(qe), DT, IEEE), 0.)
        else:
            eye = o_t[:, None] == o_t[None, :]
            dq += tl.sum(tl.where(eye, dAm, 0.), axis=1)[:, None] * b_k
            dk += tl.sum(tl.where(eye, dATm, 0.), axis=1)[:, None] * b_q
            AT += tl.where(eye, tl.sum(b_q * b_k, axis=1)[:, None], 0.)
            for lvl in range(NLEV):
                pairs, e = tree_level(gc_ptr, t0, eos, i_h, H, o_t, G, o_k, m_k, K, lvl)
                pairsT = tree_pairs(o_t, lvl, True)
                qe = b_q * e
                ke = b_k * e
                dq += e * mm(tl.where(pairs, dAm, 0.), ke, DT, IEEE)
                dk += e * mm(tl.where(pairsT, dATm, 0.), qe, DT, IEEE)
                AT += tl.where(pairsT, mm(ke, tl.trans(qe), DT, IEEE), 0.)
        dqkg_store(dq_ptr, dk_ptr, dg_ptr, dq, dk, b_q, b_k, r, row, m_t, o_k, m_k, K)
    if RELOAD:
        b_do = tl.load(do_ptr + p_tv, mask=m_tv, other=0.)
    b_dv += mm(AT * scale, b_do, DT, IEEE)
    tl.store(dv_ptr + p_tv, b_dv.to(dv_ptr.dtype.element_ty), mask=m_tv)


# ---- launchers (p: fwd.Plan) -----------------------------------------------------------------

# launch cache: bind each compiled kernel once per specialisation (ssm_kernels/_launch.py)
_cumsum_kernel = fast_kernel(_cumsum_kernel)
_intra_kernel = fast_kernel(_intra_kernel)
_dqkg_kernel = fast_kernel(_dqkg_kernel)
_intra_tree_kernel = fast_kernel(_intra_tree_kernel)
_intra_prep_kernel = fast_kernel(_intra_prep_kernel)
_fwd_tree_kernel = fast_kernel(_fwd_tree_kernel)
_dqkg_tree_kernel = fast_kernel(_dqkg_tree_kernel)
_bwd_fused_kernel = fast_kernel(_bwd_fused_kernel)


# ---- knobs of the tree variant (the lead A/Bs them on the GPU; bench/gpu_chunk.py GLA_VARIANTS) --
TREE = True            # scores and dq/dk/dg through the full tree (_intra_tree_kernel,
                       # _dqkg_tree_kernel); False: the SUB_CHUNK kernels (_intra_kernel, _dqkg_kernel)
FUSED_FWD = False      # (with TREE) forward scores + output in one kernel (_fwd_tree_kernel);
                       # False: scores stored by _intra_tree_kernel, then fwd._output_kernel
                       # (H100 session 6, B4 T4096 H16 K=V=128: fwd 0.683 vs fused 0.778 ms)
FUSED_BWD = False      # (with TREE, V <= 128) backward scores, dv, dq, dk, dg in one kernel
                       # (_bwd_fused_kernel) instead of _intra_tree_kernel + _dv_kernel +
                       # _dqkg_tree_kernel; off: it spills 670-1100 B on sm_90 at K=V=128
                       # (240 B with the tree branch removed), a GPU A/B row only
TREE_BWD_BLOCK_K = 32  # K tile of _bwd_fused_kernel
FUSED_BWD_RELOAD = True  # _bwd_fused_kernel re-reads v, do per K tile (fewer live registers)
TREE_BLOCK_K = 32      # K tile of _intra_tree_kernel / _fwd_tree_kernel (64: the fused kernel
                       # spilled 56 B on sm_90)
TREE_DQK_BLOCK_K = 32  # K tile of _dqkg_tree_kernel (64: 80-132 B spill on sm_90)
TREE_WARPS = 8         # warps of the tree kernels
TREE_STAGES = 1        # num_stages of _fwd_tree_kernel / _intra_tree_kernel (K-loop prefetch)
FAST_SPAN = 40.0       # tree kernels: a (chunk, K tile) whose decay span max_k (-G_last)
                       # is <= this (log2 units; 40 = 27.7 in natural log over the chunk) takes
                       # one product with a mid-chunk reference instead of the tree (any value
                       # <= ~60 keeps every factor and product in range); -1: always the tree
TREE_DQK_MAXNREG = 128   # cap of the split fast-path dq/dk/dg build (136 registers uncapped on
                         # sm_90: one 8-warp CTA per SM; at 128 two, and ptxas reports no spill);
                         # None: uncapped
TREE_FWD_MAXNREG = None  # the same for the split fast-path _fwd_tree_kernel build (202 uncapped)
TREE_SPLIT = True      # tree kernels launched twice: programs whose decay span is <= FAST_SPAN
                       # in a build without the tree (fewer registers), the rest in a second
                       # launch (an early exit for typical gates); False: one launch, per K tile
FAST_SPAN_FP16 = 4.0   # the same for float16 operands (5-bit exponent: a factor 2^-S on q must
                       # stay clear of fp16 subnormals, since its partner 2^S on k amplifies them)


def _span(p):
    return float(FAST_SPAN_FP16 if p.meta["DT"] == tl.float16 else FAST_SPAN)


def _maxnreg(mode, cap):
    """ptxas register cap of a split fast-path build (TREE_DQK_MAXNREG / TREE_FWD_MAXNREG)."""
    return {} if (cap is None or mode != 1) else dict(maxnreg=cap)


def _modes():
    return (1, 2) if TREE_SPLIT else (0,)


def _kp(p):
    return max(16, next_power_of_2(p.K))


def _nlev(BT):
    return BT.bit_length() - 1


def _tree_bk(p, knob):
    return max(16, min(32 if p.meta["IEEE"] == 1 else knob, next_power_of_2(p.K)))


def use_fused_fwd(p):
    return TREE and FUSED_FWD


def use_prep(p):
    """common.GLA_PREP (with the tree scores; not with the fused forward, which reads Gc)."""
    return bool(common.GLA_PREP) and TREE and not FUSED_FWD


def intra_prep(p, q, k, g, scale):
    """common.GLA_PREP: (Gc [B, T, H, K] f32, q exp2(Gc) and k exp2(G_last - Gc) [B, T, H, K] in
    q's dtype, G_last [NCH, H, K] f32, the scaled scores [TOK, H, BT]) from the raw g: one
    launch for every chunk, then _intra_tree_kernel MODE 2 for chunks past FAST_SPAN (an early
    exit everywhere for typical gates)."""
    m = p.meta
    gc = common.poison(torch.empty_like(g, dtype=torch.float32))
    qd = common.poison(q.new_empty((p.B, p.T, p.H, p.K)))
    kd = common.poison(torch.empty_like(qd))
    gl = common.poison(gc.new_empty((p.NCH, p.H, p.K)))
    a = common.poison(q.new_empty((p.B * p.T, p.H, p.BT)))
    ct, cu = _idx(p, a)
    BK = _tree_bk(p, TREE_BLOCK_K)
    _intra_prep_kernel[(p.NCH, p.H)](
        q, k, g, gc, qd, kd, gl, a, ct, cu, p.T, p.NT, p.H, p.HQ, p.K, float(scale),
        IS_VARLEN=p.varlen, BT=p.BT, BK=BK, DT=m["DT"], IEEE=m["IEEE"], FAST_SPAN=_span(p),
        num_warps=TREE_WARPS, num_stages=TREE_STAGES)
    _intra_tree_kernel[(p.NCH, p.H)](
        q, k, gc, a, ct, cu, p.T, p.NT, p.H, p.HQ, p.K, float(scale),
        IS_VARLEN=p.varlen, BT=p.BT, NLEV=_nlev(p.BT), BK=BK, DT=m["DT"], IEEE=m["IEEE"],
        FAST_SPAN=_span(p), MODE=2, KP=_kp(p), num_warps=TREE_WARPS, num_stages=TREE_STAGES)
    return gc, qd, kd, gl, a


def use_fused_bwd(p):
    return TREE and FUSED_BWD and p.V <= 128 and p.HQ == p.H


def _idx(p, x):
    """(chunk table, cu_seqlens); x stands in for both when the batch is not packed (the kernels
    read them only when IS_VARLEN)."""
    return (x if p.ct is None else p.ct), (x if p.cu is None else p.cu)


def chunk_cumsum(p, g):
    """Gc [B, T, H, K] float32: g's cumulative sum within each chunk, in log2 units."""
    m = p.meta
    gc = common.poison(torch.empty_like(g, dtype=torch.float32))
    ct, cu = _idx(p, gc)
    BK = m["BKG"]
    _cumsum_kernel[(cdiv(p.K, BK), p.NCH, p.H)](
        g, gc, ct, cu, p.T, p.NT, p.H, p.K, IS_VARLEN=p.varlen, BT=p.BT, BK=BK, num_warps=4)
    return gc


def intra_scores(p, q, k, gc, scale):
    """The scaled causal scores of every chunk, [TOK, H, BT] in q's dtype."""
    m = p.meta
    a = common.poison(q.new_empty((p.B * p.T, p.H, p.BT)))
    ct, cu = _idx(p, a)
    if TREE:
        for mode in _modes():
            _intra_tree_kernel[(p.NCH, p.H)](
                q, k, gc, a, ct, cu, p.T, p.NT, p.H, p.HQ, p.K, float(scale),
                IS_VARLEN=p.varlen, BT=p.BT, NLEV=_nlev(p.BT), BK=_tree_bk(p, TREE_BLOCK_K),
                DT=m["DT"], IEEE=m["IEEE"], FAST_SPAN=_span(p), MODE=mode, KP=_kp(p),
                num_warps=TREE_WARPS, num_stages=TREE_STAGES)
        return a
    _intra_kernel[(p.NCH, p.H)](q, k, gc, a, ct, cu, p.T, p.NT, p.H, p.HQ, p.K, float(scale),
                                IS_VARLEN=p.varlen, BT=p.BT, SUB=m["SUB"], BK=m["BKG"],
                                DT=m["DT"], IEEE=m["IEEE"], DIAG4=common.GLA_DIAG_4D,
                                num_warps=m["GLA_WARPS"])
    return a


def dqkg(p, q, k, v, do, gc, h, dh, scale):
    """(dq, dk in q's dtype, dg float32 [B, T, H, K]) of the per-key-decay chunks."""
    if p.HQ != p.H:
        raise NotImplementedError("per-key decays take as many q/k heads as value heads")
    m = p.meta
    dq, dk = common.poison(torch.empty_like(q)), common.poison(torch.empty_like(k))
    dg = common.poison(torch.empty_like(gc))
    ct, cu = _idx(p, dg)
    if TREE:
        BK = _tree_bk(p, TREE_DQK_BLOCK_K)
        for mode in _modes():
            _dqkg_tree_kernel[(cdiv(p.K, BK), p.NCH, p.H)](
                q, k, v, do, gc, h, dh, dq, dk, dg, ct, cu, p.T, p.NT, p.H, p.K, p.V,
                float(scale), IS_VARLEN=p.varlen, BT=p.BT, NLEV=_nlev(p.BT), BK=BK, BV=m["BV"],
                DT=m["DT"], IEEE=m["IEEE"], FAST_SPAN=_span(p), MODE=mode,
                num_warps=TREE_WARPS, num_stages=1, **_maxnreg(mode, TREE_DQK_MAXNREG))
        return dq, dk, dg
    BK = m["BKD"]
    _dqkg_kernel[(cdiv(p.K, BK), p.NCH, p.H)](
        q, k, v, do, gc, h, dh, dq, dk, dg, ct, cu, p.T, p.NT, p.H, p.K, p.V, float(scale),
        IS_VARLEN=p.varlen, BT=p.BT, SUB=m["SUB"], BK=BK, BV=m["BV"], DT=m["DT"], IEEE=m["IEEE"],
        DIAG4=common.GLA_DIAG_4D, num_warps=m["GLA_WARPS"], num_stages=1)
    return dq, dk, dg


def fwd_output(p, q, k, v, gc, h, scale):
    """o [B, T, H, V] in v's dtype: scores and output of every chunk in one kernel."""
    m = p.meta
    o = common.poison(torch.empty_like(v))
    ct, cu = _idx(p, o)
    BV = m["BVO"]
    for mode in _modes():
        _fwd_tree_kernel[(cdiv(p.V, BV), p.NCH, p.H)](
            q, k, v, gc, h, o, ct, cu, p.T, p.NT, p.H, p.HQ, p.K, p.V, float(scale),
            IS_VARLEN=p.varlen, BT=p.BT, NLEV=_nlev(p.BT), BK=_tree_bk(p, TREE_BLOCK_K), BV=BV,
            DT=m["DT"], IEEE=m["IEEE"], FAST_SPAN=_span(p), MODE=mode, KP=_kp(p),
            num_warps=TREE_WARPS, num_stages=TREE_STAGES, **_maxnreg(mode, TREE_FWD_MAXNREG))
    return o


def bwd_fused(p, q, k, v, do, gc, h, dh, scale):
    """(dq, dk, dv in the inputs' dtype, dg float32) of the per-key-decay chunks, one kernel."""
    m = p.meta
    dq, dk = common.poison(torch.empty_like(q)), common.poison(torch.empty_like(k))
    dv = common.poison(torch.empty_like(v))
    dg = common.poison(torch.empty_like(gc))
    ct, cu = _idx(p, dg)
    _bwd_fused_kernel[(p.NCH, p.H)](
        q, k, v, do, gc, h, dh, dq, dk, dv, dg, ct, cu, p.T, p.NT, p.H, p.K, p.V, float(scale),
        IS_VARLEN=p.varlen, BT=p.BT, NLEV=_nlev(p.BT), BK=_tree_bk(p, TREE_BWD_BLOCK_K),
        BV=max(16, next_power_of_2(p.V)), DT=m["DT"], IEEE=m["IEEE"], FAST_SPAN=_span(p),
        RELOAD=FUSED_BWD_RELOAD, num_warps=TREE_WARPS, num_stages=1)
    return dq, dk, dv, dg
