"""Delta-rule-only forward state scan (knob `chunk.DELTA_FWD`; the engine's DELTA scan stays the
default).

`_delta_fwd_kernel`, one program per (V tile of BV columns, sequence x value head), the whole
K (BK >= K) of a float32 [BK, BV] state S in registers, walking the sequence's chunks:

    V' = U - W S                                   (store V' unless FUSE_OUT)
    [FUSE_OUT] O = scale (r_q e^G . (Q S) + (Q K^T . r_q r_k^T e^(G_i - G_j), causal) V')
    S <- e^(G_last) S + K^T ((e^(G_last - G) r_k) . V')

(r_q, r_k: the in-kernel L2 norm's reciprocal row norms, 1 without it.) What differs from the
engine's DELTA branch (`chunk/fwd.py _state_kernel`): k is loaded once, transposed ([BK, BT], the
A operand of K^T V' and, fused, the B operand of Q K^T) and stays a raw 16-bit dot operand: its
decay and L2 norm scale the [BT, BV] rows of V' instead of a float32 [BT, K] copy of k (the
engine keeps k float32 in registers, normalises and decays it, then rounds it back); the default
is 4 warps and BV = 32 (256 programs at B4 H16 K=V=128, 2+ per SM: the engine runs 128 programs
at 8 warps and 255 registers, one per SM, so nothing hides one program's serial latency). WS picks
the W S product: 0 operands in the input dtype (S rounded: fla's), 1 tf32 on the float32 state
(W float32 or converted: SCAN_TF32 / WU_FLOAT32), 2 two 16-bit dots against S = hi + lo (W in the
input dtype; ~16 bits of S at 2/3 of a tf32 dot's tensor time, no float32 W in shared memory).

FUSE_OUT (DELTA_FWD=2): the output stage in the same loop (q loaded; no h, no V' in memory: the
backward recomputes both anyway). o of chunk c uses the state before chunk c, rounded to the input
dtype as the engine's stored h is, and V' rounded as its stored v_new is; its scores Q K^T are
formed after the state update (fewer tiles live across the chain: sm_90 shared memory 90 -> 66 KB,
spills equal or lower). No dot consumes a transposed dot result (the Triton 3.6 wgmma hazard):
k^T is a loaded tile.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..chunk.common import causal_decay, last_row, load_rows, log_decay_cumsum, mm, mm_wy
from .bwd import _rnorm
from .state import scan_program
from .._launch import fast_kernel


@triton.jit
def _w_times_state(b_w, S, WS: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr):
    """W S (see WS in the module docstring)."""
    if WS == 2:
        S_hi = S.to(DT)
        return mm(b_w, S_hi, DT, IEEE) + mm(b_w, S - S_hi.to(tl.float32), DT, IEEE)
    else:
        return mm_wy(b_w, S, WS, DT, IEEE)


@triton.jit
def _delta_fwd_kernel(
    # q, k [TOK, HQ, K]; w [TOK, H, K]; u [TOK, H, V]; g [TOK, H] f32; h0 [N, H, K, V] f32;
    # outputs h [NCH, H, K, V], vn [TOK, H, V] (not FUSE_OUT), o [TOK, H, V] (FUSE_OUT),
    # ht [N, H, K, V] f32; cu [N + 1]; co [N]
    q_ptr, k_ptr, w_ptr, u_ptr, g_ptr, h0_ptr, h_ptr, vn_ptr, o_ptr, ht_ptr, cu_ptr, co_ptr,
    T, H, HQ, K, V, scale,
    GATE: tl.constexpr, HAS_H0: tl.constexpr, IS_VARLEN: tl.constexpr, L2NORM: tl.constexpr,
    FUSE_OUT: tl.constexpr, WS: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr,
):
    (i_nh, i_h, i_hq, bos, eos, base, o_t, o_k, o_v, m_k, m_v, m_s, p_s,
     S) = scan_program(h0_ptr, cu_ptr, co_ptr, T, H, HQ, K, V, HAS_H0, IS_VARLEN, BT, BK, BV)
    for i in range(tl.cdiv(eos - bos, BT)):
        t = bos + i * BT + o_t
        m_t = t < eos
        row = t * H + i_h
        row_q = t * HQ + i_hq
        m_tv = m_t[:, None] & m_v[None, :]
        # loads first (none depends on S: the pipeliner may issue the next chunk's early)
        b_w = tl.load(w_ptr + row[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                      other=0.)
        b_u = load_rows(u_ptr, row, m_t, o_v, m_v, V)
        b_kt = tl.load(k_ptr + row_q[None, :] * K + o_k[:, None], mask=m_k[:, None] & m_t[None, :],
                       other=0.)                                                  # [BK, BT]
        G = log_decay_cumsum(g_ptr, g_ptr, g_ptr, row, i_h, m_t, o_k, m_k, K, GATE, False, BT)
        G_last = last_row(G, o_t, GATE, BT)
        r_k = _rnorm(b_kt, 0, L2NORM)
        # V' rounded to the input dtype (what the engine path stores as v_new and what its output
        # stage and the backward read); the update and the fused output take it so rounded
        b_vn = (b_u - _w_times_state(b_w, S, WS, DT, IEEE)).to(k_ptr.dtype.element_ty)
        if FUSE_OUT:
            b_q = tl.load(q_ptr + row_q[:, None] * K + o_k[None, :],
                          mask=m_t[:, None] & m_k[None, :], other=0.)
            r_q = _rnorm(b_q, 1, L2NORM)
            # the state before this chunk, in the input dtype (the engine's stored h)
            b_o = mm(b_q, S, DT, IEEE)
        else:
            tl.store(h_ptr + ((base + i) * H + i_h) * K * V + p_s, S.to(h_ptr.dtype.element_ty),
                     mask=m_s)
            tl.store(vn_ptr + row[:, None] * V + o_v[None, :], b_vn, mask=m_tv)
        b_vs = b_vn.to(tl.float32)
        if GATE == 1:
            S = S * tl.exp2(G_last)
            b_vs = b_vs * (tl.exp2(G_last - G) * r_k)[:, None]
        elif L2NORM:
            b_vs = b_vs * r_k[:, None]
        S += mm(b_kt, b_vs, DT, IEEE)
        if FUSE_OUT:
            # the scores after the update (off the serial chain; fewer tiles live across it)
            A = causal_decay(mm(b_q, b_kt, DT, IEEE), G, o_t, GATE) * (
                (r_q * scale)[:, None] * r_k[None, :])
            if GATE == 1:
                b_o = b_o * (r_q * scale * tl.exp2(G))[:, None]
            else:
                b_o = b_o * (r_q * scale)[:, None]
            b_o += mm(A, b_vn, DT, IEEE)
            tl.store(o_ptr + row[:, None] * V + o_v[None, :], b_o.to(o_ptr.dtype.element_ty),
                     mask=m_tv)
    tl.store(ht_ptr + i_nh.to(tl.int64) * K * V + p_s, S, mask=m_s)


_delta_fwd_kernel = fast_kernel(_delta_fwd_kernel)


def delta_fwd_scan(p, q, k, w, u, g, h0, h, vn, o, ht, l2: bool, scale: float, fuse_out: bool,
                   ws: int, BV: int, warps: int, stages: int):
    """Launch `_delta_fwd_kernel` for plan `p` (chunk.py's `_plan`): h, vn written (fuse_out
    False; q, o may be dummies) or o written (fuse_out True; h, vn may be dummies); ht always."""
    cu, co, _ = p.idx_args(ht)
    d = ht.new_empty(1)
    BV = max(16, min(BV, triton.next_power_of_2(p.V)))
    _delta_fwd_kernel[(triton.cdiv(p.V, BV), p.N * p.H)](
        q, k, w, u, d if g is None else g, d if h0 is None else h0, h, vn, o, ht, cu, co,
        p.T, p.H, p.HQ, p.K, p.V, float(scale),
        GATE=p.gate, HAS_H0=h0 is not None, IS_VARLEN=p.varlen, L2NORM=l2, FUSE_OUT=fuse_out,
        WS=ws, BT=p.BT, BK=p.meta["BKF"], BV=BV, DT=p.meta["DT"], IEEE=p.meta["IEEE"],
        num_warps=warps, num_stages=1 if p.meta["IEEE"] == 1 else stages)
