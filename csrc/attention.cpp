// The attention module on the CPU: s = Σ_j p_j · x_j with p = softmax(z / τ) over the allowed j,
// and its backward (dx_j = p_j · ds, dz_j = p_j · (x_j·ds - s·ds) / τ) — the CPU path of
// mmkernels.ops.attention for float32 / float64 with x contiguous (R, J, D); z, the mask and ds
// with any strides.
//
// Registered as mmkernels_cpu::attention_forward / attention_backward, and hard_switch_backward (the
// hard switch's dx: the chosen input's ds, zeros elsewhere, one write); loaded by mmkernels/_cpp.py.
// dx comes from the pool of csrc/pool.h (it is x's size).
//
// One row r at a time, x_r (J × D) read once each way: the forward makes the row's log-sum-exp
// and p (J values, in a per-task buffer) and accumulates s_r over j, D wide; the backward
// rebuilds p from z and the saved log-sum-exp and, per j, makes x_j·ds and writes dx_j in the same
// pass over x_j. The torch composition it replaces reads x twice in the backward (the products
// for dz, then the outer product for dx as a batched GEMM of inner dimension 1) and keeps (R, J)
// temporaries for every step. Rows in parallel over ATen's threads, each with one writer and
// sums in a fixed order: bitwise-identical reruns.
//
// Special values as the composition (torch.logsumexp, exp, where): lse = m + log Σ exp(l - m)
// with m the row's max (0 when m is ±inf); a row with no allowed entry (lse = -inf) has p = 0,
// s = 0 and zero gradients; NaN in z makes the row's p NaN. Math in T (float32 for float32, as
// the composition); exp of the shifted logits by vec_math.h (float: the polynomial; double:
// std::exp), std::exp where the shift is not a finite max.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "pool.h"
#include "vec_math.h"

namespace mmkernels {
namespace {

// Elements of x a task should cover: fewer cost more in scheduling than they save.
constexpr int64_t kGrainElems = 1 << 15;

#define MMK_LOOPS "attention_loops.h"
#include "vec_levels.h"

void check(bool ok, const char* what) { TORCH_CHECK(ok, "mmkernels_cpu attention: ", what); }

void check_inputs(const at::Tensor& z, const at::Tensor& x, const c10::optional<at::Tensor>& mask) {
  check(z.device().is_cpu() && x.device().is_cpu(), "CPU tensors expected");
  check(z.dim() == 2 && x.dim() == 3 && x.size(0) == z.size(0) && x.size(1) == z.size(1),
        "z (R, J) and x (R, J, D) expected");
  check(x.is_contiguous(), "x must be contiguous");
  check(z.scalar_type() == x.scalar_type() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
        "z and x must both be float32 or both float64");
  if (mask) {
    check(mask->scalar_type() == at::kBool && mask->sizes() == z.sizes() && mask->device().is_cpu(),
          "mask must be a bool CPU tensor shaped as z");
  }
}

// The mask's data and strides (null and 0 without one), and the rows a task should take.
struct RowSpace {
  const bool* mask;
  int64_t sm0, sm1, grain;
  RowSpace(const c10::optional<at::Tensor>& m, int64_t J, int64_t D)
      : mask(m ? m->data_ptr<bool>() : nullptr),
        sm0(m ? m->stride(0) : 0),
        sm1(m ? m->stride(1) : 0),
        grain(std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, J * D))) {}
};

}  // namespace

// (s (R, D) in x's dtype, lse (R,)) of the attention module at temperature tau.
std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& z, const at::Tensor& x,
                                                     const c10::optional<at::Tensor>& mask, double tau) {
  check_inputs(z, x, mask);
  const int64_t R = x.size(0), J = x.size(1), D = x.size(2);
  at::Tensor s = at::empty({R, D}, x.options());
  at::Tensor lse = at::empty({R}, x.options());
  if (R == 0) return {s, lse};
  const RowSpace rs(mask, J, D);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attention_forward", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* sp = s.data_ptr<scalar_t>();
    scalar_t* lp = lse.data_ptr<scalar_t>();
    at::parallel_for(0, R, rs.grain, [&](int64_t r0, int64_t r1) {
      std::vector<scalar_t> p(J);  // the row's logits, then its p
      MMK_RUN_VECTORISED(forward_rows<scalar_t>, zp, z.stride(0), z.stride(1), rs.mask, rs.sm0, rs.sm1, xp, sp, lp,
                                             r0, r1, J, D, static_cast<scalar_t>(tau), p.data());
    });
  });
  return {s, lse};
}

