"""GPU check + benchmark of the chunked WY delta rule (issue 12): `python bench/gpu_delta.py`.

1. Correctness at a real size: chunk_gated_delta_rule and chunk_delta_rule forward + every
   gradient (q, k, v, g, beta, initial_state) against the float64 chunked WY reference
   (`delta_rule_chunk_ref`, itself tested against the recurrence) on the GPU, bf16 inputs,
   B2 T2048 H4 K=V=128 with the in-kernel L2 norm, plus one varlen batch with GVA (HV = 2H);
   judged with the repo's rule (error <= 2x the error of the same reference fed the bf16 inputs
   + floor; dg relative to max(|dg|, |q * dq|)) and a bitwise repeat of the backward.
2. Timing (triton.testing.do_bench median) of fwd and fwd+bwd at B4 T4096 H=HV=16 K=V=128 bf16
   (and the GVA shape B1 T32768 H4 HV16 while the time budget allows), side by side with
   flash-linear-attention (fla.ops.gated_delta_rule / fla.ops.delta_rule, importable via
   PYTHONPATH, each in try/except). The first call (compile) of each of our ops is timed too.
3. Stages (main shape, gated): our forward's stages timed one by one (WY, state scan, output by
   difference) with their bytes and FLOPs (achieved GB/s, TFLOP/s), and every CUDA kernel of our
   fwd+bwd and of fla's fwd (fwd+bwd where it runs) from torch.profiler: fla's stage structure
   (kkt, solve_tril, recompute_w_u, fwd_h, fwd_o) next to ours.
4. Variants (env VARIANTS, default `DEFAULT_VARIANTS`): knob settings of delta_rule/chunk.py, each
   checked (gated, B1 T1024 H2 HV4, l2norm, bf16, the same rule) then timed fwd / fwd+bwd with
   its forward stages. VARIANTS="name:KNOB=VAL,KNOB=VAL;name2:..." (values Python literals), or
   VARIANTS=@bwd (BWD_VARIANTS: the backward's knobs) / @fwd / @savet (SAVE_WY_VARIANTS: the
   forward's WY inverse kept for the backward) / @wyfast (WYFAST_VARIANTS: the WY stage by
   `_wy_fast_kernel`) / @wybwd (WYBWD_VARIANTS: the WY backward by `_wy_bwd_fast_kernel`,
   defaults first) / @deltafwd (DELTA_FWD_VARIANTS: the delta-only forward scan, fwd.py) /
   @deltastate (DSTATE_VARIANTS: the state scan with prefetched loads, state.py; @deltastate4
   its 4-warp settings, one process each: bench/gpu_dstate8.sh) / @deltaout (DELTA_OUT_VARIANTS:
   the output stage's decay-on-o form, V tile 128, the WY stage's register cap) / @scant
   (SCANT_VARIANTS: the scan from T, k, v, beta; @scant4 its 4-warp settings, one process each:
   bench/gpu_scant9.sh) / @savestates (SAVE_STATES_VARIANTS: the forward's h, v_new, W kept for
   the backward) /
   @defaults (the knobs as they are), or a ','-list of groups and
   variants mixed by ';' ("@defaults,@savet;lean4:WY_LEAN=True"); VARIANT_EXTRA="ungated,profile"
   (what else each variant runs; see VARIANT_EXTRA below).
5. wybwd (only when named in STEPS): the WY backward kernel alone (`chunk._wy_backward`) under
   WYBWD_STAGE_SETTINGS (the default = WY_BWD_LEAN, session 6's kernel, WY_BWD_FAST and its warps /
   K-split / V tile / stages / PARK).
Env: STEPS (default "check,time,stages,variants"), QUICK=1 (no peers, first shape only), GVA=0
(the main shape only, with the peers),
BUDGET_S (default 190: later steps are skipped past it, the table is always printed).
Prints the table last; writes CSV rows to $OUT/gpu_delta.csv when $OUT is set.
"""
from __future__ import annotations

import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

import ssm_kernels as sk  # noqa: E402
from ssm_kernels.delta_rule import interface as _delta_interface  # noqa: E402

_delta_interface.CHUNKED_WY = True   # this script checks and times the chunked WY path
from ssm_kernels.delta_rule import chunk as wy  # noqa: E402
from ssm_kernels.delta_rule.reference import delta_rule_chunk_ref  # noqa: E402
from ssm_kernels.testing import bound_for, rel_err  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# the chunk engine's GPU script's helpers: autograd of a loss on the outputs, and the
# do_bench timings of fwd, fwd+bwd and the first call
from gpu_chunk import first_call, grads_of, print_table, time_fwd, time_fwd_bwd  # noqa: E402

DEV = "cuda"
BF = torch.bfloat16
COPY_GBS = 4270.0          # H200 copy bandwidth (DESIGN.md), for the byte floor
ROWS = []                  # (section, case, impl, mode, ms, note)
T0 = time.time()
BUDGET_S = float(os.environ.get("BUDGET_S", "190"))
KDEV = "CUDA"             # kernel_profile: events of this device type (tests: CPU)
STEPS = os.environ.get("STEPS", "check,time,stages,variants").split(",")
# knob settings of ssm_kernels/delta_rule/chunk.py A/B'd against the defaults (bench/NOTES.md,
# "Delta rule: where the forward's time goes")
DEFAULT_VARIANTS = (   # most telling first: the budget may cut the tail
    "split-bf16st-ov128:WY_SPLIT=True,WY_LEAN=True,WY_WARPS=4,WU_FLOAT32=False,"
    "WU_TF32_PRODUCTS=True,SCAN_TF32=True,OUT_BLOCK_V=128;"
    "split-flaprec-sw4-ov128:WY_SPLIT=True,WY_LEAN=True,WY_WARPS=4,WU_FLOAT32=False,"
    "STATE_WARPS=4,OUT_BLOCK_V=128;"
    "split:WY_SPLIT=True,WY_LEAN=True,WY_WARPS=4;"
    "lean4:WY_LEAN=True,WY_WARPS=4;"
    "lean8:WY_LEAN=True;"
    "split-bf16st:WY_SPLIT=True,WY_LEAN=True,WY_WARPS=4,WU_FLOAT32=False,WU_TF32_PRODUCTS=True,"
    "SCAN_TF32=True;"
    "split-bf16st-u32:WY_SPLIT=True,WY_LEAN=True,WY_WARPS=4,WU_FLOAT32=False,"
    "WU_TF32_PRODUCTS=True,SCAN_TF32=True,U_FLOAT32=True;"
    "split-flaprec:WY_SPLIT=True,WY_LEAN=True,WY_WARPS=4,WU_FLOAT32=False;"
    "inv-dots:WY_INVERSE_DOTS=True")
