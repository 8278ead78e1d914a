"""ssm_kernels.nn layers: parallel form vs step form token by token, prefill + decode, packed
sequences vs one call per sequence, kernels vs the reference backend (forward and backward),
checkpoint compatibility (mamba-ssm's Mamba, fla's GLA), torch.compile fullgraph. GatedDeltaNet and
DeltaNet have their own file, test_nn_delta.py (here: torch.compile only)."""
import pytest
import torch

import ssm_kernels.nn as snn
from ssm_kernels.testing import assert_close, rel_err

from conftest import DEVICE, HAS_GPU, kernel_backends

D = 16


def make_layer(name, backend, d=D, l_max=32):
    return {
        "Mamba": lambda: snn.Mamba(d, d_state=4, backend=backend),
        "Mamba2": lambda: snn.Mamba2(d, d_state=8, headdim=8, ngroups=2, chunk_size=4,
                                     backend=backend),
        # gated-MLP channels (d_ssm < d_inner), scan-gated z (no norm), per-channel D, dt clamp
        "Mamba2-mlp-nonorm": lambda: snn.Mamba2(d, d_state=8, headdim=8, d_ssm=16, rmsnorm=False,
                                                D_has_hdim=True, dt_limit=(0.01, 0.05),
                                                bias=True, backend=backend),
        "GLA": lambda: snn.GatedLinearAttention(hidden_size=d, num_heads=2, use_short_conv=True,
                                                gate_low_rank_dim=4, backend=backend),
        "GLA-gqa-unfused": lambda: snn.GatedLinearAttention(
            hidden_size=d, num_heads=2, num_kv_heads=1, fuse_norm=False, feature_map="relu",
            mode="fused_recurrent", backend=backend),
        "GatedDeltaNet": lambda: snn.GatedDeltaNet(hidden_size=d, head_dim=4, num_heads=2,
                                                   backend=backend),
        "DeltaNet": lambda: snn.DeltaNet(hidden_size=d, num_heads=2, backend=backend),
        "Hyena": lambda: snn.HyenaOperator(d, l_max=l_max, order=3, filter_order=8, backend=backend),
        "MinGRU": lambda: snn.MinGRU(d, expansion_factor=1.5, backend=backend),
        "MinLSTM": lambda: snn.MinLSTM(d, backend=backend),
        "RGLRU": lambda: snn.RGLRU(d, num_heads=2, backend=backend),
        "LRU": lambda: snn.LRU(d, 8, backend=backend),
    }[name]()


# chunk_gla takes its log-decays in float32 whatever the storage: GLA agrees to float32 rounding
EXACT = {"GLA": torch.float32, "GLA-gqa-unfused": torch.float32}
LAYERS = ["Mamba", "Mamba2", "Mamba2-mlp-nonorm", "GLA", "GLA-gqa-unfused", "Hyena", "MinGRU",
          "MinLSTM", "RGLRU", "LRU"]
VARLEN = [n for n in LAYERS if n != "Hyena"]


@pytest.mark.parametrize("name", [n for n in LAYERS if n != "Hyena"])
def test_prefill_from_cache_is_differentiable(name):
    """A second prefill from a filled cache backpropagates to its input and to every parameter:
    the cache is overwritten after the call, so the op must not keep the cache itself."""
    m = make_layer(name, "reference").double()
    cache = m.allocate_cache(2)
    m(torch.randn(2, 3, D, dtype=torch.float64), cache=cache)
    x = torch.randn(2, 4, D, dtype=torch.float64, requires_grad=True)
    y = m(x, cache=cache)
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 0