// (dz (R, J), dx (R, J, D)) from ds (R, D), the saved output s (R, D, contiguous) and lse (R,).
std::tuple<at::Tensor, at::Tensor> attention_backward(const at::Tensor& z, const at::Tensor& x,
                                                      const c10::optional<at::Tensor>& mask, const at::Tensor& s,
                                                      const at::Tensor& lse, const at::Tensor& ds, double tau) {
  check_inputs(z, x, mask);
  const int64_t R = x.size(0), J = x.size(1), D = x.size(2);
  check(s.is_contiguous() && lse.is_contiguous() && s.sizes() == ds.sizes() && s.size(0) == R && s.size(1) == D &&
            lse.numel() == R,
        "s (R, D) and lse (R,) contiguous, ds (R, D) expected");
  check(s.scalar_type() == x.scalar_type() && lse.scalar_type() == x.scalar_type() &&
            ds.scalar_type() == x.scalar_type(),
        "s, lse and ds must have x's dtype");
  at::Tensor dz = at::empty({R, J}, x.options());
  at::Tensor dx = pooled_empty(x.sizes(), x.options());  // x's size: fresh pages would cost more than the pass
  if (R == 0) return {dz, dx};
  const RowSpace rs(mask, J, D);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attention_backward", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* lp = lse.data_ptr<scalar_t>();
    const scalar_t* gp = ds.data_ptr<scalar_t>();
    scalar_t* dzp = dz.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, R, rs.grain, [&](int64_t r0, int64_t r1) {
      std::vector<scalar_t> buf(J + D);  // p, then ds_r at unit stride
      MMK_RUN_VECTORISED(backward_rows<scalar_t>, zp, z.stride(0), z.stride(1), rs.mask, rs.sm0, rs.sm1, xp, sp, lp,
                                              gp, ds.stride(0), ds.stride(1), dzp, dxp, r0, r1, J, D,
                                              static_cast<scalar_t>(tau), buf.data(), buf.data() + J);
    });
  });
  return {dz, dx};
}

// dx (R, J, D) of the hard switch: ds_r (R, D, any strides) at j = idx[r] (int64 (R,)), 0 elsewhere —
// one write of dx (the composition zeroes it, then scatters ds into it).
at::Tensor hard_switch_backward(const at::Tensor& idx, const at::Tensor& ds, int64_t J) {
  check(idx.device().is_cpu() && ds.device().is_cpu() && idx.scalar_type() == at::kLong && idx.dim() == 1 &&
            ds.dim() == 2 && ds.size(0) == idx.size(0) && J >= 1,
        "hard_switch_backward: idx int64 (R,), ds (R, D) and J >= 1 expected");
  const int64_t R = ds.size(0), D = ds.size(1);
  at::Tensor dx = pooled_empty({R, J, D}, ds.options());
  if (dx.numel() == 0) return dx;
  const at::Tensor ic = idx.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ds.scalar_type(), "hard_switch_backward", [&] {
    const int64_t* ip = ic.data_ptr<int64_t>();
    const scalar_t* gp = ds.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    const int64_t s0 = ds.stride(0), s1 = ds.stride(1);
    at::parallel_for(0, R, std::max<int64_t>(1, kGrainElems / (J * std::max<int64_t>(1, D))),
                     [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* row = dxp + r * J * D;
        const int64_t chosen = ip[r];
        for (int64_t j = 0; j < J; ++j) {
          scalar_t* out = row + j * D;
          if (j != chosen) {
            std::fill(out, out + D, scalar_t(0));
          } else {
            for (int64_t d = 0; d < D; ++d) out[d] = gp[r * s0 + d * s1];
          }
        }
      }
    });
  });
  return dx;
}

}  // namespace mmkernels

TORCH_LIBRARY_FRAGMENT(mmkernels_cpu, m) {
  m.def("attention_forward(Tensor z, Tensor x, Tensor? mask, float tau) -> (Tensor, Tensor)");
  m.def("attention_backward(Tensor z, Tensor x, Tensor? mask, Tensor s, Tensor lse, Tensor ds, float tau) "
        "-> (Tensor, Tensor)");
  m.def("hard_switch_backward(Tensor idx, Tensor ds, int J) -> Tensor");
}

TORCH_LIBRARY_IMPL(mmkernels_cpu, CPU, m) {
  m.impl("attention_forward", &mmkernels::attention_forward);
  m.impl("attention_backward", &mmkernels::attention_backward);
  m.impl("hard_switch_backward", &mmkernels::hard_switch_backward);
}
