// Recycled page-backed blocks for the large float outputs of the CPU kernels.
//
// A fresh multi-megabyte at::empty is an mmap whose pages the kernel faults in
// and clears on first write: for a 77 MB replay batch (128 x 3 x 224 x 224
// float32) that costs 10-40 ms on a VM, more than the resize itself. Blocks
// released by dead tensors are kept (up to a byte limit) and handed to the next
// request of the same rounded size, so a replay or recover loop touches no
// fresh pages in steady state. New blocks are 2 MiB aligned and advised as
// transparent huge pages (512x fewer faults where THP is in madvise mode).
#pragma once

#include <ATen/ATen.h>

namespace lpqld {

// An uninitialised contiguous CPU tensor; pooled when it is at least 1 MiB.
at::Tensor pooled_empty(at::IntArrayRef sizes, at::ScalarType dtype);

}  // namespace lpqld
