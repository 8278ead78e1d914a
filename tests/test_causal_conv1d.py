"""causal_conv1d_fn / causal_conv1d_update against F.conv1d in float64: every width, states,
packed sequences, seq_idx, decode steps (shifted and circular), every gradient, both layouts."""
import pytest
import torch
import torch.nn.functional as F

import ssm_kernels as sk
from ssm_kernels.causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref
from ssm_kernels.testing import assert_close

from conftest import DEVICE, HAS_GPU, compile_for_sm90, kernel_backends

BACKENDS = ["reference"] + kernel_backends()


def oracle(x, w, b, h0, silu, segments=None):
    """F.conv1d over cat(h0, x) per sequence, float64: (out, final states)."""
    B, D, T = x.shape
    W = w.shape[1]
    segments = segments or [(n, n, 0, T) for n in range(B)]  # (state row, batch row, start, end)
    out = torch.zeros(B, D, T, dtype=torch.float64)
    finals = [None] * len(segments)
    for n, row, s, e in segments:
        pre = torch.zeros(1, D, W - 1, dtype=torch.float64) if h0 is None else h0[n:n + 1].double()
        xp = torch.cat([pre, x[row:row + 1, :, s:e].double()], -1)
        if e > s:
            o = F.conv1d(xp, w.double()[:, None], None if b is None else b.double(), groups=D)
            out[row, :, s:e] = F.silu(o[0]) if silu else o[0]
        finals[n] = xp[0, :, xp.shape[-1] - (W - 1):]
    return out, torch.stack(finals)


def make(B, D, T, W, layout, dtype=torch.float32, n_states=None):
    x = torch.randn(B, D, T) if layout == "bdt" else torch.randn(B, T, D).transpose(1, 2)
    return (x.to(DEVICE, dtype), torch.randn(D, W, device=DEVICE) / W ** 0.5,
            torch.randn(D, device=DEVICE), torch.randn(n_states or B, D, W - 1, device=DEVICE).to(dtype))


def fwd_bwd(fn, x, w, b, h0, silu, cot, final=True, **kw):
    ins = [t.detach().requires_grad_() for t in (x, w, b, h0)]
    r = fn(ins[0], ins[1], ins[2], initial_states=ins[3], return_final_states=final,
           activation="silu" if silu else None, **kw)
    out, fin = r if final else (r, None)
    loss = (out.double() * cot[0]).sum() + (0 if fin is None else (fin.double() * cot[1]).sum())
    grads = torch.autograd.grad(loss, ins, allow_unused=True)
    return [out, fin, *(torch.zeros_like(t) if g is None else g for g, t in zip(grads, ins))]


NAMES = ["out", "final_states", "dx", "dweight", "dbias", "dinitial_states"]


def check(backend, x, w, b, h0, silu, segments=None, **kw):
    ref_out, ref_fin = oracle(x.cpu(), w.cpu(), b.cpu(), h0.cpu(), silu, segments)
    cot = (torch.randn_like(ref_out).to(DEVICE), torch.randn_like(ref_fin).to(DEVICE))
    got = fwd_bwd(sk.causal_conv1d_fn, x, w, b, h0, silu, cot, backend=backend, **kw)
    ref = fwd_bwd(causal_conv1d_ref, *(t.cpu().double() for t in (x, w, b, h0)), silu,
                  [c.cpu() for c in cot], **kw_cpu(kw))
    assert_close(ref[0], ref_out, torch.float64, name="reference out vs F.conv1d")
    assert_close(ref[1], ref_fin, torch.float64, name="reference final vs F.conv1d")
    lowp = None
    if x.dtype in (torch.float16, torch.bfloat16):
        lowp = fwd_bwd(causal_conv1d_ref, x, w, b, h0, silu, cot, **kw)
    for i, name in enumerate(NAMES):
        assert_close(got[i], ref[i], x.dtype,
                     None if lowp is None else lowp[i], name=f"{backend} {name}")
    assert got[0].stride() == x.stride(), "out keeps x's layout"
    return got


def kw_cpu(kw):
    return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


@pytest.mark.parametrize("W", range(1, 9))
def test_reference_is_conv1d(W):
    x, w, b, h0 = (t.cpu().double() for t in make(2, 3, 11, W, "bdt"))
    out, fin = causal_conv1d_ref(x, w, b, None, h0, True, None, "silu")
    ref_out, ref_fin = oracle(x, w, b, h0, True)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(fin, ref_fin)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("W", range(1, 9))
def test_widths_states_gradients(backend, W):
    # alternate the layout and the activation over widths to keep the interpreter time small
    check(backend, *make(2, 5, 13, W, "btd" if W % 2 else "bdt"), silu=W % 3 != 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 2])
