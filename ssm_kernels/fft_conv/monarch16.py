"""fft_conv forward and backward for 16-bit storage, on-chip: a two-factor Monarch FFT on tensor
cores.

The "monarch16" path of the Triton backend (interface.MONARCH16 switches it on for bf16 / fp16
passes with a power-of-two transform size N <= MAX_N; the backward is described above
`_monarch16_bwd_kernel`). One program per (channel h,
slice of the batch) loops over PAIRS of batch rows; each pair is convolved in registers / shared
memory from the load of u to the store of y (no intermediate touches HBM).

Transform (N = N1 * N2, n = N2 n1 + n2, k = k1 + N1 k2, W = exp(-2 pi i / N)):
    A[n1, n2] = x[N2 n1 + n2]                          [R1, N2]  (rows n1 >= R1 are zero padding)
    B = F1[:, :R1] @ A                                 [N1, N2]
    C = B * T,   T[k1, n2] = W^(k1 n2)                 (twiddle table)
    X = C @ F2                                         X[k1, k2] = x_hat[k1 + N1 k2]
The spectrum stays in this permuted (k1, k2) layout; the filter's spectrum is precomputed once
per (filter version, N) in the same layout (`filter_tables`, cached like cufft.filter_spectrum).
Inverse, only the rows n1 < R1 that hold outputs t < L:
    E = (X * K) @ conj(F2),   G = E * conj(T),   y[N2 n1 + n2] = (conj(F1)[:R1, :] @ G) / N
R1 = N1 / 2 when L <= N / 2 (always for N = next_pow2(L + Lk - 1) with Lk ~ L): the first
product uses half of F1's columns and the last computes half the rows.

Two real rows share one complex transform: A = va + i vb (the filter is real, so Re and Im of
the inverse are the two convolutions). Per pair: 4 real dots per complex product, i.e. 2 per row
(the same count as a real-input first stage / real-output last stage, and half for the middle
two products).

Precision: every tl.dot takes fp16 operands with fp32 accumulation (bf16's 8-bit mantissa gives
~4.6e-3 relative error over the four products, fp16 ~5e-4: numbers in bench/NOTES.md). fp16's
range needs scaling, all by powers of two or folded into tables:
    A     = va s_a + i vb s_b, s = 2^-e with max|v s| < 1 per row (from the tile's max; exact
          for bf16 / fp16 data: a power of two); Re / Im of the result are undone separately
    C     |C| <= R1 (<= 64): cast as is
    K     the cached spectrum / (max|K| N2) per channel (|K| <= 1 / N2; fp16 table)
    Y     |Y| <= N/2 / N2 = N1/2: cast as is
    E, G  |G| = |E| <= N2 N1/2 = N/2: cast as is
    y     = out * (max|K| N2 / N) / s_row, in fp32, then + D v, * post_gate, cast.
The three table products stay in fp32 arithmetic: doing them in fp16 (tried) raised the error
(fp16 storage 3.2-4.8e-4 -> 4.0-6.3e-4) and did not shorten the sm_90 SASS (2514 -> 2594
instructions at N = 8192: no packed f16x2 math in the wgmma accumulator layout).
DFT matrices and twiddles are fp16 tables (cached per (N1, N2, device)), loaded from global
memory every iteration (L2-resident; with the filter table ~176 KB per pair of rows at N = 8192);
no sin/cos in the kernel.
Caveat of the pairing: a NaN / inf in one row of a pair also poisons its partner's output.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
import triton
import triton.language as tl

from .._config import triton_interpret
from .._device import sm_count
from .._launch import fast_kernel
from .cufft import _capturing, cached_spectrum
from .triton import _load_g, _load_v, _store_du, _store_y

# largest transform size N served on-chip (L <= 4096 with Lk <= L); above it the cuFFT path
MAX_N = 8192
MIN_N = 256  # both factors >= 16 (tl.dot's minimum)
# tests set this to fill the output with NaN before the kernel writes it
FILL_NAN = False
# the compiled kernel of the latest launch (benchmarks read n_regs / n_spills / shared from it)
last_kernel = None


def transform_size(L: int, Lk: int) -> int:
    """The power of two N >= L + Lk - 1 (linear convolution), at least MIN_N."""
    return max(MIN_N, 1 << max(0, (L + Lk - 2).bit_length()))


def supports(L: int, Lk: int) -> bool:
    return transform_size(L, Lk) <= MAX_N


def split(n: int) -> Tuple[int, int]:
    """(N1, N2), N1 = 2^ceil(m/2) >= N2: minimises the dot FLOPs 8 N (N1 + 2 N2) per pair
    with the zero half of the first / last product skipped (N = 8192: 128 x 64)."""
    lg = n.bit_length() - 1
    n1 = 1 << ((lg + 1) // 2)
    return n1, n // n1


def rows(n: int, n1: int, L: int) -> int:
    """R1: data / output rows of the [N1, N2] time tile (N1 / 2 when the signal fits in the first
    half; tl.dot needs R1 >= 16)."""
    return n1 // 2 if (L <= n // 2 and n1 >= 32) else n1


# ---------------------------------------------------------------------------------------------
# tables: DFT matrices and twiddles per (N1, N2, device), the filter spectrum per filter version
# ---------------------------------------------------------------------------------------------

_TABLES: Dict[tuple, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _expi(r: torch.Tensor, c: torch.Tensor, n: int) -> torch.Tensor:
    """[2, len(r), len(c)] (real, imag) of exp(-2 pi i r c / n), float64, exact index products."""
    ang = (torch.outer(r, c) % n).to(torch.float64) * (-2.0 * math.pi / n)
    return torch.stack([torch.cos(ang), torch.sin(ang)])


def _make_tables(n1: int, n2: int, device):
    a = torch.arange(n1, device=device, dtype=torch.int64)
    b = torch.arange(n2, device=device, dtype=torch.int64)
    f1, f2, tw = _expi(a, a, n1), _expi(b, b, n2), _expi(a, b, n1 * n2)
    # conj(T) (the inverse's twiddle; the inverse's 1 / N2 stage scale is in the filter table)
    conj = torch.tensor([1.0, -1.0], device=device, dtype=tw.dtype)[:, None, None]
    tw = torch.cat([tw, tw * conj])
    return tuple(t.to(torch.float16).contiguous() for t in (f1, f2, tw))


def dft_tables(n1: int, n2: int, device):
    """(F1 [2, N1, N1], F2 [2, N2, N2], T [4, N1, N2]: T and conj(T)) fp16, (real, imag) pairs,
    computed once per (N1, N2, device). (conj(T) is a second copy so that the inverse reloads it
    instead of keeping T live in registers across the product.)
    While capturing a CUDA graph a missing entry is computed inside the graph and not kept."""
    return _cached_tables(_TABLES, _make_tables, n1, n2, device)


def _cached_tables(cache: dict, make, n1: int, n2: int, device):
    """make(n1, n2, device), kept in `cache` per (N1, N2, device) (a torch.device (u.device) or a
    string), except while capturing a CUDA graph."""
    key = (n1, n2, device)
    hit = cache.get(key)
    if hit is None:
        hit = make(n1, n2, device)
        if _capturing(torch.device(device)):
            return hit
        cache[key] = hit
    return hit


def _filter_tables(k: torch.Tensor, n1: int, n2: int, fft_dtype=torch.float32,
                   dtype=torch.float16):
    """(K / (max|K| N2) [H, 2, N1, N2] in `dtype`, kscale [H] fp32); the spectrum in fft_dtype."""
    n = n1 * n2
    kf = torch.fft.fft(k.to(fft_dtype), n=n)                  # [H, N], index k1 + N1 k2
    kf = kf.view(k.shape[0], n2, n1).transpose(1, 2)          # [H, N1, N2]
    kmax = kf.abs().amax(dim=(1, 2)).clamp_min(torch.finfo(torch.float32).tiny)
    ks = kf / (kmax[:, None, None] * n2)  # the inverse's 1/N2 stage scale folded in
    tab = torch.stack([ks.real, ks.imag], 1).to(dtype).contiguous()  # [H, 2, N1, N2]
    return tab, (kmax * (n2 / n)).to(torch.float32).contiguous()


def _conj_tables(k: torch.Tensor, n1: int, n2: int):
    tab, kscale = filter_tables(k, n1, n2)
    tab = tab.clone()
    tab[:, 1].neg_()
    return tab, kscale


def filter_tables_conj(k: torch.Tensor, n1: int, n2: int):
    """filter_tables with the imaginary plane negated: conj(K) (the split backward's du kernel is
    the forward's code with this table: correlation); cached the same way."""
    return cached_spectrum(k, ("monarch16 conj", n1, n2), lambda k: _conj_tables(k, n1, n2))


def filter_tables(k: torch.Tensor, n1: int, n2: int):
    """(Ks [H, 2, N1, N2] fp16: K / (max|K| N2) in the permuted layout; kscale [H] fp32 =
    max|K| N2 / N)
    for k fp32 [H, Lk]; cached across calls while k is unchanged (cufft.cached_spectrum)."""
    return cached_spectrum(k, ("monarch16", n1, n2), lambda k: _filter_tables(k, n1, n2))


# ---------------------------------------------------------------------------------------------
# kernel
# ---------------------------------------------------------------------------------------------

@triton.jit
def _cmm(ar, ai, br, bi):
    """(ar + i ai) @ (br + i bi): fp16 operands, fp32 results."""
    rr = tl.dot(ar, br, tl.dot(-ai, bi))
    ri = tl.dot(ar, bi, tl.dot(ai, br))
    return rr, ri


@triton.jit
def _pow2_scale(amax):
    """(s, 1/s) with s a power of two and amax * s < 1 (amax >= 0, finite; 0 -> 1)."""
    e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF)   # biased exponent: amax < 2^(e-126)
    e = tl.minimum(tl.maximum(e, 1), 252)
    s = ((253 - e) << 23).to(tl.float32, bitcast=True)     # 2^(126 - e)
    inv = ((e + 1) << 23).to(tl.float32, bitcast=True)     # 2^(e - 126)
    return s, inv


