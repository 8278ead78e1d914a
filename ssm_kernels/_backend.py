"""Backend resolution shared by every op: cuda -> triton -> reference.

Each op describes, per backend, a `supports(**call) -> str | None` predicate that returns None when
that backend can serve the call and otherwise the reason it cannot. `resolve()` then implements the
rule of DESIGN.md: `auto` takes the first backend that can serve the call; an explicit request that
cannot be served raises `BackendUnavailableError` naming what is missing; nothing falls back
silently. The decision reads only device, dtype, shapes and installed parts, so it is constant
under torch.compile (it runs inside the registered op, opaque to the tracer).

The Triton *interpreter* (TRITON_INTERPRET=1, CPU tensors) runs kernels thousands of times slower
than the references; it exists for testing. `auto` therefore never picks it: on a CPU tensor `auto`
takes the reference, and only an explicit `backend="triton"` runs the interpreter.

Triton is an optional dependency: nothing here imports it until a backend question needs the
answer, and the answer (with the import error, if any) is cached.
"""
from __future__ import annotations

import contextvars
import importlib
from typing import Callable, Dict, Optional

import torch

from . import _config

ORDER = ("cuda", "triton", "reference")
ENV_VAR = "SSM_KERNELS_BACKEND"

INSTALL_TRITON = "pip install 'ssm_kernels[triton]'"
BUILD_CUDA = ("build it against the installed torch on a CUDA machine: "
              "pip install --no-build-isolation --no-deps -e .")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot serve this call (missing part or unsupported input)."""


def _check_default_backend() -> str:
    """The env default, validated once at import: a typo must fail loudly and name the variable."""
    name = _config.DEFAULT_BACKEND
    if name not in _config.BACKEND_NAMES:
        raise ValueError(f"environment variable {ENV_VAR}={name!r} is not a backend; use one of "
                         f"{', '.join(_config.BACKEND_NAMES)} (or unset it for 'auto')")
    return name


DEFAULT_BACKEND = _check_default_backend()

# ---- installed parts (probed lazily, cached) -----------------------------------------------------

_cuda_ext = None
_cuda_ext_error: Optional[str] = None
_cuda_ext_tried = False
_triton_error: Optional[str] = None
_triton_tried = False
_numpy_error: Optional[str] = None
_numpy_tried = False


def cuda_extension():
    """The compiled extension ssm_kernels._C, or None (the reason is in `cuda_extension_error()`)."""
    global _cuda_ext, _cuda_ext_error, _cuda_ext_tried
    if not _cuda_ext_tried:
        _cuda_ext_tried = True
        try:
            _cuda_ext = importlib.import_module("ssm_kernels._C")
        except ImportError as e:  # not built on this machine
            _cuda_ext_error = f"the CUDA extension ssm_kernels._C is not built ({e}); {BUILD_CUDA}"
    return _cuda_ext


def cuda_extension_error() -> Optional[str]:
    cuda_extension()
    return _cuda_ext_error


def triton_import_error() -> Optional[str]:
    """None if `import triton` works here, else why not (not installed, or a dependency missing)."""
    global _triton_error, _triton_tried
    if not _triton_tried:
        _triton_tried = True
        try:
            importlib.import_module("triton")
        except ImportError as e:
            if getattr(e, "name", None) == "triton":
                _triton_error = f"triton is not installed ({INSTALL_TRITON})"
            else:  # installed, but one of its imports failed (numpy under the interpreter, ...)
                _triton_error = (f"triton is installed but cannot be imported: {e} "
                                 f"({INSTALL_TRITON} installs what it needs)")
        except Exception as e:  # a broken install must not break the references
            _triton_error = f"triton cannot be imported: {type(e).__name__}: {e}"
    return _triton_error


def _numpy_import_error() -> Optional[str]:
    global _numpy_error, _numpy_tried
    if not _numpy_tried:
        _numpy_tried = True
        try:
            importlib.import_module("numpy")
        except ImportError as e:
            _numpy_error = (f"the Triton interpreter needs numpy, which cannot be imported ({e}); "
                            f"{INSTALL_TRITON}")
    return _numpy_error


# While `auto` is choosing, triton_reason() turns down the interpreter (see the module docstring).
_choosing_auto: contextvars.ContextVar = contextvars.ContextVar("ssm_kernels_auto", default=False)

INTERPRETER_NOT_AUTO = ("the Triton interpreter (TRITON_INTERPRET=1) is for testing and far slower "
                        "than the reference on CPU, so auto never picks it; pass backend='triton' "
                        "to run it")


def triton_reason(device: torch.device) -> Optional[str]:
    """Why Triton kernels cannot run on `device` (None if they can)."""
    device = torch.device(device)
    if device.type == "cuda":
        return triton_import_error()
    if device.type == "cpu":
        if not _config.triton_interpret():
            return (f"Triton kernels need a CUDA tensor (got device cpu); the reference serves CPU "
                    f"tensors at full speed (for testing only, TRITON_INTERPRET=1 set before "
                    f"starting Python runs the kernels in Triton's slow interpreter)")
        reason = triton_import_error() or _numpy_import_error()
        if reason is None and _choosing_auto.get():
            return INTERPRETER_NOT_AUTO
        return reason
    return f"Triton kernels need a CUDA tensor (got device {device.type})"


def cuda_reason(device: torch.device) -> Optional[str]:
    """Why the CUDA extension cannot run on `device` (None if it can)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the CUDA backend needs a CUDA tensor (got device {device.type})"
    return cuda_extension_error()


def normalize(requested: Optional[str]) -> str:
    """The backend name a call asked for: `requested`, or the env default when None."""
    if requested is None:
        return DEFAULT_BACKEND
    if not isinstance(requested, str) or requested.strip().lower() not in _config.BACKEND_NAMES:
        raise ValueError(f"backend must be one of {', '.join(_config.BACKEND_NAMES)} or None "
                         f"(None reads {ENV_VAR}, default 'auto'), got {requested!r}")
    return requested.strip().lower()


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
    token = _choosing_auto.set(True)
    try:
        for cand in order:
            check = supports.get(cand)
            if check is None:
                continue
            reason = check()
            if reason is None:
                return cand
            reasons.append(f"{cand}: {reason}")
    finally:
        _choosing_auto.reset(token)
    raise BackendUnavailableError(f"{op}: no backend can serve this call ({'; '.join(reasons)})")


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backend_reasons(device: torch.device | str | None = None) -> Dict[str, Optional[str]]:
    """For each backend in ORDER: None if it can run on `device` here (ignoring per-call
    dtype/shape limits), else why not. `device` defaults to where tensors would live (cuda if a GPU
    is visible, else cpu)."""
    device = _default_device() if device is None else torch.device(device)
    out: Dict[str, Optional[str]] = {}
    no_gpu = (f"no CUDA GPU is visible to torch (torch {torch.__version__}, "
              f"built with CUDA {torch.version.cuda})")
    gpu_missing = device.type == "cuda" and not torch.cuda.is_available()
    out["cuda"] = no_gpu if gpu_missing else cuda_reason(device)
    out["triton"] = no_gpu if gpu_missing else triton_reason(device)
    out["reference"] = None
    return out


def available_backends(device: torch.device | str | None = None) -> list:
    """Backends that can run on `device` on this machine (ignoring per-call dtype/shape limits).

    `device` defaults to where tensors would live: "cuda" if a GPU is visible, else "cpu". On a CPU,
    "triton" is listed only when the interpreter was asked for (TRITON_INTERPRET=1) and works.
    """
    return [name for name, reason in backend_reasons(device).items() if reason is None]
