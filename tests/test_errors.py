"""The public boundary (issue 13): empty batches give empty outputs and zero gradients on every
backend, a wrong-type argument gets a message that starts with the op's name, and inputs in the
other common layout get a hint naming the transpose to pass. Small shapes only (fast)."""
import re

import pytest
import torch

import ssm_kernels as sk
from conftest import DEVICE, kernel_backends

BACKENDS = ["reference"] + kernel_backends()


def _rand(*shape, neg=False, grad=True):
    x = torch.randn(*shape, device=DEVICE)
    if neg:
        x = -x.abs()
    return x.requires_grad_(grad)


# ---- empty batch -----------------------------------------------------------------------------
# each case: (name, build inputs, call(inputs, backend) -> output or tuple, expected shapes)

B, T, H, K, V = 0, 5, 2, 4, 3


def _la_inputs(gate=None):
    d = dict(q=_rand(B, T, H, K), k=_rand(B, T, H, K), v=_rand(B, T, H, V),
             initial_state=_rand(0, H, K, V))
    if gate == "head":
        d["g"] = _rand(B, T, H, neg=True)
        d["g_gamma"] = _rand(H, neg=True)
    elif gate == "key":
        d["g"] = _rand(B, T, H, K, neg=True)
    return d


def _la(fn, gate=None, gname="g"):
    def make():
        return _la_inputs(gate)

    def call(x, be):
        kw = dict(initial_state=x["initial_state"], output_final_state=True, backend=be)
        if gate == "head":
            kw.update(g=x["g"], g_gamma=x["g_gamma"])
        elif gate == "key":
            kw[gname] = x["g"]
        if fn in (sk.chunk_linear_attn, sk.fused_recurrent_linear_attn):
            kw["normalize"] = False
        return fn(x["q"], x["k"], x["v"], **kw)
    return make, call, [(B, T, H, V), (0, H, K, V)]


