"""Selective-scan session-10 variants (issue 9; bench/NOTES.md "sscan10") against the defaults and
mamba-ssm, one process, < 200 s after the build:

    PYTHONPATH=$PWD:/tmp/mamba_build:$PWD/.peers/mamba_ssm-2.3.2.post1 timeout 200 python3 bench/gpu_sscan10.py
    # OUT=/dir also writes gpu_sscan10.csv; FWD=9,11,12 BWD=9,8,10,11 pick the variants (default first)

Forward (SSM_KERNELS_SSCAN_FWD_VARIANT): 9 = default (kTPC 4 x 4 states, 128 threads); 11 = 8 lanes x 2
states per channel, 256 threads (twice the warps), B and C interleaved (one LDS.128 per step), 16-step
y groups, <= 64 registers (4 blocks/SM); 12 = 11 with 32-step groups at <= 80 registers (3 blocks/SM).
11 and 12 sum y over the 16 states in another order: out within one storage ulp of 9 (float32 bound
for fp32), last state and checkpoints bitwise.
Backward (SSM_KERNELS_SSCAN_BWD_VARIANT): 9 = default (8 at B8 D1536, 5 at B4 D4096); 8 = v5 in 32-step
chunks, 3 blocks/SM; 10 = 8 with lanes remapped (uniform-pair B/C loads) and shuffle reductions;
11 = 8 with the remap only. 10 and 11 are bitwise equal to 8 (and to 5 / 2 / 0).

(a) checks: forward 11/12 vs 9 (out within rounding, last/ckpt bitwise) at 8 cases incl. both
    benchmark shapes, unaligned L, fp32/fp16, varlen; float64 reference (gpu_sscan.check_case: forward
    + every gradient with the default backward) for each forward variant at 2 cases and each backward
    variant at 5 cases; every gradient of backward 8/10/11 bitwise vs the default 9 at both shapes,
    varlen, fp16 unaligned.
(b) timing (do_bench median): forward (+ checkpoints) per forward variant, backward per backward
    variant, fwd+bwd of the best pair, mamba-ssm fwd and fwd+bwd, at B8 D1536 L2048 and B4 D4096 L4096
    N16 bf16 all features. Table last; exit 1 on any failed check.
"""
from __future__ import annotations

import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import gpu_sscan as gs  # noqa: E402
import gpu_sscan_bwd as gb  # noqa: E402  (set_fwd_variant, set_bwd_variant, fwd_args, rel_err, GRADS)
from ssm_kernels._backend import cuda_extension  # noqa: E402
from ssm_kernels.selective_scan import cuda as sc  # noqa: E402

DEV = "cuda"
T0 = time.time()
FWD = [int(x) for x in os.environ.get("FWD", "9,11,12").split(",")]
BWD = [int(x) for x in os.environ.get("BWD", "9,8,10,11").split(",")]
ROWS = gb.ROWS  # (section, case, variant, what, value): gpu_sscan_bwd.report prints them


