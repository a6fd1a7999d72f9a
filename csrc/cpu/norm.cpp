// Norms on the CPU (the arguments: their declarations, sam_kernels/ops/primitives.py):
//   sumsq           each chunk's sum of squares (of g, of (|w| + offset) g, or of (1 - lam) g + lam g2;
//                   or the dot product of g and w),
//                   accumulated in double over opmath blocks, written as one partial per chunk (fp32,
//                   or fp64 when the partials are: the norms of fp64 tensors keep their precision)
//   norm_finalize   out = sqrt(sum of the partials), added in chunk order (deterministic whatever
//                   the number of threads)
//   guard_finalize  the same norm, then the guard of a step (guard_math.h) into the flags
#include <cmath>

#include "../guard_math.h"
#include "multi_tensor.h"

namespace sam_kernels::cpu {
namespace {

// kMode: 0 plain, 1 weighted by |w| + offset (ASAM), 2 the mix (1 - lam) g + lam g2 (SAMPa),
// 3 the dot product of g and w (GSAM, LookSAM): sum g w instead of a sum of squares.
template <typename scalar_t, int kMode>
double chunk_sumsq(const scalar_t* t, const scalar_t* w, double scalar, int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int64_t kInner = 512;  // float partial sums stay exact enough over 512 terms
  const opmath_t a = kMode == 2 ? static_cast<opmath_t>(1.0 - scalar) : opmath_t(1);
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
      if constexpr (kMode == 3) {
        acc += v * static_cast<opmath_t>(w[i]);
      } else {
        acc += v * v;
      }
    }
    total += static_cast<double>(acc);
  }
  return total;
}

void sumsq_runner(const Launch& l) {
  using P = decl::sumsq;
  const ScalarRef out = l.ref(P::partials);
  float* partials = out.f64 ? nullptr : l.f32(P::partials) + l.options.at(P::first);
  double* partials64 = out.f64 ? l.tensor(P::partials).data_ptr<double>() + l.options.at(P::first) : nullptr;
  const int64_t mode = l.options.at(P::mode);
  // offset | lam: fp32 values, as on the GPU, but for fp64 partials
  const double scalar = out.f64 ? l.s(P::scalar) : static_cast<float>(l.s(P::scalar));
  for_each_chunk(l.table, [&](const ChunkRef& c) {
    SAM_DISPATCH_FLOATING(l.dtype, "sumsq", [&] {
      const scalar_t* t = l.table.ptr<const scalar_t>(P::tensors, c.tensor) + c.begin;
      const scalar_t* w = mode ? l.table.ptr<const scalar_t>(P::second, c.tensor) + c.begin : nullptr;
      const int64_t n = c.end - c.begin;
      double v = mode == 0   ? chunk_sumsq<scalar_t, 0>(t, w, scalar, n)
                 : mode == 1 ? chunk_sumsq<scalar_t, 1>(t, w, scalar, n)
                 : mode == 2 ? chunk_sumsq<scalar_t, 2>(t, w, scalar, n)
                             : chunk_sumsq<scalar_t, 3>(t, w, scalar, n);
      if (partials64 != nullptr) {
        partials64[c.index] = v;
      } else {
        partials[c.index] = static_cast<float>(v);
      }
    });
  });
}

double sum_partials(const Launch& l, size_t i) {
  const ScalarRef p = l.ref(i);
  double total = 0.0;
  for (int64_t k = 0; k < l.tensor(i).numel(); ++k) total += p.get(k);
  return total;
}

// out is fp32, or fp64 for fp64 partials
void norm_finalize_runner(const Launch& l) {
  using P = decl::norm_finalize;
  const double norm = std::sqrt(sum_partials(l, P::partials));
  if (l.ref(P::out).f64) {
    *l.tensor(P::out).data_ptr<double>() = norm;
  } else {
    *l.f32(P::out) = static_cast<float>(norm);
  }
}

void guard_finalize_runner(const Launch& l) {
  using P = decl::guard_finalize;
  const float n = static_cast<float>(std::sqrt(sum_partials(l, P::partials)));
  float* flags = l.f32(P::flags);
  bool bad = read_scalar(l, P::found_inf, 0.f) != 0.f;
  if (const ScalarRef first_norm = l.ref(P::first_norm); first_norm.present()) {
    for (int64_t i = 0; i < l.tensor(P::first_norm).numel(); ++i) bad = bad || !std::isfinite(first_norm.get(i));
  }
  const float* scale = l.f32(P::scale);
  const Guard g = guard_math(n, bad, scale ? 1.f / *scale : 1.f, static_cast<float>(l.s(P::max_norm)));
  flags[kFoundInf] = g.found_inf;
  flags[kGradScale] = g.grad_scale;
  flags[kGradNorm] = g.grad_norm;
  flags[kSkipped] += g.found_inf;
  if (float* steps = l.f32(P::steps)) {
    const float* mask = l.f32(P::steps_mask);
    for (int64_t i = 0; i < l.tensor(P::steps).numel(); ++i) steps[i] += (1.f - g.found_inf) * (mask ? mask[i] : 1.f);
  }
}

SAM_RUNNER("sumsq", c10::DeviceType::CPU, sumsq_runner);
SAM_RUNNER("norm_finalize", c10::DeviceType::CPU, norm_finalize_runner);
SAM_RUNNER("guard_finalize", c10::DeviceType::CPU, guard_finalize_runner);

}  // namespace
}  // namespace sam_kernels::cpu
