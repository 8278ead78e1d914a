"""The chunk engine's kept forward tensors (chunk/common.SAVE_STATES, fwd.py `chunk_fwd_keep`):
with gradients the forward op returns every chunk's state h (SAVE_STATES 2) and GATE 2's
chunk-local cumsums Gc (1 and 2) as extra outputs, saved by its autograd, and the backward skips
recomputing them. The backward's recompute runs the same kernels on the same inputs, so every
output and gradient must be bitwise those of SAVE_STATES=0, for chunk_linear_attn,
chunk_simple_gla, chunk_gla and mamba_chunk_scan_combined, B rows and varlen, with and without
initial states; the launches drop by one state pass (and one cumsum for chunk_gla). Without a
gradient nothing is kept; the fused forward path (no h in memory) keeps no h and the backward
recomputes; the registered ops pass opcheck and torch.compile(fullgraph=True)."""
import os

import pytest
import torch
import torch.nn.functional as F

import ssm_kernels as sk
from ssm_kernels.chunk import common

from conftest import DEVICE, kernel_backends

pytestmark = pytest.mark.skipif("triton" not in kernel_backends(), reason="needs Triton")


INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture
def launches(monkeypatch):
    """Names of the interpreted kernels launched (the kernels still run); on a GPU (no
    interpreter) nothing is recorded and the launch counts are not checked."""
    import triton.runtime.interpreter as interp
    calls = []
    real = interp.InterpretedFunction.run

    def run(self, *a, **k):
        calls.append(getattr(self.fn, "__name__", "?"))
        return real(self, *a, **k)
    monkeypatch.setattr(interp.InterpretedFunction, "run", run)
    return calls


def _inputs(op, dtype, varlen, h0):
    gen = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)  # noqa: E731
    B, T, H, K, V = (1, 45, 2, 16, 24) if varlen else (2, 45, 2, 16, 24)
    cu = torch.tensor([0, 13, 45], device=DEVICE, dtype=torch.int32) if varlen else None
    N = 2 if varlen else B
    if op == "ssd":
        G = 1
        d = dict(x=r(B, T, H, V).to(dtype), dt=F.softplus(r(B, T, H)), A=-torch.rand(H, generator=gen).to(DEVICE),
                 B=(r(B, T, G, K) * 0.5).to(dtype), C=(r(B, T, G, K) * 0.5).to(dtype),
                 D=r(H), z=r(B, T, H, V).to(dtype),
                 initial_states=r(N, H, V, K) if h0 else None)
    else:
        d = dict(q=(r(B, T, H, K) * 0.5).to(dtype), k=(r(B, T, H, K) * 0.5).to(dtype),
                 v=r(B, T, H, V).to(dtype), initial_state=r(N, H, K, V) if h0 else None)
        if op == "simple_gla":
            d["g"] = F.logsigmoid(r(B, T, H)) * 0.3
        elif op == "gla":
            d["g"] = F.logsigmoid(r(B, T, H, K)) * 0.3
    return {n: (None if t is None else t.requires_grad_()) for n, t in d.items()}, cu


def _call(op, a, cu):
    if op == "ssd":
        y, s = sk.mamba_chunk_scan_combined(
            a["x"], a["dt"], a["A"], a["B"], a["C"], 16, D=a["D"], z=a["z"],
            initial_states=a["initial_states"], cu_seqlens=cu, return_final_states=cu is None,
            return_varlen_states=cu is not None,
            backend="triton")
        return y, s
    kw = dict(initial_state=a["initial_state"], output_final_state=True, cu_seqlens=cu,
              backend="triton")
    if op == "linear_attn":
        return sk.chunk_linear_attn(a["q"], a["k"], a["v"], normalize=False, **kw)
    f = sk.chunk_simple_gla if op == "simple_gla" else sk.chunk_gla
    return f(a["q"], a["k"], a["v"], a["g"], **kw)


def _run(op, dtype, varlen, h0):
    a, cu = _inputs(op, dtype, varlen, h0)
    o, s = _call(op, a, cu)
    gen = torch.Generator().manual_seed(5)
    do, ds = torch.randn(o.shape, generator=gen).to(o), torch.randn(s.shape, generator=gen).to(s)
    leaves = [t for t in a.values() if t is not None]
    return [o, s] + list(torch.autograd.grad((o, s), leaves, (do, ds)))