# the backward's delta-only kernels (bench/NOTES.md, "Delta rule backward (issue 12), helper
# deltabwd"): VARIANTS=@bwd; each variant's fwd+bwd kernels are profiled (VARIANT_EXTRA)
BWD_VARIANTS = (   # most telling first: the budget may cut the tail
    "bwd-all:DQK_DELTA=True,SG_DELTA=True,SG_FUSE_DV=True,SG_KDS_X2=True,DQK_MAXNREG=128,"
    "DQK_STAGES=2,WY_BWD_LEAN=True;"
    "bwd-all-savet:DQK_DELTA=True,SG_DELTA=True,SG_FUSE_DV=True,SG_KDS_X2=True,DQK_MAXNREG=128,"
    "DQK_STAGES=2,WY_BWD_LEAN=True,SAVE_WY_INVERSE=True;"
    "bwd-all-split-bf16st-ov128:DQK_DELTA=True,SG_DELTA=True,SG_FUSE_DV=True,SG_KDS_X2=True,"
    "DQK_MAXNREG=128,DQK_STAGES=2,BWD_GRAD_16=True,WY_SPLIT=True,WY_LEAN=True,WY_WARPS=4,"
    "WU_FLOAT32=False,WU_TF32_PRODUCTS=True,SCAN_TF32=True,OUT_BLOCK_V=128;"
    "dqk:DQK_DELTA=True;"
    "sg-fuse-x2:SG_DELTA=True,SG_FUSE_DV=True,SG_KDS_X2=True;"
    "wybwd-lean:WY_BWD_LEAN=True;"
    "sg-fuse:SG_DELTA=True,SG_FUSE_DV=True;"
    "sg:SG_DELTA=True;"
    "dqk-r128:DQK_DELTA=True,DQK_MAXNREG=128,DQK_STAGES=2;"
    "bwd-all-g16:DQK_DELTA=True,SG_DELTA=True,SG_FUSE_DV=True,SG_KDS_X2=True,DQK_MAXNREG=128,"
    "DQK_STAGES=2,WY_BWD_LEAN=True,BWD_GRAD_16=True")
# the forward's WY inverse T kept for the backward (SAVE_WY_INVERSE; bench/NOTES.md, "deltaA5"):
# VARIANTS=@savet; A/B against the defaults (the "time" step) and against bwd-all
SAVE_WY_VARIANTS = (
    "savet:SAVE_WY_INVERSE=True;"
    "bwd-all:DQK_DELTA=True,SG_DELTA=True,SG_FUSE_DV=True,SG_KDS_X2=True,DQK_MAXNREG=128,"
    "DQK_STAGES=2,WY_BWD_LEAN=True;"
    "bwd-all-savet:DQK_DELTA=True,SG_DELTA=True,SG_FUSE_DV=True,SG_KDS_X2=True,DQK_MAXNREG=128,"
    "DQK_STAGES=2,WY_BWD_LEAN=True,SAVE_WY_INVERSE=True")
# the WY stage by `_wy_fast_kernel` (WY_FAST; bench/NOTES.md, "helper deltawy6"): VARIANTS=@wyfast;
# A/B against the defaults' stage rows ("stages" step): the "wy" stage row is the number to read
WYFAST_VARIANTS = (   # most telling first: the budget may cut the tail
    "wyfast:WY_FAST=True;"
    "wyfast-r168:WY_FAST=True,WY_FAST_MAXNREG=168;"
    "split:WY_SPLIT=True,WY_LEAN=True,WY_WARPS=4;"
    "wyfast-savet:WY_FAST=True,SAVE_WY_INVERSE=True;"
    "wyfast-bwd-all-savet:WY_FAST=True,SAVE_WY_INVERSE=True,DQK_DELTA=True,SG_DELTA=True,"
    "SG_FUSE_DV=True,SG_KDS_X2=True,DQK_MAXNREG=128,DQK_STAGES=2,WY_BWD_LEAN=True;"
    "wyfast-bf16st-ov128:WY_FAST=True,WU_FLOAT32=False,WU_TF32_PRODUCTS=True,SCAN_TF32=True,"
    "OUT_BLOCK_V=128;"
    "wyfast-inv16:WY_FAST=True,WY_FAST_INV16=True;"
    "wyfast-loop:WY_FAST=True,WY_FAST_LOOP=True;"
    "wyfast-w8:WY_FAST=True,WY_FAST_WARPS=8")
# the WY backward by `_wy_bwd_fast_kernel` (WY_BWD_FAST; bench/NOTES.md, "helper deltabwd7"):
# VARIANTS=@wybwd with VARIANT_EXTRA=ungated,profile: the defaults' kernel profile first (the
# baseline `_wy_bwd_kernel` row in the same call), then each variant's check, its dk/dv/dg/dbeta
# against the same knobs with WY_BWD_FAST off (fast_vs_default), timings and the
# `_wy_bwd_fast_kernel` row of its profile
WYBWD_VARIANTS = (   # most telling first: the budget may cut the tail
    "defaults:;"
    "wybwd-fast:WY_BWD_FAST=True;"
    "wybwd-fast-w4:WY_BWD_FAST=True,WY_BWD_FAST_WARPS=4,WY_BWD_FAST_STAGES=1;"
    "wybwd-fast-ks2:WY_BWD_FAST=True,WY_BWD_FAST_KSPLIT=2;"
    "wybwd-old:WY_BWD_LEAN=False;"
    "wybwd-fast-bv64:WY_BWD_FAST=True,WY_BWD_FAST_BV=64")
# the delta-only forward scan (DELTA_FWD; bench/NOTES.md, "helper deltafwd7"): VARIANTS=@deltafwd;
# every variant on main's session-7 defaults (WY_FAST, SAVE_WY_INVERSE, the delta-only backward);
# "base" (the defaults) gives the same machine's baseline stage rows; read the "states" row
# (DELTA_FWD=1) and "states+output" (DELTA_FWD=2: one fused kernel) against base's states + output
DELTA_FWD_VARIANTS = (   # most telling first: the budget may cut the tail
    "base:;"
    # 8 warps first: no spills in Triton 3.6's compile; the 4-warp settings (dfwd2, dfwd1) died with
    # an illegal address on the H100 (session 8; bench/gpu_dfwd8.py runs each in its own process)
    "dfwd1-w8:DELTA_FWD=1,DELTA_FWD_WARPS=8;"
    "dfwd2-w8:DELTA_FWD=2,DELTA_FWD_WARPS=8;"
    "dfwd2:DELTA_FWD=2;"
    "dfwd1:DELTA_FWD=1;"
    "dfwd2-bf16st-x2:DELTA_FWD=2,WU_FLOAT32=False,WU_TF32_PRODUCTS=True,SCAN_TF32=True,"
    "DELTA_FWD_WS_X2=True;"
    "dfwd1-bf16st-x2:DELTA_FWD=1,WU_FLOAT32=False,WU_TF32_PRODUCTS=True,SCAN_TF32=True,"
    "DELTA_FWD_WS_X2=True,OUT_BLOCK_V=128;"
    "dfwd2-flaprec:DELTA_FWD=2,WU_FLOAT32=False;"
    "dfwd2-s2:DELTA_FWD=2,DELTA_FWD_STAGES=2;"
    "dfwd1-s2:DELTA_FWD=1,DELTA_FWD_STAGES=2;"
    "dfwd1-bv64w8:DELTA_FWD=1,DELTA_FWD_BV=64,DELTA_FWD_WARPS=8")
