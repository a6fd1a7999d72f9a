// The module sam_kernels._C: the operator schemas of torch.ops.sam_kernels.* (from the
// declarations: generated/primitives.h), and the C loops a step plan's key takes (fingerprint,
// state_fingerprint). The list ops are in ops.cpp (one boxed entry point for both devices), the
// kernels in cpu/ and cuda/, the launch helper they share in table.h; fake (meta)
// implementations in sam_kernels/ops/extension.py.
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <unordered_map>
#include <vector>

#include "generated/primitives.h"

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
// (state is torch.optim's defaultdict: nothing here calls __missing__). The parameters are found
// by identity, as a dict keyed by tensors finds them (Tensor.__hash__ is id()), from one pass over
// the state: a dict lookup would call Tensor.__hash__, a Python method, once per parameter.
PyObject* state_fingerprint(PyObject*, PyObject* args) {
  PyObject *state, *params, *keys;
  if (!PyArg_ParseTuple(args, "O!O!O!", &PyDict_Type, &state, &PyList_Type, &params, &PyTuple_Type, &keys)) {
    return nullptr;
  }
  const Py_ssize_t n = PyList_GET_SIZE(params), k = PyTuple_GET_SIZE(keys);
  std::vector<int64_t> out(n * k, 0);
  // The state's entries in its order (borrowed: state holds them). Usually that is the parameters'
  // order (the base step creates them in it): then entry i is parameter i's, else a map finds it.
  std::vector<std::pair<PyObject*, PyObject*>> items;
  items.reserve(static_cast<size_t>(PyDict_GET_SIZE(state)));
  Py_ssize_t pos = 0;
  PyObject *key, *value;
  while (PyDict_Next(state, &pos, &key, &value)) items.emplace_back(key, value);
  std::unordered_map<PyObject*, PyObject*> by_key;  // built only when the orders differ
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* p = PyList_GET_ITEM(params, i);
    PyObject* entry = nullptr;
    if (static_cast<size_t>(i) < items.size() && items[i].first == p) {
      entry = items[i].second;
    } else {
      if (by_key.empty()) by_key.insert(items.begin(), items.end());
      const auto found = by_key.find(p);
      if (found != by_key.end()) entry = found->second;
    }
    if (entry == nullptr || !PyDict_Check(entry)) continue;
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

// The operators' schemas, from their declarations (sam_kernels/ops/primitives.py, compiled into
// generated/primitives.h: what each one reads and writes, with alias annotations so that
// functionalization and torch.compile know what it mutates; the docs are the declarations').
TORCH_LIBRARY(sam_kernels, m) {
  for (int i = 0; i < sam_kernels::decl::kNumPrimitives; ++i) {
    const auto& d = sam_kernels::decl::kPrimitives[i];
    if (!d.internal) m.def(d.schema);
  }
  // Private, for the optimizers' step plans (table.cpp): a launch table built once (an absent
  // optional list as Nones), and a launch of a kernel over it with scalars only. Not traceable
  // (the table hides what is written): the plans use them in eager mode only, and the list ops
  // above under torch.compile.
  m.def("_table(Tensor?[] tensors, int n_lists, int[] values) -> (Tensor, int[])");
  m.def("_launch(str kernel, Tensor? table, int[] meta, float[] scalars, int[] options, Tensor?[] args, "
        "Tensor?[] device_scalars) -> ()");
}
