"""The delta rule's OUT_DECAY_O output stage (delta_rule/chunk.py; the engine's decay-on-o form
with the L2 norms as row / column scales): o within rounding of the default output stage (bitwise
ungated, where only the order of the norm sums could differ), the final state bitwise (the states
stage is untouched), at V tiles 64 / 128 / 16 (tails in T and V, grouped value heads, varlen with
empty and one-token sequences, h0 or none, gated / ungated, L2 on / off), float32 and the GPU's
tiles in float16; the op against the float64 recurrence with it on, and its o error at the GPU's
tiles no worse than the default's."""
import pytest
import torch
import torch.nn.functional as F

from conftest import kernel_backends
from test_delta_rule import _chunk_inputs, _chunk_run, _judge_chunk, _kernel_fn, _ref_fn
from test_delta_state import STATE_CASES, tile_dtype

TRITON = kernel_backends()
# + K = 96 (two K tiles of 64 by default: OUT_BLOCK_K=128 takes it in one)
CASES = dict(STATE_CASES, **{"k96-gva": (True, True, 1, 70, 1, 2, 96, 24, None, True)})
# (OUT_BLOCK_V, OUT_WARPS, OUT_BLOCK_K)
SETTINGS = [(None, None, None), (128, None, None), (16, 4, None), (128, None, 128)]


def _fwd(backend, gated, l2, q, k, v, g, beta, h0, cu):
    with torch.no_grad():
        o, S = _kernel_fn(gated, backend)(q, k, v, g, beta, h0, cu, l2)
    return o.clone(), S.clone()


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("gpu_tiles", [False, True], ids=["f32", "fp16-bt64"])
def test_out_decay_o_close_to_default(backend, case, gpu_tiles, monkeypatch):
    from ssm_kernels.delta_rule import chunk as wy
    from ssm_kernels.testing import rel_err
    dtype = tile_dtype(monkeypatch, gpu_tiles)
    tol = 2e-3 if gpu_tiles else 1e-5
    gated, l2, B, T, H, HV, K, V, cu, with_h0 = CASES[case]
    q, k, v, g, beta, h0, cu_t, _ = _chunk_inputs(gated, l2, B, T, H, HV, K, V, cu, dtype=dtype)
    h0 = h0 if with_h0 else None
    args = (backend, gated, l2, q, k, v, g, beta, h0, cu_t)
    base_o, base_S = _fwd(*args)
    assert torch.isfinite(base_o.float()).all()
    for bv, warps, bk in SETTINGS:
        monkeypatch.setattr(wy, "OUT_DECAY_O", True)
        monkeypatch.setattr(wy, "OUT_BLOCK_V", bv)
        monkeypatch.setattr(wy, "OUT_WARPS", warps)
        monkeypatch.setattr(wy, "OUT_BLOCK_K", bk)
        o, S = _fwd(*args)
        monkeypatch.setattr(wy, "OUT_DECAY_O", False)
        monkeypatch.setattr(wy, "OUT_BLOCK_V", None)
        monkeypatch.setattr(wy, "OUT_WARPS", None)
        monkeypatch.setattr(wy, "OUT_BLOCK_K", None)
        assert torch.equal(S, base_S), f"final state moved (BV={bv})"
        assert torch.isfinite(o.float()).all()
        err = rel_err(o, base_o.double())
        if not gated and not l2 and bk is None:   # (a K tile of 128 sums K in another order)
            assert torch.equal(o, base_o), f"ungated o not bitwise (BV={bv}, BK={bk}): rel {err:.2e}"
        assert err <= tol, f"o rel diff {err:.2e} vs the default output stage (BV={bv})"


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("case", ["gva-tail-h0", "varlen-gva", "ungated-l2-hv3"])
def test_out_decay_o_op_matches_recurrence(backend, case, monkeypatch):
    """float32: o, S and every gradient against the float64 recurrence (the repo's bound) with
    OUT_DECAY_O and a V tile of 128; fp16 at the GPU's tiles: o's error vs float64 no worse
    than the default output stage's (the q h term loses a rounding of q e^G)."""
    from ssm_kernels.chunk import common
    from ssm_kernels.delta_rule import chunk as wy
    from ssm_kernels.testing import rel_err
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)
    gated, l2, B, T, H, HV, K, V, cu, with_h0 = STATE_CASES[case]
    q, k, v, g, beta, h0, cu_t, cots = _chunk_inputs(gated, l2, B, T, H, HV, K, V, cu)
    d = lambda x: None if x is None else x.double()
    monkeypatch.setattr(wy, "OUT_DECAY_O", True)
    monkeypatch.setattr(wy, "OUT_BLOCK_V", 128)
    out = _chunk_run(_kernel_fn(gated, backend), q, k, v, g, beta, h0, cu_t, l2, cots)
    ref = _chunk_run(_ref_fn, d(q), d(k), d(v), d(g), d(beta), d(h0), cu_t, l2, cots)
    names = ["o", "S", "dq", "dk", "dv"] + (["dg"] if gated else []) + ["dbeta", "dh0"]
    qn = F.normalize(q.double(), dim=-1, eps=0) if l2 else q.double()
    _judge_chunk(out, ref, [None] * len(out), names, torch.float32, qn)
    # 16-bit at the GPU's tiles: the new form's o error vs the default's, both against float64
    monkeypatch.setattr(common, "triton_interpret", lambda: False)
    q, k, v, g, beta, h0, cu_t, _ = _chunk_inputs(gated, l2, B, T, H, HV, K, V, cu,
                                                  dtype=torch.float16)
    h0 = h0 if with_h0 else None
    o_ref, _ = _ref_fn(d(q), d(k), d(v), d(g), d(beta), d(h0), cu_t, l2)
    args = (backend, gated, l2, q, k, v, g, beta, h0, cu_t)
    o_new, _ = _fwd(*args)
    monkeypatch.setattr(wy, "OUT_DECAY_O", False)
    monkeypatch.setattr(wy, "OUT_BLOCK_V", None)
    o_old, _ = _fwd(*args)
    e_new, e_old = rel_err(o_new, o_ref), rel_err(o_old, o_ref)
    print(f"{case}: fp16 o rel err vs float64: default {e_old:.3e}, OUT_DECAY_O bv128 {e_new:.3e}")
    assert e_new <= 1.05 * e_old + 1e-6, (e_new, e_old)
