// selective scan backward: channel-parallel, time reversed by checkpoint chunks, states rebuilt in
// registers.
//
// Same thread layout as the forward: a block of 128 threads owns kD channels of one group of one
// sequence, thread (ch, slice) owns kNPT of the channel's states. Time is walked backwards in
// chunks of kChunk = chunk_len(N) steps (the forward's checkpoint spacing); per chunk:
//   convert  raw u, delta, z, dout, B, C (cp.async'd during the previous chunk into one raw
//            buffer, which is then refilled with the next chunk at once) -> float32 tiles:
//            q = (dt, dt u, dy, u) and f = (softplus', dz / y) per (d, t); B, C [t][n];
//   pass 1   from the checkpoint, h = exp(dt A) h + dt u B over the chunk, saving the state at
//            every sub-chunk start (kS steps) in shared memory (each thread rereads only its own);
//   pass 2   per sub-chunk, last first: recompute its kS steps from the saved state keeping
//            a = exp(dt A) and P = a h[t-1] in registers (y and dC = dy h come out here), then
//            walk the adjoint backwards with no further exp:
//              g = dy C + carry,   carry <- a g       (carry enters as d last_state)
//              dA += dt g P,  d dt += A g P + u g B,  du = dt g B (+ D dy),  dB = dt u g;
//            sums over n (y, d dt, g B) are reduce-scattered over the channel's kTPC lanes; sums
//            over the channels (time-varying dB, dC) are reduce-scattered over the warp's
//            channel lanes, then the block's warps are added in a fixed order per sub-chunk;
//   output   du, ddelta, dz (coalesced along time) and the float32 per-block partials of dB/dC.
// Per-sequence sums (dA, dD, ddelta_bias, time-invariant dB/dC) stay in registers until the end
// and go to per-sequence partials; a small kernel then sums every partial in a fixed order and
// casts (bitwise deterministic, no atomics). 2 ex2 per (d, n, t) update. int64 offsets.
#include "selective_scan/selective_scan.h"
#include <cstdlib>
#include <type_traits>

#include "selective_scan/sscan_common.cuh"

namespace ssm {
namespace {

using namespace sscan;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

constexpr size_t align16(size_t x) { return (x + 15) / 16 * 16; }

// kDirect (backward variant 3): no raw staging buffer (the convert reads global memory, the next
// chunk is prefetched to L2) and no softplus'/dz tile (q's 4th slot holds softplus'; the owner
// lane reloads u, z, dout): 68 KB instead of 105 KB at N <= 16 bf16, so 3 blocks per SM.
// kRb (backward variant 8): kChunk is the processing chunk, half the checkpoint spacing; the
// rebuild tiles hold the lower half's (dt, dt u) [ch][t] and B [t][n] while its upper half runs.
template <typename T, int kNPT, int kTPC, int kChunk, int kS, bool kDirect = false, bool kXch = false,
          bool kRb = false>
struct BwdLayout {
  static constexpr int kD = kThreads / kTPC;      // channels per block
  static constexpr int kNP = kNPT * kTPC;         // states per channel, padded
  static constexpr int kV = 16 / sizeof(T);       // elements per 16-byte vector
  static constexpr int kRowEl = kChunk + kV;      // raw row: aligned window covering one chunk
  static constexpr int kNV = kRowEl / kV;
  static constexpr int kRows = 4 * kD + 2 * kNP;  // u, delta, z, dout (kD each), B, C (kNP each)
  static constexpr int kQP = kChunk + 1;          // per-channel pitch of the (d, t) tiles
  static constexpr int kBP = kNP + 4;             // B/C pitch per step (float4 reads)
  static constexpr int kBC = (kChunk * kBP > kD * kNP) ? kChunk * kBP : kD * kNP;
  static constexpr int kNSub = kChunk / kS;
  static constexpr int kCW = 32 / kTPC;           // channels per warp
  static constexpr int kG = kCW > kNPT ? kCW / kNPT : 1;  // steps per channel reduce-scatter
  static constexpr int kItems = kG * kNPT;
  static constexpr int kOwn = kItems / kCW;       // items a lane keeps after it
  static constexpr int kWP = kWarps * 2 * kS * kNP;  // per-warp dB/dC partials of one sub-chunk
  static constexpr size_t oQ = kDirect ? 0 : align16(sizeof(T) * kRows * kRowEl);
  static constexpr size_t oF = oQ + sizeof(float4) * kD * kQP;
  static constexpr size_t oB = align16(oF + (kDirect ? 0 : sizeof(float2) * kD * kQP));
  static constexpr size_t oC = oB + sizeof(float) * kBC;
  static constexpr size_t oSt = oC + sizeof(float) * kBC;
  static constexpr size_t oWp = oSt + sizeof(float) * kNSub * kD * kNP;
  static constexpr size_t oDv = oWp + sizeof(float) * 2 * kWP;
  // kXch (backward variant 5): per-warp exchange tile of the channel reduce, [channel][item]
  // (kCW rows of kItems * 32 / kCW floats: one item per lane after the reduce), rows XOR-swizzled
  static constexpr int kXR = kItems * 32;  // floats per warp (kCW rows of 32 / kCW lanes x kItems)
  static constexpr size_t oX = oDv + sizeof(float) * 2 * kD;
  static constexpr size_t oR = oX + (kXch ? sizeof(float) * kWarps * kXR : 0);
  static constexpr size_t oBr = oR + (kRb ? sizeof(float2) * kD * kQP : 0);
  static constexpr size_t kBytes = oBr + (kRb ? sizeof(float) * kChunk * kBP : 0);
  static_assert(kThreads % kTPC == 0 && 32 % kTPC == 0, "a channel's lanes sit in one warp");
  static_assert(kNPT % 4 == 0 && kChunk % kV == 0 && kChunk % kS == 0 && kS % kG == 0, "widths");
  static_assert(kItems >= kCW, "channel reduce-scatter needs at least one item per lane");
  static_assert((kRowEl * sizeof(T)) % 16 == 0 && kBC % 4 == 0, "16-byte alignment");
  static_assert(kBytes <= 227 * 1024, "shared memory per block");
};

// The thread index through an opaque read: values derived from it inside the chunk loop are
// recomputed per chunk instead of being hoisted out of the loop and kept live (in registers)
// through pass 2, the register peak.
__device__ __forceinline__ int opaque_tid() {
  int t;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(t));
  return t;
}

__device__ __forceinline__ void prefetch_l2(const void* ptr) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(ptr));
}

// 8 consecutive elements from global memory: one or two 16-byte loads when `vec` (16-byte
// aligned) and all 8 are inside the sequence, else the first nval scalar (the rest 0)
template <typename T>
__device__ __forceinline__ void gload8(const T* src, bool vec, int nval, float (&v)[8]) {
  if (vec && nval >= 8) {
    load8(src, 0, 0, v);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = i < nval ? to_float(src[i]) : 0.f;
  }
}

// two consecutive elements, one 4-byte (8-byte for float) store; dst aligned to that; the same
// round-to-nearest conversions as from_float
__device__ __forceinline__ void store2(__nv_bfloat16* dst, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(a, b);
}
__device__ __forceinline__ void store2(__half* dst, float a, float b) {
  *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(a, b);
}
__device__ __forceinline__ void store2(float* dst, float a, float b) {
  *reinterpret_cast<float2*>(dst) = make_float2(a, b);
}

