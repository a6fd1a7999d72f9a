// The per-element Adam / AdamW update, shared by the CPU and CUDA kernels.
// Mirrors torch.optim.Adam's single-tensor path (lerp for the first moment,
// denom = sqrt(v) / sqrt(bc2) + eps, step size lr / bc1).
#pragma once
#include <cmath>

#include "sgd_math.h"  // SAM_HD

namespace sam_kernels {

struct AdamArgs {
  double lr;
  double beta1_weight;  // 1 - beta1, the lerp weight
  double beta2;
  double one_minus_beta2;
  double eps;
  double weight_decay;
  double decay_factor;  // 1 - lr * wd for AdamW
  double step_size;     // lr / bias_correction1
  double bc2_sqrt;      // sqrt(bias_correction2)
  bool decoupled;
  bool maximize;
};

inline AdamArgs make_adam_args(
    double lr, double beta1, double beta2, double eps, double wd, bool decoupled, bool maximize,
    double bc1, double bc2) {
  return AdamArgs{lr,  1.0 - beta1, beta2, 1.0 - beta2, eps, wd, 1.0 - lr * wd, lr / bc1,
                  std::sqrt(bc2), decoupled, maximize};
}

template <typename T>
SAM_HD void adam_update(T& x, T& m, T& v, T& vmax, T g, const AdamArgs& a, bool amsgrad) {
  T d = a.maximize ? -g : g;
  if (a.weight_decay != 0.0) {
    if (a.decoupled) {
      x *= T(a.decay_factor);
    } else {
      d += T(a.weight_decay) * x;
    }
  }
  // torch's lerp: start + w * (end - start) for w < 0.5, end - (end - start) * (1 - w) otherwise
  const T w = T(a.beta1_weight);
  m = w < T(0.5) ? m + w * (d - m) : d - (d - m) * (T(1) - w);
  v = T(a.beta2) * v + T(a.one_minus_beta2) * d * d;
  T vden = v;
  if (amsgrad) {
    vmax = vmax > v ? vmax : v;
    vden = vmax;
  }
  using std::sqrt;
  const T denom = sqrt(vden) / T(a.bc2_sqrt) + T(a.eps);
  x -= T(a.step_size) * m / denom;
}

}  // namespace sam_kernels
