"""The delta rule (DeltaNet, Gated DeltaNet): registered ops -> autograd -> the public functions.

Registered ops (contiguous tensors; g float32/float64 [B, T, HV] or None):
``ssm_kernels::delta_rule_fwd(q, k, v, g, beta, h0, cu_seqlens, scale, use_l2norm, chunked,
backend, save_wy=False) -> (o, final_state, wy_t)``, ``ssm_kernels::delta_rule_bwd(..., backend,
wy_t=None) -> (dq, dk, dv, dg, dbeta, dh0)`` (wy_t: the chunked WY forward's inverse T, float32
[B*T, HV, BT], kept for the backward when save_wy and `chunk.SAVE_WY_INVERSE`; with
`chunk.SAVE_STATES` a 1-d float32 buffer holding T and the forward's states, `chunk.saved_shape`;
else empty)
and the in-place decoding update ``ssm_kernels::delta_rule_step_(..., state, ...) -> o`` (mutates
state).

Triton backend: with CHUNKED_WY on (the default since they passed the H100 check of session 5;
env SSM_KERNELS_DELTA_CHUNKED=0 turns it off) the chunk_* forms (chunked=True) run the chunked WY
kernels on the shared engine (`delta_rule/chunk.py`, forward and backward, K <= 256); with it off
chunk_* run the step-by-step kernels, as before; the fused_recurrent_* forms and decoding always
run the step-by-step kernels (`delta_rule/triton.py`), whose backward holds a head's whole state in
one program (K, V <= 128; larger heads use the reference's explicit reverse-time loop).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backend
from .._ops import cached_on_metadata, kernel_op
from ..validation import (check_cu_seqlens, check_log_decay, check_qkv, check_same_device,
                          check_tensor, checks_values)
from .reference import delta_rule_bwd_ref, delta_rule_recurrent_ref, state_dtype

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
MAX_BWD_HEAD_DIM = 128   # the Triton backward holds a head's whole [K, V] state
# chunk_* on Triton: the chunked WY kernels (True, default) or the step-by-step kernels (False)
CHUNKED_WY = os.environ.get("SSM_KERNELS_DELTA_CHUNKED", "1") != "0"


@cached_on_metadata
def _select(backend: str, q: Tensor, v: Tensor) -> str:
    def triton_ok():
        reason = _backend.triton_reason(q.device)
        if reason is None and q.dtype not in _TRITON_DTYPES:
            reason = f"dtype {q.dtype} (the Triton kernels take {_TRITON_DTYPES})"
        if reason is None and q.shape[-1] > MAX_HEAD_DIM:
            reason = f"K={q.shape[-1]} (the Triton kernels take K <= {MAX_HEAD_DIM})"
        return reason

    return _backend.resolve("delta_rule", backend, {"triton": triton_ok, "reference": lambda: None})


# ---- registered ops -------------------------------------------------------------------------

@kernel_op("delta_rule_fwd", mutates_args=())
def delta_rule_fwd_op(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], beta: Tensor,
                      h0: Optional[Tensor], cu_seqlens: Optional[Tensor], scale: float,
                      use_l2norm: bool, chunked: bool, backend: str,
                      save_wy: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """save_wy (gradients will be taken; `chunk.SAVE_WY_INVERSE` read by the caller): the chunked
    Triton path returns its WY inverse T as the third output (empty otherwise)."""
    if _select(backend, q, v) == "triton":
        if chunked:
            from .chunk import chunk_delta_fwd
            return chunk_delta_fwd(q, k, v, g, beta, h0, cu_seqlens, scale, use_l2norm, save_wy)
        from .triton import recurrent_fwd
        o, ht = recurrent_fwd(q, k, v, g, beta, h0, cu_seqlens, scale, use_l2norm)
        return o, ht, q.new_empty(0, dtype=torch.float32)
    with torch.no_grad():
        o, ht = delta_rule_recurrent_ref(q, k, v, g, beta, scale, h0, cu_seqlens, use_l2norm)
    return o.contiguous(), ht.contiguous(), q.new_empty(0, dtype=torch.float32)


def _n_seqs(q, cu_seqlens):
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


@delta_rule_fwd_op.register_fake
def _(q, k, v, g, beta, h0, cu_seqlens, scale, use_l2norm, chunked, backend, save_wy=False):
    N = _n_seqs(q, cu_seqlens)
    if save_wy and chunked and _select(backend, q, v) == "triton":
        from .chunk import saved_shape
        wy_t = q.new_empty(saved_shape(q, v, cu_seqlens), dtype=torch.float32)
    else:
        wy_t = q.new_empty(0, dtype=torch.float32)
    return (torch.empty_like(v), q.new_empty((N, v.shape[2], q.shape[3], v.shape[3]),
                                             dtype=state_dtype(q.dtype)), wy_t)


@kernel_op("delta_rule_bwd", mutates_args=())
def delta_rule_bwd_op(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], beta: Tensor,
                      h0: Optional[Tensor], cu_seqlens: Optional[Tensor], scale: float,
                      use_l2norm: bool, chunked: bool, do: Tensor, dht: Optional[Tensor],
                      backend: str, wy_t: Optional[Tensor] = None
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, dg, dbeta, dh0); dg is empty when g is None; dh0 [N, HV, K, V] in the
    state dtype. wy_t: None/empty, or the forward's saved WY inverse (the chunked Triton backward
    then skips its WY recompute). Triton: the chunked WY backward (chunked), else the
    step-by-step backward kernel for K, V <= 128 (the whole state of a head in one program), else
    the reference's explicit backward."""
    tri = _select(backend, q, v) == "triton"
    if tri and chunked:
        from .chunk import chunk_delta_bwd
        dq, dk, dv, dg, dbeta, dh0 = chunk_delta_bwd(q, k, v, g, beta, h0, cu_seqlens, scale,
                                                     use_l2norm, do, dht, wy_t)
    elif tri and max(q.shape[-1], v.shape[-1]) <= MAX_BWD_HEAD_DIM:
        from .triton import recurrent_bwd
        dq, dk, dv, dg, dbeta, dh0 = recurrent_bwd(q, k, v, g, beta, h0, cu_seqlens, scale,
                                                   use_l2norm, do, dht)
    else:
        dq, dk, dv, dg, dbeta, dh0 = delta_rule_bwd_ref(q, k, v, g, beta, h0, cu_seqlens, scale,
                                                        use_l2norm, do, dht)
    dg = q.new_empty(0, dtype=torch.float32) if dg is None else dg.to(g.dtype)
    return (dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous(),
            dg.contiguous(), dbeta.to(beta.dtype).contiguous(), dh0.contiguous())


