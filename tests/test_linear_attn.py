"""Chunked linear attention (plain, scalar decay, GLA) against the float64 recurrence: outputs,
final states, every gradient (q, k, v, g, g_gamma, initial_state), varlen, reverse, normalize,
extreme decays, chunk vs fused_recurrent, errors, opcheck and compile."""
import pytest
import torch

import ssm_kernels as sk
from ssm_kernels.linear_attn.reference import (linear_attn_chunk_ref, linear_attn_recurrent_ref,
                                               seq_bounds)
from ssm_kernels.testing import assert_close, bound_for

from conftest import DEVICE, kernel_backends

BACKENDS = ["reference"] + kernel_backends()
GATES = ["none", "g", "gamma", "g+gamma", "gla"]
LOWP = (torch.float16, torch.bfloat16)


def make(B, T, H, K, V, dtype, gate, device=DEVICE, decay=(0.0, 1.0), positive_qk=False):
    """Fresh random inputs; log-decays drawn uniform in -[decay[0], decay[1]] per step."""
    q, k = torch.randn(2, B, T, H, K, device=device).unbind(0)
    if positive_qk:
        q, k = q.sigmoid(), k.sigmoid()
    v = torch.randn(B, T, H, V, device=device)
    lo, hi = decay
    g = gamma = None
    if gate in ("g", "g+gamma"):
        g = -(lo + (hi - lo) * torch.rand(B, T, H, device=device))
    if gate in ("gamma", "g+gamma"):
        gamma = -(lo + (hi - lo) * torch.rand(H, device=device))
    if gate == "gla":
        g = -(lo + (hi - lo) * torch.rand(B, T, H, K, device=device))
    return q.to(dtype), k.to(dtype), v.to(dtype), g, gamma


def call(form, gate, q, k, v, g, gamma, h0, cu=None, reverse=False, **kw):
    """The public function for (form, gate); returns (o, final_state)."""
    if gate == "none":
        fn = sk.chunk_linear_attn if form == "chunk" else sk.fused_recurrent_linear_attn
        extra = dict(normalize=False)
    elif gate == "gla":
        fn = sk.chunk_gla if form == "chunk" else sk.fused_recurrent_gla
        extra = {}
    else:
        fn = sk.chunk_simple_gla if form == "chunk" else sk.fused_recurrent_simple_gla
        extra = dict(g_gamma=gamma)
    if reverse:
        extra["reverse"] = True
    if gate != "none":
        return fn(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu, **extra, **kw)
    return fn(q, k, v, initial_state=h0, output_final_state=True, cu_seqlens=cu, **extra, **kw)


def ref_call(gate, q, k, v, g, gamma, h0, cu=None, reverse=False, scale=None):
    """The float64 recurrence with the public functions' conventions."""
    geff = g
    if gamma is not None:
        geff = gamma.expand(q.shape[:3]) if g is None else g + gamma
    if not reverse:
        return linear_attn_recurrent_ref(q, k, v, geff, scale, h0, cu)
    # reverse: every sequence walked right to left = the recurrence on each sequence reversed in
    # place (sequences keep their slots, so cu_seqlens and the state order are unchanged)
    T = q.shape[1]
    if cu is None:
        idx = torch.arange(T - 1, -1, -1)
    else:
        idx = torch.cat([torch.arange(e - 1, b - 1, -1) for _, b, e in seq_bounds(1, T, cu)])
    sel = lambda x: None if x is None else x[:, idx]
    o, S = linear_attn_recurrent_ref(sel(q), sel(k), sel(v), sel(geff), scale, h0, cu)
    return o[:, idx], S


def fwd_bwd(fn, inputs, cots, names):
    """fn(*inputs) -> (o, S); loss = <o, cot0> + <S, cot1>; returns outputs + grads of `names`."""
    leaves = {n: x.detach().clone().requires_grad_() for n, x in inputs.items() if x is not None}
    full = {n: leaves.get(n) for n in inputs}
    o, S = fn(**full)
    loss = (o.double() * cots[0]).sum() + (S.double() * cots[1]).sum()
    wrt = [n for n in names if n in leaves]
    grads = torch.autograd.grad(loss, [leaves[n] for n in wrt])
    return {"o": o, "final_state": S, **{f"d{n}": gr for n, gr in zip(wrt, grads)}}


def compare_to_reference(backend, gate, B, T, H, K, V, dtype=torch.float32, form="chunk", cu=None,
                         reverse=False, decay=(0.0, 1.0), with_h0=True):
    q, k, v, g, gamma = make(B, T, H, K, V, dtype, gate, decay=decay)
    N = B if cu is None else cu.numel() - 1
    h0 = torch.randn(N, H, K, V, device=DEVICE) if with_h0 else None
    inputs = dict(q=q, k=k, v=v, g=g, gamma=gamma, h0=h0)
    cots = (torch.randn(B, T, H, V, dtype=torch.float64, device=DEVICE),
            torch.randn(N, H, K, V, dtype=torch.float64, device=DEVICE))
    names = ["q", "k", "v", "g", "gamma", "h0"]
    cu_d = None if cu is None else cu.to(DEVICE)
    out = fwd_bwd(lambda **a: call(form, gate, **a, cu=cu_d, reverse=reverse, backend=backend),
                  inputs, cots, names)
    hi = {n: None if x is None else x.detach().cpu().double() for n, x in inputs.items()}
    ref = fwd_bwd(lambda **a: ref_call(gate, **a, cu=cu, reverse=reverse), hi,
                  [c.cpu() for c in cots], names)
    lowp = None
    if dtype in LOWP:
        lp = {n: None if x is None else x.detach().cpu() for n, x in inputs.items()}
        lowp = fwd_bwd(lambda **a: ref_call(gate, **a, cu=cu, reverse=reverse), lp,
                       [c.cpu() for c in cots], names)
    assert set(out) == set(ref)
    for name in ref:
        assert torch.isfinite(out[name]).all(), f"{name} has non-finite values"
        check(out[name], ref[name], dtype, None if lowp is None else lowp[name],
              f"{backend} {form} {gate} {name}", gate_grad_magnitude(ref, q, name))


