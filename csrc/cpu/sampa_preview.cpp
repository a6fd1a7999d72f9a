// sampa_preview_sgd_ / sampa_preview_adam_: SAMPa's two points of a step from one read of x and g_y:
//   perturbed = x + s * g, s = rho / (norm + eps)
//   previews  = the base optimizer's step from x with g (sgd_math.h / adam_math.h), on copies
//               of the state in registers: the optimizer state is read, never written.
// A non-finite norm means g_y must not be used (the step that produced it was skipped): then
// perturbed = x and the preview takes a zero gradient, so no NaN reaches either point.
// Bytes per element (fp32): read x, g (+ buf | m, v); write perturbed, previews = 20 B (SGD with
// momentum), 24 B (Adam). The arguments, by name: their declarations (sam_kernels/ops/primitives.py).
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../adam_math.h"
#include "multi_tensor.h"

namespace sam_kernels::cpu {
namespace {

// The perturbation scale as perturb_ computes it (fp32 for an fp32 norm, fp64 for the fp64 norm of
// fp64 tensors; 0 for a non-finite norm).
template <class P>
double perturb_scale(const Launch& l, bool& finite) {
  const double nv = read_value(l, P::norm, 0.0);
  finite = std::isfinite(nv);
  if (!finite) return 0.0;
  if (l.ref(P::norm).f64) return l.s(P::rho) / (nv + kNormEps);
  return static_cast<float>(l.s(P::rho)) / (static_cast<float>(nv) + static_cast<float>(kNormEps));
}

template <typename scalar_t, bool kMomentum, bool kNesterov, bool kInit>
void preview_sgd_chunk(
    const scalar_t* x, const scalar_t* g, const scalar_t* buf, scalar_t* xt, scalar_t* y, double scale,
    const SgdArgs& args, int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t s = static_cast<opmath_t>(scale);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    opmath_t xv = static_cast<opmath_t>(x[i]);
    const opmath_t gv = static_cast<opmath_t>(g[i]);
    xt[i] = static_cast<scalar_t>(xv + s * gv);
    opmath_t bv = (kMomentum && !kInit) ? static_cast<opmath_t>(buf[i]) : opmath_t(0);
    sgd_update<opmath_t, kMomentum, kNesterov, kInit>(xv, bv, gv, args);
    y[i] = static_cast<scalar_t>(xv);
  }
}

template <typename scalar_t, bool kAmsgrad, bool kLerpLow>
void preview_adam_chunk(
    const scalar_t* x, const scalar_t* g, const scalar_t* m, const scalar_t* v, const scalar_t* vmax, scalar_t* xt,
    scalar_t* y, double scale, const AdamArgs& args, int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t s = static_cast<opmath_t>(scale);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    opmath_t xv = static_cast<opmath_t>(x[i]);
    const opmath_t gv = static_cast<opmath_t>(g[i]);
    xt[i] = static_cast<scalar_t>(xv + s * gv);
    opmath_t mv = static_cast<opmath_t>(m[i]);
    opmath_t vv = static_cast<opmath_t>(v[i]);
    opmath_t vmv = kAmsgrad ? static_cast<opmath_t>(vmax[i]) : opmath_t(0);
    adam_update<opmath_t, kAmsgrad, kLerpLow>(xv, mv, vv, vmv, gv, args);
    y[i] = static_cast<scalar_t>(xv);
  }
}

