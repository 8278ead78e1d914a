"""Where the eager host time goes on the GPU machine: the cost of the building blocks every call
needs (an allocation, one Triton launch, an autograd.Function, autograd.grad) next to a cProfile of
our tiny-shape calls. Run on the GPU: python bench/profile_host.py [--profile]."""
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


if __name__ == "__main__":
    main()