@delta_rule_bwd_op.register_fake
def _(q, k, v, g, beta, h0, cu_seqlens, scale, use_l2norm, chunked, do, dht, backend, wy_t=None):
    N = _n_seqs(q, cu_seqlens)
    dg = q.new_empty(0, dtype=torch.float32) if g is None else torch.empty_like(g)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dg,
            torch.empty_like(beta),
            q.new_empty((N, v.shape[2], q.shape[3], v.shape[3]), dtype=state_dtype(q.dtype)))


def _setup_context(ctx, inputs, output):
    q, k, v, g, beta, h0, cu_seqlens, scale, use_l2norm, chunked, backend, _ = inputs
    ctx.save_for_backward(q, k, v, g, beta, h0, cu_seqlens, output[2])
    ctx.scale, ctx.use_l2norm, ctx.chunked, ctx.backend = scale, use_l2norm, chunked, backend


def _backward(ctx, do, dht, _dwy_t):
    q, k, v, g, beta, h0, cu_seqlens, wy_t = ctx.saved_tensors
    do = torch.zeros_like(v) if do is None else do.contiguous()
    dht = None if dht is None else dht.contiguous()
    dq, dk, dv, dg, dbeta, dh0 = delta_rule_bwd_op(q, k, v, g, beta, h0, cu_seqlens, ctx.scale,
                                                   ctx.use_l2norm, ctx.chunked, do, dht,
                                                   ctx.backend, wy_t)
    return (dq, dk, dv, None if g is None else dg, dbeta,
            None if h0 is None else dh0.to(h0.dtype), None, None, None, None, None, None)


delta_rule_fwd_op.register_autograd(_backward, setup_context=_setup_context)


