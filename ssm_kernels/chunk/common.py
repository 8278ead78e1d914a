"""Shared pieces of the chunked engine: `@triton.jit` helpers every stage uses, tile choices and
the device-side chunk index table for packed (varlen) batches.

Layout conventions of every stage (all tensors contiguous, tokens flattened):
    q, k   [TOK, HQ, K]      HQ query/key heads; head h of the H value heads reads q/k head
                             h // (H // HQ) (grouped heads: SSD's B/C groups, GQA)
    v, o   [TOK, H, V]
    g      [TOK, H] (GATE 1) float32 natural-log decays <= 0, or (GATE 2) [TOK, H, K] float32
           Gc, the chunk-local cumulative log2-decays (gla._cumsum_kernel turns g into Gc first)
    vs     [TOK, H] float32 per-row scale of v (SSD: v = x * dt); G_FROM_VS: g = vs * A[h]
    h, dh  [NCH, H, K, V]    per-chunk states (state before chunk c; gradient after chunk c)
    h0, ht [N, H, K, V] float32
Chunks of all sequences are numbered in order: sequence n's chunks start at co[n] (varlen) or
n * NT (B rows of length T, NT = cdiv(T, BT)). Parallel stages run one program per (tile, chunk,
head) and read their chunk's (sequence, local index) from a table built on the device
(`chunk_table`); the grid uses the upper bound TOK // BT + N chunks, surplus programs see an empty
span and write nothing.

Every exponent is a difference G_i - G_j (i >= j) of chunk-local cumulative log2-decays, <= 0.
"""
from __future__ import annotations

from types import MappingProxyType

import torch
import triton
import triton.language as tl

from .._config import triton_interpret
from .._launch import cdiv, next_power_of_2

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# ---- tile choices (the lead tunes these on the GPU) ----------------------------------------------
CHUNK = 64            # chunk length BT on the GPU for K <= 128 (32 above; 32 in the interpreter)
BWD_CHUNK = None      # chunk length of the backward (it recomputes its states); None: as forward
GLA_CHUNK = 64        # chunk length for per-key decays (16-bit inputs; float32 runs at 32)
SUB_CHUNK = 8         # per-key decays: diagonal blocks (elementwise); above them a tree of products
GLA_BLOCK_K = 64      # per-key decays: K tile of the cumsum, scores and dq/dk/dg stages
GLA_BLOCK_V = 128     # per-key decays: V tile of the output stage (16-bit inputs)
GLA_DQK_BLOCK_K = 32  # per-key decays: K tile of the dq/dk/dg stage (64 spilled a little on sm_90)
GLA_DIAG_4D = True    # per-key decays: diagonal blocks kept compact through 4-d reshapes; False:
                      # selects on [BT, BT] tiles (fallback should a compiler reject the reshapes)
INTERP_CHUNK = None   # tests: chunk length under the interpreter (None: 32) to run the GPU's tiles
BLOCK_K = 64          # K tile of the stages that loop over K (state, output, dv)
BLOCK_V = 64          # V tile
# per-chunk states h / dh are stored in the input dtype for 16-bit inputs (they are rounded to it
# as tensor-core operands anyway); the running states of the scans stay float32
STATES_IN_INPUT_DTYPE = True
# forward of GATE 0/1 (plain, scalar decay, SSD) without per-chunk states in memory (fwd.py
# `fused_fwd`): segments of SEG_CHUNKS chunks; stage 1 each segment's end state from zero (in
# parallel), stage 2 a short scan over segments, stage 3 one program per (head, segment, V-tile)
# walks its segment's chunks with the state in registers and writes o (+ D x, * silu(z) for SSD).
# 0: the per-chunk-state path (_state_kernel with h stored, then _output_kernel, which applies
# SSD's D / z epilogue too). 1: fused, 16-bit inputs only (float32's FMA dots spill ~9 KB in
# stage 3 on sm_90, offline); 2: float32 too. Default 0: on the H100 (session 6, bf16, B4 T4096
# H16 K=V=128; SSD B4 L4096 H32 P64 N128) the fused path lost everywhere: engine forward fused vs
# per-chunk simple_gla 0.421 vs 0.332 ms, linear_attn 0.298 vs 0.288, SSD 0.435 vs 0.320 (its
# stage 3 alone, 0.297 ms, costs about the per-chunk output 0.202 + states 0.130). tests/
# test_chunk_fused.py keeps the fused kernels tested (monkeypatched to 1 / 2).
# SSM_KERNELS_FUSED_FWD=1 (or 2) in the environment switches it on for a whole process (the GPU
# A/B of session 9, bench/gpu_chunk.py TWO_LEVEL=1); the knobs below are what session 9 (helper
# engine9) changed in it: V tiles fastest in stage 3's grid, stage 1 in coarse steps, 3 pipeline
# stages (both stages), TMA descriptors (FUSED_TMA), packed batches (cu_seqlens: a segment table,
# stage 2 per sequence). Training takes it too (the backward recomputes its states: gradients
# bitwise those of the per-chunk path); SAVE_STATES=2 keeps no h on it (saved_layout).
FUSED_FWD = int(__import__("os").environ.get("SSM_KERNELS_FUSED_FWD", "0"))
SEG_CHUNKS = 8        # chunks per segment (stage-3 programs: H x B x cdiv(T, SEG) x V-tiles)
LOOKBACK_SEGS = 8     # rows of <= this many segments skip stage 2: each stage-3 program sums the
                      # decayed end states of its row's earlier segments (O(segments^2) L2 reads)
