"""Based: registered ops -> autograd -> the documented public functions."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backend
from .._ops import cached_on_metadata, kernel_op
from ..validation import (check_cu_seqlens, check_dtype, check_same_device, check_tensor,
                          empty_result)
from .reference import based_bwd_ref, based_parallel_ref, feature_dim, state_dtype

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_MAX_K = 128


@cached_on_metadata
def _select(backend: str, q: Tensor) -> str:
    def triton_ok():
        reason = _backend.triton_reason(q.device)
        if reason is None and q.dtype not in _TRITON_DTYPES:
            reason = f"dtype {q.dtype} (Triton kernel takes {_TRITON_DTYPES})"
        if reason is None and q.shape[-1] > _TRITON_MAX_K:
            reason = f"K = {q.shape[-1]} (Triton kernel takes K <= {_TRITON_MAX_K})"
        return reason

    return _backend.resolve("chunk_based", backend, {"triton": triton_ok, "reference": lambda: None})


def _empty_state(q: Tensor) -> Tensor:
    return q.new_empty((0,), dtype=state_dtype(q.dtype))


# ---- registered ops (q, k [B, T, H, K], v [B, T, H, V] contiguous; states [N, H, D, V+1]) ----

@kernel_op("based_fwd", mutates_args=())
def based_fwd_op(q: Tensor, k: Tensor, v: Tensor, h0: Optional[Tensor], scale: float,
                 use_norm: bool, cu_seqlens: Optional[Tensor], store_final: bool, step: bool,
                 backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (o [B, T, H, V] in v's dtype, z [B, T, H] normaliser in the state dtype,
    final state [N, H, D, V+1] in the state dtype, or an empty tensor if not store_final).
    `step`: the token-by-token kernel (fused_recurrent_based) instead of the chunked one."""
    if _select(backend, q) == "triton":
        from .triton import based_fwd
        return based_fwd(q, k, v, h0, scale, use_norm, cu_seqlens, store_final, step)
    o, hT, z = based_parallel_ref(q, k, v, scale, use_norm, h0, store_final, cu_seqlens,
                                  return_z=True)
    return o.contiguous(), z.contiguous(), hT.contiguous() if store_final else _empty_state(q)


@based_fwd_op.register_fake
def _(q, k, v, h0, scale, use_norm, cu_seqlens, store_final, step, backend):
    B, T, H, K = q.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    sd = state_dtype(q.dtype)
    hT = q.new_empty((N, H, feature_dim(K), v.shape[-1] + 1) if store_final else (0,), dtype=sd)
    return torch.empty_like(v), q.new_empty((B, T, H), dtype=sd), hT


