"""Offline PTX address audit of the delta rule's kernels (no GPU): compile the op for sm_90 through
bench/sm90_audit.py's stub driver at a given shape and knobs, then run every program (or a sample)
of the chosen kernels through bench/ptxsim.py, a lane-level simulator of the PTX's integer and
address arithmetic: every active ld/st.global (and cp.async source) must fall inside its tensor
argument, every shared access inside the kernel's shared allocation. This checks the code the GPU
runs (vectorised accesses, masks as compiled), not the Python source; run it under the GPU
machine's Triton with PYTHONPATH=/tmp/t36:$PWD (Triton 3.6 unpacked there, see NOTES "t36").

    PYTHONPATH=/tmp/t36:$PWD python bench/ptx_bounds.py --knobs DELTA_FWD=1 --T 1024 --H 2 --HV 4
        [--kernels all] [--bwd 1] [--max-programs 24]

Positive control: SHRINK_<param>=<bytes> shrinks that tensor argument's extent (e.g. SHRINK_k_ptr=2
must report the last k^T rows out of bounds). wgmma operands: each descriptor (per warp group)
is decoded into the shared byte range it reads (swizzled layouts; PTXSIM_MN_ATOM=lbo|sbo picks
which field strides MN-major atoms: both clean on every kernel here) and checked against the
shared size. Not modelled: float values (zeros; no address here depends on them), SASS (spill
code is ptxas's), races."""
import os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch, torch.nn.functional as F
import sm90_audit as au
from triton.runtime.jit import JITFunction
import ssm_kernels as sk
from ptxsim import Sim

launches = []

def install():
    au.install()
    inner = JITFunction.run
    def run(self, *args, grid, warmup, **kwargs):
        k = inner(self, *args, grid=grid, warmup=warmup, **kwargs)
        bound = {}
        names = [p.name for p in self.params]
        for n, a in zip(names, args):
            bound[n] = a
        bound.update(kwargs)
        launches.append((self.fn.__name__, self, k, bound, grid))
        return k
    JITFunction.run = run

def simulate(name, jf, k, bound, grid, max_programs=None):
    ptx = k.asm["ptx"]
    ptx = ptx if isinstance(ptx, str) else ptx.decode()
    params, tensors, idx = {}, [], 0
    for i, p in enumerate(jf.params):
        v = bound.get(p.name, p.default if getattr(p, "has_default", False) else None)
        if p.is_constexpr:
            continue
        if torch.is_tensor(v):
            base = (len(tensors) + 1) << 40
            shrink = int(os.environ.get("SHRINK_" + p.name, 0))
            tensors.append((base, base + v.numel() * v.element_size() - shrink, p.name))
            params[idx] = base; idx += 1
        elif isinstance(v, bool) or v is None:
            continue
        elif isinstance(v, int):
            if v == 1:
                continue   # specialised to a constant
            params[idx] = v; idx += 1
        elif isinstance(v, float):
            params[idx] = 0; idx += 1
    g = tuple(grid) + (1,) * (3 - len(grid))
    bad, n, nglob = [], 0, 0
    progs = [(x, y, z) for z in range(g[2]) for y in range(g[1]) for x in range(g[0])]
    if max_programs and len(progs) > max_programs:
        step = len(progs) / max_programs
        progs = sorted({progs[int(i * step)] for i in range(max_programs)} | {progs[-1]})
    nth = 32 * k.metadata.num_warps
    for c in progs:
        s = Sim(ptx, params, c, tensors, k.metadata.shared, nth).run()
        n += 1; nglob += s.nglobal
        for b in s.bad:
            bad.append(f"program {c}: {b}")
    return n, nglob, bad

if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--knobs", default="DELTA_FWD=1")
    ap.add_argument("--B", type=int, default=1); ap.add_argument("--T", type=int, default=192)
    ap.add_argument("--H", type=int, default=2); ap.add_argument("--HV", type=int, default=4)
    ap.add_argument("--K", type=int, default=128); ap.add_argument("--V", type=int, default=128)
    ap.add_argument("--cu", default=""); ap.add_argument("--gated", type=int, default=1)
    ap.add_argument("--l2", type=int, default=1); ap.add_argument("--h0", type=int, default=1)
    ap.add_argument("--kernels", default="_delta_fwd_kernel")
    ap.add_argument("--bwd", type=int, default=0); ap.add_argument("--max-programs", type=int, default=0)
    a = ap.parse_args()
    from sm90_delta_bwd import set_knobs
    install()
    set_knobs(a.knobs)
    B, T, H, HV, K, V = a.B, a.T, a.H, a.HV, a.K, a.V
    cu = torch.tensor([int(x) for x in a.cu.split(",")], dtype=torch.int32) if a.cu else None
    N = B if cu is None else cu.numel() - 1
    req = bool(a.bwd)
    q, k = (torch.randn(B, T, H, K, dtype=torch.bfloat16).requires_grad_(req) for _ in range(2))
    v = torch.randn(B, T, HV, V, dtype=torch.bfloat16).requires_grad_(req)
    g = F.logsigmoid(torch.randn(B, T, HV)).requires_grad_(req) if a.gated else None
    beta = torch.rand(B, T, HV).requires_grad_(req)
    h0 = torch.randn(N, HV, K, V).requires_grad_(req) if a.h0 else None
    if a.gated:
        o, S = sk.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                         use_qk_l2norm_in_kernel=bool(a.l2), cu_seqlens=cu, backend="triton")
    else:
        o, S = sk.chunk_delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True,
                                   use_qk_l2norm_in_kernel=bool(a.l2), cu_seqlens=cu, backend="triton")
    if a.bwd:
        au._grad((o, S), (q, k, v, g, beta, h0))
    import triton
    tot_bad = 0
    for name, jf, kk, bound, grid in launches:
        if a.kernels != "all" and name not in a.kernels.split(","):
            continue
        t0 = time.time()
        n, ng, bad = simulate(name, jf, kk, bound, grid, a.max_programs or None)
        tot_bad += len(bad)
        print(f"[triton {triton.__version__}] {name} grid {tuple(grid)} warps {kk.metadata.num_warps} "
              f"smem {kk.metadata.shared}: {n} programs, {ng} active global lane accesses, "
              f"{len(bad)} violations ({time.time() - t0:.1f} s)")
        for b in bad[:6]:
            print("   ", b)
    sys.exit(1 if tot_bad else 0)
