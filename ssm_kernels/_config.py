"""The one place that reads the environment, once, at import.

SSM_KERNELS_BACKEND: default backend for every op when `backend=None` ("auto" if unset).
"""
import os

BACKEND_NAMES = ("auto", "cuda", "triton", "reference")

DEFAULT_BACKEND = os.environ.get("SSM_KERNELS_BACKEND", "auto").strip().lower() or "auto"


def triton_interpret() -> bool:
    """Whether Triton runs kernels in its CPU interpreter. Triton reads this variable itself when a
    kernel module is first imported, so it is read live (the CLI sets it on GPU-less machines)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
