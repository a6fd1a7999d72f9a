// The per-element Adam / AdamW update, shared by the CPU and CUDA kernels.
// Mirrors torch.optim.Adam's single-tensor path (lerp for the first moment,
// denom = sqrt(v) / sqrt(bc2) + eps, step size lr / bc1). Branch-free like sgd_math.h.
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
  double sign;       // -1 for maximize, times the gradient scale (GradScaler's 1 / scale)
};

inline AdamArgs make_adam_args(
    double lr, double beta1, double beta2, double eps, double wd, bool decoupled, bool maximize,
    double bc1, double bc2, double grad_scale = 1.0) {
  return AdamArgs{1.0 - beta1, beta2, 1.0 - beta2, eps, decoupled ? 0.0 : wd, decoupled ? 1.0 - lr * wd : 1.0,
                  lr / bc1, std::sqrt(bc2), (maximize ? -1.0 : 1.0) * grad_scale};
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
