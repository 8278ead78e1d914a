"""linear_scan: registered ops -> autograd -> the documented public function."""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backend
from .._ops import cached_on_metadata, kernel_op
from ..validation import check_dtype, check_same_device, check_tensor
from .reference import linear_scan_bwd_ref, linear_scan_fwd_ref, state_dtype

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.complex64)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@cached_on_metadata
def _select(backend: str, x: Tensor) -> str:
    def triton_ok():
        reason = _backend.triton_reason(x.device)
        if reason is None and x.dtype not in _TRITON_DTYPES:
            reason = f"dtype {x.dtype} (Triton kernel takes {_TRITON_DTYPES})"
        return reason

    def cuda_ok():
        reason = _backend.cuda_reason(x.device)
        if reason is None and x.dtype not in _CUDA_DTYPES:
            reason = f"dtype {x.dtype} (CUDA kernel takes {_CUDA_DTYPES})"
        if reason is None:
            from .cuda import fits
            if not fits(x.shape):
                reason = f"shape {tuple(x.shape)} exceeds the CUDA kernel's int32 tile indexing"
        return reason

    # auto prefers Triton: it measures faster than the CUDA kernel here (bench/NOTES.md, run 1)
    return _backend.resolve("linear_scan", backend,
                            {"cuda": cuda_ok, "triton": triton_ok, "reference": lambda: None},
                            order=("triton", "cuda", "reference"))


# ---- registered ops (a, b contiguous of any rank >= 2, time along `dim`; h0 the state shape) ---
# The kernels' canonical layout [P, T, Q] is a view taken inside the op: views of inputs that
# require grad would each add an autograd node (host time in both directions).

def _canon(x: Tensor, dim: int) -> Tensor:
    if x.dim() == 3 and dim == 1:
        return x
    s = x.shape
    return x.view(s[:dim].numel(), s[dim], s[dim + 1:].numel())


def _state_shape(x: Tensor, dim: int):
    return x.shape[:dim] + x.shape[dim + 1:]


_triton_module = None


def _triton():
    global _triton_module
    if _triton_module is None:
        from . import triton as mod
        _triton_module = mod
    return _triton_module


# Two forward ops and two backward ops: the final state (forward) and dh0 (backward) are outputs
# only when someone reads them. Without them the Triton kernels skip those stores (STORE_HT /
# STORE_DH0 off) and nothing is allocated for them (issue 8: one CUDA allocation each on the GPU
# host, and one autograd output fewer); a registered op's schema cannot drop an output per call,
# hence the pairs. The CUDA and reference backends still compute both and the op drops them.
# SKIP_UNREAD=False (SSM_KERNELS_LSCAN_SKIP_UNREAD=0): always the full ops, as before (A/B knob).
SKIP_UNREAD = os.environ.get("SSM_KERNELS_LSCAN_SKIP_UNREAD", "1") != "0"

def _fwd(a: Tensor, b: Tensor, h0: Optional[Tensor], dim: int, reverse: bool, backend: str,
         final: bool):
    chosen = _select(backend, b)
    if chosen == "triton":   # no views: the launcher takes the sizes
        s = b.shape
        return _triton().linear_scan_fwd(a, b, h0, reverse, (s[:dim].numel(), s[dim], s[dim + 1:].numel()),
                                         s[:dim] + s[dim + 1:], final)
    a3, b3 = _canon(a, dim), _canon(b, dim)
    if h0 is not None:
        h0 = h0.reshape(b3.shape[0], b3.shape[2])
    if chosen == "cuda":
        from .cuda import linear_scan_fwd
        h, hT = linear_scan_fwd(a3, b3, h0, reverse)
    else:
        h, hT = linear_scan_fwd_ref(a3, b3, h0, reverse)
        h, hT = h.contiguous(), hT.contiguous()
    return h.view(b.shape), (hT.view(_state_shape(b, dim)) if final else None)


@kernel_op("linear_scan_fwd", mutates_args=())
def linear_scan_fwd_op(a: Tensor, b: Tensor, h0: Optional[Tensor], dim: int, reverse: bool,
                       backend: str) -> Tuple[Tensor, Tensor]:
    return _fwd(a, b, h0, dim, reverse, backend, True)


@linear_scan_fwd_op.register_fake
def _(a, b, h0, dim, reverse, backend):
    return torch.empty_like(b), b.new_empty(_state_shape(b, dim), dtype=state_dtype(b.dtype))


@kernel_op("linear_scan_fwd_h", mutates_args=())
def linear_scan_fwd_h_op(a: Tensor, b: Tensor, h0: Optional[Tensor], dim: int, reverse: bool,
                         backend: str) -> Tensor:
    """linear_scan_fwd without the final state (not written, not allocated)."""
    return _fwd(a, b, h0, dim, reverse, backend, False)[0]


