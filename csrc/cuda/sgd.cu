// restore_sgd_ (x <- olds, then one torch.optim.SGD step, in one pass; sgd_math.h) and
// sampa_update_sgd_ (the same step from x itself with d = (1 - lam) g + lam g2). found_inf != 0
// skips the step (restore_sgd_ still puts olds back; no buffer is written); grad_scale
// multiplies the gradient. Both are read on the device. Argument order: ops.cpp.
#include "../sgd_math.h"
#include "multi_tensor_apply.cuh"

namespace sam_kernels::cuda {
namespace {

// Lists: x, old, g, [buf] (restore) or x, g, g2, [buf] (kMix).
template <typename scalar_t, bool kMomentum, bool kNesterov, bool kInit, bool kMix>
__global__ void __launch_bounds__(kThreads) sgd_kernel(
    TableView table, SgdArgs args, Mix mix, const float* __restrict__ grad_scale, const float* __restrict__ found_inf,
    const float* __restrict__ lr) {
  using opmath_t = at::opmath_type<scalar_t>;
  const ChunkRef c = table.chunk_ref(blockIdx.x);
  const bool skip = load_or(found_inf, 0.f) != 0.f;
  if (kMix && skip) return;
  scalar_t* x = table.ptr<scalar_t>(0, c.tensor);
  const scalar_t* old = kMix ? x : table.ptr<const scalar_t>(1, c.tensor);
  const scalar_t* g = table.ptr<const scalar_t>(kMix ? 1 : 2, c.tensor);
  const scalar_t* g2 = kMix ? table.ptr<const scalar_t>(2, c.tensor) : nullptr;
  scalar_t* buf = kMomentum ? table.ptr<scalar_t>(3, c.tensor) : nullptr;
  if (skip) {  // SAM's restore, no update
    for (int64_t i = c.begin + threadIdx.x; i < c.end; i += kThreads) x[i] = old[i];
    return;
  }
  args.sign *= load_or(grad_scale, 1.f);
  if (lr != nullptr) args.lr = *lr;  // capturable: the lr of this replay
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

// scalars [lr, momentum, dampening, wd, (lam)]; options [nesterov, maximize, init_bufs]; args [grad_scale, found_inf];
// device scalar lr
template <bool kMix>
void sgd_runner(const Launch& l) {
  const bool momentum = l.s(1) != 0.0;
  const SgdArgs args = make_sgd_args(l.s(0), l.s(1), l.s(2), l.s(3), l.flag(1));
  const Mix mix = kMix ? make_mix(l.s(4)) : Mix{};
  SAM_CUDA_DISPATCH(l.dtype, "sgd", [&] {
    dispatch_sgd_flags(momentum, l.flag(0), l.flag(2), [&]<bool kM, bool kN, bool kI>() {
      launch_chunks(l, sgd_kernel<scalar_t, kM, kN, kI, kMix>, args, mix, l.f32(0), l.f32(1), l.dev_scalar(0));
    });
  });
}

SAM_RUNNER("restore_sgd_", c10::DeviceType::CUDA, sgd_runner<false>);
SAM_RUNNER("sampa_update_sgd_", c10::DeviceType::CUDA, sgd_runner<true>);

}  // namespace
}  // namespace sam_kernels::cuda
