"""The chunk engine's forward knobs of session 7 (chunk/common.py; off by default, on here):
H_EVERY (the state pass stores every H_EVERY-th chunk's state, the output stage rebuilds the
others by replaying the chunks in between), STATE_BLOCK_K / STATE_BLOCK_V / STATE_STAGES (the
state pass's tiles), OUT_DECAY_O / OUT_BLOCK_V (scalar decay on the rows of
q h after the dot, one V tile), GLA_PREP (chunk_gla: cumsum, pre-decayed q / k rows, chunk totals
and scores in one launch; the state pass and the output stage read those). Against the float64
chunked reference: outputs and final states, dense rows not a multiple of the chunk with an
initial state, packed batches with an empty and a one-token sequence, K != V with two K tiles
(the second partial), float32 and bfloat16, the gradients through the backward, and SSD with D
and silu(z). Every buffer a stage writes starts as NaN."""
import pytest
import torch

import ssm_kernels as sk
from ssm_kernels.chunk import common
from ssm_kernels.linear_attn.reference import linear_attn_chunk_ref
from ssm_kernels.testing import assert_close

from conftest import DEVICE, kernel_backends

pytestmark = pytest.mark.skipif("triton" not in kernel_backends(), reason="needs Triton")

from ssm_kernels._config import triton_interpret  # noqa: E402

# chunk length: 16 under the interpreter here (T=83 -> 6 chunks, the last partial); on a GPU the
# engine's own (64 for K <= 128), and the shapes of test_chunk_fwd_defaults scale by S so that
# they keep the same chunk structure there (at 64, T=83 would be 2 chunks and a packed batch
# of short sequences one chunk each: nothing for every-2nd storage to skip)
CH = 16 if triton_interpret() else common.CHUNK
S = CH // 16


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(common, "INTERP_CHUNK", CH)
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)


def _inputs(B, T, H, K, V, gate, dtype, n_seq=None):
    q, k = (torch.randn(2, B, T, H, K, device=DEVICE) * K ** -0.25).to(dtype).unbind(0)
    v = torch.randn(B, T, H, V, device=DEVICE).to(dtype)
    g = None
    if gate == "scalar":
        g = -torch.rand(B, T, H, device=DEVICE) * 0.3
    elif gate == "gla":
        g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, device=DEVICE)) / 4
    h0 = torch.randn(n_seq or B, H, K, V, device=DEVICE)
    return q, k, v, g, h0


def _call(gate, q, k, v, g, h0, cu=None):
    kw = dict(initial_state=h0, output_final_state=True, cu_seqlens=cu, backend="triton")
    if gate == "none":
        return sk.chunk_linear_attn(q, k, v, normalize=False, **kw)
    if gate == "scalar":
        return sk.chunk_simple_gla(q, k, v, g, **kw)
    return sk.chunk_gla(q, k, v, g, **kw)


def _check(gate, ins, got, cu=None, dtype=torch.float32, what=""):
    q, k, v, g, h0 = ins
    d = lambda t: None if t is None else t.double()  # noqa: E731
    c = None if cu is None else cu.cpu()
    ro, rh = linear_attn_chunk_ref(d(q), d(k), d(v), d(g), None, d(h0), c, chunk_size=CH)
    lp = dtype != torch.float32
    # the reference fed the inputs as they are (computing in their dtype), as test_linear_attn
    lo, lh = linear_attn_chunk_ref(q, k, v, g, None, h0, c, chunk_size=CH)
    o, ht = got
    assert_close(o, ro, dtype=dtype, lowp_ref=lo if lp else None, name=f"o {what}")
    assert_close(ht, rh, dtype=dtype, lowp_ref=lh if lp else None, name=f"ht {what}")


