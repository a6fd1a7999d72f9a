// The guard of a step (check_grads_), shared by the CPU and CUDA kernels: from the norm of the
// gradient that drives the update, decide on the device whether the step is taken, and the
// factor the fused update multiplies that gradient by (GradScaler's unscale times the clipping
// coefficient of torch.nn.utils.clip_grad_norm_).
#pragma once
#include <cmath>

#include "table.h"  // SAM_HD

namespace sam_kernels {

// The device flags of an optimizer (a float32 vector; the kernels read them, the host never does).
enum Flag : int { kFoundInf = 0, kGradScale = 1, kGradNorm = 2, kSkipped = 3, kNumFlags = 4 };

constexpr double kClipEps = 1e-6;  // torch.nn.utils.clip_grad_norm_'s guard

// Finite (not NaN, not +-inf), written so that host and device code share it (no -ffast-math here).
SAM_HD bool is_finite(float v) { return (v - v) == 0.f; }
SAM_HD bool is_finite(double v) { return (v - v) == 0.0; }

struct Guard {
  float found_inf;   // 1 when the step must be skipped, else 0
  float grad_scale;  // what the update multiplies the gradient by
  float grad_norm;   // the norm of the unscaled gradient
};

// n: the norm of the gradient as it is in memory (scaled by the GradScaler's scale, if any).
// bad: a non-finite value upstream (the first pass) or the GradScaler's own check found one.
// inv_scale: 1 / scale (1 without a GradScaler). max_norm: inf when not clipping.
SAM_HD Guard guard_math(float n, bool bad, float inv_scale, float max_norm) {
  const float norm = n * inv_scale;
  const bool found = bad || !is_finite(n);
  const float clip = max_norm / (norm + static_cast<float>(kClipEps));  // inf / x = inf: no clipping
  return Guard{found ? 1.f : 0.f, inv_scale * (clip < 1.f ? clip : 1.f), norm};
}

}  // namespace sam_kernels
