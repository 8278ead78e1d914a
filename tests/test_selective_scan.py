"""selective scan (Mamba-1) against the float64 reference: outputs, last states, every gradient,
packed sequences, the decode step, determinism, errors, opcheck and torch.compile."""
import itertools
import os

import pytest
import torch

import ssm_kernels as sk
from ssm_kernels.selective_scan.interface import (selective_scan_bwd_op, selective_scan_fwd_op,
                                                  selective_state_update_op)
from ssm_kernels.selective_scan.reference import selective_state_update_ref
from ssm_kernels.testing import assert_close

from conftest import DEVICE, compile_for_sm90, kernel_backends

BACKENDS = ["reference"] + kernel_backends()
# the scan has a CUDA forward too (real A; its backward is the Triton kernel)
SCAN_BACKENDS = ["reference"] + kernel_backends(with_cuda=True)
SCAN_KERNELS = kernel_backends(with_cuda=True)
GRAD_NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]
LOWP = (torch.float16, torch.bfloat16)


def make_inputs(batch=2, dim=6, L=13, N=5, dtype=torch.float32, cplx=False, bc="var", groups=2,
                D=True, z=True, bias=True, h0=True, device=DEVICE, decay=(0.2, 1.2), dt_scale=0.5):
    """Fresh random inputs; bc in {"const", "var" (batch, N, L), "group" (batch, G, N, L)}."""
    u = torch.randn(batch, dim, L, device=device).to(dtype)
    delta = (torch.randn(batch, dim, L, device=device) * dt_scale).to(dtype)
    A = -(torch.rand(dim, N, device=device) * (decay[1] - decay[0]) + decay[0])
    if cplx:
        A = torch.complex(A, torch.randn(dim, N, device=device))
    Lw = 2 * L if cplx else L
    if bc == "const":
        B = torch.randn(dim, N, device=device, dtype=A.dtype)
        C = torch.randn(dim, N, device=device, dtype=A.dtype)
    else:
        shape = (batch, N, Lw) if bc == "var" else (batch, groups, N, Lw)
        B = torch.randn(shape, device=device).to(dtype)
        C = torch.randn(shape, device=device).to(dtype)
    sd = torch.complex64 if cplx else torch.float32
    return dict(u=u, delta=delta, A=A, B=B, C=C,
                D=torch.randn(dim, device=device) if D else None,
                z=torch.randn(batch, dim, L, device=device).to(dtype) if z else None,
                delta_bias=torch.randn(dim, device=device) * 0.3 if bias else None,
                initial_state=torch.randn(batch, dim, N, device=device, dtype=sd) if h0 else None)


def _hi(x):
    if x is None:
        return None
    if x.is_complex():
        return x.cpu().to(torch.complex128)
    return x.cpu().double() if x.is_floating_point() else x.cpu()


