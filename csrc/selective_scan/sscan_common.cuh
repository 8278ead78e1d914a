// Device helpers shared by the selective-scan forward and backward. No torch headers.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

#include "common/dtype.cuh"

namespace ssm {
namespace sscan {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// One MUFU.EX2 (flush-to-zero: exp of a large negative argument is 0, as wanted for a decay).
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 2^x on the FMA pipe instead of the SFU (FlashAttention-4's trick; issue 9, bench/NOTES.md
// "poly exp2"): Cody-Waite split 2^x = 2^j 2^f, j = rint(x) by the 1.5 * 2^23 magic add (the
// exponent bias 127 folded into the constant), f = x - j in [-0.5, 0.5] (exact), 2^f by a degree-5
// minimax polynomial with p(0) = 1 exactly (so x = 0 -> 1.0 exactly: padding steps keep h
// bitwise), max relative error 2.2e-7 with float32 evaluation (ex2.approx: ~2 ulp), and 2^j as the
// float with bits (j + 127) << 23. x is clamped to >= -127: j = -127 gives the bits 0 -> 0.0, so
// very negative x (and -inf, NaN) give exactly 0 like ex2.approx.ftz; p(f) 2^-126 below the normal
// range flushes to 0 (ftz). Not reproduced: x >= 128 (ex2 gives inf; here the exponent wraps), a
// decay that multiplies the state by >= 2^128 per step. 11 instructions (FMNMX, 3 FADD, 5 FFMA,
// SHF, FMUL), all on the FMA/ALU pipes. The adds go through __f*_rn so they are never contracted.
constexpr float kEx2Magic = 12583039.f;  // 1.5 * 2^23 + 127 (ulp 1: the sum is rint(x) + magic)
constexpr float kEx2P1 = 0x1.62e41cp-1f, kEx2P2 = 0x1.ebf956p-3f, kEx2P3 = 0x1.c6bde6p-5f,
                kEx2P4 = 0x1.3d0762p-7f, kEx2P5 = 0x1.5a1bb6p-10f;
__device__ __forceinline__ float ex2_poly(float x) {
  const float xc = fmaxf(x, -127.f);
  const float jb = __fadd_rn(xc, kEx2Magic);           // bits: 0x4B400000 + (j + 127)
  const float f = __fsub_rn(xc, __fsub_rn(jb, kEx2Magic));  // x - j, exact
  float q = fmaf(kEx2P5, f, kEx2P4);
  q = fmaf(q, f, kEx2P3);
  q = fmaf(q, f, kEx2P2);
  q = fmaf(q, f, kEx2P1);
  const float p = fmaf(q, f, 1.f);
  const float scale = __uint_as_float(__float_as_uint(jb) << 23);  // 2^j (0 for j = -127)
  return __fmul_rn(p, scale);
}

__device__ __forceinline__ float lg2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// torch's softplus (threshold 20) with two MUFU ops and no division: log1p(e) by its series where
// 1 + e would drop digits (e < 1/16: truncation error < e^7/7), by lg2 otherwise.
__device__ __forceinline__ float softplus_fast(float x) {
  const float e = ex2(x * kLog2e);
  const float series =
      e * fmaf(e, fmaf(e, fmaf(e, fmaf(e, fmaf(e, -1.f / 6.f, 0.2f), -0.25f), 1.f / 3.f), -0.5f), 1.f);
  const float lg = lg2(1.f + e) * kLn2;
  return x > 20.f ? x : (e < 0.0625f ? series : lg);
}

__device__ __forceinline__ float rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 1 / (1 + e^-x): two MUFU ops; x -> -inf gives rcp(inf) = 0.
__device__ __forceinline__ float sigmoid_fast(float x) { return rcp(1.f + ex2(-x * kLog2e)); }

// 16-byte async copy global -> shared; bytes < 16 reads only that many and zero-fills the rest.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

// Reduce-scatter over the kW consecutive lanes that share a channel: on entry v[j] is this lane's
// partial for item j (j < kW); on exit v[0] is the sum over the kW lanes of item (lane % kW).
// kW - 1 shuffles per kW items instead of kW * log2(kW) for one all-reduce per item.
template <int kM, int kW>
__device__ __forceinline__ void reduce_scatter_round(float (&v)[kW], int slice) {
  if constexpr (kM >= 1) {
    const bool up = (slice & kM) != 0;
#pragma unroll
    for (int i = 0; i < kM; ++i) {
      const float send = up ? v[i] : v[i + kM];
      const float keep = up ? v[i + kM] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, kM);
    }
    reduce_scatter_round<kM / 2>(v, slice);
  }
}
template <int kW>
__device__ __forceinline__ void reduce_scatter(float (&v)[kW], int slice) {
  reduce_scatter_round<kW / 2>(v, slice);  // rounds are compile-time so v stays in registers
}

// Generalised reduce-scatter over kW lanes spaced kStride apart (lane index c = (lane / kStride) % kW)
// of kI items (powers of two). While more than one item is left, each round halves the items
// (one shuffle per kept item); once one is left the remaining rounds are a butterfly all-reduce.
// On exit lane c holds, in v[0 .. max(1, kI / kW)), the lane sums of items starting at
//   kI >= kW: c * (kI / kW)          kI < kW: c / (kW / kI)  (replicated on kW / kI lanes).
// The summation order is fixed by the program (bitwise deterministic). The partner of index bit kM
// is lane ^ X::mask(kM): kM * kStride for strided lanes (LaneStride), or any lane bits (LaneBits:
// the remapped layouts, whose index bits are not one contiguous field) -- same rounds, same kept
// items, same operands, so the sums are bitwise those of the strided form.
template <int kStride>
struct LaneStride {
  static constexpr int mask(int m) { return m * kStride; }
};
template <int kX1, int kX2, int kX4>
struct LaneBits {  // up to 8 lanes: xor masks of index bits 1, 2, 4
  static constexpr int mask(int m) { return m == 1 ? kX1 : (m == 2 ? kX2 : kX4); }
};
template <int kCnt, int kM, class X, int kI>
__device__ __forceinline__ void rs_round(float (&v)[kI], int c) {
  if constexpr (kM >= 1) {
    constexpr int kX = X::mask(kM);
    if constexpr (kCnt >= 2) {
      constexpr int kHalf = kCnt / 2;
      const bool up = (c & kM) != 0;
#pragma unroll
      for (int i = 0; i < kHalf; ++i) {
        const float send = up ? v[i] : v[i + kHalf];
        const float keep = up ? v[i + kHalf] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, kX);
      }
      rs_round<kHalf, kM / 2, X>(v, c);
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], kX);
      rs_round<1, kM / 2, X>(v, c);
    }
  }
}
template <int kW, int kStride, int kI>
__device__ __forceinline__ void reduce_scatter_lanes(float (&v)[kI], int c) {
  static_assert((kI & (kI - 1)) == 0 && (kW & (kW - 1)) == 0, "powers of two");
  rs_round<kI, kW / 2, LaneStride<kStride>>(v, c);
}
// the same over kW <= 8 lanes whose index bits 1, 2, 4 are the lane bits kX1, kX2, kX4
template <int kW, int kX1, int kX2, int kX4, int kI>
__device__ __forceinline__ void reduce_scatter_xor(float (&v)[kI], int c) {
  static_assert((kI & (kI - 1)) == 0 && (kW & (kW - 1)) == 0 && kW <= 8, "powers of two, <= 8 lanes");
  rs_round<kI, kW / 2, LaneBits<kX1, kX2, kX4>>(v, c);
}

