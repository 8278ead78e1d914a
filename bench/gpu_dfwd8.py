"""DELTA_FWD on the GPU (issue 12; bench/NOTES.md, helper dfwd8): where the illegal memory access
comes from, and which settings of the delta-only forward scan run, check and win.

    python bench/gpu_dfwd8.py            (one call, timeout 245 s; BUDGET_S=220 by default)

1. Localisation (when compute-sanitizer is on the machine): the failing forward + backward (B1
   T1024 H2 HV4 K=V=128 bf16, gated, L2 norm, h0: bench/gpu_delta.py's variant check) under
   `compute-sanitizer --tool memcheck` with DELTA_FWD=1 at the crashing settings (4 warps): the
   first error names the kernel, the access kind (global / shared / local) and the SASS offset.
2. Variants, each in its own process (an illegal address poisons the CUDA context, so one crash
   must not take the others with it), discriminators first: dfwd1-w4 (crashed), dfwd1-w4-bf16w
   (no spills, no tf32 dot), dfwd1-bv64-w8 (no 32-wide N-major bf16 wgmma operand), dfwd1-w8 (no
   spills), then base (DELTA_FWD=0), dfwd2-w8, dfwd2-w4. Per variant: a bare forward + backward
   at HV = H, then at HV = 2H (crash or not: is it about grouped heads?), the compiled scan's
   registers / spills as this Triton reports them, bench/gpu_delta.py's gated check at HV = 2H
   T1024 (the one that crashed) and varlen GVA T2047 (o, S, every gradient vs float64, bitwise
   repeat), then gated fwd / fwd+bwd at B4 T4096 H16 K=V=128 and the forward's stages.
Prints one table last (rows: variant, what, ms or verdict, note).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
T0 = time.time()
BUDGET_S = float(os.environ.get("BUDGET_S", "220"))

# (name, knobs of delta_rule/chunk.py): the discriminators first (the budget may cut the tail)
VARIANTS = [
    # the settings that crashed (4 warps, BV 32): 255 regs, 252 B spills in Triton 3.6's compile
    ("dfwd1-w4", {"DELTA_FWD": 1, "DELTA_FWD_WARPS": 4}),
    # 4 warps, BV 32, 16-bit W, U (bf16 W S, no tf32 dot): 246 regs, 0 spills in 3.6's compile.
    # Runs -> the spills / the tf32 dot are the trigger. (Its check fails on precision, like the
    # engine at fla's precision: NOTES, deltafwd7.)
    ("dfwd1-w4-bf16w", {"DELTA_FWD": 1, "DELTA_FWD_WARPS": 4, "WU_FLOAT32": False}),
    # 8 warps, BV 64: the only setting without a 32-wide bf16 wgmma whose B is N-major
    # (m64n64k16, as the WY backward's that ran on the H100; 292 B spills in 3.6)
    ("dfwd1-bv64-w8", {"DELTA_FWD": 1, "DELTA_FWD_BV": 64, "DELTA_FWD_WARPS": 8}),
    # 8 warps, BV 32: 0 spills in 3.6, still the 32-wide N-major bf16 B
    ("dfwd1-w8", {"DELTA_FWD": 1, "DELTA_FWD_WARPS": 8}),
    ("base", {}),
    ("dfwd2-w8", {"DELTA_FWD": 2, "DELTA_FWD_WARPS": 8}),
    ("dfwd2-w4", {"DELTA_FWD": 2, "DELTA_FWD_WARPS": 4}),
]


def emit(name, what, ms, note=""):
    print("ROW " + json.dumps([name, what, ms, note]), flush=True)


def _set(knobs):
    from ssm_kernels.delta_rule import chunk as wy
    for kk, vv in knobs.items():
        if not hasattr(wy, kk):
            raise SystemExit(f"no knob {kk} in delta_rule/chunk.py")
        setattr(wy, kk, vv)


def _bare(B=1, T=1024, H=2, HV=4, K=128, V=128):
    """One forward + backward of the failing check's shape, synchronised after each half."""
    import torch
    import torch.nn.functional as F
    import ssm_kernels as sk
    torch.manual_seed(0)
    q, k = (torch.randn(B, T, H, K, device="cuda").to(torch.bfloat16).requires_grad_()
            for _ in range(2))
    v = torch.randn(B, T, HV, V, device="cuda").to(torch.bfloat16).requires_grad_()
    g = F.logsigmoid(torch.randn(B, T, HV, device="cuda")).requires_grad_()
    beta = torch.sigmoid(torch.randn(B, T, HV, device="cuda")).requires_grad_()
    h0 = torch.randn(B, HV, K, V, device="cuda").requires_grad_()
    o, S = sk.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                     use_qk_l2norm_in_kernel=True)
    torch.cuda.synchronize()
    (o.float().sum() + S.sum()).backward()
    torch.cuda.synchronize()


def _scan_usage():
    """(registers, spills) of the compiled delta-only scan(s), as this Triton reports them."""
    from ssm_kernels.delta_rule import fwd
    out = []
    for e in getattr(fwd._delta_fwd_kernel, "_cache", {}).values():
        kern = getattr(e, "kernel", None)
        if kern is not None:
            out.append(f"{getattr(kern, 'n_regs', '?')} regs / {getattr(kern, 'n_spills', '?')} B "
                       f"spill / {kern.metadata.shared} B smem / {kern.metadata.num_warps} warps")
    return "; ".join(sorted(set(out))) or "-"


def repro(knobs):
    _set(knobs)
    _bare()
    print("repro: forward + backward ran", flush=True)


