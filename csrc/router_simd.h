// The vector row kernels of the softmax routers (included by routing.cpp), AVX-512 and AVX2: the
// top-k columns of one float32 row of E logits, in the order of top_k_rows (descending, ties to
// the lower column), and their softmax weights — without a branch that depends on the data in the
// ranking. The AVX-512 kernel is described first; the AVX2 one (at the end) is the same algorithm
// on 8 lanes.
//
// 1. Bound: the lane-wise maximum over the C registers is the maximum of 16 strided column groups;
//    folded down to g >= k groups (g a power of two), the minimum of the g maxima is reached by g
//    distinct columns, so every top-k column is >= it. Usually about 2k columns pass (the scalar
//    insertion pass took ~25 hard-to-predict branches a row).
// 2. Candidates (columns >= bound, in column order) are compressed into at most 4 registers.
// 3. Each candidate's rank = #candidates above it + #equal ones at a lower column; rank < k is the
//    output position. Ranks are a permutation, so each position is written once.
// 4. Weights: exp by a degree-7 polynomial after a Cody–Waite reduction, scaled by vscalefps
//    (relative error ~1e-7, an ulp or two); max = the top value.
//
// A row the kernel does not take (returns false; nothing written) goes to the scalar pass: a NaN,
// more than 64 candidates (many ties), or a top value of ±inf (the softmax is then NaN or exact
// zeros, which the double pass gets right).
//
// Each is compiled for its instruction set with a target attribute and chosen at run time
// (best_isa(), capped by the caller), so the library still loads and runs the scalar pass on any
// x86-64 or non-x86 machine.
#pragma once

#include <cstdint>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define MMKERNELS_SIMD_ROWS 1
#include <immintrin.h>

#include <cmath>
#include <limits>

#include "vec_math.h"

namespace mmkernels {
namespace simd {

#define MMK_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,bmi,bmi2,popcnt")))

inline bool cpu_has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
  return ok;
}

// exp(x) for x <= 0 (not NaN): 2^n · e^r, |r| <= ln2/2, e^r by its Taylor polynomial of degree 7
// (truncation < 6e-9 relative), 2^n by vscalefps (underflows to 0 below -103).
MMK_AVX512 static inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 split: hi exact in n·hi
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Scatters the n <= 16·R candidates (cv, ci: in column order, padded to 16·R) to their ranks:
// rank = #candidates above + #equal ones at a lower column (= an earlier candidate). A store to
// the computed slot instead of a "rank < k" branch, which a random row mispredicts about every
// other candidate.
template <int R>
MMK_AVX512 static inline void rank_candidates(const float* cv, const int32_t* ci, int n, float* chosen,
                                              int32_t* chosen_id) {
  __m512 cr[R];
  __mmask16 valid[R];
  for (int r = 0; r < R; ++r) {
    const int rem = n - 16 * r;
    valid[r] = rem >= 16 ? __mmask16(0xFFFF) : rem <= 0 ? __mmask16(0) : __mmask16((1u << rem) - 1);
    cr[r] = _mm512_load_ps(cv + 16 * r);
  }
  for (int p = 0; p < n; ++p) {
    const __m512 b = _mm512_set1_ps(cv[p]);
    uint64_t above = 0, equal = 0;
    for (int r = 0; r < R; ++r) {
      above |= uint64_t(_mm512_mask_cmp_ps_mask(valid[r], cr[r], b, _CMP_GT_OQ)) << (16 * r);
      equal |= uint64_t(_mm512_mask_cmp_ps_mask(valid[r], cr[r], b, _CMP_EQ_OQ)) << (16 * r);
    }
    const int rank = __builtin_popcountll(above) + __builtin_popcountll(equal & ((uint64_t(1) << p) - 1));
    chosen_id[rank] = ci[p];
    chosen[rank] = cv[p];
  }
}

// What the softmax weights of one row are: none (ids only), the softmax over the k chosen
// (renormalised; gpt-oss's softmax after top-k), or the softmax over the whole row, gathered.
enum class Weights { kNone, kChosen, kRow };

// Row t of the router: ids[0..k) and, unless kNone, w[0..k) = softmax weights · scale.
// Requires 1 <= k <= 16 and E <= 16·C. Returns false, writing nothing, for the rows of the scalar
// pass (see the top of this file).
template <int C>
MMK_AVX512 static bool route_row(const float* row, int64_t E, int64_t k, Weights weights, float scale,
                                 int32_t* ids, float* w) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 v[C];
  __mmask16 live[C];
  __mmask16 nan = 0;
  __m512 lane_max = ninf;
  for (int c = 0; c < C; ++c) {
    const int64_t rem = E - 16 * c;
    live[c] = rem >= 16 ? __mmask16(0xFFFF) : rem <= 0 ? __mmask16(0) : __mmask16((1u << rem) - 1);
    v[c] = _mm512_mask_loadu_ps(ninf, live[c], row + 16 * c);
    nan |= _mm512_mask_cmp_ps_mask(live[c], v[c], v[c], _CMP_UNORD_Q);
    lane_max = _mm512_max_ps(lane_max, v[c]);
  }
  if (nan) return false;
  // fold the 16 lane maxima (disjoint column groups) to g >= k groups; the min over them bounds
  // the k-th largest from below (lanes of padding only are -inf: then every column passes)
  __m512 m = lane_max;
  if (k <= 8) m = _mm512_max_ps(m, _mm512_shuffle_f32x4(m, m, 0x4E));
  if (k <= 4) m = _mm512_max_ps(m, _mm512_shuffle_f32x4(m, m, 0xB1));
  if (k <= 2) m = _mm512_max_ps(m, _mm512_permute_ps(m, 0x4E));
  if (k <= 1) m = _mm512_max_ps(m, _mm512_permute_ps(m, 0xB1));
  const __m512 bound = _mm512_set1_ps(_mm512_reduce_min_ps(m));

