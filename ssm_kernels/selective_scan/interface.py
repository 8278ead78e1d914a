"""selective scan (Mamba-1): registered ops -> autograd -> the documented public functions."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _backend
from .._ops import cached_on_metadata, kernel_op
from ..validation import check_cu_seqlens, check_same_device, check_tensor, empty_result
from .reference import (ckpt_rows, selective_scan_bwd_ref, selective_scan_fwd_ref,
                        selective_state_update_ref, state_dtype)

_STORAGE = (torch.float32, torch.float16, torch.bfloat16)
_WEIGHTS = (torch.float32, torch.complex64)
MAX_DSTATE = 256


@cached_on_metadata
def _select(op: str, backend: str, u: Tensor, A: Tensor, cu_seqlens=None,
            cuda_fwd: bool = False) -> str:
    """cuda_fwd: the call is the scan's forward (the one part with a CUDA kernel)."""
    def triton_ok():
        reason = _backend.triton_reason(u.device)
        if reason is None and (u.dtype not in _STORAGE or A.dtype not in _WEIGHTS):
            reason = (f"dtypes u {u.dtype}, A {A.dtype} (the Triton kernel takes u in {_STORAGE} "
                      f"and A in {_WEIGHTS})")
        return reason

    def cuda_ok():
        reason = _backend.cuda_reason(u.device)
        if reason is None:
            from .cuda import reason as cuda_reason
            reason = cuda_reason(u, A, cu_seqlens)
        return reason

    supports = {"triton": triton_ok, "reference": lambda: None}
    if cuda_fwd:
        supports["cuda"] = cuda_ok
    return _backend.resolve(op, backend, supports)


@cached_on_metadata
def _select_bwd(backend: str, u: Tensor, A: Tensor, cu_seqlens=None) -> str:
    """The backward's backend: the forward's, with the Triton backward where the built
    extension lacks the CUDA one."""
    chosen = _select("selective_scan_fn", backend, u, A, cu_seqlens, cuda_fwd=True)
    if chosen == "cuda":
        from .cuda import bwd_reason
        chosen = "cuda" if bwd_reason(u, A, cu_seqlens) is None else "triton"
    return chosen


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


# ---- registered ops (canonical layout: see triton.selective_scan_fwd) ---------------------------

@cached_on_metadata
def _fwd_impl(backend: str, u: Tensor, A: Tensor, cu_seqlens, save_ckpt: bool):
    """The forward's backend function for this metadata, with what depends only on shapes bound
    (the CUDA wrapper's checkpoint spacing and rows): one memo lookup per call instead of the
    backend choice, an import and two shape computations (issue 8)."""
    chosen = _select("selective_scan_fn", backend, u, A, cu_seqlens, cuda_fwd=True)
    if chosen == "cuda":
        from .cuda import planned_fwd
        return planned_fwd(u, A, cu_seqlens, save_ckpt)
    if chosen == "triton":
        from .triton import selective_scan_fwd
        return selective_scan_fwd
    return selective_scan_fwd_ref


@kernel_op("selective_scan_fwd", mutates_args=())
def selective_scan_fwd_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                          D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                          h0: Optional[Tensor], cu_seqlens: Optional[Tensor], delta_softplus: bool,
                          save_ckpt: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    return _fwd_impl(backend, u, A, cu_seqlens, save_ckpt)(
        u, delta, A, B, C, D, z, delta_bias, h0, cu_seqlens, delta_softplus, save_ckpt)


@selective_scan_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, h0, cu_seqlens, delta_softplus, save_ckpt, backend):
    nseq = u.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    sd = state_dtype(u, A)
    rows = ckpt_rows(u.shape[0], u.shape[2], A.shape[1], cu_seqlens) if save_ckpt else 0
    return (torch.empty_like(u), u.new_empty((nseq, u.shape[1], A.shape[1]), dtype=sd),
            u.new_empty((rows, u.shape[1], A.shape[1]), dtype=sd))


