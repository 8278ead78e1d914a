"""GatedDeltaNet and DeltaNet layers (ssm_kernels.nn): the layer against its definition written out
in plain torch, chunk vs fused_recurrent, decode steps vs the parallel form (float64 reference +
the Triton kernels under the interpreter), packed sequences and padding masks vs one call per
sequence, gradients to every parameter, fla's parameter names, initialisation, config errors."""
import pytest
import torch
import torch.nn.functional as F

import ssm_kernels.nn as snn
from ssm_kernels.testing import assert_close, rel_err

from conftest import DEVICE, HAS_GPU, kernel_backends

D = 16
F64 = torch.float64


CONFIGS = {
    "GDN": (snn.GatedDeltaNet, dict(hidden_size=D, head_dim=4, num_heads=2)),
    # GVA (2 value heads per q/k head), beta in [0, 2], no output gate, conv bias, head_v = 6
    "GDN-gva": (snn.GatedDeltaNet, dict(hidden_size=D, head_dim=4, num_heads=2, num_v_heads=4,
                                        expand_v=1.5, allow_neg_eigval=True, use_gate=False,
                                        conv_bias=True, mode="fused_recurrent")),
    "GDN-noconv": (snn.GatedDeltaNet, dict(hidden_size=D, head_dim=8, num_heads=1, expand_v=1,
                                           use_short_conv=False)),
    "DeltaNet": (snn.DeltaNet, dict(hidden_size=D, num_heads=2)),
    # output gate, no beta projection (beta = 2), elu+1 keys with sum norm, K != V
    "DeltaNet-var": (snn.DeltaNet, dict(hidden_size=D, num_heads=2, expand_k=0.5, use_gate=True,
                                        use_beta=False, allow_neg_eigval=True,
                                        qk_activation="elu", qk_norm="sum")),
    "DeltaNet-noconv": (snn.DeltaNet, dict(hidden_size=D, num_heads=4, use_short_conv=False,
                                           qk_activation="relu", mode="fused_recurrent")),
}


def make(name, backend="reference", **kw):
    cls, args = CONFIGS[name]
    return cls(**{**args, **kw}, backend=backend)


NAMES = list(CONFIGS)


def _randomise(m):
    """Move the parameters that start at constants (norm weights) off them, so every parameter
    shapes the output."""
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            if n.endswith("conv1d.bias"):
                p.uniform_(-0.5, 0.5)
    return m


# ---- the definition -----------------------------------------------------------------------------

def _by_definition(m, x):
    """The layer written out from fla's GatedDeltaNet / DeltaNet forward: the short convolutions as
    sums over windows, the delta rule as a loop over time per value head, the (gated) RMS norm."""
    B, T, _ = x.shape
    gated = isinstance(m, snn.GatedDeltaNet)

    def conv(c, u, act):   # y_t = sum_j w_j u_{t - W + 1 + j} (+ bias), per channel
        W = c.kernel_size
        windows = F.pad(u, (0, 0, W - 1, 0)).unfold(1, W, 1)        # [B, T, D, W]
        y = (windows * c.weight[:, 0]).sum(-1) + (0 if c.bias is None else c.bias)
        return F.silu(y) if act else y

    q, k, v = m.q_proj(x), m.k_proj(x), m.v_proj(x)
    qk_silu = gated or m.qk_activation == "silu"
    if m.use_short_conv:
        q, k = conv(m.q_conv1d, q, qk_silu), conv(m.k_conv1d, k, qk_silu)
        v = conv(m.v_conv1d, v, True)
    else:
        q, k = (F.silu(q), F.silu(k)) if qk_silu else (q, k)
        v = F.silu(v)
    if not gated and m.qk_activation != "silu":
        act = {"relu": F.relu, "elu": lambda t: F.elu(t) + 1,
               "identity": lambda t: t}[m.qk_activation]
        q, k = act(q), act(k)
    H, HV, K, V = m.num_heads, m.num_v_heads, m.head_k_dim, m.head_v_dim
    q, k, v = q.view(B, T, H, K), k.view(B, T, H, K), v.view(B, T, HV, V)
    if gated or m.qk_norm == "l2":
        q, k = (t / torch.sqrt((t * t).sum(-1, keepdim=True) + 1e-6) for t in (q, k))
    else:
        q, k = (t / t.sum(-1, keepdim=True) for t in (q, k))
    if gated or m.use_beta:
        beta = torch.sigmoid(m.b_proj(x))
    else:
        beta = torch.ones(B, T, HV, dtype=x.dtype)
    beta = beta * 2 if m.allow_neg_eigval else beta
    decay = (torch.exp(-torch.exp(m.A_log) * F.softplus(m.a_proj(x) + m.dt_bias)) if gated
             else torch.ones(B, T, HV, dtype=x.dtype))
    q, k = q.repeat_interleave(HV // H, 2), k.repeat_interleave(HV // H, 2)
    S = torch.zeros(B, HV, K, V, dtype=x.dtype)
    outs = []
    for t in range(T):
        kt, vt, bt = k[:, t], v[:, t], beta[:, t, :, None]
        S = decay[:, t, :, None, None] * S
        u = bt * (vt - torch.einsum("bhkv,bhk->bhv", S, kt))
        S = S + kt[..., None] * u[..., None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]) * K ** -0.5)
    o = torch.stack(outs, 1)
    o = o * torch.rsqrt(o.square().mean(-1, keepdim=True) + 1e-5) * m.o_norm.weight
    if m.use_gate:
        o = o * F.silu(m.g_proj(x).view(B, T, HV, V))
    return m.o_proj(o.reshape(B, T, HV * V))