def checks():
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    m = gs.make
    varlen = torch.tensor([0, 1, 700, 2049, 3000], dtype=torch.int32)
    for name, inp, cu, sp in gb.fwd_cases():  # 13 cases incl. both benchmark shapes
        gb.fwd_bitwise(name, inp, FWD, cu=cu, softplus=sp, rounding=(11, 12))
    for v in FWD[1:]:  # float64: this forward + the default backward on its checkpoints
        gb.set_fwd_variant(v)
        n0 = len(gs.FAILS)
        gs.check_case(f"fwd{v} bf16 L=2048 N=16 groups=2", m(2, 48, 2048, 16, bf16, groups=2, seed=44))
        gs.check_case(f"fwd{v} fp32 L=333 dim=80", m(2, 80, 333, 16, f32, seed=45))
        ROWS.append(("check", "float64 reference (2 cases)", f"fwd{v}", "ok",
                     "pass" if len(gs.FAILS) == n0 else f"FAIL ({len(gs.FAILS) - n0})"))
    gb.set_fwd_variant(FWD[0])
    for v in BWD[1:]:
        gb.set_bwd_variant(v)
        n0 = len(gs.FAILS)
        gs.check_case(f"bwd{v} bf16 L=4097 groups=2", m(2, 24, 4097, 16, bf16, groups=2, seed=1))
        gs.check_case(f"bwd{v} fp16 L=333", m(2, 40, 333, 16, f16, seed=2))
        gs.check_case(f"bwd{v} fp32 L=300 no D/z/bias/softplus",
                      m(2, 16, 300, 16, f32, D=False, z=False, bias=False, seed=3), softplus=False)
        gs.check_case(f"bwd{v} bf16 varlen 4 seqs", m(1, 40, 3000, 16, bf16, groups=2, nseq=4, seed=9),
                      cu=varlen)
        gs.check_case(f"bwd{v} bf16 L=600 dim=80", m(2, 80, 600, 16, bf16, seed=13))
        ROWS.append(("check", "float64 reference (5 cases)", f"bwd{v}", "ok",
                     "pass" if len(gs.FAILS) == n0 else f"FAIL ({len(gs.FAILS) - n0})"))
    gb.set_bwd_variant(BWD[0])
    gb.bitwise_checks("bf16 B=8 D=1536 L=2048 N=16", m(8, 1536, 2048, 16, bf16, seed=35), BWD)
    gb.bitwise_checks("bf16 B=4 D=4096 L=4096 N=16", m(4, 4096, 4096, 16, bf16, seed=36), BWD)
    gb.bitwise_checks("bf16 varlen (1, 699, 1349, 951)", m(1, 200, 3000, 16, bf16, groups=2, nseq=4,
                                                          seed=34), BWD, cu=varlen)
    gb.bitwise_checks("fp16 L=4093 no z", m(2, 96, 4093, 16, f16, z=False, seed=37), BWD)


def bench():
    mamba_scan = gs.mamba_peer()
    do = gb.do_bench
    for shape, a, dout, dlast in gb.shape_inputs():
        with torch.no_grad():
            tf = {}
            for fv in FWD:
                gb.set_fwd_variant(fv)
                ROWS.append(("bench", shape, f"fwd v{fv}", "fwd",
                             do(lambda: sc.selective_scan_fwd(*a, True, False))))
                tf[fv] = do(lambda: sc.selective_scan_fwd(*a, True, True))
                ROWS.append(("bench", shape, f"fwd v{fv}", "fwd+ckpt", tf[fv]))
            gb.set_fwd_variant(FWD[0])
            _, _, ck0 = sc.selective_scan_fwd(*a, True, True)
            tb = {}
            for bv in BWD:
                gb.set_bwd_variant(bv)
                tb[bv] = do(lambda: sc.selective_scan_bwd(*a, ck0, dout, dlast, True))
                ROWS.append(("bench", shape, f"bwd v{bv}", "bwd", tb[bv]))

            def fb():
                _, _, ck = sc.selective_scan_fwd(*a, True, True)
                sc.selective_scan_bwd(*a, ck, dout, dlast, True)
            for fv, bv in dict.fromkeys([(FWD[0], BWD[0]), (min(tf, key=tf.get), min(tb, key=tb.get))]):
                gb.set_fwd_variant(fv)
                gb.set_bwd_variant(bv)
                ROWS.append(("bench", shape, f"f{fv}+b{bv}", "fwd+bwd", do(fb)))
            gb.set_fwd_variant(FWD[0])
            gb.set_bwd_variant(BWD[0])
        gb.mamba_rows(mamba_scan, do, shape, a[:8], dout)
        print(f"[bench] {shape} done ({time.time() - T0:.0f} s)", flush=True)


def main():
    ext = cuda_extension()
    if ext is None or not hasattr(ext, "selective_scan_bwd_variant") or not gs.has_cuda_bwd():
        sys.exit("ssm_kernels._C without the CUDA backward / selective_scan_bwd_variant: rebuild")
    for v in FWD:
        gb.set_fwd_variant(v)  # raises if this build lacks a variant
    for v in BWD:
        gb.set_bwd_variant(v)
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, forward {FWD}, "
          f"backward {BWD}", flush=True)
    gs.run_parts((checks, bench), gs.FAILS)
    gs.write_csv("gpu_sscan10.csv", ["section", "case", "variant", "what", "value"], ROWS)
    gb.report()
    sys.exit(1 if gs.FAILS else 0)


if __name__ == "__main__":
    main()