@linear_scan_fwd_h_op.register_fake
def _(a, b, h0, dim, reverse, backend):
    return torch.empty_like(b)


def _bwd(a: Tensor, h: Tensor, h0: Optional[Tensor], dh: Tensor, dhT: Optional[Tensor], dim: int,
         reverse: bool, backend: str, want_dh0: bool):
    chosen = _select(backend, h)
    if chosen == "triton":   # no views: the launcher takes the sizes
        s = h.shape
        return _triton().linear_scan_bwd(a, h, h0, dh, dhT, reverse,
                                         (s[:dim].numel(), s[dim], s[dim + 1:].numel()),
                                         s[:dim] + s[dim + 1:], want_dh0)
    a3, h3, dh3 = _canon(a, dim), _canon(h, dim), _canon(dh, dim)
    P, Q = h3.shape[0], h3.shape[2]
    if h0 is not None:
        h0 = h0.reshape(P, Q)
    dhT = h.new_zeros((P, Q), dtype=state_dtype(h.dtype)) if dhT is None else dhT.reshape(P, Q)
    if chosen == "cuda":
        from .cuda import linear_scan_bwd
        da, db, dh0 = linear_scan_bwd(a3, h3, h0, dh3, dhT, reverse)
    else:
        da, db, dh0 = linear_scan_bwd_ref(a3, h3, h0, dh3, dhT, reverse)
    return (da.view(a.shape), db.view(h.shape),
            dh0.reshape(_state_shape(h, dim)) if want_dh0 else None)