// kIO 2 = kFuse (backward variant 2, SSM_KERNELS_SSCAN_BWD_VARIANT=2; N <= 16, B and C time-varying;
// bench/NOTES.md "backward variant 2"): the same passes and arithmetic with the I/O cut down:
//   - staging by owner rows (RowStager, as the lean forward) with the row pointers recomputed per
//     chunk from an opaque thread index (variant 1 kept them live: 255 registers + spills);
//   - convert in tasks of 8 steps (16-byte smem loads, no per-step branches on full chunks);
//   - du, ddelta, dz stored to global memory by the owner lane straight from pass 2 (no s_q
//     write-back, no output pass, no barrier after the last sub-chunk);
//   - the per-sub-chunk sum of the 4 warps' dB/dC partials as straight-line code whose result
//     goes straight to the float32 partial buffer (no s_B/s_C write-back, no output pass).
// kIO 3 (variant 3) = kIO 2 + kDirect (BwdLayout): 3 blocks per SM (launch bounds: <= 168
// registers). kIO 4 (variant 4; issue 9 session 7) = kIO 2 with aligned chunks staged by
// PieceStager (consecutive lanes copy one row's 128-byte window: 4 lines per warp-wide cp.async
// instead of 32 half-sectors; unaligned inputs use RowStager). kIO 6 (variant 6; issue 9 session 8,
// helper sscan8) = kIO 3 (kDirect, 3 blocks per SM) + kIO 5's reductions through the per-warp tile
// (kXch): 72 KB. Variant 7 picks 6 or 5 per launch by wave count (selective_scan_bwd_cuda). Every value is computed by the same expression as kIO 0: bitwise equal gradients.
// The body is a device function so that each kIO gets its own launch bounds (kIO 0 keeps plain
// __launch_bounds__(128): with a min-blocks of 1, ptxas goes to 255 registers and spills).
template <typename T, int kNPT, int kTPC, int kChunk, int kS, int kMode, int kIO>
__device__ __forceinline__ void selective_scan_bwd_body(const SelectiveScanBwdParams& p) {
  constexpr bool kFuse = kIO >= 2, kDirect = kIO == 3 || kIO == 6;
  // kIO 10, 11 (backward variants 10, 11; issue 9 session 10, bench/NOTES.md "sscan10"): kIO 8 with
  // the lanes remapped as in the forward's variant 9 (lane = ch0 | slice << 1 | (ch >> 1) << 3 within
  // a warp's 8 channels): lanes T, T^1 share the slice, so every B/C LDS.128 is a "uniform pair"
  // load (2 shared-memory passes instead of 4), and T, T^2 share the channel ((dt, dt u, dy, -) pairs
  // as before). kIO 10 also does both warp reductions by shuffles (reduce-scatter over the channel
  // lanes' xor masks 16, 8, 1 and over the slice lanes at stride 2; variant 2's trees) instead of
  // the shared tile: 7 + 6 SHFL instead of 16 + 16 wavefronts per exchange. kIO 11 keeps kIO 8's
  // shared-tile reductions (their addresses come from (cidx, slice), so they stay conflict-free).
  // The thread -> (channel, slice) map changes, every thread's arithmetic does not: bitwise equal.
  constexpr bool kRemap = kIO == 10 || kIO == 11;
  constexpr bool kXch = kIO == 5 || kIO == 6 || kIO == 8 || kIO == 11;
  // kIO 8: chunks of kChunk steps, checkpoints every kSplit chunks; an upper half first rebuilds
  // the state at its start from the checkpoint over the lower half (the rebuild tiles)
  constexpr bool kRb = kIO == 8 || kRemap;
  constexpr int kSplit = kRb ? 2 : 1;
  using Lay = BwdLayout<T, kNPT, kTPC, kChunk, kS, kDirect, kXch, kRb>;
  constexpr int kD = Lay::kD, kNP = Lay::kNP, kV = Lay::kV, kRowEl = Lay::kRowEl, kNV = Lay::kNV;
  constexpr int kRows = Lay::kRows, kQP = Lay::kQP, kBP = Lay::kBP;
  constexpr int kCW = Lay::kCW, kG = Lay::kG, kItems = Lay::kItems, kOwn = Lay::kOwn;
  extern __shared__ __align__(16) unsigned char smem[];
  T* raw = reinterpret_cast<T*>(smem);
  // (dt, dt u, dy, u) -> (du, ddt, dz, -); kDirect: (dt, dt u, dy, softplus'), read only
  float4* s_q = reinterpret_cast<float4*>(smem + Lay::oQ);
  float2* s_f = reinterpret_cast<float2*>(smem + Lay::oF);  // (softplus', dz / (y + D u)); !kDirect
  float* s_B = reinterpret_cast<float*>(smem + Lay::oB);    // B [t][n] (or [ch][n]); later dB [t][n]
  float* s_C = reinterpret_cast<float*>(smem + Lay::oC);
  float* s_st = reinterpret_cast<float*>(smem + Lay::oSt);  // [sub-chunk][ch][n] states
  float* s_wp = reinterpret_cast<float*>(smem + Lay::oWp);  // [buf][warp][dB|dC][step][n]
  float* s_Dv = reinterpret_cast<float*>(smem + Lay::oDv);
  float* s_bias = s_Dv + kD;
  [[maybe_unused]] float2* s_r = reinterpret_cast<float2*>(smem + Lay::oR);  // kRb: (dt, dt u)
  [[maybe_unused]] float* s_Br = reinterpret_cast<float*>(smem + Lay::oBr);   // kRb: B [t][n]

  const int tid = threadIdx.x;
  // thread -> (channel, slice, channel lane in the warp); kRemap: see above (kTPC 4, 8 per warp)
  static_assert(!kRemap || (kTPC == 4 && kNPT == 4), "remap: 4 lanes x 4 states per channel");
  auto ch_of = [](int t) { return kRemap ? (t >> 5) * 8 + ((t >> 3) & 3) * 2 + (t & 1) : t / kTPC; };
  auto slice_of = [](int t) { return kRemap ? (t >> 1) & 3 : t % kTPC; };
  auto cidx_of = [](int t) { return kRemap ? ((t >> 3) & 3) * 2 + (t & 1) : (t % 32) / kTPC; };
  const int ch = ch_of(tid), slice = slice_of(tid);
  const int warp = tid / 32, cidx = cidx_of(tid);  // cidx: channel index within the warp
  const int64_t DG = p.dim / p.groups;
  const int64_t g = blockIdx.y, s = blockIdx.z;
  const int64_t dl0 = static_cast<int64_t>(blockIdx.x) * kD;
  const int64_t d0 = g * DG + dl0;
  const int nch = static_cast<int>(DG - dl0 < kD ? DG - dl0 : kD);
  const bool ch_ok = ch < nch;
  const int64_t d_v = d0 + ch, d = d_v;
  const int N = static_cast<int>(p.N);
  const int64_t L = p.L;
  const bool has_z = p.z != nullptr, has_D = p.D != nullptr;
  const bool B_var = p.B_var, C_var = p.C_var;
  // kMode 0: B, C time-invariant; 1: both time-varying; 2: one of each. Compile-time so the
  // unrolled loops carry no per-update branches: kRed reduce-scatters dB/dC over the channels
  // (time-varying), kAcc sums them over time in registers (time-invariant); mixed does both.
  constexpr bool kRed = kMode != 0, kAcc = kMode != 1;

  int64_t bos = 0, Ts = L, b = s, ck0 = s * p.ck_per_batch;
  if (p.cu_seqlens) {
    bos = p.cu_seqlens[s];
    Ts = p.cu_seqlens[s + 1] - bos;
    b = 0;
    ck0 = p.ck_offsets ? p.ck_offsets[s] : 0;
  }
  const int64_t ubase_v = (b * p.dim + d0) * L + bos;
  const int64_t bcbase_v = ((b * p.groups + g) * p.N) * L + bos;
  // per-block partials of time-varying dB/dC: (dtiles, batch, G, N, L)
  const int64_t pbase_v = ((static_cast<int64_t>(blockIdx.x) * p.batch + b) * p.groups + g) * p.N * L + bos;
  // kIO 8 (launch bounds 3 blocks per SM = 168 registers): the three block-uniform bases live in
  // shared memory, reread (volatile) where used, so that ptxas does not spill them to local memory
  __shared__ int64_t s_base[3];
  if constexpr (kRb) {
    if (tid == 0) {
      s_base[0] = ubase_v;
      s_base[1] = bcbase_v;
      s_base[2] = pbase_v;
    }
    __syncthreads();
  }
  auto base_of = [&](int i, int64_t v) -> int64_t {
    if constexpr (kRb) return static_cast<volatile int64_t*>(s_base)[i];
    else return v;
  };
#define ubase base_of(0, ubase_v)
#define bcbase base_of(1, bcbase_v)
#define pbase base_of(2, pbase_v)
  const T* gu = static_cast<const T*>(p.u);
  const T* gdelta = static_cast<const T*>(p.delta);
  const T* gz = static_cast<const T*>(p.z);
  const T* gdout = static_cast<const T*>(p.dout);
  const T* gB = static_cast<const T*>(p.B);
  const T* gC = static_cast<const T*>(p.C);

  if (tid < kD) {
    s_Dv[tid] = (has_D && tid < nch) ? p.D[d0 + tid] : 0.f;
    s_bias[tid] = (p.delta_bias && tid < nch) ? p.delta_bias[d0 + tid] : 0.f;
  }
  for (int i = tid; i < kD * kNP; i += kThreads) {  // time-invariant B/C: [ch][n], time stride 0
    const int r = i / kNP, n = i % kNP;
    const bool ok = r < nch && n < N;
    if (!B_var) s_B[i] = ok ? static_cast<const float*>(p.B)[(d0 + r) * p.N + n] : 0.f;
    if (!C_var) s_C[i] = ok ? static_cast<const float*>(p.C)[(d0 + r) * p.N + n] : 0.f;
  }

  // The cross-channel reduce of the dB / dC items of kG steps (sums over the warp's kCW channel
  // lanes; lane cidx keeps item cidx * kOwn ...). kIO 5: through a per-warp shared tile instead of
  // the shuffle reduce-scatter (7 SHFL + 14 FSEL + 7 FADD per lane per 8 items there; here 2 STS.128
  // + 8 LDS + 7 FADD + 2 WARPSYNC): each lane writes its 8 items to row cidx, then reads its item's
  // 8 channel values and adds them in the reduce-scatter's tree order
  // ((x0 + x4) + (x2 + x6)) + ((x1 + x5) + (x3 + x7)) -- float addition is commutative, so every
  // sum is bitwise the one reduce_scatter_lanes<8, kTPC> forms (bench/NOTES.md "sscanbwd7").
  [[maybe_unused]] float* s_x = reinterpret_cast<float*>(smem + Lay::oX) + warp * Lay::kXR;
  auto channel_reduce = [&](float (&v)[kItems]) {
    if constexpr (kXch) {
      static_assert(!kXch || (kItems == 8 && kCW == 8 && kTPC == 4 && kOwn == 1), "kXch layout");
      // row c (channel lane) = 32 floats: slice * 8 + item, rows with c odd have their two item
      // quads swapped (STS.128 phases of 8 lanes = 2 channels x 4 slices: conflict-free)
      const int sw = (cidx & 1) * 4;
      float* wr = s_x + cidx * 32 + slice * 8;
      __syncwarp();  // the previous exchange's reads are done
      *reinterpret_cast<float4*>(wr + sw) = make_float4(v[0], v[1], v[2], v[3]);
      *reinterpret_cast<float4*>(wr + (sw ^ 4)) = make_float4(v[4], v[5], v[6], v[7]);
      __syncwarp();
      const int off = slice * 8 + cidx;  // this lane's item cidx of slice: a permutation per row
      const float* r0 = s_x + off;        // even rows
      const float* r1 = s_x + (off ^ 4);  // odd rows
      float x[8];
#pragma unroll
      for (int c = 0; c < 8; ++c) x[c] = (c & 1) ? r1[c * 32] : r0[c * 32];
      v[0] = ((x[0] + x[4]) + (x[2] + x[6])) + ((x[1] + x[5]) + (x[3] + x[7]));
    } else if constexpr (kRemap) {  // channel lane bits 1, 2, 4 = lane xor 1, 8, 16
      reduce_scatter_xor<kCW, 1, 8, 16>(v, cidx);
    } else {
      reduce_scatter_lanes<kCW, kTPC>(v, cidx);
    }
  };
  // The sums over n of kS per-step values (y, d dt, g B) over the channel's kTPC lanes; lane slice
  // keeps steps slice * kS / kTPC ... kIO 5: through the same tile, row c = channel lane of 8 steps x
  // 4 slices with the steps rotated by c (8 STS + 2 LDS.128 + 6 FADD + 2 WARPSYNC instead of 6 SHFL
  // + 12 FSEL + 6 FADD); the adds in reduce_scatter_lanes<4, 1>'s order (x0 + x2) + (x1 + x3).
  auto slice_reduce = [&](float (&v)[kS]) {
    if constexpr (kXch) {
      static_assert(!kXch || (kS == 8 && kTPC == 4), "kXch layout");
      float* row = s_x + cidx * 32;
      __syncwarp();
#pragma unroll
      for (int j = 0; j < 8; ++j) row[((j + cidx) & 7) * 4 + slice] = v[j];
      __syncwarp();
#pragma unroll
      for (int o = 0; o < 2; ++o) {
        const float4 x = *reinterpret_cast<const float4*>(row + ((2 * slice + o + cidx) & 7) * 4);
        v[o] = (x.x + x.z) + (x.y + x.w);
      }
    } else {
      reduce_scatter_lanes<kTPC, kRemap ? 2 : 1>(v, slice);
    }
  };

  float a2[kNPT], carry[kNPT], dA[kNPT], dBc[kNPT], dCc[kNPT];
#pragma unroll
  for (int k = 0; k < kNPT; ++k) {
    const int n = slice * kNPT + k;
    const bool ok = ch_ok && n < N;
    a2[k] = ok ? p.A[d * p.N + n] * kLog2e : 0.f;  // padding: a = 1, B = C = 0
    carry[k] = ok ? p.dlast[(s * p.dim + d) * p.N + n] : 0.f;
    dA[k] = dBc[k] = dCc[k] = 0.f;
  }
  float dD_acc = 0.f, dbias_acc = 0.f;

  const int ush = static_cast<int>(ubase & (kV - 1)), lsh = static_cast<int>(L & (kV - 1));
  const int bsh = static_cast<int>(bcbase & (kV - 1));
  // raw row -> (tensor, element offset at time 0, read?); kFuse staging / kDirect prefetch
  // row hi + lo, the tensor taken from hi alone (lo < the distance from hi to the next row block:
  // lo = 0 for any row, or PieceStager::issue_direct's r0 < kRS with hi a multiple of kRS)
  auto row_of2 = [&](int hi, int lo, const T*& src, int64_t& e, bool& ok) {
    if (hi < 4 * kD) {
      const int kind = hi / kD, r = hi % kD + lo;
      src = kind == 0 ? gu : (kind == 1 ? gdelta : (kind == 2 ? gz : gdout));
      ok = r < nch && (kind != 2 || has_z);
      e = ubase + r * L;
    } else {
      // kIO 8 (PieceStager rows per block may exceed kNP: lo can cross from B into C)
      const int q = hi - 4 * kD + (kRb ? lo : 0), which = q / kNP, n = q % kNP + (kRb ? 0 : lo);
      src = which ? gC : gB;
      ok = n < N && (which ? C_var : B_var);
      e = bcbase + n * L;
    }
  };
  auto row_of = [&](int row, const T*& src, int64_t& e, bool& ok) { row_of2(row, 0, src, e, ok); };
  auto stage = [&](int64_t c0, int len) {  // the chunk at c0 -> raw buffer (kDirect: -> L2)
    if constexpr (kDirect) {  // L2 prefetch of the chunk's rows (128-byte lines)
      for (int row = opaque_tid(); row < kRows; row += kThreads) {
        const T* src;
        int64_t e;
        bool ok;
        row_of(row, src, e, ok);
        if (!ok) continue;
        const uintptr_t a = reinterpret_cast<uintptr_t>(src + e + c0);
        const uintptr_t end = reinterpret_cast<uintptr_t>(src + e + c0 + len);
        for (uintptr_t q = a & ~static_cast<uintptr_t>(127); q < end; q += 128)
          prefetch_l2(reinterpret_cast<const void*>(q));
      }
    } else if constexpr (kFuse) {
      const int otid = opaque_tid();
      if constexpr (kRb) {  // an upper half: its lower half's u, delta, B rows to L2 for the rebuild
        if (((c0 / kChunk) & 1) == 1 && otid < 2 * kD + kNP) {
          const T* src;
          int64_t e;
          bool ok;
          row_of(otid < 2 * kD ? otid : 2 * kD + otid, src, e, ok);  // u, delta rows; then B rows
          if (ok) {
            const uintptr_t a = reinterpret_cast<uintptr_t>(src + e + c0 - kChunk);
            const uintptr_t end = reinterpret_cast<uintptr_t>(src + e + c0);
            for (uintptr_t q = a & ~static_cast<uintptr_t>(127); q < end; q += 128)
              prefetch_l2(reinterpret_cast<const void*>(q));
          }
        }
      }
      if constexpr (kIO == 4 || kIO == 5 || kRb) {  // coalesced: kChunk / kV lanes per row window (whole lines)
        if (ush == 0 && lsh == 0 && bsh == 0) {
          PieceStager<T, kRows, kThreads, kRowEl, kChunk>::issue_direct(raw, otid, c0, len, row_of2);
          return;
        }
      }
      RowStager<T, kRows, kThreads, kRowEl> rows;
      rows.init(otid, row_of);
      rows.issue(raw, otid, c0, len);
    } else {
      for (int i = tid; i < kRows * kNV; i += kThreads) {
        const int row = i / kNV, j = i % kNV;
        const T* src;
        int64_t e;
        bool ok;
        if (row < 4 * kD) {
          const int kind = row / kD, r = row % kD;
          src = kind == 0 ? gu : (kind == 1 ? gdelta : (kind == 2 ? gz : gdout));
          ok = r < nch && (kind != 2 || has_z);
          e = ubase + r * L + c0;
        } else {
          const int q = row - 4 * kD, which = q / kNP, n = q % kNP;
          src = which ? gC : gB;
          ok = n < N && (which ? C_var : B_var);
          e = bcbase + n * L + c0;
        }
        const int shift = static_cast<int>(e & (kV - 1));
        const int valid = shift + len - j * kV;
        if (!ok || valid <= 0) continue;
        cp_async16(raw + row * kRowEl + j * kV, src + (e - shift) + j * kV,
                   (valid < kV ? valid : kV) * static_cast<int>(sizeof(T)));
      }
    }
  };

  const int64_t nchunks = (Ts + kChunk - 1) / kChunk;
  if (nchunks > 0) {
    const int64_t c0 = (nchunks - 1) * kChunk;
    stage(c0, static_cast<int>(Ts - c0));
    cp_async_commit();
  }

  for (int64_t c = nchunks - 1; c >= 0; --c) {
    const int64_t c0 = c * kChunk;
    const int len = static_cast<int>(Ts - c0 < kChunk ? Ts - c0 : kChunk);
    cp_async_wait_all();
    __syncthreads();  // chunk c has landed; chunk c+1's tiles are consumed

    // ---- convert: per (d, t) q = (dt, dt u, dy, u), f = (softplus', dz / y); B, C [t][n]
    if constexpr (kFuse) {
      const int tid = opaque_tid();  // (shadows tid: nothing of this phase is hoisted)
      if constexpr (kRb) {
        // an upper half (c odd): the lower half's (dt, dt u) and B from global memory (L2: the
        // previous stage prefetched them) with the convert's expressions -> the same floats
        if (c & 1) {
          const int64_t l0 = c0 - kChunk;  // the lower half: kChunk steps, all inside the sequence
          for (int task = tid; task < kD * (kChunk / 8); task += kThreads) {
            const int r = task % kD, t0 = (task / kD) * 8;
            const int sh = (ush + r * lsh) & (kV - 1);
            const int nval = r < nch ? kChunk - t0 : 0;
            float uu[8], dl[8];
            const int64_t e = ubase + r * L + l0 + t0;
            gload8(gu + e, sh == 0, nval, uu);
            gload8(gdelta + e, sh == 0, nval, dl);
            const float bias = s_bias[r];
            float2* orr = s_r + r * kQP + t0;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
              float2 q = make_float2(0.f, 0.f);
              if (r < nch) {
                const float x = dl[i] + bias;
                const float dt = p.softplus ? softplus_fast(x) : x;
                q = make_float2(dt, dt * uu[i]);
              }
              orr[i] = q;
            }
          }
          for (int task = tid; task < kNP * (kChunk / 8); task += kThreads) {
            const int n = task % kNP, t0 = (task / kNP) * 8;
            float v[8];
            const bool nok = n < N;
            gload8(gB + bcbase + n * L + l0 + t0, ((bsh + n * lsh) & (kV - 1)) == 0,
                   nok ? kChunk - t0 : 0, v);
#pragma unroll
            for (int i = 0; i < 8; ++i) s_Br[(t0 + i) * kBP + n] = nok ? v[i] : 0.f;
          }
        }
      }
      for (int task = tid; task < kD * (kChunk / 8); task += kThreads) {
        const int r = task % kD, t0 = (task / kD) * 8;
        const int sh = (ush + r * lsh) & (kV - 1);  // == (ubase + r L) mod kV
        const int nval = r < nch ? len - t0 : 0;
        float uu[8], dl[8], zz[8], dov[8];
        if constexpr (kDirect) {
          const int64_t e = ubase + r * L + c0 + t0;
          gload8(gu + e, sh == 0, nval, uu);
          gload8(gdelta + e, sh == 0, nval, dl);
          if (has_z) gload8(gz + e, sh == 0, nval, zz);
          gload8(gdout + e, sh == 0, nval, dov);
        } else {
          const T* ru = raw + r * kRowEl;
          load8(ru, t0, sh, uu);
          load8(ru + kD * kRowEl, t0, sh, dl);
          if (has_z) load8(ru + 2 * kD * kRowEl, t0, sh, zz);
          load8(ru + 3 * kD * kRowEl, t0, sh, dov);
        }
        const float bias = s_bias[r];
        float4* oq = s_q + r * kQP + t0;
        float2* of = s_f + r * kQP + t0;
        auto one = [&](int i, bool valid) {  // the expressions of the kFuse = false loop below
          float4 q = make_float4(0.f, 0.f, 0.f, 0.f);
          float2 f = make_float2(0.f, 0.f);
          if (valid) {
            const float x = dl[i] + bias;
            float dt = x, dsp = 1.f;
            if (p.softplus) {
              dt = softplus_fast(x);
              dsp = x > 20.f ? 1.f : sigmoid_fast(x);
            }
            float dy = dov[i], dzf = 0.f;
            if (has_z) {
              const float sig = sigmoid_fast(zz[i]);
              dy = dov[i] * zz[i] * sig;
              dzf = dov[i] * sig * fmaf(zz[i], 1.f - sig, 1.f);
            }
            q = make_float4(dt, dt * uu[i], dy, kDirect ? dsp : uu[i]);
            f = make_float2(dsp, dzf);
          }
          oq[i] = q;
          if constexpr (!kDirect) of[i] = f;
        };
        if (nval >= 8 && p.softplus && has_z) {  // the Mamba case: no per-step branches
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const float x = dl[i] + bias;
            const float dt = softplus_fast(x);
            const float dsp = x > 20.f ? 1.f : sigmoid_fast(x);
            const float sig = sigmoid_fast(zz[i]);
            oq[i] = make_float4(dt, dt * uu[i], dov[i] * zz[i] * sig, kDirect ? dsp : uu[i]);
            if constexpr (!kDirect) of[i] = make_float2(dsp, dov[i] * sig * fmaf(zz[i], 1.f - sig, 1.f));
          }
        } else if (nval >= 8) {
#pragma unroll
          for (int i = 0; i < 8; ++i) one(i, true);
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) one(i, i < nval);
        }
      }
      if (B_var || C_var) {
        for (int task = tid; task < 2 * kNP * (kChunk / 8); task += kThreads) {
          const int n = task % kNP, which = (task / kNP) & 1, t0 = (task / (2 * kNP)) * 8;
          if (!(which ? C_var : B_var)) continue;
          float* dst = (which ? s_C : s_B) + n;
          float v[8];
          const bool nok = n < N;
          if constexpr (kDirect) {
            gload8((which ? gC : gB) + bcbase + n * L + c0 + t0, ((bsh + n * lsh) & (kV - 1)) == 0,
                   nok ? len - t0 : 0, v);
          } else if (nok) {
            load8(raw + (4 * kD + which * kNP + n) * kRowEl, t0, (bsh + n * lsh) & (kV - 1), v);
          }
#pragma unroll
          for (int i = 0; i < 8; ++i) dst[(t0 + i) * kBP] = (nok && t0 + i < len) ? v[i] : 0.f;
        }
      }
    } else {
      for (int i = tid; i < kD * kChunk; i += kThreads) {
        const int r = i / kChunk, t = i % kChunk;
        float4 q = make_float4(0.f, 0.f, 0.f, 0.f);
        float2 f = make_float2(0.f, 0.f);
        if (t < len && r < nch) {
          const int sh = static_cast<int>((ubase + r * L) & (kV - 1)) + t;
          const float uu = to_float(raw[r * kRowEl + sh]);
          const float x = to_float(raw[(kD + r) * kRowEl + sh]) + s_bias[r];
          const float dout = to_float(raw[(3 * kD + r) * kRowEl + sh]);
          float dt = x, dsp = 1.f;
          if (p.softplus) {
            dt = softplus_fast(x);
            dsp = x > 20.f ? 1.f : sigmoid_fast(x);
          }
          float dy = dout, dzf = 0.f;
          if (has_z) {
            const float zz = to_float(raw[(2 * kD + r) * kRowEl + sh]);
            const float sig = sigmoid_fast(zz);
            dy = dout * zz * sig;
            dzf = dout * sig * fmaf(zz, 1.f - sig, 1.f);
          }
          q = make_float4(dt, dt * uu, dy, uu);
          f = make_float2(dsp, dzf);
        }
        s_q[r * kQP + t] = q;
        s_f[r * kQP + t] = f;
      }
      if (B_var || C_var) {
        for (int i = tid; i < kNP * kChunk; i += kThreads) {
          const int n = i / kChunk, t = i % kChunk;
          const bool ok = t < len && n < N;
          const int sh = static_cast<int>((bcbase + n * L) & (kV - 1)) + t;
          if (B_var) s_B[t * kBP + n] = ok ? to_float(raw[(4 * kD + n) * kRowEl + sh]) : 0.f;
          if (C_var) s_C[t * kBP + n] = ok ? to_float(raw[(4 * kD + kNP + n) * kRowEl + sh]) : 0.f;
        }
      }
    }
    __syncthreads();  // tiles ready; the raw buffer is free
    if (c > 0) stage(c0 - kChunk, kChunk);
    cp_async_commit();

    const float4* q_ch = s_q + ch * kQP;
    const float* pB = B_var ? s_B + slice * kNPT : s_B + ch * kNP + slice * kNPT;
    const float* pC = C_var ? s_C + slice * kNPT : s_C + ch * kNP + slice * kNPT;
    const int sBt = B_var ? kBP : 0, sCt = C_var ? kBP : 0;
    float* st = s_st + ch * kNP + slice * kNPT;
    const int nsub = (len + kS - 1) / kS;  // sub-chunks holding real steps (block-uniform)

    // ---- pass 1: the states entering every sub-chunk, from the checkpoint
    {
      float h[kNPT];
      // kIO 8: the channel from an opaque thread index (int64 d is not kept live through the loop)
      const int64_t dck = kRb ? d0 + ch_of(opaque_tid()) : d;
      const float* src = p.ckpt + ((ck0 + c / kSplit) * p.dim + dck) * p.N + slice * kNPT;
#pragma unroll
      for (int k = 0; k < kNPT; ++k) h[k] = (ch_ok && slice * kNPT + k < N) ? src[k] : 0.f;
      if constexpr (kRb) {
        if (c & 1) {  // the state at this upper half's start: pass 1's recurrence over the lower half
          const float2* r_ch = s_r + ch * kQP;
          const float* pBr = s_Br + slice * kNPT;
#pragma unroll 8
          for (int t = 0; t < kChunk; ++t) {
            const float2 x = r_ch[t];
            float bv[kNPT];
            load_vec(bv, pBr + t * kBP);
#pragma unroll
            for (int k = 0; k < kNPT; ++k) h[k] = fmaf(ex2(x.x * a2[k]), h[k], x.y * bv[k]);
          }
        }
      }
      for (int sc = 0; sc < nsub; ++sc) {
#pragma unroll
        for (int k = 0; k < kNPT; k += 4)
          *reinterpret_cast<float4*>(st + sc * kD * kNP + k) = make_float4(h[k], h[k + 1], h[k + 2], h[k + 3]);
        if (sc == nsub - 1) break;
#pragma unroll
        for (int j = 0; j < kS; ++j) {
          const int t = sc * kS + j;
          const float4 x = q_ch[t];
          float bv[kNPT];
          load_vec(bv, pB + t * sBt);
#pragma unroll
          for (int k = 0; k < kNPT; ++k) h[k] = fmaf(ex2(x.x * a2[k]), h[k], x.y * bv[k]);
        }
      }
    }

    // ---- pass 2: sub-chunks last to first
    int buf = 0;
    for (int sc = nsub - 1; sc >= 0; --sc) {
      float* wp = s_wp + buf * Lay::kWP + warp * (2 * kS * kNP);  // this warp's [dB|dC][step][n]
      // kIO 8: the lane's write position in wp (item cidx of its kG steps: kOwn == 1), one pointer
      // from an opaque thread index per sub-chunk instead of warp / cidx / slice terms kept live
      // through the chunk loop (ptxas spilled those at 168 registers)
      [[maybe_unused]] float* wl = wp;
      if constexpr (kRb) {
        static_assert(!kRb || Lay::kOwn == 1, "one item per lane");
        const int t2 = opaque_tid(), c2 = cidx_of(t2);
        wl = s_wp + buf * Lay::kWP + (t2 / 32) * (2 * kS * kNP) + (c2 / kNPT) * kNP +
             slice_of(t2) * kNPT + c2 % kNPT;
      }
      // kIO 8: the B/C read pointers likewise (B and C time-varying: [t][n], C kBC floats after B)
      const float* pB2 = pB;
      const float* pC2 = pC;
      [[maybe_unused]] const int sBt2 = kRb ? kBP : sBt, sCt2 = kRb ? kBP : sCt;
      if constexpr (kRb) {
        pB2 = s_B + slice_of(opaque_tid()) * kNPT;
        pC2 = pB2 + (Lay::oC - Lay::oB) / sizeof(float);
      }
      float a[kS][kNPT], P[kS][kNPT], yv[kS], dv[kS], gv[kS];
      {
        float h[kNPT], ic[kItems];
        load_vec(h, st + sc * kD * kNP);
#pragma unroll
        for (int j = 0; j < kS; ++j) {
          const int t = sc * kS + j;
          const float4 x = q_ch[t];
          float bv[kNPT], cv[kNPT];
          load_vec(bv, pB2 + t * sBt2);
          load_vec(cv, pC2 + t * sCt2);
          float y = 0.f;
#pragma unroll
          for (int k = 0; k < kNPT; ++k) {
            a[j][k] = ex2(x.x * a2[k]);
            P[j][k] = a[j][k] * h[k];
            h[k] = fmaf(x.y, bv[k], P[j][k]);
            y = fmaf(cv[k], h[k], y);
            const float dch = x.z * h[k];
            if constexpr (kRed) ic[(j % kG) * kNPT + k] = dch;
            if constexpr (kAcc) dCc[k] += dch;
          }
          yv[j] = y;
          if (kRed && j % kG == kG - 1) {
            channel_reduce(ic);
#pragma unroll
            for (int o = 0; o < kOwn; ++o) {
              const int item = cidx * kOwn + o;
              const int tl = j - (kG - 1) + item / kNPT;
              if constexpr (kRb) wl[kS * kNP + (j - (kG - 1)) * kNP] = ic[0];
              else wp[kS * kNP + tl * kNP + slice * kNPT + item % kNPT] = ic[o];
            }
          }
        }
      }
      slice_reduce(yv);  // sum over n of y, per step
      constexpr int kMine = kS >= kTPC ? kS / kTPC : 1;
      constexpr int kRep = kS >= kTPC ? 1 : kTPC / kS;  // lanes holding the same sums
      // (kIO 8: from an opaque thread index, as below: fewer values live through the loop)
      const int j0 = kS >= kTPC ? (kRb ? slice_of(opaque_tid()) : slice) * kMine : slice / kRep;
      const bool owner = (slice % kRep) == 0;
      // kDirect: the owner's u, z, dout of its steps, loaded here so that the reduce-scatters
      // below (adjoint, sums) cover the (L2) latency
      [[maybe_unused]] T lu[kMine], lz[kMine], ldo[kMine];
      if constexpr (kDirect) {
#pragma unroll
        for (int o = 0; o < kMine; ++o) {
          const int t = sc * kS + j0 + o;
          if (owner && ch_ok && t < len) {
            const int64_t e = ubase + ch * L + c0 + t;
            lu[o] = gu[e];
            if (has_z) {
              lz[o] = gz[e];
              ldo[o] = gdout[e];
            }
          }
        }
      }
      {
        float ib[kItems];
#pragma unroll
        for (int j = kS - 1; j >= 0; --j) {
          const int t = sc * kS + j;
          const float4 x = q_ch[t];
          float bv[kNPT], cv[kNPT];
          load_vec(bv, pB2 + t * sBt2);
          load_vec(cv, pC2 + t * sCt2);
          float dd = 0.f, gb = 0.f;
#pragma unroll
          for (int k = 0; k < kNPT; ++k) {
            const float gg = fmaf(x.z, cv[k], carry[k]);
            const float gp = gg * P[j][k];
            dA[k] = fmaf(x.x, gp, dA[k]);
            dd = fmaf(a2[k], gp, dd);
            gb = fmaf(gg, bv[k], gb);
            const float db = x.y * gg;
            if constexpr (kRed) ib[(j % kG) * kNPT + k] = db;
            if constexpr (kAcc) dBc[k] += db;
            carry[k] = a[j][k] * gg;
          }
          dv[j] = dd;
          gv[j] = gb;
          if (kRed && j % kG == 0) {
            channel_reduce(ib);
#pragma unroll
            for (int o = 0; o < kOwn; ++o) {
              const int item = cidx * kOwn + o;
              const int tl = j + item / kNPT;
              if constexpr (kRb) wl[j * kNP] = ib[0];
              else wp[tl * kNP + slice * kNPT + item % kNPT] = ib[o];
            }
          }
        }
      }
      // sums over n: d dt, g B per step, reduce-scattered over the channel's lanes
      slice_reduce(dv);
      slice_reduce(gv);
      if constexpr (!kFuse) __syncwarp();  // every lane's reads of this sub-chunk's q precede the owners' writes
      {
        const float Dv = s_Dv[ch];
        float odu[kMine], odd[kMine], odz[kMine];  // kFuse: this lane's outputs, stored below
#pragma unroll
        for (int o = 0; o < kMine; ++o) {
          const int t = sc * kS + j0 + o;
          if (owner && ch_ok && t < len) {
            const float4 x = q_ch[t];
            float uu, dsp, dzf;  // u, softplus', dz / (y + D u): the convert's expressions
            if constexpr (kDirect) {
              uu = to_float(lu[o]);
              dsp = x.w;
              dzf = 0.f;
              if (has_z) {
                const float zz = to_float(lz[o]), dov = to_float(ldo[o]);
                const float sig = sigmoid_fast(zz);
                dzf = dov * sig * fmaf(zz, 1.f - sig, 1.f);
              }
            } else {
              const float2 f = s_f[ch * kQP + t];
              uu = x.w;
              dsp = f.x;
              dzf = f.y;
            }
            const float ddt = fmaf(dv[o], kLn2, uu * gv[o]) * dsp;
            const float du = fmaf(x.x, gv[o], Dv * x.z);
            const float dz = dzf * fmaf(Dv, uu, yv[o]);
            dD_acc = fmaf(x.z, uu, dD_acc);
            dbias_acc += ddt;
            if constexpr (kFuse) {
              odu[o] = du; odd[o] = ddt; odz[o] = dz;
            } else {
              s_q[ch * kQP + t] = make_float4(du, ddt, dz, 0.f);
            }
          }
        }
        if constexpr (kFuse) {  // straight to global memory: du, ddelta, dz of (d, c0 + t0 + o)
          static_assert(!kFuse || kMine == 2, "kFuse: two steps per owner lane");
          const int t0 = sc * kS + j0;
          if (owner && ch_ok && t0 < len) {
            const int64_t e = ubase + (kRb ? ch_of(opaque_tid()) : ch) * L + c0 + t0;
            T* gdu = static_cast<T*>(p.du) + e;
            T* gdd = static_cast<T*>(p.ddelta) + e;
            T* gdz = static_cast<T*>(p.dz) + e;
            // both steps in the sequence and e even (t0 is): one 4/8-byte store per output
            if (t0 + 1 < len && ((ush + ch * lsh) & 1) == 0) {
              store2(gdu, odu[0], odu[1]);
              store2(gdd, odd[0], odd[1]);
              if (has_z) store2(gdz, odz[0], odz[1]);
            } else {
#pragma unroll
              for (int o = 0; o < kMine; ++o) {
                if (t0 + o >= len) break;
                gdu[o] = from_float<T>(odu[o]);
                gdd[o] = from_float<T>(odd[o]);
                if (has_z) gdz[o] = from_float<T>(odz[o]);
              }
            }
          }
        }
      }
      __syncthreads();  // the sub-chunk's per-warp dB/dC partials are complete
      if constexpr (kFuse) {
        // B and C both varying; 2 kS kNP == 2 kThreads items (which, step, n): thread tid sums
        // which = tid / 64, n = (tid / 4) % 16, steps tl, tl + 1 (tl = 2 (tid % 4)) over the 4
        // warps (the order of additions below) and stores them as one 8-byte pair, so a warp
        // writes 8 rows x 32 bytes: whole sectors
        static_assert(!kFuse || (kMode == 1 && kS == 8 && kNP == 16 && kThreads == 128),
                      "lean warp sums");
        const int tid = opaque_tid();
        const int which = tid >> 6, n = (tid >> 2) & 15, tl = (tid & 3) * 2;
        const float* w0 = s_wp + buf * Lay::kWP + which * kS * kNP + tl * kNP + n;
        float acc[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          acc[j] = w0[j * kNP];
#pragma unroll
          for (int w = 1; w < kWarps; ++w) acc[j] += w0[w * 2 * kS * kNP + j * kNP];
        }
        const int t = sc * kS + tl;
        if (n < N && t < len) {  // partials of (n, c0 + t, c0 + t + 1), straight to global memory
          const int64_t e = pbase + n * L + c0 + t;
          float* dst = (which ? p.dC_part : p.dB_part) + e;
          if (t + 1 < len && (e & 1) == 0) {
            store2(dst, acc[0], acc[1]);
          } else {
            dst[0] = acc[0];
            if (t + 1 < len) dst[1] = acc[1];
          }
        }
      }
      if (!kFuse && (B_var || C_var)) {  // add the warps in order; B/C of this sub-chunk are dead
        const float* w0 = s_wp + buf * Lay::kWP;
        for (int i = tid; i < 2 * kS * kNP; i += kThreads) {
          const int which = i / (kS * kNP), tl = (i / kNP) % kS, n = i % kNP;
          if (!(which ? C_var : B_var)) continue;
          float acc = w0[i];
#pragma unroll
          for (int w = 1; w < kWarps; ++w) acc += w0[w * 2 * kS * kNP + i];
          (which ? s_C : s_B)[(sc * kS + tl) * kBP + n] = acc;
        }
      }
      buf ^= 1;
    }
    if constexpr (kFuse) continue;  // outputs were written from pass 2 and the warp sums
    __syncthreads();  // du / ddt / dz and dB / dC tiles complete

    // ---- output
    T* gdu = static_cast<T*>(p.du);
    T* gdd = static_cast<T*>(p.ddelta);
    T* gdz = static_cast<T*>(p.dz);
    for (int i = tid; i < kD * kChunk; i += kThreads) {
      const int r = i / kChunk, t = i % kChunk;
      if (t >= len || r >= nch) continue;
      const int64_t e = ubase + r * L + c0 + t;
      const float4 q = s_q[r * kQP + t];
      gdu[e] = from_float<T>(q.x);
      gdd[e] = from_float<T>(q.y);
      if (has_z) gdz[e] = from_float<T>(q.z);
    }
    if (B_var || C_var) {
      for (int i = tid; i < kNP * kChunk; i += kThreads) {
        const int n = i / kChunk, t = i % kChunk;
        if (t >= len || n >= N) continue;
        const int64_t e = pbase + n * L + c0 + t;
        if (B_var) p.dB_part[e] = s_B[t * kBP + n];
        if (C_var) p.dC_part[e] = s_C[t * kBP + n];
      }
    }
  }
  cp_async_wait_all();