@kernel_op("delta_rule_step_", mutates_args=("state",))
def delta_rule_step_op(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], beta: Tensor,
                       state: Tensor, cu_seqlens: Optional[Tensor], scale: float,
                       use_l2norm: bool, backend: str) -> Tensor:
    """Decoding update in place: runs the steps from `state` and writes the final state back into
    it (float32 [N, HV, K, V], contiguous). q, k, v may be strided views (e.g. of a fused qkv
    projection): the Triton kernel reads them in place (no copy launches). Returns o (contiguous).
    Not differentiable."""
    if _select(backend, q, v) == "triton":
        from .triton import recurrent_fwd
        o, _ = recurrent_fwd(q, k, v, g, beta, state, cu_seqlens, scale, use_l2norm, ht=state)
        return o
    with torch.no_grad():
        o, ht = delta_rule_recurrent_ref(q, k, v, g, beta, scale, state, cu_seqlens, use_l2norm)
    state.copy_(ht)
    return o.contiguous()


@delta_rule_step_op.register_fake
def _(q, k, v, g, beta, state, cu_seqlens, scale, use_l2norm, backend):
    return v.new_empty(v.shape)   # contiguous, as both backends return it


# ---- validation -----------------------------------------------------------------------------

def _validate(fn, q, k, v, g, beta, scale, initial_state, cu_seqlens, gated: bool) -> int:
    """Every argument check; returns N. Metadata checks memoised (`_validate_meta`); value checks
    (g <= 0, beta in [0, 2], cu_seqlens' offsets) on every call where `checks_values` allows."""
    N = _validate_meta(fn, q, k, v, g, beta, scale, initial_state, cu_seqlens, gated)
    if gated:
        check_log_decay(fn, "g", g)
    if checks_values(beta):
        lo, hi = (float(x) for x in beta.detach().aminmax())   # NaN reaches both
        if not (0.0 <= lo and hi <= 2.0):
            raise ValueError(f"{fn}: beta must lie in [0, 2] (the update I - beta k k^T of a unit "
                             f"key is then a contraction), got values in [{lo:.4g}, {hi:.4g}]")
    if cu_seqlens is not None:
        check_cu_seqlens(fn, cu_seqlens, q.shape[0], q.shape[1])
    return N


