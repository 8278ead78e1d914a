"""One benchmark harness for every op (DESIGN.md, Performance method).

A family module yields `Case`s: a zero-argument callable doing the timed work (forward, or forward
and backward), plus the fewest bytes the op must move and its FLOPs. On a GPU the harness measures
the two ceilings (device-to-device copy bandwidth, bf16 matmul rate) in the same run, times each
case's first call (compile + autotune) and then its median (`triton.testing.do_bench`, or CUDA
events when Triton is not installed), computes the floor and writes long-format rows. On a CPU it
is a smoke run: each case runs twice and is timed by the host clock, with no floor.

`plot()` draws one PNG per family: for each case (shape, dtype, mode) the implementations side by
side, ours first, as % of floor (GPU) or milliseconds on a log axis (CPU smoke runs), each bar
labelled with its time and, for ours, the speed-up over the best peer in the same case.
"""
from __future__ import annotations

import csv
import itertools
import os
import platform
import statistics
import subprocess
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

COLUMNS = ["op", "impl", "mode", "shape", "dtype", "ms", "GB/s", "TFLOP/s", "floor_ms",
           "pct_of_floor", "device", "versions", "git_sha", "note",
           "family", "first_call_ms", "speedup_vs_best_peer"]

OURS = "ssm_kernels"


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


def do_bench(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of fn() on the GPU: Triton's do_bench when Triton is importable, else
    the same idea with CUDA events (warm-up, then `rep` ms worth of timed calls)."""
    try:
        from triton.testing import do_bench as tdb
    except ImportError:
        tdb = None
    if tdb is not None:
        return tdb(fn, warmup=warmup, rep=rep, return_mode="median")
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(max(1, int(warmup / est))):
        fn()
    times = []
    for _ in range(max(5, min(1000, int(rep / est)))):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def capture(fn: Callable[[], object], calls: int = 1, warmup: int = 3) -> "torch.cuda.CUDAGraph":
    """`calls` back-to-back calls of fn captured in one CUDA graph, after `warmup` calls on a side
    stream (compilation, autotuning and lazy caches happen off the capture stream). Raises what
    the capture raises: a capture failing is the caller's finding to report."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def measure_ceilings(device: str = "cuda") -> Ceilings:
    copy = _copy_gbps(device)
    m = 8192
    p = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    q = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    ms = do_bench(lambda: p @ q, warmup=50, rep=300)
    tflops = 2 * m ** 3 / (ms * 1e-3) / 1e12
    return Ceilings(copy, tflops, torch.cuda.get_device_name(device))


def _copy_gbps(device: str) -> float:
    """Device-to-device copy of 1 GiB of float32 (far beyond L2), bytes read + written per second."""
    x = torch.empty(1 << 28, device=device, dtype=torch.float32).uniform_()
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=50, rep=300)
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


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_case(case: Case, ceil: Optional[Ceilings], quick: bool = False) -> dict:
    """One row: first-call time (compile + autotune on a fresh process), then the median (GPU) or a
    second call by the host clock (CPU smoke run, no floor)."""
    _sync()
    t0 = time.perf_counter()
    case.fn()
    _sync()
    first_ms = (time.perf_counter() - t0) * 1e3
    if ceil is None:  # CPU smoke run: one more call, timed by the host clock, floor unknown
        t0 = time.perf_counter()
        case.fn()
        ms = (time.perf_counter() - t0) * 1e3
    else:
        ms = do_bench(case.fn, warmup=25 if quick else 100, rep=100 if quick else 500)
    row = dict(op=case.op, impl=case.impl, mode=case.mode, shape=case.shape, dtype=case.dtype,
               ms=round(ms, 5), first_call_ms=round(first_ms, 1), note=case.note,
               versions=versions(), git_sha=git_sha())
    if ceil is not None:
        row["GB/s"] = round(case.bytes / (ms * 1e-3) / 1e9, 1)
        row["TFLOP/s"] = round(case.flops / (ms * 1e-3) / 1e12, 2) if case.flops else ""
        floor = max(case.bytes / (ceil.copy_gbps * 1e9), case.flops / (ceil.matmul_tflops * 1e12)) * 1e3
        row.update(floor_ms=round(floor, 5), pct_of_floor=round(100 * floor / ms, 1), device=ceil.device)
    else:  # rates of a CPU smoke run mean nothing: leave them empty
        row.update({"GB/s": "", "TFLOP/s": "", "floor_ms": "", "pct_of_floor": "",
                    "device": f"cpu ({platform.processor() or platform.machine() or 'host'})"})
        if "interpreter" not in row["note"] and case.impl == f"{OURS}.triton":
            row["note"] = ("Triton interpreter (CPU smoke run) " + row["note"]).strip()
    return row


