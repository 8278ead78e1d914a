"""linear_scan in accelerated-scan's [B, D, T] layout: sweep the Triton tile shape (BLOCK_C channels
x BLOCK_T steps, warps) for the forward and the backward, check the best against the reference,
and time it side by side with accelerated-scan. Run: python bench/gpu_linear_scan.py"""
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ssm_kernels as sk  # noqa: E402
from ssm_kernels.benchmarks.peers import accelerated_scan  # noqa: E402
from ssm_kernels.linear_scan import triton as K  # noqa: E402

ORIG = K._config
VARIANTS = [(16, 128, 4), (8, 256, 4), (4, 512, 4), (4, 1024, 8), (2, 1024, 4), (2, 2048, 8),
            (1, 1024, 4), (1, 2048, 4), (1, 4096, 8)]


def use(cfg):
    K._plan.cache_clear()
    if cfg is None:
        K._config = ORIG
    else:
        bc, bt, w = cfg
        K._config = lambda T, C, time_inner, cplx, eb, bwd=False: (
            dict(BLOCK_T=bt, BLOCK_C=bc, num_warps=w) if time_inner else ORIG(T, C, time_inner, cplx, eb, bwd))


def ms(fn):
    return do_bench(fn, warmup=25, rep=150, return_mode="median")


def main():
    peer = accelerated_scan()
    B, D = 8, 1536
    rows = []
    for T in (4096, 16384):
        for dtype in (torch.float32, torch.bfloat16):
            a = (torch.rand(B, D, T, device="cuda") * 0.5 + 0.5).to(dtype)
            b = torch.randn(B, D, T, device="cuda").to(dtype)
            al, bl = a.clone().requires_grad_(), b.clone().requires_grad_()
            es = a.element_size()
            n = B * D * T

            def fb(f):
                def run():
                    h = f(al, bl)
                    torch.autograd.grad(h, (al, bl), bl)
                return run
            ours = lambda x, y: sk.linear_scan(x, y, dim=-1)  # noqa: E731
            ref_h = sk.linear_scan(a.float(), b.float(), dim=-1, backend="triton")
            best = {}
            for cfg in [None] + VARIANTS:
                use(cfg)
                try:
                    h = ours(a, b)
                    err = ((h.float() - ref_h).norm() / ref_h.norm()).item()
                    tf, tb = ms(lambda: ours(a, b)), ms(fb(ours))
                except Exception as e:  # a tile that does not compile (shared memory) is skipped
                    print(f"T={T} {dtype} cfg={cfg}: {type(e).__name__} {str(e)[:80]}")
                    continue
                print(f"T={T} {str(dtype)[6:]:<8} cfg={cfg}: fwd {tf:.4f} ms  fwd+bwd {tb:.4f} ms  err {err:.1e}",
                      flush=True)
                for mode, t in (("fwd", tf), ("fwd+bwd", tb)):
                    if mode not in best or t < best[mode][0]:
                        best[mode] = (t, cfg)
            use(None)
            pf = ms(lambda: peer(a, b)) if peer else float("nan")
            pb = ms(fb(peer)) if peer else float("nan")
            for mode, p, nb in (("fwd", pf, 3 * n * es), ("fwd+bwd", pb, 8 * n * es)):
                t, cfg = best[mode]
                rows.append((T, str(dtype)[6:], mode, t, cfg, p, nb))
    print(f"\n{'T':>6} {'dtype':<9} {'mode':<8} {'ours ms':>8} {'best cfg':<16} {'acc-scan':>9} {'ratio':>6} {'TB/s':>6}")
    for T, dt, mode, t, cfg, p, nb in rows:
        print(f"{T:>6} {dt:<9} {mode:<8} {t:8.4f} {str(cfg):<16} {p:9.4f} {p / t:6.2f} {nb / t / 1e9:6.2f}")


if __name__ == "__main__":
    main()
