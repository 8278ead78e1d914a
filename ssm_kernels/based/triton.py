"""Triton kernels for Based (chunked second-order Taylor linear attention), linear in T.

The feature map is never materialised in HBM. With ``q' = c q``, ``k' = c k`` (c = sqrt(scale)):

* intra-chunk: one ``q' k'^T`` dot, then ``f(a) = 1 + a + a^2/2`` elementwise, causal mask,
  ``f @ v`` and the row sums of f (the normaliser);
* inter-chunk: the state ``S = sum phi(k)^T [v, 1]`` split into ``s0 [V]``, ``s1 [K, V]``,
  ``s2 [K*K, V]`` and the normaliser column ``z0, z1 [K], z2 [K*K]``, all float32 in registers.
  The second-order features of a chunk, ``(q'_i q'_j)/sqrt(2)`` for a block of rows, are built in
  registers from q/k tiles and enter tensor-core dots (``phi2(q) @ s2``, ``phi2(k)^T @ v``).

Programs: grid ``(NV, NS, N*H)``. Each program walks one sequence and head sequentially, chunk
by chunk, owning the V-columns ``[i_v*BV, (i_v+1)*BV)`` and the second-order rows
``i in [i_s*BK1, (i_s+1)*BK1)`` (all j) of the state, R = BK1*KP <= 256 rows. Program ``i_s == 0``
also owns the zeroth/first order and the intra-chunk part; ``i_v == 0`` owns the normaliser column
of the state. For K <= 16 there is one row block (NS == 1) and the forward writes the normalised
output directly; otherwise partial outputs are summed on the host. The backward is two sweeps,
as in flash-linear-attention's fused_chunk: forward for dq (state recomputed), backward for dk and
dv (state gradient carried); partial dq/dk per (row block, V block) are summed on the host.

Few (sequence, head) pairs leave SMs idle, so long dense sequences are also cut into segments
(SEGMENT_LEN): a state-only pass (STORE_OUT=False) gives each segment's state increment, a cumsum
gives each segment's initial state, and the segments then run as independent sequences; the
backward does the same with state gradients (reverse cumsum). The decode path
(`_based_step_kernel`) walks tokens one at a time with no chunk padding.

Tokens are rows of the packed [B*T, H, *] layout: sequence n spans rows [bos, eos), with
bos = n*T (dense) or cu_seqlens[n] (varlen); offsets are int64.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .._config import triton_interpret
from .._device import sm_count
from ..linear_attn.triton import seq_span  # shared [bos, eos) of a (packed) sequence
from .reference import EPS, feature_dim
from .._launch import cdiv, next_power_of_2, fast_kernel


# Tiles, chosen from ptxas register/spill counts on sm_90 (bf16, K = 16 and 32): BT = 16 with 8
# warps spills nothing in the forward and dq kernels and little in dkv; BT = 64 or 4 warps spill
# kilobytes per thread. BLOCK_V = 16 halves the state slice per program (and doubles programs).
BLOCK_V = 16


def _configs():
    """One config (BT = 16, 8 warps: the spill-free tile above) unless SSM_KERNELS_BASED_AUTOTUNE=1
    (read at import) asks to time BT = 16 against 32 on the first call. Each config is a full
    compile of every Based kernel (fp32 ones 2-5 s each offline, bench/compile_audit.py), so
    autotuning doubled the first call and `check`."""
    if triton_interpret():
        return [triton.Config({"BT": 16}, num_warps=4)]
    bts = (16, 32) if os.environ.get("SSM_KERNELS_BASED_AUTOTUNE", "0") == "1" else (16,)
    return [triton.Config({"BT": bt}, num_warps=8) for bt in bts]


@triton.jit
def _dot(a, b, DT: tl.constexpr):
    # fp32 operands: exact (ieee) products; 16-bit operands: tensor cores, fp32 accumulation
    if DT == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def _load_qk(ptr, rows, i_h, H, K, o_k, m_t, m_k):
    """A chunk of q or k [BT, KP] in its storage dtype (padded columns zero)."""
    base = (rows * H + i_h) * K
    return tl.load(ptr + base[:, None] + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)


@triton.jit
def _onehot(idx, o_k, DT: tl.constexpr):
    """[R, KP] selection matrix: row r picks column idx[r]."""
    return (idx[:, None] == o_k[None, :]).to(DT)


@triton.jit
def _pair(x, r_i, r_j, o_k, c, DT: tl.constexpr):
    """(c x[:, r_i], c x[:, r_j]) [BT, R] for the program's second-order features, gathered by
    one-hot dots (exact: one nonzero product per output)."""
    xi = _dot(x, tl.trans(_onehot(r_i, o_k, DT)), DT) * c
    xj = _dot(x, tl.trans(_onehot(r_j, o_k, DT)), DT) * c
    return xi, xj


@triton.jit
def _phi2_grad(g, xi, xj, r_i, r_j, o_k, DT: tl.constexpr):
    """Gradient w.r.t. x' of sum(g * x'_i x'_j / sqrt(2)) over the row block: g [BT, R] ->
    [BT, KP] (scattered back by one-hot dots; tf32 for 16-bit inputs, ieee for float32)."""
    g = g * 0.7071067811865476
    if DT == tl.float32:
        dx = tl.dot(g * xj, _onehot(r_i, o_k, tl.float32), input_precision="ieee")
        dx = tl.dot(g * xi, _onehot(r_j, o_k, tl.float32), dx, input_precision="ieee")
    else:
        dx = tl.dot(g * xj, _onehot(r_i, o_k, tl.float32), input_precision="tf32")
        dx = tl.dot(g * xi, _onehot(r_j, o_k, tl.float32), dx, input_precision="tf32")
    return dx


@triton.jit
def _state_ptrs(h_ptr, i_nh, K, V, o_k, o_v, rows2):
    D = 1 + K + K * K
    VA = V + 1
    base = h_ptr + i_nh.to(tl.int64) * D * VA
    p0 = base + o_v                                               # s0 [BV]
    p1 = base + (1 + o_k)[:, None] * VA + o_v[None, :]            # s1 [KP, BV]
    p2 = base + rows2[:, None].to(tl.int64) * VA + o_v[None, :]   # s2 [R, BV]
    pz0 = base + V
    pz1 = base + (1 + o_k) * VA + V
    pz2 = base + rows2.to(tl.int64) * VA + V
    return p0, p1, p2, pz0, pz1, pz2


@triton.jit
def _block_indices(i_v, i_s, K, V, BV: tl.constexpr, KP: tl.constexpr, BK1: tl.constexpr,
                   R: tl.constexpr):
    o_k = tl.arange(0, KP)
    o_v = i_v * BV + tl.arange(0, BV)
    o_r = tl.arange(0, R)
    r_i = i_s * BK1 + o_r // KP   # second-order feature r of this row block is x_{r_i} x_{r_j}
    r_j = o_r % KP
    m_r = (r_i < K) & (r_j < K)
    rows2 = 1 + K + r_i * K + r_j
    return o_k, o_v, m_r, rows2, r_i, r_j, o_k < K, o_v < V


@triton.jit
def _load_state(h_ptr, i_nh, K, V, o_k, o_v, rows2, m_k, m_v, m_r,
                HAS: tl.constexpr, BV: tl.constexpr, KP: tl.constexpr, R: tl.constexpr):
    """One program's slice of a state [N, H, D, V+1]: (s0, s1, s2, z0, z1, z2), zeros if not HAS."""
    if HAS:
        p0, p1, p2, pz0, pz1, pz2 = _state_ptrs(h_ptr, i_nh, K, V, o_k, o_v, rows2)
        s0 = tl.load(p0, mask=m_v, other=0.0)
        s1 = tl.load(p1, mask=m_k[:, None] & m_v[None, :], other=0.0)
        s2 = tl.load(p2, mask=m_r[:, None] & m_v[None, :], other=0.0)
        z0 = tl.load(pz0)
        z1 = tl.load(pz1, mask=m_k, other=0.0)
        z2 = tl.load(pz2, mask=m_r, other=0.0)
    else:
        s0 = tl.zeros([BV], dtype=tl.float32)
        s1 = tl.zeros([KP, BV], dtype=tl.float32)
        s2 = tl.zeros([R, BV], dtype=tl.float32)
        z0 = tl.full([], 0.0, tl.float32)
        z1 = tl.zeros([KP], dtype=tl.float32)
        z2 = tl.zeros([R], dtype=tl.float32)
    return s0, s1, s2, z0, z1, z2


