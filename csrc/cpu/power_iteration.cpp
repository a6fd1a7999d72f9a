// Batched power iteration (nuSAM, Algorithm 2) over every matrix of the list at once.
// Each half-iteration is one parallel pass over all matrices, cut into (matrix, row block)
// work items of ~64K elements so a few large matrices still fill the threads, and every item
// reads whole rows (contiguous, prefetch-friendly): G v as a dot product per row; G^T u as a
// partial sum of its rows into a private m-vector, the partials of a matrix then added in
// item order (deterministic; ~1/rows-per-item extra traffic). Floor: every gradient matrix is
// read twice per iteration; the vectors are small.
#include <cmath>

#include <torch/library.h>

#include "multi_tensor.h"

namespace sam_kernels::cpu {
namespace {

struct Item {
  int64_t mat;
  int64_t begin;
  int64_t end;
};

// Row blocks of about kItemElems elements per matrix.
constexpr int64_t kItemElems = 1 << 16;

std::vector<Item> row_blocks(at::TensorList mats) {
  std::vector<Item> items;
  for (size_t i = 0; i < mats.size(); ++i) {
    const int64_t n = mats[i].size(0), m = std::max<int64_t>(mats[i].size(1), 1);
    const int64_t rows = std::max<int64_t>(1, kItemElems / m);
    for (int64_t b = 0; b < n; b += rows) items.push_back({static_cast<int64_t>(i), b, std::min(n, b + rows)});
  }
  return items;
}

// part[c] = sum_{r in [r0, r1)} G[r, c] * x[r] * scale, for all m columns
template <typename scalar_t>
void gemv_t_rows(const scalar_t* g, int64_t m, const float* x, float scale, float* part, int64_t r0, int64_t r1) {
  for (int64_t c = 0; c < m; ++c) part[c] = 0.f;
  for (int64_t r = r0; r < r1; ++r) {
    const float xr = x[r] * scale;
    const scalar_t* row = g + r * m;
#pragma omp simd
    for (int64_t c = 0; c < m; ++c) part[c] += static_cast<float>(row[c]) * xr;
  }
}

// out[r] = sum_c G[r, c] * x[c] * scale, for r in [r0, r1)
template <typename scalar_t>
void gemv_block(const scalar_t* g, int64_t m, const float* x, float scale, float* out, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* row = g + r * m;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t c = 0; c < m; ++c) acc += static_cast<float>(row[c]) * x[c];
    out[r] = acc * scale;
  }
}

float norm2(const float* x, int64_t n) {
  double acc = 0.0;
  for (int64_t i = 0; i < n; ++i) acc += static_cast<double>(x[i]) * x[i];
  return static_cast<float>(std::sqrt(acc));
}

}  // namespace

void power_iteration_(
    at::TensorList mats, at::TensorList us, at::TensorList vs, const at::Tensor& sigmas, int64_t iters,
    double tau) {
  if (mats.empty()) return;
  TORCH_CHECK(iters >= 1, "power_iteration_: iters must be >= 1, got ", iters);
  check_rank1_args("power_iteration_", at::kCPU, mats, us, vs, sigmas);
  const int64_t k = static_cast<int64_t>(mats.size());
  float* sigma = sigmas.data_ptr<float>();
  std::vector<float> u_scale(k, 1.f), v_scale(k);
  // v_i and u_i hold the raw products between half-steps; the scales normalize them lazily.
  const auto items = row_blocks(mats);
  std::vector<int64_t> part_at(items.size() + 1, 0);  // each item's private m-vector in `partials`
  std::vector<int64_t> first_item(k + 1, 0);
  for (size_t w = 0; w < items.size(); ++w) {
    part_at[w + 1] = part_at[w] + mats[items[w].mat].size(1);
    first_item[items[w].mat + 1] = static_cast<int64_t>(w) + 1;
  }
  for (int64_t i = 0; i < k; ++i) first_item[i + 1] = std::max(first_item[i + 1], first_item[i]);
  std::vector<float> partials(part_at.back());
  for (int64_t t = 0; t < iters; ++t) {
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t w = lo; w < hi; ++w) {
        const Item& it = items[w];
        const auto& g = mats[it.mat];
        SAM_DISPATCH_FLOATING(g.scalar_type(), "power_iteration_", [&] {
          gemv_t_rows(g.const_data_ptr<scalar_t>(), g.size(1), us[it.mat].const_data_ptr<float>(), u_scale[it.mat],
                      partials.data() + part_at[w], it.begin, it.end);
        });
      }
    });
    at::parallel_for(0, k, 1, [&](int64_t lo, int64_t hi) {  // v_i = the partials of matrix i, in item order
      for (int64_t i = lo; i < hi; ++i) {
        float* v = vs[i].data_ptr<float>();
        const int64_t m = vs[i].numel();
        for (int64_t c = 0; c < m; ++c) v[c] = 0.f;
        for (int64_t w = first_item[i]; w < first_item[i + 1]; ++w) {
          const float* part = partials.data() + part_at[w];
#pragma omp simd
          for (int64_t c = 0; c < m; ++c) v[c] += part[c];
        }
      }
    });
    for (int64_t i = 0; i < k; ++i) v_scale[i] = 1.f / (norm2(vs[i].const_data_ptr<float>(), vs[i].numel()) + tau);
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t w = lo; w < hi; ++w) {
        const Item& it = items[w];
        const auto& g = mats[it.mat];
        SAM_DISPATCH_FLOATING(g.scalar_type(), "power_iteration_", [&] {
          gemv_block(g.const_data_ptr<scalar_t>(), g.size(1), vs[it.mat].const_data_ptr<float>(), v_scale[it.mat],
                     us[it.mat].data_ptr<float>(), it.begin, it.end);
        });
      }
    });
    for (int64_t i = 0; i < k; ++i) {
      sigma[i] = norm2(us[i].const_data_ptr<float>(), us[i].numel());
      u_scale[i] = 1.f / (sigma[i] + static_cast<float>(tau));
    }
  }
  // the returned vectors are normalized
  for (int64_t i = 0; i < k; ++i) {
    us[i].mul_(u_scale[i]);
    vs[i].mul_(v_scale[i]);
  }
}

}  // namespace sam_kernels::cpu

TORCH_LIBRARY_IMPL(sam_kernels, CPU, m) {
  m.impl("power_iteration_", &sam_kernels::cpu::power_iteration_);
}
