// The one torch-facing C++ file: argument checks, allocation, the current stream, registration.
// Kernels live in torch-free .cu files behind params structs (DESIGN.md).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "linear_scan/linear_scan.h"
#include "selective_scan/selective_scan.h"

namespace {

ssm::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ssm::DType::kFloat32;
    case at::kHalf: return ssm::DType::kFloat16;
    case at::kBFloat16: return ssm::DType::kBFloat16;
    default: TORCH_CHECK(false, "ssm_kernels._C: unsupported dtype ", t.scalar_type());
  }
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

void check_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// The selective-scan kernels stream rows with 16-byte cp.async from 16-byte-aligned bases; a
// view whose storage offset breaks that (rare: torch allocations are 512-byte aligned) is copied.
at::Tensor aligned16(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0) return t;
  return t.clone(at::MemoryFormat::Contiguous);
}

// ---- linear_scan ---------------------------------------------------------------------------

// Canonical (O, C) view of a contiguous [P, T, Q] tensor; mirrors linear_scan/triton.py::_canonical.
void linear_scan_geometry(const at::Tensor& x, ssm::LinearScanParams& p) {
  TORCH_CHECK(x.dim() == 3, "linear_scan: expected [P, T, Q], got rank ", x.dim());
  const int64_t P = x.size(0), T = x.size(1), Q = x.size(2);
  p.T = T;
  if (Q == 1) {
    p.O = 1; p.C = P; p.s_o = 0; p.s_t = 1; p.s_c = T;
  } else {
    p.O = P; p.C = Q; p.s_o = T * Q; p.s_t = Q; p.s_c = 1;
  }
}

std::vector<at::Tensor> linear_scan_fwd(const at::Tensor& a, const at::Tensor& b,
                                        const c10::optional<at::Tensor>& h0, bool reverse) {
  check_input(a, "a");
  check_input(b, "b");
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type(), "a and b must match");
  const at::cuda::OptionalCUDAGuard guard(a.device());
  auto h = at::empty_like(b);
  auto hT = at::empty({b.size(0), b.size(2)}, b.options().dtype(at::kFloat));
  at::Tensor h0c;
  ssm::LinearScanParams p;
  linear_scan_geometry(b, p);
  if (h0.has_value()) {
    h0c = h0->to(at::kFloat).contiguous();
    p.carry_in = h0c.data_ptr<float>();
  }
  p.coef = a.data_ptr();
  p.value = b.data_ptr();
  p.out = h.data_ptr();
  p.state_out = hT.data_ptr<float>();
  p.reverse = reverse;
  check_launch(ssm::linear_scan_fwd_cuda(p, dtype_of(b), at::cuda::getCurrentCUDAStream()),
               "linear_scan_fwd");
  return {h, hT};
}

std::vector<at::Tensor> linear_scan_bwd(const at::Tensor& a, const at::Tensor& h,
                                        const c10::optional<at::Tensor>& h0, const at::Tensor& dh,
                                        const at::Tensor& dhT, bool reverse) {
  check_input(a, "a");
  check_input(h, "h");
  check_input(dh, "dh");
  const at::cuda::OptionalCUDAGuard guard(a.device());
  auto da = at::empty_like(a);
  auto db = at::empty_like(h);
  auto dh0 = at::empty({h.size(0), h.size(2)}, h.options().dtype(at::kFloat));
  auto dhTc = dhT.to(at::kFloat).contiguous();
  auto dhc = dh.to(h.scalar_type()).contiguous();
  at::Tensor h0c;
  ssm::LinearScanParams p;
  linear_scan_geometry(h, p);
  if (h0.has_value()) {
    h0c = h0->to(at::kFloat).contiguous();
    p.h0 = h0c.data_ptr<float>();
  }
  p.coef = a.data_ptr();
  p.value = dhc.data_ptr();
  p.h = h.data_ptr();
  p.carry_in = dhTc.data_ptr<float>();
  p.out = db.data_ptr();
  p.out2 = da.data_ptr();
  p.state_out = dh0.data_ptr<float>();
  p.reverse = reverse;
  check_launch(ssm::linear_scan_bwd_cuda(p, dtype_of(h), at::cuda::getCurrentCUDAStream()),
               "linear_scan_bwd");
  return {da, db, dh0};
}

