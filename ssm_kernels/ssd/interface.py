"""SSD (Mamba-2): registered ops -> autograd -> `mamba_chunk_scan_combined` (mamba-ssm drop-in).

The kernels are the chunked engine's (`ssm_kernels.chunk`) with SSD's mapping: q = C, k = B
(grouped: head h reads group h // (nheads // ngroups), never copied per head), v = x scaled by dt
inside the kernels (float32, never materialised), log-decay g = dt * A formed inside the kernels,
scale 1. One registered op pair, ``ssm_kernels::ssd_fwd(C, B, x, dt, A, h0, cu_seqlens, backend)
-> (y, final_state [N, H, N_state, P])`` and ``ssm_kernels::ssd_bwd``; dt's bias/softplus/limit,
D and the silu(z) gate are differentiable torch ops around it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from .._ops import kernel_op
from ..chunk.select import select
from ..validation import (check_cu_seqlens, check_same_device, check_tensor, checks_values,
                          swaps_dims_1_2)
from ..linear_attn.interface import kept_fakes
from ..linear_attn.reference import linear_attn_bwd_ref
from .reference import heads, process_dt, ssd_chunked

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# D inside the registered op (the forward kernel's epilogue; dD and dx += dy D in its backward) and,
# when no gradient is needed (eager inference), silu(z) in the kernel too (the epilogue of the chunk
# engine's output stage on either forward path, chunk/common.FUSED_FWD 0 or 1); False: D and z as
# torch ops around the op
FUSE_EPILOGUE = True


def _sd(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _ref_forward(C, B, x, dt, A, h0, cu_seqlens):
    """The op on the reference backend (differentiable): y = sum C . h, final states
    [N, H, N_state, P] (the engine's [K, V] layout)."""
    sd = _sd(x)
    H = x.shape[2]
    X = x.to(sd) * dt.to(sd)[..., None]
    a = dt.to(sd) * A.to(sd)
    Bh, Ch = heads(B.to(sd), H), heads(C.to(sd), H)
    hm = None if h0 is None else h0.to(sd).transpose(-1, -2)              # [N, H, P, N_state]
    if cu_seqlens is None:
        y, f = ssd_chunked(X, a, Bh, Ch, 16, hm)
    else:
        cu = [int(v) for v in cu_seqlens.tolist()]
        ys, fs = [], []
        for n in range(len(cu) - 1):
            s = slice(cu[n], cu[n + 1])
            yn, fn = ssd_chunked(X[:, s], a[:, s], Bh[:, s], Ch[:, s], 16,
                                 None if hm is None else hm[n:n + 1])
            ys.append(yn)
            fs.append(fn)
        y, f = torch.cat(ys, 1), torch.cat(fs, 0)
    return y.to(x.dtype), f.transpose(-1, -2).contiguous()


@kernel_op("ssd_fwd", mutates_args=())
def ssd_fwd_op(C: Tensor, B: Tensor, x: Tensor, dt: Tensor, A: Tensor, h0: Optional[Tensor],
               cu_seqlens: Optional[Tensor], backend: str,
               D: Optional[Tensor] = None, save: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """C, B [b, l, g, n]; x [b, l, h, p]; dt [b, l, h] (processed, float32); A [h] float32;
    h0 None or [N, h, n, p] float32; D None or [h, p] float32 (y += D x, in the kernel's epilogue).
    Returns (y [b, l, h, p] in x's dtype, final [N, h, n, p], kept): kept the engine's per-chunk
    states [NCH, h, n, p] when save (a gradient will be taken) and `chunk.common.SAVE_STATES` >= 2
    on the Triton path (the backward then skips recomputing them), else empty."""
    if select("ssd", backend, x, B) == "triton":
        from ..chunk.fwd import chunk_fwd_keep
        return chunk_fwd_keep(C, B, x, None, h0, cu_seqlens, 1.0, vs=dt, A=A, D=D, save=save)[:3]
    with torch.no_grad():
        y, f = _ref_forward(C, B, x, dt, A, h0, cu_seqlens)
        if D is not None:
            y = (y.to(_sd(x)) + x.to(_sd(x)) * D.to(_sd(x))).to(x.dtype)
    return y.contiguous(), f.to(_sd(x)), x.new_empty(0, dtype=torch.float32)


@ssd_fwd_op.register_fake
def _(C, B, x, dt, A, h0, cu_seqlens, backend, D=None, save=False):
    N = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    h = kept_fakes(C, x, None, cu_seqlens, select("ssd", backend, x, B) == "triton", save,
                   g_from_vs=True)[0]
    return (torch.empty_like(x), x.new_empty((N, x.shape[2], B.shape[3], x.shape[3]), dtype=_sd(x)),
            h)


@kernel_op("ssd_bwd", mutates_args=())
def ssd_bwd_op(C: Tensor, B: Tensor, x: Tensor, dt: Tensor, A: Tensor, h0: Optional[Tensor],
               cu_seqlens: Optional[Tensor], dy: Tensor, dht: Optional[Tensor], backend: str,
               D: Optional[Tensor] = None, h: Optional[Tensor] = None
               ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dC, dB, dx, ddt float32, dA float32, dh0 (empty when h0 is None), dD [h, p]
    (empty when D is None; dx then includes dy D)). h: the forward's kept states (None or empty:
    recomputed; Triton only)."""
    dD = None
    if select("ssd", backend, x, B) == "triton":
        from ..chunk.bwd import chunk_bwd
        r = chunk_bwd(C, B, x, None, h0, cu_seqlens, 1.0, dy, dht, vs=dt, A=A, D=D, h=h)
        dC, dB, dx, dg, dh0, ddt = r[:6]
        if D is not None:
            dD = r[6]
        # g = dt * A: the decay's share of ddt, and dA summed over tokens (small [b, l, h] ops)
        ddt = torch.addcmul(ddt, dg, A)   # ddt + dg A: one kernel (issue 8), not mul + add
        dA = (dg * dt).sum((0, 1))
    else:
        # explicit (no autograd: this runs below the dispatcher's autograd key when compiled):
        # the linear attention backward reference with q = C, k = B per head, v = x dt, g = dt A
        sd = _sd(x)
        H, G = x.shape[2], B.shape[2]
        dts, As = dt.to(sd), A.to(sd)
        dht_ = (torch.zeros(x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1, H,
                            B.shape[3], x.shape[3], dtype=sd, device=x.device)
                if dht is None else dht.to(sd))
        dq, dk, dv, dg, dh0 = linear_attn_bwd_ref(
            heads(C.to(sd), H), heads(B.to(sd), H), x.to(sd) * dts[..., None], dts * As,
            None if h0 is None else h0.to(sd), cu_seqlens, 1.0, dy.to(sd), dht_)
        group = lambda t: t.view(*t.shape[:2], G, H // G, t.shape[-1]).sum(3)  # noqa: E731
        dC, dB = group(dq), group(dk)
        dx = dv * dts[..., None]
        ddt = (dv * x.to(sd)).sum(-1) + dg * As
        dA = (dg * dts).sum((0, 1))
        if D is not None:
            dx = dx + dy.to(sd) * D.to(sd)
            dD = (dy.to(sd) * x.to(sd)).sum((0, 1))
    if dh0 is None or h0 is None:
        dh0 = x.new_empty(0, dtype=_sd(x))
    dD = x.new_empty(0, dtype=_sd(x)) if dD is None else dD.to(D.dtype).contiguous()
    return (dC.to(C.dtype).contiguous(), dB.to(B.dtype).contiguous(), dx.to(x.dtype).contiguous(),
            ddt.to(dt.dtype).contiguous(), dA.to(A.dtype).contiguous(), dh0.contiguous(), dD)


@ssd_bwd_op.register_fake
def _(C, B, x, dt, A, h0, cu_seqlens, dy, dht, backend, D=None, h=None):
    dh0 = torch.empty_like(h0) if h0 is not None else x.new_empty(0, dtype=_sd(x))
    dD = torch.empty_like(D) if D is not None else x.new_empty(0, dtype=_sd(x))
    return (torch.empty_like(C), torch.empty_like(B), torch.empty_like(x), torch.empty_like(dt),
            torch.empty_like(A), dh0, dD)


def _setup_context(ctx, inputs, output):
    C, B, x, dt, A, h0, cu_seqlens, backend = inputs[:8]
    D = inputs[8] if len(inputs) > 8 else None
    h = output[2] if output[2].numel() else None   # an empty one may view a freed buffer
    ctx.save_for_backward(C, B, x, dt, A, h0, cu_seqlens, D, h)
    ctx.backend = backend


def _backward(ctx, dy, dht, _dh):
    C, B, x, dt, A, h0, cu_seqlens, D, h = ctx.saved_tensors
    dy = torch.zeros_like(x) if dy is None else dy.contiguous()
    dht = None if dht is None else dht.contiguous()
    # y = core + D x: the core's gradient is dy; the op's backward adds dy D to dx and returns dD
    dC, dB, dx, ddt, dA, dh0, dD = ssd_bwd_op(C, B, x, dt, A, h0, cu_seqlens, dy, dht,
                                              ctx.backend, D, h)
    return (dC, dB, dx, ddt, dA, (None if h0 is None else dh0), None, None,
            None if D is None else dD, None)


ssd_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---- public function -------------------------------------------------------------------------

_LAYOUT_HINT = ("; x and z are (batch, seqlen, nheads, headdim), B and C (batch, seqlen, ngroups, "
                "dstate), dt (batch, seqlen, nheads) (mamba-ssm's layout, like fla's "
                "head_first=False); for (batch, nheads, seqlen, ...) inputs pass t.transpose(1, 2)")


def _swap_hint(got, want) -> str:
    """The layout hint when `got` is `want` with dims 1 and 2 (time and heads) swapped."""
    return _LAYOUT_HINT if swaps_dims_1_2(got, want) else ""


def _validate(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
              return_varlen_states):
    fn = "mamba_chunk_scan_combined"
    for name, t in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        check_tensor(fn, name, t)
    if x.dim() != 4:
        raise ValueError(f"{fn}: x must have shape (batch, seqlen, nheads, headdim), got {tuple(x.shape)}")
    b, L, H, P = x.shape
    if x.dtype not in _DTYPES:
        raise TypeError(f"{fn}: x must have dtype in {_DTYPES}, got {x.dtype}")
    if L == 0 or P == 0:
        raise ValueError(f"{fn}: x needs seqlen, headdim >= 1, got {tuple(x.shape)}")
    if tuple(dt.shape) != (b, L, H):
        raise ValueError(f"{fn}: dt must have shape (batch, seqlen, nheads) = {(b, L, H)}, got "
                         f"{tuple(dt.shape)}{_swap_hint(dt.shape, (b, L, H))}")
    if tuple(A.shape) != (H,):
        hint = _LAYOUT_HINT if tuple(A.shape) == (L,) != (H,) else ""
        raise ValueError(f"{fn}: A must have shape (nheads,) = ({H},), got {tuple(A.shape)}{hint}")
    if B.dim() != 4 or B.shape[:2] != x.shape[:2]:
        hint = _LAYOUT_HINT if B.dim() == 4 and B.shape[0] == b and (B.shape[2] == L or
                                                                     B.shape[1] == H) else ""
        raise ValueError(f"{fn}: B must have shape (batch, seqlen, ngroups, dstate) with x's batch, "
                         f"seqlen {(b, L)}, got {tuple(B.shape)}{hint}")
    G = B.shape[2]
    if G == 0 or H % G != 0 or B.shape[3] == 0:
        raise ValueError(f"{fn}: B's ngroups must divide nheads={H} and dstate be >= 1, got {tuple(B.shape)}")
    if C.shape != B.shape:
        raise ValueError(f"{fn}: C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}")
    for name, t in (("B", B), ("C", C)):
        if t.dtype != x.dtype:
            raise TypeError(f"{fn}: {name} must have x's dtype {x.dtype}, got {t.dtype}")
    for name, t in (("dt", dt), ("A", A)):
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must have a floating dtype, got {t.dtype}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be a positive int, got {chunk_size!r}")
    if D is not None:
        check_tensor(fn, "D", D)
        if tuple(D.shape) not in ((H, P), (H,)):
            raise ValueError(f"{fn}: D must have shape (nheads, headdim) = {(H, P)} or (nheads,), got {tuple(D.shape)}")
    if z is not None:
        check_tensor(fn, "z", z)
        if z.shape != x.shape:
            raise ValueError(f"{fn}: z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}"
                             f"{_swap_hint(z.shape, x.shape)}")
    if dt_bias is not None:
        check_tensor(fn, "dt_bias", dt_bias)
        if tuple(dt_bias.shape) != (H,):
            raise ValueError(f"{fn}: dt_bias must have shape (nheads,) = ({H},), got {tuple(dt_bias.shape)}")
    if seq_idx is not None and cu_seqlens is None:
        raise ValueError(f"{fn}: seq_idx needs cu_seqlens as well (the kernels take packed sequences "
                         f"from cu_seqlens; seq_idx is then redundant)")
    if return_varlen_states and cu_seqlens is None:
        raise ValueError(f"{fn}: return_varlen_states=True needs cu_seqlens")
    N = b
    if cu_seqlens is not None:
        N = check_cu_seqlens(fn, cu_seqlens, b, L, axis="seqlen")
        if seq_idx is not None:
            check_tensor(fn, "seq_idx", seq_idx)
            if tuple(seq_idx.shape) != (b, L):
                raise ValueError(f"{fn}: seq_idx must have shape (batch, seqlen) = {(b, L)}, got {tuple(seq_idx.shape)}")
            if checks_values(seq_idx) and checks_values(cu_seqlens):
                lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long().cpu()
                expect = torch.repeat_interleave(torch.arange(N), lens)
                if not torch.equal(seq_idx[0].long().cpu(), expect):
                    raise ValueError(f"{fn}: seq_idx disagrees with cu_seqlens")
    if initial_states is not None:
        check_tensor(fn, "initial_states", initial_states)
        expect = (N, H, P, B.shape[3])
        if tuple(initial_states.shape) != expect:
            raise ValueError(f"{fn}: initial_states must have shape (N, nheads, headdim, dstate) = "
                             f"{expect} (N = batch, or the number of sequences with cu_seqlens), "
                             f"got {tuple(initial_states.shape)}"
                             f"{_LAYOUT_HINT if initial_states.shape[1:2] == (L,) != (H,) else ''}")
    check_same_device(fn, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias,
                      initial_states=initial_states, cu_seqlens=cu_seqlens)
    if checks_values(A) and bool((A > 0).any()):
        raise ValueError(f"{fn}: A must be <= 0 (a decay exp(dt * A) of at most 1), got a maximum "
                         f"of {A.max().item():.4g}")


def _fused_epilogue(x, dt, A, B, C, D, z, dt_bias, initial_states, backend) -> bool:
    """Whether the forward takes D and z into the kernel (eager inference on the Triton backend)."""
    if not FUSE_EPILOGUE or (D is None and z is None) or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in
                                       (x, dt, A, B, C, D, z, dt_bias, initial_states)):
        return False
    return select("ssd", _backend.normalize(backend), x, B) == "triton"


def mamba_chunk_scan_combined(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                              chunk_size: int, D: Optional[Tensor] = None,
                              z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None,
                              initial_states: Optional[Tensor] = None,
                              seq_idx: Optional[Tensor] = None,
                              cu_seqlens: Optional[Tensor] = None, dt_softplus: bool = False,
                              dt_limit=(0.0, float("inf")), return_final_states: bool = False,
                              return_varlen_states: bool = False, *,
                              backend: Optional[str] = None, process_group=None):
    """SSD, the Mamba-2 layer's scan, chunkwise parallel (drop-in for mamba-ssm's
    ``mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined``)::

        h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,    y_t = (h_t C_t + D x_t) * silu(z_t)

    Args:
        x: ``(batch, seqlen, nheads, headdim)`` float32, float16, bfloat16 (float64 on the
            reference backend); headdim <= 256 on the Triton backend.
        dt: ``(batch, seqlen, nheads)`` step sizes (any float dtype; used in float32).
        A: ``(nheads,)`` <= 0.
        B, C: ``(batch, seqlen, ngroups, dstate)`` in x's dtype, ngroups divides nheads; head h
            uses group ``h // (nheads // ngroups)``. dstate <= 256 on the Triton backend.
        chunk_size: accepted for compatibility; the kernels pick their own chunk length (the
            result is the same function).
        D: ``(nheads, headdim)`` or ``(nheads,)`` skip connection, optional.
        z: like x, optional gate: the output is multiplied by ``silu(z)``.
        dt_bias: ``(nheads,)`` added to dt before the softplus, optional.
        initial_states: ``(N, nheads, headdim, dstate)`` (N = batch, or the number of sequences
            with cu_seqlens), any float dtype, used in float32. Differentiable.
        seq_idx: ``(batch, seqlen)`` sequence index of every token; only together with
            cu_seqlens (which the kernels use; seq_idx is checked against it in debug mode).
        cu_seqlens: ``(N + 1,)`` int32/int64 offsets of packed sequences (batch must be 1). Unlike
            mamba-ssm, where it only selects the states returned, it also makes the sequences
            independent (each starts from its initial state, zeros by default), as seq_idx does.
        dt_softplus: ``dt = softplus(dt + dt_bias)``.
        dt_limit: ``(min, max)`` clamp applied to dt after the softplus.
        return_final_states: also return the final states ``(batch, nheads, headdim, dstate)``
            float32 (with cu_seqlens: the last sequence's, shape ``(1, ...)``).
        return_varlen_states: also return every sequence's final state ``(N, nheads, headdim,
            dstate)`` float32 (needs cu_seqlens).
        backend: keyword-only; None (env default), "auto", "triton" or "reference".
        process_group: keyword-only ``torch.distributed.ProcessGroup``: context parallelism, the
            seqlen axis is this rank's contiguous segment of one sequence (ranks in group order);
            see ``ssm_kernels.distributed``.

    Returns:
        ``out`` (batch, seqlen, nheads, headdim) in x's dtype; or ``(out, final_states)``;
        ``(out, varlen_states)``; ``(out, final_states, varlen_states)`` as mamba-ssm does.

    Example:
        >>> import torch, ssm_kernels
        >>> x = torch.randn(2, 50, 4, 16)
        >>> dt, A = torch.rand(2, 50, 4), -torch.rand(4)
        >>> B, C = torch.randn(2, 2, 50, 1, 8).unbind(0)
        >>> y, h = ssm_kernels.mamba_chunk_scan_combined(x, dt, A, B, C, 64, D=torch.ones(4),
        ...                                              return_final_states=True)
        >>> y.shape, h.shape
        (torch.Size([2, 50, 4, 16]), torch.Size([2, 4, 16, 8]))
    """
    if process_group is not None:
        from ..distributed import cp_mamba_chunk_scan_combined
        return cp_mamba_chunk_scan_combined(
            x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
            dt_softplus, dt_limit, return_final_states, return_varlen_states, backend=backend,
            process_group=process_group)
    _validate(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
              return_varlen_states)
    sd = _sd(x)
    dtp = process_dt(dt, dt_bias, dt_softplus, dt_limit).to(sd).contiguous()
    h0 = None if initial_states is None else initial_states.to(sd).transpose(-1, -2).contiguous()
    if _fused_epilogue(x, dt, A, B, C, D, z, dt_bias, initial_states, backend):
        from ..chunk.fwd import chunk_fwd
        Dd = None if D is None else (D.to(sd)[:, None] if D.dim() == 1 else D.to(sd)).expand(
            x.shape[2], x.shape[3]).contiguous()
        y, ht = chunk_fwd(C.contiguous(), B.contiguous(), x.contiguous(), None, h0, cu_seqlens,
                          1.0, vs=dtp, A=A.to(sd).contiguous(), D=Dd,
                          z=None if z is None else z.contiguous())
        D = z = None
    else:
        Dd = None
        if D is not None and FUSE_EPILOGUE:     # D inside the op (its epilogue, its backward)
            Dd = (D.to(sd)[:, None] if D.dim() == 1 else D.to(sd)).expand(
                x.shape[2], x.shape[3]).contiguous()
            D = None
        # save: a gradient will be taken (the engine keeps states only if SAVE_STATES says so,
        # and takes the old forward path for SSD training whatever SAVE_STATES is)
        save = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, dt, A, B, C, D, z, dt_bias,
                                                        initial_states))
        y, ht, _ = ssd_fwd_op(C.contiguous(), B.contiguous(), x.contiguous(), dtp,
                              A.to(sd).contiguous(), h0, cu_seqlens, _backend.normalize(backend),
                              Dd, save)
    if D is not None:
        Dd = D.to(sd)
        y = (y.to(sd) + x.to(sd) * (Dd[:, None] if Dd.dim() == 1 else Dd)).to(x.dtype)
    if z is not None:
        y = (y.to(sd) * F.silu(z.to(sd))).to(x.dtype)
    states = ht.transpose(-1, -2)                                           # [N, H, P, N_state]
    out = (y,)
    if return_final_states:
        out += (states if cu_seqlens is None else states[-1:],)
    if return_varlen_states:
        out += (states,)
    return out[0] if len(out) == 1 else out
