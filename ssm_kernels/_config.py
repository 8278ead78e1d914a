"""The one place that reads the environment, once, at import.

SSM_KERNELS_BACKEND: default backend for every op when `backend=None` ("auto" if unset).
"""
import os

BACKEND_NAMES = ("auto", "cuda", "triton", "reference")

DEFAULT_BACKEND = os.environ.get("SSM_KERNELS_BACKEND", "auto").strip().lower() or "auto"
# The Triton interpreter runs kernels on CPU tensors; Triton reads this variable itself.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
