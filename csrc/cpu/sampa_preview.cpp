// sampa_preview_sgd_ / sampa_preview_adam_: SAMPa's two points of a step from one read of x and g_y:
//   perturbed = x + s * g, s = rho / (norm + eps)   (x itself when the norm is not finite)
//   previews  = the base optimizer's step from x with g (sgd_math.h / adam_math.h), on copies
//               of the state in registers: the optimizer state is read, never written.
// Bytes per element (fp32): read x, g (+ buf | m, v); write perturbed, previews = 20 B (SGD with
// momentum), 24 B (Adam).
#include <cmath>
#include <cstring>

#include "../adam_math.h"
#include "multi_tensor.h"

namespace sam_kernels::cpu {
namespace {

// The perturbation scale as perturb_ computes it (fp32, 0 for a non-finite norm).
float perturb_scale(const at::Tensor& norm, double rho, bool& finite) {
  TORCH_CHECK(norm.numel() == 1, "sampa_preview: norm must hold one value, got ", norm.numel());
  const float nv = norm.item<float>();  // a CPU scalar: no device synchronization here
  finite = std::isfinite(nv);
  return finite ? static_cast<float>(rho) / (nv + static_cast<float>(kNormEps)) : 0.f;
}

template <typename scalar_t, bool kMomentum, bool kNesterov, bool kInit>
void preview_sgd_chunk(
    const scalar_t* x, const scalar_t* g, const scalar_t* buf, scalar_t* xt, scalar_t* y, float scale,
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
    scalar_t* y, float scale, const AdamArgs& args, int64_t n) {
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

// Runs body(chunk, x, g, perturbed, previews) over every chunk, then rewrites the perturbed
// point as x where the norm was not finite (a bad g_y never moves a weight).
template <typename Body>
void for_each_preview_chunk(
    at::TensorList params, at::TensorList grads, at::TensorList perturbed, at::TensorList previews,
    bool finite, const Body& body) {
  parallel_chunks(make_chunks(params), [&](const Chunk& c) {
    const auto& p = params[c.tensor];
    SAM_DISPATCH_FLOATING(p.scalar_type(), "sampa_preview", [&] {
      const scalar_t* x = p.const_data_ptr<scalar_t>() + c.begin;
      scalar_t* xt = perturbed[c.tensor].data_ptr<scalar_t>() + c.begin;
      body(c, x, grads[c.tensor].const_data_ptr<scalar_t>() + c.begin, xt,
           previews[c.tensor].data_ptr<scalar_t>() + c.begin);
      if (!finite) std::memcpy(xt, x, (c.end - c.begin) * sizeof(scalar_t));
    });
  });
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
  check_named_lists(
      "sampa_preview_sgd_", at::kCPU, params,
      {{"grads", grads}, {"perturbed", perturbed}, {"previews", previews}});
  if (read_bufs) check_named_lists("sampa_preview_sgd_", at::kCPU, params, {{"bufs", bufs}});
  bool finite = true;
  const float scale = perturb_scale(norm, rho, finite);
  const SgdArgs args = make_sgd_args(lr, momentum, dampening, weight_decay, maximize);
  for_each_preview_chunk(params, grads, perturbed, previews, finite,
                         [&](const Chunk& c, const auto* x, const auto* g, auto* xt, auto* y) {
    using scalar_t = std::remove_cv_t<std::remove_pointer_t<decltype(x)>>;
    const scalar_t* buf = read_bufs ? bufs[c.tensor].const_data_ptr<scalar_t>() + c.begin : nullptr;
    dispatch_sgd_flags(has_momentum, nesterov, init_bufs, [&]<bool kM, bool kN, bool kI>() {
      preview_sgd_chunk<scalar_t, kM, kN, kI>(x, g, buf, xt, y, scale, args, c.end - c.begin);
    });
  });
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
  check_named_lists(
      "sampa_preview_adam_", at::kCPU, params,
      {{"grads", grads}, {"perturbed", perturbed}, {"previews", previews}, {"exp_avgs", exp_avgs},
       {"exp_avg_sqs", exp_avg_sqs}, {"max_exp_avg_sqs", amsgrad ? max_exp_avg_sqs : at::TensorList()}});
  TORCH_CHECK(
      exp_avgs.size() == params.size() && exp_avg_sqs.size() == params.size() &&
          (!amsgrad || max_exp_avg_sqs.size() == params.size()),
      "sampa_preview_adam_: the moment lists must have one tensor per parameter");
  bool finite = true;
  const float scale = perturb_scale(norm, rho, finite);
  const AdamArgs args = make_adam_args(
      lr, beta1, beta2, eps, weight_decay, decoupled, maximize, bias_correction1, bias_correction2);
  for_each_preview_chunk(params, grads, perturbed, previews, finite,
                         [&](const Chunk& c, const auto* x, const auto* g, auto* xt, auto* y) {
    using scalar_t = std::remove_cv_t<std::remove_pointer_t<decltype(x)>>;
    const scalar_t* m = exp_avgs[c.tensor].const_data_ptr<scalar_t>() + c.begin;
    const scalar_t* v = exp_avg_sqs[c.tensor].const_data_ptr<scalar_t>() + c.begin;
    const scalar_t* vmax = amsgrad ? max_exp_avg_sqs[c.tensor].const_data_ptr<scalar_t>() + c.begin : nullptr;
    dispatch_adam_flags(amsgrad, 1.0 - beta1 < 0.5, [&]<bool kA, bool kL>() {
      preview_adam_chunk<scalar_t, kA, kL>(x, g, m, v, vmax, xt, y, scale, args, c.end - c.begin);
    });
  });
}

}  // namespace sam_kernels::cpu

TORCH_LIBRARY_IMPL(sam_kernels, CPU, m) {
  m.impl("sampa_preview_sgd_", &sam_kernels::cpu::sampa_preview_sgd_);
  m.impl("sampa_preview_adam_", &sam_kernels::cpu::sampa_preview_adam_);
}
