// The softmax family on the CPU along the last dim: softmax, log-softmax and softmin, forward and
// the fused backward — the CPU path of mmkernels.ops.softmax for contiguous float32 / float64
// rows, and bfloat16 ones (float math; widened as read, narrowed to nearest even as written). On
// the 2-core AVX2 VM the bfloat16 forward measured 1.04-1.23x ATen's and the log-softmax backward
// 1.12-1.15x, but the softmax / softmin backward 0.80-0.88x: the Python side sends only the
// log-softmax backward here. Every other layout and dtype runs ATen's kernels: versions of this
// file that also did them measured slower there (a middle-dim forward 0.74–0.88x, float16 0.6x).
//
// Registered as mmkernels_cpu::softmax_forward / softmax_backward; loaded by mmkernels/_cpp.py.
//
// Forward: one row of N at a time, read from memory once: the max pass brings it into cache (rows
// up to a few hundred KB stay in L2), the exp pass and the final scaling (or the log-softmax
// subtraction) run on the cached row; y is written once. (Streaming y as the backward streams dx
// measured 0.90-0.93x of plain stores on the 2-core AVX2 VM, where the forward is bound by the
// exps, not by memory: not kept.)
//
// Backward (dx = y·(dy - Σ y·dy); log-softmax dy - exp(y)·Σ dy; softmin y·(Σ y·dy - dy)): the
// sum pass brings the row of y and dy into cache, the second makes dx from the cached row. It is
// bound by memory: y and dy read, dx written. When dx is large (kStreamBytes), each block of
// kBlock elements is made in a buffer in L1 and written with non-temporal stores (vec_math.h
// stream_copy): dx's lines are not read before they are written, 3 tensors' traffic instead of 4
// — the lever above ATen's kernel, which the same math at the same traffic could only match.
//
// Rows in parallel over ATen's threads; each element has one writer and every sum runs in a fixed
// order whatever the thread count: bitwise-identical reruns.
//
// Math in the input's precision. exp: float rows use a degree-7 polynomial after a Cody–Waite
// reduction (relative error ~1e-7, as csrc/router_simd.h), double rows std::exp. The loops are
// written for the compiler to vectorise and compiled for x86-64-v4 (AVX-512), v3 (AVX2) and the
// baseline with target_clones, picked when the library loads (other architectures build the
// baseline only).
//
// Special values as torch: a row holding NaN or +inf, or only -inf, is NaN throughout; -inf
// entries of other rows give 0 (softmax) / -inf (log-softmax). Softmin is softmax of -x. The
// backward is the formula's IEEE result, as ATen's (NaN anywhere in a row's sum: the row's dx NaN).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

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

void check(bool ok, const char* what) { TORCH_CHECK(ok, "mmkernels_cpu softmax: ", what); }

// bfloat16 <-> float: the top 16 bits of a float are a bfloat16; narrowing rounds to nearest even
// (NaN stays a quiet NaN of its sign). Written on the raw bits so that the loops vectorise.
MMK_INLINE float widen(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// The float and double rows' loads: already in their math type.
MMK_INLINE float widen(float v) { return v; }
MMK_INLINE double widen(double v) { return v; }

MMK_INLINE uint16_t narrow(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return f != f ? uint16_t((u >> 16) | 0x0040u) : uint16_t(rounded);
}

// Rows of bfloat16, in float math (as the float rows): the max pass widens x as it reads it, the
// exp pass keeps exp(x - max) in the float buffer `buf` (N floats, in cache), the last pass
// scales (or, for log-softmax, subtracts from the widened x) and narrows into y.
MMK_CLONES void forward_rows_bf16(const uint16_t* x, uint16_t* y, float* buf, int64_t rows, int64_t N,
                                  int64_t kind) {
  const float sign = kind == kSoftmin ? -1.0f : 1.0f;
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* __restrict__ xr = x + r * N;
    uint16_t* __restrict__ yr = y + r * N;
    float m = -inf;
    int bad = 0;
#pragma omp simd reduction(max : m) reduction(| : bad)
    for (int64_t i = 0; i < N; ++i) {
      const float v = sign * widen(xr[i]);
      m = v > m ? v : m;
      bad |= !(v < inf);
    }
    if (bad || m == -inf) {
      std::fill(yr, yr + N, narrow(std::numeric_limits<float>::quiet_NaN()));
      continue;
    }
    float s = 0;
    if (kind == kLogSoftmax) {
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < N; ++i) s += exp_np(widen(xr[i]) - m);
      const float shift = m + std::log(s);
#pragma omp simd
      for (int64_t i = 0; i < N; ++i) yr[i] = narrow(widen(xr[i]) - shift);
      continue;
    }
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < N; ++i) {
      const float e = exp_np(sign * widen(xr[i]) - m);
      buf[i] = e;
      s += e;
    }
    const float inv = 1.0f / s;
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) yr[i] = narrow(buf[i] * inv);
  }
}


// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// Elements of a row made per block in an L1 buffer before the backward streams them to dx (16 KB
// of float), and the size of dx from which it streams: past a core's share of the last-level
// cache dx would not stay there for the next op anyway.
constexpr int64_t kBlock = 4096;
constexpr int64_t kStreamBytes = int64_t(8) << 20;

// dx of n elements from the row's sum s. exact_exp (log-softmax with a positive y, which no
// log-softmax output has): std::exp, not the polynomial (whose range is x <= 0).
template <typename T>
MMK_INLINE void backward_block(const T* __restrict__ y, const T* __restrict__ dy, T* __restrict__ dx, int64_t n,
                               T s, Kind kind, bool exact_exp) {
  if (kind == kLogSoftmax) {
    if (exact_exp) {
      for (int64_t i = 0; i < n; ++i) dx[i] = dy[i] - std::exp(y[i]) * s;
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dx[i] = dy[i] - exp_np(y[i]) * s;
    }
  } else if (kind == kSoftmax) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dx[i] = y[i] * (dy[i] - s);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dx[i] = y[i] * (s - dy[i]);
  }
}

// The backward's row reduction in A (the math type) over a row of S (its storage): Σ dy for
// log-softmax — and whether any y is positive (not a log-softmax output: exact exp then) —
// else Σ y·dy. A fixed order: the same bits on every run.
template <typename A, typename S>
MMK_INLINE A row_reduction(const S* __restrict__ yr, const S* __restrict__ dr, int64_t N, Kind kind, bool& positive) {
  A s = 0;
  positive = false;
  if (kind == kLogSoftmax) {
    A top = -std::numeric_limits<A>::infinity();
#pragma omp simd reduction(+ : s) reduction(max : top)
    for (int64_t i = 0; i < N; ++i) {
      s += widen(dr[i]);
      const A v = widen(yr[i]);
      top = v > top ? v : top;
    }
    positive = top > A(0);
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < N; ++i) s += widen(yr[i]) * widen(dr[i]);
  }
  return s;
}

template <typename T>
MMK_CLONES void backward_rows(const T* y, const T* dy, T* dx, int64_t rows, int64_t N, int64_t kind_, bool stream) {
  const Kind kind = Kind(kind_);
  alignas(64) T buf[kBlock];
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict__ yr = y + r * N;
    const T* __restrict__ dr = dy + r * N;
    bool positive;
    const T s = row_reduction<T>(yr, dr, N, kind, positive);
    T* out = dx + r * N;
    if (!stream) {
      backward_block(yr, dr, out, N, s, kind, positive);
      continue;
    }
    for (int64_t i0 = 0; i0 < N; i0 += kBlock) {
      const int64_t n = std::min(kBlock, N - i0);
      backward_block(yr + i0, dr + i0, buf, n, s, kind, positive);
      stream_copy(out + i0, buf, n * sizeof(T));
    }
  }
  if (stream) stream_fence();
}


// Rows of bfloat16: the row reduction widens y and dy as it reads them; dx is made in float from
// the widened elements (the float rows' math), narrowed, and stored (or streamed a block at a time).
MMK_CLONES void backward_rows_bf16(const uint16_t* y, const uint16_t* dy, uint16_t* dx, int64_t rows, int64_t N,
                                   int64_t kind_, bool stream) {
  const Kind kind = Kind(kind_);
  alignas(64) uint16_t nb[kBlock];
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* __restrict__ yr = y + r * N;
    const uint16_t* __restrict__ dr = dy + r * N;
    bool positive;
    const float s = row_reduction<float>(yr, dr, N, kind, positive);
    uint16_t* out = dx + r * N;
    for (int64_t i0 = 0; i0 < N; i0 += kBlock) {
      const int64_t n = std::min(kBlock, N - i0);
      uint16_t* __restrict__ dst = stream ? nb : out + i0;
      const uint16_t* __restrict__ yy = yr + i0;
      const uint16_t* __restrict__ gg = dr + i0;
      if (kind == kLogSoftmax) {
        if (positive) {
          for (int64_t i = 0; i < n; ++i) dst[i] = narrow(widen(gg[i]) - std::exp(widen(yy[i])) * s);
        } else {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) dst[i] = narrow(widen(gg[i]) - exp_np(widen(yy[i])) * s);
        }
      } else if (kind == kSoftmax) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) dst[i] = narrow(widen(yy[i]) * (widen(gg[i]) - s));
      } else {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) dst[i] = narrow(widen(yy[i]) * (s - widen(gg[i])));
      }
      if (stream) stream_copy(out + i0, nb, n * sizeof(uint16_t));
    }
  }
  if (stream) stream_fence();
}

}  // namespace