template <int kN>
__device__ __forceinline__ void load_vec(float (&dst)[kN], const float* src) {  // 16-byte aligned
#pragma unroll
  for (int k = 0; k < kN; k += 4) {
    const float4 q = *reinterpret_cast<const float4*>(src + k);
    dst[k] = q.x; dst[k + 1] = q.y; dst[k + 2] = q.z; dst[k + 3] = q.w;
  }
}

// 8 consecutive elements of a raw row starting at element `off` of its aligned window, plus the
// row's shift sh (elements between the window start and the row's first element of the chunk).
// sh == 0: 16-byte loads (off is a multiple of 8, the row starts 16-byte aligned).
__device__ __forceinline__ void unpack(const uint4 w, float* v, __nv_bfloat16) {
  const unsigned q[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // exact, as __bfloat162float
    v[2 * i] = __uint_as_float(q[i] << 16);
    v[2 * i + 1] = __uint_as_float(q[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void unpack(const uint4 w, float* v, __half) {
  const unsigned q[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h2;
    memcpy(&h2, &q[i], 4);
    const float2 f = __half22float2(h2);
    v[2 * i] = f.x; v[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void unpack(const uint4 w, float* v, float) {
  v[0] = __uint_as_float(w.x); v[1] = __uint_as_float(w.y);
  v[2] = __uint_as_float(w.z); v[3] = __uint_as_float(w.w);
}

template <typename T>
__device__ __forceinline__ void load8(const T* row, int off, int sh, float (&v)[8]) {
  if (sh == 0) {
    constexpr int kPer = 16 / sizeof(T);  // elements per uint4
    const uint4* q = reinterpret_cast<const uint4*>(row + off);
#pragma unroll
    for (int k = 0; k < 8 / kPer; ++k) unpack(q[k], v + k * kPer, T{});
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = to_float(row[off + sh + i]);
  }
}

// Staging by owner threads (the lean kernels): thread tid owns raw rows tid + k kThr. init() asks
// where(row, base, e, ok) for each owned row: its tensor, element offset at time 0 and whether it
// is read; the aligned source pointer and shift are kept, so issue() per chunk is only
// `+ c0` and the 16-byte cp.async copies (zero-filled past len) into raw (row pitch kRowEl).
template <typename T, int kRows, int kThr, int kRowEl>
struct RowStager {
  static constexpr int kV = 16 / sizeof(T), kNV = kRowEl / kV, kRPT = (kRows + kThr - 1) / kThr;
  const T* src[kRPT];
  int sh[kRPT];
  template <typename F>
  __device__ __forceinline__ void init(int tid, F&& where) {
#pragma unroll
    for (int k = 0; k < kRPT; ++k) {
      const int row = tid + k * kThr;
      src[k] = nullptr;
      sh[k] = 0;
      if (row >= kRows) continue;
      const T* base;
      int64_t e;
      bool ok;
      where(row, base, e, ok);
      if (!ok) continue;
      sh[k] = static_cast<int>(e & (kV - 1));
      src[k] = base + (e - sh[k]);
    }
  }
  __device__ __forceinline__ void issue(T* raw, int tid, int64_t c0, int len) const {
#pragma unroll
    for (int k = 0; k < kRPT; ++k) {
      if (src[k] == nullptr) continue;
      T* dst = raw + (tid + k * kThr) * kRowEl;
      const T* s = src[k] + c0;
#pragma unroll
      for (int j = 0; j < kNV; ++j) {
        const int valid = sh[k] + len - j * kV;
        if (valid <= 0) break;
        cp_async16(dst + j * kV, s + j * kV, (valid < kV ? valid : kV) * static_cast<int>(sizeof(T)));
      }
    }
  }
};

// Coalesced staging for aligned rows (issue 9, session 7: the owner-row RowStager makes every
// warp-wide cp.async touch 32 different rows, i.e. 32 lines and half-sectors per instruction; the
// H100 ncu shows L1/TEX at 79% in the lean forward). Here the kRows x kP 16-byte pieces of the
// chunk window (kP = kChunk / kV) are numbered q = row kP + piece and thread tid copies pieces
// tid + k kThr: kP consecutive lanes copy one row's window (whole sectors, whole lines for 128-byte
// windows). The pieces a thread copies are the same every chunk, so their source pointers are set
// once (init) and a chunk costs `+ c0` per piece. Only for rows whose element offset at time 0 is
// a multiple of kV (the caller tests this block-uniformly; RowStager handles the rest). The raw
// layout is RowStager's with shift 0 (row pitch kRowEl; pieces past len zero-filled / skipped), so
// the convert that reads it is unchanged.
template <typename T, int kRows, int kThr, int kRowEl, int kChunk>
struct PieceStager {
  static constexpr int kV = 16 / sizeof(T), kP = kChunk / kV;
  static constexpr int kItems = (kRows * kP + kThr - 1) / kThr;
  static_assert(kChunk % kV == 0 && kP * kV <= kRowEl, "window");
  const T* src[kItems];  // nullptr: piece not copied (row not read, or past the last row)
  template <typename F>
  __device__ __forceinline__ void init(int tid, F&& where) {
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int q = tid + k * kThr;
      src[k] = nullptr;
      if (q >= kRows * kP) continue;
      const T* base;
      int64_t e;
      bool ok;
      where(q / kP, base, e, ok);
      if (ok) src[k] = base + e + (q % kP) * kV;
    }
  }
  __device__ __forceinline__ void issue(T* raw, int tid, int64_t c0, int len) const {
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int q = tid + k * kThr, piece = q % kP;
      const int valid = len - piece * kV;
      if (src[k] == nullptr || valid <= 0) continue;
      cp_async16(raw + (q / kP) * kRowEl + piece * kV, src[k] + c0,
                 (valid < kV ? valid : kV) * static_cast<int>(sizeof(T)));
    }
  }
  // Per-chunk form that keeps no pointers (for kernels whose register peak is elsewhere in the
  // chunk loop): with kThr % kP == 0 thread tid copies piece tid % kP of rows r0 + k kRS
  // (r0 = tid / kP, kRS = kThr / kP); where2(hi, r0, base, e, ok) describes row hi + r0 with hi a
  // compile-time multiple of kRS after unrolling, so callers whose row blocks (tensors) are
  // multiples of kRS pick the tensor from hi alone (no per-row division or select on r0).
  template <typename F>
  static __device__ __forceinline__ void issue_direct(T* raw, int tid, int64_t c0, int len,
                                                      F&& where2) {
    static_assert(kThr % kP == 0 && kRows % (kThr / kP) == 0, "row blocks");
    constexpr int kRS = kThr / kP;
    const int r0 = tid / kP, piece = tid % kP, valid = len - piece * kV;
    if (valid <= 0) return;
    const int bytes = (valid < kV ? valid : kV) * static_cast<int>(sizeof(T));
#pragma unroll
    for (int k = 0; k < kRows / kRS; ++k) {
      const T* base;
      int64_t e;
      bool ok;
      where2(k * kRS, r0, base, e, ok);
      if (ok) cp_async16(raw + (k * kRS + r0) * kRowEl + piece * kV, base + e + c0 + piece * kV, bytes);
    }
  }
};

// kN floats -> kN consecutive elements of T at dst, which is aligned to min(16, kN sizeof(T))
// bytes: 16-, 8- or 4-byte stores of the same round-to-nearest conversions as from_float.
template <int kN, typename T>
__device__ __forceinline__ void store_vec(T* dst, const float* v) {
  static_assert(kN >= 1 && (kN & (kN - 1)) == 0, "power of two");
  if constexpr (sizeof(T) == 4) {
    if constexpr (kN >= 4) {
#pragma unroll
      for (int i = 0; i < kN; i += 4)
        *reinterpret_cast<float4*>(dst + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
    } else if constexpr (kN == 2) {
      *reinterpret_cast<float2*>(dst) = make_float2(v[0], v[1]);
    } else {
      dst[0] = from_float<T>(v[0]);
    }
  } else if constexpr (kN == 1) {
    dst[0] = from_float<T>(v[0]);
  } else {
    unsigned w[kN / 2];
#pragma unroll
    for (int i = 0; i < kN / 2; ++i) {
      const T lo = from_float<T>(v[2 * i]), hi = from_float<T>(v[2 * i + 1]);
      unsigned short a, b;
      memcpy(&a, &lo, 2);
      memcpy(&b, &hi, 2);
      w[i] = static_cast<unsigned>(a) | (static_cast<unsigned>(b) << 16);
    }
    if constexpr (kN >= 8) {
#pragma unroll
      for (int i = 0; i < kN / 2; i += 4)
        *reinterpret_cast<uint4*>(dst + 2 * i) = make_uint4(w[i], w[i + 1], w[i + 2], w[i + 3]);
    } else if constexpr (kN == 4) {
      *reinterpret_cast<uint2*>(dst) = make_uint2(w[0], w[1]);
    } else {
      *reinterpret_cast<unsigned*>(dst) = w[0];
    }
  }
}

// 8 floats -> 8 consecutive elements of T at a 16-byte-aligned address (16-byte stores; the same
// round-to-nearest conversions as from_float)
__device__ __forceinline__ void store8(__nv_bfloat16* dst, const float (&v)[8]) {
  uint4 w;
  unsigned* q = reinterpret_cast<unsigned*>(&w);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_bfloat162 b2 = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    memcpy(&q[i], &b2, 4);
  }
  *reinterpret_cast<uint4*>(dst) = w;
}
__device__ __forceinline__ void store8(__half* dst, const float (&v)[8]) {
  uint4 w;
  unsigned* q = reinterpret_cast<unsigned*>(&w);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __half2 h2 = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
    memcpy(&q[i], &h2, 4);
  }
  *reinterpret_cast<uint4*>(dst) = w;
}
__device__ __forceinline__ void store8(float* dst, const float (&v)[8]) {
  reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

}  // namespace sscan
}  // namespace ssm
