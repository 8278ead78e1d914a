"""DSTATE (delta_rule/state.py `_delta_state_kernel`, the state scan with the next chunk's loads in
flight): h, v_new and the final state bitwise the engine's DELTA scan (the default) on the same
w, u, for grouped value heads, varlen with empty / one-token sequences, tails in T and V, h0 or
none, gated / ungated, L2 norm on / off, float32 and the GPU's tiles in float16; and the whole op
(forward + every gradient) against the float64 recurrence with DSTATE on."""
import pytest
import torch
import torch.nn.functional as F

from conftest import kernel_backends
from test_delta_rule import _chunk_inputs, _chunk_run, _judge_chunk, _kernel_fn, _ref_fn

TRITON = kernel_backends()

# (gated, l2, B, T, H, HV, K, V, cu_seqlens, h0)
STATE_CASES = {
    "gva-tail-h0": (True, True, 2, 75, 1, 2, 16, 24, None, True),
    "ungated-noh0": (False, False, 1, 65, 2, 2, 12, 8, None, False),
    "varlen-gva": (True, True, 1, 70, 1, 2, 16, 16, [0, 5, 5, 37, 38, 70], True),
    "ungated-l2-hv3": (False, True, 1, 40, 1, 3, 16, 40, None, True),
}
# (PREFETCH, BV, warps)
SETTINGS = [(1, None, None), (2, None, None), (3, None, None), (0, None, None), (1, 16, 4)]


def _scan(wy, p, k, w, u, g, h0, l2, cu):
    """(h at the chunk slots the scan writes, v_new, final states)."""
    h, vn, ht = wy._states(p, k, w, u, g, h0, l2)
    if cu is not None:   # packed: slot co[n] + i for chunk i of sequence n (h has surplus slots)
        n = [(b - a + p.BT - 1) // p.BT for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
        slots = [o + i for o, c in zip(p.co.tolist(), n) for i in range(c)]
        assert len(slots) == sum(n) > 0
        h = h[slots]
    return h.clone(), vn.clone(), ht.clone()


def tile_dtype(monkeypatch, gpu_tiles: bool) -> torch.dtype:
    """Outputs poisoned (NaN first); gpu_tiles: the GPU's BT=64 tiles and 16-bit tensor-core-style
    dots under the interpreter, in float16 (the interpreter's bf16 dot is broken). The dtype to
    run in: float16 with gpu_tiles, else float32."""
    from ssm_kernels.chunk import common
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)
    if not gpu_tiles:
        return torch.float32
    monkeypatch.setattr(common, "triton_interpret", lambda: False)
    return torch.float16


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("case", sorted(STATE_CASES))
@pytest.mark.parametrize("gpu_tiles", [False, True], ids=["f32", "fp16-bt64"])
def test_dstate_bitwise_equals_engine_scan(backend, case, gpu_tiles, monkeypatch):
    from ssm_kernels.delta_rule import chunk as wy
    dtype = tile_dtype(monkeypatch, gpu_tiles)
    gated, l2, B, T, H, HV, K, V, cu, with_h0 = STATE_CASES[case]
    q, k, v, g, beta, h0, cu_t, _ = _chunk_inputs(gated, l2, B, T, H, HV, K, V, cu, dtype=dtype)
    h0 = h0 if with_h0 else None
    p = wy._plan(q, v, g, cu_t)
    w, u, _ = wy._wy(p, k, v, g, beta, l2, False)
    base = _scan(wy, p, k, w, u, g, h0, l2, cu_t)
    assert all(torch.isfinite(x.float()).all() for x in base)
    for pf, bv, warps in SETTINGS:
        monkeypatch.setattr(wy, "DSTATE", True)
        monkeypatch.setattr(wy, "DSTATE_PREFETCH", pf)
        monkeypatch.setattr(wy, "DSTATE_BV", bv)
        monkeypatch.setattr(wy, "DSTATE_WARPS", warps)
        got = _scan(wy, p, k, w, u, g, h0, l2, cu_t)
        monkeypatch.setattr(wy, "DSTATE", False)
        for name, a, b in zip(("h", "v_new", "ht"), got, base):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert torch.equal(a, b), f"{name} differs (PREFETCH={pf}, BV={bv}): " \
                f"max |diff| {(a.float() - b.float()).abs().max().item():.3e}"


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("case", sorted(STATE_CASES))
@pytest.mark.parametrize("pf", [1, 3, 0], ids=["pf1", "pf3", "pf0"])
def test_dstate_kt_close_to_engine_scan(backend, case, pf, monkeypatch):
    """DSTATE_KT (k^T as loaded, its norm and decay on V'): v_new of the first chunk and every
    stored value within rounding of the default scan, float16 at the GPU's tiles (BT=64) and
    float32 (the interpreter's BT=32)."""
    from ssm_kernels.chunk import common
    from ssm_kernels.delta_rule import chunk as wy
    from ssm_kernels.testing import rel_err
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 4e-3)):
        monkeypatch.setattr(common, "triton_interpret",
                            (lambda: False) if dtype != torch.float32 else common.triton_interpret)
        gated, l2, B, T, H, HV, K, V, cu, with_h0 = STATE_CASES[case]
        q, k, v, g, beta, h0, cu_t, _ = _chunk_inputs(gated, l2, B, T, H, HV, K, V, cu,
                                                      dtype=dtype)
        h0 = h0 if with_h0 else None
        p = wy._plan(q, v, g, cu_t)
        w, u, _ = wy._wy(p, k, v, g, beta, l2, False)
        monkeypatch.setattr(wy, "DSTATE", False)
        base = _scan(wy, p, k, w, u, g, h0, l2, cu_t)
        for name, val in (("DSTATE", True), ("DSTATE_KT", True), ("DSTATE_PREFETCH", pf)):
            monkeypatch.setattr(wy, name, val)
        got = _scan(wy, p, k, w, u, g, h0, l2, cu_t)
        monkeypatch.setattr(wy, "DSTATE", False)
        for name, a, b in zip(("h", "v_new", "ht"), got, base):
            assert torch.isfinite(a.float()).all(), name
            err = rel_err(a, b.double())
            assert err <= tol, \
                f"{name} ({dtype}): rel diff {err:.2e} vs the default scan (tol {tol:.0e})"


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("case", ["gva-tail-h0", "varlen-gva", "ungated-l2-hv3"])
@pytest.mark.parametrize("kt", [False, True], ids=["dstate", "dstate-kt"])
def test_dstate_op_matches_recurrence(backend, case, kt, monkeypatch):
    """The op with DSTATE on (forward scan and the backward's recompute), float32: o, S and every
    gradient against the float64 recurrence (the repo's bound)."""
    from ssm_kernels.chunk import common
    from ssm_kernels.delta_rule import chunk as wy
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)
    monkeypatch.setattr(wy, "DSTATE", True)
    monkeypatch.setattr(wy, "DSTATE_KT", kt)
    gated, l2, B, T, H, HV, K, V, cu, with_h0 = STATE_CASES[case]
    q, k, v, g, beta, h0, cu_t, cots = _chunk_inputs(gated, l2, B, T, H, HV, K, V, cu)
    out = _chunk_run(_kernel_fn(gated, backend), q, k, v, g, beta, h0, cu_t, l2, cots)
    d = lambda x: None if x is None else x.double()
    ref = _chunk_run(_ref_fn, d(q), d(k), d(v), d(g), d(beta), d(h0), cu_t, l2, cots)
    names = ["o", "S", "dq", "dk", "dv"] + (["dg"] if gated else []) + ["dbeta", "dh0"]
    qn = F.normalize(q.double(), dim=-1, eps=0) if l2 else q.double()
    _judge_chunk(out, ref, [None] * len(out), names, torch.float32, qn)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("pf", [1, 2, 3])
