// Sigma-pi / bilinear on the CPU: y[n, j] = Σ_h Σ_i z[n, h] · x[n, i] · W[j, h, i] (+ bias[j]), the
// op of mmkernels.ops.bilinear (torch.nn.functional.bilinear), forward and backward, blocked so
// that no thread holds more than a few hundred KB of products: the memory does not grow with N.
// (The vectorised-torch fallback, ops.bilinear._cpu_forward / _cpu_backward, builds the
// z ⊗ x outer product in 16 MB chunks and streams it through memory twice: ~4 GB a pass at
// N 8192, b = c = 256.)
//
// Registered as mmkernels_cpu::{bilinear_forward, bilinear_backward}; loaded by mmkernels/_cpp.py.
//
// Shapes: z (N, b), x (N, c), W (d, b, c), bias (d,), dy (N, d); float32 or float64 (the Python
// side casts 16-bit storage). The three GEMMs, each through ATen's BLAS on one core (inside the
// parallel region ATen and the BLAS run single-threaded):
//   forward  (rows in parallel): P = x_blk · Wp[h-block]ᵀ, (n × c)·(c × hb·d) with Wp[h, j, i] =
//            W[j, h, i] (one permuted copy of W a call), then y[n, :] += Σ_h z[n, h] · P[n, h, :];
//   backward, rows in parallel: G = dy_blk · W[:, h-block, :], (n × d)·(d × hb·c), then
//            dz[n, h] = x[n, :] · G[n, h, :] and dx[n, :] += z[n, h] · G[n, h, :];
//   backward, h-blocks in parallel: dW[:, h, :] = Σ_n (z[n, h] · dy[n, :])ᵀ x[n, :], the products
//            of an (n-chunk × hb·d) block times x's n-chunk, accumulated over the chunks.
// Each thread owns its output rows (or its h-block of dW): no atomics, the same result every run
// for a given thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

namespace mmkernels {
namespace {

// Row block and h-block of each phase: the per-thread product block stays at ~128K elements.
constexpr int64_t kFwdRows = 128, kFwdCols = 512;    // P: kFwdRows x (hb·d ≈ kFwdCols)
constexpr int64_t kDzdxRows = 64, kDzdxCols = 2048;  // G: kDzdxRows x (hb·c ≈ kDzdxCols)
constexpr int64_t kDwRows = 512, kDwCols = 256;      // Q: kDwRows x (hb·d ≈ kDwCols)

// Σ_i a[i]·b[i] in 8 interleaved partial sums (a single running sum is a chain of dependent adds
// the compiler may not reorder: it would not vectorise).
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  T s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y[i] += a·x[i]
template <typename T>
inline void axpy(T a, const T* x, T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

int64_t h_block(int64_t cols, int64_t per_h, int64_t b) {
  return std::max<int64_t>(1, std::min<int64_t>(b, cols / std::max<int64_t>(1, per_h)));
}

void check(const at::Tensor& z, const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
              "bilinear: the C++ path computes in float32 / float64, got ", z.scalar_type());
  TORCH_CHECK(x.scalar_type() == z.scalar_type() && w.scalar_type() == z.scalar_type(),
              "bilinear: z, x and W must have one dtype");
  TORCH_CHECK(z.device().is_cpu() && x.device().is_cpu() && w.device().is_cpu(), "bilinear: CPU tensors only");
  TORCH_CHECK(z.dim() == 2 && x.dim() == 2 && w.dim() == 3 && z.size(0) == x.size(0) && w.size(1) == z.size(1) &&
                  w.size(2) == x.size(1),
              "bilinear: expected z (N, b), x (N, c), W (d, b, c)");
}

}  // namespace

at::Tensor bilinear_forward(const at::Tensor& z_in, const at::Tensor& x_in, const at::Tensor& w_in,
                            const std::optional<at::Tensor>& bias) {
  check(z_in, x_in, w_in);
  // detached: the worker threads run with grad mode on (it is thread-local)
  const at::Tensor z = z_in.detach().contiguous(), x = x_in.detach().contiguous();
  const int64_t N = z.size(0), b = z.size(1), c = x.size(1), d = w_in.size(0);
  const at::Tensor wp = w_in.detach().permute({1, 0, 2}).contiguous();  // (b, d, c)
  at::Tensor y = at::zeros({N, d}, z.options());
  const int64_t hb = h_block(kFwdCols, d, b);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "bilinear_forward", [&] {
    at::parallel_for(0, (N + kFwdRows - 1) / kFwdRows, 1, [&](int64_t blk0, int64_t blk1) {
      at::Tensor p_buf = at::empty({kFwdRows * hb * d}, z.options());
      for (int64_t blk = blk0; blk < blk1; ++blk) {
        const int64_t n0 = blk * kFwdRows, n = std::min(kFwdRows, N - n0);
        const at::Tensor xb = x.narrow(0, n0, n);
        scalar_t* yb = y.data_ptr<scalar_t>() + n0 * d;
        const scalar_t* zb = z.data_ptr<scalar_t>() + n0 * b;
        for (int64_t h0 = 0; h0 < b; h0 += hb) {
          const int64_t nh = std::min(hb, b - h0);
          at::Tensor p = p_buf.narrow(0, 0, n * nh * d).view({n, nh * d});
          at::mm_out(p, xb, wp.narrow(0, h0, nh).view({nh * d, c}).t());
          const scalar_t* pp = p.data_ptr<scalar_t>();
          for (int64_t r = 0; r < n; ++r) {
            scalar_t* yr = yb + r * d;
            for (int64_t h = 0; h < nh; ++h) {
              const scalar_t zh = zb[r * b + h0 + h];
              const scalar_t* pr = pp + (r * nh + h) * d;
              axpy(zh, pr, yr, d);
            }
          }
        }
      }
    });
  });
  if (bias.has_value()) y.add_(bias->detach());
  return y;
}

