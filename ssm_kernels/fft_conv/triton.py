"""Triton kernels for fft_conv: FFTs as matrix products (Monarch / Cooley-Tukey), all fp32 math.

The "monarch" path of the Triton backend: interface.MONARCH_MAX_N sends 16-bit storage at small
on-chip sizes here; everything else runs on the path fused around cuFFT (cufft.py).

A length-N transform with N = N1 * N2 (powers of two, each >= 16) is done on a [N1, N2] tile
holding x[N2*n1 + n2]:
    forward   X = ((F1 @ A) * T) @ F2        -> X[k1, k2] = x_hat[k1 + N1*k2]   (transposed order)
    inverse   A = conj(F1) @ ((X @ conj(F2)) * conj(T)) / N
with F1, F2 the DFT matrices and T[k1, n2] = exp(-2 pi i k1 n2 / N) the twiddles, generated in
registers from integer index products reduced mod N (no tables in memory). Filter spectra are kept
in the same transposed order, so the pointwise product never needs the natural order. DFT matrix
products run on tensor cores with `input_precision="tf32x3"` (about fp32 accuracy) for float32
storage and "tf32" for 16-bit storage; "ieee" in the interpreter.

Paths (transform size N = next power of two >= L + Lk - 1, at least 256):
  on-chip  N <= max_onchip_n(): one program per (head, batch slice) computes the filter transform
           once, then for each PAIR of rows of its slice (b, b+1 packed as one complex signal
           va + i vb: the filter is real, so Re / Im of the result are the two convolutions) loads
           u (zero-padded by masks, never in HBM), applies the pre-gate, transforms, multiplies,
           inverse-transforms, adds D*v, applies the post-gate and stores y. Where L <= N/2 (the
           usual Lk ~ L case) the time tile is [N1/2, N2] (n1 >= n2): the first DFT stage and the
           last inverse stage skip the causal zero half. The backward program does the same for
           the correlation (conjugate filter spectrum), the gate / D gradients, and accumulates
           conj(V)*G for dk over its batch slice in registers (Re of the packed product's inverse
           is the sum of both rows' correlations); the few slice partials are summed in a fixed
           order (deterministic).
  long     N = P * Q with Q <= max_onchip_n():  pass A  Z[kp, q] = W_N^{q kp} sum_p F_P[kp, p] x[Q p + q]
           (a tiled complex matmul per row, fused load of u * gate, zero padding by masks);
           pass B  per (row, kp): length-Q on-chip transform of Z[kp, :], product with the filter
           spectrum (computed once per call by pass A + B on k), inverse, in place;
           pass C  x[Q p + q] = Re sum_kp conj(F_P)[p, kp] W_N^{-q kp} Z[kp, q] / N fused with
           D*v, gates and the store (and the gradient epilogues).
           Inputs and outputs are real, so rows kp > P/2 of Z are conjugates of rows P - kp: all
           three passes touch only kp = 0..P/2 (pass C weights the interior rows by 2, takes Re).
All offsets are int64; the index products of the twiddles are reduced mod N in int32 (N < 2^31).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._config import triton_interpret
from .._device import sm_count
from .._launch import cdiv, next_power_of_2, fast_kernel

TWO_PI = 6.283185307179586

# Largest transform done in one program, by dot precision. The limit is shared memory: every
# tl.dot operand is staged there, tf32x3 stages a high and a low part, and the DFT tables stay
# resident. Compiled for sm_90 (Triton 3.9, cuobjdump): on-chip bwd N=2048 tf32x3 104 KB,
# N=4096 tf32x3 224 KB (too close to the 227 KB limit), N=8192 tf32 <= 192 KB. Tune on the GPU.
# On the H100 with Triton 3.6 the tf32 backward at N=8192 asked for 288 KB (over 227 KB: it could
# not launch; run 5), so the backward's on-chip limit is 2048 for every precision.
_ONCHIP_LIMIT = {"fwd": {"tf32x3": 2048, "tf32": 8192, "ieee": 8192},
                 "bwd": {"tf32x3": 2048, "tf32": 2048, "ieee": 2048}}
# the long path's inner (pass B) length, forward / backward: the backward's dk mode holds two
# complex rows and an accumulator (sm_90: Q=2048 ~115-140 KB shared, Q=4096 ~290 KB: too much);
# the forward's conv mode fits Q=4096 (~130 KB), which halves the outer factor P
LONG_INNER_N = {"fwd": 4096, "bwd": 2048}
# override of the on-chip limit for every precision (tests lower it to exercise the long path)
MAX_ONCHIP_N = None


# tests set this to fill every output and intermediate with NaN before the kernels write them
FILL_NAN = False


def max_onchip_n(prec: str = "ieee", pass_: str = "bwd") -> int:
    return MAX_ONCHIP_N if MAX_ONCHIP_N is not None else _ONCHIP_LIMIT[pass_][prec]


def alloc(shape, device, dtype=torch.float32):
    if FILL_NAN:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

@triton.jit
def _expi(r, c, N):
    """exp(-2 pi i r c / N) for index vectors r (rows) and c (cols): (real, imag) [R, C]."""
    rc = (r[:, None] * c[None, :]) % N
    rc = tl.where(2 * rc > N, rc - N, rc)  # angle in (-pi, pi]
    ang = rc.to(tl.float32) * (6.283185307179586 / N)
    return tl.cos(ang), -tl.sin(ang)


@triton.jit
def _cmm(ar, ai, br, bi, PREC: tl.constexpr):
    """(ar + i ai) @ (br + i bi)."""
    rr = tl.dot(ar, br, input_precision=PREC) - tl.dot(ai, bi, input_precision=PREC)
    ri = tl.dot(ar, bi, input_precision=PREC) + tl.dot(ai, br, input_precision=PREC)
    return rr, ri


@triton.jit
def _fft_fwd(xr, xi, f1r, f1i, f2r, f2i, twr, twi, REAL_IN: tl.constexpr, PREC: tl.constexpr):
    """[R1, N2] tile of x[N2*n1 + n2] (rows n1 >= R1 are zero) -> [N1, N2] tile of X[k1 + N1*k2]
    (unnormalised); f1 is F1[:, :R1]."""
    if REAL_IN:
        br = tl.dot(f1r, xr, input_precision=PREC)
        bi = tl.dot(f1i, xr, input_precision=PREC)
    else:
        br, bi = _cmm(f1r, f1i, xr, xi, PREC)
    cr = br * twr - bi * twi
    ci = br * twi + bi * twr
    return _cmm(cr, ci, f2r, f2i, PREC)


@triton.jit
def _fft_inv(Xr, Xi, g1r, g1i, f2r, f2i, twr, twi, REAL_OUT: tl.constexpr, PREC: tl.constexpr):
    """Inverse of _fft_fwd without the 1/N, rows n1 < R1 only (g1 = F1[:R1, :]); REAL_OUT
    returns (Re, Re) and skips the imaginary part."""
    er, ei = _cmm(Xr, Xi, f2r, -f2i, PREC)
    cr = er * twr + ei * twi
    ci = ei * twr - er * twi
    if REAL_OUT:
        xr = tl.dot(g1r, cr, input_precision=PREC) + tl.dot(g1i, ci, input_precision=PREC)
        xi = xr
    else:
        xr, xi = _cmm(g1r, -g1i, cr, ci, PREC)
    return xr, xi


@triton.jit
def _dft_tables(N1: tl.constexpr, N2: tl.constexpr, R1: tl.constexpr):
    """F1[:, :R1], F1[:R1, :] (its transpose: F1 is symmetric), F2 and the twiddles."""
    o1 = tl.arange(0, N1)
    o2 = tl.arange(0, N2)
    f1r, f1i = _expi(o1, tl.arange(0, R1), N1)
    if R1 == N1:
        g1r = f1r
        g1i = f1i
    else:
        g1r = tl.trans(f1r)
        g1i = tl.trans(f1i)
    f2r, f2i = _expi(o2, o2, N2)
    twr, twi = _expi(o1, o2, N1 * N2)
    return f1r, f1i, g1r, g1i, f2r, f2i, twr, twi


# ---------------------------------------------------------------------------------------------
# on-chip path: one program per (head, batch slice)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _onchip_filter(k_ptr, i_h, Lk, N1: tl.constexpr, N2: tl.constexpr, R1: tl.constexpr,
                   PREC: tl.constexpr):
    """DFT tables, the time index of each [R1, N2] data-tile element and the spectrum of k[i_h]."""
    f1r, f1i, g1r, g1i, f2r, f2i, twr, twi = _dft_tables(N1, N2, R1)
    o_t = tl.arange(0, R1)[:, None] * N2 + tl.arange(0, N2)[None, :]
    b_k = tl.load(k_ptr + i_h.to(tl.int64) * Lk + o_t, mask=o_t < Lk, other=0.0)
    kr, ki = _fft_fwd(b_k, b_k, f1r, f1i, f2r, f2i, twr, twi, True, PREC)
    return f1r, f1i, g1r, g1i, f2r, f2i, twr, twi, o_t, kr, ki


@triton.jit
def _load_v(u_ptr, pre_ptr, p, m, HAS_PRE: tl.constexpr):
    """(u, pre_gate, v = u * pre_gate) of one row tile in fp32 (pre_gate := u when absent)."""
    x = tl.load(u_ptr + p, mask=m, other=0.0).to(tl.float32)
    if HAS_PRE:
        gate = tl.load(pre_ptr + p, mask=m, other=0.0).to(tl.float32)
        v = x * gate
    else:
        gate = x
        v = x
    return x, gate, v


@triton.jit
def _load_g(dy_ptr, post_ptr, p, m, HAS_POST: tl.constexpr):
    """(dy, g = dy * post_gate) of one row tile in fp32."""
    dy = tl.load(dy_ptr + p, mask=m, other=0.0).to(tl.float32)
    if HAS_POST:
        g = dy * tl.load(post_ptr + p, mask=m, other=0.0).to(tl.float32)
    else:
        g = dy
    return dy, g


@triton.jit
def _store_y(y_ptr, post_ptr, p, m, c, v, b_d, HAS_D: tl.constexpr, HAS_POST: tl.constexpr):
    y = c
    if HAS_D:
        y += b_d * v
    if HAS_POST:
        y = y * tl.load(post_ptr + p, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + p, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _store_du(du_ptr, dpre_ptr, p, m, dv, x, gate, HAS_PRE: tl.constexpr):
    if HAS_PRE:
        tl.store(du_ptr + p, (dv * gate).to(du_ptr.dtype.element_ty), mask=m)
        tl.store(dpre_ptr + p, (dv * x).to(dpre_ptr.dtype.element_ty), mask=m)
    else:
        tl.store(du_ptr + p, dv.to(du_ptr.dtype.element_ty), mask=m)


@triton.jit
def _onchip_fwd_kernel(
    # pointers: u, pre, post, y [B, H, L] contiguous; k [H, Lk] fp32; d [H] fp32
    u_ptr, pre_ptr, post_ptr, k_ptr, d_ptr, y_ptr,
    # sizes
    B, H, L, Lk, B_PER,
    # meta-parameters
    HAS_D: tl.constexpr, HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr,
    N1: tl.constexpr, N2: tl.constexpr, R1: tl.constexpr, PREC: tl.constexpr,
):
    # Two real rows (batch b, b+1) travel as one complex signal va + i vb: the filter is real, so
    # the inverse transform of K * (Va + i Vb) is conv(va) + i conv(vb) with no separation step.
    i_h, i_s = tl.program_id(0), tl.program_id(1)
    N: tl.constexpr = N1 * N2
    f1r, f1i, g1r, g1i, f2r, f2i, twr, twi, o_t, kr, ki = _onchip_filter(k_ptr, i_h, Lk, N1, N2, R1, PREC)
    b_d = 0.0
    if HAS_D:
        b_d = tl.load(d_ptr + i_h)
    m = o_t < L
    b_start = i_s * B_PER
    b_end = tl.minimum(b_start + B_PER, B)
    for i_b in range(b_start, b_end, 2):
        pa = (i_b * H + i_h).to(tl.int64) * L + o_t
        pb = pa + (i_h.to(tl.int64) * 0 + H) * L  # (H may be specialised to a constexpr 1)
        mb = o_t < tl.where(i_b + 1 < b_end, L, 0)  # row b+1 may not exist
        _, _, va = _load_v(u_ptr, pre_ptr, pa, m, HAS_PRE)
        _, _, vb = _load_v(u_ptr, pre_ptr, pb, mb, HAS_PRE)
        xr, xi = _fft_fwd(va, vb, f1r, f1i, f2r, f2i, twr, twi, False, PREC)
        ya, yb = _fft_inv(xr * kr - xi * ki, xr * ki + xi * kr, g1r, g1i, f2r, f2i, twr, twi, False, PREC)
        _store_y(y_ptr, post_ptr, pa, m, ya * (1.0 / N), va, b_d, HAS_D, HAS_POST)
        _store_y(y_ptr, post_ptr, pb, mb, yb * (1.0 / N), vb, b_d, HAS_D, HAS_POST)


@triton.jit
def _onchip_bwd_kernel(
    # pointers: dy, u, pre, post [B, H, L]; k [H, Lk] fp32; d [H] fp32
    dy_ptr, u_ptr, pre_ptr, post_ptr, k_ptr, d_ptr,
    # outputs: du, dpre, dpost [B, H, L]; dk_part [S, H, Lk] fp32; dd_part [S, H] fp32
    du_ptr, dpre_ptr, dpost_ptr, dk_ptr, dd_ptr,
    # sizes
    B, H, L, Lk, B_PER,
    # meta-parameters
    HAS_D: tl.constexpr, HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr,
    N1: tl.constexpr, N2: tl.constexpr, R1: tl.constexpr, PREC: tl.constexpr,
):
    # Rows in pairs as in the forward. For dk, Re IDFT(conj(Va + i Vb) (Ga + i Gb)) is
    # corr(ga, va) + corr(gb, vb) (the cross terms are purely imaginary), so the packed spectra
    # accumulate directly.
    i_h, i_s = tl.program_id(0), tl.program_id(1)
    N: tl.constexpr = N1 * N2
    f1r, f1i, g1r, g1i, f2r, f2i, twr, twi, o_t, kr, ki = _onchip_filter(k_ptr, i_h, Lk, N1, N2, R1, PREC)
    b_d = 0.0
    if HAS_D:
        b_d = tl.load(d_ptr + i_h)
    m = o_t < L
    acc_r = tl.zeros([N1, N2], dtype=tl.float32)
    acc_i = tl.zeros([N1, N2], dtype=tl.float32)
    acc_d = tl.zeros([R1, N2], dtype=tl.float32)
    b_start = i_s * B_PER
    b_end = tl.minimum(b_start + B_PER, B)
    for i_b in range(b_start, b_end, 2):
        pa = (i_b * H + i_h).to(tl.int64) * L + o_t
        pb = pa + (i_h.to(tl.int64) * 0 + H) * L  # (H may be specialised to a constexpr 1)
        mb = o_t < tl.where(i_b + 1 < b_end, L, 0)  # row b+1 may not exist
        xa, gate_a, va = _load_v(u_ptr, pre_ptr, pa, m, HAS_PRE)
        xb, gate_b, vb = _load_v(u_ptr, pre_ptr, pb, mb, HAS_PRE)
        dya, ga = _load_g(dy_ptr, post_ptr, pa, m, HAS_POST)
        dyb, gb = _load_g(dy_ptr, post_ptr, pb, mb, HAS_POST)
        vr, vi = _fft_fwd(va, vb, f1r, f1i, f2r, f2i, twr, twi, False, PREC)
        gr, gi = _fft_fwd(ga, gb, f1r, f1i, f2r, f2i, twr, twi, False, PREC)
        # dv = corr(g, k) + D g: the product with the conjugate filter spectrum
        dva, dvb = _fft_inv(gr * kr + gi * ki, gi * kr - gr * ki, g1r, g1i, f2r, f2i, twr, twi, False, PREC)
        dva = dva * (1.0 / N)
        dvb = dvb * (1.0 / N)
        if HAS_D:
            dva += b_d * ga
            dvb += b_d * gb
            acc_d += ga * va + gb * vb
        _store_du(du_ptr, dpre_ptr, pa, m, dva, xa, gate_a, HAS_PRE)
        _store_du(du_ptr, dpre_ptr, pb, mb, dvb, xb, gate_b, HAS_PRE)
        if HAS_POST:
            ypa, ypb = _fft_inv(vr * kr - vi * ki, vr * ki + vi * kr, g1r, g1i, f2r, f2i, twr, twi, False, PREC)
            ypa = ypa * (1.0 / N)
            ypb = ypb * (1.0 / N)
            if HAS_D:
                ypa += b_d * va
                ypb += b_d * vb
            tl.store(dpost_ptr + pa, (dya * ypa).to(dpost_ptr.dtype.element_ty), mask=m)
            tl.store(dpost_ptr + pb, (dyb * ypb).to(dpost_ptr.dtype.element_ty), mask=mb)
        acc_r += vr * gr + vi * gi  # conj(V) G
        acc_i += vr * gi - vi * gr
    dk, _ = _fft_inv(acc_r, acc_i, g1r, g1i, f2r, f2i, twr, twi, True, PREC)
    p_k = (i_s.to(tl.int64) * H + i_h) * Lk + o_t
    tl.store(dk_ptr + p_k, dk * (1.0 / N), mask=o_t < Lk)
    if HAS_D:
        tl.store(dd_ptr + i_s * H + i_h, tl.sum(tl.sum(acc_d, axis=1), axis=0))


# ---------------------------------------------------------------------------------------------
# long path: pass A (outer forward), pass B (inner, on-chip), pass C (outer inverse + epilogue)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _outer_fwd_kernel(
    # pointers: x [R, Lx] rows (any float dtype), m [R, Lx] multiplier; z [2, R, N] fp32 planes
    x_ptr, m_ptr, z_ptr,
    # sizes: rows, row length, outer factor P, inner factor Q (N = P * Q)
    R, Lx, P, Q,
    # meta-parameters
    HAS_M: tl.constexpr, BKP: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr, PREC: tl.constexpr,
):
    i_r, i_k, i_q = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    N = P * Q
    NZ = (P // 2 + 1) * Q  # z row stride: rows kp <= P/2 only
    o_kp = i_k * BKP + tl.arange(0, BKP)
    o_q = i_q * BQ + tl.arange(0, BQ)
    m_q = o_q < Q
    acc_r = tl.zeros([BKP, BQ], dtype=tl.float32)
    acc_i = tl.zeros([BKP, BQ], dtype=tl.float32)
    base = i_r.to(tl.int64) * Lx
    p_end = tl.cdiv(Lx, Q)  # rows p past the data are zero padding: skipped
    for p0 in range(0, p_end, BP):
        o_p = p0 + tl.arange(0, BP)
        o_t = o_p.to(tl.int64)[:, None] * Q + o_q[None, :]
        m = (o_p < P)[:, None] & m_q[None, :] & (o_t < Lx)
        b_x = tl.load(x_ptr + base + o_t, mask=m, other=0.0).to(tl.float32)
        if HAS_M:
            b_x = b_x * tl.load(m_ptr + base + o_t, mask=m, other=0.0).to(tl.float32)
        fr, fi = _expi(o_kp, o_p, P)
        acc_r += tl.dot(fr, b_x, input_precision=PREC)
        acc_i += tl.dot(fi, b_x, input_precision=PREC)
    twr, twi = _expi(o_kp, o_q, N)
    p_z = i_r.to(tl.int64) * NZ + o_kp.to(tl.int64)[:, None] * Q + o_q[None, :]
    m_z = (o_kp < P // 2 + 1)[:, None] & m_q[None, :]  # real input: rows kp > P/2 are conjugates
    plane = (i_r.to(tl.int64) * 0 + R) * NZ
    tl.store(z_ptr + p_z, acc_r * twr - acc_i * twi, mask=m_z)
    tl.store(z_ptr + plane + p_z, acc_r * twi + acc_i * twr, mask=m_z)


@triton.jit
def _inner_kernel(
    # pointers: z [2, R, P, Q] fp32 planes (in, and out in place for MODE 1/2);
    # z2: the second input of MODE 3 (same layout); s [2, H, P, Q] filter spectrum planes;
    # out: spectrum (MODE 0) or dk planes [2, H, P, Q] (MODE 3)
    z_ptr, z2_ptr, s_ptr, out_ptr,
    # sizes: rows R = B * H, heads H, batch B (MODE 3), outer factor P
    R, H, B, P,
    # MODE: 0 spectrum of z -> out; 1 z <- inv(fwd(z) * s); 2 z <- inv(fwd(z) * conj(s));
    #       3 out[h] <- inv(sum_b conj(fwd(z2[b, h])) * fwd(z[b, h]))
    MODE: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, PREC: tl.constexpr,
):
    i_r, i_k = tl.program_id(0), tl.program_id(1)
    Q: tl.constexpr = N1 * N2
    NZ = (P // 2 + 1) * Q  # row stride of z, s, out: rows kp <= P/2 only
    f1r, f1i, g1r, g1i, f2r, f2i, twr, twi = _dft_tables(N1, N2, N1)
    o_q = tl.arange(0, N1)[:, None] * N2 + tl.arange(0, N2)[None, :]
    if MODE == 3:
        plane = (i_r.to(tl.int64) * 0 + R) * NZ
        acc_r = tl.zeros([N1, N2], dtype=tl.float32)
        acc_i = tl.zeros([N1, N2], dtype=tl.float32)
        for i_b in range(0, B):
            p = (i_b * H + i_r).to(tl.int64) * NZ + i_k * Q + o_q
            gr, gi = _fft_fwd(tl.load(z_ptr + p), tl.load(z_ptr + plane + p),
                              f1r, f1i, f2r, f2i, twr, twi, False, PREC)
            vr, vi = _fft_fwd(tl.load(z2_ptr + p), tl.load(z2_ptr + plane + p),
                              f1r, f1i, f2r, f2i, twr, twi, False, PREC)
            acc_r += vr * gr + vi * gi
            acc_i += vr * gi - vi * gr
        xr, xi = _fft_inv(acc_r, acc_i, g1r, g1i, f2r, f2i, twr, twi, False, PREC)
        p_o = i_r.to(tl.int64) * NZ + i_k * Q + o_q
        tl.store(out_ptr + p_o, xr)
        tl.store(out_ptr + (i_r.to(tl.int64) * 0 + H) * NZ + p_o, xi)
    else:
        plane = (i_r.to(tl.int64) * 0 + R) * NZ
        p = i_r.to(tl.int64) * NZ + i_k * Q + o_q
        xr, xi = _fft_fwd(tl.load(z_ptr + p), tl.load(z_ptr + plane + p),
                          f1r, f1i, f2r, f2i, twr, twi, False, PREC)
        if MODE == 0:
            tl.store(out_ptr + p, xr)
            tl.store(out_ptr + plane + p, xi)
        else:
            p_s = (i_r % H).to(tl.int64) * NZ + i_k * Q + o_q
            sr = tl.load(s_ptr + p_s)
            si = tl.load(s_ptr + (i_r.to(tl.int64) * 0 + H) * NZ + p_s)
            if MODE == 2:
                si = -si
            yr, yi = _fft_inv(xr * sr - xi * si, xr * si + xi * sr, g1r, g1i, f2r, f2i, twr, twi,
                              False, PREC)
            tl.store(z_ptr + p, yr)
            tl.store(z_ptr + plane + p, yi)


@triton.jit
def _outer_inv_kernel(
    # pointers: z [2, R, P, Q] fp32 planes; row tensors [R, Lout] u, pre, post, dy; d [H] fp32;
    # outputs out, out2 [R, Lout]; dd_part [R, n_tiles] fp32
    z_ptr, u_ptr, pre_ptr, post_ptr, dy_ptr, d_ptr, out_ptr, out2_ptr, dd_ptr,
    # sizes
    R, H, Lout, P, Q,
    # EPI: 0 y = (c + D v) * post; 1 dv = c + D g -> du (out), dpre (out2), dD partials;
    #      2 dpost = dy * (c + D v); 3 plain c (dk rows)
    EPI: tl.constexpr, HAS_D: tl.constexpr, HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr,
    BP: tl.constexpr, BKP: tl.constexpr, BQ: tl.constexpr, PREC: tl.constexpr,
):
    i_r, i_p, i_q = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    N = P * Q
    NZ = (P // 2 + 1) * Q
    o_p = i_p * BP + tl.arange(0, BP)
    o_q = i_q * BQ + tl.arange(0, BQ)
    m_q = o_q < Q
    plane = (i_r.to(tl.int64) * 0 + R) * NZ
    acc = tl.zeros([BP, BQ], dtype=tl.float32)
    # the output is real, so row P - kp holds conj(row kp): sum kp = 0..P/2 with weight 2 on the
    # interior rows (1 on kp = 0 and P/2, which are real after the twiddle) and take Re
    for k0 in range(0, P // 2 + 1, BKP):
        o_kp = k0 + tl.arange(0, BKP)
        p_z = i_r.to(tl.int64) * NZ + o_kp.to(tl.int64)[:, None] * Q + o_q[None, :]
        m_z = (o_kp < P // 2 + 1)[:, None] & m_q[None, :]
        zr = tl.load(z_ptr + p_z, mask=m_z, other=0.0)
        zi = tl.load(z_ptr + plane + p_z, mask=m_z, other=0.0)
        twr, twi = _expi(o_kp, o_q, N)
        w = tl.where((o_kp == 0) | (o_kp == P // 2), 1.0, 2.0)[:, None]
        cr = (zr * twr + zi * twi) * w  # z * conj(tw)
        ci = (zi * twr - zr * twi) * w
        fr, fi = _expi(o_p, o_kp, P)  # Re(conj(F) c) = fr cr + fi ci
        acc += tl.dot(fr, cr, input_precision=PREC) + tl.dot(fi, ci, input_precision=PREC)
    c = acc / N
    o_t = o_p.to(tl.int64)[:, None] * Q + o_q[None, :]
    m = (o_p < P)[:, None] & m_q[None, :] & (o_t < Lout)
    p = i_r.to(tl.int64) * Lout + o_t
    if EPI == 3:
        tl.store(out_ptr + p, c, mask=m)
    else:
        b_d = 0.0
        if HAS_D:
            b_d = tl.load(d_ptr + i_r % H)
        x, gate, v = _load_v(u_ptr, pre_ptr, p, m, HAS_PRE)
        if EPI == 0:
            _store_y(out_ptr, post_ptr, p, m, c, v, b_d, HAS_D, HAS_POST)
        elif EPI == 1:
            _, g = _load_g(dy_ptr, post_ptr, p, m, HAS_POST)
            dv = c
            if HAS_D:
                dv += b_d * g
                n_tiles = tl.num_programs(1) * tl.num_programs(2)
                tl.store(dd_ptr + i_r.to(tl.int64) * n_tiles + i_p * tl.num_programs(2) + i_q,
                         tl.sum(tl.sum(g * v, axis=1), axis=0))
            _store_du(out_ptr, out2_ptr, p, m, dv, x, gate, HAS_PRE)
        else:  # dpost = dy * (c + D v): the forward epilogue with dy as the "post gate"
            _store_y(out_ptr, dy_ptr, p, m, c, v, b_d, HAS_D, True)


# ---------------------------------------------------------------------------------------------
# launchers: check, allocate, launch
# ---------------------------------------------------------------------------------------------

# launch cache: bind each compiled kernel once per specialisation (ssm_kernels/_launch.py)
_onchip_fwd_kernel = fast_kernel(_onchip_fwd_kernel)
_onchip_bwd_kernel = fast_kernel(_onchip_bwd_kernel)
_outer_fwd_kernel = fast_kernel(_outer_fwd_kernel)
_inner_kernel = fast_kernel(_inner_kernel)
_outer_inv_kernel = fast_kernel(_outer_inv_kernel)


def _split(n: int):
    """[n1, n2] with n1 * n2 = n, both powers of two >= 16, n1 >= n2 (the first factor is the one
    whose zero half is skipped)."""
    lg = n.bit_length() - 1
    n2 = 1 << (lg // 2)
    return n // n2, n2


def _rows(n: int, n1: int, L: int) -> int:
    """Data rows R1 of the [n1, n2] time tile: n1 // 2 when all data (L, and Lk <= L) fits in the
    first half (the causal zero padding), so the first DFT stage and the last inverse stage skip
    the zero half; tl.dot needs R1 >= 16."""
    return n1 // 2 if (L <= n // 2 and n1 >= 32) else n1


def _prec(dtype: torch.dtype) -> str:
    """tf32x3 (~fp32) keeps float32 within 1e-5; a single tf32 pass (~5e-4 per operand) is far
    inside bfloat16's bound; float16's bound is ~4x tighter, so it keeps tf32x3."""
    if triton_interpret():
        return "ieee"
    return "tf32" if dtype == torch.bfloat16 else "tf32x3"


def transform_size(L: int, Lk: int) -> int:
    n = L + Lk - 1
    return max(256, 1 << max(0, (n - 1).bit_length()))


def plan(L: int, Lk: int, prec: str = "ieee", pass_: str = "bwd"):
    """("onchip", N, N1, N2) or ("long", N, P, Q) for a row length L and filter length Lk; the
    forward and backward (pass_) plan independently."""
    n = transform_size(L, Lk)
    if n <= max_onchip_n(prec, pass_):
        return ("onchip", n) + _split(n)
    inner = min(LONG_INNER_N[pass_], max_onchip_n(prec, pass_))
    p = max(n // inner, min(16, n // 256))
    return ("long", n, p, n // p)


def _warps(n: int) -> int:
    return 1 if triton_interpret() else (8 if n >= 4096 else 4)


def _sm_count(device) -> int:
    if triton_interpret() or device.type != "cuda":
        return 2
    return sm_count(device)


def _batch_split(B: int, H: int, device=torch.device("cpu")):
    """(programs per head S, rows per program): about two programs per SM; rows per program
    even where B > 1 (rows travel in pairs)."""
    s = max(1, min(B, -(-2 * _sm_count(device) // H)))
    per = -(-B // s)
    per += per % 2 if B > 1 else 0
    return -(-B // per), per


def _outer_tiles(P: int, Q: int):
    if triton_interpret():
        return dict(BKP=16, BP=16, BQ=32)
    return dict(BKP=min(64, max(16, next_power_of_2(P))), BP=32, BQ=64)


def _dummy(x):
    return x.new_empty(1)


def fft_conv_fwd(u, k, D, pre, post):
    """u, pre, post [B, H, L] contiguous (one dtype); k [H, Lk] fp32; D [H] fp32 or None."""
    B, H, L = u.shape
    Lk = k.shape[1]
    y = alloc(u.shape, u.device, u.dtype)
    prec = _prec(u.dtype)
    kind = plan(L, Lk, prec, "fwd")
    flags = dict(HAS_D=D is not None, HAS_PRE=pre is not None, HAS_POST=post is not None)
    dmy = _dummy(u)
    if kind[0] == "onchip":
        _, n, n1, n2 = kind
        S, per = _batch_split(B, H, u.device)
        _onchip_fwd_kernel[(H, S)](
            u, pre if pre is not None else dmy, post if post is not None else dmy, k,
            D if D is not None else _dummy(k), y, B, H, L, Lk, per,
            N1=n1, N2=n2, R1=_rows(n, n1, L), PREC=prec, num_warps=_warps(n), **flags)
        return y
    _, n, P, Q = kind
    kf = filter_spectrum(k, P, Q, prec)
    z = _outer_fwd(u.view(B * H, L), pre, P, Q, prec)
    _inner(z, kf, H, B, P, Q, mode=1, prec=prec)
    _outer_inv(z, y.view(B * H, L), None, epi=0, H=H, u=u, pre=pre, post=post, dy=None, D=D,
               P=P, Q=Q, prec=prec)
    return y


def fft_conv_bwd(dy, u, k, D, pre, post):
    """(du, dk fp32 [H, Lk], dD fp32 [H] or None, dpre or None, dpost or None)."""
    B, H, L = u.shape
    Lk = k.shape[1]
    du = alloc(u.shape, u.device, u.dtype)
    dpre = alloc(pre.shape, u.device, pre.dtype) if pre is not None else None
    dpost = alloc(post.shape, u.device, post.dtype) if post is not None else None
    prec = _prec(u.dtype)
    kind = plan(L, Lk, prec)
    flags = dict(HAS_D=D is not None, HAS_PRE=pre is not None, HAS_POST=post is not None)
    dmy = _dummy(u)
    if kind[0] == "onchip":
        _, n, n1, n2 = kind
        S, per = _batch_split(B, H, u.device)
        dk_part = alloc((S, H, Lk), u.device)
        dd_part = alloc((S, H), u.device)
        _onchip_bwd_kernel[(H, S)](
            dy, u, pre if pre is not None else dmy, post if post is not None else dmy, k,
            D if D is not None else _dummy(k),
            du, dpre if dpre is not None else dmy, dpost if dpost is not None else dmy,
            dk_part, dd_part, B, H, L, Lk, per,
            N1=n1, N2=n2, R1=_rows(n, n1, L), PREC=prec, num_warps=_warps(n), **flags)
        dk = dk_part.sum(0) if S > 1 else dk_part[0]
        dD = (dd_part.sum(0) if S > 1 else dd_part[0]) if D is not None else None
        return du, dk, dD, dpre, dpost
    _, n, P, Q = kind
    R = B * H
    kf = filter_spectrum(k, P, Q, prec)
    zv = _outer_fwd(u.view(R, L), pre, P, Q, prec)
    zg = _outer_fwd(dy.view(R, L), post, P, Q, prec)
    dkz = alloc((2, H, (P // 2 + 1) * Q), u.device)
    _inner(zg, kf, H, B, P, Q, mode=3, prec=prec, z2=zv, out=dkz)
    dk = alloc((H, Lk), u.device)
    _outer_inv(dkz, dk, None, epi=3, H=H, u=None, pre=None, post=None, dy=None, D=None,
               P=P, Q=Q, prec=prec)
    _inner(zg, kf, H, B, P, Q, mode=2, prec=prec)
    dd_part = _outer_inv(zg, du.view(R, L), dpre, epi=1, H=H, u=u, pre=pre, post=post, dy=dy, D=D,
                         P=P, Q=Q, prec=prec)
    dD = dd_part.view(B, H, -1).sum((0, 2)) if D is not None else None
    if post is not None:
        _inner(zv, kf, H, B, P, Q, mode=1, prec=prec)
        _outer_inv(zv, dpost.view(R, L), None, epi=2, H=H, u=u, pre=pre, post=None, dy=dy, D=D,
                   P=P, Q=Q, prec=prec)
    return du, dk, dD, dpre, dpost


def filter_spectrum(k, P: int, Q: int, prec: str):
    """The long path's filter transform [2, H, P*Q] fp32 (transposed order per kp row)."""
    H = k.shape[0]
    z = _outer_fwd(k, None, P, Q, prec)
    out = alloc(z.shape, z.device)
    _inner(z, out, H, 1, P, Q, mode=0, prec=prec, out=out)
    return out


