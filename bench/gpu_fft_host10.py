"""fft_conv's eager forward+backward host time on the GPU, taken apart (issue 8; session 10 helper
ffthost10). Shape = `bench --overhead`'s: (B, H, L) = (1, 16, 256), Lk = 256, D on; float32 (the
cuFFT path both ways unless interface.MONARCH16_F32 is on), bf16 (monarch16 both ways), and the
torch.fft peer (rfft * rfft -> irfft + D u, float32), ours vs peer side by side.

Per case, us per call (best of 5 x 100 calls, host clock between two synchronisations):
  fwd        the public call without grad
  f+b        forward + torch.autograd.grad (what gpu_host.py / bench --overhead time)
  f+b 1thr   the same under torch.autograd.set_multithreading_enabled(False): the backward runs
             on the calling thread instead of being handed to autograd's CUDA device thread
  bwd main   our backward implementation (interface._conv_bwd) called on the main thread
  floor      f+b of an autograd.Function with the same inputs / saved tensors whose forward and
             backward launch nothing (empty_like only): autograd's own cost on this machine,
             eager and 1thr
  graph      f+b CUDA-graph replay (the GPU work)
Then per f+b call, from torch.profiler: CUDA runtime / driver API calls by name and by thread
(main / other = autograd's device thread), count and host us each; aten ops per thread; the
cuFFT plan cache size before / after 200 calls (a plan made per call shows as growth or as
cufftPlan / cufftMakePlan rows); one f+b under torch.cuda.set_sync_debug_mode("error")
(a synchronising call raises); float64 checks of one f+b per dtype.
"ours fp32 2epi": cufft.FUSED_DK_EPILOGUE off (the backward's epilogues as two launches, as
before session 10), measured right after "ours fp32" (bitwise the same outputs: CPU test);
"ours fp32 cufft": interface.MONARCH16_F32 off (the forward on the cuFFT path as well).
Run from the repo root: python3 bench/gpu_fft_host10.py   (~1 min on a warm Triton cache)"""
import functools
import time

import torch

import ssm_kernels as sk
from ssm_kernels.benchmarks.overhead import OverheadCase, _training, measure
from ssm_kernels.fft_conv import interface as fi
from ssm_kernels.fft_conv.reference import fft_conv_bwd_ref, fft_conv_fwd_ref

from profile_host import per_call_us   # bench/ (the script's folder) is on sys.path

B, H, L = 1, 16, 256


# best of `repeats` x `calls` host-clocked calls between two synchronisations, us per call
per_call = functools.partial(per_call_us, calls=100)


def single_thread(fn):
    def run():
        with torch.autograd.set_multithreading_enabled(False):
            fn()
    return run


class _Floor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, k, D):
        ctx.save_for_backward(u, k, D)
        return torch.empty_like(u)

    @staticmethod
    def backward(ctx, dy):
        u, k, D = ctx.saved_tensors
        return torch.empty_like(u), torch.empty_like(k), None


def torch_fft_conv(u, k, D):
    n = 2 * u.shape[-1]
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :u.shape[-1]]
    return y + u * D[:, None]


def api_profile(step, calls=10):
    """{(thread, api name): (count per call, host us per call)}, {(thread, aten op): (count per
    call, host us per call incl. children: e.g. aten::_fft_c2c = cuFFT's host work)}."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    api, aten, tids = {}, {}, set()
    events = prof.events()
    # the main thread: the one that ran the step's own ones_like (the cotangent)
    main = next((e.thread for e in events if e.name == "aten::ones_like"), None)
    for e in events:
        if e.device_type != DeviceType.CPU:
            continue
        tids.add(e.thread)
        who = "main" if e.thread == main else f"thread {e.thread}"
        if e.name.startswith("cu") and e.name != "cudaDeviceSynchronize":
            n, us = api.get((who, e.name), (0, 0.0))
            api[(who, e.name)] = (n + 1, us + e.time_range.elapsed_us())
        elif e.name.startswith("aten::"):
            n, us = aten.get((who, e.name), (0, 0.0))
            aten[(who, e.name)] = (n + 1, us + e.time_range.elapsed_us())
    per = lambda d: {k: (n / calls, us / calls) for k, (n, us) in d.items()}
    return per(api), per(aten), main, tids


class _Timed(torch.autograd.Function):
    """Runs `seq` inside its backward and adds its host time to `spent` (autograd's thread)."""
    @staticmethod
    def forward(ctx, x, seq, spent):
        ctx.seq, ctx.spent = seq, spent
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, g):
        t0 = time.perf_counter()
        ctx.seq()
        ctx.spent[0] += time.perf_counter() - t0
        return torch.empty_like(g), None, None


