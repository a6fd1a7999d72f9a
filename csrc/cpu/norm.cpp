// Global l2 norm over a list of tensors (ASAM: of |w| + offset times the tensor).
// One pass: each chunk sums its squares in double (vectorized float inner blocks), the
// partials are added in chunk order, so the result does not depend on the thread count.
#include <cmath>

#include "multi_tensor.h"

namespace sam_kernels::cpu {
namespace {

template <typename scalar_t, bool kWeighted>
double chunk_sumsq(const scalar_t* t, const scalar_t* w, float offset, int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int64_t kInner = 512;  // float partial sums stay exact enough over 512 terms
  double total = 0.0;
  for (int64_t b = 0; b < n; b += kInner) {
    const int64_t e = std::min(n, b + kInner);
    opmath_t acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = b; i < e; ++i) {
      opmath_t v = static_cast<opmath_t>(t[i]);
      if constexpr (kWeighted) v *= std::abs(static_cast<opmath_t>(w[i])) + offset;
      acc += v * v;
    }
    total += static_cast<double>(acc);
  }
  return total;
}

}  // namespace

at::Tensor global_norm(at::TensorList tensors, at::TensorList weights, double offset) {
  auto out = at::zeros({}, at::TensorOptions().dtype(at::kFloat));
  if (tensors.empty()) return out;
  const auto device = list_device("global_norm", tensors, at::kCPU);
  check_list("global_norm", "tensors", tensors, tensors, device);
  const bool weighted = !weights.empty();
  if (weighted) check_list("global_norm", "weights", weights, tensors, device);

  const auto chunks = make_chunks(tensors);
  std::vector<double> partial(chunks.size(), 0.0);
  parallel_chunks(chunks, [&](const Chunk& c) {
    const auto& t = tensors[c.tensor];
    SAM_DISPATCH_FLOATING(t.scalar_type(), "global_norm", [&] {
      const scalar_t* tp = t.const_data_ptr<scalar_t>() + c.begin;
      const int64_t n = c.end - c.begin;
      const size_t slot = &c - chunks.data();
      if (weighted) {
        const scalar_t* wp = weights[c.tensor].const_data_ptr<scalar_t>() + c.begin;
        partial[slot] = chunk_sumsq<scalar_t, true>(tp, wp, static_cast<float>(offset), n);
      } else {
        partial[slot] = chunk_sumsq<scalar_t, false>(tp, nullptr, 0.f, n);
      }
    });
  });
  double total = 0.0;
  for (double p : partial) total += p;
  out.fill_(std::sqrt(total));
  return out;
}

}  // namespace sam_kernels::cpu

TORCH_LIBRARY_IMPL(sam_kernels, CPU, m) {
  m.impl("global_norm", &sam_kernels::cpu::global_norm);
}