#undef ubase
#undef bcbase
#undef pbase

  // ---- per-sequence results
  {
  [[maybe_unused]] const int64_t d = kRb ? d0 + ch_of(opaque_tid()) : d_v;  // kIO 8: recomputed
  if (ch_ok) {
    const int64_t o = (s * p.dim + d) * p.N + slice * kNPT;
#pragma unroll
    for (int k = 0; k < kNPT; ++k) {
      if (slice * kNPT + k >= N) continue;
      if (p.dh0) p.dh0[o + k] = carry[k];  // a[0] g[0]
      p.dA_part[o + k] = dA[k];
      if (!B_var) p.dB_part[o + k] = dBc[k];
      if (!C_var) p.dC_part[o + k] = dCc[k];
    }
  }
#pragma unroll
  for (int m = 1; m < kTPC; m *= 2) {  // over the channel's lanes, fixed order (slice bit m)
    dD_acc += __shfl_xor_sync(0xffffffffu, dD_acc, kRemap ? 2 * m : m);
    dbias_acc += __shfl_xor_sync(0xffffffffu, dbias_acc, kRemap ? 2 * m : m);
  }
  if (ch_ok && slice == 0) {
    if (p.dD_part) p.dD_part[s * p.dim + d] = dD_acc;
    if (p.dbias_part) p.dbias_part[s * p.dim + d] = dbias_acc;
  }
  }
}

