"""fft_conv and s4d_kernel against float64 oracles: outputs and every gradient, odd lengths,
both Triton paths (on-chip and the multi-pass long path), low precision, errors, opcheck, compile."""
import pytest
import torch

import ssm_kernels as sk
from ssm_kernels.fft_conv import cufft as fft_cufft
from ssm_kernels.fft_conv import interface as fft_interface
from ssm_kernels.fft_conv import monarch16 as fft_m16
from ssm_kernels.fft_conv import triton as fft_triton
from ssm_kernels.fft_conv.interface import (fft_conv_bwd_op, fft_conv_fwd_op, s4d_vandermonde_bwd_op,
                                            s4d_vandermonde_op)
from ssm_kernels.fft_conv.reference import fft_conv_direct, fft_conv_ref, s4d_kernel_ref
from ssm_kernels.testing import assert_close

from conftest import DEVICE, compile_for_sm90, kernel_backends

BACKENDS = ["reference"] + kernel_backends()
NAMES = ["y", "du", "dk", "dD", "dpre_gate", "dpost_gate"]


def make(B, H, L, Lk, dtype=torch.float32, device=DEVICE, D=True, pre=True, post=True):
    u = torch.randn(B, H, L, device=device).to(dtype)
    kd = torch.float64 if dtype == torch.float64 else torch.float32
    k = (torch.randn(H, Lk, device=device) / Lk ** 0.5).to(kd)
    d = torch.randn(H, device=device).to(kd) if D else None
    pg = torch.randn(B, H, L, device=device).to(dtype) if pre else None
    qg = torch.randn(B, H, L, device=device).to(dtype) if post else None
    return u, k, d, pg, qg


def run(fn, u, k, D, pg, qg, cot, **kw):
    """Forward + backward with cotangent `cot`: (y, du, dk, dD, dpre, dpost) (None when absent)."""
    ins = [None if x is None else x.detach().requires_grad_() for x in (u, k, D, pg, qg)]
    y = fn(ins[0], ins[1], ins[2], pre_gate=ins[3], post_gate=ins[4], **kw)
    live = [x for x in ins if x is not None]
    grads = iter(torch.autograd.grad((y * cot.to(y.dtype)).sum(), live))
    return [y] + [None if x is None else next(grads) for x in ins]


def check(backend, B, H, L, Lk, dtype=torch.float32, oracle=fft_conv_direct, **flags):
    u, k, D, pg, qg = make(B, H, L, Lk, dtype, **flags)
    cot = torch.randn(B, H, L, dtype=torch.float64)
    out = run(sk.fft_conv, u, k, D, pg, qg, cot.to(DEVICE), backend=backend)
    hi = [None if x is None else x.detach().cpu().double() for x in (u, k, D, pg, qg)]
    ref = run(oracle, *hi, cot)
    lowp = None
    if dtype in (torch.float16, torch.bfloat16):
        lowp = run(fft_conv_ref, *(None if x is None else x.cpu() for x in (u, k, D, pg, qg)), cot.to(dtype))
    for i, name in enumerate(NAMES):
        if ref[i] is None:
            assert out[i] is None
            continue
        assert out[i].dtype == (u, u, k, D, pg, qg)[i].dtype, name
        # low precision: every output (dk, dD too) sees the rounded cotangent -> the 2x rule
        assert_close(out[i], ref[i], dtype=dtype, lowp_ref=None if lowp is None else lowp[i],
                     name=f"{backend} L={L} Lk={Lk} {name}")


@pytest.fixture(autouse=True)
def nan_filled_outputs(monkeypatch):
    """Every kernel output and intermediate starts as NaN: an unwritten element fails the check."""
    monkeypatch.setattr(fft_triton, "FILL_NAN", True)
    monkeypatch.setattr(fft_cufft, "FILL_NAN", True)
    monkeypatch.setattr(fft_m16, "FILL_NAN", True)


@pytest.fixture
def monarch(monkeypatch):
    """Force the Triton backend onto the Monarch (DFT-as-matmul) kernels."""
    monkeypatch.setattr(fft_interface, "FORCE_PATH", "monarch")


@pytest.fixture
def cufft_path(monkeypatch):
    """Force the Triton backend onto the path fused around torch.fft."""
    monkeypatch.setattr(fft_interface, "FORCE_PATH", "cufft")


@pytest.fixture
def long_path(monkeypatch, monarch):
    """Route every Monarch transform past 256 points through the multi-pass path (small shapes)."""
    monkeypatch.setattr(fft_triton, "MAX_ONCHIP_N", 256)


# ---- the reference is the spec: rfft version == direct convolution ----------------------------

@pytest.mark.parametrize("L,Lk", [(1, 1), (17, 5), (64, 64), (257, 100)])
def test_reference_matches_direct(L, Lk):
    check("reference", 2, 3, L, Lk, torch.float64)


def test_reference_against_explicit_loop():
    u, k, D, _, _ = make(1, 2, 9, 4, torch.float64, device="cpu")
    y = fft_conv_direct(u, k, D)
    for t in range(9):
        want = sum(k[:, s] * u[0, :, t - s] for s in range(min(t + 1, 4))) + D * u[0, :, t]
        assert torch.allclose(y[0, :, t], want, atol=1e-12)


