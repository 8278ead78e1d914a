"""Mamba-2 block on `mamba_chunk_scan_combined` (SSD), `causal_conv1d_fn` and, for decoding,
`selective_state_update` (headed shape) and `causal_conv1d_update`; state-dict compatible with
``mamba_ssm.modules.mamba2.Mamba2``."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from ..selective_scan import selective_state_update
from ..ssd import mamba_chunk_scan_combined
from ._common import as_token, cache_input, mamba2_A_log, mamba2_dt_bias


class RMSNormGated(nn.Module):
    """Gated RMS norm of Mamba-2 (mamba-ssm's ``layernorm_gated.RMSNorm``), plain PyTorch, in
    float32 (float64 kept): with ``z``, ``norm(x * silu(z))`` if not ``norm_before_gate`` else
    ``norm(x) * silu(z)``; the mean square is taken over groups of ``group_size`` channels
    (None: all). Parameter ``weight (hidden_size,)``, no bias. Output in x's dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: Optional[int] = None,
                 norm_before_gate: bool = True, device=None, dtype=None):
        super().__init__()
        if group_size is not None and hidden_size % group_size:
            raise ValueError(f"group_size {group_size} must divide hidden_size {hidden_size}")
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x.to(cd)
        if z is not None and not self.norm_before_gate:
            xf = xf * F.silu(z.to(cd))
        g = self.group_size or x.shape[-1]
        xg = xf.unflatten(-1, (-1, g))
        y = (xg * torch.rsqrt(xg.square().mean(-1, keepdim=True) + self.eps)).flatten(-2)
        y = y * self.weight.to(cd)
        if z is not None and self.norm_before_gate:
            y = y * F.silu(z.to(cd))
        return y.to(x.dtype)