# the state scan by `state._delta_state_kernel` (DSTATE; bench/NOTES.md, "helper deltastate8"):
# VARIANTS=@deltastate with VARIANT_EXTRA=stages; "base" gives the same machine's stage rows; read
# each variant's "states" row against base's (0.327 in session 8) and fla's fwd_h (0.142). Each
# DSTATE variant's o, S and gradients are also compared with DSTATE off on the same inputs
# (dstate_vs_default: bitwise expected unless DSTATE_KT or a precision knob is set)
DSTATE_VARIANTS = (   # most telling first: the budget may cut the tail (sm_90 Triton 3.6 compile:
    # registers, spill B, shared KB, programs per SM at B4 H16 K=V=128 gated l2); 8 warps, BV 64:
    # the default's wgmma shapes (m64n32k8 tf32, m64n64k16 bf16)
    "base:;"                                                             # 255, 176, 148 KB, 1
    "dstate:DSTATE=True;"                                                # 255, 408, 115 KB, 1
    "dstate-pf0:DSTATE=True,DSTATE_PREFETCH=0;"                          # 255, 168, 148 KB, 1
    "dstate-kt:DSTATE=True,DSTATE_KT=True;"                              # 255, 440, 131 KB, 1
    "dstate-pf3:DSTATE=True,DSTATE_PREFETCH=3;"                          # 255, 260, 131 KB, 1
    "dstate-pf2:DSTATE=True,DSTATE_PREFETCH=2,DSTATE_STAGES=1;"          # 255, 540, 82 KB, 1
    # fla's precision (w, u stored bf16, W S on the bf16-rounded state): not our default's
    "flaprec-dstate:WU_FLOAT32=False,DSTATE=True")                       # 255, 60, 66 KB, 1
# 4 warps, BV 32 (256 programs, 2 per SM): their K^T V' is a bf16 m64n32k16 with an N-major B,
# the pattern helper dfwd8 suspects in DELTA_FWD's illegal address on Triton 3.6 (unverified):
# run each in its own process (bench/gpu_dstate8.sh) so a crash loses only itself
DSTATE4_VARIANTS = (
    "dstate-pf3-bv32w4:DSTATE=True,DSTATE_PREFETCH=3,DSTATE_BV=32,DSTATE_WARPS=4;"  # 255, 0, 102, 2
    "dstate-bv32w4-pf0:DSTATE=True,DSTATE_BV=32,DSTATE_WARPS=4,DSTATE_PREFETCH=0;"  # 255, 0, 111, 2
    "sbv32w4:STATE_BLOCK_V=32,STATE_WARPS=4;"                            # 255, 44, 111 KB, 2
    "dstate-kt-pf3-bv32w4:DSTATE=True,DSTATE_KT=True,DSTATE_PREFETCH=3,DSTATE_BV=32,"
    "DSTATE_WARPS=4;"                                                    # 255, 140, 102 KB, 2
    "flaprec-dstate-kt-pf3-bv32w4:WU_FLOAT32=False,DSTATE=True,DSTATE_KT=True,DSTATE_PREFETCH=3,"
    "DSTATE_BV=32,DSTATE_WARPS=4;"                                       # 238, 0, 61 KB, 2
    "dstate-bv32w4:DSTATE=True,DSTATE_BV=32,DSTATE_WARPS=4")             # 255, 296, 86 KB, 2
# the output stage in the decay-on-o form and the WY stage's register cap (bench/NOTES.md, "helper
# deltaout8"): VARIANTS=@deltaout with VARIANT_EXTRA=stages; read each variant's "output" and "wy"
# rows against base's (session 8: 0.194 / 0.228; fla fwd_o 0.154, kkt+solve+w_u 0.206). Variants
# with OUT_DECAY_O are also compared with it off on the same inputs (out_vs_default: S and every
# gradient bitwise, o within ~1e-3 relative: the q h term loses one rounding)
DELTA_OUT_VARIANTS = (   # sm_90 Triton 3.6 (gated, no L2 / L2): output regs, spill, shared KB
    "base:;"                                                             # 170/-, 0, 40 (w4)
    "outd-bv128:OUT_DECAY_O=True,OUT_BLOCK_V=128;"                       # 115/121, 0, 64 (w8)
    "outd-bv128-r168:OUT_DECAY_O=True,OUT_BLOCK_V=128,WY_FAST_MAXNREG=168;"  # wy 168, 0 (3/SM)
    "outd:OUT_DECAY_O=True;"                                             # 139/177, 0, 48 (w4)
    "bv128:OUT_BLOCK_V=128;"                                             # 121/162, 0, 56 (w8)
    "r168:WY_FAST_MAXNREG=168;"                                          # session 7: fwd -0.028
    "outd-bv128-s1:OUT_DECAY_O=True,OUT_BLOCK_V=128,OUT_STAGES=1;"       # 126/142, 0, 32 (w8)
    "outd-bv128-w4:OUT_DECAY_O=True,OUT_BLOCK_V=128,OUT_WARPS=4;"        # 196/242, 0, 64 (w4)
    "outd-bv128-bk128-s1:OUT_DECAY_O=True,OUT_BLOCK_V=128,OUT_BLOCK_K=128,OUT_STAGES=1;"  # 170, 64
    # fla's precision (w, u stored bf16; not our default's): how far the WY stage's bytes go
    "flaprec-outd-bv128-r168:WU_FLOAT32=False,OUT_DECAY_O=True,OUT_BLOCK_V=128,"
    "WY_FAST_MAXNREG=168")
# the forward's state scan from the WY inverse T, k, v, beta (SCAN_T; bench/NOTES.md, "helper
# delta9"): the WY stage writes T only (no float32 W, U): VARIANTS=@scant with VARIANT_EXTRA=stages
# (bench/gpu_scant9.sh); read each variant's wy / states / fwd total rows against base's and dstate's
# and the fwd row against fla's (the "time" step). scant_vs_default: SCAN_T on vs off on the same
# inputs (every gradient bitwise expected: the backward is unchanged; o, S within rounding).
# sm_90 Triton 3.6 compile of the scan (gated no-L2 / L2: regs, spill B, shared KB; programs/SM)
SCANT_VARIANTS = (   # most telling first: the budget may cut the tail
    "base:;"                                                             # 255, 172/176, 131/148, 1
    "scant:SCAN_T=True;"                                                 # 255, 112/184, 91, 1
    "scant-dstate:SCAN_T=True,DSTATE=True;"                              # 255, 212/304, 82, 1
    "dstate:DSTATE=True;"                                                # 255, 344/408, 115, 1
    # + the backward's recompute by the same scan (W formed alone, no U): read its fwd+bwd row
    "scant-bwd:SCAN_T=True,SCAN_T_BWD=True;"
    # + helper deltaout8's output stage (decay-on-o, one V tile of 128): the composed forward
    "scant-dstate-outd-bv128:SCAN_T=True,DSTATE=True,OUT_DECAY_O=True,OUT_BLOCK_V=128;"
    "scant-dstate-kt-pf0:SCAN_T=True,DSTATE=True,DSTATE_KT=True,DSTATE_PREFETCH=0;"  # 72/108, 1
    "scant-dstate-kt-pf3:SCAN_T=True,DSTATE=True,DSTATE_KT=True,DSTATE_PREFETCH=3;"  # 128/132, 1
    # w, u stored bf16 (the WY products in the input dtype), precision-keeping sub-knobs (the
    # interpreter's bound passes: bench/NOTES.md "delta5") and fla's own precision
    "bf16wu-tf32-dstate:WU_FLOAT32=False,WU_TF32_PRODUCTS=True,SCAN_TF32=True,DSTATE=True;"
    "flaprec-dstate:WU_FLOAT32=False,DSTATE=True;"
    # k S as one tf32 dot of the float32 k tile (the precision control; spills 476/580 B)
    "scant-tf32:SCAN_T=True,SCAN_T_KS_X2=False")