def test_sequences_shorter_than_the_state(backend, T):
    check(backend, *make(2, 3, T, 4, "bdt"), silu=True)  # final states reach into initial_states


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("W,layout", [(4, "bdt"), (3, "btd")])
def test_varlen(backend, W, layout):
    lens = [5, 0, 1, 9, 2]  # an empty sequence and ones shorter than width - 1
    cu = torch.tensor([0] + lens, device=DEVICE).cumsum(0).to(torch.int32)
    T = int(cu[-1])
    segs = [(n, 0, int(cu[n]), int(cu[n + 1])) for n in range(len(lens))]
    x, w, b, h0 = make(1, 4, T, W, layout, n_states=len(lens))
    check(backend, x, w, b, h0, True, segs, cu_seqlens=cu)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seq_idx(backend):
    B, D, T, W = 2, 4, 12, 4
    x, w, b, _ = make(B, D, T, W, "btd")
    seq_idx = torch.tensor([[0] * 5 + [1] * 7, [0] * 2 + [1] * 1 + [2] * 6 + [-1] * 3],
                           device=DEVICE, dtype=torch.int32)
    xs, ws, bs = (t.detach().requires_grad_() for t in (x, w, b))
    out = sk.causal_conv1d_fn(xs, ws, bs, seq_idx, activation="silu", backend=backend)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out * dout).sum(), (xs, ws, bs))
    ref = torch.zeros(B, D, T, dtype=torch.float64)
    for r in range(B):
        ids = seq_idx[r].tolist()
        for s in set(i for i in ids if i >= 0):
            idx = [t for t in range(T) if ids[t] == s]
            seg = x[r:r + 1, :, idx[0]:idx[-1] + 1].cpu().double()
            o = F.conv1d(F.pad(seg, (W - 1, 0)), w.cpu().double()[:, None], b.cpu().double(), groups=D)
            ref[r, :, idx[0]:idx[-1] + 1] = F.silu(o[0])
    assert_close(out, ref, torch.float32, name="out")
    xd, wd, bd = (t.detach().cpu().double().requires_grad_() for t in (x, w, b))
    r = causal_conv1d_ref(xd, wd, bd, seq_idx.cpu(), activation="silu")
    assert_close(r, ref, torch.float64, name="reference out")
    rg = torch.autograd.grad((r * dout.cpu().double()).sum(), (xd, wd, bd))
    for g, q, n in zip(grads, rg, ["dx", "dweight", "dbias"]):
        assert_close(g, q, torch.float32, name=n)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(backend, dtype):
    check(backend, *make(2, 6, 17, 4, "btd", dtype), silu=True)


def test_no_bias_no_states_and_out_of_place_final():
    x, w, _, _ = make(2, 3, 7, 3, "bdt")
    for backend in BACKENDS:
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        fo = torch.full((2, 3, 2), float("nan"), device=DEVICE)
        out, fin = sk.causal_conv1d_fn(xs, ws, return_final_states=True, final_states_out=fo,
                                       backend=backend)
        assert fin is fo and torch.equal(fo, x[..., -2:])
        ref = F.conv1d(F.pad(x.double(), (2, 0)), w.double()[:, None], groups=3)
        assert_close(out, ref, torch.float32)
        out.sum().backward()  # no bias, no initial states: gradients of x and weight only
        assert xs.grad is not None and ws.grad is not None


