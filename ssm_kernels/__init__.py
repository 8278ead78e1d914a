"""ssm_kernels: fused Triton/CUDA kernels for recurrent sequence models. Public API only."""
from ._backend import BackendUnavailableError, available_backends
from .linear_scan import linear_scan, linear_scan_ref

__version__ = "0.1.0"
__all__ = ["linear_scan", "linear_scan_ref", "available_backends", "BackendUnavailableError"]