# B rows: segments of SEG_CHUNKS x BT tokens doubled until a row has at most this many (0: off).
# With LOOKBACK_SEGS as large, every row takes the lookback (no stage 2) and the segment states
# cost B x FUSED_SEG_ROWS x H x K x V x 4 B whatever T is: at B2 T16384 H16 K=V=128 17 MB
# (2048-token segments, 512 stage-3 programs) instead of 67 MB + stage 2's 134 MB round trip
# (fwd bytes 1072 -> 838 MB). Fewer, longer stage-3 programs: B x H x V tiles x 8.
FUSED_SEG_ROWS = 8
FUSED_BLOCK_V = 64    # V tile of stage 3 (it keeps a [K, BV] float32 state in registers)
FUSED_WARPS = 8       # warps of stage 3 (sm_90 offline, Triton 3.6, BV 64, 3 stages: GATE 0 198-216
                      # registers, GATE 1 255 + 56-92 B spill, TMA 230-255 + 0-8 B; 4 warps spill)
FUSED_I32_OFFSETS = 1   # stage 3 addresses q, k as an int64 chunk base + int32 tile offsets
# software-pipeline stages of stage 3. 2 (session 6's H100 run): the TTGIR (offline sm_90) shows
# v and g single-buffered and `async_wait num=0` at the loop top, the next chunk's copies issued
# after this chunk's last dot: no load overlaps the chunk's compute. 3: every load double-buffered,
# issued two chunks ahead, `async_wait num=4` (one chunk's group stays in flight); shared memory
# 90 -> 132 KB per CTA (one CTA per SM either way: 216-255 registers x 256 threads)
FUSED_STAGES = 3
# stage 3's grid: True (V_FIRST) (V tiles, heads, segments): the V tiles of one (head, segment)
# are neighbours and walk the same chunks together, so q and k come from HBM once and from L2 for
# the other tiles (with BV=64 at V=128 the old order re-read q, k from HBM: 134 MB more); heads
# stay next to each other (SSD's B/C groups). False: the old (heads, segments, V tiles)
FUSED_V_FIRST = True
# stage 1 of the fused forward (each segment's end state from zero) in steps of this many tokens
# (a power of two, a multiple of the chunk, <= the segment; 0: the chunk): fewer, longer dots with
# more bytes in flight per step, as STATE_COARSE (H100 session 8: 0.116 -> 0.096 ms for the same
# bytes); 8 warps from 256 tokens (4 spill there, as the coarse state pass). sm_90 offline (bf16,
# BK=BV=64, 2 pipeline stages): 64 -> 114-171 registers, 4 warps, 17-25 KB shared (4 CTAs/SM for
# GATE 0/1); 128 -> 134-194, 4 warps, 33-50 KB (2 CTAs/SM); 256 -> 171-254, 8 warps, 67-99 KB
# (1 CTA/SM). Same bytes in flight per SM in all three; 128 halves the dependent steps of a
# 512-token segment. At FUSED_S1_STAGES=3, 128: 160-255 registers, 50-67 KB, still 2 CTAs/SM.
FUSED_S1_STEP = 128
# pipeline stages of stage 1 when it steps coarser than the chunk. At 2 the TTGIR (Triton 3.6 and
# 3.9 alike) waits for the step's own loads (g single-buffered, async_wait num=0) as stage 3 did;
# 3: num=2, the next step's loads in flight (sm_90: GATE 1 253 registers, 67 KB, 2 CTAs/SM)
FUSED_S1_STAGES = 3
# stage 3 loads q, k, v and stores o through TMA tensor descriptors where the shapes allow
# (fwd._takes_tma: 16-bit B rows, T % BT == 0, K a power of two, V % BV == 0); else pointers.
# Off until timed (bench/gpu_chunk.py TWO_LEVEL=1 "two-level tma"); descriptor arguments take
# Triton's own launch path (not the launch cache: ~tens of us of host time per launch)
FUSED_TMA = False
# the two-level forward by row length (issue 10 session 10, helper engine10), with FUSED_FWD 0:
# None (off) or {key: T} with key 0 (plain), 1 (scalar decay) or "ssd" (mamba_chunk_scan_combined,
# gate 1 with A; absent: never): a call of 16-bit B rows (not packed: a packed batch's lengths
# live on the device) at least T long takes the two-level forward with FUSED_LONG's values in
# place of the module's FUSED_* knobs below (passed on the call's fwd.Plan, the module is not
# touched), else the per-chunk-state path. Training too: the backward recomputes its states
# (gradients bitwise those of the per-chunk path) and fwd.saved_layout answers from the same rule.
# FUSED_FWD 1/2 keeps its meaning (every length, the module's knobs). H100 session 10 (bf16 H16
# K=V=128, fwd ms): level at B4 T4096; B2 T16384 linear_attn default 0.486-0.533 vs two-level
# tma 0.408 (tma scan bv32 w4 st2 0.427; fla 0.501), simple_gla 0.552-0.575 vs 0.521-0.545 (tma);
# SSD lost at L4096 (0.287 vs 0.394): kept out. The crossover: TL_SWEEP=1 bench/gpu_chunk.py
# (rows "auto-long": {0: 8192, 1: 8192}).
FUSED_FWD_MIN_T = None
FUSED_LONG = dict(FUSED_TMA=True)
# the knobs FUSED_LONG may set (the two-level forward's own; SEG_CHUNKS there only)
FUSED_LONG_KNOBS = frozenset((
    "SEG_CHUNKS", "LOOKBACK_SEGS", "FUSED_SEG_ROWS", "FUSED_BLOCK_V", "FUSED_WARPS",
    "FUSED_I32_OFFSETS", "FUSED_STAGES", "FUSED_V_FIRST", "FUSED_S1_STEP", "FUSED_S1_STAGES",
    "FUSED_TMA"))
