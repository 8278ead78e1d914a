"""linear_scan against the float64 reference: outputs, final states and every gradient."""
import pytest
import torch

import ssm_kernels as sk
from ssm_kernels.linear_scan.reference import linear_scan_bwd_ref, linear_scan_fwd_ref
from ssm_kernels.testing import assert_close

from conftest import DEVICE, kernel_backends

BACKENDS = ["reference"] + kernel_backends(with_cuda=True)
# (shape, dim): [B, T, D], [B, D, T], a rank-4 tensor with time in the middle, rank 2
LAYOUTS = [((2, 13, 5), 1), ((3, 4, 13), -1), ((2, 3, 9, 2), 2), ((6, 11), 0)]


def make_inputs(shape, dim, dtype, device=DEVICE, strong_decay=False):
    mag = torch.rand(shape, device=device) * (0.2 if strong_decay else 0.5) + (0.0 if strong_decay else 0.5)
    if dtype.is_complex:
        a = torch.polar(mag, torch.rand(shape, device=device) * 6.28).to(dtype)
        b = torch.randn(shape, device=device, dtype=dtype)
    else:
        a = mag.to(dtype)
        b = torch.randn(shape, device=device).to(dtype)
    state_shape = list(shape)
    del state_shape[dim]
    h0 = torch.randn(state_shape, device=device, dtype=torch.complex64 if dtype.is_complex else torch.float32)
    return a, b, h0


def run(fn, a, b, h0, dim, reverse, cot, **kw):
    """Forward + backward of fn with cotangents `cot` for (h, final_state)."""
    a, b, h0 = [x.detach().requires_grad_() for x in (a, b, h0)]
    h, hT = fn(a, b, h0, dim=dim, reverse=reverse, output_final_state=True, **kw)
    loss = (h * cot[0].to(h.dtype).conj()).real.sum() + (hT * cot[1].to(hT.dtype).conj()).real.sum()
    grads = torch.autograd.grad(loss, (a, b, h0))
    return (h, hT) + grads


def check_against_reference(backend, shape, dim, dtype, reverse, strong_decay=False, ref_device="cpu"):
    """Outputs, final state and every gradient vs the float64 reference (run on `ref_device`: the
    GPU at real sizes, where a Python loop over T on the CPU is too slow)."""
    a, b, h0 = make_inputs(shape, dim, dtype, strong_decay=strong_decay)
    hi = torch.complex128 if dtype.is_complex else torch.float64
    cot = (torch.randn(shape, dtype=hi, device=ref_device),
           torch.randn(h0.shape, dtype=hi, device=ref_device))
    out = run(sk.linear_scan, a, b, h0, dim, reverse, [c.to(DEVICE) for c in cot], backend=backend)
    ref = run(sk.linear_scan_ref, *(x.to(ref_device, hi) for x in (a, b, h0)), dim, reverse, cot)
    lowp = None
    if dtype in (torch.float16, torch.bfloat16):
        lowp = run(sk.linear_scan_ref, *(x.to(ref_device) for x in (a, b, h0)), dim, reverse, cot)
    for i, name in enumerate(["h", "final_state", "da", "db", "dh0"]):
        assert_close(out[i], ref[i], dtype=dtype, lowp_ref=None if lowp is None else lowp[i],
                     name=f"{backend} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,dim", LAYOUTS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_matches_reference(backend, shape, dim, reverse, dtype):
    if backend == "cuda" and dtype.is_complex:
        pytest.skip("the CUDA kernel is real-only; auto routes complex to triton (tested there)")
    check_against_reference(backend, shape, dim, dtype, reverse)


@pytest.mark.parametrize("backend", kernel_backends(with_cuda=True))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,dim", LAYOUTS[:2])
def test_low_precision(backend, dtype, shape, dim):
    check_against_reference(backend, shape, dim, dtype, reverse=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 2, 17, 64, 65])
