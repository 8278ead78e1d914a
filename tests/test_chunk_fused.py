"""The chunk engine's fused forward (chunk/fwd.py `fused_fwd`: segment states, a scan over
segments, one program per (head, segment, V-tile) with the state in registers) against the float64
references and against the per-chunk-state path it replaces (common.FUSED_FWD=False): plain and
scalar-decay linear attention, SSD with grouped B/C and its D / silu(z) epilogue (inference), several
segments per row, rows not a multiple of the chunk or the segment, initial states."""
import pytest
import torch

import ssm_kernels as sk
from ssm_kernels.chunk import common
import ssm_kernels.ssd.interface as ssd_if
from ssm_kernels.linear_attn.reference import linear_attn_chunk_ref
from ssm_kernels.ssd.reference import ssd_ref
from ssm_kernels.testing import assert_close

from conftest import DEVICE, kernel_backends

pytestmark = pytest.mark.skipif("triton" not in kernel_backends(), reason="needs Triton")


@pytest.fixture(params=[8, 1], ids=["lookback", "segment-scan"])
def small_segments(monkeypatch, request):
    """Chunks of 16 and segments of 2 chunks, so a short row has several segments; the incoming
    segment states summed inside stage 3 (LOOKBACK_SEGS=8) or by the stage-2 scan (1); every buffer
    the stages write starts as NaN."""
    monkeypatch.setattr(common, "LOOKBACK_SEGS", request.param)
    monkeypatch.setattr(common, "INTERP_CHUNK", 16)
    monkeypatch.setattr(common, "SEG_CHUNKS", 2)
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)


@pytest.mark.parametrize("gate", ["none", "scalar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_attn_fused_fwd(small_segments, monkeypatch, gate, dtype):
    B, T, H, K, V = 2, 83, 2, 32, 24          # 6 chunks, 3 segments per row, last ones partial
    q, k = (torch.randn(2, B, T, H, K, device=DEVICE) * K ** -0.25).to(dtype).unbind(0)
    v = torch.randn(B, T, H, V, device=DEVICE).to(dtype)
    g = -torch.rand(B, T, H, device=DEVICE) * 0.3 if gate == "scalar" else None
    h0 = torch.randn(B, H, K, V, device=DEVICE)
    monkeypatch.setattr(common, "FUSED_FWD", 2)     # float32 too

    def call():
        if g is None:
            return sk.chunk_linear_attn(q, k, v, initial_state=h0, output_final_state=True,
                                        normalize=False, backend="triton")
        return sk.chunk_simple_gla(q, k, v, g, initial_state=h0, output_final_state=True,
                                   backend="triton")
    o, ht = call()
    monkeypatch.setattr(common, "FUSED_FWD", False)
    o0, ht0 = call()
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ro, rh = linear_attn_chunk_ref(d(q), d(k), d(v), d(g), None, d(h0), None, chunk_size=16)
    lo, lh = linear_attn_chunk_ref(q.float(), k.float(), v.float(), g, None, h0, None,
                                   chunk_size=16)
    assert_close(o, ro, dtype=dtype, lowp_ref=lo if dtype != torch.float32 else None, name="o")
    assert_close(ht, rh, dtype=torch.float32 if dtype == torch.float32 else dtype,
                 lowp_ref=lh if dtype != torch.float32 else None, name="ht")
    # the per-chunk-state path rounds h to bf16, the fused one keeps it in float32: close, not equal
    lp = dtype != torch.float32
    assert_close(o, o0.double(), dtype=dtype, lowp_ref=lo if lp else None,
                 name="o vs FUSED_FWD=False")
    assert_close(ht, ht0.double(), dtype=dtype, lowp_ref=lh if lp else None,
                 name="ht vs FUSED_FWD=False")


@pytest.mark.parametrize("D,z", [("hp", True), ("h", False), (None, True)])
def test_ssd_fused_epilogue(small_segments, monkeypatch, D, z):
    """Inference (no grad): D and silu(z) in the kernel's epilogue, grouped B/C."""
    b, L, H, P, G, N = 2, 70, 4, 16, 2, 32
    x = torch.randn(b, L, H, P, device=DEVICE).to(torch.bfloat16)
    dt = torch.randn(b, L, H, device=DEVICE)
    A = -2 * torch.rand(H, device=DEVICE)
    Bm, Cm = torch.randn(2, b, L, G, N, device=DEVICE).to(torch.bfloat16).unbind(0)
    Dt = {None: None, "h": torch.randn(H, device=DEVICE), "hp": torch.randn(H, P, device=DEVICE)}[D]
    zt = torch.randn(b, L, H, P, device=DEVICE).to(torch.bfloat16) if z else None
    bias = torch.randn(H, device=DEVICE)
    h0 = torch.randn(b, H, P, N, device=DEVICE)

    def call():
        with torch.no_grad():
            return sk.mamba_chunk_scan_combined(x, dt, A, Bm, Cm, 64, D=Dt, z=zt, dt_bias=bias,
                                                initial_states=h0, dt_softplus=True,
                                                return_final_states=True, backend="triton")
    y, s = call()
    monkeypatch.setattr(ssd_if, "FUSE_EPILOGUE", False)
    y1, s1 = call()
    monkeypatch.setattr(common, "FUSED_FWD", False)
    y0, s0 = call()
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ry, rs = ssd_ref(d(x), dt.double(), A.double(), d(Bm), d(Cm), 16, D=d(Dt), z=d(zt),
                     dt_bias=bias.double(), initial_states=h0.double(), dt_softplus=True)
    ly, ls = ssd_ref(x, dt, A, Bm, Cm, 16, D=Dt, z=zt, dt_bias=bias, initial_states=h0,
                     dt_softplus=True)
    assert_close(y, ry, dtype=torch.bfloat16, lowp_ref=ly, name="y")
    assert_close(s, rs, dtype=torch.bfloat16, lowp_ref=ls, name="states")
    for yy, ss, what in ((y1, s1, "epilogue in torch"), (y0, s0, "FUSED_FWD=False")):
        assert_close(y, yy.double(), dtype=torch.bfloat16, lowp_ref=ly, name=f"y vs {what}")
        assert_close(s, ss.double(), dtype=torch.bfloat16, lowp_ref=ls, name=f"states vs {what}")


def test_ssd_grad_path_unchanged(small_segments):
    """With gradients the epilogue stays outside the op (autograd through D and z) and the op's
    forward is the fused one: the gradients still match the reference."""
    from test_ssd import compare
    compare("triton", 1, 45, 2, 16, 1, 16)
