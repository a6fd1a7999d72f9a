// The list ops of the schema (sam_kernels.cpp), one entry point each for CPU and CUDA tensors:
// check the arguments, then run the kernel over the lists (table.h). The kernels are runners in
// cpu/ and cuda/, named like the ops; this table is their argument order (the step plans of
// sam_kernels/ops/native.py pack the same):
//
// kernel              lists (absent optional lists dropped)  values    scalars                              options                          args
// sumsq               g [, w | g2]                           -        [offset | lam]                       [mode (0 plain, 1 |w|+offset, 2 mix), first partial]  [partials]
// norm_finalize       -                                      -        []                                   []                               [partials, out]
// guard_finalize      -                                      -        [max_norm]                           []                               [partials, flags, prior, scale, found_inf, steps, steps_mask]
// perturb_            x, g, old                              -        [rho, offset]                        [adaptive]                       [norm]
// restore_            x, old                                 -        []                                   []                               [found_inf]
// restore_sgd_        x, old, g [, buf]                      -        [lr, momentum, dampening, wd]        [nesterov, maximize, init_bufs]  [grad_scale, found_inf]
// sampa_update_sgd_   x, g, g2 [, buf]                       -        [lr, momentum, dampening, wd, lam]   [nesterov, maximize, init_bufs]  [grad_scale, found_inf]
// rank1_restore_sgd_  x, g, u, v [, buf]                     [ncols, i] [lr, momentum, dampening, wd]        [nesterov, maximize, init_bufs]  [grad_scale, found_inf, scales]
// restore_adam_       x, old, g, m, v, steps [, vmax]        -        [lr, beta1, beta2, eps, wd]          [decoupled, amsgrad, maximize]   [grad_scale, found_inf]
// sampa_update_adam_  x, g, g2, m, v, steps [, vmax]         -        [lr, beta1, beta2, eps, wd, lam]     [decoupled, amsgrad, maximize]   [grad_scale, found_inf]
// rank1_restore_adam_ x, g, m, v, steps, u, v [, vmax]       [ncols, i] [lr, beta1, beta2, eps, wd]          [decoupled, amsgrad, maximize]   [grad_scale, found_inf, scales]
// sampa_preview_sgd_  x, g, xt, y [, buf]                    -        [rho, lr, momentum, dampening, wd]   [nesterov, maximize, init_bufs]  [norm]
// sampa_preview_adam_ x, g, xt, y, m, v, steps [, vmax]      -        [rho, lr, beta1, beta2, eps, wd]     [decoupled, amsgrad, maximize]   [norm]
// rank1_update_       M, u, v                                [ncols, i] []                                 []                               [scales]
// (nuSAM's value columns: the matrix's column count and its index in the op's lists, which picks
// its entry of `scales`.)
#include <torch/library.h>

#include "common.h"
#include "table.h"

