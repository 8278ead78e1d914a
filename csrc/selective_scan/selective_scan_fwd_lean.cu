// selective scan forward for N <= 16 ("lean"; issue 9: was variant 2 of session 4's experiments,
// bitwise equal to the general kernel in selective_scan_fwd.cu and 1.3-1.4x faster on the H100).
//
// Same recurrence, thread layout and inner loop as selective_scan_fwd.cu (kTPC = 4 lanes per
// channel, kNPT = 4 states per lane, chunks of 32 steps double-buffered with cp.async), with the
// per-(d, t) work around the inner loop cut down -- in the general kernel it costs about as many
// instructions as the recurrence itself (~8 of ~15.6 per update):
//   - staging: each thread owns fixed raw rows, so the global source pointer, shift and enable
//     are computed once per sequence (no per-chunk int64 index math, no div/mod by kNV);
//   - convert: a task is 8 consecutive steps of one row, read with one 16-byte LDS (bf16/fp16;
//     two for fp32) when the row window is aligned (always when L % 8 == 0 and no varlen),
//     scalar otherwise; the z gate z sigmoid(z) is computed here and stored with u as a float2
//     (u, gate) next to (dt, dt u);
//   - output fused into the compute loop: after the y reduce-scatter, the lane that holds step t
//     of its channel applies (y + D u) gate and stores it to global memory. This removes the y
//     tile, its output pass and one of the three barriers per chunk.
// Arithmetic is the same expression by expression as the general kernel (softplus_fast,
// sigmoid_fast, fmaf(D, u, y) * gate, the same inner loop and reduce-scatter order), so outputs,
// final states and checkpoints are bitwise equal to it at the same (kNPT, kTPC) (checked on the
// H100, session 5).
#include "selective_scan/selective_scan.h"
#include <cstdlib>
#include <type_traits>
#include "selective_scan/sscan_common.cuh"

namespace ssm {
namespace {

using namespace sscan;

template <typename T, int kNPT, int kTPC, int kThr, int kChunk, int kCPT = 1, int kDDPad = 1>
struct LeanLayout {
  static constexpr int kD = kThr * kCPT / kTPC;  // channels per block (kCPT per thread)
  static constexpr int kNP = kNPT * kTPC;       // states per channel, padded
  static constexpr int kV = 16 / sizeof(T);     // elements per 16-byte vector
  static constexpr int kRowEl = kChunk + kV;    // raw row: aligned window covering one chunk
  static constexpr int kRows = 3 * kD + 2 * kNP;  // u, delta, z (kD each), B, C (kNP each)
  static constexpr int kG = 8;                  // steps per convert task
  static constexpr int kDDP = kChunk + kDDPad;  // float2 pitch of (dt, dt u) and (u, gate)
  static constexpr int kBP = kNP + 4;           // B/C pitch per step (float4 reads)
  // time-varying B/C tile [t][n]; time-invariant [ch][n] in conversion buffer 0's B/C tiles
  static constexpr int kBC = (kChunk * kBP > kD * kNP) ? kChunk * kBP : kD * kNP;
  static constexpr int kNRaw = 2, kNConv = 1;  // raw double buffer, one conversion buffer
  static constexpr size_t kRawBytes = sizeof(T) * kRows * kRowEl;
  static constexpr size_t kConvBytes = 2 * sizeof(float2) * kD * kDDP + 2 * sizeof(float) * kBC;
  static constexpr size_t kBytes = kNRaw * kRawBytes + kNConv * kConvBytes + sizeof(float) * kD;
  static constexpr int kTasksDD = kD * (kChunk / kG), kTasksBC = 2 * kNP * (kChunk / kG);
  static_assert(kThr % 32 == 0 && 32 % kTPC == 0, "a channel's lanes sit in one warp");
  static_assert((kNPT == 2 || kNPT % 4 == 0) && kChunk % kTPC == 0 && kChunk % kG == 0, "widths");
  static_assert((kRowEl * sizeof(T)) % 16 == 0 && kConvBytes % 16 == 0, "16-byte alignment");
};

// kN consecutive floats from shared memory (16-byte aligned for kN % 4 == 0, 8-byte for kN == 2)
template <int kN>
__device__ __forceinline__ void lds_vec(float (&dst)[kN], const float* src) {
  if constexpr (kN == 2) {
    const float2 q = *reinterpret_cast<const float2*>(src);
    dst[0] = q.x; dst[1] = q.y;
  } else {
    load_vec(dst, src);
  }
}

// exact 16-bit storage bits of a float that came from T (bf16 / fp16) and back (forward variants 7, 8)
template <typename T>
__device__ __forceinline__ unsigned f32_to_bits16(float f) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __float_as_uint(f) >> 16;  // f is a widened bf16: its low 16 bits are 0
  } else {
    return static_cast<unsigned>(__half_as_ushort(__float2half_rn(f)));  // exact: f is a widened half
  }
}
template <typename T>
__device__ __forceinline__ float lo16_to_f32(unsigned w) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) return __uint_as_float(w << 16);
  else return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
}
template <typename T>
__device__ __forceinline__ float hi16_to_f32(unsigned w) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) return __uint_as_float(w & 0xffff0000u);
  else return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}

