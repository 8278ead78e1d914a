"""The host path on the GPU: every public op's default call path makes no device-to-host sync,
captures in a CUDA graph (forward, and forward+backward for training ops, with and without
initial states and cu_seqlens) and replays bitwise like eager; debug-mode value checks raise."""
import pytest
import torch
import torch.nn.functional as F

import ssm_kernels as sk

pytestmark = pytest.mark.gpu
dev = "cuda"
bf16 = torch.bfloat16


def _r(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=dev, dtype=dtype)


def _logsig(*shape):
    return F.logsigmoid(_r(*shape))


def _cu(*lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=dev, dtype=torch.int32)


def _outputs(out):
    """The tensors of an op's result, nested tuples flattened (fla's normalised state is a pair)."""
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _outputs(o)]
    return [] if out is None else [out]


def _case_fns():
    """name -> (call, leaves[, state]): call() runs the op and returns its outputs; leaves are the
    inputs that get gradients in the training variant (empty for inference-only ops); state is a
    tensor the op updates in place (restored before each compared run)."""
    c = {}
    a, b, h0 = torch.rand(2, 300, 64, device=dev), _r(2, 300, 64), _r(2, 64)
    c["linear_scan"] = (lambda: sk.linear_scan(a, b), [a, b])
    c["linear_scan h0 final"] = (lambda: sk.linear_scan(a, b, h0, output_final_state=True), [a, b, h0])
    ab, bb = a.to(bf16), b.to(bf16)
    c["linear_scan bf16 [B,D,T]"] = (lambda: sk.linear_scan(ab.mT, bb.mT, dim=-1), [ab, bb])
    lam = torch.polar(torch.rand(2, 100, 8, device=dev), torch.rand(2, 100, 8, device=dev))
    x = torch.randn(2, 100, 8, device=dev, dtype=torch.complex64)
    c["linear_scan complex"] = (lambda: sk.linear_scan(lam, x), [x])

    D_, L, N = 32, 300, 16
    u, dt, z = _r(2, D_, L, dtype=bf16), _r(2, D_, L, dtype=bf16), _r(2, D_, L, dtype=bf16)
    A = -torch.rand(D_, N, device=dev)
    Bv, Cv = _r(2, 1, N, L, dtype=bf16), _r(2, 1, N, L, dtype=bf16)
    Dp, bias, hs = _r(D_), _r(D_), _r(2, D_, N)
    c["selective_scan_fn"] = (lambda: sk.selective_scan_fn(u, dt, A, Bv, Cv, Dp, z, bias, True),
                              [u, dt, A, Bv, Cv, Dp, z, bias])
    c["selective_scan_fn h0 last"] = (lambda: sk.selective_scan_fn(
        u, dt, A, Bv, Cv, Dp, z, bias, True, True, initial_state=hs), [u, dt, Bv, hs])
    u1, dt1, B1, C1 = u[:1], dt[:1], Bv[:1], Cv[:1]
    cu = _cu(100, 1, 199)
    c["selective_scan_fn varlen"] = (lambda: sk.selective_scan_fn(
        u1, dt1, A, B1, C1, Dp, None, bias, True, True, cu_seqlens=cu), [u1, dt1, A])

    st = _r(8, 256, 16)
    xs, dts, zs = _r(8, 256, dtype=bf16), _r(8, 256, dtype=bf16), _r(8, 256, dtype=bf16)
    As, Bs, Cs = -torch.rand(256, 16, device=dev), _r(8, 16, dtype=bf16), _r(8, 16, dtype=bf16)
    Dsu, bsu = _r(256), _r(256)
    c["selective_state_update"] = (lambda: sk.selective_state_update(
        st, xs, dts, As, Bs, Cs, Dsu, zs, bsu, True), [], st)

    B, T, H, K = 2, 150, 2, 32
    q, k, v = (_r(B, T, H, K, dtype=bf16) for _ in range(3))
    gh, gk = _logsig(B, T, H), _logsig(B, T, H, K)
    hq = _r(B, H, K, K)
    q1, k1, v1, gh1, gk1 = q[:1], k[:1], v[:1], gh[:1], gk[:1]
    cu2 = _cu(70, 80)
    h2 = _r(2, H, K, K)
    for name, gate, gate1 in (("chunk_linear_attn", (), ()), ("chunk_simple_gla", (gh,), (gh1,)),
                              ("chunk_gla", (gk,), (gk1,))):
        f = getattr(sk, name)
        c[name] = (lambda f=f, gate=gate: f(q, k, v, *gate), [q, k, v, *gate])
        c[name + " h0 final"] = (lambda f=f, gate=gate: f(q, k, v, *gate, initial_state=hq,
                                                            output_final_state=True), [q, k, v, hq])
        c[name + " varlen"] = (lambda f=f, gate1=gate1: f(q1, k1, v1, *gate1, initial_state=h2,
                                                           output_final_state=True, cu_seqlens=cu2),
                               [q1, k1, v1, h2])
    qd, kd, vd = (_r(16, 1, H, K, dtype=bf16) for _ in range(3))
    hd = _r(16, H, K, K)
    c["fused_recurrent_linear_attn decode"] = (lambda: sk.fused_recurrent_linear_attn(
        qd, kd, vd, initial_state=hd, output_final_state=True), [])
    gd, gkd = _logsig(16, 1, H), _logsig(16, 1, H, K)
    c["fused_recurrent_simple_gla decode"] = (lambda: sk.fused_recurrent_simple_gla(
        qd, kd, vd, gd, initial_state=hd, output_final_state=True), [])
    c["fused_recurrent_gla decode"] = (lambda: sk.fused_recurrent_gla(
        qd, kd, vd, gkd, initial_state=hd, output_final_state=True), [])

    qb, kb = _r(B, T, H, 16, dtype=bf16), _r(B, T, H, 16, dtype=bf16)
    vb = _r(B, T, H, 32, dtype=bf16)
    c["chunk_based"] = (lambda: sk.chunk_based(qb, kb, vb), [qb, kb, vb])
    c["chunk_based varlen final"] = (lambda: sk.chunk_based(
        qb[:1], kb[:1], vb[:1], output_final_state=True, cu_seqlens=cu2), [qb, kb, vb])
    c["fused_recurrent_based"] = (lambda: sk.fused_recurrent_based(qb, kb, vb), [])

    # delta rule: q/k heads H, value heads 2H (GVA); Triton forward and backward kernels
    qn, kn = _r(B, T, H, K, dtype=bf16), F.normalize(_r(B, T, H, K), dim=-1).to(bf16)
    vn, gn, bn = _r(B, T, 2 * H, 48, dtype=bf16), _logsig(B, T, 2 * H), torch.rand(B, T, 2 * H, device=dev)
    hn = _r(B, 2 * H, K, 48)
    c["chunk_gated_delta_rule"] = (lambda: sk.chunk_gated_delta_rule(
        qn, kn, vn, gn, bn, initial_state=hn, output_final_state=True), [qn, kn, vn, gn, bn, hn])
    c["chunk_delta_rule l2norm"] = (lambda: sk.chunk_delta_rule(
        qn, kn, vn, bn, use_qk_l2norm_in_kernel=True), [qn, kn, vn, bn])
    c["chunk_gated_delta_rule varlen"] = (lambda: sk.chunk_gated_delta_rule(
        qn[:1], kn[:1], vn[:1], gn[:1], bn[:1], initial_state=hn, output_final_state=True,
        cu_seqlens=cu2), [qn, kn, vn, gn, bn, hn])
    sdn = _r(16, 2 * H, K, 48)
    qs, ks = _r(16, 1, H, K, dtype=bf16), _r(16, 1, H, K, dtype=bf16)
    vs, gs, bs = _r(16, 1, 2 * H, 48, dtype=bf16), _logsig(16, 1, 2 * H), torch.rand(16, 1, 2 * H, device=dev)
    c["fused_recurrent_gated_delta_rule decode in place"] = (
        lambda: sk.fused_recurrent_gated_delta_rule(qs, ks, vs, gs, bs, initial_state=sdn,
                                                    use_qk_l2norm_in_kernel=True,
                                                    inplace_final_state=True), [], sdn)

    uc, kc, Dc = _r(2, 24, 1000), _r(24, 1000), _r(24)
    pg, qg = _r(2, 24, 1000), _r(2, 24, 1000)
    c["fft_conv"] = (lambda: sk.fft_conv(uc, kc, Dc), [uc, kc, Dc])
    c["fft_conv gates"] = (lambda: sk.fft_conv(uc, kc, Dc, pre_gate=pg, post_gate=qg), [uc, kc, pg, qg])
    # 16-bit storage: monarch16, unblocked (L = 1024, N = 2048) and row-blocked by default
    # (L = 2048, N = 4096: BJ 32, 4 warps), the filter and DFT tables cached outside the capture
    # (own names: the lambdas above read qb, kb, L late, when they run)
    for Lf in (1024, 2048):
        uf, pf, qf = (_r(2, 24, Lf, dtype=bf16) for _ in range(3))
        kf = _r(24, Lf) / Lf ** 0.5
        c[f"fft_conv bf16 L{Lf}"] = (lambda uf=uf, kf=kf: sk.fft_conv(uf, kf, Dc), [uf, kf, Dc])
        c[f"fft_conv bf16 L{Lf} gates"] = (
            lambda uf=uf, kf=kf, pf=pf, qf=qf: sk.fft_conv(uf, kf, Dc, pre_gate=pf, post_gate=qf),
            [uf, kf, pf, qf])
    log_dt, As4 = _r(24) * 0.1 - 3, torch.complex(-torch.rand(24, 16, device=dev), _r(24, 16))
    C4 = torch.randn(24, 16, device=dev, dtype=torch.complex64)
    c["s4d_kernel"] = (lambda: sk.s4d_kernel(log_dt, As4, C4, 500), [log_dt])
    return c


