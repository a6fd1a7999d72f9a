// restore_sgd_: x <- olds, then one torch.optim.SGD step, in one pass (see sgd_math.h);
// sampa_update_sgd_: the same kernel from x itself with d = (1 - lam) g + lam g2 (SAMPa).
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../sgd_math.h"
#include "multi_tensor_apply.cuh"

namespace sam_kernels::cuda {
namespace {

// Lists: x, old, g, [buf], [g2]. kMix (SAMPa): the gradient is (1 - lam) g + lam g2.
template <typename scalar_t, bool kMomentum, bool kNesterov, bool kInit, bool kMix>
__global__ void __launch_bounds__(kThreads)
    restore_sgd_kernel(const int64_t* __restrict__ meta, int64_t n_tensors, SgdArgs args, Mix mix) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int64_t kG2List = kMomentum ? 4 : 3;
  const ChunkRef c = chunk_of(meta, kG2List + (kMix ? 1 : 0), n_tensors);
  scalar_t* x = list_ptr<scalar_t>(meta, 0, n_tensors, c.tensor);
  const scalar_t* old = list_ptr<const scalar_t>(meta, 1, n_tensors, c.tensor);
  const scalar_t* g = list_ptr<const scalar_t>(meta, 2, n_tensors, c.tensor);
  scalar_t* buf = kMomentum ? list_ptr<scalar_t>(meta, 3, n_tensors, c.tensor) : nullptr;
  const scalar_t* g2 = kMix ? list_ptr<const scalar_t>(meta, kG2List, n_tensors, c.tensor) : nullptr;
  for (int64_t base = c.begin + threadIdx.x; base < c.end; base += int64_t(kThreads) * kILP) {
    opmath_t xv[kILP], gv[kILP], bv[kILP];
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = base + int64_t(k) * kThreads;
      if (i < c.end) {
        xv[k] = static_cast<opmath_t>(old[i]);
        gv[k] = static_cast<opmath_t>(g[i]);
        if constexpr (kMix) gv[k] = mix_grads<opmath_t>(gv[k], static_cast<opmath_t>(g2[i]), mix.w1, mix.w2);
        bv[k] = (kMomentum && !kInit) ? static_cast<opmath_t>(buf[i]) : opmath_t(0);
      }
    }
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = base + int64_t(k) * kThreads;
      if (i < c.end) {
        sgd_update<opmath_t, kMomentum, kNesterov, kInit>(xv[k], bv[k], gv[k], args);
        x[i] = static_cast<scalar_t>(xv[k]);
        if constexpr (kMomentum) buf[i] = static_cast<scalar_t>(bv[k]);
      }
    }
  }
}

}  // namespace

void restore_sgd_(
    at::TensorList params,
    at::TensorList olds,
    at::TensorList grads,
    at::TensorList bufs,
    double lr,
    double momentum,
    double dampening,
    bool nesterov,
    double weight_decay,
    bool maximize,
    bool init_bufs,
    double grad_scale) {
  if (params.empty()) return;
  const bool has_momentum = momentum != 0.0;
  const auto device = check_sgd_args(at::kCUDA, params, olds, grads, bufs, has_momentum);
  const SgdArgs args = make_sgd_args(lr, momentum, dampening, weight_decay, maximize, grad_scale);
  const c10::cuda::CUDAGuard guard(device);
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (const auto& [dtype, index] : dtype_groups(params)) {
    SAM_CUDA_DISPATCH(dtype, "restore_sgd_", [&] {
      const Table table = has_momentum ? make_table({params, olds, grads, bufs}, index)
                                       : make_table({params, olds, grads}, index);
      dispatch_sgd_flags(has_momentum, nesterov, init_bufs, [&]<bool kM, bool kN, bool kI>() {
        restore_sgd_kernel<scalar_t, kM, kN, kI, false>
            <<<table.n_chunks, kThreads, 0, stream>>>(table.data(), table.n_tensors, args, Mix{});
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
}

void sampa_update_sgd_(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList grads2,
    at::TensorList bufs,
    double lam,
    double lr,
    double momentum,
    double dampening,
    bool nesterov,
    double weight_decay,
    bool maximize,
    bool init_bufs) {
  if (params.empty()) return;
  const bool has_momentum = momentum != 0.0;
  const auto device = check_sgd_args(at::kCUDA, params, params, grads, bufs, has_momentum);
  check_named_lists("sampa_update_sgd_", at::kCUDA, params, {{"grads2", grads2}});
  const SgdArgs args = make_sgd_args(lr, momentum, dampening, weight_decay, maximize);
  const c10::cuda::CUDAGuard guard(device);
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (const auto& [dtype, index] : dtype_groups(params)) {
    SAM_CUDA_DISPATCH(dtype, "sampa_update_sgd_", [&] {
      const Table table = has_momentum ? make_table({params, params, grads, bufs, grads2}, index)
                                       : make_table({params, params, grads, grads2}, index);
      dispatch_sgd_flags(has_momentum, nesterov, init_bufs, [&]<bool kM, bool kN, bool kI>() {
        restore_sgd_kernel<scalar_t, kM, kN, kI, true>
            <<<table.n_chunks, kThreads, 0, stream>>>(table.data(), table.n_tensors, args, make_mix(lam));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
}

}  // namespace sam_kernels::cuda

TORCH_LIBRARY_IMPL(sam_kernels, CUDA, m) {
  m.impl("restore_sgd_", &sam_kernels::cuda::restore_sgd_);
  m.impl("sampa_update_sgd_", &sam_kernels::cuda::sampa_update_sgd_);
}
