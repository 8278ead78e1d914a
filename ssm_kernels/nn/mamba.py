"""Mamba (Mamba-1) block on `selective_scan_fn` and `causal_conv1d_fn`, state-dict compatible with
``mamba_ssm.modules.mamba_simple.Mamba``."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from ..selective_scan import selective_scan_fn, selective_state_update
from ._common import as_token, cache_input


class Mamba(nn.Module):
    """The Mamba-1 mixer: in_proj -> causal conv + silu -> x_proj -> dt_proj -> selective scan
    (gated by silu(z)) -> out_proj.

    Constructor arguments, parameter names, shapes and initialisation follow mamba-ssm's
    ``Mamba`` (``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``out_proj``),
    so its state_dict loads unchanged. ``use_fast_path`` is accepted and ignored (our path is the
    fused ops); ``backend`` picks the kernels' backend ("reference" runs anywhere).

    Input and output: ``[B, T, d_model]``. Decoding: ``cache = layer.allocate_cache(B)``, then
    ``y_t = layer.step(x_t, cache)`` per token (or ``layer(x, cache=cache)`` for a prompt); the
    cache holds ``conv_state (B, d_inner, d_conv)`` (mamba-ssm's layout; the last ``d_conv - 1``
    columns are read) and ``ssm_state (B, d_inner, d_state)`` float32.

    Example:
        >>> import torch, ssm_kernels
        >>> layer = ssm_kernels.nn.Mamba(d_model=32, backend="reference")
        >>> layer(torch.randn(2, 10, 32)).shape
        torch.Size([2, 10, 32])
    """

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001,
                 dt_max=0.1, dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True,
                 bias=False, use_fast_path=True, layer_idx=None, device=None, dtype=None, *,
                 backend: Optional[str] = None):
        fk = {"device": device, "dtype": dtype}
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.use_fast_path, self.layer_idx, self.backend = use_fast_path, layer_idx, backend
        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **fk)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **fk)
        self.activation = "silu"
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **fk)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **fk)
        std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        # dt bias: softplus(bias) log-uniform in [dt_min, dt_max]
        dt = torch.exp(torch.rand(self.d_inner, **fk) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))  # float32 whatever dtype
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **fk)

    def _conv_weight(self) -> Tensor:
        return self.conv1d.weight.view(self.d_inner, self.d_conv)

    def _wdtype(self, x: Tensor):
        # the scan takes float32 D / delta_bias (float64 with float64 activations)
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def forward(self, hidden_states: Tensor, cu_seqlens: Optional[Tensor] = None,
                cache: Optional[dict] = None) -> Tensor:
        """hidden_states ``[B, T, d_model]`` (B = 1 with ``cu_seqlens``, the packed offsets of N
        sequences). ``cache`` (from `allocate_cache`, N rows with cu_seqlens), if given, holds the
        states to continue from and receives the final ones (prefill)."""
        B, T, _ = hidden_states.shape
        xz = self.in_proj(hidden_states)                       # [B, T, 2 * d_inner]
        x, z = xz.transpose(1, 2).chunk(2, dim=1)              # (B, d_inner, T) views
        conv_state = None if cache is None else cache["conv_state"]
        r = causal_conv1d_fn(x, self._conv_weight(), self.conv1d.bias, None,
                             None if conv_state is None else cache_input(conv_state[..., 1:], x.dtype),
                             conv_state is not None, None, "silu", cu_seqlens=cu_seqlens,
                             backend=self.backend)
        x, conv_final = r if conv_state is not None else (r, None)
        x_dbl = self.x_proj(x.transpose(1, 2))                 # [B, T, R + 2N]
        dt, Bm, Cm = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)                 # [B, T, d_inner], bias in the scan
        wd = self._wdtype(x)
        A = -torch.exp(self.A_log.to(wd))
        y = selective_scan_fn(x, dt.transpose(1, 2), A, Bm.transpose(1, 2), Cm.transpose(1, 2),
                              self.D.to(wd), z, self.dt_proj.bias.to(wd), True, cache is not None,
                              initial_state=None if cache is None else cache_input(cache["ssm_state"]),
                              cu_seqlens=cu_seqlens, backend=self.backend)
        if cache is not None:
            y, last = y
            with torch.no_grad():
                cache["ssm_state"].copy_(last)
                conv_state[..., 1:].copy_(conv_final)
        return self.out_proj(y.transpose(1, 2))

    def allocate_cache(self, batch_size: int, dtype=None, device=None) -> dict:
        """Zero states for `step`: conv_state (B, d_inner, d_conv) in the conv weight's dtype (or
        ``dtype``), ssm_state (B, d_inner, d_state) float32."""
        device = device or self.out_proj.weight.device
        return {
            "conv_state": torch.zeros(batch_size, self.d_inner, self.d_conv, device=device,
                                      dtype=dtype or self.conv1d.weight.dtype),
            "ssm_state": torch.zeros(batch_size, self.d_inner, self.d_state, device=device,
                                     dtype=torch.float64 if (dtype or self.out_proj.weight.dtype) == torch.float64 else torch.float32),
        }

    def step(self, x_t: Tensor, cache: dict) -> Tensor:
        """One token ``[B, d_model]`` (or ``[B, 1, d_model]``) -> the same shape; the cache is
        updated in place (capture-safe: no host synchronisation)."""
        x_t, restore = as_token(x_t)
        x, z = self.in_proj(x_t).chunk(2, dim=-1)              # [B, d_inner]
        x = causal_conv1d_update(x, cache["conv_state"], self._conv_weight(), self.conv1d.bias,
                                 "silu", backend=self.backend)
        dt, Bm, Cm = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)
        wd = self._wdtype(x)
        A = -torch.exp(self.A_log.to(wd))
        y = selective_state_update(cache["ssm_state"], x, dt, A, Bm, Cm, self.D.to(wd), z=z,
                                   dt_bias=self.dt_proj.bias.to(wd), dt_softplus=True,
                                   backend=self.backend)
        return restore(self.out_proj(y))
