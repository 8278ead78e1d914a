"""Triton kernels for linear_scan: a chunked mix of time-parallel and time-sequential.

Every program owns BLOCK_C channels and walks the whole sequence in tiles of BLOCK_T steps. Inside
a tile all loads are issued at once and the recurrence is solved by a log-depth associative scan
along time; across tiles a float32 carry per channel is passed sequentially. That keeps
BLOCK_C*BLOCK_T*2 elements in flight per program (bandwidth) while doing O(T) work overall.

Tensors arrive on a canonical view: element (o, t, c) at o*s_o + t*s_t + c*s_c (int64 offsets).
Time order is abstracted by `_time_index`: processing position r maps to time r, or T-1-r when the
pass runs right-to-left, so the forward, reverse and both backward passes share one kernel body.
Complex64 tensors come in as float32 pairs (re at +0, im at +1; strides in float32 units).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._config import triton_interpret


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
def _time_index(r, T, FLIP: tl.constexpr):
    if FLIP:
        return T - 1 - r
    else:
        return r


@triton.jit
def _last_along_time(x, is_last):
    # the value at the tile's last processing position, per channel
    return tl.sum(tl.where(is_last, x, 0.0), axis=1)


@triton.jit
def _linear_scan_fwd_kernel(
    # pointers: inputs a, b [O, T, C]; optional h0 [O, C] (state dtype); outputs h [O, T, C], hT [O, C]
    a_ptr, b_ptr, h0_ptr, h_ptr, hT_ptr,
    # sizes
    T, C,
    # strides of a/b/h in elements (float32 units for complex); states are contiguous [O, C]
    s_o, s_t, s_c,
    # meta-parameters
    HAS_H0: tl.constexpr, REVERSE: tl.constexpr, COMPLEX: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    i_c, i_o = tl.program_id(0), tl.program_id(1)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    CW: tl.constexpr = 2 if COMPLEX else 1  # float32 words per state element
    p_state = i_o.to(tl.int64) * C * CW + o_c * CW
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
    is_last = (o_r == BLOCK_T - 1)[None, :]
    for i_t in range(0, tl.cdiv(T, BLOCK_T)):
        r = i_t * BLOCK_T + o_r
        m = m_c[:, None] & (r < T)[None, :]
        p = base + _time_index(r, T, REVERSE).to(tl.int64)[None, :] * s_t
        # padding with the identity (a=1, b=0) keeps the tile's last column the true carry
        ar = tl.load(a_ptr + p, mask=m, other=1.0).to(tl.float32)
        br = tl.load(b_ptr + p, mask=m, other=0.0).to(tl.float32)
        if COMPLEX:
            ai = tl.load(a_ptr + p + 1, mask=m, other=0.0).to(tl.float32)
            bi = tl.load(b_ptr + p + 1, mask=m, other=0.0).to(tl.float32)
            ar, ai, br, bi = tl.associative_scan((ar, ai, br, bi), 1, _combine_complex)
            hr = br + ar * carry_r[:, None] - ai * carry_i[:, None]
            hi = bi + ar * carry_i[:, None] + ai * carry_r[:, None]
            tl.store(h_ptr + p, hr, mask=m)
            tl.store(h_ptr + p + 1, hi, mask=m)
            carry_r = _last_along_time(hr, is_last)
            carry_i = _last_along_time(hi, is_last)
        else:
            ar, br = tl.associative_scan((ar, br), 1, _combine_real)
            h = br + ar * carry_r[:, None]
            tl.store(h_ptr + p, h.to(h_ptr.dtype.element_ty), mask=m)
            carry_r = _last_along_time(h, is_last)
    tl.store(hT_ptr + p_state, carry_r, mask=m_c)
    if COMPLEX:
        tl.store(hT_ptr + p_state + 1, carry_i, mask=m_c)


@triton.jit
def _linear_scan_bwd_kernel(
    # pointers: a, h, dh [O, T, C]; h0, dhT [O, C] state dtype; outputs da, db [O, T, C], dh0 [O, C]
    a_ptr, h_ptr, h0_ptr, dh_ptr, dhT_ptr, da_ptr, db_ptr, dh0_ptr,
    # sizes
    T, C,
    # strides of a/h/dh/da/db in elements (float32 units for complex)
    s_o, s_t, s_c,
    # meta-parameters
    HAS_H0: tl.constexpr, REVERSE: tl.constexpr, COMPLEX: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # g_t = dh_t + conj(a_next) g_next, walked opposite to the forward pass. Processing position r
    # meets time t(r); "next" (already processed) is t(r-1); the forward predecessor of t(r) is
    # t(r+1), whose h gives da = g * conj(h_pred).
    FLIP: tl.constexpr = not REVERSE
    i_c, i_o = tl.program_id(0), tl.program_id(1)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    CW: tl.constexpr = 2 if COMPLEX else 1
    p_state = i_o.to(tl.int64) * C * CW + o_c * CW
    base_c = i_o.to(tl.int64) * s_o + o_c.to(tl.int64) * s_c
    base = base_c[:, None]
    carry_r = tl.load(dhT_ptr + p_state, mask=m_c, other=0.0).to(tl.float32)
    if COMPLEX:
        carry_i = tl.load(dhT_ptr + p_state + 1, mask=m_c, other=0.0).to(tl.float32)
    if HAS_H0:
        h0r = tl.load(h0_ptr + p_state, mask=m_c, other=0.0).to(tl.float32)
        if COMPLEX:
            h0i = tl.load(h0_ptr + p_state + 1, mask=m_c, other=0.0).to(tl.float32)
    else:
        h0r = tl.zeros([BLOCK_C], dtype=tl.float32)
        if COMPLEX:
            h0i = tl.zeros([BLOCK_C], dtype=tl.float32)
    o_r = tl.arange(0, BLOCK_T)
    is_last = (o_r == BLOCK_T - 1)[None, :]
    for i_t in range(0, tl.cdiv(T, BLOCK_T)):
        r = i_t * BLOCK_T + o_r
        m_t = (r < T)[None, :]
        m = m_c[:, None] & m_t
        p = base + _time_index(r, T, FLIP).to(tl.int64)[None, :] * s_t
        p_next = base + _time_index(r - 1, T, FLIP).to(tl.int64)[None, :] * s_t
        m_next = m & (r >= 1)[None, :]
        p_pred = base + _time_index(r + 1, T, FLIP).to(tl.int64)[None, :] * s_t
        m_pred = m & (r + 1 < T)[None, :]
        is_h0 = m_c[:, None] & (r + 1 == T)[None, :]
        cr = tl.load(a_ptr + p_next, mask=m_next, other=1.0).to(tl.float32)
        gr = tl.load(dh_ptr + p, mask=m, other=0.0).to(tl.float32)
        hr = tl.load(h_ptr + p_pred, mask=m_pred, other=0.0).to(tl.float32)
        hr = tl.where(is_h0, h0r[:, None], hr)
        if COMPLEX:
            ci = -tl.load(a_ptr + p_next + 1, mask=m_next, other=0.0).to(tl.float32)  # conj(a)
            gi = tl.load(dh_ptr + p + 1, mask=m, other=0.0).to(tl.float32)
            hi = tl.load(h_ptr + p_pred + 1, mask=m_pred, other=0.0).to(tl.float32)
            hi = tl.where(is_h0, h0i[:, None], hi)
            cr, ci, gr, gi = tl.associative_scan((cr, ci, gr, gi), 1, _combine_complex)
            g_r = gr + cr * carry_r[:, None] - ci * carry_i[:, None]
            g_i = gi + cr * carry_i[:, None] + ci * carry_r[:, None]
            tl.store(db_ptr + p, g_r, mask=m)
            tl.store(db_ptr + p + 1, g_i, mask=m)
            # da = g * conj(h_pred)
            tl.store(da_ptr + p, g_r * hr + g_i * hi, mask=m)
            tl.store(da_ptr + p + 1, g_i * hr - g_r * hi, mask=m)
            carry_r = _last_along_time(g_r, is_last)
            carry_i = _last_along_time(g_i, is_last)
        else:
            cr, gr = tl.associative_scan((cr, gr), 1, _combine_real)
            g = gr + cr * carry_r[:, None]
            tl.store(db_ptr + p, g.to(db_ptr.dtype.element_ty), mask=m)
            tl.store(da_ptr + p, (g * hr).to(da_ptr.dtype.element_ty), mask=m)
            carry_r = _last_along_time(g, is_last)
    # dh0 = conj(a at the last processed step) * g there
    p_first = base_c + _time_index(T - 1, T, FLIP).to(tl.int64) * s_t
    a_r = tl.load(a_ptr + p_first, mask=m_c, other=0.0).to(tl.float32)
    if COMPLEX:
        a_i = -tl.load(a_ptr + p_first + 1, mask=m_c, other=0.0).to(tl.float32)
        tl.store(dh0_ptr + p_state, a_r * carry_r - a_i * carry_i, mask=m_c)
        tl.store(dh0_ptr + p_state + 1, a_r * carry_i + a_i * carry_r, mask=m_c)
    else:
        tl.store(dh0_ptr + p_state, a_r * carry_r, mask=m_c)


# ---------------------------------------------------------------------------------------------
# launchers: check, allocate, launch
# ---------------------------------------------------------------------------------------------

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.complex64)


def _canonical(x: torch.Tensor):
    """[P, T, Q] contiguous -> (tensor for the kernel, O, C, s_o, s_t, s_c).

    Q == 1 (time innermost, e.g. [B, D, T]) folds P into the channel axis so one program still owns
    many channels; complex tensors are viewed as float32 pairs.
    """
    P, T, Q = x.shape
    w = 2 if x.is_complex() else 1
    xk = torch.view_as_real(x) if x.is_complex() else x
    if Q == 1:
        return xk, 1, P, 0, w, T * w
    return xk, P, Q, T * Q * w, Q * w, w


def _config(T: int, C: int, time_inner: bool, complex_: bool):
    """Tile shape and warps by layout (measured on H100, see bench/NOTES.md)."""
    if triton_interpret():
        return dict(BLOCK_T=16, BLOCK_C=8, num_warps=1)
    block_t = 128 if time_inner else 64
    block_c = 16 if time_inner else 32
    if complex_:
        block_t //= 2
    block_t = min(block_t, max(16, triton.next_power_of_2(T)))
    return dict(BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4)


def linear_scan_fwd(a: torch.Tensor, b: torch.Tensor, h0, reverse: bool):
    """a, b: contiguous [P, T, Q] of one dtype in TRITON_DTYPES; h0: [P, Q] state dtype or None."""
    P, T, Q = b.shape
    sdt = torch.complex64 if b.is_complex() else torch.float32
    h = torch.empty_like(b)
    hT = torch.empty((P, Q), dtype=sdt, device=b.device)
    ak, O, C, s_o, s_t, s_c = _canonical(a)
    bk = _canonical(b)[0]
    hk = _canonical(h)[0]
    h0k = None if h0 is None else _state_view(h0.to(sdt).contiguous())
    cfg = _config(T, C, Q == 1, b.is_complex())
    grid = (triton.cdiv(C, cfg["BLOCK_C"]), O)
    _linear_scan_fwd_kernel[grid](
        ak, bk, h0k if h0k is not None else hk, hk, _state_view(hT),
        T, C, s_o, s_t, s_c,
        HAS_H0=h0 is not None, REVERSE=reverse, COMPLEX=b.is_complex(), **cfg)
    return h, hT


def linear_scan_bwd(a, h, h0, dh, dhT, reverse: bool):
    """Gradients (da, db, dh0) from the saved output h; dh [P, T, Q], dhT [P, Q]."""
    P, T, Q = h.shape
    sdt = torch.complex64 if h.is_complex() else torch.float32
    dh = dh.contiguous()
    da = torch.empty_like(a)
    db = torch.empty_like(h)
    dh0 = torch.empty((P, Q), dtype=sdt, device=h.device)
    ak, O, C, s_o, s_t, s_c = _canonical(a)
    cfg = _config(T, C, Q == 1, h.is_complex())
    grid = (triton.cdiv(C, cfg["BLOCK_C"]), O)
    dhTk = _state_view(dhT.to(sdt).contiguous())
    h0k = None if h0 is None else _state_view(h0.to(sdt).contiguous())
    _linear_scan_bwd_kernel[grid](
        ak, _canonical(h)[0], h0k if h0k is not None else dhTk, _canonical(dh)[0], dhTk,
        _canonical(da)[0], _canonical(db)[0], _state_view(dh0),
        T, C, s_o, s_t, s_c,
        HAS_H0=h0 is not None, REVERSE=reverse, COMPLEX=h.is_complex(), **cfg)
    return da, db, dh0


def _state_view(s: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(s) if s.is_complex() else s
