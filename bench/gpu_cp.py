"""Overhead of context parallelism on one GPU (issue 14): every CP op through a single-process NCCL
group (FileStore; no torchrun) against the plain call, at a real size, bf16, forward and
forward+backward.

    python bench/gpu_cp.py            # OUT=/some/dir also writes gpu_cp.csv there; ~2-3 minutes
    python bench/gpu_cp.py --smoke    # CPU, gloo, tiny sizes, reference backend: checks the script
    python bench/gpu_cp.py --overhead # plain vs group of one vs first rank only, no float64
                                      # references, no later rank (~1-2 minutes with compiles)
    python bench/gpu_cp.py --overhead --ops linear_attn,ssd   # only ops whose name contains one
    python bench/gpu_cp.py --overhead --ops delta             # the two chunked delta rules

Per op and mode (times: triton.testing.do_bench, median; host: CPU time per call, GPU not awaited):
  plain      the op without process_group (final state on)
  group1     process_group of size 1: the shortcut (the gather is the identity), exactly the plain
             call plus a few Python lines; bitwise plain (checked)
  rank0      the first rank of a real group (a group of one with core._FORCE_EXCHANGE): the plain
             call + one all_gather each way of O(batch x state), no decay product, no second
             pass; its outputs, final states and gradients must be bitwise those of plain
  later      the same group playing a later rank (ssm_kernels.distributed.core._SIMULATE_LATER:
             its preceding ranks ended in a random nonzero state h_prev): states-only summary from
             zero + exchange + one output pass from h_prev; backward: states-only adjoint (or a
             second backward where the op has none) + exchange + one backward. Its outputs must be
             bitwise those of the plain call from initial_state=h_prev.
  xchg us    the forward exchange alone at this op's state shapes (pack + all_gather + combine),
             GPU time (do_bench) and host time
  err        relative error ||x - ref|| / ||ref|| against the float64 reference (backend
             "reference", batch row 0, the same inputs upcast): out, final state and (fwd+bwd) the
             largest over the time-indexed inputs' gradients; for plain (from zero) and later (from
             h_prev, against the reference from h_prev)
The table is printed last.
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
OVERHEAD = "--overhead" in sys.argv
OPS = sys.argv[sys.argv.index("--ops") + 1].split(",") if "--ops" in sys.argv else None
DEV = "cpu" if SMOKE else "cuda"
DT = torch.float32 if SMOKE else torch.bfloat16
BK = "reference" if SMOKE else None
T0 = time.time()


def n(x):
    """A real size, or a tiny one for --smoke."""
    return max(x // 256, 3) if SMOKE else x


def sync():
    if not SMOKE:
        torch.cuda.synchronize()


def bench(fn, warmup, rep):
    if not SMOKE:
        from triton.testing import do_bench
        return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    fn()
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def host_us(fn, calls=20, repeats=3):
    """CPU time per call with the GPU not awaited (the launch queue absorbs 20 calls)."""
    best = float("inf")
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls)
    sync()
    return best * 1e6


class Case:
    """timed: name -> tensor with batch first (its time-indexed inputs); shared: name -> tensor
    (weights); state: the state's shape; call(x, h0, pg, backend) -> (out, final)."""

    def __init__(self, name, shape, timed, shared, state, call, matrix=False):
        self.name, self.shape, self.timed, self.shared = name, shape, timed, shared
        self.state, self.call = state, call
        self.matrix = matrix   # the decay is a [K, K] transition (the delta rule)


