"""Host overhead: time per call at tiny shapes, eager and in CUDA-graph replay, peers side by side.

At these shapes a kernel runs for a few microseconds, so the eager time per call is mostly Python,
dispatch and launch cost, and the graph replay time is what the kernels themselves cost. Run with
`python -m ssm_kernels bench --overhead` (or `python -m ssm_kernels.benchmarks.overhead`) on a GPU.

eager: `calls` back-to-back calls timed by the host clock between two synchronisations, per call.
graph: `calls` calls captured in one CUDA graph, the replay timed the same way, per call.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

import torch

from .harness import git_sha, versions, write_csv
from .peers import accelerated_scan, fla_function, mamba_ssm_module

COLUMNS = ["op", "impl", "mode", "shape", "eager_us", "graph_us", "eager_minus_graph_us", "note"]


@dataclass
class OverheadCase:
    op: str
    impl: str
    mode: str                    # "fwd" (no grad) or "fwd+bwd"
    shape: str
    fn: Callable[[], object]     # one call of the op (fwd+bwd included for training modes)


def _per_call_us(run: Callable[[], None], calls: int, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):  # the best of a few timings: host jitter only ever adds time
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def measure(case: OverheadCase, calls: int = 50) -> dict:
    def loop():
        for _ in range(calls):
            case.fn()

    row = dict(op=case.op, impl=case.impl, mode=case.mode, shape=case.shape, note="")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation, autotuning, caches) off the capture stream
        for _ in range(3):
            case.fn()
    torch.cuda.current_stream().wait_stream(side)
    row["eager_us"] = round(_per_call_us(loop, calls), 2)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loop()
        graph.replay()
        row["graph_us"] = round(_per_call_us(graph.replay, calls), 2)
        row["eager_minus_graph_us"] = round(row["eager_us"] - row["graph_us"], 2)
    except Exception as e:  # reported, not hidden: capture failing is a finding
        row["graph_us"] = ""
        row["eager_minus_graph_us"] = ""
        row["note"] = f"capture fails: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        torch.cuda.synchronize()
    return row


def _training(fn: Callable[[], object], inputs: List[torch.Tensor]) -> Callable[[], None]:
    """fwd+bwd through autograd.grad (no .grad accumulation, so it captures and replays cleanly)."""
    def step():
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(out, inputs, torch.ones_like(out))
    return step


def cases(device: str = "cuda") -> Iterator[OverheadCase]:
    import ssm_kernels as sk
    f32, bf16 = torch.float32, torch.bfloat16

    def leaf(*shape, dtype=f32, fill=None):
        x = torch.randn(*shape, device=device, dtype=dtype) if fill is None else fill(shape)
        return x.requires_grad_()

    # linear_scan [B, D, T] = [1, 16, 64] (accelerated-scan's layout)
    a = torch.rand(1, 16, 64, device=device)
    b = torch.randn(1, 16, 64, device=device)
    shape = "[1,16,64] fp32"
    yield OverheadCase("linear_scan", "ssm_kernels", "fwd", shape,
                       lambda: sk.linear_scan(a, b, dim=-1))
    al, bl = a.clone().requires_grad_(), b.clone().requires_grad_()
    yield OverheadCase("linear_scan", "ssm_kernels", "fwd+bwd", shape,
                       _training(lambda: sk.linear_scan(al, bl, dim=-1), [al, bl]))
    scan = accelerated_scan()
    if scan is not None:
        yield OverheadCase("linear_scan", "accelerated_scan", "fwd", shape, lambda: scan(a, b))
        yield OverheadCase("linear_scan", "accelerated_scan", "fwd+bwd", shape,
                           _training(lambda: scan(al, bl), [al, bl]))

    # selective_scan_fn [B, D, L] = [1, 16, 64], N = 16, all features
    D_, L, N = 16, 64, 16
    u, dt, z = (torch.randn(1, D_, L, device=device, dtype=bf16) for _ in range(3))
    A = -torch.rand(D_, N, device=device)
    Bv, Cv = (torch.randn(1, 1, N, L, device=device, dtype=bf16) for _ in range(2))
    Dp, bias = torch.randn(D_, device=device), torch.randn(D_, device=device)
    shape = "[1,16,64] N=16 bf16"
    yield OverheadCase("selective_scan_fn", "ssm_kernels", "fwd", shape,
                       lambda: sk.selective_scan_fn(u, dt, A, Bv, Cv, Dp, z, bias, True))
    ul, dtl = u.clone().requires_grad_(), dt.clone().requires_grad_()
    yield OverheadCase("selective_scan_fn", "ssm_kernels", "fwd+bwd", shape, _training(
        lambda: sk.selective_scan_fn(ul, dtl, A, Bv, Cv, Dp, z, bias, True), [ul, dtl]))
    mamba = mamba_ssm_module("ops.selective_scan_interface")
    if mamba is not None and getattr(mamba, "selective_scan_cuda", None) is not None:
        yield OverheadCase("selective_scan_fn", "mamba_ssm", "fwd", shape,
                           lambda: mamba.selective_scan_fn(u, dt, A, Bv, Cv, Dp, z, bias, True))
        yield OverheadCase("selective_scan_fn", "mamba_ssm", "fwd+bwd", shape, _training(
            lambda: mamba.selective_scan_fn(ul, dtl, A, Bv, Cv, Dp, z, bias, True), [ul, dtl]))

    # selective_state_update (decode), batch 64, dim 4096, N 16
    st = torch.randn(64, 4096, 16, device=device, dtype=f32)
    x, dtd, zd = (torch.randn(64, 4096, device=device, dtype=bf16) for _ in range(3))
    Ad = -torch.rand(4096, 16, device=device)
    Bd, Cd = (torch.randn(64, 16, device=device, dtype=bf16) for _ in range(2))
    Dd, bd = torch.randn(4096, device=device), torch.randn(4096, device=device)
    shape = "B=64 D=4096 N=16 bf16"
    yield OverheadCase("selective_state_update", "ssm_kernels", "fwd", shape, lambda: sk.selective_state_update(
        st, x, dtd, Ad, Bd, Cd, Dd, zd, bd, True))
    ssu = mamba_ssm_module("ops.triton.selective_state_update")
    if ssu is not None:
        st2 = st.clone()
        yield OverheadCase("selective_state_update", "mamba_ssm", "fwd", shape, lambda: ssu.selective_state_update(
            st2, x, dtd, Ad, Bd, Cd, Dd, zd, bd, True))

    # chunked linear attention [B, T, H, K] = [1, 64, 2, 64]
    q, k, v = (torch.randn(1, 64, 2, 64, device=device, dtype=bf16) for _ in range(3))
    gh = torch.nn.functional.logsigmoid(torch.randn(1, 64, 2, device=device))
    gk = torch.nn.functional.logsigmoid(torch.randn(1, 64, 2, 64, device=device))
    shape = "[1,64,2,64] bf16"
    ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
    for name, gate, args in (("chunk_linear_attn", None, ()), ("chunk_simple_gla", gh, (gh,)),
                             ("chunk_gla", gk, (gk,))):
        ours = getattr(sk, name)
        yield OverheadCase(name, "ssm_kernels", "fwd", shape, lambda ours=ours, args=args: ours(q, k, v, *args))
        yield OverheadCase(name, "ssm_kernels", "fwd+bwd", shape, _training(
            lambda ours=ours, args=args: ours(ql, kl, vl, *args), [ql, kl, vl]))
        peer = fla_function(name)
        if peer is not None:
            yield OverheadCase(name, "fla", "fwd", shape, lambda peer=peer, args=args: peer(q, k, v, *args))
            yield OverheadCase(name, "fla", "fwd+bwd", shape, _training(
                lambda peer=peer, args=args: peer(ql, kl, vl, *args), [ql, kl, vl]))

    # decode: one token, B=64 H=16 K=V=128, state in place of the cache
    qd, kd, vd = (torch.randn(64, 1, 16, 128, device=device, dtype=bf16) for _ in range(3))
    gd = torch.nn.functional.logsigmoid(torch.randn(64, 1, 16, device=device))
    h0 = torch.randn(64, 16, 128, 128, device=device)
    shape = "B=64 H=16 K=V=128 bf16"
    yield OverheadCase("fused_recurrent_simple_gla", "ssm_kernels", "fwd", shape, lambda: sk.fused_recurrent_simple_gla(
        qd, kd, vd, gd, initial_state=h0, output_final_state=True))
    peer = fla_function("fused_recurrent_simple_gla")
    if peer is not None:
        yield OverheadCase("fused_recurrent_simple_gla", "fla", "fwd", shape, lambda: peer(
            qd, kd, vd, gd, initial_state=h0, output_final_state=True))

    gkd = torch.nn.functional.logsigmoid(torch.randn(64, 1, 16, 128, device=device))
    yield OverheadCase("fused_recurrent_gla", "ssm_kernels", "fwd", shape, lambda: sk.fused_recurrent_gla(
        qd, kd, vd, gkd, initial_state=h0, output_final_state=True))
    peer = fla_function("fused_recurrent_gla")
    if peer is not None:
        yield OverheadCase("fused_recurrent_gla", "fla", "fwd", shape, lambda: peer(
            qd, kd, vd, gkd, initial_state=h0, output_final_state=True))

    # Based [1, 64, 2, K=16, V=64]
    qb, kb = (torch.randn(1, 64, 2, 16, device=device, dtype=bf16) for _ in range(2))
    vb = torch.randn(1, 64, 2, 64, device=device, dtype=bf16)
    shape = "[1,64,2,16/64] bf16"
    yield OverheadCase("chunk_based", "ssm_kernels", "fwd", shape, lambda: sk.chunk_based(qb, kb, vb))
    qbl, kbl, vbl = (t.clone().requires_grad_() for t in (qb, kb, vb))
    yield OverheadCase("chunk_based", "ssm_kernels", "fwd+bwd", shape,
                       _training(lambda: sk.chunk_based(qbl, kbl, vbl), [qbl, kbl, vbl]))
    yield OverheadCase("fused_recurrent_based", "ssm_kernels", "fwd", "[4,1,2,16/64] bf16 decode",
                       lambda: sk.fused_recurrent_based(qb[:, :1].expand(4, 1, 2, 16).contiguous(),
                                                        kb[:, :1].expand(4, 1, 2, 16).contiguous(),
                                                        vb[:, :1].expand(4, 1, 2, 64).contiguous()))

    # fft_conv (B, H, L) = (1, 16, 256)
    uc = torch.randn(1, 16, 256, device=device)
    kc = torch.randn(16, 256, device=device)
    Dc = torch.randn(16, device=device)
    yield OverheadCase("fft_conv", "ssm_kernels", "fwd", "(1,16,256) fp32", lambda: sk.fft_conv(uc, kc, Dc))
    ucl, kcl = uc.clone().requires_grad_(), kc.clone().requires_grad_()
    yield OverheadCase("fft_conv", "ssm_kernels", "fwd+bwd", "(1,16,256) fp32",
                       _training(lambda: sk.fft_conv(ucl, kcl, Dc), [ucl, kcl]))

    def torch_fft_conv(u_, k_):
        n = 2 * u_.shape[-1]
        y = torch.fft.irfft(torch.fft.rfft(u_, n=n) * torch.fft.rfft(k_, n=n), n=n)[..., :u_.shape[-1]]
        return y + u_ * Dc[:, None]
    yield OverheadCase("fft_conv", "torch.fft", "fwd", "(1,16,256) fp32", lambda: torch_fft_conv(uc, kc))
    yield OverheadCase("fft_conv", "torch.fft", "fwd+bwd", "(1,16,256) fp32",
                       _training(lambda: torch_fft_conv(ucl, kcl), [ucl, kcl]))

    log_dt = torch.randn(16, device=device) * 0.1 - 3
    As4 = torch.complex(-torch.rand(16, 32, device=device), torch.randn(16, 32, device=device))
    C4 = torch.randn(16, 32, device=device, dtype=torch.complex64)
    yield OverheadCase("s4d_kernel", "ssm_kernels", "fwd", "H=16 N=32 L=256",
                       lambda: sk.s4d_kernel(log_dt, As4, C4, 256))
    yield from _later_families(device)


def _later_families(device):
    """Ops that arrived after the first version of this benchmark (present when merged)."""
    import ssm_kernels as sk
    bf16 = torch.bfloat16
    if hasattr(sk, "mamba_chunk_scan_combined"):  # SSD [B, L, H, P] = [1, 64, 2, 64], N = 64
        x = torch.randn(1, 64, 2, 64, device=device, dtype=bf16)
        dt = torch.rand(1, 64, 2, device=device)
        A = -torch.rand(2, device=device)
        B, C = (torch.randn(1, 64, 1, 64, device=device, dtype=bf16) for _ in range(2))
        shape = "[1,64,2,64] N=64 bf16"
        yield OverheadCase("mamba_chunk_scan_combined", "ssm_kernels", "fwd", shape,
                           lambda: sk.mamba_chunk_scan_combined(x, dt, A, B, C, 64))
        ssd = mamba_ssm_module("ops.triton.ssd_combined")
        if ssd is not None:
            yield OverheadCase("mamba_chunk_scan_combined", "mamba_ssm", "fwd", shape,
                               lambda: ssd.mamba_chunk_scan_combined(x, dt, A, B, C, 64))
    if hasattr(sk, "causal_conv1d_fn"):  # (B, D, L) = (1, 64, 64), width 4
        xc = torch.randn(1, 64, 64, device=device, dtype=bf16)
        w = torch.randn(64, 4, device=device, dtype=bf16)
        yield OverheadCase("causal_conv1d_fn", "ssm_kernels", "fwd", "(1,64,64) w=4 bf16",
                           lambda: sk.causal_conv1d_fn(xc, w, None, activation="silu"))
        xs = torch.randn(64, 1024, device=device, dtype=bf16)
        cs = torch.randn(64, 1024, 3, device=device, dtype=bf16)
        wd = torch.randn(1024, 4, device=device, dtype=bf16)
        yield OverheadCase("causal_conv1d_update", "ssm_kernels", "fwd", "B=64 D=1024 w=4 bf16",
                           lambda: sk.causal_conv1d_update(xs, cs, wd, None, "silu"))


def run(out: Optional[str] = None, calls: int = 50, ops: Optional[List[str]] = None) -> List[dict]:
    if not torch.cuda.is_available():
        print("bench --overhead needs a CUDA GPU (it times CUDA-graph replay); nothing to do here.")
        return []
    rows = []
    for case in cases("cuda"):
        if ops and case.op not in ops:
            continue
        try:
            row = measure(case, calls)
        except Exception as e:
            print(f"  {case.op} {case.impl} {case.mode}: failed: {type(e).__name__}: {str(e)[:200]}",
                  file=sys.stderr)
            continue
        row.update(versions=versions(), git_sha=git_sha())
        rows.append(row)
        print(f"  {row['op']:<27} {row['impl']:<17} {row['mode']:<8} {row['shape']:<24} "
              f"eager {row['eager_us']:>8} us  graph {row['graph_us'] or '-':>8} us  {row['note']}",
              flush=True)
    if out:
        write_csv(rows, out, columns=COLUMNS + ["versions", "git_sha"])
        print(f"wrote {out}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ssm_kernels.benchmarks.overhead")
    p.add_argument("--out", default="overhead.csv")
    p.add_argument("--calls", type=int, default=50, help="calls per timing (and per captured graph)")
    p.add_argument("--ops", default="", help="comma-separated op names (default: all)")
    args = p.parse_args(argv)
    run(args.out, args.calls, [o for o in args.ops.split(",") if o])
    return 0


if __name__ == "__main__":
    sys.exit(main())
