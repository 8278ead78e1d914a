"""`python -m ssm_kernels check`: the registry of families and the loop that runs them.

FAMILIES maps a family name to a module with `cases(backend, device, full=False)` (its cases, in
report order), `check_case(backend, device, case) -> [CheckRow]` and `check(...)`, both together
(`testing.check_from_cases`); `run` seeds and runs the cases, spread over worker processes in
units of a few cases (`plan_units`), and gives the rows back per (family, backend) pair in case
order. A module with only `check()` runs whole. Each case draws fresh random inputs (odd lengths,
every feature on), runs forward and backward on one backend and compares every output and
gradient with the float64 reference.
`full=False` is the quick depth: every op and backend, one representative shape per dtype kind
(float32, a low precision, complex where the op takes it); `full=True` is the exhaustive sweep.
"""
from __future__ import annotations

import importlib
import math
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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


def case_seed(seed: int, index: int) -> int:
    """The torch seed of case `index` of a (family, backend) pair. Each case draws its inputs
    alone, so it gives the same rows run serially, in any worker or shard, or in a subset of the
    run (--ops/--backends)."""
    return seed * 1000 + index


def list_cases(family: str, backend: str, device: str, full: bool = False) -> Optional[list]:
    """The pair's cases (`cases()` of the family's check module), or None for a module with only
    a whole-family `check()` or whose listing fails (run whole: its worker reports the error)."""
    try:
        mod = importlib.import_module(FAMILIES[family])
        if not (hasattr(mod, "cases") and hasattr(mod, "check_case")):
            return None
        return list(mod.cases(backend, device, full))
    except Exception:
        return None


def run_family(family: str, backend: str, device: str, full: bool = False, seed: int = 0,
               cases: Optional[Sequence[int]] = None) -> FamilyResult:
    """One family on one backend, or only the cases with indices `cases` of it (None: all), each
    seeded with `case_seed(seed, index)`; a module without `cases()` runs its `check()` seeded with
    `seed`. A crash becomes a failing row with the exception's message (and ends that case only)."""
    from .testing import CheckRow, Verdict
    import torch
    res = FamilyResult(family, backend)
    t0 = time.perf_counter()
    errors = []

    def crash(e):  # reported in the table and the exit code, never swallowed
        errors.append(traceback.format_exc())
        msg = " ".join(f"{type(e).__name__}: {e}".split())
        res.rows.append(CheckRow(f"{family} crashed ({msg[:300]})", backend, "-",
                                 Verdict("crash", float("inf"), 0.0)))
    try:
        mod = importlib.import_module(FAMILIES[family])
        whole = not (hasattr(mod, "cases") and hasattr(mod, "check_case"))
        todo = None if whole else list(mod.cases(backend, device, full))
    except Exception as e:
        crash(e)
        whole, todo = True, None
    if whole and not errors:
        torch.manual_seed(seed)
        try:
            res.rows = list(mod.check(backend, device, full=full))
        except Exception as e:
            crash(e)
    elif not whole:
        for i in (range(len(todo)) if cases is None else cases):
            torch.manual_seed(case_seed(seed, i))
            try:
                res.rows += list(mod.check_case(backend, device, todo[i]))
            except Exception as e:
                crash(e)
    if device == "cuda":
        torch.cuda.synchronize()
    res.error = "\n".join(errors) or None
    res.seconds = time.perf_counter() - t0
    return res


def compile_ahead_enabled(device: str, backend: str) -> bool:
    """On a GPU, a triton pair first dry-runs its check with the kernels compiling in threads
    (`ssm_kernels._warmup`) when SSM_KERNELS_CHECK_AHEAD=1. Off by default until it has run on
    a GPU (Triton 3.6 compiling in threads is unchecked)."""
    return (device == "cuda" and backend == "triton"
            and os.environ.get("SSM_KERNELS_CHECK_AHEAD", "0") == "1")