@cached_on_metadata
def _bwd_impl(backend: str, u: Tensor, A: Tensor, cu_seqlens):
    """The backward's backend function for this metadata (see _fwd_impl); it returns None for
    absent inputs."""
    chosen = _select_bwd(backend, u, A, cu_seqlens)
    if chosen == "cuda":
        from .cuda import planned_bwd
        return planned_bwd(u, A)
    if chosen == "triton":
        from .triton import selective_scan_bwd
        return lambda *a: [None if g is None else g.contiguous() for g in selective_scan_bwd(*a)]
    return lambda u, delta, A, B, C, D, z, delta_bias, h0, cu_seqlens, ckpt, dout, dlast, sp: [
        None if g is None else g.contiguous() for g in selective_scan_bwd_ref(
            u, delta, A, B, C, D, z, delta_bias, h0, cu_seqlens, sp, dout, dlast)]


@kernel_op("selective_scan_bwd", mutates_args=())
def selective_scan_bwd_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                          D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                          h0: Optional[Tensor], cu_seqlens: Optional[Tensor], ckpt: Tensor,
                          dout: Tensor, dlast: Tensor, delta_softplus: bool,
                          backend: str) -> List[Tensor]:
    """Gradients of (u, delta, A, B, C, D, z, delta_bias, h0); empty tensors for absent inputs.
    Where the backend resolves to cuda the CUDA backward runs (the Triton one if the built
    extension lacks it)."""
    grads = _bwd_impl(backend, u, A, cu_seqlens)(u, delta, A, B, C, D, z, delta_bias, h0,
                                                  cu_seqlens, ckpt, dout, dlast, delta_softplus)
    return [_empty(u) if g is None else g for g in grads]


@selective_scan_bwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, h0, cu_seqlens, ckpt, dout, dlast, delta_softplus,
      backend):
    return [torch.empty_like(x) if x is not None else _empty(u)
            for x in (u, delta, A, B, C, D, z, delta_bias, h0)]


_ZEROS: dict = {}


def _read_only_zeros(like: Tensor, shape: tuple, dtype: torch.dtype) -> Tensor:
    """Zeros that no backend writes (the backward's incoming last-state gradient: the CUDA backward
    reads it, the Triton one clones it), kept per (shape, dtype, device) in eager mode: saves an
    allocation and a memset launch per backward. Fresh zeros while compiling (fake tensors) or
    capturing a CUDA graph (captured zeros hold nothing until the graph replays). Entries are never
    dropped (a captured graph may read one): past 64 shapes, fresh zeros."""
    if torch.compiler.is_compiling() or type(like) is not torch.Tensor or (
            like.is_cuda and torch.cuda.is_current_stream_capturing()):
        return like.new_zeros(shape, dtype=dtype)
    key = (shape, dtype, like.device)
    z = _ZEROS.get(key)
    if z is None:
        z = like.new_zeros(shape, dtype=dtype)
        if len(_ZEROS) < 64:
            _ZEROS[key] = z
    return z


def _setup_context(ctx, inputs, output):
    (u, delta, A, B, C, D, z, delta_bias, h0, cu_seqlens, delta_softplus, save_ckpt,
     backend) = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, h0, cu_seqlens, output[2])
    last = output[1]
    ctx.delta_softplus, ctx.backend, ctx.last_meta = delta_softplus, backend, (last.shape, last.dtype)


def _backward(ctx, dout, dlast, _dckpt):
    u, delta, A, B, C, D, z, delta_bias, h0, cu_seqlens, ckpt = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(u)
    elif not dout.is_contiguous():
        dout = dout.contiguous()
    if dlast is None:   # no gradient reaches the last state (the common case)
        dlast = _read_only_zeros(u, *ctx.last_meta)
    elif not dlast.is_contiguous():
        dlast = dlast.contiguous()
    args = (u, delta, A, B, C, D, z, delta_bias, h0, cu_seqlens, ckpt, dout, dlast,
            ctx.delta_softplus)
    if selective_scan_bwd_op.eager(u):   # the backend's list, None for absent inputs
        grads = _bwd_impl(ctx.backend, u, A, cu_seqlens)(*args)
    else:
        grads = selective_scan_bwd_op(*args, ctx.backend)
        grads = [None if x is None else g for x, g in zip((u, delta, A, B, C, D, z, delta_bias, h0),
                                                          grads)]
    return (*grads, None, None, None, None)


