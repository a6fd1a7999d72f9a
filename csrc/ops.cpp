// The list ops, one entry point each for CPU and CUDA tensors. Every generic primitive (its
// declaration: sam_kernels/ops/primitives.py, compiled into csrc/generated/primitives.h) goes
// through one boxed function, list_op: it walks the declaration to take the arguments off the
// dispatcher's stack, checks them against the declared kinds and presence rules, and runs the
// primitive's kernel (a runner in cpu/ or cuda/ named like it, reading its arguments by the
// generated enums) over the lists, one launch per dtype group (table.h). The composite ops
// (global_norm, check_grads_: sums of squares, then a finalize kernel) keep entries of their own
// here; power_iteration_ and rank1_scales_ are in cpu/power_iteration.cpp.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstring>
#include <string>

#include "common.h"
#include "generated/primitives.h"
#include "table.h"

namespace sam_kernels {
namespace {

using at::Tensor;
using at::TensorList;
using OptTensor = std::optional<Tensor>;

c10::DeviceType type_of(TensorList params) {
  return params.empty() ? c10::DeviceType::CPU : params[0].device().type();
}

// --- the generic list op ---------------------------------------------------------------------

const decl::PrimitiveDecl& declaration(const c10::OperatorHandle& op) {
  const std::string& full = op.schema().name();  // "sam_kernels::<name>"
  const char* name = full.c_str() + full.find("::") + 2;
  for (int i = 0; i < decl::kNumPrimitives; ++i) {
    if (std::strcmp(decl::kPrimitives[i].name, name) == 0) return decl::kPrimitives[i];
  }
  TORCH_CHECK(false, "sam_kernels: no declaration of ", full);
}

// The per-tensor value columns of a declaration, from the first list (nuSAM's matrices).
std::vector<std::vector<int64_t>> value_columns(const decl::PrimitiveDecl& d, TensorList first) {
  std::vector<std::vector<int64_t>> out(d.n_values);
  for (int c = 0; c < d.n_values; ++c) {
    for (size_t i = 0; i < first.size(); ++i) {
      const auto& t = first[i];
      switch (d.values[c]) {
        case decl::ValueRule::kRows: out[c].push_back(t.dim() == 2 ? t.size(0) : 0); break;
        case decl::ValueRule::kCols: out[c].push_back(t.dim() == 2 ? t.size(1) : 0); break;
        default: out[c].push_back(static_cast<int64_t>(i)); break;
      }
    }
  }
  return out;
}

void list_op(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const decl::PrimitiveDecl& d = declaration(op);
  auto in = torch::jit::last(*stack, d.n_params);
  std::vector<std::vector<Tensor>> lists(d.n_lists);
  std::vector<double> scalars(d.n_scalars);
  std::vector<int64_t> options(d.n_options);
  std::vector<OptTensor> tensors(d.n_tensors);
  std::vector<double> numbers(d.n_params, 0.0);  // each scalar's and option's value: the presence rules read them
  for (int i = 0; i < d.n_params; ++i) {
    const auto& p = d.params[i];
    const c10::IValue& v = in[i];
    switch (p.cat) {
      case decl::Cat::kList: lists[p.index] = v.toTensorVector(); break;
      case decl::Cat::kTensor: tensors[p.index] = v.toOptional<Tensor>(); break;
      case decl::Cat::kScalar: numbers[i] = scalars[p.index] = v.toDouble(); break;
      case decl::Cat::kOption:
        options[p.index] = v.isBool() ? static_cast<int64_t>(v.toBool()) : v.toInt();
        numbers[i] = static_cast<double>(options[p.index]);
        break;
    }
  }
  torch::jit::drop(*stack, d.n_params);
  const TensorList params = lists[0];
  if (params.empty()) return;
  const auto type = type_of(params);
  const auto device = params[0].device();
  std::vector<NamedList> named;
  for (int i = 0; i < d.n_params; ++i) {
    const auto& p = d.params[i];
    if (p.cat == decl::Cat::kList) {
      bool present = true;
      for (int c = 0; c < p.n_conditions; ++c) {
        present = present && ((numbers[p.conditions[c].param] != 0.0) != p.conditions[c].negate);
      }
      named.push_back({p.name, present ? TensorList(lists[p.index]) : TensorList(), p.kind});
    } else if (p.cat == decl::Cat::kTensor && tensors[p.index].has_value()) {
      if (p.tensor_kind == decl::TensorKind::kScalar) check_device_scalar(d.name, p.name, tensors[p.index], device);
      if (p.tensor_kind == decl::TensorKind::kNorm) {
        check_device_scalar(d.name, p.name, tensors[p.index], device, 1, /*allow_f64=*/true);
      }
    }
  }
  if (d.checks & decl::kCheckRank1) {
    check_rank1_args(d.name, type, params, lists[1], lists[2], *tensors[0]);
  }
  run_lists(d.name, d.name, type, named, value_columns(d, params), scalars, options,
            std::vector<std::optional<Tensor>>(tensors.begin(), tensors.end()));
}

// --- norms ---------------------------------------------------------------------------------

// Sums of squares of every dtype group into one partials buffer, each launch at its own offset.
Tensor sum_squares(const char* op, TensorList tensors, TensorList second, int64_t mode, double scalar) {
  using K = decl::sumsq;
  const auto type = type_of(tensors);
  std::vector<NamedList> lists{{"tensors", tensors}, {mode == 1 ? "weights" : "grads2", second}};
  const auto checked = checked_lists(op, type, lists);
  const auto device = tensors[0].device();
  const auto groups = dtype_groups(tensors);
  std::vector<Tensor> tables;
  std::vector<int64_t> chunks;
  int64_t total = 0;
  for (const auto& [dtype, index] : groups) {
    int64_t n = 0;
    tables.push_back(make_table(checked, index, {}, device, &n));
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
    l.table = TableView{tables[g].data_ptr<int64_t>(), static_cast<int64_t>(checked.size()),
                        static_cast<int64_t>(groups[g].second.size()), 0, chunks[g], chunk_size(type)};
    l.dtype = groups[g].first;
    l.device = device;
    l.scalars = {scalar};
    l.options.assign(2, 0);
    l.options[K::mode] = mode;
    l.options[K::first] = at_partial;
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
  l.args = {partials, out};  // decl::norm_finalize::T
  find_runner("norm_finalize", l.device.type())(l);
  return out;
}

void check_grads_(TensorList grads, TensorList grads2, double lam, const Tensor& flags, const OptTensor& first_norm,
                  const OptTensor& scale, const OptTensor& found_inf, double max_norm, const OptTensor& steps,
                  const OptTensor& steps_mask) {
  TORCH_CHECK(!grads.empty(), "check_grads_: grads is empty");
  const auto device = grads[0].device();
  check_device_scalar("check_grads_", "flags", flags, device, 4);
  check_device_scalar("check_grads_", "scale", scale, device);
  check_device_scalar("check_grads_", "found_inf", found_inf, device);
  if (first_norm.has_value()) check_device_scalar("check_grads_", "first_norm", first_norm, device, first_norm->numel(), true);
  if (steps.has_value()) {
    check_device_scalar("check_grads_", "steps", steps, device, steps->numel());
    if (steps_mask.has_value()) check_device_scalar("check_grads_", "steps_mask", steps_mask, device, steps->numel());
  }
  Tensor partials = sum_squares("check_grads_", grads, grads2, grads2.empty() ? 0 : 2, lam);
  Launch l;
  l.device = device;
  l.scalars = {max_norm};
  l.args = {partials, flags, first_norm, scale, found_inf, steps, steps_mask};  // decl::guard_finalize::T
  find_runner("guard_finalize", device.type())(l);
}

void register_list_ops(torch::Library& m, bool cuda) {
  for (int i = 0; i < decl::kNumPrimitives; ++i) {
    const auto& d = decl::kPrimitives[i];
    if (d.generic && !d.internal && (!cuda || d.cuda)) {
      m.impl(d.name, torch::CppFunction::makeFromBoxedFunction<&list_op>());
    }
  }
  m.impl("global_norm", &global_norm);
  m.impl("check_grads_", &check_grads_);
}

}  // namespace
}  // namespace sam_kernels

TORCH_LIBRARY_IMPL(sam_kernels, CPU, m) {
  sam_kernels::register_list_ops(m, /*cuda=*/false);
}

#ifdef SAM_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(sam_kernels, CUDA, m) {
  sam_kernels::register_list_ops(m, /*cuda=*/true);
}
#endif