CASES = [(op, varlen, h0) for op in ("linear_attn", "simple_gla", "gla", "ssd")
         for varlen, h0 in ((False, True), (True, True), (False, False))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op,varlen,h0", CASES,
                         ids=[f"{o}-{'varlen' if v else 'rows'}-{'h0' if h else 'noh0'}"
                              for o, v, h in CASES])
def test_kept_states_equal_recompute(monkeypatch, launches, op, varlen, h0, dtype):
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)
    # every state stored in every mode: the same forward. (With the 16-bit GATE 1 default
    # H_EVERY=2, mode 2's forward stores every state and rounds o differently from modes 0/1:
    # tests/test_chunk_fwd_defaults.py checks that path; the gradients stay bitwise equal.)
    monkeypatch.setattr(common, "H_EVERY", 1)
    runs, counts = {}, {}
    for mode in (0, 1, 2):
        monkeypatch.setattr(common, "SAVE_STATES", mode)
        launches.clear()
        runs[mode] = _run(op, dtype, varlen, h0)
        counts[mode] = (launches.count("_state_kernel"), launches.count("_cumsum_kernel"))
    gla = op == "gla"
    # forward + backward recompute; 1 keeps Gc (chunk_gla only); 2 also keeps h
    if INTERP:
        assert counts[0] == (2, 2 if gla else 0)
        assert counts[1] == (2, 1 if gla else 0)
        assert counts[2] == (1, 1 if gla else 0)
    for mode in (1, 2):
        for i, (a, b) in enumerate(zip(runs[mode], runs[0])):
            assert torch.equal(a, b), f"SAVE_STATES={mode}: output/gradient {i} differs"
            assert not torch.isnan(a).any()


def _fwd_op(op, save, g_kind="gla", varlen=True, dtype=torch.float32):
    """(registered forward op, its args) at a small shape."""
    gen = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)  # noqa: E731
    cu = torch.tensor([0, 4, 9], device=DEVICE, dtype=torch.int32) if varlen else None
    if op == "ssd":
        x, dt, C, Bm = r(1, 9, 4, 16).to(dtype), F.softplus(r(1, 9, 4)), r(1, 9, 2, 16), r(1, 9, 2, 16)
        args = (C.to(dtype), Bm.to(dtype), x, dt, -torch.rand(4, generator=gen).to(DEVICE), r(2, 4, 16, 16), cu,
                "triton", r(4, 16), save)
        return torch.ops.ssm_kernels.ssd_fwd, tuple(
            t.requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for t in args)
    q, k, v = (r(1, 9, 2, 16).to(dtype) for _ in range(3))
    g = None if g_kind == "none" else F.logsigmoid(r(1, 9, 2, 16) if g_kind == "gla" else r(1, 9, 2))
    args = (q, k, v, g, r(2, 2, 16, 16), cu, 0.25, False, "triton", save)
    return torch.ops.ssm_kernels.linear_attn_fwd, tuple(
        t.requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
        for t in args)


@pytest.mark.parametrize("mode", [1, 2])
@pytest.mark.parametrize("gate", ["none", "g", "gla"])
def test_opcheck_linear_attn_kept(monkeypatch, gate, mode):
    monkeypatch.setattr(common, "SAVE_STATES", mode)
    op, args = _fwd_op("la", True, gate)
    torch.library.opcheck(op, args)
    o, ht, h, gc = op(*args)
    if mode == 1:
        assert h.numel() == 0
    else:
        assert h.shape[1:] == (2, 16, 16) and h.shape[0] > 0
    assert gc.numel() == (9 * 2 * 16 if gate == "gla" else 0)
    q, k, v, g, h0, cu = (None if t is None else (t.detach() if isinstance(t, torch.Tensor) else t)
                          for t in args[:6])
    bargs = (q, k, v, g, h0, cu, 0.25, ht.detach(), torch.randn_like(o), torch.randn_like(ht),
             "triton")
    kept = (h.detach(), gc.detach() if gc.numel() else None)
    # with gc the autograd passes gc in g's place (only its shape is read)
    kargs = (bargs[:3] + ((g if kept[1] is None else kept[1]),) + bargs[4:]) + kept
    torch.library.opcheck(torch.ops.ssm_kernels.linear_attn_bwd, kargs)
    with_kept = torch.ops.ssm_kernels.linear_attn_bwd(*kargs)
    without = torch.ops.ssm_kernels.linear_attn_bwd(*bargs)
    for a, b in zip(with_kept, without):
        assert torch.equal(a, b)
    # no gradient asked for: nothing kept (empty extra outputs) even with the knob on
    _, _, h2, gc2 = op(*args[:-1], False)
    assert h2.numel() == 0 and gc2.numel() == 0


