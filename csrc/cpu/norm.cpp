// Norms on the CPU (argument order: ops.cpp):
//   sumsq           each chunk's sum of squares (of g, of (|w| + offset) g, or of (1 - lam) g + lam g2),
//                   accumulated in double over float blocks, written as one fp32 partial per chunk
//   norm_finalize   out = sqrt(sum of the partials), added in chunk order (deterministic whatever
//                   the number of threads)
//   guard_finalize  the same norm, then the guard of a step (guard_math.h) into the flags
#include <cmath>

#include "../guard_math.h"
#include "multi_tensor.h"

namespace sam_kernels::cpu {
namespace {

// kMode: 0 plain, 1 weighted by |w| + offset (ASAM), 2 the mix (1 - lam) g + lam g2 (SAMPa).
template <typename scalar_t, int kMode>
double chunk_sumsq(const scalar_t* t, const scalar_t* w, float scalar, int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int64_t kInner = 512;  // float partial sums stay exact enough over 512 terms
  const opmath_t a = kMode == 2 ? static_cast<opmath_t>(1.0 - static_cast<double>(scalar)) : opmath_t(1);
  const opmath_t b = static_cast<opmath_t>(scalar);
  double total = 0.0;
  for (int64_t lo = 0; lo < n; lo += kInner) {
    const int64_t hi = std::min(n, lo + kInner);
    opmath_t acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = lo; i < hi; ++i) {
      opmath_t v = static_cast<opmath_t>(t[i]);
      if constexpr (kMode == 1) v *= std::abs(static_cast<opmath_t>(w[i])) + b;
      if constexpr (kMode == 2) v = a * v + b * static_cast<opmath_t>(w[i]);
      acc += v * v;
    }
    total += static_cast<double>(acc);
  }
  return total;
}

// lists g [, w | g2]; scalars [offset | lam]; options [mode, first partial]; args [partials]
void sumsq_runner(const Launch& l) {
  float* partials = l.f32(0) + l.options.at(1);
  const int64_t mode = l.options.at(0);
  const float scalar = static_cast<float>(l.s(0));
  for_each_chunk(l.table, [&](const ChunkRef& c) {
    SAM_DISPATCH_FLOATING(l.dtype, "sumsq", [&] {
      const scalar_t* t = l.table.ptr<const scalar_t>(0, c.tensor) + c.begin;
      const scalar_t* w = mode ? l.table.ptr<const scalar_t>(1, c.tensor) + c.begin : nullptr;
      const int64_t n = c.end - c.begin;
      double v = mode == 0 ? chunk_sumsq<scalar_t, 0>(t, w, scalar, n)
                           : mode == 1 ? chunk_sumsq<scalar_t, 1>(t, w, scalar, n) : chunk_sumsq<scalar_t, 2>(t, w, scalar, n);
      partials[c.index] = static_cast<float>(v);
    });
  });
}

double sum_partials(const at::Tensor& partials) {
  const float* p = partials.const_data_ptr<float>();
  double total = 0.0;
  for (int64_t i = 0; i < partials.numel(); ++i) total += p[i];
  return total;
}

// args [partials, out]
void norm_finalize_runner(const Launch& l) {
  *l.f32(1) = static_cast<float>(std::sqrt(sum_partials(l.tensor(0))));
}

// scalars [max_norm]; args [partials, flags, prior, scale, found_inf, steps, steps_mask]
void guard_finalize_runner(const Launch& l) {
  const float n = static_cast<float>(std::sqrt(sum_partials(l.tensor(0))));
  float* flags = l.f32(1);
  bool bad = read_scalar(l, 4, 0.f) != 0.f;
  if (const float* prior = l.f32(2)) {
    for (int64_t i = 0; i < l.tensor(2).numel(); ++i) bad = bad || !std::isfinite(prior[i]);
  }
  const float* scale = l.f32(3);
  const Guard g = guard_math(n, bad, scale ? 1.f / *scale : 1.f, static_cast<float>(l.s(0)));
  flags[kFoundInf] = g.found_inf;
  flags[kGradScale] = g.grad_scale;
  flags[kGradNorm] = g.grad_norm;
  flags[kSkipped] += g.found_inf;
  if (float* steps = l.f32(5)) {
    const float* mask = l.f32(6);
    for (int64_t i = 0; i < l.tensor(5).numel(); ++i) steps[i] += (1.f - g.found_inf) * (mask ? mask[i] : 1.f);
  }
}

SAM_RUNNER("sumsq", c10::DeviceType::CPU, sumsq_runner);
SAM_RUNNER("norm_finalize", c10::DeviceType::CPU, norm_finalize_runner);
SAM_RUNNER("guard_finalize", c10::DeviceType::CPU, guard_finalize_runner);

}  // namespace
}  // namespace sam_kernels::cpu