  alignas(64) float cv[64 + 16];
  alignas(64) int32_t ci[64 + 16];
  int n = 0;
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int c = 0; c < C; ++c) {
    const __mmask16 pass = _mm512_mask_cmp_ps_mask(live[c], v[c], bound, _CMP_GE_OQ);
    const int cnt = __builtin_popcount(pass);
    if (n + cnt > 64) return false;
    _mm512_storeu_ps(cv + n, _mm512_maskz_compress_ps(pass, v[c]));
    _mm512_storeu_si512(ci + n, _mm512_maskz_compress_epi32(
                                    pass, _mm512_add_epi32(iota, _mm512_set1_epi32(16 * c))));
    n += cnt;
  }
  const float top = _mm512_reduce_max_ps(lane_max);
  if (weights != Weights::kNone && !std::isfinite(top)) return false;

  // every rank (< n <= 64) has its slot; the first k are the output
  alignas(64) float chosen[64];
  int32_t chosen_id[64];
  if (n <= 32)  // the register count as a constant: n hovers around 16, a branch on it would not
    rank_candidates<2>(cv, ci, n, chosen, chosen_id);
  else
    rank_candidates<4>(cv, ci, n, chosen, chosen_id);
  for (int i = 0; i < k; ++i) ids[i] = chosen_id[i];
  if (weights == Weights::kNone) return true;

  const __mmask16 first_k = __mmask16((1u << k) - 1);
  const __m512 top_v = _mm512_set1_ps(top);
  const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_load_ps(first_k, chosen), top_v));
  float denom;
  if (weights == Weights::kChosen) {
    denom = _mm512_mask_reduce_add_ps(first_k, e);
  } else {
    __m512 s = _mm512_setzero_ps();
    for (int c = 0; c < C; ++c) s = _mm512_add_ps(s, exp_nonpositive(_mm512_sub_ps(v[c], top_v)));  // pads: 0
    denom = _mm512_reduce_add_ps(s);
  }
  _mm512_mask_storeu_ps(w, first_k, _mm512_mul_ps(e, _mm512_set1_ps(scale / denom)));
  return true;
}

// route_row for E columns: the instance with the fewest registers that hold them (nullptr past 256).
using RowFn = bool (*)(const float*, int64_t, int64_t, Weights, float, int32_t*, float*);
inline RowFn route_row_for(int64_t E) {
  if (E <= 16) return &route_row<1>;
  if (E <= 32) return &route_row<2>;
  if (E <= 48) return &route_row<3>;
  if (E <= 64) return &route_row<4>;
  if (E <= 128) return &route_row<8>;
  if (E <= 256) return &route_row<16>;
  return nullptr;
}

#undef MMK_AVX512

// ---------------------------------------------------------------------------------------------
// AVX2 (8 lanes, no mask registers): the same steps. Differences: the bound folds 8 lane maxima,
// so k <= 8 (larger k: the scalar pass); candidates are compressed through a permutation per
// register; the ranks of 8 candidates are counted at once (rank_of_candidates); exp builds 2^n in
// the exponent bits (inputs below -87.3, whose exp is under float's normal range, give 0). The
// compress is a table lookup and a lane permutation (no pext: microcoded on older AMD cores).
// ---------------------------------------------------------------------------------------------

#define MMK_AVX2 __attribute__((target("avx2,fma,bmi,bmi2,popcnt")))

inline bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
  return ok;
}

MMK_AVX2 static inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

MMK_AVX2 static inline float hmin8(__m256 v) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  m = _mm_min_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

