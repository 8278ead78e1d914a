"""Gated linear attention layer on `chunk_gla` / `fused_recurrent_gla`, with fla's constructor
arguments and parameter names (``fla.layers.gla.GatedLinearAttention``)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..linear_attn import chunk_gla, fused_recurrent_gla
from ._common import RMSNorm, ShortConvolution, as_token, cache_input

_ACT = {"swish": F.silu, "silu": F.silu, "relu": F.relu, "elu": F.elu, "sigmoid": torch.sigmoid,
        "gelu": F.gelu, "identity": lambda x: x}


def _act(name):
    if name not in _ACT:
        raise ValueError(f"activation must be one of {sorted(_ACT)}, got {name!r}")
    return _ACT[name]


class GatedLinearAttention(nn.Module):
    """GLA (Yang et al. 2023): ``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t`` per
    head, a low-rank log-sigmoid key gate ``g = logsigmoid(gk_proj(x)) / gate_logit_normalizer``,
    optional short convolutions on q/k/v, then RMS norm gated by swish(g_proj(x)) and o_proj.

    Arguments as in flash-linear-attention (``mode``: "chunk" or "fused_recurrent"; "fused_chunk"
    runs the chunked kernel). ``backend`` picks the kernels' backend. Parameter names: ``q_proj``,
    ``k_proj``, ``v_proj``, ``g_proj``, ``gk_proj.0/1``, ``o_proj``, ``g_norm_swish_gate`` (or
    ``g_norm``), ``q_conv1d``/``k_conv1d``/``v_conv1d``.

    Decoding: ``cache = allocate_cache(B)`` holds ``state [B, H, K, V]`` float32 and, with
    short convolutions, ``conv_q/k/v [B, dim, conv_size - 1]``.
    """

    def __init__(self, mode: str = "chunk", hidden_size: int = 1024, expand_k: float = 0.5,
                 expand_v: float = 1.0, num_heads: int = 4, num_kv_heads: Optional[int] = None,
                 feature_map: Optional[str] = None, use_short_conv: bool = False,
                 conv_size: int = 4, conv_bias: bool = False, use_output_gate: bool = True,
                 gate_fn: str = "swish", elementwise_affine: Optional[bool] = True,
                 norm_eps: float = 1e-5, gate_logit_normalizer: int = 16,
                 gate_low_rank_dim: int = 16, clamp_min: Optional[float] = None,
                 fuse_norm: bool = True, layer_idx: Optional[int] = None, *,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        if mode not in ("chunk", "fused_recurrent", "fused_chunk"):
            raise ValueError(f"mode must be 'chunk', 'fused_recurrent' or 'fused_chunk', got {mode!r}")
        fk = {"device": device, "dtype": dtype}
        self.mode, self.hidden_size, self.num_heads = mode, hidden_size, num_heads
        self.num_kv_heads = num_kv_heads if num_kv_heads is not None else num_heads
        self.num_kv_groups = num_heads // self.num_kv_heads
        self.feature_map_fn = None if feature_map is None else _act(feature_map)
        self.use_short_conv, self.conv_size, self.use_output_gate = use_short_conv, conv_size, use_output_gate
        self.key_dim = int(hidden_size * expand_k)
        self.value_dim = int(hidden_size * expand_v)
        if self.key_dim % num_heads or self.value_dim % num_heads:
            raise ValueError(f"key dim {self.key_dim} and value dim {self.value_dim} must be "
                             f"divisible by num_heads={num_heads}")
        self.key_dim_per_group = self.key_dim // self.num_kv_groups
        self.value_dim_per_group = self.value_dim // self.num_kv_groups
        self.head_k_dim = self.key_dim // num_heads
        self.head_v_dim = self.value_dim // num_heads
        self.clamp_min, self.layer_idx, self.backend = clamp_min, layer_idx, backend
        self.gate_logit_normalizer = gate_logit_normalizer
        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False, **fk)
        self.k_proj = nn.Linear(hidden_size, self.key_dim_per_group, bias=False, **fk)
        self.v_proj = nn.Linear(hidden_size, self.value_dim_per_group, bias=False, **fk)
        if use_output_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False, **fk)
        if use_short_conv:
            conv = lambda d: ShortConvolution(d, conv_size, conv_bias, "silu", backend, **fk)  # noqa: E731
            self.q_conv1d = conv(self.key_dim)
            self.k_conv1d = conv(self.key_dim_per_group)
            self.v_conv1d = conv(self.value_dim_per_group)
        self.gk_proj = nn.Sequential(nn.Linear(hidden_size, gate_low_rank_dim, bias=False, **fk),
                                     nn.Linear(gate_low_rank_dim, self.key_dim_per_group, bias=True, **fk))
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False, **fk)
        affine = bool(elementwise_affine)
        if gate_fn == "swish" and fuse_norm and use_output_gate:
            self.g_norm_swish_gate = RMSNorm(self.head_v_dim, affine, norm_eps, **fk)
            self.fuse_norm_and_gate = True
        else:
            self.fuse_norm_and_gate = False
            self.g_norm = RMSNorm(self.head_v_dim, affine, norm_eps, device=device)
            self.gate_fn = _act(gate_fn)

    def _qkvg(self, x, cu_seqlens, cache, step):
        if self.use_short_conv:
            cs = [None] * 3 if cache is None else [cache["conv_q"], cache["conv_k"], cache["conv_v"]]
            convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
            projs = (self.q_proj, self.k_proj, self.v_proj)
            if step:
                q, k, v = (c.step(p(x), s) for c, p, s in zip(convs, projs, cs))
            else:
                q, k, v = (c(p(x), cu_seqlens, s) for c, p, s in zip(convs, projs, cs))
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        gk = self.gk_proj(x)
        lead = x.shape[:-1]
        q = q.view(*lead, self.num_heads, self.head_k_dim)
        hk = self.num_kv_heads
        k = k.view(*lead, hk, self.head_k_dim)
        gk = gk.view(*lead, hk, self.head_k_dim)
        v = v.view(*lead, hk, self.head_v_dim)
        if self.num_kv_groups > 1:
            k, gk, v = (t.repeat_interleave(self.num_kv_groups, dim=-2) for t in (k, gk, v))
        gk = F.logsigmoid(gk.to(torch.float64 if gk.dtype == torch.float64 else torch.float32))
        gk = gk / self.gate_logit_normalizer
        if self.clamp_min is not None:
            gk = gk.clamp_min(self.clamp_min)
        if self.feature_map_fn is not None:
            q, k = self.feature_map_fn(q), self.feature_map_fn(k)
        return q, k, v, gk

    def _out(self, o, x):
        if self.use_output_gate:
            g = self.g_proj(x)
            if self.fuse_norm_and_gate:
                o = self.g_norm_swish_gate(o, g.view(*g.shape[:-1], self.num_heads, self.head_v_dim))
                o = o.flatten(-2)
            else:
                o = self.g_norm(o).flatten(-2) * self.gate_fn(g)
        else:
            o = self.g_norm(o).flatten(-2)
        return self.o_proj(o.to(x.dtype))

    def forward(self, hidden_states: Tensor, cu_seqlens: Optional[Tensor] = None,
                cache: Optional[dict] = None) -> Tensor:
        """``[B, T, hidden_size] -> [B, T, hidden_size]``; ``cache``, if given, holds the states
        to continue from and receives the final ones."""
        q, k, v, gk = self._qkvg(hidden_states, cu_seqlens, cache, step=False)
        fn = fused_recurrent_gla if self.mode == "fused_recurrent" else chunk_gla
        o, last = fn(q, k, v, gk, initial_state=None if cache is None else cache_input(cache["state"]),
                     output_final_state=cache is not None, cu_seqlens=cu_seqlens,
                     backend=self.backend)
        if cache is not None:
            with torch.no_grad():
                cache["state"].copy_(last)
        return self._out(o, hidden_states)

    def allocate_cache(self, batch_size: int, dtype=None, device=None) -> dict:
        device = device or self.o_proj.weight.device
        sd = torch.float64 if (dtype or self.o_proj.weight.dtype) == torch.float64 else torch.float32
        cache = {"state": torch.zeros(batch_size, self.num_heads, self.head_k_dim, self.head_v_dim,
                                      device=device, dtype=sd)}
        if self.use_short_conv:
            for n, c in (("conv_q", self.q_conv1d), ("conv_k", self.k_conv1d), ("conv_v", self.v_conv1d)):
                cache[n] = c.allocate_state(batch_size, dtype, device)
        return cache

    def step(self, x_t: Tensor, cache: dict) -> Tensor:
        x_t, restore = as_token(x_t)
        q, k, v, gk = self._qkvg(x_t, None, cache, step=True)
        o, last = fused_recurrent_gla(q[:, None], k[:, None], v[:, None], gk[:, None],
                                      initial_state=cache["state"], output_final_state=True,
                                      backend=self.backend)
        with torch.no_grad():
            cache["state"].copy_(last)
        return restore(self._out(o[:, 0], x_t))