@pytest.mark.parametrize("name", LAYERS)
def test_step_matches_parallel(name):
    """float64 on the reference backend: step-by-step from an empty cache, and a prefill of 5
    tokens followed by steps, both agree with one forward call token by token."""
    m = make_layer(name, "reference").double()
    x = torch.randn(2, 9, D, dtype=torch.float64)
    y = m(x)
    cache = m.allocate_cache(2)
    steps = torch.stack([m.step(x[:, t], cache) for t in range(9)], 1)
    assert_close(steps, y, EXACT.get(name, torch.float64), name=f"{name} steps")
    cache = m.allocate_cache(2)
    y_pre = m(x[:, :5], cache=cache)
    rest = torch.stack([m.step(x[:, t:t + 1], cache)[:, 0] for t in range(5, 9)], 1)
    assert_close(y_pre, y[:, :5], EXACT.get(name, torch.float64), name=f"{name} prefill")
    assert_close(rest, y[:, 5:], EXACT.get(name, torch.float64), name=f"{name} steps after prefill")


@pytest.mark.parametrize("name", VARLEN)
def test_packed_sequences(name):
    """cu_seqlens: one call over packed sequences equals one call per sequence, and the cache
    receives each sequence's final state."""
    m = make_layer(name, "reference").double()
    lens = [3, 6, 1]
    xs = [torch.randn(1, n, D, dtype=torch.float64) for n in lens]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    cache = m.allocate_cache(len(lens))
    y = m(torch.cat(xs, 1), cu_seqlens=cu, cache=cache)
    for i, x in enumerate(xs):
        c1 = m.allocate_cache(1)
        ref = m(x, cache=c1)
        assert_close(y[:, cu[i]:cu[i + 1]], ref, EXACT.get(name, torch.float64), name=f"{name} sequence {i}")
        for key, state in c1.items():
            assert_close(cache[key][i:i + 1], state, EXACT.get(name, torch.float64), name=f"{name} cache {key}")


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("name", LAYERS)
def test_kernels_match_reference_forward_backward(backend, name):
    torch.manual_seed(1)
    m = make_layer(name, "reference").to(DEVICE)
    k = make_layer(name, backend).to(DEVICE)
    k.load_state_dict(m.state_dict())
    x = torch.randn(2, 11, D, device=DEVICE)
    outs = []
    for layer in (m, k):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        grads = torch.autograd.grad((y * torch.cos(y.detach())).sum(),
                                    [xi] + [p for p in layer.parameters()], allow_unused=True)
        outs.append((y, grads))
    (yr, gr), (yk, gk) = outs
    assert_close(yk, yr.double(), torch.float32, name=f"{name} output")
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for n, a, b in zip(names, gk, gr):
        if b is None:
            continue
        assert_close(a, b.double(), torch.float32, name=f"{name} grad {n}")


def test_kernel_decode_steps():
    """The decode path on the kernels (causal_conv1d_update, selective_state_update,
    fused_recurrent_gla) agrees with the parallel form."""
    for name in ("Mamba", "Mamba2", "Mamba2-mlp-nonorm", "GLA"):
        for backend in kernel_backends():
            m = make_layer(name, backend).to(DEVICE)
            x = torch.randn(2, 5, D, device=DEVICE)
            y = m(x)
            cache = m.allocate_cache(2)
            steps = torch.stack([m.step(x[:, t], cache) for t in range(5)], 1)
            assert_close(steps, y.double(), torch.float32, name=f"{name} {backend}")


@pytest.mark.parametrize("name", ["Mamba2", "Mamba2-mlp-nonorm"])
def test_kernel_packed_prefill(name):
    """cu_seqlens + cache on the kernels (SSD varlen states, varlen conv) agree with the
    reference backend: outputs and every sequence's final states."""
    for backend in kernel_backends():
        m = make_layer(name, "reference").to(DEVICE)
        k = make_layer(name, backend).to(DEVICE)
        k.load_state_dict(m.state_dict())
        cu = torch.tensor([0, 3, 9, 10], dtype=torch.int32, device=DEVICE)
        x = torch.randn(1, 10, D, device=DEVICE)
        cm, ck = m.allocate_cache(3), k.allocate_cache(3)
        assert_close(k(x, cu_seqlens=cu, cache=ck), m(x, cu_seqlens=cu, cache=cm).double(),
                     torch.float32, name=f"{name} {backend}")
        for key in cm:
            assert_close(ck[key], cm[key].double(), torch.float32, name=f"{name} {backend} {key}")


