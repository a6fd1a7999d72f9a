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

// One matrix of the power iteration: G (n x m, of the launch's dtype), the warm start, u and v.
struct Mat {
  const void* g;
  const float* warm;
  float* u;
  float* v;
  int64_t n, m, sigma;
};

std::vector<Item> row_blocks(const std::vector<Mat>& mats) {
  std::vector<Item> items;
  for (size_t i = 0; i < mats.size(); ++i) {
    const int64_t n = mats[i].n, m = std::max<int64_t>(mats[i].m, 1);
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

// The whole power iteration over `mats` (one dtype), from the warm starts into u and v.
void power_iteration(const std::vector<Mat>& mats, at::ScalarType dtype, float* sigma, int64_t iters, double tau) {
  const int64_t k = static_cast<int64_t>(mats.size());
  std::vector<float> u_scale(k, 1.f), v_scale(k);
  // v_i and u_i hold the raw products between half-steps; the scales normalize them lazily.
  const auto items = row_blocks(mats);
  std::vector<int64_t> part_at(items.size() + 1, 0);  // each item's private m-vector in `partials`
  std::vector<int64_t> first_item(k + 1, 0);
  for (size_t w = 0; w < items.size(); ++w) {
    part_at[w + 1] = part_at[w] + mats[items[w].mat].m;
    first_item[items[w].mat + 1] = static_cast<int64_t>(w) + 1;
  }
  for (int64_t i = 0; i < k; ++i) first_item[i + 1] = std::max(first_item[i + 1], first_item[i]);
  std::vector<float> partials(part_at.back());
  for (int64_t t = 0; t < iters; ++t) {
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t w = lo; w < hi; ++w) {
        const Item& it = items[w];
        const Mat& mt = mats[it.mat];
        SAM_DISPATCH_FLOATING(dtype, "power_iteration_", [&] {
          gemv_t_rows(static_cast<const scalar_t*>(mt.g), mt.m, t == 0 ? mt.warm : mt.u, u_scale[it.mat],
                      partials.data() + part_at[w], it.begin, it.end);
        });
      }
    });
    at::parallel_for(0, k, 1, [&](int64_t lo, int64_t hi) {  // v_i = the partials of matrix i, in item order
      for (int64_t i = lo; i < hi; ++i) {
        float* v = mats[i].v;
        const int64_t m = mats[i].m;
        for (int64_t c = 0; c < m; ++c) v[c] = 0.f;
        for (int64_t w = first_item[i]; w < first_item[i + 1]; ++w) {
          const float* part = partials.data() + part_at[w];
#pragma omp simd
          for (int64_t c = 0; c < m; ++c) v[c] += part[c];
        }
      }
    });
    for (int64_t i = 0; i < k; ++i) v_scale[i] = 1.f / (norm2(mats[i].v, mats[i].m) + tau);
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t w = lo; w < hi; ++w) {
        const Item& it = items[w];
        const Mat& mt = mats[it.mat];
        SAM_DISPATCH_FLOATING(dtype, "power_iteration_", [&] {
          gemv_block(static_cast<const scalar_t*>(mt.g), mt.m, mt.v, v_scale[it.mat], mt.u, it.begin, it.end);
        });
      }
    });
    for (int64_t i = 0; i < k; ++i) {
      sigma[mats[i].sigma] = norm2(mats[i].u, mats[i].n);
      u_scale[i] = 1.f / (sigma[mats[i].sigma] + static_cast<float>(tau));
    }
  }
  // the returned vectors are normalized (plain loops: an ATen call per vector costs more than the work)
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t r = 0; r < mats[i].n; ++r) mats[i].u[r] *= u_scale[i];
    for (int64_t c = 0; c < mats[i].m; ++c) mats[i].v[c] *= v_scale[i];
  }
}