def test_dstate_bitwise_16bit_wu(backend, pf, monkeypatch):
    """WU_FLOAT32=False (w, u stored in the input dtype; W S on the state rounded to it, fla's
    precision: the flaprec GPU variants): DSTATE still bitwise the engine's scan (float16, the
    GPU's tiles, grouped value heads, a partial chunk, h0)."""
    from ssm_kernels.chunk import common
    from ssm_kernels.delta_rule import chunk as wy
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)
    monkeypatch.setattr(common, "triton_interpret", lambda: False)
    monkeypatch.setattr(wy, "WU_FLOAT32", False)
    gated, l2, B, T, H, HV, K, V, cu, _ = STATE_CASES["gva-tail-h0"]
    q, k, v, g, beta, h0, cu_t, _ = _chunk_inputs(gated, l2, B, T, H, HV, K, V, cu,
                                                  dtype=torch.float16)
    p = wy._plan(q, v, g, cu_t)
    w, u, _ = wy._wy(p, k, v, g, beta, l2, False)
    assert w.dtype == u.dtype == torch.float16
    base = _scan(wy, p, k, w, u, g, h0, l2, cu_t)
    monkeypatch.setattr(wy, "DSTATE", True)
    monkeypatch.setattr(wy, "DSTATE_PREFETCH", pf)
    got = _scan(wy, p, k, w, u, g, h0, l2, cu_t)
    for name, a, b in zip(("h", "v_new", "ht"), got, base):
        assert torch.isfinite(a.float()).all() and torch.equal(a, b), name
