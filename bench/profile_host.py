"""Where the eager host time goes on the GPU machine: the cost of the building blocks every call
needs (an allocation, one Triton launch, an autograd.Function, autograd.grad) next to a cProfile of
our tiny-shape calls. Run on the GPU: python bench/profile_host.py [--profile].

--stub (CPU, no GPU, TRITON_INTERPRET unset): the per-call Python cost of our path with the kernels
stubbed. A compile-only Triton driver (target sm_90, as bench/sm90_audit.py) lets JITFunction.run
and ssm_kernels._launch run exactly as on the GPU, but every compiled kernel's launcher is a no-op;
CPU tensors stand in for CUDA ones (allocation costs differ a little). Cases: linear_scan and
selective_scan_fn (Triton backend) fwd and fwd+bwd, the chunk engine's ops, fft_conv (float32:
the path around torch.fft, whose CPU transforms the stub replaces by allocations; bf16), with the
launch cache on and off:
    PYTHONPATH=$PWD python bench/profile_host.py --stub [--profile] [--check] [--launches] [case substrings]
--launches: instead of timing, per case the launch cache's hits / misses / fallbacks (with
reasons, per kernel) over steady-state calls, against the launcher calls actually made.
--check: instead of timing, compare every launcher call of each case with the launch cache on
against Triton's own path (same compiled kernel, grid and arguments)."""
import os
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # 3.6 default; silences 3.9 warning
import cProfile
import io
import pstats
import sys
import time

import torch
import triton
import triton.language as tl

import ssm_kernels as sk


@triton.jit
def _touch(x_ptr, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + o, tl.load(x_ptr + o, mask=o < n) + 1, mask=o < n)


class _Id(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


def per_call_us(fn, calls=200, repeats=5):
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def main():
    x = torch.zeros(1024, device="cuda")
    xl = torch.zeros(64, device="cuda", requires_grad=True)
    a = torch.rand(1, 16, 64, device="cuda")
    b = torch.randn(1, 16, 64, device="cuda")
    al, bl = a.clone().requires_grad_(), b.clone().requires_grad_()
    ones = torch.ones(1, 16, 64, device="cuda")

    def train():
        h = sk.linear_scan(al, bl, dim=-1)
        torch.autograd.grad(h, (al, bl), ones)

    blocks = {
        "torch.empty(1024) on cuda": lambda: torch.empty(1024, device="cuda"),
        "x.add_(1) (one aten launch)": lambda: x.add_(1),
        "one Triton launch (1 tensor arg)": lambda: _touch[(1,)](x, 1024, BLOCK=1024),
        "autograd.Function.apply (view)": lambda: _Id.apply(xl),
        "autograd.grad of x*2": lambda: torch.autograd.grad(xl * 2, xl, torch.ones_like(xl)),
        "linear_scan fwd": lambda: sk.linear_scan(a, b, dim=-1),
        "linear_scan fwd+bwd": train,
    }
    print(f"{'building block':<36} us/call")
    for name, fn in blocks.items():
        print(f"{name:<36} {per_call_us(fn):8.2f}", flush=True)
    if "--profile" in sys.argv:
        for name in ("linear_scan fwd", "linear_scan fwd+bwd"):
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(300):
                blocks[name]()
            pr.disable()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18)
            print(f"\n==== {name} (300 calls) ====")
            print("\n".join(s.getvalue().splitlines()[6:28]))


_RECORD = None   # a list while --check records the launcher calls
_LAUNCHED = None   # a list while --launches counts the launcher calls


