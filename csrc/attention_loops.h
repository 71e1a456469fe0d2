// The vectorised loops of csrc/attention.cpp (the module's forward and backward rows), included by
// it through vec_levels.h once per instruction-set level: no include guard, no includes, nothing
// here but loops. See attention.cpp for what each computes and why.

// The logits of one row (masked entries -inf) into l, and the row's log-sum-exp as
// torch.logsumexp computes it.
template <typename T>
MMK_INLINE T row_logits(const T* z, int64_t sz, const bool* mask, int64_t sm, T tau, T* l, int64_t J) {
  const T inf = std::numeric_limits<T>::infinity();
  T m = -inf;
  bool nan = false;
  for (int64_t j = 0; j < J; ++j) {
    const T v = (mask && !mask[j * sm]) ? -inf : z[j * sz] / tau;
    l[j] = v;
    nan |= v != v;
    m = v > m ? v : m;
  }
  if (nan) return std::numeric_limits<T>::quiet_NaN();
  T sum = 0;
  if (std::isinf(m)) {  // +inf: inf (or NaN, as torch); -inf: no allowed entry, log 0 = -inf
    for (int64_t j = 0; j < J; ++j) sum += std::exp(l[j]);
    return std::log(sum);
  }
  sum = blocked_sum<T>(J, [=](int64_t j) MMK_LAMBDA_INLINE { return exp_np(l[j] - m); });
  return m + std::log(sum);
}

// p_j = exp(l_j - lse) into l (in place); 0 throughout for an empty row.
template <typename T>
MMK_INLINE void row_probs(T* l, T lse, int64_t J) {
  const T inf = std::numeric_limits<T>::infinity();
  if (lse == -inf) {
    std::fill(l, l + J, T(0));
    return;
  }
  for (int64_t j = 0; j < J; ++j) l[j] = exp_np(l[j] - lse);  // <= 0, -inf or NaN: in exp_np's range
}

template <typename T>
void forward_rows(const T* z, int64_t sz0, int64_t sz1, const bool* mask, int64_t sm0, int64_t sm1,
                  const T* x, T* s, T* lse, int64_t r0, int64_t r1, int64_t J, int64_t D, T tau,
                  T* p) {
  for (int64_t r = r0; r < r1; ++r) {
    const T l = row_logits(z + r * sz0, sz1, mask ? mask + r * sm0 : nullptr, sm1, tau, p, J);
    lse[r] = l;
    row_probs(p, l, J);
    T* __restrict__ out = s + r * D;
    const T* xr = x + r * J * D;
    std::fill(out, out + D, T(0));
    for (int64_t j = 0; j < J; ++j) {
      const T pj = p[j];
      const T* __restrict__ xj = xr + j * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) out[d] += pj * xj[d];
    }
  }
}

template <typename T>
void backward_rows(const T* z, int64_t sz0, int64_t sz1, const bool* mask, int64_t sm0, int64_t sm1,
                   const T* x, const T* s, const T* lse, const T* ds, int64_t sd0, int64_t sd1, T* dz,
                   T* dx, int64_t r0, int64_t r1, int64_t J, int64_t D, T tau, T* p, T* g) {
  for (int64_t r = r0; r < r1; ++r) {
    row_logits(z + r * sz0, sz1, mask ? mask + r * sm0 : nullptr, sm1, tau, p, J);
    row_probs(p, lse[r], J);
    const T* dsr = ds + r * sd0;
    T* __restrict__ gr = g;  // ds_r, unit stride
    for (int64_t d = 0; d < D; ++d) gr[d] = dsr[d * sd1];
    const T* __restrict__ sr = s + r * D;
    T b = 0;
#pragma omp simd reduction(+ : b)
    for (int64_t d = 0; d < D; ++d) b += sr[d] * gr[d];
    const T* xr = x + r * J * D;
    T* dxr = dx + r * J * D;
    for (int64_t j = 0; j < J; ++j) {
      const T pj = p[j];
      const T* __restrict__ xj = xr + j * D;
      T* __restrict__ dxj = dxr + j * D;
      T a = 0;
#pragma omp simd reduction(+ : a)
      for (int64_t d = 0; d < D; ++d) {
        a += xj[d] * gr[d];
        dxj[d] = pj * gr[d];
      }
      dz[r * J + j] = pj * (a - b) / tau;
    }
  }
}