// ---- selective_scan ------------------------------------------------------------------------

// u, delta, z: (batch, dim, L); A (dim, N) f32; B, C time-varying (batch, G, N, L) in u's dtype or
// time-invariant (dim, N) f32; D, delta_bias (dim,) f32; h0 (nseq, dim, N) f32; cu_seqlens and
// ck_offsets int32. Returns (out, last_state (nseq, dim, N) f32, checkpoints (ck_rows, dim, N) f32).
std::vector<at::Tensor> selective_scan_fwd(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
    const c10::optional<at::Tensor>& delta_bias, const c10::optional<at::Tensor>& h0,
    const c10::optional<at::Tensor>& cu_seqlens, const c10::optional<at::Tensor>& ck_offsets,
    bool softplus, int64_t ck_len, int64_t ck_rows) {
  check_input(u, "u");
  check_input(delta, "delta");
  check_input(A, "A");
  check_input(B, "B");
  check_input(C, "C");
  TORCH_CHECK(u.dim() == 3 && delta.sizes() == u.sizes() && delta.scalar_type() == u.scalar_type(),
              "selective_scan: u and delta must be (batch, dim, L) of one dtype");
  TORCH_CHECK(A.dim() == 2 && A.scalar_type() == at::kFloat && A.size(0) == u.size(1),
              "selective_scan: A must be (dim, N) float32");
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2), N = A.size(1);
  TORCH_CHECK(N >= 1 && N <= 256, "selective_scan: N must be in [1, 256]");
  const at::cuda::OptionalCUDAGuard guard(u.device());
  ssm::SelectiveScanFwdParams p;
  int64_t groups = 1;
  for (const at::Tensor* M : {&B, &C}) {
    if (M->dim() == 4) {
      TORCH_CHECK(M->scalar_type() == u.scalar_type() && M->size(0) == batch && M->size(2) == N &&
                  M->size(3) == L, "selective_scan: time-varying B/C must be (batch, G, N, L)");
      groups = M->size(1);
    } else {
      TORCH_CHECK(M->dim() == 2 && M->scalar_type() == at::kFloat && M->size(0) == dim &&
                  M->size(1) == N, "selective_scan: time-invariant B/C must be (dim, N) float32");
    }
  }
  TORCH_CHECK(dim % groups == 0, "selective_scan: dim must be divisible by the groups");
  const int64_t nseq = cu_seqlens.has_value() ? cu_seqlens->size(0) - 1 : batch;
  TORCH_CHECK(nseq >= 1 && nseq <= 65535, "selective_scan: 1..65535 sequences per launch");
  auto out = at::empty_like(u);
  auto f32 = u.options().dtype(at::kFloat);
  auto last = at::empty({nseq, dim, N}, f32);
  auto ckpt = at::empty({ck_rows, dim, N}, f32);
  const at::Tensor ua = aligned16(u), da = aligned16(delta);
  const at::Tensor Ba = B.dim() == 4 ? aligned16(B) : B, Ca = C.dim() == 4 ? aligned16(C) : C;
  at::Tensor za;
  p.u = ua.data_ptr();
  p.delta = da.data_ptr();
  p.out = out.data_ptr();
  p.A = A.data_ptr<float>();
  p.B = Ba.data_ptr();
  p.C = Ca.data_ptr();
  p.B_var = B.dim() == 4;
  p.C_var = C.dim() == 4;
  if (z.has_value()) { check_input(*z, "z"); za = aligned16(*z); p.z = za.data_ptr(); }
  if (D.has_value()) { check_input(*D, "D"); p.D = D->data_ptr<float>(); }
  if (delta_bias.has_value()) { check_input(*delta_bias, "delta_bias"); p.delta_bias = delta_bias->data_ptr<float>(); }
  if (h0.has_value()) { check_input(*h0, "h0"); p.h0 = h0->data_ptr<float>(); }
  if (cu_seqlens.has_value()) {
    check_input(*cu_seqlens, "cu_seqlens");
    TORCH_CHECK(cu_seqlens->scalar_type() == at::kInt, "selective_scan: cu_seqlens must be int32");
    p.cu_seqlens = cu_seqlens->data_ptr<int32_t>();
  }
  if (ck_offsets.has_value()) { check_input(*ck_offsets, "ck_offsets"); p.ck_offsets = ck_offsets->data_ptr<int32_t>(); }
  p.last = last.data_ptr<float>();
  p.ckpt = ck_rows > 0 ? ckpt.data_ptr<float>() : nullptr;
  p.batch = batch; p.dim = dim; p.L = L; p.N = N; p.groups = groups; p.nseq = nseq;
  TORCH_CHECK(ck_len >= 1 && (ck_len & (ck_len - 1)) == 0, "selective_scan: ck_len must be a power of two");
  p.ck_len = static_cast<int>(ck_len);
  p.ck_per_batch = (L + ck_len - 1) / ck_len;
  p.softplus = softplus;
  check_launch(ssm::selective_scan_fwd_cuda(p, dtype_of(u), at::cuda::getCurrentCUDAStream()),
               "selective_scan_fwd");
  return {out, last, ckpt};
}

