"""linear_scan kernels touch only their arguments (interpreter): every active load / store address
lies inside a tensor argument, the guard zones around every input stay untouched, and no output
depends on what lies next to the inputs (NaN guards vs no guards: bit-equal).

Regression: the register-shift backward (`_linear_scan_bwd_tinner_kernel`, reverse=False) read up
to BLOCK_T - V elements before `a` for channel 0 whenever a tile started below t=0 (the prefetched
tile after the last with BWD_PREFETCH, or T not a multiple of BLOCK_T): an illegal memory access
on the H100 in bench/gpu_linear_scan.py (bf16, autograd after other allocations) when the memory
below the tensor was unmapped."""
import pytest
import torch

from conftest import DEVICE, kernel_backends
from guard_zone import checked_access, guarded, guards_intact

pytestmark = pytest.mark.skipif(DEVICE != "cpu" or "triton" not in kernel_backends(),
                                reason="interpreter check (CPU, TRITON_INTERPRET=1)")

KNOBS = {"old": (False, False), "reg": (True, False), "reg+pf": (True, True)}
PAD = 64
FILL = float("nan")


def _inputs(dtype, P, T, Q, h0, carry):
    g = torch.Generator().manual_seed(0)
    sh = (P, T, Q)
    sdt = torch.complex64 if dtype.is_complex else torch.float32
    a = (torch.rand(sh, generator=g) * 0.5 + 0.5).to(dtype)
    b = torch.randn(sh, generator=g).to(dtype)
    dh = torch.randn(sh, generator=g).to(dtype)
    s0 = torch.randn(P, Q, generator=g).to(sdt) if h0 else None
    dT = torch.randn(P, Q, generator=g).to(sdt) if carry else None
    return a, b, dh, s0, dT


def _run(K, ins, reverse, fill):
    """Forward then backward through the launchers; fill=None: plain tensors, else every input
    (and the forward's h fed to the backward) inside guard zones holding `fill`."""
    a, b, dh, s0, dT = ins
    P, T, Q = a.shape
    g = (lambda x: x) if fill is None else (lambda x: None if x is None else guarded(x, PAD, fill))
    with checked_access() as log:
        fa, fb, f0 = g(a), g(b), g(s0)
        h, hT = K.linear_scan_fwd(fa, fb, f0, reverse, pq=(P, T, Q))
        ba, bh, b0, bd, bT = g(a), g(h), g(s0), g(dh), g(dT)
        da, db, dh0 = K.linear_scan_bwd(ba, bh, b0, bd, bT, reverse, pq=(P, T, Q))
        SA, SB = K.linear_scan_summary(fa, fb, reverse)
        adj = K.linear_scan_adjoint(ba, bd, reverse)
    log.assert_clean()
    if fill is not None:
        for x in (fa, fb, f0, ba, bh, b0, bd, bT):
            assert x is None or guards_intact(x, PAD, fill)
    return log, (h, hT, da, db, dh0, SA, SB, adj)


def _check(knob, dtype, P, T, Q, reverse, h0, carry, cfg=None, monkeypatch=None):
    from ssm_kernels.linear_scan import triton as K
    monkeypatch.setattr(K, "BWD_REG_SHIFT", KNOBS[knob][0])
    monkeypatch.setattr(K, "BWD_PREFETCH", KNOBS[knob][1])
    if cfg is not None:   # the GPU's tile on a small problem (same masks, same edge logic)
        bc, bt, w = cfg
        orig = K._config
        monkeypatch.setattr(K, "_config", lambda T, C, ti, cp, eb, bwd=False: dict(
            BLOCK_T=min(bt, max(16, K.next_power_of_2(T))), BLOCK_C=bc, num_warps=w)
            if ti else orig(T, C, ti, cp, eb, bwd))
    K._plan.cache_clear()
    try:
        ins = _inputs(dtype, P, T, Q, h0, carry)
        log, plain = _run(K, ins, reverse, None)
        _, outs = _run(K, ins, reverse, FILL)   # NaN guards: any use of them shows in the outputs
        for x, y in zip(plain, outs):
            assert torch.equal(x, y), "an output depends on memory next to the inputs"
        return log
    finally:
        K._plan.cache_clear()