// kBCVar: B and C both time-varying (the Mamba case), known at compile time so the inner loop's
// B/C tile reads take immediate offsets (no address arithmetic per step); else runtime strides.
// kPolyR > 0 (SSM_KERNELS_SSCAN_FWD_POLY, kBCVar only): the decay of state k at step t is
// ex2_poly (FMA pipe) instead of ex2 (SFU) iff (t + k) % kPolyR == 0 -- 1/kPolyR of the updates,
// spread over the lane's states (compile-time after unrolling). Off (0): the kernel is unchanged.
// kPieces (forward variants, SSM_KERNELS_SSCAN_FWD_VARIANT; issue 9 session 7): stage aligned
// chunks with PieceStager (kP lanes per row window: whole sectors per warp-wide cp.async) instead of
// owner rows; unaligned inputs fall back to RowStager. kOG > kTPC: the compute loop reduce-scatters
// y over kOG steps at once (lane slice ends with kOG / kTPC consecutive steps) and stores them as
// one vector (16 bytes at kOG = 32 for 16-bit T) instead of one 2-byte store per kTPC steps; the
// sums are the same pairwise additions (exchanged operands), so out is bitwise equal to kOG = kTPC.
// kCPT = 2 (forward variant 5): each thread runs its kNPT states of two channels, ch and ch + kThr /
// kTPC, from one B/C read per step (half the B/C shared-memory loads per update); same per-channel
// expressions (bitwise equal). Needs kOG > kTPC, kPolyR = 0.
template <typename T, int kNPT, int kTPC, int kThr, int kChunk, bool kBCVar, int kPolyR,
          bool kPieces = false, int kOG = kTPC, int kCPT = 1, int kS8 = 0>
