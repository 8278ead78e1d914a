"""monarch16's split backward (SPLIT_BWD: a du kernel of the forward's shape + a dk kernel with the
dk spectrum accumulated in registers per row block; mode 2: the du kernel stores Q for the dk
kernel) against float64 and against the fused backward: every gradient (du, dk, dD, dpre, dpost),
odd lengths, odd B, H not a multiple of 16, gates / D, one and several dk row blocks, slices
(S > 1, FINAL = 0), extreme scales. Every backward is checked to take the split kernels."""
import pytest
import torch

from ssm_kernels.fft_conv import interface as fft_interface
from ssm_kernels.fft_conv import monarch16 as fft_m16
from ssm_kernels.fft_conv.interface import fft_conv_bwd_op
from ssm_kernels.fft_conv.reference import fft_conv_direct, fft_conv_ref
from ssm_kernels.testing import assert_close

from conftest import DEVICE, CountLaunches as _Count, kernel_backends
from test_fft_conv import NAMES, backward_scaling_check, check, check_gpu, make, run

SIZES = (256, 512, 1024, 2048, 4096, 8192)


@pytest.fixture(autouse=True)
def nan_outputs(monkeypatch):
    monkeypatch.setattr(fft_m16, "FILL_NAN", True)
    monkeypatch.setattr(fft_interface, "FORCE_PATH", "monarch16")
    monkeypatch.setattr(fft_interface, "MONARCH16_BWD_CUFFT_POST_N", 1 << 30)


