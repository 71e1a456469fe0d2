// The product unit's elementwise steps on the CPU — the CPU path of mmkernels.ops.product for
// float32 (its math dtype; float64 runs the torch composition; the product over the last dim
// float64 too): the two GEMMs A = log|x|·Wᵀ and
// B = [x < 0]·Wᵀ stay ATen's, and what the composition did around them in a pass and a temporary
// per op is one pass each here.
//
// Registered as mmkernels_cpu::product_over_last / product_over_last_backward (the product of
// each row of S factors and its gradient g·Π_{t≠s} h_t from prefix and suffix products — no
// division, exact with zeros — for the pi-sigma network and the sigma-pi unit: one pass each, where
// ProductOverLastFunction's torch ops made 3·S - 4 products of strided slices and a stack),
// mmkernels_cpu::product_exp_cis_ (P = exp(A)·cos(πB) into A and, when asked,
// Q = exp(A)·sin(πB) into B: the forward's epilogue; the composition made exp, the π multiply,
// cos, sin and two products, four passes over (N, J) and three temporaries) and product_dx_ (dx =
// dlog / x where |x| > eps, else 0, into dlog: the backward's last step; abs, compare, divide and
// where before, four passes and three temporaries); loaded by mmkernels/_cpp.py.
//
// cos(πb) and sin(πb) by sincospi: b reduced exactly to r = b - q/2, |r| <= 1/4 (q the integer
// nearest 2b), then the Taylor polynomials of sin and cos of πr (truncation under 3e-9 relative)
// and q's quadrant — more exact than cos of the rounded product π·b, and exactly ±1 and 0 where b
// is an integer (integer exponents: the sign of a real product). exp by vec_math.h's polynomial,
// over float's whole range (exp_any). NaN in a or b, and ±inf in b, give NaN as torch's would.
// Elements in parallel over ATen's threads, each with one writer: bitwise-identical reruns.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "vec_math.h"

namespace mmkernels {
namespace {

// exp(x) for any float: exp_np up to kExpNpMax; above it e^(x - 1)·e (x - 1 capped at kExpNpMax,
// where the product is already past float's range: +inf), one rounding more. Below -87.3: 0.
MMK_INLINE float exp_any(float x) {
  const bool high = x > kExpNpMax;
  const float down = x - 1.0f;
  const float y = high ? (down < kExpNpMax ? down : kExpNpMax) : x;
  return exp_np(y) * (high ? 2.71828182845904524f : 1.0f);
}

// s, c = sin(πb), cos(πb). q = the integer nearest 2b (1.5·2^23 added and taken away, for |2b| <
// 2^22; beyond, 2b itself, within 1/2 of an integer already), r = b - q/2 exactly, |r| <= 1/4;
// sin(πr) and cos(πr) by their Taylor polynomials in r (π's powers in the coefficients: degree 9
// and 10, truncation 2e-9 and 1e-10 at r = 1/4), rotated by q's quadrant (q mod 4, from q as an
// integer: past 2^30 b is a multiple of 64, so q = 2b is one of 4).
MMK_INLINE void sincospi(float b, float& s, float& c) {
  constexpr float kShift = 12582912.0f;
  const float h = b * 2.0f;
  const float q = std::fabs(h) < 4194304.0f ? (h + kShift) - kShift : h;
  const float r = b - q * 0.5f;
  const float r2 = r * r;
  float ps = 8.21458866111282e-2f;  // π^9 / 9!
  ps = ps * r2 - 5.99264529320792e-1f;
  ps = ps * r2 + 2.55016403987734f;
  ps = ps * r2 - 5.16771278004997f;
  ps = ps * r2 + 3.14159265358979f;
  const float sr = ps * r;
  float pc = -2.58068913900141e-2f;  // -π^10 / 10!
  pc = pc * r2 + 2.35330630358893e-1f;
  pc = pc * r2 - 1.33526276885459f;
  pc = pc * r2 + 4.05871212641677f;
  pc = pc * r2 - 4.93480220054468f;
  const float cr = pc * r2 + 1.0f;
  const int32_t quadrant = static_cast<int32_t>(std::fabs(q) < 1073741824.0f ? q : 0.0f);
  const bool swap = quadrant & 1;
  const float sv = swap ? cr : sr, cv = swap ? sr : cr;
  s = (quadrant & 2) ? -sv : sv;
  c = ((quadrant + 1) & 2) ? -cv : cv;
}

#define MMK_LOOPS "product_loops.h"
#include "vec_levels.h"

constexpr int64_t kGrain = 1 << 14;  // elements per task: the epilogue's math is ~40 instructions a lane

void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == at::kFloat, op, ": ", name,
              " must be a contiguous float32 CPU tensor");
}

// a, b: (N, J) float32, contiguous: A and B in, P and (with_sin) Q out.
void product_exp_cis_(at::Tensor& a, at::Tensor& b, bool with_sin) {
  check_float(a, "product_exp_cis_", "a");
  check_float(b, "product_exp_cis_", "b");
  TORCH_CHECK(a.sizes() == b.sizes(), "product_exp_cis_: a and b must have one shape");
  float* pa = a.data_ptr<float>();
  float* pb = b.data_ptr<float>();
  at::parallel_for(0, a.numel(), kGrain, [&](int64_t lo, int64_t hi) {
    MMK_RUN_VECTORISED(exp_cis_range, pa + lo, pb + lo, hi - lo, with_sin);
  });
}

