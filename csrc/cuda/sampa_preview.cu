// sampa_preview_sgd_ / sampa_preview_adam_ (see csrc/cpu/sampa_preview.cpp): from one read of
// x and g_y, perturbed = x + s * g (s from the device-resident norm: no host synchronization)
// and previews = the base step from x with g, the state read into registers and not written.
// A non-finite norm: perturbed = x and the preview steps with a zero gradient. The arguments, by
// name: their declarations (sam_kernels/ops/primitives.py).
#include "../adam_math.h"
#include "multi_tensor_apply.cuh"

namespace sam_kernels::cuda {
namespace {

template <typename scalar_t, bool kMomentum, bool kNesterov, bool kInit>
__global__ void __launch_bounds__(kThreads)
    preview_sgd_kernel(TableView table, ScalarRef norm, double rho, SgdArgs args, const float* rho_t,
                       const float* lr_t) {
  using opmath_t = at::opmath_type<scalar_t>;
  using P = decl::sampa_preview_sgd_;
  constexpr bool kReadBuf = kMomentum && !kInit;
  const ChunkRef c = table.chunk_ref(blockIdx.x);
  const scalar_t* x = table.ptr<const scalar_t>(P::params, c.tensor);
  const scalar_t* g = table.ptr<const scalar_t>(P::grads, c.tensor);
  scalar_t* xt = table.ptr<scalar_t>(P::perturbed, c.tensor);
  scalar_t* y = table.ptr<scalar_t>(P::previews, c.tensor);
  const scalar_t* buf = kReadBuf ? table.ptr<const scalar_t>(P::bufs, c.tensor) : nullptr;
  bool finite;
  const opmath_t s = static_cast<opmath_t>(norm_scale(norm, rho, rho_t, finite));
  if (lr_t != nullptr) args.lr = *lr_t;
  for (int64_t base = c.begin + threadIdx.x; base < c.end; base += int64_t(kThreads) * kILP) {
    opmath_t xv[kILP], gv[kILP], bv[kILP];
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = base + int64_t(k) * kThreads;
      if (i < c.end) {
        xv[k] = static_cast<opmath_t>(x[i]);
        gv[k] = finite ? static_cast<opmath_t>(g[i]) : opmath_t(0);
        bv[k] = kReadBuf ? static_cast<opmath_t>(buf[i]) : opmath_t(0);
      }
    }
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = base + int64_t(k) * kThreads;
      if (i < c.end) {
        xt[i] = static_cast<scalar_t>(xv[k] + s * gv[k]);
        sgd_update<opmath_t, kMomentum, kNesterov, kInit>(xv[k], bv[k], gv[k], args);
        y[i] = static_cast<scalar_t>(xv[k]);
      }
    }
  }
}

// The preview is of step count + 1.
template <typename scalar_t, bool kAmsgrad, bool kLerpLow>
__global__ void __launch_bounds__(kThreads)
    preview_adam_kernel(TableView table, ScalarRef norm, double rho, AdamHyper hyper,
                        const float* rho_t, const float* lr_t) {
  using opmath_t = at::opmath_type<scalar_t>;
  using P = decl::sampa_preview_adam_;
  const ChunkRef c = table.chunk_ref(blockIdx.x);
  const scalar_t* x = table.ptr<const scalar_t>(P::params, c.tensor);
  const scalar_t* g = table.ptr<const scalar_t>(P::grads, c.tensor);
  scalar_t* xt = table.ptr<scalar_t>(P::perturbed, c.tensor);
  scalar_t* y = table.ptr<scalar_t>(P::previews, c.tensor);
  const scalar_t* m = table.ptr<const scalar_t>(P::exp_avgs, c.tensor);
  const scalar_t* v = table.ptr<const scalar_t>(P::exp_avg_sqs, c.tensor);
  const scalar_t* vmax = kAmsgrad ? table.ptr<const scalar_t>(P::max_exp_avg_sqs, c.tensor) : nullptr;
  if (lr_t != nullptr) hyper.lr = *lr_t;
  const AdamArgs args = make_adam_args(hyper, *table.ptr<const float>(P::state_steps, c.tensor) + 1.0);
  bool finite;
  const opmath_t s = static_cast<opmath_t>(norm_scale(norm, rho, rho_t, finite));
  for (int64_t base = c.begin + threadIdx.x; base < c.end; base += int64_t(kThreads) * kILP) {
    opmath_t xv[kILP], gv[kILP], mv[kILP], vv[kILP], vmv[kILP];
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = base + int64_t(k) * kThreads;
      if (i < c.end) {
        xv[k] = static_cast<opmath_t>(x[i]);
        gv[k] = finite ? static_cast<opmath_t>(g[i]) : opmath_t(0);
        mv[k] = static_cast<opmath_t>(m[i]);
        vv[k] = static_cast<opmath_t>(v[i]);
        vmv[k] = kAmsgrad ? static_cast<opmath_t>(vmax[i]) : opmath_t(0);
      }
    }
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = base + int64_t(k) * kThreads;
      if (i < c.end) {
        xt[i] = static_cast<scalar_t>(xv[k] + s * gv[k]);
        adam_update<opmath_t, kAmsgrad, kLerpLow>(xv[k], mv[k], vv[k], vmv[k], gv[k], args);
        y[i] = static_cast<scalar_t>(xv[k]);
      }
    }
  }
}

// rho and lr may be device scalars (capturable)
void preview_sgd_runner(const Launch& l) {
  using P = decl::sampa_preview_sgd_;
  const SgdArgs args = make_sgd_args(l.s(P::lr), l.s(P::momentum), l.s(P::dampening), l.s(P::weight_decay),
                                     l.flag(P::maximize));
  SAM_CUDA_DISPATCH(l.dtype, "sampa_preview_sgd_", [&] {
    dispatch_sgd_flags(l.s(P::momentum) != 0.0, l.flag(P::nesterov), l.flag(P::init_bufs),
                       [&]<bool kM, bool kN, bool kI>() {
      launch_chunks(l, preview_sgd_kernel<scalar_t, kM, kN, kI>, l.ref(P::norm), l.s(P::rho), args,
                    l.dev_scalar(P::rho), l.dev_scalar(P::lr));
    });
  });
}

void preview_adam_runner(const Launch& l) {
  using P = decl::sampa_preview_adam_;
  const AdamHyper hyper{l.s(P::lr), l.s(P::beta1), l.s(P::beta2), l.s(P::eps), l.s(P::weight_decay),
                        l.flag(P::decoupled), l.flag(P::maximize)};
  SAM_CUDA_DISPATCH(l.dtype, "sampa_preview_adam_", [&] {
    dispatch_adam_flags(l.flag(P::amsgrad), 1.0 - l.s(P::beta1) < 0.5, [&]<bool kA, bool kL>() {
      launch_chunks(l, preview_adam_kernel<scalar_t, kA, kL>, l.ref(P::norm), l.s(P::rho), hyper,
                    l.dev_scalar(P::rho), l.dev_scalar(P::lr));
    });
  });
}

SAM_RUNNER("sampa_preview_sgd_", c10::DeviceType::CUDA, preview_sgd_runner);
SAM_RUNNER("sampa_preview_adam_", c10::DeviceType::CUDA, preview_adam_runner);

}  // namespace
}  // namespace sam_kernels::cuda
