"""Triton kernels for the selective scan (Mamba-1) and its decode step.

Forward (`_fwd_kernel`): time-sequential and channel-parallel. A program owns BLOCK_D channels of
one group of one sequence and all their dstate states, kept in float32 registers; it walks the
sequence one step at a time (h = exp2(dt * A * log2 e) * h + dt * u * B, y = sum_n C * h), so the
work is O(L) with no scan overhead, and it writes the state entering every CHUNK-step chunk
(checkpoints, for the backward).

Backward (`_bwd_kernel`): chunk-parallel in time, reversed over chunks. A program owns NSUB
sub-blocks of BLOCK_D channels of one group; per chunk and sub-block it restarts from the saved
checkpoint, rebuilds the chunk's states with an associative scan along time, runs the adjoint
g[t] = dh[t] + conj(a[t+1]) g[t+1] as a reverse associative scan seeded by the carry of the later
chunk, and forms every gradient elementwise. Reductions are deterministic: over n in registers,
over the program's channels in registers, across programs into per-program partial buffers
summed by torch afterwards (no atomics).

Complex numbers (complex A) travel as float32 (re, im) pairs: A, constant B/C and every state
tensor are viewed as (..., dstate, 2), time-varying B/C hold 2L interleaved values.
All offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._config import triton_interpret
from .._launch import cdiv, next_power_of_2, fast_kernel
from .reference import chunk_len, ckpt_offsets, ckpt_rows

LOG2E = 1.4426950408889634


@triton.jit
def _log1p(x):
    # accurate log(1 + x) for x >= 0 without libdevice: log(w) * x / (w - 1), w = 1 + x
    w = 1.0 + x
    return tl.where(w == 1.0, x, tl.log(w) * (x / (w - 1.0)))


@triton.jit
def _dt_transform(raw, SOFTPLUS: tl.constexpr):
    # torch.nn.functional.softplus with its threshold of 20
    if SOFTPLUS:
        return tl.where(raw <= 20.0, tl.maximum(raw, 0.0) + _log1p(tl.exp(-tl.abs(raw))), raw)
    else:
        return raw


@triton.jit
def _seq_bounds(cu_ptr, ckoff_ptr, i_s, L, NCK, VARLEN: tl.constexpr):
    """Sequence i_s: (first time index, length, batch index, first checkpoint row)."""
    if VARLEN:
        bos = tl.load(cu_ptr + i_s).to(tl.int64)
        T = (tl.load(cu_ptr + i_s + 1).to(tl.int64) - bos).to(tl.int32)
        i_b = tl.zeros([], dtype=tl.int64)
        ck0 = tl.load(ckoff_ptr + i_s).to(tl.int64)
    else:
        bos = tl.zeros([], dtype=tl.int64)
        T = L
        i_b = i_s.to(tl.int64)
        ck0 = i_s.to(tl.int64) * NCK
    return bos, T, i_b, ck0


@triton.jit
def _load_pair(ptr, p, m, COMPLEX: tl.constexpr):
    """(re, im) float32 at p, p + 1 (im repeats re for real data)."""
    r = tl.load(ptr + p, mask=m, other=0.0).to(tl.float32)
    i = r
    if COMPLEX:
        i = tl.load(ptr + p + 1, mask=m, other=0.0).to(tl.float32)
    return r, i


@triton.jit
def _store_pair(ptr, p, r, i, m, COMPLEX: tl.constexpr):
    tl.store(ptr + p, r, mask=m)
    if COMPLEX:
        tl.store(ptr + p + 1, i, mask=m)


@triton.jit
def _add(ptr, p, r, m):
    """Accumulate r into a buffer this program owns alone (deterministic, no atomics)."""
    tl.store(ptr + p, tl.load(ptr + p, mask=m, other=0.0) + r, mask=m)


@triton.jit
def _add_pair(ptr, p, r, i, m):
    _add(ptr, p, r, m)
    _add(ptr, p + 1, i, m)


@triton.jit
def _channels(i_blk, i_g, i_s, DG, DIM, N, o_n, m_n, BLOCK_D: tl.constexpr, CW: tl.constexpr):
    """Channel block i_blk of group i_g: (channels, their mask, (d, n) mask, (d, n) offset in a
    (dim, N[, 2]) tensor, the same in a (nseq, dim, N[, 2]) state tensor for sequence i_s)."""
    o_dl = i_blk * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_dl < DG
    o_d = i_g * DG + o_dl
    p_dn = (o_d.to(tl.int64) * N * CW)[:, None] + (o_n * CW)[None, :]
    return o_d, m_d, m_d[:, None] & m_n[None, :], p_dn, i_s.to(tl.int64) * DIM * N * CW + p_dn


@triton.jit
def _bc_offsets(i_b, i_g, o_n, bos, s_b, s_g, s_n, CW: tl.constexpr):
    """Offsets of time-varying B/C (or their partial gradients) at (batch, group, n, bos)."""
    return i_b * s_b + i_g.to(tl.int64) * s_g + o_n.to(tl.int64) * s_n + bos * CW


@triton.jit
def _combine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2) on x -> a x + b; used forward and (reverse=True) backward
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _combine_complex(a1r, a1i, b1r, b1i, a2r, a2i, b2r, b2i):
    return (a1r * a2r - a1i * a2i, a1r * a2i + a1i * a2r,
            b1r * a2r - b1i * a2i + b2r, b1r * a2i + b1i * a2r + b2i)


@triton.jit
def _fwd_kernel(
    # pointers: inputs
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, cu_ptr, ckoff_ptr,
    # pointers: outputs (out like u; last (nseq, dim, N[, 2]) f32; ckpt (rows, dim, N[, 2]) f32)
    out_ptr, last_ptr, ck_ptr,
    # sizes: channels, channels per group, seqlen, dstate, checkpoint rows per batch, chunk length
    DIM, DG, L, N, NCK, CHUNK,
    # strides (elements): u/delta/z/out (batch, dim) with unit time stride; variable B and C
    # (batch, group, n) with unit time stride
    s_ub, s_ud, s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn,
    # meta-parameters
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    VAR_B: tl.constexpr, VAR_C: tl.constexpr, COMPLEX: tl.constexpr, HAS_H0: tl.constexpr,
    VARLEN: tl.constexpr, SAVE_CK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_d, i_g, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    CW: tl.constexpr = 2 if COMPLEX else 1
    bos, T, i_b, ck0 = _seq_bounds(cu_ptr, ckoff_ptr, i_s, L, NCK, VARLEN)
    o_n = tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_d, m_d, m_dn, p_dn, p_st = _channels(i_d, i_g, i_s, DG, DIM, N, o_n, m_n, BLOCK_D, CW)
    a_r, a_i = _load_pair(A_ptr, p_dn, m_dn, COMPLEX)
    a_r = a_r * 1.4426950408889634
    if not VAR_B:
        b_r, b_i = _load_pair(B_ptr, p_dn, m_dn, COMPLEX)
    if not VAR_C:
        c_r, c_i = _load_pair(C_ptr, p_dn, m_dn, COMPLEX)
    if HAS_D:
        w_D = tl.load(D_ptr + o_d, mask=m_d, other=0.0)
    w_bias = 0.0
    if HAS_BIAS:
        w_bias = tl.load(bias_ptr + o_d, mask=m_d, other=0.0)
    h_r, h_i = _load_pair(h0_ptr, p_st, m_dn & HAS_H0, COMPLEX)
    p_u = i_b * s_ub + o_d.to(tl.int64) * s_ud + bos
    p_B = _bc_offsets(i_b, i_g, o_n, bos, s_Bb, s_Bg, s_Bn, CW)
    p_C = _bc_offsets(i_b, i_g, o_n, bos, s_Cb, s_Cg, s_Cn, CW)
    for c in range(0, tl.cdiv(T, CHUNK)):
        if SAVE_CK:
            _store_pair(ck_ptr, (ck0 + c) * DIM * N * CW + p_dn, h_r, h_i, m_dn, COMPLEX)
        for t in range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, T)):
            x_u = tl.load(u_ptr + p_u + t, mask=m_d, other=0.0).to(tl.float32)
            raw, dt = _load_dt(delta_ptr, p_u + t, m_d, w_bias, HAS_BIAS, SOFTPLUS)
            du = (dt * x_u)[:, None]
            if VAR_B:
                b_r, b_i = _load_pair(B_ptr, (p_B + t * CW)[None, :], m_n[None, :], COMPLEX)
            if VAR_C:
                c_r, c_i = _load_pair(C_ptr, (p_C + t * CW)[None, :], m_n[None, :], COMPLEX)
            if COMPLEX:
                mag = tl.exp2(dt[:, None] * a_r)
                ang = dt[:, None] * a_i
                e_r = mag * tl.cos(ang)
                e_i = mag * tl.sin(ang)
                n_r = e_r * h_r - e_i * h_i + du * b_r
                h_i = e_r * h_i + e_i * h_r + du * b_i
                h_r = n_r
                y = 2.0 * tl.sum(c_r * h_r - c_i * h_i, axis=1)
            else:
                h_r = tl.exp2(dt[:, None] * a_r) * h_r + du * b_r
                y = tl.sum(c_r * h_r, axis=1)
            if HAS_D:
                y += w_D * x_u
            if HAS_Z:
                x_z = tl.load(z_ptr + p_u + t, mask=m_d, other=0.0).to(tl.float32)
                y *= x_z * tl.sigmoid(x_z)
            tl.store(out_ptr + p_u + t, y.to(out_ptr.dtype.element_ty), mask=m_d)
    _store_pair(last_ptr, p_st, h_r, h_i, m_dn, COMPLEX)


@triton.jit
def _load_dt(delta_ptr, p, m, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """delta at p (+ bias, softplus): returns (pre-softplus value, dt with 0 where ~m)."""
    raw = tl.load(delta_ptr + p, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += bias
    return raw, tl.where(m, _dt_transform(raw, SOFTPLUS), 0.0)


@triton.jit
def _chunk_states(dt, dtu, a_r, a_i, b_r, b_i, c_r, c_i, h0_r, h0_i, COMPLEX: tl.constexpr):
    """One chunk's states from the state entering it, by an associative scan along time.

    dt, dtu = dt * u: (BLOCK_D, BLOCK_T); a (natural A), h0: (BLOCK_D, BLOCK_N); b, c broadcast to
    (BLOCK_D, BLOCK_N, BLOCK_T). Returns e = exp(dt A), x = dt u B, h (all 3-d, real and imaginary
    parts; the imaginary ones repeat the real ones for real A) and y = sum_n C h (x2 Re, complex).
    """
    dt3 = dt[:, None, :]
    a2 = (a_r * 1.4426950408889634)[:, :, None]
    if COMPLEX:
        mag = tl.exp2(dt3 * a2)
        e_r = mag * tl.cos(dt3 * a_i[:, :, None])
        e_i = mag * tl.sin(dt3 * a_i[:, :, None])
        x_r = dtu[:, None, :] * b_r
        x_i = dtu[:, None, :] * b_i
        q_r, q_i, s_r, s_i = tl.associative_scan((e_r, e_i, x_r, x_i), 2, _combine_complex)
        h_r = s_r + q_r * h0_r[:, :, None] - q_i * h0_i[:, :, None]
        h_i = s_i + q_r * h0_i[:, :, None] + q_i * h0_r[:, :, None]
        y = 2.0 * tl.sum(c_r * h_r - c_i * h_i, axis=1)
    else:
        e_r = tl.exp2(dt3 * a2)
        x_r = dtu[:, None, :] * b_r
        q_r, s_r = tl.associative_scan((e_r, x_r), 2, _combine)
        h_r = s_r + q_r * h0_r[:, :, None]
        y = tl.sum(c_r * h_r, axis=1)
        e_i, x_i, h_i = e_r, x_r, h_r
    return e_r, e_i, x_r, x_i, h_r, h_i, y


@triton.jit
def _fwd_chunked_kernel(
    # pointers and sizes as in _fwd_kernel
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, cu_ptr, ckoff_ptr,
    out_ptr, last_ptr, ck_ptr,
    DIM, DG, L, N, NCK,
    s_ub, s_ud, s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    VAR_B: tl.constexpr, VAR_C: tl.constexpr, COMPLEX: tl.constexpr, HAS_H0: tl.constexpr,
    VARLEN: tl.constexpr, SAVE_CK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # The chunk-parallel forward: every BLOCK_T-step chunk is loaded as coalesced tiles, its
    # states come from an associative scan seeded with the carried state (_chunk_states).
    i_d, i_g, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    CW: tl.constexpr = 2 if COMPLEX else 1
    bos, T, i_b, ck0 = _seq_bounds(cu_ptr, ckoff_ptr, i_s, L, NCK, VARLEN)
    o_n = tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_d, m_d, m_dn, p_dn, p_st = _channels(i_d, i_g, i_s, DG, DIM, N, o_n, m_n, BLOCK_D, CW)
    o_t = tl.arange(0, BLOCK_T)
    is_last = (o_t == BLOCK_T - 1)[None, None, :]
    a_r, a_i = _load_pair(A_ptr, p_dn, m_dn, COMPLEX)
    if not VAR_B:
        b_r, b_i = _load_pair(B_ptr, p_dn[:, :, None], m_dn[:, :, None], COMPLEX)
    if not VAR_C:
        c_r, c_i = _load_pair(C_ptr, p_dn[:, :, None], m_dn[:, :, None], COMPLEX)
    w_bias = 0.0
    if HAS_BIAS:
        w_bias = tl.load(bias_ptr + o_d, mask=m_d, other=0.0)[:, None]
    if HAS_D:
        w_D = tl.load(D_ptr + o_d, mask=m_d, other=0.0)[:, None]
    h_r, h_i = _load_pair(h0_ptr, p_st, m_dn & HAS_H0, COMPLEX)
    p_u = i_b * s_ub + o_d.to(tl.int64) * s_ud + bos
    p_B = _bc_offsets(i_b, i_g, o_n, bos, s_Bb, s_Bg, s_Bn, CW)
    p_C = _bc_offsets(i_b, i_g, o_n, bos, s_Cb, s_Cg, s_Cn, CW)
    for c in range(0, tl.cdiv(T, BLOCK_T)):
        if SAVE_CK:
            _store_pair(ck_ptr, (ck0 + c) * DIM * N * CW + p_dn, h_r, h_i, m_dn, COMPLEX)
        r_t = c * BLOCK_T + o_t
        m_t = r_t < T
        m_dt = m_d[:, None] & m_t[None, :]
        m_nt = m_n[:, None] & m_t[None, :]
        p_ut = p_u[:, None] + r_t[None, :]
        x_u = tl.load(u_ptr + p_ut, mask=m_dt, other=0.0).to(tl.float32)
        raw, dt = _load_dt(delta_ptr, p_ut, m_dt, w_bias, HAS_BIAS, SOFTPLUS)
        if VAR_B:
            b_r, b_i = _load_pair(B_ptr, (p_B[:, None] + (r_t * CW)[None, :])[None, :, :],
                                  m_nt[None, :, :], COMPLEX)
        if VAR_C:
            c_r, c_i = _load_pair(C_ptr, (p_C[:, None] + (r_t * CW)[None, :])[None, :, :],
                                  m_nt[None, :, :], COMPLEX)
        e_r, e_i, x_r, x_i, s_r, s_i, y = _chunk_states(dt, dt * x_u, a_r, a_i, b_r, b_i, c_r, c_i,
                                                        h_r, h_i, COMPLEX)
        if HAS_D:
            y += w_D * x_u
        if HAS_Z:
            x_z = tl.load(z_ptr + p_ut, mask=m_dt, other=0.0).to(tl.float32)
            y *= x_z * tl.sigmoid(x_z)
        tl.store(out_ptr + p_ut, y.to(out_ptr.dtype.element_ty), mask=m_dt)
        # padded steps have e = 1, x = 0: the last column is the state after the chunk
        h_r = tl.sum(tl.where(is_last, s_r, 0.0), axis=2)
        if COMPLEX:
            h_i = tl.sum(tl.where(is_last, s_i, 0.0), axis=2)
    _store_pair(last_ptr, p_st, h_r, h_i, m_dn, COMPLEX)


@triton.jit
def _bwd_kernel(
    # pointers: forward inputs, packing, checkpoints, output gradient
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, cu_ptr, ckoff_ptr, ck_ptr,
    dout_ptr,
    # pointer: adjoint carry (nseq, dim, N[, 2]) f32, holds d last_state on entry (clobbered)
    gc_ptr,
    # pointers: gradients like u (du, ddelta, dz); per-sequence accumulators (zeroed on entry):
    # dA, constant dB, constant dC (nseq, dim, N[, 2]), dD, d delta_bias (nseq, dim); per-program
    # partials of time-varying dB, dC (NJ, batch, G, N, L[*2]); d initial_state (nseq, dim, N[, 2])
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dBc_ptr, dCc_ptr, dD_ptr, dbias_ptr, dBp_ptr, dCp_ptr,
    dh0_ptr,
    # sizes
    DIM, DG, L, N, NCK,
    # strides: u-like (batch, dim); variable B, C (batch, group, n); partials (prog, batch, group, n)
    s_ub, s_ud, s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn, s_pj, s_pb, s_pg, s_pn,
    # meta-parameters
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    VAR_B: tl.constexpr, VAR_C: tl.constexpr, COMPLEX: tl.constexpr, VARLEN: tl.constexpr,
    NSUB: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    i_j, i_g, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    CW: tl.constexpr = 2 if COMPLEX else 1
    bos, T, i_b, ck0 = _seq_bounds(cu_ptr, ckoff_ptr, i_s, L, NCK, VARLEN)
    o_n = tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_t = tl.arange(0, BLOCK_T)
    is_first = (o_t == 0)[None, None, :]
    p_B = _bc_offsets(i_b, i_g, o_n, bos, s_Bb, s_Bg, s_Bn, CW)
    p_C = _bc_offsets(i_b, i_g, o_n, bos, s_Cb, s_Cg, s_Cn, CW)
    p_P = i_j.to(tl.int64) * s_pj + _bc_offsets(i_b, i_g, o_n, bos, s_pb, s_pg, s_pn, CW)
    n_chunks = tl.cdiv(T, BLOCK_T)
    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        r_t = c * BLOCK_T + o_t
        m_t = r_t < T
        m_nt = m_n[:, None] & m_t[None, :]
        # time-varying B/C tiles, shared by the sub-blocks; their gradients accumulate over them
        if VAR_B:
            vb_r, vb_i = _load_pair(B_ptr, (p_B[:, None] + (r_t * CW)[None, :])[None, :, :],
                                    m_nt[None, :, :], COMPLEX)
            acc_B_r = tl.zeros([BLOCK_N, BLOCK_T], dtype=tl.float32)
            acc_B_i = tl.zeros([BLOCK_N, BLOCK_T], dtype=tl.float32)
        if VAR_C:
            vc_r, vc_i = _load_pair(C_ptr, (p_C[:, None] + (r_t * CW)[None, :])[None, :, :],
                                    m_nt[None, :, :], COMPLEX)
            acc_C_r = tl.zeros([BLOCK_N, BLOCK_T], dtype=tl.float32)
            acc_C_i = tl.zeros([BLOCK_N, BLOCK_T], dtype=tl.float32)
        for j in range(0, NSUB):
            o_d, m_d, m_dn, p_dn, p_st = _channels(i_j * NSUB + j, i_g, i_s, DG, DIM, N, o_n, m_n,
                                                   BLOCK_D, CW)
            m_dt = m_d[:, None] & m_t[None, :]
            p_ut = (i_b * s_ub + o_d.to(tl.int64) * s_ud + bos)[:, None] + r_t[None, :]
            # ---- per-(d, t) inputs
            x_u = tl.load(u_ptr + p_ut, mask=m_dt, other=0.0).to(tl.float32)
            m_nx = m_d[:, None] & (r_t + 1 < T)[None, :]
            w_bias = 0.0
            if HAS_BIAS:
                w_bias = tl.load(bias_ptr + o_d, mask=m_d, other=0.0)[:, None]
            raw, dt = _load_dt(delta_ptr, p_ut, m_dt, w_bias, HAS_BIAS, SOFTPLUS)
            raw_n, dt_n = _load_dt(delta_ptr, p_ut + 1, m_nx, w_bias, HAS_BIAS, SOFTPLUS)
            dout = tl.load(dout_ptr + p_ut, mask=m_dt, other=0.0).to(tl.float32)
            dtu = dt * x_u
            # ---- per-(d, n) inputs
            a_r, a_i = _load_pair(A_ptr, p_dn, m_dn, COMPLEX)
            h0_r, h0_i = _load_pair(ck_ptr, (ck0 + c) * DIM * N * CW + p_dn, m_dn, COMPLEX)
            carry_r, carry_i = _load_pair(gc_ptr, p_st, m_dn, COMPLEX)
            if VAR_B:
                b_r, b_i = vb_r, vb_i
            else:
                b_r, b_i = _load_pair(B_ptr, p_dn[:, :, None], m_dn[:, :, None], COMPLEX)
            if VAR_C:
                c_r, c_i = vc_r, vc_i
            else:
                c_r, c_i = _load_pair(C_ptr, p_dn[:, :, None], m_dn[:, :, None], COMPLEX)
            dt3 = dt[:, None, :]
            dtn3 = dt_n[:, None, :]
            a2 = (a_r * 1.4426950408889634)[:, :, None]
            # ---- rebuild the chunk's states from its checkpoint
            e_r, e_i, x_r, x_i, h_r, h_i, y = _chunk_states(dt, dtu, a_r, a_i, b_r, b_i, c_r, c_i,
                                                            h0_r, h0_i, COMPLEX)
            if HAS_D:
                w_D = tl.load(D_ptr + o_d, mask=m_d, other=0.0)[:, None]
                y += w_D * x_u
            if HAS_Z:
                x_z = tl.load(z_ptr + p_ut, mask=m_dt, other=0.0).to(tl.float32)
                sig = tl.sigmoid(x_z)
                dy = dout * x_z * sig
                dz = dout * y * sig * (1.0 + x_z * (1.0 - sig))
                tl.store(dz_ptr + p_ut, dz.to(dz_ptr.dtype.element_ty), mask=m_dt)
            else:
                dy = dout
            dy3 = dy[:, None, :]
            # ---- adjoint: g[t] = dy[t] dy/dh + conj(e[t+1]) g[t+1], reverse scan from the carry
            if COMPLEX:
                mag_n = tl.exp2(dtn3 * a2)
                f_r = mag_n * tl.cos(dtn3 * a_i[:, :, None])
                f_i = -mag_n * tl.sin(dtn3 * a_i[:, :, None])
                k_r, k_i, v_r, v_i = tl.associative_scan(
                    (f_r, f_i, 2.0 * dy3 * c_r, -2.0 * dy3 * c_i), 2, _combine_complex, reverse=True)
                g_r = v_r + k_r * carry_r[:, :, None] - k_i * carry_i[:, :, None]
                g_i = v_i + k_r * carry_i[:, :, None] + k_i * carry_r[:, :, None]
                g0_r = tl.sum(tl.where(is_first, g_r, 0.0), axis=2)
                g0_i = tl.sum(tl.where(is_first, g_i, 0.0), axis=2)
                if c == 0:
                    e0_r = tl.sum(tl.where(is_first, e_r, 0.0), axis=2)
                    e0_i = tl.sum(tl.where(is_first, e_i, 0.0), axis=2)
                    _store_pair(dh0_ptr, p_st, e0_r * g0_r + e0_i * g0_i, e0_r * g0_i - e0_i * g0_r,
                                m_dn, COMPLEX)
                else:
                    _store_pair(gc_ptr, p_st, g0_r, g0_i, m_dn, COMPLEX)
                # P = e h[t-1] = h - X;  g conj(P) feeds dA and d dt
                pr = h_r - x_r
                pi = h_i - x_i
                gp_r = g_r * pr + g_i * pi
                gp_i = g_i * pr - g_r * pi
                ddt = tl.sum(gp_r * a_r[:, :, None] + gp_i * a_i[:, :, None], axis=1)
                gb = tl.sum(g_r * b_r + g_i * b_i, axis=1)
                da_r = tl.sum(dt3 * gp_r, axis=2)
                da_i = tl.sum(dt3 * gp_i, axis=2)
                _add_pair(dA_ptr, p_st, da_r, da_i, m_dn)
                # dB = dt u g, dC = 2 dy conj(h)
                if VAR_B:
                    acc_B_r += tl.sum(dtu[:, None, :] * g_r, axis=0)
                    acc_B_i += tl.sum(dtu[:, None, :] * g_i, axis=0)
                else:
                    _add_pair(dBc_ptr, p_st, tl.sum(dtu[:, None, :] * g_r, axis=2),
                              tl.sum(dtu[:, None, :] * g_i, axis=2), m_dn)
                if VAR_C:
                    acc_C_r += tl.sum(2.0 * dy3 * h_r, axis=0)
                    acc_C_i -= tl.sum(2.0 * dy3 * h_i, axis=0)
                else:
                    _add_pair(dCc_ptr, p_st, tl.sum(2.0 * dy3 * h_r, axis=2),
                              -tl.sum(2.0 * dy3 * h_i, axis=2), m_dn)
            else:
                f_r = tl.exp2(dtn3 * a2)
                k_r, v_r = tl.associative_scan((f_r, dy3 * c_r), 2, _combine, reverse=True)
                g_r = v_r + k_r * carry_r[:, :, None]
                g0_r = tl.sum(tl.where(is_first, g_r, 0.0), axis=2)
                if c == 0:
                    e0_r = tl.sum(tl.where(is_first, e_r, 0.0), axis=2)
                    tl.store(dh0_ptr + p_st, e0_r * g0_r, mask=m_dn)
                else:
                    tl.store(gc_ptr + p_st, g0_r, mask=m_dn)
                gp_r = g_r * (h_r - x_r)
                ddt = tl.sum(gp_r * a_r[:, :, None], axis=1)
                gb = tl.sum(g_r * b_r, axis=1)
                _add(dA_ptr, p_st, tl.sum(dt3 * gp_r, axis=2), m_dn)
                if VAR_B:
                    acc_B_r += tl.sum(dtu[:, None, :] * g_r, axis=0)
                else:
                    _add(dBc_ptr, p_st, tl.sum(dtu[:, None, :] * g_r, axis=2), m_dn)
                if VAR_C:
                    acc_C_r += tl.sum(dy3 * h_r, axis=0)
                else:
                    _add(dCc_ptr, p_st, tl.sum(dy3 * h_r, axis=2), m_dn)
            # ---- per-(d, t) gradients
            du = dt * gb
            if HAS_D:
                du += dy * w_D
                _add(dD_ptr, i_s.to(tl.int64) * DIM + o_d, tl.sum(dy * x_u, axis=1), m_d)
            ddt += x_u * gb
            if SOFTPLUS:
                ddt = tl.where(raw <= 20.0, ddt * tl.sigmoid(raw), ddt)
            ddt = tl.where(m_dt, ddt, 0.0)
            if HAS_BIAS:
                _add(dbias_ptr, i_s.to(tl.int64) * DIM + o_d, tl.sum(ddt, axis=1), m_d)
            tl.store(du_ptr + p_ut, du.to(du_ptr.dtype.element_ty), mask=m_dt)
            tl.store(ddelta_ptr + p_ut, ddt.to(ddelta_ptr.dtype.element_ty), mask=m_dt)
        p_pt = p_P[:, None] + (r_t * CW)[None, :]
        if VAR_B:
            _store_pair(dBp_ptr, p_pt, acc_B_r, acc_B_i, m_nt, COMPLEX)
        if VAR_C:
            _store_pair(dCp_ptr, p_pt, acc_C_r, acc_C_i, m_nt, COMPLEX)


@triton.jit
def _state_update_kernel(
    # pointers: state (batch, H, P, N) updated in place; x, dt, z, out (batch, H, P);
    # dt_bias, D (H, P); A (H, P, N); B, C (batch, G, N); state_batch_indices (batch,) int
    state_ptr, x_ptr, dt_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, out_ptr, idx_ptr,
    # sizes: head dim, dstate, heads per group
    P, N, HPG,
    # strides
    s_sb, s_sh, s_sp, s_sn, s_xb, s_xh, s_xp, s_db, s_dh, s_dp, s_bh, s_bp,
    s_Ah, s_Ap, s_An, s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn, s_Dh, s_Dp, s_zb, s_zh, s_zp,
    s_ob, s_oh, s_op,
    # meta-parameters
    SOFTPLUS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_IDX: tl.constexpr, TIED: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # TIED: dt, dt_bias and A are one value per head (Mamba-2: broadcast over headdim and dstate
    # with stride 0), so the decay exp(dt * A) is one scalar per program instead of one per element
    i_p, i_b, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    m_p = o_p < P
    o_n = tl.arange(0, BLOCK_N)
    m_n = o_n < N
    m_pn = m_p[:, None] & m_n[None, :]
    i_b64 = i_b.to(tl.int64)
    i_h64 = i_h.to(tl.int64)
    p_out = out_ptr + i_b64 * s_ob + i_h64 * s_oh + o_p * s_op
    if HAS_IDX:
        row = tl.load(idx_ptr + i_b).to(tl.int64)
    else:
        row = i_b64
    if row < 0:  # padding slot: no state to update
        tl.store(p_out, tl.zeros([BLOCK_P], dtype=tl.float32).to(out_ptr.dtype.element_ty), mask=m_p)
    else:
        p_state = state_ptr + row * s_sb + i_h64 * s_sh + o_p[:, None].to(tl.int64) * s_sp + o_n[None, :] * s_sn
        h = tl.load(p_state, mask=m_pn, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + i_b64 * s_xb + i_h64 * s_xh + o_p * s_xp, mask=m_p, other=0.0).to(tl.float32)
        i_grp = (i_h // HPG).to(tl.int64)
        b = tl.load(B_ptr + i_b64 * s_Bb + i_grp * s_Bg + o_n * s_Bn, mask=m_n, other=0.0).to(tl.float32)
        c = tl.load(C_ptr + i_b64 * s_Cb + i_grp * s_Cg + o_n * s_Cn, mask=m_n, other=0.0).to(tl.float32)
        if TIED:
            dt = tl.load(dt_ptr + i_b64 * s_db + i_h64 * s_dh).to(tl.float32)
            if HAS_BIAS:
                dt += tl.load(bias_ptr + i_h64 * s_bh).to(tl.float32)
            dt = _dt_transform(dt, SOFTPLUS)
            decay = tl.exp2(dt * tl.load(A_ptr + i_h64 * s_Ah).to(tl.float32) * 1.4426950408889634)
            h = decay * h + (dt * x)[:, None] * b[None, :]
        else:
            dt = tl.load(dt_ptr + i_b64 * s_db + i_h64 * s_dh + o_p * s_dp, mask=m_p, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt += tl.load(bias_ptr + i_h64 * s_bh + o_p * s_bp, mask=m_p, other=0.0).to(tl.float32)
            dt = _dt_transform(dt, SOFTPLUS)
            a = tl.load(A_ptr + i_h64 * s_Ah + o_p[:, None] * s_Ap + o_n[None, :] * s_An, mask=m_pn,
                        other=0.0).to(tl.float32)
            h = tl.exp2(dt[:, None] * a * 1.4426950408889634) * h + (dt * x)[:, None] * b[None, :]
        tl.store(p_state, h.to(state_ptr.dtype.element_ty), mask=m_pn)
        y = tl.sum(h * c[None, :], axis=1)
        if HAS_D:
            y += x * tl.load(D_ptr + i_h64 * s_Dh + o_p * s_Dp, mask=m_p, other=0.0).to(tl.float32)
        if HAS_Z:
            zz = tl.load(z_ptr + i_b64 * s_zb + i_h64 * s_zh + o_p * s_zp, mask=m_p, other=0.0).to(tl.float32)
            y *= zz * tl.sigmoid(zz)
        tl.store(p_out, y.to(out_ptr.dtype.element_ty), mask=m_p)


# ---------------------------------------------------------------------------------------------
# launchers: check, allocate, launch
# ---------------------------------------------------------------------------------------------

def _f32(x):
    """float32 view of a float32/complex64 tensor (complex as trailing (re, im) pairs)."""
    return torch.view_as_real(x) if x.is_complex() else x


def _var_strides(M):
    return (M.stride(0), M.stride(1), M.stride(2)) if M.dim() == 4 else (0, 0, 0)


def _groups(B, C) -> int:
    return B.shape[1] if B.dim() == 4 else (C.shape[1] if C.dim() == 4 else 1)


# Which forward kernel runs: "chunked" (coalesced time tiles + an associative scan per chunk) or
# "sequential" (one step at a time, states in registers; its per-step loads are strided by seqlen).
# The benchmark times both. H100, run 3 (bench/NOTES.md): sequential 1.32 ms vs chunked 2.64 ms
# at B=8 D=1536 L=2048 N=16 bf16, so sequential is the default.
FWD_VARIANT = "sequential"


_fwd_kernel, _fwd_chunked_kernel, _bwd_kernel, _state_update_kernel = map(
    fast_kernel, (_fwd_kernel, _fwd_chunked_kernel, _bwd_kernel, _state_update_kernel))


def _fwd_config(N: int):
    if triton_interpret():
        return dict(BLOCK_D=4, num_warps=1)
    bn = next_power_of_2(N)
    return dict(BLOCK_D=max(1, min(64, 512 // bn)), num_warps=4 if bn <= 64 else 8)


def _bwd_config(N: int, DG: int):
    """Tiles of the chunked kernels (backward, and the chunked forward without NSUB): about 2048
    (d, n, t) elements per program over 8 warps keeps the real backward near 190 registers with no
    spills on sm_90 (ptxas, Triton 3.9); the time tile is the checkpoint spacing chunk_len(N)."""
    bn = next_power_of_2(N)
    bt = chunk_len(N)
    if triton_interpret():
        bd, warps = 2, 1
    else:
        bd = max(1, 2048 // (bn * bt))
        warps = 8 if bd * bn * bt >= 2048 else 4
    nsub = max(1, min(cdiv(DG, bd), 32 // bd))
    return dict(BLOCK_D=bd, NSUB=nsub, BLOCK_T=bt, num_warps=warps)


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, h0, cu_seqlens, delta_softplus: bool,
                       save_ckpt: bool):
    """Canonical inputs (u, delta, z contiguous (batch, dim, L); A (dim, N) float32/complex64;
    B, C (dim, N) or contiguous (batch, G, N, L[*2])). Returns (out, last_state, checkpoints)."""
    batch, dim, L = u.shape
    N = A.shape[1]
    G = _groups(B, C)
    DG = dim // G
    nseq = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
    sdt = torch.complex64 if A.is_complex() else torch.float32
    out = torch.empty_like(u)
    last = torch.empty((nseq, dim, N), dtype=sdt, device=u.device)
    ck = torch.empty((ckpt_rows(batch, L, N, cu_seqlens) if save_ckpt else 0, dim, N), dtype=sdt,
                     device=u.device)
    ckoff = None if cu_seqlens is None else ckpt_offsets(cu_seqlens, N)
    dummy = out
    args = (u, delta, _f32(A), _f32(B), _f32(C), D if D is not None else dummy,
            z if z is not None else dummy, delta_bias if delta_bias is not None else dummy,
            _f32(h0.contiguous()) if h0 is not None else dummy,
            cu_seqlens if cu_seqlens is not None else dummy, ckoff if ckoff is not None else dummy,
            out, _f32(last), _f32(ck) if save_ckpt else dummy,
            dim, DG, L, N, -(-L // chunk_len(N)))
    strides = (u.stride(0), u.stride(1), *_var_strides(_f32(B)), *_var_strides(_f32(C)))
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                 SOFTPLUS=bool(delta_softplus), VAR_B=B.dim() == 4, VAR_C=C.dim() == 4,
                 COMPLEX=A.is_complex(), HAS_H0=h0 is not None, VARLEN=cu_seqlens is not None,
                 SAVE_CK=bool(save_ckpt), BLOCK_N=next_power_of_2(N))
    if FWD_VARIANT == "sequential":
        cfg = _fwd_config(N)
        grid = (cdiv(DG, cfg["BLOCK_D"]), G, nseq)
        _fwd_kernel[grid](*args, chunk_len(N), *strides, **flags, **cfg)
    else:
        cfg = _bwd_config(N, DG)
        grid = (cdiv(DG, cfg["BLOCK_D"]), G, nseq)
        _fwd_chunked_kernel[grid](*args, *strides, **flags, BLOCK_D=cfg["BLOCK_D"],
                                  BLOCK_T=cfg["BLOCK_T"], num_warps=cfg["num_warps"])
    return out, last, ck


def selective_scan_bwd(u, delta, A, B, C, D, z, delta_bias, h0, cu_seqlens, ckpt, dout, dlast,
                       delta_softplus: bool):
    """Gradients for (u, delta, A, B, C, D, z, delta_bias, h0) from the saved checkpoints;
    None where the input is None."""
    batch, dim, L = u.shape
    N = A.shape[1]
    G = _groups(B, C)
    DG = dim // G
    nseq = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
    cfg = _bwd_config(N, DG)
    NJ = cdiv(DG, cfg["BLOCK_D"] * cfg["NSUB"])
    dev = u.device
    cplx = A.is_complex()
    sdt = torch.complex64 if cplx else torch.float32
    f32 = dict(dtype=torch.float32, device=dev)
    dout = dout.contiguous()
    gc = dlast.to(sdt).contiguous().clone()
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else None
    dA = torch.zeros((nseq, dim, N), dtype=sdt, device=dev)
    dBc = torch.zeros((nseq, dim, N), dtype=sdt, device=dev) if B.dim() == 2 else None
    dCc = torch.zeros((nseq, dim, N), dtype=sdt, device=dev) if C.dim() == 2 else None
    dD = torch.zeros((nseq, dim), **f32) if D is not None else None
    dbias = torch.zeros((nseq, dim), **f32) if delta_bias is not None else None
    dBp = torch.empty((NJ,) + tuple(B.shape), **f32) if B.dim() == 4 else None
    dCp = torch.empty((NJ,) + tuple(C.shape), **f32) if C.dim() == 4 else None
    dh0 = torch.empty((nseq, dim, N), dtype=sdt, device=dev)
    ckoff = None if cu_seqlens is None else ckpt_offsets(cu_seqlens, N)
    part = dBp if dBp is not None else dCp
    s_part = (part.stride(0), part.stride(1), part.stride(2), part.stride(3)) if part is not None else (0,) * 4
    dummy = du
    opt = lambda x: dummy if x is None else _f32(x)  # noqa: E731
    grid = (NJ, G, nseq)
    _bwd_kernel[grid](
        u, delta, _f32(A), _f32(B), _f32(C), opt(D), opt(z), opt(delta_bias), opt(cu_seqlens),
        opt(ckoff), _f32(ckpt), dout, _f32(gc),
        du, ddelta, opt(dz), _f32(dA), opt(dBc), opt(dCc), opt(dD), opt(dbias), opt(dBp), opt(dCp),
        _f32(dh0),
        dim, DG, L, N, -(-L // chunk_len(N)),
        u.stride(0), u.stride(1), *_var_strides(_f32(B)), *_var_strides(_f32(C)), *s_part,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), VAR_B=B.dim() == 4, VAR_C=C.dim() == 4, COMPLEX=cplx,
        VARLEN=cu_seqlens is not None, BLOCK_N=next_power_of_2(N), **cfg)
    # deterministic reductions of the partials (fixed order, no atomics)
    dB = dBc.sum(0) if dBc is not None else dBp.sum(0).to(B.dtype)
    dC = dCc.sum(0) if dCc is not None else dCp.sum(0).to(C.dtype)
    return [du, ddelta, dA.sum(0), dB, dC,
            None if dD is None else dD.sum(0), dz, None if dbias is None else dbias.sum(0),
            None if h0 is None else dh0]


def decode_tile(P: int, block_n: int):
    """(BLOCK_P, num_warps) of the decode step: ~2048 state elements per program keeps enough
    bytes in flight per SM with few programs (bench/gpu_decode.py times the alternatives)."""
    if triton_interpret():
        return 4, 1
    return min(max(2048 // block_n, 1), next_power_of_2(P)), 4 if block_n <= 256 else 8


def state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus: bool, state_batch_indices):
    """Headed canonical form: state (S, H, P, N), x/dt/z (batch, H, P), A (H, P, N),
    B/C (batch, G, N), D/dt_bias (H, P). Updates state in place, returns out (batch, H, P)."""
    batch, H, P = x.shape
    N = state.shape[-1]
    G = B.shape[1]
    out = torch.empty_like(x)
    bn = next_power_of_2(N)
    bp, warps = decode_tile(P, bn)
    tied = (A.stride(1) == 0 and A.stride(2) == 0 and dt.stride(2) == 0
            and (dt_bias is None or dt_bias.stride(1) == 0))
    st = lambda t, k: tuple(t.stride()) if t is not None else (0,) * k  # noqa: E731
    grid = (cdiv(P, bp), batch, H)
    _state_update_kernel[grid](
        state, x, dt, dt_bias if dt_bias is not None else x, A, B, C,
        D if D is not None else x, z if z is not None else x, out,
        state_batch_indices if state_batch_indices is not None else x,
        P, N, H // G,
        *state.stride(), *x.stride(), *dt.stride(), *st(dt_bias, 2), *A.stride(), *B.stride(),
        *C.stride(), *st(D, 2), *st(z, 3), *out.stride(),
        SOFTPLUS=bool(dt_softplus), HAS_BIAS=dt_bias is not None, HAS_D=D is not None,
        HAS_Z=z is not None, HAS_IDX=state_batch_indices is not None, TIED=tied, BLOCK_P=bp,
        BLOCK_N=bn, num_warps=warps)
    return out
