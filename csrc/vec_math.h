// Helpers the CPU kernels' vectorised loops share: the target_clones / always-inline macros, exp
// for non-positive arguments (softmax's x - max, the sigmoid's -|x|) and the streaming copy of a
// computed block to a large output.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <algorithm>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#define MMK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MMK_CLONES
#endif
// The helpers the cloned loops call: inlined into each clone (a call would run the baseline ISA).
#define MMK_INLINE inline __attribute__((always_inline))

namespace mmkernels {

// exp(x) for x <= 0, -inf or NaN (the softmax's x - max): 2^n · e^r, |r| <= ln2/2, e^r by its Taylor
// polynomial of degree 7, 2^n from the exponent bits; below -87.3 (past float's normal range) 0,
// NaN stays NaN.
MMK_INLINE float exp_np(float x) {
  const float xc = x < -87.3f ? -87.3f : x;
  const float n = __builtin_nearbyintf(xc * 1.44269504088896341f);
  float r = xc - n * 0.693145751953125f;  // ln2 split: n·hi exact
  r = r - n * 1.428606765330187e-06f;
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float v = x < -87.3f ? 0.0f : p * scale;
  return x != x ? x : v;
}

MMK_INLINE double exp_np(double x) { return std::exp(x); }

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

// Orders the non-temporal stores of stream_copy before any later store of this thread (the end of
// a parallel task: the joining thread then sees them).
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

}  // namespace mmkernels
