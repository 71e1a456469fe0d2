// The vectorised loops of csrc/softmax.cpp (the forward rows, the backward rows; float / double
// and bfloat16), included by it through vec_levels.h once per instruction-set level: no include
// guard, no includes (softmax.cpp includes what they use and defines Kind, widen / narrow, kBlock
// before), and nothing here but loops. See softmax.cpp for what each computes and why.

// One row of N: y = kind(x), in T's own precision (float or double).
template <typename T>
MMK_INLINE void forward_row(const T* x, T* y, int64_t N, Kind kind) {
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
  // the exps into y (the log-softmax's too: y is overwritten below), then their sum
#pragma omp simd
  for (int64_t i = 0; i < N; ++i) y[i] = exp_np(sign * x[i] - m);
  const T s = blocked_sum<T>(N, [=](int64_t i) MMK_LAMBDA_INLINE { return y[i]; });
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

template <typename T>
void forward_rows(const T* x, T* y, int64_t rows, int64_t N, int64_t kind) {
  for (int64_t r = 0; r < rows; ++r) forward_row<T>(x + r * N, y + r * N, N, Kind(kind));
}

// Rows of bfloat16, in float math (as the float rows): the max pass widens x as it reads it, the
// exp pass keeps exp(x - max) in the float buffer `buf` (N floats, in cache) and they are summed
// from there, the last pass scales (or, for log-softmax, subtracts from the widened x) and narrows
// into y.
void forward_rows_bf16(const uint16_t* x, uint16_t* y, float* buf, int64_t rows, int64_t N,
                       int64_t kind) {
  const float sign = kind == kSoftmin ? -1.0f : 1.0f;
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* __restrict__ xr = x + r * N;
    uint16_t* __restrict__ yr = y + r * N;
    float m = -inf;
#pragma omp simd reduction(max : m)  // NaN and +inf: as the float rows
    for (int64_t i = 0; i < N; ++i) {
      const float v = sign * widen(xr[i]);
      m = v > m ? v : m;
    }
    if (m == -inf) {
      std::fill(yr, yr + N, narrow(std::numeric_limits<float>::quiet_NaN()));
      continue;
    }
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) buf[i] = exp_np(sign * widen(xr[i]) - m);
    const float s = blocked_sum<float>(N, [=](int64_t i) MMK_LAMBDA_INLINE { return buf[i]; });
    if (kind == kLogSoftmax) {
      const float shift = m + std::log(s);
#pragma omp simd
      for (int64_t i = 0; i < N; ++i) yr[i] = narrow(widen(xr[i]) - shift);
      continue;
    }
    const float inv = 1.0f / s;
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) yr[i] = narrow(buf[i] * inv);
  }
}


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
  positive = false;
  if (kind == kLogSoftmax) {
    A top = -std::numeric_limits<A>::infinity();
#pragma omp simd reduction(max : top)
    for (int64_t i = 0; i < N; ++i) {
      const A v = widen(yr[i]);
      top = v > top ? v : top;
    }
    positive = top > A(0);
    return blocked_sum<A>(N, [=](int64_t i) MMK_LAMBDA_INLINE { return A(widen(dr[i])); });
  }
  return blocked_sum<A>(N, [=](int64_t i) MMK_LAMBDA_INLINE { return A(widen(yr[i])) * A(widen(dr[i])); });
}

template <typename T>
void backward_rows(const T* y, const T* dy, T* dx, int64_t rows, int64_t N, int64_t kind_, bool stream) {
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
void backward_rows_bf16(const uint16_t* y, const uint16_t* dy, uint16_t* dx, int64_t rows, int64_t N,
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
