"""monarch16's row-blocked kernels (KBLOCK / KBLOCK_BWD) and the SPLIT override, against float64:
every output and gradient (y, du, dk, dD, dpre, dpost), L up to 4096 (N = 8192), H not a multiple
of 16, odd B, slices (S > 1), extreme scales, determinism. Every launch is checked to take the
blocked variant (BJ > 0), so a pass means the blocked code computed everything."""
import pytest
import torch

from ssm_kernels.fft_conv import interface as fft_interface
from ssm_kernels.fft_conv import monarch16 as fft_m16
from ssm_kernels.fft_conv.interface import fft_conv_bwd_op
from ssm_kernels.fft_conv.reference import fft_conv_direct, fft_conv_ref
from ssm_kernels.testing import assert_close

from conftest import DEVICE, kernel_backends
from test_fft_conv import NAMES, backward_scaling_check, check, check_gpu, make, run

SIZES = (256, 512, 1024, 2048, 4096, 8192)


class _RequireBlocks:
    """Wraps a monarch16 kernel: every launch must pass BJ > 0 (the row-blocked variant)."""
    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kw):
            assert kw["BJ"] > 0, f"unblocked launch (N1 = {kw['N1']}) while KBLOCK asked for blocks"
            self.launches += 1
            return self.kernel[grid](*args, **kw)
        return launch


@pytest.fixture(autouse=True)
def nan_outputs(monkeypatch):
    monkeypatch.setattr(fft_m16, "FILL_NAN", True)
    monkeypatch.setattr(fft_interface, "FORCE_PATH", "monarch16")


def _blocked(monkeypatch, frac=2, split=None, fwd=True, bwd=True):
    """KBLOCK / KBLOCK_BWD = N1 / frac at every N where that is >= 16 (and < N1); the unblocked
    kernels refuse to launch where a block applies. split: SPLIT entries."""
    sp = dict(split or {})
    monkeypatch.setattr(fft_m16, "SPLIT", sp)
    table = {}
    for n in SIZES:
        n1 = sp.get(n, fft_m16.split(n))[0]
        if n1 // frac >= 16:
            table[n] = n1 // frac
    monkeypatch.setattr(fft_m16, "KBLOCK", dict(table) if fwd else {})
    monkeypatch.setattr(fft_m16, "KBLOCK_BWD", dict(table) if bwd else {})
    for on, name in ((fwd, "_monarch16_fwd_kernel"), (bwd, "_monarch16_bwd_kernel")):
        if on:
            monkeypatch.setattr(fft_m16, name, _RequireBlocks(getattr(fft_m16, name)))
    return table


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,L,Lk,frac", [
    (3, 5, 255, 200, 2),     # N = 512 (32 x 16), R1 = 16, BJ = 16: two blocks, odd B, H = 5
    (4, 17, 300, 211, 2),    # N = 512, L > N / 2: R1 = N1 (full first / last product)
    (2, 3, 1024, 1024, 2),   # N = 2048 (64 x 32), BJ = 32
    (2, 3, 1024, 1024, 4),   # BJ = 16: four blocks
    (2, 3, 2048, 2048, 2),   # N = 4096 (64 x 64), BJ = 32
    (3, 3, 4096, 4096, 2),   # N = 8192 (128 x 64), BJ = 64 (the GPU's case), odd B
    (2, 3, 4096, 1000, 4),   # N = 8192, BJ = 32, short filter
])
def test_blocked_matches_oracle(backend, dtype, B, H, L, Lk, frac, monkeypatch):
    table = _blocked(monkeypatch, frac)
    assert table.get(fft_m16.transform_size(L, Lk))
    check(backend, B, H, L, Lk, dtype, oracle=fft_conv_direct)
    assert fft_m16._monarch16_fwd_kernel.launches == 1
    assert fft_m16._monarch16_bwd_kernel.launches == 1


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("D,pre,post", [(False, False, False), (True, False, True),
                                        (False, True, False), (True, True, False)])
