// Global l2 norm over a list of tensors, deterministic, in two launches (one more per extra
// dtype group): every block writes the fp32 sum of squares of its chunk to a partials buffer;
// one block then adds the partials in a fixed order and writes sqrt(total).
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "multi_tensor_apply.cuh"

namespace sam_kernels::cuda {
namespace {

template <int kBlock>
__device__ float block_sum(float v) {
  __shared__ float warp_sums[kBlock / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kBlock / 32 ? warp_sums[threadIdx.x] : 0.f;
  if (warp == 0) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
  }
  return v;  // valid in thread 0
}

template <typename scalar_t, bool kWeighted>
__global__ void __launch_bounds__(kThreads) sumsq_kernel(
    const int64_t* __restrict__ meta, int64_t n_tensors, float offset, float* __restrict__ partials) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int64_t kLists = kWeighted ? 2 : 1;
  const ChunkRef c = chunk_of(meta, kLists, n_tensors);
  const scalar_t* t = list_ptr<const scalar_t>(meta, 0, n_tensors, c.tensor);
  const scalar_t* w = kWeighted ? list_ptr<const scalar_t>(meta, 1, n_tensors, c.tensor) : nullptr;
  opmath_t acc = 0;
  for (int64_t base = c.begin + threadIdx.x; base < c.end; base += int64_t(kThreads) * kILP) {
    opmath_t v[kILP];
#pragma unroll
    for (int k = 0; k < kILP; ++k) {
      const int64_t i = base + int64_t(k) * kThreads;
      v[k] = i < c.end ? static_cast<opmath_t>(t[i]) : opmath_t(0);
      if constexpr (kWeighted) {
        if (i < c.end) v[k] *= abs(static_cast<opmath_t>(w[i])) + offset;
      }
    }
#pragma unroll
    for (int k = 0; k < kILP; ++k) acc += v[k] * v[k];
  }
  const float total = block_sum<kThreads>(static_cast<float>(acc));
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

constexpr int kCleanupThreads = 1024;

__global__ void __launch_bounds__(kCleanupThreads)
    finalize_kernel(const float* __restrict__ partials, int64_t n, float* __restrict__ out) {
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += kCleanupThreads) acc += partials[i];
  const float total = block_sum<kCleanupThreads>(acc);
  if (threadIdx.x == 0) *out = sqrtf(total);
}

}  // namespace

at::Tensor global_norm(at::TensorList tensors, at::TensorList weights, double offset) {
  TORCH_CHECK(!tensors.empty(), "global_norm: tensors is empty");
  const auto device = list_device("global_norm", tensors, at::kCUDA);
  check_list("global_norm", "tensors", tensors, tensors, device);
  const bool weighted = !weights.empty();
  if (weighted) check_list("global_norm", "weights", weights, tensors, device);
  const c10::cuda::CUDAGuard guard(device);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto options = tensors[0].options().dtype(at::kFloat);

  std::vector<at::TensorList> lists{tensors};
  if (weighted) lists.push_back(weights);
  std::vector<Table> tables;
  int64_t n_partials = 0;
  for (const auto& [dtype, index] : dtype_groups(tensors)) {
    tables.push_back(make_table(lists, index));
    n_partials += tables.back().n_chunks;
  }
  if (n_partials == 0) return at::zeros({}, options);
  auto out = at::empty({}, options);  // written by finalize_kernel: no fill launch
  auto partials = at::empty({n_partials}, options);
  int64_t at_partial = 0;
  size_t g = 0;
  for (const auto& [dtype, index] : dtype_groups(tensors)) {
    const Table& table = tables[g++];
    SAM_CUDA_DISPATCH(dtype, "global_norm", [&] {
      float* dst = partials.data_ptr<float>() + at_partial;
      if (weighted) {
        sumsq_kernel<scalar_t, true><<<table.n_chunks, kThreads, 0, stream>>>(
            table.data(), table.n_tensors, static_cast<float>(offset), dst);
      } else {
        sumsq_kernel<scalar_t, false><<<table.n_chunks, kThreads, 0, stream>>>(
            table.data(), table.n_tensors, 0.f, dst);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    at_partial += table.n_chunks;
  }
  finalize_kernel<<<1, kCleanupThreads, 0, stream>>>(
      partials.data_ptr<float>(), n_partials, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace sam_kernels::cuda

TORCH_LIBRARY_IMPL(sam_kernels, CUDA, m) {
  m.impl("global_norm", &sam_kernels::cuda::global_norm);
}