__device__ __forceinline__ void sscan_fwd_lean_body(const SelectiveScanFwdParams& p) {
  static_assert(kOG % kTPC == 0 && kChunk % kOG == 0 && (kOG & (kOG - 1)) == 0, "output group");
  static_assert(kCPT == 1 || (kCPT == 2 && kOG > kTPC && kPolyR == 0), "two channels per thread");
  // kS8 (forward variants 6-10, issue 9 session 8; needs kOG > kTPC, kCPT 1, kPolyR 0), low two bits:
  // 1: (dt, dt u) and (u, gate) rows padded to an even pitch so two steps are one 16-byte LDS/STS;
  // 2: also B and C of a step kept as packed 16-bit pairs (one 32-bit word per state: B low, C
  // high) so a lane's 4 states of both are one LDS.128 (widened exactly by shift / mask); 3: only C
  // packed (B float32 LDS.128 + C LDS.64). 16-bit T only for 2 and 3 (float T: as 1). Bit 4 (kRemap):
  // lanes of a warp hold (channel, slice) as lane = ch0 | slice << 1 | (ch >> 1) << 3 (instead of
  // ch * 4 + slice), so lanes T and T^1 read the same B/C address (slice) and T and T^2 the same
  // (dt, dt u) (channel): shared-memory loads whose lane pairs agree return in half the cycles (L1
  // returns 128 B/cycle; a "uniform pair" LDS.128 takes 2 passes instead of 4); the y
  // reduce-scatter runs over lanes at stride 2 (the same slice-bit tree). Same floats, same
  // expressions, same summation trees: bitwise equal to variant 3.
  // kNPT 2 (forward variant 11; issue 9 session 10): kTPC 8 lanes x 2 states per channel, 256
  // threads (32 channels), twice the warps of kNPT 4 for the same grid; B and C LDS.64 per step; the
  // remap for kTPC 8 is lane = ch0 | slice << 1 | (ch >> 1) << 4 (4 channels per warp): T, T^1
  // share the slice (B/C uniform pairs), T, T^2 the channel. y is summed over 2 states per lane and
  // an 8-lane tree: not the kNPT 4 order (out within float32 rounding of variant 9; states and
  // checkpoints bitwise).
  static_assert(kS8 == 0 || (kBCVar && kOG > kTPC && kCPT == 1 && kPolyR == 0 &&
                             (kNPT == 4 || (kNPT == 2 && (kS8 & 3) == 1))),
                "variants 6-11");
  static_assert(kS8 == 0 || (kS8 & 3) != 0, "kS8: a mode in the low two bits");
  constexpr int kPackBC = sizeof(T) == 2 ? ((kS8 & 3) >= 2 ? (kS8 & 3) : 0) : 0;  // 2: B and C, 3: C
  constexpr bool kRemap = (kS8 & 4) != 0;
  // bit 8 (kBCI, kNPT 2 only): B and C of a step interleaved in one tile, [t][n][B|C] at a pitch of
  // 2 kBP floats (the B and C tiles' space), so a lane's 2 states of both are one LDS.128 per step
  constexpr bool kBCI = (kS8 & 8) != 0;
  static_assert(!kBCI || (kNPT == 2 && kPackBC == 0), "interleaved B/C: 2 states per lane");
  static_assert(!kRemap || kTPC == 4 || kTPC == 8, "remap: 4 or 8 lanes per channel");
  constexpr int kRS = kRemap ? 2 : 1;  // lane stride between a channel's slices
  using Lay = LeanLayout<T, kNPT, kTPC, kThr, kChunk, kCPT, (kS8 != 0 ? 2 : 1)>;
  constexpr int kD = Lay::kD, kNP = Lay::kNP, kV = Lay::kV, kRowEl = Lay::kRowEl;
  constexpr int kRows = Lay::kRows, kG = Lay::kG, kDDP = Lay::kDDP;
  constexpr int kBP = Lay::kBP;
  extern __shared__ __align__(16) unsigned char smem[];
  T* raw0 = reinterpret_cast<T*>(smem);
  unsigned char* conv0 = smem + Lay::kNRaw * Lay::kRawBytes;
  // conversion buffer cb: (dt, dt u) [ch][t], (u, gate) [ch][t], B, C [t][n]
  auto s_dd = [&](int cb) { return reinterpret_cast<float2*>(conv0 + cb * Lay::kConvBytes); };
  auto s_ug = [&](int cb) { return s_dd(cb) + kD * kDDP; };
  auto s_B = [&](int cb) { return reinterpret_cast<float*>(s_ug(cb) + kD * kDDP); };
  auto s_C = [&](int cb) { return s_B(cb) + Lay::kBC; };
  auto rawp = [&](int rb) { return raw0 + rb * (kRows * kRowEl); };
  float* s_bias = reinterpret_cast<float*>(conv0 + Lay::kNConv * Lay::kConvBytes);

  const int tid = threadIdx.x;
  const int ch = !kRemap ? tid / kTPC
                 : (kTPC == 4 ? (tid >> 5) * 8 + ((tid >> 3) & 3) * 2 + (tid & 1)
                              : (tid >> 5) * 4 + ((tid >> 4) & 1) * 2 + (tid & 1));
  const int slice = kRemap ? (tid >> 1) & (kTPC - 1) : tid % kTPC;
  const int64_t DG = p.dim / p.groups;
  const int64_t g = blockIdx.y, s = blockIdx.z;
  const int64_t dl0 = static_cast<int64_t>(blockIdx.x) * kD;
  const int64_t d0 = g * DG + dl0;
  const int nch = static_cast<int>(DG - dl0 < kD ? DG - dl0 : kD);
  const bool ch_ok = ch < nch;
  const int64_t d = d0 + ch;
  constexpr int kDc = kThr / kTPC;  // kCPT = 2: the second channel is ch + kDc
  const bool ch1_ok = kCPT == 2 && ch + kDc < nch;
  const int64_t d1 = d + kDc;
  const int N = static_cast<int>(p.N);
  const int64_t L = p.L;

  int64_t bos = 0, Ts = L, b = s, ck0 = s * p.ck_per_batch;
  if (p.cu_seqlens) {
    bos = p.cu_seqlens[s];
    Ts = p.cu_seqlens[s + 1] - bos;
    b = 0;
    ck0 = p.ck_offsets ? p.ck_offsets[s] : 0;
  }
  const int64_t ubase = (b * p.dim + d0) * L + bos;
  const int64_t bcbase = ((b * p.groups + g) * p.N) * L + bos;
  const T* gu = static_cast<const T*>(p.u);
  const T* gdelta = static_cast<const T*>(p.delta);
  const T* gz = static_cast<const T*>(p.z);
  const T* gB = static_cast<const T*>(p.B);
  const T* gC = static_cast<const T*>(p.C);
  const bool has_z = gz != nullptr, has_D = p.D != nullptr;
  // (u, delta, z rows share one shift per channel; B/C rows one per state); L % kV == 0 with
  // aligned bases makes every shift 0 and every convert load a 16-byte vector
  const int ush = static_cast<int>(ubase & (kV - 1)), lsh = static_cast<int>(L & (kV - 1));
  const int bsh = static_cast<int>(bcbase & (kV - 1));

  for (int i = tid; i < kD; i += kThr)
    s_bias[i] = (p.delta_bias && i < nch) ? p.delta_bias[d0 + i] : 0.f;
  for (int i = tid; i < kD * kNP; i += kThr) {
    const int r = i / kNP, n = i % kNP;
    const bool ok = r < nch && n < N;
    if (!p.B_var) s_B(0)[i] = ok ? static_cast<const float*>(p.B)[(d0 + r) * p.N + n] : 0.f;
    if (!p.C_var) s_C(0)[i] = ok ? static_cast<const float*>(p.C)[(d0 + r) * p.N + n] : 0.f;
  }
  const float Dv = (has_D && ch_ok) ? p.D[d] : 0.f;

  // this lane's states of channel dc: A log2(e) and the initial state (0 for padding)
  auto load_states = [&](int64_t dc, bool okc, float (&a)[kNPT], float (&hh)[kNPT]) {
#pragma unroll
    for (int k = 0; k < kNPT; ++k) {
      const int n = slice * kNPT + k;
      const bool ok = okc && n < N;
      a[k] = ok ? p.A[dc * p.N + n] * kLog2e : 0.f;
      hh[k] = (ok && p.h0) ? p.h0[(s * p.dim + dc) * p.N + n] : 0.f;
    }
  };
  auto store_states = [&](float* dst, bool okc, const float (&hh)[kNPT]) {  // dst: row + slice kNPT
    if (!okc) return;
#pragma unroll
    for (int k = 0; k < kNPT; ++k)
      if (slice * kNPT + k < N) dst[k] = hh[k];
  };
  float a2[kNPT], h[kNPT];
  load_states(d, ch_ok, a2, h);
  float Dv1 = 0.f, a2_1[kNPT], h_1[kNPT];  // kCPT = 2: channel ch + kDc
  if constexpr (kCPT == 2) {
    Dv1 = (has_D && ch1_ok) ? p.D[d1] : 0.f;
    load_states(d1, ch1_ok, a2_1, h_1);
  }

  const int ck_mask = p.ck_len - 1;
  const int ck_shift = __ffs(p.ck_len) - 1;
  auto save_ckpt = [&](int64_t t) {
    if constexpr (kCPT == 2)
      store_states(p.ckpt + ((ck0 + (t >> ck_shift)) * p.dim + d1) * p.N + slice * kNPT, ch1_ok, h_1);
    if (!ch_ok) return;
    float* dst = p.ckpt + ((ck0 + (t >> ck_shift)) * p.dim + d) * p.N + slice * kNPT;
#pragma unroll
    for (int k = 0; k < kNPT; ++k)
      if (slice * kNPT + k < N) dst[k] = h[k];
  };

  // staging: thread owns raw rows tid + k kThr
  // raw row -> (tensor, element offset at time 0, read?)
  auto row_of = [&](int row, const T*& src, int64_t& e, bool& ok) {
    if (row < 3 * kD) {
      const int kind = row / kD, r = row % kD;
      src = kind == 0 ? gu : (kind == 1 ? gdelta : gz);
      ok = r < nch && (kind < 2 || has_z);
      e = ubase + r * L;
    } else {
      const int q = row - 3 * kD, which = q / kNP, n = q % kNP;
      src = which ? gC : gB;
      ok = n < N && (which ? p.C_var : p.B_var);
      e = bcbase + n * L;
    }
  };
  RowStager<T, kRows, kThr, kRowEl> rows;
  rows.init(tid, row_of);
  // PieceStager iff every row's offset at time 0 is a multiple of kV (block-uniform)
  const bool pieces = kPieces && ush == 0 && lsh == 0 && bsh == 0;
  PieceStager<T, kRows, kThr, kRowEl, kChunk> prow;
  if constexpr (kPieces) {
    if (pieces) prow.init(tid, row_of);
  }
  auto stage = [&](int buf, int64_t c0, int len) {
    if constexpr (kPieces) {
      if (pieces) {
        prow.issue(rawp(buf), tid, c0, len);
        return;
      }
    }
    rows.issue(rawp(buf), tid, c0, len);
  };

  const int64_t nchunks = (Ts + kChunk - 1) / kChunk;
  const bool ck_on = p.ckpt != nullptr;
  auto chunk_len = [&](int64_t c) {
    const int64_t rest = Ts - c * kChunk;
    return static_cast<int>(rest < kChunk ? (rest > 0 ? rest : 0) : kChunk);
  };

  // ---- convert chunk (raw buffer rb, len steps) into conversion buffer cb
  auto convert = [&](int rb, int cb, int len) {
    const T* raw = rawp(rb);
    float2* sdd = s_dd(cb);
    float2* sug = s_ug(cb);
    // (dt, dt u), (u, gate): a task is 8 steps of one channel
    for (int task = tid; task < Lay::kTasksDD; task += kThr) {
      const int r = task % kD, t0 = (task / kD) * kG;
      const int sh = (ush + r * lsh) & (kV - 1);  // == (ubase + r L) mod kV
      const T* ru = raw + r * kRowEl;
      float uu[kG], dl[kG], zz[kG];
      load8(ru, t0, sh, uu);
      load8(ru + kD * kRowEl, t0, sh, dl);
      if (has_z) load8(ru + 2 * kD * kRowEl, t0, sh, zz);
      const float bias = s_bias[r];
      const bool rok = r < nch;
      float2* odd = sdd + r * kDDP + t0;
      float2* oug = sug + r * kDDP + t0;
      // every step valid (all but a sequence's last chunk): no per-step test; else steps past
      // the end get dt = dt u = 0 (h unchanged). Values are those of variant 0 either way.
      const int nval = rok ? len - t0 : 0;
      if constexpr (kS8 != 0) {  // same values, stored two steps per 16-byte STS
        float dtv[kG], dtuv[kG], gv[kG];
        if (nval >= kG && p.softplus && has_z) {
#pragma unroll
          for (int i = 0; i < kG; ++i) {
            dtv[i] = softplus_fast(dl[i] + bias);
            dtuv[i] = dtv[i] * uu[i];
            gv[i] = zz[i] * sigmoid_fast(zz[i]);
          }
        } else {
#pragma unroll
          for (int i = 0; i < kG; ++i) {
            float dt = 0.f, dtu = 0.f, gate = 1.f;
            if (i < nval) {
              const float x = dl[i] + bias;
              dt = p.softplus ? softplus_fast(x) : x;
              dtu = dt * uu[i];
              if (has_z) gate = zz[i] * sigmoid_fast(zz[i]);
            }
            dtv[i] = dt; dtuv[i] = dtu; gv[i] = gate;
          }
        }
#pragma unroll
        for (int i = 0; i < kG; i += 2) {
          *reinterpret_cast<float4*>(odd + i) = make_float4(dtv[i], dtuv[i], dtv[i + 1], dtuv[i + 1]);
          *reinterpret_cast<float4*>(oug + i) = make_float4(uu[i], gv[i], uu[i + 1], gv[i + 1]);
        }
        continue;
      }
      auto one = [&](int i, bool valid) {
        float dt = 0.f, dtu = 0.f, gate = 1.f;
        if (valid) {
          const float x = dl[i] + bias;
          dt = p.softplus ? softplus_fast(x) : x;
          dtu = dt * uu[i];
          if (has_z) gate = zz[i] * sigmoid_fast(zz[i]);
        }
        odd[i] = make_float2(dt, dtu);
        oug[i] = make_float2(uu[i], gate);
      };
      if (nval >= kG && p.softplus && has_z) {  // the Mamba case, no per-step branches
#pragma unroll
        for (int i = 0; i < kG; ++i) {
          const float dt = softplus_fast(dl[i] + bias);
          odd[i] = make_float2(dt, dt * uu[i]);
          oug[i] = make_float2(uu[i], zz[i] * sigmoid_fast(zz[i]));
        }
      } else if (nval >= kG) {
#pragma unroll
        for (int i = 0; i < kG; ++i) one(i, true);
      } else {
#pragma unroll
        for (int i = 0; i < kG; ++i) one(i, i < nval);
      }
    }
    // B, C as float32 [t][n] (zero past the end and for padded states)
    if constexpr (kPackBC != 0) {  // kBCVar: both time-varying; 16-bit bits of B and C per (t, n)
      for (int task = tid; task < Lay::kTasksBC / 2; task += kThr) {
        const int n = task % kNP, t0 = (task / kNP) * kG;
        float vb[kG], vc[kG];
        const bool nok = n < N;
        const int sh = (bsh + n * lsh) & (kV - 1);
        if (nok) {
          load8(raw + (3 * kD + n) * kRowEl, t0, sh, vb);
          load8(raw + (3 * kD + kNP + n) * kRowEl, t0, sh, vc);
        }
#pragma unroll
        for (int i = 0; i < kG; ++i) {
          const bool ok = nok && t0 + i < len;
          const unsigned cb16 = ok ? f32_to_bits16<T>(vc[i]) : 0u;
          if constexpr (kPackBC == 2) {
            const unsigned bb16 = ok ? f32_to_bits16<T>(vb[i]) : 0u;
            reinterpret_cast<unsigned*>(s_B(cb))[(t0 + i) * kBP + n] = bb16 | (cb16 << 16);
          } else {
            s_B(cb)[(t0 + i) * kBP + n] = ok ? vb[i] : 0.f;
            reinterpret_cast<unsigned short*>(s_C(cb))[(t0 + i) * kBP + n] =
                static_cast<unsigned short>(cb16);
          }
        }
      }
    } else if (p.B_var || p.C_var) {
      // threads past the (dt, dt u) tasks take the B/C tasks first (kThr 256: warps 4-7)
      constexpr bool kRot = kThr >= Lay::kTasksDD + Lay::kTasksBC;
      for (int task = kRot ? (tid + kThr - Lay::kTasksDD) % kThr : tid; task < Lay::kTasksBC;
           task += kThr) {
        const int n = task % kNP, which = (task / kNP) & 1, t0 = (task / (2 * kNP)) * kG;
        if (which ? !p.C_var : !p.B_var) continue;
        float* dst = kBCI ? s_B(cb) + 2 * n + which : (which ? s_C(cb) : s_B(cb)) + n;
        constexpr int kTP = kBCI ? 2 * kBP : kBP;  // float pitch per step
        float v[kG];
        const bool nok = n < N;
        if (nok) load8(raw + (3 * kD + which * kNP + n) * kRowEl, t0, (bsh + n * lsh) & (kV - 1), v);
#pragma unroll
        for (int i = 0; i < kG; ++i) dst[(t0 + i) * kTP] = (nok && t0 + i < len) ? v[i] : 0.f;
      }
    }
  };

  const bool B_var = kBCVar || p.B_var, C_var = kBCVar || p.C_var;
  const int sBt = kBCVar ? kBP : (p.B_var ? kBP : 0), sCt = kBCVar ? kBP : (p.C_var ? kBP : 0);
  T* po = static_cast<T*>(p.out) + ubase + ch * L + slice;
  // kOG > kTPC: vector stores of kOG / kTPC steps need the out row 16-byte aligned at time 0
  const bool out_vec = kOG > kTPC && ush == 0 && lsh == 0 &&
                       (reinterpret_cast<uintptr_t>(p.out) & 15) == 0;

  // ---- compute chunk c0 (len steps) from conversion buffer cb; the lane holding step t of its
  // channel's y writes out[t]
  auto compute = [&](int cb, int64_t c0, int len) {
    const float2* dd = s_dd(cb) + ch * kDDP;
    const float2* ug = s_ug(cb) + ch * kDDP + slice;
    const float* pB = B_var ? s_B(cb) + slice * kNPT : s_B(0) + ch * kNP + slice * kNPT;
    const float* pC = C_var ? s_C(cb) + slice * kNPT : s_C(0) + ch * kNP + slice * kNPT;
    const int lim = ch_ok ? len - slice : 0;  // this lane stores step tg + slice iff tg < lim
    T* pout = po + c0;
    // step t (compile-time after unrolling) of this lane's states; returns its partial of y_t
    auto step = [&](const int t) {
      const float2 x = dd[t];
      float bv[kNPT], cv[kNPT];
      lds_vec(bv, pB + t * sBt);
      lds_vec(cv, pC + t * sCt);
      float y = 0.f;
#pragma unroll
      for (int k = 0; k < kNPT; ++k) {
        const float xa = x.x * a2[k];
        const float dA = (kPolyR > 0 && (t + k) % (kPolyR > 0 ? kPolyR : 1) == 0) ? ex2_poly(xa)
                                                                               : ex2(xa);
        h[k] = fmaf(dA, h[k], x.y * bv[k]);
        y = fmaf(cv[k], h[k], y);
      }
      return y;
    };
    if constexpr (kOG > kTPC) {
      constexpr int kPer = kOG / kTPC;
      const float2* ugc = ug - slice;
      T* prow_out = pout - slice;
      // reduce-scatter a group's y partials of one channel and store this lane's kPer steps:
      // lane slice gets steps tg + slice kPer + i (i < kPer), each (p_c + p_c^2) + (p_c^1 + p_c^3)
      auto emit = [&](float (&yv)[kOG], int tg, const float2* ugr, T* outr, int lim2, float Dvr) {
        reduce_scatter_lanes<kTPC, kRS, kOG>(yv, slice);
        const int t0 = tg + slice * kPer;
        float o[kPer];
        float2 ugv[kPer];
        if constexpr (kS8 != 0 && kPer % 2 == 0) {  // t0 even, even row pitch: 16-byte loads
#pragma unroll
          for (int i = 0; i < kPer; i += 2) {
            const float4 w = *reinterpret_cast<const float4*>(ugr + t0 + i);
            ugv[i] = make_float2(w.x, w.y);
            ugv[i + 1] = make_float2(w.z, w.w);
          }
        } else {
#pragma unroll
          for (int i = 0; i < kPer; ++i) ugv[i] = ugr[t0 + i];
        }
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
          const float2 q = ugv[i];
          float y = yv[i];
          if (has_D) y = fmaf(Dvr, q.x, y);
          o[i] = y * q.y;
        }
        if (out_vec && t0 + kPer <= lim2) {
          store_vec<kPer>(outr + t0, o);
        } else {
#pragma unroll
          for (int i = 0; i < kPer; ++i)
            if (t0 + i < lim2) outr[t0 + i] = from_float<T>(o[i]);
        }
      };
      if constexpr (kCPT == 2) {  // both channels' states from one B/C read per step
        const float2* dd1 = dd + kDc * kDDP;
#pragma unroll
        for (int tg = 0; tg < kChunk; tg += kOG) {
          float yv[kOG], yw[kOG];
#pragma unroll
          for (int j = 0; j < kOG; ++j) {
            const int t = tg + j;
            const float2 x = dd[t], x1 = dd1[t];
            float bv[kNPT], cv[kNPT];
            lds_vec(bv, pB + t * sBt);
            lds_vec(cv, pC + t * sCt);
            float y = 0.f, y1 = 0.f;
#pragma unroll
            for (int k = 0; k < kNPT; ++k) {
              const float dA = ex2(x.x * a2[k]);
              h[k] = fmaf(dA, h[k], x.y * bv[k]);
              y = fmaf(cv[k], h[k], y);
              const float dA1 = ex2(x1.x * a2_1[k]);
              h_1[k] = fmaf(dA1, h_1[k], x1.y * bv[k]);
              y1 = fmaf(cv[k], h_1[k], y1);
            }
            yv[j] = y;
            yw[j] = y1;
          }
          emit(yv, tg, ugc, prow_out, ch_ok ? len : 0, Dv);
          emit(yw, tg, ugc + kDc * kDDP, prow_out + kDc * L, ch1_ok ? len : 0, Dv1);
        }
      } else if constexpr (kS8 != 0) {
        // step t from (dt, dt u) given; B and C of this lane's states per kPackBC
        auto stepx = [&](const int t, const float xdt, const float xdtu) {
          float bv[kNPT], cv[kNPT];
          if constexpr (kBCI) {  // (B, C) of this lane's 2 states: one LDS.128
            const float4 w = *reinterpret_cast<const float4*>(s_B(cb) + t * 2 * kBP + slice * 2 * kNPT);
            bv[0] = w.x; cv[0] = w.y; bv[1] = w.z; cv[1] = w.w;
          } else if constexpr (kPackBC == 2) {
            const uint4 w = *reinterpret_cast<const uint4*>(
                reinterpret_cast<const unsigned*>(pB) + t * kBP);
            const unsigned ww[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
            for (int k = 0; k < kNPT; ++k) {
              bv[k] = lo16_to_f32<T>(ww[k]);
              cv[k] = hi16_to_f32<T>(ww[k]);
            }
          } else if constexpr (kPackBC == 3) {
            lds_vec(bv, pB + t * kBP);
            const uint2 w = *reinterpret_cast<const uint2*>(
                reinterpret_cast<const unsigned short*>(s_C(cb)) + t * kBP + slice * kNPT);
            cv[0] = lo16_to_f32<T>(w.x); cv[1] = hi16_to_f32<T>(w.x);
            cv[2] = lo16_to_f32<T>(w.y); cv[3] = hi16_to_f32<T>(w.y);
          } else {
            lds_vec(bv, pB + t * kBP);
            lds_vec(cv, pC + t * kBP);
          }
          float y = 0.f;
#pragma unroll
          for (int k = 0; k < kNPT; ++k) {
            const float dA = ex2(xdt * a2[k]);
            h[k] = fmaf(dA, h[k], xdtu * bv[k]);
            y = fmaf(cv[k], h[k], y);
          }
          return y;
        };
#pragma unroll
        for (int tg = 0; tg < kChunk; tg += kOG) {
          float yv[kOG];
#pragma unroll
          for (int j = 0; j < kOG; j += 2) {  // (dt, dt u) of two steps: one LDS.128
            const float4 q = *reinterpret_cast<const float4*>(dd + tg + j);
            yv[j] = stepx(tg + j, q.x, q.y);
            yv[j + 1] = stepx(tg + j + 1, q.z, q.w);
          }
          emit(yv, tg, ugc, prow_out, ch_ok ? len : 0, Dv);
        }
      } else {
#pragma unroll
        for (int tg = 0; tg < kChunk; tg += kOG) {
          float yv[kOG];
#pragma unroll
          for (int j = 0; j < kOG; ++j) yv[j] = step(tg + j);
          emit(yv, tg, ugc, prow_out, ch_ok ? len : 0, Dv);
        }
      }
    } else {
#pragma unroll
      for (int tg = 0; tg < kChunk; tg += kTPC) {
        float yv[kTPC];
#pragma unroll
        for (int j = 0; j < kTPC; ++j) yv[j] = step(tg + j);
        reduce_scatter<kTPC>(yv, slice);
        const float2 q = ug[tg];
        float y = yv[0];
        if (has_D) y = fmaf(Dv, q.x, y);
        y *= q.y;
        if (tg < lim) pout[tg] = from_float<T>(y);
      }
    }
  };

  stage(0, 0, chunk_len(0));
  cp_async_commit();
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t c0 = c * kChunk;
    const int len = chunk_len(c);
    const int buf = static_cast<int>(c & 1);
    cp_async_wait_all();
    __syncthreads();  // chunk c landed; chunk c-1's converted tiles are consumed
    if (c + 1 < nchunks) stage(buf ^ 1, c0 + kChunk, chunk_len(c + 1));
    cp_async_commit();
    convert(buf, 0, len);
    if (ck_on && (c0 & ck_mask) == 0) save_ckpt(c0);
    __syncthreads();
    compute(0, c0, len);
  }
  cp_async_wait_all();

  if constexpr (kCPT == 2) store_states(p.last + (s * p.dim + d1) * p.N + slice * kNPT, ch1_ok, h_1);
  if (ch_ok) {
    float* dst = p.last + (s * p.dim + d) * p.N + slice * kNPT;
#pragma unroll
    for (int k = 0; k < kNPT; ++k)
      if (slice * kNPT + k < N) dst[k] = h[k];
  }
}

