"""SAVE_STATES (delta_rule/chunk.py; bench/NOTES.md "helper deltabwd10"): the forward keeps h,
v_new (1) and W (2) for the backward, which then runs no state scan (and, at 2, no WY launch).
Every output and gradient must equal the recompute path's bitwise (the same kernels formed the
same tensors from the same inputs), and stay within the float64 bound; the registered ops' fake
shapes must match the real buffer (opcheck, torch.compile: test_delta_rule.py's
test_opcheck_saved_wy_inverse / test_compile_fullgraph_saved_wy_inverse with save_states)."""
import pytest
import torch
import torch.nn.functional as F

from test_delta_rule import (CHUNK_CASES, TRITON, _chunk_inputs, _chunk_run, _judge_chunk,
                             _kernel_fn, _ref_fn)


class _Count:
    """Counts the launches of a launcher (`kernel[grid](...)`)."""

    def __init__(self, real):
        self.real, self.n = real, 0

    def __getitem__(self, grid):
        self.n += 1
        return self.real[grid]


# (name, dtype, GPU tiles (BT 64, 16-bit dots in the interpreter), case args)
CASES = {
    # gated, L2 norm, HV = 2H, partial last chunk, K != V, initial state (h0 in every case)
    "gated-gva-gpu-tiles": (torch.float16, True, (True, True, 1, 80, 1, 2, 16, 24, None)),
    # varlen with a one-token sequence, HV = 3H (BT 32)
    "gated-varlen-gva": (torch.float16, False, CHUNK_CASES[2]),
    # no gate, no L2 norm, HV = 2H, GPU tiles
    "nogate-gva-gpu-tiles": (torch.float16, True, (False, False, 1, 70, 2, 4, 16, 16, None)),
    # float32: the `_wy_fwd_kernel` / `_wu_kernel` path (W, U from T; no WY_FAST)
    "fp32-nogate-l2": (torch.float32, False, CHUNK_CASES[1]),
}


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("level", [1, 2])
@pytest.mark.parametrize("case", sorted(CASES))
def test_save_states_bitwise_and_launches(backend, level, case, monkeypatch):
    from ssm_kernels.chunk import common
    from ssm_kernels.delta_rule import chunk as wy
    dtype, gpu_tiles, args = CASES[case]
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)
    if gpu_tiles:
        monkeypatch.setattr(common, "triton_interpret", lambda: False)
    assert wy.SAVE_WY_INVERSE and wy.SAVE_STATES == 0
    st = _Count(wy._state_kernel)
    wyk = _Count(wy._wy_fast_kernel if dtype != torch.float32 else wy._wu_kernel)
    monkeypatch.setattr(wy, "_state_kernel", st)
    monkeypatch.setattr(wy, "_wy_fast_kernel" if dtype != torch.float32 else "_wu_kernel", wyk)
    q, k, v, g, beta, h0, cu, cots = _chunk_inputs(*args, dtype=dtype)
    gated, l2 = args[:2]
    fn = _kernel_fn(gated, backend)
    base = _chunk_run(fn, q, k, v, g, beta, h0, cu, l2, cots)
    assert st.n == 2                      # the forward's scan and the backward's recompute
    n_wy = wyk.n
    monkeypatch.setattr(wy, "SAVE_STATES", level)
    saved = _chunk_run(fn, q, k, v, g, beta, h0, cu, l2, cots)
    assert st.n == 3                      # the forward's only
    if dtype != torch.float32:
        # forward 1 (T, W, U); backward: W from T (level 1) or nothing (level 2)
        assert wyk.n - n_wy == (2 if level == 1 else 1)
    names = ["o", "S", "dq", "dk", "dv"] + (["dg"] if gated else []) + ["dbeta", "dh0"]
    for name, a, b in zip(names, saved, base):
        assert torch.equal(a, b), f"{name}: SAVE_STATES={level} differs from the recompute path"
    # and against the float64 recurrence with the repo's bound
    d = lambda x: None if x is None else x.double()
    ref = _chunk_run(_ref_fn, d(q), d(k), d(v), d(g), d(beta), d(h0), cu, l2, cots)
    low = (_chunk_run(_ref_fn, q, k, v, g, beta, h0, cu, l2, cots) if dtype != torch.float32
           else [None] * len(saved))
    qn = F.normalize(q.double(), dim=-1, eps=0) if l2 else q.double()
    _judge_chunk(saved, ref, low, names, dtype, qn)