def _compile_ahead(family: str, backend: str, device: str, full: bool, threads: int,
                   seed: Optional[int] = None, cases: Optional[Sequence[int]] = None) -> dict:
    """Dry-run the family's check, or the cases `cases` of it seeded as `run_family` seeds them
    (launches become compiles in `threads` threads; its verdicts are garbage and dropped), so the
    real run finds its kernels compiled. Best effort: a dry run that fails part-way leaves the rest
    to the real run, which reports any error itself."""
    from ._warmup import compiling_ahead
    with compiling_ahead(threads) as info:
        try:
            mod = importlib.import_module(FAMILIES[family])
            if cases is None:
                mod.check(backend, device, full=full)
            else:
                import torch
                todo = list(mod.cases(backend, device, full))
                for i in cases:
                    if seed is not None:
                        torch.manual_seed(case_seed(seed, i))
                    mod.check_case(backend, device, todo[i])
        except Exception:
            pass
    return info


@dataclass(frozen=True)
class Unit:
    """What one worker runs at a time: the cases `cases` (indices, in order) of one (family,
    backend) pair, or the whole pair (None: a module without `cases()`); `cost` in estimated
    seconds orders the units longest first."""
    family: str
    backend: str
    cases: Optional[Tuple[int, ...]]
    cost: float


def _run_unit(unit: Unit, device: str, full: bool, seed: int, threads: int = 0) -> FamilyResult:
    t0 = time.perf_counter()
    if compile_ahead_enabled(device, unit.backend):
        _compile_ahead(unit.family, unit.backend, device, full, threads or (os.cpu_count() or 2),
                       seed, unit.cases)
    res = run_family(unit.family, unit.backend, device, full, seed, unit.cases)
    res.seconds = time.perf_counter() - t0
    return res


# Seconds of each (family, backend) pair in a cold `check --jobs 8` on an H100 (Triton 3.6, 16
# cores; session 8, one pair per worker): the estimated cost of the units `run` hands to workers,
# spread evenly over a pair's cases. Pairs not listed took < 6 s.
_PAIR_SECONDS = {("delta_rule", "triton"): 63, ("linear_attn", "triton"): 37,
                 ("fft_conv", "triton"): 27, ("based", "triton"): 27,
                 ("selective_scan", "triton"): 18, ("causal_conv1d", "triton"): 17,
                 ("linear_scan", "triton"): 14, ("delta_rule", "reference"): 9,
                 ("linear_attn", "reference"): 8}


def _cost(family: str, backend: str) -> float:
    return float(_PAIR_SECONDS.get((family, backend), 3))


def plan_units(pairs: List[Tuple[str, str]], n_cases: Dict[Tuple[str, str], Optional[int]],
               jobs: int, split: bool = True) -> List[Unit]:
    """The units of a run, in the order workers take them. One worker (`jobs` 1): one unit per
    pair with all its cases, in registry order. Several: a pair is cut into k units of
    consecutive cases (sizes differing by at most one), k = its cost over half a worker's fair
    share (total cost / 2 jobs), at most one unit per case; then longest first (ties in registry
    order), so no unit is long against the wall and the long ones start at once. `split` False
    (SSM_KERNELS_CHECK_SPLIT=0): whole pairs, longest first (the schedule before units, for
    timing it beside this one)."""
    def whole(p):
        n = n_cases.get(p)
        return Unit(p[0], p[1], None if n is None else tuple(range(n)), _cost(*p) if n != 0 else 0.0)
    if jobs <= 1:
        return [whole(p) for p in pairs]
    piece = sum(whole(p).cost for p in pairs) / (2 * jobs)
    units = []
    for p in pairs:
        n = n_cases.get(p)
        k = 1 if not (n and split) else min(n, max(1, math.ceil(_cost(*p) / piece - 1e-9)))
        if k == 1:
            units.append(whole(p))
            continue
        bounds = [round(j * n / k) for j in range(k + 1)]
        units += [Unit(p[0], p[1], tuple(range(bounds[j], bounds[j + 1])),
                       _cost(*p) * (bounds[j + 1] - bounds[j]) / n) for j in range(k)]
    return sorted(units, key=lambda u: -u.cost)


