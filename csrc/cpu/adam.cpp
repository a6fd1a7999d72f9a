// The fused torch.optim.Adam / AdamW step (adam_math.h), one pass per element, in three forms:
//   restore_adam_        x = old, then the step with g                (28 B/elem in fp32, +8 amsgrad)
//   rank1_restore_adam_  x = M - s u v^T recomputed, then the step    (nuSAM)
//   sampa_update_adam_   the step from x with d = (1 - lam) g + lam g2 (SAMPa; 32 B)
// The bias corrections come from each tensor's step counter. found_inf != 0 skips the step as in
// sgd.cpp (the moments are not written). Argument order: ops.cpp.
#include "../adam_math.h"
#include "multi_tensor.h"

namespace sam_kernels::cpu {
namespace {

// Kept out of the AT_DISPATCH lambda: a pragma cannot sit inside a macro argument.
// kMix (SAMPa): the gradient is (1 - lam) g + lam g2.
template <typename scalar_t, bool kAmsgrad, bool kLerpLow, typename old_t = scalar_t, bool kMix = false>
void adam_chunk(
    scalar_t* x, const old_t* old, const scalar_t* g, scalar_t* m, scalar_t* v, scalar_t* vmax,
    const AdamArgs& args, int64_t n, const scalar_t* g2 = nullptr, Mix mix = {}) {
  using opmath_t = at::opmath_type<scalar_t>;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    opmath_t xv = static_cast<opmath_t>(old[i]);
    opmath_t mv = static_cast<opmath_t>(m[i]);
    opmath_t vv = static_cast<opmath_t>(v[i]);
    opmath_t vmv = kAmsgrad ? static_cast<opmath_t>(vmax[i]) : opmath_t(0);
    opmath_t gv = static_cast<opmath_t>(g[i]);
    if constexpr (kMix) gv = mix_grads<opmath_t>(gv, static_cast<opmath_t>(g2[i]), mix.w1, mix.w2);
    adam_update<opmath_t, kAmsgrad, kLerpLow>(xv, mv, vv, vmv, gv, args);
    x[i] = static_cast<scalar_t>(xv);
    m[i] = static_cast<scalar_t>(mv);
    v[i] = static_cast<scalar_t>(vv);
    if constexpr (kAmsgrad) vmax[i] = static_cast<scalar_t>(vmv);
  }
}

// Shared: scalars [lr, beta1, beta2, eps, wd, (lam)], options [decoupled, amsgrad, maximize],
// args [grad_scale, found_inf, ...]; the state lists m, v, steps [, vmax] start at list `first`.
struct AdamLaunch {
  AdamHyper hyper;
  float grad_mul;
  bool amsgrad, lerp_low, skip;
  int64_t first;
  AdamLaunch(const Launch& l, int64_t first_state_list)
      : hyper{l.s(0), l.s(1), l.s(2), l.s(3), l.s(4), l.flag(0), l.flag(2)},
        grad_mul(read_scalar(l, 0, 1.f)),
        amsgrad(l.flag(1)),
        lerp_low(1.0 - l.s(1) < 0.5),
        skip(read_scalar(l, 1, 0.f) != 0.f),
        first(first_state_list) {}
  // The step of tensor t: its Adam arguments from its counter (list first + 2).
  AdamArgs args(const TableView& table, int64_t t) const {
    return make_adam_args(hyper, *table.ptr<const float>(first + 2, t), grad_mul);
  }
  template <typename scalar_t>
  void state(const TableView& table, const ChunkRef& c, int64_t vmax_list, scalar_t*& m, scalar_t*& v,
             scalar_t*& vmax) const {
    m = table.ptr<scalar_t>(first, c.tensor) + c.begin;
    v = table.ptr<scalar_t>(first + 1, c.tensor) + c.begin;
    vmax = amsgrad ? table.ptr<scalar_t>(vmax_list, c.tensor) + c.begin : nullptr;
  }
};

// lists x, old, g, m, v, steps [, vmax]
void restore_adam_runner(const Launch& l) {
  const AdamLaunch a(l, 3);
  for_each_restore_chunk(l, a.skip, [&](const ChunkRef& c, auto* x, const auto* old, int64_t n) {
    using scalar_t = std::remove_pointer_t<decltype(x)>;
    const scalar_t* g = l.table.ptr<const scalar_t>(2, c.tensor) + c.begin;
    scalar_t *m, *v, *vmax;
    a.state(l.table, c, 6, m, v, vmax);
    const AdamArgs args = a.args(l.table, c.tensor);
    dispatch_adam_flags(a.amsgrad, a.lerp_low, [&]<bool kA, bool kL>() {
      adam_chunk<scalar_t, kA, kL>(x, old, g, m, v, vmax, args, n);
    });
  });
}

// lists x, g, m, v, steps, u, v [, vmax]; values [ncols, index]; args [grad_scale, found_inf, scales]
void rank1_restore_adam_runner(const Launch& l) {
  const AdamLaunch a(l, 2);
  const float* scales = l.f32(2);
  for_each_chunk(l.table, [&](const ChunkRef& c) {
    SAM_DISPATCH_FLOATING(l.dtype, "rank1_restore_adam_", [&] {
      scalar_t* x = l.table.ptr<scalar_t>(0, c.tensor);
      const scalar_t* g = l.table.ptr<const scalar_t>(1, c.tensor);
      scalar_t *m, *v, *vmax;
      a.state(l.table, ChunkRef{c.tensor, 0, 0}, 7, m, v, vmax);
      const AdamArgs args = a.args(l.table, c.tensor);
      const float sc = scales[l.table.value(1, c.tensor)];
      for_each_rank1_block<scalar_t>(
          c, x, l.table.ptr<const float>(5, c.tensor), l.table.ptr<const float>(6, c.tensor), l.table.value(0, c.tensor),
          sc, [&](int64_t i, const auto* old, int64_t n) {
            if (a.skip) return copy_chunk(x + i, old, n);
            dispatch_adam_flags(a.amsgrad, a.lerp_low, [&]<bool kA, bool kL>() {
              adam_chunk<scalar_t, kA, kL>(x + i, old, g + i, m + i, v + i, kA ? vmax + i : nullptr, args, n);
            });
          });
    });
  });
}

// lists x, g, g2, m, v, steps [, vmax]; scalars [..., lam]
void sampa_update_adam_runner(const Launch& l) {
  const AdamLaunch a(l, 3);
  const Mix mix = make_mix(l.s(5));
  for_each_mix_chunk(l, a.skip, [&](const ChunkRef& c, auto* x, const auto* g, const auto* g2, int64_t n) {
    using scalar_t = std::remove_pointer_t<decltype(x)>;
    scalar_t *m, *v, *vmax;
    a.state(l.table, c, 6, m, v, vmax);
    const AdamArgs args = a.args(l.table, c.tensor);
    dispatch_adam_flags(a.amsgrad, a.lerp_low, [&]<bool kA, bool kL>() {
      adam_chunk<scalar_t, kA, kL, scalar_t, true>(x, x, g, m, v, vmax, args, n, g2, mix);
    });
  });
}

SAM_RUNNER("restore_adam_", c10::DeviceType::CPU, restore_adam_runner);
SAM_RUNNER("rank1_restore_adam_", c10::DeviceType::CPU, rank1_restore_adam_runner);
SAM_RUNNER("sampa_update_adam_", c10::DeviceType::CPU, sampa_update_adam_runner);

}  // namespace
}  // namespace sam_kernels::cpu