@pytest.mark.parametrize("name", NAMES)
def test_layer_is_the_definition(name):
    m = _randomise(make(name).double())
    x = torch.randn(2, 7, D, dtype=F64)
    assert_close(m(x), _by_definition(m, x), F64, name=name)


# ---- forward, backward, modes -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
def test_forward_shape_and_dtype(dtype):
    for name in ("GDN-gva", "DeltaNet"):
        m = make(name).to(dtype)
        y = m(torch.randn(2, 5, D, dtype=dtype))
        assert y.shape == (2, 5, D) and y.dtype == dtype and torch.isfinite(y).all(), name
        cache = m.allocate_cache(2)
        sd = F64 if dtype == F64 else torch.float32
        assert cache["state"].dtype == sd and cache["conv_v"].dtype == dtype
        y1 = m.step(torch.randn(2, 1, D, dtype=dtype), cache)
        assert y1.shape == (2, 1, D) and y1.dtype == dtype


@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_every_parameter(name):
    m = _randomise(make(name))
    x = torch.randn(2, 6, D, requires_grad=True)
    m(x).square().sum().backward()
    for n, p in list(m.named_parameters()) + [("x", x)]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: no gradient for {n}"
        assert p.grad.abs().max() > 0, f"{name}: zero gradient for {n}"


@pytest.mark.parametrize("name", ["GDN", "GDN-gva", "DeltaNet"])
def test_chunk_equals_fused_recurrent(name):
    a = _randomise(make(name, mode="chunk").double())
    b = make(name, mode="fused_recurrent").double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 9, D, dtype=F64)
    grads = []
    for m in (a, b):
        y = m(x)
        grads.append((y, torch.autograd.grad(y.sin().sum(), list(m.parameters()))))
    assert_close(grads[1][0], grads[0][0], F64, name=f"{name} output")
    for (n, _), ga, gb in zip(a.named_parameters(), grads[0][1], grads[1][1]):
        assert_close(gb, ga, F64, name=f"{name} grad {n}")


