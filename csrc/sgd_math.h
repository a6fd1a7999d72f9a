// The per-element SGD update, shared by the CPU and CUDA kernels (host and device code).
#pragma once
#if defined(__CUDACC__)
#define SAM_HD __host__ __device__ __forceinline__
#else
#define SAM_HD inline
#endif

namespace sam_kernels {

struct SgdArgs {
  double lr;
  double momentum;
  double one_minus_dampening;
  double weight_decay;
  bool nesterov;
  bool maximize;
  bool init_bufs;  // first step: torch.optim.SGD sets buf = d (no dampening)
};

// x holds the restored weight on entry and the updated one on exit; buf likewise.
template <typename T>
SAM_HD void sgd_update(T& x, T& buf, T g, const SgdArgs& a, bool has_momentum) {
  T d = a.maximize ? -g : g;
  if (a.weight_decay != 0.0) d += T(a.weight_decay) * x;
  if (has_momentum) {
    buf = a.init_bufs ? d : T(a.momentum) * buf + T(a.one_minus_dampening) * d;
    d = a.nesterov ? d + T(a.momentum) * buf : buf;
  }
  x -= T(a.lr) * d;
}

}  // namespace sam_kernels
