// linear_scan forward and backward: one kernel body, a chunked mix of time-sequential work per
// thread and a tiny cross-segment combine per tile.
//
// A block owns kCh channels and walks time in tiles of TT steps. Each tile is staged through
// shared memory with coalesced loads whichever axis is contiguous (time or channel), and the next
// tile's loads are issued into registers before the current tile is computed, so memory stays
// busy. Inside a tile, thread (seg, ch) scans K = TT / kSeg consecutive steps of one channel
// sequentially in fp32 registers; segment totals (A, B) are combined through shared memory and the
// carried state from the previous tile is applied. O(T) work, one read of each input, one write.
//
// Backward (see linear_scan/reference.py): g_r = dh_r + a_{r-1} g_{r-1} in processing order
// (opposite to the forward pass), db = g, da = g * h_pred, dh0 = a_last * g_last.
#include "linear_scan/linear_scan.h"

namespace ssm {
namespace {

constexpr int kThreads = 256;
constexpr int kCh = 32;                  // channels per block
constexpr int kSeg = kThreads / kCh;     // time segments per tile

template <typename T, bool kBwd>
__global__ void __launch_bounds__(kThreads, 2) linear_scan_kernel(const LinearScanParams p,
                                                               const int64_t n_cblocks) {
  constexpr int TT = kBwd ? 32 : 64;    // tile length: bwd stages 3 arrays in registers
  constexpr int K = TT / kSeg;           // sequential steps per thread per tile
  constexpr int kLoads = TT * kCh / kThreads;
  __shared__ float s_coef[TT][kCh + 1];  // +1: conflict-free for both load orders
  __shared__ float s_val[TT][kCh + 1];
  __shared__ float s_h[kBwd ? TT : 1][kCh + 1];
  __shared__ float s_segA[kSeg][kCh];
  __shared__ float s_segB[kSeg][kCh];
  __shared__ float s_carry[kCh];
  __shared__ float s_prev_coef[kCh];     // bwd: a at the previous tile's last position

  const int tid = threadIdx.x;
  const int64_t o = blockIdx.x / n_cblocks;
  const int64_t c0 = (blockIdx.x % n_cblocks) * kCh;
  const bool flip = kBwd ? !p.reverse : p.reverse;
  const bool time_fast = p.s_t == 1;
  const T* coef = static_cast<const T*>(p.coef);
  const T* value = static_cast<const T*>(p.value);
  const T* hsaved = static_cast<const T*>(p.h);
  const int64_t base = o * p.s_o;

  auto time_of = [&](int64_t r) { return flip ? p.T - 1 - r : r; };
  // Staging geometry: load slot j of this thread is (r_first + j*dr, ch_first + j*dc), with
  // consecutive threads on the contiguous axis; so its offset is off_first + j*step.
  int r_first, ch_first, dr, dc;
  if (time_fast) {
    r_first = tid % TT; ch_first = tid / TT; dr = 0; dc = kThreads / TT;
  } else {
    ch_first = tid % kCh; r_first = tid / kCh; dr = kThreads / kCh; dc = 0;
  }
  // int32 within a tile: the launcher guarantees kLoads * |step| < 2^31 (see linear_scan_cuda_fits)
  const int step = static_cast<int>((flip ? -dr : dr) * p.s_t + dc * p.s_c);
  const int pred_step = static_cast<int>(flip ? -p.s_t : p.s_t);  // bwd: to the forward predecessor
  const float* h0 = p.h0 ? p.h0 + o * p.C + c0 : nullptr;

  if (tid < kCh) {
    const int64_t c = c0 + tid;
    s_carry[tid] = (c < p.C && p.carry_in) ? p.carry_in[o * p.C + c] : 0.f;
    s_prev_coef[tid] = 1.f;
  }

  float rc[kLoads], rv[kLoads], rh[kBwd ? kLoads : 1];
  auto load_tile = [&](int64_t r0) {
    const int64_t rr0 = r0 + r_first;
    const int64_t off0 = base + time_of(rr0) * p.s_t + (c0 + ch_first) * p.s_c;
    const T* pc = coef + off0;
    const T* pv = value + off0;
#pragma unroll
    for (int j = 0; j < kLoads; ++j) {
      const int64_t rr = rr0 + j * dr;
      const int chj = ch_first + j * dc;
      const bool ok = rr < p.T && c0 + chj < p.C;
      rc[j] = ok ? to_float(pc[j * step]) : 1.f;
      rv[j] = ok ? to_float(pv[j * step]) : 0.f;
      if constexpr (kBwd) {  // h at the forward predecessor (processing position rr + 1)
        float hp = 0.f;
        if (ok && rr + 1 < p.T) hp = to_float(hsaved[off0 + j * step + pred_step]);
        else if (ok && h0) hp = h0[chj];
        rh[j] = hp;
      }
    }
  };

  const int ch = tid % kCh, seg = tid / kCh;
  // coefficient of processing position r0 + r: a there (fwd), a at the previous position (bwd)
  auto coef_at = [&](int64_t r0, int r) -> float {
    if constexpr (kBwd) {
      if (r0 + r >= p.T) return 1.f;
      return r == 0 ? s_prev_coef[ch] : s_coef[r - 1][ch];
    } else {
      return s_coef[r][ch];
    }
  };
  load_tile(0);
  for (int64_t r0 = 0; r0 < p.T; r0 += TT) {
#pragma unroll
    for (int j = 0; j < kLoads; ++j) {
      const int r = r_first + j * dr, c = ch_first + j * dc;
      s_coef[r][c] = rc[j];
      s_val[r][c] = rv[j];
      if constexpr (kBwd) s_h[r][c] = rh[j];
    }
    __syncthreads();
    if (r0 + TT < p.T) load_tile(r0 + TT);  // in flight while this tile is computed

    // pass 1: this thread's segment total (A, B) so that h_end = A * h_start + B
    float acc_a = 1.f, acc_b = 0.f;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const float c = coef_at(r0, seg * K + j);
      acc_b = acc_b * c + s_val[seg * K + j][ch];
      acc_a = acc_a * c;
    }
    s_segA[seg][ch] = acc_a;
    s_segB[seg][ch] = acc_b;
    __syncthreads();
    float carry = s_carry[ch];
    for (int s = 0; s < seg; ++s) carry = s_segA[s][ch] * carry + s_segB[s][ch];
    __syncthreads();  // every thread has read s_carry before it changes
    if (seg == kSeg - 1) s_carry[ch] = acc_a * carry + acc_b;
    // pass 2: rerun the segment from its true incoming state, outputs in place
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int r = seg * K + j;
      carry = coef_at(r0, r) * carry + s_val[r][ch];
      s_val[r][ch] = carry;
      if constexpr (kBwd) s_h[r][ch] *= carry;  // da = g * h_pred
    }
    __syncthreads();
    if (kBwd && seg == kSeg - 1) s_prev_coef[ch] = s_coef[TT - 1][ch];
    const int64_t off0 = base + time_of(r0 + r_first) * p.s_t + (c0 + ch_first) * p.s_c;
#pragma unroll
    for (int j = 0; j < kLoads; ++j) {
      const int r = r_first + j * dr, c = ch_first + j * dc;
      if (r0 + r < p.T && c0 + c < p.C) {
        static_cast<T*>(p.out)[off0 + j * step] = from_float<T>(s_val[r][c]);
        if constexpr (kBwd) static_cast<T*>(p.out2)[off0 + j * step] = from_float<T>(s_h[r][c]);
      }
    }
    __syncthreads();  // smem is refilled next iteration
  }
  if (tid < kCh && c0 + tid < p.C) {
    const int64_t c = c0 + tid;
    float st = s_carry[tid];
    if constexpr (kBwd) st *= to_float(coef[base + time_of(p.T - 1) * p.s_t + c * p.s_c]);
    p.state_out[o * p.C + c] = st;
  }
}

template <bool kBwd>
cudaError_t launch(const LinearScanParams& p, DType dtype, cudaStream_t stream) {
  if (p.T <= 0 || p.C <= 0 || p.O <= 0) return cudaSuccess;
  const int64_t n_cblocks = (p.C + kCh - 1) / kCh;
  const int64_t blocks = n_cblocks * p.O;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    linear_scan_kernel<T, kBwd><<<dim3(static_cast<unsigned>(blocks)), kThreads, 0, stream>>>(p, n_cblocks);
  });
  return cudaGetLastError();
}

}  // namespace

cudaError_t linear_scan_fwd_cuda(const LinearScanParams& p, DType dtype, cudaStream_t stream) {
  return launch<false>(p, dtype, stream);
}

cudaError_t linear_scan_bwd_cuda(const LinearScanParams& p, DType dtype, cudaStream_t stream) {
  return launch<true>(p, dtype, stream);
}

}  // namespace ssm
