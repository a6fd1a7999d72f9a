// rank1_update_: M_i <- M_i + s_i u_i v_i^T for every matrix of the list (nuSAM's perturbation
// and, with -s_i, its removal), computed as M + (s u_r) v_c in fp32, one pass over M (8 B per
// fp32 element). A zero s_i leaves M_i untouched, whatever u_i and v_i hold.
#include "multi_tensor.h"

namespace sam_kernels::cpu {
namespace {

template <typename scalar_t>
void rank1_run(scalar_t* x, float su, const float* v, int64_t len) {
  using opmath_t = at::opmath_type<scalar_t>;
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    x[j] = static_cast<scalar_t>(static_cast<opmath_t>(x[j]) + static_cast<opmath_t>(su * v[j]));
  }
}

}  // namespace

void rank1_update_(at::TensorList mats, at::TensorList us, at::TensorList vs, const at::Tensor& scales) {
  if (mats.empty()) return;
  check_rank1_args("rank1_update_", at::kCPU, mats, us, vs, scales);
  const float* s = scales.const_data_ptr<float>();
  parallel_chunks(make_chunks(mats), [&](const Chunk& c) {
    if (s[c.tensor] == 0.f) return;
    const auto& mat = mats[c.tensor];
    const float* u = us[c.tensor].const_data_ptr<float>();
    const float* v = vs[c.tensor].const_data_ptr<float>();
    SAM_DISPATCH_FLOATING(mat.scalar_type(), "rank1_update_", [&] {
      scalar_t* x = mat.data_ptr<scalar_t>();
      for_each_row_run(c.begin, c.end, mat.size(1), [&](int64_t i, int64_t r, int64_t col, int64_t len) {
        rank1_run(x + i, s[c.tensor] * u[r], v + col, len);
      });
    });
  });
}

}  // namespace sam_kernels::cpu

TORCH_LIBRARY_IMPL(sam_kernels, CPU, m) {
  m.impl("rank1_update_", &sam_kernels::cpu::rank1_update_);
}
