"""Out-of-bounds detection for Triton kernels under the interpreter (TRITON_INTERPRET=1).

`checked_access()` patches the interpreter so that every launch records the byte extent of each
tensor argument, and every load / store checks each *active* (mask-true) address against the union
of those extents: an address outside all of them is what faults on the GPU when the neighbouring
memory happens to be unmapped (and silently reads a neighbour's data when it is mapped), so a
kernel can pass every value test and still read out of bounds. Violations are collected, not
raised (the interpreter's own copy would not fault), with the kernel, the argument nearest to the
address and the distance in elements.

`guarded(x, pad, fill)`: a copy of x placed in the middle of a larger buffer whose pad elements on
both sides hold `fill` (NaN or a sentinel): together with the check above a read past a tensor lands
in memory that is not an argument, and outputs computed twice with different fills must agree.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import List, Tuple

import numpy as np
import torch


@dataclass
class Violation:
    kernel: str
    op: str            # "load" / "store"
    count: int         # active addresses outside every tensor argument
    nearest: str       # the argument closest to the first bad address
    offset: int        # that address relative to the argument's first element, in elements
    # (negative: before its start; >= numel: past its end)

    def __str__(self):
        return (f"{self.kernel}: {self.count} {self.op}(s) outside the arguments, e.g. {self.nearest}"
                f"[{self.offset}]")


@dataclass
class AccessLog:
    violations: List[Violation] = field(default_factory=list)
    launches: List[str] = field(default_factory=list)
    _ranges: List[Tuple[int, int, str, int]] = field(default_factory=list)
    _kernel: str = ""

    def assert_clean(self):
        assert not self.violations, "\n".join(map(str, self.violations))


def _extent(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    return (sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) + 1) * t.element_size()


@contextlib.contextmanager
def checked_access():
    """Patch the Triton interpreter for the duration; yields an AccessLog."""
    from triton.runtime import interpreter as I

    log = AccessLog()
    init0 = I.GridExecutor._init_args_hst
    load0 = I.InterpreterBuilder.create_masked_load
    store0 = I.InterpreterBuilder.create_masked_store

    def init(self, args_dev, kwargs):
        args_hst, kwargs_hst = init0(self, args_dev, kwargs)
        names = list(inspect.signature(self.fn).parameters)
        ranges = []
        for name, arg in list(zip(names, args_hst)) + list(kwargs_hst.items()):
            if isinstance(arg, torch.Tensor):
                lo = arg.data_ptr()
                ranges.append((lo, lo + _extent(arg), name, arg.element_size()))
        log._ranges, log._kernel = ranges, self.fn.__name__
        log.launches.append(self.fn.__name__)
        return args_hst, kwargs_hst

    def check(op, ptrs, mask):
        addr = np.asarray(ptrs.data).astype(np.int64)
        m = np.broadcast_to(np.asarray(mask.data).astype(bool), addr.shape)
        addr = addr[m]
        if addr.size == 0:
            return
        esize = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        ok = np.zeros(addr.shape, dtype=bool)
        for lo, hi, _, _ in log._ranges:
            ok |= (addr >= lo) & (addr + esize <= hi)
        if ok.all():
            return
        bad = int(addr[~ok][0])
        lo, hi, name, es = min(log._ranges, key=lambda r: min(abs(bad - r[0]), abs(bad - r[1])))
        log.violations.append(Violation(log._kernel, op, int((~ok).sum()), name, (bad - lo) // es))

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        check("load", ptrs, mask)
        return load0(self, ptrs, mask, other, cache_policy, is_volatile)

    def store(self, ptrs, value, mask, cache_policy):
        check("store", ptrs, mask)
        return store0(self, ptrs, value, mask, cache_policy)

    I.GridExecutor._init_args_hst = init
    I.InterpreterBuilder.create_masked_load = load
    I.InterpreterBuilder.create_masked_store = store
    try:
        yield log
    finally:
        I.GridExecutor._init_args_hst = init0
        I.InterpreterBuilder.create_masked_load = load0
        I.InterpreterBuilder.create_masked_store = store0


def guarded(x: torch.Tensor, pad: int, fill: float) -> torch.Tensor:
    """A contiguous copy of x inside a buffer with `pad` elements of `fill` on both sides."""
    flat = x.contiguous().reshape(-1)
    buf = torch.full((flat.numel() + 2 * pad,), fill, dtype=x.dtype, device=x.device)
    buf[pad:pad + flat.numel()] = flat
    return buf[pad:pad + flat.numel()].view(x.shape)


def guards_intact(x: torch.Tensor, pad: int, fill: float) -> bool:
    """The guard elements around a tensor made by `guarded` still hold `fill`."""
    base = x.reshape(-1)
    buf = torch.as_strided(base, (base.numel() + 2 * pad,), (1,), x.storage_offset() - pad)
    g = torch.cat([buf[:pad], buf[pad + base.numel():]])
    if fill != fill:
        return bool(torch.isnan(g).all())
    return bool((g == fill).all())
