// The launch helper (table.h): the runner registry, table construction, the argument checks of
// every list op, and the two private ops of the optimizers' step plans:
//   _table(Tensor[] tensors, int n_lists, int[] values) -> (Tensor table, int[] meta)
//   _launch(str kernel, Tensor? table, int[] meta, float[] scalars, int[] options, Tensor?[] args,
//           Tensor?[] device_scalars)  (device_scalars[i]: read scalars[i] from it when the kernel runs)
// A plan builds its tables once (the addresses of the parameters, gradients and state do not
// change from step to step) and then launches with scalars only: no list of tensors crosses the
// Python / C++ boundary per step.
#include "table.h"

#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>

#include "generated/primitives.h"
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <map>

namespace sam_kernels {
namespace {

std::map<std::pair<std::string, int>, Runner>& registry() {
  static std::map<std::pair<std::string, int>, Runner> r;
  return r;
}

}  // namespace

const at::Tensor& Launch::tensor(size_t i) const {
  TORCH_CHECK(i < args.size() && args[i].has_value(), "sam_kernels: launch argument ", i, " is missing");
  return *args[i];
}

bool register_runner(const char* name, c10::DeviceType type, Runner runner) {
  registry()[{name, static_cast<int>(type)}] = runner;
  return true;
}

Runner find_runner(const std::string& name, c10::DeviceType type) {
  auto it = registry().find({name, static_cast<int>(type)});
  TORCH_CHECK(it != registry().end(), "sam_kernels: no ", c10::DeviceTypeName(type), " kernel named '", name, "'");
  return it->second;
}

at::Tensor make_table(
    const std::vector<at::TensorList>& lists, const std::vector<int64_t>& index,
    const std::vector<std::vector<int64_t>>& values, const at::Device& device, int64_t* n_chunks) {
  const int64_t n = static_cast<int64_t>(index.size());
  const int64_t chunk = chunk_size(device.type());
  std::vector<int64_t> host;
  host.reserve((lists.size() + 1 + values.size()) * n + 2 * n);
  for (const auto& list : lists) {  // an absent optional list keeps its slot: null pointers
    for (int64_t i : index) host.push_back(list.empty() ? 0 : reinterpret_cast<int64_t>(list[i].data_ptr()));
  }
  const auto& first = lists.front();
  for (int64_t i : index) host.push_back(first[i].numel());
  for (const auto& column : values) {
    for (int64_t i : index) host.push_back(column[i]);
  }
  int64_t chunks = 0;
  for (int64_t k = 0; k < n; ++k) {
    const int64_t numel = first[index[k]].numel();
    for (int64_t b = 0; b < numel; b += chunk) {
      host.push_back(k);
      host.push_back(b);
      ++chunks;
    }
  }
  *n_chunks = chunks;
  const auto size = static_cast<int64_t>(host.size());
  if (device.is_cpu()) {
    auto table = at::empty({size}, at::TensorOptions().dtype(at::kLong));
    std::memcpy(table.data_ptr<int64_t>(), host.data(), host.size() * sizeof(int64_t));
    return table;
  }
  // one asynchronous copy from pinned memory (the caching host allocator keeps the block until
  // the copy is done): building a table never waits for the device
  auto pinned = at::empty({size}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(pinned.data_ptr<int64_t>(), host.data(), host.size() * sizeof(int64_t));
  return pinned.to(device, /*non_blocking=*/true);
}

void check_device_scalar(const char* op, const char* name, const std::optional<at::Tensor>& t, const at::Device& device,
                         int64_t numel, bool allow_f64) {
  if (!t.has_value()) return;
  const bool dtype_ok = t->scalar_type() == at::kFloat || (allow_f64 && t->scalar_type() == at::kDouble);
  const std::string kind = allow_f64 ? "float32 or float64" : "float32";
  TORCH_CHECK(
      t->device() == device && dtype_ok && t->numel() == numel && t->is_contiguous(), op, ": ",
      name, " must be ", numel == 1 ? "one " + kind + " value" : "a contiguous " + kind + " tensor of " +
      std::to_string(numel) + " values", " on ", device, ", got ", t->scalar_type(), " of ", t->numel(),
      " values on ", t->device());
}

namespace {

void check_named(const char* op, const NamedList& nl, at::TensorList params, const at::Device& device) {
  const auto& list = nl.list;
  TORCH_CHECK(
      list.size() == params.size(), op, ": '", nl.name, "' has ", list.size(), " tensors, params has ",
      params.size());
  for (size_t i = 0; i < list.size(); ++i) {
    const auto& t = list[i];
    TORCH_CHECK(t.device() == device, op, ": ", nl.name, "[", i, "] is on ", t.device(), ", expected ", device);
    switch (nl.kind) {
      case ListKind::kElements:
        TORCH_CHECK(t.is_contiguous(), op, ": ", nl.name, "[", i, "] must be contiguous");
        TORCH_CHECK(
            t.numel() == params[i].numel(), op, ": ", nl.name, "[", i, "] has ", t.numel(), " elements, params[", i,
            "] has ", params[i].numel());
        TORCH_CHECK(
            t.scalar_type() == params[i].scalar_type(), op, ": ", nl.name, "[", i, "] is ", t.scalar_type(),
            ", params[", i, "] is ", params[i].scalar_type());
        break;
      case ListKind::kScalars:
        TORCH_CHECK(
            t.numel() == 1 && t.scalar_type() == at::kFloat, op, ": ", nl.name, "[", i,
            "] must be one float32 value, got ", t.scalar_type(), " of ", t.numel(), " values");
        break;
      case ListKind::kVectors:
        TORCH_CHECK(
            t.scalar_type() == at::kFloat && t.is_contiguous(), op, ": ", nl.name, "[", i,
            "] must be a contiguous float32 vector");
        break;
    }
  }
}

}  // namespace

std::vector<at::TensorList> checked_lists(const char* op, c10::DeviceType type, const std::vector<NamedList>& lists) {
  const at::TensorList params = lists.front().list;
  std::vector<at::TensorList> out;
  if (params.empty()) return out;
  const auto device = params[0].device();
  TORCH_CHECK(device.type() == type, op, ": expected ", c10::DeviceTypeName(type), " tensors, got ", device);
  for (const auto& nl : lists) {
    if (&nl != &lists.front() && nl.list.empty()) {  // an absent optional list: its slot stays (null)
      out.push_back(at::TensorList());
      continue;
    }
    check_named(op, nl, params, device);
    out.push_back(nl.list);
  }
  return out;
}

std::vector<std::pair<at::ScalarType, std::vector<int64_t>>> dtype_groups(at::TensorList params) {
  std::vector<std::pair<at::ScalarType, std::vector<int64_t>>> groups;
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].numel() == 0) continue;
    const auto st = params[i].scalar_type();
    auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == st; });
    if (it == groups.end()) {
      groups.push_back({st, {static_cast<int64_t>(i)}});
    } else {
      it->second.push_back(static_cast<int64_t>(i));
    }
  }
  return groups;
}

