"""Decode step (selective_state_update) on the GPU, in CUDA-graph replay (what serving runs), side
by side with mamba-ssm's Triton kernel; tile variants of ours. Run: python bench/gpu_decode.py
(mamba-ssm's source on PYTHONPATH for the peer)."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ssm_kernels as sk  # noqa: E402
from ssm_kernels.benchmarks.harness import capture  # noqa: E402
from ssm_kernels.benchmarks.peers import mamba_ssm_module  # noqa: E402
from ssm_kernels.selective_scan import triton as K  # noqa: E402


def replay_us(fn, calls=20):
    g = capture(fn, calls)
    from triton.testing import do_bench
    return do_bench(g.replay, warmup=25, rep=200, return_mode="median") * 1e3 / calls


def inputs(kind, batch):
    bf16, dev = torch.bfloat16, "cuda"
    if kind == "mamba1":
        D, N = 4096, 16
        st = torch.randn(batch, D, N, device=dev)
        x, dt, z = (torch.randn(batch, D, device=dev, dtype=bf16) for _ in range(3))
        A = -torch.rand(D, N, device=dev)
        B, C = (torch.randn(batch, N, device=dev, dtype=bf16) for _ in range(2))
        Dp, bias = torch.randn(D, device=dev), torch.randn(D, device=dev)
        return st, (x, dt, A, B, C, Dp, z, bias, True), st.numel() * 4 * 2
    H, P, N, G = 64, 64, 128, 1
    st = torch.randn(batch, H, P, N, device=dev, dtype=bf16)
    x, z = (torch.randn(batch, H, P, device=dev, dtype=bf16) for _ in range(2))
    dt = torch.randn(batch, H, device=dev, dtype=bf16)[:, :, None].expand(batch, H, P)
    A = (-torch.rand(H, device=dev))[:, None, None].expand(H, P, N)
    B, C = (torch.randn(batch, G, N, device=dev, dtype=bf16) for _ in range(2))
    Dp = torch.randn(H, device=dev)[:, None].expand(H, P)
    bias = torch.randn(H, device=dev)[:, None].expand(H, P)
    return st, (x, dt, A, B, C, Dp, z, bias, True), st.numel() * 2 * 2


def main():
    peer = mamba_ssm_module("ops.triton.selective_state_update")
    rows = []
    orig = K.decode_tile
    for kind, batch in (("mamba1", 64), ("mamba1", 256), ("mamba2", 256)):
        st, args, nbytes = inputs(kind, batch)
        ref_state = st.clone()
        out = sk.selective_state_update(ref_state, *args)
        if peer is not None:
            st2 = st.clone()
            out2 = peer.selective_state_update(st2, *args)
            err = (out.float() - out2.float()).norm() / out2.float().norm()
            print(f"{kind} B={batch}: rel diff vs mamba-ssm out {err:.2e}", flush=True)
            t_peer = replay_us(lambda: peer.selective_state_update(st2, *args))
        else:
            t_peer = float("nan")
        for elems in (1024, 2048, 4096, 8192):
            for warps in (4, 8):
                K.decode_tile = lambda P, bn, e=elems, w=warps: (min(max(e // bn, 1), 1 << (P - 1).bit_length()), w)
                t = replay_us(lambda: sk.selective_state_update(st, *args))
                rows.append((kind, batch, f"{elems} elems {warps} warps", t, t_peer, nbytes))
        K.decode_tile = orig
        t = replay_us(lambda: sk.selective_state_update(st, *args))
        rows.append((kind, batch, "default", t, t_peer, nbytes))
    print(f"\n{'shape':<16} {'ours':<22} {'us':>8} {'mamba us':>9} {'speed-up':>9} {'GB/s':>7}")
    for kind, batch, name, t, tp, nb in rows:
        print(f"{kind} B={batch:<7} {name:<22} {t:8.2f} {tp:9.2f} {tp / t:8.2f}x {nb / t / 1e3:7.0f}")


if __name__ == "__main__":
    main()