selective_scan_fwd_op.register_autograd(_backward, setup_context=_setup_context)


@kernel_op("selective_state_update", mutates_args=("state",))
def selective_state_update_op(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor,
                              C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                              dt_bias: Optional[Tensor], dt_softplus: bool,
                              state_batch_indices: Optional[Tensor], backend: str) -> Tensor:
    if _select("selective_state_update", backend, x, A) == "triton":
        from .triton import state_update
        heads = state.dim() == 4
        h = (lambda t: t) if heads else (lambda t: None if t is None else t.unsqueeze(1))
        out = state_update(state if heads else state.unsqueeze(1), h(x), h(dt),
                           A if heads else A.unsqueeze(0), B if B.dim() == 3 else B.unsqueeze(1),
                           C if C.dim() == 3 else C.unsqueeze(1),
                           None if D is None else (D if heads else D.unsqueeze(0)), h(z),
                           None if dt_bias is None else (dt_bias if heads else dt_bias.unsqueeze(0)),
                           dt_softplus, state_batch_indices)
        return out if heads else out.squeeze(1)
    return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus,
                                      state_batch_indices)


@selective_state_update_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, backend):
    return torch.empty_like(x)


# ---- validation ----------------------------------------------------------------------------------

def _check_storage(op: str, name: str, x: Tensor, like: Tensor, shape: tuple) -> None:
    check_tensor(op, name, x)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)} (u's (batch, dim, seqlen)), "
                         f"got {tuple(x.shape)}")
    if x.dtype != like.dtype:
        raise TypeError(f"{op}: {name} must have u's dtype {like.dtype}, got {x.dtype}")


def _check_weight_vector(op: str, name: str, x: Tensor, dim: int, u: Tensor) -> None:
    check_tensor(op, name, x, rank=1)
    if x.shape[0] != dim:
        raise ValueError(f"{op}: {name} must have shape ({dim},) (dim), got {tuple(x.shape)}")
    ok = (torch.float32, torch.float64) if u.dtype == torch.float64 else (torch.float32,)
    if x.dtype not in ok:
        raise TypeError(f"{op}: {name} must be float32, got {x.dtype}")


