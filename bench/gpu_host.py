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
    for fn_key in (("linear_scan", "fwd"), ("selective_scan_fn", "fwd+bwd")):
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
