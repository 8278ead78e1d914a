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


def _check_ssd_packed():
    """SSD inference on a packed batch (one empty sequence, partial chunks; D (H, P), z, h0): y
    and the per-sequence states against float64."""
    cu = torch.tensor([0, 17, 17, 50, 83], device=DEVICE, dtype=torch.int32)
    ins = _ssd_inputs(1, 83, 4, 16, 2, 16, "hp", True, n_seq=4)
    y, s = _ssd_infer(ins, cu)
    (ry, rs), (ly, ls) = _ssd_refs(ins, cu)
    assert_close(y, ry, dtype=torch.bfloat16, lowp_ref=ly, name="y")
    assert_close(s, rs, dtype=torch.bfloat16, lowp_ref=ls, name="states")


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
    _check_ssd_packed()


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


# ---- session 9 (helper engine9): the two-level forward's knobs, packed batches, gradients -----

def _la_call(q, k, v, g, h0, cu=None):
    if g is None:
        return sk.chunk_linear_attn(q, k, v, initial_state=h0, output_final_state=True,
                                    normalize=False, cu_seqlens=cu, backend="triton")
    return sk.chunk_simple_gla(q, k, v, g, initial_state=h0, output_final_state=True,
                               cu_seqlens=cu, backend="triton")


def _la_inputs(B, T, H, K, V, gate, dtype, n_seq=None, req=False):
    q, k = (torch.randn(2, B, T, H, K, device=DEVICE) * K ** -0.25).to(dtype).unbind(0)
    v = torch.randn(B, T, H, V, device=DEVICE).to(dtype)
    g = -torch.rand(B, T, H, device=DEVICE) * 0.3 if gate == "scalar" else None
    h0 = torch.randn(n_seq or B, H, K, V, device=DEVICE)
    ins = [q, k, v, g, h0]
    return [x if x is None or not req else x.clone().requires_grad_() for x in ins]


def _check_vs_ref(o, ht, ins, cu, dtype, chunk=16):
    q, k, v, g, h0 = ins
    d = lambda t: None if t is None else t.detach().double()  # noqa: E731
    c = None if cu is None else cu.cpu()
    ro, rh = linear_attn_chunk_ref(d(q), d(k), d(v), d(g), None, d(h0), c, chunk_size=chunk)
    lp = dtype != torch.float32
    f = lambda t: None if t is None else t.detach().float()  # noqa: E731
    lo, lh = linear_attn_chunk_ref(f(q), f(k), f(v), f(g), None, f(h0), c, chunk_size=chunk)
    assert_close(o, ro, dtype=dtype, lowp_ref=lo if lp else None, name="o")
    assert_close(ht, rh, dtype=dtype, lowp_ref=lh if lp else None, name="ht")
    return lo, lh


