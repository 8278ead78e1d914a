"""SCAN_T (delta_rule/chunk.py): the WY stage stores only T = (I + A)^-1 and the forward's state
scan forms V' = T (diag(beta) v - diag(beta e^G) k^ S) from T, k, v, beta (no W, U in memory).
The scan against the default scan on the same inputs (h, v_new, final state within rounding; T
bitwise the default WY stage's), with DSTATE off and on (its prefetch settings, a 16-wide V tile at
4 warps, DSTATE_KT) and k S as hi + lo 16-bit dots or one tf32 dot, for grouped value heads, varlen with empty / one-token sequences, tails in T
and V, h0 or none, gated / ungated, L2 norm on / off, float32 and the GPU's tiles in float16; the
op (forward + every gradient; the backward is the default's) against the float64 recurrence at
the GPU's tiles, its o / S error no worse than the default's; float32 inputs untouched (the knob
acts on 16-bit inputs only)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, kernel_backends
from test_delta_rule import _chunk_inputs, _chunk_run, _judge_chunk, _kernel_fn, _ref_fn
from test_delta_state import STATE_CASES, _scan, tile_dtype

TRITON = kernel_backends()
# DSTATE settings composed with SCAN_T: None = DSTATE off; else (PREFETCH, BV, warps, KT)
DSTATES = [None, (1, None, None, False), (2, None, None, False), (3, None, None, False),
           (0, None, None, False), (1, 16, 4, False), (3, None, None, True)]


class _TScan:
    """`_scan`'s `wy` argument whose `_states` runs the SCAN_T scan on (T, v, beta)."""

    def __init__(self, wy, tm, v, beta):
        self.wy, self.t_scan = wy, (tm, v, beta)

    def _states(self, *args):
        return self.wy._states(*args, t_scan=self.t_scan)


def _set_dstate(monkeypatch, wy, ds):
    monkeypatch.setattr(wy, "DSTATE", ds is not None)
    pf, bv, warps, kt = ds or (1, None, None, False)
    for name, val in (("DSTATE_PREFETCH", pf), ("DSTATE_BV", bv), ("DSTATE_WARPS", warps),
                      ("DSTATE_KT", kt)):
        monkeypatch.setattr(wy, name, val)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("case", sorted(STATE_CASES))
@pytest.mark.parametrize("gpu_tiles", [False, True], ids=["f32", "fp16-bt64"])
def test_scan_t_close_to_default_scan(backend, case, gpu_tiles, monkeypatch):
    from ssm_kernels.delta_rule import chunk as wy
    from ssm_kernels.testing import rel_err
    dtype = tile_dtype(monkeypatch, gpu_tiles)
    tol = 4e-3 if gpu_tiles else 1e-5
    gated, l2, B, T, H, HV, K, V, cu, with_h0 = STATE_CASES[case]
    q, k, v, g, beta, h0, cu_t, _ = _chunk_inputs(gated, l2, B, T, H, HV, K, V, cu, dtype=dtype)
    if gpu_tiles:
        beta = beta.to(dtype)     # beta in the input dtype too (fla's callers pass it so)
    h0 = h0 if with_h0 else None
    p = wy._plan(q, v, g, cu_t)
    w, u, tm = wy._wy(p, k, v, g, beta, l2, True)
    base = _scan(wy, p, k, w, u, g, h0, l2, cu_t)
    # the WY stage without W, U: the same T (same kernel, same inputs), nothing else written
    w0, u0, tm0 = wy._wy(p, k, v, g, beta, l2, False, wu=False)
    assert w0.numel() == u0.numel() == 0
    assert torch.equal(tm0, tm), "T of the T-only WY stage differs"
    # 16-bit: k S as hi + lo 16-bit dots (SCAN_T_KS_X2, the default) and as one tf32 dot
    for ds, x2 in [(ds, True) for ds in DSTATES] + [(ds, False) for ds in DSTATES[:2]]:
        _set_dstate(monkeypatch, wy, ds)
        p.ks_x2 = x2 and gpu_tiles
        got = _scan(_TScan(wy, tm0, v, beta), p, k, w0, u0, g, h0, l2, cu_t)
        for name, a, b in zip(("h", "v_new", "ht"), got, base):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert torch.isfinite(a.float()).all(), f"{name} not finite (DSTATE {ds})"
            err = rel_err(a, b.double())
            assert err <= tol, f"{name} ({dtype}, DSTATE {ds}, KS_X2 {x2}): rel diff {err:.2e} vs the " \
                f"default scan (tol {tol:.0e})"
    _set_dstate(monkeypatch, wy, None)


