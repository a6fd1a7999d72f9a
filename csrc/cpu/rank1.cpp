// rank1_update_: M_i <- M_i + s_i u_i v_i^T for every matrix of the list (nuSAM's perturbation
// and, with -s_i, its removal), computed as M + (s u_r) v_c in fp32, one pass over M (8 B per
// fp32 element). A zero s_i leaves M_i untouched, whatever u_i and v_i hold. The arguments, by
// name: their declarations (sam_kernels/ops/primitives.py).
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

void rank1_update_runner(const Launch& l) {
  using P = decl::rank1_update_;
  const float* scales = l.f32(P::scales);
  for_each_chunk(l.table, [&](const ChunkRef& c) {
    const float s = scales[l.table.value(P::index, c.tensor)];
    if (s == 0.f) return;
    const float* u = l.table.ptr<const float>(P::us, c.tensor);
    const float* v = l.table.ptr<const float>(P::vs, c.tensor);
    SAM_DISPATCH_FLOATING(l.dtype, "rank1_update_", [&] {
      scalar_t* x = l.table.ptr<scalar_t>(P::mats, c.tensor);
      for_each_row_run(c.begin, c.end, l.table.value(P::ncols, c.tensor), [&](int64_t i, int64_t r, int64_t col,
                                                                                int64_t len) {
        rank1_run(x + i, s * u[r], v + col, len);
      });
    });
  });
}

SAM_RUNNER("rank1_update_", c10::DeviceType::CPU, rank1_update_runner);

}  // namespace
}  // namespace sam_kernels::cpu
