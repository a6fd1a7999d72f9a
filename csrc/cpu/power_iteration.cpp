// Batched power iteration (nuSAM, Algorithm 2) over every matrix of the list at once.
// Each half-iteration is one parallel pass over all matrices, cut into (matrix, block) work
// items so a few large matrices still fill the threads: G^T u by column blocks (rows outer,
// contiguous columns inner), G v by row blocks (a dot product per row). Floor: every gradient
// matrix is read twice per iteration; the vectors are small.
#include <cmath>

#include "multi_tensor.h"

namespace sam_kernels::cpu {
namespace {

struct Item {
  int64_t mat;
  int64_t begin;
  int64_t end;
};

std::vector<Item> blocks(at::TensorList mats, int dim, int64_t width) {
  std::vector<Item> items;
  for (size_t i = 0; i < mats.size(); ++i) {
    const int64_t n = mats[i].size(dim);
    for (int64_t b = 0; b < n; b += width) items.push_back({static_cast<int64_t>(i), b, std::min(n, b + width)});
  }
  return items;
}

// out[c] = sum_r G[r, c] * x[r] * scale, for c in [c0, c1)
template <typename scalar_t>
void gemv_t_block(const scalar_t* g, int64_t n, int64_t m, const float* x, float scale, float* out, int64_t c0,
                  int64_t c1) {
  for (int64_t c = c0; c < c1; ++c) out[c] = 0.f;
  for (int64_t r = 0; r < n; ++r) {
    const float xr = x[r] * scale;
    const scalar_t* row = g + r * m;
#pragma omp simd
    for (int64_t c = c0; c < c1; ++c) out[c] += static_cast<float>(row[c]) * xr;
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
  const auto col_items = blocks(mats, 1, 256);
  const auto row_items = blocks(mats, 0, 16);
  for (int64_t t = 0; t < iters; ++t) {
    at::parallel_for(0, static_cast<int64_t>(col_items.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t w = lo; w < hi; ++w) {
        const Item& it = col_items[w];
        const auto& g = mats[it.mat];
        SAM_DISPATCH_FLOATING(g.scalar_type(), "power_iteration_", [&] {
          gemv_t_block(g.const_data_ptr<scalar_t>(), g.size(0), g.size(1), us[it.mat].const_data_ptr<float>(),
                       u_scale[it.mat], vs[it.mat].data_ptr<float>(), it.begin, it.end);
        });
      }
    });
    for (int64_t i = 0; i < k; ++i) v_scale[i] = 1.f / (norm2(vs[i].const_data_ptr<float>(), vs[i].numel()) + tau);
    at::parallel_for(0, static_cast<int64_t>(row_items.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t w = lo; w < hi; ++w) {
        const Item& it = row_items[w];
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
