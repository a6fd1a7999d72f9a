// The declarations of the primitives as C++ reads them (their source: sam_kernels/ops/primitives.py;
// csrc/generated/primitives.h holds one entry per primitive and the enums its kernels read their
// arguments by). The generic list op (ops.cpp) walks a declaration to take its arguments off the
// dispatcher's stack, check them and build the launch; sam_kernels.cpp registers the schemas.
#pragma once
#include <cstring>

#include "table.h"  // ListKind

namespace sam_kernels::decl {

// What an argument of a schema is: a tensor list, a device tensor, a float scalar, a bool / int option.
enum class Cat : int { kList, kTensor, kScalar, kOption };

// What a device tensor must be (primitives.py TENSOR_KINDS): one fp32 value; one fp32 or fp64 value
// (a norm); an fp32 vector (checked with its lists); anything (an entry of its own checks it).
enum class TensorKind : int { kScalar, kNorm, kVector, kAny };

// Checks beyond the kinds (bits).
constexpr int kCheckRank1 = 1;  // nuSAM: us / vs / scales fit the matrices (common.h check_rank1_args)

// How a per-tensor value column is computed from the first list (nuSAM's matrices).
enum class ValueRule : int { kNone, kRows, kCols, kIndex };

// "an optional list is present only when argument `param` (a scalar or an option) is nonzero"
// (negate: zero); every condition of a list must hold.
struct Condition {
  int param;
  bool negate;
};

struct ParamDecl {
  const char* name;
  Cat cat;
  int index;      // within its category (the L / S / O / T enum value)
  ListKind kind;  // for a list: what its tensors are
  TensorKind tensor_kind;  // for a device tensor: what it must be
  bool written;
  int n_conditions;  // for a list: when it is present (0: always)
  Condition conditions[3];
};

struct PrimitiveDecl {
  const char* name;
  const char* schema;
  bool generic;   // its list op is ops.cpp's boxed one
  bool internal;  // a kernel of the step plans only: no operator
  bool cuda;      // it has a CUDA C++ kernel
  int n_params;
  const ParamDecl* params;
  int n_lists, n_scalars, n_options, n_tensors, n_values;
  const ValueRule* values;
  int device_scalars;  // bit i: scalar i may be given as an fp32 device scalar (capturable steps)
  int checks;          // kCheck* bits
};

}  // namespace sam_kernels::decl