template <typename T, int kNPT, int kTPC, int kChunk, int kS, int kMode, int kIO>
__global__ void __launch_bounds__(kThreads) selective_scan_bwd_kernel(const SelectiveScanBwdParams p) {
  selective_scan_bwd_body<T, kNPT, kTPC, kChunk, kS, kMode, kIO>(p);
}
template <typename T, int kNPT, int kTPC, int kChunk, int kS, int kMode, int kIO>
__global__ void __launch_bounds__(kThreads, (kIO == 3 || kIO == 6 || (kIO >= 8 && sizeof(T) < 4)) ? 3 : 2)
    selective_scan_bwd_kernel_mb(const SelectiveScanBwdParams p) {  // kIO 2, 3: min blocks per SM
  selective_scan_bwd_body<T, kNPT, kTPC, kChunk, kS, kMode, kIO>(p);
}

// ---- deterministic partial sums: dst[i] = cast(sum_{j < parts} src[j * stride + i]), j in order

struct SumJob {
  const float* src = nullptr;
  void* dst = nullptr;
  int64_t n = 0, stride = 0;
  int parts = 0;
  DType dtype = DType::kFloat32;
};
constexpr int kMaxJobs = 8;
struct SumJobs {
  SumJob job[kMaxJobs];
};

__global__ void __launch_bounds__(256) sum_parts_kernel(const SumJobs jobs) {
  const SumJob& jb = jobs.job[blockIdx.y];
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < jb.n; i += step) {
    float acc = 0.f;
    for (int j = 0; j < jb.parts; ++j) acc += jb.src[j * jb.stride + i];
    switch (jb.dtype) {
      case DType::kFloat32: static_cast<float*>(jb.dst)[i] = acc; break;
      case DType::kFloat16: static_cast<__half*>(jb.dst)[i] = from_float<__half>(acc); break;
      case DType::kBFloat16: static_cast<__nv_bfloat16*>(jb.dst)[i] = from_float<__nv_bfloat16>(acc); break;
    }
  }
}

