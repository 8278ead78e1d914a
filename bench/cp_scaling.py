"""Strong and weak scaling of context parallelism over 1, 2, 4 and 8 GPUs of one host (issue 15).

    python bench/cp_scaling.py [--quick] [--ops linear_scan,chunk_gla]
        launches `torchrun --standalone --nproc_per_node=N` for N in 1, 2, 4, 8 (those present),
        collects the rows, prints the table last; OUT=/some/dir also writes cp_scaling.csv there.
    torchrun --standalone --nproc_per_node=4 bench/cp_scaling.py --worker --rows /tmp/rows.jsonl
        one group size by hand.

Per op (bf16, forward + backward, every rank's loss on its own segment):
  strong  one global sequence of fixed length split evenly over N GPUs: time, tokens/s,
          efficiency T(1) / (N T(N));
  weak    a fixed length per GPU (global length N times it): efficiency T(1) / T(N).
Time per step is the slowest rank's median (CUDA events around fwd+bwd after a barrier).
Before timing, each group checks itself: float32, an uneven split, outputs, final states and
input gradients of every rank against the single-GPU call on the whole sequence.

NVLink SHARP / multicast stay off (this machine's NVLS is not usable here): the script sets
NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 for itself and the
workers it starts.
"""
from __future__ import annotations

import os

for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
               ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_k] = _v

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

OPS = ("linear_scan", "selective_scan_fn", "chunk_linear_attn", "chunk_simple_gla", "chunk_gla")
# (strong global length, weak per-GPU length); --quick divides both by 8
LENGTHS = {"linear_scan": (131072, 32768), "selective_scan_fn": (65536, 16384),
           "chunk_linear_attn": (65536, 16384), "chunk_simple_gla": (65536, 16384),
           "chunk_gla": (65536, 16384)}