void run_lists(
    const char* op, const char* kernel, c10::DeviceType type, std::vector<NamedList> lists,
    std::vector<std::vector<int64_t>> values, std::vector<double> scalars, std::vector<int64_t> options,
    std::vector<std::optional<at::Tensor>> args) {
  const at::TensorList params = lists.front().list;
  if (params.empty()) return;
  const auto checked = checked_lists(op, type, lists);
  for (const auto& column : values) {
    TORCH_CHECK(column.size() == params.size(), op, ": a value column has ", column.size(), " entries");
  }
  const auto device = params[0].device();
  const Runner runner = find_runner(kernel, type);
  const c10::DeviceGuard guard(device);
  for (const auto& [dtype, index] : dtype_groups(params)) {
    Launch l;
    int64_t n_chunks = 0;
    const at::Tensor table = make_table(checked, index, values, device, &n_chunks);  // alive until enqueued
    l.table = TableView{table.data_ptr<int64_t>(), static_cast<int64_t>(checked.size()),
                        static_cast<int64_t>(index.size()), static_cast<int64_t>(values.size()), n_chunks,
                        chunk_size(type)};
    l.dtype = dtype;
    l.device = device;
    l.scalars = scalars;
    l.options = options;
    l.args = args;
    runner(l);
  }
}

