// Operator schemas for torch.ops.sam_kernels.*, shared by the CPU and CUDA kernels.
// Mutated lists carry alias annotations (a!) so functionalization and torch.compile
// know what each op writes. Fake (meta) implementations live in sam_kernels/_ext.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A plain module object: the ops are registered by the static initializers below,
// so importing sam_kernels._C is all Python has to do (no pybind11 needed).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(sam_kernels, m) {
  // sqrt(sum_i ||w_i * t_i||^2) with w_i = |weights_i| + offset (or 1 when weights is empty).
  m.def("global_norm(Tensor[] tensors, Tensor[] weights, float offset) -> Tensor");
  // olds <- params; params <- params + s * w^2 * grads, s = rho / (norm + 1e-12),
  // and params untouched when norm is not finite.
  m.def(
      "perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] olds, Tensor norm, "
      "float rho, bool adaptive, float offset) -> ()");
  m.def("restore_(Tensor(a!)[] params, Tensor[] olds) -> ()");
  // params <- olds, then one torch.optim.SGD step with grads; bufs are the momentum buffers.
  // grad_scale multiplies the gradients (GradScaler's 1 / scale: unscaling inside the update).
  m.def(
      "restore_sgd_(Tensor(a!)[] params, Tensor[] olds, Tensor[] grads, Tensor(b!)[] bufs, "
      "float lr, float momentum, float dampening, bool nesterov, float weight_decay, "
      "bool maximize, bool init_bufs, float grad_scale=1.0) -> ()");
  // params <- olds, then one torch.optim.Adam / AdamW step (bias corrections given by the caller).
  m.def(
      "restore_adam_(Tensor(a!)[] params, Tensor[] olds, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, bool decoupled, bool amsgrad, bool maximize, "
      "float bias_correction1, float bias_correction2, float grad_scale=1.0) -> ()");

  // SAMPa. perturbed <- params + s * grads (s = rho / (norm + 1e-12); params where norm is not
  // finite) and previews <- the base step from params with grads; the state lists are read only.
  m.def(
      "sampa_preview_sgd_(Tensor[] params, Tensor[] grads, Tensor(a!)[] perturbed, Tensor(b!)[] previews, "
      "Tensor[] bufs, Tensor norm, float rho, float lr, float momentum, float dampening, bool nesterov, "
      "float weight_decay, bool maximize, bool init_bufs) -> ()");
  m.def(
      "sampa_preview_adam_(Tensor[] params, Tensor[] grads, Tensor(a!)[] perturbed, Tensor(b!)[] previews, "
      "Tensor[] exp_avgs, Tensor[] exp_avg_sqs, Tensor[] max_exp_avg_sqs, Tensor norm, float rho, float lr, "
      "float beta1, float beta2, float eps, float weight_decay, bool decoupled, bool amsgrad, bool maximize, "
      "float bias_correction1, float bias_correction2) -> ()");
  // The base step from params with d = (1 - lam) * grads + lam * grads2, in one pass.
  m.def(
      "sampa_update_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor[] grads2, Tensor(b!)[] bufs, float lam, "
      "float lr, float momentum, float dampening, bool nesterov, float weight_decay, bool maximize, "
      "bool init_bufs) -> ()");
  m.def(
      "sampa_update_adam_(Tensor(a!)[] params, Tensor[] grads, Tensor[] grads2, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, float lam, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, bool decoupled, bool amsgrad, bool maximize, float bias_correction1, "
      "float bias_correction2) -> ()");

  // nuSAM (rank-1 perturbations of weight matrices). mats are 2-D (n_i x m_i); us, vs fp32.
  // T power iterations warm-started from us: v = G^T u / (|G^T u| + tau), u = G v / (|G v| + tau).
  m.def(
      "power_iteration_(Tensor[] mats, Tensor(a!)[] us, Tensor(b!)[] vs, Tensor(c!) sigmas, int iters, "
      "float tau) -> ()");
  // M_i <- M_i + scales[i] * u_i v_i^T (scales: fp32 on the device; 0 leaves M_i untouched).
  m.def("rank1_update_(Tensor(a!)[] mats, Tensor[] us, Tensor[] vs, Tensor scales) -> ()");
  // M <- M - s u v^T, then the SGD / Adam step of restore_sgd_ / restore_adam_, in one pass.
  m.def(
      "rank1_restore_sgd_(Tensor(a!)[] params, Tensor[] us, Tensor[] vs, Tensor scales, Tensor[] grads, "
      "Tensor(b!)[] bufs, float lr, float momentum, float dampening, bool nesterov, float weight_decay, "
      "bool maximize, bool init_bufs, float grad_scale=1.0) -> ()");
  m.def(
      "rank1_restore_adam_(Tensor(a!)[] params, Tensor[] us, Tensor[] vs, Tensor scales, Tensor[] grads, "
      "Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, bool decoupled, bool amsgrad, bool maximize, "
      "float bias_correction1, float bias_correction2, float grad_scale=1.0) -> ()");
}