@pytest.mark.parametrize("backend", TRITON)
def test_save_states_scan_t_and_no_grad(backend, monkeypatch):
    """SCAN_T's forward forms no W: level 2 falls back to 1 (h, v_new kept, W from T); bitwise
    the SCAN_T + SCAN_T_BWD path (whose backward scan forms the SCAN_T forward's h, v_new; with
    SCAN_T alone the backward's engine scan rounds them differently). Without gradients nothing
    is kept (empty third output)."""
    from ssm_kernels.chunk import common
    from ssm_kernels.delta_rule import chunk as wy
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)
    monkeypatch.setattr(common, "triton_interpret", lambda: False)
    monkeypatch.setattr(wy, "SCAN_T", True)
    monkeypatch.setattr(wy, "SCAN_T_BWD", True)
    q, k, v, g, beta, h0, cu, cots = _chunk_inputs(True, True, 1, 80, 1, 2, 16, 24, None,
                                                   dtype=torch.float16)
    fn = _kernel_fn(True, backend)
    base = _chunk_run(fn, q, k, v, g, beta, h0, cu, True, cots)
    monkeypatch.setattr(wy, "SAVE_STATES", 2)
    assert wy._save_level(True) == 1
    t_shape = wy.saved_shape(q, v)
    assert len(t_shape) == 1 and t_shape[0] == wy._saved_offsets(
        wy._saved_specs(q, v, None, 1))[1]
    saved = _chunk_run(fn, q, k, v, g, beta, h0, cu, True, cots)
    for name, a, b in zip(["o", "S", "dq", "dk", "dv", "dg", "dbeta", "dh0"], saved, base):
        assert torch.equal(a, b), name
    with torch.no_grad():
        o, _, t = torch.ops.ssm_kernels.delta_rule_fwd(
            q, k, v, g, beta, h0, cu, 0.3, True, True, backend, False)
    assert t.numel() == 0 and not torch.isnan(o).any()


# opcheck and torch.compile with SAVE_STATES: test_delta_rule.py's saved_wy_inverse tests
# (parametrized over save_states)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("knobs", [dict(DSTATE=True), dict(DELTA_FWD=1),
                                   dict(OUT_DECAY_O=True, OUT_BLOCK_V=128),
                                   dict(BWD_GRAD_16=True)],
                         ids=["dstate", "deltafwd1", "outd-bv128", "grad16"])
def test_save_states_composes(backend, knobs, monkeypatch):
    """Level 2 with the forward's other scan / output knobs (the delta-only scans write h, v_new
    into the saved views too) and the backward's 16-bit dV' (BWD_GRAD_16): bitwise the same
    knobs' recompute path, GPU tiles, gated L2 GVA."""
    from ssm_kernels.chunk import common
    from ssm_kernels.delta_rule import chunk as wy
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)
    monkeypatch.setattr(common, "triton_interpret", lambda: False)
    for name, val in knobs.items():
        monkeypatch.setattr(wy, name, val)
    q, k, v, g, beta, h0, cu, cots = _chunk_inputs(True, True, 1, 80, 1, 2, 16, 24, None,
                                                   dtype=torch.float16)
    fn = _kernel_fn(True, backend)
    base = _chunk_run(fn, q, k, v, g, beta, h0, cu, True, cots)
    monkeypatch.setattr(wy, "SAVE_STATES", 2)
    saved = _chunk_run(fn, q, k, v, g, beta, h0, cu, True, cots)
    for name, a, b in zip(["o", "S", "dq", "dk", "dv", "dg", "dbeta", "dh0"], saved, base):
        assert torch.equal(a, b), name
