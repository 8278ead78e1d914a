"""Chunked linear attention: registered ops -> autograd -> the documented public functions.

Two registered ops serve every public function (all gate variants share them):
``ssm_kernels::linear_attn_fwd(q, k, v, g, h0, cu_seqlens, scale, backend) -> (o, final_state)`` and
``ssm_kernels::linear_attn_bwd(...)``. The public functions fold their own conventions around them
with plain torch ops (differentiable, traceable): ``g_gamma`` is added to ``g`` (its gradient is
the sum over batch and time), ``reverse`` flips the sequences, ``normalize`` divides by
``q . sum k``.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backend
from .._ops import cached_on_metadata, kernel_op
from ..chunk.select import select
from ..validation import (check_cu_seqlens, check_log_decay, check_qkv, check_same_device,
                          check_tensor, empty_result, swaps_dims_1_2)
from .reference import linear_attn_bwd_ref, linear_attn_fwd_ref, linear_attn_recurrent_ref

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _state_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


# ---- registered ops (contiguous [B, T, H, D]; g float32 [B, T, H] or [B, T, H, K]) -------------

@kernel_op("linear_attn_fwd", mutates_args=())
def linear_attn_fwd_op(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], h0: Optional[Tensor],
                       cu_seqlens: Optional[Tensor], scale: float, recurrent: bool,
                       backend: str, save: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """recurrent=True: the step-by-step kernel (fused_recurrent_*); else the chunked one. Both
    share the backward (the gradients are the same function). Returns (o, final_state, h, gc):
    h, gc what the chunked Triton forward keeps for the backward when save (a gradient will be
    taken) and `chunk.common.SAVE_STATES` (`kept_fakes`), else empty."""
    if select("linear_attn", backend, q, v) == "triton":
        if recurrent:
            from .triton import recurrent_fwd
            return recurrent_fwd(q, k, v, g, h0, cu_seqlens, scale) + _nothing_kept(q)
        from .triton import chunk_fwd_keep
        return chunk_fwd_keep(q, k, v, g, h0, cu_seqlens, scale, save)
    if recurrent:
        o, ht = linear_attn_recurrent_ref(q, k, v, g, scale, h0, cu_seqlens)
        return (o.contiguous(), ht.to(_state_dtype(q))) + _nothing_kept(q)
    return tuple(linear_attn_fwd_ref(q, k, v, g, h0, cu_seqlens, scale)) + _nothing_kept(q)


def _nothing_kept(q):
    return q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32)


def kept_fakes(q, v, g, cu_seqlens, chunked_triton: bool, save: bool, g_from_vs=False):
    """The (h, gc) outputs of a forward op, from metadata (its fake implementation): on the
    chunked Triton path what the engine's `saved_layout` says (empty ones in the engine's
    dtypes), else two empty float32 tensors (`_nothing_kept`)."""
    if not chunked_triton:
        return _nothing_kept(q)
    from ..chunk.common import state_store_dtype
    from ..chunk.fwd import saved_layout
    hs, gc = saved_layout(q, v, g, cu_seqlens, g_from_vs, save)
    return (q.new_empty((0,) if hs is None else hs, dtype=state_store_dtype(q.dtype)),
            torch.empty_like(g, dtype=torch.float32) if gc else q.new_empty(0, dtype=torch.float32))


@linear_attn_fwd_op.register_fake
def _(q, k, v, g, h0, cu_seqlens, scale, recurrent, backend, save=False):
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return (torch.empty_like(v), q.new_empty((N, q.shape[2], q.shape[3], v.shape[3]),
                                             dtype=_state_dtype(q)),
            *kept_fakes(q, v, g, cu_seqlens,
                        not recurrent and select("linear_attn", backend, q, v) == "triton", save))


@kernel_op("linear_attn_bwd", mutates_args=())
def linear_attn_bwd_op(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], h0: Optional[Tensor],
                       cu_seqlens: Optional[Tensor], scale: float, ht: Tensor, do: Tensor,
                       dht: Optional[Tensor], backend: str, h: Optional[Tensor] = None,
                       gc: Optional[Tensor] = None
                       ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, dg, dh0); dg is empty when g is None; dh0 is [N, H, K, V]; dht None
    means no gradient reaches the final state. h, gc: the forward's kept outputs (None or empty:
    recomputed; the chunked Triton path only); with gc, g may be gc itself (only its shape is
    read)."""
    if select("linear_attn", backend, q, v) == "triton":
        from .triton import chunk_bwd
        dq, dk, dv, dg, dh0 = chunk_bwd(q, k, v, g, h0, cu_seqlens, scale, ht, do, dht, h, gc)
    else:
        dq, dk, dv, dg, dh0 = linear_attn_bwd_ref(q, k, v, g, h0, cu_seqlens, scale, do,
                                                  torch.zeros_like(ht) if dht is None else dht)
        dq, dk, dv = dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
        if dh0 is None:
            dh0 = torch.zeros_like(ht)
    if dg is None:
        dg = q.new_empty(0, dtype=torch.float32)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dg.contiguous(), dh0.contiguous()


