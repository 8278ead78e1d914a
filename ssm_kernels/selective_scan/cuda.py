"""Thin wrapper over the CUDA forward in ssm_kernels._C (csrc/selective_scan/): real A, storage
float32/float16/bfloat16. The backward of the cuda backend runs the Triton kernel (it restarts
from the same checkpoints)."""
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
