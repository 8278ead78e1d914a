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


try:   # os.environ's own store (what os.environ[...] = / del / putenv through it keep current):
    # one dict read instead of Mapping.get -> encode -> decode (~1 us, several per op call)
    _ENV_DATA = os.environ._data
    _INTERPRET_KEY = os.environ.encodekey("TRITON_INTERPRET")
    _OFF = frozenset((os.environ.encodevalue(""), os.environ.encodevalue("0")))
except (AttributeError, TypeError):   # not CPython's os._Environ
    _ENV_DATA = None


def triton_interpret() -> bool:
    """Whether Triton runs kernels in its CPU interpreter. Triton reads this variable itself when a
    kernel module is first imported, so it is read live (the CLI sets it on GPU-less machines)."""
    if _ENV_DATA is not None:
        v = _ENV_DATA.get(_INTERPRET_KEY)
        return v is not None and v not in _OFF
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
