"""A launch cache in front of Triton's `JITFunction.run`: one specialisation per key we compute.

Every `kernel[grid](*args, **kwargs)` makes Triton re-derive the kernel's specialisation from all
arguments (`native_specialize_impl` per argument, a string cache key, option parsing, launch
metadata): tens of microseconds on the GPU machine's host for kernels that run for a few. A
`FastKernel` wraps a `@triton.jit` function with the same call syntax and keeps, per key,

    key = (current device, Triton knobs that enter its cache key, the type of every positional
           argument, per tensor its dtype and whether data_ptr % 16 == 0, every int / bool /
           float / None by value (Triton specialises ints on == 1, % 16 and the i32/i64/u64
           range: functions of the value), every keyword argument's name and value (constexprs
           and launch options: num_warps, num_stages, ...)),

the compiled kernel that Triton itself chose on the first call with that key (parameters the call
leaves to their defaults are filled in as Triton's binder fills them) (the first call goes
through `JITFunction.run` unchanged: compile, launch). Later calls with the key hand the arguments
straight to the compiled kernel's launcher, exactly as `JITFunction.run` does at its end. The key is
at least as fine as Triton's own (tests/test_launch.py checks it against Triton's binder on
this machine's Triton), so a call that needs another specialisation never reuses a kernel.

`@triton.autotune` kernels (an Autotuner over a plain JITFunction): the first call with a key goes
through `Autotuner.run` (tuning if its key is new, then launching the chosen config); the entry then
holds the compiled kernel and the chosen config's keyword arguments. The launch key is finer than
the autotuner's own (its key arguments and the dtypes of the tensor arguments), so a hit is a call
the autotuner would have sent to the same config. Autotuners with hooks (pre/post hooks, a config
pre_hook, reset_to_zero / restore_value) or a patched `Autotuner.run` stay on the normal path.

ssm_kernels._warmup's wrappers of `JITFunction.run` / `Autotuner.run` (installed for the process by
the first `compile_ahead`) are recognised: the cache serves as before outside a `compiling_ahead`
block, and inside one (this thread) every launch goes to the wrapper.

Anything outside the simple case takes the normal path, every call: the Triton interpreter
(InterpretedFunction), a patched `JITFunction.run` (compile-only audits, profilers), pre-run hooks,
active launch hooks, a callable grid, a positional argument of another type, a parameter after the
positional ones with neither a keyword argument nor a default, async compilation,
`SSM_KERNELS_FAST_LAUNCH=0` or `set_enabled(False)`.
CUDA graphs: the stream is read on every call, as Triton does, so capture records the same launch.
torch.compile: kernels run inside the registered custom ops, opaque to the tracer, so this is
plain eager code there too.

Adopting it in a family: `_my_kernel = fast_kernel(_my_kernel)` under the `@triton.jit` definition
(calls keep `_my_kernel[grid](...)`).
"""
from __future__ import annotations

import functools
import operator
import os
import weakref
from typing import Any, Dict, Optional, Tuple

import torch

_Tensor = torch.Tensor
_ENABLED = os.environ.get("SSM_KERNELS_FAST_LAUNCH", "1") not in ("0", "", "false", "False")


def cdiv(a: int, b: int) -> int:
    """`triton.cdiv` for host code (grids, tiles): in Triton 3.9 that is a ConstexprFunction whose
    call costs ~1.6 us on the 2-core CPU machine (it unwraps constexprs), 100x this."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """`triton.next_power_of_2` for host code (same values: 0 for 0, n for a power of two)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


_RAW_POINTERS = os.environ.get("SSM_KERNELS_RAW_POINTERS", "0") not in ("0", "", "false", "False")


def set_raw_pointers(on: bool) -> None:
    """A/B knob (default off until measured on the GPU): on a cache hit, hand the launcher each
    tensor argument as its data_ptr() int. Triton's launchers (3.6, 3.9) call data_ptr() and the
    driver's cuPointerGetAttribute for every tensor argument of every launch (the chunk kernels
    take 10-25 pointers); an int skips both. What that check catches (a CPU tensor) cannot reach
    a hit through the public functions, which check devices first; the first call with a key
    (a miss) still goes through Triton's path and its check."""
    global _RAW_POINTERS
    _RAW_POINTERS = bool(on)


