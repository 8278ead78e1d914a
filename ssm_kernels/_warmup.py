"""Compile ahead, in parallel: the Triton kernels a call and its backward will launch.

A cold first call compiles its kernels one after another as it reaches them (forward, then the
backward's). `compile_ahead(op, *args, **kwargs)` instead dry-runs the call and a backward through
its outputs with every Triton launch turned into a compile submitted to a thread pool, then waits
for the pool: the real call that follows finds every kernel compiled, its launcher built and its
module loaded (Triton 3.6 compiles a C launcher with gcc per argument-type list at a kernel's first
launch; on a GPU that and the module load run in the pool too). Threads overlap because
Triton's MLIR/LLVM passes run without the GIL and ptxas is a subprocess (bench/compile_audit.py
`threads` measures it; see bench/NOTES.md).

The dry run launches nothing: kernel outputs are uninitialised memory, dropped at the end; the
caller's tensors are not written. Torch ops between launches do run (on garbage). A dry run
that fails part-way (host code that reads a kernel's output, for instance) stops there: what was
submitted still compiles, the rest compiles in the real call as usual. Nothing happens on CPU
tensors or under the Triton interpreter (nothing to compile).
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Optional

_tls = threading.local()
# the open compiling_ahead blocks' states, newest last: for autograd's device threads (below)
_open = []
# build launchers and load modules in the pool too (SSM_KERNELS_AHEAD_LOAD=0: compile only, the
# pre-session-6 behaviour, for A/B timing)
LOAD_AHEAD = os.environ.get("SSM_KERNELS_AHEAD_LOAD", "1") not in ("0", "", "false", "False")
# A/B switch for the GPU timing only: SSM_KERNELS_AHEAD_LEGACY=1 brings back the session-6 block
# (autograd's device thread not dry-run, every early compile hashing Triton itself)
LEGACY = os.environ.get("SSM_KERNELS_AHEAD_LEGACY", "0") not in ("0", "", "false", "False")
_lock = threading.Lock()
_patched = []


def _spec_key(fn, args, kwargs):
    """A key at least as fine as Triton's specialisation, so deduplication never drops a variant
    (a finer key only costs a duplicate compile, which matters where compiles do not overlap):
    tensors by dtype and 16-byte alignment; ints of runtime (non-constexpr) parameters by what
    Triton specialises on -- == 1, % 16 == 0, and the i32 range (values outside it as they are) --
    or, for `do_not_specialize` ones (delta_rule's STORE_T), by the i32 range only; constexprs,
    parameters this function cannot see and every other value as they are."""
    params = getattr(fn, "params", ())
    names = {p.name: p for p in params}

    def one(a, prm=None):
        if hasattr(a, "data_ptr") and hasattr(a, "dtype"):
            return ("T", str(a.dtype), a.data_ptr() % 16 == 0)
        if isinstance(a, bool) or a is None or isinstance(a, (str, float)):
            return a
        if isinstance(a, int):
            i32 = -2 ** 31 <= a < 2 ** 31
            if prm is None or getattr(prm, "is_constexpr", True) or not i32:
                return ("i", a)
            if getattr(prm, "do_not_specialize", False):
                return ("i", "nospec")
            return ("i", a == 1, a % 16 == 0)
        return repr(a)
    return (id(fn), tuple(one(a, params[i] if i < len(params) else None) for i, a in enumerate(args)),
            tuple(sorted((k, one(v, names.get(k))) for k, v in kwargs.items()
                         if k not in ("grid", "warmup"))))


def _state():
    """The compiling_ahead state that applies to this thread, or None: its own block's, or -- on
    a thread Python did not start that is running an autograd graph task, i.e. autograd's CUDA
    device thread running a backward -- the newest open block's. Autograd runs a backward through
    CUDA tensors on its own per-device thread, not the caller's: with only the thread-local
    state the dry run's backward compiled and launched its kernels there, one after another, and
    the caller waited (GPU: dry run as long as the whole block; offline CPU tensors run the
    backward on the caller's thread, which hid it). Consequence: while a block is open, a
    backward that another Python thread starts on CUDA tensors is dry-run too."""
    st = getattr(_tls, "state", None)
    if st is not None or not _open or LEGACY:
        return st
    if not isinstance(threading.current_thread(), threading._DummyThread):
        return None
    try:
        import torch
        if torch._C._current_graph_task_id() == -1:
            return None
    except Exception:
        return None
    return _open[-1] if _open else None


def _install():
    """Wrap JITFunction.run and Autotuner.run once; they act only in a thread inside
    `compiling_ahead` (everyone else, the pool's threads included, gets the usual behaviour)."""
    with _lock:
        if _patched:
            return
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction
        orig_run, orig_at = JITFunction.run, Autotuner.run
        _find_c_launchers()

        def run(self, *args, grid, warmup, **kwargs):
            st = _state()
            if st is None:
                return orig_run(self, *args, grid=grid, warmup=warmup, **kwargs)
            key = _spec_key(self, args, kwargs)
            with _lock:   # the caller's thread and autograd's device thread
                new = key not in st["seen"]
                if new:
                    st["seen"].add(key)
                    st["kernels"] += 1
            if new:
                try:   # Triton's per-device binder and kernel cache: made here, once, so that pool
                    # threads never race to create two (a compile landing in the lost one is
                    # compiled again by the real call)
                    self.device_caches[_driver().active.get_current_device()]
                except Exception:
                    pass
                st["futures"].append(st["pool"].submit(
                    _compile_and_load, orig_run, st["load"], self, args, grid, kwargs,
                    st["key"]))
                if st["load"] and _C_LAUNCHERS:
                    st["futures"].append(st["pool"].submit(
                        _prebuild_launcher, st["launchers"], self, args, kwargs))
            return None

        def at_run(self, *args, **kwargs):
            if _state() is None:
                return orig_at(self, *args, **kwargs)
            # every config the autotuner would time, compiled; nothing timed, nothing cached
            self.nargs = dict(zip(self.arg_names, args))
            try:
                configs = self.prune_configs(kwargs)
            finally:
                self.nargs = None
            for config in configs:
                self.fn.run(*args, **kwargs, **config.all_kwargs())
            return None

        # the launch cache (ssm_kernels._launch) may bypass these wrappers while this thread is
        # outside a compiling_ahead block, since they then only call the originals
        run._ssm_passthrough = (orig_run, _idle)
        at_run._ssm_passthrough = (orig_at, _idle)
        JITFunction.run, Autotuner.run = run, at_run
        _patched.append((orig_run, orig_at))


def _triton_key() -> None:
    """Pool job, first of every block: Triton's compiler-version hash, part of every compile's
    cache key (3.6: sha256 of the 415 MB libtriton.so and the compiler's sources, 0.36 s CPU and
    ~1 s wall cold here, once per process). It sits behind an lru_cache that does not lock: the
    block's first compiles, starting together, each computed it (one sha256 of libtriton per
    thread, all at once); every compile job now waits for this one instead."""
    try:
        from triton.runtime import cache
        cache.triton_key()
    except Exception:   # a Triton without it: the compiles compute what they need
        pass


def _compile_and_load(orig_run, load: bool, fn, args, grid, kwargs, ready=None):
    """One pool job: compile (Triton's `run(warmup=True)`), then, on a real GPU, what the kernel's
    first launch would otherwise do in the caller's thread, one kernel after another: build its
    launcher (Triton <= 3.6 compiles a C launcher per argument-type list with gcc, 0.1-0.7 s each,
    cached on disk; 3.9 has a generic one) and load the cubin into the context (`_init_handles`).
    A failure there (e.g. too much shared memory) is left for the real launch to raise, as before."""
    if ready is not None:
        ready.result()
    kernel = orig_run(fn, *args, grid=grid, warmup=True, **kwargs)
    if load and kernel is not None:
        init = getattr(kernel, "_init_handles", None)
        if init is not None:
            init()
    return kernel


# Triton <= 3.6 builds a C launcher per argument-type list with gcc (3.9: a generic launcher);
# set by _install (importing triton here would put it on `import ssm_kernels`)
_nv_driver, _C_LAUNCHERS = None, False


def _driver():
    from triton.runtime.driver import driver
    return driver


def _find_c_launchers() -> None:
    global _nv_driver, _C_LAUNCHERS
    try:
        from triton.backends.nvidia import driver as nv
    except Exception:  # no NVIDIA backend
        return
    _nv_driver = nv
    _C_LAUNCHERS = hasattr(nv, "make_launcher") and hasattr(nv, "compile_module_from_src")


def _launcher_source(fn, args, kwargs) -> Optional[str]:
    """The C source of the launcher that Triton 3.6's `CudaLauncher` will build for this call's
    kernel (it depends on the argument types only, not on the compiled code), derived the way
    `JITFunction.run` derives the kernel's signature; None where that is not possible."""
    if not _C_LAUNCHERS:
        return None
    from triton import knobs
    from triton.runtime.driver import driver
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    _, _, _, backend, binder = fn.device_caches[driver.active.get_current_device()]
    bound_args, specialization, options = binder(*args, **kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    src = fn.ASTSource(fn, signature, constexprs, attrs)
    arg_idx = lambda x: (src.fn.arg_names.index(x), ) if isinstance(x, str) else x  # noqa: E731
    constants = {arg_idx(i): v for i, v in src.constants.items()}
    return _nv_driver.make_launcher(constants, dict(src.signature), None)


def _prebuild_launcher(seen: set, fn, args, kwargs) -> None:
    """Pool job, concurrent with the kernel's compile: build its C launcher (gcc, ~0.1-0.7 s) into
    Triton's on-disk cache, where the kernel's load then finds it, instead of after the compile.
    Best effort: a source that differs from the one Triton builds is only a wasted gcc run."""
    try:
        text = _launcher_source(fn, args, kwargs)
        if text is None:
            return
        with _lock:
            if text in seen:
                return
            seen.add(text)
        _nv_driver.compile_module_from_src(
            src=text, name="__triton_launcher", library_dirs=_nv_driver.library_dirs(),
            include_dirs=_nv_driver.include_dirs, libraries=_nv_driver.libraries)
    except Exception:
        pass


def _idle() -> bool:
    """Whether this thread is outside every compiling_ahead block (the wrappers pass through).
    On the launch cache's hit path: no extra call while no block is open."""
    if getattr(_tls, "state", None) is not None:
        return False
    return not _open or _state() is None


@contextlib.contextmanager
def compiling_ahead(threads: Optional[int] = None) -> Iterator[dict]:
    """Inside the block (this thread only), Triton launches compile in a pool and launch nothing;
    leaving it waits for every compile. Yields a dict whose "kernels" is the number submitted."""
    _install()
    if getattr(_tls, "state", None) is not None:
        raise RuntimeError("compiling_ahead blocks do not nest")
    n = threads or min(16, os.cpu_count() or 1)
    info = {"kernels": 0, "errors": 0}
    init = None
    import torch
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        dev = torch.cuda.current_device()   # the pool's threads compile for this GPU

        def init():
            torch.cuda.set_device(dev)
    # the dry run's filter spectra (fft_conv) are garbage: keep them out of the spectrum cache
    fcache = sys.modules.get("ssm_kernels.fft_conv.cufft")
    cache_was = getattr(fcache, "_cache_enabled", None)
    if fcache is not None:
        fcache._cache_enabled = False
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="ssm_kernels_compile",
                            initializer=init) as pool:
        # launchers and module loads only where a real CUDA context exists (not under the
        # compile-only stub drivers of bench/ and tests/)
        load = LOAD_AHEAD and torch.cuda.is_available() and torch.cuda.is_initialized()
        st = _tls.state = {"pool": pool, "seen": set(), "futures": [], "load": load,
                           "launchers": set(), "kernels": 0,
                           "key": None if LEGACY else pool.submit(_triton_key)}
        _open.append(st)
        try:
            yield info
        finally:
            if fcache is not None:
                fcache._cache_enabled = cache_was
            _open.remove(st)
            futures, n_kernels = st["futures"], st["kernels"]
            _tls.state = None
            for f in futures:
                try:
                    f.result()
                except Exception:  # the real call raises it where it belongs
                    info["errors"] += 1
            info["kernels"] = n_kernels


def compile_ahead(op: Callable, *args, backward: bool = True, threads: Optional[int] = None,
                  **kwargs) -> dict:
    """Compile, in `threads` parallel threads, the Triton kernels that `op(*args, **kwargs)` and
    (backward=True) a backward through its floating-point outputs will launch; returns
    {"kernels": submitted, "errors": compiles that failed, "dry_run_error": str or None}.

        from ssm_kernels import chunk_gla, compile_ahead
        compile_ahead(chunk_gla, q, k, v, g, output_final_state=True)   # ~ the longest kernel
        o, S = chunk_gla(q, k, v, g, output_final_state=True)            # compiles nothing
    """
    import torch
    from ._config import triton_interpret
    tensors = [a for a in list(args) + list(kwargs.values()) if torch.is_tensor(a)]
    if triton_interpret() or not any(t.is_cuda for t in tensors):
        return {"kernels": 0, "errors": 0, "dry_run_error": None}

    def fresh(a):   # leaves of the dry run's own graph: the caller's tensors are untouched
        if torch.is_tensor(a):
            return a.detach().requires_grad_(a.requires_grad)
        return a
    args = [fresh(a) for a in args]
    kwargs = {k: fresh(v) for k, v in kwargs.items()}
    leaves = [a for a in list(args) + list(kwargs.values()) if torch.is_tensor(a) and a.requires_grad]
    err = None
    with compiling_ahead(threads) as info:
        try:
            out = op(*args, **kwargs)
            if backward and leaves:
                outs = out if isinstance(out, (tuple, list)) else (out,)
                outs = [o for o in outs if torch.is_tensor(o) and o.requires_grad]
                if outs:
                    loss = sum(o.float().sum() for o in outs)
                    torch.autograd.grad(loss, leaves, allow_unused=True)
        except Exception as e:  # best effort: the real call compiles whatever is left
            err = f"{type(e).__name__}: {e}"
    return dict(info, dry_run_error=err)
