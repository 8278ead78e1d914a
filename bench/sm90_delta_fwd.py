"""Offline sm_90 audit of the delta rule's forward state scan (`delta_rule.chunk._states`: the
engine's DELTA `_state_kernel`, or `fwd._delta_fwd_kernel` with DELTA_FWD=1) and, with
DELTA_FWD=2, of the fused scan + output (`chunk_delta_fwd`), at the benchmark's constexprs (bf16,
H = HV, K = V = 128, BT = 64) under knob settings:

    PYTHONPATH=$PWD python bench/sm90_delta_fwd.py [--knobs "DELTA_FWD=1,DELTA_FWD_BV=32"]
        [--gates 1,0] [--l2 0,1] [--sass DIR] [--ir DIR]

Compiles through bench/sm90_audit.py's stub driver (never launches; no GPU needed).
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


def scan_cases(gates, l2s, K=128):
    from ssm_kernels.delta_rule import chunk as wy
    B, T, H = 1, 300, 2
    for gated in gates:
        for l2 in l2s:
            def thunk(gated=gated, l2=l2):
                q, k, v = (torch.randn(B, T, H, K, dtype=torch.bfloat16) for _ in range(3))
                beta = torch.rand(B, T, H)
                g = F.logsigmoid(torch.randn(B, T, H)) if gated else None
                p = wy._plan(q, v, g, None)
                w, u = wy._wu_buffers(p, k)
                if wy.DELTA_FWD == 2:
                    wy.chunk_delta_fwd(q, k, v, g, beta, None, None, K ** -0.5, bool(l2))
                else:
                    wy._states(p, k, w, u, g, None, bool(l2))
            yield f"fwd scan gated={int(gated)} l2={l2} K=V={K}", thunk


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--knobs", default="", help="KNOB=VALUE,... of delta_rule/chunk.py")
    ap.add_argument("--gates", default="1,0")
    ap.add_argument("--l2", default="0,1")
    ap.add_argument("--k", type=int, default=128, help="K = V")
    ap.add_argument("--sass", metavar="DIR")
    ap.add_argument("--ir", metavar="DIR", help="write each kernel's TTGIR and PTX there")
    args = ap.parse_args()
    set_knobs(args.knobs)
    gates = [bool(int(x)) for x in args.gates.split(",")]
    l2s = [int(x) for x in args.l2.split(",")]
    au.FAMILIES["fwdscan"] = lambda: scan_cases(gates, l2s, args.k)
    rc = au.main(["--ops", "fwdscan"] + (["--sass", args.sass] if args.sass else []))
    write_ir(args.ir)
    return rc


if __name__ == "__main__":
    sys.exit(main())
