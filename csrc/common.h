// Argument checks shared by the CPU and CUDA implementations.
#pragma once
#include <ATen/ATen.h>

#include <initializer_list>
#include <string>
#include <utility>

namespace sam_kernels {

constexpr double kNormEps = 1e-12;  // ALGORITHMS.md: eps guarding every division by a norm

// Every list must have `n` tensors with the numel and dtype of params[i], all contiguous
// and on `device`. The Python layer stages non-contiguous tensors, so a failure here is a bug
// in the caller, reported with the op, the list and the index.
inline void check_list(
    const char* op,
    const char* name,
    at::TensorList list,
    at::TensorList params,
    const at::Device& device) {
  TORCH_CHECK(
      list.size() == params.size(), op, ": '", name, "' has ", list.size(), " tensors, params has ",
      params.size());
  for (size_t i = 0; i < list.size(); ++i) {
    const auto& t = list[i];
    TORCH_CHECK(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(), ", expected ", device);
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, "[", i, "] must be contiguous");
    TORCH_CHECK(
        t.numel() == params[i].numel(), op, ": ", name, "[", i, "] has ", t.numel(),
        " elements, params[", i, "] has ", params[i].numel());
    TORCH_CHECK(
        t.scalar_type() == params[i].scalar_type(), op, ": ", name, "[", i, "] is ", t.scalar_type(),
        ", params[", i, "] is ", params[i].scalar_type());
  }
}

inline at::Device list_device(const char* op, at::TensorList params, at::DeviceType expected) {
  TORCH_CHECK(!params.empty(), op, ": params is empty");
  auto device = params[0].device();
  TORCH_CHECK(device.type() == expected, op, ": expected ", expected, " tensors, got ", device);
  return device;
}

// Every (name, list) pair against params; lists given as empty (optional state) are skipped.
inline at::Device check_named_lists(
    const char* op,
    at::DeviceType type,
    at::TensorList params,
    std::initializer_list<std::pair<const char*, at::TensorList>> lists) {
  const auto device = list_device(op, params, type);
  for (const auto& [name, list] : lists) {
    if (!list.empty()) check_list(op, name, list, params, device);
  }
  return device;
}

// The argument checks of each op, shared by its CPU and CUDA implementations.
inline at::Device check_perturb_args(
    at::DeviceType type, at::TensorList params, at::TensorList grads, at::TensorList olds) {
  const auto device = list_device("perturb_", params, type);
  check_list("perturb_", "grads", grads, params, device);
  check_list("perturb_", "olds", olds, params, device);
  return device;
}

inline at::Device check_restore_args(at::DeviceType type, at::TensorList params, at::TensorList olds) {
  const auto device = list_device("restore_", params, type);
  check_list("restore_", "olds", olds, params, device);
  return device;
}

inline at::Device check_sgd_args(
    at::DeviceType type, at::TensorList params, at::TensorList olds, at::TensorList grads, at::TensorList bufs,
    bool has_momentum) {
  const auto device = list_device("restore_sgd_", params, type);
  check_list("restore_sgd_", "olds", olds, params, device);
  check_list("restore_sgd_", "grads", grads, params, device);
  if (has_momentum) check_list("restore_sgd_", "bufs", bufs, params, device);
  return device;
}

inline at::Device check_adam_args(
    at::DeviceType type, at::TensorList params, at::TensorList olds, at::TensorList grads, at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, bool amsgrad) {
  const auto device = list_device("restore_adam_", params, type);
  check_list("restore_adam_", "olds", olds, params, device);
  check_list("restore_adam_", "grads", grads, params, device);
  check_list("restore_adam_", "exp_avgs", exp_avgs, params, device);
  check_list("restore_adam_", "exp_avg_sqs", exp_avg_sqs, params, device);
  if (amsgrad) check_list("restore_adam_", "max_exp_avg_sqs", max_exp_avg_sqs, params, device);
  return device;
}

// nuSAM's rank-1 terms: mats[i] is n_i x m_i (2-D), us[i] fp32 of n_i, vs[i] fp32 of m_i,
// scales one fp32 value per matrix on the same device.
inline at::Device check_rank1_args(
    const char* op, at::DeviceType type, at::TensorList mats, at::TensorList us, at::TensorList vs,
    const at::Tensor& scales) {
  const auto device = list_device(op, mats, type);
  TORCH_CHECK(us.size() == mats.size() && vs.size() == mats.size(), op, ": us / vs must have one vector per matrix");
  TORCH_CHECK(
      scales.device() == device && scales.scalar_type() == at::kFloat && scales.dim() == 1 &&
          scales.numel() == static_cast<int64_t>(mats.size()),
      op, ": scales must be a float32 vector of ", mats.size(), " values on ", device);
  for (size_t i = 0; i < mats.size(); ++i) {
    TORCH_CHECK(mats[i].dim() == 2 && mats[i].is_contiguous(), op, ": mats[", i, "] must be a contiguous matrix");
    for (const auto& [name, vec, len] :
         {std::tuple{"us", us[i], mats[i].size(0)}, std::tuple{"vs", vs[i], mats[i].size(1)}}) {
      TORCH_CHECK(
          vec.device() == device && vec.scalar_type() == at::kFloat && vec.is_contiguous() && vec.numel() == len,
          op, ": ", name, "[", i, "] must be a contiguous float32 vector of ", len, " values on ", device);
    }
  }
  return device;
}

}  // namespace sam_kernels
