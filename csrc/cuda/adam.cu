// restore_adam_: x <- olds, then one torch.optim.Adam / AdamW step, in one pass (see adam_math.h);
// sampa_update_adam_: the same kernel from x itself with d = (1 - lam) g + lam g2 (SAMPa).
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../adam_math.h"
#include "multi_tensor_apply.cuh"

namespace sam_kernels::cuda {
namespace {

// Lists: x, old, g, m, v, [vmax], [g2]. kMix (SAMPa): the gradient is (1 - lam) g + lam g2.
template <typename scalar_t, bool kAmsgrad, bool kLerpLow, bool kMix>
__global__ void __launch_bounds__(kThreads)
    restore_adam_kernel(const int64_t* __restrict__ meta, int64_t n_tensors, AdamArgs args, Mix mix) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int64_t kG2List = kAmsgrad ? 6 : 5;
  const ChunkRef c = chunk_of(meta, kG2List + (kMix ? 1 : 0), n_tensors);
  scalar_t* x = list_ptr<scalar_t>(meta, 0, n_tensors, c.tensor);
  const scalar_t* old = list_ptr<const scalar_t>(meta, 1, n_tensors, c.tensor);
  const scalar_t* g = list_ptr<const scalar_t>(meta, 2, n_tensors, c.tensor);
  scalar_t* m = list_ptr<scalar_t>(meta, 3, n_tensors, c.tensor);
  scalar_t* v = list_ptr<scalar_t>(meta, 4, n_tensors, c.tensor);
  scalar_t* vmax = kAmsgrad ? list_ptr<scalar_t>(meta, 5, n_tensors, c.tensor) : nullptr;
  const scalar_t* g2 = kMix ? list_ptr<const scalar_t>(meta, kG2List, n_tensors, c.tensor) : nullptr;
  for (int64_t base = c.begin + threadIdx.x; base < c.end; base += int64_t(kThreads) * kILP) {
    opmath_t xv[kILP], gv[kILP], mv[kILP], vv[kILP], vmv[kILP];
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = base + int64_t(k) * kThreads;
      if (i < c.end) {
        xv[k] = static_cast<opmath_t>(old[i]);
        gv[k] = static_cast<opmath_t>(g[i]);
        if constexpr (kMix) gv[k] = mix_grads<opmath_t>(gv[k], static_cast<opmath_t>(g2[i]), mix.w1, mix.w2);
        mv[k] = static_cast<opmath_t>(m[i]);
        vv[k] = static_cast<opmath_t>(v[i]);
        vmv[k] = kAmsgrad ? static_cast<opmath_t>(vmax[i]) : opmath_t(0);
      }
    }
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = base + int64_t(k) * kThreads;
      if (i < c.end) {
        adam_update<opmath_t, kAmsgrad, kLerpLow>(xv[k], mv[k], vv[k], vmv[k], gv[k], args);
        x[i] = static_cast<scalar_t>(xv[k]);
        m[i] = static_cast<scalar_t>(mv[k]);
        v[i] = static_cast<scalar_t>(vv[k]);
        if constexpr (kAmsgrad) vmax[i] = static_cast<scalar_t>(vmv[k]);
      }
    }
  }
}

}  // namespace

void restore_adam_(
    at::TensorList params,
    at::TensorList olds,
    at::TensorList grads,
    at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs,
    at::TensorList max_exp_avg_sqs,
    double lr,
    double beta1,
    double beta2,
    double eps,
    double weight_decay,
    bool decoupled,
    bool amsgrad,
    bool maximize,
    double bias_correction1,
    double bias_correction2,
    double grad_scale) {
  if (params.empty()) return;
  const auto device = check_adam_args(at::kCUDA, params, olds, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad);
  const AdamArgs args = make_adam_args(
      lr, beta1, beta2, eps, weight_decay, decoupled, maximize, bias_correction1, bias_correction2, grad_scale);
  const c10::cuda::CUDAGuard guard(device);
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (const auto& [dtype, index] : dtype_groups(params)) {
    SAM_CUDA_DISPATCH(dtype, "restore_adam_", [&] {
      const Table table = amsgrad ? make_table({params, olds, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs}, index)
                                  : make_table({params, olds, grads, exp_avgs, exp_avg_sqs}, index);
      dispatch_adam_flags(amsgrad, 1.0 - beta1 < 0.5, [&]<bool kA, bool kL>() {
        restore_adam_kernel<scalar_t, kA, kL, false>
            <<<table.n_chunks, kThreads, 0, stream>>>(table.data(), table.n_tensors, args, Mix{});
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
}

void sampa_update_adam_(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList grads2,
    at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs,
    at::TensorList max_exp_avg_sqs,
    double lam,
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
  const auto device =
      check_adam_args(at::kCUDA, params, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad);
  check_named_lists("sampa_update_adam_", at::kCUDA, params, {{"grads2", grads2}});
  const AdamArgs args = make_adam_args(
      lr, beta1, beta2, eps, weight_decay, decoupled, maximize, bias_correction1, bias_correction2);
  const c10::cuda::CUDAGuard guard(device);
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (const auto& [dtype, index] : dtype_groups(params)) {
    SAM_CUDA_DISPATCH(dtype, "sampa_update_adam_", [&] {
      const Table table =
          amsgrad ? make_table({params, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, grads2}, index)
                  : make_table({params, params, grads, exp_avgs, exp_avg_sqs, grads2}, index);
      dispatch_adam_flags(amsgrad, 1.0 - beta1 < 0.5, [&]<bool kA, bool kL>() {
        restore_adam_kernel<scalar_t, kA, kL, true>
            <<<table.n_chunks, kThreads, 0, stream>>>(table.data(), table.n_tensors, args, make_mix(lam));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
}

}  // namespace sam_kernels::cuda

TORCH_LIBRARY_IMPL(sam_kernels, CUDA, m) {
  m.impl("restore_adam_", &sam_kernels::cuda::restore_adam_);
  m.impl("sampa_update_adam_", &sam_kernels::cuda::sampa_update_adam_);
}
