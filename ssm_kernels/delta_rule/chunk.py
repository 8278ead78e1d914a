"""Chunked (WY) Triton path of the delta rule on the shared engine (ssm_kernels/chunk).

Per chunk of BT steps and value head (G_i: cumulative log-decay from the chunk start; k, q L2-
normalised in-kernel when asked, never stored):

    A = strictly-lower[beta_i e^(G_i - G_j) k_i . k_j],  T = (I + A)^-1
    W = T diag(beta e^G) K,  U = T diag(beta) V                       (_wy_fwd_kernel)
    V' = U - W S,  S <- e^(G_last) S + (K e^(G_last - G))^T V'       (engine _state_kernel, DELTA)
    O = scale (e^G Q S + (Q K^T . e^(G_i - G_j), causal) V')          (engine _output_kernel)

Forward: WY stage -> state scan (stores h and v_new = V') -> output stage. Backward: WY stage
again (also stores T), state scan again, `_dv_kernel` without its state term (the intra-chunk
part of dV'), the reverse state-gradient scan with the delta term (engine `_state_grad_kernel`,
DELTA: dV' = dV'_local + (K e^(G_last - G)) dS, dS <- e^(G_last) dS + scale (Q e^G)^T dO - W^T dV'),
the engine's `_dqk_kernel` with v := V' (dq, the engine part of dk and dg), and `_wy_bwd_kernel`
(dW = -dV' S^T, dU = dV' through T to dk, dv, dbeta, dg; sums over the value heads of a q/k group
inside the program; the L2 norm's backward of k as its epilogue). Deterministic: no atomics.

T = (I + A)^-1 is formed blocked: the 16x16 diagonal blocks D by forward substitution (all blocks at
once), then T = (I + N)^-1 D with N = D L (L: A below the block diagonal, nilpotent of index
BT/16): T = (I - N)(I + N^2) D at BT=64, (I - N) D at BT=32.

WU_FLOAT32 (default True): T, W, U (and dV') stay float32 and their products run as tf32 on tensor
cores for 16-bit inputs; False rounds them to the input dtype (bf16 dots, fla's choice). Measured
in the interpreter's bf16 emulation (tests/test_delta_rule.py, NOTES): see bench/NOTES.md.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..chunk import common
from ..chunk.bwd import _dqk_kernel, _dv_kernel, _state_grad_kernel
from ..chunk.common import blocks, chunk_span, l2norm_rows, load_rows, log_decay_cumsum, mm, mm_wy
from ..chunk.fwd import Plan, _dummy, _output_kernel, _state_kernel
from .bwd import _dqk_delta_kernel, _state_grad_delta_kernel
from .fwd import delta_fwd_scan
from .state import _delta_state_kernel, mm_lohi
from .._launch import cdiv, next_power_of_2, fast_kernel

WU_FLOAT32 = True
# V tile of the two serial scans (state, state gradient), None: min(BLOCK_V, 8192 // K) (a
# [K, BV] float32 state per program); smaller tiles give more programs (the scans run one per
# (V tile, sequence x value head)) but re-read w and k per tile. The lead sweeps it on the GPU.
STATE_BLOCK_V = None
# the WY products (T, W, U, w S, w^T dv; the WY backward stays tf32: 3xtf32 needs 328 KB of shared
# memory there) for 16-bit inputs: tf32 (False) or 3xtf32 (True: about fp32 accuracy, 3x the
# tensor-core work); a knob for the GPU sweep
WY_TF32X3 = False
# the inverse's 16x16 diagonal blocks by masked dots instead of 4-d register tensors (fallback)
WY_INVERSE_DOTS = False
# W, U stored in the input dtype (WU_FLOAT32=False): the inverse's own products still in tf32
# and T float32 inside the kernel (True; fla's solve_tril precision), or in the input dtype too
# (False: every WY operand rounded, session 4's WU_FLOAT32=False)
WY_INVERSE_F32 = True
# WY stages with fewer live registers and barriers: forward: the substitution loop reads rows of
# the transposed diagonal blocks (sm_90: 0 BAR.SYNC and 0 shared-memory accesses per step, from 6
# and 9), the inverse's last step in Horner form (D - N (D - N (D - N D))), k reloaded after the
# inverse; backward: k, k k^T and the engine's dk loaded or formed where used, the group's value
# heads unrolled
WY_LEAN = False
# the WY stage as two launches (fla's split): T (stored float32) by one kernel, W, U from it by a
# light second one (+ T written and read, k read twice: ~0.2 GB at B4 T4096 H16)
WY_SPLIT = False
# with WU_FLOAT32=False: the scans' w S and w^T dV' still in tf32 against the float32 running
# state (True), or with the state rounded to the input dtype (False, fla's choice: u - w S cancels,
# so the state's rounding is relative to |w S|, not to |v_new|)
SCAN_TF32 = False
# with WU_FLOAT32=False: W, U still formed by tf32 products of the float32 T (only their storage
# rounded)
WU_TF32_PRODUCTS = False
# with WU_FLOAT32=False: U stored float32 all the same (the other operand of that cancellation)
U_FLOAT32 = False
# warps of the WY stage (None: 8 at K >= 128, else 4); at 8 warps ptxas gives the kernel all 255
# registers (one program per SM, 4096 programs at B4 T4096 H16: 31 serial waves)
WY_WARPS = None
# warps of the forward's state scan (None: as the WY stage's default; the state-gradient scan
# keeps 8 at K = 128: at 4 it spills 1.1 KB on sm_90)
STATE_WARPS = None
# V tile of the output stage and of the backward's intra-chunk dV' (None: the engine's BLOCK_V,
# 64; 128 computes q k^T once per chunk)
OUT_BLOCK_V = None
# the output stage in the engine's decay-on-o form (fla's: q h and q k^T from the raw 16-bit q,
# k^T tiles, e^G on the [BT, BV] rows of q h after the dot instead of q e^G rounded to 16 bits
# before it; the L2 norms as row / column scales, as before); scores bitwise the default's, the
# q h term one rounding fewer. OUT_WARPS: its warps (None: 8 for a V tile of 128, else 4).
# bench/NOTES.md "helper deltaout8"
OUT_DECAY_O = False
OUT_WARPS = None
# its K tile (None: the engine's BLOCK_K, 64; 128 = the whole K in one step: q, k^T, h loaded once)
# and software-pipeline stages (None: 2 for 16-bit inputs; a one-step K loop gains nothing from
# 2, which doubles its shared memory: sm_90 BK=BV=128 128 KB at 2, 1 program per SM)
OUT_BLOCK_K = None
OUT_STAGES = None
# backward: dq, the engine part of dk and dg by the delta-only `bwd._dqk_delta_kernel` (q, k
# loaded in the input dtype after the V loop, the L2 norm as scales of the score tile, the
# group's value heads unrolled) instead of the engine's `_dqk_kernel` (16-bit inputs)
DQK_DELTA = True
# backward: dV' (written by the state-gradient scan, read twice by the WY backward) stored in
# the input dtype instead of float32 (-0.20 GB at B4 T4096 H16; products stay tf32 or
# fp32-accumulated); BWD_DKE_16 with it: the engine part of dk (written by the dq/dk stage, read
# by the WY backward) too (-0.13 GB; bf16 interpreter: dk's error 0.70 -> 0.93 of its bound: it
# cancels against the WY part)
BWD_GRAD_16 = False
BWD_DKE_16 = False
# the WY backward's LEAN form alone (WY_LEAN without its forward part: sm_90 spills 1.3 KB -> 0)
WY_BWD_LEAN = True
# warps and V tile of that kernel (None: 8 at K >= 128, else 4; the engine's BLOCK_V)
DQK_WARPS = None
DQK_BLOCK_V = None
# backward: the reverse state-gradient scan by the delta-only `bwd._state_grad_delta_kernel`
# (q, k in the input dtype, decays and norms as row scales) instead of the engine's DELTA branch;
# SG_FUSE_DV: the intra-chunk dV' formed inside that scan (no `_dv_kernel`, no float32 dvl)
SG_DELTA = True
SG_FUSE_DV = True
# warps and V tile of that scan (None: as the engine's, 8 at K = 128; STATE_BLOCK_V's tile):
# a V tile of 32 doubles the scan's programs (256 at B4 H16), which run 2 per SM only if a
# program fits 128 registers at 8 warps (SG_MAXNREG=128)
SG_WARPS = None
SG_BLOCK_V = None
SG_STAGES = 2
# bf16 inputs: that scan's k dS as two bf16 dots against dS = hi + lo (k a shared-memory operand,
# not a float32 register tile; ~16 bits of dS kept, tf32 keeps 11)
SG_KDS_X2 = True
# register caps (ptxas maxnreg) of the two delta-only backward kernels (None: no cap); 128 at 8
# warps = 2 programs per SM (if shared memory allows: DQK_STAGES=2). DQK_MAXNREG acts on the
# ungated kernel only (sm_90, K=V=128, no L2 norm: 138 registers uncapped, 128 without spills;
# the gated one spills 576 B at 128)
SG_MAXNREG = None
DQK_MAXNREG = 128
DQK_STAGES = 2
# forward with gradients needed: keep T = (I + A)^-1 (float32 [B*T, HV, BT], what the WY stage
# formed) as a third output of the registered forward; the backward then forms W, U from it by
# the light `_wu_kernel` (T, k, v read; w, u written) instead of re-running `_wy_fwd_kernel` (the
# inverse: 255 registers at 8 warps, T written again). Saves the inverse's compute and T's write
# in the backward; costs T's write in the forward and its memory between the passes (B4 T4096
# H16 BT64: 67 MB). W, U (B*T*HV*(K+V) float32: 268 MB at K=V=128) would cost 4x the bytes.
SAVE_WY_INVERSE = True
# H100 session 7 (B4 T4096 H16 K=V=128 bf16, gated): the defaults below = variant
# wyfast-bwd-all-savet, fwd 0.753 / fwd+bwd 3.167 ms vs 1.366 / 6.321 with all these off.
# the WY stage by `_wy_fast_kernel` (16-bit inputs; bench/NOTES.md "helper deltawy6"): 4 warps, no
# register 4-d tensors and no substitution loop: T = (I + A)^-1 by recursive doubling on the
# [BT, BT] tile (X <- X - mask_b(X A) X for blocks b = 4 .. BT: 2 log2(BT/2) dependent dots, tf32
# as WY_INVERSE_F32 / WY_TF32X3 say), k and v stay 16-bit shared-memory operands (the L2 norm, beta
# and e^G folded into T's columns), W = T' K and U = T'' V as hi + lo 16-bit dots (T' split in two
# 16-bit halves: ~16 mantissa bits, K, V exact; one dot with WU_FLOAT32=False and no
# WU_TF32_PRODUCTS, fla's precision). Also forms W, U from a saved T (SAVE_WY_INVERSE's backward,
# WY_SPLIT's second launch) in place of `_wu_kernel`.
WY_FAST = True
# its warps and V tile (None: the engine's BLOCK_V, 64; 128: U in one tile: 8 B spill uncapped,
# 388 B at 168, measured before the mask(X A) form); register cap (ptxas maxnreg; None: none;
# sm_90 bf16 K=V=128 uncapped 166-204 registers, 0 spill = 2 programs per SM; 168: 0-4 B spill,
# 3 per SM); the inverse's levels as a runtime loop (False: unrolled); software-pipeline stages
# of the V loop
WY_FAST_WARPS = 4
WY_FAST_BV = None
WY_FAST_MAXNREG = None
WY_FAST_LOOP = False
WY_FAST_STAGES = 1
# the inverse's products as three bf16 dots on hi + lo halves (`mm_x3`: ~16 bits of each operand,
# better than tf32's 11; 16-bit A operands convert in registers and 16-bit B operands need no
# transposed store, at 1.5x the tensor time of one tf32 dot)
WY_FAST_INV16 = False
# the WY backward by `_wy_bwd_fast_kernel` (16-bit inputs; bench/NOTES.md "helper deltabwd7"): one
# V loop (dW = -dV' S^T, dU Y^T, dY = T^T dV', dv, dbeta in one pass; the default reads dV' and
# v twice), k, v, h stay 16-bit operands (the products with an exact 16-bit side as hi + lo
# 16-bit dots of the float32 side, `mm_hilo` / `mm_lohi`: ~16 bits of it, tf32 keeps 11; the
# L2 norm, beta and e^G as row/column scales), int64 tile bases + int32 offsets, 4 warps (the
# default: 8 warps, 255 registers, 1.3 KB of spills, 200 KB of shared memory = 1 program per
# SM), the group's value heads summed through the engine's float32 dk buffer (no [BT, K] tile
# live across heads). Off until the GPU measures it.
WY_BWD_FAST = False
# its warps, V tile (None: 32), software-pipeline stages of the V loop, register cap (None: none).
# sm_90 (bf16 K=V=128 BT=64, Triton 3.9, ptxas 12.9; regs, spill B, shared memory): 8 warps 2
# stages 255, 0-92 B, 96 KB (1 program per SM, as the default kernel's 255 / 1230-1410 B /
# 196 KB); 4 warps 1 stage 255, 450-1300 B (2 per SM); 8 warps at maxnreg 128 spills 1.4-1.7 KB
# (bench/NOTES.md "helper deltabwd7" has the table; `python bench/sm90_wy.py --bwd`)
WY_BWD_FAST_WARPS = 8
WY_BWD_FAST_BV = None
WY_BWD_FAST_STAGES = 2
WY_BWD_FAST_MAXNREG = None
# column blocks of K for dW = -dV' S^T and dk (1: one [BT, K] float32 dW; 2: two [BT, K/2], dV'
# read once more per block)
WY_BWD_FAST_KSPLIT = 1
# KSPLIT=1: dke + beta e^G dX parked in dke (float32, this program's rows) across the [BT, BT]
# products (True: +134 MB written and read back at B4 T4096 H16 K128), or kept in registers
# (False; sm_90 at 8 warps: 0-92 B of spills either way)
WY_BWD_FAST_PARK = False


@triton.jit
def tril_inverse(A, o_t, BT: tl.constexpr, WF32: tl.constexpr, DT: tl.constexpr,
                 IEEE: tl.constexpr, INV_DOTS: tl.constexpr, LEAN: tl.constexpr = False):
    """(I + A)^-1 for a strictly lower triangular float32 [BT, BT] A (BT = 32 or 64).
    LEAN: see WY_LEAN. INV_DOTS: the diagonal blocks by 15 masked [BT, BT] dots instead of the
    [BT/16, 16, 16] register form (a fallback should a compiler reject the 4-d reshapes; ~30
    GFLOP more per B4 T4096 H16 forward)."""
    NB: tl.constexpr = BT // 16
    blk = o_t // 16
    I = tl.where(o_t[:, None] == o_t[None, :], 1., 0.)
    if INV_DOTS:
        Adf = tl.where(blk[:, None] == blk[None, :], A, 0.)
        Df = I
        for r in tl.static_range(1, 16):
            # rows r of every block: D_r = e_r - sum_{m < r} A_rm D_m (rows m < r final)
            Df = Df - mm_wy(tl.where((o_t % 16 == r)[:, None], Adf, 0.), Df, WF32, DT, IEEE)
    else:
        ob = tl.arange(0, NB)
        eyeb = ob[:, None] == ob[None, :]
        A4 = tl.reshape(A, (NB, 16, NB, 16))
        Ad = tl.sum(tl.where(eyeb[:, None, :, None], A4, 0.), axis=2)      # [NB, 16, 16] blocks
        o16 = tl.arange(0, 16)
        D = tl.broadcast_to(tl.where(o16[:, None] == o16[None, :], 1., 0.)[None, :, :],
                            (NB, 16, 16))
        # a runtime loop, not tl.static_range: unrolled, its 15 [NB, 16, 16] steps were most of
        # the kernel's compile time (bench/compile_audit.py; each step is register work, the
        # loop's overhead is a counter)
        if LEAN:
            # Ad transposed once: row r is then taken by a reduction over axis 2, which leaves it
            # indexed by m along axis 1, where D's rows are (no layout conversion per step)
            AdT = tl.permute(Ad, (0, 2, 1))
        for r in range(1, 16):
            # row r of every block: D_r = e_r - sum_{m < r} A_rm D_m (rows m < r already final)
            if LEAN:
                a_r = tl.sum(tl.where((o16 == r)[None, None, :], AdT, 0.), axis=2)
            else:
                a_r = tl.sum(tl.where((o16 == r)[None, :, None], Ad, 0.), axis=1)  # [NB, 16] (m)
            new = tl.where(o16 == r, 1., 0.)[None, :] - tl.sum(a_r[:, :, None] * D, axis=1)
            D = tl.where((o16 == r)[None, :, None], new[:, None, :], D)
        Df = tl.reshape(tl.where(eyeb[:, None, :, None], D[:, :, None, :], 0.), (BT, BT))
    L = tl.where(blk[:, None] > blk[None, :], A, 0.)
    N = mm_wy(Df, L, WF32, DT, IEEE)
    if LEAN:
        # (I + N)^-1 D = D - N (D - N (D - N D)) (N^NB = 0): the same 4 dependent dots, fewer
        # live [BT, BT] tiles (D, N, X) than the power form
        X = Df
        for _ in tl.static_range(NB - 1):
            X = Df - mm_wy(N, X, WF32, DT, IEEE)
        return X
    if NB == 2:
        M = I - N
    else:
        N2 = mm_wy(N, N, WF32, DT, IEEE)
        M = I - N + N2 - mm_wy(N, N2, WF32, DT, IEEE)
    return mm_wy(M, Df, WF32, DT, IEEE)


@triton.jit
def _wy_chunk_rows(ct_ptr, cu_ptr, T, NT, H, HQ, K, IS_VARLEN: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr):
    """The rows of a WY program (grid: chunk x value head): value head, its q/k head, chunk
    offsets, tokens, token mask, K offsets and mask, rows of the [TOK, H] layout."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_hq = i_h // (H // HQ)
    t0, eos = chunk_span(i_c, ct_ptr, cu_ptr, T, NT, IS_VARLEN, BT)
    o_t = tl.arange(0, BT)
    t = t0 + o_t
    o_k = tl.arange(0, BK)
    return i_h, i_hq, o_t, t, t < eos, o_k, o_k < K, t * H + i_h