template <typename T, int kNPT, int kTPC, int kChunk, int kS, int kMode, int kIO = 0>
cudaError_t launch_mode(const SelectiveScanBwdParams& p, cudaStream_t stream) {
  constexpr bool kRbL = kIO == 8 || kIO == 10 || kIO == 11;  // 32-step chunks, rebuild tiles
  using Lay = BwdLayout<T, kNPT, kTPC, kChunk, kS, kIO == 3 || kIO == 6,
                        kIO == 5 || kIO == 6 || kIO == 8 || kIO == 11, kRbL>;
  if (p.ck_len != (kRbL ? 2 : 1) * kChunk) return cudaErrorInvalidValue;  // checkpoint spacing
  auto kernel = [] {
    if constexpr (kIO == 0) return selective_scan_bwd_kernel<T, kNPT, kTPC, kChunk, kS, kMode, kIO>;
    else return selective_scan_bwd_kernel_mb<T, kNPT, kTPC, kChunk, kS, kMode, kIO>;
  }();
  if (Lay::kBytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(Lay::kBytes));
    if (err != cudaSuccess) return err;
  }
  if constexpr (kIO != 0) {  // the variants count on 2 (kIO 2) / 3 (kIO 3) blocks per SM: ask
    // for the largest shared-memory carveout (a hint; the driver usually picks it anyway)
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
    if (err != cudaSuccess) return err;
  }
  const int64_t DG = p.dim / p.groups;
  const int64_t dtiles = (DG + Lay::kD - 1) / Lay::kD;
  const dim3 grid(static_cast<unsigned>(dtiles), static_cast<unsigned>(p.groups),
                  static_cast<unsigned>(p.nseq));
  kernel<<<grid, kThreads, Lay::kBytes, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  SumJobs jobs;
  int nj = 0;
  int64_t most = 0;
  auto add = [&](const float* src, void* dst, int64_t n, int64_t parts, DType dt) {
    if (dst == nullptr || n == 0) return;
    jobs.job[nj].src = src;
    jobs.job[nj].dst = dst;
    jobs.job[nj].n = n;
    jobs.job[nj].stride = n;
    jobs.job[nj].parts = static_cast<int>(parts);
    jobs.job[nj].dtype = dt;
    most = n > most ? n : most;
    ++nj;
  };
  const DType tdt = std::is_same<T, float>::value ? DType::kFloat32
                    : (std::is_same<T, __half>::value ? DType::kFloat16 : DType::kBFloat16);
  const int64_t dn = p.dim * p.N, var_n = p.batch * p.groups * p.N * p.L;
  add(p.dA_part, p.dA, dn, p.nseq, DType::kFloat32);
  if (p.B_var) add(p.dB_part, p.dB, var_n, dtiles, tdt);
  else add(p.dB_part, p.dB, dn, p.nseq, DType::kFloat32);
  if (p.C_var) add(p.dC_part, p.dC, var_n, dtiles, tdt);
  else add(p.dC_part, p.dC, dn, p.nseq, DType::kFloat32);
  if (p.D) add(p.dD_part, p.dD, p.dim, p.nseq, DType::kFloat32);
  if (p.delta_bias) add(p.dbias_part, p.dbias, p.dim, p.nseq, DType::kFloat32);
  if (nj == 0) return cudaSuccess;
  const int64_t blocks = (most + 255) / 256;
  const dim3 sgrid(static_cast<unsigned>(blocks < 2048 ? blocks : 2048), static_cast<unsigned>(nj));
  sum_parts_kernel<<<sgrid, 256, 0, stream>>>(jobs);
  return cudaGetLastError();
}

