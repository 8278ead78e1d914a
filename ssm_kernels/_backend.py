"""Backend resolution shared by every op: cuda -> triton -> reference.

Each op describes, per backend, a `supports(**call) -> str | None` predicate that returns None when
that backend can serve the call and otherwise the reason it cannot. `resolve()` then implements the
rule of DESIGN.md: `auto` takes the first backend that can serve the call; an explicit request that
cannot be served raises `BackendUnavailableError` naming what is missing; nothing falls back
silently. The decision reads only device, dtype, shapes and installed parts, so it is constant
under torch.compile (it runs inside the registered op, opaque to the tracer).
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Optional

import torch

from . import _config

ORDER = ("cuda", "triton", "reference")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot serve this call (missing part or unsupported input)."""


_cuda_ext = None
_cuda_ext_error: Optional[str] = None
_cuda_ext_tried = False


def cuda_extension():
    """The compiled extension ssm_kernels._C, or None (the reason is in `cuda_extension_error()`)."""
    global _cuda_ext, _cuda_ext_error, _cuda_ext_tried
    if not _cuda_ext_tried:
        _cuda_ext_tried = True
        try:
            _cuda_ext = importlib.import_module("ssm_kernels._C")
        except ImportError as e:  # not built on this machine
            _cuda_ext_error = f"the CUDA extension ssm_kernels._C is not built ({e})"
    return _cuda_ext


def cuda_extension_error() -> Optional[str]:
    cuda_extension()
    return _cuda_ext_error


def triton_reason(device: torch.device) -> Optional[str]:
    """Why Triton kernels cannot run on `device` (None if they can)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _config.triton_interpret():
        return None
    return (f"Triton kernels need a CUDA tensor (got device {device.type}); on CPU set "
            f"TRITON_INTERPRET=1 before starting Python to run them in the interpreter")


def cuda_reason(device: torch.device) -> Optional[str]:
    """Why the CUDA extension cannot run on `device` (None if it can)."""
    if device.type != "cuda":
        return f"the CUDA backend needs a CUDA tensor (got device {device.type})"
    return cuda_extension_error()


def normalize(requested: Optional[str]) -> str:
    name = _config.DEFAULT_BACKEND if requested is None else requested
    if not isinstance(name, str) or name.lower() not in _config.BACKEND_NAMES:
        raise ValueError(f"backend must be one of {_config.BACKEND_NAMES} or None, got {requested!r}")
    return name.lower()


def resolve(op: str, requested: Optional[str], supports: Dict[str, Callable[[], Optional[str]]],
            order: tuple = ORDER) -> str:
    """Pick the backend for one call of `op`.

    supports: backend name -> zero-argument callable returning None (can serve) or a reason.
    order: preference for `auto`; cuda -> triton -> reference unless an op's benchmark says its
        Triton kernel is the faster one (then that op passes its own order).
    """
    name = normalize(requested)
    if name != "auto":
        check = supports.get(name)
        reason = f"{op} has no {name} implementation" if check is None else check()
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend={name!r} cannot serve this call: {reason}")
        return name
    reasons = []
    for cand in order:
        check = supports.get(cand)
        if check is None:
            continue
        reason = check()
        if reason is None:
            return cand
        reasons.append(f"{cand}: {reason}")
    raise BackendUnavailableError(f"{op}: no backend can serve this call ({'; '.join(reasons)})")


def available_backends(device: torch.device | str = "cuda") -> list:
    """Backends that can run on `device` on this machine (ignoring per-call dtype/shape limits)."""
    device = torch.device(device)
    out = []
    if cuda_reason(device) is None and (device.type != "cuda" or torch.cuda.is_available()):
        out.append("cuda")
    if triton_reason(device) is None and (device.type != "cuda" or torch.cuda.is_available()):
        out.append("triton")
    out.append("reference")
    return out