def install_stub():
    """Compile-only driver + no-op launchers; CPU tensors take the Triton path (see --stub)."""
    import os
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("--stub: unset TRITON_INTERPRET (the stub runs the real JITFunction.run path)")
    from ssm_kernels.testing import OfflineDriver
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.driver import driver

    def _no_launch(self):
        self.function = 0

        def run(*args, kernel=self):
            if _RECORD is not None:
                _RECORD.append((kernel, args))
            if _LAUNCHED is not None:   # --launches: every launcher call, by kernel name
                _LAUNCHED.append(kernel.name)
        self._run = run

    driver.set_active(OfflineDriver())
    CompiledKernel._init_handles = _no_launch
    from ssm_kernels import _backend, _device
    orig_reason = _backend.triton_reason
    _backend.triton_reason = lambda device: orig_reason(torch.device("cuda"))
    _device._sm_count = lambda index: 132
    torch.cuda.current_device = lambda: 0

    class _StubExtension:
        """ssm_kernels._C's selective scan with no kernels: the outputs' allocations only."""
        @staticmethod
        def selective_scan_fwd(u, delta, A, B, C, D, z, bias, h0, cu, offs, softplus, ck_len, rows):
            f32 = dict(dtype=torch.float32, device=u.device)
            dim, N = A.shape
            nseq = u.shape[0] if cu is None else cu.shape[0] - 1
            return [torch.empty_like(u), torch.empty((nseq, dim, N), **f32),  # a list, as pybind's
                    torch.empty((rows, dim, N), **f32)]                        # std::vector

        @staticmethod
        def selective_scan_bwd(u, delta, A, B, C, D, z, bias, cu, offs, ckpt, dout, dlast, softplus,
                               ck_len, want_dh0):
            empty = u.new_empty((0,))
            f32 = dict(dtype=torch.float32, device=u.device)
            dim, N = A.shape
            return [torch.empty_like(u), torch.empty_like(delta), torch.empty((dim, N), **f32),
                    torch.empty_like(B), torch.empty_like(C),
                    torch.empty((dim,), **f32) if D is not None else empty,
                    torch.empty_like(z) if z is not None else empty,
                    torch.empty((dim,), **f32) if bias is not None else empty,
                    torch.empty((u.shape[0], dim, N), **f32) if want_dh0 else empty]

    _backend._cuda_ext, _backend._cuda_ext_tried = _StubExtension(), True
    _backend.cuda_reason = lambda device: None
    _stub_fft()


_FFT_LIB = None


def _stub_fft():
    """torch.fft on CPU tensors does the real transform (pocketfft): replace the CPU kernels of
    aten::_fft_c2c / _fft_r2c (what torch.fft.fft / ifft / rfft dispatch to) by an allocation of
    the output, so fft_conv's cuFFT path costs what its host code does. The dispatcher, argument
    parsing and Python binding of the torch.fft call still run; cuFFT's own host work (plan-cache
    lookup, workspace, cufftExec) on the GPU does not (a few us per call there)."""
    global _FFT_LIB
    import warnings

    def c2c(x, dim, normalization, forward):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    def r2c(x, dim, normalization, onesided):
        shape = list(x.shape)
        shape[dim[-1]] = shape[dim[-1]] // 2 + 1 if onesided else shape[dim[-1]]
        return torch.empty(shape, dtype=torch.complex64 if x.dtype == torch.float32
                           else torch.complex128, device=x.device)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _FFT_LIB = torch.library.Library("aten", "IMPL")
        _FFT_LIB.impl("_fft_c2c", c2c, "CPU")
        _FFT_LIB.impl("_fft_r2c", r2c, "CPU")


def per_call_cpu_us(fn, calls=300, repeats=7):
    """Best of `repeats` of the mean CPU time (this thread's, not wall: the shared CPU machine's
    other processes then cost little) per call."""
    for _ in range(5):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.thread_time() - t0) / calls * 1e6)
    return best


def stub_cases():
    T = "triton"
    a, b = torch.rand(1, 16, 64), torch.randn(1, 16, 64)
    al, bl = a.clone().requires_grad_(), b.clone().requires_grad_()
    ones = torch.ones(1, 16, 64)
    bf = torch.bfloat16
    u, dt, z = (torch.randn(1, 16, 64, dtype=bf) for _ in range(3))
    A = -torch.rand(16, 16)
    Bv, Cv = (torch.randn(1, 1, 16, 64, dtype=bf) for _ in range(2))
    Dp, bias = torch.randn(16), torch.randn(16)
    ul, dtl = u.clone().requires_grad_(), dt.clone().requires_grad_()
    onesb = torch.ones(1, 16, 64, dtype=bf)

    def ls_train():
        h = sk.linear_scan(al, bl, dim=-1, backend=T)
        torch.autograd.grad(h, (al, bl), ones)

    def ss_train(backend=T):
        o = sk.selective_scan_fn(ul, dtl, A, Bv, Cv, Dp, z, bias, True, backend=backend)
        torch.autograd.grad(o, (ul, dtl), onesb)

    return {
        "linear_scan fwd": lambda: sk.linear_scan(a, b, dim=-1, backend=T),
        "linear_scan fwd+bwd": ls_train,
        "selective_scan_fn fwd": lambda: sk.selective_scan_fn(u, dt, A, Bv, Cv, Dp, z, bias, True,
                                                              backend=T),
        "selective_scan_fn fwd+bwd": ss_train,
        # the GPU's default path (auto -> ssm_kernels._C), its kernels stubbed
        "selective_scan_fn cuda fwd": lambda: sk.selective_scan_fn(u, dt, A, Bv, Cv, Dp, z, bias,
                                                                   True, backend="cuda"),
        "selective_scan_fn cuda fwd+bwd": lambda: ss_train("cuda"),
        **_peer_cases(a, b, al, bl, ones),
        **_engine_cases(),
        **_fft_cases(),
    }


