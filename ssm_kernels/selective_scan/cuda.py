"""Thin wrappers over the CUDA kernels in ssm_kernels._C (csrc/selective_scan/): real A, storage
float32/float16/bfloat16. The backward restarts from the forward's checkpoints (the same format
the Triton backward reads)."""
from __future__ import annotations

import torch

from .._backend import cuda_extension
from .reference import chunk_len, ckpt_offsets, ckpt_rows


def reason(u: torch.Tensor, A: torch.Tensor, cu_seqlens) -> str | None:
    """Why the CUDA forward cannot serve this call (None if it can)."""
    ext = cuda_extension()
    if ext is not None and not hasattr(ext, "selective_scan_fwd"):
        return "the built ssm_kernels._C predates the selective_scan kernel (rebuild it)"
    if A.is_complex():
        return "complex A (the CUDA kernel is real-only; the Triton backend serves it)"
    if u.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {u.dtype}"
    nseq = u.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if nseq > 65535:
        return f"{nseq} sequences (at most 65535 per launch)"
    return None


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, h0, cu_seqlens, delta_softplus: bool,
                       save_ckpt: bool):
    N = A.shape[1]
    cu = None if cu_seqlens is None else cu_seqlens.to(torch.int32).contiguous()
    offs = None if cu is None else ckpt_offsets(cu, N)
    rows = ckpt_rows(u.shape[0], u.shape[2], N, cu_seqlens) if save_ckpt else 0
    out, last, ck = cuda_extension().selective_scan_fwd(
        u, delta, A, B, C, D, z, delta_bias, h0, cu, offs, bool(delta_softplus), chunk_len(N), rows)
    return out, last, ck


def bwd_reason(u: torch.Tensor, A: torch.Tensor, cu_seqlens) -> str | None:
    """Why the CUDA backward cannot serve this call (None if it can)."""
    why = reason(u, A, cu_seqlens)
    if why is not None:
        return why
    ext = cuda_extension()
    if ext is not None and not hasattr(ext, "selective_scan_bwd"):
        return "the built ssm_kernels._C predates the selective_scan backward (rebuild it)"
    return None


def selective_scan_bwd(u, delta, A, B, C, D, z, delta_bias, h0, cu_seqlens, ckpt, dout, dlast,
                       delta_softplus: bool):
    """Gradients for (u, delta, A, B, C, D, z, delta_bias, h0) from the forward's checkpoints, as
    ssm_kernels.selective_scan.triton.selective_scan_bwd returns them: du, ddelta, dz in u's dtype;
    dA (dim, N) float32; dB, dC with B's/C's shape and dtype; dD, ddelta_bias (dim,) float32; dh0
    (nseq, dim, N) float32; None where the input is None. Deterministic (fixed-order sums)."""
    N = A.shape[1]
    cu = None if cu_seqlens is None else cu_seqlens.to(torch.int32).contiguous()
    offs = None if cu is None else ckpt_offsets(cu, N)
    grads = cuda_extension().selective_scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, cu, offs, ckpt, dout.to(u.dtype).contiguous(),
        dlast.to(torch.float32).contiguous(), bool(delta_softplus), chunk_len(N), h0 is not None)
    present = (u, delta, A, B, C, D, z, delta_bias, h0)
    return [None if x is None else g for x, g in zip(present, grads)]
