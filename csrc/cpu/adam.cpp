// The fused torch.optim.Adam / AdamW step (adam_math.h), one pass per element, in four forms:
//   restore_adam_        x = old, then the step with g                (28 B/elem in fp32, +8 amsgrad)
//   rank1_restore_adam_  x = M - s u v^T recomputed, then the step    (nuSAM)
//   shift_restore_adam_  x = x + s m recomputed, then the step        (MSAM; 28 B: m is read once for both)
//   sampa_update_adam_   the step from x with d = (1 - lam) g + lam g2 (SAMPa; 32 B)
// The bias corrections come from each tensor's step counter. found_inf != 0 skips the step as in
// sgd.cpp (the moments are not written). The arguments, by name: their declarations
// (sam_kernels/ops/primitives.py).
#include "../adam_math.h"
#include "multi_tensor.h"

namespace sam_kernels::cpu {
namespace {

// Kept out of the AT_DISPATCH lambda: a pragma cannot sit inside a macro argument.
// kMix (SAMPa): the gradient is (1 - lam) g + lam g2. kShift (MSAM): x_t = old + shift * m, with m
// as it was before this step (old = x).
template <typename scalar_t, bool kAmsgrad, bool kLerpLow, typename old_t = scalar_t, bool kMix = false,
          bool kShift = false>
void adam_chunk(
    scalar_t* x, const old_t* old, const scalar_t* g, scalar_t* m, scalar_t* v, scalar_t* vmax,
    const AdamArgs& args, int64_t n, const scalar_t* g2 = nullptr, Mix mix = {}, double shift = 0.0) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t s = static_cast<opmath_t>(shift);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    opmath_t xv;
    if constexpr (kShift) {
      xv = static_cast<opmath_t>(shifted<scalar_t>(old[i], m[i], s));
    } else {
      xv = static_cast<opmath_t>(old[i]);
    }
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

// The parts every form P (a declaration: decl::restore_adam_, ...) shares, read by name.
template <class P>
struct AdamLaunch {
  AdamHyper hyper;
  float grad_mul;
  bool amsgrad, lerp_low, skip;
  explicit AdamLaunch(const Launch& l)
      : hyper{l.s(P::lr), l.s(P::beta1), l.s(P::beta2), l.s(P::eps), l.s(P::weight_decay), l.flag(P::decoupled),
              l.flag(P::maximize)},
        grad_mul(read_scalar(l, P::grad_scale, 1.f)),
        amsgrad(l.flag(P::amsgrad)),
        lerp_low(1.0 - l.s(P::beta1) < 0.5),
        skip(read_scalar(l, P::found_inf, 0.f) != 0.f) {}
  // The step of tensor t: its Adam arguments from its counter.
  AdamArgs args(const TableView& table, int64_t t) const {
    return make_adam_args(hyper, *table.ptr<const float>(P::state_steps, t), grad_mul);
  }
  template <typename scalar_t>
  void state(const TableView& table, const ChunkRef& c, scalar_t*& m, scalar_t*& v, scalar_t*& vmax) const {
    m = table.ptr<scalar_t>(P::exp_avgs, c.tensor) + c.begin;
    v = table.ptr<scalar_t>(P::exp_avg_sqs, c.tensor) + c.begin;
    vmax = amsgrad ? table.ptr<scalar_t>(P::max_exp_avg_sqs, c.tensor) + c.begin : nullptr;
  }
};

void restore_adam_runner(const Launch& l) {
  using P = decl::restore_adam_;
  const AdamLaunch<P> a(l);
  for_each_restore_chunk<P>(l, a.skip, [&](const ChunkRef& c, auto* x, const auto* old, int64_t n) {
    using scalar_t = std::remove_pointer_t<decltype(x)>;
    const scalar_t* g = l.table.ptr<const scalar_t>(P::grads, c.tensor) + c.begin;
    scalar_t *m, *v, *vmax;
    a.state(l.table, c, m, v, vmax);
    const AdamArgs args = a.args(l.table, c.tensor);
    dispatch_adam_flags(a.amsgrad, a.lerp_low, [&]<bool kA, bool kL>() {
      adam_chunk<scalar_t, kA, kL>(x, old, g, m, v, vmax, args, n);
    });
  });
}

void rank1_restore_adam_runner(const Launch& l) {
  using P = decl::rank1_restore_adam_;
  const AdamLaunch<P> a(l);
  const float* scales = l.f32(P::scales);
  for_each_chunk(l.table, [&](const ChunkRef& c) {
    SAM_DISPATCH_FLOATING(l.dtype, "rank1_restore_adam_", [&] {
      scalar_t* x = l.table.ptr<scalar_t>(P::params, c.tensor);
      const scalar_t* g = l.table.ptr<const scalar_t>(P::grads, c.tensor);
      scalar_t *m, *v, *vmax;
      a.state(l.table, ChunkRef{c.tensor, 0, 0}, m, v, vmax);
      const AdamArgs args = a.args(l.table, c.tensor);
      const float sc = scales[l.table.value(P::index, c.tensor)];
      for_each_rank1_block<scalar_t>(
          c, x, l.table.ptr<const float>(P::us, c.tensor), l.table.ptr<const float>(P::vs, c.tensor),
          l.table.value(P::ncols, c.tensor), sc, [&](int64_t i, const auto* old, int64_t n) {
            if (a.skip) return copy_chunk(x + i, old, n);
            dispatch_adam_flags(a.amsgrad, a.lerp_low, [&]<bool kA, bool kL>() {
              adam_chunk<scalar_t, kA, kL>(x + i, old, g + i, m + i, v + i, kA ? vmax + i : nullptr, args, n);
            });
          });
    });
  });
}

void shift_restore_adam_runner(const Launch& l) {
  using P = decl::shift_restore_adam_;
  const AdamLaunch<P> a(l);
  for_each_shift_chunk<P>(l, P::exp_avgs, a.skip, [&](const ChunkRef& c, auto* x, auto* /* m, as a.state's */,
                                                      int64_t n, double shift, bool moved) {
    using scalar_t = std::remove_pointer_t<decltype(x)>;
    const scalar_t* g = l.table.ptr<const scalar_t>(P::grads, c.tensor) + c.begin;
    scalar_t *m, *v, *vmax;
    a.state(l.table, c, m, v, vmax);
    const AdamArgs args = a.args(l.table, c.tensor);
    dispatch_adam_flags(a.amsgrad, a.lerp_low, [&]<bool kA, bool kL>() {
      if (moved) return adam_chunk<scalar_t, kA, kL, scalar_t, false, true>(x, x, g, m, v, vmax, args, n, nullptr, {},
                                                                           shift);
      adam_chunk<scalar_t, kA, kL>(x, x, g, m, v, vmax, args, n);
    });
  });
}

void sampa_update_adam_runner(const Launch& l) {
  using P = decl::sampa_update_adam_;
  const AdamLaunch<P> a(l);
  const Mix mix = make_mix(l.s(P::lam));
  for_each_mix_chunk<P>(l, a.skip, [&](const ChunkRef& c, auto* x, const auto* g, const auto* g2, int64_t n) {
    using scalar_t = std::remove_pointer_t<decltype(x)>;
    scalar_t *m, *v, *vmax;
    a.state(l.table, c, m, v, vmax);
    const AdamArgs args = a.args(l.table, c.tensor);
    dispatch_adam_flags(a.amsgrad, a.lerp_low, [&]<bool kA, bool kL>() {
      adam_chunk<scalar_t, kA, kL, scalar_t, true>(x, x, g, m, v, vmax, args, n, g2, mix);
    });
  });
}

SAM_RUNNER("restore_adam_", c10::DeviceType::CPU, restore_adam_runner);
SAM_RUNNER("rank1_restore_adam_", c10::DeviceType::CPU, rank1_restore_adam_runner);
SAM_RUNNER("shift_restore_adam_", c10::DeviceType::CPU, shift_restore_adam_runner);
SAM_RUNNER("sampa_update_adam_", c10::DeviceType::CPU, sampa_update_adam_runner);

}  // namespace
}  // namespace sam_kernels::cpu