@linear_attn_bwd_op.register_fake
def _(q, k, v, g, h0, cu_seqlens, scale, ht, do, dht, backend, h=None, gc=None):
    dg = q.new_empty(0, dtype=torch.float32) if g is None else torch.empty_like(g)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dg, torch.empty_like(ht))


def _setup_context(ctx, inputs, output):
    q, k, v, g, h0, cu_seqlens, scale, recurrent, backend = inputs[:9]
    h, gc = output[2], output[3]
    # kept outputs are saved only when non-empty (an empty one may be a view of a freed buffer);
    # a kept gc replaces g (same shape; the backward reads only g's shape then)
    h = h if h.numel() else None
    gc = gc if gc.numel() else None
    ctx.save_for_backward(q, k, v, g if gc is None else None, h0, cu_seqlens, output[1], h, gc)
    ctx.scale, ctx.backend, ctx.has_g = scale, backend, g is not None


def _backward(ctx, do, dht, _dh, _dgc):
    q, k, v, g, h0, cu_seqlens, ht, h, gc = ctx.saved_tensors
    do = torch.zeros_like(v) if do is None else do.contiguous()
    dht = None if dht is None else dht.contiguous()
    dq, dk, dv, dg, dh0 = linear_attn_bwd_op(q, k, v, g if gc is None else gc, h0, cu_seqlens,
                                             ctx.scale, ht, do, dht, ctx.backend, h, gc)
    return (dq, dk, dv, dg if ctx.has_g else None, None if h0 is None else dh0.to(h0.dtype),
            None, None, None, None, None)


linear_attn_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---- validation ------------------------------------------------------------------------------

_LAYOUT_HINT = ("; q, k, v, g are [B, T, H, K] (fla's head_first=False); for [B, H, T, K] inputs "
                "pass x.transpose(1, 2)")


def _hint(got, want) -> str:
    """The layout hint when `got` is `want` with dims 1 and 2 (time and heads) swapped."""
    return _LAYOUT_HINT if swaps_dims_1_2(got, want) else ""


def _validate(fn: str, q, k, v, g, g_kind: str, scale, initial_state, cu_seqlens):
    """Every argument check; returns N (sequences). The metadata checks are memoised on the
    arguments' metadata (`_validate_meta`); the value checks (g <= 0, cu_seqlens' offsets) run on
    every call where `checks_values` allows (CPU tensors, or debug mode on the GPU)."""
    N = _validate_meta(fn, q, k, v, g, g_kind, scale, initial_state, cu_seqlens)
    check_log_decay(fn, "g", g)
    if cu_seqlens is not None:
        check_cu_seqlens(fn, cu_seqlens, q.shape[0], q.shape[1])
    return N