# 4 warps, BV 32 (2 programs per SM; the bf16 m64n32k16 N-major B of helper dfwd8's suspicion:
# one process each in bench/gpu_scant9.sh)
SCANT4_VARIANTS = (
    "scant-dstate-kt-pf3-bv32w4:SCAN_T=True,DSTATE=True,DSTATE_KT=True,DSTATE_PREFETCH=3,"
    "DSTATE_BV=32,DSTATE_WARPS=4;"                                       # 252/255, 0/124, 78/61, 2
    "scant-dstate-kt-pf0-bv32w4:SCAN_T=True,DSTATE=True,DSTATE_KT=True,DSTATE_PREFETCH=0,"
    "DSTATE_BV=32,DSTATE_WARPS=4;"                                       # 244/255, 0/64, 83/66, 2
    "scant-dstate-pf0-bv32w4:SCAN_T=True,DSTATE=True,DSTATE_PREFETCH=0,DSTATE_BV=32,"
    "DSTATE_WARPS=4")                                                    # 255, 24/168, 66/74, 2
# per variant, besides its check and gated fwd / fwd+bwd: "ungated" (chunk_delta_rule, against
# fla's fwd+bwd), "profile" (every kernel of its gated fwd+bwd), "stages" (its forward stages);
# unset: ungated and profile for the first variant only, stages for every one
VARIANT_EXTRA = os.environ.get("VARIANT_EXTRA")


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def inputs(B, T, H, HV, K, V, gated, dtype=BF, req=False, l2=True):
    q, k = torch.randn(2, B, T, H, K, device=DEV).to(dtype).unbind(0)
    if not l2:   # unit keys (the in-kernel norm's job otherwise)
        k = F.normalize(k.float(), dim=-1).to(dtype)
    v = torch.randn(B, T, HV, V, device=DEV).to(dtype)
    g = F.logsigmoid(torch.randn(B, T, HV, device=DEV)) if gated else None
    beta = torch.sigmoid(torch.randn(B, T, HV, device=DEV))
    xs = [q, k, v, g, beta]
    if req:
        xs = [None if x is None else x.requires_grad_() for x in xs]
    return xs


def ours(op, l2=True):
    if op == "chunk_gated_delta_rule":
        return lambda q, k, v, g, beta: sk.chunk_gated_delta_rule(
            q, k, v, g, beta, use_qk_l2norm_in_kernel=l2)[0]
    return lambda q, k, v, g, beta: sk.chunk_delta_rule(q, k, v, beta,
                                                        use_qk_l2norm_in_kernel=l2)[0]


def fla_ops(l2=True):
    out = {}
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as f
        out["chunk_gated_delta_rule"] = lambda q, k, v, g, beta, f=f: f(
            q, k, v, g, beta, use_qk_l2norm_in_kernel=l2)[0]
    except Exception as e:  # noqa: BLE001
        log("fla chunk_gated_delta_rule unavailable:", repr(e)[:120])
    try:
        from fla.ops.delta_rule import chunk_delta_rule as f
        out["chunk_delta_rule"] = lambda q, k, v, g, beta, f=f: f(
            q, k, v, beta, use_qk_l2norm_in_kernel=l2)[0]
    except Exception as e:  # noqa: BLE001
        log("fla chunk_delta_rule unavailable:", repr(e)[:120])
    return out


# ---- 1. correctness ----------------------------------------------------------------------------

def judge(label, names, got, ref, lowp, q):
    ok = True
    for n, a, r, lo in zip(names, got, ref, lowp):
        if not torch.isfinite(a).all():
            log(f"  FAIL {label} {n}: non-finite")
            ok = False
            continue
        if n == "dg":   # dg_t sums products like q . dq: judged relative to max(|dg|, |q * dq|)
            qn = F.normalize(q.double(), dim=-1, eps=0)
            den = max(r.norm().item(), (qn * ref[names.index("dq")]).norm().item())
            e, el = (a.double() - r).norm().item() / den, (lo.double() - r).norm().item() / den
        else:
            e, el = rel_err(a, r), rel_err(lo, r)
        b = bound_for(BF, el)
        flag = "ok" if e <= b else "FAIL"
        ok &= e <= b
        log(f"  {flag:4s} {label:44s} {n:6s} err {e:.2e} bound {b:.2e}")
    return ok


def check(op, B=2, T=2048, H=4, HV=4, K=128, V=128, cu=None, label=""):
    gated = op == "chunk_gated_delta_rule"
    q, k, v, g, beta = inputs(B, T, H, HV, K, V, gated)
    N = B if cu is None else cu.numel() - 1
    h0 = torch.randn(N, HV, K, V, device=DEV)

    def mine(q, k, v, g, beta, h0):
        if gated:
            return sk.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0,
                                             output_final_state=True, use_qk_l2norm_in_kernel=True,
                                             cu_seqlens=cu)
        return sk.chunk_delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True,
                                   use_qk_l2norm_in_kernel=True, cu_seqlens=cu)

    def ref(q, k, v, g, beta, h0):
        return delta_rule_chunk_ref(q, k, v, g, beta, None, h0, cu, True, chunk_size=64)

    cots = (torch.randn(B, T, HV, V, device=DEV, dtype=torch.float64),
            torch.randn(N, HV, K, V, device=DEV, dtype=torch.float64))
    ins = [q, k, v, g, beta, h0]
    got = grads_of(mine, ins, cots)
    r = grads_of(ref, [None if x is None else x.double() for x in ins], cots)
    lp = grads_of(ref, ins, cots)          # the same reference fed the bf16 inputs
    names = ["o", "ht", "dq", "dk", "dv"] + (["dg"] if gated else []) + ["dbeta", "dh0"]
    ok = judge(f"{op}{label}", names, got, r, lp, q)
    # deterministic: a second backward is bitwise equal
    again = grads_of(mine, ins, cots)
    same = all(torch.equal(a, b) for a, b in zip(got, again))
    log(f"  {'ok' if same else 'FAIL'} {op}{label} bitwise repeat")
    return ok and same


# ---- 2. timing ---------------------------------------------------------------------------------

def bench(section, case, impl, f, make, floor_ms=None):
    for mode, tf in (("fwd", time_fwd), ("fwd+bwd", time_fwd_bwd)):
        try:
            ms = tf(f, make)
            note = "" if floor_ms is None else f"floor {floor_ms[mode]:.3f}"
        except Exception as e:  # noqa: BLE001
            ms, note = float("nan"), "error: " + repr(e)[:80]
        ROWS.append((section, case, impl, mode, ms, note))
        log(f"{section:24s} {case:26s} {impl:26s} {mode:8s} {ms:8.3f} ms {note}")