def raw_pointers() -> bool:
    return _RAW_POINTERS


def set_enabled(on: bool) -> None:
    """Turn the launch cache on/off for the whole process (off: every launch via JITFunction.run)."""
    global _ENABLED
    _ENABLED = bool(on)


def enabled() -> bool:
    return _ENABLED


class _Unsupported(Exception):
    pass


class _Mark:
    """A key element that equals nothing but itself."""
    __slots__ = ("what",)

    def __init__(self, what):
        self.what = what

    def __repr__(self):
        return f"<{self.what}>"


_MISALIGNED: Dict[torch.dtype, _Mark] = {}
_KERNELS: "weakref.WeakSet[FastKernel]" = weakref.WeakSet()   # every FastKernel (launch_stats)


def _misaligned(dtype):
    m = _MISALIGNED.get(dtype)
    if m is None:
        m = _MISALIGNED[dtype] = _Mark(f"{dtype} not 16-byte aligned")
    return m


def arg_key(a: Any):
    """One positional argument's part of the launch key, on its own (documentation and tests; the
    launch path computes the same information through `args_key`)."""
    t = type(a)
    if isinstance(a, _Tensor):
        return (t, a.dtype if not (a.data_ptr() & 15) else _misaligned(a.dtype))
    if t in _SCALARS:
        return (t, a)
    raise _Unsupported(t)


_SCALARS = (int, bool, float, type(None))


def _getter(pos):
    """A function: tuple -> the tuple of its items at `pos` (itemgetter, a tuple for any length)."""
    if len(pos) >= 2:
        return operator.itemgetter(*pos)
    if len(pos) == 1:
        i = pos[0]
        return lambda args: (args[i],)
    return lambda args: ()


def _layout(types: Tuple):
    """(tensors getter, scalars getter) for arguments of these types; None if one is unsupported."""
    tpos, spos = [], []
    for i, t in enumerate(types):
        if issubclass(t, _Tensor):
            tpos.append(i)
        elif t in _SCALARS:
            spos.append(i)
        else:
            return None
    return _getter(tpos), _getter(spos), tuple(tpos)


_LAYOUTS: Dict[Tuple, Any] = {}


def _lookup(args: Tuple, layouts: Dict):
    """(the arguments' types, their layout); raises _Unsupported for an unsupported type."""
    types = tuple(map(type, args))
    lay = layouts.get(types, False)
    if lay is False:
        lay = layouts[types] = _layout(types)
    if lay is None:
        raise _Unsupported(types)
    return types, lay


def args_key(args: Tuple, layouts: Dict = _LAYOUTS):
    """The positional arguments' part of the launch key, finer than Triton's specialisation: the
    type of every argument; per tensor its dtype if data_ptr % 16 == 0, else a per-dtype marker;
    every int / bool / float / None by value (Triton specialises ints on == 1, % 16 and the
    i32 / i64 / u64 range, all functions of the value). Raises _Unsupported for other types."""
    types, (tget, sget, _) = _lookup(args, layouts)
    return (types, tuple([t.dtype if not (t.data_ptr() & 15) else _misaligned(t.dtype)
                          for t in tget(args)]), sget(args))


def args_key_raw(args: Tuple, layouts: Dict = _LAYOUTS):
    """(`args_key(args)`, the arguments with every tensor replaced by its data_ptr()): the
    launcher takes an int pointer as is, where for a tensor it calls data_ptr() and the driver's
    cuPointerGetAttribute (Triton 3.6 and 3.9 launchers), per pointer argument and launch."""
    types, (tget, sget, tpos) = _lookup(args, layouts)
    tensors = tget(args)
    ptrs = [t.data_ptr() for t in tensors]
    out = list(args)
    for i, p in zip(tpos, ptrs):
        out[i] = p
    return (types, tuple([t.dtype if not (p & 15) else _misaligned(t.dtype)
                          for t, p in zip(tensors, ptrs)]), sget(args)), out


