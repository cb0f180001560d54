// The entry points of the row-moment kernels (row_moments.h), one version per ISA
// level where GCC supports it.
#include "cpu/row_moments.h"

#include <cstdint>

namespace lpqld::rowk {

// Non-inline entry points. On x86-64 Linux: one version per ISA level, each
// with the vector width of its registers (AVX-512: 64 bytes, AVX2: 32, baseline
// SSE2: 16), picked once at first use by the same CPU tests as the ifunc
// resolver of target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default").
// Elsewhere: one portable version with the width the compiler targets.
template <typename S>
using RowsFn = void (*)(const S*, int64_t, int64_t, int64_t, double*, double*);
#define LPQLD_ROWS_VERSION(NAME, ATTR, I, B, S)                                                \
  ATTR [[gnu::noinline]] void NAME(const S* x, int64_t L, int64_t r0, int64_t r1, double* rm, double* rm2) { \
    rows_moments<I, B>(x, L, r0, r1, rm, rm2);                                               \
  }
#if LPQLD_MULTIVERSION
#define LPQLD_ROWS(NAME, I, S)                                                          \
  LPQLD_ROWS_VERSION(NAME##_v4, LPQLD_TARGET_V4, I, 64, S)                             \
  LPQLD_ROWS_VERSION(NAME##_v3, LPQLD_TARGET_V3, I, 32, S)                             \
  LPQLD_ROWS_VERSION(NAME##_base, , I, 16, S)                                         \
  RowsFn<S> NAME##_pick() {                                                           \
    __builtin_cpu_init();                                                             \
    if (__builtin_cpu_supports("x86-64-v4")) return NAME##_v4;                        \
    if (__builtin_cpu_supports("x86-64-v3")) return NAME##_v3;                        \
    return NAME##_base;                                                               \
  }                                                                                   \
  void NAME(const S* x, int64_t L, int64_t r0, int64_t r1, double* rm, double* rm2) { \
    static const RowsFn<S> fn = NAME##_pick();                                        \
    fn(x, L, r0, r1, rm, rm2);                                                        \
  }
#else
#if defined(__AVX512F__)
constexpr int kPortableBytes = 64;
#elif defined(__AVX__)
constexpr int kPortableBytes = 32;
#else
constexpr int kPortableBytes = 16;
#endif
#define LPQLD_ROWS(NAME, I, S) LPQLD_ROWS_VERSION(NAME, , I, kPortableBytes, S)
#endif
LPQLD_ROWS(rows_f32, In::F32, float)
LPQLD_ROWS(rows_f64, In::F64, double)
LPQLD_ROWS(rows_f16, In::F16, uint16_t)
LPQLD_ROWS(rows_bf16, In::BF16, uint16_t)
#undef LPQLD_ROWS
#undef LPQLD_ROWS_VERSION

}  // namespace lpqld::rowk
