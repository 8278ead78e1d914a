"""Run one op once (after a warm-up) for `ncu`; e.g.
ncu --kernel-name regex:linear_scan --launch-skip 1 --launch-count 1 python bench/profile_one.py linear_scan cuda bfloat16
selective_scan [--bwd]: issue 9's first shape (B8 D1536 L2048 N16, every feature), --bwd adds the
backward (its kernel: --kernel-name regex:selective_scan_bwd)
"""
import sys

import torch

import ssm_kernels as sk

op, backend, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
if op == "linear_scan":
    a = (torch.rand(8, 4096, 1536, device="cuda") * 0.5 + 0.5).to(dtype)
    b = torch.randn(8, 4096, 1536, device="cuda").to(dtype)
    for _ in range(2):
        sk.linear_scan(a, b, backend=backend)
torch.cuda.synchronize()
if op == "selective_scan":  # issue 9's first shape, every feature on
    Bsz, D, L, N = 8, 1536, 2048, 16
    u, dt, z = (torch.randn(Bsz, D, L, device="cuda", dtype=dtype) for _ in range(3))
    A = -torch.rand(D, N, device="cuda")
    Bv, Cv = (torch.randn(Bsz, 1, N, L, device="cuda", dtype=dtype) for _ in range(2))
    Dp, bias = torch.randn(D, device="cuda"), torch.randn(D, device="cuda")
    grad = "--bwd" in sys.argv  # forward + backward: the backward kernel for ncu too
    if grad:
        u.requires_grad_()
    for _ in range(2):
        out = sk.selective_scan_fn(u, dt, A, Bv, Cv, Dp, z, bias, True, backend=backend)
        if grad:
            torch.autograd.grad(out, u, torch.ones_like(out))
torch.cuda.synchronize()
