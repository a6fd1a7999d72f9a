// Multi-tensor apply for the CUDA kernels (in the spirit of apex / ATen's MultiTensorApply,
// with the tensor table in device memory instead of kernel arguments, so one launch covers
// any number of tensors). Layout of the int64 table, built on the host and copied with one
// asynchronous H2D transfer from pinned memory:
//   [n_lists * n_tensors data pointers][n_tensors numels][n_chunks * (tensor index, first element)]
// Every block takes one chunk of kChunk elements of one tensor; threads stride through it
// kILP elements at a time, loading all of them before computing, so several independent
// loads are in flight per thread.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../common.h"

namespace sam_kernels::cuda {

constexpr int64_t kChunk = 65536;
constexpr int kThreads = 512;
constexpr int kILP = 4;

struct Table {
  at::Tensor meta;  // on the device; kept alive until the launch is enqueued
  int64_t n_tensors = 0;
  int64_t n_chunks = 0;
  const int64_t* data() const { return meta.data_ptr<int64_t>(); }
};

// Tables for the tensors `index` of each list (one dtype group).
inline Table make_table(const std::vector<at::TensorList>& lists, const std::vector<int64_t>& index) {
  Table table;
  table.n_tensors = static_cast<int64_t>(index.size());
  std::vector<int64_t> host;
  host.reserve(lists.size() * index.size() + index.size());
  for (const auto& list : lists) {
    for (int64_t i : index) host.push_back(reinterpret_cast<int64_t>(list[i].data_ptr()));
  }
  const auto& first = lists.front();
  for (int64_t i : index) host.push_back(first[i].numel());
  for (int64_t k = 0; k < table.n_tensors; ++k) {
    const int64_t n = first[index[k]].numel();
    for (int64_t b = 0; b < n; b += kChunk) {
      host.push_back(k);
      host.push_back(b);
      ++table.n_chunks;
    }
  }
  auto pinned = at::empty(
      {static_cast<int64_t>(host.size())}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(pinned.data_ptr<int64_t>(), host.data(), host.size() * sizeof(int64_t));
  table.meta = pinned.to(first[0].device(), /*non_blocking=*/true);
  return table;
}

// Indices of the tensors of `params`, grouped by dtype (one launch per group).
inline std::vector<std::pair<at::ScalarType, std::vector<int64_t>>> dtype_groups(at::TensorList params) {
  std::vector<std::pair<at::ScalarType, std::vector<int64_t>>> groups;
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].numel() == 0) continue;
    const auto st = params[i].scalar_type();
    auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == st; });
    if (it == groups.end()) {
      groups.push_back({st, {static_cast<int64_t>(i)}});
    } else {
      it->second.push_back(static_cast<int64_t>(i));
    }
  }
  return groups;
}

struct ChunkRef {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

__device__ __forceinline__ ChunkRef chunk_of(const int64_t* meta, int64_t n_lists, int64_t n_tensors) {
  const int64_t* numels = meta + n_lists * n_tensors;
  const int64_t* chunks = numels + n_tensors;
  const int64_t t = chunks[2 * blockIdx.x];
  const int64_t b = chunks[2 * blockIdx.x + 1];
  const int64_t n = numels[t];
  return {t, b, b + kChunk < n ? b + kChunk : n};
}

template <typename T>
__device__ __forceinline__ T* list_ptr(const int64_t* meta, int64_t list, int64_t n_tensors, int64_t t) {
  return reinterpret_cast<T*>(meta[list * n_tensors + t]);
}

#define SAM_CUDA_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

}  // namespace sam_kernels::cuda
