// The helpers of the vectorised loops that are compiled with them once per level: included by
// vec_levels.h inside each level's namespace (no include guard, no includes). A helper here may
// call the loop's own lambdas, which carry the level's target; one defined outside (vec_math.h)
// could not inline them.

// Elements of a row summed into one partial before the partials are added in order (blocked_sum).
constexpr int64_t kSumBlock = 1024;

// Lanes of blocked_sum's partial sums: one AVX-512 register of float (two of AVX2, four of SSE).
constexpr int kSumLanes = 16;

// The sum of blocked_sum's kSumLanes lanes as a tree — lane l + lane l + 8, then + 4, + 2, + 1 —
// in the lanes' vector registers. (GCC 12 made the tree written as loops over the array a dozen
// scalar loads and inserts from the stack: on 128-element rows in cache, one thread of a Zen 4 VM,
// the softmax forward 0.54 -> 0.51 ns an element with this in bfloat16, 0.45 -> 0.42 in float, the
// backward 0.31 -> 0.29 and 0.25 -> 0.22; the same bits.)
template <typename A>
MMK_INLINE A lane_tree(const A* lane) {
  static_assert(kSumLanes == 16, "lane_tree halves 16 lanes");
  typedef A V8 __attribute__((vector_size(8 * sizeof(A))));
  typedef A V4 __attribute__((vector_size(4 * sizeof(A))));
  typedef A V2 __attribute__((vector_size(2 * sizeof(A))));
  V8 lo, hi;  // the halves as the loop leaves them (two AVX2-wide registers of float)
  std::memcpy(&lo, lane, sizeof(lo));
  std::memcpy(&hi, lane + 8, sizeof(hi));
  const V8 h = lo + hi;
  const V4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  const V2 d = __builtin_shufflevector(q, q, 0, 1) + __builtin_shufflevector(q, q, 2, 3);
  return d[0] + d[1];
}

// Σ term(i) for i in [0, n) in the accumulator type A, for a cheap term (a load, a product): each
// block of kSumBlock terms summed into kSumLanes partial sums by a vectorised loop (term i into
// lane i % kSumLanes), the lanes added as a tree, the blocks' sums added in order. One running sum
// over a long row would lose the terms under half an ulp of the sum (a row with one dominant exp:
// 1e-5 relative at n = 5000 when the loop ran scalar); blocked, the rounding grows with the block
// and the number of blocks, whatever the vector width. (An `omp simd` reduction ended each block
// with its lanes added one after another from the stack: 32 dependent adds, a third of a
// 128-column bfloat16 row's time.) A fixed order on every level: the same bits on every run.
// Lanes (a multiple of kSumLanes): more partial sums for a term that is only a load — each lane's
// sum is a chain of dependent adds (three cycles each on Zen 4), which a loop of loads and adds
// waits on; they are folded in halves down to kSumLanes first (lane l + lane l + Lanes / 2, ...).
// before_block(i0, i1), when given, runs before the terms of each block [i0, i1) (a loop asks for
// memory it will read later there: softmax_loops.h forward_row).
struct NoBlockHook {
  MMK_INLINE void operator()(int64_t, int64_t) const {}
};

template <typename A, int Lanes = kSumLanes, typename F, typename B = NoBlockHook>
MMK_INLINE A blocked_sum(int64_t n, const F& term, const B& before_block = B()) {
  static_assert(Lanes % kSumLanes == 0 && (Lanes / kSumLanes & (Lanes / kSumLanes - 1)) == 0,
                "Lanes: kSumLanes times a power of two");
  A s = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kSumBlock) {
    const int64_t i1 = std::min(n, i0 + kSumBlock);
    before_block(i0, i1);
    A lane[Lanes] = {};
    int64_t i = i0;
    for (; i + Lanes <= i1; i += Lanes) {
#pragma omp simd
      for (int l = 0; l < Lanes; ++l) lane[l] += term(i + l);
    }
    if (i < i1) {  // the tail: lanes past it add +0, which leaves them as they are (never -0)
      const int64_t rest = i1 - i;
#pragma omp simd
      for (int l = 0; l < Lanes; ++l) lane[l] += l < rest ? term(i + l) : A(0);
    }
    for (int w = Lanes / 2; w >= kSumLanes; w /= 2) {
#pragma omp simd
      for (int l = 0; l < w; ++l) lane[l] += lane[l + w];
    }
    s += lane_tree<A>(lane);
  }
  return s;
}