def test_blocked_features(backend, D, pre, post, monkeypatch):
    _blocked(monkeypatch)
    check(backend, 3, 2, 300, 250, torch.float16, D=D, pre=pre, post=post)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("fwd,bwd", [(True, False), (False, True)])
def test_blocked_one_pass(backend, fwd, bwd, monkeypatch):
    """Only one pass blocked (the knobs are separate): autograd mixes the two kernels."""
    _blocked(monkeypatch, fwd=fwd, bwd=bwd)
    check(backend, 3, 5, 255, 200, torch.bfloat16)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("B,H,L,Lk,split,frac", [
    (2, 3, 400, 400, {1024: (64, 16)}, 2),     # N = 1024 as 64 x 16 (default 32 x 32), BJ = 32
    (2, 3, 400, 400, {1024: (64, 16)}, 1),     # the same split, unblocked kernels
    (2, 3, 2048, 2048, {4096: (128, 32)}, 2),  # N = 4096 as 128 x 32, R1 = 64, BJ = 64
    (2, 3, 2048, 2048, {4096: (128, 32)}, 4),  # BJ = 32
    (2, 5, 2048, 2048, {4096: (128, 32)}, 1),  # 128 x 32 unblocked
])
def test_split_override(backend, B, H, L, Lk, split, frac, monkeypatch):
    if frac == 1:
        monkeypatch.setattr(fft_m16, "SPLIT", dict(split))
    else:
        _blocked(monkeypatch, frac, split=split)
    n = fft_m16.transform_size(L, Lk)
    assert fft_m16._plan(B, H, L, Lk, torch.device(DEVICE), False)[1:3] == split[n]
    check(backend, B, H, L, Lk, torch.bfloat16, oracle=fft_conv_direct)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("uscale,kscale,gscale", [(3e4, 1.0, 1.0), (1e-5, 1.0, 1.0),
                                                  (1.0, 1e-6, 1.0), (1.0, 1.0, 3e3)])
def test_blocked_backward_scaling(backend, uscale, kscale, gscale, monkeypatch):
    """As test_monarch16_backward_scaling, blocked (N = 512, BJ = 16): rows of a pair 100x apart
    in u and 1e3x apart (opposite direction) in dy; du / dpre / dpost judged row by row."""
    _blocked(monkeypatch)
    backward_scaling_check(backend, uscale, kscale, gscale)


@pytest.mark.parametrize("backend", kernel_backends())
def test_blocked_slices_deterministic(backend, monkeypatch):
    """H = 1: the batch splits into slices (FINAL = 0, dk summed on the host); bitwise repeatable;
    dD bitwise equal to the unblocked kernel's (same per-pair sums)."""
    u, k, D, pg, qg = make(5, 1, 255, 200, torch.float16)
    dy = torch.randn_like(u)
    plain = fft_conv_bwd_op(dy, u, k, D, pg, qg, backend)
    _blocked(monkeypatch)
    assert fft_m16._plan(5, 1, 255, 200, torch.device(DEVICE), True)[4] > 1   # S > 1
    a = fft_conv_bwd_op(dy, u, k, D, pg, qg, backend)
    b = fft_conv_bwd_op(dy, u, k, D, pg, qg, backend)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert torch.equal(a[2], plain[2])
    hi = run(fft_conv_direct, *(x.double() for x in (u, k, D, pg, qg)), dy.double())
    lowp = run(fft_conv_ref, u, k, D, pg, qg, dy)
    for j, name in enumerate(NAMES[1:]):
        assert_close(a[j], hi[j + 1], dtype=torch.float16, lowp_ref=lowp[j + 1], name=name)