template <typename T, int kNPT, int kTPC, int kThr, int kChunk, bool kBCVar, int kPolyR,
          bool kPieces = false, int kOG = kTPC, int kCPT = 1, int kS8 = 0>
__global__ void __launch_bounds__(kThr) sscan_fwd_lean_kernel(const SelectiveScanFwdParams p) {
  sscan_fwd_lean_body<T, kNPT, kTPC, kThr, kChunk, kBCVar, kPolyR, kPieces, kOG, kCPT, kS8>(p);
}
// kMinB blocks per SM asked of ptxas (forward variant 11: 256 threads x 4 blocks = 64 registers)
template <typename T, int kNPT, int kTPC, int kThr, int kChunk, bool kBCVar, int kPolyR,
          bool kPieces, int kOG, int kCPT, int kS8, int kMinB>
__global__ void __launch_bounds__(kThr, kMinB) sscan_fwd_lean_kernel_mb(const SelectiveScanFwdParams p) {
  sscan_fwd_lean_body<T, kNPT, kTPC, kThr, kChunk, kBCVar, kPolyR, kPieces, kOG, kCPT, kS8>(p);
}

template <typename T, int kNPT, int kTPC, int kThr, bool kBCVar, int kChunk = 32, int kPolyR = 0,
          bool kPieces = false, int kOG = kTPC, int kCPT = 1, int kS8 = 0, int kMinB = 0>
