// Included (no include guard) by a kernel file after it defines MMK_LOOPS, the header of its
// vectorised loops: compiles them once per instruction-set level, each copy in the namespace of
// its level (avx512bf16, avx512, avx2, baseline) with that level's target in effect where the loops are
// defined, so that the compiler vectorises each for its level; MMK_RUN_VECTORISED (vec_math.h)
// calls the active one. Only the loops and vec_level.h's helpers are compiled under a target:
// anything they call from elsewhere (the standard library, vec_math.h) keeps the baseline, so no
// code of a higher level can reach a CPU without it.
#ifndef MMK_LOOPS
#error "define MMK_LOOPS (the header of the loops) before including vec_levels.h"
#endif

#ifdef MMK_LEVELS
// (GCC defines no __AVX512BF16__ under a target pragma in C++: the level says so itself.)
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4", "avx512bf16")
#define MMK_NATIVE_BF16 1
namespace avx512bf16 {
#include "vec_level.h"
#include MMK_LOOPS
}  // namespace avx512bf16
#undef MMK_NATIVE_BF16
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace avx512 {
#include "vec_level.h"
#include MMK_LOOPS
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace avx2 {
#include "vec_level.h"
#include MMK_LOOPS
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace baseline {
#include "vec_level.h"
#include MMK_LOOPS
}  // namespace baseline

#undef MMK_LOOPS
