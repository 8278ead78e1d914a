// selective scan (Mamba-1) CUDA forward: h = exp(dt A) h + dt u B, y = C.h (+ D u) * silu(z).
// No torch headers. Real A only (complex A runs on the Triton backend).
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

#include "common/dtype.cuh"

namespace ssm {

struct SelectiveScanFwdParams {
  // (batch, dim, L) contiguous, storage dtype; z nullable
  const void* u = nullptr;
  const void* delta = nullptr;
  const void* z = nullptr;
  void* out = nullptr;
  const float* A = nullptr;           // (dim, N) float32
  // time-varying (batch, G, N, L) in the storage dtype, or time-invariant (dim, N) float32
  const void* B = nullptr;
  const void* C = nullptr;
  bool B_var = true, C_var = true;
  const float* D = nullptr;           // (dim,), nullable
  const float* delta_bias = nullptr;  // (dim,), nullable
  const float* h0 = nullptr;          // (nseq, dim, N), nullable
  float* last = nullptr;              // (nseq, dim, N)
  float* ckpt = nullptr;              // (rows, dim, N): the state entering every ck_len steps; nullable
  const int32_t* cu_seqlens = nullptr;  // (nseq + 1,), nullable: packed sequences, batch == 1
  const int32_t* ck_offsets = nullptr;  // (nseq,) first checkpoint row per packed sequence
  int64_t batch = 0, dim = 0, L = 0, N = 0, groups = 1, nseq = 0;
  int64_t ck_per_batch = 0;           // checkpoint rows per batch (unpacked)
  int ck_len = 1;
  bool softplus = false;
};

// Return cudaSuccess or the launch error. Requires 1 <= N <= 256.
cudaError_t selective_scan_fwd_cuda(const SelectiveScanFwdParams& p, DType dtype, cudaStream_t stream);

}  // namespace ssm
