// Routing on the CPU: the top-k choices of each row (top_k_ids), and the metadata as one counting
// sort of the (T, k) choices, linear in T·k (the vectorised-torch fallback in
// mmkernels/ops/routing.py: torch.topk plus a stable re-sort of tied rows; argsort).
//
// Registered as the torch operators mmkernels_cpu::{top_k_ids, route_metadata}; loaded by
// mmkernels/_cpp.py.
// The outputs are the fields of mmkernels.ops.routing.Routing after expert_ids, with the same
// meaning (see its field comments): rows in expert order, slot s = t·k + j stable within an
// expert, dropped slots (past the capacity) after every kept row, and the tile table.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "router_simd.h"
#include "vec_math.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace mmkernels {

using Metadata = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                            at::Tensor, at::Tensor>;

// The metadata of the (T, k) choices f (route_metadata, below; ids checked in range).
template <typename index_t>
static Metadata metadata_of(const index_t* f, int64_t T, int64_t k, int64_t E, int64_t capacity, int64_t block_m) {
  const int64_t n = T * k;

  // The slots split into one contiguous chunk per thread; each thread counts its chunk's
  // choices per expert, and later ranks them from the counts of the chunks before it: the same
  // stable order as one pass over all slots.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / 4096));
  const int64_t chunk = (n + chunks - 1) / chunks;
  // per chunk: its count, then its first rank, per expert; rows apart by a cache line at least
  const int64_t stride = (E + 7) / 8 * 8 + 8;
  std::vector<int64_t> seen(chunks * stride, 0);
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* __restrict cnt = seen.data() + c * stride;
      for (int64_t i = c * chunk, end = std::min(n, i + chunk); i < end; ++i) {
        const int64_t e = f[i];
        if (e < 0 || e >= E) {
          bad.store(i);
          return;
        }
        ++cnt[e];
      }
    }
  });
  if (bad.load() >= 0)
    TORCH_CHECK(false, "route_metadata: expert id ", f[bad.load()], " out of range [0, ", E, ")");
  std::vector<int64_t> total(E, 0);
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t e = 0; e < E; ++e) {
      const int64_t here = seen[c * stride + e];
      seen[c * stride + e] = total[e];
      total[e] += here;
    }
  }
  auto i32 = at::TensorOptions().dtype(at::kInt);
  at::Tensor counts = at::empty({E}, i32), offsets = at::empty({E + 1}, i32);
  int32_t* cnt = counts.data_ptr<int32_t>();
  int32_t* off = offsets.data_ptr<int32_t>();
  std::vector<int64_t> drop_base(E);
  off[0] = 0;
  for (int64_t e = 0; e < E; ++e) {
    cnt[e] = static_cast<int32_t>(std::min(total[e], capacity));
    off[e + 1] = off[e] + cnt[e];
  }
  int64_t dropped_before = off[E];  // dropped rows follow every kept row, expert by expert
  for (int64_t e = 0; e < E; ++e) {
    drop_base[e] = dropped_before;
    dropped_before += total[e] - cnt[e];
  }

  at::Tensor sorted_slots = at::empty({n}, i32), slot_rows = at::empty({n}, i32);
  at::Tensor dropped = at::empty({T, k}, at::TensorOptions().dtype(at::kBool));
  int32_t* sorted = sorted_slots.data_ptr<int32_t>();
  int32_t* rows = slot_rows.data_ptr<int32_t>();
  bool* drop = dropped.data_ptr<bool>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    const int32_t* __restrict o = off;
    int32_t* __restrict sorted_w = sorted;
    int32_t* __restrict rows_w = rows;
    bool* __restrict drop_w = drop;
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* __restrict rank = seen.data() + c * stride;
      for (int64_t i = c * chunk, end = std::min(n, i + chunk); i < end; ++i) {
        const int64_t e = f[i], r = rank[e]++;  // the rank of slot i among its expert's slots
        const bool kept = r < capacity;
        const int64_t row = kept ? o[e] + r : drop_base[e] + r - capacity;
        rows_w[i] = static_cast<int32_t>(row);
        sorted_w[row] = static_cast<int32_t>(i);
        drop_w[i] = !kept;
      }
    }
  });

  // tile table: ceil(counts[e] / block_m) tiles per expert, -1 past the tiles in use
  const int64_t max_tiles = n / block_m + std::min(E, n);
  at::Tensor tile_experts = at::full({max_tiles}, -1, i32), tile_starts = at::full({max_tiles}, -1, i32);
  int32_t* te = tile_experts.data_ptr<int32_t>();
  int32_t* ts = tile_starts.data_ptr<int32_t>();
  int64_t tile = 0;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t start = off[e]; start < off[e + 1]; start += block_m, ++tile) {
      te[tile] = static_cast<int32_t>(e);
      ts[tile] = static_cast<int32_t>(start);
    }
  }
  at::Tensor num_tiles = at::full({1}, tile, i32);
  return {counts, offsets, sorted_slots, slot_rows, dropped, tile_experts, tile_starts, num_tiles};
}

