"""The chunk engine's segment-parallel backward (common.SEG_BWD: 1 = the per-chunk states h
recomputed in segments, fwd.py `seg_chunk_states`; 2 = the reverse state-gradient scan in segments
too, bwd.py `seg_state_grads`) against the float64 references and against the serial per-row
passes (SEG_BWD=0): plain and scalar-decay linear attention, SSD with grouped B/C and D, several
segments per row, rows not a multiple of the chunk or the segment, initial states and a final-state
cotangent."""
import pytest
import torch
import triton

from ssm_kernels.chunk import bwd as cb, common, fwd as cf

from conftest import DEVICE, kernel_backends

pytestmark = pytest.mark.skipif("triton" not in kernel_backends(), reason="needs Triton")


@pytest.fixture
def small_segments(monkeypatch):
    """Chunks of 16 and segments of 2 chunks: a short row has several segments; every buffer the
    stages write starts as NaN (POISON_OUTPUTS), so an element no program writes shows up."""
    monkeypatch.setattr(common, "INTERP_CHUNK", 16)
    monkeypatch.setattr(common, "SEG_CHUNKS", 2)
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)


@pytest.mark.parametrize("seg", [1, 2])
@pytest.mark.parametrize("gate", ["none", "g"])
def test_linear_attn_grads_vs_float64(small_segments, monkeypatch, seg, gate):
    """Every gradient (q, k, v, g, h0) and the outputs against the float64 recurrence, B2 T83
    (6 chunks, 3 segments per row, the last ones partial), float32, h0 and a final-state
    cotangent."""
    from test_linear_attn import compare_to_reference
    monkeypatch.setattr(common, "SEG_BWD", seg)
    compare_to_reference("triton", gate, 2, 83, 2, 32, 24)


@pytest.mark.parametrize("seg", [1, 2])
def test_linear_attn_grads_bf16(small_segments, monkeypatch, seg):
    from test_linear_attn import compare_to_reference
    monkeypatch.setattr(common, "SEG_BWD", seg)
    compare_to_reference("triton", "g", 1, 70, 2, 32, 32, dtype=torch.bfloat16)


@pytest.mark.parametrize("seg", [1, 2])
def test_ssd_grads_vs_float64(small_segments, monkeypatch, seg):
    """SSD: grouped B/C (2 groups, 4 heads), D per (head, channel), z, dt_bias, initial states,
    final-state cotangent; 5 chunks / 3 segments per row."""
    from test_ssd import compare
    monkeypatch.setattr(common, "SEG_BWD", seg)
    compare("triton", 2, 70, 4, 16, 2, 32)


def _engine_inputs(case, dtype, T=83):
    torch.manual_seed(1)
    B = 2
    if case == "ssd":              # q = C, k = B (2 groups), v = x, vs = dt, A, D
        H, HQ, K, V = 4, 2, 32, 16
    else:
        H, HQ, K, V = 2, 2, 32, 24
    q, k = (torch.randn(2, B, T, HQ, K, device=DEVICE) * K ** -0.25).to(dtype).unbind(0)
    v = torch.randn(B, T, H, V, device=DEVICE).to(dtype)
    g = vs = A = D = None
    if case == "g":
        g = -torch.rand(B, T, H, device=DEVICE) * 0.3
    if case == "ssd":
        vs = torch.rand(B, T, H, device=DEVICE) * 0.5
        A = -torch.rand(H, device=DEVICE)
        D = torch.randn(H, V, device=DEVICE)
    h0 = torch.randn(B, H, K, V, device=DEVICE)
    do = torch.randn(B, T, H, V, device=DEVICE).to(dtype)
    dht = torch.randn(B, H, K, V, device=DEVICE)
    scale = 1.0 if case == "ssd" else K ** -0.5
    return (q, k, v, g, h0, None, scale, do, dht), dict(vs=vs, A=A, D=D)


@pytest.mark.parametrize("dtype,T", [(torch.float32, 83), (torch.bfloat16, 83),
                                     (torch.float32, 20), (torch.float32, 64)],
                         ids=["fp32", "bf16", "fp32-one-partial-segment", "fp32-whole-segments"])
