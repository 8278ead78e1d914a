"""compile_ahead: a no-op without a GPU; for sm_90 (offline stub driver) the dry run compiles every
kernel the call and its backward launch, so the real call that follows compiles none."""

import torch

import ssm_kernels as sk


def test_compile_ahead_does_nothing_on_cpu_and_leaves_inputs_alone():
    a = (torch.rand(2, 9, 3) * 0.5 + 0.5).requires_grad_()
    b = torch.randn(2, 9, 3).requires_grad_()
    before = (a.detach().clone(), b.detach().clone())
    res = sk.compile_ahead(sk.linear_scan, a, b, dim=1)
    assert res == {"kernels": 0, "errors": 0, "dry_run_error": None}
    assert a.grad is None and b.grad is None
    assert torch.equal(a.detach(), before[0]) and torch.equal(b.detach(), before[1])


# both scripts: the sm_90 stub driver, and n[0] counts Triton compiles
_COUNTING = r'''
import os, sys
sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
import torch
import sm90_audit as audit
audit.install()
import triton.compiler as tc
n = [0]
orig = tc.compile
def counted(*a, **k):
    n[0] += 1
    return orig(*a, **k)
tc.compile = counted
'''

_AHEAD_SCRIPT = _COUNTING + r'''
import ssm_kernels as sk
from ssm_kernels._warmup import compiling_ahead

def call():
    a = (torch.rand(2, 300, 64) * 0.5 + 0.5).to(torch.bfloat16).requires_grad_()
    b = torch.randn(2, 300, 64).to(torch.bfloat16).requires_grad_()
    h, hT = sk.linear_scan(a, b, dim=1, output_final_state=True, backend="triton")
    torch.autograd.grad(h.float().sum() + hT.float().sum(), (a, b))

with compiling_ahead(2) as info:
    call()
ahead = n[0]
call()
print("ahead", info["kernels"], ahead, "after", n[0] - ahead, "errors", info["errors"])
'''