@triton.jit
def _store_state(h_ptr, i_nh, K, V, o_k, o_v, rows2, m_k, m_v, m_r, i_v, i_s,
                 s0, s1, s2, z0, z1, z2):
    """Write one program's slice: its row block always, orders 0/1 if i_s == 0, the normaliser
    column if i_v == 0."""
    p0, p1, p2, pz0, pz1, pz2 = _state_ptrs(h_ptr, i_nh, K, V, o_k, o_v, rows2)
    tl.store(p2, s2, mask=m_r[:, None] & m_v[None, :])
    if i_v == 0:
        tl.store(pz2, z2, mask=m_r)
    if i_s == 0:
        tl.store(p0, s0, mask=m_v)
        tl.store(p1, s1, mask=m_k[:, None] & m_v[None, :])
        if i_v == 0:
            tl.store(pz0, z0)
            tl.store(pz1, z1, mask=m_k)


@triton.autotune(configs=_configs(), key=["KP", "BV", "NS", "USE_NORM", "STORE_OUT"])
@triton.jit
def _based_fwd_kernel(
    # pointers: q, k [TT, H, K], v [TT, H, V]; h0 [N, H, D, V+1] fp32; cu_seqlens [N+1]
    q_ptr, k_ptr, v_ptr, h0_ptr, cu_ptr,
    # outputs: o [TT, H, V] (NS == 1) or fp32 partials [NS, TT, H, V]; z [NS, TT, H]; hT like h0
    o_ptr, z_ptr, hT_ptr,
    # scalars and sizes
    c, T, TT, H, K, V,
    # meta-parameters
    HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr, VARLEN: tl.constexpr,
    USE_NORM: tl.constexpr, DT: tl.constexpr, DTS: tl.constexpr, NS: tl.constexpr,
    KP: tl.constexpr, BK1: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    STORE_OUT: tl.constexpr = True,
):
    # STORE_OUT=False: only the state after each sequence (segment state deltas, see based_fwd)
    R: tl.constexpr = BK1 * KP
    i_v, i_s, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = seq_span(i_n, cu_ptr, T, VARLEN)
    o_k, o_v, m_r, rows2, r_i, r_j, m_k, m_v = _block_indices(i_v, i_s, K, V, BV, KP, BK1, R)
    first = i_s == 0
    s0, s1, s2, z0, z1, z2 = _load_state(h0_ptr, i_nh, K, V, o_k, o_v, rows2, m_k, m_v, m_r,
                                         HAS_H0, BV, KP, R)
    o_t = tl.arange(0, BT)
    causal = o_t[:, None] >= o_t[None, :]
    for t0 in range(bos, eos, BT):
        rows = t0 + o_t
        m_t = rows < eos
        x_q = _load_qk(q_ptr, rows, i_h, H, K, o_k, m_t, m_k)
        x_k = _load_qk(k_ptr, rows, i_h, H, K, o_k, m_t, m_k)
        b_q = x_q.to(tl.float32) * c
        b_k = x_k.to(tl.float32) * c
        m_tv = m_t[:, None] & m_v[None, :]
        b_v = tl.load(v_ptr + (rows * H + i_h)[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
        if STORE_OUT:  # outputs read the state before this chunk; the chunk itself is intra
            qi, qj = _pair(x_q, r_i, r_j, o_k, c, DT)
            p2q = qi * qj * 0.7071067811865476
            b_o = _dot(p2q, s2, DTS)
            b_z = tl.sum(p2q * z2[None, :], 1)
            if first:
                a = _dot(b_q, tl.trans(b_k), DT)
                f = tl.where(causal, 1.0 + a + 0.5 * a * a, 0.0)
                b_o += _dot(f, b_v, DT) + _dot(b_q, s1, DTS) + s0[None, :]
                b_z += tl.sum(f, 1) + tl.sum(b_q * z1[None, :], 1) + z0
            p_o = (rows * H + i_h)[:, None] * V + o_v[None, :]
            p_z = rows * H + i_h
            if NS == 1:
                if USE_NORM:
                    b_o = b_o / (b_z[:, None] + 1e-6)
                tl.store(o_ptr + p_o, b_o.to(o_ptr.dtype.element_ty), mask=m_tv)
            else:
                tl.store(o_ptr + i_s.to(tl.int64) * TT * H * V + p_o, b_o, mask=m_tv)
            if i_v == 0:
                tl.store(z_ptr + i_s.to(tl.int64) * TT * H + p_z, b_z, mask=m_t)
        if first:
            s1 += _dot(tl.trans(b_k), b_v, DT)
            z1 += tl.sum(b_k, 0)
            s0 += tl.sum(b_v.to(tl.float32), 0)
            z0 += tl.minimum(eos - t0, BT).to(tl.float32)
        ki, kj = _pair(x_k, r_i, r_j, o_k, c, DT)
        p2k = ki * kj * 0.7071067811865476
        s2 += _dot(tl.trans(p2k), b_v, DT)
        z2 += tl.sum(p2k, 0)
    if STORE_FINAL:
        _store_state(hT_ptr, i_nh, K, V, o_k, o_v, rows2, m_k, m_v, m_r, i_v, i_s,
                     s0, s1, s2, z0, z1, z2)


@triton.jit
def _step_phi2(ptr, r_i, r_j, m_r, c):
    """Second-order features [R] of one token's row block (gathered loads, cached)."""
    xi = tl.load(ptr + r_i, mask=m_r, other=0.0).to(tl.float32)
    xj = tl.load(ptr + r_j, mask=m_r, other=0.0).to(tl.float32)
    return xi * xj * (c * c * 0.7071067811865476)


@triton.jit
def _based_step_kernel(
    # pointers and outputs as in _based_fwd_kernel
    q_ptr, k_ptr, v_ptr, h0_ptr, cu_ptr, o_ptr, z_ptr, hT_ptr,
    # scalars and sizes
    c, T, TT, H, K, V,
    # meta-parameters
    HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr, VARLEN: tl.constexpr,
    USE_NORM: tl.constexpr, NS: tl.constexpr,
    KP: tl.constexpr, BK1: tl.constexpr, BV: tl.constexpr,
):
    """The recurrence one token at a time (decoding): S += phi(k_t)^T [v_t, 1], then
    [o_t, z_t] = phi(q_t) S, with the program's state slice in registers; no tensor-core dots."""
    R: tl.constexpr = BK1 * KP
    i_v, i_s, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = seq_span(i_n, cu_ptr, T, VARLEN)
    o_k, o_v, m_r, rows2, r_i, r_j, m_k, m_v = _block_indices(i_v, i_s, K, V, BV, KP, BK1, R)
    first = i_s == 0
    s0, s1, s2, z0, z1, z2 = _load_state(h0_ptr, i_nh, K, V, o_k, o_v, rows2, m_k, m_v, m_r,
                                         HAS_H0, BV, KP, R)
    for t in range(bos, eos):
        p_t = t * H + i_h
        b_q = tl.load(q_ptr + p_t * K + o_k, mask=m_k, other=0.0).to(tl.float32) * c

        b_k = tl.load(k_ptr + p_t * K + o_k, mask=m_k, other=0.0).to(tl.float32) * c

        b_v = tl.load(v_ptr + p_t * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        p2q = _step_phi2(q_ptr + p_t * K, r_i, r_j, m_r, c)
        p2k = _step_phi2(k_ptr + p_t * K, r_i, r_j, m_r, c)
        s2 += p2k[:, None] * b_v[None, :]
        z2 += p2k
        b_o = tl.sum(p2q[:, None] * s2, 0)
        b_z = tl.sum(p2q * z2, 0)
        if first:
            s1 += b_k[:, None] * b_v[None, :]
            z1 += b_k
            s0 += b_v
            z0 += 1.0
            b_o += tl.sum(b_q[:, None] * s1, 0) + s0
            b_z += tl.sum(b_q * z1, 0) + z0
        if NS == 1:
            if USE_NORM:
                b_o = b_o / (b_z + 1e-6)
            tl.store(o_ptr + p_t * V + o_v, b_o.to(o_ptr.dtype.element_ty), mask=m_v)
        else:
            tl.store(o_ptr + i_s.to(tl.int64) * TT * H * V + p_t * V + o_v, b_o, mask=m_v)
        if i_v == 0:
            tl.store(z_ptr + i_s.to(tl.int64) * TT * H + p_t, b_z)
    if STORE_FINAL:
        _store_state(hT_ptr, i_nh, K, V, o_k, o_v, rows2, m_k, m_v, m_r, i_v, i_s,
                     s0, s1, s2, z0, z1, z2)


@triton.jit
def _load_do(do_ptr, z_ptr, dz_ptr, p_v, p_t, m_tv, m_t, USE_NORM: tl.constexpr, BT: tl.constexpr):
    """Cotangents of a chunk's unnormalised output [BT, BV] and normaliser [BT] (fp32)."""
    b_do = tl.load(do_ptr + p_v, mask=m_tv, other=0.0).to(tl.float32)
    if USE_NORM:
        rz = 1.0 / (tl.load(z_ptr + p_t, mask=m_t, other=1.0) + 1e-6)
        b_do = b_do * rz[:, None]
        b_dz = tl.load(dz_ptr + p_t, mask=m_t, other=0.0)
    else:
        b_dz = tl.zeros([BT], dtype=tl.float32)
    return b_do, b_dz


@triton.jit
def _based_bwd_dz_kernel(do_ptr, o_ptr, z_ptr, dz_ptr, M, V, BM: tl.constexpr, BV: tl.constexpr):
    """dz = -(do · o) / (z + eps) per token: the normaliser's cotangent (o is the normalised
    output). Rows of the flattened [TT*H, V]."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    m = rows < M
    acc = tl.zeros([BM], dtype=tl.float32)
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV)
        mm = m[:, None] & (cols < V)[None, :]
        p = rows[:, None] * V + cols[None, :]
        acc += tl.sum(tl.load(do_ptr + p, mask=mm, other=0.0).to(tl.float32)
                      * tl.load(o_ptr + p, mask=mm, other=0.0).to(tl.float32), 1)
    z = tl.load(z_ptr + rows, mask=m, other=1.0)
    tl.store(dz_ptr + rows, -acc / (z + 1e-6), mask=m)


@triton.autotune(configs=_configs(), key=["KP", "BV", "NS", "USE_NORM"])
@triton.jit
def _based_bwd_dq_kernel(
    # pointers: q, k [TT, H, K]; v, do [TT, H, V] (do: cotangent of the returned o); z, dz fp32
    # [TT, H] (normaliser and its cotangent); h0; cu_seqlens
    q_ptr, k_ptr, v_ptr, do_ptr, z_ptr, dz_ptr, h0_ptr, cu_ptr,
    # output: dq partials fp32 [NS*NV, TT, H, K]
    dq_ptr,
    # scalars and sizes
    c, T, TT, H, K, V,
    # meta-parameters
    HAS_H0: tl.constexpr, VARLEN: tl.constexpr, USE_NORM: tl.constexpr, DT: tl.constexpr,
    DTS: tl.constexpr,
    NS: tl.constexpr, KP: tl.constexpr, BK1: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
):
    # forward sweep: dq' = (d/dq') [phi(q') S_c [do, dz]] + intra-chunk term; dq = c dq'
    R: tl.constexpr = BK1 * KP
    i_v, i_s, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NV = tl.num_programs(0)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = seq_span(i_n, cu_ptr, T, VARLEN)
    o_k, o_v, m_r, rows2, r_i, r_j, m_k, m_v = _block_indices(i_v, i_s, K, V, BV, KP, BK1, R)
    first = i_s == 0
    _, s1, s2, _, z1, z2 = _load_state(h0_ptr, i_nh, K, V, o_k, o_v, rows2, m_k, m_v, m_r,
                                       HAS_H0, BV, KP, R)
    w_z = (i_v == 0).to(tl.float32)  # the normaliser column belongs to the first V block
    o_t = tl.arange(0, BT)
    causal = o_t[:, None] >= o_t[None, :]
    p_part = dq_ptr + (i_s * NV + i_v).to(tl.int64) * TT * H * K
    for t0 in range(bos, eos, BT):
        rows = t0 + o_t
        m_t = rows < eos
        x_q = _load_qk(q_ptr, rows, i_h, H, K, o_k, m_t, m_k)
        x_k = _load_qk(k_ptr, rows, i_h, H, K, o_k, m_t, m_k)
        b_q = x_q.to(tl.float32) * c
        b_k = x_k.to(tl.float32) * c
        m_tv = m_t[:, None] & m_v[None, :]
        p_v = (rows * H + i_h)[:, None] * V + o_v[None, :]
        b_v = tl.load(v_ptr + p_v, mask=m_tv, other=0.0)
        b_do, b_dz = _load_do(do_ptr, z_ptr, dz_ptr, p_v, rows * H + i_h, m_tv, m_t, USE_NORM, BT)
        b_dz = b_dz * w_z
        g2 = _dot(b_do, tl.trans(s2), DTS) + b_dz[:, None] * z2[None, :]
        qi, qj = _pair(x_q, r_i, r_j, o_k, c, DT)
        b_dq = _phi2_grad(g2, qi, qj, r_i, r_j, o_k, DT)
        if first:
            a = _dot(b_q, tl.trans(b_k), DT)
            dA = _dot(b_do, tl.trans(b_v), DT) + b_dz[:, None]
            da = tl.where(causal, dA * (1.0 + a), 0.0)
            b_dq += _dot(da, b_k, DT) + _dot(b_do, tl.trans(s1), DTS) + b_dz[:, None] * z1[None, :]
            s1 += _dot(tl.trans(b_k), b_v, DT)
            z1 += tl.sum(b_k, 0)
        ki, kj = _pair(x_k, r_i, r_j, o_k, c, DT)
        p2k = ki * kj * 0.7071067811865476
        s2 += _dot(tl.trans(p2k), b_v, DT)
        z2 += tl.sum(p2k, 0)
        tl.store(p_part + (rows * H + i_h)[:, None] * K + o_k[None, :], b_dq * c,
                 mask=m_t[:, None] & m_k[None, :])


@triton.autotune(configs=_configs(), key=["KP", "BV", "NS", "USE_NORM", "STORE_OUT"])
@triton.jit
def _based_bwd_dkv_kernel(
    # pointers: q, k, v, do, dz, cu_seqlens as in the dq kernel; dhT [N, H, D, V+1] fp32
    q_ptr, k_ptr, v_ptr, do_ptr, z_ptr, dz_ptr, dhT_ptr, cu_ptr,
    # outputs: dk partials fp32 [NS*NV, TT, H, K]; dv [TT, H, V] in v's dtype (NS == 1) or fp32
    # partials [NS, TT, H, V]; dh0 like dhT
    dk_ptr, dv_ptr, dh0_ptr,
    # scalars and sizes
    c, T, TT, H, K, V,
    # meta-parameters
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, VARLEN: tl.constexpr,
    USE_NORM: tl.constexpr, DT: tl.constexpr, DTS: tl.constexpr,
    NS: tl.constexpr, KP: tl.constexpr, BK1: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    STORE_OUT: tl.constexpr = True,
):
    # backward sweep carrying dS (gradient of the state after the current chunk).
    # STORE_OUT=False: only dS at each sequence's start (segment deltas, see based_bwd)
    R: tl.constexpr = BK1 * KP
    i_v, i_s, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NV = tl.num_programs(0)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = seq_span(i_n, cu_ptr, T, VARLEN)
    o_k, o_v, m_r, rows2, r_i, r_j, m_k, m_v = _block_indices(i_v, i_s, K, V, BV, KP, BK1, R)
    first = i_s == 0
    d0, d1, d2, dz0, dz1, dz2 = _load_state(dhT_ptr, i_nh, K, V, o_k, o_v, rows2, m_k, m_v, m_r,
                                            HAS_DHT, BV, KP, R)
    w_z = (i_v == 0).to(tl.float32)
    o_t = tl.arange(0, BT)
    causal_t = o_t[:, None] <= o_t[None, :]  # [j, i]: key j is seen by query i
    p_dk = dk_ptr + (i_s * NV + i_v).to(tl.int64) * TT * H * K
    p_dv = dv_ptr + i_s.to(tl.int64) * TT * H * V
    n_chunks = tl.cdiv(eos - bos, BT)
    for i_c in range(0, n_chunks):
        t0 = bos + (n_chunks - 1 - i_c) * BT
        rows = t0 + o_t
        m_t = rows < eos
        x_q = _load_qk(q_ptr, rows, i_h, H, K, o_k, m_t, m_k)
        x_k = _load_qk(k_ptr, rows, i_h, H, K, o_k, m_t, m_k)
        b_q = x_q.to(tl.float32) * c
        b_k = x_k.to(tl.float32) * c
        m_tv = m_t[:, None] & m_v[None, :]
        p_v = (rows * H + i_h)[:, None] * V + o_v[None, :]
        b_v = tl.load(v_ptr + p_v, mask=m_tv, other=0.0)
        b_do, b_dz = _load_do(do_ptr, z_ptr, dz_ptr, p_v, rows * H + i_h, m_tv, m_t, USE_NORM, BT)
        if STORE_OUT:  # dk, dv read dS after this chunk; the chunk itself is intra
            ki, kj = _pair(x_k, r_i, r_j, o_k, c, DT)
            p2k = ki * kj * 0.7071067811865476
            # through the state after this chunk: d phi(k_j) = dS [v_j, 1]
            g2 = _dot(b_v, tl.trans(d2), DTS) + w_z * dz2[None, :]
            b_dk = _phi2_grad(g2, ki, kj, r_i, r_j, o_k, DT)
            b_dv = _dot(p2k, d2, DTS)
            if first:
                aT = _dot(b_k, tl.trans(b_q), DT)                             # [j, i]
                fT = tl.where(causal_t, 1.0 + aT + 0.5 * aT * aT, 0.0)
                dAT = _dot(b_v, tl.trans(b_do), DT) + w_z * b_dz[None, :]
                daT = tl.where(causal_t, dAT * (1.0 + aT), 0.0)
                b_dk += _dot(daT, b_q, DT) + _dot(b_v, tl.trans(d1), DTS) + w_z * dz1[None, :]
                b_dv += _dot(fT, b_do, DT) + _dot(b_k, d1, DTS) + d0[None, :]
            tl.store(p_dk + (rows * H + i_h)[:, None] * K + o_k[None, :], b_dk * c,
                     mask=m_t[:, None] & m_k[None, :])
            tl.store(p_dv + p_v, b_dv.to(dv_ptr.dtype.element_ty), mask=m_tv)
        if first:
            d1 += _dot(tl.trans(b_q), b_do, DT)
            dz1 += tl.sum(b_q * b_dz[:, None], 0)
            d0 += tl.sum(b_do, 0)
            dz0 += tl.sum(b_dz, 0)
        qi, qj = _pair(x_q, r_i, r_j, o_k, c, DT)
        p2q = qi * qj * 0.7071067811865476
        d2 += _dot(tl.trans(p2q), b_do, DT)
        dz2 += tl.sum(p2q * b_dz[:, None], 0)
    if STORE_DH0:
        _store_state(dh0_ptr, i_nh, K, V, o_k, o_v, rows2, m_k, m_v, m_r, i_v, i_s,
                     d0, d1, d2, dz0, dz1, dz2)


# ---- launchers: check, allocate, launch -------------------------------------------------------

# launch cache: bind each compiled kernel once per specialisation (ssm_kernels/_launch.py)
_based_fwd_kernel = fast_kernel(_based_fwd_kernel)
_based_step_kernel = fast_kernel(_based_step_kernel)
_based_bwd_dz_kernel = fast_kernel(_based_bwd_dz_kernel)
_based_bwd_dq_kernel = fast_kernel(_based_bwd_dq_kernel)
_based_bwd_dkv_kernel = fast_kernel(_based_bwd_dkv_kernel)


def _tiling(K: int, V: int):
    KP = max(16, next_power_of_2(K))
    BK1 = max(1, min(KP, 256 // KP))
    NS = KP // BK1
    BV = 16 if triton_interpret() else min(BLOCK_V, max(16, next_power_of_2(V)))
    return KP, BK1, NS, BV, cdiv(V, BV)


def _dot_dtypes(dtype: torch.dtype):
    """Operand dtypes of the chunk-local dots and of the dots with a state. A float16 state could
    overflow at long lengths, so state dots take bfloat16 operands for float16 inputs."""
    if dtype == torch.float32 or triton_interpret():  # bf16 tl.dot is wrong in the interpreter
        return dict(DT=tl.float32, DTS=tl.float32)
    if dtype == torch.float16:
        return dict(DT=tl.float16, DTS=tl.bfloat16)
    return dict(DT=tl.bfloat16, DTS=tl.bfloat16)


def _dims(q, v, cu_seqlens):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    return B, T, H, K, V, N


# Long dense sequences are split into segments of SEGMENT_LEN tokens so that more programs run
# at once: one pass computes each segment's state increment, a cumsum over segments gives every
# segment's initial state, and the main kernel runs the segments as independent sequences
# (the backward does the same with state gradients). None: when fewer programs than SMs would
# run, cut into segments for about two programs per SM; 0 disables. A tuning knob (tests set
# small values on the CPU).
SEGMENT_LEN = None
_SEGMENT_MIN = 512


def _segment_len(T: int, programs: int, device: torch.device) -> int:
    if SEGMENT_LEN is not None:
        return SEGMENT_LEN if 0 < SEGMENT_LEN < T else 0
    if device.type != "cuda":
        return 0
    sms = sm_count(device)
    if programs >= sms:  # one 8-warp program fills an SM's registers: a full wave already
        return 0
    seg = max(_SEGMENT_MIN, cdiv(cdiv(T, cdiv(2 * sms, programs)), 64) * 64)
    return seg if seg < T else 0


def _segment_offsets(B: int, T: int, seg: int, device) -> torch.Tensor:
    """cu_seqlens-style offsets of the segments of B dense sequences of length T: [B*nseg + 1]."""
    nseg = cdiv(T, seg)
    starts = (torch.arange(B, device=device)[:, None] * T
              + torch.arange(nseg, device=device)[None, :] * seg).flatten()
    return torch.cat([starts, starts.new_full((1,), B * T)])


def _launch_fwd(q, k, v, h0, cu, o, z, hT, c, T, meta, store_out=True):
    B, _, H, _ = q.shape
    N = B if cu is None else cu.numel() - 1
    grid = (meta["NV"], meta["NS"], N * H)
    kw = {key: val for key, val in meta.items() if key != "NV"}
    _based_fwd_kernel[grid](q, k, v, z if h0 is None else h0, z if cu is None else cu, o, z, hT,
                            c, T, B * T, H, q.shape[-1], v.shape[-1], HAS_H0=h0 is not None,
                            STORE_FINAL=hT.numel() > 0, VARLEN=cu is not None,
                            STORE_OUT=store_out, **kw, **_dot_dtypes(q.dtype))


def _segment_starts(q, k, v, h0, c, T, seg, meta):
    """Initial state of every segment [B*nseg, H, D, V+1] and the final states [B, H, D, V+1]."""
    B, _, H, K = q.shape
    V = v.shape[-1]
    cu = _segment_offsets(B, T, seg, q.device)
    nseg = cu.numel() - 1
    delta = torch.empty((nseg, H, feature_dim(K), V + 1), device=q.device, dtype=torch.float32)
    scratch = torch.empty((1,), device=q.device, dtype=torch.float32)
    _launch_fwd(q, k, v, None, cu, scratch, scratch, delta, c, T, meta, store_out=False)
    inc = delta.view(B, nseg // B, *delta.shape[1:]).cumsum(1)
    starts = torch.cat([torch.zeros_like(inc[:, :1]), inc[:, :-1]], 1)
    final = inc[:, -1]
    if h0 is not None:
        starts += h0[:, None]
        final = final + h0
    return cu, starts.flatten(0, 1), final


def based_fwd(q, k, v, h0, scale: float, use_norm: bool, cu_seqlens, store_final: bool,
              step: bool = False):
    """q, k [B, T, H, K], v [B, T, H, V] contiguous. Returns (o [B, T, H, V] in v's dtype,
    z [B, T, H] fp32, final state [N, H, D, V+1] fp32 or an empty tensor). `step` runs the
    token-by-token kernel (decoding) instead of the chunked one."""
    B, T, H, K, V, N = _dims(q, v, cu_seqlens)
    KP, BK1, NS, BV, NV = _tiling(K, V)
    dev = q.device
    if NS == 1:
        o = torch.empty_like(v)
    else:
        o = torch.empty((NS, B, T, H, V), device=dev, dtype=torch.float32)
    z = torch.empty((NS, B, T, H), device=dev, dtype=torch.float32)
    D = feature_dim(K)
    hT = torch.empty((N, H, D, V + 1) if store_final else (0,), device=dev, dtype=torch.float32)
    c = math.sqrt(scale)
    meta = dict(USE_NORM=use_norm, NS=NS, KP=KP, BK1=BK1, BV=BV, NV=NV)
    seg = 0 if (step or cu_seqlens is not None) else _segment_len(T, NV * NS * N * H, dev)
    if step:
        dummy = z
        _based_step_kernel[(NV, NS, N * H)](
            q, k, v, dummy if h0 is None else h0, dummy if cu_seqlens is None else cu_seqlens,
            o, z, hT, c, T, B * T, H, K, V, HAS_H0=h0 is not None, STORE_FINAL=store_final,
            VARLEN=cu_seqlens is not None, USE_NORM=use_norm, NS=NS, KP=KP, BK1=BK1, BV=BV,
            num_warps=4)
    elif seg:
        cu, starts, final = _segment_starts(q, k, v, h0, c, T, seg, meta)
        if store_final:
            hT.copy_(final)
        _launch_fwd(q, k, v, starts, cu, o, z, hT[:0], c, T, meta)
    else:
        _launch_fwd(q, k, v, h0, cu_seqlens, o, z, hT, c, T, meta)
    if NS == 1:
        return o, z[0], hT
    o, z = o.sum(0), z.sum(0)
    if use_norm:
        o = o / (z[..., None] + EPS)
    return o.to(v.dtype), z, hT


def based_bwd(q, k, v, o, z, h0, do, dhT, scale: float, use_norm: bool, cu_seqlens):
    """Gradients (dq, dk, dv, dh0 or empty) of based_fwd given the output cotangent `do` and the
    final-state cotangent `dhT` (or None)."""
    B, T, H, K, V, N = _dims(q, v, cu_seqlens)
    KP, BK1, NS, BV, NV = _tiling(K, V)
    dev = q.device
    if use_norm:  # the normaliser's cotangent; the kernels scale do by 1/(z+eps) on the fly
        dz = torch.empty_like(z)
        M = B * T * H
        _based_bwd_dz_kernel[(cdiv(M, 64),)](do, o, z, dz, M, V, BM=64, BV=min(64, BV * 2))
    else:
        dz = z  # unused
    dq = torch.empty((NS * NV, B, T, H, K), device=dev, dtype=torch.float32)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(v) if NS == 1 else torch.empty((NS, B, T, H, V), device=dev,
                                                           dtype=torch.float32)
    D = feature_dim(K)
    dh0 = torch.empty((N, H, D, V + 1) if h0 is not None else (0,), device=dev, dtype=torch.float32)
    c = math.sqrt(scale)
    meta = dict(USE_NORM=use_norm, NS=NS, KP=KP, BK1=BK1, BV=BV, NV=NV)
    common = dict(USE_NORM=use_norm, NS=NS, **_dot_dtypes(q.dtype), KP=KP, BK1=BK1, BV=BV)
    seg = 0 if cu_seqlens is not None else _segment_len(T, NV * NS * N * H, dev)
    cu, h_start, dh_end, n_seq = cu_seqlens, h0, dhT, N
    if seg:
        # states at segment starts (recomputed) and state gradients at segment ends
        cu, h_start, _ = _segment_starts(q, k, v, h0, c, T, seg, meta)
        n_seq = cu.numel() - 1
        ddelta = torch.empty((n_seq, H, D, V + 1), device=dev, dtype=torch.float32)
        _based_bwd_dkv_kernel[(NV, NS, n_seq * H)](
            q, k, v, do, z, dz, z, cu, dq, dq, ddelta, c, T, B * T, H, K, V, HAS_DHT=False,
            STORE_DH0=True, VARLEN=True, STORE_OUT=False, **common)
        suffix = ddelta.view(B, n_seq // B, H, D, V + 1).flip(1).cumsum(1).flip(1)
        ends = torch.cat([suffix[:, 1:], torch.zeros_like(suffix[:, :1])], 1)
        if dhT is not None:
            ends += dhT[:, None]
        if h0 is not None:
            dh0.copy_(suffix[:, 0] if dhT is None else suffix[:, 0] + dhT)
        dh_end = ends.flatten(0, 1)
    grid = (NV, NS, n_seq * H)
    _based_bwd_dq_kernel[grid](q, k, v, do, z, dz, z if h_start is None else h_start,
                               z if cu is None else cu, dq, c, T, B * T, H, K, V,
                               HAS_H0=h_start is not None, VARLEN=cu is not None, **common)
    _based_bwd_dkv_kernel[grid](q, k, v, do, z, dz, z if dh_end is None else dh_end,
                                z if cu is None else cu, dk, dv, dh0, c, T, B * T, H, K, V,
                                HAS_DHT=dh_end is not None, STORE_DH0=h0 is not None and not seg,
                                VARLEN=cu is not None, STORE_OUT=True, **common)
    dv = dv if NS == 1 else dv.sum(0).to(v.dtype)
    return dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype), dv, dh0
