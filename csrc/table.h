// The multi-tensor launch helper shared by every CPU and CUDA kernel (the pattern of ATen's
// MultiTensorApply and apex, with the work table in device memory so that one launch covers any
// number of tensors, and so that a table can be built once and launched many times).
//
// A table is an int64 tensor on the device of the tensors it describes, for n tensors of one
// dtype, L pointer lists and V integer columns:
//   [0, L n)                  data pointers: list l, tensor t at l * n + t
//   [L n, (L + 1) n)          element counts of list 0 (the elements a kernel walks)
//   [(L + 1) n, (L + 1 + V) n)   V per-tensor integer columns (nuSAM: the column count of a matrix)
//   then n_chunks pairs (tensor, first element): the unit of work (a CPU task, a CUDA block)
// Every kernel is a runner taking a Launch (the table, the dtype, and its scalars, options and
// device tensors in an order its file states); the list ops of the schema build the table for
// each call, and the optimizers' step plans build it once and call torch.ops.sam_kernels._launch.
#pragma once
#include <ATen/core/Tensor.h>  // (not ATen/ATen.h: see common.h)

#include <optional>
#include <string>
#include <vector>

#if defined(__CUDACC__)
#define SAM_HD __host__ __device__ __forceinline__
#else
#define SAM_HD inline
#endif

namespace sam_kernels {

// Elements per unit of work: large enough that per-unit overhead vanishes, small enough to
// spread a ViT-sized list (~150 tensors of very different sizes) over the threads / SMs.
constexpr int64_t kCpuChunk = 1 << 15;
constexpr int64_t kCudaChunk = 1 << 16;

inline int64_t chunk_size(c10::DeviceType type) {
  return type == c10::DeviceType::CUDA ? kCudaChunk : kCpuChunk;
}

struct ChunkRef {
  int64_t tensor;
  int64_t begin;
  int64_t end;
  int64_t index = 0;  // the chunk's position in the table (a reduction's partial slot)
};

// A view of a table, passed by value to CUDA kernels.
struct TableView {
  const int64_t* data = nullptr;
  int64_t n_lists = 0, n_tensors = 0, n_values = 0, n_chunks = 0, chunk = 0;

  template <typename T>
  SAM_HD T* ptr(int64_t list, int64_t t) const {
    return reinterpret_cast<T*>(data[list * n_tensors + t]);
  }
  SAM_HD int64_t numel(int64_t t) const { return data[n_lists * n_tensors + t]; }
  SAM_HD int64_t value(int64_t column, int64_t t) const { return data[(n_lists + 1 + column) * n_tensors + t]; }
  SAM_HD ChunkRef chunk_ref(int64_t c) const {
    const int64_t* chunks = data + (n_lists + 1 + n_values) * n_tensors;
    const int64_t t = chunks[2 * c], b = chunks[2 * c + 1], n = numel(t);
    return {t, b, b + chunk < n ? b + chunk : n, c};
  }
};

// A device scalar argument that is fp32, or fp64 where the norms of fp64 tensors are kept in
// their precision (sumsq partials, a norm): read where the kernel runs. f64 says which.
struct ScalarRef {
  const void* p = nullptr;
  bool f64 = false;
  SAM_HD bool present() const { return p != nullptr; }
  SAM_HD double get(int64_t i = 0) const {
    return f64 ? static_cast<const double*>(p)[i] : static_cast<double>(static_cast<const float*>(p)[i]);
  }
};

// What a runner gets: the table, the dtype of its element lists, and the kernel's arguments.
struct Launch {
  TableView table;
  at::ScalarType dtype = at::kFloat;
  at::Device device = at::kCPU;
  std::vector<double> scalars;
  std::vector<int64_t> options;
  std::vector<std::optional<at::Tensor>> args;
  // Capturable steps: scalars[i] read from this fp32 device scalar when the kernel runs (lr, rho
  // change between replays of a CUDA graph). CPU launches get the value in scalars instead.
  std::vector<const float*> dev;

  double s(size_t i) const { return scalars.at(i); }
  const float* dev_scalar(size_t i) const { return i < dev.size() ? dev[i] : nullptr; }
  bool flag(size_t i) const { return options.at(i) != 0; }
  // The fp32 device scalar (or vector) args[i], nullptr when absent.
  float* f32(size_t i) const {
    if (i >= args.size() || !args[i].has_value()) return nullptr;
    return args[i]->data_ptr<float>();
  }
  const at::Tensor& tensor(size_t i) const;
  // args[i] as an fp32 or fp64 scalar (or vector); empty when absent.
  ScalarRef ref(size_t i) const {
    if (i >= args.size() || !args[i].has_value()) return {};
    return {args[i]->data_ptr(), args[i]->scalar_type() == at::kDouble};
  }
};

using Runner = void (*)(const Launch&);

// Kernels register themselves by name and device type (static initializers next to them).
bool register_runner(const char* name, c10::DeviceType type, Runner runner);
Runner find_runner(const std::string& name, c10::DeviceType type);

#define SAM_CONCAT_INNER(a, b) a##b
#define SAM_CONCAT(a, b) SAM_CONCAT_INNER(a, b)
#define SAM_RUNNER(name, type, fn) \
  static const bool SAM_CONCAT(sam_runner_registered_, __LINE__) = ::sam_kernels::register_runner(name, type, fn)

// A list argument of a list op: its name (for errors), the tensors, and what they must be.
enum class ListKind {
  kElements,  // n tensors with the numel and dtype of params[i], contiguous, on the device
  kScalars,   // n one-element fp32 tensors on the device (Adam step counters)
  kVectors,   // n contiguous fp32 tensors on the device, any length (nuSAM's u and v)
};
struct NamedList {
  const char* name;
  at::TensorList list;
  ListKind kind = ListKind::kElements;
};

// Checks `lists` (the first is params; empty lists after it are absent optional lists) and
// returns them in order, an absent one as an empty list (its table slot holds null pointers).
std::vector<at::TensorList> checked_lists(const char* op, c10::DeviceType type, const std::vector<NamedList>& lists);

// Indices of params grouped by dtype, in first-seen order; empty tensors (no work) left out.
std::vector<std::pair<at::ScalarType, std::vector<int64_t>>> dtype_groups(at::TensorList params);

// Checks the lists (checked_lists), then runs `kernel` once per dtype group of params. `values`
// are per-tensor integer columns (each with one entry per param). Every list op is this call.
void run_lists(
    const char* op, const char* kernel, c10::DeviceType type, std::vector<NamedList> lists,
    std::vector<std::vector<int64_t>> values, std::vector<double> scalars, std::vector<int64_t> options,
    std::vector<std::optional<at::Tensor>> args);

// Builds the table of `lists` restricted to tensors `index`, on `device`.
at::Tensor make_table(
    const std::vector<at::TensorList>& lists, const std::vector<int64_t>& index,
    const std::vector<std::vector<int64_t>>& values, const at::Device& device, int64_t* n_chunks);

// An optional device scalar argument must be one fp32 value on `device` (or absent); with
// allow_f64 (a norm, a norm's first_norm) fp64 too.
void check_device_scalar(const char* op, const char* name, const std::optional<at::Tensor>& t, const at::Device& device,
                         int64_t numel = 1, bool allow_f64 = false);

}  // namespace sam_kernels
