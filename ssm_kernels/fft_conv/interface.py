"""fft_conv and s4d_kernel: registered ops -> autograd -> the documented public functions."""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backend
from .._ops import _PLAIN, _is_compiling, cached_on_metadata, kernel_op
from ..validation import check_same_device, check_shape, check_tensor, empty_result
from .reference import fft_conv_bwd_ref, fft_conv_fwd_ref, vandermonde_grads, vandermonde_ref

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_U_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@cached_on_metadata
def _select(op: str, backend: str, x: Tensor) -> str:
    def triton_ok():
        reason = _backend.triton_reason(x.device)
        if reason is None and x.dtype not in _TRITON_DTYPES:
            reason = f"dtype {x.dtype} (the Triton kernel takes {_TRITON_DTYPES})"
        return reason

    return _backend.resolve(op, backend, {"triton": triton_ok, "reference": lambda: None})


# ---- which Triton-backend path serves a call --------------------------------------------------
# "cufft": Triton glue kernels fused around torch.fft (cufft.py): every dtype and length.
# "monarch": the tensor-core DFT-as-matmul kernels (triton.py), on-chip plans only, used for 16-bit
# storage where the table says they are faster. Transform sizes n (Monarch's power of two) up to
# MONARCH_MAX_N[(pass, dtype)] take Monarch; fp32 never does (tf32x3 costs ~10x a real FFT's
# FLOPs: 0.69 ms vs torch.fft's 0.25 at B=8 H=768 L=1024 on the H200, issue #11).
# PROVISIONAL until bench/gpu_fft.py runs (it prints the measured crossover): the forward bf16
# on-chip kernel measured 0.136 ms at L=1024 (n=2048) against an estimated ~0.12-0.15 ms for the
# cuFFT path (0.48 GB of traffic); its backward measured 0.78 ms there against an estimated
# 0.25 ms for the cuFFT path, so the backward never takes Monarch.
MONARCH_MAX_N = {
    ("fwd", torch.bfloat16): 2048, ("fwd", torch.float16): 2048,
    ("bwd", torch.bfloat16): 0, ("bwd", torch.float16): 0,
}
# tests and benchmarks force one path ("cufft" / "monarch" / "monarch16"); None: the table decides
FORCE_PATH: Optional[str] = None
# "monarch16" (monarch16.py): the on-chip fp16-tensor-core kernels for bf16 / fp16 storage with a
# power-of-two transform size <= monarch16.MAX_N (8192: L <= 4096 with Lk <= L): the forward and
# the backward (du, dk, dD and the gates' gradients in one kernel per channel slice + one inverse
# for dk). ON by default since the session-5 H100 run (B8 H768, D on, ms; all checks vs float64
# passed): forward 0.069 / 0.168 / 0.284 at L = 1024 / 2048 / 4096 against torch's 0.346 / 0.661 /
# 1.274 (the cuFFT path: 0.133 / - / 0.472 on the H200 in session 2); backward 0.101 / 0.329 / 0.880 against
# the cuFFT backward's 0.468 / 0.490 / 0.942. With a post gate the monarch16 backward runs two more
# transforms per pair (5 instead of 3) and at N = 8192 it lost: 1.687 vs the cuFFT backward's 1.340
# (L = 4096, both gates); so a post-gated backward with N >= MONARCH16_BWD_CUFFT_POST_N goes
# through the cuFFT path (autograd then mixes paths; the backward recomputes everything from u, so
# nothing is shared). MONARCH16_BWD_CUFFT = True sends every backward to the cuFFT path (also under
# FORCE_PATH = "monarch16"); MONARCH16 = False restores the pre-session-5 table (cuFFT path, old
# Monarch forward up to MONARCH_MAX_N).
MONARCH16 = True
MONARCH16_BWD_CUFFT = False
MONARCH16_BWD_CUFFT_POST_N = 8192
# float32 forward on the monarch16 kernels with every product split into three fp16 tensor-core
# dots (monarch16._monarch16_f32_fwd_kernel; ~22-bit products, the float32 bound holds) for
# transform sizes N <= MONARCH16_F32_MAX_N; the fp32 backward stays on the cuFFT path. Measured on
# the H100 (session 10, bench/gpu_fft9.py, B8 H768): L=1024 (N 2048) 0.117 vs cuFFT path 0.182 ms,
# L=2048 (N 4096) 0.264 vs 0.353; L=4096 (N 8192) 0.688 vs 0.675 (no gain, register-bound: 255
# regs, 18 B spilled), so it serves N <= 4096.
MONARCH16_F32 = True
MONARCH16_F32_MAX_N = 4096