def _stdout_words(script):
    """Run `script` from the repo root under the sm_90 stub; the words of its stdout."""
    from conftest import REPO_ROOT, compile_for_sm90
    res = compile_for_sm90(script, cwd=REPO_ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.split()


def _compile_counts(script):
    """(submitted, compiled ahead, compiled after, errors) from `script`'s last line."""
    words = _stdout_words(script)
    return tuple(int(words[i]) for i in (1, 2, 4, 6))


def test_compiling_ahead_compiles_everything_the_call_needs_for_sm90():
    submitted, compiled, after, errors = _compile_counts(_AHEAD_SCRIPT)
    assert compiled >= 2 and submitted >= compiled   # forward and backward kernels
    assert after == 0 and errors == 0                # the real call found them all


_DEVICE_THREAD_SCRIPT = _COUNTING + r'''
import _thread, threading
import ssm_kernels as sk
from ssm_kernels._warmup import compiling_ahead
where = []   # the thread of every compile
orig2 = tc.compile
def located(*a, **k):
    where.append(threading.current_thread().name)
    return orig2(*a, **k)
tc.compile = located

def forward():
    a = (torch.rand(2, 300, 64) * 0.5 + 0.5).to(torch.bfloat16).requires_grad_()
    b = torch.randn(2, 300, 64).to(torch.bfloat16).requires_grad_()
    h, hT = sk.linear_scan(a, b, dim=1, output_final_state=True, backend="triton")
    return h.float().sum() + hT.float().sum(), (a, b)

def backward_elsewhere(loss, leaves):
    # autograd runs a CUDA backward on its own device thread, one Python did not start; a CPU
    # backward started from such a thread runs on it, graph task and all: the same situation
    done, err = threading.Event(), []
    def job():
        try:
            torch.autograd.grad(loss, leaves)
        except BaseException as e:
            err.append(repr(e))
        finally:
            done.set()
    _thread.start_new_thread(job, ())
    done.wait()
    assert not err, err

with compiling_ahead(2) as info:
    backward_elsewhere(*forward())
ahead = n[0]
not_pool = sum(not w.startswith("ssm_kernels_compile") for w in where)
backward_elsewhere(*forward())
print("ahead", info["kernels"], ahead, "after", n[0] - ahead, "errors", info["errors"],
      "outside_pool", not_pool)
'''


def test_backward_on_autograds_device_thread_is_dry_run_too_for_sm90():
    """On a GPU autograd runs the backward on its own per-device thread: its launches must be
    submitted to the pool like the forward's, not compiled (and launched) there one by one."""
    words = _stdout_words(_DEVICE_THREAD_SCRIPT)
    submitted, compiled, after, errors, outside = (int(words[i]) for i in (1, 2, 4, 6, 8))
    assert outside == 0 and errors == 0 and after == 0
    assert submitted == compiled and compiled >= 3   # forward and backward kernels, all in the pool


_KEY_SCRIPT = _COUNTING + r'''
import functools, threading
import triton.runtime.cache as tcache
import ssm_kernels as sk
from ssm_kernels._warmup import compiling_ahead
hashed = []   # one entry per computation of Triton's version hash (sha256 of libtriton)
orig_key = tcache.triton_key.__wrapped__
def counted_key():
    hashed.append(threading.current_thread().name)
    return orig_key()
tcache.triton_key = functools.lru_cache()(counted_key)   # unlocked, like Triton's
with compiling_ahead(4) as info:
    a = (torch.rand(2, 300, 64) * 0.5 + 0.5).to(torch.bfloat16).requires_grad_()
    b = torch.randn(2, 300, 64).to(torch.bfloat16).requires_grad_()
    h, hT = sk.linear_scan(a, b, dim=1, output_final_state=True, backend="triton")
    torch.autograd.grad(h.float().sum() + hT.float().sum(), (a, b))
print("compiles", n[0], "hashed", len(hashed), "errors", info["errors"])
'''


def test_block_hashes_triton_once_for_sm90():
    """Triton's version hash (a sha256 of libtriton.so) is computed once per block, not by every
    compile that starts before the first has it (its lru_cache does not lock)."""
    words = _stdout_words(_KEY_SCRIPT)
    compiles, hashed, errors = int(words[1]), int(words[3]), int(words[5])
    assert compiles >= 3 and errors == 0
    assert hashed == 1


_CHECK_AHEAD_SCRIPT = _COUNTING + r'''
from ssm_kernels import _checks
torch.manual_seed(0)
info = _checks._compile_ahead("causal_conv1d", "triton", "cpu", False, 2)
ahead = n[0]
torch.manual_seed(0)

import importlib
importlib.import_module(_checks.FAMILIES["causal_conv1d"]).check("triton", "cpu", full=False)
print("ahead", info["kernels"], ahead, "after", n[0] - ahead, "errors", info["errors"])
'''


def test_check_dry_run_compiles_every_kernel_of_the_family_for_sm90():
    """`check`'s per-pair dry run (on a GPU) leaves nothing for the real run to compile."""
    submitted, compiled, after, errors = _compile_counts(_CHECK_AHEAD_SCRIPT)
    assert compiled >= 4 and submitted >= compiled
    assert after == 0 and errors == 0


_UNIT_AHEAD_SCRIPT = _COUNTING + r'''
from ssm_kernels import _checks
info = _checks._compile_ahead("causal_conv1d", "triton", "cpu", False, 2, seed=0, cases=(3, 4))
ahead = n[0]
res = _checks.run_family("causal_conv1d", "triton", "cpu", False, 0, (3, 4))
assert len(res.rows) == 12 and res.error is None, res.error
print("ahead", info["kernels"], ahead, "after", n[0] - ahead, "errors", info["errors"])
'''


def test_check_dry_run_of_a_unit_compiles_every_kernel_of_its_cases_for_sm90():
    """A unit's dry run (`check` cuts pairs into units of cases) covers exactly what its real
    run (`run_family` on those cases, seeded the same) compiles."""
    submitted, compiled, after, errors = _compile_counts(_UNIT_AHEAD_SCRIPT)
    assert compiled >= 2 and submitted >= compiled
    assert after == 0 and errors == 0


def test_spec_key_follows_do_not_specialize():
    """compile_ahead submits one compile per Triton specialisation: a `do_not_specialize` int
    (delta_rule's STORE_T) does not split the key, a specialised int does."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction   # not triton.jit: the suite may run interpreted
    from ssm_kernels._warmup import _spec_key

    def body(x_ptr, n, FLAG, B: tl.constexpr):
        pass
    k = JITFunction(body, do_not_specialize=["FLAG"])

    x = torch.zeros(4)
    assert _spec_key(k, (x, 5, 0), {"B": 4}) == _spec_key(k, (x, 5, 1), {"B": 4})
    assert _spec_key(k, (x, 5), {"FLAG": 0, "B": 4}) == _spec_key(k, (x, 5), {"FLAG": 1, "B": 4})
    assert _spec_key(k, (x, 5, 0), {"B": 4}) != _spec_key(k, (x, 16, 0), {"B": 4})
    assert _spec_key(k, (x, 5, 0), {"B": 4}) != _spec_key(k, (x, 5, 2 ** 40), {"B": 4})   # i64
    # runtime ints: only == 1, % 16 and the type count (T 2047 forward, 2047 - 64 elsewhere)
    assert _spec_key(k, (x, 5, 0), {"B": 4}) == _spec_key(k, (x, 7, 0), {"B": 4})
    assert _spec_key(k, (x, 5, 0), {"B": 4}) != _spec_key(k, (x, 1, 0), {"B": 4})
    assert _spec_key(k, (x, 32, 0), {"B": 4}) == _spec_key(k, (x, 48, 0), {"B": 4})
    # constexprs (positional or keyword) by value
    assert _spec_key(k, (x, 5, 0), {"B": 4}) != _spec_key(k, (x, 5, 0), {"B": 8})
    assert _spec_key(k, (x, 5, 0, 4), {}) != _spec_key(k, (x, 5, 0, 8), {})


def test_pool_job_loads_the_kernel_only_when_asked():
    """On a GPU the pool also does a kernel's first-launch work (launcher build, cubin load)."""
    from ssm_kernels._warmup import _compile_and_load

    class Kernel:
        loads = 0

        def _init_handles(self):
            self.loads += 1

    seen = []

    def run(fn, *args, grid, warmup, **kw):
        seen.append((fn, args, grid, warmup, kw))
        return Kernel()

    assert _compile_and_load(run, True, "fn", (1, 2), (3,), {"B": 4}).loads == 1
    assert _compile_and_load(run, False, "fn", (1, 2), (3,), {"B": 4}).loads == 0
    assert seen[0] == ("fn", (1, 2), (3,), True, {"B": 4})
    assert _compile_and_load(lambda *a, **k: None, True, "fn", (), (1,), {}) is None


_LAUNCHER_SCRIPT = r'''
import os, sys
sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
import torch
import sm90_audit as audit
audit.install()
from triton.runtime.jit import JITFunction
from ssm_kernels import _warmup
_warmup._find_c_launchers()
if not _warmup._C_LAUNCHERS:
    print("skip generic launcher")
    raise SystemExit(0)
from triton.backends.nvidia.driver import make_launcher
calls = []
stub_run = JITFunction.run
def run(self, *args, grid, warmup, **kwargs):
    kernel = stub_run(self, *args, grid=grid, warmup=warmup, **kwargs)
    calls.append((self, args, dict(kwargs), kernel))
    return kernel
JITFunction.run = run
import ssm_kernels as sk
q, k, v = (torch.randn(1, 100, 2, 64).to(torch.bfloat16).requires_grad_() for _ in range(3))
g = (-torch.rand(1, 100, 2) * 0.5).requires_grad_()
o, S = sk.chunk_simple_gla(q, k, v, g, output_final_state=True, backend="triton")
torch.autograd.grad(o.float().sum() + S.sum(), (q, k, v, g))
same = 0
for fn, args, kwargs, kernel in calls:
    src = kernel.src   # what CudaLauncher(src, metadata) builds from
    arg_idx = lambda x: (src.fn.arg_names.index(x), ) if isinstance(x, str) else x
    want = make_launcher({arg_idx(i): c for i, c in src.constants.items()}, dict(src.signature), None)
    got = _warmup._launcher_source(fn, args, kwargs)
    assert got == want, fn
    same += 1
print("same", same)
'''


def test_prebuilt_launcher_source_is_the_one_the_first_launch_builds():
    """Triton 3.6 (the GPU machine's): compile_ahead builds each kernel's C launcher concurrently
    with its compile; the source it derives from the call must be the one Triton's CudaLauncher
    then builds from the compiled kernel (else the gcc run is wasted). Skips on a generic launcher."""
    words = _stdout_words(_LAUNCHER_SCRIPT)
    if words[:1] == ["skip"]:
        import pytest
        pytest.skip("this Triton has a generic launcher")
    assert words[0] == "same" and int(words[1]) >= 4