// (counts, offsets, sorted_slots, slot_rows, dropped, tile_experts, tile_row_starts, num_tiles)
Metadata route_metadata(const at::Tensor& ids, int64_t num_experts, int64_t capacity, int64_t block_m) {
  TORCH_CHECK(ids.dim() == 2, "route_metadata: ids must be (T, k), got ", ids.dim(), " dims");
  TORCH_CHECK(ids.device().is_cpu(), "route_metadata: ids must be on the CPU");
  TORCH_CHECK(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong,
              "route_metadata: ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK(num_experts >= 1, "route_metadata: num_experts must be >= 1");
  TORCH_CHECK(capacity >= 0, "route_metadata: capacity must be >= 0");
  TORCH_CHECK(block_m >= 1, "route_metadata: block_m must be >= 1");
  const int64_t T = ids.size(0), k = ids.size(1), E = num_experts;
  const at::Tensor flat = ids.contiguous();
  Metadata out;
  AT_DISPATCH_INDEX_TYPES(flat.scalar_type(), "route_metadata", [&] {
    out = metadata_of(flat.data_ptr<index_t>(), T, k, E, capacity, block_m);
  });
  return out;
}


// The k best columns of each row — allowed columns first, then numbers before NaN, then by
// descending key, ties to the lower index: the ids of ops/routing.py::_best_first's first k
// columns (the torch path gets them from torch.topk plus a stable re-sort of the tied rows). One
// insertion pass per row, rows in parallel. A column's class is 2·(not allowed) + (NaN).
template <typename scalar_t>
static inline bool better(scalar_t v, uint8_t v_cls, scalar_t b, uint8_t b_cls) {
  if (v_cls != b_cls) return v_cls < b_cls;
  return !(v_cls & 1) && v > b;  // strictly: equal keys (and NaNs) keep the earlier index first
}

// Fast path of a row without mask or NaN: the k largest are among the columns at or above the
// smallest of the maxima of k column groups (those k maxima are k distinct columns), usually a
// few more than k; they are gathered without branches and inserted in column order. Returns
// false (nothing written) when the row has a NaN: the caller's full pass handles it.
template <typename scalar_t>
static bool top_k_of_candidates(const scalar_t* row, int64_t E, int64_t k, scalar_t* best, int64_t* idx,
                                int64_t* cand) {
  const int64_t g = E / k;
  scalar_t bound = std::numeric_limits<scalar_t>::infinity();
  bool nan = false;
  for (int64_t q = 0; q < k; ++q) {
    const int64_t lo = q * g, hi = q == k - 1 ? E : lo + g;
    scalar_t m = row[lo];
    for (int64_t j = lo; j < hi; ++j) {
      nan |= row[j] != row[j];
      m = row[j] > m ? row[j] : m;
    }
    bound = m < bound ? m : bound;
  }
  if (nan) return false;
  int64_t n = 0;
  for (int64_t j = 0; j < E; ++j) {
    cand[n] = j;
    n += row[j] >= bound;
  }
  int64_t filled = 0;
  for (int64_t c = 0; c < n; ++c) {
    const int64_t j = cand[c];
    const scalar_t v = row[j];
    if (filled == k && !(v > best[k - 1])) continue;  // ties keep the earlier column
    int64_t pos = filled < k ? filled : k - 1;
    while (pos > 0 && v > best[pos - 1]) {
      best[pos] = best[pos - 1];
      idx[pos] = idx[pos - 1];
      --pos;
    }
    best[pos] = v;
    idx[pos] = j;
    if (filled < k) ++filled;
  }
  return true;
}

// One row of top_k_rows: the candidate pass when it applies, else the insertion pass over every
// column. best / best_cls / idx / cand: scratch of k, k, k and E.
template <typename scalar_t>
static void top_k_row(const scalar_t* row, const bool* ok, int64_t E, int64_t k, scalar_t* best, uint8_t* best_cls,
                      int64_t* idx, int64_t* cand, int64_t* out) {
  if (!ok && E >= 2 * k && top_k_of_candidates(row, E, k, best, idx, cand)) {
    std::copy(idx, idx + k, out);
    return;
  }
  int64_t filled = 0;
  for (int64_t j = 0; j < E; ++j) {
    const scalar_t v = row[j];
    const uint8_t cls = static_cast<uint8_t>((ok && !ok[j] ? 2 : 0) + (std::isnan(v) ? 1 : 0));
    if (filled == k && !better(v, cls, best[k - 1], best_cls[k - 1])) continue;
    int64_t pos = filled < k ? filled : k - 1;
    while (pos > 0 && better(v, cls, best[pos - 1], best_cls[pos - 1])) {
      best[pos] = best[pos - 1];
      best_cls[pos] = best_cls[pos - 1];
      idx[pos] = idx[pos - 1];
      --pos;
    }
    best[pos] = v;
    best_cls[pos] = cls;
    idx[pos] = j;
    if (filled < k) ++filled;
  }
  std::copy(idx, idx + k, out);
}

// Per-thread scratch of top_k_row.
template <typename scalar_t>
struct RowScratch {
  std::vector<scalar_t> best;
  std::vector<uint8_t> best_cls;
  std::vector<int64_t> idx, cand;
  RowScratch(int64_t E, int64_t k) : best(k), best_cls(k), idx(k), cand(E) {}
  void top_k(const scalar_t* row, const bool* ok, int64_t E, int64_t k, int64_t* out) {
    top_k_row(row, ok, E, k, best.data(), best_cls.data(), idx.data(), cand.data(), out);
  }
};

// The vector row kernels (router_simd.h) run the float32 rows: the best the CPU has, capped by
// vec_math.h's isa_cap() (mmkernels_cpu::cpu_isa; the tests run each: scalar, AVX2, AVX-512).
static int active_isa() {
#ifdef MMKERNELS_SIMD_ROWS
  return std::min(isa_cap().load(std::memory_order_relaxed), simd::best_isa());
#else
  return 0;
#endif
}

#ifdef MMKERNELS_SIMD_ROWS
// The row kernel in use for float32 rows of E columns and this k, or nullptr.
static simd::RowFn simd_rows(const at::Tensor& key, int64_t E, int64_t k) {
  if (key.scalar_type() != at::kFloat) return nullptr;
  return simd::row_kernel(active_isa(), E, k);
}
#endif

// fast: the vector row kernel for these rows (float32, no allowed mask), or nullptr.
template <typename scalar_t, typename RowKernel>
static void top_k_rows(const scalar_t* key, const bool* allowed, int64_t T, int64_t E, int64_t k, int64_t* out,
                       RowKernel fast) {
  at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
    RowScratch<scalar_t> scratch(E, k);
    for (int64_t t = t0; t < t1; ++t) {
      const scalar_t* row = key + t * E;
#ifdef MMKERNELS_SIMD_ROWS
      if constexpr (std::is_same_v<scalar_t, float>) {
        int32_t ids[16];
        if (fast && fast(row, E, k, simd::Weights::kNone, 1.0f, ids, nullptr)) {
          std::copy(ids, ids + k, out + t * k);
          continue;
        }
      }
#endif
      scratch.top_k(row, allowed ? allowed + t * E : nullptr, E, k, out + t * k);
    }
  });
}

