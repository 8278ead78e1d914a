"""Command line: `python -m ssm_kernels check|bench`.

check  runs every registered op on every backend available here against the float64 reference
       (fresh random inputs, odd lengths, backward included), prints a table, exits 1 on failure.
bench  the benchmark harness: ceilings, per-case medians, % of floor, long CSV and a PNG plot.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys


def _device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _ensure_interpreter_without_gpu() -> None:
    """On a machine with no GPU, run Triton kernels in the interpreter (must precede their import)."""
    import torch
    if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"


def cmd_check(args) -> int:
    _ensure_interpreter_without_gpu()
    import torch

    from . import available_backends
    from ._checks import FAMILIES
    device = args.device or _device()
    torch.manual_seed(args.seed)
    families = args.ops or list(FAMILIES)
    rows, failed = [], 0
    w = 44
    print(f"{'op'.ljust(w)}  backend    dtype      max rel err  bound      result", flush=True)
    for fam in families:
        if fam not in FAMILIES:
            print(f"unknown op family {fam!r}; known: {', '.join(FAMILIES)}", file=sys.stderr)
            return 2
        mod = importlib.import_module(FAMILIES[fam])
        for backend in available_backends(device):
            try:
                new = mod.check(backend, device)
            except Exception as e:  # a crash is a failure, reported in the table
                from .testing import CheckRow, Verdict
                new = [CheckRow(f"{fam} ({type(e).__name__}: {str(e)[:60]})", backend, "-",
                                Verdict("crash", float("inf"), 0.0))]
            for r in new:  # printed as each family finishes, so a cut-off run still reports
                ok = r.verdict.ok
                failed += not ok
                print(f"{r.op.ljust(w)}  {r.backend:<9}  {r.dtype:<9}  {r.verdict.err:<11.3e}  "
                      f"{r.verdict.bound:<9.2e}  {'pass' if ok else 'FAIL'}", flush=True)
            rows.extend(new)
    print(f"\n{len(rows) - failed} passed, {failed} failed on {device}")
    return 1 if failed else 0


def cmd_bench(args) -> int:
    _ensure_interpreter_without_gpu()
    import torch

    from .benchmarks import FAMILIES
    from .benchmarks.harness import format_table, measure_ceilings, plot, time_case, write_csv
    device = _device()
    if device == "cpu":
        print("No CUDA GPU here: timings need a GPU. Running a tiny smoke case of each op "
              "(Triton interpreter / reference) so the harness itself is exercised.")
        ceil = None
    else:
        ceil = measure_ceilings(device)
        print(f"{ceil.device}: copy {ceil.copy_gbps:.0f} GB/s (read+write), "
              f"bf16 matmul {ceil.matmul_tflops:.0f} TFLOP/s")
    rows = []
    for fam in args.ops or list(FAMILIES):
        if fam not in FAMILIES:
            print(f"unknown op family {fam!r}; known: {', '.join(FAMILIES)}", file=sys.stderr)
            return 2
        mod = importlib.import_module(FAMILIES[fam])
        for case in mod.cases(device, args.quick):  # a generator: one case's inputs alive at a time
            try:
                row = time_case(case, ceil, quick=args.quick)
            except Exception as e:
                print(f"  {case.op} {case.impl} {case.mode} {case.shape}: failed: {type(e).__name__}: "
                      f"{str(e)[:200]}", file=sys.stderr)
                continue
            rows.append(row)
            write_csv(rows, args.out)  # after every case, so a cut-off run keeps its rows
            print(f"  {row['op']:<14} {row['impl']:<28} {row['mode']:<8} {row['dtype']:<9} "
                  f"{row['shape']:<34} {row['ms']:>9.4f} ms  {row['GB/s']:>7} GB/s  "
                  f"{row['pct_of_floor'] or '-'}% of floor", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    if ceil is not None:
        for name, val in (("copy", ceil.copy_gbps), ("matmul_bf16", ceil.matmul_tflops)):
            rows.append(dict(op="ceiling", impl="torch", mode=name, shape="", dtype="",
                             ms="", note=f"{val:.1f} {'GB/s' if name == 'copy' else 'TFLOP/s'}",
                             device=ceil.device))
    write_csv(rows, args.out)
    png = plot([r for r in rows if r["op"] != "ceiling"], os.path.splitext(args.out)[0] + ".png")
    print(f"\nwrote {args.out}" + (f" and {png}" if png else ""))
    print(format_table([r for r in rows if r["op"] != "ceiling"]))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ssm_kernels")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="every op on every available backend vs the float64 reference")
    c.add_argument("--ops", nargs="*", help="op families (default: all)")
    c.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    c.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("bench", help="benchmark harness: CSV + PNG")
    b.add_argument("--ops", nargs="*", help="op families (default: all)")
    b.add_argument("--out", default="results.csv")
    b.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = p.parse_args(argv)
    return cmd_check(args) if args.cmd == "check" else cmd_bench(args)


if __name__ == "__main__":
    sys.exit(main())
