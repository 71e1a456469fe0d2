// mmkernels_cpu::cpu_isa(set): the instruction-set level every CPU kernel runs at (vec_math.h's
// levels: 0 baseline, 1 AVX2, 2 AVX-512, 3 AVX-512 with BF16 — the vectorised loops of
// run_vectorised and the router's row kernels). set < 0 asks; 0 / 1 / 2 / 3 caps the level.
// Returns the level in use now: never more than the CPU has, whatever was asked. The tests run each
// level the CPU has this way.
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "vec_math.h"

namespace mmkernels {

int64_t cpu_isa(int64_t set) {
  if (set >= 0) isa_cap().store(static_cast<int>(std::min<int64_t>(set, kAvx512Bf16)));
  return active_level();
}

}  // namespace mmkernels

TORCH_LIBRARY_FRAGMENT(mmkernels_cpu, m) {
  m.def("cpu_isa(int set=-1) -> int");
}

TORCH_LIBRARY_IMPL(mmkernels_cpu, CatchAll, m) {
  m.impl("cpu_isa", &mmkernels::cpu_isa);
}