KNOB_SETS = {
    "every2": dict(H_EVERY=2),
    "every4": dict(H_EVERY=4),
    "every3+decay_o+bv128": dict(H_EVERY=3, OUT_DECAY_O=True, OUT_BLOCK_V=128),
    "decay_o": dict(OUT_DECAY_O=True),
    "every2+state_tiles": dict(H_EVERY=2, STATE_BLOCK_K=32, STATE_BLOCK_V=16, STATE_STAGES=3),
    "every4+coarse": dict(H_EVERY=4, STATE_COARSE=True),
    "every2+coarse+decay_o": dict(H_EVERY=2, STATE_COARSE=True, OUT_DECAY_O=True),
    "prep": dict(GLA_PREP=True),
    "prep+every3": dict(GLA_PREP=True, H_EVERY=3),
    "prep+every2": dict(GLA_PREP=True, H_EVERY=2),
    "prep+every2+state_tiles": dict(GLA_PREP=True, H_EVERY=2, STATE_BLOCK_K=32, STATE_BLOCK_V=16),
}


def _set(monkeypatch, knobs):
    for kk, vv in knobs.items():
        monkeypatch.setattr(common, kk, vv)


@pytest.mark.parametrize("knobs", list(KNOB_SETS))
@pytest.mark.parametrize("gate", ["none", "scalar", "gla"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_forward_knobs_dense(small_chunks, monkeypatch, knobs, gate, dtype):
    """B rows, T=83 (6 chunks, the last partial), K=72 (two K tiles of 64, the second partial),
    V=40, initial states: o and the final states against float64, and against the knobs off."""
    if gate != "gla" and "prep" in knobs:
        pytest.skip("GLA_PREP is chunk_gla's")
    if gate == "gla" and "prep" not in knobs:
        pytest.skip("chunk_gla: H_EVERY needs GLA_PREP (test_gla_every_needs_prep); OUT_* are "
                    "GATE 0/1's")
    ins = _inputs(2, 83, 2, 72, 40, gate, dtype)
    base = _call(gate, *ins)
    _set(monkeypatch, KNOB_SETS[knobs])
    got = _call(gate, *ins)
    _check(gate, ins, got, dtype=dtype, what=knobs)
    # with H_EVERY the replayed states stay float32 (the stored ones are rounded to the storage
    # dtype): close to the default path, not equal
    lp = dtype != torch.float32
    assert_close(got[0], base[0].double(), dtype=dtype, name="o vs knobs off",
                 lowp_ref=base[0].double() if lp else None)


@pytest.mark.parametrize("knobs", ["every2", "every3+decay_o+bv128", "every4+coarse",
                                   "every2+coarse+decay_o", "prep+every3", "prep+every2"])
@pytest.mark.parametrize("gate", ["scalar", "gla"])
def test_forward_knobs_varlen(small_chunks, monkeypatch, knobs, gate):
    """Packed sequences of 0, 1, 50, 37 (3 chunks + a partial one), 61 tokens: the state slots
    of each sequence start at the device-side table (common.state_slots), surplus programs write
    nothing, replays never cross a sequence start."""
    if (gate != "gla") == ("prep" in knobs):
        pytest.skip("GLA_PREP is chunk_gla's, and chunk_gla's H_EVERY needs it")
    cu = torch.tensor([0, 0, 1, 51, 88, 149], device=DEVICE, dtype=torch.int32)
    ins = _inputs(1, 149, 2, 24, 40, gate, torch.float32, n_seq=5)
    _set(monkeypatch, KNOB_SETS[knobs])
    _check(gate, ins, _call(gate, *ins, cu=cu), cu=cu, what=knobs)


@pytest.mark.parametrize("gate", ["scalar", "gla"])
def test_state_slots_count(small_chunks, monkeypatch, gate):
    """H_EVERY=4 stores ceil(chunks / 4) states per sequence: the state pass gets a buffer of
    that many slots (rows: B * ceil(NT / 4); packed: the bound NCH // 4 + N)."""
    from ssm_kernels.chunk import fwd as cf
    seen = []
    real = cf.chunk_states

    def spy(*a, **kw):
        h, ht = real(*a, **kw)
        seen.append(h.shape[0])
        return h, ht
    monkeypatch.setattr(cf, "chunk_states", spy)
    monkeypatch.setattr(common, "H_EVERY", 4)
    monkeypatch.setattr(common, "GLA_PREP", True)
    ins = _inputs(2, 83, 2, 24, 24, gate, torch.float32)
    with torch.no_grad():
        _call(gate, *ins)
    assert seen == [2 * 2]                      # 6 chunks per row -> 2 slots per row
    cu = torch.tensor([0, 0, 1, 51, 88, 149], device=DEVICE, dtype=torch.int32)
    ins = _inputs(1, 149, 2, 24, 24, gate, torch.float32, n_seq=5)
    with torch.no_grad():
        _call(gate, *ins, cu=cu)
    assert seen[1] == (149 // CH + 5) // 4 + 5


def test_gla_every_needs_prep(small_chunks, monkeypatch):
    """chunk_gla without GLA_PREP stores every state whatever H_EVERY says (the replay's scores
    are plain products only on the pre-decayed rows): bitwise the default forward."""
    ins = _inputs(2, 83, 2, 24, 40, "gla", torch.float32)
    base = _call("gla", *ins)
    monkeypatch.setattr(common, "H_EVERY", 4)
    got = _call("gla", *ins)
    assert all(torch.equal(a, b) for a, b in zip(got, base))


@pytest.mark.parametrize("gate", ["scalar", "gla"])
@pytest.mark.parametrize("save", [0, 1, 2])
def test_forward_knobs_grads(small_chunks, monkeypatch, gate, save):
    """Training with every knob on: the backward is unchanged (it recomputes every state, or
    takes the kept ones: SAVE_STATES=2 makes the forward store every state, H_EVERY or not), so
    every gradient must match the float64 reference."""
    _set(monkeypatch, dict(H_EVERY=3, OUT_DECAY_O=True, GLA_PREP=True, SAVE_STATES=save))
    ins = _inputs(2, 83, 2, 24, 40, gate, torch.float32)
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in ins]
    o, ht = _call(gate, *leaves)
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    live = [x for x in leaves if x is not None]
    got = torch.autograd.grad((o * do).sum() + (ht * dht).sum(), live)
    d = [None if x is None else x.detach().double().requires_grad_() for x in ins]
    ro, rh = linear_attn_chunk_ref(*d[:4], None, d[4], None, chunk_size=CH)
    rl = [x for x in d if x is not None]
    ref = torch.autograd.grad((ro * do.double()).sum() + (rh * dht.double()).sum(), rl)
    assert_close(o, ro, name="o")
    names = ["dq", "dk", "dv", "dg", "dh0"]
    for n, a, r in zip(names, got, ref):
        assert_close(a, r, name=n)


@pytest.mark.parametrize("every", [2, 3])
def test_ssd_every(small_chunks, monkeypatch, every):
    """SSD (v = x dt scaled in-kernel, decay dt A formed in-kernel, grouped B/C) with D (H, P) and
    silu(z) in the output epilogue, inference, rows and a packed batch: the replay scales v rows
    and forms the decays as the state pass does."""
    from ssm_kernels.ssd.reference import ssd_ref
    from ssm_kernels.testing import ssd_inputs
    monkeypatch.setattr(common, "H_EVERY", every)
    monkeypatch.setattr(common, "OUT_DECAY_O", True)
    b, L, H, P, G, N = 2, 83, 4, 16, 2, 32
    x, dt, A, Bm, Cm, D, z, bias, h0 = ssd_inputs(b, L, H, P, G, N, DEVICE)
    kw = dict(D=D, z=z, dt_bias=bias, initial_states=h0, dt_softplus=True)
    with torch.no_grad():
        y, s = sk.mamba_chunk_scan_combined(x, dt, A, Bm, Cm, 64, return_final_states=True,
                                            backend="triton", **kw)
    d = lambda t: t.double() if torch.is_tensor(t) else t  # noqa: E731
    ry, rs = ssd_ref(d(x), d(dt), d(A), d(Bm), d(Cm), CH, **{kk: d(vv) for kk, vv in kw.items()})
    ly, ls = ssd_ref(x, dt, A, Bm, Cm, CH, **kw)
    assert_close(y, ry, dtype=torch.bfloat16, lowp_ref=ly, name="y")
    assert_close(s, rs, dtype=torch.bfloat16, lowp_ref=ls, name="states")
