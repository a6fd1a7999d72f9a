// perturb_ (x_old <- x; x <- x + s * w^2 * g, s read from the device-resident norm, so the host
// never waits), shift_ (x <- x + s * d or x - s * d: MSAM's move and back, no copy), lincomb_ (out <- a x + b y,
// a and b device scalars) and restore_ (x <- x_old; with found_inf, only when it is 0). The arguments, by name:
// their declarations (sam_kernels/ops/primitives.py).
#include "multi_tensor_apply.cuh"

namespace sam_kernels::cuda {
namespace {

template <typename scalar_t, bool kAdaptive>
__global__ void __launch_bounds__(kThreads)
    perturb_kernel(TableView table, ScalarRef norm, double rho, double offset, const float* rho_t) {
  using opmath_t = at::opmath_type<scalar_t>;
  using P = decl::perturb_;
  const ChunkRef c = table.chunk_ref(blockIdx.x);
  scalar_t* x = table.ptr<scalar_t>(P::params, c.tensor);
  const scalar_t* g = table.ptr<const scalar_t>(P::grads, c.tensor);
  scalar_t* old = table.ptr<scalar_t>(P::x_old, c.tensor);
  bool finite;  // a non-finite gradient leaves x as it is
  const opmath_t s = static_cast<opmath_t>(norm_scale(norm, rho, rho_t, finite));
  for (int64_t base = c.begin + threadIdx.x; base < c.end; base += int64_t(kThreads) * kILP) {
    scalar_t xv[kILP];
    scalar_t gv[kILP];
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = base + int64_t(k) * kThreads;
      if (i < c.end) {
        xv[k] = x[i];
        gv[k] = finite ? g[i] : scalar_t(0);
      }
    }
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = base + int64_t(k) * kThreads;
      if (i < c.end) {
        old[i] = xv[k];
        if (finite) {
          const opmath_t xf = static_cast<opmath_t>(xv[k]);
          opmath_t step = s * static_cast<opmath_t>(gv[k]);
          if constexpr (kAdaptive) {
            const opmath_t w = abs(xf) + static_cast<opmath_t>(offset);
            step *= w * w;
          }
          x[i] = static_cast<scalar_t>(xf + step);
        }
      }
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    shift_kernel(TableView table, ScalarRef norm, double rho, const float* rho_t, bool subtract) {
  using opmath_t = at::opmath_type<scalar_t>;
  using P = decl::shift_;
  bool finite;
  const double scale = norm_scale(norm, rho, rho_t, finite);
  if (!finite) return;  // a non-finite norm leaves x as it is
  const opmath_t s = static_cast<opmath_t>(subtract ? -scale : scale);  // negation is exact
  const ChunkRef c = table.chunk_ref(blockIdx.x);
  scalar_t* x = table.ptr<scalar_t>(P::params, c.tensor);
  const scalar_t* d = table.ptr<const scalar_t>(P::directions, c.tensor);
  for (int64_t base = c.begin + threadIdx.x; base < c.end; base += int64_t(kThreads) * kILP) {
    scalar_t xv[kILP];
    scalar_t dv[kILP];
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = base + int64_t(k) * kThreads;
      if (i < c.end) {
        xv[k] = x[i];
        dv[k] = d[i];
      }
    }
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = base + int64_t(k) * kThreads;
      if (i < c.end) x[i] = shifted<scalar_t, opmath_t>(xv[k], dv[k], s);
    }
  }
}

// out <- a x + b y (out may alias x or y: each element is read before it is written)
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) lincomb_kernel(TableView table, ScalarRef a_ref, ScalarRef b_ref) {
  using opmath_t = at::opmath_type<scalar_t>;
  using P = decl::lincomb_;
  const opmath_t a = static_cast<opmath_t>(a_ref.get()), b = static_cast<opmath_t>(b_ref.get());
  const ChunkRef c = table.chunk_ref(blockIdx.x);
  scalar_t* out = table.ptr<scalar_t>(P::out, c.tensor);
  const scalar_t* x = table.ptr<const scalar_t>(P::x, c.tensor);
  const scalar_t* y = table.ptr<const scalar_t>(P::y, c.tensor);
  for (int64_t base = c.begin + threadIdx.x; base < c.end; base += int64_t(kThreads) * kILP) {
    opmath_t v[kILP];
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = base + int64_t(k) * kThreads;
      if (i < c.end) v[k] = a * static_cast<opmath_t>(x[i]) + b * static_cast<opmath_t>(y[i]);
    }
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = base + int64_t(k) * kThreads;
      if (i < c.end) out[i] = static_cast<scalar_t>(v[k]);
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) restore_kernel(TableView table, const float* __restrict__ found_inf) {
  using P = decl::restore_;
  if (load_or(found_inf, 0.f) != 0.f) return;
  const ChunkRef c = table.chunk_ref(blockIdx.x);
  scalar_t* x = table.ptr<scalar_t>(P::params, c.tensor);
  const scalar_t* old = table.ptr<const scalar_t>(P::x_old, c.tensor);
  for (int64_t base = c.begin + threadIdx.x; base < c.end; base += int64_t(kThreads) * kILP) {
    scalar_t v[kILP];
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = base + int64_t(k) * kThreads;
      if (i < c.end) v[k] = old[i];
    }
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = base + int64_t(k) * kThreads;
      if (i < c.end) x[i] = v[k];
    }
  }
}

// rho may be a device scalar (capturable)
void perturb_runner(const Launch& l) {
  using P = decl::perturb_;
  const ScalarRef norm = l.ref(P::norm);
  const double offset = norm.f64 ? l.s(P::offset) : static_cast<float>(l.s(P::offset));
  SAM_CUDA_DISPATCH(l.dtype, "perturb_", [&] {
    if (l.flag(P::adaptive)) {
      launch_chunks(l, perturb_kernel<scalar_t, true>, norm, l.s(P::rho), offset, l.dev_scalar(P::rho));
    } else {
      launch_chunks(l, perturb_kernel<scalar_t, false>, norm, l.s(P::rho), 0.0, l.dev_scalar(P::rho));
    }
  });
}

void shift_runner(const Launch& l) {
  using P = decl::shift_;
  SAM_CUDA_DISPATCH(l.dtype, "shift_", [&] {
    launch_chunks(l, shift_kernel<scalar_t>, l.ref(P::norm), l.s(P::rho), l.dev_scalar(P::rho), l.flag(P::subtract));
  });
}

void lincomb_runner(const Launch& l) {
  using P = decl::lincomb_;
  SAM_CUDA_DISPATCH(l.dtype, "lincomb_", [&] {
    launch_chunks(l, lincomb_kernel<scalar_t>, l.ref(P::a), l.ref(P::b));
  });
}

// A bit copy: any dtype of 8, 4 or 2 bytes is copied as a float type of that size (SAMPa commits
// integer buffers as float64 views).
void restore_runner(const Launch& l) {
  SAM_CUDA_DISPATCH(l.dtype, "restore_", [&] {
    launch_chunks(l, restore_kernel<scalar_t>, l.f32(decl::restore_::found_inf));
  });
}

SAM_RUNNER("perturb_", c10::DeviceType::CUDA, perturb_runner);
SAM_RUNNER("shift_", c10::DeviceType::CUDA, shift_runner);
SAM_RUNNER("lincomb_", c10::DeviceType::CUDA, lincomb_runner);
SAM_RUNNER("restore_", c10::DeviceType::CUDA, restore_runner);

}  // namespace
}  // namespace sam_kernels::cuda