def floors(B, T, H, HV, K, V):
    """Byte floors (ms): fwd q, k, v, o (+ g, beta fp32); fwd+bwd also do, dq, dk, dv read/written
    (q, k, v, do read again) and dg, dbeta."""
    f = (B * T * (2 * H * K * 2 + 2 * HV * V * 2 + 2 * HV * 4)) / (COPY_GBS * 1e9) * 1e3
    fb = (B * T * (4 * H * K * 2 * 2 + 4 * HV * V * 2 * 2 + 4 * HV * 4)) / (COPY_GBS * 1e9) * 1e3
    return {"fwd": f, "fwd+bwd": fb}


# ---- 3. stages -------------------------------------------------------------------------------

def stage_model(p, R, Rq):
    """(bytes, FLOPs) of our forward's stages under plan `p` (chunk.py's knobs as set now): R value
    rows (tokens x value heads), Rq q/k rows. Tensor-core FLOPs (2 per multiply-add)."""
    K, V, BT = p.K, p.V, p.BT
    wb, ub = p.wdtype.itemsize, p.udtype.itemsize
    nch = R // BT
    wy_b = R * (K * 2 + V * 2 + 8 + K * wb + V * ub)
    if wy.WY_SPLIT and not p.wy_fast:
        wy_b += R * (2 * BT * 4 + K * 2)              # T written and read, k read again
    wy_f = R * 2 * (BT * K + 4 * BT * BT + BT * K + BT * V)
    if p.wy_fast:   # 2 log2(BT/2) inverse dots; W, U as (1 + wu_wf32) dots
        wy_f = R * 2 * (BT * K + 2 * (BT.bit_length() - 2) * BT * BT
                        + (1 + p.wu_wf32) * BT * (K + V))
    nv = -(-V // ((wy.DELTA_FWD_BV or 32) if wy.DELTA_FWD else
                  (wy.DSTATE_BV or p.BVs) if wy.DSTATE else p.BVs))
    st_b = nv * R * (K * 2 + K * wb + 4) + R * V * (ub + 2) + nch * K * V * 2
    st_f = R * 4 * K * V
    if p.scan_t:   # WY: k, g, beta in, T out (no v, W, U); scan: k, T, g, beta per V tile, v in
        wy_b = R * (K * 2 + 8 + BT * 4)
        wy_f = R * 2 * (BT * K + 2 * (BT.bit_length() - 2) * BT * BT)
        st_b = nv * R * (K * 2 + BT * 4 + 8) + R * V * (2 + 2) + nch * K * V * 2
        st_f += R * 2 * BT * V                        # V' = T Y
    if wy.DELTA_FWD == 2:   # one kernel: + q read per V tile, o written; no h, no v_new
        fu_b = nv * R * (2 * K * 2 + K * wb + 4) + R * V * (ub + 2)
        fu_f = R * (6 * K * V + nv * 2 * BT * K + 2 * BT * V)
        return {"wy": (wy_b, wy_f), "states+output": (fu_b, fu_f)}
    nvo = -(-V // p.BVO)
    out_b = nvo * 2 * Rq * K * 2 * (R // Rq) + nch * K * V * 2 + R * V * 2 * 2 + R * 4
    out_f = R * 2 * (K * V + nvo * BT * K + BT * V)
    return {"wy": (wy_b, wy_f), "states": (st_b, st_f), "output": (out_b, out_f)}


def stage_times(label, B=4, T=4096, H=16, HV=16, K=128, V=128):
    """Our forward's stages (gated) timed one by one: the WY stage, the state scan, the output
    stage by difference; GB/s and TFLOP/s against stage_model."""
    from triton.testing import do_bench
    q, k, v, g, beta = inputs(B, T, H, HV, K, V, True, l2=False)
    p = wy._plan(q, v, g, None)
    wu = not p.scan_t   # SCAN_T: the WY stage writes T only, the scan reads T, v, beta
    w, u, tm = wy._wy(p, k, v, g, beta, False, False, wu=wu)
    ts = None if wu else (tm, v, beta)
    ms = lambda f: do_bench(f, warmup=5, rep=25, return_mode="median")  # noqa: E731
    t = {"wy": ms(lambda: wy._wy(p, k, v, g, beta, False, False, wu=wu)),
         "states": ms(lambda: wy._states(p, k, w, u, g, None, False, t_scan=ts)),
         "fwd total": ms(lambda: wy.chunk_delta_fwd(q, k, v, g, beta, None, None, K ** -0.5,
                                                    False))}
    t["output"] = t["fwd total"] - t["wy"] - t["states"]
    names = ("wy", "states", "output", "fwd total")
    if wy.DELTA_FWD == 2:   # the scan and the output are one kernel ("states": the h-storing scan)
        t["states+output"] = t["fwd total"] - t["wy"]
        names = ("wy", "states", "states+output", "fwd total")
    model = stage_model(p, B * T * HV, B * T * H)
    case = f"B{B} T{T} H{H} HV{HV} K=V={K}"
    for name in names:
        note = "one stage" if name in ("wy", "states", "fwd total") else "fwd - the rows above"
        if name in model:
            by, fl = model[name]
            note += (f"; {by / 1e9:.3f} GB {by / t[name] / 1e6:.0f} GB/s, {fl / 1e9:.1f} GFLOP "
                     f"{fl / t[name] / 1e9:.0f} TFLOP/s")
        ROWS.append(("delta stage", case, f"{label}: {name}", "fwd", t[name], note))
        log(f"delta stage {label:28s} {name:10s} {t[name]:8.3f} ms  {note}")
    del q, k, v, g, beta, w, u, tm, ts
    torch.cuda.empty_cache()


# the WY backward kernel alone (STEPS=...,wybwd): knob settings timed one after the other on the
# same operands (main shape, gated, no L2 norm; dV' random: the time does not depend on it)
WYBWD_STAGE_SETTINGS = (
    ("default", {}),                       # main's default since session 7: WY_BWD_LEAN
    ("old", {"WY_BWD_LEAN": False}),       # session 6's kernel (measured 2.004 ms)
    ("fast", {"WY_BWD_FAST": True}),
    ("fast-ks2", {"WY_BWD_FAST": True, "WY_BWD_FAST_KSPLIT": 2}),
    ("fast-w4", {"WY_BWD_FAST": True, "WY_BWD_FAST_WARPS": 4, "WY_BWD_FAST_STAGES": 1}),
    ("fast-w4-ks2", {"WY_BWD_FAST": True, "WY_BWD_FAST_WARPS": 4, "WY_BWD_FAST_STAGES": 1,
                     "WY_BWD_FAST_KSPLIT": 2}),
    ("fast-bv64", {"WY_BWD_FAST": True, "WY_BWD_FAST_BV": 64}),
    ("fast-park", {"WY_BWD_FAST": True, "WY_BWD_FAST_PARK": True}),
    ("fast-bv16", {"WY_BWD_FAST": True, "WY_BWD_FAST_BV": 16}),
    ("fast-s1", {"WY_BWD_FAST": True, "WY_BWD_FAST_STAGES": 1}),
)


def wybwd_stage(B=4, T=4096, H=16, HV=16, K=128, V=128):
    """`chunk._wy_backward` alone under each of WYBWD_STAGE_SETTINGS (do_bench median), with the
    bytes it must move (k, v, T, h, dV', dke, dge in; dk, dv, dbeta, dg out) as GB/s."""
    from triton.testing import do_bench
    q, k, v, g, beta = inputs(B, T, H, HV, K, V, True, l2=False)
    p = wy._plan(q, v, g, None)
    _, _, tm = wy._wy(p, k, v, g, beta, False, True)
    h = torch.randn(p.NCH, HV, K, V, device=DEV).to(p.hdtype)
    dvn = torch.randn(B * T, HV, V, device=DEV).to(p.wdtype)
    dke = torch.randn(B * T, H, K, device=DEV)
    dge = torch.randn(B * T, HV, device=DEV)
    # per value row: v, T, dV', beta, g, dge in, dv, dbeta, dg out; per q/k row: k and dke in,
    # dk out; h per chunk
    by = (B * T * HV * (4 * V + 4 * p.BT + V * dvn.element_size() + 20)
          + B * T * H * 8 * K + p.NCH * HV * K * V * h.element_size())
    case = f"B{B} T{T} H{H} HV{HV} K=V={K}"
    for name, knobs in WYBWD_STAGE_SETTINGS:
        saved = {kk: getattr(wy, kk) for kk in knobs}
        try:
            for kk, vv in knobs.items():
                setattr(wy, kk, vv)
            pk = wy._plan(q, v, g, None)
            ms = do_bench(lambda: wy._wy_backward(pk, k, v, g, beta, tm, h, dvn, dke, dge, False),
                          warmup=5, rep=30, return_mode="median")
            note = f"{knobs}; {by / 1e9:.3f} GB {by / ms / 1e6:.0f} GB/s"
        except Exception as e:  # noqa: BLE001
            ms, note = float("nan"), "error: " + repr(e)[:100]
        finally:
            for kk, vv in saved.items():
                setattr(wy, kk, vv)
        ROWS.append(("delta wy bwd", case, f"_wy_backward [{name}]", "bwd", ms, note))
        log(f"delta wy bwd {name:14s} {ms:8.3f} ms  {note}")
    del q, k, v, g, beta, tm, h, dvn, dke, dge
    torch.cuda.empty_cache()


def kernel_profile(label, f, make, fwd_only):
    """Every CUDA kernel of one fwd (or fwd+bwd) call of `f` through torch.profiler: name, calls,
    ms per call of f (mean over 5 calls after 2 warm-up calls)."""
    from torch.profiler import ProfilerActivity, profile
    xs = make(not fwd_only)
    live = [x for x in xs if x is not None and x.requires_grad]

    def step():
        if fwd_only:
            with torch.no_grad():
                f(*xs)
        else:
            o = f(*xs)
            torch.autograd.grad(o, live, torch.ones_like(o))
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    n = 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    agg = {}
    for e in prof.events():
        if e.device_type.name != KDEV:
            continue
        us = e.time_range.elapsed_us()     # a device-side event: the kernel's own duration
        a = agg.setdefault(e.name[:60], [0, 0.0])
        a[0] += 1
        a[1] += us
    mode = "fwd" if fwd_only else "fwd+bwd"
    tot = 0.0
    for name, (cnt, us) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
        ms = us / n / 1e3
        tot += ms
        ROWS.append(("kernels " + mode, label, name, "fwd", ms, f"{cnt // n} launch(es)"))
        log(f"kernel {label:22s} {mode:8s} {name:60s} x{cnt // n:<3d} {ms:8.3f} ms")
    log(f"kernel {label:22s} {mode:8s} {'(sum)':60s}      {tot:8.3f} ms")


# the forward's h, v_new (1) and W (2) kept for the backward (SAVE_STATES; bench/NOTES.md, "helper
# deltabwd10"): the backward runs no state scan (and at 2 no WY launch). VARIANTS=@savestates
# with VARIANT_EXTRA=ungated,profile: read each variant's fwd+bwd rows (gated, ungated) against
# defaults' (same process) and the ungated one against fla's 1.951 ms (session 10, H100); the
# profile shows one `_state_kernel` (the forward's) and, at 2, one `_wy_fast_kernel`
SAVE_STATES_VARIANTS = (
    "defaults:;"
    "states2:SAVE_STATES=2;"
    "states1:SAVE_STATES=1;"
    # + the 16-bit dV' (written by the state-gradient scan, read twice by the WY backward: -0.2 GB;
    # dv 0.51 of its bound in the bf16 interpreter, bench/NOTES.md "deltabwd")
    "states2-g16:SAVE_STATES=2,BWD_GRAD_16=True;"
    # + session 8's fastest WY backward row (0.695 vs 0.745 ms; its check never ran on the GPU;
    # 4 warps: the Triton 3.6 hazard of the delta backward: last, so a crash costs nothing else)
    "states2-wybwd-fast-w4:SAVE_STATES=2,WY_BWD_FAST=True,WY_BWD_FAST_WARPS=4,"
    "WY_BWD_FAST_STAGES=1")

VARIANT_GROUPS = {"@savestates": SAVE_STATES_VARIANTS, "@bwd": BWD_VARIANTS, "@fwd": DEFAULT_VARIANTS, "@savet": SAVE_WY_VARIANTS,
                  "@wyfast": WYFAST_VARIANTS, "@wybwd": WYBWD_VARIANTS,
                  "@deltafwd": DELTA_FWD_VARIANTS, "@deltastate": DSTATE_VARIANTS,
                  "@deltastate4": DSTATE4_VARIANTS, "@deltaout": DELTA_OUT_VARIANTS,
                  "@scant": SCANT_VARIANTS, "@scant4": SCANT4_VARIANTS,
                  "@defaults": "defaults:"}


def expand_variants(text):
    """VARIANTS with its @groups expanded: items are ';'-separated, an item may be a ','-list of
    @groups ("@bwd,@savet", "@defaults;lean4:WY_LEAN=True"); a variant named twice runs once."""
    parts = []
    for item in filter(None, (x.strip() for x in text.split(";"))):
        if item.startswith("@"):
            for grp in filter(None, (x.strip() for x in item.split(","))):
                if grp not in VARIANT_GROUPS:
                    raise ValueError(f"VARIANTS: no group {grp!r} (known: {sorted(VARIANT_GROUPS)})")
                parts.append(VARIANT_GROUPS[grp])
        else:
            parts.append(item)
    seen, out = set(), []
    for item in filter(None, (x.strip() for x in ";".join(parts).split(";"))):
        name = item.partition(":")[0].strip()
        if name not in seen:
            seen.add(name)
            out.append(item)
    return ";".join(out)


def parse_variants(text):
    out = []
    for item in filter(None, (x.strip() for x in text.split(";"))):
        name, _, body = item.partition(":")
        knobs = {}
        for kv in filter(None, body.split(",")):
            kk, _, vv = kv.partition("=")
            if not hasattr(wy, kk.strip()):
                raise ValueError(f"VARIANTS: no knob {kk!r} in delta_rule/chunk.py")
            knobs[kk.strip()] = eval(vv)   # noqa: S307 (Python literals from the command line)
        out.append((name.strip(), knobs))
    return out


NAMES8 = ["o", "S", "dq", "dk", "dv", "dg", "dbeta", "dh0"]


def knob_on_off(knob, B, T, H, HV, K, V, vals=(True, False), gated=True):
    """(outputs with `knob` True, with it False; or at vals), the other knobs as set: o, S and
    every gradient of the gated (or ungated) op (l2 norm, h0, a partial chunk, a loss on o, S)."""
    q, k, v, g, beta = inputs(B, T, H, HV, K, V, gated)
    h0 = torch.randn(B, HV, K, V, device=DEV)
    cots, outs = None, []
    old = getattr(wy, knob)
    for val in vals:
        setattr(wy, knob, val)
        try:
            xs = [x.detach().clone().requires_grad_() for x in (q, k, v, g, beta, h0)
                  if x is not None]
            if gated:
                o, S = sk.chunk_gated_delta_rule(*xs[:5], initial_state=xs[5],
                                                 output_final_state=True,
                                                 use_qk_l2norm_in_kernel=True)
            else:
                o, S = sk.chunk_delta_rule(*xs[:4], initial_state=xs[4], output_final_state=True,
                                           use_qk_l2norm_in_kernel=True)
            if cots is None:
                cots = (torch.randn_like(o), torch.randn_like(S))
            outs.append([o, S] + list(torch.autograd.grad(
                (o.float() * cots[0]).sum() + (S * cots[1]).sum(), xs)))
        finally:
            setattr(wy, knob, old)
    return outs


def same_as_recompute(name, B=1, T=1024, H=2, HV=4, K=128, V=128):
    """SAVE_WY_INVERSE on (as set now) against off: o, S and every gradient should be bitwise
    equal (the backward forms W, U from the forward's T instead of re-solving it). Logs the
    largest differences."""
    outs = knob_on_off("SAVE_WY_INVERSE", B, T - 7, H, HV, K, V)
    diffs = {n: (a.float() - b.float()).abs().max().item() for n, a, b in zip(NAMES8, *outs)}
    same = all(torch.equal(a, b) for a, b in zip(*outs))
    log(f"variant {name}: saved T vs recompute: {'bitwise equal' if same else 'DIFFER'} "
        f"(max |diff| {max(diffs.values()):.3e}: {diffs})")
    ROWS.append(("chunk_gated_delta_rule", f"B{B} T{T - 7} H{H} HV{HV}", f"ssm_kernels [{name}]",
                 "fwd", float("nan"), "saved T vs recompute: " + (
                     "bitwise equal" if same else f"DIFFER (max {max(diffs.values()):.2e})")))
    return same


def states_vs_recompute(name, B=1, T=1024, H=2, HV=4, K=128, V=128):
    """SAVE_STATES at its set level against 0 (the backward's state scan and WY recompute): o, S
    and every gradient bitwise equal expected (the same kernels formed the saved h, v_new, W from
    the same inputs), gated and ungated; logs the saved buffer's size at the main shape."""
    level = wy.SAVE_STATES
    texts = []
    for gated in (True, False):
        outs = knob_on_off("SAVE_STATES", B, T - 7, H, HV, K, V, vals=(level, 0), gated=gated)
        names = NAMES8 if gated else [n for n in NAMES8 if n != "dg"]
        diffs = {n: (a.float() - b.float()).abs().max().item() for n, a, b in zip(names, *outs)}
        same = all(torch.equal(a, b) for a, b in zip(*outs))
        texts.append(("gated " if gated else "ungated ") + (
            "bitwise equal" if same else f"DIFFER (max |diff| {max(diffs.values()):.2e}: {diffs})"))
    q = torch.empty(4, 4096, 16, 128, device="meta", dtype=BF)
    mb = wy.saved_shape(q, q)[0] * 4 / 1e6
    text = f"SAVE_STATES={level} vs 0: " + "; ".join(texts) + f"; saved {mb:.0f} MB at B4 T4096 H16"
    log(f"variant {name}: {text}")
    ROWS.append(("chunk_gated_delta_rule", f"B{B} T{T - 7} H{H} HV{HV}", f"ssm_kernels [{name}]",
                 "fwd", float("nan"), text))


def fast_vs_default(name, B=1, T=1024, H=2, HV=4, K=128, V=128):
    """WY_BWD_FAST on against off: o, S, dq, dh0 should be bitwise equal (shared kernels), dk,
    dv, dg, dbeta close (the same products, hi + lo split and reordered). Logs each gradient's
    max |diff| relative to its max |value|."""
    outs = knob_on_off("WY_BWD_FAST", B, T - 7, H, HV, K, V)
    rel = {n: (a.float() - b.float()).abs().max().item() / (b.float().abs().max().item() + 1e-30)
           for n, a, b in zip(NAMES8, *outs)}
    shared = all(torch.equal(outs[0][i], outs[1][i]) for i in (0, 1, 2, 7))
    text = (f"fast vs default WY bwd: shared outputs {'bitwise' if shared else 'DIFFER'}, rel "
            + " ".join(f"{n} {rel[n]:.1e}" for n in ("dk", "dv", "dg", "dbeta")))
    log(f"variant {name}: {text}")
    ROWS.append(("chunk_gated_delta_rule", f"B{B} T{T - 7} H{H} HV{HV}", f"ssm_kernels [{name}]",
                 "fwd", float("nan"), text))


def dstate_vs_default(name, B=1, T=1024, H=2, HV=4, K=128, V=128):
    """DSTATE on (its other knobs as set) against off: o, S and every gradient bitwise equal
    expected (the same arithmetic, loads reordered) unless DSTATE_KT (one rounding fewer) or a
    precision knob is set; logs each output's max |diff| relative to its max |value|."""
    outs = knob_on_off("DSTATE", B, T - 7, H, HV, K, V)
    rel = {n: (a.float() - b.float()).abs().max().item() / (b.float().abs().max().item() + 1e-30)
           for n, a, b in zip(NAMES8, *outs)}
    same = all(torch.equal(a, b) for a, b in zip(*outs))
    text = (f"DSTATE vs engine scan: {'bitwise equal' if same else 'differ'}"
            + ("" if same else ", rel " + " ".join(f"{n} {r:.1e}" for n, r in rel.items())))
    log(f"variant {name}: {text}")
    ROWS.append(("chunk_gated_delta_rule", f"B{B} T{T - 7} H{H} HV{HV}", f"ssm_kernels [{name}]",
                 "fwd", float("nan"), text))


def out_vs_default(name, B=1, T=1024, H=2, HV=4, K=128, V=128, knob="OUT_DECAY_O",
                   what="default output"):
    """OUT_DECAY_O on (its other knobs as set) against off: S and every gradient bitwise equal
    expected (only the forward's output stage changes), o within rounding; logs each output's
    max |diff| relative to its max |value|. knob=SCAN_T (what: the default scan): every gradient
    bitwise expected (the backward is the default's), o and S within rounding."""
    outs = knob_on_off(knob, B, T - 7, H, HV, K, V)
    rel = {n: (a.float() - b.float()).abs().max().item() / (b.float().abs().max().item() + 1e-30)
           for n, a, b in zip(NAMES8, *outs)}
    same = [n for n, a, b in zip(NAMES8, *outs) if torch.equal(a, b)]
    text = (f"{knob} vs {what}: bitwise {','.join(same) or 'none'}; rel "
            + " ".join(f"{n} {r:.1e}" for n, r in rel.items() if n not in same))
    log(f"variant {name}: {text}")
    ROWS.append(("chunk_gated_delta_rule", f"B{B} T{T - 7} H{H} HV{HV}", f"ssm_kernels [{name}]",
                 "fwd", float("nan"), text))


def over_budget(what):
    if time.time() - T0 > BUDGET_S:
        log(f"skipped {what}: time budget ({BUDGET_S:.0f} s)")
        return True
    return False


def main():
    torch.manual_seed(0)
    log(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"triton {triton.__version__}, steps {STEPS}")
    ops = ("chunk_gated_delta_rule", "chunk_delta_rule")
    # FIRST_CALL=0: no first-call (compile) timing (bench/gpu_dstate8.sh's per-variant processes)
    for op in ops if os.environ.get("FIRST_CALL", "1") != "0" else ():
        make = (lambda req, op=op: inputs(2, 256, 4, 4, 128, 128, op == "chunk_gated_delta_rule",
                                          req=req))
        try:
            dt = first_call(ours(op), make)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            log("first call failed: retrying with WY_INVERSE_DOTS=True (no 4-d register tensors)")
            wy.WY_INVERSE_DOTS = True
            dt = first_call(ours(op), make)
        log(f"first call {op}: {dt:.2f} s")
        ROWS.append(("first-call", "B2 T256 H4 K=V=128", f"ssm_kernels.{op}", "fwd+bwd", dt * 1e3,
                     "compile (ms)"))

    ok = True
    if "check" in STEPS:
        cu = torch.tensor([0, 1, 700, 700, 1500, 2047], device=DEV, dtype=torch.int32)
        for op in ops:
            for kw in ({}, {"B": 1, "T": 2047, "H": 2, "HV": 4, "cu": cu, "label": " varlen GVA"}):
                try:
                    ok &= check(op, **kw)
                except Exception:  # noqa: BLE001
                    traceback.print_exc()
                    ok = False
        log("CORRECTNESS (defaults):", "all ok" if ok else "FAILURES above")

    quick = os.environ.get("QUICK", "0") == "1"   # no peers, first shape only
    fla = {} if quick else fla_ops(l2=False)
    gva = os.environ.get("GVA", "1") != "0"   # GVA=0: the main shape only
    shapes = [(4, 4096, 16, 16)] + ([] if quick or not gva else [(1, 32768, 4, 16)])
    B, T, H, HV = shapes[0]
    case = f"B{B} T{T} H{H} HV{HV} K=V=128"
    make = lambda req: inputs(B, T, H, HV, 128, 128, True, req=req, l2=False)  # noqa: E731
    if "time" in STEPS:
        for B_, T_, H_, HV_ in shapes:
            K = V = 128
            for op in ops:
                if (B_, T_) != (B, T) and over_budget(f"{op} B{B_} T{T_}"):
                    continue
                gated = op == "chunk_gated_delta_rule"
                mk = (lambda req, B=B_, T=T_, H=H_, HV=HV_, gated=gated:
                      inputs(B, T, H, HV, K, V, gated, req=req, l2=False))
                c = f"B{B_} T{T_} H{H_} HV{HV_} K=V={K}"
                bench(op, c, "ssm_kernels", ours(op, l2=False), mk, floors(B_, T_, H_, HV_, K, V))
                if op in fla:
                    bench(op, c, "fla", fla[op], mk)
                torch.cuda.empty_cache()

    if "stages" in STEPS and not over_budget("stages"):
        for what in (lambda: stage_times("defaults"),
                     lambda: kernel_profile("ssm_kernels", ours("chunk_gated_delta_rule", False),
                                            make, False),
                     lambda: kernel_profile("fla", fla["chunk_gated_delta_rule"], make, True),
                     lambda: kernel_profile("fla", fla["chunk_gated_delta_rule"], make, False)):
            try:
                what()
            except Exception as e:  # noqa: BLE001 (fla absent, its backward refusing, no CUPTI)
                log("stage step failed:", repr(e)[:160])
            torch.cuda.empty_cache()

    if "wybwd" in STEPS and not over_budget("wybwd"):
        try:
            wybwd_stage()
        except Exception:  # noqa: BLE001
            traceback.print_exc()

    if "variants" in STEPS:
        mk0 = lambda req: inputs(B, T, H, HV, 128, 128, False, req=req, l2=False)  # noqa: E731
        vtext = expand_variants(os.environ.get("VARIANTS", DEFAULT_VARIANTS))
        for iv, (name, knobs) in enumerate(parse_variants(vtext)):
            extra = (("ungated", "profile", "stages") if iv == 0 else ("stages",)
                     ) if VARIANT_EXTRA is None else VARIANT_EXTRA.split(",")
            if over_budget(f"variant {name}"):
                continue
            saved = {kk: getattr(wy, kk) for kk in knobs}
            try:
                for kk, vv in knobs.items():
                    setattr(wy, kk, vv)
                t = time.time()
                good = check("chunk_gated_delta_rule", B=1, T=1024, H=2, HV=4,
                             label=f" [{name}]")
                log(f"variant {name} {knobs}: check {'ok' if good else 'FAILED'} "
                    f"({time.time() - t:.1f} s with its compile)")
                if knobs.get("SAVE_WY_INVERSE"):
                    same_as_recompute(name)
                if knobs.get("WY_BWD_FAST"):
                    fast_vs_default(name)
                if knobs.get("SAVE_STATES"):
                    states_vs_recompute(name)
                if knobs.get("DSTATE"):
                    dstate_vs_default(name)
                if knobs.get("OUT_DECAY_O"):
                    out_vs_default(name)
                if knobs.get("SCAN_T"):
                    out_vs_default(name, knob="SCAN_T", what="the default scan")
                bench("chunk_gated_delta_rule", case, f"ssm_kernels [{name}]"
                      + ("" if good else " CHECK FAILED"), ours("chunk_gated_delta_rule", l2=False),
                      make)
                if "ungated" in extra:   # against fla's full fwd+bwd (ungated: it runs)
                    good0 = check("chunk_delta_rule", B=1, T=1024, H=2, HV=4,
                                  label=f" [{name}]")
                    bench("chunk_delta_rule", case, f"ssm_kernels [{name}]"
                          + ("" if good0 else " CHECK FAILED"), ours("chunk_delta_rule", l2=False),
                          mk0)
                if "profile" in extra:   # its kernels (the backward's split)
                    try:
                        kernel_profile(f"ours [{name}]", ours("chunk_gated_delta_rule", False),
                                       make, False)
                    except Exception as e:  # noqa: BLE001
                        log("profile failed:", repr(e)[:160])
                if "stages" in extra:
                    stage_times(name)
            except Exception:  # noqa: BLE001
                traceback.print_exc()
                ROWS.append(("chunk_gated_delta_rule", case, f"ssm_kernels [{name}]", "fwd",
                             float("nan"), "error"))
            finally:
                for kk, vv in saved.items():
                    setattr(wy, kk, vv)
            torch.cuda.empty_cache()

    print_table(ok, ROWS, "delta rule (chunked WY)", "gpu_delta.csv",
                "(WY_INVERSE_DOTS fallback in use)" if wy.WY_INVERSE_DOTS else "")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--list"]:   # the variants of VARIANTS-style text, one per line
        print("\n".join(expand_variants(sys.argv[2]).split(";")))
    else:
        main()