template <typename T, int kNPT, int kTPC, int kChunk, int kS>
cudaError_t launch(const SelectiveScanBwdParams& p, cudaStream_t stream) {
  if (p.B_var && p.C_var) return launch_mode<T, kNPT, kTPC, kChunk, kS, 1>(p, stream);
  if (!p.B_var && !p.C_var) return launch_mode<T, kNPT, kTPC, kChunk, kS, 0>(p, stream);
  return launch_mode<T, kNPT, kTPC, kChunk, kS, 2>(p, stream);
}

int g_bwd_variant = -1;  // -1: not read from the environment yet

// Variant 7 (issue 9 session 8, bench/NOTES.md "sscan8"): the N <= 16 backward block runs a whole
// sequence, so its time is (rounds of resident blocks) x (time of one block at that residency).
// Variant 5 holds 2 blocks per SM, variant 6 3 at ~1.62x the per-block time (measured on the H100
// for variant 3 vs 2: 1.056 ms in one round vs 2.617 / 2 per round at L 4096 -> 0.65 per L 2048).
// 6 pays iff ceil(blocks / 3 SMs) x 1.62 < ceil(blocks / 2 SMs): B8 D1536 (384 blocks, 132 SMs):
// 1 x 1.62 < 2 -> 6; B4 D4096 (512): 2 x 1.62 > 2 -> 5.
int g_num_sms[64] = {0};
// Variant 9 = 8 or 5 by the same arithmetic with ratio 1.5 (8 at v5's per-SM throughput; 3 blocks
// of v8 share an SM that 2 of v5 share): B8 D1536 -> 8, B4 D4096 -> 5.
bool bwd_three_per_sm_pays(const SelectiveScanBwdParams& p, double ratio) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  if (g_num_sms[dev] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0)
      return false;
    g_num_sms[dev] = n;
  }
  const int64_t sms = g_num_sms[dev];
  const int64_t DG = p.dim / p.groups;
  const int64_t blocks = (DG + 31) / 32 * p.groups * p.nseq;  // kThreads / kTPC = 32 channels
  const int64_t r2 = (blocks + 2 * sms - 1) / (2 * sms), r3 = (blocks + 3 * sms - 1) / (3 * sms);
  return static_cast<double>(r3) * ratio < static_cast<double>(r2);
}

}  // namespace