@triton.jit
def _cmul_table(xr, xi, t_ptr, p, STRIDE: tl.constexpr):
    """(xr + i xi) * (t[p] + i t[STRIDE + p]) (an fp16 table) in fp32, cast to fp16 for the
    next dot."""
    tr = tl.load(t_ptr + p).to(tl.float32)
    ti = tl.load(t_ptr + STRIDE + p).to(tl.float32)
    return (xr * tr - xi * ti).to(tl.float16), (xr * ti + xi * tr).to(tl.float16)


@triton.jit
def _cmul_table_conj(xr, xi, t_ptr, p, STRIDE: tl.constexpr):
    """(xr + i xi) * conj(t[p] + i t[STRIDE + p]) in fp32, cast to fp16."""
    tr = tl.load(t_ptr + p).to(tl.float32)
    ti = tl.load(t_ptr + STRIDE + p).to(tl.float32)
    return (xr * tr + xi * ti).to(tl.float16), (xi * tr - xr * ti).to(tl.float16)


@triton.jit
def _dft(ar, ai, f1_ptr, f2_ptr, tw_ptr, p_f1h, p_f2, p_tw, N1: tl.constexpr, N2: tl.constexpr):
    """X = (F1[:, :R1] @ A * T) @ F2 (fp32 [N1, N2] pair) for A = ar + i ai fp16 [R1, N2]."""
    f1r = tl.load(f1_ptr + p_f1h)
    f1i = tl.load(f1_ptr + N1 * N1 + p_f1h)
    br, bi = _cmm(f1r, f1i, ar, ai)
    cr, ci = _cmul_table(br, bi, tw_ptr, p_tw, N1 * N2)
    f2r = tl.load(f2_ptr + p_f2)
    f2i = tl.load(f2_ptr + N2 * N2 + p_f2)
    return _cmm(cr, ci, f2r, f2i)


@triton.jit
def _idft_mid(yr, yi, f2_ptr, tw_ptr, p_f2, p_tw, N1: tl.constexpr, N2: tl.constexpr,
              TWC: tl.constexpr):
    """G = (Y @ conj F2) * conj(T) (fp16 pair) for the rows of Y (fp16) that p_tw addresses: the
    inverse up to its last product (over k1). TWC: conj(T) read from its own copy (planes 2, 3);
    else T's planes conjugated in the arithmetic (same values; one table less in L1 / L2)."""
    f2r = tl.load(f2_ptr + p_f2)
    f2i = tl.load(f2_ptr + N2 * N2 + p_f2)
    er, ei = _cmm(yr, yi, f2r, -f2i)
    if TWC:
        gr, gi = _cmul_table(er, ei, tw_ptr + 2 * N1 * N2, p_tw, N1 * N2)
    else:
        gr, gi = _cmul_table_conj(er, ei, tw_ptr, p_tw, N1 * N2)
    return gr, gi


@triton.jit
def _idft(yr, yi, f1_ptr, f2_ptr, tw_ptr, p_f1g, p_f2, p_tw, N1: tl.constexpr, N2: tl.constexpr,
          TWC: tl.constexpr):
    """conj(F1)[:R1, :] @ ((Y @ conj F2) * conj(T)) (fp32 [R1, N2] pair) for Y fp16: the
    unnormalised inverse DFT (N ifft) of Y in the (k1, k2) layout, rows n1 < R1."""
    gr, gi = _idft_mid(yr, yi, f2_ptr, tw_ptr, p_f2, p_tw, N1, N2, TWC)
    g1r = tl.load(f1_ptr + p_f1g)
    g1i = tl.load(f1_ptr + N1 * N1 + p_f1g)
    return _cmm(g1r, -g1i, gr, gi)


@triton.jit
def _offsets(N1: tl.constexpr, N2: tl.constexpr, R1: tl.constexpr):
    """Offsets of the [R1, N2] time tile (index N2 n1 + n2), F1[:, :R1], F1[:R1, :] (F1 is
    symmetric), F2, and the [N1, N2] spectrum / twiddle tables."""
    o_r = tl.arange(0, R1)
    o_1 = tl.arange(0, N1)
    o_2 = tl.arange(0, N2)
    o_t = o_r[:, None] * N2 + o_2[None, :]
    p_f1h = o_1[:, None] * N1 + o_r[None, :]
    p_f1g = o_r[:, None] * N1 + o_1[None, :]
    p_f2 = o_2[:, None] * N2 + o_2[None, :]
    p_tw = o_1[:, None] * N2 + o_2[None, :]
    return o_t, p_f1h, p_f1g, p_f2, p_tw


@triton.jit
def _epilogue(y_ptr, u_ptr, pre_ptr, post_ptr, p, m, c, b_d,
              HAS_D: tl.constexpr, HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr):
    v = c
    if HAS_D:  # u (and the pre gate) again: L1 / L2 hits, cheaper than keeping v live
        _, _, v = _load_v(u_ptr, pre_ptr, p, m, HAS_PRE)
    _store_y(y_ptr, post_ptr, p, m, c, v, b_d, HAS_D, HAS_POST)


@triton.jit
def _channel(kscale_ptr, i_h, i_s, B, B_PER):
    """(filter scale, first row, end row) of the program for channel i_h, batch slice i_s."""
    b_start = i_s * B_PER
    return tl.load(kscale_ptr + i_h), b_start, tl.minimum(b_start + B_PER, B)


@triton.jit
def _pair_rows(i_b, i_h, H, L, o_t, b_end):
    """Offsets of rows b, b + 1 of the pair at i_b and row b + 1's mask (it may not exist)."""
    p_a = (i_b * H + i_h).to(tl.int64) * L + o_t
    p_b = ((i_b + 1) * H + i_h).to(tl.int64) * L + o_t
    return p_a, p_b, o_t < tl.where(i_b + 1 < b_end, L, 0)


@triton.jit
def _pair_epilogue(y_ptr, u_ptr, pre_ptr, post_ptr, p_a, p_b, m_a, m_b, outa, outb, sca, scb, b_d,
                   HAS_D: tl.constexpr, HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr):
    """_epilogue for both rows of a pair (out * its scale)."""
    _epilogue(y_ptr, u_ptr, pre_ptr, post_ptr, p_a, m_a, outa * sca, b_d, HAS_D, HAS_PRE, HAS_POST)
    _epilogue(y_ptr, u_ptr, pre_ptr, post_ptr, p_b, m_b, outb * scb, b_d, HAS_D, HAS_PRE, HAS_POST)


# ---------------------------------------------------------------------------------------------
# row-blocked variants (KBLOCK): the spectrum processed in blocks of BJ rows k1
# ---------------------------------------------------------------------------------------------
#
# Rows k1 of the spectrum are independent from the first product's output to the inverse's
# first product: block j (rows k1 in [j, j + BJ)) needs only F1[j:j+BJ, :R1] @ A, T's rows j, F2,
# the filter's rows j, conj(T)'s rows j; the inverse's last product sums over k1 and so
# accumulates over the blocks: out += conj(F1)[:R1, j:j+BJ] @ G_j. Same products, same FLOPs,
# same roundings per element (the sum over k1 in the last product is split into N1 / BJ partial
# dots accumulated in fp32: a different summation order only). What changes is what is live:
# the unblocked kernels hold whole [N1, N2] complex fp32 tiles (64 registers a thread per tile at
# N = 8192 and 8 warps; the backward two of them, plus P: 255 registers and 1.2-1.6 KB of spill
# stores on sm_90), the blocked ones [BJ, N2] tiles plus the [R1, N2] inputs and accumulators.
# The backward does its dk read-modify-write per block (same bytes), and the FINAL inverse of
# the dk spectrum is blocked the same way after a max pass over the program's buffer slice.

@triton.jit
def _blk_offsets(N1: tl.constexpr, N2: tl.constexpr, R1: tl.constexpr, BJ: tl.constexpr):
    """Offsets of block 0: F1[:BJ, :R1] (+ j N1 for block j), F1[:R1, :BJ] (+ j), and the
    [BJ, N2] rows of the spectrum / twiddle / filter tables (+ j N2)."""
    o_r = tl.arange(0, R1)
    o_j = tl.arange(0, BJ)
    o_2 = tl.arange(0, N2)
    p_f1h = o_j[:, None] * N1 + o_r[None, :]
    p_f1g = o_r[:, None] * N1 + o_j[None, :]
    p_tw = o_j[:, None] * N2 + o_2[None, :]
    return p_f1h, p_f1g, p_tw


@triton.jit
def _cmm_acc(ar, ai, br, bi, accr, acci):
    """acc + (ar + i ai) @ (br + i bi): fp16 operands, fp32 accumulators."""
    rr = tl.dot(ar, br, tl.dot(-ai, bi, accr))
    ri = tl.dot(ar, bi, tl.dot(ai, br, acci))
    return rr, ri


@triton.jit
def _spec_times_filter(xr, xi, ks_ptr, p_ks, q_ptr, p_q, N1: tl.constexpr, N2: tl.constexpr,
                       SAVEQ: tl.constexpr):
    """X * K from the filter table (the split backward's du passes the conjugated table:
    correlation), fp16; SAVEQ: X itself stored as fp16 planes at q_ptr + p_q (its Q for dk)."""
    if SAVEQ:
        tl.store(q_ptr + p_q, xr.to(tl.float16))
        tl.store(q_ptr + N1 * N2 + p_q, xi.to(tl.float16))
    return _cmul_table(xr, xi, ks_ptr, p_ks, N1 * N2)


@triton.jit
def _conv_blocked(ar, ai, f1_ptr, f2_ptr, tw_ptr, ks_ptr, p_f1h, p_f1g, p_f2, p_tw, q_ptr,
                  N1: tl.constexpr, N2: tl.constexpr, R1: tl.constexpr, BJ: tl.constexpr,
                  TWC: tl.constexpr, SAVEQ: tl.constexpr):
    """The forward's whole transform - product - inverse for A = ar + i ai fp16 [R1, N2] with the
    filter table at ks_ptr (this channel's planes): (Re, Im) fp32 [R1, N2], unnormalised.
    SAVEQ: see _spec_times_filter (q_ptr: the pair's [2, N1, N2] fp16 planes)."""
    outa = tl.zeros((R1, N2), dtype=tl.float32)
    outb = tl.zeros((R1, N2), dtype=tl.float32)
    for j in range(0, N1, BJ):
        q_tw = p_tw + j * N2
        xr, xi = _dft(ar, ai, f1_ptr, f2_ptr, tw_ptr, p_f1h + j * N1, p_f2, q_tw, N1, N2)
        yr, yi = _spec_times_filter(xr, xi, ks_ptr, q_tw, q_ptr, q_tw, N1, N2, SAVEQ)
        gr, gi = _idft_mid(yr, yi, f2_ptr, tw_ptr, p_f2, q_tw, N1, N2, TWC)
        g1r = tl.load(f1_ptr + p_f1g + j)
        g1i = tl.load(f1_ptr + N1 * N1 + p_f1g + j)
        outa, outb = _cmm_acc(g1r, -g1i, gr, gi, outa, outb)
    return outa, outb