@pytest.mark.parametrize("knob", list(KNOBS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T,h0,carry", [(40, False, False), (64, True, True), (80, True, False)])
def test_time_inner_guard_zones(monkeypatch, knob, dtype, reverse, T, h0, carry):
    """[B, D, T] (time innermost): T=40 (first tile padded below t=0 when reverse=False), 64 (a
    multiple of the tile), 80 (split into 2 chunks: summary pass + full pass)."""
    log = _check(knob, dtype, 2, T, 1, reverse, h0, carry, monkeypatch=monkeypatch)
    assert ("_linear_scan_bwd_tinner_kernel" in log.launches) == (knob != "old"), log.launches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.complex64])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("P,T,Q,h0,carry", [(2, 20, 9, True, True), (1, 100, 2, False, True)])
def test_channels_inner_and_complex_guard_zones(monkeypatch, dtype, reverse, P, T, Q, h0, carry):
    """[B, T, D] (the shifted-load kernel) and complex64, incl. a time split (T=100, 1 program: 2 chunks)."""
    _check("reg", dtype, P, T, Q, reverse, h0, carry, monkeypatch=monkeypatch)


@pytest.mark.parametrize("cfg", [(2, 2048, 8), (1, 1024, 4)])
def test_gpu_tile_prefetch_guard_zones(monkeypatch, cfg):
    """The failing H100 case's tiles (bf16 backward, old default (2, 2048, 8) and new (1, 1024, 4)),
    BWD_PREFETCH, T = one tile: before the fix channel 0 read a[-(BLOCK_T - 8)..-8] (the
    prefetched tile after the last)."""
    _check("reg+pf", torch.bfloat16, 2, cfg[1], 1, False, False, True, cfg, monkeypatch)


def test_autograd_path_guard_zones(monkeypatch):
    """The failing call: sk.linear_scan on [B, D, T], dim=-1, then autograd.grad (dhT: zeros from
    autograd -> HAS_CARRY), inputs in guard zones."""
    import ssm_kernels as sk
    from ssm_kernels.linear_scan import triton as K
    monkeypatch.setattr(K, "BWD_REG_SHIFT", True)
    monkeypatch.setattr(K, "BWD_PREFETCH", True)
    K._plan.cache_clear()
    g = torch.Generator().manual_seed(0)
    a = guarded((torch.rand(2, 3, 40, generator=g) * 0.5 + 0.5).bfloat16(), PAD, float("nan"))
    b = guarded(torch.randn(2, 3, 40, generator=g).bfloat16(), PAD, float("nan"))
    dh = guarded(torch.randn(2, 3, 40, generator=g).bfloat16(), PAD, float("nan"))
    a.requires_grad_()
    b.requires_grad_()
    with checked_access() as log:
        h = sk.linear_scan(a, b, dim=-1, backend="triton")
        da, db = torch.autograd.grad(h, (a, b), dh)
    log.assert_clean()
    assert "_linear_scan_bwd_tinner_kernel" in log.launches
    assert torch.isfinite(da.float()).all() and torch.isfinite(db.float()).all()


def _dummy_in_guards(dtype):
    """A 1-element NaN tensor inside a wide NaN-guarded buffer: checked_access reports any access
    past its one element (an address in no argument), and a store to the element itself shows as
    a non-NaN value (a stray write lands in the buffer, not in other memory)."""
    buf = torch.full((2 * 4096 + 1,), FILL, dtype=dtype)
    return buf[4096:4097]


@pytest.mark.parametrize("knob", ["old", "reg"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.complex64])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("P,T,Q,h0,carry", [(2, 40, 1, True, True), (2, 80, 1, True, False),
                                           (2, 20, 9, True, True), (1, 100, 2, False, True)])
