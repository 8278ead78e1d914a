"""One host path for every kernel launch: a registered op for the compiler, a direct call in eager.

`torch.library.custom_op` is what makes `torch.compile(fullgraph=True)` and `opcheck` work, but its
eager dispatch costs tens to hundreds of microseconds per call (schema parsing of defaults, the
dispatcher, an autograd wrapper that materialises zero gradients). Kernels that run for a few
microseconds cannot afford that. `kernel_op` registers the op exactly as before and returns a
`KernelOp` that, in eager mode, calls the implementation directly — through a plain
`torch.autograd.Function` built from the same `setup_context`/`backward` when a gradient is needed.
While compiling or when handed tensor subclasses (fake/functional tensors of export and opcheck),
it goes through the registered op, so tracing sees one opaque node with its fake implementation.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

_is_compiling = torch.compiler.is_compiling
_Tensor = torch.Tensor
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_functorch_active = torch._C._are_functorch_transforms_active  # any other subclass (fake, functional) traces


class KernelOp:
    """A registered custom op plus its eager fast path. Call it like the function it wraps.

    op: the `torch.library.custom_op` object (use it for opcheck, or `torch.ops.ssm_kernels.*`).
    impl: the undecorated implementation (what eager calls run).
    """

    def __init__(self, name: str, fn: Callable, mutates_args: Iterable[str]):
        self.impl = fn
        self.op = torch.library.custom_op(f"ssm_kernels::{name}", fn, mutates_args=mutates_args)
        self._function: Optional[type] = None
        self.__name__ = name
        self.__doc__ = fn.__doc__

    def register_fake(self, fn: Callable) -> Callable:
        self.op.register_fake(fn)
        return fn

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        """Same contract as CustomOpDef.register_autograd; backward may receive None for the
        gradient of an output that was not used (both paths pass None, never materialised zeros)."""
        self.op.register_autograd(backward, setup_context=setup_context)
        impl = self.impl

        # Old-style forward(ctx, *args): Function.apply binds default arguments through
        # inspect.signature on every call when a separate setup_context is defined (tens of us).
        def forward(ctx, *args):
            ctx.set_materialize_grads(False)
            output = impl(*args)
            setup_context(ctx, args, output)
            return output

        self._function = type(f"{self.__name__}_function", (torch.autograd.Function,), {
            "forward": staticmethod(forward),
            "backward": staticmethod(backward),
        })
        # Function.apply's Python layer only binds defaults (none here) and unwraps dead functorch
        # wrappers; outside functorch transforms the C apply under it does the rest (host time)
        self._apply = super(torch.autograd.Function, self._function).apply

    def eager(self, first) -> bool:
        """Whether a call whose first argument is `first` runs the implementation directly (the
        test __call__ makes): a caller that post-processes the op's schema-shaped result (empty
        tensors for absent outputs) can then call a lighter function of its own instead."""
        return not _is_compiling() and type(first) in _PLAIN

    def __call__(self, *args):
        if _is_compiling() or type(args[0]) not in _PLAIN:
            return self.op(*args)
        if self._function is not None and torch.is_grad_enabled() and _any_requires_grad(args):
            if _functorch_active():
                return self._function.apply(*args)
            return self._apply(*args)
        return self.impl(*args)


def _any_requires_grad(args) -> bool:
    for a in args:
        if isinstance(a, _Tensor) and a.requires_grad:  # nn.Parameter included
            return True
    return False


def kernel_op(name: str, *, mutates_args: Iterable[str] = ()) -> Callable[[Callable], KernelOp]:
    """Decorator: register `fn` as `torch.ops.ssm_kernels.<name>` and return its `KernelOp`."""
    def wrap(fn: Callable) -> KernelOp:
        return KernelOp(name, fn, mutates_args)
    return wrap


def cached_on_metadata(fn: Optional[Callable] = None, *, typed: bool = False) -> Callable:
    """Memoise a function of tensors' metadata only (device, dtype, shape) and plain values: the
    backend choice of every call and the argument checks of the public functions are such
    functions, and redoing them costs host time on every call (issue 8). typed=True (argument
    checks): the arguments' types enter the key too (True and 1 hash alike; a check may accept
    one and reject the other). Exceptions are not cached (a failing call raises again, with its
    message); value checks (log-decays, cu_seqlens' contents) must stay outside. Calls with an
    unhashable argument and calls while compiling (symbolic shapes) run `fn` itself. The cache is
    cleared when it grows past a few thousand entries."""
    if fn is None:
        return lambda f: cached_on_metadata(f, typed=typed)
    cache: dict = {}

    def wrapper(*args, **kwargs):
        if _is_compiling():
            return fn(*args, **kwargs)
        key = tuple([(a.device, a.dtype, a.shape) if isinstance(a, _Tensor) else a for a in args])
        if typed:
            key += tuple(map(type, args))
        if kwargs:
            key += tuple(kwargs.items())
        try:
            return cache[key]
        except KeyError:
            if len(cache) > 4096:
                cache.clear()
            result = cache[key] = fn(*args, **kwargs)
            return result
        except TypeError:   # an unhashable argument (a list, ...): no memo
            return fn(*args, **kwargs)

    wrapper.__wrapped__ = fn
    wrapper.__doc__ = fn.__doc__
    wrapper.cache = cache
    return wrapper