at::Tensor top_k_ids(const at::Tensor& key, int64_t k, const std::optional<at::Tensor>& allowed) {
  TORCH_CHECK(key.dim() == 2, "top_k_ids: key must be (T, E), got ", key.dim(), " dims");
  TORCH_CHECK(key.device().is_cpu(), "top_k_ids: key must be on the CPU");
  TORCH_CHECK(key.scalar_type() == at::kFloat || key.scalar_type() == at::kDouble,
              "top_k_ids: key must be float32 or float64, got ", key.scalar_type());
  const int64_t T = key.size(0), E = key.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "top_k_ids: k must be in [1, E=", E, "], got ", k);
  at::Tensor mask;
  if (allowed.has_value()) {
    mask = allowed->contiguous();
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.sizes() == key.sizes() && mask.device().is_cpu(),
                "top_k_ids: allowed must be a CPU bool tensor of key's shape");
  }
  const at::Tensor c = key.contiguous();
  at::Tensor out = at::empty({T, k}, at::TensorOptions().dtype(at::kLong));
#ifdef MMKERNELS_SIMD_ROWS
  const simd::RowFn fast = mask.defined() ? nullptr : simd_rows(c, E, k);
#else
  const std::nullptr_t fast = nullptr;
#endif
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "top_k_ids", [&] {
    top_k_rows<scalar_t>(c.data_ptr<scalar_t>(), mask.defined() ? mask.data_ptr<bool>() : nullptr, T, E, k,
                         out.data_ptr<int64_t>(), fast);
  });
  return out;
}

