// Operator schemas for torch.ops.sam_kernels.*, shared by the CPU and CUDA kernels.
// Mutated lists carry alias annotations (a!) so functionalization and torch.compile
// know what each op writes. Fake (meta) implementations live in sam_kernels/ops/extension.py.
// The list ops are in ops.cpp (one entry point per op for both devices), the kernels in cpu/
// and cuda/, the launch helper they share in table.h.
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <vector>

namespace {

// fingerprint(params: list[Tensor]) -> (bytes, bytes): per parameter (its data pointer, whether
// it and its gradient are contiguous and strided, whether it has one), and per parameter its
// gradient's data pointer (0 without one). A step plan stays valid while the first holds; when
// only the second changed (autograd gave the gradients new memory) its tables take the new
// addresses. One C loop instead of a Python one over the parameters (this runs twice a step).
PyObject* fingerprint(PyObject*, PyObject* arg) {
  if (!PyList_Check(arg)) {
    PyErr_SetString(PyExc_TypeError, "fingerprint expects a list of tensors");
    return nullptr;
  }
  const Py_ssize_t n = PyList_GET_SIZE(arg);
  std::vector<int64_t> structure(2 * n), grads(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* obj = PyList_GET_ITEM(arg, i);
    if (!THPVariable_Check(obj)) {
      PyErr_SetString(PyExc_TypeError, "fingerprint expects a list of tensors");
      return nullptr;
    }
    const at::Tensor& p = THPVariable_Unpack(obj);
    const at::Tensor& g = p.grad();
    const bool strided = !g.defined() || g.layout() == at::kStrided;
    structure[2 * i] = p.has_storage() ? reinterpret_cast<int64_t>(p.data_ptr()) : 0;
    structure[2 * i + 1] = (g.defined() ? 1 : 0) | (strided ? 2 : 0) |
                           (!g.defined() || !strided || g.is_contiguous() ? 4 : 0) | (p.is_contiguous() ? 8 : 0);
    grads[i] = g.defined() && strided && g.has_storage() ? reinterpret_cast<int64_t>(g.data_ptr()) : 0;
  }
  auto bytes = [](const std::vector<int64_t>& v) {
    return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(v.data()),
                                     static_cast<Py_ssize_t>(v.size() * sizeof(int64_t)));
  };
  PyObject* a = bytes(structure);
  PyObject* b = bytes(grads);
  if (a == nullptr || b == nullptr) {
    Py_XDECREF(a);
    Py_XDECREF(b);
    return nullptr;
  }
  PyObject* out = PyTuple_Pack(2, a, b);
  Py_DECREF(a);
  Py_DECREF(b);
  return out;
}

// state_fingerprint(state: dict, params: list[Tensor], keys: tuple[str]) -> bytes: per parameter
// and key, the data pointer of state[p][key] (0 when absent, 1 for a value without storage): what
// a step plan binds from the optimizer state (which entries exist, and where), so that its key
// says when a plan built on other state must not be reused. The lookups never create an entry
// (state is torch.optim's defaultdict: PyDict_GetItem does not call __missing__).
PyObject* state_fingerprint(PyObject*, PyObject* args) {
  PyObject *state, *params, *keys;
  if (!PyArg_ParseTuple(args, "O!O!O!", &PyDict_Type, &state, &PyList_Type, &params, &PyTuple_Type, &keys)) {
    return nullptr;
  }
  const Py_ssize_t n = PyList_GET_SIZE(params), k = PyTuple_GET_SIZE(keys);
  std::vector<int64_t> out(n * k, 0);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* entry = PyDict_GetItemWithError(state, PyList_GET_ITEM(params, i));  // borrowed
    if (entry == nullptr) {
      if (PyErr_Occurred()) return nullptr;
      continue;
    }
    if (!PyDict_Check(entry)) continue;
    for (Py_ssize_t j = 0; j < k; ++j) {
      PyObject* value = PyDict_GetItemWithError(entry, PyTuple_GET_ITEM(keys, j));
      if (value == nullptr) {
        if (PyErr_Occurred()) return nullptr;
        continue;
      }
      int64_t at = 1;
      if (THPVariable_Check(value)) {
        const at::Tensor& t = THPVariable_Unpack(value);
        if (t.has_storage()) at = reinterpret_cast<int64_t>(t.data_ptr());
      }
      out[i * k + j] = at;
    }
  }
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(out.data()),
                                   static_cast<Py_ssize_t>(out.size() * sizeof(int64_t)));
}

