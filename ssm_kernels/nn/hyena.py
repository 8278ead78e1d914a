"""Hyena operator (Poli et al. 2023) on `fft_conv` (gates fused into the convolution)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from ..fft_conv import fft_conv
from ._common import ShortConvolution, as_token


class _Sin(nn.Module):
    def __init__(self, dim: int, w: float = 10.0, train_freq: bool = True, device=None):
        super().__init__()
        f = w * torch.ones(1, dim, device=device)
        self.freq = nn.Parameter(f) if train_freq else None
        if not train_freq:
            self.register_buffer("freq", f)

    def forward(self, x):
        return torch.sin(self.freq * x)


class _PositionalEmbedding(nn.Module):
    """Complex exponential features of the position (safari's PositionalEmbedding)."""

    def __init__(self, emb_dim: int, seq_len: int, device=None):
        super().__init__()
        t = torch.linspace(0, 1, seq_len, device=device)[None, :, None]
        bands = (emb_dim - 1) // 2
        t_rescaled = torch.linspace(0, seq_len - 1, seq_len, device=device)[None, :, None]
        w = 2 * math.pi * t_rescaled / seq_len
        f = torch.linspace(1e-4, bands - 1, bands, device=device)[None, None]
        z = torch.exp(-1j * f * w)
        self.register_buffer("z", torch.cat([t, z.real, z.imag], dim=-1))
        self.register_buffer("t", t)

    def forward(self, L: int):
        return self.z[:, :L], self.t[:, :L]


class _ExponentialModulation(nn.Module):
    def __init__(self, d: int, fast_decay_pct=0.3, slow_decay_pct=1.5, target=1e-2, shift=0.0,
                 device=None):
        super().__init__()
        self.shift = shift
        max_decay = math.log(target) / fast_decay_pct
        min_decay = math.log(target) / slow_decay_pct
        self.register_buffer("deltas", torch.linspace(min_decay, max_decay, d, device=device)[None, None])

    def forward(self, t, x):
        return x * (torch.exp(-t * self.deltas.abs()) + self.shift)


class HyenaFilter(nn.Module):
    """Implicit long filter: an MLP with sine activations over positional features, exponentially
    modulated; ``filter(L) -> (L, channels)`` plus a per-channel ``bias`` (the skip term D)."""

    def __init__(self, channels: int, emb_dim: int = 3, order: int = 16, seq_len: int = 1024,
                 w: float = 1.0, num_inner_mlps: int = 2, modulate: bool = True, device=None,
                 dtype=None, **mod_kw):
        super().__init__()
        if emb_dim % 2 == 0 or emb_dim < 3:
            raise ValueError(f"emb_dim must be odd and >= 3, got {emb_dim}")
        self.bias = nn.Parameter(torch.randn(channels, device=device))
        self.pos_emb = _PositionalEmbedding(emb_dim, seq_len, device)
        act = _Sin(order, w, device=device)
        layers = [nn.Linear(emb_dim, order, device=device), act]
        for _ in range(num_inner_mlps):
            layers += [nn.Linear(order, order, device=device), act]
        layers.append(nn.Linear(order, channels, bias=False, device=device))
        self.implicit_filter = nn.Sequential(*layers)
        self.modulate = modulate
        self.modulation = _ExponentialModulation(channels, device=device, **mod_kw)

    def filter(self, L: int) -> Tensor:
        z, t = self.pos_emb(L)
        h = self.implicit_filter(z)
        if self.modulate:
            h = self.modulation(t, h)
        return h[0]  # (L, channels) float32


class HyenaOperator(nn.Module):
    """Hyena of order N: ``u = short_filter(in_proj(x))`` split in ``x_0..x_{N-1}, v``; for each
    order ``v = fft_conv(v * x_i, k_i, bias_i)`` (the gate fused into the FFT convolution), then
    ``y = out_proj(v * x_0)``. The filters ``k_i`` are implicit (``filter_fn``) and as long as
    the input (up to ``l_max``).

    No packed sequences (an FFT convolution spans the whole row). Decoding keeps the full
    history of each order's gated input (``hist [B, N-1, d_model, l_max]``) and a position, so
    a step costs O(t) — the long convolution has no finite state. The cache's filters are
    computed once in `allocate_cache` (re-allocate after a parameter update)."""

    def __init__(self, d_model: int, l_max: int, order: int = 2, filter_order: int = 64,
                 short_filter_order: int = 3, emb_dim: int = 3, num_inner_mlps: int = 2,
                 w: float = 1.0, modulate: bool = True, *, backend: Optional[str] = None,
                 device=None, dtype=None, **filter_args):
        super().__init__()
        if order < 2:
            raise ValueError(f"order must be >= 2, got {order}")
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.l_max, self.order, self.backend = d_model, l_max, order, backend
        inner = d_model * (order + 1)
        self.in_proj = nn.Linear(d_model, inner, **fk)
        self.out_proj = nn.Linear(d_model, d_model, **fk)
        self.short_filter = ShortConvolution(inner, short_filter_order, bias=True, activation=None,
                                             backend=backend, **fk)
        self.filter_fn = HyenaFilter(d_model * (order - 1), emb_dim, filter_order, l_max, w,
                                     num_inner_mlps, modulate, device=device, **filter_args)

    def _filters(self, L: int):
        k = self.filter_fn.filter(L).transpose(0, 1).reshape(self.order - 1, self.d_model, L)
        return k, self.filter_fn.bias.view(self.order - 1, self.d_model)

    def forward(self, x: Tensor, cu_seqlens: Optional[Tensor] = None,
                cache: Optional[dict] = None) -> Tensor:
        """``[B, T, d_model]``, T <= l_max. ``cache`` (from `allocate_cache`), if given, must be
        fresh: this prefill records the history the decode steps continue from."""
        if cu_seqlens is not None:
            raise ValueError("HyenaOperator: cu_seqlens is not supported (the FFT convolution "
                             "spans the whole row); pad the batch instead")
        B, T, _ = x.shape
        if T > self.l_max:
            raise ValueError(f"HyenaOperator: sequence length {T} exceeds l_max={self.l_max}")
        u = self.short_filter(self.in_proj(x), None, None if cache is None else cache["conv"])
        parts = u.transpose(1, 2).split(self.d_model, dim=1)  # (B, d_model, T) each
        xs, v = parts[:-1], parts[-1]
        k, bias = self._filters(T)
        wd = torch.float64 if x.dtype == torch.float64 else torch.float32
        gates = list(reversed(xs[1:]))
        for o, x_i in enumerate(gates):
            post = xs[0] if o == len(gates) - 1 else None
            if cache is not None:  # the history the decode steps convolve with
                v = v * x_i
                with torch.no_grad():
                    cache["hist"][:, o, :, :T].copy_(v)
                v = fft_conv(v, k[o].to(wd), bias[o].to(wd), post_gate=post, backend=self.backend)
            else:
                v = fft_conv(v, k[o].to(wd), bias[o].to(wd), pre_gate=x_i, post_gate=post,
                             backend=self.backend)
        if cache is not None:
            with torch.no_grad():
                cache["pos"].fill_(T)
        return self.out_proj(v.transpose(1, 2))

    @torch.no_grad()
    def allocate_cache(self, batch_size: int, dtype=None, device=None) -> dict:
        p = self.out_proj.weight
        device, dtype = device or p.device, dtype or p.dtype
        k, _ = self._filters(self.l_max)
        return {"conv": self.short_filter.allocate_state(batch_size, dtype, device),
                "hist": torch.zeros(batch_size, self.order - 1, self.d_model, self.l_max,
                                    device=device, dtype=dtype),
                "k": k.to(device, torch.float64 if dtype == torch.float64 else torch.float32),
                "pos": torch.zeros((), dtype=torch.long, device=device)}

    def step(self, x_t: Tensor, cache: dict) -> Tensor:
        """One token; O(position) work (positions beyond l_max are an error the caller must
        avoid: the history has l_max slots)."""
        x_t, restore = as_token(x_t)
        u = self.short_filter.step(self.in_proj(x_t), cache["conv"])
        parts = u.split(self.d_model, dim=-1)
        xs, v = parts[:-1], parts[-1]
        _, bias = self._filters(1)
        pos = cache["pos"]
        lag = pos - torch.arange(self.l_max, device=pos.device)  # filter tap of each history slot
        for o, x_i in enumerate(reversed(xs[1:])):
            v = v * x_i
            hist = cache["hist"][:, o]
            hist.index_copy_(2, pos.view(1), v.unsqueeze(-1).to(hist.dtype))
            kk = cache["k"][o][:, lag.clamp(min=0)] * (lag >= 0)
            v = ((hist.to(kk.dtype) * kk).sum(-1) + bias[o].to(kk.dtype) * v.to(kk.dtype)).to(x_t.dtype)
        pos.add_(1)
        return restore(self.out_proj(v * xs[0]))
