"""Triton kernels for linear_scan: a chunked mix of time-parallel and time-sequential.

Every program owns BLOCK_C channels and walks the whole sequence in tiles of BLOCK_T steps. Inside
a tile all loads are issued at once and the recurrence is solved by a log-depth associative scan
along time; across tiles a float32 carry per channel is passed sequentially. That keeps
BLOCK_C*BLOCK_T*2 elements in flight per program (bandwidth) while doing O(T) work overall.

Tensors arrive on a canonical view: element (o, t, c) at o*s_o + t*s_t + c*s_c (int64 offsets).
A pass that runs right to left (reverse=True forward, and the ordinary backward) still loads each
tile in ascending address order (descending addresses defeat Triton's vectorisation: measured 4x
slower) and scans it with `reverse=True`; tiles are visited from the end, and the carry sits in the
tile's first column instead of its last.
Complex64 tensors come in as float32 pairs (re at +0, im at +1; strides in float32 units).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .._config import triton_interpret
from .._launch import cdiv, next_power_of_2, fast_kernel
from .._device import sm_count
# the pointer for an output nobody reads (STORE_HT / STORE_DH0 off: never written): the chunk
# engine's persistent 1-element tensor per (device, dtype), no allocation per call
from ..chunk.common import dummy as _dummy


@triton.jit
def _combine_real(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2): h -> a2 * (a1 * h + b1) + b2
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _combine_complex(a1r, a1i, b1r, b1i, a2r, a2i, b2r, b2i):
    ar = a1r * a2r - a1i * a2i
    ai = a1r * a2i + a1i * a2r
    br = b1r * a2r - b1i * a2i + b2r
    bi = b1r * a2i + b1i * a2r + b2i
    return ar, ai, br, bi


@triton.jit
def _tile_start(i_t, lo, hi, BLOCK_T: tl.constexpr, FLIP: tl.constexpr):
    # first time index of the i_t-th tile of [lo, hi) in processing order (outside: masked)
    if FLIP:
        return hi - (i_t + 1) * BLOCK_T
    else:
        return lo + i_t * BLOCK_T


@triton.jit
def _cmul(xr, xi, yr, yi):
    return xr * yr - xi * yi, xr * yi + xi * yr


@triton.jit
def _carry_of(x, is_end):
    # the value at the tile's last processed column, per channel
    return tl.sum(tl.where(is_end, x, 0.0), axis=1)


@triton.jit
def _linear_scan_fwd_kernel(
    # pointers: inputs a, b [O, T, C]; optional h0 [O, NC, C] (state dtype); outputs h [O, T, C],
    # hT [O, NC, C] (each chunk's last state); SUMMARY: sa [O, NC, C] (each chunk's product of a)
    a_ptr, b_ptr, h0_ptr, h_ptr, hT_ptr, sa_ptr,
    # sizes: time is split in NC chunks of CHUNK steps, one program per (channel block, o, chunk)
    T, C, CHUNK, NC,
    # strides of a/b/h in elements (float32 units for complex); states are contiguous
    s_o, s_t, s_c,
    # meta-parameters; SUMMARY: write only (sa, hT) per chunk, not h; STORE_HT=False: nobody reads
    # the end states (hT_ptr is a dummy: never written)
    HAS_H0: tl.constexpr, REVERSE: tl.constexpr, COMPLEX: tl.constexpr, SUMMARY: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, STORE_HT: tl.constexpr,
):
    i_c, i_o, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    CW: tl.constexpr = 2 if COMPLEX else 1  # float32 words per state element
    p_state = (i_o.to(tl.int64) * NC + i_k) * C * CW + o_c * CW
    lo = i_k * CHUNK
    hi = lo + CHUNK  # not clipped to T: T's divisibility keeps the masks vectorisable
    acc_r = tl.full([BLOCK_C], 1.0, dtype=tl.float32)  # SUMMARY: product of a over the chunk
    acc_i = tl.zeros([BLOCK_C], dtype=tl.float32)
    base_c = i_o.to(tl.int64) * s_o + o_c.to(tl.int64) * s_c
    base = base_c[:, None]
    if HAS_H0:
        carry_r = tl.load(h0_ptr + p_state, mask=m_c, other=0.0).to(tl.float32)
        if COMPLEX:
            carry_i = tl.load(h0_ptr + p_state + 1, mask=m_c, other=0.0).to(tl.float32)
    else:
        carry_r = tl.zeros([BLOCK_C], dtype=tl.float32)
        if COMPLEX:
            carry_i = tl.zeros([BLOCK_C], dtype=tl.float32)
    o_r = tl.arange(0, BLOCK_T)
    is_end = (o_r == (0 if REVERSE else BLOCK_T - 1))[None, :]
    for i_t in range(0, tl.cdiv(CHUNK, BLOCK_T)):  # past-T tiles of the last chunk: all masked
        t = _tile_start(i_t, lo, hi, BLOCK_T, REVERSE) + o_r
        m = m_c[:, None] & ((t >= lo) & (t < hi) & (t < T))[None, :]
        p = base + t.to(tl.int64)[None, :] * s_t
        # padding with the identity (a=1, b=0) keeps the tile's last column the true carry
        ar = tl.load(a_ptr + p, mask=m, other=1.0).to(tl.float32)
        br = tl.load(b_ptr + p, mask=m, other=0.0).to(tl.float32)
        if COMPLEX:
            ai = tl.load(a_ptr + p + 1, mask=m, other=0.0).to(tl.float32)
            bi = tl.load(b_ptr + p + 1, mask=m, other=0.0).to(tl.float32)
            ar, ai, br, bi = tl.associative_scan((ar, ai, br, bi), 1, _combine_complex, reverse=REVERSE)
            hr = br + ar * carry_r[:, None] - ai * carry_i[:, None]
            him = bi + ar * carry_i[:, None] + ai * carry_r[:, None]
            if SUMMARY:
                acc_r, acc_i = _cmul(acc_r, acc_i, _carry_of(ar, is_end), _carry_of(ai, is_end))
            else:
                tl.store(h_ptr + p, hr, mask=m)
                tl.store(h_ptr + p + 1, him, mask=m)
            carry_r = _carry_of(hr, is_end)
            carry_i = _carry_of(him, is_end)
        else:
            ar, br = tl.associative_scan((ar, br), 1, _combine_real, reverse=REVERSE)
            h = br + ar * carry_r[:, None]
            if SUMMARY:
                acc_r = acc_r * _carry_of(ar, is_end)
            else:
                tl.store(h_ptr + p, h.to(h_ptr.dtype.element_ty), mask=m)
            carry_r = _carry_of(h, is_end)
    if STORE_HT or SUMMARY:
        tl.store(hT_ptr + p_state, carry_r, mask=m_c)
        if COMPLEX:
            tl.store(hT_ptr + p_state + 1, carry_i, mask=m_c)
    if SUMMARY:
        tl.store(sa_ptr + p_state, acc_r, mask=m_c)
        if COMPLEX:
            tl.store(sa_ptr + p_state + 1, acc_i, mask=m_c)


@triton.jit
def _linear_scan_bwd_kernel(
    # pointers: a, h, dh [O, T, C]; h0 [O, C] and the incoming gradient carry dhT [O, NC, C] (state
    # dtype); outputs da, db [O, T, C], dh0 [O, NC, C]; SUMMARY: sa [O, NC, C] (product of the
    # coefficients), dh0 <- each chunk's last g from a zero carry, and no da/db
    a_ptr, h_ptr, h0_ptr, dh_ptr, dhT_ptr, da_ptr, db_ptr, dh0_ptr, sa_ptr,
    # sizes: time is split in NC chunks of CHUNK steps
    T, C, CHUNK, NC,
    # strides of a/h/dh/da/db in elements (float32 units for complex)
    s_o, s_t, s_c,
    # meta-parameters; HAS_CARRY=False: no gradient enters past the last step (dhT_ptr unused);
    # STORE_DH0=False (not SUMMARY): nobody reads dh0 (dh0_ptr is a dummy: never written)
    HAS_H0: tl.constexpr, REVERSE: tl.constexpr, COMPLEX: tl.constexpr, SUMMARY: tl.constexpr,
    HAS_CARRY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    STORE_DH0: tl.constexpr,
):
    # g_t = dh_t + conj(a[t_next]) g[t_next], walked opposite to the forward pass: t_next = t+1
    # (t-1 for reverse=True) is the step processed just before t. The forward predecessor of t,
    # t_pred = t-1 (t+1), gives da_t = g_t conj(h[t_pred]) (h0 beyond the ends).
    FLIP: tl.constexpr = not REVERSE
    STEP: tl.constexpr = 1 if FLIP else -1  # t_next - t
    i_c, i_o, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    CW: tl.constexpr = 2 if COMPLEX else 1
    p_h0 = i_o.to(tl.int64) * C * CW + o_c * CW
    p_state = (i_o.to(tl.int64) * NC + i_k) * C * CW + o_c * CW
    lo = i_k * CHUNK
    hi = lo + CHUNK  # not clipped to T: T's divisibility keeps the masks vectorisable
    acc_r = tl.full([BLOCK_C], 1.0, dtype=tl.float32)
    acc_i = tl.zeros([BLOCK_C], dtype=tl.float32)
    base_c = i_o.to(tl.int64) * s_o + o_c.to(tl.int64) * s_c
    base = base_c[:, None]
    carry_r = tl.zeros([BLOCK_C], dtype=tl.float32)
    carry_i = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_CARRY:  # never with SUMMARY (summaries start from a zero carry)
        carry_r = tl.load(dhT_ptr + p_state, mask=m_c, other=0.0).to(tl.float32)
        if COMPLEX:
            carry_i = tl.load(dhT_ptr + p_state + 1, mask=m_c, other=0.0).to(tl.float32)
    if HAS_H0:
        h0r = tl.load(h0_ptr + p_h0, mask=m_c, other=0.0).to(tl.float32)
        if COMPLEX:
            h0i = tl.load(h0_ptr + p_h0 + 1, mask=m_c, other=0.0).to(tl.float32)
    else:
        h0r = tl.zeros([BLOCK_C], dtype=tl.float32)
        if COMPLEX:
            h0i = tl.zeros([BLOCK_C], dtype=tl.float32)
    o_r = tl.arange(0, BLOCK_T)
    is_end = (o_r == (0 if FLIP else BLOCK_T - 1))[None, :]
    for i_t in range(0, tl.cdiv(CHUNK, BLOCK_T)):  # past-T tiles of the last chunk: all masked
        t = _tile_start(i_t, lo, hi, BLOCK_T, FLIP) + o_r
        m = m_c[:, None] & ((t >= lo) & (t < hi) & (t < T))[None, :]
        p = base + t.to(tl.int64)[None, :] * s_t
        p_next = p + STEP * s_t
        m_next = m & ((t + STEP >= 0) & (t + STEP < T))[None, :]
        p_pred = p - STEP * s_t
        m_pred = m & ((t - STEP >= 0) & (t - STEP < T))[None, :]
        is_h0 = m_c[:, None] & ((t - STEP == -1) | (t - STEP == T))[None, :]
        cr = tl.load(a_ptr + p_next, mask=m_next, other=1.0).to(tl.float32)
        gr = tl.load(dh_ptr + p, mask=m, other=0.0).to(tl.float32)
        hr = tl.load(h_ptr + p_pred, mask=m_pred, other=0.0).to(tl.float32)
        hr = tl.where(is_h0, h0r[:, None], hr)
        if COMPLEX:
            ci = -tl.load(a_ptr + p_next + 1, mask=m_next, other=0.0).to(tl.float32)  # conj(a)
            gi = tl.load(dh_ptr + p + 1, mask=m, other=0.0).to(tl.float32)
            him = tl.load(h_ptr + p_pred + 1, mask=m_pred, other=0.0).to(tl.float32)
            him = tl.where(is_h0, h0i[:, None], him)
            cr, ci, gr, gi = tl.associative_scan((cr, ci, gr, gi), 1, _combine_complex, reverse=FLIP)
            g_r = gr + cr * carry_r[:, None] - ci * carry_i[:, None]
            g_i = gi + cr * carry_i[:, None] + ci * carry_r[:, None]
            if SUMMARY:
                acc_r, acc_i = _cmul(acc_r, acc_i, _carry_of(cr, is_end), _carry_of(ci, is_end))
            else:
                tl.store(db_ptr + p, g_r, mask=m)
                tl.store(db_ptr + p + 1, g_i, mask=m)
                # da = g * conj(h_pred)
                tl.store(da_ptr + p, g_r * hr + g_i * him, mask=m)
                tl.store(da_ptr + p + 1, g_i * hr - g_r * him, mask=m)
            carry_r = _carry_of(g_r, is_end)
            carry_i = _carry_of(g_i, is_end)
        else:
            cr, gr = tl.associative_scan((cr, gr), 1, _combine_real, reverse=FLIP)
            g = gr + cr * carry_r[:, None]
            if SUMMARY:
                acc_r = acc_r * _carry_of(cr, is_end)
            else:
                tl.store(db_ptr + p, g.to(db_ptr.dtype.element_ty), mask=m)
                tl.store(da_ptr + p, (g * hr).to(da_ptr.dtype.element_ty), mask=m)
            carry_r = _carry_of(g, is_end)
    if SUMMARY:
        tl.store(sa_ptr + p_state, acc_r, mask=m_c)
        tl.store(dh0_ptr + p_state, carry_r, mask=m_c)
        if COMPLEX:
            tl.store(sa_ptr + p_state + 1, acc_i, mask=m_c)
            tl.store(dh0_ptr + p_state + 1, carry_i, mask=m_c)
        return
    if STORE_DH0:
        # dh0 = conj(a at the globally last processed step) * g there (meaningful in the chunk
        # that holds that step; the launcher picks it)
        # ((T - 1) * s_t in int64: one o-slice of [O, T, C] may pass 2^31 elements)
        p_first = base_c + (0 if FLIP else tl.cast(T - 1, tl.int64) * s_t)
        a_r = tl.load(a_ptr + p_first, mask=m_c, other=0.0).to(tl.float32)
        if COMPLEX:
            a_i = -tl.load(a_ptr + p_first + 1, mask=m_c, other=0.0).to(tl.float32)
            tl.store(dh0_ptr + p_state, a_r * carry_r - a_i * carry_i, mask=m_c)
            tl.store(dh0_ptr + p_state + 1, a_r * carry_i + a_i * carry_r, mask=m_c)
        else:
            tl.store(dh0_ptr + p_state, a_r * carry_r, mask=m_c)


# ---- backward with time innermost, shifted terms in registers ---------------------------------
# The backward needs a at t_next and h at t_pred, one step away from dh/da/db. Loaded through a
# pointer shifted by one element, those tiles lose 16-byte alignment and Triton issues scalar
# loads (sm_90 SASS of `_linear_scan_bwd_kernel`, [B, D, T] fp32: 32 LDG.E + 4 LDG.E.128 per
# tile iteration; bf16: 34 LDG.E.U16). Here a and h are loaded unshifted as [BLOCK_C, R, V] tiles
# (V = 16 bytes of elements: one 128-bit load per group) and shifted inside each thread's group by
# split/join; the one element a group needs from its neighbour is a strided scalar load (1/V of
# the elements, mostly an L1/L2 hit on a line the vector loads bring in anyway).

@triton.jit
def _shl2(x, nxt):
    # x [..., 2] -> y[..., j] = x[..., j + 1], last = nxt [...]
    e, o = tl.split(x)
    return tl.join(o, nxt)


@triton.jit
def _shr2(x, prv):
    # x [..., 2] -> y[..., j] = x[..., j - 1], first = prv [...]
    e, o = tl.split(x)
    return tl.join(prv, e)


@triton.jit
def _shift4(x, edge, LEFT: tl.constexpr, N: tl.constexpr):
    e, o = tl.split(tl.reshape(x, [N, 2, 2]))
    if LEFT:
        y = tl.join(o, _shl2(e, edge))
    else:
        y = tl.join(_shr2(o, edge), e)
    return tl.reshape(y, [N, 4])


@triton.jit
def _shift(x, edge, LEFT: tl.constexpr, N: tl.constexpr, V: tl.constexpr):
    """x [N, V] (N groups of V consecutive steps), edge [N]. LEFT: y[:, j] = x[:, j+1] and
    y[:, V-1] = edge (the next group's first element); else y[:, j] = x[:, j-1], y[:, 0] = edge
    (the previous group's last). Split into even / odd elements: a shift by one moves odd -> even
    in place and even -> odd by one in a group of half the width (unrolled for V = 1, 2, 4, 8)."""
    if V == 1:
        return tl.reshape(edge, [N, 1])
    elif V == 2:
        if LEFT:
            return _shl2(x, edge)
        else:
            return _shr2(x, edge)
    elif V == 4:
        return _shift4(x, edge, LEFT, N)
    else:
        tl.static_assert(V == 8)
        e, o = tl.split(tl.reshape(x, [N, 4, 2]))
        if LEFT:
            y = tl.join(o, _shift4(e, edge, True, N))
        else:
            y = tl.join(_shift4(o, edge, False, N), e)
        return tl.reshape(y, [N, 8])


@triton.jit
def _tinner_rows(i_o, i_c, t0, C, s_o, s_c, BLOCK_C: tl.constexpr, R: tl.constexpr,
                 V: tl.constexpr):
    """Row q = c * R + r of a tile seen as [BLOCK_C * R, V]: channel o_c, first step tq of the
    group and the row's element offset (one flat row index, so the layout reshapes to the
    scan's [BLOCK_C, BLOCK_T] without a conversion through shared memory)."""
    q = tl.arange(0, BLOCK_C * R)
    o_c = i_c * BLOCK_C + q // R
    tq = t0 + (q % R) * V
    base = i_o.to(tl.int64) * s_o + o_c.to(tl.int64) * s_c
    return o_c < C, tq, base


@triton.jit
def _tinner_bwd_loads(a_ptr, h_ptr, dh_ptr, i_o, i_c, base2, mc2, t0, lo, hi, T, C, s_o, s_c,
                      FLIP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                      V: tl.constexpr):
    """One tile's loads, all issued at once: a and h unshifted as [BLOCK_C * R, V] (128-bit
    loads), the group-edge elements (a at the next group's first step, h at the previous group's
    last; for reverse=True the other way round) and dh [BLOCK_C, BLOCK_T]."""
    R: tl.constexpr = BLOCK_T // V
    mq, tq, bq = _tinner_rows(i_o, i_c, t0, C, s_o, s_c, BLOCK_C, R, V)
    t2 = tq[:, None] + tl.arange(0, V)[None, :]
    m2 = mq[:, None] & ((t2 >= lo) & (t2 < hi) & (t2 < T))
    p2 = bq[:, None] + t2
    a2 = tl.load(a_ptr + p2, mask=m2, other=1.0)
    h2 = tl.load(h_ptr + p2, mask=m2, other=0.0)
    # Edge masks: the edge step inside [0, T) (it may cross the chunk boundary: a[hi] is read).
    # Both bounds matter: with FLIP a tile can start below 0 (the prefetched tile after the last,
    # or T not a multiple of BLOCK_T), and tq + V < T alone then let channel 0 read before a's
    # first element (up to BLOCK_T - V of them): an illegal address on the GPU whenever the memory
    # below the tensor is unmapped (bench/NOTES.md, lscan6).
    e_hi = tq + V
    m_hi = mq & (e_hi >= 0) & (e_hi < T)
    m_lo = mq & (tq - 1 >= 0) & (tq - 1 < T)
    if FLIP:   # a at t + 1, h at t - 1
        a_e = tl.load(a_ptr + bq + e_hi, mask=m_hi, other=1.0)
        h_e = tl.load(h_ptr + bq + tq - 1, mask=m_lo, other=0.0)
    else:      # a at t - 1, h at t + 1
        a_e = tl.load(a_ptr + bq + tq - 1, mask=m_lo, other=1.0)
        h_e = tl.load(h_ptr + bq + e_hi, mask=m_hi, other=0.0)
    t = t0 + tl.arange(0, BLOCK_T)
    m = mc2 & ((t >= lo) & (t < hi) & (t < T))[None, :]
    dh = tl.load(dh_ptr + base2 + t.to(tl.int64)[None, :], mask=m, other=0.0)
    return a2, h2, a_e, h_e, dh


@triton.jit
def _linear_scan_bwd_tinner_kernel(
    # as _linear_scan_bwd_kernel without SUMMARY / COMPLEX, for s_t == 1 (time innermost)
    a_ptr, h_ptr, h0_ptr, dh_ptr, dhT_ptr, da_ptr, db_ptr, dh0_ptr,
    T, C, CHUNK, NC, s_o, s_c,
    HAS_H0: tl.constexpr, REVERSE: tl.constexpr, HAS_CARRY: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, V: tl.constexpr, PREFETCH: tl.constexpr,
    STORE_DH0: tl.constexpr,
):
    # PREFETCH: the next tile's loads are issued before this tile's scan (loads in flight during
    # the scan; the tile's registers twice)
    FLIP: tl.constexpr = not REVERSE
    R: tl.constexpr = BLOCK_T // V
    N: tl.constexpr = BLOCK_C * R
    i_c, i_o, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    p_h0 = i_o.to(tl.int64) * C + o_c
    p_state = (i_o.to(tl.int64) * NC + i_k) * C + o_c
    lo = i_k * CHUNK
    hi = lo + CHUNK
    base_c = i_o.to(tl.int64) * s_o + o_c.to(tl.int64) * s_c
    carry = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_CARRY:
        carry = tl.load(dhT_ptr + p_state, mask=m_c, other=0.0).to(tl.float32)
    if HAS_H0:
        h0 = tl.load(h0_ptr + p_h0, mask=m_c, other=0.0).to(tl.float32)
    else:
        h0 = tl.zeros([BLOCK_C], dtype=tl.float32)
    o_r = tl.arange(0, BLOCK_T)
    is_end = (o_r == (0 if FLIP else BLOCK_T - 1))[None, :]
    mc2 = m_c[:, None]
    base2 = base_c[:, None]
    if PREFETCH:
        a2, h2, a_e, h_e, dh = _tinner_bwd_loads(a_ptr, h_ptr, dh_ptr, i_o, i_c, base2, mc2,
                                                 _tile_start(0, lo, hi, BLOCK_T, FLIP), lo, hi, T,
                                                 C, s_o, s_c, FLIP, BLOCK_T, BLOCK_C, V)
    for i_t in range(0, tl.cdiv(CHUNK, BLOCK_T)):
        t0 = _tile_start(i_t, lo, hi, BLOCK_T, FLIP)
        if PREFETCH:
            a2c, h2c, a_ec, h_ec, dhc = a2, h2, a_e, h_e, dh
            # the tile after the last is outside [lo, hi): its loads are masked off
            a2, h2, a_e, h_e, dh = _tinner_bwd_loads(a_ptr, h_ptr, dh_ptr, i_o, i_c, base2, mc2,
                                                     _tile_start(i_t + 1, lo, hi, BLOCK_T, FLIP),
                                                     lo, hi, T, C, s_o, s_c, FLIP, BLOCK_T,
                                                     BLOCK_C, V)
        else:
            a2c, h2c, a_ec, h_ec, dhc = _tinner_bwd_loads(a_ptr, h_ptr, dh_ptr, i_o, i_c, base2,
                                                          mc2, t0, lo, hi, T, C, s_o, s_c, FLIP,
                                                          BLOCK_T, BLOCK_C, V)
        t = t0 + o_r
        m = mc2 & ((t >= lo) & (t < hi) & (t < T))[None, :]
        p = base2 + t.to(tl.int64)[None, :]
        # c_t = a[t_next] (1 past either end and on padding), hp_t = h[t_pred] (h0 before the start)
        cr = tl.reshape(_shift(a2c.to(tl.float32), a_ec.to(tl.float32), FLIP, N, V),
                        [BLOCK_C, BLOCK_T])
        hr = tl.reshape(_shift(h2c.to(tl.float32), h_ec.to(tl.float32), REVERSE, N, V),
                        [BLOCK_C, BLOCK_T])
        hr = tl.where(t[None, :] == (0 if FLIP else T - 1), h0[:, None], hr)
        cr = tl.where(m, cr, 1.0)   # padding is the identity: no a leaks into the carry
        cr, gr = tl.associative_scan((cr, dhc.to(tl.float32)), 1, _combine_real, reverse=FLIP)
        g = gr + cr * carry[:, None]
        tl.store(db_ptr + p, g.to(db_ptr.dtype.element_ty), mask=m)
        tl.store(da_ptr + p, (g * hr).to(da_ptr.dtype.element_ty), mask=m)
        carry = _carry_of(g, is_end)
    if STORE_DH0:   # else dh0_ptr is a dummy: never written
        p_first = base_c + (0 if FLIP else T - 1)
        a_r = tl.load(a_ptr + p_first, mask=m_c, other=0.0).to(tl.float32)
        tl.store(dh0_ptr + p_state, a_r * carry, mask=m_c)


_linear_scan_fwd_kernel = fast_kernel(_linear_scan_fwd_kernel)
_linear_scan_bwd_kernel = fast_kernel(_linear_scan_bwd_kernel)
_linear_scan_bwd_tinner_kernel = fast_kernel(_linear_scan_bwd_tinner_kernel)

# knob: the [B, D, T] backward with shifted terms in registers (False: _linear_scan_bwd_kernel)
BWD_REG_SHIFT = os.environ.get("SSM_KERNELS_LSCAN_REG_SHIFT", "1") != "0"
# knob: that kernel issues the next tile's loads before the current tile's scan (H100 session 7,
# B8 D1536 T4096 bwd kernel: bf16 0.1953 vs 0.1993 ms, fp32 0.3467 vs 0.3563; compute-sanitizer
# clean after the session-6 out-of-bounds fix)
BWD_PREFETCH = os.environ.get("SSM_KERNELS_LSCAN_PREFETCH", "1") != "0"


# ---------------------------------------------------------------------------------------------
# launchers: check, allocate, launch
# ---------------------------------------------------------------------------------------------

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.complex64)


def _config(T: int, C: int, time_inner: bool, complex_: bool, elem_bytes: int, backward: bool = False):
    """Tile shape and warps by layout and direction. [B, T, D] (channels innermost): measured on
    the H100 (bench/NOTES.md, run 1). [B, D, T] (time innermost): long time tiles of one or two
    channels, swept on the H200 (bench/gpu_linear_scan.py, session 2 run 3)."""
    if triton_interpret():
        return dict(BLOCK_T=16, BLOCK_C=8, num_warps=1)
    if time_inner:
        # 16-bit backward: the register-shift kernel's best tile on the H100 (session 6: 0.199 ms
        # vs 0.283 at (2, 2048, 8), the shifted-load kernel's tile, at B8 D1536 T4096)
        block_c, block_t, warps = (1, 2048, 4) if not backward else (
            (2, 1024, 4) if elem_bytes == 4 else (1, 1024, 4) if BWD_REG_SHIFT else (2, 2048, 8))
        if complex_:
            block_t //= 2
        return dict(BLOCK_T=min(block_t, max(16, next_power_of_2(T))), BLOCK_C=block_c,
                    num_warps=warps)
    block_t = 64
    block_c = 32
    if complex_:
        block_t //= 2
    block_t = min(block_t, max(16, next_power_of_2(T)))
    return dict(BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4)


def _split(T: int, programs: int, block_t: int, device: torch.device):
    """(chunk length, number of chunks): split time when channel blocks alone cannot fill the GPU
    (few channels, long T). Each extra chunk costs one more read of a and b (a summary pass)."""
    if triton_interpret():
        target = 4  # small shapes: exercise the split path in CPU tests too
    else:
        target = 2 * sm_count(device)
    if programs >= target or T <= 4 * block_t:
        return T, 1
    n = min(cdiv(T, 4 * block_t), cdiv(2 * target, programs))
    chunk = cdiv(cdiv(T, n), block_t) * block_t
    return chunk, cdiv(T, chunk)


def _shift_in(ends: torch.Tensor, start, reverse: bool) -> torch.Tensor:
    """Carry into each chunk: the previous chunk's end state in processing order ([O, NC, C])."""
    first = torch.zeros_like(ends[:, :1]) if start is None else start.to(ends.dtype).reshape(ends[:, :1].shape)
    if reverse:
        return torch.cat([ends[:, 1:], first], 1).contiguous()
    return torch.cat([first, ends[:, :-1]], 1).contiguous()


@functools.lru_cache(maxsize=1024)
def _plan(P: int, T: int, Q: int, complex_: bool, elem_bytes: int, device: torch.device,
          backward: bool = False):
    """Everything a launch needs that depends only on shapes (computed once per shape: host time
    per call is part of the kernel's cost). Returns (O, C, s_o, s_t, s_c, cfg, chunk, nc, grid)."""
    w = 2 if complex_ else 1
    O, C, s_o, s_t, s_c = (1, P, 0, w, T * w) if Q == 1 else (P, Q, T * Q * w, Q * w, w)
    cfg = _config(T, C, Q == 1, complex_, elem_bytes, backward)
    chunk, nc = _split(T, O * cdiv(C, cfg["BLOCK_C"]), cfg["BLOCK_T"], device)
    return O, C, s_o, s_t, s_c, cfg, chunk, nc, (cdiv(C, cfg["BLOCK_C"]), O, nc)


def linear_scan_fwd(a: torch.Tensor, b: torch.Tensor, h0, reverse: bool, pq=None, state_shape=None,
                    final: bool = True):
    """a, b: contiguous [P, T, Q] of one dtype in TRITON_DTYPES; h0: [P, Q] state dtype or None.
    pq: (P, T, Q) when a, b come in another contiguous shape of the same elements (no views: the
    kernel only needs the pointer and these sizes); the states then have `state_shape`.
    Returns (h, hT); final=False: hT is None (not allocated, not written: STORE_HT off)."""
    P, T, Q = b.shape if pq is None else pq
    cplx = b.is_complex()
    sdt = torch.complex64 if cplx else torch.float32
    O, C, s_o, s_t, s_c, cfg, chunk, nc, grid = _plan(P, T, Q, cplx, b.element_size(), b.device)
    h = torch.empty_like(b)
    ak, bk, hk = (_state_view(x) for x in (a, b, h)) if cplx else (a, b, h)
    if nc == 1:
        hT = b.new_empty(state_shape or (P, Q), dtype=sdt) if final else None
        h0k = None if h0 is None else _state_view(h0.to(sdt).contiguous())
        _linear_scan_fwd_kernel[grid](
            ak, bk, h0k if h0k is not None else hk, hk,
            (_state_view(hT) if cplx else hT) if final else _dummy(hk), hk,
            T, C, chunk, nc, s_o, s_t, s_c, HAS_H0=h0 is not None, REVERSE=reverse, COMPLEX=cplx,
            SUMMARY=False, STORE_HT=final, **cfg)
        return h, hT
    common = dict(REVERSE=reverse, COMPLEX=cplx, **cfg)
    # 1) per-chunk summaries (product of a, end state from zero); 2) scan over chunks;
    # 3) rerun each chunk from its true incoming state, writing h
    sa = torch.empty((O, nc, C), dtype=sdt, device=b.device)
    sb = torch.empty_like(sa)
    _linear_scan_fwd_kernel[grid](
        ak, bk, hk, hk, _state_view(sb), _state_view(sa),
        T, C, chunk, nc, s_o, s_t, s_c, HAS_H0=False, SUMMARY=True, STORE_HT=True, **common)
    start = None if h0 is None else h0.reshape(O, 1, C)
    ends, last = linear_scan_fwd(sa, sb, None if start is None else start.reshape(O, C).to(sdt),
                                 reverse, final=final)
    carry = _shift_in(ends, start, reverse)
    _linear_scan_fwd_kernel[grid](   # the chunks' end states are `ends`: not written again
        ak, bk, _state_view(carry), hk, _dummy(hk), hk,
        T, C, chunk, nc, s_o, s_t, s_c, HAS_H0=True, SUMMARY=False, STORE_HT=False, **common)
    return h, (last.reshape(state_shape or (P, Q)) if final else None)


def linear_scan_bwd(a, h, h0, dh, dhT, reverse: bool, pq=None, state_shape=None,
                    want_dh0: bool = True):
    """Gradients (da, db, dh0) from the saved output h; dh [P, T, Q], dhT [P, Q] in the state dtype
    or None (no gradient reaches the final state: the carry starts at zero). pq, state_shape: as
    for linear_scan_fwd (da, db then have a's and h's shapes, dh0 `state_shape`).
    want_dh0=False: dh0 is None (not allocated, not written: STORE_DH0 off)."""
    P, T, Q = h.shape if pq is None else pq
    cplx = h.is_complex()
    sdt = torch.complex64 if cplx else torch.float32
    O, C, s_o, s_t, s_c, cfg, chunk, nc, grid = _plan(P, T, Q, cplx, h.element_size(), h.device,
                                                      backward=True)
    dh = dh.contiguous()
    dhT = None if dhT is None else dhT.contiguous()
    da = torch.empty_like(a)
    db = torch.empty_like(h)
    ak, hk, dhk, dak, dbk = (_state_view(x) for x in (a, h, dh, da, db)) if cplx else (a, h, dh, da, db)
    common = dict(HAS_H0=h0 is not None, REVERSE=reverse, COMPLEX=cplx, **cfg)
    h0k = None if h0 is None else _state_view(h0.to(sdt).contiguous())
    if nc == 1:
        carry = dhT
        # [O, 1, C]: the same elements
        dh0 = h.new_empty(state_shape or (P, Q), dtype=sdt) if want_dh0 else None
    else:  # chunk summaries, a scan over chunks in the backward's order, then the full pass
        if dhT is None:
            dhT = torch.zeros((P, Q), dtype=sdt, device=h.device)
        sa = torch.empty((O, nc, C), dtype=sdt, device=h.device)
        sg = torch.empty_like(sa)
        _linear_scan_bwd_kernel[grid](
            ak, hk, h0k if h0k is not None else hk, dhk, _state_view(sg), dak, dbk,
            _state_view(sg), _state_view(sa), T, C, chunk, nc, s_o, s_t, s_c, SUMMARY=True,
            HAS_CARRY=False, STORE_DH0=True, **common)
        ends, _ = linear_scan_fwd(sa, sg, dhT.reshape(O, C), not reverse, final=False)
        carry = _shift_in(ends, dhT, not reverse)
        dh0 = h.new_empty((O, nc, C), dtype=sdt) if want_dh0 else None
    dh0k = (_state_view(dh0) if cplx else dh0) if want_dh0 else _dummy(dak)
    if BWD_REG_SHIFT and s_t == 1 and not cplx:   # time innermost: shifted terms in registers
        _linear_scan_bwd_tinner_kernel[grid](
            a, h, h0k if h0k is not None else h, dh, carry if carry is not None else dh, da, db,
            dh0k, T, C, chunk, nc, s_o, s_c, HAS_H0=h0 is not None, REVERSE=reverse,
            HAS_CARRY=carry is not None, V=_vec(h.element_size(), cfg["BLOCK_T"]),
            PREFETCH=BWD_PREFETCH, STORE_DH0=want_dh0, **cfg)
    else:
        _linear_scan_bwd_kernel[grid](
            ak, hk, h0k if h0k is not None else hk, dhk,
            (_state_view(carry) if cplx else carry) if carry is not None else dhk, dak, dbk,
            dh0k, dh0k, T, C, chunk, nc, s_o, s_t, s_c, SUMMARY=False,
            HAS_CARRY=carry is not None, STORE_DH0=want_dh0, **common)
    if nc == 1 or not want_dh0:
        return da, db, dh0
    # the chunk holding the globally last processed step (t=0 unless reverse) has the true dh0
    return da, db, dh0[:, nc - 1 if reverse else 0].reshape(state_shape or (P, Q))


def _vec(elem_bytes: int, block_t: int) -> int:
    """Elements per 16-byte group of the register-shift backward (at most the tile)."""
    return min(16 // elem_bytes, block_t)


def _state_view(s: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(s) if s.is_complex() else s




# ---- states-only passes (context parallelism: ssm_kernels.distributed) -------------------------

def linear_scan_summary(a: torch.Tensor, b: torch.Tensor, reverse: bool):
    """The segment's affine map h_in -> A h_in + hT from one states-only pass (SUMMARY: reads a
    and b once, writes no h). a, b contiguous [P, T, Q]. Returns (A, hT) [P, Q] in the state dtype:
    A the product of a over time, hT the end state from zero."""
    P, T, Q = b.shape
    cplx = b.is_complex()
    sdt = torch.complex64 if cplx else torch.float32
    O, C, s_o, s_t, s_c, cfg, chunk, nc, grid = _plan(P, T, Q, cplx, b.element_size(), b.device)
    ak, bk = (_state_view(x) for x in (a, b)) if cplx else (a, b)
    sa = torch.empty((O, nc, C), dtype=sdt, device=b.device)
    sb = torch.empty_like(sa)
    _linear_scan_fwd_kernel[grid](
        ak, bk, bk, bk, _state_view(sb), _state_view(sa), T, C, chunk, nc, s_o, s_t, s_c,
        HAS_H0=False, REVERSE=reverse, COMPLEX=cplx, SUMMARY=True, STORE_HT=True, **cfg)
    if nc == 1:
        return sa.view(P, Q), sb.view(P, Q)
    _, end = linear_scan_fwd(sa, sb, None, reverse)   # compose the chunks' maps
    return torch.prod(sa, 1).reshape(P, Q), end.reshape(P, Q)


def linear_scan_adjoint(a: torch.Tensor, dh: torch.Tensor, reverse: bool):
    """dL/dh_in through the outputs alone (no gradient at the final state) from one states-only
    backward pass (SUMMARY: reads a and dh once, writes no da/db): conj(a at the first step) * g
    there, with g_t = dh_t + conj(a[t_next]) g[t_next]. a, dh contiguous [P, T, Q]; returns
    [P, Q] in the state dtype."""
    P, T, Q = dh.shape
    cplx = dh.is_complex()
    sdt = torch.complex64 if cplx else torch.float32
    O, C, s_o, s_t, s_c, cfg, chunk, nc, grid = _plan(P, T, Q, cplx, dh.element_size(), dh.device,
                                                      backward=True)
    ak, dhk = (_state_view(x) for x in (a, dh)) if cplx else (a, dh)
    sa = torch.empty((O, nc, C), dtype=sdt, device=dh.device)
    sg = torch.empty_like(sa)
    sgk, sak = (_state_view(x) for x in (sg, sa)) if cplx else (sg, sa)
    _linear_scan_bwd_kernel[grid](
        ak, dhk, dhk, dhk, sgk, dhk, dhk, sgk, sak, T, C, chunk, nc, s_o, s_t, s_c,
        HAS_H0=False, REVERSE=reverse, COMPLEX=cplx, SUMMARY=True, HAS_CARRY=False,
        STORE_DH0=True, **cfg)
    if nc == 1:
        g = sg.view(P, Q)
    else:   # compose the chunks in the backward's order
        _, g = linear_scan_fwd(sa, sg, None, not reverse)
        g = g.reshape(P, Q)
    first = a[:, T - 1 if reverse else 0]
    return first.conj().to(sdt) * g