PyMethodDef methods[] = {
    {"fingerprint", fingerprint, METH_O, "(structure, gradient addresses) of a list of parameters"},
    {"state_fingerprint", state_fingerprint, METH_VARARGS, "addresses of the optimizer state entries of parameters"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
// A plain module object: the ops are registered by the static initializers below,
// so importing sam_kernels._C is all Python has to do (no pybind11 needed).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

// found_inf / grad_scale in the updates: device fp32 scalars (no host read). found_inf != 0 skips
// the update: params get olds back (SAM), or the rank-1 term removed (nuSAM), or nothing (SAMPa),
// and no state is written. grad_scale multiplies the gradient (GradScaler's 1 / scale times the
// clipping coefficient). state_steps: one fp32 device scalar per parameter, its Adam step count
// for this update (the bias corrections are computed from it in the kernel).
TORCH_LIBRARY(sam_kernels, m) {
  // sqrt(sum_i ||w_i * t_i||^2) with w_i = |weights_i| + offset (or 1 when weights is empty).
  m.def("global_norm(Tensor[] tensors, Tensor[] weights, float offset) -> Tensor");
  // The guard of a step. n = ||grads|| (of (1 - lam) grads + lam grads2 when grads2 is given);
  // flags (fp32[4]) <- [found_inf, grad_scale, grad_norm, skipped + found_inf] with
  // found_inf = n, prior (any element) not finite or found_inf != 0, grad_scale = inv * min(1,
  // max_norm / (n inv + 1e-6)) with inv = 1 / scale (1 without one), grad_norm = n inv;
  // steps += (1 - found_inf) * steps_mask (Adam's step counters, advanced only when taken).
  m.def(
      "check_grads_(Tensor[] grads, Tensor[] grads2, float lam, Tensor(a!) flags, Tensor? prior, Tensor? scale, "
      "Tensor? found_inf, float max_norm, Tensor(b!)? steps, Tensor? steps_mask) -> ()");
  // olds <- params; params <- params + s * w^2 * grads, s = rho / (norm + 1e-12),
  // and params untouched when norm is not finite.
  m.def(
      "perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] olds, Tensor norm, "
      "float rho, bool adaptive, float offset) -> ()");
  // params <- olds, bit for bit; with found_inf, only when found_inf == 0 (a conditional commit).
  m.def("restore_(Tensor(a!)[] params, Tensor[] olds, Tensor? found_inf=None) -> ()");
  // params <- olds, then one torch.optim.SGD step with grads; bufs are the momentum buffers.
  m.def(
      "restore_sgd_(Tensor(a!)[] params, Tensor[] olds, Tensor[] grads, Tensor(b!)[] bufs, "
      "float lr, float momentum, float dampening, bool nesterov, float weight_decay, "
      "bool maximize, bool init_bufs, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // params <- olds, then one torch.optim.Adam / AdamW step.
  m.def(
      "restore_adam_(Tensor(a!)[] params, Tensor[] olds, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor[] state_steps, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, bool decoupled, bool amsgrad, bool maximize, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");

  // SAMPa. perturbed <- params + s * grads (s = rho / (norm + 1e-12)) and previews <- the base
  // step from params with grads; the state lists are read only. A non-finite norm stands for a
  // gradient that must not be used: perturbed <- params and the preview takes a zero gradient.
  m.def(
      "sampa_preview_sgd_(Tensor[] params, Tensor[] grads, Tensor(a!)[] perturbed, Tensor(b!)[] previews, "
      "Tensor[] bufs, Tensor norm, float rho, float lr, float momentum, float dampening, bool nesterov, "
      "float weight_decay, bool maximize, bool init_bufs) -> ()");
  // The preview of an Adam step: state_steps are the counts before it (it previews count + 1).
  m.def(
      "sampa_preview_adam_(Tensor[] params, Tensor[] grads, Tensor(a!)[] perturbed, Tensor(b!)[] previews, "
      "Tensor[] exp_avgs, Tensor[] exp_avg_sqs, Tensor[] max_exp_avg_sqs, Tensor[] state_steps, Tensor norm, "
      "float rho, float lr, float beta1, float beta2, float eps, float weight_decay, bool decoupled, bool amsgrad, "
      "bool maximize) -> ()");
  // The base step from params with d = (1 - lam) * grads + lam * grads2, in one pass.
  m.def(
      "sampa_update_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor[] grads2, Tensor(b!)[] bufs, float lam, "
      "float lr, float momentum, float dampening, bool nesterov, float weight_decay, bool maximize, "
      "bool init_bufs, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "sampa_update_adam_(Tensor(a!)[] params, Tensor[] grads, Tensor[] grads2, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor[] state_steps, float lam, float lr, "
      "float beta1, float beta2, float eps, float weight_decay, bool decoupled, bool amsgrad, bool maximize, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");

  // nuSAM (rank-1 perturbations of weight matrices). mats are 2-D (n_i x m_i); us, vs fp32.
  // T power iterations warm-started from us: v = G^T u / (|G^T u| + tau), u = G v / (|G v| + tau).
  m.def(
      "power_iteration_(Tensor[] mats, Tensor(a!)[] us, Tensor(b!)[] vs, Tensor(c!) sigmas, int iters, "
      "float tau) -> ()");
  // nuSAM's scales (fp32 vectors of k): scales_i = every sigma finite ? (normalized_i != 0 ?
  // rho_i sigma_i / (sqrt(sum of the normalized sigma_j^2) + 1e-12) : rho_i) : 0; prior = sum of
  // the sigmas (not finite iff one is not).
  m.def(
      "rank1_scales_(Tensor sigmas, Tensor rho, Tensor normalized, Tensor(a!) scales, Tensor(b!) prior) -> ()");
  // M_i <- M_i + scales[i] * u_i v_i^T (scales: fp32 on the device; 0 leaves M_i untouched).
  m.def("rank1_update_(Tensor(a!)[] mats, Tensor[] us, Tensor[] vs, Tensor scales) -> ()");
  // M <- M - s u v^T, then the SGD / Adam step of restore_sgd_ / restore_adam_, in one pass.
  m.def(
      "rank1_restore_sgd_(Tensor(a!)[] params, Tensor[] us, Tensor[] vs, Tensor scales, Tensor[] grads, "
      "Tensor(b!)[] bufs, float lr, float momentum, float dampening, bool nesterov, float weight_decay, "
      "bool maximize, bool init_bufs, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "rank1_restore_adam_(Tensor(a!)[] params, Tensor[] us, Tensor[] vs, Tensor scales, Tensor[] grads, "
      "Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor[] state_steps, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, bool decoupled, bool amsgrad, "
      "bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");

  // Private, for the optimizers' step plans (table.cpp): a launch table built once, and a launch
  // of a kernel over it with scalars only. Not traceable (the table hides what is written): the
  // plans use them in eager mode only, and the list ops above under torch.compile.
  m.def("_table(Tensor[] tensors, int n_lists, int[] values) -> (Tensor, int[])");
  m.def("_launch(str kernel, Tensor? table, int[] meta, float[] scalars, int[] options, Tensor?[] args, "
        "Tensor?[] device_scalars) -> ()");
}