@cached_on_metadata(typed=True)
def _validate_meta(fn: str, q, k, v, g, g_kind: str, scale, initial_state, cu_seqlens):
    check_qkv(fn, q, k, v, _DTYPES)
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"{fn}: k must have q's shape [B, T, H, K] = {tuple(q.shape)}, got "
                         f"{tuple(k.shape)}{_hint(k.shape, q.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{fn}: v must have shape [B, T, H, V] with q's B, T, H = {tuple(q.shape[:3])}, "
                         f"got {tuple(v.shape)}{_hint(v.shape[:3], q.shape[:3])}")
    if T == 0 or K == 0 or v.shape[3] == 0:
        raise ValueError(f"{fn}: q and v need T, K, V >= 1, got q {tuple(q.shape)}, v {tuple(v.shape)}")
    if g is not None:
        check_tensor(fn, "g", g)
        expect = (B, T, H) if g_kind == "head" else (B, T, H, K)
        if tuple(g.shape) != expect:
            layout = "[B, T, H]" if g_kind == "head" else "[B, T, H, K]"
            raise ValueError(f"{fn}: g must have shape {layout} = {expect}, got {tuple(g.shape)}"
                             f"{_hint(g.shape, expect)}")
        if not g.is_floating_point():
            raise TypeError(f"{fn}: g must have a floating dtype, got {g.dtype}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"{fn}: scale must be a float or None, got {type(scale).__name__}")
    N = B
    if cu_seqlens is not None:
        N = check_cu_seqlens(fn, cu_seqlens, B, T, values=False)
    if initial_state is not None:
        check_tensor(fn, "initial_state", initial_state)
        expect = (N, H, K, v.shape[3])
        if tuple(initial_state.shape) != expect:
            raise ValueError(f"{fn}: initial_state must have shape [N, H, K, V] = {expect} (N = "
                             f"{'len(cu_seqlens) - 1' if cu_seqlens is not None else 'B'}), got "
                             f"{tuple(initial_state.shape)}"
                             f"{_head_first_hint(q, initial_state.shape[1:2])}")
        if not initial_state.is_floating_point():
            raise TypeError(f"{fn}: initial_state must have a floating dtype, got {initial_state.dtype}")
    check_same_device(fn, q=q, k=k, v=v, g=g, initial_state=initial_state, cu_seqlens=cu_seqlens)
    return N


def _head_first_hint(q, heads) -> str:
    """The layout hint when a tensor's heads axis `heads` (a 1-tuple) has q's dim 1, not its dim 2
    (H): q is then likely [B, H, T, K]."""
    return _LAYOUT_HINT if tuple(heads) == (q.shape[1],) != (q.shape[2],) else ""


def _core(q, k, v, g, scale, initial_state, cu_seqlens, reverse, backend, recurrent=False):
    """Run the registered op on contiguous tensors; reverse=True walks every sequence backwards.
    An empty batch (B = 0) returns empty outputs without a launch (the gradients are zeros)."""
    if q.shape[0] == 0:
        _, T, H, K = q.shape
        o = empty_result((0, T, H, v.shape[3]), v, q, k, v, g, initial_state)
        ht = empty_result((0, H, K, v.shape[3]), q, q, k, v, g, initial_state,
                          dtype=_state_dtype(q))
        return o, ht
    K = q.shape[-1]
    scale = K ** -0.5 if scale is None else float(scale)
    sd = _state_dtype(q)
    h0 = None if initial_state is None else initial_state.to(sd).contiguous()
    cu = cu_seqlens
    if reverse:
        q, k, v, g = (None if x is None else x.flip(1) for x in (q, k, v, g))
        if cu is not None:
            cu = (cu[-1] - cu).flip(0)
            h0 = None if h0 is None else h0.flip(0)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g = None if g is None else g.to(sd).contiguous()
    save = (not recurrent and torch.is_grad_enabled()
            and any(x is not None and x.requires_grad for x in (q, k, v, g, h0)) and _save_states())
    o, ht, _, _ = linear_attn_fwd_op(q, k, v, g, h0, cu, scale, recurrent,
                                     _backend.normalize(backend), save)
    if reverse:
        o = o.flip(1)
        if cu is not None:
            ht = ht.flip(0)
    return o, ht


def _save_states() -> bool:
    """`chunk.common.SAVE_STATES` on, read per call (a knob the GPU A/B flips); the engine's
    modules (Triton) are imported only when Triton is importable."""
    try:
        from ..chunk import common
    except ImportError:
        return False
    return bool(common.SAVE_STATES)


def _head_gate(g, g_gamma, q):
    """g [B, T, H] and/or g_gamma [H] -> one per-step log-decay [B, T, H] in the state dtype."""
    if g_gamma is None:
        return None if g is None else g.to(_state_dtype(q))
    gam = g_gamma.to(_state_dtype(q))
    if g is None:
        return gam.expand(q.shape[:3])
    return g.to(_state_dtype(q)) + gam


def _validate_gamma(fn, g_gamma, q):
    if g_gamma is None:
        return
    check_tensor(fn, "g_gamma", g_gamma, rank=1)
    if g_gamma.shape[0] != q.shape[2]:
        raise ValueError(f"{fn}: g_gamma must have shape [H] = ({q.shape[2]},), got "
                         f"{tuple(g_gamma.shape)}{_head_first_hint(q, g_gamma.shape)}")
    if not g_gamma.is_floating_point():
        raise TypeError(f"{fn}: g_gamma must have a floating dtype, got {g_gamma.dtype}")
    check_same_device(fn, q=q, g_gamma=g_gamma)
    check_log_decay(fn, "g_gamma", g_gamma)


# ---- normalize (chunk_linear_attn / fused_recurrent_linear_attn) -------------------------------

def _key_cumsum(k, z0, cu_seqlens, reverse):
    """Running key sum per sequence (plus z0 [N, 1, H, K]) and its value at each sequence's end."""
    kf = k.to(_state_dtype(k))
    if reverse:
        kf = kf.flip(1)
        if cu_seqlens is not None:
            cu_seqlens = (cu_seqlens[-1] - cu_seqlens).flip(0)
            z0 = None if z0 is None else z0.flip(0)
    if cu_seqlens is None:
        kc = kf.cumsum(1)
        if z0 is not None:
            kc = kc + z0.to(kc.dtype)
        z = kc[:, -1:]
    else:
        T = kf.shape[1]
        cu = cu_seqlens.long()
        cz = torch.cat([kf.new_zeros(1, *kf.shape[2:]), kf[0].cumsum(0)], 0)  # [T + 1, H, K]
        seg = torch.searchsorted(cu[1:], torch.arange(T, device=k.device), right=True)
        kc = (cz[1:] - cz[cu[seg]])[None]
        z = (cz[cu[1:]] - cz[cu[:-1]])[:, None]
        if z0 is not None:
            kc = kc + z0.to(kc.dtype)[seg, 0][None]
            z = z + z0.to(z.dtype)
        if reverse:
            z = z.flip(0)
    if reverse:
        kc = kc.flip(1)
    return kc, z


class _Normalize(torch.autograd.Function):
    """out = o / (s * q . kc + 1e-10) with kc = cumsum_t k (+ z0), and z = kc at the last step:
    one autograd node with a written-out backward, in the state dtype throughout (as the torch
    ops in `_linear_attn` compute it: mixed-dtype products promote, no casting copies of q, k, o).
    Per call on the GPU: 7 forward kernels and 13 backward kernels (plus autograd's 2 gradient
    sums into dq, dk) behind one node, where the same formula as recorded torch ops cost 10 + 18
    kernels behind ~10 autograd nodes (issue 8: chunk_linear_attn's normalize=True default was
    its largest host cost)."""

    @staticmethod
    def forward(ctx, o, q, k, z0, s: float, want_z: bool, fused: bool = False):
        ctx.fused = fused
        ctx.s = s
        ctx.k_dtype, ctx.z0_dtype = k.dtype, (None if z0 is None else z0.dtype)
        if fused:
            from .triton import normalize_fwd
            out, kc, den, z = normalize_fwd(o, q, k, z0, s, True, want_z)
            ctx.save_for_backward(o, q, kc, den)
            return out, z
        kc, den = _normalize_terms(q, k, z0, s)
        out = _div_into(o, den)
        ctx.save_for_backward(o, q, kc, den)
        return out, (kc[:, -1:] if want_z else None)

    @staticmethod
    def backward(ctx, gout, gz):
        o, q, kc, den = ctx.saved_tensors
        s = ctx.s
        need_o, need_q, need_k, need_z0 = ctx.needs_input_grad[:4]
        if ctx.fused:
            from .triton import normalize_bwd
            if gout is not None and not _unit_inner(gout):
                gout = gout.contiguous()
            return (*normalize_bwd(gout, gz, o, q, kc, den, s, (need_o, need_q, need_k, need_z0),
                                   ctx.k_dtype, ctx.z0_dtype), None, None, None)
        do = dq = dk = dz0 = None
        if gout is not None:
            gd = torch.div(gout, den)   # state dtype (promoted; no cast of gout)
            if need_o:
                do = gd.to(o.dtype)
            # d den = -sum_v(g o) / den^2; d (q . kc) = s d den
            c = (gd * o).sum(-1, keepdim=True).div_(den).mul_(-s)
            if need_q:
                dq = (c * kc).to(q.dtype)
            dkc = c * q if (need_k or need_z0) else None
        else:
            dkc = None
        if gz is not None and (need_k or need_z0):
            if dkc is None:
                dkc = torch.zeros_like(kc)
            dkc[:, -1:] += gz
        if dkc is not None:
            if need_k:
                dk = dkc.flip(1).cumsum(1).flip(1).to(ctx.k_dtype)
            if need_z0:
                dz0 = dkc.sum(1, keepdim=True).to(ctx.z0_dtype)
        return do, dq, dk, dz0, None, None, None


def _normalize_terms(q, k, z0, s):
    """(kc, den): the running key sum (state dtype, plus z0) and s * q . kc + 1e-10."""
    kc = torch.cumsum(k, 1, dtype=_state_dtype(k))
    if z0 is not None:
        kc = kc + z0.to(kc.dtype)
    den = (q * kc).sum(-1, keepdim=True)
    return kc, den.mul_(s).add_(1e-10)


# normalize=True in one Triton launch per direction (triton.normalize_fwd / _bwd) where it is
# cheaper than the torch ops: a T-serial walk with one program per (sequence, head), so at long T
# with few heads the torch ops (parallel over T) keep it; False: always the torch ops (A/B knob)
FUSED_NORMALIZE = os.environ.get("SSM_KERNELS_FUSED_NORMALIZE", "1") != "0"
# Where: a block step of the walk is ~1 us of dependent loads, the torch ops ~7 kernels of >= 3 us
# each (more once they move real bytes): fused up to 16 row blocks per program (T <= 1024 at
# K <= 64, 512 at K = 128), or when B * H programs fill the SMs about once (then each streams
# its rows at about its share of the bandwidth). Unmeasured: the GPU A/B is the knob.
FUSED_NORM_MAX_STEPS = 16
FUSED_NORM_MIN_BH = 128


def _unit_inner(x: Tensor) -> bool:
    """[B, T, H, D] with the (H, D) part dense (what the normalize kernels index)."""
    return x.stride(3) == 1 and x.stride(2) == x.shape[3]


def _use_fused_norm(o, q, k, z0, backend) -> bool:
    if not FUSED_NORMALIZE or torch.compiler.is_compiling():
        return False
    if type(q) is not torch.Tensor or type(o) is not torch.Tensor or type(k) is not torch.Tensor:
        return False
    if q.dtype not in _FUSED_NORM_DTYPES or k.dtype not in _FUSED_NORM_DTYPES or \
            o.dtype not in _FUSED_NORM_DTYPES or (z0 is not None and type(z0) is not torch.Tensor):
        return False
    backend = _backend.normalize(backend)
    if backend == "reference" or not (q.is_cuda or (backend == "triton" and
                                                    _backend.triton_reason(q.device) is None)):
        return False
    if q.shape[3] > 256 or o.shape[3] > 256 or not (_unit_inner(o) and _unit_inner(q) and
                                                    _unit_inner(k)):
        return False
    from .triton import normalize_serial_steps
    B, T, H, K = q.shape
    return (normalize_serial_steps(T, K, o.shape[3]) <= FUSED_NORM_MAX_STEPS or
            B * H >= FUSED_NORM_MIN_BH)


_FUSED_NORM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _normalized(o, q, k, z0, s, output_final_state, ht, backend="auto"):
    """normalize=True without cu_seqlens or reverse: `_Normalize` when a gradient is taken (one
    node), the same ops unrecorded otherwise; one Triton launch each way where _use_fused_norm."""
    fused = _use_fused_norm(o, q, k, z0, backend)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (o, q, k, z0)):
        out, z = _Normalize.apply(o, q, k, z0, s, output_final_state, fused)
    elif fused:
        from .triton import normalize_fwd
        out, _, _, z = normalize_fwd(o, q, k, z0, s, False, output_final_state)
    else:
        kc, den = _normalize_terms(q, k, z0, s)
        out, z = _div_into(o, den), kc[:, -1:]
    return out, ((ht, z) if output_final_state else None)