@pytest.mark.parametrize("case", ["none", "g", "ssd"])
def test_engine_bwd_vs_serial(small_segments, monkeypatch, case, dtype, T):
    """chunk_bwd's results with SEG_BWD 1 and 2 against SEG_BWD=0 (the serial passes), and the
    recomputed h / dh themselves: same math, other summation order (float32 tight; bf16 within
    the rounding of the stored states). T=83: 3 segments of 32 tokens per row, the last partial;
    20: one partial segment; 64: two whole segments."""
    args, kw = _engine_inputs(case, dtype, T)
    ref = cb.chunk_bwd(*args, **kw)
    q, k, v, g, h0, _, scale, do, dht = args
    p = cf.Plan(q, v, g, None, kw["A"] is not None)
    h_ref, _ = cf.chunk_states(p, k, v, g, kw["vs"], kw["A"], h0)
    h, gs = cf.seg_chunk_states(p, k, v, g, kw["vs"], kw["A"], h0)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(h.float(), h_ref.float(), **tol)
    for seg in (1, 2):
        monkeypatch.setattr(common, "SEG_BWD", seg)
        out = cb.chunk_bwd(*args, **kw)
        assert len(out) == len(ref)
        for i, (a, b) in enumerate(zip(out, ref)):
            if b is None:
                assert a is None
                continue
            assert torch.isfinite(a).all(), f"SEG_BWD={seg} result {i} not finite"
            if dtype == torch.float32:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4,
                                           msg=lambda m: f"SEG_BWD={seg} result {i}: {m}")
            else:       # bf16: h / dh rounded to bf16 from differently summed float32 states
                err = (a.float() - b.float()).norm() / b.float().norm()
                assert err < 2e-2, f"SEG_BWD={seg} result {i}: rel err {err:.2e}"
    # dh and dh0 of the segmented reverse scan against the serial kernel's
    monkeypatch.setattr(common, "SEG_BWD", 0)
    dh, dh0 = cb.seg_state_grads(p, q, do, g, kw["vs"], kw["A"], dht, gs, scale)
    dh_ref = torch.empty_like(dh)
    dh0_ref = torch.empty_like(dh0)
    d = cf._dummy(do)
    m = p.meta
    cb._state_grad_kernel[(triton.cdiv(p.K, m["BK"]), triton.cdiv(p.V, m["BV"]), p.N * p.H)](
        q, do, d if g is None else g, d if kw["vs"] is None else kw["vs"],
        d if kw["A"] is None else kw["A"], dht, dh_ref, dh0_ref, d, d,
        p.T, p.H, p.HQ, p.K, p.V, float(scale), GATE=p.gate, G_FROM_VS=kw["A"] is not None,
        HAS_DHT=True, IS_VARLEN=False, BT=p.BT, BK=m["BK"], BV=m["BV"], DT=m["DT"],
        IEEE=m["IEEE"], num_warps=4)
    torch.testing.assert_close(dh.float(), dh_ref.float(), **tol)
    torch.testing.assert_close(dh0, dh0_ref, **tol)


def test_auto_rule(small_segments, monkeypatch):
    """SEG_BWD=-1: segments for rows of at least SEG_BWD_MIN_CHUNKS chunks (here 6 >= 4: on, the
    segment recompute runs), else the serial passes (6 < 8: seg_chunk_states not called)."""
    args, kw = _engine_inputs("g", torch.float32)
    monkeypatch.setattr(common, "SEG_BWD", -1)
    calls = []
    real = cf.seg_chunk_states
    monkeypatch.setattr(cb, "seg_chunk_states", lambda *a: calls.append(1) or real(*a))
    for min_chunks, used in ((4, True), (8, False)):
        calls.clear()
        monkeypatch.setattr(common, "SEG_BWD_MIN_CHUNKS", min_chunks)
        cb.chunk_bwd(*args, **kw)
        assert bool(calls) == used