// y = kind(x) along its last dim: x a contiguous float32 / float64 CPU tensor, y in its dtype (the
// Python side routes every other case to ATen).
at::Tensor softmax_forward(const at::Tensor& x, int64_t kind) {
  check(x.device().is_cpu() && x.is_contiguous() && x.dim() >= 1, "x must be a contiguous CPU tensor");
  check(kind >= 0 && kind <= 2, "kind must be 0 (softmax), 1 (log-softmax) or 2 (softmin)");
  check(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kBFloat16,
        "x must be float32, float64 or bfloat16");
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  const int64_t N = x.size(-1), rows = x.numel() / N;
  if (x.scalar_type() == at::kBFloat16) {
    const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / N), [&](int64_t r0, int64_t r1) {
      std::vector<float> buf(N);
      forward_rows_bf16(xp + r0 * N, yp + r0 * N, buf.data(), r1 - r0, N, kind);
    });
    return y;
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "softmax_forward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / N), [&](int64_t r0, int64_t r1) {
      forward_rows<scalar_t>(xp + r0 * N, yp + r0 * N, r1 - r0, N, kind);
    });
  });
  return y;
}

// dx of the softmax-family op `kind` along the last dim from its output y and the incoming
// gradient dy: contiguous float32 / float64 of one shape and dtype (the Python side routes every
// other case to ATen). stream: 1 non-temporal stores for dx, 0 plain stores, -1 (default) the
// former when dx is at least kStreamBytes.
at::Tensor softmax_backward(const at::Tensor& y, const at::Tensor& dy, int64_t kind, int64_t stream) {
  check(y.device().is_cpu() && dy.device().is_cpu() && y.is_contiguous() && dy.is_contiguous() && y.dim() >= 1,
        "y and dy must be contiguous CPU tensors");
  check(y.sizes() == dy.sizes() && y.scalar_type() == dy.scalar_type(), "y and dy must have one shape and dtype");
  check(kind >= 0 && kind <= 2, "kind must be 0 (softmax), 1 (log-softmax) or 2 (softmin)");
  check(y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble || y.scalar_type() == at::kBFloat16,
        "y must be float32, float64 or bfloat16");
  at::Tensor dx = at::empty_like(y);
  if (y.numel() == 0) return dx;
  const int64_t N = y.size(-1), rows = y.numel() / N;
  const bool streamed = stream > 0 || (stream < 0 && dx.nbytes() >= static_cast<size_t>(kStreamBytes));
  if (y.scalar_type() == at::kBFloat16) {
    const uint16_t* yp = reinterpret_cast<const uint16_t*>(y.data_ptr<at::BFloat16>());
    const uint16_t* gp = reinterpret_cast<const uint16_t*>(dy.data_ptr<at::BFloat16>());
    uint16_t* dp = reinterpret_cast<uint16_t*>(dx.data_ptr<at::BFloat16>());
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / N), [&](int64_t r0, int64_t r1) {
      backward_rows_bf16(yp + r0 * N, gp + r0 * N, dp + r0 * N, r1 - r0, N, kind, streamed);
    });
    return dx;
  }
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "softmax_backward", [&] {
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* gp = dy.data_ptr<scalar_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / N), [&](int64_t r0, int64_t r1) {
      backward_rows<scalar_t>(yp + r0 * N, gp + r0 * N, dp + r0 * N, r1 - r0, N, kind, streamed);
    });
  });
  return dx;
}

}  // namespace mmkernels

TORCH_LIBRARY_FRAGMENT(mmkernels_cpu, m) {
  m.def("softmax_forward(Tensor x, int kind) -> Tensor");
  m.def("softmax_backward(Tensor y, Tensor dy, int kind, int stream=-1) -> Tensor");
}

TORCH_LIBRARY_IMPL(mmkernels_cpu, CPU, m) {
  m.impl("softmax_forward", &mmkernels::softmax_forward);
  m.impl("softmax_backward", &mmkernels::softmax_backward);
}
