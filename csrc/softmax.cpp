// The softmax family's forward on the CPU along the last dim: softmax, log-softmax and softmin —
// the CPU path of mmkernels.ops.softmax for contiguous float32 / float64 rows. Every other layout
// and dtype, and the backward, run ATen's kernels: versions of this file that also did them
// measured slower there (a fused backward 0.66–0.92x ATen's, a middle-dim forward 0.74–0.88x,
// bfloat16 0.89–1.06x, float16 0.6x), so they are not kept.
//
// Registered as mmkernels_cpu::softmax_forward; loaded by mmkernels/_cpp.py.
//
// One row of N at a time, read from memory once: the max pass brings it into cache (rows up to a
// few hundred KB stay in L2), the exp pass and the final scaling (or the log-softmax subtraction)
// run on the cached row; y is written once. Rows in parallel over ATen's threads; each element
// has one writer and every sum runs in a fixed order whatever the thread count: bitwise-identical
// reruns.
//
// Math in the input's precision. exp: float rows use a degree-7 polynomial after a Cody–Waite reduction (relative error ~1e-7, as csrc/router_simd.h),
// double rows std::exp. The loops are written for the compiler to vectorise and compiled for
// x86-64-v4 (AVX-512), v3 (AVX2) and the baseline with target_clones, picked when the library
// loads (other architectures build the baseline only).
//
// Special values as torch: a row holding NaN or +inf, or only -inf, is NaN throughout; -inf
// entries of other rows give 0 (softmax) / -inf (log-softmax). Softmin is softmax of -x.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "vec_math.h"

namespace mmkernels {
namespace {

enum Kind : int64_t { kSoftmax = 0, kLogSoftmax = 1, kSoftmin = 2 };


// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// One row of N: y = kind(x), in T's own precision (float or double).
template <typename T>
MMK_INLINE void forward_row(const T* x, T* y, int64_t N, Kind kind) {
  const T sign = kind == kSoftmin ? T(-1) : T(1);
  const T inf = std::numeric_limits<T>::infinity();
  T m = -inf;
  int bad = 0;  // NaN or +inf (after the sign) anywhere: the whole row is NaN, as torch
#pragma omp simd reduction(max : m) reduction(| : bad)
  for (int64_t i = 0; i < N; ++i) {
    const T v = sign * x[i];
    m = v > m ? v : m;
    bad |= !(v < inf);
  }
  if (bad || m == -inf) {
    std::fill(y, y + N, std::numeric_limits<T>::quiet_NaN());
    return;
  }
  T s = 0;
  if (kind == kLogSoftmax) {
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < N; ++i) s += exp_np(x[i] - m);
    const T shift = m + std::log(s);
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) y[i] = x[i] - shift;
    return;
  }
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < N; ++i) {
    const T e = exp_np(sign * x[i] - m);
    y[i] = e;
    s += e;
  }
  const T inv = T(1) / s;
#pragma omp simd
  for (int64_t i = 0; i < N; ++i) y[i] *= inv;
}

template <typename T>
MMK_CLONES void forward_rows(const T* x, T* y, int64_t rows, int64_t N, int64_t kind) {
  for (int64_t r = 0; r < rows; ++r) forward_row<T>(x + r * N, y + r * N, N, Kind(kind));
}

// Elements a task should hold: fewer tasks than this cost more in scheduling than they save.
constexpr int64_t kGrainElems = 32768;

void check(bool ok, const char* what) { TORCH_CHECK(ok, "mmkernels_cpu softmax_forward: ", what); }

}  // namespace

// y = kind(x) along its last dim: x a contiguous float32 / float64 CPU tensor, y in its dtype (the
// Python side routes every other case to ATen).
at::Tensor softmax_forward(const at::Tensor& x, int64_t kind) {
  check(x.device().is_cpu() && x.is_contiguous() && x.dim() >= 1, "x must be a contiguous CPU tensor");
  check(kind >= 0 && kind <= 2, "kind must be 0 (softmax), 1 (log-softmax) or 2 (softmin)");
  check(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "x must be float32 or float64");
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  const int64_t N = x.size(-1), rows = x.numel() / N;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "softmax_forward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / N), [&](int64_t r0, int64_t r1) {
      forward_rows<scalar_t>(xp + r0 * N, yp + r0 * N, r1 - r0, N, kind);
    });
  });
  return y;
}

}  // namespace mmkernels

TORCH_LIBRARY_FRAGMENT(mmkernels_cpu, m) {
  m.def("softmax_forward(Tensor x, int kind) -> Tensor");
}

TORCH_LIBRARY_IMPL(mmkernels_cpu, CPU, m) {
  m.impl("softmax_forward", &mmkernels::softmax_forward);
}
