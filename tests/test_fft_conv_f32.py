"""The float32 forward on the monarch16 kernels (interface.MONARCH16_F32, on for N <= 4096): every
product split into three fp16 tensor-core dots. Against float64 through autograd (the forward on
the new kernel, every gradient on the cuFFT path), the float32 bound (1e-5), row blocks and the
unblocked kernel, odd B / H, L > N / 2, extreme scales; the path table; the split tables."""
import pytest
import torch

import ssm_kernels as sk
from ssm_kernels.fft_conv import cufft as fft_cufft
from ssm_kernels.fft_conv import interface as fft_interface
from ssm_kernels.fft_conv import monarch16 as fft_m16
from ssm_kernels.fft_conv.reference import fft_conv_direct
from ssm_kernels.testing import assert_close, rel_err

from conftest import DEVICE, CountLaunches as _Count, kernel_backends
from test_fft_conv import check, make, opcheck_fwd


@pytest.fixture
def f32_on(monkeypatch):
    """MONARCH16_F32 on, NaN-filled outputs, the f32 kernel and the cuFFT backward counted."""
    monkeypatch.setattr(fft_interface, "MONARCH16_F32", True)
    monkeypatch.setattr(fft_m16, "FILL_NAN", True)
    monkeypatch.setattr(fft_cufft, "FILL_NAN", True)
    kern = _Count(fft_m16._monarch16_f32_fwd_kernel)
    monkeypatch.setattr(fft_m16, "_monarch16_f32_fwd_kernel", kern)
    bwd = []
    real = fft_cufft.fft_conv_bwd
    monkeypatch.setattr(fft_cufft, "fft_conv_bwd", lambda *a: bwd.append(a[1].shape) or real(*a))
    return kern, bwd


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("B,H,L,Lk,kblock", [
    (3, 5, 201, 57, None),     # N = 256 = 16 x 16, R1 = N1, odd B: a lone last row
    (2, 3, 255, 255, None),    # N = 512 = 32 x 16, R1 = 16
    (1, 2, 130, 3, None),      # L > N / 2: every row of the time tile holds data
    (4, 17, 300, 211, 16),     # N = 512, H odd, two row blocks of 16
    (5, 1, 33, 33, None),      # H = 1: the batch in 3 slices
    (2, 3, 1024, 1024, None),  # N = 2048 (64 x 32): the default (unblocked)
    (2, 3, 1024, 1024, 32),    # the same in two blocks of 32
    (2, 2, 2048, 2000, None),  # N = 4096 (64 x 64), blocks of 32
])
def test_f32_forward_matches_oracle(backend, B, H, L, Lk, kblock, f32_on, monkeypatch):
    """Forward (new kernel) and every gradient (cuFFT backward) vs float64, D and both gates."""
    kern, bwd = f32_on
    n = fft_m16.transform_size(L, Lk)
    if kblock is not None:
        monkeypatch.setattr(fft_m16, "KBLOCK_F32", {n: kblock})
    check(backend, B, H, L, Lk, torch.float32, oracle=fft_conv_direct)
    assert kern.launches == 1 and bwd == [(B, H, L)]
    n1 = fft_m16.split(n)[0]
    want = fft_m16.KBLOCK_F32.get(n, 0)
    assert kern.kw["BJ"] == (want if want < n1 else 0)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("D,pre,post", [(False, False, False), (True, False, True),
                                        (False, True, False), (True, True, True)])
def test_f32_features(backend, D, pre, post, f32_on):
    check(backend, 3, 2, 300, 250, torch.float32, D=D, pre=pre, post=post)
    assert f32_on[0].launches == 1


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("uscale,kscale", [(1e30, 1.0), (1e-30, 1.0), (1.0, 1e25), (1.0, 1e-25)])
def test_f32_scaling(backend, uscale, kscale, f32_on):
    """fp32 inputs far outside fp16's range: the per-row power-of-two scale and the max-normalised
    filter table keep every split operand in range; the rows of a pair differ by 1e4 and each
    meets the fp32 bound on its own; no worse than 3x the cuFFT path's error."""
    B, H, L, Lk = 2, 3, 200, 150
    u, k, D, pg, qg = make(B, H, L, Lk, torch.float32)
    u = u * uscale * torch.tensor([1.0, 1e-4], device=DEVICE)[:, None, None]
    k, D = k * kscale, D * kscale
    y = sk.fft_conv(u, k, D, pre_gate=pg, post_gate=qg, backend=backend)
    ref = fft_conv_direct(*(x.double().cpu() for x in (u, k, D)), pre_gate=pg.double().cpu(),
                          post_gate=qg.double().cpu())
    assert torch.isfinite(y).all() and f32_on[0].launches == 1
    fft_interface.MONARCH16_F32 = False
    try:
        y_cufft = sk.fft_conv(u, k, D, pre_gate=pg, post_gate=qg, backend=backend)
    finally:
        fft_interface.MONARCH16_F32 = True
    for b in range(B):
        assert_close(y[b], ref[b], dtype=torch.float32, name=f"row {b}")
        assert rel_err(y[b], ref[b]) <= 3 * rel_err(y_cufft[b], ref[b]) + 1e-7, b


