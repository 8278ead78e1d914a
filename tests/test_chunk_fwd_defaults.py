"""The chunk engine's forward defaults of sessions 8-9 (chunk/common.py FWD_AUTO, knobs None):
for 16-bit GATE 0 and 1 (chunk_linear_attn, chunk_simple_gla, SSD inference) every 2nd chunk's
state stored by a coarse state pass, one V tile of 128 at 8 warps (scores early there), GATE 1's
decay on the rows of q h; float32 and SSD's training forward keep the old path.
Against the old path (every knob off, set explicitly): float32 bitwise equal;
16-bit outputs and final states within the float64 reference's bound, every gradient
bitwise equal (the backward recomputes its states, or, SAVE_STATES=2, takes kept ones from a
forward that then stores every state with the old state pass), dense rows with an initial state
(T not a multiple of the chunk), packed batches with an empty and a one-token sequence, inference
(no grad) and training forward; which forward ran is checked by the stored-state count."""
import pytest
import torch

import ssm_kernels as sk
from ssm_kernels.chunk import bwd as cb, common, fwd as cf

from conftest import DEVICE, kernel_backends
from test_chunk_every import CH, S, _call, _check, _inputs, small_chunks  # noqa: F401

pytestmark = pytest.mark.skipif("triton" not in kernel_backends(), reason="needs Triton")

OLD = dict(H_EVERY=1, STATE_COARSE=False, OUT_BLOCK_V=common.BLOCK_V, OUT_DECAY_O=False,
           OUT_WARPS=None, OUT_SCORES_EARLY=False)
GATE = {"none": 0, "scalar": 1}


def _run(monkeypatch, knobs, fn):
    """fn() under knobs (the rest as they are), restoring them after; also returns the number
    of states each chunk_states call stored."""
    seen = []
    real = cf.chunk_states

    def spy(*a, **kw):
        h, ht = real(*a, **kw)
        seen.append(h.shape[0] if h.dim() == 4 else 0)
        return h, ht
    with monkeypatch.context() as m:
        m.setattr(cf, "chunk_states", spy)
        m.setattr(cb, "chunk_states", spy)
        for kk, vv in knobs.items():
            m.setattr(common, kk, vv)
        return fn(), seen


def _fwd_bwd(gate, ins, cu=None, grad=True):
    if not grad:
        with torch.no_grad():
            return _call(gate, *ins, cu=cu), None
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in ins]
    o, ht = _call(gate, *leaves, cu=cu)
    gen = torch.Generator(device="cpu").manual_seed(1)
    do = torch.randn(o.shape, generator=gen).to(o)
    dht = torch.randn(ht.shape, generator=gen).to(ht)
    live = [x for x in leaves if x is not None]
    grads = torch.autograd.grad((o.float() * do.float()).sum() + (ht * dht).sum(), live)
    return (o.detach(), ht.detach()), grads


def _equal(a, b, what):
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"{what} [{i}] differs: max {(x.double() - y.double()).abs().max()}"


# packed: an empty and a one-token sequence, then 50, 37 and 61 chunk-lengths of 16 tokens
VARLEN_CU = [0, 0, 1, 1 + 50 * S, 1 + 87 * S, 1 + 148 * S]
CASES = {   # name -> (B, T, H, K, V, cu_seqlens); T in units of CH / 16 (see test_chunk_every.S)
    "dense": (2, 83 * S, 2, 72, 40, None),
    "varlen": (1, VARLEN_CU[-1], 2, 24, 40, VARLEN_CU),
}