@triton.jit(do_not_specialize=["STORE_T"])
def _wy_fwd_kernel(
    # k [TOK, HQ, K]; v [TOK, H, V]; g [TOK, H] f32; beta [TOK, H]; outputs w [TOK, H, K],
    # u [TOK, H, V], Tm [TOK, H, BT] f32 (STORE_T)
    k_ptr, v_ptr, g_ptr, beta_ptr, w_ptr, u_ptr, tm_ptr, ct_ptr, cu_ptr,
    T, NT, H, HQ, K, V,
    GATE: tl.constexpr, L2NORM: tl.constexpr, STORE_T, WF32: tl.constexpr,
    IS_VARLEN: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DT: tl.constexpr, IEEE: tl.constexpr, INV_DOTS: tl.constexpr, INV_F32: tl.constexpr,
    LEAN: tl.constexpr = False, WU: tl.constexpr = True,
):
    i_h, i_hq, o_t, t, m_t, o_k, m_k, row = _wy_chunk_rows(ct_ptr, cu_ptr, T, NT, H, HQ, K,
                                                           IS_VARLEN, BT, BK)
    b_k = load_rows(k_ptr, t * HQ + i_hq, m_t, o_k, m_k, K)
    if L2NORM:
        b_k = l2norm_rows(b_k)
    b_beta = tl.load(beta_ptr + row, mask=m_t, other=0.).to(tl.float32)
    G = log_decay_cumsum(g_ptr, g_ptr, g_ptr, row, i_h, m_t, o_k, m_k, K, GATE, False, BT)
    strict = o_t[:, None] > o_t[None, :]
    KK = mm(b_k, tl.trans(b_k), DT, IEEE)
    A = tl.where(strict, b_beta[:, None] * KK
                 * tl.exp2(tl.where(strict, G[:, None] - G[None, :], float("-inf"))), 0.)
    Tm = tril_inverse(A, o_t, BT, INV_F32, DT, IEEE, INV_DOTS, LEAN)
    if STORE_T:
        tl.store(tm_ptr + row[:, None] * BT + o_t[None, :], Tm, mask=m_t[:, None])
    if WU:
        _wu_tile(Tm, k_ptr, v_ptr, w_ptr, u_ptr, t, row, i_hq, HQ, m_t, o_k, m_k, K, V, G, b_beta,
                 b_k, L2NORM, WF32, BV, DT, IEEE, LEAN)


@triton.jit
def _wu_tile(Tm, k_ptr, v_ptr, w_ptr, u_ptr, t, row, i_hq, HQ, m_t, o_k, m_k, K, V, G, b_beta,
             b_k, L2NORM: tl.constexpr, WF32: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr,
             IEEE: tl.constexpr, RELOAD: tl.constexpr):
    """W = T diag(beta e^G) K, U = T diag(beta) V of one chunk (RELOAD: k loaded here)."""
    if RELOAD:
        # k again (an L2 hit) rather than a [BT, K] float32 tile live across the inverse
        b_k = load_rows(k_ptr, t * HQ + i_hq, m_t, o_k, m_k, K)
        if L2NORM:
            b_k = l2norm_rows(b_k)
    b_w = mm_wy(Tm, b_k * (b_beta * tl.exp2(G))[:, None], WF32, DT, IEEE)
    tl.store(w_ptr + row[:, None] * K + o_k[None, :], b_w.to(w_ptr.dtype.element_ty),
             mask=m_t[:, None] & m_k[None, :])
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_v = load_rows(v_ptr, row, m_t, o_v, m_v, V)
        b_u = mm_wy(Tm, b_v * b_beta[:, None], WF32, DT, IEEE)
        tl.store(u_ptr + row[:, None] * V + o_v[None, :], b_u.to(u_ptr.dtype.element_ty),
                 mask=m_t[:, None] & m_v[None, :])


@triton.jit
def _wu_kernel(
    # WY_SPLIT: W, U from the stored T (Tm [TOK, H, BT] f32 of _wy_fwd_kernel with WU=False)
    k_ptr, v_ptr, g_ptr, beta_ptr, w_ptr, u_ptr, tm_ptr, ct_ptr, cu_ptr,
    T, NT, H, HQ, K, V,
    GATE: tl.constexpr, L2NORM: tl.constexpr, WF32: tl.constexpr, IS_VARLEN: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr,
):
    i_h, i_hq, o_t, t, m_t, o_k, m_k, row = _wy_chunk_rows(ct_ptr, cu_ptr, T, NT, H, HQ, K,
                                                           IS_VARLEN, BT, BK)
    b_beta = tl.load(beta_ptr + row, mask=m_t, other=0.).to(tl.float32)
    G = log_decay_cumsum(g_ptr, g_ptr, g_ptr, row, i_h, m_t, o_k, m_k, K, GATE, False, BT)
    Tm = tl.load(tm_ptr + row[:, None] * BT + o_t[None, :], mask=m_t[:, None], other=0.)
    _wu_tile(Tm, k_ptr, v_ptr, w_ptr, u_ptr, t, row, i_hq, HQ, m_t, o_k, m_k, K, V, G, b_beta,
             b_beta, L2NORM, WF32, BV, DT, IEEE, True)


