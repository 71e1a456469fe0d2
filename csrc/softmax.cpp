// The softmax family on the CPU: softmax, log-softmax and softmin, forward and the fused backward —
// the CPU path of mmkernels.ops.softmax for contiguous float32, float64 and bfloat16 along any dim
// (the rows along the last, the columns along another; bfloat16 in float math, widened as read,
// narrowed to nearest even once as written). On a 2-core AVX2 VM (Zen 3), 2 threads, 4 buffer
// sets, the bfloat16 forward measured 1.96-2.19x ATen's and the softmax backward 1.04-1.19x (see
// forward_rows_bf16 and softmax_backward for what made them so). Every other layout and dtype runs
// ATen's kernels (float16: 0.6x in C++ with
// c10's conversions). float64 is computed here when the op is called, but the Python side sends it
// to ATen: its exp is std::exp per element, 0.62-0.73x ATen's vectorised forward and log-softmax
// backward on a Zen 4 VM.
//
// Columns (a dim other than the last, as (outer, D, inner)): tiles of D × up to kMaxColumns
// columns that fit L2 (column_width), each pass walking d with the tile's columns side by side,
// vectorised across them — no transpose. On a Xeon VM with AVX-512, against ATen: 64x4096x16 along
// dim 1 forward 1.48x, backward 1.19x; 16x64x2048 3.29x / 1.05x; 256x512x64 1.16x / 1.03x. (An
// earlier version with one cache line of columns per tile read the backward 0.5x at 2048 columns.)
// bfloat16 columns on a Zen 4 VM, 2 threads: forward 1.5-5.4x ATen's (whose bfloat16 forward along
// a middle dim ran 5x its float32 one), backward 1.3-1.6x, log-softmax backward 1.5-4.2x.
//
// Registered as mmkernels_cpu::softmax_forward / softmax_backward; loaded by mmkernels/_cpp.py.
//
// Forward: one row of N at a time, read from memory once: the max pass brings it into cache (rows
// up to a few hundred KB stay in L2), the exp pass and the final scaling (or the log-softmax
// subtraction) run on the cached row; y is written once. (Streaming y as the backward streams dx
// measured 0.90-0.93x of plain stores on the 2-core AVX2 VM, where the forward is bound by the
// exps, not by memory: not kept.)
//
// Backward (dx = y·(dy - Σ y·dy); log-softmax dy - exp(y)·Σ dy; softmin y·(Σ y·dy - dy)): the
// sum pass brings the row of y and dy (log-softmax: dy) into cache, the second makes dx from the
// cached row. It is bound by memory: y and dy read, dx written. When the three tensors exceed the
// last-level cache, each block of kBlock elements is made in a buffer in L1 and written with
// non-temporal stores (vec_math.h stream_copy): dx's lines are not read before they are written, 3
// tensors' traffic instead of 4 — the lever above ATen's kernel, which the same math at the same
// traffic could only match (not the log-softmax's long rows: kLogPlainRow). Within the cache,
// plain stores: streaming there sends dx past a cache that would have kept it (0.68-0.84x ATen's
// on a Xeon VM reporting 480 MiB of L3, plain stores 0.89-1.06x).
//
// Rows in parallel over ATen's threads; each element has one writer and every sum runs in a fixed
// order whatever the thread count: bitwise-identical reruns.
//
// Math in the input's precision (bfloat16: float). exp: vec_math.h exp_np, a polynomial after a
// Cody–Waite reduction — degree 6 for float (2e-9 relative), 4 for values stored as bfloat16 —
// double std::exp (exp_for picks by storage type). Row sums in blocks (vec_level.h blocked_sum).
// The loops (softmax_loops.h) are written for the compiler to vectorise and compiled for x86-64-v4
// (AVX-512), v3 (AVX2) and the baseline by vec_levels.h, the CPU's best run (other architectures
// build the baseline only).
//
// Special values as torch: a row holding NaN or +inf, or only -inf, is NaN throughout; -inf
// entries of other rows give 0 (softmax) / -inf (log-softmax). Softmin is softmax of -x. The
// backward is the formula's IEEE result, as ATen's (NaN anywhere in a row's sum: the row's dx NaN).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "vec_math.h"

