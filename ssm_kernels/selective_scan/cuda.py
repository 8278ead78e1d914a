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


def planned_fwd(u: torch.Tensor, A: torch.Tensor, cu_seqlens, save_ckpt: bool):
    """The CUDA forward for this metadata, with what depends only on shapes (checkpoint spacing,
    rows) computed once: interface._fwd_impl memoises it. Returns fwd(u, ..., save_ckpt) ->
    (out, last_state, checkpoints)."""
    N = A.shape[1]
    ck_len = chunk_len(N)
    rows = ckpt_rows(u.shape[0], u.shape[2], N, cu_seqlens) if save_ckpt else 0

    def fwd(u, delta, A, B, C, D, z, delta_bias, h0, cu_seqlens, delta_softplus, save_ckpt):
        # a tuple, not the binding's list: an autograd.Function forward that returns a list
        # gives its outputs no grad_fn (the op's result would silently not be differentiable)
        ext = cuda_extension()
        if cu_seqlens is None:
            return tuple(ext.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, h0, None,
                                                None, bool(delta_softplus), ck_len, rows))
        cu = cu_seqlens.to(torch.int32).contiguous()
        return tuple(ext.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, h0, cu,
                                            ckpt_offsets(cu, N), bool(delta_softplus), ck_len,
                                            rows))
    return fwd


def planned_bwd(u: torch.Tensor, A: torch.Tensor):
    """The CUDA backward for this metadata (memoised by interface._bwd_impl): bwd(u, ..., dout,
    dlast, delta_softplus) -> gradients for (u, delta, A, B, C, D, z, delta_bias, h0) from the
    forward's checkpoints, as ssm_kernels.selective_scan.triton.selective_scan_bwd returns them:
    du, ddelta, dz in u's dtype; dA (dim, N) float32; dB, dC with B's/C's shape and dtype; dD,
    ddelta_bias (dim,) float32; dh0 (nseq, dim, N) float32; None where the input is None.
    Deterministic (fixed-order sums). dout / dlast are converted only where needed."""
    N = A.shape[1]
    ck_len = chunk_len(N)
    f32 = torch.float32

    def bwd(u, delta, A, B, C, D, z, delta_bias, h0, cu_seqlens, ckpt, dout, dlast,
            delta_softplus):
        if dout.dtype != u.dtype or not dout.is_contiguous():
            dout = dout.to(u.dtype).contiguous()
        if dlast.dtype != f32 or not dlast.is_contiguous():
            dlast = dlast.to(f32).contiguous()
        cu = offs = None
        if cu_seqlens is not None:
            cu = cu_seqlens.to(torch.int32).contiguous()
            offs = ckpt_offsets(cu, N)
        g = cuda_extension().selective_scan_bwd(u, delta, A, B, C, D, z, delta_bias, cu, offs,
                                                ckpt, dout, dlast, bool(delta_softplus), ck_len,
                                                h0 is not None)
        return [g[0], g[1], g[2], g[3], g[4], None if D is None else g[5],
                None if z is None else g[6], None if delta_bias is None else g[7],
                None if h0 is None else g[8]]
    return bwd


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, h0, cu_seqlens, delta_softplus: bool,
                       save_ckpt: bool):
    """One CUDA forward, unplanned (tests and benches call the kernel directly with this; the op
    memoises `planned_fwd`)."""
    return planned_fwd(u, A, cu_seqlens, save_ckpt)(u, delta, A, B, C, D, z, delta_bias, h0,
                                                    cu_seqlens, delta_softplus, save_ckpt)


def selective_scan_bwd(u, delta, A, B, C, D, z, delta_bias, h0, cu_seqlens, ckpt, dout, dlast,
                       delta_softplus: bool):
    """One CUDA backward, unplanned (as `selective_scan_fwd`): `planned_bwd`'s gradients."""
    return planned_bwd(u, A)(u, delta, A, B, C, D, z, delta_bias, h0, cu_seqlens, ckpt, dout,
                             dlast, delta_softplus)


def bwd_reason(u: torch.Tensor, A: torch.Tensor, cu_seqlens) -> str | None:
    """Why the CUDA backward cannot serve this call (None if it can)."""
    why = reason(u, A, cu_seqlens)
    if why is not None:
        return why
    ext = cuda_extension()
    if ext is not None and not hasattr(ext, "selective_scan_bwd"):
        return "the built ssm_kernels._C predates the selective_scan backward (rebuild it)"
    return None
