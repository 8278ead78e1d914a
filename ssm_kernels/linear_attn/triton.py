"""Triton kernels for chunked linear attention: no gate, scalar decay per head, per-key decay (GLA).

Design: one program owns one (sequence, head, V-tile) and walks that sequence's chunks in order,
keeping the [K, V] state in registers (float32), so per-chunk states are never written to memory
and packed variable-length batches need no chunk index: a program reads its span from cu_seqlens.
The shared chunk stages are `@triton.jit` functions, written once and selected by the
`GATE: tl.constexpr` flag (0 none, 1 scalar log-decay [T] per head, 2 per-key log-decay [T, K]):

    chunk_log_decay_cumsum  local cumsum of a chunk's log-decays, in log2 units (the only cumsum)
    chunk_scores            decayed causal scores  A_ij = q_i . k_j exp(G_i - G_j), i >= j
    chunk_output            o = (q exp(G)) S_prev + A v
    chunk_state_update      S = exp(G_last) S_prev + (k exp(G_last - G))^T v  (inter-chunk passing)

Kernels: `_fwd_kernel` (o, final state; STATE_ONLY: the state alone), `_recurrent_fwd_kernel`
(fused_recurrent_*: one token at a time), and the backward: `_bwd_dq_kernel` (forward direction,
it needs the running state; with a gate it also stores every chunk-end state), `_bwd_dkv_kernel`
(right to left with dS in registers: dk, dv, dh0; with a gate r_c = sum_v dS * S at every chunk
end) and `_bwd_finish_kernel` (sums the V-tile partials of dq, dk and forms dg). With G the
cumulative log-decay, dG_t = q_t dq_t - k_t dk_t and dg is its reverse cumsum; the cumsum runs
inside each chunk only and the rest enters exactly through r_c, so 16-bit rounding errors of dq,
dk do not add up over the sequence.

Long sequences with too few programs are cut into segments (whole chunks) run as a packed batch;
see "sequence splitting" below.

Every exponent is a difference G_i - G_j with i >= j inside one chunk (<= 0), so decays of -20
per step underflow to exact zeros instead of overflowing. For per-key decays the intra-chunk
scores are not one matmul: between 16-step sub-chunks they are matmuls through a reference row
between the two (both factors <= 1), inside a sub-chunk they are built column by column.

Tensors are contiguous [total_tokens, H, D] (B rows of length T are the packed case with
sequence n spanning [n*T, (n+1)*T)); states are contiguous float32 [N, H, K, V]; offsets int64.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._config import triton_interpret
from .._device import sm_count

LOG2E = 1.4426950408889634

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# ---- shared chunk stages ---------------------------------------------------------------------

@triton.jit
def seq_span(i_n, cu_ptr, T, IS_VARLEN: tl.constexpr):
    """[bos, eos) of sequence i_n: from cu_seqlens (packed) or n*T (B rows of length T)."""
    if IS_VARLEN:
        bos = tl.load(cu_ptr + i_n).to(tl.int64)
        eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    return bos, eos


@triton.jit
def mm(a, b, DT: tl.constexpr, IEEE: tl.constexpr):
    """a @ b with operands rounded to DT and float32 accumulation. IEEE: 0 tensor cores on DT
    operands; 1 exact fp32 products (float32 inputs); 2 DT-rounded operands multiplied in fp32
    (the interpreter's stand-in for 16-bit tensor cores, whose bf16 dot is broken there)."""
    if IEEE == 1:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE == 2:
        return tl.dot(a.to(DT).to(tl.float32), b.to(DT).to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def chunk_log_decay_cumsum(g_ptr, row, m_t, o_k, m_k, K, GATE: tl.constexpr, BT: tl.constexpr):
    """Cumulative log-decay from the chunk start, in log2 units (multiply by log2(e) once).

    g_ptr: float32 log-decays, [tokens, H] (GATE 1) or [tokens, H, K] (GATE 2); row = t*H + h of
    the chunk's BT steps; padded steps load 0 so the last row holds the chunk's total decay.
    Returns G: [BT] (GATE 0/1) or [BT, BK] (GATE 2); zeros for GATE 0.
    """
    if GATE == 1:
        b_g = tl.load(g_ptr + row, mask=m_t, other=0.).to(tl.float32) * 1.4426950408889634
        G = tl.cumsum(b_g, axis=0)
    elif GATE == 2:
        b_g = tl.load(g_ptr + row[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                      other=0.).to(tl.float32) * 1.4426950408889634
        G = tl.cumsum(b_g, axis=0)
    else:
        G = tl.zeros([BT], dtype=tl.float32)
    return G


@triton.jit
def last_row(G, o_t, GATE: tl.constexpr, BT: tl.constexpr):
    """The chunk's total log2-decay: G at the last row ([] for GATE 0/1, [BK] for GATE 2)."""
    if GATE == 2:
        return tl.sum(tl.where((o_t == BT - 1)[:, None], G, 0.), axis=0)
    else:
        return tl.sum(tl.where(o_t == BT - 1, G, 0.), axis=0)


@triton.jit
def sub_rows(x, j, BT: tl.constexpr, SUB: tl.constexpr):
    """Row j of every SUB-row sub-chunk of x [BT, D], broadcast over its sub-chunk: [BT, D]."""
    NS: tl.constexpr = BT // SUB
    D: tl.constexpr = x.shape[1]
    x3 = tl.reshape(x, (NS, SUB, D))
    o_s = tl.arange(0, SUB)
    r = tl.sum(tl.where((o_s == j)[None, :, None], x3, 0.), axis=1)
    return tl.reshape(tl.broadcast_to(r[:, None, :], (NS, SUB, D)), (BT, D))


@triton.jit
def gla_scores(a, b, G, o_t, BT: tl.constexpr, SUB: tl.constexpr, DT: tl.constexpr,
               IEEE: tl.constexpr):
    """S_ij = sum_k a_ik b_jk exp2(G_ik - G_jk) for i >= j, else 0 (a, b, G: [BT, BK]).

    Two levels, every exponent <= 0: between sub-chunks (rows of sub-chunk s against all earlier
    columns) one matmul per s through the reference G_r = G at row s*SUB - 1, since
    exp(G_i - G_j) = exp(G_i - G_r) exp(G_r - G_j) with j <= r < i; inside a sub-chunk, column by
    column (SUB steps over all sub-chunks at once)."""
    S = tl.zeros([BT, BT], dtype=tl.float32)
    for s in tl.static_range(1, BT // SUB):
        G_r = tl.sum(tl.where((o_t == s * SUB - 1)[:, None], G, 0.), axis=0)
        a_s = tl.where((o_t // SUB == s)[:, None], a * tl.exp2(tl.minimum(G - G_r[None, :], 0.)), 0.)
        b_s = tl.where((o_t < s * SUB)[:, None], b * tl.exp2(tl.minimum(G_r[None, :] - G, 0.)), 0.)
        S += mm(a_s, tl.trans(b_s), DT, IEEE)
    o_in = o_t % SUB
    c_base = o_t - o_in
    for j in range(SUB):
        b_j = sub_rows(b, j, BT, SUB)
        G_j = sub_rows(G, j, BT, SUB)
        e = tl.exp2(tl.where((o_in >= j)[:, None], G - G_j, float("-inf")))
        col = tl.sum(a * b_j * e, axis=1)
        S = tl.where(o_t[None, :] == (c_base + j)[:, None], col[:, None], S)
    return S


@triton.jit
def gla_apply(D, b, G, o_t, BT: tl.constexpr, SUB: tl.constexpr, DT: tl.constexpr,
              IEEE: tl.constexpr):
    """X_ik = sum_{j <= i} D_ij b_jk exp2(G_ik - G_jk) (D: [BT, BT]; b, G: [BT, BK]); the same two
    levels as gla_scores."""
    X = tl.zeros(b.shape, dtype=tl.float32)
    for s in tl.static_range(1, BT // SUB):
        G_r = tl.sum(tl.where((o_t == s * SUB - 1)[:, None], G, 0.), axis=0)
        rows = (o_t // SUB == s)
        D_s = tl.where(rows[:, None] & (o_t < s * SUB)[None, :], D, 0.)
        b_s = tl.where((o_t < s * SUB)[:, None], b * tl.exp2(tl.minimum(G_r[None, :] - G, 0.)), 0.)
        X += tl.where(rows[:, None], tl.exp2(tl.minimum(G - G_r[None, :], 0.)), 0.) * mm(D_s, b_s, DT, IEEE)
    o_in = o_t % SUB
    c_base = o_t - o_in
    for j in range(SUB):
        b_j = sub_rows(b, j, BT, SUB)
        G_j = sub_rows(G, j, BT, SUB)
        d_j = tl.sum(tl.where(o_t[None, :] == (c_base + j)[:, None], D, 0.), axis=1)
        e = tl.exp2(tl.where((o_in >= j)[:, None], G - G_j, float("-inf")))
        X += d_j[:, None] * b_j * e
    return X


@triton.jit
def gla_apply_t(D, a, G, o_t, BT: tl.constexpr, SUB: tl.constexpr, DT: tl.constexpr,
                IEEE: tl.constexpr):
    """Y_jk = sum_{i >= j} D_ij a_ik exp2(G_ik - G_jk) (the transposed form of gla_apply)."""
    Y = tl.zeros(a.shape, dtype=tl.float32)
    for s in tl.static_range(1, BT // SUB):
        G_r = tl.sum(tl.where((o_t == s * SUB - 1)[:, None], G, 0.), axis=0)
        rows = (o_t // SUB == s)
        D_s = tl.where(rows[:, None] & (o_t < s * SUB)[None, :], D, 0.)
        a_s = tl.where(rows[:, None], a * tl.exp2(tl.minimum(G - G_r[None, :], 0.)), 0.)
        Y += (tl.where((o_t < s * SUB)[:, None], tl.exp2(tl.minimum(G_r[None, :] - G, 0.)), 0.)
              * mm(tl.trans(D_s), a_s, DT, IEEE))
    o_in = o_t % SUB
    c_base = o_t - o_in
    for i in range(SUB):
        a_i = sub_rows(a, i, BT, SUB)
        G_i = sub_rows(G, i, BT, SUB)
        d_i = tl.sum(tl.where(o_t[:, None] == (c_base + i)[None, :], D, 0.), axis=0)
        e = tl.exp2(tl.where((o_in <= i)[:, None], G_i - G, float("-inf")))
        Y += d_i[:, None] * a_i * e
    return Y


@triton.jit
def chunk_scores(a, b, G, o_t, GATE: tl.constexpr, BT: tl.constexpr, SUB: tl.constexpr,
                 DT: tl.constexpr, IEEE: tl.constexpr):
    """Decayed causal scores A_ij = a_i . b_j exp(G_i - G_j) for i >= j, 0 above the diagonal."""
    causal = o_t[:, None] >= o_t[None, :]
    if GATE == 2:
        A = gla_scores(a, b, G, o_t, BT, SUB, DT, IEEE)
    elif GATE == 1:
        A = mm(a, tl.trans(b), DT, IEEE) * tl.exp2(
            tl.where(causal, G[:, None] - G[None, :], float("-inf")))
    else:
        A = tl.where(causal, mm(a, tl.trans(b), DT, IEEE), 0.)
    return A


@triton.jit
def decay_rows(x, G, GATE: tl.constexpr):
    """x_i * exp(G_i) (rows of a [BT, *] tile decayed from the chunk start)."""
    if GATE == 2:
        return x * tl.exp2(G)
    elif GATE == 1:
        return x * tl.exp2(G)[:, None]
    else:
        return x


@triton.jit
def decay_to_end(x, G, G_last, GATE: tl.constexpr):
    """x_j * exp(G_last - G_j) (rows decayed to the chunk end)."""
    if GATE == 2:
        return x * tl.exp2(G_last[None, :] - G)
    elif GATE == 1:
        return x * tl.exp2(G_last - G)[:, None]
    else:
        return x


@triton.jit
def decay_state(S, G_last, GATE: tl.constexpr):
    """exp(G_last) S for the [BK, BV] state (per key row for GATE 2)."""
    if GATE == 2:
        return S * tl.exp2(G_last)[:, None]
    elif GATE == 1:
        return S * tl.exp2(G_last)
    else:
        return S


@triton.jit
def chunk_state_update(S, k, v, G, G_last, GATE: tl.constexpr, DT: tl.constexpr,
                       IEEE: tl.constexpr):
    """Inter-chunk state passing: S <- exp(G_last) S + (k exp(G_last - G))^T v."""
    return decay_state(S, G_last, GATE) + mm(tl.trans(decay_to_end(k, G, G_last, GATE)), v, DT, IEEE)


@triton.jit
def chunk_output(q, k, v, S, G, o_t, GATE: tl.constexpr, BT: tl.constexpr, SUB: tl.constexpr,
                 DT: tl.constexpr, IEEE: tl.constexpr):
    """o = (q exp(G)) S_prev + A v with A the decayed causal scores (the caller applies scale)."""
    A = chunk_scores(q, k, G, o_t, GATE, BT, SUB, DT, IEEE)
    return mm(decay_rows(q, G, GATE), S, DT, IEEE) + mm(A, v, DT, IEEE)


@triton.jit
def program_tiles(cu_ptr, T, H, K, V, IS_VARLEN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Where a (V-tile, sequence x head) program works: its head, token span, K/V offsets and
    masks, and the offsets/mask of its [BK, BV] block of the [N, H, K, V] states."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_h = i_nh % H
    bos, eos = seq_span(i_nh // H, cu_ptr, T, IS_VARLEN)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    p_s = (i_nh.to(tl.int64) * K + o_k[:, None]) * V + o_v[None, :]
    m_s = m_k[:, None] & m_v[None, :]
    return i_v, i_h, bos, eos, o_k, o_v, m_k, m_v, p_s, m_s


@triton.jit
def chunk_base(co_ptr, i_n, T, IS_VARLEN: tl.constexpr, BT: tl.constexpr):
    """Global index of sequence i_n's first chunk (chunks of all sequences numbered in order)."""
    if IS_VARLEN:
        base = tl.load(co_ptr + i_n).to(tl.int64)
    else:
        base = i_n.to(tl.int64) * tl.cdiv(T, BT)
    return base


@triton.jit
def load_state(ptr, p_s, m_s, HAS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """A float32 [BK, BV] state block, zeros when absent."""
    if HAS:
        S = tl.load(ptr + p_s, mask=m_s, other=0.).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    return S


# ---- kernels -----------------------------------------------------------------------------------

@triton.jit
def _load_rows(ptr, row, m_t, o_d, m_d, D):
    return tl.load(ptr + row[:, None] * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :],
                   other=0.).to(tl.float32)


@triton.jit
def _fwd_kernel(
    # pointers: q, k [tok, H, K]; v [tok, H, V]; g [tok, H(, K)] f32; h0 [N, H, K, V] f32;
    # outputs o [tok, H, V], ht [N, H, K, V] f32; cu [N + 1] (varlen)
    q_ptr, k_ptr, v_ptr, g_ptr, h0_ptr, o_ptr, ht_ptr, cu_ptr,
    # sizes and the query scale
    T, H, K, V, scale,
    # meta-parameters
    GATE: tl.constexpr, HAS_H0: tl.constexpr, IS_VARLEN: tl.constexpr, STATE_ONLY: tl.constexpr,
    BT: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr,
    IEEE: tl.constexpr,
):
    # STATE_ONLY: only the final state (no q, no o): the first pass of a split sequence
    i_v, i_h, bos, eos, o_k, o_v, m_k, m_v, p_s, m_s = program_tiles(cu_ptr, T, H, K, V, IS_VARLEN,
                                                                     BK, BV)
    o_t = tl.arange(0, BT)
    S = load_state(h0_ptr, p_s, m_s, HAS_H0, BK, BV)
    for c0 in range(bos, eos, BT):
        t = c0 + o_t
        m_t = t < eos
        row = t * H + i_h
        b_k = _load_rows(k_ptr, row, m_t, o_k, m_k, K)
        b_v = _load_rows(v_ptr, row, m_t, o_v, m_v, V)
        G = chunk_log_decay_cumsum(g_ptr, row, m_t, o_k, m_k, K, GATE, BT)
        G_last = last_row(G, o_t, GATE, BT)
        if not STATE_ONLY:
            # q unscaled into the matmuls (16-bit operands stay exact), the scale on the result
            b_q = _load_rows(q_ptr, row, m_t, o_k, m_k, K)
            b_o = chunk_output(b_q, b_k, b_v, S, G, o_t, GATE, BT, SUB, DT, IEEE) * scale
            tl.store(o_ptr + row[:, None] * V + o_v[None, :], b_o.to(o_ptr.dtype.element_ty),
                     mask=m_t[:, None] & m_v[None, :])
        S = chunk_state_update(S, b_k, b_v, G, G_last, GATE, DT, IEEE)
    tl.store(ht_ptr + p_s, S, mask=m_s)


@triton.jit
def _bwd_dq_kernel(
    # pointers: k [tok, H, K]; v, do [tok, H, V]; g; h0; output dq partial [NV, tok, H, K] f32;
    # hs [chunks, H, K, V] f32: the state at every chunk end (STORE_STATES); co: chunk offsets
    k_ptr, v_ptr, do_ptr, g_ptr, h0_ptr, dq_ptr, hs_ptr, cu_ptr, co_ptr,
    T, TOK, H, K, V, scale,
    GATE: tl.constexpr, HAS_H0: tl.constexpr, IS_VARLEN: tl.constexpr, STORE_STATES: tl.constexpr,
    BT: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr,
    IEEE: tl.constexpr,
):
    # dq_i = scale * [ (do_i S_prev^T) exp(G_i) + sum_{j<=i} (do_i . v_j) k_j exp(G_i - G_j) ]
    i_v, i_h, bos, eos, o_k, o_v, m_k, m_v, p_s, m_s = program_tiles(cu_ptr, T, H, K, V, IS_VARLEN,
                                                                     BK, BV)
    o_t = tl.arange(0, BT)
    S = load_state(h0_ptr, p_s, m_s, HAS_H0, BK, BV)
    dq_base = dq_ptr + i_v.to(tl.int64) * TOK * H * K
    c_first = chunk_base(co_ptr, tl.program_id(1) // H, T, IS_VARLEN, BT)
    for c0 in range(bos, eos, BT):
        t = c0 + o_t
        m_t = t < eos
        row = t * H + i_h
        b_k = _load_rows(k_ptr, row, m_t, o_k, m_k, K)
        b_v = _load_rows(v_ptr, row, m_t, o_v, m_v, V)
        b_do = _load_rows(do_ptr, row, m_t, o_v, m_v, V)
        G = chunk_log_decay_cumsum(g_ptr, row, m_t, o_k, m_k, K, GATE, BT)
        G_last = last_row(G, o_t, GATE, BT)
        b_inter = decay_rows(mm(b_do, tl.trans(S), DT, IEEE), G, GATE)
        if GATE == 2:
            b_dq = b_inter + gla_apply(mm(b_do, tl.trans(b_v), DT, IEEE), b_k, G, o_t, BT, SUB, DT, IEEE)
        else:
            D = chunk_scores(b_do, b_v, G, o_t, GATE, BT, SUB, DT, IEEE)
            b_dq = b_inter + mm(D, b_k, DT, IEEE)
        tl.store(dq_base + row[:, None] * K + o_k[None, :], b_dq * scale,
                 mask=m_t[:, None] & m_k[None, :])
        S = chunk_state_update(S, b_k, b_v, G, G_last, GATE, DT, IEEE)
        if STORE_STATES:
            i_c = c_first + (c0 - bos) // BT
            tl.store(hs_ptr + ((i_c * H + i_h) * K + o_k[:, None]) * V + o_v[None, :], S, mask=m_s)


@triton.jit
def _bwd_dkv_kernel(
    # pointers: q, k [tok, H, K]; v, do [tok, H, V]; g; dht [N, H, K, V] f32;
    # outputs dk partial [NV, tok, H, K] f32, dv [tok, H, V], dh0 [N, H, K, V] f32;
    # DECAY_GRAD: hs [chunks, H, K, V] the chunk-end states, r [NV, chunks, H, K] f32 output
    q_ptr, k_ptr, v_ptr, do_ptr, g_ptr, dht_ptr, dk_ptr, dv_ptr, dh0_ptr, hs_ptr, r_ptr, cu_ptr,
    co_ptr, T, TOK, NCH, H, K, V, scale,
    GATE: tl.constexpr, IS_VARLEN: tl.constexpr, STATE_ONLY: tl.constexpr, DECAY_GRAD: tl.constexpr,
    BT: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr,
    IEEE: tl.constexpr,
):
    # STATE_ONLY: only dh0 (no k, v, no dk, dv): the first pass of a split sequence.
    # right to left with dS (gradient of the state at the chunk end) in registers:
    #   dv_j = (k_j exp(G_last - G_j)) dS + sum_{i>=j} A_ij do_i
    #   dk_j = exp(G_last - G_j) (v_j dS^T) + sum_{i>=j} (do_i . v_j) q_i exp(G_i - G_j)
    #   dS  <- exp(G_last) dS + (q exp(G))^T do
    # DECAY_GRAD: r_c = sum_v dS (.) S_end, dS and S at the chunk end: the log-decay gradient of
    # everything after chunk c (so dg needs only a cumsum inside each chunk, see chunk_decay_grad)
    i_v, i_h, bos, eos, o_k, o_v, m_k, m_v, p_s, m_s = program_tiles(cu_ptr, T, H, K, V, IS_VARLEN,
                                                                     BK, BV)
    o_t = tl.arange(0, BT)
    dS = tl.load(dht_ptr + p_s, mask=m_s, other=0.).to(tl.float32)
    dk_base = dk_ptr + i_v.to(tl.int64) * TOK * H * K
    c_first = chunk_base(co_ptr, tl.program_id(1) // H, T, IS_VARLEN, BT)
    n_chunks = tl.cdiv(eos - bos, BT)
    for i_c in range(0, n_chunks):
        t = bos + (n_chunks - 1 - i_c) * BT + o_t
        if DECAY_GRAD:
            i_g = c_first + n_chunks - 1 - i_c
            S_end = tl.load(hs_ptr + ((i_g * H + i_h) * K + o_k[:, None]) * V + o_v[None, :],
                            mask=m_s, other=0.)
            tl.store(r_ptr + ((i_v.to(tl.int64) * NCH + i_g) * H + i_h) * K + o_k,
                     tl.sum(dS * S_end, axis=1), mask=m_k)
        m_t = t < eos
        row = t * H + i_h
        b_q = _load_rows(q_ptr, row, m_t, o_k, m_k, K)     # unscaled: the scale goes on results
        b_do = _load_rows(do_ptr, row, m_t, o_v, m_v, V)
        G = chunk_log_decay_cumsum(g_ptr, row, m_t, o_k, m_k, K, GATE, BT)
        G_last = last_row(G, o_t, GATE, BT)
        if not STATE_ONLY:
            b_k = _load_rows(k_ptr, row, m_t, o_k, m_k, K)
            b_v = _load_rows(v_ptr, row, m_t, o_v, m_v, V)
            A = chunk_scores(b_q, b_k, G, o_t, GATE, BT, SUB, DT, IEEE) * scale
            b_dv = (mm(decay_to_end(b_k, G, G_last, GATE), dS, DT, IEEE)
                    + mm(tl.trans(A), b_do, DT, IEEE))
            b_dk = decay_to_end(mm(b_v, tl.trans(dS), DT, IEEE), G, G_last, GATE)
            if GATE == 2:
                b_dk += gla_apply_t(mm(b_do, tl.trans(b_v), DT, IEEE), b_q, G, o_t, BT, SUB, DT,
                                    IEEE) * scale
            else:
                D = chunk_scores(b_do, b_v, G, o_t, GATE, BT, SUB, DT, IEEE)
                b_dk += mm(tl.trans(D), b_q, DT, IEEE) * scale
            tl.store(dv_ptr + row[:, None] * V + o_v[None, :], b_dv.to(dv_ptr.dtype.element_ty),
                     mask=m_t[:, None] & m_v[None, :])
            tl.store(dk_base + row[:, None] * K + o_k[None, :], b_dk,
                     mask=m_t[:, None] & m_k[None, :])
        dS = (decay_state(dS, G_last, GATE)
              + mm(tl.trans(decay_rows(b_q, G, GATE)), b_do, DT, IEEE) * scale)
    tl.store(dh0_ptr + p_s, dS, mask=m_s)


@triton.jit
def _recurrent_fwd_kernel(
    # the step-by-step form (decoding): same pointers and layout as _fwd_kernel
    q_ptr, k_ptr, v_ptr, g_ptr, h0_ptr, o_ptr, ht_ptr, cu_ptr,
    T, H, K, V, scale,
    GATE: tl.constexpr, HAS_H0: tl.constexpr, IS_VARLEN: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
):
    # S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,  o_t = scale q_t S_t, one token at a time
    i_v, i_h, bos, eos, o_k, o_v, m_k, m_v, p_s, m_s = program_tiles(cu_ptr, T, H, K, V, IS_VARLEN,
                                                                     BK, BV)
    S = load_state(h0_ptr, p_s, m_s, HAS_H0, BK, BV)
    for t in range(bos, eos):
        row = t * H + i_h
        b_q = tl.load(q_ptr + row * K + o_k, mask=m_k, other=0.).to(tl.float32) * scale
        b_k = tl.load(k_ptr + row * K + o_k, mask=m_k, other=0.).to(tl.float32)
        b_v = tl.load(v_ptr + row * V + o_v, mask=m_v, other=0.).to(tl.float32)
        if GATE == 1:
            S = S * tl.exp(tl.load(g_ptr + row).to(tl.float32))
        elif GATE == 2:
            b_g = tl.load(g_ptr + row * K + o_k, mask=m_k, other=0.).to(tl.float32)
            S = S * tl.exp(b_g)[:, None]
        S += b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_q[:, None] * S, axis=0)
        tl.store(o_ptr + row * V + o_v, b_o.to(o_ptr.dtype.element_ty), mask=m_v)
    tl.store(ht_ptr + p_s, S, mask=m_s)


@triton.jit
def _bwd_finish_kernel(
    # q, k [tok, H, K]; dq_p, dk_p [NV, tok, H, K] f32 partials (one per V tile); r [chunks, H]
    # (GATE 1) or [chunks, H, K] (GATE 2) f32; outputs dq, dk [tok, H, K], dg [tok, H(, K)] f32
    q_ptr, k_ptr, dqp_ptr, dkp_ptr, r_ptr, dq_ptr, dk_ptr, dg_ptr, cu_ptr, co_ptr,
    T, H, K, NV, nv_stride,
    GATE: tl.constexpr, IS_VARLEN: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):
    # dq, dk = sums of the V-tile partials; with a gate, dG = q dq - k dk (summed over K for a
    # scalar gate) and dg_t = sum_{s >= t in t's chunk} dG_s + r_chunk, so rounding errors never
    # travel past a chunk (r_c, the gradient of everything after chunk c, is exact)
    i_c, i_n = tl.program_id(0), tl.program_id(1)
    bos, eos = seq_span(i_n, cu_ptr, T, IS_VARLEN)
    c_first = chunk_base(co_ptr, i_n, T, IS_VARLEN, BT)
    D = H * K
    o_t = tl.arange(0, BT)
    if GATE == 1:
        m_c = tl.arange(0, BC) < K                 # one program per head: its K columns
        o_c = i_c * K + tl.arange(0, BC)
    else:
        o_c = i_c * BC + tl.arange(0, BC)
        m_c = o_c < D
    for i in range(0, tl.cdiv(eos - bos, BT)):
        t = bos + i * BT + o_t
        m_t = t < eos
        m = m_t[:, None] & m_c[None, :]
        p = t[:, None] * D + o_c[None, :]
        b_dq = tl.zeros([BT, BC], dtype=tl.float32)
        b_dk = tl.zeros([BT, BC], dtype=tl.float32)
        p_dq = dqp_ptr + p
        p_dk = dkp_ptr + p
        for _ in range(0, NV):
            b_dq += tl.load(p_dq, mask=m, other=0.)
            b_dk += tl.load(p_dk, mask=m, other=0.)
            p_dq += nv_stride
            p_dk += nv_stride
        tl.store(dq_ptr + p, b_dq.to(dq_ptr.dtype.element_ty), mask=m)
        tl.store(dk_ptr + p, b_dk.to(dk_ptr.dtype.element_ty), mask=m)
        if GATE > 0:
            x = (tl.load(q_ptr + p, mask=m, other=0.).to(tl.float32) * b_dq
                 - tl.load(k_ptr + p, mask=m, other=0.).to(tl.float32) * b_dk)
            if GATE == 1:
                xs = tl.sum(x, axis=1)
                r = tl.load(r_ptr + (c_first + i) * H + i_c)
                tl.store(dg_ptr + t * H + i_c, tl.sum(xs, axis=0) - tl.cumsum(xs, axis=0) + xs + r,
                         mask=m_t)
            else:
                r = tl.load(r_ptr + (c_first + i) * D + o_c, mask=m_c, other=0.)
                y = tl.sum(x, axis=0)[None, :] - tl.cumsum(x, axis=0) + x + r[None, :]
                tl.store(dg_ptr + p, y, mask=m)


# ---- launchers ---------------------------------------------------------------------------------

def _gate_mode(g: Optional[torch.Tensor]) -> int:
    return 0 if g is None else (1 if g.dim() == 3 else 2)


# Tile choices (the lead tunes these on the GPU): chunk BT, sub-chunk SUB for per-key decays,
# K in one tile (BK), V split in tiles of BV (each a program).
CHUNK = 64          # chunk length on the GPU for K <= 128 (32 above, and in the interpreter)
SUB_CHUNK = 16      # per-key decays: sub-chunk handled column by column
MAX_BV = 64         # V tile for K <= 128 (32 above)


def _blocks(K: int, V: int, gate: int):
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, min(triton.next_power_of_2(V), MAX_BV if BK <= 128 else 32))
    BT = 32 if triton_interpret() else (CHUNK if BK <= 128 else 32)
    SUB = min(SUB_CHUNK, BT)
    warps = 4 if BK * BV <= 64 * 64 else 8
    return BT, SUB, BK, BV, warps


def _common(q, v, g, cu_seqlens):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    gate = _gate_mode(g)
    BT, SUB, BK, BV, warps = _blocks(K, V, gate)
    ieee = 1 if q.dtype == torch.float32 else (2 if triton_interpret() else 0)
    # software pipelining buffers whole tiles in shared memory: fewer stages for big/fp32 tiles
    stages = 1 if (q.dtype == torch.float32 or BK > 128) else 2
    meta = dict(GATE=gate, BT=BT, SUB=SUB, BK=BK, BV=BV, DT=_TL_DTYPE[q.dtype], IEEE=ieee,
                num_warps=warps, num_stages=stages)
    return B, T, H, K, V, N, meta


def _dummy(x):
    return x.new_empty(1)


# ---- sequence splitting ----------------------------------------------------------------------
# A program walks one whole sequence, so (sequences x heads x V-tiles) programs may be too few to
# fill the GPU (B=2, H=16, T=16384: 64 programs on 132 SMs). Then each sequence is cut into S
# segments (whole chunks) run as a packed batch: a cheap first pass gets every segment's state
# from zero (STATE_ONLY), a scan over the S segments gives each its true initial state (decayed
# by the segment totals), and the full pass runs with those. The backward does the same for the
# state gradient, right to left. Packed (cu_seqlens) inputs are not split.

PROGRAMS_PER_SM = 2        # aim for this many programs per SM before splitting stops
MIN_SEGMENT_CHUNKS = 8     # never cut segments shorter than this many chunks
FORCE_SEGMENTS: Optional[int] = None   # tests: force S (the interpreter has no SM count)




def _num_segments(B, T, H, NV, BT, device, cu_seqlens) -> int:
    if cu_seqlens is not None:
        return 1
    if FORCE_SEGMENTS is not None:
        S = FORCE_SEGMENTS
    elif device.type != "cuda":
        return 1
    else:
        sms = sm_count(device)
        S = min(-(-PROGRAMS_PER_SM * sms // (B * H * NV)), T // (MIN_SEGMENT_CHUNKS * BT))
    if S <= 1:
        return 1
    seg = -(-(-(-T // S)) // BT) * BT          # ceil(T / S) rounded up to whole chunks
    return -(-T // seg)


def _segment_plan(B, T, S, BT, device):
    """(cu [B*S + 1] int32 of the segments in the flattened [B*T] tokens, segment length)."""
    seg = -(-(-(-T // S)) // BT) * BT
    starts = (torch.arange(B, device=device)[:, None] * T
              + (torch.arange(S, device=device) * seg).clamp(max=T)[None, :]).flatten()
    cu = torch.cat([starts, starts.new_full((1,), B * T)]).to(torch.int32)
    return cu, seg


def _segment_decay(g, B, T, S, seg):
    """exp(total log-decay of each segment), shaped to multiply [B, S, H, K, V] states."""
    if g is None:
        return None
    pad = S * seg - T
    gp = torch.nn.functional.pad(g, (0, 0) * (g.dim() - 2) + (0, pad)) if pad else g
    tot = gp.view(B, S, seg, *g.shape[2:]).sum(2).exp()    # [B, S, H] or [B, S, H, K]
    return tot[..., None, None] if g.dim() == 3 else tot[..., None]


def _launch_fwd(q, k, v, g, h0, cu, T, N, state_only, meta, scale):
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    o = v.new_empty(1) if state_only else torch.empty_like(v)
    ht = q.new_empty((N, H, K, V), dtype=torch.float32)
    grid = (triton.cdiv(V, meta["BV"]), N * H)
    _fwd_kernel[grid](q, k, v, _dummy(q) if g is None else g, _dummy(ht) if h0 is None else h0,
                      o, ht, _dummy(ht) if cu is None else cu, T, H, K, V, float(scale),
                      HAS_H0=h0 is not None, IS_VARLEN=cu is not None, STATE_ONLY=state_only, **meta)
    return o, ht


def _segment_initial_states(k, v, g, h0, cu, B, T, S, seg, meta):
    """Every segment's true initial state [B*S, H, K, V] and the sequences' final states."""
    H, K, V = k.shape[2], k.shape[3], v.shape[3]
    _, loc = _launch_fwd(k, k, v, g, None, cu, T, B * S, True, meta, 1.0)
    loc = loc.view(B, S, H, K, V)
    dec = _segment_decay(g, B, T, S, seg)
    h = loc.new_zeros(B, H, K, V) if h0 is None else h0
    inits = []
    for s in range(S):
        inits.append(h)
        h = (h if dec is None else dec[:, s] * h) + loc[:, s]
    return torch.stack(inits, 1).view(B * S, H, K, V), h, dec


def chunk_fwd(q, k, v, g, h0, cu_seqlens, scale) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward: q, k [B, T, H, K]; v [B, T, H, V]; g None, [B, T, H] or [B, T, H, K] float32
    log-decays (<= 0); h0 None or [N, H, K, V] float32; cu_seqlens None or int [N + 1] (B == 1).
    Returns (o [B, T, H, V] in v's dtype, final state [N, H, K, V] float32). All contiguous."""
    B, T, H, K, V, N, meta = _common(q, v, g, cu_seqlens)
    S = _num_segments(B, T, H, triton.cdiv(V, meta["BV"]), meta["BT"], q.device, cu_seqlens)
    if S == 1:
        return _launch_fwd(q, k, v, g, h0, cu_seqlens, T, N, False, meta, scale)
    cu, seg = _segment_plan(B, T, S, meta["BT"], q.device)
    h0s, _, _ = _segment_initial_states(k, v, g, h0, cu, B, T, S, seg, meta)
    o, hts = _launch_fwd(q, k, v, g, h0s, cu, T, B * S, False, meta, scale)
    return o, hts.view(B, S, H, K, V)[:, -1].contiguous()


def recurrent_fwd(q, k, v, g, h0, cu_seqlens, scale) -> Tuple[torch.Tensor, torch.Tensor]:
    """The step-by-step forward (for decoding a few tokens): same contract as `chunk_fwd`."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    BK = triton.next_power_of_2(K)
    BV = min(triton.next_power_of_2(V), max(16, 4096 // BK))
    o = torch.empty_like(v)
    ht = q.new_empty((N, H, K, V), dtype=torch.float32)
    _recurrent_fwd_kernel[(triton.cdiv(V, BV), N * H)](
        q, k, v, _dummy(q) if g is None else g, _dummy(ht) if h0 is None else h0, o, ht,
        _dummy(ht) if cu_seqlens is None else cu_seqlens, T, H, K, V, float(scale),
        GATE=_gate_mode(g), HAS_H0=h0 is not None, IS_VARLEN=cu_seqlens is not None, BK=BK, BV=BV,
        num_warps=4)
    return o, ht


def _chunk_offsets(cu, BT):
    """Index of every sequence's first chunk when all sequences' chunks are numbered in order."""
    n = (cu[1:] - cu[:-1] + BT - 1) // BT
    return (torch.cumsum(n, 0) - n).to(torch.int32)


def chunk_bwd(q, k, v, g, h0, cu_seqlens, scale, ht, do, dht):
    """Backward of `chunk_fwd`. ht: its final state; do [B, T, H, V]; dht [N, H, K, V] float32.
    Returns (dq, dk, dv in the input dtype, dg float32 like g (or None), dh0 float32 [N, H, K, V]).

    dg: dG_t = q_t dq_t - k_t dk_t is the gradient of the cumulative log-decay, so dg is its reverse
    cumsum; summed over a whole sequence the rounding errors of dq, dk would add up (sqrt(T) times
    a 16-bit rounding), so the cumsum runs inside each chunk only and everything after the chunk
    enters exactly through r_c = sum_v dS (.) S at the chunk end (the dq pass stores the chunk-end
    states S, the reverse pass has dS)."""
    B, T, H, K, V, N, meta = _common(q, v, g, cu_seqlens)
    BT = meta["BT"]
    NV = triton.cdiv(V, meta["BV"])
    TOK = B * T
    gg = _dummy(q) if g is None else g
    S = _num_segments(B, T, H, NV, BT, q.device, cu_seqlens)
    if S == 1:
        cu, NP, h0p, dhtp = cu_seqlens, N, h0, dht
    else:
        cu, seg = _segment_plan(B, T, S, BT, q.device)
        NP = B * S
        h0p, _, dec = _segment_initial_states(k, v, g, h0, cu, B, T, S, seg, meta)
        # every segment's local state gradient at its start (from zero at its end), then a scan
        # right to left gives the true gradient at every segment end
        loc = q.new_empty((NP, H, K, V), dtype=torch.float32)
        _bwd_dkv_kernel[(NV, NP * H)](q, k, v, do, gg, torch.zeros_like(loc), _dummy(loc), _dummy(v),
                                      loc, _dummy(loc), _dummy(loc), cu, _dummy(cu), T, TOK, 0, H,
                                      K, V, float(scale), IS_VARLEN=True, STATE_ONLY=True,
                                      DECAY_GRAD=False, **meta)
        loc = loc.view(B, S, H, K, V)
        d = dht
        ends = [None] * S
        for s in range(S - 1, -1, -1):
            ends[s] = d
            d = (d if dec is None else dec[:, s] * d) + loc[:, s]
        dhtp = torch.stack(ends, 1).view(NP, H, K, V)
    gated = g is not None
    # chunks numbered in order over all (segments of) sequences; same numbering split or not
    NCH = B * triton.cdiv(T, BT) if cu_seqlens is None else TOK // BT + N
    co = _dummy(ht) if cu is None else _chunk_offsets(cu, BT)
    hs = q.new_empty((NCH, H, K, V), dtype=torch.float32) if gated else _dummy(ht)
    r = q.new_empty((NV, NCH, H, K), dtype=torch.float32) if gated else _dummy(ht)
    grid = (NV, NP * H)
    cu_arg = _dummy(ht) if cu is None else cu
    dq_p = q.new_empty((NV, B, T, H, K), dtype=torch.float32)
    dk_p = q.new_empty((NV, B, T, H, K), dtype=torch.float32)
    dv = torch.empty_like(v)
    dh0 = q.new_empty((NP, H, K, V), dtype=torch.float32)
    _bwd_dq_kernel[grid](k, v, do, gg, _dummy(ht) if h0p is None else h0p, dq_p, hs, cu_arg, co,
                         T, TOK, H, K, V, float(scale), HAS_H0=h0p is not None,
                         IS_VARLEN=cu is not None, STORE_STATES=gated, **meta)
    _bwd_dkv_kernel[grid](q, k, v, do, gg, dhtp.contiguous(), dk_p, dv, dh0, hs, r, cu_arg, co,
                          T, TOK, NCH, H, K, V, float(scale), IS_VARLEN=cu is not None,
                          STATE_ONLY=False, DECAY_GRAD=gated, **meta)
    if S > 1:
        dh0 = dh0.view(B, S, H, K, V)[:, 0].contiguous()
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    gate = meta["GATE"]
    dg = None
    R = _dummy(ht)
    if gate:
        dg = q.new_empty(g.shape, dtype=torch.float32)
        R = r.sum(0) if NV > 1 else r[0]                            # [chunks, H, K]
        R = (R.sum(-1) if gate == 1 else R).contiguous()
    BC = triton.next_power_of_2(K) if gate == 1 else min(128, triton.next_power_of_2(H * K))
    fgrid = (H if gate == 1 else triton.cdiv(H * K, BC), N)
    _bwd_finish_kernel[fgrid](
        q, k, dq_p, dk_p, R, dq, dk, _dummy(ht) if dg is None else dg,
        _dummy(ht) if cu_seqlens is None else cu_seqlens,
        _dummy(ht) if cu_seqlens is None else _chunk_offsets(cu_seqlens, BT),
        T, H, K, NV, TOK * H * K, GATE=gate, IS_VARLEN=cu_seqlens is not None, BT=BT, BC=BC)
    return dq, dk, dv, dg, dh0
