// Multi-tensor launches for the CUDA kernels: one block per chunk of a table (table.h), on the
// current stream (so that side streams and CUDA graph capture order them like any torch op).
// Threads stride through their chunk kILP elements at a time, loading all of them before
// computing, so several independent loads are in flight per thread.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "../common.h"
#include "../generated/primitives.h"
#include "../table.h"

namespace sam_kernels::cuda {

constexpr int kThreads = 512;
constexpr int kILP = 4;

// kernel<<<one block per chunk>>>(table, args...) on the current stream.
template <typename Kernel, typename... Args>
void launch_chunks(const Launch& l, Kernel kernel, Args... args) {
  if (l.table.n_chunks == 0) return;
  kernel<<<l.table.n_chunks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(l.table, args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// An optional fp32 device scalar: its value, or `absent` (read by every thread: one cached load).
__device__ __forceinline__ float load_or(const float* p, float absent) {
  return p ? *p : absent;
}

// The perturbation's scale rho / (norm + eps) from a device-resident norm (0 when it is not
// finite): fp32 arithmetic for an fp32 norm, fp64 for the fp64 norm of fp64 tensors. rho_t: a
// capturable step's rho, read when the kernel runs.
__device__ __forceinline__ double norm_scale(ScalarRef norm, double rho, const float* rho_t, bool& finite) {
  if (rho_t != nullptr) rho = *rho_t;
  const double nv = norm.get();
  finite = isfinite(nv);
  if (!finite) return 0.0;
  if (norm.f64) return rho / (nv + kNormEps);
  return static_cast<float>(rho) / (static_cast<float>(nv) + static_cast<float>(kNormEps));
}

// x + s * d in opmath, rounded to the weights' type: shift_'s move (MSAM) and its way back as the
// fused updates recompute it (the same rounding, so either path gives the same x_t).
template <typename scalar_t, typename opmath_t>
__device__ __forceinline__ scalar_t shifted(scalar_t x, scalar_t d, opmath_t s) {
  return static_cast<scalar_t>(static_cast<opmath_t>(x) + s * static_cast<opmath_t>(d));
}

// MSAM's way back in a fused update: x_t = x + s * d, s = rho / (norm + eps) (rho_t: a capturable
// step's rho); no move for a non-finite norm (the move there did not happen either).
struct ShiftArg {
  ScalarRef norm;
  double rho = 0.0;
  const float* rho_t = nullptr;
};

// The scale of MSAM's way back in a fused update (kShift), and whether x was moved at all (a
// finite norm); without kShift nothing moved.
template <bool kShift, typename opmath_t>
__device__ __forceinline__ opmath_t shift_scale(const ShiftArg& shift, bool& moved) {
  moved = false;
  if constexpr (kShift) return static_cast<opmath_t>(norm_scale(shift.norm, shift.rho, shift.rho_t, moved));
  return opmath_t(0);
}

// What a skipped fused update writes over its chunk: x_t and no state. SAM's x_old, or (kShift)
// MSAM's way back x + s d (nothing where x was not moved).
template <bool kShift, typename scalar_t, typename opmath_t>
__device__ __forceinline__ void write_restored(const ChunkRef& c, scalar_t* x, const scalar_t* old, const scalar_t* d,
                                               bool moved, opmath_t s) {
  if (kShift && !moved) return;
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += kThreads) {
    x[i] = kShift ? shifted<scalar_t, opmath_t>(x[i], d[i], s) : old[i];
  }
}

#define SAM_CUDA_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

}  // namespace sam_kernels::cuda