@triton.jit
def mm_hilo(a, b, NSPLIT: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr):
    """a @ b for a float32 `a` and a 16-bit `b` (an exact operand) as NSPLIT 16-bit dots on the
    pieces of a = a_0 + a_1 + ... (each the rounding of what is left): ~8 (bf16) or 11 (fp16)
    more mantissa bits of `a` per piece, float32 accumulation. float16: each row of `a` scaled by
    a power of two to at most 1 first (T's entries can pass float16's 65504), the product's rows
    scaled back."""
    if DT == tl.float16:
        amax = tl.max(tl.abs(a), axis=1)
        s_row = tl.exp2(tl.ceil(tl.log2(tl.maximum(amax, 1e-30))))
        rest = a * (1. / s_row)[:, None]
    else:
        rest = a
    piece = rest.to(DT)
    acc = mm(piece, b, DT, IEEE)
    for _ in tl.static_range(1, NSPLIT):
        rest = rest - piece.to(tl.float32)
        piece = rest.to(DT)
        if IEEE == 0:
            acc = tl.dot(piece, b, acc)
        else:
            acc += mm(piece, b, DT, IEEE)
    if DT == tl.float16:
        acc = acc * s_row[:, None]
    return acc


@triton.jit
def mm_x3(a, b, IEEE: tl.constexpr):
    """a @ b for float32 a, b as three bf16 dots on their hi + lo halves (hi hi + hi lo + lo hi:
    ~16 mantissa bits of each operand, float32 accumulation; the lo lo term, 2^-16 of the
    product, is left out)."""
    a_h = a.to(tl.bfloat16)
    b_h = b.to(tl.bfloat16)
    a_l = (a - a_h.to(tl.float32)).to(tl.bfloat16)
    b_l = (b - b_h.to(tl.float32)).to(tl.bfloat16)
    if IEEE == 0:
        acc = tl.dot(a_h, b_l)
        acc = tl.dot(a_l, b_h, acc)
        return tl.dot(a_h, b_h, acc)
    else:
        return (mm(a_h, b_l, tl.bfloat16, IEEE) + mm(a_l, b_h, tl.bfloat16, IEEE)
                + mm(a_h, b_h, tl.bfloat16, IEEE))


@triton.jit
def _inverse_level(X, A, o_t, lv, INV_WF32: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr,
                   INV16: tl.constexpr = False):
    """X (the inverse of I + A within blocks of 2^(lv-1)) -> the inverse within blocks of 2^lv:
    for a block [[P, 0], [C, Q]], X - X [[0, 0], [C, 0]] X. INV16: the products by `mm_x3`."""
    # X [[0, 0], [C, 0]] = the (odd sub-block, its left neighbour) part of X A: X is block
    # diagonal, so the mask goes on the product and A (the same every level) is the B operand
    blk = o_t >> (lv - 1)
    sub = ((blk % 2) == 1)[:, None] & (blk[None, :] == (blk - 1)[:, None])
    if INV16:
        return X - mm_x3(tl.where(sub, mm_x3(X, A, IEEE), 0.), X, IEEE)
    return X - mm_wy(tl.where(sub, mm_wy(X, A, INV_WF32, DT, IEEE), 0.), X, INV_WF32, DT, IEEE)


