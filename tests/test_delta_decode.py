"""The step-by-step (fused_recurrent / decoding) Triton forward under every tile of the
`triton.FWD_TILE` knob (the GPU sweep of bench/gpu_delta_decode.py) against the float64
recurrence: gated and ungated, grouped value heads, in-kernel L2 norm, in-place final state, T = 1
and T > 1 through the same kernel, initial state None, V split over several tiles (V not a
multiple of BV)."""
import pytest
import torch
import torch.nn.functional as F

import ssm_kernels as sk
from ssm_kernels.delta_rule.reference import delta_rule_recurrent_ref
from ssm_kernels.testing import assert_close

from conftest import kernel_backends

TRITON = kernel_backends()
TILES = [None, (8, 1), (16, 2), (128, 8)]   # None: the default (BV 32/64 -> one V-tile here)


def _inputs(B, T, H, HV, K, V, gated, dtype=torch.float32):
    q, k = torch.randn(2, B, T, H, K).unbind(0)
    v = torch.randn(B, T, HV, V)
    g = F.logsigmoid(torch.randn(B, T, HV)) if gated else None
    beta = torch.rand(B, T, HV) * 2
    return q.to(dtype), F.normalize(k, dim=-1).to(dtype), v.to(dtype), g, beta


def _ref(q, k, v, g, beta, h0, l2):
    d = lambda x: None if x is None else x.double()
    return delta_rule_recurrent_ref(d(q), d(k), d(v), d(g), d(beta), None, d(h0), None, l2)


def _fn(gated):
    if gated:
        return sk.fused_recurrent_gated_delta_rule
    return lambda q, k, v, g, beta, **kw: sk.fused_recurrent_delta_rule(q, k, v, beta, **kw)


@pytest.fixture
def tile(request, monkeypatch):
    from ssm_kernels.delta_rule import triton as tri
    monkeypatch.setattr(tri, "FWD_TILE", request.param)
    return request.param


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("tile", TILES, indirect=True, ids=str)
@pytest.mark.parametrize("gated,l2,H,T", [(True, True, 4, 1), (False, False, 4, 1),
                                          (True, False, 1, 1), (False, True, 1, 5)])
def test_decode_tiles_match_float64(backend, tile, gated, l2, H, T):
    B, HV, K, V = 2, 4, 16, 24                 # H = 1: grouped value heads (GVA, 4 per q/k head)
    q, k, v, g, beta = _inputs(B, T, H, HV, K, V, gated)
    h0 = torch.randn(B, HV, K, V)
    fn = _fn(gated)
    ro, rS = _ref(q, k, v, g, beta, h0, l2)
    o, S = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True,
              use_qk_l2norm_in_kernel=l2, backend=backend)
    assert_close(o, ro, dtype=torch.float32)
    assert_close(S, rS, dtype=torch.float32)
    # in place: the same kernel writing into the initial state
    state = h0.clone()
    oi, si = fn(q, k, v, g, beta, initial_state=state, inplace_final_state=True,
                use_qk_l2norm_in_kernel=l2, backend=backend)
    assert si is state
    assert_close(oi, ro, dtype=torch.float32)
    assert_close(state, rS, dtype=torch.float32)
    assert not torch.equal(state, h0)
    # initial state None (zeros), no final state
    ro0, _ = _ref(q, k, v, g, beta, None, l2)
    o0, S0 = fn(q, k, v, g, beta, use_qk_l2norm_in_kernel=l2, backend=backend)
    assert S0 is None
    assert_close(o0, ro0, dtype=torch.float32)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("tile", [(8, 1)], indirect=True, ids=str)