namespace mmkernels {
namespace {

enum Kind : int64_t { kSoftmax = 0, kLogSoftmax = 1, kSoftmin = 2 };


// ---------------------------------------------------------------------------------------------
// Helpers and constants of the loops (softmax_loops.h)
// ---------------------------------------------------------------------------------------------

// Elements a task should hold: fewer tasks than this cost more in scheduling than they save.
constexpr int64_t kGrainElems = 32768;

void check(bool ok, const char* what) { TORCH_CHECK(ok, "mmkernels_cpu softmax: ", what); }

// Elements of a row made per block in an L1 buffer before the backward streams them to dx (4 KB
// of float: with the block's y and dy, 12 KB of a 32 KB L1; blocks of 4096 thrashed it, and a
// streamed log-softmax backward at 1024x4096 read 0.82x ATen's against 1.00-1.03x). It streams
// when y, dy and dx together exceed the last-level cache (vec_math.h's last_level_cache_bytes):
// dx would not stay there for the next op anyway.
constexpr int64_t kBlock = 1024;

// The log-softmax backward stores rows at least this long plainly even past the cache: its sum pass
// reads only dy, so dx's pass brings y from memory, and there the streamed stores measured slower
// (fp32, Zen 4 VM, against ATen, 3 and 8 buffer sets: 1024x4096 plain 1.07-1.15x, streamed
// 1.01-1.06x; 128x32768 1.03-1.04x against 0.90-0.96x; at 2048 elements and under streaming ties
// or wins: 8192x512 1.09-1.15x against 0.98-1.00x). Measured in float32; bfloat16 rows follow it
// unmeasured (their tensors pass the cache at twice the elements).
constexpr int64_t kLogPlainRow = 4096;

// Rows at least this long sum the bfloat16 forward's exps over 4 × kSumLanes lanes (vec_level.h
// blocked_sum): a row's length picks the order of its sum, so every run gives the same bits.
constexpr int64_t kLongSum = 512;

// bfloat16 forward rows at least kPrefetchRow long ask for the next row's x (into L2) while making
// this row's exps, a chunk of kPrefetchPairs pairs (2 KB of x) at a time: a long row's exps
// otherwise leave the memory idle, and the next row's max pass waits on it (1024x4096 out of cache:
// 1.09-1.26x the forward without; asking for y's lines with write intent as well: 0.89-0.98x). From
// 1024 elements since the cheaper exps (2-core AVX2 VM, 2 threads, 4 buffer sets of 4096x1024:
// 1.60-1.63 against 1.86-2.02 ms); at 128-512 the asking measured nothing or slower.
constexpr int64_t kPrefetchRow = 1024;
constexpr int64_t kPrefetchPairs = 512;

// Float and double forward rows ask for x this many bytes ahead of their exps, or a row ahead where
// a row is longer (softmax_loops.h forward_rows): the memory would otherwise sit idle while a row's
// exps are made in cache, and the next row's max pass would wait on it. 2-core AVX2 VM, 2 threads,
// fp32, 6 buffer sets, 400 interleaved rounds (median ms, standalone harness) against the last pass
// asking for the next row (8-16 KB rows) or nothing: 4096x1024 1.75 -> 1.39, 2048x2048
// 1.80 -> 1.49, 1024x4096 1.85 -> 1.62, 512x8192 1.98 -> 1.68 (32 KB ahead), 256x16384
// 1.97 -> 1.73 (64 KB); 32768x128 and 16384x256 the same either way.
constexpr int64_t kAheadBytes = 16384;

// The column kernels' most columns in a tile, and the d's summed into one partial per column.
constexpr int kMaxColumns = 256;
constexpr int64_t kColumnBlock = 32;

#define MMK_LOOPS "softmax_loops.h"
#include "vec_levels.h"

}  // namespace

// A contiguous tensor as (outer, D, inner) around its dim `dim` (negative counts from the end).
struct Around {
  int64_t outer = 1, D = 1, inner = 1;
  Around(const at::Tensor& t, int64_t dim) {
    const int64_t nd = t.dim();
    check(dim >= -nd && dim < nd, "dim out of range");
    if (dim < 0) dim += nd;
    for (int64_t i = 0; i < nd; ++i) (i < dim ? outer : i == dim ? D : inner) *= t.size(i);
  }
};

// The columns a tile of the column kernels spans (softmax_loops.h forward_columns): a cache line's
// worth, widened to up to kMaxColumns while the D × width tile fits kColumnTileBytes (in L2
// between its passes); each d then reads `width` contiguous elements (one line per d measured
// 0.5x ATen's backward at 2048 inner columns: a stride the prefetchers do not follow).
constexpr int64_t kColumnTileBytes = int64_t(256) << 10;

template <typename T>
int64_t column_width(const Around& a) {
  const int64_t line = 64 / int64_t(sizeof(T));
  const int64_t fit = kColumnTileBytes / (a.D * int64_t(sizeof(T))) / line * line;
  return std::min<int64_t>(std::min<int64_t>(a.inner, kMaxColumns), std::max(line, fit));
}

// Column tiles over (outer, D, inner), and the tiles a thread should take at once.
template <typename T>
int64_t column_tasks(const Around& a) { return a.outer * ((a.inner + column_width<T>(a) - 1) / column_width<T>(a)); }
template <typename T>
int64_t column_grain(const Around& a) { return std::max<int64_t>(1, kGrainElems / (a.D * column_width<T>(a))); }

// y = kind(x) along dim: x a contiguous CPU tensor of float32, float64 or bfloat16 — along its
// last dim the rows, along another the columns — y in its dtype (the Python side routes every
// other case to ATen).
at::Tensor softmax_forward(const at::Tensor& x, int64_t kind, int64_t dim) {
  check(x.device().is_cpu() && x.is_contiguous() && x.dim() >= 1, "x must be a contiguous CPU tensor");
  check(kind >= 0 && kind <= 2, "kind must be 0 (softmax), 1 (log-softmax) or 2 (softmin)");
  check(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kBFloat16,
        "x must be float32, float64 or bfloat16");
  const Around a(x, dim);
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  const int64_t N = a.D, rows = a.outer * a.inner;
  if (x.scalar_type() == at::kBFloat16) {
    const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
    if (a.inner > 1) {
      at::parallel_for(0, column_tasks<uint16_t>(a), column_grain<uint16_t>(a), [&](int64_t c0, int64_t c1) {
        MMK_RUN_VECTORISED(forward_column_tasks<uint16_t>, xp, yp, a.D, a.inner, column_width<uint16_t>(a), c0, c1,
                           kind);
      });
      return y;
    }
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / N), [&](int64_t r0, int64_t r1) {
      std::vector<float> buf(N);
      MMK_RUN_VECTORISED(forward_rows_bf16, xp + r0 * N, yp + r0 * N, buf.data(), r1 - r0, N, kind);
    });
    return y;
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "softmax_forward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    if (a.inner > 1) {
      at::parallel_for(0, column_tasks<scalar_t>(a), column_grain<scalar_t>(a), [&](int64_t c0, int64_t c1) {
        MMK_RUN_VECTORISED(forward_column_tasks<scalar_t>, xp, yp, a.D, a.inner, column_width<scalar_t>(a), c0, c1,
                           kind);
      });
      return;
    }
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / N), [&](int64_t r0, int64_t r1) {
      MMK_RUN_VECTORISED(forward_rows<scalar_t>, xp + r0 * N, yp + r0 * N, r1 - r0, N, kind);
    });
  });
  return y;
}

