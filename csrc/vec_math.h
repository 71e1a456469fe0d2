// Helpers the CPU kernels' vectorised loops share: the target_clones / always-inline macros and
// exp for non-positive arguments (softmax's x - max, the sigmoid's -|x|).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

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

}  // namespace mmkernels
