// restore_adam_ (x <- x_old, then one torch.optim.Adam / AdamW step, in one pass; adam_math.h),
// shift_restore_adam_ (x <- x + s m recomputed, then the step: MSAM) and sampa_update_adam_ (the
// same step from x itself with d = (1 - lam) g + lam g2). The bias
// corrections come from each tensor's step counter on the device; found_inf / grad_scale as in
// sgd.cu. The arguments, by name: their declarations (sam_kernels/ops/primitives.py).
#include "../adam_math.h"
#include "multi_tensor_apply.cuh"

namespace sam_kernels::cuda {
namespace {

// P: decl::restore_adam_ (x <- x_old first), decl::shift_restore_adam_ (kShift: x <- x + s m first) or
// decl::sampa_update_adam_ (kMix: from x, d = mix of grads, grads2).
template <class P, typename scalar_t, bool kAmsgrad, bool kLerpLow, bool kMix, bool kShift>
__global__ void __launch_bounds__(kThreads) adam_kernel(
    TableView table, AdamHyper hyper, Mix mix, ShiftArg shift, const float* __restrict__ grad_scale,
    const float* __restrict__ found_inf, const float* __restrict__ lr) {
  using opmath_t = at::opmath_type<scalar_t>;
  const ChunkRef c = table.chunk_ref(blockIdx.x);
  const bool skip = load_or(found_inf, 0.f) != 0.f;
  if (kMix && skip) return;
  scalar_t* x = table.ptr<scalar_t>(P::params, c.tensor);
  const scalar_t* old = x;
  const scalar_t* g2 = nullptr;
  if constexpr (kMix) {
    g2 = table.ptr<const scalar_t>(P::grads2, c.tensor);
  } else if constexpr (!kShift) {
    old = table.ptr<const scalar_t>(P::x_old, c.tensor);
  }
  scalar_t* m = table.ptr<scalar_t>(P::exp_avgs, c.tensor);
  bool moved;  // kShift: x was moved by s m (a finite norm)
  const opmath_t s = shift_scale<kShift, opmath_t>(shift, moved);
  if (skip) return write_restored<kShift>(c, x, old, m, moved, s);  // SAM's restore (MSAM's way back) only
  const scalar_t* g = table.ptr<const scalar_t>(P::grads, c.tensor);
  scalar_t* v = table.ptr<scalar_t>(P::exp_avg_sqs, c.tensor);
  scalar_t* vmax = kAmsgrad ? table.ptr<scalar_t>(P::max_exp_avg_sqs, c.tensor) : nullptr;
  if (lr != nullptr) hyper.lr = *lr;  // capturable: the lr of this replay
  const AdamArgs args = make_adam_args(hyper, *table.ptr<const float>(P::state_steps, c.tensor), load_or(grad_scale, 1.f));
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
        if constexpr (kShift) {
          if (moved) xv[k] = static_cast<opmath_t>(shifted<scalar_t, opmath_t>(old[i], m[i], s));
        }
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

// lr (and MSAM's rho) may be device scalars (capturable)
template <class P, bool kMix, bool kShift>
void adam_runner(const Launch& l) {
  const AdamHyper hyper{l.s(P::lr), l.s(P::beta1), l.s(P::beta2), l.s(P::eps), l.s(P::weight_decay),
                        l.flag(P::decoupled), l.flag(P::maximize)};
  Mix mix{};
  if constexpr (kMix) mix = make_mix(l.s(P::lam));
  ShiftArg shift{};
  if constexpr (kShift) shift = ShiftArg{l.ref(P::norm), l.s(P::rho), l.dev_scalar(P::rho)};
  SAM_CUDA_DISPATCH(l.dtype, "adam", [&] {
    dispatch_adam_flags(l.flag(P::amsgrad), 1.0 - l.s(P::beta1) < 0.5, [&]<bool kA, bool kL>() {
      launch_chunks(l, adam_kernel<P, scalar_t, kA, kL, kMix, kShift>, hyper, mix, shift, l.f32(P::grad_scale),
                    l.f32(P::found_inf), l.dev_scalar(P::lr));
    });
  });
}

SAM_RUNNER("restore_adam_", c10::DeviceType::CUDA, (adam_runner<decl::restore_adam_, false, false>));
SAM_RUNNER("shift_restore_adam_", c10::DeviceType::CUDA, (adam_runner<decl::shift_restore_adam_, false, true>));
SAM_RUNNER("sampa_update_adam_", c10::DeviceType::CUDA, (adam_runner<decl::sampa_update_adam_, true, false>));

}  // namespace
}  // namespace sam_kernels::cuda
