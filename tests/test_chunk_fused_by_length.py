"""The two-level forward chosen by row length (chunk.common FUSED_FWD_MIN_T with FUSED_LONG's knobs;
fwd.py `fused_fwd_knobs`, issue 10 session 10 helper engine10): 16-bit B rows of gate 0 / 1 (SSD
under its own key) at least the threshold long take it, shorter rows, float32, packed batches and
chunk_gla keep the per-chunk-state path. Checked: the path by the launched kernels, o / ht bitwise
those of FUSED_FWD=1 forced with the same knobs set on the module, against float64, the module's
knobs untouched; training gradients bitwise those of the per-chunk path; `saved_layout` (what the
ops' fake implementations use) agrees with the path the forward took; opcheck and
torch.compile(fullgraph=True) with the rule on. Thresholds are set low (interpreter shapes)."""
import os

import pytest
import torch

import ssm_kernels as sk
from ssm_kernels.chunk import common, fwd as cf

from conftest import DEVICE, kernel_backends
from test_chunk_fused import (_check_ssd_packed, _check_vs_ref, _la_call, _la_inputs, _ssd_infer,
                              _ssd_inputs, _ssd_refs)
from ssm_kernels.testing import assert_close

pytestmark = pytest.mark.skipif("triton" not in kernel_backends(), reason="needs Triton")

INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# the long path's knobs in these tests: the H100's "two-level tma scan bv32 w4 st2" set with a V
# tile of 16 (two V tiles at V=32) and stage 1 stepping over two chunks
LONG = dict(FUSED_TMA=True, LOOKBACK_SEGS=0, FUSED_BLOCK_V=16, FUSED_WARPS=4, FUSED_STAGES=2,
            FUSED_S1_STEP=32)


@pytest.fixture
def rule(monkeypatch):
    """Chunks of 16, segments of 2 chunks, poisoned outputs; FUSED_FWD 0 and the length rule on at
    64 tokens for gates 0 and 1 (not SSD) with LONG."""
    monkeypatch.setattr(common, "INTERP_CHUNK", 16)
    monkeypatch.setattr(common, "SEG_CHUNKS", 2)
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)
    monkeypatch.setattr(common, "FUSED_FWD", 0)
    monkeypatch.setattr(common, "FUSED_FWD_MIN_T", {0: 64, 1: 64})
    monkeypatch.setattr(common, "FUSED_LONG", dict(LONG))


@pytest.fixture
def spy(monkeypatch):
    """Names of the launched kernels (interpreter) and the answers of fwd._takes_tma."""
    import triton.runtime.interpreter as interp
    calls, tma = [], []
    real = interp.InterpretedFunction.run

    def run(self, *a, **k):
        calls.append(getattr(self.fn, "__name__", "?"))
        return real(self, *a, **k)
    monkeypatch.setattr(interp.InterpretedFunction, "run", run)
    orig = cf._takes_tma
    monkeypatch.setattr(cf, "_takes_tma", lambda *a: tma.append(orig(*a)) or tma[-1])
    return calls, tma


def _module_knobs():
    return {k: getattr(common, k) for k in sorted(common.FUSED_LONG_KNOBS)}


def _forced(monkeypatch, fn):
    """fn() with the length rule off and FUSED_FWD=1 forced with LONG set on the module."""
    with monkeypatch.context() as m:
        m.setattr(common, "FUSED_FWD_MIN_T", None)
        m.setattr(common, "FUSED_FWD", 1)
        for k, v in LONG.items():
            m.setattr(common, k, v)
        return fn()


def _per_chunk(monkeypatch, fn):
    with monkeypatch.context() as m:
        m.setattr(common, "FUSED_FWD_MIN_T", None)
        return fn()