# ---- decoding -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("W,S", [(4, 3), (3, 5), (1, 0)])
def test_update_continues_the_sequence(backend, W, S):
    """Prefill with causal_conv1d_fn's final states, then steps of 1 and 3 tokens: the same
    outputs as one call over the whole sequence; also a longer conv_state (S > W - 1)."""
    B, D, T = 2, 5, 12
    x, w, b, _ = make(B, D, T, W, "bdt")
    full = sk.causal_conv1d_fn(x, w, b, activation="silu", backend=backend)
    P = 5
    state = torch.zeros(B, D, S, device=DEVICE)
    pre, fin = sk.causal_conv1d_fn(x[..., :P], w, b, return_final_states=True, activation="silu",
                                   backend=backend)
    if S >= W - 1 and W > 1:
        state[..., S - (W - 1):] = fin
    outs = [pre]
    t = P
    for n in (1, 3, 1, 2):
        xt = x[..., t:t + n]
        y = sk.causal_conv1d_update(xt[..., 0] if n == 1 else xt, state, w, b, "silu",
                                    backend=backend)
        outs.append(y[..., None] if n == 1 else y)
        t += n
    assert_close(torch.cat(outs, -1), full[..., :t].double(), torch.float32)
    if S:
        assert torch.equal(state[..., -min(S, t):], x[..., t - min(S, t):t])


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_circular_and_indices(backend):
    B, D, W, S = 3, 4, 4, 6
    w, b = torch.randn(D, W, device=DEVICE), torch.randn(D, device=DEVICE)
    state0 = torch.randn(B + 2, D, S, device=DEVICE)
    idx = torch.tensor([4, 0, 2], device=DEVICE, dtype=torch.int32)
    cache = torch.tensor([0, 3, 8], device=DEVICE, dtype=torch.int32)
    for L in (1, 2, 7):  # L > S: the last S inputs win
        x = torch.randn(B, D, L, device=DEVICE)
        st, st_ref = state0.clone(), state0.clone().cpu()
        y = sk.causal_conv1d_update(x, st, w, b, None, cache, idx, backend=backend)
        y_ref = causal_conv1d_update_ref(x.cpu().double(), st_ref, w.cpu(), b.cpu(), None,
                                         cache.cpu(), idx.cpu())
        assert_close(y, y_ref, torch.float32, name=f"out L={L}")
        torch.testing.assert_close(st.cpu(), st_ref)
        # unlisted rows untouched; the circular window is the ring read backwards from cache
        assert torch.equal(st[[1, 3]], state0[[1, 3]])
    x = torch.randn(B, D, 1, device=DEVICE)
    st = state0[:B].clone()
    y = sk.causal_conv1d_update(x[..., 0], st, w, b, "swish", cache, backend=backend)
    ring = torch.stack([state0[i, :, [(int(cache[i]) - 3 + j) % S for j in range(3)]] for i in range(B)])
    want = F.silu((torch.cat([ring, x], -1) * w).sum(-1) + b)
    assert_close(y, want.double(), torch.float32)


# ---- errors name the argument ------------------------------------------------------------------

