// Multi-tensor work on the CPU: the parameter list is cut into fixed-size chunks (never
// more than one tensor per chunk), and at::parallel_for spreads the chunks over threads.
// Chunk boundaries depend only on the tensor sizes, so reductions that combine per-chunk
// partials in chunk order are deterministic whatever the number of threads.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../common.h"

namespace sam_kernels::cpu {

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// 32K elements: large enough that per-chunk overhead vanishes, small enough to balance
// a ViT-sized list (~150 tensors of very different sizes) over the threads.
constexpr int64_t kChunkElems = 1 << 15;

inline std::vector<Chunk> make_chunks(at::TensorList tensors) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const int64_t n = tensors[t].numel();
    for (int64_t b = 0; b < n; b += kChunkElems) {
      chunks.push_back({static_cast<int64_t>(t), b, std::min(n, b + kChunkElems)});
    }
  }
  return chunks;
}

template <typename F>
void parallel_chunks(const std::vector<Chunk>& chunks, const F& f) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) f(chunks[c]);
  });
}

#define SAM_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

}  // namespace sam_kernels::cpu