int selective_scan_bwd_variant(int set) {
  if (g_bwd_variant < 0) {
    const char* env = std::getenv("SSM_KERNELS_SSCAN_BWD_VARIANT");
    // default 9 (8 = 5 in 32-step chunks at 3 blocks/SM where the waves favour it, else 5; all
    // bitwise equal to 2): H100, session 9: 1.019 vs 1.095 (5) ms at B8 D1536 L2048 (picks 8),
    // 2.557 vs 2.558 at B4 D4096 L4096 (picks 5; 8 alone 3.167). Session 8: 5 beat 2 (1.086 vs
    // 1.139); session 6: 2 beat 0 (1.148 vs 1.559) and 3 lost the larger shape
    const int v = env ? std::atoi(env) : 9;
    g_bwd_variant = (v >= 2 && v <= 11) ? v : 0;
  }
  const int prev = g_bwd_variant;
  if (set == 0 || (set >= 2 && set <= 11)) g_bwd_variant = set;
  return prev;
}

int64_t selective_scan_bwd_channels_per_block(int64_t N) {
  // kThreads / kTPC of the bucket chosen below
  return N <= 32 ? kThreads / 4 : (N <= 64 ? kThreads / 8 : kThreads / 16);
}

cudaError_t selective_scan_bwd_cuda(const SelectiveScanBwdParams& p, DType dtype, cudaStream_t stream) {
  if (p.N < 1 || p.N > 256) return cudaErrorInvalidValue;
  cudaError_t err = cudaSuccess;
  // buckets (states per thread, threads per channel, chunk = checkpoint spacing chunk_len(N),
  // sub-chunk kept in registers): kS * kNPT = 32 keeps a and P in 64 registers (16 for N > 128,
  // where 64 spilled)
  int v = (p.N <= 16 && p.B_var && p.C_var) ? selective_scan_bwd_variant() : 0;
  if (v == 7) v = bwd_three_per_sm_pays(p, 1.62) ? 6 : 5;
  // (8 holds 3 blocks per SM only for 16-bit inputs: float32's raw tile makes it 79 KB, 2 per SM)
  if (v == 9) v = (dtype != DType::kFloat32 && bwd_three_per_sm_pays(p, 1.5)) ? 8 : 5;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (v == 2) err = launch_mode<T, 4, 4, 64, 8, 1, 2>(p, stream);
    else if (v == 3) err = launch_mode<T, 4, 4, 64, 8, 1, 3>(p, stream);
    else if (v == 4) err = launch_mode<T, 4, 4, 64, 8, 1, 4>(p, stream);
    else if (v == 5) err = launch_mode<T, 4, 4, 64, 8, 1, 5>(p, stream);
    else if (v == 6) err = launch_mode<T, 4, 4, 64, 8, 1, 6>(p, stream);
    else if (v == 8) err = launch_mode<T, 4, 4, 32, 8, 1, 8>(p, stream);  // checkpoints every 64
    // session 10: 8 with lanes remapped (uniform-pair B/C loads) and shuffle reductions (10) or
    // the shared-tile reductions (11); bitwise equal to 8
    else if (v == 10) err = launch_mode<T, 4, 4, 32, 8, 1, 10>(p, stream);
    else if (v == 11) err = launch_mode<T, 4, 4, 32, 8, 1, 11>(p, stream);
    else if (p.N <= 16) err = launch<T, 4, 4, 64, 8>(p, stream);
    else if (p.N <= 32) err = launch<T, 8, 4, 32, 4>(p, stream);
    else if (p.N <= 64) err = launch<T, 8, 8, 32, 4>(p, stream);
    else if (p.N <= 128) err = launch<T, 8, 16, 16, 4>(p, stream);
    else err = launch<T, 16, 16, 8, 1>(p, stream);
  });
  return err;
}

}  // namespace ssm