class Mamba2(nn.Module):
    """The Mamba-2 mixer: in_proj -> [z, xBC, dt] -> causal conv + silu over xBC -> SSD scan of
    x (heads of ``headdim``) with B, C (``ngroups`` groups) -> gated RMS norm with z (or the
    scan's silu(z) gate with ``rmsnorm=False``) -> out_proj. With ``d_ssm < d_inner`` the other
    ``d_inner - d_ssm`` channels are a gated MLP (``silu(z0) * x0``), as in mamba-ssm.

    Constructor arguments, parameter names, shapes, dtypes and initialisation follow mamba-ssm's
    ``Mamba2`` (``in_proj``, ``conv1d``, ``dt_bias``, ``A_log``, ``D``, ``norm.weight``,
    ``out_proj``), so its state_dict loads unchanged. ``use_mem_eff_path`` and
    ``sequence_parallel`` are accepted and ignored; ``process_group`` (tensor parallelism) is not
    supported. ``chunk_size`` is passed on (our kernels pick their own chunking; same function).
    ``backend`` picks the kernels' backend ("reference" runs anywhere, float64 included).

    Input and output: ``[B, T, d_model]``. Decoding: ``cache = layer.allocate_cache(B)``, then
    ``y_t = layer.step(x_t, cache)`` per token (or ``layer(x, cache=cache)`` for a prompt; it
    continues from the cache's states). The cache holds ``conv_state (B, conv_dim, d_conv)``
    (mamba-ssm's layout; the last ``d_conv - 1`` columns are read; ``conv_dim = d_ssm + 2 *
    ngroups * d_state``) and ``ssm_state (B, nheads, headdim, d_state)`` float32.

    Example:
        >>> import torch, ssm_kernels
        >>> layer = ssm_kernels.nn.Mamba2(d_model=32, d_state=16, headdim=16, backend="reference")
        >>> layer(torch.randn(2, 10, 32)).shape
        torch.Size([2, 10, 32])
    """

    def __init__(self, d_model, d_state=128, d_conv=4, conv_init=None, expand=2, headdim=64,
                 d_ssm=None, ngroups=1, A_init_range=(1, 16), D_has_hdim=False, rmsnorm=True,
                 norm_before_gate=False, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4,
                 dt_limit=(0.0, float("inf")), bias=False, conv_bias=True, chunk_size=256,
                 use_mem_eff_path=True, layer_idx=None, process_group=None,
                 sequence_parallel=True, device=None, dtype=None, *,
                 backend: Optional[str] = None):
        fk = {"device": device, "dtype": dtype}
        super().__init__()
        if process_group is not None:
            raise NotImplementedError("Mamba2: process_group (tensor parallelism) is not supported")
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.conv_init, self.headdim = conv_init, headdim
        self.process_group, self.sequence_parallel = None, sequence_parallel
        self.d_inner = int(expand * d_model)
        self.d_ssm = self.d_inner if d_ssm is None else d_ssm
        if self.d_ssm % headdim:
            raise ValueError(f"Mamba2: d_ssm={self.d_ssm} must be a multiple of headdim={headdim}")
        if self.d_ssm > self.d_inner:
            raise ValueError(f"Mamba2: d_ssm={self.d_ssm} must be <= d_inner={self.d_inner}")
        self.nheads = self.d_ssm // headdim
        if self.nheads % ngroups:
            raise ValueError(f"Mamba2: ngroups={ngroups} must divide nheads={self.nheads}")
        self.ngroups = ngroups
        self.D_has_hdim, self.rmsnorm, self.norm_before_gate = D_has_hdim, rmsnorm, norm_before_gate
        self.dt_limit = tuple(dt_limit)
        self.activation = "silu"
        self.chunk_size, self.use_mem_eff_path = chunk_size, use_mem_eff_path
        self.layer_idx, self.backend = layer_idx, backend

        # in_proj output order: [z0, x0 (gated MLP, d_inner - d_ssm each), z, x, B, C, dt]
        d_in_proj = 2 * self.d_inner + 2 * ngroups * d_state + self.nheads
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=bias, **fk)
        self.conv_dim = self.d_ssm + 2 * ngroups * d_state
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim,
                                padding=d_conv - 1, bias=conv_bias, **fk)
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)
        self.act = nn.SiLU()
        # dt bias: softplus(dt_bias) log-uniform in [dt_min, dt_max] (floored)
        self.dt_bias = nn.Parameter(mamba2_dt_bias(self.nheads, dt_min, dt_max, dt_init_floor,
                                                   **fk))
        self.dt_bias._no_weight_decay = True
        if not (A_init_range[0] > 0 and A_init_range[1] >= A_init_range[0]):
            raise ValueError(f"Mamba2: A_init_range must be 0 < lo <= hi, got {A_init_range}")
        self.A_log = nn.Parameter(mamba2_A_log(self.nheads, A_init_range, **fk))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_ssm if D_has_hdim else self.nheads, device=device))
        self.D._no_weight_decay = True
        if rmsnorm:
            self.norm = RMSNormGated(self.d_ssm, eps=1e-5, norm_before_gate=norm_before_gate,
                                     group_size=self.d_ssm // ngroups, **fk)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **fk)

    # ---- pieces shared by forward and step ------------------------------------------------------

    def _conv_weight(self) -> Tensor:
        return self.conv1d.weight.view(self.conv_dim, self.d_conv)

    def _split(self, zxbcdt: Tensor):
        d_mlp = self.d_inner - self.d_ssm
        return torch.split(zxbcdt, [d_mlp, d_mlp, self.d_ssm, self.conv_dim, self.nheads], dim=-1)

    @staticmethod
    def _wdtype(x: Tensor):
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def _heads_D(self, wd) -> Tensor:
        D = self.D.to(wd)
        return D.view(self.nheads, self.headdim) if self.D_has_hdim else D

    def _finish(self, y: Tensor, z: Tensor, z0: Tensor, x0: Tensor) -> Tensor:
        if self.rmsnorm:
            y = self.norm(y, z)
        if z0.shape[-1] > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y)

    # ---- parallel form --------------------------------------------------------------------------

    def forward(self, u: Tensor, cu_seqlens: Optional[Tensor] = None,
                cache: Optional[dict] = None) -> Tensor:
        """u ``[B, T, d_model]`` (B = 1 with ``cu_seqlens``, the packed offsets of N sequences,
        which are independent). ``cache`` (from `allocate_cache`, N rows with cu_seqlens), if
        given, holds the states to continue from and receives the final ones (prefill)."""
        b, T, _ = u.shape
        H, P, G, N = self.nheads, self.headdim, self.ngroups, self.d_state
        z0, x0, z, xBC, dt = self._split(self.in_proj(u))
        conv_state = None if cache is None else cache["conv_state"]
        r = causal_conv1d_fn(xBC.transpose(1, 2), self._conv_weight(), self.conv1d.bias, None,
                             None if conv_state is None else cache_input(conv_state[..., 1:], xBC.dtype),
                             conv_state is not None, None, self.activation,
                             cu_seqlens=cu_seqlens, backend=self.backend)
        xBC, conv_final = r if conv_state is not None else (r, None)
        x, Bm, Cm = torch.split(xBC.transpose(1, 2), [self.d_ssm, G * N, G * N], dim=-1)
        wd = self._wdtype(x)
        A = -torch.exp(self.A_log.to(wd))
        y = mamba_chunk_scan_combined(
            x.reshape(b, T, H, P), dt, A, Bm.reshape(b, T, G, N), Cm.reshape(b, T, G, N),
            self.chunk_size, D=self._heads_D(wd),
            z=None if self.rmsnorm else z.reshape(b, T, H, P), dt_bias=self.dt_bias.to(wd),
            initial_states=None if cache is None else cache_input(cache["ssm_state"]),
            cu_seqlens=cu_seqlens, dt_softplus=True, dt_limit=self.dt_limit,
            return_final_states=cache is not None and cu_seqlens is None,
            return_varlen_states=cache is not None and cu_seqlens is not None,
            backend=self.backend)
        if cache is not None:
            y, last = y
            with torch.no_grad():
                cache["ssm_state"].copy_(last)
                conv_state[..., 1:].copy_(conv_final)
        return self._finish(y.reshape(b, T, self.d_ssm), z, z0, x0)

    # ---- decoding -------------------------------------------------------------------------------

    def allocate_cache(self, batch_size: int, dtype=None, device=None) -> dict:
        """Zero states for `step`: conv_state (B, conv_dim, d_conv) in the conv weight's dtype (or
        ``dtype``), ssm_state (B, nheads, headdim, d_state) float32 (float64 for a float64
        layer)."""
        device = device or self.out_proj.weight.device
        wd = dtype or self.out_proj.weight.dtype
        return {
            "conv_state": torch.zeros(batch_size, self.conv_dim, self.d_conv, device=device,
                                      dtype=dtype or self.conv1d.weight.dtype),
            "ssm_state": torch.zeros(batch_size, self.nheads, self.headdim, self.d_state,
                                     device=device,
                                     dtype=torch.float64 if wd == torch.float64 else torch.float32),
        }

    def step(self, x_t: Tensor, cache: dict) -> Tensor:
        """One token ``[B, d_model]`` (or ``[B, 1, d_model]``) -> the same shape; the cache is
        updated in place (capture-safe: no host synchronisation)."""
        x_t, restore = as_token(x_t)
        b = x_t.shape[0]
        H, P, G, N = self.nheads, self.headdim, self.ngroups, self.d_state
        z0, x0, z, xBC, dt = self._split(self.in_proj(x_t))
        xBC = causal_conv1d_update(xBC, cache["conv_state"], self._conv_weight(), self.conv1d.bias,
                                   self.activation, backend=self.backend)
        x, Bm, Cm = torch.split(xBC, [self.d_ssm, G * N, G * N], dim=-1)
        wd = self._wdtype(x)
        A = (-torch.exp(self.A_log.to(wd)))[:, None, None].expand(H, P, N)   # stride-0 broadcast
        D = self._heads_D(wd)
        D = D if D.dim() == 2 else D[:, None].expand(H, P)
        if self.dt_limit == (0.0, float("inf")):
            dt_bias, softplus = self.dt_bias.to(wd)[:, None].expand(H, P), True
        else:  # the decode kernel has no clamp: softplus + clamp here, as the scan does
            dt = F.softplus(dt.to(wd) + self.dt_bias.to(wd)).clamp(*self.dt_limit)
            dt_bias, softplus = None, False
        y = selective_state_update(
            cache["ssm_state"], x.reshape(b, H, P), dt[:, :, None].expand(b, H, P), A,
            Bm.reshape(b, G, N), Cm.reshape(b, G, N), D,
            z=None if self.rmsnorm else z.reshape(b, H, P), dt_bias=dt_bias,
            dt_softplus=softplus, backend=self.backend)
        return restore(self._finish(y.reshape(b, self.d_ssm), z, z0, x0))
