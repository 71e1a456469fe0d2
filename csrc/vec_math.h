// Helpers the CPU kernels' vectorised loops share: the instruction-set levels and the call at the
// active one (MMK_RUN_VECTORISED; vec_levels.h compiles the loops per level), the always-inline
// macros, exp for non-positive arguments (softmax's x - max, the sigmoid's -|x|) and the streaming
// copy of a computed block to a large output.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#include <immintrin.h>  // the AVX-512 BF16 conversion of vec_level.h's narrow_into (used under its target only)
#endif
#if defined(__unix__)
#include <unistd.h>
#endif

// The levels need GCC 11 or later (its x86-64-v3 / v4 target names); elsewhere the baseline only.
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define MMK_LEVELS 1
#endif
// The helpers the vectorised loops call: inlined into the loop's copy for each level (a call would
// run the baseline ISA).
#define MMK_INLINE inline __attribute__((always_inline))
// The same for a lambda (after its parameter list): the loop bodies blocked_sum (vec_level.h) takes.
#define MMK_LAMBDA_INLINE __attribute__((always_inline))

namespace mmkernels {

// Instruction-set levels of the CPU kernels, by number: 0 the baseline (scalar router rows), 1
// x86-64-v3 (AVX2, FMA), 2 x86-64-v4 (AVX-512), 3 x86-64-v4 with AVX512-BF16 (Cooper Lake,
// Sapphire Rapids, Zen 4: float -> bfloat16 in one instruction, vec_level.h narrow_into; the router
// rows run their AVX-512 kernel there). The best the CPU has runs, capped by isa_cap()
// (mmkernels_cpu::cpu_isa: the tests run every level the CPU has).
enum IsaLevel : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

inline int cpu_level() {
#ifdef MMK_LEVELS
  // by feature (the level names of __builtin_cpu_supports need GCC 12; the pragmas GCC 11)
  static const int level =
      (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
       __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
       __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
       __builtin_cpu_supports("bmi2"))
          ? (__builtin_cpu_supports("avx512bf16") ? kAvx512Bf16 : kAvx512)
      : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
         __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("movbe"))
          ? kAvx2
          : kBaseline;
  return level;
#else
  return kBaseline;
#endif
}

inline std::atomic<int>& isa_cap() {
  static std::atomic<int> cap{kAvx512Bf16};
  return cap;
}

// The level the kernels run at now: the CPU's best, capped.
inline int active_level() { return std::min(isa_cap().load(std::memory_order_relaxed), cpu_level()); }

// MMK_RUN_VECTORISED(kernel, args...) calls kernel(args...) at active_level(): the kernel's loops
// are compiled once per level by vec_levels.h, each copy in a namespace of its level (avx512,
// avx2, baseline) with that level's target in effect where the loops are defined. (GCC's
// target_clones, and an always-inline kernel inlined into a function with a target attribute,
// vectorised the bfloat16 softmax forward 256 bits wide on a Xeon with AVX-512: 0.6-0.9x the copy
// defined under the target.) Other architectures and compilers: the baseline copy only.
#ifdef MMK_LEVELS
#define MMK_RUN_VECTORISED(kernel, ...)                              \
  do {                                                               \
    switch (::mmkernels::active_level()) {                           \
      case ::mmkernels::kAvx512Bf16:                                 \
        avx512bf16::kernel(__VA_ARGS__);                             \
        break;                                                       \
      case ::mmkernels::kAvx512: avx512::kernel(__VA_ARGS__); break; \
      case ::mmkernels::kAvx2: avx2::kernel(__VA_ARGS__); break;     \
      default: baseline::kernel(__VA_ARGS__);                        \
    }                                                                \
  } while (0)
#else
#define MMK_RUN_VECTORISED(kernel, ...) baseline::kernel(__VA_ARGS__)
#endif

