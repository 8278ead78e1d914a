"""One benchmark harness for every op (DESIGN.md, Performance method).

A family module yields `Case`s: a zero-argument callable doing the timed work (forward, or forward
and backward), plus the fewest bytes the op must move and its FLOPs. The harness measures the two
ceilings (device-to-device copy bandwidth, bf16 matmul rate) in the same run, times each case with
`triton.testing.do_bench` (median, after warm-up), computes the floor and writes long-format rows.
"""
from __future__ import annotations

import csv
import itertools
import os
import platform
import subprocess
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

COLUMNS = ["op", "impl", "mode", "shape", "dtype", "ms", "GB/s", "TFLOP/s", "floor_ms",
           "pct_of_floor", "device", "versions", "git_sha", "note"]


@dataclass
class Case:
    op: str                 # e.g. "linear_scan"
    impl: str               # "ssm_kernels.triton", "ssm_kernels.cuda", "accelerated_scan", ...
    mode: str               # "fwd" or "fwd+bwd"
    shape: str              # human-readable, e.g. "B=8 D=1536 T=4096 [B,T,D]"
    dtype: str
    fn: Callable[[], object]
    bytes: float            # fewest bytes the op must move (inputs once, outputs once)
    flops: float = 0.0      # useful floating-point work (0 for bandwidth-bound ops)
    note: str = ""


@dataclass
class Ceilings:
    copy_gbps: float        # bytes read + written per second, in GB/s
    matmul_tflops: float    # bf16 dense matmul
    device: str = ""


def measure_ceilings(device: str = "cuda") -> Ceilings:
    from triton.testing import do_bench
    copy = _copy_gbps(device)
    m = 8192
    p = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    q = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    ms = do_bench(lambda: p @ q, warmup=50, rep=300, return_mode="median")
    tflops = 2 * m ** 3 / (ms * 1e-3) / 1e12
    return Ceilings(copy, tflops, torch.cuda.get_device_name(device))


def _copy_gbps(device: str) -> float:
    """Device-to-device copy of 1 GiB of float32 (far beyond L2), bytes read + written per second."""
    from triton.testing import do_bench
    x = torch.empty(1 << 28, device=device, dtype=torch.float32).uniform_()
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    return 2 * x.numel() * 4 / (ms * 1e-3) / 1e9


def rotating(make: Callable[[], tuple], nbytes: int, l2_bytes: Optional[int] = None):
    """Return `next_inputs()` cycling over enough fresh copies of make()'s inputs that successive
    calls do not hit in L2 (inputs larger than twice L2 need no copies). The copies are made now,
    so family modules yield their cases one at a time (generators): a case's memory is freed
    before the next one is built."""
    if l2_bytes is None:
        l2_bytes = 64 << 20
        if torch.cuda.is_available():
            l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", l2_bytes)
    copies = max(1, min(16, -(-2 * l2_bytes // max(nbytes, 1))))
    it = itertools.cycle([make() for _ in range(copies)])
    return lambda: next(it)


def versions() -> str:
    parts = [f"torch {torch.__version__}"]
    try:
        import triton
        parts.append(f"triton {triton.__version__}")
    except ImportError:
        pass
    if torch.version.cuda:
        parts.append(f"cuda {torch.version.cuda}")
    return "; ".join(parts)


def git_sha() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:
        return os.environ.get("SSM_KERNELS_GIT_SHA", "unknown")


def time_case(case: Case, ceil: Optional[Ceilings], quick: bool = False) -> dict:
    from triton.testing import do_bench
    if ceil is None:  # CPU smoke run: one call, timed by the host clock, floor unknown
        import time
        case.fn()
        t0 = time.perf_counter()
        case.fn()
        ms = (time.perf_counter() - t0) * 1e3
    else:
        ms = do_bench(case.fn, warmup=25 if quick else 100, rep=100 if quick else 500,
                      return_mode="median")
    row = dict(op=case.op, impl=case.impl, mode=case.mode, shape=case.shape, dtype=case.dtype,
               ms=round(ms, 5), note=case.note, versions=versions(), git_sha=git_sha())
    row["GB/s"] = round(case.bytes / (ms * 1e-3) / 1e9, 1)
    row["TFLOP/s"] = round(case.flops / (ms * 1e-3) / 1e12, 2) if case.flops else ""
    if ceil is not None:
        floor = max(case.bytes / (ceil.copy_gbps * 1e9), case.flops / (ceil.matmul_tflops * 1e12)) * 1e3
        row.update(floor_ms=round(floor, 5), pct_of_floor=round(100 * floor / ms, 1), device=ceil.device)
    else:
        row.update(floor_ms="", pct_of_floor="", device=f"cpu ({platform.processor() or 'host'})")
    return row


def write_csv(rows: List[dict], path: str, columns: Optional[List[str]] = None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns or COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def plot(rows: List[dict], path: str) -> Optional[str]:
    """A bar chart of % of floor per case, one panel per op; None if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ops = sorted({r["op"] for r in rows})
    fig, axes = plt.subplots(len(ops), 1, figsize=(12, 3 + 0.28 * len(rows)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        sel = [r for r in rows if r["op"] == op]
        labels = [f"{r['impl']} {r['mode']} {r['dtype']} {r['shape']}" for r in sel]
        vals = [float(r["ms"]) for r in sel]
        ax.barh(range(len(sel)), vals)
        ax.set_yticks(range(len(sel)), labels, fontsize=6)
        ax.set_xlabel("ms (median)")
        ax.set_title(op)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def format_table(rows: List[dict]) -> str:
    cols = ["op", "impl", "mode", "shape", "dtype", "ms", "GB/s", "TFLOP/s", "pct_of_floor"]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)
