"""The host path, pinned on the CPU: per public call, how many kernels are launched and how many
torch-level operations run around them (allocations, views, glue), with the kernels stubbed out.
A change that adds glue (a zeros, a clone, a torch reduction) or a launch shows up here; update the
pin in the same commit and say why. Also: value checks run on CPU tensors and name the argument.

Counts use the Triton backend under the interpreter with its kernels replaced by a no-op, so they
measure exactly our launchers and interface code."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import ssm_kernels as sk

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="counts launches through Triton's interpreter (CPU runs)")

T = "triton"


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def stubbed_launches(monkeypatch):
    """Replace every interpreted kernel launch by a counter (outputs stay unwritten)."""
    import triton.runtime.interpreter as interp
    calls = []
    monkeypatch.setattr(interp.InterpretedFunction, "run",
                        lambda self, *a, **k: calls.append(getattr(self.fn, "__name__", "?")))
    return calls


_VIEWS = {"view", "_unsafe_view", "reshape", "unsqueeze", "squeeze", "select", "slice", "expand",
          "transpose", "t", "permute", "as_strided", "detach", "alias", "view_as_real",
          "view_as_complex", "_reshape_alias"}


def _count(fn, calls):
    fn()  # warm: plans and backend choices cached
    calls.clear()
    with _CountOps() as mode:
        fn()
    work = [op for op in mode.ops if op not in _VIEWS]
    return len(calls), work


def _train(f, leaves):
    def step():
        out = f()
        out = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(out, leaves, out)  # the gradient is an existing tensor: no ones_like
    return step


def _cases(pg=None):
    a, b = torch.rand(1, 16, 64), torch.randn(1, 16, 64)
    al, bl = a.clone().requires_grad_(), b.clone().requires_grad_()
    u, dt, z = (torch.randn(1, 16, 64) for _ in range(3))
    A = -torch.rand(16, 16)
    Bv, Cv = torch.randn(1, 1, 16, 64), torch.randn(1, 1, 16, 64)
    Dp, bias = torch.randn(16), torch.randn(16)
    ul, dtl = u.clone().requires_grad_(), dt.clone().requires_grad_()
    st = torch.randn(4, 32, 16)
    xs, dts, zs = (torch.randn(4, 32) for _ in range(3))
    As, Bs, Cs, Ds, bs = -torch.rand(32, 16), torch.randn(4, 16), torch.randn(4, 16), torch.randn(32), torch.randn(32)
    q, k, v = (torch.randn(1, 64, 2, 32) for _ in range(3))
    ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
    gh, gk = F.logsigmoid(torch.randn(1, 64, 2)), F.logsigmoid(torch.randn(1, 64, 2, 32))
    uc, kc, Dc = torch.randn(1, 16, 256), torch.randn(16, 256), torch.randn(16)
    ucl, kcl = uc.clone().requires_grad_(), kc.clone().requires_grad_()
    ub, ubl = uc.bfloat16(), uc.bfloat16().requires_grad_()
    vd, gd, bd = torch.randn(1, 64, 4, 16), F.logsigmoid(torch.randn(1, 64, 4)), torch.rand(1, 64, 4)
    xm, zm, dtm = torch.randn(1, 64, 4, 16), torch.randn(1, 64, 4, 16), torch.randn(1, 64, 4)
    Am, Dm, bm = -torch.rand(4), torch.randn(4, 16), torch.randn(4)
    Bm, Cm = torch.randn(1, 64, 2, 32), torch.randn(1, 64, 2, 32)
    xml, dtml, Bml = (t.clone().requires_grad_() for t in (xm, dtm, Bm))
    qs, ks, vs = torch.randn(8, 1, 2, 32), torch.randn(8, 1, 2, 32), torch.randn(8, 1, 4, 16)
    gs, bts, sd = F.logsigmoid(torch.randn(8, 1, 4)), torch.rand(8, 1, 4), torch.randn(8, 4, 32, 16)
    return {
        "linear_scan fwd": lambda: sk.linear_scan(a, b, dim=-1, backend=T, process_group=pg),
        "linear_scan fwd+bwd": _train(lambda: sk.linear_scan(al, bl, dim=-1, backend=T,
                                                            process_group=pg), [al, bl]),
        "selective_scan_fn fwd": lambda: sk.selective_scan_fn(u, dt, A, Bv, Cv, Dp, z, bias, True, backend=T),
        "selective_scan_fn fwd+bwd": _train(lambda: sk.selective_scan_fn(
            ul, dtl, A, Bv, Cv, Dp, z, bias, True, backend=T), [ul, dtl]),
        "selective_state_update": lambda: sk.selective_state_update(st, xs, dts, As, Bs, Cs, Ds, zs, bs, True, backend=T),
        "chunk_simple_gla fwd": lambda: sk.chunk_simple_gla(q, k, v, gh, backend=T, process_group=pg),
        "chunk_simple_gla fwd+bwd": _train(lambda: sk.chunk_simple_gla(ql, kl, vl, gh, backend=T,
                                                                   process_group=pg), [ql, kl, vl]),
        "mamba_chunk_scan_combined fwd (D, z)": lambda: sk.mamba_chunk_scan_combined(
            xm, dtm, Am, Bm, Cm, 64, D=Dm, z=zm, dt_bias=bm, dt_softplus=True, backend=T),
        "mamba_chunk_scan_combined fwd+bwd (D, z)": _train(lambda: sk.mamba_chunk_scan_combined(
            xml, dtml, Am, Bml, Cm, 64, D=Dm, z=zm, dt_bias=bm, dt_softplus=True, backend=T),
            [xml, dtml, Bml]),
        "chunk_linear_attn fwd": lambda: sk.chunk_linear_attn(
            q, k, v, output_final_state=True, normalize=False, backend=T, process_group=pg),
        "chunk_linear_attn fwd+bwd": _train(lambda: sk.chunk_linear_attn(
            ql, kl, vl, output_final_state=True, normalize=False, backend=T, process_group=pg),
            [ql, kl, vl]),
        "chunk_linear_attn normalize fwd": lambda: sk.chunk_linear_attn(
            q, k, v, output_final_state=True, backend=T, process_group=pg),
        "chunk_linear_attn normalize fwd+bwd": _train(lambda: sk.chunk_linear_attn(
            ql, kl, vl, output_final_state=True, backend=T, process_group=pg), [ql, kl, vl]),
        "chunk_gla fwd": lambda: sk.chunk_gla(q, k, v, gk, backend=T),
        "chunk_gla fwd+bwd": _train(lambda: sk.chunk_gla(ql, kl, vl, gk, backend=T), [ql, kl, vl]),
        "chunk_gated_delta_rule fwd": lambda: sk.chunk_gated_delta_rule(q, k, vd, gd, bd, backend=T,
                                                                      process_group=pg),
        "fused_recurrent_gated_delta_rule decode": lambda: sk.fused_recurrent_gated_delta_rule(
            qs, ks, vs, gs, bts, initial_state=sd, use_qk_l2norm_in_kernel=True,
            inplace_final_state=True, backend=T),
        "fft_conv fwd": lambda: sk.fft_conv(uc, kc, Dc, backend=T),
        "fft_conv fwd+bwd": _train(lambda: sk.fft_conv(ucl, kcl, Dc, backend=T), [ucl, kcl]),
        "fft_conv bf16 fwd": lambda: sk.fft_conv(ub, kc, Dc, backend=T),
        "fft_conv bf16 fwd+bwd": _train(lambda: sk.fft_conv(ubl, kcl, Dc, backend=T), [ubl, kcl]),
    }


# (kernel launches, torch operations other than views) per call. Session 7 helper alloc7: the
# chunk engine's absent-operand pointers are persistent 1-element dummies per (device, dtype)
# (common.dummy: no allocation per call) and each call's temporaries are views of one
# allocation (common.workspace): fused forward hs + gs, backward h + its final states + dh (+
# SSD's dD partials, GLA's scores), GLA forward h + scores. Before: simple_gla (2, 10) / (6, 22),
# gla (5, 12) / (12, 25), SSD (2, 12) / (6, 35), gated delta fwd (3, 19) (its w, u, h, v_new:
# one workspace; the backward's recompute too, with the final states it drops); kept states
# (5, 18), (11, 21), (5, 31); chunk_linear_attn (2, 7) / (6, 19), normalize (2, 13) / (6, 40).
# Value checks of CPU tensors (log-decays <= 0: gt, any, item) are part of the CPU path by
# design and counted here.
PINNED = {
    # linear_scan (session 7 helper lscanhost7): without output_final_state the forward is the
    # h-only op (STORE_HT off: no hT allocation, one autograd output), and without an initial
    # state needing a gradient the backward skips dh0 (STORE_DH0 off): (1, 2) / (2, 5) before
    # (h, hT; + da, db, dh0); now h; h + da, db
    "linear_scan fwd": (1, 1),
    "linear_scan fwd+bwd": (2, 3),
    "selective_scan_fn fwd": (1, 3),
    # the backward's zero last-state gradient is a cached read-only buffer (no zeros per call);
    # the eager backward takes the backend's list with None for absent inputs (no empty dh0
    # tensor for the absent initial state: 19 before)
    "selective_scan_fn fwd+bwd": (2, 18),
    "selective_state_update": (1, 1),
    # (chunk engine forward: one 1-element dummy pointer shared by its output stage's absent
    # operands since the kept-states change, (2, 11) and (6, 23) before; the backward recomputes
    # h: SAVE_STATES=2 keeps it, see PINNED_KEEP)
    "chunk_simple_gla fwd": (2, 6),
    "chunk_simple_gla fwd+bwd": (6, 12),
    "chunk_linear_attn fwd": (2, 3),
    "chunk_linear_attn fwd+bwd": (6, 9),
    # normalize=True (the default): the engine's two launches + `_Normalize` (one node), whose
    # torch ops (7 forward, ~15 backward kernels) are one Triton launch each way since host8
    # (triton.normalize_fwd / _bwd; (2, 9) / (6, 30) before, FUSED_NORMALIZE=0 gives them back)
    "chunk_linear_attn normalize fwd": (3, 5),
    "chunk_linear_attn normalize fwd+bwd": (8, 19),
    # chunk_gla: the chunk-local cumsum of the per-key decays is its own launch (every later
    # stage loads it instead of re-summing g); backward: cumsum, states, state gradients, scores,
    # dv, dq/dk/dg; each tree kernel is launched twice (gla.TREE_SPLIT: fast-path programs, then
    # the rest): fwd cumsum, states, 2 x scores, output (gla.FUSED_FWD=True: 2 x scores+output,
    # (4, 9), slower on the H100); bwd cumsum, states, state grads, 2 x scores, dv, 2 x dq/dk/dg.
    # TREE=False: (4, 12) and (10, 26). With gradients the forward keeps Gc for the backward
    # (common.SAVE_STATES=1, the default: it replaces g among the saved tensors): no cumsum
    # launch and no Gc buffer in the backward, (13, 26) before
    "chunk_gla fwd": (5, 7),
    "chunk_gla fwd+bwd": (12, 13),
    # SSD (float32: the per-chunk-state path under FUSED_FWD 0 or 1; D and z in `_output_kernel`'s
    # epilogue: (2, 17) before, when that path's D / z were torch ops mul, add, silu, mul).
    # Forward: A <= 0 check (gt, any, item), dt bias + softplus (add, softplus), chunk_fwd's h,
    # ht, o and four 1-element dummies (new_empty x 6, empty_like; one dummy fewer since the
    # kept-states change, (2, 13) before); launches: states, output
    "mamba_chunk_scan_combined fwd (D, z)": (2, 8),
    # with gradients D goes into the op (epilogue + dD in the backward), z stays a torch op: the
    # forward above + silu, mul (z gate); backward: the gate's mul, chunk_bwd's 14 buffers and
    # dummies, dD = sum of per-chunk partials (sum), ddt += dg A (addcmul), dA = sum dg dt (mul,
    # sum), the empty dh0 (new_empty), softplus_backward; launches: the forward's 2, then states
    # (recomputed), state grads, dv, dq/dk
    # (39 torch ops before: the per-chunk path's D was mul, add after the kernel; 37 before the
    # forward's shared dummy; 36 before ddt += dg A became one addcmul)
    "mamba_chunk_scan_combined fwd+bwd (D, z)": (6, 24),
    # the chunked WY path (default): WY stage, state scan, output; checks (gt, any, item, aminmax
    # and its two items: beta's range) and the buffers plus one 1-element dummy per launch
    "chunk_gated_delta_rule fwd": (3, 10),
    "fused_recurrent_gated_delta_rule decode": (1, 7),
    # float32 (session 10 default): the monarch16 split-product forward (y only), the cuFFT
    # backward (MERGED_INVERSE: its two inverse transforms in one call; FUSED_DK_EPILOGUE: its
    # du and dk epilogues in one launch, 5 launches with it off)
    "fft_conv fwd": (1, 1),
    "fft_conv fwd+bwd": (4, 7),
    # 16-bit storage: monarch16 (one kernel per pass; cached DFT and filter tables). Forward:
    # y; backward: du, the dk-spectrum buffer, dD partials, dk
    "fft_conv bf16 fwd": (1, 1),
    "fft_conv bf16 fwd+bwd": (2, 5),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_launches_and_glue_are_pinned(name, stubbed_launches):
    launches, work = _count(_cases()[name], stubbed_launches)
    assert (launches, len(work)) == PINNED[name], f"{name}: {launches} launches, torch ops {work}"


# common.SAVE_STATES=2 (the forward keeps every chunk's state h for the backward): the backward's
# state pass is gone: one launch and four torch ops fewer than PINNED (its h, ht buffers and its
# two 1-element dummy pointers; chunk_gla's Gc is kept as with the default 1). The forward's h
# is the same buffer, kept instead of freed.
PINNED_KEEP = {
    "chunk_simple_gla fwd+bwd": (5, 12),
    "chunk_gla fwd+bwd": (11, 14),
    "mamba_chunk_scan_combined fwd+bwd (D, z)": (5, 24),
}


@pytest.mark.parametrize("name", sorted(PINNED_KEEP))
def test_kept_states_launches_are_pinned(name, stubbed_launches, monkeypatch):
    from ssm_kernels.chunk import common
    monkeypatch.setattr(common, "SAVE_STATES", 2)
    launches, work = _count(_cases()[name], stubbed_launches)
    assert (launches, len(work)) == PINNED_KEEP[name], f"{name}: {launches} launches, torch ops {work}"
    inference = name.replace("fwd+bwd", "fwd")           # no gradient: nothing kept, no change
    assert _count(_cases()[inference], stubbed_launches)[0] == PINNED[inference][0]
    assert len(_count(_cases()[inference], stubbed_launches)[1]) == PINNED[inference][1]


# float32 with MONARCH16_F32 off: the cuFFT path both ways (absent operands pass an existing
# pointer, no allocation; no empty gradients for absent inputs in eager backward)
CUFFT_F32_PINNED = {"fft_conv fwd": (3, 4), "fft_conv fwd+bwd": (6, 10)}   # (7, 10): 2 epilogues


@pytest.mark.parametrize("name", sorted(CUFFT_F32_PINNED))
def test_fft_conv_cufft_path_pinned(name, stubbed_launches, monkeypatch):
    from ssm_kernels.fft_conv import interface
    monkeypatch.setattr(interface, "MONARCH16_F32", False)
    launches, work = _count(_cases()[name], stubbed_launches)
    assert (launches, len(work)) == CUFFT_F32_PINNED[name], f"{launches} launches, torch ops {work}"


def test_fft_conv_merged_inverse_pin(stubbed_launches, monkeypatch):
    """cufft.MERGED_INVERSE off (on by default since the GPU A/B, bench/gpu_fft_merged.py): the
    float32 backward's two inverse transforms are two calls and the dk-spectrum buffer its own
    allocation: two torch ops more per fwd+bwd on the cuFFT path (one _fft_c2c, one empty), same
    launches."""
    from ssm_kernels.fft_conv import cufft, interface
    monkeypatch.setattr(cufft, "MERGED_INVERSE", False)
    monkeypatch.setattr(interface, "MONARCH16_F32", False)
    launches, work = _count(_cases()["fft_conv fwd+bwd"], stubbed_launches)
    want = CUFFT_F32_PINNED["fft_conv fwd+bwd"]
    assert (launches, len(work)) == (want[0], want[1] + 2), f"{launches} launches, torch ops {work}"
    assert work.count("_fft_c2c") == 5


# torch ops that copy a value to the host or wait for the device (on a CUDA tensor each is a sync)
_SYNCING = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "_to_cpu", "tolist",
            "allclose", "_assert_async"}


@pytest.mark.parametrize("name,f32_monarch", [("fft_conv fwd+bwd", True), ("fft_conv fwd+bwd", False),
                                              ("fft_conv bf16 fwd+bwd", True)])
def test_fft_conv_steady_state_has_no_sync_and_no_filter_transform(name, f32_monarch,
                                                                   stubbed_launches, monkeypatch):
    """issue 8 (session 10: the H100's eager fp32 f+b 631 us against 29 us of GPU work): the
    default fwd+bwd of fft_conv, three successive calls, each the same launches, no op that
    synchronises with the device (item / nonzero / host copies), no device placement other than
    the inputs', and no transform of the filter (the spectrum cache serves the backward too: a
    miss there costs an rfft, its plan lookup and an allocation per call on autograd's thread).
    float32: the default (monarch16 split-product forward, cuFFT backward) and the cuFFT path
    both ways (MONARCH16_F32 off)."""
    from ssm_kernels.fft_conv import interface
    monkeypatch.setattr(interface, "MONARCH16_F32", f32_monarch)
    fn = _cases()[name]
    fn()
    seqs = []
    for _ in range(3):
        stubbed_launches.clear()
        with _CountOps() as mode:
            fn()
        seqs.append((list(stubbed_launches), list(mode.ops)))
        assert not _SYNCING & set(mode.ops), mode.ops
        assert "_fft_r2c" not in mode.ops and "fft_rfft" not in mode.ops, mode.ops
    assert seqs[0] == seqs[1] == seqs[2]


def test_fft_conv_fused_dk_epilogue_pin(stubbed_launches, monkeypatch):
    """cufft.FUSED_DK_EPILOGUE (default on): the float32 backward's du and dk epilogues are one
    launch (the fused kernel, not the two); off: one launch more, the same torch ops. The
    backward runs on autograd's device thread on the GPU, where a launch costs the most."""
    from ssm_kernels.fft_conv import cufft
    launches, work = _count(_cases()["fft_conv fwd+bwd"], stubbed_launches)
    assert stubbed_launches.count("_epi_bwd_dk_kernel") == 1
    assert "_epi_bwd_kernel" not in stubbed_launches and "_epi_dk_kernel" not in stubbed_launches
    monkeypatch.setattr(cufft, "FUSED_DK_EPILOGUE", False)
    launches_off, work_off = _count(_cases()["fft_conv fwd+bwd"], stubbed_launches)
    assert (launches_off, len(work_off)) == (launches + 1, len(work))
    assert "_epi_bwd_dk_kernel" not in stubbed_launches


@pytest.fixture
def group_of_one(tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


# Context parallelism. A group of one is the plain call exactly (the gather is the identity): the
# shortcut in the CP wrappers skips the collective, the autograd node and the CP wrapper's early
# validation, so its extra is 0 (was 9-17 torch ops before the shortcut). The first rank of a real
# group (simulated: a group of one with core._FORCE_EXCHANGE) launches the plain call's kernels and
# (torch ops) adds the exchange: forward new_empty + copy_ (pack) + new_empty + all_gather; backward
# the same plus the zeros of an unused final state's gradient. CPU tensors add the cross-rank shape
# check (tensor, new_empty, all_gather, unbind, equal), a value check like the others.
CP_FIRST_RANK_EXTRA = {
    # + 1: the segment's final state hT (the exchange needs it; the plain call without
    # output_final_state allocates none since lscanhost7); the first rank has no initial state,
    # so its backward allocates no dh0, as the plain call
    "linear_scan fwd": 5 + 4 + 1,
    "linear_scan fwd+bwd": 5 + 4 + 5 + 1,
    "chunk_simple_gla fwd": 5 + 4 + 3,        # + the CP wrapper's early validation (gt, any, item)
    "chunk_simple_gla fwd+bwd": 5 + 4 + 5 + 3,
    "chunk_linear_attn fwd": 5 + 4,           # no decay, no early value check
    "chunk_linear_attn fwd+bwd": 5 + 4 + 5,
    # two states (S, z): one copy_ more per pack; no early value check (no decays); the CP path
    # runs the public normalize=True call (it ran hand-written torch ops before)
    "chunk_linear_attn normalize fwd": 5 + 5,
    "chunk_linear_attn normalize fwd+bwd": 5 + 5 + 6,
    # + the CP wrapper's early validation: g <= 0 (gt, any, item) and beta in [0, 2] (aminmax,
    # 2 items); the [K, K] decay is not sent by the first rank (nobody reads it)
    "chunk_gated_delta_rule fwd": 5 + 4 + 6,
}


@pytest.mark.parametrize("name", sorted(CP_FIRST_RANK_EXTRA))
def test_cp_group_of_one_is_the_plain_call(name, stubbed_launches, group_of_one):
    """A context-parallel group of one launches and runs exactly what the plain call does."""
    launches, work = _count(_cases(group_of_one)[name], stubbed_launches)
    assert (launches, len(work)) == PINNED[name], f"{name}: {launches} launches, torch ops {work}"


@pytest.mark.parametrize("name", sorted(CP_FIRST_RANK_EXTRA))
def test_cp_first_rank_runs_only_the_plain_call(name, stubbed_launches, group_of_one, monkeypatch):
    """The first rank of a context-parallel group launches what the plain call launches (no
    decay product, no second pass, no private graph) plus one all_gather each way."""
    from ssm_kernels.distributed import core
    monkeypatch.setattr(core, "_FORCE_EXCHANGE", True)
    cp = _cases(group_of_one)[name]
    launches, work = _count(cp, stubbed_launches)
    want = PINNED[name]
    assert launches == want[0], f"{name}: {launches} launches with process_group, {want[0]} without"
    assert len(work) == want[1] + CP_FIRST_RANK_EXTRA[name], f"{name}: torch ops {work}"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_parameters_get_gradients_through_the_eager_path(backend):
    """nn.Parameter is a tensor subclass: the fast path must still see that it needs a gradient,
    whether it is the first argument or not."""
    a = torch.nn.Parameter(torch.rand(2, 9, 3))
    b = torch.randn(2, 9, 3)
    sk.linear_scan(a, b, backend=backend).sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()
    k = torch.nn.Parameter(torch.randn(4, 16))
    sk.fft_conv(torch.randn(2, 4, 16), k, backend=backend).sum().backward()
    assert k.grad is not None and k.grad.abs().sum() > 0


class _ListExtension:
    """ssm_kernels._C's selective scan computed by the reference, returning lists as the real
    pybind binding (std::vector) does: the CPU stand-in for the GPU's default path."""
    @staticmethod
    def selective_scan_fwd(u, delta, A, B, C, D, z, bias, h0, cu, offs, softplus, ck_len, rows):
        from ssm_kernels.selective_scan.reference import selective_scan_fwd_ref
        return list(selective_scan_fwd_ref(u, delta, A, B, C, D, z, bias, h0, cu, softplus, True))

    @staticmethod
    def selective_scan_bwd(u, delta, A, B, C, D, z, bias, cu, offs, ckpt, dout, dlast, softplus,
                           ck_len, want_dh0):
        from ssm_kernels.selective_scan.reference import selective_scan_bwd_ref
        g = selective_scan_bwd_ref(u, delta, A, B, C, D, z, bias, None, cu, softplus, dout, dlast)
        return [u.new_empty((0,)) if x is None else x for x in g]


def test_selective_scan_cuda_host_path_is_differentiable(monkeypatch):
    """The CUDA backend's host path (memoised plans, eager backward) with an extension that
    returns lists: the output has a grad_fn and the gradients are the reference backend's
    (a list returned from an autograd.Function's forward silently dropped them on the GPU)."""
    from ssm_kernels import _backend
    from ssm_kernels.selective_scan import interface as si
    monkeypatch.setattr(_backend, "_cuda_ext", _ListExtension())
    monkeypatch.setattr(_backend, "_cuda_ext_tried", True)
    monkeypatch.setattr(_backend, "_cuda_ext_error", None)
    monkeypatch.setattr(_backend, "cuda_reason", lambda device: None)
    memos = (si._fwd_impl.cache, si._bwd_impl.cache, si._select_bwd.cache, si._checked)
    for m in memos:
        m.clear()
    try:
        gen = torch.Generator().manual_seed(3)
        u, dt, z = (torch.randn(2, 6, 20, generator=gen) for _ in range(3))
        A = -torch.rand(6, 4, generator=gen)
        Bm, Cm = torch.randn(2, 4, 20, generator=gen), torch.randn(2, 4, 20, generator=gen)
        D, bias = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
        ins = (u, dt, A, Bm, Cm, D, z, bias)
        grads = {}
        for backend in ("cuda", "reference"):
            sk.selective_scan_fn(*ins, True, backend=backend)   # a no-grad call first (memos)
            leaves = [t.clone().requires_grad_() for t in ins]
            out, last = sk.selective_scan_fn(*leaves, True, True, backend=backend)
            assert out.grad_fn is not None and last.grad_fn is not None, backend
            (out.sum() + last.square().sum()).backward()
            grads[backend] = [t.grad for t in leaves]
        for name, a, b in zip("u dt A B C D z bias".split(), grads["cuda"], grads["reference"]):
            torch.testing.assert_close(a, b, msg=name)
    finally:
        for m in memos:
            m.clear()


def test_value_checks_name_the_argument_on_cpu():
    q = k = v = torch.randn(1, 8, 1, 4)
    with pytest.raises(ValueError, match="chunk_simple_gla: g holds log-decays and must be <= 0"):
        sk.chunk_simple_gla(q, k, v, torch.rand(1, 8, 1) + 0.1)
    with pytest.raises(ValueError, match="chunk_simple_gla: g_gamma holds log-decays"):
        sk.chunk_simple_gla(q, k, v, g_gamma=torch.tensor([0.5]))
    with pytest.raises(ValueError, match="cu_seqlens must start at 0, end at T=8"):
        sk.chunk_linear_attn(q, k, v, cu_seqlens=torch.tensor([0, 5, 3, 8]))


def test_memoised_checks_keep_value_checks_and_errors():
    """The argument checks are memoised on metadata (`_ops.cached_on_metadata`): a call with the
    metadata of an earlier valid call skips them, but value checks still run on every call, a
    failing call raises again, and other metadata (shape, dtype, device, a Parameter) re-checks."""
    from ssm_kernels._ops import cached_on_metadata
    seen = []

    @cached_on_metadata(typed=True)
    def check(x, n):
        seen.append(n)
        if x.shape[0] != n:
            raise ValueError(f"x must have {n} rows")
        return x.shape[0]

    x = torch.zeros(3, 2)
    assert check(x, 3) == 3 and check(torch.ones(3, 2), 3) == 3 and seen == [3]   # memo hit
    for _ in range(2):   # errors are never memoised
        with pytest.raises(ValueError, match="x must have 4 rows"):
            check(x, 4)
    assert seen == [3, 4, 4]
    check(x.double(), 3), check(torch.nn.Parameter(x), 3), check(torch.zeros(3, 5), 3)
    assert seen == [3, 4, 4, 3, 3, 3]

    @cached_on_metadata
    def length(x):
        seen.append(x)
        return len(x)
    assert length([1, 2, 3]) == 3 and length([1, 2, 3]) == 3 and len(seen) == 8   # unhashable

    @cached_on_metadata(typed=True)
    def count(n):
        if isinstance(n, bool):
            raise TypeError("n must be an int, not a bool")
        return n
    assert count(1) == 1
    with pytest.raises(TypeError, match="not a bool"):   # typed: True (== 1, same hash) re-checks
        count(True)
    # through the public functions: same metadata, bad values -> the value checks still raise
    q = k = v = torch.randn(1, 8, 1, 4)
    g = -torch.rand(1, 8, 1)
    sk.chunk_simple_gla(q, k, v, g)
    with pytest.raises(ValueError, match="chunk_simple_gla: g holds log-decays and must be <= 0"):
        sk.chunk_simple_gla(q, k, v, -g)
    cu = torch.tensor([0, 3, 8])
    sk.chunk_linear_attn(q, k, v, cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0, end at T=8"):
        sk.chunk_linear_attn(q, k, v, cu_seqlens=torch.tensor([0, 9, 8]))
    beta = torch.rand(1, 8, 1)
    sk.chunk_gated_delta_rule(q, k, v, g, beta)
    with pytest.raises(ValueError, match="beta must lie in"):
        sk.chunk_gated_delta_rule(q, k, v, g, beta + 2.5)
    with pytest.raises(ValueError, match="g holds log-decays"):
        sk.chunk_gated_delta_rule(q, k, v, -g, beta)
    u, kf = torch.randn(2, 4, 16), torch.randn(4, 16)
    sk.fft_conv(u, kf)
    with pytest.raises(ValueError, match="k must have shape"):
        sk.fft_conv(u, torch.randn(5, 16))


def test_workspace_views_and_shared_dummies(stubbed_launches, monkeypatch):
    """common.workspace: one allocation, views 16-byte aligned (Triton's pointer specialisation),
    disjoint, contiguous, of the asked shapes / dtypes; common.dummy: one tensor per (device,
    dtype), not an inference tensor even when first asked for under inference_mode (views of it
    are saved for backward); HOST_POOL off restores the separate allocations (the old pins)."""
    from ssm_kernels.chunk import common
    specs = (((3, 5), torch.bfloat16), ((7,), torch.float32), ((2, 2, 3), torch.bfloat16),
             ((1,), torch.float32))
    like = torch.empty(1)
    with _CountOps() as mode:
        ws = common.workspace(like, specs)
    assert [op for op in mode.ops if op not in _VIEWS] == ["new_empty"]
    spans = []
    for t, (shape, dt) in zip(ws, specs):
        assert t.shape == shape and t.dtype == dt and t.is_contiguous()
        assert t.data_ptr() % 16 == 0
        spans.append((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    monkeypatch.setattr(common, "_DUMMIES", {})
    with torch.inference_mode():
        d = common.dummy(torch.empty(2, dtype=torch.float16))
    assert not d.is_inference() and d.dtype == torch.float16 and d.numel() == 1
    assert common.dummy(torch.empty(3, dtype=torch.float16)) is d
    assert common.dummy(torch.empty(3)) is not d
    monkeypatch.setattr(common, "HOST_POOL", False)
    assert common.dummy(torch.empty(3, dtype=torch.float16)) is not d
    launches, work = _count(_cases()["chunk_simple_gla fwd+bwd"], stubbed_launches)
    assert (launches, len(work)) == (6, 22), work     # the pin before alloc7


def test_linear_scan_skip_unread_knob_pin(stubbed_launches, monkeypatch):
    """linear_scan's SKIP_UNREAD off (SSM_KERNELS_LSCAN_SKIP_UNREAD=0, the GPU A/B of
    bench/gpu_host.py --launches): the full ops as before lscanhost7, hT and dh0 allocated
    though nobody reads them: one torch op more forward, two more forward+backward."""
    from ssm_kernels.linear_scan import interface
    monkeypatch.setattr(interface, "SKIP_UNREAD", False)
    for name, extra in (("linear_scan fwd", 1), ("linear_scan fwd+bwd", 2)):
        launches, work = _count(_cases()[name], stubbed_launches)
        want = PINNED[name]
        assert (launches, len(work)) == (want[0], want[1] + extra), f"{name}: {launches}, {work}"


def test_fused_normalize_knob_pin(stubbed_launches, monkeypatch):
    """chunk_linear_attn's FUSED_NORMALIZE off (SSM_KERNELS_FUSED_NORMALIZE=0, the GPU A/B of
    bench/gpu_host.py --launches): `_Normalize`'s torch ops as before host8, one launch fewer
    each way."""
    from ssm_kernels.linear_attn import interface
    monkeypatch.setattr(interface, "FUSED_NORMALIZE", False)
    for name, want in (("chunk_linear_attn normalize fwd", (2, 9)),
                       ("chunk_linear_attn normalize fwd+bwd", (6, 30))):
        launches, work = _count(_cases()[name], stubbed_launches)
        assert (launches, len(work)) == want, f"{name}: {launches}, {work}"