def test_lru_is_the_paper_recurrence():
    """The LRU against its definition written out independently (a loop over complex states)."""
    m = make_layer("LRU", "reference").double()
    x = torch.randn(2, 6, D, dtype=torch.float64)
    lam = torch.exp(-torch.exp(m.nu_log) + 1j * torch.exp(m.theta_log))
    Bn = (m.B_re + 1j * m.B_im) * torch.exp(m.gamma_log)[:, None]
    C = m.C_re + 1j * m.C_im
    h = torch.zeros(2, 8, dtype=torch.complex128)
    ys = []
    for t in range(6):
        h = lam * h + x[:, t].to(torch.complex128) @ Bn.T
        ys.append((h @ C.T).real + m.D * x[:, t])
    assert_close(m(x), torch.stack(ys, 1), torch.float64)


def test_mingru_is_the_paper_recurrence():
    m = make_layer("MinGRU", "reference").double()
    x = torch.randn(2, 6, D, dtype=torch.float64)
    hid, gate = m.to_hidden_and_gate(x).chunk(2, -1)
    z = torch.sigmoid(gate)
    g = torch.where(hid >= 0, hid + 0.5, torch.sigmoid(hid))
    h = torch.zeros(2, m.dim_inner, dtype=torch.float64)
    ys = []
    for t in range(6):
        h = (1 - z[:, t]) * h + z[:, t] * g[:, t]
        ys.append(h)
    assert_close(m(x), m.to_out(torch.stack(ys, 1)), torch.float64)


def test_scan_layers_are_stable_at_extreme_gates():
    """Saturated gates (|logits| ~ 100) neither overflow nor produce NaN (log-space gates)."""
    for name in ("MinGRU", "MinLSTM", "RGLRU"):
        m = make_layer(name, "reference")
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(200.0)
        x = torch.randn(1, 50, D).requires_grad_()
        y = m(x)
        y.sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all(), name


# ---- checkpoint compatibility -------------------------------------------------------------------

def test_mamba_state_dict_matches_mamba_ssm():
    """Keys and shapes of mamba-ssm's Mamba (mamba_ssm/modules/mamba_simple.py) for d_model=64,
    d_state=16, d_conv=4, expand=2 (dt_rank = ceil(64 / 16) = 4), and its initialisation."""
    table = {
        "A_log": (128, 16), "D": (128,),
        "in_proj.weight": (256, 64),
        "conv1d.weight": (128, 1, 4), "conv1d.bias": (128,),
        "x_proj.weight": (4 + 2 * 16, 128),
        "dt_proj.weight": (128, 4), "dt_proj.bias": (128,),
        "out_proj.weight": (64, 128),
    }
    m = snn.Mamba(64, backend="reference")
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == table
    m2 = snn.Mamba(64, bias=True, conv_bias=False, dt_rank=8, expand=1.5)
    sd2 = {k: tuple(v.shape) for k, v in m2.state_dict().items()}
    assert sd2["in_proj.bias"] == (192,) and sd2["out_proj.bias"] == (64,)
    assert "conv1d.bias" not in sd2 and sd2["x_proj.weight"] == (8 + 32, 96)
    # initialisation: A = -[1..N] per channel, softplus(dt bias) in [dt_min, dt_max], D = 1
    torch.testing.assert_close(m.A_log, torch.log(torch.arange(1, 17.0)).expand(128, 16))
    dt = torch.nn.functional.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert torch.equal(m.D, torch.ones(128)) and m.A_log.dtype == torch.float32
    # a checkpoint with these keys loads strictly into a fresh layer and reproduces it
    m3 = snn.Mamba(64, backend="reference")
    m3.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, strict=True)
    x = torch.randn(1, 5, 64)
    torch.testing.assert_close(m3(x), m(x))