namespace {

// tensors: n_lists lists of n each, an absent optional list as n Nones (its slot stays, null).
std::tuple<at::Tensor, std::vector<int64_t>> table_op(const c10::List<std::optional<at::Tensor>>& tensors,
                                                      int64_t n_lists, at::IntArrayRef values) {
  TORCH_CHECK(n_lists >= 1 && tensors.size() > 0 && tensors.size() % n_lists == 0,
              "_table: ", tensors.size(), " tensors do not make ", n_lists, " lists");
  const int64_t n = static_cast<int64_t>(tensors.size()) / n_lists;
  TORCH_CHECK(static_cast<int64_t>(values.size()) % n == 0, "_table: values must hold whole columns of ", n);
  std::vector<std::vector<at::Tensor>> storage(n_lists);
  for (int64_t l = 0; l < n_lists; ++l) {
    const bool absent = !tensors.get(l * n).has_value();
    for (int64_t i = 0; i < n && !absent; ++i) {
      const std::optional<at::Tensor> t = tensors.get(l * n + i);
      TORCH_CHECK(t.has_value(), "_table: list ", l, " mixes tensors and Nones");
      storage[l].push_back(*t);
    }
  }
  TORCH_CHECK(!storage[0].empty(), "_table: the first list cannot be absent");
  const auto device = storage[0][0].device();
  std::vector<at::TensorList> lists;
  for (const auto& s : storage) {
    for (const auto& t : s) {
      TORCH_CHECK(t.device() == device, "_table: tensors on ", device, " and ", t.device());
    }
    lists.emplace_back(s);
  }
  std::vector<std::vector<int64_t>> columns;
  for (size_t c = 0; c < values.size() / n; ++c) columns.emplace_back(values.begin() + c * n, values.begin() + (c + 1) * n);
  std::vector<int64_t> index(n);
  for (int64_t i = 0; i < n; ++i) index[i] = i;
  int64_t n_chunks = 0;
  auto table = make_table(lists, index, columns, device, &n_chunks);
  return {table, {n_lists, n, static_cast<int64_t>(columns.size()), n_chunks,
                  static_cast<int64_t>(storage[0][0].scalar_type()), chunk_size(device.type())}};
}

// Whether `kernel` reads scalar `slot` on the device (its declaration's device_scalars): a device
// scalar given for a slot no kernel reads must not be ignored.
bool reads_device_scalar(const std::string& kernel, size_t slot) {
  for (int i = 0; i < decl::kNumPrimitives; ++i) {
    if (kernel == decl::kPrimitives[i].name) return (decl::kPrimitives[i].device_scalars >> slot) & 1;
  }
  return false;
}

void launch_op(const std::string& kernel, const std::optional<at::Tensor>& table, at::IntArrayRef meta,
               at::ArrayRef<double> scalars, at::IntArrayRef options, const c10::List<std::optional<at::Tensor>>& args,
               const c10::List<std::optional<at::Tensor>>& device_scalars) {
  Launch l;
  std::optional<at::Device> device;
  if (table.has_value()) {
    TORCH_CHECK(meta.size() == 6, "_launch: meta is (n_lists, n_tensors, n_values, n_chunks, dtype, chunk)");
    l.table = TableView{table->data_ptr<int64_t>(), meta[0], meta[1], meta[2], meta[3], meta[5]};
    l.dtype = static_cast<at::ScalarType>(meta[4]);
    device = table->device();
  }
  for (const auto& a : args) {
    std::optional<at::Tensor> t = a;
    if (t.has_value() && !device.has_value()) device = t->device();
    l.args.push_back(std::move(t));
  }
  TORCH_CHECK(device.has_value(), "_launch: no tensor tells the device");
  l.device = *device;
  l.scalars.assign(scalars.begin(), scalars.end());
  l.options.assign(options.begin(), options.end());
  TORCH_CHECK(device_scalars.size() <= l.scalars.size(), "_launch: ", device_scalars.size(), " device scalars for ",
              l.scalars.size(), " scalars");
  for (size_t i = 0; i < device_scalars.size(); ++i) {
    const std::optional<at::Tensor> t = device_scalars.get(i);
    if (!t.has_value()) continue;
    TORCH_CHECK(t->device() == l.device && t->scalar_type() == at::kFloat && t->numel() == 1,
                "_launch: device_scalars[", i, "] must be one fp32 value on ", l.device, ", got ", t->scalar_type(),
                " of ", t->numel(), " values on ", t->device());
    if (l.device.is_cpu()) {
      l.scalars[i] = *t->const_data_ptr<float>();  // host memory: read now, no synchronization
    } else {
      TORCH_CHECK(reads_device_scalar(kernel, i), "_launch: kernel ", kernel, " does not read scalar ", i,
                  " on the device");
      l.dev.resize(std::max(l.dev.size(), i + 1), nullptr);
      l.dev[i] = t->const_data_ptr<float>();
    }
  }
  const c10::DeviceGuard guard(l.device);
  find_runner(kernel, l.device.type())(l);
}

}  // namespace
}  // namespace sam_kernels

TORCH_LIBRARY_IMPL(sam_kernels, CPU, m) {
  m.impl("_table", &sam_kernels::table_op);
  m.impl("_launch", &sam_kernels::launch_op);
}

#ifdef SAM_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(sam_kernels, CUDA, m) {
  m.impl("_table", &sam_kernels::table_op);
  m.impl("_launch", &sam_kernels::launch_op);
}
#endif
