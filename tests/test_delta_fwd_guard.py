"""The delta-only forward scan (`delta_rule/fwd.py`, knob `chunk.DELTA_FWD` 1 / 2) touches only its
arguments and matches the default path, at the GPU's tiles (BT=64, 16-bit dots), under the
interpreter's address check (tests/guard_zone.py): every active load / store of every kernel of the
forward and backward lies inside a tensor argument, the inputs sit inside NaN guard zones that
stay untouched, and o, the final state and every gradient agree with the float64 recurrence and
with DELTA_FWD=0.

Why (session 8, H100, Triton 3.6): `DELTA_FWD=1` and `=2` died with an illegal memory access in
bench/gpu_delta.py's variant check (B1 T1024 H2 HV4 K=V=128 bf16). The cases below cover what
could index out of bounds: grouped value heads (HV = 2H: q/k heads vs v/state heads), HV = H, T
not a multiple of the chunk, packed sequences, V in several tiles with a partial one, with and
without initial state and gate, and the GPU's whole-K tile (K = 128). They pass: the kernel's
addressing is in bounds (bench/NOTES.md, helper dfwd8, also checks the sm_90 PTX of the Triton
3.6 compile lane by lane: bench/ptx_bounds.py)."""
import pytest
import torch

from conftest import DEVICE, kernel_backends
from guard_zone import checked_access, guarded, guards_intact
from test_delta_rule import _chunk_inputs, _judge_chunk, _kernel_fn, _ref_fn

pytestmark = pytest.mark.skipif(DEVICE != "cpu" or "triton" not in kernel_backends(),
                                reason="interpreter check (CPU, TRITON_INTERPRET=1)")

PAD = 64
# name: (gated, l2, B, T, H, HV, K, V, cu_seqlens, h0)
CASES = {
    "gva-tail": (True, True, 1, 150, 2, 4, 32, 48, None, True),     # HV = 2H, 3 chunks, V tiles 32+16
    "mha-noh0": (True, False, 2, 100, 2, 2, 32, 32, None, False),   # HV = H, B rows, no h0
    "varlen-gva": (True, True, 1, 150, 1, 2, 16, 48, [0, 5, 70, 150], True),
    "ungated-gva": (False, True, 1, 90, 2, 4, 32, 32, None, True),
    "k128-gva": (True, True, 1, 130, 1, 2, 128, 128, None, True),  # the GPU's BK = 128, 4 V tiles
}


def _run(knobs, case, dtype, monkeypatch, guard):
    from ssm_kernels.chunk import common
    from ssm_kernels.delta_rule import chunk as wy
    for name, val in knobs.items():
        monkeypatch.setattr(wy, name, val)
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)
    monkeypatch.setattr(common, "triton_interpret", lambda: False)   # GPU tiles: BT=64
    gated, l2, B, T, H, HV, K, V, cu, with_h0 = case
    torch.manual_seed(11)
    q, k, v, g, beta, h0, cu_t, cots = _chunk_inputs(gated, l2, B, T, H, HV, K, V, cu, dtype=dtype)
    h0 = h0 if with_h0 else None
    if guard:
        q, k, v, beta = (guarded(x, PAD, float("nan")) for x in (q, k, v, beta))
        g = None if g is None else guarded(g, PAD, float("nan"))
        h0 = None if h0 is None else guarded(h0, PAD, float("nan"))
    with checked_access() as log:
        out = _grads(_kernel_fn(gated, "triton"), q, k, v, g, beta, h0, cu_t, l2, cots)
    log.assert_clean()
    if guard:
        for x in (q, k, v, g, beta, h0):
            assert x is None or guards_intact(x, PAD, float("nan"))
    return out, log.launches, (q, k, v, g, beta, h0, cu_t, l2, cots, gated)


def _grads(fn, q, k, v, g, beta, h0, cu, l2, cots):
    """(o, S, dq, dk, dv, [dg,] dbeta, [dh0]) of a loss on o and S through fn (h0 may be None)."""
    # detach (no copy): the kernels read the guarded buffers themselves
    xs = [x.detach().requires_grad_() for x in (q, k, v, g, beta, h0) if x is not None]
    a = dict(zip([n for n, x in zip("q k v g beta h0".split(), (q, k, v, g, beta, h0))
                  if x is not None], xs))
    o, S = fn(a["q"], a["k"], a["v"], a.get("g"), a["beta"], a.get("h0"), cu, l2)
    loss = (o.double() * cots[0]).sum() + (S.double() * cots[1]).sum()
    return [o, S] + list(torch.autograd.grad(loss, xs))


@pytest.mark.parametrize("mode", [1, 2])
@pytest.mark.parametrize("case", sorted(CASES))
def test_delta_fwd_in_bounds_and_equal_to_default(case, mode, monkeypatch):
    dtype = torch.float16   # the interpreter's bf16 tensor-core dot is broken (NOTES, deltafwd7)
    out, launches, ins = _run({"DELTA_FWD": mode}, CASES[case], dtype, monkeypatch, guard=True)
    # the forward's scan (fused with the output at 2) and the backward's recompute of h, V'
    assert launches.count("_delta_fwd_kernel") == 2, launches
    assert ("_output_kernel" in launches) == (mode == 1), launches
    q, k, v, g, beta, h0, cu, l2, cots, gated = ins
    d = lambda x: None if x is None else x.double()
    ref = _grads(_ref_fn, d(q), d(k), d(v), d(g), d(beta), d(h0), cu, l2, cots)
    low = _grads(_ref_fn, q, k, v, g, beta, h0, cu, l2, cots)
    names = ["o", "S", "dq", "dk", "dv"] + (["dg"] if gated else []) + ["dbeta"] + (
        ["dh0"] if h0 is not None else [])
    qn = torch.nn.functional.normalize(q.double(), dim=-1, eps=0) if l2 else q.double()
    _judge_chunk(out, ref, low, names, dtype, qn)
    # the same inputs through the default path (DELTA_FWD=0): the same numbers up to rounding order
    base, launches0, _ = _run({"DELTA_FWD": 0}, CASES[case], dtype, monkeypatch, guard=False)
    assert "_delta_fwd_kernel" not in launches0
    from ssm_kernels.testing import rel_err
    for n, a, b, r in zip(names, out, base, ref):
        e_ab, e_br = rel_err(a, b), rel_err(b, r)
        assert e_ab <= max(2 * e_br, 2e-3), f"{n}: DELTA_FWD={mode} vs 0 {e_ab:.2e} (0 vs ref {e_br:.2e})"
