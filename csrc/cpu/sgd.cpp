// The fused torch.optim.SGD step (sgd_math.h), one pass per element, in four forms:
//   restore_sgd_        x = old, then the step with g               (SAM; 20 B/elem in fp32 with momentum)
//   rank1_restore_sgd_  x = M - s u v^T recomputed, then the step   (nuSAM; 20 B)
//   shift_restore_sgd_  x = x + s buf recomputed, then the step     (MSAM; 20 B: buf is read once for both)
//   sampa_update_sgd_   the step from x with d = (1 - lam) g + lam g2 (SAMPa; 24 B)
// found_inf != 0 skips the step: x gets its restored value (SAM, nuSAM, MSAM) or stays (SAMPa), and the
// momentum buffers are not written. grad_scale multiplies the gradient. The arguments, by name:
// their declarations (sam_kernels/ops/primitives.py).
#include "../sgd_math.h"
#include "multi_tensor.h"

namespace sam_kernels::cpu {
namespace {

// Kept out of the AT_DISPATCH lambda: a pragma cannot sit inside a macro argument.
// kMix (SAMPa): the gradient is (1 - lam) g + lam g2. kShift (MSAM): x_t = old + shift * buf, with
// buf as it was before this step (old = x).
template <typename scalar_t, bool kMomentum, bool kNesterov, bool kInit, typename old_t = scalar_t, bool kMix = false,
          bool kShift = false>
void sgd_chunk(
    scalar_t* x, const old_t* old, const scalar_t* g, scalar_t* buf, const SgdArgs& args, int64_t n,
    const scalar_t* g2 = nullptr, Mix mix = {}, double shift = 0.0) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t s = static_cast<opmath_t>(shift);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    opmath_t xv;
    if constexpr (kShift) {
      xv = static_cast<opmath_t>(shifted<scalar_t>(old[i], buf[i], s));
    } else {
      xv = static_cast<opmath_t>(old[i]);
    }
    opmath_t bv = (kMomentum && !kInit) ? static_cast<opmath_t>(buf[i]) : opmath_t(0);
    opmath_t gv = static_cast<opmath_t>(g[i]);
    if constexpr (kMix) gv = mix_grads<opmath_t>(gv, static_cast<opmath_t>(g2[i]), mix.w1, mix.w2);
    sgd_update<opmath_t, kMomentum, kNesterov, kInit>(xv, bv, gv, args);
    x[i] = static_cast<scalar_t>(xv);
    if constexpr (kMomentum) buf[i] = static_cast<scalar_t>(bv);
  }
}

// The parts every form P (a declaration: decl::restore_sgd_, ...) shares, read by name.
template <class P>
struct SgdLaunch {
  SgdArgs args;
  bool momentum, nesterov, init, skip;
  explicit SgdLaunch(const Launch& l)
      : args(make_sgd_args(l.s(P::lr), l.s(P::momentum), l.s(P::dampening), l.s(P::weight_decay), l.flag(P::maximize),
                           read_scalar(l, P::grad_scale, 1.f))),
        momentum(l.s(P::momentum) != 0.0),
        nesterov(l.flag(P::nesterov)),
        init(l.flag(P::init_bufs)),
        skip(read_scalar(l, P::found_inf, 0.f) != 0.f) {}
};

void restore_sgd_runner(const Launch& l) {
  using P = decl::restore_sgd_;
  const SgdLaunch<P> s(l);
  for_each_restore_chunk<P>(l, s.skip, [&](const ChunkRef& c, auto* x, const auto* old, int64_t n) {
    using scalar_t = std::remove_pointer_t<decltype(x)>;
    const scalar_t* g = l.table.ptr<const scalar_t>(P::grads, c.tensor) + c.begin;
    scalar_t* buf = s.momentum ? l.table.ptr<scalar_t>(P::bufs, c.tensor) + c.begin : nullptr;
    dispatch_sgd_flags(s.momentum, s.nesterov, s.init, [&]<bool kM, bool kN, bool kI>() {
      sgd_chunk<scalar_t, kM, kN, kI>(x, old, g, buf, s.args, n);
    });
  });
}

