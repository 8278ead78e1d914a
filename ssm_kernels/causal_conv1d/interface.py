"""causal_conv1d: registered ops -> autograd -> the documented public functions (drop-ins for the
`causal-conv1d` package's `causal_conv1d_fn` and `causal_conv1d_update`)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backend
from .._ops import cached_on_metadata, kernel_op
from ..validation import (check_cu_seqlens, check_dtype, check_same_device, check_shape,
                          check_tensor)
from .reference import causal_conv1d_bwd_ref, causal_conv1d_fwd_ref, causal_conv1d_update_ref

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_TRITON_WIDTH = 8


@cached_on_metadata
def _select(op: str, backend: str, x: Tensor, width: int) -> str:
    def triton_ok():
        reason = _backend.triton_reason(x.device)
        if reason is None and x.dtype not in _TRITON_DTYPES:
            reason = f"dtype {x.dtype} (the Triton kernel takes {_TRITON_DTYPES})"
        if reason is None and width > MAX_TRITON_WIDTH:
            reason = f"width {width} (the Triton kernel takes 1..{MAX_TRITON_WIDTH})"
        return reason

    return _backend.resolve(op, backend, {"triton": triton_ok, "reference": lambda: None},
                            order=("triton", "reference"))


def _like(src: Tensor, template: Tensor) -> Tensor:
    """src's values in template's layout and dtype (what the kernels return)."""
    out = torch.empty_like(template)
    out.copy_(src)
    return out


# ---- registered ops ---------------------------------------------------------------------------

@kernel_op("causal_conv1d_fwd", mutates_args=())
def causal_conv1d_fwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                         seq_idx: Optional[Tensor], cu_seqlens: Optional[Tensor],
                         initial_states: Optional[Tensor], silu: bool, return_final: bool,
                         backend: str) -> Tuple[Tensor, Tensor]:
    """(out in x's layout and dtype, final states [B or N, D, W-1] or an empty tensor)."""
    if _select("causal_conv1d_fn", backend, x, weight.shape[1]) == "triton":
        from .triton import causal_conv1d_fwd
        return causal_conv1d_fwd(x, weight, bias, seq_idx, cu_seqlens, initial_states, silu,
                                 return_final)
    out, final = causal_conv1d_fwd_ref(x, weight, bias, seq_idx, cu_seqlens, initial_states, silu,
                                       return_final)
    return _like(out, x), final.contiguous()


@causal_conv1d_fwd_op.register_fake
def _(x, weight, bias, seq_idx, cu_seqlens, initial_states, silu, return_final, backend):
    if not return_final:
        return torch.empty_like(x), x.new_empty(0)
    n = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return torch.empty_like(x), x.new_empty((n, x.shape[1], weight.shape[1] - 1))


@kernel_op("causal_conv1d_bwd", mutates_args=())
def causal_conv1d_bwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                         seq_idx: Optional[Tensor], cu_seqlens: Optional[Tensor],
                         initial_states: Optional[Tensor], dout: Tensor, dfinal: Optional[Tensor],
                         silu: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx like x, dweight like weight, dbias like bias, dinit like initial_states); an absent
    input's gradient is an empty tensor."""
    if _select("causal_conv1d_fn", backend, x, weight.shape[1]) == "triton":
        from .triton import causal_conv1d_bwd
        dx, dw, db, dh0 = causal_conv1d_bwd(x, weight, bias, seq_idx, cu_seqlens, initial_states,
                                            dout, dfinal, silu)
    else:
        dx, dw, db, dh0 = causal_conv1d_bwd_ref(x, weight, bias, seq_idx, cu_seqlens,
                                                initial_states, dout, dfinal, silu)
        dx, dw = _like(dx, x), _like(dw, weight)
        db = None if db is None else _like(db, bias)
        dh0 = None if dh0 is None else _like(dh0, initial_states)
    return (dx, dw, x.new_empty(0) if db is None else db, x.new_empty(0) if dh0 is None else dh0)