def cases():
    def rnd(*s, dtype=DT):
        return torch.randn(*s, device=DEV, dtype=dtype)

    B, T, D = 8, n(4096), n(2048)
    yield Case("linear_scan", f"B={B} T={T} D={D}",
               {"a": torch.rand(B, T, D, device=DEV).mul(0.1).add(0.9).to(DT), "b": rnd(B, T, D)},
               {}, (B, D),
               lambda x, h0, pg, bk: sk.linear_scan(x["a"], x["b"], h0, output_final_state=True,
                                                    backend=bk, process_group=pg))

    Bs, Ds, L, N = 4, n(2048), n(2048), 16
    yield Case("selective_scan_fn", f"B={Bs} D={Ds} L={L} N={N} +D,z,bias,softplus",
               {"u": rnd(Bs, Ds, L), "delta": (torch.rand(Bs, Ds, L, device=DEV) * 0.1).to(DT),
                "B": rnd(Bs, N, L), "C": rnd(Bs, N, L), "z": rnd(Bs, Ds, L)},
               {"A": -torch.rand(Ds, N, device=DEV) - 0.5, "D": torch.randn(Ds, device=DEV),
                "bias": torch.randn(Ds, device=DEV) * 0.1}, (Bs, Ds, N),
               lambda x, h0, pg, bk: sk.selective_scan_fn(
                   x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["bias"], True,
                   True, initial_state=h0, backend=bk, process_group=pg))

    Bl, Tl, H, K = 4, n(4096), 16, n(128)
    qkv = lambda: {c: rnd(Bl, Tl, H, K) for c in "qkv"}  # noqa: E731
    st = (Bl, H, K, K)
    yield Case("chunk_linear_attn", f"B={Bl} T={Tl} H={H} K=V={K}", qkv(), {}, st,
               lambda x, h0, pg, bk: sk.chunk_linear_attn(
                   x["q"], x["k"], x["v"], initial_state=h0, output_final_state=True,
                   normalize=False, backend=bk, process_group=pg))
    yield Case("chunk_linear_attn normalize", f"B={Bl} T={Tl} H={H} K=V={K}",
               {"q": rnd(Bl, Tl, H, K).abs(), "k": (torch.rand(Bl, Tl, H, K, device=DEV) + 0.1).to(DT),
                "v": rnd(Bl, Tl, H, K)}, {}, [st, (Bl, 1, H, K)],   # states (S, z)
               lambda x, h0, pg, bk: _la_norm(sk.chunk_linear_attn(
                   x["q"], x["k"], x["v"], initial_state=h0, output_final_state=True,
                   normalize=True, backend=bk, process_group=pg)))
    yield Case("chunk_simple_gla", f"B={Bl} T={Tl} H={H} K=V={K}",
               {**qkv(), "g": -torch.rand(Bl, Tl, H, device=DEV) * 0.1}, {}, st,
               lambda x, h0, pg, bk: sk.chunk_simple_gla(
                   x["q"], x["k"], x["v"], x["g"], initial_state=h0, output_final_state=True,
                   backend=bk, process_group=pg))
    yield Case("chunk_gla", f"B={Bl} T={Tl} H={H} K=V={K}",
               {**qkv(), "g": torch.nn.functional.logsigmoid(
                   torch.randn(Bl, Tl, H, K, device=DEV) + 4)}, {}, st,
               lambda x, h0, pg, bk: sk.chunk_gla(
                   x["q"], x["k"], x["v"], x["g"], initial_state=h0, output_final_state=True,
                   backend=bk, process_group=pg))

    b2, l2, h2, p2, g2, n2 = 2, n(4096), 32, 64, 1, n(128)
    yield Case("mamba_chunk_scan_combined", f"b={b2} l={l2} h={h2} p={p2} g={g2} n={n2} +D,z,bias",
               {"x": rnd(b2, l2, h2, p2), "dt": (torch.rand(b2, l2, h2, device=DEV) * 0.1).to(DT),
                "B": rnd(b2, l2, g2, n2), "C": rnd(b2, l2, g2, n2), "z": rnd(b2, l2, h2, p2)},
               {"A": -torch.rand(h2, device=DEV) - 0.5, "D": torch.randn(h2, device=DEV),
                "dt_bias": torch.randn(h2, device=DEV) * 0.1}, (b2, h2, p2, n2),
               lambda x, h0, pg, bk: sk.mamba_chunk_scan_combined(
                   x["x"], x["dt"], x["A"], x["B"], x["C"], 64, D=x["D"], z=x["z"],
                   dt_bias=x["dt_bias"], initial_states=h0, dt_softplus=True,
                   return_final_states=True, backend=bk, process_group=pg))

    # the delta rule: summary = one op call at width V + K; exchange [K, K] + [K, V] per head
    Bd, Td, Hd, HVd, Kd = 4, n(4096), 8, 16, n(128)
    yield Case("chunk_gated_delta_rule", f"B={Bd} T={Td} H={Hd} HV={HVd} K=V={Kd} l2norm",
               {"q": rnd(Bd, Td, Hd, Kd), "k": rnd(Bd, Td, Hd, Kd), "v": rnd(Bd, Td, HVd, Kd),
                "g": torch.nn.functional.logsigmoid(torch.randn(Bd, Td, HVd, device=DEV) + 4),
                "beta": torch.rand(Bd, Td, HVd, device=DEV).to(DT)}, {}, (Bd, HVd, Kd, Kd),
               lambda x, h0, pg, bk: sk.chunk_gated_delta_rule(
                   x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=h0,
                   output_final_state=True, use_qk_l2norm_in_kernel=True, backend=bk,
                   process_group=pg), matrix=True)
    yield Case("chunk_delta_rule", f"B={Bd} T={Td} H=HV={HVd} K=V={Kd} l2norm",
               {"q": rnd(Bd, Td, HVd, Kd), "k": rnd(Bd, Td, HVd, Kd), "v": rnd(Bd, Td, HVd, Kd),
                "beta": torch.rand(Bd, Td, HVd, device=DEV).to(DT)}, {}, (Bd, HVd, Kd, Kd),
               lambda x, h0, pg, bk: sk.chunk_delta_rule(
                   x["q"], x["k"], x["v"], x["beta"], initial_state=h0, output_final_state=True,
                   use_qk_l2norm_in_kernel=True, backend=bk, process_group=pg), matrix=True)