def _div_into(o, den):
    """o / den computed in the state dtype and rounded into o's dtype on store: one kernel where
    `torch.div(o, den).to(o.dtype)` is two, bitwise the same (TensorIterator computes in the
    promoted dtype and casts to out's); plain div where the dtypes agree."""
    if o.dtype == den.dtype:
        return torch.div(o, den)
    return torch.div(o, den, out=torch.empty_like(o))


def _linear_attn(fn, q, k, v, scale, initial_state, output_final_state, normalize, reverse,
                 cu_seqlens, backend, recurrent):
    if normalize and isinstance(initial_state, (tuple, list)):
        kv0, z0 = initial_state
    else:
        kv0, z0 = initial_state, None
    N = _validate(fn, q, k, v, None, "head", scale, kv0, cu_seqlens)
    if z0 is not None:
        check_tensor(fn, "initial_state[1] (z_state)", z0)
        if tuple(z0.shape) != (N, 1, q.shape[2], q.shape[3]):
            raise ValueError(f"{fn}: initial_state[1] (z_state) must have shape [N, 1, H, K] = "
                             f"{(N, 1, q.shape[2], q.shape[3])}, got {tuple(z0.shape)}")
    o, ht = _core(q, k, v, None, scale, kv0, cu_seqlens, reverse, backend, recurrent)
    if not normalize:
        return o, (ht if output_final_state else None)
    s = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if cu_seqlens is None and not reverse:
        return _normalized(o, q, k, z0, s, output_final_state, ht, backend)
    kc, z = _key_cumsum(k, z0, cu_seqlens, reverse)
    denom = (q.to(kc.dtype) * s * kc).sum(-1, keepdim=True) + 1e-10
    o = (o.to(kc.dtype) / denom).to(v.dtype)
    return o, ((ht, z) if output_final_state else None)


