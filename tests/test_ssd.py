"""SSD (mamba_chunk_scan_combined) against the float64 recurrence: output, final and per-sequence
states, every gradient (x, dt, A, B, C, D, z, dt_bias, initial_states), grouped B/C, varlen,
extreme decays, 16-bit inputs, a loop of selective_state_update steps, errors, opcheck, compile."""
import pytest
import torch

import ssm_kernels as sk
from ssm_kernels.chunk import common as chunk_common
from ssm_kernels.ssd.reference import ssd_chunked, ssd_recurrent, ssd_ref
from ssm_kernels.testing import assert_close

from conftest import DEVICE, kernel_backends

BACKENDS = ["reference"] + kernel_backends()
LOWP = (torch.float16, torch.bfloat16)
DECAY_GRADS = ("ddt", "dA", "ddt_bias")
NAMES = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]


def make(b, L, H, P, G, N, dtype=torch.float32, D="hp", z=True, h0=True, n_seq=None,
         A_range=(0.0, 2.0), dt_shift=0.0, device=DEVICE):
    x = torch.randn(b, L, H, P, device=device)
    dt = torch.randn(b, L, H, device=device) + dt_shift
    A = -(A_range[0] + (A_range[1] - A_range[0]) * torch.rand(H, device=device))
    B, C = torch.randn(2, b, L, G, N, device=device).unbind(0)
    Dt = {None: None, "h": torch.randn(H, device=device), "hp": torch.randn(H, P, device=device)}[D]
    zt = torch.randn(b, L, H, P, device=device) if z else None
    bias = torch.randn(H, device=device)
    hs = torch.randn(n_seq or b, H, P, N, device=device) if h0 else None
    return dict(x=x.to(dtype), dt=dt, A=A, B=B.to(dtype), C=C.to(dtype), D=Dt,
                z=None if zt is None else zt.to(dtype), dt_bias=bias, initial_states=hs)