class _Entry:
    """kernel: the compiled kernel; tail: the launcher's arguments after the positional ones
    (keyword arguments, defaults, an autotuner's config values) when they are the same on every
    call with the key, else None and `live(kwargs)` builds them per call (tensor keyword
    arguments: the key holds their dtype only)."""
    __slots__ = ("kernel", "tail", "live", "launch", "pre")

    def __init__(self, kernel, tail: Optional[Tuple], live=None):
        self.kernel = kernel
        self.tail = tail
        self.live = live
        # a hit calls launch(gx, gy, gz, stream, *pre, enter_hook, exit_hook, *args, *tail)
        self.launch, self.pre = direct_launch(kernel) or (
            kernel.run, (kernel.function, kernel.packed_metadata, None))


def direct_launch(kernel):
    """(the C launch function, the arguments before the hooks) of Triton 3.6's CudaLauncher, whose
    Python `__call__` only adds (cooperative-grid flag, PDL flag, global scratch, profile scratch)
    in front of what it is handed: called directly when the kernel needs no scratch memory (no
    allocation to make), saving that Python frame on every hit. None for anything else (Triton
    3.9's launcher takes other arguments; stubbed launchers; kernels with scratch)."""
    run = getattr(kernel, "_run", None)
    cls = type(run)
    if cls.__name__ != "CudaLauncher" or cls.__module__ != "triton.backends.nvidia.driver":
        return None
    code = getattr(cls.__call__, "__code__", None)
    if code is None or code.co_argcount != 6 or not code.co_flags & 0x04 or \
            code.co_varnames[:6] != ("self", "gridX", "gridY", "gridZ", "stream", "function") or \
            "allocate_scratch" not in code.co_varnames or \
            set(code.co_names) - {"launch", "launch_cooperative_grid", "launch_pdl",
                                  "global_scratch_size", "global_scratch_align",
                                  "profile_scratch_size", "profile_scratch_align", "_allocation",
                                  "_allocator", "_profile_allocator", "num_ctas", "get"}:
        return None   # not Triton 3.6's __call__
    if getattr(run, "global_scratch_size", 1) or getattr(run, "profile_scratch_size", 1) or \
            not callable(getattr(run, "launch", None)):
        return None
    return run.launch, (kernel.function, run.launch_cooperative_grid, run.launch_pdl, None, None,
                        kernel.packed_metadata, None)


def kwargs_key(kwargs: Dict, layouts: Dict):
    """The keyword arguments' part of the launch key: their names and types, and per value the
    value itself, except tensors: dtype if 16-byte aligned, else a per-dtype marker (as
    `args_key` for positional ones; pointer parameters passed by keyword)."""
    vals = tuple(kwargs.values())
    types = tuple(map(type, vals))
    lay = layouts.get(types)
    if lay is None:
        tpos = [i for i, t in enumerate(types) if issubclass(t, _Tensor)]
        lay = layouts[types] = (_getter(tpos), _getter([i for i in range(len(types))
                                                        if i not in tpos])) if tpos else ()
    if lay:
        tget, sget = lay
        return (tuple(kwargs), types, sget(vals),
                tuple([t.dtype if not (t.data_ptr() & 15) else _misaligned(t.dtype)
                       for t in tget(vals)]))
    return (tuple(kwargs), types, vals)


