"""ssm_kernels: fused Triton/CUDA kernels for recurrent sequence models. Public API only."""
from ._backend import BackendUnavailableError, available_backends
from ._config import set_debug
from ._version import __version__
from ._warmup import compile_ahead
from .based import chunk_based, fused_recurrent_based
from .causal_conv1d import causal_conv1d_fn, causal_conv1d_ref, causal_conv1d_update
from .delta_rule import (chunk_delta_rule, chunk_gated_delta_rule, delta_rule_recurrent_ref,
                         fused_recurrent_delta_rule, fused_recurrent_gated_delta_rule)
from .fft_conv import fft_conv, fft_conv_ref, s4d_kernel, s4d_kernel_ref
from .linear_attn import (chunk_gla, chunk_linear_attn, chunk_simple_gla, fused_recurrent_gla,
                          fused_recurrent_linear_attn, fused_recurrent_simple_gla)
from .linear_scan import linear_scan, linear_scan_ref
from .selective_scan import selective_scan_fn, selective_scan_ref, selective_state_update
from .ssd import mamba_chunk_scan_combined, ssd_ref
from . import nn  # layers: ssm_kernels.nn.Mamba, GatedLinearAttention, ...

__all__ = [
    # first-order linear recurrences (minGRU, RG-LRU, LRU)
    "linear_scan", "linear_scan_ref",
    # selective scan (Mamba-1), mamba-ssm drop-ins
    "selective_scan_fn", "selective_scan_ref", "selective_state_update",
    # SSD (Mamba-2), mamba-ssm drop-in
    "mamba_chunk_scan_combined", "ssd_ref",
    # chunked linear attention, flash-linear-attention drop-ins
    "chunk_linear_attn", "chunk_simple_gla", "chunk_gla", "chunk_based",
    "fused_recurrent_linear_attn", "fused_recurrent_simple_gla", "fused_recurrent_gla",
    "fused_recurrent_based",
    # delta rule (DeltaNet, Gated DeltaNet), flash-linear-attention drop-ins
    "chunk_gated_delta_rule", "chunk_delta_rule", "fused_recurrent_gated_delta_rule",
    "fused_recurrent_delta_rule", "delta_rule_recurrent_ref",
    # short causal convolution, causal-conv1d drop-ins
    "causal_conv1d_fn", "causal_conv1d_update", "causal_conv1d_ref",
    # long convolutions
    "fft_conv", "fft_conv_ref", "s4d_kernel", "s4d_kernel_ref",
    # backends
    "available_backends", "BackendUnavailableError",
    # GPU value checks (log-decays, cu_seqlens) on every call; off by default (they sync)
    "set_debug",
    # compile a call's (and its backward's) Triton kernels ahead, in parallel threads
    "compile_ahead",
]
