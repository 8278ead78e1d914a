"""fft_conv fused around cuFFT (torch.fft): Triton kernels do everything except the transforms.

A real signal x of even length n = 2m is transformed as ONE complex signal of length m,
z[j] = x[2j] + i x[2j+1] (a free view of the zero-padded fp32 row), and the real spectrum
X[k], k = 0..m, is untangled from Z = FFT_m(z) inside our spectral kernel:
    E = (Z[k] + conj Z[m-k]) / 2,  O = w^k (Z[k] - conj Z[m-k]) / 2i,  w = exp(-2 pi i / n)
    X[k] = E + O,  X[m-k] = conj(E - O).
After the pointwise product Y = X * K the same kernel packs Y back,
    P = Y[k] + conj Y[m-k],  S = i conj(w^k) (Y[k] - conj Y[m-k]),
    Z'[k] = (P + S) / n,  Z'[m-k] = conj(P - S) / n,
so that IFFT_m(Z') (unscaled: norm="forward") viewed as real IS the time-domain result (even /
odd samples interleaved). Compared with rfft / irfft this is the same arithmetic (cuFFT's R2C
does the same packing internally) but the untangle and the pack fuse into the product kernel,
irfft's defensive clone of its input (cuFFT's C2R destroys it) and both normalisation passes
disappear, and the product runs in place.

Forward  (4 launches + 2 cuFFT calls):
    pad      x[r, t] = u * pre_gate (fp32), zeros for L <= t < n          one pass over u
    FFT_m    torch.fft.fft on the complex view of x
    spectral per (head, frequency block), loop over the batch: untangle, * K (the filter
             spectrum, cached across calls, see `filter_spectrum`), pack, in place
    IFFT_m   torch.fft.ifft(norm="forward")
    epilogue y = (c + D v) * post_gate, cast, first L samples only
Backward (same shape): pad writes v and g = dy * post_gate into one buffer (one FFT call for
both); the spectral kernel forms dV = G conj(K) (correlation), V K (only when the post gate needs
the forward output again), and accumulates sum_b conj(V_b) G_b for dk over the batch in
registers (deterministic, no atomics, no partial sums); dD is lag 0 of that correlation
(sum_t g v), so it needs no reduction of its own.

FFT size: n = 2m with m the smallest 7-smooth number (2^a 3^b 5^c 7^d, fast in cuFFT) with
2m >= L + Lk - 1 (linear, not circular, convolution).
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from functools import lru_cache

import torch
import triton
import triton.language as tl

from .._config import triton_interpret
from .._launch import cdiv, next_power_of_2, fast_kernel

# tests set this to fill every output and intermediate with NaN before the kernels write them
FILL_NAN = False
# The backward's two inverse transforms (dv [and conv(v, k)] over R rows, the dk correlation over H
# rows) as ONE torch.fft.ifft call: the forward transform then runs over 2R + H rows (the last H
# uninitialised: their spectrum is discarded, the spectral kernel overwrites those rows with the
# packed dk correlation) and the inverse over the contiguous rows that follow. One cuFFT call and
# one allocation fewer per backward (host time: ~20-30 us on the GPU machine), 1/(2B) more
# forward-transform work. H100 session 7 (B8 H768 fp32, `bench/gpu_fft_merged.py`): bitwise equal
# to the two-call form at L 1024-4096 with and without gates, f+b L1024 0.508 vs 0.570 ms, the
# others within 1%: on.
MERGED_INVERSE = True
# The backward's two epilogues (du / dpre / dpost over the R rows, dk / dD over the H filter rows)
# as ONE launch (_epi_bwd_dk_kernel: the programs after the row epilogue's copy the dk rows; the
# same helpers, so every output is bitwise the same). One Triton launch fewer per backward, which
# runs on autograd's device thread (issue 8: at the tiny shape of `bench --overhead`, f+b eager
# 631 us against 29 us of GPU work on the H100). Session 10 helper ffthost10; False: two launches.
FUSED_DK_EPILOGUE = True


def _alloc(shape, device, dtype=torch.float32):
    if FILL_NAN:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


@lru_cache(maxsize=None)
def _smooth(target: int) -> int:
    """The smallest 2^a 3^b 5^c 7^d >= target."""
    best = 1 << max(0, (target - 1).bit_length())
    p7 = 1
    while p7 < best:
        p5 = p7
        while p5 < best:
            p3 = p5
            while p3 < best:
                v = p3
                while v < target:
                    v *= 2
                best = min(best, v)
                p3 *= 3
            p5 *= 5
        p7 *= 7
    return best


def fft_size(L: int, Lk: int) -> int:
    """n = 2m, m 7-smooth, n >= L + Lk - 1."""
    return 2 * _smooth(max(1, -(-(L + Lk - 1) // 2)))


# ---------------------------------------------------------------------------------------------
# filter spectrum cache
# ---------------------------------------------------------------------------------------------
# rfft(k, n) is a full transform of an (H, n) signal: at B = 1 it is half the work of a call, and
# in inference or gradient accumulation the filter does not change between calls. An entry is
# reused only for the SAME tensor object (weak reference, so a new tensor that lands on a freed
# address never hits) with the same data pointer, version counter (every in-place op and
# optimizer step bumps it), shape, strides, dtype, device, stream and n.
# Never while capturing a CUDA graph: a graph would replay the product with the spectrum of the
# filter as it was at capture time, even if the filter buffer changed between replays, and a
# spectrum computed during capture holds no values until the first replay; so a capture always
# recomputes (inside the graph) and stores nothing. Writes that bypass the version counter
# (`k.data.copy_(...)`, raw kernels on k's memory) must call `clear_filter_cache()`.

_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_CACHE_MAX = 64
_cache_enabled = True


def set_filter_cache(enabled: bool) -> None:
    """Turn the filter-spectrum cache on (default) or off; off also clears it."""
    global _cache_enabled
    _cache_enabled = bool(enabled)
    if not enabled:
        _CACHE.clear()


def clear_filter_cache() -> None:
    _CACHE.clear()


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream_key(device: torch.device):
    if device.type != "cuda":
        return None
    if _raw_stream is not None and device.index is not None:  # no Stream object per call
        return _raw_stream(device.index)
    return torch.cuda.current_stream(device).cuda_stream


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _rfft(k: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():  # (a cached spectrum must never hold an autograd graph)
        return torch.fft.rfft(k.to(torch.float32), n=n)


def filter_spectrum(k: torch.Tensor, n: int) -> torch.Tensor:
    """rfft(k, n) as complex64 [H, n/2 + 1] (k fp32 [H, Lk]), from the cache when valid."""
    return cached_spectrum(k, n, lambda k: _rfft(k, n))


def _spectrum_real(k: torch.Tensor, n: int) -> torch.Tensor:
    """filter_spectrum's values as the fp32 [H, n/2 + 1, 2] view our kernels take: cached as
    that view (its own entry), so a call costs no view_as_real."""
    return cached_spectrum(k, ("re", n), lambda k: torch.view_as_real(_rfft(k, n)))


_is_compiling = torch.compiler.is_compiling


def cached_spectrum(k: torch.Tensor, tag, compute):
    """compute(k) (a tensor derived from the filter k: its spectrum in some layout), cached under
    (k's identity, version, layout, `tag`) by the rules above; compute runs under no_grad."""
    device = k.device
    cuda = device.type == "cuda"
    if not _cache_enabled or _is_compiling() or (cuda and torch.cuda.is_current_stream_capturing()):
        with torch.no_grad():
            return compute(k)
    key = (k.data_ptr(), k.shape, k.stride(), k.dtype, device, tag,
           _stream_key(device) if cuda else None)
    hit = _CACHE.get(key)
    if hit is not None:
        ref, version, spec = hit
        if ref() is k and k._version == version:
            _CACHE.move_to_end(key)
            return spec
        del _CACHE[key]
    with torch.no_grad():
        spec = compute(k)

    def _drop(_, key=key):
        entry = _CACHE.get(key)
        if entry is not None and entry[0]() is None:
            _CACHE.pop(key, None)

    _CACHE[key] = (weakref.ref(k, _drop), k._version, spec)
    while len(_CACHE) > _CACHE_MAX:
        _CACHE.popitem(last=False)
    return spec


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _pad_kernel(
    # pointers: x, mx, x2, mx2 [R, L] (any float dtype); out [S, R, N] fp32 (S = 2 if TWO)
    x_ptr, mx_ptr, x2_ptr, mx2_ptr, out_ptr,
    # sizes
    R, L, N, n_tiles,
    # meta-parameters
    HAS_M: tl.constexpr, HAS_M2: tl.constexpr, TWO: tl.constexpr, BLOCK: tl.constexpr,
):
    """out[s, r, t] = x_s[r, t] * mx_s[r, t] for t < L, 0 for L <= t < N (s = program_id(1))."""
    i_p = tl.program_id(0)
    i_r = i_p // n_tiles
    i_t = i_p % n_tiles
    o_t = i_t * BLOCK + tl.arange(0, BLOCK)
    m_in = o_t < L
    p_in = i_r.to(tl.int64) * L + o_t
    if TWO:
        i_s = tl.program_id(1)
    else:
        i_s = 0
    if i_s == 0:
        b_x = tl.load(x_ptr + p_in, mask=m_in, other=0.0).to(tl.float32)
        if HAS_M:
            b_x = b_x * tl.load(mx_ptr + p_in, mask=m_in, other=0.0).to(tl.float32)
    else:
        b_x = tl.load(x2_ptr + p_in, mask=m_in, other=0.0).to(tl.float32)
        if HAS_M2:
            b_x = b_x * tl.load(mx2_ptr + p_in, mask=m_in, other=0.0).to(tl.float32)
    p_out = (i_s * R + i_r).to(tl.int64) * N + o_t
    tl.store(out_ptr + p_out, b_x, mask=o_t < N)


@triton.jit
def _untangle(ar, ai, br, bi, wr, wi):
    """X[k], X[m-k] of the real signal from its packed spectrum Z[k] = a, Z[m-k] = b."""
    er = 0.5 * (ar + br)
    ei = 0.5 * (ai - bi)
    # O = w (a - conj b) / 2i = w (d_i, -d_r) with d = (a - conj b) / 2
    vr = 0.5 * (ai + bi)
    vi = -0.5 * (ar - br)
    o_r = wr * vr - wi * vi
    o_i = wr * vi + wi * vr
    return er + o_r, ei + o_i, er - o_r, o_i - ei


@triton.jit
def _pack(yr, yi, jr, ji, wr, wi, scale):
    """Z'[k], Z'[m-k] from Y[k] = y, Y[m-k] = j (see the module docstring), times `scale`."""
    pr = yr + jr
    p_i = yi - ji
    qr = yr - jr
    qi = yi + ji
    sr = wi * qr - wr * qi  # i conj(w) q
    si = wr * qr + wi * qi
    return (pr + sr) * scale, (p_i + si) * scale, (pr - sr) * scale, (si - p_i) * scale


@triton.jit
def _cmul(ar, ai, br, bi, CONJ_B: tl.constexpr):
    if CONJ_B:
        return ar * br + ai * bi, ai * br - ar * bi
    return ar * br - ai * bi, ar * bi + ai * br


@triton.jit
def _freq_block(kf_ptr, i_h, M, i_k, BK: tl.constexpr):
    """Indices k (block of [0, M/2]), their partners j = M - k, the store masks, the twiddles
    w^k and the filter spectrum at k and j (kf: [H, M + 1] complex, interleaved)."""
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k <= M // 2
    o_j = M - o_k
    m_j = m_k & (o_j != o_k) & (o_j != M)  # self-paired k = M/2; j = M is z's index 0 again
    o_jz = tl.where(o_j == M, 0, o_j)
    ang = o_k.to(tl.float32) * (3.141592653589793 / M)  # 2 pi k / n
    wr = tl.cos(ang)
    wi = -tl.sin(ang)
    p_kf = i_h.to(tl.int64) * (M + 1) * 2
    kr = tl.load(kf_ptr + p_kf + 2 * o_k, mask=m_k, other=0.0)
    ki = tl.load(kf_ptr + p_kf + 2 * o_k + 1, mask=m_k, other=0.0)
    jr = tl.load(kf_ptr + p_kf + 2 * o_j, mask=m_k, other=0.0)
    ji = tl.load(kf_ptr + p_kf + 2 * o_j + 1, mask=m_k, other=0.0)
    return o_k, m_k, o_jz, m_j, wr, wi, kr, ki, jr, ji


@triton.jit
def _load_pair(z_ptr, p, o_k, o_jz, m_k, wr, wi):
    ar = tl.load(z_ptr + p + 2 * o_k, mask=m_k, other=0.0)
    ai = tl.load(z_ptr + p + 2 * o_k + 1, mask=m_k, other=0.0)
    br = tl.load(z_ptr + p + 2 * o_jz, mask=m_k, other=0.0)
    bi = tl.load(z_ptr + p + 2 * o_jz + 1, mask=m_k, other=0.0)
    return _untangle(ar, ai, br, bi, wr, wi)


@triton.jit
def _store_pair(z_ptr, p, o_k, o_jz, m_k, m_j, yr, yi, jr, ji, wr, wi, scale):
    ar, ai, br, bi = _pack(yr, yi, jr, ji, wr, wi, scale)
    tl.store(z_ptr + p + 2 * o_k, ar, mask=m_k)
    tl.store(z_ptr + p + 2 * o_k + 1, ai, mask=m_k)
    tl.store(z_ptr + p + 2 * o_jz, br, mask=m_j)
    tl.store(z_ptr + p + 2 * o_jz + 1, bi, mask=m_j)


@triton.jit
def _spec_fwd_kernel(
    # pointers: z [B, H, M] complex (fp32 interleaved), in place; kf [H, M + 1] complex
    z_ptr, kf_ptr,
    # sizes; scale = 1 / n
    B, H, M, n_kb, scale,
    BK: tl.constexpr,
):
    i_p = tl.program_id(0)
    i_h = i_p // n_kb
    i_k = i_p % n_kb
    o_k, m_k, o_jz, m_j, wr, wi, kr, ki, jr, ji = _freq_block(kf_ptr, i_h, M, i_k, BK)
    for i_b in range(0, B):
        p = (i_b * H + i_h).to(tl.int64) * M * 2
        xr, xi, yr, yi = _load_pair(z_ptr, p, o_k, o_jz, m_k, wr, wi)
        ar, ai = _cmul(xr, xi, kr, ki, False)
        br, bi = _cmul(yr, yi, jr, ji, False)
        _store_pair(z_ptr, p, o_k, o_jz, m_k, m_j, ar, ai, br, bi, wr, wi, scale)


@triton.jit
def _spec_bwd_kernel(
    # pointers: zv, zg [B, H, M] complex (spectra of v and g; in place: zg <- dv, zv <- conv(v, k)
    # when HAS_POST); zk [H, M] complex out (packed dk correlation); kf [H, M + 1] complex
    zv_ptr, zg_ptr, zk_ptr, kf_ptr,
    # sizes; scale = 1 / n
    B, H, M, n_kb, scale,
    HAS_POST: tl.constexpr, BK: tl.constexpr,
):
    i_p = tl.program_id(0)
    i_h = i_p // n_kb
    i_k = i_p % n_kb
    o_k, m_k, o_jz, m_j, wr, wi, kr, ki, jr, ji = _freq_block(kf_ptr, i_h, M, i_k, BK)
    acc_kr = tl.zeros([BK], dtype=tl.float32)
    acc_ki = tl.zeros([BK], dtype=tl.float32)
    acc_jr = tl.zeros([BK], dtype=tl.float32)
    acc_ji = tl.zeros([BK], dtype=tl.float32)
    for i_b in range(0, B):
        p = (i_b * H + i_h).to(tl.int64) * M * 2
        vkr, vki, vjr, vji = _load_pair(zv_ptr, p, o_k, o_jz, m_k, wr, wi)
        gkr, gki, gjr, gji = _load_pair(zg_ptr, p, o_k, o_jz, m_k, wr, wi)
        # dv = corr(g, k): G conj(K)
        ar, ai = _cmul(gkr, gki, kr, ki, True)
        br, bi = _cmul(gjr, gji, jr, ji, True)
        _store_pair(zg_ptr, p, o_k, o_jz, m_k, m_j, ar, ai, br, bi, wr, wi, scale)
        if HAS_POST:  # conv(v, k) again for dpost
            ar, ai = _cmul(vkr, vki, kr, ki, False)
            br, bi = _cmul(vjr, vji, jr, ji, False)
            _store_pair(zv_ptr, p, o_k, o_jz, m_k, m_j, ar, ai, br, bi, wr, wi, scale)
        # dk = sum_b corr(g_b, v_b): conj(V) G
        ar, ai = _cmul(gkr, gki, vkr, vki, True)
        br, bi = _cmul(gjr, gji, vjr, vji, True)
        acc_kr += ar
        acc_ki += ai
        acc_jr += br
        acc_ji += bi
    p = i_h.to(tl.int64) * M * 2
    _store_pair(zk_ptr, p, o_k, o_jz, m_k, m_j, acc_kr, acc_ki, acc_jr, acc_ji, wr, wi, scale)


@triton.jit
def _epi_fwd_kernel(
    # pointers: c [R, N] fp32 (conv result, first L used); u, pre, post, y [R, L]; d [H] fp32
    c_ptr, u_ptr, pre_ptr, post_ptr, d_ptr, y_ptr,
    # sizes
    H, L, N, n_tiles,
    HAS_D: tl.constexpr, HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, BLOCK: tl.constexpr,
):
    i_p = tl.program_id(0)
    i_r = i_p // n_tiles
    o_t = (i_p % n_tiles) * BLOCK + tl.arange(0, BLOCK)
    m = o_t < L
    p = i_r.to(tl.int64) * L + o_t
    y = tl.load(c_ptr + i_r.to(tl.int64) * N + o_t, mask=m, other=0.0)
    if HAS_D:
        v = tl.load(u_ptr + p, mask=m, other=0.0).to(tl.float32)
        if HAS_PRE:
            v = v * tl.load(pre_ptr + p, mask=m, other=0.0).to(tl.float32)
        y += tl.load(d_ptr + i_r % H) * v
    if HAS_POST:
        y = y * tl.load(post_ptr + p, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + p, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _epi_bwd_rows(
    i_p, cg_ptr, cv_ptr, u_ptr, pre_ptr, post_ptr, dy_ptr, d_ptr, du_ptr, dpre_ptr, dpost_ptr,
    H, L, N, n_tiles,
    HAS_D: tl.constexpr, HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program i_p of the du / dpre / dpost epilogue (one row tile)."""
    i_r = i_p // n_tiles
    o_t = (i_p % n_tiles) * BLOCK + tl.arange(0, BLOCK)
    m = o_t < L
    p = i_r.to(tl.int64) * L + o_t
    p_c = i_r.to(tl.int64) * N + o_t
    dv = tl.load(cg_ptr + p_c, mask=m, other=0.0)
    b_d = 0.0
    if HAS_D:
        b_d = tl.load(d_ptr + i_r % H)
    dy = tl.load(dy_ptr + p, mask=m, other=0.0).to(tl.float32)
    if HAS_POST:
        v = tl.load(u_ptr + p, mask=m, other=0.0).to(tl.float32)
        if HAS_PRE:
            v = v * tl.load(pre_ptr + p, mask=m, other=0.0).to(tl.float32)
        g = dy * tl.load(post_ptr + p, mask=m, other=0.0).to(tl.float32)
        yv = tl.load(cv_ptr + p_c, mask=m, other=0.0) + b_d * v
        tl.store(dpost_ptr + p, (dy * yv).to(dpost_ptr.dtype.element_ty), mask=m)
    else:
        g = dy
    dv += b_d * g
    if HAS_PRE:  # (u is read here only: without gates the backward never needs it)
        x = tl.load(u_ptr + p, mask=m, other=0.0).to(tl.float32)
        gate = tl.load(pre_ptr + p, mask=m, other=0.0).to(tl.float32)
        tl.store(du_ptr + p, (dv * gate).to(du_ptr.dtype.element_ty), mask=m)
        tl.store(dpre_ptr + p, (dv * x).to(dpre_ptr.dtype.element_ty), mask=m)
    else:
        tl.store(du_ptr + p, dv.to(du_ptr.dtype.element_ty), mask=m)


@triton.jit
def _epi_dk_rows(
    i_p, c_ptr, dk_ptr, dd_ptr, Lk, N, n_tiles,
    HAS_D: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program i_p of the dk / dD epilogue (one filter-row tile)."""
    i_h = i_p // n_tiles
    i_t = i_p % n_tiles
    o_t = i_t * BLOCK + tl.arange(0, BLOCK)
    m = o_t < Lk
    c = tl.load(c_ptr + i_h.to(tl.int64) * N + o_t, mask=m, other=0.0)
    tl.store(dk_ptr + i_h.to(tl.int64) * Lk + o_t, c, mask=m)
    if HAS_D:  # dD = sum_{b,t} g v: the correlation at lag 0
        if i_t == 0:
            tl.store(dd_ptr + i_h, tl.load(c_ptr + i_h.to(tl.int64) * N))


@triton.jit
def _epi_bwd_kernel(
    # pointers: cg [R, N] fp32 corr(g, k); cv [R, N] fp32 conv(v, k) (HAS_POST);
    # u, pre, post, dy [R, L]; d [H] fp32; outputs du, dpre, dpost [R, L]
    cg_ptr, cv_ptr, u_ptr, pre_ptr, post_ptr, dy_ptr, d_ptr, du_ptr, dpre_ptr, dpost_ptr,
    # sizes
    H, L, N, n_tiles,
    HAS_D: tl.constexpr, HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, BLOCK: tl.constexpr,
):
    _epi_bwd_rows(tl.program_id(0), cg_ptr, cv_ptr, u_ptr, pre_ptr, post_ptr, dy_ptr, d_ptr,
                  du_ptr, dpre_ptr, dpost_ptr, H, L, N, n_tiles, HAS_D, HAS_PRE, HAS_POST, BLOCK)


@triton.jit
def _epi_dk_kernel(
    # pointers: c [H, N] fp32 (sum_b corr(g_b, v_b)); dk [H, Lk] fp32; dd [H] fp32
    c_ptr, dk_ptr, dd_ptr,
    Lk, N, n_tiles,
    HAS_D: tl.constexpr, BLOCK: tl.constexpr,
):
    _epi_dk_rows(tl.program_id(0), c_ptr, dk_ptr, dd_ptr, Lk, N, n_tiles, HAS_D, BLOCK)


@triton.jit
def _epi_bwd_dk_kernel(
    # both backward epilogues in one launch (FUSED_DK_EPILOGUE): programs [0, n_row_progs) are
    # _epi_bwd_kernel's, the rest _epi_dk_kernel's (same arithmetic, the same helpers)
    cg_ptr, cv_ptr, u_ptr, pre_ptr, post_ptr, dy_ptr, d_ptr, du_ptr, dpre_ptr, dpost_ptr,
    ck_ptr, dk_ptr, dd_ptr,
    H, L, N, n_tiles, Lk, k_tiles, n_row_progs,
    HAS_D: tl.constexpr, HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    i_p = tl.program_id(0)
    if i_p < n_row_progs:
        _epi_bwd_rows(i_p, cg_ptr, cv_ptr, u_ptr, pre_ptr, post_ptr, dy_ptr, d_ptr, du_ptr,
                      dpre_ptr, dpost_ptr, H, L, N, n_tiles, HAS_D, HAS_PRE, HAS_POST, BLOCK)
    else:
        _epi_dk_rows(i_p - n_row_progs, ck_ptr, dk_ptr, dd_ptr, Lk, N, k_tiles, HAS_D, BLOCK_K)


# ---------------------------------------------------------------------------------------------
# launchers: check, allocate, launch
# ---------------------------------------------------------------------------------------------

# launch cache (_launch.py): the path runs 6 launches per forward + backward (7 with
# FUSED_DK_EPILOGUE off)
_pad_kernel = fast_kernel(_pad_kernel)
_spec_fwd_kernel = fast_kernel(_spec_fwd_kernel)
_spec_bwd_kernel = fast_kernel(_spec_bwd_kernel)
_epi_fwd_kernel = fast_kernel(_epi_fwd_kernel)
_epi_bwd_kernel = fast_kernel(_epi_bwd_kernel)
_epi_dk_kernel = fast_kernel(_epi_dk_kernel)
_epi_bwd_dk_kernel = fast_kernel(_epi_bwd_dk_kernel)


def _block(length: int) -> int:
    return 256 if triton_interpret() else min(2048, max(128, next_power_of_2(length)))


def _warps(block: int) -> int:
    return 1 if triton_interpret() else max(1, min(8, block // 256))


def _bk(M: int) -> int:
    return 128 if triton_interpret() else min(512, max(64, next_power_of_2(M // 2 + 1)))


def _spec_warps(bk: int) -> int:
    """Two frequencies per thread: ptxas for sm_90 (Triton 3.9), BK = 512: backward 80 registers
    with 8 warps, 255 + spills with 2; forward 48 / 168."""
    return 1 if triton_interpret() else max(1, min(8, bk // 64))


@lru_cache(maxsize=1024)
def _plan(B: int, H: int, L: int, Lk: int):
    """Everything a call's launches need that depends only on the shapes, computed once per shape
    (the environment reads, tile choices and grids cost host time on every call otherwise):
    (n, R, scale, pad (grid fwd, grid bwd, tiles, BLOCK, warps), spectral (grid, BK, warps),
    epilogue over L (grid, tiles, BLOCK, warps), dk epilogue over Lk (grid, tiles, BLOCK, warps,
    both epilogues' grid, their warps))."""
    n = fft_size(L, Lk)
    M = n // 2
    R = B * H
    pb = _block(n)
    pt = cdiv(n, pb)
    bk = _bk(M)
    n_kb = cdiv(M // 2 + 1, bk)
    eb = _block(L)
    et = cdiv(L, eb)
    kb = _block(Lk)
    kt = cdiv(Lk, kb)
    return (n, R, 1.0 / n,
            ((R * pt, 1), (R * pt, 2), pt, pb, _warps(pb)),
            ((H * n_kb,), n_kb, bk, _spec_warps(bk)),
            ((R * et,), et, eb, _warps(eb)),
            ((H * kt,), kt, kb, _warps(kb), (R * et + H * kt,), max(_warps(eb), _warps(kb))))


# An absent operand's pointer argument is an existing tensor (u, c, cg or dk): never dereferenced
# (the kernels' constexpr flags); an allocation per absent operand cost host time on every call.


def fft_conv_fwd(u, k, D, pre, post):
    """u, pre, post [B, H, L] contiguous (one dtype); k [H, Lk] fp32; D [H] fp32 or None."""
    B, H, L = u.shape
    n, R, scale, pad, spec, epi, _ = _plan(B, H, L, k.shape[1])
    device = u.device
    x = _alloc((R, n), device)
    _pad_kernel[pad[0]](u, pre if pre is not None else u, u, u, x, R, L, n, pad[2],
                        HAS_M=pre is not None, HAS_M2=False, TWO=False, BLOCK=pad[3],
                        num_warps=pad[4])
    z = torch.fft.fft(x.view(torch.complex64))  # the packed transform (module docstring)
    del x
    _spec_fwd_kernel[spec[0]](z.view(torch.float32), _spectrum_real(k, n), B, H, n // 2, spec[1],
                              scale, BK=spec[2], num_warps=spec[3])
    c = torch.fft.ifft(z, norm="forward").view(torch.float32)
    del z
    y = _alloc((B, H, L), device, u.dtype)
    _epi_fwd_kernel[epi[0]](
        c, u, pre if pre is not None else u, post if post is not None else u,
        D if D is not None else c, y, H, L, n, epi[1],
        HAS_D=D is not None, HAS_PRE=pre is not None, HAS_POST=post is not None, BLOCK=epi[2],
        num_warps=epi[3])
    return y


def fft_conv_bwd(dy, u, k, D, pre, post):
    """(du, dk fp32 [H, Lk], dD fp32 [H] or None, dpre or None, dpost or None)."""
    B, H, L = u.shape
    Lk = k.shape[1]
    n, R, scale, pad, spec, epi, epk = _plan(B, H, L, Lk)
    M = n // 2
    device = u.device
    has_post = post is not None
    merged = MERGED_INVERSE
    R2 = 2 * R
    x = _alloc((R2 + H, n) if merged else (2, R, n), device)  # v, g (, H rows for dk)
    _pad_kernel[pad[1]](u, pre if pre is not None else u, dy, post if has_post else u, x,
                        R, L, n, pad[2], HAS_M=pre is not None, HAS_M2=has_post, TWO=True,
                        BLOCK=pad[3], num_warps=pad[4])
    z = torch.fft.fft(x.view(torch.complex64))  # [2, R, M] or [2R + H, M]
    del x
    zr = z.view(torch.float32)
    if merged:
        zv, zg, zkr = zr[:R], zr[R:R2], zr[R2:]
    else:
        zk = _alloc((H, M), device, torch.complex64)
        zv, zg, zkr = zr[0], zr[1], zk.view(torch.float32)
    _spec_bwd_kernel[spec[0]](zv, zg, zkr, _spectrum_real(k, n),
                              B, H, M, spec[1], scale, HAS_POST=has_post, BK=spec[2],
                              num_warps=spec[3])
    del zr, zv, zg, zkr
    if merged:  # rows: [conv(v, k),] corr(g, k), dk correlation
        c = torch.fft.ifft(z if has_post else z[R:], norm="forward").view(torch.float32)
        cv, cg, ck = (c[:R], c[R:R2], c[R2:]) if has_post else (c, c[:R], c[R:])
    else:
        # [2, R, n] (v conv, g corr) or [R, n] (g corr)
        c = torch.fft.ifft(z if has_post else z[1], norm="forward").view(torch.float32)
        ck = torch.fft.ifft(zk, norm="forward").view(torch.float32)
        del zk
        cv, cg = (c[0], c[1]) if has_post else (c, c)
    del z
    du = _alloc((B, H, L), device, u.dtype)
    dpre = _alloc((B, H, L), device, pre.dtype) if pre is not None else None
    dpost = _alloc((B, H, L), device, post.dtype) if has_post else None
    dk = _alloc((H, Lk), device)
    dD = _alloc((H,), device) if D is not None else None
    if FUSED_DK_EPILOGUE:
        _epi_bwd_dk_kernel[epk[4]](
            cg, cv, u, pre if pre is not None else u, post if has_post else u, dy,
            D if D is not None else cg, du, dpre if dpre is not None else u,
            dpost if dpost is not None else u, ck, dk, dD if dD is not None else dk,
            H, L, n, epi[1], Lk, epk[1], epi[0][0],
            HAS_D=D is not None, HAS_PRE=pre is not None, HAS_POST=has_post, BLOCK=epi[2],
            BLOCK_K=epk[2], num_warps=epk[5])
        return du, dk, dD, dpre, dpost
    _epi_bwd_kernel[epi[0]](
        cg, cv, u, pre if pre is not None else u, post if has_post else u, dy,
        D if D is not None else cg, du, dpre if dpre is not None else u,
        dpost if dpost is not None else u, H, L, n, epi[1],
        HAS_D=D is not None, HAS_PRE=pre is not None, HAS_POST=has_post, BLOCK=epi[2],
        num_warps=epi[3])
    _epi_dk_kernel[epk[0]](ck, dk, dD if dD is not None else dk, Lk, n, epk[1],
                           HAS_D=D is not None, BLOCK=epk[2], num_warps=epk[3])
    return du, dk, dD, dpre, dpost
