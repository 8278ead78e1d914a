"""Tolerance helpers shared by the tests, `python -m ssm_kernels check` and the benchmark.

The rule (DESIGN.md): error is the relative RMS error ||out - ref|| / ||ref|| against a float64
reference. Full-precision kernels must land under a small fixed bound; low-precision (fp16/bf16)
kernels pass when their error is at most ~2x the error of the same reference computed from the
same low-precision inputs (plus a small floor), so the bound follows the problem's conditioning
instead of a magic number.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# Bounds for full-precision storage, relative RMS error against float64.
FULL_PRECISION_RTOL = {
    torch.float64: 1e-10,
    torch.complex128: 1e-10,
    torch.float32: 1e-5,
    torch.complex64: 1e-5,
}
# Floor added to 2x the low-precision reference's error (a few units of the format's rounding).
LOW_PRECISION_FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
LOW_PRECISION_FACTOR = 2.0


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (absolute norm if ref is all zeros); inf on NaN/inf."""
    if out.shape != ref.shape:
        raise ValueError(f"shape mismatch: out {tuple(out.shape)} vs ref {tuple(ref.shape)}")
    o = out.detach().to("cpu", torch.complex128 if out.is_complex() or ref.is_complex() else torch.float64)
    r = ref.detach().to("cpu", o.dtype)
    if not torch.isfinite(o).all():
        return float("inf")
    num = torch.linalg.vector_norm(o - r).item()
    den = torch.linalg.vector_norm(r).item()
    return num / den if den > 0 else num


def max_abs_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    o = out.detach().to("cpu", torch.complex128 if out.is_complex() else torch.float64)
    r = ref.detach().to("cpu", o.dtype)
    return (o - r).abs().max().item() if o.numel() else 0.0


@dataclass
class Verdict:
    name: str
    err: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.err <= self.bound

    def __str__(self) -> str:
        return f"{self.name}: rel err {self.err:.3e} (bound {self.bound:.3e}) {'ok' if self.ok else 'FAIL'}"


def bound_for(dtype: torch.dtype, lowp_ref_err: Optional[float] = None) -> float:
    """The error bound for a kernel whose inputs/outputs are stored in `dtype`."""
    if dtype in LOW_PRECISION_FLOOR:
        if lowp_ref_err is None:
            raise ValueError(f"{dtype} needs the low-precision reference's error (lowp_ref_err)")
        return LOW_PRECISION_FACTOR * lowp_ref_err + LOW_PRECISION_FLOOR[dtype]
    return FULL_PRECISION_RTOL.get(dtype, 1e-5)


def compare(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
            lowp_ref: Optional[torch.Tensor] = None) -> Verdict:
    """Judge `out` against the float64 `ref`; `lowp_ref` is the reference run in `dtype`."""
    lowp = rel_err(lowp_ref, ref) if lowp_ref is not None else None
    return Verdict(name, rel_err(out, ref), bound_for(dtype, lowp))


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: Optional[torch.dtype] = None,
                 lowp_ref: Optional[torch.Tensor] = None, name: str = "output") -> Verdict:
    """Raise AssertionError with the numbers if `out` is not within the bound of `ref`."""
    v = compare(name, out, ref, dtype or out.dtype, lowp_ref)
    if not v.ok:
        raise AssertionError(f"{v} (max abs err {max_abs_err(out, ref):.3e})")
    return v


def varlen_offsets(T: int, device) -> torch.Tensor:
    """`check`'s cu_seqlens over T tokens: four sequences, one empty, one of 3 tokens, odd ends."""
    return torch.tensor([0, T // 5, T // 5, T - 3, T], device=device, dtype=torch.int32)


@dataclass
class CheckRow:
    """One line of `python -m ssm_kernels check`: an op's output/gradient on one backend and dtype."""
    op: str
    backend: str
    dtype: str
    verdict: Verdict


class OfflineDriver:
    """Just enough of a CUDA driver for Triton's JITFunction.run to pick the sm_90 target and
    compile on a machine without a GPU (offline audits, launch-path tests and host profiles; the
    caller stubs the launchers): H100/H200 limits, CPU tensors stand in for CUDA ones."""
    SMEM_LIMIT = 232448   # cudaDevAttrMaxSharedMemoryPerBlockOptin on H100/H200 (227 KiB)

    class utils:  # noqa: N801 (Triton reads driver.utils.get_device_properties)
        @staticmethod
        def get_device_properties(device):
            return {"max_shared_mem": OfflineDriver.SMEM_LIMIT, "multiprocessor_count": 132,
                    "max_num_regs": 65536, "warpSize": 32}

    def __init__(self, stream: int = 0):
        self._stream = stream

    def is_active(self):
        return True

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return self._stream

    def get_active_torch_device(self):
        return torch.device("cpu")



def ssd_inputs(b: int, L: int, H: int, P: int, G: int, N: int, device, n_states: Optional[int] = None):
    """Random SSD inputs in bf16 storage (x, B, C, z) with fp32 dt, A (negative), D (H, P),
    dt_bias and initial states [n_states or b, H, P, N]: the full optional set of
    `mamba_chunk_scan_combined`, as (x, dt, A, B, C, D, z, dt_bias, h0)."""
    x = torch.randn(b, L, H, P, device=device).to(torch.bfloat16)
    dt = torch.randn(b, L, H, device=device)
    A = -2 * torch.rand(H, device=device)
    Bm, Cm = torch.randn(2, b, L, G, N, device=device).to(torch.bfloat16).unbind(0)
    D = torch.randn(H, P, device=device)
    z = torch.randn(b, L, H, P, device=device).to(torch.bfloat16)
    bias = torch.randn(H, device=device)
    h0 = torch.randn(b if n_states is None else n_states, H, P, N, device=device)
    return x, dt, A, Bm, Cm, D, z, bias, h0

def check_from_cases(cases, check_case):
    """A family's whole `check(backend, device, full=False) -> [CheckRow]` from its two parts:
    `cases(backend, device, full)` (picklable descriptions, in report order; no random draws) and
    `check_case(backend, device, case)` (draws the case's inputs, runs it, judges it). `python -m
    ssm_kernels check` runs the cases itself (seeded one by one, spread over worker processes)."""
    def check(backend: str, device: str, full: bool = False) -> list:
        return [row for case in cases(backend, device, full)
                for row in check_case(backend, device, case)]
    return check