def merge_units(family: str, backend: str, parts: List[Tuple[Unit, FamilyResult]]) -> FamilyResult:
    """One pair's result from its units' results: rows in case order, seconds summed (the pair's
    work, as a serial run would time it), errors joined."""
    parts = sorted(parts, key=lambda ur: ur[0].cases[0] if ur[0].cases else -1)
    errors = [r.error for _, r in parts if r.error]
    return FamilyResult(family, backend, [row for _, r in parts for row in r.rows],
                        sum(r.seconds for _, r in parts), "\n".join(errors) or None)


def default_jobs(device: str, units: int) -> int:
    """Worker processes for `run`: on a GPU most of a cold check is Triton compiling on the host,
    one core per worker (front end, then ptxas), so half the cores this process may use, at most
    8 (the GPU work is small); on a CPU the kernels themselves are the work, so one process."""
    if device != "cuda":
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 2
    return max(1, min(units, cores // 2, 8))


def run(families: List[str], backends: List[str], device: str, full: bool = False, seed: int = 0,
        on_result: Optional[Callable[[FamilyResult], None]] = None,
        jobs: Optional[int] = None) -> List[FamilyResult]:
    """Every family on every backend; `on_result` sees each (family, backend) pair as it finishes,
    so a run cut short still reports what it did. Each case is seeded alone (`case_seed`), so the
    rows do not depend on `jobs` or on the subset (--ops/--backends). `jobs` > 1: the pairs are cut
    into units of cases (`plan_units`) run concurrently in spawned workers, longest first; results
    come back per pair, rows in case order, pairs in registry order."""
    pairs = [(fam, be) for fam in families for be in backends]
    n_cases = {}
    for fam, be in pairs:
        cs = list_cases(fam, be, device, full)
        n_cases[(fam, be)] = None if cs is None else len(cs)
    if jobs is None:   # at most one worker per case
        jobs = default_jobs(device, sum(n or 1 for n in n_cases.values()))
    jobs = max(1, jobs)
    units = plan_units(pairs, n_cases, jobs, os.environ.get("SSM_KERNELS_CHECK_SPLIT", "1") != "0")
    if jobs == 1:
        return collect(pairs, units, ((u, _run_unit(u, device, full, seed)) for u in units),
                       on_result)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        # compile threads per worker (SSM_KERNELS_CHECK_AHEAD=1): twice its share of the cores
        # (units finish at different times; the last ones then have the host to themselves)
        threads = max(2, 2 * (os.cpu_count() or 2) // jobs)
        futures = {pool.submit(_run_unit, u, device, full, seed, threads): u for u in units}
        return collect(pairs, units, ((futures[f], f.result()) for f in as_completed(futures)),
                       on_result)


def collect(pairs: List[Tuple[str, str]], units: List[Unit], finished,
            on_result: Optional[Callable[[FamilyResult], None]] = None) -> List[FamilyResult]:
    """The pairs' results from `finished`, (unit, result) in the order units finish: a pair is
    merged (`merge_units`) and handed to `on_result` when its last unit is in; the list comes back
    in `pairs` (registry) order."""
    left = {p: sum((u.family, u.backend) == p for u in units) for p in pairs}
    done: Dict[Tuple[str, str], list] = {p: [] for p in pairs}
    results = []
    for u, r in finished:
        p = (u.family, u.backend)
        done[p].append((u, r))
        if len(done[p]) == left[p]:
            merged = merge_units(*p, done[p])
            results.append(merged)
            if on_result is not None:
                on_result(merged)
    return sorted(results, key=lambda r: pairs.index((r.family, r.backend)))


def summary(results: List[FamilyResult]) -> Dict[str, int]:
    return {"passed": sum(r.passed for r in results), "failed": sum(r.failed for r in results)}