def _fft_cases():
    """fft_conv at B=2 H=16 L=1024 (D on): float32 (the path fused around torch.fft, cufft.py:
    3 launches + 2 transforms forward, 3 + 2 backward (FUSED_DK_EPILOGUE, MERGED_INVERSE);
    transforms stubbed by `_stub_fft`), gates off and on, and bf16 (monarch16, one kernel per
    pass) gates off and on."""
    T = "triton"
    u, k, D = torch.randn(2, 16, 1024), torch.randn(16, 1024) / 30, torch.randn(16)
    pg, qg = torch.rand(2, 16, 1024), torch.rand(2, 16, 1024)
    out = {}
    for tag, dt, gates in (("f32", torch.float32, False), ("f32 gates", torch.float32, True),
                           ("bf16", torch.bfloat16, False), ("bf16 gates", torch.bfloat16, True)):
        x = u.to(dt)
        g = (pg.to(dt), qg.to(dt)) if gates else (None, None)
        xl, kl = x.clone().requires_grad_(), k.clone().requires_grad_()
        dy = torch.ones_like(x)

        def train(xl=xl, kl=kl, g=g, dy=dy):
            y = sk.fft_conv(xl, kl, D, pre_gate=g[0], post_gate=g[1], backend=T)
            torch.autograd.grad(y, (xl, kl), dy)
        out[f"fft_conv {tag} fwd"] = lambda x=x, g=g: sk.fft_conv(x, k, D, pre_gate=g[0],
                                                                  post_gate=g[1], backend=T)
        out[f"fft_conv {tag} fwd+bwd"] = train
    return out


