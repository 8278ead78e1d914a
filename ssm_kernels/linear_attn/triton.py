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