@triton.jit
def _conv(ar, ai, f1_ptr, f2_ptr, tw_ptr, ks_ptr, p_ks, p_f1h, p_f1g, p_f2, p_tw, q_ptr,
          N1: tl.constexpr, N2: tl.constexpr, R1: tl.constexpr, BJ: tl.constexpr,
          TWC: tl.constexpr, SAVEQ: tl.constexpr):
    """Transform - product with the filter table (ks_ptr + p_ks) - inverse of A = ar + i ai:
    (Re, Im) fp32 [R1, N2]; blocked when BJ (then ks_ptr is the channel's base, p_ks unused).
    SAVEQ: the spectrum also stored at q_ptr (the split backward's du kernel)."""
    if BJ:
        outa, outb = _conv_blocked(ar, ai, f1_ptr, f2_ptr, tw_ptr, ks_ptr, p_f1h, p_f1g, p_f2,
                                   p_tw, q_ptr, N1, N2, R1, BJ, TWC, SAVEQ)
    else:
        # ---- forward: B = F1[:, :R1] @ A, C = B * T, X = C @ F2
        xr, xi = _dft(ar, ai, f1_ptr, f2_ptr, tw_ptr, p_f1h, p_f2, p_tw, N1, N2)
        # ---- pointwise product with the (max-normalised) filter spectrum
        yr, yi = _spec_times_filter(xr, xi, ks_ptr, p_ks, q_ptr, p_tw, N1, N2, SAVEQ)
        # ---- inverse: E = Y @ conj(F2), G = E * conj(T), out = conj(F1)[:R1, :] @ G
        outa, outb = _idft(yr, yi, f1_ptr, f2_ptr, tw_ptr, p_f1g, p_f2, p_tw, N1, N2, TWC)
    return outa, outb


@triton.jit
def _scaled_pair(u_ptr, pre_ptr, p_a, p_b, m_a, m_b, HAS_PRE: tl.constexpr):
    """(v_a s_a, v_b s_b, 1 / s_a, 1 / s_b): the pair's rows v = u * pre_gate (fp32), each times
    its power-of-two scale s (max |v s| < 1)."""
    _, _, va = _load_v(u_ptr, pre_ptr, p_a, m_a, HAS_PRE)
    _, _, vb = _load_v(u_ptr, pre_ptr, p_b, m_b, HAS_PRE)
    s_a, inv_a = _pow2_scale(tl.max(tl.abs(va)))
    s_b, inv_b = _pow2_scale(tl.max(tl.abs(vb)))
    return va * s_a, vb * s_b, inv_a, inv_b


@triton.jit
def _program_prologue(ks_ptr, kscale_ptr, d_ptr, B, L, B_PER, HAS_D: tl.constexpr,
                      N1: tl.constexpr, N2: tl.constexpr, R1: tl.constexpr, BJ: tl.constexpr):
    """The program prologue of every kernel of the forward's shape (the forward, the split
    backward's du kernel, the float32 forward): channel i_h = program_id(0), batch slice
    program_id(1); the time-tile offsets o_t and their mask m_t; the table offsets (row-blocked
    when BJ: then ks_ptr is moved to the channel's filter planes and p_ks is unused, else p_ks
    addresses them from the base); the filter scale, the slice's rows [b_start, b_end), and D."""
    i_h, i_s = tl.program_id(0), tl.program_id(1)
    o_t, p_f1h, p_f1g, p_f2, p_tw = _offsets(N1, N2, R1)
    m_t = o_t < L
    if BJ:
        p_f1h, p_f1g, p_tw = _blk_offsets(N1, N2, R1, BJ)
        ks_ptr += i_h.to(tl.int64) * 2 * N1 * N2
        p_ks = p_tw  # unused
    else:
        p_ks = i_h.to(tl.int64) * 2 * N1 * N2 + p_tw
    b_ks, b_start, b_end = _channel(kscale_ptr, i_h, i_s, B, B_PER)
    b_d = 0.0
    if HAS_D:
        b_d = tl.load(d_ptr + i_h)
    return i_h, o_t, m_t, p_f1h, p_f1g, p_f2, p_tw, ks_ptr, p_ks, b_ks, b_start, b_end, b_d


@triton.jit
def _monarch16_fwd_kernel(
    # pointers: u, pre, post, y [B, H, L] contiguous (16-bit); d [H] fp32;
    # ks [H, 2, N1, N2] fp16, kscale [H] fp32 (filter_tables); f1 [2, N1, N1], f2 [2, N2, N2],
    # tw [4, N1, N2] fp16 (dft_tables)
    u_ptr, pre_ptr, post_ptr, d_ptr, y_ptr, ks_ptr, kscale_ptr, f1_ptr, f2_ptr, tw_ptr,
    # sizes: rows of one program's slice (even, except the last slice's tail)
    B, H, L, B_PER,
    # meta-parameters
    HAS_D: tl.constexpr, HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr,
    N1: tl.constexpr, N2: tl.constexpr, R1: tl.constexpr,
    # rows k1 per block (KBLOCK; a power of two >= 16 dividing N1); 0: the whole spectrum at once;
    # TWC: the inverse reads conj(T) from its own copy (TWIDDLE_CONJ_COPY), else T conjugated
    BJ: tl.constexpr, TWC: tl.constexpr,
):
    (i_h, o_t, m_t, p_f1h, p_f1g, p_f2, p_tw, ks_ptr, p_ks, b_ks, b_start, b_end,
     b_d) = _program_prologue(ks_ptr, kscale_ptr, d_ptr, B, L, B_PER, HAS_D, N1, N2, R1, BJ)
    for i_b in range(b_start, b_end, 2):
        p_a, p_b, m_b = _pair_rows(i_b, i_h, H, L, o_t, b_end)
        # ---- prologue: v = u * pre_gate, one power-of-two scale per row (the transform is
        # linear and the filter real, so Re / Im of the result carry each row's own scale)
        ar, ai, inv_a, inv_b = _scaled_pair(u_ptr, pre_ptr, p_a, p_b, m_t, m_b, HAS_PRE)
        ar = ar.to(tl.float16)
        ai = ai.to(tl.float16)
        outa, outb = _conv(ar, ai, f1_ptr, f2_ptr, tw_ptr, ks_ptr, p_ks, p_f1h, p_f1g, p_f2, p_tw,
                           ks_ptr, N1, N2, R1, BJ, TWC, False)
        # ---- epilogue: undo the scales, + D v, * post_gate, cast, store
        _pair_epilogue(y_ptr, u_ptr, pre_ptr, post_ptr, p_a, p_b, m_t, m_b, outa, outb,
                       b_ks * inv_a, b_ks * inv_b, b_d, HAS_D, HAS_PRE, HAS_POST)


# ---------------------------------------------------------------------------------------------
# launcher: check, allocate, launch
# ---------------------------------------------------------------------------------------------

_monarch16_fwd_kernel = fast_kernel(_monarch16_fwd_kernel)  # launch cache (_launch.py)


# launch configuration by N (GPU): (num_warps, num_stages[, maxnreg]). One stage: the loop's loads
# are the L2-resident tables, and pipelining them (Triton's default 3 stages) triples their shared
# memory. maxnreg caps registers per thread so that more programs share an SM (ptxas otherwise
# takes up to 255: one 8-warp program per SM); bench/gpu_monarch.py sweeps these.
# N = 4096 (L = 2048): 4 warps with KBLOCK 32 (the session-8 H100 run: fwd 0.134 vs 0.168 ms at 8
# warps unblocked, bwd 0.232 vs 0.325; f+b 0.412 vs 0.577; bench/NOTES.md "fft8").
LAUNCH = {2048: (4, 1), 4096: (4, 1), 8192: (8, 1)}


def _launch(n: int, table=None) -> dict:
    cfg = (1, 1) if triton_interpret() else (LAUNCH if table is None else table).get(n, (4, 1))
    opts = dict(num_warps=cfg[0], num_stages=cfg[1])
    if len(cfg) > 2 and cfg[2]:
        opts["maxnreg"] = cfg[2]
    return opts


def _sm_count(device) -> int:
    if triton_interpret() or device.type != "cuda":
        return 2
    return sm_count(device)