@functools.lru_cache(maxsize=4096)
def _auto_path(pass_: str, dtype: torch.dtype, L: int, Lk: int, monarch16: bool = False,
               bwd_cufft: bool = False, post: bool = False, post_n: int = 0,
               f32_max_n: int = 0) -> str:
    if f32_max_n and pass_ == "fwd" and dtype == torch.float32:
        from .monarch16 import supports, transform_size
        if supports(L, Lk) and transform_size(L, Lk) <= f32_max_n:
            return "monarch16"
    if monarch16 and dtype in (torch.float16, torch.bfloat16) and not (pass_ == "bwd" and bwd_cufft):
        from .monarch16 import supports, transform_size
        if supports(L, Lk) and not (pass_ == "bwd" and post and transform_size(L, Lk) >= post_n):
            return "monarch16"
    from .triton import _prec, plan
    limit = MONARCH_MAX_N.get((pass_, dtype), 0)
    if limit:
        kind = plan(L, Lk, _prec(dtype), pass_)
        if kind[0] == "onchip" and kind[1] <= limit:
            return "monarch"
    return "cufft"


def triton_path(pass_: str, u: Tensor, Lk: int, post: bool = False) -> str:
    """The path ("cufft", "monarch" or "monarch16") the Triton backend takes for pass_ ("fwd" /
    "bwd"); post: the call has a post gate (decides the backward at N >= 8192). "monarch16"
    with MONARCH16 on (the default) or forced; the backward not with MONARCH16_BWD_CUFFT."""
    if FORCE_PATH is not None:
        if FORCE_PATH == "monarch16" and pass_ == "bwd" and (MONARCH16_BWD_CUFFT
                                                             or u.dtype == torch.float32):
            return "cufft"   # (monarch16 has no float32 backward)
        return FORCE_PATH
    return _auto_path(pass_, u.dtype, u.shape[-1], Lk, MONARCH16, MONARCH16_BWD_CUFFT, post,
                      MONARCH16_BWD_CUFFT_POST_N, MONARCH16_F32_MAX_N if MONARCH16_F32 else 0)


def _f32(x: Optional[Tensor]) -> Optional[Tensor]:
    """x in float32, contiguous (no `.to` call when it already is: ~1 us of host time each)."""
    if x is None:
        return None
    return (x if x.dtype is _FP32 else x.to(_FP32)).contiguous()


_FP32 = torch.float32
_MODULES: dict = {}


def _module(path: str):
    """The module serving `path` ("cufft", "monarch16", "monarch": triton.py), imported once (an
    import statement per call costs host time); its fft_conv_fwd / fft_conv_bwd are looked up on
    every call (tests patch them)."""
    mod = _MODULES.get(path)
    if mod is None:
        import importlib
        mod = _MODULES[path] = importlib.import_module(
            {"cufft": ".cufft", "monarch16": ".monarch16"}.get(path, ".triton"), __package__)
    return mod


# ---- fft_conv: registered ops (u, gates [B, H, L] contiguous; k [H, Lk]; D [H]) ----------------

@kernel_op("fft_conv_fwd", mutates_args=())
def fft_conv_fwd_op(u: Tensor, k: Tensor, D: Optional[Tensor], pre_gate: Optional[Tensor],
                    post_gate: Optional[Tensor], backend: str) -> Tensor:
    if _select("fft_conv", backend, u) == "triton":
        return _module(triton_path("fwd", u, k.shape[1])).fft_conv_fwd(u, _f32(k), _f32(D),
                                                                        pre_gate, post_gate)
    return fft_conv_fwd_ref(u, k, D, pre_gate, post_gate).contiguous()