def where_ops_cost(seq, x, n=200):
    """Host us of one `seq()` (the fp32 backward's cuFFT calls + allocations + our 3 launches)
    timed where it runs: on the main thread, inside an autograd backward (autograd's CUDA device
    thread), and inside one with set_multithreading_enabled(False) (the calling thread)."""
    out = {}
    for _ in range(5):
        seq()
    torch.cuda.synchronize()
    t = 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        seq()
        t += time.perf_counter() - t0
    out["main thread"] = t / n * 1e6
    xl = x.clone().requires_grad_()
    for mt in (True, False):
        spent = [0.0]
        with torch.autograd.set_multithreading_enabled(mt):
            for i in range(n + 5):
                if i == 5:
                    torch.cuda.synchronize()
                    spent[0] = 0.0
                y = _Timed.apply(xl, seq, spent)
                torch.autograd.grad(y, [xl], y)
        torch.cuda.synchronize()
        out["autograd device thread" if mt else "autograd, calling thread"] = spent[0] / n * 1e6
    return out


def sync_check(step):
    try:
        torch.cuda.set_sync_debug_mode("error")
        step()
        torch.cuda.synchronize()
        return "none"
    except RuntimeError as e:
        return f"RAISED: {str(e).splitlines()[0][:100]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)


def check64(dtype, u, k, D):
    ul, kl = u.clone().requires_grad_(), k.clone().requires_grad_()
    y = sk.fft_conv(ul, kl, D)
    dy = torch.randn_like(y)
    du, dk = torch.autograd.grad(y, [ul, kl], dy)
    d = torch.float64
    y64 = fft_conv_fwd_ref(u.to(d), k.to(d), D.to(d), None, None)
    du64, dk64, _, _, _ = fft_conv_bwd_ref(dy.to(d), u.to(d), k.to(d), D.to(d), None, None)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    errs = {n: ((a.to(d) - b).abs().max() / b.abs().max()).item()
            for n, a, b in (("y", y, y64), ("du", du, du64), ("dk", dk, dk64))}
    ok = all(v <= tol for v in errs.values())
    return ok, ", ".join(f"{n} {v:.1e}" for n, v in errs.items()) + f" (tol {tol:g})"


