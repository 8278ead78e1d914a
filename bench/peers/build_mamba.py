"""Build mamba-ssm's selective_scan_cuda for sm_90 from its source archive (unpacked under .peers/),
so the benchmark can run it side by side. Output: BUILD_DIR/selective_scan_cuda*.so; put BUILD_DIR
and the source tree on PYTHONPATH. Usage: python bench/peers/build_mamba.py SRC_DIR BUILD_DIR"""
import glob
import os
import sys
import time

from torch.utils.cpp_extension import load

src, build = sys.argv[1], sys.argv[2]
os.makedirs(build, exist_ok=True)
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
files = [os.path.join(src, "csrc/selective_scan/selective_scan.cpp")]
files += sorted(glob.glob(os.path.join(src, "csrc/selective_scan/*.cu")))
t0 = time.time()
load(name="selective_scan_cuda", sources=files, build_directory=build, verbose=False,
     extra_include_paths=[os.path.join(src, "csrc/selective_scan")],
     extra_cflags=["-O3", "-std=c++17"],
     extra_cuda_cflags=["-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__",
                        "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__",
                        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_BFLOAT162_OPERATORS__",
                        "-U__CUDA_NO_BFLOAT162_CONVERSIONS__", "--expt-relaxed-constexpr",
                        "--expt-extended-lambda", "--use_fast_math", "-lineinfo", "--threads", "4"])
print(f"built selective_scan_cuda in {time.time() - t0:.0f} s")