@cached_on_metadata(typed=True)
def _validate_meta(fn, q, k, v, g, beta, scale, initial_state, cu_seqlens, gated: bool) -> int:
    check_qkv(fn, q, k, v, _DTYPES)
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    if k.shape != q.shape:
        raise ValueError(f"{fn}: k must have q's shape [B, T, H, K] = {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if v.shape[:2] != q.shape[:2]:
        raise ValueError(f"{fn}: v must have shape [B, T, HV, V] with q's B, T = "
                         f"{tuple(q.shape[:2])}, got {tuple(v.shape)}")
    if T == 0 or K == 0 or V == 0 or H == 0 or HV == 0:
        raise ValueError(f"{fn}: q and v need T, H, K, HV, V >= 1, got q {tuple(q.shape)}, "
                         f"v {tuple(v.shape)}")
    if HV % H != 0:
        raise ValueError(f"{fn}: v's head count HV={HV} must be a multiple of q/k's head count "
                         f"H={H} (grouped value heads), got HV % H = {HV % H}")
    if gated:
        if g is None:
            raise ValueError(f"{fn}: g ([B, T, HV] log-decays) is required")
        check_tensor(fn, "g", g)
        if tuple(g.shape) != (B, T, HV):
            raise ValueError(f"{fn}: g must have shape [B, T, HV] = {(B, T, HV)}, got "
                             f"{tuple(g.shape)}")
        if not g.is_floating_point():
            raise TypeError(f"{fn}: g must have a floating dtype, got {g.dtype}")
    check_tensor(fn, "beta", beta)
    if tuple(beta.shape) != (B, T, HV):
        extra = (" (per-value-channel beta [B, T, HV, V] is not supported)"
                 if beta.dim() == 4 else "")
        raise ValueError(f"{fn}: beta must have shape [B, T, HV] = {(B, T, HV)}, got "
                         f"{tuple(beta.shape)}{extra}")
    if not beta.is_floating_point():
        raise TypeError(f"{fn}: beta must have a floating dtype, got {beta.dtype}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"{fn}: scale must be a float or None, got {type(scale).__name__}")
    N = B
    if cu_seqlens is not None:
        N = check_cu_seqlens(fn, cu_seqlens, B, T, values=False)
    if initial_state is not None:
        check_tensor(fn, "initial_state", initial_state)
        expect = (N, HV, K, V)
        if tuple(initial_state.shape) != expect:
            raise ValueError(f"{fn}: initial_state must have shape [N, HV, K, V] = {expect} (N = "
                             f"{'len(cu_seqlens) - 1' if cu_seqlens is not None else 'B'}), got "
                             f"{tuple(initial_state.shape)}")
        if not initial_state.is_floating_point():
            raise TypeError(f"{fn}: initial_state must have a floating dtype, got "
                            f"{initial_state.dtype}")
    check_same_device(fn, q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state,
                      cu_seqlens=cu_seqlens)
    return N


def _delta_rule(fn, q, k, v, g, beta, scale, initial_state, output_final_state, use_l2norm,
                cu_seqlens, backend, gated, inplace_final_state=False):
    _validate(fn, q, k, v, g, beta, scale, initial_state, cu_seqlens, gated)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    sd = state_dtype(q.dtype)
    if not inplace_final_state:   # decoding reads strided q/k/v in place (recurrent_fwd)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    beta = beta.contiguous()
    g = None if g is None else g.to(sd).contiguous()
    backend = _backend.normalize(backend)
    if inplace_final_state:
        s = initial_state
        if s is None or s.dtype != sd or not s.is_contiguous():
            got = ("None" if s is None else
                   f"{s.dtype}, {'contiguous' if s.is_contiguous() else 'strided'}")
            raise ValueError(f"{fn}: inplace_final_state=True needs a contiguous {sd} "
                             f"initial_state [N, HV, K, V] to update, got {got}")
        if torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                           for x in (q, k, v, g, beta, s)):
            raise ValueError(f"{fn}: inplace_final_state=True is for decoding and not "
                             f"differentiable; run it under torch.no_grad() or with inputs that "
                             f"do not require grad")
        o = delta_rule_step_op(q, k, v, g, beta, s, cu_seqlens, scale, bool(use_l2norm), backend)
        return o, s
    h0 = None if initial_state is None else initial_state.to(sd).contiguous()
    chunked = CHUNKED_WY and fn.startswith("chunk")
    save_wy = chunked and _save_wy_inverse() and torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, g, beta, h0))
    o, ht, _ = delta_rule_fwd_op(q, k, v, g, beta, h0, cu_seqlens, scale, bool(use_l2norm),
                                 chunked, backend, save_wy)
    return o, (ht if output_final_state else None)


def _save_wy_inverse() -> bool:
    """`chunk.SAVE_WY_INVERSE`, read per call (a knob the GPU A/B flips); the chunk module (Triton)
    is imported only when it is loaded already or Triton is importable."""
    try:
        from . import chunk
    except ImportError:
        return False
    return chunk.SAVE_WY_INVERSE


# ---- public functions -------------------------------------------------------------------------

_ARGS_DOC = """
    q, k: ``[B, T, H, K]`` queries and keys; float32, float16, bfloat16 (float64 on the reference
        backend); K <= 256 on the Triton backend. Keys should be L2-normalised (or pass
        ``use_qk_l2norm_in_kernel=True``) for the recurrence to stay bounded.
    v: ``[B, T, HV, V]`` values, q's dtype; HV % H == 0 (grouped value heads: value head j uses
        q/k head ``j // (HV // H)``).
    beta: ``[B, T, HV]`` writing strengths in [0, 2] (any float dtype). Differentiable.
    scale: multiplies ``q``; default ``K ** -0.5``.
    initial_state: ``[N, HV, K, V]`` state before the first step (N = B, or the number of sequences
        with ``cu_seqlens``); any float dtype, used in float32. Differentiable. Default zeros.
    output_final_state: return the final state ``[N, HV, K, V]`` float32 (differentiable) instead
        of None.
    use_qk_l2norm_in_kernel: L2-normalise q and k over K first (``x / sqrt(|x|^2 + 1e-6)``, as fla),
        with its gradient.
    cu_seqlens: ``[N + 1]`` int32/int64 cumulative lengths of packed sequences (B must be 1);
        every sequence starts from its own initial state and yields its own final state.
    backend: keyword-only. None (env SSM_KERNELS_BACKEND, default "auto"), "auto", "triton" or
        "reference"; an explicit backend that cannot serve the call raises.

    Gradients reach q, k, v, g, beta and initial_state. On the Triton backend the chunk_* forms
    run the chunked WY kernels (chunks of 64 steps, 32 for float32 or K > 128) unless
    SSM_KERNELS_DELTA_CHUNKED=0; with it, and always for the fused_recurrent_* forms, the
    step-by-step kernels (their backward takes K, V <= 128; larger heads use the reference's
    backward loop); both compute the same recurrence."""