# backward of GATE 0/1 (plain, scalar decay, SSD; B rows, not varlen): the serial per-sequence
# passes split into segments of SEG_CHUNKS chunks (bwd.py). 1: the recompute of the per-chunk
# states h (fwd.py `seg_chunk_states`: segment end states from zero, a scan over segments, one
# pass per segment from its true incoming state storing h); 2: also the reverse state-gradient
# scan dh (bwd.py `seg_state_grads`, the same three steps backwards). 0: one program per
# (K-tile, V-tile, sequence x head) walks the whole row (fewer bytes, T / BT long chains).
# -1: 2 for rows of at least SEG_BWD_MIN_CHUNKS chunks, else 0 (segments read k, v / q, do twice:
# predicted to lose at T / BT = 64 with 256 programs, to win at 256 chunks; bench/NOTES.md).
# H100 session 6, backward ms SEG_BWD 1 / 2 vs 0: simple_gla B4 T4096 1.108 / 1.232 vs 0.983,
# linear_attn B2 T16384 1.617 / 1.783 vs 1.537; wins only at B1 T16384 (simple_gla 1.324 vs
# 1.460, SSD 1.356 vs 1.460): kept 0.
SEG_BWD = 0
SEG_BWD_MIN_CHUNKS = 128
# what the forward keeps for the backward when a gradient will be taken (the registered ops'
# extra outputs, saved by their autograd; fwd.py `saved_layout`), so the backward skips
# recomputing it. 0: nothing (the backward recomputes h and Gc). 1: GATE 2's chunk-local cumsums
# Gc (float32 like g; kept in place of g, so no more memory than g itself: what fla's chunk_gla
# does for float32 g). 2: also every chunk's incoming state h ([NCH, H, K, V], the storage
# dtype: 2 x v's bytes at BT=64, K=128; 134 MB per layer at bf16 B4 T4096 H16 K=V=128), per-chunk
# forward path only. fla (chunk_simple_gla, chunk_gla, chunk_linear_attn) and mamba-ssm
# (mamba_chunk_scan_combined) recompute h in the backward: 2 trades memory they do not spend.
SAVE_STATES = 1
# forward of the per-chunk-state path (FUSED_FWD=0), issue 10 session 7 (helper engine7) knobs;
# None = the measured per-gate default of FWD_AUTO (session 8 helper engine8; bench/NOTES.md):
# H_EVERY: the state pass stores the incoming state h of every H_EVERY-th chunk only (h bytes
# written + read / H_EVERY); the output stage rebuilds the state of the chunks in between from the
# last stored one with the state pass's own step over the (c mod H_EVERY) chunks before it (their
# k, v re-read, from L2: the neighbouring chunks' programs read them at the same time). Not when
# the forward keeps h for the backward (SAVE_STATES=2: then every h is stored); with SAVE_STATES
# 0/1 the backward recomputes every h itself, so training and inference take the same forward.
H_EVERY = None
# tiles of the state pass (`fwd.chunk_states`, the forward's and the backward's recompute; None:
# BLOCK_K / BLOCK_V, 4 warps, 2 stages): (K/BK) x (V/BV) x rows x heads programs, each walking
# its rows' chunks. BV=32 doubles the programs (512 at B4 H16 K=V=128) for a latency-bound chain
# STATE_COARSE (GATE 0/1 with H_EVERY = R > 1 a power of two): the state pass walks chunks of R x BT tokens (the
# states it stores are exactly the ones H_EVERY keeps: T / (R BT) steps of an (R BT)-long dot
# instead of T / BT steps, more bytes in flight per step); False: BT-long steps, every R-th stored
STATE_COARSE = None
STATE_BLOCK_K = None
STATE_BLOCK_V = None
STATE_WARPS = None    # None: 4 (8 for STATE_COARSE chunks of 256: 4 spill on sm_90)
STATE_STAGES = None
OUT_BLOCK_V = None    # V tile of the output stage for GATE 0/1 (None: FWD_AUTO; 128 = fla's best)
OUT_WARPS = None      # warps of the output stage (None: 8 when its V tile is 128, else 4)
# GATE 1: the output stage scales the [BT, BV] rows of q h by exp(G) after the dot (fla's form)
# instead of scaling q before it: q stays a raw 16-bit dot operand shared by q h and q k^T
OUT_DECAY_O = None
# H_EVERY > 1, GATE 0/1: the output stage forms the chunk's own scores q k^T in its first K loop
# (q, k^T loaded once) and holds them through the replay, instead of re-reading q and k after it
# (4096 x 32 KB = 134 MB of L2 reads fewer at B4 T4096 H16 K=V=128; +16 registers per thread at
# BV=128, 8 warps). Bitwise the same o. None: FWD_AUTO's, and only at a V tile of 128 (at SSD's
# 64 on 4 warps, 168 -> 193 registers, it lost: 0.314 vs 0.288 ms, H100 session 9).
OUT_SCORES_EARLY = None
# the values the None knobs above take, per gate (0 plain, 1 scalar decay and SSD), for 16-bit
# inputs (float32 keeps H_EVERY 1, BLOCK_V, 4 warps, q scaled before the dot: never timed).
# H100 session 8 (bf16, fwd ms, B4 T4096 H16 K=V=128; SSD B4 L4096 H32 P64 N128): simple_gla
# default 0.332, decay_o 0.295, decay_o bv128 0.287, every2 coarse 0.292, every2 bv128 w8 coarse
# 0.270 (fla 0.261); SSD default 0.333, decay_o 0.300, every2 coarse 0.285 (mamba 0.403);
# linear_attn default 0.288, decay_o bv128 w8 0.291, every4 bv128 w8 0.301. The state stage
# alone: every state 0.129, every 2nd coarse 0.096. Session 9 (FWD_DEFAULTS=1, same shapes):
# simple_gla 0.267 -> 0.249 with the scores early (fla 0.257); linear_attn 0.281 -> every2 coarse
# bv128 0.265 -> + scores early 0.235 (fla 0.345 in that run); SSD's stays 0.288 (early: 0.314).
# SSD's *training* forward keeps the old path (`chunk_fwd_keep`): its f+b measured 1.538 with
# these against 1.393 without, while its inference forward gains (0.338 -> 0.288).
FWD_AUTO = {
    0: dict(H_EVERY=2, STATE_COARSE=True, OUT_BLOCK_V=128, OUT_DECAY_O=False,
            OUT_SCORES_EARLY=True),
    1: dict(H_EVERY=2, STATE_COARSE=True, OUT_BLOCK_V=128, OUT_DECAY_O=True,
            OUT_SCORES_EARLY=True),
}
_FWD_OFF = dict(H_EVERY=1, STATE_COARSE=False, OUT_BLOCK_V=None, OUT_DECAY_O=False,
                OUT_SCORES_EARLY=False)


