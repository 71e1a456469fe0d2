// The tensor pool of csrc/pool.h.
#include "pool.h"

#include <torch/library.h>

#include <cstdlib>
#include <mutex>
#include <tuple>
#include <vector>

namespace mmkernels {
namespace {

struct Pool {
  std::mutex mu;
  std::vector<at::Tensor> tensors;
  int64_t bytes = 0, hits = 0, misses = 0;
  const int64_t cap = [] {
    const char* env = std::getenv("MMKERNELS_CPU_CACHE_MB");
    return (env ? std::atoll(env) : 1024LL) << 20;
  }();
};

Pool& pool() {
  static Pool p;
  return p;
}

// Nobody but the pool references t's memory: no other tensor, view or autograd record.
bool is_free(const at::Tensor& t) { return t.use_count() == 1 && t.storage().use_count() == 1; }

// A new contiguous tensor of `sizes` on t's storage: not a view (no autograd view record, so the
// caller may modify it in place like any fresh tensor).
at::Tensor share(const at::Tensor& t, at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty({0}, options);
  out.set_(t.storage(), 0, sizes, c10::contiguous_strides(sizes));
  return out;
}

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  Pool& p = pool();
  const int64_t numel = c10::multiply_integers(sizes);
  const int64_t nbytes = numel * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  if (nbytes < (1 << 20)) return at::empty(sizes, options);  // small: malloc reuses these itself
  std::lock_guard<std::mutex> lock(p.mu);
  // best fit among the free tensors of the dtype holding numel to 2·numel elements (sizes vary
  // a little between calls: the kept rows, the widest expert)
  at::Tensor* best = nullptr;
  for (at::Tensor& t : p.tensors) {
    if (t.dtype() == options.dtype() && t.numel() >= numel && t.numel() <= 2 * numel && is_free(t) &&
        (!best || t.numel() < best->numel()))
      best = &t;
  }
  if (best) {
    ++p.hits;
    return share(*best, sizes, options);  // the pool keeps *best
  }
  ++p.misses;
  // past the cap, the free tensors go first (oldest first), then the new one is not kept
  for (auto it = p.tensors.begin(); p.bytes + nbytes > p.cap && it != p.tensors.end();) {
    if (is_free(*it)) {
      p.bytes -= static_cast<int64_t>(it->nbytes());
      it = p.tensors.erase(it);
    } else {
      ++it;
    }
  }
  at::Tensor t = at::empty({numel}, options);
  if (p.bytes + nbytes > p.cap) return t.view(sizes);
  p.tensors.push_back(t);
  p.bytes += nbytes;
  return share(t, sizes, options);
}

// (bytes held, bytes free, hits, misses)
std::tuple<int64_t, int64_t, int64_t, int64_t> cache_info() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mu);
  int64_t free_bytes = 0;
  for (const at::Tensor& t : p.tensors)
    if (is_free(t)) free_bytes += t.nbytes();
  return {p.bytes, free_bytes, p.hits, p.misses};
}

// Drops the free tensors (their memory goes back to the allocator); returns the bytes released.
int64_t empty_cache() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mu);
  int64_t released = 0;
  std::vector<at::Tensor> kept;
  for (at::Tensor& t : p.tensors) {
    if (is_free(t)) released += t.nbytes();
    else kept.push_back(std::move(t));
  }
  p.tensors = std::move(kept);
  p.bytes -= released;
  return released;
}

}  // namespace mmkernels

TORCH_LIBRARY_FRAGMENT(mmkernels_cpu, m) {
  m.def("cache_info() -> (int, int, int, int)");
  m.def("empty_cache() -> int");
}

TORCH_LIBRARY_IMPL(mmkernels_cpu, CatchAll, m) {
  m.impl("cache_info", &mmkernels::cache_info);
  m.impl("empty_cache", &mmkernels::empty_cache);
}
