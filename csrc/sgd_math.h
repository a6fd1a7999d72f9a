// The per-element SGD update, shared by the CPU and CUDA kernels (host and device code).
// Structural options are template flags and the others enter as coefficients, so the
// element loop has no branches and vectorizes on the CPU.
#pragma once
#include "table.h"  // SAM_HD

namespace sam_kernels {

struct SgdArgs {
  double lr;
  double momentum;
  double one_minus_dampening;
  double weight_decay;  // 0 when unused: d + 0 * x == d for finite x
  double sign;          // -1 for maximize, times the gradient scale (GradScaler's 1 / scale: a power of 2, exact)
};

SAM_HD SgdArgs make_sgd_args(
    double lr, double momentum, double dampening, double wd, bool maximize, double grad_scale = 1.0) {
  return SgdArgs{lr, momentum, 1.0 - dampening, wd, (maximize ? -1.0 : 1.0) * grad_scale};
}

// x holds the restored weight on entry and the updated one on exit; buf likewise.
//   d = sign * g + wd * x        (sign = +-grad_scale: unscaling costs nothing)
//   buf = kInit ? d : momentum * buf + (1 - dampening) * d   (torch.optim.SGD's first step: buf = d)
//   x -= lr * (kNesterov ? d + momentum * buf : buf)          (lr * d without momentum)
template <typename T, bool kMomentum, bool kNesterov, bool kInit>
SAM_HD void sgd_update(T& x, T& buf, T g, const SgdArgs& a) {
  T d = T(a.sign) * g + T(a.weight_decay) * x;
  if constexpr (kMomentum) {
    buf = kInit ? d : T(a.momentum) * buf + T(a.one_minus_dampening) * d;
    d = kNesterov ? d + T(a.momentum) * buf : buf;
  }
  x -= T(a.lr) * d;
}

// SAMPa's update direction d = (1 - lam) * g + lam * g2 (weights w1 = 1 - lam, w2 = lam).
// lam = 0 gives g and lam = 1 gives g2 exactly, for finite gradients.
template <typename T>
SAM_HD T mix_grads(T g, T g2, double w1, double w2) {
  return T(w1) * g + T(w2) * g2;
}

struct Mix {
  double w1 = 1.0;
  double w2 = 0.0;
};

SAM_HD Mix make_mix(double lam) {
  return Mix{1.0 - lam, lam};
}

// Calls f.template operator()<kMomentum, kNesterov, kInit>() for the runtime flags.
template <typename F>
void dispatch_sgd_flags(bool momentum, bool nesterov, bool init, F&& f) {
  if (!momentum) return f.template operator()<false, false, false>();
  if (nesterov) {
    return init ? f.template operator()<true, true, true>() : f.template operator()<true, true, false>();
  }
  return init ? f.template operator()<true, false, true>() : f.template operator()<true, false, false>();
}

}  // namespace sam_kernels