// dst[i] = narrow(value(i)) for i in [0, n): bfloat16 stores of float values made by a cheap term
// (vec_math.h narrow: nearest even, NaN quiet). With AVX512-BF16 (the avx512bf16 level), 32 values
// at a time in one vcvtne2ps2bf16 against some dozen integer instructions per 16; that instruction
// treats float subnormals as zero, so a block of 32 holding one (|v| < 2^-126, not 0: a softmax
// output under 1e-38) is narrowed as elsewhere — the same bits on every level.
template <typename F>
MMK_INLINE void narrow_into(uint16_t* __restrict__ dst, int64_t n, const F& value) {
  int64_t i = 0;
#ifdef MMK_NATIVE_BF16
  for (; i + 32 <= n; i += 32) {
    alignas(64) float v[32];
#pragma omp simd
    for (int l = 0; l < 32; ++l) v[l] = value(i + l);
    const __m512 lo = _mm512_load_ps(v), hi = _mm512_load_ps(v + 16);
    if (_mm512_fpclass_ps_mask(lo, 0x20) | _mm512_fpclass_ps_mask(hi, 0x20)) {  // 0x20: subnormal
      for (int l = 0; l < 32; ++l) dst[i + l] = narrow(v[l]);
    } else {
      _mm512_storeu_si512(dst + i, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
    }
  }
#endif
#pragma omp simd
  for (int64_t j = i; j < n; ++j) dst[j] = narrow(value(j));
}

// The pairs of narrow_into: dst[2k] = narrow(low(k)), dst[2k + 1] = narrow(high(k)) for k in
// [0, pairs) — values made by arithmetic from bfloat16 operands (vec_math.h rounded_high's
// condition), from a row read as pairs (vec_math.h pair_at), stored in order. With AVX512-BF16,
// 16 pairs at a time: one vcvtne2ps2bf16 and one permutation that interleaves them (subnormal
// blocks as narrow_into's); elsewhere each pair one 32-bit word (vec_math.h narrow_pair).
template <typename Lo, typename Hi>
MMK_INLINE void narrow_pairs_into(uint16_t* __restrict__ dst, int64_t pairs, const Lo& low, const Hi& high) {
  int64_t k = 0;
#ifdef MMK_NATIVE_BF16
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                              6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (; k + 16 <= pairs; k += 16) {
    alignas(64) float a[16], b[16];
#pragma omp simd
    for (int l = 0; l < 16; ++l) {
      a[l] = low(k + l);
      b[l] = high(k + l);
    }
    const __m512 lo = _mm512_load_ps(a), hi = _mm512_load_ps(b);
    if (_mm512_fpclass_ps_mask(lo, 0x20) | _mm512_fpclass_ps_mask(hi, 0x20)) {  // 0x20: subnormal
      for (int l = 0; l < 16; ++l) {
        dst[2 * (k + l)] = narrow(a[l]);
        dst[2 * (k + l) + 1] = narrow(b[l]);
      }
    } else {
      const __m512i halves = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));  // lo's 16, then hi's
      _mm512_storeu_si512(dst + 2 * k, _mm512_permutexvar_epi16(interleave, halves));
    }
  }
#endif
#pragma omp simd
  for (int64_t j = k; j < pairs; ++j) {
    const uint32_t w = narrow_pair(low(j), high(j));
    std::memcpy(dst + 2 * j, &w, sizeof(w));
  }
}
