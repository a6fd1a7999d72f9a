// restore_sgd_ (x <- x_old, then one torch.optim.SGD step, in one pass; sgd_math.h),
// shift_restore_sgd_ (x <- x + s buf recomputed, then the step: MSAM) and sampa_update_sgd_ (the
// step from x itself with d = (1 - lam) g + lam g2). found_inf != 0 skips the step (x_t still comes
// back where it was restored; no buffer is written); grad_scale
// multiplies the gradient. Both are read on the device. The arguments, by name: their
// declarations (sam_kernels/ops/primitives.py).
#include "../sgd_math.h"
#include "multi_tensor_apply.cuh"

namespace sam_kernels::cuda {
namespace {

// P: decl::restore_sgd_ (x <- x_old first), decl::shift_restore_sgd_ (kShift: x <- x + s buf first) or
// decl::sampa_update_sgd_ (kMix: from x, d = mix of grads, grads2).
template <class P, typename scalar_t, bool kMomentum, bool kNesterov, bool kInit, bool kMix, bool kShift>
__global__ void __launch_bounds__(kThreads) sgd_kernel(
    TableView table, SgdArgs args, Mix mix, ShiftArg shift, const float* __restrict__ grad_scale,
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
  const scalar_t* g = table.ptr<const scalar_t>(P::grads, c.tensor);
  scalar_t* buf = (kMomentum || kShift) ? table.ptr<scalar_t>(P::bufs, c.tensor) : nullptr;
  bool moved;  // kShift: x was moved by s buf (a finite norm)
  const opmath_t s = shift_scale<kShift, opmath_t>(shift, moved);
  if (skip) return write_restored<kShift>(c, x, old, buf, moved, s);  // SAM's restore (MSAM's way back) only
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
        if constexpr (kShift) {
          if (moved) xv[k] = static_cast<opmath_t>(shifted<scalar_t, opmath_t>(old[i], buf[i], s));
        }
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

// lr (and MSAM's rho) may be device scalars (capturable)
template <class P, bool kMix, bool kShift>
void sgd_runner(const Launch& l) {
  const bool momentum = l.s(P::momentum) != 0.0;
  const SgdArgs args = make_sgd_args(l.s(P::lr), l.s(P::momentum), l.s(P::dampening), l.s(P::weight_decay),
                                     l.flag(P::maximize));
  Mix mix{};
  if constexpr (kMix) mix = make_mix(l.s(P::lam));
  ShiftArg shift{};
  if constexpr (kShift) shift = ShiftArg{l.ref(P::norm), l.s(P::rho), l.dev_scalar(P::rho)};
  SAM_CUDA_DISPATCH(l.dtype, "sgd", [&] {
    dispatch_sgd_flags(momentum, l.flag(P::nesterov), l.flag(P::init_bufs), [&]<bool kM, bool kN, bool kI>() {
      launch_chunks(l, sgd_kernel<P, scalar_t, kM, kN, kI, kMix, kShift>, args, mix, shift, l.f32(P::grad_scale),
                    l.f32(P::found_inf), l.dev_scalar(P::lr));
    });
  });
}

SAM_RUNNER("restore_sgd_", c10::DeviceType::CUDA, (sgd_runner<decl::restore_sgd_, false, false>));
SAM_RUNNER("shift_restore_sgd_", c10::DeviceType::CUDA, (sgd_runner<decl::shift_restore_sgd_, false, true>));
SAM_RUNNER("sampa_update_sgd_", c10::DeviceType::CUDA, (sgd_runner<decl::sampa_update_sgd_, true, false>));

}  // namespace
}  // namespace sam_kernels::cuda