# ---- public functions -------------------------------------------------------------------------

_ARGS_DOC = """
    q, k: ``[B, T, H, K]`` queries and keys; float32, float16, bfloat16 (float64 on the reference
        backend); K <= 256 on the Triton backend (any size, power of two or not).
    v: ``[B, T, H, V]`` values, q's dtype; V <= 256 on the Triton backend.
    scale: multiplies ``q``; default ``K ** -0.5``.
    initial_state: ``[N, H, K, V]`` state before the first step (N = B, or the number of sequences
        with ``cu_seqlens``); any float dtype, used in float32. Differentiable. Default zeros.
    output_final_state: return the final state ``[N, H, K, V]`` float32 (differentiable) instead
        of None.
    cu_seqlens: ``[N + 1]`` int32/int64 cumulative lengths of packed sequences (B must be 1);
        every sequence starts from its own initial state and yields its own final state.
    backend: keyword-only. None (env SSM_KERNELS_BACKEND, default "auto"), "auto", "triton" or
        "reference"; an explicit backend that cannot serve the call raises."""

_CP_DOC = """
    process_group: keyword-only ``torch.distributed.ProcessGroup``: context parallelism, T is this
        rank's segment of one sequence split over the group (see ssm_kernels.distributed)."""


def chunk_linear_attn(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None,
                      initial_state=None, output_final_state: bool = False, normalize: bool = True,
                      cu_seqlens: Optional[Tensor] = None, *, backend: Optional[str] = None,
                      process_group=None):
    """Linear attention without decay, chunkwise parallel: ``S_t = S_{t-1} + k_t^T v_t``,
    ``o_t = scale * q_t S_t`` (drop-in for ``fla.ops.linear_attn.chunk_linear_attn``).

    Args:{args}{cp}
    normalize: divide by ``scale * q_t . z_t + 1e-10`` with ``z_t`` the running key sum, as fla
        does. With normalize=True ``initial_state`` may be a tuple ``(kv_state [N, H, K, V],
        z_state [N, 1, H, K])`` and the final state is returned as such a tuple.

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state or None)``.

    Example:
        >>> import torch, ssm_kernels
        >>> q, k, v = torch.randn(3, 2, 50, 4, 32).unbind(0)      # [B, T, H, K]
        >>> o, S = ssm_kernels.chunk_linear_attn(q, k, v, normalize=False, output_final_state=True)
        >>> o.shape, S.shape
        (torch.Size([2, 50, 4, 32]), torch.Size([2, 4, 32, 32]))
    """
    if process_group is not None:
        from ..distributed import cp_chunk_linear_attn
        return cp_chunk_linear_attn(q, k, v, scale, initial_state, output_final_state, normalize,
                                    cu_seqlens, backend=backend, process_group=process_group)
    return _linear_attn("chunk_linear_attn", q, k, v, scale, initial_state, output_final_state,
                        normalize, False, cu_seqlens, backend, False)