def _la_norm(res):
    """normalize=True returns (o, (S, z)): the bench times both and checks S (z is a key sum)."""
    o, (S, z) = res
    return o, S + 0 * z.sum()


def rel(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def errors(case, got_out, got_fin, got_grads, h0, w_out, w_fin):
    """Errors of batch row 0 against the float64 reference from h0 (None: zeros)."""
    x64 = {k: t[:1].detach().double().requires_grad_() for k, t in case.timed.items()}
    x64.update({k: t.detach().double() for k, t in case.shared.items()})
    h64 = None if h0 is None else tuple(t[:1].double() for t in h0) if isinstance(h0, tuple) \
        else h0[:1].double()
    out, fin = case.call(x64, h64, None, "reference")
    e = {"out": rel(got_out[:1], out), "fin": rel(got_fin[:1], fin)}
    if got_grads is not None:
        torch.autograd.backward([out, fin], [w_out[:1].double(), w_fin[:1].double()])
        e["grad"] = max(rel(got_grads[k][:1], x64[k].grad) for k in case.timed)
    return e


def main():
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
    if SMOKE:
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    else:
        dist.init_process_group("nccl", store=store, rank=0, world_size=1,
                                device_id=torch.device(DEV, 0))
    device = "cpu (smoke)" if SMOKE else torch.cuda.get_device_name()
    pg = dist.group.WORLD
    rows, fails = [], []
    for case in cases():
        if OPS and not any(o in case.name or (o == "ssd" and "mamba" in case.name) for o in OPS):
            continue
        torch.manual_seed(0)
        leaves = {k: t.requires_grad_() for k, t in {**case.timed, **case.shared}.items()}
        if isinstance(case.state, list):   # several states: (S, z) of normalized attention
            h_prev = (torch.randn(case.state[0], device=DEV) * 0.5,
                      torch.rand(case.state[1], device=DEV) + 1)   # a positive key sum
        else:
            h_prev = torch.randn(case.state, device=DEV) * 0.5
        # variant -> (group, initial state for the op, simulated incoming state, reference h0)
        variants = {"plain": (None, None, None, False), "group1": (pg, None, None, False),
                    "rank0": (pg, None, None, True)}
        if not OVERHEAD:
            variants["later"] = (pg, None, h_prev, False)
        res = {}
        try:
            o_ref, f_ref = case.call(leaves, None, None, BK)          # plain, from zero
            o_prev, f_prev = (None, None) if "later" not in variants else \
                case.call(leaves, h_prev, None, BK)                   # plain, from h_prev
            w_out, w_fin = torch.randn_like(o_ref), torch.randn_like(f_ref)
        except Exception as e:
            fails.append(f"{case.name} plain: {type(e).__name__}: {e}")
            continue
        for label, (group, h0, sim, force) in variants.items():
            def run(grad=True):
                skd._SIMULATE_LATER = None if sim is None else \
                    list(sim) if isinstance(sim, tuple) else [sim]
                skd._FORCE_EXCHANGE = force
                try:
                    return case.call(leaves, h0, group, BK)
                finally:
                    skd._SIMULATE_LATER = None
                    skd._FORCE_EXCHANGE = False

            def fwd():
                with torch.no_grad():
                    run()

            def fwd_bwd():
                out, fin = run()
                torch.autograd.backward([out, fin], [w_out, w_fin])

            try:
                for t in leaves.values():
                    t.grad = None
                out, fin = run()
                torch.autograd.backward([out, fin], [w_out, w_fin])
                grads = {k: t.grad.clone() for k, t in leaves.items()}
                if label != "plain":
                    # the same op call as plain (from zero / from h_prev): bitwise
                    want = o_prev if label == "later" else o_ref
                    if not torch.equal(out, want):
                        fails.append(f"{case.name} {label}: output not bitwise the plain call's "
                                     f"(max diff {(out.float() - want.float()).abs().max():.3g})")
                if label in ("rank0", "group1"):
                    if not torch.equal(fin, f_ref):
                        fails.append(f"{case.name} {label}: final state not bitwise the plain "
                                     f"call's")
                    for k, g in grads.items():
                        if not torch.equal(g, res["plain grads"][k]):
                            fails.append(f"{case.name} {label}: grad {k} not bitwise the plain "
                                         f"call's")
                if label == "plain":
                    res["plain grads"] = grads
                # group1 / rank0 are bitwise plain (checked above): their errors are plain's
                res[label, "err"] = {} if OVERHEAD else res["plain", "err"] \
                    if label in ("rank0", "group1") else \
                    errors(case, out, fin, grads, sim, w_out, w_fin)
                res[label, "fwd"] = bench(fwd, 10, 100)
                res[label, "fwd+bwd"] = bench(fwd_bwd, 5, 100)
                res[label, "host fwd"] = host_us(fwd)
                res[label, "host fwd+bwd"] = host_us(fwd_bwd)
                for t in leaves.values():
                    t.grad = None
            except Exception as ex:  # report and go on
                import traceback
                fails.append(f"{case.name} {label}: {type(ex).__name__}: {ex}\n"
                             f"{traceback.format_exc(limit=-3)}")
            finally:
                skd._SIMULATE_LATER = None
        # the forward exchange alone at this op's state shapes (as the later rank sends it)
        try:
            xs = exchange_times(pg, f_ref, case)
        except Exception as ex:
            fails.append(f"{case.name} exchange: {type(ex).__name__}: {ex}")
            xs = (None, None)
        for mode in ("fwd", "fwd+bwd"):
            row = dict(op=case.name, shape=case.shape, mode=mode, device=device,
                       xchg_us=xs[0], xchg_host_us=xs[1])
            for label in ("plain", "group1", "rank0", "later"):
                row[f"{label}_ms"] = res.get((label, mode))
                row[f"{label}_host_us"] = res.get((label, f"host {mode}"))
                e = res.get((label, "err"), {})
                row[f"{label}_err_out"] = e.get("out")
                row[f"{label}_err_fin"] = e.get("fin")
                row[f"{label}_err_grad"] = e.get("grad") if mode == "fwd+bwd" else None
            rows.append(row)
        print(f"[{time.time() - T0:5.1f}s] {case.name} done", flush=True)
        del leaves, o_ref, f_ref, o_prev, f_prev
    dist.destroy_process_group()

    out = os.environ.get("OUT")
    if out and rows:
        with open(os.path.join(out, "gpu_cp.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    table(rows, device, fails)
    sys.exit(1 if fails else 0)


def exchange_times(pg, fin, case):
    """(GPU us, host us) of one forward exchange of this op's state (and its decay, as a state-
    sized tensor: the largest an elementwise decay product gets; the delta rule's [K, K]
    transition, composed by a matmul), as a later rank runs it."""
    A_shape = fin.shape[:-1] + fin.shape[-2:-1] if case.matrix else fin.shape
    spec = skd._Spec(group=pg, pos=0, world=1, reverse=False, n=1, A_shapes=[A_shape],
                     sim=[torch.zeros_like(fin)], matrix=case.matrix)
    A, b = torch.rand(A_shape, device=fin.device), fin.detach()
    fn = lambda: skd._exchange_forward(spec, [A], [b])  # noqa: E731
    return bench(fn, 5, 50) * 1e3, host_us(fn)


def table(rows, device, fails):
    def f(x, w=7, p=3):
        return f"{'n/a':>{w}}" if x is None else f"{x:{w}.{p}f}"

    def r(a, b):
        return "  n/a" if a is None or b is None else f"{b / a:4.2f}x"

    def e(x):
        return f"{'n/a':>7}" if x is None else f"{x:7.1e}"

    def h(row, v):
        x = row.get(f"{v}_host_us")
        return "n/a" if x is None else f"{x:.0f}"

    print(f"\ndevice {device}, {DT}; group of 1 over {'gloo' if SMOKE else 'NCCL'}; "
          f"total {time.time() - T0:.0f} s")
    for msg in fails:
        print("FAIL", msg)
    print(f"{'op':27} {'mode':7} {'plain ms':>8} {'group1':>7} {'':>5} {'rank0':>7} {'':>5} "
          f"{'later':>7} {'':>5} {'xchg us':>7} {'host us plain/g1/r0/later':>25}"
          + ("" if OVERHEAD else f"  {'err plain out/fin/grad':>23}  {'err later out/fin/grad':>23}"))
    for row in rows:
        p, g1, r0, lt = (row.get(f"{v}_ms") for v in ("plain", "group1", "rank0", "later"))
        hosts = "/".join(h(row, v) for v in ("plain", "group1", "rank0", "later"))
        errs = lambda v: " ".join(e(row.get(f"{v}_err_{k}")) for k in ("out", "fin", "grad"))  # noqa
        print(f"{row['op']:27} {row['mode']:7} {f(p, 8)} {f(g1)} {r(p, g1):>5} {f(r0)} "
              f"{r(p, r0):>5} {f(lt)} {r(p, lt):>5} {f(row['xchg_us'], 7, 1)} {hosts:>25}"
              + ("" if OVERHEAD else f"  {errs('plain')}  {errs('later')}"))
    print("shapes: " + "; ".join(sorted({f"{x['op']} {x['shape']}" for x in rows})))


if __name__ == "__main__":
    main()