def make(op, T, dev, dtype, gen):
    """Inputs of one op over length T: (timed {name: (tensor, time_dim)},
    shared {name: tensor}), all leaves, plus call(x, pg) -> (out, finals list)."""
    import ssm_kernels as sk
    r = lambda *s: torch.randn(*s, generator=gen, device=dev)  # noqa: E731
    u_ = lambda *s: torch.rand(*s, generator=gen, device=dev)  # noqa: E731
    if op == "linear_scan":
        B, D = 2, 2048
        timed = {"a": ((u_(B, T, D) * 0.1 + 0.9).to(dtype), 1), "b": (r(B, T, D).to(dtype), 1)}
        shared = {}

        def call(x, pg):
            h, fin = sk.linear_scan(x["a"], x["b"], output_final_state=True, process_group=pg)
            return h, [fin]
    elif op == "selective_scan_fn":
        B, D, N = 1, 2048, 16
        timed = {"u": (r(B, D, T).to(dtype), 2), "delta": ((u_(B, D, T) * 0.1).to(dtype), 2),
                 "B": (r(B, N, T).to(dtype), 2), "C": (r(B, N, T).to(dtype), 2),
                 "z": (r(B, D, T).to(dtype), 2)}
        shared = {"A": -u_(D, N) - 0.5, "D": r(D), "bias": r(D) * 0.1}

        def call(x, pg):
            out, last = sk.selective_scan_fn(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"],
                                             x["z"], x["bias"], True, True, process_group=pg)
            return out, [last]
    else:
        B, H, K = 1, 16, 128
        timed = {n: (r(B, T, H, K).to(dtype), 1) for n in ("q", "k", "v")}
        shared = {}
        if op == "chunk_simple_gla":
            timed["g"] = (-u_(B, T, H) * 0.1, 1)
        if op == "chunk_gla":
            timed["g"] = (torch.nn.functional.logsigmoid(r(B, T, H, K) + 4), 1)

        def call(x, pg):
            if op == "chunk_simple_gla":
                o, s = sk.chunk_simple_gla(x["q"], x["k"], x["v"], x["g"], output_final_state=True,
                                           process_group=pg)
            elif op == "chunk_gla":
                o, s = sk.chunk_gla(x["q"], x["k"], x["v"], x["g"], output_final_state=True,
                                    process_group=pg)
            else:
                o, s = sk.chunk_linear_attn(x["q"], x["k"], x["v"], output_final_state=True,
                                            normalize=False, process_group=pg)
            return o, [s]
    timed = {k: (t.requires_grad_(), d) for k, (t, d) in timed.items()}
    shared = {k: t.requires_grad_() for k, t in shared.items()}
    out_dim = 2 if op == "selective_scan_fn" else 1
    return timed, shared, call, out_dim


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def self_check(op, rank, world, pg, dev):
    """float32, uneven split: every rank's outputs, finals and input gradients against the
    single-GPU call on the whole sequence. Returns the worst relative error."""
    import torch.distributed as dist
    T = 96 * world + 5
    sizes = [96 + (7 if r == 0 else -2 if r == world - 1 else 0) for r in range(world)]
    sizes[-1] += T - sum(sizes)
    st = sum(sizes[:rank])
    gen = torch.Generator(device=dev).manual_seed(1)
    timed, shared, call, od = make(op, T, dev, torch.float32, gen)
    out, fins = call({**{k: t for k, (t, _) in timed.items()}, **shared}, None)
    g_out = torch.randn(out.shape, generator=gen, device=dev)
    g_fin = [torch.randn(f.shape, generator=gen, device=dev) for f in fins]
    torch.autograd.backward([out] + fins, [g_out] + g_fin)
    loc = {k: t.detach().narrow(d, st, sizes[rank]).clone().requires_grad_()
           for k, (t, d) in timed.items()}
    loc_sh = {k: t.detach().clone().requires_grad_() for k, t in shared.items()}
    o, f = call({**loc, **loc_sh}, pg)
    torch.autograd.backward([o] + f, [g_out.narrow(od, st, sizes[rank])] + [g / world for g in g_fin])
    errs = [rel(o, out.narrow(od, st, sizes[rank]))] + [rel(a, b) for a, b in zip(f, fins)]
    errs += [rel(loc[k].grad, t.grad.narrow(d, st, sizes[rank])) for k, (t, d) in timed.items()]
    for k, t in loc_sh.items():
        g = t.grad.clone()
        dist.all_reduce(g, group=pg)
        errs.append(rel(g, shared[k].grad))
    worst = torch.tensor(max(errs), device=dev)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=pg)
    return worst.item()