def fused_recurrent_linear_attn(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None,
                                initial_state=None, output_final_state: bool = False,
                                reverse: bool = False, normalize: bool = False,
                                cu_seqlens: Optional[Tensor] = None, *,
                                backend: Optional[str] = None):
    """The step-by-step form of `chunk_linear_attn` for decoding a few tokens from a state (drop-in
    for ``fla.ops.linear_attn.fused_recurrent_linear_attn``; note fla's default normalize=False
    here). Same results as the chunked form.

    Args:{args}
    reverse: run every sequence right to left (the final state is then the one after step 0).
    normalize: as in `chunk_linear_attn`.

    Returns:
        ``(o [B, T, H, V], final_state or None)``.

    Example:
        >>> import torch, ssm_kernels
        >>> q, k, v = torch.randn(3, 2, 1, 4, 32).unbind(0)       # one decoding step
        >>> S0 = torch.randn(2, 4, 32, 32)
        >>> o, S1 = ssm_kernels.fused_recurrent_linear_attn(q, k, v, initial_state=S0,
        ...                                                 output_final_state=True)
    """
    return _linear_attn("fused_recurrent_linear_attn", q, k, v, scale, initial_state,
                        output_final_state, normalize, bool(reverse), cu_seqlens, backend, True)


def _simple_gla(fn, q, k, v, g, g_gamma, scale, initial_state, output_final_state, reverse,
                cu_seqlens, backend, recurrent):
    _validate(fn, q, k, v, g, "head", scale, initial_state, cu_seqlens)
    _validate_gamma(fn, g_gamma, q)
    o, ht = _core(q, k, v, _head_gate(g, g_gamma, q), scale, initial_state, cu_seqlens, reverse,
                  backend, recurrent)
    return o, (ht if output_final_state else None)


