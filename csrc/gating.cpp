// The gating family's blend on the CPU: out = g·a + (1 - g)·b with g = σ(pre), and its backward
// (da = dout·g, db = dout·(1 - g), dpre = dout·(a - b)·g·(1 - g)) — the CPU path of
// mmkernels.ops.gating for contiguous float32 / float64 / bfloat16 tensors of one shape and dtype
// (bfloat16: float math, each value widened as read and each result narrowed to nearest even as
// written; the torch path, and eager torch, make a pass and a temporary per op and per cast:
// 0.31x this op's eager composition in bf16 before).
//
// Registered as mmkernels_cpu::gated_blend_forward / gated_blend_backward; loaded by
// mmkernels/_cpp.py.
//
// Each is one pass over its tensors (the forward reads pre, a, b and writes out; the backward
// reads dout, pre, a, b and writes da, db, dpre), where the torch composition makes a pass per op
// and a temporary for each. g is recomputed in the backward (nothing saved but the inputs).
// Elements in parallel over ATen's threads, each with one writer: bitwise-identical reruns.
//
// σ(x) from exp(-|x|) (never overflows): 1 / (1 + e) for x >= 0, e / (1 + e) below; float by
// vec_math.h's polynomial exp, double by std::exp. NaN in pre gives NaN, ±inf gives g = 1 / 0.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "vec_math.h"

namespace mmkernels {
namespace {

template <typename T>
MMK_INLINE T sigmoid(T x) {
  const T e = exp_np(x < T(0) ? x : -x);  // exp(-|x|), NaN stays NaN
  const T inv = T(1) / (T(1) + e);
  return x < T(0) ? e * inv : inv;
}

#define MMK_LOOPS "gating_loops.h"
#include "vec_levels.h"

constexpr int64_t kGrain = 1 << 15;  // elements per task: a few hundred KB of traffic

void check_blend(const std::vector<at::Tensor>& ts) {
  for (const auto& t : ts) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "gated_blend: contiguous CPU tensors expected");
    TORCH_CHECK(t.scalar_type() == ts[0].scalar_type() && t.sizes() == ts[0].sizes(),
                "gated_blend: tensors of one dtype and shape expected");
  }
  TORCH_CHECK(ts[0].scalar_type() == at::kFloat || ts[0].scalar_type() == at::kDouble ||
                  ts[0].scalar_type() == at::kBFloat16,
              "gated_blend: float32, float64 or bfloat16 expected");
}

at::Tensor gated_blend_forward(const at::Tensor& pre, const at::Tensor& a, const at::Tensor& b) {
  check_blend({pre, a, b});
  at::Tensor out = at::empty_like(a);
  if (a.scalar_type() == at::kBFloat16) {
    const uint16_t* p = reinterpret_cast<const uint16_t*>(pre.data_ptr<at::BFloat16>());
    const uint16_t* pa = reinterpret_cast<const uint16_t*>(a.data_ptr<at::BFloat16>());
    const uint16_t* pb = reinterpret_cast<const uint16_t*>(b.data_ptr<at::BFloat16>());
    uint16_t* po = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
    at::parallel_for(0, a.numel(), kGrain, [&](int64_t lo, int64_t hi) {
      MMK_RUN_VECTORISED(blend_forward_range_bf16, p + lo, pa + lo, pb + lo, po + lo, hi - lo);
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "gated_blend_forward", [&] {
    const scalar_t *p = pre.data_ptr<scalar_t>(), *pa = a.data_ptr<scalar_t>(), *pb = b.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, a.numel(), kGrain, [&](int64_t lo, int64_t hi) {
      MMK_RUN_VECTORISED(blend_forward_range<scalar_t>, p + lo, pa + lo, pb + lo, po + lo, hi - lo);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_blend_backward(const at::Tensor& dout, const at::Tensor& pre,
                                                                    const at::Tensor& a, const at::Tensor& b) {
  check_blend({dout, pre, a, b});
  at::Tensor da = at::empty_like(a), db = at::empty_like(b), dpre = at::empty_like(pre);
  if (a.scalar_type() == at::kBFloat16) {
    const auto in = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); };
    const auto out = [](at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); };
    const uint16_t *pd = in(dout), *p = in(pre), *pa = in(a), *pb = in(b);
    uint16_t *oa = out(da), *ob = out(db), *op = out(dpre);
    at::parallel_for(0, a.numel(), kGrain, [&](int64_t lo, int64_t hi) {
      MMK_RUN_VECTORISED(blend_backward_range_bf16, pd + lo, p + lo, pa + lo, pb + lo, oa + lo, ob + lo, op + lo,
                         hi - lo);
    });
    return {da, db, dpre};
  }
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "gated_blend_backward", [&] {
    const scalar_t *pd = dout.data_ptr<scalar_t>(), *p = pre.data_ptr<scalar_t>();
    const scalar_t *pa = a.data_ptr<scalar_t>(), *pb = b.data_ptr<scalar_t>();
    scalar_t *oa = da.data_ptr<scalar_t>(), *ob = db.data_ptr<scalar_t>(), *op = dpre.data_ptr<scalar_t>();
    at::parallel_for(0, a.numel(), kGrain, [&](int64_t lo, int64_t hi) {
      MMK_RUN_VECTORISED(blend_backward_range<scalar_t>, pd + lo, p + lo, pa + lo, pb + lo, oa + lo, ob + lo, op + lo, hi - lo);
    });
  });
  return {da, db, dpre};
}

}  // namespace
}  // namespace mmkernels

TORCH_LIBRARY_FRAGMENT(mmkernels_cpu, m) {
  m.def("gated_blend_forward(Tensor pre, Tensor a, Tensor b) -> Tensor");
  m.def("gated_blend_backward(Tensor dout, Tensor pre, Tensor a, Tensor b) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmkernels_cpu, CPU, m) {
  m.impl("gated_blend_forward", &mmkernels::gated_blend_forward);
  m.impl("gated_blend_backward", &mmkernels::gated_blend_backward);
}
