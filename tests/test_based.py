"""Based (chunk_based, fused_recurrent_based) against the float64 step-by-step recurrence:
outputs, final states and every gradient (q, k, v, initial_state), varlen, decode steps, dtypes,
bad input, opcheck and fullgraph compile."""
import pytest
import torch

import ssm_kernels as sk
from ssm_kernels.based.reference import (based_chunk_ref, based_parallel_ref, based_recurrent_ref,
                                         feature_dim)
from ssm_kernels.testing import assert_close

from conftest import DEVICE, kernel_backends

BACKENDS = ["reference"] + kernel_backends()
LOWP = (torch.float16, torch.bfloat16)


def make_inputs(B, T, H, K, V, dtype=torch.float32, device=DEVICE, N=None):
    q, k = (torch.randn(B, T, H, K, device=device) for _ in range(2))
    v = torch.randn(B, T, H, V, device=device)
    h0 = torch.randn(N or B, H, feature_dim(K), V + 1, device=device) * 0.3
    h0[..., V] = h0[..., V].abs() + 1.0  # a plausible normaliser column: sums of phi(k), > 0
    return q.to(dtype), k.to(dtype), v.to(dtype), h0


def run(fn, q, k, v, h0, cot, use_norm=True, cu_seqlens=None, **kw):
    """Forward + backward of fn with cotangents `cot` = (do, dfinal); h0 may be None."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    h = None if h0 is None else h0.detach().requires_grad_()
    o, hT = fn(*leaves, None, use_norm, h, True, cu_seqlens, **kw)
    loss = (o * cot[0].to(o.dtype)).sum() + (hT * cot[1].to(hT.dtype)).sum()
    inputs = leaves + ([h] if h is not None else [])
    return [o, hT, *torch.autograd.grad(loss, inputs)]


NAMES = ["o", "final_state", "dq", "dk", "dv", "dh0"]


def check(backend, B, T, H, K, V, dtype=torch.float32, use_norm=True, with_h0=True,
          cu_seqlens=None, fn=sk.chunk_based):
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    q, k, v, h0 = make_inputs(B, T, H, K, V, dtype, N=N)
    h0 = h0 if with_h0 else None
    cot = (torch.randn(B, T, H, V, dtype=torch.float64),
           torch.randn(N, H, feature_dim(K), V + 1, dtype=torch.float64))
    dev = lambda c: c.to(DEVICE)  # noqa: E731
    cu_dev = None if cu_seqlens is None else cu_seqlens.to(DEVICE)
    out = run(fn, q, k, v, h0, [dev(c) for c in cot], use_norm, cu_dev, backend=backend)
    cpu = [x.cpu() for x in (q, k, v)]
    h0c = None if h0 is None else h0.cpu()
    ref = run(based_parallel_ref, *(x.double() for x in cpu),
              None if h0c is None else h0c.double(), cot, use_norm, cu_seqlens)
    lowp = run(based_parallel_ref, *cpu, h0c, cot, use_norm, cu_seqlens) if dtype in LOWP else None
    for i, name in enumerate(NAMES[:len(ref)]):
        assert_close(out[i], ref[i], dtype=dtype, lowp_ref=None if lowp is None else lowp[i],
                     name=f"{backend} {name}")


# ---- the two references agree (the recurrence is the spec) -------------------------------------

@pytest.mark.parametrize("use_norm", [True, False])
def test_parallel_reference_matches_recurrence(use_norm):
    q, k, v, h0 = (x.double() for x in make_inputs(2, 23, 3, 5, 7, device="cpu"))
    o1, f1 = based_recurrent_ref(q, k, v, None, use_norm, h0, True)
    o2, f2 = based_parallel_ref(q, k, v, None, use_norm, h0, True)
    assert_close(o2, o1, dtype=torch.float64)
    assert_close(f2, f1, dtype=torch.float64)
    o3, f3 = based_chunk_ref(q, k, v, None, use_norm, h0, True, chunk_size=8)
    assert_close(o3, o1, dtype=torch.float64)
    assert_close(f3, f1, dtype=torch.float64)
    cu = torch.tensor([0, 4, 4, 23])
    h0n = h0[:1].repeat(3, 1, 1, 1)
    o1, f1 = based_recurrent_ref(q[:1], k[:1], v[:1], 0.3, use_norm, h0n, True, cu)
    for ref in (based_parallel_ref, based_chunk_ref):
        o2, f2 = ref(q[:1], k[:1], v[:1], 0.3, use_norm, h0n, True, cu)
        assert_close(o2, o1, dtype=torch.float64)
        assert_close(f2, f1, dtype=torch.float64)


def test_reference_is_taylor_attention():
    """phi(q)·phi(k) = 1 + s q·k + (s q·k)^2/2: a brute-force softmax-free attention check."""
    q, k, v, _ = (x.double() for x in make_inputs(1, 6, 1, 4, 3, device="cpu"))
    s = 4 ** -0.5
    a = torch.einsum("tk,uk->tu", q[0, :, 0], k[0, :, 0]) * s
    w = (1 + a + a * a / 2).tril()
    want = (w @ v[0, :, 0]) / (w.sum(-1, keepdim=True) + 1e-6)
    o, _ = based_recurrent_ref(q, k, v)
    assert_close(o[0, :, 0], want, dtype=torch.float64)


# ---- kernels against the float64 reference ------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,T,H,K,V,use_norm,with_h0", [
    (2, 37, 2, 16, 20, True, True),    # T not a multiple of the chunk, V not a power of two
    (1, 33, 1, 5, 17, False, True),    # odd K (padded), no normalisation
    (1, 21, 2, 32, 16, True, False),   # K = 32: four row blocks of the second order
    (2, 1, 1, 16, 8, True, True),      # T = 1
    (1, 16, 1, 12, 33, True, True),    # exactly one chunk, V spans three tiles
    (1, 9, 1, 40, 16, True, True),     # K = 40: padded to 64, sixteen row blocks
])
def test_matches_reference(backend, B, T, H, K, V, use_norm, with_h0):
    check(backend, B, T, H, K, V, use_norm=use_norm, with_h0=with_h0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_scores(backend):
    """q, k scaled by 4: q·k/sqrt(K) of size ~16, Taylor weights ~100 and far from uniform."""
    q, k, v, h0 = make_inputs(1, 40, 2, 16, 12)
    q, k = q * 4, k * 4
    cot = torch.randn(1, 40, 2, 12, dtype=torch.float64)
    cot_h = torch.randn(h0.shape, dtype=torch.float64)
    out = run(sk.chunk_based, q, k, v, h0, (cot.to(DEVICE), cot_h.to(DEVICE)), backend=backend)
    ref = run(based_parallel_ref, *(x.cpu().double() for x in (q, k, v, h0)), (cot, cot_h))
    for o, r, name in zip(out, ref, NAMES):
        assert_close(o, r, dtype=torch.float32, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOWP)
def test_low_precision(backend, dtype):
    check(backend, 1, 29, 2, 16, 24, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_norm", [True, False])
def test_varlen_matches_loop_over_sequences(backend, use_norm):
    cu = torch.tensor([0, 5, 5, 22, 40], dtype=torch.int32)  # includes an empty sequence
    check(backend, 1, 40, 2, 16, 12, use_norm=use_norm, cu_seqlens=cu)
    # and literally against separate calls
    q, k, v, h0 = make_inputs(1, 40, 2, 16, 12, N=4)
    o, hT = sk.chunk_based(q, k, v, None, use_norm, h0, True, cu.to(DEVICE), backend=backend)
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if b == a:
            assert_close(hT[n], h0[n].double(), dtype=torch.float32)
            continue
        on, hn = sk.chunk_based(q[:, a:b], k[:, a:b], v[:, a:b], None, use_norm, h0[n:n + 1], True,
                                backend=backend)
        assert_close(o[:, a:b], on.double(), dtype=torch.float32)
        assert_close(hT[n:n + 1], hn.double(), dtype=torch.float32)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("seg,K,use_norm,with_h0", [(32, 16, True, True), (16, 32, False, False),
                                                    (24, 5, True, False)])
def test_segmented_long_sequences(backend, seg, K, use_norm, with_h0, monkeypatch):
    """Dense sequences split into segments run in parallel (state increments, cumsum over
    segments, then the segments as independent sequences; the backward likewise)."""
    from ssm_kernels.based import triton as based_triton
    monkeypatch.setattr(based_triton, "SEGMENT_LEN", seg)
    check(backend, 2, 70, 1, K, 12, use_norm=use_norm, with_h0=with_h0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_recurrent_decoding_agrees_with_chunk(backend):
    """Prefill with chunk_based, then decode token by token with fused_recurrent_based."""
    q, k, v, h0 = make_inputs(2, 24, 2, 16, 16)
    o_full, h_full = sk.chunk_based(q, k, v, initial_state=h0, output_final_state=True,
                                    backend=backend)
    o_pre, h = sk.chunk_based(q[:, :19], k[:, :19], v[:, :19], initial_state=h0,
                              output_final_state=True, backend=backend)
    outs = [o_pre]
    for t in range(19, 24):
        o_t, h = sk.fused_recurrent_based(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1],
                                          initial_state=h, output_final_state=True, backend=backend)
        outs.append(o_t)
    assert_close(torch.cat(outs, 1), o_full.double(), dtype=torch.float32)
    assert_close(h, h_full.double(), dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,T,H,K,V,use_norm,varlen", [
    (2, 3, 1, 16, 8, True, False),
    (1, 5, 2, 32, 20, False, False),   # several row blocks: partial outputs summed
    (1, 7, 1, 5, 17, True, True),      # odd K, V; packed sequences
])
def test_fused_recurrent_matches_reference(backend, B, T, H, K, V, use_norm, varlen):
    cu = torch.tensor([0, 2, 2, 7], dtype=torch.int32) if varlen else None
    check(backend, B, T, H, K, V, use_norm=use_norm, cu_seqlens=cu, fn=sk.fused_recurrent_based)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_on_final_state_only_and_no_states(backend):
    q, k, v, h0 = make_inputs(1, 18, 1, 16, 8)
    kd = k.detach().requires_grad_()
    _, hT = sk.chunk_based(q, kd, v, initial_state=h0, output_final_state=True, backend=backend)
    hT.sum().backward()
    kr = k.detach().cpu().double().requires_grad_()
    based_parallel_ref(q.cpu().double(), kr, v.cpu().double(), None, True, h0.cpu().double(),
                       True)[1].sum().backward()
    assert_close(kd.grad, kr.grad, dtype=torch.float32)
    # no initial state, no final state
    o, none = sk.chunk_based(q, k, v, backend=backend)
    assert none is None
    assert_close(o, based_recurrent_ref(q.cpu().double(), k.cpu().double(), v.cpu().double())[0],
                 dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_custom_scale(backend):
    q, k, v, h0 = make_inputs(2, 20, 3, 16, 8)
    qt = q.transpose(0, 1).contiguous().transpose(0, 1)  # same values, permuted strides
    assert not qt.is_contiguous()
    o, hT = sk.chunk_based(qt, k, v, 0.1, True, h0, True, backend=backend)
    ro, rf = based_recurrent_ref(*(x.cpu().double() for x in (q, k, v)), 0.1, True,
                                 h0.cpu().double(), True)
    assert_close(o, ro, dtype=torch.float32)
    assert_close(hT, rf, dtype=torch.float32)


@pytest.mark.parametrize("backend", kernel_backends())
def test_backward_is_deterministic(backend):
    q, k, v, h0 = make_inputs(1, 40, 2, 32, 20)
    cot = (torch.randn(1, 40, 2, 20, device=DEVICE), torch.randn_like(h0))
    g1 = run(sk.chunk_based, q, k, v, h0, cot, backend=backend)
    g2 = run(sk.chunk_based, q, k, v, h0, cot, backend=backend)
    for x, y in zip(g1, g2):
        assert torch.equal(x, y)


def test_auto_picks_a_backend_that_can_serve():
    q, k, v, h0 = (x.double() for x in make_inputs(1, 9, 1, 4, 3))
    o, _ = sk.chunk_based(q, k, v, initial_state=h0)  # float64: only the reference serves
    assert_close(o, based_recurrent_ref(q.cpu(), k.cpu(), v.cpu(), None, True, h0.cpu())[0],
                 dtype=torch.float64)


# ---- bad input --------------------------------------------------------------------------------

def test_errors_name_the_argument():
    q, k, v, h0 = make_inputs(1, 8, 2, 4, 3, device="cpu")
    f = sk.chunk_based
    with pytest.raises(ValueError, match="q must have rank 4"):
        f(q[0], k, v)
    with pytest.raises(ValueError, match="k must have q's shape"):
        f(q, k[..., :3], v)
    with pytest.raises(ValueError, match="v must have q's"):
        f(q, k, v[:, :5])
    with pytest.raises(TypeError, match="v must have q's dtype"):
        f(q, k, v.double())
    with pytest.raises(TypeError, match="q must have a floating"):
        f(q.long(), k.long(), v.long())
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        f(q, 1.0, v)
    with pytest.raises(ValueError, match="scale must be a positive"):
        f(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[N, H, 1\+K\+K\*K, V\+1\]"):
        f(q, k, v, initial_state=h0[..., :3])
    with pytest.raises(ValueError, match="initial_state must have rank 4"):
        f(q, k, v, initial_state=h0[0])
    with pytest.raises(ValueError, match="batch must be 1"):
        f(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1),
          cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="cu_seqlens must start at 0, end at T=8 and be non-decreasing"):
        f(q, k, v, cu_seqlens=torch.tensor([0, 5, 3, 8]))
    with pytest.raises(ValueError, match="cu_seqlens must start at 0, end at T=8"):
        f(q, k, v, cu_seqlens=torch.tensor([0, 7]))
    with pytest.raises(TypeError, match="cu_seqlens must be int32 or int64"):
        f(q, k, v, cu_seqlens=torch.tensor([0.0, 8.0]))
    with pytest.raises(ValueError, match="cu_seqlens must have rank 1"):
        f(q, k, v, cu_seqlens=torch.tensor([[0, 8]]))
    with pytest.raises(ValueError, match="nonzero sizes"):
        f(q[:, :0], k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match="backend must be one of"):
        f(q, k, v, backend="fast")
    with pytest.raises(sk.BackendUnavailableError, match="cuda"):
        f(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="fused_recurrent_based: k must have"):
        sk.fused_recurrent_based(q, k[..., :3], v)


@pytest.mark.skipif(DEVICE == "cpu", reason="needs two devices")
def test_device_mismatch():
    q, k, v, _ = make_inputs(1, 8, 2, 4, 3)
    with pytest.raises(ValueError, match="one device"):
        sk.chunk_based(q, k.cpu(), v)


# ---- registered ops: opcheck and fullgraph compile -----------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    q, k, v, h0 = make_inputs(1, 10, 1, 16, 8)
    cu = torch.tensor([0, 3, 10], device=DEVICE)
    fwd = torch.ops.ssm_kernels.based_fwd.default
    qg, kg, vg = (x.requires_grad_() for x in (q.clone(), k.clone(), v.clone()))
    h0g = h0.clone().requires_grad_()
    torch.library.opcheck(fwd, (qg, kg, vg, h0g, 0.25, True, None, True, False, backend))
    torch.library.opcheck(fwd, (qg, kg, vg, None, 0.25, False, cu, False, False, backend),
                          test_utils=("test_schema", "test_faketensor"))
    h0n = h0.repeat(2, 1, 1, 1).requires_grad_()  # one state per packed sequence
    torch.library.opcheck(fwd, (qg, kg, vg, h0n, 0.25, True, cu, True, True, backend),
                          test_utils=("test_schema", "test_faketensor"))
    o, z, hT = fwd(q, k, v, h0, 0.25, True, None, True, False, backend)
    torch.library.opcheck(torch.ops.ssm_kernels.based_bwd.default,
                          (q, k, v, o, z, h0, torch.randn_like(o), torch.randn_like(hT), 0.25,
                           True, None, backend))


@pytest.mark.parametrize("backend", ["reference",
                                     pytest.param("triton", marks=pytest.mark.gpu)])
def test_fullgraph_compile_forward_backward(backend):
    torch._dynamo.reset()

    def f(q, k, v, h0):
        o, hT = sk.chunk_based(q, k, v, initial_state=h0, output_final_state=True, backend=backend)
        return o.square().sum() + hT.sum()

    def g(q, k, v, h0, cu):  # packed sequences and the decode form
        o, hT = sk.chunk_based(q, k, v, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                               backend=backend)
        o2, _ = sk.fused_recurrent_based(q[:, -1:], k[:, -1:], v[:, -1:], initial_state=hT[-1:],
                                         backend=backend)
        return o.square().sum() + hT.sum() + o2.sum()

    xs = [x.requires_grad_() for x in make_inputs(1, 12, 2, 16, 8)]
    cu = torch.tensor([0, 5, 12], device=DEVICE)
    xs_cu = [x.requires_grad_() for x in make_inputs(1, 12, 2, 16, 8, N=2)]
    for fn, args in ((f, xs), (g, xs_cu)):
        extra = (cu,) if fn is g else ()
        compiled = torch.compile(fn, fullgraph=True,
                                 backend="aot_eager" if DEVICE == "cpu" else "inductor")
        loss = compiled(*args, *extra)
        grads = torch.autograd.grad(loss, args)
        ref_loss = fn(*args, *extra)
        ref_grads = torch.autograd.grad(ref_loss, args)
        torch.testing.assert_close(loss, ref_loss)
        for gr, r in zip(grads, ref_grads):
            torch.testing.assert_close(gr, r)


# ---- real sizes on the GPU ------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,H,K,V", [(2, 1000, 4, 16, 128), (1, 1031, 2, 32, 100),
                                       (2, 513, 3, 16, 64)])
@pytest.mark.parametrize("segment", [None, 0])  # None: split long sequences (the default)
def test_gpu_real_sizes(backend, dtype, B, T, H, K, V, segment, monkeypatch):
    from ssm_kernels.based import triton as based_triton
    monkeypatch.setattr(based_triton, "SEGMENT_LEN", segment)
    gpu_check(backend, B, T, H, K, V, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_varlen(backend, dtype):
    cu = torch.tensor([0, 1, 300, 301, 1100, 2048], dtype=torch.int32)
    gpu_check(backend, 1, 2048, 4, 16, 64, dtype, cu_seqlens=cu)


def gpu_check(backend, B, T, H, K, V, dtype, cu_seqlens=None):
    """As check(), with the float64 reference on the GPU (the parallel form; T <= a few thousand)."""
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    q, k, v, h0 = make_inputs(B, T, H, K, V, dtype, N=N)
    cot = (torch.randn(B, T, H, V, dtype=torch.float64, device=DEVICE),
           torch.randn(N, H, feature_dim(K), V + 1, dtype=torch.float64, device=DEVICE))
    cu = None if cu_seqlens is None else cu_seqlens.to(DEVICE)
    out = run(sk.chunk_based, q, k, v, h0, cot, True, cu, backend=backend)
    ref = run(based_parallel_ref, q.double(), k.double(), v.double(), h0.double(), cot, True, cu)
    lowp = run(based_parallel_ref, q, k, v, h0, cot, True, cu) if dtype in LOWP else None
    for i, name in enumerate(NAMES):
        assert_close(out[i], ref[i], dtype=dtype, lowp_ref=None if lowp is None else lowp[i],
                     name=f"{backend} {dtype} {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", kernel_backends())
def test_gpu_long_sequence_state_split(backend):
    """T = 65536: the carried state crosses a thousand chunks. Running the two halves with the
    state handed over equals one run (state passing), and float16 does not overflow against the
    float32 kernel even with positive-mean values (large state entries)."""
    B, T, H, K, V = 1, 1 << 16, 2, 16, 64
    q, k, v, h0 = make_inputs(B, T, H, K, V)
    v = v + 2.0
    o, hT = sk.chunk_based(q, k, v, initial_state=h0, output_final_state=True, backend=backend)
    h = T // 2 + 7
    o1, h1 = sk.chunk_based(q[:, :h], k[:, :h], v[:, :h], initial_state=h0,
                            output_final_state=True, backend=backend)
    o2, h2 = sk.chunk_based(q[:, h:], k[:, h:], v[:, h:], initial_state=h1,
                            output_final_state=True, backend=backend)
    assert_close(torch.cat([o1, o2], 1), o.double(), dtype=torch.float32)
    assert_close(h2, hT.double(), dtype=torch.float32)
    ro, rh = based_chunk_ref(q.double(), k.double(), v.double(), None, True, h0.double(), True)
    assert_close(o, ro, dtype=torch.float32)
    assert_close(hT, rh, dtype=torch.float32)
    for dtype in LOWP:
        ol, hl = sk.chunk_based(q.to(dtype), k.to(dtype), v.to(dtype), initial_state=h0,
                                output_final_state=True, backend=backend)
        assert torch.isfinite(ol).all() and torch.isfinite(hl).all()
        # state dots take bfloat16 operands for both 16-bit dtypes: judge both by bf16 rounding
        assert_close(ol, o.double(), dtype=torch.bfloat16, lowp_ref=o.to(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_decode_batch(backend, dtype):
    """Decoding at a serving batch: 64 sequences x 16 heads, two steps from a prefilled state."""
    B, H, K, V = 64, 16, 16, 64
    q, k, v, h0 = make_inputs(B, 130, H, K, V, dtype)
    o_full, h_full = sk.chunk_based(q, k, v, initial_state=h0, output_final_state=True,
                                    backend=backend)
    _, h = sk.chunk_based(q[:, :128], k[:, :128], v[:, :128], initial_state=h0,
                          output_final_state=True, backend=backend)
    o_dec, h_dec = sk.fused_recurrent_based(q[:, 128:], k[:, 128:], v[:, 128:], initial_state=h,
                                            output_final_state=True, backend=backend)
    lowp = o_full[:, 128:] if dtype in LOWP else None
    ref = based_parallel_ref(q.double(), k.double(), v.double(), None, True, h0.double())[0]
    assert_close(o_dec, ref[:, 128:], dtype=dtype, lowp_ref=lowp)
    assert_close(h_dec, h_full.double(), dtype=torch.float32 if dtype == torch.float32 else dtype,
                 lowp_ref=h_full)