def chunk_simple_gla(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor] = None,
                     g_gamma: Optional[Tensor] = None, scale: Optional[float] = None,
                     initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                     cu_seqlens: Optional[Tensor] = None, *, backend: Optional[str] = None,
                     process_group=None):
    """Linear attention with a scalar decay per head and step, chunkwise parallel (drop-in for
    ``fla.ops.simple_gla.chunk_simple_gla``; RetNet / lightning attention with ``g_gamma``):
    ``S_t = exp(g_t + g_gamma) S_{t-1} + k_t^T v_t``, ``o_t = scale * q_t S_t``.

    Args:{args}{cp}
    g: ``[B, T, H]`` log-decay per step, <= 0 (any float dtype; used in float32). Differentiable.
    g_gamma: ``[H]`` constant log-decay per head, <= 0. Differentiable. Either, both or neither
        of g and g_gamma may be given (they add).

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32 or None)``.

    Example:
        >>> import torch, ssm_kernels
        >>> q, k, v = torch.randn(3, 2, 50, 4, 32).unbind(0)
        >>> g = -torch.rand(2, 50, 4)                             # log-decays <= 0
        >>> o, S = ssm_kernels.chunk_simple_gla(q, k, v, g, output_final_state=True)
    """
    if process_group is not None:
        from ..distributed import cp_chunk_simple_gla
        return cp_chunk_simple_gla(q, k, v, g, g_gamma, scale, initial_state, output_final_state,
                                   cu_seqlens, backend=backend, process_group=process_group)
    return _simple_gla("chunk_simple_gla", q, k, v, g, g_gamma, scale, initial_state,
                       output_final_state, False, cu_seqlens, backend, False)