# ---- kernels -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L", [1, 2, 3, 17, 255, 256, 257])
@pytest.mark.parametrize("full", [True, False])
def test_matches_oracle(backend, L, full):
    Lk = L if full else max(1, L // 3)
    check(backend, 2, 3, L, Lk)  # float32: the cuFFT path on the Triton backend


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("L", [1, 17, 257])
def test_monarch_matches_oracle(backend, L, monarch):
    check(backend, 2, 3, L, L)
    check(backend, 2, 3, L, max(1, L // 3))


# ---- the path fused around torch.fft (cufft.py) ----------------------------------------------------

@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("B,H,L,Lk", [(2, 3, 1, 1), (1, 5, 7, 7), (2, 3, 7, 2), (2, 17, 1000, 1000),
                                      (1, 3, 1000, 129), (1, 2, 8191, 8191)])
def test_cufft_path(backend, B, H, L, Lk, cufft_path):
    """Odd lengths, H not a multiple of 16, every feature, every gradient, vs float64."""
    check(backend, B, H, L, Lk, oracle=fft_conv_direct if L * Lk < 1 << 16 else fft_conv_ref)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("D,pre,post", [(False, False, False), (True, False, False),
                                        (False, True, False), (False, False, True),
                                        (True, True, False), (False, True, True)])
def test_cufft_features(backend, D, pre, post, cufft_path):
    check(backend, 3, 2, 45, 31, D=D, pre=pre, post=post)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cufft_low_precision(backend, dtype, cufft_path):
    check(backend, 2, 3, 300, 300, dtype)


def _is_smooth(m):
    for p in (2, 3, 5, 7):
        while m % p == 0:
            m //= p
    return m == 1


def test_fft_size():
    """n = 2m, m the smallest 7-smooth number with 2m >= L + Lk - 1."""
    for L, Lk in [(1, 1), (2, 1), (7, 7), (1000, 1000), (1000, 129), (4096, 4096), (8191, 8191),
                  (5000, 17), (12345, 678)]:
        n = fft_cufft.fft_size(L, Lk)
        m, need = n // 2, -(-(L + Lk - 1) // 2)
        assert n % 2 == 0 and n >= L + Lk - 1 and _is_smooth(m), (L, Lk, n)
        assert not any(_is_smooth(c) for c in range(need, m)), (L, Lk, n)
    assert fft_cufft.fft_size(4096, 4096) == 8192
    assert fft_cufft.fft_size(1000, 1000) == 2000
    assert fft_cufft.fft_size(8191, 8191) == 16384


def test_path_table(monkeypatch):
    f32 = torch.empty(2, 3, 1024)
    b16 = f32.bfloat16()
    assert fft_interface.triton_path("fwd", f32, 1024) == "monarch16"   # fp32 split products, N 2048
    assert fft_interface.triton_path("bwd", f32, 1024) == "cufft"
    assert fft_interface.triton_path("fwd", torch.empty(1, 1, 4096), 4096) == "cufft"   # N 8192
    # with monarch16 off: the old Monarch forward up to n = 2048, cuFFT otherwise
    monkeypatch.setattr(fft_interface, "MONARCH16", False)
    assert fft_interface.triton_path("fwd", b16, 1024) == "monarch"  # n = 2048 on-chip
    assert fft_interface.triton_path("bwd", b16, 1024) == "cufft"
    assert fft_interface.triton_path("fwd", torch.empty(1, 1, 4096).bfloat16(), 4096) == "cufft"


# ---- the filter-spectrum cache -----------------------------------------------------------------------

@pytest.fixture
def fresh_cache():
    fft_cufft.clear_filter_cache()
    yield
    fft_cufft.clear_filter_cache()


def test_filter_cache_hits_and_invalidates(fresh_cache):
    k = torch.randn(3, 50)
    s1 = fft_cufft.filter_spectrum(k, 128)
    assert fft_cufft.filter_spectrum(k, 128) is s1          # same tensor, unchanged: reused
    assert fft_cufft.filter_spectrum(k, 256) is not s1      # another n
    with torch.no_grad():
        k.mul_(2.0)                                         # in place: version bump
    s2 = fft_cufft.filter_spectrum(k, 128)
    assert s2 is not s1 and torch.allclose(s2, 2 * s1, rtol=1e-5, atol=1e-5)
    k2 = k.clone()                                          # same values, another tensor: miss
    assert fft_cufft.filter_spectrum(k2, 128) is not s2
    kv = k[:, :49]                                          # a view (other shape): miss
    assert fft_cufft.filter_spectrum(kv, 128) is not s2
    fft_cufft.set_filter_cache(False)
    try:
        assert fft_cufft.filter_spectrum(k, 128) is not fft_cufft.filter_spectrum(k, 128)
    finally:
        fft_cufft.set_filter_cache(True)


def test_filter_cache_real_view_entry(fresh_cache):
    """The cuFFT path's kernels take the spectrum as its fp32 (re, im) view, cached as that view
    (no view_as_real per call): same values as filter_spectrum, reused while k is unchanged,
    recomputed after an in-place update."""
    k = torch.randn(3, 50)
    r1 = fft_cufft._spectrum_real(k, 128)
    assert r1.dtype == torch.float32 and r1.shape == (3, 65, 2) and r1.is_contiguous()
    assert torch.equal(r1, torch.view_as_real(fft_cufft.filter_spectrum(k, 128)))
    assert fft_cufft._spectrum_real(k, 128) is r1
    with torch.no_grad():
        k.mul_(2.0)
    r2 = fft_cufft._spectrum_real(k, 128)
    assert r2 is not r1 and torch.equal(r2, torch.view_as_real(torch.fft.rfft(k, n=128)))


def test_filter_cache_drops_dead_filters(fresh_cache):
    k = torch.randn(2, 30)
    fft_cufft.filter_spectrum(k, 64)
    assert len(fft_cufft._CACHE) == 1
    del k
    assert len(fft_cufft._CACHE) == 0  # the weak reference's callback removed it
    # a new tensor on the freed address (same shape, version 0) must not see the old spectrum
    a = torch.randn(2, 30)
    sa = fft_cufft.filter_spectrum(a, 64).clone()
    ptr = a.data_ptr()
    del a
    b = torch.randn(2, 30)
    if b.data_ptr() == ptr:
        assert not torch.equal(fft_cufft.filter_spectrum(b, 64), sa)
    assert torch.allclose(fft_cufft.filter_spectrum(b, 64), torch.fft.rfft(b, n=64))


def _assert_knob_bitwise(monkeypatch, knob, u, k, D, pre, post, cot, backend):
    """fft_conv's outputs and gradients with the cuFFT-path knob `knob` off and on: bitwise equal,
    and finite with it on (NaN-filled buffers: an element left unwritten shows)."""
    got = {}
    for on in (False, True):
        monkeypatch.setattr(fft_cufft, knob, on)
        got[on] = run(sk.fft_conv, u, k, D, pre, post, cot, backend=backend)
    for a, b in zip(got[False], got[True]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert all(x is None or torch.isfinite(x).all() for x in got[True])


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("D,pre,post", [(True, False, False), (False, True, True), (True, False, True)])
def test_cufft_merged_inverse_is_bitwise_the_same(backend, D, pre, post, cufft_path, monkeypatch):
    """cufft.MERGED_INVERSE (the backward's two inverse transforms as one call over 2R + H rows):
    every output bitwise equal to the two-call backward (NaN-filled buffers: the extra rows'
    unwritten input must not leak). On the GPU this also checks cuFFT's batch independence."""
    u, k, Dv, pg, qg = make(2, 3, 50, 21, D=D, pre=pre, post=post)
    cot = torch.randn_like(u)
    _assert_knob_bitwise(monkeypatch, "MERGED_INVERSE", u, k, Dv, pg, qg, cot, backend)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("merged", [True, False])
@pytest.mark.parametrize("shape,D,pre,post", [((2, 3, 50, 21), True, False, False),
                                              ((2, 3, 50, 21), False, True, True),
                                              ((1, 2, 300, 300), True, True, False),
                                              ((3, 2, 40, 7), True, False, True)])
def test_cufft_fused_dk_epilogue_is_bitwise_the_same(backend, shape, D, pre, post, merged,
                                                     cufft_path, monkeypatch):
    """cufft.FUSED_DK_EPILOGUE (the backward's du / dpre / dpost and dk / dD epilogues in one
    launch): every output bitwise equal to the two-launch backward, NaN-filled buffers (a dk or
    du element left unwritten shows), with the inverse transforms merged or not, Lk < L and
    Lk = L (several dk tiles: L = 300 > the interpreter's 256-wide tile)."""
    u, k, Dv, pg, qg = make(*shape, D=D, pre=pre, post=post)
    cot = torch.randn_like(u)
    monkeypatch.setattr(fft_cufft, "MERGED_INVERSE", merged)
    _assert_knob_bitwise(monkeypatch, "FUSED_DK_EPILOGUE", u, k, Dv, pg, qg, cot, backend)


@pytest.mark.parametrize("backend", kernel_backends())
def test_filter_cache_in_place_update_changes_result(backend, fresh_cache, cufft_path):
    """The public op after an in-place filter update (an optimizer step) and in gradient
    accumulation (same filter, two backward passes) agrees with float64."""
    u, k, D, _, _ = make(2, 3, 40, 40, pre=False, post=False)
    k.requires_grad_()  # (an nn.Parameter as the only input needing grad: see the report, _ops.py)
    y1 = sk.fft_conv(u, k, D, backend=backend)
    with torch.no_grad():
        k.add_(torch.randn_like(k))
    y2 = sk.fft_conv(u, k, D, backend=backend)
    ref = fft_conv_direct(u.double(), k.detach().double(), D.double())
    assert_close(y2, ref, dtype=torch.float32)
    assert not torch.allclose(y1.detach(), y2.detach())
    # gradient accumulation: the cached spectrum serves forward and backward of both micro-steps
    for _ in range(2):
        sk.fft_conv(u, k, D, backend=backend).square().sum().backward()
    kd = k.detach().double().requires_grad_()
    fft_conv_direct(u.double(), kd, D.double()).square().sum().backward()
    assert_close(k.grad, 2 * kd.grad, dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D,pre,post", [(False, False, False), (True, False, False),
                                        (False, True, False), (False, False, True),
                                        (True, True, True)])
def test_features(backend, D, pre, post):
    check(backend, 3, 2, 45, 31, D=D, pre=pre, post=post)


@pytest.mark.parametrize("backend", kernel_backends())
def test_onchip_1000(backend, monarch):
    check(backend, 2, 2, 1000, 1000)  # N = 2048 in one program (64 x 32 tiles, zero half skipped)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("L", [4096, 5000])
def test_default_plans_at_issue_sizes(backend, L, monarch):
    """The GPU's bfloat16 plans: L = 4096 on-chip (N = 8192 = 128 x 64), L = 5000 multi-pass
    (N = 16384 = 16 x 1024), against the float64 rfft reference (direct is O(L^2))."""
    check(backend, 2, 1, L, L, oracle=fft_conv_ref, pre=False)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("L,Lk,flags", [(600, 600, {}),                  # N = 2048 = 8 x 256
                                        (1000, 333, {"pre": False}),     # outer factor < tile
                                        (1100, 1000, {"D": False, "post": False})])  # 16 x 256
def test_long_path(backend, L, Lk, flags, long_path):
    assert fft_triton.plan(L, Lk)[0] == "long"
    check(backend, 2, 2, L, Lk, **flags)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(backend, dtype):
    check(backend, 2, 3, 100, 77, dtype)


@pytest.mark.parametrize("backend", kernel_backends())
def test_low_precision_long_path(backend, long_path):
    check(backend, 1, 2, 600, 400, torch.bfloat16)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("B,H,L,Lk", [(1, 1, 1, 1), (3, 1, 5, 1), (1, 1, 600, 600)])
def test_single_row_sizes(backend, B, H, L, Lk, monkeypatch, monarch):
    """B, H, L or Lk == 1 (Triton specialises integer arguments equal to 1); the last case runs
    the multi-pass path."""
    monkeypatch.setattr(fft_triton, "MAX_ONCHIP_N", 256)
    check(backend, B, H, L, Lk)


@pytest.mark.parametrize("backend", kernel_backends())
def test_batch_split_partials(backend, monkeypatch, monarch):
    """More rows than programs per head: dk / dD partials over batch slices are summed."""
    monkeypatch.setattr(fft_triton, "_batch_split", lambda B, H, device: (3, -(-B // 3)))
    check(backend, 7, 2, 40, 40)


@pytest.mark.parametrize("backend", kernel_backends())
def test_backward_is_deterministic(backend):
    u, k, D, pg, qg = make(4, 2, 70, 70)
    cot = torch.randn(4, 2, 70, device=DEVICE)
    a = run(sk.fft_conv, u, k, D, pg, qg, cot, backend=backend)
    b = run(sk.fft_conv, u, k, D, pg, qg, cot, backend=backend)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_eval_mode(backend):
    u, k, D, _, qg = make(3, 4, 30, 30, pre=False)
    u_nc = u.transpose(0, 1).contiguous().transpose(0, 1)  # same values, permuted strides
    assert not u_nc.is_contiguous()
    with torch.no_grad():
        y = sk.fft_conv(u_nc, k[:, ::2], D, post_gate=qg, backend=backend)
    assert_close(y, fft_conv_direct(u.double().cpu(), k[:, ::2].double().cpu(), D.double().cpu(),
                                    post_gate=qg.double().cpu()), dtype=torch.float32)


def test_auto_picks_reference_for_float64():
    u, k, D, pg, qg = make(2, 2, 20, 7, torch.float64)
    y = sk.fft_conv(u, k.double(), D.double(), pre_gate=pg, post_gate=qg)
    assert y.dtype == torch.float64
    assert_close(y, fft_conv_direct(u, k.double(), D.double(), pre_gate=pg, post_gate=qg),
                 dtype=torch.float64)


def test_plan():  # the Monarch plans
    assert fft_triton.plan(1, 1)[:2] == ("onchip", 256)
    assert fft_triton.plan(4096, 4096, "tf32", "fwd") == ("onchip", 8192, 128, 64)  # bfloat16
    assert fft_triton.plan(4096, 4096, "tf32", "bwd")[0] == "long"  # 288 KB on-chip on Triton 3.6
    assert fft_triton.plan(1024, 1024, "tf32x3") == ("onchip", 2048, 64, 32)      # float32
    assert fft_triton.plan(4096, 4096, "tf32x3") == ("long", 8192, 16, 512)
    assert fft_triton._rows(8192, 128, 4096) == 64   # causal zero half skipped
    assert fft_triton._rows(512, 32, 257) == 32      # data reaches past the half: full tile
    kind, n, P, Q = fft_triton.plan(1 << 20, 1 << 20)
    assert kind == "long" and n == P * Q == 1 << 21 and Q == fft_triton.LONG_INNER_N["bwd"]
    assert fft_triton.plan(1 << 20, 1 << 20, "tf32", "fwd")[3] == fft_triton.LONG_INNER_N["fwd"]


# ---- bad input ----------------------------------------------------------------------------------

def test_errors_name_the_argument():
    u, k, D, pg, qg = make(2, 3, 10, 4, device="cpu")
    cases = [
        (ValueError, "Lk <= L", dict(k=torch.randn(3, 11))),
        (ValueError, "H = 3", dict(k=torch.randn(2, 4))),
        (ValueError, "post_gate must have shape", dict(post_gate=qg[:, :, :5])),
        (ValueError, "pre_gate must have shape", dict(pre_gate=pg[0])),
        (TypeError, "pre_gate must have u's dtype", dict(pre_gate=pg.double())),
        (TypeError, "u must have dtype", dict(u=torch.randn(2, 3, 10, dtype=torch.complex64))),
        (TypeError, "u must have dtype", dict(u=torch.ones(2, 3, 10, dtype=torch.int32))),
        (ValueError, "D must have shape", dict(D=torch.randn(4))),
        (TypeError, "D must have a real floating", dict(D=torch.ones(3, dtype=torch.int64))),
        (ValueError, "u must have rank 3", dict(u=u[0])),
        (ValueError, "k must have rank 2", dict(k=k[0])),
        (TypeError, "k must have a real floating", dict(k=torch.ones(3, 4, dtype=torch.int64))),
        (TypeError, "must be a torch.Tensor", dict(k=[1.0])),
        (ValueError, "L >= 1", dict(u=u[:, :, :0], k=k[:, :0])),
    ]
    for err, msg, over in cases:
        args = dict(u=u, k=k, D=D, pre_gate=None, post_gate=None)
        args.update(over)
        with pytest.raises(err, match=msg):
            sk.fft_conv(args.pop("u"), args.pop("k"), args.pop("D"), **args)
    with pytest.raises(ValueError, match="backend must be one of"):
        sk.fft_conv(u, k, backend="cufft")
    with pytest.raises(sk.BackendUnavailableError, match="cuda"):
        sk.fft_conv(u, k, backend="cuda")


@pytest.mark.skipif(DEVICE == "cpu", reason="needs two devices")
def test_device_mismatch():
    u, k, D, _, _ = make(2, 3, 10, 4)
    with pytest.raises(ValueError, match="one device"):
        sk.fft_conv(u, k.cpu())


# ---- S4D ------------------------------------------------------------------------------------------

def s4d_params(H, N, device=DEVICE, im_scale=3.14159):
    log_dt = torch.rand(H, device=device) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3))) \
        + torch.log(torch.tensor(1e-3))
    A = torch.complex(-0.5 - torch.rand(H, N, device=device) * 0.1,
                      im_scale * torch.arange(N, device=device).float().expand(H, N))
    C = torch.randn(H, N, device=device, dtype=torch.complex64)
    return log_dt, A, C


def check_s4d(backend, H, N, L, **kw):
    log_dt, A, C = s4d_params(H, N, **kw)
    cot = torch.randn(H, L, dtype=torch.float64)
    ins = [x.detach().requires_grad_() for x in (log_dt, A, C)]
    K = sk.s4d_kernel(*ins, L, backend=backend)
    assert K.shape == (H, L) and K.dtype == torch.float32
    grads = torch.autograd.grad((K * cot.to(K)).sum(), ins)
    hi = [x.detach().cpu().to(torch.float64 if not x.is_complex() else torch.complex128).requires_grad_()
          for x in (log_dt, A, C)]
    Kr = s4d_kernel_ref(*hi, L)
    ref = torch.autograd.grad((Kr * cot).sum(), hi)
    assert_close(K, Kr, dtype=torch.float32, name=f"{backend} K")
    for g, r, name in zip(grads, ref, ["log_dt", "A", "C"]):
        assert g.dtype == (log_dt, A, C)[["log_dt", "A", "C"].index(name)].dtype
        assert_close(g, r, dtype=torch.float32, name=f"{backend} grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H,N,L", [(3, 8, 1), (2, 17, 100), (3, 33, 257)])
def test_s4d_matches_reference(backend, H, N, L):
    check_s4d(backend, H, N, L)


@pytest.mark.parametrize("backend", kernel_backends())
def test_s4d_long_filter_phase(backend):
    """Large Im(dtA) * l: the phase is reduced exactly, so fp32 holds at long L."""
    check_s4d(backend, 2, 16, 3000, im_scale=50.0)


def test_s4d_reference_is_the_formula():
    H, N, L = 2, 3, 7
    log_dt, A, C = [x.to(torch.float64 if not x.is_complex() else torch.complex128)
                    for x in s4d_params(H, N, device="cpu")]
    K = s4d_kernel_ref(log_dt, A, C, L)
    dt = log_dt.exp()
    for h in range(H):
        for l in range(L):
            want = 2 * sum((C[h, n] * (torch.exp(dt[h] * A[h, n]) - 1) / A[h, n]
                            * torch.exp(dt[h] * A[h, n] * l)).real for n in range(N))
            assert abs(K[h, l] - want) < 1e-10


def test_s4d_errors():
    log_dt, A, C = s4d_params(3, 4, device="cpu")
    with pytest.raises(TypeError, match="A must be complex64"):
        sk.s4d_kernel(log_dt, A.real, C, 10)
    with pytest.raises(ValueError, match="C must have shape"):
        sk.s4d_kernel(log_dt, A, C[:, :2], 10)
    with pytest.raises(ValueError, match="A must have shape"):
        sk.s4d_kernel(log_dt[:2], A, C, 10)
    with pytest.raises(ValueError, match="L must be an int >= 1"):
        sk.s4d_kernel(log_dt, A, C, 0)
    with pytest.raises(TypeError, match="log_dt must be float32"):
        sk.s4d_kernel(log_dt.half(), A, C, 10)


# ---- opcheck and compile ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    u, k, D, pg, qg = make(2, 2, 20, 9)
    dy = torch.randn_like(u)
    torch.library.opcheck(fft_conv_fwd_op.op, (u, k, D, pg, qg, backend))
    torch.library.opcheck(fft_conv_fwd_op.op, (u.requires_grad_(), k.requires_grad_(), None, None, None, backend))
    torch.library.opcheck(fft_conv_bwd_op.op, (dy, u.detach(), k.detach(), D, pg, qg, backend))
    torch.library.opcheck(fft_conv_bwd_op.op, (dy, u.detach(), k.detach(), None, None, None, backend))
    log_dt, A, C = s4d_params(2, 5)
    dt2 = torch.stack([log_dt.exp(), torch.zeros_like(log_dt)], 1)
    parts = [x.contiguous() for x in (C.real, C.imag, A.real, A.imag, dt2)]
    torch.library.opcheck(s4d_vandermonde_op.op, (*parts, 11, backend))
    torch.library.opcheck(s4d_vandermonde_op.op, (*(p.clone().requires_grad_() for p in parts), 11, backend))
    torch.library.opcheck(s4d_vandermonde_bwd_op.op, (*parts, torch.randn(2, 11, device=DEVICE), backend))


def _compile_roundtrip(backend):
    torch._dynamo.reset()

    def f(u, k, D, qg, log_dt, A, C):
        kk = k + sk.s4d_kernel(log_dt, A, C, k.shape[1], backend=backend)
        return sk.fft_conv(u, kk, D, post_gate=qg, backend=backend)

    u, k, D, _, qg = make(2, 3, 24, 24, pre=False)
    log_dt, A, C = s4d_params(3, 4)
    ins = [x.requires_grad_() for x in (u, k, D, qg, log_dt, A, C)]
    y = torch.compile(f, fullgraph=True)(*ins)
    g = torch.autograd.grad(y.square().sum(), ins)
    y_e = f(*ins)
    g_e = torch.autograd.grad(y_e.square().sum(), ins)
    assert_close(y, y_e.double(), dtype=torch.float32)
    for a, b in zip(g, g_e):
        assert_close(a, b.to(torch.complex128 if b.is_complex() else torch.float64), dtype=torch.float32)


def test_compile_fullgraph_reference():
    _compile_roundtrip("reference")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", kernel_backends())
def test_compile_fullgraph_gpu(backend):
    _compile_roundtrip(backend)


# ---- real sizes on the GPU ----------------------------------------------------------------------------

def check_gpu(backend, B, H, L, Lk, dtype, **flags):
    """Like check(), with the float64 rfft reference on the GPU as oracle (verified against the
    direct convolution above); the direct one is O(L^2)."""
    u, k, D, pg, qg = make(B, H, L, Lk, dtype, **flags)
    cot = torch.randn(B, H, L, dtype=torch.float64, device=DEVICE)
    out = run(sk.fft_conv, u, k, D, pg, qg, cot, backend=backend)
    ref = run(fft_conv_ref, *(None if x is None else x.double() for x in (u, k, D, pg, qg)), cot)
    lowp = run(fft_conv_ref, u, k, D, pg, qg, cot.to(dtype)) if dtype != torch.float32 else None
    for i, name in enumerate(NAMES):
        if ref[i] is not None:
            assert_close(out[i], ref[i], dtype=dtype, lowp_ref=None if lowp is None else lowp[i],
                         name=f"L={L} Lk={Lk} {name}")


# (L, Lk): each distinct transform plan compiles its own kernels, so the list is kept lean
GPU_SIZES = [(1, 1), (17, 5), (255, 255), (257, 257), (1000, 1000), (1000, 251), (4096, 4096),
             (4096, 1025), (5000, 5000), (65536, 65536), (65536, 16385)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("L,Lk", GPU_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_real_sizes(backend, L, Lk, dtype):
    check_gpu(backend, 2, 64, L, Lk, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("L", [1000, 5000])
def test_gpu_float16(backend, L):
    check_gpu(backend, 2, 64, L, L, torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("B,H,L,Lk", [(1, 1, 1, 1), (1, 1, 4096, 4096), (1, 1, 5000, 5000),
                                      (3, 1, 65536, 1)])
def test_gpu_single_rows(backend, B, H, L, Lk):
    check_gpu(backend, B, H, L, Lk, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_one_million(backend, dtype):
    check_gpu(backend, 1, 4, 1 << 20, 1 << 20, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", kernel_backends())
def test_gpu_features_at_4096(backend):
    for D, pre, post in [(False, False, False), (True, False, True), (False, True, False)]:
        check_gpu(backend, 8, 96, 4096, 4096, torch.float32, D=D, pre=pre, post=post)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", kernel_backends())
def test_gpu_s4d(backend):
    check_s4d(backend, 64, 64, 8192)  # the float64 reference materialises (H, N, L) on the CPU


@pytest.mark.gpu
@pytest.mark.parametrize("L", [1024, 4096, 8191, 16384, 65536, 1 << 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_cufft_sizes(L, dtype, cufft_path):
    B, H = (2, 48) if L <= 65536 else (1, 3)
    check_gpu("triton", B, H, L, L, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["cufft", "monarch"])
def test_gpu_backward_deterministic(path, monkeypatch):
    monkeypatch.setattr(fft_interface, "FORCE_PATH", path)
    u, k, D, pg, qg = make(8, 96, 4096, 4096, torch.bfloat16)
    cot = torch.randn(8, 96, 4096, device=DEVICE)
    a = run(sk.fft_conv, u, k, D, pg, qg, cot, backend="triton")
    b = run(sk.fft_conv, u, k, D, pg, qg, cot, backend="triton")
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.gpu
@pytest.mark.parametrize("path,dtype", [("cufft", torch.float32), ("monarch16", torch.bfloat16)])
def test_gpu_filter_cache_in_graph(path, dtype, fresh_cache, monkeypatch):
    """Captured with a cached spectrum present, replayed after an in-place filter update: the
    capture recomputed the spectrum inside the graph, so the replay sees the new filter."""
    monkeypatch.setattr(fft_interface, "FORCE_PATH", path)
    u, k, D, _, _ = make(2, 16, 1000, 1000, dtype, pre=False, post=False)
    sk.fft_conv(u, k, D)  # populates the cache (and monarch16's tables)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = sk.fft_conv(u, k, D)
    with torch.no_grad():
        k.mul_(-3.0)
    g.replay()
    torch.cuda.synchronize()
    assert_close(y, fft_conv_ref(u.double(), k.double(), D.double()), dtype=dtype,
                 lowp_ref=None if dtype == torch.float32 else fft_conv_ref(u, k, D))


@pytest.mark.gpu
def test_gpu_past_int32_offsets():
    """B * H * L > 2^31: int64 offsets must reach the last heads (forward, multi-pass path)."""
    if torch.cuda.get_device_properties(0).total_memory < 70 * 2**30:
        pytest.skip("needs 70 GiB")
    B, H, L, Lk = 1, 2050, 1 << 20, 64  # 2^31 + 2^21 elements
    u = torch.randn(B, H, L, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(H, Lk, device=DEVICE) / 8
    for backend in kernel_backends():
        y = sk.fft_conv(u, k, backend=backend)
        sel = [0, H // 2, H - 1]
        ref = fft_conv_ref(u[:, sel].double(), k[sel].double())
        lowp = fft_conv_ref(u[:, sel], k[sel])
        assert_close(y[:, sel], ref, dtype=torch.bfloat16, lowp_ref=lowp)
        del y


# ---- monarch16: the on-chip fp16-tensor-core forward for 16-bit storage (monarch16.py) -------------

@pytest.fixture
def monarch16(monkeypatch):
    """Force forward and backward onto monarch16."""
    monkeypatch.setattr(fft_interface, "FORCE_PATH", "monarch16")


@pytest.fixture
def monarch16_cufft_bwd(monkeypatch, monarch16):
    """monarch16 forward, cuFFT backward (the MONARCH16_BWD_CUFFT fallback)."""
    monkeypatch.setattr(fft_interface, "MONARCH16_BWD_CUFFT", True)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,L,Lk", [
    (3, 5, 201, 57),    # N = 256 = 16 x 16 (R1 = N1: full first / last product), odd B: a lone row
    (2, 3, 255, 255),   # N = 512 = 32 x 16, R1 = 16: the zero half skipped
    (1, 2, 130, 3),     # N = 256 with L > N / 2: every row of the time tile holds data
    (4, 17, 300, 211),  # N = 512, H odd
    (5, 1, 33, 33),     # H = 1: the batch splits into 3 slices (2, 2, 1 rows)
])
def test_monarch16_matches_oracle(backend, dtype, B, H, L, Lk, monarch16):
    """Every feature (D, both gates), every gradient (monarch16 backward), vs float64.
    The interpreter's fp32 -> bf16 cast does not round to nearest (~2x the rounding error), so
    bf16 is tighter on the GPU than here; the 2x + floor rule holds either way."""
    check(backend, B, H, L, Lk, dtype, oracle=fft_conv_direct)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("D,pre,post", [(False, False, False), (True, False, True),
                                        (False, True, False), (False, False, True),
                                        (True, True, False)])
def test_monarch16_features(backend, D, pre, post, monarch16):
    check(backend, 3, 2, 77, 77, torch.float16, D=D, pre=pre, post=post)


@pytest.mark.parametrize("backend", kernel_backends())
def test_monarch16_cufft_backward_fallback(backend, monarch16_cufft_bwd, m16_bwd_calls):
    """MONARCH16_BWD_CUFFT: monarch16 forward, cuFFT backward, every gradient vs float64."""
    check(backend, 3, 5, 201, 57, torch.float16)
    assert m16_bwd_calls == []


@pytest.fixture
def m16_bwd_calls(monkeypatch):
    """Records each call of monarch16's backward (the interface imports it at call time)."""
    calls = []
    real = fft_m16.fft_conv_bwd

    def spy(*args):
        calls.append(args[1].shape)
        return real(*args)

    monkeypatch.setattr(fft_m16, "fft_conv_bwd", spy)
    return calls


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,L,Lk", [
    (1, 3, 255, 100),   # N = 512 (32 x 16), B = 1: one half-empty pair
    (7, 3, 120, 120),   # N = 256 (16 x 16), R1 = N1 (L > N / 2), odd B: pairs + a lone row
    (2, 1, 97, 1),      # Lk = 1: dk is a single lag (and the D-like sum of the correlation)
])
def test_monarch16_backward_matches_oracle(backend, dtype, B, H, L, Lk, monarch16,
                                           m16_bwd_calls):
    """The monarch16 backward itself (called through the public op): du, dk, dD, dpre, dpost."""
    check(backend, B, H, L, Lk, dtype, oracle=fft_conv_direct)
    assert m16_bwd_calls == [(B, H, L)]


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("uscale,kscale,gscale", [(3e4, 1.0, 1.0), (1e-5, 1.0, 1.0),
                                                  (1.0, 1e4, 1.0), (1.0, 1e-6, 1.0),
                                                  (1.0, 1.0, 1e-5), (1.0, 1.0, 3e3)])
def test_monarch16_backward_scaling(backend, uscale, kscale, gscale, monarch16):
    """Extreme scales in the backward: rows of one pair 100x apart in u and 1e3x apart in dy
    (opposite directions, so the shared dk product scale differs from both rows' own scales);
    du / dpre / dpost are judged row by row (the small row must not drown), dk / dD as sums."""
    backward_scaling_check(backend, uscale, kscale, gscale)


def backward_scaling_check(backend, uscale, kscale, gscale):
    """test_monarch16_backward_scaling's body (also run by test_fft_conv_blocked)."""
    B, H, L, Lk = 2, 3, 200, 150
    dtype = torch.bfloat16
    u, k, D, pg, qg = make(B, H, L, Lk, dtype)
    u = (u.float() * uscale * torch.tensor([1.0, 0.01], device=DEVICE)[:, None, None]).to(dtype)
    k, D = k * kscale, D * kscale
    cot = torch.randn(B, H, L, dtype=torch.float64) * gscale
    cot = (cot * torch.tensor([1e-3, 1.0], dtype=torch.float64)[:, None, None]).to(dtype)
    out = run(sk.fft_conv, u, k, D, pg, qg, cot.to(DEVICE), backend=backend)
    hi = [x.detach().cpu().double() for x in (u, k, D, pg, qg)]
    ref = run(fft_conv_direct, *hi, cot.double())
    lowp = run(fft_conv_ref, *(x.cpu() for x in (u, k, D, pg, qg)), cot)
    for i, name in enumerate(NAMES):
        if i == 0:
            continue
        assert torch.isfinite(out[i]).all(), name
        if name in ("dk", "dD"):
            assert_close(out[i], ref[i], dtype=dtype, lowp_ref=lowp[i], name=name)
        else:
            for b in range(B):
                assert_close(out[i][b], ref[i][b], dtype=dtype, lowp_ref=lowp[i][b],
                             name=f"{name} row {b}")


@pytest.mark.parametrize("backend", kernel_backends())
def test_monarch16_backward_deterministic_and_opcheck(backend, monarch16):
    """Bitwise repeatable (dk / dD: per-program buffers summed in a fixed order, no atomics);
    the registered backward op passes opcheck on this path."""
    u, k, D, pg, qg = make(5, 3, 90, 40, torch.float16)
    dy = torch.randn_like(u)
    a = fft_conv_bwd_op(dy, u, k, D, pg, qg, backend)
    b = fft_conv_bwd_op(dy, u, k, D, pg, qg, backend)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    torch.library.opcheck(fft_conv_bwd_op.op, (dy, u, k, D, pg, qg, backend))
    torch.library.opcheck(fft_conv_bwd_op.op, (dy, u, k, None, None, None, backend))


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("uscale,kscale", [(3e4, 1.0), (1e-5, 1.0), (1.0, 1e4), (1.0, 1e-6)])
def test_monarch16_scaling(backend, uscale, kscale, monarch16):
    """Inputs and filters far outside fp16's comfortable range (bf16 storage: u up to 1e5 with
    gates; tiny values): the per-pair power-of-two scale and the max-normalised filter spectrum
    keep the fp16 operands in range. Rows of one pair differ in size by 100x."""
    B, H, L, Lk = 2, 3, 200, 150
    u, k, D, pg, qg = make(B, H, L, Lk, torch.bfloat16)
    u = (u.float() * uscale * torch.tensor([1.0, 0.01], device=DEVICE)[:, None, None]).to(u.dtype)
    k = k * kscale
    D = D * kscale
    y = sk.fft_conv(u, k, D, pre_gate=pg, post_gate=qg, backend=backend)
    ref = fft_conv_direct(*(x.double().cpu() for x in (u, k, D)), pre_gate=pg.double().cpu(),
                          post_gate=qg.double().cpu())
    lowp = fft_conv_ref(*(x.cpu() for x in (u, k, D)), pre_gate=pg.cpu(), post_gate=qg.cpu())
    assert torch.isfinite(y).all()
    for b in range(B):  # each row on its own: the small row of the pair must not drown
        assert_close(y[b], ref[b], dtype=torch.bfloat16, lowp_ref=lowp[b], name=f"row {b}")


@pytest.mark.parametrize("backend", kernel_backends())
def test_monarch16_opcheck(backend, monarch16):
    opcheck_fwd(backend, torch.float16)


def opcheck_fwd(backend, dtype):
    """opcheck of the forward op with every operand, and with u and k alone (requiring grad)."""
    u, k, D, pg, qg = make(2, 2, 20, 9, dtype)
    torch.library.opcheck(fft_conv_fwd_op.op, (u, k, D, pg, qg, backend))
    torch.library.opcheck(fft_conv_fwd_op.op, (u.requires_grad_(), k.requires_grad_(), None, None,
                                               None, backend))


def test_monarch16_plan_and_tables():
    """Sizes and factors; the cached tables ARE the DFT (forward through the permuted layout
    equals torch.fft.fft) and the filter tables hold K / (max|K| N2) in the (k1, k2) layout."""
    assert fft_m16.transform_size(4096, 4096) == 8192 and fft_m16.split(8192) == (128, 64)
    assert fft_m16.transform_size(1024, 1024) == 2048 and fft_m16.split(2048) == (64, 32)
    assert fft_m16.transform_size(5, 3) == 256 and fft_m16.split(256) == (16, 16)
    assert fft_m16.rows(8192, 128, 4096) == 64 and fft_m16.rows(4096, 64, 3000) == 64
    assert fft_m16.supports(4096, 4096) and fft_m16.supports(6000, 2193)
    assert not fft_m16.supports(4097, 4097)
    n1, n2 = 32, 16
    f1, f2, tw = (t.double() for t in fft_m16.dft_tables(n1, n2, "cpu"))
    assert fft_m16.dft_tables(n1, n2, "cpu")[0] is fft_m16.dft_tables(n1, n2, "cpu")[0]
    c = lambda t, i=0: torch.complex(t[i], t[i + 1])  # noqa: E731
    x = torch.randn(n1 * n2, dtype=torch.float64)
    X = ((c(f1) @ x.view(n1, n2).to(torch.complex128)) * c(tw)) @ c(f2)
    want = torch.fft.fft(x).view(n2, n1).T
    assert (X - want).abs().max() < 3e-3 * want.abs().max()       # fp16 tables
    assert torch.equal(c(tw, 2), c(tw).conj())
    k = torch.randn(3, 100)
    ks, kscale = fft_m16.filter_tables(k, n1, n2)
    K = torch.fft.fft(k.double(), n=n1 * n2).view(3, n2, n1).transpose(1, 2)
    kmax = K.abs().amax(dim=(1, 2))
    assert torch.allclose(kscale.double(), kmax * n2 / (n1 * n2), rtol=1e-5)
    got = torch.complex(ks[:, 0].double(), ks[:, 1].double())
    assert (got - K / kmax[:, None, None] / n2).abs().max() < 1e-3 / n2


def test_monarch16_filter_cache(fresh_cache):
    k = torch.randn(3, 100)
    t1 = fft_m16.filter_tables(k, 32, 16)
    assert fft_m16.filter_tables(k, 32, 16) is t1                  # unchanged filter: reused
    assert fft_cufft.filter_spectrum(k, 512) is not t1[0]          # other layouts: own entries
    with torch.no_grad():
        k.mul_(-2.0)
    t2 = fft_m16.filter_tables(k, 32, 16)
    assert t2 is not t1 and torch.allclose(t2[1], 2 * t1[1])      # max|K| doubled


@pytest.mark.parametrize("backend", kernel_backends())
def test_monarch16_in_place_filter_update(backend, fresh_cache, monarch16):
    u, k, D, _, _ = make(2, 3, 100, 100, torch.float16, pre=False, post=False)
    sk.fft_conv(u, k, D, backend=backend)
    with torch.no_grad():
        k.mul_(-3.0)
    y = sk.fft_conv(u, k, D, backend=backend)
    hi = [x.double().cpu() for x in (u, k, D)]
    assert_close(y, fft_conv_direct(*hi), dtype=torch.float16,
                 lowp_ref=fft_conv_ref(*(x.cpu() for x in (u, k, D))))


def test_monarch16_path_choice(monkeypatch):
    """On by default: 16-bit forwards and backwards with N <= 8192 take monarch16, except a
    post-gated backward at N = 8192 (cuFFT measured faster there) and every backward with
    MONARCH16_BWD_CUFFT; a float32 forward only through MONARCH16_F32 (N <= 4096), never past
    MAX_N; MONARCH16 = False turns the 16-bit use off."""
    b16 = torch.empty(1, 1, 4096, dtype=torch.bfloat16)
    b2k = torch.empty(1, 1, 2048, dtype=torch.bfloat16)
    f16 = torch.empty(1, 1, 1000, dtype=torch.float16)
    f32 = torch.empty(1, 1, 1000)
    assert fft_interface.MONARCH16 is True
    assert fft_interface.triton_path("fwd", b16, 4096) == "monarch16"
    assert fft_interface.triton_path("fwd", f16, 1000) == "monarch16"
    assert fft_interface.triton_path("bwd", b16, 4096) == "monarch16"
    assert fft_interface.triton_path("bwd", b16, 4096, post=True) == "cufft"      # N = 8192
    assert fft_interface.triton_path("bwd", b16, 1000, post=True) == "cufft"      # N = 8192 too
    assert fft_m16.transform_size(4096, 1000) == 8192 and fft_m16.transform_size(4096, 1) == 4096
    assert fft_interface.triton_path("bwd", b16, 1, post=True) == "monarch16"     # N = 4096
    assert fft_interface.triton_path("bwd", b2k, 2048, post=True) == "monarch16"  # N = 4096
    assert fft_interface.triton_path("bwd", f16, 1000, post=True) == "monarch16"
    assert fft_interface.triton_path("fwd", f32, 1000) == "monarch16"   # MONARCH16_F32, N 2048
    assert fft_interface.triton_path("bwd", f32, 1000) != "monarch16"
    b_long = torch.empty(1, 1, 4097, dtype=torch.bfloat16)
    assert fft_interface.triton_path("fwd", b_long, 4097) != "monarch16"
    assert fft_interface.triton_path("bwd", b_long, 4097) != "monarch16"
    monkeypatch.setattr(fft_interface, "MONARCH16_BWD_CUFFT", True)
    assert fft_interface.triton_path("fwd", b16, 4096) == "monarch16"
    assert fft_interface.triton_path("bwd", b16, 4096) == "cufft"
    monkeypatch.setattr(fft_interface, "FORCE_PATH", "monarch16")
    assert fft_interface.triton_path("bwd", b16, 4096) == "cufft"
    monkeypatch.setattr(fft_interface, "FORCE_PATH", None)
    monkeypatch.setattr(fft_interface, "MONARCH16", False)
    assert fft_interface.triton_path("fwd", b16, 4096) != "monarch16"
    assert fft_interface.triton_path("bwd", f16, 1000) != "monarch16"


@pytest.mark.parametrize("backend", kernel_backends())
def test_monarch16_default_autograd(backend, m16_bwd_calls, monkeypatch):
    """No flags: a 16-bit call runs the monarch16 forward and backward (checked vs float64);
    with a post gate at N = 8192 the backward is the cuFFT path's (threshold lowered here to
    N = 256 to keep the interpreter fast)."""
    calls = []
    real = fft_m16.fft_conv_fwd
    monkeypatch.setattr(fft_m16, "fft_conv_fwd", lambda *a: calls.append(a[0].shape) or real(*a))
    check(backend, 2, 3, 100, 77, torch.float16, pre=False, post=False)
    assert calls == [(2, 3, 100)] and m16_bwd_calls == [(2, 3, 100)]
    monkeypatch.setattr(fft_interface, "MONARCH16_BWD_CUFFT_POST_N", 256)
    check(backend, 2, 3, 100, 77, torch.bfloat16, pre=False)
    assert len(calls) == 2 and m16_bwd_calls == [(2, 3, 100)]  # the post-gated backward: cuFFT


@pytest.mark.parametrize("sms", [132, 1])
def test_monarch16_backward_default_buffers_bitwise(sms, monkeypatch):
    """The backward's default (non-NaN-filled) buffers (host9: kscale.new_empty, no lambdas)
    give bitwise the NaN-filled path's results (every element written), one program per
    channel (S == 1: dk inside the kernel) and several (S > 1: summed spectra + torch inverse),
    with and without gates and D."""
    if "triton" not in kernel_backends():
        pytest.skip("the Triton kernels need TRITON_INTERPRET=1 or a GPU")
    monkeypatch.setattr(fft_m16, "_sm_count", lambda device: sms)
    g = torch.Generator().manual_seed(9)
    B, H, L, Lk = 4, 3, 100, 77
    rnd = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    u, dy, pre, post = (rnd(B, H, L).to(torch.bfloat16) for _ in range(4))
    k, D = (rnd(H, Lk) / 10).contiguous(), rnd(H)
    S = fft_m16.batch_split(B, H, torch.device(DEVICE))[0]
    assert (S == 1) == (sms == 1)
    for gates in (False, True):
        for d in (D, None):
            args = (dy, u, k, d, pre if gates else None, post if gates else None)
            monkeypatch.setattr(fft_m16, "FILL_NAN", True)
            ref = fft_m16.fft_conv_bwd(*args)
            monkeypatch.setattr(fft_m16, "FILL_NAN", False)
            out = fft_m16.fft_conv_bwd(*args)
            for name, a, b in zip(("du", "dk", "dD", "dpre", "dpost"), out, ref):
                assert (a is None) == (b is None), name
                if a is not None:
                    assert a.dtype == b.dtype and a.shape == b.shape and a.is_contiguous(), name
                    assert torch.equal(a, b) and not a.isnan().any(), (name, gates, d is None)


@pytest.mark.gpu
@pytest.mark.parametrize("L,Lk", [(1, 1), (255, 255), (1024, 1024), (2048, 2048), (4096, 4096),
                                  (4095, 1000), (3000, 5)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_monarch16_sizes(L, Lk, dtype, monarch16):
    """Real sizes on the GPU (wgmma, bf16 casts that round to nearest): forward and every
    gradient on monarch16, H not a multiple of 16, odd B, vs float64."""
    check_gpu("triton", 3, 50, L, Lk, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("L,Lk", [(1024, 1024), (4096, 4096), (4095, 1000)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_monarch16_backward_in_kernel_dk(L, Lk, dtype, monarch16, m16_bwd_calls):
    """H = 300 >= 2 x SMs: one program per channel (S == 1), so the dk inverse runs inside the
    backward kernel (H = 50 above takes the slices + torch inverse), gates off and on."""
    assert fft_m16.batch_split(3, 300, torch.device(DEVICE))[0] == 1
    check_gpu("triton", 3, 300, L, Lk, dtype)
    check_gpu("triton", 3, 300, L, Lk, dtype, D=False, pre=False, post=False)
    assert len(m16_bwd_calls) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("L,Lk", [(1024, 1024), (4096, 4096), (3000, 5)])
def test_gpu_monarch16_cufft_backward(L, Lk, monarch16_cufft_bwd):
    check_gpu("triton", 3, 50, L, Lk, torch.bfloat16)


_M16_COMPILE = r'''
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from ssm_kernels.fft_conv import monarch16 as M
from ssm_kernels._launch import FastKernel
for n, bj in ((2048, 0), (4096, 0), (8192, 0), (4096, 32), (8192, 64), (8192, 32)):
    n1, n2 = M.split(n)   # bj: the row-blocked variant (KBLOCK)
    consts = dict(HAS_D=True, HAS_PRE=True, HAS_POST=True, N1=n1, N2=n2, R1=n1 // 2, BJ=bj,
                  TWC=bj != 32)  # the conj(T) copy (TWIDDLE_CONJ_COPY) and T conjugated
    for fn, table in ((M._monarch16_fwd_kernel, M.LAUNCH), (M._monarch16_bwd_kernel, M.LAUNCH_BWD)):
        fn = fn.fn if isinstance(fn, FastKernel) else fn  # the JITFunction inside the launch cache
        sig = {a: "constexpr" if a in consts else ("*fp16" if a in ("ks_ptr", "f1_ptr", "f2_ptr", "tw_ptr")
               else "*fp32" if a in ("d_ptr", "kscale_ptr", "wk_ptr", "wd_ptr") else "*bf16")
               if a.endswith("_ptr") else "i32" for a in fn.arg_names}
        k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                           options=M._launch(n, table))
        print(fn.__name__, n, bj, "shared", k.metadata.shared, flush=True)
'''


def test_monarch16_compiles_for_sm90_within_shared_memory():
    res = compile_for_sm90(_M16_COMPILE)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 12, res.stdout
    for line in lines:
        assert int(line.split()[-1]) <= 232448, line


# ---- the GPU compiler (no GPU needed) ---------------------------------------------------------------

_COMPILE_SCRIPT = r'''
import importlib, sys, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
K = importlib.import_module("ssm_kernels.fft_conv.triton")
STORAGE = ("u_ptr", "pre_ptr", "post_ptr", "y_ptr", "dy_ptr", "du_ptr", "dpre_ptr", "dpost_ptr")

def build(fn, consts, warps, storage="fp32"):
    sig = {n: "constexpr" if n in consts else
           (("*" + storage) if n in STORAGE else "*fp32") if n.endswith("_ptr") else "i32"
           for n in fn.arg_names}
    k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps})
    print(fn.__name__, consts.get("N1"), consts.get("PREC"), k.metadata.shared, flush=True)
    return k.metadata.shared

flags = dict(HAS_D=True, HAS_PRE=True, HAS_POST=True)
worst = []
for storage, prec in (("bf16", "tf32"), ("fp32", "tf32x3")):
    n = K._ONCHIP_LIMIT["bwd"][prec]
    n1, n2 = K._split(n)
    worst.append(build(K._onchip_bwd_kernel, dict(flags, N1=n1, N2=n2, R1=n1 // 2, PREC=prec),
                       K._warps(n), storage))
q = K.LONG_INNER_N["bwd"]
q1, q2 = K._split(q)
worst.append(build(K._inner_kernel, dict(MODE=3, N1=q1, N2=q2, PREC="tf32x3"), K._warps(q)))
print("max shared", max(worst))
C = importlib.import_module("ssm_kernels.fft_conv.cufft")
for fn, consts in ((C._pad_kernel, dict(HAS_M=True, HAS_M2=True, TWO=True, BLOCK=2048)),
                   (C._spec_fwd_kernel, dict(BK=512)),
                   (C._spec_bwd_kernel, dict(HAS_POST=True, BK=512)),
                   (C._epi_fwd_kernel, dict(flags, BLOCK=2048)),
                   (C._epi_bwd_kernel, dict(flags, BLOCK=2048)),
                   (C._epi_dk_kernel, dict(HAS_D=True, BLOCK=2048)),
                   (C._epi_bwd_dk_kernel, dict(flags, BLOCK=2048, BLOCK_K=2048))):
    sig = {n: "constexpr" if n in consts else ("fp32" if n == "scale" else
           (("*bf16") if n in STORAGE else "*fp32") if n.endswith("_ptr") else "i32")
           for n in fn.arg_names}
    k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 8})
    print(fn.__name__, "regs", k.n_regs if hasattr(k, "n_regs") else "?", "shared", k.metadata.shared, flush=True)
print("max shared", max(worst))
'''


def test_triton_kernels_compile_for_sm90_within_shared_memory():
    """The interpreter never runs the GPU compiler: build the largest on-chip backward kernels
    (bf16 / tf32 and fp32 / tf32x3 at their on-chip limits) and the long path's dk pass for
    sm_90 here, in a fresh process (TRITON_INTERPRET is read when kernels are decorated), and
    check their shared memory fits an H100 block (227 KB)."""
    res = compile_for_sm90(_COMPILE_SCRIPT)
    assert res.returncode == 0, res.stderr[-3000:]
    shared = int(res.stdout.strip().splitlines()[-1].split()[-1])
    assert shared <= 232448, res.stdout


# ---- the launch cache (ssm_kernels/_launch.py) on fft_conv's kernels -----------------------------

_LAUNCH_CACHE = r'''
import os, sys
import torch
from triton.compiler.compiler import CompiledKernel
from triton.runtime.driver import driver
import ssm_kernels as sk
from ssm_kernels import _backend, _launch, _device
from ssm_kernels.fft_conv import cufft as C, interface as I, monarch16 as M
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(sk.__file__)), "tests"))
from test_launch import _Driver as Drv   # compile-only sm_90 driver

launches = []
def init(self):
    self.function = id(self)
    self._run = lambda *args: launches.append((self, args))
CompiledKernel._init_handles = init
driver.set_active(Drv())
reason = _backend.triton_reason
_backend.triton_reason = lambda device: reason(torch.device("cuda"))
_device._sm_count = lambda index: 132
torch.cuda.current_device = lambda: 0
kernels = [M._monarch16_fwd_kernel, M._monarch16_bwd_kernel, M._monarch16_f32_fwd_kernel,
           C._pad_kernel, C._spec_fwd_kernel, C._spec_bwd_kernel, C._epi_fwd_kernel,
           C._epi_bwd_kernel, C._epi_dk_kernel, C._epi_bwd_dk_kernel]
assert all(isinstance(k, _launch.FastKernel) for k in kernels)
# monarch16; float32: the monarch16 f32 forward + cuFFT backward (default), the cuFFT path both ways
for dtype, f32 in ((torch.bfloat16, True), (torch.float32, True), (torch.float32, False)):
    I.MONARCH16_F32 = f32
    u = torch.randn(2, 4, 200).to(dtype).requires_grad_()
    k = torch.randn(4, 200).requires_grad_()
    D = torch.randn(4)
    step = lambda: torch.autograd.grad(sk.fft_conv(u, k, D, backend="triton"), [u, k], u)
    step()
    first = list(launches); launches.clear()
    hits = sum(x.hits for x in kernels)
    step()
    print(dtype, len(first), len(launches), sum(x.hits for x in kernels) - hits)
    def same(x, y):   # tensors: new outputs per call, so the kind (dtype, shape), not the object
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and (x.dtype, x.shape) == (y.dtype, y.shape)
        return x is y or x == y
    for (ka, a), (kb, b) in zip(first, launches):   # same kernels, same launcher arguments
        assert ka is kb and len(a) == len(b)
        assert all(i == 6 or same(x, y) for i, (x, y) in enumerate(zip(a, b))), ka
    launches.clear()
'''


def test_launch_cache_serves_repeat_calls():
    """Compile-only sm_90 driver, recorded launchers: a repeated fwd + bwd launches the same
    kernels (2 monarch16; float32: 4 with the f32 monarch16 forward, 6 on the cuFFT path: the
    backward's epilogues are one launch, FUSED_DK_EPILOGUE) through the launch cache (every
    launch a hit)."""
    res = compile_for_sm90(_LAUNCH_CACHE)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert lines == ["torch.bfloat16 2 2 2", "torch.float32 4 4 4", "torch.float32 6 6 6"], res.stdout


def test_s4d_gradcheck_and_expm1():
    """s4d_kernel's float64 gradients through the W = C (exp(dt A) - 1) / A preparation (written
    as 2 exp(z/2) sinh(z/2) since host8: 5 complex kernels instead of 12) and the Vandermonde
    node, including the undefined-gradient mode (its backward returned None.contiguous() before);
    and the expm1 form against float64 expm1 of the real axis and exp(z) - 1 away from 0."""
    from ssm_kernels.fft_conv.interface import _expm1_complex
    d = torch.float64
    ld = (torch.randn(4, dtype=d) * 0.1 - 3).requires_grad_()
    A = torch.complex(-torch.rand(4, 3, dtype=d), torch.randn(4, 3, dtype=d)).requires_grad_()
    C = torch.randn(4, 3, dtype=torch.complex128).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: sk.s4d_kernel(a, b, c, 7, backend="reference"),
                                    (ld, A, C))
    x = -torch.logspace(-14, 0, 50, dtype=d)
    torch.testing.assert_close(_expm1_complex(x.to(torch.complex128)).real, torch.expm1(x),
                               rtol=1e-15, atol=0)
    z = torch.complex(-torch.rand(50, dtype=d), torch.randn(50, dtype=d) * 5)
    torch.testing.assert_close(_expm1_complex(z), torch.exp(z) - 1, rtol=1e-14, atol=0)
