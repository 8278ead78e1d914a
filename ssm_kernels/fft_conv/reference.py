"""FFT convolution and S4D kernel generation in plain PyTorch: the specification.

`fft_conv_direct`  the O(L * Lk) direct causal convolution (the test oracle at small L).
`fft_conv_ref`     the rfft-based reference (any device; float64 capable; low precision storage
                   is computed in float32 and rounded to u's dtype, like a user's torch.fft code).
`fft_conv_bwd_ref` the backward by formula (used by the reference backend of the registered op):
                   the adjoint of a causal convolution is an anti-causal correlation, again an FFT
                   product, with the conjugate filter transform.
`s4d_kernel_ref`   the S4D (zero-order hold) convolution filter by an explicit (H, N, L) einsum.

Definitions (u, gates: (B, H, L); k: (H, Lk), Lk <= L; D: (H,)):
    v = u * pre_gate                        (if given)
    y[b,h,t] = sum_{s=0}^{min(t, Lk-1)} k[h,s] v[b,h,t-s] + D[h] v[b,h,t]
    y = y * post_gate                       (if given)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fft_size(L: int, Lk: int) -> int:
    """The smallest power of two >= L + Lk - 1: a linear (not circular) convolution."""
    n = L + Lk - 1
    return 1 << max(0, (n - 1).bit_length())


def _causal_conv_fft(v: Tensor, k: Tensor, L: int, conj: bool = False) -> Tensor:
    """sum_s k[s] v[t-s] (conj=False) or the correlation sum_s k[s] v[t+s] (conj=True), t < L."""
    n = fft_size(L, k.shape[-1])
    kf = torch.fft.rfft(k, n=n)
    if conj:
        kf = torch.conj_physical(kf)  # (a lazy conj view misbehaves under AOT tracing)
    return torch.fft.irfft(torch.fft.rfft(v, n=n) * kf, n=n)[..., :L]


def fft_conv_direct(u: Tensor, k: Tensor, D: Optional[Tensor] = None, *,
                    pre_gate: Optional[Tensor] = None, post_gate: Optional[Tensor] = None) -> Tensor:
    """The direct causal convolution (float64-capable test oracle); differentiable by autograd."""
    H, Lk = k.shape
    v = u if pre_gate is None else u * pre_gate
    y = F.conv1d(F.pad(v, (Lk - 1, 0)), k.flip(-1)[:, None, :].to(v.dtype), groups=H)
    if D is not None:
        y = y + D[:, None].to(v.dtype) * v
    return y if post_gate is None else y * post_gate


def fft_conv_ref(u: Tensor, k: Tensor, D: Optional[Tensor] = None, *,
                 pre_gate: Optional[Tensor] = None, post_gate: Optional[Tensor] = None) -> Tensor:
    """Causal long convolution with torch.fft (the way users write it); differentiable by autograd.

    Same contract as `ssm_kernels.fft_conv` (shapes in the module docstring); computes in float64
    for float64 inputs and in float32 otherwise; returns u's dtype.
    """
    cd = compute_dtype(u.dtype)
    L = u.shape[-1]
    v = u.to(cd) if pre_gate is None else u.to(cd) * pre_gate.to(cd)
    y = _causal_conv_fft(v, k.to(cd), L)
    if D is not None:
        y = y + D.to(cd)[:, None] * v
    if post_gate is not None:
        y = y * post_gate.to(cd)
    return y.to(u.dtype)


def fft_conv_fwd_ref(u, k, D, pre_gate, post_gate) -> Tensor:
    return fft_conv_ref(u, k, D, pre_gate=pre_gate, post_gate=post_gate)


def fft_conv_bwd_ref(dy: Tensor, u: Tensor, k: Tensor, D: Optional[Tensor],
                     pre_gate: Optional[Tensor], post_gate: Optional[Tensor]):
    """Gradients (du, dk, dD, dpre_gate, dpost_gate) by formula; absent inputs get None.

    g = dy * post_gate;  dv = corr(g, k) + D g;  du = dv * pre_gate;  dpre = dv * u;
    dk[s] = sum_{b,t} g[b,t] v[b,t-s];  dD = sum_{b,t} g v;  dpost = dy * (conv(v, k) + D v).
    Batch sums run in the compute dtype (float32 for low-precision storage).
    """
    cd = compute_dtype(u.dtype)
    L, Lk = u.shape[-1], k.shape[-1]
    u_, k_ = u.to(cd), k.to(cd)
    v = u_ if pre_gate is None else u_ * pre_gate.to(cd)
    g = dy.to(cd) if post_gate is None else dy.to(cd) * post_gate.to(cd)
    dv = _causal_conv_fft(g, k_, L, conj=True)
    if D is not None:
        dv = dv + D.to(cd)[:, None] * g
    # dk[s] = sum_t g[t] v[t-s]: the correlation of g with v, summed over the batch in frequency
    n = fft_size(L, Lk)
    dk = torch.fft.irfft((torch.fft.rfft(g, n=n) * torch.conj_physical(torch.fft.rfft(v, n=n))).sum(0), n=n)[..., :Lk]
    dD = None if D is None else (g * v).sum((0, 2)).to(D.dtype)
    dpre = None if pre_gate is None else (dv * u_).to(pre_gate.dtype)
    dpost = None
    if post_gate is not None:
        y = _causal_conv_fft(v, k_, L)
        if D is not None:
            y = y + D.to(cd)[:, None] * v
        dpost = (dy.to(cd) * y).to(post_gate.dtype)
    du = dv if pre_gate is None else dv * pre_gate.to(cd)
    return du.to(u.dtype), dk.to(k.dtype), dD, dpre, dpost


# ---- S4D -------------------------------------------------------------------------------------

def s4d_kernel_ref(log_dt: Tensor, A: Tensor, C: Tensor, L: int) -> Tensor:
    """K[h, l] = 2 Re( sum_n C[h,n] (exp(dt_h A[h,n]) - 1) / A[h,n] * exp(dt_h A[h,n] l) ).

    Materialises (H, N, L); float64-capable (complex128 A, C with float64 log_dt); differentiable.
    """
    dtA = torch.exp(log_dt)[:, None] * A                      # (H, N)
    W = C * (torch.exp(dtA) - 1.0) / A                        # (H, N)
    rdt = torch.float64 if log_dt.dtype == torch.float64 else torch.float32
    ls = torch.arange(L, device=A.device, dtype=rdt)
    vand = torch.exp(dtA[:, :, None] * ls)                    # (H, N, L)
    return 2.0 * torch.einsum("hn,hnl->hl", W, vand).real


def vandermonde_ref(W: Tensor, dt: Tensor, A: Tensor, L: int) -> Tensor:
    """K[h, l] = 2 Re sum_n W[h,n] exp(dt[h] A[h,n] l) (materialises (H, N, L))."""
    rdt = torch.float64 if W.dtype == torch.complex128 else torch.float32
    ls = torch.arange(L, device=W.device, dtype=rdt)
    return 2.0 * torch.einsum("hn,hnl->hl", W, torch.exp((dt[:, None] * A)[:, :, None] * ls)).real


def vandermonde_bwd_ref(W: Tensor, dt: Tensor, A: Tensor, dK: Tensor):
    """Gradients of sum_l dK[h,l] K[h,l] (torch's complex convention) for W, A and dt:
    gW = 2 conj(S1), gA = 2 dt conj(W S2), gdt = 2 Re sum_n W A S2, with S1 = sum_l dK z^l,
    S2 = sum_l dK l z^l, z^l = exp(dt A l)."""
    S1, S2 = vandermonde_sums_ref(W, dt, A, dK)
    return vandermonde_grads(W, dt, A, S1, S2)


def vandermonde_sums_ref(W: Tensor, dt: Tensor, A: Tensor, dK: Tensor):
    """(S1, S2) = (sum_l dK z^l, sum_l dK l z^l) per (h, n)."""
    L = dK.shape[-1]
    rdt = torch.float64 if W.dtype == torch.complex128 else torch.float32
    ls = torch.arange(L, device=W.device, dtype=rdt)
    vand = torch.exp((dt[:, None] * A)[:, :, None] * ls)
    dKc = dK.to(rdt)
    return (torch.einsum("hl,hnl->hn", dKc.to(vand.dtype), vand),
            torch.einsum("hl,hnl->hn", (dKc * ls).to(vand.dtype), vand))


def vandermonde_grads(W: Tensor, dt: Tensor, A: Tensor, S1: Tensor, S2: Tensor):
    """(gW, gA, gdt) from the sums (see vandermonde_bwd_ref)."""
    WS2 = W * S2
    return 2.0 * torch.conj_physical(S1), 2.0 * dt[:, None] * torch.conj_physical(WS2), 2.0 * (WS2 * A).real.sum(1)