def test_decode_tokens_in_place_bf16_equals_one_call(backend, tile):
    """Three one-token in-place steps (bf16 q/k/v, float32 state, the Qwen3-Next setting) equal
    one T = 3 call and the float64 recurrence within bf16 bounds."""
    B, T, H, HV, K, V = 3, 3, 2, 4, 32, 16
    q, k, v, g, beta = _inputs(B, T, H, HV, K, V, True, torch.bfloat16)
    h0 = torch.randn(B, HV, K, V)
    o, S = sk.fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0,
                                               output_final_state=True,
                                               use_qk_l2norm_in_kernel=True, backend=backend)
    state = h0.clone()
    for t in range(T):
        s = slice(t, t + 1)
        ot, _ = sk.fused_recurrent_gated_delta_rule(q[:, s], k[:, s], v[:, s], g[:, s],
                                                    beta[:, s], initial_state=state,
                                                    inplace_final_state=True,
                                                    use_qk_l2norm_in_kernel=True, backend=backend)
        torch.testing.assert_close(ot, o[:, s], atol=0, rtol=0)
    torch.testing.assert_close(state, S, atol=1e-6, rtol=1e-6)
    ro, rS = _ref(q, k, v, g, beta, h0, True)
    lo, lS = delta_rule_recurrent_ref(q, k, v, g, beta, None, h0, None, True)
    assert_close(o, ro, dtype=torch.bfloat16, lowp_ref=lo)
    assert_close(S, rS, dtype=torch.float32)


def test_decode_tile_knob_parsing():
    from ssm_kernels.delta_rule import triton as tri
    assert tri._parse_tile("16,2") == (16, 2)
    assert tri._parse_tile("") is None
    for bad in ("12,2", "16,3", "0,1"):
        with pytest.raises(ValueError, match="SSM_KERNELS_DELTA_DECODE_TILE"):
            tri._parse_tile(bad)
    assert tri.fwd_tile(128, 128) == (32, 4)          # the default at K = V = 128


@pytest.mark.parametrize("backend", TRITON + ["reference"])
@pytest.mark.parametrize("T,varlen", [(1, False), (3, False), (5, True)])
def test_decode_strided_qkv_views(backend, T, varlen):
    """In-place decoding reads q/k/v as views of one fused projection (token stride 2HK + HV*V)
    and a permuted-dense v without copies; results equal the contiguous call and the float64
    recurrence, o comes back contiguous."""
    B, H, HV, K, V = (1 if varlen else 2), 2, 4, 16, 8
    cu = torch.tensor([0, 2, T], dtype=torch.int32) if varlen else None
    N = 2
    mixed = torch.randn(B, T, 2 * H * K + HV * V)
    q, k, v = mixed.split([H * K, H * K, HV * V], dim=-1)
    q, k, v = q.unflatten(-1, (H, K)), k.unflatten(-1, (H, K)), v.unflatten(-1, (HV, V))
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    g, beta = F.logsigmoid(torch.randn(B, T, HV)), torch.rand(B, T, HV)
    h0 = torch.randn(N, HV, K, V)
    ro, rS = delta_rule_recurrent_ref(q.double(), k.double(), v.double(), g.double(),
                                      beta.double(), None, h0.double(), cu, True)
    for vv in (v, v.transpose(1, 2).contiguous().transpose(1, 2)):   # split view; permuted dense
        state = h0.clone()
        o, _ = sk.fused_recurrent_gated_delta_rule(q, k, vv, g, beta, initial_state=state,
                                                   cu_seqlens=cu, inplace_final_state=True,
                                                   use_qk_l2norm_in_kernel=True, backend=backend)
        assert o.is_contiguous() and o.shape == (B, T, HV, V)
        assert_close(o, ro, dtype=torch.float32)
        assert_close(state, rS, dtype=torch.float32)
        state2 = h0.clone()
        o2, _ = sk.fused_recurrent_gated_delta_rule(q.contiguous(), k.contiguous(),
                                                    vv.contiguous(), g, beta,
                                                    initial_state=state2, cu_seqlens=cu,
                                                    inplace_final_state=True,
                                                    use_qk_l2norm_in_kernel=True,
                                                    backend=backend)
        torch.testing.assert_close(o, o2, atol=0, rtol=0)
        torch.testing.assert_close(state, state2, atol=0, rtol=0)