// Runs body(chunk, x, g, perturbed, previews) over every chunk of declaration P; where the norm is
// not finite, g is a zero block instead (so the perturbed point is x and the preview steps with 0).
template <class P, typename Body>
void for_each_preview_chunk(const Launch& l, bool finite, const Body& body) {
  for_each_chunk(l.table, [&](const ChunkRef& c) {
    SAM_DISPATCH_FLOATING(l.dtype, "sampa_preview", [&] {
      const scalar_t* x = l.table.ptr<const scalar_t>(P::params, c.tensor) + c.begin;
      scalar_t* xt = l.table.ptr<scalar_t>(P::perturbed, c.tensor) + c.begin;
      scalar_t* y = l.table.ptr<scalar_t>(P::previews, c.tensor) + c.begin;
      if (finite) return body(c, x, l.table.ptr<const scalar_t>(P::grads, c.tensor) + c.begin, xt, y, c.end - c.begin);
      std::vector<scalar_t> zeros(std::min<int64_t>(c.end - c.begin, 4096), scalar_t(0));
      for (int64_t b = 0; b < c.end - c.begin; b += 4096) {
        const int64_t n = std::min<int64_t>(4096, c.end - c.begin - b);
        body(ChunkRef{c.tensor, c.begin + b, c.begin + b + n, c.index}, x + b, zeros.data(), xt + b, y + b, n);
      }
    });
  });
}

void preview_sgd_runner(const Launch& l) {
  using P = decl::sampa_preview_sgd_;
  bool finite = true;
  const double scale = perturb_scale<P>(l, finite);
  const bool momentum = l.s(P::momentum) != 0.0, nesterov = l.flag(P::nesterov), init = l.flag(P::init_bufs);
  const SgdArgs args = make_sgd_args(l.s(P::lr), l.s(P::momentum), l.s(P::dampening), l.s(P::weight_decay),
                                     l.flag(P::maximize));
  for_each_preview_chunk<P>(l, finite, [&](const ChunkRef& c, const auto* x, const auto* g, auto* xt, auto* y,
                                           int64_t n) {
    using scalar_t = std::remove_cv_t<std::remove_pointer_t<decltype(x)>>;
    const scalar_t* buf = momentum && !init ? l.table.ptr<const scalar_t>(P::bufs, c.tensor) + c.begin : nullptr;
    dispatch_sgd_flags(momentum, nesterov, init, [&]<bool kM, bool kN, bool kI>() {
      preview_sgd_chunk<scalar_t, kM, kN, kI>(x, g, buf, xt, y, scale, args, n);
    });
  });
}

// the preview is of step count + 1
void preview_adam_runner(const Launch& l) {
  using P = decl::sampa_preview_adam_;
  bool finite = true;
  const double scale = perturb_scale<P>(l, finite);
  const AdamHyper hyper{l.s(P::lr), l.s(P::beta1), l.s(P::beta2), l.s(P::eps), l.s(P::weight_decay),
                        l.flag(P::decoupled), l.flag(P::maximize)};
  const bool amsgrad = l.flag(P::amsgrad), lerp_low = 1.0 - l.s(P::beta1) < 0.5;
  for_each_preview_chunk<P>(l, finite, [&](const ChunkRef& c, const auto* x, const auto* g, auto* xt, auto* y,
                                           int64_t n) {
    using scalar_t = std::remove_cv_t<std::remove_pointer_t<decltype(x)>>;
    const scalar_t* m = l.table.ptr<const scalar_t>(P::exp_avgs, c.tensor) + c.begin;
    const scalar_t* v = l.table.ptr<const scalar_t>(P::exp_avg_sqs, c.tensor) + c.begin;
    const scalar_t* vmax = amsgrad ? l.table.ptr<const scalar_t>(P::max_exp_avg_sqs, c.tensor) + c.begin : nullptr;
    const AdamArgs args = make_adam_args(hyper, *l.table.ptr<const float>(P::state_steps, c.tensor) + 1.0);
    dispatch_adam_flags(amsgrad, lerp_low, [&]<bool kA, bool kL>() {
      preview_adam_chunk<scalar_t, kA, kL>(x, g, m, v, vmax, xt, y, scale, args, n);
    });
  });
}

SAM_RUNNER("sampa_preview_sgd_", c10::DeviceType::CPU, preview_sgd_runner);
SAM_RUNNER("sampa_preview_adam_", c10::DeviceType::CPU, preview_adam_runner);

}  // namespace
}  // namespace sam_kernels::cpu