@pytest.mark.skipif(not INTERP, reason="launch spy needs the interpreter")
@pytest.mark.parametrize("gate", ["none", "scalar"])
def test_path_by_length(rule, spy, monkeypatch, gate):
    """bf16 B rows: T = 48 (< 64) the per-chunk path (bitwise the rule-off output), T = 64 and 96
    the two-level forward with LONG (descriptors, stage 2, no lookback): o and ht bitwise those of
    FUSED_FWD=1 forced with LONG on the module, against float64; the module's knobs untouched."""
    calls, tma = spy
    before = _module_knobs()
    for T, long in ((48, False), (64, True), (96, True)):
        ins = _la_inputs(2, T, 2, 32, 32, gate, torch.bfloat16)
        calls.clear()
        tma.clear()
        o, ht = _la_call(*ins)
        assert calls.count("_fused_fwd_kernel") == int(long), (T, calls)
        # LOOKBACK_SEGS=0: stage 2 runs (the module's 8 would skip it at these lengths)
        assert calls.count("_seg_scan_kernel") == int(long), (T, calls)
        assert tma == ([True] if long else []), (T, tma)
        assert _module_knobs() == before, "the rule changed the module's knobs"
        _check_vs_ref(o, ht, ins, None, torch.bfloat16)
        ref = (_forced if long else _per_chunk)(monkeypatch, lambda: _la_call(*ins))
        assert torch.equal(o, ref[0]) and torch.equal(ht, ref[1]), f"T={T}"


@pytest.mark.skipif(not INTERP, reason="launch spy needs the interpreter")
def test_rule_leaves_other_calls(rule, spy, monkeypatch):
    """At T = 96 >= 64 still the per-chunk path: float32, a packed batch, chunk_gla (gate 2), SSD
    without an "ssd" key; SSD with one takes the two-level forward (and its y / states match
    FUSED_FWD=1 forced bitwise)."""
    calls, _ = spy

    def fused_launches(fn):
        calls.clear()
        out = fn()
        return calls.count("_fused_fwd_kernel"), out
    ins32 = _la_inputs(2, 96, 2, 32, 32, "scalar", torch.float32)
    assert fused_launches(lambda: _la_call(*ins32))[0] == 0
    cu = torch.tensor([0, 40, 96], device=DEVICE, dtype=torch.int32)
    insv = _la_inputs(1, 96, 2, 32, 32, "scalar", torch.bfloat16, n_seq=2)
    assert fused_launches(lambda: _la_call(*insv, cu=cu))[0] == 0
    q, k, v, _, h0 = _la_inputs(2, 96, 2, 32, 32, "none", torch.bfloat16)
    gk = -torch.rand(2, 96, 2, 32, device=DEVICE) * 0.3
    assert fused_launches(lambda: sk.chunk_gla(q, k, v, gk, initial_state=h0,
                                               backend="triton"))[0] == 0
    sins = _ssd_inputs(2, 96, 4, 16, 2, 32, "hp", True)
    assert fused_launches(lambda: _ssd_infer(sins))[0] == 0
    monkeypatch.setattr(common, "FUSED_FWD_MIN_T", {0: 64, 1: 64, "ssd": 64})
    n, (y, s) = fused_launches(lambda: _ssd_infer(sins))
    assert n == 1
    fy, fs = _forced(monkeypatch, lambda: _ssd_infer(sins))
    assert torch.equal(y, fy) and torch.equal(s, fs)
    (ry, rs), (ly, ls) = _ssd_refs(sins)
    assert_close(y, ry, dtype=torch.bfloat16, lowp_ref=ly, name="y")
    assert_close(s, rs, dtype=torch.bfloat16, lowp_ref=ls, name="states")
    # packed SSD under the rule: the per-chunk path, still right
    calls.clear()
    _check_ssd_packed()
    assert calls.count("_fused_fwd_kernel") == 0


def test_rule_rejects_unknown_knob(rule, monkeypatch):
    monkeypatch.setattr(common, "FUSED_LONG", dict(FUSED_TMA=True, H_EVERY=2))
    with pytest.raises(ValueError, match="H_EVERY"):
        cf.fused_fwd_knobs(0, False, torch.bfloat16, 128)
    assert cf.fused_fwd_knobs(0, False, torch.bfloat16, 32) is None      # short: not asked
    # FUSED_FWD forced keeps its meaning: every length, the module's own knobs (no overrides)
    monkeypatch.setattr(common, "FUSED_FWD", 1)
    assert dict(cf.fused_fwd_knobs(1, False, torch.bfloat16, 128)) == {}
    assert dict(cf.fused_fwd_knobs(1, False, torch.bfloat16, 32)) == {}
    assert cf.fused_fwd_knobs(1, False, torch.float32, 128) is None


