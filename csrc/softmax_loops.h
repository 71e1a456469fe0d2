// The vectorised loops of csrc/softmax.cpp (the forward and backward rows and columns; float,
// double and bfloat16), included by it through vec_levels.h once per instruction-set level: no
// include guard, no includes (softmax.cpp includes what they use and defines Kind, widen / narrow,
// kBlock before), and nothing here but loops. See softmax.cpp for what each computes and why.

// One row of N: y = kind(x), in T's own precision (float or double). While the exps are made, a
// block of kSumBlock at a time, the lines of the rows' x at bytes [ahead, limit) of `base` matching
// the block's are asked for (into L2): the bytes a distance behind this row that a later row will
// read (forward_rows; offsets, so that no pointer is made past the rows' end).
template <typename T>
MMK_INLINE void forward_row(const T* x, T* y, int64_t N, Kind kind, const char* base, int64_t ahead, int64_t limit) {
  const T sign = kind == kSoftmin ? T(-1) : T(1);
  const T inf = std::numeric_limits<T>::infinity();
  T m = -inf;
  // NaN or +inf (after the sign) anywhere makes the whole row NaN, as torch, without a test of
  // its own: the max is then NaN or +inf, an exp below NaN, and the row's sum NaN.
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < N; ++i) {
    const T v = sign * x[i];
    m = v > m ? v : m;
  }
  if (m == -inf) {  // only -inf (or NaN and -inf): no finite shift
    std::fill(y, y + N, std::numeric_limits<T>::quiet_NaN());
    return;
  }
  // the exps into y (the log-softmax's too: y is overwritten below) and their sum, in one pass (the
  // sum's order as a pass of its own over y: the same bits; 1.05-1.10x the forward of two passes)
  const T s = blocked_sum<T>(
      N,
      [=](int64_t i) MMK_LAMBDA_INLINE {
        const T e = exp_np(sign * x[i] - m);
        y[i] = e;
        return e;
      },
      [=](int64_t i0, int64_t i1) MMK_LAMBDA_INLINE {
        const int64_t end = std::min(ahead + i1 * int64_t(sizeof(T)), limit);
        for (int64_t b = ahead + i0 * int64_t(sizeof(T)); b < end; b += 64) __builtin_prefetch(base + b, 0, 2);
      });
  if (kind == kLogSoftmax) {
    const T shift = m + std::log(s);
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) y[i] = x[i] - shift;
    return;
  }
  const T inv = T(1) / s;
#pragma omp simd
  for (int64_t i = 0; i < N; ++i) y[i] *= inv;
}

// Rows of float or double, each asking for x max(kAheadBytes, a row) ahead of its exps (softmax.cpp
// kAheadBytes), up to the end of these rows.
template <typename T>
void forward_rows(const T* x, T* y, int64_t rows, int64_t N, int64_t kind) {
  const int64_t row_bytes = N * int64_t(sizeof(T));
  const int64_t distance = std::max<int64_t>(kAheadBytes, row_bytes);
  const char* base = reinterpret_cast<const char*>(x);
  for (int64_t r = 0; r < rows; ++r) {
    forward_row<T>(x + r * N, y + r * N, N, Kind(kind), base, r * row_bytes + distance, rows * row_bytes);
  }
}

// The largest element of a bfloat16 row (kMin: the smallest), read as pairs; NaN may or may not
// be taken (the caller's sum finds it either way). Max and min are separate loops, where a sign
// multiplied in made two multiplies per 16 elements more.
template <bool kMin>
MMK_INLINE float row_extreme_bf16(const uint16_t* __restrict__ xr, int64_t N) {
  const int64_t P = N / 2;
  const float inf = std::numeric_limits<float>::infinity();
  float m0 = kMin ? inf : -inf, m1 = m0;
  if constexpr (kMin) {
#pragma omp simd reduction(min : m0, m1)
    for (int64_t k = 0; k < P; ++k) {
      const uint32_t w = pair_at(xr, k);
      const float a = low_of(w), b = high_of(w);
      m0 = a < m0 ? a : m0;
      m1 = b < m1 ? b : m1;
    }
  } else {
#pragma omp simd reduction(max : m0, m1)
    for (int64_t k = 0; k < P; ++k) {
      const uint32_t w = pair_at(xr, k);
      const float a = low_of(w), b = high_of(w);
      m0 = a > m0 ? a : m0;
      m1 = b > m1 ? b : m1;
    }
  }
  float m = kMin ? (m1 < m0 ? m1 : m0) : (m1 > m0 ? m1 : m0);
  if (N & 1) {
    const float v = widen(xr[N - 1]);
    m = kMin ? (v < m ? v : m) : (v > m ? v : m);
  }
  return m;
}

