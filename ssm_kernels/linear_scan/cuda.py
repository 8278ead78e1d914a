"""Thin wrapper over the CUDA kernels in ssm_kernels._C (csrc/linear_scan/)."""
from __future__ import annotations

from .._backend import cuda_extension


def fits(shape) -> bool:
    """The kernel indexes within a tile in int32: 64 * (the largest stride) must stay below 2^31."""
    P, T, Q = shape
    return 64 * (T if Q == 1 else Q) < 2 ** 31


def linear_scan_fwd(a, b, h0, reverse: bool):
    return tuple(cuda_extension().linear_scan_fwd(a.contiguous(), b.contiguous(), h0, reverse))


def linear_scan_bwd(a, h, h0, dh, dhT, reverse: bool):
    return tuple(cuda_extension().linear_scan_bwd(a.contiguous(), h.contiguous(), h0, dh.contiguous(),
                                                  dhT.contiguous(), reverse))
