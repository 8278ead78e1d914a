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

// N <= 16 (selective_scan_fwd_lean.cu); selective_scan_fwd_cuda dispatches to it.
cudaError_t selective_scan_fwd_lean_cuda(const SelectiveScanFwdParams& p, DType dtype,
                                         cudaStream_t stream);

// Forward knob (issue 9, bench/NOTES.md "poly exp2"): R in {1, 2, 4, 8, 16} moves 1/R of the N <= 16
// forward's per-update decays (B and C time-varying) from the SFU (ex2.approx) to a polynomial on
// the FMA pipe (sscan::ex2_poly); 0 (default) = off. Results differ from 0 in the last bits
// (deterministic either way). The first query reads SSM_KERNELS_SSCAN_FWD_POLY (anything else is
// 0); set = 0 or a valid R sets it; returns the previous value. Host-side global, not thread safe.
int selective_scan_fwd_poly(int set = -1);

// Forward variant (issue 9, session 7; N <= 16, B and C time-varying, poly off; others run 0):
// 0 = the lean kernel; 1 = coalesced staging of aligned chunks (PieceStager); 2, 3 = 1
// plus y reduce-scattered over 8 / 32 steps and stored as vectors; 4 = 32-step groups alone; 5 = two
// channels per thread (64-thread blocks; one B/C read per step serves both); session 8: 6 = 3 with
// two steps of (dt, dt u) per 16-byte load, 7 / 8 = 6 with B and C / C alone as packed 16-bit
// pairs in shared memory, 9 / 10 = 6 / 7 with lanes remapped so B/C loads are uniform pairs. All
// bitwise equal to 0; 9 is the default (session 9); session 10: 11 = 9's layout with 8 lanes x 2
// states per channel and 256-thread blocks (twice the warps; out within float32 rounding of 9,
// states bitwise), 12 = 11 with 32-step y groups at 3 blocks per SM. The first query reads
// SSM_KERNELS_SSCAN_FWD_VARIANT; set in 0..12 sets it;
// returns the previous value. Host-side global, not thread safe.
int selective_scan_fwd_variant(int set = -1);

// Backward. Gradients in the storage dtype: du, ddelta, dz (like u), time-varying dB/dC (like B/C);
// float32: dA (dim, N), time-invariant dB/dC (dim, N), dD, ddelta_bias (dim,), dh0 (nseq, dim, N).
// Cross-block sums are deterministic: the main kernel writes float32 partials (below) that a
// second kernel sums in a fixed order and casts; no atomics.
struct SelectiveScanBwdParams {
  // forward inputs (as in SelectiveScanFwdParams); dout like u; dlast (nseq, dim, N) float32
  const void* u = nullptr;
  const void* delta = nullptr;
  const void* z = nullptr;
  const void* dout = nullptr;
  const float* A = nullptr;
  const void* B = nullptr;
  const void* C = nullptr;
  bool B_var = true, C_var = true;
  const float* D = nullptr;
  const float* delta_bias = nullptr;
  const float* ckpt = nullptr;          // (rows, dim, N): the forward's checkpoints (row 0 of a
                                        // sequence is its initial state)
  const float* dlast = nullptr;         // (nseq, dim, N)
  const int32_t* cu_seqlens = nullptr;
  const int32_t* ck_offsets = nullptr;
  // outputs written by the main kernel
  void* du = nullptr;
  void* ddelta = nullptr;
  void* dz = nullptr;                   // required iff z
  float* dh0 = nullptr;                 // (nseq, dim, N), nullable (not wanted)
  // float32 workspaces (every element written by the main kernel)
  float* dA_part = nullptr;             // (nseq, dim, N)
  float* dB_part = nullptr;             // B_var: (dtiles, batch, G, N, L); else (nseq, dim, N)
  float* dC_part = nullptr;             // likewise
  float* dD_part = nullptr;             // (nseq, dim) iff D
  float* dbias_part = nullptr;          // (nseq, dim) iff delta_bias
  // final outputs written by the reduction kernel
  float* dA = nullptr;                  // (dim, N)
  void* dB = nullptr;                   // B's shape and dtype
  void* dC = nullptr;
  float* dD = nullptr;
  float* dbias = nullptr;
  int64_t batch = 0, dim = 0, L = 0, N = 0, groups = 1, nseq = 0;
  int64_t ck_per_batch = 0;
  int ck_len = 1;
  bool softplus = false;
};

// Backward kernel variant (issue 9): 0 = the original; 2 (default: fastest measured) = fused I/O
// (selective_scan_bwd.cu, kFuse:
// lean staging/convert, du/ddelta/dz and dB/dC partials written from pass 2; same arithmetic,
// bitwise equal) for N <= 16 with B and C both time-varying (others run 0). (1, the lean I/O
// with pointers kept live, was slower and is gone.) The first query reads
// SSM_KERNELS_SSCAN_BWD_VARIANT (0, 2, 3 = 3 blocks/SM, or 4 = 2 with coalesced staging of
// aligned chunks, 5 = 4 with the reductions through shared memory, 6 = 3 with 5's
// reductions, 7 = 6 or 5 per launch by wave count, 8 = 5 in 32-step chunks at 3 blocks/SM, 9 =
// 8 or 5 by wave count (the default); session 10: 10 = 8 with lanes remapped (uniform-pair B/C
// loads) and shuffle reductions, 11 = 8 with the remap only; anything else 0); set = 0 or 2..11 sets it;
// returns the previous value. Host-side global: not per stream, not thread safe.
int selective_scan_bwd_variant(int set = -1);

// Channels per block of the backward for this N (the partials of time-varying dB/dC have
// cdiv(dim / groups, that) tiles).
int64_t selective_scan_bwd_channels_per_block(int64_t N);

// Return cudaSuccess or the launch error. Requires 1 <= N <= 256 and ck_len == chunk_len(N).
cudaError_t selective_scan_bwd_cuda(const SelectiveScanBwdParams& p, DType dtype, cudaStream_t stream);

}  // namespace ssm
