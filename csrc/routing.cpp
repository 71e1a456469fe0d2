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

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace mmkernels {

using Metadata = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                            at::Tensor, at::Tensor>;

// (counts, offsets, sorted_slots, slot_rows, dropped, tile_experts, tile_row_starts, num_tiles)
Metadata route_metadata(const at::Tensor& ids, int64_t num_experts, int64_t capacity, int64_t block_m) {
  TORCH_CHECK(ids.dim() == 2, "route_metadata: ids must be (T, k), got ", ids.dim(), " dims");
  TORCH_CHECK(ids.device().is_cpu(), "route_metadata: ids must be on the CPU");
  TORCH_CHECK(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong,
              "route_metadata: ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK(num_experts >= 1, "route_metadata: num_experts must be >= 1");
  TORCH_CHECK(capacity >= 0, "route_metadata: capacity must be >= 0");
  TORCH_CHECK(block_m >= 1, "route_metadata: block_m must be >= 1");
  const int64_t T = ids.size(0), k = ids.size(1), n = T * k, E = num_experts;
  const at::Tensor flat = ids.contiguous().to(at::kLong).reshape({n});
  const int64_t* f = flat.data_ptr<int64_t>();

  std::vector<int64_t> total(E, 0);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(f[i] >= 0 && f[i] < E, "route_metadata: expert id ", f[i], " out of range [0, ", E, ")");
    ++total[f[i]];
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
  std::vector<int64_t> seen(E, 0);
  for (int64_t i = 0; i < n; ++i) {  // one stable pass: the rank of slot i among its expert's slots
    const int64_t e = f[i], r = seen[e]++;
    const bool kept = r < capacity;
    const int64_t row = kept ? off[e] + r : drop_base[e] + r - capacity;
    rows[i] = static_cast<int32_t>(row);
    sorted[row] = static_cast<int32_t>(i);
    drop[i] = !kept;
  }

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

template <typename scalar_t>
static void top_k_rows(const scalar_t* key, const bool* allowed, int64_t T, int64_t E, int64_t k, int64_t* out) {
  at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
    std::vector<scalar_t> best(k);
    std::vector<uint8_t> best_cls(k);
    std::vector<int64_t> idx(k);
    std::vector<int64_t> cand(E);
    for (int64_t t = t0; t < t1; ++t) {
      const scalar_t* row = key + t * E;
      const bool* ok = allowed ? allowed + t * E : nullptr;
      if (!ok && E >= 2 * k && top_k_of_candidates(row, E, k, best.data(), idx.data(), cand.data())) {
        std::copy(idx.begin(), idx.end(), out + t * k);
        continue;
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
      std::copy(idx.begin(), idx.end(), out + t * k);
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
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "top_k_ids", [&] {
    top_k_rows<scalar_t>(c.data_ptr<scalar_t>(), mask.defined() ? mask.data_ptr<bool>() : nullptr, T, E, k,
                         out.data_ptr<int64_t>());
  });
  return out;
}

// Mixtral / Qwen-style router in one call: the top-k ids of the logits (as top_k_ids) and their
// softmax weights times routed_scaling. renormalize: the softmax over the k chosen logits, in
// double, rounded once to the logits' dtype. Otherwise the softmax over the whole row, gathered:
// ATen's vectorised softmax (E exps a row; in double they took 390 µs of 555 at 2048 x 64, the
// vectorised pass ~60). NaN anywhere the softmax reads makes those weights NaN, as torch.softmax
// does.
std::tuple<at::Tensor, at::Tensor> route_softmax_topk(const at::Tensor& logits, int64_t k, bool renormalize,
                                                      double routed_scaling) {
  at::Tensor ids = top_k_ids(logits, k, std::nullopt);
  const at::Tensor c = logits.contiguous();
  const int64_t T = c.size(0), E = c.size(1);
  if (!renormalize) {
    at::Tensor probs = at::_softmax(c, 1, false);
    at::Tensor weights = probs.gather(1, ids);
    if (routed_scaling != 1.0) weights.mul_(routed_scaling);
    return {weights, ids};
  }
  at::Tensor weights = at::empty({T, k}, c.options());
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "route_softmax_topk", [&] {
    const scalar_t* l = c.data_ptr<scalar_t>();
    const int64_t* id = ids.data_ptr<int64_t>();
    scalar_t* w = weights.data_ptr<scalar_t>();
    at::parallel_for(0, T, 256, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* row = l + t * E;
        const int64_t* sel = id + t * k;
        double m = -std::numeric_limits<double>::infinity(), s = 0.0;
        for (int64_t i = 0; i < k; ++i) m = std::max(m, static_cast<double>(row[sel[i]]));
        for (int64_t i = 0; i < k; ++i) s += std::exp(static_cast<double>(row[sel[i]]) - m);
        for (int64_t i = 0; i < k; ++i) {
          const double v = static_cast<double>(row[sel[i]]);
          const double e = std::isnan(v) ? v : std::exp(v - m);
          w[t * k + i] = static_cast<scalar_t>(e / s * routed_scaling);
        }
      }
    });
  });
  return {weights, ids};
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