def _batch_split(B: int, H: int, sms: int) -> Tuple[int, int]:
    s = max(1, min(-(-B // 2), -(-2 * sms // H)))
    per = -(-B // s)
    per += per % 2
    return -(-B // per), per


def batch_split(B: int, H: int, device) -> Tuple[int, int]:
    """(slices S per channel, rows per slice, even): about two programs per SM; each slice
    re-reads the tables, so no more slices than needed."""
    return _batch_split(B, H, _sm_count(device))


# Host time per call matters (B8 H768 L1024: ~0.07 ms forward on the GPU): the per-call plan
# (sizes, launch options, batch split) is memoised on (shape, device, launch table entry, SMs).
_PLANS: Dict[tuple, tuple] = {}


# Row-blocked kernels (issue 11, session 7 helper fft7):
# N -> BJ, the rows k1 of the spectrum one block holds (a power of two >= 16 dividing N1, < N1);
# N absent (or BJ >= N1): the unblocked kernels. Separately for the forward and the backward.
# Measured (session 8, H100, B8 H768 bf16 D on, ms fwd / bwd): N = 4096 (L = 2048) BJ 32 at 4 warps
# 0.134 / 0.232 against the unblocked 8-warp 0.168 / 0.325 (BJ 32 at 8 warps 0.146 / 0.302): the
# default there. N = 8192 (L = 4096): every blocked variant lost (bj32 0.529 / 0.833, bj16 0.768 /
# 1.203, bj64 0.450 / 1.116 against 0.282 / 0.876): unblocked. N = 2048: not blocked (no register
# gain offline; the forward is 0.069 ms).
# SPLIT: N -> (N1, N2) instead of split(n) (e.g. 4096: (128, 32), the same dot FLOPs as 64 x 64
# but every product with M >= 64, i.e. wgmma, and R1 = 64). Launch options stay LAUNCH /
# LAUNCH_BWD by N (bench/gpu_fft7.py sweeps them with the knobs).
# TWIDDLE_CONJ_COPY: the inverse's conj(T) from its own table copy (True, the measured default) or
# from T with the sign of the imaginary part flipped in the product (False: the same values, one
# [2, N1, N2] fp16 table (32 KB at N = 8192) less in the per-channel L1 / L2 working set).
TWIDDLE_CONJ_COPY = True
# SPLIT + KBLOCK together faulted on the H100 (see _plan): refused on CUDA devices unless True
SPLIT_BLOCKS_ON_GPU = False
KBLOCK: Dict[int, int] = {4096: 32}
KBLOCK_BWD: Dict[int, int] = {4096: 32}
SPLIT: Dict[int, Tuple[int, int]] = {}


def _kblock(n: int, n1: int, bwd) -> int:
    """Rows per block at N = n from KBLOCK_BWD (bwd True), KBLOCK (False) or the table given."""
    table = bwd if isinstance(bwd, dict) else (KBLOCK_BWD if bwd else KBLOCK)
    bj = table.get(n, 0)
    if not bj or bj >= n1:
        return 0
    if bj < 16 or bj & (bj - 1) or n1 % bj:
        raise ValueError(f"monarch16: KBLOCK {bj} at N = {n} must be a power of two >= 16 dividing N1 = {n1}")
    return bj


def _split(n: int) -> Tuple[int, int]:
    hit = SPLIT.get(n)
    if hit is None:
        return split(n)
    n1, n2 = hit
    if n1 * n2 != n or min(n1, n2) < 16:
        raise ValueError(f"monarch16: SPLIT {hit} for N = {n} must multiply to N with factors >= 16")
    return n1, n2


def _knobs(n: int, bwd: bool) -> tuple:
    """What a plan at N = n depends on besides the shape: the knob tables' entries, the refusal
    switch, and the SM-count / interpreter functions themselves (tools and tests replace them to
    reach both FINAL variants or the GPU's launch options; the interpreter switch is process-wide,
    read when Triton decorates the kernels, so its value is not re-read per call)."""
    return ((LAUNCH_BWD if bwd else LAUNCH).get(n), SPLIT.get(n),
            (KBLOCK_BWD if bwd else KBLOCK).get(n), SPLIT_BLOCKS_ON_GPU, _sm_count, triton_interpret)


def _plan(B: int, H: int, L: int, Lk: int, device, bwd: bool):
    # host time per call (issue 8): keyed on the shape; the knob state is compared, not re-derived
    # (no transform-size arithmetic, environment read or SM-count lookup on a hit)
    key = (B, H, L, Lk, device, bwd)
    hit = _PLANS.get(key)
    if hit is not None and hit[1] == _knobs(hit[0][0], bwd):
        return hit[0]
    table = LAUNCH_BWD if bwd else LAUNCH
    n = transform_size(L, Lk)
    if n > MAX_N:
        raise ValueError(f"monarch16 fft_conv: transform size {n} > MAX_N = {MAX_N} (L={L}, Lk={Lk})")
    n1, n2 = _split(n)
    S, per = _batch_split(B, H, _sm_count(device))
    r1 = rows(n, n1, L)
    bj = _kblock(n, n1, bwd)
    if bj and n in SPLIT and device.type == "cuda" and not SPLIT_BLOCKS_ON_GPU:
        raise ValueError(
            f"monarch16: row blocks (KBLOCK{'_BWD' if bwd else ''} {bj}) with a SPLIT override "
            f"({n1} x {n2}) at N = {n} are refused on the GPU: 'split bj64' (4096 as 128 x 32, "
            f"BJ 64) hit 'an illegal memory access' on the H100 (Triton 3.6) although the "
            f"interpreter's address check finds no out-of-bounds access (bench/NOTES.md "
            f"\"fft8\"); set monarch16.SPLIT_BLOCKS_ON_GPU = True to run it anyway")
    plan = (n, n1, n2, r1, S, per, _launch(n, table), bj)
    if len(_PLANS) > 1024:
        _PLANS.clear()
    _PLANS[key] = (plan, _knobs(n, bwd))
    return plan


_M16_DTYPES = (torch.float16, torch.bfloat16)


def _prepare(u, k, bwd=False):
    """Checks; (plan, DFT tables, filter tables) for u [B, H, L] 16-bit, k [H, Lk] fp32; plan =
    (N, N1, N2, R1, slices S, rows per slice, launch options, BJ: rows per block, 0 = unblocked)."""
    if u.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"monarch16 fft_conv: u must be float16 or bfloat16, got {u.dtype}")
    B, H, L = u.shape
    plan = _plan(B, H, L, k.shape[1], u.device, bwd)
    n1, n2 = plan[1], plan[2]
    return plan, dft_tables(n1, n2, u.device), filter_tables(k, n1, n2)


def fft_conv_fwd(u, k, D, pre, post):
    """u, pre, post [B, H, L] contiguous, float16 or bfloat16 (float32: the split-product kernel
    below); k [H, Lk] fp32; D [H] fp32 or None."""
    if u.dtype == torch.float32:
        return _fft_conv_fwd_f32(u, k, D, pre, post)
    (n, n1, n2, r1, S, per, opts, bj), tables, filt = _prepare(u, k)
    global last_kernel
    y, last_kernel = _fwd_launch(_monarch16_fwd_kernel, u, D, pre, post, filt, tables, S, per,
                                 n1, n2, r1, bj, TWC=TWIDDLE_CONJ_COPY, **opts)
    return y


def _fwd_launch(kernel, u, D, pre, post, filt, tables, S, per, n1, n2, r1, bj, **kw):
    """(y, the compiled kernel) of a forward-shaped kernel's launch over (H, S) programs; filt =
    (ks, kscale), tables = (f1, f2, tw); kw: further constexprs and the launch options."""
    B, H, L = u.shape
    ks, kscale = filt
    y = torch.full_like(u, float("nan")) if FILL_NAN else torch.empty_like(u)
    # absent operands: any valid pointer (u), never dereferenced under the constexpr flags
    return y, kernel[(H, S)](
        u, pre if pre is not None else u, post if post is not None else u,
        D if D is not None else kscale, y, ks, kscale, *tables, B, H, L, per,
        HAS_D=D is not None, HAS_PRE=pre is not None, HAS_POST=post is not None,
        N1=n1, N2=n2, R1=r1, BJ=bj, **kw)


# ---------------------------------------------------------------------------------------------
# float32 storage (issue 11, session 9 helper fft9): the same on-chip transform with every product
# on fp16 tensor cores in three parts (interface.MONARCH16_F32: on for N <= 4096)
# ---------------------------------------------------------------------------------------------
#
# An fp32 tile x (already inside fp16's range by the scales of the module docstring) is split into
# hi = fp16(x) and lo = fp16(x - hi); a real product is hi_a hi_b + hi_a lo_b + lo_a hi_b (lo_a lo_b,
# ~2^-22 of the product, dropped), accumulated in fp32: three fp16 dots per real dot, 12 per
# complex product (the 16-bit path: 4). The DFT matrices F1, F2 are stored as (hi, lo) fp16 planes;
# the twiddles and the filter spectrum as fp32 (their products are fp32 arithmetic, as in the
# 16-bit path). Per element the split keeps ~22 mantissa bits (hi's 11 + lo's 11; lo's absolute
# floor is fp16's 2^-24 of the power-of-two row scale), so each of the four products adds
# ~2^-22 relative (normwise), against the float32 bound of 1e-5: tf32x3 would do the same with
# twice the tensor-core time (tf32 runs at half fp16's rate) and bf16x3 keeps only ~16 bits.
# Forward only (the backward of an fp32 call stays on the cuFFT path), N <= MAX_N; the spectrum
# whole or in row blocks (KBLOCK_F32, as _conv_blocked).

@triton.jit
def _hilo(x):
    """(hi, lo) fp16 with hi + lo = x to ~22 bits (x fp32 inside fp16's range)."""
    hi = x.to(tl.float16)
    return hi, (x - hi.to(tl.float32)).to(tl.float16)


@triton.jit
def _dot3(ah, al, bh, bl, acc):
    """acc + a @ b for split operands: the two small products first, then hi @ hi."""
    return tl.dot(ah, bh, tl.dot(ah, bl, tl.dot(al, bh, acc)))


@triton.jit
def _cmm3(arh, arl, aih, ail, brh, brl, bih, bil, R: tl.constexpr, C: tl.constexpr):
    """(ar + i ai) @ (br + i bi) for split fp16 operands, fp32 [R, C] results. Four independent
    chains of three dots (one per real product), added at the end: the 16-bit _cmm's chains are
    two dots long, one chain of six per part would triple the dependent tensor-core latency."""
    zero = tl.zeros((R, C), dtype=tl.float32)
    rr = _dot3(arh, arl, brh, brl, zero) - _dot3(aih, ail, bih, bil, zero)
    ri = _dot3(arh, arl, bih, bil, zero) + _dot3(aih, ail, brh, brl, zero)
    return rr, ri


@triton.jit
def _load4(t_ptr, p, PLANE: tl.constexpr, CONJ: tl.constexpr):
    """(re hi, re lo, im hi, im lo) fp16 planes of a split table [4, ...] = (re hi, im hi, re lo,
    im lo); CONJ: the imaginary planes negated (exact)."""
    rh = tl.load(t_ptr + p)
    ih = tl.load(t_ptr + PLANE + p)
    rl = tl.load(t_ptr + 2 * PLANE + p)
    il = tl.load(t_ptr + 3 * PLANE + p)
    if CONJ:
        ih = -ih
        il = -il
    return rh, rl, ih, il


@triton.jit
def _cmul32(xr, xi, t_ptr, p, PLANE: tl.constexpr, CONJ: tl.constexpr):
    """(xr + i xi) * t[p] (or conj) for an fp32 (re, im) table, split for the next dot."""
    tr = tl.load(t_ptr + p)
    ti = tl.load(t_ptr + PLANE + p)
    if CONJ:
        ti = -ti
    yr = xr * tr - xi * ti
    yi = xr * ti + xi * tr
    yrh, yrl = _hilo(yr)
    yih, yil = _hilo(yi)
    return yrh, yrl, yih, yil


@triton.jit
def _rows_x3(arh, arl, aih, ail, f1_ptr, f2_ptr, tw_ptr, ks_ptr, p_ks, p_f1h, p_f1g, p_f2, p_tw,
             NJ: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, R1: tl.constexpr):
    """Rows k1 of the spectrum that p_f1h / p_tw / p_ks / p_f1g address (NJ of them) from the
    split A: (Re, Im) fp32 [R1, N2] of conj(F1)[:R1, rows] @ G_rows (the inverse's last product
    restricted to those rows; the sum over all rows is the unnormalised result)."""
    # B = F1[rows, :R1] @ A;  C = B * T
    f1rh, f1rl, f1ih, f1il = _load4(f1_ptr, p_f1h, N1 * N1, False)
    br, bi = _cmm3(f1rh, f1rl, f1ih, f1il, arh, arl, aih, ail, NJ, N2)
    crh, crl, cih, cil = _cmul32(br, bi, tw_ptr, p_tw, N1 * N2, False)
    # X = C @ F2;  Y = X * K
    f2rh, f2rl, f2ih, f2il = _load4(f2_ptr, p_f2, N2 * N2, False)
    xr, xi = _cmm3(crh, crl, cih, cil, f2rh, f2rl, f2ih, f2il, NJ, N2)
    yrh, yrl, yih, yil = _cmul32(xr, xi, ks_ptr, p_ks, N1 * N2, False)
    # E = Y @ conj(F2);  G = E * conj(T)
    f2rh, f2rl, f2ih, f2il = _load4(f2_ptr, p_f2, N2 * N2, True)
    er, ei = _cmm3(yrh, yrl, yih, yil, f2rh, f2rl, f2ih, f2il, NJ, N2)
    grh, grl, gih, gil = _cmul32(er, ei, tw_ptr, p_tw, N1 * N2, True)
    # conj(F1)[:R1, rows] @ G
    g1rh, g1rl, g1ih, g1il = _load4(f1_ptr, p_f1g, N1 * N1, True)
    return _cmm3(g1rh, g1rl, g1ih, g1il, grh, grl, gih, gil, R1, N2)


@triton.jit
def _conv_x3(va, vb, f1_ptr, f2_ptr, tw_ptr, ks_ptr, p_ks, p_f1h, p_f1g, p_f2, p_tw,
             N1: tl.constexpr, N2: tl.constexpr, R1: tl.constexpr, BJ: tl.constexpr):
    """_conv for fp32 A = va + i vb [R1, N2] (scaled rows) with split products: (Re, Im) fp32
    [R1, N2], unnormalised. Tables: f1 [4, N1, N1], f2 [4, N2, N2] split fp16; tw [2, N1, N2]
    fp32; the channel's fp32 [2, N1, N2] filter planes at ks_ptr + p_ks. BJ: rows k1 in blocks
    of BJ (as _conv_blocked: the last product accumulated over the blocks; p_ks = p_tw then)."""
    arh, arl = _hilo(va)
    aih, ail = _hilo(vb)
    if BJ:
        outa = tl.zeros((R1, N2), dtype=tl.float32)
        outb = tl.zeros((R1, N2), dtype=tl.float32)
        for j in range(0, N1, BJ):
            q_tw = p_tw + j * N2
            ra, rb = _rows_x3(arh, arl, aih, ail, f1_ptr, f2_ptr, tw_ptr, ks_ptr, q_tw,
                              p_f1h + j * N1, p_f1g + j, p_f2, q_tw, BJ, N1, N2, R1)
            outa += ra
            outb += rb
    else:
        outa, outb = _rows_x3(arh, arl, aih, ail, f1_ptr, f2_ptr, tw_ptr, ks_ptr, p_ks, p_f1h,
                              p_f1g, p_f2, p_tw, N1, N1, N2, R1)
    return outa, outb


@triton.jit
def _monarch16_f32_fwd_kernel(
    # pointers: u, pre, post, y [B, H, L] contiguous fp32; d [H] fp32; ks [H, 2, N1, N2] fp32,
    # kscale [H] fp32 (filter_tables_f32); f1 [4, N1, N1], f2 [4, N2, N2] fp16 (hi, lo);
    # tw [2, N1, N2] fp32 (dft_tables_f32)
    u_ptr, pre_ptr, post_ptr, d_ptr, y_ptr, ks_ptr, kscale_ptr, f1_ptr, f2_ptr, tw_ptr,
    B, H, L, B_PER,
    HAS_D: tl.constexpr, HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr,
    N1: tl.constexpr, N2: tl.constexpr, R1: tl.constexpr, BJ: tl.constexpr,
):
    (i_h, o_t, m_t, p_f1h, p_f1g, p_f2, p_tw, ks_ptr, p_ks, b_ks, b_start, b_end,
     b_d) = _program_prologue(ks_ptr, kscale_ptr, d_ptr, B, L, B_PER, HAS_D, N1, N2, R1, BJ)
    for i_b in range(b_start, b_end, 2):
        p_a, p_b, m_b = _pair_rows(i_b, i_h, H, L, o_t, b_end)
        ar, ai, inv_a, inv_b = _scaled_pair(u_ptr, pre_ptr, p_a, p_b, m_t, m_b, HAS_PRE)
        outa, outb = _conv_x3(ar, ai, f1_ptr, f2_ptr, tw_ptr, ks_ptr, p_ks, p_f1h,
                              p_f1g, p_f2, p_tw, N1, N2, R1, BJ)
        _pair_epilogue(y_ptr, u_ptr, pre_ptr, post_ptr, p_a, p_b, m_t, m_b, outa, outb,
                       b_ks * inv_a, b_ks * inv_b, b_d, HAS_D, HAS_PRE, HAS_POST)


_monarch16_f32_fwd_kernel = fast_kernel(_monarch16_f32_fwd_kernel)

# launch configuration of the float32 forward by N (GPU), as LAUNCH; KBLOCK_F32: N -> rows k1 per
# block (as KBLOCK; absent or >= N1: unblocked). Chosen offline (sm_90, ptxas 12.9; bench/NOTES.md
# "fft9"): the fewest warp instructions per pair of rows with <= 64 B of spills, at 4 warps (two
# programs per SM, as the 16-bit kernels): N = 2048 unblocked 7.2k (255 regs, 0 B), 4096 BJ 16
# 17.3k (8 B), 8192 BJ 16 37.9k (60 B); the 0-spill 8-warp builds (4096 BJ 32: 18.5k, 8192 BJ 16:
# 50.4k) are bench/gpu_fft9.py's "f32 w8" row.
LAUNCH_F32 = {2048: (4, 1), 4096: (4, 1), 8192: (4, 1)}
KBLOCK_F32: Dict[int, int] = {4096: 16, 8192: 16}
_TABLES_F32: Dict[tuple, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
last_f32_kernel = None


def _split_planes(t: torch.Tensor) -> torch.Tensor:
    """[2, a, b] float64 (re, im) -> [4, a, b] fp16 (re hi, im hi, re lo, im lo)."""
    hi = t.to(torch.float16)
    lo = (t - hi.to(torch.float64)).to(torch.float16)
    return torch.cat([hi, lo]).contiguous()


def dft_tables_f32(n1: int, n2: int, device):
    """(F1 [4, N1, N1], F2 [4, N2, N2] fp16 split planes, T [2, N1, N2] fp32), once per
    (N1, N2, device) (not kept while capturing a CUDA graph, as dft_tables)."""
    return _cached_tables(_TABLES_F32, _make_tables_f32, n1, n2, device)


def _make_tables_f32(n1: int, n2: int, device):
    a = torch.arange(n1, device=device, dtype=torch.int64)
    b = torch.arange(n2, device=device, dtype=torch.int64)
    return (_split_planes(_expi(a, a, n1)), _split_planes(_expi(b, b, n2)),
            _expi(a, b, n1 * n2).to(torch.float32).contiguous())


def filter_tables_f32(k: torch.Tensor, n1: int, n2: int):
    """filter_tables in fp32 (the spectrum taken in float64): (Ks [H, 2, N1, N2] fp32, kscale [H]
    fp32); cached the same way (cufft.cached_spectrum)."""
    return cached_spectrum(k, ("monarch16 f32", n1, n2),
                           lambda k: _filter_tables(k, n1, n2, torch.float64, torch.float32))


def _fft_conv_fwd_f32(u, k, D, pre, post):
    """The float32 forward (u, pre, post fp32 [B, H, L] contiguous; k fp32 [H, Lk]; D or None)."""
    B, H, L = u.shape
    n, n1, n2, r1, S, per = _plan(B, H, L, k.shape[1], u.device, False)[:6]
    global last_f32_kernel
    y, last_f32_kernel = _fwd_launch(
        _monarch16_f32_fwd_kernel, u, D, pre, post, filter_tables_f32(k, n1, n2),
        dft_tables_f32(n1, n2, u.device), S, per, n1, n2, r1, _kblock(n, n1, KBLOCK_F32),
        **_launch(n, LAUNCH_F32))
    return y


# ---------------------------------------------------------------------------------------------
# backward: du, dpre, dpost per row, dk / dD summed over the batch (one program per channel slice)
# ---------------------------------------------------------------------------------------------
#
# g = dy * post_gate. Per pair of rows (a, b):
#   Q  = DFT(ga t_a + i gb t_b)              own power-of-two scales t (du per row, as the forward)
#   P  = DFT(va c_a + i vb c_b)              c_x = min(s_x, t_y s_y / t_x): c_a t_a = c_b t_b = c
#   dk spectrum += conj(P) Q / c             (fp32, in the program's slice of a global buffer)
#   du: Q * conj(K) -> inverse (rows t < L) = corr(g, k); dv = corr + D g; du = dv pre, dpre = dv u
#   dpost (post gate only): DFT(v s) * K -> inverse = conv(v, k); dpost = dy (conv + D v)
#   dD partial += sum_t (ga va + gb vb)      (fp32, exact products of the loaded values)
# Re IFFT(conj(P) Q) = c (corr(ga, va) + corr(gb, vb)) (the cross terms of the packing are purely
# imaginary), hence the shared product scale c for dk: the row with the larger max|v| max|g| keeps
# its own scale, the other is scaled down (its contribution to the sum is smaller by that ratio).
# The filter's gradient is the inverse of sum over all pairs and slices, taken once per channel
# after the kernel (torch.fft.ifft of [H, N]); deterministic: each program owns its buffer slice
# and the slices are summed in a fixed order.

@triton.jit
def _du_epilogue(du_ptr, dpre_ptr, dy_ptr, u_ptr, pre_ptr, post_ptr, p, m, dv, b_d,
                 HAS_D: tl.constexpr, HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr):
    """dv = corr(g, k) + D g; du = dv * pre_gate, dpre = dv * u (g, u reloaded: L1 / L2 hits)."""
    if HAS_D:
        _, g = _load_g(dy_ptr, post_ptr, p, m, HAS_POST)
        dv += b_d * g
    x, gate, _ = _load_v(u_ptr, pre_ptr, p, m, HAS_PRE)
    _store_du(du_ptr, dpre_ptr, p, m, dv, x, gate, HAS_PRE)


@triton.jit
def _bwd_pair_in(u_ptr, pre_ptr, dy_ptr, post_ptr, p_a, p_b, m_a, m_b,
                 HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr):
    """A pair's backward inputs: (dD partial, s_a, s_b, 1/s_a, 1/s_b, 1/t_a, 1/t_b, 1/c, the fp16
    operands g t (Q) and v c (P)). Scales: own for g (du) and v (dpost), the shared product
    scale c for dk (see above)."""
    _, _, va = _load_v(u_ptr, pre_ptr, p_a, m_a, HAS_PRE)
    _, _, vb = _load_v(u_ptr, pre_ptr, p_b, m_b, HAS_PRE)
    _, ga = _load_g(dy_ptr, post_ptr, p_a, m_a, HAS_POST)
    _, gb = _load_g(dy_ptr, post_ptr, p_b, m_b, HAS_POST)
    dd = tl.sum(tl.sum(ga * va + gb * vb, 1), 0)
    s_a, inv_s_a = _pow2_scale(tl.max(tl.abs(va)))
    s_b, inv_s_b = _pow2_scale(tl.max(tl.abs(vb)))
    t_a, inv_t_a = _pow2_scale(tl.max(tl.abs(ga)))
    t_b, inv_t_b = _pow2_scale(tl.max(tl.abs(gb)))
    c_a = tl.minimum(s_a, s_b * t_b * inv_t_a)   # powers of two: exact (inf for a zero row)
    c_b = tl.minimum(s_b, s_a * t_a * inv_t_b)
    inv_c = tl.maximum(inv_s_a * inv_t_a, inv_s_b * inv_t_b)
    # the fp16 operands now (g's fp32 tiles would stay live across P's transform)
    gar = (ga * t_a).to(tl.float16)
    gai = (gb * t_b).to(tl.float16)
    return (dd, s_a, s_b, inv_s_a, inv_s_b, inv_t_a, inv_t_b, inv_c, gar, gai,
            (va * c_a).to(tl.float16), (vb * c_b).to(tl.float16))


@triton.jit
def _dk_rmw(wk_ptr, p, reread, pr, pi, qr, qi, inv_c, PLANE: tl.constexpr):
    """wk[p] += conj(P) Q / c (fp32 (re, im) planes PLANE apart; P fp16); no read unless
    `reread` (the program's first pair writes)."""
    pr32 = pr.to(tl.float32)
    pi32 = pi.to(tl.float32)
    m_w = p < tl.where(reread, PLANE, 0)
    wr = tl.load(wk_ptr + p, mask=m_w, other=0.0) + (pr32 * qr + pi32 * qi) * inv_c
    wi = tl.load(wk_ptr + PLANE + p, mask=m_w, other=0.0) + (pr32 * qi - pi32 * qr) * inv_c
    tl.store(wk_ptr + p, wr)
    tl.store(wk_ptr + PLANE + p, wi)


@triton.jit
def _monarch16_bwd_kernel(
    # pointers: dy, u, pre, post, du, dpre, dpost [B, H, L] contiguous (16-bit); d [H] fp32;
    # wk [H, S, 2, N1, N2] fp32 (the dk spectrum per program; written on its first pair),
    # wd [H, S] fp32 (dD per program); dk [H, Lk] fp32 (written here when FINAL: S == 1);
    # ks, kscale, f1, f2, tw: as the forward
    dy_ptr, u_ptr, pre_ptr, post_ptr, d_ptr, du_ptr, dpre_ptr, dpost_ptr, wk_ptr, wd_ptr,
    dk_ptr, ks_ptr, kscale_ptr, f1_ptr, f2_ptr, tw_ptr,
    B, H, L, Lk, B_PER, S,
    HAS_D: tl.constexpr, HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, FINAL: tl.constexpr,
    N1: tl.constexpr, N2: tl.constexpr, R1: tl.constexpr, BJ: tl.constexpr, TWC: tl.constexpr,
):
    i_h, i_s = tl.program_id(0), tl.program_id(1)
    o_t, p_f1h, p_f1g, p_f2, p_tw = _offsets(N1, N2, R1)
    if BJ:  # row blocks (as the forward)
        p_f1h, p_f1g, p_tw = _blk_offsets(N1, N2, R1, BJ)
    m_t = o_t < L
    # per-channel / per-program bases as scalar pointers (int64 offset tensors would hold
    # registers across the loop); the [N1, N2] offsets p_tw are shared by all tables
    ks_ptr += i_h.to(tl.int64) * 2 * N1 * N2
    wk_ptr += (i_h * S + i_s).to(tl.int64) * 2 * N1 * N2
    b_ks, b_start, b_end = _channel(kscale_ptr, i_h, i_s, B, B_PER)
    b_d = 0.0
    if HAS_D:
        b_d = tl.load(d_ptr + i_h)
    b_dd = 0.0
    for i_b in range(b_start, b_end, 2):
        p_a, p_b, m_b = _pair_rows(i_b, i_h, H, L, o_t, b_end)
        dd, s_a, s_b, inv_s_a, inv_s_b, inv_t_a, inv_t_b, inv_c, gar, gai, var, vai = _bwd_pair_in(
            u_ptr, pre_ptr, dy_ptr, post_ptr, p_a, p_b, m_t, m_b, HAS_PRE, HAS_POST)
        b_dd += dd
        if BJ:
            cora = tl.zeros((R1, N2), dtype=tl.float32)
            corb = tl.zeros((R1, N2), dtype=tl.float32)
            first = i_b > b_start
            for j in range(0, N1, BJ):
                q_tw = p_tw + j * N2
                # P_j = rows j of DFT(v c) (fp16, its only use the dk product); Q_j of DFT(g t)
                pr, pi = _dft(var, vai, f1_ptr, f2_ptr, tw_ptr, p_f1h + j * N1, p_f2, q_tw, N1, N2)
                pr = pr.to(tl.float16)
                pi = pi.to(tl.float16)
                qr, qi = _dft(gar, gai, f1_ptr, f2_ptr, tw_ptr, p_f1h + j * N1, p_f2, q_tw, N1, N2)
                # dk spectrum rows j += conj(P_j) Q_j / c (the first pair writes without reading)
                _dk_rmw(wk_ptr, q_tw, first, pr, pi, qr, qi, inv_c, N1 * N2)
                # du: rows j of Q * conj(K), inverse accumulated over the blocks
                zr, zi = _cmul_table_conj(qr, qi, ks_ptr, q_tw, N1 * N2)
                gr, gi = _idft_mid(zr, zi, f2_ptr, tw_ptr, p_f2, q_tw, N1, N2, TWC)
                g1r = tl.load(f1_ptr + p_f1g + j)
                g1i = tl.load(f1_ptr + N1 * N1 + p_f1g + j)
                cora, corb = _cmm_acc(g1r, -g1i, gr, gi, cora, corb)
            tl.debug_barrier()  # the next pair's threads may read what other threads stored
        else:
            # ---- P = DFT(v c), kept as fp16 (its only use: the dk product)
            pr, pi = _dft(var, vai, f1_ptr, f2_ptr, tw_ptr, p_f1h, p_f2, p_tw, N1, N2)
            pr = pr.to(tl.float16)
            pi = pi.to(tl.float16)
            # ---- Q = DFT(g t)
            qr, qi = _dft(gar, gai, f1_ptr, f2_ptr, tw_ptr, p_f1h, p_f2, p_tw, N1, N2)
            # ---- dk spectrum += conj(P) Q / c (fp32; only this program touches its slice)
            _dk_rmw(wk_ptr, p_tw, i_b > b_start, pr, pi, qr, qi, inv_c, N1 * N2)
            tl.debug_barrier()  # the next pair's threads may read what other threads stored
            # ---- du: corr(g, k) = inverse of Q * conj(K)
            zr, zi = _cmul_table_conj(qr, qi, ks_ptr, p_tw, N1 * N2)
            cora, corb = _idft(zr, zi, f1_ptr, f2_ptr, tw_ptr, p_f1g, p_f2, p_tw, N1, N2, TWC)
        _du_epilogue(du_ptr, dpre_ptr, dy_ptr, u_ptr, pre_ptr, post_ptr, p_a, m_t,
                     cora * (b_ks * inv_t_a), b_d, HAS_D, HAS_PRE, HAS_POST)
        _du_epilogue(du_ptr, dpre_ptr, dy_ptr, u_ptr, pre_ptr, post_ptr, p_b, m_b,
                     corb * (b_ks * inv_t_b), b_d, HAS_D, HAS_PRE, HAS_POST)
        # ---- dpost = dy (conv(v, k) + D v): the forward's transform with post := dy
        if HAS_POST:
            _, _, va = _load_v(u_ptr, pre_ptr, p_a, m_t, HAS_PRE)
            _, _, vb = _load_v(u_ptr, pre_ptr, p_b, m_b, HAS_PRE)
            cva, cvb = _conv((va * s_a).to(tl.float16), (vb * s_b).to(tl.float16), f1_ptr, f2_ptr,
                             tw_ptr, ks_ptr, p_tw, p_f1h, p_f1g, p_f2, p_tw, ks_ptr, N1, N2, R1, BJ,
                             TWC, False)
            _pair_epilogue(dpost_ptr, u_ptr, pre_ptr, dy_ptr, p_a, p_b, m_t, m_b, cva, cvb,
                           b_ks * inv_s_a, b_ks * inv_s_b, b_d, HAS_D, HAS_PRE, True)
    tl.store(wd_ptr + i_h * S + i_s, b_dd)
    if FINAL:
        if BJ:
            # the program's own dk spectrum: max pass (one pow2 scale), then the blocked inverse,
            # real part only: Re(conj(F1) G) = F1r Gr + F1i Gi
            tl.debug_barrier()
            w_max = 0.0
            for j in range(0, N1, BJ):
                wr = tl.load(wk_ptr + p_tw + j * N2)
                wi = tl.load(wk_ptr + N1 * N2 + p_tw + j * N2)
                w_max = tl.maximum(w_max, tl.maximum(tl.max(tl.abs(wr)), tl.max(tl.abs(wi))))
            s_w, inv_w = _pow2_scale(w_max)
            dkr = tl.zeros((R1, N2), dtype=tl.float32)
            for j in range(0, N1, BJ):
                q_tw = p_tw + j * N2
                wr = (tl.load(wk_ptr + q_tw) * s_w).to(tl.float16)
                wi = (tl.load(wk_ptr + N1 * N2 + q_tw) * s_w).to(tl.float16)
                gr, gi = _idft_mid(wr, wi, f2_ptr, tw_ptr, p_f2, q_tw, N1, N2, TWC)
                g1r = tl.load(f1_ptr + p_f1g + j)
                g1i = tl.load(f1_ptr + N1 * N1 + p_f1g + j)
                dkr = tl.dot(g1r, gr, tl.dot(g1i, gi, dkr))
            tl.store(dk_ptr + i_h.to(tl.int64) * Lk + o_t, dkr * (inv_w / (N1 * N2)), mask=o_t < Lk)
        else:
            # one program per channel: the inverse of its dk spectrum here (fp16 operands with a
            # power-of-two scale, as every stage); rows n1 < R1 hold t < R1 N2 >= L >= Lk
            tl.debug_barrier()
            wr = tl.load(wk_ptr + p_tw)
            wi = tl.load(wk_ptr + N1 * N2 + p_tw)
            s_w, inv_w = _pow2_scale(tl.maximum(tl.max(tl.abs(wr)), tl.max(tl.abs(wi))))
            dkr, _ = _idft((wr * s_w).to(tl.float16), (wi * s_w).to(tl.float16), f1_ptr, f2_ptr,
                           tw_ptr, p_f1g, p_f2, p_tw, N1, N2, TWC)
            # Re of the unnormalised inverse / N (Im: the packing's cross terms, dropped)
            tl.store(dk_ptr + i_h.to(tl.int64) * Lk + o_t, dkr * (inv_w / (N1 * N2)), mask=o_t < Lk)


_monarch16_bwd_kernel = fast_kernel(_monarch16_bwd_kernel)


# launch configuration of the backward by N (GPU), as LAUNCH; bench/gpu_monarch.py sweeps it
LAUNCH_BWD = {2048: (4, 1), 4096: (4, 1), 8192: (8, 1)}
last_bwd_kernel = None


def fft_conv_bwd(dy, u, k, D, pre, post):
    """(du, dk fp32 [H, Lk], dD fp32 [H] or None, dpre or None, dpost or None); 16-bit u, dy,
    gates [B, H, L] contiguous; k [H, Lk] fp32; D [H] fp32 or None."""
    B, H, L = u.shape
    Lk = k.shape[1]
    if SPLIT_BWD:
        mode = SPLIT_BWD.get(transform_size(L, Lk), 0)
        if mode:
            return _fft_conv_bwd_split(dy, u, k, D, pre, post, mode)
    # (_prepare inlined: u's dtype is checked by the forward's _prepare on the same u)
    if u.dtype not in _M16_DTYPES:
        raise TypeError(f"monarch16 fft_conv: u must be float16 or bfloat16, got {u.dtype}")
    device = u.device
    n, n1, n2, r1, S, per, opts, bj = _plan(B, H, L, Lk, device, True)
    f1, f2, tw = dft_tables(n1, n2, device)
    ks, kscale = filter_tables(k, n1, n2)
    if dy.dtype is not u.dtype or not dy.is_contiguous():
        dy = dy.to(u.dtype).contiguous()
    if FILL_NAN:
        new = lambda x: torch.full_like(x, float("nan"))  # noqa: E731
        alloc = lambda *s: torch.full(s, float("nan"), device=device, dtype=torch.float32)  # noqa: E731
        du = new(u)
        dpre = new(pre) if pre is not None else None
        dpost = new(post) if post is not None else None
        wk = alloc(H, S, 2, n1, n2)
        wd = alloc(H, S) if S > 1 else alloc(H)
        dk = alloc(H, Lk) if S == 1 else None
    else:
        # host time (issue 8): fp32 buffers through kscale.new_empty (fp32, u's device: ~0.3 us
        # less per allocation than torch.empty(..., device=, dtype=)), no per-call lambdas
        du = torch.empty_like(u)
        dpre = torch.empty_like(pre) if pre is not None else None
        dpost = torch.empty_like(post) if post is not None else None
        wk = kscale.new_empty((H, S, 2, n1, n2))
        wd = kscale.new_empty((H, S) if S > 1 else H)  # [H] when S == 1: dD itself (no view)
        dk = kscale.new_empty((H, Lk)) if S == 1 else None
    global last_bwd_kernel
    # absent operands: any valid pointer of the right kind, never dereferenced (constexpr flags)
    last_bwd_kernel = _monarch16_bwd_kernel[(H, S)](
        dy, u, pre if pre is not None else u, post if post is not None else u,
        D if D is not None else kscale, du, dpre if dpre is not None else du,
        dpost if dpost is not None else du, wk, wd, dk if dk is not None else wd, ks, kscale,
        f1, f2, tw, B, H, L, Lk, per, S,
        HAS_D=D is not None, HAS_PRE=pre is not None, HAS_POST=post is not None, FINAL=S == 1,
        N1=n1, N2=n2, R1=r1, BJ=bj, TWC=TWIDDLE_CONJ_COPY, **opts)
    if S > 1:  # several programs per channel: sum their spectra in a fixed order, one inverse
        spec = wk.sum(1)                                               # [H, 2, N1, N2]
        spec = torch.complex(spec[:, 0], spec[:, 1]).transpose(1, 2).reshape(H, n)  # k1 + N1 k2
        dk = torch.fft.ifft(spec, n=n).real[:, :Lk].contiguous()
    dD = (wd.sum(1) if S > 1 else wd) if D is not None else None
    return du, dk, dD, dpre, dpost


# ---------------------------------------------------------------------------------------------
# split backward (SPLIT_BWD, issue 11, session 8 helper fftbwd8): du and dk in separate kernels
# ---------------------------------------------------------------------------------------------
#
# The fused backward keeps Q (fp32), P and the du inverse's tiles live together (N = 8192: 255
# registers, 0.3-1.2 KB of spills) and read-modify-writes the fp32 dk spectrum per pair. Split:
#   du kernel  = the forward's code (one transform + product + inverse per pair) on g = dy * post
#                with the conjugated filter table (correlation; filter_tables_conj: the forward's
#                _cmul_table, whose registers allocate better than _cmul_table_conj's), du / dpre
#                epilogue; mode 2 also stores
#                Q = DFT(g t) as fp16 planes [H, pairs, 2, N1, N2] (|Q| <= R1 N2 < 2^15).
#   dk kernel  = per channel (slice), rows k1 in blocks of DK_BLOCK: for each block, over all
#                pairs: P_j = rows j of DFT(v c), Q_j (mode 1: recomputed, rows j of DFT(g t);
#                mode 2: loaded), acc_j += conj(P_j) Q_j / c in registers (no RMW); then
#                (FINAL) its own pow2 scale and the inverse's last product accumulated over the
#                blocks: dk = Re(conj(F1)[:R1, :] @ G) / N as the fused kernel's FINAL; else the
#                block is stored to the program's spectrum slice (summed + ifft on the host).
#                dD from the first block's pair loop.
#   dpost (post gate) = the forward kernel with post := dy (y = (conv(v, k) + D v) * dy).
# Scales as the fused kernel (_bwd_pair_in): g's own t per row, the shared product scale c for P.

@triton.jit
def _monarch16_du_kernel(
    # dy, u, pre, post, du, dpre [B, H, L] 16-bit; d [H] fp32; q [H, pairs, 2, N1, N2] fp16 (SAVEQ)
    dy_ptr, u_ptr, pre_ptr, post_ptr, d_ptr, du_ptr, dpre_ptr, q_ptr, ks_ptr, kscale_ptr,
    f1_ptr, f2_ptr, tw_ptr, B, H, L, B_PER, NP,
    HAS_D: tl.constexpr, HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, SAVEQ: tl.constexpr,
    N1: tl.constexpr, N2: tl.constexpr, R1: tl.constexpr, BJ: tl.constexpr, TWC: tl.constexpr,
):
    (i_h, o_t, m_t, p_f1h, p_f1g, p_f2, p_tw, ks_ptr, p_ks, b_ks, b_start, b_end,
     b_d) = _program_prologue(ks_ptr, kscale_ptr, d_ptr, B, L, B_PER, HAS_D, N1, N2, R1, BJ)
    for i_b in range(b_start, b_end, 2):
        p_a, p_b, m_b = _pair_rows(i_b, i_h, H, L, o_t, b_end)
        _, ga = _load_g(dy_ptr, post_ptr, p_a, m_t, HAS_POST)
        _, gb = _load_g(dy_ptr, post_ptr, p_b, m_b, HAS_POST)
        t_a, inv_a = _pow2_scale(tl.max(tl.abs(ga)))
        t_b, inv_b = _pow2_scale(tl.max(tl.abs(gb)))
        qp = q_ptr + (i_h.to(tl.int64) * NP + i_b // 2) * 2 * N1 * N2
        cora, corb = _conv((ga * t_a).to(tl.float16), (gb * t_b).to(tl.float16), f1_ptr, f2_ptr,
                           tw_ptr, ks_ptr, p_ks, p_f1h, p_f1g, p_f2, p_tw, qp, N1, N2, R1, BJ,
                           TWC, SAVEQ)
        _du_epilogue(du_ptr, dpre_ptr, dy_ptr, u_ptr, pre_ptr, post_ptr, p_a, m_t,
                     cora * (b_ks * inv_a), b_d, HAS_D, HAS_PRE, HAS_POST)
        _du_epilogue(du_ptr, dpre_ptr, dy_ptr, u_ptr, pre_ptr, post_ptr, p_b, m_b,
                     corb * (b_ks * inv_b), b_d, HAS_D, HAS_PRE, HAS_POST)


_monarch16_du_kernel = fast_kernel(_monarch16_du_kernel)


@triton.jit
def _monarch16_dk_kernel(
    # dy, u, pre, post [B, H, L] 16-bit; q [H, pairs, 2, N1, N2] fp16 (LOADQ); wk [H, S, 2, N1, N2]
    # fp32 (not FINAL); wd [H, S] fp32 (dD per program); dk [H, Lk] fp32 (FINAL: S == 1)
    dy_ptr, u_ptr, pre_ptr, post_ptr, q_ptr, wk_ptr, wd_ptr, dk_ptr, f1_ptr, f2_ptr, tw_ptr,
    B, H, L, Lk, B_PER, S, NP,
    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, FINAL: tl.constexpr, LOADQ: tl.constexpr,
    N1: tl.constexpr, N2: tl.constexpr, R1: tl.constexpr, BJ: tl.constexpr, TWC: tl.constexpr,
):
    i_h, i_s = tl.program_id(0), tl.program_id(1)
    o_t, p_f1h, p_f1g, p_f2, p_tw = _offsets(N1, N2, R1)
    p_f1h, p_f1g, p_tw = _blk_offsets(N1, N2, R1, BJ)
    m_t = o_t < L
    wk_ptr += (i_h * S + i_s).to(tl.int64) * 2 * N1 * N2
    q_ptr += i_h.to(tl.int64) * NP * 2 * N1 * N2
    b_start = i_s * B_PER
    b_end = tl.minimum(b_start + B_PER, B)
    b_dd = 0.0
    dkr = tl.zeros((R1, N2), dtype=tl.float32)
    for j in range(0, N1, BJ):
        q_tw = p_tw + j * N2
        accr = tl.zeros((BJ, N2), dtype=tl.float32)
        acci = tl.zeros((BJ, N2), dtype=tl.float32)
        for i_b in range(b_start, b_end, 2):
            p_a, p_b, m_b = _pair_rows(i_b, i_h, H, L, o_t, b_end)
            dd, s_a, s_b, inv_s_a, inv_s_b, inv_t_a, inv_t_b, inv_c, gar, gai, var, vai = _bwd_pair_in(
                u_ptr, pre_ptr, dy_ptr, post_ptr, p_a, p_b, m_t, m_b, HAS_PRE, HAS_POST)
            b_dd += tl.where(j == 0, dd, 0.0)
            pr, pi = _dft(var, vai, f1_ptr, f2_ptr, tw_ptr, p_f1h + j * N1, p_f2, q_tw, N1, N2)
            if LOADQ:
                qp = q_ptr + (i_b // 2) * (2 * N1 * N2)   # inside the channel's [pairs, 2, N1, N2]
                qr = tl.load(qp + q_tw).to(tl.float32)
                qi = tl.load(qp + N1 * N2 + q_tw).to(tl.float32)
            else:
                qr, qi = _dft(gar, gai, f1_ptr, f2_ptr, tw_ptr, p_f1h + j * N1, p_f2, q_tw, N1, N2)
            # conj(P_j) Q_j / c
            accr += (pr * qr + pi * qi) * inv_c
            acci += (pr * qi - pi * qr) * inv_c
        if FINAL:
            # this block's rows of the channel's dk spectrum: own pow2 scale, then the inverse up
            # to its last product; Re(conj(F1) G) = F1r Gr + F1i Gi accumulated over the blocks
            s_w, inv_w = _pow2_scale(tl.maximum(tl.max(tl.abs(accr)), tl.max(tl.abs(acci))))
            gr, gi = _idft_mid((accr * s_w).to(tl.float16), (acci * s_w).to(tl.float16), f2_ptr,
                               tw_ptr, p_f2, q_tw, N1, N2, TWC)
            g1r = tl.load(f1_ptr + p_f1g + j)
            g1i = tl.load(f1_ptr + N1 * N1 + p_f1g + j)
            dkr += tl.dot(g1r, gr, tl.dot(g1i, gi)) * inv_w
        else:
            tl.store(wk_ptr + q_tw, accr)
            tl.store(wk_ptr + N1 * N2 + q_tw, acci)
    tl.store(wd_ptr + i_h * S + i_s, b_dd)
    if FINAL:
        tl.store(dk_ptr + i_h.to(tl.int64) * Lk + o_t, dkr * (1.0 / (N1 * N2)), mask=o_t < Lk)


_monarch16_dk_kernel = fast_kernel(_monarch16_dk_kernel)

# N -> mode of the split backward: 0 / absent = the fused kernel (default); 1 = du kernel + dk
# kernel that recomputes Q; 2 = the du kernel stores Q (fp16) and the dk kernel reads it.
# (Applies to every call at that N, gates included: dpost is then a forward launch with post := dy.)
SPLIT_BWD: Dict[int, int] = {}
# N -> the dk kernel's rows per block (a power of two >= 16 dividing N1; >= N1: one block).
# Offline sm_90 (Triton 3.6, ptxas 12.8, bf16, mode 2, 8 warps) at N = 8192: BJ 128 255 regs /
# 144 B spill (wgmma), 64: 516 B, 32: 254 / 0 (mma.sync, M = 32); N = 4096 (4 warps): 32: 0 B.
DK_BLOCK: Dict[int, int] = {8192: 128, 4096: 32, 2048: 32}
# N -> (num_warps, num_stages) of the dk kernel; absent: LAUNCH_BWD's. The du kernel (and the
# dpost launch) take the forward's LAUNCH / KBLOCK (the same kernel shape).
LAUNCH_DK: Dict[int, tuple] = {}
last_du_kernel = None
last_dk_kernel = None


def _dk_block(n: int, n1: int) -> int:
    bj = min(DK_BLOCK.get(n, n1), n1)
    if bj < 16 or bj & (bj - 1) or n1 % bj:
        raise ValueError(f"monarch16: DK_BLOCK {bj} at N = {n} must be a power of two >= 16 dividing N1 = {n1}")
    return bj


def _fft_conv_bwd_split(dy, u, k, D, pre, post, mode):
    """fft_conv_bwd through the du / dk kernels (SPLIT_BWD mode 1 or 2); same returns."""
    B, H, L = u.shape
    Lk = k.shape[1]
    (n, n1, n2, r1, S, per, opts, bj), (f1, f2, tw), _ = _prepare(u, k)
    ks, kscale = filter_tables_conj(k, n1, n2)
    S_k, per_k = _plan(B, H, L, Lk, u.device, True)[4:6]
    if dy.dtype != u.dtype or not dy.is_contiguous():
        dy = dy.to(u.dtype).contiguous()
    if FILL_NAN:
        new = lambda x: torch.full_like(x, float("nan"))  # noqa: E731
        alloc = lambda *s, dtype=torch.float32: torch.full(s, float("nan"), device=u.device, dtype=dtype)  # noqa: E731
    else:
        new = torch.empty_like
        alloc = lambda *s, dtype=torch.float32: torch.empty(s, device=u.device, dtype=dtype)  # noqa: E731
    du = new(u)
    dpre = new(pre) if pre is not None else None
    NP = -(-B // 2)
    q = alloc(H, NP, 2, n1, n2, dtype=torch.float16) if mode == 2 else ks
    global last_du_kernel, last_dk_kernel, last_bwd_kernel
    last_du_kernel = _monarch16_du_kernel[(H, S)](
        dy, u, pre if pre is not None else u, post if post is not None else u,
        D if D is not None else kscale, du, dpre if dpre is not None else du, q, ks, kscale,
        f1, f2, tw, B, H, L, per, NP,
        HAS_D=D is not None, HAS_PRE=pre is not None, HAS_POST=post is not None, SAVEQ=mode == 2,
        N1=n1, N2=n2, R1=r1, BJ=bj, TWC=TWIDDLE_CONJ_COPY, **opts)
    wk = alloc(H, S_k, 2, n1, n2) if S_k > 1 else kscale
    wd = alloc(H, S_k) if S_k > 1 else alloc(H)
    dk = alloc(H, Lk) if S_k == 1 else None
    cfg = LAUNCH_DK.get(n)
    opts_k = _launch(n, LAUNCH_DK if cfg else LAUNCH_BWD)
    last_dk_kernel = last_bwd_kernel = _monarch16_dk_kernel[(H, S_k)](
        dy, u, pre if pre is not None else u, post if post is not None else u, q, wk, wd,
        dk if dk is not None else wd, f1, f2, tw, B, H, L, Lk, per_k, S_k, NP,
        HAS_PRE=pre is not None, HAS_POST=post is not None, FINAL=S_k == 1, LOADQ=mode == 2,
        N1=n1, N2=n2, R1=r1, BJ=_dk_block(n, n1), TWC=TWIDDLE_CONJ_COPY, **opts_k)
    if S_k > 1:
        spec = wk.sum(1)                                               # [H, 2, N1, N2]
        spec = torch.complex(spec[:, 0], spec[:, 1]).transpose(1, 2).reshape(H, n)  # k1 + N1 k2
        dk = torch.fft.ifft(spec, n=n).real[:, :Lk].contiguous()
    dpost = None
    if post is not None:   # dpost = dy (conv(v, k) + D v): the forward with post := dy
        dpost = fft_conv_fwd(u, k, D, pre, dy)
    dD = (wd.sum(1) if S_k > 1 else wd) if D is not None else None
    return du, dk, dD, dpre, dpost
