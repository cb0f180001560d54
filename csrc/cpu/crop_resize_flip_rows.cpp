// The row kernels of the crop_resize_flip CPU forward (crop_resize_flip_rows.h) compiled for baseline
// x86-64, AVX2 and AVX-512 (target attributes: the extension keeps portable flags), and the one picked at
// load time.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <string>

#include "cpu/crop_resize_flip_rows.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define LPQLD_CRF_X86 1
// GCC 12's own AVX-512 headers trip this warning (their __Y = __Y idiom), not our code.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace lpqld::crf_cpu {
namespace {

void u8_to_float_base(const uint8_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
void hpass_span(const float* row, const int32_t* i0, const int32_t* i1, const float* w0, const float* w1, int64_t n,
                float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = row[i0[i]] * w0[i] + row[i1[i]] * w1[i];
}
void hpass_base(const float* row, const ColumnPlan& pl, int64_t n, float* dst) {
  hpass_span(row, pl.i0, pl.i1, pl.w0, pl.w1, n, dst);
}
void vblend_base(const float* top, const float* bot, float wy0, float wy1, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = top[i] * wy0 + bot[i] * wy1;
}
constexpr RowKernels kRowBase{"base", false, &u8_to_float_base, &hpass_base, nullptr, &vblend_base};

#ifdef LPQLD_CRF_X86
#define LPQLD_AVX2 __attribute__((target("avx2")))
LPQLD_AVX2 void u8_to_float_avx2(const uint8_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)));
  }
  u8_to_float_base(src + i, n - i, dst + i);  // the tail
}
LPQLD_AVX2 void hpass_avx2(const float* row, const ColumnPlan& pl, int64_t n, float* dst) {
  const int32_t *i0 = pl.i0, *i1 = pl.i1;
  const float *w0 = pl.w0, *w1 = pl.w1;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 a = _mm256_i32gather_ps(row, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(i0 + i)), 4);
    const __m256 b = _mm256_i32gather_ps(row, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(i1 + i)), 4);
    _mm256_storeu_ps(dst + i, _mm256_add_ps(_mm256_mul_ps(a, _mm256_loadu_ps(w0 + i)),
                                            _mm256_mul_ps(b, _mm256_loadu_ps(w1 + i))));
  }
  hpass_span(row, i0 + i, i1 + i, w0 + i, w1 + i, n - i, dst + i);
}
LPQLD_AVX2 void vblend_avx2(const float* top, const float* bot, float wy0, float wy1, int64_t n, float* dst) {
  const __m256 a = _mm256_set1_ps(wy0), b = _mm256_set1_ps(wy1);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(top + i), a),
                                            _mm256_mul_ps(_mm256_loadu_ps(bot + i), b)));
  }
  vblend_base(top + i, bot + i, wy0, wy1, n - i, dst + i);
}
constexpr RowKernels kRowAvx2{"avx2", false, &u8_to_float_avx2, &hpass_avx2, nullptr, &vblend_avx2};

