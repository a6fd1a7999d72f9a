// Constants and argument checks shared by the CPU and CUDA implementations.
#pragma once
#include <ATen/core/Tensor.h>  // not ATen/ATen.h: its every-operator headers cost 13 s per file

#include <tuple>

namespace sam_kernels {

constexpr double kNormEps = 1e-12;  // ALGORITHMS.md: eps guarding every division by a norm

inline at::Device list_device(const char* op, at::TensorList params, at::DeviceType expected) {
  TORCH_CHECK(!params.empty(), op, ": params is empty");
  auto device = params[0].device();
  TORCH_CHECK(device.type() == expected, op, ": expected ", expected, " tensors, got ", device);
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
          scales.numel() == static_cast<int64_t>(mats.size()) && scales.is_contiguous(),
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