# ---- decoding -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_step_matches_parallel(name):
    """float64, reference backend: steps from an empty cache (with autograd on, and under no_grad,
    where the kernel updates the state in place), and prefills of 1 and 2 tokens (shorter than the
    conv) + 2 more + steps, all agree with one forward call token by token."""
    m = _randomise(make(name).double())
    x = torch.randn(2, 9, D, dtype=F64)
    y = m(x)
    cache = m.allocate_cache(2)
    steps = torch.stack([m.step(x[:, t], cache) for t in range(9)], 1)
    assert_close(steps, y, F64, name=f"{name} steps")
    with torch.no_grad():
        cache = m.allocate_cache(2)
        state = cache["state"]
        steps = torch.stack([m.step(x[:, t:t + 1], cache)[:, 0] for t in range(9)], 1)
    assert cache["state"] is state
    assert_close(steps, y, F64, name=f"{name} no_grad steps")
    cache = m.allocate_cache(2)
    parts = [m(x[:, :1], cache=cache), m(x[:, 1:3], cache=cache), m(x[:, 3:5], cache=cache)]
    parts += [m.step(x[:, t], cache)[:, None] for t in range(5, 9)]
    assert_close(torch.cat(parts, 1), y, F64, name=f"{name} prefill + steps")


def test_prefill_with_cache_is_differentiable():
    """A prefill from a non-empty cache backpropagates (the cache is overwritten afterwards)."""
    m = make("GDN").double()
    cache = m.allocate_cache(2)
    m(torch.randn(2, 3, D, dtype=F64), cache=cache)
    x = torch.randn(2, 4, D, dtype=F64, requires_grad=True)
    m(x, cache=cache).sum().backward()
    assert torch.isfinite(x.grad).all() and m.A_log.grad.abs().max() > 0


@pytest.mark.parametrize("backend", kernel_backends())
def test_kernel_decode_and_forward_backward(backend):
    """The Triton kernels (the interpreter on the CPU) at a tiny shape: decode steps (conv update +
    in-place recurrent step) agree with the reference forward for both layers, and Gated DeltaNet's
    forward + every parameter's gradient agree with the reference backend."""
    for name in ("GDN-gva", "DeltaNet"):
        r = _randomise(make(name)).to(DEVICE)
        k = make(name, backend).to(DEVICE)
        k.load_state_dict(r.state_dict())
        x = torch.randn(2, 4, D, device=DEVICE)
        yr = r(x)
        with torch.no_grad():
            cache = k.allocate_cache(2)
            steps = torch.stack([k.step(x[:, t], cache) for t in range(4)], 1)
        assert_close(steps, yr.double(), torch.float32, name=f"{name} {backend} steps")
        if name != "GDN-gva":
            continue
        outs = []
        for m in (r, k):
            y = m(x)
            outs.append((y, torch.autograd.grad(y.sin().sum(), list(m.parameters()))))
        assert_close(outs[1][0], outs[0][0].double(), torch.float32, name=f"{name} {backend} y")
        for (n, _), gr, gk in zip(r.named_parameters(), outs[0][1], outs[1][1]):
            assert_close(gk, gr.double(), torch.float32, name=f"{name} {backend} grad {n}")


# ---- packed sequences and padding masks ---------------------------------------------------------

@pytest.mark.parametrize("name", ["GDN", "GDN-gva", "DeltaNet-var"])
def test_packed_sequences(name):
    """cu_seqlens: one call over packed sequences (one of them empty) equals one call per sequence,
    and the cache receives each sequence's final states (conv and recurrent)."""
    m = _randomise(make(name).double())
    lens = [3, 6, 0, 1]
    xs = [torch.randn(1, n, D, dtype=F64) for n in lens]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    cache = m.allocate_cache(len(lens))
    for v in cache.values():
        v.normal_()   # start from nonzero states
    start = {key: v.clone() for key, v in cache.items()}
    y = m(torch.cat(xs, 1), cu_seqlens=cu, cache=cache)
    for i, x in enumerate(xs):
        c1 = {key: v[i:i + 1].clone() for key, v in start.items()}
        if lens[i]:
            assert_close(y[:, cu[i]:cu[i + 1]], m(x, cache=c1), F64, name=f"{name} sequence {i}")
        for key, state in c1.items():
            assert_close(cache[key][i:i + 1], state, F64, name=f"{name} cache {key} seq {i}")


