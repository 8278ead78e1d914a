"""`python -m ssm_kernels check` for causal_conv1d: fresh random inputs, odd length, forward,
final states and every gradient, both layouts, every dtype the backend serves, against the float64
reference; plus decode steps against the full-sequence output."""
from __future__ import annotations

from typing import List

import torch

from ..testing import CheckRow, check_from_cases, compare
from .interface import causal_conv1d_fn, causal_conv1d_update
from .reference import causal_conv1d_ref

_NAMES = ["out", "final_states", "grad x", "grad weight", "grad bias", "grad initial_states"]


def _fwd_bwd(fn, x, w, b, h0, cot, **kw):
    ins = [t.detach().requires_grad_() for t in (x, w, b, h0)]
    out, fin = fn(*ins[:3], None, ins[3], True, None, "silu", **kw)
    loss = (out * cot[0].to(out.dtype)).sum() + (fin * cot[1].to(fin.dtype)).sum()
    return [out, fin, *torch.autograd.grad(loss, ins)]


def cases(backend: str, device: str, full: bool = False) -> list:
    """Per dtype: ("conv", dtype, W, layout, shape) per width and layout, then ("update", dtype,
    shape). full: every dtype, width and layout of the sweep; otherwise fp32 and bf16 at width 4,
    the two layouts spread over the Triton dtypes on a GPU (fp32 `bdt`, bf16 `btd`: each (dtype,
    layout) pair is its own set of compiled kernels there)."""
    dtypes = {"reference": [torch.float32], "triton": [torch.float32, torch.float16, torch.bfloat16]}
    if not full:
        dtypes["triton"] = [torch.float32, torch.bfloat16]
    small = device == "cpu"
    shape = (2, 6, 37) if small else (4, 768, 1031)
    out = []
    for dtype in dtypes.get(backend, []):
        for W in ((2, 4) if full and not small else (4,)):
            layouts = ("bdt", "btd") if full or small or backend != "triton" else (
                ("bdt",) if dtype == torch.float32 else ("btd",))
            out += [("conv", dtype, W, layout, shape) for layout in layouts]
        out.append(("update", dtype, shape))
    return out


def check_case(backend: str, device: str, case) -> List[CheckRow]:
    if case[0] == "update":
        return _update_rows(backend, device, *case[1:])
    _, dtype, W, layout, (B, D, T) = case
    x = (torch.randn(B, D, T, device=device) if layout == "bdt"
         else torch.randn(B, T, D, device=device).transpose(1, 2)).to(dtype)
    w = torch.randn(D, W, device=device) / W ** 0.5
    b = torch.randn(D, device=device)
    h0 = torch.randn(B, D, W - 1, device=device).to(dtype)
    cot = (torch.randn(B, D, T, device=device, dtype=torch.float64),
           torch.randn(B, D, W - 1, device=device, dtype=torch.float64))
    out = _fwd_bwd(causal_conv1d_fn, x, w, b, h0, cot, backend=backend)
    ref = _fwd_bwd(causal_conv1d_ref, *(t.double() for t in (x, w, b, h0)), cot)
    lowp = _fwd_bwd(causal_conv1d_ref, x, w, b, h0, cot) if dtype != torch.float32 else None
    rows = []
    for i, name in enumerate(_NAMES):
        op = f"causal_conv1d W={W} {layout} {name}"
        v = compare(op, out[i], ref[i], dtype, None if lowp is None else lowp[i])
        rows.append(CheckRow(op, backend, str(dtype).replace("torch.", ""), v))
    return rows


def _update_rows(backend: str, device: str, dtype, shape) -> List[CheckRow]:
    """Decode: three single steps after a prefill continue the sequence."""
    B, D, _ = shape
    W = 4
    x = torch.randn(B, D, 12, device=device).to(dtype)
    w, b = torch.randn(D, W, device=device), torch.randn(D, device=device)
    whole = causal_conv1d_ref(x.double(), w.double(), b.double(), activation="silu")
    _, state = causal_conv1d_fn(x[..., :9], w, b, return_final_states=True, backend=backend)
    state = state.float().contiguous()
    steps = [causal_conv1d_update(x[..., t], state, w, b, "silu", backend=backend)
             for t in range(9, 12)]
    lowp = causal_conv1d_ref(x, w, b, activation="silu")[..., 9:] if dtype != torch.float32 else None
    v = compare("causal_conv1d_update", torch.stack(steps, -1), whole[..., 9:], dtype, lowp)
    return [CheckRow("causal_conv1d_update 3 steps", backend, str(dtype).replace("torch.", ""), v)]


check = check_from_cases(cases, check_case)
