"""Delta-rule decode (one token, `fused_recurrent_*`) on the GPU, side by side with fla 0.6, in
eager calls and in CUDA-graph replay (what serving runs). Issue 12 asks >= 1.5x fla in replay at
B = 64..256.

Cases: gated (fused_recurrent_gated_delta_rule) and ungated (fused_recurrent_delta_rule);
B in {64, 128, 256}; H = HV = 16 and a GVA case H = 4, HV = 16 (fla's ungated op has no GVA: n/a);
K = V = 128, T = 1, bf16 q/k/v, float32 state, g float32 (log-sigmoid), beta in (0, 1);
use_qk_l2norm_in_kernel True (Qwen3-Next) and False; our in-place final state
(inplace_final_state=True) and our out-of-place (output_final_state=True; fla 0.6 has no in-place
option, so fla always reads h0 and writes a new final state: the same bytes).

Steps: (1) correctness of ours and fla's vs the float64 recurrence (output and final state; bound
= 2 x the error of the same recurrence run in bf16/fp32 storage + floor, testing.bound_for);
(2) times (median of triton's do_bench; replay = one graph of CALLS calls, per call); (3) a tile
sweep of our kernel (triton.FWD_TILE = (BV, num_warps)) in replay; (4) the table.

GB/s counts the state bytes only (read + write of N * HV * K * V float32); the floor is those bytes
at the card's peak (H100 SXM 3.35 TB/s, H200 4.8 TB/s). q/k/v/o are < 0.5% of them.

Run (fla's wheels unpacked on PYTHONPATH, as bench/gpu_run.sh does):
    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python bench/gpu_delta_decode.py
Env: QUICK=1 (B = 64 only, no sweep), SWEEP=0 (no tile sweep), CALLS (graph calls, default 20),
DRY=1 (CPU smoke run of the script's logic under TRITON_INTERPRET=1: B = 2, one timed call, no
graphs, no fla; numbers meaningless).
"""
from __future__ import annotations

import os
import sys
import time
import traceback

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import ssm_kernels as sk  # noqa: E402
from ssm_kernels.benchmarks.harness import capture  # noqa: E402
from ssm_kernels.delta_rule import triton as tri  # noqa: E402
from ssm_kernels.delta_rule.reference import delta_rule_recurrent_ref  # noqa: E402
from ssm_kernels.testing import Verdict, bound_for  # noqa: E402

CALLS = int(os.environ.get("CALLS", "20"))
QUICK = os.environ.get("QUICK", "0") == "1"
SWEEP = os.environ.get("SWEEP", "1") == "1" and not QUICK
K = V = 128
DRY = os.environ.get("DRY", "0") == "1"
DEV = "cpu" if DRY else "cuda"
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def peak_bw():
    name = torch.cuda.get_device_name()
    return (4.8e12 if "H200" in name else 3.35e12), name


def fla_ops():
    ops = {}
    try:
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as f
        ops[True] = f
    except Exception as e:  # noqa: BLE001
        log("fla fused_recurrent_gated_delta_rule unavailable:", repr(e)[:150])
    try:
        from fla.ops.delta_rule import fused_recurrent_delta_rule as f
        ops[False] = f
    except Exception as e:  # noqa: BLE001
        log("fla fused_recurrent_delta_rule unavailable:", repr(e)[:150])
    return ops


def inputs(B, H, HV, gated, seed=0, strided=False):
    """strided: q, k, v are views of one fused [B, 1, 2 H K + HV V] projection (as Qwen3-Next's
    split of mixed_qkv): our in-place path reads them in place, fla's input_guard copies them."""
    torch.manual_seed(seed)
    dev, bf16 = DEV, torch.bfloat16
    q = torch.randn(B, 1, H, K, device=dev).to(bf16)
    k = F.normalize(torch.randn(B, 1, H, K, device=dev), dim=-1).to(bf16)
    v = torch.randn(B, 1, HV, V, device=dev).to(bf16)
    if strided:
        mixed = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], -1)
        q, k, v = mixed.split([H * K, H * K, HV * V], dim=-1)
        q, k, v = q.unflatten(-1, (H, K)), k.unflatten(-1, (H, K)), v.unflatten(-1, (HV, V))
    g = F.logsigmoid(torch.randn(B, 1, HV, device=dev)) if gated else None
    beta = torch.rand(B, 1, HV, device=dev)
    h0 = torch.randn(B, HV, K, V, device=dev) * 0.1
    return q, k, v, g, beta, h0


