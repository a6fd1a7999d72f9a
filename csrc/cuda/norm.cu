// Norms on the GPU (the arguments, by name: their declarations, sam_kernels/ops/primitives.py), deterministic:
//   sumsq           every block writes the sum of squares of its chunk to a partials buffer
//                   (of g, of (|w| + offset) g, or of the mix (1 - lam) g + lam g2; or the dot
//                   product of g and w): fp32, or fp64
//                   for the norms of fp64 tensors (their precision, as clip_grad_norm_ takes it)
//   norm_finalize   one block adds the partials in a fixed order and writes sqrt(total)
//   guard_finalize  the same, then the guard of a step (guard_math.h) into the flags, and the
//                   Adam step counters advanced when the step is taken: the decision never
//                   leaves the device
#include "../guard_math.h"
#include "multi_tensor_apply.cuh"

namespace sam_kernels::cuda {
namespace {

template <int kBlock, typename T>
__device__ T block_sum(T v) {
  __shared__ T warp_sums[kBlock / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kBlock / 32 ? warp_sums[threadIdx.x] : T(0);
  if (warp == 0) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
  }
  return v;  // valid in thread 0
}

// kMode: 0 plain, 1 weighted by |w| + offset (ASAM), 2 the mix (1 - lam) g + lam g2 (SAMPa),
// 3 the dot product of g and w (GSAM, LookSAM).
template <typename scalar_t, int kMode, typename partial_t>
__global__ void __launch_bounds__(kThreads)
    sumsq_kernel(TableView table, double scalar, partial_t* __restrict__ partials) {
  using opmath_t = at::opmath_type<scalar_t>;
  const ChunkRef c = table.chunk_ref(blockIdx.x);
  const scalar_t* t = table.ptr<const scalar_t>(decl::sumsq::tensors, c.tensor);
  const scalar_t* w = kMode ? table.ptr<const scalar_t>(decl::sumsq::second, c.tensor) : nullptr;
  const opmath_t a = kMode == 2 ? static_cast<opmath_t>(1.0 - scalar) : opmath_t(1);
  const opmath_t b = static_cast<opmath_t>(scalar);
  opmath_t acc = 0;
  for (int64_t base = c.begin + threadIdx.x; base < c.end; base += int64_t(kThreads) * kILP) {
    opmath_t v[kILP];
    opmath_t u[kILP];  // the other factor: v itself, or w (the dot product)
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = base + int64_t(k) * kThreads;
      v[k] = i < c.end ? static_cast<opmath_t>(t[i]) : opmath_t(0);
      u[k] = v[k];
      if (i < c.end) {
        if constexpr (kMode == 1) v[k] *= abs(static_cast<opmath_t>(w[i])) + b;
        if constexpr (kMode == 2) v[k] = a * v[k] + b * static_cast<opmath_t>(w[i]);
        u[k] = kMode == 3 ? static_cast<opmath_t>(w[i]) : v[k];
      }
    }
#pragma unroll
    for (int k = 0; k < kILP; ++k) acc += v[k] * u[k];
  }
  const partial_t total = block_sum<kThreads>(static_cast<partial_t>(acc));
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

constexpr int kCleanupThreads = 1024;

template <typename T>
__device__ T sum_partials(const T* partials, int64_t n) {
  T acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += kCleanupThreads) acc += partials[i];
  return block_sum<kCleanupThreads>(acc);
}

// out has the partials' dtype (an fp64 norm for fp64 tensors)
template <typename T>
__global__ void __launch_bounds__(kCleanupThreads)
    norm_finalize_kernel(const T* __restrict__ partials, int64_t n, T* __restrict__ out) {
  const T total = sum_partials(partials, n);
  if (threadIdx.x == 0) *out = sqrt(total);
}

template <typename T>
__global__ void __launch_bounds__(kCleanupThreads) guard_finalize_kernel(
    const T* __restrict__ partials, int64_t n, float* __restrict__ flags, ScalarRef first_norm,
    int64_t n_first_norm, const float* __restrict__ scale, const float* __restrict__ found_inf, float max_norm,
    float* __restrict__ steps, const float* __restrict__ mask, int64_t n_steps) {
  __shared__ float taken;
  const T total = sum_partials(partials, n);
  if (threadIdx.x == 0) {
    bool bad = load_or(found_inf, 0.f) != 0.f;
    for (int64_t i = 0; i < n_first_norm; ++i) bad = bad || !is_finite(first_norm.get(i));
    const Guard g = guard_math(static_cast<float>(sqrt(total)), bad, scale ? 1.f / *scale : 1.f, max_norm);
    flags[kFoundInf] = g.found_inf;
    flags[kGradScale] = g.grad_scale;
    flags[kGradNorm] = g.grad_norm;
    flags[kSkipped] += g.found_inf;
    taken = 1.f - g.found_inf;
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < n_steps; i += kCleanupThreads) steps[i] += taken * (mask ? mask[i] : 1.f);
}

// lists g [, w | g2]; scalars [offset | lam]; options [mode, first partial]; args [partials]
template <typename partial_t>
void launch_sumsq(const Launch& l, double scalar, partial_t* partials) {
  SAM_CUDA_DISPATCH(l.dtype, "sumsq", [&] {
    switch (l.options.at(0)) {
      case 0: launch_chunks(l, sumsq_kernel<scalar_t, 0, partial_t>, scalar, partials); break;
      case 1: launch_chunks(l, sumsq_kernel<scalar_t, 1, partial_t>, scalar, partials); break;
      case 2: launch_chunks(l, sumsq_kernel<scalar_t, 2, partial_t>, scalar, partials); break;
      default: launch_chunks(l, sumsq_kernel<scalar_t, 3, partial_t>, scalar, partials); break;
    }
  });
}

// partials fp32 | fp64 (the norms of fp64 tensors)
void sumsq_runner(const Launch& l) {
  using P = decl::sumsq;
  const int64_t at = l.options.at(P::first);
  if (l.ref(P::partials).f64) {
    launch_sumsq(l, l.s(P::scalar), l.tensor(P::partials).data_ptr<double>() + at);
  } else {
    launch_sumsq(l, static_cast<float>(l.s(P::scalar)), l.f32(P::partials) + at);
  }
}

// partials and out both fp32, or both fp64
void norm_finalize_runner(const Launch& l) {
  using P = decl::norm_finalize;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = l.tensor(P::partials).numel();
  if (l.ref(P::partials).f64) {
    norm_finalize_kernel<double><<<1, kCleanupThreads, 0, stream>>>(
        l.tensor(P::partials).data_ptr<double>(), n, l.tensor(P::out).data_ptr<double>());
  } else {
    norm_finalize_kernel<float><<<1, kCleanupThreads, 0, stream>>>(l.f32(P::partials), n, l.f32(P::out));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void guard_finalize_runner(const Launch& l) {
  using P = decl::guard_finalize;
  const ScalarRef first_norm = l.ref(P::first_norm);
  const int64_t n_first_norm = first_norm.present() ? l.tensor(P::first_norm).numel() : 0;
  const int64_t n_steps = l.f32(P::steps) ? l.tensor(P::steps).numel() : 0;
  const int64_t n = l.tensor(P::partials).numel();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto max_norm = static_cast<float>(l.s(P::max_norm));
  if (l.ref(P::partials).f64) {
    guard_finalize_kernel<double><<<1, kCleanupThreads, 0, stream>>>(
        l.tensor(P::partials).data_ptr<double>(), n, l.f32(P::flags), first_norm, n_first_norm, l.f32(P::scale),
        l.f32(P::found_inf), max_norm, l.f32(P::steps), l.f32(P::steps_mask), n_steps);
  } else {
    guard_finalize_kernel<float><<<1, kCleanupThreads, 0, stream>>>(
        l.f32(P::partials), n, l.f32(P::flags), first_norm, n_first_norm, l.f32(P::scale), l.f32(P::found_inf), max_norm,
        l.f32(P::steps), l.f32(P::steps_mask), n_steps);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

SAM_RUNNER("sumsq", c10::DeviceType::CUDA, sumsq_runner);
SAM_RUNNER("norm_finalize", c10::DeviceType::CUDA, norm_finalize_runner);
SAM_RUNNER("guard_finalize", c10::DeviceType::CUDA, guard_finalize_runner);

}  // namespace
}  // namespace sam_kernels::cuda
