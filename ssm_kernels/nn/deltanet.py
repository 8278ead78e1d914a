"""DeltaNet and Gated DeltaNet layers on the delta-rule ops (`chunk_[gated_]delta_rule` for
training, `fused_recurrent_[gated_]delta_rule` for decoding) and `causal_conv1d` for the short
convolutions, with flash-linear-attention's constructor arguments and parameter names
(``fla.layers.delta_net.DeltaNet``, ``fla.layers.gated_deltanet.GatedDeltaNet``)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..delta_rule import (chunk_delta_rule, chunk_gated_delta_rule, fused_recurrent_delta_rule,
                          fused_recurrent_gated_delta_rule)
from ._common import (RMSNorm, ShortConvolution, as_token, cache_input, mamba2_A_log, mamba2_dt_bias,
                      pad_output, unpad_input)
from .mamba2 import RMSNormGated

_MODES = ("chunk", "fused_recurrent")


def _positive_int(op, name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{op}: {name} must be a positive int, got {value!r}")


def _elu_p1(x):
    return F.elu(x) + 1.0


class _DeltaRuleLayer(nn.Module):
    """What DeltaNet and GatedDeltaNet share: q/k/v projections with optional short convolutions,
    the padding mask, the kernel call with a cache, the output norm/gate and o_proj, decoding.

    Subclasses set ``key_dim``, ``value_dim``, ``head_k_dim``, ``head_v_dim``, ``num_heads``
    (q/k heads), ``num_v_heads``, ``use_gate``, ``mode``, ``backend`` and define
    ``_beta_g(x) -> (beta, g or None)`` and ``_qk_act(q, k)``."""

    _name = "DeltaRule"
    _qk_l2norm = True

    def _build_qkv(self, hidden_size, fk):
        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False, **fk)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False, **fk)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False, **fk)

    def _build_rest(self, hidden_size, use_short_conv, conv_size, conv_bias, qk_conv_act, norm_eps,
                    fk):
        """Short convolutions, output gate and norm, o_proj (after the subclass's own
        projections, in fla's registration order)."""
        if use_short_conv:
            def conv(d, act):
                return ShortConvolution(d, conv_size, conv_bias, act, self.backend, **fk)
            self.q_conv1d = conv(self.key_dim, qk_conv_act)
            self.k_conv1d = conv(self.key_dim, qk_conv_act)
            self.v_conv1d = conv(self.value_dim, "silu")
        if self.use_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False, **fk)
            self.o_norm = RMSNormGated(self.head_v_dim, eps=norm_eps, norm_before_gate=True, **fk)
        else:
            self.o_norm = RMSNorm(self.head_v_dim, eps=norm_eps, **fk)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False, **fk)

    def _check_common(self, mode, conv_size):
        if mode not in _MODES:
            raise ValueError(f"{self._name}: mode must be 'chunk' or 'fused_recurrent', got "
                             f"{mode!r}")
        _positive_int(self._name, "conv_size", conv_size)

    @staticmethod
    def _wdtype(x: Tensor):
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    # ---- pieces shared by forward and step ------------------------------------------------------

    def _qkv(self, x, cu_seqlens, cache, step):
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if self.use_short_conv:
            convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
            states = (None,) * 3 if cache is None else (cache["conv_q"], cache["conv_k"],
                                                        cache["conv_v"])
            if step:   # x [B, 1, D]
                q, k, v = (c.step(p(x[:, 0]), s)[:, None] for c, p, s in zip(convs, projs, states))
            else:
                q, k, v = (c(p(x), cu_seqlens, s) for c, p, s in zip(convs, projs, states))
        else:
            q, k, v = (p(x) for p in projs)
            q, k, v = self._qk_act(q, k) + (F.silu(v),)
        q = q.unflatten(-1, (self.num_heads, self.head_k_dim))
        k = k.unflatten(-1, (self.num_heads, self.head_k_dim))
        v = v.unflatten(-1, (self.num_v_heads, self.head_v_dim))
        return q, k, v

    def _out(self, o: Tensor, x: Tensor) -> Tensor:
        if self.use_gate:
            o = self.o_norm(o, self.g_proj(x).unflatten(-1, (self.num_v_heads, self.head_v_dim)))
        else:
            o = self.o_norm(o)
        return self.o_proj(o.flatten(-2).to(x.dtype))

    def _mix(self, x: Tensor, cu_seqlens: Optional[Tensor], cache: Optional[dict], step: bool):
        q, k, v = self._qkv(x, cu_seqlens, cache, step)
        beta, g = self._beta_g(x)
        gate = {} if g is None else {"g": g}
        state = None if cache is None else cache["state"]
        recurrent = step or self.mode == "fused_recurrent"
        fn = {(True, False): chunk_gated_delta_rule, (True, True): fused_recurrent_gated_delta_rule,
              (False, False): chunk_delta_rule, (False, True): fused_recurrent_delta_rule
              }[(g is not None, recurrent)]
        kw = {}
        # decoding without autograd updates the cached state in place (no allocation)
        inplace = (step and state is not None and not torch.is_grad_enabled()
                   and state.dtype == self._wdtype(q) and state.is_contiguous())
        if inplace:
            kw["inplace_final_state"] = True
        else:
            state = cache_input(state)
        o, last = fn(q, k, v, beta=beta, initial_state=state,
                     output_final_state=cache is not None,
                     use_qk_l2norm_in_kernel=self._qk_l2norm, cu_seqlens=cu_seqlens,
                     backend=self.backend, **gate, **kw)
        if cache is not None and not inplace:
            with torch.no_grad():
                cache["state"].copy_(last)
        return self._out(o, x)

    # ---- parallel form --------------------------------------------------------------------------

    def forward(self, hidden_states: Tensor, cu_seqlens: Optional[Tensor] = None,
                cache: Optional[dict] = None, *, attention_mask: Optional[Tensor] = None
                ) -> Tensor:
        """``hidden_states [B, T, hidden_size] -> [B, T, hidden_size]``.

        cu_seqlens: ``[N + 1]`` int32/int64 offsets of N packed sequences (B = 1), independent.
        cache: from `allocate_cache` (N rows with cu_seqlens / B rows otherwise); the states to
            continue from, overwritten with the final ones (prefill).
        attention_mask: keyword-only ``[B, S]`` 0/1 padding mask (S >= T, its last T columns
            apply; left or right padding), as fla: the real tokens are packed into one row with
            ``cu_seqlens`` (one host synchronisation), padded positions of the output are 0, and
            cache row b receives row b's state. Not together with ``cu_seqlens``.
        """
        if attention_mask is None:
            return self._mix(hidden_states, cu_seqlens, cache, step=False)
        if cu_seqlens is not None:
            raise ValueError(f"{self._name}: pass attention_mask or cu_seqlens, not both")
        B, T = hidden_states.shape[:2]
        x, cu, indices = unpad_input(hidden_states, attention_mask, self._name)
        return pad_output(self._mix(x, cu, cache, step=False), indices, B, T)

    # ---- decoding -------------------------------------------------------------------------------

    def allocate_cache(self, batch_size: int, dtype=None, device=None) -> dict:
        """Zero states for `step` / prefill: ``state [B, num_v_heads, head_k_dim, head_v_dim]``
        float32 (float64 for a float64 layer) and, with short convolutions, ``conv_q``,
        ``conv_k [B, key_dim, conv_size - 1]``, ``conv_v [B, value_dim, conv_size - 1]``."""
        device = device or self.o_proj.weight.device
        wd = dtype or self.o_proj.weight.dtype
        sd = torch.float64 if wd == torch.float64 else torch.float32
        cache = {"state": torch.zeros(batch_size, self.num_v_heads, self.head_k_dim,
                                      self.head_v_dim, device=device, dtype=sd)}
        if self.use_short_conv:
            for n, c in (("conv_q", self.q_conv1d), ("conv_k", self.k_conv1d),
                         ("conv_v", self.v_conv1d)):
                cache[n] = c.allocate_state(batch_size, dtype, device)
        return cache

    def step(self, x_t: Tensor, cache: dict) -> Tensor:
        """One token ``[B, hidden_size]`` (or ``[B, 1, hidden_size]``) -> the same shape; the cache
        is updated in place (no host synchronisation; under ``torch.no_grad()`` the recurrent
        state is updated by the kernel itself)."""
        x_t, restore = as_token(x_t)
        return restore(self._mix(x_t[:, None], None, cache, step=True)[:, 0])