class FastKernel:
    """A `@triton.jit` function with a launch cache; `fk[grid](*args, **kwargs)` as for the kernel.
    Attributes not defined here (fn, arg_names, warmup, ...) are the wrapped kernel's."""

    def __init__(self, fn):
        self.fn = fn
        self._cache: Dict[Tuple, Optional[_Entry]] = {}
        self._simple = None   # decided on first use: a plain JITFunction under the CUDA-like driver
        self._layouts: Dict[Tuple, Any] = {}
        self._kw_layouts: Dict[Tuple, Any] = {}
        self._uncached: Dict[Tuple, str] = {}   # key -> why it is served by Triton's path
        self.hits = 0
        self.misses = 0
        self.fallbacks: Dict[str, int] = {}   # reason -> calls that took Triton's own path
        _KERNELS.add(self)

    def __getattr__(self, name):   # only called for attributes FastKernel lacks
        return getattr(self.__dict__["fn"], name)

    def __getitem__(self, grid):
        return functools.partial(self._launch, grid)

    def launch(self, grid, args: Tuple, kwargs: Dict):
        return self._launch(grid, *args, **kwargs)

    # ---- the fast path ---------------------------------------------------------------------------

    def _setup(self) -> bool:
        fn = self.fn
        try:
            from triton import knobs
            from triton.runtime.driver import driver
            from triton.runtime.jit import JITFunction
        except Exception:
            return False
        self._tuner = None
        if _is_plain_autotuner(fn):
            self._tuner = fn
            self._tuner_type, self._tuner_run = type(fn), type(fn).run
            self._tuner_base = _passthrough(self._tuner_run)[0]
            fn = fn.fn
        run = getattr(type(fn), "run", None)
        base = _passthrough(run)[0]
        if not isinstance(fn, JITFunction) or getattr(base, "__qualname__", "") != "JITFunction.run" \
                or getattr(base, "__module__", "") != "triton.runtime.jit":
            return False   # interpreter, patched run (audits, profilers), hooked autotuner, ...
        active = driver.active
        self._jit = fn
        self._jit_run, self._jit_base = run, base
        self._jit_type = type(fn)
        self._idle = None
        self._readopt()
        self._knobs = knobs
        self._device = active.get_current_device
        if self._device is torch.cuda.current_device and torch.cuda.is_initialized():
            self._device = torch._C._cuda_getDevice   # the same, without the lazy-init check
        self._stream = active.get_current_stream
        self._names = tuple(fn.arg_names)
        comp = getattr(knobs, "compilation", None)
        # compilation knobs that enter Triton's cache key (those this Triton version has)
        names = [n for n in ("instrumentation_mode", "fpsan_homomorphic_casts") if hasattr(comp, n)]
        self._env_get = operator.attrgetter(*names) if names else None
        return True

    def _launch(self, grid, *args, **kwargs):
        # `kernel[grid](...)` reaches the launcher through this one Python frame on a hit
        if _ENABLED and type(grid) is tuple:
            if self._simple is None:
                self._simple = self._setup()
            if self._simple and (self._jit_type.run is self._jit_run and (
                    self._tuner is None or self._tuner_type.run is self._tuner_run)
                    or self._readopt()) and (self._idle is None or self._idle()):
                rt = self._knobs.runtime
                enter, leave = rt.launch_enter_hook, rt.launch_exit_hook
                if (enter is None or not getattr(enter, "calls", True)) and \
                        (leave is None or not getattr(leave, "calls", True)) and \
                        not self._jit.pre_run_hooks:
                    try:
                        if _RAW_POINTERS:
                            akey, largs = args_key_raw(args, self._layouts)
                        else:
                            akey, largs = args_key(args, self._layouts), args
                    except _Unsupported as e:
                        return self._slow(f"argument type {e}", grid, args, kwargs)
                    env = self._env_get
                    key = (self._device(), rt.debug, env and env(self._knobs.compilation), akey,
                           kwargs_key(kwargs, self._kw_layouts) if kwargs else ())
                    entry = self._cache.get(key, False)
                    if entry:
                        self.hits += 1
                        kernel = entry.kernel
                        tail = entry.tail
                        if tail is None:
                            tail = entry.live(kwargs)
                        n = len(grid)
                        entry.launch(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1,
                                     self._stream(key[0]), *entry.pre, enter, leave, *largs, *tail)
                        return kernel
                    if entry is False:   # first call with this key: Triton's path, then remember
                        self.misses += 1
                        kernel = self.fn[grid](*args, **kwargs)
                        if len(self._cache) > 1024:
                            self._cache.clear()
                            self._uncached.clear()
                        fixed = {}
                        if self._tuner is not None:   # the config Autotuner.run just launched
                            fixed = _tuned_kwargs(self._tuner, kwargs)
                        entry, why = (None, "autotuner config with a pre_hook or clashing "
                                            "keyword") if fixed is None else \
                            self._entry(kernel, len(args), kwargs, fixed)
                        self._cache[key] = entry
                        if entry is None:
                            self._uncached[key] = why
                        return kernel
                    return self._slow(f"uncacheable key: {self._uncached.get(key, '?')}", grid,
                                      args, kwargs)
                return self._slow("launch hooks or pre-run hooks active", grid, args, kwargs)
            return self._slow(self._why_not(), grid, args, kwargs)
        return self._slow("launch cache disabled" if not _ENABLED else
                          f"grid is a {type(grid).__name__}, not a tuple", grid, args, kwargs)

    def _slow(self, reason: str, grid, args, kwargs):
        """Triton's own path (`JITFunction.run` / `Autotuner.run`), counted under `reason`."""
        f = self.fallbacks
        f[reason] = f.get(reason, 0) + 1
        return self.fn[grid](*args, **kwargs)

    def _why_not(self) -> str:
        """Why the simple case does not apply (no side effects; for the fallback counters)."""
        if not self._simple:
            return "not a plain JITFunction under Triton's own run (interpreter, audit, profiler)"
        if (self._jit_type.run is not self._jit_run or self._tuner is not None
                and self._tuner_type.run is not self._tuner_run):
            return "JITFunction.run / Autotuner.run patched"
        return "inside compiling_ahead (warm-up wrapper active)"

    def _readopt(self) -> bool:
        """After `JITFunction.run` / `Autotuner.run` changed: True (and remembered) if they are
        Triton's own or ssm_kernels._warmup's pass-through wrappers of them (then `_idle` says per
        call whether the wrappers would pass through); False for anything else (this call takes
        the normal path; a later call checks again)."""
        run, (base, idle) = self._jit_type.run, _passthrough(self._jit_type.run)
        if base is not self._jit_base:
            return False
        tidle = None
        if self._tuner is not None:
            trun = self._tuner_type.run
            tbase, tidle = _passthrough(trun)
            if tbase is not self._tuner_base:
                return False
            self._tuner_run = trun
        self._jit_run = run
        self._idle = idle or tidle
        return True

    def _entry(self, kernel, nargs: int, kwargs: Dict, fixed: Dict) -> Tuple[Optional[_Entry], str]:
        """(entry, ""), or (None, why) (always the normal path for this key) unless the kernel is a finished compiled
        kernel and every parameter after the positional ones is a keyword argument (`kwargs`, the
        call's; `fixed`, an autotuner config's) or has a default (filled in as Triton's binder
        does)."""
        if kernel is None or hasattr(kernel, "result") or not hasattr(kernel, "packed_metadata"):
            return None, "no finished compiled kernel (async compilation?)"
        if any(n in kwargs for n in self._names[:nargs]):
            return None, "a positional parameter passed by keyword"   # Triton raises for these
        live = []
        for prm in self._jit.params[nargs:]:
            n = prm.name
            if n in kwargs:
                live.append((n, kwargs[n], True))
            elif n in fixed:
                live.append((n, fixed[n], False))
            elif getattr(prm, "has_default", False):
                live.append((n, prm.default, False))
            else:
                return None, f"parameter {n!r} neither passed nor defaulted"
        if any(isinstance(kwargs.get(n), _Tensor) for n, _, _ in live):   # taken from each call
            names = tuple(n for n, _, _ in live)
            fixed = {n: v for n, v, from_call in live if not from_call}
            pick = operator.itemgetter(*names) if len(names) >= 2 else (lambda d: (d[names[0]],))
            if fixed:
                return _Entry(kernel, None, lambda kw: pick({**fixed, **kw})), ""
            return _Entry(kernel, None, pick), ""
        return _Entry(kernel, tuple(v for _, v, _ in live)), ""