@pytest.mark.parametrize("save", [1, 2])
@pytest.mark.parametrize("gate", ["none", "scalar"])
def test_training_by_length(rule, monkeypatch, gate, save):
    """bf16 training (h0, a cotangent on the final state) at T = 96: every gradient bitwise that of
    the per-chunk path (SAVE_STATES 1 and 2: with 2 the per-chunk path keeps h, the two-level one
    recomputes it), o bitwise that of FUSED_FWD=1 forced, o and the gradients against float64."""
    monkeypatch.setattr(common, "SAVE_STATES", save)
    base = _la_inputs(2, 96, 2, 32, 32, gate, torch.bfloat16)
    do = torch.randn(2, 96, 2, 32, device=DEVICE)
    dht = torch.randn(2, 2, 32, 32, device=DEVICE)

    def run():
        ins = [None if x is None else x.clone().requires_grad_() for x in base]
        o, ht = _la_call(*ins)
        live = [x for x in ins if x is not None]
        return o, ht, torch.autograd.grad((o.float() * do).sum() + (ht * dht).sum(), live)
    o, ht, gr = run()
    fo, fht, fgr = _forced(monkeypatch, run)
    po, pht, pgr = _per_chunk(monkeypatch, run)
    assert torch.equal(o, fo) and torch.equal(ht, fht)
    for a, b, c in zip(gr, pgr, fgr):
        assert torch.equal(a, b), "the two-level forward changed a gradient"
        assert torch.equal(a, c)
    _check_vs_ref(o, ht, base, None, torch.bfloat16)
    from ssm_kernels.linear_attn.reference import linear_attn_chunk_ref
    d = lambda t: None if t is None else t.detach().double().requires_grad_()  # noqa: E731
    rins = [d(x) for x in base]
    ro, rh = linear_attn_chunk_ref(*rins[:4], None, rins[4], None, chunk_size=16)
    rg = torch.autograd.grad((ro * do.double()).sum() + (rh * dht.double()).sum(),
                             [x for x in rins if x is not None])
    f = lambda t: None if t is None else t.detach().float().requires_grad_()  # noqa: E731
    lins = [f(x) for x in base]
    lo, lh = linear_attn_chunk_ref(*lins[:4], None, lins[4], None, chunk_size=16)
    lg = torch.autograd.grad((lo * do).sum() + (lh * dht).sum(), [x for x in lins if x is not None])
    for name, a, r, l in zip(["dq", "dk", "dv"] + (["dg"] if gate == "scalar" else []) + ["dh0"],
                             gr, rg, lg):
        assert_close(a, r, dtype=torch.bfloat16, lowp_ref=l, name=name)


SAVED_CASES = [(kind, dtype, T, varlen) for kind in ("none", "scalar", "gla", "ssd")
               for dtype in (torch.float32, torch.bfloat16) for T in (48, 64)
               for varlen in (False, True)]