def _engine_cases():
    """The chunk engine's ops and their neighbours at bench --overhead's tiny shapes (Triton
    backend): chunk_linear_attn / chunk_simple_gla / chunk_gla [1,64,2,64], chunk_gated_delta_rule
    [1,64,2,64], fused_recurrent_simple_gla decode B=64 H=16 K=V=128, selective_state_update B=64
    D=4096 N=16, chunk_based, SSD, causal_conv1d."""
    T = "triton"
    bf = torch.bfloat16
    q, k, v = (torch.randn(1, 64, 2, 64, dtype=bf) for _ in range(3))
    gh = torch.nn.functional.logsigmoid(torch.randn(1, 64, 2))
    gk = torch.nn.functional.logsigmoid(torch.randn(1, 64, 2, 64))
    beta = torch.rand(1, 64, 2, dtype=bf)
    ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
    do = torch.ones(1, 64, 2, 64, dtype=bf)

    def train(f):
        def step():
            o = f(ql, kl, vl)
            o = o[0] if isinstance(o, tuple) else o
            torch.autograd.grad(o, (ql, kl, vl), do)
        return step
    qd, kd, vd = (torch.randn(64, 1, 16, 128, dtype=bf) for _ in range(3))
    gd = torch.nn.functional.logsigmoid(torch.randn(64, 1, 16))
    h0 = torch.randn(64, 16, 128, 128)
    out = {}
    for name, extra in (("chunk_linear_attn", ()), ("chunk_simple_gla", (gh,)), ("chunk_gla", (gk,)),
                        ("chunk_gated_delta_rule", (gh, beta))):
        op = getattr(sk, name)
        out[f"{name} fwd"] = lambda op=op, extra=extra: op(q, k, v, *extra, backend=T)
        out[f"{name} fwd+bwd"] = train(lambda q_, k_, v_, op=op, extra=extra: op(q_, k_, v_, *extra,
                                                                                  backend=T))
    out["fused_recurrent_simple_gla decode"] = lambda: sk.fused_recurrent_simple_gla(
        qd, kd, vd, gd, initial_state=h0, output_final_state=True, backend=T)
    st = torch.randn(64, 4096, 16)
    x1, dt1, z1 = (torch.randn(64, 4096, dtype=bf) for _ in range(3))
    A1, D1, b1 = -torch.rand(4096, 16), torch.randn(4096), torch.randn(4096)
    B1, C1 = (torch.randn(64, 16, dtype=bf) for _ in range(2))
    out["selective_state_update decode"] = lambda: sk.selective_state_update(
        st, x1, dt1, A1, B1, C1, D1, z1, b1, True, backend=T)
    qb, kb = (torch.randn(1, 64, 2, 16, dtype=bf) for _ in range(2))
    out["chunk_linear_attn normalize=False fwd"] = lambda: sk.chunk_linear_attn(
        q, k, v, normalize=False, backend=T)
    out["chunk_linear_attn normalize=False fwd+bwd"] = train(
        lambda q_, k_, v_: sk.chunk_linear_attn(q_, k_, v_, normalize=False, backend=T))
    h0s = torch.randn(1, 2, 64, 64)
    out["chunk_simple_gla h0+ht fwd+bwd"] = train(lambda q_, k_, v_: sk.chunk_simple_gla(
        q_, k_, v_, gh, initial_state=h0s, output_final_state=True, backend=T))
    out["chunk_based fwd"] = lambda: sk.chunk_based(qb, kb, v, backend=T)
    qbl, kbl = (t.clone().requires_grad_() for t in (qb, kb))

    def based_train():
        o = sk.chunk_based(qbl, kbl, vl, backend=T)
        o = o[0] if isinstance(o, tuple) else o
        torch.autograd.grad(o, (qbl, kbl, vl), do)
    out["chunk_based fwd+bwd"] = based_train
    if hasattr(sk, "mamba_chunk_scan_combined"):
        x = torch.randn(1, 64, 2, 64, dtype=bf)
        dt, A = torch.rand(1, 64, 2), -torch.rand(2)
        B, C = (torch.randn(1, 64, 1, 64, dtype=bf) for _ in range(2))
        out["mamba_chunk_scan_combined fwd"] = lambda: sk.mamba_chunk_scan_combined(
            x, dt, A, B, C, 64)
        xl_, dtl_, Bl_, Cl_ = (t.clone().requires_grad_() for t in (x, dt, B, C))
        Dm = torch.randn(2)

        def ssd_train():
            o = sk.mamba_chunk_scan_combined(xl_, dtl_, A, Bl_, Cl_, 64, D=Dm, dt_softplus=True)
            torch.autograd.grad(o, (xl_, dtl_, Bl_, Cl_), torch.ones_like(o))
        out["mamba_chunk_scan_combined fwd+bwd"] = ssd_train
    if hasattr(sk, "causal_conv1d_fn"):
        xc, w = torch.randn(1, 64, 64, dtype=bf), torch.randn(64, 4, dtype=bf)
        out["causal_conv1d_fn fwd"] = lambda: sk.causal_conv1d_fn(xc, w, None, activation="silu",
                                                                  backend=T)
        xs, cs = torch.randn(64, 1024, dtype=bf), torch.randn(64, 1024, 3, dtype=bf)
        wd = torch.randn(1024, 4, dtype=bf)
        out["causal_conv1d_update"] = lambda: sk.causal_conv1d_update(xs, cs, wd, None, "silu",
                                                                      backend=T)
    return out


def _peer_cases(a, b, al, bl, ones):
    """accelerated-scan (pure Triton, the linear_scan peer) through the same stub, when importable
    (e.g. PYTHONPATH=/tmp/site after unpacking .whl/accelerated_scan-*.whl there)."""
    try:
        from accelerated_scan.scalar import scan
    except Exception:
        return {}

    def train():
        torch.autograd.grad(scan(al, bl), (al, bl), ones)
    return {"peer accelerated_scan fwd": lambda: scan(a, b), "peer accelerated_scan fwd+bwd": train}


def stub_main():
    install_stub()
    try:
        from ssm_kernels import _launch
    except ImportError:   # a tree without the launch cache (the baseline): both columns equal
        class _launch:
            set_enabled = staticmethod(lambda on: None)
    cases = stub_cases()
    only = [a for a in sys.argv[1:] if not a.startswith("--")]
    if only:   # substrings of case names: python bench/profile_host.py --stub chunk decode
        cases = {n: f for n, f in cases.items() if any(o in n for o in only)}
    if "--check" in sys.argv:
        sys.exit(1 if check_launches(cases) else 0)
    if "--launches" in sys.argv:
        sys.exit(1 if launch_report(cases) else 0)
    print(f"{'stubbed kernels, CPU host':<28} {'cache on':>9} {'cache off':>9}  us/call")
    for name, fn in cases.items():
        _launch.set_enabled(True)
        on = per_call_cpu_us(fn)
        _launch.set_enabled(False)
        off = per_call_cpu_us(fn)
        _launch.set_enabled(True)
        print(f"{name:<34} {on:9.1f} {off:9.1f}", flush=True)
    _report_launch_cache()
    if "--profile" in sys.argv:
        for name, fn in cases.items():
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(300):
                fn()
            pr.disable()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(22)
            print(f"\n==== {name} (300 calls, cache on) ====")
            print("\n".join(s.getvalue().splitlines()[6:32]))