void rank1_restore_sgd_runner(const Launch& l) {
  using P = decl::rank1_restore_sgd_;
  const SgdLaunch<P> s(l);
  const float* scales = l.f32(P::scales);
  for_each_chunk(l.table, [&](const ChunkRef& c) {
    SAM_DISPATCH_FLOATING(l.dtype, "rank1_restore_sgd_", [&] {
      scalar_t* x = l.table.ptr<scalar_t>(P::params, c.tensor);
      const scalar_t* g = l.table.ptr<const scalar_t>(P::grads, c.tensor);
      scalar_t* buf = s.momentum ? l.table.ptr<scalar_t>(P::bufs, c.tensor) : nullptr;
      const float sc = scales[l.table.value(P::index, c.tensor)];
      for_each_rank1_block<scalar_t>(
          c, x, l.table.ptr<const float>(P::us, c.tensor), l.table.ptr<const float>(P::vs, c.tensor),
          l.table.value(P::ncols, c.tensor), sc, [&](int64_t i, const auto* old, int64_t n) {
            if (s.skip) return copy_chunk(x + i, old, n);
            dispatch_sgd_flags(s.momentum, s.nesterov, s.init, [&]<bool kM, bool kN, bool kI>() {
              sgd_chunk<scalar_t, kM, kN, kI>(x + i, old, g + i, kM ? buf + i : nullptr, s.args, n);
            });
          });
    });
  });
}

void shift_restore_sgd_runner(const Launch& l) {
  using P = decl::shift_restore_sgd_;
  const SgdLaunch<P> s(l);
  for_each_shift_chunk<P>(l, P::bufs, s.skip, [&](const ChunkRef& c, auto* x, auto* buf, int64_t n, double shift,
                                                  bool moved) {
    using scalar_t = std::remove_pointer_t<decltype(x)>;
    const scalar_t* g = l.table.ptr<const scalar_t>(P::grads, c.tensor) + c.begin;
    dispatch_sgd_flags(s.momentum, s.nesterov, s.init, [&]<bool kM, bool kN, bool kI>() {
      if (moved) return sgd_chunk<scalar_t, kM, kN, kI, scalar_t, false, true>(x, x, g, buf, s.args, n, nullptr, {},
                                                                              shift);
      sgd_chunk<scalar_t, kM, kN, kI>(x, x, g, buf, s.args, n);
    });
  });
}

void sampa_update_sgd_runner(const Launch& l) {
  using P = decl::sampa_update_sgd_;
  const SgdLaunch<P> s(l);
  const Mix mix = make_mix(l.s(P::lam));
  for_each_mix_chunk<P>(l, s.skip, [&](const ChunkRef& c, auto* x, const auto* g, const auto* g2, int64_t n) {
    using scalar_t = std::remove_pointer_t<decltype(x)>;
    scalar_t* buf = s.momentum ? l.table.ptr<scalar_t>(P::bufs, c.tensor) + c.begin : nullptr;
    dispatch_sgd_flags(s.momentum, s.nesterov, s.init, [&]<bool kM, bool kN, bool kI>() {
      sgd_chunk<scalar_t, kM, kN, kI, scalar_t, true>(x, x, g, buf, s.args, n, g2, mix);
    });
  });
}

SAM_RUNNER("restore_sgd_", c10::DeviceType::CPU, restore_sgd_runner);
SAM_RUNNER("rank1_restore_sgd_", c10::DeviceType::CPU, rank1_restore_sgd_runner);
SAM_RUNNER("shift_restore_sgd_", c10::DeviceType::CPU, shift_restore_sgd_runner);
SAM_RUNNER("sampa_update_sgd_", c10::DeviceType::CPU, sampa_update_sgd_runner);

}  // namespace
}  // namespace sam_kernels::cpu
