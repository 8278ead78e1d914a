"""The backend choice of every op on the chunked engine (torch only: importing it loads no Triton)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from .._ops import cached_on_metadata

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_DIM = 256  # head dims the engine's whole-K tiles take


@cached_on_metadata
def select(op: str, backend: str, x: Tensor, y: Tensor) -> str:
    """x: the tensor whose dtype and device decide; x.shape[-1], y.shape[-1]: the two head dims
    (K and V for linear attention, headdim and dstate for SSD)."""
    def triton_ok():
        reason = _backend.triton_reason(x.device)
        if reason is None and x.dtype not in TRITON_DTYPES:
            reason = f"dtype {x.dtype} (the Triton kernels take {TRITON_DTYPES})"
        if reason is None and max(x.shape[-1], y.shape[-1]) > MAX_DIM:
            reason = (f"head dims {x.shape[-1]} and {y.shape[-1]} (the Triton kernels take at most "
                      f"{MAX_DIM})")
        return reason

    return _backend.resolve(op, backend, {"triton": triton_ok, "reference": lambda: None})
