"""First-call cost of each public op on the GPU: fwd + bwd at a typical bf16 shape, each op in
a fresh process with an empty Triton cache (what a user's first call pays), then the second call.

    python bench/gpu_first_call.py [--ops chunk_gla,chunk_gated_delta_rule] [--ahead 16]

The shapes and calls are bench/compile_audit.py's `first` ones (that script measures the same
calls' compile time offline), so the two tables line up row by row. The CUDA context is made
before the clock starts; the first call's time is compile + module load + the run itself.
Prints one table last: op | first call s | second call ms.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def child(op: str, ahead: int):
    import torch
    sys.path.insert(0, HERE)
    import compile_audit as ca   # sets a fresh, empty TRITON_CACHE_DIR at import
    torch.set_default_device("cuda")
    torch.zeros(1).sum().item()   # CUDA context and allocator outside the timing
    import ssm_kernels  # noqa: F401  (import time outside the timing too)
    thunk = ca._first_ops()[op]
    t0 = time.perf_counter()
    if ahead:   # ssm_kernels.compile_ahead's dry run (its kernels compiled in `ahead` threads)
        from ssm_kernels._warmup import compiling_ahead
        with compiling_ahead(ahead):
            thunk()
    thunk()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    thunk()
    torch.cuda.synchronize()
    second = time.perf_counter() - t0
    print("RESULT " + json.dumps({"op": op, "first_s": first, "second_ms": second * 1e3}))


def main():
    if len(sys.argv) > 3 and sys.argv[1] == "_child":
        child(sys.argv[2], int(sys.argv[3]))
        return 0
    sys.path.insert(0, HERE)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ops", default=None)
    ap.add_argument("--ahead", type=int, default=0, metavar="N",
                    help="compile ahead in N threads first (ssm_kernels.compile_ahead's dry run)")
    args = ap.parse_args()
    from compile_audit import FIRST_OPS
    ops = args.ops.split(",") if args.ops else FIRST_OPS
    rows = []
    for op in ops:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "_child", op, str(args.ahead)],
                           capture_output=True, text=True)
        res = [json.loads(ln[7:]) for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not res:
            rows.append((op, "FAILED", (p.stderr.strip().splitlines() or ["?"])[-1][:120]))
        else:
            rows.append((op, f"{res[0]['first_s']:.2f}", f"{res[0]['second_ms']:.1f}"))
    print(f"| op | first call s (cold cache{', compile_ahead %d threads' % args.ahead if args.ahead else ''}) "
          "| second call ms |")
    print("|---|---:|---:|")
    for op, a, b in rows:
        print(f"| {op} | {a} | {b} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