_DECODE_DOC = """
    inplace_final_state: keyword-only. True: write the final state into ``initial_state`` (which
        must be a contiguous float32 tensor, float64 for float64 inputs) and return it as the
        state; for decoding, not differentiable, no allocation, CUDA-graph capture safe."""

_CP_DOC = """
    process_group: keyword-only ``torch.distributed.ProcessGroup``: context parallelism, T is this
        rank's segment of one sequence split over the group (see ssm_kernels.distributed); the
        segment summary is the [K, K] transition and the end state (cu_seqlens refused)."""

_GATE_DOC = """
    g: ``[B, T, HV]`` log-decays, <= 0 (any float dtype; used in float32). Differentiable."""


def chunk_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                           scale: Optional[float] = None, initial_state: Optional[Tensor] = None,
                           output_final_state: bool = False, use_qk_l2norm_in_kernel: bool = False,
                           cu_seqlens: Optional[Tensor] = None, *, backend: Optional[str] = None,
                           process_group=None):
    """Gated DeltaNet (drop-in for ``fla.ops.gated_delta_rule.chunk_gated_delta_rule``):
    ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, ``o_t = scale S_t^T q_t``
    (S is ``[K, V]`` per value head).

    Args:{args}{gate}{cp}

    Returns:
        ``(o [B, T, HV, V] in v's dtype, final_state [N, HV, K, V] float32 or None)``.

    Example:
        >>> import torch, torch.nn.functional as F, ssm_kernels
        >>> q, k = torch.randn(2, 2, 50, 2, 16).unbind(0)           # [B, T, H, K]
        >>> v = torch.randn(2, 50, 4, 32)                          # [B, T, HV, V], HV = 2 H
        >>> g, beta = F.logsigmoid(torch.randn(2, 50, 4)), torch.rand(2, 50, 4)
        >>> o, S = ssm_kernels.chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True,
        ...                                           use_qk_l2norm_in_kernel=True)
        >>> o.shape, S.shape
        (torch.Size([2, 50, 4, 32]), torch.Size([2, 4, 16, 32]))
    """
    if process_group is not None:
        from ..distributed import cp_chunk_gated_delta_rule
        return cp_chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state,
                                         output_final_state, use_qk_l2norm_in_kernel, cu_seqlens,
                                         backend=backend, process_group=process_group)
    return _delta_rule("chunk_gated_delta_rule", q, k, v, g, beta, scale, initial_state,
                       output_final_state, use_qk_l2norm_in_kernel, cu_seqlens, backend, True)


def chunk_delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, scale: Optional[float] = None,
                     initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                     use_qk_l2norm_in_kernel: bool = False, cu_seqlens: Optional[Tensor] = None, *,
                     backend: Optional[str] = None, process_group=None):
    """DeltaNet, no decay (drop-in for ``fla.ops.delta_rule.chunk_delta_rule``):
    ``S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, ``o_t = scale S_t^T q_t``.

    Args:{args}{cp}

    Returns:
        ``(o [B, T, HV, V] in v's dtype, final_state [N, HV, K, V] float32 or None)``.

    Example:
        >>> import torch, ssm_kernels
        >>> q, k, v = torch.randn(3, 2, 50, 4, 32).unbind(0)
        >>> beta = torch.rand(2, 50, 4)
        >>> o, S = ssm_kernels.chunk_delta_rule(q, k, v, beta, use_qk_l2norm_in_kernel=True,
        ...                                     output_final_state=True)
    """
    if process_group is not None:
        from ..distributed import cp_chunk_delta_rule
        return cp_chunk_delta_rule(q, k, v, beta, scale, initial_state, output_final_state,
                                   use_qk_l2norm_in_kernel, cu_seqlens, backend=backend,
                                   process_group=process_group)
    return _delta_rule("chunk_delta_rule", q, k, v, None, beta, scale, initial_state,
                       output_final_state, use_qk_l2norm_in_kernel, cu_seqlens, backend, False)


