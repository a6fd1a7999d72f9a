// sampa_preview_sgd_ / sampa_preview_adam_ (see csrc/cpu/sampa_preview.cpp): from one read of
// x and g_y, perturbed = x + s * g (s from the device-resident norm: no host synchronization)
// and previews = the base step from x with g, the state read into registers and not written.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../adam_math.h"
#include "multi_tensor_apply.cuh"

namespace sam_kernels::cuda {
namespace {

__device__ __forceinline__ float preview_scale(const float* norm, float rho, bool& finite) {
  const float nv = *norm;
  finite = isfinite(nv);  // a non-finite g_y leaves the perturbed point at x
  return finite ? rho / (nv + static_cast<float>(kNormEps)) : 0.f;
}

// Lists: x, g, perturbed, previews, [buf].
template <typename scalar_t, bool kMomentum, bool kNesterov, bool kInit>
__global__ void __launch_bounds__(kThreads) preview_sgd_kernel(
    const int64_t* __restrict__ meta, int64_t n_tensors, const float* __restrict__ norm, float rho, SgdArgs args) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr bool kReadBuf = kMomentum && !kInit;
  const ChunkRef c = chunk_of(meta, kReadBuf ? 5 : 4, n_tensors);
  const scalar_t* x = list_ptr<const scalar_t>(meta, 0, n_tensors, c.tensor);
  const scalar_t* g = list_ptr<const scalar_t>(meta, 1, n_tensors, c.tensor);
  scalar_t* xt = list_ptr<scalar_t>(meta, 2, n_tensors, c.tensor);
  scalar_t* y = list_ptr<scalar_t>(meta, 3, n_tensors, c.tensor);
  const scalar_t* buf = kReadBuf ? list_ptr<const scalar_t>(meta, 4, n_tensors, c.tensor) : nullptr;
  bool finite;
  const opmath_t s = static_cast<opmath_t>(preview_scale(norm, rho, finite));
  for (int64_t base = c.begin + threadIdx.x; base < c.end; base += int64_t(kThreads) * kILP) {
    opmath_t xv[kILP], gv[kILP], bv[kILP];
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = base + int64_t(k) * kThreads;
      if (i < c.end) {
        xv[k] = static_cast<opmath_t>(x[i]);
        gv[k] = static_cast<opmath_t>(g[i]);
        bv[k] = kReadBuf ? static_cast<opmath_t>(buf[i]) : opmath_t(0);
      }
    }
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = base + int64_t(k) * kThreads;
      if (i < c.end) {
        xt[i] = finite ? static_cast<scalar_t>(xv[k] + s * gv[k]) : x[i];
        sgd_update<opmath_t, kMomentum, kNesterov, kInit>(xv[k], bv[k], gv[k], args);
        y[i] = static_cast<scalar_t>(xv[k]);
      }
    }
  }
}

// Lists: x, g, perturbed, previews, m, v, [vmax].
template <typename scalar_t, bool kAmsgrad, bool kLerpLow>
__global__ void __launch_bounds__(kThreads) preview_adam_kernel(
    const int64_t* __restrict__ meta, int64_t n_tensors, const float* __restrict__ norm, float rho, AdamArgs args) {
  using opmath_t = at::opmath_type<scalar_t>;
  const ChunkRef c = chunk_of(meta, kAmsgrad ? 7 : 6, n_tensors);
  const scalar_t* x = list_ptr<const scalar_t>(meta, 0, n_tensors, c.tensor);
  const scalar_t* g = list_ptr<const scalar_t>(meta, 1, n_tensors, c.tensor);
  scalar_t* xt = list_ptr<scalar_t>(meta, 2, n_tensors, c.tensor);
  scalar_t* y = list_ptr<scalar_t>(meta, 3, n_tensors, c.tensor);
  const scalar_t* m = list_ptr<const scalar_t>(meta, 4, n_tensors, c.tensor);
  const scalar_t* v = list_ptr<const scalar_t>(meta, 5, n_tensors, c.tensor);
  const scalar_t* vmax = kAmsgrad ? list_ptr<const scalar_t>(meta, 6, n_tensors, c.tensor) : nullptr;
  bool finite;
  const opmath_t s = static_cast<opmath_t>(preview_scale(norm, rho, finite));
  for (int64_t base = c.begin + threadIdx.x; base < c.end; base += int64_t(kThreads) * kILP) {
    opmath_t xv[kILP], gv[kILP], mv[kILP], vv[kILP], vmv[kILP];
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = base + int64_t(k) * kThreads;
      if (i < c.end) {
        xv[k] = static_cast<opmath_t>(x[i]);
        gv[k] = static_cast<opmath_t>(g[i]);
        mv[k] = static_cast<opmath_t>(m[i]);
        vv[k] = static_cast<opmath_t>(v[i]);
        vmv[k] = kAmsgrad ? static_cast<opmath_t>(vmax[i]) : opmath_t(0);
      }
    }
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = base + int64_t(k) * kThreads;
      if (i < c.end) {
        xt[i] = finite ? static_cast<scalar_t>(xv[k] + s * gv[k]) : x[i];
        adam_update<opmath_t, kAmsgrad, kLerpLow>(xv[k], mv[k], vv[k], vmv[k], gv[k], args);
        y[i] = static_cast<scalar_t>(xv[k]);
      }
    }
  }
}