cudaError_t launch_lean(const SelectiveScanFwdParams& p, cudaStream_t stream) {
  using Lay = LeanLayout<T, kNPT, kTPC, kThr, kChunk, kCPT, (kS8 != 0 ? 2 : 1)>;
  if (p.ckpt && ((p.ck_len % kChunk) != 0 || (p.ck_len & (p.ck_len - 1)) != 0))
    return cudaErrorInvalidValue;
  auto kernel = [] {
    if constexpr (kMinB == 0)
      return sscan_fwd_lean_kernel<T, kNPT, kTPC, kThr, kChunk, kBCVar, kPolyR, kPieces, kOG, kCPT, kS8>;
    else
      return sscan_fwd_lean_kernel_mb<T, kNPT, kTPC, kThr, kChunk, kBCVar, kPolyR, kPieces, kOG, kCPT, kS8,
                                      kMinB>;
  }();
  if (Lay::kBytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(Lay::kBytes));
    if (err != cudaSuccess) return err;
  }
  const int64_t DG = p.dim / p.groups;
  const dim3 grid(static_cast<unsigned>((DG + Lay::kD - 1) / Lay::kD),
                  static_cast<unsigned>(p.groups), static_cast<unsigned>(p.nseq));
  kernel<<<grid, kThr, Lay::kBytes, stream>>>(p);
  return cudaGetLastError();
}