def _check_bc(name: str, M: Tensor, u: Tensor, A: Tensor) -> Tensor:
    """Validate B or C; return the canonical form: (dim, N) or contiguous (batch, G, N, L[*2])."""
    op = "selective_scan_fn"
    check_tensor(op, name, M)
    batch, dim, L = u.shape
    N = A.shape[1]
    if M.dim() == 2:
        if tuple(M.shape) != (dim, N):
            raise ValueError(f"{op}: time-invariant {name} must have shape (dim, dstate) = "
                             f"{(dim, N)}, got {tuple(M.shape)}")
        if M.dtype != A.dtype:
            raise TypeError(f"{op}: time-invariant {name} must have A's dtype {A.dtype}, got {M.dtype}")
        return M.contiguous()
    if M.dim() not in (3, 4):
        raise ValueError(f"{op}: {name} must have rank 2 (dim, dstate), 3 (batch, dstate, seqlen) or "
                         f"4 (batch, groups, dstate, seqlen), got shape {tuple(M.shape)}")
    M4 = M.unsqueeze(1) if M.dim() == 3 else M
    Lw = 2 * L if A.is_complex() else L
    if M4.shape[0] != batch or M4.shape[2] != N or M4.shape[3] != Lw:
        if M.dim() == 3 and tuple(M.shape) == (batch, Lw, N):
            raise ValueError(f"{op}: {name} looks like (batch, seqlen, dstate) = {tuple(M.shape)}; "
                             f"{op} takes mamba-ssm's (batch, dstate, seqlen): pass "
                             f"{name}.transpose(1, 2)")
        if M.dim() == 4 and M.shape[0] == batch and M.shape[1] == Lw and M.shape[3] == N:
            raise ValueError(f"{op}: {name} looks like (batch, seqlen, groups, dstate) = "
                             f"{tuple(M.shape)}; {op} takes mamba-ssm's (batch, groups, dstate, "
                             f"seqlen): pass {name}.permute(0, 2, 3, 1)")
        exp = "(batch, dstate, L)" if M.dim() == 3 else "(batch, groups, dstate, L)"
        raise ValueError(f"{op}: time-varying {name} must have shape {exp} with batch={batch}, "
                         f"dstate={N}, L={Lw}{' (2 * seqlen for complex A)' if A.is_complex() else ''}"
                         f", got {tuple(M.shape)}")
    if M4.shape[1] < 1 or dim % M4.shape[1] != 0:
        raise ValueError(f"{op}: dim {dim} must be divisible by the groups of {name}, got "
                         f"{M4.shape[1]} groups")
    if M.dtype != u.dtype:
        raise TypeError(f"{op}: time-varying {name} must have u's dtype {u.dtype}, got {M.dtype}")
    return M4.contiguous()


# ---- public functions ----------------------------------------------------------------------------