def fwd_knob(name: str, gate: int, auto: bool):
    """The value of forward knob `name` (H_EVERY, STATE_COARSE, OUT_BLOCK_V, OUT_DECAY_O,
    OUT_SCORES_EARLY) for a call of this gate: the knob if set, else FWD_AUTO's where `auto`
    (16-bit inputs; not SSD's training forward: fwd.Plan.fwd_auto), else off."""
    v = globals()[name]
    if v is not None:
        return v
    return (FWD_AUTO[gate] if auto and gate in FWD_AUTO else _FWD_OFF)[name]


# GATE 2 (chunk_gla): one launch (gla._intra_prep_kernel) takes the raw g and writes Gc, the
# pre-decayed rows q exp2(Gc) and k exp2(G_last - Gc) (input dtype, as the dots round them
# anyway), each chunk's total log2-decay G_last [NCH, H, K] and the fast-path scores; the state
# pass and the output stage then read those instead of q, k and Gc (no cumsum launch, no Gc
# read by either)
GLA_PREP = False
# tests: fill every buffer a stage writes with NaN first, so an element no program writes shows up
POISON_OUTPUTS = False


def poison(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan")) if POISON_OUTPUTS else t


_DUMMIES: dict = {}
# persistent dummies and one workspace per call (`dummy`, `workspace`); False (or
# SSM_KERNELS_HOST_POOL=0): a fresh allocation for each, as before session 7 (A/B knob)
HOST_POOL = __import__("os").environ.get("SSM_KERNELS_HOST_POOL", "1") != "0"


def dummy(x: torch.Tensor) -> torch.Tensor:
    """A 1-element tensor on x's device with x's dtype, for a kernel pointer argument whose
    operand is absent (its HAS_* / STORE_* constexpr is off: never read, never written). One
    persistent tensor per (device, dtype), allocated once (outside inference mode and autograd,
    so views of it may be saved for a backward); a fresh one for fake / meta tensors or under
    a dispatch mode (torch.compile's fakes, the op counters)."""
    key = (x.device, x.dtype)
    d = _DUMMIES.get(key) if HOST_POOL else None
    if d is None:
        if not HOST_POOL or (type(x) is not torch.Tensor and not isinstance(x, torch.nn.Parameter)) \
                or x.device.type == "meta" or _dispatch_mode_active():
            return x.new_empty(1)
        with torch.inference_mode(False), torch.no_grad():
            d = torch.empty(1, dtype=x.dtype, device=x.device)
        _DUMMIES[key] = d
    return d


def _dispatch_mode_active() -> bool:
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    return _get_current_dispatch_mode() is not None or torch.compiler.is_compiling()


WORKSPACE_ALIGN = 256   # bytes: every view of a workspace starts at a multiple (Triton: 16)


_LAYOUTS: dict = {}


def _layout(specs):
    """(base dtype, base numel, [(dtype, shape, stride, offset in elements)]) of `workspace`."""
    offs, n = [], 0
    for shape, dt in specs:
        offs.append(n)
        nb = dt.itemsize
        for s in shape:
            nb *= s
        n += -(-nb // WORKSPACE_ALIGN) * WORKSPACE_ALIGN
    base = max((dt for _, dt in specs), key=lambda dt: dt.itemsize)   # fewest dtype views
    slots = []
    for (shape, dt), o in zip(specs, offs):
        stride, acc = [], 1
        for s in reversed(shape):
            stride.append(acc)
            acc *= s
        slots.append((dt if dt != base else None, tuple(shape), tuple(reversed(stride)),
                      o // dt.itemsize))
    return base, max(n, WORKSPACE_ALIGN) // base.itemsize, tuple(slots)


def workspace(like: torch.Tensor, specs: tuple) -> list:
    """Temporaries of one host call in ONE allocation: specs ((shape, dtype), ...) (a hashable
    tuple) -> contiguous views of a single buffer on like's device, each starting at a multiple
    of WORKSPACE_ALIGN bytes (Triton specialises pointers on 16-byte alignment, so the launch
    cache keys are those of separate allocations). The layout is computed once per specs. Only
    for buffers that die with the call (or are saved together): a view keeps the whole buffer
    alive, and views must never be returned as op outputs (they would alias each other). Not
    poisoned: callers poison what they did before."""
    if not HOST_POOL:
        return [like.new_empty(shape, dtype=dt) for shape, dt in specs]
    lay = _LAYOUTS.get(specs)
    if lay is None:
        lay = _LAYOUTS[specs] = _layout(specs)
    base, n, slots = lay
    buf = like.new_empty(n, dtype=base)
    out, typed = [], None
    for dt, shape, stride, off in slots:
        if dt is None:
            out.append(buf.as_strided(shape, stride, off))
        else:
            if typed is None or typed.dtype != dt:
                typed = buf.view(dt)
            out.append(typed.as_strided(shape, stride, off))
    return out


_BLOCKS: dict = {}


def blocks(K: int, V: int, gate: int, dtype: torch.dtype, chunk=None):
    """Tiles of the chunk stages (read-only mapping), memoised on the arguments, the interpreter
    flag and every module knob they read (tests and A/Bs set those at run time): called 1-3 times
    per op call, ~3.4 us each to rebuild (issue 8). Symbolic sizes (torch.compile with dynamic
    shapes) are not hashable: those calls build the tiles each time."""
    if type(K) is not int or type(V) is not int or not (chunk is None or type(chunk) is int):
        return MappingProxyType(_blocks(K, V, gate, dtype, chunk))
    key = (K, V, gate, dtype, chunk, triton_interpret(), INTERP_CHUNK, GLA_CHUNK, CHUNK, BLOCK_V,
           SUB_CHUNK, BLOCK_K, GLA_BLOCK_K, GLA_DQK_BLOCK_K, GLA_BLOCK_V)
    got = _BLOCKS.get(key)
    if got is None:
        if len(_BLOCKS) > 1024:
            _BLOCKS.clear()
        got = _BLOCKS[key] = MappingProxyType(_blocks(K, V, gate, dtype, chunk))
    return got


def _blocks(K: int, V: int, gate: int, dtype: torch.dtype, chunk=None) -> dict:
    BKF = max(16, next_power_of_2(K))            # whole K (the dq/dk stage of GATE 0/1)
    interp = triton_interpret()
    fp32 = dtype == torch.float32
    if interp:
        BT = INTERP_CHUNK or 32
    elif gate == 2:
        # its stages tile K, so K up to 256 keeps BT=64; float32 operands (FMA dots) at 32
        BT = 32 if fp32 else GLA_CHUNK
    else:
        # float32 operands need twice the shared memory: at BT=64, K=128 the backward asked for
        # 262 KB on the H200 (limit 227 KB)
        BT = 32 if (BKF > 128 or fp32) else CHUNK
    if chunk is not None and gate != 2 and not interp:
        BT = min(BT, chunk)
    BV = max(16, min(BLOCK_V, next_power_of_2(V)))
    return dict(
        BT=BT, SUB=min(SUB_CHUNK, BT), BKF=BKF,
        BK=max(16, min(BLOCK_K, next_power_of_2(K))),
        BV=BV,
        BKG=max(16, min(32 if fp32 else GLA_BLOCK_K, next_power_of_2(K))),
        BKD=max(16, min(GLA_DQK_BLOCK_K, next_power_of_2(K))),
        # output V tile of GATE 2: 128 where V is a multiple of 16 (unaligned V: unvectorised
        # loads, and the [64, 128] tile spilled at V=100)
        BVO=(max(16, min(GLA_BLOCK_V, next_power_of_2(V)))
             if (gate == 2 and not fp32 and V % 16 == 0) else BV),
        GLA_WARPS=8,
        DT=_TL_DTYPE[dtype],
        IEEE=1 if fp32 else (2 if interp else 0),
    )


def state_store_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if (STATES_IN_INPUT_DTYPE and dtype != torch.float32) else torch.float32


def chunk_table(cu: torch.Tensor, BT: int, NCH: int, TOK: int):
    """Device-side chunk index of a packed batch, no host sync: (table [NCH, 2] int32 of
    (sequence, local chunk index) per global chunk, co [N] int32 first global chunk of each
    sequence). Surplus entries (past the real number of chunks) point past their sequence's end."""
    cu = cu.long()
    n = (cu[1:] - cu[:-1] + BT - 1) // BT
    ends = torch.cumsum(n, 0)
    starts = ends - n
    idx = torch.arange(NCH, device=cu.device)
    seq = torch.searchsorted(ends, idx, right=True)
    valid = seq < n.numel()
    seq = seq.clamp(max=n.numel() - 1)
    local = torch.where(valid, idx - starts[seq], TOK // BT + 1)
    return torch.stack([seq, local], 1).to(torch.int32).contiguous(), starts.to(torch.int32)


def num_chunks(B: int, T: int, N: int, BT: int, varlen: bool) -> int:
    return (B * T) // BT + N if varlen else B * cdiv(T, BT)


def state_slots(cu, B: int, T: int, N: int, BT: int, every: int):
    """(number of stored states, cor) when only every `every`-th chunk's state is stored: B rows
    B * cdiv(cdiv(T, BT), every) (cor None); packed batches an upper bound, no host sync
    (sum_n cdiv(n_n, every) <= NCH // every + N), and cor [N] int32, the first slot of each
    sequence, computed on the device."""
    if cu is None:
        return B * cdiv(cdiv(T, BT), every), None
    n = (cu[1:].long() - cu[:-1].long() + BT - 1) // BT
    nr = (n + every - 1) // every
    return num_chunks(B, T, N, BT, True) // every + N, (torch.cumsum(nr, 0) - nr).to(torch.int32)


# ---- jit helpers -------------------------------------------------------------------------------

@triton.jit
def seq_span(i_n, cu_ptr, T, IS_VARLEN: tl.constexpr):
    """[bos, eos) of sequence i_n: from cu_seqlens (packed) or n*T (B rows of length T)."""
    if IS_VARLEN:
        bos = tl.load(cu_ptr + i_n).to(tl.int64)
        eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    return bos, eos


@triton.jit
def seg_coords(i_s, st_ptr, cu_ptr, T, IS_VARLEN: tl.constexpr, SEG: tl.constexpr):
    """(sequence, local segment index int64, bos, eos) of global segment i_s, [bos, eos) its
    tokens: B rows of length T (cdiv(T, SEG) segments per row) or a packed batch (st [NSEG, 2]
    int32 = `chunk_table` at chunk length SEG; surplus segments get eos < bos: no tokens)."""
    i_n, j = chunk_coords(i_s, st_ptr, tl.cdiv(T, SEG), IS_VARLEN)
    b0, e0 = seq_span(i_n, cu_ptr, T, IS_VARLEN)
    bos = b0 + j * SEG
    return i_n, j, bos, tl.minimum(bos + SEG, e0)


@triton.jit
def seg_chunk_base(i_s, T, SEG: tl.constexpr, BT: tl.constexpr):
    """Global index of segment i_s's first chunk (B rows of length T, SEG a multiple of BT)."""
    ns = tl.cdiv(T, SEG)
    return (i_s // ns).to(tl.int64) * tl.cdiv(T, BT) + (i_s % ns).to(tl.int64) * (SEG // BT)


@triton.jit
def row_span_base(i_n, cu_ptr, co_ptr, T, IS_VARLEN: tl.constexpr, BT: tl.constexpr,
                  SEG: tl.constexpr):
    """(first token, end, global index of the first chunk) of the serial passes' "sequence" i_n:
    a sequence (SEG = 0) or a segment of SEG tokens (B rows; packed batches: co_ptr is the
    segments' `chunk_table` and base is 0, for passes that store no per-chunk state)."""
    if SEG > 0:
        _, _, bos, eos = seg_coords(i_n, co_ptr, cu_ptr, T, IS_VARLEN, SEG)
        if IS_VARLEN:
            base = bos * 0
        else:
            base = seg_chunk_base(i_n, T, SEG, BT)
    else:
        bos, eos = seq_span(i_n, cu_ptr, T, IS_VARLEN)
        base = chunk_base(co_ptr, i_n, T, IS_VARLEN, BT)
    return bos, eos, base


@triton.jit
def chunk_base(co_ptr, i_n, T, IS_VARLEN: tl.constexpr, BT: tl.constexpr):
    """Global index of sequence i_n's first chunk."""
    if IS_VARLEN:
        base = tl.load(co_ptr + i_n).to(tl.int64)
    else:
        base = i_n.to(tl.int64) * tl.cdiv(T, BT)
    return base


@triton.jit
def chunk_span(i_c, ct_ptr, cu_ptr, T, NT, IS_VARLEN: tl.constexpr, BT: tl.constexpr):
    """(first token, end of its sequence) of global chunk i_c."""
    i_n, c = chunk_coords(i_c, ct_ptr, NT, IS_VARLEN)
    bos, eos = seq_span(i_n, cu_ptr, T, IS_VARLEN)
    return bos + c * BT, eos


@triton.jit
def chunk_coords(i_c, ct_ptr, NT, IS_VARLEN: tl.constexpr):
    """(sequence, local chunk index int64) of global chunk i_c."""
    if IS_VARLEN:
        i_n = tl.load(ct_ptr + 2 * i_c)
        c = tl.load(ct_ptr + 2 * i_c + 1).to(tl.int64)
    else:
        i_n = i_c // NT
        c = (i_c % NT).to(tl.int64)
    return i_n, c


@triton.jit
def state_slot(cor_ptr, i_n, c, T, IS_VARLEN: tl.constexpr, BT: tl.constexpr,
               EVERY: tl.constexpr):
    """Where the state stored for local chunk c (a multiple of EVERY) of sequence i_n lives when
    only every EVERY-th chunk's state is stored (H_EVERY): sequence i_n's slots start at
    cor[i_n] (packed batches; `state_slots`) or i_n * cdiv(cdiv(T, BT), EVERY)."""
    if IS_VARLEN:
        s0 = tl.load(cor_ptr + i_n).to(tl.int64)
    else:
        s0 = i_n.to(tl.int64) * tl.cdiv(tl.cdiv(T, BT), EVERY)
    return s0 + c // EVERY


@triton.jit
def mm(a, b, DT: tl.constexpr, IEEE: tl.constexpr):
    """a @ b with operands rounded to DT and float32 accumulation. IEEE: 0 tensor cores on DT
    operands; 1 exact fp32 products (float32 inputs); 2 DT-rounded operands multiplied in fp32
    (the interpreter's stand-in for 16-bit tensor cores, whose bf16 dot is broken there)."""
    if IEEE == 1:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE == 2:
        return tl.dot(a.to(DT).to(tl.float32), b.to(DT).to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def load_rows(ptr, row, m_t, o_d, m_d, D):
    """A float32 [BT, BD] tile of rows `row` (token * heads + head) of a [*, D] matrix."""
    return tl.load(ptr + row[:, None] * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :],
                   other=0.).to(tl.float32)


@triton.jit
def scale_v(b_x, vs_ptr, row, m_t, HAS_VS: tl.constexpr):
    """Rows of v times the per-row scale vs when given (SSD: v = x * dt in float32)."""
    if HAS_VS:
        b_x = b_x * tl.load(vs_ptr + row, mask=m_t, other=0.)[:, None]
    return b_x


@triton.jit
def load_v(v_ptr, vs_ptr, row, m_t, o_v, m_v, V, HAS_VS: tl.constexpr):
    """v rows, times the per-row scale vs when given (SSD: x * dt in float32)."""
    return scale_v(load_rows(v_ptr, row, m_t, o_v, m_v, V), vs_ptr, row, m_t, HAS_VS)


@triton.jit
def load_skip(D_ptr, i_h, o_v, m_v, V, HAS_D: tl.constexpr):
    """SSD's skip weights D [H, V] float32: head i_h's columns o_v (0. when absent)."""
    if HAS_D:
        return tl.load(D_ptr + i_h * V + o_v, mask=m_v, other=0.)
    else:
        return 0.


@triton.jit
def skip_gate(b_o, b_x, b_D, z_ptr, row, m_t, o_v, m_v, V, HAS_D: tl.constexpr,
              HAS_Z: tl.constexpr):
    """SSD's output epilogue, shared by both forward paths: (o + D x) * silu(z), x the unscaled v
    rows (float32 [BT, BV]), b_D from `load_skip`, z [TOK, H, V] rows `row`. Nothing when absent."""
    if HAS_D:
        b_o += b_x * b_D[None, :]
    if HAS_Z:
        b_z = load_rows(z_ptr, row, m_t, o_v, m_v, V)
        b_o = b_o * b_z * tl.sigmoid(b_z)
    return b_o


@triton.jit
def log_decay_cumsum(g_ptr, vs_ptr, A_ptr, row, i_h, m_t, o_k, m_k, K, GATE: tl.constexpr,
                     G_FROM_VS: tl.constexpr, BT: tl.constexpr):
    """Cumulative log-decay from the chunk start, in log2 units: [BT] (GATE 0/1) or [BT, BK]
    (GATE 2, columns o_k, loaded from the precomputed Gc; padded rows 0, see last_row). GATE 0/1:
    padded steps add 0, so the last row holds the chunk's total."""
    if GATE == 1:
        if G_FROM_VS:
            b_g = tl.load(vs_ptr + row, mask=m_t, other=0.) * tl.load(A_ptr + i_h).to(tl.float32)
        else:
            b_g = tl.load(g_ptr + row, mask=m_t, other=0.).to(tl.float32)
        G = tl.cumsum(b_g * 1.4426950408889634, axis=0)
    elif GATE == 2:
        # g_ptr holds Gc, already the chunk-local cumsum in log2 units (gla._cumsum_kernel);
        # padded rows load 0 (their q, k are 0) and last_row takes the minimum
        G = tl.load(g_ptr + row[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                    other=0.)
    else:
        G = tl.zeros([BT], dtype=tl.float32)
    return G


@triton.jit
def last_row(G, o_t, GATE: tl.constexpr, BT: tl.constexpr):
    """The chunk's total log2-decay: G at the last row ([] for GATE 0/1, [BK] for GATE 2). GATE 2
    (Gc loaded, padded rows 0): the minimum over rows, which is the last real row's value since a
    cumsum of steps <= 0 never increases, in floating point too."""
    if GATE == 2:
        return tl.min(G, axis=0)
    else:
        return tl.sum(tl.where(o_t == BT - 1, G, 0.), axis=0)


@triton.jit
def decay_rows(x, G, GATE: tl.constexpr):
    """x_i * exp(G_i) (rows decayed from the chunk start)."""
    if GATE == 2:
        return x * tl.exp2(G)
    elif GATE == 1:
        return x * tl.exp2(G)[:, None]
    else:
        return x


@triton.jit
def decay_to_end(x, G, G_last, GATE: tl.constexpr):
    """x_j * exp(G_last - G_j) (rows decayed to the chunk end)."""
    if GATE == 2:
        return x * tl.exp2(G_last[None, :] - G)
    elif GATE == 1:
        return x * tl.exp2(G_last - G)[:, None]
    else:
        return x


@triton.jit
def decay_to_end_t(xT, G, G_last, GATE: tl.constexpr):
    """decay_to_end for a transposed [BK, BT] tile (scalar or no gate)."""
    if GATE == 1:
        return xT * tl.exp2(G_last - G)[None, :]
    else:
        return xT


@triton.jit
def decay_state(S, G_last, GATE: tl.constexpr):
    """exp(G_last) S for a [BK, BV] state block (per key row for GATE 2)."""
    if GATE == 2:
        return S * tl.exp2(G_last)[:, None]
    elif GATE == 1:
        return S * tl.exp2(G_last)
    else:
        return S


@triton.jit
def causal_decay(A, G, o_t, GATE: tl.constexpr):
    """A_ij exp(G_i - G_j) for i >= j, 0 above the diagonal (scalar or no gate)."""
    causal = o_t[:, None] >= o_t[None, :]
    if GATE == 1:
        return A * tl.exp2(tl.where(causal, G[:, None] - G[None, :], float("-inf")))
    else:
        return tl.where(causal, A, 0.)


@triton.jit
def causal_decay_t(At, G, o_t, GATE: tl.constexpr):
    """The transpose of causal_decay(A) from At = A^T: At_ji exp(G_i - G_j) for i >= j. Built
    directly so no dot result is transposed into another dot: with that pattern chunk_linear_attn's
    dk was 33% off on the H200 under Triton 3.6 (session 2 run 6) while dq, built without it, was
    right; suspected miscompile (fla reports the same pattern), fix not yet re-run on a GPU."""
    causal = o_t[None, :] >= o_t[:, None]
    if GATE == 1:
        return At * tl.exp2(tl.where(causal, G[None, :] - G[:, None], float("-inf")))
    else:
        return tl.where(causal, At, 0.)


@triton.jit
def load_h_dh(h_ptr, dh_ptr, p_h, o_k, o_v, m_s, V):
    """The [BK, BV] blocks of a chunk's state h and state gradient dh (storage dtype)."""
    p = p_h + o_k[:, None] * V + o_v[None, :]
    return tl.load(h_ptr + p, mask=m_s, other=0.), tl.load(dh_ptr + p, mask=m_s, other=0.)


@triton.jit
def load_state_block(ptr, p_s, m_s, HAS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """A float32 [BK, BV] state block, zeros when absent."""
    if HAS:
        S = tl.load(ptr + p_s, mask=m_s, other=0.).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    return S


# ---- delta rule (ssm_kernels/delta_rule/chunk.py) ----------------------------------------------

@triton.jit
def l2norm_rows(x):
    """Rows of a whole-K tile scaled to unit L2 norm (fla's eps): x / sqrt(|x|^2 + 1e-6)."""
    return x * (1. / tl.sqrt(tl.sum(x * x, axis=1) + 1e-6))[:, None]


@triton.jit
def mm_wy(a, b, WF32: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr):
    """Products with the WY pieces (w, T) and the running state. WF32: float32 operands, on tensor
    cores for 16-bit inputs as tf32 (WF32=1) or 3xtf32 (WF32=2, ~fp32 accuracy, 3x the work);
    exact fp32 in the interpreter and for float32 inputs; WF32=0: as `mm` (operands rounded to
    DT)."""
    if WF32:
        if IEEE == 0:
            if WF32 == 2:
                return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
        else:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return mm(a, b, DT, IEEE)
