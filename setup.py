"""Builds ssm_kernels; the CUDA extension ssm_kernels._C only where it can.

SSM_KERNELS_BUILD_CUDA=1 forces the extension (fails loudly if it cannot be built), =0 skips it;
unset, it is built when torch (visible to the build: use --no-build-isolation) has CUDA and nvcc
is found. Target architectures come from TORCH_CUDA_ARCH_LIST (e.g. "9.0"); MAX_JOBS bounds ninja.
"""
import glob
import os

from setuptools import setup


def _cuda_extension():
    mode = os.environ.get("SSM_KERNELS_BUILD_CUDA", "auto").lower()
    if mode in ("0", "false", "no", "off"):
        return None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if mode in ("1", "true", "yes", "on"):
            raise RuntimeError("SSM_KERNELS_BUILD_CUDA=1 but torch is not importable in the build "
                               "environment; install with --no-build-isolation")
        return None
    if torch.version.cuda is None or CUDA_HOME is None:
        if mode in ("1", "true", "yes", "on"):
            raise RuntimeError(f"SSM_KERNELS_BUILD_CUDA=1 but torch.version.cuda={torch.version.cuda} "
                               f"and CUDA_HOME={CUDA_HOME}")
        return None
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    sources.append(os.path.join("csrc", "bindings.cpp"))
    nvcc_flags = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
                  "--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__",
                  "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__",
                  "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    ext = CUDAExtension(
        name="ssm_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": nvcc_flags},
    )
    return ext, BuildExtension


ext = _cuda_extension()
if ext is None:
    setup()
else:
    setup(ext_modules=[ext[0]], cmdclass={"build_ext": ext[1].with_options(use_ninja=True)})