def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, *, initial_state=None, cu_seqlens=None,
                      backend=None, process_group=None):
    """Mamba-1's selective scan; a drop-in for ``mamba_ssm.ops.selective_scan_interface.
    selective_scan_fn`` (same names, order, shapes, layout), plus initial states, packed
    variable-length batches, a differentiable last state and a deterministic backward.

    For channel d, state n, step t::

        dt = softplus(delta + delta_bias) if delta_softplus else delta + delta_bias
        h[t] = exp(dt[t] A[d, n]) h[t-1] + dt[t] B[n, t] u[t]
        out[t] = (sum_n C[n, t] h[t] + D[d] u[t]) * silu(z[t])

    Args:
        u: (batch, dim, seqlen) float32, float16 or bfloat16 (float64 on the reference backend).
        delta: (batch, dim, seqlen), u's dtype; time steps before delta_bias/softplus.
        A: (dim, dstate) float32, or complex64 (S4D-style complex diagonal A); dstate <= 256.
            Real A should be negative (decay).
        B, C: time-invariant (dim, dstate) with A's dtype, or time-varying (batch, dstate, L) /
            (batch, groups, dstate, L) with u's dtype and dim % groups == 0; L = seqlen for real A,
            2 * seqlen interleaved (re, im) pairs for complex A (mamba-ssm's layout).
        D: (dim,) float32 skip connection, optional.
        z: (batch, dim, seqlen), u's dtype, optional gate: out *= silu(z).
        delta_bias: (dim,) float32, optional.
        delta_softplus: apply softplus (torch's, threshold 20) to delta + delta_bias.
        return_last_state: also return the final state.
        initial_state: (batch, dim, dstate) (or (nseq, dim, dstate) with cu_seqlens) float32
            (complex64 for complex A), differentiable. Default zeros.
        cu_seqlens: (nseq + 1,) int32/int64 offsets of sequences packed along seqlen (batch must
            be 1); the state restarts (from initial_state[s]) at every boundary.
        backend: None (env SSM_KERNELS_BACKEND, default "auto"), "auto", "cuda" (real A;
            hand-written CUDA forward and backward), "triton" or "reference".
            An explicit backend that cannot serve the call raises.
        process_group: a ``torch.distributed.ProcessGroup``: context parallelism, seqlen is this
            rank's segment of one sequence split over the group (see ssm_kernels.distributed).

    Returns:
        out (batch, dim, seqlen) in u's dtype, or (out, last_state) with last_state
        (batch or nseq, dim, dstate) float32 (complex64 for complex A), differentiable.
        Inputs are made contiguous (a copy where they are not).

    Example:
        >>> import torch, ssm_kernels
        >>> u, delta = torch.randn(2, 8, 50), torch.rand(2, 8, 50)
        >>> A = -torch.rand(8, 4)
        >>> B, C = torch.randn(2, 4, 50), torch.randn(2, 4, 50)
        >>> out, last = ssm_kernels.selective_scan_fn(u, delta, A, B, C, return_last_state=True)
        >>> out.shape, last.shape
        (torch.Size([2, 8, 50]), torch.Size([2, 8, 4]))
    """
    if process_group is not None:
        from ..distributed import cp_selective_scan_fn
        return cp_selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                    return_last_state, initial_state=initial_state,
                                    cu_seqlens=cu_seqlens, backend=backend,
                                    process_group=process_group)
    try:   # metadata of every argument -> (backend, state dtype) of an earlier call that passed
        key = (u.shape, u.dtype, u.device, delta.shape, delta.dtype, delta.device, A.shape, A.dtype,
               A.device, B.shape, B.dtype, B.device, C.shape, C.dtype, C.device,
               None if D is None else (D.shape, D.dtype, D.device),
               None if z is None else (z.shape, z.dtype, z.device),
               None if delta_bias is None else (delta_bias.shape, delta_bias.dtype, delta_bias.device),
               None if initial_state is None else (initial_state.shape, initial_state.dtype,
                                                   initial_state.device), backend)
        if cu_seqlens is not None:   # its values are checked (CPU, debug): never cached
            raise KeyError
        bk, sd = _checked[key]
    except (KeyError, AttributeError, TypeError):
        bk, sd = _check_scan(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, backend)
        if cu_seqlens is None:
            if len(_checked) > 4096:
                _checked.clear()
            _checked[key] = (bk, sd)
    batch, dim = u.shape[0], u.shape[1]
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if batch == 0:  # an empty batch: nothing to launch; zero gradients
        out = empty_result(u.shape, u, *tensors)
        return (out, empty_result((0, dim, A.shape[1]), u, *tensors, dtype=sd)) \
            if return_last_state else out
    save = False
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                save = True
                break
    out, last, _ = selective_scan_fwd_op(
        u.contiguous(), delta.contiguous(), A.contiguous(),
        (B.unsqueeze(1) if B.dim() == 3 else B).contiguous(),
        (C.unsqueeze(1) if C.dim() == 3 else C).contiguous(),
        None if D is None else D.contiguous(), None if z is None else z.contiguous(),
        None if delta_bias is None else delta_bias.contiguous(),
        None if initial_state is None else initial_state.to(sd).contiguous(), cu_seqlens,
        bool(delta_softplus), save, bk)
    return (out, last) if return_last_state else out


_checked: dict = {}