// (dz, dx, dW); each only when asked (undefined otherwise: None in Python).
std::tuple<at::Tensor, at::Tensor, at::Tensor> bilinear_backward(const at::Tensor& z_in, const at::Tensor& x_in,
                                                                 const at::Tensor& w_in, const at::Tensor& dy_in,
                                                                 bool need_dz, bool need_dx, bool need_dw) {
  check(z_in, x_in, w_in);
  TORCH_CHECK(dy_in.scalar_type() == z_in.scalar_type() && dy_in.dim() == 2 && dy_in.size(0) == z_in.size(0) &&
                  dy_in.size(1) == w_in.size(0),
              "bilinear_backward: dy must be (N, d) in z's dtype");
  const at::Tensor z = z_in.detach().contiguous(), x = x_in.detach().contiguous();
  const at::Tensor dy = dy_in.detach().contiguous(), w = w_in.detach().contiguous();
  const int64_t N = z.size(0), b = z.size(1), c = x.size(1), d = w.size(0);
  at::Tensor dz, dx, dw;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "bilinear_backward", [&] {
    if (need_dz || need_dx) {
      if (need_dz) dz = at::empty({N, b}, z.options());
      if (need_dx) dx = at::zeros({N, c}, z.options());
      const at::Tensor w2 = w.view({d, b * c});
      const int64_t hb = h_block(kDzdxCols, c, b);
      at::parallel_for(0, (N + kDzdxRows - 1) / kDzdxRows, 1, [&](int64_t blk0, int64_t blk1) {
        at::Tensor g_buf = at::empty({kDzdxRows * hb * c}, z.options());
        for (int64_t blk = blk0; blk < blk1; ++blk) {
          const int64_t n0 = blk * kDzdxRows, n = std::min(kDzdxRows, N - n0);
          const at::Tensor dyb = dy.narrow(0, n0, n);
          const scalar_t* xb = x.data_ptr<scalar_t>() + n0 * c;
          const scalar_t* zb = z.data_ptr<scalar_t>() + n0 * b;
          for (int64_t h0 = 0; h0 < b; h0 += hb) {
            const int64_t nh = std::min(hb, b - h0);
            at::Tensor g = g_buf.narrow(0, 0, n * nh * c).view({n, nh * c});
            at::mm_out(g, dyb, w2.narrow(1, h0 * c, nh * c));  // G[r, h, i] = Σ_j dy[r, j] W[j, h0 + h, i]
            const scalar_t* gp = g.data_ptr<scalar_t>();
            for (int64_t r = 0; r < n; ++r) {
              const scalar_t* xr = xb + r * c;
              for (int64_t h = 0; h < nh; ++h) {
                const scalar_t* gr = gp + (r * nh + h) * c;
                if (need_dz) dz.data_ptr<scalar_t>()[(n0 + r) * b + h0 + h] = dot(xr, gr, c);
                if (need_dx) axpy(zb[r * b + h0 + h], gr, dx.data_ptr<scalar_t>() + (n0 + r) * c, c);
              }
            }
          }
        }
      });
    }
    if (need_dw) {
      dw = at::empty({d, b, c}, z.options());
      const int64_t hb = h_block(kDwCols, d, b);
      at::parallel_for(0, (b + hb - 1) / hb, 1, [&](int64_t hblk0, int64_t hblk1) {
        at::Tensor q_buf = at::empty({kDwRows * hb * d}, z.options());
        at::Tensor r_buf = at::empty({hb * d * c}, z.options());
        for (int64_t hblk = hblk0; hblk < hblk1; ++hblk) {
          const int64_t h0 = hblk * hb, nh = std::min(hb, b - h0);
          at::Tensor r = r_buf.narrow(0, 0, nh * d * c).view({nh * d, c});  // rows (h, j)
          for (int64_t n0 = 0; n0 < N; n0 += kDwRows) {
            const int64_t n = std::min(kDwRows, N - n0);
            at::Tensor q = q_buf.narrow(0, 0, n * nh * d).view({n, nh * d});  // Q[r, h, j] = z[r, h]·dy[r, j]
            scalar_t* qp = q.data_ptr<scalar_t>();
            const scalar_t* zp = z.data_ptr<scalar_t>() + n0 * b + h0;
            const scalar_t* dyp = dy.data_ptr<scalar_t>() + n0 * d;
            for (int64_t rr = 0; rr < n; ++rr)
              for (int64_t h = 0; h < nh; ++h) {
                const scalar_t zh = zp[rr * b + h];
                for (int64_t j = 0; j < d; ++j) qp[(rr * nh + h) * d + j] = zh * dyp[rr * d + j];
              }
            if (n0 == 0) at::mm_out(r, q.t(), x.narrow(0, n0, n));
            else r.addmm_(q.t(), x.narrow(0, n0, n));
          }
          for (int64_t h = 0; h < nh; ++h)  // rows (h, j) of R to dW[j, h0 + h, :]
            dw.select(1, h0 + h).copy_(r.narrow(0, h * d, d));
        }
      });
    }
  });
  return {dz, dx, dw};
}

}  // namespace mmkernels

TORCH_LIBRARY_FRAGMENT(mmkernels_cpu, m) {
  m.def("bilinear_forward(Tensor z, Tensor x, Tensor W, Tensor? bias) -> Tensor");
  m.def(
      "bilinear_backward(Tensor z, Tensor x, Tensor W, Tensor dy, bool need_dz, bool need_dx, bool need_dw) -> "
      "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmkernels_cpu, CPU, m) {
  m.impl("bilinear_forward", &mmkernels::bilinear_forward);
  m.impl("bilinear_backward", &mmkernels::bilinear_backward);
}