# The log-decay gradient is a reverse cumsum over time of q.dq - k.dk, a difference of products:
# its float32 rounding error scales with the size of those products, not with dg itself (with
# -20 per step the true dg is ~1e-9 while q.dq is O(1)). So dg / dgamma are judged relative to
# max(|dg|, |q * dq|) (times T for dgamma, a sum over time), with 1e-4 in float32.
GATE_GRAD_RTOL_FP32 = 1e-4


def check(out, ref, dtype, lowp, name, magnitude=0.0):
    if name.split()[-1] not in ("dg", "dgamma"):
        assert_close(out, ref, dtype=dtype, lowp_ref=lowp, name=name)
        return
    den = max(torch.linalg.vector_norm(ref.detach().cpu().double()).item(), magnitude)
    err = lambda x: torch.linalg.vector_norm(x.detach().cpu().double() - ref.detach().cpu().double()).item() / den
    if dtype in LOWP:
        bound = bound_for(dtype, err(lowp))
    else:
        bound = GATE_GRAD_RTOL_FP32 if dtype == torch.float32 else bound_for(dtype)
    assert err(out) <= bound, f"{name}: rel err {err(out):.3e} > {bound:.3e}"


def gate_grad_magnitude(ref, q, name):
    """|q * dq| of the reference (times T for dgamma): the scale of dg's rounding error."""
    m = torch.linalg.vector_norm(ref["dq"].detach().cpu().double() * q.detach().cpu().double()).item()
    return m * q.shape[1] if name == "dgamma" else m


# ---- CPU-sized (interpreter) tests --------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("T,K,V", [(1, 16, 16), (63, 60, 20), (64, 16, 60), (65, 20, 16)])
def test_chunk_matches_recurrence(backend, gate, T, K, V):
    if backend == "reference" and T in (63, 64):
        pytest.skip("the reference backend's chunking is covered at T = 1 and 65 (CPU time)")
    compare_to_reference(backend, gate, 2 if T < 8 else 1, T, 2, K, V)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", GATES)