@pytest.mark.skipif(not INTERP, reason="launch spy needs the interpreter")
@pytest.mark.parametrize("ssd_key", [False, True], ids=["no-ssd-key", "ssd-key"])
def test_saved_layout_agrees(rule, spy, monkeypatch, ssd_key):
    """SAVE_STATES=2, save=True: for every gate (SSD with and without its key), dtype, length
    (below / at the threshold) and B rows / packed, the engine forward keeps exactly the h that
    `saved_layout` predicts from metadata (none on the two-level path) and launches the
    two-level kernels exactly when `fused_fwd_knobs` says so."""
    calls, _ = spy
    monkeypatch.setattr(common, "SAVE_STATES", 2)
    if ssd_key:
        monkeypatch.setattr(common, "FUSED_FWD_MIN_T", {0: 64, 1: 64, "ssd": 64})
    gen = torch.Generator().manual_seed(11)
    r = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)  # noqa: E731
    taken = []
    for kind, dtype, T, varlen in SAVED_CASES:
        B = 1 if varlen else 2
        cu = torch.tensor([0, 20, T], device=DEVICE, dtype=torch.int32) if varlen else None
        q, k = (r(B, T, 2, 16) * 0.5).to(dtype), (r(B, T, 2, 16) * 0.5).to(dtype)
        v = r(B, T, 2, 16).to(dtype)
        g = vs = A = None
        if kind == "scalar":
            g = -torch.rand(B, T, 2, generator=gen).to(DEVICE) * 0.3
        elif kind == "gla":
            g = -torch.rand(B, T, 2, 16, generator=gen).to(DEVICE) * 0.3
        elif kind == "ssd":
            vs = torch.rand(B, T, 2, generator=gen).to(DEVICE)
            A = -torch.rand(2, generator=gen).to(DEVICE)
        want_h, _ = cf.saved_layout(q, v, g, cu, A is not None, True)
        gate = {"none": 0, "scalar": 1, "gla": 2, "ssd": 1}[kind]
        fk = cf.fused_fwd_knobs(gate, varlen, dtype, T, kind == "ssd")
        calls.clear()
        with torch.no_grad():
            o, ht, h, gc = cf.chunk_fwd_keep(q, k, v, g, None, cu, 0.25, vs=vs, A=A, save=True)
        fused = calls.count("_fused_fwd_kernel")
        what = (kind, dtype, T, varlen)
        assert fused == int(fk is not None), what
        if want_h is None:
            assert h.numel() == 0, what
        else:
            assert tuple(h.shape) == tuple(want_h), what
        expect = (dtype != torch.float32 and T >= 64 and not varlen and kind != "gla"
                  and (kind != "ssd" or ssd_key))
        assert (fk is not None) == expect, what
        assert (want_h is None) == expect, what
        taken.append(expect)
    assert any(taken) and not all(taken)


@pytest.mark.parametrize("T", [48, 96], ids=["short", "long"])
def test_opcheck_by_length(rule, monkeypatch, T):
    """The registered forward op with save=True under the rule (SAVE_STATES=2): opcheck (its fake
    implementation, through saved_layout, matches the real outputs' shapes) below and above the
    threshold; the kept h is empty exactly on the long rows."""
    monkeypatch.setattr(common, "SAVE_STATES", 2)
    gen = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)  # noqa: E731
    q, k, v = ((r(1, T, 2, 16) * 0.5).to(torch.bfloat16) for _ in range(3))
    g = -torch.rand(1, T, 2, generator=gen).to(DEVICE) * 0.3
    args = tuple(t.requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point()
                 else t for t in (q, k, v, g, r(1, 2, 16, 16), None, 0.25, False, "triton",
                                  True))
    op = torch.ops.ssm_kernels.linear_attn_fwd
    torch.library.opcheck(op, args)
    _, _, h, _ = op(*args)
    assert (h.numel() == 0) == (T >= 64)


def test_compile_fullgraph_by_length(rule, monkeypatch):
    """torch.compile(fullgraph=True, aot_eager) with the rule on, SAVE_STATES=2, a long (two-level)
    and a short (per-chunk, h kept) call in one graph: the gradients equal eager's."""
    monkeypatch.setattr(common, "SAVE_STATES", 2)
    torch._dynamo.reset()
    a = _la_inputs(1, 96, 2, 16, 16, "scalar", torch.bfloat16, req=True)
    b = _la_inputs(1, 48, 2, 16, 16, "none", torch.bfloat16, req=True)

    def f(a, b):
        o1, s1 = _la_call(*a)
        o2, s2 = _la_call(*b)
        return (o1.float() ** 2).sum() + s1.sum() + (o2.float() ** 2).sum() + s2.sum()
    leaves = [t for t in a + b if t is not None]
    cf_ = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(cf_(a, b), leaves)
    want = torch.autograd.grad(f(a, b), leaves)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