@causal_conv1d_bwd_op.register_fake
def _(x, weight, bias, seq_idx, cu_seqlens, initial_states, dout, dfinal, silu, backend):
    return (torch.empty_like(x), torch.empty_like(weight),
            x.new_empty(0) if bias is None else torch.empty_like(bias),
            x.new_empty(0) if initial_states is None else torch.empty_like(initial_states))


def _setup_context(ctx, inputs, output):
    x, weight, bias, seq_idx, cu_seqlens, initial_states, silu, return_final, backend = inputs
    ctx.save_for_backward(x, weight, bias, seq_idx, cu_seqlens, initial_states)
    ctx.silu, ctx.backend = silu, backend


def _backward(ctx, dout, dfinal):
    x, weight, bias, seq_idx, cu_seqlens, initial_states = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(x)
    if dfinal is not None and dfinal.numel() == 0:
        dfinal = None
    dx, dw, db, dh0 = causal_conv1d_bwd_op(x, weight, bias, seq_idx, cu_seqlens, initial_states,
                                           dout, dfinal, ctx.silu, ctx.backend)
    return (dx, dw, None if bias is None else db, None, None,
            None if initial_states is None else dh0, None, None, None)


causal_conv1d_fwd_op.register_autograd(_backward, setup_context=_setup_context)


@kernel_op("causal_conv1d_update", mutates_args=("conv_state",))
def causal_conv1d_update_op(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor],
                            silu: bool, cache_seqlens: Optional[Tensor],
                            conv_state_indices: Optional[Tensor], backend: str) -> Tensor:
    """x [B, D, L]; conv_state updated in place; returns out [B, D, L] like x."""
    if _select("causal_conv1d_update", backend, x, weight.shape[1]) == "triton":
        from .triton import causal_conv1d_update
        return causal_conv1d_update(x, conv_state, weight, bias, silu, cache_seqlens,
                                    conv_state_indices)
    out = causal_conv1d_update_ref(x, conv_state, weight, bias, "silu" if silu else None,
                                   cache_seqlens, conv_state_indices)
    return _like(out, x)


@causal_conv1d_update_op.register_fake
def _(x, conv_state, weight, bias, silu, cache_seqlens, conv_state_indices, backend):
    return torch.empty_like(x)


# ---- public functions -------------------------------------------------------------------------

def _activation(op: str, activation) -> bool:
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"{op}: activation must be None, 'silu' or 'swish', got {activation!r}")
    return activation is not None


def _check_weight(op: str, weight, bias, dim: int) -> int:
    check_tensor(op, "weight", weight, rank=2)
    check_dtype(op, "weight", weight)
    if weight.shape[0] != dim or weight.shape[1] < 1:
        raise ValueError(f"{op}: weight must have shape (dim={dim}, width >= 1), got "
                         f"{tuple(weight.shape)}")
    if bias is not None:
        check_tensor(op, "bias", bias)
        check_dtype(op, "bias", bias)
        check_shape(op, "bias", bias, (dim,))
    return weight.shape[1]


