// restore_sgd_: SAM's second half fused with torch.optim.SGD, one pass per element (sgd_math.h):
// x = old, then d = sign * g + wd * x, the momentum buffer, and x -= lr * (d, buf or d + mu * buf).
// Bytes per element (fp32, momentum): read old, g, buf; write x, buf = 20 B.
// sampa_update_sgd_: the same step from x itself with d = (1 - lam) g + lam g2 (SAMPa): 24 B.
#include "../sgd_math.h"
#include "multi_tensor.h"

namespace sam_kernels::cpu {
namespace {

// Kept out of the AT_DISPATCH lambda: a pragma cannot sit inside a macro argument.
// kMix (SAMPa): the gradient is (1 - lam) g + lam g2.
template <typename scalar_t, bool kMomentum, bool kNesterov, bool kInit, typename old_t = scalar_t, bool kMix = false>
void sgd_chunk(
    scalar_t* x, const old_t* old, const scalar_t* g, scalar_t* buf, const SgdArgs& args, int64_t n,
    const scalar_t* g2 = nullptr, Mix mix = {}) {
  using opmath_t = at::opmath_type<scalar_t>;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    opmath_t xv = static_cast<opmath_t>(old[i]);
    opmath_t bv = (kMomentum && !kInit) ? static_cast<opmath_t>(buf[i]) : opmath_t(0);
    opmath_t gv = static_cast<opmath_t>(g[i]);
    if constexpr (kMix) gv = mix_grads<opmath_t>(gv, static_cast<opmath_t>(g2[i]), mix.w1, mix.w2);
    sgd_update<opmath_t, kMomentum, kNesterov, kInit>(xv, bv, gv, args);
    x[i] = static_cast<scalar_t>(xv);
    if constexpr (kMomentum) buf[i] = static_cast<scalar_t>(bv);
  }
}

}  // namespace

void restore_sgd_(
    at::TensorList params,
    at::TensorList olds,
    at::TensorList grads,
    at::TensorList bufs,
    double lr,
    double momentum,
    double dampening,
    bool nesterov,
    double weight_decay,
    bool maximize,
    bool init_bufs,
    double grad_scale) {
  if (params.empty()) return;
  const bool has_momentum = momentum != 0.0;
  check_sgd_args(at::kCPU, params, olds, grads, bufs, has_momentum);

  const SgdArgs args = make_sgd_args(lr, momentum, dampening, weight_decay, maximize, grad_scale);
  parallel_chunks(make_chunks(params), [&](const Chunk& c) {
    const auto& p = params[c.tensor];
    SAM_DISPATCH_FLOATING(p.scalar_type(), "restore_sgd_", [&] {
      scalar_t* x = p.data_ptr<scalar_t>() + c.begin;
      const scalar_t* old = olds[c.tensor].const_data_ptr<scalar_t>() + c.begin;
      const scalar_t* g = grads[c.tensor].const_data_ptr<scalar_t>() + c.begin;
      scalar_t* buf = has_momentum ? bufs[c.tensor].data_ptr<scalar_t>() + c.begin : nullptr;
      dispatch_sgd_flags(has_momentum, nesterov, init_bufs, [&]<bool kM, bool kN, bool kI>() {
        sgd_chunk<scalar_t, kM, kN, kI>(x, old, g, buf, args, c.end - c.begin);
      });
    });
  });
}

void rank1_restore_sgd_(
    at::TensorList params,
    at::TensorList us,
    at::TensorList vs,
    const at::Tensor& scales,
    at::TensorList grads,
    at::TensorList bufs,
    double lr,
    double momentum,
    double dampening,
    bool nesterov,
    double weight_decay,
    bool maximize,
    bool init_bufs,
    double grad_scale) {
  if (params.empty()) return;
  const bool has_momentum = momentum != 0.0;
  check_rank1_args("rank1_restore_sgd_", at::kCPU, params, us, vs, scales);
  check_sgd_args(at::kCPU, params, params, grads, bufs, has_momentum);
  const SgdArgs args = make_sgd_args(lr, momentum, dampening, weight_decay, maximize, grad_scale);
  const float* s = scales.const_data_ptr<float>();
  parallel_chunks(make_chunks(params), [&](const Chunk& c) {
    const auto& p = params[c.tensor];
    SAM_DISPATCH_FLOATING(p.scalar_type(), "rank1_restore_sgd_", [&] {
      scalar_t* x = p.data_ptr<scalar_t>();
      const scalar_t* g = grads[c.tensor].const_data_ptr<scalar_t>();
      scalar_t* buf = has_momentum ? bufs[c.tensor].data_ptr<scalar_t>() : nullptr;
      dispatch_sgd_flags(has_momentum, nesterov, init_bufs, [&]<bool kM, bool kN, bool kI>() {
        for_each_rank1_block<scalar_t>(c, p, us[c.tensor], vs[c.tensor], s[c.tensor], [&](int64_t i, const auto* old, int64_t n) {
          sgd_chunk<scalar_t, kM, kN, kI>(x + i, old, g + i, kM ? buf + i : nullptr, args, n);
        });
      });
    });
  });
}

void sampa_update_sgd_(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList grads2,
    at::TensorList bufs,
    double lam,
    double lr,
    double momentum,
    double dampening,
    bool nesterov,
    double weight_decay,
    bool maximize,
    bool init_bufs) {
  if (params.empty()) return;
  const bool has_momentum = momentum != 0.0;
  check_sgd_args(at::kCPU, params, params, grads, bufs, has_momentum);
  check_named_lists("sampa_update_sgd_", at::kCPU, params, {{"grads2", grads2}});
  const SgdArgs args = make_sgd_args(lr, momentum, dampening, weight_decay, maximize);
  const Mix mix = make_mix(lam);
  parallel_chunks(make_chunks(params), [&](const Chunk& c) {
    const auto& p = params[c.tensor];
    SAM_DISPATCH_FLOATING(p.scalar_type(), "sampa_update_sgd_", [&] {
      scalar_t* x = p.data_ptr<scalar_t>() + c.begin;
      const scalar_t* g = grads[c.tensor].const_data_ptr<scalar_t>() + c.begin;
      const scalar_t* g2 = grads2[c.tensor].const_data_ptr<scalar_t>() + c.begin;
      scalar_t* buf = has_momentum ? bufs[c.tensor].data_ptr<scalar_t>() + c.begin : nullptr;
      dispatch_sgd_flags(has_momentum, nesterov, init_bufs, [&]<bool kM, bool kN, bool kI>() {
        sgd_chunk<scalar_t, kM, kN, kI, scalar_t, true>(x, x, g, buf, args, c.end - c.begin, g2, mix);
      });
    });
  });
}

}  // namespace sam_kernels::cpu

TORCH_LIBRARY_IMPL(sam_kernels, CPU, m) {
  m.impl("restore_sgd_", &sam_kernels::cpu::restore_sgd_);
  m.impl("sampa_update_sgd_", &sam_kernels::cpu::sampa_update_sgd_);
  m.impl("rank1_restore_sgd_", &sam_kernels::cpu::rank1_restore_sgd_);
}