def one(name, knobs, budget):
    t0 = time.time()
    sys.path.insert(0, HERE)
    import torch
    import gpu_delta as gd   # (sets interface.CHUNKED_WY: the chunked WY path, as its checks)
    _set(knobs)
    for what, kw in (("bare fwd+bwd HV=H", dict(H=4, HV=4)), ("bare fwd+bwd HV=2H", {})):
        try:
            _bare(**kw)
            emit(name, what, None, "ran")
        except Exception as e:  # noqa: BLE001
            emit(name, what, None, "CRASH " + repr(e)[:120])
            return
    emit(name, "compiled scan", None, _scan_usage())
    cu = torch.tensor([0, 1, 700, 700, 1500, 2047], device="cuda", dtype=torch.int32)
    for what, kw in (("check HV=2H T1024", dict(B=1, T=1024, H=2, HV=4)),
                     ("check varlen GVA T2047", dict(B=1, T=2047, H=2, HV=4, cu=cu))):
        try:
            ok = gd.check("chunk_gated_delta_rule", label=f" [{name}]", **kw)
            emit(name, what, None, "ok" if ok else "FAILED")
        except Exception as e:  # noqa: BLE001
            emit(name, what, None, "CRASH " + repr(e)[:120])
            return
    if time.time() - t0 > budget - 12:
        emit(name, "timing", None, "skipped: time budget")
        return
    B, T, H, HV = 4, 4096, 16, 16
    make = lambda req: gd.inputs(B, T, H, HV, 128, 128, True, req=req, l2=False)  # noqa: E731
    n0 = len(gd.ROWS)
    gd.bench("gated", f"B{B} T{T} H{H} K=V=128", name,
             gd.ours("chunk_gated_delta_rule", l2=False), make)
    if time.time() - t0 < budget - 6:
        gd.stage_times(name)
    for r in gd.ROWS[n0:]:
        emit(name, f"{r[3]} {r[2].split(': ')[-1]}" if r[0] == "delta stage" else r[3], r[4], r[5])


def sanitizer():
    exe = shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer",
                     "/usr/local/cuda/compute-sanitizer/compute-sanitizer") if os.path.exists(p)),
        None)
    if exe is None:
        emit("sanitizer", "memcheck dfwd1-w4", None, "compute-sanitizer not found: skipped")
        return
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    cmd = [exe, "--tool", "memcheck", "--print-limit", "3", "--padding", "65536",
           sys.executable, __file__, "--repro", json.dumps({"DELTA_FWD": 1, "DELTA_FWD_WARPS": 4})]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=78, cwd=ROOT)
        text = r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        text = ((e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")) + \
            "\n(timed out after 75 s)"
    keep = [ln for ln in text.splitlines() if ln.startswith("=========") and any(
        w in ln for w in ("Invalid", "at 0x", "by thread", "Address", "ERROR SUMMARY",
                          "Program hit", "Access"))]
    print("\n".join(["--- compute-sanitizer (dfwd1-w4 bare fwd+bwd) ---"] + keep[:24]), flush=True)
    summary = next((ln for ln in keep if "ERROR SUMMARY" in ln), "no summary (see log)")
    first = next((ln for ln in keep if "Invalid" in ln), "")
    where = next((ln for ln in keep if " at 0x" in ln), "")
    emit("sanitizer", "memcheck dfwd1-w4", None, f"{summary.strip('= ')} | {first.strip('= ')} | "
         f"{where.strip('= ')[:110]}")


def main():
    rows = []
    if os.environ.get("SANITIZE", "1") != "0":
        try:
            sanitizer_out = subprocess.run([sys.executable, __file__, "--sanitize"], cwd=ROOT,
                                           capture_output=True, text=True, timeout=80)
        except subprocess.TimeoutExpired:
            sanitizer_out = subprocess.CompletedProcess([], 0, "ROW " + json.dumps(
                ["sanitizer", "memcheck dfwd1-w4", None, "timed out (80 s)"]) + "\n", "")
        sys.stdout.write(sanitizer_out.stdout[-4000:])
        rows += [json.loads(ln[4:]) for ln in sanitizer_out.stdout.splitlines()
                 if ln.startswith("ROW ")]
    only = os.environ.get("ONLY")
    for name, knobs in VARIANTS:
        if only and name not in only.split(","):
            continue
        left = BUDGET_S - (time.time() - T0)
        if left < 25:
            rows.append([name, "variant", None, f"skipped: time budget ({BUDGET_S:.0f} s)"])
            continue
        try:
            r = subprocess.run([sys.executable, __file__, "--one", name, json.dumps(knobs),
                                str(min(left, 70))], cwd=ROOT, capture_output=True, text=True,
                               timeout=min(left, 75))
            out, rc = r.stdout + r.stderr, r.returncode
        except subprocess.TimeoutExpired as e:
            out = (e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or ""))
            rc = "timeout"
        got = [json.loads(ln[4:]) for ln in out.splitlines() if ln.startswith("ROW ")]
        rows += got
        if rc not in (0,) or not got:
            tail = [ln for ln in out.splitlines() if ln.strip()][-3:]
            rows.append([name, "process", None, f"rc {rc}: " + " / ".join(tail)[:150]])
        print(f"[{time.time() - T0:6.1f}s] variant {name} done (rc {rc})", flush=True)
    print("\n| variant | what | ms | note |\n|---|---|---|---|")
    for name, what, ms, note in rows:
        print(f"| {name} | {what} | {'' if ms is None else f'{ms:.3f}'} | {note} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--repro":
        sys.path.insert(0, ROOT)
        repro(json.loads(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--sanitize":
        sanitizer()
    elif len(sys.argv) > 1 and sys.argv[1] == "--one":
        sys.path.insert(0, ROOT)
        one(sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4]))
    else:
        main()
