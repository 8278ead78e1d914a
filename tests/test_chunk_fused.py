"""The chunk engine's fused forward (chunk/fwd.py `fused_fwd`: segment states, a scan over
segments, one program per (head, segment, V-tile) with the state in registers; not the default,
common.FUSED_FWD=0, so these tests switch it on) against the float64 references and against the
per-chunk-state path (common.FUSED_FWD=0): plain and scalar-decay linear attention, SSD with grouped
B/C and its D / silu(z) epilogue (inference) on both paths, several segments per row, rows not a
multiple of the chunk or the segment, initial states; SSD's gradients with D inside the op on
both paths."""
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


def _ssd_inputs(b, L, H, P, G, N, D, z, dtype=torch.bfloat16, n_seq=None):
    x = torch.randn(b, L, H, P, device=DEVICE).to(dtype)
    dt = torch.randn(b, L, H, device=DEVICE)
    A = -2 * torch.rand(H, device=DEVICE)
    Bm, Cm = torch.randn(2, b, L, G, N, device=DEVICE).to(dtype).unbind(0)
    Dt = {None: None, "h": torch.randn(H, device=DEVICE), "hp": torch.randn(H, P, device=DEVICE)}[D]
    zt = torch.randn(b, L, H, P, device=DEVICE).to(dtype) if z else None
    bias = torch.randn(H, device=DEVICE)
    h0 = torch.randn(n_seq or b, H, P, N, device=DEVICE)
    return x, dt, A, Bm, Cm, Dt, zt, bias, h0


def _ssd_infer(ins, cu=None):
    x, dt, A, Bm, Cm, Dt, zt, bias, h0 = ins
    with torch.no_grad():
        out = sk.mamba_chunk_scan_combined(x, dt, A, Bm, Cm, 64, D=Dt, z=zt, dt_bias=bias,
                                           initial_states=h0, dt_softplus=True, cu_seqlens=cu,
                                           return_final_states=cu is None,
                                           return_varlen_states=cu is not None, backend="triton")
    return out


def _ssd_refs(ins, cu=None):
    """(float64 reference, reference in the inputs' precision) of (y, states)."""
    x, dt, A, Bm, Cm, Dt, zt, bias, h0 = ins
    d = lambda t: None if t is None else t.double()  # noqa: E731
    c = None if cu is None else cu.cpu()
    return (ssd_ref(d(x), d(dt), d(A), d(Bm), d(Cm), 16, D=d(Dt), z=d(zt), dt_bias=d(bias),
                    initial_states=d(h0), dt_softplus=True, cu_seqlens=c),
            ssd_ref(x, dt, A, Bm, Cm, 16, D=Dt, z=zt, dt_bias=bias, initial_states=h0,
                    dt_softplus=True, cu_seqlens=c))


@pytest.mark.parametrize("D,z", [("hp", True), ("h", False), (None, True)])
def test_ssd_fused_epilogue(small_segments, monkeypatch, D, z):
    """Inference (no grad), bf16, grouped B/C: D and silu(z) in the epilogue of the fused path's
    stage 3 (FUSED_FWD=1) and of the per-chunk path's output stage (FUSED_FWD=0), against the
    references and against the epilogue in torch (FUSE_EPILOGUE=False) on both paths."""
    ins = _ssd_inputs(2, 70, 4, 16, 2, 32, D, z)
    got = {}
    for fused in (1, 0):
        monkeypatch.setattr(common, "FUSED_FWD", fused)
        for fe in (True, False):
            monkeypatch.setattr(ssd_if, "FUSE_EPILOGUE", fe)
            got[fused, fe] = _ssd_infer(ins)
    (ry, rs), (ly, ls) = _ssd_refs(ins)
    for (fused, fe), (y, s) in got.items():
        what = f"FUSED_FWD={fused} FUSE_EPILOGUE={fe}"
        assert_close(y, ry, dtype=torch.bfloat16, lowp_ref=ly, name=f"y {what}")
        assert_close(s, rs, dtype=torch.bfloat16, lowp_ref=ls, name=f"states {what}")
    # the per-chunk path rounds h to bf16, the fused one keeps it in float32: close, not equal
    y, s = got[1, True]
    for key, (yy, ss) in got.items():
        what = f"fused vs FUSED_FWD={key[0]} FUSE_EPILOGUE={key[1]}"
        assert_close(y, yy.double(), dtype=torch.bfloat16, lowp_ref=ly, name=f"y {what}")
        assert_close(s, ss.double(), dtype=torch.bfloat16, lowp_ref=ls, name=f"states {what}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("D,z", [("hp", True), ("h", True), ("hp", False), (None, True)])
def test_ssd_per_chunk_epilogue(monkeypatch, dtype, D, z):
    """The per-chunk-state path (FUSED_FWD=0, the default) with D and silu(z) in `_output_kernel`'s
    epilogue (inference): float32 and 16-bit against the float64 reference, grouped B/C, a partial
    last chunk; the epilogue in the kernel and in torch (FUSE_EPILOGUE=False) agree."""
    monkeypatch.setattr(common, "FUSED_FWD", 0)
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)
    ins = _ssd_inputs(2, 45, 4, 16, 2, 16, D, z, dtype)
    y, s = _ssd_infer(ins)
    monkeypatch.setattr(ssd_if, "FUSE_EPILOGUE", False)
    y1, s1 = _ssd_infer(ins)
    (ry, rs), (ly, ls) = _ssd_refs(ins)
    lp = dtype != torch.float32
    assert_close(y, ry, dtype=dtype, lowp_ref=ly if lp else None, name="y")
    assert_close(s, rs, dtype=dtype if lp else torch.float32, lowp_ref=ls if lp else None,
                 name="states")
    assert_close(y, y1.double(), dtype=dtype, lowp_ref=ly if lp else None,
                 name="y vs epilogue in torch")
    assert torch.equal(s, s1), "the epilogue changed the states"


def test_ssd_per_chunk_epilogue_varlen(monkeypatch):
    """Packed sequences (one empty, partial chunks): the per-chunk path's epilogue addresses D, z
    and x by the chunk table's rows."""
    monkeypatch.setattr(common, "FUSED_FWD", 0)
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)
    cu = torch.tensor([0, 17, 17, 50, 83], device=DEVICE, dtype=torch.int32)
    ins = _ssd_inputs(1, 83, 4, 16, 2, 16, "hp", True, n_seq=4)
    y, s = _ssd_infer(ins, cu)
    (ry, rs), (ly, ls) = _ssd_refs(ins, cu)
    assert_close(y, ry, dtype=torch.bfloat16, lowp_ref=ly, name="y")
    assert_close(s, rs, dtype=torch.bfloat16, lowp_ref=ls, name="states")


@pytest.mark.parametrize("fused,dtype", [(0, torch.float32), (0, torch.bfloat16),
                                         (2, torch.float32), (1, torch.bfloat16)],
                         ids=["per-chunk-f32", "per-chunk-bf16", "fused-f32", "fused-bf16"])
def test_ssd_grad_path(small_segments, monkeypatch, fused, dtype):
    """With gradients D goes into the registered op (FUSE_EPILOGUE: the forward's epilogue; the
    backward's dD and dx += dy D) and silu(z) stays a torch op around it: every gradient matches
    the reference on both forward paths (the backward recomputes its states from the inputs, so
    it needs nothing path-specific from the forward)."""
    from test_ssd import compare
    monkeypatch.setattr(common, "FUSED_FWD", fused)
    compare("triton", 1, 45, 2, 16, 1, 16, dtype=dtype)
