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