def causal_conv1d_fn(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                     seq_idx: Optional[Tensor] = None, initial_states: Optional[Tensor] = None,
                     return_final_states: bool = False, final_states_out: Optional[Tensor] = None,
                     activation: Optional[str] = None, *, cu_seqlens: Optional[Tensor] = None,
                     backend: Optional[str] = None):
    """Short causal depthwise convolution; a drop-in for ``causal_conv1d.causal_conv1d_fn`` (same
    names, order, shapes, returns), plus packed sequences (``cu_seqlens``), any width 1..8 and
    gradients for every input including ``initial_states``.

    ``out[b, d, t] = act(bias[d] + sum_k weight[d, k] * xpad[b, d, t + k])`` with ``xpad`` the
    sequence prefixed by its ``width - 1`` initial inputs (zeros by default).

    Args:
        x: ``(batch, dim, seqlen)`` float32, float16 or bfloat16 (float64 on the reference backend),
            time-contiguous or channel-last (``t.transpose(1, 2)`` of a contiguous
            ``(batch, seqlen, dim)`` tensor; read in place, the output has x's layout); any strides.
        weight: ``(dim, width)``, 1 <= width <= 8 on the Triton backend; any float dtype (used in
            float32). Differentiable.
        bias: ``(dim,)`` or None. Differentiable.
        seq_idx: ``(batch, seqlen)`` int32 sequence index per step: a step only sees inputs with
            its own index; steps with a negative index are padding (output 0). Excludes
            ``initial_states``, ``return_final_states`` and ``cu_seqlens`` (as in causal-conv1d).
        initial_states: ``(batch, dim, width - 1)`` (``(N, dim, width - 1)`` with ``cu_seqlens``),
            the inputs before step 0. Differentiable.
        return_final_states: also return the last ``width - 1`` inputs of each sequence
            (``(batch or N, dim, width - 1)`` in x's dtype; differentiable) — the
            ``initial_states`` that continue the sequence.
        final_states_out: a ``(batch or N, dim, width - 1)`` tensor the final states are written
            into (and returned) when ``return_final_states``.
        activation: None, "silu" or "swish" (the same).
        cu_seqlens: ``(N + 1,)`` int32/int64 offsets of N sequences packed along seqlen in a
            batch of one (FlashAttention style); each sequence starts from its own state.
        backend: None (env SSM_KERNELS_BACKEND, default "auto"), "auto", "triton" or "reference".

    Returns:
        ``out`` ``(batch, dim, seqlen)`` in x's dtype and layout, or ``(out, final_states)``.

    Example:
        >>> import torch, ssm_kernels
        >>> x = torch.randn(2, 64, 100)                       # (batch, dim, seqlen)
        >>> w, b = torch.randn(64, 4), torch.randn(64)
        >>> out, last = ssm_kernels.causal_conv1d_fn(x, w, b, return_final_states=True,
        ...                                          activation="silu")
        >>> out.shape, last.shape
        (torch.Size([2, 64, 100]), torch.Size([2, 64, 3]))
    """
    op = "causal_conv1d_fn"
    check_tensor(op, "x", x, rank=3)
    check_dtype(op, "x", x)
    B, D, T = x.shape
    W = _check_weight(op, weight, bias, D)
    silu = _activation(op, activation)
    check_same_device(op, x=x, weight=weight, bias=bias, seq_idx=seq_idx,
                      initial_states=initial_states, cu_seqlens=cu_seqlens,
                      final_states_out=final_states_out)
    n_states = B
    if cu_seqlens is not None:
        if seq_idx is not None:
            raise ValueError(f"{op}: give seq_idx or cu_seqlens, not both")
        n_states = check_cu_seqlens(op, cu_seqlens, B, T, axis="seqlen")
    if seq_idx is not None:
        check_tensor(op, "seq_idx", seq_idx, rank=2)
        check_dtype(op, "seq_idx", seq_idx, allowed=(torch.int32, torch.int64))
        check_shape(op, "seq_idx", seq_idx, (B, T))
        if initial_states is not None or return_final_states:
            raise ValueError(f"{op}: seq_idx cannot be combined with initial_states or "
                             f"return_final_states (use cu_seqlens for per-sequence states)")
    if initial_states is not None:
        check_tensor(op, "initial_states", initial_states, rank=3)
        check_dtype(op, "initial_states", initial_states)
        check_shape(op, "initial_states", initial_states, (n_states, D, W - 1))
    if final_states_out is not None:
        check_tensor(op, "final_states_out", final_states_out, rank=3)
        check_shape(op, "final_states_out", final_states_out, (n_states, D, W - 1))
    out, final = causal_conv1d_fwd_op(x, weight.contiguous(), bias, seq_idx, cu_seqlens,
                                      initial_states, silu, bool(return_final_states),
                                      _backend.normalize(backend))
    if not return_final_states:
        return out
    if final_states_out is not None:
        final_states_out.copy_(final)
        final = final_states_out
    return out, final


