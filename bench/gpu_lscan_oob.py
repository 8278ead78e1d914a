"""linear_scan [B, D, T] backward out-of-bounds check on the GPU, small (under compute-sanitizer).

The register-shift backward (`_linear_scan_bwd_tinner_kernel`, reverse=False) used to load the
group-edge element a[tq + V] with only `tq + V < T` as mask: whenever a tile starts below t=0 (the
prefetched tile after the last with BWD_PREFETCH, or T not a multiple of BLOCK_T) channel 0 read
up to BLOCK_T - V elements *before* `a` (bf16 (2, 2048, 8): 4080 bytes): the illegal address seen
in `bench/gpu_linear_scan.py --quick` (reg+pf, after other allocations moved `a`). Fixed on branch
lscan6 (edge masks 0 <= e < T); `--unfixed` drops the lower bound again (positive control: the
sanitizer must report it).

Each case: autograd forward+backward through sk.linear_scan(dim=-1) (dhT = autograd's zeros ->
HAS_CARRY) and one direct launcher backward (dhT None), da/db vs the float64 reference, on
[1, 2, T] (tiny: each tensor its own cudaMalloc with PYTORCH_NO_CUDA_MEMORY_CACHING=1, and
compute-sanitizer --padding puts a guard after every allocation, i.e. right below the next one).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --padding 65536 \\
        --print-limit 4 python bench/gpu_lscan_oob.py [--unfixed]
    python bench/gpu_lscan_oob.py     # values only, no sanitizer (~10 s)
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ssm_kernels as sk  # noqa: E402
from ssm_kernels.linear_scan import triton as K  # noqa: E402
from ssm_kernels.linear_scan.reference import linear_scan_bwd_ref  # noqa: E402

DEV = os.environ.get("LSCAN_BENCH_DEVICE", "cuda")   # "cpu" + TRITON_INTERPRET=1: a smoke run


def install_unfixed():
    """The control: the current `_tinner_bwd_loads` with the edge masks' lower bound removed (the
    pre-fix masks), built from its source in a temporary module and swapped into the kernel's
    globals before the first compile."""
    import importlib.util
    import inspect
    import tempfile
    src = inspect.getsource(K._tinner_bwd_loads.fn)
    fixed = "m_hi = mq & (e_hi >= 0) & (e_hi < T)"
    assert fixed in src, "the fixed edge mask is not where this control expects it"
    src = src.replace(fixed, "m_hi = mq & (e_hi < T)")
    path = os.path.join(tempfile.mkdtemp(), "lscan_unfixed.py")
    with open(path, "w") as f:
        f.write("import triton\nimport triton.language as tl\n"
                "from ssm_kernels.linear_scan.triton import _tinner_rows\n\n" + src)
    spec = importlib.util.spec_from_file_location("lscan_unfixed", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    K._tinner_bwd_loads = mod._tinner_bwd_loads   # resolved from the module's globals at compile


def use(cfg):
    orig = use.orig
    K._plan.cache_clear()
    bc, bt, w = cfg
    K._config = lambda T, C, ti, cp, eb, bwd=False: (
        dict(BLOCK_T=min(bt, max(16, K.next_power_of_2(T))), BLOCK_C=bc, num_warps=w)
        if ti and bwd else orig(T, C, ti, cp, eb, bwd))


use.orig = K._config


def main():
    if "--unfixed" in sys.argv:
        install_unfixed()
    cases = [(torch.float32, (2, 1024, 4)), (torch.bfloat16, (1, 1024, 4)),
             (torch.bfloat16, (2, 2048, 8))]
    rows = []
    for dtype, cfg in cases:
        for pf in (False, True):
            for T in (cfg[1] * 2, cfg[1] * 2 - 48):   # a tile multiple, and not (both % 16 == 0)
                K.BWD_REG_SHIFT, K.BWD_PREFETCH = True, pf
                use(cfg)
                torch.manual_seed(0)
                a = (torch.rand(1, 2, T, device=DEV) * 0.5 + 0.5).to(dtype).requires_grad_()
                b = torch.randn(1, 2, T, device=DEV).to(dtype).requires_grad_()
                dh = torch.randn(1, 2, T, device=DEV).to(dtype)
                h = sk.linear_scan(a, b, dim=-1, backend="triton")
                da, db = torch.autograd.grad(h, (a, b), dh)
                da2, db2, _ = K.linear_scan_bwd(a.detach(), h.detach(), None, dh, None, False,
                                                pq=(2, T, 1))
                ref = linear_scan_bwd_ref(*(x.detach().view(2, T, 1).double() for x in (a, h)),
                                          None, dh.view(2, T, 1).double(),
                                          torch.zeros(2, 1, dtype=torch.float64, device=DEV), False)
                err = max(((x.view(2, T, 1).double() - r).norm() / r.norm()).item()
                          for x, r in ((da, ref[0]), (db, ref[1]), (da2, ref[0]), (db2, ref[1])))
                if DEV == "cuda":
                    torch.cuda.synchronize()
                ok = err < (1e-5 if dtype == torch.float32 else 2e-2)
                rows.append((str(dtype)[6:], cfg, pf, T, err, ok))
                print(f"{str(dtype)[6:]:<9} {str(cfg):<14} pf={int(pf)} T={T:<5} err {err:.1e} "
                      f"{'ok' if ok else 'FAIL'}", flush=True)
    bad = [r for r in rows if not r[5]]
    print(f"\n{len(rows)} cases, {len(bad)} value failures "
          f"({'unfixed' if '--unfixed' in sys.argv else 'fixed'} tile loads); under compute-sanitizer "
          "the ERROR SUMMARY line below is the verdict")


if __name__ == "__main__":
    main()