def ours_fn(gated, q, k, v, g, beta, state, l2, inplace):
    kw = dict(initial_state=state, use_qk_l2norm_in_kernel=l2, backend="triton")
    if inplace:
        kw["inplace_final_state"] = True
    else:
        kw["output_final_state"] = True
    if gated:
        return lambda: sk.fused_recurrent_gated_delta_rule(q, k, v, g, beta, **kw)
    return lambda: sk.fused_recurrent_delta_rule(q, k, v, beta, **kw)


def fla_fn(f, gated, q, k, v, g, beta, state, l2):
    """fla 0.6's gated op takes (q, k, v, g, gk, gv, beta, ...): g and beta go by keyword."""
    kw = dict(beta=beta, initial_state=state, output_final_state=True,
              use_qk_l2norm_in_kernel=l2)
    if gated:
        return lambda: f(q, k, v, g=g, **kw)
    return lambda: f(q, k, v, **kw)


def eager_us(fn):
    if DRY:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    return do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e3


def replay_us(fn):
    """Per-call time of CALLS calls captured in one CUDA graph; raises if capture fails."""
    if DRY:
        return eager_us(fn)
    graph = capture(fn, CALLS)
    graph.replay()
    torch.cuda.synchronize()
    us = do_bench(graph.replay, warmup=10, rep=60, return_mode="median") * 1e3 / CALLS
    del graph
    return us


def rel(out, ref):
    """||out - ref|| / ||ref|| in float64 on the GPU (testing.rel_err copies to the host: slow at
    B = 256's 67M-element states); inf on NaN/inf."""
    o = out.detach().double()
    if not torch.isfinite(o).all():
        return float("inf")
    return (torch.linalg.vector_norm(o - ref) / torch.linalg.vector_norm(ref)).item()


def check(label, o, S, q, k, v, g, beta, h0, l2, s_bound=torch.float32):
    """Verdicts of (o, S) vs the float64 recurrence on the same bf16 q/k/v: o within the bf16
    bound (2 x the error of the recurrence run in bf16 storage + floor); S, which is float32 from
    exactly representable inputs, within `s_bound`'s bound (float32 for ours; bf16 for fla, whose
    ungated l2 norm rounds q/k to bf16 in a separate kernel first)."""
    d = lambda x: None if x is None else x.double()
    ro, rS = delta_rule_recurrent_ref(d(q), d(k), d(v), d(g), d(beta), None, d(h0), None, l2)
    lo, lS = delta_rule_recurrent_ref(q, k, v, g, beta, None, h0, None, l2)
    vo = Verdict(f"{label} o", rel(o, ro), bound_for(torch.bfloat16, rel(lo, ro)))
    vs = Verdict(f"{label} S", rel(S, rS), bound_for(s_bound, rel(lS, rS)))
    for vv in (vo, vs):
        log("   ", vv)
    return vo.ok and vs.ok


