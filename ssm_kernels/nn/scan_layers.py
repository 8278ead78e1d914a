"""Layers on the first-order diagonal recurrence `linear_scan`: MinGRU, MinLSTM (Feng et al. 2024,
"Were RNNs all we needed?"), Griffin's RG-LRU recurrent block (De et al. 2024) and the LRU
(Orvieto et al. 2023, complex diagonal).

All gates are formed in float32 from log-space quantities (``log a = -softplus(.)``, never a
cumulative product or a division), and the recurrence ``h_t = a_t h_{t-1} + b_t`` runs in
float32 (complex64 for the LRU) whatever the activation dtype, so nothing underflows at long
lengths. Packed sequences (``cu_seqlens``) zero the decay at each sequence's first step, which
restarts the state on the plain scan (no host synchronisation).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..linear_scan import linear_scan
from ._common import ShortConvolution, as_token, cache_input, last_steps, reset_mask


def _state_dtype(x: Tensor):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _log_g(h: Tensor) -> Tensor:
    # minGRU's positive "g": x + 0.5 for x >= 0, sigmoid(x) below (continuous, > 0); in log space
    return torch.where(h >= 0, torch.log(F.relu(h) + 0.5), -F.softplus(-h))


def _scan(module, a: Tensor, b: Tensor, cu_seqlens, cache, key="h"):
    """h_t = a_t h_{t-1} + b_t over [B, T, D]; restarts at packed boundaries; cache in/out."""
    if cu_seqlens is not None:
        a = a * reset_mask(cu_seqlens, a.shape[1], a.real.dtype if a.is_complex() else a.dtype)[None, :, None]
        if cache is not None:
            h = linear_scan(a, b, dim=1, backend=module.backend)
            with torch.no_grad():
                cache[key].copy_(last_steps(h, cu_seqlens))
            return h
    h0 = None if cache is None else cache_input(cache[key])
    r = linear_scan(a, b, h0, dim=1, output_final_state=cache is not None, backend=module.backend)
    if cache is not None:
        r, last = r
        with torch.no_grad():
            cache[key].copy_(last)
    return r


class _ScanLayer(nn.Module):
    state_size: int

    def allocate_cache(self, batch_size: int, dtype=None, device=None) -> dict:
        """``h [B, state]`` zeros (float32; float64 for float64 layers). Packed forward calls
        (``cu_seqlens``) write one row per sequence and start from zeros."""
        p = next(self.parameters())
        sd = torch.float64 if (dtype or p.dtype) == torch.float64 else torch.float32
        return {"h": torch.zeros(batch_size, self.state_size, device=device or p.device, dtype=sd)}


class MinGRU(_ScanLayer):
    """minGRU: ``z = sigmoid(k)``, ``h_t = (1 - z_t) h_{t-1} + z_t g(h~_t)`` from one projection
    ``to_hidden_and_gate`` (names as in the minGRU-pytorch reference), then ``to_out``.
    Parallel form on `linear_scan`; ``step`` is the same recurrence one token at a time."""

    def __init__(self, dim: int, expansion_factor: float = 1.0, proj_out: Optional[bool] = None,
                 *, backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.dim_inner = self.state_size = int(dim * expansion_factor)
        proj_out = expansion_factor != 1.0 if proj_out is None else proj_out
        self.backend = backend
        self.to_hidden_and_gate = nn.Linear(dim, 2 * self.dim_inner, bias=False, **fk)
        self.to_out = nn.Linear(self.dim_inner, dim, bias=False, **fk) if proj_out else nn.Identity()

    def _coeffs(self, x):
        hidden, gate = self.to_hidden_and_gate(x).to(_state_dtype(x)).chunk(2, dim=-1)
        a = torch.exp(-F.softplus(gate))                       # 1 - z
        b = torch.exp(-F.softplus(-gate) + _log_g(hidden))     # z * g(h~)
        return a, b

    def forward(self, x: Tensor, cu_seqlens: Optional[Tensor] = None,
                cache: Optional[dict] = None) -> Tensor:
        a, b = self._coeffs(x)
        return self.to_out(_scan(self, a, b, cu_seqlens, cache).to(x.dtype))

    def step(self, x_t: Tensor, cache: dict) -> Tensor:
        x_t, restore = as_token(x_t)
        a, b = self._coeffs(x_t)
        h = cache["h"]
        h.copy_(a * h + b)
        return restore(self.to_out(h.to(x_t.dtype, copy=True)))


class MinLSTM(_ScanLayer):
    """minLSTM: forget/input gates normalised to sum to one, ``h_t = f'_t h_{t-1} + i'_t g(h~_t)``,
    with ``f' = f / (f + i)`` computed as ``exp(-softplus(softplus(-k_f) - softplus(-k_i)))``."""

    def __init__(self, dim: int, expansion_factor: float = 1.0, proj_out: Optional[bool] = None,
                 *, backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.dim_inner = self.state_size = int(dim * expansion_factor)
        proj_out = expansion_factor != 1.0 if proj_out is None else proj_out
        self.backend = backend
        self.to_hidden_and_gates = nn.Linear(dim, 3 * self.dim_inner, bias=False, **fk)
        self.to_out = nn.Linear(self.dim_inner, dim, bias=False, **fk) if proj_out else nn.Identity()

    def _coeffs(self, x):
        hidden, fg, ig = self.to_hidden_and_gates(x).to(_state_dtype(x)).chunk(3, dim=-1)
        diff = F.softplus(-fg) - F.softplus(-ig)               # log i - log f
        a = torch.exp(-F.softplus(diff))                       # f / (f + i)
        b = torch.exp(-F.softplus(-diff) + _log_g(hidden))     # i / (f + i) * g(h~)
        return a, b

    forward = MinGRU.forward
    step = MinGRU.step


def _sqrt_bounded(v: Tensor, eps: float = 1e-12) -> Tensor:
    """sqrt(v) for v >= 0 with a finite gradient at 0 (zero below eps; sqrt's is infinite)."""
    return torch.where(v > eps, torch.sqrt(v.clamp_min(eps)), torch.sqrt(v.clamp_min(0)).detach())


class _BlockDiagonalLinear(nn.Module):
    """``y[..., h, :] = x[..., h, :] @ w[h] + b[h]`` over ``num_heads`` blocks (Griffin's gates)."""

    def __init__(self, width: int, num_heads: int, device=None, dtype=None):
        super().__init__()
        self.num_heads, self.block = num_heads, width // num_heads
        self.w = nn.Parameter(torch.randn(num_heads, self.block, self.block, device=device, dtype=dtype)
                              / math.sqrt(self.block))
        self.b = nn.Parameter(torch.zeros(num_heads, self.block, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        xh = x.unflatten(-1, (self.num_heads, self.block))
        return (torch.einsum("...hi,hij->...hj", xh, self.w) + self.b).flatten(-2)


class RGLRU(_ScanLayer):
    """Griffin's recurrent block: ``out = linear_out(rg_lru(conv_1d(linear_x(x))) * gelu(linear_y(x)))``
    with the Real-Gated Linear Recurrent Unit

        r_t = sigmoid(a_gate(x_t)),  i_t = sigmoid(input_gate(x_t))
        log a_t = -c * softplus(a_param) * r_t
        h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t * x_t)

    (block-diagonal gates over ``num_heads``; ``sqrt(1 - a^2) = sqrt(-expm1(2 log a))``). ``a``
    is initialised so that ``a^c`` is uniform in ``[min_rad^2, max_rad^2]``."""

    def __init__(self, d_model: int, d_rnn: Optional[int] = None, num_heads: int = 1,
                 conv_size: int = 4, c: float = 8.0, min_rad: float = 0.9, max_rad: float = 0.999,
                 *, backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.d_rnn = self.state_size = d_rnn or d_model
        if self.d_rnn % num_heads:
            raise ValueError(f"d_rnn={self.d_rnn} must be divisible by num_heads={num_heads}")
        self.c, self.backend = c, backend
        self.linear_y = nn.Linear(d_model, self.d_rnn, **fk)
        self.linear_x = nn.Linear(d_model, self.d_rnn, **fk)
        self.linear_out = nn.Linear(self.d_rnn, d_model, **fk)
        self.conv_1d = ShortConvolution(self.d_rnn, conv_size, bias=True, activation=None,
                                        backend=backend, **fk)
        self.input_gate = _BlockDiagonalLinear(self.d_rnn, num_heads, **fk)
        self.a_gate = _BlockDiagonalLinear(self.d_rnn, num_heads, **fk)
        # softplus(a_param) = -log(a0) / ... with a0^2 uniform in [min_rad^2, max_rad^2] at r = 1/c
        u = torch.rand(self.d_rnn, device=device) * (max_rad ** 2 - min_rad ** 2) + min_rad ** 2
        sp = -0.5 * torch.log(u)  # = c * softplus(a_param) * (1 / c)
        self.a_param = nn.Parameter((sp + torch.log(-torch.expm1(-sp))).to(dtype or torch.get_default_dtype()))

    def allocate_cache(self, batch_size: int, dtype=None, device=None) -> dict:
        cache = super().allocate_cache(batch_size, dtype, device)
        cache["conv"] = self.conv_1d.allocate_state(batch_size, dtype, device)
        return cache

    def _coeffs(self, xb):
        sd = _state_dtype(xb)
        gate_x = torch.sigmoid(self.input_gate(xb).to(sd))
        gate_a = torch.sigmoid(self.a_gate(xb).to(sd))
        log_a = -self.c * F.softplus(self.a_param.to(sd)) * gate_a
        a = torch.exp(log_a)
        b = _sqrt_bounded(-torch.expm1(2 * log_a)) * gate_x * xb.to(sd)
        return a, b

    def forward(self, x: Tensor, cu_seqlens: Optional[Tensor] = None,
                cache: Optional[dict] = None) -> Tensor:
        y = F.gelu(self.linear_y(x))
        xb = self.conv_1d(self.linear_x(x), cu_seqlens, None if cache is None else cache["conv"])
        a, b = self._coeffs(xb)
        h = _scan(self, a, b, cu_seqlens, cache)
        return self.linear_out(h.to(x.dtype) * y)

    def step(self, x_t: Tensor, cache: dict) -> Tensor:
        x_t, restore = as_token(x_t)
        y = F.gelu(self.linear_y(x_t))
        xb = self.conv_1d.step(self.linear_x(x_t), cache["conv"])
        a, b = self._coeffs(xb)
        h = cache["h"]
        h.copy_(a * h + b)
        return restore(self.linear_out(h.to(x_t.dtype) * y))


class LRU(_ScanLayer):
    """Linear Recurrent Unit: complex diagonal ``lambda = exp(-exp(nu_log) + i exp(theta_log))``,

        h_t = lambda h_{t-1} + gamma (B x_t),   y_t = Re(C h_t) + D x_t

    with ``gamma = exp(gamma_log)`` (init ``sqrt(1 - |lambda|^2)``), ring init of ``lambda`` in
    ``r_min <= |lambda| <= r_max``, phase in ``[0, max_phase]`` (the paper's parametrisation and
    names: ``nu_log``, ``theta_log``, ``gamma_log``, ``B_re``, ``B_im``, ``C_re``, ``C_im``, ``D``).
    The scan runs in complex64 (`linear_scan` complex)."""

    def __init__(self, d_model: int, d_state: int, r_min: float = 0.0, r_max: float = 1.0,
                 max_phase: float = 2 * math.pi, *, backend: Optional[str] = None, device=None,
                 dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.state_size, self.backend = d_model, d_state, backend
        u1, u2 = torch.rand(d_state, device=device), torch.rand(d_state, device=device)
        nu_log = torch.log(-0.5 * torch.log(u1 * (r_max ** 2 - r_min ** 2) + r_min ** 2))
        theta_log = torch.log(max_phase * u2)
        lam_abs = torch.exp(-torch.exp(nu_log))
        self.nu_log = nn.Parameter(nu_log.to(**fk) if dtype else nu_log)
        self.theta_log = nn.Parameter(theta_log.to(**fk) if dtype else theta_log)
        self.gamma_log = nn.Parameter(torch.log(torch.sqrt(1 - lam_abs ** 2)).to(device=device, dtype=dtype or torch.get_default_dtype()))
        self.B_re = nn.Parameter(torch.randn(d_state, d_model, **fk) / math.sqrt(2 * d_model))
        self.B_im = nn.Parameter(torch.randn(d_state, d_model, **fk) / math.sqrt(2 * d_model))
        self.C_re = nn.Parameter(torch.randn(d_model, d_state, **fk) / math.sqrt(d_state))
        self.C_im = nn.Parameter(torch.randn(d_model, d_state, **fk) / math.sqrt(d_state))
        self.D = nn.Parameter(torch.randn(d_model, **fk))

    def allocate_cache(self, batch_size: int, dtype=None, device=None) -> dict:
        p = self.B_re
        cd = torch.complex128 if (dtype or p.dtype) == torch.float64 else torch.complex64
        return {"h": torch.zeros(batch_size, self.state_size, device=device or p.device, dtype=cd)}

    def _coeffs(self, x):
        sd = _state_dtype(x)
        cd = torch.complex128 if sd == torch.float64 else torch.complex64
        lam = torch.exp(torch.complex(-torch.exp(self.nu_log.to(sd)), torch.exp(self.theta_log.to(sd))))
        Bn = torch.complex(self.B_re.to(sd), self.B_im.to(sd)) * torch.exp(self.gamma_log.to(sd))[:, None]
        b = x.to(sd).to(cd) @ Bn.transpose(0, 1)  # [..., N]
        return lam.to(cd), b

    def _readout(self, h, x):
        sd = h.real.dtype
        C = torch.complex(self.C_re.to(sd), self.C_im.to(sd))
        return ((h @ C.transpose(0, 1)).real + self.D.to(sd) * x.to(sd)).to(x.dtype)

    def forward(self, x: Tensor, cu_seqlens: Optional[Tensor] = None,
                cache: Optional[dict] = None) -> Tensor:
        lam, b = self._coeffs(x)
        h = _scan(self, lam.expand_as(b), b, cu_seqlens, cache)
        return self._readout(h, x)

    def step(self, x_t: Tensor, cache: dict) -> Tensor:
        x_t, restore = as_token(x_t)
        lam, b = self._coeffs(x_t)
        h = cache["h"]
        h.copy_(lam * h + b)
        return restore(self._readout(h, x_t))