// dlog: (N, I) float32, contiguous, the gradient of log|x|; x: (N, I) float32, contiguous.
void product_dx_(at::Tensor& dlog, const at::Tensor& x, double eps) {
  check_float(dlog, "product_dx_", "dlog");
  check_float(x, "product_dx_", "x");
  TORCH_CHECK(dlog.sizes() == x.sizes(), "product_dx_: dlog and x must have one shape");
  float* pd = dlog.data_ptr<float>();
  const float* px = x.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, x.numel(), kGrain, [&](int64_t lo, int64_t hi) {
    MMK_RUN_VECTORISED(dx_range, pd + lo, px + lo, hi - lo, e);
  });
}

void check_rows(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() &&
                  (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
              op, ": ", name, " must be a contiguous float32 or float64 CPU tensor");
}

// fn<T, S>(args..., s_count) at the active level for the rows' factor count S: 2, 3, 4 and 8 as
// constants, others at run time (MMK_COMMA: a comma that does not split the macro's arguments).
#define MMK_COMMA ,
#define MMK_BY_FACTORS(fn, T, S, ...)                                        \
  switch (S) {                                                               \
    case 2: MMK_RUN_VECTORISED(fn<T MMK_COMMA 2>, __VA_ARGS__, S); break;    \
    case 3: MMK_RUN_VECTORISED(fn<T MMK_COMMA 3>, __VA_ARGS__, S); break;    \
    case 4: MMK_RUN_VECTORISED(fn<T MMK_COMMA 4>, __VA_ARGS__, S); break;    \
    case 8: MMK_RUN_VECTORISED(fn<T MMK_COMMA 8>, __VA_ARGS__, S); break;    \
    default: MMK_RUN_VECTORISED(fn<T MMK_COMMA 0>, __VA_ARGS__, S); break;   \
  }

// h: (..., S), S >= 1 -> (...): the product of each row of S factors.
at::Tensor product_over_last(const at::Tensor& h) {
  check_rows(h, "product_over_last", "h");
  TORCH_CHECK(h.dim() >= 1 && h.size(-1) >= 1, "product_over_last: h must have a last dim of 1 or more");
  const int64_t S = h.size(-1), rows = h.numel() / S;
  at::Tensor out = at::empty(h.sizes().slice(0, h.dim() - 1), h.options());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "product_over_last", [&] {
    const scalar_t* ph = h.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / S), [&](int64_t r0, int64_t r1) {
      MMK_BY_FACTORS(prod_last_range, scalar_t, S, ph + r0 * S, po + r0, r1 - r0)
    });
  });
  return out;
}

// h: (..., S), g: (...) -> dh: (..., S), g·Π_{t≠s} h_t.
at::Tensor product_over_last_backward(const at::Tensor& h, const at::Tensor& g) {
  check_rows(h, "product_over_last_backward", "h");
  check_rows(g, "product_over_last_backward", "g");
  TORCH_CHECK(h.dim() >= 1 && h.size(-1) >= 1 && g.scalar_type() == h.scalar_type() &&
                  g.sizes() == h.sizes().slice(0, h.dim() - 1),
              "product_over_last_backward: g must be h's shape without its last dim, in h's dtype");
  const int64_t S = h.size(-1), rows = h.numel() / S;
  at::Tensor dh = at::empty_like(h);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "product_over_last_backward", [&] {
    const scalar_t* ph = h.data_ptr<scalar_t>();
    const scalar_t* pg = g.data_ptr<scalar_t>();
    scalar_t* pd = dh.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / S), [&](int64_t r0, int64_t r1) {
      MMK_BY_FACTORS(prod_last_backward_range, scalar_t, S, ph + r0 * S, pg + r0, pd + r0 * S, r1 - r0)
    });
  });
  return dh;
}

#undef MMK_BY_FACTORS
#undef MMK_COMMA

}  // namespace
}  // namespace mmkernels

TORCH_LIBRARY_FRAGMENT(mmkernels_cpu, m) {
  m.def("product_exp_cis_(Tensor(a!) a, Tensor(b!) b, bool with_sin) -> ()");
  m.def("product_dx_(Tensor(a!) dlog, Tensor x, float eps) -> ()");
  m.def("product_over_last(Tensor h) -> Tensor");
  m.def("product_over_last_backward(Tensor h, Tensor g) -> Tensor");
}

TORCH_LIBRARY_IMPL(mmkernels_cpu, CPU, m) {
  m.impl("product_exp_cis_", &mmkernels::product_exp_cis_);
  m.impl("product_dx_", &mmkernels::product_dx_);
  m.impl("product_over_last", &mmkernels::product_over_last);
  m.impl("product_over_last_backward", &mmkernels::product_over_last_backward);
}