# + K > 128 (whole-K tiles of 256, BT 32, the scan's BV 32)
OP_CASE_DEFS = dict(STATE_CASES, **{"k130": (True, True, 1, 70, 1, 2, 130, 20, None, True)})
OP_CASES = ["gva-tail-h0", "varlen-gva", "ungated-l2-hv3", "k130"]
OP_KNOBS = {"scan_t": dict(SCAN_T=True), "scan_t-dstate": dict(SCAN_T=True, DSTATE=True),
            "scan_t-bwd": dict(SCAN_T=True, SCAN_T_BWD=True),
            "scan_t-bwd-nosave": dict(SCAN_T=True, SCAN_T_BWD=True, SAVE_WY_INVERSE=False),
            "bwd-only-dstate": dict(SCAN_T_BWD=True, DSTATE=True),
            "scan_t-dstate-outd-bv128": dict(SCAN_T=True, DSTATE=True, OUT_DECAY_O=True,
                                             OUT_BLOCK_V=128)}


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("case", OP_CASES)
@pytest.mark.parametrize("knobs", list(OP_KNOBS), ids=list(OP_KNOBS))
def test_scan_t_op_gpu_tiles_matches_recurrence(backend, case, knobs, monkeypatch):
    """The op with SCAN_T (float16 at the GPU's tiles, the 16-bit path the knob acts on), alone,
    with DSTATE, with SCAN_T_BWD (the backward's recompute by the same scan, W formed alone; with
    the saved T and with SAVE_WY_INVERSE off), and SCAN_T_BWD alone: o, S and every gradient
    against the float64 recurrence (the repo's 16-bit bound), o and S no further from it than the
    default's (1.25x + 1e-5); a no-grad forward (T not kept) gives the same o and S."""
    from ssm_kernels.chunk import common
    from ssm_kernels.delta_rule import chunk as wy
    from ssm_kernels.testing import rel_err
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)
    monkeypatch.setattr(common, "triton_interpret", lambda: False)
    gated, l2, B, T, H, HV, K, V, cu, with_h0 = OP_CASE_DEFS[case]
    q, k, v, g, beta, h0, cu_t, cots = _chunk_inputs(gated, l2, B, T, H, HV, K, V, cu,
                                                     dtype=torch.float16)
    h0 = h0 if with_h0 else None
    fn = _kernel_fn(gated, backend)
    base = _chunk_run(fn, q, k, v, g, beta, h0, cu_t, l2, cots)
    for name, val in OP_KNOBS[knobs].items():
        monkeypatch.setattr(wy, name, val)
    out = _chunk_run(fn, q, k, v, g, beta, h0, cu_t, l2, cots)
    with torch.no_grad():
        o_ng, S_ng = fn(q, k, v, g, beta, h0, cu_t, l2)
    assert torch.equal(o_ng, out[0]) and torch.equal(S_ng, out[1]), "no-grad forward differs"
    d = lambda x: None if x is None else x.double()
    ref = _chunk_run(_ref_fn, d(q), d(k), d(v), d(g), d(beta), d(h0), cu_t, l2, cots)
    low = _chunk_run(_ref_fn, q, k, v, g, beta, None if h0 is None else h0, cu_t, l2, cots)
    names = ["o", "S", "dq", "dk", "dv"] + (["dg"] if gated else []) + ["dbeta", "dh0"]
    qn = F.normalize(q.double(), dim=-1, eps=0) if l2 else q.double()
    _judge_chunk(out, ref, low, names, torch.float16, qn)
    for i, name in enumerate(("o", "S")):
        e_new, e_base = rel_err(out[i], ref[i]), rel_err(base[i], ref[i])
        assert e_new <= 1.25 * e_base + 1e-5, f"{name}: SCAN_T err {e_new:.3e} vs default " \
            f"{e_base:.3e}"


@pytest.mark.parametrize("backend", TRITON)
def test_scan_t_float32_untouched(backend, monkeypatch):
    """float32 inputs: SCAN_T changes nothing (o, S, every gradient bitwise)."""
    from ssm_kernels.chunk import common
    from ssm_kernels.delta_rule import chunk as wy
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)
    gated, l2, B, T, H, HV, K, V, cu, _ = STATE_CASES["varlen-gva"]
    q, k, v, g, beta, h0, cu_t, cots = _chunk_inputs(gated, l2, B, T, H, HV, K, V, cu)
    fn = _kernel_fn(gated, backend)
    base = _chunk_run(fn, q, k, v, g, beta, h0, cu_t, l2, cots)
    monkeypatch.setattr(wy, "SCAN_T", True)
    assert not wy._plan(q, v, g, cu_t).scan_t
    out = _chunk_run(fn, q, k, v, g, beta, h0, cu_t, l2, cots)
    for a, b in zip(out, base):
        assert torch.equal(a, b)


@pytest.mark.skipif(DEVICE != "cpu" or "triton" not in TRITON,
                    reason="interpreter check (CPU, TRITON_INTERPRET=1)")
@pytest.mark.parametrize("case", ["gva-tail", "varlen-gva"])
@pytest.mark.parametrize("pf", [2, 0], ids=["dstate-pf2", "pf0"])
def test_scan_t_in_bounds(case, pf, monkeypatch):
    """SCAN_T + SCAN_T_BWD (+ DSTATE prefetching T, k, v, beta and g of the chunk past the end
    under PREFETCH 2) under the interpreter's address check (tests/guard_zone.py): every load /
    store of the forward and backward inside a tensor argument, the NaN guard zones around the
    inputs untouched, every output finite; float16 at the GPU's tiles."""
    from test_delta_fwd_guard import CASES, _run
    knobs = dict(SCAN_T=True, SCAN_T_BWD=True, DSTATE=pf > 0, DSTATE_PREFETCH=pf)
    out, launches, _ = _run(knobs, CASES[case], torch.float16, monkeypatch, guard=True)
    # the forward's scan and the backward's recompute, both from T (no engine scan)
    assert launches.count("_delta_state_kernel") == 2 and "_state_kernel" not in launches, launches
    assert all(torch.isfinite(x.float()).all() for x in out)
