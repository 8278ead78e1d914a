"""Pieces shared by the layers: the short convolution module, gated RMS norm, varlen resets,
Mamba-2's A / dt initialisation, padding-mask unpadding."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..causal_conv1d import causal_conv1d_fn, causal_conv1d_update


class ShortConvolution(nn.Module):
    """Depthwise causal convolution over ``[B, T, D]`` on `ssm_kernels.causal_conv1d_fn` (read
    channel-last in place, no transposed copies). Parameters as ``nn.Conv1d(D, D, W, groups=D)``
    (``weight (D, 1, W)``, ``bias (D,)``), so checkpoints of conv1d-based layers load unchanged.

    The decode state is ``(B, D, W - 1)``: the last ``W - 1`` inputs, oldest first."""

    def __init__(self, hidden_size: int, kernel_size: int, bias: bool = False,
                 activation: Optional[str] = "silu", backend: Optional[str] = None,
                 device=None, dtype=None):
        super().__init__()
        self.hidden_size, self.kernel_size = hidden_size, kernel_size
        self.activation, self.backend = activation, backend
        conv = nn.Conv1d(hidden_size, hidden_size, kernel_size, groups=hidden_size, bias=bias,
                         device=device, dtype=dtype)
        self.weight = conv.weight
        self.bias = conv.bias

    def forward(self, x: Tensor, cu_seqlens: Optional[Tensor] = None,
                state: Optional[Tensor] = None) -> Tensor:
        """x ``[B, T, D]`` -> ``[B, T, D]``; ``state`` ``(B or N, D, W-1)``, if given, is the
        initial state and is overwritten with the final one."""
        W = self.kernel_size
        r = causal_conv1d_fn(x.transpose(1, 2), self.weight.view(self.hidden_size, W), self.bias,
                             None,
                             cache_input(state, x.dtype),
                             state is not None, None, self.activation, cu_seqlens=cu_seqlens,
                             backend=self.backend)
        if state is not None:
            r, final = r
            with torch.no_grad():
                state.copy_(final)
        return r.transpose(1, 2)

    def step(self, x: Tensor, state: Tensor) -> Tensor:
        """x ``[B, D]`` one token; state updated in place."""
        return causal_conv1d_update(x, state, self.weight.view(self.hidden_size, self.kernel_size),
                                    self.bias, self.activation, backend=self.backend)

    def allocate_state(self, batch: int, dtype=None, device=None) -> Tensor:
        return torch.zeros(batch, self.hidden_size, self.kernel_size - 1,
                           dtype=dtype or self.weight.dtype, device=device or self.weight.device)


class RMSNorm(nn.Module):
    """RMS norm over the last axis in float32, optionally times silu(gate) (fla's RMSNorm /
    FusedRMSNormGated: ``weight`` of the normalised size)."""

    def __init__(self, hidden_size: int, elementwise_affine: bool = True, eps: float = 1e-5,
                 device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype)) \
            if elementwise_affine else None

    def forward(self, x: Tensor, gate: Optional[Tensor] = None) -> Tensor:
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x.to(cd)
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.to(cd)
        if gate is not None:
            y = y * F.silu(gate.to(cd))
        return y.to(x.dtype)


def cache_input(state: Optional[Tensor], dtype=None) -> Optional[Tensor]:
    """A cached state handed to an op as its initial state: a copy under autograd, since the cache
    is overwritten with the final state after the call and autograd keeps the op's inputs."""
    if state is None:
        return None
    return state.to(dtype or state.dtype, copy=torch.is_grad_enabled())


def reset_mask(cu_seqlens: Tensor, T: int, dtype) -> Tensor:
    """``[T]`` of 0 at every sequence's first step and 1 elsewhere: multiplying a recurrence's
    decay by it restarts the state at each boundary (packed sequences on a plain scan). Built on
    the device, no host synchronisation."""
    keep = torch.ones(T + 1, dtype=dtype, device=cu_seqlens.device)
    keep = keep.scatter(0, cu_seqlens[:-1].long(), torch.zeros_like(keep))
    return keep[:T]


def last_steps(h: Tensor, cu_seqlens: Tensor) -> Tensor:
    """``h [1, T, ...]`` -> ``[N, ...]``: the state after each sequence's last step."""
    return h[0].index_select(0, (cu_seqlens[1:].long() - 1).clamp(min=0))


def as_token(x: Tensor):
    """Accept a token as ``[B, D]`` or ``[B, 1, D]``; return ``[B, D]`` and a function restoring
    the caller's shape."""
    if x.dim() == 3:
        if x.shape[1] != 1:
            raise ValueError(f"step takes one token: x_t must be [B, D] or [B, 1, D], got "
                             f"{tuple(x.shape)}")
        return x[:, 0], lambda y: y.unsqueeze(1)
    if x.dim() != 2:
        raise ValueError(f"step takes one token: x_t must be [B, D] or [B, 1, D], got "
                         f"{tuple(x.shape)}")
    return x, lambda y: y


def mamba2_A_log(n: int, A_init_range, device=None, dtype=None) -> Tensor:
    """``log A`` with ``A ~ U(A_init_range)`` drawn in float32 (Mamba-2's initialisation), as a
    tensor of ``dtype``."""
    A = torch.empty(n, dtype=torch.float32, device=device).uniform_(*A_init_range)
    return torch.log(A).to(dtype=dtype)


def mamba2_dt_bias(n: int, dt_min: float, dt_max: float, dt_init_floor: float, device=None,
                   dtype=None) -> Tensor:
    """Mamba-2's dt bias: ``softplus(dt_bias)`` log-uniform in ``[dt_min, dt_max]``, floored at
    ``dt_init_floor`` (the inverse softplus of the drawn dt)."""
    dt = torch.exp(torch.rand(n, device=device, dtype=dtype)
                   * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


def unpad_input(x: Tensor, attention_mask: Tensor, op: str) -> Tuple[Tensor, Tensor, Tensor]:
    """A padded batch ``x [B, T, D]`` with a padding mask ``[B, S]`` (S >= T; its last T columns
    apply, nonzero = a real token, left or right padding) -> ``(packed [1, n, D], cu_seqlens
    [B + 1] int32, indices [n])``: row b becomes sequence b (possibly empty). Reads the packed
    length on the host (one synchronisation); pass ``cu_seqlens`` for the sync-free path."""
    B, T = x.shape[:2]
    if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2 \
            or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else \
            type(attention_mask).__name__
        raise ValueError(f"{op}: attention_mask must be a [batch, seq_len] 0/1 padding mask with "
                         f"batch={B} and seq_len >= {T} (arbitrary [B, T, T] masks are not "
                         f"supported), got {got}")
    if attention_mask.device != x.device:
        raise ValueError(f"{op}: attention_mask is on {attention_mask.device}, hidden_states on "
                         f"{x.device}")
    keep = attention_mask[:, attention_mask.shape[1] - T:] != 0
    indices = keep.flatten().nonzero().squeeze(1)
    cu_seqlens = F.pad(keep.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
    return x.flatten(0, 1).index_select(0, indices)[None], cu_seqlens, indices


def pad_output(y: Tensor, indices: Tensor, B: int, T: int) -> Tensor:
    """Inverse of `unpad_input`: ``[1, n, D]`` -> ``[B, T, D]`` with zeros at padded positions."""
    out = y.new_zeros(B * T, y.shape[-1])
    return out.index_copy(0, indices, y[0]).view(B, T, y.shape[-1])