def test_knob_validation(monkeypatch):
    dev = torch.device("cpu")
    monkeypatch.setattr(fft_m16, "KBLOCK", {512: 24})
    with pytest.raises(ValueError, match="KBLOCK"):
        fft_m16._plan(2, 3, 255, 200, dev, False)
    monkeypatch.setattr(fft_m16, "KBLOCK", {512: 32})     # >= N1 = 32: unblocked
    assert fft_m16._plan(2, 3, 255, 200, dev, False)[-1] == 0
    monkeypatch.setattr(fft_m16, "KBLOCK", {512: 16})
    assert fft_m16._plan(2, 3, 255, 200, dev, False)[-1] == 16
    assert fft_m16._plan(2, 3, 255, 200, dev, True)[-1] == 0  # the backward has its own knob
    monkeypatch.setattr(fft_m16, "SPLIT", {512: (64, 4)})
    with pytest.raises(ValueError, match="SPLIT"):
        fft_m16._plan(2, 3, 255, 200, dev, False)


@pytest.mark.gpu
@pytest.mark.parametrize("L,Lk,bj", [(4096, 4096, 16), (4096, 4096, 32), (4096, 1000, 64),
                                     (2048, 2048, 32), (2048, 2048, 16)])
@pytest.mark.parametrize("gates", [False, True])
def test_gpu_blocked(L, Lk, bj, gates, monkeypatch):
    """Real sizes on the GPU (wgmma / mma.sync, round-to-nearest bf16): the blocked kernels at
    H = 300 (one program per channel: the in-kernel dk inverse), every gradient vs float64; the
    post-gated backward kept on monarch16."""
    n = fft_m16.transform_size(L, Lk)
    monkeypatch.setattr(fft_m16, "KBLOCK", {n: bj})
    monkeypatch.setattr(fft_m16, "KBLOCK_BWD", {n: bj})
    monkeypatch.setattr(fft_interface, "MONARCH16_BWD_CUFFT_POST_N", 1 << 30)
    check_gpu("triton", 3, 300, L, Lk, torch.bfloat16, D=gates, pre=gates, post=gates)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("frac", [1, 2])
def test_twiddle_from_t_is_bitwise_the_same(backend, frac, monkeypatch):
    """TWIDDLE_CONJ_COPY = False (the inverse's conj(T) from T's planes, conjugated in the
    product) gives bitwise the outputs and gradients of the conj(T) copy, blocked or not (N = 512,
    gates + D, slices and FINAL)."""
    if frac > 1:
        _blocked(monkeypatch, frac)
    for B, H in ((3, 5), (5, 1)):
        u, k, D, pg, qg = make(B, H, 255, 200, torch.bfloat16)
        dy = torch.randn_like(u)
        got = []
        for copy in (True, False):
            monkeypatch.setattr(fft_m16, "TWIDDLE_CONJ_COPY", copy)
            got.append([fft_m16.fft_conv_fwd(u, k, D, pg, qg)]
                       + list(fft_m16.fft_conv_bwd(dy, u, k, D, pg, qg)))
        for name, a, b in zip(NAMES, *got):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("bwd", [False, True])
def test_measured_defaults_per_length(bwd, monkeypatch):
    """The defaults are the session-8 H100 winners (bench/NOTES.md "fft8"): N = 4096 (L = 2048)
    row-blocked, BJ = 32 at 4 warps, in both passes; N = 8192 (L = 4096) unblocked at 8 warps
    (every blocked variant lost there); N = 2048 (L = 1024) unblocked at 4 warps. The GPU's launch
    options (not the interpreter's) are what is pinned."""
    monkeypatch.setattr(fft_m16, "triton_interpret", lambda: False)
    dev = torch.device("cpu")
    opts = lambda w: dict(num_warps=w, num_stages=1)  # noqa: E731
    for L, Lk, n1n2, r1, bj, warps in ((2048, 2048, (64, 64), 32, 32, 4),
                                       (2048, 700, (64, 64), 32, 32, 4),
                                       (2100, 50, (64, 64), 64, 32, 4),    # R1 = N1 at N = 4096
                                       (4096, 4096, (128, 64), 64, 0, 8),
                                       (1024, 1024, (64, 32), 32, 0, 4)):
        n, n1, n2, r1_, S, per, o, bj_ = fft_m16._plan(8, 768, L, Lk, dev, bwd)
        assert ((n1, n2), r1_, bj_, o) == (n1n2, r1, bj, opts(warps)), (L, Lk)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("L,Lk,gates", [(2048, 2048, False), (2100, 50, True)])
