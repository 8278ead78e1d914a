"""ssm_kernels: fused Triton/CUDA kernels for recurrent sequence models. Public API only."""
from ._backend import BackendUnavailableError, available_backends
from .linear_scan import linear_scan, linear_scan_ref
from .based import chunk_based, fused_recurrent_based

__version__ = "0.1.0"
__all__ = ["chunk_based", "fused_recurrent_based", "linear_scan", "linear_scan_ref", "available_backends", "BackendUnavailableError"]