def fused_recurrent_simple_gla(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor] = None,
                               g_gamma: Optional[Tensor] = None, scale: Optional[float] = None,
                               initial_state: Optional[Tensor] = None,
                               output_final_state: bool = False, reverse: bool = False,
                               cu_seqlens: Optional[Tensor] = None, *,
                               backend: Optional[str] = None):
    """The step-by-step form of `chunk_simple_gla` for decoding (drop-in for
    ``fla.ops.simple_gla.fused_recurrent_simple_gla``). Same results as the chunked form.

    Args:{args}
    g, g_gamma: as in `chunk_simple_gla`.
    reverse: run every sequence right to left.

    Returns:
        ``(o [B, T, H, V], final_state or None)``.

    Example:
        >>> import torch, ssm_kernels
        >>> q, k, v = torch.randn(3, 2, 1, 4, 32).unbind(0)
        >>> o, S = ssm_kernels.fused_recurrent_simple_gla(q, k, v, -torch.rand(2, 1, 4),
        ...                                               output_final_state=True)
    """
    return _simple_gla("fused_recurrent_simple_gla", q, k, v, g, g_gamma, scale, initial_state,
                       output_final_state, bool(reverse), cu_seqlens, backend, True)


def chunk_gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: Optional[float] = None,
              initial_state: Optional[Tensor] = None, output_final_state: bool = False,
              cu_seqlens: Optional[Tensor] = None, *, backend: Optional[str] = None,
              process_group=None):
    """Gated linear attention (a log-decay per key channel), chunkwise parallel (drop-in for
    ``fla.ops.gla.chunk_gla``): ``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t``, ``o_t = scale q_t S_t``.

    Args:{args}{cp}
    g: ``[B, T, H, K]`` log-decays, <= 0 (any float dtype; used in float32); -20 per step and 0
        both stay finite. Differentiable.

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32 or None)``.

    Example:
        >>> import torch, ssm_kernels
        >>> q, k, v = torch.randn(3, 2, 50, 4, 32).unbind(0)
        >>> g = torch.nn.functional.logsigmoid(torch.randn(2, 50, 4, 32))
        >>> o, S = ssm_kernels.chunk_gla(q, k, v, g, output_final_state=True)
    """
    if process_group is not None:
        from ..distributed import cp_chunk_gla
        return cp_chunk_gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens,
                            backend=backend, process_group=process_group)
    if g is None:
        raise ValueError("chunk_gla: g ([B, T, H, K] log-decays) is required")
    _validate("chunk_gla", q, k, v, g, "key", scale, initial_state, cu_seqlens)
    o, ht = _core(q, k, v, g, scale, initial_state, cu_seqlens, False, backend)
    return o, (ht if output_final_state else None)


def fused_recurrent_gla(q: Tensor, k: Tensor, v: Tensor, gk: Optional[Tensor] = None,
                        gv: Optional[Tensor] = None, scale: Optional[float] = None,
                        initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                        reverse: bool = False, cu_seqlens: Optional[Tensor] = None, *,
                        backend: Optional[str] = None):
    """The step-by-step form of `chunk_gla` for decoding (drop-in for
    ``fla.ops.gla.fused_recurrent_gla``, which names the gate ``gk``). Same results as the chunked
    form. ``gv`` (per-value decay) is not supported and raises if given.

    Args:{args}
    gk: ``[B, T, H, K]`` log-decays, <= 0, or None (no decay).
    reverse: run every sequence right to left.

    Returns:
        ``(o [B, T, H, V], final_state or None)``.

    Example:
        >>> import torch, ssm_kernels
        >>> q, k, v = torch.randn(3, 2, 1, 4, 32).unbind(0)
        >>> gk = torch.nn.functional.logsigmoid(torch.randn(2, 1, 4, 32))
        >>> o, S = ssm_kernels.fused_recurrent_gla(q, k, v, gk, output_final_state=True)
    """
    if gv is not None:
        raise ValueError("fused_recurrent_gla: gv (per-value-channel decay) is not supported; pass gv=None")
    _validate("fused_recurrent_gla", q, k, v, gk, "key", scale, initial_state, cu_seqlens)
    o, ht = _core(q, k, v, gk, scale, initial_state, cu_seqlens, bool(reverse), backend, True)
    return o, (ht if output_final_state else None)


for _f in (chunk_linear_attn, fused_recurrent_linear_attn, chunk_simple_gla,
           fused_recurrent_simple_gla, chunk_gla, fused_recurrent_gla):
    _f.__doc__ = _f.__doc__.replace("{args}", _ARGS_DOC).replace("{cp}", _CP_DOC)
del _f