// Rows of bfloat16, in float math (as the float rows), each read as pairs of elements (vec_math.h
// pair_at: half the widening instructions). The extreme pass finds p, the max (softmin: the min);
// the exp pass keeps 2^((x - p)·a), a = ±log2 e (vec_math.h exp2_np4), in the float buffer `buf`
// (N floats, in cache) — the even elements' exps, then the odd ones', then the last of an odd row —
// and they are summed from there (summed as they are made, as the float rows do, measured
// 0.93-1.03x this); the last pass scales them and narrows each pair into one word (narrow_pairs_into);
// log-softmax subtracts from the widened x instead (narrow_into). A row whose p is not finite (only
// -inf, a +inf or a NaN taken by the max) or whose sum is NaN (a NaN anywhere) is NaN throughout, as
// torch's. On the 2-core AVX2 VM, one thread, rows in cache: 0.47 / 0.50 / 0.74 ns an element at
// 1024 / 4096 / 128 elements, against 0.56 / 0.56 / 0.82 with exp_np<4> of sign·x - max, the sign
// multiplied into the max pass and narrow's NaN select.
void forward_rows_bf16(const uint16_t* x, uint16_t* y, float* buf, int64_t rows, int64_t N, int64_t kind_) {
  const Kind kind = Kind(kind_);
  const float a = kind == kSoftmin ? -1.44269504088896341f : 1.44269504088896341f;
  const int64_t P = N / 2;
  float* __restrict__ even = buf;
  float* __restrict__ odd = buf + P;
  const uint16_t nan = narrow(std::numeric_limits<float>::quiet_NaN());
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* __restrict__ xr = x + r * N;
    uint16_t* __restrict__ yr = y + r * N;
    const float p = kind == kSoftmin ? row_extreme_bf16<true>(xr, N) : row_extreme_bf16<false>(xr, N);
    if (!(std::fabs(p) <= std::numeric_limits<float>::max())) {
      std::fill(yr, yr + N, nan);
      continue;
    }
    // a long row's exps in chunks, each first asking for the next row's matching lines of x
    const char* next = N >= kPrefetchRow && r + 1 < rows ? reinterpret_cast<const char*>(xr + N) : nullptr;
    for (int64_t k0 = 0; k0 < P; k0 += kPrefetchPairs) {
      const int64_t k1 = std::min(P, k0 + kPrefetchPairs);
      if (next) {
        for (int64_t b = 4 * k0; b < 4 * k1; b += 64) __builtin_prefetch(next + b, 0, 2);
      }
#pragma omp simd
      for (int64_t k = k0; k < k1; ++k) {
        const uint32_t w = pair_at(xr, k);
        even[k] = exp2_np4((low_of(w) - p) * a);
        odd[k] = exp2_np4((high_of(w) - p) * a);
      }
    }
    if (N & 1) buf[N - 1] = exp2_np4((widen(xr[N - 1]) - p) * a);
    // four times the lanes where a row has the terms to fill them (the sum's own pass waits on its
    // adds: 12-16% of the forward at 1024 and 4096 elements; 2-4% slower at 128)
    const auto load = [=](int64_t i) MMK_LAMBDA_INLINE { return buf[i]; };
    const float s = N >= kLongSum ? blocked_sum<float, 4 * kSumLanes>(N, load) : blocked_sum<float>(N, load);
    if (s != s) {
      std::fill(yr, yr + N, nan);
      continue;
    }
    if (kind == kLogSoftmax) {
      const float shift = p + std::log(s);
      narrow_into(yr, N, [=](int64_t i) MMK_LAMBDA_INLINE { return widen(xr[i]) - shift; });
      continue;
    }
    const float inv = 1.0f / s;
    narrow_pairs_into(yr, P, [=](int64_t k) MMK_LAMBDA_INLINE { return even[k] * inv; },
                      [=](int64_t k) MMK_LAMBDA_INLINE { return odd[k] * inv; });
    if (N & 1) yr[N - 1] = narrow(buf[N - 1] * inv);
  }
}