@pytest.mark.parametrize("save", [1, 2])
@pytest.mark.parametrize("grad", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("gate", ["none", "scalar"])
def test_defaults_vs_old_path(small_chunks, monkeypatch, gate, dtype, case, grad, save):
    if not grad and save == 2:
        pytest.skip("SAVE_STATES only matters when a gradient is taken")
    B, T, H, K, V, cu = CASES[case]
    cu = None if cu is None else torch.tensor(cu, device=DEVICE, dtype=torch.int32)
    ins = _inputs(B, T, H, K, V, gate, dtype, n_seq=None if cu is None else cu.numel() - 1)
    monkeypatch.setattr(common, "SAVE_STATES", save)
    (old, gold), n_old = _run(monkeypatch, OLD, lambda: _fwd_bwd(gate, ins, cu, grad))
    (new, gnew), n_new = _run(monkeypatch, {}, lambda: _fwd_bwd(gate, ins, cu, grad))
    # 16-bit (GATE 0 since session 9, GATE 1 since 8): every 2nd state stored by the coarse
    # pass (the output replays the others: o rounds differently), GATE 1's decay on the rows of
    # q h, V tile 128, unless the forward keeps every state for the backward
    changed = dtype != torch.float32
    new_path = changed and not (grad and save == 2)
    nch = n_old[0]
    # the forward's state pass stores every 2nd state on the new path (rows: ceil(NT / 2) per
    # row; packed: the bound NCH // 2 + N), every state otherwise; the backward recomputes all
    if not new_path:
        exp_fwd = nch
    elif cu is None:
        exp_fwd = B * -(-(-(-T // CH)) // 2)
    else:
        exp_fwd = nch // 2 + cu.numel() - 1
    assert n_new[0] == exp_fwd, (n_new, n_old)
    assert n_new[1:] == n_old[1:], "the backward's recompute must not change"
    if grad:
        _equal(gnew, gold, "gradients")
    if not changed:
        _equal(new, old, "o, ht")
        return
    _check(gate, ins, new, cu=None if cu is None else cu, dtype=dtype, what="new defaults")
    if not new_path:    # the old state pass: the same final states
        _equal(new[1:], old[1:], "ht")
        return
    if not grad:
        return
    # training and inference take the same forward (SAVE_STATES 1): bitwise the same o and ht
    (inf, _), _ = _run(monkeypatch, {}, lambda: _fwd_bwd(gate, ins, cu, False))
    _equal(new, inf, "training vs inference forward")


@pytest.mark.parametrize("grad", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("varlen", [False, True], ids=["rows", "varlen"])
def test_ssd_defaults_vs_old_path(small_chunks, monkeypatch, grad, varlen):
    """SSD (GATE 1, P=16 < 128: one V tile either way) with D (H, P), z, dt_bias, softplus and
    initial states. Inference: the new forward, y and final states within the float64
    reference's bound. Training: the old path's forward (FWD_AUTO off: it was faster f+b),
    everything bitwise the old path's."""
    from ssm_kernels.ssd.reference import ssd_ref
    from ssm_kernels.testing import assert_close, ssd_inputs
    b, L, H, P, G, N = 2, 83 * S, 4, 16, 2, 32
    cu = None
    if varlen:
        b, L = 1, VARLEN_CU[-1]
        cu = torch.tensor(VARLEN_CU, device=DEVICE, dtype=torch.int32)
    ins = ssd_inputs(b, L, H, P, G, N, DEVICE, n_states=None if cu is None else cu.numel() - 1)
    x, dt, A, Bm, Cm, D, z, bias, h0 = ins

    def run():
        leaves = [t.detach().clone().requires_grad_(grad) for t in ins]
        xx, dd, aa, bb, cc, DD, zz, bi, hh = leaves
        with torch.set_grad_enabled(grad):
            out = sk.mamba_chunk_scan_combined(
                xx, dd, aa, bb, cc, 64, D=DD, z=zz, dt_bias=bi, initial_states=hh,
                dt_softplus=True, cu_seqlens=cu, return_final_states=cu is None,
                return_varlen_states=cu is not None, backend="triton")
            y, s = out[0], out[-1]
            if not grad:
                return (y, s), None
            gen = torch.Generator(device="cpu").manual_seed(2)
            dy = torch.randn(y.shape, generator=gen).to(y)
            ds = torch.randn(s.shape, generator=gen).to(s)
            g = torch.autograd.grad((y.float() * dy.float()).sum() + (s * ds).sum(), leaves)
        return (y.detach(), s.detach()), g
    (old, gold), _ = _run(monkeypatch, OLD, run)
    (new, gnew), n_new = _run(monkeypatch, {}, run)
    n_old = _run(monkeypatch, OLD, run)[1]
    if grad:   # SSD's training forward is the old path: the same states, bitwise everything
        assert n_new == n_old, (n_new, n_old)
        _equal(new, old, "y, states")
        _equal(gnew, gold, "gradients")
        return
    assert n_new[0] < n_old[0], "the new forward stores fewer states"
    kw = dict(D=D, z=z, dt_bias=bias, initial_states=h0, dt_softplus=True)
    d = lambda t: t.double() if torch.is_tensor(t) else t  # noqa: E731
    if cu is None:
        ry, rs = ssd_ref(d(x), d(dt), d(A), d(Bm), d(Cm), CH, **{kk: d(vv) for kk, vv in kw.items()})
        ly, ls = ssd_ref(x, dt, A, Bm, Cm, CH, **kw)
        assert_close(new[0], ry, dtype=torch.bfloat16, lowp_ref=ly, name="y")
        assert_close(new[1], rs, dtype=torch.bfloat16, lowp_ref=ls, name="states")
    # the old path's y is within the same bound; the new one must be as close to it
    assert_close(new[0], old[0].double(), dtype=torch.bfloat16, lowp_ref=old[0].double(),
                 name="y vs old path")
    assert_close(new[1], old[1].double(), dtype=torch.bfloat16, lowp_ref=old[1].double(),
                 name="states vs old path")


@pytest.mark.parametrize("every", [2, 3])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("gate", ["none", "scalar"])
def test_scores_early_bitwise(small_chunks, monkeypatch, gate, dtype, case, every):
    """OUT_SCORES_EARLY: the chunk's own scores formed in the first K loop instead of after the
    replay: the same sums in the same order, so o and ht are bitwise the default's; and the
    replay really runs (every > 1 stored states)."""
    B, T, H, K, V, cu = CASES[case]
    cu = None if cu is None else torch.tensor(cu, device=DEVICE, dtype=torch.int32)
    ins = _inputs(B, T, H, K, V, gate, dtype, n_seq=None if cu is None else cu.numel() - 1)
    kn = dict(H_EVERY=every, OUT_SCORES_EARLY=False)
    (base, _), n = _run(monkeypatch, kn, lambda: _fwd_bwd(gate, ins, cu, False))
    (got, _), _ = _run(monkeypatch, dict(kn, OUT_SCORES_EARLY=True),
                       lambda: _fwd_bwd(gate, ins, cu, False))
    (old, _), n_old = _run(monkeypatch, OLD, lambda: _fwd_bwd(gate, ins, cu, False))
    assert n[0] < n_old[0]
    _equal(got, base, "o, ht")
    _check(gate, ins, got, cu=cu, dtype=dtype, what="scores early")
