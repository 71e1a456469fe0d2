// The helpers of the vectorised loops that are compiled with them once per level: included by
// vec_levels.h inside each level's namespace (no include guard, no includes). A helper here may
// call the loop's own lambdas, which carry the level's target; one defined outside (vec_math.h)
// could not inline them.

// Elements of a row summed into one partial before the partials are added in order (blocked_sum).
constexpr int64_t kSumBlock = 1024;

// Σ term(i) for i in [0, n) in the accumulator type A: each block of kSumBlock terms summed by a
// vectorised loop, the blocks' partials added in order. One running sum over a long row would lose
// the terms under half an ulp of the sum (a row with one dominant exp: 1e-5 relative at n = 5000
// when the loop runs scalar or on few lanes); blocked, the rounding grows with the block and the
// number of blocks, whatever the vector width. A fixed order: the same bits on every run. term may
// also store (the softmax's y[i] = e).
template <typename A, typename F>
MMK_INLINE A blocked_sum(int64_t n, const F& term) {
  A s = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kSumBlock) {
    const int64_t i1 = std::min(n, i0 + kSumBlock);
    A part = 0;
#pragma omp simd reduction(+ : part)
    for (int64_t i = i0; i < i1; ++i) part += term(i);
    s += part;
  }
  return s;
}
