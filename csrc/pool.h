// Recycled CPU tensors for the large outputs and scratch of the C++ ops (csrc/pool.cpp).
//
// Fresh pages cost ~0.4 ms per MB on a core of the 2-core dev machine (the kernel zeroes and maps
// each 4 KB page on first touch; glibc hands out every allocation of 32 MB and more as a new
// mapping, and smaller ones too once its threshold has moved). The MoE experts' forward+backward
// allocates ~140 MB of outputs a call (h, the weight gradients, dx, out): ~50 ms of its ~290.
// pooled_empty() hands out (a new tensor on the memory of) the smallest tensor of the pool that
// nobody else references any more — its storage held by the pool alone — and has room for the
// request (at most twice it), or allocates one and keeps it, up to a byte cap
// (MMKERNELS_CPU_CACHE_MB, default 1024; past it the free tensors are dropped oldest first, then
// plain at::empty). Requests under 1 MB are plain at::empty. The tensors are ordinary (not views,
// from ATen's allocator); their contents are uninitialised, as at::empty's.
// mmkernels._cpp.cache_info() / empty_cache() report and release the free ones.
#pragma once

#include <ATen/ATen.h>

namespace mmkernels {

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace mmkernels
