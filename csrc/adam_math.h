// The per-element Adam / AdamW update, shared by the CPU and CUDA kernels.
// Mirrors torch.optim.Adam's single-tensor path (lerp for the first moment,
// denom = sqrt(v) / sqrt(bc2) + eps, step size lr / bc1). Branch-free like sgd_math.h.
// The bias corrections come from the tensor's step counter, read on the device (the counters
// live there, so the host never reads them): bc = 1 - beta^step in double, as torch computes
// them on the host from a Python float.
#pragma once
#include <cmath>

#include "sgd_math.h"  // SAM_HD

namespace sam_kernels {

struct AdamArgs {
  double beta1_weight;  // 1 - beta1, the lerp weight
  double beta2;
  double one_minus_beta2;
  double eps;
  double l2;         // Adam: weight_decay (d += wd * x); AdamW: 0
  double decay;      // AdamW: 1 - lr * wd (x *= decay); Adam: 1
  double step_size;  // lr / bias_correction1
  double bc2_sqrt;   // sqrt(bias_correction2)
  double sign;       // -1 for maximize, times the gradient multiplier (unscale / clip)
};

// The hyperparameters of a launch (one param group); the bias corrections are per tensor.
struct AdamHyper {
  double lr, beta1, beta2, eps, weight_decay;
  bool decoupled, maximize;
};

// step: the tensor's step count after this update (the preview of SAMPa passes its count + 1).
SAM_HD AdamArgs make_adam_args(const AdamHyper& h, double step, double grad_mul = 1.0) {
  const double bc1 = 1.0 - ::pow(h.beta1, step);
  const double bc2 = 1.0 - ::pow(h.beta2, step);
  return AdamArgs{1.0 - h.beta1, h.beta2, 1.0 - h.beta2, h.eps, h.decoupled ? 0.0 : h.weight_decay,
                  h.decoupled ? 1.0 - h.lr * h.weight_decay : 1.0, h.lr / bc1, ::sqrt(bc2),
                  (h.maximize ? -1.0 : 1.0) * grad_mul};
}

// kLerpLow: torch's lerp is start + w * (end - start) for w < 0.5, end - (end - start) * (1 - w) otherwise.
template <typename T, bool kAmsgrad, bool kLerpLow>
SAM_HD void adam_update(T& x, T& m, T& v, T& vmax, T g, const AdamArgs& a) {
  using std::sqrt;
  T d = T(a.sign) * g + T(a.l2) * x;
  x *= T(a.decay);
  const T w = T(a.beta1_weight);
  m = kLerpLow ? m + w * (d - m) : d - (d - m) * (T(1) - w);
  v = T(a.beta2) * v + T(a.one_minus_beta2) * d * d;
  T vden = v;
  if constexpr (kAmsgrad) {
    vmax = vmax > v ? vmax : v;
    vden = vmax;
  }
  x -= T(a.step_size) * m / (sqrt(vden) / T(a.bc2_sqrt) + T(a.eps));
}

template <typename F>
void dispatch_adam_flags(bool amsgrad, bool lerp_low, F&& f) {
  if (amsgrad) {
    return lerp_low ? f.template operator()<true, true>() : f.template operator()<true, false>();
  }
  return lerp_low ? f.template operator()<false, true>() : f.template operator()<false, false>();
}

}  // namespace sam_kernels
