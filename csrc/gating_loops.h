// The vectorised loops of csrc/gating.cpp (the blend's forward and backward over a range of
// elements), included by it through vec_levels.h once per instruction-set level: no include guard,
// no includes, nothing here but loops. See gating.cpp for what each computes.

template <typename T>
void blend_forward_range(const T* __restrict__ pre, const T* __restrict__ a, const T* __restrict__ b,
                         T* __restrict__ out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T g = sigmoid(pre[i]);
    out[i] = b[i] + g * (a[i] - b[i]);
  }
}

template <typename T>
void blend_backward_range(const T* __restrict__ dout, const T* __restrict__ pre, const T* __restrict__ a,
                          const T* __restrict__ b, T* __restrict__ da, T* __restrict__ db,
                          T* __restrict__ dpre, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T g = sigmoid(pre[i]);
    const T d = dout[i];
    const T dg = d * g;
    da[i] = dg;
    db[i] = d - dg;
    dpre[i] = dg * (a[i] - b[i]) * (T(1) - g);
  }
}

// bfloat16 storage, float math: each value widened as read, each result narrowed to nearest even as
// written (narrow_into: 32 at a time), db from the float d and d·g as the float path's.
void blend_forward_range_bf16(const uint16_t* __restrict__ pre, const uint16_t* __restrict__ a,
                              const uint16_t* __restrict__ b, uint16_t* __restrict__ out, int64_t n) {
  narrow_into(out, n, [=](int64_t i) MMK_LAMBDA_INLINE {
    const float g = sigmoid(widen(pre[i]));
    const float bi = widen(b[i]);
    return bi + g * (widen(a[i]) - bi);
  });
}

void blend_backward_range_bf16(const uint16_t* __restrict__ dout, const uint16_t* __restrict__ pre,
                               const uint16_t* __restrict__ a, const uint16_t* __restrict__ b,
                               uint16_t* __restrict__ da, uint16_t* __restrict__ db, uint16_t* __restrict__ dpre,
                               int64_t n) {
  constexpr int64_t kChunk = 256;  // the three results in float, 3 KB in L1, then narrowed
  alignas(64) float fa[kChunk], fb[kChunk], fp[kChunk];
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t m = std::min(kChunk, n - i0);
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) {
      const float g = sigmoid(widen(pre[i0 + i]));
      const float d = widen(dout[i0 + i]);
      const float dg = d * g;
      fa[i] = dg;
      fb[i] = d - dg;
      fp[i] = dg * (widen(a[i0 + i]) - widen(b[i0 + i])) * (1.0f - g);
    }
    narrow_into(da + i0, m, [&](int64_t i) MMK_LAMBDA_INLINE { return fa[i]; });
    narrow_into(db + i0, m, [&](int64_t i) MMK_LAMBDA_INLINE { return fb[i]; });
    narrow_into(dpre + i0, m, [&](int64_t i) MMK_LAMBDA_INLINE { return fp[i]; });
  }
}