MMK_AVX2 static inline float hsum8(__m256 v) {
  __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_add_ps(m, _mm_movehl_ps(m, m));
  m = _mm_add_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// exp(x) for x <= 0 (not NaN), as exp_nonpositive: 2^n · e^r with the same reduction and
// polynomial; 2^n from the exponent bits, 0 where x < -87.3 (n would leave the normal range).
MMK_AVX2 static inline __attribute__((always_inline)) __m256 exp_nonpositive8(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

// kCompress8[m]: the set lanes of the 8-bit mask m in ascending order, one lane index a byte (the
// permutation that moves them to the front), for _mm256_permutevar8x32 after widening.
struct Compress8 {
  uint64_t lanes[256];
  constexpr Compress8() : lanes() {
    for (int m = 0; m < 256; ++m) {
      uint64_t packed = 0;
      int at = 0;
      for (int lane = 0; lane < 8; ++lane)
        if (m & (1 << lane)) packed |= uint64_t(lane) << (8 * at++);
      lanes[m] = packed;
    }
  }
  constexpr uint64_t operator[](unsigned m) const { return lanes[m]; }
};
inline constexpr Compress8 kCompress8{};

// The valid lanes of register c of a row of E columns, as a lane mask (all ones / zeros).
MMK_AVX2 static inline __m256i live_lanes8(int64_t E, int c) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int64_t rem = E - 8 * int64_t(c);
  const int32_t n = rem >= 8 ? 8 : rem <= 0 ? 0 : int32_t(rem);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane);
}

// rk[j] for the candidates cv[0 .. 8·CH) (in column order, padded with -inf): #candidates that
// come before j — p < j with a larger or equal value, p > j with a larger one. For each p in
// turn, one broadcast and a compare and a subtract per register of j's, all CH registers held
// in registers (CH a constant): GT on the registers wholly before p's, GE on those after, the two
// blended on p's own. (Counting a candidate's rank from its own compare masks — two movemasks and
// popcounts per register of others, a mask of the lanes before it — took 114 ns of a 150 ns row
// at E = 64, k = 8 on the 2-core Zen 3 VM, against 84 of 126 this way.) A -inf pad ranks after
// every candidate and adds to no candidate's count.
template <int CH>
MMK_AVX2 static inline __attribute__((always_inline)) void rank_of_candidates(const float* cv, int32_t* rk) {
  __m256 cj[CH];
  __m256i rank[CH];
  for (int q = 0; q < CH; ++q) {
    cj[q] = _mm256_load_ps(cv + 8 * q);
    rank[q] = _mm256_setzero_si256();
  }
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
#pragma GCC unroll 8
  for (int qp = 0; qp < CH; ++qp) {
    for (int l = 0; l < 8; ++l) {
      const __m256 b = _mm256_set1_ps(cv[8 * qp + l]);
#pragma GCC unroll 8
      for (int q = 0; q < CH; ++q) {
        __m256 beats;
        if (q < qp) beats = _mm256_cmp_ps(b, cj[q], _CMP_GT_OQ);
        else if (q > qp) beats = _mm256_cmp_ps(b, cj[q], _CMP_GE_OQ);
        else beats = _mm256_blendv_ps(_mm256_cmp_ps(b, cj[q], _CMP_GT_OQ), _mm256_cmp_ps(b, cj[q], _CMP_GE_OQ),
                                      _mm256_castsi256_ps(_mm256_cmpgt_epi32(lane, _mm256_set1_epi32(l))));
        rank[q] = _mm256_sub_epi32(rank[q], _mm256_castps_si256(beats));
      }
    }
  }
  for (int q = 0; q < CH; ++q) _mm256_store_si256(reinterpret_cast<__m256i*>(rk + 8 * q), rank[q]);
}

