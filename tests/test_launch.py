"""ssm_kernels._launch (the launch cache in front of JITFunction.run), on the CPU, no GPU.

1. The key is at least as fine as Triton's own specialisation: over many argument tuples, two
   tuples with one launch key always get one Triton specialisation (Triton's binder, this
   machine's Triton, target sm_90).
2. End to end with a compile-only driver (target sm_90, every compiled kernel's launcher replaced
   by a recorder): a repeated call skips JITFunction.run and hands the launcher exactly what
   Triton's path hands it; a changed dtype, 16-byte alignment, int (== 1, % 16) or constexpr gets
   the kernel Triton itself picks for it (compiled anew, never a reused one); anything unusual
   (patched run, launch hooks, disabled) goes through Triton's path.
"""
import itertools

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import jit as triton_jit  # noqa: E402

from ssm_kernels import _launch  # noqa: E402
from ssm_kernels.testing import OfflineDriver  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def _scale(x_ptr, y_ptr, n, s_x, alpha, FLAG: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    v = tl.load(x_ptr + o * s_x, mask=m, other=0.0)
    if FLAG:
        v = v * alpha
    tl.store(y_ptr + o, v, mask=m)


def _jit():
    """A real JITFunction even where TRITON_INTERPRET=1 made @triton.jit return interpreted ones."""
    return triton_jit.JITFunction(_scale)


# ---- 1. the key against Triton's binder ----------------------------------------------------------

def _tensors():
    base = {dt: torch.zeros(64, dtype=dt) for dt in (torch.float32, torch.bfloat16, torch.float16)}
    out = []
    for dt, t in base.items():
        out += [t, t[1:], t[8:]]   # aligned, misaligned, aligned again (16 bytes for 16-bit: 8 elts)
    return out


INTS = [0, 1, 2, 15, 16, 17, 32, -1, -16, 2 ** 31 - 1, 2 ** 31, 2 ** 32, 2 ** 63 - 1, 2 ** 63]
SCALARS = INTS + [True, False, None, 1.0, 0.5]


def test_key_is_at_least_as_fine_as_tritons_specialisation():
    from triton.compiler import make_backend
    fn = _jit()
    binder = triton_jit.create_function_from_signature(fn.signature, fn.params, make_backend(TARGET))
    seen = {}
    tensors = _tensors()
    for x, y, n, s_x, alpha in itertools.product(tensors[::2], tensors[1::2], SCALARS, INTS[:8],
                                                 [1.0, 2, True]):
        args = (x, y, n, s_x, alpha)
        _, spec, _ = binder(*args, FLAG=True, BLOCK=64)
        spec = repr(spec)
        key = _launch.args_key(args)
        assert seen.setdefault(key, spec) == spec, f"one key {key} for two specialisations"
    # and the distinctions that matter are all there
    t32 = torch.zeros(64)
    k = _launch.arg_key
    assert k(t32) != k(t32.to(torch.bfloat16)) and k(t32) != k(t32[1:])
    assert len({k(1), k(True), k(1.0), k(2), k(16), k(None), k(False), k(0)}) == 8


# ---- 2. end to end under a compile-only driver -----------------------------------------------------

class _Driver(OfflineDriver):
    def __init__(self):
        super().__init__(stream=1234)

    def get_benchmarker(self):
        # Triton 3.6's Autotuner benchmarks even a single surviving config (3.9 takes it as is):
        # one recorded launch, a constant time
        def bench(kernel_call, quantiles=None, **kwargs):
            kernel_call()
            return [1.0, 1.0, 1.0] if quantiles else 1.0
        return bench


@pytest.fixture
def recorded(monkeypatch):
    """Compile-only Triton (sm_90); every launch appends (kernel, launcher args) to the list."""
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.driver import driver
    launches = []

    def init(self):
        self.function = id(self)
        self._run = lambda *args: launches.append((self, args))

    monkeypatch.setattr(CompiledKernel, "_init_handles", init)
    monkeypatch.setattr(driver, "_active", _Driver())   # restored after the test
    monkeypatch.setattr(_launch, "_ENABLED", True)
    yield launches


def _args(dtype=torch.float32, offset=0, n=64, s_x=1):
    x = torch.zeros(80, dtype=dtype)[offset:]
    y = torch.zeros(64, dtype=dtype)
    return (x, y, n, s_x, 2.0)


def test_repeat_call_skips_triton_and_launches_identically(recorded):
    fk = _launch.FastKernel(_jit())
    args = _args()
    kw = dict(FLAG=True, BLOCK=64, num_warps=1)
    fk[(2,)](*args, **kw)                   # miss: Triton's path launches
    assert (fk.misses, fk.hits, len(recorded)) == (1, 0, 1)
    slow = recorded[-1]
    fk[(2,)](*args, **kw)
    assert (fk.misses, fk.hits, len(recorded)) == (1, 1, 2)
    fast = recorded[-1]
    assert fast[0] is slow[0]
    assert len(fast[1]) == len(slow[1])
    # launch_metadata (index 6) is only read by launch hooks, and the fast path runs only when
    # none is active: it passes None where Triton 3.9 builds a LazyDict for its empty HookChain
    assert fast[1][6] is None
    for i, (a, b) in enumerate(zip(fast[1], slow[1])):   # grid, stream, function, ..., arguments
        if i == 6:
            continue
        assert a is b or a == b or (a is None and b is None) or (
            not isinstance(a, torch.Tensor) and repr(a) == repr(b)), (a, b)


@pytest.mark.parametrize("change", ["dtype", "alignment", "int_one", "int_div16", "constexpr",
                                    "option"])
def test_a_changed_specialisation_gets_tritons_kernel(recorded, change):
    fk = _launch.FastKernel(_jit())
    base = dict(dtype=torch.float32, offset=0, n=64, s_x=2)
    kw = dict(FLAG=True, BLOCK=64, num_warps=1)
    fk[(1,)](*_args(**base), **kw)
    fk[(1,)](*_args(**base), **kw)
    first = recorded[-1][0]
    changed, kw2 = dict(base), dict(kw)
    if change == "dtype":
        changed["dtype"] = torch.bfloat16
    elif change == "alignment":
        changed["offset"] = 1
    elif change == "int_one":
        changed["s_x"] = 1
    elif change == "int_div16":
        changed["n"] = 63
    elif change == "constexpr":
        kw2["FLAG"] = False
    else:
        kw2["num_warps"] = 2
    hits = fk.hits
    fk[(1,)](*_args(**changed), **kw2)
    assert fk.hits == hits, "a call needing another specialisation was served from the cache"
    second = recorded[-1][0]
    assert second is not first
    # the kernel is the one Triton's own path chooses for those arguments
    _launch.set_enabled(False)
    try:
        fk[(1,)](*_args(**changed), **kw2)
    finally:
        _launch.set_enabled(True)
    assert recorded[-1][0] is second
    fk[(1,)](*_args(**changed), **kw2)   # and now it is cached
    assert fk.hits == hits + 1 and recorded[-1][0] is second


def test_unusual_cases_take_tritons_path(recorded, monkeypatch):
    fk = _launch.FastKernel(_jit())
    kw = dict(FLAG=True, BLOCK=64)
    for _ in range(2):
        fk[(1,)](*_args(), **kw)
    assert fk.hits == 1
    hits = fk.hits
    # disabled
    _launch.set_enabled(False)
    fk[(1,)](*_args(), **kw)
    _launch.set_enabled(True)
    # a callable grid
    fk[lambda meta: (1,)](*_args(), **kw)
    # a patched JITFunction.run (audits, profilers) is always honoured
    seen = []
    orig = triton_jit.JITFunction.run

    def spy(self, *a, **k):
        seen.append(1)
        return orig(self, *a, **k)
    monkeypatch.setattr(triton_jit.JITFunction, "run", spy)
    fk[(1,)](*_args(), **kw)
    assert seen == [1]
    monkeypatch.setattr(triton_jit.JITFunction, "run", orig)
    assert fk.hits == hits
    assert len(recorded) == 5
    # every call off the fast path is counted under its reason (launch_stats)
    assert fk.fallbacks == {"launch cache disabled": 1, "grid is a function, not a tuple": 1,
                            "JITFunction.run / Autotuner.run patched": 1}, fk.fallbacks


def test_launch_stats_count_hits_misses_and_name_what_varies(recorded):
    """launch_stats(): per kernel its hits / misses / fallbacks since the last reset, and which
    part of the launch key differs between its cached keys (an int that changes per call keeps
    a kernel compiling or missing: the report names the argument)."""
    fk = _launch.FastKernel(_jit())
    kw = dict(FLAG=True, BLOCK=64)
    _launch.reset_launch_stats()
    for _ in range(3):
        fk[(1,)](*_args(), **kw)
    name = _launch.kernel_name(fk)
    assert name.endswith("._scale")
    st = _launch.launch_stats()[name]
    assert (st["hits"], st["misses"], st["fallbacks"], st["keys"]) == (2, 1, {}, 1)
    fk[(1,)](*_args(n=48), **kw)      # n % 16 == 0 either way, but the key holds the value
    fk[(1,)](*_args(s_x=2), **kw)
    st = _launch.launch_stats(reset=True)[name]
    assert st["misses"] == 3 and st["keys"] == 3
    assert "scalar values #[0, 1]" in st["varying"] and "48" in st["varying"], st["varying"]
    assert name not in _launch.launch_stats()   # reset: no calls since
    fk[(1,)](*_args(), FLAG=False, BLOCK=64)
    assert "keyword arguments" in _launch.launch_stats()[name]["varying"]


def test_every_chunk_op_launch_is_a_cache_hit_on_repeat():
    """End to end through the public chunk ops (chunk_linear_attn with and without normalize,
    chunk_simple_gla incl. initial / final state, chunk_gla, chunk_gated_delta_rule, chunk_based,
    mamba_chunk_scan_combined; forward and forward+backward), their kernels compiled for sm_90 by
    the compile-only driver and their launchers stubbed (bench/profile_host.py --stub --launches,
    in a subprocess: the ops' kernels must be real JITFunctions, not the interpreter's): after two
    warm-up calls every launcher call is a launch-cache hit, no miss, no fallback, on this
    machine's Triton (run it with PYTHONPATH=/tmp/t36:$PWD for Triton 3.6)."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), root) if p)
    r = subprocess.run([sys.executable, os.path.join(root, "bench", "profile_host.py"), "--stub",
                        "--launches", "chunk", "mamba"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=1200)
    rows = [ln for ln in r.stdout.splitlines() if "launches/call" in ln]
    assert r.returncode == 0 and len(rows) >= 15, r.stdout[-4000:] + r.stderr[-4000:]
    for ln in rows:
        assert "all fast" in ln and float(ln.split("launches/call")[1].split()[0]) >= 1, ln


def test_interpreted_kernels_are_left_to_the_interpreter():
    from triton.runtime.interpreter import InterpretedFunction
    fn = InterpretedFunction(_scale)
    fk = _launch.fast_kernel(fn)
    assert isinstance(fk, _launch.FastKernel) and fk.fn is fn
    assert fk._setup() is False


# ---- 3. @triton.autotune kernels --------------------------------------------------------------------

def _tuned(**extra):
    """An Autotuner over the test kernel, keyed on n; two configs, the pruner picks one by n % 32
    (no benchmarking: a single surviving config is taken as is, as Autotuner.run does)."""
    from triton.runtime.autotuner import Autotuner
    configs = [triton.Config({"BLOCK": 64}, num_warps=1), triton.Config({"BLOCK": 128}, num_warps=2)]
    prune = {"early_config_prune": lambda configs, nargs, **kw: [configs[(nargs["n"] // 16) % 2]]}
    fn = _jit()
    return Autotuner(fn, fn.arg_names, configs, key=["n"], reset_to_zero=extra.get("reset_to_zero"),
                     restore_value=None, prune_configs_by=prune, pre_hook=extra.get("pre_hook"))


def test_autotuned_kernel_repeats_the_chosen_config(recorded):
    at = _tuned()
    fk = _launch.fast_kernel(at)
    assert isinstance(fk, _launch.FastKernel) and fk.fn is at
    for n, block, warps in ((64, 64, 1), (16, 128, 2)):   # (n // 16) % 2 picks the config
        args = _args(n=n)
        fk[(1,)](*args, FLAG=True)
        slow = recorded[-1]
        hits = fk.hits
        fk[(1,)](*args, FLAG=True)
        assert fk.hits == hits + 1
        fast = recorded[-1]
        assert fast[0] is slow[0]   # the config's compiled kernel, not another
        assert slow[0].metadata.num_warps == warps and slow[0].src.constants[
            slow[0].src.fn.arg_names.index("BLOCK"),] == block
        for i, (a, b) in enumerate(zip(fast[1], slow[1])):
            if i != 6:
                assert a is b or a == b or (not isinstance(a, torch.Tensor) and repr(a) == repr(b))
        # Triton's own path (cache off) picks the same kernel for these arguments
        _launch.set_enabled(False)
        try:
            fk[(1,)](*args, FLAG=True)
        finally:
            _launch.set_enabled(True)
        assert recorded[-1][0] is slow[0]


def test_autotuners_with_hooks_stay_on_tritons_path(recorded):
    for at in (_tuned(reset_to_zero=["y_ptr"]), _tuned(pre_hook=lambda kwargs, reset_only=False: 0)):
        fk = _launch.fast_kernel(at)
        for _ in range(3):
            fk[(1,)](*_args(), FLAG=True)
        assert fk.hits == 0 and len(recorded) >= 3


def _scale_opt(x_ptr, y_ptr, n, s_x, alpha, FLAG: tl.constexpr, BLOCK: tl.constexpr,
               z_ptr=None, HAS_Z: tl.constexpr = False, beta=1.0):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    v = tl.load(x_ptr + o * s_x, mask=m, other=0.0)
    if FLAG:
        v = v * alpha
    if HAS_Z:
        v += tl.load(z_ptr + o, mask=m, other=0.0) * beta
    tl.store(y_ptr + o, v, mask=m)


def _same_launch(fast, slow):
    assert fast[0] is slow[0] and len(fast[1]) == len(slow[1])
    for i, (a, b) in enumerate(zip(fast[1], slow[1])):
        if i != 6:
            assert a is b or a == b or (not isinstance(a, torch.Tensor) and repr(a) == repr(b)), (i, a, b)


def test_defaults_and_tensor_keyword_arguments(recorded):
    """Parameters left to their defaults are filled in as Triton's binder does; a tensor passed by
    keyword is keyed by dtype / alignment (as positional ones) and taken from each call."""
    fk = _launch.FastKernel(triton_jit.JITFunction(_scale_opt))
    x, y, n, s_x, alpha = _args()
    kw = dict(FLAG=True, BLOCK=64)
    for _ in range(2):   # defaults for z_ptr, HAS_Z, beta
        fk[(1,)](x, y, n, s_x, alpha, **kw)
    assert (fk.misses, fk.hits) == (1, 1)
    fast = recorded[-1]
    _launch.set_enabled(False)
    fk[(1,)](x, y, n, s_x, alpha, **kw)
    _launch.set_enabled(True)
    _same_launch(fast, recorded[-1])
    # z by keyword: new tensors of the same dtype hit, and the launcher gets this call's tensor
    for z in (torch.zeros(64), torch.ones(64), torch.zeros(80)[8:]):
        fk[(1,)](x, y, n, s_x, alpha, **kw, z_ptr=z, HAS_Z=True)
        assert any(a is z for a in recorded[-1][1]), "the launcher did not get this call's z"
        fast = recorded[-1]
        _launch.set_enabled(False)
        fk[(1,)](x, y, n, s_x, alpha, **kw, z_ptr=z, HAS_Z=True)
        _launch.set_enabled(True)
        _same_launch(fast, recorded[-1])
    assert fk.hits == 3   # the second and third z (16-byte aligned float32) were served
    # a misaligned or other-dtype z needs another specialisation: Triton's kernel for it
    for z in (torch.zeros(80)[1:], torch.zeros(64, dtype=torch.bfloat16)):
        hits = fk.hits
        fk[(1,)](x, y, n, s_x, alpha, **kw, z_ptr=z, HAS_Z=True)
        assert fk.hits == hits
        fast = recorded[-1]
        _launch.set_enabled(False)
        fk[(1,)](x, y, n, s_x, alpha, **kw, z_ptr=z, HAS_Z=True)
        _launch.set_enabled(True)
        _same_launch(fast, recorded[-1])


def test_warmup_wrappers_pass_through_outside_their_block(recorded, monkeypatch):
    """ssm_kernels._warmup replaces JITFunction.run / Autotuner.run for the process (acting only in
    a thread inside `compiling_ahead`): outside the block the cache keeps serving; inside it every
    launch goes to the wrapper (a compile, no launch)."""
    from triton.runtime.autotuner import Autotuner
    from ssm_kernels import _warmup
    monkeypatch.setattr(triton_jit.JITFunction, "run", triton_jit.JITFunction.run)  # restored after
    monkeypatch.setattr(Autotuner, "run", Autotuner.run)
    monkeypatch.setattr(_warmup, "_patched", [])
    fk, fa = _launch.FastKernel(_jit()), _launch.fast_kernel(_tuned())
    kw = dict(FLAG=True, BLOCK=64)
    for _ in range(2):
        fk[(1,)](*_args(), **kw)
        fa[(1,)](*_args(), FLAG=True)
    assert fk.hits == 1 and fa.hits == 1
    n0 = len(recorded)   # 4 launches (+1 benchmark launch of the autotuner on Triton 3.6)
    _warmup._install()
    assert triton_jit.JITFunction.run is not fk._jit_run
    fk[(1,)](*_args(), **kw)
    fa[(1,)](*_args(), FLAG=True)
    assert fk.hits == 2 and fa.hits == 2 and len(recorded) == n0 + 2
    with _warmup.compiling_ahead(1) as info:
        fk[(1,)](*_args(n=48), **kw)    # a new specialisation: submitted for compile, not run
        fk[(1,)](*_args(), **kw)        # a cached one: still the wrapper's (no launch)
        fa[(1,)](*_args(), FLAG=True)
    assert len(recorded) == n0 + 2 and fk.hits == 2 and fa.hits == 2 and info["kernels"] >= 1
    fk[(1,)](*_args(), **kw)
    assert fk.hits == 3 and len(recorded) == n0 + 3


def test_raw_pointer_knob_hands_the_launcher_data_ptr_ints(recorded, monkeypatch):
    """set_raw_pointers(True) (A/B knob): a hit passes each tensor argument as its data_ptr() int
    (the launcher then skips data_ptr() and cuPointerGetAttribute), everything else as before; a
    miss still goes through Triton's path with the tensors."""
    monkeypatch.setattr(_launch, "_RAW_POINTERS", True)
    fk = _launch.FastKernel(_jit())
    kw = dict(FLAG=True, BLOCK=64)
    args = _args()
    fk[(1,)](*args, **kw)
    slow = recorded[-1][1]
    fk[(1,)](*args, **kw)
    fast = recorded[-1][1]
    assert fk.hits == 1 and recorded[-1][0] is recorded[-2][0]
    # launcher arguments: grid (3), stream, function, metadata, launch metadata, hooks (2), then
    # the kernel's (x, y, n, s_x, alpha, FLAG, BLOCK)
    tail_fast, tail_slow = fast[9:], slow[9:]
    assert len(fast) == len(slow)
    assert tail_fast[0] == args[0].data_ptr() and tail_fast[1] == args[1].data_ptr()
    assert isinstance(tail_slow[0], torch.Tensor) and list(tail_fast[2:]) == list(tail_slow[2:])
    fk[(1,)](*_args(offset=1), **kw)     # misaligned: another key, Triton's path
    assert fk.misses == 2


def test_direct_launch_matches_the_launchers_own_call():
    """Triton 3.6's CudaLauncher.__call__ adds (cooperative, pdl, global scratch, profile scratch)
    before what it is handed and calls its C `launch`; the launch cache calls that `launch`
    directly for kernels without scratch memory: the C function must receive exactly what
    __call__ would hand it. Other launchers (Triton 3.9's, stubs) keep their own call."""
    drv = pytest.importorskip("triton.backends.nvidia.driver")
    calls = []
    launcher = drv.CudaLauncher.__new__(drv.CudaLauncher)
    for name, value in dict(launch=lambda *a: calls.append(a), num_ctas=1, global_scratch_size=0,
                            global_scratch_align=1, profile_scratch_size=0,
                            profile_scratch_align=1, launch_cooperative_grid=False,
                            launch_pdl=True, gsan_enabled=False).items():
        setattr(launcher, name, value)

    class _Kernel:
        _run = launcher
        function = 1234
        packed_metadata = (4, 1, 0)
    x = torch.zeros(4)
    got = _launch.direct_launch(_Kernel)
    if triton.__version__.startswith("3.6"):
        assert got is not None
        launcher(2, 1, 1, 77, 1234, (4, 1, 0), None, None, None, x, 5)   # Triton's own path
        fn, pre = got
        fn(2, 1, 1, 77, *pre, None, None, x, 5)                          # the cache's hit
        assert len(calls) == 2 and calls[0] == calls[1], calls
        launcher.global_scratch_size = 8      # needs an allocation per launch: __call__ keeps it
        assert _launch.direct_launch(_Kernel) is None
    else:
        assert got is None   # another launcher signature: the launcher's own __call__
    _Kernel._run = lambda *a: None
    assert _launch.direct_launch(_Kernel) is None