def test_mamba2_state_dict_matches_mamba_ssm():
    """Keys, shapes and dtypes of mamba-ssm's Mamba2 (mamba_ssm/modules/mamba2.py) for d_model=64,
    d_state=16, d_conv=4, expand=2, headdim=16, ngroups=2: d_inner = 128, nheads = 8,
    in_proj out = 2 * 128 + 2 * 2 * 16 + 8 = 328, conv_dim = 128 + 2 * 2 * 16 = 192; and its
    initialisation."""
    table = {
        "dt_bias": (8,), "A_log": (8,), "D": (8,),
        "in_proj.weight": (328, 64),
        "conv1d.weight": (192, 1, 4), "conv1d.bias": (192,),
        "norm.weight": (128,),
        "out_proj.weight": (64, 128),
    }
    m = snn.Mamba2(64, d_state=16, headdim=16, ngroups=2, backend="reference")
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == table
    assert list(m.state_dict()) == list(table)  # registration order as mamba-ssm's
    assert m.norm.group_size == 64 and m.norm.eps == 1e-5 and not m.norm.norm_before_gate
    # d_ssm < d_inner (gated MLP), D per channel, no norm, biases, no conv bias
    m2 = snn.Mamba2(64, d_state=16, headdim=16, d_ssm=64, D_has_hdim=True, rmsnorm=False,
                    bias=True, conv_bias=False)
    sd2 = {k: tuple(v.shape) for k, v in m2.state_dict().items()}
    assert sd2 == {"dt_bias": (4,), "A_log": (4,), "D": (64,),
                   "in_proj.weight": (2 * 128 + 32 + 4, 64), "in_proj.bias": (2 * 128 + 32 + 4,), "conv1d.weight": (64 + 32, 1, 4),
                   "out_proj.weight": (64, 128), "out_proj.bias": (64,)}
    # dtypes: A_log follows dtype, D stays float32 (as mamba-ssm)
    m3 = snn.Mamba2(32, d_state=8, headdim=16, dtype=torch.float16)
    assert m3.A_log.dtype == torch.float16 and m3.D.dtype == torch.float32
    assert m3.dt_bias.dtype == torch.float16 and m3.norm.weight.dtype == torch.float16
    # initialisation: A in A_init_range, softplus(dt_bias) in [dt_min, dt_max], D = 1, norm = 1
    A = torch.exp(m.A_log)
    assert A.min() >= 1 and A.max() <= 16
    dt = torch.nn.functional.softplus(m.dt_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert torch.equal(m.D, torch.ones(8)) and torch.equal(m.norm.weight, torch.ones(128))
    # a checkpoint with these keys loads strictly into a fresh layer and reproduces it
    m4 = snn.Mamba2(64, d_state=16, headdim=16, ngroups=2, backend="reference")
    m4.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, strict=True)
    x = torch.randn(1, 5, 64)
    torch.testing.assert_close(m4(x), m(x))
    with pytest.raises(ValueError, match="multiple of headdim"):
        snn.Mamba2(32, headdim=24)
    with pytest.raises(NotImplementedError, match="process_group"):
        snn.Mamba2(32, headdim=16, process_group=object())