@kernel_op("linear_scan_bwd", mutates_args=())
def linear_scan_bwd_op(a: Tensor, h: Tensor, h0: Optional[Tensor], dh: Tensor,
                       dhT: Optional[Tensor], dim: int, reverse: bool,
                       backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """dhT None: no gradient reaches the final state (the Triton kernel then skips it)."""
    return _bwd(a, h, h0, dh, dhT, dim, reverse, backend, True)


@linear_scan_bwd_op.register_fake
def _(a, h, h0, dh, dhT, dim, reverse, backend):
    return (torch.empty_like(a), torch.empty_like(h),
            h.new_empty(_state_shape(h, dim), dtype=state_dtype(h.dtype)))


@kernel_op("linear_scan_bwd_ab", mutates_args=())
def linear_scan_bwd_ab_op(a: Tensor, h: Tensor, h0: Optional[Tensor], dh: Tensor,
                          dhT: Optional[Tensor], dim: int, reverse: bool,
                          backend: str) -> Tuple[Tensor, Tensor]:
    """linear_scan_bwd without dh0 (no initial state, or it needs no gradient): (da, db)."""
    da, db, _ = _bwd(a, h, h0, dh, dhT, dim, reverse, backend, False)
    return da, db


@linear_scan_bwd_ab_op.register_fake
def _(a, h, h0, dh, dhT, dim, reverse, backend):
    return torch.empty_like(a), torch.empty_like(h)


def _setup_context(ctx, inputs, output):
    a, b, h0, dim, reverse, backend = inputs
    ctx.save_for_backward(a, output[0], h0)
    ctx.dim, ctx.reverse, ctx.backend = dim, reverse, backend


def _setup_context_h(ctx, inputs, output):
    _setup_context(ctx, inputs, (output,))   # the op's one output is h


def _backward(ctx, dh, dhT):
    a, h, h0 = ctx.saved_tensors
    if dh is None:
        dh = torch.zeros_like(h)
    if dhT is not None:
        dhT = dhT.to(state_dtype(h.dtype)).contiguous()
    args = (a, h, h0, dh.contiguous(), dhT, ctx.dim, ctx.reverse, ctx.backend)
    if SKIP_UNREAD and (h0 is None or not ctx.needs_input_grad[2]):   # nobody reads dh0
        da, db = linear_scan_bwd_ab_op(*args)
        return da, db, None, None, None, None
    da, db, dh0 = linear_scan_bwd_op(*args)
    return da, db, (None if h0 is None else dh0.to(h0.dtype)), None, None, None


def _backward_h(ctx, dh):
    return _backward(ctx, dh, None)


linear_scan_fwd_op.register_autograd(_backward, setup_context=_setup_context)
linear_scan_fwd_h_op.register_autograd(_backward_h, setup_context=_setup_context_h)


# ---- validation (once per metadata key) ----------------------------------------------------------

_checked: dict = {}


def _check(a, b, initial_state, dim, backend):
    """Every argument check of linear_scan; returns (dim in [0, rank), normalised backend). Only
    metadata is read (types, shapes, dtypes, devices), so the result is cached on it."""
    check_tensor("linear_scan", "a", a, min_rank=2)
    check_tensor("linear_scan", "b", b, min_rank=2)
    check_dtype("linear_scan", "a", a, floating=True, complex_ok=True)
    if b.dtype != a.dtype:
        raise TypeError(f"linear_scan: b must have a's dtype {a.dtype}, got {b.dtype}")
    if b.shape != a.shape:
        raise ValueError(f"linear_scan: b must have a's shape {tuple(a.shape)}, got {tuple(b.shape)}")
    if not isinstance(dim, int) or not -a.dim() <= dim < a.dim():
        raise ValueError(f"linear_scan: dim must be an int in [{-a.dim()}, {a.dim() - 1}] for a "
                         f"rank-{a.dim()} input, got {dim!r}")
    check_same_device("linear_scan", a=a, b=b, initial_state=initial_state)
    dim = dim % a.dim()
    T = a.shape[dim]
    if T == 0:
        raise ValueError("linear_scan: the time axis (dim) must have length >= 1, got 0")
    state_shape = a.shape[:dim] + a.shape[dim + 1:]
    if initial_state is not None:
        check_tensor("linear_scan", "initial_state", initial_state)
        check_dtype("linear_scan", "initial_state", initial_state, floating=True, complex_ok=a.is_complex())
        if initial_state.is_complex() and not a.is_complex():
            raise TypeError("linear_scan: initial_state is complex but a and b are real")
        if initial_state.shape != state_shape:
            raise ValueError(f"linear_scan: initial_state must have shape {tuple(state_shape)} (a's "
                             f"shape without dim={dim}), got {tuple(initial_state.shape)}")
    return dim, _backend.normalize(backend)


# ---- public function ------------------------------------------------------------------------

def linear_scan(a: Tensor, b: Tensor, initial_state: Optional[Tensor] = None, *, dim: int = 1,
                reverse: bool = False, output_final_state: bool = False,
                backend: Optional[str] = None, process_group=None):
    """First-order diagonal linear recurrence ``h_t = a_t * h_{t-1} + b_t`` along ``dim``.

    The core of minGRU, Griffin's RG-LRU, LRU and S5-style layers; channels are independent.

    Args:
        a: decay/gate, any shape of rank >= 2 with time along ``dim`` (e.g. ``[B, T, D]`` with
            dim=1 or ``[B, D, T]`` with dim=-1); float32, float16, bfloat16 or complex64 (float64
            and complex128 on the reference backend). Any value (|a| <= 1 is the stable regime).
        b: input, same shape and dtype as ``a``.
        initial_state: ``h_{-1}``, the shape of ``a`` without ``dim``; float (complex for complex
            inputs), cast to the float32 (complex64) state. Differentiable. Default zeros.
        dim: the time axis, like ``torch.cumsum``.
        reverse: scan right to left, ``h_t = a_t * h_{t+1} + b_t`` (initial_state enters at the
            last step, final_state is ``h_0``).
        output_final_state: also return the last state.
        backend: ``None`` (env SSM_KERNELS_BACKEND, default "auto"), "auto", "cuda", "triton" or
            "reference". An explicit backend that cannot serve the call raises.
        process_group: a ``torch.distributed.ProcessGroup``: context parallelism, the time axis is
            this rank's segment of one sequence split over the group (see ssm_kernels.distributed).

    Returns:
        ``h`` of ``b``'s shape and dtype, or ``(h, final_state)`` with ``final_state`` the shape of
        ``a`` without ``dim`` in float32 (complex64 for complex inputs), differentiable.

    Example:
        >>> import torch, ssm_kernels
        >>> a = torch.rand(2, 100, 8)            # [B, T, D] decays in (0, 1)
        >>> b = torch.randn(2, 100, 8)
        >>> h, last = ssm_kernels.linear_scan(a, b, output_final_state=True)
        >>> h.shape, last.shape
        (torch.Size([2, 100, 8]), torch.Size([2, 8]))
    """
    if process_group is not None:
        from ..distributed import cp_linear_scan
        return cp_linear_scan(a, b, initial_state, dim=dim, reverse=reverse,
                              output_final_state=output_final_state, backend=backend,
                              process_group=process_group)
    try:   # tensors' metadata -> (dim, backend) of an earlier call that passed every check
        key = (a.shape, a.dtype, a.device, b.shape, b.dtype, b.device, dim, backend,
               None if initial_state is None else (initial_state.shape, initial_state.dtype,
                                                  initial_state.device))
        dim_, bk = _checked[key]
    except (KeyError, AttributeError, TypeError):
        dim_, bk = _check(a, b, initial_state, dim, backend)   # raises unless all are tensors
        if len(_checked) > 4096:
            _checked.clear()
        _checked[key] = (dim_, bk)
    if output_final_state or not SKIP_UNREAD:
        out = linear_scan_fwd_op(a.contiguous(), b.contiguous(), initial_state, dim_, bool(reverse), bk)
        return out if output_final_state else out[0]
    # no final state requested: an op (and autograd node) with h alone, hT never allocated
    return linear_scan_fwd_h_op(a.contiguous(), b.contiguous(), initial_state, dim_, bool(reverse), bk)
