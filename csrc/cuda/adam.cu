// restore_adam_ (x <- olds, then one torch.optim.Adam / AdamW step, in one pass; adam_math.h) and
// sampa_update_adam_ (the same step from x itself with d = (1 - lam) g + lam g2). The bias
// corrections come from each tensor's step counter on the device; found_inf / grad_scale as in
// sgd.cu. Argument order: ops.cpp.
#include "../adam_math.h"
#include "multi_tensor_apply.cuh"

namespace sam_kernels::cuda {
namespace {

// Lists: x, old, g, m, v, steps, [vmax] (restore) or x, g, g2, m, v, steps, [vmax] (kMix).
template <typename scalar_t, bool kAmsgrad, bool kLerpLow, bool kMix>
__global__ void __launch_bounds__(kThreads) adam_kernel(
    TableView table, AdamHyper hyper, Mix mix, const float* __restrict__ grad_scale,
    const float* __restrict__ found_inf, const float* __restrict__ lr) {
  using opmath_t = at::opmath_type<scalar_t>;
  const ChunkRef c = table.chunk_ref(blockIdx.x);
  const bool skip = load_or(found_inf, 0.f) != 0.f;
  if (kMix && skip) return;
  scalar_t* x = table.ptr<scalar_t>(0, c.tensor);
  const scalar_t* old = kMix ? x : table.ptr<const scalar_t>(1, c.tensor);
  if (skip) {  // SAM's restore, no update
    for (int64_t i = c.begin + threadIdx.x; i < c.end; i += kThreads) x[i] = old[i];
    return;
  }
  const scalar_t* g = table.ptr<const scalar_t>(kMix ? 1 : 2, c.tensor);
  const scalar_t* g2 = kMix ? table.ptr<const scalar_t>(2, c.tensor) : nullptr;
  scalar_t* m = table.ptr<scalar_t>(3, c.tensor);
  scalar_t* v = table.ptr<scalar_t>(4, c.tensor);
  scalar_t* vmax = kAmsgrad ? table.ptr<scalar_t>(6, c.tensor) : nullptr;
  if (lr != nullptr) hyper.lr = *lr;  // capturable: the lr of this replay
  const AdamArgs args = make_adam_args(hyper, *table.ptr<const float>(5, c.tensor), load_or(grad_scale, 1.f));
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

// scalars [lr, beta1, beta2, eps, wd, (lam)]; options [decoupled, amsgrad, maximize]; args [grad_scale, found_inf];
// device scalar lr
template <bool kMix>
void adam_runner(const Launch& l) {
  const AdamHyper hyper{l.s(0), l.s(1), l.s(2), l.s(3), l.s(4), l.flag(0), l.flag(2)};
  const Mix mix = kMix ? make_mix(l.s(5)) : Mix{};
  SAM_CUDA_DISPATCH(l.dtype, "adam", [&] {
    dispatch_adam_flags(l.flag(1), 1.0 - l.s(1) < 0.5, [&]<bool kA, bool kL>() {
      launch_chunks(l, adam_kernel<scalar_t, kA, kL, kMix>, hyper, mix, l.f32(0), l.f32(1), l.dev_scalar(0));
    });
  });
}

SAM_RUNNER("restore_adam_", c10::DeviceType::CUDA, adam_runner<false>);
SAM_RUNNER("sampa_update_adam_", c10::DeviceType::CUDA, adam_runner<true>);

}  // namespace
}  // namespace sam_kernels::cuda
