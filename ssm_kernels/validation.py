"""Argument checks shared by every public function: errors name the argument, expected and got."""
from __future__ import annotations

from typing import Optional

import torch

from . import _config


def checks_values(x: Optional[torch.Tensor]) -> bool:
    """Whether to check values of `x` on the host: always for CPU tensors, for GPU tensors only in
    debug mode (`ssm_kernels.set_debug(True)` / SSM_KERNELS_DEBUG=1), and never while compiling or
    capturing a CUDA graph (a device-to-host copy there is an error or a graph break)."""
    if x is None or torch.compiler.is_compiling():
        return False
    if x.device.type == "cpu":
        return True
    return _config.debug() and not torch.cuda.is_current_stream_capturing()


def check_log_decay(op: str, name: str, g: Optional[torch.Tensor]) -> None:
    """Log-decays must be <= 0 (a decay of at most 1). A value check: see `checks_values`."""
    if checks_values(g) and bool((g > 0).any()):
        raise ValueError(f"{op}: {name} holds log-decays and must be <= 0, got a maximum of "
                         f"{g.max().item():.4g}")


def check_tensor(op: str, name: str, x, min_rank: int = 0, rank: Optional[int] = None) -> None:
    """`x` is a tensor (of rank `rank`, or at least `min_rank`); errors read "{op}: {name} ..."."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if rank is not None and x.dim() != rank:
        raise ValueError(f"{op}: {name} must have rank {rank}, got shape {tuple(x.shape)}")
    if x.dim() < min_rank:
        raise ValueError(f"{op}: {name} must have rank >= {min_rank}, got shape {tuple(x.shape)}")


def check_qkv(op: str, q, k, v, dtypes: tuple) -> None:
    """q, k, v of the attention-like ops: rank-4 tensors, q's dtype in `dtypes`, k and v in q's."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, x, rank=4)
    if q.dtype not in dtypes:
        raise TypeError(f"{op}: q must have dtype in {dtypes}, got {q.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{op}: {name} must have q's dtype {q.dtype}, got {x.dtype}")


def check_dtype(op: str, name: str, x: torch.Tensor, floating: bool = True,
                complex_ok: bool = False, allowed=None) -> None:
    if allowed is not None:
        if x.dtype not in allowed:
            raise TypeError(f"{op}: {name} must have dtype in {tuple(allowed)}, got {x.dtype}")
        return
    ok = (floating and x.is_floating_point()) or (complex_ok and x.is_complex())
    if not ok:
        kinds = "a floating" + (" or complex" if complex_ok else "")
        raise TypeError(f"{op}: {name} must have {kinds} dtype, got {x.dtype}")


def check_same_device(op: str, **tensors) -> None:
    device = None
    for k, v in tensors.items():  # the common case costs one comparison per tensor
        if v is None:
            continue
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{op}: {k} must be a torch.Tensor or None, got {type(v).__name__}")
        if device is None:
            device = v.device
        elif v.device != device:
            listing = ", ".join(f"{k} on {t.device}" for k, t in tensors.items() if t is not None)
            raise ValueError(f"{op}: all tensors must be on one device, got {listing}")


def check_shape(op: str, name: str, x: torch.Tensor, expected: tuple) -> None:
    """expected may contain None for any size."""
    ok = x.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, x.shape))
    if not ok:
        exp = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{op}: {name} must have shape {exp}, got {tuple(x.shape)}")


def check_cu_seqlens(op: str, cu_seqlens: torch.Tensor, batch: int, T: int, *,
                     empty_ok: bool = True, axis: str = "T", values: bool = True) -> int:
    """Packed-sequence offsets (FlashAttention style) for a batch of one row of length T along
    `axis`: rank 1, int32/int64, N + 1 >= 2 entries from 0 to T, non-decreasing (strictly
    increasing when empty sequences are not allowed). The value checks read the tensor on the host:
    see `checks_values` for when they run (values=False: metadata only, for a memoised check).
    Returns N, the number of sequences."""
    check_tensor(op, "cu_seqlens", cu_seqlens, rank=1)
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{op}: cu_seqlens must hold N + 1 >= 2 offsets, got {cu_seqlens.numel()}")
    if batch != 1:
        raise ValueError(f"{op}: with cu_seqlens the batch must be 1 (B == 1, sequences packed "
                         f"along {axis}), got batch {batch}")
    if values and checks_values(cu_seqlens):
        c = cu_seqlens.tolist()
        steps_ok = all((b >= a) if empty_ok else (b > a) for a, b in zip(c[:-1], c[1:]))
        if c[0] != 0 or c[-1] != T or not steps_ok:
            order = "non-decreasing" if empty_ok else "strictly increasing"
            shown = c if len(c) <= 10 else c[:5] + ["..."] + c[-2:]
            raise ValueError(f"{op}: cu_seqlens must start at 0, end at {axis}={T} and be {order}, "
                             f"got {shown}")
    return cu_seqlens.numel() - 1


def swaps_dims_1_2(got, want) -> bool:
    """Whether shape `got` is shape `want` with dims 1 and 2 swapped (and differs from it): a
    [B, H, T, ...] tensor where [B, T, H, ...] is expected, or the other way round. For layout
    hints in error messages."""
    got, want = tuple(got), tuple(want)
    return len(got) == len(want) >= 3 and got != want and \
        got == want[:1] + want[2:3] + want[1:2] + want[3:]


def empty_result(shape, like: torch.Tensor, *inputs, dtype: Optional[torch.dtype] = None
                 ) -> torch.Tensor:
    """A zero-filled output of `shape` for a call with nothing to compute (an empty batch), wired
    into autograd: its gradient reaches every input in `inputs` that requires one, as zeros of
    that input's shape (the exact gradient of an empty sum), so backward() works as usual."""
    out = like.new_zeros(shape, dtype=dtype)
    if torch.is_grad_enabled():
        live = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
        if live:
            tie = sum(x.sum().real * 0 for x in live)
            out = out + tie.to(out.dtype)
    return out
