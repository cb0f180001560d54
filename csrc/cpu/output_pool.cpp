// See output_pool.h. The pool is a process-wide LIFO free list per block size;
// a block returns to it only from the deleter of the tensor that owned it, so
// a block is never visible through two live tensors.
#include "output_pool.h"

#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace lpqld {
namespace {

constexpr int64_t kMinPooled = int64_t{1} << 20;  // smaller requests: glibc's heap is already warm
constexpr int64_t kAlign = int64_t{2} << 20;      // one transparent huge page

struct Pool {
  std::mutex mu;
  std::vector<std::pair<int64_t, void*>> free_blocks;  // (bytes, block)
  int64_t cached = 0;
  int64_t limit = int64_t{512} << 20;
  int64_t hits = 0;
  int64_t misses = 0;
};

// Leaked on purpose: tensors may die during static destruction and still call the deleter.
Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

void release(void* block, int64_t bytes) {
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mu);
    if (p.cached + bytes <= p.limit) {
      p.free_blocks.emplace_back(bytes, block);
      p.cached += bytes;
      return;
    }
  }
  std::free(block);
}

void* acquire(int64_t bytes) {
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mu);
    for (auto it = p.free_blocks.rbegin(); it != p.free_blocks.rend(); ++it) {
      if (it->first == bytes) {
        void* block = it->second;
        p.free_blocks.erase(std::next(it).base());
        p.cached -= bytes;
        ++p.hits;
        return block;
      }
    }
    ++p.misses;
  }
  void* block = std::aligned_alloc(static_cast<size_t>(kAlign), static_cast<size_t>(bytes));
  if (block == nullptr) {
    // Memory is short: give the cached blocks back and try once more.
    std::vector<std::pair<int64_t, void*>> drop;
    {
      std::lock_guard<std::mutex> lock(p.mu);
      drop.swap(p.free_blocks);
      p.cached = 0;
    }
    for (auto& b : drop) std::free(b.second);
    block = std::aligned_alloc(static_cast<size_t>(kAlign), static_cast<size_t>(bytes));
    if (block == nullptr) throw std::bad_alloc();
  }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(block, static_cast<size_t>(bytes), MADV_HUGEPAGE);  // advice only: failure is harmless
#endif
  return block;
}

// _cpu_output_pool(limit=-1): limit >= 0 sets the byte limit of cached blocks (0 frees them all and
// disables pooling); returns [limit, cached bytes, hits, misses].
std::vector<int64_t> output_pool_control(int64_t limit) {
  Pool& p = pool();
  std::vector<std::pair<int64_t, void*>> drop;
  std::vector<int64_t> state;
  {
    std::lock_guard<std::mutex> lock(p.mu);
    if (limit >= 0) {
      p.limit = limit;
      while (p.cached > p.limit && !p.free_blocks.empty()) {
        drop.push_back(p.free_blocks.front());
        p.cached -= p.free_blocks.front().first;
        p.free_blocks.erase(p.free_blocks.begin());
      }
    }
    state = {p.limit, p.cached, p.hits, p.misses};
  }
  for (auto& b : drop) std::free(b.second);
  return state;
}

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const int64_t nbytes = numel * static_cast<int64_t>(c10::elementSize(dtype));
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  if (nbytes < kMinPooled) return at::empty(sizes, options);
  const int64_t bytes = (nbytes + kAlign - 1) / kAlign * kAlign;
  void* block = acquire(bytes);
  return at::from_blob(block, sizes, [bytes](void* ptr) { release(ptr, bytes); }, options);
}

}  // namespace lpqld

// No tensor arguments: a CompositeImplicitAutograd kernel is what the dispatcher calls for it.
TORCH_LIBRARY_IMPL(lpqld, CompositeImplicitAutograd, m) { m.impl("_cpu_output_pool", &lpqld::output_pool_control); }
