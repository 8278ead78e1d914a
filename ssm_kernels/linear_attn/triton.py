"""Triton kernels for linear attention: the chunked forms run on the shared chunked engine
(`ssm_kernels.chunk`: parallel stages over chunks, see its modules); this file holds the
step-by-step kernel of the fused_recurrent_* forms (decoding) and the launchers the registered ops
call. Gate modes: 0 none, 1 scalar log-decay [B, T, H], 2 per-key log-decay [B, T, H, K].

Tensors are contiguous [B, T, H, D]; states float32 [N, H, K, V]; cu_seqlens int [N + 1] (B == 1).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..chunk.bwd import chunk_bwd as _engine_bwd
from ..chunk.common import load_state_block, seq_span  # noqa: F401  (seq_span: shared with based)
from ..chunk.fwd import chunk_fwd_keep as _engine_fwd
from .._launch import cdiv, next_power_of_2, fast_kernel


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
    S = load_state_block(h0_ptr, p_s, m_s, HAS_H0, BK, BV)
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




# launch cache: bind each compiled kernel once per specialisation (ssm_kernels/_launch.py)
_recurrent_fwd_kernel = fast_kernel(_recurrent_fwd_kernel)


def _gate_mode(g: Optional[torch.Tensor]) -> int:
    return 0 if g is None else (1 if g.dim() == 3 else 2)


def _dummy(x):
    return x.new_empty(1)


def recurrent_fwd(q, k, v, g, h0, cu_seqlens, scale) -> Tuple[torch.Tensor, torch.Tensor]:
    """The step-by-step forward (for decoding a few tokens): same contract as `chunk_fwd`."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    BK = next_power_of_2(K)
    BV = min(next_power_of_2(V), max(16, 4096 // BK))
    o = torch.empty_like(v)
    ht = q.new_empty((N, H, K, V), dtype=torch.float32)
    _recurrent_fwd_kernel[(cdiv(V, BV), N * H)](
        q, k, v, _dummy(q) if g is None else g, _dummy(ht) if h0 is None else h0, o, ht,
        _dummy(ht) if cu_seqlens is None else cu_seqlens, T, H, K, V, float(scale),
        GATE=_gate_mode(g), HAS_H0=h0 is not None, IS_VARLEN=cu_seqlens is not None, BK=BK, BV=BV,
        num_warps=4)
    return o, ht


def chunk_fwd(q, k, v, g, h0, cu_seqlens, scale) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward: q, k [B, T, H, K]; v [B, T, H, V]; g None, [B, T, H] or [B, T, H, K] float32
    log-decays (<= 0); h0 None or [N, H, K, V] float32; cu_seqlens None or int [N + 1] (B == 1).
    Returns (o [B, T, H, V] in v's dtype, final state [N, H, K, V] float32). All contiguous."""
    return _engine_fwd(q, k, v, g, h0, cu_seqlens, scale)[:2]


def chunk_fwd_keep(q, k, v, g, h0, cu_seqlens, scale, save: bool):
    """`chunk_fwd` plus what the backward may reuse: (o, ht, h, gc), see the engine's
    `chunk_fwd_keep` (save: a gradient will be taken)."""
    return _engine_fwd(q, k, v, g, h0, cu_seqlens, scale, save=save)


def chunk_bwd(q, k, v, g, h0, cu_seqlens, scale, ht, do, dht, h=None, gc=None):
    """Backward of `chunk_fwd`: do [B, T, H, V]; dht None or [N, H, K, V] float32; h, gc what
    `chunk_fwd_keep` kept (None / empty: recomputed). Returns (dq, dk, dv in the input dtype, dg
    float32 like g (or None), dh0 float32 [N, H, K, V])."""
    dq, dk, dv, dg, dh0, _ = _engine_bwd(q, k, v, g, h0, cu_seqlens, scale, do, dht, h=h, gc=gc)
    return dq, dk, dv, dg, dh0


# ---- normalize=True in one launch per direction (issue 8) ----------------------------------------
# out = o / (s * q . kc + 1e-10), kc = z0 + cumsum_t k: one program per (sequence, head) walks T in
# BT-row blocks with the running key sum in registers. At tiny shapes this replaces the 7 forward
# and ~15 backward torch kernels of interface._Normalize (each a few us of GPU time in a CUDA
# graph and a launch in eager); interface._use_fused_norm says where (T-serial: few programs).

@triton.jit
def _norm_program(H, K, init, HAS_INIT: tl.constexpr, BK: tl.constexpr):
    """This program's (sequence * H + head, sequence, head), the K offsets and mask, and the
    running [BK] float32 sum starting from init[i_bh] (z0 forward, gz backward) or zero."""
    i_bh = tl.program_id(0)
    rk = tl.arange(0, BK)
    mk = rk < K
    carry = tl.zeros([BK], dtype=tl.float32)
    if HAS_INIT:
        carry += tl.load(init + i_bh * K + rk, mask=mk, other=0.0).to(tl.float32)
    return i_bh, i_bh // H, i_bh % H, rk, mk, carry


@triton.jit
def _norm_fwd_kernel(o, q, k, z0, out, kc, den, zf, T, H, K, V, s,
                     so_b, so_t, sq_b, sq_t, sk_b, sk_t,
                     HAS_Z0: tl.constexpr, SAVE: tl.constexpr, STORE_Z: tl.constexpr,
                     BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    i_bh, b, h, rk, mk, carry = _norm_program(H, K, z0, HAS_Z0, BK)
    for t0 in range(0, T, BT):
        rt = t0 + tl.arange(0, BT)
        mt = rt < T
        m2 = mt[:, None] & mk[None, :]
        kk = tl.load(k + b * sk_b + rt[:, None] * sk_t + h * K + rk[None, :], mask=m2,
                     other=0.0).to(tl.float32)
        kcb = tl.cumsum(kk, axis=0) + carry[None, :]
        carry += tl.sum(kk, axis=0)
        qq = tl.load(q + b * sq_b + rt[:, None] * sq_t + h * K + rk[None, :], mask=m2,
                     other=0.0).to(tl.float32)
        d = tl.sum(qq * kcb, axis=1) * s + 1e-10
        if SAVE:   # contiguous [B, T, H, K] / [B, T, H] float32 for the backward
            tl.store(kc + ((b * T + rt[:, None]) * H + h) * K + rk[None, :], kcb, mask=m2)
            tl.store(den + (b * T + rt) * H + h, d, mask=mt)
        d = tl.where(mt, d, 1.0)
        for v0 in range(0, V, BV):
            rv = v0 + tl.arange(0, BV)
            mv = mt[:, None] & (rv < V)[None, :]
            off = b * so_b + rt[:, None] * so_t + h * V + rv[None, :]
            oo = tl.load(o + off, mask=mv, other=0.0).to(tl.float32)
            tl.store(out + ((b * T + rt[:, None]) * H + h) * V + rv[None, :],
                     (oo / d[:, None]).to(out.dtype.element_ty), mask=mv)
    if STORE_Z:
        tl.store(zf + i_bh * K + rk, carry, mask=mk)


@triton.jit
def _norm_bwd_kernel(gout, o, q, kc, den, gz, do, dq, dk, dz0, T, H, K, V, s,
                     sg_b, sg_t, so_b, so_t, sq_b, sq_t,
                     HAS_G: tl.constexpr, HAS_GZ: tl.constexpr, NEED_O: tl.constexpr,
                     NEED_Q: tl.constexpr, NEED_K: tl.constexpr, NEED_Z0: tl.constexpr,
                     BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Reverse walk over T: do = g / den, c = -s sum_v(do o) / den, dq = c kc, dkc = c q (+ gz at
    the last step), dk = reverse cumsum_t dkc, dz0 = sum_t dkc."""
    i_bh, b, h, rk, mk, carry = _norm_program(H, K, gz, HAS_GZ, BK)
    nblk = tl.cdiv(T, BT)
    for j in range(0, nblk):
        t0 = (nblk - 1 - j) * BT
        rt = t0 + tl.arange(0, BT)
        mt = rt < T
        m2 = mt[:, None] & mk[None, :]
        if HAS_G:
            d = tl.load(den + (b * T + rt) * H + h, mask=mt, other=1.0)
            acc = tl.zeros([BT], dtype=tl.float32)
            for v0 in range(0, V, BV):
                rv = v0 + tl.arange(0, BV)
                mv = mt[:, None] & (rv < V)[None, :]
                gg = tl.load(gout + b * sg_b + rt[:, None] * sg_t + h * V + rv[None, :], mask=mv,
                             other=0.0).to(tl.float32) / d[:, None]
                if NEED_O:
                    tl.store(do + ((b * T + rt[:, None]) * H + h) * V + rv[None, :],
                             gg.to(do.dtype.element_ty), mask=mv)
                oo = tl.load(o + b * so_b + rt[:, None] * so_t + h * V + rv[None, :], mask=mv,
                             other=0.0).to(tl.float32)
                acc += tl.sum(gg * oo, axis=1)
            c = acc / d * (-s)
            if NEED_Q:
                kcb = tl.load(kc + ((b * T + rt[:, None]) * H + h) * K + rk[None, :], mask=m2,
                              other=0.0)
                tl.store(dq + ((b * T + rt[:, None]) * H + h) * K + rk[None, :],
                         (c[:, None] * kcb).to(dq.dtype.element_ty), mask=m2)
            if NEED_K or NEED_Z0:
                qq = tl.load(q + b * sq_b + rt[:, None] * sq_t + h * K + rk[None, :], mask=m2,
                             other=0.0).to(tl.float32)
                dkc = c[:, None] * qq
                tot = tl.sum(dkc, axis=0)
                if NEED_K:   # suffix sums: total - prefix + own row
                    rc = tot[None, :] - tl.cumsum(dkc, axis=0) + dkc + carry[None, :]
                    tl.store(dk + ((b * T + rt[:, None]) * H + h) * K + rk[None, :],
                             rc.to(dk.dtype.element_ty), mask=m2)
                carry += tot
        elif NEED_K:   # only the final state's gradient: every step's dk is gz
            tl.store(dk + ((b * T + rt[:, None]) * H + h) * K + rk[None, :],
                     (tl.zeros([BT, BK], dtype=tl.float32) + carry[None, :]).to(dk.dtype.element_ty),
                     mask=m2)
    if NEED_Z0:
        tl.store(dz0 + i_bh * K + rk, carry, mask=mk)


_norm_fwd_kernel = fast_kernel(_norm_fwd_kernel)
_norm_bwd_kernel = fast_kernel(_norm_bwd_kernel)


def _norm_tiles(K: int, V: int):
    BK = max(16, next_power_of_2(K))
    BV = max(16, min(64, next_power_of_2(V)))
    # [BT, BK] float32 tiles (k, kc, q, dkc live together in the backward): 4096 elements per
    # tile at 4 warps kept the sm_90 backward at <= 168 registers, no spill (bench/sm90_audit.py
    # --ops normalize); [64, 128] spilled 44-60 B
    BT = max(16, min(64, 4096 // BK))
    return BT, BK, BV


def normalize_serial_steps(T: int, K: int, V: int) -> int:
    """Row blocks one program of the normalize kernels walks in order."""
    return cdiv(T, _norm_tiles(K, V)[0])


def normalize_fwd(o, q, k, z0, s: float, save: bool, want_z: bool):
    """(out in o's dtype, kc [B,T,H,K] f32 or None, den [B,T,H,1] f32 or None, z [B,1,H,K] f32
    or None). o, q, k: [B, T, H, *] with unit stride over the last two dims; z0 [B,1,H,K]."""
    B, T, H, K = q.shape
    V = o.shape[-1]
    f32 = torch.float32
    out = torch.empty((B, T, H, V), dtype=o.dtype, device=o.device)
    kc = q.new_empty((B, T, H, K), dtype=f32) if save else out
    den = q.new_empty((B, T, H, 1), dtype=f32) if save else out
    z = q.new_empty((B, 1, H, K), dtype=f32) if want_z else out
    z0c = z0.contiguous() if z0 is not None else out
    BT, BK, BV = _norm_tiles(K, V)
    _norm_fwd_kernel[(B * H,)](o, q, k, z0c, out, kc, den, z, T, H, K, V, float(s),
                               o.stride(0), o.stride(1), q.stride(0), q.stride(1),
                               k.stride(0), k.stride(1), HAS_Z0=z0 is not None, SAVE=save,
                               STORE_Z=want_z, BT=BT, BK=BK, BV=BV, num_warps=4)
    return out, (kc if save else None), (den if save else None), (z if want_z else None)


def normalize_bwd(gout, gz, o, q, kc, den, s: float, need, k_dtype, z0_dtype):
    """(do, dq, dk, dz0), None where `need` (o, q, k, z0) is False."""
    B, T, H, K = q.shape
    V = o.shape[-1]
    need_o, need_q, need_k, need_z0 = need
    has_g = gout is not None
    need_o, need_q = need_o and has_g, need_q and has_g
    if gz is not None:
        gz = gz.contiguous()
    do = torch.empty_like(o, memory_format=torch.contiguous_format) if need_o else None
    dq = q.new_empty(q.shape) if need_q else None
    dk = q.new_empty(q.shape, dtype=k_dtype) if need_k else None
    dz0 = q.new_empty((B, 1, H, K), dtype=torch.float32) if need_z0 else None
    dummy = kc
    g = gout if has_g else o
    BT, BK, BV = _norm_tiles(K, V)
    _norm_bwd_kernel[(B * H,)](g, o, q, kc, den, gz if gz is not None else dummy,
                               do if need_o else dummy, dq if need_q else dummy,
                               dk if need_k else dummy, dz0 if need_z0 else dummy,
                               T, H, K, V, float(s), g.stride(0), g.stride(1), o.stride(0),
                               o.stride(1), q.stride(0), q.stride(1), HAS_G=has_g,
                               HAS_GZ=gz is not None, NEED_O=need_o, NEED_Q=need_q, NEED_K=need_k,
                               NEED_Z0=need_z0, BT=BT, BK=BK, BV=BV, num_warps=4)
    if dz0 is not None and z0_dtype is not None:
        dz0 = dz0.to(z0_dtype)
    return do, dq, dk, dz0
