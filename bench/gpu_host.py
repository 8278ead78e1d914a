"""Host path (issue 8) on the GPU: eager / CUDA-graph replay per call at tiny shapes for linear_scan
and selective_scan_fn, ours with the launch cache (ssm_kernels._launch) on and off, peers side by
side (accelerated-scan, mamba-ssm where installed), then where the remaining host time goes
(cProfile, top lines). One process, ~60-120 s warm. Run from the repo root on the GPU machine:
    python3 bench/gpu_host.py            (or STEPS="build host" bash bench/gpu_steps.sh)
The targets are the lightest peer's eager time measured in the same run (session 5's H100
numbers where a peer is missing: accelerated-scan 37.2 / 268 us, mamba-ssm 44.4 / 256 us)."""
import cProfile
import io
import pstats
import sys

import torch

from ssm_kernels import _launch
from ssm_kernels.benchmarks.overhead import cases, measure

OPS = ("linear_scan", "selective_scan_fn")
SESSION5_PEER = {("linear_scan", "fwd"): 37.2, ("linear_scan", "fwd+bwd"): 268.0,
                 ("selective_scan_fn", "fwd"): 44.4, ("selective_scan_fn", "fwd+bwd"): 256.0}


def main():
    if not torch.cuda.is_available():
        sys.exit("gpu_host.py needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    import triton
    print(f"triton {triton.__version__}", flush=True)
    rows = {}
    ours = {}
    for case in cases("cuda"):
        if case.op not in OPS:
            continue
        if case.impl == "ssm_kernels":
            _launch.set_enabled(False)
            off = measure(case)
            _launch.set_enabled(True)
            on = measure(case)
            _launch.set_enabled(False)
            off2 = measure(case)      # off again: drift between the two orders shows here
            _launch.set_enabled(True)
            ours[(case.op, case.mode)] = case.fn
            rows.setdefault((case.op, case.mode), {}).update(
                on=on["eager_us"], off=min(off["eager_us"], off2["eager_us"]),
                graph=on["graph_us"], note=on["note"] or off["note"])
        else:
            r = measure(case)
            rows.setdefault((case.op, case.mode), {}).update(
                peer=r["eager_us"], peer_graph=r["graph_us"], peer_name=case.impl)
        print(f"  measured {case.op} {case.impl} {case.mode}", flush=True)
    # fwd+bwd: the backward runs on autograd's device thread (cProfile does not see it): time our
    # backward functions from inside, per call, against the whole step
    import time
    from ssm_kernels.linear_scan.interface import linear_scan_fwd_op
    from ssm_kernels.selective_scan.interface import selective_scan_fwd_op
    print("\nfwd+bwd split (us per call): whole step | forward alone | inside our backward")
    for op, kop in (("linear_scan", linear_scan_fwd_op), ("selective_scan_fn", selective_scan_fwd_op)):
        cls = kop._function
        inner = cls.backward
        spent = [0.0]

        def timed(ctx, *grads, inner=inner, spent=spent):
            t0 = time.perf_counter()
            r = inner(ctx, *grads)
            spent[0] += time.perf_counter() - t0
            return r
        cls.backward = staticmethod(timed)
        step = ours[(op, "fwd+bwd")]
        fwd = ours[(op, "fwd")]
        n = 200
        for f in (step, fwd):
            f()
        torch.cuda.synchronize()
        spent[0] = 0.0
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        torch.cuda.synchronize()
        whole = (time.perf_counter() - t0) / n * 1e6
        inside = spent[0] / n * 1e6
        t0 = time.perf_counter()
        for _ in range(n):
            fwd()
        torch.cuda.synchronize()
        alone = (time.perf_counter() - t0) / n * 1e6
        cls.backward = staticmethod(inner)
        print(f"  {op:<18} {whole:8.1f} | {alone:8.1f} (no grad) | {inside:8.1f}")
    for fn_key in (("linear_scan", "fwd"), ("selective_scan_fn", "fwd")):
        fn = ours[fn_key]
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(300):
            fn()
        pr.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(14)
        print(f"\n==== cProfile {' '.join(fn_key)} (300 calls, launch cache on) ====")
        print("\n".join(ln[:150] for ln in s.getvalue().splitlines()[6:22]))
    print("\nop                 mode     eager(cache on) eager(off)  graph   peer eager / graph   target  ok")
    for (op, mode), r in rows.items():
        peer = r.get("peer")
        target = peer if peer is not None else SESSION5_PEER[(op, mode)]
        ok = "yes" if r["on"] <= target else "NO"
        print(f"{op:<18} {mode:<8} {r['on']:>15} {r['off']:>10} {r['graph']:>6}   "
              f"{(str(peer) + ' ' + r.get('peer_name', '')) if peer is not None else '-':>22} / "
              f"{r.get('peer_graph', '-')!s:>6} {target:>7} {ok:>3}  {r['note']}")


if __name__ == "__main__":
    main()
