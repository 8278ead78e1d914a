"""ssm_kernels: fused Triton/CUDA kernels for recurrent sequence models. Public API only."""
from ._backend import BackendUnavailableError, available_backends
from .linear_scan import linear_scan, linear_scan_ref
from .selective_scan import selective_scan_fn, selective_scan_ref, selective_state_update
from .fft_conv import fft_conv, fft_conv_ref, s4d_kernel, s4d_kernel_ref
from .linear_attn import (chunk_gla, chunk_linear_attn, chunk_simple_gla, fused_recurrent_gla,
                          fused_recurrent_linear_attn, fused_recurrent_simple_gla)
from .based import chunk_based, fused_recurrent_based

__version__ = "0.1.0"
__all__ = ["selective_scan_fn", "selective_scan_ref", "selective_state_update",
           "chunk_linear_attn", "chunk_simple_gla", "chunk_gla", "fused_recurrent_linear_attn",
           "fused_recurrent_simple_gla", "fused_recurrent_gla", "chunk_based", "fused_recurrent_based", "fft_conv", "fft_conv_ref", "s4d_kernel", "s4d_kernel_ref", "linear_scan", "linear_scan_ref", "available_backends", "BackendUnavailableError"]
