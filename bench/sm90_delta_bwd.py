"""Offline sm_90 audit of the delta rule's kernels at the benchmark's own constexprs (H = HV,
so GR = 1; with and without the in-kernel L2 norm) under knob settings of delta_rule/chunk.py:

    PYTHONPATH=$PWD python bench/sm90_delta_bwd.py [--knobs "DQK_DELTA=True,SG_DELTA=True"]
        [--sass DIR] [--only TEXT] [--ops delta_main,delta_rule]

Reuses bench/sm90_audit.py (compile through its stub driver, never launch; no GPU needed).
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


def main_shape_cases():
    from ssm_kernels import chunk_delta_rule, chunk_gated_delta_rule
    Bc, Tc, Hc, Kc = 1, 300, 2, 128
    for gated in (True, False):
        for l2 in (False, True):
            def thunk(gated=gated, l2=l2):
                q, k, v = (torch.randn(Bc, Tc, Hc, Kc, dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3))
                beta = torch.rand(Bc, Tc, Hc, requires_grad=True)
                if gated:
                    g = F.logsigmoid(torch.randn(Bc, Tc, Hc)).requires_grad_()
                    o, _ = chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=l2)
                else:
                    o, _ = chunk_delta_rule(q, k, v, beta, use_qk_l2norm_in_kernel=l2)
                o.float().sum().backward()
            name = "chunk_gated_delta_rule" if gated else "chunk_delta_rule"
            yield f"{name} bf16 H=HV K=V=128 l2={int(l2)}", thunk


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--knobs", default="", help="KNOB=VALUE,... of delta_rule/chunk.py")
    ap.add_argument("--sass", metavar="DIR")
    ap.add_argument("--ir", metavar="DIR", help="write each kernel's TTGIR and PTX there")
    ap.add_argument("--only", default="")
    ap.add_argument("--ops", default="delta_main",
                    help="delta_main (this file's cases) and/or delta_rule (sm90_audit's, GVA)")
    args = ap.parse_args()
    set_knobs(args.knobs)
    au.FAMILIES["delta_main"] = main_shape_cases
    argv = ["--ops", args.ops] + (["--sass", args.sass] if args.sass else []) + (
        ["--only", args.only] if args.only else [])
    rc = au.main(argv)
    write_ir(args.ir)
    return rc


def set_knobs(text):
    """KNOB=VALUE,... (Python literals) set on ssm_kernels.delta_rule.chunk."""
    from ssm_kernels.delta_rule import chunk as wy
    for kv in filter(None, text.split(",")):
        kk, _, vv = kv.partition("=")
        if not hasattr(wy, kk.strip()):
            raise SystemExit(f"no knob {kk!r} in delta_rule/chunk.py")
        setattr(wy, kk.strip(), eval(vv))   # noqa: S307 (Python literals)


def write_ir(path):
    """Each compiled kernel's TTGIR and PTX into `path` (None: nothing)."""
    if not path:
        return
    os.makedirs(path, exist_ok=True)
    for rec in au.compiled.values():
        for kind in ("ttgir", "ptx"):
            text = rec["kernel"].asm.get(kind)
            if text:
                with open(os.path.join(path, f"{rec['name']}.{kind}"), "w") as f:
                    f.write(text if isinstance(text, str) else text.decode())


if __name__ == "__main__":
    sys.exit(main())
