"""Registered ops: torch.library.opcheck, and torch.compile(fullgraph=True) forward + backward."""
import pytest
import torch

import ssm_kernels as sk

from conftest import DEVICE, kernel_backends

BACKENDS = ["reference"] + kernel_backends(with_cuda=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_opcheck_linear_scan(backend, dtype):
    if backend == "cuda" and dtype.is_complex:
        pytest.skip("CUDA kernel is real-only")
    P, T, Q = 2, 9, 3
    a = torch.rand(P, T, Q, device=DEVICE).to(dtype).requires_grad_()
    b = torch.randn(P, T, Q, device=DEVICE, dtype=dtype).requires_grad_()
    h0 = torch.randn(P, Q, device=DEVICE, dtype=dtype).requires_grad_()
    torch.library.opcheck(torch.ops.ssm_kernels.linear_scan_fwd.default, (a, b, h0, 1, False, backend))
    torch.library.opcheck(torch.ops.ssm_kernels.linear_scan_fwd.default, (a, b, None, 1, True, backend))
    h = torch.randn(P, T, Q, device=DEVICE, dtype=dtype)
    dhT = torch.randn(P, Q, device=DEVICE, dtype=dtype)
    torch.library.opcheck(torch.ops.ssm_kernels.linear_scan_bwd.default,
                          (a.detach(), h, h0.detach(), torch.randn_like(h), dhT, 1, False, backend))
    # the ops without the outputs nobody reads (no final state; no dh0)
    torch.library.opcheck(torch.ops.ssm_kernels.linear_scan_fwd_h.default, (a, b, h0, 1, False, backend))
    torch.library.opcheck(torch.ops.ssm_kernels.linear_scan_fwd_h.default, (a, b, None, 1, True, backend))
    torch.library.opcheck(torch.ops.ssm_kernels.linear_scan_bwd_ab.default,
                          (a.detach(), h, h0.detach(), torch.randn_like(h), dhT, 1, False, backend))
    torch.library.opcheck(torch.ops.ssm_kernels.linear_scan_bwd_ab.default,
                          (a.detach(), h, None, torch.randn_like(h), None, 1, True, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_compile_forward_backward(backend):
    torch._dynamo.reset()

    def f(a, b, h0):
        h, hT = sk.linear_scan(a, b, h0, dim=1, output_final_state=True, backend=backend)
        return h.square().sum() + hT.sum()

    a = torch.rand(2, 11, 4, device=DEVICE).requires_grad_()
    b = torch.randn(2, 11, 4, device=DEVICE).requires_grad_()
    h0 = torch.randn(2, 4, device=DEVICE).requires_grad_()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    loss = compiled(a, b, h0)
    grads = torch.autograd.grad(loss, (a, b, h0))
    ref_loss = f(a, b, h0)
    ref_grads = torch.autograd.grad(ref_loss, (a, b, h0))
    torch.testing.assert_close(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("h0_grad", [None, False])
def test_fullgraph_compile_without_final_state(backend, h0_grad):
    """The h-only forward op and the backward without dh0 (no initial state, or one that needs no
    gradient) under torch.compile(fullgraph=True): same loss and gradients as eager."""
    torch._dynamo.reset()

    def f(a, b, h0):
        return sk.linear_scan(a, b, h0, dim=1, backend=backend).square().sum()

    a = torch.rand(2, 11, 4, device=DEVICE).requires_grad_()
    b = torch.randn(2, 11, 4, device=DEVICE).requires_grad_()
    h0 = None if h0_grad is None else torch.randn(2, 4, device=DEVICE)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    loss = compiled(a, b, h0)
    grads = torch.autograd.grad(loss, (a, b))
    ref_loss = f(a, b, h0)
    ref_grads = torch.autograd.grad(ref_loss, (a, b))
    torch.testing.assert_close(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
