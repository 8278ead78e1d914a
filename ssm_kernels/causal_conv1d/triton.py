"""Triton kernels for causal_conv1d: a depthwise causal convolution of width W <= 8.

Memory-bound: each program owns a [BLOCK_D, BLOCK_T] tile of the output and reads the W shifted
input windows it needs (the overlaps hit L1/L2, DRAM sees x about once). x may have any strides:
time-contiguous (batch, dim, seqlen) or channel-last (a transposed (batch, seqlen, dim) tensor);
Triton specialises unit strides, so either layout is read with vector loads and the output is
written in x's layout.

Sequence boundaries: `VARLEN` 0 = one sequence per batch row, 1 = `cu_seqlens` (one packed row;
each step finds its sequence by a branch-free binary search over cu_seqlens, no host sync), 2 =
`seq_idx` (a step sees only inputs with its own index). Taps before a sequence's start read its
initial state (or zeros).

Backward: dpre = dout * act'(pre) is recomputed where needed (pre from the W taps) instead of
stored; dx[s] = sum_k w[k] dpre[s + W-1-k] (+ dfinal on a sequence's last W-1 inputs);
dweight/dbias are per-tile partial sums reduced by a second kernel in a fixed order
(deterministic, no atomics); d(initial_states) comes from a small per-sequence boundary kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._config import triton_interpret
from .._launch import cdiv, next_power_of_2, fast_kernel


@triton.jit
def _seq_of(cu_ptr, t, N, N_ITER):
    # index of the sequence holding step t: the largest i < N with cu[i] <= t
    lo = tl.zeros_like(t)
    hi = lo + (N - 1)
    for _ in range(N_ITER):
        mid = (lo + hi + 1) // 2
        go = tl.load(cu_ptr + mid).to(tl.int32) <= t
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid - 1)
    return lo


@triton.jit
def _xpad(x_ptr, p_xrow, s_xt, init_ptr, p_init, s_ib, s_iw, seq_ptr, p_srow, s_st, T,
          pos, start, i_s, sid, m, HAS_INIT: tl.constexpr, VARLEN: tl.constexpr,
          W: tl.constexpr):
    # the padded input at x position pos ([1, BT] or [BT]) as seen from a step of the sequence
    # (start, i_s, sid); m: the [BD, BT] mask of live lanes; p_xrow / p_init: [BD, 1] offsets
    if VARLEN == 2:
        inside = pos >= 0
        # (pos <= the step, so pos < T wherever the step is live; the bound guards dead lanes)
        sp = tl.load(seq_ptr + p_srow + pos.to(tl.int64) * s_st, mask=inside & (pos < T), other=-1)
        inside = inside & (sp == sid)
    else:
        inside = pos >= start
    v = tl.load(x_ptr + p_xrow + pos.to(tl.int64) * s_xt, mask=m & inside, other=0.0).to(tl.float32)
    if HAS_INIT:
        j = pos - start + (W - 1)
        vi = tl.load(init_ptr + p_init + i_s.to(tl.int64) * s_ib + j * s_iw,
                     mask=m & (~inside) & (j >= 0), other=0.0).to(tl.float32)
        v = tl.where(inside, v, vi)
    return v


@triton.jit
def _dpre(x_ptr, p_xrow, s_xt, init_ptr, p_init, s_ib, s_iw, seq_ptr, p_srow, s_st, T,
          w_ptr, o_d, m_d, bias, dout, t, start, i_s, sid, m,
          HAS_INIT: tl.constexpr, VARLEN: tl.constexpr, SILU: tl.constexpr, W: tl.constexpr):
    # gradient at the pre-activation of step t: dout * silu'(pre(t)) (dout unchanged without SILU)
    if SILU:
        pre = tl.zeros(dout.shape, dtype=tl.float32) + bias
        for j in tl.static_range(W):
            w_j = tl.load(w_ptr + o_d * W + j, mask=m_d, other=0.0).to(tl.float32)[:, None]
            pre += w_j * _xpad(x_ptr, p_xrow, s_xt, init_ptr, p_init, s_ib, s_iw, seq_ptr, p_srow,
                               s_st, T, t + (j - (W - 1)), start, i_s, sid, m, HAS_INIT, VARLEN, W)
        sig = tl.sigmoid(pre)
        return dout * sig * (1.0 + pre * (1.0 - sig))
    else:
        return dout


@triton.jit
def _causal_conv1d_fwd_kernel(
    # pointers: x [B, D, T] (any strides), weight [D, W], bias [D], initial states [B or N, D, W-1],
    # seq_idx [B, T] or cu_seqlens [N + 1] (per VARLEN), out [B, D, T] (any strides)
    x_ptr, w_ptr, b_ptr, init_ptr, seq_ptr, out_ptr,
    # sizes: N sequences (VARLEN 1), N_ITER binary-search steps
    T, D, N, N_ITER,
    # strides in elements
    s_xb, s_xd, s_xt, s_ob, s_od, s_ot, s_ib, s_id, s_iw, s_sb, s_st,
    # meta-parameters
    W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, VARLEN: tl.constexpr,
    SILU: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    i_t, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_t = o_t < T
    m_d = o_d < D
    m = m_d[:, None] & m_t[None, :]
    sid = tl.zeros([BLOCK_T], dtype=tl.int32)
    p_srow = i_b.to(tl.int64) * s_sb
    if VARLEN == 1:
        i_s = _seq_of(seq_ptr, o_t, N, N_ITER)
        start = tl.load(seq_ptr + i_s).to(tl.int32)
    else:
        i_s = tl.zeros([BLOCK_T], dtype=tl.int32) + i_b
        start = tl.zeros([BLOCK_T], dtype=tl.int32)
        if VARLEN == 2:
            sid = tl.load(seq_ptr + p_srow + o_t.to(tl.int64) * s_st, mask=m_t, other=-1).to(tl.int32)
    p_xrow = i_b.to(tl.int64) * s_xb + o_d.to(tl.int64)[:, None] * s_xd
    p_init = o_d.to(tl.int64)[:, None] * s_id
    acc = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
    for k in tl.static_range(W):
        w_k = tl.load(w_ptr + o_d * W + k, mask=m_d, other=0.0).to(tl.float32)
        v = _xpad(x_ptr, p_xrow, s_xt, init_ptr, p_init, s_ib, s_iw, seq_ptr, p_srow, s_st, T,
                  (o_t + (k - (W - 1)))[None, :], start[None, :], i_s[None, :], sid[None, :], m,
                  HAS_INIT, VARLEN, W)
        acc += w_k[:, None] * v
    if HAS_BIAS:
        acc += tl.load(b_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)[:, None]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    if VARLEN == 2:
        acc = tl.where((sid >= 0)[None, :], acc, 0.0)  # padding steps output 0
    p_o = out_ptr + i_b.to(tl.int64) * s_ob + o_d.to(tl.int64)[:, None] * s_od + o_t.to(tl.int64)[None, :] * s_ot
    tl.store(p_o, acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _causal_conv1d_bwd_kernel(
    # pointers: x, weight, bias, initial states, seq_idx / cu_seqlens as in the forward; dout [B, D,
    # T] and dfinal [B or N, D, W-1] (optional); outputs dx [B, D, T], dw_part [P, D, W] and db_part
    # [P, D] (per-tile partial sums, P = B * cdiv(T, BLOCK_T))
    x_ptr, w_ptr, b_ptr, init_ptr, seq_ptr, dout_ptr, dfin_ptr, dx_ptr, dwp_ptr, dbp_ptr,
    T, D, N, N_ITER,
    s_xb, s_xd, s_xt, s_gb, s_gd, s_gt, s_dxb, s_dxd, s_dxt, s_ib, s_id, s_iw, s_sb, s_st,
    s_fb, s_fd, s_fw,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DFINAL: tl.constexpr,
    VARLEN: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    i_t, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_s = i_t * BLOCK_T + tl.arange(0, BLOCK_T)  # the x positions this tile owns
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_s = o_s < T
    m_d = o_d < D
    m = m_d[:, None] & m_s[None, :]
    sid = tl.zeros([BLOCK_T], dtype=tl.int32)
    p_srow = i_b.to(tl.int64) * s_sb
    if VARLEN == 1:
        i_s = _seq_of(seq_ptr, o_s, N, N_ITER)
        start = tl.load(seq_ptr + i_s).to(tl.int32)
        end = tl.load(seq_ptr + i_s + 1).to(tl.int32)
    else:
        i_s = tl.zeros([BLOCK_T], dtype=tl.int32) + i_b
        start = tl.zeros([BLOCK_T], dtype=tl.int32)
        end = start + T
        if VARLEN == 2:
            sid = tl.load(seq_ptr + p_srow + o_s.to(tl.int64) * s_st, mask=m_s, other=-1).to(tl.int32)
    p_xrow = i_b.to(tl.int64) * s_xb + o_d.to(tl.int64)[:, None] * s_xd
    p_grow = i_b.to(tl.int64) * s_gb + o_d.to(tl.int64)[:, None] * s_gd
    p_init = o_d.to(tl.int64)[:, None] * s_id
    bias = tl.zeros([BLOCK_D, 1], dtype=tl.float32)
    if HAS_BIAS:
        bias += tl.load(b_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)[:, None]
    dx = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
    g0 = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
    for k in tl.static_range(W):
        t = o_s + (W - 1 - k)  # the output step that sees x[s] at tap k
        if VARLEN == 2:
            ok = m_s & (t < T)
            st = tl.load(seq_ptr + p_srow + t.to(tl.int64) * s_st, mask=ok, other=-1)
            ok = ok & (st == sid) & (sid >= 0)
        else:
            ok = m_s & (t < end)
        mk = m_d[:, None] & ok[None, :]
        do = tl.load(dout_ptr + p_grow + t.to(tl.int64)[None, :] * s_gt, mask=mk, other=0.0).to(tl.float32)
        g = _dpre(x_ptr, p_xrow, s_xt, init_ptr, p_init, s_ib, s_iw, seq_ptr, p_srow, s_st, T,
                  w_ptr, o_d, m_d, bias, do, t[None, :], start[None, :], i_s[None, :], sid[None, :],
                  mk, HAS_INIT, VARLEN, SILU, W)
        w_k = tl.load(w_ptr + o_d * W + k, mask=m_d, other=0.0).to(tl.float32)
        dx += w_k[:, None] * g
        if k == W - 1:
            g0 = g
    if HAS_DFINAL:
        j = o_s - (end - (W - 1))
        mf = m & (j >= 0)[None, :]
        dx += tl.load(dfin_ptr + i_s.to(tl.int64)[None, :] * s_fb + o_d.to(tl.int64)[:, None] * s_fd
                      + j[None, :] * s_fw, mask=mf, other=0.0).to(tl.float32)
    p_dx = dx_ptr + i_b.to(tl.int64) * s_dxb + o_d.to(tl.int64)[:, None] * s_dxd + o_s.to(tl.int64)[None, :] * s_dxt
    tl.store(p_dx, dx.to(dx_ptr.dtype.element_ty), mask=m)
    # partial sums of dweight[d, k] = sum_t g(t) xpad(t + k - (W-1)) and dbias over this tile
    row = i_b.to(tl.int64) * tl.num_programs(0) + i_t
    for k in tl.static_range(W):
        v = _xpad(x_ptr, p_xrow, s_xt, init_ptr, p_init, s_ib, s_iw, seq_ptr, p_srow, s_st, T,
                  (o_s + (k - (W - 1)))[None, :], start[None, :], i_s[None, :], sid[None, :], m,
                  HAS_INIT, VARLEN, W)
        tl.store(dwp_ptr + (row * D + o_d) * W + k, tl.sum(g0 * v, axis=1), mask=m_d)
    if HAS_BIAS:
        tl.store(dbp_ptr + row * D + o_d, tl.sum(g0, axis=1), mask=m_d)


@triton.jit
def _causal_conv1d_edge_kernel(
    # per sequence: FORWARD -> final states fin [B or N, D, W-1] (the last W-1 inputs of xpad);
    # backward -> dinit [B or N, D, W-1] from dout (and dfinal)
    x_ptr, w_ptr, b_ptr, init_ptr, seq_ptr, dout_ptr, dfin_ptr, out_ptr,
    T, D,
    s_xb, s_xd, s_xt, s_gb, s_gd, s_gt, s_ib, s_id, s_iw, s_fb, s_fd, s_fw, s_ob, s_od, s_ow,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DFINAL: tl.constexpr,
    VARLEN: tl.constexpr, SILU: tl.constexpr, FORWARD: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
):
    i_d, i_n = tl.program_id(0), tl.program_id(1)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_j = tl.arange(0, BLOCK_W)
    m_d = o_d < D
    m_j = o_j < W - 1
    m = m_d[:, None] & m_j[None, :]
    if VARLEN == 1:
        start = tl.load(seq_ptr + i_n).to(tl.int32)
        end = tl.load(seq_ptr + i_n + 1).to(tl.int32)
        i_b = 0
    else:
        start = 0
        end = T
        i_b = i_n.to(tl.int64)  # int64: i_b * s_xb may pass 2^31
    zj = tl.zeros([BLOCK_W], dtype=tl.int32)
    i_s = zj + i_n
    p_xrow = i_b * s_xb + o_d.to(tl.int64)[:, None] * s_xd
    p_init = o_d.to(tl.int64)[:, None] * s_id
    p_out = out_ptr + i_n.to(tl.int64) * s_ob + o_d.to(tl.int64)[:, None] * s_od + o_j[None, :] * s_ow
    if FORWARD:
        v = _xpad(x_ptr, p_xrow, s_xt, init_ptr, p_init, s_ib, s_iw, seq_ptr, 0, 0, T,
                  (end - (W - 1) + o_j)[None, :], (zj + start)[None, :], i_s[None, :], zj[None, :],
                  m, HAS_INIT, VARLEN, W)
        tl.store(p_out, v.to(out_ptr.dtype.element_ty), mask=m)
    else:
        # init slot j is x position start - (W-1) + j, seen by steps t = that + W-1-k = start+j-k
        bias = tl.zeros([BLOCK_D, 1], dtype=tl.float32)
        if HAS_BIAS:
            bias += tl.load(b_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)[:, None]
        p_grow = i_b * s_gb + o_d.to(tl.int64)[:, None] * s_gd
        acc = tl.zeros([BLOCK_D, BLOCK_W], dtype=tl.float32)
        for k in tl.static_range(W):
            t = start + o_j - k
            mk = m & ((t >= start) & (t < end))[None, :]
            do = tl.load(dout_ptr + p_grow + t.to(tl.int64)[None, :] * s_gt, mask=mk, other=0.0).to(tl.float32)
            g = _dpre(x_ptr, p_xrow, s_xt, init_ptr, p_init, s_ib, s_iw, seq_ptr, 0, 0, T,
                      w_ptr, o_d, m_d, bias, do, t[None, :], (zj + start)[None, :], i_s[None, :],
                      zj[None, :], mk, HAS_INIT, VARLEN, SILU, W)
            w_k = tl.load(w_ptr + o_d * W + k, mask=m_d, other=0.0).to(tl.float32)
            acc += w_k[:, None] * g
        if HAS_DFINAL:
            jf = o_j - (end - start)  # final slot holding init slot j (short sequences)
            mf = m & (jf >= 0)[None, :]
            acc += tl.load(dfin_ptr + i_n.to(tl.int64) * s_fb + o_d.to(tl.int64)[:, None] * s_fd
                           + jf[None, :] * s_fw, mask=mf, other=0.0).to(tl.float32)
        tl.store(p_out, acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _sum_rows_kernel(part_ptr, out_ptr, P, C, BLOCK: tl.constexpr):
    # out[c] = sum_p part[p, c] in a fixed order (deterministic)
    o_c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m_c = o_c < C
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    p_part = part_ptr + o_c.to(tl.int64)
    for _ in range(0, P):
        acc += tl.load(p_part, mask=m_c, other=0.0)
        p_part += C
    tl.store(out_ptr + o_c, acc.to(out_ptr.dtype.element_ty), mask=m_c)


@triton.jit
def _causal_conv1d_update_kernel(
    # pointers: x [B, D, L], conv_state [B_state, D, S] (updated in place), weight [D, W],
    # bias [D], cache_seqlens [B] (CIRCULAR), conv_state_indices [B] (HAS_IDX), out [B, D, L]
    x_ptr, state_ptr, w_ptr, b_ptr, cs_ptr, idx_ptr, out_ptr,
    D, L, S,
    s_xb, s_xd, s_xl, s_sb, s_sd, s_ss, s_ob, s_od, s_ol,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, CIRCULAR: tl.constexpr,
    HAS_IDX: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr,
):
    i_d, i_b = tl.program_id(0), tl.program_id(1)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    if HAS_IDX:
        row = tl.load(idx_ptr + i_b).to(tl.int64)
    else:
        row = i_b.to(tl.int64)
    p_state = state_ptr + row * s_sb + o_d.to(tl.int64)[:, None] * s_sd
    p_x = x_ptr + i_b.to(tl.int64) * s_xb + o_d.to(tl.int64)[:, None] * s_xd
    p_o = out_ptr + i_b.to(tl.int64) * s_ob + o_d.to(tl.int64)[:, None] * s_od
    cs = 0
    if CIRCULAR:
        cs = tl.load(cs_ptr + i_b).to(tl.int32)
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias += tl.load(b_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
    # 1) every read of the old state (the first W-1 outputs' taps, and the kept part of a shifted
    #    state) happens before any write
    if not CIRCULAR:
        o_k = tl.arange(0, BLOCK_S)
        src = o_k + L  # new state slot k holds cat(state, x)[k + L]
        from_state = src < S
        mk = m_d[:, None] & (o_k < S)[None, :]
        kept = tl.load(p_state + src[None, :] * s_ss, mask=mk & from_state[None, :], other=0.0)
        new = tl.load(p_x + (src - S)[None, :].to(tl.int64) * s_xl, mask=mk & (~from_state)[None, :],
                      other=0.0).to(kept.dtype)
        new = tl.where(from_state[None, :], kept, new)
    for l0 in range(0, L, BLOCK_L):
        o_l = l0 + tl.arange(0, BLOCK_L)
        m = m_d[:, None] & (o_l < L)[None, :]
        acc = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32) + bias[:, None]
        for k in tl.static_range(W):
            pos = o_l + (k - (W - 1))  # < 0: one of the W-1 inputs before the new ones
            inx = (pos >= 0)[None, :]
            v = tl.load(p_x + pos.to(tl.int64)[None, :] * s_xl, mask=m & inx, other=0.0).to(tl.float32)
            if CIRCULAR:
                slot = (cs + pos) % S
                slot = tl.where(slot < 0, slot + S, slot)
            else:
                slot = S + pos
            vs = tl.load(p_state + slot[None, :] * s_ss, mask=m & (~inx), other=0.0).to(tl.float32)
            w_k = tl.load(w_ptr + o_d * W + k, mask=m_d, other=0.0).to(tl.float32)
            acc += w_k[:, None] * tl.where(inx, v, vs)
        if SILU:
            acc = acc * tl.sigmoid(acc)
        tl.store(p_o + o_l.to(tl.int64)[None, :] * s_ol, acc.to(out_ptr.dtype.element_ty), mask=m)
    tl.debug_barrier()
    # 2) write the new state
    if CIRCULAR:
        for l0 in range(0, L, BLOCK_L):
            o_l = l0 + tl.arange(0, BLOCK_L)
            m = m_d[:, None] & ((o_l < L) & (o_l >= L - S))[None, :]  # the last S inputs win
            v = tl.load(p_x + o_l.to(tl.int64)[None, :] * s_xl, mask=m, other=0.0)
            slot = (cs + o_l) % S
            tl.store(p_state + slot[None, :] * s_ss, v.to(state_ptr.dtype.element_ty), mask=m)
    else:
        tl.store(p_state + o_k[None, :] * s_ss, new.to(state_ptr.dtype.element_ty), mask=mk)


# ---------------------------------------------------------------------------------------------
# launchers: check, allocate, launch
# ---------------------------------------------------------------------------------------------

# launch cache: bind each compiled kernel once per specialisation (ssm_kernels/_launch.py)
_causal_conv1d_fwd_kernel = fast_kernel(_causal_conv1d_fwd_kernel)
_causal_conv1d_bwd_kernel = fast_kernel(_causal_conv1d_bwd_kernel)
_causal_conv1d_edge_kernel = fast_kernel(_causal_conv1d_edge_kernel)
_sum_rows_kernel = fast_kernel(_sum_rows_kernel)
_causal_conv1d_update_kernel = fast_kernel(_causal_conv1d_update_kernel)


def _tiles(x: torch.Tensor):
    """(BLOCK_D, BLOCK_T, num_warps): the contiguous axis gets the long side of the tile."""
    if triton_interpret():
        return 8, 16, 1
    if x.stride(1) == 1 and x.stride(2) != 1:  # channel-last
        return 64, 32, 4
    return 8, 128, 4


def _varlen(seq_idx, cu_seqlens):
    if cu_seqlens is not None:
        N = cu_seqlens.numel() - 1
        return 1, cu_seqlens, N, max(1, (N - 1).bit_length())
    if seq_idx is not None:
        return 2, seq_idx, 0, 0
    return 0, None, 0, 0


def _strides(t, n=3):
    return tuple(t.stride()) if t is not None else (0,) * n


def causal_conv1d_fwd(x, weight, bias, seq_idx, cu_seqlens, initial_states, silu: bool,
                      return_final: bool):
    """x [B, D, T] any strides; weight [D, W] contiguous; returns (out like x, final or empty)."""
    B, D, T = x.shape
    W = weight.shape[1]
    out = torch.empty_like(x)
    varlen, sq, N, n_iter = _varlen(seq_idx, cu_seqlens)
    BD, BT, nw = _tiles(x)
    s_i = _strides(initial_states)
    s_s = (seq_idx.stride(0), seq_idx.stride(1)) if seq_idx is not None else (0, 0)
    if T > 0:
        grid = (cdiv(T, BT), cdiv(D, BD), B)
        _causal_conv1d_fwd_kernel[grid](
            x, weight, bias if bias is not None else weight, initial_states if initial_states is not None else x,
            sq if sq is not None else x, out, T, D, N, n_iter,
            *x.stride(), *out.stride(), *s_i, *s_s,
            W=W, HAS_BIAS=bias is not None, HAS_INIT=initial_states is not None and W > 1,
            VARLEN=varlen, SILU=silu, BLOCK_D=BD, BLOCK_T=BT, num_warps=nw)
    if not return_final:
        return out, x.new_empty(0)
    NS = N if varlen == 1 else B
    final = x.new_empty((NS, D, W - 1))
    if W > 1 and NS > 0:
        _edge(x, weight, bias, initial_states, cu_seqlens, None, None, final, silu, True)
    return out, final


def _edge(x, weight, bias, initial_states, cu_seqlens, dout, dfinal, out, silu, forward):
    B, D, T = x.shape
    W = weight.shape[1]
    NS = out.shape[0]
    BD = 8 if triton_interpret() else 64
    grid = (cdiv(D, BD), NS)
    _causal_conv1d_edge_kernel[grid](
        x, weight, bias if bias is not None else weight,
        initial_states if initial_states is not None else x,
        cu_seqlens if cu_seqlens is not None else x, dout if dout is not None else x,
        dfinal if dfinal is not None else x, out, T, D,
        *x.stride(), *_strides(dout), *_strides(initial_states), *_strides(dfinal), *out.stride(),
        W=W, HAS_BIAS=bias is not None, HAS_INIT=initial_states is not None,
        HAS_DFINAL=dfinal is not None, VARLEN=1 if cu_seqlens is not None else 0, SILU=silu,
        FORWARD=forward, BLOCK_D=BD, BLOCK_W=max(1, next_power_of_2(W - 1)), num_warps=4)


def _sum_rows(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    P = part.shape[0]
    out = torch.empty(part.shape[1:], dtype=dtype, device=part.device)
    C = out.numel()
    BLOCK = 64 if triton_interpret() else 256
    _sum_rows_kernel[(cdiv(C, BLOCK),)](part, out, P, C, BLOCK=BLOCK, num_warps=4)
    return out


def causal_conv1d_bwd(x, weight, bias, seq_idx, cu_seqlens, initial_states, dout, dfinal,
                      silu: bool):
    """Returns (dx like x, dweight [D, W] in weight's dtype, dbias or None, dinit or None)."""
    B, D, T = x.shape
    W = weight.shape[1]
    varlen, sq, N, n_iter = _varlen(seq_idx, cu_seqlens)
    BD, BT, nw = _tiles(x)
    dx = torch.empty_like(x)
    nT = cdiv(T, BT)
    dw_part = torch.empty((B * nT, D, W), dtype=torch.float32, device=x.device)
    db_part = torch.empty((B * nT, D), dtype=torch.float32, device=x.device) if bias is not None else None
    has_init = initial_states is not None and W > 1
    has_dfin = dfinal is not None and W > 1
    s_s = (seq_idx.stride(0), seq_idx.stride(1)) if seq_idx is not None else (0, 0)
    if T > 0:
        grid = (nT, cdiv(D, BD), B)
        _causal_conv1d_bwd_kernel[grid](
            x, weight, bias if bias is not None else weight,
            initial_states if initial_states is not None else x, sq if sq is not None else x,
            dout, dfinal if has_dfin else x, dx, dw_part, db_part if db_part is not None else dw_part,
            T, D, N, n_iter,
            *x.stride(), *dout.stride(), *dx.stride(), *_strides(initial_states), *s_s,
            *_strides(dfinal),
            W=W, HAS_BIAS=bias is not None, HAS_INIT=has_init, HAS_DFINAL=has_dfin,
            VARLEN=varlen, SILU=silu, BLOCK_D=BD, BLOCK_T=BT, num_warps=nw)
    if B * nT > 0:
        dweight = _sum_rows(dw_part, weight.dtype)
        dbias = None if bias is None else _sum_rows(db_part, bias.dtype)
    else:
        dweight = torch.zeros_like(weight)
        dbias = None if bias is None else torch.zeros_like(bias)
    dinit = None
    if initial_states is not None:
        dinit = torch.empty_like(initial_states)
        if W > 1 and dinit.shape[0] > 0:
            _edge(x, weight, bias, initial_states, cu_seqlens, dout, dfinal if has_dfin else None,
                  dinit, silu, False)
    return dx, dweight, dbias, dinit


def causal_conv1d_update(x, conv_state, weight, bias, silu: bool, cache_seqlens,
                         conv_state_indices):
    """x [B, D, L]; conv_state [B_state, D, S] updated in place; returns out [B, D, L]."""
    B, D, L = x.shape
    S = conv_state.shape[2]
    W = weight.shape[1]
    out = torch.empty_like(x)
    if L == 0 or B == 0:
        return out
    BD = 8 if triton_interpret() else 64
    BL = min(next_power_of_2(L), 16 if triton_interpret() else 64)
    grid = (cdiv(D, BD), B)
    _causal_conv1d_update_kernel[grid](
        x, conv_state, weight, bias if bias is not None else weight,
        cache_seqlens if cache_seqlens is not None else x,
        conv_state_indices if conv_state_indices is not None else x, out,
        D, L, S, *x.stride(), *conv_state.stride(), *out.stride(),
        W=W, HAS_BIAS=bias is not None, SILU=silu, CIRCULAR=cache_seqlens is not None,
        HAS_IDX=conv_state_indices is not None, BLOCK_D=BD, BLOCK_L=BL,
        BLOCK_S=max(1, next_power_of_2(S)), num_warps=4)
    return out