@fft_conv_fwd_op.register_fake
def _(u, k, D, pre_gate, post_gate, backend):
    return torch.empty_like(u)


def _conv_bwd(dy: Tensor, u: Tensor, k: Tensor, D: Optional[Tensor], pre_gate: Optional[Tensor],
              post_gate: Optional[Tensor], backend: str):
    """(du, dk, dD, dpre_gate, dpost_gate) in the inputs' dtypes, contiguous; None for an absent
    input (what autograd wants; the registered op turns those into empty tensors)."""
    if _select("fft_conv", backend, u) == "triton":
        mod = _module(triton_path("bwd", u, k.shape[1], post_gate is not None))
        du, dk, dD, dpre, dpost = mod.fft_conv_bwd(dy, u, _f32(k), _f32(D), pre_gate, post_gate)
    else:
        du, dk, dD, dpre, dpost = fft_conv_bwd_ref(dy, u, k, D, pre_gate, post_gate)
    # (a `.to` only where the dtype differs: each costs ~1 us of host time even when a no-op)
    return (du.contiguous(), (dk if dk.dtype is k.dtype else dk.to(k.dtype)).contiguous(),
            None if D is None else (dD if dD.dtype is D.dtype else dD.to(D.dtype)).contiguous(),
            None if dpre is None else dpre.contiguous(),
            None if dpost is None else dpost.contiguous())