def test_skipped_outputs_never_touch_the_dummy(monkeypatch, knob, dtype, reverse, P, T, Q, h0, carry):
    """final=False (no hT: STORE_HT off) and want_dh0=False (no dh0: STORE_DH0 off) pass the shared
    dummy where the output was: nothing may be stored through it (here a NaN element in a NaN
    buffer: checked_access flags any access past it, a store to it replaces the NaN), and every other output is bit-equal to the full call's. Time
    innermost and channels innermost, one chunk and split time (T=80, 100: summary passes)."""
    from ssm_kernels.linear_scan import triton as K
    if dtype.is_complex and Q == 1 and knob == "reg":
        pytest.skip("complex takes the shifted-load kernel (covered by knob 'old')")
    monkeypatch.setattr(K, "BWD_REG_SHIFT", KNOBS[knob][0])
    monkeypatch.setattr(K, "BWD_PREFETCH", KNOBS[knob][1])
    K._plan.cache_clear()
    used = []

    def dummy(like):
        used.append(_dummy_in_guards(like.dtype))
        return used[-1]
    monkeypatch.setattr(K, "_dummy", dummy)
    try:
        a, b, dh, s0, dT = _inputs(dtype, P, T, Q, h0, carry)
        pq = (P, T, Q)
        with checked_access() as log:   # (split time: the full call's dropped chunk ends too)
            h_full, hT = K.linear_scan_fwd(a, b, s0, reverse, pq=pq)
            full = K.linear_scan_bwd(a, h_full, s0, dh, dT, reverse, pq=pq)
            n_full = len(used)
            h, none = K.linear_scan_fwd(a, b, s0, reverse, pq=pq, final=False)
            da, db, none0 = K.linear_scan_bwd(a, h, s0, dh, dT, reverse, pq=pq, want_dh0=False)
        log.assert_clean()
        assert none is None and none0 is None and len(used) >= n_full + 2
        for d in used:   # never written (the same NaN bits as when made)
            assert guards_intact(d, 4096, FILL) and torch.isnan(d.float() if not d.is_complex() else torch.view_as_real(d)).all()
        assert torch.equal(h, h_full) and torch.equal(da, full[0]) and torch.equal(db, full[1])
        assert hT is not None and torch.isfinite(torch.view_as_real(hT) if hT.is_complex() else hT).all()
    finally:
        K._plan.cache_clear()


@pytest.mark.parametrize("h0_grad", [None, False, True])
@pytest.mark.parametrize("final", [False, True])
def test_public_call_allocates_only_what_is_read(monkeypatch, h0_grad, final):
    """Through sk.linear_scan and autograd: the final state is computed only with
    output_final_state, dh0 only for an initial state that needs a gradient (the launchers'
    final / want_dh0 flags); gradients equal the reference backend's either way."""
    import ssm_kernels as sk
    from ssm_kernels.linear_scan import interface as I
    g = torch.Generator().manual_seed(1)
    a = (torch.rand(2, 24, 3, generator=g) * 0.5 + 0.5)
    b = torch.randn(2, 24, 3, generator=g)
    s0 = None if h0_grad is None else torch.randn(2, 3, generator=g)
    flags = []
    fwd, bwd = I._fwd, I._bwd
    monkeypatch.setattr(I, "_fwd", lambda *x: (flags.append(("fwd", x[-1])), fwd(*x))[1])
    monkeypatch.setattr(I, "_bwd", lambda *x: (flags.append(("bwd", x[-1])), bwd(*x))[1])
    res = {}
    for backend in ("triton", "reference"):
        al, bl = a.clone().requires_grad_(), b.clone().requires_grad_()
        sl = None if s0 is None else s0.clone().requires_grad_(bool(h0_grad))
        out = sk.linear_scan(al, bl, sl, output_final_state=final, backend=backend)
        assert isinstance(out, tuple) == final
        h = out[0] if final else out
        loss = h.square().sum() + (out[1].square().sum() if final else 0)
        leaves = [al, bl] + ([sl] if h0_grad else [])
        res[backend] = torch.autograd.grad(loss, leaves)
    assert flags == [("fwd", final), ("bwd", bool(h0_grad))] * 2, flags
    for x, y in zip(res["triton"], res["reference"]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