// The softmax weights of one row's chosen columns sel[0..k), in double, rounded once: over the
// chosen only (renormalize) or over the whole row of E. NaN where the softmax reads one (as
// torch.softmax: a NaN anywhere in the row makes the whole-row softmax NaN).
template <typename scalar_t>
static void softmax_weights_row(const scalar_t* row, int64_t E, const int64_t* sel, int64_t k, bool renormalize,
                                double scale, scalar_t* w) {
  double m = -std::numeric_limits<double>::infinity(), s = 0.0;
  if (renormalize) {
    for (int64_t i = 0; i < k; ++i) m = std::max(m, static_cast<double>(row[sel[i]]));
    for (int64_t i = 0; i < k; ++i) s += std::exp(static_cast<double>(row[sel[i]]) - m);
  } else {
    bool nan = false;
    for (int64_t j = 0; j < E; ++j) {
      nan |= std::isnan(row[j]);
      m = std::max(m, static_cast<double>(row[j]));
    }
    for (int64_t j = 0; j < E; ++j) s += std::exp(static_cast<double>(row[j]) - m);
    if (nan) s = std::numeric_limits<double>::quiet_NaN();
  }
  for (int64_t i = 0; i < k; ++i) {
    const double v = static_cast<double>(row[sel[i]]);
    const double e = std::isnan(v) ? v : std::exp(v - m);
    w[i] = static_cast<scalar_t>(e / s * scale);
  }
}

