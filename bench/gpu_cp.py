"""Overhead of context parallelism on one GPU (issue 14): every CP op through a single-process NCCL
group (FileStore) against the plain call, at a real size, bf16, forward and forward+backward.

    python bench/gpu_cp.py            # OUT=/some/dir also writes gpu_cp.csv there; < 2 minutes
    python bench/gpu_cp.py --smoke    # CPU, gloo, tiny sizes, reference backend: checks the script

Three columns per op and mode (triton.testing.do_bench, median):
  plain      the op without process_group (output_final_state / return_last_state on)
  cp rank 0  process_group of size 1: what the first rank of any group pays on top of plain
             (decay product, one all_gather of O(batch x state) each way, the prefix combine)
  cp later   the same group with ssm_kernels.distributed._FORCE_CORRECTION: the work of every rank
             but the first (summary pass from zero + exchange + rerun with the true initial state;
             backward: both backwards), i.e. the per-rank cost of a multi-GPU run minus the network
Also checks that the CP outputs and final states agree with the plain call (the rank-0 path
must be bitwise equal). The table is printed last.
"""
from __future__ import annotations

import csv
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ssm_kernels as sk  # noqa: E402
from ssm_kernels.distributed import core as skd  # noqa: E402

SMOKE = "--smoke" in sys.argv
DEV = "cpu" if SMOKE else "cuda"
DT = torch.float32 if SMOKE else torch.bfloat16
BK = "reference" if SMOKE else None
T0 = time.time()


def n(x):
    """A real size, or a tiny one for --smoke."""
    return max(x // 256, 3) if SMOKE else x


def bench(fn, warmup, rep):
    if not SMOKE:
        from triton.testing import do_bench
        return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    fn()
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def cases():
    """(name, shape text, make() -> (tensors needing grad, call(pg) -> (out, final)))."""
    def linear_scan():
        B, T, D = 8, n(4096), n(2048)
        a = torch.rand(B, T, D, device=DEV).mul(0.1).add(0.9).to(DT).requires_grad_()
        b = torch.randn(B, T, D, device=DEV, dtype=DT).requires_grad_()
        return [a, b], lambda pg: sk.linear_scan(a, b, output_final_state=True, backend=BK, process_group=pg)

    def selective_scan():
        B, D, L, N = 4, n(2048), n(2048), 16
        u = torch.randn(B, D, L, device=DEV, dtype=DT).requires_grad_()
        delta = (torch.rand(B, D, L, device=DEV) * 0.1).to(DT).requires_grad_()
        A = (-torch.rand(D, N, device=DEV) - 0.5).requires_grad_()
        Bm = torch.randn(B, N, L, device=DEV, dtype=DT).requires_grad_()
        Cm = torch.randn(B, N, L, device=DEV, dtype=DT).requires_grad_()
        Dv = torch.randn(D, device=DEV).requires_grad_()
        z = torch.randn(B, D, L, device=DEV, dtype=DT).requires_grad_()
        bias = (torch.randn(D, device=DEV) * 0.1).requires_grad_()
        return [u, delta, A, Bm, Cm, Dv, z, bias], lambda pg: sk.selective_scan_fn(
            u, delta, A, Bm, Cm, Dv, z, bias, True, True, backend=BK, process_group=pg)

    def la(kind):
        B, T, H, K = 4, n(4096), 16, n(128)
        q, k, v = (torch.randn(B, T, H, K, device=DEV, dtype=DT).requires_grad_() for _ in range(3))
        if kind == "simple_gla":
            g = (-torch.rand(B, T, H, device=DEV) * 0.1).requires_grad_()
            return [q, k, v, g], lambda pg: sk.chunk_simple_gla(
                q, k, v, g, output_final_state=True, backend=BK, process_group=pg)
        if kind == "gla":
            g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, device=DEV) + 4) \
                .requires_grad_()
            return [q, k, v, g], lambda pg: sk.chunk_gla(
                q, k, v, g, output_final_state=True, backend=BK, process_group=pg)
        return [q, k, v], lambda pg: sk.chunk_linear_attn(
            q, k, v, output_final_state=True, normalize=False, backend=BK,
            process_group=pg)

    yield "linear_scan", "B=8 T=4096 D=2048", linear_scan
    yield "selective_scan_fn", "B=4 D=2048 L=2048 N=16 +D,z,bias,softplus", selective_scan
    yield "chunk_linear_attn", "B=4 T=4096 H=16 K=V=128", lambda: la("linear_attn")
    yield "chunk_simple_gla", "B=4 T=4096 H=16 K=V=128", lambda: la("simple_gla")
    yield "chunk_gla", "B=4 T=4096 H=16 K=V=128", lambda: la("gla")