// the kernel of the declaration decl::power_iteration (values: each matrix's rows, columns and the
// index of its sigma)
void power_iteration_runner(const Launch& l) {
  using P = decl::power_iteration;
  const TableView& t = l.table;
  std::vector<Mat> mats;
  for (int64_t i = 0; i < t.n_tensors; ++i) {
    mats.push_back(Mat{t.ptr<const void>(P::mats, i), t.ptr<const float>(P::warm, i), t.ptr<float>(P::us, i),
                       t.ptr<float>(P::vs, i), t.value(P::nrows, i), t.value(P::ncols, i), t.value(P::index, i)});
  }
  const int64_t iters = l.options.at(P::iters);
  TORCH_CHECK(iters >= 1, "power_iteration_: iters must be >= 1, got ", iters);
  power_iteration(mats, l.dtype, l.f32(P::sigmas), iters, l.s(P::tau));
}

SAM_RUNNER("power_iteration", c10::DeviceType::CPU, power_iteration_runner);

}  // namespace

void power_iteration_(
    at::TensorList mats, at::TensorList us, at::TensorList vs, const at::Tensor& sigmas, int64_t iters,
    double tau) {
  if (mats.empty()) return;
  check_rank1_args("power_iteration_", at::kCPU, mats, us, vs, sigmas);
  std::vector<std::vector<int64_t>> values(3);
  for (size_t i = 0; i < mats.size(); ++i) {
    values[0].push_back(mats[i].size(0));
    values[1].push_back(mats[i].size(1));
    values[2].push_back(static_cast<int64_t>(i));
  }
  // empty matrices too: their product is zeros (so is sigma); dtype groups skip numel-0 tensors
  for (size_t i = 0; i < mats.size(); ++i) {
    if (mats[i].numel() == 0) {
      us[i].zero_();
      vs[i].zero_();
      sigmas[static_cast<int64_t>(i)].zero_();
    }
  }
  run_lists("power_iteration_", "power_iteration", at::kCPU,
            {{"mats", mats}, {"us", us, ListKind::kVectors}, {"vs", vs, ListKind::kVectors},
             {"warm", us, ListKind::kVectors}},
            values, {tau}, {iters}, {sigmas});
}

// rank1_scales_: nuSAM's per-matrix scales from the sigmas (see sam_kernels/ops/__init__.py), and first_norm =
// sum of the sigmas (not finite iff one is not: the first gradient's check).
void rank1_scales_(const at::Tensor& sigmas, const at::Tensor& rho, const at::Tensor& normalized, const at::Tensor& scales,
                   const at::Tensor& first_norm) {
  const int64_t k = sigmas.numel();
  for (const auto* t : {&sigmas, &rho, &normalized, &scales}) {
    TORCH_CHECK(t->is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == k,
                "rank1_scales_: sigmas, rho, normalized, scales must be contiguous float32 vectors of ", k, " values");
  }
  TORCH_CHECK(first_norm.is_cpu() && first_norm.scalar_type() == at::kFloat && first_norm.numel() == 1,
              "rank1_scales_: first_norm must be one float32 value");
  const float* s = sigmas.const_data_ptr<float>();
  const float* r = rho.const_data_ptr<float>();
  const float* nm = normalized.const_data_ptr<float>();
  float* out = scales.data_ptr<float>();
  bool finite = true;
  double sq = 0.0, total = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    finite = finite && std::isfinite(s[i]);
    if (nm[i] != 0.f) sq += static_cast<double>(s[i]) * s[i];
    total += s[i];
  }
  const float c = static_cast<float>(std::sqrt(sq));
  for (int64_t i = 0; i < k; ++i) out[i] = finite ? (nm[i] != 0.f ? r[i] * s[i] / (c + 1e-12f) : r[i]) : 0.f;
  *first_norm.data_ptr<float>() = static_cast<float>(total);
}

}  // namespace sam_kernels::cpu

TORCH_LIBRARY_IMPL(sam_kernels, CPU, m) {
  m.impl("power_iteration_", &sam_kernels::cpu::power_iteration_);
  m.impl("rank1_scales_", &sam_kernels::cpu::rank1_scales_);
}