CASES = _case_fns() if torch.cuda.is_available() else {}
NAMES = sorted(CASES) if CASES else ["none"]


def _step(call, leaves, train):
    if not train:
        return _outputs(call())
    outs = _outputs(call())
    loss = sum((o.float() if not o.is_complex() else o.real).sum() * (i + 1) for i, o in enumerate(outs))
    grads = torch.autograd.grad(loss, leaves)
    return outs + list(grads)


def _run(name, train):
    call, leaves, *state = CASES[name]
    if train and not leaves:
        pytest.skip("inference-only op")
    leaves = [x.requires_grad_() for x in leaves] if train else []
    # an op that updates a state in place advances it on every call: restore it before each
    # compared run so eager and replay start from the same state
    state = state[0] if state else None
    saved = None if state is None else state.clone()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream (compile, autotune, caches)
        for _ in range(2):
            _step(call, leaves, train)
    torch.cuda.current_stream().wait_stream(side)

    if saved is not None:
        state.copy_(saved)
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager = [t.detach().clone() for t in _step(call, leaves, train)]
    finally:
        torch.cuda.set_sync_debug_mode(0)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = _step(call, leaves, train)
    if saved is not None:
        state.copy_(saved)
    graph.replay()
    torch.cuda.synchronize()
    assert len(eager) == len(static)
    for i, (e, r) in enumerate(zip(eager, static)):
        assert torch.equal(e, r), f"{name}: output {i} differs between eager and graph replay"


@pytest.mark.parametrize("name", NAMES)
def test_capture_forward(name):
    _run(name, train=False)


@pytest.mark.parametrize("name", NAMES)
def test_capture_forward_backward(name):
    _run(name, train=True)


def test_debug_mode_value_checks_on_gpu():
    q = k = v = _r(1, 20, 2, 16)
    g = _logsig(1, 20, 2).abs()  # > 0: invalid log-decay
    sk.chunk_simple_gla(q, k, v, g)  # default: not checked (a check would sync)
    torch.cuda.synchronize()
    sk.set_debug(True)
    try:
        with pytest.raises(ValueError, match="chunk_simple_gla: g holds log-decays"):
            sk.chunk_simple_gla(q, k, v, g)
        bad = torch.tensor([0, 12, 5, 20], device=dev, dtype=torch.int32)
        with pytest.raises(ValueError, match="cu_seqlens"):
            sk.chunk_linear_attn(q, k, v, cu_seqlens=bad)
    finally:
        sk.set_debug(False)