def _mamba_by_definition(m, u):
    """Mamba-1 written out from mamba-ssm's Mamba forward without the fast path (in_proj -> x, z;
    nn.Conv1d + silu on x; x_proj -> dt, B, C in that order; softplus(dt_proj(dt)) with its bias;
    A = -exp(A_log); the recurrence over time as a loop; + D x; * silu(z); out_proj)."""
    T = u.shape[1]
    x, z = m.in_proj(u).chunk(2, dim=-1)                            # [b, T, d_inner] each
    x = torch.nn.functional.silu(m.conv1d(x.transpose(1, 2))[..., :T].transpose(1, 2))
    dt, Bm, Cm = torch.split(m.x_proj(x), [m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = torch.nn.functional.softplus(m.dt_proj(dt))                # [b, T, d_inner]
    A = -torch.exp(m.A_log)                                         # [d_inner, N]
    h = torch.zeros(u.shape[0], m.d_inner, m.d_state, dtype=u.dtype)
    ys = []
    for t in range(T):                                              # h[d, n] over time t
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * Bm[:, t, None]
        ys.append((h * Cm[:, t, None]).sum(-1) + m.D * x[:, t])
    y = torch.stack(ys, 1) * torch.nn.functional.silu(z)
    return m.out_proj(y)


def test_mamba_is_the_definition():
    """Forward and every gradient of nn.Mamba (selective_scan_fn + causal_conv1d_fn, reference
    backend) against mamba-ssm's Mamba written out in float64 (same parameters). Checked against
    mamba-ssm 2.3.2.post1's own module too (its selective_scan_ref, no fast path, CPU): outputs and
    all gradients agree to 1e-6 relative in float32 (bench/NOTES.md, mamba10)."""
    torch.manual_seed(0)
    m = snn.Mamba(D, d_state=4, dt_rank=3, backend="reference").double()
    with torch.no_grad():                       # away from the init's symmetries (D = 1, A rows)
        m.D.uniform_(0.5, 1.5)
        m.A_log.add_(0.3 * torch.randn_like(m.A_log))
        m.dt_proj.bias.uniform_(-3.0, 0.5)
    x = torch.randn(2, 9, D, dtype=torch.float64, requires_grad=True)
    ref = _mamba_by_definition(m, x)
    out = m(x)
    assert_close(out, ref, torch.float64, name="Mamba")
    g = torch.randn_like(ref)
    params = [x] + list(m.parameters())
    for (n, _), a, b in zip([("x", None)] + list(m.named_parameters()),
                            torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        assert_close(a, b, torch.float64, name=f"d{n}")


def _mamba2_by_definition(m, u):
    """Mamba-2 written out from mamba-ssm's Mamba2 forward (nn.Conv1d, a loop over the SSM
    recurrence, rms_norm_ref's gated group norm), float64."""
    b, T, _ = u.shape
    H, P, G, N = m.nheads, m.headdim, m.ngroups, m.d_state
    d_mlp = m.d_inner - m.d_ssm
    z0, x0, z, xBC, dt = torch.split(m.in_proj(u), [d_mlp, d_mlp, m.d_ssm, m.conv_dim, H], -1)
    xBC = torch.nn.functional.silu(m.conv1d(xBC.transpose(1, 2))[..., :T].transpose(1, 2))
    x, Bm, Cm = torch.split(xBC, [m.d_ssm, G * N, G * N], -1)
    x = x.reshape(b, T, H, P)
    Bm = Bm.reshape(b, T, G, N).repeat_interleave(H // G, 2)
    Cm = Cm.reshape(b, T, G, N).repeat_interleave(H // G, 2)
    dt = torch.nn.functional.softplus(dt + m.dt_bias).clamp(*m.dt_limit)
    A = -torch.exp(m.A_log)
    D = m.D.reshape(H, P) if m.D_has_hdim else m.D[:, None]
    h = torch.zeros(b, H, P, N, dtype=u.dtype)
    ys = []
    for t in range(T):
        h = torch.exp(dt[:, t] * A)[..., None, None] * h \
            + (dt[:, t, :, None] * x[:, t])[..., None] * Bm[:, t, :, None, :]
        ys.append((h * Cm[:, t, :, None, :]).sum(-1) + D * x[:, t])
    y = torch.stack(ys, 1)
    if not m.rmsnorm:
        y = y * torch.nn.functional.silu(z.reshape(b, T, H, P))
    y = y.reshape(b, T, m.d_ssm)
    if m.rmsnorm:
        yg = (y * torch.nn.functional.silu(z)).reshape(b, T, G, -1)
        yg = yg / torch.sqrt(yg.square().mean(-1, keepdim=True) + 1e-5)
        y = yg.reshape(b, T, -1) * m.norm.weight
    if d_mlp:
        y = torch.cat([torch.nn.functional.silu(z0) * x0, y], -1)
    return m.out_proj(y)


@pytest.mark.parametrize("name", ["Mamba2", "Mamba2-mlp-nonorm"])
def test_mamba2_is_the_definition(name):
    m = make_layer(name, "reference").double()
    with torch.no_grad():
        m.D.uniform_(0.5, 1.5)
        if m.rmsnorm:
            m.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 7, D, dtype=torch.float64)
    assert_close(m(x), _mamba2_by_definition(m, x), torch.float64, name=name)


def test_mamba2_prefills_shorter_than_the_conv():
    """Prefills of 1 and 2 tokens (fewer than d_conv - 1) chained through one cache, then steps,
    reproduce one forward call (the conv state keeps older inputs it still needs)."""
    m = make_layer("Mamba2", "reference").double()
    x = torch.randn(2, 6, D, dtype=torch.float64)
    cache = m.allocate_cache(2)
    parts = [m(x[:, :1], cache=cache), m(x[:, 1:3], cache=cache)]
    parts += [m.step(x[:, t], cache)[:, None] for t in range(3, 6)]
    assert_close(torch.cat(parts, 1), m(x), torch.float64)


def test_gla_state_dict_matches_fla():
    """Parameter names/shapes of fla's GatedLinearAttention (fla/layers/gla.py)."""
    m = snn.GatedLinearAttention(hidden_size=64, num_heads=4, use_short_conv=True)
    want = {
        "q_proj.weight": (32, 64), "k_proj.weight": (32, 64), "v_proj.weight": (64, 64),
        "g_proj.weight": (64, 64), "q_conv1d.weight": (32, 1, 4), "k_conv1d.weight": (32, 1, 4),
        "v_conv1d.weight": (64, 1, 4), "gk_proj.0.weight": (16, 64), "gk_proj.1.weight": (32, 16),
        "gk_proj.1.bias": (32,), "o_proj.weight": (64, 64), "g_norm_swish_gate.weight": (16,),
    }
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == want
    m2 = snn.GatedLinearAttention(hidden_size=64, num_heads=4, num_kv_heads=2, fuse_norm=False)
    names = set(m2.state_dict())
    assert "g_norm.weight" in names and m2.state_dict()["k_proj.weight"].shape == (16, 64)


def test_errors():
    with pytest.raises(ValueError, match="cu_seqlens is not supported"):
        make_layer("Hyena", "reference")(torch.randn(1, 4, D), cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="exceeds l_max"):
        make_layer("Hyena", "reference", l_max=8)(torch.randn(1, 9, D))
    with pytest.raises(ValueError, match="step takes one token"):
        make_layer("MinGRU", "reference").step(torch.randn(2, 3, D), {})
    with pytest.raises(ValueError, match="mode must be"):
        snn.GatedLinearAttention(mode="parallel", hidden_size=16)


# ---- torch.compile ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Mamba", "Mamba2", "GLA", "GatedDeltaNet", "Hyena", "MinGRU",
                                  "RGLRU", "LRU"])
def test_fullgraph_compile_forward_backward(name):
    torch._dynamo.reset()
    m = make_layer(name, "reference")
    x = torch.randn(2, 6, D, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    y_ref = m(x)
    (g_ref,) = torch.autograd.grad(y_ref.sum(), x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(g, g_ref)


# ---- real sizes on the GPU ---------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", LAYERS)
def test_gpu_real_size(name):
    d = 256
    m = make_layer(name, None, d=d, l_max=1024).cuda()
    x = torch.randn(4, 1024, d, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = m(x)
    y.float().square().mean().backward()
    assert torch.isfinite(x.grad).all()
    xs = x.detach()[:, :64]
    y = m(xs)
    cache = m.allocate_cache(4)
    steps = torch.stack([m.step(xs[:, t], cache) for t in range(64)], 1)
    # the chunked kernels' dots may run in tf32: agreement to ~1e-3, not float32 rounding
    assert rel_err(steps, y) < 1e-2, (name, rel_err(steps, y))