def test_errors_name_the_argument():
    x, w, b, h0 = make(2, 3, 7, 4, "bdt")
    with pytest.raises(ValueError, match="x must have rank 3"):
        sk.causal_conv1d_fn(x[0], w)
    with pytest.raises(ValueError, match="weight must have shape"):
        sk.causal_conv1d_fn(x, w[:2])
    with pytest.raises(ValueError, match="bias must have shape"):
        sk.causal_conv1d_fn(x, w, b[:2])
    with pytest.raises(ValueError, match="initial_states must have shape"):
        sk.causal_conv1d_fn(x, w, b, initial_states=h0[..., :2])
    with pytest.raises(ValueError, match="activation must be"):
        sk.causal_conv1d_fn(x, w, activation="relu")
    with pytest.raises(TypeError, match="x must have a floating"):
        sk.causal_conv1d_fn(x.int(), w)
    with pytest.raises(ValueError, match="seq_idx cannot be combined"):
        sk.causal_conv1d_fn(x, w, seq_idx=torch.zeros(2, 7, dtype=torch.int32, device=DEVICE),
                            initial_states=h0)
    with pytest.raises(ValueError, match="seq_idx must have shape"):
        sk.causal_conv1d_fn(x, w, seq_idx=torch.zeros(2, 6, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="cu_seqlens"):
        sk.causal_conv1d_fn(x, w, cu_seqlens=torch.tensor([0, 7], device=DEVICE))  # batch 2
    with pytest.raises(ValueError, match="cu_seqlens must start at 0, end at seqlen=7"):
        sk.causal_conv1d_fn(x[:1], w, cu_seqlens=torch.tensor([0, 5], device="cpu"))
    with pytest.raises(ValueError, match="conv_state must have shape"):
        sk.causal_conv1d_update(x[..., 0], torch.zeros(2, 3, 2, device=DEVICE), w)
    with pytest.raises(ValueError, match="cache_seqlens must have shape"):
        sk.causal_conv1d_update(x[..., 0], torch.zeros(2, 3, 3, device=DEVICE), w,
                                cache_seqlens=torch.zeros(3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(sk.BackendUnavailableError, match="width 9"):
        sk.causal_conv1d_fn(x, torch.randn(3, 9, device=DEVICE), backend="triton")


# ---- registered ops ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, w, b, h0 = make(2, 3, 6, 3, "btd")
    ops = torch.ops.ssm_kernels
    torch.library.opcheck(ops.causal_conv1d_fwd.default,
                          (x.requires_grad_(), w.requires_grad_(), b, None, None,
                           h0.requires_grad_(), True, True, backend))
    torch.library.opcheck(ops.causal_conv1d_update.default,
                          (x.detach()[..., :2], torch.randn(2, 3, 4, device=DEVICE), w.detach(), b,
                           True, torch.tensor([1, 5], device=DEVICE, dtype=torch.int32), None,
                           backend))
    # the fakes do not depend on the backend: the rest once (interpreter time)
    if backend == BACKENDS[-1]:
        cu = torch.tensor([0, 2, 6], device=DEVICE, dtype=torch.int32)
        torch.library.opcheck(ops.causal_conv1d_fwd.default,
                              (x[:1].detach(), w.detach(), None, None, cu, None, False, True, backend),
                              test_utils=("test_schema", "test_faketensor"))
        dout = torch.randn(2, 3, 6, device=DEVICE)
        torch.library.opcheck(ops.causal_conv1d_bwd.default,
                              (x.detach(), w.detach(), b, None, None, h0.detach(), dout,
                               torch.randn_like(h0), True, backend),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_compile(backend):
    torch._dynamo.reset()

    def f(x, w, b, h0):
        out, fin = sk.causal_conv1d_fn(x, w, b, initial_states=h0, return_final_states=True,
                                       activation="silu", backend=backend)
        return out.square().sum() + fin.sum()

    ins = [t.requires_grad_() for t in make(2, 3, 9, 4, "btd")]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    loss = compiled(*ins)
    grads = torch.autograd.grad(loss, ins)
    ref_grads = torch.autograd.grad(f(*ins), ins)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)

    def step(x, state, w):
        return sk.causal_conv1d_update(x, state, w, None, "silu", backend=backend)

    state = torch.randn(2, 3, 3, device=DEVICE)
    state2 = state.clone()
    y = torch.compile(step, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")(
        ins[0].detach()[..., 0], state, ins[1].detach())
    torch.testing.assert_close(y, step(ins[0].detach()[..., 0], state2, ins[1].detach()))
    torch.testing.assert_close(state, state2)


# ---- real sizes on the GPU ---------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("layout", ["bdt", "btd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_real_sizes(W, layout, dtype):
    x, w, b, h0 = make(2, 1536, 2048, W, layout, dtype)
    check("triton", x, w, b, h0, True)


# ---- the GPU compiler (no GPU needed) ---------------------------------------------------------------

_COMPILE_SCRIPT = r'''
import importlib, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
K = importlib.import_module("ssm_kernels.causal_conv1d.triton")
INT = ("seq_ptr", "cs_ptr", "idx_ptr")

def build(fn, consts, storage="bf16"):
    sig = {n: "constexpr" if n in consts else ("*i32" if n in INT else
           ("*fp32" if n in ("dwp_ptr", "dbp_ptr", "part_ptr") else "*" + storage))
           if n.endswith("_ptr") else "i32" for n in fn.arg_names}
    triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 4})

# every variant compiled once when written; CI keeps the widest ones (time: ~3 s a kernel)
build(K._causal_conv1d_fwd_kernel, dict(W=4, HAS_BIAS=True, HAS_INIT=True, VARLEN=1, SILU=True,
                                        BLOCK_D=64, BLOCK_T=32))
build(K._causal_conv1d_bwd_kernel, dict(W=4, HAS_BIAS=True, HAS_INIT=False, VARLEN=2, SILU=True,
                                        HAS_DFINAL=False, BLOCK_D=8, BLOCK_T=128))
build(K._causal_conv1d_edge_kernel, dict(W=4, HAS_BIAS=True, HAS_INIT=True, HAS_DFINAL=True,
      VARLEN=1, SILU=True, FORWARD=False, BLOCK_D=64, BLOCK_W=4))
build(K._causal_conv1d_update_kernel, dict(W=4, HAS_BIAS=True, SILU=True, CIRCULAR=True,
      HAS_IDX=True, BLOCK_D=64, BLOCK_L=1, BLOCK_S=4))
print("ok")
'''


def test_triton_kernels_compile_for_sm90():
    """The interpreter never runs the GPU compiler: build every kernel variant for sm_90 here."""
    res = compile_for_sm90(_COMPILE_SCRIPT)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("circular", [False, True])
def test_gpu_update_captures_in_a_cuda_graph(circular):
    """The decode step records in a CUDA graph (no host sync) and replays like eager, bitwise."""
    B, D, W, S = 16, 1024, 4, 6
    w, b = torch.randn(D, W, device="cuda"), torch.randn(D, device="cuda")
    cache = torch.randint(0, 50, (B,), device="cuda", dtype=torch.int32) if circular else None
    state0 = torch.randn(B, D, S, device="cuda")
    x = torch.randn(B, D, device="cuda", dtype=torch.bfloat16)
    st_eager = state0.clone()
    y_eager = sk.causal_conv1d_update(x, st_eager, w, b, "silu", cache)
    st = state0.clone()
    sk.causal_conv1d_update(x, st.clone(), w, b, "silu", cache)  # warm up (compile) off-graph
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = sk.causal_conv1d_update(x, st, w, b, "silu", cache)
    st.copy_(state0)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, y_eager) and torch.equal(st, st_eager)