def _default_beta(q, v, beta):
    if beta is None and isinstance(v, Tensor) and v.dim() == 4:
        return v.new_ones(v.shape[:3])
    return beta


def fused_recurrent_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor] = None,
                                     beta: Optional[Tensor] = None, scale: Optional[float] = None,
                                     initial_state: Optional[Tensor] = None,
                                     output_final_state: bool = False,
                                     use_qk_l2norm_in_kernel: bool = False,
                                     cu_seqlens: Optional[Tensor] = None, *,
                                     inplace_final_state: bool = False,
                                     backend: Optional[str] = None):
    """The step-by-step form of `chunk_gated_delta_rule` for decoding (drop-in for
    ``fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule``; fla's newer ``gk``/``gv``
    gates are not supported). Same results as the chunked form.

    Args:{args}{decode}
    g: ``[B, T, HV]`` log-decays, <= 0, or None (no decay).
    beta: as above, or None for ones (as fla).

    Returns:
        ``(o [B, T, HV, V], final_state or None)`` (with inplace_final_state, the updated
        ``initial_state``).

    Example:
        >>> import torch, torch.nn.functional as F, ssm_kernels
        >>> q, k = F.normalize(torch.randn(2, 2, 1, 2, 16), dim=-1).unbind(0)   # one step
        >>> v, S = torch.randn(2, 1, 4, 32), torch.zeros(2, 4, 16, 32)
        >>> g, beta = F.logsigmoid(torch.randn(2, 1, 4)), torch.rand(2, 1, 4)
        >>> o, S = ssm_kernels.fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=S,
        ...                                                     inplace_final_state=True)
    """
    return _delta_rule("fused_recurrent_gated_delta_rule", q, k, v, g, _default_beta(q, v, beta),
                       scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                       cu_seqlens, backend, g is not None, inplace_final_state)


def fused_recurrent_delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Optional[Tensor] = None,
                               scale: Optional[float] = None,
                               initial_state: Optional[Tensor] = None,
                               output_final_state: bool = False,
                               use_qk_l2norm_in_kernel: bool = False,
                               cu_seqlens: Optional[Tensor] = None, *,
                               inplace_final_state: bool = False, backend: Optional[str] = None):
    """The step-by-step form of `chunk_delta_rule` for decoding (drop-in for
    ``fla.ops.delta_rule.fused_recurrent_delta_rule``). Same results as the chunked form.

    Args:{args}{decode}
    beta: as above, or None for ones (as fla).

    Returns:
        ``(o [B, T, HV, V], final_state or None)``.

    Example:
        >>> import torch, ssm_kernels
        >>> q, k, v = torch.randn(3, 2, 1, 4, 32).unbind(0)
        >>> o, S = ssm_kernels.fused_recurrent_delta_rule(q, k, v, torch.rand(2, 1, 4),
        ...                                               use_qk_l2norm_in_kernel=True,
        ...                                               output_final_state=True)
    """
    return _delta_rule("fused_recurrent_delta_rule", q, k, v, None, _default_beta(q, v, beta),
                       scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                       cu_seqlens, backend, False, inplace_final_state)


for _f in (chunk_gated_delta_rule, chunk_delta_rule, fused_recurrent_gated_delta_rule,
           fused_recurrent_delta_rule):
    _f.__doc__ = (_f.__doc__.replace("{args}", _ARGS_DOC).replace("{gate}", _GATE_DOC)
                  .replace("{decode}", _DECODE_DOC).replace("{cp}", _CP_DOC))
del _f