// dx of n elements from the row's sum s. Log-softmax: exp_np, exact to float's rounding up to
// kExpNpMax (every log-softmax output is <= 0), and whether some y is above that found in the same
// loop; a block that has one is made again with std::exp. (The row's max, taken in a pass of its
// own before, read y once more than ATen's backward; the bound was 0 before, and a block with a
// positive y, no log-softmax output but a legal argument, ran std::exp element by element.)
template <typename T>
MMK_INLINE void backward_block(const T* __restrict__ y, const T* __restrict__ dy, T* __restrict__ dx, int64_t n,
                               T s, Kind kind) {
  if (kind == kLogSoftmax) {
    int beyond = 0;
#pragma omp simd reduction(| : beyond)
    for (int64_t i = 0; i < n; ++i) {
      dx[i] = dy[i] - exp_np(y[i]) * s;
      beyond |= y[i] > T(kExpNpMax);
    }
    if (beyond) {
      for (int64_t i = 0; i < n; ++i) dx[i] = dy[i] - std::exp(y[i]) * s;
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
// log-softmax, else Σ y·dy. A fixed order: the same bits on every run.
template <typename A, typename S>
MMK_INLINE A row_reduction(const S* __restrict__ yr, const S* __restrict__ dr, int64_t N, Kind kind) {
  if (kind == kLogSoftmax) return blocked_sum<A>(N, [=](int64_t i) MMK_LAMBDA_INLINE { return A(widen(dr[i])); });
  return blocked_sum<A>(N, [=](int64_t i) MMK_LAMBDA_INLINE { return A(widen(yr[i])) * A(widen(dr[i])); });
}

// Rows: dx a block of kBlock at a time (streamed from an L1 buffer, or stored in place), the
// same blocks either way: the same bits.
template <typename T>
void backward_rows(const T* y, const T* dy, T* dx, int64_t rows, int64_t N, int64_t kind_, bool stream) {
  const Kind kind = Kind(kind_);
  alignas(64) T buf[kBlock];
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict__ yr = y + r * N;
    const T* __restrict__ dr = dy + r * N;
    const T s = row_reduction<T>(yr, dr, N, kind);
    T* out = dx + r * N;
    for (int64_t i0 = 0; i0 < N; i0 += kBlock) {
      const int64_t n = std::min(kBlock, N - i0);
      backward_block(yr + i0, dr + i0, stream ? buf : out + i0, n, s, kind);
      if (stream) stream_copy(out + i0, buf, n * sizeof(T));
    }
  }
  if (stream) stream_fence();
}


// Rows of bfloat16: the row reduction widens y and dy as it reads them; dx is made in float from
// the widened elements (the float rows' math, exp_np<4> for log-softmax), narrowed, and stored (or
// streamed a block at a time).
void backward_rows_bf16(const uint16_t* y, const uint16_t* dy, uint16_t* dx, int64_t rows, int64_t N,
                        int64_t kind_, bool stream) {
  const Kind kind = Kind(kind_);
  alignas(64) uint16_t nb[kBlock];
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* __restrict__ yr = y + r * N;
    const uint16_t* __restrict__ dr = dy + r * N;
    const float s = row_reduction<float>(yr, dr, N, kind);
    uint16_t* out = dx + r * N;
    for (int64_t i0 = 0; i0 < N; i0 += kBlock) {
      const int64_t n = std::min(kBlock, N - i0);
      uint16_t* __restrict__ dst = stream ? nb : out + i0;
      const uint16_t* __restrict__ yy = yr + i0;
      const uint16_t* __restrict__ gg = dr + i0;
      if (kind == kLogSoftmax) {
        int beyond = 0;
#pragma omp simd reduction(| : beyond)
        for (int64_t i = 0; i < n; ++i) {
          dst[i] = narrow(widen(gg[i]) - exp_for(yy, widen(yy[i])) * s);
          beyond |= widen(yy[i]) > kExpNpMax;
        }
        if (beyond) {
          for (int64_t i = 0; i < n; ++i) dst[i] = narrow(widen(gg[i]) - std::exp(widen(yy[i])) * s);
        }
      } else {
        // pairs of y and dy, each pair's dx one word (narrow_pairs_into); softmin's y·(s - dy) is
        // -(y·(dy - s)) exactly
        const float sg = kind == kSoftmax ? 1.0f : -1.0f;
        const int64_t pairs = n / 2;
        narrow_pairs_into(
            dst, pairs,
            [=](int64_t k) MMK_LAMBDA_INLINE { return sg * (low_of(pair_at(yy, k)) * (low_of(pair_at(gg, k)) - s)); },
            [=](int64_t k) MMK_LAMBDA_INLINE { return sg * (high_of(pair_at(yy, k)) * (high_of(pair_at(gg, k)) - s)); });
        if (n & 1) dst[n - 1] = narrow(sg * (widen(yy[n - 1]) * (widen(gg[n - 1]) - s)));
      }
      if (stream) stream_copy(out + i0, nb, n * sizeof(uint16_t));
    }
  }
  if (stream) stream_fence();
}

// Columns: kind along the middle dim D of a (D, inner) block of a contiguous tensor, for the w
// columns [0, w) of the block (x and y already at the first; W = w known at compile time — one
// cache line of them — or 0 for a runtime w <= kMaxColumns). Each pass walks d with the columns
// side by side, vectorised across them; the D × w tile (column_width) stays in L2 between the
// passes. NaN, +inf and columns of only -inf give NaN as the rows do (here the max is NaN, +inf or
// -inf and x - max NaN where it matters); sums over d in blocks of kColumnBlock (softmax.cpp).
// S is the storage type: float and double keep the exps in y between the sum pass and the last;
// bfloat16 (uint16_t, float math, widened as read) makes them again in the last pass, so that each
// y is rounded once, as the bfloat16 rows round it.

// dst[i] = value(i) for i in [0, n), narrowed to nearest even where S is bfloat16 (narrow_into).
template <typename S, typename F>
MMK_INLINE void store_values(S* __restrict__ dst, int64_t n, const F& value) {
  if constexpr (std::is_same<S, uint16_t>::value) {
    narrow_into(dst, n, value);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = value(i);
  }
}

template <typename S, int W>
MMK_INLINE void forward_columns(const S* x, S* y, int64_t D, int64_t inner, int64_t w, Kind kind) {
  using T = decltype(widen(S()));
  constexpr bool kKeep = std::is_same<S, T>::value;
  constexpr int kLine = W ? W : kMaxColumns;
  const int64_t n = W ? W : w;
  const T sign = kind == kSoftmin ? T(-1) : T(1);
  T m[kLine], s[kLine], part[kLine];
  for (int l = 0; l < kLine; ++l) m[l] = -std::numeric_limits<T>::infinity();
  for (int64_t d = 0; d < D; ++d) {
    const S* xd = x + d * inner;
#pragma omp simd
    for (int64_t l = 0; l < n; ++l) {
      const T v = sign * widen(xd[l]);
      m[l] = v > m[l] ? v : m[l];
    }
  }
  for (int l = 0; l < kLine; ++l) s[l] = 0;
  for (int64_t d0 = 0; d0 < D; d0 += kColumnBlock) {
    for (int l = 0; l < kLine; ++l) part[l] = 0;
    for (int64_t d = d0; d < std::min(D, d0 + kColumnBlock); ++d) {
      const S* xd = x + d * inner;
      S* yd = y + d * inner;
#pragma omp simd
      for (int64_t l = 0; l < n; ++l) {
        const T e = exp_for(x, sign * widen(xd[l]) - m[l]);
        if constexpr (kKeep) yd[l] = e;
        part[l] += e;
      }
    }
    for (int l = 0; l < kLine; ++l) s[l] += part[l];
  }
  const T* mx = m;  // the lambdas below take the arrays by pointer (by value they would copy them)
  const T* sc = s;
  if (kind == kLogSoftmax) {
    for (int l = 0; l < kLine; ++l) s[l] = m[l] + std::log(s[l]);  // the shift
    for (int64_t d = 0; d < D; ++d) {
      const S* xd = x + d * inner;
      store_values(y + d * inner, n, [=](int64_t l) MMK_LAMBDA_INLINE { return widen(xd[l]) - sc[l]; });
    }
    return;
  }
  for (int l = 0; l < kLine; ++l) s[l] = T(1) / s[l];
  for (int64_t d = 0; d < D; ++d) {
    const S* xd = x + d * inner;
    S* yd = y + d * inner;
    if constexpr (kKeep) {
#pragma omp simd
      for (int64_t l = 0; l < n; ++l) yd[l] *= s[l];
    } else {
      store_values(yd, n, [=](int64_t l) MMK_LAMBDA_INLINE {
        return exp_for(x, sign * widen(xd[l]) - mx[l]) * sc[l];
      });
    }
  }
}

// Tasks [c0, c1) of the column kernels over a (outer, D, inner) tensor in tiles of `width` columns
// (softmax.cpp's column_width): task c is block c / chunks, columns width · (c % chunks) onward
// (chunks = ceil(inner / width)); run(offset, w) for each, w its columns.
template <typename F>
MMK_INLINE void column_tiles(int64_t D, int64_t inner, int64_t width, int64_t c0, int64_t c1, const F& run) {
  const int64_t chunks = (inner + width - 1) / width;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t col = (c % chunks) * width;
    run((c / chunks) * D * inner + col, std::min<int64_t>(width, inner - col));
  }
}