def test_default_length_2048_runs_blocked(backend, L, Lk, gates, monkeypatch):
    """With the default tables (no knob set) an L = 2048 call takes the row-blocked kernels in both
    passes and matches float64 (R1 = N1 / 2 and R1 = N1, gates + D)."""
    for name in ("_monarch16_fwd_kernel", "_monarch16_bwd_kernel"):
        monkeypatch.setattr(fft_m16, name, _RequireBlocks(getattr(fft_m16, name)))
    monkeypatch.setattr(fft_interface, "FORCE_PATH", None)
    check(backend, 2, 3, L, Lk, torch.bfloat16, oracle=fft_conv_direct, D=True, pre=gates, post=gates)
    assert fft_m16._monarch16_fwd_kernel.launches == 1
    assert fft_m16._monarch16_bwd_kernel.launches == 1


def test_split_with_blocks_refused_on_gpu(monkeypatch):
    """'split bj64' (N = 4096 as 128 x 32 with BJ = 64) faulted on the H100 (illegal address)
    while the interpreter's address check (tests/guard_zone.py) is clean: SPLIT + KBLOCK is refused
    on CUDA devices with a message naming the switch; each alone, CPU tensors, or the switch on
    still plan."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(fft_m16, "SPLIT", {4096: (128, 32)})
    monkeypatch.setattr(fft_m16, "KBLOCK", {4096: 64})
    monkeypatch.setattr(fft_m16, "KBLOCK_BWD", {})
    with pytest.raises(ValueError, match="SPLIT_BLOCKS_ON_GPU"):
        fft_m16._plan(4, 300, 2048, 2048, cuda, False)
    assert fft_m16._plan(4, 300, 2048, 2048, cuda, True)[1:3] == (128, 32)      # unblocked bwd
    assert fft_m16._plan(4, 300, 2048, 2048, torch.device("cpu"), False)[-1] == 64
    monkeypatch.setattr(fft_m16, "SPLIT_BLOCKS_ON_GPU", True)
    assert fft_m16._plan(4, 300, 2048, 2048, cuda, False)[-1] == 64             # knob state re-read
    monkeypatch.setattr(fft_m16, "SPLIT", {})
    monkeypatch.setattr(fft_m16, "SPLIT_BLOCKS_ON_GPU", False)
    assert fft_m16._plan(4, 300, 2048, 2048, cuda, False)[1:3] == (64, 64)


def test_split_bj64_guard_zone():
    """The address check behind the refusal above: N = 4096 as 128 x 32, BJ = 64, forward and
    backward (FINAL, D + gates), every active load / store inside an argument."""
    import os
    import sys
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("the address check patches Triton's interpreter")
    sys.path.insert(0, os.path.dirname(__file__))
    from guard_zone import checked_access
    import ssm_kernels as sk
    saved = (dict(fft_m16.SPLIT), dict(fft_m16.KBLOCK), dict(fft_m16.KBLOCK_BWD))
    fft_m16.SPLIT[4096] = (128, 32)
    fft_m16.KBLOCK[4096] = fft_m16.KBLOCK_BWD[4096] = 64
    try:
        u, k, D, pg, qg = (None if x is None else x.requires_grad_() for x in
                           make(4, 5, 2048, 2048, torch.bfloat16))
        with checked_access() as log:
            y = sk.fft_conv(u, k, D, pre_gate=pg, post_gate=qg, backend="triton")
            y.float().sum().backward()
        assert log.launches == ["_monarch16_fwd_kernel", "_monarch16_bwd_kernel"]
        log.assert_clean()
    finally:
        for d, old in zip((fft_m16.SPLIT, fft_m16.KBLOCK, fft_m16.KBLOCK_BWD), saved):
            d.clear()
            d.update(old)