// Gradients of selective_scan_fwd from its checkpoints. dout like u; dlast (nseq, dim, N) f32;
// want_dh0: also return d initial_state. Returns [du, ddelta, dA (dim, N) f32, dB, dC (B's/C's
// shape and dtype), dD (dim,) f32, dz, ddelta_bias (dim,) f32, dh0 (nseq, dim, N) f32], with
// empty tensors for absent inputs.
std::vector<at::Tensor> selective_scan_bwd(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
    const c10::optional<at::Tensor>& delta_bias, const c10::optional<at::Tensor>& cu_seqlens,
    const c10::optional<at::Tensor>& ck_offsets, const at::Tensor& ckpt, const at::Tensor& dout,
    const at::Tensor& dlast, bool softplus, int64_t ck_len, bool want_dh0) {
  check_input(u, "u");
  check_input(delta, "delta");
  check_input(A, "A");
  check_input(B, "B");
  check_input(C, "C");
  check_input(ckpt, "ckpt");
  check_input(dout, "dout");
  check_input(dlast, "dlast");
  TORCH_CHECK(u.dim() == 3 && delta.sizes() == u.sizes() && delta.scalar_type() == u.scalar_type(),
              "selective_scan_bwd: u and delta must be (batch, dim, L) of one dtype");
  TORCH_CHECK(dout.sizes() == u.sizes() && dout.scalar_type() == u.scalar_type(),
              "selective_scan_bwd: dout must match u");
  TORCH_CHECK(A.dim() == 2 && A.scalar_type() == at::kFloat && A.size(0) == u.size(1),
              "selective_scan_bwd: A must be (dim, N) float32");
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2), N = A.size(1);
  TORCH_CHECK(N >= 1 && N <= 256, "selective_scan_bwd: N must be in [1, 256]");
  const at::cuda::OptionalCUDAGuard guard(u.device());
  int64_t groups = 1;
  for (const at::Tensor* M : {&B, &C}) {
    if (M->dim() == 4) {
      TORCH_CHECK(M->scalar_type() == u.scalar_type() && M->size(0) == batch && M->size(2) == N &&
                  M->size(3) == L, "selective_scan_bwd: time-varying B/C must be (batch, G, N, L)");
      groups = M->size(1);
    } else {
      TORCH_CHECK(M->dim() == 2 && M->scalar_type() == at::kFloat && M->size(0) == dim &&
                  M->size(1) == N, "selective_scan_bwd: time-invariant B/C must be (dim, N) float32");
    }
  }
  TORCH_CHECK(dim % groups == 0, "selective_scan_bwd: dim must be divisible by the groups");
  const int64_t nseq = cu_seqlens.has_value() ? cu_seqlens->size(0) - 1 : batch;
  TORCH_CHECK(nseq >= 1 && nseq <= 65535, "selective_scan_bwd: 1..65535 sequences per launch");
  TORCH_CHECK(dlast.dim() == 3 && dlast.size(0) == nseq && dlast.size(1) == dim &&
              dlast.size(2) == N && dlast.scalar_type() == at::kFloat,
              "selective_scan_bwd: dlast must be (nseq, dim, N) float32");
  TORCH_CHECK(ckpt.dim() == 3 && ckpt.size(1) == dim && ckpt.size(2) == N &&
              ckpt.scalar_type() == at::kFloat, "selective_scan_bwd: ckpt must be (rows, dim, N) float32");
  TORCH_CHECK(ck_len >= 1 && (ck_len & (ck_len - 1)) == 0, "selective_scan_bwd: ck_len must be a power of two");
  const int64_t ck_per_batch = (L + ck_len - 1) / ck_len;
  TORCH_CHECK(ckpt.size(0) >= (cu_seqlens.has_value() ? ck_per_batch : batch * ck_per_batch),
              "selective_scan_bwd: too few checkpoint rows");
  auto f32 = u.options().dtype(at::kFloat);
  auto empty = u.new_empty({0});
  auto du = at::empty_like(u), ddelta = at::empty_like(delta);
  auto dz = z.has_value() ? at::empty_like(*z) : empty;
  auto dA = at::empty({dim, N}, f32);
  auto dB = at::empty_like(B), dC = at::empty_like(C);
  auto dD = D.has_value() ? at::empty({dim}, f32) : empty;
  auto dbias = delta_bias.has_value() ? at::empty({dim}, f32) : empty;
  auto dh0 = want_dh0 ? at::empty({nseq, dim, N}, f32) : empty;
  // float32 partials, summed in a fixed order by the second kernel
  const int64_t dtiles = (dim / groups + ssm::selective_scan_bwd_channels_per_block(N) - 1) /
                         ssm::selective_scan_bwd_channels_per_block(N);
  auto part = [&](const at::Tensor& M) {
    return M.dim() == 4 ? at::empty({dtiles, batch, groups, N, L}, f32) : at::empty({nseq, dim, N}, f32);
  };
  auto dA_part = at::empty({nseq, dim, N}, f32);
  auto dB_part = part(B), dC_part = part(C);
  auto dD_part = D.has_value() ? at::empty({nseq, dim}, f32) : empty;
  auto dbias_part = delta_bias.has_value() ? at::empty({nseq, dim}, f32) : empty;

  const at::Tensor ua = aligned16(u), da = aligned16(delta), doa = aligned16(dout);
  const at::Tensor Ba = B.dim() == 4 ? aligned16(B) : B, Ca = C.dim() == 4 ? aligned16(C) : C;
  at::Tensor za;
  ssm::SelectiveScanBwdParams p;
  p.u = ua.data_ptr();
  p.delta = da.data_ptr();
  p.dout = doa.data_ptr();
  p.A = A.data_ptr<float>();
  p.B = Ba.data_ptr();
  p.C = Ca.data_ptr();
  p.B_var = B.dim() == 4;
  p.C_var = C.dim() == 4;
  if (z.has_value()) {
    check_input(*z, "z");
    TORCH_CHECK(z->sizes() == u.sizes() && z->scalar_type() == u.scalar_type(), "selective_scan_bwd: z must match u");
    za = aligned16(*z);
    p.z = za.data_ptr();
    p.dz = dz.data_ptr();
  }
  if (D.has_value()) {
    check_input(*D, "D");
    p.D = D->data_ptr<float>();
    p.dD = dD.data_ptr<float>();
    p.dD_part = dD_part.data_ptr<float>();
  }
  if (delta_bias.has_value()) {
    check_input(*delta_bias, "delta_bias");
    p.delta_bias = delta_bias->data_ptr<float>();
    p.dbias = dbias.data_ptr<float>();
    p.dbias_part = dbias_part.data_ptr<float>();
  }
  if (cu_seqlens.has_value()) {
    check_input(*cu_seqlens, "cu_seqlens");
    TORCH_CHECK(cu_seqlens->scalar_type() == at::kInt && batch == 1,
                "selective_scan_bwd: cu_seqlens must be int32 with batch 1");
    TORCH_CHECK(ck_offsets.has_value(), "selective_scan_bwd: cu_seqlens needs ck_offsets");
    p.cu_seqlens = cu_seqlens->data_ptr<int32_t>();
  }
  if (ck_offsets.has_value()) { check_input(*ck_offsets, "ck_offsets"); p.ck_offsets = ck_offsets->data_ptr<int32_t>(); }
  p.ckpt = ckpt.data_ptr<float>();
  p.dlast = dlast.data_ptr<float>();
  p.du = du.data_ptr();
  p.ddelta = ddelta.data_ptr();
  p.dh0 = want_dh0 ? dh0.data_ptr<float>() : nullptr;
  p.dA_part = dA_part.data_ptr<float>();
  p.dB_part = dB_part.data_ptr<float>();
  p.dC_part = dC_part.data_ptr<float>();
  p.dA = dA.data_ptr<float>();
  p.dB = dB.data_ptr();
  p.dC = dC.data_ptr();
  p.batch = batch; p.dim = dim; p.L = L; p.N = N; p.groups = groups; p.nseq = nseq;
  p.ck_per_batch = ck_per_batch;
  p.ck_len = static_cast<int>(ck_len);
  p.softplus = softplus;
  check_launch(ssm::selective_scan_bwd_cuda(p, dtype_of(u), at::cuda::getCurrentCUDAStream()),
               "selective_scan_bwd");
  return {du, ddelta, dA, dB, dC, dD, dz, dbias, dh0};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ssm_kernels CUDA kernels";
  // ---- linear_scan
  m.def("linear_scan_fwd", &linear_scan_fwd, "linear_scan forward -> (h, final_state)");
  m.def("linear_scan_bwd", &linear_scan_bwd, "linear_scan backward -> (da, db, dh0)");
  // ---- selective_scan
  m.def("selective_scan_fwd", &selective_scan_fwd,
        "selective_scan forward -> (out, last_state, checkpoints)");
  m.def("selective_scan_fwd_poly", &ssm::selective_scan_fwd_poly, pybind11::arg("set") = -1,
        "forward knob (issue 9): R in {1, 2, 4, 8, 16} computes 1/R of the N <= 16 forward's decays "
        "with an FMA-pipe exp2 polynomial, 0 (default) off; set selects it; returns the previous "
        "one (the first call reads SSM_KERNELS_SSCAN_FWD_POLY)");
  m.def("selective_scan_fwd_variant", &ssm::selective_scan_fwd_variant, pybind11::arg("set") = -1,
        "forward variant (issue 9): 0 (default) lean kernel; 1 coalesced staging; 2 / 3 = 1 plus "
        "8- / 32-step y groups with vector stores; 4 = 32-step groups alone; 5 = two channels per "
        "thread; 6-10 (session 8): 3 with 16-byte (dt, dt u) loads (6), B/C as packed 16-bit "
        "pairs (7), C alone packed (8), lanes remapped for uniform-pair B/C loads on 6 / 7 (9 / 10); "
        "11 / 12 (session 10): 8 lanes x 2 states per channel, 256 threads, 16- / 32-step y groups "
        "(out within rounding, states bitwise) (N <= 16, B and C "
        "time-varying, poly off; all bitwise equal); set selects it; returns the previous one (the "
        "first call reads SSM_KERNELS_SSCAN_FWD_VARIANT)");
  m.def("selective_scan_bwd_variant", &ssm::selective_scan_bwd_variant, pybind11::arg("set") = -1,
        "backward kernel variant (issue 9): 2 (default; fused I/O, N <= 16 with time-varying B and "
        "C), 3 (the same at 3 blocks/SM), 4 (2 with coalesced staging), 5 (4 with the dB/dC channel "
        "reduce through shared memory), 6 (3 with 5's reductions; session 8), 7 (6 when it saves a "
        "wave, else 5), 8 (5 in 32-step chunks, 3 blocks/SM), 9 (8 when it saves a wave, else 5), "
        "10 / 11 (8 with remapped lanes, shuffle / shared-tile reductions; session 10) or 0 (the original); set selects it; returns the previous one (the first call reads "
        "SSM_KERNELS_SSCAN_BWD_VARIANT)");
  m.def("selective_scan_bwd", &selective_scan_bwd,
        "selective_scan backward -> [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0]");
}
