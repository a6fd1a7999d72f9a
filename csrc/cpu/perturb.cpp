// perturb_: x_old <- x; x <- x + s * w^2 * g with s = rho / (norm + eps), w = |x| + offset (ASAM)
// or 1 (SAM). A non-finite norm leaves x untouched, so a bad gradient never reaches the weights.
// shift_: x <- x + s * d (or x - s * d), s = rho / (norm + eps): MSAM's move along its momentum
// and back, with no copy (untouched for a non-finite norm).
// lincomb_: out <- a x + b y with a, b read from device scalars (out may be x or y).
// restore_: x <- x_old, a bit-exact copy (with found_inf: only when it is 0).
// Bytes per element: perturb reads x, g and writes x_old, x (16 B in fp32); shift 12 B; lincomb 12 B;
// restore 8 B.
// The arguments, by name: their declarations (sam_kernels/ops/primitives.py).
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
    double scale,
    double offset,
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

double perturb_scale(const Launch& l, double rho, bool& finite) {
  return norm_scale(l, decl::perturb_::norm, rho, finite);
}

void shift_runner(const Launch& l) {
  using P = decl::shift_;
  bool finite = false;
  const double scale = norm_scale(l, P::norm, l.s(P::rho), finite);
  if (!finite) return;
  const double signed_scale = l.flag(P::subtract) ? -scale : scale;  // negation is exact
  for_each_chunk(l.table, [&](const ChunkRef& c) {
    SAM_DISPATCH_FLOATING(l.dtype, "shift_", [&] {
      shift_chunk<scalar_t>(l.table.ptr<scalar_t>(P::params, c.tensor) + c.begin,
                            l.table.ptr<const scalar_t>(P::directions, c.tensor) + c.begin, signed_scale,
                            c.end - c.begin);
    });
  });
}

void perturb_runner(const Launch& l) {
  using P = decl::perturb_;
  bool finite = false;
  const double scale = perturb_scale(l, l.s(P::rho), finite);
  const double offset = l.ref(P::norm).f64 ? l.s(P::offset) : static_cast<float>(l.s(P::offset));
  const bool adaptive = l.flag(P::adaptive);
  for_each_chunk(l.table, [&](const ChunkRef& c) {
    SAM_DISPATCH_FLOATING(l.dtype, "perturb_", [&] {
      scalar_t* x = l.table.ptr<scalar_t>(P::params, c.tensor) + c.begin;
      scalar_t* old = l.table.ptr<scalar_t>(P::x_old, c.tensor) + c.begin;
      const int64_t n = c.end - c.begin;
      if (!finite) {
        std::memcpy(old, x, n * sizeof(scalar_t));
        return;
      }
      const scalar_t* g = l.table.ptr<const scalar_t>(P::grads, c.tensor) + c.begin;
      if (adaptive) {
        perturb_chunk<scalar_t, true>(x, g, old, scale, offset, n);
      } else {
        perturb_chunk<scalar_t, false>(x, g, old, scale, 0.0, n);
      }
    });
  });
}

template <typename scalar_t>
void lincomb_chunk(scalar_t* out, const scalar_t* x, const scalar_t* y, double a, double b, int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t fa = static_cast<opmath_t>(a), fb = static_cast<opmath_t>(b);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {  // (out may alias x or y: each element is read before it is written)
    out[i] = static_cast<scalar_t>(fa * static_cast<opmath_t>(x[i]) + fb * static_cast<opmath_t>(y[i]));
  }
}

void lincomb_runner(const Launch& l) {
  using P = decl::lincomb_;
  const double a = read_value(l, P::a, 0.0), b = read_value(l, P::b, 0.0);
  for_each_chunk(l.table, [&](const ChunkRef& c) {
    SAM_DISPATCH_FLOATING(l.dtype, "lincomb_", [&] {
      lincomb_chunk<scalar_t>(l.table.ptr<scalar_t>(P::out, c.tensor) + c.begin,
                              l.table.ptr<const scalar_t>(P::x, c.tensor) + c.begin,
                              l.table.ptr<const scalar_t>(P::y, c.tensor) + c.begin, a, b, c.end - c.begin);
    });
  });
}

void restore_runner(const Launch& l) {
  using P = decl::restore_;
  if (read_scalar(l, P::found_inf, 0.f) != 0.f) return;
  const int64_t bytes = c10::elementSize(l.dtype);
  for_each_chunk(l.table, [&](const ChunkRef& c) {
    std::memcpy(l.table.ptr<char>(P::params, c.tensor) + c.begin * bytes,
                l.table.ptr<const char>(P::x_old, c.tensor) + c.begin * bytes, (c.end - c.begin) * bytes);
  });
}

SAM_RUNNER("perturb_", c10::DeviceType::CPU, perturb_runner);
SAM_RUNNER("shift_", c10::DeviceType::CPU, shift_runner);
SAM_RUNNER("lincomb_", c10::DeviceType::CPU, lincomb_runner);
SAM_RUNNER("restore_", c10::DeviceType::CPU, restore_runner);

}  // namespace
}  // namespace sam_kernels::cpu