DEVICE_NAME = "cpu (smoke)" if SMOKE else None


def flat(x):
    if isinstance(x, (tuple, list)):
        return [t for y in x for t in flat(y)]
    return [] if x is None else [x]


def main():
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
    if SMOKE:
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    else:
        dist.init_process_group("nccl", store=store, rank=0, world_size=1,
                                device_id=torch.device(DEV, 0))
    global DEVICE_NAME
    DEVICE_NAME = DEVICE_NAME or torch.cuda.get_device_name()
    pg = dist.group.WORLD
    rows, fails = [], []
    for name, shape, make in cases():
        torch.manual_seed(0)
        leaves, call = make()
        variants = {"plain": None, "cp rank 0": pg, "cp later": pg}
        ref = [t.detach().clone() for t in flat(call(None))]
        res = {}
        for label, group in variants.items():
            skd._FORCE_CORRECTION = label == "cp later"
            try:
                got = flat(call(group))
                if label != "plain":
                    diff = max((g.float() - r.float()).abs().max().item() for g, r in zip(got, ref))
                    if label == "cp rank 0" and diff != 0:
                        fails.append(f"{name} {label}: not bitwise equal to plain (max diff {diff:.3g})")
                    res[label + " diff"] = diff
                grads = [torch.randn_like(t) for t in got]

                def fwd():
                    with torch.no_grad():
                        call(group)

                def fwd_bwd():
                    torch.autograd.backward(flat(call(group)), grads)

                res[label, "fwd"] = bench(fwd, 10, 100)
                res[label, "fwd+bwd"] = bench(fwd_bwd, 5, 100)
                for t in leaves:
                    t.grad = None
            except Exception as e:  # report and go on
                fails.append(f"{name} {label}: {type(e).__name__}: {e}")
            finally:
                skd._FORCE_CORRECTION = False
        for mode in ("fwd", "fwd+bwd"):
            p = res.get(("plain", mode))
            r0 = res.get(("cp rank 0", mode))
            rl = res.get(("cp later", mode))
            rows.append([name, shape, mode, p, r0, rl, res.get("cp later diff")])
        print(f"[{time.time() - T0:5.1f}s] {name} done", flush=True)
    # the exchange alone: one all_gather of a state-sized float32 buffer (selective scan's)
    buf = torch.randn(4 * n(2048) * 16 * 2, device=DEV)
    parts = [torch.empty_like(buf)]
    ag_ms = bench(lambda: dist.all_gather(parts, buf, group=pg), 10, 50)
    dist.destroy_process_group()

    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_cp.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["op", "shape", "mode", "plain_ms", "cp_rank0_ms", "cp_later_ms",
                        "later_max_abs_diff", "device"])
            for r in rows:
                w.writerow(r + [DEVICE_NAME])

    fmt = lambda x: "   n/a" if x is None else f"{x:6.3f}"  # noqa: E731
    ratio = lambda a, b: "  n/a" if a is None or b is None else f"{b / a:4.2f}x"  # noqa: E731
    print(f"\ndevice {DEVICE_NAME}, {DT}; group of 1 over {'gloo' if SMOKE else 'NCCL'}; all_gather of "
          f"{buf.numel() * 4 / 1e3:.0f} KB alone: {ag_ms * 1e3:.1f} us; total {time.time() - T0:.0f} s")
    for f in fails:
        print("FAIL", f)
    print(f"{'op':18} {'mode':8} {'plain ms':>9} {'cp rank0':>9} {'':>6} {'cp later':>9} {'':>6} "
          f"{'later diff':>10}  shape")
    for name, shape, mode, p, r0, rl, d in rows:
        print(f"{name:18} {mode:8} {fmt(p):>9} {fmt(r0):>9} {ratio(p, r0):>6} {fmt(rl):>9} "
              f"{ratio(p, rl):>6} {'' if d is None else f'{d:.2g}':>10}  {shape}")
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