@triton.jit(do_not_specialize=["STORE_T"])
def _wy_fast_kernel(
    # WY_FAST. k [TOK, HQ, K]; v [TOK, H, V] (16-bit); g [TOK, H] f32; beta [TOK, H]; outputs
    # w [TOK, H, K], u [TOK, H, V]; Tm [TOK, H, BT] f32 written (STORE_T) or read (LOAD_T)
    k_ptr, v_ptr, g_ptr, beta_ptr, w_ptr, u_ptr, tm_ptr, ct_ptr, cu_ptr,
    T, NT, H, HQ, K, V,
    GATE: tl.constexpr, L2NORM: tl.constexpr, STORE_T, LOAD_T: tl.constexpr,
    INV_WF32: tl.constexpr, NSPLIT: tl.constexpr, IS_VARLEN: tl.constexpr, BT: tl.constexpr,
    LOG2BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr,
    IEEE: tl.constexpr, LOOP: tl.constexpr = True, INV16: tl.constexpr = False,
    WU: tl.constexpr = 1,
):
    # WU: 1 W and U; 0 (SCAN_T's forward) T only (stored); 2 (SCAN_T_BWD's backward) W only
    i_h, i_hq, o_t, t, m_t, o_k, m_k, row = _wy_chunk_rows(ct_ptr, cu_ptr, T, NT, H, HQ, K,
                                                           IS_VARLEN, BT, BK)
    # addresses: an int64 base per tile (the chunk's first row) + int32 offsets in the tile
    t0, _ = chunk_span(tl.program_id(0), ct_ptr, cu_ptr, T, NT, IS_VARLEN, BT)
    r0 = t0 * H + i_h
    o_r = o_t * H
    m_tk = m_t[:, None] & m_k[None, :]
    # k in its own 16-bit dtype: the operand of k k^T and of W (never a float32 tile)
    b_k = tl.load(k_ptr + (t0 * HQ + i_hq) * K + ((o_t * HQ)[:, None] * K + o_k[None, :]),
                  mask=m_tk, other=0.)
    b_beta = tl.load(beta_ptr + row, mask=m_t, other=0.).to(tl.float32)
    G = log_decay_cumsum(g_ptr, g_ptr, g_ptr, row, i_h, m_t, o_k, m_k, K, GATE, False, BT)
    if L2NORM:
        # the norm as a scale of rows / columns (fla's eps, as l2norm_rows)
        b_kf = b_k.to(tl.float32)
        r_k = 1. / tl.sqrt(tl.sum(b_kf * b_kf, axis=1) + 1e-6)
    else:
        r_k = tl.full([BT], 1., tl.float32)
    if LOAD_T:
        X = tl.load(tm_ptr + r0 * BT + (o_r[:, None] * BT + o_t[None, :]), mask=m_t[:, None],
                    other=0.)
    else:
        strict = o_t[:, None] > o_t[None, :]
        KK = mm(b_k, tl.trans(b_k), DT, IEEE)
        A = tl.where(strict, (b_beta * r_k)[:, None] * KK * r_k[None, :]
                     * tl.exp2(tl.where(strict, G[:, None] - G[None, :], float("-inf"))), 0.)
        # (I + A)^-1 by recursive doubling: X is the inverse of I + (A within blocks of 2^(lv-1));
        # for a block [[P, 0], [C, Q]] of 2^lv, the inverse is X - X [[0, 0], [C, 0]] X
        # (`_inverse_level`)
        eye = o_t[:, None] == o_t[None, :]
        X = tl.where(eye, 1., tl.where((o_t // 2)[:, None] == (o_t // 2)[None, :], -A, 0.))
        if LOOP:
            # a runtime loop: one copy of the level (sm_90: more shared memory, 49 vs 33 KB, and
            # more spills under a register cap than the unrolled levels)
            for lv in range(2, LOG2BT + 1):
                X = _inverse_level(X, A, o_t, lv, INV_WF32, DT, IEEE, INV16)
        else:
            for lv in tl.static_range(2, LOG2BT + 1):
                X = _inverse_level(X, A, o_t, lv, INV_WF32, DT, IEEE, INV16)
        if STORE_T:
            tl.store(tm_ptr + r0 * BT + (o_r[:, None] * BT + o_t[None, :]), X, mask=m_t[:, None])
    if WU == 1:
        # U = T diag(beta) V, W = T diag(beta e^G r) K: the diagonal scales on T's columns (U
        # first: its [BT, BV] accumulator is the smaller one live next to T)
        Xu = X * b_beta[None, :]
        for i_v in range(tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < V
            o_tv = o_r[:, None] * V + o_v[None, :]
            m_tv = m_t[:, None] & m_v[None, :]
            b_v = tl.load(v_ptr + r0 * V + o_tv, mask=m_tv, other=0.)
            b_u = mm_hilo(Xu, b_v, NSPLIT, DT, IEEE)
            tl.store(u_ptr + r0 * V + o_tv, b_u.to(u_ptr.dtype.element_ty), mask=m_tv)
    if WU != 0:
        b_w = mm_hilo(X * (b_beta * tl.exp2(G) * r_k)[None, :], b_k, NSPLIT, DT, IEEE)
        tl.store(w_ptr + r0 * K + (o_r[:, None] * K + o_k[None, :]),
                 b_w.to(w_ptr.dtype.element_ty), mask=m_tk)


@triton.jit
def _k_unit_rows(k_ptr, row_q, m_t, o_k, m_k, K, L2NORM: tl.constexpr):
    """k rows (L2-normalised when asked) and the reciprocal norms (1 without L2NORM)."""
    b_k = load_rows(k_ptr, row_q, m_t, o_k, m_k, K)
    if L2NORM:
        r_k = 1. / tl.sqrt(tl.sum(b_k * b_k, axis=1) + 1e-6)
    else:
        r_k = tl.full([b_k.shape[0]], 1., tl.float32)
    return b_k * r_k[:, None], r_k


@triton.jit
def _wy_bwd_head(
    b_k, KK, k_ptr, row_q, v_ptr, g_ptr, beta_ptr, tm_ptr, h_ptr, dvn_ptr, dge_ptr, dv_ptr,
    dbeta_ptr, dg_ptr, i_c, i_h, t, m_t, o_t, o_k, m_k, Kc, H, K, V,
    GATE: tl.constexpr, L2NORM: tl.constexpr, WF32: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr,
    LEAN: tl.constexpr,
):
    """One value head's part of the WY backward: stores dv, dbeta, dg; returns its dk term.
    LEAN: b_k and KK are not passed (not live through the V loops): k is loaded again after the
    first V loop and k k^T formed there."""
    strict = o_t[:, None] > o_t[None, :]
    row = t * H + i_h
    b_beta = tl.load(beta_ptr + row, mask=m_t, other=0.).to(tl.float32)
    G = log_decay_cumsum(g_ptr, g_ptr, g_ptr, row, i_h, m_t, o_k, m_k, K, GATE, False, BT)
    b_bg = b_beta * tl.exp2(G)
    # T^T loaded transposed (no dot consumes a transposed dot result)
    Tt = tl.load(tm_ptr + row[None, :] * BT + o_t[:, None], mask=m_t[None, :], other=0.)
    p_h = h_ptr + (i_c.to(tl.int64) * H + i_h) * K * V
    dW = tl.zeros([BT, BK], dtype=tl.float32)
    dT = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_dvn = load_rows(dvn_ptr, row, m_t, o_v, m_v, V)
        b_hT = tl.load(p_h + o_k[None, :] * V + o_v[:, None],
                       mask=(o_k < Kc)[None, :] & m_v[:, None], other=0.)
        b_v = load_rows(v_ptr, row, m_t, o_v, m_v, V)
        dW -= mm_wy(b_dvn, b_hT, WF32, DT, IEEE)                           # -dV' S^T
        dT += mm_wy(b_dvn, tl.trans(b_v * b_beta[:, None]), WF32, DT, IEEE)  # dU Y^T
    if LEAN:
        b_k, _ = _k_unit_rows(k_ptr, row_q, m_t, o_k, m_k, K, L2NORM)
    dT += mm_wy(dW, tl.trans(b_k * b_bg[:, None]), WF32, DT, IEEE)          # dW X^T
    dX = mm_wy(Tt, dW, WF32, DT, IEEE)
    b_db = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_dvn = load_rows(dvn_ptr, row, m_t, o_v, m_v, V)
        b_v = load_rows(v_ptr, row, m_t, o_v, m_v, V)
        dY = mm_wy(Tt, b_dvn, WF32, DT, IEEE)
        tl.store(dv_ptr + row[:, None] * V + o_v[None, :],
                 (dY * b_beta[:, None]).to(dv_ptr.dtype.element_ty),
                 mask=m_t[:, None] & m_v[None, :])
        b_db += tl.sum(dY * b_v, axis=1)
    # dA = -T^T dT T^T on the strictly lower part; A_ij = beta_i e^(G_i - G_j) k_i . k_j
    dA = -mm_wy(mm_wy(Tt, dT, WF32, DT, IEEE), Tt, WF32, DT, IEEE)
    dAE = tl.where(strict, dA * tl.exp2(tl.where(strict, G[:, None] - G[None, :],
                                                 float("-inf"))), 0.)
    if LEAN:
        KK = mm(b_k, tl.trans(b_k), DT, IEEE)
    P = dAE * KK
    Bm = dAE * b_beta[:, None]
    xk = tl.sum(dX * b_k, axis=1)
    b_db += tl.sum(P, axis=1) + tl.exp2(G) * xk
    tl.store(dbeta_ptr + row, b_db, mask=m_t)
    if GATE == 1:
        Q = P * b_beta[:, None]
        dG = tl.sum(Q, axis=1) - tl.sum(Q, axis=0) + b_bg * xk
        dg = tl.sum(dG, axis=0) - tl.cumsum(dG, axis=0) + dG           # sum over s >= t
        dg += tl.load(dge_ptr + row, mask=m_t, other=0.)
        tl.store(dg_ptr + row, dg, mask=m_t)
    # dk_i += sum_j Bm_ij k_j + sum_j Bm_ji k_j + beta_i e^G_i dX_i (the second term as the
    # transpose of k^T Bm: a transposed dot result only in an elementwise sum)
    return (mm_wy(Bm, b_k, WF32, DT, IEEE) + tl.trans(mm_wy(tl.trans(b_k), Bm, WF32, DT, IEEE))
            + dX * b_bg[:, None])


@triton.jit
def _wy_bwd_kernel(
    # k [TOK, HQ, K]; v [TOK, H, V]; g [TOK, H] f32; beta [TOK, H]; Tm [TOK, H, BT] f32;
    # h [NCH, H, K, V]; dvn [TOK, H, V] the gradient of V'; dke [TOK, HQ, K] f32 the engine's dk
    # (of the normalised k); dge [TOK, H] f32 the engine's dg; outputs dk [TOK, HQ, K],
    # dv [TOK, H, V], dbeta [TOK, H] f32, dg [TOK, H] f32
    k_ptr, v_ptr, g_ptr, beta_ptr, tm_ptr, h_ptr, dvn_ptr, dke_ptr, dge_ptr,
    dk_ptr, dv_ptr, dbeta_ptr, dg_ptr, ct_ptr, cu_ptr,
    T, NT, H, HQ, K, V,
    GATE: tl.constexpr, L2NORM: tl.constexpr, WF32: tl.constexpr, IS_VARLEN: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr,
    LEAN: tl.constexpr = False, GR: tl.constexpr = 1,
):
    """LEAN: the value heads of the group unrolled (GR = H // HQ, constexpr), k and the engine's
    dk loaded where they are used, so no [BT, K] float32 tile is live through the V loops."""
    i_c, i_hq = tl.program_id(0), tl.program_id(1)
    t0, eos = chunk_span(i_c, ct_ptr, cu_ptr, T, NT, IS_VARLEN, BT)
    o_t = tl.arange(0, BT)
    t = t0 + o_t
    m_t = t < eos
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    Kc = tl.where(t0 < eos, K, 0)          # surplus chunk programs read no state
    row_q = t * HQ + i_hq
    m_tk = m_t[:, None] & m_k[None, :]
    if LEAN:
        for j in tl.static_range(GR):
            d_j = _wy_bwd_head(
                o_t, o_t, k_ptr, row_q, v_ptr, g_ptr, beta_ptr, tm_ptr, h_ptr, dvn_ptr, dge_ptr,
                dv_ptr, dbeta_ptr, dg_ptr, i_c, i_hq * GR + j, t, m_t, o_t, o_k, m_k, Kc, H, K, V,
                GATE, L2NORM, WF32, BT, BK, BV, DT, IEEE, True)
            if j == 0:
                b_dk = d_j
            else:
                b_dk += d_j
        b_dk += load_rows(dke_ptr, row_q, m_t, o_k, m_k, K)
        b_k, r_k = _k_unit_rows(k_ptr, row_q, m_t, o_k, m_k, K, L2NORM)
    else:
        b_k, r_k = _k_unit_rows(k_ptr, row_q, m_t, o_k, m_k, K, L2NORM)
        KK = mm(b_k, tl.trans(b_k), DT, IEEE)
        b_dk = load_rows(dke_ptr, row_q, m_t, o_k, m_k, K)
        GRR = H // HQ
        for j in range(GRR):
            b_dk += _wy_bwd_head(
                b_k, KK, k_ptr, row_q, v_ptr, g_ptr, beta_ptr, tm_ptr, h_ptr, dvn_ptr, dge_ptr,
                dv_ptr, dbeta_ptr, dg_ptr, i_c, i_hq * GRR + j, t, m_t, o_t, o_k, m_k, Kc, H, K,
                V, GATE, L2NORM, WF32, BT, BK, BV, DT, IEEE, False)
    if L2NORM:
        b_dk = r_k[:, None] * (b_dk - b_k * tl.sum(b_k * b_dk, axis=1)[:, None])
    tl.store(dk_ptr + row_q[:, None] * K + o_k[None, :], b_dk.to(dk_ptr.dtype.element_ty),
             mask=m_tk)


@triton.jit
def _rc_mask(m_r, o_c, N, EVEN: tl.constexpr, COLS_FIRST: tl.constexpr = False):
    """Mask of a [rows, cols] tile (COLS_FIRST: [cols, rows]) from the row mask `m_r` and the
    column offsets `o_c` < N; EVEN (every column in range): the row mask alone, broadcast (no
    per-element predicate tensor live in registers)."""
    if COLS_FIRST:
        m = m_r[None, :]
        if not EVEN:
            m = m & (o_c < N)[:, None]
    else:
        m = m_r[:, None]
        if not EVEN:
            m = m & (o_c < N)[None, :]
    return m


@triton.jit
def _wy_bwd_fast_kernel(
    # WY_BWD_FAST; the arguments of `_wy_bwd_kernel`, dke float32: this program's rows of it
    # hold partial sums of dk (and the running sum over the group's value heads)
    k_ptr, v_ptr, g_ptr, beta_ptr, tm_ptr, h_ptr, dvn_ptr, dke_ptr, dge_ptr,
    dk_ptr, dv_ptr, dbeta_ptr, dg_ptr, ct_ptr, cu_ptr,
    T, NT, H, HQ, K, V,
    GATE: tl.constexpr, L2NORM: tl.constexpr, WF32: tl.constexpr, IS_VARLEN: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr,
    GR: tl.constexpr, DVN16: tl.constexpr, H16: tl.constexpr, NSD: tl.constexpr,
    EVEN_K: tl.constexpr = False, EVEN_V: tl.constexpr = False, KS: tl.constexpr = 1,
    PARK: tl.constexpr = True,
):
    """Per (chunk, q/k head), for each value head of its group (X = diag(beta e^G r) k, Y =
    diag(beta) v, r the L2 norm's reciprocal or 1): dW = -dV' S^T, dT = dW X^T + dV' Y^T,
    dX = T^T dW, dY = T^T dV' (dv = beta dY), dA = -T^T dT T^T (strictly lower), then dk, dbeta,
    dg as `_wy_bwd_head`. k, v, h (16-bit) are exact dot operands: the float32 side of those
    products is split hi + lo (1 + WF32 pieces); T's products stay tf32 (`mm_wy`). EVEN_K
    (K == BK), EVEN_V (BV divides V): row masks only. Tile offsets are formed where used.
    KS > 1: dW = -dV' S^T, its products and dk in KS column blocks of K (dV' read again per
    block): [BT, BK / KS] float32 tiles live instead of [BT, BK]."""
    i_c, i_hq = tl.program_id(0), tl.program_id(1)
    t0, eos = chunk_span(i_c, ct_ptr, cu_ptr, T, NT, IS_VARLEN, BT)
    o_t = tl.arange(0, BT)
    m_t = (t0 + o_t) < eos
    o_k = tl.arange(0, BK)
    Kc = tl.where(t0 < eos, K, 0)          # surplus chunk programs read no state
    strict = o_t[:, None] > o_t[None, :]
    # int64 bases of the chunk's first row, int32 offsets inside the tiles
    kq0 = (t0 * HQ + i_hq) * K
    BKS: tl.constexpr = BK // KS
    for j in range(GR):
        i_h = i_hq * GR + j
        r0 = t0 * H + i_h
        b_beta = tl.load(beta_ptr + r0 + o_t * H, mask=m_t, other=0.).to(tl.float32)
        G = log_decay_cumsum(g_ptr, g_ptr, g_ptr, (t0 + o_t) * H + i_h, i_h, m_t, o_k, o_k < K,
                             K, GATE, False, BT)
        b_bg = b_beta * tl.exp2(G)
        # T^T loaded transposed (no dot consumes a transposed dot result)
        Tt = tl.load(tm_ptr + r0 * BT + ((o_t * H)[None, :] * BT + o_t[:, None]),
                     mask=m_t[None, :], other=0.)
        p_h = h_ptr + (i_c.to(tl.int64) * H + i_h) * K * V
        if KS == 1:
            dW = tl.zeros([BT, BK], dtype=tl.float32)
        dTu = tl.zeros([BT, BT], dtype=tl.float32)
        b_db = tl.zeros([BT], dtype=tl.float32)
        for i_v in range(tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            o_tv = (o_t * H)[:, None] * V + o_v[None, :]
            m_tv = _rc_mask(m_t, o_v, V, EVEN_V)
            b_dvn = tl.load(dvn_ptr + r0 * V + o_tv, mask=m_tv, other=0.)
            b_v = tl.load(v_ptr + r0 * V + o_tv, mask=m_tv, other=0.)
            b_vT = tl.load(v_ptr + r0 * V + ((o_t * H)[None, :] * V + o_v[:, None]),
                           mask=_rc_mask(m_t, o_v, V, EVEN_V, True), other=0.)
            if KS == 1:
                dW = _wyb_dw_step(dW, b_dvn, p_h, o_k, o_v, Kc, K, V, EVEN_K and EVEN_V, H16,
                                  NSD, WF32, DT, IEEE)
            dTu += mm_hilo(b_dvn.to(tl.float32), b_vT, NSD, DT, IEEE)        # dV' V^T
            if DVN16:
                dY = mm_hilo(Tt, b_dvn, 1 + WF32, DT, IEEE)                  # T^T dV'
            else:
                dY = mm_wy(Tt, b_dvn, WF32, DT, IEEE)
            tl.store(dv_ptr + r0 * V + o_tv, (dY * b_beta[:, None]).to(dv_ptr.dtype.element_ty),
                     mask=m_tv)
            b_db += tl.sum(dY * b_v.to(tl.float32), axis=1)
        if KS == 1:
            # k^T (16-bit) loaded here, not live through the V loop; r from its columns
            b_kT = tl.load(k_ptr + kq0 + ((o_t * HQ)[None, :] * K + o_k[:, None]),
                           mask=_rc_mask(m_t, o_k, K, EVEN_K, True), other=0.)
            if L2NORM:
                b_kTf = b_kT.to(tl.float32)
                r_k = 1. / tl.sqrt(tl.sum(b_kTf * b_kTf, axis=0) + 1e-6)
            else:
                r_k = tl.full([BT], 1., tl.float32)
            # dT = dV' Y^T + dW X^T on the strictly lower part (the only part dA's product reads)
            dT = tl.where(strict, dTu * b_beta[None, :]
                          + mm_hilo(dW, b_kT, 1 + WF32, DT, IEEE) * (b_bg * r_k)[None, :], 0.)
            dX = mm_wy(Tt, dW, WF32, DT, IEEE)
            o_qk = (o_t * HQ)[:, None] * K + o_k[None, :]
            m_tk = _rc_mask(m_t, o_k, K, EVEN_K)
            b_k = tl.load(k_ptr + kq0 + o_qk, mask=m_tk, other=0.)
            xk = tl.sum(dX * b_k.to(tl.float32), axis=1) * r_k               # dX . k^
            # dke + beta e^G dX; PARK: parked in the (float32, this program's) dke rows while
            # the [BT, BT] products run (no [BT, K] float32 tile live through them)
            b_dkp = dX * b_bg[:, None] + tl.load(dke_ptr + kq0 + o_qk, mask=m_tk, other=0.).to(
                tl.float32)
            if PARK:
                tl.store(dke_ptr + kq0 + o_qk, b_dkp.to(dke_ptr.dtype.element_ty), mask=m_tk)
            KK = mm(b_k, b_kT, DT, IEEE)
        else:
            # the norms over the whole K first, then per column block of K: dW_b = -dV' S_b^T,
            # dT += dW_b X_b^T, dX_b = T^T dW_b (parked with dke), xk += dX_b . k_b
            ss = tl.zeros([BT], dtype=tl.float32)
            KK = tl.zeros([BT, BT], dtype=tl.float32)
            for kb in tl.static_range(KS):
                o_kb = kb * BKS + tl.arange(0, BKS)
                b_kT = tl.load(k_ptr + kq0 + ((o_t * HQ)[None, :] * K + o_kb[:, None]),
                               mask=_rc_mask(m_t, o_kb, K, EVEN_K, True), other=0.)
                b_k = tl.load(k_ptr + kq0 + ((o_t * HQ)[:, None] * K + o_kb[None, :]),
                              mask=_rc_mask(m_t, o_kb, K, EVEN_K), other=0.)
                KK += mm(b_k, b_kT, DT, IEEE)
                if L2NORM:
                    b_kTf = b_kT.to(tl.float32)
                    ss += tl.sum(b_kTf * b_kTf, axis=0)
            if L2NORM:
                r_k = 1. / tl.sqrt(ss + 1e-6)
            else:
                r_k = tl.full([BT], 1., tl.float32)
            dT = dTu * b_beta[None, :]
            xk = tl.zeros([BT], dtype=tl.float32)
            for kb in tl.static_range(KS):
                o_kb = kb * BKS + tl.arange(0, BKS)
                dWb = tl.zeros([BT, BKS], dtype=tl.float32)
                for i_v in range(tl.cdiv(V, BV)):
                    o_v = i_v * BV + tl.arange(0, BV)
                    b_dvn = tl.load(dvn_ptr + r0 * V + ((o_t * H)[:, None] * V + o_v[None, :]),
                                    mask=_rc_mask(m_t, o_v, V, EVEN_V), other=0.)
                    dWb = _wyb_dw_step(dWb, b_dvn, p_h, o_kb, o_v, Kc, K, V, EVEN_K and EVEN_V,
                                       H16, NSD, WF32, DT, IEEE)
                b_kT = tl.load(k_ptr + kq0 + ((o_t * HQ)[None, :] * K + o_kb[:, None]),
                               mask=_rc_mask(m_t, o_kb, K, EVEN_K, True), other=0.)
                dT += mm_hilo(dWb, b_kT, 1 + WF32, DT, IEEE) * (b_bg * r_k)[None, :]
                dXb = mm_wy(Tt, dWb, WF32, DT, IEEE)
                o_qkb = (o_t * HQ)[:, None] * K + o_kb[None, :]
                m_tkb = _rc_mask(m_t, o_kb, K, EVEN_K)
                b_k = tl.load(k_ptr + kq0 + o_qkb, mask=m_tkb, other=0.)
                xk += tl.sum(dXb * b_k.to(tl.float32), axis=1)
                b_dk = dXb * b_bg[:, None] + tl.load(dke_ptr + kq0 + o_qkb, mask=m_tkb, other=0.)
                tl.store(dke_ptr + kq0 + o_qkb, b_dk, mask=m_tkb)
            xk = xk * r_k
            dT = tl.where(strict, dT, 0.)
        dA = -mm_wy(mm_wy(Tt, dT, WF32, DT, IEEE), Tt, WF32, DT, IEEE)
        dAE = tl.where(strict, dA * tl.exp2(tl.where(strict, G[:, None] - G[None, :],
                                                     float("-inf"))), 0.)
        P = dAE * KK * r_k[:, None] * r_k[None, :]                           # KK: k k^T

        Bm = dAE * b_beta[:, None]
        b_db += tl.sum(P, axis=1) + tl.exp2(G) * xk
        tl.store(dbeta_ptr + r0 + o_t * H, b_db, mask=m_t)
        if GATE == 1:
            Q = P * b_beta[:, None]
            dG = tl.sum(Q, axis=1) - tl.sum(Q, axis=0) + b_bg * xk
            dg = tl.sum(dG, axis=0) - tl.cumsum(dG, axis=0) + dG            # sum over s >= t
            dg += tl.load(dge_ptr + r0 + o_t * H, mask=m_t, other=0.)
            tl.store(dg_ptr + r0 + o_t * H, dg, mask=m_t)
        # d k^ = Bm k^ + Bm^T k^ + beta e^G dX (k^ = diag(r) k: r goes on Bm's columns / rows;
        # the second term as the transpose of k^T (diag(r) Bm), only in an elementwise sum);
        # the barrier orders the parked rows' store before their load (same layout: same thread)
        tl.debug_barrier()
        Bc = Bm * r_k[None, :]
        Br = Bm * r_k[:, None]
        if KS == 1:
            b_dk = (mm_hilo(Bc, b_k, 1 + WF32, DT, IEEE)
                    + tl.trans(mm_lohi(b_kT, Br, 1 + WF32, DT, IEEE)))
            if PARK:
                b_dk += tl.load(dke_ptr + kq0 + o_qk, mask=m_tk, other=0.).to(tl.float32)
            else:
                b_dk += b_dkp
            if GR > 1:
                # the running sum over the group's value heads stays in the float32 dke rows
                # (this program owns them)
                tl.store(dke_ptr + kq0 + o_qk, b_dk, mask=m_tk & (j < GR - 1))
                tl.debug_barrier()
            if L2NORM:
                b_kh = b_k.to(tl.float32) * r_k[:, None]
                b_dk = r_k[:, None] * (b_dk - b_kh * tl.sum(b_kh * b_dk, axis=1)[:, None])
            tl.store(dk_ptr + kq0 + o_qk, b_dk.to(dk_ptr.dtype.element_ty),
                     mask=m_tk & (j == GR - 1))
        else:
            # per column block; the L2 norm's backward needs k^ . dk^ over the whole row: the
            # blocks' sums go back to dke first, then a second pass finishes them
            kd = tl.zeros([BT], dtype=tl.float32)
            for kb in tl.static_range(KS):
                o_kb = kb * BKS + tl.arange(0, BKS)
                o_qkb = (o_t * HQ)[:, None] * K + o_kb[None, :]
                m_tkb = _rc_mask(m_t, o_kb, K, EVEN_K)
                b_k = tl.load(k_ptr + kq0 + o_qkb, mask=m_tkb, other=0.)
                b_kT = tl.load(k_ptr + kq0 + ((o_t * HQ)[None, :] * K + o_kb[:, None]),
                               mask=_rc_mask(m_t, o_kb, K, EVEN_K, True), other=0.)
                b_dk = (mm_hilo(Bc, b_k, 1 + WF32, DT, IEEE)
                        + tl.trans(mm_lohi(b_kT, Br, 1 + WF32, DT, IEEE))
                        + tl.load(dke_ptr + kq0 + o_qkb, mask=m_tkb, other=0.))
                if L2NORM:
                    kd += tl.sum(b_k.to(tl.float32) * b_dk, axis=1)
                    tl.store(dke_ptr + kq0 + o_qkb, b_dk, mask=m_tkb)
                else:
                    tl.store(dke_ptr + kq0 + o_qkb, b_dk, mask=m_tkb & (j < GR - 1))
                    tl.store(dk_ptr + kq0 + o_qkb, b_dk.to(dk_ptr.dtype.element_ty),
                             mask=m_tkb & (j == GR - 1))
            tl.debug_barrier()
            if L2NORM:
                kd = kd * r_k * r_k          # k^ (k^ . dk^) = k r^2 (k . dk^)
                for kb in tl.static_range(KS):
                    o_kb = kb * BKS + tl.arange(0, BKS)
                    o_qkb = (o_t * HQ)[:, None] * K + o_kb[None, :]
                    m_tkb = _rc_mask(m_t, o_kb, K, EVEN_K)
                    b_k = tl.load(k_ptr + kq0 + o_qkb, mask=m_tkb, other=0.).to(tl.float32)
                    b_dk = tl.load(dke_ptr + kq0 + o_qkb, mask=m_tkb, other=0.)
                    b_dk = r_k[:, None] * (b_dk - b_k * kd[:, None])
                    tl.store(dk_ptr + kq0 + o_qkb, b_dk.to(dk_ptr.dtype.element_ty),
                             mask=m_tkb & (j == GR - 1))
                tl.debug_barrier()


@triton.jit
def _wyb_dw_step(dW, b_dvn, p_h, o_k, o_v, Kc, K, V, EVEN: tl.constexpr, H16: tl.constexpr,
                 NSD: tl.constexpr, WF32: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr):
    """dW - dV'_v S_v^T for the columns o_k of S^T (h [K, V] of the chunk at p_h; V tile o_v)."""
    if EVEN:
        m_h = (o_v < Kc * V)[:, None]      # [BV, 1]: false only in surplus programs
    else:
        m_h = (o_k < Kc)[None, :] & (o_v < V)[:, None]
    b_hT = tl.load(p_h + (o_k[None, :] * V + o_v[:, None]), mask=m_h, other=0.)
    if H16:
        return dW - mm_hilo(b_dvn.to(tl.float32), b_hT, NSD, DT, IEEE)
    # float32 states (STATES_IN_INPUT_DTYPE off): tf32 as the default kernel
    return dW - mm_wy(b_dvn, b_hT, WF32, DT, IEEE)


# ---- launchers ---------------------------------------------------------------------------------

# launch cache: bind each compiled kernel once per specialisation (ssm_kernels/_launch.py)
_wy_fwd_kernel = fast_kernel(_wy_fwd_kernel)
_wu_kernel = fast_kernel(_wu_kernel)
_wy_fast_kernel = fast_kernel(_wy_fast_kernel)
_wy_bwd_kernel = fast_kernel(_wy_bwd_kernel)
_wy_bwd_fast_kernel = fast_kernel(_wy_bwd_fast_kernel)


def _plan(q, v, g, cu_seqlens):
    p = Plan(q, v, g, cu_seqlens, False)
    m = p.meta
    # the delta stages contract the whole K of the state: one K tile (BKF); the scans keep a
    # [K, BV] float32 state, so BV shrinks for K = 256
    p.BVs = max(16, min(m["BV"], 8192 // m["BKF"])) if STATE_BLOCK_V is None else STATE_BLOCK_V
    p.wdtype = torch.float32 if (WU_FLOAT32 or q.dtype == torch.float32) else q.dtype
    p.wf32 = (2 if WY_TF32X3 else 1) if p.wdtype == torch.float32 else 0
    p.warps = 8 if m["BKF"] >= 128 else 4
    # the speed knobs below act on 16-bit inputs only: float32 runs ieee dots (FMA loops), where
    # ptxas already assembles the scans at 32 registers, and LEAN's unrolled backward spilled
    # 15 KB there (the correctness path, not the fast one)
    fast = q.dtype != torch.float32
    p.lean, p.split = WY_LEAN and fast, WY_SPLIT and fast
    p.wy_fast = WY_FAST and fast
    p.lean_bwd = (WY_LEAN or WY_BWD_LEAN) and fast
    p.g16 = BWD_GRAD_16 and fast
    p.wy_bwd_fast = WY_BWD_FAST and fast
    # the fast WY backward parks partial sums (and a group's running sum) in dke: float32 there
    p.dke16 = p.g16 and BWD_DKE_16 and not p.wy_bwd_fast
    p.wy_warps = (WY_WARPS if fast else None) or p.warps
    p.state_warps = (STATE_WARPS if fast else None) or p.warps
    p.dqk_delta = DQK_DELTA and fast
    p.sg_delta = SG_DELTA and fast
    p.sg_fuse = p.sg_delta and SG_FUSE_DV
    p.sg_warps = (SG_WARPS if fast else None) or p.warps
    p.BVg = (SG_BLOCK_V if fast else None) or p.BVs
    p.sg_opts = {"maxnreg": SG_MAXNREG} if (fast and SG_MAXNREG) else {}
    p.dqk_opts = {"maxnreg": DQK_MAXNREG} if (fast and DQK_MAXNREG and not p.gate) else {}
    p.dqk_warps = (DQK_WARPS if fast else None) or p.warps
    p.BVq = (DQK_BLOCK_V if fast else None) or m["BV"]
    p.BVO = max(16, min(OUT_BLOCK_V, next_power_of_2(p.V))) if OUT_BLOCK_V else m["BV"]
    # the inverse in tf32 for 16-bit W, U (WF32 of the inverse alone)
    p.inv_f32 = 1 if (p.wf32 == 0 and WY_INVERSE_F32) else p.wf32
    # the scans' products with the running state (w S, w^T dV') in tf32 on the float32 state even
    # when w is stored in the input dtype
    p.scan_wf32 = 1 if (p.wf32 == 0 and SCAN_TF32) else p.wf32
    p.udtype = torch.float32 if U_FLOAT32 else p.wdtype
    p.wu_wf32 = 1 if (p.wf32 == 0 and WU_TF32_PRODUCTS) else p.wf32
    p.scan_t = SCAN_T and fast and not DELTA_FWD
    p.ks_x2 = SCAN_T_KS_X2 and p.scan_wf32 == 1 and fast
    p.scan_t_bwd = SCAN_T_BWD and p.wy_fast and not DELTA_FWD
    return p


def _wu_shapes(p, wu):
    """Shapes of w, u: wu 1 both, 2 w only (u empty), 0 neither (SCAN_T's forward)."""
    TOK = p.B * p.T
    return ((TOK, p.H, p.K) if wu else (0,)), ((TOK, p.H, p.V) if wu == 1 else (0,))


def _wu_buffers(p, k, ws=None, wu=1):
    if ws is not None:      # views of the call's workspace (`_workspace`)
        return common.poison(ws[0]), common.poison(ws[1])
    ws_, us_ = _wu_shapes(p, wu)
    return (common.poison(k.new_empty(ws_, dtype=p.wdtype)),
            common.poison(k.new_empty(us_, dtype=p.udtype)))


def _workspace(p, k, with_ht: bool, states: bool = True, wu: int = 1):
    """The temporaries of one forward (or the backward's recompute) in one allocation
    (common.workspace): w, u (`_wu_shapes`), (states) h, v_new and (with_ht: the backward, which
    drops them) the final states."""
    TOK = p.B * p.T
    ws_, us_ = _wu_shapes(p, wu)
    specs = ((ws_, p.wdtype), (us_, p.udtype))
    if states:
        specs += (((p.NCH, p.H, p.K, p.V), p.hdtype), ((TOK, p.H, p.V), k.dtype))
    if with_ht:
        specs += (((p.N, p.H, p.K, p.V), torch.float32),)
    return common.workspace(k, specs)


def _wy_fast(p, k, v, g, beta, l2, w, u, tm, store_t, load_t, wu=1):
    """WY_FAST: `_wy_fast_kernel` (T solved, stored when store_t; or read when load_t; W, U
    formed as `_wu_shapes` says)."""
    m = p.meta
    cu, _, ct = p.idx_args(w)
    # pieces of T in the W, U products: 1 (16-bit T, fla's), 2 (~16 mantissa bits, the tf32
    # setting), 3 (WY_TF32X3)
    nsplit = 1 + p.wu_wf32
    _wy_fast_kernel[(p.NCH, p.H)](
        k, v, _dummy(w) if g is None else g, beta, w, u, tm, ct, cu, p.T, p.NT, p.H, p.HQ, p.K,
        p.V, GATE=p.gate, L2NORM=l2, STORE_T=int(store_t), LOAD_T=load_t, INV_WF32=p.inv_f32,
        NSPLIT=nsplit, IS_VARLEN=p.varlen, BT=p.BT, LOG2BT=p.BT.bit_length() - 1, BK=m["BKF"],
        BV=max(16, min(WY_FAST_BV, next_power_of_2(p.V))) if WY_FAST_BV else m["BV"],
        DT=m["DT"], IEEE=m["IEEE"], LOOP=WY_FAST_LOOP, INV16=WY_FAST_INV16 and not load_t,
        WU=wu, num_warps=WY_FAST_WARPS, num_stages=WY_FAST_STAGES,
        **({"maxnreg": WY_FAST_MAXNREG} if WY_FAST_MAXNREG else {}))
    return w, u


def _wu(p, k, v, g, beta, l2, w, u, tm, wu=1):
    """W, U from the stored T (WY_SPLIT's second launch; the backward with a saved T); wu=2
    (WY_FAST only): W alone."""
    if p.wy_fast:
        return _wy_fast(p, k, v, g, beta, l2, w, u, tm, False, True, wu)
    m = p.meta
    cu, _, ct = p.idx_args(w)
    _wu_kernel[(p.NCH, p.H)](
        k, v, _dummy(w) if g is None else g, beta, w, u, tm, ct, cu, p.T, p.NT, p.H, p.HQ, p.K,
        p.V, GATE=p.gate, L2NORM=l2, WF32=p.wu_wf32, IS_VARLEN=p.varlen, BT=p.BT, BK=m["BKF"],
        BV=m["BV"], DT=m["DT"], IEEE=m["IEEE"], num_warps=4)
    return w, u


def _wy(p, k, v, g, beta, l2, store_t, ws=None, wu=1, tm=None):
    """(w, u, T). wu (`_wu_shapes`): 1 both; 0 (SCAN_T's forward) T only, stored, w and u empty;
    2 (SCAN_T_BWD's backward, WY_FAST only) w alone. tm: T's buffer (SAVE_STATES: a view of the
    saved buffer; store_t then), else allocated here."""
    m = p.meta
    TOK = p.B * p.T
    w, u = _wu_buffers(p, k, ws, wu)
    # STORE_T is a runtime flag and the dummy is float32 like Tm: the forward (no T) and the
    # backward's recompute (T kept) share one compiled kernel
    store_t = store_t or (p.split and not p.wy_fast) or not wu
    if tm is None:
        tm = k.new_empty((TOK, p.H, p.BT) if store_t else (1,), dtype=torch.float32)
    if p.wy_fast:
        # one launch (WY_SPLIT does not apply: the fast kernel has no register-heavy inverse)
        _wy_fast(p, k, v, g, beta, l2, w, u, tm, store_t, False, wu)
        return w, u, tm
    cu, _, ct = p.idx_args(w)
    d = _dummy(w)
    gg = d if g is None else g
    _wy_fwd_kernel[(p.NCH, p.H)](
        k, v, gg, beta, w, u, tm, ct, cu, p.T, p.NT, p.H, p.HQ, p.K, p.V,
        GATE=p.gate, L2NORM=l2, STORE_T=int(store_t), WF32=p.wu_wf32,
        IS_VARLEN=p.varlen, BT=p.BT, BK=m["BKF"], BV=m["BV"], DT=m["DT"], IEEE=m["IEEE"],
        INV_DOTS=WY_INVERSE_DOTS, INV_F32=p.inv_f32, LEAN=p.lean, WU=bool(wu) and not p.split,
        num_warps=p.wy_warps)
    if p.split and wu:
        _wu(p, k, v, g, beta, l2, w, u, tm)
    return w, u, tm


def wy_t_shape(q, v):
    """Shape of the saved T (SAVE_WY_INVERSE) for q [B, T, H, K], v [B, T, HV, V]."""
    B, T, _, K = q.shape
    return (B * T, v.shape[2], blocks(K, v.shape[3], 0, q.dtype)["BT"])


# the forward's state scan (and the backward's recompute of h, V') by the delta-only
# `fwd._delta_fwd_kernel` (bench/NOTES.md, "helper deltafwd7"): 0 the engine's `_state_kernel`
# (DELTA) + `_output_kernel`; 1 the delta-only scan storing h and V' as the engine's does (the
# output stage unchanged); 2 (forward only) the output formed inside that scan: no h, no V' in
# memory (the backward recomputes both; with 1 it does so by the delta-only scan too)
DELTA_FWD = 0
# its V tile, warps, software-pipeline stages (None: 2 for the scan with 16-bit W, else 1: sm_90
# bf16 K=V=128 BV=32: float32 W at 2 stages 127 KB of shared memory = 1 program per SM, at 1 stage
# 66 KB = 2; 16-bit W 78 KB at 2; fused (2) with 16-bit W 115-119 KB at 2, 45-49 KB at 1; at 4 warps
# <= 255 registers always fit 2 per SM); DELTA_FWD_WS_X2 (16-bit W with a tf32 scan product: SCAN_TF32): W S
# as two 16-bit dots against S = hi + lo instead of tf32
DELTA_FWD_BV = None        # None: 32; 16 fused at K > 128 (BV=32 spilled 268-772 B there)
DELTA_FWD_WARPS = None     # None: 4; 8 for the scan at K > 128 (4 spilled 56-280 B there)
DELTA_FWD_STAGES = None
DELTA_FWD_WS_X2 = False


# the state scan (forward, and the backward's recompute) by `state._delta_state_kernel` instead of
# the engine's `_state_kernel` DELTA branch (bench/NOTES.md, "helper deltastate8"): the same
# arithmetic (h, V', final state bitwise the default's) with the next chunk's loads issued before
# this chunk's two dependent dots: DSTATE_PREFETCH 1 k, u, g (w staged by the pipeliner:
# DSTATE_STAGES 2), 2 also w, 3 u and g only, 0 none (the engine's order); its V tile (None:
# STATE_BLOCK_V's), warps (None: STATE_WARPS's) and software-pipeline stages
DSTATE = False
DSTATE_PREFETCH = 1
DSTATE_BV = None
DSTATE_WARPS = None
DSTATE_STAGES = 2
# k^T loaded as the 16-bit dot operand, its L2 norm and decay as row scales of V' (not bitwise)
DSTATE_KT = False
# the forward's state scan reads the WY inverse T (float32 [TOK, HV, BT], what SAVE_WY_INVERSE
# keeps anyway), v and beta instead of W and U, and forms V' = T (diag(beta) v - diag(beta e^G)
# k^ S) itself (one more [BT, BT] x [BT, BV] tf32 dot per chunk step); the WY stage then writes T
# only (no W, U: B4 T4096 H16 K=V=128 bf16: WY stage 404 -> 136 MB, state scan 542 -> 408 MB
# unique, fla's count; bench/NOTES.md "helper delta9"). 16-bit inputs, DELTA_FWD=0; the scan is
# `state._delta_state_kernel` (with DSTATE's prefetch / tiles when DSTATE is on, else the
# engine's order and tiles). The backward is unchanged (W, U formed from T as before).
SCAN_T = False
# with SCAN_T (tf32 scan products): k S as two 16-bit dots of the raw k against S = hi + lo
# (~16 bits of S; tf32: 11) instead of one tf32 dot of a float32 k tile
SCAN_T_KS_X2 = True
# the backward's recompute of h, V' by SCAN_T's scan too (T, k, v, beta read; W formed alone for the
# state-gradient scan, no U: -134 MB written and -134 MB read at B4 T4096 H16 K=V=128 with float32
# U; h and V' then bitwise the SCAN_T forward's); 16-bit inputs with WY_FAST, DELTA_FWD=0
SCAN_T_BWD = False
# the forward (gradients needed, SAVE_WY_INVERSE on) keeps what its state scan wrote anyway for the
# backward, instead of the backward forming it again (bench/NOTES.md "helper deltabwd10"): 1 h
# [NCH, HV, K, V] (state dtype) and v_new [TOK, HV, V] (input dtype): the backward runs no state
# scan and forms W alone from the saved T (no U; WY_FAST, 16-bit inputs; else W, U as before);
# 2 also W ([TOK, HV, K], float32 with WU_FLOAT32; the default forward writes it anyway): no WY
# launch in the backward either (the SCAN_T forward forms no W: 1 there). No extra bytes move in
# the forward (the same stores, into a buffer that outlives the call); the cost is memory between
# the passes: B4 T4096 H16 K=V=128 bf16 +201 MB (1) / +335 MB (2) per layer over T's 67 MB.
# Gradients bitwise the recompute path's (the same kernels on the same inputs formed them). One
# float32 1-d buffer (T, h, v_new[, W] at 256-byte aligned offsets) is the registered forward's
# third output in place of T. Off with DELTA_FWD=2 (no h, v_new in memory).
SAVE_STATES = 0


def _delta_fwd_opts(p, fused):
    """(WS, BV, warps, stages) of `fwd._delta_fwd_kernel`: WS 2 (hi + lo 16-bit dots) for 16-bit W
    with the tf32 scan product."""
    x2 = DELTA_FWD_WS_X2 and p.scan_wf32 == 1 and p.wdtype != torch.float32
    stages = DELTA_FWD_STAGES or (1 if (fused or p.wdtype == torch.float32) else 2)
    big = p.meta["BKF"] > 128
    return (2 if x2 else p.scan_wf32, DELTA_FWD_BV or (16 if big and fused else 32),
            DELTA_FWD_WARPS or (8 if big and not fused else 4), stages)


def _states(p, k, w, u, g, h0, l2, ws=None, t_scan=None):
    """h [NCH, HV, K, V], v_new [TOK, HV, V] (input dtype), final states float32 (h, v_new and,
    when it has 5 views, the final states in the workspace ws). t_scan (SCAN_T): (T, v, beta),
    read by the scan in place of w, u (which are then unused)."""
    m = p.meta
    if ws is not None:
        h, vn = ws[2], common.poison(ws[3])
        ht = common.poison(ws[4] if len(ws) > 4 else
                           k.new_empty((p.N, p.H, p.K, p.V), dtype=torch.float32))
    else:
        h = k.new_empty((p.NCH, p.H, p.K, p.V), dtype=p.hdtype)
        ht = common.poison(k.new_empty((p.N, p.H, p.K, p.V), dtype=torch.float32))
        vn = common.poison(k.new_empty((p.B * p.T, p.H, p.V), dtype=k.dtype))
    if DELTA_FWD and t_scan is None:
        delta_fwd_scan(p, k, k, w, u, g, h0, h, vn, vn, ht, l2, 1.0, False,
                       *_delta_fwd_opts(p, False))
        return h, vn, ht
    cu, co, _ = p.idx_args(ht)
    d = _dummy(ht)
    if DSTATE or t_scan is not None:
        if DSTATE:
            bv = max(16, min(DSTATE_BV, next_power_of_2(p.V))) if DSTATE_BV else p.BVs
            opts = dict(PREFETCH=DSTATE_PREFETCH, KT=DSTATE_KT,
                        num_warps=DSTATE_WARPS or p.state_warps, num_stages=DSTATE_STAGES)
        else:   # SCAN_T alone: the engine's order, tile, warps and stages
            bv = p.BVs
            opts = dict(PREFETCH=0, KT=False, num_warps=p.state_warps,
                        num_stages=1 if m["IEEE"] == 1 else 2)
        if t_scan is not None:
            w, u, beta = t_scan     # T [TOK, HV, BT] f32 in w's place, v in u's
        else:
            beta = d
        _delta_state_kernel[(cdiv(p.V, bv), p.N * p.H)](
            k, w, u, d if g is None else g, beta, d if h0 is None else h0, h, vn, ht, cu, co,
            p.T, p.H, p.HQ, p.K, p.V, GATE=p.gate, HAS_H0=h0 is not None, IS_VARLEN=p.varlen,
            L2NORM=l2, WF32=p.scan_wf32, BT=p.BT, BK=m["BKF"], BV=bv, DT=m["DT"],
            IEEE=m["IEEE"], SCAN_T=t_scan is not None,
            KS_X2=t_scan is not None and getattr(p, "ks_x2", False), **opts)
        return h, vn, ht
    _state_kernel[(1, cdiv(p.V, p.BVs), p.N * p.H)](
        k, u, d if g is None else g, d, d, d if h0 is None else h0, h, ht, cu, co,
        p.T, p.H, p.HQ, p.K, p.V,
        GATE=p.gate, G_FROM_VS=False, HAS_VS=False, HAS_H0=h0 is not None, STORE_H=True,
        IS_VARLEN=p.varlen, BT=p.BT, BK=m["BKF"], BV=p.BVs, DT=m["DT"], IEEE=m["IEEE"],
        w_ptr=w, vn_ptr=vn, DELTA=True, L2NORM=l2, WF32=p.scan_wf32,
        num_warps=p.state_warps, num_stages=1 if m["IEEE"] == 1 else 2)
    return h, vn, ht


def _save_level(lowp: bool) -> int:
    """What SAVE_STATES keeps for inputs of that precision: 0 T only, 1 + h and v_new, 2 + W."""
    if not SAVE_STATES or DELTA_FWD == 2:
        return 0
    if SAVE_STATES >= 2 and not (SCAN_T and lowp and not DELTA_FWD):
        return 2
    return 1


_SAVE_ALIGN = 256


def _saved_specs(q, v, cu_seqlens, level: int) -> tuple:
    """((shape, dtype), ...) of the saved buffer's pieces: T, then (level >= 1) h, v_new, then
    (level 2) W; metadata only (the fake impl calls it)."""
    B, T, HQ, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    BT = blocks(K, V, 0, q.dtype)["BT"]
    TOK = B * T
    specs = (((TOK, HV, BT), torch.float32),)
    if level:
        N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        NCH = common.num_chunks(B, T, N, BT, cu_seqlens is not None)
        specs += (((NCH, HV, K, V), common.state_store_dtype(q.dtype)), ((TOK, HV, V), q.dtype))
    if level == 2:
        wd = torch.float32 if (WU_FLOAT32 or q.dtype == torch.float32) else q.dtype
        specs += (((TOK, HV, K), wd),)
    return specs


def _saved_offsets(specs, ends=False):
    """Byte offsets of the pieces and the buffer's float32 length (ends: and the pieces' end
    offsets)."""
    offs, stops, n = [], [], 0
    for shape, dt in specs:
        n = -(-n // _SAVE_ALIGN) * _SAVE_ALIGN
        offs.append(n)
        numel = 1
        for x in shape:
            numel *= x
        n += numel * dt.itemsize
        stops.append(n)
    return (offs, -(-n // 4), stops) if ends else (offs, -(-n // 4))


def saved_shape(q, v, cu_seqlens=None):
    """Shape of the registered forward's third output when gradients are needed (SAVE_WY_INVERSE):
    T's `wy_t_shape` with SAVE_STATES off, else the 1-d float32 buffer of `_saved_specs`."""
    lvl = _save_level(q.dtype != torch.float32)
    if not lvl:
        return wy_t_shape(q, v)
    return (_saved_offsets(_saved_specs(q, v, cu_seqlens, lvl))[1],)


def _saved_views(buf, specs):
    """Contiguous typed views of the saved buffer's pieces."""
    offs, _, ends = _saved_offsets(specs, True)
    raw = buf.view(torch.uint8)
    return [raw[a:b].view(dt).view(shape) for (shape, dt), a, b in zip(specs, offs, ends)]


def _zero_gaps(buf, specs):
    """Zero the alignment gaps between the pieces (none at the usual shapes: no launch), so the
    buffer holds no uninitialised bytes there (opcheck compares it). Packed batches: the slots of
    h past the real number of chunks (NCH is an upper bound) stay unwritten, as in the recompute
    path's h; nothing reads them."""
    offs, n, ends = _saved_offsets(specs, True)
    raw = buf.view(torch.uint8)
    for a, b in zip(ends, offs[1:] + [4 * n]):
        if b > a:
            raw[a:b].zero_()


def _saved_level_of(buf, q, v, cu_seqlens):
    """The level a saved buffer was written with (its length says), or None (T alone / wrong)."""
    if buf.dim() != 1 or buf.dtype != torch.float32:
        return None
    for lvl in (1, 2):
        if buf.numel() == _saved_offsets(_saved_specs(q, v, cu_seqlens, lvl))[1]:
            return lvl
    raise ValueError(f"chunk_delta_bwd: the saved forward buffer (SAVE_STATES) has "
                     f"{buf.numel()} float32 elements, which matches no layout of these inputs")


def chunk_delta_fwd(q, k, v, g, beta, h0, cu_seqlens, scale: float, l2: bool,
                    save_t: bool = False):
    """Forward. q, k [B, T, H, K]; v [B, T, HV, V]; g None or float32 [B, T, HV]; beta [B, T, HV];
    h0 None or float32 [N, HV, K, V]; contiguous. Returns (o [B, T, HV, V] in v's dtype, final
    states float32 [N, HV, K, V], T): T the WY inverse, float32 `wy_t_shape(q, v)`, with save_t
    (for `chunk_delta_bwd`; SAVE_STATES: the 1-d buffer of `saved_shape`), else an empty float32
    tensor."""
    p = _plan(q, v, g, cu_seqlens)
    m = p.meta
    wu = 0 if p.scan_t else 1
    lvl = _save_level(q.dtype != torch.float32) if save_t else 0
    if lvl:
        # SAVE_STATES: T, h, v_new (and W) in one buffer that the op returns for the backward
        saved = k.new_empty(_saved_offsets(_saved_specs(q, v, cu_seqlens, lvl))[1],
                            dtype=torch.float32)
        specs = _saved_specs(q, v, cu_seqlens, lvl)
        views = _saved_views(saved, specs)
        _zero_gaps(saved, specs)
        ws = _workspace(p, k, False, states=False, wu=wu)      # what dies with the call
        ws = [views[3] if lvl == 2 else ws[0], ws[1], views[1], views[2]]
        w, u, tm = _wy(p, k, v, g, beta, l2, True, ws, wu=wu, tm=views[0])
    else:
        # (DELTA_FWD 2: no h, no V' in memory; SCAN_T: no w, u)
        ws = _workspace(p, k, False, states=DELTA_FWD != 2, wu=wu)
        w, u, tm = _wy(p, k, v, g, beta, l2, save_t, ws, wu=wu)
    o = common.poison(torch.empty_like(v))
    if DELTA_FWD == 2:
        ht = common.poison(k.new_empty((p.N, p.H, p.K, p.V), dtype=torch.float32))
        delta_fwd_scan(p, q, k, w, u, g, h0, o, o, o, ht, l2, scale, True,
                       *_delta_fwd_opts(p, True))
        return o, ht, (tm if save_t else tm[:0])
    h, vn, ht = _states(p, k, w, u, g, h0, l2, ws, (tm, v, beta) if p.scan_t else None)
    cu, _, ct = p.idx_args(ht)
    d = _dummy(ht)
    _output_kernel[(cdiv(p.V, p.BVO), p.NCH, p.H)](
        q, k, vn, d if g is None else g, d, d, h, d, o, ct, cu, p.T, p.NT, p.H, p.HQ, p.K, p.V,
        float(scale), GATE=p.gate, G_FROM_VS=False, HAS_VS=False, IS_VARLEN=p.varlen,
        BT=p.BT, BV=p.BVO, DT=m["DT"], IEEE=m["IEEE"], L2NORM=l2,
        BK=max(16, min(OUT_BLOCK_K, m["BKF"])) if OUT_BLOCK_K else m["BK"], DECAY_O=OUT_DECAY_O and p.gate < 2, num_warps=OUT_WARPS or (4 if p.BVO <= 64 else 8),
        num_stages=1 if m["IEEE"] == 1 else (OUT_STAGES or 2))
    if lvl:
        return o, ht, saved
    return o, ht, (tm if save_t else tm[:0])   # a view: no allocation when T is not kept


def chunk_delta_bwd(q, k, v, g, beta, h0, cu_seqlens, scale: float, l2: bool, do, dht,
                    tm=None):
    """Backward of `chunk_delta_fwd`; do [B, T, HV, V]; dht None or float32 [N, HV, K, V]; tm
    None/empty (the WY stage is run again) or the forward's saved T (W, U formed from it), or
    SAVE_STATES's saved buffer (T, h, v_new[, W]: no state scan, W formed alone or saved).
    Returns (dq, dk in q's dtype, dv in v's dtype, dg float32 [B, T, HV] or None, dbeta float32
    [B, T, HV], dh0 float32 [N, HV, K, V])."""
    p = _plan(q, v, g, cu_seqlens)
    m = p.meta
    TOK = p.B * p.T
    wub = 2 if p.scan_t_bwd else 1      # W alone (SCAN_T_BWD), or W and U
    lvl = _saved_level_of(tm, q, v, cu_seqlens) if (tm is not None and tm.numel()) else None
    if lvl:
        # SAVE_STATES: h, v_new (and W) as the forward wrote them; no state scan here
        views = _saved_views(tm, _saved_specs(q, v, cu_seqlens, lvl))
        tm, h, vn = views[0], views[1], views[2]
        if lvl == 2:
            w = views[3]
        else:   # W alone from the saved T (WY_FAST; the other kernel forms U too)
            wo = 2 if p.wy_fast else 1
            w, _ = _wu(p, k, v, g, beta, l2, *_wu_buffers(p, k, None, wo), tm, wu=wo)
    elif tm is not None and tm.numel():
        if (tuple(tm.shape) != (TOK, p.H, p.BT) or tm.dtype != torch.float32
                or not tm.is_contiguous()):
            raise ValueError(f"chunk_delta_bwd: the saved WY inverse must be a contiguous float32 "
                             f"{(TOK, p.H, p.BT)} tensor, got {tm.dtype} {tuple(tm.shape)}")
        # the forward's T (bitwise what the recompute would form: same kernel, same inputs)
        ws = _workspace(p, k, True, wu=wub)
        w, u = _wu(p, k, v, g, beta, l2, *_wu_buffers(p, k, ws), tm, wu=wub)
    else:
        ws = _workspace(p, k, True, wu=wub)
        w, u, tm = _wy(p, k, v, g, beta, l2, True, ws, wu=wub)
    if not lvl:
        # SCAN_T_BWD: h, V' by the scan from T, v, beta (u not formed)
        h, vn, _ = _states(p, k, w, u, g, h0, l2, ws, (tm, v, beta) if p.scan_t_bwd else None)
    cu, co, ct = p.idx_args(do)
    d = _dummy(do)
    gg = d if g is None else g
    f32 = dict(dtype=torch.float32)
    kw = dict(GATE=p.gate, G_FROM_VS=False, IS_VARLEN=p.varlen, BT=p.BT, DT=m["DT"],
              IEEE=m["IEEE"])
    # intra-chunk part of dV' (the output's), then the reverse scan with the delta term
    dvl = d
    if not p.sg_fuse:
        dvl = common.poison(do.new_empty((TOK, p.H, p.V), **f32))
        _dv_kernel[(cdiv(p.V, p.BVO), p.NCH, p.H)](
            q, k, vn, do, gg, d, d, d, d, dvl, d, ct, cu, p.T, p.NT, p.H, p.HQ, p.K, p.V,
            float(scale), HAS_VS=False, BK=m["BK"], BV=p.BVO, HAS_DH=False, L2NORM=l2,
            num_warps=4 if p.BVO <= 64 else 8, **kw)
    dh = q.new_empty((p.NCH, p.H, p.K, p.V), dtype=p.hdtype)
    dh0 = common.poison(q.new_empty((p.N, p.H, p.K, p.V), **f32))
    dvn = common.poison(do.new_empty((TOK, p.H, p.V), dtype=q.dtype if p.g16 else p.wdtype))
    if p.sg_delta:
        _state_grad_delta_kernel[(cdiv(p.V, p.BVg), p.N * p.H)](
            q, k, w, do, gg, dvl, d if dht is None else dht, dh, dh0, dvn, cu, co,
            p.T, p.H, p.HQ, p.K, p.V, float(scale), GATE=p.gate, HAS_DHT=dht is not None,
            IS_VARLEN=p.varlen, BT=p.BT, BK=m["BKF"], BV=p.BVg, DT=m["DT"], IEEE=m["IEEE"],
            L2NORM=l2, WF32=p.scan_wf32, FUSE_DV=p.sg_fuse,
            KDS_X2=SG_KDS_X2 and q.dtype == torch.bfloat16 and p.scan_wf32 == 1,
            num_warps=p.sg_warps, num_stages=SG_STAGES,
            **p.sg_opts)
    else:
        _state_grad_kernel[(1, cdiv(p.V, p.BVs), p.N * p.H)](
            q, do, gg, d, d, d if dht is None else dht, dh, dh0, cu, co,
            p.T, p.H, p.HQ, p.K, p.V, float(scale), HAS_DHT=dht is not None, BK=m["BKF"],
            BV=p.BVs, k_ptr=k, w_ptr=w, dvl_ptr=dvl, dvn_ptr=dvn, DELTA=True, L2NORM=l2,
            WF32=p.scan_wf32, num_warps=p.warps,
            num_stages=1 if m["IEEE"] == 1 else 2, **kw)   # 3 stages: 262 KB smem at BT=64
    # dq (final), dk of the normalised k and dg through the output and state terms (v := V')
    dq = common.poison(torch.empty_like(q))
    dke = common.poison(q.new_empty(q.shape, dtype=q.dtype if p.dke16 else torch.float32))
    dge = common.poison(q.new_empty(v.shape[:3], **f32)) if g is not None else d
    if p.dqk_delta:
        _dqk_delta_kernel[(p.NCH, p.HQ)](
            q, k, vn, do, gg, h, dh, dq, dke, dge, ct, cu, p.T, p.NT, p.H, p.HQ, p.K, p.V,
            float(scale), GATE=p.gate, L2NORM=l2, IS_VARLEN=p.varlen, BT=p.BT, BK=m["BKF"],
            BV=p.BVq, DT=m["DT"], IEEE=m["IEEE"], GR=p.H // p.HQ, num_warps=p.dqk_warps,
            num_stages=DQK_STAGES, **p.dqk_opts)
    else:
        _dqk_kernel[(p.NCH, p.HQ)](
            q, k, vn, do, gg, d, d, h, dh, dq, dke, dge, ct, cu,
            p.T, p.NT, p.H, p.HQ, p.K, p.V, float(scale), HAS_VS=False, SUB=m["SUB"],
            BK=m["BKF"], BV=m["BV"], L2NORM=l2, DG_F32=True,
            num_warps=8 if m["BKF"] >= 128 else 4,
            num_stages=1 if m["IEEE"] == 1 else 3, **kw)   # fp32, K=256: 360 KB smem at 3 stages
    # the WY stage's backward: dk, dv, dbeta, dg
    dk, dv, dg, dbeta = _wy_backward(p, k, v, g, beta, tm, h, dvn, dke, dge, l2)
    return dq, dk, dv, dg, dbeta, dh0


def _wy_backward(p, k, v, g, beta, tm, h, dvn, dke, dge, l2):
    """The WY stage's backward (`_wy_bwd_kernel`, or `_wy_bwd_fast_kernel` under WY_BWD_FAST,
    which also writes partial sums into dke): (dk, dv, dg or None, dbeta)."""
    m = p.meta
    cu, _, ct = p.idx_args(dvn)
    d = _dummy(dvn)
    gg = d if g is None else g
    f32 = dict(dtype=torch.float32)
    dk = common.poison(torch.empty_like(k))
    dv = common.poison(torch.empty_like(v))
    dbeta = common.poison(k.new_empty(v.shape[:3], **f32))
    dg = common.poison(k.new_empty(v.shape[:3], **f32)) if g is not None else None
    if p.wy_bwd_fast:
        wf = min(p.wf32, 1)
        bv = max(16, min(WY_BWD_FAST_BV or 32, next_power_of_2(p.V)))
        _wy_bwd_fast_kernel[(p.NCH, p.HQ)](
            k, v, gg, beta, tm, h, dvn, dke, dge, dk, dv, dbeta, d if dg is None else dg, ct, cu,
            p.T, p.NT, p.H, p.HQ, p.K, p.V,
            GATE=p.gate, L2NORM=l2, WF32=wf, IS_VARLEN=p.varlen, BT=p.BT, BK=m["BKF"],
            BV=bv, DT=m["DT"],
            IEEE=m["IEEE"], GR=p.H // p.HQ, DVN16=dvn.dtype != torch.float32,
            H16=h.dtype != torch.float32,
            # pieces of dV' in its products with 16-bit operands: 2 (float32 dV', tf32 setting)
            NSD=1 if dvn.dtype != torch.float32 else 1 + wf,
            EVEN_K=p.K == m["BKF"], EVEN_V=p.V % bv == 0,
            KS=max(1, min(WY_BWD_FAST_KSPLIT, m["BKF"] // 16)), PARK=WY_BWD_FAST_PARK,
            num_warps=WY_BWD_FAST_WARPS, num_stages=WY_BWD_FAST_STAGES,
            **({"maxnreg": WY_BWD_FAST_MAXNREG} if WY_BWD_FAST_MAXNREG else {}))
        return dk, dv, dg, dbeta
    _wy_bwd_kernel[(p.NCH, p.HQ)](
        k, v, gg, beta, tm, h, dvn, dke, dge, dk, dv, dbeta, d if dg is None else dg, ct, cu,
        p.T, p.NT, p.H, p.HQ, p.K, p.V,
        GATE=p.gate, L2NORM=l2, WF32=min(p.wf32, 1), IS_VARLEN=p.varlen, BT=p.BT,
        BK=m["BKF"], BV=m["BV"], DT=m["DT"], IEEE=m["IEEE"], LEAN=p.lean_bwd,
        GR=p.H // p.HQ if p.lean_bwd else 1, num_warps=p.warps,
        num_stages=1)   # 3 stages of the V loops: 262 KB of shared memory at BT=64 (> 227 KB)
    return dk, dv, dg, dbeta