// bfloat16 <-> float: the top 16 bits of a float are a bfloat16; narrowing rounds to nearest even
// (NaN stays a quiet NaN of its sign), as c10::BFloat16. Written on the raw bits so that the loops
// vectorise them (vec_level.h narrow_into: a block of them, in one instruction per 32 where the
// level has AVX512-BF16).
MMK_INLINE float widen(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// A bfloat16 row read as pairs: the 32-bit word k holds elements 2k (its low half) and 2k + 1 (its
// high half), whose floats are the word shifted up and the word with its low half cleared — two
// instructions widen 2 × 16 elements, where widening each in order takes four (a zero-extension
// per half and its shift).
MMK_INLINE uint32_t pair_at(const uint16_t* x, int64_t k) {
  uint32_t w;
  std::memcpy(&w, x + 2 * k, sizeof(w));  // a row of odd length starts 2 bytes off a word
  return w;
}

MMK_INLINE float low_of(uint32_t w) {
  const uint32_t u = w << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

MMK_INLINE float high_of(uint32_t w) {
  const uint32_t u = w & 0xffff0000u;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// The float and double loads of loops written for every storage type: already in their math type.
MMK_INLINE float widen(float v) { return v; }
MMK_INLINE double widen(double v) { return v; }

MMK_INLINE uint16_t narrow(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return f != f ? uint16_t((u >> 16) | 0x0040u) : uint16_t(rounded);
}

// The bfloat16 nearest to f (ties to even) in the high half of the result, its low half garbage:
// narrow's rounding without its NaN select. The same bits as narrow for every value made by IEEE
// arithmetic from bfloat16 operands — their NaNs are quiet and have a zero low half, which the
// rounding leaves as it is — but not for an arbitrary float NaN (a low half that carries would make
// it an infinity or a zero). Five integer instructions a vector, where narrow's select and 16-bit
// packing took a dozen on AVX2.
MMK_INLINE uint32_t rounded_high(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u + 0x7fffu + ((u >> 16) & 1u);
}

// Two such values (rounded_high's condition) as one 32-bit word of bfloat16: lo the first element.
MMK_INLINE uint32_t narrow_pair(float lo, float hi) { return rounded_high(lo) >> 16 | (rounded_high(hi) & 0xffff0000u); }

// exp(x) for x <= kExpNpMax, -inf or NaN (the softmax's x - max; a log-softmax output): 2^n · e^r,
// |r| <= ln2/2, e^r by a polynomial fitted for the least relative error on that interval (least
// squares reweighted towards the worst points, its constant term 1), 2^n from the exponent bits;
// below -87.3 (past float's normal range) 0, NaN stays NaN (the polynomial of a NaN r is NaN).
// Degree 6 (the default): 2e-9 relative, under float's rounding (1e-7 evaluated in float); degree
// 4: 2.9e-6, for values stored as bfloat16 (whose rounding is 3.9e-3). (The Taylor polynomial of
// degree 7 it replaces: two FMAs more, and an integer conversion and a NaN select that t's bits and
// the polynomial make needless.) Up to kExpNpMax 2^n's exponent bits hold (n <= 127) and the
// relative error on (0, 88] is the one below 0 (checked every 1e-4 against std::exp: 1.1e-7 degree
// 6, 6.9e-6 degree 4); from 88.38 they overflow (inf where exp is still finite, garbage past 88.73).
constexpr float kExpNpMax = 88.0f;

template <int Degree = 6>
MMK_INLINE float exp_np(float x) {
  static_assert(Degree == 4 || Degree == 6, "exp_np has polynomials of degree 4 and 6");
  // t = x·log2(e) + 1.5·2^23 + 127 rounds x·log2(e) to the nearest integer n, and its low
  // mantissa bits hold n + 127 (-126 <= n <= 127): shifted up 23 they are 2^n's float bits.
  // (Adding and taking away a constant vectorises on every level, where __builtin_nearbyintf needs
  // SSE4.1; not folded away without -ffast-math.)
  constexpr float kShift = 12582912.0f + 127.0f;
  const float t = x * 1.44269504088896341f + kShift;
  const float n = t - kShift;
  float r;
  if constexpr (Degree == 6) {
    r = x - n * 0.693145751953125f;  // ln2 split: n·hi exact
    r = r - n * 1.428606765330187e-06f;
  } else {  // one step: ln2's rounding, 2e-9 relative, gives |n|·2e-9 <= 2.4e-7, a tenth of the polynomial's
    r = x - n * 0.693147182464599609375f;
  }
  float p;  // e^r = 1 + r·(c1 + r·(c2 + ...)): exactly 1 at r = 0 (a row of one element: 1, log 0)
  if constexpr (Degree == 6) {
    p = 1.3843653302552082e-3f;
    p = p * r + 8.3741554762228904e-3f;
    p = p * r + 4.1668002049035778e-2f;
    p = p * r + 1.6666431260648085e-1f;
    p = p * r + 4.9999994208951504e-1f;
    p = p * r + 1.0000000321654807f;
  } else {
    p = 4.1513845982307979e-2f;
    p = p * r + 1.6787474010317993e-1f;
    p = p * r + 5.0003013692753706e-1f;
    p = p * r + 9.9996683616272597e-1f;
  }
  p = p * r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &t, sizeof(bits));
  bits = static_cast<int32_t>(static_cast<uint32_t>(bits) << 23);
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.3f ? 0.0f : p * scale;
}

// 2^u for u <= 0, -inf or NaN, for values stored as bfloat16: exp_np<4>'s polynomial in base 2
// (its coefficients times ln2^k: the same 2.9e-6 relative, on |f| <= 1/2), 2^n from t's bits as
// exp_np; below -127 +0 exactly (2^n's bits all zero), NaN stays NaN. The softmax's exp(x - max)
// as exp2_np4((x - max)·log2 e): the product rounds once (2^-24 of |u| <= 127: at most 5e-6
// relative, on the smallest exps; bfloat16's rounding is 3.9e-3), and the reduction f = u - n is an
// add where exp_np's r = x - n·ln2 is an FMA — two FMA-class instructions fewer than exp_np<4> of
// sign·x - max (the FMA pipes are the bfloat16 forward's bound).
MMK_INLINE float exp2_np4(float u) {
  constexpr float kShift = 12582912.0f + 127.0f;  // as exp_np's: t's low bits hold n + 127
  const float t = u + kShift;
  const float n = t - kShift;
  const float f = u - n;
  float p = 9.5828527298890043e-3f;
  p = p * f + 5.5906426900593479e-2f;
  p = p * f + 2.4024098633676610e-1f;
  p = p * f + 6.9312419313964223e-1f;
  p = p * f + 1.0f;  // exactly 1 at u = 0: the row's max gives 1
  int32_t bits;
  std::memcpy(&bits, &t, sizeof(bits));
  bits = static_cast<int32_t>(static_cast<uint32_t>(bits) << 23);
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return u < -127.0f ? 0.0f : p * scale;
}

// double: std::exp (the float rows' overload above is the exact match for a float argument)
MMK_INLINE double exp_np(double x) { return std::exp(x); }

// The exp of a value to be stored as S (the first argument only picks the overload: loops written
// for every storage type pass their tensor's pointer): float exp_np, bfloat16 (uint16_t) exp_np<4>
// (its error a thousandth of the rounding to 8 bits), double std::exp.
MMK_INLINE float exp_for(const float*, float x) { return exp_np(x); }
MMK_INLINE float exp_for(const uint16_t*, float x) { return exp_np<4>(x); }
MMK_INLINE double exp_for(const double*, double x) { return exp_np(x); }

// Copies `bytes` from src (a small block the caller just computed, in cache) to dst with
// non-temporal stores for dst's 16-byte-aligned body where the CPU has them (x86-64: SSE2, so
// every x86-64 CPU): the destination's lines are written without being read first (no
// read-for-ownership), so a pass that reads two large tensors and writes a third moves 3 tensors'
// bytes instead of 4, and the output does not evict the inputs from the caches. Elsewhere a plain
// copy. Call stream_fence() before another thread may read dst.
inline void stream_copy(void* dst, const void* src, size_t bytes) {
#if defined(__SSE2__)
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  const size_t head = std::min(bytes, (16 - reinterpret_cast<uintptr_t>(d) % 16) % 16);
  std::memcpy(d, s, head);
  size_t i = head;
  for (; i + 16 <= bytes; i += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
  }
  std::memcpy(d + i, s + i, bytes - i);
#else
  std::memcpy(dst, src, bytes);
#endif
}

// The last-level cache's size: on Linux the largest level of cpu0's caches in sysfs (the kernel's
// reading of CPUID), else sysconf's level-3 (then level-2) size, else 8 MiB. A kernel streams its
// output (stream_copy) only when its tensors would not stay in that cache anyway. (glibc's sysconf
// is not the cache: 320 MiB on a Zen 4 VM whose sysfs and CPUID say 32 MiB, where streaming the
// softmax backward's dx at 48 MiB of tensors read 1.11-1.15x ATen's against 0.98-1.00x plain. A
// Zen 1 VM with 8 MiB: streamed 1.06-1.20x, plain 1.05-1.08x; a Xeon VM with 480 MiB: streamed
// 0.68-0.84x, plain 0.89-1.06x, at 16 MiB tensors.)
inline size_t sysfs_cache_bytes() {
  size_t best = 0;
  int best_level = 0;
#if defined(__linux__)
  for (int i = 0; i < 16; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::ifstream level_file(dir + "level"), size_file(dir + "size"), type_file(dir + "type");
    int level = 0;
    size_t size = 0;
    std::string unit, type;
    if (!(level_file >> level) || !(size_file >> size)) break;
    size_file >> unit;  // "32768K": the number read, then its unit
    type_file >> type;
    if (type == "Instruction") continue;
    size <<= unit == "K" ? 10 : unit == "M" ? 20 : unit == "G" ? 30 : 0;
    if (level > best_level || (level == best_level && size > best)) {
      best_level = level;
      best = size;
    }
  }
#endif
  return best;
}

inline size_t last_level_cache_bytes() {
  static const size_t bytes = [] {
    long size = static_cast<long>(sysfs_cache_bytes());
#if defined(_SC_LEVEL3_CACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)
    if (size <= 0) size = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (size <= 0) size = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return size > 0 ? static_cast<size_t>(size) : static_cast<size_t>(8) << 20;
  }();
  return bytes;
}

// Orders the non-temporal stores of stream_copy before any later store of this thread (the end of
// a parallel task: the joining thread then sees them).
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

}  // namespace mmkernels