@pytest.mark.parametrize("side", ["left", "right"])
def test_attention_mask(side):
    """A [B, S] padding mask (fla's convention: S >= T, the last T columns apply) gives each row's
    real tokens the output of its own unpadded call, zeros at padding, and each row's final states
    in its cache row; a prefill + steps from that cache continues every sequence."""
    m = _randomise(make("GDN").double())
    T, lens = 6, [6, 4, 1]
    x = torch.randn(len(lens), T, D, dtype=F64)
    mask = torch.zeros(len(lens), T + 2, dtype=torch.long)      # 2 older columns are ignored
    for b, n in enumerate(lens):
        cols = slice(2, 2 + n) if side == "right" else slice(2 + T - n, 2 + T)
        mask[b, cols] = 1
    cache = m.allocate_cache(len(lens))
    y = m(x, cache=cache, attention_mask=mask)
    nxt = torch.randn(len(lens), D, dtype=F64)
    y_next = m.step(nxt, cache)
    keep = mask[:, 2:].bool()
    assert torch.equal(y[~keep], torch.zeros_like(y[~keep]))
    for b in range(len(lens)):
        xb = x[b:b + 1, keep[b]]
        c1 = m.allocate_cache(1)
        assert_close(y[b:b + 1, keep[b]], m(xb, cache=c1), F64, name=f"{side} row {b}")
        assert_close(y_next[b:b + 1], m.step(nxt[b:b + 1], c1), F64, name=f"{side} row {b} next")


# ---- checkpoints, initialisation ----------------------------------------------------------------

def test_state_dicts_match_fla():
    """Parameter names and shapes of fla's GatedDeltaNet (fla/layers/gated_deltanet.py) with
    hidden_size=64, head_dim=16, num_heads=2, num_v_heads=4, expand_v=2 (key_dim 32, value_dim
    128), and of fla's DeltaNet (fla/layers/delta_net.py) with hidden_size=64, num_heads=4."""
    m = snn.GatedDeltaNet(hidden_size=64, head_dim=16, num_heads=2, num_v_heads=4)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {
        "A_log": (4,), "dt_bias": (4,),
        "q_proj.weight": (32, 64), "k_proj.weight": (32, 64), "v_proj.weight": (128, 64),
        "a_proj.weight": (4, 64), "b_proj.weight": (4, 64),
        "q_conv1d.weight": (32, 1, 4), "k_conv1d.weight": (32, 1, 4),
        "v_conv1d.weight": (128, 1, 4), "g_proj.weight": (128, 64), "o_norm.weight": (32,),
        "o_proj.weight": (64, 128)}
    m2 = snn.GatedDeltaNet(hidden_size=64, head_dim=16, num_heads=2, use_gate=False,
                           use_short_conv=False)
    assert set(m2.state_dict()) == {"A_log", "dt_bias", "q_proj.weight", "k_proj.weight",
                                    "v_proj.weight", "a_proj.weight", "b_proj.weight",
                                    "o_norm.weight", "o_proj.weight"}
    d = snn.DeltaNet(hidden_size=64, num_heads=4, conv_bias=True)
    assert {k: tuple(v.shape) for k, v in d.state_dict().items()} == {
        "q_proj.weight": (64, 64), "k_proj.weight": (64, 64), "v_proj.weight": (64, 64),
        "b_proj.weight": (4, 64), "q_conv1d.weight": (64, 1, 4), "q_conv1d.bias": (64,),
        "k_conv1d.weight": (64, 1, 4), "k_conv1d.bias": (64,), "v_conv1d.weight": (64, 1, 4),
        "v_conv1d.bias": (64,), "o_norm.weight": (16,), "o_proj.weight": (64, 64)}
    # a checkpoint loads strictly into a fresh layer and reproduces it
    m3 = snn.GatedDeltaNet(hidden_size=64, head_dim=16, num_heads=2, num_v_heads=4,
                           backend="reference")
    m3.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, strict=True)
    m.backend = "reference"
    x = torch.randn(1, 5, 64)
    torch.testing.assert_close(m3(x), m(x))