// Mixtral / Qwen-style router in one call: the top-k ids of the logits (as top_k_ids, but int32) and their
// softmax weights times routed_scaling. renormalize: the softmax over the k chosen logits;
// otherwise the softmax over the whole row, gathered. NaN anywhere the softmax reads makes those
// weights NaN, as torch.softmax does.
//   float32 rows with a vector row kernel: one pass per row (router_simd.h: float exp, an ulp or
//   two); its rows it does not take, and every other case, per row in double, rounded once —
//   except the whole-row softmax without the kernel, which is ATen's vectorised softmax (E exps a
//   row in double took 390 µs of 555 at 2048 x 64, the vectorised pass ~60).
std::tuple<at::Tensor, at::Tensor> route_softmax_topk(const at::Tensor& logits, int64_t k, bool renormalize,
                                                      double routed_scaling) {
  TORCH_CHECK(logits.dim() == 2, "route_softmax_topk: logits must be (T, E), got ", logits.dim(), " dims");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
              "route_softmax_topk: logits must be float32 or float64, got ", logits.scalar_type());
  const at::Tensor c = logits.contiguous();
  const int64_t T = c.size(0), E = c.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "route_softmax_topk: k must be in [1, E=", E, "], got ", k);
#ifdef MMKERNELS_SIMD_ROWS
  if (simd::RowFn fast = simd_rows(c, E, k)) {
    at::Tensor ids = at::empty({T, k}, at::TensorOptions().dtype(at::kInt));
    at::Tensor weights = at::empty({T, k}, c.options());
    const float* l = c.data_ptr<float>();
    int32_t* id = ids.data_ptr<int32_t>();
    float* w = weights.data_ptr<float>();
    const auto mode = renormalize ? simd::Weights::kChosen : simd::Weights::kRow;
    at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
      std::optional<RowScratch<float>> scratch;  // only for the rows of the scalar pass
      std::vector<int64_t> wide(k);
      for (int64_t t = t0; t < t1; ++t) {
        const float* row = l + t * E;
        if (fast(row, E, k, mode, static_cast<float>(routed_scaling), id + t * k, w + t * k)) continue;
        if (!scratch) scratch.emplace(E, k);
        scratch->top_k(row, nullptr, E, k, wide.data());
        softmax_weights_row(row, E, wide.data(), k, renormalize, routed_scaling, w + t * k);
        std::copy(wide.begin(), wide.end(), id + t * k);
      }
    });
    return {weights, ids};
  }
#endif
  at::Tensor ids = top_k_ids(c, k, std::nullopt);
  if (!renormalize) {
    at::Tensor probs = at::_softmax(c, 1, false);
    at::Tensor weights = probs.gather(1, ids);
    if (routed_scaling != 1.0) weights.mul_(routed_scaling);
    return {weights, ids.to(at::kInt)};
  }
  at::Tensor weights = at::empty({T, k}, c.options());
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "route_softmax_topk", [&] {
    const scalar_t* l = c.data_ptr<scalar_t>();
    const int64_t* id = ids.data_ptr<int64_t>();
    scalar_t* w = weights.data_ptr<scalar_t>();
    at::parallel_for(0, T, 256, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        softmax_weights_row(l + t * E, E, id + t * k, k, true, routed_scaling, w + t * k);
    });
  });
  return {weights, ids.to(at::kInt)};
}

}  // namespace mmkernels

TORCH_LIBRARY(mmkernels_cpu, m) {
  m.def("route_softmax_topk(Tensor logits, int k, bool renormalize, float routed_scaling) -> (Tensor, Tensor)");
  m.def("top_k_ids(Tensor key, int k, Tensor? allowed=None) -> Tensor");
  m.def(
      "route_metadata(Tensor ids, int num_experts, int capacity, int block_m) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmkernels_cpu, CPU, m) {
  m.impl("route_metadata", &mmkernels::route_metadata);
  m.impl("top_k_ids", &mmkernels::top_k_ids);
  m.impl("route_softmax_topk", &mmkernels::route_softmax_topk);
}
