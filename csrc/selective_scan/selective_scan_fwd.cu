// selective scan forward, time-sequential and channel-parallel (the issue's formulation).
//
// A block of 128 threads owns kD channels of one group of one sequence with all their N states:
// thread (ch, slice) keeps kNPT states of channel ch in float32 registers. Time is walked in
// chunks: the chunk's u, dt (bias + softplus applied once per (d, t)), z and the time-varying B, C
// are staged through shared memory with coalesced loads along time; then every thread runs the
// chunk's steps sequentially (one exp2 and three FMAs per state and step, no scan overhead), y is
// reduced over the slices of a channel with warp shuffles into a shared tile, and the output tile
// (y + D u) * silu(z) is written back coalesced. States entering every ck_len steps are saved for
// the backward (the Triton backward restarts from them). int64 offsets throughout.
#include "selective_scan/selective_scan.h"

namespace ssm {
namespace {

constexpr int kThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float softplus_f(float x) {
  return x <= 20.f ? log1pf(__expf(x)) : x;  // torch's threshold
}

template <typename T>
__device__ __forceinline__ float load_f(const void* base, int64_t i) {
  return to_float(static_cast<const T*>(base)[i]);
}

template <typename T, int kNPT>
__global__ void __launch_bounds__(kThreads) selective_scan_fwd_kernel(
    const SelectiveScanFwdParams p, const int tpc, const int kD, const int chunk) {
  extern __shared__ float smem[];
  const int pitch = chunk + 1;  // +1: channels read the same column without bank conflicts
  const int n_pad = tpc * kNPT;
  float* s_u = smem;
  float* s_dt = s_u + kD * pitch;
  float* s_z = s_dt + kD * pitch;
  float* s_y = s_z + kD * pitch;
  float* s_B = s_y + kD * pitch;
  float* s_C = s_B + n_pad * pitch;

  const int tid = threadIdx.x;
  const int ch = tid / tpc;
  const int slice = tid % tpc;
  const int64_t DG = p.dim / p.groups;
  const int64_t g = blockIdx.y;
  const int64_t s = blockIdx.z;
  const int64_t d_local0 = static_cast<int64_t>(blockIdx.x) * kD;
  const int64_t d = g * DG + d_local0 + ch;
  const bool d_ok = ch < kD && d_local0 + ch < DG;

  int64_t bos = 0, Ts = p.L, b = s, ck0 = s * p.ck_per_batch;
  if (p.cu_seqlens) {
    bos = p.cu_seqlens[s];
    Ts = p.cu_seqlens[s + 1] - bos;
    b = 0;
    ck0 = p.ck_offsets ? p.ck_offsets[s] : 0;
  }

  // per-thread constants and state
  float a2[kNPT], bc[kNPT], cc[kNPT], h[kNPT];
#pragma unroll
  for (int k = 0; k < kNPT; ++k) {
    const int64_t n = slice * kNPT + k;
    const bool ok = d_ok && n < p.N;
    a2[k] = ok ? p.A[d * p.N + n] * kLog2e : 0.f;
    bc[k] = (ok && !p.B_var) ? static_cast<const float*>(p.B)[d * p.N + n] : 0.f;
    cc[k] = (ok && !p.C_var) ? static_cast<const float*>(p.C)[d * p.N + n] : 0.f;
    h[k] = (ok && p.h0) ? p.h0[(s * p.dim + d) * p.N + n] : 0.f;
  }

  const int64_t row0 = (b * p.dim + g * DG + d_local0) * p.L + bos;  // (b, first channel, bos)
  const int64_t bc_row0 = ((b * p.groups + g) * p.N) * p.L + bos;     // (b, g, n = 0, bos)

  for (int64_t c0 = 0; c0 < Ts; c0 += chunk) {
    const int len = static_cast<int>(Ts - c0 < chunk ? Ts - c0 : chunk);
    __syncthreads();  // the previous chunk's tiles are consumed
    for (int i = tid; i < kD * chunk; i += kThreads) {
      const int r = i / chunk, col = i % chunk;
      const bool ok = col < len && d_local0 + r < DG;
      const int64_t off = row0 + r * p.L + c0 + col;
      float uu = 0.f, dt = 0.f, zz = 0.f;
      if (ok) {
        uu = load_f<T>(p.u, off);
        dt = load_f<T>(p.delta, off) + (p.delta_bias ? p.delta_bias[g * DG + d_local0 + r] : 0.f);
        dt = p.softplus ? softplus_f(dt) : dt;
        if (p.z) zz = load_f<T>(p.z, off);
      }
      s_u[r * pitch + col] = uu;
      s_dt[r * pitch + col] = dt;  // 0 on padding: exp2(0) = 1, input 0 -> state kept
      s_z[r * pitch + col] = zz;
    }
    if (p.B_var || p.C_var) {
      for (int i = tid; i < n_pad * chunk; i += kThreads) {
        const int n = i / chunk, col = i % chunk;
        const bool ok = col < len && n < p.N;
        const int64_t off = bc_row0 + n * p.L + c0 + col;
        if (p.B_var) s_B[n * pitch + col] = ok ? load_f<T>(p.B, off) : 0.f;
        if (p.C_var) s_C[n * pitch + col] = ok ? load_f<T>(p.C, off) : 0.f;
      }
    }
    __syncthreads();
    for (int t = 0; t < len; ++t) {
      if (p.ckpt && ((c0 + t) % p.ck_len) == 0 && d_ok) {
        float* dst = p.ckpt + ((ck0 + (c0 + t) / p.ck_len) * p.dim + d) * p.N;
#pragma unroll
        for (int k = 0; k < kNPT; ++k) {
          const int64_t n = slice * kNPT + k;
          if (n < p.N) dst[n] = h[k];
        }
      }
      const float dt = s_dt[ch * pitch + t];
      const float dtu = dt * s_u[ch * pitch + t];
      float y = 0.f;
#pragma unroll
      for (int k = 0; k < kNPT; ++k) {
        const int n = slice * kNPT + k;
        const float bv = p.B_var ? s_B[n * pitch + t] : bc[k];
        const float cv = p.C_var ? s_C[n * pitch + t] : cc[k];
        h[k] = fmaf(exp2f(dt * a2[k]), h[k], dtu * bv);
        y = fmaf(cv, h[k], y);
      }
      for (int off = tpc >> 1; off > 0; off >>= 1) y += __shfl_xor_sync(0xffffffffu, y, off);
      if (slice == 0) s_y[ch * pitch + t] = y;
    }
    __syncthreads();
    for (int i = tid; i < kD * chunk; i += kThreads) {
      const int r = i / chunk, col = i % chunk;
      if (col >= len || d_local0 + r >= DG) continue;
      const int64_t dd = g * DG + d_local0 + r;
      float y = s_y[r * pitch + col];
      if (p.D) y = fmaf(p.D[dd], s_u[r * pitch + col], y);
      if (p.z) {
        const float zz = s_z[r * pitch + col];
        y *= zz / (1.f + __expf(-zz));
      }
      static_cast<T*>(p.out)[row0 + r * p.L + c0 + col] = from_float<T>(y);
    }
  }
  if (d_ok) {
#pragma unroll
    for (int k = 0; k < kNPT; ++k) {
      const int64_t n = slice * kNPT + k;
      if (n < p.N) p.last[(s * p.dim + d) * p.N + n] = h[k];
    }
  }
}

template <typename T, int kNPT>
cudaError_t launch(const SelectiveScanFwdParams& p, cudaStream_t stream) {
  int tpc = 1;  // threads per channel: a power of two covering N / kNPT, at most one warp
  while (tpc * kNPT < p.N) tpc <<= 1;
  const int kD = kThreads / tpc;
  // the longest time chunk (<= 64) whose tiles fit the default 48 KiB of dynamic shared memory
  auto smem_for = [&](int chunk) {
    return sizeof(float) * static_cast<size_t>(chunk + 1) * (4 * kD + 2 * tpc * kNPT);
  };
  int chunk = 64;
  while (chunk > 8 && smem_for(chunk) > 48 * 1024) chunk >>= 1;
  const size_t smem = smem_for(chunk);
  const int64_t DG = p.dim / p.groups;
  dim3 grid(static_cast<unsigned>((DG + kD - 1) / kD), static_cast<unsigned>(p.groups),
            static_cast<unsigned>(p.nseq));
  selective_scan_fwd_kernel<T, kNPT><<<grid, kThreads, smem, stream>>>(p, tpc, kD, chunk);
  return cudaGetLastError();
}

}  // namespace

cudaError_t selective_scan_fwd_cuda(const SelectiveScanFwdParams& p, DType dtype, cudaStream_t stream) {
  if (p.N < 1 || p.N > 256) return cudaErrorInvalidValue;
  cudaError_t err = cudaSuccess;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    err = p.N <= 128 ? launch<T, 4>(p, stream) : launch<T, 8>(p, stream);
  });
  return err;
}

}  // namespace ssm
