// The per-ISA variants of the soft-label KL CPU kernel's float rows: the SIMD templates instantiated
// inside functions compiled for baseline x86-64, AVX2+FMA and AVX-512F (target attributes, so the
// extension itself keeps portable flags), and the one picked at load time from the CPU's features.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <string>

#include "cpu/soft_label_kl_cpu.h"
#include "cpu/soft_label_kl_rows.h"
#include "cpu/soft_label_kl_topk.h"

namespace lpqld::slkl_cpu {

#define LPQLD_FLOAT_VARIANT(SUFFIX, ATTR, V, U)                                                                  \
  ATTR void stats_##SUFFIX(const float* x, int64_t n, float inv_t, float& m, float& s) {                         \
    stats_simd<V, U>(x, n, inv_t, m, s);                                                                         \
  }                                                                                                              \
  ATTR double dense_##SUFFIX(const float* z, const float* u, int64_t n, float zm, float inv_s, float zs,         \
                             float um, float inv_t, float zt, float coef, float* g, bool& bad) {                 \
    return dense_simd<V, U>(z, u, n, zm, inv_s, zs, um, inv_t, zt, coef, g, bad);                                \
  }                                                                                                              \
  ATTR void half_to_float_##SUFFIX(const uint16_t* h, int64_t n, float* out) {                                   \
    half_to_float_simd<V, U>(h, n, out);                                                                         \
  }                                                                                                              \
  ATTR uint32_t topk_row_##SUFFIX(TopkRow<float>& R) { return topk_row<SimdOps<V, U>>(R); }                      \
  constexpr FloatKernels kKernels_##SUFFIX{#SUFFIX, &stats_##SUFFIX, &dense_##SUFFIX, &half_to_float_##SUFFIX,    \
                                           &topk_row_##SUFFIX};

LPQLD_FLOAT_VARIANT(base, __attribute__((flatten)), vf4, vu4)
#if defined(__GNUC__) && defined(__x86_64__)
#define LPQLD_X86_VARIANTS 1
LPQLD_FLOAT_VARIANT(avx2, __attribute__((target("avx2,fma"), flatten)), vf8, vu8)
LPQLD_FLOAT_VARIANT(avx512, __attribute__((target("avx512f,avx2,fma"), flatten)), vf16, vu16)
#endif

const FloatKernels* variant(const std::string& isa) {
  if (isa == "base") return &kKernels_base;
#ifdef LPQLD_X86_VARIANTS
  __builtin_cpu_init();
  if (isa == "avx2" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &kKernels_avx2;
  if (isa == "avx512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma"))
    return &kKernels_avx512;
#endif
  return nullptr;
}

std::atomic<const FloatKernels*>& active_kernels() {
  static std::atomic<const FloatKernels*> active{[] {
    for (const char* isa : {"avx512", "avx2"})
      if (const FloatKernels* k = variant(isa)) return k;
    return &kKernels_base;
  }()};
  return active;
}

// Which float variant runs; a non-empty isa ("base", "avx2", "avx512") switches
// to it (for tests and benchmarks). Returns the active one.
std::string soft_label_kl_cpu_isa(c10::string_view isa) {
  if (!isa.empty()) {
    const FloatKernels* k = variant(std::string(isa));
    TORCH_CHECK(k != nullptr, "_soft_label_kl_cpu_isa: ", std::string(isa),
                " is not available on this CPU/build (base, avx2, avx512)");
    active_kernels().store(k);
  }
  return active_kernels().load()->isa;
}

}  // namespace lpqld::slkl_cpu

// No tensor arguments: a CompositeImplicitAutograd kernel is what the dispatcher calls for it.
TORCH_LIBRARY_IMPL(lpqld, CompositeImplicitAutograd, m) {
  m.impl("_soft_label_kl_cpu_isa", &lpqld::slkl_cpu::soft_label_kl_cpu_isa);
}
