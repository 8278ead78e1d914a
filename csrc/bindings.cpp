// The one torch-facing C++ file: argument checks, allocation, the current stream, registration.
// Kernels live in torch-free .cu files behind params structs (DESIGN.md).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "linear_scan/linear_scan.h"

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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ssm_kernels CUDA kernels";
  // ---- linear_scan
  m.def("linear_scan_fwd", &linear_scan_fwd, "linear_scan forward -> (h, final_state)");
  m.def("linear_scan_bwd", &linear_scan_bwd, "linear_scan backward -> (da, db, dh0)");
}