namespace sam_kernels {
namespace {

using at::Tensor;
using at::TensorList;
using OptTensor = std::optional<Tensor>;
constexpr auto kScalars = ListKind::kScalars;
constexpr auto kVectors = ListKind::kVectors;

c10::DeviceType type_of(TensorList params) {
  return params.empty() ? c10::DeviceType::CPU : params[0].device().type();
}

// An absent optional list (momentum off, amsgrad off) is passed empty.
TensorList when(bool present, TensorList list) {
  return present ? list : TensorList();
}

// nuSAM's value columns: [column counts, indices].
std::vector<std::vector<int64_t>> rank1_columns(TensorList mats) {
  std::vector<std::vector<int64_t>> out(2);
  for (size_t i = 0; i < mats.size(); ++i) {
    out[0].push_back(mats[i].dim() == 2 ? mats[i].size(1) : 0);
    out[1].push_back(static_cast<int64_t>(i));
  }
  return out;
}

void check_scalars(const char* op, TensorList params, std::initializer_list<std::pair<const char*, const OptTensor*>> ts) {
  if (params.empty()) return;
  for (const auto& [name, t] : ts) check_device_scalar(op, name, *t, params[0].device());
}

// --- norms ---------------------------------------------------------------------------------

// Sums of squares of every dtype group into one partials buffer, each launch at its own offset.
Tensor sum_squares(const char* op, TensorList tensors, TensorList second, int64_t mode, double scalar) {
  const auto type = type_of(tensors);
  std::vector<NamedList> lists{{"tensors", tensors}};
  if (!second.empty()) lists.push_back({mode == 1 ? "weights" : "grads2", second});
  const auto present = checked_lists(op, type, lists);
  const auto device = tensors[0].device();
  const auto groups = dtype_groups(tensors);
  std::vector<Tensor> tables;
  std::vector<int64_t> chunks;
  int64_t total = 0;
  for (const auto& [dtype, index] : groups) {
    int64_t n = 0;
    tables.push_back(make_table(present, index, {}, device, &n));
    chunks.push_back(n);
    total += n;
  }
  // fp64 tensors: their sums of squares in fp64 (as torch.nn.utils.clip_grad_norm_ takes a norm)
  bool f64 = false;
  for (const auto& t : tensors) f64 = f64 || t.scalar_type() == at::kDouble;
  auto partials = at::empty({std::max<int64_t>(total, 1)}, tensors[0].options().dtype(f64 ? at::kDouble : at::kFloat));
  if (total == 0) partials.zero_();
  const Runner runner = find_runner("sumsq", type);
  int64_t at_partial = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    Launch l;
    l.table = TableView{tables[g].data_ptr<int64_t>(), static_cast<int64_t>(present.size()),
                        static_cast<int64_t>(groups[g].second.size()), 0, chunks[g], chunk_size(type)};
    l.dtype = groups[g].first;
    l.device = device;
    l.scalars = {scalar};
    l.options = {mode, at_partial};
    l.args = {partials};
    runner(l);
    at_partial += chunks[g];
  }
  return partials.narrow(0, 0, std::max<int64_t>(total, 1));
}

Tensor global_norm(TensorList tensors, TensorList weights, double offset) {
  if (tensors.empty()) return at::zeros({}, at::TensorOptions().dtype(at::kFloat));
  Tensor partials = sum_squares("global_norm", tensors, weights, weights.empty() ? 0 : 1, offset);
  auto out = at::empty({}, partials.options());  // written by the finalize kernel
  Launch l;
  l.device = partials.device();
  l.args = {partials, out};
  find_runner("norm_finalize", l.device.type())(l);
  return out;
}

void check_grads_(TensorList grads, TensorList grads2, double lam, const Tensor& flags, const OptTensor& prior,
                  const OptTensor& scale, const OptTensor& found_inf, double max_norm, const OptTensor& steps,
                  const OptTensor& steps_mask) {
  TORCH_CHECK(!grads.empty(), "check_grads_: grads is empty");
  const auto device = grads[0].device();
  check_device_scalar("check_grads_", "flags", flags, device, 4);
  check_scalars("check_grads_", grads, {{"scale", &scale}, {"found_inf", &found_inf}});
  if (prior.has_value()) check_device_scalar("check_grads_", "prior", prior, device, prior->numel(), true);
  if (steps.has_value()) {
    check_device_scalar("check_grads_", "steps", steps, device, steps->numel());
    if (steps_mask.has_value()) check_device_scalar("check_grads_", "steps_mask", steps_mask, device, steps->numel());
  }
  Tensor partials = sum_squares("check_grads_", grads, grads2, grads2.empty() ? 0 : 2, lam);
  Launch l;
  l.device = device;
  l.scalars = {max_norm};
  l.args = {partials, flags, prior, scale, found_inf, steps, steps_mask};
  find_runner("guard_finalize", device.type())(l);
}

// --- SAM ----------------------------------------------------------------------------------

void perturb_(TensorList params, TensorList grads, TensorList olds, const Tensor& norm, double rho, bool adaptive,
              double offset) {
  if (params.empty()) return;
  check_device_scalar("perturb_", "norm", norm, params[0].device(), 1, true);
  run_lists("perturb_", "perturb_", type_of(params), {{"params", params}, {"grads", grads}, {"olds", olds}}, {},
            {rho, offset}, {adaptive}, {norm});
}

void restore_(TensorList params, TensorList olds, const OptTensor& found_inf) {
  check_scalars("restore_", params, {{"found_inf", &found_inf}});
  run_lists("restore_", "restore_", type_of(params), {{"params", params}, {"olds", olds}}, {}, {}, {}, {found_inf});
}

void restore_sgd_(TensorList params, TensorList olds, TensorList grads, TensorList bufs, double lr, double momentum,
                  double dampening, bool nesterov, double weight_decay, bool maximize, bool init_bufs,
                  const OptTensor& grad_scale, const OptTensor& found_inf) {
  check_scalars("restore_sgd_", params, {{"grad_scale", &grad_scale}, {"found_inf", &found_inf}});
  run_lists("restore_sgd_", "restore_sgd_", type_of(params),
            {{"params", params}, {"olds", olds}, {"grads", grads}, {"bufs", when(momentum != 0, bufs)}}, {},
            {lr, momentum, dampening, weight_decay}, {nesterov, maximize, init_bufs}, {grad_scale, found_inf});
}

void restore_adam_(TensorList params, TensorList olds, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                   TensorList max_exp_avg_sqs, TensorList state_steps, double lr, double beta1, double beta2,
                   double eps, double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                   const OptTensor& grad_scale, const OptTensor& found_inf) {
  check_scalars("restore_adam_", params, {{"grad_scale", &grad_scale}, {"found_inf", &found_inf}});
  run_lists("restore_adam_", "restore_adam_", type_of(params),
            {{"params", params}, {"olds", olds}, {"grads", grads}, {"exp_avgs", exp_avgs},
             {"exp_avg_sqs", exp_avg_sqs}, {"state_steps", state_steps, kScalars},
             {"max_exp_avg_sqs", when(amsgrad, max_exp_avg_sqs)}},
            {}, {lr, beta1, beta2, eps, weight_decay}, {decoupled, amsgrad, maximize}, {grad_scale, found_inf});
}

// --- SAMPa --------------------------------------------------------------------------------

void sampa_preview_sgd_(TensorList params, TensorList grads, TensorList perturbed, TensorList previews,
                        TensorList bufs, const Tensor& norm, double rho, double lr, double momentum, double dampening,
                        bool nesterov, double weight_decay, bool maximize, bool init_bufs) {
  if (params.empty()) return;
  check_device_scalar("sampa_preview_sgd_", "norm", norm, params[0].device(), 1, true);
  run_lists("sampa_preview_sgd_", "sampa_preview_sgd_", type_of(params),
            {{"params", params}, {"grads", grads}, {"perturbed", perturbed}, {"previews", previews},
             {"bufs", when(momentum != 0 && !init_bufs, bufs)}},
            {}, {rho, lr, momentum, dampening, weight_decay}, {nesterov, maximize, init_bufs}, {norm});
}

void sampa_preview_adam_(TensorList params, TensorList grads, TensorList perturbed, TensorList previews,
                         TensorList exp_avgs, TensorList exp_avg_sqs, TensorList max_exp_avg_sqs,
                         TensorList state_steps, const Tensor& norm, double rho, double lr, double beta1,
                         double beta2, double eps, double weight_decay, bool decoupled, bool amsgrad, bool maximize) {
  if (params.empty()) return;
  check_device_scalar("sampa_preview_adam_", "norm", norm, params[0].device(), 1, true);
  run_lists("sampa_preview_adam_", "sampa_preview_adam_", type_of(params),
            {{"params", params}, {"grads", grads}, {"perturbed", perturbed}, {"previews", previews},
             {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}, {"state_steps", state_steps, kScalars},
             {"max_exp_avg_sqs", when(amsgrad, max_exp_avg_sqs)}},
            {}, {rho, lr, beta1, beta2, eps, weight_decay}, {decoupled, amsgrad, maximize}, {norm});
}

void sampa_update_sgd_(TensorList params, TensorList grads, TensorList grads2, TensorList bufs, double lam, double lr,
                       double momentum, double dampening, bool nesterov, double weight_decay, bool maximize,
                       bool init_bufs, const OptTensor& grad_scale, const OptTensor& found_inf) {
  check_scalars("sampa_update_sgd_", params, {{"grad_scale", &grad_scale}, {"found_inf", &found_inf}});
  run_lists("sampa_update_sgd_", "sampa_update_sgd_", type_of(params),
            {{"params", params}, {"grads", grads}, {"grads2", grads2}, {"bufs", when(momentum != 0, bufs)}}, {},
            {lr, momentum, dampening, weight_decay, lam}, {nesterov, maximize, init_bufs}, {grad_scale, found_inf});
}

void sampa_update_adam_(TensorList params, TensorList grads, TensorList grads2, TensorList exp_avgs,
                        TensorList exp_avg_sqs, TensorList max_exp_avg_sqs, TensorList state_steps, double lam,
                        double lr, double beta1, double beta2, double eps, double weight_decay, bool decoupled,
                        bool amsgrad, bool maximize, const OptTensor& grad_scale, const OptTensor& found_inf) {
  check_scalars("sampa_update_adam_", params, {{"grad_scale", &grad_scale}, {"found_inf", &found_inf}});
  run_lists("sampa_update_adam_", "sampa_update_adam_", type_of(params),
            {{"params", params}, {"grads", grads}, {"grads2", grads2}, {"exp_avgs", exp_avgs},
             {"exp_avg_sqs", exp_avg_sqs}, {"state_steps", state_steps, kScalars},
             {"max_exp_avg_sqs", when(amsgrad, max_exp_avg_sqs)}},
            {}, {lr, beta1, beta2, eps, weight_decay, lam}, {decoupled, amsgrad, maximize}, {grad_scale, found_inf});
}

// --- nuSAM --------------------------------------------------------------------------------

void rank1_update_(TensorList mats, TensorList us, TensorList vs, const Tensor& scales) {
  if (mats.empty()) return;
  check_rank1_args("rank1_update_", type_of(mats), mats, us, vs, scales);
  run_lists("rank1_update_", "rank1_update_", type_of(mats),
            {{"mats", mats}, {"us", us, kVectors}, {"vs", vs, kVectors}}, rank1_columns(mats), {}, {}, {scales});
}

void rank1_restore_sgd_(TensorList params, TensorList us, TensorList vs, const Tensor& scales, TensorList grads,
                        TensorList bufs, double lr, double momentum, double dampening, bool nesterov,
                        double weight_decay, bool maximize, bool init_bufs, const OptTensor& grad_scale,
                        const OptTensor& found_inf) {
  if (params.empty()) return;
  check_rank1_args("rank1_restore_sgd_", type_of(params), params, us, vs, scales);
  check_scalars("rank1_restore_sgd_", params, {{"grad_scale", &grad_scale}, {"found_inf", &found_inf}});
  run_lists("rank1_restore_sgd_", "rank1_restore_sgd_", type_of(params),
            {{"params", params}, {"grads", grads}, {"us", us, kVectors}, {"vs", vs, kVectors},
             {"bufs", when(momentum != 0, bufs)}},
            rank1_columns(params), {lr, momentum, dampening, weight_decay}, {nesterov, maximize, init_bufs},
            {grad_scale, found_inf, scales});
}

void rank1_restore_adam_(TensorList params, TensorList us, TensorList vs, const Tensor& scales, TensorList grads,
                         TensorList exp_avgs, TensorList exp_avg_sqs, TensorList max_exp_avg_sqs,
                         TensorList state_steps, double lr, double beta1, double beta2, double eps,
                         double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                         const OptTensor& grad_scale, const OptTensor& found_inf) {
  if (params.empty()) return;
  check_rank1_args("rank1_restore_adam_", type_of(params), params, us, vs, scales);
  check_scalars("rank1_restore_adam_", params, {{"grad_scale", &grad_scale}, {"found_inf", &found_inf}});
  run_lists("rank1_restore_adam_", "rank1_restore_adam_", type_of(params),
            {{"params", params}, {"grads", grads}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs},
             {"state_steps", state_steps, kScalars}, {"us", us, kVectors}, {"vs", vs, kVectors},
             {"max_exp_avg_sqs", when(amsgrad, max_exp_avg_sqs)}},
            rank1_columns(params), {lr, beta1, beta2, eps, weight_decay}, {decoupled, amsgrad, maximize},
            {grad_scale, found_inf, scales});
}

}  // namespace
}  // namespace sam_kernels

