// linear_scan CUDA kernels: h_t = a_t * h_{t-1} + b_t over independent channels. No torch headers.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

#include "common/dtype.cuh"

namespace ssm {

// Canonical view: element (o, t, c) at o*s_o + t*s_t + c*s_c (elements, int64). States [O, C] fp32.
struct LinearScanParams {
  // forward: coef = a, value = b, out = h, out2 unused, carry_in = h0 (nullable), state_out = hT
  // backward: coef = a, value = dh, h = saved output, h0 = initial state (nullable),
  //           carry_in = dhT, out = db, out2 = da, state_out = dh0
  const void* coef = nullptr;
  const void* value = nullptr;
  const void* h = nullptr;
  const float* h0 = nullptr;
  const float* carry_in = nullptr;
  void* out = nullptr;
  void* out2 = nullptr;
  float* state_out = nullptr;
  int64_t O = 0, T = 0, C = 0;
  int64_t s_o = 0, s_t = 0, s_c = 0;
  bool reverse = false;  // the forward op scans right to left
};

// Return cudaSuccess or the launch error.
cudaError_t linear_scan_fwd_cuda(const LinearScanParams& p, DType dtype, cudaStream_t stream);
cudaError_t linear_scan_bwd_cuda(const LinearScanParams& p, DType dtype, cudaStream_t stream);

}  // namespace ssm