void check_norm(const at::Tensor& norm, const at::Device& device) {
  TORCH_CHECK(
      norm.numel() == 1 && norm.scalar_type() == at::kFloat && norm.device() == device,
      "sampa_preview: norm must be one float32 value on ", device);
}

}  // namespace

void sampa_preview_sgd_(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList perturbed,
    at::TensorList previews,
    at::TensorList bufs,
    const at::Tensor& norm,
    double rho,
    double lr,
    double momentum,
    double dampening,
    bool nesterov,
    double weight_decay,
    bool maximize,
    bool init_bufs) {
  if (params.empty()) return;
  const bool has_momentum = momentum != 0.0;
  const bool read_bufs = has_momentum && !init_bufs;
  const auto device = check_named_lists(
      "sampa_preview_sgd_", at::kCUDA, params, {{"grads", grads}, {"perturbed", perturbed}, {"previews", previews}});
  if (read_bufs) check_named_lists("sampa_preview_sgd_", at::kCUDA, params, {{"bufs", bufs}});
  check_norm(norm, device);
  const SgdArgs args = make_sgd_args(lr, momentum, dampening, weight_decay, maximize);
  const c10::cuda::CUDAGuard guard(device);
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (const auto& [dtype, index] : dtype_groups(params)) {
    SAM_CUDA_DISPATCH(dtype, "sampa_preview_sgd_", [&] {
      const Table table = read_bufs ? make_table({params, grads, perturbed, previews, bufs}, index)
                                    : make_table({params, grads, perturbed, previews}, index);
      dispatch_sgd_flags(has_momentum, nesterov, init_bufs, [&]<bool kM, bool kN, bool kI>() {
        preview_sgd_kernel<scalar_t, kM, kN, kI><<<table.n_chunks, kThreads, 0, stream>>>(
            table.data(), table.n_tensors, norm.const_data_ptr<float>(), static_cast<float>(rho), args);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
}

void sampa_preview_adam_(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList perturbed,
    at::TensorList previews,
    at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs,
    at::TensorList max_exp_avg_sqs,
    const at::Tensor& norm,
    double rho,
    double lr,
    double beta1,
    double beta2,
    double eps,
    double weight_decay,
    bool decoupled,
    bool amsgrad,
    bool maximize,
    double bias_correction1,
    double bias_correction2) {
  if (params.empty()) return;
  const auto device = check_named_lists(
      "sampa_preview_adam_", at::kCUDA, params,
      {{"grads", grads}, {"perturbed", perturbed}, {"previews", previews}, {"exp_avgs", exp_avgs},
       {"exp_avg_sqs", exp_avg_sqs}, {"max_exp_avg_sqs", amsgrad ? max_exp_avg_sqs : at::TensorList()}});
  TORCH_CHECK(
      exp_avgs.size() == params.size() && exp_avg_sqs.size() == params.size() &&
          (!amsgrad || max_exp_avg_sqs.size() == params.size()),
      "sampa_preview_adam_: the moment lists must have one tensor per parameter");
  check_norm(norm, device);
  const AdamArgs args = make_adam_args(
      lr, beta1, beta2, eps, weight_decay, decoupled, maximize, bias_correction1, bias_correction2);
  const c10::cuda::CUDAGuard guard(device);
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (const auto& [dtype, index] : dtype_groups(params)) {
    SAM_CUDA_DISPATCH(dtype, "sampa_preview_adam_", [&] {
      const Table table =
          amsgrad ? make_table({params, grads, perturbed, previews, exp_avgs, exp_avg_sqs, max_exp_avg_sqs}, index)
                  : make_table({params, grads, perturbed, previews, exp_avgs, exp_avg_sqs}, index);
      dispatch_adam_flags(amsgrad, 1.0 - beta1 < 0.5, [&]<bool kA, bool kL>() {
        preview_adam_kernel<scalar_t, kA, kL><<<table.n_chunks, kThreads, 0, stream>>>(
            table.data(), table.n_tensors, norm.const_data_ptr<float>(), static_cast<float>(rho), args);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
}

}  // namespace sam_kernels::cuda

TORCH_LIBRARY_IMPL(sam_kernels, CUDA, m) {
  m.impl("sampa_preview_sgd_", &sam_kernels::cuda::sampa_preview_sgd_);
  m.impl("sampa_preview_adam_", &sam_kernels::cuda::sampa_preview_adam_);
}