@pytest.mark.parametrize("knobs", [
    dict(FUSED_V_FIRST=True, FUSED_S1_STEP=32, FUSED_STAGES=3),      # session 9's layout
    dict(FUSED_V_FIRST=False, FUSED_S1_STEP=0, FUSED_STAGES=2),      # session 6's
    dict(FUSED_V_FIRST=True, FUSED_S1_STEP=0, FUSED_BLOCK_V=16, FUSED_WARPS=4),
], ids=["s9", "s6", "bv16"])
@pytest.mark.parametrize("gate", ["none", "scalar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_two_level_knobs(small_segments, monkeypatch, knobs, gate, dtype):
    """Stage 3's grid order (V tiles first or last), stage 1 in coarse steps (16-bit inputs:
    SEG_CHUNKS=4 here, a 64-token segment walks two 32-token steps) or per chunk, pipeline stages,
    a V tile
    smaller than V (two V tiles per (head, segment)): o and the final state against float64,
    and within the bound of the per-chunk-state path."""
    for kk, vv in knobs.items():
        monkeypatch.setattr(common, kk, vv)
    monkeypatch.setattr(common, "SEG_CHUNKS", 4)
    ins = _la_inputs(2, 150, 2, 32, 24, gate, dtype)       # 10 chunks, 3 segments, last partial
    monkeypatch.setattr(common, "FUSED_FWD", 2)
    o, ht = _la_call(*ins)
    lo, lh = _check_vs_ref(o, ht, ins, None, dtype)
    monkeypatch.setattr(common, "FUSED_FWD", 0)
    o0, ht0 = _la_call(*ins)
    lp = dtype != torch.float32
    assert_close(o, o0.double(), dtype=dtype, lowp_ref=lo if lp else None, name="o vs per-chunk")
    assert_close(ht, ht0.double(), dtype=dtype, lowp_ref=lh if lp else None,
                 name="ht vs per-chunk")


@pytest.mark.parametrize("gate", ["none", "scalar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_two_level_varlen(small_segments, monkeypatch, gate, dtype):
    """Packed batch (cu_seqlens) on the fused forward: an empty sequence (its final state is h0),
    a one-token one, sequences of several segments ending mid-chunk and mid-segment, segments
    numbered by the device-side table; o and every final state against float64, and the same
    sequences called one by one as B rows on the fused path."""
    monkeypatch.setattr(common, "FUSED_FWD", 2)
    cu = torch.tensor([0, 0, 1, 40, 117, 150], device=DEVICE, dtype=torch.int32)
    ins = _la_inputs(1, 150, 2, 32, 24, gate, dtype, n_seq=5)
    o, ht = _la_call(*ins, cu=cu)
    lo, lh = _check_vs_ref(o, ht, ins, cu, dtype)
    assert torch.equal(ht[0], ins[4][0]), "empty sequence: final state is not h0"
    lp = dtype != torch.float32
    q, k, v, g, h0 = ins
    for n in (2, 3, 4):
        a, b = int(cu[n]), int(cu[n + 1])
        sl = lambda t: None if t is None else t[:, a:b].contiguous()  # noqa: E731
        on, hn = _la_call(sl(q), sl(k), sl(v), sl(g), h0[n:n + 1].contiguous())
        assert_close(o[:, a:b], on.double(), dtype=dtype, lowp_ref=lo[:, a:b] if lp else None,
                     name=f"o seq {n} vs B rows")
        assert_close(ht[n:n + 1], hn.double(), dtype=dtype,
                     lowp_ref=lh[n:n + 1] if lp else None, name=f"ht seq {n} vs B rows")


@pytest.mark.parametrize("varlen", [False, True], ids=["rows", "varlen"])
@pytest.mark.parametrize("gate", ["none", "scalar"])
def test_two_level_training_grads(small_segments, monkeypatch, gate, varlen):
    """Training through the fused forward (bf16, h0, final state with a cotangent): the backward
    recomputes its states from the inputs, so every gradient is bitwise that of the per-chunk
    path, and o is within the bound of float64; the gradients against float64 too."""
    cu = (torch.tensor([0, 33, 33, 101], device=DEVICE, dtype=torch.int32) if varlen else None)
    B, T, N = (1, 101, 3) if varlen else (2, 70, 2)
    base = _la_inputs(B, T, 2, 32, 24, gate, torch.bfloat16, n_seq=N)
    do = torch.randn(B, T, 2, 24, device=DEVICE)
    dht = torch.randn(N, 2, 32, 24, device=DEVICE)
    res = {}
    for fused in (1, 0):
        monkeypatch.setattr(common, "FUSED_FWD", fused)
        ins = [None if x is None else x.clone().requires_grad_() for x in base]
        o, ht = _la_call(*ins, cu=cu)
        live = [x for x in ins if x is not None]
        res[fused] = (o, ht, torch.autograd.grad((o.float() * do).sum() + (ht * dht).sum(),
                                                 live))
    o, ht, gr = res[1]
    _check_vs_ref(o, ht, base, cu, torch.bfloat16)
    for a, b in zip(gr, res[0][2]):
        assert torch.equal(a, b), "fused forward changed a gradient"
    d = lambda t: None if t is None else t.detach().double().requires_grad_()  # noqa: E731
    rins = [d(x) for x in base]
    ro, rh = linear_attn_chunk_ref(*rins[:4], None, rins[4], None if cu is None else cu.cpu(),
                                   chunk_size=16)
    rg = torch.autograd.grad((ro * do.double()).sum() + (rh * dht.double()).sum(),
                             [x for x in rins if x is not None])
    f = lambda t: None if t is None else t.detach().float().requires_grad_()  # noqa: E731
    lins = [f(x) for x in base]
    lo, lh = linear_attn_chunk_ref(*lins[:4], None, lins[4], None if cu is None else cu.cpu(),
                                   chunk_size=16)
    lg = torch.autograd.grad((lo * do).sum() + (lh * dht).sum(), [x for x in lins if x is not None])
    for name, a, r, l in zip(["dq", "dk", "dv"] + (["dg"] if gate == "scalar" else []) + ["dh0"],
                             gr, rg, lg):
        assert_close(a, r, dtype=torch.bfloat16, lowp_ref=l, name=name)


def test_ssd_two_level_varlen(small_segments, monkeypatch):
    """SSD (grouped B/C, D (H, P), z, dt_bias, softplus, h0) on the fused forward with a packed
    batch: y and the per-sequence states against float64, inference."""
    monkeypatch.setattr(common, "FUSED_FWD", 1)
    _check_ssd_packed()


def test_fused_fwd_env_knob():
    """SSM_KERNELS_FUSED_FWD in the environment sets common.FUSED_FWD at import (default 0)."""
    import os
    import subprocess
    import sys
    code = "from ssm_kernels.chunk import common; print(common.FUSED_FWD)"
    env = dict(os.environ)
    outs = []
    for val in (None, "1", "2"):
        env.pop("SSM_KERNELS_FUSED_FWD", None)
        if val is not None:
            env["SSM_KERNELS_FUSED_FWD"] = val
        outs.append(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                   text=True, check=True).stdout.strip())
    assert outs == ["0", "1", "2"]


@pytest.mark.parametrize("bv", [16, 32], ids=["bv16", "bv32"])
@pytest.mark.parametrize("gate", ["none", "scalar"])
def test_two_level_tma(small_segments, monkeypatch, gate, bv):
    """FUSED_TMA: stage 3 reads q, k, v and writes o through tensor descriptors (B rows with
    T % BT == 0): the same o and final states bitwise as the pointer loads, and against float64;
    a row length that is not a multiple of the chunk takes the pointer path (checked too)."""
    from ssm_kernels.chunk import fwd as cf
    taken = []
    orig = cf._takes_tma
    monkeypatch.setattr(cf, "_takes_tma", lambda *a: taken.append(orig(*a)) or taken[-1])
    monkeypatch.setattr(common, "FUSED_FWD", 1)
    monkeypatch.setattr(common, "FUSED_BLOCK_V", bv)
    for T, tma in ((96, True), (83, False)):
        ins = _la_inputs(2, T, 2, 32, 32, gate, torch.bfloat16)
        res = {}
        for on in (False, True):
            monkeypatch.setattr(common, "FUSED_TMA", on)
            taken.clear()
            res[on] = _la_call(*ins)
        assert taken == [tma], f"T={T}: descriptor path {taken}, expected {tma}"
        assert torch.equal(res[True][0], res[False][0]) and torch.equal(res[True][1], res[False][1])
        _check_vs_ref(*res[True], ins, None, torch.bfloat16)


def test_ssd_two_level_tma(small_segments, monkeypatch):
    """SSD on the descriptor path (grouped B/C as q/k with 2 groups, x * dt as v, D (H, P) and
    silu(z) in the epilogue, h0): y and states bitwise those of the pointer loads, and within the
    bound of float64."""
    from ssm_kernels.chunk import fwd as cf
    taken = []
    orig = cf._takes_tma
    monkeypatch.setattr(cf, "_takes_tma", lambda *a: taken.append(orig(*a)) or taken[-1])
    monkeypatch.setattr(common, "FUSED_FWD", 1)
    ins = _ssd_inputs(2, 64, 4, 16, 2, 32, "hp", True)
    got = {}
    for on in (False, True):
        monkeypatch.setattr(common, "FUSED_TMA", on)
        got[on] = _ssd_infer(ins)
    assert taken == [False, True], taken
    assert all(torch.equal(a, b) for a, b in zip(got[True], got[False]))
    (ry, rs), (ly, ls) = _ssd_refs(ins)
    assert_close(got[True][0], ry, dtype=torch.bfloat16, lowp_ref=ly, name="y")
    assert_close(got[True][1], rs, dtype=torch.bfloat16, lowp_ref=ls, name="states")


@pytest.mark.parametrize("gate", ["none", "scalar"])
def test_two_level_seg_rows(small_segments, monkeypatch, gate):
    """FUSED_SEG_ROWS: a row of 10 chunks of 16 with 16-token segments (SEG_CHUNKS=1) gets its
    segments doubled to 128 tokens (2 per row); o and ht against float64 with the lookback and with
    stage 2 (the fixture's LOOKBACK_SEGS 8 / 1), and the plan's segment length is 128."""
    from ssm_kernels.chunk import fwd as cf
    seen = []
    orig = cf.fused_segments
    monkeypatch.setattr(cf, "fused_segments", lambda p: seen.append(orig(p)) or seen[-1])
    monkeypatch.setattr(common, "FUSED_FWD", 1)
    monkeypatch.setattr(common, "SEG_CHUNKS", 1)
    monkeypatch.setattr(common, "FUSED_SEG_ROWS", 2)
    ins = _la_inputs(2, 150, 2, 32, 24, gate, torch.bfloat16)
    o, ht = _la_call(*ins)
    assert seen == [128]
    _check_vs_ref(o, ht, ins, None, torch.bfloat16)