def _passthrough(run):
    """(Triton's own run under ssm_kernels._warmup's wrapper, its idle check), else (run, None)."""
    p = getattr(run, "_ssm_passthrough", None)
    return p if p is not None else (run, None)


def _is_plain_autotuner(fn) -> bool:
    """An Autotuner (exactly; not a subclass) straight over a kernel, with Triton's own run and no
    hooks that must run around a launch."""
    try:
        from triton.runtime.autotuner import Autotuner
    except Exception:
        return False
    if type(fn) is not Autotuner:
        return False
    run = _passthrough(Autotuner.run)[0]
    return getattr(run, "__qualname__", "") == "Autotuner.run" \
        and getattr(run, "__module__", "") == "triton.runtime.autotuner" \
        and not getattr(fn, "user_defined_pre_hook", True) \
        and not getattr(fn, "user_defined_post_hook", True) \
        and not getattr(fn, "reset_to_zero", True) and not getattr(fn, "restore_value", True) \
        and all(c.pre_hook is None for c in fn.configs)


def _tuned_kwargs(tuner, kwargs: Dict) -> Optional[Dict]:
    """The keyword arguments the chosen config added on the call Autotuner.run just made (None:
    do not cache this key)."""
    config = getattr(tuner, "best_config", None)
    if config is None or config.pre_hook is not None:
        return None
    extra = config.all_kwargs()
    if any(k in kwargs for k in extra):
        return None   # Triton would have raised; stay out of the way
    return extra