EMPTY = {
    "chunk_linear_attn": _la(sk.chunk_linear_attn),
    "fused_recurrent_linear_attn": _la(sk.fused_recurrent_linear_attn),
    "chunk_simple_gla": _la(sk.chunk_simple_gla, "head"),
    "fused_recurrent_simple_gla": _la(sk.fused_recurrent_simple_gla, "head"),
    "chunk_gla": _la(sk.chunk_gla, "key"),
    "fused_recurrent_gla": _la(sk.fused_recurrent_gla, "key", "gk"),
    "chunk_based": (
        lambda: dict(q=_rand(B, T, H, K), k=_rand(B, T, H, K), v=_rand(B, T, H, V)),
        lambda x, be: sk.chunk_based(x["q"], x["k"], x["v"], output_final_state=True, backend=be),
        [(B, T, H, V), (0, H, 1 + K + K * K, V + 1)]),
    "fused_recurrent_based": (
        lambda: dict(q=_rand(B, T, H, K), k=_rand(B, T, H, K), v=_rand(B, T, H, V)),
        lambda x, be: sk.fused_recurrent_based(x["q"], x["k"], x["v"], output_final_state=True,
                                               backend=be),
        [(B, T, H, V), (0, H, 1 + K + K * K, V + 1)]),
    "linear_scan": (
        lambda: dict(a=_rand(0, 5, 3), b=_rand(0, 5, 3)),
        lambda x, be: sk.linear_scan(x["a"], x["b"], output_final_state=True, backend=be),
        [(0, 5, 3), (0, 3)]),
    "selective_scan_fn": (
        lambda: dict(u=_rand(0, 4, 6), delta=_rand(0, 4, 6), A=_rand(4, 3, neg=True),
                     B=_rand(0, 3, 6), C=_rand(0, 3, 6), D=_rand(4)),
        lambda x, be: sk.selective_scan_fn(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"],
                                           return_last_state=True, backend=be),
        [(0, 4, 6), (0, 4, 3)]),
    "mamba_chunk_scan_combined": (
        lambda: dict(x=_rand(0, 6, 2, 4), dt=_rand(0, 6, 2), A=_rand(2, neg=True),
                     B=_rand(0, 6, 1, 3), C=_rand(0, 6, 1, 3), D=_rand(2)),
        lambda x, be: sk.mamba_chunk_scan_combined(x["x"], x["dt"], x["A"], x["B"], x["C"], 16,
                                                   D=x["D"], return_final_states=True, backend=be),
        [(0, 6, 2, 4), (0, 2, 4, 3)]),
    "causal_conv1d_fn": (
        lambda: dict(x=_rand(0, 4, 7), weight=_rand(4, 3), bias=_rand(4)),
        lambda x, be: sk.causal_conv1d_fn(x["x"], x["weight"], x["bias"],
                                          return_final_states=True, backend=be),
        [(0, 4, 7), (0, 4, 2)]),
    "fft_conv B=0": (
        lambda: dict(u=_rand(0, 4, 7), k=_rand(4, 7), D=_rand(4)),
        lambda x, be: sk.fft_conv(x["u"], x["k"], x["D"], backend=be),
        [(0, 4, 7)]),
    "fft_conv H=0": (
        lambda: dict(u=_rand(2, 0, 7), k=_rand(0, 7)),
        lambda x, be: sk.fft_conv(x["u"], x["k"], backend=be),
        [(2, 0, 7)]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(EMPTY))
def test_empty_batch(name, backend):
    make, call, shapes = EMPTY[name]
    x = make()
    out = call(x, backend)
    out = out if isinstance(out, tuple) else (out,)
    assert [tuple(o.shape) for o in out] == shapes
    loss = sum(o.float().sum() for o in out)
    if loss.requires_grad:
        loss.backward()
    for k, t in x.items():  # every gradient exists, has its input's shape and is zero
        if t.numel():
            assert t.grad is not None, k
        if t.grad is not None:
            assert t.grad.shape == t.shape, k
            assert not t.grad.any(), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_decode_steps(backend):
    state = torch.zeros(0, 4, 3, device=DEVICE)
    y = sk.selective_state_update(state, _rand(0, 4, grad=False), _rand(0, 4, grad=False),
                                  _rand(4, 3, neg=True, grad=False), _rand(0, 3, grad=False),
                                  _rand(0, 3, grad=False), backend=backend)
    assert y.shape == (0, 4)
    y = sk.causal_conv1d_update(_rand(0, 4, grad=False), torch.zeros(0, 4, 2, device=DEVICE),
                                _rand(4, 3, grad=False), backend=backend)
    assert y.shape == (0, 4)


def test_empty_batch_normalized_linear_attn_returns_both_states():
    x = _la_inputs()
    o, (kv, z) = sk.chunk_linear_attn(x["q"], x["k"], x["v"], output_final_state=True)
    assert o.shape == (0, T, H, V) and kv.shape == (0, H, K, V) and z.shape == (0, 1, H, K)
    assert kv.dtype == torch.float32


# ---- the op's name leads every message -------------------------------------------------------

def _t(*s):
    return torch.randn(*s, device=DEVICE)


WRONG_TYPE = {
    "linear_scan": lambda: sk.linear_scan([1.0], _t(2, 3)),
    "selective_scan_fn": lambda: sk.selective_scan_fn(_t(1, 2, 3), "delta", -_t(2, 3).abs(),
                                                      _t(2, 3), _t(2, 3)),
    "selective_state_update": lambda: sk.selective_state_update(_t(1, 2, 3), 1.0, _t(1, 2),
                                                                _t(2, 3), _t(1, 3), _t(1, 3)),
    "mamba_chunk_scan_combined": lambda: sk.mamba_chunk_scan_combined(
        _t(1, 6, 2, 4), _t(1, 6, 2), None, _t(1, 6, 1, 3), _t(1, 6, 1, 3), 16),
    "chunk_linear_attn": lambda: sk.chunk_linear_attn(_t(1, 5, 2, 4), [0.0], _t(1, 5, 2, 4)),
    "fused_recurrent_linear_attn": lambda: sk.fused_recurrent_linear_attn(
        _t(1, 5, 2, 4), _t(1, 5, 2, 4), (1, 2)),
    "chunk_simple_gla": lambda: sk.chunk_simple_gla(_t(1, 5, 2, 4), _t(1, 5, 2, 4),
                                                    _t(1, 5, 2, 4), g=[0.0]),
    "fused_recurrent_simple_gla": lambda: sk.fused_recurrent_simple_gla(
        _t(1, 5, 2, 4), _t(1, 5, 2, 4), _t(1, 5, 2, 4), g_gamma=[0.0, 0.0]),
    "chunk_gla": lambda: sk.chunk_gla(1.0, _t(1, 5, 2, 4), _t(1, 5, 2, 4), _t(1, 5, 2, 4)),
    "fused_recurrent_gla": lambda: sk.fused_recurrent_gla(
        _t(1, 5, 2, 4), _t(1, 5, 2, 4), _t(1, 5, 2, 4), initial_state=[[0.0]]),
    "chunk_based": lambda: sk.chunk_based(_t(1, 5, 2, 4), None, _t(1, 5, 2, 4)),
    "fused_recurrent_based": lambda: sk.fused_recurrent_based(
        _t(1, 5, 2, 4), _t(1, 5, 2, 4), _t(1, 5, 2, 4), initial_state=3),
    "causal_conv1d_fn": lambda: sk.causal_conv1d_fn(_t(1, 4, 7), [[1.0]]),
    "causal_conv1d_update": lambda: sk.causal_conv1d_update(_t(1, 4), "state", _t(4, 3)),
    "fft_conv": lambda: sk.fft_conv(_t(1, 4, 7), 5),
    "s4d_kernel": lambda: sk.s4d_kernel([0.1], _t(2, 3), _t(2, 3), 8),
}


@pytest.mark.parametrize("op", list(WRONG_TYPE))
def test_wrong_type_names_the_op(op):
    with pytest.raises(TypeError, match=rf"^{op}: \w+.* must be a torch\.Tensor.*, got \w+"):
        WRONG_TYPE[op]()


def test_messages_from_shared_checks_name_the_op():
    with pytest.raises(TypeError, match=r"^linear_scan: a must be a torch\.Tensor, got list$"):
        sk.linear_scan([1.0], _t(2, 3))
    with pytest.raises(ValueError, match=r"^fft_conv: D must have shape \(4\), got \(3,\)$"):
        sk.fft_conv(_t(1, 4, 7), _t(4, 7), _t(3))
    with pytest.raises(TypeError, match=r"^causal_conv1d_fn: x must have a floating dtype"):
        sk.causal_conv1d_fn(torch.ones(1, 4, 7, dtype=torch.int32, device=DEVICE), _t(4, 3))
    with pytest.raises(ValueError, match=r"^causal_conv1d_fn: activation must be"):
        sk.causal_conv1d_fn(_t(1, 4, 7), _t(4, 3), activation="relu")
    with pytest.raises(ValueError, match=r"^chunk_gla: cu_seqlens must have rank 1"):
        q = _t(1, 5, 2, 4)
        sk.chunk_gla(q, q, q, -q.abs(), cu_seqlens=torch.tensor([[0, 5]], device=DEVICE))
    with pytest.raises(ValueError, match=r"^selective_scan_fn: delta must have shape"):
        sk.selective_scan_fn(_t(1, 2, 3), _t(1, 2, 4), -_t(2, 3).abs(), _t(2, 3), _t(2, 3))


# ---- layout hints ----------------------------------------------------------------------------

FLA_HINT = re.escape("q, k, v, g are [B, T, H, K] (fla's head_first=False); for [B, H, T, K] "
                     "inputs pass x.transpose(1, 2)")


def test_selective_scan_hints_batch_dim_seqlen():
    u = _t(2, 50, 8)                                    # (batch, seqlen, dim)
    A = -_t(8, 4).abs()
    Bm, Cm = _t(2, 4, 50), _t(2, 4, 50)
    with pytest.raises(ValueError, match=re.escape(
            "selective_scan_fn: u looks like (batch, seqlen, dim) = (2, 50, 8)") + ".*" +
            re.escape("pass u.transpose(1, 2) (and delta, z)")):
        sk.selective_scan_fn(u, u.abs(), A, Bm, Cm)
    u = u.transpose(1, 2)
    with pytest.raises(ValueError, match=re.escape(
            "selective_scan_fn: B looks like (batch, seqlen, dstate) = (2, 50, 4)") + ".*" +
            re.escape("pass B.transpose(1, 2)")):
        sk.selective_scan_fn(u, u.abs(), A, Bm.transpose(1, 2), Cm)
    with pytest.raises(ValueError, match=r"C looks like \(batch, seqlen, groups, dstate\).*"
                                         r"C\.permute\(0, 2, 3, 1\)"):
        sk.selective_scan_fn(u, u.abs(), A, Bm, Cm.transpose(1, 2)[:, :, None])
    # the right layout runs
    assert sk.selective_scan_fn(u, u.abs(), A, Bm, Cm).shape == (2, 8, 50)


@pytest.mark.parametrize("case", ["q", "k", "v", "g", "all+g", "g_gamma", "initial_state"])
def test_linear_attn_hints_head_first(case):
    q = _t(2, 7, 3, 4)                                  # [B, T, H, K]
    hf = q.transpose(1, 2)                              # [B, H, T, K]
    g = -_t(2, 7, 3).abs()
    if case == "q":
        call = lambda: sk.chunk_gla(hf, q, q, -q.abs())  # noqa: E731
    elif case == "k":
        call = lambda: sk.chunk_linear_attn(q, hf, q)  # noqa: E731
    elif case == "v":
        call = lambda: sk.fused_recurrent_simple_gla(q, q, hf)  # noqa: E731
    elif case == "g":
        call = lambda: sk.chunk_simple_gla(q, q, q, g.transpose(1, 2))  # noqa: E731
    elif case == "all+g":
        call = lambda: sk.chunk_simple_gla(hf, hf, hf, g)  # noqa: E731
    elif case == "g_gamma":
        call = lambda: sk.chunk_simple_gla(hf, hf, hf, g_gamma=-_t(3).abs())  # noqa: E731
    else:
        call = lambda: sk.fused_recurrent_gla(  # noqa: E731
            hf, hf, hf, initial_state=torch.zeros(2, 3, 4, 4, device=DEVICE))
    with pytest.raises(ValueError, match=FLA_HINT):
        call()


def test_linear_attn_no_hint_for_other_shape_errors():
    q = _t(2, 7, 3, 4)
    with pytest.raises(ValueError) as e:
        sk.chunk_simple_gla(q, q, q, -_t(2, 7, 4).abs())
    assert "head_first" not in str(e.value)


@pytest.mark.parametrize("case", ["x", "dt", "B", "z"])
def test_ssd_hints_head_first(case):
    x, dt, A, Bm = _t(2, 50, 4, 16), _t(2, 50, 4).abs(), -_t(4).abs(), _t(2, 50, 1, 8)
    kw = {}
    if case == "x":
        x = x.transpose(1, 2)
    elif case == "dt":
        dt = dt.transpose(1, 2)
    elif case == "B":
        Bm = Bm.transpose(1, 2)
    else:
        kw["z"] = x.transpose(1, 2)
    with pytest.raises(ValueError, match=r"^mamba_chunk_scan_combined: .*for \(batch, nheads, "
                                         r"seqlen, \.\.\.\) inputs pass t\.transpose\(1, 2\)"):
        sk.mamba_chunk_scan_combined(x, dt, A, Bm, Bm, 64, **kw)


@pytest.mark.parametrize("call", [
    lambda: sk.linear_scan(_t(1, 3), _t(1, 3), initial_state=[0.0]),
    lambda: sk.causal_conv1d_fn(_t(1, 4, 7), _t(4, 3), initial_states=1.0),
    lambda: sk.causal_conv1d_fn(_t(1, 4, 7), _t(4, 3), cu_seqlens=[0, 7]),
    lambda: sk.causal_conv1d_update(_t(1, 4), torch.zeros(1, 4, 2), _t(4, 3), cache_seqlens=[0]),
    lambda: sk.chunk_based(_t(1, 5, 2, 4), _t(1, 5, 2, 4), _t(1, 5, 2, 4), cu_seqlens=(0, 5)),
])
def test_optional_tensor_arguments_of_the_wrong_type(call):
    """A non-tensor optional argument is a TypeError naming it, not an AttributeError."""
    with pytest.raises(TypeError, match=r"^\w+: \w+ must be a torch\.Tensor"):
        call()
