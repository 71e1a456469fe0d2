// The vectorised loops of csrc/product.cpp (the product unit's epilogue and its dx over a range
// of elements), included by it through vec_levels.h once per instruction-set level: no include
// guard, no includes, nothing here but loops. See product.cpp for what each computes.

// a[i], b[i] = exp(a[i])·cos(π·b[i]), exp(a[i])·sin(π·b[i]) (with_sin; else b is left as it is).
void exp_cis_range(float* __restrict__ a, float* __restrict__ b, int64_t n, bool with_sin) {
  if (with_sin) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float e = exp_any(a[i]);
      float s, c;
      sincospi(b[i], s, c);
      a[i] = e * c;
      b[i] = e * s;
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      float s, c;
      sincospi(b[i], s, c);
      a[i] = exp_any(a[i]) * c;
    }
  }
}

// d[i] = d[i] / x[i] where |x[i]| > eps, else 0.
void dx_range(float* __restrict__ d, const float* __restrict__ x, int64_t n, float eps) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = std::fabs(x[i]) > eps ? d[i] / x[i] : 0.0f;
}

// out[r] = h[r, 0]·h[r, 1]·…·h[r, S - 1] for rows of S factors (S a constant: the rows' factors
// gathered by the vectoriser; 0: the runtime s_count).
template <typename T, int S>
void prod_last_range(const T* __restrict__ h, T* __restrict__ out, int64_t rows, int64_t s_count) {
  const int64_t n = S > 0 ? S : s_count;
#pragma omp simd
  for (int64_t r = 0; r < rows; ++r) {
    T p = h[r * n];
    for (int64_t s = 1; s < n; ++s) p *= h[r * n + s];
    out[r] = p;
  }
}

// dh[r, s] = g[r]·Π_{t<s} h[r, t]·Π_{t>s} h[r, t]: the prefix products from g up, times the
// suffix products, in ProductOverLastFunction.backward's order (the same bits as its torch ops).
template <typename T, int S>
void prod_last_backward_range(const T* __restrict__ h, const T* __restrict__ g, T* __restrict__ dh, int64_t rows,
                              int64_t s_count) {
  const int64_t n = S > 0 ? S : s_count;
#pragma omp simd
  for (int64_t r = 0; r < rows; ++r) {
    const T* hr = h + r * n;
    T* dr = dh + r * n;
    T before = g[r];  // g·Π_{t<s} h_t, left in dr[s]
    for (int64_t s = 0; s < n; ++s) {
      dr[s] = before;
      before *= hr[s];
    }
    T after = hr[n - 1];  // Π_{t>s} h_t
    for (int64_t s = n - 2; s >= 0; --s) {
      dr[s] *= after;
      after *= hr[s];
    }
  }
}