// Row t of the router on AVX2, as route_row. Requires 1 <= k <= 8 and E <= 8·C.
template <int C>
MMK_AVX2 static bool route_row_avx2(const float* row, int64_t E, int64_t k, Weights weights, float scale,
                                    int32_t* ids, float* w) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 v[C];
  int live[C];
  int nan = 0;
  __m256 lane_max = ninf;
  for (int c = 0; c < C; ++c) {
    const __m256i lanes = live_lanes8(E, c);
    live[c] = _mm256_movemask_ps(_mm256_castsi256_ps(lanes));
    v[c] = _mm256_blendv_ps(ninf, _mm256_maskload_ps(row + 8 * c, lanes), _mm256_castsi256_ps(lanes));
    nan |= _mm256_movemask_ps(_mm256_cmp_ps(v[c], v[c], _CMP_UNORD_Q));
    lane_max = _mm256_max_ps(lane_max, v[c]);
  }
  if (nan) return false;
  // fold the 8 lane maxima (disjoint column groups) to g >= k groups: their minimum bounds the
  // k-th largest from below
  __m256 m = lane_max;
  if (k <= 4) m = _mm256_max_ps(m, _mm256_permute2f128_ps(m, m, 0x01));
  if (k <= 2) m = _mm256_max_ps(m, _mm256_permute_ps(m, 0x4E));
  if (k <= 1) m = _mm256_max_ps(m, _mm256_permute_ps(m, 0xB1));
  const __m256 bound = _mm256_set1_ps(hmin8(m));

  alignas(32) float cv[64 + 8];
  alignas(32) int32_t ci[64 + 8];
  int n = 0;
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int c = 0; c < C; ++c) {
    const unsigned pass = unsigned(_mm256_movemask_ps(_mm256_cmp_ps(v[c], bound, _CMP_GE_OQ)) & live[c]);
    const int cnt = __builtin_popcount(pass);
    if (n + cnt > 64) return false;
    // compress: the passing lanes first, in lane order (the 8 writes past them are overwritten next)
    const __m256i order = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(kCompress8[pass])));
    _mm256_storeu_ps(cv + n, _mm256_permutevar8x32_ps(v[c], order));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ci + n),
                        _mm256_permutevar8x32_epi32(_mm256_add_epi32(iota, _mm256_set1_epi32(8 * c)), order));
    n += cnt;
  }
  for (int q = n; q < n + 8; ++q) cv[q] = -std::numeric_limits<float>::infinity();  // never above, never earlier
  const float top = hmax8(lane_max);
  if (weights != Weights::kNone && !std::isfinite(top)) return false;

  // every rank < n has its slot (ranks are a permutation); the first k are the output
  alignas(32) int32_t rk[64];
  switch ((n + 7) / 8) {  // n <= 64
    case 1: rank_of_candidates<1>(cv, rk); break;
    case 2: rank_of_candidates<2>(cv, rk); break;
    case 3: rank_of_candidates<3>(cv, rk); break;
    case 4: rank_of_candidates<4>(cv, rk); break;
    case 5: rank_of_candidates<5>(cv, rk); break;
    case 6: rank_of_candidates<6>(cv, rk); break;
    case 7: rank_of_candidates<7>(cv, rk); break;
    default: rank_of_candidates<8>(cv, rk); break;
  }
  alignas(32) float chosen[64];
  int32_t chosen_id[64];
  for (int p = 0; p < n; ++p) {
    chosen_id[rk[p]] = ci[p];
    chosen[rk[p]] = cv[p];
  }
  for (int i = 0; i < k; ++i) ids[i] = chosen_id[i];
  if (weights == Weights::kNone) return true;

  const __m256i first_k = _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(k)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256 top_v = _mm256_set1_ps(top);
  const __m256 chosen_k = _mm256_blendv_ps(top_v, _mm256_maskload_ps(chosen, first_k), _mm256_castsi256_ps(first_k));
  const __m256 e = _mm256_and_ps(exp_nonpositive8(_mm256_sub_ps(chosen_k, top_v)), _mm256_castsi256_ps(first_k));
  float denom;
  if (weights == Weights::kChosen) {
    denom = hsum8(e);
  } else {
    __m256 s = _mm256_setzero_ps();
    for (int c = 0; c < C; ++c) s = _mm256_add_ps(s, exp_nonpositive8(_mm256_sub_ps(v[c], top_v)));  // pads: 0
    denom = hsum8(s);
  }
  _mm256_maskstore_ps(w, first_k, _mm256_mul_ps(e, _mm256_set1_ps(scale / denom)));
  return true;
}

inline RowFn route_row_avx2_for(int64_t E) {
  if (E <= 8) return &route_row_avx2<1>;
  if (E <= 16) return &route_row_avx2<2>;
  if (E <= 24) return &route_row_avx2<3>;
  if (E <= 32) return &route_row_avx2<4>;
  if (E <= 48) return &route_row_avx2<6>;
  if (E <= 64) return &route_row_avx2<8>;
  if (E <= 128) return &route_row_avx2<16>;
  if (E <= 256) return &route_row_avx2<32>;
  return nullptr;
}

#undef MMK_AVX2

// The best the CPU runs, by vec_math.h's level numbers (kBaseline: the scalar pass, none here).
inline int best_isa() { return cpu_has_avx512() ? kAvx512 : cpu_has_avx2() ? kAvx2 : kBaseline; }

// The row kernel of instruction set isa (as capped and supported) for float32 rows of E columns
// and this k, or nullptr (the scalar pass).
inline RowFn row_kernel(int isa, int64_t E, int64_t k) {
  if (isa >= kAvx512 && k <= 16) return route_row_for(E);
  if (isa >= kAvx2 && k <= 8) return route_row_avx2_for(E);
  return nullptr;
}
}  // namespace simd
}  // namespace mmkernels
#endif
