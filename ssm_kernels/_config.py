"""The one place that reads the environment, once, at import.

SSM_KERNELS_BACKEND: default backend for every op when `backend=None` ("auto" if unset).
SSM_KERNELS_DEBUG: "1" turns on value checks of GPU tensors (see `set_debug`).
"""
import os

BACKEND_NAMES = ("auto", "cuda", "triton", "reference")

DEFAULT_BACKEND = os.environ.get("SSM_KERNELS_BACKEND", "auto").strip().lower() or "auto"

_debug = os.environ.get("SSM_KERNELS_DEBUG", "0").strip() not in ("", "0")


def set_debug(enabled: bool) -> None:
    """Check values that live on the GPU (log-decays <= 0, cu_seqlens order, ...) on every call.

    Off by default: such checks need a device-to-host copy, which stalls the host, forbids CUDA-graph
    capture and breaks asynchronous execution. CPU tensors are always checked (no sync needed).
    """
    global _debug
    _debug = bool(enabled)


def debug() -> bool:
    return _debug


def triton_interpret() -> bool:
    """Whether Triton runs kernels in its CPU interpreter. Triton reads this variable itself when a
    kernel module is first imported, so it is read live (the CLI sets it on GPU-less machines)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