def causal_conv1d_update(x: Tensor, conv_state: Tensor, weight: Tensor,
                         bias: Optional[Tensor] = None, activation: Optional[str] = None,
                         cache_seqlens: Optional[Tensor] = None,
                         conv_state_indices: Optional[Tensor] = None, *,
                         backend: Optional[str] = None) -> Tensor:
    """Decode step(s) of `causal_conv1d_fn`; a drop-in for ``causal_conv1d.causal_conv1d_update``.
    Updates ``conv_state`` in place, no host synchronisation (CUDA-graph capturable). Feeding a
    sequence through it in pieces reproduces `causal_conv1d_fn`.

    Args:
        x: ``(batch, dim)`` (one token) or ``(batch, dim, seqlen)``; float32, float16 or bfloat16.
        conv_state: ``(batch, dim, state_len)`` with ``state_len >= width - 1``, any float dtype;
            without ``cache_seqlens`` it holds the last ``state_len`` inputs, oldest first, and is
            shifted by ``seqlen``. (`causal_conv1d_fn`'s final states are a ``state_len = width -
            1`` conv_state.)
        weight: ``(dim, width)``; bias: ``(dim,)`` or None; activation: None, "silu" or "swish".
        cache_seqlens: ``(batch,)`` int32 or None. If given, ``conv_state`` is a circular buffer:
            the new inputs are written at ``(cache_seqlens + i) % state_len`` and the ``width - 1``
            inputs before them are read at ``(cache_seqlens - width + 1 + i) % state_len``.
        conv_state_indices: ``(batch,)`` int32 or None: row of ``conv_state`` used by each batch
            element (continuous batching; conv_state may then have more rows).
        backend: None, "auto", "triton" or "reference".

    Returns:
        ``out`` of x's shape and dtype.

    Example:
        >>> import torch, ssm_kernels
        >>> w = torch.randn(64, 4)
        >>> state = torch.zeros(2, 64, 3)
        >>> y = ssm_kernels.causal_conv1d_update(torch.randn(2, 64), state, w, activation="silu")
        >>> y.shape
        torch.Size([2, 64])
    """
    op = "causal_conv1d_update"
    check_tensor(op, "x", x)
    if x.dim() not in (2, 3):
        raise ValueError(f"{op}: x must have shape (batch, dim) or (batch, dim, seqlen), got "
                         f"{tuple(x.shape)}")
    check_dtype(op, "x", x)
    x3 = x.unsqueeze(-1) if x.dim() == 2 else x
    B, D, L = x3.shape
    W = _check_weight(op, weight, bias, D)
    silu = _activation(op, activation)
    check_tensor(op, "conv_state", conv_state, rank=3)
    check_dtype(op, "conv_state", conv_state)
    check_same_device(op, x=x, conv_state=conv_state, weight=weight, bias=bias,
                      cache_seqlens=cache_seqlens, conv_state_indices=conv_state_indices)
    S = conv_state.shape[2]
    if conv_state.shape[1] != D or S < W - 1 or (conv_state_indices is None and conv_state.shape[0] != B):
        rows = "*" if conv_state_indices is not None else str(B)
        raise ValueError(f"{op}: conv_state must have shape ({rows}, dim={D}, state_len >= "
                         f"width - 1 = {W - 1}), got {tuple(conv_state.shape)}")
    if cache_seqlens is not None:
        check_tensor(op, "cache_seqlens", cache_seqlens, rank=1)
        check_dtype(op, "cache_seqlens", cache_seqlens, allowed=(torch.int32, torch.int64))
        check_shape(op, "cache_seqlens", cache_seqlens, (B,))
        if S < 1:
            raise ValueError(f"{op}: a circular conv_state (cache_seqlens given) needs state_len "
                             f">= 1, got {S}")
    if conv_state_indices is not None:
        check_tensor(op, "conv_state_indices", conv_state_indices, rank=1)
        check_dtype(op, "conv_state_indices", conv_state_indices, allowed=(torch.int32, torch.int64))
        check_shape(op, "conv_state_indices", conv_state_indices, (B,))
    out = causal_conv1d_update_op(x3, conv_state, weight.contiguous(), bias, silu, cache_seqlens,
                                  conv_state_indices, _backend.normalize(backend))
    return out.squeeze(-1) if x.dim() == 2 else out
