// perturb_ (olds <- x; x <- x + s * w^2 * g, s read from the device-resident norm, so the host
// never waits) and restore_ (x <- olds), as multi-tensor launches: one per dtype group.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "multi_tensor_apply.cuh"

namespace sam_kernels::cuda {
namespace {

template <typename scalar_t, bool kAdaptive>
__global__ void __launch_bounds__(kThreads) perturb_kernel(
    const int64_t* __restrict__ meta,
    int64_t n_tensors,
    const float* __restrict__ norm,
    float rho,
    float offset) {
  using opmath_t = at::opmath_type<scalar_t>;
  const ChunkRef c = chunk_of(meta, 3, n_tensors);
  scalar_t* x = list_ptr<scalar_t>(meta, 0, n_tensors, c.tensor);
  const scalar_t* g = list_ptr<const scalar_t>(meta, 1, n_tensors, c.tensor);
  scalar_t* old = list_ptr<scalar_t>(meta, 2, n_tensors, c.tensor);
  const float nv = *norm;
  const bool finite = isfinite(nv);  // a non-finite gradient leaves x as it is
  const opmath_t s = finite ? static_cast<opmath_t>(rho / (nv + static_cast<float>(kNormEps))) : opmath_t(0);
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
__global__ void __launch_bounds__(kThreads) restore_kernel(const int64_t* __restrict__ meta, int64_t n_tensors) {
  const ChunkRef c = chunk_of(meta, 2, n_tensors);
  scalar_t* x = list_ptr<scalar_t>(meta, 0, n_tensors, c.tensor);
  const scalar_t* old = list_ptr<const scalar_t>(meta, 1, n_tensors, c.tensor);
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
  const auto device = check_perturb_args(at::kCUDA, params, grads, olds);
  TORCH_CHECK(
      norm.device() == device && norm.scalar_type() == at::kFloat && norm.numel() == 1,
      "perturb_: norm must be one float32 value on ", device);
  const c10::cuda::CUDAGuard guard(device);
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (const auto& [dtype, index] : dtype_groups(params)) {
    const Table table = make_table({params, grads, olds}, index);
    SAM_CUDA_DISPATCH(dtype, "perturb_", [&] {
      if (adaptive) {
        perturb_kernel<scalar_t, true><<<table.n_chunks, kThreads, 0, stream>>>(
            table.data(), table.n_tensors, norm.data_ptr<float>(), static_cast<float>(rho),
            static_cast<float>(offset));
      } else {
        perturb_kernel<scalar_t, false><<<table.n_chunks, kThreads, 0, stream>>>(
            table.data(), table.n_tensors, norm.data_ptr<float>(), static_cast<float>(rho), 0.f);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

void restore_(at::TensorList params, at::TensorList olds) {
  if (params.empty()) return;
  const auto device = check_restore_args(at::kCUDA, params, olds);
  const c10::cuda::CUDAGuard guard(device);
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (const auto& [dtype, index] : dtype_groups(params)) {
    const Table table = make_table({params, olds}, index);
    SAM_CUDA_DISPATCH(dtype, "restore_", [&] {
      restore_kernel<scalar_t><<<table.n_chunks, kThreads, 0, stream>>>(table.data(), table.n_tensors);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

}  // namespace sam_kernels::cuda

TORCH_LIBRARY_IMPL(sam_kernels, CUDA, m) {
  m.impl("perturb_", &sam_kernels::cuda::perturb_);
  m.impl("restore_", &sam_kernels::cuda::restore_);
}