def _check_scan(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, backend):
    """Every argument check of selective_scan_fn; returns (normalised backend, state dtype). Reads
    only metadata, except cu_seqlens' values (see check_cu_seqlens)."""
    op = "selective_scan_fn"
    check_tensor(op, "u", u, rank=3)
    if u.dtype not in _STORAGE + (torch.float64,):
        raise TypeError(f"{op}: u must be float32, float16, bfloat16 or float64, got {u.dtype}")
    batch, dim, L = u.shape
    if L == 0 or dim == 0:
        raise ValueError(f"{op}: u must have non-empty (dim, seqlen), got {tuple(u.shape)}")
    _check_storage(op, "delta", delta, u, u.shape)
    check_tensor(op, "A", A, rank=2)
    weights = _WEIGHTS + ((torch.float64, torch.complex128) if u.dtype == torch.float64 else ())
    if A.dtype not in weights:
        raise TypeError(f"{op}: A must be float32 or complex64, got {A.dtype}")
    if A.shape[0] != dim:
        if u.shape[2] == A.shape[0]:
            raise ValueError(f"{op}: u looks like (batch, seqlen, dim) = {tuple(u.shape)} (A has "
                             f"dim={A.shape[0]}); {op} takes mamba-ssm's (batch, dim, seqlen): "
                             f"pass u.transpose(1, 2) (and delta, z)")
        raise ValueError(f"{op}: A must have shape (dim, dstate) with dim={dim}, got {tuple(A.shape)}")
    if not 1 <= A.shape[1] <= MAX_DSTATE:
        raise ValueError(f"{op}: dstate (A.shape[1]) must be in [1, {MAX_DSTATE}], got {A.shape[1]}")
    Bc = _check_bc("B", B, u, A)
    Cc = _check_bc("C", C, u, A)
    if Bc.dim() == 4 and Cc.dim() == 4 and Bc.shape[1] != Cc.shape[1]:
        raise ValueError(f"{op}: B and C must have the same number of groups, got {Bc.shape[1]} "
                         f"and {Cc.shape[1]}")
    if D is not None:
        _check_weight_vector(op, "D", D, dim, u)
    if delta_bias is not None:
        _check_weight_vector(op, "delta_bias", delta_bias, dim, u)
    if z is not None:
        _check_storage(op, "z", z, u, u.shape)
    if initial_state is not None:
        check_tensor(op, "initial_state", initial_state)
    if cu_seqlens is not None:
        check_tensor(op, "cu_seqlens", cu_seqlens)
    check_same_device(op, u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                      initial_state=initial_state, cu_seqlens=cu_seqlens)
    nseq = batch
    if cu_seqlens is not None:
        nseq = check_cu_seqlens(op, cu_seqlens, batch, u.shape[2], empty_ok=False, axis="seqlen")
    sd = state_dtype(u, A)
    if initial_state is not None:
        check_tensor(op, "initial_state", initial_state)
        want = (nseq, dim, A.shape[1])
        if tuple(initial_state.shape) != want:
            what = "(nseq, dim, dstate)" if cu_seqlens is not None else "(batch, dim, dstate)"
            raise ValueError(f"{op}: initial_state must have shape {what} = {want}, got "
                             f"{tuple(initial_state.shape)}")
        if not (initial_state.is_floating_point() or (initial_state.is_complex() and A.is_complex())):
            raise TypeError(f"{op}: initial_state must be float32{' or complex64' if A.is_complex() else ''}, "
                            f"got {initial_state.dtype}")
    return _backend.normalize(backend), sd


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None, *, backend=None):
    """One decode step of the selective scan, a drop-in for mamba-ssm's
    ``mamba_ssm.ops.triton.selective_state_update.selective_state_update``: updates ``state`` in
    place and returns the output. Running it over t = 0..T-1 reproduces ``selective_scan_fn``.

    Args:
        state: (batch, dim, dstate) (Mamba-1) or (batch, nheads, headdim, dstate) (headed,
            Mamba-2); float32, float16 or bfloat16; updated in place (math in float32).
        x, dt, z: (batch, dim) or (batch, nheads, headdim); z optional (out *= silu(z)).
        A: (dim, dstate) or (nheads, headdim, dstate) float32; may be a stride-0 broadcast.
        B, C: (batch, dstate) or (batch, ngroups, dstate) with nheads % ngroups == 0.
        D, dt_bias: (dim,) or (nheads, headdim), optional.
        dt_softplus: dt = softplus(dt + dt_bias).
        state_batch_indices: (batch,) int, optional; the state row each batch entry updates
            (negative: a padding entry, output zeros, no state touched).
        backend: None, "auto", "triton" or "reference".

    Returns:
        out, x's shape and dtype.

    Example:
        >>> import torch, ssm_kernels
        >>> state = torch.zeros(2, 8, 4)
        >>> x, dt = torch.randn(2, 8), torch.rand(2, 8)
        >>> A, B, C = -torch.rand(8, 4), torch.randn(2, 4), torch.randn(2, 4)
        >>> ssm_kernels.selective_state_update(state, x, dt, A, B, C).shape
        torch.Size([2, 8])
    """
    op = "selective_state_update"
    check_tensor(op, "state", state)
    if state.dim() not in (3, 4):
        raise ValueError(f"{op}: state must be (batch, dim, dstate) or (batch, nheads, headdim, "
                         f"dstate), got shape {tuple(state.shape)}")
    heads = state.dim() == 4
    ok_state = _STORAGE + (torch.float64,)
    if state.dtype not in ok_state:
        raise TypeError(f"{op}: state must be float32, float16 or bfloat16, got {state.dtype}")
    inner = tuple(state.shape[1:-1])  # (dim,) or (nheads, headdim)
    N = state.shape[-1]
    if not 1 <= N <= MAX_DSTATE:
        raise ValueError(f"{op}: dstate must be in [1, {MAX_DSTATE}], got {N}")
    check_tensor(op, "x", x)
    if x.dim() != len(inner) + 1 or tuple(x.shape[1:]) != inner:
        raise ValueError(f"{op}: x must have shape (batch, {', '.join(map(str, inner))}), got "
                         f"{tuple(x.shape)}")
    batch = x.shape[0]
    if state_batch_indices is None and state.shape[0] != batch:
        raise ValueError(f"{op}: state must have x's batch {batch}, got {state.shape[0]}")
    check_tensor(op, "dt", dt)
    if not dt.is_floating_point():
        raise TypeError(f"{op}: dt must have a floating dtype, got {dt.dtype}")
    if tuple(dt.shape) != tuple(x.shape):
        raise ValueError(f"{op}: dt must have x's shape {tuple(x.shape)}, got {tuple(dt.shape)}")
    check_tensor(op, "A", A)
    if A.is_complex() or A.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: A must be float32 (complex A is not supported in the decode step), "
                        f"got {A.dtype}")
    if tuple(A.shape) != inner + (N,):
        raise ValueError(f"{op}: A must have shape {inner + (N,)}, got {tuple(A.shape)}")
    for name, M in (("B", B), ("C", C)):
        check_tensor(op, name, M)
        ok = (M.dim() == 2 and tuple(M.shape) == (batch, N)) or (
            M.dim() == 3 and M.shape[0] == batch and M.shape[2] == N)
        if not ok:
            raise ValueError(f"{op}: {name} must have shape (batch, dstate) or (batch, ngroups, "
                             f"dstate) with batch={batch}, dstate={N}, got {tuple(M.shape)}")
    if tuple(B.shape) != tuple(C.shape):
        raise ValueError(f"{op}: C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}")
    nheads = inner[0] if heads else 1
    groups = B.shape[1] if B.dim() == 3 else 1
    if nheads % groups != 0:
        raise ValueError(f"{op}: nheads {nheads} must be divisible by ngroups {groups}")
    for name, w in (("D", D), ("dt_bias", dt_bias)):
        if w is not None:
            check_tensor(op, name, w)
            if tuple(w.shape) != inner:
                raise ValueError(f"{op}: {name} must have shape {inner}, got {tuple(w.shape)}")
    if z is not None:
        check_tensor(op, "z", z)
        if tuple(z.shape) != tuple(x.shape):
            raise ValueError(f"{op}: z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    if state_batch_indices is not None:
        check_tensor(op, "state_batch_indices", state_batch_indices, rank=1)
        if state_batch_indices.dtype not in (torch.int32, torch.int64) or \
                state_batch_indices.shape[0] != batch:
            raise ValueError(f"{op}: state_batch_indices must be int32/int64 of shape ({batch},), "
                             f"got {state_batch_indices.dtype} {tuple(state_batch_indices.shape)}")
    check_same_device(op, state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias,
                      state_batch_indices=state_batch_indices)
    return selective_state_update_op(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus),
                                     state_batch_indices, _backend.normalize(backend))
