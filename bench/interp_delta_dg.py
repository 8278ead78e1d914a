"""Offline (CPU, TRITON_INTERPRET=1) look at the chunked delta rule's bf16 errors at
`gpu_delta.py`'s variant-check shape, with the interpreter's numerics brought closer to the GPU's:

    TRITON_INTERPRET=1 PYTHONPATH=. python bench/interp_delta_dg.py [T] [K] [--no-boundary]

- the interpreter casts float32 -> bf16 by truncation (triton/runtime/interpreter.py `cast_impl`
  passes no rounding mode); the GPU rounds to nearest even. RNE=1 (default) patches that cast to
  torch's conversion, which puts o, dq, dk, dv within ~5% of the H100's errors; RNE=0 keeps the
  interpreter's (errors ~3x the GPU's).
- BT=64 chunks (the GPU's, INTERP_CHUNK), gated, l2 norm, B1 H2 HV4 K=V (default 128), T (1024).
- --no-boundary: no initial state and no loss on the final state (dg without its boundary terms).
Prints every output's error against the float64 chunked reference with the bound of
`gpu_delta.check` (dg relative to max(|dg|, |normalize(q) * dq|)), then dg's error by chunk and by
position in the chunk (a reverse in-chunk cumsum of per-row errors falls from row 0 to the last).
KNOBS="DQK_DELTA=True,..." sets delta_rule/chunk.py knobs. bench/NOTES.md, "dg of the chunked
delta rule". T=1024 K=128: ~1 min."""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ssm_kernels as sk  # noqa: E402
from ssm_kernels.chunk import common  # noqa: E402
from ssm_kernels.delta_rule import chunk as wy, interface  # noqa: E402
from ssm_kernels.delta_rule.reference import delta_rule_chunk_ref  # noqa: E402
from ssm_kernels.testing import bound_for, rel_err  # noqa: E402


def rne_bf16_casts():
    """Make the interpreter's float32 -> bf16 casts round to nearest even (as the GPU does)."""
    import triton.language as tl
    from triton.runtime import interpreter as ti
    orig = ti.InterpreterBuilder.cast_impl

    def cast(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            x = torch.from_numpy(np.ascontiguousarray(src.data).astype(np.float32))
            out = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return ti.TensorHandle(out.reshape(src.data.shape), dst_type.scalar)
        return orig(self, src, dst_type)
    ti.InterpreterBuilder.cast_impl = cast


def grads_of(fn, inputs, cots):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    loss = sum((o.double() * c).sum() for o, c in zip(out, cots))
    return list(out) + list(torch.autograd.grad(loss, leaves))


def main():
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run under TRITON_INTERPRET=1 (the CPU interpreter)")
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    T = int(args[0]) if args else 1024
    K = V = int(args[1]) if len(args) > 1 else 128
    boundary = "--no-boundary" not in sys.argv
    if os.environ.get("RNE", "1") == "1":
        rne_bf16_casts()
    common.INTERP_CHUNK = 64
    interface.CHUNKED_WY = True
    for kv in filter(None, os.environ.get("KNOBS", "").split(",")):
        kk, _, vv = kv.partition("=")
        setattr(wy, kk.strip(), eval(vv))   # noqa: S307 (Python literals from the command line)
    torch.manual_seed(0)
    B, H, HV, BF = 1, 2, 4, torch.bfloat16
    q, k = torch.randn(2, B, T, H, K).to(BF).unbind(0)
    v = torch.randn(B, T, HV, V).to(BF)
    g = F.logsigmoid(torch.randn(B, T, HV))
    beta = torch.sigmoid(torch.randn(B, T, HV))
    h0 = torch.randn(B, HV, K, V) * boundary
    cots = (torch.randn(B, T, HV, V, dtype=torch.float64),
            torch.randn(B, HV, K, V, dtype=torch.float64) * boundary)

    def mine(q, k, v, g, beta, h0):
        return sk.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0,
                                         output_final_state=True, use_qk_l2norm_in_kernel=True,
                                         backend="triton")

    def ref(q, k, v, g, beta, h0):
        return delta_rule_chunk_ref(q, k, v, g, beta, None, h0, None, True, chunk_size=64)
    ins = [q, k, v, g, beta, h0]
    t0 = time.time()
    got = grads_of(mine, ins, cots)
    t1 = time.time()
    r = grads_of(ref, [x.double() for x in ins], cots)
    lp = grads_of(ref, ins, cots)
    names = ["o", "ht", "dq", "dk", "dv", "dg", "dbeta", "dh0"]
    print(f"B{B} T{T} H{H} HV{HV} K=V={K} bf16 BT=64, boundary terms {boundary}, "
          f"RNE casts {os.environ.get('RNE', '1') == '1'}, kernels {t1 - t0:.1f} s")
    for n, a, rr, lo in zip(names, got, r, lp):
        if n == "dg":
            qn = F.normalize(q.double(), dim=-1, eps=0)
            den = max(rr.norm().item(), (qn * r[2]).norm().item())
            e, el = (a.double() - rr).norm().item() / den, (lo.double() - rr).norm().item() / den
        else:
            e, el = rel_err(a, rr), rel_err(lo, rr)
        b = bound_for(BF, el)
        print(f"  {n:6s} err {e:.2e} bound {b:.2e} ({e / b:4.0%})")
    err = (got[5].double() - r[5])[0]
    n_c = T // 64
    ch = err[:n_c * 64].reshape(n_c, 64, HV)
    print("dg |ref| by chunk ", " ".join(f"{x:.2f}" for x in
                                         r[5][0, :n_c * 64].reshape(n_c, 64, HV).norm(dim=(1, 2))))
    print("dg error by chunk ", " ".join(f"{x:.4f}" for x in ch.norm(dim=(1, 2))))
    pos = ch.pow(2).sum((0, 2)).sqrt()
    print("dg error by position in the chunk, rows 0-3:", " ".join(f"{x:.4f}" for x in pos[:4]),
          "| rows 60-63:", " ".join(f"{x:.4f}" for x in pos[-4:]))


if __name__ == "__main__":
    main()