int g_fwd_poly = -1;  // -1: not read from the environment yet
bool poly_ok(int r) { return r == 0 || r == 1 || r == 2 || r == 4 || r == 8 || r == 16; }
int g_fwd_variant = -1;
bool fwd_variant_ok(int v) { return v >= 0 && v <= 12; }

// host knob g: read from env (invalid or unset -> dflt) on first use; set is applied iff ok(set);
// returns the previous value
int knob(int& g, const char* env, int set, bool (*ok)(int), int dflt = 0) {
  if (g < 0) {
    const char* e = std::getenv(env);
    const int v = e ? std::atoi(e) : dflt;
    g = ok(v) ? v : dflt;
  }
  const int prev = g;
  if (ok(set)) g = set;
  return prev;
}

}  // namespace

int selective_scan_fwd_poly(int set) {
  return knob(g_fwd_poly, "SSM_KERNELS_SSCAN_FWD_POLY", set, poly_ok);
}

// default 9 (3 with two (dt, dt u) steps per 16-byte load and lanes remapped so B/C loads are
// uniform pairs), bitwise equal to 0: H100, session 9: 0.219 vs 0.224 (3) ms at B8 D1536 L2048
// N16 and 0.537 vs 0.557 at B4 D4096 L4096 (6, 7, 8, 10 within +-1% of 3). Session 8: 3 beat 0
// (0.220 vs 0.268, 0.546 vs 0.665); 1, 5 slower than 3
int selective_scan_fwd_variant(int set) {
  return knob(g_fwd_variant, "SSM_KERNELS_SSCAN_FWD_VARIANT", set, fwd_variant_ok, 9);
}

