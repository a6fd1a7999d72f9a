// Multi-tensor work on the CPU: the chunks of a table (table.h; never more than one tensor per
// chunk) spread over threads by at::parallel_for. Chunk boundaries depend only on the tensor
// sizes, so reductions that combine per-chunk partials in chunk order are deterministic whatever
// the number of threads.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "../common.h"
#include "../generated/primitives.h"
#include "../table.h"

namespace sam_kernels::cpu {

template <typename F>
void for_each_chunk(const TableView& table, const F& f) {
  at::parallel_for(0, table.n_chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) f(table.chunk_ref(c));
  });
}

// The fp32 device scalar args[i] of a launch, read on the host (CPU memory: no synchronization).
inline float read_scalar(const Launch& l, size_t i, float absent) {
  const float* p = l.f32(i);
  return p ? *p : absent;
}

// A scalar argument args[i] of fp32 or fp64 (a norm), read on the host as a double.
inline double read_value(const Launch& l, size_t i, double absent) {
  const ScalarRef r = l.ref(i);
  return r.present() ? r.get() : absent;
}

// Walks the part [begin, end) of a row-major n x m matrix one row run at a time:
// f(first element, row, first column, length). Inner loops over a run are contiguous.
template <typename F>
void for_each_row_run(int64_t begin, int64_t end, int64_t m, const F& f) {
  for (int64_t i = begin; i < end;) {
    const int64_t r = i / m, c = i - r * m, len = std::min(end - i, m - c);
    f(i, r, c, len);
    i += len;
  }
}

// nuSAM's restore without a stored copy: old[j] = x[j] - (s * u[r]) * v[c + j], in opmath,
// for one row run (s == 0: old = x). Feeds the SGD / Adam chunk loops from an L1 block.
constexpr int64_t kRank1Block = 256;

template <typename scalar_t, typename opmath_t>
void rank1_old_block(const scalar_t* x, float su, const float* v, bool active, opmath_t* old, int64_t len) {
  if (!active) {
    for (int64_t j = 0; j < len; ++j) old[j] = static_cast<opmath_t>(x[j]);
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) old[j] = static_cast<opmath_t>(x[j]) - static_cast<opmath_t>(su * v[j]);
}

// Calls f(first element, old block, length) over a whole matrix chunk in blocks of kRank1Block,
// with old computed from the rank-1 term of the chunk's matrix: x the matrix, u, v its vectors,
// ncols its column count, s its scale.
template <typename scalar_t, typename F>
void for_each_rank1_block(const ChunkRef& c, const scalar_t* x, const float* u, const float* v, int64_t ncols, float s,
                          const F& f) {
  using opmath_t = at::opmath_type<scalar_t>;
  opmath_t old[kRank1Block];
  for_each_row_run(c.begin, c.end, ncols, [&](int64_t i, int64_t r, int64_t col, int64_t len) {
    for (int64_t b = 0; b < len; b += kRank1Block) {
      const int64_t n = std::min(kRank1Block, len - b);
      rank1_old_block<scalar_t, opmath_t>(x + i + b, s * u[r], v + col + b, s != 0.f, old, n);
      f(i + b, static_cast<const opmath_t*>(old), n);
    }
  });
}

// The perturbation's scale rho / (norm + eps) (0 for a non-finite norm): in fp32 like the GPU
// kernels for an fp32 norm, in fp64 for the fp64 norm of fp64 tensors.
template <typename Norm>
double norm_scale(const Launch& l, Norm norm, double rho, bool& finite) {
  const double nv = read_value(l, norm, 0.0);
  finite = std::isfinite(nv);
  if (!finite) return 0.0;
  if (l.ref(norm).f64) return rho / (nv + kNormEps);
  return static_cast<float>(rho) / (static_cast<float>(nv) + static_cast<float>(kNormEps));
}

// x + s * d in opmath, rounded to the weights' type: shift_'s move (MSAM), and its way back as the
// fused updates recompute it (the same rounding, so either path gives the same x_t).
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
inline scalar_t shifted(scalar_t x, scalar_t d, opmath_t s) {
  return static_cast<scalar_t>(static_cast<opmath_t>(x) + s * static_cast<opmath_t>(d));
}

template <typename scalar_t>
void shift_chunk(scalar_t* __restrict__ x, const scalar_t* __restrict__ d, double scale, int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t s = static_cast<opmath_t>(scale);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = shifted<scalar_t>(x[i], d[i], s);
}

#define SAM_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// x <- old, converted: all a skipped fused update writes (the weights get x_t back).
template <typename scalar_t, typename old_t>
void copy_chunk(scalar_t* x, const old_t* old, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = static_cast<scalar_t>(old[i]);
}

// The skeleton of a fused update of declaration P that restores x (P::params) from P::x_old first:
// per chunk, x <- old if the step is skipped, else body(chunk, x, old, n) with the launch's dtype
// as scalar_t (the dtypes were checked when the table was built: the dispatch's name never shows).
template <class P, typename Body>
void for_each_restore_chunk(const Launch& l, bool skip, const Body& body) {
  for_each_chunk(l.table, [&](const ChunkRef& c) {
    SAM_DISPATCH_FLOATING(l.dtype, "fused update", [&] {
      scalar_t* x = l.table.ptr<scalar_t>(P::params, c.tensor) + c.begin;
      const scalar_t* old = l.table.ptr<const scalar_t>(P::x_old, c.tensor) + c.begin;
      const int64_t n = c.end - c.begin;
      if (skip) return copy_chunk(x, old, n);
      body(c, x, old, n);
    });
  });
}

// The skeleton of MSAM's fused update (declaration P) that first moves x back along the state list
// `direction` (SGD's bufs, Adam's exp_avgs) by s = rho / (norm + eps): per chunk, the move back
// only if the step is skipped, else body(chunk, x, d, n, shift, moved), where moved is false for
// a non-finite norm (x was not moved, so the update steps from x as it is).
template <class P, typename Body>
void for_each_shift_chunk(const Launch& l, size_t direction, bool skip, const Body& body) {
  bool moved = false;
  const double shift = norm_scale(l, P::norm, l.s(P::rho), moved);
  for_each_chunk(l.table, [&](const ChunkRef& c) {
    SAM_DISPATCH_FLOATING(l.dtype, "fused update", [&] {
      scalar_t* x = l.table.ptr<scalar_t>(P::params, c.tensor) + c.begin;
      scalar_t* d = l.table.ptr<scalar_t>(direction, c.tensor) + c.begin;
      const int64_t n = c.end - c.begin;
      if (skip) {
        if (moved) shift_chunk(x, d, shift, n);
        return;
      }
      body(c, x, d, n, shift, moved);
    });
  });
}

// The skeleton of SAMPa's update (declaration P) from x with the gradients P::grads, P::grads2:
// nothing when the step is skipped, else body(chunk, x, g, g2, n) with the launch's dtype as scalar_t.
template <class P, typename Body>
void for_each_mix_chunk(const Launch& l, bool skip, const Body& body) {
  if (skip) return;
  for_each_chunk(l.table, [&](const ChunkRef& c) {
    SAM_DISPATCH_FLOATING(l.dtype, "fused update", [&] {
      scalar_t* x = l.table.ptr<scalar_t>(P::params, c.tensor) + c.begin;
      const scalar_t* g = l.table.ptr<const scalar_t>(P::grads, c.tensor) + c.begin;
      const scalar_t* g2 = l.table.ptr<const scalar_t>(P::grads2, c.tensor) + c.begin;
      body(c, x, g, g2, c.end - c.begin);
    });
  });
}

}  // namespace sam_kernels::cpu