def _outer_fwd(x, mult, P: int, Q: int, prec: str):
    R, Lx = x.shape[0], x.shape[-1]
    z = alloc((2, R, (P // 2 + 1) * Q), x.device)
    t = _outer_tiles(P, Q)
    grid = (R, cdiv(P // 2 + 1, t["BKP"]), cdiv(Q, t["BQ"]))
    _outer_fwd_kernel[grid](x, mult if mult is not None else _dummy(x), z, R, Lx, P, Q,
                            HAS_M=mult is not None, PREC=prec, num_warps=_warps(0), **t)
    return z


def _inner(z, s, H: int, B: int, P: int, Q: int, mode: int, prec: str, z2=None, out=None):
    n1, n2 = _split(Q)
    R = z.shape[1]
    grid = (H if mode == 3 else R, P // 2 + 1)  # rows kp > P/2: conjugate symmetry
    _inner_kernel[grid](z, z2 if z2 is not None else z, s, out if out is not None else z,
                        R, H, B, P, MODE=mode, N1=n1, N2=n2, PREC=prec, num_warps=_warps(Q))


def _outer_inv(z, out, out2, epi: int, H: int, u, pre, post, dy, D, P: int, Q: int, prec: str):
    R, Lout = out.shape
    t = _outer_tiles(P, Q)
    bp, bkp = t["BP"], t["BKP"]
    grid = (R, cdiv(cdiv(Lout, Q), bp), cdiv(Q, t["BQ"]))
    dd = alloc((R, grid[1] * grid[2]), z.device)
    dmy = _dummy(z)
    _outer_inv_kernel[grid](
        z, u if u is not None else dmy, pre if pre is not None else dmy,
        post if post is not None else dmy, dy if dy is not None else dmy,
        D if D is not None else dmy, out, out2 if out2 is not None else dmy, dd,
        R, H, Lout, P, Q, EPI=epi, HAS_D=D is not None, HAS_PRE=pre is not None,
        HAS_POST=post is not None, BP=bp, BKP=bkp, BQ=t["BQ"], PREC=prec, num_warps=_warps(0))
    return dd