cudaError_t selective_scan_fwd_lean_cuda(const SelectiveScanFwdParams& p, DType dtype,
                                         cudaStream_t stream) {
  if (p.N < 1 || p.N > 16) return cudaErrorInvalidValue;
  cudaError_t err = cudaSuccess;
  const int poly = (p.B_var && p.C_var) ? selective_scan_fwd_poly() : 0;
  // forward variants (B and C time-varying, poly off): 1 = PieceStager staging; 2, 3 = that plus
  // y reduce-scattered over 8 / 32 steps (4- / 16-byte out stores for 16-bit T); 4 = 32-step
  // groups with owner-row staging; 5 = two channels per thread (64-thread blocks of 32 channels,
  // one B/C read per step for both) with coalesced staging and 16-step groups. All bitwise equal
  // to 0.
  const int var = (p.B_var && p.C_var && poly == 0) ? selective_scan_fwd_variant() : 0;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (var == 1) err = launch_lean<T, 4, 4, 128, true, 32, 0, true, 4>(p, stream);
    else if (var == 2) err = launch_lean<T, 4, 4, 128, true, 32, 0, true, 8>(p, stream);
    else if (var == 3) err = launch_lean<T, 4, 4, 128, true, 32, 0, true, 32>(p, stream);
    else if (var == 4) err = launch_lean<T, 4, 4, 128, true, 32, 0, false, 32>(p, stream);
    else if (var == 5) err = launch_lean<T, 4, 4, 64, true, 32, 0, true, 16, 2>(p, stream);
    // session 8: variant 3 + two steps of (dt, dt u) / (u, gate) per 16-byte LDS (6), + B and C
    // packed as 16-bit pairs, one LDS.128 per step (7), + C alone packed (8); bitwise equal to 3
    else if (var == 6) err = launch_lean<T, 4, 4, 128, true, 32, 0, true, 32, 1, 1>(p, stream);
    else if (var == 7) err = launch_lean<T, 4, 4, 128, true, 32, 0, true, 32, 1, 2>(p, stream);
    else if (var == 8) err = launch_lean<T, 4, 4, 128, true, 32, 0, true, 32, 1, 3>(p, stream);
    // + lanes remapped so B/C (and (dt, dt u)) loads are "uniform pair" loads: on 6 (9), on 7 (10)
    else if (var == 9) err = launch_lean<T, 4, 4, 128, true, 32, 0, true, 32, 1, 5>(p, stream);
    else if (var == 10) err = launch_lean<T, 4, 4, 128, true, 32, 0, true, 32, 1, 6>(p, stream);
    // session 10: 8 lanes x 2 states per channel, 256 threads (twice the warps per channel tile),
    // 16-step y groups, remapped lanes, <= 64 registers (4 blocks per SM); out within rounding of 9
    // (B and C interleaved in one tile: one LDS.128 per step). 12 = 11 with 32-step y groups at
    // <= 80 registers (3 blocks per SM: one wave up to 396 blocks on 132 SMs, e.g. B8 D1536)
    else if (var == 11) err = launch_lean<T, 2, 8, 256, true, 32, 0, true, 16, 1, 13, 4>(p, stream);
    else if (var == 12) err = launch_lean<T, 2, 8, 256, true, 32, 0, true, 32, 1, 13, 3>(p, stream);
    else if (poly == 1) err = launch_lean<T, 4, 4, 128, true, 32, 1>(p, stream);
    else if (poly == 2) err = launch_lean<T, 4, 4, 128, true, 32, 2>(p, stream);
    else if (poly == 4) err = launch_lean<T, 4, 4, 128, true, 32, 4>(p, stream);
    else if (poly == 8) err = launch_lean<T, 4, 4, 128, true, 32, 8>(p, stream);
    else if (poly == 16) err = launch_lean<T, 4, 4, 128, true, 32, 16>(p, stream);
    else if (p.B_var && p.C_var) err = launch_lean<T, 4, 4, 128, true>(p, stream);
    else err = launch_lean<T, 4, 4, 128, false>(p, stream);
  });
  return err;
}

}  // namespace ssm