@kernel_op("based_bwd", mutates_args=())
def based_bwd_op(q: Tensor, k: Tensor, v: Tensor, o: Tensor, z: Tensor, h0: Optional[Tensor],
                 do: Tensor, dhT: Optional[Tensor], scale: float, use_norm: bool,
                 cu_seqlens: Optional[Tensor], backend: str
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, dh0 or an empty tensor when h0 is None)."""
    if _select(backend, q) == "triton":
        from .triton import based_bwd
        return based_bwd(q, k, v, o, z, h0, do, dhT, scale, use_norm, cu_seqlens)
    dq, dk, dv, dh0 = based_bwd_ref(q, k, v, scale, use_norm, h0, do, dhT, cu_seqlens)
    dh0 = _empty_state(q) if dh0 is None else dh0
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dh0.contiguous()


@based_bwd_op.register_fake
def _(q, k, v, o, z, h0, do, dhT, scale, use_norm, cu_seqlens, backend):
    dh0 = torch.empty_like(h0) if h0 is not None else q.new_empty((0,), dtype=state_dtype(q.dtype))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dh0


def _setup_context(ctx, inputs, output):
    q, k, v, h0, scale, use_norm, cu_seqlens, store_final, step, backend = inputs
    o, z, _ = output
    ctx.save_for_backward(q, k, v, o, z, h0, cu_seqlens)
    ctx.scale, ctx.use_norm, ctx.store_final, ctx.backend = scale, use_norm, store_final, backend
    ctx.mark_non_differentiable(z)


def _backward(ctx, do, dz, dhT):
    q, k, v, o, z, h0, cu_seqlens = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    if not ctx.store_final:
        dhT = None
    dq, dk, dv, dh0 = based_bwd_op(q, k, v, o, z, h0, do.contiguous(),
                                   None if dhT is None else dhT.contiguous(), ctx.scale,
                                   ctx.use_norm, cu_seqlens, ctx.backend)
    return dq, dk, dv, (None if h0 is None else dh0), None, None, None, None, None, None


based_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---- public functions -----------------------------------------------------------------------

def _validate(name: str, q, k, v, scale, initial_state, cu_seqlens):
    for arg, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, arg, x, rank=4)
        check_dtype(name, arg, x, floating=True)
    if k.shape != q.shape:
        raise ValueError(f"{name}: k must have q's shape [B, T, H, K] = {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{name}: v must have q's [B, T, H] = {tuple(q.shape[:3])} as its first "
                         f"three dims, got {tuple(v.shape)}")
    for arg, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name}: {arg} must have q's dtype {q.dtype}, got {x.dtype}")
    check_same_device(name, q=q, k=k, v=v, initial_state=initial_state, cu_seqlens=cu_seqlens)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if T == 0 or K == 0 or V == 0 or H == 0:
        raise ValueError(f"{name}: q and v must have nonzero sizes, got q {tuple(q.shape)} and "
                         f"v {tuple(v.shape)}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"{name}: scale must be a positive float or None, got {scale!r}")
    N = B
    if cu_seqlens is not None:
        N = check_cu_seqlens(name, cu_seqlens, B, T)
    if initial_state is not None:
        check_tensor(name, "initial_state", initial_state, rank=4)
        check_dtype(name, "initial_state", initial_state, floating=True)
        want = (N, H, feature_dim(K), V + 1)
        if tuple(initial_state.shape) != want:
            raise ValueError(f"{name}: initial_state must have shape [N, H, 1+K+K*K, V+1] = "
                             f"{want}, got {tuple(initial_state.shape)}")
    return K ** -0.5 if scale is None else float(scale)


def _based(name, q, k, v, scale, use_norm, initial_state, output_final_state, cu_seqlens, backend,
           step=False):
    scale = _validate(name, q, k, v, scale, initial_state, cu_seqlens)
    if q.shape[0] == 0:  # an empty batch: nothing to launch; zero gradients
        B, T, H, K = q.shape
        o = empty_result((0, T, H, v.shape[3]), v, q, k, v, initial_state)
        hT = empty_result((0, H, feature_dim(K), v.shape[3] + 1), q, q, k, v, initial_state,
                          dtype=state_dtype(q.dtype))
        return o, (hT if output_final_state else None)
    h0 = None if initial_state is None else initial_state.to(state_dtype(q.dtype)).contiguous()
    o, _, hT = based_fwd_op(q.contiguous(), k.contiguous(), v.contiguous(), h0, scale,
                            bool(use_norm), cu_seqlens, bool(output_final_state), step,
                            _backend.normalize(backend))
    return o, (hT if output_final_state else None)


def chunk_based(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None,
                use_norm: bool = True, initial_state: Optional[Tensor] = None,
                output_final_state: bool = False, cu_seqlens: Optional[Tensor] = None, *,
                backend: Optional[str] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """Based linear attention (second-order Taylor feature map), chunked, linear in T.

    ``phi(x) = [1, c x, (c x)⊗(c x)/sqrt(2)]`` with ``c = sqrt(scale)`` so that
    ``phi(q)·phi(k) = 1 + s q·k + (s q·k)^2 / 2``; ``o_t = sum_{s<=t} (phi(q_t)·phi(k_s)) v_s``,
    divided by ``z_t + 1e-6`` (``z_t`` the same sum without v) when ``use_norm`` — the semantics
    of flash-linear-attention's ``parallel_based`` / ``fused_chunk_based``, plus states and
    packed sequences. The feature map is computed inside the kernel, never stored.

    Args:
        q, k: ``[B, T, H, K]`` float32/float16/bfloat16 (float64 on the reference backend);
            any K (the Triton kernel takes K <= 128; Based uses 16).
        v: ``[B, T, H, V]``, q's dtype, any V. Non-contiguous inputs are copied.
        scale: the factor on ``q·k``; default ``K ** -0.5`` (q and k each scaled by K^-1/4).
        use_norm: divide by the normaliser ``z_t + 1e-6`` (fla's default True).
        initial_state: ``[N, H, 1+K+K*K, V+1]`` (N = B, or the number of sequences with
            cu_seqlens): ``S = sum_t phi(k_t)^T [v_t, 1]`` — rows: 0 the constant feature,
            ``1+i`` first order, ``1+K+i*K+j`` second order; column V the normaliser. Cast to
            float32 (float64 for float64 inputs). Differentiable. Default zeros.
        output_final_state: also return the final state (same layout), differentiable.
        cu_seqlens: ``[N+1]`` int32/int64 offsets of packed sequences (requires B == 1); one
            initial/final state per sequence.
        backend: None (env SSM_KERNELS_BACKEND, default "auto"), "auto", "triton" or "reference".

    Returns:
        ``(o, final_state)``: ``o [B, T, H, V]`` in v's dtype; ``final_state`` as above or None.

    Example:
        >>> import torch, ssm_kernels
        >>> q, k = torch.randn(2, 2, 64, 4, 16).unbind(0)
        >>> v = torch.randn(2, 64, 4, 32)
        >>> o, S = ssm_kernels.chunk_based(q, k, v, output_final_state=True, backend="reference")
        >>> o.shape, S.shape
        (torch.Size([2, 64, 4, 32]), torch.Size([2, 4, 273, 33]))
    """
    return _based("chunk_based", q, k, v, scale, use_norm, initial_state, output_final_state,
                  cu_seqlens, backend)


def fused_recurrent_based(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None,
                          use_norm: bool = True, initial_state: Optional[Tensor] = None,
                          output_final_state: bool = False, cu_seqlens: Optional[Tensor] = None,
                          *, backend: Optional[str] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """The step form of `chunk_based` for decoding one or a few tokens from a state.

    Same arguments, state layout and returns as `chunk_based`; agrees with it (and with the
    float64 recurrence) to rounding: ``S_t = S_{t-1} + phi(k_t)^T [v_t, 1]``,
    ``[o_t, z_t] = phi(q_t) S_t``, one token at a time with the state slice in registers (no
    chunk padding, no tensor-core dots: meant for T of one to a few tokens; use `chunk_based`
    for prefill). Its backward is `chunk_based`'s.

    Example:
        >>> import torch, ssm_kernels
        >>> q, k = torch.randn(2, 1, 1, 4, 16).unbind(0)
        >>> v = torch.randn(1, 1, 4, 32)
        >>> S = torch.zeros(1, 4, 273, 33)
        >>> o, S = ssm_kernels.fused_recurrent_based(q, k, v, initial_state=S,
        ...                                          output_final_state=True, backend="reference")
        >>> o.shape
        torch.Size([1, 1, 4, 32])
    """
    return _based("fused_recurrent_based", q, k, v, scale, use_norm, initial_state,
                  output_final_state, cu_seqlens, backend, step=True)