template <typename T>
void forward_column_tasks(const T* x, T* y, int64_t D, int64_t inner, int64_t width, int64_t c0, int64_t c1,
                          int64_t kind) {
  constexpr int kLine = 64 / sizeof(T);  // a tile of one cache line: its width known when compiled
  column_tiles(D, inner, width, c0, c1, [=](int64_t off, int64_t w) MMK_LAMBDA_INLINE {
    if (w == kLine) {
      forward_columns<T, kLine>(x + off, y + off, D, inner, w, Kind(kind));
    } else {
      forward_columns<T, 0>(x + off, y + off, D, inner, w, Kind(kind));
    }
  });
}

// The backward of forward_columns: per column Σ y·dy over d (log-softmax: Σ dy, and whether any
// y is above kExpNpMax: std::exp then, as backward_block), then dx; S as there (bfloat16: sums in
// float, each dx rounded once).
template <typename S, int W>
MMK_INLINE void backward_columns(const S* y, const S* dy, S* dx, int64_t D, int64_t inner, int64_t w, Kind kind) {
  using T = decltype(widen(S()));
  constexpr int kLine = W ? W : kMaxColumns;
  const int64_t n = W ? W : w;
  T s[kLine], part[kLine], top[kLine];
  for (int l = 0; l < kLine; ++l) {
    s[l] = 0;
    top[l] = -std::numeric_limits<T>::infinity();
  }
  for (int64_t d0 = 0; d0 < D; d0 += kColumnBlock) {
    for (int l = 0; l < kLine; ++l) part[l] = 0;
    for (int64_t d = d0; d < std::min(D, d0 + kColumnBlock); ++d) {
      const S* yd = y + d * inner;
      const S* gd = dy + d * inner;
      if (kind == kLogSoftmax) {
#pragma omp simd
        for (int64_t l = 0; l < n; ++l) {
          const T v = widen(yd[l]);
          part[l] += widen(gd[l]);
          top[l] = v > top[l] ? v : top[l];
        }
      } else {
#pragma omp simd
        for (int64_t l = 0; l < n; ++l) part[l] += widen(yd[l]) * widen(gd[l]);
      }
    }
    for (int l = 0; l < kLine; ++l) s[l] += part[l];
  }
  bool beyond = false;
  for (int64_t l = 0; l < n; ++l) beyond |= top[l] > T(kExpNpMax);
  const T* sc = s;  // the lambdas below take the sums by pointer (by value they would copy them)
  for (int64_t d = 0; d < D; ++d) {
    const S* yd = y + d * inner;
    const S* gd = dy + d * inner;
    S* xd = dx + d * inner;
    if (kind == kLogSoftmax) {
      if (beyond) {
        for (int64_t l = 0; l < n; ++l) {
          const T v = widen(gd[l]) - std::exp(widen(yd[l])) * sc[l];
          store_values(xd + l, 1, [=](int64_t) MMK_LAMBDA_INLINE { return v; });
        }
      } else {
        store_values(xd, n, [=](int64_t l) MMK_LAMBDA_INLINE {
          return widen(gd[l]) - exp_for(y, widen(yd[l])) * sc[l];
        });
      }
    } else if (kind == kSoftmax) {
      store_values(xd, n, [=](int64_t l) MMK_LAMBDA_INLINE { return widen(yd[l]) * (widen(gd[l]) - sc[l]); });
    } else {
      store_values(xd, n, [=](int64_t l) MMK_LAMBDA_INLINE { return widen(yd[l]) * (sc[l] - widen(gd[l])); });
    }
  }
}

template <typename T>
void backward_column_tasks(const T* y, const T* dy, T* dx, int64_t D, int64_t inner, int64_t width, int64_t c0,
                           int64_t c1, int64_t kind) {
  constexpr int kLine = 64 / sizeof(T);
  column_tiles(D, inner, width, c0, c1, [=](int64_t off, int64_t w) MMK_LAMBDA_INLINE {
    if (w == kLine) {
      backward_columns<T, kLine>(y + off, dy + off, dx + off, D, inner, w, Kind(kind));
    } else {
      backward_columns<T, 0>(y + off, dy + off, dx + off, D, inner, w, Kind(kind));
    }
  });
}