// AVX-512F brings FMA, and GCC contracts a * b + c (intrinsics included) under its default
// -ffp-contract=fast: switched off so these kernels round like the portable ones.
#define LPQLD_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2"), optimize("fp-contract=off")))
LPQLD_AVX512 void u8_to_float_avx512(const uint8_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm512_storeu_ps(dst + i, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)));
  }
  u8_to_float_base(src + i, n - i, dst + i);
}
// The 16 outputs of a window read <= 32 source columns from lo on (crops up to ~2x downscale; the plan
// marks wider ones lo = -1): two masked loads of the window and two in-register permutes give the same
// values as two gathers, which are slow on some CPUs (Zen 4). The window, masks and permute indices are
// planned once per sample, not per row. Masked-off lanes are not read.
LPQLD_AVX512 inline __mmask16 window_mask(int32_t from, int32_t span) {
  const int32_t k = std::min(std::max(span - from, 0), 16);
  return static_cast<__mmask16>((1u << k) - 1u);
}
// 16 consecutive row elements as floats, lanes outside `m` zero and not read.
LPQLD_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
LPQLD_AVX512 inline __m512 load16(const uint8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, p)));
}
// row[idx[0..16)] as floats.
LPQLD_AVX512 inline __m512 gather16(const float* row, const int32_t* idx) {
  return _mm512_i32gather_ps(_mm512_loadu_si512(idx), row, 4);
}
LPQLD_AVX512 inline __m512 gather16(const uint8_t* row, const int32_t* idx) {
  alignas(64) float t[16];
  for (int e = 0; e < 16; ++e) t[e] = static_cast<float>(row[idx[e]]);
  return _mm512_load_ps(t);
}
// The horizontal pass on float or uint8 rows (uint8 read straight, no converted row).
template <typename T>
LPQLD_AVX512 inline void hpass_windows(const T* row, const ColumnPlan& pl, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const int32_t lo = pl.lo[i / 16];
    __m512 a, b;
    if (lo >= 0) {
      const int32_t span = pl.span[i / 16];
      const __m512 w_lo = load16(row + lo, window_mask(0, span));
      const __m512 w_hi = load16(row + lo + 16, window_mask(16, span));
      a = _mm512_permutex2var_ps(w_lo, _mm512_loadu_si512(pl.r0 + i), w_hi);
      b = _mm512_permutex2var_ps(w_lo, _mm512_loadu_si512(pl.r1 + i), w_hi);
    } else {
      a = gather16(row, pl.i0 + i);
      b = gather16(row, pl.i1 + i);
    }
    _mm512_storeu_ps(dst + i, _mm512_add_ps(_mm512_mul_ps(a, _mm512_loadu_ps(pl.w0 + i)),
                                            _mm512_mul_ps(b, _mm512_loadu_ps(pl.w1 + i))));
  }
  for (; i < n; ++i) {  // the tail: the portable formula
    dst[i] = static_cast<float>(row[pl.i0[i]]) * pl.w0[i] + static_cast<float>(row[pl.i1[i]]) * pl.w1[i];
  }
}
LPQLD_AVX512 void hpass_avx512(const float* row, const ColumnPlan& pl, int64_t n, float* dst) {
  hpass_windows(row, pl, n, dst);
}
LPQLD_AVX512 void hpass_u8_avx512(const uint8_t* row, const ColumnPlan& pl, int64_t n, float* dst) {
  hpass_windows(row, pl, n, dst);
}
LPQLD_AVX512 void vblend_avx512(const float* top, const float* bot, float wy0, float wy1, int64_t n, float* dst) {
  const __m512 a = _mm512_set1_ps(wy0), b = _mm512_set1_ps(wy1);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(dst + i, _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(top + i), a),
                                            _mm512_mul_ps(_mm512_loadu_ps(bot + i), b)));
  }
  vblend_base(top + i, bot + i, wy0, wy1, n - i, dst + i);
}
constexpr RowKernels kRowAvx512{"avx512", true, &u8_to_float_avx512, &hpass_avx512, &hpass_u8_avx512,
                                 &vblend_avx512};
#endif

}  // namespace

const RowKernels* row_variant(const std::string& isa) {
  if (isa == "base") return &kRowBase;
#ifdef LPQLD_CRF_X86
  __builtin_cpu_init();
  if (isa == "avx2" && __builtin_cpu_supports("avx2")) return &kRowAvx2;
  if (isa == "avx512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2"))
    return &kRowAvx512;
#endif
  return nullptr;
}

std::atomic<const RowKernels*>& active_row_kernels() {
  static std::atomic<const RowKernels*> active{[] {
    for (const char* isa : {"avx512", "avx2"})
      if (const RowKernels* k = row_variant(isa)) return k;
    return &kRowBase;
  }()};
  return active;
}

// Which row-kernel variant runs; a non-empty isa ("base", "avx2", "avx512")
// switches to it (tests check that all give the same bits). Returns the active one.
std::string crop_resize_flip_cpu_isa(c10::string_view isa) {
  if (!isa.empty()) {
    const RowKernels* k = row_variant(std::string(isa));
    TORCH_CHECK(k != nullptr, "_crop_resize_flip_cpu_isa: ", std::string(isa),
                " is not available on this CPU/build (base, avx2, avx512)");
    active_row_kernels().store(k);
  }
  return active_row_kernels().load()->isa;
}

}  // namespace lpqld::crf_cpu

// No tensor arguments: a CompositeImplicitAutograd kernel is what the dispatcher calls for it.
TORCH_LIBRARY_IMPL(lpqld, CompositeImplicitAutograd, m) {
  m.impl("_crop_resize_flip_cpu_isa", &lpqld::crf_cpu::crop_resize_flip_cpu_isa);
}