// dx of the softmax-family op `kind` along dim from its output y and the incoming gradient dy:
// contiguous, of one shape and dtype, as softmax_forward takes them. stream (rows along the last
// dim): 1 non-temporal stores for dx, 0 plain stores, -1 (default) the former when y, dy and dx
// exceed the last-level cache (log-softmax rows under kLogPlainRow only); the columns store
// plainly. The bfloat16 softmax and softmin backward read y and dy as pairs and narrow each pair's
// dx into one word without narrow's NaN select (vec_math.h narrow_pair): on the 2-core AVX2 VM,
// 2 threads, plain stores 1.04-1.19x ATen's kernel at the four row shapes of the main job (with
// narrow's select, element by element, 0.80-0.88x, and ATen's kernel ran here instead below the
// AVX512-BF16 level).
at::Tensor softmax_backward(const at::Tensor& y, const at::Tensor& dy, int64_t kind, int64_t stream, int64_t dim) {
  check(y.device().is_cpu() && dy.device().is_cpu() && y.is_contiguous() && dy.is_contiguous() && y.dim() >= 1,
        "y and dy must be contiguous CPU tensors");
  check(y.sizes() == dy.sizes() && y.scalar_type() == dy.scalar_type(), "y and dy must have one shape and dtype");
  check(kind >= 0 && kind <= 2, "kind must be 0 (softmax), 1 (log-softmax) or 2 (softmin)");
  check(y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble || y.scalar_type() == at::kBFloat16,
        "y must be float32, float64 or bfloat16");
  const Around a(y, dim);
  at::Tensor dx = at::empty_like(y);
  if (y.numel() == 0) return dx;
  const int64_t N = a.D, rows = a.outer * a.inner;
  const bool streamed = stream > 0 || (stream < 0 && 3 * dx.nbytes() > last_level_cache_bytes() &&
                                       !(kind == kLogSoftmax && N >= kLogPlainRow));
  if (y.scalar_type() == at::kBFloat16) {
    const uint16_t* yp = reinterpret_cast<const uint16_t*>(y.data_ptr<at::BFloat16>());
    const uint16_t* gp = reinterpret_cast<const uint16_t*>(dy.data_ptr<at::BFloat16>());
    uint16_t* dp = reinterpret_cast<uint16_t*>(dx.data_ptr<at::BFloat16>());
    if (a.inner > 1) {
      at::parallel_for(0, column_tasks<uint16_t>(a), column_grain<uint16_t>(a), [&](int64_t c0, int64_t c1) {
        MMK_RUN_VECTORISED(backward_column_tasks<uint16_t>, yp, gp, dp, a.D, a.inner, column_width<uint16_t>(a), c0,
                           c1, kind);
      });
      return dx;
    }
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / N), [&](int64_t r0, int64_t r1) {
      MMK_RUN_VECTORISED(backward_rows_bf16, yp + r0 * N, gp + r0 * N, dp + r0 * N, r1 - r0, N, kind, streamed);
    });
    return dx;
  }
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "softmax_backward", [&] {
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* gp = dy.data_ptr<scalar_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    if (a.inner > 1) {
      at::parallel_for(0, column_tasks<scalar_t>(a), column_grain<scalar_t>(a), [&](int64_t c0, int64_t c1) {
        MMK_RUN_VECTORISED(backward_column_tasks<scalar_t>, yp, gp, dp, a.D, a.inner, column_width<scalar_t>(a), c0,
                           c1, kind);
      });
      return;
    }
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / N), [&](int64_t r0, int64_t r1) {
      MMK_RUN_VECTORISED(backward_rows<scalar_t>, yp + r0 * N, gp + r0 * N, dp + r0 * N, r1 - r0, N, kind, streamed);
    });
  });
  return dx;
}

}  // namespace mmkernels

TORCH_LIBRARY_FRAGMENT(mmkernels_cpu, m) {
  m.def("softmax_forward(Tensor x, int kind, int dim=-1) -> Tensor");
  m.def("softmax_backward(Tensor y, Tensor dy, int kind, int stream=-1, int dim=-1) -> Tensor");
}

TORCH_LIBRARY_IMPL(mmkernels_cpu, CPU, m) {
  m.impl("softmax_forward", &mmkernels::softmax_forward);
  m.impl("softmax_backward", &mmkernels::softmax_backward);
}