@kernel_op("fft_conv_bwd", mutates_args=())
def fft_conv_bwd_op(dy: Tensor, u: Tensor, k: Tensor, D: Optional[Tensor],
                    pre_gate: Optional[Tensor], post_gate: Optional[Tensor],
                    backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(du, dk, dD, dpre_gate, dpost_gate); an absent input's gradient is an empty tensor."""
    g = _conv_bwd(dy, u, k, D, pre_gate, post_gate, backend)
    return tuple(u.new_empty(0) if x is None else x for x in g)


@fft_conv_bwd_op.register_fake
def _(dy, u, k, D, pre_gate, post_gate, backend):
    return (torch.empty_like(u), torch.empty_like(k),
            u.new_empty(0) if D is None else torch.empty_like(D),
            u.new_empty(0) if pre_gate is None else torch.empty_like(pre_gate),
            u.new_empty(0) if post_gate is None else torch.empty_like(post_gate))


def _conv_setup(ctx, inputs, output):
    u, k, D, pre_gate, post_gate, backend = inputs
    ctx.save_for_backward(u, k, D, pre_gate, post_gate)
    ctx.backend = backend


def _conv_backward(ctx, dy):
    u, k, D, pre_gate, post_gate = ctx.saved_tensors
    dy = dy.contiguous()
    if _is_compiling() or type(dy) not in _PLAIN:  # traced: the registered op
        du, dk, dD, dpre, dpost = fft_conv_bwd_op(dy, u, k, D, pre_gate, post_gate, ctx.backend)
    else:  # eager: the implementation itself (no empty tensors for absent inputs)
        du, dk, dD, dpre, dpost = _conv_bwd(dy, u, k, D, pre_gate, post_gate, ctx.backend)
    return (du, dk, None if D is None else dD, None if pre_gate is None else dpre,
            None if post_gate is None else dpost, None)


fft_conv_fwd_op.register_autograd(_conv_backward, setup_context=_conv_setup)


@cached_on_metadata(typed=True)
def _check_conv(u, k, D, pre_gate, post_gate) -> None:
    """Every argument check of fft_conv (metadata only: memoised on it)."""
    check_tensor("fft_conv", "u", u, rank=3)
    check_tensor("fft_conv", "k", k, rank=2)
    if u.is_complex() or u.dtype not in _U_DTYPES:
        raise TypeError(f"fft_conv: u must have dtype in {_U_DTYPES} (real), got {u.dtype}")
    if not k.is_floating_point():
        raise TypeError(f"fft_conv: k must have a real floating dtype (float32), got {k.dtype}")
    B, H, L = u.shape
    if L == 0:
        raise ValueError(f"fft_conv: u must have length L >= 1 along its last axis, got shape {tuple(u.shape)}")
    if k.shape[0] != H:
        raise ValueError(f"fft_conv: k must have shape (H, Lk) with H = {H} (u's dim 1), "
                         f"got {tuple(k.shape)}")
    if not 1 <= k.shape[1] <= L:
        raise ValueError(f"fft_conv: k's length Lk must satisfy 1 <= Lk <= L = {L}, got "
                         f"k of shape {tuple(k.shape)}")
    if D is not None:
        check_tensor("fft_conv", "D", D)
        if not D.is_floating_point():
            raise TypeError(f"fft_conv: D must have a real floating dtype (float32), got {D.dtype}")
        check_shape("fft_conv", "D", D, (H,))
    for name, gate in (("pre_gate", pre_gate), ("post_gate", post_gate)):
        if gate is not None:
            check_tensor("fft_conv", name, gate)
            check_shape("fft_conv", name, gate, tuple(u.shape))
            if gate.dtype != u.dtype:
                raise TypeError(f"fft_conv: {name} must have u's dtype {u.dtype}, got {gate.dtype}")
    check_same_device("fft_conv", u=u, k=k, D=D, pre_gate=pre_gate, post_gate=post_gate)


def fft_conv(u: Tensor, k: Tensor, D: Optional[Tensor] = None, *, pre_gate: Optional[Tensor] = None,
             post_gate: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """Causal long convolution (Hyena, H3, M2, S4-family layers), channel by channel.

    ``v = u * pre_gate``;  ``y[b,h,t] = sum_{s<=t} k[h,s] v[b,h,t-s] + D[h] v[b,h,t]``;
    ``y = y * post_gate``. Linear (not circular): the transform size (>= L + Lk - 1) is picked
    inside, so any L >= 1 works. The Triton backend runs, for bf16 / fp16 storage with a
    power-of-two transform of at most 8192 points (L + Lk - 1 <= 8192, e.g. L <= 4096), one
    on-chip fp16-tensor-core Monarch kernel per pass (monarch16.py; a post-gated backward at
    8192 points goes through cuFFT, measured faster there), and otherwise Triton kernels fused
    around cuFFT (torch.fft; an even 7-smooth size) for every dtype and length.
    ``ssm_kernels.fft_conv.interface.MONARCH16 = False`` turns the on-chip kernels off. Their
    16-bit arithmetic puts dk at ~6e-4 relative error (the cuFFT path: ~1e-7).
    ``interface.MONARCH16_F32 = True`` (experimental, off) runs float32 forwards with N <= 8192
    on the same on-chip kernels with every product split into three fp16 dots (~3e-7).
    The filter's spectrum is cached while the same filter tensor is unchanged (its version
    counter; never while capturing a CUDA graph): see ``ssm_kernels.fft_conv.cufft``.

    Args:
        u: ``(B, H, L)`` input, float32, float16 or bfloat16 (float64 on the reference backend),
            L >= 1; arithmetic is float32 whatever the storage.
        k: ``(H, Lk)`` filter, 1 <= Lk <= L (shorter filters are zero-padded), float32 (any real
            floating dtype is accepted and used in float32; float64 with float64 u).
        D: ``(H,)`` skip weight, float32, or None.
        pre_gate: ``(B, H, L)`` multiplier applied to u before the convolution, u's dtype, or None.
        post_gate: ``(B, H, L)`` multiplier applied to the output, u's dtype, or None.
        backend: None (env SSM_KERNELS_BACKEND, default "auto"), "auto", "triton" or "reference".
            An explicit backend that cannot serve the call raises.

    Returns:
        ``y`` of shape ``(B, H, L)`` in u's dtype. Differentiable in u, k, D and both gates (k's
        and D's gradients are accumulated over the batch in float32, deterministically).
        Non-contiguous inputs are copied to contiguous ones.

    Example:
        >>> import torch, ssm_kernels
        >>> u = torch.randn(2, 4, 1000)
        >>> k = torch.randn(4, 1000) / 30
        >>> y = ssm_kernels.fft_conv(u, k, torch.randn(4), post_gate=torch.sigmoid(u))
        >>> y.shape
        torch.Size([2, 4, 1000])
    """
    _check_conv(u, k, D, pre_gate, post_gate)
    B, H, L = u.shape
    if B == 0 or H == 0:  # nothing to transform (and the FFT libraries refuse empty batches)
        return empty_result((B, H, L), u, u, k, D, pre_gate, post_gate)
    # (inline conditionals: no closure built and called three times per call)
    return fft_conv_fwd_op(u.contiguous(), k.contiguous(), None if D is None else D.contiguous(),
                           None if pre_gate is None else pre_gate.contiguous(),
                           None if post_gate is None else post_gate.contiguous(),
                           _backend.normalize(backend))


# ---- s4d_kernel: registered Vandermonde ops ------------------------------------------------------
# Complex tensors travel as real / imaginary parts; dt as a [H, 2] (hi, lo) pair whose sum is the
# float64 step (the kernel forms dt * A * l in double-float, see s4d.py).

def _c64(wr, wi, ar, ai, dt2):
    d = torch.float64
    return (torch.complex(wr.to(d), wi.to(d)), dt2.to(d).sum(1), torch.complex(ar.to(d), ai.to(d)))


@kernel_op("s4d_vandermonde", mutates_args=())
def s4d_vandermonde_op(wr: Tensor, wi: Tensor, ar: Tensor, ai: Tensor, dt2: Tensor, L: int,
                       backend: str) -> Tensor:
    if _select("s4d_kernel", backend, wr) == "triton":
        from .s4d import vandermonde_fwd
        # the parts as they come (s4d_kernel's are strided views of complex64 W and A: no copies)
        return vandermonde_fwd(*(x.float() for x in (wr, wi, ar, ai)), dt2.float().contiguous(), L)
    # the reference evaluates in float64 and returns the input precision
    return vandermonde_ref(*_c64(wr, wi, ar, ai, dt2), L).to(wr.dtype).contiguous()


@s4d_vandermonde_op.register_fake
def _(wr, wi, ar, ai, dt2, L, backend):
    return wr.new_empty((wr.shape[0], L))


@kernel_op("s4d_vandermonde_bwd", mutates_args=())
def s4d_vandermonde_bwd_op(wr: Tensor, wi: Tensor, ar: Tensor, ai: Tensor, dt2: Tensor, dK: Tensor,
                           backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients for (wr, wi, ar, ai, dt2); both columns of dt2 get d/d(dt)."""
    W, dt, A = _c64(wr, wi, ar, ai, dt2)
    if _select("s4d_kernel", backend, wr) == "triton":
        from .s4d import vandermonde_sums
        S1, S2 = vandermonde_sums(*(x.float().contiguous() for x in (ar, ai, dt2, dK)))
        S1, S2 = S1.to(torch.complex128), S2.to(torch.complex128)
    else:
        from .reference import vandermonde_sums_ref
        S1, S2 = vandermonde_sums_ref(W, dt, A, dK.to(torch.float64))
    gW, gA, gdt = vandermonde_grads(W, dt, A, S1, S2)  # float64: the sum over modes cancels
    return (gW.real.to(wr.dtype).contiguous(), gW.imag.to(wr.dtype).contiguous(),
            gA.real.to(ar.dtype).contiguous(), gA.imag.to(ar.dtype).contiguous(),
            gdt[:, None].expand(-1, 2).to(dt2.dtype).contiguous())


@s4d_vandermonde_bwd_op.register_fake
def _(wr, wi, ar, ai, dt2, dK, backend):
    return (torch.empty_like(wr), torch.empty_like(wi), torch.empty_like(ar), torch.empty_like(ai),
            torch.empty_like(dt2))


def _vand_setup(ctx, inputs, output):
    wr, wi, ar, ai, dt2, L, backend = inputs
    ctx.save_for_backward(wr, wi, ar, ai, dt2)
    ctx.backend = backend


def _vand_backward(ctx, dK):
    if dK is None:   # no gradient reached K (gradients are not materialised on the eager path)
        return (None,) * 7
    g = s4d_vandermonde_bwd_op(*ctx.saved_tensors, dK.contiguous(), ctx.backend)
    return (*g, None, None)


s4d_vandermonde_op.register_autograd(_vand_backward, setup_context=_vand_setup)


def _expm1_complex(z: Tensor) -> Tensor:
    """exp(z) - 1 without cancellation for small |z| (dt A is often ~1e-3): 2 exp(z/2) sinh(z/2),
    5 complex kernels (the real / imaginary formula expm1(a) cos b - 2 sin^2(b/2) + i e^a sin b
    took 12: issue 8, s4d_kernel's graph replay is these kernels). Relative error <= 4.5e-16 for
    |z| from 1e-14 to 300 against mpmath (the real-part formula's 2.2-4.4e-16), in float64
    before the float32 rounding."""
    h = 0.5 * z
    return torch.exp(h) * torch.sinh(h) * 2.0   # out of place: exp's autograd saves its result


def s4d_kernel(log_dt: Tensor, A: Tensor, C: Tensor, L: int, *, backend: Optional[str] = None) -> Tensor:
    """The S4D convolution filter (zero-order hold; one of each conjugate pair stored).

    ``K[h, l] = 2 Re( sum_n C[h,n] (exp(dt_h A[h,n]) - 1) / A[h,n] * exp(dt_h A[h,n] l) )``,
    ``dt = exp(log_dt)``, computed by a fused Vandermonde kernel that never materialises
    ``(H, N, L)``.

    Args:
        log_dt: ``(H,)`` float32 (float64 on the reference backend), log step sizes.
        A: ``(H, N)`` complex64 state matrix diagonal (Re(A) < 0 for a stable filter; A != 0).
        C: ``(H, N)`` complex64 output projection.
        L: filter length, an int >= 1 (< 2^24 on the Triton backend).
        backend: None / "auto" / "triton" / "reference".

    Returns:
        ``K`` of shape ``(H, L)``, float32 (float64 for complex128 inputs), ready for
        ``fft_conv``; differentiable in log_dt, A and C (complex gradients in torch's convention).

    Example:
        >>> import torch, ssm_kernels
        >>> H, N = 4, 32
        >>> log_dt = torch.rand(H) * 4 - 7
        >>> A = torch.complex(-0.5 * torch.ones(H, N), 3.14159 * torch.arange(N).float().expand(H, N))
        >>> C = torch.randn(H, N, dtype=torch.complex64)
        >>> ssm_kernels.s4d_kernel(log_dt, A, C, 1024).shape
        torch.Size([4, 1024])
    """
    check_tensor("s4d_kernel", "log_dt", log_dt, rank=1)
    check_tensor("s4d_kernel", "A", A, rank=2)
    check_tensor("s4d_kernel", "C", C, rank=2)
    if log_dt.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"s4d_kernel: log_dt must be float32 (or float64), got {log_dt.dtype}")
    for name, x in (("A", A), ("C", C)):
        if x.dtype not in (torch.complex64, torch.complex128):
            raise TypeError(f"s4d_kernel: {name} must be complex64 (or complex128), got {x.dtype}")
    H = log_dt.shape[0]
    check_shape("s4d_kernel", "A", A, (H, None))
    check_shape("s4d_kernel", "C", C, tuple(A.shape))
    if isinstance(L, bool) or not isinstance(L, int) or L < 1:
        raise ValueError(f"s4d_kernel: L must be an int >= 1, got {L!r}")
    check_same_device("s4d_kernel", log_dt=log_dt, A=A, C=C)
    hi = torch.complex128 in (A.dtype, C.dtype) or log_dt.dtype == torch.float64
    # the per-mode weights (H x N, tiny) in float64; dt enters the kernel as an fp32 (hi, lo) pair
    dt = torch.exp(log_dt.to(torch.float64))
    A64 = A.to(torch.complex128)
    W = C.to(torch.complex128) * _expm1_complex(dt[:, None] * A64) / A64
    if hi:
        dt2 = torch.stack([dt, torch.zeros_like(dt)], 1)
        A = A64
    else:
        dt_hi = dt.to(torch.float32)
        dt2 = torch.stack([dt_hi, (dt - dt_hi.to(torch.float64)).to(torch.float32)], 1)
        W = W.to(torch.complex64)
    return s4d_vandermonde_op(W.real, W.imag, A.real, A.imag, dt2, int(L), _backend.normalize(backend))