def fast_kernel(fn):
    """Wrap a `@triton.jit` function, or a `@triton.autotune` over one, in a FastKernel (anything
    else is returned unchanged)."""
    if isinstance(fn, FastKernel):
        return fn
    try:
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:
        return fn
    if isinstance(fn, (JITFunction, InterpretedFunction)) or (
            type(fn) is Autotuner and isinstance(fn.fn, (JITFunction, InterpretedFunction))):
        return FastKernel(fn)
    return fn


def kernel_name(fk: "FastKernel") -> str:
    """module.function of a FastKernel's (possibly autotuned) kernel."""
    fn = fk.fn
    inner = getattr(getattr(fn, "fn", None), "fn", None) or getattr(fn, "fn", fn)
    return f"{getattr(inner, '__module__', '?')}.{getattr(inner, '__name__', repr(inner))}"


def launch_stats(reset: bool = False) -> Dict[str, Dict[str, Any]]:
    """Per FastKernel that was called since the last reset: {'hits', 'misses', 'fallbacks':
    {reason: calls}, 'keys': launch keys cached, 'varying': the key parts that differ between
    them (why a kernel keeps missing: an int argument that changes per call, a tensor's alignment
    or dtype, a keyword's value)}. A steady-state call should show only hits. reset=True zeroes
    the counters after reading (the cache itself is kept)."""
    out = {}
    for fk in list(_KERNELS):
        if fk.hits or fk.misses or fk.fallbacks:
            out[kernel_name(fk)] = dict(hits=fk.hits, misses=fk.misses,
                                        fallbacks=dict(fk.fallbacks), keys=len(fk._cache),
                                        varying=_varying(list(fk._cache)))
        if reset:
            fk.hits = fk.misses = 0
            fk.fallbacks = {}
    return out


def reset_launch_stats() -> None:
    launch_stats(reset=True)


_KEY_PARTS = ("device", "debug", "compilation knobs", "arg types", "tensor dtype/alignment",
              "scalar values", "keyword arguments")


def _varying(keys) -> str:
    """Which parts of the cached launch keys differ (for the report), e.g. 'scalar values #3'."""
    if len(keys) < 2:
        return ""
    flat = []
    for k in keys:
        akey = k[3]
        flat.append((k[0], k[1], k[2], akey[0], akey[1], akey[2], k[4]))
    parts = []
    for i, name in enumerate(_KEY_PARTS):
        vals = [f[i] for f in flat]
        if any(v != vals[0] for v in vals[1:]):
            if isinstance(vals[0], tuple) and all(isinstance(v, tuple) and len(v) == len(vals[0])
                                                  for v in vals):
                pos = [j for j in range(len(vals[0])) if any(v[j] != vals[0][j] for v in vals)]
                parts.append(f"{name} #{pos}: " + ", ".join(
                    str(sorted({repr(v[j]) for v in vals})) for j in pos)[:200])
            else:
                parts.append(name)
    return "; ".join(parts)