def main():
    if not torch.cuda.is_available():
        raise SystemExit("gpu_fft_host10.py needs a CUDA GPU")
    import triton
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton "
          f"{triton.__version__}  MONARCH16_F32 {fi.MONARCH16_F32}", flush=True)
    dev = "cuda"
    k = torch.randn(H, L, device=dev)
    D = torch.randn(H, device=dev)
    u32 = torch.randn(B, H, L, device=dev)
    rows, checks = [], []
    cache = torch.backends.cuda.cufft_plan_cache[0]
    from ssm_kernels.fft_conv import cufft
    f32_default = fi.MONARCH16_F32
    for name, dtype in (("ours fp32", torch.float32), ("ours fp32 2epi", torch.float32),
                        ("ours fp32 cufft", torch.float32), ("ours bf16", torch.bfloat16),
                        ("torch.fft fp32", torch.float32), ("floor", torch.float32)):
        # "2epi": FUSED_DK_EPILOGUE off (the backward's du and dk epilogues as two launches, the
        # code before session 10), A/B against "ours fp32" (bitwise the same outputs); "cufft":
        # MONARCH16_F32 off (the forward on the cuFFT path too, as before session 10)
        cufft.FUSED_DK_EPILOGUE = not name.endswith("2epi")
        fi.MONARCH16_F32 = f32_default and not name.endswith("cufft")
        u = u32.to(dtype)
        ul, kl = u.clone().requires_grad_(), k.clone().requires_grad_()
        if name.startswith("ours"):
            fwd = lambda u=u: sk.fft_conv(u, k, D)
            f = lambda ul=ul, kl=kl: sk.fft_conv(ul, kl, D)
            print(f"{name}: paths fwd {fi.triton_path('fwd', u, L)} / bwd "
                  f"{fi.triton_path('bwd', u, L)}", flush=True)
        elif name == "floor":
            fwd = lambda u=u: _Floor.apply(u, k, D)
            f = lambda ul=ul, kl=kl: _Floor.apply(ul, kl, D)
        else:
            fwd = lambda u=u: torch_fft_conv(u, k, D)
            f = lambda ul=ul, kl=kl: torch_fft_conv(ul, kl, D)
        step = _training(f, [ul, kl])
        r = {"case": name}
        with torch.no_grad():
            r["fwd"] = per_call(fwd)
        plans0 = cache.size
        r["f+b"] = per_call(step, calls=200, repeats=1)   # also: 200+ calls for the plan cache
        plans1 = cache.size
        r["f+b"] = min(r["f+b"], per_call(step))
        r["f+b 1thr"] = per_call(single_thread(step))
        if name.startswith("ours"):
            dy = torch.ones_like(u)
            bwd = lambda u=u, dy=dy: fi._conv_bwd(dy, u, k, D, None, None, "auto")
            r["bwd main"] = per_call(bwd)
        m = measure(OverheadCase("fft_conv", name, "fwd+bwd", "", step))
        r["graph"] = m["graph_us"] if m["graph_us"] != "" else m["note"][:30]
        rows.append(r)
        if name != "floor":
            api, aten, main_tid, tids = api_profile(step)
            print(f"\n== {name}: per f+b call (threads {sorted(tids)}, main {main_tid}); cuFFT plan "
                  f"cache {plans0} -> {plans1} over 200+ calls (max {cache.max_size}); sync-debug: "
                  f"{sync_check(step)}", flush=True)
            for (who, n), (c, us) in sorted(api.items(), key=lambda x: -x[1][1]):
                print(f"   {who:<10} {n:<34} x{c:<5g} {us:8.1f} us")
            by_thread = {}
            for (who, n), (c, us) in sorted(aten.items(), key=lambda x: -x[1][1]):
                by_thread.setdefault(who, []).append(f"{n[6:]} x{c:g} {us:.1f}us")
            for who, ops in by_thread.items():
                print(f"   aten ops on {who} (us incl. children): " + ", ".join(ops))
        if name.startswith("ours"):
            ok, msg = check64(dtype, u, k, D)
            checks.append(ok)
            print(f"   float64 check {name}: {'ok' if ok else 'FAILED'}: {msg}", flush=True)
    cufft.FUSED_DK_EPILOGUE = True
    fi.MONARCH16_F32 = f32_default
    # the float32 backward's own operations (interface._conv_bwd at this shape: pad, fft, spectral,
    # ifft, epilogues, allocations), timed per call on each thread
    uf, dyf = u32.clone(), torch.ones_like(u32)
    seq = lambda: fi._conv_bwd(dyf, uf, k, D, None, None, "auto")
    print("\nour fp32 backward implementation, host us per call, by the thread it runs on: " + ", ".join(
        f"{w} {us:.1f}" for w, us in where_ops_cost(seq, u32).items()), flush=True)
    fft_only = lambda: torch.fft.ifft(torch.fft.fft(torch.empty(48, 256, device=dev,
                                                                dtype=torch.complex64))[16:],
                                      norm="forward")
    print("its two cuFFT calls alone (fft [48, 256] + ifft [32, 256] complex64 + 1 empty), by thread: "
          + ", ".join(f"{w} {us:.1f}" for w, us in where_ops_cost(fft_only, u32).items()),
          flush=True)
    cols = ["fwd", "f+b", "f+b 1thr", "bwd main", "graph"]
    print("\nfft_conv (1,16,256) D on, us per call, eager unless graph (f+b 1thr: "
          "set_multithreading_enabled(False); bwd main: our backward impl on the main thread)")
    print(f"{'case':<16}" + "".join(f"{c:>10}" for c in cols))
    for r in rows:
        print(f"{r['case']:<16}" + "".join(
            f"{(f'{r[c]:.1f}' if isinstance(r.get(c), float) else str(r.get(c, '-'))):>10}"
            for c in cols))
    print("float64 checks: " + ("all ok" if all(checks) else "FAILED"))


if __name__ == "__main__":
    main()