#define SAM_IMPL_SAM_OPS(m)                                               \
  m.impl("global_norm", &sam_kernels::global_norm);                       \
  m.impl("check_grads_", &sam_kernels::check_grads_);                     \
  m.impl("perturb_", &sam_kernels::perturb_);                             \
  m.impl("restore_", &sam_kernels::restore_);                             \
  m.impl("restore_sgd_", &sam_kernels::restore_sgd_);                     \
  m.impl("restore_adam_", &sam_kernels::restore_adam_);                   \
  m.impl("sampa_preview_sgd_", &sam_kernels::sampa_preview_sgd_);         \
  m.impl("sampa_preview_adam_", &sam_kernels::sampa_preview_adam_);       \
  m.impl("sampa_update_sgd_", &sam_kernels::sampa_update_sgd_);           \
  m.impl("sampa_update_adam_", &sam_kernels::sampa_update_adam_)

TORCH_LIBRARY_IMPL(sam_kernels, CPU, m) {
  SAM_IMPL_SAM_OPS(m);
  // nuSAM's element kernels run on the CPU here and in Triton on the GPU (power_iteration.cpp
  // registers its own CPU implementation)
  m.impl("rank1_update_", &sam_kernels::rank1_update_);
  m.impl("rank1_restore_sgd_", &sam_kernels::rank1_restore_sgd_);
  m.impl("rank1_restore_adam_", &sam_kernels::rank1_restore_adam_);
}

#ifdef SAM_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(sam_kernels, CUDA, m) {
  SAM_IMPL_SAM_OPS(m);
}
#endif
