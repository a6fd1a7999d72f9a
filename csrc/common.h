// Argument checks shared by the CPU and CUDA implementations.
#pragma once
#include <ATen/ATen.h>

#include <string>

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

}  // namespace sam_kernels
