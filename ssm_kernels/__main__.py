"""Command line: `python -m ssm_kernels check|bench` (also installed as `ssm-kernels`).

check  runs every op on every backend available here against the float64 reference (fresh random
       inputs, odd lengths, forward and backward), prints per-family totals, exits 1 on any
       failure. Quick by default (representative shapes and dtypes); --full is the exhaustive sweep.
bench  the benchmark harness: ceilings, per-case first call and median, % of floor, speed-up over
       the best peer, a long CSV and one PNG per family. On a CPU it is a smoke run.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time

from ._checks import FAMILIES as CHECK_FAMILIES
from ._checks import OPS as FAMILY_OPS
from ._version import __version__
from .benchmarks import FAMILIES as _BENCH

BENCH_FAMILIES = tuple(_BENCH)
BACKENDS = ("cuda", "triton", "reference")


def _has_gpu() -> bool:
    import torch
    return torch.cuda.is_available()


def _ensure_interpreter_without_gpu() -> None:
    """On a machine with no GPU, let `check`/`bench` run the Triton kernels in the interpreter, as
    an explicit backend (must precede the kernels' import; `auto` still never picks it)."""
    if not _has_gpu() and "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"


def _versions() -> str:
    import torch

    from ._backend import triton_import_error
    parts = [f"ssm_kernels {__version__}", f"torch {torch.__version__}"]
    if torch.version.cuda:
        parts.append(f"CUDA {torch.version.cuda}")
    if triton_import_error() is None:
        import triton
        parts.append(f"triton {triton.__version__}")
    else:
        parts.append("no triton")
    parts.append(f"python {platform.python_version()}")
    return ", ".join(parts)


def _backend_lines(device: str, reasons: dict, chosen: list) -> list:
    from . import _config
    ran, skipped = [], []
    for name in BACKENDS:
        if name in chosen:
            note = ""
            if name == "triton" and device == "cpu" and _config.triton_interpret():
                note = " (Triton interpreter: a CPU test mode, slow; `auto` never picks it)"
            ran.append(name + note)
        elif reasons.get(name) is None:
            skipped.append(f"  {name}: not requested (--backends)")
        else:
            skipped.append(f"  {name}: {reasons[name]}")
    lines = [f"backends run: {', '.join(ran) or 'none'}"]
    if skipped:
        lines.append("backends skipped:")
        lines += skipped
    return lines


# ---- check -------------------------------------------------------------------------------------------


def _ratio_text(row) -> str:
    b = row.verdict.bound
    if b <= 0 or row.verdict.err == float("inf"):
        return "crash" if row.verdict.name == "crash" else "inf"
    return f"{100 * row.verdict.err / b:.0f}%"


def cmd_check(args, parser) -> int:
    _ensure_interpreter_without_gpu()
    from . import _backend, _checks

    device = args.device or ("cuda" if _has_gpu() else "cpu")
    if device == "cuda" and not _has_gpu():
        parser.error("--device cuda: no CUDA GPU is visible to torch here "
                     "(use --device cpu, or run on a GPU machine)")
    reasons = _backend.backend_reasons(device)
    available = [b for b in BACKENDS if reasons[b] is None]
    if args.backends:
        missing = [b for b in args.backends if reasons[b] is not None]
        if missing:
            parser.error("; ".join(f"--backends {b}: {reasons[b]}" for b in missing))
        chosen = [b for b in BACKENDS if b in args.backends]
    else:
        chosen = available
    families = args.ops or list(CHECK_FAMILIES)
    to_json = args.json is not None
    out = sys.stderr if args.json == "-" else sys.stdout  # keep stdout clean for `--json -`
    depth = "full sweep" if args.full else "quick: every op and backend, representative shapes; --full for the sweep"

    def say(*lines):
        for line in lines:
            print(line, file=out, flush=True)

    say(f"check on {device} ({depth})", _versions(), *_backend_lines(device, reasons, chosen), "")
    wf, wb = max(len(f) for f in families + ["family"]), 9
    header = (f"{'family'.ljust(wf)}  {'backend'.ljust(wb)}  checks  failed  seconds  "
              f"closest to its bound (error as % of bound)")
    w_op = 46

    def row_line(r, family):
        ok = r.verdict.ok
        return (f"  {r.op[:w_op].ljust(w_op)}  {r.backend:<9}  {r.dtype:<22}  "
                f"{r.verdict.err:<10.3e}  {r.verdict.bound:<9.2e}  {'pass' if ok else 'FAIL'}")

    if args.verbose:
        say(f"  {'op'.ljust(w_op)}  {'backend':<9}  {'dtype':<22}  {'rel err':<10}  {'bound':<9}  result")
    else:
        say(header)

    def on_result(res):
        if args.verbose:
            for r in res.rows:
                say(row_line(r, res.family))
            say(f"  -- {res.family} on {res.backend}: {res.passed} passed, {res.failed} failed, "
                f"{res.seconds:.1f} s")
        else:
            w = res.worst()
            worst = f"{_ratio_text(w)}: {w.op} ({w.dtype})" if w else "-"
            say(f"{res.family.ljust(wf)}  {res.backend.ljust(wb)}  {len(res.rows):>6}  {res.failed:>6}  "
                f"{res.seconds:>7.1f}  {worst[:90]}")
            for r in res.rows:
                if not r.verdict.ok:
                    say("    FAIL " + row_line(r, res.family).strip())
        if res.error and args.verbose:
            say(res.error)

    t0 = time.perf_counter()
    results = _checks.run(families, chosen, device, full=args.full, seed=args.seed, on_result=on_result,
                          jobs=args.jobs)
    secs = time.perf_counter() - t0
    tot = _checks.summary(results)
    say("", "per family:")
    for fam in families:
        rs = [r for r in results if r.family == fam]
        p, f = sum(r.passed for r in rs), sum(r.failed for r in rs)
        say(f"  {fam.ljust(wf)}  {p:>4} passed  {f:>3} failed  {sum(r.seconds for r in rs):>6.1f} s"
            f"  ({FAMILY_OPS.get(fam, '')})")
    say(f"{device}, {', '.join(chosen)}, {secs:.1f} s",
        f"check: {tot['passed']} passed, {tot['failed']} failed")
    if to_json:
        doc = dict(
            version=__version__, device=device, full=bool(args.full), seed=args.seed,
            versions=_versions(), seconds=round(secs, 2),
            backends={b: {"ran": b in chosen, "reason": reasons[b]} for b in BACKENDS},
            passed=tot["passed"], failed=tot["failed"],
            families=[dict(family=r.family, backend=r.backend, checks=len(r.rows), passed=r.passed,
                           failed=r.failed, seconds=round(r.seconds, 3), error=r.error)
                      for r in results],
            rows=[dict(family=res.family, op=r.op, backend=r.backend, dtype=r.dtype,
                       err=None if r.verdict.err == float("inf") else r.verdict.err,
                       bound=r.verdict.bound, ok=r.verdict.ok)
                  for res in results for r in res.rows],
        )
        text = json.dumps(doc, indent=1)
        if args.json == "-":
            print(text)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                f.write(text + "\n")
            say(f"wrote {args.json}")
    return 1 if tot["failed"] else 0


# ---- bench -------------------------------------------------------------------------------------------

_SKIP_ERRORS = ("BackendUnavailableError", "ModuleNotFoundError", "ImportError")


def cmd_bench(args, parser) -> int:
    # no interpreter here: a CPU smoke run times what `auto` runs on a CPU (the references), unless
    # the caller set TRITON_INTERPRET=1 to smoke-test the Triton kernels in the interpreter
    import torch

    from . import _backend
    from .benchmarks import FAMILIES
    from .benchmarks.harness import (add_speedups, measure_ceilings, plot, plot_unavailable,
                                     summary_lines, time_case, write_csv)
    device = "cuda" if _has_gpu() else "cpu"
    smoke = device == "cpu"
    print(_versions())
    reasons = _backend.backend_reasons(device)
    print(*_backend_lines(device, reasons, [b for b in BACKENDS if reasons[b] is None]), sep="\n")
    if smoke:
        print("SMOKE RUN: no CUDA GPU here, so these are not benchmarks. Each op runs a tiny case "
              "twice on what `auto` runs on a CPU (the references; TRITON_INTERPRET=1 adds the Triton "
              "kernels in the interpreter) so the harness itself is exercised; no GB/s or % of floor.")
        ceil = None
    else:
        ceil = measure_ceilings(device)
        print(f"{ceil.device}: copy {ceil.copy_gbps:.0f} GB/s (read+write), "
              f"bf16 matmul {ceil.matmul_tflops:.0f} TFLOP/s")
    rows, skipped, failed = [], {}, []
    cols = f"{'op':<22} {'impl':<34} {'mode':<7} {'dtype':<8} {'ms':>10} {'first ms':>9}"
    if not smoke:
        cols += f" {'GB/s':>7} {'% floor':>7}"
    print("\n" + cols + "  shape", flush=True)
    for fam in args.ops or list(BENCH_FAMILIES):
        try:
            mod = importlib.import_module(FAMILIES[fam])
            gen = mod.cases(device, args.quick)  # a generator: one case's inputs alive at a time
        except Exception as e:
            failed.append(f"{fam}: {type(e).__name__}: {e}")
            continue
        while True:
            try:
                case = next(gen)
            except StopIteration:
                break
            except Exception as e:  # building a case failed: the rest of the family is lost
                kind = "skipped" if type(e).__name__ in _SKIP_ERRORS else "failed"
                msg = f"{fam}: {type(e).__name__}: {str(e)[:300]}"
                (skipped.setdefault(msg, []).append(fam) if kind == "skipped" else failed.append(msg))
                break
            try:
                row = time_case(case, ceil, quick=args.quick)
            except Exception as e:
                what = f"{case.op} {case.impl} {case.mode} {case.dtype} {case.shape}"
                if type(e).__name__ in _SKIP_ERRORS:
                    reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
                    skipped.setdefault(reason, []).append(what)
                else:
                    failed.append(f"{what}: {type(e).__name__}: {str(e)[:300]}")
                    print(f"  FAILED {what}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            row["family"] = fam
            rows.append(row)
            write_csv(rows, args.out)  # after every case, so a cut-off run keeps its rows
            line = (f"{row['op']:<22} {row['impl']:<34} {row['mode']:<7} {row['dtype']:<8} "
                    f"{row['ms']:>10.4g} {row['first_call_ms']:>9.4g}")
            if not smoke:
                line += f" {row['GB/s']:>7} {row['pct_of_floor']:>7}"
            print(line + "  " + row["shape"], flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    add_speedups(rows)
    if ceil is not None:
        for name, val in (("copy", ceil.copy_gbps), ("matmul_bf16", ceil.matmul_tflops)):
            rows.append(dict(op="ceiling", impl="torch", mode=name, shape="", dtype="",
                             ms="", note=f"{val:.1f} {'GB/s' if name == 'copy' else 'TFLOP/s'}",
                             device=ceil.device))
    write_csv(rows, args.out)
    timed = [r for r in rows if r["op"] != "ceiling"]
    lines = summary_lines(timed)
    if lines:
        print("\nours vs the best peer, per case" + (" (smoke run: not meaningful)" if smoke else "") + ":")
        print("\n".join(lines))
    pngs = plot(timed, args.out, smoke=smoke) if timed else []
    print(f"\n{len(timed)} cases timed; wrote {args.out}" + (f" and {', '.join(pngs)}" if pngs else ""))
    if timed and not pngs:
        print(f"no plot: {plot_unavailable()}")
    for reason, whats in skipped.items():
        print(f"skipped {len(whats)} case(s): {reason}")
        for w in whats[:3]:
            print(f"    {w}")
    if failed:
        print(f"{len(failed)} case(s) failed:")
        for f in failed:
            print(f"    {f}")
    if smoke:
        print("(CPU smoke run: the timings above are not benchmarks; run on a GPU for numbers)")
    return 1 if failed else 0


# ---- entry point -------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    fams = ", ".join(f"{k} ({v})" for k, v in FAMILY_OPS.items())
    p = argparse.ArgumentParser(
        prog="python -m ssm_kernels",
        description="Check and benchmark the ssm_kernels ops on this machine.",
        epilog=f"Op families: {fams}.")
    p.add_argument("--version", action="version", version=f"ssm_kernels {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{check,bench}")
    c = sub.add_parser(
        "check", help="every op on every available backend vs the float64 reference; exit 1 on failure",
        description="Run every op on every backend available here against the float64 reference "
                    "(fresh random inputs, odd lengths, forward and every gradient). Quick by "
                    "default: one representative shape per dtype kind. Exit status: 0 all passed, "
                    "1 a check failed, 2 usage error.",
        epilog=f"Op families: {fams}.")
    c.set_defaults(parser=c)
    c.add_argument("--ops", nargs="+", choices=list(CHECK_FAMILIES), metavar="FAMILY",
                   help=f"op families to check (default: all): {', '.join(CHECK_FAMILIES)}")
    c.add_argument("--backends", nargs="+", choices=list(BACKENDS), metavar="BACKEND",
                   help="backends to check (default: every one available here): cuda, triton, reference")
    c.add_argument("--device", choices=["cpu", "cuda"],
                   help="where the inputs live (default: cuda if a GPU is visible, else cpu)")
    c.add_argument("--full", action="store_true",
                   help="the exhaustive sweep: every dtype x shape x variant (minutes on a GPU)")
    c.add_argument("--seed", type=int, default=0,
                   help="seed of the random inputs: each case of a family draws its own, from "
                        "torch seed SEED * 1000 + its index (default: 0)")
    c.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="also write the results as JSON to PATH (no PATH or '-': JSON on stdout, "
                        "the table on stderr)")
    c.add_argument("-v", "--verbose", action="store_true",
                   help="print every checked output and gradient, and tracebacks of crashes")
    c.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="worker processes; the (family, backend) pairs are cut into units of a few "
                        "cases that run longest first (default: on a GPU half the CPU cores up to 8, "
                        "since a cold check is mostly Triton compiling, one core per worker; 1 on a "
                        "CPU, where the kernels themselves are the work)")
    b = sub.add_parser(
        "bench", help="benchmark harness: medians, %% of floor, speed-up over peers, CSV + PNGs",
        description="Time every op and its peers (mamba-ssm, flash-linear-attention, "
                    "accelerated-scan, torch) in one process. On a GPU: first call, median, "
                    "GB/s, %% of floor, speed-up over the best peer. On a CPU: a smoke run.",
        epilog=f"Op families: {', '.join(BENCH_FAMILIES)}.")
    b.set_defaults(parser=b)
    b.add_argument("--ops", nargs="+", choices=list(BENCH_FAMILIES), metavar="FAMILY",
                   help=f"op families to time (default: all): {', '.join(BENCH_FAMILIES)}")
    b.add_argument("--out", default="results.csv", metavar="CSV",
                   help="long-format CSV to write (default: results.csv); plots go next to it as "
                        "<stem>_<family>.png")
    b.add_argument("--quick", action="store_true",
                   help="fewer shapes and repetitions (minutes instead of tens of minutes on a GPU)")
    return p


def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.cmd == "check":
        return cmd_check(args, args.parser)
    return cmd_bench(args, args.parser)


if __name__ == "__main__":
    sys.exit(main())