class GatedDeltaNet(_DeltaRuleLayer):
    """Gated DeltaNet (Yang et al. 2024, "Gated Delta Networks: Improving Mamba2 with Delta
    Rule"): per value head ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``,
    ``o_t = S_t^T q_t / sqrt(head_dim)``, with

    - q, k, v = silu(short causal conv(q/k/v_proj(x))) (``use_short_conv``; else silu of the
      projections), q and k L2-normalised inside the kernel;
    - ``beta = sigmoid(b_proj(x))`` (times 2 with ``allow_neg_eigval``: eigenvalues of the
      transition down to -1);
    - ``g = -exp(A_log) * softplus(a_proj(x) + dt_bias)``, A and dt_bias initialised as Mamba-2
      (``A ~ U(A_init_range)``, ``softplus(dt_bias)`` log-uniform in ``[dt_min, dt_max]``);
    - output ``o_proj(o_norm(o, g_proj(x)))`` with a gated RMS norm per head (``norm(o) * weight
      * silu(gate)``; plain RMS norm without ``use_gate``).

    Constructor arguments and parameter names follow fla's ``GatedDeltaNet`` (``q_proj``,
    ``k_proj``, ``v_proj``, ``a_proj``, ``b_proj``, ``A_log``, ``dt_bias``, ``q/k/v_conv1d``,
    ``g_proj``, ``o_norm``, ``o_proj``), so its state_dict loads unchanged. ``num_v_heads``
    (default ``num_heads``) value heads share the ``num_heads`` q/k heads in groups (GVA; must be a
    multiple). ``mode``: "chunk" (training) or "fused_recurrent" (same results; `step` always
    decodes with the recurrent form). Unlike fla, ``forward`` returns the output tensor only and
    takes the cache as ``cache=`` (this package's layer convention); ``attention_mask`` is
    keyword-only. Extensions (keyword-only): ``A_init_range``, ``dt_min``, ``dt_max``,
    ``dt_init_floor``, ``backend``, ``device``, ``dtype``.

    Decoding: ``cache = layer.allocate_cache(B)`` holds ``state [B, num_v_heads, head_dim,
    head_v_dim]`` float32 and, with short convolutions, ``conv_q/conv_k/conv_v [B, dim,
    conv_size - 1]``; ``layer(x, cache=cache)`` prefills, ``layer.step(x_t, cache)`` decodes.

    Example:
        >>> import torch, ssm_kernels
        >>> layer = ssm_kernels.nn.GatedDeltaNet(hidden_size=32, head_dim=8, num_heads=2,
        ...                                      num_v_heads=4, backend="reference")
        >>> layer(torch.randn(2, 10, 32)).shape
        torch.Size([2, 10, 32])
    """

    _name = "GatedDeltaNet"

    def __init__(self, hidden_size: int = 2048, expand_v: float = 2, head_dim: int = 256,
                 num_heads: int = 6, num_v_heads: Optional[int] = None, mode: str = "chunk",
                 use_gate: bool = True, use_short_conv: bool = True,
                 allow_neg_eigval: bool = False, conv_size: int = 4, conv_bias: bool = False,
                 layer_idx: Optional[int] = None, norm_eps: float = 1e-5, *,
                 A_init_range=(0, 16), dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, backend: Optional[str] = None, device=None,
                 dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        op = self._name
        self._check_common(mode, conv_size)
        for name, val in (("hidden_size", hidden_size), ("head_dim", head_dim),
                          ("num_heads", num_heads)):
            _positive_int(op, name, val)
        num_v_heads = num_heads if num_v_heads is None else num_v_heads
        _positive_int(op, "num_v_heads", num_v_heads)
        if num_v_heads % num_heads:
            raise ValueError(f"{op}: num_v_heads={num_v_heads} must be a multiple of "
                             f"num_heads={num_heads} (each q/k head serves num_v_heads // "
                             f"num_heads value heads)")
        head_v = head_dim * expand_v
        if not (head_v >= 1 and math.isclose(head_v, round(head_v), rel_tol=0, abs_tol=1e-6)):
            raise ValueError(f"{op}: head_dim * expand_v must be a positive integer (the value "
                             f"head size), got {head_dim} * {expand_v} = {head_v}")
        if not (0 <= A_init_range[0] <= A_init_range[1]):
            raise ValueError(f"{op}: A_init_range must be 0 <= lo <= hi, got {A_init_range}")
        if not (0 < dt_min <= dt_max):
            raise ValueError(f"{op}: dt_min, dt_max must satisfy 0 < dt_min <= dt_max, got "
                             f"{dt_min}, {dt_max}")
        self.mode, self.hidden_size, self.expand_v = mode, hidden_size, expand_v
        self.use_gate, self.use_short_conv = use_gate, use_short_conv
        self.allow_neg_eigval = allow_neg_eigval
        self.conv_size, self.conv_bias = conv_size, conv_bias
        self.head_dim, self.num_heads, self.num_v_heads = head_dim, num_heads, num_v_heads
        self.head_k_dim, self.head_v_dim = head_dim, int(round(head_v))
        self.key_dim = num_heads * self.head_k_dim
        self.value_dim = num_v_heads * self.head_v_dim
        self.layer_idx, self.backend = layer_idx, backend

        self._build_qkv(hidden_size, fk)
        self.a_proj = nn.Linear(hidden_size, num_v_heads, bias=False, **fk)
        self.b_proj = nn.Linear(hidden_size, num_v_heads, bias=False, **fk)
        self.A_log = nn.Parameter(mamba2_A_log(num_v_heads, A_init_range, **fk))
        self.A_log._no_weight_decay = True
        self.dt_bias = nn.Parameter(mamba2_dt_bias(num_v_heads, dt_min, dt_max, dt_init_floor,
                                                   **fk))
        self.dt_bias._no_weight_decay = True
        self._build_rest(hidden_size, use_short_conv, conv_size, conv_bias, "silu", norm_eps, fk)

    def _qk_act(self, q, k):
        return F.silu(q), F.silu(k)

    def _beta_g(self, x):
        wd = self._wdtype(x)
        beta = torch.sigmoid(self.b_proj(x).to(wd))
        if self.allow_neg_eigval:
            beta = beta * 2.0
        g = -torch.exp(self.A_log.to(wd)) * F.softplus(self.a_proj(x).to(wd) + self.dt_bias.to(wd))
        return beta, g


class DeltaNet(_DeltaRuleLayer):
    """DeltaNet (Schlag et al. 2021; Yang et al. 2024, "Parallelizing Linear Transformers with the
    Delta Rule over Sequence Length"): per head ``S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t
    k_t v_t^T``, ``o_t = S_t^T q_t / sqrt(head_k_dim)`` — the ungated delta rule.

    q/k: short conv (with silu if ``qk_activation == "silu"``, else the activation after it), then
    ``qk_norm``: "l2" (in the kernel) or "sum" (``x / sum(x)``); v: silu(short conv). ``beta =
    sigmoid(b_proj(x))`` (ones without ``use_beta``; times 2 with ``allow_neg_eigval``). Output
    ``o_proj(o_norm(o))``, or ``o_proj(o_norm(o, g_proj(x)))`` with ``use_gate``.

    Constructor arguments and parameter names follow fla's ``DeltaNet`` (``q_proj``, ``k_proj``,
    ``v_proj``, ``b_proj``, ``q/k/v_conv1d``, ``g_proj``, ``o_norm``, ``o_proj``); "fused_chunk"
    is not a mode (fla has dropped it too). ``forward``/``step``/``allocate_cache`` as
    `GatedDeltaNet`; the cache's state is ``[B, num_heads, head_k_dim, head_v_dim]``.

    Example:
        >>> import torch, ssm_kernels
        >>> layer = ssm_kernels.nn.DeltaNet(hidden_size=32, num_heads=4, backend="reference")
        >>> layer(torch.randn(2, 10, 32)).shape
        torch.Size([2, 10, 32])
    """

    _name = "DeltaNet"
    _QK_ACTS = ("silu", "relu", "elu", "identity")

    def __init__(self, mode: str = "chunk", d_model: Optional[int] = None,
                 hidden_size: int = 1024, expand_k: float = 1.0, expand_v: float = 1.0,
                 num_heads: int = 4, use_beta: bool = True, use_gate: bool = False,
                 use_short_conv: bool = True, conv_size: int = 4, conv_bias: bool = False,
                 allow_neg_eigval: bool = False, layer_idx: Optional[int] = None,
                 qk_activation: str = "silu", qk_norm: str = "l2", norm_eps: float = 1e-5, *,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        op = self._name
        self._check_common(mode, conv_size)
        hidden_size = hidden_size if d_model is None else d_model
        for name, val in (("hidden_size", hidden_size), ("num_heads", num_heads)):
            _positive_int(op, name, val)
        if qk_activation not in self._QK_ACTS:
            raise ValueError(f"{op}: qk_activation must be one of {self._QK_ACTS}, got "
                             f"{qk_activation!r}")
        if qk_norm not in ("l2", "sum"):
            raise ValueError(f"{op}: qk_norm must be 'l2' or 'sum', got {qk_norm!r}")
        self.key_dim, self.value_dim = int(hidden_size * expand_k), int(hidden_size * expand_v)
        for name, dim in (("key dim (hidden_size * expand_k)", self.key_dim),
                          ("value dim (hidden_size * expand_v)", self.value_dim)):
            if dim < num_heads or dim % num_heads:
                raise ValueError(f"{op}: {name} = {dim} must be a positive multiple of "
                                 f"num_heads={num_heads}")
        self.mode, self.hidden_size = mode, hidden_size
        self.expand_k, self.expand_v = expand_k, expand_v
        self.num_heads = self.num_v_heads = num_heads
        self.head_k_dim, self.head_v_dim = self.key_dim // num_heads, self.value_dim // num_heads
        self.use_beta, self.use_gate, self.use_short_conv = use_beta, use_gate, use_short_conv
        self.conv_size, self.conv_bias = conv_size, conv_bias
        self.allow_neg_eigval = allow_neg_eigval
        self.qk_activation, self.qk_norm = qk_activation, qk_norm
        self._qk_l2norm = qk_norm == "l2"
        self.layer_idx, self.backend = layer_idx, backend
        self._build_qkv(hidden_size, fk)
        if use_beta:
            self.b_proj = nn.Linear(hidden_size, num_heads, bias=False, **fk)
        self._build_rest(hidden_size, use_short_conv, conv_size, conv_bias,
                    "silu" if qk_activation == "silu" else None, norm_eps, fk)

    def _qk_act(self, q, k):
        act = {"silu": F.silu, "relu": F.relu, "elu": _elu_p1,
               "identity": lambda t: t}[self.qk_activation]
        return act(q), act(k)

    def _qkv(self, x, cu_seqlens, cache, step):
        q, k, v = super()._qkv(x, cu_seqlens, cache, step)
        if self.use_short_conv and self.qk_activation != "silu":
            q, k = self._qk_act(q, k)
        if self.qk_norm == "sum":
            q, k = (t / t.sum(-1, keepdim=True) for t in (q, k))
        return q, k, v

    def _beta_g(self, x):
        wd = self._wdtype(x)
        if self.use_beta:
            beta = torch.sigmoid(self.b_proj(x).to(wd))
        else:
            beta = x.new_ones(x.shape[:-1] + (self.num_heads,), dtype=wd)
        if self.allow_neg_eigval:
            beta = beta * 2.0
        return beta, None
