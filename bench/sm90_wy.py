"""Offline sm_90 audit of the delta rule's WY stage alone (`delta_rule.chunk._wy`, and `_wu` from a
saved T; --out: the whole forward, for its output kernel) at the benchmark's constexprs (bf16, H = HV, K = V = 128 or --k, BT = 64; 32 at K = 256) under knob settings:

    PYTHONPATH=$PWD python bench/sm90_wy.py [--knobs "WY_FAST=True,WY_FAST_WARPS=8"]
        [--gates 1,0] [--l2 0,1] [--sass DIR] [--ir DIR] [--bwd | --scan]

--bwd: the WY backward kernel alone (`_wy_bwd_kernel`, or `_wy_bwd_fast_kernel` with
WY_BWD_FAST=True) on placeholder operands. --scan: the forward's state scan instead (`_states`; with
DELTA_FWD=2 the fused scan + output of `chunk_delta_fwd`).

Compiles through bench/sm90_audit.py's stub driver (never launches; no GPU needed), a few seconds
per kernel instead of the whole forward + backward of bench/sm90_delta_bwd.py.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import sm90_audit as au  # noqa: E402
from sm90_delta_bwd import set_knobs, write_ir  # noqa: E402


def wy_cases(gates, l2s, load_t, K=128, bwd=False, scan=False, out=False):
    from ssm_kernels.delta_rule import chunk as wy
    B, T, H = 1, 300, 2
    for gated in gates:
        for l2 in l2s:
            def thunk_bwd(gated=gated, l2=l2):
                # the WY backward alone (`chunk._wy_backward`) on placeholder operands
                q, k, v = (torch.randn(B, T, H, K, dtype=torch.bfloat16) for _ in range(3))
                beta = torch.rand(B, T, H)
                g = F.logsigmoid(torch.randn(B, T, H)) if gated else None
                p = wy._plan(q, v, g, None)
                TOK = B * T
                tm = torch.zeros(TOK, H, p.BT)
                h = torch.zeros(p.NCH, H, K, K, dtype=p.hdtype)
                dvn = torch.zeros(TOK, H, K, dtype=p.wdtype)
                dke = torch.zeros(TOK, H, K)
                dge = torch.zeros(TOK, H)
                wy._wy_backward(p, k, v, g, beta, tm, h, dvn, dke, dge, bool(l2))

            def thunk(gated=gated, l2=l2):
                q, k, v = (torch.randn(B, T, H, K, dtype=torch.bfloat16) for _ in range(3))
                beta = torch.rand(B, T, H)
                g = F.logsigmoid(torch.randn(B, T, H)) if gated else None
                p = wy._plan(q, v, g, None)
                if out or (scan and wy.DELTA_FWD == 2):   # out: the whole no-grad forward
                    wy.chunk_delta_fwd(q, k, v, g, beta, None, None, K ** -0.5, bool(l2))
                elif scan:   # the engine's DELTA scan, or fwd._delta_fwd_kernel (DELTA_FWD=1)
                    wy._states(p, k, *wy._wu_buffers(p, k), g, None, bool(l2))
                else:
                    wy._wy(p, k, v, g, beta, bool(l2), False)
                if load_t:   # the backward's W, U from a saved T (SAVE_WY_INVERSE)
                    tm = torch.zeros(B * T, H, p.BT)
                    wy._wu(p, k, v, g, beta, bool(l2), *wy._wu_buffers(p, k), tm)
            yield (f"{'fwd' if out else 'fwd scan' if scan else 'wy'} gated={int(gated)} l2={l2} K=V={K}",
                   thunk_bwd if bwd else thunk)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--knobs", default="", help="KNOB=VALUE,... of delta_rule/chunk.py")
    ap.add_argument("--gates", default="1,0")
    ap.add_argument("--l2", default="0,1")
    ap.add_argument("--load-t", action="store_true", help="also W, U from a saved T")
    ap.add_argument("--k", type=int, default=128, help="K = V (256: BT = 32)")
    ap.add_argument("--bwd", action="store_true",
                    help="the WY backward (chunk._wy_backward) instead of the forward stage")
    ap.add_argument("--scan", action="store_true",
                    help="the forward's state scan (DELTA_FWD: delta_rule/fwd.py) instead")
    ap.add_argument("--out", action="store_true",
                    help="the whole forward (chunk_delta_fwd: WY, scan, output stage; "
                         "OUT_DECAY_O / OUT_BLOCK_V / OUT_WARPS act on the last)")
    ap.add_argument("--sass", metavar="DIR")
    ap.add_argument("--ir", metavar="DIR", help="write each kernel's TTGIR and PTX there")
    args = ap.parse_args()
    set_knobs(args.knobs)
    gates = [bool(int(x)) for x in args.gates.split(",")]
    l2s = [int(x) for x in args.l2.split(",")]
    au.FAMILIES["wy"] = lambda: wy_cases(gates, l2s, args.load_t, args.k, args.bwd,
                                                args.scan, args.out)
    rc = au.main(["--ops", "wy"] + (["--sass", args.sass] if args.sass else []))
    write_ir(args.ir)
    return rc


if __name__ == "__main__":
    sys.exit(main())
