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