def test_f32_path_choice(monkeypatch):
    """On by default up to N = 4096 (L = 2048; the GPU table: no gain at 8192); the forward only,
    the backward on the cuFFT path always (also when monarch16 is forced), 16-bit calls unchanged;
    off: fp32 never monarch16."""
    f32 = torch.empty(1, 1, 4096)
    b16 = torch.empty(1, 1, 4096, dtype=torch.bfloat16)
    assert fft_interface.MONARCH16_F32 is True and fft_interface.MONARCH16_F32_MAX_N == 4096
    assert fft_interface.triton_path("fwd", f32, 4096) == "cufft"                    # N = 8192
    assert fft_interface.triton_path("fwd", f32[..., :2048], 2048) == "monarch16"    # N = 4096
    assert fft_interface.triton_path("bwd", f32[..., :2048], 2048) == "cufft"
    monkeypatch.setattr(fft_interface, "MONARCH16_F32", False)
    assert fft_interface.triton_path("fwd", f32[..., :2048], 2048) == "cufft"
    monkeypatch.setattr(fft_interface, "MONARCH16_F32", True)
    monkeypatch.setattr(fft_interface, "MONARCH16_F32_MAX_N", 8192)
    assert fft_interface.triton_path("fwd", f32, 4096) == "monarch16"
    assert fft_interface.triton_path("fwd", f32[..., :1000], 1000) == "monarch16"
    assert fft_interface.triton_path("bwd", f32, 4096) == "cufft"
    assert fft_interface.triton_path("fwd", torch.empty(1, 1, 4097), 4097) == "cufft"   # N > 8192
    assert fft_interface.triton_path("fwd", b16, 4096) == "monarch16"
    assert fft_interface.triton_path("bwd", b16, 4096) == "monarch16"
    monkeypatch.setattr(fft_interface, "FORCE_PATH", "monarch16")
    assert fft_interface.triton_path("bwd", f32, 4096) == "cufft"
    assert fft_interface.triton_path("bwd", b16, 4096) == "monarch16"


def test_f32_tables():
    """The split DFT planes rebuild F1 / F2 to ~2^-22 (hi alone: ~2^-11); T is W^(k1 n2) in fp32;
    the fp32 filter table times max|K| N2 = kscale N is the spectrum in the (k1, k2) layout."""
    n1, n2 = 32, 16
    f1, f2, tw = fft_m16.dft_tables_f32(n1, n2, "cpu")
    assert f1.shape == (4, n1, n1) and f1.dtype == torch.float16
    assert f2.shape == (4, n2, n2) and tw.shape == (2, n1, n2) and tw.dtype == torch.float32
    a = torch.arange(n1, dtype=torch.float64)
    ang = torch.outer(a, a) * (-2 * torch.pi / n1)
    exact = torch.stack([torch.cos(ang), torch.sin(ang)])
    rebuilt = f1[:2].double() + f1[2:].double()
    assert (rebuilt - exact).abs().max() < 2 ** -21
    assert (f1[:2].double() - exact).abs().max() > 2 ** -14   # the lo planes matter
    b = torch.arange(n2, dtype=torch.float64)
    angt = torch.outer(a, b) * (-2 * torch.pi / (n1 * n2))
    assert (tw.double() - torch.stack([torch.cos(angt), torch.sin(angt)])).abs().max() < 1e-7
    k = torch.randn(3, 100)
    ks, kscale = fft_m16.filter_tables_f32(k, n1, n2)
    kf = torch.fft.fft(k.double(), n=n1 * n2).view(3, n2, n1).transpose(1, 2)
    got = torch.complex(ks[:, 0].double(), ks[:, 1].double()) * (kscale.double() * n1 * n2)[:, None, None]
    assert ks.dtype == torch.float32 and (got - kf).abs().max() / kf.abs().max() < 1e-6


@pytest.mark.parametrize("backend", kernel_backends())
def test_f32_opcheck(backend, f32_on):
    opcheck_fwd(backend, torch.float32)
    assert f32_on[0].launches > 0


@pytest.mark.gpu
@pytest.mark.parametrize("L,Lk", [(1, 1), (255, 255), (1024, 1024), (2048, 2048), (4096, 4096),
                                  (4095, 1000), (3000, 5)])
def test_gpu_f32_sizes(L, Lk, f32_on):
    """Real sizes on the GPU (wgmma, the launch table's blocks / warps): forward and every
    gradient vs float64, H not a multiple of 16."""
    check("triton", 2, 19, L, Lk, torch.float32, oracle=fft_conv_direct)
    assert f32_on[0].launches == 1
