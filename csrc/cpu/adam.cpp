// restore_adam_: SAM's second half fused with torch.optim.Adam / AdamW, one pass per element
// (adam_math.h). Bytes per element (fp32): read old, g, m, v; write x, m, v = 28 B (+8 B amsgrad).
// sampa_update_adam_: the same step from x itself with d = (1 - lam) g + lam g2 (SAMPa): 32 B.
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

}  // namespace

void restore_adam_(
    at::TensorList params,
    at::TensorList olds,
    at::TensorList grads,
    at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs,
    at::TensorList max_exp_avg_sqs,
    double lr,
    double beta1,
    double beta2,
    double eps,
    double weight_decay,
    bool decoupled,
    bool amsgrad,
    bool maximize,
    double bias_correction1,
    double bias_correction2,
    double grad_scale) {
  if (params.empty()) return;
  check_adam_args(at::kCPU, params, olds, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad);

  const AdamArgs args = make_adam_args(
      lr, beta1, beta2, eps, weight_decay, decoupled, maximize, bias_correction1, bias_correction2, grad_scale);
  parallel_chunks(make_chunks(params), [&](const Chunk& c) {
    const auto& p = params[c.tensor];
    SAM_DISPATCH_FLOATING(p.scalar_type(), "restore_adam_", [&] {
      scalar_t* x = p.data_ptr<scalar_t>() + c.begin;
      const scalar_t* old = olds[c.tensor].const_data_ptr<scalar_t>() + c.begin;
      const scalar_t* g = grads[c.tensor].const_data_ptr<scalar_t>() + c.begin;
      scalar_t* m = exp_avgs[c.tensor].data_ptr<scalar_t>() + c.begin;
      scalar_t* v = exp_avg_sqs[c.tensor].data_ptr<scalar_t>() + c.begin;
      scalar_t* vmax = amsgrad ? max_exp_avg_sqs[c.tensor].data_ptr<scalar_t>() + c.begin : nullptr;
      dispatch_adam_flags(amsgrad, 1.0 - beta1 < 0.5, [&]<bool kA, bool kL>() {
        adam_chunk<scalar_t, kA, kL>(x, old, g, m, v, vmax, args, c.end - c.begin);
      });
    });
  });
}

void rank1_restore_adam_(
    at::TensorList params,
    at::TensorList us,
    at::TensorList vs,
    const at::Tensor& scales,
    at::TensorList grads,
    at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs,
    at::TensorList max_exp_avg_sqs,
    double lr,
    double beta1,
    double beta2,
    double eps,
    double weight_decay,
    bool decoupled,
    bool amsgrad,
    bool maximize,
    double bias_correction1,
    double bias_correction2,
    double grad_scale) {
  if (params.empty()) return;
  check_rank1_args("rank1_restore_adam_", at::kCPU, params, us, vs, scales);
  check_adam_args(at::kCPU, params, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad);
  const AdamArgs args = make_adam_args(
      lr, beta1, beta2, eps, weight_decay, decoupled, maximize, bias_correction1, bias_correction2, grad_scale);
  const float* s = scales.const_data_ptr<float>();
  parallel_chunks(make_chunks(params), [&](const Chunk& c) {
    const auto& p = params[c.tensor];
    SAM_DISPATCH_FLOATING(p.scalar_type(), "rank1_restore_adam_", [&] {
      scalar_t* x = p.data_ptr<scalar_t>();
      const scalar_t* g = grads[c.tensor].const_data_ptr<scalar_t>();
      scalar_t* m = exp_avgs[c.tensor].data_ptr<scalar_t>();
      scalar_t* v = exp_avg_sqs[c.tensor].data_ptr<scalar_t>();
      scalar_t* vmax = amsgrad ? max_exp_avg_sqs[c.tensor].data_ptr<scalar_t>() : nullptr;
      dispatch_adam_flags(amsgrad, 1.0 - beta1 < 0.5, [&]<bool kA, bool kL>() {
        for_each_rank1_block<scalar_t>(c, p, us[c.tensor], vs[c.tensor], s[c.tensor], [&](int64_t i, const auto* old, int64_t n) {
          adam_chunk<scalar_t, kA, kL>(x + i, old, g + i, m + i, v + i, kA ? vmax + i : nullptr, args, n);
        });
      });
    });
  });
}

void sampa_update_adam_(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList grads2,
    at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs,
    at::TensorList max_exp_avg_sqs,
    double lam,
    double lr,
    double beta1,
    double beta2,
    double eps,
    double weight_decay,
    bool decoupled,
    bool amsgrad,
    bool maximize,
    double bias_correction1,
    double bias_correction2) {
  if (params.empty()) return;
  check_adam_args(at::kCPU, params, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad);
  check_named_lists("sampa_update_adam_", at::kCPU, params, {{"grads2", grads2}});
  const AdamArgs args = make_adam_args(
      lr, beta1, beta2, eps, weight_decay, decoupled, maximize, bias_correction1, bias_correction2);
  const Mix mix = make_mix(lam);
  parallel_chunks(make_chunks(params), [&](const Chunk& c) {
    const auto& p = params[c.tensor];
    SAM_DISPATCH_FLOATING(p.scalar_type(), "sampa_update_adam_", [&] {
      scalar_t* x = p.data_ptr<scalar_t>() + c.begin;
      const scalar_t* g = grads[c.tensor].const_data_ptr<scalar_t>() + c.begin;
      const scalar_t* g2 = grads2[c.tensor].const_data_ptr<scalar_t>() + c.begin;
      scalar_t* m = exp_avgs[c.tensor].data_ptr<scalar_t>() + c.begin;
      scalar_t* v = exp_avg_sqs[c.tensor].data_ptr<scalar_t>() + c.begin;
      scalar_t* vmax = amsgrad ? max_exp_avg_sqs[c.tensor].data_ptr<scalar_t>() + c.begin : nullptr;
      dispatch_adam_flags(amsgrad, 1.0 - beta1 < 0.5, [&]<bool kA, bool kL>() {
        adam_chunk<scalar_t, kA, kL, scalar_t, true>(x, x, g, m, v, vmax, args, c.end - c.begin, g2, mix);
      });
    });
  });
}

}  // namespace sam_kernels::cpu

TORCH_LIBRARY_IMPL(sam_kernels, CPU, m) {
  m.impl("restore_adam_", &sam_kernels::cpu::restore_adam_);
  m.impl("sampa_update_adam_", &sam_kernels::cpu::sampa_update_adam_);
  m.impl("rank1_restore_adam_", &sam_kernels::cpu::rank1_restore_adam_);
}