def write_csv(rows: List[dict], path: str, columns: Optional[List[str]] = None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns or COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


# ---- peers: speed-up of ours over the best peer in the same case ------------------------------------

def is_ours(row: dict) -> bool:
    return str(row.get("impl", "")).startswith(OURS)


def _groups(rows: List[dict]) -> "OrderedDict[Tuple, List[dict]]":
    """Rows of one case (family, mode, shape, dtype) together, in first-seen order. Ops with no
    implementation of ours in a family (torch SDPA in linear_attn) are peers of every op there."""
    baseline_ops = set()
    by_fam: Dict[str, set] = {}
    for r in rows:
        by_fam.setdefault(r.get("family") or r["op"], set()).add((r["op"], is_ours(r)))
    for fam, pairs in by_fam.items():
        ops = {op for op, _ in pairs}
        ours = {op for op, o in pairs if o}
        baseline_ops |= {(fam, op) for op in ops - ours} if ours else set()
    groups: "OrderedDict[Tuple, List[dict]]" = OrderedDict()
    for r in rows:
        fam = r.get("family") or r["op"]
        key = (fam, r["mode"], r["shape"], r["dtype"])
        groups.setdefault(key, []).append(r)
    out: "OrderedDict[Tuple, List[dict]]" = OrderedDict()
    for (fam, mode, shape, dtype), grp in groups.items():
        ops = [op for op in OrderedDict.fromkeys(r["op"] for r in grp) if (fam, op) not in baseline_ops]
        base = [r for r in grp if (fam, r["op"]) in baseline_ops]
        for op in ops or [None]:
            sel = [r for r in grp if r["op"] == op] + base if op is not None else grp
            out[(fam, op or grp[0]["op"], mode, shape, dtype)] = sel
    return out


def add_speedups(rows: List[dict]) -> None:
    """Set `speedup_vs_best_peer` (best peer's ms / ours) on each of our rows that has a peer."""
    for grp in _groups(rows).values():
        peers = [float(r["ms"]) for r in grp if not is_ours(r) and r.get("ms") not in ("", None)]
        for r in grp:
            if is_ours(r) and peers:
                r["speedup_vs_best_peer"] = round(min(peers) / float(r["ms"]), 2)


def summary_lines(rows: List[dict]) -> List[str]:
    """One line per case that has peers: our best impl against the best peer."""
    lines = []
    for (fam, op, mode, shape, dtype), grp in _groups(rows).items():
        ours = [r for r in grp if is_ours(r)]
        peers = [r for r in grp if not is_ours(r)]
        if not ours or not peers:
            continue
        o = min(ours, key=lambda r: float(r["ms"]))
        p = min(peers, key=lambda r: float(r["ms"]))
        ratio = float(p["ms"]) / float(o["ms"])
        verdict = "faster" if ratio >= 1 else "slower"
        lines.append(f"  {op:<22} {mode:<7} {dtype:<8} {shape:<40} {o['impl']} {float(o['ms']):.4g} ms "
                     f"vs {p['impl']} {float(p['ms']):.4g} ms: {ratio:.2f}x ({verdict})")
    return lines


# ---- plots: one figure per family ----------------------------------------------------------------------

def _wrap(text: str, width: int = 34) -> str:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    lines.append(cur)
    return "\n".join(lines)


def plot_unavailable() -> Optional[str]:
    """None if plots can be drawn here, else why not."""
    try:
        import matplotlib  # noqa: F401
        return None
    except ImportError as e:
        if getattr(e, "name", None) == "matplotlib":
            return "matplotlib is not installed (pip install 'ssm_kernels[bench]')"
        return f"matplotlib cannot be imported ({e}; pip install 'ssm_kernels[bench]')"


def plot(rows: List[dict], path: str, smoke: bool = False) -> List[str]:
    """One PNG per family next to `path` (`<stem>_<family>.png`); [] if matplotlib is missing.

    Each case (op, mode, shape, dtype) is a group of horizontal bars, one per implementation, ours
    first. GPU runs plot % of floor (longer is better, 100% = the op moves its bytes at the copy
    bandwidth or does its FLOPs at the matmul rate); CPU smoke runs have no floor and plot ms on a
    log axis (shorter is better). Bars are labelled with ms and, for ours, the speed-up over the
    best peer of the same case.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = [r for r in rows if r.get("op") != "ceiling" and r.get("ms") not in ("", None)]
    add_speedups(rows)
    use_floor = not smoke and all(r.get("pct_of_floor") not in ("", None) for r in rows)
    stem = os.path.splitext(path)[0]
    families = list(OrderedDict.fromkeys(r.get("family") or r["op"] for r in rows))
    impls_all = list(OrderedDict.fromkeys(
        sorted((r["impl"] for r in rows), key=lambda i: (not i.startswith(OURS), i))))
    cmap = plt.get_cmap("tab10")
    colors = {impl: cmap(i % 10) for i, impl in enumerate(impls_all)}
    written = []
    for fam in families:
        groups = [(k, g) for k, g in _groups([r for r in rows if (r.get("family") or r["op"]) == fam]).items()]
        nbars = sum(len(g) for _, g in groups)
        fig_h = 1.2 + 0.32 * nbars + 0.25 * len(groups)
        fig, ax = plt.subplots(figsize=(13, max(3.0, fig_h)))
        y, yticks, ylabels, seen = 0.0, [], [], set()
        for (f_, op, mode, shape, dtype), grp in groups:
            grp = sorted(grp, key=lambda r: (not is_ours(r), r["impl"]))
            top = y
            for r in grp:
                val = float(r["pct_of_floor"]) if use_floor else float(r["ms"])
                label = r["impl"] if r["op"] == op else f"{r['impl']} ({r['op']})"
                ax.barh(y, val, height=0.8, color=colors[r["impl"]],
                        label=r["impl"] if r["impl"] not in seen else None,
                        edgecolor="black" if is_ours(r) else "none", linewidth=0.6)
                seen.add(r["impl"])
                txt = f"{float(r['ms']):.3g} ms"
                if use_floor:
                    txt += f"  ({float(r['pct_of_floor']):.0f}% of floor)"
                sp = r.get("speedup_vs_best_peer")
                if sp not in ("", None):
                    txt += f"  {float(sp):.2f}x vs best peer"
                ax.text(val, y, "  " + txt, va="center", fontsize=7)
                yticks.append(y)
                ylabels.append(label)
                y += 1
            ax.text(-0.01, (top + y - 1) / 2, _wrap(f"{op} {mode} {dtype} {shape}", 30),
                    transform=ax.get_yaxis_transform(), ha="right", va="center", fontsize=7.5,
                    fontweight="bold")
            ax.axhline(y - 0.5 + 0.25, color="0.8", linewidth=0.5)
            y += 0.5
        ax.set_yticks(yticks)
        ax.set_yticklabels([""] * len(yticks))
        ax.tick_params(axis="y", length=0)
        ax.invert_yaxis()
        if use_floor:
            ax.set_xlabel("% of floor (max of bytes / copy bandwidth, FLOPs / matmul rate over time; "
                          "longer is better)")
            hi = max(float(r["pct_of_floor"]) for _, g in groups for r in g)
            ax.set_xlim(0, max(100.0, hi) * 1.45)
            ax.axvline(100, color="0.5", linestyle="--", linewidth=0.8)
        else:
            ax.set_xscale("log")
            ax.set_xlabel("ms per call, log scale (shorter is better)")
            lo = min(float(r["ms"]) for _, g in groups for r in g)
            hi = max(float(r["ms"]) for _, g in groups for r in g)
            ax.set_xlim(lo / 2, hi * 30)
        title = f"{fam}: implementations side by side per case"
        if smoke:
            title += " — CPU SMOKE RUN (tiny shapes; not a benchmark)"
        dev = next((r.get("device") for r in rows if r.get("device")), "")
        H = max(3.0, fig_h) + 0.9
        fig.set_size_inches(13, H)
        fig.suptitle(f"{title}\n{dev}; {versions()}", fontsize=9, y=1 - 0.12 / H)
        ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=4, fontsize=7.5, frameon=False)
        fig.subplots_adjust(left=0.27, right=0.98, top=1 - 1.05 / H, bottom=0.6 / H)
        out = f"{stem}_{fam}.png"
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written


def format_table(rows: List[dict], cols: Optional[List[str]] = None) -> str:
    """Aligned text table of `rows` (any number, including none)."""
    cols = cols or ["op", "impl", "mode", "dtype", "ms", "first_call_ms", "GB/s", "TFLOP/s",
                    "pct_of_floor", "speedup_vs_best_peer", "shape"]
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols).rstrip()]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols).rstrip() for r in rows]
    return "\n".join(lines)
