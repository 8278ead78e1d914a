"""`python -m ssm_kernels check`: the registry of families and the loop that runs them.

FAMILIES maps a family name to a module with `check(backend, device, full=False) -> [CheckRow]`.
Each family check draws fresh random inputs (odd lengths, every feature on), runs forward and
backward on one backend and compares every output and gradient with the float64 reference.
`full=False` is the quick depth: every op and backend, one representative shape per dtype kind
(float32, a low precision, complex where the op takes it); `full=True` is the exhaustive sweep.
"""
from __future__ import annotations

import importlib
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

FAMILIES = {
    "linear_scan": "ssm_kernels.linear_scan.check",
    "selective_scan": "ssm_kernels.selective_scan.check",
    "linear_attn": "ssm_kernels.linear_attn.check",
    "based": "ssm_kernels.based.check",
    "delta_rule": "ssm_kernels.delta_rule.check",
    "fft_conv": "ssm_kernels.fft_conv.check",
    "causal_conv1d": "ssm_kernels.causal_conv1d.check",
}

# what each family covers, for `--help` and the summary
OPS = {
    "linear_scan": "linear_scan",
    "selective_scan": "selective_scan_fn, selective_state_update",
    "linear_attn": "chunk_linear_attn, chunk_simple_gla, chunk_gla, fused_recurrent_gla",
    "based": "chunk_based, fused_recurrent_based",
    "delta_rule": "chunk_gated_delta_rule, chunk_delta_rule, fused_recurrent_gated_delta_rule",
    "fft_conv": "fft_conv, s4d_kernel",
    "causal_conv1d": "causal_conv1d_fn, causal_conv1d_update",
}


@dataclass
class FamilyResult:
    family: str
    backend: str
    rows: list = field(default_factory=list)   # CheckRow
    seconds: float = 0.0
    error: Optional[str] = None                # a crash (also recorded as a failing row)

    @property
    def passed(self) -> int:
        return sum(r.verdict.ok for r in self.rows)

    @property
    def failed(self) -> int:
        return len(self.rows) - self.passed

    def worst(self):
        """The row closest to (or furthest past) its bound."""
        def ratio(r):
            b = r.verdict.bound
            return float("inf") if b <= 0 else r.verdict.err / b
        return max(self.rows, key=ratio) if self.rows else None


def run_family(family: str, backend: str, device: str, full: bool = False) -> FamilyResult:
    """One family on one backend; a crash becomes a failing row with the exception's message."""
    from .testing import CheckRow, Verdict
    res = FamilyResult(family, backend)
    t0 = time.perf_counter()
    try:
        mod = importlib.import_module(FAMILIES[family])
        res.rows = list(mod.check(backend, device, full=full))
    except Exception as e:  # reported in the table and the exit code, never swallowed
        res.error = traceback.format_exc()
        msg = " ".join(f"{type(e).__name__}: {e}".split())
        res.rows.append(CheckRow(f"{family} crashed ({msg[:300]})", backend, "-",
                                 Verdict("crash", float("inf"), 0.0)))
    if device == "cuda":
        import torch
        torch.cuda.synchronize()
    res.seconds = time.perf_counter() - t0
    return res


def compile_ahead_enabled(device: str, backend: str) -> bool:
    """On a GPU, a triton pair first dry-runs its check with the kernels compiling in threads
    (`ssm_kernels._warmup`) when SSM_KERNELS_CHECK_AHEAD=1. Off by default until it has run on
    a GPU (Triton 3.6 compiling in threads is unchecked)."""
    return (device == "cuda" and backend == "triton"
            and os.environ.get("SSM_KERNELS_CHECK_AHEAD", "0") == "1")


def _compile_ahead(family: str, backend: str, device: str, full: bool, threads: int) -> dict:
    """Dry-run the family's check (launches become compiles in `threads` threads; its verdicts
    are garbage and dropped), so the real run finds its kernels compiled. Best effort: a dry run
    that fails part-way leaves the rest to the real run, which reports any error itself."""
    from ._warmup import compiling_ahead
    with compiling_ahead(threads) as info:
        try:
            importlib.import_module(FAMILIES[family]).check(backend, device, full=full)
        except Exception:
            pass
    return info


def _run_pair(family: str, backend: str, device: str, full: bool, seed: int,
              threads: int = 0) -> FamilyResult:
    import torch
    t0 = time.perf_counter()
    if compile_ahead_enabled(device, backend):
        torch.manual_seed(seed)
        _compile_ahead(family, backend, device, full, threads or (os.cpu_count() or 2))
    torch.manual_seed(seed)   # the real run draws the same inputs with or without the dry run
    res = run_family(family, backend, device, full)
    res.seconds = time.perf_counter() - t0
    return res


# Triton compile seconds of each family's quick check for sm_90 (bench/compile_audit.py, offline,
# one core): the order in which `run` hands pairs to workers. Other backends compile nothing.
_TRITON_COMPILE_S = {"delta_rule": 39, "linear_attn": 19, "based": 12, "causal_conv1d": 6,
                     "linear_scan": 5, "selective_scan": 5,
                     "fft_conv": 6}  # 4 s before its quick check added monarch16 (x1.6 offline)


def _cost(family: str, backend: str) -> float:
    return _TRITON_COMPILE_S.get(family, 10) if backend == "triton" else 1.0


def default_jobs(device: str, pairs: int) -> int:
    """Worker processes for `run`: on a GPU most of a cold check is Triton compiling on the host,
    which runs in parallel over processes (the GPU work is small); on a CPU the kernels themselves
    are the work, so one process."""
    if device != "cuda":
        return 1
    return max(1, min(pairs, (os.cpu_count() or 2) // 2, 8))


def run(families: List[str], backends: List[str], device: str, full: bool = False, seed: int = 0,
        on_result: Optional[Callable[[FamilyResult], None]] = None,
        jobs: Optional[int] = None) -> List[FamilyResult]:
    """Every family on every backend; `on_result` sees each (family, backend) as it finishes, so a
    run cut short still reports what it did. Each pair is seeded with `seed` alone, so a subset
    (--ops/--backends) draws the same inputs as the whole run, and a pair draws the same inputs in
    a worker process (`jobs` > 1: pairs run concurrently, results come back in registry order)."""
    pairs = [(fam, be) for fam in families for be in backends]
    jobs = default_jobs(device, len(pairs)) if jobs is None else max(1, jobs)
    results = []
    if jobs == 1:
        for fam, be in pairs:
            r = _run_pair(fam, be, device, full, seed)
            results.append(r)
            if on_result is not None:
                on_result(r)
        return results
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    # longest first (the wall is about the longest pair when there are enough workers)
    order = sorted(pairs, key=lambda p: -_cost(*p))
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        # compile threads per worker: twice its share of the cores (pairs finish at different
        # times; the longest one then has the host to itself)
        threads = max(2, 2 * (os.cpu_count() or 2) // jobs)
        futures = {pool.submit(_run_pair, fam, be, device, full, seed, threads): (fam, be)
                   for fam, be in order}
        for fut in as_completed(futures):
            r = fut.result()
            results.append(r)
            if on_result is not None:
                on_result(r)
    return sorted(results, key=lambda r: pairs.index((r.family, r.backend)))


def summary(results: List[FamilyResult]) -> Dict[str, int]:
    return {"passed": sum(r.passed for r in results), "failed": sum(r.failed for r in results)}