def test_odd_lengths(backend, T):
    check_against_reference(backend, (2, T, 3), 1, torch.float32, reverse=False)
    check_against_reference(backend, (2, 3, T), 2, torch.float32, reverse=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_decays(backend):
    check_against_reference(backend, (2, 40, 4), 1, torch.float32, False, strong_decay=True)
    a, b, h0 = make_inputs((2, 40, 4), 1, torch.float32)
    a = torch.ones_like(a)  # no decay: a plain cumulative sum
    h = sk.linear_scan(a, b, h0, backend=backend)
    assert_close(h, (h0[:, None].double() + b.double().cumsum(1)), dtype=torch.float32)


@pytest.mark.parametrize("backend", kernel_backends(with_cuda=True))
def test_kernel_backward_algebra_matches_reference_backward(backend):
    """The kernel's reverse-scan gradient equals the reference's loop on the same saved h."""
    a, b, h0 = make_inputs((2, 19, 3), 1, torch.float32)
    h, hT = linear_scan_fwd_ref(a, b, h0, False)
    dh, dhT = torch.randn_like(h), torch.randn_like(hT)
    ref = linear_scan_bwd_ref(a, h, h0, dh, dhT, False)
    out = torch.ops.ssm_kernels.linear_scan_bwd(a, h.contiguous(), h0, dh, dhT, 1, False, backend)
    for o, r in zip(out, ref):
        assert_close(o, r.double(), dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_initial_state_and_no_final_state(backend):
    a, b, _ = make_inputs((2, 9, 3), 1, torch.float32)
    a.requires_grad_()
    b.requires_grad_()
    h = sk.linear_scan(a, b, backend=backend)
    h.square().sum().backward()
    ad, bd = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    sk.linear_scan_ref(ad, bd).square().sum().backward()
    assert_close(h, sk.linear_scan_ref(ad, bd), dtype=torch.float32)
    assert_close(a.grad, ad.grad, dtype=torch.float32)
    assert_close(b.grad, bd.grad, dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_on_final_state_only(backend):
    a, b, h0 = make_inputs((2, 9, 3), 1, torch.float32)
    a.requires_grad_()
    _, hT = sk.linear_scan(a, b, h0, output_final_state=True, backend=backend)
    hT.sum().backward()
    ad = a.detach().double().requires_grad_()
    sk.linear_scan_ref(ad, b.double(), h0.double(), output_final_state=True)[1].sum().backward()
    assert_close(a.grad, ad.grad, dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    a, b, h0 = make_inputs((3, 16, 10), 1, torch.float32)
    a_nc, b_nc = a.transpose(1, 2), b.transpose(1, 2)  # [B, D, T] views of [B, T, D] memory
    assert not a_nc.is_contiguous()
    h = sk.linear_scan(a_nc, b_nc, h0, dim=2, backend=backend)
    assert_close(h, sk.linear_scan_ref(a_nc.double(), b_nc.double(), h0.double(), dim=2),
                 dtype=torch.float32)


@pytest.mark.parametrize("backend", kernel_backends(with_cuda=True))
def test_backward_is_deterministic(backend):
    a, b, h0 = make_inputs((2, 33, 5), 1, torch.float32)
    cot = (torch.randn(2, 33, 5, device=DEVICE), torch.randn(2, 5, device=DEVICE))
    g1 = run(sk.linear_scan, a, b, h0, 1, False, cot, backend=backend)
    g2 = run(sk.linear_scan, a, b, h0, 1, False, cot, backend=backend)
    for x, y in zip(g1, g2):
        assert torch.equal(x, y)


def test_auto_picks_a_backend_that_can_serve():
    a, b, h0 = make_inputs((2, 5, 3), 1, torch.float64)
    h = sk.linear_scan(a, b, h0)  # float64: only the reference can serve; auto must take it
    assert_close(h, sk.linear_scan_ref(a, b, h0), dtype=torch.float64)


# ---- bad input --------------------------------------------------------------------------------

def test_errors_name_the_argument():
    a, b, h0 = make_inputs((2, 5, 3), 1, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="b must have a's shape"):
        sk.linear_scan(a, b[:, :4])
    with pytest.raises(TypeError, match="b must have a's dtype"):
        sk.linear_scan(a, b.double())
    with pytest.raises(TypeError, match="a must have a floating"):
        sk.linear_scan(a.long(), b.long())
    with pytest.raises(ValueError, match="dim must be an int"):
        sk.linear_scan(a, b, dim=3)
    with pytest.raises(ValueError, match="initial_state must have shape"):
        sk.linear_scan(a, b, h0[:, :2])
    with pytest.raises(ValueError, match="rank >= 2"):
        sk.linear_scan(a[0, 0], b[0, 0])
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        sk.linear_scan(a, 3.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        sk.linear_scan(a, b, backend="fast")
    with pytest.raises(ValueError, match="length >= 1"):
        sk.linear_scan(a[:, :0], b[:, :0])
    with pytest.raises(sk.BackendUnavailableError, match="cuda"):
        sk.linear_scan(a, b, backend="cuda")  # CPU tensors


@pytest.mark.skipif(DEVICE == "cpu", reason="needs two devices")
def test_device_mismatch():
    a, b, _ = make_inputs((2, 5, 3), 1, torch.float32)
    with pytest.raises(ValueError, match="one device"):
        sk.linear_scan(a, b.cpu())


# ---- real sizes on the GPU ------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", kernel_backends(with_cuda=True))
@pytest.mark.parametrize("shape,dim", [((4, 4097, 96), 1), ((4, 96, 4097), 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.complex64])
@pytest.mark.parametrize("reverse", [False, True])
def test_gpu_real_sizes(backend, shape, dim, dtype, reverse):
    if backend == "cuda" and dtype.is_complex:
        pytest.skip("CUDA kernel is real-only")
    check_against_reference(backend, shape, dim, dtype, reverse, ref_device=DEVICE)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", kernel_backends(with_cuda=True))
def test_gpu_long_sequence(backend):
    """T = 2^20: the carry crosses thousands of tiles. Oracle: a constant decay per channel, so
    each chunk is a float64 Toeplitz matmul plus the carried state (no 2^20-step Python loop)."""
    C, T, L = 4, 1 << 20, 1024
    decay = torch.tensor([0.5, 0.9, 0.999, 1.0], device=DEVICE, dtype=torch.float64)
    b = torch.randn(1, T, C, device=DEVICE, dtype=torch.float64)
    a = decay.expand(1, T, C)
    h = sk.linear_scan(a.float().contiguous(), b.float(), backend=backend)
    lag = torch.arange(L, device=DEVICE)
    expo = (lag[:, None] - lag[None, :]).clamp(min=0).double()
    toep = decay[:, None, None] ** expo * (lag[:, None] >= lag[None, :])  # [C, L, L]
    bc = b[0].T.reshape(C, T // L, L)  # [C, chunks, L]
    local = torch.einsum("cts,cns->cnt", toep, bc)  # chunk-local scan from zero state
    powers = decay[:, None] ** (lag + 1).double()  # decay^(t+1) within a chunk
    ref = torch.empty_like(local)
    carry = torch.zeros(C, device=DEVICE, dtype=torch.float64)
    for n in range(T // L):
        ref[:, n] = local[:, n] + powers * carry[:, None]
        carry = ref[:, n, -1]
    assert_close(h, ref.reshape(C, T).T[None], dtype=torch.float32)


@pytest.mark.gpu
def test_gpu_past_int32_offsets():
    """> 2^31 elements: int64 offsets must reach the far end."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB")
    P, T = 2, (1 << 30) + 7  # 2^31 + 14 elements per tensor, time innermost
    a = torch.full((P, T), 0.5, device=DEVICE, dtype=torch.bfloat16)
    b = torch.ones((P, T), device=DEVICE, dtype=torch.bfloat16)
    from ssm_kernels.linear_scan.cuda import fits
    for backend in kernel_backends(with_cuda=True):
        if backend == "cuda" and not fits((P, T, 1)):
            # the CUDA kernel indexes tiles in int32 and says so; auto then takes Triton
            with pytest.raises(sk.BackendUnavailableError, match="int32"):
                sk.linear_scan(a, b, dim=1, backend="cuda")
            continue
        h, hT = sk.linear_scan(a, b, dim=1, backend=backend, output_final_state=True)
        # fixed point of h = 0.5 h + 1 is 2: every element after the first ~30 steps, incl. the last
        assert h[-1, -1].item() == 2.0 and h[-1, 40].item() == 2.0
        assert torch.allclose(hT, torch.full_like(hT, 2.0))
        del h, hT


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
@pytest.mark.parametrize("reverse", [False, True])
def test_few_channels_long_time_split(backend, dtype, reverse):
    """Few channels and a long sequence: the Triton launcher splits time into chunks (summary pass,
    scan over chunk summaries, full pass); every output and gradient must be unchanged."""
    if backend == "cuda" and dtype.is_complex:
        pytest.skip("CUDA kernel is real-only")
    check_against_reference(backend, (1, 150, 2), 1, dtype, reverse)
    check_against_reference(backend, (2, 1, 131), 2, dtype, reverse)


@pytest.mark.parametrize("reg_shift,prefetch", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shape", [(3, 4, 13), (2, 1, 131), (2, 3, 48)])
def test_time_inner_backward_knob(monkeypatch, reg_shift, prefetch, dtype, reverse, shape):
    """[B, D, T] backward: the register-shift kernel (BWD_REG_SHIFT) and the shifted-load kernel
    both match the reference (odd T, time split into chunks, T a multiple of the tile), and the
    knob picks the kernel it names; BWD_PREFETCH (next tile loaded during the scan) too."""
    if "triton" not in BACKENDS:
        pytest.skip("no Triton backend")
    from ssm_kernels.linear_scan import triton as K
    monkeypatch.setattr(K, "BWD_REG_SHIFT", reg_shift)
    monkeypatch.setattr(K, "BWD_PREFETCH", prefetch)
    calls = []
    for name in ("_linear_scan_bwd_tinner_kernel", "_linear_scan_bwd_kernel"):
        k = getattr(K, name)

        class Spy:
            def __getitem__(self, grid, k=k, name=name):
                calls.append(name)
                return k[grid]
        monkeypatch.setattr(K, name, Spy())
    check_against_reference("triton", shape, 2, dtype, reverse)
    full = [c for c in calls if c == "_linear_scan_bwd_tinner_kernel"]
    assert bool(full) == reg_shift, calls
