// perturb_: olds <- x; x <- x + s * w^2 * g with s = rho / (norm + eps), w = |x| + offset (ASAM)
// or 1 (SAM). A non-finite norm leaves x untouched, so a bad gradient never reaches the weights.
// restore_: x <- olds, a bit-exact copy.
// Bytes per element: perturb reads x, g and writes olds, x (16 B in fp32); restore 8 B.
#include <cmath>
#include <cstring>

#include "multi_tensor.h"

namespace sam_kernels::cpu {
namespace {

template <typename scalar_t, bool kAdaptive>
void perturb_chunk(
    scalar_t* __restrict__ x,
    const scalar_t* __restrict__ g,
    scalar_t* __restrict__ old,
    float scale,
    float offset,
    int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t s = static_cast<opmath_t>(scale);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t xv = x[i];
    old[i] = xv;
    const opmath_t xf = static_cast<opmath_t>(xv);
    opmath_t step = s * static_cast<opmath_t>(g[i]);
    if constexpr (kAdaptive) {
      const opmath_t w = std::abs(xf) + static_cast<opmath_t>(offset);
      step *= w * w;
    }
    x[i] = static_cast<scalar_t>(xf + step);
  }
}

}  // namespace

void perturb_(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList olds,
    const at::Tensor& norm,
    double rho,
    bool adaptive,
    double offset) {
  if (params.empty()) return;
  check_perturb_args(at::kCPU, params, grads, olds);
  TORCH_CHECK(norm.numel() == 1, "perturb_: norm must hold one value, got ", norm.numel());
  const float nv = norm.item<float>();  // a CPU scalar: no device synchronization here
  const bool finite = std::isfinite(nv);
  // fp32 like the GPU kernels: the norm is an fp32 value, and so is the scale
  const float scale = finite ? static_cast<float>(rho) / (nv + static_cast<float>(kNormEps)) : 0.f;

  parallel_chunks(make_chunks(params), [&](const Chunk& c) {
    const auto& p = params[c.tensor];
    SAM_DISPATCH_FLOATING(p.scalar_type(), "perturb_", [&] {
      scalar_t* x = p.data_ptr<scalar_t>() + c.begin;
      scalar_t* old = olds[c.tensor].data_ptr<scalar_t>() + c.begin;
      const int64_t n = c.end - c.begin;
      if (!finite) {
        std::memcpy(old, x, n * sizeof(scalar_t));
        return;
      }
      const scalar_t* g = grads[c.tensor].const_data_ptr<scalar_t>() + c.begin;
      if (adaptive) {
        perturb_chunk<scalar_t, true>(x, g, old, scale, static_cast<float>(offset), n);
      } else {
        perturb_chunk<scalar_t, false>(x, g, old, scale, 0.f, n);
      }
    });
  });
}

void restore_(at::TensorList params, at::TensorList olds) {
  if (params.empty()) return;
  check_restore_args(at::kCPU, params, olds);
  parallel_chunks(make_chunks(params), [&](const Chunk& c) {
    const auto& p = params[c.tensor];
    const int64_t bytes = p.element_size();
    std::memcpy(
        static_cast<char*>(p.data_ptr()) + c.begin * bytes,
        static_cast<const char*>(olds[c.tensor].const_data_ptr()) + c.begin * bytes,
        (c.end - c.begin) * bytes);
  });
}

}  // namespace sam_kernels::cpu

TORCH_LIBRARY_IMPL(sam_kernels, CPU, m) {
  m.impl("perturb_", &sam_kernels::cpu::perturb_);
  m.impl("restore_", &sam_kernels::cpu::restore_);
}