def run(fn, inputs, cots, cu=None):
    """fn(**inputs) -> (y, states); loss = <y, cot0> + <states, cot1>; outputs + gradients."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items() if t is not None}
    full = {n: leaves.get(n) for n in inputs}
    y, s = fn(full)
    loss = (y.double() * cots[0]).sum() + (s.double() * cots[1]).sum()
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    return {"y": y, "states": s, **{f"d{n}": gr for n, gr in zip(names, grads)}}


def ours(backend, cu=None):
    def f(a):
        out = sk.mamba_chunk_scan_combined(
            a["x"], a["dt"], a["A"], a["B"], a["C"], 64, D=a["D"], z=a["z"], dt_bias=a["dt_bias"],
            initial_states=a["initial_states"], cu_seqlens=cu, dt_softplus=True,
            return_final_states=cu is None, return_varlen_states=cu is not None, backend=backend)
        return out
    return f


def reference(cu=None):
    def f(a):
        return ssd_ref(a["x"], a["dt"], a["A"], a["B"], a["C"], 16, D=a["D"], z=a["z"],
                       dt_bias=a["dt_bias"], initial_states=a["initial_states"],
                       cu_seqlens=None if cu is None else cu.cpu(), dt_softplus=True,
                       recurrent=True)
    return f


def decay_grad_error(name, out, ref, hi):
    """(||out - ref||, the scale its rounding error has): max(||ref||, the size of the products
    it is a difference of): ||C dC|| per step, times |A| (ddt), times ||dt|| (dA, a sum over
    steps), times sqrt(steps) (ddt_bias)."""
    n = lambda t: torch.linalg.vector_norm(t.detach().cpu().double()).item()  # noqa: E731
    err = n(out[name].detach().cpu().double() - ref[name])
    prod = n(hi["C"] * ref["dC"]) * max(hi["A"].abs().max().item(), 1e-3)
    if name == "dA":
        prod = n(hi["C"] * ref["dC"]) * n(torch.nn.functional.softplus(hi["dt"] + hi["dt_bias"]))
    elif name == "ddt_bias":
        prod *= hi["dt"].numel() ** 0.5
    return err, max(n(ref[name]), prod)


def compare(backend, b, L, H, P, G, N, dtype=torch.float32, cu=None, **kw):
    n_seq = None if cu is None else cu.numel() - 1
    inputs = make(b, L, H, P, G, N, dtype, n_seq=n_seq, **kw)
    cots = (torch.randn(b, L, H, P, dtype=torch.float64, device=DEVICE),
            torch.randn(n_seq or b, H, P, N, dtype=torch.float64, device=DEVICE))
    out = run(ours(backend, cu), inputs, cots)
    hi = {n: None if t is None else t.detach().cpu().double() for n, t in inputs.items()}
    ref = run(reference(cu), hi, [c.cpu() for c in cots])
    lowp = None
    if dtype in LOWP:
        lp = {n: None if t is None else t.detach().cpu() for n, t in inputs.items()}
        lowp = run(reference(cu), lp, [c.cpu() for c in cots])
    for name in ref:
        assert torch.isfinite(out[name]).all(), f"{name} has non-finite values"
        if name in DECAY_GRADS and dtype not in LOWP:
            # a gradient through the log-decay dt * A is a difference of products (C . dC - B . dB
            # per step): its float32 rounding scales with those products, not with itself (with
            # decays that underflow it is tiny), so it gets test_linear_attn's dg bound
            err, den = decay_grad_error(name, out, ref, hi)
            assert err <= 1e-4 * den, f"{backend} {name}: abs err {err:.2e} > 1e-4 x {den:.2e}"
            continue
        assert_close(out[name], ref[name], dtype=dtype if name in ("y", "dx", "dB", "dC", "dz")
                     else torch.float32 if dtype not in LOWP else dtype,
                     lowp_ref=None if lowp is None else lowp[name], name=f"{backend} {name}")


# ---- the reference itself ------------------------------------------------------------------------

def test_chunked_reference_equals_recurrence():
    b, H, P, N = 2, 3, 4, 5
    for L in (1, 7, 29):
        X = torch.randn(b, L, H, P, dtype=torch.float64)
        a = -5 * torch.rand(b, L, H, dtype=torch.float64)
        B, C = torch.randn(2, b, L, H, N, dtype=torch.float64).unbind(0)
        h0 = torch.randn(b, H, P, N, dtype=torch.float64)
        y1, s1 = ssd_recurrent(X, a, B, C, h0)
        for chunk in (1, 4, 16, 64):
            y2, s2 = ssd_chunked(X, a, B, C, chunk, h0)
            assert_close(y2, y1, dtype=torch.float64)
            assert_close(s2, s1, dtype=torch.float64)


# ---- kernels against the reference -------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,G", [(1, 1), (37, 2), (70, 1)])
def test_matches_recurrence(backend, L, G):
    if backend == "reference" and L == 70:
        pytest.skip("CPU time")
    compare(backend, 2 if L < 8 else 1, L, 4, 12, G, 20)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_optional_inputs(backend):
    compare(backend, 2, 19, 2, 16, 1, 16, D=None, z=False, h0=False)
    compare(backend, 1, 19, 2, 16, 2, 16, D="h", z=False, h0=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen(backend):
    """Packed sequences (one empty), each with its own initial state, against a loop."""
    cu = torch.tensor([0, 5, 5, 30, 41], dtype=torch.int32, device=DEVICE)
    compare(backend, 1, 41, 2, 16, 1, 16, cu=cu)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("A_range,dt_shift", [((20.0, 20.0), 3.0), ((0.0, 0.0), 0.0)])
def test_extreme_decays(backend, A_range, dt_shift):
    """exp(dt A) underflowing to 0 at every step, and no decay at all."""
    compare(backend, 1, 40, 2, 16, 1, 16, A_range=A_range, dt_shift=dt_shift)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(backend, dtype):
    compare(backend, 1, 40, 2, 16, 1, 16, dtype=dtype)


@pytest.mark.parametrize("backend", kernel_backends())
def test_poisoned_outputs(backend, monkeypatch):
    """Every buffer the stages write starts as NaN: nothing may be left unwritten (varlen with
    surplus chunk programs, padded last chunks)."""
    monkeypatch.setattr(chunk_common, "POISON_OUTPUTS", True)
    cu = torch.tensor([0, 33, 34, 41], dtype=torch.int64, device=DEVICE)
    compare(backend, 1, 41, 2, 16, 2, 16, cu=cu)


def test_return_conventions():
    a = make(1, 20, 2, 8, 1, 8, device="cpu")
    cu = torch.tensor([0, 12, 20])
    h0 = torch.randn(2, 2, 8, 8)
    args = (a["x"], a["dt"], a["A"], a["B"], a["C"], 16)
    y = sk.mamba_chunk_scan_combined(*args)
    assert isinstance(y, torch.Tensor) and y.shape == a["x"].shape
    y, f = sk.mamba_chunk_scan_combined(*args, return_final_states=True)
    assert f.shape == (1, 2, 8, 8) and f.dtype == torch.float32
    y, f, vs = sk.mamba_chunk_scan_combined(*args, initial_states=h0, cu_seqlens=cu,
                                            return_final_states=True, return_varlen_states=True)
    assert vs.shape == (2, 2, 8, 8) and torch.equal(f, vs[-1:])
    y2, vs2 = sk.mamba_chunk_scan_combined(*args, initial_states=h0, cu_seqlens=cu,
                                           return_varlen_states=True)
    assert torch.equal(vs, vs2)
    # seq_idx together with cu_seqlens is accepted (and checked on CPU)
    seq_idx = torch.tensor([[0] * 12 + [1] * 8], dtype=torch.int32)
    y3 = sk.mamba_chunk_scan_combined(*args, initial_states=h0, seq_idx=seq_idx, cu_seqlens=cu)
    assert torch.equal(y3, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_selective_state_update_steps(backend):
    """The chunked scan equals decoding token by token with selective_state_update (headed
    Mamba-2 form: A, D, dt_bias broadcast over headdim/dstate, grouped B/C)."""
    b, L, H, P, G, N = 2, 9, 4, 8, 2, 16
    a = make(b, L, H, P, G, N, device=DEVICE)
    y, f = sk.mamba_chunk_scan_combined(a["x"], a["dt"], a["A"], a["B"], a["C"], 64, D=a["D"],
                                        z=a["z"], dt_bias=a["dt_bias"],
                                        initial_states=a["initial_states"], dt_softplus=True,
                                        return_final_states=True, backend=backend)
    state = a["initial_states"].clone()
    ys = []
    for t in range(L):
        ys.append(sk.selective_state_update(
            state, a["x"][:, t], a["dt"][:, t, :, None].expand(b, H, P), a["A"][:, None, None].expand(H, P, N),
            a["B"][:, t], a["C"][:, t], D=a["D"], z=a["z"][:, t],
            dt_bias=a["dt_bias"][:, None].expand(H, P), dt_softplus=True))
    assert_close(y, torch.stack(ys, 1).double(), dtype=torch.float32)
    assert_close(f, state.double(), dtype=torch.float32)


# ---- bad input ---------------------------------------------------------------------------------

def test_errors_name_the_argument():
    a = make(1, 6, 4, 8, 2, 8, device="cpu")
    x, dt, A, B, C = a["x"], a["dt"], a["A"], a["B"], a["C"]
    f = sk.mamba_chunk_scan_combined
    with pytest.raises(ValueError, match="x must have shape"):
        f(x[0], dt, A, B, C, 16)
    with pytest.raises(ValueError, match="dt must have shape"):
        f(x, dt[:, :5], A, B, C, 16)
    with pytest.raises(ValueError, match="A must have shape"):
        f(x, dt, A[:1], B, C, 16)
    with pytest.raises(ValueError, match="ngroups must divide"):
        f(x, dt, A, B[:, :, :1].expand(1, 6, 3, 8), C, 16)
    with pytest.raises(ValueError, match="C must have B's shape"):
        f(x, dt, A, B, C[..., :4], 16)
    with pytest.raises(TypeError, match="B must have x's dtype"):
        f(x, dt, A, B.double(), C, 16)
    with pytest.raises(ValueError, match="D must have shape"):
        f(x, dt, A, B, C, 16, D=torch.ones(3))
    with pytest.raises(ValueError, match="A must be <= 0"):
        f(x, dt, -A, B, C, 16)
    with pytest.raises(ValueError, match="seq_idx needs cu_seqlens"):
        f(x, dt, A, B, C, 16, seq_idx=torch.zeros(1, 6, dtype=torch.int32))
    with pytest.raises(ValueError, match="return_varlen_states=True needs cu_seqlens"):
        f(x, dt, A, B, C, 16, return_varlen_states=True)
    with pytest.raises(ValueError, match="initial_states must have shape"):
        f(x, dt, A, B, C, 16, initial_states=torch.zeros(1, 4, 8, 8), cu_seqlens=torch.tensor([0, 2, 6]))
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        f(x, dt, A, B, C, 16, cu_seqlens=torch.tensor([0, 4, 3, 6]))
    with pytest.raises(ValueError, match="seq_idx disagrees"):
        f(x, dt, A, B, C, 16, cu_seqlens=torch.tensor([0, 2, 6]), seq_idx=torch.zeros(1, 6))
    with pytest.raises(ValueError, match="chunk_size"):
        f(x, dt, A, B, C, 0)
    with pytest.raises(sk.BackendUnavailableError, match="triton"):
        f(x.double(), dt, A, B.double(), C.double(), 16, backend="triton")


# ---- opcheck and torch.compile -----------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    b, L, H, P, G, N = 1, 9, 4, 16, 2, 16
    a = make(b, L, H, P, G, N)
    dt = torch.nn.functional.softplus(a["dt"])
    h0 = torch.randn(2, H, N, P, device=DEVICE)
    cu = torch.tensor([0, 4, 9], device=DEVICE, dtype=torch.int32)
    args = (a["C"].requires_grad_(), a["B"].requires_grad_(), a["x"].requires_grad_(),
            dt.requires_grad_(), a["A"].requires_grad_(), h0.requires_grad_(), cu, backend)
    torch.library.opcheck(torch.ops.ssm_kernels.ssd_fwd, args)
    # D [h, p] inside the op (its epilogue and its backward)
    torch.library.opcheck(torch.ops.ssm_kernels.ssd_fwd,
                          args + (torch.randn(H, P, device=DEVICE).requires_grad_(),))
    y, ht, _ = torch.ops.ssm_kernels.ssd_fwd(*args)
    bargs = tuple(t.detach() for t in args[:6]) + (cu, torch.randn_like(y), torch.randn_like(ht),
                                                   backend)
    torch.library.opcheck(torch.ops.ssm_kernels.ssd_bwd, bargs)
    torch.library.opcheck(torch.ops.ssm_kernels.ssd_bwd, bargs + (torch.randn(H, P, device=DEVICE),))


def _compile_case(backend, device):
    torch._dynamo.reset()
    a = make(1, 20, 4, 16, 2, 16, device=device)
    names = [n for n in NAMES if a[n] is not None]
    leaves = [a[n].requires_grad_() for n in names]

    def f(*ts):
        kw = dict(zip(names, ts))
        y, s = sk.mamba_chunk_scan_combined(kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], 64,
                                            D=kw["D"], z=kw["z"], dt_bias=kw["dt_bias"],
                                            initial_states=kw["initial_states"], dt_softplus=True,
                                            return_final_states=True, backend=backend)
        return y.square().sum() + s.sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    out = cf(*leaves)
    grads = torch.autograd.grad(out, leaves)
    ref = f(*leaves)
    rgrads = torch.autograd.grad(ref, leaves)
    assert_close(out, ref.double(), dtype=torch.float32)
    for g1, g2 in zip(grads, rgrads):
        assert_close(g1, g2.double(), dtype=torch.float32)


def test_compile_fullgraph_reference():
    _compile_case("reference", "cpu")


# ---- real sizes on the GPU -----------------------------------------------------------------------

def _gpu_compare(b, L, H, P, G, N, dtype, cu=None):
    n_seq = None if cu is None else cu.numel() - 1
    inputs = make(b, L, H, P, G, N, dtype, n_seq=n_seq)
    cots = (torch.randn(b, L, H, P, dtype=torch.float64, device=DEVICE),
            torch.randn(n_seq or b, H, P, N, dtype=torch.float64, device=DEVICE))
    out = run(ours("triton", cu), inputs, cots)

    def ref_fn(a):
        return ssd_ref(a["x"], a["dt"], a["A"], a["B"], a["C"], 64, D=a["D"], z=a["z"],
                       dt_bias=a["dt_bias"], initial_states=a["initial_states"], cu_seqlens=cu,
                       dt_softplus=True)
    hi = {n: None if t is None else t.detach().double() for n, t in inputs.items()}
    lp = {n: None if t is None else t.detach() for n, t in inputs.items()}
    ref, lowp = run(ref_fn, hi, cots), run(ref_fn, lp, cots)
    for name in ref:
        assert torch.isfinite(out[name]).all(), name
        assert_close(out[name], ref[name], dtype=dtype,
                     lowp_ref=lowp[name] if dtype in LOWP else None, name=f"{dtype} {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L,H,P,G,N", [(2048, 8, 64, 1, 128), (1000, 4, 100, 2, 64),
                                       (300, 4, 64, 4, 256)])
def test_gpu_real_sizes(dtype, L, H, P, G, N):
    _gpu_compare(2, L, H, P, G, N, dtype)


@pytest.mark.gpu
def test_gpu_varlen():
    cu = torch.tensor([0, 1, 700, 700, 1500, 2047], device=DEVICE, dtype=torch.int32)
    _gpu_compare(1, 2047, 8, 64, 1, 128, torch.bfloat16, cu=cu)


@pytest.mark.gpu
def test_gpu_compile_fullgraph_triton():
    _compile_case("triton", DEVICE)