def test_gdn_initialisation():
    """A ~ U(0, 16) (fla's range) and softplus(dt_bias) log-uniform in [dt_min, dt_max], as
    Mamba-2; the decay starts in (0, 1]."""
    m = snn.GatedDeltaNet(hidden_size=64, head_dim=16, num_heads=4, num_v_heads=64)
    A = torch.exp(m.A_log)
    assert A.min() >= 0 and A.max() <= 16 and A.max() > 8 and m.A_log._no_weight_decay
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001 and m.dt_bias._no_weight_decay
    m2 = snn.GatedDeltaNet(hidden_size=64, head_dim=16, num_heads=4, A_init_range=(1, 2),
                           dt_min=0.01, dt_max=0.02, dtype=torch.float16)
    A2, dt2 = torch.exp(m2.A_log.float()), F.softplus(m2.dt_bias.float())
    assert m2.A_log.dtype == torch.float16 and A2.min() >= 0.999 and A2.max() <= 2.001
    assert dt2.min() >= 0.0099 and dt2.max() <= 0.0201


# ---- errors -------------------------------------------------------------------------------------

def test_config_and_input_errors():
    GDN, DN = snn.GatedDeltaNet, snn.DeltaNet
    cases = [
        (lambda: GDN(hidden_size=16, head_dim=4, num_heads=2, num_v_heads=3),
         "num_v_heads=3 must be a multiple of num_heads=2"),
        (lambda: GDN(hidden_size=16, head_dim=4, num_heads=4, num_v_heads=2),
         "num_v_heads=2 must be a multiple of num_heads=4"),
        (lambda: GDN(hidden_size=16, head_dim=4, num_heads=2, expand_v=1.3),
         r"head_dim \* expand_v must be a positive integer"),
        (lambda: GDN(hidden_size=16, head_dim=0, num_heads=2), "head_dim must be a positive int"),
        (lambda: GDN(hidden_size=16, head_dim=4, mode="fused_chunk"), "mode must be 'chunk' or"),
        (lambda: GDN(hidden_size=16, head_dim=4, conv_size=0), "conv_size must be a positive"),
        (lambda: GDN(hidden_size=16, head_dim=4, A_init_range=(-1, 16)), "A_init_range"),
        (lambda: DN(hidden_size=16, num_heads=3), r"key dim \(hidden_size \* expand_k\) = 16 "
                                                  "must be a positive multiple of num_heads=3"),
        (lambda: DN(hidden_size=16, num_heads=2, qk_activation="gelu"), "qk_activation must be"),
        (lambda: DN(hidden_size=16, num_heads=2, qk_norm="l1"), "qk_norm must be 'l2' or 'sum'"),
        (lambda: DN(hidden_size=16, num_heads=2, mode="fused_chunk"), "mode must be 'chunk' or"),
    ]
    for make_it, msg in cases:
        with pytest.raises(ValueError, match=msg):
            make_it()
    m = make("GDN")
    x = torch.randn(2, 4, D)
    with pytest.raises(ValueError, match=r"attention_mask must be a \[batch, seq_len\]"):
        m(x, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"attention_mask must be a \[batch, seq_len\]"):
        m(x, attention_mask=torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match="attention_mask or cu_seqlens, not both"):
        m(x[:1], cu_seqlens=torch.tensor([0, 4]), attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="step takes one token"):
        m.step(x, m.allocate_cache(2))
    with pytest.raises(ValueError, match="with cu_seqlens the batch must be 1"):
        m(x, cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["GatedDeltaNet", "DeltaNet"])
def test_gpu_real_size(name):
    """bf16 autocast training step at a real size, then decoding steps against the forward."""
    m = (snn.GatedDeltaNet(hidden_size=256, head_dim=64, num_heads=2, num_v_heads=4)
         if name == "GatedDeltaNet" else snn.DeltaNet(hidden_size=256, num_heads=4)).cuda()
    x = torch.randn(4, 1024, 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = m(x)
    y.float().square().mean().backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    xs = x.detach()[:, :64]
    with torch.no_grad():
        y = m(xs)
        cache = m.allocate_cache(4)
        steps = torch.stack([m.step(xs[:, t], cache) for t in range(64)], 1)
    assert rel_err(steps, y) < 1e-2, (name, rel_err(steps, y))