def run(fn, inp, softplus, cot, cu_seqlens=None, **kw):
    """Forward + backward with cotangents cot = (dout, dlast); returns [out, last, grads...]."""
    leaves = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in inp.items()}
    out, last = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"],
                   leaves["D"], leaves["z"], leaves["delta_bias"], softplus, True,
                   initial_state=leaves["initial_state"], cu_seqlens=cu_seqlens, **kw)
    loss = (out * cot[0].to(out.device, out.dtype)).sum() + \
        (last * cot[1].to(last.device, last.dtype).conj()).real.sum()
    names = [k for k in GRAD_NAMES if leaves[k] is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    return dict(out=out, last_state=last, **{f"d{k}": g for k, g in zip(names, grads)})


def _skip_unserved(backend, A):
    if backend == "cuda" and A.is_complex():
        pytest.skip("the CUDA forward is real-only (complex A runs on Triton, tested there)")


def check(backend, inp, softplus=True, cu_seqlens=None):
    u, A = inp["u"], inp["A"]
    _skip_unserved(backend, A)
    nseq = u.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    cot = (torch.randn(u.shape, dtype=torch.float64),
           torch.randn(nseq, u.shape[1], A.shape[1],
                       dtype=torch.complex128 if A.is_complex() else torch.float64))
    out = run(sk.selective_scan_fn, inp, softplus, cot, cu_seqlens, backend=backend)
    ref = run(sk.selective_scan_ref, {k: _hi(v) for k, v in inp.items()}, softplus, cot,
              None if cu_seqlens is None else cu_seqlens.cpu())
    lowp = None
    if u.dtype in LOWP:
        lowp = run(sk.selective_scan_ref, {k: None if v is None else v.cpu() for k, v in inp.items()},
                   softplus, cot, None if cu_seqlens is None else cu_seqlens.cpu())
    for k in ref:
        assert_close(out[k], ref[k], dtype=u.dtype, lowp_ref=None if lowp is None else lowp[k],
                     name=f"{backend} {k}")
    return out


# ---- forward and backward against the float64 reference --------------------------------------

@pytest.mark.parametrize("backend", SCAN_BACKENDS)
@pytest.mark.parametrize("D,z,bias,softplus", list(itertools.product([False, True], repeat=4)))
def test_optional_features(backend, D, z, bias, softplus):
    check(backend, make_inputs(D=D, z=z, bias=bias, h0=D), softplus)


@pytest.mark.parametrize("backend", SCAN_BACKENDS)
@pytest.mark.parametrize("cplx", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("bc", ["const", "var", "group"])
def test_bc_variants_and_complex(backend, cplx, bc):
    check(backend, make_inputs(cplx=cplx, bc=bc, groups=3, dim=6))


@pytest.mark.parametrize("backend", SCAN_BACKENDS)
def test_mixed_const_and_variable_bc(backend):
    inp = make_inputs(bc="group", groups=2)
    inp["B"] = torch.randn(inp["u"].shape[1], inp["A"].shape[1], device=DEVICE)  # B constant
    check(backend, inp)


@pytest.mark.parametrize("backend", SCAN_KERNELS)
@pytest.mark.parametrize("L", [1, 7, 8, 9, 33])
def test_odd_lengths(backend, L):
    check(backend, make_inputs(L=L, N=3, dim=5))


@pytest.mark.parametrize("backend", SCAN_KERNELS)
@pytest.mark.parametrize("N", [1, 16, 17])
def test_dstate_sizes(backend, N):
    check(backend, make_inputs(L=10, N=N, dim=3, batch=1))


@pytest.mark.parametrize("backend", SCAN_KERNELS)
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("cplx", [False, True], ids=["real", "complex"])
def test_low_precision(backend, dtype, cplx):
    check(backend, make_inputs(dtype=dtype, cplx=cplx, L=11))


@pytest.mark.parametrize("backend", SCAN_BACKENDS)
def test_extreme_decays(backend):
    # a = exp(dt A) ~ 0 (state forgotten every step) and ~ 1 (no decay at all)
    check(backend, make_inputs(decay=(20.0, 40.0), dt_scale=2.0))
    check(backend, make_inputs(decay=(0.0, 1e-4), dt_scale=0.1), softplus=False)


@pytest.mark.parametrize("backend", SCAN_BACKENDS)
def test_without_state_or_grad(backend):
    """No initial state, last state not returned, forward under no_grad (no checkpoints saved)."""
    inp = make_inputs(h0=False)
    args = [inp[k] for k in ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]]
    with torch.no_grad():
        out = sk.selective_scan_fn(*args, True, backend=backend)
    ref = sk.selective_scan_ref(*[_hi(a) for a in args], True)
    assert_close(out, ref, dtype=torch.float32)
    check(backend, inp)


@pytest.mark.parametrize("backend", SCAN_KERNELS)
def test_non_contiguous_inputs(backend):
    inp = make_inputs(L=9)
    nc = {k: v if v is None or v.dim() < 2 else v.transpose(-1, -2).contiguous().transpose(-1, -2)
          for k, v in inp.items()}
    assert not nc["u"].is_contiguous()
    out = sk.selective_scan_fn(nc["u"], nc["delta"], nc["A"], nc["B"], nc["C"], nc["D"], nc["z"],
                               nc["delta_bias"], True, backend=backend)
    ref = sk.selective_scan_ref(*[_hi(inp[k]) for k in GRAD_NAMES[:8]], True)
    assert_close(out, ref, dtype=torch.float32)


@pytest.mark.parametrize("cplx", [False, True], ids=["real", "complex"])
def test_chunked_forward_variant(cplx, monkeypatch):
    """The chunked Triton forward (the alternative to the time-sequential default) agrees too."""
    if "triton" not in kernel_backends():
        pytest.skip("no Triton here")
    from ssm_kernels.selective_scan import triton as tk
    monkeypatch.setattr(tk, "FWD_VARIANT", "chunked")
    check("triton", make_inputs(cplx=cplx, bc="group", L=11))
    cu = torch.tensor([0, 4, 13], dtype=torch.int32, device=DEVICE)
    inp = make_inputs(batch=1, L=13, cplx=cplx)
    inp["initial_state"] = inp["initial_state"].expand(2, -1, -1).contiguous()
    check("triton", inp, cu_seqlens=cu)


# ---- packed variable-length sequences ----------------------------------------------------------

@pytest.mark.parametrize("backend", SCAN_BACKENDS)
@pytest.mark.parametrize("cplx", [False, True], ids=["real", "complex"])
def test_varlen_against_reference(backend, cplx):
    cu = torch.tensor([0, 5, 6, 17, 20], dtype=torch.int32, device=DEVICE)
    inp = make_inputs(batch=1, L=20, cplx=cplx, bc="group", groups=2)
    inp["initial_state"] = torch.randn(4, *inp["initial_state"].shape[1:], device=DEVICE,
                                       dtype=inp["initial_state"].dtype)
    check(backend, inp, cu_seqlens=cu)


@pytest.mark.parametrize("backend", SCAN_KERNELS)
def test_varlen_against_loop_over_sequences(backend):
    bounds = [0, 9, 10, 19]
    cu = torch.tensor(bounds, dtype=torch.int64, device=DEVICE)
    inp = make_inputs(batch=1, L=19, bc="var")
    h0 = torch.randn(3, 6, 5, device=DEVICE)
    args = [inp[k] for k in GRAD_NAMES[:8]]
    out, last = sk.selective_scan_fn(*args, True, True, initial_state=h0, cu_seqlens=cu,
                                     backend=backend)
    for s in range(3):
        lo, hi = bounds[s], bounds[s + 1]
        sl = [a if a is None or a.dim() < 3 else a[..., lo:hi] for a in args]
        o, l_ = sk.selective_scan_fn(*sl, True, True, initial_state=h0[s:s + 1], backend=backend)
        torch.testing.assert_close(out[..., lo:hi], o, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(last[s:s + 1], l_, rtol=1e-5, atol=1e-5)


# ---- the decode step -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_step_reproduces_scan(backend, state_dtype):
    inp = make_inputs(L=9, bc="var")
    u, delta, A, B, C, D, z, bias, h0 = (inp[k] for k in GRAD_NAMES)
    out, last = sk.selective_scan_ref(*[_hi(inp[k]) for k in GRAD_NAMES[:8]], True, True,
                                      initial_state=_hi(h0))
    state = h0.clone().to(state_dtype)
    ys = [sk.selective_state_update(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D,
                                    z[..., t], bias, True, backend=backend) for t in range(9)]
    tol = 1e-5 if state_dtype == torch.float32 else 3e-2
    assert torch.linalg.vector_norm(torch.stack(ys, -1).cpu().double() - out) <= tol * torch.linalg.vector_norm(out)
    assert torch.linalg.vector_norm(state.cpu().double() - last) <= tol * torch.linalg.vector_norm(last)


def _headed_inputs(batch=3, H=4, P=5, N=6, G=2, dtype=torch.float32, broadcast=True):
    dev = DEVICE
    if broadcast:  # Mamba-2: one A per head, dt per head, broadcast with stride 0
        A = (-torch.rand(H, device=dev) - 0.1)[:, None, None].expand(H, P, N)
        dt = torch.randn(batch, H, device=dev)[:, :, None].expand(batch, H, P).to(dtype)
        dt_bias = torch.randn(H, device=dev)[:, None].expand(H, P)
        D = torch.randn(H, device=dev)[:, None].expand(H, P)
    else:
        A = -torch.rand(H, P, N, device=dev) - 0.1
        dt = torch.randn(batch, H, P, device=dev).to(dtype)
        dt_bias = torch.randn(H, P, device=dev)
        D = torch.randn(H, P, device=dev)
    return dict(state=torch.randn(batch, H, P, N, device=dev).to(dtype),
                x=torch.randn(batch, H, P, device=dev).to(dtype), dt=dt, A=A,
                B=torch.randn(batch, G, N, device=dev).to(dtype),
                C=torch.randn(batch, G, N, device=dev).to(dtype), D=D,
                z=torch.randn(batch, H, P, device=dev).to(dtype), dt_bias=dt_bias)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("broadcast", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_headed_matches_reference(backend, broadcast, dtype):
    inp = _headed_inputs(dtype=dtype, broadcast=broadcast)
    ref_state = inp["state"].cpu().double()
    ref = selective_state_update_ref(ref_state, *[_hi(inp[k]) for k in ["x", "dt", "A", "B", "C", "D", "z", "dt_bias"]],
                                     dt_softplus=True)
    state = inp["state"].clone()
    out = sk.selective_state_update(state, inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"],
                                    inp["D"], inp["z"], inp["dt_bias"], True, backend=backend)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.linalg.vector_norm(out.cpu().double() - ref) <= tol * torch.linalg.vector_norm(ref)
    assert torch.linalg.vector_norm(state.cpu().double() - ref_state) <= tol * torch.linalg.vector_norm(ref_state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_state_batch_indices(backend):
    inp = _headed_inputs(batch=3)
    pool = torch.randn(5, *inp["state"].shape[1:], device=DEVICE)
    idx = torch.tensor([4, -1, 1], device=DEVICE, dtype=torch.int32)
    args = [inp[k] for k in ["x", "dt", "A", "B", "C", "D", "z", "dt_bias"]]
    p1 = pool.clone()
    out = sk.selective_state_update(p1, *args, True, idx, backend=backend)
    for b, row in enumerate([4, -1, 1]):
        if row < 0:
            assert (out[b] == 0).all()
            continue
        st = pool[row:row + 1].clone()
        o = sk.selective_state_update(st, *[a[b:b + 1] if a.shape[0] == 3 else a for a in args],
                                      True, backend=backend)
        torch.testing.assert_close(out[b:b + 1], o, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p1[row:row + 1], st, rtol=1e-5, atol=1e-5)
    for row in (0, 2, 3):  # untouched rows
        assert torch.equal(p1[row], pool[row])


# ---- determinism, auto, opcheck, compile --------------------------------------------------------

@pytest.mark.parametrize("backend", SCAN_KERNELS)
def test_backward_is_deterministic(backend):
    inp = make_inputs(bc="group", groups=2)
    cot = (torch.randn(inp["u"].shape, dtype=torch.float64), torch.randn(2, 6, 5, dtype=torch.float64))
    g1 = run(sk.selective_scan_fn, inp, True, cot, backend=backend)
    g2 = run(sk.selective_scan_fn, inp, True, cot, backend=backend)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


def test_auto_takes_reference_for_float64():
    inp = {k: _hi(v) for k, v in make_inputs(device="cpu").items()}
    out = sk.selective_scan_fn(*[inp[k] for k in GRAD_NAMES[:8]], True)
    assert out.dtype == torch.float64
    assert_close(out, sk.selective_scan_ref(*[inp[k] for k in GRAD_NAMES[:8]], True), dtype=torch.float64)


@pytest.mark.parametrize("backend", SCAN_BACKENDS)
def test_opcheck(backend):
    inp = make_inputs(L=6, N=3, dim=4)
    args = (inp["u"], inp["delta"], inp["A"], inp["B"].unsqueeze(1), inp["C"].unsqueeze(1),
            inp["D"], inp["z"], inp["delta_bias"], inp["initial_state"], None, True, True, backend)
    leaves = [a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
              for a in args]
    torch.library.opcheck(selective_scan_fwd_op.op, leaves)
    out, last, ck = selective_scan_fwd_op(*args)
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    bargs = (*plain[:10], ck.detach(), torch.randn_like(out), torch.randn_like(last), True, backend)
    torch.library.opcheck(selective_scan_bwd_op.op, bargs)
    h = _headed_inputs()
    step_backend = "triton" if backend == "cuda" else backend  # the decode step has no CUDA kernel
    torch.library.opcheck(selective_state_update_op.op,
                          (h["state"], h["x"], h["dt"], h["A"], h["B"], h["C"], h["D"], h["z"],
                           h["dt_bias"], True, None, step_backend))


def _compile_check(backend, device):
    torch._dynamo.reset()
    inp = make_inputs(L=7, N=3, dim=4, device=device)
    args = [inp[k] for k in GRAD_NAMES[:8]]

    def f(u, delta, A, B, C, D, z, bias, h0):
        out, last = sk.selective_scan_fn(u, delta, A, B, C, D, z, bias, True, True,
                                         initial_state=h0, backend=backend)
        return out.sum() + last.square().sum()

    leaves = [a.detach().clone().requires_grad_() for a in args + [inp["initial_state"]]]
    loss = torch.compile(f, fullgraph=True)(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    leaves2 = [a.detach().clone().requires_grad_() for a in leaves]
    loss2 = f(*leaves2)
    grads2 = torch.autograd.grad(loss2, leaves2)
    torch.testing.assert_close(loss, loss2)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b)


def test_compile_fullgraph_reference():
    _compile_check("reference", "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", SCAN_KERNELS)
def test_compile_fullgraph_kernels(backend):
    _compile_check(backend, DEVICE)


# ---- bad input ------------------------------------------------------------------------------------

def test_errors_name_the_argument():
    inp = make_inputs(device="cpu")
    u, delta, A, B, C, D, z, bias, h0 = (inp[k] for k in GRAD_NAMES)
    f = sk.selective_scan_fn
    with pytest.raises(ValueError, match="u must have rank 3"):
        f(u[0], delta, A, B, C)
    with pytest.raises(ValueError, match="delta must have shape"):
        f(u, delta[..., :3], A, B, C)
    with pytest.raises(TypeError, match="delta must have u's dtype"):
        f(u, delta.half(), A, B, C)
    with pytest.raises(ValueError, match="A must have shape"):
        f(u, delta, A[:3], B, C)
    with pytest.raises(TypeError, match="A must be float32 or complex64"):
        f(u, delta, A.half(), B, C)
    with pytest.raises(ValueError, match="dstate"):
        f(u, delta, torch.zeros(6, 257), torch.zeros(2, 257, 13), torch.zeros(2, 257, 13))
    with pytest.raises(ValueError, match="divisible by the groups of B"):
        f(u, delta, A, torch.randn(2, 4, 5, 13), torch.randn(2, 4, 5, 13))
    with pytest.raises(ValueError, match="time-varying B must have shape"):
        f(u, delta, A, B[..., :5], C)
    with pytest.raises(TypeError, match="time-varying C must have u's dtype"):
        f(u, delta, A, B, C.double())
    with pytest.raises(TypeError, match="time-invariant B must have A's dtype"):
        f(u, delta, A, torch.randn(6, 5, dtype=torch.float16), C)
    with pytest.raises(ValueError, match="D must have shape"):
        f(u, delta, A, B, C, D[:2])
    with pytest.raises(TypeError, match="delta_bias must be float32"):
        f(u, delta, A, B, C, D, z, bias.half())
    with pytest.raises(ValueError, match="z must have shape"):
        f(u, delta, A, B, C, D, z[:1])
    with pytest.raises(ValueError, match="initial_state must have shape"):
        f(u, delta, A, B, C, initial_state=h0[:1])
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        f(u, delta, A, 3.0, C)
    with pytest.raises(ValueError, match="backend must be one of"):
        f(u, delta, A, B, C, backend="fast")
    with pytest.raises(sk.BackendUnavailableError, match="cuda"):
        f(u, delta, A, B, C, backend="cuda")
    u1, d1, B1, C1 = u[:1], delta[:1], B[:1], C[:1]
    with pytest.raises(ValueError, match="batch must be 1"):
        f(u, delta, A, B, C, cu_seqlens=torch.tensor([0, 13]))
    with pytest.raises(ValueError, match="strictly increasing"):
        f(u1, d1, A, B1, C1, cu_seqlens=torch.tensor([0, 7, 7, 13]))
    with pytest.raises(ValueError, match="end at seqlen"):
        f(u1, d1, A, B1, C1, cu_seqlens=torch.tensor([0, 7, 12]))
    with pytest.raises(TypeError, match="cu_seqlens must be int32 or int64"):
        f(u1, d1, A, B1, C1, cu_seqlens=torch.tensor([0.0, 13.0]))


def test_step_errors_name_the_argument():
    h = _headed_inputs()
    args = [h[k].cpu() for k in ["state", "x", "dt", "A", "B", "C"]]
    g = sk.selective_state_update
    with pytest.raises(ValueError, match="state must be"):
        g(args[0][0, 0], *args[1:])
    with pytest.raises(ValueError, match="x must have shape"):
        g(args[0], args[1][:, :2], *args[2:])
    with pytest.raises(ValueError, match="A must have shape"):
        g(*args[:3], args[3][:2], *args[4:])
    with pytest.raises(ValueError, match="nheads 4 must be divisible by ngroups 3"):
        g(*args[:4], torch.randn(3, 3, 6), torch.randn(3, 3, 6))
    with pytest.raises(ValueError, match="C must have B's shape"):
        g(*args[:5], args[5][:, :1])
    with pytest.raises(TypeError, match="A must be float32"):
        g(*args[:3], args[3].to(torch.complex64), *args[4:])


@pytest.mark.skipif(DEVICE == "cpu", reason="needs two devices")
def test_device_mismatch():
    inp = make_inputs()
    with pytest.raises(ValueError, match="one device"):
        sk.selective_scan_fn(inp["u"], inp["delta"].cpu(), inp["A"], inp["B"], inp["C"])


# ---- real sizes on the GPU -------------------------------------------------------------------------

def check_fast(backend, inp, softplus=True, cu_seqlens=None):
    """check() with the float64 reference on the GPU (the CPU loop is too slow at real sizes)."""
    u, A = inp["u"], inp["A"]
    _skip_unserved(backend, A)
    nseq = u.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    cot = (torch.randn(u.shape, dtype=torch.float64, device=DEVICE),
           torch.randn(nseq, u.shape[1], A.shape[1], device=DEVICE,
                       dtype=torch.complex128 if A.is_complex() else torch.float64))
    hi = lambda x: None if x is None else x.to(torch.complex128 if x.is_complex() else torch.float64)  # noqa: E731
    out = run(sk.selective_scan_fn, inp, softplus, cot, cu_seqlens, backend=backend)
    ref = run(sk.selective_scan_ref, {k: hi(v) for k, v in inp.items()}, softplus, cot, cu_seqlens)
    lowp = run(sk.selective_scan_ref, inp, softplus, cot, cu_seqlens) if u.dtype in LOWP else None
    for k in ref:
        assert_close(out[k], ref[k], dtype=u.dtype, lowp_ref=None if lowp is None else lowp[k],
                     name=f"{backend} {k}")


# (the float64 reference is a Python loop over time: GPU cases are chosen to keep the whole file
# within a couple of minutes)
@pytest.mark.gpu
@pytest.mark.parametrize("backend", SCAN_KERNELS)
@pytest.mark.parametrize("L", [1, 7, 127, 129, 2049, 4097])
def test_gpu_lengths(backend, L):
    check_fast(backend, make_inputs(batch=2, dim=64, L=L, N=16, bc="group", groups=2))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", SCAN_KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_low_precision(backend, dtype):
    check_fast(backend, make_inputs(batch=2, dim=64, L=2049, N=16, dtype=dtype, bc="var"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", SCAN_KERNELS)
@pytest.mark.parametrize("cplx", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("bc", ["const", "group"])
@pytest.mark.parametrize("N", [16, 64, 256])
def test_gpu_variants(backend, cplx, bc, N):
    check_fast(backend, make_inputs(batch=2, dim=48, L=300, N=N, cplx=cplx, bc=bc, groups=3))


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["chunked", "sequential"])
@pytest.mark.parametrize("cplx", [False, True], ids=["real", "complex"])
def test_gpu_forward_variants(variant, cplx, monkeypatch):
    from ssm_kernels.selective_scan import triton as tk
    monkeypatch.setattr(tk, "FWD_VARIANT", variant)
    check_fast("triton", make_inputs(batch=2, dim=96, L=1000, N=16, dtype=torch.bfloat16,
                                     cplx=cplx, bc="group", groups=3))


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [2, 3, 4])
@pytest.mark.parametrize("case", ["bf16 L=2049", "fp32 L=4097 no z", "bf16 varlen"])
def test_gpu_cuda_backward_variants_bitwise(variant, case):
    """The CUDA backward's variants 2, 3 and 4 (N <= 16, B and C time-varying; selective_scan_bwd.cu
    kIO) compute every value with variant 0's expressions: all outputs and gradients bitwise equal
    (these cases are unaligned: variant 4 runs its RowStager fallback here; aligned in
    test_gpu_cuda_forward_backward_variants)."""
    from ssm_kernels._backend import cuda_extension
    ext = cuda_extension()
    if "cuda" not in SCAN_KERNELS or ext is None or not hasattr(ext, "selective_scan_bwd_variant"):
        pytest.skip("needs the CUDA extension with backward variants")
    cu = None
    if case == "bf16 L=2049":
        inp = make_inputs(batch=2, dim=80, L=2049, N=16, dtype=torch.bfloat16, bc="var")
    elif case == "fp32 L=4097 no z":
        inp = make_inputs(batch=2, dim=40, L=4097, N=13, bc="group", groups=2, z=False)
    else:
        cu = torch.tensor([0, 1, 700, 2049, 3000], dtype=torch.int32, device=DEVICE)
        inp = make_inputs(batch=1, dim=72, L=3000, N=16, dtype=torch.bfloat16, bc="group", groups=2)
        inp["initial_state"] = torch.randn(4, 72, 16, device=DEVICE)
    nseq = inp["u"].shape[0] if cu is None else 4
    cot = (torch.randn(inp["u"].shape, device=DEVICE),
           torch.randn(nseq, inp["u"].shape[1], inp["A"].shape[1], device=DEVICE))
    prev = ext.selective_scan_bwd_variant(0)
    try:
        base = run(sk.selective_scan_fn, inp, True, cot, cu, backend="cuda")
        assert ext.selective_scan_bwd_variant(variant) == 0
        assert ext.selective_scan_bwd_variant(variant) == variant
        got = run(sk.selective_scan_fn, inp, True, cot, cu, backend="cuda")
    finally:
        ext.selective_scan_bwd_variant(prev)
    assert set(got) == set(base)
    for k in base:
        assert torch.equal(got[k], base[k]), k


@pytest.mark.gpu
@pytest.mark.parametrize("backend", SCAN_KERNELS)
def test_gpu_varlen(backend):
    cu = torch.tensor([0, 1, 700, 2049, 3000], dtype=torch.int32, device=DEVICE)
    inp = make_inputs(batch=1, dim=64, L=3000, N=16, bc="group", groups=2)
    inp["initial_state"] = torch.randn(4, 64, 16, device=DEVICE)
    check_fast(backend, inp, cu_seqlens=cu)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", SCAN_KERNELS)
def test_gpu_deterministic_real_size(backend):
    inp = make_inputs(batch=2, dim=1536, L=2048, N=16, dtype=torch.bfloat16, bc="var")
    cot = (torch.randn(inp["u"].shape, device=DEVICE), torch.randn(2, 1536, 16, device=DEVICE))
    g1 = run(sk.selective_scan_fn, inp, True, cot, backend=backend)
    g2 = run(sk.selective_scan_fn, inp, True, cot, backend=backend)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


@pytest.mark.gpu
@pytest.mark.parametrize("backend", SCAN_KERNELS)
def test_gpu_long_sequence(backend):
    """seqlen 2^20 with one channel group: constant dt, so the state has a closed form checked at
    the end (a geometric series)."""
    L, dim, N = 1 << 20, 8, 4
    u = torch.ones(1, dim, L, device=DEVICE)
    delta = torch.full((1, dim, L), 0.01, device=DEVICE)
    A = -torch.rand(dim, N, device=DEVICE) - 0.5
    B = torch.ones(1, N, L, device=DEVICE)
    C = torch.ones(1, N, L, device=DEVICE)
    out, last = sk.selective_scan_fn(u, delta, A, B, C, return_last_state=True, backend=backend)
    a = torch.exp(0.01 * A.double())
    fixed = 0.01 / (1 - a)  # h = a h + 0.01 converges to 0.01 / (1 - a)
    torch.testing.assert_close(last.double(), fixed[None], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out[0, :, -1].double(), fixed.sum(-1), rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
def test_gpu_past_int32_offsets():
    """batch * dim * seqlen > 2^31 elements (time-varying B/C of one group)."""
    if torch.cuda.get_device_properties(0).total_memory < 60 * 2**30:
        pytest.skip("needs 60 GiB")
    batch, dim, L, N = 2, 1024, (1 << 20) + 3, 4
    u = torch.ones(batch, dim, L, device=DEVICE, dtype=torch.bfloat16)
    delta = torch.full_like(u, 0.5)
    A = -torch.ones(dim, N, device=DEVICE)
    B = torch.ones(batch, N, L, device=DEVICE, dtype=torch.bfloat16)
    C = torch.ones_like(B)
    for backend in SCAN_KERNELS:
        out, last = sk.selective_scan_fn(u, delta, A, B, C, return_last_state=True, backend=backend)
        fixed = 0.5 / (1 - torch.exp(torch.tensor(-0.5)))
        assert abs(last[-1, -1, -1].item() - fixed.item()) < 1e-4
        assert abs(out[-1, -1, -1].float().item() - N * fixed.item()) < 0.05
        del out, last


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [64, 256])
def test_gpu_step_real_size(batch):
    h = _headed_inputs(batch=batch, H=64, P=64, N=16, G=1, dtype=torch.bfloat16)
    ref_state = h["state"].double()
    ref = selective_state_update_ref(ref_state, *[h[k].double() for k in ["x", "dt", "A", "B", "C", "D", "z", "dt_bias"]],
                                     dt_softplus=True)
    state = h["state"].clone()
    out = sk.selective_state_update(state, h["x"], h["dt"], h["A"], h["B"], h["C"], h["D"], h["z"],
                                    h["dt_bias"], True, backend="triton")
    assert torch.linalg.vector_norm(out.double() - ref) <= 2e-2 * torch.linalg.vector_norm(ref)


# ---- the GPU compiler (no GPU needed) ---------------------------------------------------------------

_COMPILE_SCRIPT = r'''
import os, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
import ssm_kernels.selective_scan.triton as K

def build(fn, types, consts, warps):
    sig = {n: ("constexpr" if n in consts else types(n)) for n in fn.arg_names}
    triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": warps})

def types(n):
    if n.startswith("s_"):
        return "i64"
    if n.endswith("_ptr"):
        return "*i32" if n in ("cu_ptr", "ckoff_ptr", "idx_ptr") else "*fp32"
    return "i32"

c = K._bwd_config(16, 1536)
flags = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, VAR_B=True, VAR_C=True,
             COMPLEX=False, VARLEN=True)
tiles = dict(BLOCK_D=c["BLOCK_D"], BLOCK_N=16, BLOCK_T=c["BLOCK_T"])
build(K._bwd_kernel, types, dict(flags, NSUB=c["NSUB"], **tiles), c["num_warps"])
build(K._fwd_chunked_kernel, types, dict(flags, HAS_H0=True, SAVE_CK=True, **tiles), c["num_warps"])
build(K._fwd_kernel, types, dict(flags, HAS_H0=True, SAVE_CK=True, BLOCK_D=32, BLOCK_N=16), 4)
for tied in (False, True):
    build(K._state_update_kernel, types, dict(SOFTPLUS=True, HAS_BIAS=True, HAS_D=True, HAS_Z=True,
                                              HAS_IDX=True, TIED=tied, BLOCK_P=32, BLOCK_N=16), 4)
print("compiled")
'''


def test_triton_kernels_compile_for_sm90():
    """The interpreter does not run the GPU compiler: build PTX and cubin for sm_90 here (a fresh
    process, since TRITON_INTERPRET is read when kernels are decorated)."""
    res = compile_for_sm90(_COMPILE_SCRIPT)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]


try:  # a tiny kernel over the backward's combine function (module level: Triton resolves globals)
    import triton
    import triton.language as tl

    from ssm_kernels.selective_scan.triton import _combine

    @triton.jit
    def _reverse_scan_kernel(a_ptr, b_ptr, ob_ptr, T: tl.constexpr):
        o = tl.arange(0, T)
        ra, rb = tl.associative_scan((tl.load(a_ptr + o), tl.load(b_ptr + o)), 0, _combine,
                                     reverse=True)
        tl.store(ob_ptr + o, rb)
except ImportError:  # no Triton: the test below skips
    _reverse_scan_kernel = None


def test_reverse_associative_scan_order():
    """The backward's adjoint relies on tl.associative_scan(reverse=True) calling combine(acc, cur)
    with acc the already-scanned later elements (as for forward scans). A direct check, so a
    different lowering shows up here rather than as wrong gradients."""
    if "triton" not in kernel_backends():
        pytest.skip("no Triton here")
    T = 32
    a = torch.rand(T, device=DEVICE) + 0.5
    b = torch.randn(T, device=DEVICE)
    ob = torch.empty_like(b)
    _reverse_scan_kernel[(1,)](a, b, ob, T=T)
    # g[t] = b[t] + a[t] * g[t+1] (g[T] = 0): the recurrence the adjoint runs
    g, want = torch.zeros((), dtype=torch.float64), torch.empty(T, dtype=torch.float64)
    for t in range(T - 1, -1, -1):
        g = b[t].double().cpu() + a[t].double().cpu() * g
        want[t] = g
    torch.testing.assert_close(ob.cpu().double(), want, rtol=1e-5, atol=1e-5)


# ---- the CUDA forward's FMA-pipe exp2 (SSM_KERNELS_SSCAN_FWD_POLY) ---------------------------------

def _ex2_poly_model():
    """sscan::ex2_poly (csrc/selective_scan/sscan_common.cuh) replayed in float32 with numpy, its
    constants parsed from the header (so this checks the coefficients the kernel is built with)."""
    import os
    import re
    import numpy as np
    src = open(os.path.join(os.path.dirname(__file__), "..", "csrc", "selective_scan",
                            "sscan_common.cuh")).read()
    magic = np.float32(float(re.search(r"kEx2Magic = ([0-9.]+)f", src).group(1)))
    coef = {int(k): np.float32(float.fromhex(v))
            for k, v in re.findall(r"kEx2P(\d) = (0x[0-9a-fA-Fp.+-]+)f", src)}
    assert sorted(coef) == [1, 2, 3, 4, 5]
    f32 = np.float32

    def fma(a, b, c):  # exact product of two float32 in float64, one rounding to float32
        return (a.astype(np.float64) * b + c).astype(f32)

    def ex2_poly(x):
        x = np.asarray(x, dtype=f32)
        with np.errstate(invalid="ignore"):
            xc = np.where(np.isnan(x) | (x < -127), f32(-127), x).astype(f32)  # fmaxf: NaN -> -127
        jb = (xc + magic).astype(f32)
        f = (xc - (jb - magic).astype(f32)).astype(f32)
        q = fma(np.full_like(f, coef[5]), f, coef[4])
        for k in (3, 2, 1):
            q = fma(q, f, coef[k])
        p = fma(q, f, f32(1))
        scale = ((jb.view(np.uint32) << np.uint32(23)) & np.uint32(0xFFFFFFFF)).view(f32)
        r = (p * scale).astype(f32)
        return np.where(np.abs(r) < f32(2.0 ** -126), f32(0), r)  # ftz

    return ex2_poly


def test_ex2_poly_model_accuracy_and_edges():
    import numpy as np
    ex2_poly = _ex2_poly_model()
    x = np.concatenate([np.linspace(-126, 127, 2_000_001, dtype=np.float32),
                        np.float32(-1) * np.logspace(-30, 2, 20001, dtype=np.float32),
                        np.logspace(-30, 2, 20001, dtype=np.float32)])
    x = x[x < 127.4]
    got = ex2_poly(x).astype(np.float64)
    want = np.exp2(x.astype(np.float64))
    rel = np.abs(got / want - 1)
    assert rel.max() < 3e-7, rel.max()  # ex2.approx.f32: ~2 ulp = 2.4e-7
    assert ex2_poly(np.float32(0)) == np.float32(1)  # padding steps (dt = 0) keep h bitwise
    assert ex2_poly(np.float32(-0.0)) == np.float32(1)
    # very negative, -inf and NaN give exactly 0 (no NaN, no denormal)
    tiny = ex2_poly(np.array([-126.6, -127, -127.5, -200, -1e30, -np.inf, np.nan], np.float32))
    assert np.all(tiny == 0), tiny
    xe = np.float32(-125.9)  # j = -126: the smallest normal scale
    edge = ex2_poly(xe)
    assert edge > 0 and abs(float(edge) / 2.0 ** float(xe) - 1) < 3e-7


@pytest.mark.gpu
@pytest.mark.parametrize("poly", [1, 4, 16])
@pytest.mark.parametrize("case", ["bf16 L=2049", "fp32 L=4097 no z", "bf16 varlen", "fp32 extreme"])
def test_gpu_cuda_forward_poly(poly, case):
    """SSM_KERNELS_SSCAN_FWD_POLY=R (1/R of the N <= 16 forward's decays by sscan::ex2_poly):
    float64-checked like the default, deterministic, and off again after the knob is reset."""
    from ssm_kernels._backend import cuda_extension
    ext = cuda_extension()
    if "cuda" not in SCAN_KERNELS or ext is None or not hasattr(ext, "selective_scan_fwd_poly"):
        pytest.skip("needs the CUDA extension with selective_scan_fwd_poly")
    cu = None
    if case == "bf16 L=2049":
        inp = make_inputs(batch=2, dim=80, L=2049, N=16, dtype=torch.bfloat16, bc="var")
    elif case == "fp32 L=4097 no z":
        inp = make_inputs(batch=2, dim=40, L=4097, N=13, bc="group", groups=2, z=False)
    elif case == "fp32 extreme":  # dt A down to ~ -300 (exp2 argument ~ -430): decays of exactly 0
        inp = make_inputs(batch=2, dim=24, L=333, N=16, bc="var", decay=(20.0, 40.0), dt_scale=2.0)
    else:
        cu = torch.tensor([0, 1, 700, 2049, 3000], dtype=torch.int32, device=DEVICE)
        inp = make_inputs(batch=1, dim=72, L=3000, N=16, dtype=torch.bfloat16, bc="group", groups=2)
        inp["initial_state"] = torch.randn(4, 72, 16, device=DEVICE)
    prev = ext.selective_scan_fwd_poly(0)
    try:
        assert ext.selective_scan_fwd_poly(poly) == 0
        assert ext.selective_scan_fwd_poly(poly) == poly
        check_fast("cuda", inp, cu_seqlens=cu)
        args = (inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["D"], inp["z"],
                inp["delta_bias"])
        kw = dict(initial_state=inp["initial_state"], cu_seqlens=cu, backend="cuda")
        a = sk.selective_scan_fn(*args, True, True, **kw)
        b = sk.selective_scan_fn(*args, True, True, **kw)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    finally:
        ext.selective_scan_fwd_poly(prev)


# ---- forward variants 1-4 / backward variant 4 (issue 9, session 7): models of the index math ----

def _rs_lanes_model(v, kw):
    """sscan::reduce_scatter_lanes<kW, 1, kI> (sscan_common.cuh rs_round) over kW lanes in float32:
    v[c] is lane c's list of kI partials; returns each lane's kept items (kI >= kW)."""
    import numpy as np
    v = [list(np.asarray(x, np.float32)) for x in v]
    cnt, m = len(v[0]), kw // 2
    while m >= 1 and cnt >= 2:
        half = cnt // 2
        send = [[(x[i] if (c & m) else x[i + half]) for i in range(half)] for c, x in enumerate(v)]
        v = [[np.float32((x[i + half] if (c & m) else x[i]) + send[c ^ m][i]) for i in range(half)]
             for c, x in enumerate(v)]
        cnt, m = half, m // 2
    return v


@pytest.mark.parametrize("kog", [8, 32])
def test_sscan_fwd_output_groups_bitwise_model(kog):
    """kOG > kTPC (forward variants 2-4): y reduce-scattered over kOG steps leaves lane c with steps
    c kOG/4 .. + kOG/4 - 1, and each sum is bitwise the one variant 0 forms per 4 steps
    (reduce_scatter<4>: lane t % 4 owns step t) -- the same pairwise adds with operands exchanged."""
    import numpy as np
    rng = np.random.default_rng(kog)
    kw = 4
    for _ in range(50):
        # lane partials of y_t for 32 steps, wide dynamic range so that rounding differs by order
        p = (rng.standard_normal((kw, 32)) * 10.0 ** rng.integers(-6, 7, (kw, 32))).astype(np.float32)
        v0 = {}
        for tg in range(0, 32, kw):
            kept = _rs_lanes_model([p[c, tg:tg + kw] for c in range(kw)], kw)
            for c in range(kw):
                assert len(kept[c]) == 1
                v0[tg + c] = kept[c][0]
        vn = {}
        per = kog // kw
        for tg in range(0, 32, kog):
            kept = _rs_lanes_model([p[c, tg:tg + kog] for c in range(kw)], kw)
            for c in range(kw):
                assert len(kept[c]) == per
                for i in range(per):
                    vn[tg + c * per + i] = kept[c][i]
        assert sorted(vn) == list(range(32))
        assert all(np.float32(vn[t]).tobytes() == np.float32(v0[t]).tobytes() for t in range(32))
        # and it is the pairwise sum (p_c + p_c^2) + (p_c^1 + p_c^3) of some owner c
        t = int(rng.integers(32))
        s = (p[0, t] + p[2, t]) + (p[1, t] + p[3, t])
        assert np.float32(s) == v0[t]


def _stager_copies(mode, kRows, kThr, kRowEl, kChunk, esize, length, ok_rows):
    """(dst element, src element offset within the row's window, bytes) of each 16-byte cp.async of
    RowStager (aligned rows, shift 0), PieceStager (init + issue) or PieceStager::issue_direct for
    one chunk of `length` steps; rows not in ok_rows are skipped."""
    kV = 16 // esize
    kP = kChunk // kV
    out = set()
    if mode == "rows":
        for tid in range(kThr):
            for row in range(tid, kRows, kThr):
                if row not in ok_rows:
                    continue
                for j in range(kRowEl // kV):
                    valid = length - j * kV
                    if valid <= 0:
                        break
                    out.add((row, j * kV, min(valid, kV) * esize))
    elif mode == "pieces":
        for tid in range(kThr):
            for k in range(-(-kRows * kP // kThr)):
                q = tid + k * kThr
                if q >= kRows * kP:
                    continue
                row, piece = q // kP, q % kP
                valid = length - piece * kV
                if row in ok_rows and valid > 0:
                    out.add((row, piece * kV, min(valid, kV) * esize))
    else:  # issue_direct
        assert kThr % kP == 0
        kRS = kThr // kP
        assert kRows % kRS == 0
        for tid in range(kThr):
            r0, piece = tid // kP, tid % kP
            valid = length - piece * kV
            if valid <= 0:
                continue
            for k in range(kRows // kRS):
                row = k * kRS + r0
                if row in ok_rows:
                    out.add((row, piece * kV, min(valid, kV) * esize))
    return out


@pytest.mark.parametrize("cfg", ["fwd bf16", "fwd fp32", "bwd bf16", "bwd fp32"])
def test_sscan_piece_stager_model(cfg):
    """PieceStager (forward variants 1-3: init + issue; backward variant 4: issue_direct) copies
    exactly RowStager's bytes into the same raw slots for aligned rows, full and partial chunks,
    with skipped rows (no z, padded states, partial channel tiles); each warp-wide copy covers
    whole row windows (kP consecutive lanes per row)."""
    esize = 2 if "bf16" in cfg else 4
    kV = 16 // esize
    if cfg.startswith("fwd"):
        kD, kNP, kChunk, kThr = 32, 16, 32, 128
        kRows = 3 * kD + 2 * kNP
        modes = ["pieces"]
    else:
        kD, kNP, kChunk, kThr = 32, 16, 64, 128
        kRows = 4 * kD + 2 * kNP
        modes = ["pieces", "direct"]
    kRowEl = kChunk + kV
    nz = 2 * kD  # the z rows' block (u, delta, z[, dout], B, C)
    ok_sets = {
        "all": set(range(kRows)),
        "no z, 20 channels, N=13": {r for r in range(kRows)
                                     if (r < (3 if cfg.startswith("fwd") else 4) * kD
                                         and r % kD < 20 and not nz <= r < nz + kD)
                                     or (r >= kRows - 2 * kNP and (r - (kRows - 2 * kNP)) % kNP < 13)},
    }
    for length in (1, 7, kV, kV + 1, kChunk // 2 + 3, kChunk - 1, kChunk):
        for okn, ok in ok_sets.items():
            ref = _stager_copies("rows", kRows, kThr, kRowEl, kChunk, esize, length, ok)
            for mode in modes:
                got = _stager_copies(mode, kRows, kThr, kRowEl, kChunk, esize, length, ok)
                assert got == ref, (cfg, mode, length, okn)
    # coalescing: lanes 0..31 of a warp copy kP consecutive pieces of 32 / kP rows
    kP = kChunk // kV
    rows_per_warp = {(l // kP) for l in range(32)}
    assert len(rows_per_warp) == 32 // kP


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["bf16 L=2048", "bf16 L=2049", "fp32 L=4096 no z", "bf16 varlen"])
def test_gpu_cuda_forward_backward_variants(case):
    """Forward variants 1-10 (SSM_KERNELS_SSCAN_FWD_VARIANT; 6-10: session 8) bitwise equal to forward 0
    (out, last state, checkpoints); backward variants 4-9 bitwise equal to 2; knobs restored."""
    from ssm_kernels._backend import cuda_extension
    from ssm_kernels.selective_scan import cuda as sc
    ext = cuda_extension()
    if "cuda" not in SCAN_KERNELS or ext is None or not hasattr(ext, "selective_scan_fwd_variant"):
        pytest.skip("needs the CUDA extension with selective_scan_fwd_variant")
    cu = None
    if case == "bf16 L=2048":
        inp = make_inputs(batch=2, dim=80, L=2048, N=16, dtype=torch.bfloat16, bc="var")
    elif case == "bf16 L=2049":
        inp = make_inputs(batch=2, dim=80, L=2049, N=16, dtype=torch.bfloat16, bc="var")
    elif case == "fp32 L=4096 no z":
        inp = make_inputs(batch=2, dim=40, L=4096, N=13, bc="var", z=False)
    else:
        cu = torch.tensor([0, 8, 1024, 2048], dtype=torch.int32, device=DEVICE)
        inp = make_inputs(batch=1, dim=72, L=2048, N=16, dtype=torch.bfloat16, bc="var")
        inp["initial_state"] = torch.randn(3, 72, 16, device=DEVICE)
    bc4 = lambda t: t.unsqueeze(1).contiguous()  # noqa: E731  (batch, groups = 1, N, L)
    args = (inp["u"], inp["delta"], inp["A"], bc4(inp["B"]), bc4(inp["C"]), inp["D"], inp["z"],
            inp["delta_bias"], inp["initial_state"], cu)
    fprev, bprev = ext.selective_scan_fwd_variant(0), ext.selective_scan_bwd_variant(2)
    try:
        base = [x.clone() for x in sc.selective_scan_fwd(*args, True, True)]
        for v in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12):
            ext.selective_scan_fwd_variant(v)
            got = sc.selective_scan_fwd(*args, True, True)
            if v >= 11:  # 2 states per lane: y summed in another order (out within rounding)
                assert torch.equal(got[1], base[1]), v
                diff = (got[0].float() - base[0].float()).abs()
                ulp = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}.get(got[0].dtype, 2.0 ** -20)
                ref = base[0].float().abs()
                assert (diff <= ref * ulp + 1e-5 * ref.max() + 1e-6).all(), v
            else:
                assert all(torch.equal(a, b) for a, b in zip(got[:2], base[:2])), v
            if cu is None:
                assert torch.equal(got[2], base[2]), v
        ext.selective_scan_fwd_variant(0)
        dout = torch.randn_like(inp["u"])
        dlast = torch.randn_like(base[1])
        g2 = sc.selective_scan_bwd(*args, base[2], dout, dlast, True)
        # 5: the channel reduce through shared memory, same tree order; 6: + kDirect; 7: 5 or 6 by
        # waves; 8: 5 in 32-step chunks, upper halves rebuilding their start state; 9: 8 or 5 by waves
        # 10, 11: 8 with lanes remapped (+ shuffle reductions in 10)
        for bv in (4, 5, 6, 7, 8, 9, 10, 11):
            ext.selective_scan_bwd_variant(bv)
            g4 = sc.selective_scan_bwd(*args, base[2], dout, dlast, True)
            assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g2, g4)), bv
    finally:
        ext.selective_scan_fwd_variant(fprev)
        ext.selective_scan_bwd_variant(bprev)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sscan_fwd_packed_bc_exact_model(dtype):
    """Forward variants 7 / 8 (selective_scan_fwd_lean.cu, kS8 2 / 3) keep B and C of a step as the
    16-bit storage bits of the float32 the convert made from them (f32_to_bits16: bf16 `bits >> 16`,
    fp16 round-to-nearest back to half) packed B low / C high in one 32-bit word, and the compute
    loop widens them again (lo16_to_f32: bf16 `w << 16`, hi16_to_f32: bf16 `w & 0xffff0000`; fp16
    __half2float of either half). Checks, for every non-NaN 16-bit pattern, that the round trip
    gives the identical float32 bits variant 3 stores (so the update sees the same operands), with
    the partner half of the word holding an arbitrary other pattern."""
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
    vals = bits.view(dtype)
    keep = ~torch.isnan(vals.float())
    vals, bits = vals[keep], bits[keep]
    f = vals.float()  # what the convert holds (exact widening), variant 3's float32 tile value
    back = f.to(dtype).view(torch.int16)  # f32_to_bits16
    assert torch.equal(back, bits)
    u16 = back.to(torch.int64) & 0xFFFF
    partner = u16.flip(0)  # an arbitrary other pattern in the other half of the word
    for lo, hi in ((u16, partner), (partner, u16)):
        w = lo | (hi << 16)  # B low, C high
        if dtype == torch.bfloat16:  # the shift / mask forms used for bf16
            wl = ((w << 16) & 0xFFFFFFFF).to(torch.int64)
            wh = w & 0xFFFF0000
            as_f = lambda x: (x - ((x >> 31) << 32)).to(torch.int32).view(torch.float32)  # noqa: E731
            got_lo, got_hi = as_f(wl), as_f(wh)
        else:
            half = lambda x: (x - ((x >> 15) << 16)).to(torch.int16).view(torch.float16).float()  # noqa: E731
            got_lo, got_hi = half(w & 0xFFFF), half((w >> 16) & 0xFFFF)
        want = f if lo is u16 else f.flip(0)
        assert torch.equal(got_lo.view(torch.int32), want.view(torch.int32))
        want_hi = f.flip(0) if lo is u16 else f
        assert torch.equal(got_hi.view(torch.int32), want_hi.view(torch.int32))


@pytest.mark.parametrize("ktpc", [4, 8])
def test_sscan_fwd_lane_remap_model(ktpc):
    """Forward variants 9 / 10 (kS8 & 4, selective_scan_fwd_lean.cu; kTPC 4) and 11 / 12 (kTPC 8,
    2 states per lane): thread tid holds channel ch = (tid >> 5) * 8 + ((tid >> 3) & 3) * 2 + (tid & 1)
    (kTPC 8: (tid >> 5) * 4 + ((tid >> 4) & 1) * 2 + (tid & 1)) and slice (tid >> 1) & (kTPC - 1)
    (expressions read from the source). Checks: a bijection onto (channel, slice) per warp (a
    channel's lanes in one warp); lanes T and T^1 hold the same slice (B/C loads: uniform pairs) and
    T and T^2 the same channel ((dt, dt u) loads: uniform pairs); and the stride-2 reduce-scatter
    (reduce_scatter_lanes<kTPC, 2>: the partner of round kM is lane ^ 2 kM) pairs the lanes of one
    channel with slices c, c ^ kM -- kTPC 4: exactly the lanes variant 3 pairs, so every y sum is the
    same tree (bitwise equal)."""
    import re
    src = open(os.path.join(os.path.dirname(__file__), "..", "csrc", "selective_scan",
                            "selective_scan_fwd_lean.cu")).read()
    m_ch = re.search(r"const int ch = !kRemap \? tid / kTPC\s*: \(kTPC == 4 \? (.+?)\s*: (.+?)\);\n", src,
                     re.S)
    m_sl = re.search(r"const int slice = kRemap \? (.+?) : tid % kTPC;", src)
    assert m_ch and m_sl
    expr = m_ch.group(1) if ktpc == 4 else m_ch.group(2)
    ch_of = eval("lambda tid: " + expr)  # noqa: S307  (C integer expression, same in Python)
    sl_of = eval("lambda tid, kTPC: " + m_sl.group(1))  # noqa: S307
    assert "reduce_scatter_lanes<kTPC, kRS, kOG>(yv, slice)" in src and "kRS = kRemap ? 2 : 1" in src
    cpw = 32 // ktpc  # channels per warp
    for warp in range(256 // 32):
        lanes = {}
        for lane in range(32):
            tid = warp * 32 + lane
            ch, sl = ch_of(tid), sl_of(tid, ktpc)
            lanes[(ch, sl)] = lane
            assert ch // cpw == warp and 0 <= sl < ktpc
            assert sl == sl_of(tid ^ 1, ktpc)                  # B/C: uniform pair (T, T^1)
            assert ch == ch_of(tid ^ 2)                        # (dt, dt u): uniform pair (T, T^2)
        assert len(lanes) == 32
        for (ch, sl), lane in lanes.items():
            km = ktpc // 2
            while km >= 1:                                     # rs_round: xor kM * kStride
                assert lanes[(ch, sl ^ km)] == lane ^ (km * 2)
                km //= 2


def test_sscan_bwd_lane_remap_model():
    """Backward variants 10 / 11 (selective_scan_bwd.cu kRemap): ch_of / slice_of / cidx_of (read from
    the source) map each warp's 32 threads one to one onto its 8 channels x 4 slices (the channels
    8 warp .. 8 warp + 7, so the per-warp partial tiles and the warp sums are unchanged); T, T^1
    share the slice (B/C uniform pairs), T, T^2 the channel; the channel shuffles (xor 16, 8, 1 for
    channel-lane bits 4, 2, 1: reduce_scatter_xor<kCW, 1, 8, 16>) pair the lanes of
    one slice with channel lanes c ^ m, and the slice shuffles (stride 2: xor 4, 2) and the final
    dD / ddelta_bias shuffles (xor 2 m) the lanes of one channel with slices s ^ m -- the pairs of
    variant 2's reduce-scatters, so every sum is the same tree (bitwise equal to 8)."""
    import re
    src = open(os.path.join(os.path.dirname(__file__), "..", "csrc", "selective_scan",
                            "selective_scan_bwd.cu")).read()
    get = {}
    for name in ("ch_of", "slice_of", "cidx_of"):
        m = re.search(r"auto %s = \[\]\(int t\) \{ return kRemap \? (.+?) : .+?; \};" % name, src)
        assert m, name
        get[name] = eval("lambda t: " + m.group(1))  # noqa: S307
    assert "reduce_scatter_xor<kCW, 1, 8, 16>(v, cidx)" in src
    assert "reduce_scatter_lanes<kTPC, kRemap ? 2 : 1>(v, slice)" in src
    assert "kRemap ? 2 * m : m" in src
    xmask = {1: 1, 2: 8, 4: 16}
    for warp in range(4):
        lanes = {}
        for lane in range(32):
            t = warp * 32 + lane
            ch, sl, c = get["ch_of"](t), get["slice_of"](t), get["cidx_of"](t)
            assert ch // 8 == warp and c == ch % 8
            lanes[(c, sl)] = lane
            assert sl == get["slice_of"](t ^ 1) and ch == get["ch_of"](t ^ 2)
        assert len(lanes) == 32
        for (c, sl), lane in lanes.items():
            for m in (4, 2, 1):
                assert lanes[(c ^ m, sl)] == lane ^ xmask[m]       # channel reduce partner
            for m in (2, 1):
                assert lanes[(c, sl ^ m)] == lane ^ (2 * m)        # slice reduce / dD partner


def test_sscan_bwd_v5_channel_exchange_model():
    """Backward variant 5 (kIO 5, helper sscanbwd7): the cross-channel dB/dC reduce through a
    per-warp shared tile. Replays selective_scan_bwd.cu's channel_reduce in float32 for one warp
    (lane = cidx * 4 + slice, 8 items per lane) and checks: (1) the tile writes (two float4 per
    lane at row cidx, quads swapped on odd rows) cover the 256 floats once, with no bank conflict
    inside each 8-lane STS.128 phase; (2) every read round c hits 32 distinct banks; (3) every lane's
    sum is bitwise the value reduce_scatter_lanes<8, 4> (variant 2's shuffles) leaves on that lane."""
    import numpy as np
    rng = np.random.default_rng(5)
    kcw, ktpc, kit = 8, 4, 8
    # (1) write addresses
    addr = {}
    for lane in range(32):
        cidx, slice_ = lane // ktpc, lane % ktpc
        sw = (cidx & 1) * 4
        base = cidx * 32 + slice_ * 8
        addr[lane] = [base + sw + i for i in range(4)] + [base + (sw ^ 4) + i for i in range(4)]
    flat = [a for lane in range(32) for a in addr[lane]]
    assert sorted(flat) == list(range(256))
    for half in (0, 1):  # first / second STS.128, quarter-warp phases of 8 lanes
        for ph in range(4):
            banks = [addr[lane][half * 4 + i] % 32 for lane in range(ph * 8, ph * 8 + 8) for i in range(4)]
            assert len(set(banks)) == 32
    # (2) read addresses per round c
    def rd(lane, c):
        cidx, slice_ = lane // ktpc, lane % ktpc
        off = slice_ * 8 + cidx
        return c * 32 + ((off ^ 4) if (c & 1) else off)
    for c in range(kcw):
        assert len({rd(lane, c) % 32 for lane in range(32)}) == 32
    # (3) values, wide dynamic range so that the order of the adds shows in the rounding
    for _ in range(40):
        v = (rng.standard_normal((32, kit)) * 10.0 ** rng.integers(-6, 7, (32, kit))).astype(np.float32)
        tile = np.zeros(256, np.float32)
        for lane in range(32):
            for i in range(kit):
                tile[addr[lane][i]] = v[lane, i]
        for slice_ in range(ktpc):
            lanes = [c * ktpc + slice_ for c in range(kcw)]  # this slice's channel lanes
            ref = _rs_lanes_model([v[lane] for lane in lanes], kcw)
            for cidx, lane in enumerate(lanes):
                x = [tile[rd(lane, c)] for c in range(kcw)]
                assert all(x[c] == v[lanes[c], cidx] for c in range(kcw))  # item cidx of channel c
                f = np.float32
                got = f(f(f(x[0] + x[4]) + f(x[2] + x[6])) + f(f(x[1] + x[5]) + f(x[3] + x[7])))
                assert len(ref[cidx]) == 1
                assert got.tobytes() == np.float32(ref[cidx][0]).tobytes()


def test_sscan_bwd_v5_slice_exchange_model():
    """Backward variant 5's sums over n (y, d dt, g B per step) through the per-warp tile: lane
    (cidx, slice) writes its 8 step values to row cidx at ((j + cidx) & 7) * 4 + slice, then reads
    its two steps 2 slice + o as one float4 (the 4 slices) and adds (x0 + x2) + (x1 + x3). Checks no
    bank conflict on the scalar stores (per j) and the LDS.128 phases, and every sum bitwise equal
    to reduce_scatter_lanes<4, 1> (variant 2's shuffles) on the same lane."""
    import numpy as np
    rng = np.random.default_rng(55)
    pos = lambda c, j, s: c * 32 + ((j + c) & 7) * 4 + s  # noqa: E731
    for j in range(8):
        assert len({pos(lane // 4, j, lane % 4) % 32 for lane in range(32)}) == 32
    for o in range(2):
        for ph in range(4):
            banks = [(pos(lane // 4, 2 * (lane % 4) + o, 0) + i) % 32
                     for lane in range(ph * 8, ph * 8 + 8) for i in range(4)]
            assert len(set(banks)) == 32
    f = np.float32
    for _ in range(40):
        v = (rng.standard_normal((32, 8)) * 10.0 ** rng.integers(-6, 7, (32, 8))).astype(np.float32)
        tile = np.zeros(256, np.float32)
        for lane in range(32):
            for j in range(8):
                tile[pos(lane // 4, j, lane % 4)] = v[lane, j]
        for c in range(8):
            ref = _rs_lanes_model([v[c * 4 + s] for s in range(4)], 4)
            for s in range(4):
                assert len(ref[s]) == 2
                for o in range(2):
                    x = tile[pos(c, 2 * s + o, 0):pos(c, 2 * s + o, 0) + 4]
                    assert all(x[i] == v[c * 4 + i, 2 * s + o] for i in range(4))
                    got = f(f(x[0] + x[2]) + f(x[1] + x[3]))
                    assert got.tobytes() == f(ref[s][o]).tobytes()