def _split(monkeypatch, mode, frac=2):
    """SPLIT_BWD = mode at every N; DK_BLOCK = N1 / frac (>= 16); the kernels counted."""
    monkeypatch.setattr(fft_m16, "SPLIT_BWD", {n: mode for n in SIZES})
    monkeypatch.setattr(fft_m16, "DK_BLOCK", {n: max(16, fft_m16.split(n)[0] // frac) for n in SIZES})
    for name in ("_monarch16_du_kernel", "_monarch16_dk_kernel", "_monarch16_bwd_kernel"):
        monkeypatch.setattr(fft_m16, name, _Count(getattr(fft_m16, name)))


def _launched(mode):
    assert fft_m16._monarch16_bwd_kernel.launches == 0
    assert fft_m16._monarch16_du_kernel.launches == 1
    assert fft_m16._monarch16_dk_kernel.launches == 1
    assert fft_m16._monarch16_du_kernel.kw["SAVEQ"] == (mode == 2)
    assert fft_m16._monarch16_dk_kernel.kw["LOADQ"] == (mode == 2)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("mode", [1, 2])
@pytest.mark.parametrize("dtype,B,H,L,Lk,frac", [
    (torch.bfloat16, 3, 5, 255, 200, 2),     # N = 512 (32 x 16), R1 = 16, dk blocks of 16, odd B
    (torch.float16, 3, 5, 255, 200, 1),      # one dk block (BJ = N1)
    (torch.bfloat16, 4, 17, 300, 211, 2),    # L > N / 2: R1 = N1
    (torch.float16, 2, 3, 1024, 1024, 4),    # N = 2048 (64 x 32), four dk blocks
    (torch.bfloat16, 2, 3, 2048, 2048, 2),   # N = 4096: the du kernel row-blocked (KBLOCK 32)
    (torch.bfloat16, 3, 3, 4096, 4096, 2),   # N = 8192 (128 x 64), dk blocks of 64 (the GPU's)
])
def test_split_bwd_matches_oracle(backend, mode, dtype, B, H, L, Lk, frac, monkeypatch):
    _split(monkeypatch, mode, frac)
    check(backend, B, H, L, Lk, dtype, oracle=fft_conv_direct)
    _launched(mode)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("mode", [1, 2])
@pytest.mark.parametrize("D,pre,post", [(False, False, False), (True, False, True),
                                        (False, True, False), (True, True, True)])
def test_split_bwd_features(backend, mode, D, pre, post, monkeypatch):
    _split(monkeypatch, mode)
    check(backend, 3, 2, 300, 250, torch.bfloat16, D=D, pre=pre, post=post)
    _launched(mode)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("mode", [1, 2])
def test_split_bwd_vs_fused(backend, mode, monkeypatch):
    """Against the fused (default) backward, both unblocked (N = 512): du, dpre, dpost and dD are
    the same operations in the same order -> bitwise equal; dk (P kept in fp32, a pow2 scale per
    row block) within a few fp16 ulps of the fused one."""
    for B, H, L, Lk in ((3, 5, 255, 200), (4, 17, 300, 211)):
        u, k, D, pg, qg = make(B, H, L, Lk, torch.bfloat16)
        dy = torch.randn_like(u)
        fused = fft_conv_bwd_op(dy, u, k, D, pg, qg, backend)
        monkeypatch.setattr(fft_m16, "SPLIT_BWD", {512: mode})
        split = fft_conv_bwd_op(dy, u, k, D, pg, qg, backend)
        monkeypatch.setattr(fft_m16, "SPLIT_BWD", {})
        for name, a, b in zip(NAMES[1:], fused, split):
            if name == "dk":
                err = (a - b).abs().max() / a.abs().max()
                assert err < 3e-3, (name, err.item())
            else:
                assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("mode", [1, 2])
def test_split_bwd_slices(backend, mode, monkeypatch):
    """H = 1: the batch splits into slices (FINAL = 0: the programs' spectra summed on the host);
    bitwise repeatable; every gradient vs float64."""
    _split(monkeypatch, mode)
    u, k, D, pg, qg = make(5, 1, 255, 200, torch.float16)
    dy = torch.randn_like(u)
    assert fft_m16._plan(5, 1, 255, 200, torch.device(DEVICE), True)[4] > 1   # S > 1
    a = fft_conv_bwd_op(dy, u, k, D, pg, qg, backend)
    b = fft_conv_bwd_op(dy, u, k, D, pg, qg, backend)
    assert fft_m16._monarch16_dk_kernel.kw["FINAL"] is False
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    hi = run(fft_conv_direct, *(x.double() for x in (u, k, D, pg, qg)), dy.double())
    lowp = run(fft_conv_ref, u, k, D, pg, qg, dy)
    for j, name in enumerate(NAMES[1:]):
        assert_close(a[j], hi[j + 1], dtype=torch.float16, lowp_ref=lowp[j + 1], name=name)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("mode", [1, 2])
@pytest.mark.parametrize("uscale,kscale,gscale", [(3e4, 1.0, 1.0), (1e-5, 1.0, 1.0),
                                                  (1.0, 1e-6, 1.0), (1.0, 1.0, 3e3)])
def test_split_bwd_scaling(backend, mode, uscale, kscale, gscale, monkeypatch):
    """Rows of a pair 100x apart in u and 1e3x apart (opposite direction) in dy (the shared product
    scale of P against the stored Q's own scales), row by row."""
    _split(monkeypatch, mode)
    backward_scaling_check(backend, uscale, kscale, gscale)


def test_split_bwd_knobs(monkeypatch):
    monkeypatch.setattr(fft_m16, "DK_BLOCK", {512: 24})
    with pytest.raises(ValueError, match="DK_BLOCK"):
        fft_m16._dk_block(512, 32)
    monkeypatch.setattr(fft_m16, "DK_BLOCK", {512: 64})
    assert fft_m16._dk_block(512, 32) == 32           # >= N1: one block
    monkeypatch.setattr(fft_m16, "DK_BLOCK", {})
    assert fft_m16._dk_block(8192, 128) == 128
    assert fft_m16.SPLIT_BWD == {}                    # default: the fused backward


@pytest.mark.gpu
@pytest.mark.parametrize("L,Lk", [(4096, 4096), (4096, 1000), (2048, 2048)])
@pytest.mark.parametrize("mode", [1, 2])
@pytest.mark.parametrize("gates", [False, True])
def test_gpu_split_bwd(L, Lk, mode, gates, monkeypatch):
    """Real sizes on the GPU (H = 300: FINAL), every gradient vs float64."""
    monkeypatch.setattr(fft_m16, "SPLIT_BWD", {fft_m16.transform_size(L, Lk): mode})
    check_gpu("triton", 3, 300, L, Lk, torch.bfloat16, D=True, pre=gates, post=gates)
