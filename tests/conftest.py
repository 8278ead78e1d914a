"""Test setup: without a GPU, Triton kernels run under the interpreter at small shapes."""
import os

import torch

if not torch.cuda.is_available():
    # must be set before triton.jit decorates any kernel (kernels are imported lazily)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"


def kernel_backends(with_cuda: bool = False):
    """Kernel backends that can run here: triton (GPU or interpreter), plus cuda when the op has a
    CUDA kernel (`with_cuda=True`) and the extension is built."""
    from ssm_kernels import available_backends
    return [b for b in available_backends(DEVICE) if b == "triton" or (with_cuda and b == "cuda")]


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compile_for_sm90(script: str, cwd=None):
    """Run `script` in a fresh Python without the interpreter (TRITON_INTERPRET is read when kernels
    are decorated) so it can build Triton kernels for sm_90 with no GPU (in folder `cwd`, e.g.
    REPO_ROOT for scripts that name repo paths); skip if Triton has no NVIDIA backend. Returns the
    finished subprocess (stdout, stderr, returncode)."""
    import subprocess
    import sys
    try:
        import triton.backends.nvidia  # noqa: F401
    except Exception:
        pytest.skip("Triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=600, cwd=cwd)


class CountLaunches:
    """Wraps a Triton kernel (`kernel[grid](...)` syntax) and counts its launches; `kw` holds the
    last launch's keyword arguments (constexprs, launch options)."""
    def __init__(self, kernel):
        self.kernel, self.launches, self.kw = kernel, 0, None

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.launches += 1
            self.kw = kw
            return self.kernel[grid](*args, **kw)
        return launch