def check_launches(cases):
    """--check: per case, the launcher calls of one call with the launch cache on and one with it
    off (Triton's own path) must agree: same compiled kernels in the same order, same grid, and per
    argument the same value (tensors: same dtype, shape and strides; they are new allocations)."""
    global _RECORD
    from ssm_kernels import _launch

    def sig(a):
        if isinstance(a, torch.Tensor):
            return ("tensor", a.dtype, tuple(a.shape), a.stride(), a.data_ptr() % 16)
        return repr(a)
    bad = 0
    for name, fn in cases.items():
        fn()
        fn()
        calls = {}
        for on in (True, False):
            _launch.set_enabled(on)
            _RECORD = []
            fn()
            calls[on], _RECORD = _RECORD, None
        _launch.set_enabled(True)
        a, b = calls[True], calls[False]
        same = len(a) == len(b) and all(
            ka is kb and len(xa) == len(xb) and all(i == 6 or sig(u) == sig(w)
                                                   for i, (u, w) in enumerate(zip(xa, xb)))
            for (ka, xa), (kb, xb) in zip(a, b))
        bad += not same
        print(f"{name:<34} {len(a):3d} launches  cache on == Triton's path: {same}", flush=True)
    print("launch check:", "all identical" if not bad else f"{bad} case(s) DIFFER")
    return bad


def launch_report(cases, calls=3, out=print):
    """--launches: per case, after two warm-up calls, `calls` more: every launcher call must come
    from a launch-cache hit (ssm_kernels._launch.launch_stats: hits, misses, fallbacks with their
    reasons, per kernel). Returns the number of cases with a launch off the fast path."""
    global _LAUNCHED
    import triton
    from ssm_kernels import _launch
    _launch.set_enabled(True)
    bad = 0
    out(f"triton {triton.__version__}: launch cache per steady-state call ({calls} calls after 2)")
    for name, fn in cases.items():
        fn()
        fn()
        _launch.reset_launch_stats()
        _LAUNCHED = []
        for _ in range(calls):
            fn()
        launched, _LAUNCHED = _LAUNCHED, None
        stats = _launch.launch_stats(reset=True)
        hits = sum(st["hits"] for st in stats.values())
        slow = {k: st for k, st in stats.items() if st["misses"] or st["fallbacks"]}
        ok = not slow and hits == len(launched)
        bad += not ok
        out(f"{name:<44} launches/call {len(launched) / calls:5.1f}  hits/call {hits / calls:5.1f}"
            f"  {'all fast' if ok else 'NOT all fast'}")
        for k, st in slow.items():
            out(f"    {k}: misses {st['misses']} fallbacks {st['fallbacks']} keys {st['keys']} "
                f"varying: {st['varying'] or '-'}")
        if hits != len(launched):
            from collections import Counter
            served = Counter({k.rsplit('.', 1)[1]: st["hits"] for k, st in stats.items()})
            out(f"    launched without the cache: {dict(Counter(launched) - served)}")
    out("launch cache:", "every steady-state launch a hit" if not bad else f"{bad} case(s) not")
    return bad


def _report_launch_cache():
    """Every launched FastKernel whose calls did not all come from its cache (after the warm-up
    calls): a call site the launch cache cannot serve (callable grid, tensor or non-trailing
    keyword arguments, hooked autotuner) shows up here."""
    try:
        from ssm_kernels._launch import FastKernel
    except ImportError:
        return
    import gc
    bad = []
    for obj in gc.get_objects():
        if isinstance(obj, FastKernel) and obj.misses and (
                any(e is None for e in obj._cache.values()) or obj._simple is False):
            bad.append(f"{getattr(obj.fn, '__name__', obj.fn)}: hits {obj.hits} misses {obj.misses} "
                       f"uncached keys {sum(e is None for e in obj._cache.values())}")
    print("launch cache: every launched kernel served from the cache" if not bad else
          "launch cache NOT serving: " + "; ".join(bad))


if __name__ == "__main__":
    if "--stub" in sys.argv:
        stub_main()
    else:
        main()