def test_fused_recurrent_matches_recurrence(backend, gate):
    compare_to_reference(backend, gate, 2, 3, 2, 16, 20, form="fused")       # a few decode steps
    compare_to_reference(backend, gate, 1, 33, 2, 20, 16, form="fused", reverse=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", GATES)
def test_varlen_matches_loop(backend, gate):
    """Packed sequences (one empty) against the recurrence per sequence, with a state each."""
    cu = torch.tensor([0, 5, 5, 30, 47], dtype=torch.int32)
    compare_to_reference(backend, gate, 1, 47, 2, 16, 20, cu=cu)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_reverse(backend):
    cu = torch.tensor([0, 17, 20, 41], dtype=torch.int64)
    compare_to_reference(backend, "g", 1, 41, 2, 16, 16, cu=cu, form="fused", reverse=True)
    compare_to_reference(backend, "gla", 1, 41, 2, 16, 16, cu=cu, form="fused", reverse=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_equals_separate_calls(backend):
    """The public varlen call equals one call per sequence (outputs and states)."""
    lens = [9, 1, 23]
    cu = torch.tensor([0, 9, 10, 33], device=DEVICE)
    q, k, v, g, _ = make(1, 33, 2, 16, 16, torch.float32, "gla")
    h0 = torch.randn(3, 2, 16, 16, device=DEVICE)
    o, S = sk.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                        backend=backend)
    start = 0
    for n, L in enumerate(lens):
        sl = slice(start, start + L)
        on, Sn = sk.chunk_gla(q[:, sl], k[:, sl], v[:, sl], g[:, sl], initial_state=h0[n:n + 1],
                              output_final_state=True, backend=backend)
        assert_close(o[:, sl], on.double(), dtype=torch.float32)
        assert_close(S[n:n + 1], Sn.double(), dtype=torch.float32)
        start += L


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", ["g", "gamma", "gla"])
@pytest.mark.parametrize("decay", [(20.0, 20.0), (0.0, 0.0), (0.0, 20.0)])
def test_extreme_decays(backend, gate, decay):
    """-20 per step (exp(-20 * 40) underflows; nothing may overflow) and no decay at all."""
    compare_to_reference(backend, gate, 1, 40, 2, 16, 16, decay=decay)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(backend, dtype):
    """16-bit inputs (the interpreter rounds matmul operands to the input dtype as tensor cores
    do) against the 2x-low-precision-reference rule."""
    compare_to_reference(backend, "g", 1, 65, 2, 16, 16, dtype=dtype)
    compare_to_reference(backend, "gla", 1, 40, 2, 16, 16, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_initial_state(backend):
    compare_to_reference(backend, "g+gamma", 2, 20, 2, 16, 16, with_h0=False)
    compare_to_reference(backend, "gla", 2, 20, 2, 16, 16, with_h0=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", ["none", "g", "gla"])
def test_loss_on_final_state_only(backend, gate):
    q, k, v, g, _ = make(1, 21, 2, 16, 16, torch.float32, gate)
    leaves = [x.requires_grad_() for x in (q, k, v) + ((g,) if g is not None else ())]
    h0 = torch.randn(1, 2, 16, 16, device=DEVICE, requires_grad=True)
    _, S = call("chunk", gate, q, k, v, g, None, h0, backend=backend)
    S.square().sum().backward()
    hi = [x.detach().cpu().double().requires_grad_() for x in leaves + [h0]]
    gh = hi[3] if g is not None else None
    _, Sr = linear_attn_recurrent_ref(hi[0], hi[1], hi[2], gh, None, hi[-1])
    Sr.square().sum().backward()
    for x, r in zip(leaves + [h0], hi):
        if x is q:
            assert r.grad is None or r.grad.abs().max() == 0
            assert x.grad is None or x.grad.abs().max() == 0
            continue
        assert_close(x.grad, r.grad, dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("varlen", [False, True])
def test_normalize(backend, varlen):
    """normalize=True: o / (scale q . z + 1e-10), z the running key sum; (kv, z) state tuples."""
    T = 30
    cu = torch.tensor([0, 12, 30], device=DEVICE) if varlen else None
    B, N = (1, 2) if varlen else (2, 2)
    q, k, v, _, _ = make(B, T, 2, 16, 16, torch.float32, "none", positive_qk=True)
    kv0 = torch.randn(N, 2, 16, 16, device=DEVICE)
    z0 = torch.rand(N, 1, 2, 16, device=DEVICE)
    leaves = [x.requires_grad_() for x in (q, k, v, kv0, z0)]
    o, (S, z) = sk.chunk_linear_attn(q, k, v, initial_state=(kv0, z0), output_final_state=True,
                                     cu_seqlens=cu, backend=backend)
    (o.square().sum() + S.sum() + z.square().sum()).backward()
    hi = [x.detach().cpu().double().requires_grad_() for x in leaves]
    qd, kd, vd, kvd, zd = hi
    o_r, S_r = linear_attn_recurrent_ref(qd, kd, vd, None, None, kvd, None if cu is None else cu.cpu())
    zs, zc = [], torch.zeros_like(kd)
    for n, (b, bos, eos) in enumerate(seq_bounds(B, T, None if cu is None else cu.cpu())):
        c = kd[b, bos:eos].cumsum(0) + zd[n, 0]
        zc = zc.index_put((torch.tensor([b]), torch.arange(bos, eos)), c)
        zs.append(c[-1:])
    den = (qd * 16 ** -0.5 * zc).sum(-1, keepdim=True) + 1e-10
    o_r = o_r / den
    z_r = torch.stack(zs, 0)
    (o_r.square().sum() + S_r.sum() + z_r.square().sum()).backward()
    assert_close(o, o_r, dtype=torch.float32)
    assert_close(z, z_r, dtype=torch.float32)
    for x, r in zip(leaves, hi):
        assert_close(x.grad, r.grad, dtype=torch.float32)
    # fused_recurrent with normalize agrees with chunk
    o2, (S2, z2) = sk.fused_recurrent_linear_attn(q, k, v, initial_state=(kv0, z0), normalize=True,
                                                  output_final_state=True, cu_seqlens=cu,
                                                  backend=backend)
    assert_close(o2, o_r, dtype=torch.float32)
    assert_close(z2, z_r, dtype=torch.float32)


def test_normalize_is_one_autograd_node_and_compiles():
    """normalize=True (no cu_seqlens, no reverse) is one autograd node with a written-out
    backward (issue 8: 7 + 13 torch kernels instead of 10 + 18 behind ~10 nodes): float64
    gradcheck of the node, and torch.compile(fullgraph) of the public call gives eager's loss and
    gradients."""
    from ssm_kernels.linear_attn import interface as la
    d = dict(dtype=torch.float64)
    o, q, k = torch.randn(1, 9, 2, 3, **d), torch.rand(1, 9, 2, 4, **d), torch.rand(1, 9, 2, 4, **d)
    z0 = torch.rand(1, 1, 2, 4, **d)
    args = [t.requires_grad_() for t in (o, q, k, z0)]
    assert torch.autograd.gradcheck(lambda *a: la._Normalize.apply(*a, 0.7, True), args)
    assert torch.autograd.gradcheck(lambda o, q, k: la._Normalize.apply(o, q, k, None, 0.7,
                                                                        False)[0], args[:3])
    qf, kf, vf = (torch.rand(1, 20, 2, 8) for _ in range(3))
    z0f, kv0 = torch.rand(1, 1, 2, 8), torch.randn(1, 2, 8, 8)
    leaves = [t.clone().requires_grad_() for t in (qf, kf, vf, z0f)]

    def f(q, k, v, z0):
        o, (S, z) = sk.chunk_linear_attn(q, k, v, initial_state=(kv0, z0), output_final_state=True,
                                         backend="reference")
        return o.square().sum() + z.square().sum()
    out = sk.chunk_linear_attn(*leaves[:3], backend="reference")[0]
    assert type(out.grad_fn).__name__.startswith("_NormalizeBackward")
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(*leaves)
    want = f(*leaves)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
        torch.testing.assert_close(a, b)


def test_chunked_reference_equals_recurrence():
    """The chunked reference (the kernels' algebra) against the loop, float64, odd chunk sizes."""
    for gate in ("none", "g", "gla"):
        q, k, v, g, _ = make(2, 29, 2, 5, 3, torch.float64, gate, device="cpu", decay=(0.0, 5.0))
        h0 = torch.randn(2, 2, 5, 3, dtype=torch.float64)
        o1, s1 = linear_attn_recurrent_ref(q, k, v, g, 0.3, h0)
        for c in (1, 7, 16, 64):
            o2, s2 = linear_attn_chunk_ref(q, k, v, g, 0.3, h0, chunk_size=c)
            assert_close(o2, o1, dtype=torch.float64)
            assert_close(s2, s1, dtype=torch.float64)


@pytest.mark.parametrize("backend", kernel_backends())
def test_backward_is_deterministic(backend):
    q, k, v, g, _ = make(1, 40, 2, 16, 20, torch.float32, "gla")
    cots = (torch.randn(1, 40, 2, 20, dtype=torch.float64, device=DEVICE),
            torch.randn(1, 2, 16, 20, dtype=torch.float64, device=DEVICE))
    inputs = dict(q=q, k=k, v=v, g=g, gamma=None, h0=torch.randn(1, 2, 16, 20, device=DEVICE))
    f = lambda **a: call("chunk", "gla", **a, backend=backend)
    r1 = fwd_bwd(f, inputs, cots, ["q", "k", "v", "g", "h0"])
    r2 = fwd_bwd(f, inputs, cots, ["q", "k", "v", "g", "h0"])
    for n in r1:
        assert torch.equal(r1[n], r2[n]), n


def test_auto_serves_float64_with_reference():
    q, k, v, g, _ = make(1, 9, 2, 8, 8, torch.float64, "g", device="cpu")
    o, S = sk.chunk_simple_gla(q, k, v, g, output_final_state=True)
    o_r, S_r = linear_attn_recurrent_ref(q, k, v, g)
    assert_close(o, o_r, dtype=torch.float64)
    assert S.dtype == torch.float64


def test_scale_argument():
    q, k, v, g, _ = make(1, 9, 2, 8, 8, torch.float64, "gla", device="cpu")
    o, _ = sk.chunk_gla(q, k, v, g, scale=0.7, backend="reference")
    assert_close(o, linear_attn_recurrent_ref(q, k, v, g, 0.7)[0], dtype=torch.float64)


# ---- bad input ----------------------------------------------------------------------------------

def test_errors_name_the_argument():
    q, k, v, g, gam = make(1, 6, 2, 8, 4, torch.float32, "g+gamma", device="cpu")
    gk = -torch.rand(1, 6, 2, 8)
    with pytest.raises(ValueError, match="q must have rank 4"):
        sk.chunk_simple_gla(q[0], k, v)
    with pytest.raises(ValueError, match="k must have q's shape"):
        sk.chunk_linear_attn(q, k[:, :5], v)
    with pytest.raises(ValueError, match="v must have shape"):
        sk.chunk_gla(q, k, v[:, :, :1], gk)
    with pytest.raises(TypeError, match="v must have q's dtype"):
        sk.chunk_gla(q, k, v.double(), gk)
    with pytest.raises(TypeError, match="q must have dtype"):
        sk.chunk_linear_attn(q.int(), k.int(), v.int())
    with pytest.raises(ValueError, match=r"g must have shape \[B, T, H\]"):
        sk.chunk_simple_gla(q, k, v, gk)
    with pytest.raises(ValueError, match=r"g must have shape \[B, T, H, K\]"):
        sk.chunk_gla(q, k, v, g)
    with pytest.raises(ValueError, match="g holds log-decays and must be <= 0"):
        sk.chunk_simple_gla(q, k, v, -g)
    with pytest.raises(ValueError, match="g holds log-decays"):
        sk.fused_recurrent_gla(q, k, v, gk.abs())
    with pytest.raises(ValueError, match="g_gamma holds log-decays"):
        sk.chunk_simple_gla(q, k, v, g_gamma=-gam)
    with pytest.raises(ValueError, match=r"g_gamma must have shape \[H\]"):
        sk.chunk_simple_gla(q, k, v, g_gamma=gam[:1])
    with pytest.raises(ValueError, match="initial_state must have shape"):
        sk.chunk_simple_gla(q, k, v, g, initial_state=torch.zeros(1, 2, 8, 5))
    with pytest.raises(ValueError, match="B == 1"):
        sk.chunk_linear_attn(torch.cat([q, q]), torch.cat([k, k]), torch.cat([v, v]),
                             cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        sk.chunk_gla(q, k, v, gk, cu_seqlens=torch.tensor([0, 4, 3, 6]))
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        sk.chunk_gla(q, k, v, gk, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(TypeError, match="cu_seqlens must be int32 or int64"):
        sk.chunk_gla(q, k, v, gk, cu_seqlens=torch.tensor([0.0, 6.0]))
    with pytest.raises(ValueError, match="initial_state must have shape"):
        sk.chunk_gla(q, k, v, gk, initial_state=torch.zeros(1, 2, 8, 4), cu_seqlens=torch.tensor([0, 2, 6]))
    with pytest.raises(ValueError, match="gv"):
        sk.fused_recurrent_gla(q, k, v, gk, gv=torch.zeros(1, 6, 2, 4))
    with pytest.raises(ValueError, match="g .* is required"):
        sk.chunk_gla(q, k, v, None)
    with pytest.raises(ValueError, match="T, K, V >= 1"):
        sk.chunk_linear_attn(q[:, :0], k[:, :0], v[:, :0])
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        sk.chunk_linear_attn(q, k, 3.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        sk.chunk_linear_attn(q, k, v, backend="fast")
    with pytest.raises(sk.BackendUnavailableError, match="triton"):
        sk.chunk_linear_attn(q.double(), k.double(), v.double(), backend="triton")
    with pytest.raises(ValueError, match="z_state"):
        sk.chunk_linear_attn(q, k, v, initial_state=(torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 8)))


# ---- opcheck and torch.compile -------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", ["none", "g", "gla"])
def test_opcheck(backend, gate):
    q, k, v, g, _ = make(1, 9, 2, 16, 16, torch.float32, gate)
    h0 = torch.randn(2, 2, 16, 16, device=DEVICE)
    cu = torch.tensor([0, 4, 9], device=DEVICE, dtype=torch.int32)
    gg = None if g is None else g.requires_grad_()
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), gg,
            h0.requires_grad_(), cu, 0.25, False, backend)
    torch.library.opcheck(torch.ops.ssm_kernels.linear_attn_fwd, args)
    torch.library.opcheck(torch.ops.ssm_kernels.linear_attn_fwd, args[:7] + (True, backend))
    o, ht, _, _ = torch.ops.ssm_kernels.linear_attn_fwd(*args)
    bargs = (q.detach(), k.detach(), v.detach(), None if g is None else g.detach(), h0.detach(), cu,
             0.25, ht.detach(), torch.randn_like(o), torch.randn_like(ht), backend)
    torch.library.opcheck(torch.ops.ssm_kernels.linear_attn_bwd, bargs)


def _compile_case(backend, device):
    torch._dynamo.reset()
    q, k, v, g, gam = make(1, 20, 2, 16, 16, torch.float32, "g+gamma", device=device)
    gk = -torch.rand(1, 20, 2, 16, device=device)
    h0 = torch.randn(1, 2, 16, 16, device=device)
    leaves = [x.requires_grad_() for x in (q, k, v, g, gam, gk, h0)]

    def f(q, k, v, g, gam, gk, h0):
        o1, s1 = sk.chunk_simple_gla(q, k, v, g, gam, initial_state=h0, output_final_state=True,
                                     backend=backend)
        o2, s2 = sk.chunk_gla(q, k, v, gk, initial_state=h0, output_final_state=True, backend=backend)
        o3, _ = sk.chunk_linear_attn(q.sigmoid(), k.sigmoid(), v, backend=backend)
        o4, _ = sk.fused_recurrent_simple_gla(q, k, v, g, reverse=True, backend=backend)
        return o1.sum() + s1.sum() + o2.sum() + s2.sum() + o3.sum() + o4.sum()

    cf = torch.compile(f, fullgraph=True)
    out = cf(*leaves)
    grads = torch.autograd.grad(out, leaves)
    ref = f(*leaves)
    rgrads = torch.autograd.grad(ref, leaves)
    assert_close(out, ref.double(), dtype=torch.float32)
    for a, b in zip(grads, rgrads):
        assert_close(a, b.double(), dtype=torch.float32)


def test_compile_fullgraph_reference():
    _compile_case("reference", "cpu")


# ---- real sizes on the GPU -----------------------------------------------------------------------

def _gpu_reference(gate, q, k, v, g, gamma, h0, cu, cots):
    """float64 chunked reference on the GPU (the recurrence loop is too slow at real sizes)."""
    names = ["q", "k", "v", "g", "gamma", "h0"]
    inputs = dict(q=q, k=k, v=v, g=g, gamma=gamma, h0=h0)

    def f(q, k, v, g, gamma, h0):
        geff = g
        if gamma is not None:
            geff = gamma.expand(q.shape[:3]) if g is None else g + gamma
        return linear_attn_chunk_ref(q, k, v, geff, None, h0, cu, chunk_size=64)

    hi = {n: None if x is None else x.detach().double() for n, x in inputs.items()}
    lp = {n: None if x is None else x.detach() for n, x in inputs.items()}
    return fwd_bwd(f, hi, cots, names), fwd_bwd(f, lp, cots, names)


def _gpu_compare(gate, B, T, H, K, V, dtype, cu=None, decay=(0.0, 1.0), form="chunk"):
    q, k, v, g, gamma = make(B, T, H, K, V, dtype, gate, decay=decay)
    N = B if cu is None else cu.numel() - 1
    h0 = torch.randn(N, H, K, V, device=DEVICE)
    cots = (torch.randn(B, T, H, V, dtype=torch.float64, device=DEVICE),
            torch.randn(N, H, K, V, dtype=torch.float64, device=DEVICE))
    inputs = dict(q=q, k=k, v=v, g=g, gamma=gamma, h0=h0)
    out = fwd_bwd(lambda **a: call(form, gate, **a, cu=cu, backend="triton"), inputs, cots,
                  ["q", "k", "v", "g", "gamma", "h0"])
    ref, lowp = _gpu_reference(gate, q, k, v, g, gamma, h0, cu, cots)
    for name in ref:
        assert torch.isfinite(out[name]).all(), name
        check(out[name], ref[name], dtype, lowp[name] if dtype in LOWP else None,
              f"{gate} {dtype} {name}", gate_grad_magnitude(ref, q, name))


@pytest.mark.gpu
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,K,V", [(1000, 64, 64), (1000, 100, 60), (777, 128, 128),
                                   (300, 256, 256), (65, 256, 100)])
def test_gpu_real_sizes(gate, dtype, T, K, V):
    _gpu_compare(gate, 2, T, 3, K, V, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_varlen(gate, dtype):
    cu = torch.tensor([0, 1, 700, 700, 1500, 2047], device=DEVICE, dtype=torch.int32)
    _gpu_compare(gate, 1, 2047, 4, 128, 128, dtype, cu=cu)


@pytest.mark.gpu
@pytest.mark.parametrize("gate", ["g", "gamma", "gla"])
@pytest.mark.parametrize("decay", [(20.0, 20.0), (0.0, 0.0)])
def test_gpu_extreme_decays(gate, decay):
    _gpu_compare(gate, 2, 1000, 2, 128, 128, torch.bfloat16, decay=decay)


@pytest.mark.gpu
@pytest.mark.parametrize("gate", GATES)
def test_gpu_fused_recurrent_decode(gate):
    _gpu_compare(gate, 4, 1, 8, 128, 128, torch.bfloat16, form="fused")
    _gpu_compare(gate, 4, 3, 8, 100, 64, torch.float32, form="fused")


@pytest.mark.gpu
def test_gpu_compile_fullgraph_triton():
    _compile_case("triton", DEVICE)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("gate", ["none", "g+gamma", "gla"])
def test_many_chunks(backend, gate):
    """Several chunks per sequence (the interpreter's chunk is 32): the inter-chunk state passing,
    the per-chunk states and the state-gradient scan over more than two chunks."""
    compare_to_reference(backend, gate, 2, 131 if gate != "gla" else 97, 2, 16, 20)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", ["none", "g", "gla"])
def test_chunk_and_fused_recurrent_agree(backend, gate):
    """The two kernels (chunked, step by step) give the same outputs and states, varlen included."""
    cu = torch.tensor([0, 30, 31, 65], device=DEVICE)
    q, k, v, g, _ = make(1, 65, 2, 20, 16, torch.float32, gate, decay=(0.0, 3.0))
    h0 = torch.randn(3, 2, 20, 16, device=DEVICE)
    o1, s1 = call("chunk", gate, q, k, v, g, None, h0, cu=cu, backend=backend)
    o2, s2 = call("fused", gate, q, k, v, g, None, h0, cu=cu, backend=backend)
    assert_close(o2, o1.double(), dtype=torch.float32)
    assert_close(s2, s1.double(), dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("gate", ["none", "g+gamma", "gla"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_long_sequence(gate, dtype):
    """Few sequences x heads, long T (the shape the old per-sequence kernels split)."""
    _gpu_compare(gate, 1, 8192, 2, 128, 128, dtype)


@pytest.mark.gpu
def test_gpu_gla_bf16_backward_regression():
    """chunk_gla's bf16 backward at a model-like size (B2 T2048 H4 K=V=128) against float64."""
    _gpu_compare("gla", 2, 2048, 4, 128, 128, torch.bfloat16)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("gate", ["none", "g", "gla"])
def test_poisoned_outputs(backend, gate, monkeypatch):
    """Every buffer the engine's stages write starts as NaN: nothing may be left unwritten (packed
    sequences with surplus chunk programs, an empty sequence, padded last chunks)."""
    from ssm_kernels.chunk import common
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)
    cu = torch.tensor([0, 33, 33, 34, 50], dtype=torch.int32)
    compare_to_reference(backend, gate, 1, 50, 2, 16, 20, cu=cu)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("case", ["dense", "varlen", "extreme", "float16", "k_tiles", "sub4", "sub16",
                                  "no4d"])
def test_gla_sub_chunks(backend, case, monkeypatch):
    """chunk_gla at the GPU's tiles in the interpreter (BT=64: the off-diagonal blocks run through
    the tree of factored products, references at rows 32, 16/48, 8/24/40/56 for sub-chunks of 8):
    T not a multiple of 64, several chunks, varlen with an empty and a one-token sequence, initial
    states, extreme decays, several K tiles, sub-chunks of 4 and 16, every gradient against
    float64; outputs start as NaN."""
    from ssm_kernels.chunk import common
    monkeypatch.setattr(common, "INTERP_CHUNK", 64)
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)
    if case == "dense":
        compare_to_reference(backend, "gla", 2, 150, 2, 20, 24, decay=(0.0, 0.1))
    elif case == "varlen":
        cu = torch.tensor([0, 1, 70, 70, 200, 211], dtype=torch.int32)
        compare_to_reference(backend, "gla", 1, 211, 2, 16, 20, cu=cu)
    elif case == "extreme":
        compare_to_reference(backend, "gla", 1, 130, 1, 16, 16, decay=(20.0, 20.0))
    elif case == "float16":
        compare_to_reference(backend, "gla", 1, 100, 2, 32, 16, dtype=torch.float16)
    elif case == "no4d":      # the fallback without 4-d reshapes of the diagonal blocks
        monkeypatch.setattr(common, "GLA_DIAG_4D", False)
        cu = torch.tensor([0, 3, 70, 133], dtype=torch.int32)
        compare_to_reference(backend, "gla", 1, 133, 2, 16, 20, cu=cu, decay=(0.0, 0.3))
    elif case == "k_tiles":   # several K tiles in every stage, the last one partial
        compare_to_reference(backend, "gla", 1, 80, 1, 72, 40, decay=(0.0, 0.1))
    else:   # sub-chunks of 4 (four levels of factored products) or 16 (two levels)
        monkeypatch.setattr(common, "SUB_CHUNK", 4 if case == "sub4" else 16)
        cu = torch.tensor([0, 3, 70, 133], dtype=torch.int32)
        compare_to_reference(backend, "gla", 1, 133, 2, 16, 20, cu=cu, decay=(0.0, 0.3))



@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("variant", ["fast_and_tree", "tree_only", "fused_fwd", "sub_chunk_kernels",
                                     "fused_bwd", "fused_bwd_tree_only", "no_split"])
def test_gla_tree_paths(backend, variant, monkeypatch):
    """The tree kernels of chunk_gla (gla.TREE) at the GPU's BT=64: with FAST_SPAN between the
    spans of different (chunk, K tile) pairs, some take the one-reference fast path and others the
    tree in the same call (checked here from the inputs); the tree alone (FAST_SPAN=-1); scores
    and output in one kernel (FUSED_FWD=True; default: scores stored, then the output stage); the SUB_CHUNK kernels (TREE=False); the
    one-kernel backward (FUSED_BWD) with mixed paths and with the tree alone; one launch per
    stage (TREE_SPLIT=False) with mixed paths."""
    from ssm_kernels.chunk import common, gla
    monkeypatch.setattr(common, "INTERP_CHUNK", 64)
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)
    B, T, H, K, V, span = 1, 200, 2, 72, 24, 46.0
    if variant.startswith("fused_bwd"):
        monkeypatch.setattr(gla, "FUSED_BWD", True)
    if variant == "no_split":          # one launch per stage, fast path or tree per K tile
        monkeypatch.setattr(gla, "TREE_SPLIT", False)
    if variant in ("fast_and_tree", "fused_bwd", "no_split"):
        monkeypatch.setattr(gla, "FAST_SPAN", span)
        torch.manual_seed(3)                     # the draw compare_to_reference makes next
        q, k, v, g2, _ = make(B, T, H, K, V, torch.float32, "gla")
        gc = torch.cat([c.cumsum(1) for c in g2.split(64, dim=1)], 1) * 1.4426950408889634
        spans = []
        for c0 in range(0, T, 64):
            blk = gc[:, c0:c0 + 64]
            d = -blk[:, -1]                      # [B, H, K] (gla.decay_span)
            spans += [float(x) for x in d.split(32, dim=-1)[0].amax(-1).flatten()]
            spans += [float(x) for x in d.split(32, dim=-1)[1].amax(-1).flatten()]
        assert min(spans) <= span < max(spans), spans
        torch.manual_seed(3)
    elif variant in ("tree_only", "fused_bwd_tree_only"):
        monkeypatch.setattr(gla, "FAST_SPAN", -1.0)
    elif variant == "fused_fwd":
        monkeypatch.setattr(gla, "FUSED_FWD", True)
    else:
        monkeypatch.setattr(gla, "TREE", False)
    compare_to_reference(backend, "gla", B, T, H, K, V)

_COMPILE_SCRIPT = r'''
import sys, time, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
import triton.language as tl
import ssm_kernels.chunk.fwd as F
import ssm_kernels.chunk.bwd as Bw
import ssm_kernels.chunk.gla as Gl

BF = {"q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "dv_ptr", "dq_ptr", "dk_ptr", "h_ptr", "dh_ptr",
      "a_ptr"}
I32 = {"cu_ptr", "co_ptr", "ct_ptr"}

def types(n):
    if n.endswith("_ptr"):
        return "*bf16" if n in BF else ("*i32" if n in I32 else "*fp32")
    return "fp32" if n == "scale" else "i32"

def build(fn, consts, warps, stages=2):
    consts = dict(consts)
    for p in fn.params:   # flags with defaults (the delta rule's) as a plain call leaves them
        if p.name not in consts and p.has_default and (p.is_constexpr or p.default is None):
            consts[p.name] = p.default
    sig = {n: ("constexpr" if n in consts else types(n)) for n in fn.arg_names}
    t = time.time()
    k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "num_stages": stages})
    md = k.metadata
    print(f"{fn.__name__:20s} {str({x: consts[x] for x in consts if x in ('GATE','G_FROM_VS','HAS_VS','BT','BK','BV')}):70s} "
          f"smem {md.shared} ({time.time()-t:.1f}s)", flush=True)

only = ["0", "2", "ssd"]
for mode in only:
    gate = {"0": 0, "1": 1, "2": 2, "ssd": 1}[mode]
    ssd = mode == "ssd"
    BT = 64
    base = dict(GATE=gate, G_FROM_VS=ssd, IS_VARLEN=True, BT=BT, DT=tl.bfloat16, IEEE=0)
    BKF = 128
    build(F._state_kernel, dict(base, HAS_VS=ssd, HAS_H0=True, STORE_H=True, BK=64, BV=64), 4)
    build(F._output_kernel, dict(base, HAS_VS=ssd, BK=64, BV=128 if gate == 2 else 64), 4)
    build(Bw._state_grad_kernel, dict(base, HAS_DHT=True, BK=64, BV=64), 4)
    build(Bw._dv_kernel, dict(base, HAS_VS=ssd, BK=64, BV=64), 4)
    if gate == 2:
        gl = dict(IS_VARLEN=True, BT=BT, SUB=8, BK=64)
        build(Gl._cumsum_kernel, dict(IS_VARLEN=True, BT=BT, BK=64), 4)
        for d4 in (True, False):
            build(Gl._intra_kernel, dict(gl, DT=tl.bfloat16, IEEE=0, DIAG4=d4), 8)
            build(Gl._dqkg_kernel, dict(gl, BV=64, DT=tl.bfloat16, IEEE=0, DIAG4=d4), 8, 1)
        tr = dict(IS_VARLEN=True, BT=BT, NLEV=6, BK=32, DT=tl.bfloat16, IEEE=0, FAST_SPAN=40.0)
        build(Gl._intra_tree_kernel, tr, 8, 1)
        build(Gl._fwd_tree_kernel, dict(tr, BV=128), 8, 1)
        build(Gl._dqkg_tree_kernel, dict(tr, BV=64), 8, 1)
    else:
        build(Bw._dqk_kernel, dict(base, HAS_VS=ssd, SUB=16, BK=BKF, BV=64), 8)
print("compiled")
'''


def test_engine_kernels_compile_for_sm90():
    """The interpreter does not run the GPU compiler: build every stage of the chunked engine for
    sm_90 at the GPU's tiles (bf16 tensor-core operands, K = V = 128; GLA and SSD flags)."""
    from conftest import compile_for_sm90
    res = compile_for_sm90(_COMPILE_SCRIPT)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("z0,want_z,T", [(False, False, 64), (True, True, 70), (True, False, 33),
                                         (False, True, 130)])
def test_fused_normalize_matches_torch_ops(dtype, z0, want_z, T):
    """The one-launch normalize (triton.normalize_fwd / _bwd, issue 8) against _Normalize's torch
    ops: out, the final key sum, and every input gradient, including the gradient of the final
    key sum alone (no output gradient) and subsets of the inputs needing one; T not a multiple
    of the row block; K, V not powers of two and V over one V tile."""
    if "triton" not in kernel_backends():
        pytest.skip("needs the Triton backend (GPU or TRITON_INTERPRET=1)")
    from ssm_kernels.linear_attn import interface as la
    torch.manual_seed(0)
    B, H, K, V = 2, 3, 24, 80
    o = torch.randn(B, T, H, V, device=DEVICE).to(dtype)
    q, k = (torch.rand(B, T, H, K, device=DEVICE).to(dtype) for _ in range(2))
    zz = torch.rand(B, 1, H, K, device=DEVICE) if z0 else None
    assert la._use_fused_norm(o, q, k, zz, "triton")
    for needs in ((True, True, True, True), (False, True, False, True), (True, False, True, False)):
        res = []
        for fused in (False, True):
            leaves = [x.detach().clone().requires_grad_(n) if x is not None else None
                      for x, n in zip((o, q, k, zz), needs)]
            out, z = la._Normalize.apply(*leaves, 0.3, want_z, fused)
            loss = (out.float() * torch.linspace(-1, 1, V, device=DEVICE)).square().sum()
            if want_z:
                loss = loss + (z * torch.arange(K, device=DEVICE)).sum()
            grads = torch.autograd.grad(loss, [x for x in leaves if x is not None and x.requires_grad],
                                        retain_graph=True)
            zonly = ()
            if want_z:   # the final key sum's gradient alone
                zonly = torch.autograd.grad((z * 2).sum(), [x for x in leaves if x is not None and
                                                            x.requires_grad], allow_unused=True)
                zonly = [torch.zeros(()) if g is None else g for g in zonly]
            res.append((out, z, grads, zonly))
        (o1, z1, g1, zo1), (o2, z2, g2, zo2) = res
        tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
        assert o1.dtype == o2.dtype and o1.shape == o2.shape
        torch.testing.assert_close(o2.float(), o1.float(), **tol)
        if want_z:
            torch.testing.assert_close(z2, z1.reshape(z2.shape), **tol)
        for a, b in zip(g2, g1):
            assert a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(a.float(), b.float(), **tol)
        for a, b in zip(zo2, zo1):
            torch.testing.assert_close(a.float(), b.float(), **tol)
    # the public call takes it, and without a gradient too (no saved tensors)
    with torch.no_grad():
        ref = la._normalized(o, q, k, zz, 0.3, want_z, None, "reference")
        got = la._normalized(o, q, k, zz, 0.3, want_z, None, "triton")
    torch.testing.assert_close(got[0].float(), ref[0].float(), **tol)