def test_opcheck_ssd_kept(monkeypatch):
    monkeypatch.setattr(common, "SAVE_STATES", 2)
    op, args = _fwd_op("ssd", True)
    torch.library.opcheck(op, args)
    y, ht, h = op(*args)
    assert h.shape[1:] == (4, 16, 16) and h.shape[0] > 0
    d = lambda t: t.detach()  # noqa: E731
    bargs = tuple(d(t) for t in args[:6]) + (args[6], torch.randn_like(y), torch.randn_like(ht),
                                             "triton", d(args[8]))
    torch.library.opcheck(torch.ops.ssm_kernels.ssd_bwd, bargs + (d(h),))
    for a, b in zip(torch.ops.ssm_kernels.ssd_bwd(*bargs, d(h)),
                    torch.ops.ssm_kernels.ssd_bwd(*bargs)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", ["linear_attn", "ssd"])
def test_inference_keeps_nothing(monkeypatch, op):
    """No gradient needed (no_grad, or no input requiring grad): the public calls ask for nothing,
    so the forward op's extra outputs are empty even with SAVE_STATES=2."""
    monkeypatch.setattr(common, "SAVE_STATES", 2)
    seen = []
    mod = (sk.linear_attn.interface if op == "linear_attn" else sk.ssd.interface)
    name = "linear_attn_fwd_op" if op == "linear_attn" else "ssd_fwd_op"
    real = getattr(mod, name)

    def spy(*args):
        out = real(*args)
        seen.append([t.numel() for t in out[2:]])
        return out
    monkeypatch.setattr(mod, name, spy)
    a, cu = _inputs("ssd" if op == "ssd" else "gla", torch.float32, False, True)
    if op == "ssd":
        a["D"] = a["z"] = None      # (with D / z, inference bypasses the op: the epilogue path)
    plain = {n: None if t is None else t.detach() for n, t in a.items()}
    with torch.no_grad():
        _call("ssd" if op == "ssd" else "gla", a, cu)
    _call("ssd" if op == "ssd" else "gla", plain, cu)
    assert len(seen) == 2 and all(n == 0 for s in seen for n in s), seen
    _call("ssd" if op == "ssd" else "gla", a, cu)      # with gradients: kept
    assert seen[-1][0] > 0


@pytest.mark.parametrize("fused", [2])
def test_fused_forward_keeps_no_states(monkeypatch, launches, fused):
    """The fused forward has no h in memory: with SAVE_STATES=2 it keeps none, the backward
    recomputes (one _state_kernel launch in the backward), gradients equal SAVE_STATES=0's."""
    monkeypatch.setattr(common, "FUSED_FWD", fused)
    runs = {}
    for mode in (0, 2):
        monkeypatch.setattr(common, "SAVE_STATES", mode)
        launches.clear()
        runs[mode] = _run("simple_gla", torch.float32, False, True)
        if INTERP:
            assert launches.count("_fused_fwd_kernel") == 1
            # stage 1 (segments) + the backward's recompute
            assert launches.count("_state_kernel") == 2
    for a, b in zip(runs[2], runs[0]):
        assert torch.equal(a, b)


def test_compile_fullgraph_kept(monkeypatch):
    """torch.compile(fullgraph=True) through the ops with their kept outputs (aot_eager): the
    gradients equal eager's."""
    monkeypatch.setattr(common, "SAVE_STATES", 2)
    torch._dynamo.reset()
    a, cu = _inputs("gla", torch.float32, True, True)
    b, _ = _inputs("simple_gla", torch.float32, False, True)
    s, _ = _inputs("ssd", torch.float32, False, True)

    def f(a, b, s):
        o1, s1 = _call("gla", a, cu)
        o2, s2 = _call("simple_gla", b, None)
        y, hs = _call("ssd", s, None)
        return o1.sum() + s1.sum() + (o2 * o2).sum() + s2.sum() + (y * y).sum() + hs.sum()

    leaves = [t for d in (a, b, s) for t in d.values() if t is not None]
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(cf(a, b, s), leaves)
    want = torch.autograd.grad(f(a, b, s), leaves)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