def time_step(op, T_local, pg, dev, iters):
    import torch.distributed as dist
    gen = torch.Generator(device=dev).manual_seed(2 + dist.get_rank())
    timed, shared, call, _ = make(op, T_local, dev, torch.bfloat16, gen)
    x = {**{k: t for k, (t, _) in timed.items()}, **shared}
    o, f = call(x, pg)
    grads = [torch.randn_like(o)] + [torch.randn_like(t) for t in f]
    fwd_ms, step_ms = [], []
    for i in range(iters + 3):
        for t in x.values():
            t.grad = None
        dist.barrier(group=pg)
        e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        e0.record()
        o, f = call(x, pg)
        e1.record()
        torch.autograd.backward([o] + f, grads)
        e2.record()
        torch.cuda.synchronize()
        if i >= 3:
            fwd_ms.append(e0.elapsed_time(e1))
            step_ms.append(e0.elapsed_time(e2))
    med = torch.tensor([sorted(fwd_ms)[len(fwd_ms) // 2], sorted(step_ms)[len(step_ms) // 2]],
                       device=dev)
    dist.all_reduce(med, op=dist.ReduceOp.MAX, group=pg)
    return med.tolist()


def worker(args):
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local)
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", device_id=dev)
    pg = dist.group.WORLD
    rank, world = dist.get_rank(), dist.get_world_size()
    div = 8 if args.quick else 1
    rows = []
    for op in args.ops:
        t0 = time.time()
        try:
            err = self_check(op, rank, world, pg, dev)
        except Exception as e:
            err = float("nan")
            if rank == 0:
                print(f"self-check {op} world {world} failed: {type(e).__name__}: {e}", flush=True)
        strong, weak = (n // div for n in LENGTHS[op])
        for regime, T_local in (("strong", strong // world), ("weak", weak)):
            try:
                fwd, step = time_step(op, T_local, pg, dev, args.iters)
            except Exception as e:
                fwd = step = float("nan")
                if rank == 0:
                    print(f"{op} {regime} world {world} failed: {type(e).__name__}: {e}", flush=True)
            rows.append(dict(op=op, regime=regime, world=world, T_local=T_local,
                             T_global=T_local * world, fwd_ms=fwd, step_ms=step,
                             check_rel_err=err, device=torch.cuda.get_device_name(dev)))
        if rank == 0:
            print(f"[world {world}] {op}: {time.time() - t0:.1f} s, self-check rel err {err:.2e}",
                  flush=True)
    if rank == 0:
        with open(args.rows, "a") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
    dist.destroy_process_group()


def launcher(args):
    n_gpu = torch.cuda.device_count()
    worlds = [w for w in (1, 2, 4, 8) if w <= n_gpu]
    if not worlds:
        sys.exit("cp_scaling: no CUDA device")
    rows_path = args.rows or os.path.join(tempfile.mkdtemp(), "rows.jsonl")
    for w in worlds:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={w}", os.path.abspath(__file__), "--worker", "--rows", rows_path,
               "--ops", ",".join(args.ops), "--iters", str(args.iters)] + (["--quick"] if args.quick else [])
        print(" ".join(cmd), flush=True)
        r = subprocess.run(cmd, env=dict(os.environ), timeout=args.timeout)
        if r.returncode:
            print(f"world {w}: exit status {r.returncode}", flush=True)
    rows = [json.loads(line) for line in open(rows_path)] if os.path.exists(rows_path) else []
    base = {(r["op"], r["regime"]): r["step_ms"] for r in rows if r["world"] == 1}
    for r in rows:
        b = base.get((r["op"], r["regime"]))
        t = r["step_ms"]
        if b is None or not t == t:
            r["efficiency"] = float("nan")
        else:
            r["efficiency"] = b / (r["world"] * t) if r["regime"] == "strong" else b / t
        r["Mtok_per_s"] = r["T_global"] / (t * 1e3) if t == t else float("nan")
    out = os.environ.get("OUT")
    if out and rows:
        with open(os.path.join(out, "cp_scaling.csv"), "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    print(f"\n{'op':18} {'regime':6} {'GPUs':>4} {'T/GPU':>7} {'T total':>8} {'fwd ms':>8} "
          f"{'step ms':>8} {'Mtok/s':>7} {'eff':>5} {'check':>8}")
    for r in sorted(rows, key=lambda r: (OPS.index(r["op"]), r["regime"], r["world"])):
        print(f"{r['op']:18} {r['regime']:6} {r['world']:>4} {r['T_local']:>7} {r['T_global']:>8} "
              f"{r['fwd_ms']:8.2f} {r['step_ms']:8.2f} {r['Mtok_per_s']:7.2f} {r['efficiency']:5.2f} "
              f"{r['check_rel_err']:8.1e}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help="run inside torchrun")
    p.add_argument("--rows", default=None, help="JSON-lines file the workers append to")
    p.add_argument("--ops", default=",".join(OPS), type=lambda s: [o for o in s.split(",") if o])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="lengths / 8")
    p.add_argument("--timeout", type=int, default=900, help="seconds per group size")
    args = p.parse_args()
    bad = [o for o in args.ops if o not in OPS]
    if bad:
        p.error(f"unknown ops {bad}; choose from {OPS}")
    if args.worker:
        if args.rows is None:
            args.rows = os.path.join(os.environ.get("OUT", "."), "cp_scaling_rows.jsonl")
        worker(args)
    else:
        launcher(args)


if __name__ == "__main__":
    main()