def main():
    if not DRY and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or DRY=1 TRITON_INTERPRET=1 for a CPU smoke run)")
    bw, name = (3.35e12, "cpu (dry run)") if DRY else peak_bw()
    log(f"device {name}; peak {bw / 1e12:.2f} TB/s; torch {torch.__version__}; "
        f"graph calls {CALLS}")
    fla = {} if DRY else fla_ops()
    rows, fails = [], []
    batches = (2,) if DRY else (64,) if QUICK else (64, 128, 256)
    cases = [(gated, B, H, l2, False) for gated in (True, False) for B in batches
             for H in (16, 4) if H == 16 or B == batches[0] for l2 in (True, False)]
    cases += [(True, B, 16, True, True) for B in sorted({batches[0], batches[-1]})]
    for gated, B, H, l2, strided in cases:
        HV = 16
        q, k, v, g, beta, h0 = inputs(B, H, HV, gated, strided=strided)
        nbytes = 2 * h0.numel() * 4
        floor_us = nbytes / bw * 1e6
        case = (f"{'gdn' if gated else 'dn'} B{B} H{H}/{HV} "
                f"l2{'Y' if l2 else 'N'}{' strided-qkv' if strided else ''}")
        log(f"{case}: state {nbytes / 1e6:.0f} MB moved, floor {floor_us:.1f} us")
        # correctness (one call each, from h0)
        o, S = ours_fn(gated, q, k, v, g, beta, h0, l2, False)()
        ok = check("ours", o, S, q, k, v, g, beta, h0, l2)
        st = h0.clone()
        oi, _ = ours_fn(gated, q, k, v, g, beta, st, l2, True)()
        ok &= check("ours in-place", oi, st, q, k, v, g, beta, h0, l2)
        f = fla.get(gated) if (gated or H == HV) else None
        if f is not None:
            try:
                fo, fS = fla_fn(f, gated, q, k, v, g, beta, h0, l2)()
                check("fla", fo, fS, q, k, v, g, beta, h0, l2, torch.bfloat16)
            except Exception as e:  # noqa: BLE001
                log("    fla failed:", repr(e)[:200])
                f = None
        if not ok:
            fails.append(case)
        # times
        t = {}
        for mode, inplace in (("inplace", True), ("out", False)):
            st = h0.clone()
            fn = ours_fn(gated, q, k, v, g, beta, st, l2, inplace)
            t[f"ours_{mode}_eager"] = eager_us(fn)
            t[f"ours_{mode}_graph"] = replay_us(fn)
        if f is not None:
            fn = fla_fn(f, gated, q, k, v, g, beta, h0, l2)
            t["fla_eager"] = eager_us(fn)
            try:
                t["fla_graph"] = replay_us(fn)
            except Exception as e:  # noqa: BLE001
                log("    fla graph capture failed:", repr(e)[:200])
                torch.cuda.synchronize()
        for key, us in t.items():
            log(f"    {key:20s} {us:8.1f} us  {nbytes / us / 1e3:7.0f} GB/s  "
                f"{floor_us / us:6.1%} of floor")
        rows.append((case, floor_us, t))
    sweep = []
    if SWEEP:
        log("tile sweep (ours, gated, l2, in-place, replay): FWD_TILE = (BV, num_warps)")
        tiles = [None, (8, 1), (16, 1), (16, 2), (32, 1), (32, 2), (32, 4), (64, 2), (64, 4),
                 (64, 8), (128, 4), (128, 8)]
        for B in ((2,) if DRY else (64, 256)):
            q, k, v, g, beta, h0 = inputs(B, 16, 16, True)
            nbytes = 2 * h0.numel() * 4
            for tile in tiles:
                tri.FWD_TILE = tile
                try:
                    st = h0.clone()
                    o, _ = ours_fn(True, q, k, v, g, beta, st, True, True)()
                    ok = check(f"tile {tile}", o, st, q, k, v, g, beta, h0, True)
                    st = h0.clone()
                    us = replay_us(ours_fn(True, q, k, v, g, beta, st, True, True))
                    log(f"    B{B} tile {str(tile):9s} {us:7.1f} us {nbytes / us / 1e3:6.0f} GB/s"
                        f"{'' if ok else '  WRONG'}")
                    sweep.append((B, tile, us, ok))
                except Exception as e:  # noqa: BLE001
                    log(f"    B{B} tile {tile} failed: {repr(e)[:160]}")
                    traceback.print_exc(limit=2)
            tri.FWD_TILE = None
    # ---- table ----
    print(f"\n## delta decode, {name}, T=1 K=V=128 bf16 q/k/v, f32 state; us per call "
          f"(replay = CUDA graph of {CALLS} calls); floor = state bytes at {bw / 1e12:.2f} TB/s")
    print("| case | floor | ours in-place replay | ours out replay | fla replay | x fla "
          "(in-place) | ours eager | fla eager | ours % floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case, floor_us, t in rows:
        fg = t.get("fla_graph")
        oi = t["ours_inplace_graph"]
        fmt = lambda x: "n/a" if x is None else f"{x:.1f}"
        print(f"| {case} | {floor_us:.1f} | {oi:.1f} | {t['ours_out_graph']:.1f} | {fmt(fg)} | "
              f"{'n/a' if fg is None else f'{fg / oi:.2f}'} | {t['ours_inplace_eager']:.1f} | "
              f"{fmt(t.get('fla_eager'))} | {floor_us / oi:.0%} |")
    if sweep:
        best = {}
        for B, tile, us, ok in sweep:
            if ok and (B not in best or us < best[B][1]):
                best[B] = (tile, us)
        print("tile sweep best (gated l2 in-place replay): " + "; ".join(
            f"B{B}: {tile} {us:.1f} us" for B, (tile, us) in sorted(best.items())))
    print(f"correctness: {'all ok' if not fails else 'FAIL ' + ', '.join(fails)}; "
          f"total {time.time() - T0:.0f} s")


if __name__ == "__main__":
    main()
